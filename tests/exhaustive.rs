//! Exhaustive bounded check: **every** sequence of up to `DEPTH` operations
//! over a small alphabet, run through the typed model and the reference in
//! lock-step, compared after every operation (outcome, DR0–3/DR7, control
//! flags, tables, memory) with the invariants checked. Exhaustive within the
//! bound; the property suites cover longer, random sequences.
//!
//! The alphabet (16 operations) is chosen so that depth 5 already reaches every
//! interesting state: five distinct valid hardware breakpoints (so the fifth
//! finds the slots full), a duplicate, a misaligned watchpoint, a software
//! breakpoint, memory that starts failing writes under it, a guest write
//! over a patched `0xCC`, remove-all, single-step, applying the configuration
//! and decoding a `#DB` with B0|B1|BS and a `#BP` at the breakpoint.
//!
//! Default depth 6 with 16 operations: 16^6 = 16 777 216 sequences of
//! length 6, 17 895 696 sequences of length 1–6 in all (each prefix is
//! checked once, as it is walked), ~10 s. `EXHAUSTIVE_DEPTH` changes the
//! depth (each level costs 16× more).

mod common;

use std::time::Instant;

use common::{cases, memory};
use x86_debugreg::differential::{Lockstep, Op};
use x86_debugreg::DebugExit;

const A: u64 = 0x10;

fn alphabet() -> Vec<Op> {
    vec![
        Op::Insert { ty: 0, addr: A, len: 1 },
        Op::Poison {
            addr: A,
            reads: false,
            writes: true,
        },
        Op::Remove { ty: 0, addr: A, len: 1 },
        Op::Insert { ty: 1, addr: A, len: 1 },
        Op::Insert {
            ty: 1,
            addr: 0x30,
            len: 1,
        },
        Op::Insert {
            ty: 2,
            addr: 0x08,
            len: 4,
        },
        Op::Insert {
            ty: 4,
            addr: 0x08,
            len: 8,
        },
        Op::Insert {
            ty: 2,
            addr: 0x0a,
            len: 4,
        },
        Op::Insert {
            ty: 4,
            addr: 0x00,
            len: 2,
        },
        Op::Remove {
            ty: 2,
            addr: 0x08,
            len: 4,
        },
        Op::RemoveAll,
        Op::SingleStep(true),
        Op::GuestWrite { addr: A, value: 0x90 },
        Op::Apply,
        Op::Decode(DebugExit {
            exception: 1,
            pc: A,
            dr6: 0xffff_4ff3,
            dr7: 0,
        }),
        Op::Decode(DebugExit {
            exception: 3,
            pc: A,
            dr6: 0xffff_0ff0,
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

/// Every sequence of ≤ 6 operations from the alphabet agrees with the
/// reference and keeps the invariants.
#[test]
fn every_sequence_up_to_depth_agrees_with_reference() {
    let depth = cases("EXHAUSTIVE_DEPTH", 6);
    let alphabet = alphabet();
    let start = Instant::now();
    let mut count = 0;
    explore(&Lockstep::new(memory()), &alphabet, depth, &mut Vec::new(), &mut count);
    let expected: u64 = (1..=depth).map(|d| (alphabet.len() as u64).pow(d)).sum();
    assert_eq!(count, expected, "the walk must visit every sequence");
    println!(
        "exhaustive: depth {depth}, alphabet {}, {count} sequences (every length 1..={depth}), {:.1} s",
        alphabet.len(),
        start.elapsed().as_secs_f64()
    );
}
