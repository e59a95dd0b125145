//! One `KVM_RUN`, with its exit copied out of the `kvm_run` area.
//!
//! [`VcpuFd::run`] returns a [`VcpuExit`] that borrows the vCPU mutably (it
//! points into the `kvm_run` page), so while a VMM holds it, the vCPU cannot
//! be lent to [`VcpuDebug::handle_exit`](crate::VcpuDebug::handle_exit),
//! which reads its registers. [`run_once`] runs the vCPU and returns an owned
//! [`Exit`]; a kick's `EINTR` is [`Exit::Interrupted`], not an error.
//!
//! The loop of a vCPU thread (the lib docs show it whole, with parking and
//! kicks):
//!
//! ```no_run
//! use kvm_glue::run::{run_once, Exit};
//! use kvm_glue::{Handled, SignalKick, VmDebug};
//! # fn f(dbg: VmDebug<vm_memory::GuestMemoryMmap>, vcpu: &mut kvm_ioctls::VcpuFd, kick: &SignalKick)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! let mut h = dbg.vcpu(0)?;
//! loop {
//!     h.before_run(&*vcpu)?;
//!     let exit = run_once(vcpu)?; // the &mut borrow of KVM_RUN ends here
//!     match exit {
//!         Exit::Interrupted => kick.drain()?,
//!         Exit::Debug { .. } => {
//!             let arch = exit.debug().expect("a debug exit has its data");
//!             if let Handled::Stop(stop) = h.handle_exit(&*vcpu, &arch)? {
//!                 h.report_stop(stop)?;
//!             }
//!         }
//!         Exit::Out(port, byte) => {
//!             /* the VMM's device model */
//!             h.complete_io(vcpu)?; // finish the `out` before any park
//!         }
//!         Exit::Hlt => break,
//!         other => return Err(format!("unexpected exit {other:?}").into()),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! KVM finishes a port or MMIO access at the next `KVM_RUN`: until then the
//! vCPU's RIP is still at the instruction. [`complete_io`] (through
//! [`VcpuDebug::complete_io`](crate::VcpuDebug::complete_io), which also
//! handles the debug exit that run can end in) finishes it at once, so a
//! vCPU the debugger then parks shows the instruction after the access,
//! which will not run again.
//!
//! An `in` needs its answer written into `kvm_run` before the next
//! `KVM_RUN`, which an owned copy cannot do: a VMM that emulates port reads
//! or MMIO keeps its own `match` on [`VcpuFd::run`] for those (writes the
//! answer, then completes) and uses [`Exit::from_vcpu_exit`] for the rest.

use kvm_ioctls::{VcpuExit, VcpuFd};

/// What a run of a vCPU ended with, copied out of the `kvm_run` area so it can
/// outlive the borrow of the vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// `KVM_EXIT_DEBUG`, with its architecture data.
    Debug {
        /// Exception vector (1 = #DB, 3 = #BP).
        exception: u32,
        /// Linear address of the instruction (CS base + RIP).
        pc: u64,
        /// DR6 as KVM reports it.
        dr6: u64,
        /// DR7 as KVM reports it (0 on some hosts; never relied on).
        dr7: u64,
    },
    /// An `out` of one byte: `(port, value)`.
    Out(u16, u8),
    /// `hlt` (only without an in-kernel irqchip: with one, KVM halts the
    /// vCPU inside `KVM_RUN` until an interrupt).
    Hlt,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_SHUTDOWN` (a triple fault).
    Shutdown,
    /// `KVM_RUN` returned `EINTR`: a signal (a kick) arrived before or
    /// during the run. Not an error: drain the kick and check for requests.
    Interrupted,
    /// Anything else, as text.
    Other(String),
}

impl Exit {
    /// Copies a [`VcpuExit`] into an [`Exit`].
    pub fn from_vcpu_exit(exit: &VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::Debug(d) => Exit::Debug {
                exception: d.exception,
                pc: d.pc,
                dr6: d.dr6,
                dr7: d.dr7,
            },
            VcpuExit::IoOut(port, [value]) => Exit::Out(*port, *value),
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::Shutdown => Exit::Shutdown,
            other => Exit::Other(format!("{other:?}")),
        }
    }

    /// The debug-exit data, if this is a debug exit: what
    /// [`VcpuDebug::handle_exit`](crate::VcpuDebug::handle_exit) takes.
    pub fn debug(&self) -> Option<kvm_bindings::kvm_debug_exit_arch> {
        match *self {
            Exit::Debug {
                exception,
                pc,
                dr6,
                dr7,
            } => Some(kvm_bindings::kvm_debug_exit_arch {
                exception,
                pad: 0,
                pc,
                dr6,
                dr7,
            }),
            _ => None,
        }
    }
}

/// Completes the port or MMIO access `vcpu`'s last run exited with, without
/// running the guest on: one `KVM_RUN` with `immediate_exit` set, in which
/// KVM finishes the access (an `in`'s answer goes into the register, RIP
/// moves past the instruction) and returns `EINTR` before entering the
/// guest — [`Exit::Interrupted`]. If the instruction was single-stepped,
/// KVM reports the step's trap from that run instead: an [`Exit::Debug`]
/// at the next instruction, to be handled like any other.
///
/// Until then the vCPU holds a half-done access (RIP still at the `out`),
/// so a vCPU the debugger parks must complete it first:
/// [`VcpuDebug::complete_io`](crate::VcpuDebug::complete_io) does this and
/// handles that debug exit.
///
/// # Errors
/// The `KVM_RUN` ioctl's error, other than `EINTR`.
pub fn complete_io(vcpu: &mut VcpuFd) -> Result<Exit, kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let exit = run_once(vcpu);
    vcpu.set_kvm_immediate_exit(0);
    exit
}

/// Runs `vcpu` once and copies the exit out. `EINTR` (a kick) is
/// [`Exit::Interrupted`], not an error.
///
/// # Errors
/// The `KVM_RUN` ioctl's error, other than `EINTR`.
pub fn run_once(vcpu: &mut VcpuFd) -> Result<Exit, kvm_ioctls::Error> {
    match vcpu.run() {
        Ok(exit) => Ok(Exit::from_vcpu_exit(&exit)),
        Err(e) if e.errno() == libc::EINTR => Ok(Exit::Interrupted),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_debug_exit_keeps_every_field() {
        let arch = kvm_bindings::kvm_debug_exit_arch {
            exception: 3,
            pad: 0,
            pc: 0x1234_5678,
            dr6: 0xffff_4ff0,
            dr7: 0x401,
        };
        let exit = Exit::from_vcpu_exit(&VcpuExit::Debug(arch));
        assert_eq!(
            exit,
            Exit::Debug {
                exception: 3,
                pc: 0x1234_5678,
                dr6: 0xffff_4ff0,
                dr7: 0x401
            }
        );
        assert_eq!(exit.debug(), Some(arch));
    }

    #[test]
    fn a_one_byte_out_is_its_port_and_value_and_a_wider_one_is_other() {
        assert_eq!(
            Exit::from_vcpu_exit(&VcpuExit::IoOut(0x3f8, b"A")),
            Exit::Out(0x3f8, b'A')
        );
        assert!(matches!(
            Exit::from_vcpu_exit(&VcpuExit::IoOut(0x3f8, &[1, 2])),
            Exit::Other(_)
        ));
        assert_eq!(Exit::Out(0x3f8, 1).debug(), None);
    }
}
