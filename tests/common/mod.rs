//! Shared fixtures for the property suites.
#![allow(dead_code)]

pub mod sdm;

use x86_debugreg::differential::TestMemory;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 0x40;
/// An address whose reads fail.
pub const BAD_READ: u64 = 0x20;
/// An address whose writes fail.
pub const BAD_WRITE: u64 = 0x21;
/// An address that already holds `0xCC` (the guest's own `int3`).
pub const GUEST_INT3: u64 = 0x18;

/// Addresses the suites draw from: few, so operations collide. Aligned and
/// misaligned for every length, failing ones, the last byte, outside memory,
/// and a high (kernel-half, non-canonical-looking) one.
pub const ADDR_POOL: [u64; 12] = [
    0x0,
    0x1,
    0x2,
    0x4,
    0x8,
    0x10,
    GUEST_INT3,
    BAD_READ,
    BAD_WRITE,
    0x3f,
    0x40,
    0xffff_ffff_ffff_fff8,
];

/// Lengths the suites draw from: every valid one and several invalid ones.
pub const LEN_POOL: [u64; 10] = [0, 1, 2, 3, 4, 5, 7, 8, 16, u64::MAX];

/// The guest memory every suite starts from.
pub fn memory() -> TestMemory {
    let mut mem = TestMemory::new(MEM_SIZE);
    mem.bytes[GUEST_INT3 as usize] = 0xcc;
    mem.bad_read.insert(BAD_READ);
    mem.bad_write.insert(BAD_WRITE);
    mem
}

/// A case count (or depth) from the environment variable `var`, else
/// `default`.
///
/// # Panics
/// If `var` is set but is not a positive integer: a typo or `0` must not
/// silently run the default, or nothing at all.
pub fn cases(var: &str, default: u32) -> u32 {
    match std::env::var(var) {
        Ok(v) => parse_count(var, &v).unwrap_or_else(|e| panic!("{e}")),
        Err(std::env::VarError::NotPresent) => default,
        Err(std::env::VarError::NotUnicode(v)) => panic!("{var}={v:?} is not a positive integer"),
    }
}

/// Parses the value `v` of the knob `var`: a positive integer, or a message
/// saying what is wrong.
pub fn parse_count(var: &str, v: &str) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(0) => Err(format!(
            "{var}=0 would check nothing; set a positive number or unset it"
        )),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{var}={v:?} is not a positive integer ({e})")),
    }
}
