//! The synchronisation primitives of the all-stop protocol: `std::sync`, or
//! loom's model-checked versions when built with `--cfg loom` (see
//! `tests/loom.rs`), so the very code VMMs run is what loom explores.

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, Ordering},
    mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, Ordering},
    mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock,
};
