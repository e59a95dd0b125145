//! Applies the `x86-debugreg` model to real KVM vCPUs: breakpoints,
//! watchpoints and single-step for a VMM built on the rust-vmm crates.
//!
//! ```
//! use kvm_glue::{fake::FakeVcpu, AddressSpace, BreakpointType, Handled, VmDebug};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)])?;
//! let dbg = VmDebug::new(mem); // VM-wide: clone it into every vCPU thread
//! let vcpu = FakeVcpu::new(); // a kvm_ioctls::VcpuFd in a VMM
//! let mut vcpu_dbg = dbg.vcpu(0)?; // owned by vCPU 0's thread
//!
//! assert!(vcpu_dbg.sync(&vcpu)?); // a new handle always applies once
//! dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, 0x1000, 1)?;
//! assert!(vcpu_dbg.sync(&vcpu)?); // before KVM_RUN: one KVM_SET_GUEST_DEBUG...
//! assert!(!vcpu_dbg.sync(&vcpu)?); // ...and none while nothing changes
//!
//! // KVM_RUN returned VcpuExit::Debug(arch):
//! let arch = kvm_bindings::kvm_debug_exit_arch { exception: 1, pad: 0, pc: 0x1000, dr6: 0xffff_0ff1, dr7: 0 };
//! match vcpu_dbg.handle_exit(&vcpu, &arch)? {
//!     Handled::Stop(stop) => assert_eq!(
//!         stop.to_string(),
//!         "vCPU 0 stopped at 0x1000: execute breakpoint at 0x1000 in DR0 (DR6 0xffff0ff1)"
//!     ),
//!     Handled::Resume(_) => unreachable!("the guest's own #DB/#BP: re-injected, run again"),
//! }
//! vcpu_dbg.step_over(); // the next sync steps past the breakpoint, then KVM_RUN
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # With vCPU threads
//!
//! A VMM's vCPU loop calls [`VcpuDebug::before_run`] before every `KVM_RUN`
//! and posts stops with [`VcpuDebug::report_stop`]; the debugger thread uses
//! [`VmDebug::stop_all`], [`VmDebug::wait_stop`], [`VmDebug::resume`] and
//! [`VmDebug::with_parked_vcpu`], and never touches a vCPU. A [`SignalKick`]
//! brings a vCPU out of `KVM_RUN` without `unsafe` in the VMM.
//!
//! The run-control rules ([`run_control`]): a stop the debugger drops owes
//! no step-over (its instruction runs again and hits again); resuming from
//! a reported stop at X steps over a breakpoint at X first, so a step is
//! one instruction; after [`VmDebug::detach`] a late stop is discarded
//! ([`Posted::Discarded`]) and nobody parks; vCPU ids are registered by
//! [`VmDebug::vcpu`] (or declared with [`VmDebug::with_vcpus`]) and any
//! other id is [`Error::Run`]; [`VmDebug::wait_stop`] answers
//! [`Error::NoVcpus`] once every handle is gone; [`VmDebug::moved`] says
//! which vCPUs ran an instruction after a multi-vCPU step. A vCPU thread
//! that waits in its own event loop uses [`VcpuDebug::poll_park`] and
//! [`VcpuDebug::enter`] instead of the blocking `before_run`.
//!
//! What a VMM around a real guest adds (issue #18): [`VmDebug::hold_until_attached`]
//! keeps every vCPU before its first instruction until a debugger attaches
//! (QEMU's `-S`; [`VmDebug::release_hold`] if none comes);
//! [`VcpuDebug::complete_io`] after every port or MMIO exit, so a parked
//! vCPU holds no half-done access; [`VcpuDebug::report_fault`] on a triple
//! fault, an internal error or an exit the VMM cannot handle, which the
//! debugger sees as a stop it cannot resume; single-steps keep interrupts
//! out by default where the host has `KVM_GUESTDBG_BLOCKIRQ`
//! ([`VmDebug::set_step_irqs`]). `examples/elf_vmm/` uses all of them.
//!
//! `examples/vmm_threads.rs` is the whole pattern, runnable:
//!
//! ```no_run
//! # use kvm_glue::{Handled, SignalKick, VmDebug, guest::Guest};
//! use kvm_glue::{run_once, Exit};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let mut g = Guest::new(1)?; let dbg = VmDebug::new(g.memory().clone());
//! let kick = SignalKick::new(0)?; // SIGRTMIN + 0, blocked outside KVM_RUN
//! dbg.set_kick(kick.clone())?;
//! let vcpu = g.vcpu(0);
//! let mut h = dbg.vcpu(0)?;
//! kick.prepare_vcpu_thread(0, vcpu)?; // on the vCPU's own thread
//! loop {
//!     h.before_run(&*vcpu)?; // parks while the debugger holds this vCPU, then syncs
//!     let exit = run_once(vcpu)?; // an owned copy: vcpu is free again
//!     match exit {
//!         Exit::Interrupted => kick.drain()?, // EINTR: kicked
//!         Exit::Out(port, byte) => {
//!             // the VMM's device model, then: KVM finishes the `out` at the
//!             // next KVM_RUN; finish it now, before any park
//!             h.complete_io(vcpu)?;
//!         }
//!         Exit::Debug { .. } => {
//!             let arch = exit.debug().ok_or("a debug exit has its data")?;
//!             if let Handled::Stop(stop) = h.handle_exit(&*vcpu, &arch)? {
//!                 h.report_stop(stop)?; // all-stop: everyone parks
//!             }
//!         }
//!         _ => break,
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Map
//! * [`VmDebug`] ([`debugger`]): the VM-wide intent, shared by all threads.
//! * [`VcpuDebug`] ([`vcpu_debug`]): per vCPU — `before_run`, `sync`, `handle_exit`, `step_over`.
//! * [`run_control`]: the pure run-control state machine — holds, parks,
//!   posted stops, step-over debts, sessions — and its rules.
//! * [`control`]: all-stop on threads — parking, posted stops, jobs for parked vCPUs.
//! * [`kick`]: bringing a vCPU out of `KVM_RUN` ([`SignalKick`], or any closure).
//! * [`idle`]: a halted vCPU's wait outside `KVM_RUN` (no in-kernel irqchip) that a
//!   kick, an intent change or the VMM's own [`IdleWaker`] ends at once.
//! * [`sw_table`]: software breakpoints by guest-physical address, with the requests behind them.
//! * [`VcpuOps`] ([`vcpu`]): the ioctls used, for `VcpuFd` and [`fake::FakeVcpu`].
//! * [`memory`]: guest memory as the core's `ByteMemory`, physical or virtual.
//! * [`run`]: one `KVM_RUN` with its exit copied out ([`run_once`], [`Exit`]), so the
//!   vCPU can be lent to `handle_exit`.
//! * [`probe`]: what this host's KVM really does.
//! * [`guest`]: a tiny built-in 64-bit guest for tests, the probe, the demo and the bench.
// docs.rs (`--cfg docsrs`, Cargo.toml): mark the `gdb`-only items.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod control;
pub mod debugger;
pub mod error;
pub mod fake;
pub mod guest;
pub mod idle;
pub mod kick;
pub mod memory;
pub mod probe;
pub mod run;
pub mod run_control;
pub mod sw_table;
mod sync;
pub mod vcpu;
pub mod vcpu_debug;

pub use debugger::{int1_pc_from_cpuid, Insert, StepIrqs, VmDebug};
pub use error::{Error, Result};
pub use idle::{IdleWaker, Woke};
pub use kick::{Kick, KickError, SignalKick};
pub use memory::{AddressSpace, MemoryError, PhysicalMemory, VirtualMemory};
pub use run::{run_once, Exit};
pub use run_control::{Action, Fault, RunError, RunState, StopEvent, MAX_VCPUS};
pub use sw_table::{Request, SpaceKind};
pub use vcpu::VcpuOps;
pub use vcpu_debug::{Completed, Handled, Park, Posted, Resume, StepOver, SyncAllError, VcpuDebug};

// The core types a kvm-glue user needs, so one dependency suffices.
pub use x86_debugreg::state::{Inserted, Removed};
pub use x86_debugreg::sw::{RemoveAll, SwError, SwInserted, SwRemoved};
pub use x86_debugreg::{
    Applied, BreakpointError, BreakpointType, ControlFlags, DebugState, Exception, GuestDebug, Hit, Hits, HwBreakpoint,
    HwError, HwKind, Len, Slot, Stop,
};

#[cfg(feature = "gdb")]
pub mod gdb;
