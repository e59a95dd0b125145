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

#[cfg(test)]
mod tests {
    use gdbstub::target::ext::breakpoints::WatchKind;
    use x86_debugreg::sw::ByteMemory;
    use x86_debugreg::{Applied, BreakpointType, DebugExit, DebugState, Decision};

    use super::super::watch::{split, Watch};
    use super::*;

    /// Hardware slots need no memory.
    struct NoMemory;
    impl ByteMemory for NoMemory {
        type Error = ();
        fn read_byte(&mut self, _: u64) -> Result<u8, ()> {
            Err(())
        }
        fn write_byte(&mut self, _: u64, _: u8) -> Result<(), ()> {
            Err(())
        }
    }

    /// The stop a vCPU running `state` (single-step `step`) decodes from a
    /// #DB with `dr6` at `pc`.
    fn decoded(state: &DebugState, step: bool, pc: u64, dr6: u64) -> StopEvent {
        let applied = Applied::was_set(state.guest_debug_for(step));
        let exit = DebugExit {
            exception: 1,
            pc,
            dr6,
            dr7: 0,
        };
        match state.decode(&exit, &applied) {
            Ok(Decision::Stop(stop)) => StopEvent { vcpu: 1, pc, dr6, stop },
            other => panic!("not a stop: {other:?}"),
        }
    }

    fn tid2() -> Tid {
        Tid::new(2).unwrap_or(Tid::MIN)
    }

    #[test]
    fn thread_ids_start_at_one() {
        assert_eq!(tid(0).map(Tid::get), Some(1));
        assert_eq!(tid(usize::MAX), None);
        assert_eq!(vcpu(tid2()), 1);
    }

    #[test]
    fn a_watch_piece_hit_is_reported_at_the_address_gdb_set() -> Result<(), x86_debugreg::BreakpointError<()>> {
        let mut state = DebugState::new();
        // GDB: watch 4 bytes at 0x1002 -> slots (0x1002, 2) in DR0 and (0x1004, 2) in DR1.
        let pieces = split(0x1002, 4).unwrap_or_default();
        let mut watches = WatchTable::new();
        for p in &pieces {
            state.insert(&mut NoMemory, BreakpointType::WriteWatch, p.addr, p.len)?;
        }
        watches.add(Watch {
            addr: 0x1002,
            len: 4,
            kind: WatchKind::Write,
            pieces,
        });
        let ev = decoded(&state, false, 0x5000, 0xffff_0ff2);
        assert_eq!(
            stop_reason(&ev, &watches),
            Some(MultiThreadStopReason::Watch {
                tid: tid2(),
                kind: WatchKind::Write,
                addr: 0x1002
            })
        );
        // The same hit while stepping: still the watchpoint (GDB checks values).
        let ev = decoded(&state, true, 0x5000, 0xffff_4ff2);
        assert!(matches!(
            stop_reason(&ev, &watches),
            Some(MultiThreadStopReason::Watch { addr: 0x1002, .. })
        ));
        // A slot no GDB watchpoint owns (the table forgot it): a trap on the thread.
        let ev = decoded(&state, false, 0x5000, 0xffff_0ff1);
        assert_eq!(
            stop_reason(&ev, &WatchTable::new()),
            Some(MultiThreadStopReason::SignalWithThread {
                tid: tid2(),
                signal: Signal::SIGTRAP
            })
        );
        Ok(())
    }

    #[test]
    fn execute_hits_are_hwbreak_and_steps_are_sigtrap_on_the_thread() -> Result<(), x86_debugreg::BreakpointError<()>> {
        let mut state = DebugState::new();
        state.insert(&mut NoMemory, BreakpointType::Hardware, 0x1000, 1)?;
        let watches = WatchTable::new();
        let ev = decoded(&state, false, 0x1000, 0xffff_0ff1);
        assert_eq!(stop_reason(&ev, &watches), Some(MultiThreadStopReason::HwBreak(tid2())));
        let ev = decoded(&state, true, 0x2000, 0xffff_4ff0);
        assert_eq!(
            stop_reason(&ev, &watches),
            Some(MultiThreadStopReason::SignalWithThread {
                tid: tid2(),
                signal: Signal::SIGTRAP
            })
        );
        let sw = StopEvent {
            vcpu: 1,
            pc: 0x3000,
            dr6: 0,
            stop: Stop::Software { addr: 0x3000 },
        };
        assert_eq!(stop_reason(&sw, &watches), Some(MultiThreadStopReason::SwBreak(tid2())));
        assert_eq!(
            interrupted(0),
            Some(MultiThreadStopReason::SignalWithThread {
                tid: Tid::MIN,
                signal: Signal::SIGINT
            })
        );
        Ok(())
    }
}
