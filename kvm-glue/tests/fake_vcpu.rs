//! The handles' ioctl discipline and transactional behaviour, on fake vCPUs
//! (no /dev/kvm needed): counts of KVM_SET_GUEST_DEBUG, failures injected at
//! every step, decoding from the applied configuration, re-injection.

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::{FakeVcpu, Op};
use kvm_glue::vcpu_debug::to_kvm;
use kvm_glue::MemoryError;
use kvm_glue::{AddressSpace, Handled, Insert, Resume, StepOver, VcpuDebug, VmDebug};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86_debugreg::exit::Exception;
use x86_debugreg::{BreakpointType, ControlFlags, GuestDebug, Stop};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;

fn memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mmap");
    let code: Vec<u8> = (0..0x1_0000u32).map(|i| (i % 251) as u8 | 1).collect();
    mem.write_slice(&code, GuestAddress(0)).expect("fill");
    mem
}

fn byte(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).expect("read")
}

/// What a handle believes its vCPU holds; a handle that never synced
/// believes nothing, which for a fresh fake vCPU is "disabled".
fn applied_of(h: &VcpuDebug<GuestMemoryMmap>) -> GuestDebug {
    h.applied().map_or(GuestDebug::DISABLED, |a| *a.config())
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

/// What the fake "kernel" holds, as a GuestDebug (a new vCPU: disabled). The
/// inject flags are left out: KVM acts on them once, when the ioctl is made.
fn held(f: &FakeVcpu) -> GuestDebug {
    // The one-shot inject flags, and KVM_GUESTDBG_BLOCKIRQ, which kvm-glue
    // adds to every step where the host has it (StepIrqs): neither changes
    // what an exit means, so neither is part of the record.
    let inject = (ControlFlags::INJECT_DB | ControlFlags::INJECT_BP).bits() | kvm_bindings::KVM_GUESTDBG_BLOCKIRQ;
    match f.guest_debug() {
        None => GuestDebug::DISABLED,
        Some(d) => GuestDebug {
            control: ControlFlags::from_bits_retain(d.control & !inject),
            debugreg: d.arch.debugreg,
        },
    }
}

struct Vm {
    mem: GuestMemoryMmap,
    dbg: VmDebug<GuestMemoryMmap>,
    handles: Vec<VcpuDebug<GuestMemoryMmap>>,
    fakes: Vec<FakeVcpu>,
}

fn vm(n: usize) -> Vm {
    let mem = memory();
    let dbg = VmDebug::new(mem.clone());
    Vm {
        handles: (0..n).map(|i| dbg.vcpu(i).expect("vCPU handle")).collect(),
        fakes: (0..n).map(|_| FakeVcpu::new()).collect(),
        mem,
        dbg,
    }
}

impl Vm {
    /// Syncs every vCPU; returns the KVM_SET_GUEST_DEBUG calls each made.
    fn sync_each(&mut self) -> Vec<usize> {
        self.handles
            .iter_mut()
            .zip(&self.fakes)
            .map(|(h, f)| {
                let before = f.count(Op::SetGuestDebug);
                h.sync(f).expect("sync");
                f.count(Op::SetGuestDebug) - before
            })
            .collect()
    }

    fn assert_records_match_kernel(&self) {
        for (h, f) in self.handles.iter().zip(&self.fakes) {
            assert_eq!(
                applied_of(h),
                held(f),
                "vCPU {} believes something it does not have",
                h.id()
            );
        }
    }
}

#[test]
fn an_insert_while_both_vcpus_are_stopped_reaches_both_with_one_ioctl_each() {
    let mut vm = vm(2);
    // A new handle assumes nothing about its vCPU: the first sync applies.
    assert_eq!(vm.sync_each(), [1, 1], "the first sync always applies");
    assert_eq!(vm.sync_each(), [0, 0], "nothing set: nothing more to apply");
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    assert_eq!(vm.sync_each(), [1, 1]);
    assert_eq!(vm.sync_each(), [0, 0], "a second sync with no change costs nothing");
    vm.assert_records_match_kernel();
    assert_eq!(held(&vm.fakes[1]).debugreg[0], 0x1000);
}

#[test]
fn software_breakpoint_inserts_into_a_non_empty_set_cost_no_ioctl() {
    let mut vm = vm(2);
    vm.dbg.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("insert");
    assert_eq!(vm.sync_each(), [1, 1], "the first one turns USE_SW_BP on");
    for addr in [0x200, 0x300, 0x400, 0x100] {
        vm.dbg.insert(PHYS, BreakpointType::Software, addr, 1).expect("insert");
        assert_eq!(vm.sync_each(), [0, 0], "insert at {addr:#x}");
    }
    for addr in [0x100, 0x200, 0x300, 0x400] {
        assert_eq!(byte(&vm.mem, addr), 0xCC);
    }
    println!("ioctls for 4 software-breakpoint inserts into a non-empty set, 2 vCPUs: kvm-glue 0, seed 8");
}

#[test]
fn many_operations_between_two_resumes_cost_at_most_one_ioctl_per_vcpu() {
    let mut vm = vm(2);
    let d = &vm.dbg;
    let mut ops = 0;
    d.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("hw");
    d.insert(PHYS, BreakpointType::WriteWatch, 0x2000, 8).expect("watch");
    d.insert(PHYS, BreakpointType::AccessWatch, 0x3004, 4)
        .expect("rw watch");
    d.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("sw");
    d.insert(PHYS, BreakpointType::Software, 0x180, 1).expect("sw");
    d.remove(PHYS, BreakpointType::WriteWatch, 0x2000, 8)
        .expect("remove watch");
    d.insert(PHYS, BreakpointType::Hardware, 0x1010, 1).expect("hw");
    d.set_single_step(0, true).expect("step");
    d.remove(PHYS, BreakpointType::Software, 0x180, 1).expect("remove sw");
    d.insert(PHYS, BreakpointType::Hardware, 0x1020, 1).expect("hw");
    ops += 10;
    let costs = vm.sync_each();
    assert!(costs.iter().all(|&c| c <= 1), "{costs:?}");
    assert_eq!(costs, [1, 1]);
    vm.assert_records_match_kernel();
    let intent0 = vm.dbg.guest_debug_for(0).expect("intent");
    assert_eq!(held(&vm.fakes[0]), intent0);
    assert!(held(&vm.fakes[0]).single_step() && !held(&vm.fakes[1]).single_step());
    println!(
        "ioctls for {ops} operations between two resumes, 2 vCPUs: kvm-glue {} (at most 1 per vCPU), seed {}",
        costs.iter().sum::<usize>(),
        ops * 2
    );
}

#[test]
fn single_step_of_one_vcpu_changes_only_that_vcpus_configuration() {
    let mut vm = vm(2);
    vm.dbg.set_single_step(1, true).expect("step");
    vm.sync_each();
    assert!(!held(&vm.fakes[0]).single_step());
    assert!(held(&vm.fakes[1]).single_step());
    assert_eq!(vm.fakes[0].count(Op::SetGuestDebug), 1, "only the first sync");
    vm.dbg.set_single_step(1, false).expect("step off");
    assert_eq!(vm.sync_each(), [0, 1], "vCPU 0's configuration did not change");
}

#[test]
fn a_failed_sync_names_the_vcpu_keeps_the_old_record_and_retries() {
    let mut vm = vm(2);
    vm.fakes[1].fail_op(Op::SetGuestDebug, 1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.handles[0].sync(&vm.fakes[0]).expect("vCPU 0 syncs");
    let err = vm.handles[1].sync(&vm.fakes[1]).expect_err("vCPU 1 fails");
    assert_eq!(err.vcpu(), Some(1));
    assert_eq!(applied_of(&vm.handles[1]), GuestDebug::DISABLED);
    vm.assert_records_match_kernel();
    assert!(vm.handles[1].sync(&vm.fakes[1]).expect("retry"));
    vm.assert_records_match_kernel();
}

#[test]
fn sync_all_rolls_back_the_vcpus_it_changed_when_one_fails() {
    let mut vm = vm(2);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    assert_eq!(vm.dbg.sync_all(&mut vm.handles, &vm.fakes).expect("sync_all"), 2);
    let before = held(&vm.fakes[0]);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1010, 1)
        .expect("insert");
    vm.fakes[1].fail_op(Op::SetGuestDebug, 1);
    let err = vm.dbg.sync_all(&mut vm.handles, &vm.fakes).expect_err("vCPU 1 fails");
    assert_eq!(err.error.vcpu(), Some(1));
    assert_eq!(err.rolled_back, [0]);
    assert!(err.rollback_failed.is_empty());
    assert_eq!(held(&vm.fakes[0]), before, "vCPU 0 is back where it was");
    assert_eq!(held(&vm.fakes[1]), before, "vCPU 1 never changed");
    vm.assert_records_match_kernel();
    assert_eq!(vm.dbg.sync_all(&mut vm.handles, &vm.fakes).expect("retry"), 2);
    vm.assert_records_match_kernel();
}

#[test]
fn a_failed_rollback_is_reported_and_recorded_as_what_the_vcpu_has() {
    let mut vm = vm(2);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.fakes[0].fail_op(Op::SetGuestDebug, 2); // the rollback
    vm.fakes[1].fail_op(Op::SetGuestDebug, 1);
    let err = vm.dbg.sync_all(&mut vm.handles, &vm.fakes).expect_err("fails");
    assert_eq!(err.error.vcpu(), Some(1));
    assert_eq!(err.rollback_failed.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [0]);
    vm.assert_records_match_kernel();
    assert_eq!(applied_of(&vm.handles[0]).debugreg[0], 0x1000);
}

/// Runs a scenario touching every handle operation with the k-th vCPU call
/// failing, for every k: after each step, every handle's record equals what
/// its fake holds, and a failed software-breakpoint operation left memory alone.
#[test]
fn with_a_failure_injected_at_every_call_no_vcpu_believes_what_it_does_not_have() {
    let mut k = 1;
    let mut failures_seen = 0;
    loop {
        let mut vm = vm(2);
        vm.fakes[0].fail_call(k);
        vm.fakes[1].fail_call(k);
        let mut failed = false;
        let mut check = |vm: &Vm, r: Result<(), kvm_glue::Error>| {
            if let Err(e) = r {
                failed = true;
                assert!(e.vcpu().is_some() || matches!(e, kvm_glue::Error::Memory(_)), "{e}");
            }
            vm.assert_records_match_kernel();
        };
        vm.dbg
            .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
            .expect("insert");
        vm.dbg.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("insert");
        for i in 0..2 {
            let r = vm.handles[i].sync(&vm.fakes[i]).map(drop);
            check(&vm, r);
        }
        let r = vm
            .dbg
            .sync_all(&mut vm.handles, &vm.fakes)
            .map(drop)
            .map_err(|e| e.error);
        check(&vm, r);
        // An exit at the execute breakpoint, then step over it.
        let r = vm.handles[0]
            .handle_exit(&vm.fakes[0], &exit(1, 0x1000, 0xffff_0ff1))
            .map(drop);
        check(&vm, r);
        vm.handles[0].step_over();
        let r = vm.handles[0].sync(&vm.fakes[0]).map(drop);
        check(&vm, r);
        let r = vm.handles[0]
            .handle_exit(&vm.fakes[0], &exit(1, 0x1003, 0xffff_4ff0))
            .map(drop);
        check(&vm, r);
        let r = vm.handles[0].sync(&vm.fakes[0]).map(drop);
        check(&vm, r);
        // A software breakpoint stop and step over, through translation.
        let r = vm.handles[1].handle_exit(&vm.fakes[1], &exit(3, 0x100, 0)).map(drop);
        check(&vm, r);
        vm.handles[1].step_over();
        let r = vm.handles[1].sync(&vm.fakes[1]).map(drop);
        check(&vm, r);
        let r = vm.handles[1]
            .handle_exit(&vm.fakes[1], &exit(1, 0x101, 0xffff_4ff0))
            .map(drop);
        check(&vm, r);
        // The guest's own #DB (a B-bit the debugger did not set).
        let r = vm.handles[1]
            .handle_exit(&vm.fakes[1], &exit(1, 0x2000, 0xffff_0ff8))
            .map(drop);
        check(&vm, r);
        if !vm.handles[1].stepping_over() {
            assert_eq!(byte(&vm.mem, 0x100), 0xCC, "k={k}: the breakpoint is armed again");
        }
        if !failed {
            break;
        }
        failures_seen += 1;
        k += 1;
    }
    println!("injected a failure at each of the first {failures_seen} vCPU calls of the scenario");
    // sync, the #BP's KVM_TRANSLATE, the step-over's KVM_SET_GUEST_DEBUG and
    // the re-injection; the step over an int3 uses the address recorded at
    // its stop instead of translating the pc again.
    assert!(failures_seen >= 4, "the scenario makes at least 4 calls on vCPU 1");
}

#[test]
fn a_stop_is_decoded_from_the_configuration_this_vcpu_applied_not_the_newest_intent() {
    let mut vm = vm(1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.sync_each();
    // The debugger moves the breakpoint while the vCPU is still in the guest.
    vm.dbg
        .remove(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("remove");
    vm.dbg
        .insert(PHYS, BreakpointType::WriteWatch, 0x2000, 4)
        .expect("insert");
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x1000, 0xffff_0ff1))
        .expect("decode");
    let Handled::Stop(ev) = got else { panic!("{got:?}") };
    let Stop::Debug {
        single_step: false,
        hits,
    } = ev.stop
    else {
        panic!("{ev:?}")
    };
    let hit: Vec<_> = hits.iter().map(|h| (h.slot.get(), h.breakpoint.addr())).collect();
    assert_eq!(hit, [(0, 0x1000)], "DR0 held the execute breakpoint when the vCPU ran");
}

#[test]
fn a_b_bit_the_debugger_did_not_set_is_reinjected_with_one_ioctl() {
    let mut vm = vm(1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.sync_each();
    let applied = applied_of(&vm.handles[0]);
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x1234, 0xffff_0ff8))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Debug)));
    let last = vm.fakes[0].guest_debug().expect("set");
    assert_eq!(last.control, (applied.control | ControlFlags::INJECT_DB).bits());
    assert_eq!(last.arch.debugreg, applied.debugreg);
    assert_eq!(applied_of(&vm.handles[0]), applied, "the inject flag is one-shot");
    assert_eq!(vm.fakes[0].count(Op::SetGuestDebug), 2);
}

#[test]
fn the_guests_own_int3_is_reinjected_and_a_removed_breakpoints_int3_is_not() {
    let mut vm = vm(1);
    vm.dbg.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("insert");
    vm.sync_each();
    vm.mem.write_obj(0xCCu8, GuestAddress(0x500)).expect("guest's own int3");
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(3, 0x500, 0))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Breakpoint)));
    assert_ne!(
        vm.fakes[0].guest_debug().expect("set").control & ControlFlags::INJECT_BP.bits(),
        0
    );
    // The debugger removes its breakpoint after the vCPU hit it.
    vm.dbg.remove(PHYS, BreakpointType::Software, 0x100, 1).expect("remove");
    let calls = vm.fakes[0].count(Op::SetGuestDebug);
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(3, 0x100, 0))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::StaleSoftwareBreakpoint { addr: 0x100 }));
    assert_eq!(vm.fakes[0].count(Op::SetGuestDebug), calls, "nothing injected");
}

#[test]
fn a_failed_reinjection_queues_nothing_and_changes_no_record() {
    let mut vm = vm(1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.sync_each();
    let applied = applied_of(&vm.handles[0]);
    vm.fakes[0].fail_op(Op::SetGuestDebug, 1);
    let err = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x1234, 0xffff_0ff8))
        .expect_err("fails");
    assert_eq!(err.vcpu(), Some(0));
    assert_eq!(applied_of(&vm.handles[0]), applied);
    assert_eq!(held(&vm.fakes[0]), applied);
}

#[test]
fn step_over_a_software_breakpoint_restores_the_byte_for_one_step_then_rearms() {
    let mut vm = vm(1);
    let original = byte(&vm.mem, 0x100);
    vm.dbg.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("insert");
    vm.sync_each();
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(3, 0x100, 0))
        .expect("decode");
    assert!(
        matches!(got, Handled::Stop(ev) if ev.stop == Stop::Software { addr: 0x100 }),
        "{got:?}"
    );
    assert_eq!(vm.handles[0].step_over(), StepOver::Requested { pc: 0x100 });
    assert_eq!(vm.sync_each(), [1], "sync applies the step over");
    assert_eq!(byte(&vm.mem, 0x100), original, "original byte back for the step");
    assert!(held(&vm.fakes[0]).single_step());
    assert_eq!(vm.sync_each(), [0], "sync leaves the step's configuration alone");
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x103, 0xffff_4ff0))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::SteppedOver));
    assert_eq!(byte(&vm.mem, 0x100), 0xCC, "re-armed");
    assert_eq!(vm.sync_each(), [1], "the full configuration comes back");
    assert!(!held(&vm.fakes[0]).single_step());
    vm.assert_records_match_kernel();
}

#[test]
fn step_over_an_execute_breakpoint_disables_only_that_slot() {
    let mut vm = vm(1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1008, 1)
        .expect("insert");
    vm.sync_each();
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x1008, 0xffff_0ff2))
        .expect("decode");
    assert!(matches!(got, Handled::Stop(_)));
    assert_eq!(vm.handles[0].step_over(), StepOver::Requested { pc: 0x1008 });
    assert_eq!(vm.sync_each(), [1], "sync applies the step over");
    let during = held(&vm.fakes[0]);
    assert!(during.armed(x86_debugreg::Slot::ALL[0]).is_some());
    assert!(during.armed(x86_debugreg::Slot::ALL[1]).is_none());
    assert!(during.single_step());
}

#[test]
fn a_single_step_when_the_debugger_did_not_ask_for_one_is_the_guests() {
    let mut vm = vm(1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.sync_each();
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x1000, 0xffff_4ff0))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Debug)));
}

#[test]
fn an_int1_exit_at_the_int1_skips_it_before_reinjecting() {
    let mut vm = vm(1);
    vm.dbg
        .insert(PHYS, BreakpointType::Hardware, 0x1000, 1)
        .expect("insert");
    vm.sync_each();
    vm.mem.write_obj(0xF1u8, GuestAddress(0x700)).expect("int1");
    let mut regs = vm.fakes[0].regs();
    regs.rip = 0x700;
    vm.fakes[0].put_regs(regs);
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x700, 0xffff_0ff0))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Debug)));
    assert_eq!(vm.fakes[0].regs().rip, 0x701);
    vm.dbg
        .set_int1_pc(kvm_glue::probe::Int1Pc::AfterInstruction)
        .expect("set");
    let got = vm.handles[0]
        .handle_exit(&vm.fakes[0], &exit(1, 0x700, 0xffff_0ff0))
        .expect("decode");
    assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Debug)));
    assert_eq!(
        vm.fakes[0].regs().rip,
        0x701,
        "no skip where the probe saw the pc after the int1"
    );
}

#[test]
fn software_breakpoints_by_virtual_address_patch_the_translated_physical_byte() {
    let vm = vm(1);
    vm.fakes[0].map(0x4000_0000, 0x2000, 0x1000);
    let original = byte(&vm.mem, 0x2010);
    vm.dbg
        .insert(
            AddressSpace::Virtual(&vm.fakes[0]),
            BreakpointType::Software,
            0x4000_0010,
            1,
        )
        .expect("insert");
    assert_eq!(byte(&vm.mem, 0x2010), 0xCC);
    vm.dbg
        .remove(
            AddressSpace::Virtual(&vm.fakes[0]),
            BreakpointType::Software,
            0x4000_0010,
            1,
        )
        .expect("remove");
    assert_eq!(byte(&vm.mem, 0x2010), original);
    vm.fakes[0].without_identity();
    let err = vm
        .dbg
        .insert(AddressSpace::Virtual(&vm.fakes[0]), BreakpointType::Software, 0x9000, 1)
        .expect_err("unmapped");
    assert!(
        matches!(err, kvm_glue::Error::Memory(MemoryError::NotMapped { gva: 0x9000 })),
        "{err:?}"
    );
    assert!(vm.dbg.state().expect("state").sw().is_empty(), "nothing half-inserted");
}

#[test]
fn a_fifth_hardware_breakpoint_is_no_free_slot_not_an_error() {
    let vm = vm(1);
    for i in 0..4 {
        vm.dbg
            .insert(PHYS, BreakpointType::Hardware, 0x1000 + i, 1)
            .expect("insert");
    }
    assert_eq!(
        vm.dbg
            .insert(PHYS, BreakpointType::Hardware, 0x1010, 1)
            .expect("answer"),
        Insert::NoFreeSlot
    );
}

#[test]
fn remove_all_restores_memory_byte_for_byte() {
    let mut vm = vm(2);
    let snapshot: Vec<u8> = (0..0x1000).map(|a| byte(&vm.mem, a)).collect();
    for addr in [0x10, 0x20, 0x30, 0x20] {
        vm.dbg.insert(PHYS, BreakpointType::Software, addr, 1).expect("insert");
    }
    vm.dbg.insert(PHYS, BreakpointType::Hardware, 0x800, 1).expect("insert");
    vm.sync_each();
    let report = vm.dbg.remove_all().expect("remove all");
    assert!(report.is_complete());
    assert_eq!((0..0x1000).map(|a| byte(&vm.mem, a)).collect::<Vec<_>>(), snapshot);
    assert_eq!(vm.sync_each(), [1, 1]);
    assert_eq!(held(&vm.fakes[0]).control, ControlFlags::NONE);
    assert_eq!(to_kvm(&applied_of(&vm.handles[0])).control, 0);
}
