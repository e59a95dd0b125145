//! The halted vCPU's wait ([`kvm_glue::idle`], issue #20) on a real
//! `/dev/kvm` with the signal kick: the tiny guest has no interrupt
//! controller, so its `hlt` exits to the VMM (`KVM_EXIT_HLT`) and the vCPU
//! thread waits outside `KVM_RUN`, where the kick's signal stays pending. A
//! stop must end that wait (reason [`Woke::Stop`]), the vCPU must park and
//! answer a register read, and the VMM's own waker must then let the guest
//! run again. Named `kvm_*` so the nested lanes run it. No timing is
//! asserted; timeouts are hang guards.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::guest;
use kvm_glue::guest::{self as tiny, Exit};
use kvm_glue::kick::SignalKick;
use kvm_glue::{RunState, VmDebug, Woke};

const GUARD: Duration = Duration::from_secs(60);

#[test]
fn kvm_a_stop_ends_the_wait_of_a_vcpu_halted_outside_kvm_run() {
    let name = "kvm halted vCPU wait";
    let Some(mut g) = guest(name, 1) else { return };
    g.start(0, tiny::STRAIGHT_HLT).expect("start at the hlt");
    let dbg = VmDebug::new(g.memory().clone());
    let kick = SignalKick::new(0).expect("signal kick");
    dbg.set_kick(kick.clone()).expect("set kick");
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let irq = h.idle_waker();
    let (halted_tx, halted_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();

    // A detached thread owning the guest (not a scope): if the wait were
    // never ended, the test fails at the guard instead of joining for ever.
    let vcpu_kick = kick.clone();
    std::thread::spawn(move || {
        let kick = vcpu_kick;
        let vcpu = g.vcpu(0);
        kick.prepare_vcpu_thread(0, vcpu).expect("prepare");
        h.before_run(&*vcpu).expect("before_run");
        let first = tiny::run_once(vcpu).expect("KVM_RUN");
        assert_eq!(first, Exit::Hlt, "the guest starts at a hlt");
        halted_tx.send(()).expect("halted");
        // The VMM's loop after a hlt exit: the debugger's reasons are
        // dealt with and the guest stays halted; the VMM's wake runs it.
        let mut reasons = Vec::new();
        loop {
            let woke = h.wait_idle(None).expect("wait");
            reasons.push(woke);
            match woke {
                Woke::Stop | Woke::Intent => {
                    h.before_run(&*vcpu).expect("park");
                }
                Woke::Vmm | Woke::TimedOut => break,
            }
        }
        // The guest runs again: the stop_all's kick is still pending
        // (blocked outside KVM_RUN) and interrupts the first entry.
        let mut exits = Vec::new();
        loop {
            h.before_run(&*vcpu).expect("before_run");
            let e = tiny::run_once(vcpu).expect("KVM_RUN");
            let again = e == Exit::Interrupted;
            exits.push(e);
            if !again {
                break;
            }
            kick.drain().expect("drain");
        }
        done_tx.send((reasons, exits)).expect("done");
    });

    halted_rx.recv_timeout(GUARD).expect("the vCPU reached the hlt");
    // Give the thread a moment to enter its wait (either order must work).
    std::thread::sleep(Duration::from_millis(20));
    dbg.stop_all(GUARD).expect("the halted vCPU parks");
    assert_eq!(dbg.run_state(0).expect("state"), RunState::Parked);
    let rip = dbg
        .with_parked_vcpu(0, |v| v.get_regs().map(|r| r.rip))
        .expect("job on the parked vCPU")
        .expect("KVM_GET_REGS");
    // KVM_EXIT_HLT leaves rip after the hlt (at the jmp back to it).
    assert_eq!(rip, tiny::STRAIGHT_HLT + 1, "parked after the hlt");
    dbg.resume_all().expect("resume");
    irq.wake().expect("the VMM's interrupt");
    let (reasons, exits) = done_rx.recv_timeout(GUARD).expect("the vCPU thread finished");
    assert_eq!(
        reasons.first(),
        Some(&Woke::Stop),
        "the stop ended the wait: {reasons:?}"
    );
    assert_eq!(
        reasons.last(),
        Some(&Woke::Vmm),
        "the VMM's wake ran the guest: {reasons:?}"
    );
    assert_eq!(
        exits.last(),
        Some(&Exit::Hlt),
        "the guest ran to its hlt again: {exits:?}"
    );
    println!(
        "{name}: checked a stop ends the wait (reasons {reasons:?}), the vCPU parks at {rip:#x}, \
         and the VMM's wake runs the guest (exits {exits:?})"
    );
}
