//! Public API that the property suites do not reach on their own: each item
//! pinned by hand-computed values (issue #11, "Untested public API").

mod common;

use common::memory;
use x86_debugreg::differential::{MemFault, TestMemory};
use x86_debugreg::dr7::{Dr7Error, InvalidSlot};
use x86_debugreg::gdb::UnknownBreakpointType;
use x86_debugreg::predict::SlotMask;
use x86_debugreg::sw::{ByteMemory, SwBreakpoints, SwEntry, SwError, SwInserted, SwRemoved};
use x86_debugreg::{
    Applied, BreakpointError, BreakpointType, Condition, ControlFlags, DebugExit, DebugState, Decision, DecodeError,
    Dr6, Dr7, Exception, GuestDebug, Hit, HwBreakpoint, HwError, HwKind, HwSlots, Len, Slot, Stop,
};

fn hw(kind: HwKind, addr: u64, len: u64) -> HwBreakpoint {
    HwBreakpoint::new(kind, addr, len).expect("valid breakpoint")
}

#[test]
fn dr6_in_rtm_region_is_bit_16_clear() {
    assert!(!Dr6::from_bits(0xffff_0ff0).in_rtm_region());
    assert!(Dr6::from_bits(0xfffe_0ff0).in_rtm_region());
    assert!(Dr6::from_bits(0).in_rtm_region());
    assert!(!Dr6::from_bits(1 << 16).in_rtm_region());
}

#[test]
fn hw_slots_get_returns_each_slots_breakpoint_after_insert_and_remove() {
    let mut slots = HwSlots::new();
    let bps = [
        hw(HwKind::Execute, 0x100, 1),
        hw(HwKind::Write, 0x208, 8),
        hw(HwKind::ReadWrite, 0x302, 2),
    ];
    for bp in bps {
        slots.insert(bp).expect("free");
    }
    assert_eq!(
        Slot::ALL.map(|s| slots.get(s)),
        [Some(bps[0]), Some(bps[1]), Some(bps[2]), None]
    );
    slots.remove(&bps[0]).expect("present");
    // The last used slot (DR2) moved into DR0.
    assert_eq!(
        Slot::ALL.map(|s| slots.get(s)),
        [Some(bps[2]), Some(bps[1]), None, None]
    );
    assert_eq!(slots.addresses(), [0x302, 0x208, 0, 0]);
    assert_eq!(slots.len(), 2);
    assert!(!slots.is_empty());
    assert_eq!(slots.find(&bps[1]), Some(Slot::DR1));
    assert_eq!(slots.find(&bps[0]), None);
    slots.clear();
    assert_eq!(
        (slots.is_empty(), slots.len(), slots.dr7().into_bits()),
        (true, 0, 0x600)
    );
    assert_eq!(HwSlots::default(), HwSlots::new());
}

#[test]
fn dr7_with_local_false_clears_only_ln() {
    for slot in Slot::ALL {
        let n = 2 * u32::from(slot.get());
        let d = Dr7::from_bits(0x400 | 0b11 << n).with_local(slot, false);
        assert_eq!(d.into_bits(), 0x400 | 0b10 << n);
        let d = Dr7::from_bits(0x400 | 0b11 << n).with_global(slot, false);
        assert_eq!(d.into_bits(), 0x400 | 0b01 << n);
        // Idempotent on a clear bit.
        assert_eq!(Dr7::EMPTY.with_local(slot, false), Dr7::EMPTY);
        assert_eq!(Dr7::EMPTY.with_global(slot, false), Dr7::EMPTY);
    }
}

#[test]
fn slot_mask_with_union_and_enabled() {
    let m = SlotMask::EMPTY.with(Slot::DR1).with(Slot::DR3);
    assert_eq!(m.bits(), 0b1010);
    assert_eq!(m.with(Slot::DR1).bits(), 0b1010, "with is idempotent");
    assert_eq!(m.union(SlotMask::single(Slot::DR0)).bits(), 0b1011);
    assert_eq!(m.union(m), m);
    assert_eq!(m.union(SlotMask::EMPTY), m);
    assert_eq!(m.intersection(SlotMask::from_bits_truncate(0b0110)).bits(), 0b0010);
    assert_eq!(SlotMask::from_bits_truncate(0xff), SlotMask::ALL);
    // enabled: Ln or Gn of each slot; LE, GE (bits 8, 9) and the fixed bit 10
    // must not leak into any slot.
    assert_eq!(SlotMask::enabled(Dr7::from_bits(0x700)), SlotMask::EMPTY);
    assert_eq!(SlotMask::enabled(Dr7::from_bits(0xffff_ff00)), SlotMask::EMPTY);
    for bit in 0..8u32 {
        let want = 1u8 << (bit / 2);
        assert_eq!(SlotMask::enabled(Dr7::from_bits(1 << bit)).bits(), want, "bit {bit}");
        assert_eq!(
            SlotMask::enabled(Dr7::from_bits(0x700 | 1 << bit)).bits(),
            want,
            "bit {bit} with LE/GE"
        );
    }
    assert_eq!(SlotMask::enabled(Dr7::from_bits(0b0100_0001)).bits(), 0b1001);
    assert_eq!(SlotMask::enabled(Dr7::from_bits(0xff)), SlotMask::ALL);
    assert_eq!(SlotMask::from(Dr6::from_bits(0xffff_0ffa)).bits(), 0b1010);
}

#[test]
fn is_watchpoint_is_false_only_for_execute() {
    assert!(!hw(HwKind::Execute, 0x10, 1).is_watchpoint());
    assert!(hw(HwKind::Write, 0x10, 4).is_watchpoint());
    assert!(hw(HwKind::ReadWrite, 0x10, 1).is_watchpoint());
}

#[test]
fn hw_kind_maps_to_and_from_conditions_and_gdb_types() {
    for (kind, cond) in [
        (HwKind::Execute, Condition::Execute),
        (HwKind::Write, Condition::Write),
        (HwKind::ReadWrite, Condition::ReadWrite),
    ] {
        assert_eq!(kind.condition(), cond);
        assert_eq!(HwKind::from_condition(cond), Some(kind));
    }
    assert_eq!(HwKind::from_condition(Condition::Io), None);
    assert_eq!(HwKind::from_gdb(BreakpointType::Hardware), Ok(HwKind::Execute));
    assert_eq!(HwKind::from_gdb(BreakpointType::WriteWatch), Ok(HwKind::Write));
    assert_eq!(HwKind::from_gdb(BreakpointType::AccessWatch), Ok(HwKind::ReadWrite));
    for ty in [BreakpointType::Software, BreakpointType::ReadWatch] {
        assert_eq!(HwKind::from_gdb(ty), Err(HwError::Unsupported { ty }));
    }
}

/// A memory generic over `ByteMemory`, called with `&mut M`: the blanket
/// impl must forward every read, write and error.
type Through<E> = (Result<u8, E>, Result<(), E>, Result<u8, E>);

fn through<M: ByteMemory>(mut mem: M, addr: u64) -> Through<M::Error> {
    let before = mem.read_byte(addr);
    let write = mem.write_byte(addr, 0x5a);
    (before, write, mem.read_byte(addr))
}

#[test]
fn byte_memory_for_mut_ref_forwards_reads_writes_and_errors() {
    let mut mem = TestMemory::new(4);
    let original = mem.bytes[2];
    let (r, w, again) = through(&mut mem, 2);
    assert_eq!((r, w, again), (Ok(original), Ok(()), Ok(0x5a)));
    assert_eq!(mem.bytes[2], 0x5a, "the write reached the memory behind the reference");
    assert_eq!(mem.accesses, 3);
    let (r, w, _) = through(&mut mem, 9);
    assert_eq!(r, Err(MemFault { addr: 9, write: false }));
    assert_eq!(w, Err(MemFault { addr: 9, write: true }));
    // And through two references.
    let mut inner = &mut mem;
    let (r, _, _) = through(&mut inner, 1);
    assert!(r.is_ok());
    // The table works through `&mut M` as well.
    let mut table = SwBreakpoints::new();
    let mut m = TestMemory::new(4);
    let saved = m.bytes[1];
    assert_eq!(table.insert(&mut &mut m, 1), Ok(SwInserted::Patched { saved }));
    assert_eq!(m.bytes[1], 0xcc);
}

#[test]
fn replace_saved_swaps_the_byte_a_breakpoint_will_restore() {
    let mut mem = TestMemory::new(8);
    let original = mem.bytes[4];
    let mut state = DebugState::new();
    assert_eq!(state.replace_saved(4, 0xc3), None);
    state.insert(&mut mem, BreakpointType::Software, 4, 1).expect("healthy");
    assert_eq!(state.replace_saved(4, 0xc3), Some(original));
    assert_eq!(state.sw().get(4), Some(SwEntry { saved: 0xc3, count: 1 }));
    assert_eq!(mem.bytes[4], 0xcc, "the int3 stays");
    assert_eq!(state.replace_saved(4, 0x90), Some(0xc3));
    assert_eq!(
        state.remove(&mut mem, BreakpointType::Software, 4, 1),
        Ok(x86_debugreg::state::Removed::Software(SwRemoved::Restored))
    );
    assert_eq!(mem.bytes[4], 0x90);
    assert_eq!(state.replace_saved(4, 0x90), None);
}

#[test]
fn sw_table_accessors() {
    let mut mem = memory();
    let mut table = SwBreakpoints::new();
    assert_eq!((table.is_empty(), table.len(), table.contains(2)), (true, 0, false));
    let (b2, b5) = (mem.bytes[2], mem.bytes[5]);
    table.insert(&mut mem, 5).expect("healthy");
    table.insert(&mut mem, 2).expect("healthy");
    table.insert(&mut mem, 2).expect("healthy");
    assert!(!table.is_empty() && table.len() == 2 && table.contains(2) && !table.contains(3));
    assert_eq!(table.get(2), Some(SwEntry { saved: b2, count: 2 }));
    assert_eq!(table.get(3), None);
    assert_eq!(
        table.iter().collect::<Vec<_>>(),
        [
            (2, SwEntry { saved: b2, count: 2 }),
            (5, SwEntry { saved: b5, count: 1 })
        ]
    );
}

#[test]
fn hits_and_exceptions_report_what_they_hold() {
    let mut state = DebugState::new();
    let mut mem = memory();
    state.insert(&mut mem, BreakpointType::Hardware, 0x30, 1).expect("free");
    state
        .insert(&mut mem, BreakpointType::WriteWatch, 0x8, 4)
        .expect("free");
    state
        .insert(&mut mem, BreakpointType::AccessWatch, 0x10, 8)
        .expect("free");
    let applied = Applied::was_set(state.guest_debug());
    let exit = DebugExit {
        exception: 1,
        pc: 0x30,
        dr6: 0xffff_0ff5,
        dr7: 0,
    };
    let Ok(Decision::Stop(Stop::Debug { single_step, hits })) = state.decode(&exit, &applied) else {
        panic!("a stop")
    };
    assert!(!single_step && !hits.is_empty());
    assert!(x86_debugreg::Hits::default().is_empty());
    assert_eq!(x86_debugreg::Hits::default().mask(), 0);
    // A step with no B-bit: a stop whose hits are empty.
    let step = DebugExit {
        exception: 1,
        pc: 0x30,
        dr6: 0xffff_4ff0,
        dr7: 0,
    };
    let mut stepping = state.clone();
    stepping.set_single_step(true);
    let Ok(Decision::Stop(Stop::Debug {
        single_step: true,
        hits: none,
    })) = stepping.decode(&step, &Applied::was_set(stepping.guest_debug()))
    else {
        panic!("a step")
    };
    assert!(none.is_empty() && none.iter().next().is_none());
    assert_eq!(hits.mask(), 0b0101);
    assert_eq!(hits.get(Slot::DR0), Some(hw(HwKind::Execute, 0x30, 1)));
    assert_eq!(hits.get(Slot::DR1), None);
    assert_eq!(hits.get(Slot::DR2), Some(hw(HwKind::ReadWrite, 0x10, 8)));
    assert_eq!(hits.get(Slot::DR3), None);
    assert_eq!(hits.iter().map(|h| h.slot).collect::<Vec<_>>(), [Slot::DR0, Slot::DR2]);
    // All four B-bits with three armed slots: DR3 is not reported.
    let exit = DebugExit {
        dr6: 0xffff_0fff,
        ..exit
    };
    let Ok(Decision::Stop(Stop::Debug { hits, .. })) = state.decode(&exit, &applied) else {
        panic!("a stop")
    };
    assert_eq!(hits.mask(), 0b0111);
    assert_eq!(Exception::Debug.vector(), 1);
    assert_eq!(Exception::Breakpoint.vector(), 3);
    assert_eq!(Exception::Debug.inject_flag(), ControlFlags::INJECT_DB);
    assert_eq!(Exception::Breakpoint.inject_flag(), ControlFlags::INJECT_BP);
}

#[test]
fn guest_debug_for_sets_single_step_per_vcpu() {
    let mut state = DebugState::new();
    assert_eq!(
        state.guest_debug_for(false),
        GuestDebug {
            control: ControlFlags::NONE,
            debugreg: [0, 0, 0, 0, 0, 0, 0, 0x600]
        }
    );
    assert_eq!(state.guest_debug_for(true).control.bits(), 0x3);
    state.set_single_step(true);
    assert!(state.single_step());
    assert_eq!(state.guest_debug().control.bits(), 0x3);
    assert_eq!(state.guest_debug_for(false).control.bits(), 0);
    state.set_single_step(false);
    assert!(!state.single_step());
    assert_eq!(state.guest_debug().control.bits(), 0);
}

#[test]
fn display_impls_say_what_error_messages_need() {
    let bp = hw(HwKind::Write, 0x1000, 8);
    let cases: Vec<(String, &str)> = vec![
        (Slot::DR2.to_string(), "DR2"),
        (format!("{:?}", Slot::DR3), "DR3"),
        (
            InvalidSlot(7).to_string(),
            "debug address register number 7 is out of range 0..=3",
        ),
        (
            Dr7Error {
                value: 0x1_0000_0400,
                reserved: 0x1_0000_0000,
            }
            .to_string(),
            "DR7 value 0x100000400 sets reserved bits 0x100000000",
        ),
        (HwKind::Execute.to_string(), "execute"),
        (HwKind::Write.to_string(), "write"),
        (HwKind::ReadWrite.to_string(), "read/write"),
        (
            hw(HwKind::Execute, 0x40_1000, 1).to_string(),
            "execute breakpoint at 0x401000",
        ),
        (bp.to_string(), "write watchpoint on 8 bytes at 0x1000"),
        (
            hw(HwKind::ReadWrite, 0x12, 2).to_string(),
            "read/write watchpoint on 2 bytes at 0x12",
        ),
        (
            HwError::Misaligned { addr: 0x1004, len: 8 }.to_string(),
            "address 0x1004 is not aligned to 8 bytes",
        ),
        (
            HwError::BadLength { len: 3 }.to_string(),
            "watchpoint length 3 is not 1, 2, 4 or 8",
        ),
        (
            HwError::Unsupported {
                ty: BreakpointType::ReadWatch,
            }
            .to_string(),
            "read watchpoint is not supported by x86 debug registers",
        ),
        (HwError::Full.to_string(), "all four debug address registers are in use"),
        (
            HwError::AlreadyPresent { bp }.to_string(),
            "write watchpoint on 8 bytes at 0x1000 is already set",
        ),
        (
            HwError::NotFound { bp }.to_string(),
            "write watchpoint on 8 bytes at 0x1000 is not set",
        ),
        (
            SwError::<()>::NotFound { addr: 0x10 }.to_string(),
            "no software breakpoint at 0x10",
        ),
        (
            SwError::Read { addr: 0x20, source: () }.to_string(),
            "cannot read guest memory at 0x20",
        ),
        (
            SwError::Write { addr: 0x21, source: () }.to_string(),
            "cannot write guest memory at 0x21",
        ),
        (
            SwError::<()>::CountOverflow { addr: 0x2 }.to_string(),
            "software breakpoint at 0x2 is inserted 4294967295 times already",
        ),
        (
            BreakpointError::<()>::Hw(HwError::Full).to_string(),
            "all four debug address registers are in use",
        ),
        (
            BreakpointError::<()>::Sw(SwError::NotFound { addr: 0x10 }).to_string(),
            "no software breakpoint at 0x10",
        ),
        (
            BreakpointError::<()>::UnknownType(UnknownBreakpointType(9)).to_string(),
            "unknown GDB breakpoint type 9",
        ),
        (
            DecodeError::UnexpectedException { exception: 14 }.to_string(),
            "debug exit with exception vector 14, expected 1 (#DB) or 3 (#BP)",
        ),
        (
            Hit {
                slot: Slot::DR1,
                breakpoint: bp,
            }
            .to_string(),
            "write watchpoint on 8 bytes at 0x1000 in DR1",
        ),
        (SlotMask::EMPTY.to_string(), "none"),
        (SlotMask::from_bits_truncate(0b1101).to_string(), "DR0|DR2|DR3"),
        (BreakpointType::Software.to_string(), "software breakpoint"),
        (BreakpointType::Hardware.to_string(), "hardware breakpoint"),
        (BreakpointType::WriteWatch.to_string(), "write watchpoint"),
        (BreakpointType::AccessWatch.to_string(), "access watchpoint"),
        (
            MemFault {
                addr: 0x20,
                write: false,
            }
            .to_string(),
            "injected read fault at 0x20",
        ),
        (
            format!("{:?}", ControlFlags::ENABLE | ControlFlags::USE_HW_BP),
            "ControlFlags(0x20001: ENABLE | USE_HW_BP)",
        ),
    ];
    for (have, want) in cases {
        assert_eq!(have, want);
    }
}

#[test]
fn len_and_slot_helpers() {
    assert_eq!([Len::B1, Len::B2, Len::B4, Len::B8].map(Len::bytes), [1, 2, 4, 8]);
    assert_eq!(Slot::ALL.map(Slot::index), [0, 1, 2, 3]);
    assert_eq!(Slot::ALL.map(Slot::get), [0, 1, 2, 3]);
}

#[test]
fn control_flags_set_operations_and_guest_debug_predicates() {
    let (e, ss, sw, hwbp) = (
        ControlFlags::ENABLE,
        ControlFlags::SINGLESTEP,
        ControlFlags::USE_SW_BP,
        ControlFlags::USE_HW_BP,
    );
    assert!(ControlFlags::NONE.is_empty() && ControlFlags::default().is_empty());
    assert!(!e.is_empty() && !ControlFlags::from_bits_retain(0x8000_0000).is_empty());
    assert_eq!((e | ss | sw).difference(ss).bits(), 0x1_0001);
    assert_eq!(
        (e | ss).difference(sw).bits(),
        0x3,
        "removing an absent flag changes nothing"
    );
    assert_eq!(e.difference(e), ControlFlags::NONE);
    assert_eq!(
        ControlFlags::from_bits_retain(0xffff_ffff).difference(hwbp).bits(),
        0xfffd_ffff
    );
    let mut c = e;
    c |= sw;
    assert_eq!(c.bits(), 0x1_0001);
    assert!(c.contains(e) && c.contains(sw) && !c.contains(hwbp) && c.contains(ControlFlags::NONE));
    let debug = |control: ControlFlags| GuestDebug {
        control,
        debugreg: [0; 8],
    };
    assert!(debug(e | sw).uses_sw_breakpoints());
    assert!(!debug(sw).uses_sw_breakpoints(), "USE_SW_BP without ENABLE");
    assert!(!debug(e | hwbp).uses_sw_breakpoints());
    assert!(debug(e | hwbp).uses_hw_breakpoints() && !debug(hwbp).uses_hw_breakpoints());
    assert!(debug(e | ss).single_step() && !debug(ss).single_step() && !debug(e).single_step());
    assert_eq!(debug(ControlFlags::NONE), GuestDebug::DISABLED);
    assert_eq!(*Applied::DISABLED.config(), GuestDebug::DISABLED);
    assert_eq!(Applied::was_set(debug(e | sw)).config().control.bits(), 0x1_0001);
}

#[test]
fn setting_an_enable_that_is_already_set_keeps_it() {
    for slot in Slot::ALL {
        let n = 2 * u32::from(slot.get());
        assert_eq!(Dr7::from_bits(!0).with_local(slot, true).into_bits(), !0);
        assert_eq!(Dr7::from_bits(!0).with_global(slot, true).into_bits(), !0);
        let l = Dr7::from_bits(0x400 | 1 << n);
        assert_eq!(l.with_local(slot, true), l);
        assert_eq!(l.with_global(slot, true).into_bits(), 0x400 | 0b11 << n);
    }
}

#[test]
fn gdb_type_numbers_are_0_to_4_in_gdb_order() {
    let all = [
        (0, BreakpointType::Software),
        (1, BreakpointType::Hardware),
        (2, BreakpointType::WriteWatch),
        (3, BreakpointType::ReadWatch),
        (4, BreakpointType::AccessWatch),
    ];
    for (n, ty) in all {
        assert_eq!(BreakpointType::try_from(n), Ok(ty));
        assert_eq!(u64::from(ty.gdb_number()), n);
        assert_eq!(BreakpointType::ALL[n as usize], ty);
    }
    for n in [5, 6, 255, 1 << 32, u64::MAX] {
        assert_eq!(BreakpointType::try_from(n), Err(UnknownBreakpointType(n)));
    }
    assert_eq!(BreakpointType::ReadWatch.to_string(), "read watchpoint");
}
