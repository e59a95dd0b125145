#![no_main]
//! The region planner and the sharing, transactional slot table against a
//! multiset reference: any region planned, watchpoints inserted, removed and
//! hit. The body is `x86_debugreg::fuzzing::regions`, which
//! `tests/fuzz_corpus.rs` also runs.

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if x86_debugreg::fuzzing::regions(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
