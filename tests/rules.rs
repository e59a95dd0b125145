//! One test per rule of the model (issue #2, DESIGN.md), named after it.
//! The seed is QEMU 2009 `kvm_arch_{insert,remove}_hw_breakpoint`,
//! `kvm_{insert,remove}_breakpoint`, `kvm_arch_debug`.

mod common;

use common::memory;
use proptest::prelude::*;
use x86_debugreg::hw::HwError;
use x86_debugreg::state::{Inserted, Removed};
use x86_debugreg::sw::{self, SwError};
use x86_debugreg::{
    Applied, BreakpointError, BreakpointType as T, ControlFlags as F, DebugExit, DebugState, Decision, DecodeError,
    Exception, HwBreakpoint, HwKind, HwSlots, Len, Slot, Stop,
};

fn hw(kind: HwKind, addr: u64, len: u64) -> HwBreakpoint {
    HwBreakpoint::new(kind, addr, len).expect("valid breakpoint")
}

// ---- hardware slots ----

#[test]
fn execute_breakpoint_length_is_forced_to_one_byte() {
    for len in [0, 1, 2, 3, 8, u64::MAX] {
        assert_eq!(
            HwBreakpoint::new(HwKind::Execute, 0x1003, len).map(|b| b.len()),
            Ok(Len::B1)
        );
    }
}

#[test]
fn write_watch_must_be_aligned_to_its_length() {
    for kind in [HwKind::Write, HwKind::ReadWrite] {
        for len in [2u64, 4, 8] {
            for addr in 0..16u64 {
                let r = HwBreakpoint::new(kind, addr, len);
                if addr % len == 0 {
                    assert_eq!(r.map(|b| (b.addr(), b.len().bytes())), Ok((addr, len)));
                } else {
                    assert_eq!(r, Err(HwError::Misaligned { addr, len }));
                }
            }
        }
        assert!(HwBreakpoint::new(kind, 0x1001, 1).is_ok(), "1 byte is always aligned");
    }
}

#[test]
fn watch_length_must_be_1_2_4_or_8() {
    for len in [0, 3, 5, 6, 7, 9, 16, u64::MAX] {
        assert_eq!(
            HwBreakpoint::new(HwKind::Write, 0, len),
            Err(HwError::BadLength { len })
        );
    }
}

#[test]
fn read_watchpoints_and_software_type_are_unsupported_as_hardware() {
    for ty in [T::ReadWatch, T::Software] {
        assert_eq!(HwBreakpoint::from_gdb(ty, 0x1000, 4), Err(HwError::Unsupported { ty }));
    }
    let mut state = DebugState::new();
    let err = state.insert(&mut memory(), T::ReadWatch, 0x8, 4).unwrap_err();
    assert_eq!(err, BreakpointError::Hw(HwError::Unsupported { ty: T::ReadWatch }));
    assert_eq!(state, DebugState::new());
}

#[test]
fn unknown_gdb_type_is_a_typed_error() {
    let mut state = DebugState::new();
    for ty in [5, 6, 255, u64::MAX] {
        assert!(matches!(
            state.insert_gdb(&mut memory(), ty, 0, 1),
            Err(BreakpointError::UnknownType(_))
        ));
    }
}

#[test]
fn fifth_hardware_breakpoint_finds_the_slots_full() {
    let mut slots = HwSlots::new();
    for (i, addr) in [0x10, 0x20, 0x30, 0x40].into_iter().enumerate() {
        assert_eq!(
            slots.insert(hw(HwKind::Execute, addr, 1)),
            Ok(Slot::new(i as u8).expect("0..4"))
        );
    }
    let before = slots.clone();
    assert_eq!(slots.insert(hw(HwKind::Execute, 0x50, 1)), Err(HwError::Full));
    // Full is checked before duplicates, as in the seed.
    assert_eq!(slots.insert(hw(HwKind::Execute, 0x10, 1)), Err(HwError::Full));
    assert_eq!(slots, before);
}

#[test]
fn exact_duplicate_is_already_present_but_other_length_or_kind_is_not() {
    let mut slots = HwSlots::new();
    let bp = hw(HwKind::Write, 0x10, 4);
    slots.insert(bp).expect("free");
    assert_eq!(slots.insert(bp), Err(HwError::AlreadyPresent { bp }));
    assert!(slots.insert(hw(HwKind::Write, 0x10, 8)).is_ok());
    assert!(slots.insert(hw(HwKind::ReadWrite, 0x10, 4)).is_ok());
    assert_eq!(slots.len(), 3);
}

#[test]
fn removing_an_absent_hardware_breakpoint_is_not_found() {
    let mut slots = HwSlots::new();
    slots.insert(hw(HwKind::Write, 0x10, 4)).expect("free");
    let absent = hw(HwKind::Write, 0x10, 8);
    assert_eq!(slots.remove(&absent), Err(HwError::NotFound { bp: absent }));
    assert_eq!(slots.len(), 1);
}

#[test]
fn removal_moves_the_last_slot_into_the_hole() {
    let mut slots = HwSlots::new();
    let bps = [0x10, 0x20, 0x30, 0x40].map(|a| hw(HwKind::Execute, a, 1));
    for bp in bps {
        slots.insert(bp).expect("free");
    }
    assert_eq!(slots.remove(&bps[1]), Ok(Slot::DR1));
    assert_eq!(slots.addresses(), [0x10, 0x40, 0x30, 0]);
    assert_eq!(slots.dr7().into_bits(), 0x600 | 0b10_1010, "G0..G2 only, DR3 free");
    assert_eq!(slots.insert(bps[1]), Ok(Slot::DR3));
}

#[test]
fn state_is_per_vm_not_global() {
    let (mut a, b) = (DebugState::new(), DebugState::new());
    a.insert(&mut memory(), T::Hardware, 0x10, 1).expect("free");
    assert_eq!(b.guest_debug().control, F::NONE);
    assert!(b.hw().is_empty() && a.hw().len() == 1);
}

// ---- software breakpoints ----

#[test]
fn insert_of_a_new_address_saves_the_byte_and_writes_int3() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    let original = mem.bytes[0x10];
    assert_eq!(
        state.insert(&mut mem, T::Software, 0x10, 1),
        Ok(Inserted::Software(sw::SwInserted::Patched { saved: original }))
    );
    assert_eq!(mem.bytes[0x10], 0xcc);
    assert_eq!(
        (mem.accesses, state.sw().get(0x10).map(|e| (e.saved, e.count))),
        (2, Some((original, 1)))
    );
}

#[test]
fn insert_of_a_known_address_only_counts() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    state.insert(&mut mem, T::Software, 0x10, 1).expect("healthy");
    let (bytes, accesses) = (mem.bytes.clone(), mem.accesses);
    assert_eq!(
        state.insert(&mut mem, T::Software, 0x10, 1),
        Ok(Inserted::Software(sw::SwInserted::Counted { count: 2 }))
    );
    assert_eq!(
        (mem.bytes == bytes, mem.accesses),
        (true, accesses),
        "memory neither read nor written"
    );
}

#[test]
fn remove_of_an_unknown_address_is_not_found() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    assert_eq!(
        state.remove(&mut mem, T::Software, 0x10, 1),
        Err(BreakpointError::Sw(SwError::NotFound { addr: 0x10 }))
    );
    assert_eq!(mem.accesses, 0);
}

#[test]
fn remove_with_count_above_one_only_counts_down() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    state.insert(&mut mem, T::Software, 0x10, 1).expect("healthy");
    state.insert(&mut mem, T::Software, 0x10, 1).expect("healthy");
    let accesses = mem.accesses;
    assert_eq!(
        state.remove(&mut mem, T::Software, 0x10, 1),
        Ok(Removed::Software(sw::SwRemoved::Counted { remaining: 1 }))
    );
    assert_eq!((mem.bytes[0x10], mem.accesses), (0xcc, accesses));
}

#[test]
fn last_remove_restores_the_saved_byte() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    let original = mem.bytes.clone();
    state.insert(&mut mem, T::Software, 0x10, 1).expect("healthy");
    assert_eq!(
        state.remove(&mut mem, T::Software, 0x10, 1),
        Ok(Removed::Software(sw::SwRemoved::Restored))
    );
    assert_eq!(mem.bytes, original);
    assert!(state.sw().is_empty());
}

#[test]
fn last_remove_after_the_guest_rewrote_int3_reports_it_and_leaves_the_byte() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    state.insert(&mut mem, T::Software, 0x10, 1).expect("healthy");
    mem.bytes[0x10] = 0x90;
    assert_eq!(
        state.remove(&mut mem, T::Software, 0x10, 1),
        Ok(Removed::Software(sw::SwRemoved::GuestOverwrote { found: 0x90 }))
    );
    assert_eq!(mem.bytes[0x10], 0x90);
    assert!(!state.sw().contains(0x10), "the entry is forgotten (the seed kept it)");
}

#[test]
fn remove_all_restores_every_byte_and_leaves_the_table_empty() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    let original = mem.bytes.clone();
    for addr in [0x1, 0x2, 0x2, 0x3, 0x18] {
        state.insert(&mut mem, T::Software, addr, 1).expect("healthy");
    }
    state.insert(&mut mem, T::AccessWatch, 0x8, 8).expect("free");
    let report = state.remove_all(&mut mem);
    assert_eq!((report.restored, report.is_complete()), (4, true));
    assert_eq!(mem.bytes, original);
    assert!(state.sw().is_empty(), "the seed forgot to empty the list");
    assert!(state.hw().is_empty());
}

// ---- the kvm_guest_debug request ----

#[test]
fn control_flags_have_the_kernel_values() {
    let values = [
        (F::ENABLE, 0x1),
        (F::SINGLESTEP, 0x2),
        (F::USE_SW_BP, 0x1_0000),
        (F::USE_HW_BP, 0x2_0000),
        (F::INJECT_DB, 0x4_0000),
        (F::INJECT_BP, 0x8_0000),
    ];
    for (flag, bits) in values {
        assert_eq!(flag.bits(), bits);
    }
}

#[test]
fn guest_debug_sets_flags_for_single_step_software_and_hardware() {
    let (mut mem, mut state) = (memory(), DebugState::new());
    assert_eq!(state.guest_debug().control, F::NONE);
    state.set_single_step(true);
    assert_eq!(state.guest_debug().control, F::ENABLE | F::SINGLESTEP);
    state.set_single_step(false);
    state.insert(&mut mem, T::Software, 0x10, 1).expect("healthy");
    assert_eq!(state.guest_debug().control, F::ENABLE | F::USE_SW_BP);
    state.insert(&mut mem, T::WriteWatch, 0x8, 8).expect("free");
    let dbg = state.guest_debug_for(true);
    assert_eq!(dbg.control, F::ENABLE | F::SINGLESTEP | F::USE_SW_BP | F::USE_HW_BP);
    assert_eq!(
        dbg.debugreg,
        [0x8, 0, 0, 0, 0, 0, 0, 0x600 | 0b10 | (0b01 | 0b10 << 2) << 16]
    );
}

// ---- exit decoding ----

fn exit(exception: u32, pc: u64, dr6: u64) -> DebugExit {
    DebugExit {
        exception,
        pc,
        dr6,
        dr7: 0,
    }
}

/// A state with DR0 execute at 0x10, DR1 write watch 4 bytes at 0x20, DR2
/// access watch 8 bytes at 0x28 and a software breakpoint at 0x30.
fn configured() -> DebugState {
    let (mut mem, mut state) = (memory(), DebugState::new());
    state.insert(&mut mem, T::Hardware, 0x10, 1).expect("free");
    state.insert(&mut mem, T::WriteWatch, 0x20, 4).expect("free");
    state.insert(&mut mem, T::AccessWatch, 0x28, 8).expect("free");
    state.insert(&mut mem, T::Software, 0x30, 1).expect("healthy");
    state
}

#[test]
fn single_step_exit_with_single_step_applied_is_a_step() {
    let state = configured();
    for dr6 in [0xffff_4ff0, 0xfffe_4ff0] {
        let d = state.decode(&exit(1, 0x11, dr6), &Applied::was_set(state.guest_debug_for(true)));
        assert_eq!(
            d,
            Ok(Decision::Stop(Stop::Debug {
                single_step: true,
                hits: Default::default()
            }))
        );
        // Without single-step applied, BS is the guest's own trap flag.
        assert_eq!(
            state.decode(&exit(1, 0x11, dr6), &Applied::was_set(state.guest_debug())),
            Ok(Decision::Reinject(Exception::Debug))
        );
    }
}

#[test]
fn each_b_bit_of_a_configured_slot_is_reported_with_its_breakpoint_all_hits_not_the_last() {
    let state = configured();
    let applied = Applied::was_set(state.guest_debug());
    let Ok(Decision::Stop(Stop::Debug {
        single_step: false,
        hits,
    })) = state.decode(&exit(1, 0x40, 0xffff_0ff0 | 0b0111), &applied)
    else {
        panic!("a stop with hits");
    };
    let got: Vec<_> = hits.iter().map(|h| (h.slot, h.breakpoint)).collect();
    assert_eq!(
        got,
        [
            (Slot::DR0, hw(HwKind::Execute, 0x10, 1)),
            (Slot::DR1, hw(HwKind::Write, 0x20, 4)),
            (Slot::DR2, hw(HwKind::ReadWrite, 0x28, 8)),
        ]
    );
}

#[test]
fn a_b_bit_the_debugger_did_not_set_is_given_back_to_the_guest() {
    let state = configured();
    let d = state.decode(
        &exit(1, 0x40, 0xffff_0ff0 | 0b1000),
        &Applied::was_set(state.guest_debug()),
    );
    assert_eq!(d, Ok(Decision::Reinject(Exception::Debug)));
}

#[test]
fn decoding_never_reads_the_kind_from_the_exit_dr7() {
    let state = configured();
    let applied = Applied::was_set(state.guest_debug());
    let want = state.decode(&exit(1, 0x40, 0xffff_0ff2), &applied);
    for dr7 in [0, 0x400, u64::MAX, 0x0001_0602] {
        assert_eq!(
            state.decode(
                &DebugExit {
                    dr7,
                    ..exit(1, 0x40, 0xffff_0ff2)
                },
                &applied
            ),
            want
        );
    }
}

#[test]
fn decoding_uses_the_configuration_the_vcpu_applied_not_the_newest() {
    let mut state = configured();
    let applied = Applied::was_set(state.guest_debug());
    state.remove_all(&mut memory());
    let d = state.decode(&exit(1, 0x10, 0xffff_0ff1), &applied);
    assert!(matches!(d, Ok(Decision::Stop(Stop::Debug { hits, .. })) if hits.get(Slot::DR0).is_some()));
    // And a slot armed only in the newest intent is not a hit for an older vCPU.
    let fresh = configured();
    assert_eq!(
        fresh.decode(
            &exit(1, 0x10, 0xffff_0ff1),
            &Applied::was_set(DebugState::new().guest_debug())
        ),
        Ok(Decision::Reinject(Exception::Debug))
    );
}

#[test]
fn breakpoint_exit_at_a_known_software_breakpoint_stops_else_reinjects() {
    let state = configured();
    let applied = Applied::was_set(state.guest_debug());
    assert_eq!(
        state.decode(&exit(3, 0x30, 0), &applied),
        Ok(Decision::Stop(Stop::Software { addr: 0x30 }))
    );
    assert_eq!(
        state.decode(&exit(3, 0x31, 0), &applied),
        Ok(Decision::Reinject(Exception::Breakpoint))
    );
    assert_eq!(Exception::Breakpoint.inject_flag(), F::INJECT_BP);
    assert_eq!(Exception::Debug.inject_flag(), F::INJECT_DB);
}

#[test]
fn other_exception_vectors_are_a_typed_error() {
    let state = configured();
    for exception in [0, 2, 4, 13, 14, u32::MAX] {
        assert_eq!(
            state.decode(&exit(exception, 0x30, 0), &Applied::was_set(state.guest_debug())),
            Err(DecodeError::UnexpectedException { exception })
        );
    }
}

proptest! {
    /// Garbage in any field of the exit or the applied configuration never
    /// panics, and a stop only reports slots both hit and armed.
    #[test]
    fn garbage_exits_never_panic(exception in any::<u32>(), pc in any::<u64>(), dr6 in any::<u64>(), dr7 in any::<u64>(),
                                 control in any::<u32>(), regs in any::<[u64; 8]>()) {
        let applied = Applied::was_set(x86_debugreg::GuestDebug { control: F::from_bits_retain(control), debugreg: regs });
        let state = configured();
        if let Ok(Decision::Stop(Stop::Debug { hits, .. })) = state.decode(&DebugExit { exception, pc, dr6, dr7 }, &applied) {
            for hit in hits.iter() {
                prop_assert!(dr6 & 1 << hit.slot.get() != 0);
                prop_assert_eq!(applied.armed(hit.slot), Some(hit.breakpoint));
            }
        }
    }
}
