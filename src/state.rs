//! [`DebugState`]: one VM's breakpoints, watchpoints and single-step flag,
//! with the seed's API (insert/remove by GDB type, remove-all, single-step,
//! "the `kvm_guest_debug` for a vCPU").

use crate::gdb::UnknownBreakpointType;
use crate::hw::{HwBreakpoint, HwError, HwSlots};
use crate::sw::{self, ByteMemory, RemoveAll, SwBreakpoints, SwError};
use crate::{decode, Applied, BreakpointType, ControlFlags, DebugExit, Decision, DecodeError, GuestDebug, Slot};

/// Why a [`DebugState`] operation failed. `E` is the guest memory's error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BreakpointError<E> {
    /// A hardware slot operation was refused.
    #[error(transparent)]
    Hw(#[from] HwError),
    /// A software breakpoint operation failed.
    #[error(transparent)]
    Sw(#[from] SwError<E>),
    /// A GDB type number outside `0..=4` (the seed's `-ENOSYS`).
    #[error(transparent)]
    UnknownType(#[from] UnknownBreakpointType),
}

/// What a successful insert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Inserted {
    /// A software breakpoint was patched in or counted.
    Software(sw::SwInserted),
    /// A hardware breakpoint went into this slot.
    Hardware(Slot),
}

/// What a successful remove did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Removed {
    /// A software breakpoint was counted down, restored, or found overwritten.
    Software(sw::SwRemoved),
    /// A hardware breakpoint left this slot (the last slot moved into it).
    Hardware(Slot),
}

/// One VM's debug state. A value, not a global: two VMs never share slots
/// (the seed kept the hardware table in file-static variables).
///
/// ```
/// use x86_debugreg::{BreakpointType, ControlFlags, DebugState};
/// # use x86_debugreg::sw::ByteMemory;
/// # struct Ram(Vec<u8>);
/// # impl ByteMemory for Ram {
/// #     type Error = ();
/// #     fn read_byte(&mut self, a: u64) -> Result<u8, ()> { self.0.get(a as usize).copied().ok_or(()) }
/// #     fn write_byte(&mut self, a: u64, v: u8) -> Result<(), ()> { *self.0.get_mut(a as usize).ok_or(())? = v; Ok(()) }
/// # }
/// let mut ram = Ram(vec![0x90; 0x100]);
/// let mut state = DebugState::new();
/// state.insert(&mut ram, BreakpointType::Hardware, 0x40, 1)?;
/// state.insert(&mut ram, BreakpointType::WriteWatch, 0x80, 8)?;
/// state.insert(&mut ram, BreakpointType::Software, 0x10, 1)?;
/// let dbg = state.guest_debug();
/// assert_eq!(dbg.control, ControlFlags::ENABLE | ControlFlags::USE_SW_BP | ControlFlags::USE_HW_BP);
/// assert_eq!(dbg.debugreg[..2], [0x40, 0x80]);
/// assert_eq!(dbg.debugreg[7], 0x600 | 0b10 | 0b1000 | 0b01 << 20 | 0b10 << 22);
/// assert_eq!(ram.0[0x10], 0xcc);
/// # Ok::<(), x86_debugreg::BreakpointError<()>>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DebugState {
    hw: HwSlots,
    sw: SwBreakpoints,
    single_step: bool,
}

impl DebugState {
    /// Nothing set, single-step off.
    pub const fn new() -> DebugState {
        DebugState {
            hw: HwSlots::new(),
            sw: SwBreakpoints::new(),
            single_step: false,
        }
    }

    /// The hardware slots.
    pub fn hw(&self) -> &HwSlots {
        &self.hw
    }

    /// The software-breakpoint table.
    pub fn sw(&self) -> &SwBreakpoints {
        &self.sw
    }

    /// See [`SwBreakpoints::replace_saved`]: a debugger's write over the
    /// software breakpoint at `addr` keeps the `int3` and updates the byte
    /// it will restore.
    pub fn replace_saved(&mut self, addr: u64, byte: u8) -> Option<u8> {
        self.sw.replace_saved(addr, byte)
    }

    /// Test support (feature `reference`): the software-breakpoint table,
    /// mutable (see [`SwBreakpoints::set_count_for_testing`]).
    #[cfg(feature = "reference")]
    #[doc(hidden)]
    pub fn sw_mut_for_testing(&mut self) -> &mut SwBreakpoints {
        &mut self.sw
    }

    /// Inserts a breakpoint of GDB type `ty` at `addr`. `len` matters for
    /// watchpoints only. Software breakpoints patch `mem`.
    ///
    /// # Errors
    /// [`BreakpointError::Hw`] for refused slots (bad length, misaligned,
    /// read watchpoints, full, duplicate), [`BreakpointError::Sw`] for memory
    /// failures. Nothing changes on error.
    pub fn insert<M: ByteMemory>(
        &mut self,
        mem: &mut M,
        ty: BreakpointType,
        addr: u64,
        len: u64,
    ) -> Result<Inserted, BreakpointError<M::Error>> {
        if ty == BreakpointType::Software {
            return Ok(Inserted::Software(self.sw.insert(mem, addr)?));
        }
        let bp = HwBreakpoint::from_gdb(ty, addr, len)?;
        Ok(Inserted::Hardware(self.hw.insert(bp)?))
    }

    /// Removes one use of a breakpoint of GDB type `ty` at `addr`.
    ///
    /// A hardware breakpoint is validated as for [`insert`](Self::insert)
    /// first, so a removal that could never match says why. (The seed answered
    /// `-ENOENT` to those.)
    ///
    /// # Errors
    /// As [`insert`](Self::insert), plus not-found errors. Nothing changes on error.
    pub fn remove<M: ByteMemory>(
        &mut self,
        mem: &mut M,
        ty: BreakpointType,
        addr: u64,
        len: u64,
    ) -> Result<Removed, BreakpointError<M::Error>> {
        if ty == BreakpointType::Software {
            return Ok(Removed::Software(self.sw.remove(mem, addr)?));
        }
        let bp = HwBreakpoint::from_gdb(ty, addr, len)?;
        Ok(Removed::Hardware(self.hw.remove(&bp)?))
    }

    /// [`insert`](Self::insert) with GDB's raw type number (`Z` packet).
    ///
    /// # Errors
    /// [`BreakpointError::UnknownType`] for numbers above 4; else as `insert`.
    pub fn insert_gdb<M: ByteMemory>(
        &mut self,
        mem: &mut M,
        ty: u64,
        addr: u64,
        len: u64,
    ) -> Result<Inserted, BreakpointError<M::Error>> {
        self.insert(mem, BreakpointType::try_from(ty)?, addr, len)
    }

    /// [`remove`](Self::remove) with GDB's raw type number (`z` packet).
    ///
    /// # Errors
    /// [`BreakpointError::UnknownType`] for numbers above 4; else as `remove`.
    pub fn remove_gdb<M: ByteMemory>(
        &mut self,
        mem: &mut M,
        ty: u64,
        addr: u64,
        len: u64,
    ) -> Result<Removed, BreakpointError<M::Error>> {
        self.remove(mem, BreakpointType::try_from(ty)?, addr, len)
    }

    /// Frees every hardware slot and removes every software breakpoint
    /// (restoring memory; see [`SwBreakpoints::remove_all`] for what is kept
    /// when memory fails). Single-step is left as it is, as in the seed.
    pub fn remove_all<M: ByteMemory>(&mut self, mem: &mut M) -> RemoveAll<M::Error> {
        self.hw.clear();
        self.sw.remove_all(mem)
    }

    /// Turns the VM-wide single-step request on or off.
    pub fn set_single_step(&mut self, on: bool) {
        self.single_step = on;
    }

    /// Whether single-step is requested.
    pub fn single_step(&self) -> bool {
        self.single_step
    }

    /// The `kvm_guest_debug` for a vCPU with this state's single-step flag.
    pub fn guest_debug(&self) -> GuestDebug {
        self.guest_debug_for(self.single_step)
    }

    /// The `kvm_guest_debug` for a vCPU that single-steps or not (a VMM keeps
    /// single-step per vCPU; breakpoints are VM-wide):
    /// single-step → ENABLE|SINGLESTEP; any software breakpoint →
    /// ENABLE|USE_SW_BP; any hardware slot → ENABLE|USE_HW_BP. `debugreg`
    /// always holds DR0–DR3 and DR7 of the slots (`0x600` with none).
    pub fn guest_debug_for(&self, single_step: bool) -> GuestDebug {
        let mut control = ControlFlags::NONE;
        if single_step {
            control |= ControlFlags::ENABLE | ControlFlags::SINGLESTEP;
        }
        if !self.sw.is_empty() {
            control |= ControlFlags::ENABLE | ControlFlags::USE_SW_BP;
        }
        if !self.hw.is_empty() {
            control |= ControlFlags::ENABLE | ControlFlags::USE_HW_BP;
        }
        let [dr0, dr1, dr2, dr3] = self.hw.addresses();
        let debugreg = [dr0, dr1, dr2, dr3, 0, 0, 0, self.hw.dr7().into_bits()];
        GuestDebug { control, debugreg }
    }

    /// Decodes a debug exit of a vCPU that ran with `applied` (see
    /// [`decode`](fn@crate::decode)), looking software breakpoints up in this
    /// state's table.
    ///
    /// # Errors
    /// [`DecodeError`] for a vector other than 1 or 3.
    pub fn decode(&self, exit: &DebugExit, applied: &Applied) -> Result<Decision, DecodeError> {
        decode(exit, applied, |pc| self.sw.contains(pc))
    }
}
