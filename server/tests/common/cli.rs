//! The `sluice` CLI run as the real binary: what it printed and how it exited.

use super::TestApp;
use serde_json::Value;

/// What a run of the CLI gave.
pub struct Run {
    /// The exit code (-1 when killed by a signal).
    pub code: i32,
    /// Stdout.
    pub out: String,
    /// Stderr.
    pub err: String,
}

impl Run {
    /// Asserts success and answers stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        assert!(self.err.is_empty(), "nothing on stderr: {}", self.err);
        &self.out
    }

    /// Asserts the exit code and that stderr is one `error:` line holding `needle`.
    pub fn fails(&self, code: i32, needle: &str) {
        assert_eq!(
            self.code, code,
            "stdout: {}\nstderr: {}",
            self.out, self.err
        );
        assert!(
            self.err.contains(needle),
            "stderr lacks {needle:?}: {}",
            self.err
        );
        assert!(!self.err.contains("panicked"), "{}", self.err);
        assert!(self.out.is_empty(), "nothing on stdout: {}", self.out);
    }

    /// Asserts success and answers stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.ok()).expect("the CLI prints JSON")
    }
}

/// Runs the `sluice` CLI as `token` against `server`; async, so a server in
/// the test's runtime keeps serving.
pub async fn sluice(server: &str, token: &str, args: &[&str]) -> Run {
    // `option_env!`: the end-to-end tests include this kit too, and cargo
    // names the binary only for the server's own tests.
    let Some(bin) = option_env!("CARGO_BIN_EXE_sluice") else {
        panic!("the sluice CLI runs in the server's tests only");
    };
    let out = tokio::process::Command::new(bin)
        .args(args)
        .env("SLUICE_SERVER", server)
        .env("SLUICE_TOKEN", token)
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into(),
        err: String::from_utf8_lossy(&out.stderr).into(),
    }
}

impl TestApp {
    /// Runs `sluice` as `token` against this server, the words of `line`
    /// split at spaces (an argument with a space in it goes through [`sluice`]).
    pub async fn cli(&self, token: &str, line: &str) -> Run {
        let args: Vec<&str> = line.split_whitespace().collect();
        sluice(&self.url, token, &args).await
    }
}
