//! [`VmDebug`]: the VM-wide debug handle, shared by every vCPU thread and the
//! debugger front end (a GDB stub, a VMM's API).
//!
//! It holds the core [`DebugState`] (the *intent*: which breakpoints,
//! watchpoints and single-steps the debugger wants) and guest memory, behind
//! one mutex, plus a generation number that moves whenever the intent
//! changes in a way some vCPU's `KVM_SET_GUEST_DEBUG` argument depends on.
//! Operations here never issue an ioctl on a vCPU: each vCPU's
//! [`VcpuDebug::sync`](crate::VcpuDebug::sync), called by that vCPU's thread
//! before `KVM_RUN`, applies the change, at most once per vCPU however many
//! operations happened in between.
//!
//! Software breakpoints patch guest memory at once (memory is shared by all
//! vCPUs), so insert them while the vCPUs are stopped, as a GDB stub does: a
//! vCPU that runs into a new `0xCC` before its next `sync` takes the `#BP`
//! itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestMemory;
use x86_debugreg::hw::HwError;
use x86_debugreg::state::{Inserted, Removed};
use x86_debugreg::sw::RemoveAll;
use x86_debugreg::{BreakpointError, BreakpointType, DebugState, GuestDebug};

use crate::error::{Error, Result};
use crate::memory::{AddressSpace, MemoryError, SpaceMemory};
use crate::probe::Int1Pc;
use crate::vcpu::VcpuOps;
use crate::vcpu_debug::{effective, VcpuDebug};

/// The outcome of a successful [`VmDebug::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// The breakpoint is set (or, for a software breakpoint already set, counted).
    Inserted(Inserted),
    /// All four debug address registers are in use: a normal answer, not a
    /// failure (a GDB stub replies with an empty packet and GDB falls back).
    NoFreeSlot,
}

pub(crate) struct Inner<M> {
    pub(crate) state: DebugState,
    pub(crate) mem: M,
    single_step: Vec<bool>,
    pub(crate) int1_pc: Int1Pc,
}

impl<M> Inner<M> {
    pub(crate) fn single_step(&self, vcpu: usize) -> bool {
        self.single_step.get(vcpu).copied().unwrap_or(false)
    }

    /// The configuration vCPU `vcpu` should run with.
    pub(crate) fn config_for(&self, vcpu: usize) -> GuestDebug {
        self.state.guest_debug_for(self.single_step(vcpu))
    }
}

pub(crate) struct Shared<M> {
    /// Moves (under the lock) whenever a vCPU's configuration may have changed.
    pub(crate) generation: AtomicU64,
    pub(crate) inner: Mutex<Inner<M>>,
}

impl<M> Shared<M> {
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Inner<M>>> {
        self.inner.lock().map_err(|_| Error::Poisoned)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The VM-wide debug handle. Cheap to clone; every clone is the same state.
///
/// ```no_run
/// use kvm_glue::{guest::Guest, AddressSpace, VmDebug};
/// use x86_debugreg::BreakpointType;
/// let mut guest = Guest::new(1)?;
/// let dbg = VmDebug::new(guest.memory().clone());
/// let mut vcpu_dbg = dbg.vcpu(0);
/// dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, 0x1_0006, 1)?;
/// vcpu_dbg.sync(guest.vcpu(0))?; // one KVM_SET_GUEST_DEBUG, then KVM_RUN
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct VmDebug<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for VmDebug<M> {
    fn clone(&self) -> Self {
        VmDebug {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M> std::fmt::Debug for VmDebug<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmDebug")
            .field("generation", &self.shared.generation.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory> VmDebug<M> {
    /// A handle with nothing set, over guest memory `mem`.
    pub fn new(mem: M) -> VmDebug<M> {
        VmDebug {
            shared: Arc::new(Shared {
                generation: AtomicU64::new(0),
                inner: Mutex::new(Inner {
                    state: DebugState::new(),
                    mem,
                    single_step: Vec::new(),
                    int1_pc: Int1Pc::Unknown,
                }),
            }),
        }
    }

    /// The per-vCPU handle for vCPU `id`, for that vCPU's thread. It starts
    /// out believing the vCPU has debugging off (KVM's state for a new vCPU).
    pub fn vcpu(&self, id: usize) -> VcpuDebug<M> {
        VcpuDebug::new(id, Arc::clone(&self.shared))
    }

    /// The current generation (moves when some vCPU's configuration changes).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// A copy of the intent.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn state(&self) -> Result<DebugState> {
        Ok(self.shared.lock()?.state.clone())
    }

    /// The configuration vCPU `vcpu` should run with (the intent).
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn guest_debug_for(&self, vcpu: usize) -> Result<GuestDebug> {
        Ok(self.shared.lock()?.config_for(vcpu))
    }

    /// Tells the handles where this host's KVM puts the pc of an `int1` exit
    /// (from [`Probe::guest_int1_pc`](crate::probe::Probe::guest_int1_pc)), so
    /// that re-injecting the guest's own `int1` does not loop on VMX.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn set_int1_pc(&self, at: Int1Pc) -> Result<()> {
        self.shared.lock()?.int1_pc = at;
        Ok(())
    }

    fn with_state<T>(
        &self,
        space: AddressSpace<'_>,
        op: impl FnOnce(&mut DebugState, &mut SpaceMemory<'_, M>) -> T,
    ) -> Result<T> {
        let mut guard = self.shared.lock()?;
        let inner = &mut *guard;
        let before = effective(inner.state.guest_debug_for(false));
        let mut mem = SpaceMemory { mem: &inner.mem, space };
        let out = op(&mut inner.state, &mut mem);
        // Only a change of the KVM_SET_GUEST_DEBUG argument needs the vCPUs'
        // attention: a second software breakpoint changes memory, not it.
        if effective(inner.state.guest_debug_for(false)) != before {
            self.shared.bump();
        }
        Ok(out)
    }

    /// Inserts a breakpoint of GDB type `ty` at `addr` (`len` is for
    /// watchpoints). Software breakpoints patch guest memory in `space`;
    /// hardware ones take linear addresses and ignore `space`.
    ///
    /// # Errors
    /// [`Error::Breakpoint`] for what the core refuses (misaligned, bad
    /// length, duplicate, memory failure); nothing changes then. A full set
    /// of slots is [`Insert::NoFreeSlot`], not an error.
    pub fn insert(&self, space: AddressSpace<'_>, ty: BreakpointType, addr: u64, len: u64) -> Result<Insert> {
        match self.with_state(space, |state, mem| state.insert(mem, ty, addr, len))? {
            Ok(done) => Ok(Insert::Inserted(done)),
            Err(BreakpointError::Hw(HwError::Full)) => Ok(Insert::NoFreeSlot),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes one use of a breakpoint of GDB type `ty` at `addr`.
    ///
    /// # Errors
    /// [`Error::Breakpoint`] (including not found); nothing changes then.
    pub fn remove(&self, space: AddressSpace<'_>, ty: BreakpointType, addr: u64, len: u64) -> Result<Removed> {
        Ok(self.with_state(space, |state, mem| state.remove(mem, ty, addr, len))??)
    }

    /// Frees every hardware slot and removes every software breakpoint,
    /// restoring guest memory through `space`. Entries whose memory failed
    /// stay set and are listed in the answer.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn remove_all(&self, space: AddressSpace<'_>) -> Result<RemoveAll<MemoryError>> {
        self.with_state(space, |state, mem| state.remove_all(mem))
    }

    /// Turns single-step on or off for vCPU `vcpu` only.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn set_single_step(&self, vcpu: usize, on: bool) -> Result<()> {
        let mut inner = self.shared.lock()?;
        if inner.single_step(vcpu) != on {
            if inner.single_step.len() <= vcpu {
                inner.single_step.resize(vcpu + 1, false);
            }
            inner.single_step[vcpu] = on;
            self.shared.bump();
        }
        Ok(())
    }

    /// Whether vCPU `vcpu` single-steps.
    ///
    /// # Errors
    /// [`Error::Poisoned`].
    pub fn single_step(&self, vcpu: usize) -> Result<bool> {
        Ok(self.shared.lock()?.single_step(vcpu))
    }

    /// Applies the current intent to every vCPU now, as one transaction: the
    /// `i`-th handle with the `i`-th vCPU fd. Used when one thread owns all
    /// stopped vCPUs (the other way is each thread's own
    /// [`VcpuDebug::sync`](crate::VcpuDebug::sync)).
    ///
    /// Returns how many `KVM_SET_GUEST_DEBUG` calls were made.
    ///
    /// # Errors
    /// If the ioctl fails on a vCPU, the vCPUs already changed by this call
    /// are set back to the configuration they had, and the error names the
    /// failing vCPU and the outcome of each rollback. Every handle then
    /// records exactly what its vCPU holds (a vCPU whose rollback failed keeps
    /// the new configuration, and its handle says so).
    pub fn sync_all<V: VcpuOps>(&self, handles: &mut [VcpuDebug<M>], vcpus: &[V]) -> Result<usize, SyncAllError> {
        let mut changed: Vec<(usize, crate::vcpu_debug::Applied)> = Vec::new();
        let mut issued = 0;
        for (i, (handle, vcpu)) in handles.iter_mut().zip(vcpus).enumerate() {
            let before = handle.applied_record();
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
