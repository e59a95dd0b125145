//! Guest memory as the core's [`ByteMemory`], for software breakpoints.
//!
//! Two address spaces: [`PhysicalMemory`] takes guest-physical addresses
//! (breakpoints before paging is on, or where the VMM already translated),
//! [`VirtualMemory`] translates each guest-virtual address with
//! `KVM_TRANSLATE` on a vCPU first (the vCPU's current page tables decide).

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};
use x86_debugreg::sw::ByteMemory;

use crate::vcpu::VcpuOps;

/// Why a guest memory access for a software breakpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `KVM_TRANSLATE` failed.
    #[error("KVM_TRANSLATE of {gva:#x} failed: {source}")]
    Translate {
        /// The guest-virtual address.
        gva: u64,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest-virtual address is not mapped by the vCPU's page tables.
    #[error("guest-virtual address {gva:#x} is not mapped")]
    NotMapped {
        /// The guest-virtual address.
        gva: u64,
    },
    /// A guest-physical range is not (wholly) backed by guest memory.
    #[error("guest-physical range {gpa:#x}+{len:#x} is not guest memory")]
    Unbacked {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: usize,
    },
    /// A range runs past the end of the address space.
    #[error("range {addr:#x}+{len:#x} wraps around the address space")]
    Wraps {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The guest-physical address is not backed by guest memory.
    #[error("guest-physical address {gpa:#x} cannot be accessed: {source}")]
    Access {
        /// The guest-physical address.
        gpa: u64,
        /// vm-memory's error.
        #[source]
        source: GuestMemoryError,
    },
}

/// Which address space a software-breakpoint address is in.
#[derive(Clone, Copy)]
pub enum AddressSpace<'a> {
    /// Guest-physical: used as is.
    Physical,
    /// Guest-virtual (linear): translated with `KVM_TRANSLATE` on this vCPU.
    Virtual(&'a dyn VcpuOps),
}

impl std::fmt::Debug for AddressSpace<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressSpace::Physical => f.write_str("Physical"),
            AddressSpace::Virtual(_) => f.write_str("Virtual(<vcpu>)"),
        }
    }
}

fn read_phys<M: GuestMemory + ?Sized>(mem: &M, gpa: u64) -> Result<u8, MemoryError> {
    mem.read_obj::<u8>(GuestAddress(gpa))
        .map_err(|source| MemoryError::Access { gpa, source })
}

fn write_phys<M: GuestMemory + ?Sized>(mem: &M, gpa: u64, value: u8) -> Result<(), MemoryError> {
    mem.write_obj(value, GuestAddress(gpa))
        .map_err(|source| MemoryError::Access { gpa, source })
}

/// Guest-physical byte access to a [`GuestMemory`].
#[derive(Debug)]
pub struct PhysicalMemory<'a, M: ?Sized>(pub &'a M);

impl<M: GuestMemory + ?Sized> ByteMemory for PhysicalMemory<'_, M> {
    type Error = MemoryError;
    fn read_byte(&mut self, addr: u64) -> Result<u8, MemoryError> {
        read_phys(self.0, addr)
    }
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), MemoryError> {
        write_phys(self.0, addr, value)
    }
}

/// Guest-virtual byte access: each address is translated with `KVM_TRANSLATE`
/// on `vcpu`, then accessed in `mem`.
pub struct VirtualMemory<'a, M: ?Sized> {
    /// Guest memory.
    pub mem: &'a M,
    /// The vCPU whose paging state translates.
    pub vcpu: &'a dyn VcpuOps,
}

impl<M: ?Sized> std::fmt::Debug for VirtualMemory<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VirtualMemory")
    }
}

/// Translates `gva` with `KVM_TRANSLATE` on `vcpu`.
///
/// # Errors
/// [`MemoryError::Translate`] if the ioctl fails, [`MemoryError::NotMapped`] if
/// the page tables do not map `gva`.
pub fn translate(vcpu: &dyn VcpuOps, gva: u64) -> Result<u64, MemoryError> {
    let t = vcpu
        .translate_gva(gva)
        .map_err(|source| MemoryError::Translate { gva, source })?;
    if t.valid == 0 {
        return Err(MemoryError::NotMapped { gva });
    }
    Ok(t.physical_address)
}

impl<M: GuestMemory + ?Sized> ByteMemory for VirtualMemory<'_, M> {
    type Error = MemoryError;
    fn read_byte(&mut self, addr: u64) -> Result<u8, MemoryError> {
        read_phys(self.mem, translate(self.vcpu, addr)?)
    }
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), MemoryError> {
        write_phys(self.mem, translate(self.vcpu, addr)?, value)
    }
}
