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
//! scenario also proves the handshake cannot hang.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::time::Duration;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::FakeVcpu;
use kvm_glue::{AddressSpace, BreakpointType, Handled, RunState, VcpuOps, VmDebug};
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
