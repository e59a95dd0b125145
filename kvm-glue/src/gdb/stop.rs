//! kvm-glue's decoded stops as GDB stop reasons.
//!
//! Every reason names its thread (a `T` packet): GDB switches to the thread
//! that stopped. `DoneStep` and `Signal` encode as `S05` with no thread, and
//! GDB then guesses which vCPU stopped (gdbstub#196), so a finished step is
//! `SignalWithThread { SIGTRAP }` and an interrupt `SignalWithThread { SIGINT }`.

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::breakpoints::WatchKind;
use x86_debugreg::watch::{WatchHit, WatchKind as CoreWatchKind};
use x86_debugreg::{HwKind, Stop};

use crate::run_control::Fault;
use crate::StopEvent;

/// GDB's thread id for vCPU `vcpu`: ids start at 1 (0 means "any thread").
pub fn tid(vcpu: usize) -> Option<Tid> {
    Tid::new(vcpu.checked_add(1)?)
}

/// The vCPU of GDB thread `tid`.
pub fn vcpu(tid: Tid) -> usize {
    tid.get() - 1
}

/// What GDB is told about `event`, given the watchpoints it hit
/// ([`VmDebug::watch_hits`](crate::VmDebug::watch_hits): each as GDB set it,
/// a read watchpoint only when its value check said "read").
///
/// * a software breakpoint: `SwBreak`;
/// * a watchpoint hit (with or without a step): `Watch` with the kind and
///   the address of the watchpoint GDB set (not the address of the piece
///   that fired: GDB finds its watchpoint by that address); a hit on a slot
///   no watchpoint owns any more, or a read watchpoint that only saw a write
///   during a step, is not a watchpoint stop;
/// * an execute breakpoint: `HwBreak`;
/// * a fault the vCPU reported ([`Fault`]): its [`fault_signal`];
/// * a finished single step, or anything else: `SIGTRAP` on the thread.
///
/// `None` only for a vCPU index with no GDB thread id (`usize::MAX`).
pub fn stop_reason(event: &StopEvent, watches: &[WatchHit]) -> Option<MultiThreadStopReason<u64>> {
    let tid = tid(event.vcpu)?;
    if let Some(fault) = event.fault {
        return Some(MultiThreadStopReason::SignalWithThread {
            tid,
            signal: fault_signal(fault),
        });
    }
    Some(match event.stop {
        Stop::Software { .. } => MultiThreadStopReason::SwBreak(tid),
        Stop::Debug { hits, .. } => {
            let watch = watches
                .iter()
                .find_map(|hit| Some((gdb_kind(hit.watch.kind())?, hit.watch.addr())));
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

/// GDB's kind for a data watchpoint, `None` for an execute breakpoint.
pub fn gdb_kind(kind: CoreWatchKind) -> Option<WatchKind> {
    match kind {
        CoreWatchKind::Execute => None,
        CoreWatchKind::Write => Some(WatchKind::Write),
        CoreWatchKind::Read => Some(WatchKind::Read),
        CoreWatchKind::ReadWrite => Some(WatchKind::ReadWrite),
    }
}

/// The signal GDB is told for a fault, as QEMU's gdbstub reports the run
/// state the fault leaves its VM in (`gdb_vm_state_change`): a shutdown
/// (QEMU's `RUN_STATE_SHUTDOWN`, where a triple fault goes with
/// `-no-shutdown`) is `SIGQUIT`; an internal error (`RUN_STATE_INTERNAL_ERROR`,
/// also where QEMU's KVM loop meets an exit it cannot handle) is `SIGABRT`.
pub fn fault_signal(fault: Fault) -> Signal {
    match fault {
        Fault::Shutdown => Signal::SIGQUIT,
        Fault::InternalError | Fault::UnhandledExit => Signal::SIGABRT,
    }
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
    use x86_debugreg::region::Mode;
    use x86_debugreg::sw::ByteMemory;
    use x86_debugreg::watch::{Watch, WatchError, WatchSlots};
    use x86_debugreg::{Applied, BreakpointType, ControlFlags, DebugExit, DebugState, Decision, GuestDebug};

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

    /// The stop a vCPU running `config` decodes from a #DB with `dr6` at `pc`.
    fn decoded(config: GuestDebug, pc: u64, dr6: u64) -> StopEvent {
        let applied = Applied::was_set(config);
        let exit = DebugExit {
            exception: 1,
            pc,
            dr6,
            dr7: 0,
        };
        match x86_debugreg::decode(&exit, &applied, |_| false) {
            Ok(Decision::Stop(stop)) => StopEvent {
                vcpu: 1,
                pc,
                dr6,
                stop,
                fault: None,
            },
            other => panic!("not a stop: {other:?}"),
        }
    }

    /// What `VmDebug::watch_hits` lists for `ev` when `slots` is the intent.
    fn watch_hits(slots: &WatchSlots, ev: &StopEvent) -> Vec<WatchHit> {
        match ev.stop {
            Stop::Debug { hits, .. } => slots.hits(&hits),
            Stop::Software { .. } => Vec::new(),
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
    fn a_watch_piece_hit_is_reported_at_the_address_gdb_set() -> Result<(), WatchError> {
        let mut slots = WatchSlots::new(Mode::Long);
        // GDB: watch 4 bytes at 0x1002 -> (0x1002, 2) in DR0 and (0x1004, 2) in DR1.
        let w = Watch::new(CoreWatchKind::Write, 0x1002, 4)?;
        slots.insert(w)?;
        let state = slots.guest_debug(GuestDebug::default());
        let ev = decoded(state, 0x5000, 0xffff_0ff2);
        let hits = watch_hits(&slots, &ev);
        assert_eq!(
            stop_reason(&ev, &hits),
            Some(MultiThreadStopReason::Watch {
                tid: tid2(),
                kind: WatchKind::Write,
                addr: 0x1002
            })
        );
        // The same hit while stepping: still the watchpoint (GDB checks values).
        let stepping = slots.guest_debug(GuestDebug {
            control: ControlFlags::ENABLE | ControlFlags::SINGLESTEP,
            ..GuestDebug::default()
        });
        let ev = decoded(stepping, 0x5000, 0xffff_4ff2);
        assert!(matches!(
            stop_reason(&ev, &watch_hits(&slots, &ev)),
            Some(MultiThreadStopReason::Watch { addr: 0x1002, .. })
        ));
        // No watchpoint owns the slot any more (or a read watchpoint saw a
        // write): a trap on the thread.
        let ev = decoded(state, 0x5000, 0xffff_0ff1);
        assert_eq!(
            stop_reason(&ev, &[]),
            Some(MultiThreadStopReason::SignalWithThread {
                tid: tid2(),
                signal: Signal::SIGTRAP
            })
        );
        Ok(())
    }

    #[test]
    fn read_and_access_watchpoints_are_reported_with_their_own_kind() -> Result<(), WatchError> {
        let mut slots = WatchSlots::new(Mode::Long);
        // rwatch on 6 bytes at 0x2003: 1 + 4 + 1 bytes, three slots.
        let r = Watch::new(CoreWatchKind::Read, 0x2003, 6)?;
        slots.insert(r)?;
        let ev = decoded(slots.guest_debug(GuestDebug::default()), 0x5000, 0xffff_0ff4);
        assert_eq!(
            stop_reason(&ev, &watch_hits(&slots, &ev)),
            Some(MultiThreadStopReason::Watch {
                tid: tid2(),
                kind: WatchKind::Read,
                addr: 0x2003
            })
        );
        assert_eq!(gdb_kind(CoreWatchKind::ReadWrite), Some(WatchKind::ReadWrite));
        assert_eq!(gdb_kind(CoreWatchKind::Execute), None);
        Ok(())
    }

    #[test]
    fn execute_hits_are_hwbreak_and_steps_are_sigtrap_on_the_thread() -> Result<(), x86_debugreg::BreakpointError<()>> {
        let mut state = DebugState::new();
        state.insert(&mut NoMemory, BreakpointType::Hardware, 0x1000, 1)?;
        let watches: Vec<WatchHit> = Vec::new();
        let ev = decoded(state.guest_debug_for(false), 0x1000, 0xffff_0ff1);
        assert_eq!(stop_reason(&ev, &watches), Some(MultiThreadStopReason::HwBreak(tid2())));
        let ev = decoded(state.guest_debug_for(true), 0x2000, 0xffff_4ff0);
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
            fault: None,
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

    #[test]
    fn a_fault_is_the_signal_qemu_reports_for_the_run_state_it_leaves() {
        // QEMU gdbstub's GDB_SIGNAL_QUIT = 3 (RUN_STATE_SHUTDOWN) and
        // GDB_SIGNAL_ABRT = 6 (RUN_STATE_INTERNAL_ERROR).
        for (fault, signal) in [
            (Fault::Shutdown, 3),
            (Fault::InternalError, 6),
            (Fault::UnhandledExit, 6),
        ] {
            let ev = StopEvent {
                vcpu: 1,
                pc: 0x1000,
                dr6: 0,
                stop: Stop::Debug {
                    single_step: false,
                    hits: x86_debugreg::Hits::default(),
                },
                fault: Some(fault),
            };
            assert_eq!(
                stop_reason(&ev, &[]),
                Some(MultiThreadStopReason::SignalWithThread {
                    tid: tid2(),
                    signal: Signal(signal)
                }),
                "{fault}"
            );
        }
    }
}
