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
//!
//! What the wire may ask is checked here, where gdbstub 0.7.10 does not:
//!
//! * **addresses are canonical** (bits 63:47 all equal, SDM Vol. 1
//!   §3.3.7.1): `KVM_TRANSLATE` looks at bits 47:0 only, so a
//!   non-canonical address would alias low memory; `m`, `M`/`X` and every
//!   `Z`/`z` refuse one (`EFAULT`), as a CPU raises #GP. A read stops at the
//!   end of its canonical half and never wraps past 2^64.
//! * **a read is one answer**: the bytes up to the first that cannot be
//!   read, or `EFAULT` if there are none (the [`wire`](super::wire) makes
//!   every `m` a single `read_addrs` call).
//! * **a write carries its declared length** (`EINVAL` otherwise) and ends
//!   at the last byte of the address space at the latest.
//! * **a resume names threads that exist** and runs at least one vCPU:
//!   otherwise nothing resumes and the reply is `EINVAL`.

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
use super::wire;
use super::GuestEnd;
use crate::control::Action;
use crate::debugger::Insert;
use crate::error::Error;
use crate::memory::{self, AddressSpace};
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

/// Whether `addr` is canonical with 48-bit linear addresses: bits 63:47
/// all equal (SDM Vol. 1 §3.3.7.1). (5-level paging's 57 bits are not
/// modelled: GDB's own x86-64 targets assume 48.)
pub(super) fn canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// Whether every byte of `[addr, addr + len)` is canonical and in one half
/// (`len` ≥ 1; never past 2^64).
fn canonical_range(addr: u64, len: u64) -> bool {
    let Some(last) = len.checked_sub(1).and_then(|l| addr.checked_add(l)) else {
        return false;
    };
    canonical(addr) && canonical(last) && addr >> 63 == last >> 63
}

/// How many bytes from canonical `addr` to the end of its half (the lower
/// half ends at 2^47, the upper at 2^64), saturated to `usize`.
fn room(addr: u64) -> usize {
    let end_minus_one = if addr >> 63 == 0 { (1u64 << 47) - 1 } else { u64::MAX };
    usize::try_from(end_minus_one - addr).map_or(usize::MAX, |n| n.saturating_add(1))
}

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
    /// Resumed and not stopped since: a stop or Ctrl-C has something to
    /// report.
    pub(super) running: bool,
    /// A resume refused with this errno: the event loop sends the reply.
    pub(super) refused: Option<u8>,
    /// A resume action named a thread that does not exist.
    bad_action: bool,
    /// What the packet being handled declared (the wire records it).
    pub(super) declared: wire::Shared,
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
            running: false,
            refused: None,
            bad_action: false,
            declared: wire::Shared::default(),
        })
    }

    /// Records a resume action for `tid`, or that it names no vCPU.
    fn set_action(&mut self, tid: Tid, action: Action) {
        let id = stop::vcpu(tid);
        if self.vcpus.contains(&id) {
            self.actions.insert(id, action);
        } else {
            self.bad_action = true;
        }
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
        if !canonical(addr) {
            return Err(TargetError::Errno(EFAULT));
        }
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
        if !canonical_range(addr, len) {
            return Err(TargetError::Errno(EFAULT));
        }
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
        if !canonical_range(addr, len) {
            return Err(TargetError::Errno(EFAULT));
        }
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
        if !canonical(start) {
            return Err(TargetError::Errno(EFAULT));
        }
        // Up to the end of the canonical half, never round past 2^64. The
        // buffer is gdbstub's (at most its packet buffer), not the request.
        let len = data.len().min(room(start));
        // Page by page: a read that runs into an unmapped page returns the
        // bytes before it (GDB asks again for the rest and gets the error).
        // Each page is translated here and read by its guest-physical
        // address, so a page ending at 2^64 reads like any other.
        let read = self.on_vcpu(id, move |dbg, ops| {
            let mut buf = vec![0u8; len];
            let mut done = 0usize;
            while done < len {
                // No overflow: done < len <= room(start).
                let at = start + done as u64;
                let in_page = (PAGE - at % PAGE) as usize;
                let n = in_page.min(len - done);
                let Ok(gpa) = memory::translate(ops, at) else { break };
                if dbg
                    .read_memory(AddressSpace::Physical, gpa, &mut buf[done..done + n])
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
        let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner()).write_len.take();
        if declared.is_some_and(|n| n != data.len()) {
            // gdbstub writes what the data holds, whatever the length said.
            return Err(TargetError::Errno(EINVAL));
        }
        if data.is_empty() {
            // GDB's probe for `X` support: nothing to write.
            return Ok(());
        }
        if !canonical_range(start, data.len() as u64) {
            return Err(TargetError::Errno(EFAULT));
        }
        let data = data.to_vec();
        let done = self.on_vcpu(id, move |dbg, ops| {
            // `write_memory`'s page walk cannot end exactly at 2^64: the
            // address space's last byte goes by its guest-physical address,
            // checked before anything is written.
            let ends_at_top = start.checked_add(data.len() as u64).is_none();
            if !ends_at_top {
                return dbg.write_memory(AddressSpace::Virtual(ops), start, &data);
            }
            let (head, last) = data.split_at(data.len() - 1);
            let gpa = memory::translate(ops, u64::MAX).map_err(Error::Memory)?;
            dbg.read_memory(AddressSpace::Physical, gpa, &mut [0u8])?;
            if !head.is_empty() {
                dbg.write_memory(AddressSpace::Virtual(ops), start, head)?;
            }
            dbg.write_memory(AddressSpace::Physical, gpa, last)
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
        if self.bad_action || (self.scheduler_locked && self.actions.is_empty()) {
            // A thread that does not exist, or nothing to run: nothing runs,
            // and GDB hears why instead of waiting for a stop.
            self.refused = Some(EINVAL);
            return Ok(());
        }
        let plan: Vec<(usize, Action)> = self
            .vcpus
            .iter()
            .filter_map(|id| match self.actions.get(id) {
                Some(action) => Some((*id, *action)),
                None if self.scheduler_locked => None,
                None => Some((*id, Action::Continue)),
            })
            .collect();
        self.dbg.resume(&plan)?;
        self.running = true;
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.actions.clear();
        self.scheduler_locked = false;
        self.bad_action = false;
        Ok(())
    }

    fn set_resume_action_continue(&mut self, tid: Tid, _signal: Option<Signal>) -> Result<(), Self::Error> {
        // A signal GDB passes on (`signal N`, or a stop's own SIGTRAP when
        // told to pass it) has nowhere to go: a vCPU has no Unix signals.
        // The guest's own #DB/#BP were re-injected by kvm-glue before they
        // could reach GDB, so nothing is lost by dropping it.
        self.set_action(tid, Action::Continue);
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
        self.set_action(tid, Action::Step);
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
        // A thread that does not exist is answered with an error by the
        // wire before gdbstub gets here (this method cannot return one).
        let id = stop::vcpu(tid);
        if !self.vcpus.contains(&id) {
            return Ok(0);
        }
        let text = format!("vCPU {id}");
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
        if !canonical(addr) {
            return Err(TargetError::Errno(EFAULT));
        }
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
        if !canonical(addr) {
            return Err(TargetError::Errno(EFAULT));
        }
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
