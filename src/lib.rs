#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]
// docs.rs (`--cfg docsrs`, Cargo.toml): mark each feature-gated item.
#![cfg_attr(docsrs, feature(doc_cfg))]
//! A typed, verified model of the x86 debug registers — DR0–DR3, DR6, DR7 —
//! and of the breakpoint bookkeeping a debugger or hypervisor does with them:
//! four hardware slots, a software-breakpoint (`int3`) table with use counts,
//! the `kvm_guest_debug` request, and the decoding of KVM debug exits.
//!
//! Pure: no I/O, no `unsafe`, `no_std` + `alloc`. `kvm-glue` (a sibling crate)
//! applies it to real KVM vCPUs.
//!
//! ```
//! use x86_debugreg::{Applied, BreakpointType, DebugExit, DebugState, Decision, Stop, Slot};
//! # use x86_debugreg::sw::ByteMemory;
//! # struct NoMemory;
//! # impl ByteMemory for NoMemory {
//! #     type Error = core::fmt::Error;
//! #     fn read_byte(&mut self, _: u64) -> Result<u8, Self::Error> { Err(core::fmt::Error) }
//! #     fn write_byte(&mut self, _: u64, _: u8) -> Result<(), Self::Error> { Err(core::fmt::Error) }
//! # }
//! let mut state = DebugState::new();
//! // GDB "Z1,401000,1" then "Z2,602000,4": hardware breakpoint and write watchpoint.
//! state.insert(&mut NoMemory, BreakpointType::Hardware, 0x40_1000, 1)?;
//! state.insert(&mut NoMemory, BreakpointType::WriteWatch, 0x60_2000, 4)?;
//! let applied = Applied::was_set(state.guest_debug()); // KVM_SET_GUEST_DEBUG took it
//! assert_eq!(applied.debugreg[7], 0x600 | 0b10 | 0b1000 | (0b01 | 0b11 << 2) << 20);
//!
//! // KVM reports a #DB with B1 set: the write watchpoint in DR1 fired.
//! let exit = DebugExit { exception: 1, pc: 0x40_1234, dr6: 0xffff_0ff2, dr7: 0 };
//! let Decision::Stop(Stop::Debug { hits, .. }) = state.decode(&exit, &applied)? else { panic!() };
//! assert_eq!(hits.iter().map(|h| (h.slot, h.breakpoint.addr())).collect::<Vec<_>>(), [(Slot::DR1, 0x60_2000)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Map
//! * [`dr7`]: DR7 fields, [`Condition`] (R/W), [`Len`] (LEN), [`Slot`].
//! * [`dr6`]: DR6 fields and the KVM normalisation.
//! * [`gdb`]: GDB's `Z` packet types.
//! * [`hw`]: validated hardware breakpoints and the four-slot allocator.
//! * [`sw`]: the `int3` table over a [`sw::ByteMemory`].
//! * [`control`]: `struct kvm_guest_debug` and its flags.
//! * [`exit`]: debug-exit decoding.
//! * [`state`]: [`DebugState`], the aggregate with the seed's API.
//! * [`predict`]: which DR6 B-bits an access sets (checked against the CPU).
//! * [`region`]: any byte range as the fewest aligned slot ranges.
//! * [`watch`]: [`WatchSlots`], watchpoints on any region sharing the four
//!   slots, transactional, with read watchpoints by value check.
//! * `reference` (feature `reference`): the integer-level oracle the tests use,
//!   and `differential`, which runs both models in lock-step.
//! * `fuzzing` (features `reference` + `arbitrary`): the fuzz targets' bodies.

extern crate alloc;
// `arbitrary` (fuzzing only) is a std crate and its derives name `std`.
#[cfg(feature = "arbitrary")]
extern crate std;

// The README's and docs/'s core examples are compiled and run as doctests
// (tests/readme.rs checks their commands and paths).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/regions.md")]
struct RegionsDoctests;

pub mod control;
#[cfg(feature = "reference")]
pub mod differential;
pub mod dr6;
pub mod dr7;
pub mod exit;
#[cfg(all(feature = "reference", feature = "arbitrary"))]
pub mod fuzzing;
pub mod gdb;
pub mod hw;
pub mod predict;
#[cfg(feature = "reference")]
pub mod reference;
pub mod region;
pub mod state;
pub mod sw;
pub mod watch;

pub use control::{Applied, ControlFlags, GuestDebug};
pub use dr6::Dr6;
pub use dr7::{Condition, Dr7, Len, Slot};
pub use exit::{decode, DebugExit, Decision, DecodeError, Exception, Hit, Hits, Stop};
pub use gdb::BreakpointType;
pub use hw::{HwBreakpoint, HwError, HwKind, HwSlots};
pub use predict::{Access, AccessKind, SlotMask};
pub use state::{BreakpointError, DebugState};
pub use watch::{Watch, WatchError, WatchKind, WatchSlots};
