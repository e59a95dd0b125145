//! The `regions` target: the region planner and [`WatchSlots`] under
//! arbitrary operations, against a multiset reference written here.
//!
//! * [`RegionOp::Plan`]: any `(addr, len)`, of any size: the typed error for
//!   an empty or wrapping region (decided in 128-bit arithmetic); otherwise
//!   the pieces are aligned, of a length the mode allows, contiguous from
//!   `addr`, cover exactly the region (checked in full up to 4096 pieces;
//!   beyond that the first 64 and the count's bounds), and the count equals
//!   [`region::slots_needed`].
//! * [`RegionOp::Insert`] / [`RegionOp::Remove`] / [`RegionOp::RemoveSet`] /
//!   [`RegionOp::Clear`]: the outcome is the reference's (a multiset of
//!   regions; the slots it requires are the distinct pieces of all of them,
//!   planned by its own greedy in 128-bit arithmetic); a failed operation
//!   changes nothing; after every step the slots hold exactly the required
//!   pieces with their user counts, at most four, a piece in use never moves,
//!   and DR0–3/DR7 are what the SDM's bit positions say.
//! * [`RegionOp::Stop`]: a hit mask maps to exactly the distinct watchpoints
//!   owning a piece of a hit slot, with their own address and length; a read
//!   watchpoint reports a read exactly when the bytes did not change.
//!
//! ```
//! use x86_debugreg::fuzzing::{self, RegionOp, RegionsCase};
//! use x86_debugreg::region::Mode;
//! use x86_debugreg::watch::WatchKind;
//! let case = RegionsCase {
//!     mode: Mode::Long,
//!     ops: vec![
//!         RegionOp::Insert { kind: WatchKind::Write, addr: 0x1003, len: 6 },
//!         RegionOp::Stop { mask: 0b0010, changed: None },
//!     ],
//! };
//! assert_eq!(case.check(), Ok(()));
//! assert!(fuzzing::regions(&case.to_bytes()));
//! ```

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use arbitrary::Arbitrary;

use super::{parse, run, tag, Encode};
use crate::differential::Mismatch;
use crate::predict::SlotMask;
use crate::region::{self, Mode, PlanError};
use crate::watch::{Report, SlotUse, Watch, WatchError, WatchKind, WatchSlots};
use crate::HwKind;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Mismatch(format!($($msg)+)));
        }
    };
}

/// The `regions` target. Returns whether the input is worth keeping (`false`:
/// it does not decode, or has no operation).
///
/// # Panics
/// If the planner or the slot table breaks a rule or disagrees with the
/// reference; the message ends with a reproducer.
pub fn regions(data: &[u8]) -> bool {
    let Some(case) = parse::<RegionsCase>(data) else {
        return false;
    };
    run(&case, RegionsCase::check);
    !case.ops.is_empty()
}

/// Decodes `data` as a [`RegionsCase`] without running it.
pub fn parse_regions(data: &[u8]) -> Option<RegionsCase> {
    parse(data)
}

/// One operation of the `regions` target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Arbitrary)]
pub enum RegionOp {
    /// Plan any region (nothing is inserted).
    Plan {
        /// First byte.
        addr: u64,
        /// Length, any.
        len: u64,
    },
    /// Insert a watchpoint (length 0 is refused as empty).
    Insert {
        /// Its kind.
        kind: WatchKind,
        /// First byte.
        addr: u64,
        /// Length.
        len: u8,
    },
    /// Remove a watchpoint, set or not.
    Remove {
        /// Its kind.
        kind: WatchKind,
        /// First byte.
        addr: u64,
        /// Length.
        len: u8,
    },
    /// Remove the `index`-th watchpoint set (mod their number; nothing if none).
    RemoveSet {
        /// Which.
        index: u8,
    },
    /// A stop with B-bits `mask` (low four bits) against the current slots;
    /// read watchpoints get their saved bytes (all `0`) and current bytes
    /// (the same, or with byte 0 set to `changed`).
    Stop {
        /// DR6 B0–B3.
        mask: u8,
        /// The first watched byte's new value (`None`: unchanged).
        changed: Option<u8>,
    },
    /// Remove every watchpoint.
    Clear,
}

/// The `regions` target's input.
#[derive(Clone, PartialEq, Eq, Arbitrary)]
pub struct RegionsCase {
    /// The guest's mode (8-byte pieces or not).
    pub mode: Mode,
    /// The operations, on a fresh [`WatchSlots`].
    pub ops: Vec<RegionOp>,
}

/// A slot's contents: `(addr, bytes, R/W code)`.
type Content = (u64, u64, u8);

/// The reference's planner: at each address the largest allowed length that
/// is aligned there and fits, in 128-bit arithmetic.
fn reference_pieces(addr: u64, len: u64, mode: Mode) -> Vec<(u64, u64)> {
    let widest: u128 = match mode {
        Mode::Long => 8,
        Mode::Legacy => 4,
    };
    let (mut at, end) = (u128::from(addr), u128::from(addr) + u128::from(len));
    let mut out = Vec::new();
    while at < end {
        let mut s = widest;
        while at % s != 0 || at + s > end {
            s /= 2;
        }
        out.push((at as u64, s as u64));
        at += s;
    }
    out
}

/// The R/W code of a kind's slots (SDM Vol. 3B §18.2.4): a read watchpoint
/// is read/write.
fn rw_code(kind: WatchKind) -> u8 {
    match kind {
        WatchKind::Execute => 0b00,
        WatchKind::Write => 0b01,
        WatchKind::Read | WatchKind::ReadWrite => 0b11,
    }
}

/// A user watchpoint in the reference: kind, addr, len (1 for execute).
type RefWatch = (WatchKind, u64, u64);

fn ref_watch(kind: WatchKind, addr: u64, len: u8) -> RefWatch {
    (kind, addr, if kind == WatchKind::Execute { 1 } else { u64::from(len) })
}

fn contents((kind, addr, len): RefWatch, mode: Mode) -> Vec<Content> {
    reference_pieces(addr, len, mode)
        .into_iter()
        .map(|(a, n)| (a, n, rw_code(kind)))
        .collect()
}

/// The multiset reference.
#[derive(Clone, Debug, Default)]
struct Reference {
    /// Every insertion still standing, in order.
    set: Vec<RefWatch>,
}

impl Reference {
    fn required(&self, mode: Mode) -> BTreeMap<Content, u64> {
        let mut users = BTreeMap::new();
        for &w in &self.set {
            for c in contents(w, mode) {
                *users.entry(c).or_insert(0) += 1;
            }
        }
        users
    }
}

fn content_of(u: &SlotUse) -> Content {
    let rw = match u.breakpoint.kind() {
        HwKind::Execute => 0b00,
        HwKind::Write => 0b01,
        HwKind::ReadWrite => 0b11,
    };
    (u.breakpoint.addr(), u.breakpoint.len().bytes(), rw)
}

impl RegionsCase {
    /// Runs the case.
    ///
    /// # Errors
    /// The first broken rule or difference from the reference.
    pub fn check(&self) -> Result<(), Mismatch> {
        let mut model = WatchSlots::new(self.mode);
        let mut reference = Reference::default();
        for (i, op) in self.ops.iter().enumerate() {
            self.step(&mut model, &mut reference, *op)
                .map_err(|m| Mismatch(format!("op {i} {op:x?}: {m}")))?;
        }
        Ok(())
    }

    fn step(&self, model: &mut WatchSlots, reference: &mut Reference, op: RegionOp) -> Result<(), Mismatch> {
        let mode = self.mode;
        let before = model.clone();
        let failed = match op {
            RegionOp::Plan { addr, len } => {
                check_plan(addr, len, mode)?;
                false
            }
            RegionOp::Insert { kind, addr, len } => {
                let Ok(w) = Watch::new(kind, addr, u64::from(len)) else {
                    let expected = Err(WatchError::Plan(if len == 0 && kind != WatchKind::Execute {
                        PlanError::Empty { addr }
                    } else {
                        PlanError::Wraps {
                            addr,
                            len: u64::from(len),
                        }
                    }));
                    let got = Watch::new(kind, addr, u64::from(len));
                    ensure!(got == expected, "Watch::new gave {got:?}, expected {expected:?}");
                    ensure!(
                        len == 0 || u128::from(addr) + u128::from(len) > 1 << 64,
                        "Watch::new refused a valid region"
                    );
                    return Ok(());
                };
                let rw = ref_watch(kind, addr, len);
                ensure!(
                    (w.kind(), w.addr(), w.len()) == rw,
                    "Watch::new recorded {w:?}, expected {rw:x?}"
                );
                let alone = contents(rw, mode).len();
                let mut after = reference.clone();
                after.set.push(rw);
                let result = model.insert(w);
                if alone > 4 {
                    ensure!(
                        result
                            == Err(WatchError::TooLarge {
                                watch: w,
                                pieces: alone as u64
                            }),
                        "{alone} pieces, got {result:?}"
                    );
                } else if after.required(mode).len() > 4 {
                    let needed = contents(rw, mode)
                        .iter()
                        .filter(|c| !reference.required(mode).contains_key(c))
                        .count();
                    let free = 4 - reference.required(mode).len();
                    ensure!(
                        result == Err(WatchError::Full { watch: w, needed, free }),
                        "expected full (needed {needed}, free {free}), got {result:?}"
                    );
                } else {
                    ensure!(result.is_ok(), "expected to fit, got {result:?}");
                    *reference = after;
                }
                result.is_err()
            }
            RegionOp::Remove { kind, addr, len } => {
                let Ok(w) = Watch::new(kind, addr, u64::from(len)) else {
                    return Ok(()); // refused above, on insert
                };
                remove(model, reference, w)?
            }
            RegionOp::RemoveSet { index } => {
                if reference.set.is_empty() {
                    ensure!(model.is_empty(), "the reference is empty, the table is not");
                    return Ok(());
                }
                let (k, a, l) = reference.set[usize::from(index) % reference.set.len()];
                let w = Watch::new(k, a, l).map_err(|e| Mismatch(format!("{e}")))?;
                remove(model, reference, w)?
            }
            RegionOp::Stop { mask, changed } => {
                check_stop(model, reference, mode, mask, changed)?;
                false
            }
            RegionOp::Clear => {
                model.clear();
                reference.set.clear();
                false
            }
        };
        if failed {
            ensure!(*model == before, "a failed operation changed the table");
        }
        check_table(model, &before, reference, mode)
    }

    /// An input that decodes to this case.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.mode.encode(&mut out);
        self.ops.encode(&mut out);
        out
    }
}

/// Removes `w` from both; returns whether it failed.
fn remove(model: &mut WatchSlots, reference: &mut Reference, w: Watch) -> Result<bool, Mismatch> {
    let key = (w.kind(), w.addr(), w.len());
    let result = model.remove(&w);
    // The last instance goes: the first keeps the watchpoint's place in the
    // order of first insertion.
    match reference.set.iter().rposition(|e| *e == key) {
        Some(at) => {
            ensure!(result.is_ok(), "{w} is set, remove gave {result:?}");
            reference.set.remove(at);
        }
        None => ensure!(
            result == Err(WatchError::NotFound { watch: w }),
            "{w} is not set, remove gave {result:?}"
        ),
    }
    Ok(result.is_err())
}

/// The planner's rules for one region of any size.
fn check_plan(addr: u64, len: u64, mode: Mode) -> Result<(), Mismatch> {
    let end = u128::from(addr) + u128::from(len);
    let plan = region::plan(addr, len, mode);
    let needed = region::slots_needed(addr, len, mode);
    if len == 0 {
        ensure!(
            plan.is_err() && needed == Err(PlanError::Empty { addr }),
            "empty region: {needed:?}"
        );
        return Ok(());
    }
    if end > 1 << 64 {
        ensure!(
            plan.is_err() && needed == Err(PlanError::Wraps { addr, len }),
            "wrapping region: {needed:?}"
        );
        return Ok(());
    }
    let (Ok(plan), Ok(needed)) = (plan, needed) else {
        return Err(Mismatch(format!("a valid region was refused: {needed:?}")));
    };
    let widest: u128 = match mode {
        Mode::Long => 8,
        Mode::Legacy => 4,
    };
    // Bounds any exact cover obeys: at least ceil(len / widest) pieces; the
    // greedy adds at most 3 + 3 short ones at the two ends.
    let len128 = u128::from(len);
    let least = len128.div_ceil(widest);
    ensure!(
        u128::from(needed) >= least && u128::from(needed) <= len128 / widest + 6,
        "{needed} pieces for {len} bytes"
    );
    let full = needed <= 4096;
    let mut next = u128::from(addr);
    let mut count = 0u64;
    for p in plan.take(if full { 4096 } else { 64 }) {
        let (a, n) = (u128::from(p.addr()), u128::from(p.bytes()));
        ensure!(n <= widest && n.is_power_of_two(), "{p}: not a length of {mode:?}");
        ensure!(a % n == 0, "{p} is misaligned");
        ensure!(a == next, "{p} does not start where the last piece ended ({next:#x})");
        next = a + n;
        count += 1;
    }
    if full {
        ensure!(next == end, "the pieces end at {next:#x}, the region at {end:#x}");
        ensure!(count == needed, "{count} pieces listed, slots_needed says {needed}");
        let expected: Vec<(u64, u64)> = reference_pieces(addr, len, mode);
        ensure!(
            expected.len() as u64 == count,
            "the reference plans {} pieces",
            expected.len()
        );
    }
    Ok(())
}

/// The table against the reference after any step.
fn check_table(model: &WatchSlots, before: &WatchSlots, reference: &Reference, mode: Mode) -> Result<(), Mismatch> {
    let required = reference.required(mode);
    ensure!(required.len() <= 4, "the reference requires {} slots", required.len());
    let held: BTreeMap<Content, u64> = model.iter().map(|u| (content_of(&u), u.users)).collect();
    ensure!(
        held == required,
        "slots hold {held:x?}, the reference requires {required:x?}"
    );
    ensure!(model.iter().count() == held.len(), "a piece is in two slots");
    ensure!(
        model.used() <= 4 && model.used() == held.len(),
        "used() is {}",
        model.used()
    );
    ensure!(
        model.is_empty() == reference.set.is_empty(),
        "is_empty() is {}",
        model.is_empty()
    );
    for u in model.iter() {
        if let Some(old) = before.iter().find(|b| b.slot == u.slot) {
            let c = content_of(&old);
            ensure!(
                !required.contains_key(&c) || content_of(&u) == c,
                "{c:x?} moved out of {}",
                u.slot
            );
        }
    }
    let (mut dr7, mut dr) = (0x600u64, [0u64; 4]);
    for u in model.iter() {
        let (a, n, rw) = content_of(&u);
        let s = u64::from(u.slot.get());
        let len_code: u64 = match n {
            1 => 0b00,
            2 => 0b01,
            8 => 0b10,
            _ => 0b11,
        };
        dr7 |= 2 << (2 * s) | u64::from(rw) << (16 + 4 * s) | len_code << (18 + 4 * s);
        dr[s as usize] = a;
    }
    ensure!(
        model.dr7().into_bits() == dr7,
        "DR7 {:#x}, the SDM says {dr7:#x}",
        model.dr7().into_bits()
    );
    ensure!(
        model.addresses() == dr,
        "DR0-3 {:x?}, expected {dr:x?}",
        model.addresses()
    );
    Ok(())
}

/// A stop on `mask`: the owners, and the read check.
fn check_stop(
    model: &WatchSlots,
    reference: &Reference,
    mode: Mode,
    mask: u8,
    changed: Option<u8>,
) -> Result<(), Mismatch> {
    let hit: BTreeSet<Content> = model
        .iter()
        .filter(|u| mask & 1 << u.slot.get() != 0)
        .map(|u| content_of(&u))
        .collect();
    let mut expected: Vec<RefWatch> = Vec::new();
    for &w in &reference.set {
        if contents(w, mode).iter().any(|c| hit.contains(c)) && !expected.contains(&w) {
            expected.push(w);
        }
    }
    let hits = model.hits_in_mask(SlotMask::from_bits_truncate(mask));
    let got: Vec<RefWatch> = hits
        .iter()
        .map(|h| (h.watch.kind(), h.watch.addr(), h.watch.len()))
        .collect();
    ensure!(
        got == expected,
        "mask {mask:#06b} names {got:x?}, expected {expected:x?}"
    );
    for h in &hits {
        let mine: BTreeSet<u8> = model
            .iter()
            .filter(|u| mask & 1 << u.slot.get() != 0 && contents(expected_of(h), mode).contains(&content_of(u)))
            .map(|u| u.slot.get())
            .collect();
        let reported: BTreeSet<u8> = h.slots.iter().map(|s| s.get()).collect();
        ensure!(
            mine == reported,
            "{} reports slots {reported:?}, owns {mine:?}",
            h.watch
        );
        let len = usize::try_from(h.watch.len()).unwrap_or(0);
        let saved = vec![0u8; len];
        let mut now = saved.clone();
        if let (Some(v), Some(b)) = (changed, now.first_mut()) {
            *b = v;
        }
        let report = h.report(Some((&saved, &now)));
        let want = match h.watch.kind() {
            WatchKind::Execute => Some(Report::Execute),
            WatchKind::Write => Some(Report::Write),
            WatchKind::ReadWrite => Some(Report::Access),
            WatchKind::Read => (saved == now).then_some(Report::Read),
        };
        ensure!(report == Ok(want), "{} reports {report:?}, expected {want:?}", h.watch);
    }
    Ok(())
}

fn expected_of(h: &crate::watch::WatchHit) -> RefWatch {
    (h.watch.kind(), h.watch.addr(), h.watch.len())
}

impl fmt::Debug for RegionsCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("use x86_debugreg::fuzzing::{RegionOp, RegionsCase};\n")?;
        f.write_str("use x86_debugreg::region::Mode;\nuse x86_debugreg::watch::WatchKind;\n")?;
        writeln!(
            f,
            "let case = RegionsCase {{\n    mode: Mode::{:?},\n    ops: vec![",
            self.mode
        )?;
        for op in &self.ops {
            let src = match *op {
                RegionOp::Plan { addr, len } => format!("RegionOp::Plan {{ addr: {addr:#x}, len: {len:#x} }}"),
                RegionOp::Insert { kind, addr, len } => {
                    format!("RegionOp::Insert {{ kind: WatchKind::{kind:?}, addr: {addr:#x}, len: {len} }}")
                }
                RegionOp::Remove { kind, addr, len } => {
                    format!("RegionOp::Remove {{ kind: WatchKind::{kind:?}, addr: {addr:#x}, len: {len} }}")
                }
                RegionOp::RemoveSet { index } => format!("RegionOp::RemoveSet {{ index: {index} }}"),
                RegionOp::Stop { mask, changed } => {
                    format!("RegionOp::Stop {{ mask: {mask:#06b}, changed: {changed:?} }}")
                }
                RegionOp::Clear => "RegionOp::Clear".into(),
            };
            writeln!(f, "        {src},")?;
        }
        f.write_str("    ],\n};\nassert_eq!(case.check(), Ok(()));")
    }
}

impl Encode for Mode {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Mode::Long => tag(out, 0, 2),
            Mode::Legacy => tag(out, 1, 2),
        }
    }
}

impl Encode for WatchKind {
    fn encode(&self, out: &mut Vec<u8>) {
        let index = match self {
            WatchKind::Execute => 0,
            WatchKind::Write => 1,
            WatchKind::Read => 2,
            WatchKind::ReadWrite => 3,
        };
        tag(out, index, 4);
    }
}

impl Encode for RegionOp {
    fn encode(&self, out: &mut Vec<u8>) {
        // Variants in declaration order; the match is exhaustive, so a new
        // variant stops the build here until it is given its index.
        const N: u64 = 6;
        match *self {
            RegionOp::Plan { addr, len } => {
                tag(out, 0, N);
                addr.encode(out);
                len.encode(out);
            }
            RegionOp::Insert { kind, addr, len } => {
                tag(out, 1, N);
                kind.encode(out);
                addr.encode(out);
                len.encode(out);
            }
            RegionOp::Remove { kind, addr, len } => {
                tag(out, 2, N);
                kind.encode(out);
                addr.encode(out);
                len.encode(out);
            }
            RegionOp::RemoveSet { index } => {
                tag(out, 3, N);
                index.encode(out);
            }
            RegionOp::Stop { mask, changed } => {
                tag(out, 4, N);
                mask.encode(out);
                changed.encode(out);
            }
            RegionOp::Clear => tag(out, 5, N),
        }
    }
}
