//! Reproducers for gdbstub 0.7.10's own bugs that issue #19 reached from
//! the wire, against bare gdbstub: a toy single-thread target over paged
//! memory, no kvm-glue in between. The report texts are
//! `tests/upstream/gdbstub-*.md` (not filed; kept for whoever files them).
//!
//! Each test asserts gdbstub's behaviour *as of 0.7.10*: when one fails
//! after a gdbstub upgrade, the bug is fixed upstream and the guard in
//! kvm-glue's `gdb::wire` / `read_addrs` / `write_addrs` named in the report
//! may go. kvm-glue's own behaviour is `tests/gdb_wire.rs`.
#![cfg(feature = "gdb")]

use std::collections::{BTreeMap, VecDeque};
use std::panic::{self, AssertUnwindSafe};

use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::GdbStub;
use gdbstub::target::ext::base::singlethread::SingleThreadBase;
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;

const PAGE: u64 = 0x1000;
const EFAULT: u8 = 14;

/// Paged memory; `read_addrs` follows gdbstub's documented contract: the
/// bytes up to the first unmapped page, or an error if there are none.
#[derive(Default)]
struct Toy {
    pages: BTreeMap<u64, Vec<u8>>,
    /// Every `write_addrs` call: (address, bytes).
    writes: Vec<(u64, Vec<u8>)>,
}

impl Toy {
    /// Maps `page`, its bytes `high | 0..=15` over and over (no runs, so
    /// replies are not run-length encoded, and each page is recognisable).
    fn map(&mut self, page: u64, high: u8) {
        self.pages
            .insert(page, (0..PAGE).map(|i| high | (i % 16) as u8).collect());
    }
}

impl Target for Toy {
    type Arch = X86_64_SSE;
    type Error = ();
    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl SingleThreadBase for Toy {
    fn read_registers(&mut self, _: &mut X86_64CoreRegs) -> TargetResult<(), Self> {
        Ok(())
    }
    fn write_registers(&mut self, _: &X86_64CoreRegs) -> TargetResult<(), Self> {
        Ok(())
    }
    fn read_addrs(&mut self, start: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let mut done = 0;
        while done < data.len() {
            let at = start.wrapping_add(done as u64);
            let Some(page) = self.pages.get(&(at & !(PAGE - 1))) else {
                break;
            };
            let off = (at % PAGE) as usize;
            let n = (PAGE as usize - off).min(data.len() - done);
            data[done..done + n].copy_from_slice(&page[off..off + n]);
            done += n;
        }
        if done == 0 {
            return Err(TargetError::Errno(EFAULT));
        }
        Ok(done)
    }
    fn write_addrs(&mut self, start: u64, data: &[u8]) -> TargetResult<(), Self> {
        self.writes.push((start, data.to_vec()));
        Ok(())
    }
}

/// Bytes in, bytes out.
#[derive(Default)]
struct Pipe {
    out: Vec<u8>,
}

impl Connection for Pipe {
    type Error = ();
    fn write(&mut self, byte: u8) -> Result<(), ()> {
        self.out.push(byte);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

fn frame(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Feeds `packets` to a fresh gdbstub (its default, owned 4096-byte
/// buffer); the reply bodies, in order.
fn run(toy: &mut Toy, packets: &[&str]) -> Vec<String> {
    let mut input: VecDeque<u8> = packets.iter().flat_map(|p| frame(p)).collect();
    let mut gdb = GdbStub::new(Pipe::default()).run_state_machine(toy).expect("starts");
    while let Some(byte) = input.pop_front() {
        gdb = match gdb {
            GdbStubStateMachine::Idle(g) => g.incoming_data(toy, byte).expect("handled"),
            other => panic!("not idle: {}", state(&other)),
        };
    }
    let GdbStubStateMachine::Idle(mut g) = gdb else {
        panic!("not idle at the end")
    };
    let out = String::from_utf8_lossy(&std::mem::take(&mut g.borrow_conn().out)).into_owned();
    out.split('$')
        .skip(1)
        .filter_map(|p| p.split('#').next().map(str::to_owned))
        .collect()
}

fn state<T: Target, C: Connection>(s: &GdbStubStateMachine<'_, T, C>) -> &'static str {
    match s {
        GdbStubStateMachine::Idle(_) => "idle",
        GdbStubStateMachine::Running(_) => "running",
        GdbStubStateMachine::CtrlCInterrupt(_) => "ctrl-c",
        GdbStubStateMachine::Disconnected(_) => "disconnected",
    }
}

/// gdbstub-m-address-overflow.md
#[test]
fn gdbstub_0_7_10_m_adds_its_chunk_offset_to_the_address_unchecked() {
    let mut toy = Toy::default();
    toy.map(0xffff_ffff_ffff_e000, 0x11);
    toy.map(0xffff_ffff_ffff_f000, 0x22);
    let got = panic::catch_unwind(AssertUnwindSafe(|| run(&mut toy, &["mffffffffffffe000,4000"])));
    // Debug builds: "attempt to add with overflow" in the m handler.
    assert!(got.is_err(), "no panic: {got:?}");
}

/// gdbstub-owned-buffer-grows.md
#[test]
fn gdbstub_0_7_10_grows_its_owned_packet_buffer_and_advertises_the_new_size() {
    let mut toy = Toy::default();
    toy.map(0x3_0000, 0x00);
    toy.map(0x3_1000, 0x00);
    let big = format!("M30000,1068:{}", "62".repeat(0x1068));
    let replies = run(
        &mut toy,
        &["qSupported:multiprocess+", &big, "qSupported:multiprocess+"],
    );
    let sizes: Vec<&str> = replies
        .iter()
        .filter(|r| r.starts_with("PacketSize="))
        .map(|r| &r[..16])
        .collect();
    assert_eq!(sizes[0], "PacketSize=1000;");
    assert_ne!(sizes[1], "PacketSize=1000;", "{sizes:?}");
}

/// gdbstub-m-short-read-splice.md
#[test]
fn gdbstub_0_7_10_m_goes_on_after_a_short_read_and_splices_the_hole_shut() {
    let mut toy = Toy::default();
    toy.map(0x20_0000, 0xa0);
    toy.map(0x20_2000, 0xb0);
    // After a packet longer than 4096 bytes has grown the buffer, and with
    // it the chunk the m loop steps by (gdbstub-owned-buffer-grows.md).
    let big = format!("M30000,1068:{}", "62".repeat(0x1068));
    let replies = run(&mut toy, &[&big, "m200000,3000"]);
    let reply = &replies[1];
    // 0x201000 is not mapped: at most 4096 bytes (8192 hex digits) are
    // readable from 0x200000 on, but bytes of 0x202000 follow them.
    assert!(reply.len() > 8192, "{} hex digits", reply.len());
    assert!(reply.contains("b0b1b2b3"), "no bytes from past the hole");
}

/// gdbstub-m-data-then-error.md
#[test]
fn gdbstub_0_7_10_m_sends_data_and_an_error_in_one_reply() {
    let mut toy = Toy::default();
    toy.map(0x1f_f000, 0xc0);
    let replies = run(&mut toy, &["m1ff000,2000"]);
    let reply = &replies[0];
    assert!(reply.starts_with("c0c1c2"), "{}", &reply[..8]);
    assert!(reply.ends_with("E0e"), "{}", &reply[reply.len() - 8..]);
}

/// gdbstub-M-ignores-length.md
#[test]
fn gdbstub_0_7_10_m_upper_writes_its_data_whatever_its_length_says() {
    let mut toy = Toy::default();
    let replies = run(&mut toy, &["M30000,1:aabbccdd"]);
    assert_eq!(replies, ["OK"]);
    assert_eq!(toy.writes, [(0x3_0000, vec![0xaa, 0xbb, 0xcc, 0xdd])]);
}

/// gdbstub-M-X-any-separator.md
#[test]
fn gdbstub_0_7_10_m_upper_and_x_upper_split_their_fields_at_any_comma_or_colon() {
    let mut toy = Toy::default();
    let replies = run(&mut toy, &["M30000:2,aabb", "X30010:1,Z"]);
    assert_eq!(replies, ["OK", "OK"]);
    assert_eq!(toy.writes, [(0x3_0000, vec![0xaa, 0xbb]), (0x3_0010, vec![b'Z'])]);
}
