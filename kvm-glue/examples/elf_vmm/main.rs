//! An example VMM a VMM author can copy: it owns its VM (guest memory,
//! long mode, an in-kernel irqchip and PIT), loads a 64-bit ELF with
//! `linux-loader`, runs two vCPU threads with kvm-glue's whole loop, and
//! serves GDB on loopback TCP or on a pty — through kvm-glue's public API
//! only, with no `unsafe` for debugging (the `unsafe` here registers guest
//! memory and opens the pty).
//!
//! ```sh
//! gcc -g -O0 -ffreestanding -nostdlib -static -mno-red-zone -fno-pic -no-pie \
//!     -fno-stack-protector -T kvm-glue/tests/guest-c/link.ld \
//!     kvm-glue/tests/guest-c/guest.c -o /tmp/guest.elf
//! cargo run -p kvm-glue --features gdb --example elf_vmm -- /tmp/guest.elf            # just run it
//! cargo run -p kvm-glue --features gdb --example elf_vmm -- /tmp/guest.elf --hold --gdb-port 1234
//! gdb -q /tmp/guest.elf -ex 'target remote 127.0.0.1:1234'
//! cargo run -p kvm-glue --features gdb --example elf_vmm -- /tmp/guest.elf --hold --gdb-pty
//! gdb -q /tmp/guest.elf -ex 'target remote /dev/pts/N'                               # as printed
//! ```
//!
//! Built without feature `gdb` (as `cargo test` without features builds
//! it, for the KVM lanes) it runs the guest and serves no debugger.
//!
//! Options: `--gdb-port N` (127.0.0.1; 0 picks a port) or `--gdb-pty` (one
//! transport per run: each serves one debugger at a time, two would fight
//! over the same vCPUs); `--hold` keeps every vCPU before its first
//! instruction until a debugger attaches (QEMU's `-S`); `--no-timer` tells
//! the guest not to start its PIT timer.
//!
//! The guest (`kvm-glue/tests/guest-c/guest.c`) writes its console to port
//! `0x3f8`, says each vCPU is done on port `0x501` and reports an
//! exception it did not expect on `0x502`. When every vCPU is done the
//! guest has ended: GDB prints `[Inferior 1 (process 1) exited normally]`.
//!
//! A triple fault, an internal error or an exit it cannot handle is shown
//! to the debugger, if one is served, as a stop (`VcpuDebug::report_fault`:
//! GDB sees SIGQUIT or SIGABRT, as with QEMU) before the guest ends with
//! code 1 ([`Flow::Fault`]); an exception the guest reports itself on
//! `0x502` just ends it. Every port exit is completed at once with `VcpuDebug::complete_io`
//! (in [`vcpu_loop`]); single-steps keep the timer's interrupts out where
//! the host has `KVM_GUESTDBG_BLOCKIRQ` (kvm-glue's default).

#[cfg(feature = "gdb")]
mod pty;
mod vm;

#[cfg(feature = "gdb")]
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
#[cfg(feature = "gdb")]
use std::time::Duration;

#[cfg(feature = "gdb")]
use kvm_glue::gdb::{serve, serve_stream, GuestEnd, Options};
use kvm_glue::run::{run_once, Exit};
use kvm_glue::{Fault, Handled, RunError, SignalKick, VcpuDebug, VmDebug};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The guest's ports.
const PORT_CONSOLE: u16 = 0x3f8;
const PORT_DONE: u16 = 0x501;
const PORT_FAULT: u16 = 0x502;
const VCPUS: usize = 2;

enum Gdb {
    None,
    #[cfg_attr(not(feature = "gdb"), allow(dead_code))] // refused by parse_args
    Port(u16),
    Pty,
}

struct Args {
    elf: PathBuf,
    gdb: Gdb,
    hold: bool,
    timer: bool,
}

const USAGE: &str = "usage: elf_vmm GUEST.elf [--gdb-port N | --gdb-pty] [--hold] [--no-timer]";

fn parse_args() -> Result<Args, String> {
    let mut elf = None;
    let mut gdb = Gdb::None;
    let (mut hold, mut timer) = (false, true);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--gdb-port" if matches!(gdb, Gdb::None) => {
                let v = args.next().ok_or("--gdb-port needs a value")?;
                gdb = Gdb::Port(v.parse().map_err(|e| format!("--gdb-port {v}: {e}"))?);
            }
            "--gdb-pty" if matches!(gdb, Gdb::None) => gdb = Gdb::Pty,
            "--hold" => hold = true,
            "--no-timer" => timer = false,
            s if !s.starts_with('-') && elf.is_none() => elf = Some(PathBuf::from(s)),
            _ => return Err(USAGE.into()),
        }
    }
    let elf = elf.ok_or(USAGE)?;
    if !cfg!(feature = "gdb") && !matches!(gdb, Gdb::None) {
        return Err("this elf_vmm was built without feature gdb: it serves no debugger".into());
    }
    if hold && matches!(gdb, Gdb::None) {
        return Err("--hold needs --gdb-port or --gdb-pty: nobody would release the vCPUs".into());
    }
    Ok(Args { elf, gdb, hold, timer })
}

/// What the vCPU threads share.
struct Shared {
    kick: std::sync::Arc<SignalKick>,
    /// The guest's end, as the GDB server hears of it.
    #[cfg(feature = "gdb")]
    end: GuestEnd,
    /// A debugger is served: faults are shown to it before the guest ends.
    debugger: bool,
    /// vCPUs that have not said they are done.
    running: AtomicUsize,
    /// The guest's end code, for a VMM without GDB.
    ended: mpsc::Sender<u8>,
}

impl Shared {
    fn end(&self, code: u8) -> Result<(), Error> {
        #[cfg(feature = "gdb")]
        self.end.end(code)?;
        let _ = self.ended.send(code);
        Ok(())
    }
}

/// What the loop does after an exit.
enum Flow {
    Run,
    /// The vCPU is done (or dead): it stays out of the guest for good.
    Done,
    /// The guest faulted: KVM could not run it on (a `Fault`, shown to a
    /// debugger as a stop first), or it reported an exception itself.
    Fault(String, Option<Fault>),
}

/// One vCPU thread: kvm-glue's loop (`before_run`, run, `handle_exit`,
/// `report_stop`; kicks by signal) around the VMM's own exit handling.
fn vcpu_loop(id: usize, vcpu: &mut VcpuFd, mut h: VcpuDebug<GuestMemoryMmap>, s: &Shared) -> Result<(), Error> {
    s.kick.prepare_vcpu_thread(id, vcpu)?;
    let mut line = Vec::new();
    loop {
        // Parks while the debugger holds this vCPU, steps past a breakpoint
        // it stopped at, applies the debug registers.
        h.before_run(&*vcpu)?;
        let exit = run_once(vcpu)?;
        let flow = match exit {
            Exit::Out(port, value) => {
                // KVM finishes an `out` at the next KVM_RUN: finish it now,
                // so a vCPU the debugger parks holds no half-done access
                // (and a step over it stops after it).
                h.complete_io(vcpu)?;
                device(id, port, value, &mut line, s)?
            }
            other => on_exit(vcpu, &mut h, s, other)?,
        };
        match flow {
            Flow::Run => {}
            Flow::Done => return park_for_good(vcpu, h, s),
            Flow::Fault(why, fault) => {
                let regs = vcpu.get_regs()?;
                println!("vCPU {id}: {why} at rip {:#x}, rsp {:#x}", regs.rip, regs.rsp);
                if let (Some(fault), true) = (fault, s.debugger) {
                    // A stop GDB sees as a signal, registers and memory
                    // readable; this vCPU cannot run on, so before_run parks
                    // until the debugger lets go, then says so.
                    h.report_fault(&*vcpu, fault)?;
                    match h.before_run(&*vcpu) {
                        Err(kvm_glue::Error::Run(RunError::Faulted { .. })) => {}
                        other => return Err(format!("vCPU {id} after its fault: {other:?}").into()),
                    }
                }
                s.end(1)?;
                return Ok(());
            }
        }
    }
}

/// The exits kvm-glue is for, and the faults.
fn on_exit(vcpu: &mut VcpuFd, h: &mut VcpuDebug<GuestMemoryMmap>, s: &Shared, exit: Exit) -> Result<Flow, Error> {
    Ok(match exit {
        // Kicked (EINTR): back to before_run, which parks if asked to.
        Exit::Interrupted => {
            s.kick.drain()?;
            Flow::Run
        }
        Exit::Debug { .. } => {
            let arch = exit.debug().ok_or("a debug exit without its data")?;
            if let Handled::Stop(stop) = h.handle_exit(&*vcpu, &arch)? {
                h.report_stop(stop)?; // all-stop; the GDB thread reports it
            }
            Flow::Run
        }
        Exit::Shutdown => Flow::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into(), Some(Fault::Shutdown)),
        Exit::InternalError => Flow::Fault("KVM_EXIT_INTERNAL_ERROR".into(), Some(Fault::InternalError)),
        // With the in-kernel irqchip `hlt` stays in the kernel; this is a
        // VMM without one.
        Exit::Hlt => Flow::Fault("hlt exit without an irqchip".into(), Some(Fault::UnhandledExit)),
        other => Flow::Fault(format!("unexpected exit {other:?}"), Some(Fault::UnhandledExit)),
    })
}

/// The guest's three ports.
fn device(id: usize, port: u16, value: u8, line: &mut Vec<u8>, s: &Shared) -> Result<Flow, Error> {
    match port {
        PORT_CONSOLE if value == b'\n' => {
            println!("guest: {}", String::from_utf8_lossy(line));
            line.clear();
        }
        PORT_CONSOLE => line.push(value),
        PORT_DONE => {
            println!("vCPU {id}: done");
            if s.running.fetch_sub(1, Ordering::AcqRel) == 1 {
                s.end(0)?;
            }
            return Ok(Flow::Done);
        }
        PORT_FAULT => return Ok(Flow::Fault(format!("guest exception, vector {value}"), None)),
        _ => {
            return Ok(Flow::Fault(
                format!("out to unknown port {port:#x}"),
                Some(Fault::UnhandledExit),
            ))
        }
    }
    Ok(Flow::Run)
}

/// A vCPU that is done stays in its loop, out of the guest's way but
/// reachable by the debugger (GDB may still read its registers): it halts
/// in the guest (`hlt` with interrupts off stays in KVM_RUN) and a kick
/// brings it back to `before_run`.
fn park_for_good(vcpu: &mut VcpuFd, mut h: VcpuDebug<GuestMemoryMmap>, s: &Shared) -> Result<(), Error> {
    loop {
        h.before_run(&*vcpu)?;
        match run_once(vcpu)? {
            Exit::Interrupted => s.kick.drain()?,
            exit @ Exit::Debug { .. } => {
                on_exit(vcpu, &mut h, s, exit)?;
            }
            Exit::Out(..) => {
                h.complete_io(vcpu)?;
            }
            other => return Err(format!("vCPU {} after its end: {other:?}", h.id()).into()),
        }
    }
}

/// Serves GDB until the guest ends; its exit code.
#[cfg(feature = "gdb")]
fn serve_gdb(args: &Args, how: &Gdb, dbg: &VmDebug<GuestMemoryMmap>, end: &GuestEnd) -> Result<u8, Error> {
    let options = Options {
        end: Some(end.clone()),
        ..Options::default()
    };
    let elf = args.elf.display();
    Ok(match how {
        Gdb::None => return Err("no GDB transport".into()),
        Gdb::Port(port) => {
            let listener = TcpListener::bind(("127.0.0.1", *port))?;
            let port = listener.local_addr()?.port();
            println!("attach with: gdb -q {elf} -ex 'target remote 127.0.0.1:{port}'");
            serve(&listener, dbg, &options, |event| println!("elf_vmm: {event}"))?
        }
        Gdb::Pty => {
            let pty = pty::open()?;
            println!("attach with: gdb -q {elf} -ex 'target remote {}'", pty.path.display());
            let name = pty.path.display().to_string();
            let code = serve_stream(&pty.master, &name, dbg, &options, |event| println!("elf_vmm: {event}"))?;
            pty.linger(Duration::from_secs(2));
            code
        }
    })
}

fn run(args: &Args) -> Result<u8, Error> {
    let mut vm = vm::build(&args.elf, VCPUS, args.timer)?;
    println!(
        "elf_vmm: {} loaded, entry {:#x}, image ends at {:#x}; {VCPUS} vCPUs in long mode; \
         in-kernel irqchip and PIT (guest timer {})",
        args.elf.display(),
        vm.entry,
        vm.end,
        if args.timer { "on" } else { "off" }
    );
    let dbg = VmDebug::new(vm.mem.clone());
    let kick = SignalKick::new(0)?; // SIGRTMIN + 0
    dbg.set_kick(kick.clone())?;
    let handles = (0..VCPUS).map(|id| dbg.vcpu(id)).collect::<Result<Vec<_>, _>>()?;
    if args.hold {
        // QEMU's -S: every vCPU parks at its first before_run, before its
        // first instruction; the debugger's session takes the hold over.
        dbg.hold_until_attached()?;
        println!("elf_vmm: every vCPU held before its first instruction until a debugger attaches");
    }
    let (ended, ended_rx) = mpsc::channel();
    let shared = Shared {
        kick,
        #[cfg(feature = "gdb")]
        end: GuestEnd::new()?,
        debugger: !matches!(args.gdb, Gdb::None),
        running: AtomicUsize::new(VCPUS),
        ended,
    };
    std::thread::scope(|scope| -> Result<u8, Error> {
        for ((id, vcpu), h) in vm.vcpus.iter_mut().enumerate().zip(handles) {
            let shared = &shared;
            std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn_scoped(scope, move || {
                    if let Err(e) = vcpu_loop(id, vcpu, h, shared) {
                        eprintln!("vCPU {id}: {e}");
                        std::process::exit(2);
                    }
                })?;
        }
        let code = match args.gdb {
            Gdb::None => ended_rx.recv()?,
            #[cfg(feature = "gdb")]
            ref gdb => serve_gdb(args, gdb, &dbg, &shared.end)?,
            #[cfg(not(feature = "gdb"))]
            _ => return Err("built without feature gdb".into()), // parse_args refuses it first
        };
        println!("elf_vmm: the guest ended (exit code {code})");
        // The vCPU threads stay halted in KVM_RUN: end the process.
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
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("elf_vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
