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

use crate::reference::{self as r, RefDecision, RefMemory, RefRemoveAll, RefResult, Reference};
use crate::state::{BreakpointError, Inserted, Removed};
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

/// The result of the last operation, in the reference's integer vocabulary,
/// with every detail of the typed answer (slot, saved byte, use count, which
/// memory access failed, the remove-all report, the stop's address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    /// No operation yet, or one without a result.
    #[default]
    None,
    /// Insert/remove.
    Result(RefResult),
    /// Remove-all.
    RemoveAll(RefRemoveAll),
    /// Exit decoding.
    Decision(RefDecision),
}

impl Outcome {
    /// The insert/remove return value, if the last operation was one.
    pub fn code(&self) -> Option<i32> {
        match self {
            Outcome::Result(r) => Some(r.code),
            _ => None,
        }
    }
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
    /// How it began: the memory and the preset use counts
    /// ([`RefSide::with_counts`]), so the typed side can begin the same way.
    pub start: (TestMemory, Vec<(u64, u32)>),
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
    /// A typed error whose fields do not name the request (address, length,
    /// type, the failing access), if the last operation returned one.
    pub wrong_fields: Option<String>,
}

impl RefSide {
    /// A fresh reference over `mem`.
    pub fn new(mem: TestMemory) -> RefSide {
        let shadow = mem.bytes.clone();
        RefSide {
            model: Reference::new(),
            start: (mem.clone(), Vec::new()),
            mem,
            applied: (0, [0; 8]),
            shadow,
            tampered: BTreeSet::new(),
            last: Outcome::None,
        }
    }

    /// A reference over `mem` that begins with a software breakpoint at each
    /// address of `counts`, inserted once and its use count then set to the
    /// given value (at least 1): how the suites reach counts near `u32::MAX`.
    /// Inserts that fail are skipped.
    pub fn with_counts(mem: TestMemory, counts: &[(u64, u32)]) -> RefSide {
        let mut side = RefSide::new(mem.clone());
        side.start = (mem, counts.to_vec());
        for &(addr, count) in counts {
            side.model.insert(&mut side.mem, addr, 1, r::GDB_BREAKPOINT_SW);
            if let Some(i) = side.model.find_sw_breakpoint(addr) {
                side.model.sw_breakpoints[i].use_count = count.max(1);
            }
        }
        side
    }

    /// Applies `op`.
    pub fn apply(&mut self, op: &Op) {
        self.last = match *op {
            Op::Insert { ty, addr, len } => Outcome::Result(self.model.insert(&mut self.mem, addr, len, ty)),
            Op::Remove { ty, addr, len } => Outcome::Result(self.model.remove(&mut self.mem, addr, len, ty)),
            Op::RemoveAll => Outcome::RemoveAll(self.model.remove_all(&mut self.mem)),
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
            wrong_fields: None,
        }
    }

    /// A typed model that begins as `reference` began (same memory, same
    /// preset use counts; see [`RefSide::with_counts`]).
    pub fn starting_like(reference: &RefSide) -> TypedSide {
        let (mem, counts) = &reference.start;
        let mut side = TypedSide::new(mem.clone());
        for &(addr, count) in counts {
            // As the reference: insert, then set the count of whatever is there.
            let _ = side
                .state
                .insert(&mut side.mem, crate::BreakpointType::Software, addr, 1);
            side.state.sw_mut_for_testing().set_count_for_testing(addr, count);
        }
        side
    }

    /// Applies `op`.
    pub fn apply(&mut self, op: &Op) {
        self.wrong_fields = None;
        self.last = match *op {
            Op::Insert { ty, addr, len } => {
                let result = self.state.insert_gdb(&mut self.mem, ty, addr, len);
                self.wrong_fields = result.as_ref().err().and_then(|e| wrong_fields(e, ty, addr, len));
                Outcome::Result(match result {
                    Ok(Inserted::Software(sw::SwInserted::Patched { saved })) => RefResult {
                        byte: Some(saved),
                        ..RefResult::code(0)
                    },
                    Ok(Inserted::Software(sw::SwInserted::Counted { count })) => RefResult {
                        count: Some(count),
                        ..RefResult::code(0)
                    },
                    Ok(Inserted::Hardware(slot)) => RefResult {
                        slot: Some(slot.index()),
                        ..RefResult::code(0)
                    },
                    Err(e) => error_result(&e),
                })
            }
            Op::Remove { ty, addr, len } => {
                let result = self.state.remove_gdb(&mut self.mem, ty, addr, len);
                self.wrong_fields = result.as_ref().err().and_then(|e| wrong_fields(e, ty, addr, len));
                Outcome::Result(match result {
                    Ok(Removed::Software(sw::SwRemoved::Counted { remaining })) => RefResult {
                        count: Some(remaining),
                        ..RefResult::code(0)
                    },
                    Ok(Removed::Software(sw::SwRemoved::Restored)) => RefResult::code(0),
                    Ok(Removed::Software(sw::SwRemoved::GuestOverwrote { found })) => RefResult {
                        byte: Some(found),
                        ..RefResult::code(r::REMOVED_GUEST_OVERWROTE)
                    },
                    Ok(Removed::Hardware(slot)) => RefResult {
                        slot: Some(slot.index()),
                        ..RefResult::code(0)
                    },
                    Err(e) => error_result(&e),
                })
            }
            Op::RemoveAll => {
                let report = self.state.remove_all(&mut self.mem);
                let mut failed = Vec::new();
                for (addr, e) in &report.failed {
                    let fault = match e {
                        SwError::Read { addr: a, source } if a == addr && source.addr == *addr && !source.write => {
                            Some((*addr, false))
                        }
                        SwError::Write { addr: a, source } if a == addr && source.addr == *addr && source.write => {
                            Some((*addr, true))
                        }
                        _ => None,
                    };
                    match fault {
                        Some(f) => failed.push(f),
                        None => self.wrong_fields = Some(format!("remove-all failure at {addr:#x} is {e:x?}")),
                    }
                }
                Outcome::RemoveAll(RefRemoveAll {
                    restored: report.restored,
                    overwritten: report.overwritten,
                    failed,
                })
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

/// A typed error as the reference reports it: the errno and, for memory
/// failures, which access failed (read or write, as the variant says).
fn error_result(e: &BreakpointError<MemFault>) -> RefResult {
    match e {
        BreakpointError::Sw(SwError::Read { addr, .. }) => RefResult::fault(*addr, false),
        BreakpointError::Sw(SwError::Write { addr, .. }) => RefResult::fault(*addr, true),
        e => RefResult::code(errno(e)),
    }
}

/// Whether the fields of the error answering `(ty, addr, len)` name that
/// request: `None` if they do, else what is wrong. (The reference's errno
/// carries no fields; the request itself is the expected value.)
fn wrong_fields(e: &BreakpointError<MemFault>, ty: u64, addr: u64, len: u64) -> Option<String> {
    let kind = match ty {
        r::GDB_BREAKPOINT_HW => Some(crate::HwKind::Execute),
        r::GDB_WATCHPOINT_WRITE => Some(crate::HwKind::Write),
        r::GDB_WATCHPOINT_ACCESS => Some(crate::HwKind::ReadWrite),
        _ => None,
    };
    // The breakpoint a hardware request names: execute breakpoints are 1 byte.
    let names_bp = |bp: &crate::HwBreakpoint| {
        let want_len = if ty == r::GDB_BREAKPOINT_HW { 1 } else { len };
        Some(bp.kind()) == kind && bp.addr() == addr && bp.len().bytes() == want_len
    };
    let ok = match e {
        BreakpointError::Hw(HwError::Misaligned { addr: a, len: l }) => *a == addr && *l == len,
        BreakpointError::Hw(HwError::BadLength { len: l }) => *l == len,
        BreakpointError::Hw(HwError::Unsupported { ty: t }) => u64::from(t.gdb_number()) == ty,
        BreakpointError::Hw(HwError::Full) => true,
        BreakpointError::Hw(HwError::AlreadyPresent { bp } | HwError::NotFound { bp }) => names_bp(bp),
        BreakpointError::UnknownType(t) => t.0 == ty,
        BreakpointError::Sw(SwError::NotFound { addr: a } | SwError::CountOverflow { addr: a }) => *a == addr,
        BreakpointError::Sw(SwError::Read { addr: a, source }) => *a == addr && source.addr == addr && !source.write,
        BreakpointError::Sw(SwError::Write { addr: a, source }) => *a == addr && source.addr == addr && source.write,
    };
    (!ok).then(|| format!("error {e:x?} does not name the request (type {ty}, address {addr:#x}, length {len:#x})"))
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
        Ok(Decision::Stop(Stop::Software { addr })) => {
            out.handle = 1;
            out.sw = Some(addr);
        }
        Ok(Decision::Reinject(e)) => out.inject = e.inject_flag().bits(),
        Err(crate::DecodeError::UnexpectedException { exception }) => {
            out.handle = -r::EINVAL;
            out.bad_exception = Some(exception);
        }
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
    if let Some(wrong) = &t.wrong_fields {
        return Err(Mismatch(wrong.clone()));
    }
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
        Lockstep::with_counts(mem, &[])
    }

    /// Both models over copies of `mem`, beginning with the software
    /// breakpoints and use counts of `counts` ([`RefSide::with_counts`]).
    pub fn with_counts(mem: TestMemory, counts: &[(u64, u32)]) -> Lockstep {
        let reference = RefSide::with_counts(mem, counts);
        Lockstep {
            typed: TypedSide::starting_like(&reference),
            reference,
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
