//! The VM the way a VMM owns it: guest memory, an in-kernel irqchip and
//! PIT, an ELF loaded by its program headers (`linux-loader`), and every
//! vCPU put straight into 64-bit long mode.
//!
//! Guest-physical memory map:
//!
//! | address     | what                                            |
//! |-------------|-------------------------------------------------|
//! | `0x1000`    | PML4                                            |
//! | `0x2000`    | PDPT                                            |
//! | `0x3000`    | PD: 512 × 2 MiB pages, 1 GiB identity-mapped    |
//! | `0x4000`    | GDT: null, 64-bit code (`0x8`), data (`0x10`)   |
//! | `0x7_0000`  | top of vCPU 1's stack (64 KiB each, down)       |
//! | `0x8_0000`  | top of vCPU 0's stack                           |
//! | `0x10_0000` | the ELF (linked at 1 MiB or above)              |
//!
//! The guest brings its own IDT (`lidt`); until it has, an exception is a
//! triple fault (`KVM_EXIT_SHUTDOWN`).

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::Error;

/// Guest memory size.
pub const MEM_SIZE: usize = 16 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
/// Top of vCPU 0's stack; vCPU `n`'s is `STACK_SPACING * n` below.
const STACK_TOP: u64 = 0x8_0000;
const STACK_SPACING: u64 = 0x1_0000;
/// Where the ELF must start: everything below is the VMM's.
const LOAD_MIN: u64 = 0x10_0000;
/// Beyond guest memory, below 4 GiB: where KVM on Intel keeps its TSS
/// pages (the address firecracker uses).
const TSS_ADDR: usize = 0xfffb_d000;

/// The VM. Field order is drop order: vCPUs, then the VM, then the memory
/// KVM maps.
pub struct Vm {
    pub vcpus: Vec<VcpuFd>,
    pub _vm: VmFd,
    pub _kvm: Kvm,
    pub mem: GuestMemoryMmap,
    /// The ELF's entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| format!("{what}: {e}").into()
}

/// Builds the VM with `vcpus` vCPUs, each at the ELF's entry with
/// `RDI` = its number and `RSI` = `timer` (the C guest's arguments).
pub fn build(elf: &Path, vcpus: usize, timer: bool) -> Result<Vm, Error> {
    let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    if vcpus > kvm_fd.get_nr_vcpus() {
        return Err(format!("this KVM allows {} vCPUs, {vcpus} asked for", kvm_fd.get_nr_vcpus()).into());
    }
    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(MemoryRegionAddress(0))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `desc` describes one mmap'ed region owned by `mem`, which
        // `Vm` drops after the VM and its vCPUs, so the mapping outlives
        // every use KVM makes of it. (VM setup, not debugging: the only
        // unsafe a VMM needs for debugging is none.)
        unsafe { vm.set_user_memory_region(desc) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.set_tss_address(TSS_ADDR).map_err(kvm("KVM_SET_TSS_ADDR"))?;
    // The in-kernel 8259 PICs, IOAPIC and a LAPIC per vCPU; then the 8254:
    // the guest's timer, handled in the kernel (no port exits for it).
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

    let loaded = Elf::load(
        &mem,
        None,
        &mut File::open(elf).map_err(|e| format!("{}: {e}", elf.display()))?,
        Some(GuestAddress(LOAD_MIN)),
    )
    .map_err(|e| format!("loading {}: {e}", elf.display()))?;
    // After the ELF, so an image linked too low is overwritten rather than
    // the page tables (linux-loader checks the entry point only).
    write_tables(&mem)?;

    let cpuid = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let mut fds = Vec::with_capacity(vcpus);
    for id in 0..vcpus {
        let vcpu = vm.create_vcpu(id as u64).map_err(kvm("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        long_mode(&vcpu)?;
        let regs = kvm_regs {
            rip: loaded.kernel_load.0,
            rsp: STACK_TOP - STACK_SPACING * id as u64,
            rdi: id as u64,
            rsi: u64::from(timer),
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        // With an in-kernel irqchip, every vCPU but the first waits for
        // INIT/SIPI; this VMM starts them all at once instead.
        vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm("KVM_SET_MP_STATE"))?;
        fds.push(vcpu);
    }
    Ok(Vm {
        vcpus: fds,
        _vm: vm,
        _kvm: kvm_fd,
        mem,
        entry: loaded.kernel_load.0,
        end: loaded.kernel_end,
    })
}

fn write_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_2M: u64 = 0x80;
    mem.write_obj(PDPT | PRESENT_RW, GuestAddress(PML4))?;
    mem.write_obj(PD | PRESENT_RW, GuestAddress(PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PRESENT_RW | PAGE_2M, GuestAddress(PD + 8 * i))?;
    }
    mem.write_obj(0u64, GuestAddress(GDT))?;
    mem.write_obj(0x00af_9b00_0000_ffffu64, GuestAddress(GDT + 8))?; // 64-bit code
    mem.write_obj(0x00cf_9300_0000_ffffu64, GuestAddress(GDT + 16))?; // data
    Ok(())
}

/// Long mode straight away (SDM Vol. 3A §9.8.5): paging with PAE, EFER.LME
/// and LMA, a 64-bit code segment matching the GDT's.
fn long_mode(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.efer = (1 << 8) | (1 << 10); // LME, LMA
    sregs.cr0 = (1 << 0) | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 31); // PE MP ET NE PG
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))
}
