//! Watch any region: user watchpoints planned into pieces ([`crate::region`]),
//! pieces sharing slots by reference count, transactional insert and remove,
//! read watchpoints by value check, and stops mapped back to the user's
//! watchpoints.
//!
//! [`WatchSlots`] stands beside [`HwSlots`](crate::HwSlots), which keeps the
//! seed's rules (one aligned breakpoint per slot, a duplicate is refused).
//! It produces DR0–DR3 and DR7 in the same form (`0x600 | Gn | R/Wn | LENn`
//! per used slot), so a VMM can put it in a [`GuestDebug`] instead
//! ([`WatchSlots::guest_debug`]).
//!
//! # The rules
//! * **Sharing.** A piece is a slot's contents: address, length and condition
//!   (R/W). Two watchpoints whose pieces are identical share the slot; the slot
//!   counts its users and is freed when the last one is removed (GDB's
//!   `dr_ref_count`). A read watchpoint and an access watchpoint share, since
//!   both are R/W = `11`. Inserting the same watchpoint twice counts twice.
//! * **All or nothing.** Insert and remove work on a copy of the four slots
//!   and commit at the end (GDB's `local_state`): a watchpoint that does not
//!   fit, or a remove of one never inserted, leaves every slot and count as
//!   it was.
//! * **Stable slots.** A piece stays in its slot while it has users; a new
//!   piece takes the lowest free slot. Nothing moves on remove, so a vCPU still
//!   running an older configuration keeps meaning the same thing by each slot.
//! * **Stops name the user.** A hit slot is mapped back to every watchpoint
//!   that owns its piece, with the watchpoint's own address and length (GDB
//!   finds its watchpoint by the address it set). x86 does not say which byte
//!   was accessed.
//!
//! # Read watchpoints
//! x86 has no read-only condition (R/W = `10` is I/O). A [`WatchKind::Read`]
//! watchpoint is programmed as read/write, and a hit is a read only if the
//! watched bytes did not change: [`WatchHit::report`] compares the bytes the
//! caller saved with the bytes now in memory (the core does no I/O). The
//! caller saves the bytes when it inserts the watchpoint and refreshes them
//! on **every** stop (and after the debugger itself writes guest memory),
//! because anything the slot does not trap — another device, the debugger,
//! DMA — may change them in between.
//!
//! What it cannot tell apart: a **write of the value already there** looks
//! like a read and is reported as one (the CPU says only "accessed"; the bytes
//! say "unchanged"). The converse follows from the same blindness: an
//! instruction that reads *and* changes the bytes (`inc`, `xchg`, `add [m],
//! r`) is a write and is not reported as a read. GDB's own emulation has the
//! same two limits.
//!
//! **When a front end should use them.** GDB, when a stub refuses `Z3`
//! (empty reply, "not supported"), falls back by itself: it inserts an
//! access watchpoint (`Z4`) and ignores hits where the value changed — the
//! same check, done by GDB over the protocol. So:
//! * A **GDB stub** can simply leave `Z3` refused: GDB's fallback is as
//!   precise, keeps the saved value itself, and the stub has no memory to read
//!   at each stop. Accept `Z3` through this module only to filter writes in
//!   the stub (a write that changes the value then never wakes GDB, which
//!   trusts a target that claims read watchpoints and reports every `rwatch`
//!   stop it gets), and only if the stub can read the watched bytes at every
//!   stop — GDB would show a stop it cannot explain otherwise.
//! * **Any other front end** (a VMM's own API, a tracer, a debugger without
//!   that fallback) should use [`WatchKind::Read`]: nobody else will do the
//!   check.
//!
//! # Example
//! ```
//! use x86_debugreg::predict::SlotMask;
//! use x86_debugreg::region::Mode;
//! use x86_debugreg::watch::{Report, Watch, WatchKind, WatchSlots};
//! let mut slots = WatchSlots::new(Mode::Long);
//! // `watch s` on a 12-byte struct at 0x2004: two slots, 4 and 8 bytes.
//! let s = Watch::new(WatchKind::Write, 0x2004, 12)?;
//! slots.insert(s)?;
//! // `rwatch f` on 6 bytes at 0x1003: three more would be five. Refused,
//! // and nothing changed.
//! let f = Watch::new(WatchKind::Read, 0x1003, 6)?;
//! assert!(slots.insert(f).is_err());
//! assert_eq!(slots.used(), 2);
//! assert_eq!(slots.addresses(), [0x2004, 0x2008, 0, 0]);
//! assert_eq!(slots.dr7().into_bits(), 0x600 | 0b1010 | (0b01 | 0b11 << 2 | (0b01 | 0b10 << 2) << 4) << 16);
//!
//! // DR6 says DR1 (the 8 bytes at 0x2008) fired: that is `s`, at its own address.
//! let hits = slots.hits_in_mask(SlotMask::from_bits_truncate(0b10));
//! assert_eq!(hits.len(), 1);
//! assert_eq!((hits[0].watch.addr(), hits[0].watch.len()), (0x2004, 12));
//! assert_eq!(hits[0].report(None), Ok(Some(Report::Write)));
//! # Ok::<(), x86_debugreg::watch::WatchError>(())
//! ```

use alloc::vec::Vec;
use core::fmt;

use crate::predict::SlotMask;
use crate::region::{self, Mode, Piece, PlanError};
use crate::{BreakpointType, ControlFlags, Dr7, GuestDebug, Hits, HwBreakpoint, HwKind, Slot};

/// What a user watchpoint matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum WatchKind {
    /// Instruction execution at one address (GDB `Z1`): always one byte, the
    /// first byte of the instruction.
    Execute,
    /// Data writes (GDB `Z2`).
    Write,
    /// Data reads: programmed as read/write, reported after the value check
    /// (GDB `Z3`; see the module docs).
    Read,
    /// Data reads or writes (GDB `Z4`).
    ReadWrite,
}

impl WatchKind {
    /// The condition its slots are programmed with: a read watchpoint is a
    /// read/write slot.
    pub const fn hw_kind(self) -> HwKind {
        match self {
            WatchKind::Execute => HwKind::Execute,
            WatchKind::Write => HwKind::Write,
            WatchKind::Read | WatchKind::ReadWrite => HwKind::ReadWrite,
        }
    }

    /// The kind for a GDB breakpoint type.
    ///
    /// # Errors
    /// [`WatchError::Unsupported`] for `Z0` (a software breakpoint is not a slot).
    pub const fn from_gdb(ty: BreakpointType) -> Result<WatchKind, WatchError> {
        match ty {
            BreakpointType::Hardware => Ok(WatchKind::Execute),
            BreakpointType::WriteWatch => Ok(WatchKind::Write),
            BreakpointType::ReadWatch => Ok(WatchKind::Read),
            BreakpointType::AccessWatch => Ok(WatchKind::ReadWrite),
            BreakpointType::Software => Err(WatchError::Unsupported { ty }),
        }
    }
}

impl fmt::Display for WatchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WatchKind::Execute => "execute",
            WatchKind::Write => "write",
            WatchKind::Read => "read",
            WatchKind::ReadWrite => "read/write",
        })
    }
}

/// A watchpoint as the user asked for it: a kind and any non-empty region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Watch {
    kind: WatchKind,
    addr: u64,
    len: u64,
}

impl Watch {
    /// A watchpoint on `[addr, addr + len)`. For [`WatchKind::Execute`] the
    /// length is ignored and recorded as 1 (GDB's `Z1` length is the
    /// breakpoint's "kind", not a range; [`HwBreakpoint::new`] does the same).
    ///
    /// # Errors
    /// [`PlanError`] (wrapped) for an empty region or one past 2^64.
    pub const fn new(kind: WatchKind, addr: u64, len: u64) -> Result<Watch, WatchError> {
        let len = match kind {
            WatchKind::Execute => 1,
            _ => len,
        };
        match region::check(addr, len) {
            Ok(()) => Ok(Watch { kind, addr, len }),
            Err(e) => Err(WatchError::Plan(e)),
        }
    }

    /// The watchpoint of GDB type `ty` (`Z1`–`Z4`) on `len` bytes at `addr`.
    ///
    /// # Errors
    /// As [`WatchKind::from_gdb`] and [`Watch::new`].
    pub const fn from_gdb(ty: BreakpointType, addr: u64, len: u64) -> Result<Watch, WatchError> {
        match WatchKind::from_gdb(ty) {
            Ok(kind) => Watch::new(kind, addr, len),
            Err(e) => Err(e),
        }
    }

    /// What it matches.
    pub const fn kind(self) -> WatchKind {
        self.kind
    }

    /// The first byte the user asked for.
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// The length the user asked for (1 for execute breakpoints).
    // No `is_empty`: a watchpoint is never empty (`new` refuses length 0).
    #[allow(clippy::len_without_is_empty)]
    pub const fn len(self) -> u64 {
        self.len
    }

    /// Its pieces in `mode`.
    pub fn pieces(self, mode: Mode) -> region::Pieces {
        // Cannot fail: `new` checked the region. No piece would be the
        // harmless answer if it ever did.
        region::plan(self.addr, self.len, mode).unwrap_or(region::Pieces::EMPTY)
    }

    /// Its pieces as slot contents, or `None` if it needs more than four.
    fn slot_contents(self, mode: Mode) -> Option<Vec<HwBreakpoint>> {
        let pieces = self.pieces(mode);
        if pieces.remaining() > 4 {
            return None;
        }
        let kind = self.kind.hw_kind();
        Some(pieces.map(|p: Piece| p.breakpoint(kind)).collect())
    }
}

impl fmt::Display for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            WatchKind::Execute => write!(f, "execute breakpoint at {:#x}", self.addr),
            kind => write!(f, "{kind} watchpoint on {} bytes at {:#x}", self.len, self.addr),
        }
    }
}

/// Why a watchpoint was refused. Nothing changes on any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The region is empty or runs past 2^64.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// A software breakpoint type was given where a slot is needed.
    #[error("{ty} is not a debug-register breakpoint")]
    Unsupported {
        /// The type.
        ty: BreakpointType,
    },
    /// The region needs more than four slots on its own: it can never fit.
    #[error("{watch} needs {pieces} debug registers; x86 has four")]
    TooLarge {
        /// The watchpoint.
        watch: Watch,
        /// How many slots it would need.
        pieces: u64,
    },
    /// Not enough free slots for the pieces no slot holds yet.
    #[error("{watch} needs {needed} more debug registers; {free} are free")]
    Full {
        /// The watchpoint.
        watch: Watch,
        /// New slots it needs (pieces already in a slot are shared).
        needed: usize,
        /// Free slots.
        free: usize,
    },
    /// This watchpoint was never inserted (or was removed as often as inserted).
    #[error("{watch} is not set")]
    NotFound {
        /// The watchpoint.
        watch: Watch,
    },
}

/// One slot in use: what it holds and how many pieces of watchpoints share it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotUse {
    /// The register.
    pub slot: Slot,
    /// Its contents (address, condition, length).
    pub breakpoint: HwBreakpoint,
    /// How many watchpoint pieces use it (insertions count separately).
    pub users: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shared {
    bp: HwBreakpoint,
    users: u64,
}

/// A user watchpoint and how many times it was inserted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Entry {
    watch: Watch,
    count: u64,
    /// Its slot contents (at most four), planned once at insertion.
    pieces: Vec<HwBreakpoint>,
}

/// The four debug address registers, shared between any number of user
/// watchpoints on any regions. See the module docs for the rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchSlots {
    mode: Mode,
    slots: [Option<Shared>; 4],
    /// In order of first insertion.
    watches: Vec<Entry>,
}

impl WatchSlots {
    /// Four free slots, for a guest in `mode` (8-byte pieces only in
    /// [`Mode::Long`]).
    pub const fn new(mode: Mode) -> WatchSlots {
        WatchSlots {
            mode,
            slots: [None; 4],
            watches: Vec::new(),
        }
    }

    /// The mode the pieces are planned for.
    pub const fn mode(&self) -> Mode {
        self.mode
    }

    /// How many slots are in use.
    pub fn used(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Whether no slot is in use (and so no watchpoint is set).
    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    /// The slots in use, in register order.
    pub fn iter(&self) -> impl Iterator<Item = SlotUse> + '_ {
        Slot::ALL.into_iter().zip(self.slots).filter_map(|(slot, s)| {
            s.map(|s| SlotUse {
                slot,
                breakpoint: s.bp,
                users: s.users,
            })
        })
    }

    /// The watchpoints set, in order of first insertion, with how many times
    /// each was inserted.
    pub fn watches(&self) -> impl Iterator<Item = (Watch, u64)> + '_ {
        self.watches.iter().map(|e| (e.watch, e.count))
    }

    /// How many times `watch` is set (0 if it is not).
    pub fn count(&self, watch: &Watch) -> u64 {
        self.watches.iter().find(|e| e.watch == *watch).map_or(0, |e| e.count)
    }

    /// How many **free** slots inserting `watch` would take now: its pieces
    /// that no slot holds yet. Changes nothing.
    ///
    /// # Errors
    /// [`WatchError::TooLarge`] if it needs more than four slots on its own.
    pub fn new_slots_needed(&self, watch: &Watch) -> Result<usize, WatchError> {
        let pieces = self.plan(watch)?;
        Ok(pieces
            .iter()
            .filter(|bp| !self.slots.iter().flatten().any(|s| s.bp == **bp))
            .count())
    }

    fn plan(&self, watch: &Watch) -> Result<Vec<HwBreakpoint>, WatchError> {
        watch.slot_contents(self.mode).ok_or(WatchError::TooLarge {
            watch: *watch,
            pieces: watch.pieces(self.mode).remaining(),
        })
    }

    /// Sets `watch`: each piece shares the slot that already holds it, or
    /// takes the lowest free slot. Returns the slots the watchpoint uses.
    ///
    /// # Errors
    /// [`WatchError::TooLarge`] if it needs more than four slots on its own;
    /// [`WatchError::Full`] if its new pieces do not fit in the free slots.
    /// Nothing changes on error.
    pub fn insert(&mut self, watch: Watch) -> Result<SlotMask, WatchError> {
        let pieces = self.plan(&watch)?;
        let mut slots = self.slots;
        let mut used = SlotMask::EMPTY;
        for bp in &pieces {
            let i = match slots.iter().position(|s| s.is_some_and(|s| s.bp == *bp)) {
                Some(i) => i,
                None => match slots.iter().position(Option::is_none) {
                    Some(i) => {
                        slots[i] = Some(Shared { bp: *bp, users: 0 });
                        i
                    }
                    None => {
                        return Err(WatchError::Full {
                            watch,
                            needed: self.new_slots_needed(&watch)?,
                            free: self.slots.iter().filter(|s| s.is_none()).count(),
                        })
                    }
                },
            };
            if let Some(s) = &mut slots[i] {
                s.users += 1;
            }
            used = used.with(Slot::ALL[i]);
        }
        // Committed only now: every piece found its slot.
        self.slots = slots;
        match self.watches.iter_mut().find(|e| e.watch == watch) {
            Some(e) => e.count += 1,
            None => self.watches.push(Entry {
                watch,
                count: 1,
                pieces,
            }),
        }
        Ok(used)
    }

    /// Removes one insertion of `watch`: each of its pieces loses a user, and
    /// a slot with no user left is freed. Returns the slots it used.
    ///
    /// # Errors
    /// [`WatchError::NotFound`] if `watch` is not set; nothing changes.
    pub fn remove(&mut self, watch: &Watch) -> Result<SlotMask, WatchError> {
        let not_found = WatchError::NotFound { watch: *watch };
        let at = self.watches.iter().position(|e| e.watch == *watch).ok_or(not_found)?;
        let mut slots = self.slots;
        let mut used = SlotMask::EMPTY;
        for bp in &self.watches[at].pieces {
            // Every piece of a set watchpoint is in a slot; were it not, the
            // copy is dropped and nothing changes.
            let i = slots
                .iter()
                .position(|s| s.is_some_and(|s| s.bp == *bp))
                .ok_or(not_found)?;
            if let Some(s) = &mut slots[i] {
                s.users -= 1;
                if s.users == 0 {
                    slots[i] = None;
                }
            }
            used = used.with(Slot::ALL[i]);
        }
        self.slots = slots;
        self.watches[at].count -= 1;
        if self.watches[at].count == 0 {
            self.watches.remove(at);
        }
        Ok(used)
    }

    /// Removes every watchpoint and frees every slot.
    pub fn clear(&mut self) {
        *self = WatchSlots::new(self.mode);
    }

    /// DR0–DR3: each used slot's address, 0 for free slots.
    pub fn addresses(&self) -> [u64; 4] {
        self.slots.map(|s| s.map_or(0, |s| s.bp.addr()))
    }

    /// DR7: `0x600` (GE and the fixed bit 10) plus, per used slot n, Gn,
    /// R/Wn and LENn — the form [`HwSlots::dr7`](crate::HwSlots::dr7) has.
    pub fn dr7(&self) -> Dr7 {
        self.iter().fold(Dr7::EMPTY.with_ge(true), |dr7, u| {
            dr7.with_slot(u.slot, u.breakpoint.kind().condition(), u.breakpoint.len())
        })
    }

    /// `base` (for example [`DebugState::guest_debug`](crate::DebugState::guest_debug)
    /// with no hardware breakpoint of its own) with the hardware part taken
    /// from these slots: DR0–DR3, DR7, and `USE_HW_BP` (with `ENABLE`) exactly
    /// when a slot is used. `ENABLE` stays only if some feature needs it.
    pub fn guest_debug(&self, base: GuestDebug) -> GuestDebug {
        let mut control = base.control.difference(ControlFlags::USE_HW_BP);
        if !self.is_empty() {
            control |= ControlFlags::USE_HW_BP;
        }
        let needs_enable = ControlFlags::SINGLESTEP
            .union(ControlFlags::USE_SW_BP)
            .union(ControlFlags::USE_HW_BP);
        control = if control.bits() & needs_enable.bits() != 0 {
            control | ControlFlags::ENABLE
        } else {
            control.difference(ControlFlags::ENABLE)
        };
        let [dr0, dr1, dr2, dr3] = self.addresses();
        let mut debugreg = base.debugreg;
        debugreg[..4].copy_from_slice(&[dr0, dr1, dr2, dr3]);
        debugreg[7] = self.dr7().into_bits();
        GuestDebug { control, debugreg }
    }

    /// The watchpoints a stop hit, from the hits decoded against the
    /// configuration the vCPU **applied** ([`crate::decode`]): every
    /// watchpoint that owns the piece of a hit slot, in order of first
    /// insertion, each once, with the hit slots that are its pieces.
    /// Matching is by slot contents, not slot number, so it holds for any
    /// configuration this table produced; a watchpoint removed since is not
    /// reported.
    pub fn hits(&self, hits: &Hits) -> Vec<WatchHit> {
        let hit: Vec<(Slot, HwBreakpoint)> = hits.iter().map(|h| (h.slot, h.breakpoint)).collect();
        self.owners(&hit)
    }

    /// As [`WatchSlots::hits`], from a DR6 hit mask (B0–B3) read against
    /// **this** configuration: use it only when the vCPU ran exactly what
    /// [`WatchSlots::addresses`] and [`WatchSlots::dr7`] say now. Free slots
    /// in the mask are ignored.
    pub fn hits_in_mask(&self, mask: SlotMask) -> Vec<WatchHit> {
        let hit: Vec<(Slot, HwBreakpoint)> = self
            .iter()
            .filter(|u| mask.contains(u.slot))
            .map(|u| (u.slot, u.breakpoint))
            .collect();
        self.owners(&hit)
    }

    fn owners(&self, hit: &[(Slot, HwBreakpoint)]) -> Vec<WatchHit> {
        self.watches
            .iter()
            .filter_map(|e| {
                let slots = hit
                    .iter()
                    .filter(|(_, bp)| e.pieces.contains(bp))
                    .fold(SlotMask::EMPTY, |m, (s, _)| m.with(*s));
                (!slots.is_empty()).then_some(WatchHit { watch: e.watch, slots })
            })
            .collect()
    }
}

/// A watchpoint one of whose slots fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WatchHit {
    /// The watchpoint, as the user set it.
    pub watch: Watch,
    /// Its slots that fired.
    pub slots: SlotMask,
}

/// What to tell the front end about a [`WatchHit`] (GDB's stop reasons).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Report {
    /// A hardware breakpoint (`hwbreak`).
    Execute,
    /// A write watchpoint fired (`watch:addr`).
    Write,
    /// A read watchpoint fired and the value is unchanged (`rwatch:addr`).
    Read,
    /// An access watchpoint fired (`awatch:addr`).
    Access,
}

/// Why a read watchpoint's hit could not be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ValueError {
    /// A read watchpoint needs the saved and current bytes.
    #[error("a read watchpoint hit needs the watched bytes, before and now")]
    Missing,
    /// The bytes given are not the watched region's length.
    #[error("{watch} got {saved} saved and {now} current bytes")]
    Length {
        /// The watchpoint.
        watch: Watch,
        /// Saved bytes given.
        saved: usize,
        /// Current bytes given.
        now: usize,
    },
}

impl WatchHit {
    /// Whether [`WatchHit::report`] needs the watched bytes (read watchpoints).
    pub const fn needs_values(&self) -> bool {
        matches!(self.watch.kind, WatchKind::Read)
    }

    /// What to report. `values` is `(saved, now)`: the watched bytes as saved
    /// at the previous stop (or at insertion) and as they are now; only read
    /// watchpoints look at them. A read watchpoint reports [`Report::Read`]
    /// when the bytes are unchanged and `None` when they changed (the access
    /// was a write; a write of the same value is indistinguishable from a
    /// read — see the module docs). Refresh the saved bytes after this, on
    /// every stop.
    ///
    /// # Errors
    /// For a read watchpoint: [`ValueError::Missing`] without `values`,
    /// [`ValueError::Length`] if either slice is not the watchpoint's length.
    ///
    /// # Example
    /// ```
    /// use x86_debugreg::predict::SlotMask;
    /// use x86_debugreg::watch::{Report, Watch, WatchHit, WatchKind};
    /// let hit = WatchHit { watch: Watch::new(WatchKind::Read, 0x1001, 2)?, slots: SlotMask::ALL };
    /// assert_eq!(hit.report(Some((&[1, 2], &[1, 2]))), Ok(Some(Report::Read)));
    /// assert_eq!(hit.report(Some((&[1, 2], &[1, 3]))), Ok(None)); // a write
    /// # Ok::<(), x86_debugreg::watch::WatchError>(())
    /// ```
    pub fn report(&self, values: Option<(&[u8], &[u8])>) -> Result<Option<Report>, ValueError> {
        match self.watch.kind {
            WatchKind::Execute => Ok(Some(Report::Execute)),
            WatchKind::Write => Ok(Some(Report::Write)),
            WatchKind::ReadWrite => Ok(Some(Report::Access)),
            WatchKind::Read => {
                let (saved, now) = values.ok_or(ValueError::Missing)?;
                let len = self.watch.len;
                if saved.len() as u64 != len || now.len() as u64 != len {
                    return Err(ValueError::Length {
                        watch: self.watch,
                        saved: saved.len(),
                        now: now.len(),
                    });
                }
                Ok((saved == now).then_some(Report::Read))
            }
        }
    }
}
