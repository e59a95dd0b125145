//! A fake vCPU for tests: records every call, counts them, answers
//! `KVM_TRANSLATE` from a small map, and fails the k-th call on demand.
//! `KVM_SET_FPU` leaves MXCSR alone, as the kernel's does.

use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{kvm_fpu, kvm_guest_debug, kvm_regs, kvm_sregs, kvm_translation};

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
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Op>,
    fail_at: Option<usize>,
    fail_op: Option<(Op, usize)>,
    guest_debug: Option<kvm_guest_debug>,
    debug_history: Vec<kvm_guest_debug>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
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

    /// The fake's x87/SSE state.
    pub fn fpu(&self) -> kvm_fpu {
        self.lock().fpu
    }

    /// Sets the fake's x87/SSE state without counting a call.
    pub fn put_fpu(&self, fpu: kvm_fpu) {
        self.lock().fpu = fpu;
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
        Ok(s.fpu)
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
