//! Run control (issue #16) as a state machine: the real `VmDebug` and
//! `VcpuDebug` over fake vCPUs (system under test) against a deliberately
//! plain reference written from the rules, with `proptest-state-machine`.
//!
//! Two vCPUs run a six-instruction guest (one byte each at `0x1000..0x1006`,
//! the last jumping back to the first) on a tiny simulated CPU that does
//! what the SDM says about execute breakpoints (a fault before the
//! instruction, DR6 Bn) and single-step (a trap after it, DR6 BS), reading
//! the configuration from what the fake vCPU was given by
//! `KVM_SET_GUEST_DEBUG`. Transitions interleave the debugger's operations
//! (insert, remove, stop-all, take a stop, resume with per-vCPU actions,
//! detach; the VMM's hold until attached and its release, rule 8) with
//! each vCPU thread's steps (and its report of a fault, rule 9: posted,
//! never stale, its vCPU never resumed) (look at the park / enter the
//! guest; run 0-3 instructions and handle the exit, posting a stop).
//!
//! After every transition: every outcome (insert/remove answers, each
//! reported stop, posted or discarded, each stop taken) equals the
//! reference's; every entry's configuration is the current intent less only
//! the vCPU's own step-over exclusion (rule 4); run states and "moved" agree;
//! and the simulated CPU asserts that no instruction under one of the
//! debugger's breakpoints (as of that entry) runs unless that vCPU is
//! stepping over it from a stop that still stands (rules 1, 2), and a step
//! is one instruction. Posting after a detach must be discarded (rule 3).
//!
//! Cases: `RC_CASES` (or `PROPTEST_CASES`; default 2048), each up to 80
//! transitions; failures persist in `proptest-regressions/run_control.txt`.
//! With `--nocapture` it prints the cases run and the share reaching the
//! rare states.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug};
use kvm_glue::fake::FakeVcpu;
use kvm_glue::{
    Action, AddressSpace, BreakpointType, Handled, Insert, Park, Posted, Resume, RunState, Stop, VcpuDebug, VmDebug,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const N: usize = 2;
const BASE: u64 = 0x1000;
const INSNS: u64 = 6;
const PHYS: AddressSpace<'static> = AddressSpace::Physical;

// include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h.
const KVM_GUESTDBG_ENABLE: u32 = 0x1;
const KVM_GUESTDBG_SINGLESTEP: u32 = 0x2;
const KVM_GUESTDBG_USE_HW_BP: u32 = 0x2_0000;

fn next(pc: u64) -> u64 {
    BASE + (pc - BASE + 1) % INSNS
}

// ---------------------------------------------------------------------------
// The simulated CPU.
// ---------------------------------------------------------------------------

/// What a vCPU runs with, read back from a `kvm_guest_debug`: the enabled
/// execute breakpoints (DR7 Ln|Gn at bits 2n, 2n+1; R/Wn = 00 at bits
/// 16+4n; SDM Vol. 3B §18.2.4) by slot, and single-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cfg {
    slots: [Option<u64>; 4],
    single_step: bool,
}

impl Cfg {
    fn of(g: &kvm_guest_debug) -> Cfg {
        let mut slots = [None; 4];
        if g.control & KVM_GUESTDBG_ENABLE == 0 {
            return Cfg {
                slots,
                single_step: false,
            };
        }
        if g.control & KVM_GUESTDBG_USE_HW_BP != 0 {
            let dr7 = g.arch.debugreg[7];
            for (n, slot) in slots.iter_mut().enumerate() {
                let enabled = (dr7 >> (2 * n)) & 0b11 != 0;
                let rw = (dr7 >> (16 + 4 * n)) & 0b11;
                if enabled && rw == 0 {
                    *slot = Some(g.arch.debugreg[n]);
                }
            }
        }
        Cfg {
            slots,
            single_step: g.control & KVM_GUESTDBG_SINGLESTEP != 0,
        }
    }

    fn addrs(&self) -> BTreeSet<u64> {
        self.slots.iter().flatten().copied().collect()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CpuExit {
    /// An execute breakpoint in `slot` at `pc`: a fault, nothing executed.
    Fault { slot: usize, pc: u64 },
    /// Single-step trap after an instruction; `pc` is the next one.
    Trap { pc: u64 },
    /// Out of budget: a kick, or a port exit in the middle of an
    /// instruction (nothing more retired).
    Other,
}

/// Runs up to `budget` instructions from `pc` with `cfg`; `executed` gets
/// each retired instruction's address.
fn cpu_run(pc: &mut u64, slots: &[Option<u64>; 4], single_step: bool, budget: u8, executed: &mut Vec<u64>) -> CpuExit {
    for _ in 0..budget {
        if let Some(slot) = slots.iter().position(|s| *s == Some(*pc)) {
            return CpuExit::Fault { slot, pc: *pc };
        }
        executed.push(*pc);
        *pc = next(*pc);
        if single_step {
            return CpuExit::Trap { pc: *pc };
        }
    }
    CpuExit::Other
}

// ---------------------------------------------------------------------------
// The reference: the rules, plainly.
// ---------------------------------------------------------------------------

/// A stop as the reference predicts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefStop {
    vcpu: usize,
    pc: u64,
    step: bool,
    hit: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Outside,
    InGuest,
    Parked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RefVcpu {
    pc: u64,
    mode: Mode,
    held: bool,
    single_step: bool,
    pending: Option<RefStop>,
    /// The pc of this vCPU's last stop, while that stop stands: resuming
    /// steps over a breakpoint there.
    stands: Option<u64>,
    /// The pc being stepped over.
    inflight: Option<u64>,
    /// The debugger's breakpoints when it last entered, and what it ran with.
    entry_intent: BTreeSet<u64>,
    entry: (BTreeSet<u64>, bool),
    entered_session: u64,
    moved: bool,
    /// Rule 9: reported a fault; it never runs again.
    faulted: bool,
}

/// What the last transition's answer must be.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    None,
    Inserted(bool),
    Removed(bool),
    StopAll(bool),
    Released(bool),
    Resumed(bool),
    Taken(Option<(usize, u64)>),
    Park(bool),
    Ran(RunEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    Stop(RefStop, bool),
    SteppedOver,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RefState {
    bps: BTreeMap<u64, u32>,
    session: u64,
    v: Vec<RefVcpu>,
    order: VecDeque<usize>,
    /// Rule 8: every vCPU held until a debugger attaches.
    attach_hold: bool,
    last: Outcome,
    /// Rare states seen in this case.
    seen: Seen,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    two_at_one_breakpoint: bool,
    detach_with_stop_in_flight: bool,
    removal_during_step_over: bool,
    dropped_stop_cancelled_step_over: bool,
}

#[derive(Debug, Clone)]
enum T {
    Insert(u64),
    Remove(u64),
    StopAll,
    Take,
    Resume(Vec<(usize, bool)>),
    Detach,
    /// The VMM: hold every vCPU until a debugger attaches.
    HoldUntilAttached,
    /// The VMM: no debugger after all.
    ReleaseHold,
    /// vCPU thread: its last exit was a fault it cannot run on.
    Fault(usize),
    /// vCPU thread: look at the park; if free, enter the guest.
    Poll(usize),
    /// vCPU thread: run up to that many instructions, handle the exit.
    Run(usize, u8),
}

impl RefState {
    fn bp_set(&self) -> BTreeSet<u64> {
        self.bps.keys().copied().collect()
    }

    fn state(&self, i: usize) -> RunState {
        let v = &self.v[i];
        match (v.held, v.mode) {
            (true, Mode::Parked) => RunState::Parked,
            (true, _) => RunState::StopRequested,
            (false, _) => RunState::Running,
        }
    }
}

struct Model;

fn addr() -> impl Strategy<Value = u64> {
    BASE..BASE + INSNS
}

impl ReferenceStateMachine for Model {
    type State = RefState;
    type Transition = T;

    fn init_state() -> BoxedStrategy<RefState> {
        prop::collection::vec(addr(), N)
            .prop_map(|pcs| RefState {
                bps: BTreeMap::new(),
                session: 0,
                v: pcs
                    .into_iter()
                    .map(|pc| RefVcpu {
                        pc,
                        mode: Mode::Outside,
                        held: false,
                        single_step: false,
                        pending: None,
                        stands: None,
                        inflight: None,
                        entry_intent: BTreeSet::new(),
                        entry: (BTreeSet::new(), false),
                        entered_session: 0,
                        moved: false,
                        faulted: false,
                    })
                    .collect(),
                order: VecDeque::new(),
                attach_hold: false,
                last: Outcome::None,
                seen: Seen::default(),
            })
            .boxed()
    }

    fn transitions(_: &RefState) -> BoxedStrategy<T> {
        let actions = prop::collection::vec((0..N, any::<bool>()), 1..=N);
        prop_oneof![
            4 => addr().prop_map(T::Insert),
            3 => addr().prop_map(T::Remove),
            2 => Just(T::StopAll),
            3 => Just(T::Take),
            3 => actions.prop_map(T::Resume),
            1 => Just(T::Detach),
            1 => Just(T::HoldUntilAttached),
            1 => Just(T::ReleaseHold),
            1 => (0..N).prop_map(T::Fault),
            8 => (0..N).prop_map(T::Poll),
            8 => (0..N, 0..=3u8).prop_map(|(i, b)| T::Run(i, b)),
        ]
        .boxed()
    }

    fn preconditions(s: &RefState, t: &T) -> bool {
        match t {
            T::Poll(i) => s.v[*i].mode != Mode::InGuest && !s.v[*i].faulted,
            T::Fault(i) => s.v[*i].mode == Mode::Outside && !s.v[*i].faulted,
            T::Run(i, _) => s.v[*i].mode == Mode::InGuest,
            T::Resume(a) => {
                let ids: BTreeSet<usize> = a.iter().map(|(i, _)| *i).collect();
                ids.len() == a.len()
            }
            _ => true,
        }
    }

    fn apply(mut s: RefState, t: &T) -> RefState {
        s.last = Outcome::None;
        match t {
            T::Insert(a) => {
                let ok = s.bps.contains_key(a) || s.bps.len() < 4;
                if ok {
                    *s.bps.entry(*a).or_insert(0) += 1;
                }
                s.last = Outcome::Inserted(ok);
            }
            T::Remove(a) => {
                let ok = s.bps.contains_key(a);
                if ok {
                    if s.v.iter().any(|v| v.inflight.is_some()) {
                        s.seen.removal_during_step_over = true;
                    }
                    let n = s.bps.get_mut(a).map(|n| {
                        *n -= 1;
                        *n
                    });
                    if n == Some(0) {
                        s.bps.remove(a);
                    }
                }
                s.last = Outcome::Removed(ok);
            }
            T::StopAll => {
                s.attach_hold = false;
                for v in &mut s.v {
                    v.held = true;
                }
                let all = s.v.iter().all(|v| v.mode == Mode::Parked);
                s.last = Outcome::StopAll(all);
            }
            T::Take => {
                let mut got = None;
                while let Some(i) = s.order.pop_front() {
                    if let Some(p) = s.v[i].pending.take() {
                        got = Some((p.vcpu, p.pc));
                        break;
                    }
                }
                s.last = Outcome::Taken(got);
            }
            T::Resume(actions) if actions.iter().any(|&(i, _)| s.v[i].faulted) => {
                // Rule 9: refused, nothing changes.
                s.last = Outcome::Resumed(false);
            }
            T::Resume(actions) => {
                s.last = Outcome::Resumed(true);
                s.attach_hold = false;
                for &(i, step) in actions {
                    s.v[i].single_step = step;
                }
                let bps = s.bp_set();
                let mut dropped = Vec::new();
                for (i, v) in s.v.iter_mut().enumerate() {
                    if let Some(p) = v.pending {
                        let valid = v.faulted || (p.step && v.single_step) || p.hit.is_some_and(|x| bps.contains(&x));
                        if !valid {
                            if v.stands.is_some() {
                                s.seen.dropped_stop_cancelled_step_over = true;
                            }
                            v.pending = None;
                            v.stands = None;
                            dropped.push(i);
                        }
                    }
                }
                s.order.retain(|i| !dropped.contains(i));
                if s.v.iter().all(|v| v.pending.is_none()) {
                    for &(i, _) in actions {
                        s.v[i].held = false;
                        s.v[i].moved = false;
                    }
                }
            }
            T::Detach => {
                s.bps.clear();
                s.session += 1;
                s.order.clear();
                for v in &mut s.v {
                    v.single_step = false;
                    if v.pending.take().is_some() {
                        v.stands = None;
                    }
                    v.held = s.attach_hold;
                }
            }
            T::HoldUntilAttached => {
                s.attach_hold = true;
                for v in &mut s.v {
                    v.held = true;
                }
            }
            T::Fault(i) => {
                let i = *i;
                let v = &mut s.v[i];
                v.faulted = true;
                v.stands = None;
                v.inflight = None;
                let stop = RefStop {
                    vcpu: i,
                    pc: v.pc,
                    step: false,
                    hit: None,
                };
                v.pending = Some(stop);
                for v in &mut s.v {
                    v.held = true;
                }
                s.order.retain(|&j| j != i);
                s.order.push_back(i);
            }
            T::ReleaseHold => {
                let was = s.attach_hold;
                s.attach_hold = false;
                if was && s.v.iter().all(|v| v.pending.is_none()) {
                    for v in &mut s.v {
                        v.held = false;
                    }
                }
                s.last = Outcome::Released(was);
            }
            T::Poll(i) => {
                let bps = s.bp_set();
                let session = s.session;
                let v = &mut s.v[*i];
                if v.held {
                    v.mode = Mode::Parked;
                    s.last = Outcome::Park(true);
                } else {
                    v.mode = Mode::InGuest;
                    v.entered_session = session;
                    if v.inflight.is_none() {
                        v.inflight = v.stands.take().filter(|x| bps.contains(x));
                    }
                    let mut run = bps.clone();
                    if let Some(x) = v.inflight {
                        run.remove(&x);
                    }
                    v.entry = (run, v.single_step || v.inflight.is_some());
                    v.entry_intent = bps;
                    s.last = Outcome::Park(false);
                }
            }
            T::Run(i, budget) => {
                let i = *i;
                let (run, ss) = s.v[i].entry.clone();
                // Slots as a set: which slot an address sits in is the SUT's.
                let mut slots = [None; 4];
                for (slot, a) in slots.iter_mut().zip(run.iter()) {
                    *slot = Some(*a);
                }
                let mut executed = Vec::new();
                let mut pc = s.v[i].pc;
                let exit = cpu_run(&mut pc, &slots, ss, *budget, &mut executed);
                s.v[i].pc = pc;
                s.v[i].mode = Mode::Outside;
                let stop = match exit {
                    CpuExit::Other => None,
                    CpuExit::Fault { pc, .. } => {
                        s.v[i].inflight = None;
                        Some(RefStop {
                            vcpu: i,
                            pc,
                            step: false,
                            hit: Some(pc),
                        })
                    }
                    CpuExit::Trap { pc } => {
                        s.v[i].moved = true;
                        let was_over = s.v[i].inflight.take().is_some();
                        if was_over && !s.v[i].single_step {
                            None
                        } else {
                            Some(RefStop {
                                vcpu: i,
                                pc,
                                step: true,
                                hit: None,
                            })
                        }
                    }
                };
                s.last = Outcome::Ran(match (exit, stop) {
                    (CpuExit::Other, _) => RunEnd::Other,
                    (_, None) => RunEnd::SteppedOver,
                    (_, Some(stop)) => {
                        s.v[i].stands = Some(stop.pc);
                        let accepted = s.v[i].entered_session == s.session;
                        if accepted {
                            if let Some(hit) = stop.hit {
                                let other = s.v.iter().any(|v| v.pending.is_some_and(|p| p.hit == Some(hit)));
                                s.seen.two_at_one_breakpoint |= other;
                            }
                            for v in &mut s.v {
                                v.held = true;
                            }
                            s.v[i].pending = Some(stop);
                            s.order.retain(|&j| j != i);
                            s.order.push_back(i);
                        } else {
                            s.seen.detach_with_stop_in_flight = true;
                            s.v[i].stands = None;
                        }
                        RunEnd::Stop(stop, accepted)
                    }
                });
            }
        }
        s
    }
}

// ---------------------------------------------------------------------------
// The system under test.
// ---------------------------------------------------------------------------

struct Sut {
    dbg: VmDebug<GuestMemoryMmap>,
    h: Vec<VcpuDebug<GuestMemoryMmap>>,
    f: Vec<FakeVcpu>,
    pc: Vec<u64>,
}

struct RunControlTest;

impl StateMachineTest for RunControlTest {
    type SystemUnderTest = Sut;
    type Reference = Model;

    fn init_test(r: &RefState) -> Sut {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).expect("mmap");
        let dbg = VmDebug::with_vcpus(mem, N).expect("two vCPUs");
        let h = (0..N).map(|i| dbg.vcpu(i).expect("vCPU")).collect();
        Sut {
            dbg,
            h,
            f: (0..N).map(|_| FakeVcpu::new()).collect(),
            pc: r.v.iter().map(|v| v.pc).collect(),
        }
    }

    fn apply(mut sut: Sut, r: &RefState, t: T) -> Sut {
        match t {
            T::Insert(a) => {
                let got = sut.dbg.insert(PHYS, BreakpointType::Hardware, a, 1).expect("insert");
                assert_eq!(
                    Outcome::Inserted(matches!(got, Insert::Inserted(_))),
                    r.last,
                    "insert {a:#x}"
                );
            }
            T::Remove(a) => {
                let got = sut.dbg.remove(PHYS, BreakpointType::Hardware, a, 1);
                assert_eq!(Outcome::Removed(got.is_ok()), r.last, "remove {a:#x}: {got:?}");
            }
            T::StopAll => {
                let got = sut.dbg.stop_all(Duration::ZERO);
                assert_eq!(Outcome::StopAll(got.is_ok()), r.last, "stop_all: {got:?}");
            }
            T::Take => {
                let got = sut.dbg.try_take_stop().expect("take").map(|e| (e.vcpu, e.pc));
                assert_eq!(Outcome::Taken(got), r.last, "take");
            }
            T::Resume(actions) => {
                let a: Vec<(usize, Action)> = actions
                    .iter()
                    .map(|&(i, step)| (i, if step { Action::Step } else { Action::Continue }))
                    .collect();
                let got = sut.dbg.resume(&a);
                assert_eq!(Outcome::Resumed(got.is_ok()), r.last, "resume {a:?}: {got:?}");
            }
            T::Detach => {
                let report = sut.dbg.detach().expect("detach");
                assert!(report.is_complete());
            }
            T::HoldUntilAttached => sut.dbg.hold_until_attached().expect("hold"),
            T::Fault(i) => {
                let regs = kvm_bindings::kvm_regs {
                    rip: sut.pc[i],
                    rflags: 2,
                    ..Default::default()
                };
                kvm_glue::VcpuOps::set_regs(&sut.f[i], &regs).expect("regs");
                let posted = sut.h[i]
                    .report_fault(&sut.f[i], kvm_glue::Fault::Shutdown)
                    .expect("report");
                assert_eq!(posted, Posted::Waiting, "a fault is always posted");
            }
            T::ReleaseHold => {
                let got = sut.dbg.release_hold().expect("release");
                assert_eq!(Outcome::Released(got), r.last, "release_hold");
            }
            T::Poll(i) => {
                let park = sut.h[i].poll_park(&sut.f[i]).expect("poll");
                assert_eq!(Outcome::Park(park == Park::Held), r.last, "vCPU {i} park");
                if park == Park::Free {
                    sut.h[i].enter(&sut.f[i]).expect("enter");
                    let cfg = Cfg::of(&sut.f[i].guest_debug().expect("the first sync always applies"));
                    // Rule 4: the current intent, less only its own exclusion.
                    assert_eq!(
                        (cfg.addrs(), cfg.single_step),
                        r.v[i].entry,
                        "vCPU {i} entry configuration"
                    );
                }
            }
            T::Run(i, budget) => {
                let cfg = Cfg::of(&sut.f[i].guest_debug().expect("set"));
                let mut executed = Vec::new();
                let exit = cpu_run(&mut sut.pc[i], &cfg.slots, cfg.single_step, budget, &mut executed);
                // Rules 1 and 2: an instruction under one of the debugger's
                // breakpoints (as of this entry) runs only as the one step
                // over the pc of a stop that still stood at the entry.
                let v = &r.v[i];
                let excluded: BTreeSet<u64> = v.entry_intent.difference(&cfg.addrs()).copied().collect();
                assert!(excluded.len() <= 1, "vCPU {i} excluded {excluded:x?}");
                assert!(
                    excluded.is_empty() || cfg.single_step,
                    "an exclusion is for one step only"
                );
                for x in &executed {
                    assert!(
                        !v.entry_intent.contains(x) || excluded.contains(x),
                        "vCPU {i} ran {x:#x} under a breakpoint: a hit lost"
                    );
                }
                let arch = |exception: u32, pc: u64, dr6: u64| kvm_debug_exit_arch {
                    exception,
                    pad: 0,
                    pc,
                    dr6,
                    dr7: 0,
                };
                let got = match exit {
                    CpuExit::Other => RunEnd::Other,
                    CpuExit::Fault { slot, pc } => Self::handle(&mut sut, i, arch(1, pc, 0xffff_0ff0 | (1 << slot))),
                    CpuExit::Trap { pc } => Self::handle(&mut sut, i, arch(1, pc, 0xffff_4ff0)),
                };
                assert_eq!(
                    Outcome::Ran(got),
                    r.last,
                    "vCPU {i} run of {budget} from {:#x}",
                    sut.pc[i]
                );
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, r: &RefState) {
        assert_eq!(
            sut.dbg.holding_until_attached().expect("hold"),
            r.attach_hold,
            "held until attached"
        );
        for i in 0..N {
            // Rule 8: while the vCPUs are held until attached, every one is.
            assert!(
                !r.attach_hold || sut.dbg.run_state(i).expect("state") != RunState::Running,
                "vCPU {i} runs during a hold until attached"
            );
            assert_eq!(sut.dbg.run_state(i).expect("state"), r.state(i), "vCPU {i} run state");
            assert_eq!(sut.dbg.moved(i).expect("moved"), r.v[i].moved, "vCPU {i} moved");
            assert_eq!(sut.pc[i], r.v[i].pc, "vCPU {i} pc");
            assert_eq!(
                sut.h[i].stepping_over(),
                r.v[i].inflight.is_some(),
                "vCPU {i} step-over"
            );
        }
    }

    fn teardown(_: Sut, r: RefState) {
        STATS.case(r.seen);
    }
}

impl RunControlTest {
    fn handle(sut: &mut Sut, i: usize, arch: kvm_debug_exit_arch) -> RunEnd {
        match sut.h[i].handle_exit(&sut.f[i], &arch).expect("handle_exit") {
            Handled::Resume(Resume::SteppedOver) => RunEnd::SteppedOver,
            Handled::Resume(other) => panic!("vCPU {i}: {other:?}"),
            Handled::Stop(ev) => {
                let (step, hit) = match ev.stop {
                    Stop::Debug { single_step, hits } => {
                        assert!(hits.iter().count() <= 1, "{ev}");
                        (single_step, hits.iter().next().map(|h| h.breakpoint.addr()))
                    }
                    Stop::Software { .. } => panic!("no int3 here: {ev}"),
                };
                let posted = sut.h[i].report_stop(ev).expect("report");
                RunEnd::Stop(
                    RefStop {
                        vcpu: ev.vcpu,
                        pc: ev.pc,
                        step,
                        hit,
                    },
                    posted == Posted::Waiting,
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The run, with the rare states counted.
// ---------------------------------------------------------------------------

struct Stats {
    cases: AtomicUsize,
    two_at_one_breakpoint: AtomicUsize,
    detach_with_stop_in_flight: AtomicUsize,
    removal_during_step_over: AtomicUsize,
    dropped_stop_cancelled_step_over: AtomicUsize,
}

impl Stats {
    fn case(&self, seen: Seen) {
        let add = |c: &AtomicUsize, b: bool| {
            c.fetch_add(usize::from(b), Ordering::Relaxed);
        };
        add(&self.cases, true);
        add(&self.two_at_one_breakpoint, seen.two_at_one_breakpoint);
        add(&self.detach_with_stop_in_flight, seen.detach_with_stop_in_flight);
        add(&self.removal_during_step_over, seen.removal_during_step_over);
        add(
            &self.dropped_stop_cancelled_step_over,
            seen.dropped_stop_cancelled_step_over,
        );
    }
}

static STATS: Stats = Stats {
    cases: AtomicUsize::new(0),
    two_at_one_breakpoint: AtomicUsize::new(0),
    detach_with_stop_in_flight: AtomicUsize::new(0),
    removal_during_step_over: AtomicUsize::new(0),
    dropped_stop_cancelled_step_over: AtomicUsize::new(0),
};

fn cases() -> u32 {
    for var in ["RC_CASES", "PROPTEST_CASES"] {
        if let Ok(v) = std::env::var(var) {
            match v.trim().parse::<u32>() {
                Ok(n) if n > 0 => return n,
                _ => panic!("{var}={v:?} is not a positive integer"),
            }
        }
    }
    2048
}

#[test]
fn run_control_keeps_its_rules_against_the_reference() {
    let config = Config {
        cases: cases(),
        source_file: Some(file!()),
        // Cargo runs tests in the package root: kvm-glue/proptest-regressions/.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/run_control.txt",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(&Model::sequential_strategy(1..80), |(initial, transitions, seen)| {
        RunControlTest::test_sequential(config.clone(), initial, transitions, seen);
        Ok(())
    });
    let n = STATS.cases.load(Ordering::Relaxed).max(1);
    let share = |c: &AtomicUsize| {
        let k = c.load(Ordering::Relaxed);
        format!("{k} ({:.1}%)", 100.0 * k as f64 / n as f64)
    };
    println!("run_control: {n} cases run (2 vCPUs, up to 80 transitions each); runs reaching:");
    println!(
        "  two vCPUs stopped at one breakpoint: {}",
        share(&STATS.two_at_one_breakpoint)
    );
    println!(
        "  detach with a stop in flight (posted late, discarded): {}",
        share(&STATS.detach_with_stop_in_flight)
    );
    println!(
        "  removal during a step-over: {}",
        share(&STATS.removal_during_step_over)
    );
    println!(
        "  a dropped stop cancelling its step-over: {}",
        share(&STATS.dropped_stop_cancelled_step_over)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
