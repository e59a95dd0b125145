//! Decoding a `KVM_EXIT_DEBUG` into "stop for the debugger" or "give the guest
//! its own exception back" (the seed's `kvm_arch_debug`, made total and typed).
//!
//! The decision depends on the configuration **applied to the vCPU that
//! exited** ([`Applied`]), never on the `dr7` reported in the exit (hosts
//! report 0 there) and never on the newest intent (the vCPU may still run an
//! older configuration). GDB's x86 code keeps the same rule: "dr_mirror
//! represents intention, not what the thread has".

use core::fmt;

use crate::{Applied, Dr6, HwBreakpoint, Slot};

/// `#DB`, the debug exception vector.
pub const DB_VECTOR: u32 = 1;
/// `#BP`, the breakpoint exception vector.
pub const BP_VECTOR: u32 = 3;

/// The x86 part of a debug exit (`struct kvm_debug_exit_arch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct DebugExit {
    /// Exception vector: 1 (`#DB`) or 3 (`#BP`).
    pub exception: u32,
    /// Linear address of the instruction that trapped.
    pub pc: u64,
    /// DR6 as KVM reports it.
    pub dr6: u64,
    /// DR7 as KVM reports it. Not used for decoding (see the module docs).
    pub dr7: u64,
}

/// One hardware slot whose condition was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hit {
    /// The slot (DR0–DR3).
    pub slot: Slot,
    /// What the slot held in the applied configuration.
    pub breakpoint: HwBreakpoint,
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.breakpoint, self.slot)
    }
}

/// The set of hardware slots hit by one exit: all of them, not just the last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hits {
    by_slot: [Option<HwBreakpoint>; 4],
}

impl Hits {
    /// The hits in slot order.
    pub fn iter(&self) -> impl Iterator<Item = Hit> + '_ {
        Slot::ALL
            .into_iter()
            .zip(self.by_slot)
            .filter_map(|(slot, bp)| bp.map(|breakpoint| Hit { slot, breakpoint }))
    }

    /// Whether no slot was hit.
    pub fn is_empty(&self) -> bool {
        self.by_slot.iter().all(Option::is_none)
    }

    /// The breakpoint hit in `slot`, if that slot was hit.
    pub fn get(&self, slot: Slot) -> Option<HwBreakpoint> {
        self.by_slot[slot.index()]
    }

    /// The hit slots as a 4-bit mask (bit n = DRn).
    pub fn mask(&self) -> u8 {
        Slot::ALL
            .iter()
            .filter(|s| self.by_slot[s.index()].is_some())
            .fold(0, |m, s| m | 1 << s.get())
    }
}

/// Why the vCPU stopped for the debugger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stop {
    /// A `#DB` the debugger asked for: a single step, hardware slots, or both
    /// (a watchpoint hit by the instruction being stepped).
    Debug {
        /// The debugger's single step completed (DR6.BS with single-step applied).
        single_step: bool,
        /// Applied slots whose condition was met.
        hits: Hits,
    },
    /// A `#BP` at a software breakpoint the debugger set.
    Software {
        /// The breakpoint's address (the `int3` itself).
        addr: u64,
    },
}

/// The guest's own exception, to be handed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exception {
    /// `#DB` (vector 1).
    Debug,
    /// `#BP` (vector 3).
    Breakpoint,
}

impl Exception {
    /// The control flag that re-injects this exception on the next entry.
    pub const fn inject_flag(self) -> crate::ControlFlags {
        match self {
            Exception::Debug => crate::ControlFlags::INJECT_DB,
            Exception::Breakpoint => crate::ControlFlags::INJECT_BP,
        }
    }

    /// The vector number.
    pub const fn vector(self) -> u32 {
        match self {
            Exception::Debug => DB_VECTOR,
            Exception::Breakpoint => BP_VECTOR,
        }
    }
}

/// What to do with a debug exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Stop and report to the debugger.
    Stop(Stop),
    /// The exception was the guest's: re-inject it and run on.
    Reinject(Exception),
}

/// An exit that cannot be a guest-debug exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The vector is neither `#DB` (1) nor `#BP` (3). (The seed treated any
    /// such vector as `#BP`.)
    #[error("debug exit with exception vector {exception}, expected 1 (#DB) or 3 (#BP)")]
    UnexpectedException {
        /// The reported vector.
        exception: u32,
    },
}

/// Decodes `exit` against the configuration `applied` to the vCPU that exited.
/// `is_sw_breakpoint` answers whether the debugger has a software breakpoint at
/// an address.
///
/// * `#DB`: DR6.BS with single-step applied is a single step; each Bn of a
///   slot armed in `applied` is a hit (all of them are reported). Neither →
///   the guest's own `#DB`.
/// * `#BP`: a software breakpoint at `pc` → stop; else the guest's own `#BP`.
///
/// # Errors
/// [`DecodeError::UnexpectedException`] for any other vector. Never panics.
///
/// ```
/// use x86_debugreg::{decode, Applied, ControlFlags, Decision, DebugExit, GuestDebug, Stop};
/// let applied = Applied::was_set(GuestDebug { control: ControlFlags::ENABLE | ControlFlags::SINGLESTEP, debugreg: [0; 8] });
/// let exit = DebugExit { exception: 1, pc: 0x1000, dr6: 0xffff_4ff0, dr7: 0 };
/// assert!(matches!(decode(&exit, &applied, |_| false), Ok(Decision::Stop(Stop::Debug { single_step: true, .. }))));
/// ```
pub fn decode(
    exit: &DebugExit,
    applied: &Applied,
    is_sw_breakpoint: impl FnOnce(u64) -> bool,
) -> Result<Decision, DecodeError> {
    match exit.exception {
        DB_VECTOR => {
            let dr6 = Dr6::from_kvm(exit.dr6);
            let single_step = dr6.bs() && applied.single_step();
            // One pass over the four B-bits, noting whether any armed slot
            // was hit: no iterator adaptors and no second scan of `hits` on
            // this hot path (every #DB exit of a debugged vCPU).
            let mut hits = Hits::default();
            let mut hit = false;
            for slot in Slot::ALL {
                if dr6.hit(slot) {
                    let bp = applied.armed(slot);
                    hit |= bp.is_some();
                    hits.by_slot[slot.index()] = bp;
                }
            }
            Ok(if single_step || hit {
                Decision::Stop(Stop::Debug { single_step, hits })
            } else {
                Decision::Reinject(Exception::Debug)
            })
        }
        BP_VECTOR => Ok(if is_sw_breakpoint(exit.pc) {
            Decision::Stop(Stop::Software { addr: exit.pc })
        } else {
            Decision::Reinject(Exception::Breakpoint)
        }),
        exception => Err(DecodeError::UnexpectedException { exception }),
    }
}
