//! Issue #18 item 3 without KVM: a vCPU reports a fault as a stop
//! (`VcpuDebug::report_fault`). It parks like any stop, with registers
//! readable; the stop is never dropped as stale; resuming it is refused with
//! a typed error that changes nothing; once released (a detach), its
//! `before_run` answers that error so the VMM decides. `kvm_fault_stop.rs`
//! does it with a real triple fault.

use std::time::Duration;

use kvm_glue::fake::FakeVcpu;
use kvm_glue::{Action, Error, Fault, Posted, RunError, RunState, VcpuOps, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn vm() -> VmDebug<GuestMemoryMmap> {
    VmDebug::with_vcpus(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory"),
        2,
    )
    .expect("two vCPUs")
}

fn faulted(e: &Error) -> Option<(usize, Fault)> {
    match e {
        Error::Run(RunError::Faulted { vcpu, fault }) => Some((*vcpu, *fault)),
        _ => None,
    }
}

#[test]
fn a_faulted_vcpu_parks_with_its_registers_readable_and_cannot_be_resumed() {
    let dbg = vm();
    let mut h = dbg.vcpu(0).expect("handle");
    let vcpu_thread = std::thread::spawn(move || {
        let fake = FakeVcpu::new();
        let mut regs = kvm_bindings::kvm_regs {
            rip: 0x1234,
            rax: 0xdead,
            ..Default::default()
        };
        regs.rflags = 2;
        fake.set_regs(&regs).expect("set regs");
        assert_eq!(
            h.report_fault(&fake, Fault::InternalError).expect("report"),
            Posted::Waiting
        );
        // Parks while the debugger looks, then refuses to run on.
        h.before_run(&fake).expect_err("a faulted vCPU cannot enter the guest")
    });
    let stop = dbg
        .wait_stop(Some(Duration::from_secs(10)))
        .expect("wait")
        .expect("a stop");
    assert_eq!(
        (stop.vcpu, stop.pc, stop.fault),
        (0, 0x1234, Some(Fault::InternalError))
    );
    assert_eq!(stop.to_string(), "vCPU 0 faulted at 0x1234: KVM_EXIT_INTERNAL_ERROR");
    dbg.stop_all(Duration::from_secs(10)).expect("parked");
    let rax = dbg
        .with_parked_vcpu(0, |v| v.get_regs().map(|r| r.rax))
        .expect("job")
        .expect("regs");
    assert_eq!(rax, 0xdead, "registers readable at the fault");

    let err = dbg.resume(&[(0, Action::Continue)]).expect_err("refused");
    assert_eq!(faulted(&err), Some((0, Fault::InternalError)), "{err}");
    assert_eq!(
        dbg.run_state(0).expect("state"),
        RunState::Parked,
        "a refused resume changes nothing"
    );
    assert!(faulted(&dbg.resume_all().expect_err("refused too")).is_some());

    dbg.detach().expect("detach"); // the session ends; the vCPU is released
    let err = vcpu_thread.join().expect("vCPU thread");
    assert_eq!(faulted(&err), Some((0, Fault::InternalError)), "{err}");
}

#[test]
fn a_fault_stop_is_never_dropped_as_stale() {
    let dbg = vm();
    let mut h0 = dbg.vcpu(0).expect("handle");
    let _h1 = dbg.vcpu(1).expect("handle");
    let fake = FakeVcpu::new();
    h0.report_fault(&fake, Fault::Shutdown).expect("report");
    // vCPU 1 resumed alone: the fault (no breakpoint, no step) stays posted,
    // so nobody is released and it is still there to take.
    dbg.resume(&[(1, Action::Continue)]).expect("resume vCPU 1");
    assert_eq!(dbg.run_state(1).expect("state"), RunState::StopRequested);
    let stop = dbg.try_take_stop().expect("take").expect("still posted");
    assert_eq!(stop.fault, Some(Fault::Shutdown));
}
