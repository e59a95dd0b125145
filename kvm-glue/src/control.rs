//! All-stop on threads: [`VmDebug`]'s operations that hold, park, release
//! and wait for vCPUs, and send jobs to a parked vCPU's thread. What they
//! decide is the pure [`RunControl`](crate::run_control::RunControl); this
//! module only locks, waits on the condition variable, kicks and signals
//! the stop eventfd around it.
//!
//! The rules:
//!
//! * A vCPU is **held** when the debugger asked for a stop
//!   ([`VmDebug::stop_all`]) or any vCPU posted a stop
//!   ([`VcpuDebug::report_stop`](crate::VcpuDebug::report_stop)). A held
//!   vCPU **parks** in [`VcpuDebug::before_run`](crate::VcpuDebug::before_run):
//!   it is outside `KVM_RUN`, on its own thread, running the debugger's jobs,
//!   until it is released.
//! * Stops posted while others are being reported stay **pending**, one per
//!   vCPU. A resume first drops those the debugger has made stale (the
//!   breakpoint is gone, the vCPU is no longer single-stepped) — and with each
//!   its step-over, so the instruction runs again and a breakpoint still
//!   there stops it again; if any are left, nobody is released and the next
//!   [`wait_stop`](VmDebug::wait_stop) returns one at once.
//! * [`detach`](VmDebug::detach) is final: a stop posted after it returned,
//!   from the old session's configuration, is discarded and its vCPU runs on.
//! * One lock (the debug state's) covers the intent and the run control;
//!   jobs run with it released.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;
use x86_debugreg::sw::RemoveAll;

use crate::debugger::{still_valid, wake, Inner, VmDebug};
use crate::error::{Error, Result};
use crate::memory::MemoryError;
use crate::sync::mpsc;
use crate::vcpu::VcpuOps;

pub use crate::run_control::{Action, RunState, StopEvent};

/// The longest [`VmDebug::take_at_stop`] waits for a vCPU's read at its
/// stop (two ioctls; a vCPU thread that never finishes it costs this once).
#[cfg(feature = "gdb")]
pub(crate) const AT_STOP_WAIT: Duration = Duration::from_secs(1);

impl<M: GuestMemory> VmDebug<M> {
    /// Whether vCPU `vcpu` must not just re-enter `KVM_RUN`: a stop is
    /// requested for it, or the intent changed since it last applied it. A
    /// VMM that does not call [`VcpuDebug::before_run`](crate::VcpuDebug::before_run)
    /// checks this after `EINTR`.
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU; [`Error::Poisoned`].
    pub fn needs_sync(&self, vcpu: usize) -> Result<bool> {
        let generation = self.generation();
        let inner = self.shared.lock()?;
        inner.run.check(vcpu)?;
        Ok(inner.run.needs_sync(vcpu, generation))
    }

    /// Where vCPU `vcpu` is in the all-stop protocol.
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU; [`Error::Poisoned`].
    pub fn run_state(&self, vcpu: usize) -> Result<RunState> {
        Ok(self.shared.lock()?.run.state(vcpu)?)
    }

    /// The ids of the vCPUs that have a live handle, in order.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn vcpu_ids(&self) -> Result<Vec<usize>> {
        Ok(self.shared.lock()?.run.ids().collect())
    }

    /// Whether vCPU `vcpu` ran an instruction under single-step (a step the
    /// debugger asked for, or a step over a breakpoint) since the last
    /// [`resume`](Self::resume) that released it.
    ///
    /// All-stop lets a resume of several stepping vCPUs end as soon as one
    /// of them stops: the others are parked wherever they were, some before
    /// running their instruction. After `resume(&[(0, Step), (1, Step)])`,
    /// [`wait_stop`](Self::wait_stop) and [`stop_all`](Self::stop_all), a
    /// vCPU for which this says `false` did not move (its pc is where it
    /// was); one that says `true` stepped, and its step stop is the next
    /// [`try_take_stop`](Self::try_take_stop) answer unless it was the one
    /// reported.
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU; [`Error::Poisoned`].
    pub fn moved(&self, vcpu: usize) -> Result<bool> {
        Ok(self.shared.lock()?.run.moved(vcpu)?)
    }

    /// Stops every vCPU: asks each to park, kicks those inside `KVM_RUN`,
    /// then waits until every vCPU with a handle is parked (outside
    /// `KVM_RUN`, on its own thread, in
    /// [`VcpuDebug::before_run`](crate::VcpuDebug::before_run)). Idempotent.
    ///
    /// Only vCPUs that have a handle are waited for: make every vCPU's
    /// handle ([`vcpu`](Self::vcpu)) before starting the vCPU threads, and
    /// move it into its thread.
    ///
    /// # Errors
    /// [`Error::StopTimeout`] naming a vCPU that did not park within
    /// `timeout` (it stays asked to stop); [`Error::Kick`] if a kick failed.
    pub fn stop_all(&self, timeout: Duration) -> Result<()> {
        let running = self.shared.lock()?.run.stop_all();
        // Kick everyone first, then wait: one round trip, not one per vCPU.
        self.shared.kick(&running)?;
        let deadline = Instant::now() + timeout;
        let mut inner = self.shared.lock()?;
        while let Some(&vcpu) = inner.run.unparked().first() {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::StopTimeout { vcpu, timeout });
            }
            inner = self.shared.wait_debugger(inner, Some(deadline - now))?;
        }
        Ok(())
    }

    /// Holds every vCPU until a debugger attaches (QEMU's `-S`): each vCPU
    /// parks at its next (with the call before the vCPU threads start: its
    /// first) [`before_run`](crate::VcpuDebug::before_run), before running
    /// an instruction; vCPUs whose handle is made later are held too, and
    /// running ones are kicked.
    ///
    /// The first debugger session takes the hold over: the GDB server (`gdb::serve`)
    /// stops every vCPU when a session's first packet arrives, and a
    /// [`stop_all`](Self::stop_all) or [`resume`](Self::resume) of any
    /// debugger does the same; the vCPUs then run when that debugger lets
    /// them. A connection that never sends a packet
    /// (`ServeEvent::NotGdb`), and a [`detach`](Self::detach) with no
    /// session, release nothing. A VMM that ends up serving no debugger
    /// calls [`release_hold`](Self::release_hold).
    ///
    /// ```
    /// use kvm_glue::{fake::FakeVcpu, RunState, VmDebug};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let dbg = VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)])?);
    /// dbg.hold_until_attached()?;
    /// let h = dbg.vcpu(0)?; // its thread's first before_run parks
    /// assert_eq!(dbg.run_state(0)?, RunState::StopRequested);
    /// assert!(dbg.release_hold()?); // no debugger after all
    /// assert_eq!(dbg.run_state(0)?, RunState::Running);
    /// # drop(h); Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Poisoned`]; [`Error::Kick`] if kicking a running vCPU
    /// failed (the hold is in force regardless).
    pub fn hold_until_attached(&self) -> Result<()> {
        let running = {
            let mut inner = self.shared.lock()?;
            inner.run.hold_until_attached();
            inner.run.unparked()
        };
        self.shared.kick(&running)
    }

    /// Whether the vCPUs are held until a debugger attaches (see
    /// [`hold_until_attached`](Self::hold_until_attached)).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn holding_until_attached(&self) -> Result<bool> {
        Ok(self.shared.lock()?.run.holding_until_attached())
    }

    /// Ends a [`hold_until_attached`](Self::hold_until_attached) no debugger
    /// took over: every vCPU runs. Returns whether there was such a hold
    /// (`false`: nothing changed — a debugger's own stop is ended by its
    /// [`resume`](Self::resume) or [`detach`](Self::detach), not this).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn release_hold(&self) -> Result<bool> {
        let (released, wakes) = {
            let mut inner = self.shared.lock()?;
            (inner.run.release_hold(), inner.all_wakes())
        };
        if released {
            self.shared.notify_debugger();
            wake(&self.shared, &wakes);
        }
        Ok(released)
    }

    /// Resumes the vCPUs in `actions`, each continuing or single-stepping
    /// with its own configuration (applied by its own thread before it enters
    /// the guest). vCPUs not listed stay parked (GDB's scheduler locking).
    ///
    /// Posted stops the debugger has not taken yet are checked first: those
    /// made stale (breakpoint removed, single-step no longer asked for) are
    /// dropped, and with each its step-over: that vCPU runs the instruction
    /// again, and stops again if a breakpoint is there. If stops are left, no
    /// vCPU is released and the next [`wait_stop`](Self::wait_stop) answers
    /// at once — the vCPU reports its stop without entering `KVM_RUN` again.
    ///
    /// Stepping several vCPUs at once: see [`moved`](Self::moved) for
    /// telling which of them ran their instruction.
    ///
    /// # Errors
    /// [`Error::Run`] if an id is not one of the VM's vCPUs (nothing changes
    /// then, for any vCPU); [`Error::Poisoned`].
    pub fn resume(&self, actions: &[(usize, Action)]) -> Result<()> {
        let (resumed, wakes) = {
            let mut guard = self.shared.lock()?;
            let Inner { state, watch, run, .. } = &mut *guard;
            let resumed = run.resume(actions, |p, stepping| still_valid(state, watch, p, stepping))?;
            if resumed.step_changed {
                self.shared.bump();
            }
            // Only the released vCPUs wake: one left parked by scheduler
            // locking sleeps on.
            let wakes: Vec<_> = actions.iter().map(|&(id, _)| guard.wake_of(id)).collect();
            (resumed, wakes)
        };
        if resumed.pending_left {
            self.shared.signal_stop();
        } else {
            self.shared.notify_debugger();
            wake(&self.shared, &wakes);
        }
        Ok(())
    }

    /// Resumes every vCPU with its single-step flag as it is (see
    /// [`resume`](Self::resume)).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn resume_all(&self) -> Result<()> {
        let actions: Vec<(usize, Action)> = {
            let inner = self.shared.lock()?;
            inner
                .run
                .ids()
                .map(|id| {
                    let a = if inner.single_step(id) {
                        Action::Step
                    } else {
                        Action::Continue
                    };
                    (id, a)
                })
                .collect()
        };
        self.resume(&actions)
    }

    /// Waits for the next stop a vCPU posted
    /// ([`VcpuDebug::report_stop`](crate::VcpuDebug::report_stop)), up to
    /// `timeout` (`None`: for ever). Posting a stop already asked every vCPU
    /// to stop: call [`stop_all`](Self::stop_all) next to wait until all are
    /// parked before telling the debugger.
    ///
    /// # Errors
    /// [`Error::NoVcpus`] when no stop waits and no vCPU has a live handle
    /// (every vCPU thread has ended): nothing could ever post one. Answered
    /// at once, also while waiting when the last handle goes.
    /// [`Error::Poisoned`].
    pub fn wait_stop(&self, timeout: Option<Duration>) -> Result<Option<StopEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.shared.lock()?;
        loop {
            if let Some(event) = inner.run.take() {
                if !inner.run.has_pending() {
                    let _ = self.shared.stop_fd.read();
                }
                return Ok(Some(event));
            }
            if !inner.run.live() {
                return Err(Error::NoVcpus);
            }
            inner = match deadline {
                None => self.shared.wait_debugger(inner, None)?,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    self.shared.wait_debugger(inner, Some(d - now))?
                }
            };
        }
    }

    /// The next posted stop, if there is one; never blocks, and answers
    /// `None` (not [`Error::NoVcpus`]) when there is none.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn try_take_stop(&self) -> Result<Option<StopEvent>> {
        let mut inner = self.shared.lock()?;
        let event = inner.run.take();
        if !inner.run.has_pending() {
            let _ = self.shared.stop_fd.read();
        }
        Ok(event)
    }

    /// Turns on (or off, dropping what was read) the read of
    /// [`AtStop`](crate::debugger::AtStop) by each vCPU that parks with its
    /// stop posted.
    #[cfg(feature = "gdb")]
    pub(crate) fn set_read_at_stop(&self, on: bool) -> Result<()> {
        let mut inner = self.shared.lock()?;
        inner.read_at_stop = on;
        if !on {
            inner.at_stop.clear();
        }
        Ok(())
    }

    /// How long a vCPU that parks with its own stop posted busy-polls for
    /// its release before it sleeps (`Duration::ZERO`: it sleeps at once).
    #[cfg(feature = "gdb")]
    pub(crate) fn set_park_poll(&self, window: Duration) -> Result<()> {
        self.shared.lock()?.park_poll = window;
        Ok(())
    }

    /// What parked `vcpu` read of itself when it parked with its stop
    /// posted, if that is still current (it has not left its park, and no
    /// job that writes was queued since); taken either way. A read still
    /// under way (the vCPU reads after announcing its stop) is waited for,
    /// at most [`AT_STOP_WAIT`]: busy-polled (without the lock) for up to
    /// `spin`, then asleep.
    #[cfg(feature = "gdb")]
    pub(crate) fn take_at_stop(&self, vcpu: usize, spin: Duration) -> Result<Option<crate::debugger::AtStop>> {
        let start = Instant::now();
        let deadline = start + AT_STOP_WAIT;
        let mut inner = self.shared.lock()?;
        while inner.reading_at_stop.contains(&vcpu) {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if now.duration_since(start) < spin {
                // The count moves under the lock when a read ends: seen
                // unmoved here, the read has not ended yet.
                let reads = self.shared.reads_at_stop.load(crate::sync::Ordering::Acquire);
                drop(inner);
                crate::debugger::poll_until_moved(&self.shared.reads_at_stop, reads, start, spin);
                inner = self.shared.lock()?;
                continue;
            }
            inner = self.shared.wait_debugger(inner, Some(deadline - now))?;
        }
        let Some(a) = inner.at_stop.remove(&vcpu) else {
            return Ok(None);
        };
        let parked = inner.run.state(vcpu)? == RunState::Parked;
        Ok((parked && a.epoch == inner.epoch(vcpu)).then_some(a))
    }

    /// A number that moves whenever a vCPU posts a stop (read without the
    /// lock): while it stands, [`try_take_stop`](Self::try_take_stop) has
    /// nothing new to find.
    #[cfg(feature = "gdb")]
    pub(crate) fn posts(&self) -> u64 {
        self.shared.posts.load(crate::sync::Ordering::Acquire)
    }

    /// A file descriptor (an eventfd) that is readable while a posted stop may
    /// be waiting: poll it beside a debugger connection, then
    /// [`try_take_stop`](Self::try_take_stop). Owned by the handle.
    ///
    /// A stop is announced here once the vCPU that posted it has parked
    /// (in [`before_run`](crate::VcpuDebug::before_run) or
    /// [`poll_park`](crate::VcpuDebug::poll_park)), so the
    /// [`stop_all`](Self::stop_all) that follows does not wait for that
    /// vCPU; [`wait_stop`](Self::wait_stop) sees it as soon as it is posted.
    pub fn stop_fd(&self) -> RawFd {
        self.shared.stop_fd.as_raw_fd()
    }

    /// Runs `f` on the thread of parked vCPU `vcpu`, with its vCPU, and
    /// returns what `f` returned: register and `KVM_TRANSLATE` access without
    /// the debugger touching a vCPU.
    ///
    /// # Errors
    /// [`Error::Run`] for an unknown vCPU; [`Error::NotParked`] if the vCPU
    /// is not parked (or its handle went away before running `f`).
    pub fn with_parked_vcpu<R, F>(&self, vcpu: usize, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&dyn VcpuOps) -> R + Send + 'static,
    {
        // `f` may change anything of the vCPU: what was read before is stale.
        self.queue_job(vcpu, true, f).map(|(r, _)| r)
    }

    /// [`with_parked_vcpu`](Self::with_parked_vcpu) for a job that reads
    /// and does not change the vCPU (its registers stay what they were),
    /// with the [`parked_epoch`](Self::parked_epoch) it ran at: what it read
    /// is current while that epoch stands.
    #[cfg(feature = "gdb")]
    pub(crate) fn with_parked_vcpu_reading<R, F>(&self, vcpu: usize, f: F) -> Result<(R, u64)>
    where
        R: Send + 'static,
        F: FnOnce(&dyn VcpuOps) -> R + Send + 'static,
    {
        self.queue_job(vcpu, false, f)
    }

    /// While vCPU `vcpu` is parked, a number that moves whenever what a
    /// job read of it may have changed (it left its park, or a job that may
    /// write it was queued); `None` when it is not parked.
    #[cfg(feature = "gdb")]
    pub(crate) fn parked_epoch(&self, vcpu: usize) -> Result<Option<u64>> {
        let inner = self.shared.lock()?;
        Ok((inner.run.state(vcpu)? == RunState::Parked).then(|| inner.epoch(vcpu)))
    }

    fn queue_job<R, F>(&self, vcpu: usize, writes: bool, f: F) -> Result<(R, u64)>
    where
        R: Send + 'static,
        F: FnOnce(&dyn VcpuOps) -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let epoch = {
            let mut inner = self.shared.lock()?;
            if inner.run.state(vcpu)? != RunState::Parked {
                return Err(Error::NotParked { vcpu });
            }
            if writes {
                inner.touch(vcpu);
            }
            // A job queued earlier that writes moved the epoch already; one
            // queued later moves it past this: either way a read of this
            // job's is never taken for newer than it is.
            let epoch = inner.epoch(vcpu);
            inner
                .jobs
                .entry(vcpu)
                .or_default()
                .push_back(Box::new(move |ops: &dyn VcpuOps| {
                    let _ = tx.send(f(ops));
                }));
            (epoch, inner.wake_of(vcpu))
        };
        let (epoch, parked) = epoch;
        wake(&self.shared, &[parked]);
        let r = rx.recv().map_err(|_| Error::NotParked { vcpu })?;
        Ok((r, epoch))
    }

    /// Ends a debugging session (a GDB disconnect): removes every breakpoint
    /// (memory byte-exact), turns single-step off on every vCPU, drops posted
    /// stops, and resumes every vCPU. The guest runs on as if no debugger had
    /// been there.
    ///
    /// Final: once it returns, no vCPU parks for this session. A vCPU that
    /// was mid-step or had just hit a breakpoint and posts its stop late has
    /// it discarded ([`Posted::Discarded`](crate::vcpu_debug::Posted)) and
    /// runs on.
    ///
    /// # Errors
    /// [`Error::Poisoned`]; [`Error::Kick`] if kicking a running vCPU to
    /// re-apply failed (the detach is done regardless). Entries whose memory
    /// could not be restored are listed in the answer.
    pub fn detach(&self) -> Result<RemoveAll<MemoryError>> {
        let out = self.remove_all()?;
        let wakes = {
            let mut inner = self.shared.lock()?;
            inner.run.detach();
            // Always: every vCPU re-applies, and so records the new session.
            self.shared.bump();
            inner.all_wakes()
        };
        let _ = self.shared.stop_fd.read();
        self.shared.notify_debugger();
        wake(&self.shared, &wakes);
        self.shared.kick_running()?;
        Ok(out)
    }
}
