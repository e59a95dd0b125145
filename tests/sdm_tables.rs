//! The crate's DR7/DR6 constants and accessors checked bit by bit against
//! the SDM tables typed out in `common/sdm.rs` (not against themselves).

mod common;

use common::sdm::{self, Dr6Bit, Dr7Bit, DR6, DR7};
use x86_debugreg::dr6::{DR6_AT_REST, DR6_STATUS_MASK};
use x86_debugreg::dr7::{Dr7Error, DR7_FIXED1, DR7_GE_FIXED, DR7_RESERVED_MASK};
use x86_debugreg::{Condition, Dr6, Dr7, Len, Slot};

#[test]
fn tables_list_every_bit_once_in_order() {
    for (i, (n, _)) in DR7.iter().enumerate() {
        assert_eq!(*n as usize, i, "DR7 row {i}");
    }
    for (i, (n, _)) in DR6.iter().enumerate() {
        assert_eq!(*n as usize, i, "DR6 row {i}");
    }
}

#[test]
fn dr7_constants_match_the_sdm_table() {
    assert_eq!(DR7_RESERVED_MASK, sdm::dr7_mbz());
    assert_eq!(DR7_FIXED1, sdm::dr7_mask(|b| b == Dr7Bit::Fixed1));
    assert_eq!(
        DR7_GE_FIXED,
        sdm::dr7_mask(|b| b == Dr7Bit::Fixed1 || b == Dr7Bit::Field("GE"))
    );
    // The hand-computed values, as a second opinion on the table.
    assert_eq!(sdm::dr7_mbz(), 0xffff_ffff_0000_d000);
    assert_eq!(Dr7::EMPTY.into_bits(), 0x400);
    assert_eq!(Dr7::default().into_bits(), 0x400);
}

#[test]
fn dr7_new_checked_refuses_exactly_the_must_be_zero_bits_one_by_one() {
    for (n, kind) in DR7 {
        let value = 1u64 << n;
        let got = Dr7::new_checked(value);
        match kind {
            Dr7Bit::MustBeZero => assert_eq!(got, Err(Dr7Error { value, reserved: value }), "bit {n}"),
            _ => assert_eq!(got.map(Dr7::into_bits), Ok(value | 0x400), "bit {n}"),
        }
        // With every other bit set too: only the reserved ones are named.
        let all = !0u64;
        assert_eq!(Dr7::new_checked(all).map_err(|e| e.reserved), Err(sdm::dr7_mbz()));
    }
}

/// The named bitfield accessor for a DR7 field, by SDM name.
fn dr7_field(d: Dr7, name: &str) -> u64 {
    let slot = |c: char| Slot::new(c as u8 - b'0').expect("slot digit");
    match name {
        "L0" => d.l0().into(),
        "G0" => d.g0().into(),
        "L1" => d.l1().into(),
        "G1" => d.g1().into(),
        "L2" => d.l2().into(),
        "G2" => d.g2().into(),
        "L3" => d.l3().into(),
        "G3" => d.g3().into(),
        "LE" => d.le().into(),
        "GE" => d.ge().into(),
        "RTM" => d.rtm().into(),
        "GD" => d.gd().into(),
        _ if name.starts_with("R/W") => {
            let s = slot(name.chars().nth(3).expect("digit"));
            let bit = u32::from(name.ends_with(".1"));
            u64::from(d.condition(s).into_bits() >> bit & 1)
        }
        _ if name.starts_with("LEN") => {
            let s = slot(name.chars().nth(3).expect("digit"));
            let bit = u32::from(name.ends_with(".1"));
            u64::from(d.len(s).into_bits() >> bit & 1)
        }
        _ => panic!("no accessor for {name}"),
    }
}

#[test]
fn dr7_every_field_bit_is_read_by_its_sdm_named_accessor_and_no_other() {
    let fields: Vec<(u32, &str)> = DR7
        .iter()
        .filter_map(|(n, b)| match b {
            Dr7Bit::Field(name) => Some((*n, *name)),
            _ => None,
        })
        .collect();
    for &(n, _) in &fields {
        let d = Dr7::from_bits(1 << n);
        for &(_, other) in &fields {
            assert_eq!(
                dr7_field(d, other),
                u64::from(DR7[n as usize].1 == Dr7Bit::Field(other)),
                "bit {n}, {other}"
            );
        }
    }
    // The per-slot enable accessors agree with the table's Ln/Gn bits.
    for slot in Slot::ALL {
        let (l, g) = (2 * u32::from(slot.get()), 2 * u32::from(slot.get()) + 1);
        assert_eq!(DR7[l as usize].1, Dr7Bit::Field(["L0", "L1", "L2", "L3"][slot.index()]));
        assert_eq!(DR7[g as usize].1, Dr7Bit::Field(["G0", "G1", "G2", "G3"][slot.index()]));
        let local = Dr7::from_bits(1 << l);
        let global = Dr7::from_bits(1 << g);
        assert!(local.local(slot) && !local.global(slot) && local.enabled(slot));
        assert!(!global.local(slot) && global.global(slot) && global.enabled(slot));
        assert_eq!(Dr7::EMPTY.with_local(slot, true).into_bits(), 0x400 | 1 << l);
        assert_eq!(Dr7::EMPTY.with_global(slot, true).into_bits(), 0x400 | 1 << g);
        assert_eq!(Dr7::from_bits(!0).with_local(slot, false).into_bits(), !(1u64 << l));
        assert_eq!(Dr7::from_bits(!0).with_global(slot, false).into_bits(), !(1u64 << g));
        for other in Slot::ALL.into_iter().filter(|&o| o != slot) {
            assert!(!local.enabled(other) && !global.enabled(other));
        }
    }
}

#[test]
fn dr7_with_slot_writes_only_the_slots_rw_len_and_gn_bits_of_the_table() {
    for slot in Slot::ALL {
        let k = slot.get();
        let own = |name: &str| {
            name == format!("G{k}") || name.starts_with(&format!("R/W{k}")) || name.starts_with(&format!("LEN{k}"))
        };
        let touched: u64 = DR7
            .iter()
            .filter(|(_, b)| matches!(b, Dr7Bit::Field(name) if own(name)))
            .fold(0, |m, (n, _)| m | 1 << n);
        for base in [0u64, !0, 0x400, 0xaaaa_aaaa_aaaa_aaaa] {
            let d = Dr7::from_bits(base).with_slot(slot, Condition::ReadWrite, Len::B4);
            assert_eq!(d.into_bits(), base | touched, "slot {k}, base {base:#x}");
            let d = Dr7::from_bits(base).with_slot(slot, Condition::Execute, Len::B1);
            let gn = 1u64 << (2 * k + 1);
            assert_eq!(d.into_bits(), (base & !touched) | gn, "slot {k}, base {base:#x}");
        }
    }
}

#[test]
fn dr6_constants_match_the_sdm_table() {
    assert_eq!(DR6_AT_REST, sdm::dr6_at_rest());
    assert_eq!(DR6_STATUS_MASK, sdm::dr6_mask(|b| matches!(b, Dr6Bit::Status(..))));
    assert_eq!(Dr6::AT_REST.into_bits(), sdm::dr6_at_rest());
    // Hand-computed second opinion: bits 4-11 and 16-31 at rest.
    assert_eq!(sdm::dr6_at_rest(), 0xffff_0ff0);
    assert_eq!(sdm::dr6_kept(), 0xe80f);
}

/// The named accessor of a DR6 status bit.
fn dr6_field(d: Dr6, name: &str) -> bool {
    match name {
        "B0" => d.b0(),
        "B1" => d.b1(),
        "B2" => d.b2(),
        "B3" => d.b3(),
        "BLD" => d.bld(),
        "BD" => d.bd(),
        "BS" => d.bs(),
        "BT" => d.bt(),
        "RTM" => d.rtm(),
        _ => panic!("no accessor for {name}"),
    }
}

#[test]
fn dr6_from_kvm_keeps_or_rests_each_bit_as_the_table_says() {
    let rest = sdm::dr6_at_rest();
    for (n, kind) in DR6 {
        // Flip one bit away from rest: kept bits stay flipped, others rest.
        let raw = rest ^ 1 << n;
        let got = Dr6::from_kvm(raw).into_bits();
        let want = if sdm::dr6_from_kvm_keeps(n) { raw } else { rest };
        assert_eq!(got, want, "bit {n} ({kind:?}) flipped from rest");
        // Raw values keep every bit.
        assert_eq!(Dr6::from_bits(raw).into_bits(), raw);
        if let Dr6Bit::Status(name, at_rest) = kind {
            assert_eq!(dr6_field(Dr6::from_bits(rest), name), at_rest == 1, "{name} at rest");
            assert_eq!(dr6_field(Dr6::from_bits(raw), name), at_rest == 0, "{name} flipped");
        }
    }
    for raw in [0, !0, 0xfffe_0ff0, 0xffff_4ff0, 0x0000_e80f, 0xdead_beef_f00d_cafe] {
        assert_eq!(
            Dr6::from_kvm(raw).into_bits(),
            sdm::dr6_expected_from_kvm(raw),
            "{raw:#x}"
        );
    }
}

#[test]
fn dr6_status_helpers_read_the_table_bits() {
    let rest = sdm::dr6_at_rest();
    let d = Dr6::from_bits(rest);
    assert!(!d.bus_lock_detected() && !d.in_rtm_region() && d.hit_mask() == 0);
    let bld = Dr6::from_bits(rest & !(1 << 11));
    assert!(bld.bus_lock_detected() && !bld.in_rtm_region());
    let rtm = Dr6::from_bits(rest & !(1 << 16));
    assert!(rtm.in_rtm_region() && !rtm.bus_lock_detected());
    // from_kvm never reports an RTM region (bit 16 cannot be trusted).
    assert!(!Dr6::from_kvm(rest & !(1 << 16)).in_rtm_region());
    for slot in Slot::ALL {
        let d = Dr6::from_bits(rest | 1 << slot.get());
        assert_eq!(d.hits().collect::<Vec<_>>(), [slot]);
        assert_eq!(d.hit_mask(), 1 << slot.get());
        assert!(Slot::ALL.iter().all(|&s| d.hit(s) == (s == slot)));
    }
    assert_eq!(Dr6::from_bits(rest | 0xf).hits().count(), 4);
}
