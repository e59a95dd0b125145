//! [`VcpuDebug`]: the per-vCPU debug handle, used by that vCPU's thread.
//!
//! * [`sync`](VcpuDebug::sync) before each `KVM_RUN` issues
//!   `KVM_SET_GUEST_DEBUG` only when the VM-wide configuration changed since
//!   this vCPU last applied it, and records what it applied.
//! * [`handle_exit`](VcpuDebug::handle_exit) decodes a `KVM_EXIT_DEBUG` against
//!   the configuration **this vCPU applied** — not the newest intent (another
//!   thread may have changed it since this vCPU entered the guest) and not the
//!   exit's `dr7` (some hosts report 0 there) — or re-injects the guest's own
//!   `#DB`/`#BP` and says "run again".
//! * [`step_over`](VcpuDebug::step_over) resumes past an execute breakpoint
//!   or software breakpoint at the pc: disable that slot / put the original
//!   byte back, single-step once, re-arm. RFLAGS.RF is not used: some hosts'
//!   KVM ignores it (see the probe).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug, kvm_guest_debug_arch};
use vm_memory::GuestMemory;
use x86_debugreg::exit::Exception;
use x86_debugreg::sw::{ByteMemory, INT3};
use x86_debugreg::{ControlFlags, DebugExit, Decision, Dr6, GuestDebug, HwKind, Slot, Stop};

use crate::debugger::Shared;
use crate::error::{Error, Result};
use crate::memory::VirtualMemory;
use crate::probe::Int1Pc;
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
    /// DR6 as KVM reported it.
    pub dr6: u64,
    /// Why, decoded from the configuration this vCPU applied.
    pub stop: Stop,
}

impl fmt::Display for StopEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {} stopped at {:#x}: ", self.vcpu, self.pc)?;
        match self.stop {
            Stop::Software { addr } => write!(f, "software breakpoint at {addr:#x}")?,
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
    /// Report to the debugger.
    Stop(StopEvent),
    /// Nothing for the debugger: `sync` and run again.
    Resume(Resume),
}

/// What [`VcpuDebug::step_over`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOver {
    /// Nothing of the debugger's at the last stop's pc: just run.
    NotNeeded,
    /// Armed: the next run single-steps one instruction with these execute
    /// slots disabled (bit n = DRn) and/or the software breakpoint's original
    /// byte back; the following debug exit re-arms them.
    Armed {
        /// Execute slots disabled for the step.
        slots: u8,
        /// Whether a software breakpoint's byte was restored for the step.
        software: bool,
    },
}

/// What a vCPU handle believes its vCPU holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Applied {
    config: GuestDebug,
    generation: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct PendingStep {
    sw_addr: Option<u64>,
    user_single_step: bool,
}

/// The per-vCPU debug handle. Create it with
/// [`VmDebug::vcpu`](crate::VmDebug::vcpu).
pub struct VcpuDebug<M> {
    id: usize,
    shared: Arc<Shared<M>>,
    applied: Applied,
    step: Option<PendingStep>,
    last_pc: Option<u64>,
    set_calls: u64,
}

impl<M> fmt::Debug for VcpuDebug<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuDebug")
            .field("id", &self.id)
            .field("applied", &self.applied)
            .field("stepping_over", &self.step.is_some())
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory> VcpuDebug<M> {
    pub(crate) fn new(id: usize, shared: Arc<Shared<M>>) -> VcpuDebug<M> {
        VcpuDebug {
            id,
            shared,
            applied: Applied {
                config: GuestDebug::DISABLED,
                generation: None,
            },
            step: None,
            last_pc: None,
            set_calls: 0,
        }
    }

    /// The vCPU id.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The configuration this handle last applied successfully (what the vCPU
    /// runs with).
    pub fn applied(&self) -> GuestDebug {
        self.applied.config
    }

    /// How many `KVM_SET_GUEST_DEBUG` calls this handle has issued (failed
    /// ones included).
    pub fn set_guest_debug_calls(&self) -> u64 {
        self.set_calls
    }

    /// Whether a [`step_over`](Self::step_over) is waiting for its debug exit.
    pub fn stepping_over(&self) -> bool {
        self.step.is_some()
    }

    pub(crate) fn applied_record(&self) -> Applied {
        self.applied
    }

    fn set<V: VcpuOps>(&mut self, vcpu: &V, dbg: &kvm_guest_debug) -> Result<()> {
        self.set_calls += 1;
        vcpu.set_guest_debug(dbg).map_err(|source| Error::Vcpu {
            vcpu: self.id,
            op: "KVM_SET_GUEST_DEBUG",
            source,
        })
    }

    /// Puts the vCPU back to `before` (a rollback of [`VmDebug::sync_all`]).
    pub(crate) fn restore<V: VcpuOps>(&mut self, vcpu: &V, before: Applied) -> Result<()> {
        self.set(vcpu, &to_kvm(&before.config))?;
        self.applied = before;
        Ok(())
    }

    /// Call before each `KVM_RUN`: applies the VM-wide configuration if it
    /// changed since this vCPU last applied it. Returns whether an ioctl was
    /// issued. While a [`step_over`](Self::step_over) is pending, the step's
    /// configuration stays.
    ///
    /// The common case (nothing changed) is one atomic load, no lock.
    ///
    /// # Errors
    /// [`Error::Vcpu`] if `KVM_SET_GUEST_DEBUG` fails: the handle then still
    /// records the old configuration (which the vCPU still has) and the next
    /// `sync` tries again.
    pub fn sync<V: VcpuOps>(&mut self, vcpu: &V) -> Result<bool> {
        if self.step.is_some() {
            return Ok(false);
        }
        if self.applied.generation == Some(self.shared.generation.load(Ordering::Acquire)) {
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
        if want == self.applied.config {
            self.applied.generation = Some(generation);
            return Ok(false);
        }
        self.set(vcpu, &to_kvm(&want))?;
        self.applied = Applied {
            config: want,
            generation: Some(generation),
        };
        Ok(true)
    }

    /// Handles the data of a `KVM_EXIT_DEBUG` (`VcpuExit::Debug`).
    ///
    /// # Errors
    /// [`Error::Decode`] for a vector other than 1 or 3; [`Error::Vcpu`] if
    /// re-injecting fails (nothing is then queued, and the handle's record is
    /// unchanged); [`Error::Memory`] if guest memory at the pc cannot be read
    /// or re-armed.
    pub fn handle_exit<V: VcpuOps>(&mut self, vcpu: &V, exit: &kvm_debug_exit_arch) -> Result<Handled> {
        let dexit = DebugExit {
            exception: exit.exception,
            pc: exit.pc,
            dr6: exit.dr6,
            dr7: exit.dr7,
        };
        let shared = Arc::clone(&self.shared);
        let inner = shared.lock()?;
        let stepped = self.step;
        if let Some(step) = stepped {
            if let Some(addr) = step.sw_addr {
                if inner.state.sw().contains(addr) {
                    let mut mem = VirtualMemory { mem: &inner.mem, vcpu };
                    mem.write_byte(addr, INT3)?;
                }
            }
            self.step = None;
            // The vCPU holds the step's configuration: the next sync must
            // apply the intent again.
            self.applied.generation = None;
        }
        let decision = inner
            .state
            .decode(&dexit, &x86_debugreg::Applied::was_set(self.applied.config))?;
        match decision {
            Decision::Stop(Stop::Debug { single_step, hits }) => {
                if let Some(step) = stepped {
                    let single_step = single_step && step.user_single_step;
                    if !single_step && hits.is_empty() {
                        return Ok(Handled::Resume(Resume::SteppedOver));
                    }
                    return Ok(self.stop(exit, Stop::Debug { single_step, hits }));
                }
                Ok(self.stop(exit, Stop::Debug { single_step, hits }))
            }
            Decision::Stop(stop) => Ok(self.stop(exit, stop)),
            Decision::Reinject(Exception::Breakpoint) => {
                // A #BP exit leaves RIP at the int3. If the byte is no longer
                // 0xCC, this was a breakpoint of ours removed meanwhile: the
                // guest must not see it.
                let mut mem = VirtualMemory { mem: &inner.mem, vcpu };
                if mem.read_byte(exit.pc)? != INT3 {
                    return Ok(Handled::Resume(Resume::StaleSoftwareBreakpoint { addr: exit.pc }));
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
                            let mut mem = VirtualMemory { mem: &inner.mem, vcpu };
                            mem.read_byte(exit.pc)? == ICEBP
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
        self.last_pc = Some(exit.pc);
        Handled::Stop(StopEvent {
            vcpu: self.id,
            pc: exit.pc,
            dr6: exit.dr6,
            stop,
        })
    }

    fn inject<V: VcpuOps>(&mut self, vcpu: &V, e: Exception) -> Result<Handled> {
        // The inject flags are one-shot (KVM queues the exception when the
        // ioctl is made), so the record of what is applied does not change.
        let mut dbg = to_kvm(&self.applied.config);
        dbg.control |= (ControlFlags::ENABLE | e.inject_flag()).bits();
        self.set(vcpu, &dbg)?;
        Ok(Handled::Resume(Resume::Reinjected(e)))
    }

    /// Prepares the next run to go past the debugger's breakpoint at the pc of
    /// the last stop this handle reported: execute slots at that address are
    /// disabled and a software breakpoint's original byte put back for one
    /// single step (issued now, one `KVM_SET_GUEST_DEBUG`); the debug exit
    /// that ends the step re-arms them (and [`handle_exit`](Self::handle_exit)
    /// answers [`Resume::SteppedOver`] unless this vCPU single-steps or the
    /// step hit a watchpoint). The following `sync` restores the full
    /// configuration.
    ///
    /// While the step is pending, other vCPUs could run past a software
    /// breakpoint whose byte is restored; stop them first if that matters.
    ///
    /// # Errors
    /// [`Error::Vcpu`] or [`Error::Memory`]; nothing is changed then (the
    /// restored byte is patched back).
    pub fn step_over<V: VcpuOps>(&mut self, vcpu: &V) -> Result<StepOver> {
        let Some(pc) = self.last_pc else {
            return Ok(StepOver::NotNeeded);
        };
        if self.step.is_some() {
            return Ok(StepOver::NotNeeded);
        }
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
        let sw = inner.state.sw().get(pc);
        if slots == 0 && sw.is_none() {
            return Ok(StepOver::NotNeeded);
        }
        config.debugreg[7] = dr7.into_bits();
        config.control |= ControlFlags::ENABLE | ControlFlags::SINGLESTEP;
        let mut mem = VirtualMemory { mem: &inner.mem, vcpu };
        if let Some(entry) = sw {
            mem.write_byte(pc, entry.saved)?;
        }
        if let Err(e) = self.set(vcpu, &to_kvm(&config)) {
            if sw.is_some() {
                // Best effort: the same address was written a moment ago.
                let _ = mem.write_byte(pc, INT3);
            }
            return Err(e);
        }
        self.applied = Applied {
            config,
            generation: None,
        };
        self.step = Some(PendingStep {
            sw_addr: sw.map(|_| pc),
            user_single_step: inner.single_step(self.id),
        });
        self.last_pc = None;
        Ok(StepOver::Armed {
            slots,
            software: sw.is_some(),
        })
    }
}
