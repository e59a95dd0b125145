//! The CPU oracle: a ptrace harness that asks this machine's CPU which debug
//! register B-bits an access sets.
//!
//! The parent forks one traced child per test ([`Oracle::spawn`]); the child
//! stops (`raise(SIGSTOP)`) between steps. For each step the parent programs
//! DR0–3/DR7 with `PTRACE_POKEUSER`, writes one command into the child's
//! command word with `PTRACE_POKEDATA` and resumes it; the child makes exactly
//! one access — an exact-width `mov` on a page-aligned buffer, or a run
//! through a sled of known instructions — and stops again. Each SIGTRAP on
//! the way is a debug exception: the parent reads `rip` and DR6
//! (`PTRACE_PEEKUSER`) and clears DR6. One child serves thousands of steps.
//!
//! Linux x86-64 only; the buffer, code and command word are at the same
//! addresses in parent and child because the child is a `fork`.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

pub mod child;
pub mod ptrace;
pub mod rerun;

use std::fmt;
use std::sync::Once;

use nix::errno::Errno;

pub use child::{buffer_addr, sled_addr, BUFFER_LEN, SLED_INSNS, SLED_LEN};
pub use ptrace::Oracle;
pub use rerun::{repeated, Checker, Ledger};

/// What an access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data load.
    Read,
    /// A data store.
    Write,
    /// An instruction fetch (of the instruction starting at the address).
    Execute,
}

/// One access the child makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// First byte accessed (linear address in the child).
    pub addr: u64,
    /// Bytes accessed: 1, 2, 4 or 8 for data; ignored for execute.
    pub size: u8,
    /// Load, store or instruction fetch.
    pub kind: AccessKind,
}

/// Why the oracle could not answer.
#[derive(Debug)]
pub enum OracleError {
    /// This host does not allow tracing or debug-register access.
    NotPermitted {
        /// The refused request.
        op: &'static str,
        /// Its errno, if the refusal came as one.
        errno: Option<Errno>,
    },
    /// The kernel refused to program these debug registers.
    Rejected {
        /// DR0–3.
        dr: [u64; 4],
        /// DR7.
        dr7: u64,
        /// The kernel's answer.
        errno: Errno,
    },
    /// A ptrace (or fork/wait) request failed.
    Ptrace {
        /// The request.
        op: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// The child exited with this status before its first stop.
    ChildExited(i32),
    /// A SIGTRAP that is not a hardware-breakpoint one (`si_code` other than
    /// `TRAP_HWBKPT`): the kernel saw a debug exception it could not pin on
    /// an enabled slot (`TRAP_BRKPT` = 1: neither BS nor any Bn in DR6).
    StrayTrap {
        /// The signal's `si_code`.
        si_code: i32,
        /// The child's `rip` at the stop.
        rip: u64,
        /// DR6 as the tracer reads it (the kernel's virtual DR6).
        dr6: u64,
        /// DR7 as the tracer reads it.
        dr7: u64,
        /// The command the child was running.
        command: String,
    },
    /// The child did something the harness did not ask for.
    Unexpected(String),
    /// The access cannot be made by the child.
    BadAccess(String),
}

impl fmt::Display for OracleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OracleError::NotPermitted { op, errno } => match errno {
                Some(errno) => write!(f, "{op} not permitted ({errno})"),
                None => write!(f, "{op} not permitted"),
            },
            OracleError::Rejected { dr, dr7, errno } => {
                write!(f, "kernel refused DR0-3 {dr:x?} DR7 {dr7:#x}: {errno}")
            }
            OracleError::Ptrace { op, errno } => write!(f, "{op} failed: {errno}"),
            OracleError::ChildExited(code) => write!(f, "traced child exited with {code}"),
            OracleError::StrayTrap {
                si_code,
                rip,
                dr6,
                dr7,
                command,
            } => write!(
                f,
                "unexpected: SIGTRAP with si_code {si_code} during {command} (rip {rip:#x}, DR6 {dr6:#x}, DR7 {dr7:#x})"
            ),
            OracleError::Unexpected(what) => write!(f, "unexpected: {what}"),
            OracleError::BadAccess(what) => write!(f, "bad access: {what}"),
        }
    }
}

impl std::error::Error for OracleError {}

/// Spawn an oracle, or print one line saying ptrace is not permitted here and
/// return `None` (the caller then checks nothing). The line is printed once
/// per test binary, whichever test gets there first.
///
/// # Panics
/// On any failure other than "not permitted": the host is supposed to allow
/// ptrace, and a broken harness must not pass silently.
pub fn spawn_or_skip() -> Option<Oracle> {
    static SKIP_NOTICE: Once = Once::new();
    match Oracle::spawn() {
        Ok(oracle) => Some(oracle),
        Err(err @ OracleError::NotPermitted { .. }) => {
            // .ci/run sets this on the machines where ptrace works (HOST.md):
            // there, a skip would hide the CPU oracle, so it is a failure.
            if std::env::var_os("ORACLE_REQUIRE_PTRACE").is_some() {
                panic!("oracle: ptrace is not permitted ({err}) but ORACLE_REQUIRE_PTRACE is set");
            }
            SKIP_NOTICE.call_once(|| {
                println!("oracle: ptrace is not permitted on this host ({err}); CPU oracle checks skipped");
            });
            None
        }
        Err(err) => panic!("oracle: cannot start the traced child: {err}"),
    }
}

/// Number of random cases for a property: `ORACLE_CASES` if set, else
/// `default`.
///
/// # Panics
/// If `ORACLE_CASES` is set but is not a positive integer (`0` would check
/// nothing and pass).
pub fn cases(default: u32) -> u32 {
    positive_env("ORACLE_CASES", default)
}

/// How many times each oracle test runs its whole check in this process, each
/// time in a fresh child: `ORACLE_REPEAT` if set, else 1. It measures the
/// transient rate (see `rerun`): `ORACLE_REPEAT=50 cargo test --test
/// cpu_oracle -- --nocapture` runs the suite 50 times.
///
/// # Panics
/// If `ORACLE_REPEAT` is set but is not a positive integer.
pub fn repeat() -> u32 {
    positive_env("ORACLE_REPEAT", 1)
}

/// The positive integer in environment variable `name`, or `default` if it
/// is unset.
///
/// # Panics
/// If it is set but is not a positive integer (`0` would check nothing and
/// pass).
fn positive_env(name: &str, default: u32) -> u32 {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(0) => panic!("{name}=0 would check nothing; set a positive number or unset it"),
            Ok(n) => n,
            Err(e) => panic!("{name}={v:?} is not a positive integer ({e})"),
        },
        Err(std::env::VarError::NotPresent) => default,
        Err(std::env::VarError::NotUnicode(v)) => panic!("{name}={v:?} is not a positive integer"),
    }
}
