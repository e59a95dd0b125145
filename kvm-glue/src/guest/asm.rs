//! Hand-assembled machine code of the tiny guest.
//!
//! Every instruction is written as its bytes with the mnemonic beside it, and
//! every address a test may want (a breakpoint target, the pc expected after a
//! single step, the instruction that does a data access) is a named constant.
//! The `const _: () = assert!(..)` lines check at compile time that the byte
//! arrays and the address constants agree.

/// Guest-physical (and identity-mapped virtual) address where the routines start.
pub const CODE: u64 = 0x1_0000;

/// I/O port a routine writes to (`out 0x10, al`) when it has run to its end.
pub const PORT_DONE: u16 = 0x10;
/// I/O port an exception handler writes its vector number to (`out 0x11, al`).
pub const PORT_VECTOR: u16 = 0x11;

// ---------------------------------------------------------------------------
// Straight line of distinct instructions, for execute breakpoints and single-step.
// ---------------------------------------------------------------------------

/// Start of the straight-line routine.
pub const STRAIGHT: u64 = CODE;
/// Straight-line routine: seven distinct instructions, the last one an `out`.
pub const STRAIGHT_CODE: [u8; 20] = [
    0x90, //                         +0  nop
    0xB8, 0x01, 0x00, 0x00, 0x00, // +1  mov eax, 1
    0x83, 0xC0, 0x02, //             +6  add eax, 2
    0xFF, 0xC1, //                   +9  inc ecx
    0x31, 0xD2, //                   +11 xor edx, edx
    0x89, 0xC3, //                   +13 mov ebx, eax
    0xE6, 0x10, //                   +15 out 0x10, al   (PORT_DONE)
    0xF4, //                         +17 hlt
    0xEB, 0xFD, //                   +18 jmp -3         (back to the hlt)
];
/// Address of each instruction of the straight-line routine, in execution order
/// (the last one is the `out` to [`PORT_DONE`]).
pub const STRAIGHT_INSNS: [u64; 7] = [
    STRAIGHT,
    STRAIGHT + 1,
    STRAIGHT + 6,
    STRAIGHT + 9,
    STRAIGHT + 11,
    STRAIGHT + 13,
    STRAIGHT + 15,
];
/// Address of the `hlt` that follows the straight-line routine's `out`.
pub const STRAIGHT_HLT: u64 = STRAIGHT + 17;
const _: () = assert!(STRAIGHT_CODE[15] == 0xE6 && STRAIGHT_CODE[17] == 0xF4);

// ---------------------------------------------------------------------------
// Data accesses of every size, for watchpoints.
// ---------------------------------------------------------------------------

/// Start of the data-access routine.
pub const DATA_ACCESS: u64 = CODE + 0x100;
/// Guest-physical address (identity-mapped) the data-access routine reads and writes.
pub const DATA: u64 = 0x2_0000;
/// Data-access routine: a 1-byte write at `DATA + 8` (outside any watchpoint of at
/// most 8 bytes at `DATA`), writes of 1, 2, 4, 8 bytes at `DATA`, a 1-byte read
/// at `DATA + 8`, reads of 1, 2, 4, 8 bytes at `DATA`, then `out` to [`PORT_DONE`].
pub const DATA_ACCESS_CODE: [u8; 41] = [
    0xBF, 0x00, 0x00, 0x02, 0x00, // +0  mov edi, 0x20000 (DATA; zero-extends into rdi)
    0x88, 0x47, 0x08, //             +5  mov [rdi+8], al   (write 1, outside)
    0x88, 0x07, //                   +8  mov [rdi], al     (write 1)
    0x66, 0x89, 0x07, //             +10 mov [rdi], ax     (write 2)
    0x89, 0x07, //                   +13 mov [rdi], eax    (write 4)
    0x48, 0x89, 0x07, //             +15 mov [rdi], rax    (write 8)
    0x8A, 0x47, 0x08, //             +18 mov al, [rdi+8]   (read 1, outside)
    0x8A, 0x07, //                   +21 mov al, [rdi]     (read 1)
    0x66, 0x8B, 0x07, //             +23 mov ax, [rdi]     (read 2)
    0x8B, 0x07, //                   +26 mov eax, [rdi]    (read 4)
    0x48, 0x8B, 0x07, //             +28 mov rax, [rdi]    (read 8)
    0xE6, 0x10, //                   +31 out 0x10, al      (PORT_DONE)
    0xF4, //                         +33 hlt
    0xEB, 0xFD, //                   +34 jmp -3
    0x90, 0x90, 0x90, 0x90, 0x90, // +36 padding (never reached)
];
const _: () = assert!(DATA as u32 == 0x2_0000);

/// One data access made by the data-access routine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Address of the accessing instruction.
    pub insn: u64,
    /// Address of the next instruction: the pc of a (trap-like) data breakpoint exit.
    pub next: u64,
    /// Guest address accessed.
    pub addr: u64,
    /// Bytes accessed.
    pub len: u64,
    /// `true` for a write, `false` for a read.
    pub write: bool,
}

const fn access(off: u64, size: u64, addr: u64, len: u64, write: bool) -> Access {
    Access {
        insn: DATA_ACCESS + off,
        next: DATA_ACCESS + off + size,
        addr,
        len,
        write,
    }
}

/// Every data access of the data-access routine, in execution order.
pub const DATA_ACCESSES: [Access; 10] = [
    access(5, 3, DATA + 8, 1, true),
    access(8, 2, DATA, 1, true),
    access(10, 3, DATA, 2, true),
    access(13, 2, DATA, 4, true),
    access(15, 3, DATA, 8, true),
    access(18, 3, DATA + 8, 1, false),
    access(21, 2, DATA, 1, false),
    access(23, 3, DATA, 2, false),
    access(26, 2, DATA, 4, false),
    access(28, 3, DATA, 8, false),
];
/// Address of the data-access routine's `out` to [`PORT_DONE`].
pub const DATA_ACCESS_OUT: u64 = DATA_ACCESS + 31;
const _: () = assert!(DATA_ACCESS_CODE[31] == 0xE6);

// ---------------------------------------------------------------------------
// The guest's own breakpoint traps.
// ---------------------------------------------------------------------------

/// Start of the routine that executes `int3` (the guest's own #BP).
pub const INT3: u64 = CODE + 0x200;
/// `int3` routine.
pub const INT3_CODE: [u8; 6] = [
    0xCC, //       +0 int3
    0xE6, 0x10, // +1 out 0x10, al (PORT_DONE)
    0xF4, //       +3 hlt
    0xEB, 0xFD, // +4 jmp -3
];
/// Start of the routine that executes `int1` (ICEBP, the guest's own #DB).
pub const INT1: u64 = CODE + 0x280;
/// `int1` routine.
pub const INT1_CODE: [u8; 6] = [
    0xF1, //       +0 int1 (icebp)
    0xE6, 0x10, // +1 out 0x10, al (PORT_DONE)
    0xF4, //       +3 hlt
    0xEB, 0xFD, // +4 jmp -3
];

// ---------------------------------------------------------------------------
// A patchable instruction, for software breakpoints.
// ---------------------------------------------------------------------------

/// Start of the software-breakpoint routine.
pub const SW: u64 = CODE + 0x300;
/// The instruction a software breakpoint replaces the first byte of
/// (`mov eax, 0x1234`, first byte 0xB8).
pub const SW_PATCH: u64 = SW + 1;
/// The instruction after [`SW_PATCH`].
pub const SW_AFTER: u64 = SW + 6;
/// Software-breakpoint routine.
pub const SW_CODE: [u8; 13] = [
    0x90, //                         +0  nop
    0xB8, 0x34, 0x12, 0x00, 0x00, // +1  mov eax, 0x1234   (SW_PATCH)
    0xFF, 0xC0, //                   +6  inc eax           (SW_AFTER)
    0xE6, 0x10, //                   +8  out 0x10, al      (PORT_DONE)
    0xF4, //                         +10 hlt
    0xEB, 0xFD, //                   +11 jmp -3
];
/// Original first byte of the instruction at [`SW_PATCH`].
pub const SW_PATCH_BYTE: u8 = SW_CODE[1];
/// Address of the software-breakpoint routine's `out` to [`PORT_DONE`].
pub const SW_OUT: u64 = SW + 8;

// ---------------------------------------------------------------------------
// An endless loop, for single-step benchmarks.
// ---------------------------------------------------------------------------

/// Start of the endless loop (`inc rax; jmp back`).
pub const LOOP: u64 = CODE + 0x400;
/// Endless-loop routine: two instructions forever.
pub const LOOP_CODE: [u8; 5] = [
    0x48, 0xFF, 0xC0, // +0 inc rax
    0xEB, 0xFB, //       +3 jmp -5 (back to +0)
];

/// Every routine with its load address.
pub const ROUTINES: [(u64, &[u8]); 6] = [
    (STRAIGHT, &STRAIGHT_CODE),
    (DATA_ACCESS, &DATA_ACCESS_CODE),
    (INT3, &INT3_CODE),
    (INT1, &INT1_CODE),
    (SW, &SW_CODE),
    (LOOP, &LOOP_CODE),
];

// ---------------------------------------------------------------------------
// Exception handlers.
// ---------------------------------------------------------------------------

/// Bytes between two consecutive exception-handler stubs.
pub const STUB_STRIDE: u64 = 16;

/// Handler stub for a trap vector (#DB = 1, #BP = 3, #OF = 4): report the vector,
/// then return to the interrupted code.
pub const fn trap_stub(vector: u8) -> [u8; 8] {
    [
        0x50, //         push rax
        0xB0, vector, // mov al, vector
        0xE6, 0x11, //   out 0x11, al (PORT_VECTOR)
        0x58, //         pop rax
        0x48, 0xCF, //   iretq
    ]
}

/// Handler stub for every other vector: report the vector, then halt for good
/// (a fault would repeat if the handler returned).
pub const fn fault_stub(vector: u8) -> [u8; 7] {
    [
        0xB0, vector, // mov al, vector
        0xE6, 0x11, //   out 0x11, al (PORT_VECTOR)
        0xF4, //         hlt
        0xEB, 0xFD, //   jmp -3 (back to the hlt)
    ]
}

/// Whether the handler for `vector` returns (`iretq`) rather than halting.
pub const fn is_trap_vector(vector: u8) -> bool {
    matches!(vector, 1 | 3 | 4)
}

const _: () = assert!(PORT_DONE == 0x10 && PORT_VECTOR == 0x11);
