//! A fake vCPU for tests: records every call, counts them, answers
//! `KVM_TRANSLATE` from a small map, and fails the k-th call on demand.
//! As the kernel's, `KVM_GET_FPU` reports MXCSR as 0 and `KVM_SET_FPU` leaves
//! it alone; `KVM_GET_XSAVE`/`KVM_SET_XSAVE` carry it (the FXSAVE legacy
//! area of the image), and a set with MXCSR bits outside MXCSR_MASK fails
//! with `EINVAL` and changes nothing.

use std::sync::{Mutex, MutexGuard};

use std::collections::BTreeMap;

use kvm_bindings::{kvm_fpu, kvm_guest_debug, kvm_regs, kvm_sregs, kvm_translation, kvm_xsave};

use crate::vcpu::VcpuOps;

/// The errno an injected failure returns (`EIO`).
pub const INJECTED_ERRNO: i32 = 5;

/// Which operation a recorded call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `KVM_SET_GUEST_DEBUG`.
    SetGuestDebug,
    /// `KVM_GET_REGS`.
    GetRegs,
    /// `KVM_SET_REGS`.
    SetRegs,
    /// `KVM_TRANSLATE`.
    Translate,
    /// `KVM_GET_SREGS`.
    GetSregs,
    /// `KVM_SET_SREGS`.
    SetSregs,
    /// `KVM_GET_FPU`.
    GetFpu,
    /// `KVM_SET_FPU`.
    SetFpu,
    /// `KVM_GET_XSAVE`.
    GetXsave,
    /// `KVM_SET_XSAVE`.
    SetXsave,
    /// `KVM_GET_MSRS` (one MSR).
    GetMsr,
    /// `KVM_SET_MSRS` (one MSR).
    SetMsr,
}

/// The MXCSR_MASK a fake reports unless told otherwise: bits 0–15, as
/// current CPUs (DAZ included).
pub const FAKE_MXCSR_MASK: u32 = 0xffff;

/// IA32_KERNEL_GS_BASE: every fake has it (0 until written), as every
/// x86-64 vCPU does.
const KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `EINVAL`, what the kernel answers a refused value with.
const EINVAL: i32 = 22;

#[derive(Debug, Default)]
struct State {
    calls: Vec<Op>,
    fail_at: Option<usize>,
    fail_op: Option<(Op, usize)>,
    guest_debug: Option<kvm_guest_debug>,
    debug_history: Vec<kvm_guest_debug>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// The x87/SSE state, MXCSR included (the CPU's, not KVM_GET_FPU's).
    fpu: kvm_fpu,
    /// MXCSR_MASK in the XSAVE image; `None`: [`FAKE_MXCSR_MASK`].
    mxcsr_mask: Option<u32>,
    /// MSRs by index; one not here (but IA32_KERNEL_GS_BASE, 0 until set)
    /// reads as "KVM has none" (`EINVAL`).
    msrs: BTreeMap<u32, u64>,
    /// `(gva_base, gpa_base, size)` ranges; anything else is identity when
    /// `identity` is set, else unmapped.
    maps: Vec<(u64, u64, u64)>,
    no_identity: bool,
}

/// A fake vCPU.
///
/// * Every call is recorded ([`FakeVcpu::calls`], [`FakeVcpu::count`]).
/// * [`FakeVcpu::fail_call`] makes the k-th call from now (1-based, any
///   operation) fail with `EIO` and change nothing; [`FakeVcpu::fail_op`] does
///   the same for the k-th call of one operation.
/// * `KVM_SET_GUEST_DEBUG` stores its argument: [`FakeVcpu::guest_debug`] is
///   what the "kernel" holds, so tests compare it with what kvm-glue believes.
/// * `KVM_TRANSLATE` is the identity unless [`FakeVcpu::map`] ranges say
///   otherwise (or [`FakeVcpu::without_identity`] makes unmapped fail).
#[derive(Debug, Default)]
pub struct FakeVcpu {
    state: Mutex<State>,
}

impl FakeVcpu {
    /// A fake with no calls made, debugging off, identity translation.
    pub fn new() -> FakeVcpu {
        FakeVcpu::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock can only come from a failing test
        // assertion elsewhere; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails the `k`-th call from now (1-based, counting every operation).
    pub fn fail_call(&self, k: usize) {
        let mut s = self.lock();
        s.fail_at = Some(s.calls.len() + k);
    }

    /// Fails the `k`-th call of `op` from now (1-based).
    pub fn fail_op(&self, op: Op, k: usize) {
        let mut s = self.lock();
        let done = s.calls.iter().filter(|c| **c == op).count();
        s.fail_op = Some((op, done + k));
    }

    /// Maps `size` bytes of guest-virtual addresses at `gva` to `gpa`.
    pub fn map(&self, gva: u64, gpa: u64, size: u64) {
        self.lock().maps.push((gva, gpa, size));
    }

    /// Makes addresses outside [`FakeVcpu::map`] ranges unmapped (`valid = 0`).
    pub fn without_identity(&self) {
        self.lock().no_identity = true;
    }

    /// Every call so far, in order (failed ones included).
    pub fn calls(&self) -> Vec<Op> {
        self.lock().calls.clone()
    }

    /// How many calls of `op` were made (failed ones included).
    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|c| **c == op).count()
    }

    /// What the last successful `KVM_SET_GUEST_DEBUG` set (`None`: never set).
    pub fn guest_debug(&self) -> Option<kvm_guest_debug> {
        self.lock().guest_debug
    }

    /// Every successful `KVM_SET_GUEST_DEBUG` argument, in order.
    pub fn debug_history(&self) -> Vec<kvm_guest_debug> {
        self.lock().debug_history.clone()
    }

    /// The fake's registers.
    pub fn regs(&self) -> kvm_regs {
        self.lock().regs
    }

    /// Sets the fake's registers without counting a call.
    pub fn put_regs(&self, regs: kvm_regs) {
        self.lock().regs = regs;
    }

    /// The fake's special registers.
    pub fn sregs(&self) -> kvm_sregs {
        self.lock().sregs
    }

    /// Sets the fake's special registers without counting a call.
    pub fn put_sregs(&self, sregs: kvm_sregs) {
        self.lock().sregs = sregs;
    }

    /// The fake's x87/SSE state, with the CPU's MXCSR in `mxcsr` (which
    /// `KVM_GET_FPU` reports as 0).
    pub fn fpu(&self) -> kvm_fpu {
        self.lock().fpu
    }

    /// Sets the fake's x87/SSE state, MXCSR included, without counting a call.
    pub fn put_fpu(&self, fpu: kvm_fpu) {
        self.lock().fpu = fpu;
    }

    /// Sets the MXCSR_MASK the XSAVE image reports (0 means "the SDM's
    /// default, 0xffbf").
    pub fn put_mxcsr_mask(&self, mask: u32) {
        self.lock().mxcsr_mask = Some(mask);
    }

    /// The fake's MSR `index`, if it has one.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.lock().msrs.get(&index).copied()
    }

    /// Gives the fake MSR `index` with `value`, without counting a call.
    pub fn put_msr(&self, index: u32, value: u64) {
        self.lock().msrs.insert(index, value);
    }

    /// Records a call of `op`; `Err` if it is the one to fail.
    fn enter(&self, s: &mut State, op: Op) -> Result<(), kvm_ioctls::Error> {
        s.calls.push(op);
        let n = s.calls.len();
        let n_op = s.calls.iter().filter(|c| **c == op).count();
        if s.fail_at == Some(n) {
            s.fail_at = None;
            return Err(kvm_ioctls::Error::new(INJECTED_ERRNO));
        }
        if s.fail_op == Some((op, n_op)) {
            s.fail_op = None;
            return Err(kvm_ioctls::Error::new(INJECTED_ERRNO));
        }
        Ok(())
    }
}

impl VcpuOps for FakeVcpu {
    fn set_guest_debug(&self, dbg: &kvm_guest_debug) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::SetGuestDebug)?;
        s.guest_debug = Some(*dbg);
        s.debug_history.push(*dbg);
        Ok(())
    }

    fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::GetRegs)?;
        Ok(s.regs)
    }

    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::SetRegs)?;
        s.regs = *regs;
        Ok(())
    }

    fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::GetSregs)?;
        Ok(s.sregs)
    }

    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::SetSregs)?;
        s.sregs = *sregs;
        Ok(())
    }

    fn get_fpu(&self) -> Result<kvm_fpu, kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::GetFpu)?;
        // kvm_arch_vcpu_ioctl_get_fpu copies every FXSAVE field but MXCSR
        // into a zeroed struct.
        Ok(kvm_fpu { mxcsr: 0, ..s.fpu })
    }

    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::SetFpu)?;
        // As the kernel's KVM_SET_FPU: every field but MXCSR
        // (kvm_arch_vcpu_ioctl_set_fpu does not copy it).
        let mxcsr = s.fpu.mxcsr;
        s.fpu = kvm_fpu { mxcsr, ..*fpu };
        Ok(())
    }

    fn get_xsave(&self) -> Result<kvm_xsave, kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::GetXsave)?;
        Ok(xsave_of(&s.fpu, s.mxcsr_mask.unwrap_or(FAKE_MXCSR_MASK)))
    }

    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::SetXsave)?;
        let fpu = fpu_of(xsave);
        let mask = match s.mxcsr_mask.unwrap_or(FAKE_MXCSR_MASK) {
            0 => 0xffbf,
            m => m,
        };
        // As copy_uabi_to_xstate: reserved MXCSR bits are refused.
        if fpu.mxcsr & !mask != 0 {
            return Err(kvm_ioctls::Error::new(EINVAL));
        }
        s.fpu = fpu;
        Ok(())
    }

    fn get_msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::GetMsr)?;
        match s.msrs.get(&index) {
            Some(v) => Ok(*v),
            None if index == KERNEL_GS_BASE => Ok(0),
            None => Err(kvm_ioctls::Error::new(EINVAL)),
        }
    }

    fn set_msr(&self, index: u32, value: u64) -> Result<(), kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::SetMsr)?;
        if index != KERNEL_GS_BASE && !s.msrs.contains_key(&index) {
            return Err(kvm_ioctls::Error::new(EINVAL));
        }
        s.msrs.insert(index, value);
        Ok(())
    }

    fn translate_gva(&self, gva: u64) -> Result<kvm_translation, kvm_ioctls::Error> {
        let mut s = self.lock();
        self.enter(&mut s, Op::Translate)?;
        let mapped = s
            .maps
            .iter()
            .find(|(base, _, size)| gva.wrapping_sub(*base) < *size)
            .map(|(base, gpa, _)| gpa + (gva - base));
        let physical = match mapped {
            Some(p) => Some(p),
            None if s.no_identity => None,
            None => Some(gva),
        };
        Ok(kvm_translation {
            linear_address: gva,
            physical_address: physical.unwrap_or(0),
            valid: u8::from(physical.is_some()),
            writeable: 1,
            usermode: 0,
            pad: [0; 5],
        })
    }
}

/// The XSAVE image of `fpu` (FXSAVE legacy area, 64-bit layout, SDM vol. 1
/// §10.5.1 table 10-2; XSTATE_BV = x87 | SSE).
fn xsave_of(fpu: &kvm_fpu, mask: u32) -> kvm_xsave {
    let mut x = crate::vcpu::xsave_with_fpu(&kvm_xsave::default(), fpu);
    x.region[6] = fpu.mxcsr; // MXCSR, byte 24
    x.region[7] = mask; // MXCSR_MASK, byte 28
    x
}

/// The x87/SSE state in an XSAVE image (the inverse of [`xsave_of`]).
fn fpu_of(x: &kvm_xsave) -> kvm_fpu {
    let b: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| u64::from(u32_at(i)) | u64::from(u32_at(i + 4)) << 32;
    let mut f = kvm_fpu {
        fcw: u16_at(0),
        fsw: u16_at(2),
        ftwx: b[4],
        last_opcode: u16_at(6),
        last_ip: u64_at(8),
        last_dp: u64_at(16),
        mxcsr: u32_at(24),
        ..Default::default()
    };
    for (i, st) in f.fpr.iter_mut().enumerate() {
        st.copy_from_slice(&b[32 + 16 * i..48 + 16 * i]);
    }
    for (i, xmm) in f.xmm.iter_mut().enumerate() {
        xmm.copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_call_changes_nothing_and_is_counted() {
        let f = FakeVcpu::new();
        f.fail_op(Op::SetGuestDebug, 2);
        let dbg = kvm_guest_debug {
            control: 1,
            ..Default::default()
        };
        f.set_guest_debug(&dbg).expect("first call succeeds");
        let other = kvm_guest_debug {
            control: 3,
            ..Default::default()
        };
        let err = f.set_guest_debug(&other).expect_err("second call fails");
        assert_eq!(err.errno(), INJECTED_ERRNO);
        assert_eq!(f.guest_debug().map(|d| d.control), Some(1));
        assert_eq!(f.count(Op::SetGuestDebug), 2);
        f.set_guest_debug(&other).expect("third call succeeds");
        assert_eq!(f.guest_debug().map(|d| d.control), Some(3));
    }

    #[test]
    fn translation_uses_maps_then_identity() {
        let f = FakeVcpu::new();
        f.map(0x4000_0000, 0x1000, 0x1000);
        assert_eq!(
            f.translate_gva(0x4000_0010).map(|t| t.physical_address).ok(),
            Some(0x1010)
        );
        assert_eq!(f.translate_gva(0x5000).map(|t| t.physical_address).ok(), Some(0x5000));
        f.without_identity();
        assert_eq!(f.translate_gva(0x5000).map(|t| t.valid).ok(), Some(0));
    }
}
