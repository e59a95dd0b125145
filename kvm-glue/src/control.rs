//! All-stop: which vCPUs must stay out of `KVM_RUN`, the stops they posted,
//! and the jobs the debugger sends to a parked vCPU's thread.
//!
//! One `Mutex<Control>` and one `Condvar` per VM. The rules:
//!
//! * A vCPU is **held** when the debugger asked for a stop
//!   ([`VmDebug::stop_all`](crate::VmDebug::stop_all)) or any vCPU posted a
//!   stop ([`VcpuDebug::report_stop`](crate::VcpuDebug::report_stop)). A held
//!   vCPU **parks** in [`VcpuDebug::before_run`](crate::VcpuDebug::before_run):
//!   it is outside `KVM_RUN`, on its own thread, running the debugger's jobs,
//!   until it is released.
//! * Stops posted while others are being reported stay **pending**, one per
//!   vCPU. A resume first drops those the debugger has made stale (the
//!   breakpoint is gone, the vCPU is no longer single-stepped); if any are
//!   left, nobody is released and the next
//!   [`wait_stop`](crate::VmDebug::wait_stop) returns one at once: a vCPU
//!   with a pending stop reports it without entering `KVM_RUN` again.
//! * Lock order: the debug state's lock may be held while taking this one,
//!   never the other way round.

use std::collections::VecDeque;
use std::fmt;

use crate::vcpu::VcpuOps;
use crate::vcpu_debug::StopEvent;

/// A job for a parked vCPU's thread.
pub(crate) type Job = Box<dyn FnOnce(&dyn VcpuOps) + Send>;

/// Where a vCPU is in the all-stop protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// No handle for this vCPU exists.
    Absent,
    /// Running or about to run the guest.
    Running,
    /// Asked to stop, not parked yet (may be inside `KVM_RUN`).
    StopRequested,
    /// Parked in `before_run`: outside `KVM_RUN`, guest frozen.
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

#[derive(Default)]
pub(crate) struct VcpuCtl {
    /// Live handles for this id (0: absent).
    pub(crate) handles: usize,
    pub(crate) hold: bool,
    pub(crate) parked: bool,
    pub(crate) pending: Option<Pending>,
    pub(crate) jobs: VecDeque<Job>,
    /// Generation of the intent this vCPU last applied (`None`: unknown).
    pub(crate) applied_generation: Option<u64>,
}

/// A posted, not yet reported stop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pending {
    pub(crate) event: StopEvent,
    /// For a software-breakpoint stop: the guest-physical address of the `int3`.
    pub(crate) gpa: Option<u64>,
}

#[derive(Default)]
pub(crate) struct Control {
    pub(crate) vcpus: Vec<VcpuCtl>,
    /// vCPU ids in the order their pending stops were posted.
    pub(crate) order: VecDeque<usize>,
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field(
                "states",
                &(0..self.vcpus.len()).map(|i| self.state(i)).collect::<Vec<_>>(),
            )
            .field("order", &self.order)
            .finish()
    }
}

impl Control {
    pub(crate) fn vcpu_mut(&mut self, id: usize) -> &mut VcpuCtl {
        if self.vcpus.len() <= id {
            self.vcpus.resize_with(id + 1, VcpuCtl::default);
        }
        &mut self.vcpus[id]
    }

    pub(crate) fn state(&self, id: usize) -> RunState {
        match self.vcpus.get(id) {
            None => RunState::Absent,
            Some(v) if v.handles == 0 => RunState::Absent,
            Some(v) if v.parked => RunState::Parked,
            Some(v) if v.hold => RunState::StopRequested,
            Some(_) => RunState::Running,
        }
    }

    /// Ids with a live handle.
    pub(crate) fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        self.vcpus
            .iter()
            .enumerate()
            .filter(|(_, v)| v.handles > 0)
            .map(|(i, _)| i)
    }

    pub(crate) fn hold_all(&mut self) {
        for v in &mut self.vcpus {
            v.hold = true;
        }
    }

    /// The first live vCPU that is not parked.
    pub(crate) fn first_unparked(&self) -> Option<usize> {
        self.ids().find(|&i| !self.vcpus[i].parked)
    }

    /// Takes the oldest pending stop.
    pub(crate) fn take_pending(&mut self) -> Option<StopEvent> {
        while let Some(id) = self.order.pop_front() {
            if let Some(p) = self.vcpus.get_mut(id).and_then(|v| v.pending.take()) {
                return Some(p.event);
            }
        }
        None
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.order
            .iter()
            .any(|&id| self.vcpus.get(id).is_some_and(|v| v.pending.is_some()))
    }
}
