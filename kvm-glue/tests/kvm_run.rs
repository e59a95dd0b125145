//! `kvm_glue::run` on a real `/dev/kvm`: the exit a VMM copies out of
//! `kvm_run` before it hands the vCPU to [`VcpuDebug::handle_exit`]
//! (issue #18, item 5). Named `kvm_*` so the nested lanes run it.

mod common;

use common::{guest, guest_for};
use kvm_glue::guest as tiny;
use kvm_glue::run::{run_once, Exit};
use kvm_glue::{AddressSpace, BreakpointType, Handled, VmDebug};

#[test]
fn a_kick_before_kvm_run_is_interrupted_not_an_error() {
    let name = "run_once and EINTR";
    let Some(mut g) = guest(name, 1) else { return };
    let vcpu = g.vcpu(0);
    // immediate_exit = 1 is what a kick arriving before KVM_RUN looks like
    // (KVM API: KVM_RUN returns -EINTR at once, the guest does not run).
    vcpu.set_kvm_immediate_exit(1);
    let exit = run_once(vcpu);
    vcpu.set_kvm_immediate_exit(0);
    assert_eq!(exit.expect("EINTR is not an error"), Exit::Interrupted);
    // The guest did not run: RIP is still at the routine's first instruction.
    assert_eq!(vcpu.get_regs().expect("KVM_GET_REGS").rip, tiny::STRAIGHT);
    println!("{name}: checked a pre-set immediate_exit gives Exit::Interrupted and the guest did not run");
}

#[test]
fn a_copied_debug_exit_is_decoded_after_the_vcpu_borrow_ends() {
    let name = "copied debug exit";
    let Some(mut g) = guest_for(name, 1, |p| &p.execute) else {
        return;
    };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    // The third instruction of the straight-line routine (guest/asm.rs).
    let at = tiny::STRAIGHT_INSNS[2];
    dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, at, 1)
        .expect("insert");
    let vcpu = g.vcpu(0);
    h.before_run(&*vcpu).expect("before_run");
    // `run_once` returns an owned Exit: the `&mut` borrow KVM_RUN needed has
    // ended, so the same vCPU can be lent to handle_exit (with a VcpuExit
    // in hand this does not compile).
    let exit = run_once(vcpu).expect("KVM_RUN");
    let Exit::Debug { exception, pc, dr6, .. } = exit else {
        panic!("expected a debug exit, got {exit:?}")
    };
    assert_eq!(
        (exception, pc, dr6 & 0xf),
        (1, at, 0b0001),
        "#DB at the breakpoint, DR6.B0"
    );
    let arch = exit.debug().expect("the copied exit keeps its debug data");
    match h.handle_exit(&*vcpu, &arch).expect("handle_exit") {
        Handled::Stop(stop) => assert_eq!(stop.pc, at),
        Handled::Resume(r) => panic!("the debugger's breakpoint was re-injected: {r:?}"),
    }
    println!("{name}: checked a hardware breakpoint exit copied by run_once decodes to a stop at {at:#x}");
}
