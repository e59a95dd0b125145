//! Waiting while the guest is halted, for a VMM without an in-kernel
//! interrupt controller.
//!
//! Without an in-kernel irqchip (`KVM_CREATE_IRQCHIP`), the guest's `hlt`
//! exits to the VMM (`KVM_EXIT_HLT`), and the vCPU's thread waits **outside**
//! `KVM_RUN` until its VMM has an interrupt for it. No kick reaches a thread
//! there: a [`SignalKick`](crate::SignalKick) stays pending (it is blocked
//! outside `KVM_RUN`), so a VMM that sleeps and polls makes every stop wait
//! for the sleep. [`VcpuDebug::wait_idle`] is that wait done right: it ends
//! at once, saying why ([`Woke`]), when
//!
//! * the debugger wants this vCPU: a stop ([`VmDebug::stop_all`], a stop
//!   another vCPU posted, a session attaching) — [`Woke::Stop`]; or a change
//!   of its debug configuration (a breakpoint, a step, a detach) —
//!   [`Woke::Intent`]. Everything that kicks a vCPU ends the wait;
//! * the VMM's own code wakes it through an [`IdleWaker`] (an interrupt
//!   source: a timer, a device, another vCPU's IPI) — [`Woke::Vmm`];
//! * the timeout passes — [`Woke::TimedOut`].
//!
//! A vCPU in this wait is not kicked (no kick could reach it; what would
//! kick it ends the wait instead), and as it leaves the wait it drops any
//! kick sent to its thread meanwhile ([`Kick::drop_pending`](crate::Kick::drop_pending)):
//! a real-time signal kick would otherwise stay queued, one more per stop
//! while the guest stays halted, until the queue is full and kicking fails
//! (`EAGAIN`, which ends a GDB session).
//!
//! No wake-up is lost: a stop, intent change or [`IdleWaker::wake`] that
//! comes before the wait (after the `hlt` exit, or even while the vCPU still
//! ran) ends the next wait at once. The conditions are read under the debug
//! state's lock and the wait releases it atomically (its condition variable);
//! every change that would end it is made under that lock and notifies after.
//!
//! On [`Woke::Stop`] or [`Woke::Intent`] the guest is still halted: call
//! [`before_run`](VcpuDebug::before_run) (it parks while the debugger holds
//! the vCPU, then applies the configuration) and wait again — do not enter
//! `KVM_RUN`, which would run the instruction after the `hlt` as if an
//! interrupt had come. Only the VMM knows when the guest may run again.
//!
//! **With an in-kernel irqchip** none of this is needed: `hlt` does not exit,
//! the vCPU halts inside `KVM_RUN`, and the signal kick already brings it
//! out (`EINTR`) at once.
//!
//! ```
//! use std::time::Duration;
//! use kvm_glue::{fake::FakeVcpu, idle::Woke, VmDebug};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let dbg = VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)])?);
//! let vcpu = FakeVcpu::new();
//! let mut vdbg = dbg.vcpu(0)?;
//! vdbg.before_run(&vcpu)?; // ... KVM_RUN returned KVM_EXIT_HLT ...
//!
//! // A device thread holds a waker; its interrupt ends the wait.
//! let irq = vdbg.idle_waker();
//! std::thread::spawn(move || irq.wake());
//! loop {
//!     match vdbg.wait_idle(Some(Duration::from_secs(10)))? {
//!         // The debugger's: park / apply, and the guest stays halted.
//!         Woke::Stop | Woke::Intent => { vdbg.before_run(&vcpu)?; }
//!         // An interrupt for the guest (or the device's timer): run it.
//!         Woke::Vmm | Woke::TimedOut => break,
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;

use crate::debugger::{Shared, VmDebug};
use crate::error::Result;
use crate::sync::{Arc, Ordering};
use crate::vcpu_debug::VcpuDebug;

/// Why [`VcpuDebug::wait_idle`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The debugger holds this vCPU (a stop was asked for or another vCPU
    /// posted one): call [`before_run`](VcpuDebug::before_run), which parks.
    Stop,
    /// The debug configuration this vCPU applied is out of date (a
    /// breakpoint or step changed, a session detached): call
    /// [`before_run`](VcpuDebug::before_run), which applies it.
    Intent,
    /// The VMM's own [`IdleWaker::wake`]: the guest may run again.
    Vmm,
    /// The timeout passed with nothing to do.
    TimedOut,
}

/// Ends vCPU `vcpu`'s [`wait_idle`](VcpuDebug::wait_idle) for the VMM's own
/// reasons (an interrupt for the guest). Cheap to clone, `Send + Sync`: give
/// one to each interrupt source. A wake while the vCPU is not waiting is kept
/// (one, like a pending interrupt) and ends its next wait at once.
///
/// It only ends the wait: it does not kick a vCPU out of `KVM_RUN` (a VMM
/// that injects an interrupt into a running vCPU does that its own way).
pub struct IdleWaker<M> {
    shared: Arc<Shared<M>>,
    vcpu: usize,
}

impl<M> Clone for IdleWaker<M> {
    fn clone(&self) -> Self {
        IdleWaker {
            shared: Arc::clone(&self.shared),
            vcpu: self.vcpu,
        }
    }
}

impl<M> fmt::Debug for IdleWaker<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdleWaker")
            .field("vcpu", &self.vcpu)
            .finish_non_exhaustive()
    }
}

impl<M> IdleWaker<M> {
    /// The vCPU this waker wakes.
    pub fn vcpu(&self) -> usize {
        self.vcpu
    }

    /// Ends the vCPU's current wait, or its next one if it is not waiting.
    ///
    /// # Errors
    /// [`Error::Poisoned`](crate::Error::Poisoned).
    pub fn wake(&self) -> Result<()> {
        // Set under the lock the waiter checks it under, notify after: a
        // waiter either sees the flag or is already waiting when notified.
        self.shared.lock()?.idle_wakes.insert(self.vcpu);
        self.shared.notify_debugger();
        Ok(())
    }
}

impl<M: GuestMemory> VmDebug<M> {
    /// An [`IdleWaker`] for vCPU `vcpu`, for the VMM's interrupt sources.
    ///
    /// # Errors
    /// [`Error::Run`](crate::Error::Run) if `vcpu` is not one of the VM's vCPUs;
    /// [`Error::Poisoned`](crate::Error::Poisoned).
    pub fn idle_waker(&self, vcpu: usize) -> Result<IdleWaker<M>> {
        self.shared.lock()?.run.check(vcpu)?;
        Ok(IdleWaker {
            shared: Arc::clone(&self.shared),
            vcpu,
        })
    }
}

impl<M: GuestMemory> VcpuDebug<M> {
    /// An [`IdleWaker`] for this vCPU.
    pub fn idle_waker(&self) -> IdleWaker<M> {
        IdleWaker {
            shared: Arc::clone(self.shared()),
            vcpu: self.id(),
        }
    }

    /// Call on this vCPU's thread after a `hlt` exit, in a VMM without an
    /// in-kernel irqchip: waits until the debugger wants this vCPU, the VMM
    /// wakes it ([`IdleWaker`]), or `timeout` passes (`None`: no timeout),
    /// and says which ([`Woke`]; the debugger's reasons first). See the
    /// [module docs](crate::idle) for the loop around it.
    ///
    /// A [`Woke::Vmm`] consumes the wake; a stop or intent change is
    /// answered until [`before_run`](Self::before_run) has dealt with it.
    /// A configuration change is noticed only while this handle's applied
    /// configuration is the intent's (not during a step over a breakpoint,
    /// which `before_run` finishes anyway).
    ///
    /// # Errors
    /// [`Error::Poisoned`](crate::Error::Poisoned).
    pub fn wait_idle(&self, timeout: Option<Duration>) -> Result<Woke> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let shared = self.shared();
        let applied = self.applied_generation();
        let mut inner = shared.lock()?;
        // Not kicked while here (see `Shared::kick`): it leaves under the
        // lock, and so sees every change made before a kick was skipped.
        inner.idle_waiting.insert(self.id());
        let woke = loop {
            if inner.run.held(self.id()) {
                break Woke::Stop;
            }
            if inner.idle_wakes.remove(&self.id()) {
                break Woke::Vmm;
            }
            // Bumped under this lock: read while holding it.
            let now_generation = shared.generation.load(Ordering::Acquire);
            if applied.is_some_and(|g| g != now_generation) {
                break Woke::Intent;
            }
            // Counted as a waiter on the debugger's condition variable, which
            // every kick and wake notifies.
            inner = match deadline {
                None => shared.wait_debugger(inner, None)?,
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break Woke::TimedOut;
                    }
                    shared.wait_debugger(inner, Some(d - now))?
                }
            };
        };
        inner.idle_waiting.remove(&self.id());
        drop(inner);
        // Kicks sent to this thread while it waited (a wait that ended
        // before a kick's look, see `Shared::kick`) are dropped: their
        // changes are in the state before_run reads next.
        let kick = shared.kick.read().map_err(|_| crate::Error::Poisoned)?.clone();
        if let Some(kick) = kick {
            kick.drop_pending().map_err(|source| crate::Error::Kick {
                vcpu: self.id(),
                source,
            })?;
        }
        Ok(woke)
    }
}
