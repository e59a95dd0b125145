//! [`VmDebug`]: the VM-wide debug handle, shared by every vCPU thread and the
//! debugger front end (a GDB stub, a VMM's API).
//!
//! It holds the *intent* (the core [`DebugState`]: which breakpoints,
//! watchpoints and single-steps the debugger wants), guest memory, a
//! generation number that moves whenever some vCPU's `KVM_SET_GUEST_DEBUG`
//! argument changes, and the run-control state machine
//! ([`crate::run_control`]), all under one lock. The all-stop operations on
//! it are in [`crate::control`]; the per-vCPU handle in [`crate::vcpu_debug`].
//!
//! Module layering (no import circle): `run_control` (pure) ← `debugger`
//! (intent, shared state) ← `control` (all-stop) and `vcpu_debug` (the vCPU's
//! thread).
//!
//! **The debugger thread never touches a vCPU.** Operations here change the
//! intent and kick ([`crate::kick`]); each vCPU's own thread applies the
//! change in [`VcpuDebug::before_run`](crate::VcpuDebug::before_run) (or
//! [`sync`](crate::VcpuDebug::sync)), at most one ioctl however many
//! operations happened in between. Register and `KVM_TRANSLATE` access while
//! stopped goes through [`VmDebug::with_parked_vcpu`], which runs on the
//! parked vCPU's thread.
//!
//! Software breakpoints patch guest memory at once (memory is shared by all
//! vCPUs) and are kept by guest-physical address ([`crate::sw_table`]): insert
//! them while the vCPUs are stopped, as a GDB stub does.
//!
//! Inserting a breakpoint that is already set counts one more use, for
//! software and hardware breakpoints alike; each remove undoes one insert, and
//! the breakpoint goes with the last (the seed refused a second identical
//! hardware breakpoint but counted software ones).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use x86_debugreg::hw::HwError;
use x86_debugreg::predict::SlotMask;
use x86_debugreg::region::Mode;
use x86_debugreg::state::{Inserted, Removed};
use x86_debugreg::sw::{RemoveAll, SwError, SwRemoved, INT3};
use x86_debugreg::watch::{Watch, WatchError, WatchHit, WatchKind, WatchSlots};
use x86_debugreg::{BreakpointError, BreakpointType, DebugState, GuestDebug, HwBreakpoint, Slot, Stop};

use crate::error::{Error, Result};
use crate::kick::Kick;
use crate::memory::{translate, AddressSpace, MemoryError, PhysicalMemory};
use crate::probe::{Int1Pc, Vendor};
use crate::run_control::{effective, Pending, RunControl, StopEvent};
use crate::sw_table::{Lookup, Request, Requests, SpaceKind};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, MutexGuard, Ordering, RwLock};
use crate::vcpu::VcpuOps;

/// Whether a single-step lets a pending interrupt in ([`VmDebug::step_irqs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepIrqs {
    /// Steps carry `KVM_GUESTDBG_BLOCKIRQ`: KVM delivers no interrupt while
    /// the vCPU single-steps, so a step stays in the stepped code (QEMU does
    /// this since 6.2).
    Blocked,
    /// Steps let interrupts in: a step with one pending lands at the first
    /// instruction of the guest's handler.
    Delivered,
}

/// A job for a parked vCPU's thread.
pub(crate) type Job = Box<dyn FnOnce(&dyn VcpuOps) + Send>;

/// The outcome of a successful [`VmDebug::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// The breakpoint is set, or (already set) counted once more.
    Inserted(Inserted),
    /// All four debug address registers are in use: a normal answer, not a
    /// failure (a GDB stub replies with an empty packet and GDB falls back).
    NoFreeSlot,
}

pub(crate) struct Inner<M> {
    pub(crate) state: DebugState,
    /// The debugger's requests behind each software breakpoint (by GPA).
    pub(crate) requests: Requests,
    /// Every hardware breakpoint and watchpoint: regions planned into
    /// aligned pieces, identical pieces sharing a slot, each insert counted.
    /// (The core state's own `HwSlots` stays empty.)
    pub(crate) watch: WatchSlots,
    /// For each read watchpoint, the watched bytes as of the last stop.
    pub(crate) read_saved: BTreeMap<Watch, Vec<u8>>,
    /// Per vCPU, the watchpoints its last reported stop hit (read ones only
    /// when their value check said "read").
    pub(crate) stop_hits: Vec<Vec<WatchHit>>,
    pub(crate) mem: M,
    pub(crate) int1_pc: Int1Pc,
    /// Run control: holds, parks, posted stops, step-over debts, sessions.
    pub(crate) run: RunControl,
    /// Jobs for parked vCPUs' threads, by vCPU (registered ids only).
    pub(crate) jobs: BTreeMap<usize, VecDeque<Job>>,
    /// vCPUs an [`IdleWaker`](crate::idle::IdleWaker) woke that have not
    /// seen it yet ([`crate::idle`]).
    pub(crate) idle_wakes: BTreeSet<usize>,
    /// vCPUs in [`wait_idle`](crate::VcpuDebug::wait_idle) now: outside
    /// `KVM_RUN`, and not kicked (what would kick them ends the wait; a
    /// signal kick would stay queued there, one more per stop).
    pub(crate) idle_waiting: BTreeSet<usize>,
    /// Per vCPU, moves whenever what a parked reader saw of it may have
    /// changed: it left its park (or handed its thread back to the VMM from
    /// `poll_park`), or a job that may write it was queued. What was read
    /// from a parked vCPU at one value stays true while the value stands
    /// ([`VmDebug::parked_epoch`]).
    pub(crate) epochs: BTreeMap<usize, u64>,
    /// What each parked vCPU waits on: one condition variable per vCPU, so
    /// a job for one vCPU, or a release of some, wakes only those (the
    /// shared one, `Shared::cond`, is for the debugger's waits: parks and
    /// posted stops). Used with the same lock as everything else.
    pub(crate) wakes: BTreeMap<usize, Arc<Condvar>>,
    /// Whether a vCPU that parks with its own stop posted reads its general
    /// and segment registers ([`AtStop`]) on its thread, just after the
    /// stop is announced (the GDB server asks, for its session).
    #[cfg(feature = "gdb")]
    pub(crate) read_at_stop: bool,
    /// What each such vCPU read, until the debugger takes it.
    #[cfg(feature = "gdb")]
    pub(crate) at_stop: BTreeMap<usize, AtStop>,
    /// The vCPUs reading it now: parked, their stop announced, the read
    /// not yet in `at_stop`.
    #[cfg(feature = "gdb")]
    pub(crate) reading_at_stop: BTreeSet<usize>,
    /// How long a vCPU that parks with its own stop posted busy-polls for
    /// its release before it sleeps (the GDB server sets its session's
    /// window: the vCPU stepped is usually stepped again at once).
    #[cfg(feature = "gdb")]
    pub(crate) park_poll: std::time::Duration,
}

/// The registers a vCPU read as it parked with its stop posted: what a
/// debugger needs first at every stop (the pc, stack and frame pointers
/// for the stop reply; the paging registers for memory reads), without
/// waking the vCPU again.
#[cfg(feature = "gdb")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AtStop {
    /// The vCPU's epoch when they were read: they are current while it
    /// stands (see `Inner::epochs`).
    pub(crate) epoch: u64,
    pub(crate) regs: kvm_bindings::kvm_regs,
    pub(crate) sregs: kvm_bindings::kvm_sregs,
    /// [`VcpuOps::translates_by_page_walk`] of the vCPU.
    pub(crate) walks: bool,
}

impl<M> Inner<M> {
    /// What was read of `vcpu` so far may be stale now (see `epochs`).
    pub(crate) fn touch(&mut self, vcpu: usize) {
        let e = self.epochs.entry(vcpu).or_default();
        *e = e.wrapping_add(1);
    }

    /// What parked `vcpu` waits on (see `wakes`).
    pub(crate) fn wake_of(&mut self, vcpu: usize) -> Arc<Condvar> {
        Arc::clone(self.wakes.entry(vcpu).or_insert_with(|| Arc::new(Condvar::new())))
    }

    /// What every vCPU that has waited waits on.
    pub(crate) fn all_wakes(&self) -> Vec<Arc<Condvar>> {
        self.wakes.values().map(Arc::clone).collect()
    }

    /// `vcpu`'s current epoch (see `epochs`).
    pub(crate) fn epoch(&self, vcpu: usize) -> u64 {
        self.epochs.get(&vcpu).copied().unwrap_or(0)
    }

    pub(crate) fn single_step(&self, vcpu: usize) -> bool {
        self.run.single_step(vcpu)
    }

    /// The configuration vCPU `vcpu` should run with.
    pub(crate) fn config_for(&self, vcpu: usize) -> GuestDebug {
        self.watch
            .guest_debug(self.state.guest_debug_for(self.single_step(vcpu)))
    }

    /// What the intent looks like to vCPUs, single-step aside.
    fn shape(&self) -> GuestDebug {
        effective(self.watch.guest_debug(self.state.guest_debug_for(false)))
    }
}

/// Whether a posted stop still means something to the debugger
/// (`stepping_now`: whether its vCPU is single-stepped now).
pub(crate) fn still_valid(state: &DebugState, watch: &WatchSlots, p: &Pending, stepping_now: bool) -> bool {
    match p.event.stop {
        Stop::Software { .. } => p.gpa.is_some_and(|gpa| state.sw().contains(gpa)),
        Stop::Debug { single_step, hits } => {
            let stepping = single_step && stepping_now;
            // Still armed: some slot holds the very breakpoint that was hit
            // (a slot freed and reused for another address does not keep
            // the old hit alive; the same breakpoint re-inserted elsewhere
            // does).
            let now = watch.guest_debug(state.guest_debug_for(false));
            let still_armed = hits
                .iter()
                .any(|h| Slot::ALL.iter().any(|&s| now.armed(s) == Some(h.breakpoint)));
            stepping || still_armed
        }
    }
}

/// Wakes the parked vCPUs that wait on `wakes` (call with the lock
/// released: a woken vCPU takes it first thing), and moves
/// `Shared::wakes_sent` for a vCPU that busy-polls instead.
pub(crate) fn wake<M>(shared: &Shared<M>, wakes: &[Arc<Condvar>]) {
    #[cfg(feature = "gdb")]
    shared.wakes_sent.fetch_add(1, Ordering::AcqRel);
    #[cfg(not(feature = "gdb"))]
    let _ = shared;
    for w in wakes {
        w.notify_all();
    }
}

/// Busy-polls, yielding the CPU between looks, until `count` has moved
/// from `seen` (read under the lock, before it was dropped) or `window`
/// has passed since `start`.
#[cfg(feature = "gdb")]
pub(crate) fn poll_until_moved(count: &AtomicU64, seen: u64, start: std::time::Instant, window: std::time::Duration) {
    while count.load(Ordering::Acquire) == seen && start.elapsed() < window {
        std::thread::yield_now();
    }
}

pub(crate) struct Shared<M> {
    /// Moves (under the `inner` lock) whenever a vCPU's configuration may
    /// have changed.
    pub(crate) generation: AtomicU64,
    /// The intent and the run control: one lock, so a vCPU's configuration,
    /// its session and its run state are always read together.
    pub(crate) inner: Mutex<Inner<M>>,
    /// Wakes waiting debuggers (parks, posted stops); used with `inner`.
    /// Parked vCPUs wait on their own (`Inner::wakes`).
    pub(crate) cond: Condvar,
    /// How many threads wait on `cond` (changed with `inner` held, before
    /// and after each wait): with none, a notify is skipped — it would be a
    /// system call that wakes nobody, several per step.
    pub(crate) cond_waiters: AtomicU64,
    pub(crate) kick: RwLock<Option<std::sync::Arc<dyn Kick>>>,
    /// Readable while a posted stop may be waiting.
    pub(crate) stop_fd: EventFd,
    /// Moves (under the `inner` lock) whenever a vCPU posts a stop: a
    /// debugger that saw it unchanged since it last looked under the lock
    /// knows no stop was posted meanwhile without taking the lock (which a
    /// vCPU it just released is about to take).
    pub(crate) posts: AtomicU64,
    /// Moves (after the state change, under the `inner` lock, that made
    /// it) whenever parked vCPUs are woken: one that busy-polls for its
    /// release watches it without the lock.
    #[cfg(feature = "gdb")]
    pub(crate) wakes_sent: AtomicU64,
    /// Moves (under the `inner` lock) whenever a vCPU ends its read at a
    /// stop (`reading_at_stop`): a debugger waiting for one may watch it
    /// without the lock.
    #[cfg(feature = "gdb")]
    pub(crate) reads_at_stop: AtomicU64,
    /// 1: single-steps carry `KVM_GUESTDBG_BLOCKIRQ` ([`StepIrqs::Blocked`]).
    pub(crate) block_irq: AtomicU64,
}

impl<M> Shared<M> {
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Inner<M>>> {
        self.inner.lock().map_err(|_| Error::Poisoned)
    }

    pub(crate) fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Wakes the threads waiting on `cond`, if any. Call after changing the
    /// state under the lock (held or released since): a waiter counts
    /// itself with the lock held and keeps it until its wait releases it,
    /// so either this sees it counted or it saw the change before waiting.
    pub(crate) fn notify_debugger(&self) {
        if self.cond_waiters.load(Ordering::Acquire) > 0 {
            self.cond.notify_all();
        }
    }

    /// Waits on `cond` with `guard` (at most `timeout`), counted in
    /// `cond_waiters`.
    pub(crate) fn wait_debugger<'a>(
        &self,
        guard: MutexGuard<'a, Inner<M>>,
        timeout: Option<std::time::Duration>,
    ) -> Result<MutexGuard<'a, Inner<M>>> {
        self.cond_waiters.fetch_add(1, Ordering::AcqRel);
        let woke = match timeout {
            None => self.cond.wait(guard).map_err(|_| Error::Poisoned),
            Some(t) => self
                .cond
                .wait_timeout(guard, t)
                .map(|(g, _)| g)
                .map_err(|_| Error::Poisoned),
        };
        self.cond_waiters.fetch_sub(1, Ordering::AcqRel);
        woke
    }

    /// Kicks each of `ids`; the first failure is returned after all were tried.
    pub(crate) fn kick(&self, ids: &[usize]) -> Result<()> {
        // A vCPU waiting after a `hlt` exit (crate::idle) is outside
        // KVM_RUN, where no kick reaches it: what kicks it ends that wait.
        // Every caller changed the state under the lock before calling.
        let kick = self.kick.read().map_err(|_| Error::Poisoned)?.clone();
        let Some(kick) = kick else {
            self.notify_debugger();
            return Ok(());
        };
        // Nor is it kicked: it leaves the wait under the lock, after which
        // it sees the change (made before this look) and calls before_run
        // before any KVM_RUN. A signal kick sent to it would only queue
        // (blocked outside KVM_RUN), one more per stop, until the queue is
        // full and kicks fail. Looked at before the notify that ends the
        // wait; one that ended meanwhile (a caller notified already, or a
        // timeout) drops what it was sent as it leaves (`Kick::drop_pending`).
        let ids: Vec<usize> = {
            let inner = self.lock()?;
            ids.iter()
                .copied()
                .filter(|id| !inner.idle_waiting.contains(id))
                .collect()
        };
        self.notify_debugger();
        let mut first = Ok(());
        for &id in &ids {
            if let Err(source) = kick.kick(id) {
                if first.is_ok() {
                    first = Err(Error::Kick { vcpu: id, source });
                }
            }
        }
        first
    }

    /// Kicks every live vCPU that is not parked, so it applies a changed intent.
    pub(crate) fn kick_running(&self) -> Result<()> {
        let ids = self.lock()?.run.unparked();
        self.kick(&ids)
    }

    /// Ends vCPU `id`'s read at its stop (`reading_at_stop`), keeping
    /// what it read if it read anything, and wakes a debugger waiting for
    /// it (asleep, or watching `reads_at_stop`).
    #[cfg(feature = "gdb")]
    pub(crate) fn end_read_at_stop(&self, id: usize, read: Option<AtStop>) -> Result<()> {
        {
            let mut inner = self.lock()?;
            inner.reading_at_stop.remove(&id);
            if let Some(a) = read {
                inner.at_stop.insert(id, a);
            }
            self.reads_at_stop.fetch_add(1, Ordering::AcqRel);
        }
        self.notify_debugger();
        Ok(())
    }

    pub(crate) fn signal_stop(&self) {
        // The counter saturates rather than fails in practice; a failed write
        // only loses a wake-up of a poller that also has a timeout.
        let _ = self.stop_fd.write(1);
    }
}

/// The VM-wide debug handle. Cheap to clone; every clone is the same state.
///
/// ```no_run
/// use kvm_glue::{guest::Guest, AddressSpace, VmDebug};
/// use x86_debugreg::BreakpointType;
/// let mut guest = Guest::new(1)?;
/// let dbg = VmDebug::new(guest.memory().clone());
/// let mut vcpu_dbg = dbg.vcpu(0)?;
/// dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, 0x1_0006, 1)?;
/// vcpu_dbg.sync(guest.vcpu(0))?; // one KVM_SET_GUEST_DEBUG, then KVM_RUN
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct VmDebug<M> {
    pub(crate) shared: Arc<Shared<M>>,
}

impl<M> Clone for VmDebug<M> {
    fn clone(&self) -> Self {
        VmDebug {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M> fmt::Debug for VmDebug<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmDebug")
            .field("generation", &self.shared.generation.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// Where the guest's own `int1` leaves the pc, from the CPU vendor (CPUID):
/// Intel's VMX reports the exit at the `int1` ([`Int1Pc::AtInstruction`]);
/// on AMD an `int1` gives no exit at all, and any `#DB` exit there is a trap
/// ([`Int1Pc::AfterInstruction`]); anything else is [`Int1Pc::Unknown`].
/// No VM is booted: this works under a seccomp filter. The probe
/// ([`crate::probe`]) stays available as a cross-check.
pub fn int1_pc_from_cpuid() -> Int1Pc {
    match Vendor::this_cpu() {
        Vendor::Intel => Int1Pc::AtInstruction,
        Vendor::Amd => Int1Pc::AfterInstruction,
        Vendor::Other => Int1Pc::Unknown,
    }
}

impl<M: GuestMemory> VmDebug<M> {
    /// A handle with nothing set, over guest memory `mem`. The `int1` pc rule
    /// comes from the CPU vendor ([`int1_pc_from_cpuid`]); override it with
    /// [`set_int1_pc`](Self::set_int1_pc).
    ///
    /// The VM's vCPUs are those registered by [`vcpu`](Self::vcpu) (ids below
    /// [`MAX_VCPUS`](crate::run_control::MAX_VCPUS)); an id never registered
    /// is [`RunError::UnknownVcpu`](crate::run_control::RunError) to every
    /// call that takes one. [`with_vcpus`](Self::with_vcpus) declares them
    /// up front instead.
    pub fn new(mem: M) -> VmDebug<M> {
        Self::with_run(mem, RunControl::new())
    }

    /// A handle for a VM with vCPUs `0..count`, known from the start: ids
    /// from `count` on are refused, also by [`vcpu`](Self::vcpu).
    ///
    /// # Errors
    /// [`Error::Run`] if `count` exceeds
    /// [`MAX_VCPUS`](crate::run_control::MAX_VCPUS).
    pub fn with_vcpus(mem: M, count: usize) -> Result<VmDebug<M>> {
        Ok(Self::with_run(mem, RunControl::with_vcpus(count)?))
    }

    fn with_run(mem: M, run: RunControl) -> VmDebug<M> {
        let stop_fd = match EventFd::new(EFD_NONBLOCK) {
            Ok(fd) => fd,
            // Only fails when the process is out of file descriptors.
            Err(e) => panic!("kvm-glue: cannot create an eventfd: {e}"),
        };
        VmDebug {
            shared: Arc::new(Shared {
                generation: AtomicU64::new(0),
                inner: Mutex::new(Inner {
                    state: DebugState::new(),
                    requests: Requests::default(),
                    watch: WatchSlots::new(Mode::Long),
                    read_saved: BTreeMap::new(),
                    stop_hits: Vec::new(),
                    mem,
                    int1_pc: int1_pc_from_cpuid(),
                    run,
                    jobs: BTreeMap::new(),
                    idle_wakes: BTreeSet::new(),
                    idle_waiting: BTreeSet::new(),
                    epochs: BTreeMap::new(),
                    wakes: BTreeMap::new(),
                    #[cfg(feature = "gdb")]
                    read_at_stop: false,
                    #[cfg(feature = "gdb")]
                    park_poll: std::time::Duration::ZERO,
                    #[cfg(feature = "gdb")]
                    at_stop: BTreeMap::new(),
                    #[cfg(feature = "gdb")]
                    reading_at_stop: BTreeSet::new(),
                }),
                cond: Condvar::new(),
                cond_waiters: AtomicU64::new(0),
                kick: RwLock::new(None),
                stop_fd,
                posts: AtomicU64::new(0),
                #[cfg(feature = "gdb")]
                wakes_sent: AtomicU64::new(0),
                #[cfg(feature = "gdb")]
                reads_at_stop: AtomicU64::new(0),
                block_irq: AtomicU64::new(u64::from(crate::probe::host_block_irq())),
            }),
        }
    }

    /// Whether a single-step keeps interrupts out of the stepped code.
    ///
    /// By default a step is [`StepIrqs::Blocked`] where the host reports
    /// `KVM_GUESTDBG_BLOCKIRQ` in `KVM_CAP_SET_GUEST_DEBUG2` (Linux 5.16 on;
    /// probed once per process, [`host_block_irq`](crate::probe::host_block_irq)),
    /// and [`StepIrqs::Delivered`] where it does not: there a step with an
    /// interrupt pending lands in the guest's interrupt handler, as KVM
    /// always did before that flag.
    pub fn step_irqs(&self) -> StepIrqs {
        if self.shared.block_irq.load(Ordering::Acquire) == 1 {
            StepIrqs::Blocked
        } else {
            StepIrqs::Delivered
        }
    }

    /// Chooses whether single-steps block interrupts (see
    /// [`step_irqs`](Self::step_irqs)). Takes effect at each vCPU's next
    /// sync (the generation moves).
    ///
    /// # Errors
    /// [`Error::HostLacks`] for [`StepIrqs::Blocked`] where the host's KVM
    /// does not report `KVM_GUESTDBG_BLOCKIRQ` (it would refuse every step
    /// with `EINVAL`); nothing changes then.
    pub fn set_step_irqs(&self, irqs: StepIrqs) -> Result<()> {
        let on = match irqs {
            StepIrqs::Blocked if !crate::probe::host_block_irq() => {
                return Err(Error::HostLacks {
                    what: "KVM_GUESTDBG_BLOCKIRQ in KVM_CAP_SET_GUEST_DEBUG2",
                })
            }
            StepIrqs::Blocked => 1,
            StepIrqs::Delivered => 0,
        };
        let _guard = self.shared.lock()?;
        self.shared.block_irq.store(on, Ordering::Release);
        self.shared.bump();
        Ok(())
    }

    /// The current generation (moves when some vCPU's configuration changes).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// A copy of the intent. Software breakpoints in it are keyed by
    /// guest-physical address. Its hardware slots are always empty: kvm-glue
    /// keeps hardware breakpoints and watchpoints in
    /// [`watch_slots`](Self::watch_slots).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn state(&self) -> Result<DebugState> {
        Ok(self.shared.lock()?.state.clone())
    }

    /// The debugger's requests behind the software breakpoint at
    /// guest-physical address `gpa` (one per outstanding insert).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn requests_at(&self, gpa: u64) -> Result<Vec<Request>> {
        Ok(self.shared.lock()?.requests.at(gpa).to_vec())
    }

    /// The configuration vCPU `vcpu` should run with (the intent).
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU; [`Error::Poisoned`].
    pub fn guest_debug_for(&self, vcpu: usize) -> Result<GuestDebug> {
        let inner = self.shared.lock()?;
        inner.run.check(vcpu)?;
        Ok(inner.config_for(vcpu))
    }

    /// Overrides where this host's KVM puts the pc of the guest's own `int1`
    /// exit (by default from [`int1_pc_from_cpuid`]; [`Int1Pc::Unknown`]
    /// makes the handle look for an `int1` opcode at the pc instead).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn set_int1_pc(&self, at: Int1Pc) -> Result<()> {
        self.shared.lock()?.int1_pc = at;
        Ok(())
    }

    /// The `int1` pc rule in force.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn int1_pc(&self) -> Result<Int1Pc> {
        Ok(self.shared.lock()?.int1_pc)
    }

    /// Registers how to kick a vCPU out of `KVM_RUN` ([`crate::kick`]). Without
    /// one, changes wait for each vCPU's next exit, and [`stop_all`](Self::stop_all)
    /// for vCPUs that exit by themselves.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn set_kick(&self, kick: std::sync::Arc<dyn Kick>) -> Result<()> {
        *self.shared.kick.write().map_err(|_| Error::Poisoned)? = Some(kick);
        Ok(())
    }

    /// Runs `op` on the intent; if the `KVM_SET_GUEST_DEBUG` argument of some
    /// vCPU changed, moves the generation and kicks the running vCPUs.
    fn change<T>(&self, op: impl FnOnce(&mut Inner<M>) -> T) -> Result<T> {
        let (out, changed) = {
            let mut inner = self.shared.lock()?;
            let before = inner.shape();
            let out = op(&mut inner);
            // A second software breakpoint changes memory, not the argument.
            let changed = inner.shape() != before;
            if changed {
                self.shared.bump();
            }
            (out, changed)
        };
        if changed {
            self.shared.kick_running()?;
        }
        Ok(out)
    }

    /// Inserts a breakpoint of GDB type `ty` at `addr` (`len` is for
    /// watchpoints). A software breakpoint's address is in `space` and is
    /// translated now; the `int3` is kept by guest-physical address.
    /// Hardware ones take linear addresses and ignore `space`.
    ///
    /// # Errors
    /// [`Error::Breakpoint`] for what the core refuses (misaligned, bad
    /// length, memory failure), [`Error::Memory`] if a virtual address does
    /// not translate; nothing changes then. A full set of slots is
    /// [`Insert::NoFreeSlot`], not an error.
    pub fn insert(&self, space: AddressSpace<'_>, ty: BreakpointType, addr: u64, len: u64) -> Result<Insert> {
        if ty == BreakpointType::Software {
            let (gpa, kind) = resolve(space, addr)?;
            return self.change(|inner| {
                let mut mem = PhysicalMemory(&inner.mem);
                let done = inner
                    .state
                    .insert(&mut mem, ty, gpa, len)
                    .map_err(|e| relabel(e, gpa, addr))?;
                inner.requests.add(gpa, Request { addr, space: kind });
                Ok(Insert::Inserted(done))
            })?;
        }
        let watch = single_slot(ty, addr, len)?;
        self.change(|inner| match inner.watch.insert(watch) {
            Ok(slots) => Ok(Insert::Inserted(Inserted::Hardware(first(slots)))),
            Err(WatchError::Full { .. } | WatchError::TooLarge { .. }) => Ok(Insert::NoFreeSlot),
            Err(e) => Err(Error::Watch(e)),
        })?
    }

    /// Removes one use of a breakpoint of GDB type `ty` at `addr`.
    ///
    /// A software breakpoint is found by the request that inserted it (the
    /// same address in the same kind of space) and restored through the
    /// guest-physical address recorded then; the address is translated only
    /// when the same virtual address was inserted under two translations.
    ///
    /// # Errors
    /// [`Error::Breakpoint`] (including not found); nothing changes then.
    pub fn remove(&self, space: AddressSpace<'_>, ty: BreakpointType, addr: u64, len: u64) -> Result<Removed> {
        if ty == BreakpointType::Software {
            let kind = space_kind(space);
            let req = Request { addr, space: kind };
            return self.change(|inner| {
                let gpa = match inner.requests.lookup(req) {
                    Lookup::Found(gpa) => gpa,
                    Lookup::NotFound => return Err(not_found(addr)),
                    Lookup::Ambiguous => {
                        let (gpa, _) = resolve(space, addr)?;
                        if !inner.requests.has(gpa, req) {
                            return Err(not_found(addr));
                        }
                        gpa
                    }
                };
                let mut mem = PhysicalMemory(&inner.mem);
                let done = inner
                    .state
                    .remove(&mut mem, ty, gpa, len)
                    .map_err(|e| relabel(e, gpa, addr))?;
                inner.requests.forget_one(gpa, req);
                if let Removed::Software(SwRemoved::GuestOverwrote { .. }) = done {
                    inner.requests.forget_gpa(gpa);
                }
                Ok(done)
            })?;
        }
        let watch = single_slot(ty, addr, len)?;
        let bp = HwBreakpoint::from_gdb(ty, addr, len).map_err(|e| Error::Breakpoint(BreakpointError::Hw(e)))?;
        self.change(|inner| match inner.watch.remove(&watch) {
            Ok(slots) => Ok(Removed::Hardware(first(slots))),
            Err(WatchError::NotFound { .. }) => Err(Error::Breakpoint(BreakpointError::Hw(HwError::NotFound { bp }))),
            Err(e) => Err(Error::Watch(e)),
        })?
    }

    /// Frees every hardware slot and removes every software breakpoint,
    /// restoring each `int3` through the guest-physical address recorded at
    /// insert time (no translation). Entries whose memory failed stay set and
    /// are listed in the answer (by guest-physical address).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn remove_all(&self) -> Result<RemoveAll<MemoryError>> {
        self.change(|inner| {
            let mut mem = PhysicalMemory(&inner.mem);
            let out = inner.state.remove_all(&mut mem);
            inner.watch.clear();
            inner.read_saved.clear();
            let kept: Vec<u64> = out.failed.iter().map(|(gpa, _)| *gpa).collect();
            let requests = std::mem::take(&mut inner.requests);
            for gpa in kept {
                for req in requests.at(gpa) {
                    inner.requests.add(gpa, *req);
                }
            }
            out
        })
    }

    /// Watches any region: `watch` (any length, any alignment; see
    /// [`x86_debugreg::watch`]) is planned into aligned pieces, identical
    /// pieces share a slot, and the whole watchpoint goes in or nothing does.
    /// Returns the slots it uses, or `None` if the free slots cannot hold it
    /// (GDB then falls back to software watchpoints). Inserting the same
    /// watchpoint again counts once more.
    ///
    /// A [`WatchKind::Read`] watchpoint is a read/write slot plus a value
    /// check: its bytes are read now through `space` (hardware addresses are
    /// linear: `Virtual` translates them with that vCPU, `Physical` takes
    /// them as they are) and again at each hit, in
    /// [`VcpuDebug::handle_exit`](crate::VcpuDebug::handle_exit); a hit where they changed was a write and
    /// is not a stop. A write of the same value is reported as a read.
    ///
    /// # Errors
    /// [`Error::Memory`] if a read watchpoint's bytes cannot be read;
    /// nothing changes then.
    pub fn insert_watch(&self, space: AddressSpace<'_>, watch: Watch) -> Result<Option<SlotMask>> {
        let bytes = if watch.kind() == WatchKind::Read {
            // Plan first, on a copy: a region the free slots cannot hold is
            // "no" before anything is read, so the saved value below is
            // never sized by a length nobody checked (at most four slots of
            // 8 bytes once the plan fits).
            match self.watch_slots()?.insert(watch) {
                Ok(_) => {}
                Err(WatchError::Full { .. } | WatchError::TooLarge { .. }) => return Ok(None),
                Err(e) => return Err(Error::Watch(e)),
            }
            let len = usize::try_from(watch.len()).map_err(|_| MemoryError::Wraps {
                addr: watch.addr(),
                len: usize::MAX,
            })?;
            let mut buf = vec![0; len];
            self.read_memory(space, watch.addr(), &mut buf)?;
            Some(buf)
        } else {
            None
        };
        self.change(|inner| match inner.watch.insert(watch) {
            Ok(slots) => {
                if let Some(bytes) = bytes {
                    inner.read_saved.entry(watch).or_insert(bytes);
                }
                Ok(Some(slots))
            }
            Err(WatchError::Full { .. } | WatchError::TooLarge { .. }) => Ok(None),
            Err(e) => Err(Error::Watch(e)),
        })?
    }

    /// Removes one insert of `watch`; its slots are freed when no other
    /// watchpoint shares them. Returns the slots it used.
    ///
    /// # Errors
    /// [`Error::Watch`] if `watch` is not set; nothing changes then.
    pub fn remove_watch(&self, watch: Watch) -> Result<SlotMask> {
        self.change(|inner| {
            let slots = inner.watch.remove(&watch).map_err(Error::Watch)?;
            if inner.watch.count(&watch) == 0 {
                inner.read_saved.remove(&watch);
            }
            Ok(slots)
        })?
    }

    /// The slots and the watchpoints sharing them (a copy).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn watch_slots(&self) -> Result<WatchSlots> {
        Ok(self.shared.lock()?.watch.clone())
    }

    /// The watchpoints (and execute breakpoints) `event`'s vCPU hit at its
    /// last reported stop, with the addresses and lengths they were set with
    /// (not their pieces'). A read watchpoint is listed only when its value
    /// check said "read".
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn watch_hits(&self, event: &StopEvent) -> Result<Vec<WatchHit>> {
        let inner = self.shared.lock()?;
        Ok(inner.stop_hits.get(event.vcpu).cloned().unwrap_or_default())
    }

    /// Turns single-step on or off for vCPU `vcpu` only.
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU (nothing changes then);
    /// [`Error::Poisoned`]; [`Error::Kick`] if the vCPU could not be kicked
    /// (the change is made regardless).
    pub fn set_single_step(&self, vcpu: usize, on: bool) -> Result<()> {
        let changed = {
            let mut inner = self.shared.lock()?;
            let changed = inner.run.set_single_step(vcpu, on)?;
            if changed {
                self.shared.bump();
            }
            changed
        };
        if changed {
            self.shared.kick_running()?;
        }
        Ok(())
    }

    /// Whether vCPU `vcpu` single-steps.
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU; [`Error::Poisoned`].
    pub fn single_step(&self, vcpu: usize) -> Result<bool> {
        let inner = self.shared.lock()?;
        inner.run.check(vcpu)?;
        Ok(inner.single_step(vcpu))
    }

    /// Runs `f` on guest memory as it is (no `int3` hidden), under the
    /// debug state's lock.
    #[cfg(feature = "gdb")]
    pub(crate) fn with_raw_memory<R>(&self, f: impl FnOnce(&M) -> R) -> Result<R> {
        Ok(f(&self.shared.lock()?.mem))
    }

    /// Reads guest memory at `addr` in `space` into `buf`, page by page, with
    /// software breakpoints hidden: bytes under an `int3` read as the
    /// original byte.
    ///
    /// # Errors
    /// [`Error::Memory`] if an address does not translate or is not guest
    /// memory; `buf` may then be partly written, guest memory is untouched.
    pub fn read_memory(&self, space: AddressSpace<'_>, addr: u64, buf: &mut [u8]) -> Result<()> {
        let inner = self.shared.lock()?;
        let mut done = 0;
        for (gpa, len) in read_linear(&inner.mem, space, addr, buf)? {
            for (i, byte) in buf[done..done + len].iter_mut().enumerate() {
                if let Some(entry) = inner.state.sw().get(gpa + i as u64) {
                    *byte = entry.saved;
                }
            }
            done += len;
        }
        Ok(())
    }

    /// Writes `data` to guest memory at `addr` in `space`. A byte under a
    /// software breakpoint updates the byte the breakpoint will restore, and
    /// the `int3` stays. A read watchpoint over the written bytes takes the
    /// new bytes as its saved value (the debugger's write is not the
    /// guest's). Every page is translated and checked before any
    /// byte is written: a failed write changes nothing.
    ///
    /// # Errors
    /// [`Error::Memory`] if an address does not translate or is not guest
    /// memory.
    pub fn write_memory(&self, space: AddressSpace<'_>, addr: u64, data: &[u8]) -> Result<()> {
        let chunks = chunks(space, addr, data.len())?;
        let mut inner = self.shared.lock()?;
        for &(gpa, len) in &chunks {
            if !inner
                .mem
                .check_range(GuestAddress(gpa), len, vm_memory::Permissions::Write)
            {
                return Err(MemoryError::Unbacked { gpa, len }.into());
            }
        }
        let mut done = 0;
        for (gpa, len) in chunks {
            let mut bytes = data[done..done + len].to_vec();
            for (i, byte) in bytes.iter_mut().enumerate() {
                let at = gpa + i as u64;
                if inner.state.replace_saved(at, *byte).is_some() {
                    *byte = INT3;
                }
            }
            inner
                .mem
                .write_slice(&bytes, GuestAddress(gpa))
                .map_err(|source| MemoryError::Access { gpa, source })?;
            done += len;
        }
        // A debugger's write under a read watchpoint is not the guest's:
        // the value check must compare against what is there now.
        let end = addr.saturating_add(data.len() as u64);
        let touched: Vec<(Watch, usize)> = inner
            .read_saved
            .iter()
            .filter(|(w, _)| w.addr() < end && addr < w.addr().saturating_add(w.len()))
            .map(|(w, b)| (*w, b.len()))
            .collect();
        for (watch, len) in touched {
            // Best effort, after the write: a watched range that cannot be
            // read keeps its old copy rather than fail a write that already
            // happened.
            let mut now = vec![0u8; len];
            if read_linear(&inner.mem, space, watch.addr(), &mut now).is_ok() {
                inner.read_saved.insert(watch, now);
            }
        }
        Ok(())
    }
}

/// The single aligned slot a GDB `Z1`–`Z4` asks for, validated with the
/// seed's rules (aligned, length 1/2/4/8, no read-only kind): `insert` and
/// `remove` keep them; [`VmDebug::insert_watch`] takes any region.
fn single_slot(ty: BreakpointType, addr: u64, len: u64) -> Result<Watch> {
    HwBreakpoint::from_gdb(ty, addr, len).map_err(|e| Error::Breakpoint(BreakpointError::Hw(e)))?;
    Watch::from_gdb(ty, addr, len).map_err(Error::Watch)
}

/// The lowest slot of a non-empty mask (DR0 for an empty one, which a
/// successful insert or remove never returns).
fn first(slots: SlotMask) -> Slot {
    Slot::ALL.into_iter().find(|s| slots.contains(*s)).unwrap_or(Slot::DR0)
}

fn space_kind(space: AddressSpace<'_>) -> SpaceKind {
    match space {
        AddressSpace::Physical => SpaceKind::Physical,
        AddressSpace::Virtual(_) => SpaceKind::Virtual,
    }
}

/// The guest-physical address of `addr` in `space`.
fn resolve(space: AddressSpace<'_>, addr: u64) -> Result<(u64, SpaceKind), MemoryError> {
    match space {
        AddressSpace::Physical => Ok((addr, SpaceKind::Physical)),
        AddressSpace::Virtual(vcpu) => Ok((translate(vcpu, addr)?, SpaceKind::Virtual)),
    }
}

/// Reads `buf.len()` bytes at `addr` in `space` (no `int3` hiding); returns
/// the guest-physical pieces read, in order.
pub(crate) fn read_linear<M: GuestMemory>(
    mem: &M,
    space: AddressSpace<'_>,
    addr: u64,
    buf: &mut [u8],
) -> Result<Vec<(u64, usize)>, MemoryError> {
    let pieces = chunks(space, addr, buf.len())?;
    let mut done = 0;
    for &(gpa, len) in &pieces {
        mem.read_slice(&mut buf[done..done + len], GuestAddress(gpa))
            .map_err(|source| MemoryError::Access { gpa, source })?;
        done += len;
    }
    Ok(pieces)
}

/// `[addr, addr + len)` in `space` as guest-physical pieces, one per 4 KiB page.
fn chunks(space: AddressSpace<'_>, addr: u64, len: usize) -> Result<Vec<(u64, usize)>, MemoryError> {
    const PAGE: u64 = 0x1000;
    let mut out = Vec::new();
    let mut at = addr;
    let mut left = len as u64;
    while left > 0 {
        let in_page = (PAGE - at % PAGE).min(left);
        let (gpa, _) = resolve(space, at)?;
        out.push((gpa, in_page as usize));
        at = at.checked_add(in_page).ok_or(MemoryError::Wraps { addr, len })?;
        left -= in_page;
    }
    Ok(out)
}

fn not_found(addr: u64) -> Error {
    Error::Breakpoint(BreakpointError::Sw(SwError::NotFound { addr }))
}

/// The core names the guest-physical address; the debugger asked for `addr`.
fn relabel(e: BreakpointError<MemoryError>, gpa: u64, addr: u64) -> Error {
    let fix = |a: u64| if a == gpa { addr } else { a };
    Error::Breakpoint(match e {
        BreakpointError::Sw(SwError::NotFound { addr: a }) => BreakpointError::Sw(SwError::NotFound { addr: fix(a) }),
        BreakpointError::Sw(SwError::CountOverflow { addr: a }) => {
            BreakpointError::Sw(SwError::CountOverflow { addr: fix(a) })
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUID rule against the kernel's own reading of the vendor
    /// (`/proc/cpuinfo`), an independent source.
    #[test]
    fn int1_pc_follows_the_vendor_the_kernel_reports() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            println!("int1_pc_follows_the_vendor_the_kernel_reports: SKIPPED: no /proc/cpuinfo");
            return;
        };
        let vendor = info
            .lines()
            .find_map(|l| l.strip_prefix("vendor_id"))
            .and_then(|l| l.split(':').nth(1))
            .map(str::trim)
            .unwrap_or("");
        let expected = match vendor {
            "GenuineIntel" => Int1Pc::AtInstruction,
            "AuthenticAMD" | "HygonGenuine" => Int1Pc::AfterInstruction,
            _ => Int1Pc::Unknown,
        };
        assert_eq!(int1_pc_from_cpuid(), expected, "vendor {vendor:?}");
    }

    /// A vCPU parked by `before_run` after posting the stop decoded from
    /// `f`'s exit at `pc` (hardware breakpoint in slot 0), with the read at
    /// stop on; `body` runs once the stop is taken and every vCPU parked.
    #[cfg(feature = "gdb")]
    fn parked_at_a_stop(f: &crate::fake::FakeVcpu, body: impl FnOnce(&VmDebug<vm_memory::GuestMemoryMmap>)) {
        parked_at_a_stop_polling(f, std::time::Duration::ZERO, body);
    }

    /// As [`parked_at_a_stop`], the vCPU busy-polling for its release for
    /// `window` first.
    #[cfg(feature = "gdb")]
    fn parked_at_a_stop_polling(
        f: &crate::fake::FakeVcpu,
        window: std::time::Duration,
        body: impl FnOnce(&VmDebug<vm_memory::GuestMemoryMmap>),
    ) {
        use crate::vcpu_debug::Handled;
        use std::time::Duration;
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mmap");
        let dbg = VmDebug::new(mem);
        dbg.set_read_at_stop(true).expect("read at stop");
        dbg.set_park_poll(window).expect("park poll");
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        let pc = f.regs().rip;
        dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, pc, 1)
            .expect("insert");
        h.sync(f).expect("sync");
        let exit = kvm_bindings::kvm_debug_exit_arch {
            exception: 1,
            pad: 0,
            pc,
            dr6: 0xffff_0ff1, // B0 (SDM 18.2.3)
            dr7: 0,
        };
        let Handled::Stop(ev) = h.handle_exit(f, &exit).expect("exit") else {
            panic!("the breakpoint's exit was not a stop");
        };
        h.report_stop(ev).expect("report");
        std::thread::scope(|s| {
            let vcpu = s.spawn(|| h.before_run(f).map(|_| ()));
            let taken = dbg.wait_stop(Some(Duration::from_secs(10))).expect("wait");
            assert_eq!(taken.map(|e| e.pc), Some(pc));
            dbg.stop_all(Duration::from_secs(10)).expect("parked");
            // The vCPU is released whatever `body` asserted, so a failed
            // check fails the test instead of hanging it.
            let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&dbg)));
            dbg.detach().expect("detach");
            vcpu.join().expect("vCPU thread").expect("before_run");
            if let Err(failed) = checked {
                std::panic::resume_unwind(failed);
            }
        });
    }

    #[cfg(feature = "gdb")]
    fn fake_at(rip: u64, rsp: u64, rbp: u64, cr3: u64) -> crate::fake::FakeVcpu {
        let f = crate::fake::FakeVcpu::new();
        let mut regs = f.regs();
        (regs.rip, regs.rsp, regs.rbp) = (rip, rsp, rbp);
        f.put_regs(regs);
        let mut sregs = f.sregs();
        sregs.cr3 = cr3;
        f.put_sregs(sregs);
        f
    }

    /// The vCPU that posted a stop reads its registers as it parks, and the
    /// debugger gets what it holds, once.
    #[cfg(feature = "gdb")]
    #[test]
    fn a_vcpu_parking_at_its_stop_hands_over_the_registers_it_holds() {
        let f = fake_at(0x1234, 0x8ff0, 0x8ff8, 0x5000);
        parked_at_a_stop(&f, |dbg| {
            let a = dbg
                .take_at_stop(0, std::time::Duration::ZERO)
                .expect("take")
                .expect("read at the park");
            assert_eq!((a.regs.rip, a.regs.rsp, a.regs.rbp), (0x1234, 0x8ff0, 0x8ff8));
            assert_eq!(a.sregs.cr3, 0x5000);
            assert!(
                dbg.take_at_stop(0, std::time::Duration::ZERO).expect("take").is_none(),
                "taken once"
            );
        });
    }

    /// A vCPU parked at its own stop that busy-polls for its release
    /// (the GDB session's window) leaves its park when released, without
    /// waiting out the window: the count the release moves ends the poll.
    /// A job queued for it meanwhile runs too (it moves the count as well).
    #[cfg(feature = "gdb")]
    #[test]
    fn a_vcpu_polling_for_its_release_leaves_its_park_when_released() {
        use crate::run_control::{Action, RunState};
        use std::time::{Duration, Instant};
        // Far longer than the test may take: only the count can end the
        // poll within a quarter of it (the window starts at the park,
        // before the body runs).
        const WINDOW: Duration = Duration::from_secs(20);
        const BOUND: Duration = Duration::from_secs(5);
        let f = fake_at(0x1234, 0x8ff0, 0x8ff8, 0x5000);
        parked_at_a_stop_polling(&f, WINDOW, |dbg| {
            let asked = Instant::now();
            let rip = dbg
                .with_parked_vcpu(0, |ops| ops.get_regs().map(|r| r.rip))
                .expect("job");
            assert_eq!(rip.expect("regs"), 0x1234);
            assert!(asked.elapsed() < BOUND, "the job waited out the poll");
            let released = Instant::now();
            dbg.resume(&[(0, Action::Continue)]).expect("resume");
            while dbg.run_state(0).expect("state") == RunState::Parked {
                assert!(released.elapsed() < BOUND, "the release waited out the poll");
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }

    /// The vCPU reads after announcing its stop: a debugger that asks while
    /// the read is under way gets it when it is done, not nothing — asleep
    /// (`spin` zero) or busy-polling (`spin` longer than the whole wait, so
    /// only the count `end_read_at_stop` moves can end it in time).
    #[cfg(feature = "gdb")]
    fn a_read_under_way_is_waited_for(spin: std::time::Duration) {
        let f = fake_at(0x1234, 0x8ff0, 0x8ff8, 0x5000);
        parked_at_a_stop(&f, |dbg| {
            // Once the vCPU's own read is done (it reads after announcing
            // the stop), make it look unfinished again, and finish it later
            // from another thread as the vCPU's `read_at_stop` does.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let read = loop {
                let mut inner = dbg.shared.lock().expect("lock");
                if !inner.reading_at_stop.contains(&0) {
                    let read = inner.at_stop.remove(&0);
                    if read.is_some() {
                        inner.reading_at_stop.insert(0);
                    }
                    break read;
                }
                drop(inner);
                assert!(std::time::Instant::now() < deadline, "the vCPU's read never ended");
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            let read = read.expect("read at the park");
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    dbg.shared.end_read_at_stop(0, Some(read)).expect("end the read");
                });
                let asked = std::time::Instant::now();
                let a = dbg.take_at_stop(0, spin).expect("take").expect("waited for the read");
                assert_eq!(a.regs.rip, 0x1234);
                // Ended by the read's end, not by the window running out.
                assert!(
                    asked.elapsed() < spin.max(crate::control::AT_STOP_WAIT),
                    "the wait outlasted the read"
                );
            });
        });
    }

    #[cfg(feature = "gdb")]
    #[test]
    fn a_read_at_the_stop_still_under_way_is_waited_for() {
        a_read_under_way_is_waited_for(std::time::Duration::ZERO);
    }

    #[cfg(feature = "gdb")]
    #[test]
    fn a_read_at_the_stop_still_under_way_is_busy_polled_for() {
        // Longer than AT_STOP_WAIT: a spin that missed the read's end would
        // outlast the whole wait and come back with nothing.
        a_read_under_way_is_waited_for(std::time::Duration::from_secs(3));
    }

    /// A job that may write the parked vCPU (the VMM's `with_parked_vcpu`)
    /// makes what it read at its stop stale: the debugger does not get it.
    #[cfg(feature = "gdb")]
    #[test]
    fn what_a_vcpu_read_at_its_stop_is_dropped_once_a_job_may_have_written_it() {
        let f = fake_at(0x1234, 0x8ff0, 0x8ff8, 0x5000);
        parked_at_a_stop(&f, |dbg| {
            dbg.with_parked_vcpu(0, |ops| {
                let mut r = ops.get_regs().expect("regs");
                r.rsp = 0x7000;
                ops.set_regs(&r).expect("set")
            })
            .expect("job");
            assert!(
                dbg.take_at_stop(0, std::time::Duration::ZERO).expect("take").is_none(),
                "stale after the write"
            );
        });
        assert_eq!(f.regs().rsp, 0x7000, "the job ran on the vCPU");
    }

    #[test]
    fn a_new_handle_uses_the_cpuid_rule_by_default_and_it_can_be_overridden() {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
        let dbg = VmDebug::new(mem);
        assert_eq!(dbg.int1_pc().expect("rule"), int1_pc_from_cpuid());
        dbg.set_int1_pc(Int1Pc::Unknown).expect("set");
        assert_eq!(dbg.int1_pc().expect("rule"), Int1Pc::Unknown);
    }
}
