//! Lock-step differential testing of the typed model against the
//! [`reference`](crate::reference) (feature `reference`).
//!
//! One vocabulary of operations ([`Op`]) drives both sides; after each step
//! [`compare`] checks outcome (typed error ↔ errno), DR0–DR3/DR7 bit for bit,
//! control flags, the breakpoint tables and guest memory byte for byte, and
//! [`invariants`] checks the rules that hold in every state. The property
//! suites, the exhaustive bounded check and the fuzz targets all run through
//! here, so they check exactly the same things.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::reference::{self as r, RefDecision, RefMemory, Reference};
use crate::state::{BreakpointError, Removed};
use crate::sw::{self, ByteMemory, SwError};
use crate::{DebugExit, DebugState, Decision, HwError, Stop};

/// One operation on a VM's debug state (or on its guest).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Op {
    /// Insert with GDB type number `ty` (any value, 5+ is unknown).
    Insert {
        /// GDB type number.
        ty: u64,
        /// Address.
        addr: u64,
        /// Length in bytes (any value).
        len: u64,
    },
    /// Remove with GDB type number `ty`.
    Remove {
        /// GDB type number.
        ty: u64,
        /// Address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Remove every breakpoint.
    RemoveAll,
    /// Single-step on or off.
    SingleStep(bool),
    /// The guest writes a byte (it may overwrite an `0xCC`).
    GuestWrite {
        /// Address.
        addr: u64,
        /// Value.
        value: u8,
    },
    /// Make accesses to `addr` fail (or work again) from now on, in both
    /// memories: how a breakpoint's page becomes unreadable after insertion.
    Poison {
        /// Address.
        addr: u64,
        /// Whether reads fail.
        reads: bool,
        /// Whether writes fail.
        writes: bool,
    },
    /// Apply the current configuration to the vCPU (`KVM_SET_GUEST_DEBUG`).
    Apply,
    /// Decode a debug exit of the vCPU against what it last applied.
    Decode(DebugExit),
}

/// Why a [`TestMemory`] access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("injected {} fault at {addr:#x}", if *.write { "write" } else { "read" })]
pub struct MemFault {
    /// The address.
    pub addr: u64,
    /// Whether the failed access was a write.
    pub write: bool,
}

/// A small guest memory with failure injection: addresses outside it, in
/// `bad_read`/`bad_write`, or the `fail_at`-th access (0-based) fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestMemory {
    /// The bytes, at guest addresses `0..bytes.len()`.
    pub bytes: Vec<u8>,
    /// Addresses whose reads fail.
    pub bad_read: BTreeSet<u64>,
    /// Addresses whose writes fail.
    pub bad_write: BTreeSet<u64>,
    /// Fail the access with this index (counting reads and writes from 0).
    pub fail_at: Option<u64>,
    /// Accesses made so far.
    pub accesses: u64,
}

impl TestMemory {
    /// `size` bytes of a recognisable pattern (which includes `0xCC` bytes,
    /// so a breakpoint over an existing `int3` is exercised).
    pub fn new(size: usize) -> TestMemory {
        let bytes = (0..size)
            .map(|i| (i as u8).wrapping_mul(0x3d).wrapping_add(0x11))
            .collect();
        TestMemory {
            bytes,
            bad_read: BTreeSet::new(),
            bad_write: BTreeSet::new(),
            fail_at: None,
            accesses: 0,
        }
    }

    fn access(&mut self, addr: u64, write: bool) -> Result<usize, MemFault> {
        let n = self.accesses;
        self.accesses += 1;
        let bad = if write { &self.bad_write } else { &self.bad_read };
        match usize::try_from(addr) {
            Ok(i) if i < self.bytes.len() && !bad.contains(&addr) && self.fail_at != Some(n) => Ok(i),
            _ => Err(MemFault { addr, write }),
        }
    }

    /// The byte at `addr` without counting an access (for checks).
    pub fn peek(&self, addr: u64) -> Option<u8> {
        usize::try_from(addr).ok().and_then(|i| self.bytes.get(i).copied())
    }
}

impl TestMemory {
    /// Makes reads and/or writes of `addr` fail from now on (or work again).
    pub fn poison(&mut self, addr: u64, reads: bool, writes: bool) {
        for (set, on) in [(&mut self.bad_read, reads), (&mut self.bad_write, writes)] {
            if on {
                set.insert(addr);
            } else {
                set.remove(&addr);
            }
        }
    }
}

impl ByteMemory for TestMemory {
    type Error = MemFault;
    fn read_byte(&mut self, addr: u64) -> Result<u8, MemFault> {
        self.access(addr, false).map(|i| self.bytes[i])
    }
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), MemFault> {
        let i = self.access(addr, true)?;
        self.bytes[i] = value;
        Ok(())
    }
}

impl RefMemory for TestMemory {
    fn ref_read(&mut self, addr: u64) -> Option<u8> {
        self.read_byte(addr).ok()
    }
    fn ref_write(&mut self, addr: u64, value: u8) -> bool {
        self.write_byte(addr, value).is_ok()
    }
}

/// The result of the last operation, in the reference's integer vocabulary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// No operation yet, or one without a result.
    #[default]
    None,
    /// Insert/remove: 0, [`r::REMOVED_GUEST_OVERWROTE`] or a negative errno.
    Code(i32),
    /// Remove-all: addresses that failed (kept) and that the guest overwrote.
    RemoveAll {
        /// Failed, ascending.
        failed: Vec<u64>,
        /// Overwritten, ascending.
        overwritten: Vec<u64>,
    },
    /// Exit decoding.
    Decision(RefDecision),
}

/// The reference side, plus the bookkeeping the invariants need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefSide {
    /// The model.
    pub model: Reference,
    /// Its guest memory.
    pub mem: TestMemory,
    /// `(control, debugreg)` last applied to the vCPU.
    pub applied: (u32, [u64; 8]),
    /// Guest memory as the guest sees it: without `0xCC` patches.
    pub shadow: Vec<u8>,
    /// Breakpoint addresses the guest wrote over while they were set.
    pub tampered: BTreeSet<u64>,
    /// The last outcome.
    pub last: Outcome,
}

/// The typed side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedSide {
    /// The model.
    pub state: DebugState,
    /// Its guest memory.
    pub mem: TestMemory,
    /// What was last applied to the vCPU.
    pub applied: crate::Applied,
    /// The last outcome, translated.
    pub last: Outcome,
}

impl RefSide {
    /// A fresh reference over `mem`.
    pub fn new(mem: TestMemory) -> RefSide {
        let shadow = mem.bytes.clone();
        RefSide {
            model: Reference::new(),
            mem,
            applied: (0, [0; 8]),
            shadow,
            tampered: BTreeSet::new(),
            last: Outcome::None,
        }
    }

    /// Applies `op`.
    pub fn apply(&mut self, op: &Op) {
        self.last = match *op {
            Op::Insert { ty, addr, len } => Outcome::Code(self.model.insert(&mut self.mem, addr, len, ty)),
            Op::Remove { ty, addr, len } => Outcome::Code(self.model.remove(&mut self.mem, addr, len, ty)),
            Op::RemoveAll => {
                let (failed, overwritten) = self.model.remove_all(&mut self.mem);
                Outcome::RemoveAll { failed, overwritten }
            }
            Op::SingleStep(on) => {
                self.model.singlestep_enabled = on;
                Outcome::None
            }
            Op::GuestWrite { addr, value } => {
                if let Some(i) = usize::try_from(addr).ok().filter(|&i| i < self.mem.bytes.len()) {
                    self.mem.bytes[i] = value;
                    self.shadow[i] = value;
                    if self.model.find_sw_breakpoint(addr).is_some() {
                        self.tampered.insert(addr);
                    }
                }
                Outcome::None
            }
            Op::Poison { addr, reads, writes } => {
                self.mem.poison(addr, reads, writes);
                Outcome::None
            }
            Op::Apply => {
                self.applied = self.model.guest_debug(self.model.singlestep_enabled);
                Outcome::None
            }
            Op::Decode(e) => {
                let (control, debugreg) = self.applied;
                Outcome::Decision(self.model.debug_exit(e.exception, e.pc, e.dr6, control, debugreg))
            }
        };
        // A forgotten entry the guest wrote over: if the guest wrote 0xCC over
        // our 0xCC the write is invisible and the restore wins; the guest's
        // view is whatever memory now holds.
        let model = &self.model;
        let (mem, shadow) = (&self.mem, &mut self.shadow);
        self.tampered.retain(|&addr| {
            let kept = model.find_sw_breakpoint(addr).is_some();
            if !kept {
                if let (Ok(i), Some(byte)) = (usize::try_from(addr), mem.peek(addr)) {
                    shadow[i] = byte;
                }
            }
            kept
        });
    }
}

impl TypedSide {
    /// A fresh typed model over `mem`.
    pub fn new(mem: TestMemory) -> TypedSide {
        TypedSide {
            state: DebugState::new(),
            mem,
            applied: crate::Applied::DISABLED,
            last: Outcome::None,
        }
    }

    /// Applies `op`.
    pub fn apply(&mut self, op: &Op) {
        self.last = match *op {
            Op::Insert { ty, addr, len } => Outcome::Code(
                self.state
                    .insert_gdb(&mut self.mem, ty, addr, len)
                    .map_or_else(|e| errno(&e), |_| 0),
            ),
            Op::Remove { ty, addr, len } => Outcome::Code(match self.state.remove_gdb(&mut self.mem, ty, addr, len) {
                Ok(Removed::Software(sw::SwRemoved::GuestOverwrote { .. })) => r::REMOVED_GUEST_OVERWROTE,
                Ok(_) => 0,
                Err(e) => errno(&e),
            }),
            Op::RemoveAll => {
                let report = self.state.remove_all(&mut self.mem);
                Outcome::RemoveAll {
                    failed: report.failed.iter().map(|(a, _)| *a).collect(),
                    overwritten: report.overwritten,
                }
            }
            Op::SingleStep(on) => {
                self.state.set_single_step(on);
                Outcome::None
            }
            Op::GuestWrite { addr, value } => {
                if let Some(i) = usize::try_from(addr).ok().filter(|&i| i < self.mem.bytes.len()) {
                    self.mem.bytes[i] = value;
                }
                Outcome::None
            }
            Op::Poison { addr, reads, writes } => {
                self.mem.poison(addr, reads, writes);
                Outcome::None
            }
            Op::Apply => {
                self.applied = crate::Applied::was_set(self.state.guest_debug());
                Outcome::None
            }
            Op::Decode(e) => Outcome::Decision(decision(self.state.decode(&e, &self.applied))),
        };
    }
}

/// The GDB type number the reference stores for a hardware kind.
fn gdb_type(kind: crate::HwKind) -> u64 {
    match kind {
        crate::HwKind::Execute => r::GDB_BREAKPOINT_HW,
        crate::HwKind::Write => r::GDB_WATCHPOINT_WRITE,
        crate::HwKind::ReadWrite => r::GDB_WATCHPOINT_ACCESS,
    }
}

/// The seed's errno for a typed error.
pub fn errno<E>(e: &BreakpointError<E>) -> i32 {
    -match e {
        BreakpointError::Hw(HwError::Misaligned { .. } | HwError::BadLength { .. }) => r::EINVAL,
        BreakpointError::Hw(HwError::Unsupported { .. }) | BreakpointError::UnknownType(_) => r::ENOSYS,
        BreakpointError::Hw(HwError::Full) => r::ENOBUFS,
        BreakpointError::Hw(HwError::AlreadyPresent { .. }) => r::EEXIST,
        BreakpointError::Hw(HwError::NotFound { .. }) | BreakpointError::Sw(SwError::NotFound { .. }) => r::ENOENT,
        BreakpointError::Sw(SwError::Read { .. } | SwError::Write { .. }) => r::EINVAL,
        BreakpointError::Sw(SwError::CountOverflow { .. }) => r::EOVERFLOW,
    }
}

/// A typed decision in the reference's vocabulary.
pub fn decision(d: Result<Decision, crate::DecodeError>) -> RefDecision {
    let mut out = RefDecision::default();
    match d {
        Ok(Decision::Stop(Stop::Debug { single_step, hits })) => {
            out.handle = 1;
            out.single_step = single_step;
            out.hit_mask = hits.mask();
            for hit in hits.iter() {
                let bp = hit.breakpoint;
                out.hits[hit.slot.index()] = (
                    bp.addr(),
                    u64::from(bp.kind().condition().into_bits()),
                    bp.len().bytes(),
                );
            }
        }
        Ok(Decision::Stop(Stop::Software { .. })) => {
            out.handle = 1;
            out.sw = true;
        }
        Ok(Decision::Reinject(e)) => out.inject = e.inject_flag().bits(),
        Err(_) => out.handle = -r::EINVAL,
    }
    out
}

/// A difference between the two models, or a broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! ensure_eq {
    ($what:expr, $typed:expr, $reference:expr) => {
        if $typed != $reference {
            return Err(Mismatch(format!(
                "{}: typed {:x?} != reference {:x?}",
                $what, $typed, $reference
            )));
        }
    };
}

/// Compares the two sides after the same operations.
///
/// # Errors
/// The first difference found.
pub fn compare(t: &TypedSide, r: &RefSide) -> Result<(), Mismatch> {
    ensure_eq!("outcome", t.last, r.last);
    let dbg = t.state.guest_debug();
    let (control, debugreg) = r.model.guest_debug(r.model.singlestep_enabled);
    ensure_eq!("control flags", dbg.control.bits(), control);
    ensure_eq!("debugreg", dbg.debugreg, debugreg);
    ensure_eq!("applied", (t.applied.control.bits(), t.applied.debugreg), r.applied);
    ensure_eq!("single-step", t.state.single_step(), r.model.singlestep_enabled);
    let mut sw: Vec<(u64, u8, u32)> = r
        .model
        .sw_breakpoints
        .iter()
        .map(|b| (b.pc, b.saved_insn, b.use_count))
        .collect();
    sw.sort_unstable();
    let typed_sw: Vec<(u64, u8, u32)> = t.state.sw().iter().map(|(a, e)| (a, e.saved, e.count)).collect();
    ensure_eq!("software breakpoints", typed_sw, sw);
    let hw: Vec<(u64, u64, u64)> = r.model.hw_breakpoint[..r.model.nb_hw_breakpoint]
        .iter()
        .map(|b| (b.addr, b.len, b.ty))
        .collect();
    let typed_hw: Vec<(u64, u64, u64)> = t
        .state
        .hw()
        .iter()
        .map(|(_, b)| (b.addr(), b.len().bytes(), gdb_type(b.kind())))
        .collect();
    ensure_eq!("hardware slots", typed_hw, hw);
    if t.mem.bytes != r.mem.bytes {
        let i = t
            .mem
            .bytes
            .iter()
            .zip(&r.mem.bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(Mismatch(format!(
            "memory differs first at {i:#x}: typed {:#x} != reference {:#x}",
            t.mem.bytes.get(i).copied().unwrap_or(0),
            r.mem.bytes.get(i).copied().unwrap_or(0)
        )));
    }
    Ok(())
}

/// Rules that hold in every state: at most four slots, DR7 bit 10 set and no
/// reserved DR7 bit, every table entry's byte is `0xCC` over the guest's
/// byte (unless the guest overwrote it), counts ≥ 1, and every address
/// without a breakpoint holds the guest's own byte.
///
/// # Errors
/// The first broken rule.
pub fn invariants(t: &TypedSide, r: &RefSide) -> Result<(), Mismatch> {
    let dbg = t.state.guest_debug();
    if t.state.hw().len() > 4 || r.model.nb_hw_breakpoint > 4 {
        return Err(Mismatch(format!("more than 4 slots: {:?}", t.state.hw())));
    }
    if dbg.debugreg[7] & crate::dr7::DR7_FIXED1 == 0 || dbg.debugreg[7] & crate::dr7::DR7_RESERVED_MASK != 0 {
        return Err(Mismatch(format!(
            "DR7 {:#x} breaks the fixed/reserved bits",
            dbg.debugreg[7]
        )));
    }
    for (addr, entry) in t.state.sw().iter() {
        let byte = t.mem.peek(addr);
        let guest = usize::try_from(addr).ok().and_then(|i| r.shadow.get(i).copied());
        if entry.count == 0 {
            return Err(Mismatch(format!("entry {addr:#x} has count 0")));
        }
        if !r.tampered.contains(&addr) && (byte != Some(sw::INT3) || guest != Some(entry.saved)) {
            return Err(Mismatch(format!(
                "entry {addr:#x}: memory {byte:x?} (want 0xcc), saved {:#x} (guest's byte {guest:x?})",
                entry.saved
            )));
        }
    }
    for (i, (&have, &guest)) in t.mem.bytes.iter().zip(&r.shadow).enumerate() {
        if have != guest && !t.state.sw().contains(i as u64) {
            return Err(Mismatch(format!(
                "{i:#x} holds {have:#x} without a breakpoint, guest wrote {guest:#x}"
            )));
        }
    }
    Ok(())
}

/// Both sides, stepped together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lockstep {
    /// The typed model.
    pub typed: TypedSide,
    /// The reference.
    pub reference: RefSide,
}

impl Lockstep {
    /// Both models over copies of `mem`.
    pub fn new(mem: TestMemory) -> Lockstep {
        Lockstep {
            typed: TypedSide::new(mem.clone()),
            reference: RefSide::new(mem),
        }
    }

    /// Applies `op` to both, then compares and checks the invariants.
    ///
    /// # Errors
    /// The first difference or broken invariant, naming `op`.
    pub fn step(&mut self, op: &Op) -> Result<(), Mismatch> {
        self.reference.apply(op);
        self.typed.apply(op);
        compare(&self.typed, &self.reference)
            .and_then(|()| invariants(&self.typed, &self.reference))
            .map_err(|m| Mismatch(format!("after {op:x?}: {m}")))
    }
}
