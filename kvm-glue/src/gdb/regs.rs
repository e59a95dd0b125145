//! The register file kvm-glue serves GDB and LLDB ([`X86_64Vm`],
//! [`VmRegisters`]: gdbstub_arch's x86-64 SSE file — general, `rip`,
//! `eflags`, segment selectors, x87, SSE — plus nine registers a kernel
//! debugger needs) to and from what KVM holds ([`VcpuRegs`]), its target
//! description ([`target_xml`], every register listed), and a write that is
//! applied all together or not at all ([`apply`]).
//!
//! # What is read from where, and what is writable
//!
//! | GDB regnum | registers | KVM source | writable |
//! |---|---|---|---|
//! | 0–15 | `rax` `rbx` `rcx` `rdx` `rsi` `rdi` `rbp` `rsp` `r8`–`r15` | `KVM_GET_REGS` | yes (`KVM_SET_REGS`) |
//! | 16, 17 | `rip`, `eflags` (low 32 bits of RFLAGS) | `KVM_GET_REGS` | yes |
//! | 18–23 | `cs` `ss` `ds` `es` `fs` `gs` (selectors) | `KVM_GET_SREGS` | yes, with the rules below (`KVM_SET_SREGS`) |
//! | 24–39 | `st0`–`st7`, `fctrl` `fstat` `ftag` `fiseg` `fioff` `foseg` `fooff` `fop` | `KVM_GET_FPU` | yes (`KVM_SET_FPU`) |
//! | 40–55 | `xmm0`–`xmm15` | `KVM_GET_FPU` | yes (`KVM_SET_FPU`) |
//! | 56 | `mxcsr` | `KVM_GET_XSAVE` (FXSAVE legacy area, byte 24) | yes (`KVM_SET_XSAVE`), within MXCSR_MASK (byte 28) |
//! | 57, 58 | `fs_base`, `gs_base` | `KVM_GET_SREGS` (segment bases) | yes (`KVM_SET_SREGS`) |
//! | 59 | `k_gs_base` | `KVM_GET_MSRS` (IA32_KERNEL_GS_BASE, `0xc0000102`) | yes (`KVM_SET_MSRS`; KVM refuses a non-canonical address) |
//! | 60–64 | `cr0` `cr2` `cr3` `cr4` `cr8` | `KVM_GET_SREGS` | yes (`KVM_SET_SREGS`), as far as KVM takes the value: it refuses a CR0/CR4/EFER combination no CPU can be in (`EINVAL`, an error reply); `cr8` only lasts with an in-kernel LAPIC: without one, every `KVM_RUN` reloads CR8 from `kvm_run.cr8`, which is the VMM's |
//! | 65 | `efer` | `KVM_GET_SREGS` | as `cr0` |
//!
//! The `g` packet is these 66 registers in regnum order, 608 bytes; `p`/`P`
//! read and write one of them (a `P` is a `G` with one register changed:
//! the same checks, the same all-or-nothing write).
//!
//! # x87 and SSE
//! `KVM_GET_FPU`/`KVM_SET_FPU` carry the FXSAVE image but for MXCSR
//! (`kvm_arch_vcpu_ioctl_get_fpu` copies every FXSAVE field but that one,
//! into a zeroed struct: its `mxcsr` is always 0). MXCSR is read from and
//! written into the XSAVE image (`KVM_GET_XSAVE`/`KVM_SET_XSAVE`), whose
//! first 512 bytes are the FXSAVE legacy area (SDM vol. 1 §10.5.1, table
//! 10-2): MXCSR at byte 24, MXCSR_MASK at byte 28 (0 there means the SDM's
//! default, `0xffbf`). A value with a bit outside MXCSR_MASK is refused
//! (loading it faults, and `KVM_SET_XSAVE` refuses it too). `st0`–`st7` are its
//! eight 80-bit registers in stack order (the six bytes after each are
//! kept); `fctrl`, `fstat`, `fop` are FCW, FSW and FOP; `fioff`/`fiseg` are
//! the low and high halves of the 64-bit last instruction pointer and
//! `fooff`/`foseg` of the last operand pointer (GDB reads a 64-bit FXSAVE the
//! same way). FXSAVE keeps one bit per register for the tag (empty or not):
//! `ftag` is GDB's full tag word, computed from it and the registers'
//! contents as the CPU's `FSTENV` would; a written `ftag` sets only which
//! registers are empty. Values wider than the CPU's fields (`fctrl`, `fstat`,
//! `ftag` above 16 bits, `fop` above 11) are refused.
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

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::sync::OnceLock;

use gdbstub::arch::{Arch, RegId, Registers};
use gdbstub_arch::x86::reg::{X86SegmentRegs, X86_64CoreRegs, X87FpuInternalRegs, F80};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_xsave};

use crate::VcpuOps;

/// IA32_KERNEL_GS_BASE, the MSR `swapgs` exchanges with GS.base (SDM vol. 4,
/// table 2-2).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Byte offset of MXCSR in the XSAVE image's legacy area (SDM vol. 1 table 10-2).
const XSAVE_MXCSR: usize = 24;
/// Byte offset of MXCSR_MASK there.
const XSAVE_MXCSR_MASK: usize = 28;
/// Byte offset of XSTATE_BV (the XSAVE header's first word).
const XSAVE_XSTATE_BV: usize = 512;
/// XSTATE_BV bit 1: the SSE state (XMM registers and MXCSR) is in the image.
const XSTATE_SSE: u32 = 1 << 1;
/// The MXCSR_MASK to use when the image says 0 (SDM vol. 1 §11.6.6).
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;

/// The 32-bit word of the XSAVE image holding byte `offset`.
const fn word(offset: usize) -> usize {
    offset / 4
}

/// A vCPU's registers as KVM holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VcpuRegs {
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_FPU` (its `mxcsr` is not MXCSR: see [`VcpuRegs::mxcsr`]).
    pub fpu: kvm_fpu,
    /// MXCSR, from `KVM_GET_XSAVE`.
    pub mxcsr: u32,
    /// MXCSR_MASK from `KVM_GET_XSAVE` (0: the SDM's default `0xffbf`).
    pub mxcsr_mask: u32,
    /// IA32_KERNEL_GS_BASE, from `KVM_GET_MSRS`.
    pub k_gs_base: u64,
}

impl VcpuRegs {
    /// Reads them all from `ops`.
    ///
    /// # Errors
    /// The first ioctl that failed, and which one.
    pub fn read(ops: &dyn VcpuOps) -> Result<VcpuRegs, ApplyError> {
        let failed = |op| move |source| ApplyError::Failed { op, source };
        let xsave = ops.get_xsave().map_err(failed("KVM_GET_XSAVE"))?;
        Ok(VcpuRegs {
            regs: ops.get_regs().map_err(failed("KVM_GET_REGS"))?,
            sregs: ops.get_sregs().map_err(failed("KVM_GET_SREGS"))?,
            fpu: ops.get_fpu().map_err(failed("KVM_GET_FPU"))?,
            mxcsr: xsave.region[word(XSAVE_MXCSR)],
            mxcsr_mask: xsave.region[word(XSAVE_MXCSR_MASK)],
            k_gs_base: ops.get_msr(MSR_KERNEL_GS_BASE).map_err(failed("KVM_GET_MSRS"))?,
        })
    }

    /// The MXCSR bits a write may set.
    pub fn mxcsr_writable(&self) -> u32 {
        match self.mxcsr_mask {
            0 => MXCSR_MASK_DEFAULT,
            m => m,
        }
    }
}

/// The nine registers kvm-glue serves beyond gdbstub_arch's x86-64 SSE
/// file: regnums 57–65, in this order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysRegs {
    /// FS.base.
    pub fs_base: u64,
    /// GS.base.
    pub gs_base: u64,
    /// IA32_KERNEL_GS_BASE.
    pub k_gs_base: u64,
    /// CR0.
    pub cr0: u64,
    /// CR2 (the last page-fault address).
    pub cr2: u64,
    /// CR3 (the page-table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (the task-priority register).
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
}

impl SysRegs {
    fn to_array(self) -> [u64; 9] {
        [
            self.fs_base,
            self.gs_base,
            self.k_gs_base,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.cr8,
            self.efer,
        ]
    }

    fn from_array(a: [u64; 9]) -> SysRegs {
        let [fs_base, gs_base, k_gs_base, cr0, cr2, cr3, cr4, cr8, efer] = a;
        SysRegs {
            fs_base,
            gs_base,
            k_gs_base,
            cr0,
            cr2,
            cr3,
            cr4,
            cr8,
            efer,
        }
    }
}

/// What the `g` packet carries: gdbstub_arch's x86-64 SSE registers
/// (regnums 0–56, 536 bytes) then [`SysRegs`] (57–65, 72 bytes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmRegisters {
    /// `rax` … `mxcsr`, as gdbstub_arch lays them out.
    pub core: X86_64CoreRegs,
    /// `fs_base` … `efer`.
    pub sys: SysRegs,
}

/// Bytes of the core part of the `g` packet (gdbstub_arch's `X86_64CoreRegs`).
const CORE_BYTES: usize = 0x218;

impl Registers for VmRegisters {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for v in self.sys.to_array() {
            for b in v.to_le_bytes() {
                write_byte(Some(b));
            }
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        let (core, sys) = bytes.split_at_checked(CORE_BYTES).ok_or(())?;
        if sys.len() < 72 {
            return Err(());
        }
        let mut new = self.clone();
        new.core.gdb_deserialize(core)?;
        let mut a = [0u64; 9];
        for (v, chunk) in a.iter_mut().zip(sys.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(chunk);
            *v = u64::from_le_bytes(le);
        }
        new.sys = SysRegs::from_array(a);
        *self = new;
        Ok(())
    }
}

/// One register of the served file: GDB's regnum is its index in [`REGS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegInfo {
    /// The name GDB and LLDB know it by.
    pub name: &'static str,
    /// Its width in bits.
    pub bits: usize,
    /// The target-description type.
    pub ty: &'static str,
    /// The register group.
    pub group: &'static str,
    /// LLDB's `generic` role (`pc`, `sp`, `fp`, `flags`, `arg1`…), if any.
    pub generic: Option<&'static str>,
    /// The x86-64 DWARF register number (System V psABI table 3.36), if any.
    pub dwarf: Option<u32>,
    /// The target-description feature it belongs to.
    pub feature: &'static str,
}

const CORE: &str = "org.gnu.gdb.i386.core";
const SSE: &str = "org.gnu.gdb.i386.sse";
const SEGMENTS: &str = "org.gnu.gdb.i386.segments";
const SYS: &str = "org.gnu.gdb.i386.sys";

const fn reg(
    name: &'static str,
    bits: usize,
    ty: &'static str,
    group: &'static str,
    generic: Option<&'static str>,
    dwarf: Option<u32>,
    feature: &'static str,
) -> RegInfo {
    RegInfo {
        name,
        bits,
        ty,
        group,
        generic,
        dwarf,
        feature,
    }
}

const fn gpr(name: &'static str, ty: &'static str, generic: Option<&'static str>, dwarf: u32) -> RegInfo {
    reg(name, 64, ty, "general", generic, Some(dwarf), CORE)
}

const fn st_reg(name: &'static str, dwarf: u32) -> RegInfo {
    reg(name, 80, "i387_ext", "float", None, Some(dwarf), CORE)
}

const fn fpu_ctl(name: &'static str) -> RegInfo {
    reg(name, 32, "int", "float", None, None, CORE)
}

const fn xmm(name: &'static str, dwarf: u32) -> RegInfo {
    reg(name, 128, "vec128", "vector", None, Some(dwarf), SSE)
}

const fn sys(name: &'static str, feature: &'static str, dwarf: Option<u32>) -> RegInfo {
    reg(name, 64, "int64", "system", None, dwarf, feature)
}

/// Every register served, in regnum (and `g` packet) order.
pub const REGS: [RegInfo; 66] = [
    gpr("rax", "int64", None, 0),
    gpr("rbx", "int64", None, 3),
    gpr("rcx", "int64", Some("arg4"), 2),
    gpr("rdx", "int64", Some("arg3"), 1),
    gpr("rsi", "int64", Some("arg2"), 4),
    gpr("rdi", "int64", Some("arg1"), 5),
    gpr("rbp", "data_ptr", Some("fp"), 6),
    gpr("rsp", "data_ptr", Some("sp"), 7),
    gpr("r8", "int64", Some("arg5"), 8),
    gpr("r9", "int64", Some("arg6"), 9),
    gpr("r10", "int64", None, 10),
    gpr("r11", "int64", None, 11),
    gpr("r12", "int64", None, 12),
    gpr("r13", "int64", None, 13),
    gpr("r14", "int64", None, 14),
    gpr("r15", "int64", None, 15),
    gpr("rip", "code_ptr", Some("pc"), 16),
    reg("eflags", 32, "i386_eflags", "general", Some("flags"), Some(49), CORE),
    reg("cs", 32, "int32", "general", None, Some(51), CORE),
    reg("ss", 32, "int32", "general", None, Some(52), CORE),
    reg("ds", 32, "int32", "general", None, Some(53), CORE),
    reg("es", 32, "int32", "general", None, Some(50), CORE),
    reg("fs", 32, "int32", "general", None, Some(54), CORE),
    reg("gs", 32, "int32", "general", None, Some(55), CORE),
    st_reg("st0", 33),
    st_reg("st1", 34),
    st_reg("st2", 35),
    st_reg("st3", 36),
    st_reg("st4", 37),
    st_reg("st5", 38),
    st_reg("st6", 39),
    st_reg("st7", 40),
    fpu_ctl("fctrl"),
    fpu_ctl("fstat"),
    fpu_ctl("ftag"),
    fpu_ctl("fiseg"),
    fpu_ctl("fioff"),
    fpu_ctl("foseg"),
    fpu_ctl("fooff"),
    fpu_ctl("fop"),
    xmm("xmm0", 17),
    xmm("xmm1", 18),
    xmm("xmm2", 19),
    xmm("xmm3", 20),
    xmm("xmm4", 21),
    xmm("xmm5", 22),
    xmm("xmm6", 23),
    xmm("xmm7", 24),
    xmm("xmm8", 25),
    xmm("xmm9", 26),
    xmm("xmm10", 27),
    xmm("xmm11", 28),
    xmm("xmm12", 29),
    xmm("xmm13", 30),
    xmm("xmm14", 31),
    xmm("xmm15", 32),
    reg("mxcsr", 32, "i386_mxcsr", "vector", None, Some(64), SSE),
    sys("fs_base", SEGMENTS, Some(58)),
    sys("gs_base", SEGMENTS, Some(59)),
    sys("k_gs_base", SYS, None),
    sys("cr0", SYS, None),
    sys("cr2", SYS, None),
    sys("cr3", SYS, None),
    sys("cr4", SYS, None),
    sys("cr8", SYS, None),
    sys("efer", SYS, None),
];

/// Byte offset of register `regnum` in the `g` packet.
pub fn offset(regnum: usize) -> usize {
    REGS.iter().take(regnum).map(|r| r.bits / 8).sum()
}

/// Bytes in a `g` packet.
pub fn g_bytes() -> usize {
    offset(REGS.len())
}

/// The x86-64 architecture kvm-glue serves: [`VmRegisters`], register ids
/// by regnum ([`VmRegId`]), and a target description that lists every
/// register ([`target_xml`]).
#[derive(Debug)]
pub enum X86_64Vm {}

impl Arch for X86_64Vm {
    type Usize = u64;
    type Registers = VmRegisters;
    type BreakpointKind = usize;
    type RegId = VmRegId;

    fn target_description_xml() -> Option<&'static str> {
        Some(target_xml())
    }
}

/// A register by GDB regnum (an index into [`REGS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmRegId(pub usize);

impl RegId for VmRegId {
    fn from_raw_id(id: usize) -> Option<(VmRegId, Option<NonZeroUsize>)> {
        let info = REGS.get(id)?;
        Some((VmRegId(id), NonZeroUsize::new(info.bits / 8)))
    }

    fn to_raw_id(&self) -> Option<usize> {
        Some(self.0)
    }
}

/// The target description (`target.xml`): every register with its regnum,
/// byte offset in the `g` packet, width, type and group, and LLDB's
/// `generic` role and DWARF number; the types GDB's own x86-64 features
/// define (`i386_eflags`, `i386_mxcsr`, `vec128`) defined here too, so that
/// the description stands alone.
pub fn target_xml() -> &'static str {
    static XML: OnceLock<String> = OnceLock::new();
    XML.get_or_init(build_target_xml)
}

const EFLAGS_FIELDS: [(&str, u32); 17] = [
    ("CF", 0),
    ("", 1),
    ("PF", 2),
    ("AF", 4),
    ("ZF", 6),
    ("SF", 7),
    ("TF", 8),
    ("IF", 9),
    ("DF", 10),
    ("OF", 11),
    ("NT", 14),
    ("RF", 16),
    ("VM", 17),
    ("AC", 18),
    ("VIF", 19),
    ("VIP", 20),
    ("ID", 21),
];

const MXCSR_FIELDS: [(&str, u32); 14] = [
    ("IE", 0),
    ("DE", 1),
    ("ZE", 2),
    ("OE", 3),
    ("UE", 4),
    ("PE", 5),
    ("DAZ", 6),
    ("IM", 7),
    ("DM", 8),
    ("ZM", 9),
    ("OM", 10),
    ("UM", 11),
    ("PM", 12),
    ("FZ", 15),
];

fn flags(out: &mut String, id: &str, fields: &[(&str, u32)]) {
    let _ = write!(out, "<flags id=\"{id}\" size=\"4\">");
    for (name, bit) in fields {
        let _ = write!(out, "<field name=\"{name}\" start=\"{bit}\" end=\"{bit}\"/>");
    }
    out.push_str("</flags>");
}

fn build_target_xml() -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\"?><!DOCTYPE target SYSTEM \"gdb-target.dtd\">\
         <target version=\"1.0\"><architecture>i386:x86-64</architecture>",
    );
    let mut feature = "";
    for (n, r) in REGS.iter().enumerate() {
        if r.feature != feature {
            if !feature.is_empty() {
                x.push_str("</feature>");
            }
            feature = r.feature;
            let _ = write!(x, "<feature name=\"{feature}\">");
            if feature == CORE {
                flags(&mut x, "i386_eflags", &EFLAGS_FIELDS);
            }
            if feature == SSE {
                x.push_str(concat!(
                    "<vector id=\"v8bf16\" type=\"bfloat16\" count=\"8\"/>",
                    "<vector id=\"v4f\" type=\"ieee_single\" count=\"4\"/>",
                    "<vector id=\"v2d\" type=\"ieee_double\" count=\"2\"/>",
                    "<vector id=\"v16i8\" type=\"int8\" count=\"16\"/>",
                    "<vector id=\"v8i16\" type=\"int16\" count=\"8\"/>",
                    "<vector id=\"v4i32\" type=\"int32\" count=\"4\"/>",
                    "<vector id=\"v2i64\" type=\"int64\" count=\"2\"/>",
                    "<union id=\"vec128\">",
                    "<field name=\"v8_bfloat16\" type=\"v8bf16\"/>",
                    "<field name=\"v4_float\" type=\"v4f\"/>",
                    "<field name=\"v2_double\" type=\"v2d\"/>",
                    "<field name=\"v16_int8\" type=\"v16i8\"/>",
                    "<field name=\"v8_int16\" type=\"v8i16\"/>",
                    "<field name=\"v4_int32\" type=\"v4i32\"/>",
                    "<field name=\"v2_int64\" type=\"v2i64\"/>",
                    "<field name=\"uint128\" type=\"uint128\"/>",
                    "</union>",
                ));
                flags(&mut x, "i386_mxcsr", &MXCSR_FIELDS);
            }
        }
        let _ = write!(
            x,
            "<reg name=\"{}\" regnum=\"{n}\" offset=\"{}\" bitsize=\"{}\" type=\"{}\" group=\"{}\"",
            r.name,
            offset(n),
            r.bits,
            r.ty,
            r.group
        );
        if let Some(g) = r.generic {
            let _ = write!(x, " generic=\"{g}\"");
        }
        if let Some(d) = r.dwarf {
            let _ = write!(x, " dwarf_regnum=\"{d}\" ehframe_regnum=\"{d}\"");
        }
        x.push_str("/>");
    }
    x.push_str("</feature></target>");
    x
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
    /// A bit MXCSR_MASK says is reserved (loading it faults).
    #[error("mxcsr: {value:#x} sets bits outside MXCSR_MASK {mask:#x}")]
    MxcsrReserved {
        /// What GDB wrote.
        value: u32,
        /// The bits this CPU has.
        mask: u32,
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
pub fn to_gdb(v: &VcpuRegs) -> VmRegisters {
    let (regs, sregs, fpu) = (&v.regs, &v.sregs, &v.fpu);
    let core = X86_64CoreRegs {
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
        mxcsr: v.mxcsr,
    };
    let sys = SysRegs {
        fs_base: sregs.fs.base,
        gs_base: sregs.gs.base,
        k_gs_base: v.k_gs_base,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        cr8: sregs.cr8,
        efer: sregs.efer,
    };
    VmRegisters { core, sys }
}

fn narrow(reg: &'static str, value: u32, bits: u32) -> Result<u16, RegisterWriteError> {
    if value >> bits != 0 {
        return Err(RegisterWriteError::FpuWidth { reg, value, bits });
    }
    // bits <= 16: the check above makes this lossless.
    Ok(value as u16)
}

/// The x87/SSE state for GDB's values, given the current one (MXCSR is
/// not in it: see [`VcpuRegs::mxcsr`]).
fn fpu_from_gdb(new: &X86_64CoreRegs, now: &kvm_fpu) -> Result<kvm_fpu, RegisterWriteError> {
    let f = &new.fpu;
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
pub fn from_gdb(new: &VmRegisters, now: &VcpuRegs) -> Result<VcpuRegs, RegisterWriteError> {
    let (sys, new) = (&new.sys, &new.core);
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
    // A base GDB changed wins over the one a real-mode selector write implies.
    if sys.fs_base != old.fs.base {
        sregs.fs.base = sys.fs_base;
    }
    if sys.gs_base != old.gs.base {
        sregs.gs.base = sys.gs_base;
    }
    (sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer) =
        (sys.cr0, sys.cr2, sys.cr3, sys.cr4, sys.cr8, sys.efer);
    let fpu = fpu_from_gdb(new, &now.fpu)?;
    if new.mxcsr & !now.mxcsr_writable() != 0 {
        return Err(RegisterWriteError::MxcsrReserved {
            value: new.mxcsr,
            mask: now.mxcsr_writable(),
        });
    }
    Ok(VcpuRegs {
        regs,
        sregs,
        fpu,
        mxcsr: new.mxcsr,
        mxcsr_mask: now.mxcsr_mask,
        k_gs_base: sys.k_gs_base,
    })
}

/// What GDB sees of the x87/SSE state in `kvm_fpu`: the part a read back
/// must match.
fn fpu_seen(f: &kvm_fpu) -> X86_64CoreRegs {
    to_gdb(&VcpuRegs {
        fpu: *f,
        ..VcpuRegs::default()
    })
    .core
}

/// The part of `kvm_sregs` a GDB write changes: the segments' selectors and
/// bases, the control registers and EFER.
fn sregs_seen(s: &kvm_sregs) -> ([(u16, u64); 6], [u64; 6]) {
    (
        [s.cs, s.ss, s.ds, s.es, s.fs, s.gs].map(|seg| (seg.selector, seg.base)),
        [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer],
    )
}

/// `xsave` with MXCSR set to `mxcsr` and the SSE state marked present (so
/// that the kernel takes MXCSR from the image rather than its init value).
fn with_mxcsr(xsave: &kvm_xsave, mxcsr: u32) -> kvm_xsave {
    let mut x = kvm_xsave {
        region: xsave.region,
        ..Default::default()
    };
    x.region[word(XSAVE_MXCSR)] = mxcsr;
    x.region[word(XSAVE_XSTATE_BV)] |= XSTATE_SSE;
    x
}

/// Writes `new` over `now` (what [`VcpuRegs::read`] returned on this vCPU):
/// only the parts that differ, each ioctl once, then reads back what KVM may
/// silently drop or adjust (segments, control registers, the x87/SSE
/// state, MXCSR, the MSR). On any failure every part already written is put
/// back as it was.
///
/// # Errors
/// [`ApplyError::Failed`] / [`ApplyError::NotApplied`]: nothing changed;
/// [`ApplyError::Restore`]: putting back failed, the registers are in doubt.
pub fn apply(ops: &dyn VcpuOps, now: &VcpuRegs, new: &VcpuRegs) -> Result<(), ApplyError> {
    let regs = new.regs != now.regs;
    let sregs = new.sregs != now.sregs;
    let fpu = new.fpu != now.fpu;
    let mxcsr = new.mxcsr != now.mxcsr;
    let msr = new.k_gs_base != now.k_gs_base;
    // The XSAVE image as it was before MXCSR was written (after the FPU
    // write: it holds that, which putting back the FPU undoes).
    let mut xsave_before: Option<kvm_xsave> = None;
    let outcome = (|| {
        let failed = |op| move |source| ApplyError::Failed { op, source };
        if regs {
            ops.set_regs(&new.regs).map_err(failed("KVM_SET_REGS"))?;
        }
        if sregs {
            ops.set_sregs(&new.sregs).map_err(failed("KVM_SET_SREGS"))?;
            let back = ops.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
            let (seg_back, ctl_back) = sregs_seen(&back);
            let (seg_want, ctl_want) = sregs_seen(&new.sregs);
            if seg_back != seg_want {
                return Err(ApplyError::NotApplied {
                    what: "the segment selectors and bases",
                });
            }
            if ctl_back != ctl_want {
                return Err(ApplyError::NotApplied {
                    what: "the control registers and EFER",
                });
            }
        }
        if fpu {
            // KVM_SET_FPU writes the legacy area but leaves XSTATE_BV as the
            // last XSAVE left it: a component it marks in its init state
            // (XMM registers a guest never used) comes back as zeros at the
            // next entry, and the write is lost (gdb_e2e's x87/SSE scenario
            // saw xmm0 read 0 after a `stepi`, about one run in five).
            // Through KVM_SET_XSAVE the header says both are present.
            ops.set_fpu(&new.fpu).map_err(failed("KVM_SET_FPU"))?;
            if let Ok(before) = ops.get_xsave() {
                ops.set_xsave(&crate::vcpu::xsave_with_fpu(&before, &new.fpu))
                    .map_err(failed("KVM_SET_XSAVE"))?;
                xsave_before = Some(before);
            }
            let back = fpu_seen(&ops.get_fpu().map_err(failed("KVM_GET_FPU"))?);
            if back != fpu_seen(&new.fpu) {
                return Err(ApplyError::NotApplied {
                    what: "the x87/SSE registers",
                });
            }
        }
        if mxcsr {
            let before = ops.get_xsave().map_err(failed("KVM_GET_XSAVE"))?;
            let set = with_mxcsr(&before, new.mxcsr);
            // The image before this call's first XSAVE write is the one to
            // put back.
            xsave_before.get_or_insert(before);
            ops.set_xsave(&set).map_err(failed("KVM_SET_XSAVE"))?;
            let back = ops.get_xsave().map_err(failed("KVM_GET_XSAVE"))?;
            if back.region[word(XSAVE_MXCSR)] != new.mxcsr {
                return Err(ApplyError::NotApplied { what: "mxcsr" });
            }
        }
        if msr {
            ops.set_msr(MSR_KERNEL_GS_BASE, new.k_gs_base)
                .map_err(failed("KVM_SET_MSRS"))?;
            if ops.get_msr(MSR_KERNEL_GS_BASE).map_err(failed("KVM_GET_MSRS"))? != new.k_gs_base {
                return Err(ApplyError::NotApplied { what: "k_gs_base" });
            }
        }
        Ok(())
    })();
    let Err(e) = outcome else { return Ok(()) };
    // Put back everything that may have been written, last first. A part
    // whose ioctl failed may have been written too (KVM_SET_SREGS can fail
    // half-way): it is restored like the others.
    let restore = |op| move |source| ApplyError::Restore { op, source };
    if msr {
        ops.set_msr(MSR_KERNEL_GS_BASE, now.k_gs_base)
            .map_err(restore("KVM_SET_MSRS"))?;
    }
    if let Some(before) = &xsave_before {
        ops.set_xsave(before).map_err(restore("KVM_SET_XSAVE"))?;
    }
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

    /// SDM Vol. 1 §10.5.1 Table 10-2 (64-bit FXSAVE layout), by hand: what
    /// a debugger writes lands at these bytes, XSTATE_BV (byte 512) gets
    /// bits 0 (x87) and 1 (SSE), and MXCSR and the rest stay as they were.
    #[test]
    fn an_fpu_write_goes_into_the_fxsave_area_with_x87_and_sse_marked_present() {
        let mut before = kvm_xsave::default();
        before.region[6] = 0x1f80; // MXCSR, byte 24
        before.region[7] = 0xffff; // MXCSR_MASK, byte 28
        before.region[128] = 0b100; // XSTATE_BV: AVX only
        before.region[200] = 0xdead_beef; // beyond the legacy area and header
        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x3800,
            ftwx: 0x80,
            last_opcode: 0x07ff,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            ..Default::default()
        };
        fpu.fpr[7] = [0xa5; 16];
        fpu.xmm[0] = 42u128.to_le_bytes();
        fpu.xmm[15] = [0x5a; 16];
        let x = crate::vcpu::xsave_with_fpu(&before, &fpu);
        let b: Vec<u8> = x.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&b[0..8], &[0x7f, 0x03, 0x00, 0x38, 0x80, 0x00, 0xff, 0x07]);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        assert_eq!(
            &b[24..32],
            &[0x80, 0x1f, 0, 0, 0xff, 0xff, 0, 0],
            "MXCSR and its mask kept"
        );
        assert_eq!(&b[32 + 7 * 16..32 + 8 * 16], &[0xa5; 16], "st7 at byte 144");
        assert_eq!(&b[160..176], &42u128.to_le_bytes(), "xmm0 at byte 160");
        assert_eq!(&b[400..416], &[0x5a; 16], "xmm15 at byte 400");
        assert_eq!(x.region[128], 0b111, "XSTATE_BV: x87 and SSE added, AVX kept");
        assert_eq!(x.region[200], 0xdead_beef);
    }

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
            ..Default::default()
        };
        fpu.fpr[0][..10].copy_from_slice(&ONE_AND_A_HALF);
        fpu.fpr[0][10..].copy_from_slice(&[0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6]);
        fpu.xmm[15] = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100u128.to_le_bytes();
        VcpuRegs {
            regs,
            sregs,
            fpu,
            mxcsr: 0x1f80,
            mxcsr_mask: 0xffff,
            k_gs_base: 0xffff_8880_0000_1000,
        }
    }

    #[test]
    fn gdb_order_puts_rbp_before_rsp() {
        let g = to_gdb(&sample());
        assert_eq!(&g.core.regs[..8], &[1, 2, 3, 4, 5, 6, 8, 7]);
        assert_eq!((g.core.regs[8], g.core.regs[15]), (9, 16));
        assert_eq!((g.core.rip, g.core.eflags), (0x1000, 0x246));
        assert_eq!((g.core.segments.cs, g.core.segments.ss), (0x8, 0x10));
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
        assert_eq!(g.core.st[0], ONE_AND_A_HALF);
        assert_eq!(g.core.st[1], [0; 10]);
        assert_eq!(
            (g.core.fpu.fctrl, g.core.fpu.fstat, g.core.fpu.fop),
            (0x37f, 0x3800, 0x7ff)
        );
        // Physical 7 valid (00), the other seven empty (11).
        assert_eq!(g.core.fpu.ftag, 0x3fff);
        assert_eq!((g.core.fpu.fiseg, g.core.fpu.fioff), (0x1122_3344, 0x5566_7788));
        assert_eq!((g.core.fpu.foseg, g.core.fpu.fooff), (0x99aa_bbcc, 0xddee_ff00));
        assert_eq!(g.core.xmm[15], 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100);
        assert_eq!(g.core.mxcsr, 0x1f80);
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
        g.core.regs[7] = 0x9000; // rsp
        g.core.eflags = 0x202;
        g.core.xmm[0] = 42;
        g.core.st[0] = [0; 10];
        g.core.fpu.fioff = 0xdead;
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
        g.core.segments.ds = 0x2b;
        g.core.segments.cs = 0x18;
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
        g.core.segments.es = 0x1234;
        let set = from_gdb(&g, &now).unwrap_or_default();
        assert_eq!((set.sregs.es.selector, set.sregs.es.base), (0x1234, 0x12340));
        assert_eq!(set.sregs.es.limit, now.sregs.es.limit);
    }

    #[test]
    fn impossible_selectors_and_fpu_values_are_refused() {
        let now = sample();
        let refused = |f: &dyn Fn(&mut VmRegisters)| {
            let mut g = to_gdb(&now);
            f(&mut g);
            from_gdb(&g, &now)
        };
        use RegisterWriteError as E;
        assert_eq!(
            refused(&|g| g.core.segments.cs = 0xb),
            Err(E::PrivilegeLevel {
                seg: Segment::Cs,
                from: 0x8,
                to: 0xb
            })
        );
        assert!(matches!(
            refused(&|g| g.core.segments.ss = 0x13),
            Err(E::PrivilegeLevel { .. })
        ));
        assert_eq!(refused(&|g| g.core.segments.cs = 0), Err(E::Null { seg: Segment::Cs }));
        assert_eq!(
            refused(&|g| g.core.segments.gs = 0x1_0000),
            Err(E::SelectorWidth {
                seg: Segment::Gs,
                value: 0x1_0000
            })
        );
        // 64-bit code: a null ss is what the CPU has after a syscall.
        assert!(refused(&|g| g.core.segments.ss = 0).is_ok());
        assert!(refused(&|g| g.core.segments.ds = 0).is_ok());
        assert_eq!(
            refused(&|g| g.core.fpu.fop = 0x800),
            Err(E::FpuWidth {
                reg: "fop",
                value: 0x800,
                bits: 11
            })
        );
        assert!(matches!(
            refused(&|g| g.core.fpu.fctrl = 0x1_037f),
            Err(E::FpuWidth { .. })
        ));
        assert!(matches!(
            refused(&|g| g.core.fpu.ftag = 0x1_0000),
            Err(E::FpuWidth { .. })
        ));
        assert_eq!(
            refused(&|g| g.core.mxcsr = 0x1_1f80),
            Err(E::MxcsrReserved {
                value: 0x1_1f80,
                mask: 0xffff
            })
        );
        let mut compat = now;
        compat.sregs.cs.l = 0;
        let mut g = to_gdb(&compat);
        g.core.segments.ss = 0;
        assert_eq!(from_gdb(&g, &compat), Err(E::Null { seg: Segment::Ss }));
    }

    fn fake(v: &VcpuRegs) -> crate::fake::FakeVcpu {
        let f = crate::fake::FakeVcpu::new();
        f.put_regs(v.regs);
        f.put_sregs(v.sregs);
        f.put_fpu(kvm_fpu {
            mxcsr: v.mxcsr,
            ..v.fpu
        });
        f.put_mxcsr_mask(v.mxcsr_mask);
        f.put_msr(MSR_KERNEL_GS_BASE, v.k_gs_base);
        f
    }

    fn held(f: &crate::fake::FakeVcpu) -> VcpuRegs {
        VcpuRegs {
            regs: f.regs(),
            sregs: f.sregs(),
            fpu: kvm_fpu { mxcsr: 0, ..f.fpu() },
            mxcsr: f.fpu().mxcsr,
            mxcsr_mask: 0xffff,
            k_gs_base: f.msr(MSR_KERNEL_GS_BASE).unwrap_or(0),
        }
    }

    /// rax, ds and xmm0 changed: one ioctl of each kind.
    fn changed(now: &VcpuRegs) -> VcpuRegs {
        let mut g = to_gdb(now);
        g.core.regs[0] = 0x77;
        g.core.segments.ds = 0x18;
        g.core.xmm[0] = 42;
        from_gdb(&g, now).unwrap_or(*now)
    }

    #[test]
    fn apply_writes_only_what_changed() {
        use crate::fake::Op;
        let now = sample();
        let f = fake(&now);
        let mut g = to_gdb(&now);
        g.core.xmm[1] = 7;
        let set = from_gdb(&g, &now).unwrap_or(now);
        assert!(apply(&f, &now, &set).is_ok());
        assert_eq!(f.calls(), [Op::SetFpu, Op::GetXsave, Op::SetXsave, Op::GetFpu]);
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
        for op in [
            Op::SetRegs,
            Op::SetSregs,
            Op::GetSregs,
            Op::SetFpu,
            Op::SetXsave,
            Op::GetFpu,
        ] {
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
    fn mxcsr_is_read_from_xsave_because_kvm_get_fpu_reports_zero() {
        let now = sample();
        let f = fake(&now);
        // What KVM_GET_FPU says (the fake, like the kernel, leaves it 0).
        assert_eq!(f.get_fpu().map(|fpu| fpu.mxcsr).ok(), Some(0));
        let read = VcpuRegs::read(&f).expect("read");
        assert_eq!((read.mxcsr, read.mxcsr_mask), (0x1f80, 0xffff));
        assert_eq!(to_gdb(&read).core.mxcsr, 0x1f80);
    }

    #[test]
    fn mxcsr_is_written_through_xsave_and_nothing_else_changes() {
        use crate::fake::Op;
        let now = sample();
        let f = fake(&now);
        let mut g = to_gdb(&now);
        g.core.mxcsr = 0x1f00; // all exceptions but PM unmasked... a plain value
        let set = from_gdb(&g, &now).expect("a value within MXCSR_MASK");
        assert!(apply(&f, &now, &set).is_ok());
        assert_eq!(f.calls(), [Op::GetXsave, Op::SetXsave, Op::GetXsave]);
        assert_eq!(f.fpu().mxcsr, 0x1f00);
        assert_eq!(held(&f), VcpuRegs { mxcsr: 0x1f00, ..now });
    }

    #[test]
    fn mxcsr_bits_outside_mxcsr_mask_are_refused() {
        let mut now = sample();
        // An older CPU: MXCSR_MASK 0 means 0xffbf, DAZ (bit 6) reserved.
        now.mxcsr_mask = 0;
        let mut g = to_gdb(&now);
        g.core.mxcsr = 0x1f80 | 0x40;
        assert_eq!(
            from_gdb(&g, &now),
            Err(RegisterWriteError::MxcsrReserved {
                value: 0x1fc0,
                mask: 0xffbf
            })
        );
        now.mxcsr_mask = 0xffff;
        assert!(from_gdb(&g, &now).is_ok());
    }

    #[test]
    fn a_failed_mxcsr_or_msr_write_puts_back_everything() {
        use crate::fake::Op;
        let now = sample();
        let mut g = to_gdb(&now);
        g.core.regs[0] = 0x99;
        g.core.xmm[3] = 5;
        g.core.mxcsr = 0x1f00;
        g.sys.k_gs_base = 0xffff_8880_0000_2000;
        let new = from_gdb(&g, &now).expect("valid");
        for op in [Op::SetXsave, Op::SetMsr] {
            let f = fake(&now);
            f.fail_op(op, 1);
            assert!(
                matches!(apply(&f, &now, &new), Err(ApplyError::Failed { .. })),
                "{op:?}"
            );
            assert_eq!(held(&f), now, "{op:?}");
        }
        let f = fake(&now);
        assert!(apply(&f, &now, &new).is_ok());
        assert_eq!(held(&f), new);
    }

    #[test]
    fn system_registers_come_from_sregs_and_the_kernel_gs_base_msr() {
        let mut now = sample();
        now.sregs.cr2 = 0xdead_b000;
        now.sregs.cr3 = 0x0010_0000;
        now.sregs.cr4 = 0x20;
        now.sregs.cr8 = 0x3;
        now.sregs.efer = 0x500;
        now.sregs.gs.base = 0xffff_8880_1234_0000;
        let g = to_gdb(&now);
        assert_eq!(
            g.sys,
            SysRegs {
                fs_base: 0x1234_0000,
                gs_base: 0xffff_8880_1234_0000,
                k_gs_base: 0xffff_8880_0000_1000,
                cr0: 0x8000_0011,
                cr2: 0xdead_b000,
                cr3: 0x0010_0000,
                cr4: 0x20,
                cr8: 0x3,
                efer: 0x500,
            }
        );
        let mut w = g.clone();
        w.sys.cr3 = 0x0020_0000;
        w.sys.fs_base = 0x7000;
        w.sys.k_gs_base = 0x8000;
        let set = from_gdb(&w, &now).expect("valid");
        assert_eq!(
            (set.sregs.cr3, set.sregs.fs.base, set.k_gs_base),
            (0x0020_0000, 0x7000, 0x8000)
        );
        // The rest of fs stays (selector, limit, attributes).
        assert_eq!(set.sregs.fs.selector, now.sregs.fs.selector);
        assert_eq!(set.sregs.fs.limit, now.sregs.fs.limit);
        let f = fake(&now);
        assert!(apply(&f, &now, &set).is_ok());
        assert_eq!(held(&f), set);
    }

    /// Offsets by hand from gdb's amd64 layout (8-byte GPRs and rip, 4-byte
    /// eflags and selectors, 10-byte st, 4-byte x87 control, 16-byte xmm,
    /// 4-byte mxcsr) and then nine 8-byte system registers.
    #[test]
    fn the_g_packet_is_608_bytes_in_regnum_order() {
        let at = |name: &str| REGS.iter().position(|r| r.name == name).map(offset);
        assert_eq!(at("rip"), Some(128));
        assert_eq!(at("eflags"), Some(136));
        assert_eq!(at("cs"), Some(140));
        assert_eq!(at("st0"), Some(164));
        assert_eq!(at("fctrl"), Some(244));
        assert_eq!(at("xmm0"), Some(276));
        assert_eq!(at("mxcsr"), Some(532));
        assert_eq!(at("fs_base"), Some(536));
        assert_eq!(at("efer"), Some(600));
        assert_eq!(g_bytes(), 608);
        let mut bytes = Vec::new();
        let mut v = VmRegisters::default();
        v.core.mxcsr = 0x1f80;
        v.sys.efer = 0xd01;
        v.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        assert_eq!(bytes.len(), 608);
        assert_eq!(&bytes[532..536], &0x1f80u32.to_le_bytes());
        assert_eq!(&bytes[600..608], &0xd01u64.to_le_bytes());
        let mut back = VmRegisters::default();
        assert_eq!(back.gdb_deserialize(&bytes), Ok(()));
        assert_eq!(back, v);
        // A short G packet changes nothing.
        assert_eq!(back.gdb_deserialize(&bytes[..600]), Err(()));
        assert_eq!(back, v);
    }
}
