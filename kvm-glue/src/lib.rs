//! Applies the `x86-debugreg` model to real KVM vCPUs.
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
