//! Names and versions as the API accepts them: product and channel names,
//! repositories, SemVer versions. Pure checks; the handlers turn a refusal
//! into a 400 with the message.

use super::channel::Refused;

/// Products and channels are named `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A repository is `host[:port]/path` with lowercase path components, no tag or digest.
pub fn valid_repository(repo: &str) -> bool {
    let Some((host, path)) = repo.split_once('/') else {
        return false;
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':'))
        && !path.is_empty()
        && path.split('/').all(|part| {
            !part.is_empty()
                && part.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
                })
        })
}

/// Checks a version is SemVer 2.0.
pub fn parse_version(v: &str) -> Result<semver::Version, Refused> {
    semver::Version::parse(v).map_err(|e| {
        Refused(format!(
            "invalid version {v:?}: {e}; use SemVer 2.0 such as 1.4.2 or 2.0.0-rc.1"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_repositories_and_versions() {
        for ok in ["acme", "acme-os", "0day", "a"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Acme", "-acme", "acme_os", "acme.os", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_repository("127.0.0.1:5000/acme/os"));
        assert!(valid_repository("ghcr.io/acme/os-image_1"));
        for bad in [
            "acme",
            "ghcr.io/",
            "ghcr.io/Acme/os",
            "ghcr.io/acme//os",
            "ghcr.io/acme/os:1.0",
        ] {
            assert!(!valid_repository(bad), "{bad}");
        }
        assert!(parse_version("2.0.0-rc.1").is_ok());
        let e = parse_version("1.2").unwrap_err();
        assert!(e.0.contains("use SemVer 2.0"), "{e}");
    }
}
