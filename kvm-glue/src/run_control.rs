//! Run control: one pure state machine for where each vCPU is — running,
//! asked to stop, parked, owed a step over the pc it stopped at, stepping
//! over it, holding a posted stop — and which debugging session all that
//! belongs to. No I/O, no threads, no KVM: [`VmDebug`](crate::VmDebug) keeps
//! a [`RunControl`] under its lock and [`VcpuDebug`](crate::VcpuDebug) a
//! [`StepPhase`]; the threads and ioctls around them only report events and
//! carry out answers.
//!
//! Transitions, the debugger's: [`register`](RunControl::register) a vCPU,
//! [`set_single_step`](RunControl::set_single_step), [`stop_all`](RunControl::stop_all),
//! [`take`](RunControl::take) a posted stop, [`resume`](RunControl::resume),
//! [`detach`](RunControl::detach); the VMM's:
//! [`hold_until_attached`](RunControl::hold_until_attached),
//! [`release_hold`](RunControl::release_hold); the vCPU's:
//! [`post_fault`](RunControl::post_fault) (a fault it cannot run on), [`stopped`](RunControl::stopped)
//! (a debug exit decoded into a stop at pc X), [`stepped`](RunControl::stepped)
//! (an instruction ran under single-step), [`post`](RunControl::post),
//! [`park`](RunControl::park) / [`unpark`](RunControl::unpark),
//! [`take_owed`](RunControl::take_owed) (entering the guest), and
//! [`StepPhase`]'s own (`request`, `armed`, exits).
//!
//! The rules it keeps (issue #16; `tests/run_control.rs` checks them against
//! a plain reference over random interleavings):
//!
//! 1. **No hit is lost.** A stop at pc X *owes* a step over X — the next
//!    entry runs one instruction with the debugger's breakpoint at X
//!    disabled — only while that stop still stands. When a posted stop is
//!    dropped (made stale by the debugger, discarded after a detach), its
//!    step-over goes with it: the instruction at X runs again and stops again
//!    if a breakpoint is there.
//! 2. **A step is one instruction.** Whatever stopped the vCPU at X (an
//!    execute breakpoint, an `int3`, a single step that landed on X, a
//!    watchpoint trap at X), resuming from X steps over a breakpoint at X
//!    first, as GDB's step-over does; so a resume never stops at X before an
//!    instruction has run. A vCPU parked by an all-stop (a kick, no debug
//!    exit) at X stopped for no breakpoint: with a breakpoint at X, resuming
//!    runs into it and reports it, since its instruction has not run (rule 1
//!    wins; GDB expects that of threads it interrupted, and steps its
//!    resumed thread over its own breakpoints itself).
//! 3. **Detach is final.** [`detach`](RunControl::detach) starts a new
//!    session: every hold and posted stop is dropped, and a stop posted later
//!    from the old session's configuration is [`Post::Discarded`] — nobody
//!    parks for it and its vCPU runs on.
//! 4. **A vCPU enters the guest with the current intent**, less only its own
//!    step-over exclusion ([`exclude`]), even while a step-over is in flight
//!    across a park (a port access, an all-stop).
//! 5. **Ids are checked**: a vCPU id is known when it was declared at
//!    creation ([`RunControl::with_vcpus`]) or registered; anything else is
//!    [`RunError::UnknownVcpu`], and nothing is sized by an id.
//! 6. With no live vCPU, there is nothing to wait for ([`RunControl::live`]).
//! 7. After a resume, [`moved`](RunControl::moved) says whether a vCPU ran an
//!    instruction under single-step since it was released.
//! 8. **Held until attached** ([`hold_until_attached`](RunControl::hold_until_attached),
//!    QEMU's `-S`): while that hold is in force, every live vCPU is held
//!    (a vCPU registered later too), so each parks at its first entry. The
//!    first debugger [`stop_all`](RunControl::stop_all) or
//!    [`resume`](RunControl::resume) takes it over; a
//!    [`detach`](RunControl::detach) with no session does not end it (a
//!    connection that never became a debugger's releases nothing); for a VMM
//!    that never serves a debugger, [`release_hold`](RunControl::release_hold)
//!    ends it.
//! 9. **A fault is a stop that cannot be resumed.** A vCPU that reports a
//!    fault ([`post_fault`](RunControl::post_fault): a triple fault, an
//!    internal error, an exit the VMM cannot handle) posts a stop like any
//!    other, which no resume drops as stale; a resume naming that vCPU is
//!    refused ([`RunError::Faulted`]) and changes nothing, until its handle
//!    goes (a detach does not clear it: the vCPU still cannot run).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use x86_debugreg::{ControlFlags, GuestDebug, HwKind, Slot, Stop};

/// The largest number of vCPU ids a VM may use (ids `0..MAX_VCPUS`): the
/// `KVM_MAX_VCPU_IDS` of x86-64 Linux (4 × `KVM_MAX_VCPUS` = 4 × 1024).
pub const MAX_VCPUS: usize = 4096;

/// A run-control operation that was refused; nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The id is not one of the VM's vCPUs.
    #[error("vCPU {vcpu} is not one of this VM's vCPUs ({known})")]
    UnknownVcpu {
        /// The id asked for.
        vcpu: usize,
        /// What the VM knows.
        known: Known,
    },
    /// The vCPU reported a fault ([`RunControl::post_fault`]): it cannot
    /// run on.
    #[error("vCPU {vcpu} faulted ({fault}): it cannot run on")]
    Faulted {
        /// The vCPU.
        vcpu: usize,
        /// Its fault.
        fault: Fault,
    },
    /// More vCPUs declared than a VM can have.

    #[error("{count} vCPUs asked for; a VM has at most {MAX_VCPUS}")]
    TooManyVcpus {
        /// The count asked for.
        count: usize,
    },
}

/// Why a vCPU cannot run on, reported as a stop
/// ([`VcpuDebug::report_fault`](crate::VcpuDebug::report_fault)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `KVM_EXIT_SHUTDOWN`: a triple fault (or another shutdown condition).
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR`: KVM could not go on (an instruction it
    /// could not emulate, a failed event delivery).
    InternalError,
    /// An exit the VMM cannot handle.
    UnhandledExit,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::Shutdown => "triple fault (KVM_EXIT_SHUTDOWN)",
            Fault::InternalError => "KVM_EXIT_INTERNAL_ERROR",
            Fault::UnhandledExit => "an exit the VMM cannot handle",
        })
    }
}

/// Which ids a VM's run control accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Declared at creation: ids `0..n`.
    Declared(usize),
    /// Registered one by one (ids below [`MAX_VCPUS`]); `n` of them so far.
    Registered(usize),
}

impl fmt::Display for Known {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Known::Declared(n) => write!(f, "it has vCPUs 0..{n}"),
            Known::Registered(n) => write!(f, "{n} registered, ids below {MAX_VCPUS}"),
        }
    }
}

/// Where a vCPU is in the all-stop protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// No handle for this vCPU exists (its thread has not started or has ended).
    Absent,
    /// Running or about to run the guest.
    Running,
    /// Asked to stop, not parked yet (may be inside `KVM_RUN`).
    StopRequested,
    /// Parked in `before_run`: outside `KVM_RUN`, guest frozen, and held
    /// there (a released vCPU still leaving its park is `Running`).
    Parked,
}

/// What a released vCPU does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run with single-step off.
    Continue,
    /// Run one instruction, then stop (single-step on).
    Step,
}

/// A stop for the debugger, decoded from one debug exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopEvent {
    /// The vCPU that stopped.
    pub vcpu: usize,
    /// Linear address of the next instruction to run (the breakpoint itself
    /// for execute and software breakpoints; after the access for watchpoints).
    pub pc: u64,
    /// DR6 as KVM reported it (0 for `#BP`).
    pub dr6: u64,
    /// Why, decoded from the configuration this vCPU applied (for a fault,
    /// an empty `Stop::Debug`).
    pub stop: Stop,
    /// The fault the vCPU reported instead of a debug exit
    /// (`VcpuDebug::report_fault`): it cannot run on.
    pub fault: Option<Fault>,
}

impl fmt::Display for StopEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(fault) = self.fault {
            return write!(f, "vCPU {} faulted at {:#x}: {fault}", self.vcpu, self.pc);
        }
        write!(f, "vCPU {} stopped at {:#x}: ", self.vcpu, self.pc)?;
        match self.stop {
            Stop::Software { addr } => return write!(f, "software breakpoint at {addr:#x}"),
            Stop::Debug { single_step, hits } => {
                let mut sep = "";
                if single_step {
                    f.write_str("single step")?;
                    sep = " + ";
                }
                for hit in hits.iter() {
                    write!(f, "{sep}{hit}")?;
                    sep = " + ";
                }
            }
        }
        write!(f, " (DR6 {:#x})", self.dr6)
    }
}

/// A posted, not yet reported stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The stop.
    pub event: StopEvent,
    /// For a software-breakpoint stop: the guest-physical address of the `int3`.
    pub gpa: Option<u64>,
}

/// What became of a stop a vCPU posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Post {
    /// Posted: every vCPU is held; `kick` are the others not parked.
    Posted {
        /// vCPUs to kick out of `KVM_RUN`.
        kick: Vec<usize>,
    },
    /// Decoded from an older session's configuration (a detach came
    /// between): dropped, nobody held, the vCPU runs on with no step-over.
    Discarded,
}

/// What a [`RunControl::resume`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    /// Some vCPU's single-step flag changed (the configuration generation
    /// must move).
    pub step_changed: bool,
    /// Posted stops dropped as stale, by vCPU: their step-overs are cancelled.
    pub dropped: Vec<usize>,
    /// `true`: stops are still pending, so nobody was released and the next
    /// wait answers at once.
    pub pending_left: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Vcpu {
    /// Live handles (0: absent).
    handles: usize,
    hold: bool,
    parked: bool,
    /// Posted a stop from its own thread since it last parked or was
    /// released: it is outside `KVM_RUN` and parks before entering again,
    /// so a kick would only stay pending and make its next `KVM_RUN`
    /// return `EINTR` at once (a wasted entry).
    posted: bool,
    single_step: bool,
    pending: Option<Pending>,
    /// The pc of the last stop that still stands: the next entry steps over
    /// a breakpoint there.
    owed: Option<u64>,
    /// Ran an instruction under single-step since it was last released.
    moved: bool,
    /// Reported a fault: it cannot run on (rule 9).
    faulted: Option<Fault>,
    /// Generation of the intent this vCPU last applied (`None`: unknown).
    applied_generation: Option<u64>,
}

/// The VM-wide run-control state (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunControl {
    vcpus: BTreeMap<usize, Vcpu>,
    declared: Option<usize>,
    /// vCPU ids in the order their pending stops were posted.
    order: VecDeque<usize>,
    session: u64,
    /// Every vCPU is held until a debugger attaches (rule 8).
    attach_hold: bool,
}

impl Default for RunControl {
    fn default() -> Self {
        RunControl::new()
    }
}

impl RunControl {
    /// vCPUs are known as they register (ids below [`MAX_VCPUS`]).
    pub fn new() -> RunControl {
        RunControl {
            vcpus: BTreeMap::new(),
            declared: None,
            order: VecDeque::new(),
            session: 0,
            attach_hold: false,
        }
    }

    /// A VM with vCPUs `0..count`, known from the start.
    ///
    /// # Errors
    /// [`RunError::TooManyVcpus`] above [`MAX_VCPUS`].
    pub fn with_vcpus(count: usize) -> Result<RunControl, RunError> {
        if count > MAX_VCPUS {
            return Err(RunError::TooManyVcpus { count });
        }
        let mut rc = RunControl::new();
        rc.declared = Some(count);
        rc.vcpus = (0..count).map(|i| (i, Vcpu::default())).collect();
        Ok(rc)
    }

    fn unknown(&self, vcpu: usize) -> RunError {
        RunError::UnknownVcpu {
            vcpu,
            known: match self.declared {
                Some(n) => Known::Declared(n),
                None => Known::Registered(self.vcpus.len()),
            },
        }
    }

    fn get(&self, vcpu: usize) -> Result<&Vcpu, RunError> {
        self.vcpus.get(&vcpu).ok_or_else(|| self.unknown(vcpu))
    }

    fn get_mut(&mut self, vcpu: usize) -> Result<&mut Vcpu, RunError> {
        let err = self.unknown(vcpu);
        self.vcpus.get_mut(&vcpu).ok_or(err)
    }

    /// Checks that `vcpu` is one of the VM's vCPUs.
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`].
    pub fn check(&self, vcpu: usize) -> Result<(), RunError> {
        self.get(vcpu).map(|_| ())
    }

    /// The session: moves at every [`detach`](Self::detach).
    pub fn session(&self) -> u64 {
        self.session
    }

    /// A new handle for `vcpu`. It is held if a stop is in progress.
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`] for an id not declared (or, without a
    /// declared count, not below [`MAX_VCPUS`]); nothing changes then.
    pub fn register(&mut self, vcpu: usize) -> Result<(), RunError> {
        let allowed = match self.declared {
            Some(n) => vcpu < n,
            None => vcpu < MAX_VCPUS,
        };
        if !allowed {
            return Err(self.unknown(vcpu));
        }
        let stopping = self.attach_hold || self.vcpus.values().any(|v| v.handles > 0 && v.hold);
        let v = self.vcpus.entry(vcpu).or_default();
        v.handles += 1;
        v.hold |= stopping;
        v.applied_generation = None;
        Ok(())
    }

    /// A handle for `vcpu` went away. With the last one, its pending stop,
    /// park and step-over debt go too (the id stays known).
    pub fn unregister(&mut self, vcpu: usize) {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.handles = v.handles.saturating_sub(1);
            if v.handles == 0 {
                v.pending = None;
                v.parked = false;
                v.posted = false;
                v.owed = None;
                v.applied_generation = None;
                v.faulted = None;
            }
        }
    }

    /// Where `vcpu` is.
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`].
    pub fn state(&self, vcpu: usize) -> Result<RunState, RunError> {
        let v = self.get(vcpu)?;
        // Parked and released: on its way out of its park, not held.
        Ok(if v.handles == 0 {
            RunState::Absent
        } else if v.parked && v.hold {
            RunState::Parked
        } else if v.hold {
            RunState::StopRequested
        } else {
            RunState::Running
        })
    }

    /// Ids with a live handle, in order.
    pub fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.vcpus.iter().filter(|(_, v)| v.handles > 0).map(|(&i, _)| i)
    }

    /// Whether any vCPU has a live handle (else nobody can post a stop).
    pub fn live(&self) -> bool {
        self.ids().next().is_some()
    }

    /// Whether `vcpu` single-steps (`false` for an unknown id).
    pub fn single_step(&self, vcpu: usize) -> bool {
        self.vcpus.get(&vcpu).is_some_and(|v| v.single_step)
    }

    /// Whether any vCPU single-steps.
    pub fn any_single_step(&self) -> bool {
        self.vcpus.values().any(|v| v.single_step)
    }

    /// Turns `vcpu`'s single-step on or off; returns whether it changed.
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`]; nothing changes then.
    pub fn set_single_step(&mut self, vcpu: usize, on: bool) -> Result<bool, RunError> {
        let v = self.get_mut(vcpu)?;
        let changed = v.single_step != on;
        v.single_step = on;
        Ok(changed)
    }

    /// Whether `vcpu` ran an instruction under single-step since it was last
    /// released by a [`resume`](Self::resume).
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`].
    pub fn moved(&self, vcpu: usize) -> Result<bool, RunError> {
        Ok(self.get(vcpu)?.moved)
    }

    /// The generation `vcpu` last applied.
    pub fn applied_generation(&self, vcpu: usize) -> Option<u64> {
        self.vcpus.get(&vcpu).and_then(|v| v.applied_generation)
    }

    /// Records the generation `vcpu` applied (`None`: not the intent's).
    pub fn note_generation(&mut self, vcpu: usize, generation: Option<u64>) {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.applied_generation = generation;
        }
    }

    /// Whether `vcpu` must not just re-enter the guest: held, or behind
    /// `generation`.
    pub fn needs_sync(&self, vcpu: usize, generation: u64) -> bool {
        self.vcpus
            .get(&vcpu)
            .is_some_and(|v| v.handles > 0 && (v.hold || v.applied_generation != Some(generation)))
    }

    /// The debugger asks every vCPU to stop; returns the live ones not
    /// parked (to kick). A [hold until attached](Self::hold_until_attached)
    /// is taken over: the vCPUs stay held, now by the debugger.
    pub fn stop_all(&mut self) -> Vec<usize> {
        self.attach_hold = false;
        for v in self.vcpus.values_mut() {
            v.hold = true;
        }
        // Not one that posted a stop: it is on its way to park, outside
        // `KVM_RUN` (see `Vcpu::posted`).
        self.vcpus
            .iter()
            .filter(|(_, v)| v.handles > 0 && !v.parked && !v.posted)
            .map(|(&i, _)| i)
            .collect()
    }

    /// Holds every vCPU, those registered later too, until a debugger
    /// attaches (QEMU's `-S`): each parks at its first entry. The first
    /// [`stop_all`](Self::stop_all) or [`resume`](Self::resume) — a
    /// debugger's session — takes the hold over; a [`detach`](Self::detach)
    /// keeps it (no debugger attached by it); only
    /// [`release_hold`](Self::release_hold) lets the vCPUs run without one.
    pub fn hold_until_attached(&mut self) {
        self.attach_hold = true;
        for v in self.vcpus.values_mut() {
            v.hold = true;
        }
    }

    /// Whether the vCPUs are held until a debugger attaches.
    pub fn holding_until_attached(&self) -> bool {
        self.attach_hold
    }

    /// Ends a [hold until attached](Self::hold_until_attached) with no
    /// debugger: every vCPU is released (unless a posted stop waits, which
    /// keeps everyone held for the debugger as any stop does). Returns
    /// whether a hold was ended; without one nothing changes.
    pub fn release_hold(&mut self) -> bool {
        if !self.attach_hold {
            return false;
        }
        self.attach_hold = false;
        if !self.has_pending() {
            for v in self.vcpus.values_mut() {
                v.hold = false;
                v.posted = false;
            }
        }
        true
    }

    /// Live vCPUs not parked.
    pub fn unparked(&self) -> Vec<usize> {
        self.vcpus
            .iter()
            .filter(|(_, v)| v.handles > 0 && !v.parked)
            .map(|(&i, _)| i)
            .collect()
    }

    /// Whether `vcpu` must park before its next entry.
    pub fn held(&self, vcpu: usize) -> bool {
        self.vcpus.get(&vcpu).is_some_and(|v| v.hold)
    }

    /// `vcpu` parks (it was [`held`](Self::held)). Returns whether it
    /// posted a stop since it last parked or was released: the stop is
    /// announced now ([`VmDebug::stop_fd`](crate::VmDebug::stop_fd)), when
    /// the debugger can take it without waiting for this vCPU.
    pub fn park(&mut self, vcpu: usize) -> bool {
        match self.vcpus.get_mut(&vcpu) {
            Some(v) => {
                v.parked = true;
                std::mem::take(&mut v.posted)
            }
            None => false,
        }
    }

    /// `vcpu` leaves its park (it was released).
    pub fn unpark(&mut self, vcpu: usize) {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.parked = false;
        }
    }

    /// A debug exit of `vcpu` was decoded into a stop at `pc`: it now owes a
    /// step over `pc` (rule 2), until that stop is dropped (rule 1).
    pub fn stopped(&mut self, vcpu: usize, pc: u64) {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.owed = Some(pc);
        }
    }

    /// `vcpu` ran one instruction under single-step (the debugger's step or
    /// a step-over's).
    pub fn stepped(&mut self, vcpu: usize) {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.moved = true;
        }
    }

    /// `vcpu` is about to enter the guest: the pc to step over first, if its
    /// last stop still stands.
    pub fn take_owed(&mut self, vcpu: usize) -> Option<u64> {
        self.vcpus.get_mut(&vcpu).and_then(|v| v.owed.take())
    }

    /// Whether `vcpu` owes a step-over.
    pub fn owes(&self, vcpu: usize) -> Option<u64> {
        self.vcpus.get(&vcpu).and_then(|v| v.owed)
    }

    /// `vcpu` posts `pending`, decoded from a configuration of `session`.
    /// In the current session, every vCPU is held and the stop waits for
    /// [`take`](Self::take); from an older one it is discarded, with its
    /// step-over (rule 3).
    pub fn post(&mut self, vcpu: usize, pending: Pending, session: u64) -> Post {
        if session != self.session || self.vcpus.get(&vcpu).is_none_or(|v| v.handles == 0) {
            return self.discard(vcpu);
        }
        for v in self.vcpus.values_mut() {
            v.hold = true;
        }
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.pending = Some(pending);
            v.posted = true;
        }
        self.order.retain(|&i| i != vcpu);
        self.order.push_back(vcpu);
        let kick = self
            .vcpus
            .iter()
            .filter(|(&i, v)| i != vcpu && v.handles > 0 && !v.parked)
            .map(|(&i, _)| i)
            .collect();
        Post::Posted { kick }
    }

    /// `vcpu` reports a fault as a stop (rule 9): posted like any stop in
    /// the current session (it comes from no configuration, so no session
    /// can make it stale), every vCPU held; from now on `vcpu` cannot be
    /// resumed ([`RunError::Faulted`]) and owes no step-over.
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`] for an id with no live handle; nothing
    /// changes then.
    pub fn post_fault(&mut self, vcpu: usize, mut pending: Pending, fault: Fault) -> Result<Post, RunError> {
        if self.vcpus.get(&vcpu).is_none_or(|v| v.handles == 0) {
            return Err(self.unknown(vcpu));
        }
        pending.event.fault = Some(fault);
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.faulted = Some(fault);
            v.owed = None;
        }
        let session = self.session;
        Ok(self.post(vcpu, pending, session))
    }

    /// The fault `vcpu` reported, if it did (`None` for an unknown id).
    pub fn faulted(&self, vcpu: usize) -> Option<Fault> {
        self.vcpus.get(&vcpu).and_then(|v| v.faulted)
    }

    /// A stop `vcpu` decoded from no configuration of the debugger's (it
    /// never synced): [`Post::Discarded`], with its step-over.
    pub fn discard(&mut self, vcpu: usize) -> Post {
        if let Some(v) = self.vcpus.get_mut(&vcpu) {
            v.owed = None;
        }
        Post::Discarded
    }

    /// The oldest posted stop, for the debugger.
    pub fn take(&mut self) -> Option<StopEvent> {
        while let Some(id) = self.order.pop_front() {
            if let Some(p) = self.vcpus.get_mut(&id).and_then(|v| v.pending.take()) {
                return Some(p.event);
            }
        }
        None
    }

    /// Whether a posted stop waits.
    pub fn has_pending(&self) -> bool {
        self.vcpus.values().any(|v| v.pending.is_some())
    }

    /// `vcpu`'s posted stop, if any.
    pub fn pending(&self, vcpu: usize) -> Option<&Pending> {
        self.vcpus.get(&vcpu).and_then(|v| v.pending.as_ref())
    }

    /// Resumes the vCPUs in `actions` (all ids checked first: an unknown one
    /// refuses the whole resume, changing nothing). Single-step flags are set
    /// from the actions; then every posted stop that `still_valid` rejects is
    /// dropped, with its step-over (rule 1). If stops are left, nobody is
    /// released; else the listed vCPUs are.
    ///
    /// `still_valid(pending, single_step_now)` judges a posted stop against
    /// the intent.
    ///
    /// # Errors
    /// [`RunError::UnknownVcpu`].
    pub fn resume(
        &mut self,
        actions: &[(usize, Action)],
        mut still_valid: impl FnMut(&Pending, bool) -> bool,
    ) -> Result<Resumed, RunError> {
        for &(id, _) in actions {
            self.check(id)?;
            if let Some(fault) = self.faulted(id) {
                return Err(RunError::Faulted { vcpu: id, fault });
            }
        }
        // A debugger resuming is attached: it takes a hold-until-attached over.
        self.attach_hold = false;
        let mut step_changed = false;
        for &(id, action) in actions {
            step_changed |= self.set_single_step(id, action == Action::Step)?;
        }
        let mut dropped = Vec::new();
        for (&id, v) in self.vcpus.iter_mut() {
            if let Some(p) = v.pending {
                // A fault never goes stale (rule 9).
                if p.event.fault.is_none() && !still_valid(&p, v.single_step) {
                    v.pending = None;
                    v.owed = None;
                    dropped.push(id);
                }
            }
        }
        self.order.retain(|id| !dropped.contains(id));
        let pending_left = self.has_pending();
        if !pending_left {
            for &(id, _) in actions {
                if let Some(v) = self.vcpus.get_mut(&id) {
                    v.hold = false;
                    v.posted = false;
                    v.moved = false;
                }
            }
        }
        Ok(Resumed {
            step_changed,
            dropped,
            pending_left,
        })
    }

    /// Ends the session: a new session number, single-step off everywhere,
    /// every posted stop dropped with its step-over, every vCPU released —
    /// but for a [hold until attached](Self::hold_until_attached) still in
    /// force, which no session took over (rule 8).
    /// Returns whether some single-step flag changed.
    pub fn detach(&mut self) -> bool {
        self.session = self.session.wrapping_add(1);
        self.order.clear();
        let mut changed = false;
        let keep = self.attach_hold;
        for v in self.vcpus.values_mut() {
            changed |= v.single_step;
            v.single_step = false;
            if v.pending.take().is_some() {
                v.owed = None;
            }
            v.hold = keep;
            v.posted &= keep;
        }
        changed
    }
}

/// Where one vCPU is in stepping over the breakpoint at the pc it stopped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// Not stepping over anything.
    Idle,
    /// Asked for; the next sync arms it (or finds nothing at `pc` to step
    /// over and goes back to `Idle`).
    Requested {
        /// The pc to step over.
        pc: u64,
    },
    /// Armed: the vCPU single-steps with the breakpoint at `pc` excluded
    /// until its next debug exit. Other exits (a port access, a kick) leave
    /// it in flight; each entry applies the current intent less the
    /// exclusion (rule 4).
    InFlight {
        /// The pc being stepped over.
        pc: u64,
        /// The `int3` whose original byte is back for the step.
        sw_gpa: Option<u64>,
    },
}

impl StepPhase {
    /// The pc being (or to be) stepped over.
    pub fn pc(&self) -> Option<u64> {
        match *self {
            StepPhase::Idle => None,
            StepPhase::Requested { pc } | StepPhase::InFlight { pc, .. } => Some(pc),
        }
    }
}

/// `gd` with what KVM ignores cleared: without ENABLE, KVM turns guest
/// debugging off whatever else is set; without USE_HW_BP it does not load
/// `debugreg`. Two configurations with the same effective value need no ioctl
/// to go from one to the other.
pub fn effective(gd: GuestDebug) -> GuestDebug {
    if !gd.control.contains(ControlFlags::ENABLE) {
        return GuestDebug::DISABLED;
    }
    if gd.control.contains(ControlFlags::USE_HW_BP) {
        gd
    } else {
        GuestDebug {
            control: gd.control,
            debugreg: [0; 8],
        }
    }
}

/// The configuration for one step over the breakpoint at `pc`: `intent`
/// with every execute slot at `pc` disabled, single-step on. Returns it and
/// whether any slot was disabled. (An `int3` at `pc` is the caller's: its
/// byte is in guest memory, not in the configuration.)
pub fn exclude(intent: GuestDebug, pc: u64) -> (GuestDebug, bool) {
    let mut config = effective(intent);
    let mut dr7 = config.dr7();
    let mut any = false;
    for slot in Slot::ALL {
        if let Some(bp) = config.armed(slot) {
            if bp.kind() == HwKind::Execute && bp.addr() == pc {
                dr7 = dr7.with_global(slot, false).with_local(slot, false);
                any = true;
            }
        }
    }
    config.debugreg[7] = dr7.into_bits();
    config.control |= ControlFlags::ENABLE | ControlFlags::SINGLESTEP;
    (config, any)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x86_debugreg::Hits;

    fn ev(vcpu: usize, pc: u64) -> Pending {
        Pending {
            event: StopEvent {
                vcpu,
                pc,
                dr6: 0,
                stop: Stop::Debug {
                    single_step: true,
                    hits: Hits::default(),
                },
                fault: None,
            },
            gpa: None,
        }
    }

    #[test]
    fn an_id_outside_the_declared_vcpus_is_refused_and_changes_nothing() {
        let mut rc = RunControl::with_vcpus(2).expect("two");
        let before = rc.clone();
        assert!(matches!(
            rc.register(2),
            Err(RunError::UnknownVcpu {
                vcpu: 2,
                known: Known::Declared(2)
            })
        ));
        assert!(rc
            .resume(&[(0, Action::Step), (usize::MAX, Action::Step)], |_, _| true)
            .is_err());
        assert_eq!(rc, before, "the known id 0 was not changed either");
        assert!(RunControl::with_vcpus(MAX_VCPUS + 1).is_err());
    }

    /// EDGE.md §1: a kick is for a vCPU that may be inside `KVM_RUN`. One
    /// that posted a stop is on its own thread, outside it, and parks
    /// before entering again; a kick to it would stay pending (the signal
    /// is blocked outside `KVM_RUN`) and turn its next entry into an
    /// `EINTR` — a wasted `KVM_RUN` per stop.
    #[test]
    fn stop_all_does_not_kick_a_vcpu_that_posted_its_stop() {
        let mut rc = RunControl::new();
        rc.register(0).expect("register");
        rc.register(1).expect("register");
        let session = rc.session();
        assert_eq!(rc.post(0, ev(0, 0x10), session), Post::Posted { kick: vec![1] });
        // The debugger takes the stop, then stops everyone.
        assert!(rc.take().is_some());
        assert_eq!(rc.stop_all(), vec![1], "vCPU 0 is on its way to park");
        // Still waited for: it has not parked yet.
        assert_eq!(rc.unparked(), vec![0, 1]);
        // Once it parked and was released, it runs the guest: kicked again.
        rc.park(0);
        rc.park(1);
        rc.resume(&[(0, Action::Continue), (1, Action::Continue)], |_, _| true)
            .expect("resume");
        rc.unpark(0);
        rc.unpark(1);
        assert_eq!(rc.stop_all(), vec![0, 1]);
    }

    /// The same vCPU released before it parked (a resume raced its park)
    /// enters `KVM_RUN`: a later stop must kick it, or it never parks.
    #[test]
    fn a_vcpu_released_before_it_parked_is_kicked_again() {
        let mut rc = RunControl::new();
        rc.register(0).expect("register");
        let session = rc.session();
        rc.post(0, ev(0, 0x10), session);
        assert!(rc.take().is_some());
        rc.resume(&[(0, Action::Continue)], |_, _| true).expect("resume");
        assert_eq!(rc.stop_all(), vec![0]);
    }

    #[test]
    fn a_stop_posted_in_an_old_session_is_discarded_with_its_step_over() {
        let mut rc = RunControl::new();
        rc.register(0).expect("register");
        rc.stopped(0, 0x10);
        let old = rc.session();
        rc.detach();
        assert_eq!(rc.post(0, ev(0, 0x10), old), Post::Discarded);
        assert_eq!(rc.state(0), Ok(RunState::Running));
        assert_eq!(rc.take_owed(0), None);
    }
}
