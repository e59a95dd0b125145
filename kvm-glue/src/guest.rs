//! A built-in tiny guest: enough of a 64-bit machine to test debugging on a real KVM.
//!
//! [`Guest::new`] creates a VM with 1 or 2 vCPUs, 2 MiB of guest memory
//! (a [`GuestMemoryMmap`] registered with KVM), and puts every vCPU in 64-bit long
//! mode through its special registers: identity-mapped page tables, a flat GDT and
//! an IDT whose handlers report their vector with `out` to [`PORT_VECTOR`], so a
//! fault in the guest shows up as a `KVM_EXIT_IO` instead of a triple fault.
//!
//! The code is a handful of small routines at fixed addresses (see [`asm`]); a
//! test picks one by setting RIP with [`Guest::start`]. The same low 2 MiB are also
//! mapped at [`ALIAS`], so guest-virtual and guest-physical addresses can differ
//! (`ALIAS + x` is virtual, `x` the physical address behind it).
//!
//! Memory map (guest-physical):
//!
//! | address    | what                                   |
//! |------------|----------------------------------------|
//! | `0x1000`   | PML4                                   |
//! | `0x2000`   | PDPT (entries 0 and 1 → the one PD)    |
//! | `0x3000`   | PD (entry 0: a 2 MiB page at 0)        |
//! | `0x4000`   | GDT: null, 64-bit code, data           |
//! | `0x5000`   | IDT: 32 interrupt gates                |
//! | `0x6000`   | exception handler stubs, 16 bytes each |
//! | `0x8000`   | stacks, one 4 KiB page per vCPU        |
//! | `0x1_0000` | routines ([`asm`])                     |
//! | `0x2_0000` | data the data-access routine touches   |

pub mod asm;

pub use asm::*;
// One copy of the exit a VMM copies out of `kvm_run`: the public one.
pub use crate::run::{run_once, Exit};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Size of guest memory.
pub const MEM_SIZE: usize = 0x20_0000;
/// Guest-physical address of the top-level page table.
pub const PML4: u64 = 0x1000;
/// Guest-physical address of the page-directory-pointer table.
pub const PDPT: u64 = 0x2000;
/// Guest-physical address of the page directory.
pub const PD: u64 = 0x3000;
/// Guest-physical address of the GDT.
pub const GDT: u64 = 0x4000;
/// Guest-physical address of the IDT.
pub const IDT: u64 = 0x5000;
/// Guest-physical address of the exception handler stub for vector 0.
pub const HANDLERS: u64 = 0x6000;
/// Number of IDT entries (the architectural exception vectors).
pub const IDT_ENTRIES: u64 = 32;
/// Top of vCPU 0's stack; vCPU `n` uses `STACK_TOP + n * 0x1000`.
pub const STACK_TOP: u64 = 0x9000;
/// Virtual base of the second mapping of the low 2 MiB (PDPT entry 1).
pub const ALIAS: u64 = 0x4000_0000;
/// Most vCPUs the guest supports (one stack page each).
pub const MAX_VCPUS: usize = 2;

/// Code segment selector (GDT entry 1).
pub const CODE_SELECTOR: u16 = 0x8;
/// Data segment selector (GDT entry 2).
pub const DATA_SELECTOR: u16 = 0x10;

/// RFLAGS bit 1, which always reads as 1.
pub const RFLAGS_FIXED: u64 = 0x2;

/// Errors while building the tiny guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// `/dev/kvm` could not be opened (missing, or no permission).
    #[error("cannot open /dev/kvm: {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed while setting the guest up.
    #[error("KVM ioctl {what} failed: {source}")]
    Kvm {
        /// Which step failed.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory: {0}")]
    Alloc(#[from] vm_memory::mmap::FromRangesError),
    /// Guest memory could not be written.
    #[error("cannot write guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// More vCPUs were asked for than the guest has stacks for, or none.
    #[error("the tiny guest supports 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(usize),
    /// No vCPU with this id.
    #[error("the guest has no vCPU {0}")]
    NoSuchVcpu(usize),
    /// The host's KVM allows fewer vCPUs than asked for.
    #[error("this KVM allows at most {max} vCPUs, {asked} asked for")]
    HostVcpuLimit {
        /// vCPUs asked for.
        asked: usize,
        /// `KVM_CAP_NR_VCPUS`.
        max: usize,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> GuestError {
    move |source| GuestError::Kvm { what, source }
}

/// The tiny guest: a VM, its memory, and 1 or 2 vCPUs in 64-bit mode.
///
/// The vCPUs are lent out by `&mut` borrow only ([`Guest::vcpu`],
/// [`Guest::vcpus_mut`]), so the memory KVM was told about outlives every
/// `KVM_RUN`; use `std::thread::scope` to run them on several threads.
#[derive(Debug)]
pub struct Guest {
    // Field order matters on drop: vCPUs first, then the VM, then the memory
    // the VM's memory slot points into.
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    kvm: Kvm,
    mem: GuestMemoryMmap,
}

impl Guest {
    /// Builds the guest with `vcpus` vCPUs (1 or 2), each in long mode with RIP at
    /// [`STRAIGHT`].
    ///
    /// # Errors
    /// [`GuestError::NoKvm`] when `/dev/kvm` cannot be opened; otherwise the
    /// failing step.
    pub fn new(vcpus: usize) -> Result<Guest, GuestError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(GuestError::VcpuCount(vcpus));
        }
        let kvm = Kvm::new().map_err(GuestError::NoKvm)?;
        let max = kvm.get_nr_vcpus();
        if vcpus > max {
            return Err(GuestError::HostVcpuLimit { asked: vcpus, max });
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
        write_image(&mem)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(GuestError::Memory)?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `desc` describes exactly one mmap'ed region owned by `mem`;
            // `mem` is a field of the returned `Guest`, dropped after `vm` and
            // every vCPU, so the host mapping outlives every use KVM makes of it.
            unsafe { vm.set_user_memory_region(desc) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let mut guest = Guest {
            vcpus: Vec::with_capacity(vcpus),
            vm,
            kvm,
            mem,
        };
        let cpuid = guest
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        for id in 0..vcpus {
            let vcpu = guest.vm.create_vcpu(id as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            setup_long_mode(&vcpu)?;
            guest.vcpus.push(vcpu);
            guest.start(id, STRAIGHT)?;
        }
        Ok(guest)
    }

    /// The guest's memory (a cheap clone shares the same mapping).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The VM.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// vCPU `id`.
    ///
    /// # Panics
    /// If `id` is not below [`Guest::vcpu_count`] (a test-helper precondition).
    pub fn vcpu(&mut self, id: usize) -> &mut VcpuFd {
        &mut self.vcpus[id]
    }

    /// All vCPUs, for running them on scoped threads.
    pub fn vcpus_mut(&mut self) -> &mut [VcpuFd] {
        &mut self.vcpus
    }

    /// Points vCPU `id` at `rip` with a fresh stack and RFLAGS = 2 (interrupts off,
    /// TF and RF clear), general registers zeroed, and makes it runnable.
    ///
    /// # Errors
    /// [`GuestError::NoSuchVcpu`] for an `id` not below [`Guest::vcpu_count`];
    /// `KVM_SET_REGS` or `KVM_SET_MP_STATE` failing.
    pub fn start(&mut self, id: usize, rip: u64) -> Result<(), GuestError> {
        let vcpu = self.vcpus.get(id).ok_or(GuestError::NoSuchVcpu(id))?;
        start_vcpu(vcpu, id, rip)
    }

    /// Writes the original bytes of every routine back (undoing any patching).
    ///
    /// # Errors
    /// Guest memory write failing.
    pub fn restore_code(&self) -> Result<(), GuestError> {
        write_code(&self.mem)
    }
}

/// Points `vcpu` (number `id`, which selects its stack) at `rip`, and makes it
/// runnable (a `hlt` interrupted by a debug exit can leave it halted).
///
/// # Errors
/// `KVM_SET_REGS` or `KVM_SET_MP_STATE` failing.
pub fn start_vcpu(vcpu: &VcpuFd, id: usize, rip: u64) -> Result<(), GuestError> {
    vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    })
    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    let regs = kvm_regs {
        rip,
        rsp: STACK_TOP + (id as u64) * 0x1000,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

fn setup_long_mode(vcpu: &VcpuFd) -> Result<(), GuestError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 0, // must be 0 when L = 1
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (3 * 8 - 1) as u16;
    sregs.idt.base = IDT;
    sregs.idt.limit = (IDT_ENTRIES * 16 - 1) as u16;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = (1 << 8) | (1 << 10); // LME | LMA
    sregs.cr0 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 31); // PE MP ET NE PG
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// GDT descriptor of a 64-bit code segment (base 0, limit 4 GiB, P, S, L, G, type 0xb).
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
/// GDT descriptor of a data segment (base 0, limit 4 GiB, P, S, D/B, G, type 0x3).
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;

fn write_image(mem: &GuestMemoryMmap) -> Result<(), GuestError> {
    // Page tables: PML4[0] -> PDPT; PDPT[0] and PDPT[1] -> PD; PD[0] = 2 MiB page at 0.
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(PDPT | PRESENT_RW, GuestAddress(PML4))?;
    mem.write_obj(PD | PRESENT_RW, GuestAddress(PDPT))?;
    mem.write_obj(PD | PRESENT_RW, GuestAddress(PDPT + 8 * (ALIAS >> 30)))?;
    mem.write_obj(PRESENT_RW | PAGE_SIZE_2M, GuestAddress(PD))?;
    // GDT.
    mem.write_obj(0u64, GuestAddress(GDT))?;
    mem.write_obj(GDT_CODE64, GuestAddress(GDT + 8))?;
    mem.write_obj(GDT_DATA, GuestAddress(GDT + 16))?;
    // IDT and its handler stubs.
    for vector in 0..IDT_ENTRIES {
        let handler = HANDLERS + vector * STUB_STRIDE;
        let v = vector as u8;
        if is_trap_vector(v) {
            mem.write_slice(&trap_stub(v), GuestAddress(handler))?;
        } else {
            mem.write_slice(&fault_stub(v), GuestAddress(handler))?;
        }
        mem.write_slice(&idt_gate(handler), GuestAddress(IDT + vector * 16))?;
    }
    write_code(mem)
}

fn write_code(mem: &GuestMemoryMmap) -> Result<(), GuestError> {
    for (addr, code) in ROUTINES {
        mem.write_slice(code, GuestAddress(addr))?;
    }
    Ok(())
}

/// A 64-bit interrupt gate (SDM Vol. 3A §6.14.1): present, DPL 0, type 0xE,
/// selector [`CODE_SELECTOR`], no IST.
fn idt_gate(handler: u64) -> [u8; 16] {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&CODE_SELECTOR.to_le_bytes());
    gate[4] = 0; // IST
    gate[5] = 0x8E; // P=1, DPL=0, type=0xE (64-bit interrupt gate)
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    gate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_gate_splits_the_handler_address() {
        let g = idt_gate(0x1234_5678_9abc_def0);
        assert_eq!(&g[0..2], &[0xf0, 0xde]);
        assert_eq!(&g[2..4], &[0x08, 0x00]);
        assert_eq!(g[5], 0x8e);
        assert_eq!(&g[6..8], &[0xbc, 0x9a]);
        assert_eq!(&g[8..12], &[0x78, 0x56, 0x34, 0x12]);
    }

    #[test]
    fn routines_do_not_overlap() {
        let mut spans: Vec<(u64, u64)> = ROUTINES.iter().map(|(a, c)| (*a, *a + c.len() as u64)).collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{w:x?}");
        }
        assert!(spans.iter().all(|s| s.1 <= DATA));
    }

    #[test]
    fn data_accesses_are_in_the_routine_and_contiguous() {
        for w in DATA_ACCESSES.windows(2) {
            assert_eq!(w[0].next, w[1].insn);
        }
        assert_eq!(DATA_ACCESSES[9].next, DATA_ACCESS_OUT);
    }
}
