//! Helpers for the tests that run the tiny guest on /dev/kvm.
#![allow(dead_code)]

use std::cell::Cell;
use std::sync::OnceLock;

use kvm_bindings::{kvm_fpu, kvm_guest_debug, kvm_regs, kvm_sregs, kvm_translation, kvm_xsave};
use kvm_glue::guest::{self, Exit, Guest, GuestError};
use kvm_glue::probe::{self, Finding, Probe};
use kvm_glue::{Handled, StopEvent, VcpuDebug, VcpuOps};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

/// The tiny guest, or `None` after printing one line when /dev/kvm cannot be
/// opened (`.ci/run` turns that into a failure where /dev/kvm exists).
pub fn guest(test: &str, vcpus: usize) -> Option<Guest> {
    match Guest::new(vcpus) {
        Ok(g) => Some(g),
        Err(GuestError::NoKvm(e)) => {
            // .ci/run sets this where /dev/kvm exists: a skip there is a failure.
            if std::env::var_os("KVM_GLUE_REQUIRE_KVM").is_some() {
                panic!("{test}: /dev/kvm cannot be opened ({e}) but KVM_GLUE_REQUIRE_KVM is set");
            }
            println!("{test}: SKIPPED: /dev/kvm cannot be opened ({e})");
            None
        }
        Err(e) => panic!("{test}: cannot build the tiny guest: {e}"),
    }
}

/// The probe, run once per test binary.
pub fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| probe::probe().expect("the probe runs where the guest does"))
}

/// The tiny guest with `vcpus` vCPUs, if this host can run `check`: `None`
/// after printing the one SKIPPED line when /dev/kvm is missing (a failure
/// under `KVM_GLUE_REQUIRE_KVM`) or when the probe says `feature` does not
/// work here.
pub fn guest_for(check: &str, vcpus: usize, feature: fn(&Probe) -> &Finding) -> Option<Guest> {
    let g = guest(check, vcpus)?;
    let finding = feature(probe());
    if !finding.supported {
        println!(
            "{check}: SKIPPED: the probe says this host's KVM cannot: {}",
            finding.detail
        );
        return None;
    }
    Some(g)
}

/// A `VcpuFd` that counts the `KVM_SET_GUEST_DEBUG` calls made through it.
pub struct Counting<'a> {
    pub fd: &'a VcpuFd,
    pub set_guest_debug: Cell<usize>,
}

impl<'a> Counting<'a> {
    pub fn new(fd: &'a VcpuFd) -> Counting<'a> {
        Counting {
            fd,
            set_guest_debug: Cell::new(0),
        }
    }
}

impl VcpuOps for Counting<'_> {
    fn set_guest_debug(&self, dbg: &kvm_guest_debug) -> Result<(), kvm_ioctls::Error> {
        self.set_guest_debug.set(self.set_guest_debug.get() + 1);
        self.fd.set_guest_debug(dbg)
    }
    fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        self.fd.get_regs()
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_regs(regs)
    }
    fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        self.fd.get_sregs()
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_sregs(sregs)
    }
    fn get_fpu(&self) -> Result<kvm_fpu, kvm_ioctls::Error> {
        self.fd.get_fpu()
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), kvm_ioctls::Error> {
        self.fd.set_fpu(fpu)
    }
    fn translate_gva(&self, gva: u64) -> Result<kvm_translation, kvm_ioctls::Error> {
        self.fd.translate_gva(gva)
    }
    fn get_xsave(&self) -> Result<kvm_xsave, kvm_ioctls::Error> {
        VcpuOps::get_xsave(self.fd)
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
        VcpuOps::set_xsave(self.fd, xsave)
    }
    fn get_msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
        VcpuOps::get_msr(self.fd, index)
    }
    fn set_msr(&self, index: u32, value: u64) -> Result<(), kvm_ioctls::Error> {
        VcpuOps::set_msr(self.fd, index, value)
    }
}

/// What a resumed vCPU came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stop for the debugger.
    Stop(StopEvent),
    /// Any exit that is not a debug exit.
    Exit(Exit),
}

/// `sync`, `KVM_RUN`, `handle_exit`, repeated while the answer is "run again".
pub fn resume(h: &mut VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd) -> Event {
    for _ in 0..64 {
        h.sync(&*vcpu).expect("sync");
        let exit = guest::run_once(vcpu).expect("KVM_RUN");
        let Some(arch) = exit.debug() else {
            return Event::Exit(exit);
        };
        match h.handle_exit(&*vcpu, &arch).expect("handle_exit") {
            Handled::Stop(ev) => return Event::Stop(ev),
            Handled::Resume(_) => continue,
        }
    }
    panic!("64 debug exits in a row without a stop");
}

/// Resumes until the routine's `out` to PORT_DONE, collecting every stop
/// (stepping over execute and software breakpoints as needed).
pub fn stops_until_done(h: &mut VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd) -> Vec<StopEvent> {
    let mut stops = Vec::new();
    for _ in 0..32 {
        match resume(h, vcpu) {
            Event::Stop(ev) => {
                stops.push(ev);
                h.step_over();
            }
            Event::Exit(Exit::Out(guest::PORT_DONE, _)) => return stops,
            Event::Exit(other) => panic!("unexpected exit {other:?} after stops {stops:x?}"),
        }
    }
    panic!("no end after 32 stops: {stops:x?}");
}
