//! kvm-glue's decoded stops as GDB stop reasons.
//!
//! Every reason names its thread (a `T` packet): GDB switches to the thread
//! that stopped. `DoneStep` and `Signal` encode as `S05` with no thread, and
//! GDB then guesses which vCPU stopped (gdbstub#196), so a finished step is
//! `SignalWithThread { SIGTRAP }` and an interrupt `SignalWithThread { SIGINT }`.

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use x86_debugreg::{HwKind, Stop};

use super::watch::WatchTable;
use crate::StopEvent;

/// GDB's thread id for vCPU `vcpu`: ids start at 1 (0 means "any thread").
pub fn tid(vcpu: usize) -> Option<Tid> {
    Tid::new(vcpu.checked_add(1)?)
}

/// The vCPU of GDB thread `tid`.
pub fn vcpu(tid: Tid) -> usize {
    tid.get() - 1
}

/// What GDB is told about `event`.
///
/// * a software breakpoint: `SwBreak`;
/// * a watchpoint hit (with or without a step): `Watch` with the kind and
///   the address of the watchpoint GDB set, looked up in `watches` (a hit on
///   a slot no GDB watchpoint owns any more is reported as a trap);
/// * an execute breakpoint: `HwBreak`;
/// * a finished single step, or anything else: `SIGTRAP` on the thread.
///
/// `None` only for a vCPU index with no GDB thread id (`usize::MAX`).
pub fn stop_reason(event: &StopEvent, watches: &WatchTable) -> Option<MultiThreadStopReason<u64>> {
    let tid = tid(event.vcpu)?;
    Some(match event.stop {
        Stop::Software { .. } => MultiThreadStopReason::SwBreak(tid),
        Stop::Debug { hits, .. } => {
            let watch = hits
                .iter()
                .filter(|hit| hit.breakpoint.is_watchpoint())
                .find_map(|hit| watches.owner(&hit.breakpoint));
            let execute = hits.iter().any(|hit| hit.breakpoint.kind() == HwKind::Execute);
            match watch {
                Some((kind, addr)) => MultiThreadStopReason::Watch { tid, kind, addr },
                None if execute => MultiThreadStopReason::HwBreak(tid),
                None => MultiThreadStopReason::SignalWithThread {
                    tid,
                    signal: Signal::SIGTRAP,
                },
            }
        }
    })
}

/// The answer to GDB's Ctrl-C once every vCPU is stopped.
pub fn interrupted(vcpu: usize) -> Option<MultiThreadStopReason<u64>> {
    Some(MultiThreadStopReason::SignalWithThread {
        tid: tid(vcpu)?,
        signal: Signal::SIGINT,
    })
}
