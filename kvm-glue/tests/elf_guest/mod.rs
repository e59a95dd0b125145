//! The C guest (`tests/guest-c/`) and the `elf_vmm` example, for the tests
//! that run them: `kvm_elf_vmm.rs` and `kvm_gdb_real_guest.rs` (the KVM
//! lanes) and `gdb_real_guest.rs` (the host, with the gdb binary).
//!
//! A lane without gcc or cargo's build of the example can supply them:
//! `ELF_VMM_GUEST` (a guest ELF built as [`build_guest`] does) and
//! `ELF_VMM_BIN` (the example binary; built with feature `gdb` for the
//! tests that debug the guest). `.ci/nested-kvm` and `.ci/nested-vmx` build
//! both on the host and set both, on every lane.
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
    /// A host that can do execute breakpoints and single-step, for a
    /// GDB-protocol client of the test's own (no gdb binary).
    Debug,
}

/// What the test needs, or `None` after one SKIPPED line.
pub fn setup(test: &str, needs: Needs) -> Option<Setup> {
    crate::common::guest(test, 2)?; // /dev/kvm (SKIPPED line, or a failure under KVM_GLUE_REQUIRE_KVM)
    if needs != Needs::Nothing {
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

/// Why [`Vmm::try_start`] found no GDB server.
#[derive(Debug)]
pub enum NoServer {
    /// This `elf_vmm` was built without feature `gdb`: it said so and ended.
    NoGdbFeature(String),
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
        Vmm::try_start(s, args).unwrap_or_else(|NoServer::NoGdbFeature(log)| {
            panic!(
                "elf_vmm was built without feature gdb \
                 (cargo build -p kvm-glue --features gdb --example elf_vmm):\n{log}"
            )
        })
    }

    /// Like [`Vmm::start`], but an `elf_vmm` built without feature `gdb`
    /// asked to serve GDB is an answer (it refuses `--gdb-*` at once), not
    /// a panic: `cargo test` without features builds the example so.
    pub fn try_start(s: &Setup, args: &[&str]) -> Result<Vmm, NoServer> {
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
        let mut target = None;
        let deadline = Instant::now() + TIMEOUT;
        while serves && target.is_none() {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(t) => target = Some(t),
                Err(_) if Instant::now() > deadline => {
                    panic!("elf_vmm printed no gdb command line:\n{}", out.lock().expect("log"))
                }
                Err(_) => {
                    if let Some(status) = child.try_wait().expect("try_wait") {
                        // Let the reader threads take the last lines.
                        std::thread::sleep(Duration::from_millis(100));
                        let log = out.lock().expect("log").clone();
                        if log.contains("without feature gdb") {
                            return Err(NoServer::NoGdbFeature(log));
                        }
                        panic!("elf_vmm ended ({status}) before it served GDB:\n{log}");
                    }
                }
            }
        }
        Ok(Vmm { child, out, target })
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

/// The ELF's symbol table (`.symtab`): each named symbol's value. Read with
/// std only: the KVM lanes have no binutils inside.
pub fn symbols(elf: &Path) -> std::collections::HashMap<String, u64> {
    let f = std::fs::read(elf).expect("read the guest ELF");
    let u16_at = |o: usize| u16::from_le_bytes(f[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().expect("8 bytes"));
    let at = |v: u64| usize::try_from(v).expect("an offset");
    // ELF64 little-endian (System V gABI, "ELF Header").
    assert!(
        f.len() > 64 && f[..4] == *b"\x7fELF" && f[4] == 2 && f[5] == 1,
        "not an ELF64 LE file"
    );
    let (shoff, shentsize, shnum) = (at(u64_at(0x28)), usize::from(u16_at(0x3a)), usize::from(u16_at(0x3c)));
    let section = |i: usize| shoff + i * shentsize;
    let mut out = std::collections::HashMap::new();
    for i in 0..shnum {
        let sh = section(i);
        if u32_at(sh + 4) != 2 {
            continue; // not SHT_SYMTAB
        }
        let (off, size, entsize) = (at(u64_at(sh + 0x18)), at(u64_at(sh + 0x20)), at(u64_at(sh + 0x38)));
        let strtab = at(u64_at(section(at(u64::from(u32_at(sh + 0x28)))) + 0x18));
        for sym in (off..off + size).step_by(entsize.max(24)) {
            let name_at = strtab + at(u64::from(u32_at(sym)));
            let end = f[name_at..].iter().position(|&b| b == 0).expect("a NUL") + name_at;
            if end > name_at {
                let name = String::from_utf8_lossy(&f[name_at..end]).into_owned();
                out.insert(name, u64_at(sym + 8));
            }
        }
    }
    out
}

/// `len` bytes of the loaded image at virtual address `addr`, read from the
/// file through its program headers (what the VMM loads), or `None` if no
/// `PT_LOAD` segment's file bytes hold them.
pub fn image_bytes(elf: &Path, addr: u64, len: usize) -> Option<Vec<u8>> {
    let f = std::fs::read(elf).expect("read the guest ELF");
    let u16_at = |o: usize| u16::from_le_bytes(f[o..o + 2].try_into().expect("2 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, phentsize, phnum) = (u64_at(0x20), u64::from(u16_at(0x36)), u64::from(u16_at(0x38)));
    (0..phnum).find_map(|i| {
        let ph = usize::try_from(phoff + i * phentsize).ok()?;
        let (offset, vaddr, filesz) = (u64_at(ph + 8), u64_at(ph + 0x10), u64_at(ph + 0x20));
        let len64 = u64::try_from(len).ok()?;
        (u32_at(ph) == 1 && addr >= vaddr && addr + len64 <= vaddr + filesz).then(|| {
            let start = usize::try_from(offset + (addr - vaddr)).expect("an offset");
            f[start..start + len].to_vec()
        })
    })
}
