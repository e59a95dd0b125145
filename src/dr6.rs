//! DR6, the debug status register (Intel SDM Vol. 3B §18.2.3, "Debug Status
//! Register (DR6)").
//!
//! Two bits are *active low*: BLD (bit 11, bus-lock detected) and RTM (bit 16,
//! #DB inside an RTM region) read as 1 when nothing happened. The value a
//! debugger sees at rest is therefore `0xffff_0ff0`, not 0.
//!
//! [`Dr6::from_bits`] keeps a value verbatim (a value read from the CPU);
//! [`Dr6::from_kvm`] normalises the value a `KVM_EXIT_DEBUG` reports: KVM
//! kernels before the DR6 active-low rework reported the at-rest value as
//! `0xfffe_0ff0` (bit 16 clear) on hosts without RTM, so bit 16 in an exit does
//! not mean "RTM". KVM's guest-debug exits are never taken inside an RTM
//! region a host debugger set up (that needs DR7.RTM and IA32_DEBUGCTL.RTM in
//! the guest), so `from_kvm` reports RTM as inactive. `0xffff_4ff0` and
//! `0xfffe_4ff0` both normalise to the same single-step status.

use bitfield_struct::bitfield;

use crate::Slot;

/// The debug status register, DR6 (SDM Vol. 3B §18.2.3, Figure 18-1).
///
/// ```
/// use x86_debugreg::{Dr6, Slot};
/// let dr6 = Dr6::from_kvm(0xffff_0ff0 | 1 << 2);
/// assert_eq!(dr6.hits().collect::<Vec<_>>(), [Slot::DR2]);
/// assert!(!dr6.bs());
/// ```
#[bitfield(u64, default = false)]
#[derive(PartialEq, Eq, Hash)]
pub struct Dr6 {
    /// B0 (bit 0): the DR0 breakpoint condition was met.
    pub b0: bool,
    /// B1 (bit 1).
    pub b1: bool,
    /// B2 (bit 2).
    pub b2: bool,
    /// B3 (bit 3).
    pub b3: bool,
    /// Bits 4–10: reserved, read as 1.
    #[bits(7)]
    pub reserved4: u8,
    /// BLD (bit 11), active low: 0 means a bus lock was detected.
    pub bld: bool,
    /// Bit 12: reserved, reads as 0.
    #[bits(1)]
    pub reserved12: bool,
    /// BD (bit 13): the next instruction accesses a debug register (DR7.GD).
    pub bd: bool,
    /// BS (bit 14): single step (RFLAGS.TF).
    pub bs: bool,
    /// BT (bit 15): task switch to a TSS with the T flag.
    pub bt: bool,
    /// RTM (bit 16), active low: 0 means #DB inside an RTM region.
    pub rtm: bool,
    /// Bits 17–31: reserved, read as 1.
    #[bits(15)]
    pub reserved17: u16,
    /// Bits 32–63: reserved, read as 0.
    #[bits(32)]
    pub reserved_high: u32,
}

/// DR6 at rest: no condition recorded, active-low bits inactive.
pub const DR6_AT_REST: u64 = 0xffff_0ff0;
/// The bits of DR6 that carry status (B0–B3, BLD, BD, BS, BT, RTM).
pub const DR6_STATUS_MASK: u64 = 0xf | 1 << 11 | 1 << 13 | 1 << 14 | 1 << 15 | 1 << 16;

const _: () = assert!(Dr6::new().with_bs(true).into_bits() == 1 << 14);
const _: () = assert!(Dr6::new().with_bld(true).with_rtm(true).into_bits() == 1 << 11 | 1 << 16);
const _: () =
    assert!(Dr6::new().with_reserved4(0x7f).with_reserved17(0x7fff).into_bits() | 1 << 11 | 1 << 16 == DR6_AT_REST);

impl Dr6 {
    /// DR6 at rest ([`DR6_AT_REST`]).
    pub const AT_REST: Dr6 = Dr6::from_bits(DR6_AT_REST);

    /// Normalises the `dr6` of a `KVM_EXIT_DEBUG`: keeps B0–B3, BLD, BD, BS and
    /// BT, sets every reserved bit to its at-rest value and reports RTM as
    /// inactive (see the module docs for why bit 16 cannot be trusted).
    ///
    /// ```
    /// use x86_debugreg::Dr6;
    /// assert_eq!(Dr6::from_kvm(0xffff_4ff0), Dr6::from_kvm(0xfffe_4ff0));
    /// assert!(Dr6::from_kvm(0xfffe_4ff0).bs());
    /// ```
    pub const fn from_kvm(raw: u64) -> Dr6 {
        let kept = raw & (DR6_STATUS_MASK & !(1 << 16));
        Dr6::from_bits(kept | (DR6_AT_REST & !(1 << 11)))
    }

    /// Whether slot `slot`'s condition was met (Bn).
    pub const fn hit(self, slot: Slot) -> bool {
        self.into_bits() & (1 << slot.get()) != 0
    }

    /// The B0–B3 bits as a 4-bit mask.
    pub const fn hit_mask(self) -> u8 {
        (self.into_bits() & 0xf) as u8
    }

    /// Whether a bus lock was detected (BLD clear).
    pub const fn bus_lock_detected(self) -> bool {
        !self.bld()
    }

    /// Whether the #DB happened inside an RTM region (RTM bit clear).
    pub const fn in_rtm_region(self) -> bool {
        !self.rtm()
    }

    /// The slots whose Bn bit is set, in register order.
    pub fn hits(self) -> impl Iterator<Item = Slot> {
        Slot::ALL.into_iter().filter(move |&s| self.hit(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_single_step_values_with_and_without_bit_16_are_both_single_step() {
        let a = Dr6::from_kvm(0xffff_4ff0);
        let b = Dr6::from_kvm(0xfffe_4ff0);
        assert_eq!(a, b);
        assert!(a.bs() && a.hit_mask() == 0 && !a.in_rtm_region() && !a.bus_lock_detected());
        assert_eq!(a.into_bits(), 0xffff_4ff0);
    }

    #[test]
    fn kvm_execute_breakpoint_values_report_their_slot() {
        for slot in Slot::ALL {
            let dr6 = Dr6::from_kvm(DR6_AT_REST | 1 << slot.get());
            assert_eq!(dr6.hits().collect::<alloc::vec::Vec<_>>(), [slot]);
            assert!(!dr6.bs());
        }
    }

    #[test]
    fn from_kvm_keeps_bld_active_low() {
        assert!(Dr6::from_kvm(DR6_AT_REST & !(1 << 11)).bus_lock_detected());
        assert!(!Dr6::from_kvm(DR6_AT_REST).bus_lock_detected());
    }
}
