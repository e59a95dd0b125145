//! GDB remote-protocol breakpoint types (the `type` of `Z`/`z` packets, GDB
//! manual "Packets": `Z0`…`Z4`).

use core::fmt;

/// The kind of breakpoint a debugger asks for, numbered as GDB's `Z` packets.
///
/// ```
/// use x86_debugreg::BreakpointType;
/// assert_eq!(BreakpointType::try_from(2), Ok(BreakpointType::WriteWatch));
/// assert!(BreakpointType::try_from(5).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[repr(u8)]
pub enum BreakpointType {
    /// `Z0`: software breakpoint (`int3`, byte `0xCC`, patched into memory).
    Software = 0,
    /// `Z1`: hardware execute breakpoint (a debug address register).
    Hardware = 1,
    /// `Z2`: write watchpoint.
    WriteWatch = 2,
    /// `Z3`: read watchpoint. x86 has no read-only condition.
    ReadWatch = 3,
    /// `Z4`: access (read or write) watchpoint.
    AccessWatch = 4,
}

impl BreakpointType {
    /// Every type, in GDB's numbering.
    pub const ALL: [BreakpointType; 5] = [
        BreakpointType::Software,
        BreakpointType::Hardware,
        BreakpointType::WriteWatch,
        BreakpointType::ReadWatch,
        BreakpointType::AccessWatch,
    ];

    /// The `Z` packet number.
    pub const fn gdb_number(self) -> u8 {
        self as u8
    }
}

impl TryFrom<u64> for BreakpointType {
    type Error = UnknownBreakpointType;
    fn try_from(number: u64) -> Result<BreakpointType, UnknownBreakpointType> {
        match number {
            0 => Ok(BreakpointType::Software),
            1 => Ok(BreakpointType::Hardware),
            2 => Ok(BreakpointType::WriteWatch),
            3 => Ok(BreakpointType::ReadWatch),
            4 => Ok(BreakpointType::AccessWatch),
            _ => Err(UnknownBreakpointType(number)),
        }
    }
}

impl fmt::Display for BreakpointType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakpointType::Software => "software breakpoint",
            BreakpointType::Hardware => "hardware breakpoint",
            BreakpointType::WriteWatch => "write watchpoint",
            BreakpointType::ReadWatch => "read watchpoint",
            BreakpointType::AccessWatch => "access watchpoint",
        })
    }
}

/// A GDB breakpoint type number outside `0..=4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown GDB breakpoint type {0}")]
pub struct UnknownBreakpointType(pub u64);
