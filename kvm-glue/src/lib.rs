//! Applies the `x86-debugreg` model to real KVM vCPUs.
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod fake;
pub mod guest;
pub mod vcpu;

pub use vcpu::VcpuOps;
pub mod probe;
