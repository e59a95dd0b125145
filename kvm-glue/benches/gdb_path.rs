//! The GDB path, end to end: an in-process client speaking GDB's remote
//! protocol (raw packets, no gdb) over loopback TCP to [`kvm_glue::gdb::serve`]
//! on two real vCPUs of the tiny built-in guest, beside the raw KVM
//! single-step exit measured in the same run (as `benches/step.rs` does), and
//! a summary of the ratios from criterion's medians.
//!
//! `cargo bench -p kvm-glue --features gdb --bench gdb_path`
//!
//! Measured, per round trip (client sends, client has the whole reply):
//! * `vCont;s:1`: step vCPU 0 one instruction (the other stays stopped);
//! * `g`: every register of thread 1;
//! * `m10400,40`: 64 bytes of guest memory;
//! * `Z1` + `z1`: insert and remove a hardware breakpoint;
//! * continue to a hardware breakpoint: `vCont;c` until the stop reply, with
//!   `Z1` on the loop's `jmp` (the server steps off it at each resume);
//! * Ctrl-C: from the `0x03` byte to the stop reply, the guest running
//!   (`vCont;c` first, then 200 µs untimed).
//!
//! Two configurations: vCPU 1 spinning in the same two-instruction loop as
//! vCPU 0, and vCPU 1 halted (`hlt` exits to this VMM, which has no
//! interrupt controller and sleeps 5 ms, as the `gdb_server` example does;
//! only continue and Ctrl-C wait for it, so only they are measured there).
//!
//! The client negotiates `QStartNoAckMode`, as gdb does. Without `/dev/kvm`
//! it prints `SKIPPED` and measures nothing.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant, SystemTime};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_glue::gdb::{serve, GuestEnd, Options};
use kvm_glue::guest::{self, Exit, Guest, GuestError};
use kvm_glue::kick::SignalKick;
use kvm_glue::vcpu_debug::{effective, to_kvm};
use kvm_glue::{Handled, VcpuDebug, VmDebug};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long a halted vCPU sleeps before it looks at the debugger's requests
/// again (the `gdb_server` example's value).
const IDLE: Duration = Duration::from_millis(5);

/// The loop's `jmp` (`inc rax` at +0, `jmp` at +3): the breakpoint address.
const BP: u64 = guest::LOOP + 3;

/// Rounds of every measurement, alternated so host drift hits all alike.
const ROUNDS: usize = 2;

/// What vCPU 1 does.
#[derive(Clone, Copy)]
enum Other {
    /// The same endless loop as vCPU 0.
    Spinning,
    /// `hlt` at [`guest::STRAIGHT_HLT`], forever.
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
            Exit::Hlt => std::thread::sleep(IDLE),
            other => return Err(format!("vCPU {id}: unexpected exit {other:?}").into()),
        }
    }
}

/// A raw-protocol GDB client.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
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
        })
    }

    /// Sends `$body#xx` in one write.
    fn send(&mut self, body: &[u8]) {
        let mut p = Vec::with_capacity(body.len() + 4);
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
}

/// Runs `body` with a client attached to the GDB server of a fresh VM whose
/// vCPU 1 does `other`; then detaches, ends the vCPU threads and the
/// server. `Ok(false)`: no `/dev/kvm`, nothing ran.
fn with_vm(other: Other, body: impl FnOnce(&mut Client)) -> Result<bool, Error> {
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
        ..Options::default()
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
            .spawn_scoped(s, move || serve(listener, dbg, options, |_| {}))?;
        let mut client = Client::connect(port)?;
        client.expect("qSupported:swbreak+;hwbreak+;vContSupported+", "PacketSize");
        client.expect("QStartNoAckMode", "OK");
        client.expect("?", "T");
        client.expect("Hg1", "OK");
        body(&mut client);
        // Detach with every vCPU told to leave its loop once released.
        quit.store(true, Ordering::Release);
        client.expect("D", "OK");
        end.end(0)?;
        server.join().map_err(|_| "the server thread panicked")??;
        Ok(())
    })?;
    Ok(true)
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
    }
}

/// Every operation of one configuration, `round`.
fn bench_ops(group: &mut BenchmarkGroup<'_, WallTime>, c: &mut Client, other: Other, round: usize) {
    let name = other.name();
    if let Other::Spinning = other {
        group.bench_function(format!("{name}/step/{round}"), |b| {
            b.iter(|| black_box(c.expect("vCont;s:1", "T05")))
        });
        group.bench_function(format!("{name}/g/{round}"), |b| b.iter(|| black_box(c.cmd(b"g"))));
        let m = format!("m{:x},40", guest::LOOP);
        group.bench_function(format!("{name}/m64/{round}"), |b| {
            b.iter(|| {
                let r = c.cmd(m.as_bytes());
                assert_eq!(unrle(&r).len(), 128, "m: {:?}", String::from_utf8_lossy(&r));
                black_box(r)
            })
        });
        let (z, uz) = (format!("Z1,{BP:x},1"), format!("z1,{BP:x},1"));
        group.bench_function(format!("{name}/Z1_z1/{round}"), |b| {
            b.iter(|| {
                c.expect(&z, "OK");
                c.expect(&uz, "OK");
            })
        });
    }
    let (z, uz) = (format!("Z1,{BP:x},1"), format!("z1,{BP:x},1"));
    c.expect(&z, "OK");
    group.bench_function(format!("{name}/continue_to_hbreak/{round}"), |b| {
        b.iter(|| {
            let r = c.expect("vCont;c", "T05");
            assert!(
                r.windows(7).any(|w| w == b"hwbreak"),
                "{:?}",
                String::from_utf8_lossy(&r)
            );
        })
    });
    c.expect(&uz, "OK");
    group.bench_function(format!("{name}/ctrl_c/{round}"), |b| {
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

fn summary(since: SystemTime) {
    let Some(dir) = criterion_dir() else {
        println!("gdb_path ratios: criterion's directory not found");
        return;
    };
    let Some(raw) = op_median(&dir, "raw_kvm_step", since) else {
        println!("gdb_path ratios: the raw KVM step was not measured in this run");
        return;
    };
    println!(
        "\nGDB path (criterion medians, {}), raw KVM single-step exit {:.2} µs:",
        dir.display(),
        raw / 1e3
    );
    let rows = [
        ("spinning/step", "vCont;s:1 (step one vCPU)", Some(2.5)),
        ("spinning/g", "g", None),
        ("spinning/m64", "m addr,64", None),
        ("spinning/Z1_z1", "Z1 + z1", None),
        ("spinning/continue_to_hbreak", "continue to a hw breakpoint", None),
        ("spinning/ctrl_c", "Ctrl-C to the stop reply", None),
        ("halted/continue_to_hbreak", "continue to a hw bp, vCPU 1 halted", None),
        ("halted/ctrl_c", "Ctrl-C, vCPU 1 halted", None),
    ];
    for (op, label, goal) in rows {
        let Some(t) = op_median(&dir, op, since) else {
            continue;
        };
        let note = match goal {
            Some(g) if t / raw <= g => format!("  (goal <= {g}x the raw step: met)"),
            Some(g) => format!("  (goal <= {g}x the raw step: MISSED)"),
            None => String::new(),
        };
        println!(
            "{label:<38} {:>10.2} µs  = {:>7.2}x the raw KVM step{note}",
            t / 1e3,
            t / raw
        );
    }
}

fn run(c: &mut Criterion) -> Result<(), Error> {
    let Some(mut raw) = RawStep::new()? else {
        return Ok(());
    };
    let spinning = with_vm(Other::Spinning, |client| {
        let mut group = c.benchmark_group("gdb_path");
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(1));
        group.sample_size(20);
        for round in 0..ROUNDS {
            raw.bench(&mut group, round);
            bench_ops(&mut group, client, Other::Spinning, round);
        }
        group.finish();
    })?;
    if !spinning {
        return Ok(());
    }
    with_vm(Other::Halted, |client| {
        let mut group = c.benchmark_group("gdb_path");
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(2));
        group.sample_size(10);
        for round in 0..ROUNDS {
            bench_ops(&mut group, client, Other::Halted, round);
        }
        group.finish();
    })?;
    Ok(())
}

fn main() {
    // A failed check must end the bench, not leave it waiting for vCPU
    // threads that spin for ever.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        std::process::exit(101);
    }));
    let since = SystemTime::now();
    let mut c = Criterion::default().without_plots().configure_from_args();
    if let Err(e) = run(&mut c) {
        eprintln!("gdb_path: {e}");
        std::process::exit(1);
    }
    c.final_summary();
    summary(since);
}
