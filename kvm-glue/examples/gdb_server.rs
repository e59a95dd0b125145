//! A GDB server for kvm-glue's tiny guest: two vCPUs, each on its own thread
//! running a VMM loop, held at their first instruction until GDB attaches.
//!
//! ```sh
//! cargo run -p kvm-glue --features gdb --example gdb_server -- --port 1234
//! # then, as printed:
//! gdb -q -ex 'target remote 127.0.0.1:1234'
//! # or on a Unix socket:
//! cargo run -p kvm-glue --features gdb --example gdb_server -- --socket /tmp/vm.sock
//! gdb -q -ex 'target remote /tmp/vm.sock'
//! ```
//!
//! vCPU 0 (GDB thread 1) runs the straight-line routine at `0x10000`, vCPU 1
//! (thread 2) the software-breakpoint routine at `0x10300` (`--vcpu1 data`:
//! the data-access routine at `0x10100`, for watchpoints; `--vcpu1 loop`: an
//! endless loop at `0x10400`, so the guest never ends; `--vcpu1 int3`: the
//! guest's own `int3`, which its own handler must get, never GDB). Each
//! routine ends
//! with `out 0x10`; when both have, the guest has ended: GDB prints
//! `[Inferior 1 (process 1) exited normally]` and the server checks that
//! every routine's bytes in guest memory are what they were at boot (no
//! breakpoint left behind), prints the result and exits. A debugger may
//! detach and another attach meanwhile; one at a time. `--port 0` picks a
//! free port. The server listens on 127.0.0.1 only, or on the Unix socket
//! `--socket PATH` (created with this user's umask; a stale socket file
//! left there by a dead server is replaced, anything else is refused; the
//! file is removed when the guest ends). GDB's `kill` detaches and the
//! guest runs on (kvm-glue's default); with `--kill-ends` it ends the guest
//! instead (exit code 137), the way a VMM chooses through `ServeEvent`.
//! How `break` and watchpoints are served follows kvm-glue's probe of this
//! host; `--host full` overrides it (int3 and debug-register watchpoints
//! as on a VMX/SVM host), as a VMM that knows its host may.
//! `--busy-poll-us N` sets how long the session's thread looks for GDB's
//! next packet (and a step's stop) before it sleeps (`Options::busy_poll`;
//! `0`: it sleeps at once).

use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use kvm_glue::gdb::{serve, serve_unix, GuestEnd, HostDebug, Options, ServeEvent, SessionEnd};
use kvm_glue::guest::{self, Exit, Guest};
use kvm_glue::kick::SignalKick;
use kvm_glue::{Handled, RunState, VcpuDebug, VmDebug, Woke};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Where GDB connects.
enum Listen {
    Port(u16),
    Socket(PathBuf),
}

struct Args {
    listen: Listen,
    vcpu1: (&'static str, u64),
    kill_ends: bool,
    /// `--host full`: serve as on a KVM that delivers everything.
    host_full: bool,
    /// `--busy-poll-us N`: `Options::busy_poll`.
    busy_poll: Option<Duration>,
}

const USAGE: &str = "usage: gdb_server (--port N | --socket PATH) [--vcpu1 sw|data|straight|loop|int3] [--kill-ends] [--host full|probe] [--busy-poll-us N]";

/// The exit code when GDB's `kill` ends the guest (`--kill-ends`): 128 + SIGKILL.
const KILLED: u8 = 137;

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = None;
    let mut vcpu1 = ("sw", guest::SW);
    let mut kill_ends = false;
    let mut host_full = false;
    let mut busy_poll = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => {
                let v = args.next().ok_or("--port needs a value")?;
                let port = v.parse::<u16>().map_err(|e| format!("--port {v}: {e}"))?;
                if listen.replace(Listen::Port(port)).is_some() {
                    return Err(USAGE.into());
                }
            }
            "--socket" => {
                let v = args.next().ok_or("--socket needs a path")?;
                if listen.replace(Listen::Socket(PathBuf::from(v))).is_some() {
                    return Err(USAGE.into());
                }
            }
            "--vcpu1" => {
                let v = args.next().ok_or("--vcpu1 needs a value")?;
                vcpu1 = match v.as_str() {
                    "sw" => ("sw", guest::SW),
                    "data" => ("data", guest::DATA_ACCESS),
                    "straight" => ("straight", guest::STRAIGHT),
                    "loop" => ("loop", guest::LOOP),
                    "int3" => ("int3", guest::INT3),
                    _ => return Err(format!("--vcpu1 {v}: expected sw, data, straight, loop or int3")),
                };
            }
            "--kill-ends" => kill_ends = true,
            "--host" => {
                host_full = match args.next().as_deref() {
                    Some("full") => true,
                    Some("probe") => false,
                    _ => return Err("--host needs full or probe".into()),
                };
            }
            "--busy-poll-us" => {
                let v = args.next().ok_or("--busy-poll-us needs a value")?;
                let us = v.parse::<u64>().map_err(|e| format!("--busy-poll-us {v}: {e}"))?;
                busy_poll = Some(Duration::from_micros(us));
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or(USAGE)?,
        vcpu1,
        kill_ends,
        host_full,
        busy_poll,
    })
}

/// Counts the vCPUs that ran their routine to its end.
struct Finish {
    left: AtomicUsize,
    end: GuestEnd,
}

impl Finish {
    fn done(&self) -> std::io::Result<()> {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.end.end(0)?;
        }
        Ok(())
    }
}

/// The VMM's loop for one vCPU, on that vCPU's thread.
fn vcpu_loop(
    id: usize,
    vcpu: &mut VcpuFd,
    mut vdbg: VcpuDebug<GuestMemoryMmap>,
    kick: &SignalKick,
    go: &Barrier,
    finish: &Finish,
) -> Result<(), Error> {
    kick.prepare_vcpu_thread(id, vcpu)?;
    go.wait();
    let mut finished = false;
    loop {
        // Parks here while the debugger holds the VM, then applies this
        // vCPU's debug configuration.
        vdbg.before_run(&*vcpu)?;
        let exit = guest::run_once(vcpu)?;
        match exit {
            // Kicked (EINTR): back to before_run, which parks if asked to.
            Exit::Interrupted => kick.drain()?,
            Exit::Debug { .. } => {
                let arch = exit.debug().ok_or("a debug exit without its data")?;
                if let Handled::Stop(event) = vdbg.handle_exit(&*vcpu, &arch)? {
                    vdbg.report_stop(event)?;
                }
            }
            Exit::Out(port, value) => {
                // Complete the `out` before anything else looks at this vCPU
                // (KVM finishes a port access at the next KVM_RUN):
                // immediate_exit makes that run return at once.
                vcpu.set_kvm_immediate_exit(1);
                let completed = vcpu.run().map(|_| ());
                vcpu.set_kvm_immediate_exit(0);
                match completed {
                    Err(e) if e.errno() == libc::EINTR => kick.drain()?,
                    other => other?,
                }
                match port {
                    guest::PORT_DONE if !finished => {
                        finished = true;
                        println!("vCPU {id}: routine finished");
                        finish.done()?;
                    }
                    guest::PORT_DONE => {}
                    // A trap handler returns to the routine: the guest's own
                    // #DB/#BP reached the guest, as it must.
                    guest::PORT_VECTOR if guest::is_trap_vector(value) => {
                        println!("vCPU {id}: the guest's own handler ran for vector {value}");
                    }
                    guest::PORT_VECTOR => {
                        println!("vCPU {id}: guest exception, vector {value}");
                        finish.end.end(1)?;
                    }
                    _ => return Err(format!("vCPU {id}: unexpected out to port {port:#x}").into()),
                }
            }
            // The tiny guest has no interrupt controller, so `hlt` exits to
            // us and the vCPU waits outside KVM_RUN, where no kick reaches
            // it: wait_idle ends at once for the debugger (stop, new
            // breakpoints, detach), and the guest stays halted until an
            // interrupt of ours (this VMM has none) wakes it.
            Exit::Hlt => {
                while let Woke::Stop | Woke::Intent = vdbg.wait_idle(None)? {
                    vdbg.before_run(&*vcpu)?;
                }
            }
            other => return Err(format!("vCPU {id}: unexpected exit {other:?}").into()),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Binds a Unix socket at `path`, replacing a stale socket file (one nobody
/// listens on) and refusing anything else that is there. Finding out
/// whether a server listens means connecting once: a live server sees a
/// connection that closes at once, and ends that session as it ends any
/// other (its guest stopped and resumed).
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display()).into()),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!("{} exists and is not a socket", path.display()).into());
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(format!("{}: another server is listening there", path.display()).into());
        }
        Ok(_) => std::fs::remove_file(path)?,
    }
    Ok(UnixListener::bind(path)?)
}

/// Whether every routine's bytes are the ones the guest booted with.
fn memory_byte_exact(mem: &GuestMemoryMmap) -> Result<Vec<u64>, Error> {
    let mut differ = Vec::new();
    for (addr, code) in guest::ROUTINES {
        let mut now = vec![0u8; code.len()];
        mem.read_slice(&mut now, GuestAddress(addr))?;
        if now != code {
            differ.push(addr);
        }
    }
    Ok(differ)
}

fn run(args: &Args) -> Result<u8, Error> {
    let mut g = Guest::new(2)?;
    g.start(1, args.vcpu1.1)?;
    let dbg = VmDebug::new(g.memory().clone());
    let kick = SignalKick::new(0)?;
    dbg.set_kick(kick.clone())?;
    let handles: Vec<VcpuDebug<GuestMemoryMmap>> =
        (0..g.vcpu_count()).map(|id| dbg.vcpu(id)).collect::<Result<_, _>>()?;

    // Hold every vCPU before its first instruction: stop_all (on a helper
    // thread: it waits for the vCPUs to park) marks them, then they start.
    let stopper = {
        let dbg = dbg.clone();
        std::thread::spawn(move || dbg.stop_all(Duration::from_secs(10)))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dbg
        .vcpu_ids()?
        .iter()
        .all(|&id| dbg.run_state(id).is_ok_and(|s| s != RunState::Running))
    {
        if Instant::now() > deadline {
            return Err("the vCPUs could not be held".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    let listener = match &args.listen {
        Listen::Port(port) => Listener::Tcp(TcpListener::bind(("127.0.0.1", *port))?),
        Listen::Socket(path) => Listener::Unix(bind_unix(path)?, path.clone()),
    };
    let target = match &listener {
        Listener::Tcp(l) => format!("127.0.0.1:{}", l.local_addr()?.port()),
        Listener::Unix(_, path) => path.display().to_string(),
    };
    let end = GuestEnd::new()?;
    let finish = Finish {
        left: AtomicUsize::new(g.vcpu_count()),
        end: end.clone(),
    };
    let go = Barrier::new(g.vcpu_count() + 1);
    let mem = g.memory().clone();
    let vcpu1 = args.vcpu1.0;

    std::thread::scope(|s| -> Result<u8, Error> {
        for ((id, vcpu), vdbg) in g.vcpus_mut().iter_mut().enumerate().zip(handles) {
            let (kick, go, finish) = (&kick, &go, &finish);
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn_scoped(s, move || {
                    if let Err(e) = vcpu_loop(id, vcpu, vdbg, kick, go, finish) {
                        eprintln!("vCPU {id}: {e}");
                        std::process::exit(2);
                    }
                })?;
        }
        go.wait();
        stopper.join().map_err(|_| "the stopping thread panicked")??;

        println!(
            "kvm-glue GDB server: 2 vCPUs held at their first instruction \
             (thread 1 = vCPU 0 at {:#x}, thread 2 = vCPU 1 at {:#x}, {vcpu1} routine)",
            guest::STRAIGHT,
            args.vcpu1.1
        );
        println!("attach with: gdb -q -ex 'target remote {target}'");
        let options = Options {
            end: Some(end.clone()),
            host: args
                .host_full
                .then(|| HostDebug::full("--host full on the command line")),
            busy_poll: args.busy_poll.unwrap_or(kvm_glue::gdb::DEFAULT_BUSY_POLL),
            ..Options::default()
        };
        let on_event = |event: &ServeEvent| {
            println!("{event}");
            // The VMM's choice: kill ends the guest, or (default) it runs on.
            if args.kill_ends && matches!(event, ServeEvent::Ended(SessionEnd::Killed)) {
                if let Err(e) = end.end(KILLED) {
                    eprintln!("gdb_server: ending the guest: {e}");
                }
            }
        };
        let served = match &listener {
            Listener::Tcp(l) => serve(l, &dbg, &options, on_event),
            Listener::Unix(l, _) => serve_unix(l, &dbg, &options, on_event),
        };
        if let Listener::Unix(_, path) = &listener {
            // The guest ended (or serving failed): nobody can attach any more.
            if let Err(e) = std::fs::remove_file(path) {
                eprintln!("gdb_server: removing {}: {e}", path.display());
            }
        }
        let code = served?;
        println!("the guest ended (exit code {code})");
        let differ = memory_byte_exact(&mem)?;
        if differ.is_empty() {
            println!("guest memory: every routine byte-exact as booted");
        } else {
            println!("guest memory: routines at {differ:#x?} differ from the boot image");
            return Ok(1);
        }
        // The vCPU threads idle in their loops for ever: end the process.
        std::process::exit(i32::from(code));
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("gdb_server: {e}");
            ExitCode::FAILURE
        }
    }
}
