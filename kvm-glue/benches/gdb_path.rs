//! The GDB path, end to end: an in-process client speaking GDB's remote
//! protocol (raw packets, no gdb) over loopback TCP to [`kvm_glue::gdb::serve`]
//! on two real vCPUs of the tiny built-in guest, beside the raw KVM
//! single-step exit measured in the same run (as `benches/step.rs` does) and
//! beside QEMU's own gdbstub on the same host KVM (issue #20), and a summary
//! of the ratios from criterion's medians.
//!
//! `cargo bench -p kvm-glue --features gdb --bench gdb_path`
//!
//! Measured, per round trip (client sends, client has the whole reply):
//! * `vCont;s:1`: step vCPU 0 one instruction (the other stays stopped);
//! * `vCont;s:1;c`: gdb's `stepi` (step vCPU 0, the other continues until
//!   the step's stop stops it again);
//! * `g`: every register of thread 1;
//! * `m addr,40`: 64 bytes of guest memory;
//! * `Z1` + `z1`: insert and remove a hardware breakpoint;
//! * `qXfer:features:read:target.xml`: the target description's first
//!   chunk (no vCPU involved);
//! * gdb's `stepi`: the packets gdb 13 sends for one (`vCont;s:1;c`, `g`
//!   unless the stop reply carried the pc, four 1-byte `m` at the pc,
//!   `qfThreadInfo`, `qsThreadInfo` until its `l`): 7 to kvm-glue, whose
//!   stop replies carry `rbp`, `rsp` and `rip`, 8 or more to QEMU;
//! * continue to a hardware breakpoint: `vCont;c` until the stop reply, with
//!   `Z1` on the loop's `jmp` (the server steps off it at each resume);
//! * Ctrl-C: from the `0x03` byte to the stop reply, the guest running
//!   (`vCont;c` first, then 200 µs untimed);
//! * the whole target description as gdb reads it at connect (the root
//!   document and every `xi:include`d one, in `0xffb`-byte chunks).
//!
//! Beside the raw step, the raw `KVM_GET_REGS` + `KVM_GET_SREGS` the
//! stopped vCPU makes as it parks (for the stop reply's registers).
//!
//! And the floor under every row, with the same client: the wire alone (a
//! thread of this process that answers each packet with `OK` at once; and
//! with a reply as long as a `g`, the floor under `g`; and one that
//! busy-polls for the next packet before it sleeps in a read, as kvm-glue's
//! session does, [`Options::busy_poll`]), and the wire with a
//! hand-off to a second thread and back (the least a
//! server whose socket's thread is not the vCPU's adds to a step). A step
//! can be no faster than the wire alone plus the raw step; the summary
//! gives both, and what the step costs above the wire.
//!
//! Two configurations: vCPU 1 spinning in the same two-instruction loop as
//! vCPU 0, and vCPU 1 halted. In the tiny guest (no interrupt controller)
//! `hlt` exits to this VMM, whose vCPU thread then waits in
//! [`VcpuDebug::wait_idle`] as the `gdb_server` example does; QEMU has an
//! in-kernel irqchip, so its halted vCPU halts inside `KVM_RUN`.
//!
//! **QEMU's column**: `qemu-system-x86_64 -accel kvm -smp 2 -S -gdb ...`
//! with a 64 KiB `-bios` image written by this bench: the BSP starts the AP
//! (x2APIC INIT + SIPI) and both run the real-mode equivalent of the loop
//! (`inc ax; jmp`), or the AP `cli; hlt`s. Batches alternate between the two
//! servers (and the raw step) round by round, with the same client. QEMU is
//! `$GDB_PATH_QEMU` if set, else `qemu-system-x86_64` on `PATH`; it must
//! list `kvm` in `-accel help`. Without one the bench prints one
//! `SKIPPED: QEMU column because ...` line and measures kvm-glue alone
//! (`.ci/qemu-for-bench` installs Debian's).
//!
//! Before measuring continue, the bench checks that it makes progress (the
//! stopped thread's rax moved) and notes it with the summary: on a host
//! whose KVM ignores RFLAGS.RF (`kvm_pvm`, HOST.md) QEMU's continue from a
//! hardware breakpoint re-hits it without executing anything, so its row
//! there is cheaper work than kvm-glue's step-over.
//!
//! kvm-glue's session busy-polls for the default window
//! ([`kvm_glue::gdb::DEFAULT_BUSY_POLL`]), or for `$GDB_PATH_BUSY_POLL_US`
//! µs if set (`0`: it sleeps at once, as QEMU's stub does).
//!
//! The client negotiates `QStartNoAckMode` where the server offers it, as
//! gdb does (QEMU's gdbstub does not: there each reply is acknowledged). Without `/dev/kvm`
//! it prints `SKIPPED` and measures nothing.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_glue::gdb::{serve, GuestEnd, Options, ServeEvent};
use kvm_glue::guest::{self, Exit, Guest, GuestError};
use kvm_glue::kick::SignalKick;
use kvm_glue::vcpu_debug::{effective, to_kvm};
use kvm_glue::{Handled, VcpuDebug, VmDebug, Woke};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Continues checked for guest progress before the continue row.
const CONTINUE_PROBES: usize = 8;

/// Rounds of every measurement, alternated so host drift hits all alike.
const ROUNDS: usize = 2;

/// What vCPU 1 does.
#[derive(Clone, Copy)]
enum Other {
    /// The same endless loop as vCPU 0.
    Spinning,
    /// `hlt`, forever.
    Halted,
}

impl Other {
    fn name(self) -> &'static str {
        match self {
            Other::Spinning => "spinning",
            Other::Halted => "halted",
        }
    }
}

/// One GDB server under test, as the client sees it.
struct Target {
    /// `kvm-glue` or `qemu`: the first part of each benchmark's id.
    name: &'static str,
    /// The loop's `jmp` (linear): the breakpoint address.
    bp: u64,
    /// What `m` reads (linear): the loop.
    mem: u64,
    /// Whether its stop reply for a hardware breakpoint says `hwbreak`.
    says_hwbreak: bool,
}

/// The VMM's loop for one vCPU, on that vCPU's thread (the `gdb_server`
/// example's, without the guest's end).
fn vcpu_loop(
    id: usize,
    vcpu: &mut VcpuFd,
    mut vdbg: VcpuDebug<GuestMemoryMmap>,
    kick: &SignalKick,
    go: &Barrier,
    quit: &AtomicBool,
) -> Result<(), Error> {
    kick.prepare_vcpu_thread(id, vcpu)?;
    go.wait();
    loop {
        vdbg.before_run(&*vcpu)?;
        if quit.load(Ordering::Acquire) {
            return Ok(());
        }
        let exit = guest::run_once(vcpu)?;
        match exit {
            Exit::Interrupted => kick.drain()?,
            Exit::Debug { .. } => {
                let arch = exit.debug().ok_or("a debug exit without its data")?;
                if let Handled::Stop(event) = vdbg.handle_exit(&*vcpu, &arch)? {
                    vdbg.report_stop(event)?;
                }
            }
            // No interrupt controller: wait outside KVM_RUN until the
            // debugger wants this vCPU (no VMM interrupt ever comes here).
            Exit::Hlt => {
                while let Woke::Stop | Woke::Intent = vdbg.wait_idle(None)? {
                    vdbg.before_run(&*vcpu)?;
                    if quit.load(Ordering::Acquire) {
                        return Ok(());
                    }
                }
            }
            other => return Err(format!("vCPU {id}: unexpected exit {other:?}").into()),
        }
    }
}

/// A raw-protocol GDB client.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Whether the server takes `QStartNoAckMode` (kvm-glue does, QEMU's
    /// gdbstub does not advertise it): else each reply is acknowledged
    /// with `+`, sent with the next packet (one write, as fast as it gets).
    no_ack: bool,
    ack_owed: bool,
}

/// A reply body without its run-length encoding (`X*N`: `N - 29` more `X`).
fn unrle(body: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        match (body[i], out.last().copied(), body.get(i + 1)) {
            (b'*', Some(prev), Some(&n)) => {
                out.extend(std::iter::repeat_n(prev, usize::from(n.saturating_sub(29))));
                i += 2;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn checksum(body: &[u8]) -> u8 {
    body.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

impl Client {
    fn connect(port: u16) -> Result<Client, Error> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(4096),
            no_ack: false,
            ack_owed: false,
        })
    }

    /// Sends `$body#xx` in one write.
    fn send(&mut self, body: &[u8]) {
        let mut p = Vec::with_capacity(body.len() + 5);
        if std::mem::take(&mut self.ack_owed) {
            p.push(b'+');
        }
        p.push(b'$');
        p.extend_from_slice(body);
        p.extend_from_slice(format!("#{:02x}", checksum(body)).as_bytes());
        self.stream.write_all(&p).expect("send a packet");
    }

    /// The next packet's body (acks before it skipped).
    fn recv(&mut self) -> Vec<u8> {
        loop {
            // A whole packet in the buffer: `$`, body, `#`, two digits.
            if let Some(start) = self.buf.iter().position(|&b| b == b'$') {
                if let Some(hash) = self.buf[start..].iter().position(|&b| b == b'#') {
                    let end = start + hash + 3;
                    if self.buf.len() >= end {
                        let body = self.buf[start + 1..start + hash].to_vec();
                        self.buf.drain(..end);
                        self.ack_owed = !self.no_ack;
                        return body;
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("read a reply");
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn cmd(&mut self, body: &[u8]) -> Vec<u8> {
        self.send(body);
        self.recv()
    }

    fn expect(&mut self, body: &str, starts: &str) -> Vec<u8> {
        let reply = self.cmd(body.as_bytes());
        assert!(
            reply.starts_with(starts.as_bytes()),
            "{body}: expected {starts}..., got {:?}",
            String::from_utf8_lossy(&reply)
        );
        reply
    }

    /// What every session starts with, as gdb does.
    fn handshake(&mut self) {
        let features = self.expect("qSupported:swbreak+;hwbreak+;vContSupported+", "PacketSize");
        if features.windows(16).any(|w| w == b"QStartNoAckMode+") {
            self.expect("QStartNoAckMode", "OK");
            self.no_ack = true;
            self.ack_owed = false;
        }
        self.expect("?", "T");
        self.expect("Hg1", "OK");
    }

    /// Thread `tid`'s rip, from `g` (x86-64 layout: 16 GPRs, then rip).
    fn rip(&mut self, tid: u32) -> u64 {
        self.expect(&format!("Hg{tid}"), "OK");
        let g = unrle(&self.cmd(b"g"));
        let hex = std::str::from_utf8(&g[256..272]).expect("hex");
        let le = u64::from_str_radix(hex, 16).expect("rip");
        self.expect("Hg1", "OK");
        le.swap_bytes()
    }

    /// Thread `tid`'s rax, from `g`.
    fn rax(&mut self, tid: u64) -> u64 {
        self.expect(&format!("Hg{tid:x}"), "OK");
        let g = unrle(&self.cmd(b"g"));
        let hex = std::str::from_utf8(&g[..16]).expect("hex");
        u64::from_str_radix(hex, 16).expect("rax").swap_bytes()
    }

    /// [`CONTINUE_PROBES`] `vCont;c` to the breakpoint: how many times the thread that stopped ran
    /// its loop (its `inc` moved rax) rather than re-hit the breakpoint it
    /// stood on without executing anything (a server that relies on
    /// RFLAGS.RF, on a host whose KVM ignores it: see HOST.md). Several,
    /// because a vCPU stopped at the breakpoint by another's stop (both
    /// run the loop) rightly hits it at once when resumed.
    fn continue_moves(&mut self) -> usize {
        (0..CONTINUE_PROBES).filter(|_| self.one_continue_moves()).count()
    }

    fn one_continue_moves(&mut self) -> bool {
        let before = [self.rax(1), self.rax(2)];
        let r = self.expect("vCont;c", "T05");
        let text = String::from_utf8_lossy(&r).into_owned();
        let tid = text
            .split(';')
            .find_map(|f| f.strip_prefix("T05thread:").or_else(|| f.strip_prefix("thread:")))
            .map(|t| t.rsplit('.').next().unwrap_or(t))
            .and_then(|t| u64::from_str_radix(t, 16).ok())
            .filter(|t| (1..=2).contains(t))
            .unwrap_or(1);
        let after = self.rax(tid);
        self.expect("Hg1", "OK");
        after != before[(tid - 1) as usize]
    }

    /// The whole target description as gdb 13 reads it at connect: the
    /// root document, then each `xi:include`d one, each in chunks of
    /// `0xffb` bytes (gdb's for a 4096-byte `PacketSize`, which both
    /// servers advertise) until the reply that starts with `l`. Returns
    /// the documents' total length and the packets it took.
    fn whole_description(&mut self) -> (usize, usize) {
        let mut todo = vec![String::from("target.xml")];
        let (mut bytes, mut packets) = (0, 0);
        while let Some(annex) = todo.pop() {
            let mut doc = Vec::new();
            loop {
                let r = self.cmd(format!("qXfer:features:read:{annex}:{:x},ffb", doc.len()).as_bytes());
                packets += 1;
                let (last, data) = match r.split_first() {
                    Some((b'm', d)) => (false, d),
                    Some((b'l', d)) => (true, d),
                    _ => panic!("qXfer {annex}: {:?}", String::from_utf8_lossy(&r)),
                };
                // Binary data: `}` escapes the byte after it (XOR 0x20).
                let mut it = data.iter();
                while let Some(&b) = it.next() {
                    doc.push(if b == b'}' {
                        it.next().map_or(b, |&n| n ^ 0x20)
                    } else {
                        b
                    });
                }
                if last {
                    break;
                }
            }
            let text = String::from_utf8_lossy(&doc);
            for part in text.split("<xi:include href=\"").skip(1) {
                if let Some(href) = part.split('"').next() {
                    todo.push(href.to_string());
                }
            }
            bytes += doc.len();
        }
        (bytes, packets)
    }

    /// Lets the guest run for `d`, then stops it (Ctrl-C).
    fn run_for(&mut self, d: Duration) {
        self.send(b"vCont;c");
        std::thread::sleep(d);
        self.stream.write_all(&[0x03]).expect("Ctrl-C");
        let r = self.recv();
        assert!(r.starts_with(b"T02"), "Ctrl-C: {:?}", String::from_utf8_lossy(&r));
    }
}

/// Runs `body` with a client attached to kvm-glue's GDB server on a fresh
/// VM whose vCPU 1 does `other`; then detaches, ends the vCPU threads and
/// the server. `Ok(false)`: no `/dev/kvm`, nothing ran.
fn with_vm(other: Other, body: impl FnOnce(&mut Client, &Target)) -> Result<bool, Error> {
    let mut g = match Guest::new(2) {
        Ok(g) => g,
        Err(GuestError::NoKvm(e)) => {
            println!("gdb_path: SKIPPED: every measurement (/dev/kvm cannot be opened: {e})");
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    g.start(0, guest::LOOP)?;
    let rip1 = match other {
        Other::Spinning => guest::LOOP,
        Other::Halted => guest::STRAIGHT_HLT,
    };
    g.start(1, rip1)?;
    let dbg = VmDebug::new(g.memory().clone());
    let kick = SignalKick::new(0)?;
    dbg.set_kick(kick.clone())?;
    let handles: Vec<VcpuDebug<GuestMemoryMmap>> =
        (0..g.vcpu_count()).map(|id| dbg.vcpu(id)).collect::<Result<_, _>>()?;
    let quit = AtomicBool::new(false);
    let go = Barrier::new(g.vcpu_count() + 1);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let end = GuestEnd::new()?;
    let options = Options {
        end: Some(end.clone()),
        busy_poll: busy_poll(),
        ..Options::default()
    };
    let target = Target {
        name: "kvm-glue",
        // `inc rax` at +0, `jmp` at +3.
        bp: guest::LOOP + 3,
        mem: guest::LOOP,
        says_hwbreak: true,
    };
    std::thread::scope(|s| -> Result<(), Error> {
        for ((id, vcpu), vdbg) in g.vcpus_mut().iter_mut().enumerate().zip(handles) {
            let (kick, go, quit) = (&kick, &go, &quit);
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn_scoped(s, move || {
                    if let Err(e) = vcpu_loop(id, vcpu, vdbg, kick, go, quit) {
                        eprintln!("gdb_path: vCPU {id}: {e}");
                        std::process::exit(2);
                    }
                })?;
        }
        go.wait();
        let (listener, dbg, options) = (&listener, &dbg, &options);
        let server = std::thread::Builder::new()
            .name("gdb".into())
            .spawn_scoped(s, move || {
                serve(listener, dbg, options, |e| {
                    // Why a session ended, for a bench that fails with the
                    // connection closed.
                    if let ServeEvent::Ended(end) = e {
                        eprintln!("gdb_path: kvm-glue's session ended: {end:?}");
                    }
                })
            })?;
        let mut client = Client::connect(port)?;
        client.handshake();
        if let Other::Halted = other {
            // vCPU 1 reaches its hlt and waits there.
            client.run_for(Duration::from_millis(20));
        }
        body(&mut client, &target);
        // Detach with every vCPU told to leave its loop once released.
        quit.store(true, Ordering::Release);
        client.expect("D", "OK");
        end.end(0)?;
        server.join().map_err(|_| "the server thread panicked")??;
        Ok(())
    })?;
    Ok(true)
}

/// The QEMU child, killed by the panic hook too (a failed check must not
/// leave it running).
static QEMU_CHILD: Mutex<Option<Child>> = Mutex::new(None);

/// Its `-bios` image and log, removed with it.
static QEMU_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn kill_qemu() {
    if let Ok(mut slot) = QEMU_CHILD.lock() {
        if let Some(mut child) = slot.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    if let Ok(mut files) = QEMU_FILES.lock() {
        for f in files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The QEMU to compare with, or why there is none.
fn find_qemu() -> Result<PathBuf, String> {
    let path = match std::env::var_os("GDB_PATH_QEMU") {
        Some(p) if p.is_empty() => return Err("GDB_PATH_QEMU is set but empty".into()),
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("qemu-system-x86_64"))
                    .find(|p| p.is_file())
            })
            .ok_or("no qemu-system-x86_64 on PATH and GDB_PATH_QEMU is not set (.ci/qemu-for-bench installs one)")?,
    };
    let out = Command::new(&path)
        .args(["-accel", "help"])
        .output()
        .map_err(|e| format!("{} cannot be run: {e}", path.display()))?;
    let accels = String::from_utf8_lossy(&out.stdout);
    if !accels.lines().any(|l| l.trim() == "kvm") {
        return Err(format!(
            "{} has no KVM accelerator (-accel help: {})",
            path.display(),
            accels.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
    }
    Ok(path)
}

/// Where the BSP's loop starts in the image (and at 0xF0000 + it, linear).
const BIOS_BASE: u64 = 0xF_0000;

/// A 64 KiB `-bios` image, mapped at `0xF0000..=0xFFFFF` and run from the
/// reset vector in real mode. Returns it and the BSP loop's offset.
fn bios_image(other: Other) -> (Vec<u8>, u64) {
    let mut img = vec![0xF4u8; 0x1_0000]; // hlt everywhere else
                                          // The AP's start page (SIPI vector V: CS = V << 8, IP = 0, i.e. 0xV000).
    let (vector, ap): (u8, &[u8]) = match other {
        Other::Spinning => (0xF1, &[0x40, 0xEB, 0xFD]),     // inc ax; jmp -3
        Other::Halted => (0xF2, &[0xFA, 0xF4, 0xEB, 0xFD]), // cli; hlt; jmp -3
    };
    let at = (usize::from(vector) << 12) - BIOS_BASE as usize;
    img[at..at + ap.len()].copy_from_slice(ap);
    let mut bsp: Vec<u8> = vec![0xFA]; // cli
    bsp.extend([0x66, 0xB9, 0x1B, 0, 0, 0]); // mov ecx, IA32_APIC_BASE
    bsp.extend([0x0F, 0x32]); // rdmsr
    bsp.extend([0x66, 0x0D, 0x00, 0x0C, 0, 0]); // or eax, EN | EXTD (x2APIC)
    bsp.extend([0x0F, 0x30]); // wrmsr
    bsp.extend([0x66, 0xB9, 0x30, 0x08, 0, 0]); // mov ecx, x2APIC ICR
    bsp.extend([0x66, 0xBA, 0x01, 0, 0, 0]); // mov edx, 1 (APIC id 1)
    bsp.extend([0x66, 0xB8, 0x00, 0x45, 0, 0]); // mov eax, INIT, assert
    bsp.extend([0x0F, 0x30]); // wrmsr
    bsp.extend([0x66, 0xB8, vector, 0x46, 0, 0]); // mov eax, SIPI | vector
    bsp.extend([0x0F, 0x30]); // wrmsr
    let lp = bsp.len() as u64;
    bsp.extend([0x40, 0xEB, 0xFD]); // inc ax; jmp -3
    img[..bsp.len()].copy_from_slice(&bsp);
    // Reset vector (0xFFFF0): jmp far 0xF000:0000.
    img[0xFFF0..0xFFF5].copy_from_slice(&[0xEA, 0x00, 0x00, 0x00, 0xF0]);
    (img, lp)
}

/// Runs `body` with a client attached to QEMU's gdbstub on a 2-vCPU KVM VM
/// whose vCPU 1 does `other`; then kills QEMU.
fn with_qemu(qemu: &Path, other: Other, body: impl FnOnce(&mut Client, &Target)) -> Result<(), Error> {
    let dir = std::env::temp_dir();
    let tag = format!("gdb_path-qemu-{}-{}", std::process::id(), other.name());
    let bios = dir.join(format!("{tag}.bin"));
    let log = dir.join(format!("{tag}.log"));
    let (img, lp) = bios_image(other);
    std::fs::write(&bios, img)?;
    QEMU_FILES
        .lock()
        .map_err(|_| "poisoned")?
        .extend([bios.clone(), log.clone()]);
    // A free port: bound and released (QEMU binds it next).
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(qemu)
        .args(["-accel", "kvm", "-machine", "pc", "-smp", "2", "-m", "16", "-S"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none"])
        .args(["-serial", "none", "-parallel", "none", "-net", "none"])
        .arg("-gdb")
        .arg(format!("tcp:127.0.0.1:{port}"))
        .arg("-bios")
        .arg(&bios)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    *QEMU_CHILD.lock().map_err(|_| "poisoned")? = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match Client::connect(port) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                let err = std::fs::read_to_string(&log).unwrap_or_default();
                kill_qemu();
                return Err(format!("QEMU's gdbstub on port {port}: {e}; QEMU said: {err}").into());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    client.handshake();
    // Run the firmware: the BSP starts the AP, both reach their loops.
    client.run_for(Duration::from_millis(100));
    let (rip0, rip1) = (client.rip(1), client.rip(2));
    let ap_len = match other {
        Other::Spinning => 3,
        Other::Halted => 4,
    };
    assert!(
        (lp..lp + 3).contains(&rip0) && rip1 < ap_len,
        "QEMU's vCPUs are not in their loops: rip {rip0:#x} (loop at {lp:#x}), {rip1:#x}"
    );
    let target = Target {
        name: "qemu",
        bp: BIOS_BASE + lp + 1,
        mem: BIOS_BASE + lp,
        says_hwbreak: false,
    };
    body(&mut client, &target);
    kill_qemu();
    Ok(())
}

/// A one-vCPU VM single-stepping the same loop through raw kvm-ioctls.
struct RawStep {
    g: Guest,
}

impl RawStep {
    /// `None`: no `/dev/kvm`.
    fn new() -> Result<Option<RawStep>, Error> {
        let mut g = match Guest::new(1) {
            Ok(g) => g,
            Err(GuestError::NoKvm(e)) => {
                println!("gdb_path: SKIPPED: every measurement (/dev/kvm cannot be opened: {e})");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        g.start(0, guest::LOOP)?;
        // The configuration kvm-glue applies for a single-step, from the
        // model, so both sides load the same debug registers.
        let dbg = VmDebug::new(g.memory().clone());
        let _registered = dbg.vcpu(0)?; // ids are known once registered
        dbg.set_single_step(0, true)?;
        let cfg = to_kvm(&effective(dbg.guest_debug_for(0)?));
        assert_eq!(cfg.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);
        g.vcpu(0).set_guest_debug(&cfg)?;
        Ok(Some(RawStep { g }))
    }

    fn bench(&mut self, group: &mut BenchmarkGroup<'_, WallTime>, round: usize) {
        let vcpu = self.g.vcpu(0);
        group.bench_function(format!("raw_kvm_step/{round}"), |b| {
            b.iter(|| match vcpu.run() {
                Ok(VcpuExit::Debug(d)) => {
                    black_box(d);
                }
                other => panic!("raw step: {other:?}"),
            })
        });
        // What a vCPU reads of itself as it parks at its own stop.
        group.bench_function(format!("raw_kvm_get_regs_sregs/{round}"), |b| {
            b.iter(|| black_box((vcpu.get_regs().expect("regs"), vcpu.get_sregs().expect("sregs"))))
        });
    }
}

/// The wire alone, as the floor under every row: a thread of this process
/// that answers each packet at once with `OK` and `pad` more characters
/// (`G_HEX`: as long as a `g` reply without run-length encoding) (`hand_off`: after
/// handing it to a second thread and back through a mutex and condition
/// variable, the least a server whose vCPU threads are not its socket's
/// thread must add to a step). The same client, socket options and loopback
/// as the servers'.
struct Floor {
    client: Client,
    _server: std::thread::JoinHandle<()>,
}

/// One hand-off between the socket's thread and a worker: the count of
/// requests and of answers.
#[derive(Default)]
struct HandOff {
    state: Mutex<(u64, u64)>,
    cond: std::sync::Condvar,
}

/// Hex characters in kvm-glue's `g` reply before run-length encoding
/// (608 bytes of registers).
const G_HEX: usize = 1216;

impl Floor {
    /// `poll`: before sleeping in a read, look for the next packet for this
    /// long, yielding between looks, as kvm-glue's session does
    /// ([`Options::busy_poll`]).
    fn new(hand_off: bool, pad: usize, poll: Duration) -> Result<Floor, Error> {
        // `OK`, then hex digits with no run of three (nothing to encode).
        let mut body = b"OK".to_vec();
        body.extend(b"0123456789abcdef".iter().cycle().take(pad));
        let reply = format!("${}#{:02x}", String::from_utf8_lossy(&body), checksum(&body)).into_bytes();
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = std::sync::Arc::new(HandOff::default());
        if hand_off {
            let w = std::sync::Arc::clone(&shared);
            std::thread::Builder::new().name("floor-worker".into()).spawn(move || {
                let Ok(mut st) = w.state.lock() else { return };
                loop {
                    while st.0 == st.1 {
                        st = match w.cond.wait(st) {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                    }
                    st.1 = st.0;
                    w.cond.notify_all();
                }
            })?;
        }
        let server = std::thread::Builder::new().name("floor".into()).spawn(move || {
            let Ok((mut s, _)) = listener.accept() else { return };
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 4096];
            let mut have = Vec::new();
            loop {
                if !poll.is_zero() {
                    let start = Instant::now();
                    let mut one = [0u8];
                    let _ = s.set_nonblocking(true);
                    while matches!(s.peek(&mut one), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
                        && start.elapsed() < poll
                    {
                        std::thread::yield_now();
                    }
                    let _ = s.set_nonblocking(false);
                }
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                have.extend_from_slice(&buf[..n]);
                // Answer each whole packet (`$...#xx`) in it.
                while let Some(h) = have.iter().position(|&b| b == b'#') {
                    if have.len() < h + 3 {
                        break;
                    }
                    have.drain(..h + 3);
                    if hand_off {
                        let Ok(mut st) = shared.state.lock() else { return };
                        st.0 += 1;
                        shared.cond.notify_all();
                        while st.1 != st.0 {
                            st = match shared.cond.wait(st) {
                                Ok(g) => g,
                                Err(_) => return,
                            };
                        }
                    }
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                }
            }
        })?;
        let mut client = Client::connect(port)?;
        client.no_ack = true;
        Ok(Floor {
            client,
            _server: server,
        })
    }

    fn bench(&mut self, group: &mut BenchmarkGroup<'_, WallTime>, name: &str, round: usize) {
        let c = &mut self.client;
        group.bench_function(format!("{name}/{round}"), |b| {
            b.iter(|| black_box(c.expect("vCont;s:1", "OK")))
        });
    }
}

/// kvm-glue's busy-polling window: `$GDB_PATH_BUSY_POLL_US` µs if set (0:
/// none, the session sleeps at once), else the default.
fn busy_poll() -> Duration {
    std::env::var("GDB_PATH_BUSY_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(kvm_glue::gdb::DEFAULT_BUSY_POLL, Duration::from_micros)
}

/// Every operation on `t` in one configuration, `round`.
fn bench_ops(group: &mut BenchmarkGroup<'_, WallTime>, c: &mut Client, t: &Target, other: Other, round: usize) {
    let id = |op: &str| format!("{}/{}/{op}/{round}", t.name, other.name());
    group.bench_function(id("step"), |b| b.iter(|| black_box(c.expect("vCont;s:1", "T05"))));
    group.bench_function(id("stepi"), |b| b.iter(|| black_box(c.expect("vCont;s:1;c", "T05"))));
    group.bench_function(id("g"), |b| b.iter(|| black_box(c.cmd(b"g"))));
    let m = format!("m{:x},40", t.mem);
    group.bench_function(id("m64"), |b| {
        b.iter(|| {
            let r = c.cmd(m.as_bytes());
            assert_eq!(unrle(&r).len(), 128, "m: {:?}", String::from_utf8_lossy(&r));
            black_box(r)
        })
    });
    let (z, uz) = (format!("Z1,{:x},1", t.bp), format!("z1,{:x},1", t.bp));
    group.bench_function(id("Z1_z1"), |b| {
        b.iter(|| {
            c.expect(&z, "OK");
            c.expect(&uz, "OK");
        })
    });
    group.bench_function(id("qxfer"), |b| {
        b.iter(|| {
            let r = c.cmd(b"qXfer:features:read:target.xml:0,7ff");
            assert!(
                r.starts_with(b"m") || r.starts_with(b"l"),
                "qXfer: {:?}",
                String::from_utf8_lossy(&r)
            );
            black_box(r)
        })
    });
    if round == 0 {
        let (bytes, packets) = c.whole_description();
        note(format!(
            "{} ({}): the whole target description is {bytes} bytes in {packets} qXfer packets",
            t.name,
            other.name()
        ));
    }
    group.bench_function(id("qxfer_all"), |b| b.iter(|| black_box(c.whole_description())));
    // What gdb 13 sends for one `stepi` (its `set debug remote 1`, default
    // scheduler mode): the step-and-continue-the-others, then `g` (unless
    // the stop reply carried the pc), the instruction byte at the new pc
    // twice, the thread list, the byte twice.
    let m1 = format!("m{:x},1", t.mem);
    group.bench_function(id("gdb_stepi"), |b| {
        b.iter(|| {
            let stop = c.expect("vCont;s:1;c", "T05");
            // gdb reads the registers only if the stop reply did not carry
            // the pc (regnum 0x10) among its expedited registers.
            if !stop.split(|&b| b == b';').any(|f| f.starts_with(b"10:")) {
                black_box(c.cmd(b"g"));
            }
            for _ in 0..2 {
                black_box(c.cmd(m1.as_bytes()));
            }
            c.expect("qfThreadInfo", "m");
            // QEMU lists one thread per reply: ask on until the end, as gdb does.
            loop {
                let r = c.cmd(b"qsThreadInfo");
                match r.first() {
                    Some(b'm') => {}
                    Some(b'l') => break,
                    _ => panic!("qsThreadInfo: {:?}", String::from_utf8_lossy(&r)),
                }
            }
            for _ in 0..2 {
                black_box(c.cmd(m1.as_bytes()));
            }
        })
    });
    c.expect(&z, "OK");
    if round == 0 {
        let moved = c.continue_moves();
        let what = if moved == 0 {
            ": it re-hits the breakpoint without executing anything (RF not honoured by this \
             host's KVM), so its continue row measures no guest progress"
        } else {
            ""
        };
        note(format!(
            "{} ({}): {moved} of {CONTINUE_PROBES} continues from the hw breakpoint ran the loop{what}",
            t.name,
            other.name(),
        ));
    }
    group.bench_function(id("continue_to_hbreak"), |b| {
        b.iter(|| {
            let r = c.expect("vCont;c", "T05");
            assert!(
                !t.says_hwbreak || r.windows(7).any(|w| w == b"hwbreak"),
                "{:?}",
                String::from_utf8_lossy(&r)
            );
        })
    });
    c.expect(&uz, "OK");
    group.bench_function(id("ctrl_c"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                c.send(b"vCont;c");
                // Let the resume reach the vCPUs (untimed).
                std::thread::sleep(Duration::from_micros(200));
                let t = Instant::now();
                c.stream.write_all(&[0x03]).expect("Ctrl-C");
                let r = c.recv();
                total += t.elapsed();
                assert!(r.starts_with(b"T02"), "Ctrl-C: {:?}", String::from_utf8_lossy(&r));
            }
            total
        })
    });
}

/// Facts found while measuring, printed with the summary.
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note(line: String) {
    if let Ok(mut notes) = NOTES.lock() {
        notes.push(line);
    }
}

/// Criterion's output directory (its own rule, as `benches/main.rs` has it).
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(home.into());
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(Path::new(&target).join("criterion"));
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// The median, in ns, criterion wrote for `id` in this run.
fn median(dir: &Path, id: &str, since: SystemTime) -> Option<f64> {
    let file = dir.join(id).join("new/estimates.json");
    if file.metadata().and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

/// The median over the rounds of criterion's medians of `op`.
fn op_median(dir: &Path, op: &str, since: SystemTime) -> Option<f64> {
    let mut v: Vec<f64> = (0..ROUNDS)
        .filter_map(|r| median(dir, &format!("gdb_path/{}_{r}", op.replace('/', "_")), since))
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    })
}

fn summary(since: SystemTime, qemu: Option<&str>) {
    let Some(dir) = criterion_dir() else {
        println!("gdb_path ratios: criterion's directory not found");
        return;
    };
    let Some(raw) = op_median(&dir, "raw_kvm_step", since) else {
        println!("gdb_path ratios: the raw KVM step was not measured in this run");
        return;
    };
    println!(
        "\nGDB path (criterion medians over {ROUNDS} rounds, {}), raw KVM single-step exit {:.2} µs",
        dir.display(),
        raw / 1e3
    );
    let floor = op_median(&dir, "wire_floor", since);
    if let (Some(f), Some(h)) = (floor, op_median(&dir, "wire_floor_hand_off", since)) {
        println!(
            "the wire alone (a thread answering at once): {:.2} µs = {:.2}x the raw step; \
             with a hand-off to a second thread and back: {:.2} µs = {:.2}x",
            f / 1e3,
            f / raw,
            h / 1e3,
            h / raw
        );
    }
    let polling = op_median(&dir, "wire_floor_polling", since);
    if let Some(p) = polling {
        println!(
            "the wire alone, answered by a thread that busy-polls for {} µs before it sleeps \
             (as kvm-glue's session does): {:.2} µs = {:.2}x the raw step",
            busy_poll().as_micros(),
            p / 1e3,
            p / raw
        );
    }
    if let Some(r) = op_median(&dir, "raw_kvm_get_regs_sregs", since) {
        println!(
            "KVM_GET_REGS + KVM_GET_SREGS on a vCPU: {:.2} µs = {:.2}x the raw step \
             (what the stopped vCPU reads as it parks, for the stop reply)",
            r / 1e3,
            r / raw
        );
    }
    if let Some(f) = op_median(&dir, "wire_floor_g_sized", since) {
        println!(
            "the wire alone with a {G_HEX}-character reply (a g before run-length encoding): {:.2} µs",
            f / 1e3
        );
    }
    match qemu {
        Some(q) => println!("QEMU: {q} (its halted vCPU halts in the kernel: in-kernel irqchip)"),
        None => println!("QEMU: not measured"),
    }
    let rows = [
        ("step", "vCont;s:1 (step one vCPU)"),
        ("stepi", "vCont;s:1;c (gdb's stepi)"),
        ("Z1_z1", "Z1 + z1"),
        ("g", "g"),
        ("m64", "m addr,64"),
        ("qxfer", "qXfer:features:read"),
        ("qxfer_all", "the whole description"),
        ("gdb_stepi", "gdb's stepi (its packets)"),
        ("continue_to_hbreak", "continue to a hw breakpoint"),
        ("ctrl_c", "Ctrl-C to the stop reply"),
    ];
    for other in [Other::Spinning, Other::Halted] {
        println!(
            "\nother vCPU {:<9}            kvm-glue µs    QEMU µs   kvm-glue/QEMU",
            other.name()
        );
        for (op, label) in rows {
            let ours = op_median(&dir, &format!("kvm-glue/{}/{op}", other.name()), since);
            let theirs = op_median(&dir, &format!("qemu/{}/{op}", other.name()), since);
            let Some(t) = ours else { continue };
            let (q, ratio) = match theirs {
                Some(q) => (format!("{:>10.2}", q / 1e3), format!("{:>8.2}", t / q)),
                None => (format!("{:>10}", "-"), format!("{:>8}", "-")),
            };
            println!("{label:<30} {:>10.2} {q}   {ratio}", t / 1e3);
        }
        if let Some(t) = op_median(&dir, &format!("kvm-glue/{}/step", other.name()), since) {
            let verdict = if t / raw <= 2.5 { "met" } else { "MISSED" };
            let q = op_median(&dir, &format!("qemu/{}/step", other.name()), since)
                .map(|q| format!("; QEMU's {:.2}x", q / raw))
                .unwrap_or_default();
            println!("step / raw KVM step: {:.2}x (goal <= 2.5x: {verdict}){q}", t / raw);
            // Against the floor that answers as kvm-glue's session does.
            if let Some(f) = if busy_poll().is_zero() { floor } else { polling } {
                println!(
                    "step above the wire alone: {:.2} µs = {:.2}x the raw step (the wire alone is {:.2}x)",
                    (t - f) / 1e3,
                    (t - f) / raw,
                    f / raw
                );
            }
        }
        for op in ["continue_to_hbreak", "ctrl_c"] {
            if let (Other::Halted, Some(t)) = (other, op_median(&dir, &format!("kvm-glue/halted/{op}"), since)) {
                let verdict = if t <= 1e6 { "met" } else { "MISSED" };
                println!("{op} with vCPU 1 halted: {:.2} µs (goal < 1 ms: {verdict})", t / 1e3);
            }
        }
    }
}

fn print_notes() {
    if let Ok(notes) = NOTES.lock() {
        for n in notes.iter() {
            println!("note: {n}");
        }
    }
}

fn configure(c: &mut Criterion) -> BenchmarkGroup<'_, WallTime> {
    let mut group = c.benchmark_group("gdb_path");
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    group.sample_size(20);
    group
}

fn run(c: &mut Criterion) -> Result<Option<String>, Error> {
    let Some(mut raw) = RawStep::new()? else {
        return Ok(None);
    };
    let mut floor = Floor::new(false, 0, Duration::ZERO)?;
    let mut floor_polling = Floor::new(false, 0, busy_poll())?;
    let mut floor_g = Floor::new(false, G_HEX - 2, Duration::ZERO)?;
    let mut hand_off = Floor::new(true, 0, Duration::ZERO)?;
    let qemu = match find_qemu() {
        Ok(q) => Some(q),
        Err(why) => {
            println!("gdb_path: SKIPPED: QEMU column because {why}");
            None
        }
    };
    for other in [Other::Spinning, Other::Halted] {
        let mut failed = None;
        let ran = with_vm(other, |kc, kt| {
            let mut rounds = |qc: Option<(&mut Client, &Target)>| {
                let mut group = configure(c);
                let mut qc = qc;
                for round in 0..ROUNDS {
                    if let Other::Spinning = other {
                        raw.bench(&mut group, round);
                        floor.bench(&mut group, "wire_floor", round);
                        floor_polling.bench(&mut group, "wire_floor_polling", round);
                        floor_g.bench(&mut group, "wire_floor_g_sized", round);
                        hand_off.bench(&mut group, "wire_floor_hand_off", round);
                    }
                    bench_ops(&mut group, kc, kt, other, round);
                    if let Some((q, t)) = qc.as_mut() {
                        bench_ops(&mut group, q, t, other, round);
                    }
                }
                group.finish();
            };
            match &qemu {
                Some(path) => {
                    if let Err(e) = with_qemu(path, other, |q, t| rounds(Some((q, t)))) {
                        failed = Some(e);
                    }
                }
                None => rounds(None),
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        if !ran {
            return Ok(None);
        }
    }
    Ok(qemu.map(|q| {
        let v = Command::new(&q)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        format!("{} ({v})", q.display())
    }))
}

fn main() {
    // A failed check must end the bench, not leave it waiting for vCPU
    // threads that spin for ever, nor leave QEMU running.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        kill_qemu();
        std::process::exit(101);
    }));
    let since = SystemTime::now();
    let mut c = Criterion::default().without_plots().configure_from_args();
    let qemu = match run(&mut c) {
        Ok(q) => q,
        Err(e) => {
            kill_qemu();
            eprintln!("gdb_path: {e}");
            std::process::exit(1);
        }
    };
    c.final_summary();
    summary(since, qemu.as_deref());
    print_notes();
}
