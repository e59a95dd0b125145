//! CPU oracle (WIP).
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod oracle;

#[test]
fn oracle_scratch_validation() {
    let Some(mut o) = oracle::spawn_or_skip() else { return };
    let b = oracle::buffer_addr();
    let rw = |slot: u64, rw: u64, len: u64| rw << (16 + 4 * slot) | len << (18 + 4 * slot);
    let mut t = |name: &str, dr: [u64; 4], dr7: u64| {
        let r = o.program(dr, dr7);
        println!("{name}: {r:?}");
    };
    t("len4 at +2 enabled", [b + 2, 0, 0, 0], 1 | rw(0, 1, 3));
    t("len4 at +2 disabled (after dr0 write)", [b + 2, 0, 0, 0], rw(0, 1, 3));
    t(
        "len4 at +2 disabled, slot1 (never written? dr1 written=0)",
        [b, 0, 0, 0],
        rw(1, 1, 3),
    );
    t("io enabled", [b, 0, 0, 0], 1 | rw(0, 2, 0));
    t("io disabled", [b, 0, 0, 0], rw(0, 2, 0));
    t("exec len4 enabled", [b, 0, 0, 0], 1 | rw(0, 0, 3));
    t("exec len4 disabled", [b, 0, 0, 0], rw(0, 0, 3));
    t("exec len1 unaligned", [b + 3, 0, 0, 0], 1 | rw(0, 0, 0));
    t("G only", [b, 0, 0, 0], 2 | rw(0, 1, 0));
    t("LE GE", [b, 0, 0, 0], 1 | 3 << 8 | rw(0, 1, 0));
    t("GD", [b, 0, 0, 0], 1 | 1 << 13 | rw(0, 1, 0));
    t("bit 10-15", [b, 0, 0, 0], 1 | 0xfc00 | rw(0, 1, 0));
    t("upper 32", [b, 0, 0, 0], 1 | 0xffff_ffff_0000_0000 | rw(0, 1, 0));
    t("kernel addr", [0xffff_8000_0000_0000, 0, 0, 0], 1 | rw(0, 1, 0));
    t("noncanonical", [0x0000_8000_0000_0000, 0, 0, 0], 1 | rw(0, 1, 0));
    t("last user page len 8", [0x7fff_ffff_fff8, 0, 0, 0], 1 | rw(0, 1, 2));
    t(
        "last user page len 8 top",
        [0x7fff_ffff_f000 - 8, 0, 0, 0],
        1 | rw(0, 1, 2),
    );
    t("null", [0, 0, 0, 0], 1 | rw(0, 1, 2));
    // dr write while enabled
    o.program([b, 0, 0, 0], 1 | rw(0, 1, 3)).unwrap();
    println!("poke dr0 +2 while len4 enabled: {:?}", o.poke_dr(0, b + 2));
    println!(
        "poke dr0 kernel while enabled: {:?}",
        o.poke_dr(0, 0xffff_8000_0000_0000)
    );
    o.poke_dr7(0).unwrap();
    println!(
        "poke dr0 +2 after dr7=0 (bp now exec len1 disabled): {:?}",
        o.poke_dr(0, b + 2)
    );
    println!("poke dr0 kernel after dr7=0: {:?}", o.poke_dr(0, 0xffff_8000_0000_0000));
    println!("poke dr4: {:?}", o.poke_dr(4, 0));
    println!(
        "poke dr6 garbage: {:?} then {:x?}",
        o.poke_dr(6, 0xffff_ffff),
        o.peek_dr(6)
    );
    println!(
        "peek dr7 after 0xfc01|...: {:?} {:x?}",
        o.poke_dr7(1 | 0xfc00 | rw(0, 1, 0)),
        o.peek_dr(7)
    );
}
