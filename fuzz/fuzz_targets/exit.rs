#![no_main]
//! Arbitrary debug exits decoded against arbitrary applied configurations.
//! The body is `x86_debugreg::fuzzing::exit`, which `tests/fuzz_corpus.rs` also runs.

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if x86_debugreg::fuzzing::exit(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
