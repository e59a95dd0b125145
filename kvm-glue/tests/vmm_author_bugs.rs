//! The bugs a VMM author found driving kvm-glue (issue #8), one test each,
//! on fake vCPUs (no /dev/kvm needed; the real-KVM versions that this host
//! can run are in `kvm_lifecycle.rs`). Each failed before the fix.

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::{FakeVcpu, Op};
use kvm_glue::{
    AddressSpace, BreakpointType, ControlFlags, Error, Exception, Handled, Inserted, Removed, Resume, SpaceKind,
    StepOver, Stop, SwError, SwRemoved, VmDebug,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86_debugreg::BreakpointError;

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

fn exit(exception: u32, pc: u64, dr6: u64) -> kvm_debug_exit_arch {
    kvm_debug_exit_arch {
        exception,
        pad: 0,
        pc,
        dr6,
        dr7: 0,
    }
}

/// DR6 as KVM reports a single step (SDM Vol. 3B §18.2.3: BS is bit 14,
/// over the active-low 0xffff0ff0 at-rest value).
const DR6_STEP: u64 = 0xffff_4ff0;
/// DR6 for a hit in DR0 (B0, bit 0).
const DR6_B0: u64 = 0xffff_0ff1;

/// Bug 1: `step_over` then `set_single_step(vcpu, true)` before the vCPU
/// runs must give one stop, at the next instruction — not a silent step
/// over followed by a second step.
#[test]
fn bug1_step_over_then_single_step_stops_once_at_the_next_instruction() {
    let mem = memory();
    let dbg = VmDebug::new(mem);
    let vcpu = FakeVcpu::new();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h.sync(&vcpu).expect("sync");
    let Handled::Stop(_) = h.handle_exit(&vcpu, &exit(1, 0x1000, DR6_B0)).expect("exit") else {
        panic!("the execute breakpoint is the debugger's")
    };
    assert_eq!(h.step_over(), StepOver::Requested { pc: 0x1000 });
    dbg.set_single_step(0, true).expect("stepi"); // after step_over, before running
    assert!(h.sync(&vcpu).expect("sync"));
    let held = vcpu.guest_debug().expect("set");
    assert_eq!(
        held.control & ControlFlags::SINGLESTEP.bits(),
        ControlFlags::SINGLESTEP.bits()
    );
    assert_eq!(held.arch.debugreg[7] & 0b11, 0, "DR0 disabled for the one step");
    // The step's exit, at the next instruction (0x1003).
    match h.handle_exit(&vcpu, &exit(1, 0x1003, DR6_STEP)).expect("exit") {
        Handled::Stop(ev) => {
            assert_eq!(ev.pc, 0x1003);
            assert!(matches!(ev.stop, Stop::Debug { single_step: true, .. }), "{ev:?}");
        }
        other => panic!("the debugger's step must stop here, got {other:?}"),
    }
    // The next sync re-arms DR0 and keeps single-stepping.
    assert!(h.sync(&vcpu).expect("sync"));
    let held = vcpu.guest_debug().expect("set");
    assert_eq!(held.arch.debugreg[7] & 0b11, 0b10, "DR0 (G0) armed again");
    assert_eq!(
        held.control & ControlFlags::SINGLESTEP.bits(),
        ControlFlags::SINGLESTEP.bits()
    );
}

/// Bug 1, the other order: without a single-step request, the step over is
/// silent (the vCPU just goes on).
#[test]
fn bug1_step_over_alone_is_silent() {
    let dbg = VmDebug::new(memory());
    let vcpu = FakeVcpu::new();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h.sync(&vcpu).expect("sync");
    h.handle_exit(&vcpu, &exit(1, 0x1000, DR6_B0)).expect("exit");
    h.step_over();
    h.sync(&vcpu).expect("sync");
    assert_eq!(
        h.handle_exit(&vcpu, &exit(1, 0x1003, DR6_STEP)).expect("exit"),
        Handled::Resume(Resume::SteppedOver)
    );
}

/// Bug 2: insert by virtual address (→ gpa 0x2000), then remove-all: the
/// byte at the recorded guest-physical address is restored — it used to be
/// looked up by the virtual address, declared "overwritten by the guest" and
/// forgotten with `0xCC` left in memory.
#[test]
fn bug2_remove_all_after_a_virtual_insert_restores_the_recorded_physical_byte() {
    let mem = memory();
    let original = byte(&mem, 0x2000);
    let dbg = VmDebug::new(mem.clone());
    let vcpu = FakeVcpu::new();
    vcpu.map(0x1000, 0x2000, 0x1000);
    dbg.insert(AddressSpace::Virtual(&vcpu), BreakpointType::Software, 0x1000, 1)
        .expect("insert");
    assert_eq!(byte(&mem, 0x2000), 0xCC);
    assert_eq!(
        byte(&mem, 0x1000),
        memory_byte_at(0x1000),
        "the virtual address itself untouched"
    );
    let translations = vcpu.count(Op::Translate);
    let report = dbg.remove_all().expect("remove all");
    assert_eq!(report.restored, 1, "{report:?}");
    assert!(report.overwritten.is_empty() && report.is_complete(), "{report:?}");
    assert_eq!(byte(&mem, 0x2000), original);
    assert_eq!(
        vcpu.count(Op::Translate),
        translations,
        "remove-all never re-translates"
    );
    assert!(dbg.state().expect("state").sw().is_empty());
}

fn memory_byte_at(addr: u64) -> u8 {
    (addr % 251) as u8 | 1
}

/// Bug 2, single removes: a virtual remove finds the entry by its request,
/// not by translating again — even after the page tables changed.
#[test]
fn bug2_remove_by_virtual_address_uses_the_request_not_a_new_translation() {
    let mem = memory();
    let original = byte(&mem, 0x2000);
    let dbg = VmDebug::new(mem.clone());
    let vcpu = FakeVcpu::new();
    vcpu.map(0x1000, 0x2000, 0x1000);
    dbg.insert(AddressSpace::Virtual(&vcpu), BreakpointType::Software, 0x1000, 1)
        .expect("insert");
    assert_eq!(dbg.requests_at(0x2000).expect("requests")[0].space, SpaceKind::Virtual);
    // The guest switched page tables: 0x1000 no longer maps to 0x2000.
    let other = FakeVcpu::new();
    other.without_identity();
    let removed = dbg
        .remove(AddressSpace::Virtual(&other), BreakpointType::Software, 0x1000, 1)
        .expect("remove");
    assert_eq!(removed, Removed::Software(SwRemoved::Restored));
    assert_eq!(byte(&mem, 0x2000), original);
    assert_eq!(other.count(Op::Translate), 0);
    // A physical remove of the same number is another request: not found.
    dbg.insert(AddressSpace::Virtual(&vcpu), BreakpointType::Software, 0x1000, 1)
        .expect("insert");
    let err = dbg
        .remove(PHYS, BreakpointType::Software, 0x1000, 1)
        .expect_err("no physical request at 0x1000");
    assert!(
        matches!(
            err,
            Error::Breakpoint(BreakpointError::Sw(SwError::NotFound { addr: 0x1000 }))
        ),
        "{err:?}"
    );
    assert_eq!(byte(&mem, 0x2000), 0xCC, "a failed remove changes nothing");
}

/// When the same virtual address was inserted under two translations (two
/// address spaces), a remove translates to tell them apart; it never
/// guesses.
#[test]
fn the_same_virtual_address_in_two_address_spaces_is_told_apart_by_translation() {
    let mem = memory();
    let dbg = VmDebug::new(mem.clone());
    let (a, b) = (FakeVcpu::new(), FakeVcpu::new());
    a.map(0x1000, 0x2000, 0x1000);
    b.map(0x1000, 0x5000, 0x1000);
    dbg.insert(AddressSpace::Virtual(&a), BreakpointType::Software, 0x1000, 1)
        .expect("a");
    dbg.insert(AddressSpace::Virtual(&b), BreakpointType::Software, 0x1000, 1)
        .expect("b");
    dbg.remove(AddressSpace::Virtual(&b), BreakpointType::Software, 0x1000, 1)
        .expect("remove b's");
    assert_eq!(byte(&mem, 0x5000), memory_byte_at(0x5000));
    assert_eq!(byte(&mem, 0x2000), 0xCC, "a's stays");
    let gone = FakeVcpu::new();
    gone.without_identity();
    dbg.insert(AddressSpace::Virtual(&b), BreakpointType::Software, 0x1000, 1)
        .expect("b again");
    assert!(
        dbg.remove(AddressSpace::Virtual(&gone), BreakpointType::Software, 0x1000, 1)
            .is_err(),
        "ambiguous and untranslatable: refused"
    );
    assert_eq!(
        (byte(&mem, 0x2000), byte(&mem, 0x5000)),
        (0xCC, 0xCC),
        "nothing changed"
    );
}

/// Bug 3: a software breakpoint set by physical address stops a vCPU that
/// runs it at a different linear address (its `#BP` used to be re-injected
/// into the guest as the guest's own).
#[test]
fn bug3_a_physically_set_int3_stops_at_any_linear_address_that_maps_it() {
    let mem = memory();
    let dbg = VmDebug::new(mem.clone());
    let vcpu = FakeVcpu::new();
    vcpu.map(0x4000_1000, 0x2000, 0x1000);
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    dbg.insert(PHYS, BreakpointType::Software, 0x2010, 1).expect("insert");
    h.sync(&vcpu).expect("sync");
    match h.handle_exit(&vcpu, &exit(3, 0x4000_1010, 0)).expect("exit") {
        Handled::Stop(ev) => assert_eq!(ev.stop, Stop::Software { addr: 0x4000_1010 }),
        other => panic!("our int3, reached through another mapping, was {other:?}"),
    }
    assert_eq!(vcpu.count(Op::SetGuestDebug), 1, "nothing injected");
    // And a #BP at an address whose physical byte is a guest int3 (not ours)
    // goes back to the guest.
    mem.write_obj(0xCCu8, GuestAddress(0x3000)).expect("guest int3");
    assert_eq!(
        h.handle_exit(&vcpu, &exit(3, 0x3000, 0)).expect("exit"),
        Handled::Resume(Resume::Reinjected(Exception::Breakpoint))
    );
}

/// Bug 4: a new handle (a debugger reconnecting) must not assume its vCPU
/// has debugging off: the old handle's breakpoint is still armed in KVM, and
/// its `#DB` would be re-injected into the guest as spurious.
#[test]
fn bug4_a_new_handles_first_sync_always_applies() {
    let vcpu = FakeVcpu::new();
    {
        let old = VmDebug::new(memory());
        let mut h = old.vcpu(0).expect("vCPU handle");
        old.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
        h.sync(&vcpu).expect("sync");
        // The old debugger goes away without cleaning up.
    }
    let armed = vcpu.guest_debug().expect("armed");
    assert_ne!(armed.control, 0, "KVM still holds the old configuration");
    let new = VmDebug::new(memory());
    let mut h = new.vcpu(0).expect("vCPU handle");
    assert!(h.sync(&vcpu).expect("sync"), "the first sync applies even 'nothing'");
    assert_eq!(vcpu.guest_debug().expect("set").control, 0, "debugging off in KVM too");
    assert_eq!(
        h.applied().map(|a| *a.config()),
        Some(x86_debugreg::GuestDebug::DISABLED)
    );
}

/// Bug 5: one rule for duplicates — a second insert of the same breakpoint
/// counts, for hardware as for software; each remove undoes one insert.
#[test]
fn bug5_hardware_and_software_duplicates_both_count() {
    let mem = memory();
    let dbg = VmDebug::new(mem.clone());
    for ty in [
        BreakpointType::Hardware,
        BreakpointType::WriteWatch,
        BreakpointType::Software,
    ] {
        let addr = 0x1000;
        let first = dbg.insert(PHYS, ty, addr, 1).expect("first");
        let second = dbg.insert(PHYS, ty, addr, 1).expect("second");
        if ty != BreakpointType::Software {
            assert_eq!(first, second, "{ty:?}: same slot");
            assert!(matches!(second, kvm_glue::Insert::Inserted(Inserted::Hardware(_))));
        }
        dbg.remove(PHYS, ty, addr, 1).expect("first remove");
        let (slots, sw) = (dbg.watch_slots().expect("slots"), dbg.state().expect("state"));
        assert!(slots.used() + sw.sw().len() == 1, "{ty:?}: one use left, still set");
        dbg.remove(PHYS, ty, addr, 1).expect("second remove");
        let (slots, sw) = (dbg.watch_slots().expect("slots"), dbg.state().expect("state"));
        assert!(slots.is_empty() && sw.sw().is_empty(), "{ty:?}: gone with the last");
        assert!(
            dbg.remove(PHYS, ty, addr, 1).is_err(),
            "{ty:?}: a third remove is not found"
        );
    }
    assert_eq!(byte(&mem, 0x1000), memory_byte_at(0x1000));
}

/// The guest's own single-step (its TF) arriving in the same `#DB` as a
/// debugger breakpoint: the stop is reported and the guest's `#DB` is
/// re-injected at the next sync, after the debugger resumes.
#[test]
fn the_guests_own_single_step_with_a_debugger_hit_is_reinjected_after_the_stop() {
    let dbg = VmDebug::new(memory());
    let vcpu = FakeVcpu::new();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    dbg.insert(PHYS, BreakpointType::WriteWatch, 0x2000, 4).expect("watch");
    h.sync(&vcpu).expect("sync");
    // BS (the guest's TF: the debugger is not single-stepping) and B0.
    let got = h.handle_exit(&vcpu, &exit(1, 0x1007, 0xffff_4ff1)).expect("exit");
    let Handled::Stop(ev) = got else { panic!("{got:?}") };
    assert!(matches!(ev.stop, Stop::Debug { single_step: false, .. }), "{ev:?}");
    let before = vcpu.count(Op::SetGuestDebug);
    assert!(h.sync(&vcpu).expect("sync"));
    assert_eq!(vcpu.count(Op::SetGuestDebug), before + 1);
    let last = vcpu.guest_debug().expect("set");
    assert_ne!(
        last.control & ControlFlags::INJECT_DB.bits(),
        0,
        "the guest's #DB goes back"
    );
    assert!(!h.sync(&vcpu).expect("sync"), "once");
}

/// Memory as GDB sees it: reads show the original bytes under an `int3`,
/// writes over one update the byte it will restore and keep the `int3`.
#[test]
fn debugger_memory_access_hides_int3_and_writes_through_to_the_saved_byte() {
    let mem = memory();
    let dbg = VmDebug::new(mem.clone());
    let vcpu = FakeVcpu::new();
    vcpu.map(0x4000_0000, 0x2000, 0x1000);
    vcpu.map(0x4000_1000, 0x7000, 0x1000); // the next virtual page is elsewhere
    let virt = AddressSpace::Virtual(&vcpu);
    dbg.insert(virt, BreakpointType::Software, 0x4000_0ffe, 1)
        .expect("insert");
    let mut buf = [0u8; 4];
    dbg.read_memory(virt, 0x4000_0ffe, &mut buf)
        .expect("read across the page edge");
    assert_eq!(
        buf,
        [
            memory_byte_at(0x2ffe),
            memory_byte_at(0x2fff),
            memory_byte_at(0x7000),
            memory_byte_at(0x7001)
        ]
    );
    dbg.write_memory(virt, 0x4000_0ffe, &[0x11, 0x22, 0x33, 0x44])
        .expect("write");
    assert_eq!(byte(&mem, 0x2ffe), 0xCC, "the int3 stays");
    assert_eq!((byte(&mem, 0x2fff), byte(&mem, 0x7000)), (0x22, 0x33));
    dbg.read_memory(virt, 0x4000_0ffe, &mut buf).expect("read");
    assert_eq!(buf, [0x11, 0x22, 0x33, 0x44]);
    dbg.remove_all().expect("remove all");
    assert_eq!(byte(&mem, 0x2ffe), 0x11, "the written byte is what the guest gets back");
    // A write that would run off guest memory changes nothing.
    let before = byte(&mem, 0xfffe);
    assert!(dbg.write_memory(PHYS, 0xfffe, &[1, 2, 3, 4]).is_err());
    assert_eq!(byte(&mem, 0xfffe), before);
}
