//! The C guest (`tests/guest-c/`) and the `elf_vmm` example, for the tests
//! that run them: `kvm_elf_vmm.rs` (the KVM lanes) and `gdb_real_guest.rs`.
//!
//! A lane without gcc or cargo's build of the example can supply them:
//! `ELF_VMM_GUEST` (a guest ELF built as [`build_guest`] does) and
//! `ELF_VMM_BIN` (the example binary).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(90);

/// A program on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|p| p.join(name))
        .find(|p| p.is_file())
}

/// What every test here needs, or `None` after one SKIPPED line.
pub struct Setup {
    /// `None` when the test does not need it and there is none.
    pub gdb: Option<PathBuf>,
    pub vmm: PathBuf,
    pub elf: PathBuf,
}

/// What a test needs besides `/dev/kvm`, the example and the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Nothing more: the guest runs without a debugger.
    Nothing,
    /// gdb, and a host that can do execute breakpoints and single-step.
    Gdb,
}

/// What the test needs, or `None` after one SKIPPED line.
pub fn setup(test: &str, needs: Needs) -> Option<Setup> {
    crate::common::guest(test, 2)?; // /dev/kvm (SKIPPED line, or a failure under KVM_GLUE_REQUIRE_KVM)
    if needs == Needs::Gdb {
        let p = crate::common::probe();
        for (what, f) in [("execute breakpoints", &p.execute), ("single-step", &p.single_step)] {
            if !f.supported {
                println!("{test}: SKIPPED: this host's KVM cannot do {what} ({})", f.detail);
                return None;
            }
        }
    }
    let gdb = std::env::var_os("GDB").map(PathBuf::from).or_else(|| on_path("gdb"));
    if needs == Needs::Gdb && gdb.is_none() {
        println!("{test}: SKIPPED: no gdb on PATH and no GDB (apt-get install -y gdb)");
        return None;
    }
    let Some(vmm) = vmm_binary() else {
        println!("{test}: SKIPPED: the elf_vmm example is not built beside this test and ELF_VMM_BIN is not set");
        return None;
    };
    let elf = match std::env::var_os("ELF_VMM_GUEST") {
        Some(elf) => PathBuf::from(elf),
        None => build_guest(test)?,
    };
    Some(Setup { gdb, vmm, elf })
}

/// Builds the C guest with the system gcc (once per test binary), or
/// `None` after one SKIPPED line when there is no gcc.
pub fn build_guest(test: &str) -> Option<PathBuf> {
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

/// `ELF_VMM_BIN`, or the example cargo built beside this test (`cargo
/// test` builds the examples, with the features asked for; `--test NAME`
/// alone does not: build it with `cargo build --example elf_vmm`).
pub fn vmm_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("ELF_VMM_BIN") {
        return Some(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/gdb_real_guest-<hash> -> target/<profile>/examples/elf_vmm
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join("elf_vmm");
    bin.is_file().then_some(bin)
}

/// A running `elf_vmm`; killed on drop.
pub struct Vmm {
    child: Child,
    out: Arc<Mutex<String>>,
    /// What it printed after `target remote`, if it serves GDB.
    pub target: Option<String>,
}

impl Vmm {
    pub fn start(s: &Setup, args: &[&str]) -> Vmm {
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
            rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
                panic!(
                    "elf_vmm printed no gdb command line (built without feature gdb? \
                         cargo build -p kvm-glue --features gdb --example elf_vmm):\n{}",
                    out.lock().expect("log")
                )
            })
        });
        Vmm { child, out, target }
    }

    pub fn log(&self) -> String {
        self.out.lock().expect("log").clone()
    }

    /// Waits for the process to end; its exit code.
    pub fn wait(&mut self) -> i32 {
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
    pub fn wait_for(&self, what: &str) {
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

/// The text after `prefix` on the first line that has it, up to `end`.
pub fn after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.split_once(prefix).map(|(_, rest)| rest))
}

/// `0x...` at the start of `s`, as a number.
pub fn hex_at(s: &str) -> Option<u64> {
    let s = s.trim_start().strip_prefix("0x")?;
    let end = s.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(s.len());
    u64::from_str_radix(&s[..end], 16).ok()
}
