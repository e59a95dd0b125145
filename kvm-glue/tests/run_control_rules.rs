//! The run-control rules of issue #16, one test per numbered item, on fake
//! vCPUs (the real-KVM versions this host can run are in
//! `kvm_lifecycle.rs`; the random interleavings in `run_control.rs`). Each
//! failed on the code before the run-control state machine (items 1-6 as
//! assertions or a hang/panic; item 7 had no way to ask).

use std::sync::mpsc;
use std::time::Duration;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::FakeVcpu;
use kvm_glue::{Action, AddressSpace, BreakpointType, Error, Handled, Posted, RunError, RunState, Stop, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;

/// DR6 as KVM reports a single step (SDM Vol. 3B §18.2.3: BS is bit 14,
/// over the active-low 0xffff0ff0 at-rest value).
const DR6_STEP: u64 = 0xffff_4ff0;
/// DR6 for a hit in DR0 (B0, bit 0).
const DR6_B0: u64 = 0xffff_0ff1;
/// KVM_GUESTDBG_SINGLESTEP (include/uapi/linux/kvm.h: 0x2).
const SINGLESTEP: u32 = 0x2;
/// DR7's L0|G0 (bits 0, 1) and L1|G1 (bits 2, 3): SDM Vol. 3B §18.2.4.
const DR7_SLOT0: u64 = 0b11;
const DR7_SLOT1: u64 = 0b1100;

fn dbg() -> VmDebug<GuestMemoryMmap> {
    VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2_0000)]).expect("mmap"))
}

fn exit(exception: u32, pc: u64, dr6: u64) -> kvm_debug_exit_arch {
    kvm_debug_exit_arch {
        exception,
        pad: 0,
        pc,
        dr6,
        dr7: 0,
    }
}

fn dr7(f: &FakeVcpu) -> u64 {
    f.guest_debug().expect("set").arch.debugreg[7]
}

fn stepping(f: &FakeVcpu) -> bool {
    f.guest_debug().expect("set").control & SINGLESTEP != 0
}

/// Item 1: both vCPUs stop at one breakpoint; the debugger reports vCPU 0's,
/// removes the breakpoint and steps vCPU 0 alone, so `resume` drops vCPU 1's
/// pending stop as stale. With the breakpoint back and everyone continued,
/// vCPU 1 must run the instruction again with the breakpoint armed (no
/// silent step over it), and its hit is reported.
#[test]
fn a_dropped_stop_cancels_its_step_over() {
    let dbg = dbg();
    let (mut h0, mut h1) = (dbg.vcpu(0).expect("vCPU 0"), dbg.vcpu(1).expect("vCPU 1"));
    let (f0, f1) = (FakeVcpu::new(), FakeVcpu::new());
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h0.sync(&f0).expect("sync");
    h1.sync(&f1).expect("sync");
    for (h, f) in [(&mut h0, &f0), (&mut h1, &f1)] {
        let Handled::Stop(ev) = h.handle_exit(f, &exit(1, 0x1000, DR6_B0)).expect("exit") else {
            panic!("DR0 is the debugger's")
        };
        assert_eq!(h.report_stop(ev).expect("post"), Posted::Waiting);
    }
    assert_eq!(dbg.try_take_stop().expect("take").map(|e| e.vcpu), Some(0));
    dbg.remove(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("remove");
    dbg.resume(&[(0, Action::Step)]).expect("step vCPU 0");
    assert_eq!(
        dbg.try_take_stop().expect("take"),
        None,
        "vCPU 1's stop is stale: dropped"
    );
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert again");
    dbg.set_single_step(0, false).expect("step off");
    dbg.resume_all().expect("continue");
    h1.before_run(&f1).expect("released: no park");
    assert!(!stepping(&f1), "no step-over: vCPU 1 runs with single-step off");
    assert_ne!(dr7(&f1) & DR7_SLOT0, 0, "DR0 armed when it re-executes 0x1000");
    let Handled::Stop(again) = h1.handle_exit(&f1, &exit(1, 0x1000, DR6_B0)).expect("exit") else {
        panic!("the hit comes again and is the debugger's")
    };
    assert_eq!(h1.report_stop(again).expect("post"), Posted::Waiting);
    assert_eq!(dbg.try_take_stop().expect("take"), Some(again), "reported, not lost");
}

/// Item 2: vCPU at 0x10000, execute breakpoint at 0x10003. A step lands on
/// 0x10003 (a single-step stop, not a breakpoint hit); the next step must
/// run the instruction at 0x10003, with DR0 excluded for that one step.
#[test]
fn a_step_that_lands_on_a_breakpoint_steps_over_it_on_the_next_resume() {
    let dbg = dbg();
    let mut h = dbg.vcpu(0).expect("vCPU 0");
    let f = FakeVcpu::new();
    dbg.insert(PHYS, BreakpointType::Hardware, 0x10003, 1).expect("insert");
    dbg.set_single_step(0, true).expect("stepi");
    h.before_run(&f).expect("sync");
    assert!(stepping(&f) && dr7(&f) & DR7_SLOT0 != 0, "first step: DR0 armed");
    let Handled::Stop(first) = h.handle_exit(&f, &exit(1, 0x10003, DR6_STEP)).expect("exit") else {
        panic!("the debugger's step")
    };
    assert!(matches!(first.stop, Stop::Debug { single_step: true, hits } if hits.is_empty()));
    h.before_run(&f).expect("second step");
    assert!(stepping(&f));
    assert_eq!(dr7(&f) & DR7_SLOT0, 0, "DR0 excluded: resuming from 0x10003 runs it");
    let Handled::Stop(second) = h.handle_exit(&f, &exit(1, 0x10005, DR6_STEP)).expect("exit") else {
        panic!("the debugger's step")
    };
    assert_eq!(second.pc, 0x10005);
    h.before_run(&f).expect("third");
    assert_ne!(dr7(&f) & DR7_SLOT0, 0, "DR0 armed again after the one step");
}

/// Item 3: a vCPU mid-step posts its stop after `detach` returned: it is
/// discarded, nobody is held, and the vCPU runs on without parking.
#[test]
fn a_stop_posted_after_detach_is_discarded_and_nobody_parks() {
    let dbg = dbg();
    let (mut h0, _h1) = (dbg.vcpu(0).expect("vCPU 0"), dbg.vcpu(1).expect("vCPU 1"));
    let f0 = FakeVcpu::new();
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    dbg.set_single_step(0, true).expect("stepi");
    h0.sync(&f0).expect("sync: the step is in KVM");
    dbg.detach().expect("detach");
    // The step's exit, decoded from the configuration the vCPU still had.
    let Handled::Stop(ev) = h0.handle_exit(&f0, &exit(1, 0x1003, DR6_STEP)).expect("exit") else {
        panic!("decoded from the old session's configuration")
    };
    assert_eq!(h0.report_stop(ev).expect("post"), Posted::Discarded);
    for id in 0..2 {
        assert_eq!(dbg.run_state(id).expect("state"), RunState::Running, "vCPU {id}");
    }
    assert_eq!(dbg.try_take_stop().expect("take"), None);
    h0.before_run(&f0).expect("does not park");
    assert!(!stepping(&f0), "runs on with the new session's (empty) configuration");
    assert_eq!(f0.guest_debug().expect("set").control, 0);
}

/// Item 4: stop at a breakpoint, continue: the step-over's step ends at a
/// port access (no debug exit); the debugger removes a second breakpoint;
/// the vCPU re-enters: it must run with the current intent (DR1 gone), less
/// only its own exclusion (DR0, still single-stepping).
#[test]
fn a_breakpoint_removed_mid_step_over_is_gone_when_the_vcpu_re_enters() {
    let dbg = dbg();
    let mut h = dbg.vcpu(0).expect("vCPU 0");
    let f = FakeVcpu::new();
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("DR0");
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1002, 1).expect("DR1");
    h.before_run(&f).expect("sync");
    let Handled::Stop(_) = h.handle_exit(&f, &exit(1, 0x1000, DR6_B0)).expect("exit") else {
        panic!("ours")
    };
    h.before_run(&f).expect("the step over");
    assert!(stepping(&f) && dr7(&f) & DR7_SLOT0 == 0 && dr7(&f) & DR7_SLOT1 != 0);
    // KVM_RUN returns KVM_EXIT_IO: the `out` at 0x1000 is not finished yet.
    dbg.remove(PHYS, BreakpointType::Hardware, 0x1002, 1)
        .expect("remove DR1");
    h.before_run(&f).expect("re-enter");
    assert_eq!(dr7(&f) & DR7_SLOT1, 0, "the removed breakpoint is not applied");
    assert!(stepping(&f), "still stepping over 0x1000");
    assert_eq!(dr7(&f) & DR7_SLOT0, 0, "still excluding 0x1000");
    assert!(h.stepping_over());
}

/// Item 5: ids are checked against the vCPUs the VM has; an unknown id is a
/// typed error, nothing panics or poisons, nothing is sized by the id.
#[test]
fn an_unknown_vcpu_id_is_a_typed_error_and_changes_nothing() {
    let dbg = dbg();
    let _h = dbg.vcpu(0).expect("vCPU 0");
    for id in [usize::MAX, 1 << 36, 1 << 40, kvm_glue::MAX_VCPUS] {
        let err = dbg.vcpu(id).expect_err("beyond any VM");
        assert!(
            matches!(err, Error::Run(RunError::UnknownVcpu { vcpu, .. }) if vcpu == id),
            "{err}"
        );
    }
    for id in [1, 5, usize::MAX, 1 << 40] {
        let err = dbg
            .resume(&[(0, Action::Step), (id, Action::Step)])
            .expect_err("unknown");
        assert!(
            matches!(err, Error::Run(RunError::UnknownVcpu { vcpu, .. }) if vcpu == id),
            "{err}"
        );
        assert!(
            !dbg.single_step(0).expect("query"),
            "vCPU 0 unchanged by a refused resume"
        );
        assert!(dbg.set_single_step(id, true).is_err());
        assert!(dbg.run_state(id).is_err());
        assert!(dbg.needs_sync(id).is_err());
    }
    // Nothing poisoned: the VM works on.
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    assert_eq!(dbg.run_state(0).expect("state"), RunState::Running);
    // Declared at creation: ids 0..2 only.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
    let two = VmDebug::with_vcpus(mem, 2).expect("two vCPUs");
    assert!(two.vcpu(1).is_ok());
    assert!(matches!(
        two.vcpu(2),
        Err(Error::Run(RunError::UnknownVcpu { vcpu: 2, .. }))
    ));
    assert_eq!(
        two.run_state(1).expect("known"),
        RunState::Absent,
        "known, no handle now"
    );
}

/// Item 6: once every vCPU handle is gone, `wait_stop(None)` answers "no
/// vCPU left" instead of waiting for ever, and `wait_stop(Some(t))` answers
/// at once; a waiter already blocked is woken when the last handle goes.
#[test]
fn wait_stop_answers_no_vcpu_left_once_every_handle_is_gone() {
    let dbg = dbg();
    let h = dbg.vcpu(0).expect("vCPU 0");
    let (tx, rx) = mpsc::channel();
    let d = dbg.clone();
    std::thread::spawn(move || {
        let _ = tx.send(d.wait_stop(None).map(|e| e.map(|e| e.vcpu)));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "waits while a vCPU lives"
    );
    drop(h);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("woken when the last handle went");
    assert!(matches!(got, Err(Error::NoVcpus)), "{got:?}");
    let start = std::time::Instant::now();
    assert!(matches!(
        dbg.wait_stop(Some(Duration::from_secs(30))),
        Err(Error::NoVcpus)
    ));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "promptly, not after the timeout"
    );
    assert!(matches!(dbg.wait_stop(None), Err(Error::NoVcpus)));
    assert_eq!(dbg.try_take_stop().expect("never blocks"), None);
}

/// Item 7: stepping two vCPUs at once, only one of them ran its instruction
/// before the all-stop; the caller can tell which moved.
#[test]
fn after_stepping_two_vcpus_the_caller_can_tell_which_moved() {
    let dbg = dbg();
    let (mut h0, mut h1) = (dbg.vcpu(0).expect("vCPU 0"), dbg.vcpu(1).expect("vCPU 1"));
    let (f0, f1) = (FakeVcpu::new(), FakeVcpu::new());
    dbg.resume(&[(0, Action::Step), (1, Action::Step)]).expect("step both");
    h0.before_run(&f0).expect("enter");
    h1.before_run(&f1).expect("enter");
    // vCPU 1's step completes; vCPU 0 is kicked out before its instruction.
    let Handled::Stop(ev) = h1.handle_exit(&f1, &exit(1, 0x2003, DR6_STEP)).expect("exit") else {
        panic!("the debugger's step")
    };
    h1.report_stop(ev).expect("post");
    assert_eq!(dbg.try_take_stop().expect("take").map(|e| e.vcpu), Some(1));
    assert!(dbg.moved(1).expect("query"), "vCPU 1 ran one instruction");
    assert!(!dbg.moved(0).expect("query"), "vCPU 0 did not move");
    // Resuming vCPU 0's step alone: moved resets for the released vCPU.
    dbg.resume(&[(0, Action::Step)]).expect("step vCPU 0");
    h0.before_run(&f0).expect("enter");
    let Handled::Stop(_) = h0.handle_exit(&f0, &exit(1, 0x3002, DR6_STEP)).expect("exit") else {
        panic!("the debugger's step")
    };
    assert!(dbg.moved(0).expect("query"));
    assert!(dbg.moved(1).expect("query"), "not released since: still says it moved");
    assert!(dbg.moved(9).is_err(), "unknown id");
}
