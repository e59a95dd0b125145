//! The CPU oracle for planned regions (issue #12): a watchpoint on an
//! unaligned region, planned into pieces by [`WatchSlots`] and programmed into
//! this machine's debug registers through ptrace (the harness in `oracle/`),
//! fires for every byte inside the region and for no byte outside.
//!
//! For each region the child makes 1-byte loads and stores at every offset
//! from 8 bytes before the region to 8 bytes after its end; the DR6 B-bits the
//! CPU reports (masked to the enabled slots, see `tests/cpu_oracle.rs`) must
//! be non-empty exactly for the offsets inside — for loads only when the
//! watchpoint watches reads — and must map back, through
//! [`WatchSlots::hits_in_mask`], to the user's watchpoints with their own
//! address and length. Expected answers come from the offset alone (inside
//! `0..len` or not), never from the planner.
//!
//! An outcome that disagrees, or that the harness cannot classify, is re-run
//! in a fresh child and fails only if it reproduces there (`oracle/rerun.rs`,
//! issue #15); `ORACLE_REPEAT` repeats each test. If the host forbids ptrace,
//! one line says so and nothing is checked. Linux x86-64 only.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

// The harness serves tests/cpu_oracle.rs too; this file uses part of it.
#[allow(dead_code, unused_imports)]
mod oracle;

use oracle::{buffer_addr, repeated, Access, AccessKind, Checker, BUFFER_LEN};
use x86_debugreg::predict::SlotMask;
use x86_debugreg::region::Mode;
use x86_debugreg::watch::{Watch, WatchKind, WatchSlots};

/// Bytes probed on each side of a region.
const MARGIN: i64 = 8;

/// What one sweep saw.
#[derive(Default)]
struct Tally {
    accesses: u64,
    hits: u64,
}

/// The CPU's B-bits of the enabled slots for an access of `size` bytes,
/// which must name exactly the watchpoints `expected` (re-run in a fresh
/// child if they do not).
///
/// # Panics
/// If they do not in the fresh child either.
fn cpu_mask(
    c: &mut Checker,
    slots: &WatchSlots,
    access: Access,
    expected: &[Watch],
    offset_in_region: i64,
) -> SlotMask {
    let (dr, dr7) = (slots.addresses(), slots.dr7());
    let enabled = SlotMask::enabled(dr7);
    let raw = c
        .ask(
            || {
                format!(
                    "{:?} of {} bytes at {:#x} (region offset {offset_in_region}), DR0-3 {dr:x?}, DR7 {:#x}",
                    access.kind,
                    access.size,
                    access.addr,
                    dr7.into_bits()
                )
            },
            |o| o.cpu_hits(dr, dr7.into_bits(), access),
            |&raw| {
                let mask = SlotMask::from_bits_truncate(raw).intersection(enabled);
                let named: Vec<Watch> = slots.hits_in_mask(mask).iter().map(|h| h.watch).collect();
                if named == expected && mask.is_empty() == expected.is_empty() {
                    Ok(())
                } else {
                    Err(format!("the CPU set {mask}, naming {named:?}; expected {expected:?}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("oracle: {e}"));
    SlotMask::from_bits_truncate(raw).intersection(enabled)
}

/// Sweeps loads and stores of each width in `sizes` starting from `MARGIN`
/// bytes before the regions in `watches` to `MARGIN` after them, with all of
/// them set at once. An access must name exactly the watchpoints whose
/// region it overlaps and whose kind it matches, in order of insertion.
fn sweep(c: &mut Checker, mode: Mode, watches: &[Watch], sizes: &[u8], tally: &mut Tally) {
    let mut slots = WatchSlots::new(mode);
    for w in watches {
        slots.insert(*w).unwrap_or_else(|e| panic!("{w} does not fit: {e}"));
    }
    let lo = watches.iter().map(|w| w.addr()).min().expect("a watchpoint") as i64 - MARGIN;
    let hi = watches.iter().map(|w| w.addr() + w.len()).max().expect("a watchpoint") as i64 + MARGIN;
    for at in lo..hi {
        let at = at as u64;
        assert!(
            at >= buffer_addr() && at < buffer_addr() + BUFFER_LEN as u64,
            "{at:#x} is outside the child's buffer"
        );
        for (&size, kind) in sizes
            .iter()
            .flat_map(|s| [(s, AccessKind::Read), (s, AccessKind::Write)])
        {
            // By hand: a watchpoint fires when the access overlaps its region
            // and it watches this kind of access.
            let expected: Vec<Watch> = watches
                .iter()
                .filter(|w| at < w.addr() + w.len() && w.addr() < at + u64::from(size))
                .filter(|w| kind == AccessKind::Write || w.kind() != WatchKind::Write)
                .copied()
                .collect();
            let access = Access { addr: at, size, kind };
            let mask = cpu_mask(c, &slots, access, &expected, at as i64 - watches[0].addr() as i64);
            tally.accesses += 1;
            tally.hits += u64::from(!mask.is_empty());
        }
    }
}

fn run(what: &str, sizes: &[u8], cases: &[(Mode, Vec<Watch>)]) {
    repeated(what, |c| {
        let mut tally = Tally::default();
        for (mode, watches) in cases {
            sweep(c, *mode, watches, sizes, &mut tally);
        }
        println!(
            "oracle regions: {what}: {} accesses ({sizes:?} bytes) checked against the CPU, {} hit",
            tally.accesses, tally.hits
        );
        assert!(tally.hits > 0 && tally.hits < tally.accesses);
    });
}

fn watch(kind: WatchKind, offset: u64, len: u64) -> Watch {
    Watch::new(kind, buffer_addr() + offset, len).expect("valid region")
}

#[test]
fn oracle_six_bytes_at_an_odd_address_fire_for_every_byte_inside_and_none_outside() {
    // Offset 0x803: pieces 0x803/1, 0x804/4, 0x808/1 (the buffer is
    // page-aligned, so offsets have the addresses' alignment).
    run(
        "6 bytes at an odd address",
        &[1],
        &[
            (Mode::Long, vec![watch(WatchKind::Write, 0x803, 6)]),
            (Mode::Long, vec![watch(WatchKind::ReadWrite, 0x803, 6)]),
            (Mode::Long, vec![watch(WatchKind::Read, 0x803, 6)]),
        ],
    );
}

#[test]
fn oracle_a_twelve_byte_struct_fires_for_every_byte_inside_and_none_outside() {
    // Offset 0x904: 0x904/4 + 0x908/8 in 64-bit mode, three of 4 otherwise.
    run(
        "12 bytes at a 4-aligned address",
        &[1],
        &[
            (Mode::Long, vec![watch(WatchKind::Write, 0x904, 12)]),
            (Mode::Long, vec![watch(WatchKind::ReadWrite, 0x904, 12)]),
            (Mode::Legacy, vec![watch(WatchKind::ReadWrite, 0x904, 12)]),
        ],
    );
}

#[test]
fn oracle_regions_across_a_page_boundary_and_of_odd_lengths() {
    // Wider accesses too: one that straddles an edge of the region fires.
    run(
        "odd regions",
        &[1, 2, 4, 8],
        &[
            // 0xffd/1, 0xffe/2, 0x1000/4: across the page boundary.
            (Mode::Long, vec![watch(WatchKind::ReadWrite, 0xffd, 7)]),
            // 0xa01/1, 0xa02/2.
            (Mode::Long, vec![watch(WatchKind::Write, 0xa01, 3)]),
            // 0xb06/2, 0xb08/8.
            (Mode::Long, vec![watch(WatchKind::ReadWrite, 0xb06, 10)]),
        ],
    );
}

#[test]
fn oracle_a_shared_slot_names_both_owners() {
    // 0xc03/6 is 0xc03/1, 0xc04/4, 0xc08/1; 0xc04/4 shares its middle
    // slot. A byte of 0xc04..0xc08 must name both watchpoints, 0xc03 and
    // 0xc08 only the first.
    run(
        "shared slots",
        &[1],
        &[(
            Mode::Long,
            vec![watch(WatchKind::Write, 0xc03, 6), watch(WatchKind::Write, 0xc04, 4)],
        )],
    );
}
