//! Round trips of the register types over arbitrary `u64`s, and of the
//! R/W and LEN codes.

//!
//! Expected values come from the SDM tables in `common/sdm.rs`, never from
//! the crate's own constants.

mod common;

use common::sdm;
use proptest::prelude::*;
use x86_debugreg::{Condition, Dr6, Dr7, Len, Slot};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// `from_bits`/`into_bits` keep every bit; `new_checked` accepts exactly
    /// the values without reserved bits and only adds bit 10.
    #[test]
    fn dr7_round_trips_every_u64(v in any::<u64>()) {
        prop_assert_eq!(Dr7::from_bits(v).into_bits(), v);
        prop_assert_eq!(u64::from(Dr7::from(v)), v);
        match Dr7::new_checked(v) {
            Ok(d) => {
                prop_assert_eq!(v & sdm::dr7_mbz(), 0);
                prop_assert_eq!(d.into_bits(), v | 1 << 10);
            }
            Err(e) => {
                prop_assert_eq!(e.reserved, v & sdm::dr7_mbz());
                prop_assert_eq!(e.value, v);
                prop_assert_ne!(e.reserved, 0);
            }
        }
    }

    /// Per-slot accessors read exactly the SDM's bits.
    #[test]
    fn dr7_slot_accessors_read_sdm_bits(v in any::<u64>(), n in 0..4u8) {
        let (d, slot) = (Dr7::from_bits(v), Slot::new(n).expect("0..4"));
        let n = u32::from(n);
        prop_assert_eq!(d.local(slot), v >> (2 * n) & 1 == 1);
        prop_assert_eq!(d.global(slot), v >> (2 * n + 1) & 1 == 1);
        prop_assert_eq!(u64::from(d.condition(slot).into_bits()), v >> (16 + 4 * n) & 3);
        prop_assert_eq!(u64::from(d.len(slot).into_bits()), v >> (18 + 4 * n) & 3);
        // Re-programming a slot with what it holds changes only Gn.
        let again = d.with_slot(slot, d.condition(slot), d.len(slot));
        prop_assert_eq!(again.into_bits(), v | 2 << (2 * n));
    }

    /// DR6 keeps raw values; `from_kvm` keeps the status bits except RTM,
    /// fixes every other bit to its at-rest value (the SDM table's), and is
    /// idempotent.
    #[test]
    fn dr6_round_trips_and_normalises_every_u64(v in any::<u64>()) {
        prop_assert_eq!(Dr6::from_bits(v).into_bits(), v);
        let n = Dr6::from_kvm(v);
        prop_assert_eq!(n.into_bits(), sdm::dr6_expected_from_kvm(v));
        prop_assert_eq!(Dr6::from_kvm(n.into_bits()), n);
        prop_assert_eq!(n.hits().fold(0u8, |m, s| m | 1 << s.get()), (v & 0xf) as u8);
        prop_assert_eq!(n.bs(), v & 1 << 14 != 0);
        prop_assert_eq!(n.bd(), v & 1 << 13 != 0);
        prop_assert_eq!(n.bt(), v & 1 << 15 != 0);
        prop_assert_eq!(n.bus_lock_detected(), v & 1 << 11 == 0);
        prop_assert!(!n.in_rtm_region());
    }
}

#[test]
fn len_and_condition_conversions_round_trip() {
    for code in 0..4u8 {
        assert_eq!(Len::from_bits(code).into_bits(), code);
        assert_eq!(Condition::from_bits(code).into_bits(), code);
        let len = Len::from_bits(code);
        assert_eq!(Len::from_bytes(len.bytes()), Some(len));
    }
    for bytes in (0..=64).chain([u64::MAX, 1 << 32]) {
        if let Some(len) = Len::from_bytes(bytes) {
            assert_eq!(len.bytes(), bytes);
        } else {
            assert!(![1, 2, 4, 8].contains(&bytes));
        }
    }
}
