//! DR7 and DR6 bit by bit, typed out from the Intel SDM (Vol. 3B, Figure
//! 18-1 "Debug Registers", §18.2.3 "Debug Status Register (DR6)", §18.2.4
//! "Debug Control Register (DR7)"; AMD APM Vol. 2 §13.1.1). These tables are
//! the expected values of the suites: nothing here is computed from the
//! crate's constants.
#![allow(dead_code)]

/// What one DR7 bit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dr7Bit {
    /// An architectural field (or one bit of a 2-bit field), by SDM name.
    Field(&'static str),
    /// Reserved, reads as 1 (bit 10).
    Fixed1,
    /// Reserved, must be 0 (`MOV DR7` of a 1 raises #GP in 64-bit mode for
    /// bits 63:32; bits 12, 14, 15 are reserved and must be written as 0).
    MustBeZero,
}

use Dr7Bit::{Field as F7, Fixed1, MustBeZero as Mbz};

/// DR7, bit 0 first.
pub const DR7: [(u32, Dr7Bit); 64] = [
    (0, F7("L0")),
    (1, F7("G0")),
    (2, F7("L1")),
    (3, F7("G1")),
    (4, F7("L2")),
    (5, F7("G2")),
    (6, F7("L3")),
    (7, F7("G3")),
    (8, F7("LE")),
    (9, F7("GE")),
    (10, Fixed1),
    (11, F7("RTM")),
    (12, Mbz), // IR/SMIE on some old parts; reserved, 0
    (13, F7("GD")),
    (14, Mbz),
    (15, Mbz),
    (16, F7("R/W0.0")),
    (17, F7("R/W0.1")),
    (18, F7("LEN0.0")),
    (19, F7("LEN0.1")),
    (20, F7("R/W1.0")),
    (21, F7("R/W1.1")),
    (22, F7("LEN1.0")),
    (23, F7("LEN1.1")),
    (24, F7("R/W2.0")),
    (25, F7("R/W2.1")),
    (26, F7("LEN2.0")),
    (27, F7("LEN2.1")),
    (28, F7("R/W3.0")),
    (29, F7("R/W3.1")),
    (30, F7("LEN3.0")),
    (31, F7("LEN3.1")),
    (32, Mbz),
    (33, Mbz),
    (34, Mbz),
    (35, Mbz),
    (36, Mbz),
    (37, Mbz),
    (38, Mbz),
    (39, Mbz),
    (40, Mbz),
    (41, Mbz),
    (42, Mbz),
    (43, Mbz),
    (44, Mbz),
    (45, Mbz),
    (46, Mbz),
    (47, Mbz),
    (48, Mbz),
    (49, Mbz),
    (50, Mbz),
    (51, Mbz),
    (52, Mbz),
    (53, Mbz),
    (54, Mbz),
    (55, Mbz),
    (56, Mbz),
    (57, Mbz),
    (58, Mbz),
    (59, Mbz),
    (60, Mbz),
    (61, Mbz),
    (62, Mbz),
    (63, Mbz),
];

/// What one DR6 bit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dr6Bit {
    /// A status bit, by SDM name, with its value at rest (nothing recorded):
    /// 0 for the B/BD/BS/BT bits, 1 for the active-low BLD and RTM.
    Status(&'static str, u8),
    /// Reserved, reads as 1.
    Ones,
    /// Reserved, reads as 0.
    Zero,
}

use Dr6Bit::{Ones, Status as S6, Zero};

/// DR6, bit 0 first.
pub const DR6: [(u32, Dr6Bit); 64] = [
    (0, S6("B0", 0)),
    (1, S6("B1", 0)),
    (2, S6("B2", 0)),
    (3, S6("B3", 0)),
    (4, Ones),
    (5, Ones),
    (6, Ones),
    (7, Ones),
    (8, Ones),
    (9, Ones),
    (10, Ones),
    (11, S6("BLD", 1)),
    (12, Zero),
    (13, S6("BD", 0)),
    (14, S6("BS", 0)),
    (15, S6("BT", 0)),
    (16, S6("RTM", 1)),
    (17, Ones),
    (18, Ones),
    (19, Ones),
    (20, Ones),
    (21, Ones),
    (22, Ones),
    (23, Ones),
    (24, Ones),
    (25, Ones),
    (26, Ones),
    (27, Ones),
    (28, Ones),
    (29, Ones),
    (30, Ones),
    (31, Ones),
    (32, Zero),
    (33, Zero),
    (34, Zero),
    (35, Zero),
    (36, Zero),
    (37, Zero),
    (38, Zero),
    (39, Zero),
    (40, Zero),
    (41, Zero),
    (42, Zero),
    (43, Zero),
    (44, Zero),
    (45, Zero),
    (46, Zero),
    (47, Zero),
    (48, Zero),
    (49, Zero),
    (50, Zero),
    (51, Zero),
    (52, Zero),
    (53, Zero),
    (54, Zero),
    (55, Zero),
    (56, Zero),
    (57, Zero),
    (58, Zero),
    (59, Zero),
    (60, Zero),
    (61, Zero),
    (62, Zero),
    (63, Zero),
];

/// Whether `Dr6::from_kvm` keeps bit `bit` of the value KVM reports: every
/// status bit except RTM (bit 16 is 0 at rest on older KVMs, so it cannot be
/// trusted; see `src/dr6.rs`). Every other bit is set to its at-rest value.
pub fn dr6_from_kvm_keeps(bit: u32) -> bool {
    matches!(DR6[bit as usize].1, Dr6Bit::Status(name, _) if name != "RTM")
}

/// The DR7 bits of a kind, as a mask.
pub fn dr7_mask(want: fn(Dr7Bit) -> bool) -> u64 {
    DR7.iter().filter(|(_, b)| want(*b)).fold(0, |m, (n, _)| m | 1 << n)
}

/// The DR6 bits of a kind, as a mask.
pub fn dr6_mask(want: fn(Dr6Bit) -> bool) -> u64 {
    DR6.iter().filter(|(_, b)| want(*b)).fold(0, |m, (n, _)| m | 1 << n)
}

/// DR6 at rest: reserved-1 bits and the active-low status bits set.
pub fn dr6_at_rest() -> u64 {
    dr6_mask(|b| matches!(b, Dr6Bit::Ones | Dr6Bit::Status(_, 1)))
}

/// The DR6 bits `from_kvm` keeps, as a mask.
pub fn dr6_kept() -> u64 {
    (0..64).filter(|&n| dr6_from_kvm_keeps(n)).fold(0, |m, n| m | 1 << n)
}

/// DR7's must-be-zero bits.
pub fn dr7_mbz() -> u64 {
    dr7_mask(|b| b == Dr7Bit::MustBeZero)
}

/// What `Dr6::from_kvm(raw)` must give: kept bits from `raw`, every other bit
/// at rest.
pub fn dr6_expected_from_kvm(raw: u64) -> u64 {
    (raw & dr6_kept()) | (dr6_at_rest() & !dr6_kept())
}
