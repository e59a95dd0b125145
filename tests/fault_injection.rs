//! Fault injection: a memory that fails its k-th access, for every k.
//!
//! * insert and remove either succeed or leave the table, the slots and every
//!   byte of memory exactly as before (DESIGN.md: "an operation that fails
//!   changes nothing");
//! * remove-all restores what it can, reports exactly the addresses it could
//!   not, keeps exactly those entries (untouched), and a later remove-all
//!   with healthy memory finishes the job byte for byte.

mod common;

use common::memory;
use x86_debugreg::differential::TestMemory;
use x86_debugreg::{BreakpointType, DebugState};

const SW: BreakpointType = BreakpointType::Software;

/// A state with software breakpoints at 0x1, 0x2 (count 2), 0x3 and 0x5,
/// a hardware slot, and the guest's rewrite of 0x5.
fn populated() -> (DebugState, TestMemory, Vec<u8>) {
    let mut mem = memory();
    let original = mem.bytes.clone();
    let mut state = DebugState::new();
    for addr in [0x1, 0x2, 0x2, 0x3, 0x5] {
        state.insert(&mut mem, SW, addr, 1).expect("healthy memory");
    }
    state
        .insert(&mut mem, BreakpointType::Hardware, 0x30, 1)
        .expect("free slot");
    mem.bytes[0x5] = 0x90; // the guest rewrites one int3
    let mut guest_view = original;
    guest_view[0x5] = 0x90;
    (state, mem, guest_view)
}

/// Runs `op` with the k-th access failing, for k = 0, 1, … until an attempt
/// makes no failing access; every failed attempt must change nothing.
/// Returns how many attempts failed.
fn for_every_fault<T, E: std::fmt::Debug>(
    state: &DebugState,
    mem: &TestMemory,
    op: impl Fn(&mut DebugState, &mut TestMemory) -> Result<T, E>,
) -> u64 {
    for k in 0.. {
        let (mut s, mut m) = (state.clone(), mem.clone());
        m.fail_at = Some(m.accesses + k);
        match op(&mut s, &mut m) {
            Err(_) => {
                assert_eq!(s, *state, "fault at access {k} changed the state");
                assert_eq!(m.bytes, mem.bytes, "fault at access {k} changed memory");
            }
            Ok(_) => {
                assert!(m.accesses <= mem.accesses + k, "success although access {k} failed");
                return k;
            }
        }
    }
    unreachable!("the loop returns once k passes the operation's accesses")
}

#[test]
fn failed_insert_of_new_software_breakpoint_changes_nothing_for_every_fault() {
    let (state, mem, _) = populated();
    // Read the original byte, then write 0xCC: two accesses, two faults.
    assert_eq!(for_every_fault(&state, &mem, |s, m| s.insert(m, SW, 0x10, 1)), 2);
}

#[test]
fn counted_insert_and_remove_touch_no_memory() {
    let (state, mem, _) = populated();
    assert_eq!(for_every_fault(&state, &mem, |s, m| s.insert(m, SW, 0x2, 1)), 0);
    assert_eq!(for_every_fault(&state, &mem, |s, m| s.remove(m, SW, 0x2, 1)), 0);
}

#[test]
fn failed_last_remove_changes_nothing_for_every_fault() {
    let (state, mem, _) = populated();
    // Read back the 0xCC, then write the saved byte.
    assert_eq!(for_every_fault(&state, &mem, |s, m| s.remove(m, SW, 0x1, 1)), 2);
    // The guest rewrote 0x5: one read, no write.
    assert_eq!(for_every_fault(&state, &mem, |s, m| s.remove(m, SW, 0x5, 1)), 1);
}

#[test]
fn remove_all_reports_exactly_what_it_could_not_restore_for_every_fault() {
    let (state, mem, guest_view) = populated();
    let mut faults_seen = 0;
    for k in 0..16 {
        let (mut s, mut m) = (state.clone(), mem.clone());
        m.fail_at = Some(m.accesses + k);
        let report = s.remove_all(&mut m);
        let failed: Vec<u64> = report.failed.iter().map(|(a, _)| *a).collect();
        let kept: Vec<u64> = s.sw().iter().map(|(a, _)| a).collect();
        assert_eq!(failed, kept, "k={k}: reported failures are exactly the entries kept");
        assert!(failed.len() <= 1, "k={k}: one fault, at most one failure");
        assert!(s.hw().is_empty(), "k={k}: hardware slots are always freed");
        for &addr in &failed {
            assert_eq!(
                s.sw().get(addr),
                state.sw().get(addr),
                "k={k}: a kept entry is unchanged"
            );
            assert_eq!(
                m.bytes[addr as usize], mem.bytes[addr as usize],
                "k={k}: a kept entry's byte is untouched"
            );
        }
        for (i, (&have, &want)) in m.bytes.iter().zip(&guest_view).enumerate() {
            if !failed.contains(&(i as u64)) {
                assert_eq!(have, want, "k={k}: byte {i:#x} restored");
            }
        }
        assert_eq!(
            report.overwritten,
            if failed.contains(&0x5) { vec![] } else { vec![0x5] }
        );
        // Healthy memory finishes the job: memory is the guest's, byte for byte.
        m.fail_at = None;
        let again = s.remove_all(&mut m);
        assert!(again.is_complete() && s.sw().is_empty());
        assert_eq!(m.bytes, guest_view, "k={k}: byte-exact after a second remove-all");
        faults_seen += u64::from(!failed.is_empty());
    }
    // 0x1, 0x2, 0x3: read + write each; 0x5: read only → 7 accesses can fail.
    assert_eq!(faults_seen, 7);
}
