//! [`VmTarget`]: the `gdbstub` target over a [`VmDebug`], one GDB thread per
//! vCPU.
//!
//! The target never touches a vCPU itself: registers and guest-virtual
//! memory are read on the parked vCPU's own thread
//! ([`VmDebug::with_parked_vcpu`]), breakpoints and resumes go through the
//! VM-wide intent, and each vCPU applies its own configuration before it
//! re-enters `KVM_RUN`.
//!
//! Registers are mapped in [`regs`](super::regs) and written all together
//! or not at all.
//!
//! Errors GDB can cause (a bad address, removing what is not set, a register
//! value no CPU can hold) are error replies (`Exx`) and change nothing;
//! errors that leave the VM in doubt (a vCPU that does not stop, a poisoned
//! lock) end the session, and [`serve`](super::serve) detaches.

use std::collections::BTreeMap;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint,
    SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use vm_memory::GuestMemory;
use x86_debugreg::sw::SwError;
use x86_debugreg::watch::{Watch, WatchError, WatchHit, WatchKind as CoreWatchKind};
use x86_debugreg::{BreakpointError, BreakpointType};

use super::event_loop::Waiter;
use super::regs::{self, ApplyError, VcpuRegs};
use super::stop;
use super::GuestEnd;
use crate::control::Action;
use crate::debugger::Insert;
use crate::error::Error;
use crate::memory::AddressSpace;
use crate::{StopEvent, VmDebug};

/// `EFAULT`: an address outside guest memory or not mapped.
const EFAULT: u8 = 14;
/// `EINVAL`: a request kvm-glue refuses (misaligned, bad length, not set).
const EINVAL: u8 = 22;
/// `EIO`: a vCPU ioctl failed.
const EIO: u8 = 5;
/// `ENOTSUP`: KVM does not apply the value (`mxcsr` through `KVM_SET_FPU`).
const ENOTSUP: u8 = 95;

/// Bytes per guest page: memory is read page by page, so a read that runs
/// into an unmapped page returns what came before it.
const PAGE: u64 = 0x1000;

/// The `gdbstub` target: a [`VmDebug`] and what this GDB session set.
pub struct VmTarget<M> {
    pub(super) dbg: VmDebug<M>,
    vcpus: Vec<usize>,
    actions: BTreeMap<usize, Action>,
    scheduler_locked: bool,
    /// The vCPU GDB last heard about: Ctrl-C is reported on it, and software
    /// breakpoints translate through it.
    pub(super) current: usize,
    pub(super) stop_timeout: Duration,
    pub(super) end: Option<GuestEnd>,
    /// What the event loop sleeps on while the guest runs.
    pub(super) waiter: Option<Waiter>,
}

impl<M> std::fmt::Debug for VmTarget<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTarget")
            .field("vcpus", &self.vcpus)
            .field("actions", &self.actions)
            .field("scheduler_locked", &self.scheduler_locked)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// A non-fatal error reply for a kvm-glue error, or the end of the session
/// for one that leaves the VM in doubt.
fn reply(e: Error) -> TargetError<Error> {
    match e {
        Error::Memory(_) => TargetError::Errno(EFAULT),
        Error::Breakpoint(BreakpointError::Sw(SwError::Read { .. } | SwError::Write { .. })) => {
            TargetError::Errno(EFAULT)
        }
        Error::Breakpoint(_) | Error::Watch(_) => TargetError::Errno(EINVAL),
        Error::Vcpu { .. } => TargetError::Errno(EIO),
        other => TargetError::Fatal(other),
    }
}

impl<M: GuestMemory + Send + Sync + 'static> VmTarget<M> {
    /// A target for a session that starts with every vCPU stopped.
    pub(super) fn new(dbg: VmDebug<M>, stop_timeout: Duration, end: Option<GuestEnd>) -> Result<VmTarget<M>, Error> {
        let vcpus = dbg.vcpu_ids()?;
        let current = vcpus.first().copied().unwrap_or(0);
        Ok(VmTarget {
            dbg,
            vcpus,
            actions: BTreeMap::new(),
            scheduler_locked: false,
            current,
            stop_timeout,
            end,
            waiter: None,
        })
    }

    /// The vCPU of `tid`, if the VM has it.
    fn vcpu_of(&self, tid: Tid) -> Result<usize, TargetError<Error>> {
        let id = stop::vcpu(tid);
        if self.vcpus.contains(&id) {
            Ok(id)
        } else {
            Err(TargetError::Errno(EINVAL))
        }
    }

    /// Runs `f` on the parked vCPU `id`'s thread.
    fn on_vcpu<R: Send + 'static>(
        &self,
        id: usize,
        f: impl FnOnce(&VmDebug<M>, &dyn crate::VcpuOps) -> R + Send + 'static,
    ) -> Result<R, TargetError<Error>> {
        let dbg = self.dbg.clone();
        self.dbg
            .with_parked_vcpu(id, move |ops| f(&dbg, ops))
            .map_err(TargetError::Fatal)
    }

    /// Stops every vCPU (bounded by the session's timeout).
    pub(super) fn stop_all(&mut self) -> Result<(), Error> {
        self.dbg.stop_all(self.stop_timeout)
    }

    fn insert_sw(&mut self, addr: u64, insert: bool) -> TargetResult<bool, Self> {
        let done = self.on_vcpu(self.current, move |dbg, ops| {
            let space = AddressSpace::Virtual(ops);
            if insert {
                dbg.insert(space, BreakpointType::Software, addr, 1)
                    .map(|i| matches!(i, Insert::Inserted(_)))
            } else {
                dbg.remove(space, BreakpointType::Software, addr, 1).map(|_| true)
            }
        })?;
        done.map_err(reply)
    }

    /// Inserts GDB's watchpoint through the core's planner: any range the
    /// free slots can cover goes in whole (pieces shared with watchpoints
    /// already set), or nothing changes and GDB hears "cannot insert".
    fn add_watch(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        let Ok(watch) = Watch::new(core_kind(kind), addr, len) else {
            // An empty range or one past 2^64: nothing four slots can watch.
            return Ok(false);
        };
        let inserted = if watch.kind() == CoreWatchKind::Read {
            // The value check reads the watched bytes now and at every hit
            // through a vCPU's page tables (hardware addresses are linear).
            self.on_vcpu(self.current, move |dbg, ops| {
                dbg.insert_watch(AddressSpace::Virtual(ops), watch)
            })?
        } else {
            self.dbg.insert_watch(AddressSpace::Physical, watch)
        };
        match inserted {
            Ok(Some(_)) => Ok(true),
            // Does not fit in the free slots: GDB falls back.
            Ok(None) => Ok(false),
            Err(e) => Err(reply(e)),
        }
    }

    fn remove_watch(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        let Ok(watch) = Watch::new(core_kind(kind), addr, len) else {
            return Ok(false);
        };
        match self.dbg.remove_watch(watch) {
            Ok(_) => Ok(true),
            Err(Error::Watch(WatchError::NotFound { .. })) => Ok(false),
            Err(e) => Err(reply(e)),
        }
    }

    /// The watchpoints `event`'s vCPU hit that are still set, each as GDB
    /// set it.
    pub(super) fn watch_hits(&self, event: &StopEvent) -> Result<Vec<WatchHit>, Error> {
        let slots = self.dbg.watch_slots()?;
        let mut hits = self.dbg.watch_hits(event)?;
        hits.retain(|hit| slots.count(&hit.watch) > 0);
        Ok(hits)
    }
}

/// The core's kind for a GDB watch kind (`Z2` write, `Z3` read, `Z4` access).
fn core_kind(kind: WatchKind) -> CoreWatchKind {
    match kind {
        WatchKind::Write => CoreWatchKind::Write,
        WatchKind::Read => CoreWatchKind::Read,
        WatchKind::ReadWrite => CoreWatchKind::ReadWrite,
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Target for VmTarget<M> {
    type Arch = X86_64_SSE;
    type Error = Error;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> MultiThreadBase for VmTarget<M> {
    fn read_registers(&mut self, out: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        let got = self.on_vcpu(id, |_, ops| VcpuRegs::read(ops))?;
        *out = regs::to_gdb(&got.map_err(|_| TargetError::Errno(EIO))?);
        Ok(())
    }

    fn write_registers(&mut self, new: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        let new = new.clone();
        // Read, check and write on the vCPU's thread, all or nothing: a
        // refused value is EINVAL, a failed ioctl EIO, a value KVM does not
        // take (mxcsr) ENOTSUP, each with every register as it was.
        self.on_vcpu(id, move |_, ops| {
            let now = VcpuRegs::read(ops).map_err(|_| TargetError::Errno(EIO))?;
            let set = regs::from_gdb(&new, &now).map_err(|_| TargetError::Errno(EINVAL))?;
            regs::apply(ops, &now, &set).map_err(|e| match e {
                ApplyError::Failed { .. } => TargetError::Errno(EIO),
                ApplyError::NotApplied { .. } => TargetError::Errno(ENOTSUP),
                ApplyError::Restore { op, source } => TargetError::Fatal(Error::Vcpu { vcpu: id, op, source }),
            })
        })?
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let id = self.vcpu_of(tid)?;
        let len = data.len();
        // Page by page: a read that runs into an unmapped page returns the
        // bytes before it (GDB asks again for the rest and gets the error).
        let read = self.on_vcpu(id, move |dbg, ops| {
            let mut buf = vec![0u8; len];
            let mut done = 0usize;
            while done < len {
                let at = start.wrapping_add(done as u64);
                let in_page = (PAGE - at % PAGE) as usize;
                let n = in_page.min(len - done);
                if dbg
                    .read_memory(AddressSpace::Virtual(ops), at, &mut buf[done..done + n])
                    .is_err()
                {
                    break;
                }
                done += n;
            }
            buf.truncate(done);
            buf
        })?;
        if read.is_empty() && len > 0 {
            return Err(TargetError::Errno(EFAULT));
        }
        data[..read.len()].copy_from_slice(&read);
        Ok(read.len())
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        let data = data.to_vec();
        let done = self.on_vcpu(id, move |dbg, ops| {
            dbg.write_memory(AddressSpace::Virtual(ops), start, &data)
        })?;
        done.map_err(reply)
    }

    fn list_active_threads(&mut self, thread_is_active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for tid in self.vcpus.iter().filter_map(|&id| stop::tid(id)) {
            thread_is_active(tid);
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> MultiThreadResume for VmTarget<M> {
    fn resume(&mut self) -> Result<(), Self::Error> {
        // vCont without a default action (scheduler locking): only the
        // threads named run. With one, every other thread continues.
        let plan: Vec<(usize, Action)> = self
            .vcpus
            .iter()
            .filter_map(|id| match self.actions.get(id) {
                Some(action) => Some((*id, *action)),
                None if self.scheduler_locked => None,
                None => Some((*id, Action::Continue)),
            })
            .collect();
        self.dbg.resume(&plan)
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.actions.clear();
        self.scheduler_locked = false;
        Ok(())
    }

    fn set_resume_action_continue(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        // A signal GDB passes on (`signal N`, or a stop's own SIGTRAP when
        // told to pass it) has nowhere to go: a vCPU has no Unix signals.
        // The guest's own #DB/#BP were re-injected by kvm-glue before they
        // could reach GDB, so nothing is lost by dropping it.
        let id = stop::vcpu(tid);
        self.actions.insert(id, Action::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> MultiThreadSingleStep for VmTarget<M> {
    fn set_resume_action_step(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        self.actions.insert(stop::vcpu(tid), Action::Step);
        Ok(())
    }
}

impl<M: GuestMemory + Send + Sync + 'static> MultiThreadSchedulerLocking for VmTarget<M> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.scheduler_locked = true;
        Ok(())
    }
}

impl<M: GuestMemory + Send + Sync + 'static> ThreadExtraInfo for VmTarget<M> {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = format!("vCPU {}", stop::vcpu(tid));
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> Breakpoints for VmTarget<M> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> SwBreakpoint for VmTarget<M> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.insert_sw(addr, true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.insert_sw(addr, false)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> HwBreakpoint for VmTarget<M> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self
            .dbg
            .insert(AddressSpace::Physical, BreakpointType::Hardware, addr, 1)
        {
            Ok(Insert::Inserted(_)) => Ok(true),
            Ok(Insert::NoFreeSlot) => Ok(false),
            Err(e) => Err(reply(e)),
        }
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.dbg
            .remove(AddressSpace::Physical, BreakpointType::Hardware, addr, 1)
            .map(|_| true)
            .map_err(reply)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> HwWatchpoint for VmTarget<M> {
    fn add_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        self.add_watch(addr, len, kind)
    }

    fn remove_hw_watchpoint(&mut self, addr: u64, len: u64, kind: WatchKind) -> TargetResult<bool, Self> {
        self.remove_watch(addr, len, kind)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> MonitorCmd for VmTarget<M> {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), Self::Error> {
        match cmd {
            b"breakpoints" | b"bp" => {
                let state = self.dbg.state()?;
                let mut any = false;
                for used in self.dbg.watch_slots()?.iter() {
                    outputln!(out, "{}: {}", used.slot, used.breakpoint);
                    any = true;
                }
                for (addr, _) in state.sw().iter() {
                    outputln!(out, "int3 at {addr:#x}");
                    any = true;
                }
                if !any {
                    outputln!(out, "no breakpoints");
                }
            }
            _ => {
                outputln!(out, "kvm-glue monitor commands:");
                outputln!(
                    out,
                    "  breakpoints   every debug-register slot and int3 (by guest-physical address) kvm-glue holds"
                );
            }
        }
        Ok(())
    }
}
