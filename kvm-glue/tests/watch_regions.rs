//! Watching any region through kvm-glue (issue #12): planned pieces applied
//! by `sync`, stops named by the user's watchpoint, read watchpoints by value
//! check against guest memory. On fake vCPUs (runs everywhere; data
//! watchpoints fire on a full KVM only, which the nested lane provides).

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::FakeVcpu;
use kvm_glue::{AddressSpace, Error, Handled, Resume, Stop, VmDebug};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86_debugreg::watch::{Watch, WatchKind};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;

fn setup() -> (GuestMemoryMmap, VmDebug<GuestMemoryMmap>, FakeVcpu) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mmap");
    (mem.clone(), VmDebug::new(mem), FakeVcpu::new())
}

/// A `#DB` with DR6 B-bits `mask` over the at-rest value 0xffff0ff0 (SDM
/// Vol. 3B §18.2.3).
fn db(pc: u64, mask: u64) -> kvm_debug_exit_arch {
    kvm_debug_exit_arch {
        exception: 1,
        pad: 0,
        pc,
        dr6: 0xffff_0ff0 | mask,
        dr7: 0,
    }
}

#[test]
fn a_six_byte_write_watch_at_an_odd_address_takes_three_slots_as_planned() {
    let (_, dbg, vcpu) = setup();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let w = Watch::new(WatchKind::Write, 0x1003, 6).expect("watch");
    let slots = dbg.insert_watch(PHYS, w).expect("insert").expect("fits");
    assert_eq!(slots.bits(), 0b111);
    h.sync(&vcpu).expect("sync");
    let held = vcpu.guest_debug().expect("set");
    // Pieces 0x1003/1, 0x1004/4, 0x1008/1; DR7 by hand: 0x400 fixed | GE 0x200
    // | G0 G1 G2 (bits 1, 3, 5) | R/W 01 LEN 00 at 16, R/W 01 LEN 11 at 20,
    // R/W 01 LEN 00 at 24.
    assert_eq!(held.arch.debugreg[..4], [0x1003, 0x1004, 0x1008, 0]);
    assert_eq!(
        held.arch.debugreg[7],
        0x600 | 0b10_1010 | 0x1 << 16 | 0xd << 20 | 0x1 << 24
    );
    // DR2 (the last byte) fires: the stop names the user's watchpoint.
    let Handled::Stop(ev) = h.handle_exit(&vcpu, &db(0x5000, 0b100)).expect("exit") else {
        panic!("the debugger's watchpoint")
    };
    let named: Vec<(u64, u64)> = dbg
        .watch_hits(&ev)
        .expect("hits")
        .iter()
        .map(|h| (h.watch.addr(), h.watch.len()))
        .collect();
    assert_eq!(named, [(0x1003, 6)]);
    dbg.remove_watch(w).expect("remove");
    assert!(dbg.watch_slots().expect("slots").is_empty());
}

#[test]
fn a_region_that_does_not_fit_is_no_free_slot_and_changes_nothing() {
    let (_, dbg, _) = setup();
    let big = Watch::new(WatchKind::Write, 0x1000, 24).expect("watch"); // 3 x 8
    dbg.insert_watch(PHYS, big).expect("insert").expect("fits");
    let before = dbg.watch_slots().expect("slots");
    let odd = Watch::new(WatchKind::ReadWrite, 0x2001, 3).expect("watch"); // 2 pieces
    assert_eq!(dbg.insert_watch(PHYS, odd).expect("answer"), None);
    assert_eq!(dbg.watch_slots().expect("slots"), before);
}

#[test]
fn a_read_watch_stops_only_when_the_value_did_not_change() {
    let (mem, dbg, vcpu) = setup();
    mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x2000)).expect("init");
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let r = Watch::new(WatchKind::Read, 0x2000, 4).expect("watch");
    dbg.insert_watch(PHYS, r).expect("insert").expect("fits");
    h.sync(&vcpu).expect("sync");
    // A read: bytes unchanged.
    let Handled::Stop(ev) = h.handle_exit(&vcpu, &db(0x5003, 0b1)).expect("exit") else {
        panic!("a read is reported")
    };
    assert_eq!(dbg.watch_hits(&ev).expect("hits").len(), 1);
    // A write: the bytes changed. Not a read: the guest runs on.
    mem.write_slice(&[9], GuestAddress(0x2001)).expect("guest write");
    assert_eq!(
        h.handle_exit(&vcpu, &db(0x5006, 0b1)).expect("exit"),
        Handled::Resume(Resume::NotARead { pc: 0x5006 })
    );
    // The saved bytes were refreshed at that hit: the next read stops again.
    assert!(matches!(
        h.handle_exit(&vcpu, &db(0x5009, 0b1)).expect("exit"),
        Handled::Stop(_)
    ));
}

#[test]
fn a_read_and_an_access_watch_share_a_slot_and_a_write_reports_only_the_access() {
    let (mem, dbg, vcpu) = setup();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let r = Watch::new(WatchKind::Read, 0x2000, 4).expect("watch");
    let a = Watch::new(WatchKind::ReadWrite, 0x2000, 4).expect("watch");
    dbg.insert_watch(PHYS, r).expect("insert").expect("fits");
    dbg.insert_watch(PHYS, a).expect("insert").expect("fits");
    assert_eq!(
        dbg.watch_slots().expect("slots").used(),
        1,
        "both are R/W 11 on the same 4 bytes"
    );
    h.sync(&vcpu).expect("sync");
    mem.write_slice(&[7], GuestAddress(0x2002)).expect("guest write");
    let Handled::Stop(ev) = h.handle_exit(&vcpu, &db(0x5003, 0b1)).expect("exit") else {
        panic!("the access watchpoint stops")
    };
    assert!(matches!(ev.stop, Stop::Debug { .. }));
    let kinds: Vec<WatchKind> = dbg
        .watch_hits(&ev)
        .expect("hits")
        .iter()
        .map(|h| h.watch.kind())
        .collect();
    assert_eq!(kinds, [WatchKind::ReadWrite], "the read watchpoint saw a write");
    // Removing one keeps the shared slot for the other.
    dbg.remove_watch(a).expect("remove");
    assert_eq!(dbg.watch_slots().expect("slots").used(), 1);
    dbg.remove_watch(r).expect("remove");
    assert!(dbg.watch_slots().expect("slots").is_empty());
}

#[test]
fn a_read_watch_whose_bytes_cannot_be_read_is_refused_and_changes_nothing() {
    let (_, dbg, vcpu) = setup();
    vcpu.without_identity();
    let r = Watch::new(WatchKind::Read, 0x9000, 4).expect("watch");
    let err = dbg.insert_watch(AddressSpace::Virtual(&vcpu), r).expect_err("unmapped");
    assert!(matches!(err, Error::Memory(_)), "{err:?}");
    assert!(dbg.watch_slots().expect("slots").is_empty());
}

#[test]
fn removing_a_watch_never_set_is_an_error_and_changes_nothing() {
    let (_, dbg, _) = setup();
    let w = Watch::new(WatchKind::Write, 0x1000, 4).expect("watch");
    dbg.insert_watch(PHYS, w).expect("insert");
    let other = Watch::new(WatchKind::Write, 0x1000, 2).expect("watch");
    assert!(matches!(dbg.remove_watch(other), Err(Error::Watch(_))));
    assert_eq!(dbg.watch_slots().expect("slots").used(), 1);
}

/// The debugger's own write under a read watchpoint is not the guest's: the
/// next read must still stop.
#[test]
fn a_debugger_write_under_a_read_watch_becomes_its_saved_value() {
    let (_, dbg, vcpu) = setup();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let r = Watch::new(WatchKind::Read, 0x2000, 4).expect("watch");
    dbg.insert_watch(PHYS, r).expect("insert").expect("fits");
    h.sync(&vcpu).expect("sync");
    dbg.write_memory(PHYS, 0x2001, &[9]).expect("GDB: set var");
    assert!(
        matches!(h.handle_exit(&vcpu, &db(0x5003, 0b1)).expect("exit"), Handled::Stop(_)),
        "the guest's read after the debugger's write is a read"
    );
}

/// Every reported stop refreshes the saved bytes (a device or another vCPU
/// may write between stops without the slot firing), so a read after such a
/// change still stops.
#[test]
fn read_watch_bytes_are_refreshed_at_every_stop() {
    let (mem, dbg, vcpu) = setup();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let r = Watch::new(WatchKind::Read, 0x2000, 4).expect("watch");
    dbg.insert_watch(PHYS, r).expect("insert").expect("fits");
    let x = Watch::new(WatchKind::Execute, 0x1000, 1).expect("breakpoint");
    dbg.insert_watch(PHYS, x).expect("insert").expect("fits");
    h.sync(&vcpu).expect("sync");
    mem.write_slice(&[5, 5], GuestAddress(0x2000)).expect("a device writes");
    // Another stop (the execute breakpoint in DR1) happens first...
    assert!(matches!(
        h.handle_exit(&vcpu, &db(0x1000, 0b10)).expect("exit"),
        Handled::Stop(_)
    ));
    // ...so the guest's read with the bytes as the device left them is a read.
    assert!(matches!(
        h.handle_exit(&vcpu, &db(0x5003, 0b1)).expect("exit"),
        Handled::Stop(_)
    ));
}
