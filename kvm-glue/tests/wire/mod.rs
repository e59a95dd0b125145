//! Raw GDB packets against kvm-glue's server, no `gdb` and no KVM: shared by
//! `tests/gdb_wire.rs` (one test per rule of issue #19), `tests/gdb_wire_corpus.rs`
//! (the fuzz corpus under `cargo test`) and `fuzz/fuzz_targets/gdb_session.rs`
//! (which includes this file by path).
//!
//! * [`SimVm`]: guest memory, two [`FakeVcpu`]s and a thread each running
//!   the VMM loop (`before_run`, a simulated run, `handle_exit`,
//!   `report_stop`). The simulated CPU runs one-byte instructions round the
//!   first page, honours the debug configuration the vCPU *applied*
//!   (`int3` exits with exception 3 under `USE_SW_BP`, execute breakpoints
//!   fault before the instruction, single-step traps after it) and stops
//!   between instructions when kicked. Guest code never writes memory, so
//!   what memory holds is what the debugger wrote.
//! * Page tables ([`MAPS`]): a hole between two mapped pages, the top two
//!   pages of the address space, the top page of the lower canonical half,
//!   a page whose neighbour is not guest memory, and a non-canonical alias
//!   of low memory (what `KVM_TRANSLATE` does: it looks at bits 47:0).
//! * [`Client`]: one end of a `UnixStream::pair`, the other handed to
//!   [`serve_connection`]: the whole session over an in-memory connection.
//! * [`fuzz_one`]: the fuzz body and its oracle.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_debug_exit_arch, kvm_regs};
use kvm_glue::fake::FakeVcpu;
use kvm_glue::gdb::{serve_connection, GdbError, HostDebug, Options, Peer, ServeEvent};
use kvm_glue::{Handled, RunState, VmDebug};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The guest's memory: 128 KiB of guest-physical RAM.
pub const MEM_SIZE: u64 = 0x2_0000;
/// Guest code runs round this first page (identity-mapped).
pub const CODE_PAGE: u64 = 0x1000;

/// `(gva, gpa, size)`: every guest-virtual range the vCPUs' page tables map.
pub const MAPS: [(u64, u64, u64); 7] = [
    // Low memory, identity.
    (0, 0, 0x1_0000),
    // 0x200000 and 0x202000 mapped, 0x201000 not: a hole.
    (0x20_0000, 0x1_0000, 0x1000),
    (0x20_2000, 0x1_1000, 0x1000),
    // The top two pages of the address space.
    (0xffff_ffff_ffff_e000, 0x1_2000, 0x2000),
    // The top page of the lower canonical half.
    (0x7fff_ffff_f000, 0x1_4000, 0x1000),
    // Two pages, the second of them past the end of guest memory.
    (0x30_0000, 0x1_f000, 0x2000),
    // A non-canonical alias of low memory: KVM_TRANSLATE looks at bits
    // 47:0 only, so a non-canonical address translates like its low half.
    (0x8000_0000_0000_0000, 0, MEM_SIZE),
];

/// A hole: mapped pages at 0x200000 and 0x202000, not at 0x201000.
pub const HOLE_BEFORE: u64 = 0x20_0000;
/// The top page of the address space (mapped).
pub const TOP_PAGE: u64 = 0xffff_ffff_ffff_f000;

/// Bits 63:47 all equal (SDM Vol. 1 §3.3.7.1): anything else is a #GP.
/// Written out here rather than taken from kvm-glue.
pub fn canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == 0x1_ffff
}

/// What a correct server may read or write at `gva`: the guest-physical
/// byte, if `gva` is canonical, mapped, and backed by guest memory.
pub fn gpa_of(gva: u64) -> Option<u64> {
    if !canonical(gva) {
        return None;
    }
    MAPS.iter()
        .find(|(base, _, size)| gva.wrapping_sub(*base) < *size)
        .map(|(base, gpa, _)| gpa + (gva - base))
        .filter(|gpa| *gpa < MEM_SIZE)
}

/// The memory image every session starts from: no byte is `0xCC`.
pub fn image() -> Vec<u8> {
    (0..MEM_SIZE)
        .map(|i| match (i.wrapping_mul(7) + 0x11) as u8 {
            0xCC => 0x90,
            b => b,
        })
        .collect()
}

const ENABLE: u32 = 0x1;
const SINGLESTEP: u32 = 0x2;
const USE_SW_BP: u32 = 0x1_0000;
const USE_HW_BP: u32 = 0x2_0000;
const INJECT_BP: u32 = 0x8_0000;
const DR6_FIXED: u64 = 0xffff_0ff0;
const DR6_BS: u64 = 1 << 14;

struct Sim {
    fake: FakeVcpu,
    kicked: AtomicBool,
    /// `KVM_SET_GUEST_DEBUG` calls already looked at for INJECT_BP.
    seen: Mutex<usize>,
}

enum SimExit {
    Debug(kvm_debug_exit_arch),
    Interrupted,
}

impl Sim {
    fn run(&self, mem: &GuestMemoryMmap) -> SimExit {
        let gd = self.fake.guest_debug().unwrap_or_default();
        let on = |flag: u32| gd.control & ENABLE != 0 && gd.control & flag != 0;
        let dr = gd.arch.debugreg;
        let exec_hits = |rip: u64| {
            (0..4)
                .filter(|&i| {
                    let enabled = dr[7] >> (2 * i) & 0b11 != 0;
                    let rw = dr[7] >> (16 + 4 * i) & 0b11;
                    enabled && on(USE_HW_BP) && rw == 0 && dr[i] == rip
                })
                .fold(0u64, |m, i| m | 1 << i)
        };
        let exit = |pc: u64, exception: u32, dr6: u64| {
            SimExit::Debug(kvm_debug_exit_arch {
                exception,
                pad: 0,
                pc,
                dr6,
                dr7: dr[7],
            })
        };
        let mut regs = self.fake.regs();
        // An injected #BP (the guest's own int3): its handler returns after
        // the int3.
        let history = self.fake.debug_history();
        let injected = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            let new = history.iter().skip(*seen).any(|d| d.control & INJECT_BP != 0);
            *seen = history.len();
            new
        };
        if injected {
            regs.rip = (regs.rip + 1) % CODE_PAGE;
            self.fake.put_regs(regs);
            return SimExit::Interrupted;
        }
        for _ in 0..1000 {
            if self.kicked.swap(false, Ordering::AcqRel) {
                break;
            }
            let rip = regs.rip;
            let byte: u8 = mem.read_obj(GuestAddress(rip)).unwrap_or(0x90);
            if byte == 0xCC && on(USE_SW_BP) {
                self.fake.put_regs(regs);
                return exit(rip, 3, DR6_FIXED);
            }
            let hits = exec_hits(rip);
            if hits != 0 {
                self.fake.put_regs(regs);
                return exit(rip, 1, DR6_FIXED | hits);
            }
            regs.rip = (rip + 1) % CODE_PAGE;
            if on(SINGLESTEP) {
                self.fake.put_regs(regs);
                return exit(regs.rip, 1, DR6_FIXED | DR6_BS);
            }
        }
        self.fake.put_regs(regs);
        SimExit::Interrupted
    }
}

/// Two simulated vCPUs on their threads, every one stopped (held, as a VMM
/// holds its vCPUs for the first debugger).
pub struct SimVm {
    pub dbg: VmDebug<GuestMemoryMmap>,
    pub mem: GuestMemoryMmap,
    sims: Vec<Arc<Sim>>,
    quit: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What went wrong on a vCPU thread (an error from kvm-glue).
    pub failures: Arc<Mutex<Vec<String>>>,
}

impl SimVm {
    pub fn new() -> SimVm {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory");
        mem.write_slice(&image(), GuestAddress(0)).expect("image");
        let dbg = VmDebug::new(mem.clone());
        let sims: Vec<Arc<Sim>> = (0..2u64)
            .map(|id| {
                let fake = FakeVcpu::new();
                fake.without_identity();
                for (gva, gpa, size) in MAPS {
                    fake.map(gva, gpa, size);
                }
                fake.put_regs(kvm_regs {
                    rip: 0x10 + id * 0x40,
                    rflags: 0x2,
                    ..Default::default()
                });
                Arc::new(Sim {
                    fake,
                    kicked: AtomicBool::new(false),
                    seen: Mutex::new(0),
                })
            })
            .collect();
        let kick = sims.clone();
        dbg.set_kick(Arc::new(move |id: usize| {
            if let Some(s) = kick.get(id) {
                s.kicked.store(true, Ordering::Release);
            }
            Ok(())
        }))
        .expect("set_kick");
        let quit = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for (id, sim) in sims.iter().enumerate() {
            let (sim, quit, failures, mem) = (sim.clone(), quit.clone(), failures.clone(), mem.clone());
            let mut vdbg = dbg.vcpu(id).expect("vCPU handle");
            threads.push(std::thread::spawn(move || {
                let fail = |what: String| failures.lock().unwrap_or_else(|p| p.into_inner()).push(what);
                while !quit.load(Ordering::Acquire) {
                    if let Err(e) = vdbg.before_run(&sim.fake) {
                        fail(format!("vCPU {id}: before_run: {e}"));
                        return;
                    }
                    if let SimExit::Debug(arch) = sim.run(&mem) {
                        match vdbg.handle_exit(&sim.fake, &arch) {
                            Ok(Handled::Stop(event)) => {
                                if let Err(e) = vdbg.report_stop(event) {
                                    fail(format!("vCPU {id}: report_stop: {e}"));
                                    return;
                                }
                            }
                            Ok(Handled::Resume(_)) => {}
                            Err(e) => {
                                fail(format!("vCPU {id}: handle_exit: {e}"));
                                return;
                            }
                        }
                    }
                }
            }));
        }
        dbg.stop_all(Duration::from_secs(10)).expect("vCPUs held");
        SimVm {
            dbg,
            mem,
            sims,
            quit,
            threads,
            failures,
        }
    }

    /// A debugger connects: the server's end of a `UnixStream::pair` goes to
    /// [`serve_connection`] on a thread of its own.
    pub fn connect(&self) -> Session {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let dbg = self.dbg.clone();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        let served = std::thread::spawn(move || {
            let options = Options {
                stop_timeout: Duration::from_secs(5),
                // Simulated vCPUs deliver int3 exits and data watchpoints.
                host: Some(HostDebug::full("simulated vCPUs")),
                ..Options::default()
            };
            serve_connection(
                server,
                Peer::Stream("socketpair".into()),
                &dbg,
                &options,
                |e: &ServeEvent| {
                    log2.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&format!("{e}\n"));
                },
            )
        });
        Session {
            client: Client::new(client),
            served: Some(served),
            log,
        }
    }

    /// Every vCPU parked (held): none runs the guest.
    pub fn all_held(&self) -> bool {
        (0..self.sims.len()).all(|id| self.dbg.run_state(id).is_ok_and(|s| s == RunState::Parked))
    }

    /// Guest memory now.
    pub fn memory(&self) -> Vec<u8> {
        let mut now = vec![0u8; MEM_SIZE as usize];
        self.mem
            .read_slice(&mut now, GuestAddress(0))
            .expect("read guest memory");
        now
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the vCPU threads; what went wrong on them, panics included.
    pub fn shut_down(mut self) -> Vec<String> {
        self.quit.store(true, Ordering::Release);
        let _ = self.dbg.detach();
        let _ = self.dbg.resume_all();
        let mut failures = self.failures();
        for (id, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                failures.push(format!("vCPU {id}'s thread panicked"));
            }
        }
        failures
    }

    /// A debugger that connects after whatever came before finds every
    /// vCPU there and answering (a vCPU thread that died would not).
    pub fn check_next_debugger(&self) {
        let mut s = self.connect();
        handshake(&mut s.client);
        let threads = s.client.ask("qfThreadInfo");
        assert!(
            matches!(&threads, Reply::Packet(b) if b.first() == Some(&b'm') && b.split(|&c| c == b',').count() == 2),
            "the next debugger's thread list: {}",
            threads.text()
        );
        for t in ["Hg1", "Hg2"] {
            assert_eq!(s.client.ask(t), Reply::Packet(b"OK".to_vec()));
            let regs = s.client.ask("g");
            assert!(
                matches!(&regs, Reply::Packet(b) if b.len() > 16 && !is_error(&regs)),
                "{t} then g: {}",
                regs.text()
            );
        }
        s.end();
    }
}

impl Default for SimVm {
    fn default() -> SimVm {
        SimVm::new()
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Release);
        let _ = self.dbg.detach();
        let _ = self.dbg.resume_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection to the server.
pub struct Session {
    pub client: Client,
    served: Option<JoinHandle<Result<Option<u8>, GdbError>>>,
    log: Arc<Mutex<String>>,
}

/// How long a reply may take before the server counts as hung (a liveness
/// bound, not a performance figure).
pub const HANG: Duration = Duration::from_secs(10);

impl Session {
    /// Closes the client's end and waits for the server to finish the
    /// session (detach included); the server's log.
    pub fn end(mut self) -> String {
        let _ = self.client.stream.shutdown(std::net::Shutdown::Both);
        self.wait()
    }

    /// Waits for the server to finish the session; the server's log.
    pub fn wait(&mut self) -> String {
        let handle = self.served.take().expect("waited once");
        let deadline = Instant::now() + HANG;
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "the session did not end:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(1));
        }
        match handle.join() {
            Ok(r) => {
                r.expect("serve_connection");
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
        self.log()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the server has finished the session.
    pub fn finished(&self) -> bool {
        self.served.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A packet's body (run-length encoding expanded).
    Packet(Vec<u8>),
    /// The server closed the connection.
    Closed,
    /// Nothing within the time given.
    Timeout,
}

impl Reply {
    pub fn text(&self) -> String {
        match self {
            Reply::Packet(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        }
    }
}

/// The debugger's end of the connection, speaking raw packets.
pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
    closed: bool,
}

/// `$body#checksum`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let sum = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(b'$');
    out.extend_from_slice(body);
    out.extend_from_slice(format!("#{sum:02x}").as_bytes());
    out
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
            closed: false,
        }
    }

    /// Sends bytes as they are. A server that already closed is not an
    /// error here (the next [`reply`](Self::reply) says `Closed`).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        if self.stream.write_all(bytes).is_err() {
            self.closed = true;
        }
    }

    /// Sends one packet.
    pub fn send(&mut self, body: &[u8]) {
        self.send_raw(&frame(body));
    }

    /// Sends one packet and waits for its reply.
    pub fn ask(&mut self, body: &str) -> Reply {
        self.send(body.as_bytes());
        self.reply(HANG)
    }

    /// The next packet from the server (acks skipped), within `timeout`.
    pub fn reply(&mut self, timeout: Duration) -> Reply {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(body) = self.take_packet() {
                // Console output (`O` + hex, from `qRcmd`) comes before the
                // reply proper.
                if body.first() == Some(&b'O') && body != b"OK" {
                    continue;
                }
                return Reply::Packet(body);
            }
            if self.closed {
                return Reply::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Reply::Timeout;
            }
            let _ = self.stream.set_read_timeout(Some(deadline - now));
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => self.closed = true,
            }
        }
    }

    fn take_packet(&mut self) -> Option<Vec<u8>> {
        let start = self.buf.iter().position(|&b| b == b'$')?;
        let hash = start + self.buf[start..].iter().position(|&b| b == b'#')?;
        if self.buf.len() < hash + 3 {
            return None;
        }
        let body = self.buf[start + 1..hash].to_vec();
        self.buf.drain(..hash + 3);
        Some(unrle(&body))
    }
}

/// Expands GDB's run-length encoding: `X*n` is `X` and `n - 29` more.
fn unrle(body: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'*' && i + 1 < body.len() {
            if let Some(&last) = out.last() {
                let n = usize::from(body[i + 1]).saturating_sub(29);
                out.extend(std::iter::repeat_n(last, n));
            }
            i += 2;
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

/// Hex bytes of a reply, or `None` if it is not (only) hex.
pub fn unhex(body: &[u8]) -> Option<Vec<u8>> {
    if body.len() % 2 != 0 {
        return None;
    }
    body.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// An error reply: `E` and two hex digits.
pub fn is_error(reply: &Reply) -> bool {
    matches!(reply, Reply::Packet(b) if b.len() == 3 && b[0] == b'E' && b[1..].iter().all(u8::is_ascii_hexdigit))
}

/// A stop reply: `T`/`S` with a signal, or `W`/`X`.
pub fn is_stop(reply: &Reply) -> bool {
    matches!(reply, Reply::Packet(b) if matches!(b.first(), Some(b'T' | b'S' | b'W' | b'X')))
}

/// Starts a session in no-ack mode (what GDB does first).
pub fn handshake(c: &mut Client) {
    let r = c.ask("qSupported:multiprocess+;swbreak+;hwbreak+");
    assert!(matches!(&r, Reply::Packet(b) if b.starts_with(b"PacketSize=")), "{r:?}");
    assert_eq!(c.ask("QStartNoAckMode"), Reply::Packet(b"OK".to_vec()));
}

// ------------------------------------------------------------------------
// The fuzz body.

/// A little reader of fuzz bytes (no `arbitrary`: kvm-glue does not depend
/// on it). Running out of bytes reads zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |v, i| v | u64::from(self.u8()) << (8 * i))
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Addresses worth hitting: page edges, the hole, the top of the address
/// space, the canonical boundary, unbacked memory, non-canonical aliases.
const ADDRS: [u64; 16] = [
    0x0,
    0x100,
    0xff8,
    0x1ff8,
    0x20_0ff0,
    0x20_1ff8,
    0x20_2000,
    0xffff_ffff_ffff_e000,
    0xffff_ffff_ffff_fff0,
    0x7fff_ffff_fff0,
    0x30_0ff8,
    0x8000_0000_0001_0400,
    0xffff_7fff_ffff_fff8,
    0x8000_0000_0000,
    0xffff_8000_0000_0000,
    0x1_0000,
];

fn addr(b: &mut Input<'_>) -> u64 {
    let pick = b.u8();
    if pick == 0xff {
        return b.u64();
    }
    ADDRS[usize::from(pick) % ADDRS.len()].wrapping_add(u64::from(b.u8() % 32))
}

/// One step of a structured session.
#[derive(Debug, Clone)]
pub enum Op {
    /// `m`: read.
    Read { addr: u64, len: u64 },
    /// `M` (or `X`): write `data`, declaring `declared` bytes.
    Write {
        binary: bool,
        addr: u64,
        declared: u64,
        data: Vec<u8>,
    },
    /// `Z`/`z`: insert or remove a breakpoint or watchpoint.
    Break { insert: bool, ty: u8, addr: u64, kind: u64 },
    /// `Hg`/`Hc`.
    Thread { op: u8, tid: i64 },
    /// A resume: `c`, `s` or a `vCont`.
    Resume(String),
    /// `qThreadExtraInfo`.
    ExtraInfo(u64),
    /// A query with one reply.
    Query(&'static str),
    /// Ctrl-C while stopped.
    Interrupt,
    /// Bytes outside any packet.
    Garbage(Vec<u8>),
    /// `D`.
    Detach,
}

const QUERIES: [&str; 10] = [
    "?",
    "g",
    "qfThreadInfo",
    "qsThreadInfo",
    "qC",
    "vCont?",
    "T1",
    "T3",
    "qRcmd,6270",
    "qAttached",
];

const RESUMES: [&str; 12] = [
    "c",
    "s",
    "vCont;c",
    "vCont;s:1;c",
    "vCont;s:2",
    "vCont;s:1",
    "vCont",
    "vCont;s:3",
    "vCont;c:5",
    "vCont;s:1;s:2",
    "vCont;c:1",
    "vCont;s:p1.1;c",
];

impl Op {
    fn decode(b: &mut Input<'_>) -> Op {
        match b.u8() % 10 {
            0 => Op::Read {
                addr: addr(b),
                len: u64::from(b.u16()),
            },
            1 => {
                let binary = b.u8() & 1 == 1;
                let addr = addr(b);
                let n = usize::from(b.u8() % 24);
                let data = b.take(n);
                let declared = match b.u8() {
                    0..=223 => data.len() as u64,
                    d => u64::from(d - 220),
                };
                Op::Write {
                    binary,
                    addr,
                    declared,
                    data,
                }
            }
            2 => Op::Break {
                insert: b.u8() & 3 != 0,
                ty: b.u8() % 5,
                addr: if b.u8() & 1 == 0 {
                    u64::from(b.u16()) % CODE_PAGE
                } else {
                    addr(b)
                },
                kind: match b.u8() {
                    0xff => b.u64(),
                    k => u64::from(k % 17),
                },
            },
            3 => Op::Thread {
                op: b.u8() & 1,
                tid: i64::from(b.u8() % 5) - 1,
            },
            4 => Op::Resume(RESUMES[usize::from(b.u8()) % RESUMES.len()].to_owned()),
            5 => Op::ExtraInfo(u64::from(b.u8() % 5)),
            6 => Op::Query(QUERIES[usize::from(b.u8()) % QUERIES.len()]),
            7 => Op::Interrupt,
            8 => {
                let n = usize::from(b.u8() % 8);
                // '$' would open a frame and '-' asks for a resend: neither is garbage.
                Op::Garbage(b.take(n).into_iter().filter(|c| !matches!(c, b'$' | b'-')).collect())
            }
            _ => Op::Detach,
        }
    }

    /// The packet body.
    fn body(&self) -> Option<Vec<u8>> {
        Some(match self {
            Op::Read { addr, len } => format!("m{addr:x},{len:x}").into_bytes(),
            Op::Write {
                binary: false,
                addr,
                declared,
                data,
            } => {
                let mut s = format!("M{addr:x},{declared:x}:");
                for d in data {
                    s.push_str(&format!("{d:02x}"));
                }
                s.into_bytes()
            }
            Op::Write {
                binary: true,
                addr,
                declared,
                data,
            } => {
                let mut s = format!("X{addr:x},{declared:x}:").into_bytes();
                for &d in data {
                    if matches!(d, b'#' | b'$' | b'}' | b'*') {
                        s.extend_from_slice(&[b'}', d ^ 0x20]);
                    } else {
                        s.push(d);
                    }
                }
                s
            }
            Op::Break { insert, ty, addr, kind } => {
                format!("{}{ty},{addr:x},{kind:x}", if *insert { 'Z' } else { 'z' }).into_bytes()
            }
            Op::Thread { op, tid } => {
                let op = if *op == 0 { 'g' } else { 'c' };
                if *tid < 0 {
                    format!("H{op}-1").into_bytes()
                } else {
                    format!("H{op}{tid:x}").into_bytes()
                }
            }
            Op::Resume(s) => s.clone().into_bytes(),
            Op::ExtraInfo(tid) => format!("qThreadExtraInfo,{tid:x}").into_bytes(),
            Op::Query(q) => q.as_bytes().to_vec(),
            Op::Detach => b"D".to_vec(),
            Op::Interrupt | Op::Garbage(_) => return None,
        })
    }
}

/// Packets gdbstub 0.7.10 answers by ending the session (its
/// `PacketUnexpected`), which kvm-glue leaves as they are: `Hg-1` ("all
/// threads" for memory and registers), and `s` after `Hc-1` (a step as
/// every thread's default action). GDB sends neither.
fn gdbstub_ends_on(op: &Op, resume_all: bool) -> bool {
    matches!(op, Op::Thread { op: 0, tid: -1 }) || (resume_all && matches!(op, Op::Resume(r) if r == "s"))
}

/// A `vCont` that resumes nothing, or names a thread other than 1 and 2.
fn names_no_thread(resume: &str) -> bool {
    let Some(actions) = resume.strip_prefix("vCont") else {
        return false;
    };
    let actions: Vec<&str> = actions.split(';').skip(1).collect();
    actions.is_empty()
        || actions.iter().any(|a| {
            a.split(':')
                .nth(1)
                .is_some_and(|t| !matches!(t.rsplit('.').next(), Some("1" | "2")))
        })
}

/// What the oracle knows of guest memory: the image plus every write the
/// server said `OK` to.
struct Model {
    mem: Vec<u8>,
}

impl Model {
    fn check_read(&self, op: &Op, reply: &Reply) {
        let Op::Read { addr, len } = op else { return };
        let Reply::Packet(body) = reply else { return };
        if is_error(reply) {
            return;
        }
        let data = unhex(body).unwrap_or_else(|| panic!("{op:?}: a reply neither hex nor an error: {}", reply.text()));
        assert!(
            data.len() as u64 <= *len,
            "{op:?}: {} bytes for {len} asked",
            data.len()
        );
        for (i, got) in data.iter().enumerate() {
            let at = addr.checked_add(i as u64);
            let gpa = at
                .and_then(gpa_of)
                .unwrap_or_else(|| panic!("{op:?}: byte {i} comes from {at:x?}, which no page maps to guest memory"));
            assert_eq!(
                *got, self.mem[gpa as usize],
                "{op:?}: byte {i} (at {at:x?}) is not what guest memory holds there"
            );
        }
    }

    fn apply_write(&mut self, op: &Op, reply: &Reply) {
        let Op::Write {
            addr, declared, data, ..
        } = op
        else {
            return;
        };
        if *reply != Reply::Packet(b"OK".to_vec()) {
            return;
        }
        assert_eq!(
            *declared,
            data.len() as u64,
            "{op:?}: OK for a write whose length is not its data's"
        );
        for (i, d) in data.iter().enumerate() {
            let at = addr.checked_add(i as u64);
            let gpa = at
                .and_then(gpa_of)
                .unwrap_or_else(|| panic!("{op:?}: OK, but byte {i} (at {at:x?}) is not guest memory"));
            self.mem[gpa as usize] = *d;
        }
    }
}

/// How long a resume may run before the test interrupts it.
const RUN_A_WHILE: Duration = Duration::from_millis(20);

/// One fuzz input: a fresh VM, one session, the oracle. Returns `false`
/// for an input not worth keeping (empty).
///
/// * first byte even: the rest is raw bytes, sent at once, then the
///   client's end is closed: the server must end the session (no hang), and
///   afterwards guest memory may differ from the image only where some
///   `M`/`X` frame in the input wrote;
/// * odd: a structured session ([`Op`]s) in lockstep: every packet gets a
///   reply or the session ends; every read returns only what guest memory
///   holds at addresses the page tables map (nothing outside guest memory,
///   nothing from a non-canonical address, no data with an error); every
///   `OK` write is applied to a model; after the session ends (and the
///   server detached) guest memory equals the model byte for byte: no
///   `int3` left behind.
///
/// In both, nothing may panic, no vCPU thread may fail, and a debugger
/// that connects afterwards finds both vCPUs and reads their registers.
/// `GDB_SESSION_TRACE=1` prints each structured step (a reproducer's ops).
pub fn fuzz_one(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let vm = SimVm::new();
    if mode & 1 == 0 {
        raw_session(&vm, rest);
    } else {
        structured_session(&vm, rest);
    }
    vm.check_next_debugger();
    let failures = vm.shut_down();
    assert!(failures.is_empty(), "vCPU threads failed: {failures:?}");
    true
}

fn raw_session(vm: &SimVm, bytes: &[u8]) {
    let mut s = vm.connect();
    s.client.send_raw(bytes);
    let _ = s.client.stream.shutdown(std::net::Shutdown::Write);
    // Drain replies until the server closes (so it never blocks writing).
    let deadline = Instant::now() + HANG;
    while s.client.reply(HANG) != Reply::Closed {
        assert!(Instant::now() < deadline, "the server never closed");
    }
    s.wait();
    let written = written_ranges(bytes);
    let now = vm.memory();
    for (gpa, (was, is)) in image().iter().zip(&now).enumerate() {
        if was != is {
            assert!(
                written
                    .iter()
                    .any(|&(a, n)| (0..n).any(|i| a.checked_add(i).and_then(gpa_of) == Some(gpa as u64))),
                "guest memory at {gpa:#x} changed ({was:#04x} -> {is:#04x}) where no write packet wrote"
            );
        }
    }
}

/// `(addr, len)` of every framed `M`/`X` packet in `bytes` in the
/// protocol's form, `M addr,length:data` (the fields in that order): a
/// write may touch only the bytes its own length field names.
fn written_ranges(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(start) = bytes[i..].iter().position(|&b| b == b'$').map(|p| p + i) {
        let Some(end) = bytes[start..].iter().position(|&b| b == b'#').map(|p| p + start) else {
            break;
        };
        let body = &bytes[start + 1..end];
        if let Some((&(b'M' | b'X'), rest)) = body.split_first() {
            let field = |f: &[u8]| u64::from_str_radix(std::str::from_utf8(f).ok()?, 16).ok();
            let range = rest.iter().position(|&c| c == b',').and_then(|comma| {
                let colon = rest[comma..].iter().position(|&c| c == b':')? + comma;
                Some((field(&rest[..comma])?, field(&rest[comma + 1..colon])?))
            });
            out.extend(range);
        }
        i = end + 1;
    }
    out
}

fn structured_session(vm: &SimVm, bytes: &[u8]) {
    let mut b = Input(bytes);
    let mut model = Model { mem: image() };
    let mut s = vm.connect();
    let mut ended = false;
    let mut steps = 0;
    let trace = std::env::var_os("GDB_SESSION_TRACE").is_some();
    // gdbstub's resume thread is "all" (after Hc-1, until a stop or
    // another Hc names one).
    let mut resume_all = false;
    if b.u8() & 1 == 1 {
        // Sometimes as GDB starts; sometimes straight in, acks and all.
        handshake(&mut s.client);
    }
    while !b.is_empty() && steps < 64 && !ended {
        steps += 1;
        let op = Op::decode(&mut b);
        if trace {
            eprintln!("gdb_session: {op:?}");
        }
        match &op {
            Op::Interrupt => {
                // Stopped already: nothing to report. A reply, if any, is
                // read as the next packet's and fails there.
                s.client.send_raw(&[0x03]);
                continue;
            }
            Op::Garbage(g) => {
                s.client.send_raw(g);
                continue;
            }
            _ => {}
        }
        let Some(body) = op.body() else { continue };
        s.client.send(&body);
        let mut reply = s
            .client
            .reply(if matches!(op, Op::Resume(_)) { RUN_A_WHILE } else { HANG });
        if matches!(op, Op::Resume(_)) && reply == Reply::Timeout {
            // Still running: Ctrl-C must stop it and say so.
            s.client.send_raw(&[0x03]);
            reply = s.client.reply(HANG);
            assert!(
                is_stop(&reply) || reply == Reply::Closed,
                "{op:?}, then Ctrl-C: {}",
                reply.text()
            );
            if is_stop(&reply) {
                assert!(vm.all_held(), "{op:?}: a stop reported while a vCPU runs");
            }
        }
        match &reply {
            Reply::Timeout => panic!("{op:?}: no reply, and the session goes on"),
            // Bytes outside packets are ignored, and every packet here is
            // well formed: only a detach ends the session, and the packets
            // gdbstub 0.7.10 ends it on by design.
            Reply::Closed if gdbstub_ends_on(&op, resume_all) => ended = true,
            Reply::Closed => panic!("{op:?}: the server ended the session:\n{}", s.log()),
            Reply::Packet(_) => {}
        }
        if let Op::Resume(r) = &op {
            if names_no_thread(r) {
                assert!(is_error(&reply), "{op:?} names no existing thread: {}", reply.text());
            }
        }
        if matches!(op, Op::Resume(_)) && is_stop(&reply) {
            assert!(vm.all_held(), "{op:?}: {} while a vCPU runs", reply.text());
        }
        if matches!(op, Op::Detach) && reply == Reply::Packet(b"OK".to_vec()) {
            ended = true;
        }
        if let Op::Thread { op: 1, tid } = op {
            if reply == Reply::Packet(b"OK".to_vec()) {
                resume_all = tid == -1;
            }
        }
        // A stop after a resume names its thread, which becomes gdbstub's
        // resume thread; the answer to `?` is a stop reply too but changes
        // nothing (gdbstub 0.7.10's `report_reasonable_stop_reason`).
        if matches!(op, Op::Resume(_)) && is_stop(&reply) {
            resume_all = false;
        }
        model.check_read(&op, &reply);
        model.apply_write(&op, &reply);
    }
    s.end();
    let now = vm.memory();
    if let Some(at) = (0..now.len()).find(|&i| now[i] != model.mem[i]) {
        panic!(
            "after the session guest memory differs from what the packets wrote at {at:#x}: {:#04x}, expected {:#04x}",
            now[at], model.mem[at]
        );
    }
}
