//! The `elf_vmm` example serving GDB on loopback TCP, driven packet by
//! packet by a GDB remote-protocol client of this test's own, on the C
//! guest (`tests/guest-c/`) with the symbols read from its ELF: the
//! real-guest end-to-end test that the KVM lanes can run (they have no gdb
//! binary and no binutils inside; `gdb_real_guest.rs` drives the same guest
//! with the real gdb on the host).
//!
//! What the server serves depends on the host's KVM: where `int3` exits do
//! not work (`kvm_pvm`) `Z0` takes a hardware execute slot, and where data
//! watchpoints do not fire `Z2` gets the empty "not supported" reply
//! (`src/gdb/target.rs`, `HostDebug`). The test asks the server
//! (`monitor served`, as `qRcmd`), asserts what that says, and prints one
//! `SKIPPED (part):` line for each part it could not check there.
//!
//! Needs an `elf_vmm` built with feature `gdb` (`ELF_VMM_BIN`, or `cargo
//! build -p kvm-glue --features gdb --example elf_vmm` beside the test);
//! one built without it (as plain `cargo test` builds it) gives a SKIPPED
//! line.

mod common;
mod elf_guest;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use elf_guest::{image_bytes, setup, symbols, Needs, NoServer, Vmm};

/// Long: under Bochs a continue to a breakpoint takes seconds.
const WAIT: Duration = Duration::from_secs(120);

/// A GDB remote-protocol client: one packet out, one answer back.
struct Rsp {
    s: TcpStream,
}

impl Rsp {
    fn connect(addr: &str) -> Rsp {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(WAIT)).expect("read timeout");
        Rsp { s }
    }

    fn send(&mut self, body: &str) {
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        self.s
            .write_all(format!("${body}#{sum:02x}").as_bytes())
            .expect("send a packet");
    }

    /// The next packet's body (escapes and run-length decoded), acked.
    fn recv(&mut self, after: &str) -> String {
        let mut byte = [0u8; 1];
        let mut next = |s: &mut TcpStream| match s.read(&mut byte) {
            Ok(1) => byte[0],
            other => panic!("no answer after {after:?} ({other:?})"),
        };
        while next(&mut self.s) != b'$' {} // acks
        let mut raw = Vec::new();
        loop {
            match next(&mut self.s) {
                b'#' => break,
                b => raw.push(b),
            }
        }
        let sum = [next(&mut self.s), next(&mut self.s)];
        let want = raw.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        assert_eq!(
            u8::from_str_radix(std::str::from_utf8(&sum).expect("hex"), 16).ok(),
            Some(want),
            "bad checksum after {after:?}"
        );
        self.s.write_all(b"+").expect("ack");
        let mut body: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'}' if i + 1 < raw.len() => {
                    body.push(raw[i + 1] ^ 0x20);
                    i += 2;
                }
                b'*' if i + 1 < raw.len() => {
                    let last = *body.last().expect("a run after a byte");
                    body.extend(std::iter::repeat_n(last, usize::from(raw[i + 1]) - 29));
                    i += 2;
                }
                b => {
                    body.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&body).into_owned()
    }

    fn ask(&mut self, body: &str) -> String {
        self.send(body);
        self.recv(body)
    }

    /// What `monitor CMD` printed (`O` packets up to the final `OK`).
    fn monitor(&mut self, cmd: &str) -> String {
        self.send(&format!("qRcmd,{}", hex(cmd.as_bytes())));
        let mut text = String::new();
        loop {
            let got = self.recv(cmd);
            match got.strip_prefix('O') {
                Some(h) if got != "OK" => text.push_str(&String::from_utf8_lossy(&unhex(h))),
                _ => {
                    assert_eq!(got, "OK", "monitor {cmd}");
                    return text;
                }
            }
        }
    }

    /// Register `n` (GDB's x86-64 order: rax rbx rcx rdx rsi rdi rbp rsp
    /// r8-r15 rip) of the thread `Hg` selected, from a `g` packet.
    fn reg(&mut self, tid: u64, n: usize) -> u64 {
        assert_eq!(self.ask(&format!("Hg{tid:x}")), "OK");
        let g = self.ask("g");
        assert!(g.len() >= 17 * 16, "short g packet: {g}");
        le64(&unhex(&g[n * 16..n * 16 + 16]))
    }

    fn mem(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let got = self.ask(&format!("m{addr:x},{len:x}"));
        assert_eq!(got.len(), 2 * len, "m{addr:x},{len:x} answered {got:?}");
        unhex(&got)
    }
}

const RDI: usize = 5;
const RSP: usize = 7;
const RIP: usize = 16;

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or_else(|_| panic!("not hex: {s}")))
        .collect()
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// A `T` stop reply: its signal and its `key:value` pairs.
fn stop_reply(got: &str) -> (u8, HashMap<String, String>) {
    let rest = got
        .strip_prefix('T')
        .unwrap_or_else(|| panic!("not a T stop reply: {got:?}"));
    let signal = u8::from_str_radix(&rest[..2], 16).expect("a signal");
    let pairs = rest[2..]
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once(':').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    (signal, pairs)
}

/// The thread of a stop reply (`thread:1` or `thread:p1.1`).
fn thread(pairs: &HashMap<String, String>, got: &str) -> u64 {
    let t = pairs.get("thread").unwrap_or_else(|| panic!("no thread in {got:?}"));
    let t = t.rsplit('.').next().expect("a tid");
    u64::from_str_radix(t, 16).unwrap_or_else(|_| panic!("thread {t} in {got:?}"))
}

/// The length of the first instruction of `fact` at -O0, decoded by hand:
/// `push %rbp` (55, SDM Vol. 2B PUSH: 50+rd) or `endbr64` (f3 0f 1e fa),
/// and what it does to RSP.
fn prologue(bytes: &[u8]) -> (u64, i64) {
    match bytes {
        [0x55, ..] => (1, -8),
        [0xf3, 0x0f, 0x1e, 0xfa, ..] => (4, 0),
        _ => panic!("fact does not start with push %rbp or endbr64: {bytes:02x?}"),
    }
}

#[test]
fn a_raw_gdb_client_breaks_steps_and_watches_in_the_c_guest() {
    let name = "a_raw_gdb_client_breaks_steps_and_watches_in_the_c_guest";
    let Some(s) = setup(name, Needs::Debug) else { return };
    let syms = symbols(&s.elf);
    let sym = |n: &str| {
        *syms
            .get(n)
            .unwrap_or_else(|| panic!("no symbol {n} in {}", s.elf.display()))
    };
    let (fact, counter) = (sym("fact"), sym("counter"));
    let code = image_bytes(&s.elf, fact, 4).expect("fact's bytes in the ELF");
    let (first_len, rsp_delta) = prologue(&code);
    // No timer: a step on vCPU 0 stays in fact (no interrupt lands in it).
    let mut vmm = match Vmm::try_start(&s, &["--hold", "--no-timer", "--gdb-port", "0"]) {
        Ok(vmm) => vmm,
        Err(NoServer::NoGdbFeature(_)) => {
            println!(
                "{name}: SKIPPED: {} was built without feature gdb \
                 (cargo build -p kvm-glue --features gdb --example elf_vmm, or set ELF_VMM_BIN)",
                s.vmm.display()
            );
            return;
        }
    };
    let mut rsp = Rsp::connect(vmm.target.as_deref().expect("a gdb address"));
    let supported = rsp.ask("qSupported:swbreak+;hwbreak+;vContSupported+");
    assert!(supported.contains("PacketSize="), "{supported}");
    assert!(rsp.ask("?").starts_with('T'), "held vCPUs report a stop");

    // What this host's server serves, in its own words.
    let served = rsp.monitor("served");
    println!("{name}: monitor served:\n{served}");
    let z0_int3 = if served.contains("break (Z0): int3 in guest memory") {
        true
    } else {
        assert!(served.contains("break (Z0): a hardware execute slot"), "{served}");
        false
    };
    let z2 = if served.contains("(Z2-Z4): debug-register slots") {
        true
    } else {
        assert!(served.contains("(Z2-Z4): not supported"), "{served}");
        false
    };

    // Z0 on fact; vCPU 0 calls fact(5) first.
    assert_eq!(rsp.ask(&format!("Z0,{fact:x},1")), "OK");
    // The breakpoint is invisible to reads, however it is served.
    assert_eq!(rsp.mem(fact, 4), code, "memory at fact with Z0 set");
    let got = rsp.ask("vCont;c");
    let (sig, pairs) = stop_reply(&got);
    assert_eq!(sig, 5, "{got}");
    assert!(
        pairs.contains_key(if z0_int3 { "swbreak" } else { "hwbreak" }),
        "Z0 served as {} must stop as such: {got}",
        if z0_int3 { "int3" } else { "an execute slot" }
    );
    let tid = thread(&pairs, &got);
    assert_eq!(tid, 1, "only vCPU 0 calls fact: {got}");
    assert_eq!(rsp.reg(tid, RIP), fact, "rip at the breakpoint");
    assert_eq!(rsp.reg(tid, RDI), 5, "the first call is fact(5)");
    let rsp_at_fact = rsp.reg(tid, RSP);

    // One instruction, vCPU 0 alone (the breakpoint under it stepped over).
    let got = rsp.ask(&format!("vCont;s:{tid:x}"));
    let (sig, pairs) = stop_reply(&got);
    assert_eq!((sig, thread(&pairs, &got)), (5, tid), "{got}");
    for k in ["swbreak", "hwbreak", "watch"] {
        assert!(!pairs.contains_key(k), "a step is no {k} stop: {got}");
    }
    assert_eq!(rsp.reg(tid, RIP), fact + first_len, "rip after one instruction");
    assert_eq!(
        rsp.reg(tid, RSP),
        rsp_at_fact.wrapping_add_signed(rsp_delta),
        "rsp after the prologue's first instruction"
    );

    // On to the next hit: the recursion's fact(4).
    let got = rsp.ask("vCont;c");
    let (sig, pairs) = stop_reply(&got);
    assert_eq!((sig, thread(&pairs, &got)), (5, 1), "{got}");
    assert_eq!(rsp.reg(tid, RIP), fact, "rip at the second hit");
    assert_eq!(rsp.reg(tid, RDI), 4, "fact(5) calls fact(4)");
    assert_eq!(rsp.ask(&format!("z0,{fact:x},1")), "OK");
    if !z0_int3 {
        println!(
            "{name}: SKIPPED (part): Z0 as an int3 in guest memory (this host's KVM delivers no int3 exits: \
             the server serves Z0 from an execute slot, checked instead)"
        );
    }

    // A write watchpoint on counter (a long): round 0 writes 0 + fact(5).
    let got = rsp.ask(&format!("Z2,{counter:x},8"));
    if z2 {
        assert_eq!(got, "OK", "Z2 where the server says it serves it");
        let got = rsp.ask("vCont;c");
        let (sig, pairs) = stop_reply(&got);
        assert_eq!((sig, thread(&pairs, &got)), (5, 1), "{got}");
        let addr = pairs.get("watch").unwrap_or_else(|| panic!("not a watch stop: {got}"));
        assert_eq!(u64::from_str_radix(addr, 16).ok(), Some(counter), "{got}");
        assert_eq!(le64(&rsp.mem(counter, 8)), 120, "counter after round 0's write");
        assert_eq!(rsp.ask(&format!("z2,{counter:x},8")), "OK");
    } else {
        assert_eq!(got, "", "Z2 where the server says it is not supported");
        println!(
            "{name}: SKIPPED (part): the Z2 write watchpoint's stop (this host's KVM does not fire data \
             breakpoints: the server refuses Z2, checked instead)"
        );
    }

    // Nothing set: the guest runs to its end, its output unchanged.
    let got = rsp.ask("vCont;c");
    assert_eq!(got, "W00", "the guest's end:\n{}", vmm.log());
    assert_eq!(vmm.wait(), 0, "{}", vmm.log());
    let log = vmm.log();
    for (round, total) in [(0, 120), (1, 240), (2, 360)] {
        let line = format!("guest: vcpu0: round {round}: fact(5) = 120, counter = {total}");
        assert!(log.contains(&line), "missing {line:?}:\n{log}");
    }
    println!(
        "{name}: checked Z0 ({}) hit twice with rip = fact {fact:#x}, rdi 5 then 4, a step to {:#x}, {}, W00",
        if z0_int3 { "int3" } else { "execute slot" },
        fact + first_len,
        if z2 { "a Z2 stop at counter = 120" } else { "Z2 refused" }
    );
}
