//! The real `gdb`, with the C guest's symbols, against the `elf_vmm`
//! example on real `/dev/kvm`: a VMM that owns its VM, an ELF built here
//! by the system gcc from `tests/guest-c/`, two vCPUs running different
//! code, GDB on loopback TCP and on a pty.
//!
//! Breakpoints are `hbreak` (hardware execute breakpoints): this host's KVM
//! (`kvm_pvm`) cannot deliver `int3` exits (HOST.md). Each test first makes
//! sure of what it needs and prints one `SKIPPED:` line naming what is
//! missing: `/dev/kvm` (a failure under `KVM_GLUE_REQUIRE_KVM`), gdb, gcc,
//! or a host that cannot do execute breakpoints or single-step (probe).
//!
//! The debugging tests run the guest with `--no-timer`: with its timer on,
//! an interrupt can land in the single-step kvm-glue takes past a hardware
//! breakpoint (issue #18 item 6, not done yet), and then GDB sees the same
//! breakpoint hit twice, or the step's TF reaches the guest's own `#DB`
//! handler (seen in about 1 run in 10 here). The timer itself is checked
//! without a debugger.
//!
//! A lane without gcc, cargo or gdb on `PATH` can supply them:
//! `ELF_VMM_GUEST` (a guest ELF built as [`build_guest`] does),
//! `ELF_VMM_BIN` (the example binary) and `GDB`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(90);

/// A program on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(name))
        .find(|p| p.is_file())
}

/// What every test here needs, or `None` after one SKIPPED line.
struct Setup {
    gdb: PathBuf,
    vmm: PathBuf,
    elf: PathBuf,
}

fn setup(test: &str, debugging: bool) -> Option<Setup> {
    common::guest(test, 2)?; // /dev/kvm (SKIPPED line, or a failure under KVM_GLUE_REQUIRE_KVM)
    if debugging {
        let p = common::probe();
        for (what, f) in [("execute breakpoints", &p.execute), ("single-step", &p.single_step)] {
            if !f.supported {
                println!("{test}: SKIPPED: this host's KVM cannot do {what} ({})", f.detail);
                return None;
            }
        }
    }
    let Some(gdb) = std::env::var_os("GDB").map(PathBuf::from).or_else(|| on_path("gdb")) else {
        println!("{test}: SKIPPED: no gdb on PATH and no GDB (apt-get install -y gdb)");
        return None;
    };
    let elf = match std::env::var_os("ELF_VMM_GUEST") {
        Some(elf) => PathBuf::from(elf),
        None => build_guest(test)?,
    };
    Some(Setup {
        gdb,
        vmm: vmm_binary(),
        elf,
    })
}

/// Builds the C guest with the system gcc (once per test binary), or
/// `None` after one SKIPPED line when there is no gcc.
fn build_guest(test: &str) -> Option<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(elf) = built.as_ref() {
        return Some(elf.clone());
    }
    let Some(gcc) = on_path("gcc") else {
        println!("{test}: SKIPPED: no gcc on PATH to build the C guest (or set ELF_VMM_GUEST)");
        return None;
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest-c");
    let out = std::env::temp_dir().join(format!("kvm-glue-guest-{}.elf", std::process::id()));
    let status = Command::new(gcc)
        .args([
            "-g",
            "-O0",
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-mno-red-zone",
            "-fno-pic",
            "-no-pie",
        ])
        .args([
            "-fno-stack-protector",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
            "-T",
        ])
        .arg(src.join("link.ld"))
        .arg(src.join("guest.c"))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed to build the C guest: {status}");
    *built = Some(out.clone());
    Some(out)
}

/// The example cargo built beside this test (`cargo test --features gdb`
/// builds examples), or `ELF_VMM_BIN`.
fn vmm_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ELF_VMM_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/gdb_real_guest-<hash> -> target/<profile>/examples/elf_vmm
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join("elf_vmm");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test -p kvm-glue --features gdb`, which builds the examples",
        bin.display()
    );
    bin
}

/// A running `elf_vmm`; killed on drop.
struct Vmm {
    child: Child,
    out: Arc<Mutex<String>>,
    /// What it printed after `target remote`, if it serves GDB.
    target: Option<String>,
}

impl Vmm {
    fn start(s: &Setup, args: &[&str]) -> Vmm {
        let mut child = Command::new(&s.vmm)
            .arg(&s.elf)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start elf_vmm");
        let out = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let (out, tx) = (Arc::clone(&out), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(t) = line.split("-ex 'target remote ").nth(1) {
                        let _ = tx.send(t.trim_end_matches('\'').to_string());
                    }
                    out.lock().expect("log").push_str(&(line + "\n"));
                }
            });
        }
        let serves = args.iter().any(|a| a.starts_with("--gdb"));
        let target = serves.then(|| {
            rx.recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("elf_vmm printed no gdb command line:\n{}", out.lock().expect("log")))
        });
        Vmm { child, out, target }
    }

    fn log(&self) -> String {
        self.out.lock().expect("log").clone()
    }

    /// Waits for the process to end; its exit code.
    fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "elf_vmm did not end:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `what`.
    fn wait_for(&self, what: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "elf_vmm never printed {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `gdb -batch` with the guest's symbols, `target remote` to the
/// VMM, then `script`; returns what gdb printed (stdout and stderr).
fn gdb(s: &Setup, vmm: &Vmm, script: &str) -> String {
    let target = vmm.target.as_deref().expect("the VMM serves GDB");
    let file = std::env::temp_dir().join(format!(
        "kvm-glue-real-guest-{}-{:?}.gdb",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(
        &file,
        format!("set pagination off\nset confirm off\ntarget remote {target}\n{script}\n"),
    )
    .expect("write gdb script");
    let mut child = Command::new(&s.gdb)
        .args(["-nx", "-q", "-batch", "-x"])
        .arg(&file)
        .arg(&s.elf)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gdb");
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("gdb output");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("--- gdb {target}:\n{text}--- elf_vmm:\n{}---", vmm.log());
    text
}

/// The text after `prefix` on the first line that has it, up to `end`.
fn after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.split_once(prefix).map(|(_, rest)| rest))
}

/// `0x...` at the start of `s`, as a number.
fn hex_at(s: &str) -> Option<u64> {
    let s = s.trim_start().strip_prefix("0x")?;
    let end = s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
    u64::from_str_radix(&s[..end], 16).ok()
}

#[test]
fn the_example_runs_the_c_guest_to_its_end_with_its_timer() {
    let name = "elf_vmm without a debugger";
    let Some(s) = setup(name, false) else { return };
    let mut vmm = Vmm::start(&s, &[]);
    assert_eq!(vmm.wait(), 0, "{}", vmm.log());
    let log = vmm.log();
    println!("{log}");
    // 3 rounds of fact(5) = 5! = 120, added up: 120, 240, 360.
    for (round, total) in [(0, 120), (1, 240), (2, 360)] {
        let line = format!("guest: vcpu0: round {round}: fact(5) = 120, counter = {total}");
        assert!(log.contains(&line), "missing {line:?}:\n{log}");
    }
    // The guest waits in hlt for two timer interrupts before it is done.
    let ticks: u64 = after(&log, "vcpu0: timer ticks: ")
        .and_then(|t| t.trim().parse().ok())
        .expect("ticks");
    assert!(ticks >= 2, "{log}");
    let rounds: u64 = after(&log, "guest: vcpu1: ")
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("vcpu1's rounds");
    assert!(rounds > 0, "vCPU 1 ran its own loop: {log}");
    assert!(log.contains("vCPU 0: done") && log.contains("vCPU 1: done"), "{log}");
    println!("{name}: checked both vCPUs ran their code to the end, {ticks} timer ticks, exit code 0");
}

#[test]
fn hbreak_on_a_function_by_name_stops_in_the_recursion_gdb_shows() {
    let name = "real guest over TCP";
    let Some(s) = setup(name, true) else { return };
    let mut vmm = Vmm::start(&s, &["--hold", "--gdb-port", "0", "--no-timer"]);
    let out = gdb(
        &s,
        &vmm,
        "info threads
hbreak fact
continue
continue
continue
bt
p counter
p shared
x/8xb &shared
thread 2
bt
delete
hbreak vcpu1_work
continue
set scheduler-locking step
x/2i $pc
stepi
p/x $pc
delete
set scheduler-locking off
continue",
    );
    // Held at the entry, both vCPUs; thread n + 1 is vCPU n.
    assert!(
        out.contains("Thread 1.1 (vCPU 0) 0x0000000000100000 in _start ()"),
        "{out}"
    );
    assert!(
        out.contains("Thread 1.2 (vCPU 1) 0x0000000000100000 in _start ()"),
        "{out}"
    );
    assert!(out.contains("Hardware assisted breakpoint 1 at"), "{out}");
    // fact(5) calls fact(4) calls fact(3): three stops, one per call.
    for n in [5, 4, 3] {
        let hit = format!("Thread 1 hit Breakpoint 1, fact (n={n})");
        assert!(out.contains(&hit), "missing {hit:?}:\n{out}");
    }
    let frames: Vec<&str> = out.lines().filter(|l| l.starts_with('#')).collect();
    let want = [
        "#0  fact (n=3)",
        "in fact (n=4)",
        "in fact (n=5)",
        "in vcpu0_main (timer=0)",
        "in guest_main (cpu=0, timer=0)",
        "in _start ()",
    ];
    assert!(frames.len() >= want.len(), "{out}");
    for (frame, want) in frames.iter().zip(want) {
        assert!(frame.contains(want), "frame {frame:?} should show {want:?}:\n{out}");
    }
    // vCPU 0 is still in its first round: nothing added yet; shared as
    // initialised (x = 1, tag = 0x5eed = 24301), y counted by vCPU 1.
    assert!(out.contains("$1 = 0\n"), "{out}");
    let shared = after(&out, "$2 = {x = 1, y = ").expect("p shared");
    let (y, tail) = shared.split_once(',').expect("y");
    assert_eq!(tail.trim(), "tag = 24301}", "{out}");
    let y: u32 = y.parse().expect("y is a number");
    // x/8xb: x then y, little-endian.
    let bytes: Vec<u8> = after(&out, "<shared>:")
        .expect("x/8xb")
        .split_whitespace()
        .map(|b| hex_at(b).expect("a byte") as u8)
        .collect();
    let mut want = vec![1, 0, 0, 0];
    want.extend(y.to_le_bytes());
    assert_eq!(bytes, want, "{out}");
    // Thread 2 runs vcpu1_main's loop.
    assert!(out.contains("[Switching to thread 2 (Thread 1.2)]"), "{out}");
    assert!(out.contains("in guest_main (cpu=1, timer=0)"), "{out}");
    assert!(out.contains("Thread 2 hit Breakpoint 2, vcpu1_work ()"), "{out}");
    // stepi on thread 2 alone (interrupts off on vCPU 1): the next instruction.
    let next = out
        .lines()
        .skip_while(|l| !l.starts_with("=> "))
        .nth(1)
        .and_then(hex_at)
        .expect("x/2i's second instruction");
    let pc = after(&out, "$3 = ").and_then(hex_at).expect("p/x $pc");
    assert_eq!(pc, next, "stepi went to the next instruction:\n{out}");
    assert!(out.contains("[Inferior 1 (process 1) exited normally]"), "{out}");
    assert_eq!(vmm.wait(), 0);
    let log = vmm.log();
    assert!(
        log.contains("guest: vcpu0: round 2: fact(5) = 120, counter = 360"),
        "{log}"
    );
    assert!(log.contains("GDB session ended (the guest ended with code 0)"), "{log}");
    println!("{name}: checked hbreak by name, bt through fact's recursion, p, x/8xb, info threads, thread 2, stepi, continue to the end");
}

#[test]
fn gdb_over_a_pty_debugs_the_guest_and_a_second_gdb_attaches_after_a_detach() {
    let name = "real guest over a pty";
    let Some(s) = setup(name, true) else { return };
    let mut vmm = Vmm::start(&s, &["--hold", "--gdb-pty", "--no-timer"]);
    let target = vmm.target.clone().expect("a pty");
    assert!(target.starts_with("/dev/pts/"), "{target}");
    let first = gdb(
        &s,
        &vmm,
        "info threads
hbreak fact
continue
p n
delete
set var rounds = 1000000000
detach",
    );
    assert!(first.contains("Thread 1.2 (vCPU 1)"), "{first}");
    assert!(first.contains("Thread 1 hit Breakpoint 1, fact (n=5)"), "{first}");
    assert!(first.contains("$1 = 5\n"), "{first}");
    assert!(first.contains("[Inferior 1 (process 1) detached]"), "{first}");
    vmm.wait_for("GDB session ended (detached)");
    // The guest runs on, round after round, until the second gdb ends it.
    std::thread::sleep(Duration::from_millis(200));
    let second = gdb(
        &s,
        &vmm,
        "p rounds
p counter
set var rounds = 0
continue",
    );
    assert!(second.contains("$1 = 1000000000\n"), "{second}");
    let counter: u64 = after(&second, "$2 = ")
        .and_then(|c| c.trim().parse().ok())
        .expect("p counter");
    // More than the 3 rounds x 120 it would have run without the first gdb.
    assert!(counter > 360 && counter % 120 == 0, "{second}");
    assert!(second.contains("[Inferior 1 (process 1) exited normally]"), "{second}");
    assert_eq!(vmm.wait(), 0);
    let log = vmm.log();
    assert_eq!(log.matches(&format!("GDB connected from {target}")).count(), 2, "{log}");
    println!(
        "{name}: checked gdb on {target}: hbreak, p, set var, detach; a second gdb: p, set var, continue to the end"
    );
}
