//! Guest-virtual to guest-physical translation from a parked vCPU's
//! control registers, on the GDB thread: the page walk `KVM_TRANSLATE` does,
//! without waking the vCPU for each page of an `m` packet.
//!
//! Only what the walk can decide from the registers and the tables alone
//! is done here: paging off (a linear address is physical) and 4-level
//! paging (CR0.PG, CR4.PAE, EFER.LMA; CR4.LA57 clear) with 4 KiB and
//! 2 MiB pages. Everything else answers [`Walk::Ask`], and the caller asks
//! the vCPU (`KVM_TRANSLATE` on its own thread), as before: 32-bit paging,
//! PAE without long mode, 5-level paging, and a 1 GiB page (PS in a PDPT
//! entry is reserved unless the guest's CPUID has PDPE1GB, which the
//! registers do not say; KVM then reports the address unmapped).
//!
//! The walk (SDM Vol. 3A §4.5, "4-Level Paging and 5-Level Paging"): the
//! PML4 entry indexed by bits 47:39 of the address, then the PDPT entry
//! (bits 38:30; PS set: a 1-GByte page), the PD entry (bits 29:21; PS set:
//! a 2-MByte page) and the PT entry (bits 20:12). An entry whose P bit
//! (bit 0) is clear, or with a reserved bit set that the walk can see
//! (PS in a PML4 entry; bits 20:13 of a 2-MByte page's PD entry; XD,
//! bit 63, while EFER.NXE is clear), means "not mapped", as `KVM_TRANSLATE`
//! reports it (reserved bits 51:MAXPHYADDR give an address no guest
//! memory is at, so the read fails all the same). Access rights (R/W,
//! U/S, XD, protection keys) do not matter to a debugger's read, nor to
//! `KVM_TRANSLATE`. Entries are read from guest memory as the CPU reads
//! them (an `int3` kvm-glue planted is not hidden here: page tables are
//! data, not code).

use kvm_bindings::kvm_sregs;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// CR0.PG (SDM Vol. 3A §2.5).
const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57.
const CR4_LA57: u64 = 1 << 12;
/// IA32_EFER.LMA (bit 10).
const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE (bit 11).
const EFER_NXE: u64 = 1 << 11;
/// Entry bit 63: execute-disable (reserved while EFER.NXE is clear).
const XD: u64 = 1 << 63;
/// The reserved bits of a PD entry that maps a 2-MByte page (20:13).
const PDE_2M_RESERVED: u64 = 0x1f_e000;

/// Entry bit 0: present.
const P: u64 = 1;
/// Entry bit 7: page size (a leaf above the page table).
const PS: u64 = 1 << 7;
/// The physical-address bits of an entry or of CR3 (51:12; MAXPHYADDR is
/// at most 52).
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The control registers the walk depends on, read at a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Paging {
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
}

/// What [`Paging::walk`] found for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// The guest-physical address.
    Gpa(u64),
    /// Not mapped (or its page tables are outside guest memory).
    Unmapped,
    /// A paging mode not walked here: ask the vCPU.
    Ask,
}

impl Paging {
    pub(super) fn of(sregs: &kvm_sregs) -> Paging {
        Paging {
            cr0: sregs.cr0,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        }
    }

    /// Whether [`walk`](Self::walk) may translate here ([`Walk::Ask`]
    /// then only for a 1 GiB page).
    pub(super) fn walkable(&self) -> bool {
        self.cr0 & CR0_PG == 0 || (self.cr4 & CR4_PAE != 0 && self.efer & EFER_LMA != 0 && self.cr4 & CR4_LA57 == 0)
    }

    /// Translates `gva` through the guest's page tables in `mem`.
    pub(super) fn walk<M: GuestMemory + ?Sized>(&self, mem: &M, gva: u64) -> Walk {
        if !self.walkable() {
            return Walk::Ask;
        }
        if self.cr0 & CR0_PG == 0 {
            return Walk::Gpa(gva);
        }
        let xd_reserved = self.efer & EFER_NXE == 0;
        let entry = |table: u64, shift: u32| -> Option<u64> {
            let at = (table & ADDR) | (((gva >> shift) & 0x1ff) << 3);
            let e: u64 = mem.read_obj(GuestAddress(at)).ok()?;
            (e & P != 0 && !(xd_reserved && e & XD != 0)).then_some(e)
        };
        let Some(pml4e) = entry(self.cr3, 39) else {
            return Walk::Unmapped;
        };
        if pml4e & PS != 0 {
            return Walk::Unmapped;
        }
        let Some(pdpte) = entry(pml4e, 30) else {
            return Walk::Unmapped;
        };
        if pdpte & PS != 0 {
            // A 1 GiB page, if the guest's CPUID has them: the vCPU knows.
            return Walk::Ask;
        }
        let Some(pde) = entry(pdpte, 21) else {
            return Walk::Unmapped;
        };
        if pde & PS != 0 {
            if pde & PDE_2M_RESERVED != 0 {
                return Walk::Unmapped;
            }
            return Walk::Gpa((pde & ADDR & !0x1f_ffff) | (gva & 0x1f_ffff));
        }
        let Some(pte) = entry(pde, 12) else {
            return Walk::Unmapped;
        };
        Walk::Gpa((pte & ADDR) | (gva & 0xfff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    fn long_mode() -> Paging {
        Paging {
            cr0: CR0_PG | 1,
            cr3: PML4 | 0x5, // PCID bits are not part of the address
            cr4: CR4_PAE,
            efer: EFER_LMA | EFER_NXE | (1 << 8),
        }
    }

    /// Tables for: 0x40_0000 + 4 KiB page -> 0x9000 (through PT), the 2 MiB
    /// page at 0x20_0000 -> 0x60_0000, the 1 GiB page at 0x4000_0000 ->
    /// 0x8000_0000; everything else unmapped.
    fn tables() -> GuestMemoryMmap<()> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
        let put = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).expect("write");
        put(PML4, PDPT | P | 2);
        put(PDPT, PD | P | 2); // 0..1 GiB through the PD
        put(PDPT + 8, 0x8000_0000 | P | PS); // 1..2 GiB: one page
        put(PD + 8, 0x60_0000 | P | PS); // 2..4 MiB: one page
        put(PD + 2 * 8, PT | P); // 4..6 MiB through the PT
        put(PT + 8 * 5, 0x9000 | P | XD); // access rights do not matter
        mem
    }

    #[test]
    fn four_level_walk_follows_sdm_4_5_for_each_page_size() {
        let (p, mem) = (long_mode(), tables());
        assert_eq!(p.walk(&mem, 0x40_5123), Walk::Gpa(0x9123), "4 KiB page");
        assert_eq!(p.walk(&mem, 0x20_1234), Walk::Gpa(0x60_1234), "2 MiB page");
        assert_eq!(p.walk(&mem, 0x4123_4567), Walk::Ask, "1 GiB page: the vCPU decides");
        assert_eq!(p.walk(&mem, 0x40_6000), Walk::Unmapped, "PTE not present");
        assert_eq!(p.walk(&mem, 0x60_0000), Walk::Unmapped, "PDE not present");
        assert_eq!(p.walk(&mem, 0x8000_0000), Walk::Unmapped, "PDPTE not present");
        assert_eq!(p.walk(&mem, 0xffff_8000_0000_0000), Walk::Unmapped, "PML4E not present");
    }

    /// SDM Vol. 3A §4.5.4, tables 4-15 to 4-19: reserved bits the walk can
    /// see make the address unmapped (a page fault with RSVD for the CPU).
    #[test]
    fn reserved_bits_make_an_entry_no_mapping() {
        let (p, mem) = (long_mode(), tables());
        // Bits 20:13 of a 2 MiB page.
        let e: u64 = mem.read_obj(GuestAddress(PD + 8)).expect("read");
        mem.write_obj(e | (1 << 13), GuestAddress(PD + 8)).expect("write");
        assert_eq!(p.walk(&mem, 0x20_1234), Walk::Unmapped);
        // XD while EFER.NXE is clear (the PTE has it); with NXE it is not
        // reserved.
        let no_nxe = Paging {
            efer: EFER_LMA,
            ..long_mode()
        };
        assert_eq!(no_nxe.walk(&mem, 0x40_5123), Walk::Unmapped);
        assert_eq!(p.walk(&mem, 0x40_5123), Walk::Gpa(0x9123));
    }

    /// The tables are read at each walk: a change in guest memory (GDB's
    /// `M`, the guest's own stores before the stop) is seen by the next.
    #[test]
    fn the_walk_reads_the_tables_each_time() {
        let (p, mem) = (long_mode(), tables());
        assert_eq!(p.walk(&mem, 0x40_5123), Walk::Gpa(0x9123));
        mem.write_obj(0xa000 | P, GuestAddress(PT + 8 * 5)).expect("write");
        assert_eq!(p.walk(&mem, 0x40_5123), Walk::Gpa(0xa123));
        mem.write_obj(0u64, GuestAddress(PT + 8 * 5)).expect("write");
        assert_eq!(p.walk(&mem, 0x40_5123), Walk::Unmapped);
    }

    #[test]
    fn a_pml4_entry_with_ps_set_is_not_a_mapping() {
        let (p, mem) = (long_mode(), tables());
        let e: u64 = mem.read_obj(GuestAddress(PML4)).expect("read");
        mem.write_obj(e | PS, GuestAddress(PML4)).expect("write");
        assert_eq!(p.walk(&mem, 0x40_5123), Walk::Unmapped);
    }

    #[test]
    fn tables_outside_guest_memory_are_unmapped_not_a_panic() {
        let mem = tables();
        let p = Paging {
            cr3: 0x7fff_f000_0000,
            ..long_mode()
        };
        assert_eq!(p.walk(&mem, 0x1000), Walk::Unmapped);
    }

    /// The walk is what `KVM_TRANSLATE` answers on a real vCPU of the tiny
    /// guest (long mode, 4-level), for every page size: the guest's own
    /// 2 MiB pages, then a 4 KiB page through a page table and a 1 GiB page
    /// added to its tables in guest memory, and addresses no table maps.
    #[test]
    fn the_walk_agrees_with_kvm_translate_on_a_real_vcpu() {
        use crate::guest::{self, Guest, GuestError};
        use crate::vcpu::VcpuOps;
        let mut g = match Guest::new(1) {
            Ok(g) => g,
            Err(GuestError::NoKvm(e)) => {
                println!("SKIPPED: the walk against KVM_TRANSLATE because /dev/kvm cannot be opened ({e})");
                return;
            }
            Err(e) => panic!("guest: {e}"),
        };
        g.start(0, guest::LOOP).expect("start");
        let mem = g.memory().clone();
        // PD entry 1 (2..4 MiB) through a page table at 0x7000 whose entry
        // 3 maps 0x20_3000 to 0x1_5000; PDPT entry 2 (2..3 GiB) a 1 GiB page
        // at 0 (beyond guest memory from 1 MiB on: translated all the same).
        let pt = 0x7000;
        mem.write_obj(0u64, GuestAddress(pt)).expect("clear");
        for i in 0..512u64 {
            mem.write_obj(0u64, GuestAddress(pt + 8 * i)).expect("clear");
        }
        mem.write_obj(0x1_5000 | P | 2, GuestAddress(pt + 8 * 3)).expect("pte");
        mem.write_obj(pt | P | 2, GuestAddress(guest::PD + 8)).expect("pde");
        mem.write_obj(P | 2 | PS, GuestAddress(guest::PDPT + 8 * 2))
            .expect("pdpte");
        let vcpu = g.vcpu(0);
        // Through references too (a VMM's job gets whatever it passed).
        assert!(VcpuOps::translates_by_page_walk(&&*vcpu) && VcpuOps::translates_by_page_walk(&vcpu));
        let p = Paging::of(&VcpuOps::get_sregs(vcpu).expect("sregs"));
        assert!(p.walkable(), "the tiny guest runs with 4-level paging");
        let mut checked = 0;
        for gva in [
            0u64,
            guest::LOOP,
            0x1f_fff8,
            0x20_0000,
            0x20_3abc,
            0x20_4000,
            guest::ALIAS + 0x1234,
            0x8012_3456,
            0xc000_0000,
            0x1_0000_0000,
            0x7fff_ffff_f000,
            0xffff_8000_0000_0000,
            0xffff_ffff_ffff_f000,
        ] {
            let t = VcpuOps::translate_gva(vcpu, gva).expect("KVM_TRANSLATE");
            let kvm = if t.valid == 0 {
                Walk::Unmapped
            } else {
                Walk::Gpa(t.physical_address)
            };
            match p.walk(&mem, gva) {
                // A 1 GiB page: asked of the vCPU, whatever it says.
                Walk::Ask => assert_eq!(gva >> 30, 2, "gva {gva:#x}"),
                walked => assert_eq!(walked, kvm, "gva {gva:#x}"),
            }
            checked += 1;
        }
        assert_eq!(p.walk(&mem, 0x20_3abc), Walk::Gpa(0x1_5abc));
        assert_eq!(checked, 13);
    }

    #[test]
    fn paging_off_is_identity_and_other_modes_ask_the_vcpu() {
        let mem = tables();
        let off = Paging { cr0: 1, ..long_mode() };
        assert_eq!(off.walk(&mem, 0x1234_5678), Walk::Gpa(0x1234_5678));
        let pae32 = Paging { efer: 0, ..long_mode() };
        assert_eq!(pae32.walk(&mem, 0x1000), Walk::Ask);
        let bits32 = Paging {
            cr4: 0,
            efer: 0,
            ..long_mode()
        };
        assert_eq!(bits32.walk(&mem, 0x1000), Walk::Ask);
        let la57 = Paging {
            cr4: CR4_PAE | CR4_LA57,
            ..long_mode()
        };
        assert_eq!(la57.walk(&mem, 0x1000), Walk::Ask);
    }
}
