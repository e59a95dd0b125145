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
//! or not at all; `p`/`P` read and write one through the same path.
//!
//! # Resuming
//! A `vCont` names what each thread does; a thread it does not name stays
//! stopped unless the packet has a default action (`vCont;s:1;c`): no
//! default action is GDB's scheduler locking. A legacy `c`, `C`, `s` or `S`
//! resumes every vCPU, as QEMU and gdbserver do (the one GDB selected steps
//! for `s`), unless an `Hc` named one thread: then only that one runs.
//! gdbstub hands all of these to the target as "these threads, no default"
//! (it turns a `c` into a resume of the last-stopped thread), so
//! [`Watched`] reads which packet it was off the connection.
//!
//! # Breakpoints by what the host delivers
//! [`HostDebug`] says whether this host's KVM delivers `int3` exits and
//! data watchpoints (kvm-glue's probe, once per process, or the VMM's
//! word). Where `int3` exits do not work, `Z0` is served from a free
//! hardware execute slot, exactly like `Z1` (and answered `E22` when none
//! is free, so GDB says it cannot insert it); where data watchpoints do not
//! fire, `Z2`–`Z4` get the empty "not supported" reply: GDB 13 then says
//! it could not insert the watchpoint (it decides hardware or software
//! when the watchpoint is set, from `can-use-hw-watchpoints`, and does not
//! fall back by itself), and `set can-use-hw-watchpoints 0` makes it watch
//! in software, which single-step makes work. `monitor served` says which.
//!
//! # Kill
//! `vKill` and `k` are answered `OK` and end the session (gdbstub's extended
//! mode does that reply; `run` and `attach` are refused); what happens to
//! the guest then is [`serve`](super::serve)'s `SessionEnd::Killed`.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gdbstub::arch::Registers;
use gdbstub::common::{Pid, Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::single_register_access::{SingleRegisterAccess, SingleRegisterAccessOps};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps, SwBreakpoint,
    SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::extended_mode::{Args, AttachKind, ExtendedMode, ExtendedModeOps, ShouldTerminate};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::target_description_xml_override::{
    TargetDescriptionXmlOverride, TargetDescriptionXmlOverrideOps,
};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use vm_memory::GuestMemory;
use x86_debugreg::sw::SwError;
use x86_debugreg::watch::{Watch, WatchError, WatchHit, WatchKind as CoreWatchKind};
use x86_debugreg::{BreakpointError, BreakpointType};

use super::event_loop::Waiter;
use super::paging::{Paging, Walk};
use super::regs::{self, ApplyError, VcpuRegs, VmRegId, VmRegisters, X86_64Vm};
use super::stop;
use super::wire;
use super::GuestEnd;
use crate::control::Action;
use crate::debugger::Insert;
use crate::error::Error;
use crate::memory::{self, AddressSpace};
use crate::run_control::RunError;
use crate::{StopEvent, VmDebug};

/// `EFAULT`: an address outside guest memory or not mapped.
const EFAULT: u8 = 14;
/// `EINVAL`: a request kvm-glue refuses (misaligned, bad length, not set).
const EINVAL: u8 = 22;
/// `EPERM`: a resume of a vCPU that reported a fault (it cannot run on).
const EPERM: u8 = 1;
/// `EIO`: a vCPU ioctl failed.
const EIO: u8 = 5;
/// `ENOTSUP`: KVM accepted a register value but did not apply it.
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
    /// How long the event loop busy-polls before it sleeps
    /// ([`Options::busy_poll`](super::Options::busy_poll)).
    pub(super) busy_poll: Duration,
    /// What this host delivers: how `Z0`–`Z4` are served.
    host: HostDebug,
    /// Which resume packet GDB sent (read off the connection).
    resume_log: Arc<ResumeLog>,
    /// Resumed and not stopped since: a stop or Ctrl-C has something to
    /// report.
    pub(super) running: bool,
    /// Every vCPU the last resume ran single-steps: its stop comes within
    /// microseconds, and nothing else runs (the event loop busy-polls for
    /// it, see [`Options::busy_poll`](super::Options::busy_poll)).
    pub(super) stepping: bool,
    /// [`VmDebug::posts`] when the event loop last looked for a stop under
    /// the lock (`None`: never): while it stands, and the stop descriptor
    /// said nothing, no stop was posted since, and the loop sleeps without
    /// taking the lock a vCPU it just released is about to take.
    pub(super) seen_posts: Option<u64>,
    /// The stop descriptor became readable since the event loop last
    /// looked for a stop under the lock.
    pub(super) stop_signalled: bool,
    /// A resume refused with this errno: the event loop sends the reply.
    pub(super) refused: Option<u8>,
    /// A resume action named a thread that does not exist.
    bad_action: bool,
    /// What the packet being handled declared (the wire records it).
    pub(super) declared: wire::Shared,
    /// What was read of each parked vCPU, while nothing changed it.
    seen: BTreeMap<usize, Seen>,
}

/// What GDB read of one parked vCPU, kept while its
/// [`parked_epoch`](VmDebug::parked_epoch) stands — it has not left its
/// park, and no job that may write it (a `G`/`P`, or the VMM's own
/// [`with_parked_vcpu`](VmDebug::with_parked_vcpu)) was queued since. `g`,
/// `p` and the page walk of `m` are answered from it without waking the
/// vCPU: a vCPU's registers change only on its own thread, and that thread
/// is parked.
#[derive(Debug)]
struct Seen {
    epoch: u64,
    /// The control registers the page walk needs (`None`: each page is
    /// translated by the vCPU — its translation is not a page walk, see
    /// [`VcpuOps::translates_by_page_walk`](crate::VcpuOps::translates_by_page_walk),
    /// or `KVM_GET_SREGS` failed).
    paging: Option<Paging>,
    /// Every register as GDB sees them, once a `g` or `p` asked.
    regs: Option<VmRegisters>,
    /// `rbp`, `rsp` and `rip` (regnums 6, 7, 16), for the stop reply.
    expedite: Option<[u64; 3]>,
}

/// The registers a stop reply carries (gdbserver's choice for x86-64): the
/// frame and stack pointers and the pc, so that GDB stepping or stopping
/// at a breakpoint needs no `g` to find where it is.
pub(super) const EXPEDITED: [usize; 3] = [6, 7, 16];

fn expedite_of(r: &kvm_bindings::kvm_regs) -> [u64; 3] {
    [r.rbp, r.rsp, r.rip]
}

/// What this host's KVM delivers, as far as the GDB server's choices go:
/// how `Z0` is served and whether `Z2`–`Z4` are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDebug {
    /// `int3` with `USE_SW_BP` gives a `#BP` debug exit: `Z0` is an `int3`.
    /// If not (`kvm_pvm` ends the VM with an internal error), `Z0` takes a
    /// free hardware execute slot.
    pub int3_exits: bool,
    /// Write and read/write data breakpoints fire: `Z2`–`Z4` are served
    /// from the debug registers. If not, they get the empty "not
    /// supported" reply (GDB says it cannot insert them, rather than
    /// waiting for a stop that never comes; its software watchpoints work).
    pub data_watchpoints: bool,
    /// Where this came from, for `monitor served`.
    pub source: String,
}

impl HostDebug {
    /// A KVM that delivers everything (VMX, SVM): `int3` and watchpoints
    /// as GDB asks.
    pub fn full(source: impl Into<String>) -> HostDebug {
        HostDebug {
            int3_exits: true,
            data_watchpoints: true,
            source: source.into(),
        }
    }

    /// What `probe` found.
    pub fn from_probe(probe: &crate::probe::Probe) -> HostDebug {
        let data = probe.write_watch.supported && probe.rw_watch.supported;
        HostDebug {
            int3_exits: probe.sw_breakpoint.supported,
            data_watchpoints: data,
            source: format!(
                "kvm-glue's probe of this host's KVM (int3 exits: {}; write watchpoints: {}; read/write watchpoints: {})",
                probe.sw_breakpoint.detail, probe.write_watch.detail, probe.rw_watch.detail
            ),
        }
    }

    /// This host's, from kvm-glue's probe, run once per process (it boots
    /// a few one-vCPU guests, a few milliseconds) and kept. Where the probe
    /// cannot run, everything is assumed to work, and `source` says why.
    pub fn probed() -> HostDebug {
        static PROBED: OnceLock<HostDebug> = OnceLock::new();
        PROBED
            .get_or_init(|| match crate::probe::probe() {
                Ok(p) => HostDebug::from_probe(&p),
                Err(e) => HostDebug::full(format!("assumed: kvm-glue's probe could not run ({e})")),
            })
            .clone()
    }
}

/// The resume packet GDB sent last, as [`Watched`] saw it.
#[derive(Debug, Default)]
pub(super) struct ResumeLog {
    /// The last packet was a legacy `c`, `C`, `s` or `S`.
    legacy: AtomicBool,
    /// The last `Hc` named one thread (not `0` "any" or `-1` "all").
    hc_one_thread: AtomicBool,
}

impl ResumeLog {
    /// Whether the resume now asked for is a legacy one that resumes every
    /// vCPU.
    fn legacy_resumes_all(&self) -> bool {
        self.legacy.load(Ordering::Acquire) && !self.hc_one_thread.load(Ordering::Acquire)
    }

    /// Notes GDB's packet `body` (between `$` and `#`, at most its first
    /// [`Watched::KEEP`] bytes).
    fn saw(&self, body: &[u8]) {
        if let Some(rest) = body.strip_prefix(b"Hc") {
            // `Hc-1`, `Hc0`, `Hcp1.-1`, `Hcp1.0`: not one thread.
            let tid = rest.rsplit(|&b| b == b'.').next().unwrap_or(rest);
            let one = !(tid.is_empty() || tid == b"-1" || tid.iter().all(|&b| b == b'0'));
            self.hc_one_thread.store(one, Ordering::Release);
        }
        let legacy = matches!(body.first(), Some(b'c' | b'C' | b's' | b'S'));
        self.legacy.store(legacy, Ordering::Release);
    }
}

/// A connection that notes, as gdbstub reads them, which resume packets GDB
/// sends ([`ResumeLog`]): everything else passes through unchanged.
#[derive(Debug)]
pub struct Watched<C> {
    inner: C,
    log: Arc<ResumeLog>,
    /// The packet being read: `None` between packets.
    body: Option<Vec<u8>>,
}

impl<C> Watched<C> {
    /// Bytes of a packet kept to classify it.
    const KEEP: usize = 32;

    pub(super) fn new(inner: C, log: Arc<ResumeLog>) -> Watched<C> {
        Watched { inner, log, body: None }
    }

    fn see(&mut self, byte: u8) {
        match (&mut self.body, byte) {
            (_, b'$') => self.body = Some(Vec::with_capacity(Self::KEEP)),
            (Some(body), b'#') => {
                self.log.saw(body);
                self.body = None;
            }
            (Some(body), b) if body.len() < Self::KEEP => body.push(b),
            _ => {}
        }
    }
}

impl<C: Connection> Connection for Watched<C> {
    type Error = C::Error;

    fn write(&mut self, byte: u8) -> Result<(), C::Error> {
        self.inner.write(byte)
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), C::Error> {
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> Result<(), C::Error> {
        self.inner.flush()
    }

    fn on_session_start(&mut self) -> Result<(), C::Error> {
        self.inner.on_session_start()
    }
}

impl<C: std::os::fd::AsRawFd> std::os::fd::AsRawFd for Watched<C> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }
}

impl<C: ConnectionExt> ConnectionExt for Watched<C> {
    fn read(&mut self) -> Result<u8, C::Error> {
        let byte = self.inner.read()?;
        self.see(byte);
        Ok(byte)
    }

    fn peek(&mut self) -> Result<Option<u8>, C::Error> {
        self.inner.peek()
    }
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
    pub(super) fn new(
        dbg: VmDebug<M>,
        stop_timeout: Duration,
        end: Option<GuestEnd>,
        host: HostDebug,
        resume_log: Arc<ResumeLog>,
    ) -> Result<VmTarget<M>, Error> {
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
            busy_poll: Duration::ZERO,
            stepping: false,
            host,
            resume_log,
            running: false,
            seen_posts: None,
            stop_signalled: false,
            refused: None,
            bad_action: false,
            declared: wire::Shared::default(),
            seen: BTreeMap::new(),
        })
    }

    /// What was read of parked `id` if it is still current: read by this
    /// thread since it parked, or by the vCPU itself as it parked with its
    /// stop posted ([`VmDebug::take_at_stop`]).
    fn seen(&mut self, id: usize) -> Result<Option<&mut Seen>, TargetError<Error>> {
        let Some(epoch) = self.dbg.parked_epoch(id).map_err(TargetError::Fatal)? else {
            return Ok(None);
        };
        if self.seen.get(&id).is_none_or(|s| s.epoch != epoch) {
            match self.dbg.take_at_stop(id, self.busy_poll).map_err(TargetError::Fatal)? {
                Some(a) if a.epoch == epoch => {
                    self.seen.insert(
                        id,
                        Seen {
                            epoch,
                            paging: a.walks.then(|| Paging::of(&a.sregs)),
                            regs: None,
                            expedite: Some(expedite_of(&a.regs)),
                        },
                    );
                }
                _ => return Ok(None),
            }
        }
        Ok(self.seen.get_mut(&id))
    }

    /// The values of [`EXPEDITED`] for the stop reply of thread `tid`, if
    /// they are at hand without waking its vCPU (`None`: the reply carries
    /// none, and GDB asks).
    pub(super) fn expedited(&mut self, tid: Tid) -> Option<[u64; 3]> {
        let id = self.vcpu_of(tid).ok()?;
        self.seen(id).ok().flatten().and_then(|s| s.expedite)
    }

    /// Reads every register of `id`'s vCPU, as GDB sees them.
    /// Answered from [`Seen`] while it is current; else read on the vCPU's
    /// thread (its ioctls are the expensive part: each one loads the vCPU).
    fn read_all(&mut self, id: usize) -> Result<VmRegisters, TargetError<Error>> {
        if let Some(Seen { regs: Some(regs), .. }) = self.seen(id)? {
            return Ok(regs.clone());
        }
        let ((got, walks), epoch) = self
            .dbg
            .with_parked_vcpu_reading(id, |ops| (VcpuRegs::read(ops), ops.translates_by_page_walk()))
            .map_err(TargetError::Fatal)?;
        let raw = got.map_err(|_| TargetError::Errno(EIO))?;
        let regs = regs::to_gdb(&raw);
        self.seen.insert(
            id,
            Seen {
                epoch,
                paging: walks.then(|| Paging::of(&raw.sregs)),
                regs: Some(regs.clone()),
                expedite: Some(expedite_of(&raw.regs)),
            },
        );
        Ok(regs)
    }

    /// `len` bytes from `start` through the page walk `p` on this thread
    /// (a page it leaves to the vCPU, a 1 GiB one, by `KVM_TRANSLATE` on
    /// parked `id`'s thread).
    fn read_walked(&self, id: usize, p: Paging, start: u64, len: usize) -> Result<Vec<u8>, TargetError<Error>> {
        let dbg = &self.dbg;
        read_pages(dbg, start, len, |at| {
            match dbg.with_raw_memory(|mem| p.walk(mem, at))? {
                Walk::Gpa(gpa) => Ok(Some(gpa)),
                Walk::Unmapped => Ok(None),
                Walk::Ask => dbg
                    .with_parked_vcpu_reading(id, move |ops| memory::translate(ops, at).ok())
                    .map(|(g, _)| g),
            }
        })
        .map_err(TargetError::Fatal)
    }

    /// `len` bytes from `start`, each page translated on parked `id`'s
    /// thread (`KVM_TRANSLATE`).
    fn read_translated(&self, id: usize, start: u64, len: usize) -> Result<Vec<u8>, TargetError<Error>> {
        self.on_vcpu(id, move |dbg, ops| {
            read_pages(dbg, start, len, |at| Ok(memory::translate(ops, at).ok()))
        })?
        .map_err(TargetError::Fatal)
    }

    /// The paging registers of parked `id` (one `KVM_GET_SREGS` on its
    /// thread unless [`Seen`] has them); `None`: translate on its thread.
    fn paging(&mut self, id: usize) -> Result<Option<Paging>, TargetError<Error>> {
        if let Some(seen) = self.seen(id)? {
            return Ok(seen.paging);
        }
        let (paging, epoch) = self
            .dbg
            .with_parked_vcpu_reading(id, |ops| {
                if ops.translates_by_page_walk() {
                    ops.get_sregs().ok().map(|s| Paging::of(&s))
                } else {
                    None
                }
            })
            .map_err(TargetError::Fatal)?;
        self.seen.insert(
            id,
            Seen {
                epoch,
                paging,
                regs: None,
                expedite: None,
            },
        );
        Ok(paging)
    }

    /// Writes GDB's `new` values into `id`'s vCPU: read, check and write on
    /// the vCPU's thread, all or nothing. A refused value is EINVAL, a
    /// failed ioctl (KVM refusing a control-register value included) EIO, a
    /// value KVM takes but does not apply ENOTSUP, each with every register
    /// as it was.
    fn write_all(&mut self, id: usize, new: VmRegisters) -> TargetResult<(), Self> {
        // A job that writes: `with_parked_vcpu` moves the epoch, so what
        // `seen` holds of `id` is read again next time.
        self.seen.remove(&id);
        self.dbg
            .with_parked_vcpu(id, move |ops| {
                let now = VcpuRegs::read(ops).map_err(|_| TargetError::Errno(EIO))?;
                let set = regs::from_gdb(&new, &now).map_err(|_| TargetError::Errno(EINVAL))?;
                regs::apply(ops, &now, &set).map_err(|e| match e {
                    ApplyError::Failed { .. } => TargetError::Errno(EIO),
                    ApplyError::NotApplied { .. } => TargetError::Errno(ENOTSUP),
                    ApplyError::Restore { op, source } => TargetError::Fatal(Error::Vcpu { vcpu: id, op, source }),
                })
            })
            .map_err(TargetError::Fatal)?
    }

    /// An execute slot for GDB's breakpoint at `addr` (`Z1`, and `Z0`
    /// where `int3` exits do not work): `false` when none is free.
    fn insert_hw(&mut self, addr: u64) -> TargetResult<bool, Self> {
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

    fn remove_hw(&mut self, addr: u64) -> TargetResult<bool, Self> {
        if !canonical(addr) {
            return Err(TargetError::Errno(EFAULT));
        }
        self.dbg
            .remove(AddressSpace::Physical, BreakpointType::Hardware, addr, 1)
            .map(|_| true)
            .map_err(reply)
    }

    /// What `monitor served` prints: how each breakpoint kind is served here.
    fn served(&self) -> [String; 4] {
        let h = &self.host;
        [
            if h.int3_exits {
                "break (Z0): int3 in guest memory (hidden from reads)".to_string()
            } else {
                "break (Z0): a hardware execute slot (this KVM does not deliver int3 exits); E22 when none is free"
                    .to_string()
            },
            "hbreak (Z1): a hardware execute slot; E22 when none is free".to_string(),
            if h.data_watchpoints {
                "watch/rwatch/awatch (Z2-Z4): debug-register slots, through the planner".to_string()
            } else {
                "watch/rwatch/awatch (Z2-Z4): not supported (this KVM's data breakpoints do not fire): \
                 GDB cannot insert them; `set can-use-hw-watchpoints 0` watches in software"
                    .to_string()
            },
            format!("from: {}", h.source),
        ]
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

    /// Runs `f` on the parked vCPU `id`'s thread; `f` does not change the
    /// vCPU's registers (guest memory is not the vCPU: [`Seen`] stays).
    fn on_vcpu<R: Send + 'static>(
        &self,
        id: usize,
        f: impl FnOnce(&VmDebug<M>, &dyn crate::VcpuOps) -> R + Send + 'static,
    ) -> Result<R, TargetError<Error>> {
        let dbg = self.dbg.clone();
        self.dbg
            .with_parked_vcpu_reading(id, move |ops| f(&dbg, ops))
            .map(|(r, _)| r)
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

/// Reads `len` bytes from canonical `start` (`len` at most
/// [`room`]`(start)`) page by page, each page by the guest-physical address
/// `translate` gives: the bytes up to the first page that does not
/// translate (`Ok(None)`) or cannot be read (`int3`s hidden, as every read).
///
/// # Errors
/// What `translate` failed with; [`Error::Poisoned`]. A page that cannot be
/// read ends the read.
fn read_pages<M: GuestMemory>(
    dbg: &VmDebug<M>,
    start: u64,
    len: usize,
    mut translate: impl FnMut(u64) -> Result<Option<u64>, Error>,
) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        // No overflow: done < len <= room(start).
        let at = start + done as u64;
        let in_page = (PAGE - at % PAGE) as usize;
        let n = in_page.min(len - done);
        let Some(gpa) = translate(at)? else { break };
        match dbg.read_memory(AddressSpace::Physical, gpa, &mut buf[done..done + n]) {
            Ok(()) => done += n,
            Err(Error::Poisoned) => return Err(Error::Poisoned),
            Err(_) => break,
        }
    }
    buf.truncate(done);
    Ok(buf)
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
    type Arch = X86_64Vm;
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

    fn support_target_description_xml_override(&mut self) -> Option<TargetDescriptionXmlOverrideOps<'_, Self>> {
        Some(self)
    }

    fn support_extended_mode(&mut self) -> Option<ExtendedModeOps<'_, Self>> {
        Some(self)
    }
}

impl<M: GuestMemory + Send + Sync + 'static> TargetDescriptionXmlOverride for VmTarget<M> {
    fn target_description_xml(
        &self,
        annex: &[u8],
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        if annex != b"target.xml" {
            return Err(TargetError::Errno(EINVAL));
        }
        let xml = regs::target_xml().as_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(xml.len());
        let n = length.min(buf.len()).min(xml.len() - start);
        buf[..n].copy_from_slice(&xml[start..start + n]);
        Ok(n)
    }
}

/// Extended mode only for its answer to a kill: gdbstub answers `vKill`
/// and `k` with `OK` (and flushes it) only here. Without the answer GDB
/// waits for one: on a connection whose close it does not see at once (a
/// VMM behind QEMU's serial socket) it waits 6 s and prints "Ignoring
/// packet error". There is no program to run or process to attach to.
impl<M: GuestMemory + Send + Sync + 'static> ExtendedMode for VmTarget<M> {
    fn run(&mut self, _filename: Option<&[u8]>, _args: Args<'_, '_>) -> TargetResult<Pid, Self> {
        Err(TargetError::Errno(EINVAL))
    }

    fn attach(&mut self, _pid: Pid) -> TargetResult<(), Self> {
        Err(TargetError::Errno(EINVAL))
    }

    fn query_if_attached(&mut self, _pid: Pid) -> TargetResult<AttachKind, Self> {
        // GDB's `quit` then detaches rather than kills.
        Ok(AttachKind::Attach)
    }

    fn kill(&mut self, _pid: Option<Pid>) -> TargetResult<ShouldTerminate, Self> {
        Ok(ShouldTerminate::Yes)
    }

    fn restart(&mut self) -> Result<(), Self::Error> {
        // `R` (extended-remote `run` again): nothing to restart; the VM is
        // the VMM's.
        Ok(())
    }
}

impl<M: GuestMemory + Send + Sync + 'static> MultiThreadBase for VmTarget<M> {
    fn read_registers(&mut self, out: &mut VmRegisters, tid: Tid) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        *out = self.read_all(id)?;
        Ok(())
    }

    fn write_registers(&mut self, new: &VmRegisters, tid: Tid) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        self.write_all(id, new.clone())
    }

    fn support_single_register_access(&mut self) -> Option<SingleRegisterAccessOps<'_, Tid, Self>> {
        Some(self)
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
        // address, so a page ending at 2^64 reads like any other. The walk
        // is done on this thread from the paging registers of the stop
        // where it can be (`paging`), else on the vCPU's (`KVM_TRANSLATE`).
        let read = match self.paging(id)? {
            Some(p) if p.walkable() => self.read_walked(id, p, start, len)?,
            _ => self.read_translated(id, start, len)?,
        };
        if read.is_empty() && len > 0 {
            return Err(TargetError::Errno(EFAULT));
        }
        data[..read.len()].copy_from_slice(&read);
        Ok(read.len())
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner()).write_len.take();
        if declared != Some(data.len()) {
            // gdbstub writes what the data holds, whatever the length said;
            // and a packet without a length in the protocol's form never
            // gets here (the wire answers it), so none declared is refused.
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

/// `p`/`P`: one register, by regnum, as a slice of the `g` packet (a `P` is
/// a `G` with that register changed: the same checks and all-or-nothing
/// write).
impl<M: GuestMemory + Send + Sync + 'static> SingleRegisterAccess<Tid> for VmTarget<M> {
    fn read_register(&mut self, tid: Tid, reg: VmRegId, buf: &mut [u8]) -> TargetResult<usize, Self> {
        let id = self.vcpu_of(tid)?;
        let (at, len) = reg_span(reg)?;
        let mut bytes = Vec::with_capacity(regs::g_bytes());
        self.read_all(id)?.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        let src = bytes.get(at..at + len).ok_or(TargetError::Errno(EINVAL))?;
        let dst = buf.get_mut(..len).ok_or(TargetError::Errno(EINVAL))?;
        dst.copy_from_slice(src);
        Ok(len)
    }

    fn write_register(&mut self, tid: Tid, reg: VmRegId, val: &[u8]) -> TargetResult<(), Self> {
        let id = self.vcpu_of(tid)?;
        let (at, len) = reg_span(reg)?;
        if val.len() != len {
            return Err(TargetError::Errno(EINVAL));
        }
        let mut bytes = Vec::with_capacity(regs::g_bytes());
        let mut new = self.read_all(id)?;
        new.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        bytes
            .get_mut(at..at + len)
            .ok_or(TargetError::Errno(EINVAL))?
            .copy_from_slice(val);
        new.gdb_deserialize(&bytes).map_err(|()| TargetError::Errno(EINVAL))?;
        self.write_all(id, new)
    }
}

/// Where register `reg` is in the `g` packet: byte offset and length.
fn reg_span<E>(reg: VmRegId) -> Result<(usize, usize), TargetError<E>> {
    let info = regs::REGS.get(reg.0).ok_or(TargetError::Errno(EINVAL))?;
    Ok((regs::offset(reg.0), info.bits / 8))
}

impl<M: GuestMemory + Send + Sync + 'static> MultiThreadResume for VmTarget<M> {
    fn resume(&mut self) -> Result<(), Self::Error> {
        // vCont without a default action (scheduler locking): only the
        // threads named run. With one, or for a legacy c/s without an Hc
        // naming one thread (see the module docs), every other thread
        // continues.
        let locked = self.scheduler_locked && !self.resume_log.legacy_resumes_all();
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
                None if locked => None,
                None => Some((*id, Action::Continue)),
            })
            .collect();
        match self.dbg.resume(&plan) {
            // A vCPU that reported a fault cannot run on: nothing resumed,
            // and GDB hears EPERM; the VMM decides what comes next.
            Err(Error::Run(RunError::Faulted { .. })) => {
                self.refused = Some(EPERM);
                return Ok(());
            }
            other => other?,
        }
        self.running = true;
        self.stepping = plan.iter().all(|&(_, action)| action == Action::Step);
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
        // Where data breakpoints do not fire, "not supported": GDB watches
        // in software instead of waiting for a stop that never comes.
        if self.host.data_watchpoints {
            Some(self)
        } else {
            None
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> SwBreakpoint for VmTarget<M> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.host.int3_exits {
            self.insert_sw(addr, true)
        } else {
            // An int3 would end the VM here: an execute slot instead.
            self.insert_hw(addr)
        }
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.host.int3_exits {
            self.insert_sw(addr, false)
        } else {
            self.remove_hw(addr)
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> HwBreakpoint for VmTarget<M> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.insert_hw(addr)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.remove_hw(addr)
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
            b"served" => {
                for line in self.served() {
                    outputln!(out, "{line}");
                }
            }
            _ => {
                outputln!(out, "kvm-glue monitor commands:");
                outputln!(
                    out,
                    "  breakpoints   every debug-register slot and int3 (by guest-physical address) kvm-glue holds"
                );
                outputln!(
                    out,
                    "  served        how break, hbreak and watchpoints are served on this host:"
                );
                for line in self.served() {
                    outputln!(out, "    {line}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log after GDB sent `packets` (bodies), each framed as on the wire.
    fn after(packets: &[&str]) -> Arc<ResumeLog> {
        let log = Arc::new(ResumeLog::default());
        let mut w = Watched::new((), Arc::clone(&log));
        for p in packets {
            for b in format!("${p}#00").bytes() {
                w.see(b);
            }
        }
        log
    }

    #[test]
    fn a_plain_c_or_s_resumes_every_vcpu() {
        for p in ["c", "s", "C05", "S05", "c10006"] {
            assert!(after(&["?", p]).legacy_resumes_all(), "{p}");
        }
        // Hc naming "all" or "any" changes nothing.
        for hc in ["Hc-1", "Hc0", "Hcp1.-1", "Hcp1.0"] {
            assert!(after(&[hc, "c"]).legacy_resumes_all(), "{hc}");
        }
    }

    #[test]
    fn an_hc_naming_one_thread_or_a_vcont_keeps_scheduler_locking() {
        assert!(!after(&["Hc2", "c"]).legacy_resumes_all());
        assert!(!after(&["Hcp1.2", "s"]).legacy_resumes_all());
        assert!(!after(&["vCont;c:1"]).legacy_resumes_all());
        assert!(!after(&["c", "vCont;s:2"]).legacy_resumes_all());
        // A later Hc-1 lifts the one-thread choice.
        assert!(after(&["Hc2", "Hc-1", "c"]).legacy_resumes_all());
    }

    #[test]
    fn bytes_outside_packets_and_long_packets_are_harmless() {
        // Ctrl-C and acks between packets, then a plain c.
        let log = Arc::new(ResumeLog::default());
        let mut w = Watched::new((), Arc::clone(&log));
        for b in b"+\x03+$c#63+" {
            w.see(*b);
        }
        assert!(log.legacy_resumes_all());
        // A write packet longer than what is kept is classified by its start.
        let long = format!("X10000,40:{}", "c".repeat(100));
        assert!(!after(&["c", &long]).legacy_resumes_all());
    }
}
