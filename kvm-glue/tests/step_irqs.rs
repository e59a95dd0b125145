//! Issue #18 item 6 without KVM: what kvm-glue asks of KVM while stepping.
//! A single-step carries `KVM_GUESTDBG_BLOCKIRQ` (1 << 20, the kernel's
//! `include/uapi/linux/kvm.h`) by default where the host reports it in
//! `KVM_CAP_SET_GUEST_DEBUG2`, a continue never does, and a host without it
//! is never sent it (its KVM refuses unknown flags with `EINVAL`).
//! `kvm_step_irqs.rs` checks the effect on real KVM.

use kvm_glue::fake::FakeVcpu;
use kvm_glue::{probe, Error, StepIrqs, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const BLOCKIRQ: u32 = 1 << 20;
const SINGLESTEP: u32 = 0x2;

fn vm() -> VmDebug<GuestMemoryMmap> {
    VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory"))
}

#[test]
fn a_step_blocks_interrupts_by_default_where_the_host_has_blockirq_and_a_continue_never() {
    let dbg = vm();
    let fake = FakeVcpu::new();
    let mut h = dbg.vcpu(0).expect("vcpu");
    let host = probe::host_block_irq();
    assert_eq!(
        host,
        probe::host_guest_debug_flags().is_some_and(|f| f & BLOCKIRQ != 0),
        "the flag is bit 20 of KVM_CAP_SET_GUEST_DEBUG2"
    );
    let expected = if host { StepIrqs::Blocked } else { StepIrqs::Delivered };
    assert_eq!(dbg.step_irqs(), expected);

    dbg.set_single_step(0, true).expect("step");
    h.sync(&fake).expect("sync");
    let step = fake.guest_debug().expect("set").control;
    assert_ne!(step & SINGLESTEP, 0);
    assert_eq!(step & BLOCKIRQ != 0, host, "step control {step:#x}");

    dbg.set_single_step(0, false).expect("continue");
    h.sync(&fake).expect("sync");
    assert_eq!(
        fake.guest_debug().expect("set").control & BLOCKIRQ,
        0,
        "a continue lets interrupts in"
    );
    println!("host reports BLOCKIRQ: {host}");
}

#[test]
fn steps_let_interrupts_in_when_asked_and_blocked_is_refused_where_the_host_lacks_it() {
    let dbg = vm();
    let fake = FakeVcpu::new();
    let mut h = dbg.vcpu(0).expect("vcpu");
    dbg.set_step_irqs(StepIrqs::Delivered).expect("always possible");
    assert_eq!(dbg.step_irqs(), StepIrqs::Delivered);
    dbg.set_single_step(0, true).expect("step");
    h.sync(&fake).expect("sync");
    let step = fake.guest_debug().expect("set").control;
    assert_eq!(step & (BLOCKIRQ | SINGLESTEP), SINGLESTEP, "step control {step:#x}");

    match dbg.set_step_irqs(StepIrqs::Blocked) {
        Ok(()) => {
            assert!(probe::host_block_irq());
            assert!(
                h.sync(&fake).expect("sync"),
                "the change reaches the vCPU at its next sync"
            );
            assert_ne!(fake.guest_debug().expect("set").control & BLOCKIRQ, 0);
        }
        Err(Error::HostLacks { .. }) => {
            assert!(!probe::host_block_irq());
            assert_eq!(dbg.step_irqs(), StepIrqs::Delivered, "a refused change changes nothing");
            println!("SKIPPED: BLOCKIRQ on a step (this host's KVM does not report it)");
        }
        Err(e) => panic!("{e}"),
    }
}
