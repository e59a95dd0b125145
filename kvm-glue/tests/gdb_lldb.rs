//! LLDB against the `gdb_server` example on real `/dev/kvm` (issue #17):
//! LLDB knows no x86-64 register by feature name, so everything here rests
//! on the target description listing every register, and its `continue`
//! is a plain `c`, which must resume every vCPU.
//!
//! Connect, `thread list`, `register read` (general, then `mxcsr`, `cr0`,
//! `fs_base` by name), `bt`, a hardware breakpoint hit and reported as a
//! breakpoint, `thread step-inst`, and `continue` until the guest ends,
//! which needs both vCPUs to run their routines to the end.
//!
//! Without `/dev/kvm`, or without `lldb` (Debian's `lldb` package:
//! `apt-get install -y lldb`), the test prints one `SKIPPED` line.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_glue::guest;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `lldb` (or Debian's versioned `lldb-NN`) from PATH.
fn find_lldb() -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).find_map(|dir| {
        let plain = dir.join("lldb");
        if plain.is_file() {
            return Some(plain);
        }
        (14..=30)
            .rev()
            .map(|v| dir.join(format!("lldb-{v}")))
            .find(|p| p.is_file())
    })
}

/// The example binary cargo built beside this test.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join("gdb_server");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p kvm-glue --features gdb --example gdb_server` \
         (`cargo test -p kvm-glue --features gdb` builds it too)",
        bin.display()
    );
    bin
}

/// The running example; killed on drop.
struct Server {
    child: Child,
    out: Arc<Mutex<String>>,
    port: u16,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(server_binary())
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gdb_server");
        let out = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let (out, tx) = (Arc::clone(&out), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(port) = line
                        .strip_prefix("attach with: gdb -q -ex 'target remote 127.0.0.1:")
                        .and_then(|p| p.strip_suffix('\''))
                    {
                        let _ = tx.send(port.to_string());
                    }
                    out.lock().expect("log").push_str(&(line + "\n"));
                }
            });
        }
        let port = rx
            .recv_timeout(TIMEOUT)
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("gdb_server printed no port:\n{}", out.lock().expect("log")));
        Server { child, out, port }
    }

    fn output(&self) -> String {
        self.out.lock().expect("log").clone()
    }

    /// Waits for the server to exit by itself: its status and its output.
    fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(100));
                return (status.code(), self.output());
            }
            assert!(Instant::now() < deadline, "gdb_server did not exit:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `lldb -b` with one `-o` per command; what it printed.
fn lldb(lldb: &PathBuf, commands: &[String], server: &Server) -> String {
    let mut cmd = Command::new(lldb);
    cmd.args(["-b", "--no-lldbinit"]);
    for c in commands {
        cmd.arg("-o").arg(c);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lldb");
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("lldb did not finish; server said:\n{}", server.output());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("lldb output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("---- lldb transcript ----\n{text}---- end lldb ----");
    text
}

#[track_caller]
fn expect(text: &str, what: &str) {
    assert!(text.contains(what), "expected {what:?} in:\n{text}");
}

#[test]
fn lldb_reads_registers_steps_and_continues_both_vcpus() {
    let test = "lldb_reads_registers_steps_and_continues_both_vcpus";
    let Some(mut fresh) = common::guest(test, 1) else {
        return;
    };
    let Some(lldb_path) = find_lldb() else {
        println!("{test}: SKIPPED: lldb is not installed (Debian: apt-get install -y lldb)");
        return;
    };
    // What a fresh vCPU of the tiny guest holds, read from KVM directly.
    fresh.start(0, guest::STRAIGHT).expect("start a vCPU");
    let mxcsr = fresh.vcpu(0).get_xsave().expect("KVM_GET_XSAVE").region[6];
    let cr0 = fresh.vcpu(0).get_sregs().expect("KVM_GET_SREGS").cr0;
    let i = guest::STRAIGHT_INSNS;
    let server = Server::start();
    let commands = [
        format!("gdb-remote 127.0.0.1:{}", server.port),
        "thread list".to_string(),
        "register read".to_string(),
        "register read mxcsr cr0 fs_base".to_string(),
        "bt".to_string(),
        format!("breakpoint set -H -a {:#x}", i[2]),
        "continue".to_string(),
        "thread step-inst".to_string(),
        "register read rip".to_string(),
        "breakpoint delete -f".to_string(),
        "continue".to_string(),
    ];
    let out = lldb(&lldb_path, &commands, &server);
    let q = |v: u64| format!("{v:#018x}");
    expect(
        &out,
        &format!(
            "thread #1: tid = 0x0001, {}, stop reason = signal SIGTRAP",
            q(guest::STRAIGHT)
        ),
    );
    expect(&out, &format!("thread #2: tid = 0x0002, {}", q(guest::SW)));
    expect(&out, &format!("rip = {}", q(guest::STRAIGHT)));
    expect(&out, &format!("rsp = {}", q(guest::STACK_TOP)));
    expect(&out, &format!("mxcsr = {mxcsr:#010x}"));
    expect(&out, &format!("cr0 = {}", q(cr0)));
    expect(&out, &format!("* frame #0: {}", q(guest::STRAIGHT)));
    expect(&out, "stop reason = breakpoint 1.1");
    expect(&out, &format!("frame #0: {}", q(i[2])));
    expect(&out, "stop reason = instruction step into");
    expect(&out, &format!("rip = {}", q(i[3])));
    expect(&out, "Process 1 exited with status = 0");
    let (code, log) = server.wait();
    println!("---- server ----\n{log}---- end server ----");
    expect(&log, "vCPU 0: routine finished");
    expect(&log, "vCPU 1: routine finished");
    expect(&log, "guest memory: every routine byte-exact as booted");
    assert_eq!(code, Some(0), "{log}");
}
