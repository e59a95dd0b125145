//! The vCPU operations kvm-glue uses, as a small trait: implemented for
//! [`kvm_ioctls::VcpuFd`] and by [`crate::fake::FakeVcpu`] (which counts calls
//! and fails on demand), so every ioctl kvm-glue issues can be counted and made
//! to fail in tests.

use kvm_bindings::{kvm_fpu, kvm_guest_debug, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_translation, kvm_xsave, Msrs};
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
    /// `KVM_GET_XSAVE`: the XSAVE image (legacy FXSAVE area first: MXCSR at
    /// byte 24, MXCSR_MASK at 28), which `KVM_GET_FPU` lacks MXCSR from.
    ///
    /// # Errors
    /// The ioctl's error (`EINVAL` when the vCPU's XSAVE state is larger
    /// than `struct kvm_xsave`: dynamically enabled features such as AMX).
    fn get_xsave(&self) -> Result<kvm_xsave, kvm_ioctls::Error>;
    /// `KVM_SET_XSAVE`. The kernel refuses (`EINVAL`) an MXCSR with bits
    /// outside MXCSR_MASK.
    ///
    /// # Errors
    /// The ioctl's error. The `VcpuFd` implementation first issues
    /// `KVM_GET_XSAVE` and fails with its `EINVAL` where the vCPU's XSAVE
    /// state is larger than `struct kvm_xsave` (dynamically enabled
    /// features such as AMX), rather than let the kernel read past it; a
    /// VMM that enables such features must not change them on this vCPU
    /// from another thread meanwhile.
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error>;
    /// `KVM_GET_MSRS` of one MSR.
    ///
    /// # Errors
    /// The ioctl's error; `EINVAL` when KVM read none (an MSR it does not have).
    fn get_msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error>;
    /// `KVM_SET_MSRS` of one MSR.
    ///
    /// # Errors
    /// The ioctl's error; `EINVAL` when KVM wrote none (it refused the value).
    fn set_msr(&self, index: u32, value: u64) -> Result<(), kvm_ioctls::Error>;

    /// Whether [`translate_gva`](Self::translate_gva) is the walk of the
    /// guest's page tables from CR0/CR3/CR4/EFER that the CPU does (SDM
    /// Vol. 3A ch. 4), so that a debugger may do that walk itself in guest
    /// memory from the registers read at a stop, without an ioctl per page.
    /// `false` (the default) for a vCPU whose translation is anything else,
    /// such as a test fake's own map.
    fn translates_by_page_walk(&self) -> bool {
        false
    }
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
    fn get_xsave(&self) -> Result<kvm_xsave, kvm_ioctls::Error> {
        VcpuFd::get_xsave(self)
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
        // KVM_SET_XSAVE reads the vCPU's uABI XSAVE size (Linux 5.17 on;
        // before, exactly `struct kvm_xsave`), which is larger than
        // `struct kvm_xsave` only once dynamically enabled features (AMX)
        // are in use; KVM_GET_XSAVE refuses (EINVAL) exactly then. Ask it
        // first, so the set below never runs where the kernel would read
        // past the end of `xsave`.
        VcpuFd::get_xsave(self)?;
        // SAFETY: `xsave` is a whole `kvm_xsave` (4096 bytes), and the
        // KVM_GET_XSAVE just above succeeded on this vCPU, so its uABI size
        // was not larger. It grows only when the guest is granted a dynamic
        // XSTATE feature, which takes the process asking for it
        // (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM) and then this vCPU's
        // KVM_RUN, KVM_SET_MSRS of XFD or KVM_SET_CPUID2: not between these
        // two calls while kvm-glue holds the vCPU parked on its own thread.
        // A VMM that enables such features and calls this concurrently
        // from another thread is outside that; the `# Errors` docs say so.
        unsafe { VcpuFd::set_xsave(self, xsave) }
    }
    fn get_msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
        let mut msrs = one_msr(index, 0)?;
        if VcpuFd::get_msrs(self, &mut msrs)? != 1 {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        Ok(msrs.as_slice().first().map_or(0, |e| e.data))
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), kvm_ioctls::Error> {
        if VcpuFd::set_msrs(self, &one_msr(index, value)?)? != 1 {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        Ok(())
    }

    fn translates_by_page_walk(&self) -> bool {
        // KVM_TRANSLATE walks the guest's tables from these registers
        // (arch/x86/kvm/mmu/paging_tmpl.h), access rights aside.
        true
    }
}

/// A `kvm_msrs` of one entry.
fn one_msr(index: u32, data: u64) -> Result<Msrs, kvm_ioctls::Error> {
    Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))
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
    fn get_xsave(&self) -> Result<kvm_xsave, kvm_ioctls::Error> {
        (**self).get_xsave()
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
        (**self).set_xsave(xsave)
    }
    fn get_msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
        (**self).get_msr(index)
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), kvm_ioctls::Error> {
        (**self).set_msr(index, value)
    }
    fn translates_by_page_walk(&self) -> bool {
        (**self).translates_by_page_walk()
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
    fn get_xsave(&self) -> Result<kvm_xsave, kvm_ioctls::Error> {
        (**self).get_xsave()
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
        (**self).set_xsave(xsave)
    }
    fn get_msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
        (**self).get_msr(index)
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), kvm_ioctls::Error> {
        (**self).set_msr(index, value)
    }
    fn translates_by_page_walk(&self) -> bool {
        (**self).translates_by_page_walk()
    }
}

/// `xsave` with the x87 and SSE registers of `fpu` in its FXSAVE legacy
/// area (SDM Vol. 1 §10.5.1, Table 10-2: FCW at 0, FSW 2, abridged FTW 4,
/// FOP 6, FIP 8, FDP 16, ST0-7 at 32, XMM0-15 at 160; MXCSR at 24 is kept,
/// as `KVM_GET_FPU` reports it as 0) and both components marked present in
/// XSTATE_BV (byte 512, bits 0 and 1), so that the next XRSTOR loads them
/// rather than their init values.
pub fn xsave_with_fpu(xsave: &kvm_xsave, fpu: &kvm_fpu) -> kvm_xsave {
    let mut b: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
    b[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[4] = fpu.ftwx;
    b[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    b[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
    b[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        b[32 + 16 * i..48 + 16 * i].copy_from_slice(st);
    }
    for (i, xmm) in fpu.xmm.iter().enumerate() {
        b[160 + 16 * i..176 + 16 * i].copy_from_slice(xmm);
    }
    b[512] |= 0b11;
    let mut x = kvm_xsave::default();
    for (w, c) in x.region.iter_mut().zip(b.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    x
}
