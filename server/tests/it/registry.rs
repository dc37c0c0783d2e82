//! The registry client and image signing against a real OCI registry
//! (`SLUICE_TEST_REGISTRY=host:port`, plain HTTP) and the real `cosign` CLI
//! (`COSIGN`, default `cosign` on PATH) as an independent verifier.

use crate::common::images;

use images::Format;
use sluice_protocol::KeyRole;
use sluice_protocol::simplesigning::verify_image_signature;
use sluice_server::config::Config;
use sluice_server::error::Error;
use sluice_server::infra::keystore::KeyStore;
use sluice_server::infra::registry::{
    self, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, ImageRef, OCI_INDEX, OCI_MANIFEST, Registry,
    ResolvedImage,
};
use sluice_server::infra::signing::{SignedDigest, sign_digest};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// The test registry; these tests need one and say how to get it.
fn registry_addr() -> String {
    std::env::var("SLUICE_TEST_REGISTRY").unwrap_or_else(|_| {
        panic!(
            "SLUICE_TEST_REGISTRY is not set: start a plain-HTTP OCI registry \
             (`docker-registry serve CONFIG` with http.addr 127.0.0.1:PORT) and set \
             SLUICE_TEST_REGISTRY=127.0.0.1:PORT"
        )
    })
}

fn cosign_bin() -> String {
    std::env::var("COSIGN").unwrap_or_else(|_| "cosign".into())
}

/// A server configuration (the test servers' own) whose registry client
/// speaks plain HTTP to `insecure`.
fn config(insecure: &[&str], data_dir: &Path) -> Config {
    Config {
        insecure_registries: insecure.iter().map(|s| s.to_string()).collect(),
        ..crate::common::config(data_dir.to_path_buf())
    }
}

fn test_registry() -> (String, Registry) {
    let addr = registry_addr();
    let dir = std::env::temp_dir();
    let reg = Registry::new(&config(&[&addr], &dir)).expect("registry client");
    (addr, reg)
}

/// The platforms a resolution found, as the pusher describes what it pushed.
fn pushed_platforms(r: &ResolvedImage) -> Vec<images::PushedPlatform> {
    r.platforms
        .iter()
        .map(|p| images::PushedPlatform {
            arch: p.architecture.clone(),
            digest: p.digest.clone(),
            size: p.size,
        })
        .collect()
}

fn by_tag(repository: &str, tag: &str) -> ImageRef {
    registry::parse_reference(&format!("{repository}:{tag}")).unwrap()
}

fn by_digest(repository: &str, digest: &str) -> ImageRef {
    registry::parse_reference(&format!("{repository}@{digest}")).unwrap()
}

/// Runs `cosign verify --key <pem>` against `image`, offline (no tlog).
fn cosign_verify(pem: &Path, image: &str, extra: &[&str]) -> Output {
    std::process::Command::new(cosign_bin())
        .args(["verify", "--key"])
        .arg(pem)
        .args(["--insecure-ignore-tlog=true", "--allow-http-registry=true"])
        .args(extra)
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("running {} (set COSIGN to its path): {e}", cosign_bin()))
}

fn assert_verifies(pem: &Path, image: &str, extra: &[&str]) {
    let out = cosign_verify(pem, image, extra);
    assert!(
        out.status.success(),
        "cosign verify {image} {extra:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn assert_refused(pem: &Path, image: &str, extra: &[&str]) {
    let out = cosign_verify(pem, image, extra);
    assert!(
        !out.status.success(),
        "cosign verify {image} {extra:?} accepted what it should refuse: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Writes the current image key's public PEM where cosign can read it.
fn write_pem(keys: &KeyStore, path: &Path) {
    std::fs::write(path, &keys.image_key().public.public_key_pem).unwrap();
}

/// A single OCI manifest resolves by tag and by digest to the pushed digest,
/// with its platform from the config blob and its layer size.
#[tokio::test]
async fn resolves_an_oci_manifest_by_tag_and_by_digest() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("oci");
    let (digest, size) = images::push_image(&addr, &repo, "1.0").await;
    let repository = format!("{addr}/{repo}");

    let by_tag = reg.resolve(&by_tag(&repository, "1.0")).await.unwrap();
    assert_eq!(by_tag.digest, digest);
    assert_eq!(by_tag.repository, repository);
    assert_eq!(by_tag.media_type, OCI_MANIFEST);
    assert_eq!(by_tag.platforms.len(), 1);
    let p = &by_tag.platforms[0];
    assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));
    assert_eq!(p.digest, digest);
    assert_eq!(p.size, size);

    let by_digest = reg.resolve(&by_digest(&repository, &digest)).await.unwrap();
    assert_eq!(by_digest, by_tag);
}

/// A `docker push`-style schema 2 manifest resolves like an OCI one.
#[tokio::test]
async fn resolves_a_docker_schema2_manifest() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("docker");
    let (digest, size) = images::push_docker_image(&addr, &repo, "latest").await;
    let repository = format!("{addr}/{repo}");

    let r = reg.resolve(&by_tag(&repository, "latest")).await.unwrap();
    assert_eq!(r.digest, digest);
    assert_eq!(r.media_type, DOCKER_MANIFEST);
    assert_eq!(r.platforms.len(), 1);
    assert_eq!(r.platforms[0].architecture, "amd64");
    assert_eq!(r.platforms[0].size, size);
    assert_eq!(r.platforms[0].digest, digest);
}

/// An OCI index resolves to its own digest and one entry per platform with
/// that platform's manifest digest and layer size; BuildKit's `unknown/unknown`
/// attestation entry is not a platform.
#[tokio::test]
async fn resolves_an_oci_index_per_platform_skipping_attestations() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("index");
    // A real manifest behind the attestation entry, as BuildKit pushes it.
    let (att_digest, _) = images::push_platform(
        &addr,
        &repo,
        None,
        Format::Oci,
        "unknown",
        &[images::random_layer(64)],
    )
    .await;
    let attestation = serde_json::json!({
        "mediaType": images::OCI_MANIFEST,
        "digest": att_digest,
        "size": 1,
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    });
    let (index_digest, pushed) = images::push_index_with(
        &addr,
        &repo,
        "2.0",
        Format::Oci,
        &["amd64", "arm64"],
        &[attestation],
    )
    .await;
    let repository = format!("{addr}/{repo}");

    for reference in [
        by_tag(&repository, "2.0"),
        by_digest(&repository, &index_digest),
    ] {
        let r = reg.resolve(&reference).await.unwrap();
        assert_eq!(r.digest, index_digest);
        assert_eq!(r.media_type, OCI_INDEX);
        assert_eq!(pushed_platforms(&r), pushed);
        assert!(r.platforms.iter().all(|p| p.os == "linux"));
        assert_eq!(r.platforms[1].variant.as_deref(), Some("v8"));
        assert_ne!(r.platforms[0].digest, r.platforms[1].digest);
    }
}

/// A Docker manifest list resolves per platform like an OCI index.
#[tokio::test]
async fn resolves_a_docker_manifest_list() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("list");
    let (list_digest, pushed) = images::push_index_with(
        &addr,
        &repo,
        "3.0",
        Format::Docker,
        &["amd64", "arm64"],
        &[],
    )
    .await;
    let repository = format!("{addr}/{repo}");

    let r = reg.resolve(&by_tag(&repository, "3.0")).await.unwrap();
    assert_eq!(r.digest, list_digest);
    assert_eq!(r.media_type, DOCKER_MANIFEST_LIST);
    assert_eq!(pushed_platforms(&r), pushed);
}

/// A tag that was never pushed, a digest that is not there, and a repository
/// that does not exist are 422s telling the user to push first.
#[tokio::test]
async fn a_missing_tag_or_digest_is_422_push_it_first() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("missing");
    images::push_image(&addr, &repo, "present").await;
    let repository = format!("{addr}/{repo}");
    let absent = format!("sha256:{}", "0".repeat(64));

    for reference in [
        by_tag(&repository, "absent"),
        by_digest(&repository, &absent),
        by_tag(&format!("{addr}/sluice-test/never-pushed-repo"), "1"),
    ] {
        let err = reg.resolve(&reference).await.unwrap_err();
        assert_eq!(err.status(), 422, "{reference:?}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains("not found in the registry: push it before publishing"),
            "{msg}"
        );
        assert!(msg.contains(&reference.repository), "{msg}");
    }
}

/// A registry nobody listens on is a 503 naming the host, within seconds,
/// and fails the readiness ping; the real one passes it.
#[tokio::test]
async fn a_registry_that_is_down_is_503_quickly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = format!("127.0.0.1:{port}");
    let real = registry_addr();
    let reg = Registry::new(&config(&[&down, &real], &std::env::temp_dir())).unwrap();

    let started = Instant::now();
    let err = reg
        .resolve(&by_tag(&format!("{down}/acme/os"), "1.0"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert_eq!(err.status(), 503);
    let msg = err.to_string();
    assert!(
        msg.contains(&down) && msg.contains("retry when it is up"),
        "{msg}"
    );

    let err = reg.ping(&down).await.unwrap_err();
    assert_eq!(err.status(), 503, "{err}");
    reg.ping(&real).await.unwrap();
}

/// A signature pushed by Sluice passes `cosign verify` with the image key (and
/// its `sluice.version` annotation check), fails with another key and another
/// version, and passes the agent's own verifier for exactly this version.
#[tokio::test]
async fn signatures_verify_with_cosign_and_the_agent_verifier() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("signed");
    let (digest, _) = images::push_image(&addr, &repo, "1.0.0").await;
    let repository = format!("{addr}/{repo}");
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyStore::load_or_create(&dir.path().join("a"), "passphrase").unwrap();
    let other = KeyStore::load_or_create(&dir.path().join("b"), "passphrase").unwrap();
    let (pem, other_pem) = (dir.path().join("a.pub"), dir.path().join("b.pub"));
    write_pem(&keys, &pem);
    write_pem(&other, &other_pem);

    let image = format!("{repository}@{digest}");
    // Nothing signed yet: cosign must refuse, or the checks below prove nothing.
    assert_refused(&pem, &image, &[]);

    let sig = sign_digest(&keys.image_key(), &repository, &digest, "acme-os", "1.0.0").unwrap();
    assert_eq!(sig.key_id, keys.image_key().public.key_id);
    reg.push_signatures(
        &repository,
        &[SignedDigest {
            digest: digest.clone(),
            signature: sig.clone(),
        }],
    )
    .await
    .unwrap();

    assert_verifies(&pem, &image, &[]);
    assert_verifies(&pem, &format!("{repository}:1.0.0"), &[]);
    assert_verifies(
        &pem,
        &image,
        &["-a", "sluice.version=1.0.0", "-a", "sluice.product=acme-os"],
    );
    assert_refused(&pem, &image, &["-a", "sluice.version=2.0.0"]);
    assert_refused(&other_pem, &image, &[]);

    let trusted = keys.public_keys();
    let payload = verify_image_signature(&trusted, &sig, &digest, "acme-os", "1.0.0").unwrap();
    // cosign writes the bare repository when signing by digest; so do we.
    assert_eq!(payload.critical.identity.docker_reference, repository);
    assert!(verify_image_signature(&trusted, &sig, &digest, "acme-os", "1.0.1").is_err());
    assert!(
        verify_image_signature(&other.public_keys(), &sig, &digest, "acme-os", "1.0.0").is_err()
    );

    // The layer in the registry is byte for byte the payload devices receive.
    let tag = registry::signature_tag(&digest).unwrap();
    let layers = reg.signature_layers(&repository, &digest).await.unwrap();
    assert_eq!(layers.len(), 1, "{tag}: {layers:?}");
    use base64::Engine;
    let payload_bytes = base64::engine::general_purpose::STANDARD
        .decode(&sig.payload)
        .unwrap();
    assert_eq!(layers[0]["digest"], images::digest(&payload_bytes));
    assert_eq!(
        layers[0]["annotations"][registry::COSIGN_SIGNATURE_ANNOTATION],
        sig.signature
    );
}

/// Every platform of an index and the index itself can be signed and verified.
#[tokio::test]
async fn index_and_platform_signatures_verify_with_cosign() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("signed-index");
    let (index_digest, pushed) =
        images::push_index(&addr, &repo, "4.0.0", &["amd64", "arm64"]).await;
    let repository = format!("{addr}/{repo}");
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyStore::load_or_create(dir.path(), "passphrase").unwrap();
    let pem = dir.path().join("image.pub");
    write_pem(&keys, &pem);

    let resolved = reg.resolve(&by_tag(&repository, "4.0.0")).await.unwrap();
    let digests: Vec<String> = std::iter::once(resolved.digest.clone())
        .chain(resolved.platforms.iter().map(|p| p.digest.clone()))
        .collect();
    assert_eq!(digests.len(), 3);
    let sigs: Vec<SignedDigest> = digests
        .iter()
        .map(|d| SignedDigest {
            digest: d.clone(),
            signature: sign_digest(&keys.image_key(), &repository, d, "acme-os", "4.0.0").unwrap(),
        })
        .collect();
    reg.push_signatures(&repository, &sigs).await.unwrap();

    assert_verifies(&pem, &format!("{repository}@{index_digest}"), &[]);
    for (_, d, _) in &pushed {
        assert_verifies(
            &pem,
            &format!("{repository}@{d}"),
            &["-a", "sluice.version=4.0.0"],
        );
    }
}

/// After rotating the image key, signing the same digest again adds a layer:
/// cosign accepts the image with the old key and with the new one. Pushing the
/// same signature again adds nothing.
#[tokio::test]
async fn rotation_keeps_the_old_signature_next_to_the_new_one() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("rotated");
    let (digest, _) = images::push_image(&addr, &repo, "5.0.0").await;
    let repository = format!("{addr}/{repo}");
    let image = format!("{repository}@{digest}");
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyStore::load_or_create(dir.path(), "passphrase").unwrap();
    let (pem1, pem2) = (dir.path().join("1.pub"), dir.path().join("2.pub"));

    write_pem(&keys, &pem1);
    let sig1 = sign_digest(&keys.image_key(), &repository, &digest, "acme-os", "5.0.0").unwrap();
    let signed1 = SignedDigest {
        digest: digest.clone(),
        signature: sig1,
    };
    reg.push_signatures(&repository, std::slice::from_ref(&signed1))
        .await
        .unwrap();

    // A new image key, as `sluice keys generate` makes one (this test has no
    // database, so no key list: the `current` file says which key signs).
    sluice_server::infra::keystore::generate(
        &dir.path().join("keys"),
        "passphrase",
        KeyRole::Image,
    )
    .unwrap();
    let keys = KeyStore::load_or_create(dir.path(), "passphrase").unwrap();
    write_pem(&keys, &pem2);
    assert_ne!(std::fs::read(&pem1).unwrap(), std::fs::read(&pem2).unwrap());
    assert_refused(&pem2, &image, &[]);

    let sig2 = sign_digest(&keys.image_key(), &repository, &digest, "acme-os", "5.0.0").unwrap();
    let signed2 = SignedDigest {
        digest: digest.clone(),
        signature: sig2,
    };
    reg.push_signatures(&repository, std::slice::from_ref(&signed2))
        .await
        .unwrap();

    assert_verifies(&pem1, &image, &[]);
    assert_verifies(&pem2, &image, &[]);
    assert_eq!(
        reg.signature_layers(&repository, &digest)
            .await
            .unwrap()
            .len(),
        2
    );

    // A retried publish (same signature, or a fresh one by the same key) does not pile up layers.
    reg.push_signatures(&repository, &[signed1, signed2])
        .await
        .unwrap();
    let again = sign_digest(&keys.image_key(), &repository, &digest, "acme-os", "5.0.0").unwrap();
    reg.push_signatures(
        &repository,
        &[SignedDigest {
            digest: digest.clone(),
            signature: again,
        }],
    )
    .await
    .unwrap();
    assert_eq!(
        reg.signature_layers(&repository, &digest)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_verifies(&pem1, &image, &[]);
}

/// Credentials come from a Docker config.json: `auth` (base64 user:password)
/// or `username`/`password`; an entry without either is refused at start.
#[test]
fn docker_config_credentials_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(
        &path,
        r#"{"auths": {
            "registry.example.com": {"auth": "YWxpY2U6czNjcjN0"},
            "https://other.example.com/v1/": {"username": "bob", "password": "pw"}
        }}"#,
    )
    .unwrap();
    let auths = registry::load_docker_auth(&path).unwrap();
    use oci_client::secrets::RegistryAuth;
    assert!(
        matches!(auths.get("registry.example.com"), Some(RegistryAuth::Basic(u, p)) if u == "alice" && p == "s3cr3t")
    );
    assert!(
        matches!(auths.get("other.example.com"), Some(RegistryAuth::Basic(u, p)) if u == "bob" && p == "pw")
    );

    std::fs::write(
        &path,
        r#"{"auths": {"r.example.com": {"credsStore": "x"}}}"#,
    )
    .unwrap();
    let err = registry::load_docker_auth(&path).unwrap_err().to_string();
    assert!(err.contains("r.example.com"), "{err}");

    let mut cfg = config(&[], dir.path());
    cfg.registry_auth = Some(dir.path().join("absent.json"));
    let err = Registry::new(&cfg)
        .err()
        .expect("a missing auth file is an error");
    assert!(
        format!("{err:#}").contains("SLUICE_REGISTRY_AUTH"),
        "{err:#}"
    );
}

/// A signature made earlier by the cosign CLI itself (another key) is still
/// there after Sluice pushes its own: both keys verify.
#[tokio::test]
async fn a_cosign_cli_signature_survives_our_push() {
    let (addr, reg) = test_registry();
    let repo = images::unique_repo("cosign-first");
    let (digest, _) = images::push_image(&addr, &repo, "6.0.0").await;
    let repository = format!("{addr}/{repo}");
    let image = format!("{repository}@{digest}");
    let dir = tempfile::tempdir().unwrap();

    let generated = std::process::Command::new(cosign_bin())
        .arg("generate-key-pair")
        .current_dir(dir.path())
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let signed = std::process::Command::new(cosign_bin())
        .args([
            "sign",
            "--yes",
            "--key",
            "cosign.key",
            "--tlog-upload=false",
        ])
        .arg("--allow-http-registry=true")
        .arg(&image)
        .current_dir(dir.path())
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let cosign_pub = dir.path().join("cosign.pub");
    assert_verifies(&cosign_pub, &image, &[]);

    let keys = KeyStore::load_or_create(&dir.path().join("sluice"), "passphrase").unwrap();
    let pem = dir.path().join("sluice.pub");
    write_pem(&keys, &pem);
    let sig = sign_digest(&keys.image_key(), &repository, &digest, "acme-os", "6.0.0").unwrap();
    reg.push_signatures(
        &repository,
        &[SignedDigest {
            digest: digest.clone(),
            signature: sig,
        }],
    )
    .await
    .unwrap();

    assert_verifies(&cosign_pub, &image, &[]);
    assert_verifies(&pem, &image, &["-a", "sluice.version=6.0.0"]);
    assert_eq!(
        reg.signature_layers(&repository, &digest)
            .await
            .unwrap()
            .len(),
        2
    );
}

/// bcrypt (cost 4) of `s3cr3t`, for the password-protected registry below.
const HTPASSWD: &str = "ci:$2b$04$cuuPR4xC.ijB4QGM6W0TIu07dzV/POiUCqyMGP7.X6MTJalNiqnZG\n";

/// A registry process this test started; killed when dropped.
struct OwnRegistry(std::process::Child);

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `docker-registry` (or `SLUICE_TEST_REGISTRY_BIN`) with htpasswd
/// authentication on a free port; returns it with its `host:port`.
async fn start_registry_with_password(dir: &Path) -> (OwnRegistry, String) {
    let port = crate::common::free_port();
    let addr = format!("127.0.0.1:{port}");
    std::fs::write(dir.join("htpasswd"), HTPASSWD).unwrap();
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root}\n\
         http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: sluice-test\n    path: {htpasswd}\n",
        root = dir.join("storage").display(),
        htpasswd = dir.join("htpasswd").display(),
    );
    std::fs::write(dir.join("config.yml"), config).unwrap();
    let bin =
        std::env::var("SLUICE_TEST_REGISTRY_BIN").unwrap_or_else(|_| "docker-registry".into());
    let child = std::process::Command::new(&bin)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "starting {bin} (Debian's docker-registry; or set SLUICE_TEST_REGISTRY_BIN): {e}"
            )
        });
    let guard = OwnRegistry(child);
    // Readiness of a process we just started: poll its port, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = reqwest::get(format!("http://{addr}/v2/")).await;
        if up.is_ok_and(|r| r.status() == 401) {
            break;
        }
        assert!(Instant::now() < deadline, "{bin} did not come up on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (guard, addr)
}

/// Against a password-protected registry: credentials from the Docker
/// config.json let Sluice push and resolve; without them, or with a wrong
/// password, the answer is a 422 that names SLUICE_REGISTRY_AUTH.
#[tokio::test]
async fn registry_credentials_come_from_the_docker_config() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, addr) = start_registry_with_password(dir.path()).await;
    let repository = format!("{addr}/acme/os");
    let digest = images::digest(b"any manifest");
    let keys = KeyStore::load_or_create(&dir.path().join("keys"), "passphrase").unwrap();
    let sig = SignedDigest {
        digest: digest.clone(),
        signature: sign_digest(&keys.image_key(), &repository, &digest, "acme-os", "1.0.0")
            .unwrap(),
    };
    let sig_tag = by_tag(&repository, &registry::signature_tag(&digest).unwrap());

    let with_auth = |auth: &str| {
        let path = dir.path().join(format!("auth-{}.json", auth.len()));
        std::fs::write(&path, auth).unwrap();
        let mut cfg = config(&[&addr], dir.path());
        cfg.registry_auth = Some(path);
        Registry::new(&cfg).unwrap()
    };

    // `auth` is base64 of `ci:s3cr3t`.
    let good = with_auth(&format!(
        r#"{{"auths": {{"{addr}": {{"auth": "Y2k6czNjcjN0"}}}}}}"#
    ));
    good.push_signatures(&repository, std::slice::from_ref(&sig))
        .await
        .unwrap();
    let resolved = good.resolve(&sig_tag).await.unwrap();
    assert_eq!(resolved.media_type, OCI_MANIFEST);
    assert_eq!(
        good.signature_layers(&repository, &digest)
            .await
            .unwrap()
            .len(),
        1
    );

    let anonymous = Registry::new(&config(&[&addr], dir.path())).unwrap();
    let err = anonymous.resolve(&sig_tag).await.unwrap_err();
    assert_eq!(err.status(), 422, "{err}");
    assert!(
        err.to_string().contains("set SLUICE_REGISTRY_AUTH"),
        "{err}"
    );
    let err = anonymous
        .push_signatures(&repository, std::slice::from_ref(&sig))
        .await
        .unwrap_err();
    assert_eq!(err.status(), 422, "{err}");

    let wrong = with_auth(&format!(
        r#"{{"auths": {{"{addr}": {{"username": "ci", "password": "wrong"}}}}}}"#
    ));
    let err = wrong.resolve(&sig_tag).await.unwrap_err();
    assert_eq!(err.status(), 422, "{err}");
    assert!(err.to_string().contains("SLUICE_REGISTRY_AUTH"), "{err}");
}
