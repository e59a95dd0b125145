//! Issue #19: garbage on the debugger socket never crashes the server, hangs
//! it or makes it lie. One test per rule, each with the raw packets that
//! broke it, against `serve_connection` on simulated vCPUs (`wire/mod.rs`); no
//! `gdb`, no KVM. Expected bytes come from the simulated memory image and
//! the page tables in `wire/mod.rs`, never from the server.
#![cfg(feature = "gdb")]

mod wire;

use std::time::Duration;

use kvm_glue::{AddressSpace, BreakpointType, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use wire::{gpa_of, handshake, image, is_error, is_stop, unhex, Reply, SimVm, HOLE_BEFORE, TOP_PAGE};
use x86_debugreg::watch::{Watch, WatchKind};

/// The bytes a read of `len` at `gva` must return, up to the first byte no
/// page maps to guest memory.
fn expected(gva: u64, len: u64) -> Vec<u8> {
    let img = image();
    (0..len)
        .map_while(|i| gva.checked_add(i).and_then(gpa_of).map(|gpa| img[gpa as usize]))
        .collect()
}

fn hex_reply(r: &Reply) -> Vec<u8> {
    match r {
        Reply::Packet(b) => unhex(b).unwrap_or_else(|| panic!("not (only) hex: {}", r.text())),
        other => panic!("no packet: {other:?}"),
    }
}

/// A packet of 8 KiB and more, twice what the server advertises.
fn oversized() -> String {
    format!("qRcmd,{}", "62".repeat(4200))
}

fn thread_count(r: &Reply) -> usize {
    match r {
        Reply::Packet(b) if b.first() == Some(&b'm') => b[1..].split(|&c| c == b',').count(),
        other => panic!("not a thread list: {other:?}"),
    }
}

// Item 1 --------------------------------------------------------------------

#[test]
fn a_read_watch_too_large_for_the_slots_is_refused_before_its_bytes_are_read() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let dbg = VmDebug::new(mem);
    // 2^64 - 1 bytes, then 1 TiB: neither fits four slots of 8 bytes, so
    // neither may size a buffer (the first overflowed `vec!`'s capacity, the
    // second aborted the process allocating it).
    for len in [u64::MAX, 1 << 40] {
        let watch = Watch::new(WatchKind::Read, 0, len).expect("a range inside the address space");
        let got = dbg.insert_watch(AddressSpace::Physical, watch).expect("not an error");
        assert_eq!(got, None, "len {len:#x}");
    }
    assert!(dbg.watch_slots().expect("slots").is_empty());
    // One that fits still reads its bytes and goes in.
    let small = Watch::new(WatchKind::Read, 0x100, 4).expect("watch");
    assert!(dbg
        .insert_watch(AddressSpace::Physical, small)
        .expect("insert")
        .is_some());
}

#[test]
fn a_huge_rwatch_from_the_wire_leaves_every_vcpu_alive() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    for z in ["Z3,0,ffffffffffffffff", "Z3,0,10000000000"] {
        let r = s.client.ask(z);
        assert!(matches!(r, Reply::Packet(_)), "{z}: {r:?}");
        assert!(
            !matches!(&r, Reply::Packet(b) if b == b"OK"),
            "{z}: OK for a watchpoint no slot can hold"
        );
    }
    assert_eq!(thread_count(&s.client.ask("qfThreadInfo")), 2);
    s.end();
    assert_eq!(vm.failures(), Vec::<String>::new());
}

// Item 2 --------------------------------------------------------------------

#[test]
fn a_read_running_to_the_top_of_the_address_space_never_overflows_the_address() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    // A packet larger than the advertised size is refused, and does not
    // grow the buffer the `m` loop steps by.
    let big = s.client.ask(&oversized());
    assert!(is_error(&big), "{}", big.text());
    for (addr, len) in [
        (TOP_PAGE - 0x1000, 0x4000),
        (TOP_PAGE - 0x1000, 0x2000),
        (u64::MAX - 3, 0x100),
    ] {
        let r = s.client.ask(&format!("m{addr:x},{len:x}"));
        let got = hex_reply(&r);
        let want = expected(addr, len);
        assert!(!got.is_empty(), "m{addr:x},{len:x}: nothing read");
        assert_eq!(got[..], want[..got.len()], "m{addr:x},{len:x}");
    }
    assert!(is_stop(&s.client.ask("?")), "the session goes on");
    s.end();
}

// Item 3 --------------------------------------------------------------------

#[test]
fn ctrl_c_while_stopped_reports_nothing_and_the_next_continue_really_runs() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    // Ctrl-C crossing a stop already on the wire: the target is stopped.
    s.client.send_raw(&[0x03]);
    s.client.send(b"c");
    let early = s.client.reply(Duration::from_millis(300));
    if early != Reply::Timeout {
        // Any reply now must be a real stop, with every vCPU stopped.
        assert!(vm.all_held(), "{} while the vCPUs run", early.text());
    }
    s.client.send_raw(&[0x03]);
    let stop = s.client.reply(wire::HANG);
    assert!(is_stop(&stop), "{}", stop.text());
    assert!(vm.all_held());
    let regs = s.client.ask("g");
    assert!(
        unhex(match &regs {
            Reply::Packet(b) => b,
            _ => panic!("{regs:?}"),
        })
        .is_some(),
        "{}",
        regs.text()
    );
    s.end();
}

// Item 4 --------------------------------------------------------------------

#[test]
fn a_read_across_a_hole_returns_the_bytes_before_it_and_nothing_after() {
    for grow_first in [false, true] {
        let vm = SimVm::new();
        let mut s = vm.connect();
        handshake(&mut s.client);
        if grow_first {
            assert!(is_error(&s.client.ask(&oversized())));
        }
        let r = s.client.ask(&format!("m{HOLE_BEFORE:x},3000"));
        let got = hex_reply(&r);
        // 0x200000 is mapped, 0x201000 is not: at most its 4096 bytes.
        let want = expected(HOLE_BEFORE, 0x3000);
        assert_eq!(want.len(), 0x1000);
        assert!(got.len() <= 0x1000, "{} bytes, the hole spliced shut", got.len());
        assert_eq!(got[..], want[..got.len()]);
        s.end();
    }
}

// Item 5 --------------------------------------------------------------------

#[test]
fn a_read_that_fails_part_way_is_data_or_an_error_never_both() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    // 0x300000 maps the last page of guest memory; 0x301000 maps a page
    // past its end.
    let r = s.client.ask("m300000,2000");
    let got = hex_reply(&r);
    assert_eq!(got[..], expected(0x30_0000, 0x2000)[..got.len()]);
    assert!(is_error(&s.client.ask("m301000,10")), "nothing readable: an error");
    s.end();
}

// Item 6 --------------------------------------------------------------------

#[test]
fn a_write_must_carry_exactly_as_many_bytes_as_its_length_says() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    for packet in ["M1000,1:aabbccdd", "M1000,4:aa", "X1000,1:abcd"] {
        let r = s.client.ask(packet);
        assert!(is_error(&r), "{packet}: {}", r.text());
    }
    assert_eq!(s.client.ask("M1000,2:aabb"), Reply::Packet(b"OK".to_vec()));
    s.end();
    let mut want = image();
    want[0x1000] = 0xaa;
    want[0x1001] = 0xbb;
    assert_eq!(vm.memory()[0x1000..0x1004], want[0x1000..0x1004]);
}

/// GDB's remote protocol: `M addr,length:XX…` and `X addr,length:XX…`, in
/// that order. gdbstub 0.7.10 splits either packet at any `,` or `:`, so
/// `M1000:2,aabb` wrote two bytes at 0x1000 (the `gdb_session` fuzz target
/// found it: `$M10a1:0a,0bbccdd#b9`). A packet not in the protocol's form is
/// an error and writes nothing, whatever its fields would have said.
#[test]
fn a_write_whose_fields_are_not_addr_comma_length_colon_data_is_refused_and_writes_nothing() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    for packet in [
        "M1000:2,aabb",
        "M1000:2:aabb",
        "M1000,2,aabb",
        "M10a1:0a,0bbccdd",
        "M1000,:aabb",
        "M,2:aabb",
        "M1000,2:aabbc",
        "M1000,2:aabbx",
        "X1000:2,ab",
        "X1000,2,ab",
        "X,2:ab",
    ] {
        let r = s.client.ask(packet);
        assert!(is_error(&r), "{packet}: {}", r.text());
    }
    // The protocol's form still writes (a colon or comma inside X's binary
    // data is data).
    assert_eq!(s.client.ask("X1002,2::,"), Reply::Packet(b"OK".to_vec()));
    s.end();
    let mut want = image();
    want[0x1002] = b':';
    want[0x1003] = b',';
    assert_eq!(vm.memory()[0x1000..0x1004], want[0x1000..0x1004]);
    assert_eq!(vm.memory()[0x10a1..0x10ab], image()[0x10a1..0x10ab]);
}

// Item 7 --------------------------------------------------------------------

#[test]
fn non_canonical_addresses_are_refused_for_reads_writes_and_breakpoints() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    // Each aliases low memory through KVM_TRANSLATE (bits 47:0): a CPU
    // raises #GP for them.
    for packet in [
        "m8000000000010400,5",
        "M8000000000003000,1:77",
        "Z0,8000000000010300,1",
        "Z1,8000000000000300,1",
        "Z2,8000000000003000,4",
        "Z2,7ffffffffffe,4",
        "m0000800000000000,1",
        "mffff7fffffffffff,1",
    ] {
        let r = s.client.ask(packet);
        assert!(is_error(&r), "{packet}: {}", r.text());
    }
    // A read up to the canonical boundary stops there.
    let r = s.client.ask("m7ffffffffff8,10");
    assert_eq!(hex_reply(&r), expected(0x7fff_ffff_fff8, 8));
    assert_eq!(thread_count(&s.client.ask("qfThreadInfo")), 2);
    s.end();
    assert_eq!(vm.memory(), image(), "nothing written, no int3 planted");
}

// Item 8 --------------------------------------------------------------------

#[test]
fn the_last_bytes_of_the_address_space_read_and_write_like_any_other() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    let r = s.client.ask("mfffffffffffffff0,10");
    assert_eq!(hex_reply(&r), expected(0xffff_ffff_ffff_fff0, 0x10));
    assert_eq!(s.client.ask("Mffffffffffffffff,1:5a"), Reply::Packet(b"OK".to_vec()));
    assert_eq!(s.client.ask("Mfffffffffffffffe,2:1234"), Reply::Packet(b"OK".to_vec()));
    // Past the end: the bytes up to it, never wrapped round to address 0.
    let r = s.client.ask("mfffffffffffffff8,20");
    let got = hex_reply(&r);
    assert_eq!(got.len(), 8);
    assert_eq!(got[6..], [0x12, 0x34]);
    assert!(
        is_error(&s.client.ask("Mffffffffffffffff,2:0000")),
        "a write past the end"
    );
    s.end();
    let top = gpa_of(u64::MAX).expect("the top byte is mapped") as usize;
    let now = vm.memory();
    assert_eq!(now[top - 1..=top], [0x12, 0x34]);
    assert_eq!(now[..top - 1], image()[..top - 1]);
}

// Item 9 --------------------------------------------------------------------

#[test]
fn a_resume_naming_no_existing_thread_is_an_error_and_runs_nothing() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    for packets in [
        &["vCont"][..],
        &["Hc3", "s"],
        &["vCont;s:3"],
        &["vCont;c:5"],
        &["vCont*R?"],
    ] {
        let (last, before) = packets.split_last().expect("a packet");
        for p in before {
            assert_eq!(s.client.ask(p), Reply::Packet(b"OK".to_vec()), "{p}");
        }
        let r = s.client.ask(last);
        assert!(is_error(&r), "{packets:?}: {}", r.text());
        assert!(vm.all_held(), "{packets:?} released a vCPU");
    }
    // The session goes on, and a real resume still works.
    assert_eq!(s.client.ask("Hc1"), Reply::Packet(b"OK".to_vec()));
    let stop = s.client.ask("vCont;s:1");
    assert!(is_stop(&stop), "{}", stop.text());
    s.end();
}

// Item 10 -------------------------------------------------------------------

#[test]
fn bytes_outside_packets_are_ignored() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    s.client.send_raw(b"\n\r GET / HTTP/1.0\r\n\r\n");
    handshake(&mut s.client);
    s.client.send_raw(b"\nxyz");
    assert_eq!(thread_count(&s.client.ask("qfThreadInfo")), 2);
    s.end();
}

#[test]
fn a_connection_that_never_sent_a_packet_releases_nothing() {
    let vm = SimVm::new();
    // A debugger came and went (a stop reported, then detach): the guest
    // runs; then the VMM holds its vCPUs for the next one.
    let mut s = vm.connect();
    handshake(&mut s.client);
    assert!(is_stop(&s.client.ask("vCont;s:1")));
    assert_eq!(s.client.ask("D"), Reply::Packet(b"OK".to_vec()));
    s.wait();
    vm.dbg.stop_all(Duration::from_secs(10)).expect("held again");
    // The VMM's own breakpoint, set while it holds the vCPUs for GDB.
    vm.dbg
        .insert(AddressSpace::Physical, BreakpointType::Hardware, 0x800, 1)
        .expect("insert");
    assert_eq!(vm.dbg.watch_slots().expect("slots").used(), 1);
    for probe in [&b"\n"[..], b"", b"$bad#00", b"+\x03"] {
        let mut s = vm.connect();
        s.client.send_raw(probe);
        s.end();
        assert!(vm.all_held(), "{probe:?} released the vCPUs");
        assert_eq!(
            vm.dbg.watch_slots().expect("slots").used(),
            1,
            "{probe:?}: the VMM's breakpoint"
        );
    }
    // The debugger that connects next finds the guest as the VMM held it.
    let mut s = vm.connect();
    handshake(&mut s.client);
    assert_eq!(thread_count(&s.client.ask("qfThreadInfo")), 2);
    s.end();
}

#[test]
fn thread_extra_info_for_a_thread_that_does_not_exist_is_an_error() {
    let vm = SimVm::new();
    let mut s = vm.connect();
    handshake(&mut s.client);
    for id in ["3e7", "0", "-1"] {
        let r = s.client.ask(&format!("qThreadExtraInfo,{id}"));
        assert!(is_error(&r), "{id}: {}", r.text());
    }
    let r = s.client.ask("qThreadExtraInfo,2");
    assert_eq!(hex_reply(&r), b"vCPU 1");
    s.end();
}
