//! GDB's watchpoints as debug-register slots.
//!
//! GDB asks for a watchpoint on any `(addr, len)` (`watch some_u32_field` at an
//! odd address is common). A slot watches 1, 2, 4 or 8 bytes aligned to that
//! length (SDM Vol. 3B §18.2.5), so one GDB watchpoint becomes one to four
//! slots: the range split into the largest aligned pieces. The table remembers
//! which GDB watchpoint each piece belongs to, so a stop reports the address
//! GDB asked for, not the piece's (GDB looks its watchpoint up by that
//! address), and counts the users of each piece, so two GDB watchpoints that
//! share one are not refused as a duplicate.

use gdbstub::target::ext::breakpoints::WatchKind;
use x86_debugreg::{HwBreakpoint, HwKind};

/// Most slots one watchpoint may take: all four debug address registers.
pub const MAX_PIECES: usize = 4;

/// One aligned piece of a watched range, the shape of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Start, a multiple of `len`.
    pub addr: u64,
    /// 1, 2, 4 or 8.
    pub len: u64,
}

/// Splits `[addr, addr + len)` into the fewest aligned pieces, or `None` when
/// the range is empty, wraps around, or needs more than [`MAX_PIECES`] slots.
///
/// `0x1003..0x100b` is 1 byte at `0x1003`, 4 at `0x1004`, 2 at `0x1008`
/// and 1 at `0x100a`.
pub fn split(addr: u64, len: u64) -> Option<Vec<Piece>> {
    if len == 0 {
        return None;
    }
    addr.checked_add(len - 1)?;
    let mut pieces = Vec::new();
    let (mut at, mut left) = (addr, len);
    while left > 0 {
        let size = [8u64, 4, 2, 1]
            .into_iter()
            .find(|&s| at % s == 0 && s <= left)
            .unwrap_or(1); // 1 always divides and fits: never taken
        pieces.push(Piece { addr: at, len: size });
        if pieces.len() > MAX_PIECES {
            return None;
        }
        left -= size;
        // Cannot overflow: the range's last byte was checked above.
        at = at.wrapping_add(size);
    }
    Some(pieces)
}

/// The hardware kind that implements a GDB watch kind, or `None` for read
/// watchpoints (x86 has no read-only condition: `R/W = 10` is I/O).
pub fn hw_kind(kind: WatchKind) -> Option<HwKind> {
    match kind {
        WatchKind::Write => Some(HwKind::Write),
        WatchKind::ReadWrite => Some(HwKind::ReadWrite),
        WatchKind::Read => None,
    }
}

/// A watchpoint GDB set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// The address GDB asked for.
    pub addr: u64,
    /// The length GDB asked for.
    pub len: u64,
    /// The kind GDB asked for.
    pub kind: WatchKind,
    /// Its slots.
    pub pieces: Vec<Piece>,
}

impl Watch {
    fn hw_kind(&self) -> Option<HwKind> {
        hw_kind(self.kind)
    }
}

/// Every watchpoint GDB has set through this stub.
#[derive(Debug, Default)]
pub struct WatchTable {
    watches: Vec<Watch>,
}

impl WatchTable {
    /// An empty table.
    pub fn new() -> WatchTable {
        WatchTable::default()
    }

    /// The watchpoints, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = &Watch> {
        self.watches.iter()
    }

    /// Whether GDB set exactly this watchpoint.
    pub fn position(&self, addr: u64, len: u64, kind: WatchKind) -> Option<usize> {
        self.watches
            .iter()
            .position(|w| w.addr == addr && w.len == len && w.kind == kind)
    }

    /// How many recorded watchpoints use a slot of this kind and shape.
    pub fn users(&self, kind: HwKind, piece: Piece) -> usize {
        self.watches
            .iter()
            .filter(|w| w.hw_kind() == Some(kind))
            .filter(|w| w.pieces.contains(&piece))
            .count()
    }

    /// Records a watchpoint whose slots are all set.
    pub fn add(&mut self, watch: Watch) {
        self.watches.push(watch);
    }

    /// Forgets the watchpoint at `index` and returns it.
    pub fn take(&mut self, index: usize) -> Option<Watch> {
        (index < self.watches.len()).then(|| self.watches.remove(index))
    }

    /// Forgets every watchpoint (the debug state was cleared).
    pub fn clear(&mut self) {
        self.watches.clear();
    }

    /// The GDB watchpoint a hit slot belongs to: its kind and the address GDB
    /// asked for.
    pub fn owner(&self, bp: &HwBreakpoint) -> Option<(WatchKind, u64)> {
        let piece = Piece {
            addr: bp.addr(),
            len: bp.len().bytes(),
        };
        self.watches
            .iter()
            .find(|w| w.hw_kind() == Some(bp.kind()) && w.pieces.contains(&piece))
            .map(|w| (w.kind, w.addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(addr: u64, len: u64) -> Piece {
        Piece { addr, len }
    }

    #[test]
    fn aligned_ranges_take_one_slot() {
        assert_eq!(split(0x1000, 8), Some(vec![p(0x1000, 8)]));
        assert_eq!(split(0x1004, 4), Some(vec![p(0x1004, 4)]));
        assert_eq!(split(0x1003, 1), Some(vec![p(0x1003, 1)]));
    }

    #[test]
    fn misaligned_ranges_split_into_the_largest_aligned_pieces() {
        assert_eq!(
            split(0x1003, 8),
            Some(vec![p(0x1003, 1), p(0x1004, 4), p(0x1008, 2), p(0x100a, 1)])
        );
        assert_eq!(split(0x1002, 4), Some(vec![p(0x1002, 2), p(0x1004, 2)]));
        assert_eq!(split(0x1000, 16), Some(vec![p(0x1000, 8), p(0x1008, 8)]));
    }

    #[test]
    fn ranges_needing_more_than_four_slots_or_empty_or_wrapping_are_refused() {
        assert_eq!(split(0x1001, 16), None);
        assert_eq!(split(0x1000, 40), None);
        assert_eq!(split(0x1000, 0), None);
        assert_eq!(split(u64::MAX, 2), None);
        assert_eq!(split(u64::MAX, 1), Some(vec![p(u64::MAX, 1)]));
    }

    #[test]
    fn a_hit_piece_reports_the_address_gdb_asked_for() -> Result<(), x86_debugreg::HwError> {
        let mut t = WatchTable::new();
        let pieces = split(0x1003, 4).unwrap_or_default();
        t.add(Watch {
            addr: 0x1003,
            len: 4,
            kind: WatchKind::Write,
            pieces,
        });
        let hit = HwBreakpoint::new(HwKind::Write, 0x1004, 2)?;
        assert_eq!(t.owner(&hit), Some((WatchKind::Write, 0x1003)));
        let other_kind = HwBreakpoint::new(HwKind::ReadWrite, 0x1004, 2)?;
        assert_eq!(t.owner(&other_kind), None);
        assert_eq!(t.users(HwKind::Write, p(0x1004, 2)), 1);
        Ok(())
    }

    #[test]
    fn read_watchpoints_have_no_hardware_kind() {
        assert_eq!(hw_kind(WatchKind::Read), None);
        assert_eq!(hw_kind(WatchKind::Write), Some(HwKind::Write));
        assert_eq!(hw_kind(WatchKind::ReadWrite), Some(HwKind::ReadWrite));
    }
}
