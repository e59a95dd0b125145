#![no_main]
//! Arbitrary operation sequences on the typed model and the reference in
//! lock-step, plus DR7/DR6 round trips.
//! The body is `x86_debugreg::fuzzing::dr7`, which `tests/fuzz_corpus.rs` also runs.

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if x86_debugreg::fuzzing::dr7(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
