//! Applies the `x86-debugreg` model to real KVM vCPUs: breakpoints,
//! watchpoints and single-step for a VMM built on the rust-vmm crates.
//!
//! ```
//! use kvm_glue::{fake::FakeVcpu, AddressSpace, Handled, VmDebug};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use x86_debugreg::BreakpointType;
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)])?;
//! let dbg = VmDebug::new(mem); // VM-wide: clone it into every vCPU thread
//! let vcpu = FakeVcpu::new(); // a kvm_ioctls::VcpuFd in a VMM
//! let mut vcpu_dbg = dbg.vcpu(0); // owned by vCPU 0's thread
//!
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
//! vcpu_dbg.step_over(&vcpu)?; // then sync + KVM_RUN as usual
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Map
//! * [`VmDebug`] ([`debugger`]): the VM-wide intent, shared by all threads.
//! * [`VcpuDebug`] ([`vcpu_debug`]): per vCPU — `sync`, `handle_exit`, `step_over`.
//! * [`VcpuOps`] ([`vcpu`]): the ioctls used, for `VcpuFd` and [`fake::FakeVcpu`].
//! * [`memory`]: guest memory as the core's `ByteMemory`, physical or virtual.
//! * [`probe`]: what this host's KVM really does.
//! * [`guest`]: a tiny built-in 64-bit guest for tests, the probe, the demo and the bench.
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod debugger;
pub mod error;
pub mod fake;
pub mod guest;
pub mod memory;
pub mod probe;
pub mod vcpu;
pub mod vcpu_debug;

pub use debugger::{Insert, SyncAllError, VmDebug};
pub use error::{Error, Result};
pub use memory::{AddressSpace, MemoryError, PhysicalMemory, VirtualMemory};
pub use vcpu::VcpuOps;
pub use vcpu_debug::{Handled, Resume, StepOver, StopEvent, VcpuDebug};
