//! Software breakpoints where the `0xCC` lives: by guest-physical address.
//!
//! The core's int3 table is keyed by the address of the byte it patched; in
//! kvm-glue that is always the **guest-physical** address. Beside each entry
//! this module keeps the addresses the debugger asked for (one per insert,
//! with the address space it used), so that
//!
//! * a `#BP` exit is matched by translating its pc with the exiting vCPU's
//!   page tables: a breakpoint set by physical address stops the vCPU
//!   whatever linear address runs it;
//! * remove and remove-all restore through the recorded guest-physical
//!   address, never through a translation made later (the page tables may
//!   have changed, or the vCPU that translated may be gone);
//! * "the byte is no longer `0xCC`" really means the guest (or DMA) wrote
//!   there, so forgetting the entry then is right.
//!
//! Removing by a guest-virtual address does not translate it: it finds the
//! entry whose recorded request matches. Only when the same virtual address
//! was inserted under two different translations (two address spaces) does
//! it translate, to tell them apart. The seed instead re-translated on every
//! vCPU in turn when the first failed; with the request recorded, no vCPU's
//! current view is needed.

use std::collections::BTreeMap;

/// The kind of address a debugger used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpaceKind {
    /// Guest-physical.
    Physical,
    /// Guest-virtual (linear), translated at insert time.
    Virtual,
}

/// One insert of a software breakpoint, as the debugger asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Request {
    /// The address the debugger gave.
    pub addr: u64,
    /// Its address space.
    pub space: SpaceKind,
}

/// Requests by guest-physical address (the core table's key).
#[derive(Debug, Clone, Default)]
pub(crate) struct Requests {
    by_gpa: BTreeMap<u64, Vec<Request>>,
}

/// Which entry a removal means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Exactly this guest-physical address.
    Found(u64),
    /// No entry was inserted with this request.
    NotFound,
    /// Several entries were inserted with this request (same virtual address
    /// under different translations); these are the candidates.
    Ambiguous,
}

impl Requests {
    pub(crate) fn add(&mut self, gpa: u64, req: Request) {
        self.by_gpa.entry(gpa).or_default().push(req);
    }

    /// Forgets one request `req` at `gpa` (no-op if absent).
    pub(crate) fn forget_one(&mut self, gpa: u64, req: Request) {
        if let Some(list) = self.by_gpa.get_mut(&gpa) {
            if let Some(i) = list.iter().position(|r| *r == req) {
                list.remove(i);
            }
            if list.is_empty() {
                self.by_gpa.remove(&gpa);
            }
        }
    }

    /// Forgets everything at `gpa`.
    pub(crate) fn forget_gpa(&mut self, gpa: u64) {
        self.by_gpa.remove(&gpa);
    }

    /// The entry a removal of `req` means.
    pub(crate) fn lookup(&self, req: Request) -> Lookup {
        let mut found = None;
        for (&gpa, list) in &self.by_gpa {
            if list.contains(&req) {
                if found.is_some() {
                    return Lookup::Ambiguous;
                }
                found = Some(gpa);
            }
        }
        found.map_or(Lookup::NotFound, Lookup::Found)
    }

    /// Whether `req` was inserted at `gpa`.
    pub(crate) fn has(&self, gpa: u64, req: Request) -> bool {
        self.by_gpa.get(&gpa).is_some_and(|l| l.contains(&req))
    }

    /// The requests recorded at `gpa`.
    pub(crate) fn at(&self, gpa: u64) -> &[Request] {
        self.by_gpa.get(&gpa).map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: SpaceKind = SpaceKind::Virtual;

    #[test]
    fn a_request_inserted_under_two_translations_is_ambiguous() {
        let mut r = Requests::default();
        let req = Request { addr: 0x1000, space: V };
        r.add(0x2000, req);
        assert_eq!(r.lookup(req), Lookup::Found(0x2000));
        r.add(0x5000, req);
        assert_eq!(r.lookup(req), Lookup::Ambiguous);
        r.forget_one(0x2000, req);
        assert_eq!(r.lookup(req), Lookup::Found(0x5000));
        assert_eq!(
            r.lookup(Request {
                addr: 0x1000,
                space: SpaceKind::Physical
            }),
            Lookup::NotFound
        );
    }
}
