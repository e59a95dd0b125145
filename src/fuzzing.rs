//! The fuzz targets' bodies (features `reference` and `arbitrary`).
//!
//! `fuzz/fuzz_targets/{dr7,exit,sw}.rs` are one-line `fuzz_target!`s calling
//! [`dr7()`], [`exit()`] and [`sw()`]. Because the bodies live here, as ordinary
//! functions, `tests/fuzz_corpus.rs` replays the committed corpus through
//! exactly the same checks under plain `cargo test` on stable, and each
//! `tests/regression_*.rs` replays one find.
//!
//! Each target decodes its input with [`arbitrary`] into a case
//! ([`Dr7Case`], [`ExitCase`], [`SwCase`]) and checks it. A failed check
//! panics with what differed, followed by the case's `Debug`, which is a
//! runnable reproducer: paste it into a test. `to_bytes` turns a case back
//! into an input that decodes to it, so hand-made seeds are written as values.
//!
//! * [`dr7()`]: arbitrary [`Op`] sequences on the typed model and the reference
//!   side by side ([`Lockstep`]: outcome, registers, control flags, tables and
//!   memory after every step), over a memory that may fail one access; plus
//!   [`Dr7`]/[`Dr6`] round trips of two arbitrary `u64`s.
//! * [`exit()`]: arbitrary exits decoded against arbitrary applied
//!   configurations, built by operations or given as raw registers: decoding
//!   never panics, agrees with the reference and ignores the exit's `dr7`.
//! * [`sw()`]: the `int3` table over a memory that fails at arbitrary points: a
//!   failed operation changes nothing, and after a final remove-all on healthy
//!   memory every byte is what the guest last wrote.
//! * [`regions()`]: the region planner and [`crate::WatchSlots`] against a
//!   multiset reference (`src/fuzzing/regions.rs`).
//!
//! ```
//! use x86_debugreg::differential::Op;
//! use x86_debugreg::fuzzing::{self, Dr7Case};
//! let case = Dr7Case {
//!     dr7: 0x400,
//!     dr6: 0xffff_4ff0,
//!     fail_at: None,
//!     ops: vec![Op::Insert { ty: 0, addr: 0x10, len: 1 }, Op::RemoveAll],
//! };
//! assert_eq!(case.check(), Ok(()));
//! assert!(fuzzing::dr7(&case.to_bytes())); // the same case, from bytes
//! ```

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::vec::Vec;
use core::fmt;

use arbitrary::{Arbitrary, Unstructured};

use crate::differential::{decision, Lockstep, Mismatch, Op, TestMemory};

/// DR7's must-be-zero bits, hand-computed from the SDM (Vol. 3B §18.2.4):
/// bits 12, 14, 15 and 32–63. Written out rather than taken from
/// `dr7::DR7_RESERVED_MASK`, so a wrong constant cannot agree with itself
/// (`tests/sdm_tables.rs` checks both against the bit-by-bit table).
const SDM_DR7_MBZ: u64 = 0xffff_ffff_0000_d000;
/// DR7 bit 10, which reads as 1.
const SDM_DR7_FIXED1: u64 = 0x400;
/// DR6 at rest (SDM Vol. 3B §18.2.3): bits 4–11 and 16–31 set.
const SDM_DR6_AT_REST: u64 = 0xffff_0ff0;
/// The DR6 bits `Dr6::from_kvm` keeps: B0–B3 (0–3), BLD (11), BD (13), BS
/// (14), BT (15). RTM (16) is not trusted.
const SDM_DR6_KEPT: u64 = 0xe80f;
use crate::reference::{RefSwBreakpoint, Reference};
use crate::sw::{self, SwBreakpoints};
use crate::{decode, ControlFlags, DebugExit, Decision, DecodeError, Dr6, Dr7, GuestDebug, Slot, Stop};

/// Size of [`memory`].
pub const MEM_SIZE: usize = 0x40;
/// An address of [`memory`] whose reads fail.
pub const BAD_READ: u64 = 0x20;
/// An address of [`memory`] whose writes fail.
pub const BAD_WRITE: u64 = 0x21;
/// An address of [`memory`] that holds the guest's own `0xCC`.
pub const GUEST_INT3: u64 = 0x18;

/// The guest memory the `dr7` and `exit` targets start from (the property
/// suites' memory): [`MEM_SIZE`] bytes, one failing read, one failing
/// write, one guest `int3`; every address from [`MEM_SIZE`] on fails.
pub fn memory() -> TestMemory {
    let mut mem = TestMemory::new(MEM_SIZE);
    mem.bytes[GUEST_INT3 as usize] = sw::INT3;
    mem.bad_read.insert(BAD_READ);
    mem.bad_write.insert(BAD_WRITE);
    mem
}

/// Decodes `data` as a `T` (as libFuzzer's typed targets do).
fn parse<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(data)).ok()
}

/// Checks `case`, panicking with the failure and a reproducer.
fn run<C: fmt::Debug>(case: &C, check: impl FnOnce(&C) -> Result<(), Mismatch>) {
    if let Err(m) = check(case) {
        panic!("{m}\n\nreproducer:\n{case:?}");
    }
}

/// The `dr7` target. Returns whether the input is worth keeping in a corpus
/// (`false`: it does not decode, or describes no operation).
///
/// # Panics
/// If the typed model and the reference disagree, an invariant breaks or a
/// register round trip fails; the message ends with a reproducer.
pub fn dr7(data: &[u8]) -> bool {
    let Some(case) = parse::<Dr7Case>(data) else {
        return false;
    };
    run(&case, Dr7Case::check);
    !case.ops.is_empty()
}

/// The `exit` target. Returns whether the input is worth keeping (`false`:
/// it does not decode, or has no exit).
///
/// # Panics
/// If decoding panics, disagrees with the reference, depends on the exit's
/// `dr7` or answers something impossible; the message ends with a reproducer.
pub fn exit(data: &[u8]) -> bool {
    let Some(case) = parse::<ExitCase>(data) else {
        return false;
    };
    run(&case, ExitCase::check);
    !case.exits.is_empty()
}

/// The `sw` target. Returns whether the input is worth keeping (`false`: it
/// does not decode, or describes no operation).
///
/// # Panics
/// If a failed operation changed something, a successful one did the wrong
/// thing, or memory is not the guest's after the final remove-all; the
/// message ends with a reproducer.
pub fn sw(data: &[u8]) -> bool {
    let Some(case) = parse::<SwCase>(data) else {
        return false;
    };
    run(&case, SwCase::check);
    !case.ops.is_empty()
}

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Mismatch(format!($($msg)+)));
        }
    };
}

// ---------------------------------------------------------------- dr7 ----

/// The `dr7` target's input.
#[derive(Clone, PartialEq, Eq, Arbitrary)]
pub struct Dr7Case {
    /// A value for the [`Dr7`] round trips.
    pub dr7: u64,
    /// A value for the [`Dr6`] round trips.
    pub dr6: u64,
    /// Fail this memory access (counting reads and writes from 0) on both
    /// sides; the two models must make the same accesses in the same order.
    pub fail_at: Option<u8>,
    /// Operations for [`Lockstep`], over [`memory`]; a final
    /// [`Op::RemoveAll`] follows.
    pub ops: Vec<Op>,
}

impl Dr7Case {
    /// Runs the case.
    ///
    /// # Errors
    /// The first failed round trip, difference or broken invariant.
    pub fn check(&self) -> Result<(), Mismatch> {
        check_dr7_word(self.dr7)?;
        check_dr6_word(self.dr6)?;
        let mut mem = memory();
        mem.fail_at = self.fail_at.map(u64::from);
        let mut both = Lockstep::new(mem);
        for (i, op) in self.ops.iter().chain([&Op::RemoveAll]).enumerate() {
            both.step(op).map_err(|m| Mismatch(format!("op {i}: {m}")))?;
        }
        Ok(())
    }

    /// An input that decodes to this case.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.dr7.encode(&mut out);
        self.dr6.encode(&mut out);
        self.fail_at.encode(&mut out);
        self.ops.encode(&mut out);
        out
    }
}

impl fmt::Debug for Dr7Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("use x86_debugreg::differential::Op;\nuse x86_debugreg::DebugExit;\n")?;
        f.write_str("let case = x86_debugreg::fuzzing::Dr7Case {\n")?;
        writeln!(f, "    dr7: {:#x},\n    dr6: {:#x},", self.dr7, self.dr6)?;
        writeln!(f, "    fail_at: {:?},", self.fail_at)?;
        write_ops(f, "ops", &self.ops)?;
        f.write_str("};\nassert_eq!(case.check(), Ok(()));")
    }
}

/// The properties `tests/round_trips.rs` checks, for one `u64`: `from_bits`
/// keeps every bit; `new_checked` accepts exactly the values without reserved
/// bits and only adds bit 10; the per-slot accessors read the SDM's bits.
///
/// # Errors
/// The first property that fails.
pub fn check_dr7_word(v: u64) -> Result<(), Mismatch> {
    let d = Dr7::from_bits(v);
    ensure!(
        d.into_bits() == v,
        "Dr7::from_bits({v:#x}) reads back {:#x}",
        d.into_bits()
    );
    ensure!(u64::from(Dr7::from(v)) == v, "Dr7::from({v:#x}) does not round-trip");
    match Dr7::new_checked(v) {
        Ok(c) => {
            ensure!(v & SDM_DR7_MBZ == 0, "new_checked accepted reserved bits in {v:#x}");
            ensure!(
                c.into_bits() == v | SDM_DR7_FIXED1,
                "new_checked({v:#x}) = {:#x}",
                c.into_bits()
            );
        }
        Err(e) => ensure!(
            e.reserved == v & SDM_DR7_MBZ && e.reserved != 0 && e.value == v,
            "new_checked({v:#x}) rejected with {e:x?}"
        ),
    }
    for slot in Slot::ALL {
        let n = u32::from(slot.get());
        ensure!(d.local(slot) == (v >> (2 * n) & 1 == 1), "L{n} of {v:#x}");
        ensure!(d.global(slot) == (v >> (2 * n + 1) & 1 == 1), "G{n} of {v:#x}");
        ensure!(
            u64::from(d.condition(slot).into_bits()) == v >> (16 + 4 * n) & 3,
            "R/W{n} of {v:#x}"
        );
        ensure!(
            u64::from(d.len(slot).into_bits()) == v >> (18 + 4 * n) & 3,
            "LEN{n} of {v:#x}"
        );
        let again = d.with_slot(slot, d.condition(slot), d.len(slot)).into_bits();
        ensure!(
            again == v | 2 << (2 * n),
            "re-programming slot {n} of {v:#x} with its own fields gives {again:#x}"
        );
    }
    Ok(())
}

/// The DR6 properties `tests/round_trips.rs` checks, for one `u64`:
/// `from_bits` keeps every bit; `from_kvm` keeps the status bits except RTM,
/// sets every other bit to its at-rest value, is idempotent, and reports
/// exactly B0–B3 and BS.
///
/// # Errors
/// The first property that fails.
pub fn check_dr6_word(v: u64) -> Result<(), Mismatch> {
    ensure!(
        Dr6::from_bits(v).into_bits() == v,
        "Dr6::from_bits({v:#x}) does not round-trip"
    );
    let n = Dr6::from_kvm(v);
    ensure!(
        n.into_bits() == (v & SDM_DR6_KEPT) | (SDM_DR6_AT_REST & !SDM_DR6_KEPT),
        "Dr6::from_kvm({v:#x}) = {:#x}",
        n.into_bits()
    );
    ensure!(
        Dr6::from_kvm(n.into_bits()) == n,
        "Dr6::from_kvm is not idempotent on {v:#x}"
    );
    let mask = n.hits().fold(0u8, |m, s| m | 1 << s.get());
    ensure!(mask == (v & 0xf) as u8, "Dr6::from_kvm({v:#x}) hits {mask:#x}");
    ensure!(n.bs() == (v & 1 << 14 != 0), "Dr6::from_kvm({v:#x}).bs()");
    Ok(())
}

// --------------------------------------------------------------- exit ----

/// The configuration a vCPU ran with when it exited.
#[derive(Clone, Debug, PartialEq, Eq, Arbitrary)]
pub enum Applied {
    /// These operations on [`memory`] (both models in [`Lockstep`]), then
    /// [`Op::Apply`].
    Built(Vec<Op>),
    /// Raw `kvm_guest_debug` contents and software-breakpoint addresses, as a
    /// VMM might hold after any history (or a buggy peer).
    Raw {
        /// `control`, any bits.
        control: u32,
        /// `debugreg`, any values.
        debugreg: [u64; 8],
        /// Addresses with a software breakpoint.
        sw: Vec<u64>,
    },
}

/// The `exit` target's input.
#[derive(Clone, PartialEq, Eq, Arbitrary)]
pub struct ExitCase {
    /// What the vCPU ran with.
    pub applied: Applied,
    /// The exits to decode.
    pub exits: Vec<DebugExit>,
}

impl ExitCase {
    /// Runs the case.
    ///
    /// # Errors
    /// The first difference from the reference, or an impossible answer.
    pub fn check(&self) -> Result<(), Mismatch> {
        match &self.applied {
            Applied::Built(ops) => {
                let mut both = Lockstep::new(memory());
                for (i, op) in ops.iter().chain([&Op::Apply]).enumerate() {
                    both.step(op).map_err(|m| Mismatch(format!("op {i}: {m}")))?;
                }
                for (i, exit) in self.exits.iter().enumerate() {
                    both.step(&Op::Decode(*exit))
                        .map_err(|m| Mismatch(format!("exit {i}: {m}")))?;
                    let (state, applied) = (&both.typed.state, &both.typed.applied);
                    check_decoded(exit, |e| state.decode(e, applied))
                        .map_err(|m| Mismatch(format!("exit {i}: {m}")))?;
                }
            }
            Applied::Raw { control, debugreg, sw } => {
                let applied = crate::Applied::was_set(GuestDebug {
                    control: ControlFlags::from_bits_retain(*control),
                    debugreg: *debugreg,
                });
                let mut reference = Reference::new();
                reference.sw_breakpoints = sw
                    .iter()
                    .map(|&pc| RefSwBreakpoint {
                        pc,
                        saved_insn: 0,
                        use_count: 1,
                    })
                    .collect();
                let is_sw = |pc: u64| sw.contains(&pc);
                for (i, exit) in self.exits.iter().enumerate() {
                    let typed = decision(decode(exit, &applied, is_sw));
                    let expected = reference.debug_exit(exit.exception, exit.pc, exit.dr6, *control, *debugreg);
                    ensure!(
                        typed == expected,
                        "exit {i} {exit:x?}: typed {typed:x?} != reference {expected:x?}"
                    );
                    check_decoded(exit, |e| decode(e, &applied, is_sw))
                        .map_err(|m| Mismatch(format!("exit {i}: {m}")))?;
                }
            }
        }
        Ok(())
    }

    /// An input that decodes to this case.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.applied {
            Applied::Built(ops) => {
                tag(&mut out, 0, 2);
                ops.encode(&mut out);
            }
            Applied::Raw { control, debugreg, sw } => {
                tag(&mut out, 1, 2);
                control.encode(&mut out);
                for r in debugreg {
                    r.encode(&mut out);
                }
                sw.encode(&mut out);
            }
        }
        self.exits.encode(&mut out);
        out
    }
}

/// Checks what the reference cannot: the answer does not depend on the exit's
/// `dr7`, and it is possible for the exit (the vector matches, a software stop
/// is at `pc`, every hit slot has its B-bit, a debug stop has a reason).
fn check_decoded(
    exit: &DebugExit,
    decode: impl Fn(&DebugExit) -> Result<Decision, DecodeError>,
) -> Result<(), Mismatch> {
    let answer = decode(exit);
    let other = decode(&DebugExit {
        dr7: !exit.dr7,
        ..*exit
    });
    ensure!(answer == other, "{exit:x?}: the exit's dr7 changed the answer");
    let possible = match answer {
        Ok(Decision::Stop(Stop::Software { addr })) => exit.exception == 3 && addr == exit.pc,
        Ok(Decision::Stop(Stop::Debug { single_step, hits })) => {
            exit.exception == 1
                && (single_step || !hits.is_empty())
                && hits.iter().all(|h| exit.dr6 & 1 << h.slot.get() != 0)
        }
        Ok(Decision::Reinject(e)) => e.vector() == exit.exception,
        Err(DecodeError::UnexpectedException { exception }) => {
            exception == exit.exception && exception != 1 && exception != 3
        }
    };
    ensure!(possible, "{exit:x?}: impossible answer {answer:x?}");
    Ok(())
}

impl fmt::Debug for ExitCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("use x86_debugreg::differential::Op;\nuse x86_debugreg::fuzzing::{Applied, ExitCase};\n")?;
        f.write_str("use x86_debugreg::DebugExit;\nlet case = ExitCase {\n")?;
        match &self.applied {
            Applied::Built(ops) => {
                f.write_str("    applied: Applied::Built(vec![\n")?;
                for op in ops {
                    writeln!(f, "        {},", OpSrc(op))?;
                }
                f.write_str("    ]),\n")?;
            }
            Applied::Raw { control, debugreg, sw } => {
                writeln!(f, "    applied: Applied::Raw {{\n        control: {control:#x},")?;
                writeln!(f, "        debugreg: {debugreg:#x?},")?;
                writeln!(f, "        sw: vec!{sw:#x?},\n    }},")?;
            }
        }
        f.write_str("    exits: vec![\n")?;
        for e in &self.exits {
            writeln!(f, "        {},", ExitSrc(e))?;
        }
        f.write_str("    ],\n};\nassert_eq!(case.check(), Ok(()));")
    }
}

// ----------------------------------------------------------------- sw ----

/// Size of the `sw` target's memory: `u8` addresses from here on fail.
pub const SW_MEM_SIZE: usize = 0xc0;

/// One step of the `sw` target. `fault: Some(k)` fails the `k`-th memory
/// access (from 0) of that operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum SwOp {
    /// [`SwBreakpoints::insert`].
    Insert {
        /// Address.
        addr: u8,
        /// Access of this operation to fail.
        fault: Option<u8>,
    },
    /// [`SwBreakpoints::remove`].
    Remove {
        /// Address.
        addr: u8,
        /// Access of this operation to fail.
        fault: Option<u8>,
    },
    /// [`SwBreakpoints::remove_all`].
    RemoveAll {
        /// Access of this operation to fail.
        fault: Option<u8>,
    },
    /// The guest writes a byte (perhaps over an `int3`).
    GuestWrite {
        /// Address.
        addr: u8,
        /// Value.
        value: u8,
    },
    /// Reads of `addr` fail from now on.
    FailReads {
        /// Address.
        addr: u8,
    },
    /// Writes to `addr` fail from now on.
    FailWrites {
        /// Address.
        addr: u8,
    },
    /// Every address works again.
    Heal,
}

/// The `sw` target's input.
#[derive(Clone, PartialEq, Eq, Arbitrary)]
pub struct SwCase {
    /// The operations, over [`TestMemory::new`]`(`[`SW_MEM_SIZE`]`)`.
    pub ops: Vec<SwOp>,
}

/// The `sw` target's state: the table, its memory, and the guest's view.
struct SwRun {
    table: SwBreakpoints,
    mem: TestMemory,
    /// Memory as the guest sees it (without our `0xCC`s).
    guest: Vec<u8>,
    /// Entries whose byte the guest wrote over.
    tampered: BTreeSet<u64>,
}

impl SwCase {
    /// Runs the case, then heals memory and removes everything.
    ///
    /// # Errors
    /// The first failed operation that changed something, wrong effect of a
    /// successful one, broken invariant, or byte that differs from the
    /// guest's after the final remove-all.
    pub fn check(&self) -> Result<(), Mismatch> {
        let mem = TestMemory::new(SW_MEM_SIZE);
        let mut run = SwRun {
            table: SwBreakpoints::new(),
            guest: mem.bytes.clone(),
            mem,
            tampered: BTreeSet::new(),
        };
        for (i, op) in self.ops.iter().enumerate() {
            run.apply(op)
                .and_then(|()| run.invariants())
                .map_err(|m| Mismatch(format!("op {i} {op:x?}: {m}")))?;
        }
        run.mem.bad_read.clear();
        run.mem.bad_write.clear();
        let report = run.table.remove_all(&mut run.mem);
        ensure!(
            report.is_complete(),
            "final remove-all on healthy memory failed: {report:x?}"
        );
        ensure!(run.table.is_empty(), "table not empty after remove-all");
        if let Some(i) = (0..SW_MEM_SIZE).find(|&i| run.mem.bytes[i] != run.guest[i]) {
            return Err(Mismatch(format!(
                "after the final remove-all {i:#x} holds {:#x}, the guest's byte is {:#x}",
                run.mem.bytes[i], run.guest[i]
            )));
        }
        Ok(())
    }

    /// An input that decodes to this case.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.ops.encode(&mut out);
        out
    }
}

impl fmt::Debug for SwCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("use x86_debugreg::fuzzing::{SwCase, SwOp};\nlet case = SwCase {\n    ops: vec![\n")?;
        for op in &self.ops {
            writeln!(f, "        {},", SwOpSrc(op))?;
        }
        f.write_str("    ],\n};\nassert_eq!(case.check(), Ok(()));")
    }
}

impl SwRun {
    fn with_fault<T>(&mut self, fault: Option<u8>, f: impl FnOnce(&mut SwBreakpoints, &mut TestMemory) -> T) -> T {
        self.mem.fail_at = fault.map(|k| self.mem.accesses + u64::from(k));
        let out = f(&mut self.table, &mut self.mem);
        self.mem.fail_at = None;
        out
    }

    fn healthy(&self, addr: u64) -> bool {
        addr < SW_MEM_SIZE as u64 && !self.mem.bad_read.contains(&addr) && !self.mem.bad_write.contains(&addr)
    }

    /// Every byte but `except` is as in `before`.
    fn only_changed(&self, before: &[u8], except: Option<u64>) -> Result<(), Mismatch> {
        let changed = (0..SW_MEM_SIZE).find(|&i| Some(i as u64) != except && self.mem.bytes[i] != before[i]);
        ensure!(changed.is_none(), "{changed:x?} changed");
        Ok(())
    }

    fn apply(&mut self, op: &SwOp) -> Result<(), Mismatch> {
        let (table, bytes) = (self.table.clone(), self.mem.bytes.clone());
        let byte = |a: u64| usize::try_from(a).ok().and_then(|i| bytes.get(i).copied());
        match *op {
            SwOp::Insert { addr, fault } => {
                let addr = u64::from(addr);
                let entry = table.get(addr);
                match self.with_fault(fault, |t, m| t.insert(m, addr)) {
                    Err(e) => {
                        ensure!(
                            self.table == table && self.mem.bytes == bytes,
                            "failed ({e:x?}) but changed state"
                        );
                        ensure!(
                            fault.is_some() || !self.healthy(addr),
                            "failed ({e:x?}) on healthy memory"
                        );
                    }
                    Ok(sw::SwInserted::Patched { saved }) => {
                        ensure!(entry.is_none() && Some(saved) == byte(addr), "patched over {entry:x?}");
                        ensure!(self.mem.peek(addr) == Some(sw::INT3), "no int3 written");
                        ensure!(
                            self.table.get(addr) == Some(sw::SwEntry { saved, count: 1 }),
                            "not recorded"
                        );
                        self.only_changed(&bytes, Some(addr))?;
                    }
                    Ok(sw::SwInserted::Counted { count }) => {
                        ensure!(
                            entry.map(|e| e.count + 1) == Some(count),
                            "counted {count} over {entry:x?}"
                        );
                        ensure!(self.table.get(addr).map(|e| e.count) == Some(count), "count not kept");
                        self.only_changed(&bytes, None)?;
                    }
                }
            }
            SwOp::Remove { addr, fault } => {
                let addr = u64::from(addr);
                let entry = table.get(addr);
                let result = self.with_fault(fault, |t, m| t.remove(m, addr));
                match (result, entry) {
                    (Err(e), _) => {
                        ensure!(
                            self.table == table && self.mem.bytes == bytes,
                            "failed ({e:x?}) but changed state"
                        );
                        let not_found = matches!(e, sw::SwError::NotFound { .. });
                        ensure!(not_found == entry.is_none(), "failed with {e:x?} over {entry:x?}");
                        ensure!(
                            not_found || fault.is_some() || !self.healthy(addr),
                            "failed ({e:x?}) on healthy memory"
                        );
                    }
                    (Ok(removed), None) => return Err(Mismatch(format!("{removed:x?} without an entry"))),
                    (Ok(sw::SwRemoved::Counted { remaining }), Some(e)) => {
                        ensure!(remaining + 1 == e.count, "{remaining} remaining of {e:x?}");
                        self.only_changed(&bytes, None)?;
                    }
                    (Ok(sw::SwRemoved::Restored), Some(e)) => {
                        ensure!(e.count == 1 && byte(addr) == Some(sw::INT3), "restored {e:x?}");
                        ensure!(self.mem.peek(addr) == Some(e.saved), "byte not restored");
                        self.only_changed(&bytes, Some(addr))?;
                    }
                    (Ok(sw::SwRemoved::GuestOverwrote { found }), Some(e)) => {
                        ensure!(
                            e.count == 1 && found != sw::INT3 && Some(found) == byte(addr),
                            "{found:#x}, {e:x?}"
                        );
                        self.only_changed(&bytes, None)?;
                    }
                }
                if !self.table.contains(addr) {
                    self.tampered.remove(&addr);
                }
            }
            SwOp::RemoveAll { fault } => {
                let report = self.with_fault(fault, |t, m| t.remove_all(m));
                let failed: Vec<u64> = report.failed.iter().map(|(a, _)| *a).collect();
                let kept: Vec<u64> = self.table.iter().map(|(a, _)| a).collect();
                ensure!(failed == kept, "failed {failed:x?} but kept {kept:x?}");
                ensure!(
                    report.restored + report.overwritten.len() + failed.len() == table.len(),
                    "{report:x?} does not account for {} entries",
                    table.len()
                );
                for (addr, e) in table.iter() {
                    let now = self.mem.peek(addr);
                    if failed.contains(&addr) {
                        ensure!(self.table.get(addr) == Some(e), "failed entry {addr:#x} changed");
                        ensure!(now == byte(addr), "failed entry {addr:#x}: memory changed");
                    } else if report.overwritten.contains(&addr) {
                        ensure!(
                            now == byte(addr) && now != Some(sw::INT3),
                            "overwritten {addr:#x} touched"
                        );
                    } else {
                        ensure!(
                            byte(addr) == Some(sw::INT3) && now == Some(e.saved),
                            "{addr:#x} not restored"
                        );
                    }
                }
                if let Some(i) = (0..SW_MEM_SIZE).find(|&i| !table.contains(i as u64) && self.mem.bytes[i] != bytes[i])
                {
                    return Err(Mismatch(format!("{i:#x} changed without an entry")));
                }
                self.tampered.retain(|a| kept.contains(a));
            }
            SwOp::GuestWrite { addr, value } => {
                let i = usize::from(addr);
                if i < SW_MEM_SIZE {
                    self.mem.bytes[i] = value;
                    self.guest[i] = match self.table.get(u64::from(addr)) {
                        // The guest's own 0xCC over ours cannot be seen: the
                        // last remove restores the saved byte.
                        Some(e) if value == sw::INT3 => e.saved,
                        _ => value,
                    };
                    if self.table.contains(u64::from(addr)) {
                        self.tampered.insert(u64::from(addr));
                    }
                }
            }
            SwOp::FailReads { addr } => {
                self.mem.bad_read.insert(u64::from(addr));
            }
            SwOp::FailWrites { addr } => {
                self.mem.bad_write.insert(u64::from(addr));
            }
            SwOp::Heal => {
                self.mem.bad_read.clear();
                self.mem.bad_write.clear();
            }
        }
        Ok(())
    }

    /// Every entry has a count and, unless the guest wrote over it, `0xCC` in
    /// memory over the guest's byte; every other byte is the guest's.
    fn invariants(&self) -> Result<(), Mismatch> {
        for (addr, e) in self.table.iter() {
            ensure!(e.count >= 1, "entry {addr:#x} has count 0");
            let guest = usize::try_from(addr).ok().and_then(|i| self.guest.get(i).copied());
            ensure!(
                self.tampered.contains(&addr) || (self.mem.peek(addr) == Some(sw::INT3) && guest == Some(e.saved)),
                "entry {addr:#x} {e:x?}: memory {:x?}, guest's byte {guest:x?}",
                self.mem.peek(addr)
            );
        }
        let stray = (0..SW_MEM_SIZE).find(|&i| !self.table.contains(i as u64) && self.mem.bytes[i] != self.guest[i]);
        ensure!(
            stray.is_none(),
            "{stray:x?} differs from the guest's byte without an entry"
        );
        Ok(())
    }
}

// ------------------------------------------------------------ sources ----

/// An [`Op`] as Rust source.
struct OpSrc<'a>(&'a Op);

impl fmt::Display for OpSrc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Op::Insert { ty, addr, len } => write!(f, "Op::Insert {{ ty: {ty}, addr: {addr:#x}, len: {len:#x} }}"),
            Op::Remove { ty, addr, len } => write!(f, "Op::Remove {{ ty: {ty}, addr: {addr:#x}, len: {len:#x} }}"),
            Op::RemoveAll => f.write_str("Op::RemoveAll"),
            Op::SingleStep(on) => write!(f, "Op::SingleStep({on})"),
            Op::GuestWrite { addr, value } => write!(f, "Op::GuestWrite {{ addr: {addr:#x}, value: {value:#x} }}"),
            Op::Poison { addr, reads, writes } => {
                write!(f, "Op::Poison {{ addr: {addr:#x}, reads: {reads}, writes: {writes} }}")
            }
            Op::Apply => f.write_str("Op::Apply"),
            Op::Decode(e) => write!(f, "Op::Decode({})", ExitSrc(e)),
        }
    }
}

/// A [`SwOp`] as Rust source.
struct SwOpSrc<'a>(&'a SwOp);

impl fmt::Display for SwOpSrc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            SwOp::Insert { addr, fault } => write!(f, "SwOp::Insert {{ addr: {addr:#x}, fault: {fault:?} }}"),
            SwOp::Remove { addr, fault } => write!(f, "SwOp::Remove {{ addr: {addr:#x}, fault: {fault:?} }}"),
            SwOp::RemoveAll { fault } => write!(f, "SwOp::RemoveAll {{ fault: {fault:?} }}"),
            SwOp::GuestWrite { addr, value } => write!(f, "SwOp::GuestWrite {{ addr: {addr:#x}, value: {value:#x} }}"),
            SwOp::FailReads { addr } => write!(f, "SwOp::FailReads {{ addr: {addr:#x} }}"),
            SwOp::FailWrites { addr } => write!(f, "SwOp::FailWrites {{ addr: {addr:#x} }}"),
            SwOp::Heal => f.write_str("SwOp::Heal"),
        }
    }
}

/// A [`DebugExit`] as Rust source.
struct ExitSrc<'a>(&'a DebugExit);

impl fmt::Display for ExitSrc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DebugExit {
            exception,
            pc,
            dr6,
            dr7,
        } = self.0;
        write!(
            f,
            "DebugExit {{ exception: {exception}, pc: {pc:#x}, dr6: {dr6:#x}, dr7: {dr7:#x} }}"
        )
    }
}

fn write_ops(f: &mut fmt::Formatter<'_>, name: &str, ops: &[Op]) -> fmt::Result {
    writeln!(f, "    {name}: vec![")?;
    for op in ops {
        writeln!(f, "        {},", OpSrc(op))?;
    }
    f.write_str("    ],\n")
}

// ----------------------------------------------------------- encoding ----

/// The inverse of `arbitrary`'s decoding for the types the cases use
/// (arbitrary 1.x: integers little-endian, `bool` the low bit of a byte,
/// `Option` a `bool` then the value, a collection `true`-prefixed elements then
/// `false`, an enum a `u32` scaled onto its variants). `tests/fuzz_corpus.rs`
/// checks that every hand-made seed decodes back to itself.
trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

/// Writes the discriminant `u32` that selects variant `index` of `count`
/// (the derive picks `(u32 as u64 * count) >> 32`).
fn tag(out: &mut Vec<u8>, index: u64, count: u64) {
    let scaled = (index << 32).div_ceil(count);
    u32::try_from(scaled).unwrap_or(u32::MAX).encode(out);
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u32, u64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.is_some().encode(out);
        if let Some(v) = self {
            v.encode(out);
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            true.encode(out);
            v.encode(out);
        }
        false.encode(out);
    }
}

impl Encode for DebugExit {
    fn encode(&self, out: &mut Vec<u8>) {
        self.exception.encode(out);
        self.pc.encode(out);
        self.dr6.encode(out);
        self.dr7.encode(out);
    }
}

impl Encode for Op {
    fn encode(&self, out: &mut Vec<u8>) {
        // Variants in declaration order; the match is exhaustive, so a new
        // variant stops the build here until it is given its index.
        const N: u64 = 8;
        match *self {
            Op::Insert { ty, addr, len } => {
                tag(out, 0, N);
                [ty, addr, len].iter().for_each(|v| v.encode(out));
            }
            Op::Remove { ty, addr, len } => {
                tag(out, 1, N);
                [ty, addr, len].iter().for_each(|v| v.encode(out));
            }
            Op::RemoveAll => tag(out, 2, N),
            Op::SingleStep(on) => {
                tag(out, 3, N);
                on.encode(out);
            }
            Op::GuestWrite { addr, value } => {
                tag(out, 4, N);
                addr.encode(out);
                value.encode(out);
            }
            Op::Poison { addr, reads, writes } => {
                tag(out, 5, N);
                addr.encode(out);
                reads.encode(out);
                writes.encode(out);
            }
            Op::Apply => tag(out, 6, N),
            Op::Decode(e) => {
                tag(out, 7, N);
                e.encode(out);
            }
        }
    }
}

impl Encode for SwOp {
    fn encode(&self, out: &mut Vec<u8>) {
        const N: u64 = 7;
        match *self {
            SwOp::Insert { addr, fault } => {
                tag(out, 0, N);
                addr.encode(out);
                fault.encode(out);
            }
            SwOp::Remove { addr, fault } => {
                tag(out, 1, N);
                addr.encode(out);
                fault.encode(out);
            }
            SwOp::RemoveAll { fault } => {
                tag(out, 2, N);
                fault.encode(out);
            }
            SwOp::GuestWrite { addr, value } => {
                tag(out, 3, N);
                addr.encode(out);
                value.encode(out);
            }
            SwOp::FailReads { addr } => {
                tag(out, 4, N);
                addr.encode(out);
            }
            SwOp::FailWrites { addr } => {
                tag(out, 5, N);
                addr.encode(out);
            }
            SwOp::Heal => tag(out, 6, N),
        }
    }
}

/// Decodes `data` as a [`Dr7Case`] without running it (`None` if it does not
/// decode): for tools and tests that print or rewrite corpus files.
pub fn parse_dr7(data: &[u8]) -> Option<Dr7Case> {
    parse(data)
}

/// Decodes `data` as an [`ExitCase`] without running it.
pub fn parse_exit(data: &[u8]) -> Option<ExitCase> {
    parse(data)
}

/// Decodes `data` as a [`SwCase`] without running it.
pub fn parse_sw(data: &[u8]) -> Option<SwCase> {
    parse(data)
}

// ------------------------------------------------------------ regions ----

mod regions;
pub use regions::{parse_regions, regions, RegionOp, RegionsCase};
