//! DR7, the debug control register (Intel SDM Vol. 3B §18.2.4, "Debug Control
//! Register (DR7)"; AMD APM Vol. 2 §13.1.1.4).
//!
//! [`Dr7`] is a [`bitfield_struct`] view of the 64-bit register with every
//! architectural field. Per-slot fields are also reachable through [`Slot`]
//! indexed accessors ([`Dr7::condition`], [`Dr7::len`], [`Dr7::with_slot`]…),
//! which is how the rest of the crate uses them.
//!
//! # Which `u64` values are valid
//!
//! * [`Dr7::from_bits`] / `From<u64>` keep every bit verbatim. Use them for
//!   values that came from hardware or from a peer and must round-trip.
//! * [`Dr7::new_checked`] is the validating constructor for values a user wants
//!   to *load*: it rejects any reserved bit (12, 14, 15 and 32–63; in 64-bit
//!   mode `MOV DR7` with bits 63:32 set raises #GP) and forces bit 10 to 1
//!   (it is fixed to 1 and reads as 1 whatever is written). Every accepted
//!   value satisfies `new_checked(v)?.into_bits() == v | 0x400`.

use bitfield_struct::bitfield;
use core::fmt;

/// A debug address register number, `0..=3` (DR0–DR3), validated.
///
/// # Example
/// ```
/// use x86_debugreg::Slot;
/// assert_eq!(Slot::new(3).map(Slot::get), Some(3));
/// assert!(Slot::new(4).is_none());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Slot(SlotIndex);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(u8)]
enum SlotIndex {
    Dr0 = 0,
    Dr1 = 1,
    Dr2 = 2,
    Dr3 = 3,
}

impl Slot {
    /// DR0.
    pub const DR0: Slot = Slot(SlotIndex::Dr0);
    /// DR1.
    pub const DR1: Slot = Slot(SlotIndex::Dr1);
    /// DR2.
    pub const DR2: Slot = Slot(SlotIndex::Dr2);
    /// DR3.
    pub const DR3: Slot = Slot(SlotIndex::Dr3);
    /// The four slots in register order.
    pub const ALL: [Slot; 4] = [Slot::DR0, Slot::DR1, Slot::DR2, Slot::DR3];

    /// The slot for register number `n`, or `None` if `n > 3`.
    pub const fn new(n: u8) -> Option<Slot> {
        match n {
            0 => Some(Slot::DR0),
            1 => Some(Slot::DR1),
            2 => Some(Slot::DR2),
            3 => Some(Slot::DR3),
            _ => None,
        }
    }

    /// The register number, `0..=3`.
    pub const fn get(self) -> u8 {
        self.0 as u8
    }

    /// The register number as an index into a 4-element array.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl TryFrom<u8> for Slot {
    type Error = InvalidSlot;
    fn try_from(n: u8) -> Result<Slot, InvalidSlot> {
        Slot::new(n).ok_or(InvalidSlot(n))
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DR{}", self.get())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DR{}", self.get())
    }
}

/// A slot number outside `0..=3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("debug address register number {0} is out of range 0..=3")]
pub struct InvalidSlot(pub u8);

/// The R/Wn field: which access the breakpoint in a slot matches (SDM Vol. 3B
/// §18.2.4, "R/W0 through R/W3").
///
/// All four 2-bit codes are architecturally meaningful, so decoding a field
/// never fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(u8)]
pub enum Condition {
    /// `00`: break on instruction execution only.
    Execute = 0b00,
    /// `01`: break on data writes only.
    Write = 0b01,
    /// `10`: break on I/O reads or writes (needs CR4.DE; no memory access matches).
    Io = 0b10,
    /// `11`: break on data reads or writes, but not instruction fetches.
    ReadWrite = 0b11,
}

impl Condition {
    /// Decodes a 2-bit field; only the low two bits of `bits` are used.
    pub const fn from_bits(bits: u8) -> Condition {
        match bits & 0b11 {
            0b00 => Condition::Execute,
            0b01 => Condition::Write,
            0b10 => Condition::Io,
            // `bits & 0b11 == 0b11`: the mask leaves no other value.
            _ => Condition::ReadWrite,
        }
    }

    /// The 2-bit encoding.
    pub const fn into_bits(self) -> u8 {
        self as u8
    }
}

/// The LENn field: how many bytes a data breakpoint covers (SDM Vol. 3B
/// §18.2.4, "LEN0 through LEN3"). Note the encoding is not monotonic:
/// 8 bytes is `10`, 4 bytes is `11`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(u8)]
pub enum Len {
    /// `00`: 1 byte (also the only legal length for execute breakpoints).
    B1 = 0b00,
    /// `01`: 2 bytes.
    B2 = 0b01,
    /// `10`: 8 bytes (64-bit mode; undefined on older CPUs in 32-bit mode).
    B8 = 0b10,
    /// `11`: 4 bytes.
    B4 = 0b11,
}

impl Len {
    /// Decodes a 2-bit field; only the low two bits of `bits` are used.
    pub const fn from_bits(bits: u8) -> Len {
        match bits & 0b11 {
            0b00 => Len::B1,
            0b01 => Len::B2,
            0b10 => Len::B8,
            // `bits & 0b11 == 0b11`: the mask leaves no other value.
            _ => Len::B4,
        }
    }

    /// The 2-bit encoding.
    pub const fn into_bits(self) -> u8 {
        self as u8
    }

    /// The length for a byte count of 1, 2, 4 or 8, else `None`.
    ///
    /// ```
    /// use x86_debugreg::Len;
    /// assert_eq!(Len::from_bytes(4), Some(Len::B4));
    /// assert_eq!(Len::from_bytes(3), None);
    /// ```
    pub const fn from_bytes(bytes: u64) -> Option<Len> {
        match bytes {
            1 => Some(Len::B1),
            2 => Some(Len::B2),
            4 => Some(Len::B4),
            8 => Some(Len::B8),
            _ => None,
        }
    }

    /// The number of bytes covered: 1, 2, 4 or 8.
    pub const fn bytes(self) -> u64 {
        match self {
            Len::B1 => 1,
            Len::B2 => 2,
            Len::B4 => 4,
            Len::B8 => 8,
        }
    }
}

/// The debug control register, DR7 (SDM Vol. 3B §18.2.4, Figure 18-1).
///
/// ```
/// use x86_debugreg::{Condition, Dr7, Len, Slot};
/// let dr7 = Dr7::EMPTY.with_slot(Slot::DR1, Condition::Write, Len::B4);
/// assert_eq!(dr7.into_bits(), 0x400 | 1 << 3 | 0b01 << 20 | 0b11 << 22);
/// assert!(dr7.global(Slot::DR1));
/// ```
#[bitfield(u64)]
#[derive(PartialEq, Eq, Hash)]
pub struct Dr7 {
    /// L0 (bit 0): local enable of the DR0 breakpoint.
    pub l0: bool,
    /// G0 (bit 1): global enable of the DR0 breakpoint.
    pub g0: bool,
    /// L1 (bit 2).
    pub l1: bool,
    /// G1 (bit 3).
    pub g1: bool,
    /// L2 (bit 4).
    pub l2: bool,
    /// G2 (bit 5).
    pub g2: bool,
    /// L3 (bit 6).
    pub l3: bool,
    /// G3 (bit 7).
    pub g3: bool,
    /// LE (bit 8): local exact breakpoint enable (ignored by P6 and later, kept
    /// for compatibility; recommended set when data breakpoints are used).
    pub le: bool,
    /// GE (bit 9): global exact breakpoint enable.
    pub ge: bool,
    /// Bit 10: reserved, reads as 1. Defaults to 1 in [`Dr7::new`].
    #[bits(1, default = true)]
    pub fixed1: bool,
    /// RTM (bit 11): enables advanced debugging of RTM transactional regions.
    pub rtm: bool,
    /// Bit 12: reserved, must be 0 (SDM: "IR/SMIE" on some older parts).
    #[bits(1)]
    pub reserved12: bool,
    /// GD (bit 13): general detect; any MOV to/from a debug register raises #DB.
    pub gd: bool,
    /// Bits 14–15: reserved, must be 0.
    #[bits(2)]
    pub reserved14: u8,
    /// R/W0 (bits 16–17).
    #[bits(2)]
    pub rw0: Condition,
    /// LEN0 (bits 18–19).
    #[bits(2)]
    pub len0: Len,
    /// R/W1 (bits 20–21).
    #[bits(2)]
    pub rw1: Condition,
    /// LEN1 (bits 22–23).
    #[bits(2)]
    pub len1: Len,
    /// R/W2 (bits 24–25).
    #[bits(2)]
    pub rw2: Condition,
    /// LEN2 (bits 26–27).
    #[bits(2)]
    pub len2: Len,
    /// R/W3 (bits 28–29).
    #[bits(2)]
    pub rw3: Condition,
    /// LEN3 (bits 30–31).
    #[bits(2)]
    pub len3: Len,
    /// Bits 32–63: reserved, must be 0 (#GP on `MOV DR7` in 64-bit mode).
    #[bits(32)]
    pub reserved_high: u32,
}

/// Bits that must be zero in a DR7 value to be loaded: 12, 14, 15 and 32–63.
pub const DR7_RESERVED_MASK: u64 = 1 << 12 | 0b11 << 14 | 0xffff_ffff_0000_0000;
/// Bit 10 of DR7, which always reads as 1.
pub const DR7_FIXED1: u64 = 1 << 10;
/// GE (bit 9) and the fixed bit 10: the base value the seed (QEMU 2009) wrote
/// whenever a hardware breakpoint was active.
pub const DR7_GE_FIXED: u64 = 0x600;

// Layout checks against the SDM's bit positions (kvm-bindings-style offset asserts).
const _: () = assert!(Dr7::new().with_ge(true).into_bits() == DR7_GE_FIXED);
const _: () = assert!(Dr7::new().with_gd(true).into_bits() == 1 << 13 | DR7_FIXED1);
const _: () = assert!(Dr7::new().with_rtm(true).into_bits() == 1 << 11 | DR7_FIXED1);
const _: () = assert!(Dr7::new().with_len3(Len::B8).into_bits() == 0b10 << 30 | DR7_FIXED1);
const _: () = assert!(Dr7::new().with_rw2(Condition::ReadWrite).into_bits() == 0b11 << 24 | DR7_FIXED1);
const _: () = assert!(Dr7::new().with_reserved_high(1).into_bits() == 1 << 32 | DR7_FIXED1);

/// A DR7 value that sets a reserved bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DR7 value {value:#x} sets reserved bits {reserved:#x}")]
pub struct Dr7Error {
    /// The rejected value.
    pub value: u64,
    /// The reserved bits it sets.
    pub reserved: u64,
}

impl Dr7 {
    /// The reset value: nothing enabled, bit 10 set (`0x400`).
    pub const EMPTY: Dr7 = Dr7::new();

    /// Validates a value to be loaded into DR7: rejects reserved bits and
    /// forces the fixed bit 10 to 1.
    ///
    /// # Errors
    /// [`Dr7Error`] if any bit of [`DR7_RESERVED_MASK`] is set.
    ///
    /// ```
    /// use x86_debugreg::Dr7;
    /// assert_eq!(Dr7::new_checked(0x1).unwrap().into_bits(), 0x401);
    /// assert!(Dr7::new_checked(1 << 32).is_err());
    /// ```
    pub const fn new_checked(value: u64) -> Result<Dr7, Dr7Error> {
        let reserved = value & DR7_RESERVED_MASK;
        if reserved != 0 {
            return Err(Dr7Error { value, reserved });
        }
        Ok(Dr7::from_bits(value | DR7_FIXED1))
    }

    /// The local enable bit Ln of `slot`.
    pub const fn local(self, slot: Slot) -> bool {
        self.into_bits() & (1 << (2 * slot.get())) != 0
    }

    /// The global enable bit Gn of `slot`.
    pub const fn global(self, slot: Slot) -> bool {
        self.into_bits() & (2 << (2 * slot.get())) != 0
    }

    /// Whether `slot` is enabled at all (Ln or Gn).
    pub const fn enabled(self, slot: Slot) -> bool {
        self.into_bits() & (3 << (2 * slot.get())) != 0
    }

    /// The R/Wn field of `slot`.
    pub const fn condition(self, slot: Slot) -> Condition {
        Condition::from_bits((self.into_bits() >> (16 + 4 * slot.get())) as u8)
    }

    /// The LENn field of `slot`.
    pub const fn len(self, slot: Slot) -> Len {
        Len::from_bits((self.into_bits() >> (18 + 4 * slot.get())) as u8)
    }

    /// Sets or clears the global enable Gn of `slot`.
    #[must_use]
    pub const fn with_global(self, slot: Slot, on: bool) -> Dr7 {
        let bit = 2u64 << (2 * slot.get());
        let bits = if on {
            self.into_bits() | bit
        } else {
            self.into_bits() & !bit
        };
        Dr7::from_bits(bits)
    }

    /// Sets or clears the local enable Ln of `slot`.
    #[must_use]
    pub const fn with_local(self, slot: Slot, on: bool) -> Dr7 {
        let bit = 1u64 << (2 * slot.get());
        let bits = if on {
            self.into_bits() | bit
        } else {
            self.into_bits() & !bit
        };
        Dr7::from_bits(bits)
    }

    /// Disarms `slot`: clears Ln, Gn, R/Wn and LENn (DRn itself is another
    /// register). A debugger stepping over its own execute breakpoint does
    /// this for one instruction.
    #[must_use]
    pub const fn without_slot(self, slot: Slot) -> Dr7 {
        let fields = 0xf_u64 << (16 + 4 * slot.get()) | 0b11 << (2 * slot.get());
        Dr7::from_bits(self.into_bits() & !fields)
    }

    /// Programs `slot`: writes R/Wn and LENn and sets Gn (the enable a
    /// hypervisor uses: it must survive guest task switches).
    #[must_use]
    pub const fn with_slot(self, slot: Slot, condition: Condition, len: Len) -> Dr7 {
        let shift = 16 + 4 * slot.get();
        let field = (condition.into_bits() as u64) | (len.into_bits() as u64) << 2;
        let bits = (self.into_bits() & !(0xf << shift)) | field << shift;
        Dr7::from_bits(bits).with_global(slot, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_codes_follow_sdm_table_1_2_4_8_are_00_01_11_10() {
        assert_eq!(Len::B1.into_bits(), 0b00);
        assert_eq!(Len::B2.into_bits(), 0b01);
        assert_eq!(Len::B4.into_bits(), 0b11);
        assert_eq!(Len::B8.into_bits(), 0b10);
        for bytes in 0..=16u64 {
            match Len::from_bytes(bytes) {
                Some(len) => assert_eq!(len.bytes(), bytes),
                None => assert!(![1, 2, 4, 8].contains(&bytes)),
            }
        }
    }

    #[test]
    fn condition_codes_are_execute_00_write_01_io_10_readwrite_11() {
        assert_eq!(Condition::Execute.into_bits(), 0b00);
        assert_eq!(Condition::Write.into_bits(), 0b01);
        assert_eq!(Condition::Io.into_bits(), 0b10);
        assert_eq!(Condition::ReadWrite.into_bits(), 0b11);
        for code in 0..=255u8 {
            assert_eq!(Condition::from_bits(code).into_bits(), code & 3);
            assert_eq!(Len::from_bits(code).into_bits(), code & 3);
        }
    }

    #[test]
    fn every_condition_and_len_in_every_slot_lands_at_sdm_bit_positions() {
        for slot in Slot::ALL {
            for code in 0..4u8 {
                let (c, l) = (Condition::from_bits(code), Len::from_bits(3 - code));
                let dr7 = Dr7::EMPTY.with_slot(slot, c, l);
                let n = u64::from(slot.get());
                let expected =
                    0x400 | 2 << (2 * n) | u64::from(code) << (16 + 4 * n) | u64::from(3 - code) << (18 + 4 * n);
                assert_eq!(dr7.into_bits(), expected, "slot {slot} code {code}");
                assert_eq!((dr7.condition(slot), dr7.len(slot)), (c, l));
                // The named bitfield accessors agree with the indexed ones.
                let named = [
                    (dr7.rw0(), dr7.len0()),
                    (dr7.rw1(), dr7.len1()),
                    (dr7.rw2(), dr7.len2()),
                    (dr7.rw3(), dr7.len3()),
                ];
                assert_eq!(named[slot.index()], (c, l));
                let enables = [dr7.g0(), dr7.g1(), dr7.g2(), dr7.g3()];
                assert!(enables[slot.index()] && dr7.global(slot) && !dr7.local(slot));
            }
        }
    }

    #[test]
    fn without_slot_clears_exactly_that_slots_enables_and_fields() {
        let all = Slot::ALL.iter().fold(Dr7::EMPTY.with_ge(true), |d, &s| {
            d.with_slot(s, Condition::ReadWrite, Len::B4).with_local(s, true)
        });
        for slot in Slot::ALL {
            let d = all.without_slot(slot);
            assert!(!d.enabled(slot));
            assert_eq!((d.condition(slot), d.len(slot)), (Condition::Execute, Len::B1));
            for other in Slot::ALL.into_iter().filter(|&o| o != slot) {
                assert!(d.local(other) && d.global(other) && d.condition(other) == Condition::ReadWrite);
            }
            assert!(d.ge() && d.fixed1());
        }
    }

    #[test]
    fn slot_rejects_numbers_above_three() {
        for n in 0..=255u8 {
            assert_eq!(Slot::new(n).is_some(), n < 4);
            assert_eq!(
                Slot::try_from(n).map(Slot::get),
                if n < 4 { Ok(n) } else { Err(InvalidSlot(n)) }
            );
        }
    }

    #[test]
    fn new_checked_rejects_reserved_bits_and_forces_bit_10() {
        assert_eq!(Dr7::new_checked(0).map(Dr7::into_bits), Ok(0x400));
        for bit in [12, 14, 15, 32, 47, 63] {
            let value = 1u64 << bit;
            assert_eq!(Dr7::new_checked(value), Err(Dr7Error { value, reserved: value }));
        }
        assert_eq!(Dr7::new_checked(0xffff_2fff).map(Dr7::into_bits), Ok(0xffff_2fff));
    }
}
