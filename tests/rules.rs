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

/// A raw DR7 as a VMM (or a fuzzer) might apply it: per slot, no enable,
/// L only, G only or both, any R/W code (I/O included), any LEN; LE, GE, GD
/// and a reserved bit at random; now and then any `u64`.
fn raw_dr7() -> impl Strategy<Value = u64> {
    let slot = (prop::sample::select(&[0u64, 0b01, 0b10, 0b11][..]), 0..4u64, 0..4u64);
    let built = (prop::array::uniform4(slot), 0..8u64, any::<bool>()).prop_map(|(slots, extra, reserved)| {
        let mut dr7 = 0x400 | extra << 8 & 0x300 | (extra & 4) << 11 | u64::from(reserved) << 33;
        for (n, (enable, rw, len)) in slots.into_iter().enumerate() {
            dr7 |= enable << (2 * n) | rw << (16 + 4 * n) | len << (18 + 4 * n);
        }
        dr7
    });
    prop_oneof![9 => built, 1 => any::<u64>()]
}

/// Raw control flags: any subset of the six KVM flags (so `USE_HW_BP` and
/// `SINGLESTEP` without `ENABLE` too), now and then any `u32`.
fn raw_control() -> impl Strategy<Value = u32> {
    let flags = prop::sample::subsequence(&[0x1u32, 0x2, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000][..], 0..=6)
        .prop_map(|f| f.into_iter().fold(0, |c, f| c | f));
    prop_oneof![9 => flags, 1 => any::<u32>()]
}

/// Exit vectors: mostly `#DB` and `#BP`, the rest anything.
fn vector() -> impl Strategy<Value = u32> {
    prop_oneof![9 => Just(1u32), 9 => Just(3u32), 2 => any::<u32>()]
}

/// DR6 as KVM reports it: any B-bits and BS over either at-rest form, or garbage.
fn raw_dr6() -> impl Strategy<Value = u64> {
    let formed = (
        0..16u64,
        any::<bool>(),
        prop::sample::select(&[0xffff_0ff0u64, 0xfffe_0ff0, 0][..]),
    )
        .prop_map(|(b, bs, base)| base | b | u64::from(bs) << 14);
    prop_oneof![8 => formed, 1 => any::<u64>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::cases("PROPTEST_CASES", 2048)))]

    /// Any applied configuration (raw control flags and registers) and any
    /// exit decode as the reference decodes them, never panic, and a stop
    /// only reports slots both hit and armed.
    #[test]
    fn raw_applied_configurations_decode_as_the_reference_does(
        exception in vector(),
        pc in prop::sample::select(&[0x10u64, 0x11, 0x30, u64::MAX][..]),
        dr6 in raw_dr6(),
        dr7_exit in any::<u64>(),
        control in raw_control(),
        dr7 in raw_dr7(),
        addrs in any::<[u64; 4]>(),
        sw in prop::collection::btree_set(prop::sample::select(&[0x10u64, 0x30, u64::MAX][..]), 0..3),
    ) {
        use x86_debugreg::differential::decision;
        use x86_debugreg::reference::{RefSwBreakpoint, Reference};

        let debugreg = [addrs[0], addrs[1], addrs[2], addrs[3], 0, 0, 0, dr7];
        let applied = Applied::was_set(x86_debugreg::GuestDebug { control: F::from_bits_retain(control), debugreg });
        let exit = DebugExit { exception, pc, dr6, dr7: dr7_exit };
        let typed = x86_debugreg::decode(&exit, &applied, |a| sw.contains(&a));
        let mut reference = Reference::new();
        reference.sw_breakpoints = sw.iter().map(|&pc| RefSwBreakpoint { pc, saved_insn: 0, use_count: 1 }).collect();
        prop_assert_eq!(decision(typed), reference.debug_exit(exception, pc, dr6, control, debugreg));
        if let Ok(Decision::Stop(Stop::Debug { hits, .. })) = typed {
            for hit in hits.iter() {
                prop_assert!(dr6 & 1 << hit.slot.get() != 0);
                prop_assert_eq!(applied.armed(hit.slot), Some(hit.breakpoint));
            }
        }
    }
}

#[test]
fn remove_all_with_failing_memory_is_incomplete_and_keeps_what_failed() {
    let mut mem = memory();
    let original = mem.bytes.clone();
    let mut state = DebugState::new();
    for addr in [0x2, 0x4, 0x6] {
        state.insert(&mut mem, T::Software, addr, 1).expect("healthy");
    }
    state.insert(&mut mem, T::Hardware, 0x30, 1).expect("free");
    mem.poison(0x2, true, false); // reads of 0x2 fail
    mem.poison(0x6, false, true); // writes of 0x6 fail
    let report = state.remove_all(&mut mem);
    assert!(!report.is_complete());
    assert_eq!(report.restored, 1);
    assert!(report.overwritten.is_empty());
    assert_eq!(
        report.failed,
        [
            (
                0x2,
                SwError::Read {
                    addr: 0x2,
                    source: x86_debugreg::differential::MemFault {
                        addr: 0x2,
                        write: false
                    }
                }
            ),
            (
                0x6,
                SwError::Write {
                    addr: 0x6,
                    source: x86_debugreg::differential::MemFault { addr: 0x6, write: true }
                }
            ),
        ]
    );
    assert_eq!(state.sw().iter().map(|(a, _)| a).collect::<Vec<_>>(), [0x2, 0x6]);
    assert!(state.hw().is_empty());
    assert_eq!(mem.bytes[0x4], original[0x4]);
    assert_eq!((mem.bytes[0x2], mem.bytes[0x6]), (0xcc, 0xcc));
    // Healed memory: the second remove-all completes, byte for byte.
    mem.poison(0x2, false, false);
    mem.poison(0x6, false, false);
    let again = state.remove_all(&mut mem);
    assert!(again.is_complete() && again.restored == 2 && state.sw().is_empty());
    assert_eq!(mem.bytes, original);
}
