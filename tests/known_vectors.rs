//! DR7 values worked out by hand from the SDM's DR7 layout (Vol. 3B §18.2.4,
//! Figure 18-1: Gn = bit 2n+1, R/Wn = bits 16+4n..17+4n, LENn = bits
//! 18+4n..19+4n; R/W execute 00, write 01, read/write 11; LEN 1→00, 2→01,
//! 8→10, 4→11) and the seed's base value `0x600`, plus golden values seen on
//! real hardware (kvm-ioctls' single-step test, HOST.md).

use x86_debugreg::{BreakpointType as T, Dr6, Dr7, HwBreakpoint, HwKind, HwSlots};

fn dr7_of(bps: &[(HwKind, u64, u64)]) -> u64 {
    let mut slots = HwSlots::new();
    for &(kind, addr, len) in bps {
        slots
            .insert(HwBreakpoint::new(kind, addr, len).expect("valid"))
            .expect("free slot");
    }
    slots.dr7().into_bits()
}

#[test]
fn one_slot_each_kind_and_length_matches_hand_computed_dr7() {
    use HwKind::*;
    // 0x600 base | G0 (0x2) | R/W0 << 16 | LEN0 << 18
    let table: [(HwKind, u64, u64); 9] = [
        (Execute, 1, 0x0000_0602),
        (Write, 1, 0x0001_0602),     // 01 | 00<<2
        (Write, 2, 0x0005_0602),     // 01 | 01<<2
        (Write, 4, 0x000d_0602),     // 01 | 11<<2
        (Write, 8, 0x0009_0602),     // 01 | 10<<2
        (ReadWrite, 1, 0x0003_0602), // 11 | 00<<2
        (ReadWrite, 2, 0x0007_0602), // 11 | 01<<2
        (ReadWrite, 4, 0x000f_0602), // 11 | 11<<2
        (ReadWrite, 8, 0x000b_0602), // 11 | 10<<2
    ];
    for (kind, len, want) in table {
        assert_eq!(dr7_of(&[(kind, 0x1000, len)]), want, "{kind} len {len}");
    }
}

#[test]
fn two_three_and_four_slots_match_hand_computed_dr7() {
    use HwKind::*;
    // slot 1 write 4: G1 0x8, (01 | 11<<2) << 20 = 0xd0_0000
    assert_eq!(dr7_of(&[(Execute, 0x1000, 1), (Write, 0x2000, 4)]), 0x00d0_060a);
    // slot 2 access 8: G2 0x20, (11 | 10<<2) << 24 = 0xb00_0000
    assert_eq!(
        dr7_of(&[(Execute, 0x1000, 1), (Write, 0x2000, 4), (ReadWrite, 0x3000, 8)]),
        0x0bd0_062a
    );
    // slot 3 write 8: G3 0x80, (01 | 10<<2) << 28 = 0x9000_0000
    let four = dr7_of(&[
        (Execute, 0x1000, 1),
        (Write, 0x2000, 4),
        (ReadWrite, 0x3000, 8),
        (Write, 0x4000, 8),
    ]);
    assert_eq!(four, 0x9bd0_06aa);
}

/// The seed computed `len_code << (18 + n*4)` in `int`: slot 3 with 8 bytes
/// is `2 << 30`, negative, and sign-extended into DR7's reserved upper half
/// (`0xffff_ffff_9bd0_06aa`). The model keeps the upper half zero.
#[test]
fn slot_3_with_8_byte_length_does_not_sign_extend_like_the_seed() {
    let value = dr7_of(&[
        (HwKind::Execute, 0x1000, 1),
        (HwKind::Write, 0x2000, 4),
        (HwKind::ReadWrite, 0x3000, 8),
        (HwKind::Write, 0x4000, 8),
    ]);
    assert_eq!(value >> 32, 0);
    let seed = (0x9bd0_06aa_u32 as i32) as i64 as u64;
    assert_eq!(seed, 0xffff_ffff_9bd0_06aa);
    assert!(Dr7::new_checked(seed).is_err(), "the seed's value would #GP on MOV DR7");
    assert!(Dr7::new_checked(value).is_ok());
}

#[test]
fn seed_type_and_length_codes() {
    // type_code[]: HW 0x0, WRITE 0x1, ACCESS 0x3; len_code[]: 1→0, 2→1, 4→3, 8→2.
    for (ty, code) in [(T::Hardware, 0), (T::WriteWatch, 1), (T::AccessWatch, 3)] {
        let kind = HwKind::from_gdb(ty).expect("hardware type");
        assert_eq!(kind.condition().into_bits(), code);
    }
    for (len, code) in [(1, 0), (2, 1), (4, 3), (8, 2)] {
        assert_eq!(x86_debugreg::Len::from_bytes(len).map(|l| l.into_bits()), Some(code));
    }
    assert_eq!(HwSlots::new().dr7().into_bits(), 0x600);
}

/// kvm-ioctls' own single-step test asserts `dr6 & 0xffff == 0x4ff0` and
/// `dr7 == 1 << 10`; HOST.md saw `0xffff4ff0` and `0xffff0ff0 | 1 << slot`.
#[test]
fn golden_values_from_real_kvm_exits() {
    let step = Dr6::from_kvm(0xffff_4ff0);
    assert!(step.bs() && step.hit_mask() == 0);
    assert_eq!(step.into_bits() & 0xffff, 0x4ff0);
    assert_eq!(Dr7::EMPTY.into_bits(), 1 << 10);
    for n in 0..4 {
        assert_eq!(Dr6::from_kvm(0xffff_0ff0 | 1 << n).hit_mask(), 1 << n);
    }
}
