//! The typed `DebugState` (system under test) against the integer-level
//! reference (`ReferenceStateMachine`), with `proptest-state-machine`.
//!
//! Transitions: insert/remove of every GDB type (and unknown ones) with
//! addresses and lengths from small pools (to force collisions, misalignment
//! and memory faults), remove-all, single-step on/off, guest writes over
//! breakpoints, memory faults appearing and healing, applying the configuration to a vCPU, and decoding
//! synthesised exits. After every transition `differential::compare` checks
//! outcome, DR0–3/DR7, control flags, tables and memory byte for byte, and
//! `differential::invariants` the rules of every state.
//!
//! Cases: `SM_CASES` (or `PROPTEST_CASES`; default 1000), each up to 64 transitions. Failures are
//! persisted in `proptest-regressions/state_machine.txt`.

mod common;

use common::{cases, memory, ADDR_POOL, LEN_POOL};
use proptest::prelude::*;
use proptest::test_runner::Config;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use x86_debugreg::differential::{compare, invariants, Op, RefSide, TypedSide};
use x86_debugreg::DebugExit;

struct DebugModel;

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![9 => prop::sample::select(&ADDR_POOL[..]), 1 => any::<u64>()]
}

fn gdb_type() -> impl Strategy<Value = u64> {
    prop_oneof![12 => 0..=4u64, 1 => 5..=u64::MAX]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![9 => prop::sample::select(&LEN_POOL[..]), 1 => any::<u64>()]
}

fn exit() -> impl Strategy<Value = DebugExit> {
    let exception = prop_oneof![6 => Just(1u32), 3 => Just(3u32), 1 => any::<u32>()];
    let dr6 = prop_oneof![
        8 => (0..16u64, any::<bool>(), prop::sample::select(&[0xffff_0ff0u64, 0xfffe_0ff0, 0][..]))
            .prop_map(|(b, bs, base)| base | b | u64::from(bs) << 14),
        1 => any::<u64>(),
    ];
    (exception, addr(), dr6, any::<u64>()).prop_map(|(exception, pc, dr6, dr7)| DebugExit {
        exception,
        pc,
        dr6,
        dr7,
    })
}

impl ReferenceStateMachine for DebugModel {
    type State = RefSide;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<RefSide> {
        Just(RefSide::new(memory())).boxed()
    }

    fn transitions(state: &RefSide) -> BoxedStrategy<Op> {
        // Half the time, aim at a software breakpoint that is set, so removes,
        // guest rewrites and memory faults meet live entries.
        let live: Vec<u64> = state.model.sw_breakpoints.iter().map(|b| b.pc).collect();
        let target = if live.is_empty() {
            addr().boxed()
        } else {
            prop_oneof![addr(), prop::sample::select(live)].boxed()
        };
        prop_oneof![
            8 => (gdb_type(), addr(), len()).prop_map(|(ty, addr, len)| Op::Insert { ty, addr, len }),
            6 => (gdb_type(), addr(), len()).prop_map(|(ty, addr, len)| Op::Remove { ty, addr, len }),
            3 => target.clone().prop_map(|addr| Op::Remove { ty: 0, addr, len: 1 }),
            1 => Just(Op::RemoveAll),
            1 => any::<bool>().prop_map(Op::SingleStep),
            2 => (target.clone(), any::<u8>()).prop_map(|(addr, value)| Op::GuestWrite { addr, value }),
            1 => (target, any::<bool>(), any::<bool>()).prop_map(|(addr, reads, writes)| Op::Poison { addr, reads, writes }),
            2 => Just(Op::Apply),
            3 => exit().prop_map(Op::Decode),
        ]
        .boxed()
    }

    fn apply(mut state: RefSide, op: &Op) -> RefSide {
        state.apply(op);
        state
    }
}

impl StateMachineTest for DebugModel {
    type SystemUnderTest = TypedSide;
    type Reference = DebugModel;

    fn init_test(reference: &RefSide) -> TypedSide {
        static ANNOUNCE: std::sync::Once = std::sync::Once::new();
        ANNOUNCE.call_once(|| {
            let n = cases("SM_CASES", cases("PROPTEST_CASES", 1000));
            println!("state machine: {n} cases of 1-63 transitions, typed model vs reference");
        });
        TypedSide::new(reference.mem.clone())
    }

    fn apply(mut typed: TypedSide, reference: &RefSide, op: Op) -> TypedSide {
        typed.apply(&op);
        if let Err(m) = compare(&typed, reference) {
            panic!("after {op:x?}: {m}");
        }
        typed
    }

    fn check_invariants(typed: &TypedSide, reference: &RefSide) {
        if let Err(m) = invariants(typed, reference) {
            panic!("invariant: {m}");
        }
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: cases("SM_CASES", cases("PROPTEST_CASES", 1000)),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions/state_machine.txt"),
        ))),
        ..Config::default()
    })]

    /// DR7/DR6 rules, hardware slots, the int3 state machine and exit decoding
    /// agree with the seed's behaviour (defects fixed) after every transition.
    #[test]
    fn typed_model_matches_reference_state_machine(sequential 1..64 => DebugModel);
}

/// The generator is not vacuous: random sequences of the suite's shape reach
/// every outcome the seed can give (each errno, the guest-overwrote result,
/// remove-all with failures, every kind of decision).
#[test]
fn transitions_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use x86_debugreg::differential::Outcome;
    use x86_debugreg::reference as r;

    let mut runner = TestRunner::deterministic();
    let strategy = DebugModel::sequential_strategy(1..64);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..500 {
        let (mut state, ops, _) = strategy.new_tree(&mut runner).expect("strategy").current();
        for op in &ops {
            state.apply(op);
            seen.insert(match &state.last {
                Outcome::None => "none",
                Outcome::Code(0) => "ok",
                Outcome::Code(r::REMOVED_GUEST_OVERWROTE) => "guest overwrote",
                Outcome::Code(c) if *c == -r::EINVAL => "EINVAL",
                Outcome::Code(c) if *c == -r::ENOENT => "ENOENT",
                Outcome::Code(c) if *c == -r::EEXIST => "EEXIST",
                Outcome::Code(c) if *c == -r::ENOSYS => "ENOSYS",
                Outcome::Code(c) if *c == -r::ENOBUFS => "ENOBUFS",
                Outcome::Code(_) => "other errno",
                Outcome::RemoveAll { failed, .. } if failed.is_empty() => "remove-all",
                Outcome::RemoveAll { .. } => "remove-all with failures",
                Outcome::Decision(d) if d.handle < 0 => "decode error",
                Outcome::Decision(d) if d.sw => "software stop",
                Outcome::Decision(d) if d.single_step && d.hit_mask != 0 => "step and hit",
                Outcome::Decision(d) if d.single_step => "step",
                Outcome::Decision(d) if d.hit_mask != 0 => "hardware stop",
                Outcome::Decision(d) if d.inject == r::KVM_GUESTDBG_INJECT_DB => "reinject #DB",
                Outcome::Decision(_) => "reinject #BP",
            });
        }
    }
    let want = [
        "none",
        "ok",
        "guest overwrote",
        "EINVAL",
        "ENOENT",
        "EEXIST",
        "ENOSYS",
        "ENOBUFS",
        "remove-all",
        "remove-all with failures",
        "decode error",
        "software stop",
        "step and hit",
        "step",
        "hardware stop",
        "reinject #DB",
        "reinject #BP",
    ];
    let missing: Vec<_> = want.iter().filter(|w| !seen.contains(*w)).collect();
    assert!(missing.is_empty(), "never reached: {missing:?} (seen {seen:?})");
}
