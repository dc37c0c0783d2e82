//! Replays the fuzz corpus and the crash reproducers (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) through the very checks the fuzz targets run
//! (`fuzz/src/lib.rs`, included here), so CI keeps them passing on stable.

#[path = "../../../fuzz/src/lib.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of a folder; a missing folder has none.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

fn replay(target: &str) {
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is empty or missing: run `scripts/fuzz --seed {target}`"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for f in corpus.iter().chain(&regressions) {
        let data = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| checks::run(target, &data)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target} fails on {failed:#?}");
}

#[test]
fn unpack_layer_corpus_and_regressions() {
    replay("unpack_layer");
}

#[test]
fn tar_guard_corpus_and_regressions() {
    replay("tar_guard");
}

#[test]
fn grubenv_corpus_and_regressions() {
    replay("grubenv");
}

#[test]
fn manifest_corpus_and_regressions() {
    replay("manifest");
}

#[test]
fn signed_response_corpus_and_regressions() {
    replay("signed_response");
}

/// Every folder of inputs belongs to a target this file replays.
#[test]
fn toc_corpus_and_regressions() {
    replay("toc");
}

#[test]
fn no_inputs_for_an_unknown_target() {
    for kind in ["corpus", "regressions"] {
        for dir in files(&fuzz_dir().join(kind)) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                checks::TARGETS.contains(&name.as_str()),
                "fuzz/{kind}/{name} is not a fuzz target"
            );
        }
    }
}
