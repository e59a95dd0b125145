//! Software breakpoints: `int3` (`0xCC`) patched into guest memory, with use
//! counts (the seed's `kvm_sw_breakpoint` list, made a verified state machine).
//!
//! Per address the table is in one of two states: absent, or present with the
//! original byte and a use count ≥ 1. Transitions:
//!
//! | operation | absent | present, count 1 | present, count n > 1 |
//! |---|---|---|---|
//! | insert | read byte, write `0xCC`, record (count 1) | count 2 | count n+1 |
//! | remove | [`SwError::NotFound`] | restore the byte (or note the guest rewrote it), forget | count n−1 |
//!
//! Any failed memory access leaves the table and memory as they were.
//! [`SwBreakpoints::remove_all`] restores every byte it can and leaves the
//! table empty except for the entries it could not restore, which it reports.
//!
//! Lookups are `O(log n)` (a B-tree keyed by address), not the seed's linear
//! list scan: a debug exit looks the faulting pc up on every `#BP`.

use alloc::collections::btree_map::{BTreeMap, Entry};
use alloc::vec::Vec;

/// The `int3` opcode.
pub const INT3: u8 = 0xcc;

/// Byte access to guest memory at guest addresses: the only thing the table
/// needs from memory. Tests implement it on a buffer; `kvm-glue` implements it
/// on real guest memory. Each call is one access and may fail.
pub trait ByteMemory {
    /// Why an access failed.
    type Error;
    /// Reads the byte at `addr`.
    ///
    /// # Errors
    /// If `addr` cannot be read.
    fn read_byte(&mut self, addr: u64) -> Result<u8, Self::Error>;
    /// Writes `value` at `addr`.
    ///
    /// # Errors
    /// If `addr` cannot be written; the byte must then be unchanged.
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), Self::Error>;
}

impl<M: ByteMemory + ?Sized> ByteMemory for &mut M {
    type Error = M::Error;
    fn read_byte(&mut self, addr: u64) -> Result<u8, Self::Error> {
        (**self).read_byte(addr)
    }
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), Self::Error> {
        (**self).write_byte(addr, value)
    }
}

/// Why a software-breakpoint operation failed. `E` is the memory's error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SwError<E> {
    /// No software breakpoint is set at `addr` (the seed's `-ENOENT`).
    #[error("no software breakpoint at {addr:#x}")]
    NotFound {
        /// The address asked for.
        addr: u64,
    },
    /// Reading guest memory failed (the seed's `-EINVAL`).
    #[error("cannot read guest memory at {addr:#x}")]
    Read {
        /// The address.
        addr: u64,
        /// The memory's error.
        source: E,
    },
    /// Writing guest memory failed (the seed's `-EINVAL`).
    #[error("cannot write guest memory at {addr:#x}")]
    Write {
        /// The address.
        addr: u64,
        /// The memory's error.
        source: E,
    },
    /// The use count would overflow `u32` (the seed's `int` would wrap).
    #[error("software breakpoint at {addr:#x} is inserted {} times already", u32::MAX)]
    CountOverflow {
        /// The address.
        addr: u64,
    },
}

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SwEntry {
    /// The byte `0xCC` replaced.
    pub saved: u8,
    /// How many inserts are outstanding (≥ 1).
    pub count: u32,
}

/// What an insert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwInserted {
    /// A new breakpoint: `0xCC` was written over `saved`.
    Patched {
        /// The original byte.
        saved: u8,
    },
    /// Already set: only the use count grew.
    Counted {
        /// The new use count.
        count: u32,
    },
}

/// What a successful remove did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwRemoved {
    /// Other inserts are outstanding: only the use count shrank.
    Counted {
        /// The remaining use count (≥ 1).
        remaining: u32,
    },
    /// The last use: the original byte is back.
    Restored,
    /// The last use, but the guest had rewritten the `0xCC` (found `found`):
    /// the entry is forgotten and the guest's byte left alone. (The seed
    /// failed with `-EINVAL` and kept the entry forever.)
    GuestOverwrote {
        /// The byte found where `0xCC` was expected.
        found: u8,
    },
}

/// The outcome of [`SwBreakpoints::remove_all`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoveAll<E> {
    /// Breakpoints whose original byte was written back.
    pub restored: usize,
    /// Addresses where the guest had rewritten the `0xCC`; forgotten, untouched.
    pub overwritten: Vec<u64>,
    /// Addresses whose memory could not be read or written, with the error,
    /// in address order. These entries stay in the table.
    pub failed: Vec<(u64, SwError<E>)>,
}

impl<E> RemoveAll<E> {
    /// Whether every breakpoint was dealt with (nothing failed).
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// The software-breakpoint table, keyed by guest address.
///
/// ```
/// use x86_debugreg::sw::{ByteMemory, SwBreakpoints, SwRemoved};
///
/// struct Ram([u8; 16]);
/// impl ByteMemory for Ram {
///     type Error = ();
///     fn read_byte(&mut self, a: u64) -> Result<u8, ()> { self.0.get(a as usize).copied().ok_or(()) }
///     fn write_byte(&mut self, a: u64, v: u8) -> Result<(), ()> {
///         *self.0.get_mut(a as usize).ok_or(())? = v;
///         Ok(())
///     }
/// }
///
/// let mut ram = Ram([0x90; 16]);
/// let mut table = SwBreakpoints::new();
/// table.insert(&mut ram, 4)?;
/// table.insert(&mut ram, 4)?; // a second user: counted, memory untouched
/// assert_eq!(ram.0[4], 0xcc);
/// table.remove(&mut ram, 4)?;
/// assert_eq!(table.remove(&mut ram, 4)?, SwRemoved::Restored);
/// assert_eq!(ram.0, [0x90; 16]);
/// # Ok::<(), x86_debugreg::sw::SwError<()>>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwBreakpoints {
    entries: BTreeMap<u64, SwEntry>,
}

impl SwBreakpoints {
    /// An empty table.
    pub const fn new() -> SwBreakpoints {
        SwBreakpoints {
            entries: BTreeMap::new(),
        }
    }

    /// Number of distinct addresses.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no breakpoint is set.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a breakpoint is set at `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.entries.contains_key(&addr)
    }

    /// The entry at `addr`.
    pub fn get(&self, addr: u64) -> Option<SwEntry> {
        self.entries.get(&addr).copied()
    }

    /// Every entry, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, SwEntry)> + '_ {
        self.entries.iter().map(|(&a, &e)| (a, e))
    }

    /// Replaces the byte the breakpoint at `addr` saved, leaving `0xCC` in
    /// memory: what a debugger's memory write over a breakpoint must do (the
    /// guest then runs the new byte once the breakpoint is removed). Returns
    /// the byte it replaced, or `None` (and changes nothing) if no
    /// breakpoint is set at `addr`.
    ///
    /// ```
    /// # use x86_debugreg::sw::{ByteMemory, SwBreakpoints};
    /// # struct Ram(Vec<u8>);
    /// # impl ByteMemory for Ram {
    /// #     type Error = ();
    /// #     fn read_byte(&mut self, a: u64) -> Result<u8, ()> { self.0.get(a as usize).copied().ok_or(()) }
    /// #     fn write_byte(&mut self, a: u64, v: u8) -> Result<(), ()> { *self.0.get_mut(a as usize).ok_or(())? = v; Ok(()) }
    /// # }
    /// let mut ram = Ram(vec![0x90; 8]);
    /// let mut table = SwBreakpoints::new();
    /// table.insert(&mut ram, 4)?;
    /// assert_eq!(table.replace_saved(4, 0xc3), Some(0x90));
    /// assert_eq!(ram.0[4], 0xcc);
    /// table.remove(&mut ram, 4)?;
    /// assert_eq!(ram.0[4], 0xc3);
    /// assert_eq!(table.replace_saved(4, 0x90), None);
    /// # Ok::<(), x86_debugreg::sw::SwError<()>>(())
    /// ```
    pub fn replace_saved(&mut self, addr: u64, byte: u8) -> Option<u8> {
        let entry = self.entries.get_mut(&addr)?;
        Some(core::mem::replace(&mut entry.saved, byte))
    }

    /// Test support (feature `reference`): sets the use count of the entry
    /// at `addr` to `count` (at least 1), so suites can start near `u32::MAX`
    /// without four billion inserts. Returns whether there was an entry.
    #[cfg(feature = "reference")]
    #[doc(hidden)]
    pub fn set_count_for_testing(&mut self, addr: u64, count: u32) -> bool {
        match self.entries.get_mut(&addr) {
            Some(entry) => {
                entry.count = count.max(1);
                true
            }
            None => false,
        }
    }

    /// Inserts a breakpoint at `addr`, or counts one more use of it.
    ///
    /// # Errors
    /// [`SwError::Read`]/[`SwError::Write`] if memory fails,
    /// [`SwError::CountOverflow`] past `u32::MAX` uses. Nothing changes on error.
    pub fn insert<M: ByteMemory>(&mut self, mem: &mut M, addr: u64) -> Result<SwInserted, SwError<M::Error>> {
        // One descent of the tree whether the address is new or known.
        match self.entries.entry(addr) {
            Entry::Occupied(mut known) => {
                let entry = known.get_mut();
                entry.count = entry.count.checked_add(1).ok_or(SwError::CountOverflow { addr })?;
                Ok(SwInserted::Counted { count: entry.count })
            }
            Entry::Vacant(new) => {
                let saved = mem.read_byte(addr).map_err(|source| SwError::Read { addr, source })?;
                mem.write_byte(addr, INT3)
                    .map_err(|source| SwError::Write { addr, source })?;
                new.insert(SwEntry { saved, count: 1 });
                Ok(SwInserted::Patched { saved })
            }
        }
    }

    /// Removes one use of the breakpoint at `addr`; the last use restores the
    /// original byte.
    ///
    /// # Errors
    /// [`SwError::NotFound`] if none is set; [`SwError::Read`]/[`SwError::Write`]
    /// if memory fails on the last use. Nothing changes on error.
    pub fn remove<M: ByteMemory>(&mut self, mem: &mut M, addr: u64) -> Result<SwRemoved, SwError<M::Error>> {
        let entry = self.entries.get_mut(&addr).ok_or(SwError::NotFound { addr })?;
        if entry.count > 1 {
            entry.count -= 1;
            return Ok(SwRemoved::Counted { remaining: entry.count });
        }
        let saved = entry.saved;
        let removed = unpatch(mem, addr, saved)?;
        self.entries.remove(&addr);
        Ok(removed)
    }

    /// Removes every breakpoint, whatever its count, restoring original bytes
    /// in address order. Entries whose memory fails stay in the table and are
    /// reported; the rest are gone.
    pub fn remove_all<M: ByteMemory>(&mut self, mem: &mut M) -> RemoveAll<M::Error> {
        let mut report = RemoveAll {
            restored: 0,
            overwritten: Vec::new(),
            failed: Vec::new(),
        };
        self.entries
            .retain(|&addr, entry| match unpatch(mem, addr, entry.saved) {
                Ok(SwRemoved::GuestOverwrote { .. }) => {
                    report.overwritten.push(addr);
                    false
                }
                Ok(_) => {
                    report.restored += 1;
                    false
                }
                Err(e) => {
                    report.failed.push((addr, e));
                    true
                }
            });
        report
    }
}

/// Puts `saved` back at `addr` if `0xCC` is still there.
fn unpatch<M: ByteMemory>(mem: &mut M, addr: u64, saved: u8) -> Result<SwRemoved, SwError<M::Error>> {
    let found = mem.read_byte(addr).map_err(|source| SwError::Read { addr, source })?;
    if found != INT3 {
        return Ok(SwRemoved::GuestOverwrote { found });
    }
    mem.write_byte(addr, saved)
        .map_err(|source| SwError::Write { addr, source })?;
    Ok(SwRemoved::Restored)
}
