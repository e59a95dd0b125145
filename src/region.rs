//! The region planner: any byte range `[addr, addr + len)` as the fewest
//! aligned debug-register ranges.
//!
//! A debug address register watches 1, 2, 4 or 8 bytes at an address aligned
//! to that length (SDM Vol. 3B §18.2.5, "Breakpoint Field Recognition": the
//! CPU masks the low address bits with LENn, so a misaligned DRn silently
//! watches the wrong bytes). 8 bytes (LEN = `10`) only in 64-bit mode (SDM
//! Vol. 3B §18.2.4; AMD APM Vol. 2 §13.1.1.4): the [`Mode`] flag says which.
//! Debuggers ask for whatever their expression covers — a 6-byte field at an
//! odd address, a 12-byte struct — so a region is split into **pieces**.
//!
//! The split is greedy from the low end: at each address take the largest
//! length that is aligned there and does not run past the region. That is
//! GDB's table-driven `x86_handle_nonaligned_watchpoint` (gdb/nat/x86-dregs.c)
//! written as a rule, and it is minimal: each piece is the largest aligned
//! block starting at its address that fits, so no exact cover can use fewer
//! (`tests/region.rs` compares it with a brute-force search).
//!
//! | region | pieces |
//! |---|---|
//! | `0x1003`, 6 bytes | `0x1003`/1, `0x1004`/4, `0x1008`/1 |
//! | `0x2004`, 12 bytes | `0x2004`/4, `0x2008`/8 |
//! | `0x1001`, 3 bytes | `0x1001`/1, `0x1002`/2 |
//! | `0x1000`, 16 bytes | `0x1000`/8, `0x1008`/8 (four of 4 bytes in [`Mode::Legacy`]) |
//!
//! The planner only plans: it never allocates a slot, and a region of any
//! length is planned lazily ([`Pieces`] is an iterator, [`slots_needed`]
//! counts in constant time), so a 4 GiB region is answered without building
//! half a billion pieces. Whether pieces fit in the four slots, and sharing
//! them between watchpoints, is [`crate::watch`]'s job.
//!
//! ```
//! use x86_debugreg::region::{self, Mode, Piece};
//! use x86_debugreg::Len;
//! let pieces: Vec<Piece> = region::plan(0x1003, 6, Mode::Long)?.collect();
//! assert_eq!(
//!     pieces,
//!     [Piece::new(0x1003, Len::B1), Piece::new(0x1004, Len::B4), Piece::new(0x1008, Len::B1)]
//! );
//! assert_eq!(region::slots_needed(0x2004, 12, Mode::Long)?, 2);
//! assert_eq!(region::slots_needed(0x2004, 12, Mode::Legacy)?, 3);
//! # Ok::<(), region::PlanError>(())
//! ```

use core::fmt;

use crate::{HwBreakpoint, HwKind, Len};

/// Which lengths a slot may have: the guest's CPU mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum Mode {
    /// 64-bit mode: slots of 1, 2, 4 or 8 bytes (LEN = `10` is 8 bytes).
    Long,
    /// Any other mode: slots of 1, 2 or 4 bytes (LEN = `10` is undefined
    /// outside 64-bit mode on most CPUs, SDM Vol. 3B §18.2.4).
    Legacy,
}

impl Mode {
    /// The widest slot in this mode.
    pub const fn widest(self) -> Len {
        match self {
            Mode::Long => Len::B8,
            Mode::Legacy => Len::B4,
        }
    }
}

/// Why a region cannot be planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PlanError {
    /// The region has no byte (`len == 0`): nothing to watch, and GDB never
    /// asks for it, so it is a caller's bug rather than a no-op.
    #[error("the region at {addr:#x} is empty")]
    Empty {
        /// The requested address.
        addr: u64,
    },
    /// The region runs past the top of the address space (`addr + len >
    /// 2^64`); the CPU's ranges do not wrap around.
    #[error("the region of {len} bytes at {addr:#x} runs past the end of the address space")]
    Wraps {
        /// The requested address.
        addr: u64,
        /// The requested length.
        len: u64,
    },
}

/// One aligned range a single debug address register can watch: `len`
/// bytes at `addr`, with `addr` a multiple of `len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Piece {
    addr: u64,
    len: Len,
}

impl Piece {
    /// `len` bytes at `addr`. The planner only makes aligned pieces; this
    /// constructor is for writing expected values and does not check.
    pub const fn new(addr: u64, len: Len) -> Piece {
        Piece { addr, len }
    }

    /// The first byte (DRn).
    pub const fn addr(self) -> u64 {
        self.addr
    }

    /// The length (LENn).
    pub const fn len(self) -> Len {
        self.len
    }

    /// The length in bytes.
    pub const fn bytes(self) -> u64 {
        self.len.bytes()
    }

    /// Whether `addr` is a multiple of the length (true of every planned piece).
    pub const fn is_aligned(self) -> bool {
        self.addr % self.len.bytes() == 0
    }

    /// Whether the piece holds byte `at`.
    pub const fn contains(self, at: u64) -> bool {
        at >= self.addr && at - self.addr < self.len.bytes()
    }

    /// The slot contents that watch this piece for `kind`. An execute
    /// breakpoint is only meaningful for a 1-byte piece (the first byte of an
    /// instruction); [`crate::watch`] plans execute regions as exactly that.
    pub const fn breakpoint(self, kind: HwKind) -> HwBreakpoint {
        HwBreakpoint::armed(kind, self.addr, self.len)
    }
}

impl fmt::Display for Piece {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{}", self.addr, self.len.bytes())
    }
}

/// Checks a region: not empty, not past the end of the address space.
///
/// # Errors
/// [`PlanError::Empty`] if `len == 0`; [`PlanError::Wraps`] if `addr + len`
/// exceeds 2^64 (a region may end exactly at 2^64).
pub const fn check(addr: u64, len: u64) -> Result<(), PlanError> {
    if len == 0 {
        return Err(PlanError::Empty { addr });
    }
    // The last byte is addr + len - 1; it must not pass u64::MAX.
    if len - 1 > u64::MAX - addr {
        return Err(PlanError::Wraps { addr, len });
    }
    Ok(())
}

/// The pieces that cover `[addr, addr + len)`, fewest first to last, in
/// address order.
///
/// # Errors
/// As [`check`].
///
/// # Example
/// ```
/// use x86_debugreg::region::{self, Mode};
/// let pieces: Vec<String> = region::plan(0x2004, 12, Mode::Long)?.map(|p| p.to_string()).collect();
/// assert_eq!(pieces, ["0x2004/4", "0x2008/8"]);
/// # Ok::<(), region::PlanError>(())
/// ```
pub const fn plan(addr: u64, len: u64, mode: Mode) -> Result<Pieces, PlanError> {
    match check(addr, len) {
        Ok(()) => Ok(Pieces {
            at: addr,
            left: len,
            widest: mode.widest().bytes(),
        }),
        Err(e) => Err(e),
    }
}

/// How many slots `[addr, addr + len)` needs on its own, without inserting
/// anything (GDB's `region_ok_for_watchpoint` asks "is this at most 4").
/// Constant time, whatever the length. Sharing with watchpoints already set
/// may need fewer new slots: [`crate::watch::WatchSlots::new_slots_needed`].
///
/// # Errors
/// As [`check`].
///
/// # Example
/// ```
/// use x86_debugreg::region::{self, Mode};
/// assert_eq!(region::slots_needed(0x1003, 6, Mode::Long)?, 3);
/// assert_eq!(region::slots_needed(0, u64::MAX, Mode::Long)?, (1 << 61) - 1 + 3);
/// # Ok::<(), region::PlanError>(())
/// ```
pub const fn slots_needed(addr: u64, len: u64, mode: Mode) -> Result<u64, PlanError> {
    match plan(addr, len, mode) {
        Ok(pieces) => Ok(pieces.remaining()),
        Err(e) => Err(e),
    }
}

/// The planner's pieces, lazily: an iterator in address order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pieces {
    /// The first byte not yet covered.
    at: u64,
    /// Bytes not yet covered.
    left: u64,
    /// The widest piece in bytes: 4 or 8.
    widest: u64,
}

impl Pieces {
    /// No piece.
    pub(crate) const EMPTY: Pieces = Pieces {
        at: 0,
        left: 0,
        widest: 8,
    };

    /// The size of the piece starting at `at` with `left` bytes to cover:
    /// the largest power of two up to `widest` that divides `at` and fits.
    const fn next_size(at: u64, left: u64, widest: u64) -> u64 {
        let mut size = widest;
        while size > 1 && (at % size != 0 || size > left) {
            size /= 2;
        }
        size
    }

    /// How many pieces are left, in constant time: a few leading pieces up
    /// to the first address aligned to the widest length, then whole widest
    /// pieces, then a few trailing ones.
    pub const fn remaining(&self) -> u64 {
        let (mut at, mut left, mut count) = (self.at, self.left, 0);
        while left > 0 {
            if at % self.widest == 0 && left >= self.widest {
                let whole = left / self.widest;
                count += whole;
                left -= whole * self.widest;
                at = at.wrapping_add(whole * self.widest);
            } else {
                let size = Pieces::next_size(at, left, self.widest);
                count += 1;
                left -= size;
                at = at.wrapping_add(size);
            }
        }
        count
    }
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.left == 0 {
            return None;
        }
        let size = Pieces::next_size(self.at, self.left, self.widest);
        let len = match Len::from_bytes(size) {
            Some(len) => len,
            None => Len::B1, // next_size only returns 1, 2, 4 or 8
        };
        let piece = Piece::new(self.at, len);
        self.left -= size;
        // The last piece may end exactly at 2^64: `at` wraps to 0 with
        // nothing left, and is never read again.
        self.at = self.at.wrapping_add(size);
        Some(piece)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining();
        match usize::try_from(n) {
            Ok(n) => (n, Some(n)),
            Err(_) => (usize::MAX, None),
        }
    }
}

impl core::iter::FusedIterator for Pieces {}
