#![no_main]
//! The int3 table over a memory that fails at arbitrary points.
//! The body is `x86_debugreg::fuzzing::sw`, which `tests/fuzz_corpus.rs` also runs.

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if x86_debugreg::fuzzing::sw(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
