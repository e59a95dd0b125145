//! Hardware breakpoints: a validated [`HwBreakpoint`] and the four-slot
//! allocator [`HwSlots`] that produces DR0–DR3 and DR7.
//!
//! The rules are the seed's (QEMU 2009 `kvm_arch_insert_hw_breakpoint`), made
//! typed: execute breakpoints are always 1 byte; write and access watchpoints
//! cover 1, 2, 4 or 8 bytes at an address aligned to that length (SDM Vol. 3B
//! §18.2.5, "Breakpoint Field Recognition": the CPU ignores the low address
//! bits, so a misaligned range would silently watch the wrong bytes); x86 has
//! no read-only condition. The checks run in the seed's order: type, length,
//! alignment, free slot, duplicate.

use core::fmt;

use crate::{BreakpointType, Condition, Dr7, Len, Slot};

/// What a hardware slot matches. x86 offers no read-only condition
/// (`R/W = 10` is I/O, not memory reads), so there are three.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum HwKind {
    /// Instruction execution (`R/W = 00`, GDB `Z1`).
    Execute,
    /// Data writes (`R/W = 01`, GDB `Z2`).
    Write,
    /// Data reads or writes (`R/W = 11`, GDB `Z4`).
    ReadWrite,
}

impl HwKind {
    /// The DR7 R/W code of this kind.
    pub const fn condition(self) -> Condition {
        match self {
            HwKind::Execute => Condition::Execute,
            HwKind::Write => Condition::Write,
            HwKind::ReadWrite => Condition::ReadWrite,
        }
    }

    /// The kind a DR7 R/W code programs, or `None` for I/O breakpoints.
    pub const fn from_condition(condition: Condition) -> Option<HwKind> {
        match condition {
            Condition::Execute => Some(HwKind::Execute),
            Condition::Write => Some(HwKind::Write),
            Condition::ReadWrite => Some(HwKind::ReadWrite),
            Condition::Io => None,
        }
    }

    /// The hardware kind for a GDB breakpoint type.
    ///
    /// # Errors
    /// [`HwError::Unsupported`] for software breakpoints (not a slot) and read
    /// watchpoints (x86 cannot trap reads without writes).
    pub const fn from_gdb(ty: BreakpointType) -> Result<HwKind> {
        match ty {
            BreakpointType::Hardware => Ok(HwKind::Execute),
            BreakpointType::WriteWatch => Ok(HwKind::Write),
            BreakpointType::AccessWatch => Ok(HwKind::ReadWrite),
            BreakpointType::Software | BreakpointType::ReadWatch => Err(HwError::Unsupported { ty }),
        }
    }
}

impl fmt::Display for HwKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HwKind::Execute => "execute",
            HwKind::Write => "write",
            HwKind::ReadWrite => "read/write",
        })
    }
}

/// Why a hardware breakpoint was refused. Each variant is the seed's errno
/// made a type: `Misaligned`/`BadLength` were `-EINVAL`, `Unsupported`
/// `-ENOSYS`, `Full` `-ENOBUFS`, `AlreadyPresent` `-EEXIST`, `NotFound`
/// `-ENOENT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HwError {
    /// The address is not a multiple of the length.
    #[error("address {addr:#x} is not aligned to {len} bytes")]
    Misaligned {
        /// The requested address.
        addr: u64,
        /// The requested length in bytes.
        len: u64,
    },
    /// The length is not 1, 2, 4 or 8.
    #[error("watchpoint length {len} is not 1, 2, 4 or 8")]
    BadLength {
        /// The requested length in bytes.
        len: u64,
    },
    /// The type cannot be a hardware slot on x86.
    #[error("{ty} is not supported by x86 debug registers")]
    Unsupported {
        /// The requested type.
        ty: BreakpointType,
    },
    /// All four slots are in use.
    #[error("all four debug address registers are in use")]
    Full,
    /// The same breakpoint (address, length, kind) is already in a slot.
    #[error("{bp} is already set")]
    AlreadyPresent {
        /// The duplicate.
        bp: HwBreakpoint,
    },
    /// No slot holds this breakpoint.
    #[error("{bp} is not set")]
    NotFound {
        /// The breakpoint that was asked for.
        bp: HwBreakpoint,
    },
}

/// The result type of this module.
pub type Result<T, E = HwError> = core::result::Result<T, E>;

/// A validated hardware breakpoint: address, kind and length.
///
/// ```
/// use x86_debugreg::{HwBreakpoint, HwError, HwKind, Len};
/// let bp = HwBreakpoint::new(HwKind::Write, 0x1000, 8)?;
/// assert_eq!(bp.len(), Len::B8);
/// assert_eq!(
///     HwBreakpoint::new(HwKind::Write, 0x1004, 8),
///     Err(HwError::Misaligned { addr: 0x1004, len: 8 })
/// );
/// // Execute breakpoints are always one byte, whatever length was asked for.
/// assert_eq!(HwBreakpoint::new(HwKind::Execute, 0x1003, 3)?.len(), Len::B1);
/// # Ok::<(), HwError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HwBreakpoint {
    addr: u64,
    kind: HwKind,
    len: Len,
}

impl HwBreakpoint {
    /// Validates a breakpoint. `len` is ignored for [`HwKind::Execute`] (forced
    /// to 1 byte, as the seed and GDB do: the `Z1` length is the instruction's
    /// "kind", not a range).
    ///
    /// # Errors
    /// [`HwError::BadLength`] unless `len` is 1, 2, 4 or 8;
    /// [`HwError::Misaligned`] unless `addr % len == 0`.
    pub const fn new(kind: HwKind, addr: u64, len: u64) -> Result<HwBreakpoint> {
        if let HwKind::Execute = kind {
            return Ok(HwBreakpoint {
                addr,
                kind,
                len: Len::B1,
            });
        }
        let Some(code) = Len::from_bytes(len) else {
            return Err(HwError::BadLength { len });
        };
        if addr % len != 0 {
            return Err(HwError::Misaligned { addr, len });
        }
        Ok(HwBreakpoint { addr, kind, len: code })
    }

    /// A breakpoint as the registers hold it, unvalidated (a DR7 may arm a
    /// misaligned range; the CPU then ignores the low address bits).
    pub(crate) const fn armed(kind: HwKind, addr: u64, len: Len) -> HwBreakpoint {
        HwBreakpoint { addr, kind, len }
    }

    /// Validates a breakpoint of GDB type `ty`.
    ///
    /// # Errors
    /// As [`HwKind::from_gdb`] and [`HwBreakpoint::new`].
    pub const fn from_gdb(ty: BreakpointType, addr: u64, len: u64) -> Result<HwBreakpoint> {
        match HwKind::from_gdb(ty) {
            Ok(kind) => HwBreakpoint::new(kind, addr, len),
            Err(e) => Err(e),
        }
    }

    /// The linear address (DRn).
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// What it matches.
    pub const fn kind(self) -> HwKind {
        self.kind
    }

    /// How many bytes it covers.
    pub const fn len(self) -> Len {
        self.len
    }

    /// Whether this is a data watchpoint (not an execute breakpoint).
    pub const fn is_watchpoint(self) -> bool {
        !matches!(self.kind, HwKind::Execute)
    }
}

impl fmt::Display for HwBreakpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            HwKind::Execute => write!(f, "execute breakpoint at {:#x}", self.addr),
            kind => write!(f, "{kind} watchpoint on {} bytes at {:#x}", self.len.bytes(), self.addr),
        }
    }
}

/// The four debug address registers and what each holds.
///
/// Slots are kept dense, as the seed keeps them: a breakpoint always goes into
/// the first free slot, and removing one moves the last slot into the hole, so
/// slots `0..len()` are in use. State lives in a value (one per VM), not in a
/// global table as in the seed.
///
/// ```
/// use x86_debugreg::{HwBreakpoint, HwKind, HwSlots, Slot};
/// let mut slots = HwSlots::new();
/// let slot = slots.insert(HwBreakpoint::new(HwKind::Execute, 0x40_1000, 1)?)?;
/// assert_eq!(slot, Slot::DR0);
/// assert_eq!(slots.dr7().into_bits(), 0x602);
/// assert_eq!(slots.addresses(), [0x40_1000, 0, 0, 0]);
/// # Ok::<(), x86_debugreg::HwError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HwSlots {
    slots: [Option<HwBreakpoint>; 4],
    used: u8,
    /// DR0–DR3, updated with every change: read on every `KVM_RUN`
    /// preparation, written only when a slot changes.
    addresses: [u64; 4],
    /// DR7, updated with every change.
    dr7: Dr7,
}

impl Default for HwSlots {
    fn default() -> HwSlots {
        HwSlots::new()
    }
}

impl HwSlots {
    /// Four free slots.
    pub const fn new() -> HwSlots {
        HwSlots {
            slots: [None; 4],
            used: 0,
            addresses: [0; 4],
            dr7: Dr7::EMPTY.with_ge(true),
        }
    }

    /// Puts `bp` (or nothing) in `slot` and its registers.
    fn set(&mut self, slot: Slot, bp: Option<HwBreakpoint>) {
        self.slots[slot.index()] = bp;
        (self.addresses[slot.index()], self.dr7) = match bp {
            Some(bp) => (bp.addr, self.dr7.with_slot(slot, bp.kind.condition(), bp.len)),
            None => (0, self.dr7.without_slot(slot)),
        };
    }

    /// How many slots are in use.
    pub const fn len(&self) -> usize {
        self.used as usize
    }

    /// Whether no slot is in use.
    pub const fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The breakpoint in `slot`, if any.
    pub const fn get(&self, slot: Slot) -> Option<HwBreakpoint> {
        self.slots[slot.index()]
    }

    /// The slot holding exactly `bp`, if any.
    pub fn find(&self, bp: &HwBreakpoint) -> Option<Slot> {
        self.iter().find(|(_, b)| b == bp).map(|(s, _)| s)
    }

    /// The used slots and their breakpoints, in register order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, HwBreakpoint)> + '_ {
        Slot::ALL
            .into_iter()
            .zip(self.slots)
            .filter_map(|(s, b)| b.map(|b| (s, b)))
    }

    /// Puts `bp` in the first free slot.
    ///
    /// # Errors
    /// [`HwError::Full`] if four slots are used (checked first, as in the seed);
    /// [`HwError::AlreadyPresent`] if the same breakpoint is already set.
    /// Nothing changes on error.
    pub fn insert(&mut self, bp: HwBreakpoint) -> Result<Slot> {
        let Some(slot) = Slot::new(self.used) else {
            return Err(HwError::Full);
        };
        if self.find(&bp).is_some() {
            return Err(HwError::AlreadyPresent { bp });
        }
        self.set(slot, Some(bp));
        self.used += 1;
        Ok(slot)
    }

    /// Removes `bp`, moving the last used slot into its place. Returns the slot
    /// it was in.
    ///
    /// # Errors
    /// [`HwError::NotFound`] if no slot holds `bp`; nothing changes.
    pub fn remove(&mut self, bp: &HwBreakpoint) -> Result<Slot> {
        let slot = self.find(bp).ok_or(HwError::NotFound { bp: *bp })?;
        self.used -= 1;
        let last = Slot::ALL[usize::from(self.used)];
        self.set(slot, self.slots[last.index()]);
        self.set(last, None);
        Ok(slot)
    }

    /// Frees every slot.
    pub fn clear(&mut self) {
        *self = HwSlots::new();
    }

    /// DR0–DR3: each used slot's address, 0 for free slots.
    pub const fn addresses(&self) -> [u64; 4] {
        self.addresses
    }

    /// DR7 for the used slots: `0x600` (GE and the fixed bit 10) plus, per used
    /// slot n, Gn, R/Wn and LENn. With no slot in use this is `0x600`.
    pub const fn dr7(&self) -> Dr7 {
        self.dr7
    }
}
