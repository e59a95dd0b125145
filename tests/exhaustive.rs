//! Exhaustive bounded check: **every** sequence of up to a depth of
//! operations over small alphabets, run through the typed model and the
//! reference in lock-step, compared after every operation (full outcome,
//! DR0–3/DR7, control flags, tables, memory) with the invariants checked.
//! Exhaustive within the bound; the property suites cover longer, random
//! sequences.
//!
//! Three alphabets, each with the depth that keeps it to a few seconds (a
//! sequence costs about a microsecond; `--nocapture` prints the counts):
//!
//! * **mixed** (16 operations, depth 5: 1 118 480 sequences): five distinct
//!   valid hardware breakpoints (so the fifth finds the slots full), a
//!   duplicate, a misaligned watchpoint, a software breakpoint, memory that
//!   starts failing writes under it, a guest write over a patched `0xCC`,
//!   remove-all, single-step, applying the configuration and decoding a `#DB`
//!   with B0|B1|BS and a `#BP` at the breakpoint.
//! * **software** (16 operations, depth 6: 17 895 696 sequences): two
//!   breakpoint addresses, inserts that count up and removes that count
//!   down, reads and writes failing and healing, the guest writing `0x90` or
//!   `0xCC` over a live `int3`, remove-all, `#BP` at each address and beside
//!   them, and the types that are not software or hardware (3, 5, 2⁶⁴−1).
//! * **hardware** (20 operations, depth 5: 3 368 420 sequences): execute,
//!   write and access breakpoints inserted *and removed*, a misaligned and a
//!   bad-length watch, a read watch, single-step on and off, applying, and
//!   `#DB` exits with every B-bit (B2 and B3 included), BS in both KVM
//!   forms, and a vector that is neither 1 nor 3.
//!
//! `EXHAUSTIVE_DEPTH` sets one depth for all three (each level multiplies
//! the count by the alphabet's size); `.ci/mutants` uses 3.

mod common;

use std::time::Instant;

use common::{cases, memory};
use x86_debugreg::differential::{Lockstep, Op};
use x86_debugreg::DebugExit;

const A: u64 = 0x10;

fn db(dr6: u64) -> Op {
    Op::Decode(DebugExit {
        exception: 1,
        pc: A,
        dr6,
        dr7: 0,
    })
}

fn bp_at(pc: u64) -> Op {
    Op::Decode(DebugExit {
        exception: 3,
        pc,
        dr6: 0xffff_0ff0,
        dr7: 0,
    })
}

fn insert(ty: u64, addr: u64, len: u64) -> Op {
    Op::Insert { ty, addr, len }
}

fn remove(ty: u64, addr: u64, len: u64) -> Op {
    Op::Remove { ty, addr, len }
}

fn poison(addr: u64, reads: bool, writes: bool) -> Op {
    Op::Poison { addr, reads, writes }
}

fn mixed() -> Vec<Op> {
    vec![
        insert(0, A, 1),
        poison(A, false, true),
        remove(0, A, 1),
        insert(1, A, 1),
        insert(1, 0x30, 1),
        insert(2, 0x08, 4),
        insert(4, 0x08, 8),
        insert(2, 0x0a, 4),
        insert(4, 0x00, 2),
        remove(2, 0x08, 4),
        Op::RemoveAll,
        Op::SingleStep(true),
        Op::GuestWrite { addr: A, value: 0x90 },
        Op::Apply,
        db(0xffff_4ff3),
        bp_at(A),
    ]
}

fn software() -> Vec<Op> {
    const B: u64 = 0x11;
    vec![
        insert(0, A, 1),
        insert(0, B, 1),
        remove(0, A, 1),
        remove(0, B, 1),
        poison(A, false, true),
        poison(B, true, false),
        poison(A, false, false),
        Op::GuestWrite { addr: A, value: 0x90 },
        Op::GuestWrite { addr: B, value: 0xcc },
        Op::RemoveAll,
        bp_at(A),
        bp_at(B),
        bp_at(0x12),
        insert(3, A, 1),
        insert(5, B, 1),
        remove(u64::MAX, A, 1),
    ]
}

fn hardware() -> Vec<Op> {
    vec![
        insert(1, A, 1),
        remove(1, A, 1),
        insert(4, 0x08, 8),
        remove(4, 0x08, 8),
        insert(2, 0x08, 4),
        remove(2, 0x08, 4),
        insert(2, 0x04, 2),
        insert(4, 0x0a, 4),
        insert(2, 0x08, 3),
        remove(3, 0x08, 4),
        Op::SingleStep(true),
        Op::SingleStep(false),
        Op::Apply,
        db(0xffff_0ff1),
        db(0xffff_0ff6),
        db(0xffff_0ff8),
        db(0xffff_0fff),
        db(0xfffe_4ff0),
        db(0xffff_4ff4),
        Op::Decode(DebugExit {
            exception: 2,
            pc: A,
            dr6: 0xffff_0ff1,
            dr7: 0,
        }),
    ]
}

fn explore(state: &Lockstep, alphabet: &[Op], depth: u32, trail: &mut Vec<Op>, count: &mut u64) {
    if depth == 0 {
        return;
    }
    for op in alphabet {
        let mut next = state.clone();
        trail.push(op.clone());
        if let Err(m) = next.step(op) {
            panic!("sequence {trail:x?}: {m}");
        }
        *count += 1;
        explore(&next, alphabet, depth - 1, trail, count);
        trail.pop();
    }
}

/// Walks every sequence of `alphabet` up to its depth (or `EXHAUSTIVE_DEPTH`).
fn walk(name: &str, alphabet: &[Op], default_depth: u32) {
    let depth = cases("EXHAUSTIVE_DEPTH", default_depth);
    let start = Instant::now();
    let mut count = 0;
    explore(&Lockstep::new(memory()), alphabet, depth, &mut Vec::new(), &mut count);
    let expected: u64 = (1..=depth).map(|d| (alphabet.len() as u64).pow(d)).sum();
    assert_eq!(count, expected, "the walk must visit every sequence");
    println!(
        "exhaustive {name}: depth {depth}, alphabet {}, {count} sequences (every length 1..={depth}), {:.1} s",
        alphabet.len(),
        start.elapsed().as_secs_f64()
    );
}

/// Every sequence of ≤ 5 mixed operations agrees with the reference and
/// keeps the invariants.
#[test]
fn every_mixed_sequence_up_to_depth_agrees_with_reference() {
    walk("mixed", &mixed(), 5);
}

/// Every sequence of ≤ 6 software-breakpoint operations agrees.
#[test]
fn every_software_sequence_up_to_depth_agrees_with_reference() {
    walk("software", &software(), 6);
}

/// Every sequence of ≤ 5 hardware-slot and decode operations agrees.
#[test]
fn every_hardware_sequence_up_to_depth_agrees_with_reference() {
    walk("hardware", &hardware(), 5);
}
