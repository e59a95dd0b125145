#![no_main]
//! kvm-glue's GDB server fed arbitrary bytes and structured packet
//! sequences over an in-memory connection (`UnixStream::pair` to
//! `kvm_glue::gdb::serve_connection`), on two simulated vCPUs. The body and its
//! oracle are `kvm-glue/tests/wire/mod.rs` (`fuzz_one`), which
//! `kvm-glue/tests/gdb_wire_corpus.rs` also runs over the committed corpus.

#[path = "../../kvm-glue/tests/wire/mod.rs"]
mod wire;

use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if wire::fuzz_one(data) {
        Corpus::Keep
    } else {
        Corpus::Reject
    }
});
