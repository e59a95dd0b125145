//! The `gdb_session` fuzz corpus under plain `cargo test` (stable, no
//! libFuzzer): every committed file of `fuzz/corpus/gdb_session/` goes
//! through `wire::fuzz_one`, the body `cargo +nightly fuzz run gdb_session`
//! runs, with the same oracle. `seed-raw-NN-*` are issue #19's items as raw
//! packet streams; `seed-ops-*` are structured sessions (`wire::Op`).
#![cfg(feature = "gdb")]

mod wire;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

#[test]
fn every_gdb_session_corpus_file_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/gdb_session");
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "fuzz/corpus/gdb_session holds {} files", files.len());
    let mut failures = Vec::new();
    for file in &files {
        let data = fs::read(file).expect("readable corpus file");
        match panic::catch_unwind(AssertUnwindSafe(|| wire::fuzz_one(&data))) {
            Ok(true) => {}
            Ok(false) => failures.push(format!("{}: rejected as useless", file.display())),
            Err(_) => failures.push(format!("{}: failed (message above)", file.display())),
        }
    }
    println!("gdb_session corpus: {} files replayed", files.len());
    assert!(
        failures.is_empty(),
        "{} corpus files failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
