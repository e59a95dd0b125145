//! GDB's x86-64 register file ([`X86_64CoreRegs`]: general, `rip`,
//! `eflags`, segment selectors, x87, SSE) to and from what KVM holds
//! ([`VcpuRegs`]: `kvm_regs`, `kvm_sregs`, `kvm_fpu`), and a write that is
//! applied all together or not at all ([`apply`]).
//!
//! # x87 and SSE
//! `KVM_GET_FPU`/`KVM_SET_FPU` carry the FXSAVE image. `st0`–`st7` are its
//! eight 80-bit registers in stack order (the six bytes after each are
//! kept); `fctrl`, `fstat`, `fop` are FCW, FSW and FOP; `fioff`/`fiseg` are
//! the low and high halves of the 64-bit last instruction pointer and
//! `fooff`/`foseg` of the last operand pointer (GDB reads a 64-bit FXSAVE the
//! same way). FXSAVE keeps one bit per register for the tag (empty or not):
//! `ftag` is GDB's full tag word, computed from it and the registers'
//! contents as the CPU's `FSTENV` would; a written `ftag` sets only which
//! registers are empty. Values wider than the CPU's fields (`fctrl`, `fstat`,
//! `ftag` above 16 bits, `fop` above 11) and `mxcsr` with reserved bits are
//! refused.
//!
//! KVM_SET_FPU does not write MXCSR (`kvm_arch_vcpu_ioctl_set_fpu` copies
//! every field but that one): a write is read back, and one that changed
//! `mxcsr` is refused because KVM leaves it as it was.
//!
//! # Segment selectors
//! GDB's `cs`, `ss`, `ds`, `es`, `fs`, `gs` are the selectors only. A write
//! changes the selector and keeps the rest of the segment (base, limit,
//! attributes: the descriptor cache), as if the guest's GDT had been edited
//! and the segment not reloaded yet; the guest sees the new selector at
//! once (`mov ax, ds`, an interrupt frame) and the descriptor the next time
//! it loads the segment. In real mode and virtual-8086 mode the base *is*
//! the selector: it becomes `selector × 16`, as the CPU's own `mov` does.
//! Refused, because no CPU can be in that state: a null `cs` in protected
//! mode, a change of the privilege level bits (RPL) of `cs` or `ss` (the
//! current privilege level), a null `ss` in protected mode outside 64-bit
//! code.

use gdbstub_arch::x86::reg::{X86SegmentRegs, X86_64CoreRegs, X87FpuInternalRegs, F80};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use crate::VcpuOps;

/// A vCPU's registers as KVM holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VcpuRegs {
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_FPU`.
    pub fpu: kvm_fpu,
}

impl VcpuRegs {
    /// Reads all three from `ops`.
    ///
    /// # Errors
    /// The first ioctl that failed, and which one.
    pub fn read(ops: &dyn VcpuOps) -> Result<VcpuRegs, ApplyError> {
        let failed = |op| move |source| ApplyError::Failed { op, source };
        Ok(VcpuRegs {
            regs: ops.get_regs().map_err(failed("KVM_GET_REGS"))?,
            sregs: ops.get_sregs().map_err(failed("KVM_GET_SREGS"))?,
            fpu: ops.get_fpu().map_err(failed("KVM_GET_FPU"))?,
        })
    }
}

/// A segment register GDB names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `cs`.
    Cs,
    /// `ss`.
    Ss,
    /// `ds`.
    Ds,
    /// `es`.
    Es,
    /// `fs`.
    Fs,
    /// `gs`.
    Gs,
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Segment::Cs => "cs",
            Segment::Ss => "ss",
            Segment::Ds => "ds",
            Segment::Es => "es",
            Segment::Fs => "fs",
            Segment::Gs => "gs",
        })
    }
}

/// Why a GDB register write was refused. Nothing is written then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterWriteError {
    /// A selector wider than 16 bits.
    #[error("{seg}: {value:#x} is not a 16-bit selector")]
    SelectorWidth {
        /// The register.
        seg: Segment,
        /// What GDB wrote.
        value: u32,
    },
    /// The RPL of `cs` or `ss` is the current privilege level: it cannot
    /// change without a far transfer.
    #[error("{seg}: the privilege level bits cannot change ({from:#x} to {to:#x})")]
    PrivilegeLevel {
        /// `cs` or `ss`.
        seg: Segment,
        /// The selector now.
        from: u16,
        /// The selector GDB wrote.
        to: u16,
    },
    /// A null selector where the CPU never has one (`cs` in protected mode;
    /// `ss` in protected mode outside 64-bit code).
    #[error("{seg}: a null selector is not possible here")]
    Null {
        /// The register.
        seg: Segment,
    },
    /// An x87 control/status value wider than the CPU's field.
    #[error("{reg}: {value:#x} does not fit the CPU's {bits}-bit field")]
    FpuWidth {
        /// `fctrl`, `fstat`, `ftag` or `fop`.
        reg: &'static str,
        /// What GDB wrote.
        value: u32,
        /// The field's width.
        bits: u32,
    },
    /// MXCSR bits 16–31 are reserved (loading them faults).
    #[error("mxcsr: {value:#x} sets reserved bits")]
    MxcsrReserved {
        /// What GDB wrote.
        value: u32,
    },
}

/// Why [`apply`] (or [`VcpuRegs::read`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An ioctl failed; what was written before it was restored.
    #[error("{op} failed: {source}")]
    Failed {
        /// The ioctl.
        op: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted the write but did not apply `what` (read back
    /// different); everything written was restored.
    #[error("KVM did not apply {what}")]
    NotApplied {
        /// The register(s).
        what: &'static str,
    },
    /// Restoring after a failure failed too: the vCPU's registers are in
    /// doubt.
    #[error("{op} failed while restoring the registers: {source}")]
    Restore {
        /// The ioctl.
        op: &'static str,
        /// Its error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Bytes of an 80-bit x87 register.
const F80_LEN: usize = 10;

/// MXCSR bits 0–15; the rest are reserved on every CPU.
const MXCSR_DEFINED: u32 = 0xffff;

/// CR0.PE.
const CR0_PE: u64 = 1;

/// RFLAGS.VM.
const RFLAGS_VM: u64 = 1 << 17;

/// GDB's full tag word from FXSAVE's abridged one (one bit per physical
/// register: not empty), classifying each non-empty register by its
/// contents: 0 valid, 1 zero, 2 special, 3 empty.
pub fn full_tag(fpu: &kvm_fpu) -> u32 {
    let top = u32::from(fpu.fsw >> 11) & 7;
    let mut tag = 0u32;
    for phys in 0..8u32 {
        let class = if fpu.ftwx & (1 << phys) == 0 {
            3
        } else {
            // fpr[] is in stack order: st(i) is physical register top + i.
            let st = ((phys + 8 - top) & 7) as usize;
            let r = &fpu.fpr[st];
            let exponent = u16::from_le_bytes([r[8], r[9]]) & 0x7fff;
            let mantissa = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            match exponent {
                0x7fff => 2,
                0 if mantissa == 0 => 1,
                0 => 2,
                _ if mantissa >> 63 == 1 => 0,
                _ => 2,
            }
        };
        tag |= class << (2 * phys);
    }
    tag
}

/// FXSAVE's abridged tag from GDB's full tag word: a register is not empty
/// unless its two bits are `11`.
pub fn abridged_tag(full: u16) -> u8 {
    (0..8u8)
        .filter(|i| (full >> (2 * i)) & 3 != 3)
        .fold(0, |bits, i| bits | (1 << i))
}

fn st(fpr: &[u8; 16]) -> F80 {
    let mut v = F80::default();
    v.copy_from_slice(&fpr[..F80_LEN]);
    v
}

/// GDB's view of a vCPU's registers.
pub fn to_gdb(v: &VcpuRegs) -> X86_64CoreRegs {
    let (regs, sregs, fpu) = (&v.regs, &v.sregs, &v.fpu);
    X86_64CoreRegs {
        // GDB's order: rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15.
        regs: [
            regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi, regs.rdi, regs.rbp, regs.rsp, regs.r8, regs.r9, regs.r10,
            regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
        ],
        // GDB's eflags is 32 bits; RFLAGS' upper half is reserved (zero).
        eflags: regs.rflags as u32,
        rip: regs.rip,
        segments: X86SegmentRegs {
            cs: sregs.cs.selector.into(),
            ss: sregs.ss.selector.into(),
            ds: sregs.ds.selector.into(),
            es: sregs.es.selector.into(),
            fs: sregs.fs.selector.into(),
            gs: sregs.gs.selector.into(),
        },
        st: fpu.fpr.each_ref().map(st),
        fpu: X87FpuInternalRegs {
            fctrl: fpu.fcw.into(),
            fstat: fpu.fsw.into(),
            ftag: full_tag(fpu),
            fiseg: (fpu.last_ip >> 32) as u32,
            fioff: fpu.last_ip as u32,
            foseg: (fpu.last_dp >> 32) as u32,
            fooff: fpu.last_dp as u32,
            fop: fpu.last_opcode.into(),
        },
        xmm: fpu.xmm.map(u128::from_le_bytes),
        mxcsr: fpu.mxcsr,
    }
}

fn narrow(reg: &'static str, value: u32, bits: u32) -> Result<u16, RegisterWriteError> {
    if value >> bits != 0 {
        return Err(RegisterWriteError::FpuWidth { reg, value, bits });
    }
    // bits <= 16: the check above makes this lossless.
    Ok(value as u16)
}

/// The x87/SSE state for GDB's values, given the current one.
fn fpu_from_gdb(new: &X86_64CoreRegs, now: &kvm_fpu) -> Result<kvm_fpu, RegisterWriteError> {
    let f = &new.fpu;
    if new.mxcsr & !MXCSR_DEFINED != 0 {
        return Err(RegisterWriteError::MxcsrReserved { value: new.mxcsr });
    }
    let mut fpu = *now;
    for (reg, value) in fpu.fpr.iter_mut().zip(&new.st) {
        reg[..F80_LEN].copy_from_slice(value);
    }
    fpu.fcw = narrow("fctrl", f.fctrl, 16)?;
    fpu.fsw = narrow("fstat", f.fstat, 16)?;
    fpu.ftwx = abridged_tag(narrow("ftag", f.ftag, 16)?);
    fpu.last_opcode = narrow("fop", f.fop, 11)?;
    fpu.last_ip = u64::from(f.fiseg) << 32 | u64::from(f.fioff);
    fpu.last_dp = u64::from(f.foseg) << 32 | u64::from(f.fooff);
    fpu.xmm = new.xmm.map(u128::to_le_bytes);
    fpu.mxcsr = new.mxcsr;
    Ok(fpu)
}

/// Writes GDB's selector `value` into `seg` (see the module's rules).
fn selector(
    which: Segment,
    seg: &mut kvm_segment,
    value: u32,
    sregs: &kvm_sregs,
    rflags: u64,
) -> Result<(), RegisterWriteError> {
    let to = u16::try_from(value).map_err(|_| RegisterWriteError::SelectorWidth { seg: which, value })?;
    let from = seg.selector;
    if to == from {
        return Ok(());
    }
    if sregs.cr0 & CR0_PE == 0 || rflags & RFLAGS_VM != 0 {
        // Real or virtual-8086 mode: the selector is the base.
        seg.selector = to;
        seg.base = u64::from(to) << 4;
        return Ok(());
    }
    let null = to & !3 == 0;
    match which {
        Segment::Cs | Segment::Ss if to & 3 != from & 3 => {
            return Err(RegisterWriteError::PrivilegeLevel { seg: which, from, to })
        }
        Segment::Cs if null => return Err(RegisterWriteError::Null { seg: which }),
        Segment::Ss if null && sregs.cs.l == 0 => return Err(RegisterWriteError::Null { seg: which }),
        _ => {}
    }
    seg.selector = to;
    Ok(())
}

/// The registers to set for GDB's `new` values, given the current ones.
///
/// # Errors
/// [`RegisterWriteError`] when `new` asks for what cannot be written;
/// nothing is written then.
pub fn from_gdb(new: &X86_64CoreRegs, now: &VcpuRegs) -> Result<VcpuRegs, RegisterWriteError> {
    let r = &new.regs;
    let regs = kvm_regs {
        rax: r[0],
        rbx: r[1],
        rcx: r[2],
        rdx: r[3],
        rsi: r[4],
        rdi: r[5],
        rbp: r[6],
        rsp: r[7],
        r8: r[8],
        r9: r[9],
        r10: r[10],
        r11: r[11],
        r12: r[12],
        r13: r[13],
        r14: r[14],
        r15: r[15],
        rip: new.rip,
        rflags: (now.regs.rflags & !0xffff_ffff) | u64::from(new.eflags),
    };
    let mut sregs = now.sregs;
    let s = &new.segments;
    let old = now.sregs;
    selector(Segment::Cs, &mut sregs.cs, s.cs, &old, regs.rflags)?;
    selector(Segment::Ss, &mut sregs.ss, s.ss, &old, regs.rflags)?;
    selector(Segment::Ds, &mut sregs.ds, s.ds, &old, regs.rflags)?;
    selector(Segment::Es, &mut sregs.es, s.es, &old, regs.rflags)?;
    selector(Segment::Fs, &mut sregs.fs, s.fs, &old, regs.rflags)?;
    selector(Segment::Gs, &mut sregs.gs, s.gs, &old, regs.rflags)?;
    let fpu = fpu_from_gdb(new, &now.fpu)?;
    Ok(VcpuRegs { regs, sregs, fpu })
}

/// What GDB sees of the x87/SSE state: the part a read back must match.
fn fpu_seen(f: &kvm_fpu) -> X86_64CoreRegs {
    to_gdb(&VcpuRegs {
        fpu: *f,
        ..VcpuRegs::default()
    })
}

/// The segments' selectors and bases: the part of `kvm_sregs` a GDB write
/// changes.
fn selectors(s: &kvm_sregs) -> [(u16, u64); 6] {
    [s.cs, s.ss, s.ds, s.es, s.fs, s.gs].map(|seg| (seg.selector, seg.base))
}

/// Writes `new` over `now` (what [`VcpuRegs::read`] returned on this vCPU):
/// only the parts that differ, each ioctl once, then reads back what KVM may
/// silently drop (the selectors, the x87/SSE state). On any failure every
/// part already written is put back as it was.
///
/// # Errors
/// [`ApplyError::Failed`] / [`ApplyError::NotApplied`]: nothing changed;
/// [`ApplyError::Restore`]: putting back failed, the registers are in doubt.
pub fn apply(ops: &dyn VcpuOps, now: &VcpuRegs, new: &VcpuRegs) -> Result<(), ApplyError> {
    let regs = new.regs != now.regs;
    let sregs = new.sregs != now.sregs;
    let fpu = new.fpu != now.fpu;
    let outcome = (|| {
        let failed = |op| move |source| ApplyError::Failed { op, source };
        if regs {
            ops.set_regs(&new.regs).map_err(failed("KVM_SET_REGS"))?;
        }
        if sregs {
            ops.set_sregs(&new.sregs).map_err(failed("KVM_SET_SREGS"))?;
            let back = ops.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
            if selectors(&back) != selectors(&new.sregs) {
                return Err(ApplyError::NotApplied {
                    what: "the segment selectors",
                });
            }
        }
        if fpu {
            ops.set_fpu(&new.fpu).map_err(failed("KVM_SET_FPU"))?;
            let back = fpu_seen(&ops.get_fpu().map_err(failed("KVM_GET_FPU"))?);
            let want = fpu_seen(&new.fpu);
            if back.mxcsr != want.mxcsr {
                return Err(ApplyError::NotApplied { what: "mxcsr" });
            }
            if back != want {
                return Err(ApplyError::NotApplied {
                    what: "the x87/SSE registers",
                });
            }
        }
        Ok(())
    })();
    let Err(e) = outcome else { return Ok(()) };
    // Put back everything that may have been written, last first. A part
    // whose ioctl failed may have been written too (KVM_SET_SREGS can fail
    // half-way): it is restored like the others.
    let restore = |op| move |source| ApplyError::Restore { op, source };
    if fpu {
        ops.set_fpu(&now.fpu).map_err(restore("KVM_SET_FPU"))?;
    }
    if sregs {
        ops.set_sregs(&now.sregs).map_err(restore("KVM_SET_SREGS"))?;
    }
    if regs {
        ops.set_regs(&now.regs).map_err(restore("KVM_SET_REGS"))?;
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1.5 as an x87 extended-precision value: mantissa 0xC000..., exponent 0x3FFF.
    const ONE_AND_A_HALF: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0x3f];

    fn sample() -> VcpuRegs {
        let regs = kvm_regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r15: 16,
            rip: 0x1000,
            rflags: 0x1_0000_0246,
            ..Default::default()
        };
        let cs = kvm_segment {
            selector: 0x8,
            limit: 0xffff_ffff,
            type_: 11,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x10,
            base: 0x1234_0000,
            limit: 0xffff_ffff,
            type_: 3,
            present: 1,
            s: 1,
            db: 1,
            g: 1,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cr0: 0x8000_0011,
            cs,
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ..Default::default()
        };
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.fpr[0][..10].copy_from_slice(&ONE_AND_A_HALF);
        fpu.fpr[0][10..].copy_from_slice(&[0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6]);
        fpu.xmm[15] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100u128.to_le_bytes();
        VcpuRegs { regs, sregs, fpu }
    }

    #[test]
    fn gdb_order_puts_rbp_before_rsp() {
        let g = to_gdb(&sample());
        assert_eq!(&g.regs[..8], &[1, 2, 3, 4, 5, 6, 8, 7]);
        assert_eq!((g.regs[8], g.regs[15]), (9, 16));
        assert_eq!((g.rip, g.eflags), (0x1000, 0x246));
        assert_eq!((g.segments.cs, g.segments.ss), (0x8, 0x10));
    }

    #[test]
    fn x87_and_sse_read_as_the_fxsave_image_holds_them() {
        let mut v = sample();
        v.fpu.fsw = 0x3800; // TOP = 7: st0 is physical register 7
        v.fpu.ftwx = 0x80;
        v.fpu.last_opcode = 0x7ff;
        v.fpu.last_ip = 0x1122_3344_5566_7788;
        v.fpu.last_dp = 0x99aa_bbcc_ddee_ff00;
        let g = to_gdb(&v);
        assert_eq!(g.st[0], ONE_AND_A_HALF);
        assert_eq!(g.st[1], [0; 10]);
        assert_eq!((g.fpu.fctrl, g.fpu.fstat, g.fpu.fop), (0x37f, 0x3800, 0x7ff));
        // Physical 7 valid (00), the other seven empty (11).
        assert_eq!(g.fpu.ftag, 0x3fff);
        assert_eq!((g.fpu.fiseg, g.fpu.fioff), (0x1122_3344, 0x5566_7788));
        assert_eq!((g.fpu.foseg, g.fpu.fooff), (0x99aa_bbcc, 0xddee_ff00));
        assert_eq!(g.xmm[15], 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100);
        assert_eq!(g.mxcsr, 0x1f80);
    }

    #[test]
    fn tags_classify_zero_special_and_valid_contents() {
        let mut f = kvm_fpu {
            ftwx: 0b0000_0111,
            ..Default::default()
        };
        // TOP = 0: st(i) is physical i.
        f.fpr[0][..10].copy_from_slice(&ONE_AND_A_HALF); // valid
        f.fpr[1][9] = 0x7f; // exponent 0x7f00, integer bit clear: unnormal, special
                            // fpr[2] all zero: zero
        assert_eq!(full_tag(&f), 0b11_11_11_11_11_01_10_00);
        assert_eq!(abridged_tag(full_tag(&f) as u16), 0b0000_0111);
        assert_eq!(abridged_tag(0xffff), 0);
        assert_eq!(abridged_tag(0), 0xff);
    }

    #[test]
    fn a_write_round_trips_and_keeps_what_gdb_does_not_see() {
        let now = sample();
        let mut g = to_gdb(&now);
        assert_eq!(from_gdb(&g, &now), Ok(now));
        g.regs[7] = 0x9000; // rsp
        g.eflags = 0x202;
        g.xmm[0] = 42;
        g.st[0] = [0; 10];
        g.fpu.fioff = 0xdead;
        let set = from_gdb(&g, &now).unwrap_or_default();
        assert_eq!(
            (set.regs.rsp, set.regs.rbp, set.regs.rflags),
            (0x9000, 8, 0x1_0000_0202)
        );
        assert_eq!(set.fpu.xmm[0], 42u128.to_le_bytes());
        assert_eq!(
            set.fpu.fpr[0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6]
        );
        assert_eq!(set.fpu.last_ip, 0xdead);
        assert_eq!(set.sregs, now.sregs);
    }

    #[test]
    fn a_selector_write_keeps_the_rest_of_the_segment() {
        let now = sample();
        let mut g = to_gdb(&now);
        g.segments.ds = 0x2b;
        g.segments.cs = 0x18;
        let set = from_gdb(&g, &now).unwrap_or_default();
        let ds = kvm_segment {
            selector: 0x2b,
            ..now.sregs.ds
        };
        let cs = kvm_segment {
            selector: 0x18,
            ..now.sregs.cs
        };
        assert_eq!((set.sregs.ds, set.sregs.cs), (ds, cs));
        assert_eq!(set.sregs.es, now.sregs.es);
    }

    #[test]
    fn in_real_mode_the_base_follows_the_selector() {
        let mut now = sample();
        now.sregs.cr0 = 0;
        let mut g = to_gdb(&now);
        g.segments.es = 0x1234;
        let set = from_gdb(&g, &now).unwrap_or_default();
        assert_eq!((set.sregs.es.selector, set.sregs.es.base), (0x1234, 0x12340));
        assert_eq!(set.sregs.es.limit, now.sregs.es.limit);
    }

    #[test]
    fn impossible_selectors_and_fpu_values_are_refused() {
        let now = sample();
        let refused = |f: &dyn Fn(&mut X86_64CoreRegs)| {
            let mut g = to_gdb(&now);
            f(&mut g);
            from_gdb(&g, &now)
        };
        use RegisterWriteError as E;
        assert_eq!(
            refused(&|g| g.segments.cs = 0xb),
            Err(E::PrivilegeLevel {
                seg: Segment::Cs,
                from: 0x8,
                to: 0xb
            })
        );
        assert!(matches!(
            refused(&|g| g.segments.ss = 0x13),
            Err(E::PrivilegeLevel { .. })
        ));
        assert_eq!(refused(&|g| g.segments.cs = 0), Err(E::Null { seg: Segment::Cs }));
        assert_eq!(
            refused(&|g| g.segments.gs = 0x1_0000),
            Err(E::SelectorWidth {
                seg: Segment::Gs,
                value: 0x1_0000
            })
        );
        // 64-bit code: a null ss is what the CPU has after a syscall.
        assert!(refused(&|g| g.segments.ss = 0).is_ok());
        assert!(refused(&|g| g.segments.ds = 0).is_ok());
        assert_eq!(
            refused(&|g| g.fpu.fop = 0x800),
            Err(E::FpuWidth {
                reg: "fop",
                value: 0x800,
                bits: 11
            })
        );
        assert!(matches!(refused(&|g| g.fpu.fctrl = 0x1_037f), Err(E::FpuWidth { .. })));
        assert!(matches!(refused(&|g| g.fpu.ftag = 0x1_0000), Err(E::FpuWidth { .. })));
        assert_eq!(
            refused(&|g| g.mxcsr = 0x1_1f80),
            Err(E::MxcsrReserved { value: 0x1_1f80 })
        );
        let mut compat = now;
        compat.sregs.cs.l = 0;
        let mut g = to_gdb(&compat);
        g.segments.ss = 0;
        assert_eq!(from_gdb(&g, &compat), Err(E::Null { seg: Segment::Ss }));
    }

    fn fake(v: &VcpuRegs) -> crate::fake::FakeVcpu {
        let f = crate::fake::FakeVcpu::new();
        f.put_regs(v.regs);
        f.put_sregs(v.sregs);
        f.put_fpu(v.fpu);
        f
    }

    fn held(f: &crate::fake::FakeVcpu) -> VcpuRegs {
        VcpuRegs {
            regs: f.regs(),
            sregs: f.sregs(),
            fpu: f.fpu(),
        }
    }

    /// rax, ds and xmm0 changed: one ioctl of each kind.
    fn changed(now: &VcpuRegs) -> VcpuRegs {
        let mut g = to_gdb(now);
        g.regs[0] = 0x77;
        g.segments.ds = 0x18;
        g.xmm[0] = 42;
        from_gdb(&g, now).unwrap_or(*now)
    }

    #[test]
    fn apply_writes_only_what_changed() {
        use crate::fake::Op;
        let now = sample();
        let f = fake(&now);
        let mut g = to_gdb(&now);
        g.xmm[1] = 7;
        let set = from_gdb(&g, &now).unwrap_or(now);
        assert!(apply(&f, &now, &set).is_ok());
        assert_eq!(f.calls(), [Op::SetFpu, Op::GetFpu]);
        assert_eq!(held(&f), set);
        let all = changed(&now);
        let f = fake(&now);
        assert!(apply(&f, &now, &all).is_ok());
        assert_eq!(held(&f), all);
    }

    #[test]
    fn a_failed_ioctl_puts_back_what_was_written() {
        use crate::fake::Op;
        let now = sample();
        let new = changed(&now);
        for op in [Op::SetRegs, Op::SetSregs, Op::GetSregs, Op::SetFpu, Op::GetFpu] {
            let f = fake(&now);
            f.fail_op(op, 1);
            let e = apply(&f, &now, &new);
            assert!(matches!(e, Err(ApplyError::Failed { .. })), "{op:?}: {e:?}");
            assert_eq!(held(&f), now, "{op:?}");
        }
    }

    #[test]
    fn a_failed_restore_is_reported_as_such() {
        use crate::fake::Op;
        let now = sample();
        let f = fake(&now);
        // The 4th call (SetRegs, SetSregs, GetSregs, SetFpu) fails, then
        // putting back rax (the second KVM_SET_REGS) fails too.
        f.fail_call(4);
        f.fail_op(Op::SetRegs, 2);
        assert!(matches!(
            apply(&f, &now, &changed(&now)),
            Err(ApplyError::Restore { op: "KVM_SET_REGS", .. })
        ));
    }

    #[test]
    fn mxcsr_is_refused_because_kvm_set_fpu_drops_it() {
        let now = sample();
        let f = fake(&now);
        let mut g = to_gdb(&now);
        g.mxcsr = 0x1f00;
        g.regs[0] = 0x55;
        let set = from_gdb(&g, &now).unwrap_or(now);
        assert!(matches!(
            apply(&f, &now, &set),
            Err(ApplyError::NotApplied { what: "mxcsr" })
        ));
        assert_eq!(held(&f), now);
    }
}
