//! kvm-glue's error type.

use x86_debugreg::{BreakpointError, DecodeError};

use crate::memory::MemoryError;
use crate::run_control::RunError;

/// The result type of kvm-glue's debug handles.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a debug-handle operation failed.
///
/// Every operation that fails changes nothing: no half-inserted breakpoint,
/// no half-patched memory, and no vCPU handle recording a configuration its
/// vCPU does not have.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ioctl failed on one vCPU.
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Vcpu {
        /// The vCPU's id.
        vcpu: usize,
        /// The ioctl.
        op: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A `KVM_RUN` kvm-glue made ended in an exit it cannot handle.
    #[error("vCPU {vcpu}: KVM_RUN ended in {exit}")]
    UnexpectedExit {
        /// The vCPU's id.
        vcpu: usize,
        /// The exit, as text.
        exit: String,
    },
    /// The host's KVM lacks what the operation needs.
    #[error("this host's KVM lacks {what}")]
    HostLacks {
        /// What is missing.
        what: &'static str,
    },
    /// A KVM ioctl failed outside any one vCPU.
    #[error("KVM ioctl failed: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// The core model refused a breakpoint operation (bad length, misaligned,
    /// not set, memory failure, ...).
    #[error(transparent)]
    Breakpoint(#[from] BreakpointError<MemoryError>),
    /// Guest memory could not be read, written or translated.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A debug exit that cannot be a guest-debug exit.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The watchpoint table refused (not set, or not a slot kind).
    #[error(transparent)]
    Watch(#[from] x86_debugreg::watch::WatchError),
    /// A vCPU could not be kicked out of `KVM_RUN`.
    #[error("kicking vCPU {vcpu} failed: {source}")]
    Kick {
        /// The vCPU.
        vcpu: usize,
        /// The kick's error.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU did not park within the time given to
    /// [`VmDebug::stop_all`](crate::VmDebug::stop_all).
    #[error("vCPU {vcpu} did not stop within {timeout:?}")]
    StopTimeout {
        /// The first vCPU still running.
        vcpu: usize,
        /// The time given.
        timeout: std::time::Duration,
    },
    /// A job for a vCPU's thread needs it parked, and it is not.
    #[error("vCPU {vcpu} is not parked")]
    NotParked {
        /// The vCPU.
        vcpu: usize,
    },
    /// Run control refused: an id that is not one of the VM's vCPUs, or too
    /// many vCPUs declared. Nothing changed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// No stop is waiting and no vCPU has a live handle (every vCPU thread
    /// has ended): nothing is left that could post one.
    #[error("no vCPU left: every vCPU handle has been dropped")]
    NoVcpus,
    /// A thread panicked while holding the VM-wide debug state.
    #[error("the VM-wide debug state is poisoned (a thread panicked while holding it)")]
    Poisoned,
}

// Written out rather than `#[from]`, as the style asks: a bare ioctl error has
// no vCPU to name; errors from a vCPU ioctl are built as `Error::Vcpu`.
impl From<kvm_ioctls::Error> for Error {
    fn from(e: kvm_ioctls::Error) -> Error {
        Error::Kvm(e)
    }
}

impl Error {
    /// The vCPU whose ioctl failed, if that is what this error is.
    pub fn vcpu(&self) -> Option<usize> {
        match self {
            Error::Vcpu { vcpu, .. } => Some(*vcpu),
            _ => None,
        }
    }
}
