//! What this host's KVM really does with guest debugging, found by running the
//! tiny guest ([`crate::guest`]) rather than assumed.
//!
//! On a plain VMX or SVM host the breakpoint, watchpoint and single-step
//! features are expected to work; on a host whose KVM emulates guest code
//! (such as `kvm_pvm`), data watchpoints, `#BP` exits and RFLAGS.RF may not.
//! VMMs print [`Probe`] (one line per feature); tests read its fields to
//! decide what they can check.
//!
//! Two things differ by CPU vendor ([`Vendor`], from CPUID), not by host:
//!
//! * **`int1` (ICEBP).** On Intel (VMX) the `#DB` an `int1` raises is
//!   intercepted like an instruction: the debug exit's pc is the `int1`
//!   ([`Int1Pc::AtInstruction`]). On AMD (SVM) that `#DB` is not subject to
//!   the `#DB` exception intercept (AMD APM vol. 2, "Exception Intercepts":
//!   ICEBP has an intercept of its own, which KVM does not set), so there is
//!   no exit at all: the guest's own `#DB` handler runs
//!   ([`Probe::guest_int1`] is "no", [`Int1Pc::Unknown`]).
//! * **`INJECT_BP`.** KVM injects `#BP` as a software exception. On AMD it
//!   first moves RIP past the instruction at RIP (the `#BP` returns after
//!   it, as an `int3`'s does) and, in current kernels, drops the injection
//!   unless that instruction is an `int3`. So on AMD `#BP` can be injected
//!   only with RIP at an `int3` — the case a debugger has when it gives the
//!   guest back a `#BP` its own `int3` raised — and the probe checks that
//!   case there; on Intel it checks injection at a `nop`.
//!
//! And one by Intel CPU generation:
//!
//! * **`INJECT_BP` before Skylake.** On VMX, KVM gives the injected `#BP`
//!   (a software exception) the VM-entry instruction length of the vCPU's
//!   last `#DB`/`#BP` exit (`event_exit_inst_len`): 1 after the exit of the
//!   guest's own `int3`, but 0 on a vCPU that never had one. A length of 0
//!   is allowed only where `IA32_VMX_MISC` bit 30 is set (SDM Vol. 3C,
//!   "Checks on VMX Controls", VM-entry control fields). The real parts'
//!   MSR dumps in Bochs's CPU database have it on Skylake-X and Cannon Lake
//!   (`0x7004C1E7`) and not on Penryn, Arrandale, Sandy Bridge, Ivy Bridge
//!   or Broadwell (`0x300481E5`); Bochs's Haswell model lacks it too. There,
//!   `INJECT_BP` on a fresh vCPU fails VM entry: `KVM_EXIT_FAIL_ENTRY` with
//!   VM-instruction error 7 (invalid control field). What kvm-glue does —
//!   re-inject the guest's own `#BP` right after its `#BP` exit, in the same
//!   [`VcpuDebug::handle_exit`](crate::VcpuDebug::handle_exit) — has length
//!   1, and the Haswell run (`.ci/nested-vmx haswell`) shows it reach the
//!   guest's handler. So on Intel the probe first injects at a `nop`; if
//!   that fails VM entry with error 7, it re-injects after a real `#BP` exit
//!   instead, says "yes" if the guest's handler runs, and names the failure
//!   at the `nop` and its cause in [`Probe::inject`]'s detail.
//!   Nothing else in kvm-glue injects `#BP`.
//!
//! ## What the lanes showed
//!
//! [`Probe`]'s rows on each KVM the project's CI runs (`debug_demo`;
//! `.ci/nested-kvm`, `.ci/nested-vmx`, `.ci/nested-vmx haswell`), measured at
//! the commit that wrote this table (kernel 6.1.0-57-cloud-amd64 in the
//! nested lanes; "y" is yes, "–" is no):
//!
//! | row | host `kvm_pvm` (Intel) | `kvm_amd`, QEMU 10.0 TCG `-cpu max` | `kvm_intel`, Bochs 3.0 Skylake-X | `kvm_intel`, Bochs 3.0 Haswell |
//! |---|---|---|---|---|
//! | execute breakpoints | y | y | y | y |
//! | single-step | y | y | y | y |
//! | write watchpoints | – never fire | y | y | y |
//! | read/write watchpoints | – never fire | y | y | y |
//! | int3 exits (`USE_SW_BP`) | – internal error | y | y | y |
//! | RFLAGS.RF resume | – same breakpoint again | y | y | y |
//! | guest's own int3 | – internal error | y | y | y |
//! | guest's own int1 | – internal error | – no exit (AMD) | y, pc at the `int1` | y, pc at the `int1` |
//! | `INJECT_DB`/`INJECT_BP` | y, at a `nop` | y, `#BP` at an `int3` (at a `nop` it never reaches the guest) | y, at a `nop` | y, `#BP` re-injected after a `#BP` exit; at a `nop` on a fresh vCPU VM entry fails (error 7) |
//! | dr7 in debug exits | – reads 0 | y | y | y |
//!
//! The AMD and Intel lanes differ only in the `int1` and `INJECT_BP` rows,
//! and every kvm_* test passed on both (at most a part skipped where a row
//! says no). Both differences follow from the architectures and KVM's code
//! for each, as described above, not from an emulator; the Haswell one is
//! backed by real parts' MSR dumps.
//! (Bochs did have bugs on the way, all fixed or avoided in
//! `.ci/nested-vmx`: see that script.)
//!
//! Tests probe rather than trust this table: each real-KVM test says on one
//! `SKIPPED` line what the probe ruled out, and `.ci/lane-table` fails CI if
//! a test fails on any lane or runs on none.
//!
//! ```no_run
//! let probe = kvm_glue::probe::probe()?;
//! print!("{probe}");
//! if !probe.write_watch.supported {
//!     println!("no data watchpoints here: {}", probe.write_watch.detail);
//! }
//! # Ok::<(), kvm_glue::probe::ProbeError>(())
//! ```

use std::fmt;

use kvm_bindings::{
    kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{self, Exit, Guest, GuestError};

/// Most exits one probe experiment waits for before giving up.
const MAX_EXITS: usize = 24;

/// What the probe found for one feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Whether the feature behaved as the SDM and the KVM API describe.
    pub supported: bool,
    /// What was seen, in a few words (values in hex).
    pub detail: String,
}

impl Finding {
    fn yes(detail: impl Into<String>) -> Finding {
        Finding {
            supported: true,
            detail: detail.into(),
        }
    }
    fn no(detail: impl Into<String>) -> Finding {
        Finding {
            supported: false,
            detail: detail.into(),
        }
    }
}

/// Where the guest's own `int1` (ICEBP) leaves the pc of its `#DB` exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int1Pc {
    /// At the `int1` itself: Intel VMX, where the exit for ICEBP's `#DB` is
    /// an instruction intercept taken before the `int1` completes.
    AtInstruction,
    /// After the `int1`, as the trap it is on bare metal: seen where KVM
    /// emulates the guest's code (`kvm_pvm`).
    AfterInstruction,
    /// No `#DB` exit was seen for `int1`. This is what AMD SVM does: ICEBP's
    /// `#DB` escapes the `#DB` exception intercept, so the guest's own
    /// handler runs and KVM never sees it (see the [module docs](self)).
    Unknown,
}

/// The CPU vendor, from CPUID leaf 0: whose virtualization (Intel VMX or
/// AMD SVM) the host's KVM drives, which decides the `int1` and `INJECT_BP`
/// rules in the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// `GenuineIntel`: `kvm_intel`, VMX.
    Intel,
    /// `AuthenticAMD` or `HygonGenuine` (an AMD derivative): `kvm_amd`, SVM.
    Amd,
    /// Any other vendor string.
    Other,
}

impl Vendor {
    /// The vendor of the CPU this code runs on (inside a VM: the vendor that
    /// VM's CPU model reports, e.g. `AuthenticAMD` under QEMU's `-cpu max`).
    pub fn this_cpu() -> Vendor {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU and only reads
        // registers. (`__cpuid` is a safe function in newer Rust, hence the
        // allow; the crate's rust-version still needs the block.)
        #[allow(unused_unsafe)]
        let id = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut name = [0u8; 12];
        name[..4].copy_from_slice(&id.ebx.to_le_bytes());
        name[4..8].copy_from_slice(&id.edx.to_le_bytes());
        name[8..].copy_from_slice(&id.ecx.to_le_bytes());
        match &name {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Intel => "Intel",
            Vendor::Amd => "AMD",
            Vendor::Other => "a non-Intel, non-AMD CPU",
        })
    }
}

/// The host's guest-debug capabilities, one [`Finding`] per feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The CPU vendor the vendor-specific experiments were chosen by.
    pub vendor: Vendor,
    /// Execute breakpoints: all four slots stop at the breakpoint with DR6.Bn.
    pub execute: Finding,
    /// Single-step: one `#DB` exit with DR6.BS per instruction, at the next pc.
    pub single_step: Finding,
    /// Write watchpoints: a `#DB` exit after each write that overlaps.
    pub write_watch: Finding,
    /// Read/write watchpoints: a `#DB` exit after each read or write that overlaps.
    pub rw_watch: Finding,
    /// Software breakpoints: `int3` with `USE_SW_BP` exits with exception 3 at the `int3`.
    pub sw_breakpoint: Finding,
    /// RFLAGS.RF set on resume runs past an execute breakpoint at the pc.
    pub resume_flag: Finding,
    /// The guest's own `int3` (no debugging on) reaches its IDT handler.
    pub guest_int3: Finding,
    /// The guest's own `int1` with debugging on exits with exception 1
    /// (never on AMD: the guest's own `#DB` handler runs instead).
    pub guest_int1: Finding,
    /// Where that exit's pc was ([`Int1Pc::Unknown`] when there was none).
    pub guest_int1_pc: Int1Pc,
    /// `INJECT_DB` and `INJECT_BP` deliver `#DB`/`#BP` to the guest's IDT and
    /// the guest goes on; `#BP` is injected at a `nop` on Intel, at an `int3`
    /// on AMD (the only place KVM on AMD injects it; see the module docs).
    pub inject: Finding,
    /// The `dr7` field of debug exits holds the programmed DR7.
    pub exit_dr7: Finding,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: [(&str, &Finding); 10] = [
            ("execute breakpoints", &self.execute),
            ("single-step", &self.single_step),
            ("write watchpoints", &self.write_watch),
            ("read/write watchpoints", &self.rw_watch),
            ("int3 exits (USE_SW_BP)", &self.sw_breakpoint),
            ("RFLAGS.RF resume", &self.resume_flag),
            ("guest's own int3", &self.guest_int3),
            ("guest's own int1", &self.guest_int1),
            ("INJECT_DB/INJECT_BP", &self.inject),
            ("dr7 in debug exits", &self.exit_dr7),
        ];
        for (name, finding) in rows {
            let mark = if finding.supported { "yes" } else { "NO " };
            writeln!(f, "{name:<24} {mark}  {}", finding.detail)?;
        }
        Ok(())
    }
}

/// Why the probe could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Building the guest failed (including `/dev/kvm` missing).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// An ioctl the probe needs failed.
    #[error("probe: {what} failed: {source}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl ProbeError {
    /// Whether this is "there is no usable `/dev/kvm`".
    pub fn is_no_kvm(&self) -> bool {
        matches!(self, ProbeError::Guest(GuestError::NoKvm(_)))
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbeError {
    move |source| ProbeError::Kvm { what, source }
}

/// `KVM_SET_GUEST_DEBUG` argument from control flags and DR0–3, DR7.
pub(crate) fn raw_debug(control: u32, dr: [u64; 4], dr7: u64) -> kvm_guest_debug {
    kvm_guest_debug {
        control,
        pad: 0,
        arch: kvm_guest_debug_arch {
            debugreg: [dr[0], dr[1], dr[2], dr[3], 0, 0, 0, dr7],
        },
    }
}

/// DR7 bit 10 (reads as 1), plus Gn for `slot`, R/W and LEN codes.
fn dr7_for(slot: usize, rw: u64, len: u64) -> u64 {
    0x400 | (1 << (2 * slot + 1)) | (rw << (16 + 4 * slot)) | (len << (18 + 4 * slot))
}

/// A fresh one-vCPU guest with `dbg` applied and RIP at `rip`.
fn fresh(rip: u64, dbg: &kvm_guest_debug) -> Result<Guest, ProbeError> {
    let mut g = Guest::new(1)?;
    g.start(0, rip)?;
    g.vcpu(0).set_guest_debug(dbg).map_err(kvm("KVM_SET_GUEST_DEBUG"))?;
    Ok(g)
}

/// Runs until an exit `stop` accepts (inclusive), an exit that ends the run
/// (hlt, internal error, shutdown, anything unexpected), or [`MAX_EXITS`].
fn run_until(g: &mut Guest, stop: impl Fn(&Exit) -> bool) -> Result<Vec<Exit>, ProbeError> {
    let mut exits = Vec::new();
    for _ in 0..MAX_EXITS {
        let exit = guest::run_once(g.vcpu(0)).map_err(kvm("KVM_RUN"))?;
        let end = stop(&exit) || matches!(exit, Exit::Hlt | Exit::InternalError | Exit::Shutdown | Exit::Other(_));
        exits.push(exit);
        if end {
            break;
        }
    }
    Ok(exits)
}

/// Whether `e` is a routine's final `out` to [`guest::PORT_DONE`].
fn done(e: &Exit) -> bool {
    matches!(e, Exit::Out(guest::PORT_DONE, _))
}

fn describe(exits: &[Exit]) -> String {
    let parts: Vec<String> = exits
        .iter()
        .map(|e| match e {
            Exit::Debug { exception, pc, dr6, .. } => format!("#{exception}@{pc:#x}/dr6={dr6:#x}"),
            Exit::Out(port, v) => format!("out({port:#x},{v})"),
            other => format!("{other:?}"),
        })
        .collect();
    parts.join(" ")
}

/// Runs every experiment and reports. Takes a few milliseconds.
///
/// # Errors
/// [`ProbeError::Guest`] when the guest cannot be built (see
/// [`ProbeError::is_no_kvm`]); [`ProbeError::Kvm`] when an ioctl fails.
pub fn probe() -> Result<Probe, ProbeError> {
    let vendor = Vendor::this_cpu();
    let (execute, exit_dr7) = probe_execute()?;
    let (guest_int1, guest_int1_pc) = probe_int1(vendor)?;
    Ok(Probe {
        vendor,
        execute,
        single_step: probe_single_step()?,
        write_watch: probe_watch(1, "write")?,
        rw_watch: probe_watch(3, "read/write")?,
        sw_breakpoint: probe_sw()?,
        resume_flag: probe_rf()?,
        guest_int3: probe_guest_int3()?,
        guest_int1,
        guest_int1_pc,
        inject: probe_inject(vendor)?,
        exit_dr7,
    })
}

fn probe_execute() -> Result<(Finding, Finding), ProbeError> {
    let mut bad = Vec::new();
    let mut dr6s = Vec::new();
    let mut dr7_ok = true;
    let mut dr7_seen = 0;
    for slot in 0..4 {
        let addr = guest::STRAIGHT_INSNS[slot + 1];
        let mut dr = [0u64; 4];
        dr[slot] = addr;
        let dr7 = dr7_for(slot, 0, 0);
        let dbg = raw_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, dr, dr7);
        let mut g = fresh(guest::STRAIGHT, &dbg)?;
        let exits = run_until(&mut g, |e| matches!(e, Exit::Debug { .. }) || done(e))?;
        match exits.last() {
            Some(&Exit::Debug {
                exception: 1,
                pc,
                dr6,
                dr7: exit_dr7,
            }) if pc == addr && dr6 & 0xf == 1 << slot => {
                dr6s.push(format!("{dr6:#x}"));
                if exit_dr7 & 0xff != dr7 & 0xff {
                    dr7_ok = false;
                    dr7_seen = exit_dr7;
                }
            }
            _ => bad.push(format!("slot {slot}: {}", describe(&exits))),
        }
    }
    let execute = if bad.is_empty() {
        Finding::yes(format!("slots 0-3 stop at the breakpoint, DR6 {}", dr6s.join(" ")))
    } else {
        Finding::no(bad.join("; "))
    };
    let exit_dr7 = if !bad.is_empty() && dr6s.is_empty() {
        Finding::no("no execute-breakpoint exit to look at")
    } else if dr7_ok {
        Finding::yes("matches the programmed enable bits")
    } else {
        Finding::no(format!(
            "reads {dr7_seen:#x}, not the programmed value (decode never uses it)"
        ))
    };
    Ok((execute, exit_dr7))
}

fn probe_single_step() -> Result<Finding, ProbeError> {
    let dbg = raw_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, [0; 4], 0x400);
    let mut g = fresh(guest::STRAIGHT, &dbg)?;
    let exits = run_until(&mut g, done)?;
    let expected: Vec<Exit> = guest::STRAIGHT_INSNS[1..]
        .iter()
        .map(|&pc| Exit::Debug {
            exception: 1,
            pc,
            dr6: 0,
            dr7: 0,
        })
        .collect();
    let steps: Vec<&Exit> = exits.iter().filter(|e| e.debug().is_some()).collect();
    let pcs_ok = steps.len() == expected.len()
        && steps.iter().zip(&expected).all(|(seen, want)| {
            matches!((seen, want), (Exit::Debug { exception: 1, pc, dr6, .. }, Exit::Debug { pc: wpc, .. })
                if pc == wpc && dr6 & 0x4000 != 0)
        });
    let ended = exits.last().is_some_and(done);
    Ok(if pcs_ok && ended {
        let dr6 = steps.first().and_then(|e| e.debug()).map_or(0, |d| d.dr6);
        Finding::yes(format!("one exit per instruction at the next pc, DR6 {dr6:#x}"))
    } else {
        Finding::no(describe(&exits))
    })
}

fn probe_watch(rw: u64, name: &str) -> Result<Finding, ProbeError> {
    // A 1-byte watchpoint at DATA + 8: hit by the first write, and (read/write
    // only) by the read of DATA + 8; no other access of the routine touches it.
    let addr = guest::DATA + 8;
    let dbg = raw_debug(
        KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        [addr, 0, 0, 0],
        dr7_for(0, rw, 0),
    );
    let mut g = fresh(guest::DATA_ACCESS, &dbg)?;
    let exits = run_until(&mut g, done)?;
    let want: Vec<u64> = guest::DATA_ACCESSES
        .iter()
        .filter(|a| a.addr == addr && (a.write || rw == 3))
        .map(|a| a.next)
        .collect();
    let seen: Vec<u64> = exits
        .iter()
        .filter_map(|e| e.debug())
        .filter(|d| d.exception == 1 && d.dr6 & 1 == 1)
        .map(|d| d.pc)
        .collect();
    Ok(if seen == want && exits.last().is_some_and(done) {
        Finding::yes(format!("{name} watchpoint stops after each access"))
    } else if seen.is_empty() {
        Finding::no(format!(
            "a 1-byte {name} watchpoint never fired; the guest ran on: {}",
            describe(&exits)
        ))
    } else {
        Finding::no(format!("expected stops after {want:#x?}, saw {}", describe(&exits)))
    })
}

fn probe_sw() -> Result<Finding, ProbeError> {
    let dbg = raw_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, [0; 4], 0x400);
    let mut g = fresh(guest::SW, &dbg)?;
    g.memory()
        .write_obj(0xCCu8, GuestAddress(guest::SW_PATCH))
        .map_err(GuestError::Memory)?;
    let exits = run_until(&mut g, |e| matches!(e, Exit::Debug { .. }) || done(e))?;
    Ok(match exits.last() {
        Some(&Exit::Debug { exception: 3, pc, .. }) if pc == guest::SW_PATCH => {
            Finding::yes("int3 exits with exception 3 at the int3")
        }
        _ => Finding::no(format!("int3 gave {}", describe(&exits))),
    })
}

fn probe_rf() -> Result<Finding, ProbeError> {
    let addr = guest::STRAIGHT_INSNS[2];
    let dbg = raw_debug(
        KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        [addr, 0, 0, 0],
        dr7_for(0, 0, 0),
    );
    let mut g = fresh(guest::STRAIGHT, &dbg)?;
    let first = run_until(&mut g, |e| matches!(e, Exit::Debug { .. }) || done(e))?;
    if !matches!(first.last(), Some(Exit::Debug { pc, .. }) if *pc == addr) {
        return Ok(Finding::no(format!(
            "no execute-breakpoint exit to resume from: {}",
            describe(&first)
        )));
    }
    let vcpu = g.vcpu(0);
    let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    regs.rflags |= 1 << 16;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    let next = run_until(&mut g, |e| matches!(e, Exit::Debug { .. }) || done(e))?;
    Ok(match next.last() {
        Some(e) if done(e) => Finding::yes("resuming with RF set runs past the breakpoint"),
        _ => Finding::no(format!(
            "resuming with RF set gave {} (the same breakpoint again)",
            describe(&next)
        )),
    })
}

fn probe_guest_int3() -> Result<Finding, ProbeError> {
    let mut g = fresh(guest::INT3, &raw_debug(0, [0; 4], 0))?;
    let exits = run_until(&mut g, done)?;
    Ok(
        if exits.first() == Some(&Exit::Out(guest::PORT_VECTOR, 3)) && exits.last().is_some_and(done) {
            Finding::yes("reaches the guest's #BP handler, which returns")
        } else {
            Finding::no(format!(
                "the guest's int3 gave {} instead of its #BP handler",
                describe(&exits)
            ))
        },
    )
}

fn probe_int1(vendor: Vendor) -> Result<(Finding, Int1Pc), ProbeError> {
    let dbg = raw_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [0; 4], 0x400);
    let mut g = fresh(guest::INT1, &dbg)?;
    let exits = run_until(&mut g, |e| matches!(e, Exit::Debug { .. }) || done(e))?;
    Ok(match exits.last() {
        Some(&Exit::Debug {
            exception: 1, pc, dr6, ..
        }) => {
            let at = if pc == guest::INT1 {
                Int1Pc::AtInstruction
            } else if pc == guest::INT1 + 1 {
                Int1Pc::AfterInstruction
            } else {
                Int1Pc::Unknown
            };
            (Finding::yes(format!("#DB exit at pc {pc:#x}, DR6 {dr6:#x}")), at)
        }
        _ if vendor == Vendor::Amd
            && exits.first() == Some(&Exit::Out(guest::PORT_VECTOR, 1))
            && exits.last().is_some_and(done) =>
        {
            (
                Finding::no("no exit, as on any AMD host: the guest's own #DB handler ran, then the guest went on"),
                Int1Pc::Unknown,
            )
        }
        _ => (Finding::no(format!("int1 gave {}", describe(&exits))), Int1Pc::Unknown),
    })
}

fn probe_inject(vendor: Vendor) -> Result<Finding, ProbeError> {
    // #DB at a nop; #BP at an int3 on AMD, at a nop elsewhere.
    let bp_at = if vendor == Vendor::Amd {
        guest::INT3
    } else {
        guest::STRAIGHT
    };
    let db = inject_at(KVM_GUESTDBG_INJECT_DB, guest::STRAIGHT)?;
    let bp = inject_at(KVM_GUESTDBG_INJECT_BP, bp_at)?;
    let ok = handler_ran(&db, 1) && handler_ran(&bp, 3);
    let seen = [(1, guest::STRAIGHT, &db), (3, bp_at, &bp)]
        .map(|(vector, rip, exits)| format!("#{vector} at {rip:#x}: {}", describe(exits)));
    if vendor != Vendor::Amd && handler_ran(&db, 1) && bp.last().is_some_and(is_fail_entry_7) {
        // Intel before Skylake (see the module docs): a #BP of instruction
        // length 0 fails VM entry. What a debugger does, re-injecting the
        // guest's own #BP right after its exit (length 1), is another case:
        // check that one, and say which failed and why.
        let own = reinject_own_bp()?;
        let why = "fails VM entry (FailEntry 7, invalid control field): KVM gives #BP the instruction \
                   length of the vCPU's last #DB/#BP exit, 0 here, and length 0 needs IA32_VMX_MISC bit 30, \
                   which Intel CPUs before Skylake lack";
        return Ok(if handler_ran(&own, 3) {
            Finding::yes(format!(
                "the guest's #DB and #BP handlers run, then the guest goes on (#BP re-injected after \
                 the guest's own int3 exit; INJECT_BP at a nop on a fresh vCPU {why})"
            ))
        } else {
            Finding::no(format!(
                "INJECT_BP at a nop on a fresh vCPU {why}; re-injected after the guest's own int3 exit: {}",
                describe(&own)
            ))
        });
    }
    Ok(if !ok {
        Finding::no(seen.join("; "))
    } else if vendor == Vendor::Amd {
        // What a #BP injected at a nop does on this host, for the record.
        let nop = inject_at(KVM_GUESTDBG_INJECT_BP, guest::STRAIGHT)?;
        let at_nop = if nop.first() == Some(&Exit::Out(guest::PORT_VECTOR, 3)) {
            "reached the guest too".to_string()
        } else {
            format!("never reached the guest ({})", describe(&nop))
        };
        Finding::yes(format!(
            "the guest's #DB and #BP handlers run, then the guest goes on (AMD: #BP at an int3; at a nop it {at_nop})"
        ))
    } else {
        Finding::yes("the guest's #DB and #BP handlers run, then the guest goes on")
    })
}

/// Whether the guest's handler for `vector` reported first and the routine
/// then ran to its end.
fn handler_ran(exits: &[Exit], vector: u8) -> bool {
    exits.first() == Some(&Exit::Out(guest::PORT_VECTOR, vector)) && exits.last().is_some_and(done)
}

/// `KVM_EXIT_FAIL_ENTRY` with hardware reason 7: on VMX, KVM reports the
/// VM-instruction error of the failed VM entry there, and 7 is "VM entry with
/// invalid control field(s)" (SDM Vol. 3C, "VM-Instruction Error Numbers").
/// [`Exit`] keeps this exit only as the text of kvm-ioctls' `VcpuExit`.
fn is_fail_entry_7(e: &Exit) -> bool {
    matches!(e, Exit::Other(text) if text.starts_with("FailEntry(7,"))
}

/// Runs the guest's own `int3` with `USE_SW_BP` until its `#BP` exit, then
/// re-injects that `#BP` with `INJECT_BP` (as kvm-glue does for a `#BP` that
/// is not a breakpoint of the debugger's) and runs on. The exits seen.
fn reinject_own_bp() -> Result<Vec<Exit>, ProbeError> {
    let sw = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
    let mut g = fresh(guest::INT3, &raw_debug(sw, [0; 4], 0x400))?;
    let first = run_until(&mut g, |e| matches!(e, Exit::Debug { .. }) || done(e))?;
    if !matches!(first.last(), Some(Exit::Debug { exception: 3, pc, .. }) if *pc == guest::INT3) {
        return Ok(first);
    }
    g.vcpu(0)
        .set_guest_debug(&raw_debug(sw | KVM_GUESTDBG_INJECT_BP, [0; 4], 0x400))
        .map_err(kvm("KVM_SET_GUEST_DEBUG"))?;
    run_until(&mut g, done)
}

/// Runs a fresh vCPU from `rip` with the one-shot inject `flag` set.
fn inject_at(flag: u32, rip: u64) -> Result<Vec<Exit>, ProbeError> {
    let mut g = fresh(rip, &raw_debug(KVM_GUESTDBG_ENABLE | flag, [0; 4], 0x400))?;
    run_until(&mut g, done)
}

/// The control flags this host's KVM accepts in `KVM_SET_GUEST_DEBUG`, as
/// `KVM_CAP_SET_GUEST_DEBUG2` reports them (Linux 5.7 on); `None` without
/// `/dev/kvm` or where the kernel predates that capability. Asked once per
/// process (one `KVM_CHECK_EXTENSION` on a fresh `/dev/kvm` fd) and cached.
pub fn host_guest_debug_flags() -> Option<u32> {
    static FLAGS: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *FLAGS.get_or_init(|| {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let flags = kvm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG2));
        u32::try_from(flags).ok().filter(|&f| f != 0)
    })
}

/// Whether this host's KVM takes `KVM_GUESTDBG_BLOCKIRQ` (Linux 5.16 on;
/// this project's hosts report `0x1f0003`, which has it): what
/// [`VmDebug`](crate::VmDebug) uses by default while single-stepping
/// ([`StepIrqs`](crate::StepIrqs)). Without it, a step with an interrupt
/// pending enters the guest's handler.
pub fn host_block_irq() -> bool {
    host_guest_debug_flags().is_some_and(|f| f & kvm_bindings::KVM_GUESTDBG_BLOCKIRQ != 0)
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::VcpuExit;

    use super::*;

    #[test]
    fn a_vmx_entry_failure_with_instruction_error_7_is_recognised_from_the_exit() {
        // KVM_EXIT_FAIL_ENTRY's hardware reason on VMX is the VM-instruction
        // error; 7 is "VM entry with invalid control field(s)" (SDM Vol. 3C,
        // "VM-Instruction Error Numbers").
        let exit = Exit::from_vcpu_exit(&VcpuExit::FailEntry(7, 0));
        assert!(is_fail_entry_7(&exit), "{exit:?}");
        // 0x80000021 is "VM entry failure, invalid guest state": another failure.
        for other in [
            VcpuExit::FailEntry(0x8000_0021, 0),
            VcpuExit::FailEntry(70, 1),
            VcpuExit::Shutdown,
        ] {
            let exit = Exit::from_vcpu_exit(&other);
            assert!(!is_fail_entry_7(&exit), "{exit:?}");
        }
    }
}
