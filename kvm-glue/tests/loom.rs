//! Model-checks the protocol between the debugger thread and vCPU threads
//! with loom: every interleaving (up to a preemption bound) of small
//! scenarios, on the very code VMMs run — `VmDebug` and `VcpuDebug` are built
//! on loom's `Mutex`/`Condvar`/atomics under `--cfg loom` (`src/sync.rs`).
//! The vCPUs are fake (no `KVM_RUN`): what is checked is the bookkeeping.
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p kvm-glue --test loom --release -- --nocapture
//! ```
//!
//! Loom reports a deadlock (every thread blocked) as a failure, so each
//! scenario also proves the handshake cannot hang. The last three check the
//! run-control rules of issue #16 on their races: a dropped stop cancels its
//! step-over (no hit lost), detach is final, and a breakpoint removed while
//! a vCPU is parked in a step-over is gone when it re-enters.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::time::Duration;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::FakeVcpu;
use kvm_glue::{Action, AddressSpace, BreakpointType, Error, Handled, RunState, VcpuOps, VmDebug, Woke};
use loom::sync::atomic::{AtomicUsize as LoomUsize, Ordering};
use loom::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;
/// Loom does not model time: waits with a timeout are plain waits there.
const FOREVER: Duration = Duration::from_secs(3600);

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap")
}

fn model(name: &str, bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&runs);
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(move || {
        counter.fetch_add(1, StdOrdering::SeqCst);
        f()
    });
    let explored = runs.load(StdOrdering::SeqCst);
    println!("{name}: {explored} interleavings explored (preemption bound {bound})");
    assert!(explored > 1, "{name}: loom explored a single interleaving");
}

/// Insert while a vCPU runs: once `insert` has returned, the vCPU either
/// already runs with the breakpoint or `needs_sync` says it must apply it
/// before its next entry — a change is never lost between the fast-path
/// generation check and the ioctl.
#[test]
fn an_insert_while_a_vcpu_runs_is_never_lost() {
    model("insert_while_running", 3, || {
        let dbg = VmDebug::new(memory());
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        let fake = std::sync::Arc::new(FakeVcpu::new());
        let f = std::sync::Arc::clone(&fake);
        let vcpu = loom::thread::spawn(move || {
            // Two entries into the guest.
            h.sync(&*f).expect("sync");
            h.sync(&*f).expect("sync");
            h
        });
        dbg.insert(PHYS, BreakpointType::Hardware, 0x100, 1).expect("insert");
        let h = vcpu.join().expect("vCPU thread");
        let held = fake.guest_debug().expect("the first sync always applies");
        let has_it = held.arch.debugreg[0] == 0x100 && held.arch.debugreg[7] & 0b11 != 0;
        assert!(
            has_it || dbg.needs_sync(0).expect("needs_sync"),
            "the insert is neither applied nor pending"
        );
        drop(h);
    });
}

/// All-stop with two vCPUs: `stop_all` returns only when both are parked
/// (or gone); a job sent to a parked vCPU runs on its thread while it is
/// parked; no vCPU enters the guest between `stop_all` and the resume.
#[test]
fn stop_all_parks_every_vcpu_and_jobs_run_while_parked() {
    model("stop_all", 2, || {
        let dbg = VmDebug::new(memory());
        let entries = Arc::new(LoomUsize::new(0));
        let threads: Vec<_> = (0..2)
            .map(|id| {
                let mut h = dbg.vcpu(id).expect("vCPU handle");
                let entries = Arc::clone(&entries);
                loom::thread::spawn(move || {
                    let fake = FakeVcpu::new();
                    for _ in 0..2 {
                        h.before_run(&fake).expect("before_run");
                        entries.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        dbg.stop_all(FOREVER).expect("stop_all");
        let stopped_at = entries.load(Ordering::SeqCst);
        for id in 0..2 {
            let state = dbg.run_state(id).expect("state");
            assert!(
                matches!(state, RunState::Parked | RunState::Absent),
                "vCPU {id}: {state:?}"
            );
        }
        if dbg.run_state(0).expect("state") == RunState::Parked {
            let d = dbg.clone();
            let seen = dbg
                .with_parked_vcpu(0, move |v: &dyn VcpuOps| {
                    // On the vCPU's own thread, while it is parked.
                    let _ = v.get_regs();
                    d.run_state(0).expect("state")
                })
                .expect("job");
            assert_eq!(seen, RunState::Parked);
        }
        assert_eq!(
            entries.load(Ordering::SeqCst),
            stopped_at,
            "a vCPU entered while stopped"
        );
        dbg.resume_all().expect("resume");
        for t in threads {
            t.join().expect("vCPU thread");
        }
        assert_eq!(entries.load(Ordering::SeqCst), 4);
    });
}

/// Two vCPUs post stops at once: the debugger gets one, the other stays
/// pending; the resume after the first releases nobody, the next
/// `wait_stop` returns the second at once, and then everyone runs on.
#[test]
fn racing_stops_are_reported_one_at_a_time_and_none_is_lost() {
    model("racing_stops", 2, || {
        let dbg = VmDebug::new(memory());
        dbg.insert(PHYS, BreakpointType::Hardware, 0x100, 1).expect("insert");
        let threads: Vec<_> = (0..2)
            .map(|id| {
                let mut h = dbg.vcpu(id).expect("vCPU handle");
                loom::thread::spawn(move || {
                    let fake = FakeVcpu::new();
                    h.before_run(&fake).expect("before_run");
                    let exit = kvm_debug_exit_arch {
                        exception: 1,
                        pad: 0,
                        pc: 0x100,
                        dr6: 0xffff_0ff1,
                        dr7: 0,
                    };
                    let Handled::Stop(ev) = h.handle_exit(&fake, &exit).expect("exit") else {
                        panic!("DR0 is the debugger's")
                    };
                    h.report_stop(ev).expect("report");
                    h.before_run(&fake).expect("parks until resumed");
                })
            })
            .collect();
        let first = dbg.wait_stop(Some(FOREVER)).expect("wait").expect("a stop");
        dbg.stop_all(FOREVER).expect("stop_all");
        dbg.resume_all().expect("resume");
        let second = dbg.wait_stop(Some(FOREVER)).expect("wait").expect("the other stop");
        assert_ne!(first.vcpu, second.vcpu, "each vCPU's stop reported once");
        dbg.stop_all(FOREVER).expect("stop_all");
        dbg.resume_all().expect("resume");
        for t in threads {
            t.join().expect("vCPU thread");
        }
        assert!(dbg.try_take_stop().expect("take").is_none());
    });
}

/// A hit in DR0 at `pc` (DR6 B0 over the active-low at-rest value).
fn dr0_hit(pc: u64) -> kvm_debug_exit_arch {
    kvm_debug_exit_arch {
        exception: 1,
        pad: 0,
        pc,
        dr6: 0xffff_0ff1,
        dr7: 0,
    }
}

/// KVM_GUESTDBG_SINGLESTEP (include/uapi/linux/kvm.h).
const SINGLESTEP: u32 = 0x2;

/// Race of item 1: both vCPUs hit one breakpoint; the debugger takes the
/// first stop, removes the breakpoint, continues that vCPU alone (dropping
/// the other's now stale stop), puts the breakpoint back and continues
/// everyone, then serves every further stop until the vCPU threads end.
/// No hit is lost: each vCPU either had its stop taken, or enters the
/// guest again with DR0 armed and no step-over (so it hits again).
#[test]
fn a_dropped_stop_cancels_its_step_over_in_every_interleaving() {
    model("dropped_stop_cancels_step_over", 2, || {
        let dbg = VmDebug::new(memory());
        dbg.insert(PHYS, BreakpointType::Hardware, 0x100, 1).expect("insert");
        let threads: Vec<_> = (0..2)
            .map(|id| {
                let mut h = dbg.vcpu(id).expect("vCPU handle");
                loom::thread::spawn(move || {
                    let fake = FakeVcpu::new();
                    h.before_run(&fake).expect("before_run");
                    if let Handled::Stop(ev) = h.handle_exit(&fake, &dr0_hit(0x100)).expect("exit") {
                        h.report_stop(ev).expect("report");
                    }
                    h.before_run(&fake).expect("parks until resumed");
                    fake.guest_debug().expect("synced")
                })
            })
            .collect();
        let mut taken = Vec::new();
        let first = dbg.wait_stop(None).expect("wait").expect("a stop");
        taken.push(first.vcpu);
        dbg.stop_all(FOREVER).expect("stop_all");
        dbg.remove(PHYS, BreakpointType::Hardware, 0x100, 1).expect("remove");
        dbg.resume(&[(first.vcpu, Action::Continue)]).expect("continue one");
        dbg.insert(PHYS, BreakpointType::Hardware, 0x100, 1)
            .expect("insert again");
        dbg.resume_all().expect("continue all");
        loop {
            match dbg.wait_stop(None) {
                Ok(Some(ev)) => {
                    taken.push(ev.vcpu);
                    dbg.stop_all(FOREVER).expect("stop_all");
                    dbg.resume_all().expect("resume");
                }
                Ok(None) => unreachable!("no timeout given"),
                Err(Error::NoVcpus) => break,
                Err(e) => panic!("{e}"),
            }
        }
        for (id, t) in threads.into_iter().enumerate() {
            let last = t.join().expect("vCPU thread");
            let rehits =
                last.arch.debugreg[0] == 0x100 && last.arch.debugreg[7] & 0b11 != 0 && last.control & SINGLESTEP == 0;
            assert!(
                taken.contains(&id) || rehits,
                "vCPU {id}: its hit was neither reported nor run again (taken {taken:?}, {last:?})"
            );
        }
    });
}

/// Race of item 3: a single-stepping vCPU's step exit against `detach`.
/// Whether its stop is posted before the detach (then dropped and the vCPU
/// released) or after (discarded), the vCPU never stays parked (loom would
/// report the deadlock), and nothing of the old session is reported.
#[test]
fn detach_is_final_in_every_interleaving() {
    model("detach_is_final", 3, || {
        let dbg = VmDebug::new(memory());
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        dbg.set_single_step(0, true).expect("stepi");
        let vcpu = loom::thread::spawn(move || {
            let fake = FakeVcpu::new();
            h.before_run(&fake).expect("before_run");
            let step = kvm_debug_exit_arch {
                exception: 1,
                pad: 0,
                pc: 0x103,
                dr6: 0xffff_4ff0,
                dr7: 0,
            };
            if let Handled::Stop(ev) = h.handle_exit(&fake, &step).expect("exit") {
                h.report_stop(ev).expect("report");
            }
            h.before_run(&fake).expect("never parks for the old session");
            fake.guest_debug().expect("synced")
        });
        dbg.detach().expect("detach");
        assert_ne!(dbg.run_state(0).expect("state"), RunState::Parked);
        let last = vcpu.join().expect("vCPU thread");
        assert_eq!(
            last.control & SINGLESTEP,
            0,
            "the last entry runs the new session's configuration"
        );
        assert!(
            dbg.try_take_stop().expect("take").is_none(),
            "no stop of the old session"
        );
    });
}

/// Race of item 4: a vCPU stops at DR0's breakpoint, is continued (its
/// step-over armed), then enters again after a port exit; the debugger
/// stops everyone, removes DR1's breakpoint and resumes. If the vCPU was
/// parked for that, its next entry runs without DR1 (the current intent),
/// still excluding only DR0's address for its step.
#[test]
fn a_breakpoint_removed_during_a_parked_step_over_is_gone_in_every_interleaving() {
    model("removed_during_step_over", 2, || {
        let dbg = VmDebug::new(memory());
        dbg.insert(PHYS, BreakpointType::Hardware, 0x100, 1).expect("DR0");
        dbg.insert(PHYS, BreakpointType::Hardware, 0x102, 1).expect("DR1");
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        let vcpu = loom::thread::spawn(move || {
            let fake = FakeVcpu::new();
            h.before_run(&fake).expect("before_run");
            if let Handled::Stop(ev) = h.handle_exit(&fake, &dr0_hit(0x100)).expect("exit") {
                h.report_stop(ev).expect("report");
            }
            h.before_run(&fake).expect("parks, then arms the step-over");
            // KVM_EXIT_IO in the middle of the step: no debug exit.
            h.before_run(&fake).expect("re-enters");
            fake.guest_debug().expect("synced")
        });
        let first = dbg.wait_stop(None).expect("wait").expect("the stop");
        assert_eq!(first.pc, 0x100);
        dbg.stop_all(FOREVER).expect("stop_all");
        dbg.resume_all().expect("continue");
        dbg.stop_all(FOREVER).expect("stop_all again");
        let parked = dbg.run_state(0).expect("state") == RunState::Parked;
        dbg.remove(PHYS, BreakpointType::Hardware, 0x102, 1)
            .expect("remove DR1");
        dbg.resume_all().expect("continue");
        let last = vcpu.join().expect("vCPU thread");
        if parked {
            let dr7 = last.arch.debugreg[7];
            let slots: Vec<u64> = (0..4)
                .filter(|n| (dr7 >> (2 * n)) & 0b11 != 0)
                .map(|n| last.arch.debugreg[n as usize])
                .collect();
            assert!(!slots.contains(&0x102), "DR1's removed breakpoint applied: {last:?}");
            assert!(!slots.contains(&0x100), "0x100 is still being stepped over: {last:?}");
            assert_ne!(last.control & SINGLESTEP, 0, "still the step-over's single step");
        }
    });
}

/// Issue #20's halted-vCPU wait (`kvm_glue::idle`): a vCPU that waits after
/// a `hlt` exit is outside `KVM_RUN`, where no kick reaches it. In every
/// interleaving of `stop_all` with the vCPU's sync-then-wait, the wait ends
/// with `Woke::Stop` (the stop came before it or during it: never lost),
/// the vCPU parks and `stop_all` returns; a lost wake-up is a deadlock here.
#[test]
fn a_stop_all_always_ends_a_halted_vcpus_wait() {
    model("stop_ends_idle_wait", 3, || {
        let dbg = VmDebug::new(memory());
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        let vcpu = loom::thread::spawn(move || {
            let fake = FakeVcpu::new();
            // The entry that ended in KVM_EXIT_HLT (sync: before_run would
            // park for a stop that came first, and the wait would rightly
            // have nothing left to answer).
            h.sync(&fake).expect("sync");
            let woke = h.wait_idle(None).expect("wait");
            h.before_run(&fake).expect("park until released");
            woke
        });
        dbg.stop_all(FOREVER).expect("stop_all");
        dbg.resume_all().expect("resume");
        assert_eq!(vcpu.join().expect("vCPU thread"), Woke::Stop);
    });
}

/// The VMM's own wake (an interrupt source on another thread) against the
/// wait and a breakpoint insert: the wait always ends, with the VMM's wake
/// or the intent change, and a VMM wake is never lost — when the intent
/// change answered first, the wake answers the next wait.
#[test]
fn a_vmm_wake_or_an_intent_change_always_ends_the_wait() {
    model("vmm_wake_ends_idle_wait", 3, || {
        let dbg = VmDebug::new(memory());
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        let irq = h.idle_waker();
        let vcpu = loom::thread::spawn(move || {
            let fake = FakeVcpu::new();
            h.sync(&fake).expect("sync"); // ...then KVM_EXIT_HLT
            let mut reasons = vec![h.wait_idle(None).expect("wait")];
            while reasons.last() == Some(&Woke::Intent) {
                h.before_run(&fake).expect("apply");
                reasons.push(h.wait_idle(None).expect("wait"));
            }
            reasons
        });
        let device = loom::thread::spawn(move || irq.wake().expect("wake"));
        dbg.insert(PHYS, BreakpointType::Hardware, 0x100, 1).expect("insert");
        device.join().expect("device thread");
        let reasons = vcpu.join().expect("vCPU thread");
        assert_eq!(reasons.last(), Some(&Woke::Vmm), "{reasons:?}");
    });
}
