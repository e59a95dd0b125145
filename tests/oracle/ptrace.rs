//! The tracer: forks the child of `child.rs`, programs its debug registers
//! through `PTRACE_POKEUSER`, sends it one command at a time and reads DR6
//! back after each SIGTRAP.
//!
//! Linux keeps the tracee's debug registers as perf hardware-breakpoint events
//! (arch/x86/kernel/ptrace.c, `ptrace_set_debugreg`): a DR0–3 write moves an
//! event, a DR7 write enables, disables or re-types the events, and DR6 as seen
//! by the tracer is the kernel's "virtual DR6" — the B-bits of the *enabled*
//! slots whose event fired in the last debug exception, in ptrace slot
//! numbering, reset at every #DB. It is filled from the hardware DR6, so for
//! enabled slots it is what the CPU set.

use core::marker::PhantomData;
use core::mem::offset_of;

use nix::errno::Errno;
use nix::libc;
use nix::sys::ptrace;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::child::{self, Command};
use super::{Access, AccessKind, OracleError};

/// One debug exception the child took during a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trap {
    /// The child's `rip` at the stop: the breakpoint address for an execute
    /// breakpoint (a fault), the next instruction for a data breakpoint (a trap).
    pub rip: u64,
    /// DR6 as read with `PTRACE_PEEKUSER`.
    pub dr6: u64,
}

impl Trap {
    /// B0–B3 of DR6.
    pub fn hits(self) -> u8 {
        (self.dr6 & 0xf) as u8
    }
}

/// Offset of debug register `n` in `struct user`, the `PTRACE_PEEKUSER` /
/// `PTRACE_POKEUSER` address.
fn debugreg_offset(n: usize) -> usize {
    offset_of!(libc::user, u_debugreg) + 8 * n
}

/// More traps than this for one command means the child is looping.
const MAX_TRAPS_PER_COMMAND: usize = 32;

/// A traced child serving many accesses. Not `Send`: ptrace requests must come
/// from the thread that forked the child.
#[derive(Debug)]
pub struct Oracle {
    pid: Pid,
    /// What DR0–3/DR7 hold, if the last `program` succeeded.
    programmed: Option<([u64; 4], u64)>,
    /// The child has exited and been reaped: its pid may belong to another
    /// process now.
    reaped: bool,
    _tracer_thread: PhantomData<*const ()>,
}

impl Oracle {
    /// Fork the child and wait for its first stop.
    ///
    /// # Errors
    /// [`OracleError::NotPermitted`] if the host refuses ptrace or debug
    /// register access; other variants for anything unexpected.
    pub fn spawn() -> Result<Self, OracleError> {
        // SAFETY: the child runs only `child::run`, which makes only
        // async-signal-safe calls (ptrace, raise, _exit) and never allocates,
        // locks or returns, as a child forked from a multi-threaded process must.
        let pid = match unsafe { fork() } {
            Err(errno) => return Err(OracleError::Ptrace { op: "fork", errno }),
            Ok(ForkResult::Child) => child::run(),
            Ok(ForkResult::Parent { child }) => child,
        };
        match waitpid(pid, None) {
            Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
            Ok(WaitStatus::Exited(_, child::EXIT_TRACEME_REFUSED)) => {
                return Err(OracleError::NotPermitted {
                    op: "PTRACE_TRACEME",
                    errno: None,
                })
            }
            Ok(WaitStatus::Exited(_, code)) => return Err(OracleError::ChildExited(code)),
            other => {
                // Whatever happened, do not leave the child behind.
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                return Err(OracleError::Unexpected(format!("first stop: {other:?}")));
            }
        }
        let mut oracle = Oracle {
            pid,
            programmed: None,
            reaped: false,
            _tracer_thread: PhantomData,
        };
        // If this test process dies, the child dies with it.
        ptrace::setoptions(pid, ptrace::Options::PTRACE_O_EXITKILL)
            .map_err(|errno| not_permitted_or("PTRACE_SETOPTIONS", errno))?;
        // Probe the debug registers themselves: a sandbox may allow ptrace but
        // not the user area.
        oracle
            .poke_dr7(0)
            .map_err(|errno| not_permitted_or("PTRACE_POKEUSER DR7", errno))?;
        oracle
            .peek_dr(6)
            .map_err(|errno| not_permitted_or("PTRACE_PEEKUSER DR6", errno))?;
        Ok(oracle)
    }

    /// The child's process id (each [`Oracle::spawn`] forks a new child).
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Write debug register `n` (0–3, 6 or 7) of the child.
    ///
    /// # Errors
    /// The kernel's answer, e.g. `EINVAL` for a value it refuses.
    pub fn poke_dr(&mut self, n: usize, value: u64) -> Result<(), Errno> {
        self.programmed = None;
        ptrace::write_user(
            self.pid,
            debugreg_offset(n) as ptrace::AddressType,
            value as libc::c_long,
        )
    }

    /// Write DR7 of the child.
    ///
    /// # Errors
    /// The kernel's answer: `EINVAL` if it refuses the value (see
    /// `ptrace_write_dr7`); on a refusal the kernel restores the previous DR7.
    pub fn poke_dr7(&mut self, value: u64) -> Result<(), Errno> {
        self.poke_dr(7, value)
    }

    /// Read debug register `n` of the child.
    ///
    /// # Errors
    /// The kernel's answer.
    pub fn peek_dr(&self, n: usize) -> Result<u64, Errno> {
        ptrace::read_user(self.pid, debugreg_offset(n) as ptrace::AddressType).map(|v| v as u64)
    }

    /// Program DR0–3 and DR7, in an order the kernel accepts from any previous
    /// state: DR7 = 0 first re-types every existing slot as a disabled
    /// execute breakpoint (R/W = 00, LEN = 00), which accepts any user
    /// address; then the addresses; then DR7. (Writing a DRn while its slot
    /// still holds, say, an 8-byte watch would be refused for an address that
    /// is not 8-aligned, even with the slot disabled.)
    ///
    /// # Errors
    /// The kernel's answer to the first write it refuses.
    pub fn program(&mut self, dr: [u64; 4], dr7: u64) -> Result<(), Errno> {
        if self.programmed == Some((dr, dr7)) {
            return Ok(());
        }
        self.poke_dr7(0)?;
        for (n, &addr) in dr.iter().enumerate() {
            self.poke_dr(n, addr)?;
        }
        self.poke_dr7(dr7)?;
        self.programmed = Some((dr, dr7));
        Ok(())
    }

    /// Resume the child for one command and collect every debug exception it
    /// takes until it stops again.
    ///
    /// # Errors
    /// Any ptrace failure, a signal other than a hardware-breakpoint SIGTRAP,
    /// or the child exiting.
    pub fn run(&mut self, command: Command) -> Result<Vec<Trap>, OracleError> {
        let pid = self.pid;
        let fail = |op| move |errno| OracleError::Ptrace { op, errno };
        self.clear_dr6().map_err(fail("PTRACE_POKEUSER DR6"))?;
        ptrace::write(
            pid,
            child::command_addr() as ptrace::AddressType,
            command.encode() as libc::c_long,
        )
        .map_err(fail("PTRACE_POKEDATA"))?;
        let mut traps = Vec::new();
        loop {
            ptrace::cont(pid, None).map_err(fail("PTRACE_CONT"))?;
            match waitpid(pid, None).map_err(fail("waitpid"))? {
                // Back at the stop between steps: the command is done.
                WaitStatus::Stopped(_, Signal::SIGSTOP) => return Ok(traps),
                WaitStatus::Stopped(_, Signal::SIGTRAP) => {
                    let info = ptrace::getsiginfo(pid).map_err(fail("PTRACE_GETSIGINFO"))?;
                    let rip = ptrace::getregs(pid).map_err(fail("PTRACE_GETREGS"))?.rip;
                    let dr6 = self.peek_dr(6).map_err(fail("PTRACE_PEEKUSER DR6"))?;
                    if info.si_code != libc::TRAP_HWBKPT {
                        // Everything the tracer can still see, so that the
                        // report says where the trap came from (cpu_oracle.rs
                        // module docs: the page-crossing TRAP_BRKPT).
                        let dr7 = self.peek_dr(7).map_err(fail("PTRACE_PEEKUSER DR7"))?;
                        return Err(OracleError::StrayTrap {
                            si_code: info.si_code,
                            rip,
                            dr6,
                            dr7,
                            command: format!("{command:?}"),
                        });
                    }
                    self.clear_dr6().map_err(fail("PTRACE_POKEUSER DR6"))?;
                    traps.push(Trap { rip, dr6 });
                    if traps.len() > MAX_TRAPS_PER_COMMAND {
                        return Err(OracleError::Unexpected(format!(
                            "more than {MAX_TRAPS_PER_COMMAND} traps during {command:?}"
                        )));
                    }
                }
                other => {
                    if matches!(other, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                        self.reaped = true;
                    }
                    return Err(OracleError::Unexpected(format!("{other:?} during {command:?}")));
                }
            }
        }
    }

    /// Clear DR6 (the kernel also resets it at each debug exception; clearing
    /// it here makes each step independent of that detail).
    fn clear_dr6(&mut self) -> Result<(), Errno> {
        ptrace::write_user(self.pid, debugreg_offset(6) as ptrace::AddressType, 0)
    }

    /// Run the execute sled from its instruction at `entry` (an address in
    /// [`child::SLED_INSNS`] from the sled start) to its `ret`, returning every
    /// debug exception in order.
    ///
    /// # Errors
    /// As [`Oracle::run`], or [`OracleError::BadAccess`] if `entry` is not a
    /// sled instruction start.
    pub fn run_sled(&mut self, entry: u64) -> Result<Vec<Trap>, OracleError> {
        let offset = entry
            .checked_sub(child::sled_addr())
            .filter(|o| child::SLED_INSNS.contains(o))
            .ok_or_else(|| OracleError::BadAccess(format!("{entry:#x} is no sled instruction start")))?;
        // In range: sled offsets are < 64.
        self.run(Command::Execute { offset: offset as u16 })
    }

    /// Program DR0–3/DR7, let the child make `access` once, and return the
    /// B0–B3 bits of DR6 (0 if the child took no debug exception).
    ///
    /// A data access must lie inside the buffer; an execute access must name a
    /// sled instruction, which the child then runs (with the rest of the sled —
    /// only the exception at `access.addr` is reported here, see
    /// [`Oracle::run_sled`] for all of them).
    ///
    /// # Errors
    /// [`OracleError::Rejected`] if the kernel refuses the registers, and any
    /// failure of [`Oracle::run`]; also an error if a data access traps more
    /// than once or anywhere but right after its `mov`.
    pub fn cpu_hits(&mut self, dr: [u64; 4], dr7: u64, access: Access) -> Result<u8, OracleError> {
        self.program(dr, dr7)
            .map_err(|errno| OracleError::Rejected { dr, dr7, errno })?;
        let write = match access.kind {
            AccessKind::Execute => {
                let traps = self.run_sled(access.addr)?;
                return Ok(traps
                    .iter()
                    .filter(|t| t.rip == access.addr)
                    .fold(0, |bits, t| bits | t.hits()));
            }
            AccessKind::Read => false,
            AccessKind::Write => true,
        };
        let base = child::buffer_addr();
        let offset = access
            .addr
            .checked_sub(base)
            .filter(|o| o + u64::from(access.size) <= child::BUFFER_LEN as u64)
            .ok_or_else(|| OracleError::BadAccess(format!("{access:x?} is outside the buffer")))?;
        let expected_rip = child::stub_trap_rip(write, access.size)
            .ok_or_else(|| OracleError::BadAccess(format!("{access:x?}: no such width")))?;
        // In range: offset + size <= BUFFER_LEN = 4096.
        let offset = offset as u16;
        let size = access.size;
        let command = if write {
            Command::Store { offset, size }
        } else {
            Command::Load { offset, size }
        };
        match self.run(command)?.as_slice() {
            [] => Ok(0),
            [trap] if trap.rip == expected_rip => Ok(trap.hits()),
            traps => Err(OracleError::Unexpected(format!(
                "{access:x?} gave traps {traps:x?}, expected at most one at {expected_rip:#x}"
            ))),
        }
    }
}

/// EPERM/EACCES/EIO from a probe mean "this host does not let us"; anything
/// else is a real failure.
fn not_permitted_or(op: &'static str, errno: Errno) -> OracleError {
    match errno {
        Errno::EPERM | Errno::EACCES | Errno::EIO => OracleError::NotPermitted { op, errno: Some(errno) },
        _ => OracleError::Ptrace { op, errno },
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        // Until reaped, the pid is our child's, so this cannot hit another
        // process.
        if self.reaped {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}
