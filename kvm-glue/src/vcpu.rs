//! The vCPU operations kvm-glue uses, as a small trait: implemented for
//! [`kvm_ioctls::VcpuFd`] and by [`crate::fake::FakeVcpu`] (which counts calls
//! and fails on demand), so every ioctl kvm-glue issues can be counted and made
//! to fail in tests.

use kvm_bindings::{kvm_fpu, kvm_guest_debug, kvm_regs, kvm_sregs, kvm_translation};
use kvm_ioctls::VcpuFd;

/// The vCPU ioctls kvm-glue issues.
///
/// All take `&self`, as in kvm-ioctls: none of them needs exclusive access to
/// the `kvm_run` area (only `KVM_RUN` does, and kvm-glue leaves running to the
/// VMM).
pub trait VcpuOps {
    /// `KVM_SET_GUEST_DEBUG`.
    ///
    /// # Errors
    /// The ioctl's error.
    fn set_guest_debug(&self, dbg: &kvm_guest_debug) -> Result<(), kvm_ioctls::Error>;
    /// `KVM_GET_REGS`.
    ///
    /// # Errors
    /// The ioctl's error.
    fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error>;
    /// `KVM_SET_REGS`.
    ///
    /// # Errors
    /// The ioctl's error.
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error>;
    /// `KVM_GET_SREGS`.
    ///
    /// # Errors
    /// The ioctl's error.
    fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error>;
    /// `KVM_SET_SREGS`.
    ///
    /// # Errors
    /// The ioctl's error.
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error>;
    /// `KVM_GET_FPU`: the x87 and SSE state (FXSAVE layout).
    ///
    /// # Errors
    /// The ioctl's error.
    fn get_fpu(&self) -> Result<kvm_fpu, kvm_ioctls::Error>;
    /// `KVM_SET_FPU`.
    ///
    /// # Errors
    /// The ioctl's error.
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error>;
    /// `KVM_TRANSLATE`: guest-virtual (linear) to guest-physical address, with
    /// the vCPU's current paging state. `valid == 0` in the answer means unmapped.
    ///
    /// # Errors
    /// The ioctl's error.
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation, kvm_ioctls::Error>;
}

impl VcpuOps for VcpuFd {
    fn set_guest_debug(&self, dbg: &kvm_guest_debug) -> Result<(), kvm_ioctls::Error> {
        VcpuFd::set_guest_debug(self, dbg)
    }
    fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        VcpuFd::get_regs(self)
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        VcpuFd::set_regs(self, regs)
    }
    fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        VcpuFd::get_sregs(self)
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        VcpuFd::set_sregs(self, sregs)
    }
    fn get_fpu(&self) -> Result<kvm_fpu, kvm_ioctls::Error> {
        VcpuFd::get_fpu(self)
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error> {
        VcpuFd::set_fpu(self, fpu)
    }
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation, kvm_ioctls::Error> {
        VcpuFd::translate_gva(self, gva)
    }
}

impl<V: VcpuOps + ?Sized> VcpuOps for &V {
    fn set_guest_debug(&self, dbg: &kvm_guest_debug) -> Result<(), kvm_ioctls::Error> {
        (**self).set_guest_debug(dbg)
    }
    fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        (**self).get_regs()
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        (**self).set_regs(regs)
    }
    fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        (**self).get_sregs()
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        (**self).set_sregs(sregs)
    }
    fn get_fpu(&self) -> Result<kvm_fpu, kvm_ioctls::Error> {
        (**self).get_fpu()
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error> {
        (**self).set_fpu(fpu)
    }
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation, kvm_ioctls::Error> {
        (**self).translate_gva(gva)
    }
}

impl<V: VcpuOps + ?Sized> VcpuOps for &mut V {
    fn set_guest_debug(&self, dbg: &kvm_guest_debug) -> Result<(), kvm_ioctls::Error> {
        (**self).set_guest_debug(dbg)
    }
    fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        (**self).get_regs()
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        (**self).set_regs(regs)
    }
    fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        (**self).get_sregs()
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        (**self).set_sregs(sregs)
    }
    fn get_fpu(&self) -> Result<kvm_fpu, kvm_ioctls::Error> {
        (**self).get_fpu()
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error> {
        (**self).set_fpu(fpu)
    }
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation, kvm_ioctls::Error> {
        (**self).translate_gva(gva)
    }
}
