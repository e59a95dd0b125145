//! Which breakpoint conditions one access meets: the B0–B3 bits of DR6 the
//! CPU sets for it (Intel SDM Vol. 3B §18.2.5, "Breakpoint Field Recognition";
//! §17.2.5 in older editions; AMD APM Vol. 2 §13.1.1.5).
//!
//! The rules, per slot n:
//!
//! * **Data breakpoints** (R/Wn = `01` write, `11` read or write): DRn and
//!   LENn define a range of 1, 2, 4 or 8 bytes; "the processor … uses LENn
//!   field bits to mask the lower address bits in the debug registers", so the
//!   range is `[DRn & !(len - 1), +len)` even when DRn is misaligned (the SDM
//!   calls such addresses "not valid"; masking is what it says the hardware
//!   does). "A data breakpoint … is triggered if any of the bytes
//!   participating in an access is within the range": an access matches when
//!   it *overlaps* the range. `01` matches writes only, `11` reads and writes,
//!   neither matches instruction fetches.
//! * **Execute breakpoints** (R/Wn = `00`): "the processor recognizes an
//!   instruction breakpoint address only when it points to the first byte of an
//!   instruction" (the first prefix, if any): a fetch matches when the
//!   instruction starts exactly at DRn. LENn should be `00`; other lengths are
//!   undefined (§18.2.4) — this model then still compares DRn exactly.
//! * **I/O breakpoints** (R/Wn = `10`) never match a memory access.
//! * A slot counts only if it is **enabled** (Ln or Gn, §18.2.4).
//!
//! # Enabled slots only
//!
//! [`hits`] answers for enabled slots. Real CPUs may also set Bn for a slot
//! whose condition is met but which is not enabled (SDM §18.2.3: "B0 through
//! B3 … may be set even if the breakpoint is not enabled by the Ln and Gn
//! flags in register DR7"), so a raw DR6 must be masked with
//! [`SlotMask::enabled`] before it is compared with a prediction. Whether the
//! condition of a slot is met regardless of its enables is
//! [`condition_met`].
//!
//! The crate's `tests/cpu_oracle.rs` checks these predictions against the CPU
//! of the machine running the tests (Linux, x86-64, via ptrace).
//!
//! ```
//! use x86_debugreg::predict::{self, Access};
//! use x86_debugreg::{HwBreakpoint, HwKind, HwSlots, Slot};
//! let mut slots = HwSlots::new();
//! slots.insert(HwBreakpoint::new(HwKind::Write, 0x1000, 8)?)?; // DR0
//! slots.insert(HwBreakpoint::new(HwKind::ReadWrite, 0x1004, 4)?)?; // DR1
//! // A 2-byte store at 0x1006 touches both ranges.
//! let hits = predict::hits_in(&slots, Access::write(0x1006, 2));
//! assert_eq!(hits.iter().collect::<Vec<_>>(), [Slot::DR0, Slot::DR1]);
//! // A 1-byte load at 0x1004: DR0 watches writes only.
//! assert_eq!(predict::hits_in(&slots, Access::read(0x1004, 1)).bits(), 0b10);
//! # Ok::<(), x86_debugreg::HwError>(())
//! ```

use core::fmt;

use crate::{Condition, Dr6, Dr7, HwBreakpoint, HwSlots, Len, Slot};

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum AccessKind {
    /// A data read (load).
    Read,
    /// A data write (store). A read-modify-write instruction is a write.
    Write,
    /// An instruction fetch: the CPU starting to execute the instruction whose
    /// first byte (first prefix, if any) is at the address.
    Execute,
}

/// One access: its first byte's linear address, its size and its kind.
///
/// ```
/// use x86_debugreg::predict::{Access, AccessKind};
/// let a = Access::write(0x2001, 4);
/// assert_eq!((a.addr, a.size, a.kind), (0x2001, 4, AccessKind::Write));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct Access {
    /// Linear address of the first byte accessed (of the instruction, for a
    /// fetch). Addresses wrap modulo 2^64.
    pub addr: u64,
    /// Bytes accessed (1, 2, 4 and 8 are the plain `mov` widths; any size
    /// works, and a 0-byte access touches nothing). Ignored for
    /// [`AccessKind::Execute`].
    pub size: u64,
    /// Read, write or fetch.
    pub kind: AccessKind,
}

impl Access {
    /// A `size`-byte data read at `addr`.
    pub const fn read(addr: u64, size: u64) -> Access {
        Access {
            addr,
            size,
            kind: AccessKind::Read,
        }
    }

    /// A `size`-byte data write at `addr`.
    pub const fn write(addr: u64, size: u64) -> Access {
        Access {
            addr,
            size,
            kind: AccessKind::Write,
        }
    }

    /// The fetch of the instruction starting at `addr`.
    pub const fn execute(addr: u64) -> Access {
        Access {
            addr,
            size: 1,
            kind: AccessKind::Execute,
        }
    }
}

/// A set of slots, as the B0–B3 bits of DR6 hold it (bit n = DRn).
///
/// ```
/// use x86_debugreg::predict::SlotMask;
/// use x86_debugreg::{Dr6, Slot};
/// let m = SlotMask::from(Dr6::from_bits(0xffff_0ff5));
/// assert_eq!(m.iter().collect::<Vec<_>>(), [Slot::DR0, Slot::DR2]);
/// assert_eq!(m.bits(), 0b0101);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotMask(u8);

impl SlotMask {
    /// No slot.
    pub const EMPTY: SlotMask = SlotMask(0);
    /// All four slots.
    pub const ALL: SlotMask = SlotMask(0xf);

    /// The set of the slots whose bit is set in the low four bits of `bits`;
    /// higher bits are ignored (so a DR6 value's low byte can be passed in).
    pub const fn from_bits_truncate(bits: u8) -> SlotMask {
        SlotMask(bits & 0xf)
    }

    /// Bit n set for each slot DRn in the set.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set holding only `slot`.
    pub const fn single(slot: Slot) -> SlotMask {
        SlotMask(1 << slot.get())
    }

    /// This set plus `slot`.
    #[must_use]
    pub const fn with(self, slot: Slot) -> SlotMask {
        SlotMask(self.0 | 1 << slot.get())
    }

    /// Whether `slot` is in the set.
    pub const fn contains(self, slot: Slot) -> bool {
        self.0 & 1 << slot.get() != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Slots in either set.
    #[must_use]
    pub const fn union(self, other: SlotMask) -> SlotMask {
        SlotMask(self.0 | other.0)
    }

    /// Slots in both sets.
    #[must_use]
    pub const fn intersection(self, other: SlotMask) -> SlotMask {
        SlotMask(self.0 & other.0)
    }

    /// The slots enabled in `dr7` (Ln or Gn set, SDM Vol. 3B §18.2.4). Mask a
    /// raw DR6 with this before comparing it with a prediction (see the module
    /// docs).
    pub const fn enabled(dr7: Dr7) -> SlotMask {
        let bits = dr7.into_bits();
        let mut mask = 0;
        let mut n = 0;
        while n < 4 {
            if bits & 3 << (2 * n) != 0 {
                mask |= 1 << n;
            }
            n += 1;
        }
        SlotMask(mask)
    }

    /// The slots in the set, in register order.
    pub fn iter(self) -> impl Iterator<Item = Slot> {
        Slot::ALL.into_iter().filter(move |&s| self.contains(s))
    }
}

impl From<Dr6> for SlotMask {
    /// B0–B3 of a DR6 value.
    fn from(dr6: Dr6) -> SlotMask {
        SlotMask(dr6.hit_mask())
    }
}

impl fmt::Display for SlotMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        for (i, slot) in self.iter().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            write!(f, "{slot}")?;
        }
        Ok(())
    }
}

/// Whether two ranges `[a, a + a_len)` and `[b, b + b_len)` (lengths ≥ 1)
/// share a byte, with addresses modulo 2^64: they do exactly when one starts
/// inside the other.
const fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    b.wrapping_sub(a) < a_len || a.wrapping_sub(b) < b_len
}

/// Whether an access meets the condition of a slot holding address `dr` with
/// R/W field `condition` and LEN field `len` — **whether or not the slot is
/// enabled** (SDM Vol. 3B §18.2.5; see the module docs for the rules).
///
/// ```
/// use x86_debugreg::predict::{condition_met, Access};
/// use x86_debugreg::{Condition, Len};
/// // A 4-byte range at a misaligned DRn: the CPU masks the low bits.
/// assert!(condition_met(0x1003, Condition::ReadWrite, Len::B4, Access::read(0x1000, 1)));
/// // Execute breakpoints match only the first byte of an instruction.
/// assert!(!condition_met(0x1001, Condition::Execute, Len::B1, Access::execute(0x1000)));
/// // R/W = 10 is I/O: never a memory access.
/// assert!(!condition_met(0x1000, Condition::Io, Len::B1, Access::write(0x1000, 1)));
/// ```
pub const fn condition_met(dr: u64, condition: Condition, len: Len, access: Access) -> bool {
    let data_match = match (condition, access.kind) {
        (Condition::Execute, AccessKind::Execute) => return access.addr == dr,
        (Condition::Write, AccessKind::Write) => true,
        (Condition::ReadWrite, AccessKind::Read | AccessKind::Write) => true,
        // Fetches never meet a data condition, data accesses never meet an
        // execute condition, reads never meet a write condition, and memory
        // accesses never meet an I/O condition.
        _ => false,
    };
    if !data_match || access.size == 0 {
        return false;
    }
    let bytes = len.bytes();
    overlaps(dr & !(bytes - 1), bytes, access.addr, access.size)
}

/// Whether an access meets the condition of `bp` (as programmed into an
/// enabled slot).
///
/// ```
/// use x86_debugreg::predict::{breakpoint_matches, Access};
/// use x86_debugreg::{HwBreakpoint, HwKind};
/// let bp = HwBreakpoint::new(HwKind::Write, 0x1008, 8)?;
/// assert!(breakpoint_matches(bp, Access::write(0x1006, 4)));
/// assert!(!breakpoint_matches(bp, Access::read(0x1008, 8)));
/// assert!(!breakpoint_matches(bp, Access::write(0x1010, 1)));
/// # Ok::<(), x86_debugreg::HwError>(())
/// ```
pub const fn breakpoint_matches(bp: HwBreakpoint, access: Access) -> bool {
    condition_met(bp.addr(), bp.kind().condition(), bp.len(), access)
}

/// The B0–B3 bits the CPU sets in DR6 for `access`, given DR0–DR3 (`dr`) and
/// DR7: the enabled slots whose condition the access meets.
///
/// Only enabled slots are predicted; compare with a raw DR6 masked by
/// [`SlotMask::enabled`] (module docs). Bits of DR7 other than Ln, Gn, R/Wn and
/// LENn (LE, GE, GD, RTM, reserved) do not affect matching.
///
/// ```
/// use x86_debugreg::predict::{hits, Access};
/// use x86_debugreg::{Condition, Dr7, Len, Slot};
/// let dr7 = Dr7::EMPTY
///     .with_slot(Slot::DR0, Condition::ReadWrite, Len::B2)
///     .with_slot(Slot::DR3, Condition::ReadWrite, Len::B2)
///     .with_global(Slot::DR3, false); // DR3 programmed but disabled
/// let dr = [0x5000, 0, 0, 0x5000];
/// assert_eq!(hits(dr, dr7, Access::read(0x5001, 1)).bits(), 0b0001);
/// ```
pub fn hits(dr: [u64; 4], dr7: Dr7, access: Access) -> SlotMask {
    let enabled = SlotMask::enabled(dr7);
    Slot::ALL
        .into_iter()
        .filter(|&slot| enabled.contains(slot))
        .filter(|&slot| condition_met(dr[slot.index()], dr7.condition(slot), dr7.len(slot), access))
        .fold(SlotMask::EMPTY, SlotMask::with)
}

/// [`hits`] for the registers `slots` programs ([`HwSlots::addresses`] and
/// [`HwSlots::dr7`]).
pub fn hits_in(slots: &HwSlots, access: Access) -> SlotMask {
    hits(slots.addresses(), slots.dr7(), access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HwKind;

    /// The debug-register setup of the SDM's "Breakpoint Examples" table
    /// (Vol. 3B §18.2.5).
    fn sdm_example() -> ([u64; 4], Dr7) {
        let dr7 = Dr7::EMPTY
            .with_slot(Slot::DR0, Condition::ReadWrite, Len::B1)
            .with_slot(Slot::DR1, Condition::Write, Len::B1)
            .with_slot(Slot::DR2, Condition::ReadWrite, Len::B2)
            .with_slot(Slot::DR3, Condition::Write, Len::B4);
        ([0xA_0001, 0xA_0002, 0xB_0002, 0xC_0000], dr7)
    }

    #[test]
    fn sdm_breakpoint_examples_that_trap_hit_the_overlapped_slots() {
        let (dr, dr7) = sdm_example();
        // (access, slots it meets), from the table's "operations that trap".
        let cases = [
            (Access::read(0xA_0001, 1), 0b0001),
            (Access::write(0xA_0001, 1), 0b0001),
            (Access::read(0xA_0001, 2), 0b0001),
            (Access::write(0xA_0001, 2), 0b0011),
            (Access::write(0xA_0002, 1), 0b0010),
            (Access::write(0xA_0002, 2), 0b0010),
            (Access::read(0xB_0001, 4), 0b0100),
            (Access::write(0xB_0002, 1), 0b0100),
            (Access::read(0xB_0002, 2), 0b0100),
            (Access::write(0xC_0000, 4), 0b1000),
            (Access::write(0xC_0001, 2), 0b1000),
            (Access::write(0xC_0003, 1), 0b1000),
        ];
        for (access, bits) in cases {
            assert_eq!(hits(dr, dr7, access).bits(), bits, "{access:x?}");
        }
    }

    #[test]
    fn accesses_next_to_the_sdm_example_ranges_or_of_the_wrong_kind_hit_nothing() {
        let (dr, dr7) = sdm_example();
        let cases = [
            Access::write(0xA_0000, 1), // just below DR0
            Access::read(0xA_0002, 1),  // DR1 watches writes only
            Access::write(0xA_0003, 4), // just above DR1
            Access::write(0xB_0000, 1), // just below DR2
            Access::write(0xB_0004, 2), // just above DR2
            Access::read(0xC_0000, 4),  // DR3 watches writes only
            Access::write(0xC_0004, 4), // just above DR3
            Access::execute(0xA_0001),  // a fetch never meets a data condition
        ];
        for access in cases {
            assert!(hits(dr, dr7, access).is_empty(), "{access:x?}");
        }
    }

    #[test]
    fn data_ranges_ignore_the_low_address_bits_len_masks() {
        for len in [Len::B1, Len::B2, Len::B4, Len::B8] {
            let bytes = len.bytes();
            for low in 0..bytes {
                let dr = 0x7000 + low;
                for addr in 0x6ff0..0x7010 {
                    let inside = (0x7000..0x7000 + bytes).contains(&addr);
                    assert_eq!(
                        condition_met(dr, Condition::ReadWrite, len, Access::read(addr, 1)),
                        inside,
                        "DR {dr:#x} len {bytes} read {addr:#x}"
                    );
                }
            }
        }
    }

    #[test]
    fn wide_accesses_match_when_any_byte_is_in_range() {
        // 8-byte watch at 0x100: any access touching 0x100..0x108.
        for size in [1u64, 2, 4, 8, 16] {
            for addr in 0xe0..0x120u64 {
                let touches = addr < 0x108 && addr + size > 0x100;
                assert_eq!(
                    condition_met(0x100, Condition::Write, Len::B8, Access::write(addr, size)),
                    touches,
                    "{size} bytes at {addr:#x}"
                );
            }
        }
    }

    #[test]
    fn execute_matches_only_the_exact_first_byte_and_only_fetches() {
        for addr in 0x3ff8..0x4008 {
            assert_eq!(
                condition_met(0x4000, Condition::Execute, Len::B1, Access::execute(addr)),
                addr == 0x4000
            );
        }
        assert!(!condition_met(
            0x4000,
            Condition::Execute,
            Len::B1,
            Access::read(0x4000, 1)
        ));
        assert!(!condition_met(
            0x4000,
            Condition::Execute,
            Len::B1,
            Access::write(0x4000, 8)
        ));
    }

    #[test]
    fn write_condition_ignores_reads_and_readwrite_takes_both() {
        let w = |a| condition_met(0x10, Condition::Write, Len::B4, a);
        let rw = |a| condition_met(0x10, Condition::ReadWrite, Len::B4, a);
        assert!(w(Access::write(0x12, 1)) && !w(Access::read(0x12, 1)));
        assert!(rw(Access::write(0x12, 1)) && rw(Access::read(0x12, 1)));
    }

    #[test]
    fn io_condition_never_matches_memory() {
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Execute] {
            for len in [Len::B1, Len::B2, Len::B4, Len::B8] {
                let access = Access {
                    addr: 0x80,
                    size: 8,
                    kind,
                };
                assert!(!condition_met(0x80, Condition::Io, len, access));
            }
        }
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space_wrap() {
        let top = u64::MAX - 3; // 4-byte range ending at u64::MAX
        assert!(condition_met(
            top,
            Condition::Write,
            Len::B4,
            Access::write(u64::MAX, 1)
        ));
        assert!(condition_met(
            top,
            Condition::Write,
            Len::B4,
            Access::write(u64::MAX - 1, 8)
        ));
        assert!(!condition_met(top, Condition::Write, Len::B4, Access::write(0, 1)));
        // An access that wraps from the top into address 0.
        assert!(condition_met(0, Condition::Write, Len::B1, Access::write(u64::MAX, 2)));
        // A 0-byte access touches nothing.
        assert!(!condition_met(0, Condition::Write, Len::B1, Access::write(0, 0)));
    }

    #[test]
    fn disabled_slots_are_never_predicted_and_local_or_global_enables() {
        for slot in Slot::ALL {
            let armed = Dr7::EMPTY.with_slot(slot, Condition::Write, Len::B1);
            let dr = [0x900; 4];
            let access = Access::write(0x900, 1);
            let disabled = armed.with_global(slot, false);
            assert_eq!(hits(dr, armed, access), SlotMask::single(slot));
            assert_eq!(hits(dr, disabled, access), SlotMask::EMPTY);
            assert_eq!(
                hits(dr, disabled.with_local(slot, true), access),
                SlotMask::single(slot)
            );
            // The condition itself is still met: the CPU may report it.
            assert!(condition_met(
                0x900,
                disabled.condition(slot),
                disabled.len(slot),
                access
            ));
        }
    }

    #[test]
    fn enabled_mask_reads_ln_and_gn_of_every_slot() {
        for bits in 0..=0xffu64 {
            let mask = SlotMask::enabled(Dr7::from_bits(bits | 0xffff_0000));
            for slot in Slot::ALL {
                let n = slot.get();
                assert_eq!(mask.contains(slot), bits >> (2 * n) & 3 != 0);
            }
        }
    }

    #[test]
    fn hits_in_agrees_with_breakpoint_matches_for_every_used_slot() {
        let mut slots = HwSlots::new();
        let bps = [
            HwBreakpoint::new(HwKind::Execute, 0x1000, 1).unwrap(),
            HwBreakpoint::new(HwKind::Write, 0x1000, 8).unwrap(),
            HwBreakpoint::new(HwKind::ReadWrite, 0x1006, 2).unwrap(),
        ];
        for bp in bps {
            slots.insert(bp).unwrap();
        }
        for addr in 0xff8..0x1010 {
            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Execute] {
                let access = Access { addr, size: 2, kind };
                let expected = slots
                    .iter()
                    .filter(|&(_, bp)| breakpoint_matches(bp, access))
                    .fold(SlotMask::EMPTY, |m, (s, _)| m.with(s));
                assert_eq!(hits_in(&slots, access), expected, "{access:x?}");
            }
        }
    }

    #[test]
    fn slot_mask_round_trips_dr6_bits_and_prints_slots() {
        for bits in 0..=0xffu8 {
            let m = SlotMask::from_bits_truncate(bits);
            assert_eq!(m.bits(), bits & 0xf);
            assert_eq!(m.iter().fold(SlotMask::EMPTY, SlotMask::with), m);
        }
        assert_eq!(alloc::format!("{}", SlotMask::from_bits_truncate(0b1010)), "DR1|DR3");
        assert_eq!(alloc::format!("{}", SlotMask::EMPTY), "none");
    }
}
