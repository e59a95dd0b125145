//! The reference: a literal, integer-level model of the seed (QEMU's 2009
//! "Guest debugging support for KVM", `kvm-all.c` and `target-i386/kvm.c`),
//! used as the oracle the typed model is checked against. Plain `u64`s,
//! arrays, a linear list and errno-style results; it shares no code with the
//! typed model. Keep it obvious: it is right by being easy to read.
//!
//! Defects of the seed fixed here (each is also how the typed model behaves):
//! 1. `kvm_remove_all_breakpoints` restored the bytes but never emptied the
//!    software-breakpoint list; here the list is emptied (entries whose memory
//!    fails are kept and reported, in address order).
//! 2. The hardware table (`hw_breakpoint[4]`, `nb_hw_breakpoint`) was
//!    file-static, shared by every VM; here it is a field of the per-VM state.
//! 3. No rollback: an insert whose later step failed left earlier steps done
//!    (the list entry, or — in callers — vCPUs updated). Here a failed
//!    operation changes nothing: the byte is read, then written, and only then
//!    recorded.
//! 4. `len_code[..] << (18 + n*4)` was computed in `int`: for slot 3 with an
//!    8-byte length, `2 << 30` is negative and sign-extends into DR7's upper
//!    32 bits. Here every shift is done in `u64`.
//! 5. `kvm_arch_debug` read the slot kind from the `dr7` of the exit (0 on some
//!    hosts, so any B-bit looked like an execute breakpoint — including slots
//!    the debugger never set) and from the newest table, not what the vCPU ran
//!    with. Here hits come from the applied `debugreg` and only armed slots count.
//! 6. A last remove whose `0xCC` had been rewritten by the guest failed with
//!    `-EINVAL` and kept the entry forever; here it forgets the entry, leaves
//!    the guest's byte alone and answers [`REMOVED_GUEST_OVERWROTE`].
//! 7. With a hardware breakpoint and no single-step, DR6.BS suppressed the
//!    B-bits (and single-step's BS hid a watchpoint hit in the same exit);
//!    here single-step and every armed hit are reported together.
//! 8. Any exception other than 1 was treated as `#BP`; here it is `-EINVAL`.
//! 9. `debugreg[]` was left uninitialised without hardware breakpoints; here
//!    DR0–3 of free slots are 0 and DR7 is always at least `0x600`.
//! 10. The use count was an `int` that could wrap; here `u32` with `-EOVERFLOW`.
//!
//! Deliberate difference, not a defect: removing a hardware breakpoint
//! validates type/length/alignment as insert does (the seed said `-ENOENT`).

// The loops index parallel arrays the way the C code does, on purpose.
#![allow(clippy::needless_range_loop)]

use alloc::vec::Vec;

/// `-EINVAL`'s magnitude.
pub const EINVAL: i32 = 22;
/// `-ENOENT`'s magnitude.
pub const ENOENT: i32 = 2;
/// `-EEXIST`'s magnitude.
pub const EEXIST: i32 = 17;
/// `-ENOSYS`'s magnitude.
pub const ENOSYS: i32 = 38;
/// `-ENOBUFS`'s magnitude.
pub const ENOBUFS: i32 = 105;
/// `-EOVERFLOW`'s magnitude.
pub const EOVERFLOW: i32 = 75;
/// A positive result of [`Reference::remove`]: the last use was removed but
/// the guest had rewritten the `0xCC`, which was left alone.
pub const REMOVED_GUEST_OVERWROTE: i32 = 1;

/// GDB `Z0`.
pub const GDB_BREAKPOINT_SW: u64 = 0;
/// GDB `Z1`.
pub const GDB_BREAKPOINT_HW: u64 = 1;
/// GDB `Z2`.
pub const GDB_WATCHPOINT_WRITE: u64 = 2;
/// GDB `Z3`.
pub const GDB_WATCHPOINT_READ: u64 = 3;
/// GDB `Z4`.
pub const GDB_WATCHPOINT_ACCESS: u64 = 4;

/// `KVM_GUESTDBG_ENABLE`.
pub const KVM_GUESTDBG_ENABLE: u32 = 0x1;
/// `KVM_GUESTDBG_SINGLESTEP`.
pub const KVM_GUESTDBG_SINGLESTEP: u32 = 0x2;
/// `KVM_GUESTDBG_USE_SW_BP`.
pub const KVM_GUESTDBG_USE_SW_BP: u32 = 0x10000;
/// `KVM_GUESTDBG_USE_HW_BP`.
pub const KVM_GUESTDBG_USE_HW_BP: u32 = 0x20000;
/// `KVM_GUESTDBG_INJECT_DB`.
pub const KVM_GUESTDBG_INJECT_DB: u32 = 0x40000;
/// `KVM_GUESTDBG_INJECT_BP`.
pub const KVM_GUESTDBG_INJECT_BP: u32 = 0x80000;

/// Guest memory as the seed used it (`cpu_memory_rw_debug`,
/// `kvm_patch_opcode_byte`): `None`/`false` on failure.
pub trait RefMemory {
    /// One byte at `addr`, or `None` if it cannot be read.
    fn ref_read(&mut self, addr: u64) -> Option<u8>;
    /// Writes one byte; `false` if it cannot be written (then it is unchanged).
    fn ref_write(&mut self, addr: u64, value: u8) -> bool;
}

/// One software breakpoint (`struct kvm_sw_breakpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefSwBreakpoint {
    /// `pc`.
    pub pc: u64,
    /// `saved_insn`.
    pub saved_insn: u8,
    /// `use_count`.
    pub use_count: u32,
}

/// One hardware breakpoint (`hw_breakpoint[n]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefHwBreakpoint {
    /// `addr`.
    pub addr: u64,
    /// `len` in bytes.
    pub len: u64,
    /// GDB type.
    pub ty: u64,
}

/// What [`Reference::debug_exit`] decided, as integers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefDecision {
    /// 1: stop for the debugger; 0: re-inject; `-EINVAL`: not a debug vector.
    pub handle: i32,
    /// The single step completed.
    pub single_step: bool,
    /// The hit slots (bit n = DRn).
    pub hit_mask: u8,
    /// Per slot: (address, R/W code, length in bytes) of each hit.
    pub hits: [(u64, u64, u64); 4],
    /// The software breakpoint hit: its address.
    pub sw: Option<u64>,
    /// `KVM_GUESTDBG_INJECT_DB`/`_BP` to re-inject, else 0.
    pub inject: u32,
    /// With `handle == -EINVAL`: the vector that was not a debug vector.
    pub bad_exception: Option<u32>,
}

/// What [`Reference::insert`] or [`Reference::remove`] did: the seed's return
/// value and the facts its code had at hand when it returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefResult {
    /// 0, [`REMOVED_GUEST_OVERWROTE`] or a negative errno.
    pub code: i32,
    /// Hardware: the `n` of `hw_breakpoint[n]` filled (insert) or emptied
    /// (remove; the last entry moved into it).
    pub slot: Option<usize>,
    /// Software: the byte saved by an insert that wrote `0xCC`, or the byte a
    /// remove found where the guest had rewritten the `0xCC`.
    pub byte: Option<u8>,
    /// Software: `use_count` after an insert or remove that only counted.
    pub count: Option<u32>,
    /// A memory access that failed (`-EINVAL`): its address and whether it
    /// was a write.
    pub fault: Option<(u64, bool)>,
}

impl RefResult {
    /// Only a return value.
    pub fn code(code: i32) -> RefResult {
        RefResult {
            code,
            ..RefResult::default()
        }
    }

    /// `-EINVAL` for a failed read (`write == false`) or write of `addr`.
    pub fn fault(addr: u64, write: bool) -> RefResult {
        RefResult {
            code: -EINVAL,
            fault: Some((addr, write)),
            ..RefResult::default()
        }
    }
}

/// What [`Reference::remove_all`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefRemoveAll {
    /// How many original bytes were written back.
    pub restored: usize,
    /// Addresses whose `0xCC` the guest had rewritten (forgotten), ascending.
    pub overwritten: Vec<u64>,
    /// Addresses whose memory failed (kept in the list), ascending, each
    /// with whether the failed access was the write.
    pub failed: Vec<(u64, bool)>,
}

/// The seed's state for one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reference {
    /// `kvm_sw_breakpoints`: a plain list, searched linearly.
    pub sw_breakpoints: Vec<RefSwBreakpoint>,
    /// `hw_breakpoint[4]`.
    pub hw_breakpoint: [RefHwBreakpoint; 4],
    /// `nb_hw_breakpoint`.
    pub nb_hw_breakpoint: usize,
    /// `singlestep_enabled`.
    pub singlestep_enabled: bool,
}

impl Reference {
    /// An empty state.
    pub fn new() -> Reference {
        Reference::default()
    }

    /// `kvm_find_sw_breakpoint`: the index of the entry for `pc`.
    pub fn find_sw_breakpoint(&self, pc: u64) -> Option<usize> {
        let mut i = 0;
        while i < self.sw_breakpoints.len() {
            if self.sw_breakpoints[i].pc == pc {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    fn find_hw_breakpoint(&self, addr: u64, len: u64, ty: u64) -> Option<usize> {
        for n in 0..self.nb_hw_breakpoint {
            let bp = self.hw_breakpoint[n];
            if bp.addr == addr && bp.ty == ty && bp.len == len {
                return Some(n);
            }
        }
        None
    }

    /// The seed's checks of a hardware request, returning the effective length.
    fn check_hw(addr: u64, len: u64, ty: u64) -> Result<u64, i32> {
        match ty {
            GDB_BREAKPOINT_HW => Ok(1),
            GDB_WATCHPOINT_WRITE | GDB_WATCHPOINT_ACCESS => match len {
                1 => Ok(1),
                2 | 4 | 8 => {
                    if addr & (len - 1) != 0 {
                        Err(-EINVAL)
                    } else {
                        Ok(len)
                    }
                }
                _ => Err(-EINVAL),
            },
            _ => Err(-ENOSYS),
        }
    }

    /// `kvm_insert_breakpoint`: 0 or a negative errno, and what it did.
    pub fn insert(&mut self, mem: &mut impl RefMemory, addr: u64, len: u64, ty: u64) -> RefResult {
        if ty == GDB_BREAKPOINT_SW {
            if let Some(i) = self.find_sw_breakpoint(addr) {
                if self.sw_breakpoints[i].use_count == u32::MAX {
                    return RefResult::code(-EOVERFLOW);
                }
                self.sw_breakpoints[i].use_count += 1;
                return RefResult {
                    count: Some(self.sw_breakpoints[i].use_count),
                    ..RefResult::code(0)
                };
            }
            let Some(saved_insn) = mem.ref_read(addr) else {
                return RefResult::fault(addr, false);
            };
            if !mem.ref_write(addr, 0xcc) {
                return RefResult::fault(addr, true);
            }
            self.sw_breakpoints.push(RefSwBreakpoint {
                pc: addr,
                saved_insn,
                use_count: 1,
            });
            return RefResult {
                byte: Some(saved_insn),
                ..RefResult::code(0)
            };
        }
        let len = match Self::check_hw(addr, len, ty) {
            Ok(len) => len,
            Err(e) => return RefResult::code(e),
        };
        if self.nb_hw_breakpoint == 4 {
            return RefResult::code(-ENOBUFS);
        }
        if self.find_hw_breakpoint(addr, len, ty).is_some() {
            return RefResult::code(-EEXIST);
        }
        let n = self.nb_hw_breakpoint;
        self.hw_breakpoint[n] = RefHwBreakpoint { addr, len, ty };
        self.nb_hw_breakpoint += 1;
        RefResult {
            slot: Some(n),
            ..RefResult::code(0)
        }
    }

    /// `kvm_arch_remove_sw_breakpoint` on its own: 0, [`REMOVED_GUEST_OVERWROTE`]
    /// (with the byte found) or `-EINVAL`; memory is touched only when `0xCC`
    /// is still there.
    fn unpatch(mem: &mut impl RefMemory, bp: RefSwBreakpoint) -> RefResult {
        let Some(byte) = mem.ref_read(bp.pc) else {
            return RefResult::fault(bp.pc, false);
        };
        if byte != 0xcc {
            return RefResult {
                byte: Some(byte),
                ..RefResult::code(REMOVED_GUEST_OVERWROTE)
            };
        }
        if !mem.ref_write(bp.pc, bp.saved_insn) {
            return RefResult::fault(bp.pc, true);
        }
        RefResult::code(0)
    }

    /// `kvm_remove_breakpoint`: 0, [`REMOVED_GUEST_OVERWROTE`] or a negative
    /// errno, and what it did.
    pub fn remove(&mut self, mem: &mut impl RefMemory, addr: u64, len: u64, ty: u64) -> RefResult {
        if ty == GDB_BREAKPOINT_SW {
            let Some(i) = self.find_sw_breakpoint(addr) else {
                return RefResult::code(-ENOENT);
            };
            if self.sw_breakpoints[i].use_count > 1 {
                self.sw_breakpoints[i].use_count -= 1;
                return RefResult {
                    count: Some(self.sw_breakpoints[i].use_count),
                    ..RefResult::code(0)
                };
            }
            let r = Self::unpatch(mem, self.sw_breakpoints[i]);
            if r.code >= 0 {
                self.sw_breakpoints.remove(i);
            }
            return r;
        }
        let len = match Self::check_hw(addr, len, ty) {
            Ok(len) => len,
            Err(e) => return RefResult::code(e),
        };
        let Some(n) = self.find_hw_breakpoint(addr, len, ty) else {
            return RefResult::code(-ENOENT);
        };
        self.nb_hw_breakpoint -= 1;
        self.hw_breakpoint[n] = self.hw_breakpoint[self.nb_hw_breakpoint];
        self.hw_breakpoint[self.nb_hw_breakpoint] = RefHwBreakpoint::default();
        RefResult {
            slot: Some(n),
            ..RefResult::code(0)
        }
    }

    /// `kvm_remove_all_breakpoints`: restores every byte it can, in ascending
    /// address order; entries whose memory fails stay in the list, those the
    /// guest had overwritten are forgotten.
    pub fn remove_all(&mut self, mem: &mut impl RefMemory) -> RefRemoveAll {
        let mut report = RefRemoveAll::default();
        let mut kept = Vec::new();
        let mut list = self.sw_breakpoints.clone();
        list.sort_by_key(|bp| bp.pc);
        for bp in list {
            let r = Self::unpatch(mem, bp);
            if let Some((addr, write)) = r.fault {
                report.failed.push((addr, write));
                kept.push(bp);
            } else if r.code == REMOVED_GUEST_OVERWROTE {
                report.overwritten.push(bp.pc);
            } else {
                report.restored += 1;
            }
        }
        self.sw_breakpoints = kept;
        self.nb_hw_breakpoint = 0;
        self.hw_breakpoint = [RefHwBreakpoint::default(); 4];
        report
    }

    /// `kvm_update_guest_debug` + `kvm_arch_update_guest_debug`: the control
    /// word and `debugreg[8]` for a vCPU whose single-step flag is `singlestep`.
    pub fn guest_debug(&self, singlestep: bool) -> (u32, [u64; 8]) {
        const TYPE_CODE: [u64; 5] = [0, 0x0, 0x1, 0, 0x3];
        let mut control = 0;
        let mut debugreg = [0u64; 8];
        if singlestep {
            control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        }
        if !self.sw_breakpoints.is_empty() {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        debugreg[7] = 0x600;
        if self.nb_hw_breakpoint > 0 {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            for n in 0..self.nb_hw_breakpoint {
                let bp = self.hw_breakpoint[n];
                let len_code: u64 = match bp.len {
                    1 => 0x0,
                    2 => 0x1,
                    4 => 0x3,
                    _ => 0x2,
                };
                debugreg[n] = bp.addr;
                debugreg[7] |=
                    (2u64 << (n * 2)) | (TYPE_CODE[bp.ty as usize] << (16 + n * 4)) | (len_code << (18 + n * 4));
            }
        }
        (control, debugreg)
    }

    /// `kvm_arch_debug` for an exit `(exception, pc, dr6)` of a vCPU that ran
    /// with `(control, debugreg)`.
    pub fn debug_exit(&self, exception: u32, pc: u64, dr6: u64, control: u32, debugreg: [u64; 8]) -> RefDecision {
        let mut d = RefDecision::default();
        if exception == 1 {
            let enabled = control & KVM_GUESTDBG_ENABLE != 0;
            d.single_step = dr6 & (1 << 14) != 0 && enabled && control & KVM_GUESTDBG_SINGLESTEP != 0;
            if enabled && control & KVM_GUESTDBG_USE_HW_BP != 0 {
                let dr7 = debugreg[7];
                for n in 0..4 {
                    let rw = (dr7 >> (16 + n * 4)) & 3;
                    let len_code = (dr7 >> (18 + n * 4)) & 3;
                    let armed = (dr7 >> (n * 2)) & 3 != 0 && rw != 2;
                    if dr6 & (1 << n) != 0 && armed {
                        d.hit_mask |= 1 << n;
                        let len = [1, 2, 8, 4][len_code as usize];
                        d.hits[n] = (debugreg[n], rw, len);
                    }
                }
            }
            if d.single_step || d.hit_mask != 0 {
                d.handle = 1;
            } else {
                d.inject = KVM_GUESTDBG_INJECT_DB;
            }
        } else if exception == 3 {
            if self.find_sw_breakpoint(pc).is_some() {
                d.handle = 1;
                d.sw = Some(pc);
            } else {
                d.inject = KVM_GUESTDBG_INJECT_BP;
            }
        } else {
            d.handle = -EINVAL;
            d.bad_exception = Some(exception);
        }
        d
    }
}
