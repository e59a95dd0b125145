//! [`VcpuDebug`]: the per-vCPU debug handle, used by that vCPU's thread.
//!
//! * [`before_run`](VcpuDebug::before_run), before each `KVM_RUN`: parks
//!   while the debugger holds the vCPU (running its jobs), arms a step over
//!   the breakpoint this vCPU last stopped at, then `sync`s.
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
//! let mut vcpu_dbg = dbg.vcpu(0);
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

use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug, kvm_guest_debug_arch};
use vm_memory::GuestMemory;
use x86_debugreg::exit::Exception;
use x86_debugreg::predict::SlotMask;
use x86_debugreg::sw::{ByteMemory, INT3};
use x86_debugreg::watch::{Watch, WatchHit};
use x86_debugreg::{Applied, ControlFlags, DebugExit, Decision, Dr6, GuestDebug, Hits, HwKind, Slot, Stop};

use crate::control::Pending;
use crate::debugger::{read_linear, Inner, Shared, VmDebug};
use crate::error::{Error, Result};
use crate::memory::{translate, AddressSpace, PhysicalMemory};
use crate::probe::Int1Pc;
use crate::sync::{Arc, Ordering};
use crate::vcpu::VcpuOps;

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
    /// Why, decoded from the configuration this vCPU applied.
    pub stop: Stop,
}

impl fmt::Display for StopEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
    /// The intent generation it reflects (`None`: not the intent, e.g. a step-over's).
    generation: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    /// Asked for; applied by the next sync.
    Requested {
        pc: u64,
    },
    /// Applied: the vCPU single-steps with the breakpoint at `pc` disarmed.
    InFlight {
        sw_gpa: Option<u64>,
    },
}

/// The per-vCPU debug handle. Create it with
/// [`VmDebug::vcpu`](crate::VmDebug::vcpu); dropping it tells the all-stop
/// control that this vCPU is gone.
pub struct VcpuDebug<M> {
    id: usize,
    shared: Arc<Shared<M>>,
    /// `None` until the first successful sync: unknown, never assumed off.
    applied: Option<Record>,
    step: Step,
    /// The pc of the last stop caused by a breakpoint at that pc.
    at_breakpoint: Option<u64>,
    /// The guest's own single-step `#DB` arrived together with a debugger
    /// stop: re-inject it at the next sync.
    reinject_db: bool,
    last_gpa: Option<u64>,
    set_calls: u64,
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
        if let Ok(mut ctl) = self.shared.ctl() {
            let v = ctl.vcpu_mut(self.id);
            v.handles = v.handles.saturating_sub(1);
            if v.handles == 0 {
                v.jobs.clear();
                v.pending = None;
                v.parked = false;
                v.applied_generation = None;
            }
        }
        self.shared.cond.notify_all();
    }
}

impl<M: GuestMemory> VcpuDebug<M> {
    pub(crate) fn new(id: usize, shared: Arc<Shared<M>>) -> VcpuDebug<M> {
        if let Ok(mut ctl) = shared.ctl() {
            let stopping = ctl.ids().any(|i| ctl.vcpus[i].hold);
            let v = ctl.vcpu_mut(id);
            v.handles += 1;
            v.hold |= stopping;
            v.applied_generation = None;
        }
        VcpuDebug {
            id,
            shared,
            applied: None,
            step: Step::Idle,
            at_breakpoint: None,
            reinject_db: false,
            last_gpa: None,
            set_calls: 0,
        }
    }

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
        self.step != Step::Idle
    }

    pub(crate) fn record(&self) -> Option<Record> {
        self.applied
    }

    fn set<V: VcpuOps + ?Sized>(&mut self, vcpu: &V, dbg: &kvm_guest_debug) -> Result<()> {
        self.set_calls += 1;
        vcpu.set_guest_debug(dbg).map_err(|source| Error::Vcpu {
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
        if let Ok(mut ctl) = self.shared.ctl() {
            ctl.vcpu_mut(self.id).applied_generation = generation;
        }
    }

    /// Call before each `KVM_RUN` (the lifecycle entry point):
    ///
    /// 1. while the debugger holds this vCPU (a stop was asked for or posted),
    ///    parks here — outside `KVM_RUN`, guest frozen — running the jobs
    ///    [`VmDebug::with_parked_vcpu`] sends, until released;
    /// 2. if the last exit was a stop at one of the debugger's breakpoints,
    ///    asks for a [`step_over`](Self::step_over) (a no-op if the debugger
    ///    removed the breakpoint meanwhile);
    /// 3. [`sync`](Self::sync)s.
    ///
    /// If the last exit was a port or MMIO access, complete it first (run once
    /// with `immediate_exit` set) so a parked vCPU holds no half-done access.
    ///
    /// # Errors
    /// As [`sync`](Self::sync); [`Error::Poisoned`].
    pub fn before_run<V: VcpuOps>(&mut self, vcpu: &V) -> Result<bool> {
        self.park(vcpu)?;
        if self.at_breakpoint.is_some() && self.step == Step::Idle {
            self.step_over();
        }
        self.sync(vcpu)
    }

    fn park<V: VcpuOps>(&mut self, vcpu: &V) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let mut ctl = shared.ctl()?;
        if !ctl.vcpu_mut(self.id).hold {
            return Ok(());
        }
        ctl.vcpu_mut(self.id).parked = true;
        shared.cond.notify_all();
        loop {
            if let Some(job) = ctl.vcpu_mut(self.id).jobs.pop_front() {
                drop(ctl);
                job(vcpu);
                ctl = shared.ctl()?;
                continue;
            }
            if !ctl.vcpu_mut(self.id).hold {
                break;
            }
            ctl = shared.cond.wait(ctl).map_err(|_| Error::Poisoned)?;
        }
        ctl.vcpu_mut(self.id).parked = false;
        drop(ctl);
        shared.cond.notify_all();
        Ok(())
    }

    /// Applies the VM-wide configuration if it changed since this vCPU last
    /// applied it (always on the first call). Returns whether an ioctl was
    /// issued. Applies a requested step-over; while one is in flight, the
    /// step's configuration stays.
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
            Step::InFlight { .. } => return Ok(false),
            Step::Requested { pc } => {
                if self.arm_step(vcpu, pc)? {
                    return Ok(true);
                }
            }
            Step::Idle => {}
        }
        let current = self.shared.generation.load(Ordering::Acquire);
        if !self.reinject_db && self.applied.is_some_and(|r| r.generation == Some(current)) {
            return Ok(false);
        }
        let (want, generation) = {
            let inner = self.shared.lock()?;
            // Read under the lock: the generation and the state agree.
            (
                effective(inner.config_for(self.id)),
                self.shared.generation.load(Ordering::Acquire),
            )
        };
        if self.reinject_db {
            // The guest's own single-step #DB that came with a debugger stop.
            let mut dbg = to_kvm(&want);
            dbg.control |= (ControlFlags::ENABLE | ControlFlags::INJECT_DB).bits();
            self.set(vcpu, &dbg)?;
            self.reinject_db = false;
        } else if self.applied.is_some_and(|r| *r.config.config() == want) {
            self.applied = Some(Record {
                config: Applied::was_set(want),
                generation: Some(generation),
            });
            self.note_generation(Some(generation));
            return Ok(false);
        } else {
            self.set(vcpu, &to_kvm(&want))?;
        }
        self.applied = Some(Record {
            config: Applied::was_set(want),
            generation: Some(generation),
        });
        self.note_generation(Some(generation));
        Ok(true)
    }

    /// Applies a requested step over the breakpoint at `pc`; `false` if the
    /// debugger has nothing at `pc` any more (then nothing is done).
    fn arm_step<V: VcpuOps>(&mut self, vcpu: &V, pc: u64) -> Result<bool> {
        let shared = Arc::clone(&self.shared);
        let inner = shared.lock()?;
        let mut config = effective(inner.config_for(self.id));
        let mut dr7 = config.dr7();
        let mut slots = 0u8;
        for slot in Slot::ALL {
            if let Some(bp) = config.armed(slot) {
                if bp.kind() == HwKind::Execute && bp.addr() == pc {
                    dr7 = dr7.with_global(slot, false).with_local(slot, false);
                    slots |= 1 << slot.get();
                }
            }
        }
        let sw_gpa = if inner.state.sw().is_empty() {
            None
        } else {
            // The address recorded at the stop being stepped over, if it was
            // an int3; else (an execute breakpoint on an int3) translate.
            let ours = |gpa: &u64| inner.state.sw().contains(*gpa);
            self.last_gpa
                .filter(ours)
                .or_else(|| translate(vcpu, pc).ok().filter(ours))
        };
        if slots == 0 && sw_gpa.is_none() {
            self.step = Step::Idle;
            return Ok(false);
        }
        config.debugreg[7] = dr7.into_bits();
        config.control |= ControlFlags::ENABLE | ControlFlags::SINGLESTEP;
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
            generation: None,
        });
        drop(inner);
        self.note_generation(None);
        self.step = Step::InFlight { sw_gpa };
        Ok(true)
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
        self.at_breakpoint = None;
        self.last_gpa = None;
        if let Step::InFlight { sw_gpa } = stepped {
            if let Some(gpa) = sw_gpa {
                if inner.state.sw().contains(gpa) {
                    PhysicalMemory(&inner.mem).write_byte(gpa, INT3)?;
                }
            }
            self.step = Step::Idle;
            // The vCPU holds the step's configuration: the next sync must
            // apply the intent again (its generation is None).
        }
        let applied = self.applied.map_or(Applied::DISABLED, |r| r.config);
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
                if matches!(stepped, Step::InFlight { .. }) {
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
                let pc = exit.pc;
                if hits
                    .iter()
                    .any(|h| h.breakpoint.kind() == HwKind::Execute && h.breakpoint.addr() == pc)
                {
                    self.at_breakpoint = Some(pc);
                }
                refresh_reads(&mut inner, vcpu);
                drop(inner);
                Ok(self.stop(exit, Stop::Debug { single_step, hits }))
            }
            Decision::Stop(stop) => {
                self.at_breakpoint = Some(exit.pc);
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

    /// Posts `event` for the debugger ([`VmDebug::wait_stop`]) and asks every
    /// vCPU to stop (all-stop); this vCPU parks at its next
    /// [`before_run`](Self::before_run). Other vCPUs are kicked.
    ///
    /// # Errors
    /// [`Error::Poisoned`]; [`Error::Kick`] if a kick failed (the stop is
    /// posted regardless).
    pub fn report_stop(&mut self, event: StopEvent) -> Result<()> {
        let gpa = match event.stop {
            Stop::Software { .. } => self.last_gpa,
            Stop::Debug { .. } => None,
        };
        let others: Vec<usize> = {
            let mut ctl = self.shared.ctl()?;
            ctl.hold_all();
            ctl.vcpu_mut(self.id).pending = Some(Pending { event, gpa });
            ctl.order.push_back(self.id);
            let id = self.id;
            ctl.ids().filter(|&i| i != id && !ctl.vcpus[i].parked).collect()
        };
        self.shared.signal_stop();
        self.shared.cond.notify_all();
        self.shared.kick(&others)
    }

    /// Asks the next run to go past the debugger's breakpoint at the pc of
    /// the last stop this handle reported (see the [module docs](self)). What
    /// is disabled for the step is decided by the next [`sync`](Self::sync),
    /// from the intent then: a single-step the debugger asks for meanwhile
    /// composes with it (one stop, at the next instruction), and a breakpoint
    /// removed meanwhile needs no step. [`before_run`](Self::before_run) calls
    /// this by itself.
    pub fn step_over(&mut self) -> StepOver {
        match (self.at_breakpoint.take(), self.step) {
            (Some(pc), Step::Idle) => {
                self.step = Step::Requested { pc };
                StepOver::Requested { pc }
            }
            _ => StepOver::NotNeeded,
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
    /// let mut handles = [dbg.vcpu(0), dbg.vcpu(1)];
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
