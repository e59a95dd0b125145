//! Region and read watchpoints on a real /dev/kvm (issue #12): an unaligned
//! region planned into three slots, and a read watchpoint whose value check
//! reads guest memory. Data watchpoints fire only on a full KVM: on our
//! machines' `kvm_pvm` each test prints one SKIPPED line (the probe's word),
//! and `.ci/nested-kvm` runs them on `kvm_amd`.

mod common;

use common::{guest_for, resume, Event};
use kvm_glue::guest::{self, Exit, Guest};
use kvm_glue::{AddressSpace, StopEvent, VmDebug};
use vm_memory::{Bytes, GuestAddress};
use x86_debugreg::watch::{Watch, WatchKind};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;

/// A stop and the user's watchpoints it named: (address, length, kind).
type Named = (StopEvent, Vec<(u64, u64, WatchKind)>);

/// Runs the data-access routine with `rax` = `rax`, collecting every stop
/// and the watchpoints each named, until its end.
fn run_data_access(g: &mut Guest, dbg: &VmDebug<vm_memory::GuestMemoryMmap>, rax: u64) -> Vec<Named> {
    g.start(0, guest::DATA_ACCESS).expect("start");
    let mut regs = g.vcpu(0).get_regs().expect("regs");
    regs.rax = rax;
    g.vcpu(0).set_regs(&regs).expect("regs");
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let mut stops = Vec::new();
    for _ in 0..16 {
        match resume(&mut h, g.vcpu(0)) {
            Event::Stop(ev) => {
                let named = dbg
                    .watch_hits(&ev)
                    .expect("hits")
                    .iter()
                    .map(|w| (w.watch.addr(), w.watch.len(), w.watch.kind()))
                    .collect();
                stops.push((ev, named));
            }
            Event::Exit(Exit::Out(guest::PORT_DONE, _)) => return stops,
            Event::Exit(other) => panic!("unexpected exit {other:?} after {stops:x?}"),
        }
    }
    panic!("no end after 16 stops: {stops:x?}");
}

/// A write watchpoint on 6 bytes at `DATA + 3` (pieces `+3/1`, `+4/4`,
/// `+8/1`) stops after every write that overlaps `[DATA+3, DATA+9)` — the
/// 1-byte write at `+8` and the 4- and 8-byte writes at `DATA` — and each
/// stop names the user's watchpoint, not a piece.
#[test]
fn an_unaligned_region_stops_on_every_overlapping_write_and_names_the_user_watch() {
    let check = "region watchpoint";
    let Some(mut g) = guest_for(check, 1, |p| &p.write_watch) else {
        return;
    };
    let dbg = VmDebug::new(g.memory().clone());
    let w = Watch::new(WatchKind::Write, guest::DATA + 3, 6).expect("watch");
    assert_eq!(
        dbg.insert_watch(PHYS, w).expect("insert").map(|m| m.bits()),
        Some(0b111)
    );
    let stops = run_data_access(&mut g, &dbg, 0x1122_3344_5566_7788);
    let a = guest::DATA_ACCESSES;
    let want: Vec<u64> = [a[0].next, a[3].next, a[4].next].into();
    let got: Vec<u64> = stops.iter().map(|(ev, _)| ev.pc).collect();
    assert_eq!(got, want, "pcs after the overlapping writes");
    for (ev, named) in &stops {
        assert_eq!(named, &[(guest::DATA + 3, 6, WatchKind::Write)], "{ev}");
    }
    println!(
        "{check}: checked 6 bytes at an odd address in 3 slots: stops at {got:#x?}, each naming the user's watchpoint"
    );
}

/// A read watchpoint on `DATA + 8`: the routine first writes `al` (0x88)
/// there — the bytes change, so no stop — then reads it back: one stop.
#[test]
fn a_read_watch_ignores_the_write_and_stops_at_the_read() {
    let check = "read watchpoint";
    let Some(mut g) = guest_for(check, 1, |p| &p.rw_watch) else {
        return;
    };
    g.memory()
        .write_slice(&[0u8; 16], GuestAddress(guest::DATA))
        .expect("zero the data");
    let dbg = VmDebug::new(g.memory().clone());
    let r = Watch::new(WatchKind::Read, guest::DATA + 8, 1).expect("watch");
    dbg.insert_watch(PHYS, r).expect("insert").expect("fits");
    let stops = run_data_access(&mut g, &dbg, 0x1122_3344_5566_7788);
    let read_back = guest::DATA_ACCESSES[5];
    assert!(!read_back.write && read_back.addr == guest::DATA + 8);
    let pcs: Vec<u64> = stops.iter().map(|(ev, _)| ev.pc).collect();
    assert_eq!(pcs, [read_back.next], "one stop, after the read");
    assert_eq!(stops[0].1, [(guest::DATA + 8, 1, WatchKind::Read)]);
    println!(
        "{check}: checked the write of 0x88 was not reported and the read at {:#x} was",
        read_back.insn
    );
}
