//! The guest-debug request a VMM hands to KVM: a pure mirror of
//! `struct kvm_guest_debug` (Linux `Documentation/virt/kvm/api.rst`,
//! `KVM_SET_GUEST_DEBUG`) for x86.

use core::fmt;
use core::ops::{BitOr, BitOrAssign};

use crate::{Dr7, HwBreakpoint, HwKind, Slot};

/// `kvm_guest_debug.control`: the `KVM_GUESTDBG_*` flags, with the kernel's
/// values (`include/uapi/linux/kvm.h`, `arch/x86/include/uapi/asm/kvm.h`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ControlFlags(u32);

impl ControlFlags {
    /// No flag.
    pub const NONE: ControlFlags = ControlFlags(0);
    /// `KVM_GUESTDBG_ENABLE`: guest debugging is on.
    pub const ENABLE: ControlFlags = ControlFlags(0x1);
    /// `KVM_GUESTDBG_SINGLESTEP`: exit after every instruction.
    pub const SINGLESTEP: ControlFlags = ControlFlags(0x2);
    /// `KVM_GUESTDBG_USE_SW_BP`: `#BP` (`int3`) exits to userspace.
    pub const USE_SW_BP: ControlFlags = ControlFlags(0x1_0000);
    /// `KVM_GUESTDBG_USE_HW_BP`: load `debugreg` into the hardware.
    pub const USE_HW_BP: ControlFlags = ControlFlags(0x2_0000);
    /// `KVM_GUESTDBG_INJECT_DB`: inject a `#DB` into the guest on entry.
    pub const INJECT_DB: ControlFlags = ControlFlags(0x4_0000);
    /// `KVM_GUESTDBG_INJECT_BP`: inject a `#BP` into the guest on entry.
    pub const INJECT_BP: ControlFlags = ControlFlags(0x8_0000);

    /// The raw value for `kvm_guest_debug.control`.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Any raw value, unknown bits kept.
    pub const fn from_bits_retain(bits: u32) -> ControlFlags {
        ControlFlags(bits)
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: ControlFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `self` with the flags of `other` added.
    #[must_use]
    pub const fn union(self, other: ControlFlags) -> ControlFlags {
        ControlFlags(self.0 | other.0)
    }

    /// `self` without the flags of `other`.
    #[must_use]
    pub const fn difference(self, other: ControlFlags) -> ControlFlags {
        ControlFlags(self.0 & !other.0)
    }
}

impl BitOr for ControlFlags {
    type Output = ControlFlags;
    fn bitor(self, rhs: ControlFlags) -> ControlFlags {
        self.union(rhs)
    }
}

impl BitOrAssign for ControlFlags {
    fn bitor_assign(&mut self, rhs: ControlFlags) {
        *self = self.union(rhs);
    }
}

impl fmt::Debug for ControlFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(ControlFlags, &str); 6] = [
            (ControlFlags::ENABLE, "ENABLE"),
            (ControlFlags::SINGLESTEP, "SINGLESTEP"),
            (ControlFlags::USE_SW_BP, "USE_SW_BP"),
            (ControlFlags::USE_HW_BP, "USE_HW_BP"),
            (ControlFlags::INJECT_DB, "INJECT_DB"),
            (ControlFlags::INJECT_BP, "INJECT_BP"),
        ];
        write!(f, "ControlFlags({:#x}", self.0)?;
        let mut sep = ": ";
        for (flag, name) in NAMES {
            if self.contains(flag) {
                write!(f, "{sep}{name}")?;
                sep = " | ";
            }
        }
        f.write_str(")")
    }
}

/// `struct kvm_guest_debug` for x86: control flags and `arch.debugreg[8]`
/// (DR0–DR3, two unused, DR6 unused on input, DR7).
///
/// Built by [`DebugState::guest_debug`](crate::DebugState::guest_debug); a
/// VMM copies it into `kvm_bindings::kvm_guest_debug` field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GuestDebug {
    /// `control`.
    pub control: ControlFlags,
    /// `arch.debugreg`: `[DR0, DR1, DR2, DR3, 0, 0, DR6 (unused), DR7]`.
    pub debugreg: [u64; 8],
}

impl GuestDebug {
    /// Debugging off: no flag, all registers zero.
    pub const DISABLED: GuestDebug = GuestDebug {
        control: ControlFlags::NONE,
        debugreg: [0; 8],
    };

    /// Whether this configuration single-steps (ENABLE and SINGLESTEP).
    pub const fn single_step(&self) -> bool {
        self.control
            .contains(ControlFlags::ENABLE.union(ControlFlags::SINGLESTEP))
    }

    /// Whether this configuration loads the debug registers (ENABLE and USE_HW_BP).
    pub const fn uses_hw_breakpoints(&self) -> bool {
        self.control
            .contains(ControlFlags::ENABLE.union(ControlFlags::USE_HW_BP))
    }

    /// Whether `#BP` exits to the VMM (ENABLE and USE_SW_BP).
    pub const fn uses_sw_breakpoints(&self) -> bool {
        self.control
            .contains(ControlFlags::ENABLE.union(ControlFlags::USE_SW_BP))
    }

    /// DR7 as requested (`debugreg[7]`).
    pub const fn dr7(&self) -> Dr7 {
        Dr7::from_bits(self.debugreg[7])
    }

    /// The hardware breakpoint this configuration arms in `slot`: the slot is
    /// enabled (Ln or Gn) in `debugreg[7]`, USE_HW_BP is on, and its R/W code
    /// is not I/O. Read back from the registers themselves, so it is exactly
    /// what a vCPU given this configuration runs with.
    pub const fn armed(&self, slot: Slot) -> Option<HwBreakpoint> {
        let dr7 = self.dr7();
        if !self.uses_hw_breakpoints() || !dr7.enabled(slot) {
            return None;
        }
        match HwKind::from_condition(dr7.condition(slot)) {
            Some(kind) => Some(HwBreakpoint::armed(kind, self.debugreg[slot.index()], dr7.len(slot))),
            None => None,
        }
    }
}

/// A configuration that **was applied** to a vCPU: the argument of a
/// `KVM_SET_GUEST_DEBUG` that succeeded. Exits are decoded against it
/// ([`decode`](fn@crate::decode)), never against the debugger's newest intent
/// (the vCPU may still run an older configuration) nor the exit's `dr7`.
///
/// A distinct type so that the intent cannot be passed where the applied
/// configuration is needed by accident: the only way to get one is to say
/// "this is what I set" with [`Applied::was_set`]. `kvm-glue`'s per-vCPU
/// handle is the only place that calls it there, right after its ioctl.
///
/// ```
/// use x86_debugreg::{Applied, ControlFlags, GuestDebug};
/// let intent = GuestDebug { control: ControlFlags::ENABLE | ControlFlags::SINGLESTEP, debugreg: [0; 8] };
/// // vcpu.set_guest_debug(&intent)?;  -- and only when it succeeded:
/// let applied = Applied::was_set(intent);
/// assert!(applied.single_step());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Applied(GuestDebug);

impl Applied {
    /// Debugging off: what KVM holds for a vCPU nobody configured.
    pub const DISABLED: Applied = Applied(GuestDebug::DISABLED);

    /// Records that `config` was handed to `KVM_SET_GUEST_DEBUG` and the call
    /// succeeded.
    pub const fn was_set(config: GuestDebug) -> Applied {
        Applied(config)
    }

    /// The configuration.
    pub const fn config(&self) -> &GuestDebug {
        &self.0
    }
}

impl core::ops::Deref for Applied {
    type Target = GuestDebug;
    fn deref(&self) -> &GuestDebug {
        &self.0
    }
}
