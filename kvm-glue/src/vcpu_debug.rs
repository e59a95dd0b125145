//! [`VcpuDebug`]: the per-vCPU debug handle, used by that vCPU's thread.
//!
//! * [`before_run`](VcpuDebug::before_run), before each `KVM_RUN`: parks
//!   while the debugger holds the vCPU (running its jobs), arms a step over
//!   the pc this vCPU last stopped at if that stop still stands (a stop the
//!   debugger dropped owes none: see [`crate::run_control`]), then `sync`s.
//! * [`sync`](VcpuDebug::sync) issues `KVM_SET_GUEST_DEBUG` only when the
//!   vCPU's configuration changed since it last applied it — and always the
//!   first time: a new handle assumes nothing about what an earlier one left
//!   on the vCPU. What it applied is an [`Applied`], and only it is used to
//!   decode this vCPU's exits.
//! * [`handle_exit`](VcpuDebug::handle_exit) decodes a `KVM_EXIT_DEBUG`
//!   against the configuration **this vCPU applied** — not the newest intent
//!   and not the exit's `dr7` — or re-injects the guest's own `#DB`/`#BP` and
//!   says "run again".
//! * [`report_stop`](VcpuDebug::report_stop) posts a stop for the debugger
//!   and asks every vCPU to stop (all-stop).
//! * [`step_over`](VcpuDebug::step_over) asks the next run to go past the
//!   breakpoint at the last stop's pc: that execute slot disabled and/or the
//!   `int3`'s original byte back for one single step, re-armed at the step's
//!   exit. RFLAGS.RF is not used: some hosts' KVM ignores it (see the probe).
//!   It is decided when the vCPU next runs, so a single-step the debugger
//!   asks for meanwhile composes with it: one stop, at the next instruction.
//!   While it is in flight (a port access or a park in the middle), every
//!   entry applies the current intent less that one exclusion.
//!
//! ```
//! use kvm_glue::{fake::FakeVcpu, AddressSpace, Handled, Resume, VmDebug};
//! use kvm_glue::BreakpointType;
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)])?;
//! mem.write_slice(&[0x90; 16], GuestAddress(0x2000))?;
//! let dbg = VmDebug::new(mem.clone());
//! let vcpu = FakeVcpu::new();
//! vcpu.map(0x40_1000, 0x2000, 0x1000); // the guest's page tables: virtual 0x40_1000 -> 0x2000
//! let mut vcpu_dbg = dbg.vcpu(0)?;
//!
//! // A software breakpoint by virtual address: the int3 goes to 0x2004.
//! dbg.insert(AddressSpace::Virtual(&vcpu), BreakpointType::Software, 0x40_1004, 1)?;
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2004))?, 0xcc);
//! vcpu_dbg.sync(&vcpu)?; // before KVM_RUN
//!
//! // KVM_RUN returned a #BP exit at the int3:
//! let arch = kvm_bindings::kvm_debug_exit_arch { exception: 3, pad: 0, pc: 0x40_1004, dr6: 0, dr7: 0 };
//! let Handled::Stop(stop) = vcpu_dbg.handle_exit(&vcpu, &arch)? else { panic!("ours") };
//! assert_eq!(stop.to_string(), "vCPU 0 stopped at 0x401004: software breakpoint at 0x401004");
//!
//! vcpu_dbg.step_over(); // the next run steps over the int3...
//! vcpu_dbg.sync(&vcpu)?; // ...with the original byte back for that one step
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2004))?, 0x90);
//! let step = kvm_bindings::kvm_debug_exit_arch { exception: 1, pad: 0, pc: 0x40_1005, dr6: 0xffff_4ff0, dr7: 0 };
//! assert_eq!(vcpu_dbg.handle_exit(&vcpu, &step)?, Handled::Resume(Resume::SteppedOver));
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2004))?, 0xcc); // re-armed
//!
//! dbg.remove_all()?; // through the recorded guest-physical address
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2004))?, 0x90);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_BLOCKIRQ};
use vm_memory::GuestMemory;
use x86_debugreg::exit::Exception;
use x86_debugreg::predict::SlotMask;
use x86_debugreg::sw::{ByteMemory, INT3};
use x86_debugreg::watch::{Watch, WatchHit};
use x86_debugreg::{Applied, ControlFlags, DebugExit, Decision, Dr6, GuestDebug, Hits, Stop};

use crate::debugger::{read_linear, Inner, Shared, VmDebug};
use crate::error::{Error, Result};
use crate::memory::{translate, AddressSpace, PhysicalMemory};
use crate::probe::Int1Pc;
use crate::run_control::{exclude, Fault, Pending, Post, RunError, StepPhase};
use crate::sync::{Arc, Ordering};
use crate::vcpu::VcpuOps;

pub use crate::run_control::{effective, StopEvent};

/// DR6 after a single-step trap: BS (bit 14) and the bits that read as 1
/// (SDM Vol. 3B 18.2.3); what KVM reports for a step on every host measured
/// (HOST.md).
const STEP_DR6: u64 = 0xffff_4ff0;

/// The `int1` (ICEBP) opcode.
const ICEBP: u8 = 0xF1;

/// `KVM_SET_GUEST_DEBUG`'s argument for `gd`.
pub fn to_kvm(gd: &GuestDebug) -> kvm_guest_debug {
    kvm_guest_debug {
        control: gd.control.bits(),
        pad: 0,
        arch: kvm_guest_debug_arch { debugreg: gd.debugreg },
    }
}

/// Why the caller should just run the vCPU again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The exception was the guest's own; it has been queued for the guest.
    Reinjected(Exception),
    /// A [`step_over`](VcpuDebug::step_over) finished and the debugger did not
    /// ask this vCPU to single-step.
    SteppedOver,
    /// The only watchpoints hit were read watchpoints whose bytes changed:
    /// the access was a write, which a read watchpoint does not report.
    NotARead {
        /// The pc after the access.
        pc: u64,
    },
    /// A `#BP` at an address that no longer holds `0xCC`: a software
    /// breakpoint removed after this vCPU hit it. Running again executes the
    /// original instruction.
    StaleSoftwareBreakpoint {
        /// The address.
        addr: u64,
    },
}

/// What [`VcpuDebug::handle_exit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Report to the debugger (in all-stop, with [`VcpuDebug::report_stop`]).
    Stop(StopEvent),
    /// Nothing for the debugger: `before_run`/`sync` and run again.
    Resume(Resume),
}

/// What [`VcpuDebug::step_over`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOver {
    /// No stop at a breakpoint to step over since the last run.
    NotNeeded,
    /// The next [`sync`](VcpuDebug::sync) single-steps the instruction at `pc`
    /// with whatever breakpoint of the debugger's is there disabled for that
    /// one step (decided then, from the intent in force then).
    Requested {
        /// The pc of the stop.
        pc: u64,
    },
}

/// What a vCPU handle believes its vCPU holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) config: Applied,
    /// The intent generation it reflects (`None`: not the intent, e.g. a
    /// finished step-over's).
    generation: Option<u64>,
    /// The debugging session it was read in: stops decoded from it are
    /// discarded after a detach.
    session: u64,
}

/// What [`VcpuDebug::poll_park`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// Held by the debugger: parked, stay out of `KVM_RUN`.
    Held,
    /// Not held: [`enter`](VcpuDebug::enter) and run.
    Free,
}

/// What [`VcpuDebug::complete_io`] ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// The access is done; the vCPU is at the instruction after it.
    Done,
    /// The completion ended in a debug exit (the access was single-stepped,
    /// or a breakpoint hit right after it) that is a stop: handled and
    /// posted ([`VcpuDebug::report_stop`]) like any other.
    Stopped(StopEvent, Posted),
    /// The completion ended in a debug exit that is nothing for the
    /// debugger: handled, run again.
    Resumed(Resume),
}

/// What became of a stop [`VcpuDebug::report_stop`] posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// Waiting for the debugger; every vCPU is asked to stop.
    Waiting,
    /// Decoded from a configuration of a session that has ended (a
    /// [`VmDebug::detach`] came between): dropped. Nobody parks for it, and
    /// this vCPU runs on (with no step-over: the instruction runs again).
    Discarded,
}

/// The per-vCPU debug handle. Create it with
/// [`VmDebug::vcpu`](crate::VmDebug::vcpu); dropping it tells the all-stop
/// control that this vCPU is gone.
pub struct VcpuDebug<M> {
    id: usize,
    shared: Arc<Shared<M>>,
    /// `None` until the first successful sync: unknown, never assumed off.
    applied: Option<Record>,
    step: StepPhase,
    /// The guest's own single-step `#DB` arrived together with a debugger
    /// stop: re-inject it at the next sync.
    reinject_db: bool,
    last_gpa: Option<u64>,
    set_calls: u64,
    /// The [`StepIrqs`](crate::StepIrqs) choice of the last successful
    /// ioctl (`None`: none yet).
    block_irq: Option<u64>,
}

impl<M> fmt::Debug for VcpuDebug<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuDebug")
            .field("id", &self.id)
            .field("applied", &self.applied)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<M> Drop for VcpuDebug<M> {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.shared.lock() {
            inner.run.unregister(self.id);
            inner.touch(self.id);
            if inner.run.state(self.id) == Ok(crate::RunState::Absent) {
                inner.jobs.remove(&self.id);
            }
        }
        self.shared.notify_debugger();
    }
}

impl<M: GuestMemory> VmDebug<M> {
    /// The per-vCPU handle for vCPU `id`, for that vCPU's thread. Its first
    /// [`sync`](VcpuDebug::sync) always applies the intent: a new handle
    /// assumes nothing about what an earlier one left on the vCPU. Making it
    /// registers `id` as one of the VM's vCPUs (if the VM was not made
    /// [`with_vcpus`](VmDebug::with_vcpus)).
    ///
    /// # Errors
    /// [`Error::Run`] if `id` is not one of the VM's vCPUs (declared count, or
    /// [`MAX_VCPUS`](crate::run_control::MAX_VCPUS)); [`Error::Poisoned`].
    pub fn vcpu(&self, id: usize) -> Result<VcpuDebug<M>> {
        self.shared.lock()?.run.register(id)?;
        Ok(VcpuDebug {
            id,
            shared: Arc::clone(&self.shared),
            applied: None,
            step: StepPhase::Idle,
            reinject_db: false,
            last_gpa: None,
            set_calls: 0,
            block_irq: None,
        })
    }
}

impl<M: GuestMemory> VcpuDebug<M> {
    /// The vCPU id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The configuration this handle last applied successfully (what the vCPU
    /// runs with), or `None` before the first sync.
    pub fn applied(&self) -> Option<Applied> {
        self.applied.map(|r| r.config)
    }

    /// How many `KVM_SET_GUEST_DEBUG` calls this handle has issued (failed
    /// ones included).
    pub fn set_guest_debug_calls(&self) -> u64 {
        self.set_calls
    }

    /// Whether a step over a breakpoint is requested or in flight.
    pub fn stepping_over(&self) -> bool {
        self.step != StepPhase::Idle
    }

    pub(crate) fn record(&self) -> Option<Record> {
        self.applied
    }

    /// The VM-wide state (for [`crate::idle`]).
    pub(crate) fn shared(&self) -> &Arc<Shared<M>> {
        &self.shared
    }

    /// The intent generation the applied configuration reflects (`None`:
    /// none yet, or not the intent's, e.g. mid step-over).
    pub(crate) fn applied_generation(&self) -> Option<u64> {
        self.applied.and_then(|r| r.generation)
    }

    fn set<V: VcpuOps + ?Sized>(&mut self, vcpu: &V, dbg: &kvm_guest_debug) -> Result<()> {
        self.set_calls += 1;
        let mut dbg = *dbg;
        // Interrupts out of a step, where the host has it (StepIrqs). Not
        // part of what is recorded as applied: it changes no exit's meaning.
        let block_irq = self.shared.block_irq.load(Ordering::Acquire);
        if dbg.control & ControlFlags::SINGLESTEP.bits() != 0 && block_irq == 1 {
            dbg.control |= KVM_GUESTDBG_BLOCKIRQ;
        }
        let done = vcpu.set_guest_debug(&dbg);
        if done.is_ok() {
            self.block_irq = Some(block_irq);
        }
        done.map_err(|source| Error::Vcpu {
            vcpu: self.id,
            op: "KVM_SET_GUEST_DEBUG",
            source,
        })
    }

    /// Puts the vCPU back to `before` (a rollback of [`VmDebug::sync_all`]).
    pub(crate) fn restore<V: VcpuOps>(&mut self, vcpu: &V, before: Option<Record>) -> Result<()> {
        let config = before.map_or(GuestDebug::DISABLED, |r| *r.config.config());
        self.set(vcpu, &to_kvm(&config))?;
        self.applied = before;
        Ok(())
    }

    fn note_generation(&self, generation: Option<u64>) {
        if let Ok(mut inner) = self.shared.lock() {
            inner.run.note_generation(self.id, generation);
        }
    }

    /// Call before each `KVM_RUN` (the lifecycle entry point):
    ///
    /// 1. while the debugger holds this vCPU (a stop was asked for or posted),
    ///    parks here — outside `KVM_RUN`, guest frozen — running the jobs
    ///    [`VmDebug::with_parked_vcpu`] sends, until released;
    /// 2. if the last exit was a stop at pc X and that stop still stands (the
    ///    debugger did not drop it), asks for a [`step_over`](Self::step_over)
    ///    of X, whatever stopped the vCPU there (a no-op if the debugger has
    ///    no breakpoint at X by then);
    /// 3. [`sync`](Self::sync)s.
    ///
    /// If the last exit was a port or MMIO access, complete it first (run once
    /// with `immediate_exit` set) so a parked vCPU holds no half-done access.
    ///
    /// # Errors
    /// As [`sync`](Self::sync); [`Error::Poisoned`].
    pub fn before_run<V: VcpuOps>(&mut self, vcpu: &V) -> Result<bool> {
        // One lock for the park check and the step-over debt.
        let owed = self.park(vcpu)?;
        self.check_fault()?;
        self.request_step_over(owed);
        self.sync(vcpu)
    }

    /// The second half of [`before_run`](Self::before_run), for a vCPU that
    /// is not held: asks for the step-over its last stop still owes (see
    /// [`step_over`](Self::step_over)), then [`sync`](Self::sync)s. Returns
    /// whether an ioctl was issued.
    ///
    /// # Errors
    /// As [`sync`](Self::sync).
    pub fn enter<V: VcpuOps>(&mut self, vcpu: &V) -> Result<bool> {
        self.step_over();
        self.sync(vcpu)
    }

    /// The first half of [`before_run`](Self::before_run) without blocking,
    /// for a vCPU thread that waits in its own event loop: if the debugger
    /// holds this vCPU, marks it parked, runs the jobs queued for it and
    /// answers [`Park::Held`] (call again when woken, e.g. by polling
    /// [`VmDebug::stop_fd`] or a timer); else leaves any park and answers
    /// [`Park::Free`] — then [`enter`](Self::enter) and run.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn poll_park<V: VcpuOps>(&mut self, vcpu: &V) -> Result<Park> {
        let shared = Arc::clone(&self.shared);
        let mut inner = shared.lock()?;
        loop {
            if !inner.run.held(self.id) {
                inner.run.unpark(self.id);
                inner.touch(self.id);
                drop(inner);
                shared.notify_debugger();
                return Ok(Park::Free);
            }
            if inner.run.park(self.id) {
                // Announced with the lock released (see `park`). Nothing is
                // read for the stop here: the thread goes back to the VMM,
                // which may change the vCPU, so it would be stale at once.
                drop(inner);
                shared.signal_stop();
                inner = shared.lock()?;
                continue;
            }
            match inner.jobs.get_mut(&self.id).and_then(|q| q.pop_front()) {
                Some(job) => {
                    drop(inner);
                    shared.notify_debugger();
                    job(vcpu);
                    inner = shared.lock()?;
                }
                None => {
                    // The thread is the VMM's until the next call: it may
                    // change the vCPU meanwhile.
                    inner.touch(self.id);
                    drop(inner);
                    shared.notify_debugger();
                    return Ok(Park::Held);
                }
            }
        }
    }

    /// Reads what the debugger needs first at this vCPU's stop
    /// ([`AtStop`](crate::debugger::AtStop)), as of `epoch` (taken when it
    /// parked: a job that writes, queued meanwhile, moves it and so makes
    /// this read stale), then ends the read `park` began (`reading_at_stop`)
    /// and wakes a debugger that waits for it. A failed read records
    /// nothing: the debugger then reads as it would without.
    #[cfg(feature = "gdb")]
    fn read_at_stop<V: VcpuOps>(&self, vcpu: &V, epoch: u64) -> Result<()> {
        let read = match (vcpu.get_regs(), vcpu.get_sregs()) {
            (Ok(regs), Ok(sregs)) => Some(crate::debugger::AtStop {
                epoch,
                regs,
                sregs,
                walks: vcpu.translates_by_page_walk(),
            }),
            _ => None,
        };
        self.shared.end_read_at_stop(self.id, read)
    }

    /// Parks while held; returns the step-over debt taken on the way out
    /// (when no step-over is in flight).
    fn park<V: VcpuOps>(&mut self, vcpu: &V) -> Result<Option<u64>> {
        let shared = Arc::clone(&self.shared);
        let mut inner = shared.lock()?;
        let idle = self.step == StepPhase::Idle;
        if !inner.run.held(self.id) {
            return Ok(if idle { inner.run.take_owed(self.id) } else { None });
        }
        let posted = inner.run.park(self.id);
        let wake = inner.wake_of(self.id);
        // The read for the stop reply starts now, with the park: a debugger
        // that asks for it meanwhile waits for it (`take_at_stop`).
        #[cfg(feature = "gdb")]
        let read = (posted && inner.read_at_stop).then(|| inner.epoch(self.id));
        #[cfg(feature = "gdb")]
        if read.is_some() {
            inner.reading_at_stop.insert(self.id);
        }
        // Announced once parked: the debugger's stop_all that follows then
        // need not wait for this vCPU (one wake-up, not two). With the lock
        // released: the woken debugger takes it first thing, and would
        // otherwise sleep on it until this thread's wait lets it go.
        drop(inner);
        if posted {
            shared.signal_stop();
        }
        shared.notify_debugger();
        // After the announcement: the read's ioctls overlap the debugger's
        // wake-up instead of adding to it.
        #[cfg(feature = "gdb")]
        if let Some(epoch) = read {
            self.read_at_stop(vcpu, epoch)?;
        }
        let mut inner = shared.lock()?;
        // A vCPU parked at its own stop is usually released again at once
        // (GDB steps it): it busy-polls for that for the session's window,
        // and so needs no wake-up from sleep.
        #[cfg(feature = "gdb")]
        let poll = (posted && !inner.park_poll.is_zero()).then(|| (std::time::Instant::now(), inner.park_poll));
        loop {
            if let Some(job) = inner.jobs.get_mut(&self.id).and_then(|q| q.pop_front()) {
                drop(inner);
                job(vcpu);
                inner = shared.lock()?;
                continue;
            }
            if !inner.run.held(self.id) {
                break;
            }
            #[cfg(feature = "gdb")]
            if let Some((start, window)) = poll.filter(|(start, window)| start.elapsed() < *window) {
                // Read under the lock: a release (and a job) changes the
                // state under it and moves the count after.
                let sent = shared.wakes_sent.load(Ordering::Acquire);
                drop(inner);
                crate::debugger::poll_until_moved(&shared.wakes_sent, sent, start, window);
                inner = shared.lock()?;
                continue;
            }
            inner = wake.wait(inner).map_err(|_| Error::Poisoned)?;
        }
        inner.run.unpark(self.id);
        inner.touch(self.id);
        let owed = if idle { inner.run.take_owed(self.id) } else { None };
        drop(inner);
        shared.notify_debugger();
        Ok(owed)
    }

    /// Applies the VM-wide configuration if it changed since this vCPU last
    /// applied it (always on the first call). Returns whether an ioctl was
    /// issued. Applies a requested step-over; while one is in flight, it
    /// applies the current intent less the step-over's exclusion (so a
    /// breakpoint removed meanwhile is gone, one added is there).
    ///
    /// The common case (nothing changed) is one atomic load, no lock.
    ///
    /// # Errors
    /// [`Error::Vcpu`] if `KVM_SET_GUEST_DEBUG` fails: the handle then still
    /// records the old configuration (which the vCPU still has) and the next
    /// `sync` tries again. [`Error::Memory`] if a step-over could not put the
    /// original byte back (nothing changed then).
    pub fn sync<V: VcpuOps>(&mut self, vcpu: &V) -> Result<bool> {
        match self.step {
            StepPhase::InFlight { pc, sw_gpa } => return self.resync_step(vcpu, pc, sw_gpa),
            StepPhase::Requested { pc } => {
                if self.arm_step(vcpu, pc)? {
                    return Ok(true);
                }
            }
            StepPhase::Idle => {}
        }
        let current = self.shared.generation.load(Ordering::Acquire);
        if !self.reinject_db && self.applied.is_some_and(|r| r.generation == Some(current)) {
            return Ok(false);
        }
        let (want, generation, session) = {
            let inner = self.shared.lock()?;
            // Read under the lock: the generation, the state and the session agree.
            (
                effective(inner.config_for(self.id)),
                self.shared.generation.load(Ordering::Acquire),
                inner.run.session(),
            )
        };
        if self.reinject_db {
            // The guest's own single-step #DB that came with a debugger stop.
            let mut dbg = to_kvm(&want);
            dbg.control |= (ControlFlags::ENABLE | ControlFlags::INJECT_DB).bits();
            self.set(vcpu, &dbg)?;
            self.reinject_db = false;
        } else if self.applied.is_some_and(|r| *r.config.config() == want)
            && self.block_irq == Some(self.shared.block_irq.load(Ordering::Acquire))
        {
            self.applied = Some(Record {
                config: Applied::was_set(want),
                generation: Some(generation),
                session,
            });
            self.note_generation(Some(generation));
            return Ok(false);
        } else {
            self.set(vcpu, &to_kvm(&want))?;
        }
        self.applied = Some(Record {
            config: Applied::was_set(want),
            generation: Some(generation),
            session,
        });
        self.note_generation(Some(generation));
        Ok(true)
    }

    /// The configuration for stepping over `pc` now (the intent less the
    /// execute slots at `pc`, single-step on), whether a slot was excluded,
    /// and the `int3` at `pc`, if any: the address recorded at the stop, or
    /// (an execute breakpoint on an `int3`, a step that landed on one)
    /// translated now.
    fn exclusion<V: VcpuOps>(&self, inner: &Inner<M>, vcpu: &V, pc: u64) -> (GuestDebug, bool, Option<u64>) {
        let (config, slots) = exclude(inner.config_for(self.id), pc);
        let sw_gpa = if inner.state.sw().is_empty() {
            None
        } else {
            let ours = |gpa: &u64| inner.state.sw().contains(*gpa);
            self.last_gpa
                .filter(ours)
                .or_else(|| translate(vcpu, pc).ok().filter(ours))
        };
        (config, slots, sw_gpa)
    }

    /// Applies a requested step over the breakpoint at `pc`; `false` if the
    /// debugger has nothing at `pc` any more (then nothing is done).
    fn arm_step<V: VcpuOps>(&mut self, vcpu: &V, pc: u64) -> Result<bool> {
        let shared = Arc::clone(&self.shared);
        let mut inner = shared.lock()?;
        let (config, slots, sw_gpa) = self.exclusion(&inner, vcpu, pc);
        if !slots && sw_gpa.is_none() {
            self.step = StepPhase::Idle;
            return Ok(false);
        }
        let generation = shared.generation.load(Ordering::Acquire);
        let session = inner.run.session();
        let mut mem = PhysicalMemory(&inner.mem);
        if let Some(gpa) = sw_gpa {
            if let Some(entry) = inner.state.sw().get(gpa) {
                mem.write_byte(gpa, entry.saved)?;
            }
        }
        if let Err(e) = self.set(vcpu, &to_kvm(&config)) {
            if let Some(gpa) = sw_gpa {
                // Best effort: the same byte was written a moment ago.
                let _ = mem.write_byte(gpa, INT3);
            }
            return Err(e);
        }
        self.applied = Some(Record {
            config: Applied::was_set(config),
            generation: Some(generation),
            session,
        });
        inner.run.note_generation(self.id, Some(generation));
        self.step = StepPhase::InFlight { pc, sw_gpa };
        Ok(true)
    }

    /// A step-over is in flight and the vCPU enters the guest again (after a
    /// port access, a park): the current intent less the exclusion at `pc`,
    /// with an ioctl only if that differs from what the vCPU holds.
    fn resync_step<V: VcpuOps>(&mut self, vcpu: &V, pc: u64, sw_gpa: Option<u64>) -> Result<bool> {
        let current = self.shared.generation.load(Ordering::Acquire);
        if self.applied.is_some_and(|r| r.generation == Some(current)) {
            return Ok(false);
        }
        let shared = Arc::clone(&self.shared);
        let mut inner = shared.lock()?;
        let generation = shared.generation.load(Ordering::Acquire);
        let session = inner.run.session();
        let (config, _, now_gpa) = self.exclusion(&inner, vcpu, pc);
        // An int3 put (back) at pc meanwhile is kept out of the step too.
        let sw_gpa = now_gpa.or(sw_gpa);
        if let Some(gpa) = now_gpa {
            if let Some(entry) = inner.state.sw().get(gpa) {
                PhysicalMemory(&inner.mem).write_byte(gpa, entry.saved)?;
            }
        }
        let issued = if self.applied.is_some_and(|r| *r.config.config() == config)
            && self.block_irq == Some(self.shared.block_irq.load(Ordering::Acquire))
        {
            false
        } else {
            self.set(vcpu, &to_kvm(&config))?;
            true
        };
        self.applied = Some(Record {
            config: Applied::was_set(config),
            generation: Some(generation),
            session,
        });
        inner.run.note_generation(self.id, Some(generation));
        self.step = StepPhase::InFlight { pc, sw_gpa };
        Ok(issued)
    }

    /// Handles the data of a `KVM_EXIT_DEBUG` (`VcpuExit::Debug`).
    ///
    /// A `#BP` is matched against the software breakpoints by translating its
    /// pc with this vCPU's page tables (they are kept by guest-physical
    /// address). When the debugger's stop and the guest's own single-step
    /// come in one `#DB`, the stop is reported and the guest's `#DB` is
    /// re-injected at the next sync, after the debugger resumes.
    ///
    /// # Errors
    /// [`Error::Decode`] for a vector other than 1 or 3; [`Error::Vcpu`] if
    /// re-injecting fails (nothing is then queued, and the handle's record is
    /// unchanged); [`Error::Memory`] if the pc of a `#BP` does not translate
    /// or guest memory there cannot be read or re-armed.
    pub fn handle_exit<V: VcpuOps>(&mut self, vcpu: &V, exit: &kvm_debug_exit_arch) -> Result<Handled> {
        let dexit = DebugExit {
            exception: exit.exception,
            pc: exit.pc,
            dr6: exit.dr6,
            dr7: exit.dr7,
        };
        let shared = Arc::clone(&self.shared);
        let mut inner = shared.lock()?;
        let stepped = self.step;
        self.last_gpa = None;
        if let StepPhase::InFlight { sw_gpa, .. } = stepped {
            if let Some(gpa) = sw_gpa {
                if inner.state.sw().contains(gpa) {
                    PhysicalMemory(&inner.mem).write_byte(gpa, INT3)?;
                }
            }
            self.step = StepPhase::Idle;
            // The vCPU holds the step's configuration: the next sync must
            // apply the intent again.
            if let Some(r) = &mut self.applied {
                r.generation = None;
            }
            inner.run.note_generation(self.id, None);
        }
        let applied = self.applied.map_or(Applied::DISABLED, |r| r.config);
        if applied.single_step() && Dr6::from_kvm(exit.dr6).bs() {
            // One instruction ran (the debugger's step or a step-over's).
            inner.run.stepped(self.id);
        }
        let bp_gpa = if exit.exception == x86_debugreg::exit::BP_VECTOR {
            Some(translate(vcpu, exit.pc)?)
        } else {
            None
        };
        let ours = bp_gpa.is_some_and(|gpa| inner.state.sw().contains(gpa));
        let decision = x86_debugreg::decode(&dexit, &applied, |_| ours)?;
        match decision {
            Decision::Stop(Stop::Debug { single_step, hits }) => {
                let mut single_step = single_step;
                if matches!(stepped, StepPhase::InFlight { .. }) {
                    // The step-over's own step counts only if the debugger
                    // wants this vCPU stepped *now* (not when it asked for
                    // the step-over).
                    single_step = single_step && inner.single_step(self.id);
                    if !single_step && hits.is_empty() {
                        return Ok(Handled::Resume(Resume::SteppedOver));
                    }
                }
                // Map the hit slots back to the user's watchpoints; a read
                // watchpoint whose bytes changed saw a write: not a stop.
                let (kept, writes_only) = check_reads(&mut inner, vcpu, &hits)?;
                if let Some(slot) = inner.stop_hits.get_mut(self.id) {
                    slot.clone_from(&kept);
                } else {
                    inner.stop_hits.resize(self.id + 1, Vec::new());
                    inner.stop_hits[self.id] = kept;
                }
                if writes_only && !single_step {
                    return Ok(Handled::Resume(Resume::NotARead { pc: exit.pc }));
                }
                let dr6 = Dr6::from_kvm(exit.dr6);
                if dr6.bs() && !applied.single_step() {
                    self.reinject_db = true;
                }
                // Whatever stopped it at pc (a breakpoint there, a step that
                // landed there): resuming steps over pc first.
                inner.run.stopped(self.id, exit.pc);
                refresh_reads(&mut inner, vcpu);
                drop(inner);
                Ok(self.stop(exit, Stop::Debug { single_step, hits }))
            }
            Decision::Stop(stop) => {
                inner.run.stopped(self.id, exit.pc);
                self.last_gpa = bp_gpa;
                refresh_reads(&mut inner, vcpu);
                drop(inner);
                Ok(self.stop(exit, stop))
            }
            Decision::Reinject(Exception::Breakpoint) => {
                // A #BP exit leaves RIP at the int3. If the byte is no longer
                // 0xCC, this was a breakpoint of ours removed meanwhile: the
                // guest must not see it.
                if let Some(gpa) = bp_gpa {
                    if PhysicalMemory(&inner.mem).read_byte(gpa)? != INT3 {
                        return Ok(Handled::Resume(Resume::StaleSoftwareBreakpoint { addr: exit.pc }));
                    }
                }
                drop(inner);
                self.inject(vcpu, Exception::Breakpoint)
            }
            Decision::Reinject(Exception::Debug) => {
                let dr6 = Dr6::from_kvm(exit.dr6);
                let no_cause = dr6.hit_mask() == 0 && !dr6.bs() && !dr6.bd();
                let skip_icebp = no_cause
                    && match inner.int1_pc {
                        Int1Pc::AfterInstruction => false,
                        Int1Pc::AtInstruction | Int1Pc::Unknown => {
                            let gpa = translate(vcpu, exit.pc)?;
                            PhysicalMemory(&inner.mem).read_byte(gpa)? == ICEBP
                        }
                    };
                drop(inner);
                if skip_icebp {
                    // VMX reports an int1 exit with RIP still at the int1;
                    // the injected #DB is a fault-style event, so without this
                    // the guest's handler would return to the int1 forever.
                    let mut regs = vcpu.get_regs().map_err(|source| Error::Vcpu {
                        vcpu: self.id,
                        op: "KVM_GET_REGS",
                        source,
                    })?;
                    regs.rip = regs.rip.wrapping_add(1);
                    vcpu.set_regs(&regs).map_err(|source| Error::Vcpu {
                        vcpu: self.id,
                        op: "KVM_SET_REGS",
                        source,
                    })?;
                }
                self.inject(vcpu, Exception::Debug)
            }
        }
    }

    fn stop(&mut self, exit: &kvm_debug_exit_arch, stop: Stop) -> Handled {
        Handled::Stop(StopEvent {
            vcpu: self.id,
            pc: exit.pc,
            dr6: if matches!(stop, Stop::Software { .. }) {
                0
            } else {
                exit.dr6
            },
            stop,
            fault: None,
        })
    }

    fn inject<V: VcpuOps>(&mut self, vcpu: &V, e: Exception) -> Result<Handled> {
        // The inject flags are one-shot (KVM queues the exception when the
        // ioctl is made), so the record of what is applied does not change.
        let config = self.applied.map_or(GuestDebug::DISABLED, |r| *r.config.config());
        let mut dbg = to_kvm(&config);
        dbg.control |= (ControlFlags::ENABLE | e.inject_flag()).bits();
        self.set(vcpu, &dbg)?;
        Ok(Handled::Resume(Resume::Reinjected(e)))
    }

    /// Completes the port or MMIO access the last run exited with
    /// ([`run::complete_io`](crate::run::complete_io)), so this vCPU never
    /// parks holding a half-done access: call it after handling every
    /// `KVM_EXIT_IO` / `KVM_EXIT_MMIO` (an `in`'s or MMIO read's answer
    /// written first), before the next [`before_run`](Self::before_run).
    /// The debugger parking the vCPU then sees the instruction after the
    /// access, and resuming does not run the access again. When that run
    /// ends in a debug exit (a single-step over the access), it is handled
    /// here ([`handle_exit`](Self::handle_exit), and
    /// [`report_stop`](Self::report_stop) for a stop).
    ///
    /// Costs one `KVM_RUN` that does not enter the guest.
    ///
    /// # Errors
    /// [`Error::Vcpu`] if `KVM_RUN` fails; [`Error::UnexpectedExit`] if
    /// the run ended in anything but `EINTR` or a debug exit (nothing is
    /// changed then); as [`handle_exit`](Self::handle_exit) and
    /// [`report_stop`](Self::report_stop).
    pub fn complete_io(&mut self, vcpu: &mut kvm_ioctls::VcpuFd) -> Result<Completed> {
        let exit = crate::run::complete_io(vcpu).map_err(|source| Error::Vcpu {
            vcpu: self.id,
            op: "KVM_RUN",
            source,
        })?;
        match exit {
            crate::run::Exit::Interrupted if self.applied.is_some_and(|r| r.config.single_step()) => {
                // The access was single-stepped and KVM finished it without
                // the step's trap (KVM on VMX/SVM reports it from this run;
                // kvm_pvm drops it, and a plain re-run would step a second
                // instruction): one instruction ran, so this is its step,
                // with DR6 as a single-step trap reads (BS, SDM 18.2.3).
                let pc = self.linear_pc(&*vcpu)?;
                let arch = kvm_debug_exit_arch {
                    exception: 1,
                    pad: 0,
                    pc,
                    dr6: STEP_DR6,
                    dr7: 0,
                };
                match self.handle_exit(&*vcpu, &arch)? {
                    Handled::Stop(stop) => Ok(Completed::Stopped(stop, self.report_stop(stop)?)),
                    Handled::Resume(r) => Ok(Completed::Resumed(r)),
                }
            }
            crate::run::Exit::Interrupted => Ok(Completed::Done),
            exit @ crate::run::Exit::Debug { .. } => {
                let Some(arch) = exit.debug() else {
                    return Err(Error::UnexpectedExit {
                        vcpu: self.id,
                        exit: format!("{exit:?}"),
                    });
                };
                match self.handle_exit(&*vcpu, &arch)? {
                    Handled::Stop(stop) => Ok(Completed::Stopped(stop, self.report_stop(stop)?)),
                    Handled::Resume(r) => Ok(Completed::Resumed(r)),
                }
            }
            other => Err(Error::UnexpectedExit {
                vcpu: self.id,
                exit: format!("{other:?}"),
            }),
        }
    }

    /// CS base + RIP (RIP alone in 64-bit mode, where the base is 0).
    fn linear_pc<V: VcpuOps>(&self, vcpu: &V) -> Result<u64> {
        let err = |op| {
            let id = self.id;
            move |source| Error::Vcpu { vcpu: id, op, source }
        };
        let rip = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?.rip;
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        Ok(if sregs.cs.l != 0 {
            rip
        } else {
            sregs.cs.base.wrapping_add(rip)
        })
    }

    /// Reports a fault the vCPU cannot run on as a stop: on
    /// `KVM_EXIT_SHUTDOWN` (a triple fault), `KVM_EXIT_INTERNAL_ERROR` or an
    /// exit the VMM cannot handle, instead of ending the guest at once. The
    /// stop is posted like any other (every vCPU is held), at the vCPU's pc
    /// (CS base + RIP); the GDB server reports it as a signal (see
    /// `gdb::stop`), with this vCPU's registers and guest memory readable
    /// as at any stop. Resuming this vCPU is then refused
    /// ([`RunError::Faulted`]): the next [`before_run`](Self::before_run)
    /// parks while the debugger holds it and then answers that error —
    /// the VMM decides what happens next (e.g. `GuestEnd::end`, which ends
    /// the GDB session with the guest's exit code).
    ///
    /// On AMD, KVM resets the vCPU at a shutdown intercept (the VMCB is
    /// undefined after one), so after [`Fault::Shutdown`] the registers
    /// shown are the RESET state (pc 0xfffffff0), not the fault's; Intel's
    /// keep the faulting instruction's (both seen on the nested lanes).
    ///
    /// Serve a debugger to show it: with none attached, the GDB server
    /// drops the stop and releases the vCPUs, and without a server nobody
    /// does — a VMM that serves no debugger ends the guest instead.
    ///
    /// ```
    /// use kvm_glue::{fake::FakeVcpu, run_control::{Fault, RunError}, Error, Posted, VmDebug};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let dbg = VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)])?);
    /// let vcpu = FakeVcpu::new();
    /// let mut h = dbg.vcpu(0)?;
    /// assert_eq!(h.report_fault(&vcpu, Fault::Shutdown)?, Posted::Waiting);
    /// let stop = dbg.try_take_stop()?.expect("posted");
    /// assert_eq!(stop.fault, Some(Fault::Shutdown));
    /// assert!(matches!(
    ///     dbg.resume_all(),
    ///     Err(Error::Run(RunError::Faulted { vcpu: 0, fault: Fault::Shutdown }))
    /// ));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Vcpu`] if the registers cannot be read (nothing is posted
    /// then); [`Error::Poisoned`]; [`Error::Kick`] if a kick failed (the
    /// stop is posted regardless).
    pub fn report_fault<V: VcpuOps>(&mut self, vcpu: &V, fault: Fault) -> Result<Posted> {
        let pc = self.linear_pc(vcpu)?;
        let event = StopEvent {
            vcpu: self.id,
            pc,
            dr6: 0,
            stop: Stop::Debug {
                single_step: false,
                hits: Hits::default(),
            },
            fault: Some(fault),
        };
        let post = {
            let mut inner = self.shared.lock()?;
            let post = inner.run.post_fault(self.id, Pending { event, gpa: None }, fault)?;
            if let Post::Posted { .. } = post {
                self.shared.posts.fetch_add(1, Ordering::AcqRel);
            }
            // A step-over in flight ends here: an `int3` whose byte it had
            // put back is re-armed for the other vCPUs (best effort: the
            // byte was written a moment ago).
            if let StepPhase::InFlight { sw_gpa: Some(gpa), .. } = self.step {
                if inner.state.sw().contains(gpa) {
                    let _ = PhysicalMemory(&inner.mem).write_byte(gpa, INT3);
                }
            }
            self.step = StepPhase::Idle;
            post
        };
        match post {
            Post::Discarded => Ok(Posted::Discarded),
            Post::Posted { kick } => {
                self.shared.signal_stop();
                self.shared.notify_debugger();
                self.shared.kick(&kick)?;
                Ok(Posted::Waiting)
            }
        }
    }

    /// [`RunError::Faulted`] once this vCPU has reported a fault.
    fn check_fault(&self) -> Result<()> {
        match self.shared.lock()?.run.faulted(self.id) {
            Some(fault) => Err(Error::Run(RunError::Faulted { vcpu: self.id, fault })),
            None => Ok(()),
        }
    }

    /// Posts `event` for the debugger ([`VmDebug::wait_stop`]) and asks every
    /// vCPU to stop (all-stop); this vCPU parks at its next
    /// [`before_run`](Self::before_run). Other vCPUs are kicked.
    ///
    /// A stop decoded from the configuration of a session that has ended
    /// (the debugger called [`VmDebug::detach`] after this vCPU last synced)
    /// is [`Posted::Discarded`]: nobody is held, and the vCPU just runs on.
    ///
    /// # Errors
    /// [`Error::Poisoned`]; [`Error::Kick`] if a kick failed (the stop is
    /// posted regardless).
    pub fn report_stop(&mut self, event: StopEvent) -> Result<Posted> {
        let gpa = match event.stop {
            Stop::Software { .. } => self.last_gpa,
            Stop::Debug { .. } => None,
        };
        let post = {
            let mut inner = self.shared.lock()?;
            match self.applied {
                Some(r) => {
                    let post = inner.run.post(self.id, Pending { event, gpa }, r.session);
                    if let Post::Posted { .. } = post {
                        self.shared.posts.fetch_add(1, Ordering::AcqRel);
                    }
                    post
                }
                // Never synced: nothing of the debugger's could have stopped it.
                None => inner.run.discard(self.id),
            }
        };
        match post {
            Post::Discarded => Ok(Posted::Discarded),
            Post::Posted { kick } => {
                // The stop descriptor is signalled when this vCPU parks
                // (`park`): the debugger's stop_all then does not wait.
                self.shared.notify_debugger();
                self.shared.kick(&kick)?;
                Ok(Posted::Waiting)
            }
        }
    }

    /// Asks the next run to go past the debugger's breakpoint at the pc of
    /// the last stop this handle reported, if that stop still stands (see the
    /// [module docs](self)). What is disabled for the step is decided by the
    /// next [`sync`](Self::sync), from the intent then: a single-step the
    /// debugger asks for meanwhile composes with it (one stop, at the next
    /// instruction), and a breakpoint removed meanwhile needs no step.
    /// [`before_run`](Self::before_run) calls this by itself.
    pub fn step_over(&mut self) -> StepOver {
        if self.step != StepPhase::Idle {
            return StepOver::NotNeeded;
        }
        let owed = match self.shared.lock() {
            Ok(mut inner) => inner.run.take_owed(self.id),
            Err(_) => None,
        };
        self.request_step_over(owed)
    }

    fn request_step_over(&mut self, owed: Option<u64>) -> StepOver {
        if self.step != StepPhase::Idle {
            return StepOver::NotNeeded;
        }
        match owed {
            Some(pc) => {
                self.step = StepPhase::Requested { pc };
                StepOver::Requested { pc }
            }
            None => StepOver::NotNeeded,
        }
    }
}

/// Reads `watch`'s bytes now, through `vcpu`'s page tables.
fn read_watched<M: GuestMemory, V: VcpuOps>(inner: &Inner<M>, vcpu: &V, watch: &Watch, len: usize) -> Result<Vec<u8>> {
    let mut now = vec![0u8; len];
    read_linear(&inner.mem, AddressSpace::Virtual(vcpu), watch.addr(), &mut now)?;
    Ok(now)
}

/// Refreshes every read watchpoint's saved bytes, as each reported stop must
/// (the debugger, a device or another vCPU may change them between stops
/// without the slot noticing). A watchpoint whose bytes cannot be read now
/// keeps its old copy.
fn refresh_reads<M: GuestMemory, V: VcpuOps>(inner: &mut Inner<M>, vcpu: &V) {
    let watches: Vec<(Watch, usize)> = inner.read_saved.iter().map(|(w, b)| (*w, b.len())).collect();
    for (watch, len) in watches {
        if let Ok(now) = read_watched(inner, vcpu, &watch, len) {
            inner.read_saved.insert(watch, now);
        }
    }
}

/// The watchpoints `hits` belong to, with read watchpoints value-checked
/// (their saved bytes refreshed, as every stop must). Returns those to report
/// and whether every hit slot belonged only to read watchpoints that saw a
/// write.
fn check_reads<M: GuestMemory, V: VcpuOps>(
    inner: &mut Inner<M>,
    vcpu: &V,
    hits: &Hits,
) -> Result<(Vec<WatchHit>, bool)> {
    if hits.is_empty() {
        // A plain single step: nothing to map (the common case while stepping).
        return Ok((Vec::new(), false));
    }
    let all = inner.watch.hits(hits);
    let mut kept = Vec::with_capacity(all.len());
    let mut dropped = SlotMask::EMPTY;
    for hit in all {
        if !hit.needs_values() {
            kept.push(hit);
            continue;
        }
        let watch = hit.watch;
        let len = inner.read_saved.get(&watch).map_or(0, Vec::len);
        let now = read_watched(inner, vcpu, &watch, len)?;
        let saved = inner.read_saved.insert(watch, now.clone()).unwrap_or_default();
        match hit.report(Some((&saved, &now))) {
            Ok(Some(_)) => kept.push(hit),
            Ok(None) => dropped = dropped.union(hit.slots),
            // The saved bytes always have the watchpoint's length; if they
            // ever did not, report the hit rather than lose it.
            Err(_) => kept.push(hit),
        }
    }
    let reported = kept.iter().fold(SlotMask::EMPTY, |m, h| m.union(h.slots));
    let writes_only = !dropped.is_empty()
        && hits
            .iter()
            .all(|h| !reported.contains(h.slot) && dropped.contains(h.slot));
    Ok((kept, writes_only))
}

impl<M: GuestMemory> VmDebug<M> {
    /// Applies the current intent to every vCPU now, as one transaction: the
    /// `i`-th handle with the `i`-th vCPU fd. Used when one thread owns all
    /// stopped vCPUs (the other way is each thread's own
    /// [`VcpuDebug::sync`]).
    ///
    /// Returns how many `KVM_SET_GUEST_DEBUG` calls were made.
    ///
    /// ```
    /// use kvm_glue::fake::{FakeVcpu, Op};
    /// use kvm_glue::{AddressSpace, BreakpointType, VmDebug};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let dbg = VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)])?);
    /// let fakes = [FakeVcpu::new(), FakeVcpu::new()];
    /// let mut handles = [dbg.vcpu(0)?, dbg.vcpu(1)?];
    /// dbg.sync_all(&mut handles, &fakes)?; // the first sync always applies
    /// dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, 0x100, 1)?;
    /// fakes[1].fail_op(Op::SetGuestDebug, 1); // vCPU 1's ioctl will fail
    /// let err = dbg.sync_all(&mut handles, &fakes).expect_err("vCPU 1 fails");
    /// assert_eq!((err.error.vcpu(), err.rolled_back.as_slice()), (Some(1), &[0][..]));
    /// assert_eq!(fakes[0].guest_debug().map(|d| d.control), Some(0), "vCPU 0 set back");
    /// assert_eq!(dbg.sync_all(&mut handles, &fakes)?, 2, "all or nothing: both now");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// If the ioctl fails on a vCPU, the vCPUs already changed by this call
    /// are set back to the configuration they had, and the error names the
    /// failing vCPU and the outcome of each rollback. Every handle then
    /// records exactly what its vCPU holds (a vCPU whose rollback failed keeps
    /// the new configuration, and its handle says so).
    pub fn sync_all<V: VcpuOps>(&self, handles: &mut [VcpuDebug<M>], vcpus: &[V]) -> Result<usize, SyncAllError> {
        let mut changed: Vec<(usize, Option<Record>)> = Vec::new();
        let mut issued = 0;
        for (i, (handle, vcpu)) in handles.iter_mut().zip(vcpus).enumerate() {
            let before = handle.record();
            match handle.sync(vcpu) {
                Ok(true) => {
                    issued += 1;
                    changed.push((i, before));
                }
                Ok(false) => {}
                Err(error) => {
                    let mut rolled_back = Vec::new();
                    let mut rollback_failed = Vec::new();
                    for (j, before) in changed {
                        match handles[j].restore(&vcpus[j], before) {
                            Ok(()) => rolled_back.push(handles[j].id()),
                            Err(e) => rollback_failed.push((handles[j].id(), e)),
                        }
                    }
                    return Err(SyncAllError {
                        error,
                        rolled_back,
                        rollback_failed,
                    });
                }
            }
        }
        Ok(issued)
    }
}

/// A failed [`VmDebug::sync_all`].
#[derive(Debug, thiserror::Error)]
#[error("{error} (rolled back: vCPUs {rolled_back:?}; rollback failed: {} vCPUs)", rollback_failed.len())]
pub struct SyncAllError {
    /// The failure, naming the vCPU ([`Error::vcpu`]).
    #[source]
    pub error: Error,
    /// vCPUs set back to their previous configuration.
    pub rolled_back: Vec<usize>,
    /// vCPUs whose rollback failed: they keep the new configuration (and their
    /// handles record it).
    pub rollback_failed: Vec<(usize, Error)>,
}
