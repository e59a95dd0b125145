//! The traced child: a buffer to access, the machine code that accesses it,
//! and the loop that waits for one command at a time.
//!
//! Everything here exists in the parent too: `fork` copies the address space,
//! so the parent knows the child's buffer, command word and code addresses by
//! taking the same addresses in its own image. The parent never runs this code;
//! it only reads the addresses.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use nix::libc;
use nix::sys::ptrace;
use nix::sys::signal::{raise, Signal};

/// Bytes in the data buffer the child reads and writes: two pages, so that
/// accesses can straddle a page boundary.
pub const BUFFER_LEN: usize = 8192;

/// The data buffer. Page-aligned so that its offsets have the same alignment
/// as its addresses, and so that no other data shares its pages.
#[repr(C, align(4096))]
struct Buffer([AtomicU8; BUFFER_LEN]);

// Atomics give the buffer interior mutability without `unsafe impl Sync`; the
// child writes it only through the stubs below (exact-width `mov`s).
static BUFFER: Buffer = Buffer([const { AtomicU8::new(0) }; BUFFER_LEN]);

/// The command word. The parent writes it with `PTRACE_POKEDATA` while the
/// child is stopped; the child reads it after being resumed.
static COMMAND: AtomicU64 = AtomicU64::new(0);

/// Address of the first byte of the data buffer (same in parent and child).
pub fn buffer_addr() -> u64 {
    BUFFER.0.as_ptr() as u64
}

/// Address of the command word (same in parent and child).
pub fn command_addr() -> u64 {
    COMMAND.as_ptr() as u64
}

// The code the child runs to make an access. Each access stub is one exact-width
// `mov` followed by `ret`, in its own 16-byte cell, written as bytes so that the
// instruction lengths below are facts, not the assembler's choice. The execute
// sled is a run of NOPs of lengths 1..=8 ending in `ret`: the CPU fetches each
// listed instruction start exactly once per run, and never the bytes between.
// Padding is `int3`, so a stray jump would stop the child loudly.
global_asm!(
    ".pushsection .text.x86_debugreg_oracle,\"ax\",@progbits",
    ".balign 64, 0xcc",
    ".globl x86_debugreg_oracle_code",
    "x86_debugreg_oracle_code:",
    // cell 0: movzx eax, byte ptr [rdi]
    ".byte 0x0f, 0xb6, 0x07, 0xc3",
    ".balign 16, 0xcc",
    // cell 1: movzx eax, word ptr [rdi]
    ".byte 0x0f, 0xb7, 0x07, 0xc3",
    ".balign 16, 0xcc",
    // cell 2: mov eax, dword ptr [rdi]
    ".byte 0x8b, 0x07, 0xc3",
    ".balign 16, 0xcc",
    // cell 3: mov rax, qword ptr [rdi]
    ".byte 0x48, 0x8b, 0x07, 0xc3",
    ".balign 16, 0xcc",
    // cell 4: mov byte ptr [rdi], sil
    ".byte 0x40, 0x88, 0x37, 0xc3",
    ".balign 16, 0xcc",
    // cell 5: mov word ptr [rdi], si
    ".byte 0x66, 0x89, 0x37, 0xc3",
    ".balign 16, 0xcc",
    // cell 6: mov dword ptr [rdi], esi
    ".byte 0x89, 0x37, 0xc3",
    ".balign 16, 0xcc",
    // cell 7: mov qword ptr [rdi], rsi
    ".byte 0x48, 0x89, 0x37, 0xc3",
    ".balign 16, 0xcc",
    // execute sled at +128
    ".byte 0x90",                                           // nop
    ".byte 0x66, 0x90",                                     // xchg ax, ax
    ".byte 0x0f, 0x1f, 0x00",                               // nop [rax]
    ".byte 0x0f, 0x1f, 0x40, 0x00",                         // nop [rax+0]
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",                   // nop [rax+rax+0]
    ".byte 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00",             // nop word [rax+rax+0]
    ".byte 0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00",       // nop [rax+0]
    ".byte 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00", // nop [rax+rax+0]
    ".byte 0xc3",                                           // ret
    ".balign 64, 0xcc",
    ".popsection",
);

extern "C" {
    // Not callable from Rust with this signature; declared only to take its
    // address (the stubs take their arguments in rdi/rsi, see `call_code`).
    fn x86_debugreg_oracle_code();
}

/// Address of the first access stub (same in parent and child).
pub fn code_addr() -> u64 {
    x86_debugreg_oracle_code as *const () as u64
}

/// Length of each access stub's `mov`, indexed like the cells: loads of 1, 2,
/// 4, 8 bytes, then stores of 1, 2, 4, 8 bytes. A data breakpoint is a trap,
/// so the child stops with `rip` just past that `mov`.
const STUB_MOV_LEN: [u64; 8] = [3, 3, 2, 3, 3, 3, 2, 3];

/// Offset of the execute sled from [`code_addr`].
const SLED_OFFSET: u64 = 128;

/// Offsets of the sled's instructions from its start, the final `ret` included.
pub const SLED_INSNS: [u64; 9] = [0, 1, 3, 6, 10, 15, 21, 28, 36];

/// Bytes in the sled (instructions and `ret`).
pub const SLED_LEN: u64 = 37;

/// Address of the execute sled (same in parent and child).
pub fn sled_addr() -> u64 {
    code_addr() + SLED_OFFSET
}

fn stub_index(write: bool, size: u8) -> Option<u64> {
    let log = match size {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        _ => return None,
    };
    Some(u64::from(write) * 4 + log)
}

/// Address of the stub that makes a `size`-byte load (or store, if `write`).
pub fn stub_addr(write: bool, size: u8) -> Option<u64> {
    stub_index(write, size).map(|i| code_addr() + 16 * i)
}

/// Where the child stops after a data breakpoint in that stub: just past the
/// `mov`.
pub fn stub_trap_rip(write: bool, size: u8) -> Option<u64> {
    let i = stub_index(write, size)?;
    // The index is < 8 by construction of `stub_index`.
    Some(code_addr() + 16 * i + STUB_MOV_LEN[i as usize])
}

/// One command to the child, packed into the command word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Load `size` bytes at `BUFFER + offset`.
    Load { offset: u16, size: u8 },
    /// Store `size` bytes at `BUFFER + offset`.
    Store { offset: u16, size: u8 },
    /// Call the sled at `sled + offset` (an entry of [`SLED_INSNS`]), running
    /// every later sled instruction and the `ret`.
    Execute { offset: u16 },
    /// Leave the loop and exit.
    Exit,
}

const OP_LOAD: u64 = 1;
const OP_STORE: u64 = 2;
const OP_EXECUTE: u64 = 3;
const OP_EXIT: u64 = 4;

impl Command {
    /// The command word: op in bits 0–7, size in 8–15, offset in 16–31.
    pub fn encode(self) -> u64 {
        let (op, size, offset) = match self {
            Command::Load { offset, size } => (OP_LOAD, size, offset),
            Command::Store { offset, size } => (OP_STORE, size, offset),
            Command::Execute { offset } => (OP_EXECUTE, 0, offset),
            Command::Exit => (OP_EXIT, 0, 0),
        };
        op | u64::from(size) << 8 | u64::from(offset) << 16
    }

    fn decode(word: u64) -> Option<Self> {
        let size = (word >> 8) as u8;
        let offset = (word >> 16) as u16;
        match word & 0xff {
            OP_LOAD => Some(Command::Load { offset, size }),
            OP_STORE => Some(Command::Store { offset, size }),
            OP_EXECUTE => Some(Command::Execute { offset }),
            OP_EXIT => Some(Command::Exit),
            _ => None,
        }
    }
}

/// Exit status of a child whose `PTRACE_TRACEME` was refused.
pub const EXIT_TRACEME_REFUSED: i32 = 101;
/// Exit status of a child that received a command it cannot perform.
pub const EXIT_BAD_COMMAND: i32 = 102;
/// Exit status of a child whose `raise(SIGSTOP)` failed.
pub const EXIT_RAISE_FAILED: i32 = 103;

fn exit(code: i32) -> ! {
    // SAFETY: `_exit` ends the process without running the parent's atexit
    // handlers or destructors, which a forked child must not run; it is
    // async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Call `entry` with `rdi = arg`, `rsi = value`.
///
/// # Safety
/// `entry` must be an access stub or a sled instruction start inside
/// `x86_debugreg_oracle_code`, and for a stub `arg` must be an address with
/// the stub's width of bytes inside [`BUFFER`].
unsafe fn call_code(entry: u64, arg: u64, value: u64) {
    // SAFETY: per this function's contract the callee is our own stub or sled:
    // it touches only rax and the addressed buffer bytes, and returns with
    // `ret`; `clobber_abi("C")` covers every register a call may change, and
    // without `nostack` the compiler leaves the red zone free for the call.
    unsafe {
        asm!(
            "call {entry}",
            entry = in(reg) entry,
            in("rdi") arg,
            in("rsi") value,
            clobber_abi("C"),
        );
    }
}

/// The stub and its address argument for a data access, or exit if the access
/// would leave the buffer or has no stub.
fn data_target(write: bool, offset: u16, size: u8) -> (u64, u64) {
    match stub_addr(write, size) {
        Some(stub) if usize::from(offset) + usize::from(size) <= BUFFER_LEN => {
            (stub, buffer_addr() + u64::from(offset))
        }
        _ => exit(EXIT_BAD_COMMAND),
    }
}

/// The child's whole life: become traced, then stop; on each resume perform
/// the command word once and stop again.
///
/// After `fork` in a multi-threaded process the child may only make
/// async-signal-safe calls: this uses `ptrace`, `raise`, `_exit`, atomic loads
/// and the stubs, and never allocates, locks or panics.
pub fn run() -> ! {
    if ptrace::traceme().is_err() {
        exit(EXIT_TRACEME_REFUSED);
    }
    loop {
        // The stop between steps: the parent programs the debug registers and
        // the command word while the child sits here.
        if raise(Signal::SIGSTOP).is_err() {
            exit(EXIT_RAISE_FAILED);
        }
        let (entry, arg) = match Command::decode(COMMAND.load(Ordering::SeqCst)) {
            Some(Command::Load { offset, size }) => data_target(false, offset, size),
            Some(Command::Store { offset, size }) => data_target(true, offset, size),
            Some(Command::Execute { offset }) if SLED_INSNS.contains(&u64::from(offset)) => {
                (sled_addr() + u64::from(offset), 0)
            }
            Some(Command::Exit) => exit(0),
            _ => exit(EXIT_BAD_COMMAND),
        };
        // SAFETY: `entry` is a stub or a sled instruction start (checked
        // above), and a stub's `arg` addresses `size` bytes inside BUFFER.
        unsafe { call_code(entry, arg, 0x0807_0605_0403_0201) };
    }
}
