//! A GDB server for a kvm-ioctls VM (feature `gdb`): a [`gdbstub`] target
//! over [`VmDebug`], one GDB thread per vCPU, x86-64 registers
//! ([`X86_64Vm`]: gdbstub_arch's x86-64 SSE file plus the system registers
//! a kernel debugger reads), for GDB and LLDB.
//!
//! The VMM keeps its vCPU threads and its run loop (see
//! [`VcpuDebug::before_run`](crate::VcpuDebug::before_run)); it hands
//! [`serve`] a loopback TCP listener (or [`serve_unix`] a Unix socket) and
//! a clone of its [`VmDebug`], on a thread of its own:
//!
//! ```no_run
//! # fn f(dbg: kvm_glue::VmDebug<vm_memory::GuestMemoryMmap>) -> Result<(), Box<dyn std::error::Error>> {
//! use kvm_glue::gdb::{serve, Options};
//! let listener = std::net::TcpListener::bind("127.0.0.1:1234")?;
//! // gdb -ex 'target remote 127.0.0.1:1234'
//! serve(&listener, &dbg, &Options::default(), |event| eprintln!("{event}"))?;
//! # Ok(()) }
//! ```
//!
//! A Unix socket works the same way (`gdb -ex 'target remote /path/to/socket'`,
//! GDB 9 and later):
//!
//! ```no_run
//! # fn f(dbg: kvm_glue::VmDebug<vm_memory::GuestMemoryMmap>) -> Result<(), Box<dyn std::error::Error>> {
//! use kvm_glue::gdb::{serve_unix, Options};
//! let listener = std::os::unix::net::UnixListener::bind("/run/vm0/gdb.sock")?;
//! serve_unix(&listener, &dbg, &Options::default(), |event| eprintln!("{event}"))?;
//! # Ok(()) }
//! ```
//!
//! Any other byte stream the VMM has — the host side of a serial port, a
//! pty, vsock — goes to [`serve_stream`] (QEMU's `-gdb chardev`); sessions
//! start when GDB's first byte arrives.
//!
//! What GDB gets:
//! * **registers**: general, `rip`, `eflags`, segment selectors, x87
//!   (`st0`–`st7`, `fctrl`…`fop`), `xmm0`–`xmm15`, `mxcsr` (through
//!   `KVM_GET_XSAVE`), and `fs_base`, `gs_base`, `k_gs_base`, `cr0`, `cr2`,
//!   `cr3`, `cr4`, `cr8`, `efer`; read and written on the vCPU's own
//!   thread, all together or not at all, by `g`/`G` or one at a time by
//!   `p`/`P`. The target description lists every register with its regnum,
//!   offset, type, group and LLDB's `generic` role, so LLDB (which knows
//!   no register by feature name) gets them too. See [`regs`] for where
//!   each is read from, what is writable and what is refused.
//! * **threads**: GDB thread `n + 1` is vCPU `n`; `info threads` lists them
//!   all; memory is read and written through the selected thread's page
//!   tables (`KVM_TRANSLATE` on that vCPU's own thread).
//! * **what the host delivers** decides how breakpoints are served
//!   ([`HostDebug`], from kvm-glue's probe once per process or from
//!   [`Options::host`]): where `int3` exits do not work (`kvm_pvm`), `break`
//!   (Z0) takes a free hardware execute slot like `hbreak`; where data
//!   breakpoints do not fire, Z2–Z4 are "not supported" (GDB says it cannot
//!   insert them; `set can-use-hw-watchpoints 0` watches in software).
//!   `monitor served` says which. Otherwise:
//! * **breakpoints**: `break` (Z0, `int3`, hidden from memory reads: GDB
//!   sees the original bytes, and a write over one updates the byte the
//!   guest will run), `hbreak` (Z1), and `watch` (Z2), `rwatch` (Z3) and
//!   `awatch` (Z4) on any range the free debug registers can cover, through
//!   the core's planner ([`VmDebug::insert_watch`]: aligned pieces, pieces
//!   shared between watchpoints, all or nothing); a watchpoint that does not
//!   fit, like a fifth `hbreak`, is answered the way GDB expects (`E22`, and
//!   GDB says it cannot insert or falls back). x86 has no read-only
//!   condition: `rwatch` is a read/write slot plus a value check in
//!   [`VcpuDebug::handle_exit`](crate::VcpuDebug::handle_exit) (the watched
//!   bytes changed: a write, the vCPU runs on and GDB never hears of it; a
//!   write of the value already there is reported as a read).
//! * **all-stop**: when a vCPU stops, every other one is brought out of
//!   `KVM_RUN` before GDB hears of it; `vCont` actions apply per thread
//!   (`set scheduler-locking step` steps one vCPU while the others stay); a
//!   legacy `c` or `s` (LLDB's `continue`) resumes every vCPU.
//! * **stop reasons** from kvm-glue's decoded stops ([`stop`]), always with
//!   the thread: `swbreak`, `hwbreak`, `watch:ADDR`/`rwatch:ADDR`/
//!   `awatch:ADDR` with the address GDB set (not the piece that fired),
//!   `SIGTRAP` for a step, `SIGINT` for Ctrl-C. The guest's own `#DB`/`#BP`
//!   never reach GDB. A stop reply for a vCPU's own stop carries its `rbp`,
//!   `rsp` and `rip` (as gdbserver's do), read by that vCPU as it parked,
//!   so GDB stepping or stopping at a breakpoint sends no `g`; the same
//!   read gives the first memory reads their paging registers.
//! * **kill**: `vKill`/`k` is answered `OK` and the session ends cleanly
//!   (no "Remote connection closed", no wait); by default the debugger is
//!   detached and the guest runs on, and a VMM for which `kill` ends the
//!   guest says so on [`SessionEnd::Killed`].
//! * **one system call per packet**: every session's stream goes through a
//!   [`BufConn`] (one read for what arrived, one write per reply), not
//!   `gdbstub`'s byte at a time; `benches/gdb_path.rs` measures the path.
//! * **one debugger at a time**: every vCPU is stopped before a session
//!   starts; when it ends (detach, kill, a dropped connection, a fatal
//!   error), [`VmDebug::detach`] removes every breakpoint, restores guest
//!   memory byte for byte, turns single-step off and lets the guest run on;
//!   then the next connection is accepted. A session starts with the
//!   connection's first valid packet: one that never sends one (a port
//!   probe) stops nothing and releases nothing.
//! * **garbage on the socket** ([`wire`]): bytes outside packets are
//!   ignored, a packet longer than the advertised `PacketSize`
//!   ([`PACKET_SIZE`]) is refused, reads stop at the first byte that cannot
//!   be read (never data and an error in one reply), writes must be in the
//!   protocol's `addr,length:data` form and carry the length they declare,
//!   non-canonical addresses are refused for memory and
//!   breakpoints as a CPU refuses them (#GP), and a resume naming a thread
//!   that does not exist is an error.
//! * **the guest's end**: a VMM that gives [`Options::end`] a [`GuestEnd`]
//!   and calls [`GuestEnd::end`] when its guest is done makes GDB print
//!   `[Inferior 1 (process 1) exited normally]`, and [`serve`] return.

pub mod conn;
mod event_loop;
mod paging;
pub mod regs;
pub mod stop;
mod target;
pub mod wire;

pub use conn::BufConn;
pub use event_loop::VmEventLoop;
pub use regs::{from_gdb, to_gdb, RegisterWriteError, VcpuRegs, VmRegisters, X86_64Vm};
pub use target::{HostDebug, VmTarget};
pub use wire::{Wire, PACKET_SIZE};

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gdbstub::conn::ConnectionExt;
use gdbstub::stub::{DisconnectReason, GdbStub, GdbStubError};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::VmDebug;
use event_loop::{LoopError, Ready, Waiter};
use target::{ResumeLog, Watched};

/// Why [`serve`] stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    /// The listener is not on a loopback address: a GDB stub has no
    /// authentication, so kvm-glue serves only this machine.
    #[error("refusing to serve GDB on {addr}: not a loopback address")]
    NotLoopback {
        /// The listener's address.
        addr: SocketAddr,
    },
    /// The Unix listener has no path (an abstract or unnamed socket): only
    /// a socket file's permissions say who may connect, and an abstract
    /// socket has none.
    #[error("refusing to serve GDB on a Unix socket without a path ({addr})")]
    NoSocketPath {
        /// The listener's address, as `Debug` shows it.
        addr: String,
    },
    /// The byte stream given to [`serve_stream`] closed (end of file, or
    /// `EIO` from a pty whose slave nobody holds open).
    #[error("the GDB stream {name} closed: {source}")]
    StreamClosed {
        /// The stream's name, as given to [`serve_stream`].
        name: String,
        /// What reading it said.
        #[source]
        source: io::Error,
    },
    /// The listener, or waiting on it, failed.
    #[error("GDB listener: {op} failed: {source}")]
    Listener {
        /// What failed.
        op: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// The vCPUs could not be stopped for a new session, or the session's
    /// end could not be cleaned up: the VM is in doubt.
    #[error("the VM could not be {what}: {source}")]
    Vm {
        /// "stopped for a debugger" or "detached".
        what: &'static str,
        /// kvm-glue's error.
        #[source]
        source: crate::Error,
    },
}

/// The guest's end, as the VMM announces it. Clone it into the vCPU threads;
/// the first [`end`](GuestEnd::end) wins.
#[derive(Debug, Clone)]
pub struct GuestEnd {
    inner: Arc<EndInner>,
}

#[derive(Debug)]
struct EndInner {
    /// Written once and never read: it stays readable, a latch for epoll.
    fd: EventFd,
    code: Mutex<Option<u8>>,
}

impl GuestEnd {
    /// A guest that has not ended.
    ///
    /// # Errors
    /// `eventfd` failing.
    pub fn new() -> io::Result<GuestEnd> {
        Ok(GuestEnd {
            inner: Arc::new(EndInner {
                fd: EventFd::new(EFD_NONBLOCK)?,
                code: Mutex::new(None),
            }),
        })
    }

    /// The guest ended with exit code `code` (GDB: "exited with code N",
    /// 0 = "exited normally"). Later calls change nothing.
    ///
    /// # Errors
    /// Writing the eventfd failing.
    pub fn end(&self, code: u8) -> io::Result<()> {
        let mut slot = self.inner.code.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(code);
            self.inner.fd.write(1)?;
        }
        Ok(())
    }

    /// The exit code, once the guest has ended.
    pub fn code(&self) -> Option<u8> {
        *self.inner.code.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.fd.as_raw_fd()
    }
}

/// [`Options::busy_poll`]'s default.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(100);

/// How [`serve`] behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long stopping every vCPU may take (a session's start, a stop,
    /// Ctrl-C) before the session ends with an error naming the vCPU.
    pub stop_timeout: Duration,
    /// The guest's end, if the VMM announces it.
    pub end: Option<GuestEnd>,
    /// What this host's KVM delivers, which decides how `Z0` and `Z2`–`Z4`
    /// are served ([`HostDebug`]). `None`: kvm-glue's probe, run once per
    /// process ([`HostDebug::probed`]). A VMM that knows better (it probed
    /// already, or runs somewhere the probe cannot) says so here.
    pub host: Option<HostDebug>,
    /// How long the session's thread busy-polls before it sleeps — for
    /// GDB's next packet after each reply, for a step's stop after a resume
    /// that only steps — and how long a vCPU that parks at its own stop
    /// busy-polls for its release (`Duration::ZERO`: everyone sleeps at
    /// once).
    ///
    /// GDB sends its next packet within microseconds of a reply, a step's
    /// stop comes within microseconds of the `vCont;s`, and the vCPU that
    /// stopped is the one GDB steps next: a thread that looks for these
    /// without sleeping takes them without the wake-up of a sleeping
    /// thread, which on an idle host costs more than the whole answer (a
    /// round trip on loopback TCP: 80–115 µs when the server sleeps,
    /// 27–38 µs when it polls; see `docs/gdb.md`). The pollers yield their
    /// CPU between looks. The cost is CPU time: at most this much per
    /// packet answered and per stop, and none while a wait lasts longer —
    /// the guest running freely, GDB at its prompt.
    pub busy_poll: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            stop_timeout: Duration::from_secs(5),
            end: None,
            host: None,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

/// How a GDB session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// GDB detached (`detach`, `quit`).
    Detached,
    /// GDB sent `kill` (`vKill` or `k`), was answered `OK`, and the
    /// session ended. By default the VM is not killed: like any other end,
    /// the debugger is detached, the guest runs on and the next debugger
    /// is accepted. A VMM for which `kill` ends the guest does so on the
    /// `ServeEvent::Ended(SessionEnd::Killed)` it hears: it calls
    /// [`GuestEnd::end`] (the one in [`Options::end`]) from `on_event`, and
    /// `serve` returns that code at once instead of accepting again.
    Killed,
    /// GDB was told the guest ended with this code.
    GuestEnded(u8),
    /// The connection failed or closed without a detach.
    ConnectionLost(io::Error),
    /// A vCPU could not be stopped or reached, or the state was poisoned.
    Fatal(crate::Error),
    /// `gdbstub` gave up (a protocol error).
    Protocol(String),
}

/// Where a debugger connected from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer (on this machine).
    Tcp(SocketAddr),
    /// A Unix-socket peer, by the listener's path (peers have none).
    Unix(PathBuf),
    /// A byte stream given to [`serve_stream`] or [`serve_connection`], by
    /// the name given with it.
    Stream(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix(path) => write!(f, "unix socket {}", path.display()),
            Peer::Stream(name) => f.write_str(name),
        }
    }
}

/// What happened, for the VMM's log.
#[derive(Debug)]
pub enum ServeEvent {
    /// A debugger connected; every vCPU is stopped.
    Connected(Peer),
    /// A connection closed before it sent a valid packet: nothing was
    /// stopped, nothing released.
    NotGdb(Peer),
    /// The session ended and the debugger is detached.
    Ended(SessionEnd),
}

impl fmt::Display for ServeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeEvent::Connected(peer) => write!(f, "GDB connected from {peer}; every vCPU is stopped"),
            ServeEvent::NotGdb(peer) => write!(
                f,
                "a connection from {peer} closed before sending a GDB packet; nothing stopped or released"
            ),
            ServeEvent::Ended(end) => {
                f.write_str("GDB session ended (")?;
                match end {
                    SessionEnd::Detached => f.write_str("detached")?,
                    SessionEnd::Killed => f.write_str("killed")?,
                    SessionEnd::GuestEnded(code) => write!(f, "the guest ended with code {code}")?,
                    SessionEnd::ConnectionLost(e) => write!(f, "connection lost: {e}")?,
                    SessionEnd::Fatal(e) => write!(f, "error: {e}")?,
                    SessionEnd::Protocol(e) => write!(f, "protocol error: {e}")?,
                }
                f.write_str("); breakpoints removed, guest running")
            }
        }
    }
}

/// A listener [`serve_on`] accepts debuggers from, one at a time.
trait Accept: AsRawFd {
    type Stream<'a>: Read + Write + AsFd
    where
        Self: 'a;
    /// The next debugger's connection, or `None` when what woke the wait
    /// starts no session.
    fn accept_one(&mut self) -> io::Result<Option<(BufConn<Self::Stream<'_>>, Peer)>>;
    /// The name of a stream whose end of file ends serving (see
    /// [`closed`]); `None` for a listener, where the next debugger connects
    /// anew.
    fn stream_name(&self) -> Option<String> {
        None
    }
}

/// A loopback TCP listener.
struct Tcp<'a>(&'a TcpListener);

impl AsRawFd for Tcp<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Accept for Tcp<'_> {
    type Stream<'a>
        = TcpStream
    where
        Self: 'a;
    fn accept_one(&mut self) -> io::Result<Option<(BufConn<TcpStream>, Peer)>> {
        self.0
            .accept()
            .map(|(s, addr)| Some((BufConn::new(s), Peer::Tcp(addr))))
    }
}

/// A Unix listener with its path (peers have no address of their own).
struct UnixAt<'a>(&'a UnixListener, PathBuf);

impl AsRawFd for UnixAt<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Accept for UnixAt<'_> {
    type Stream<'a>
        = UnixStream
    where
        Self: 'a;
    fn accept_one(&mut self) -> io::Result<Option<(BufConn<UnixStream>, Peer)>> {
        self.0
            .accept()
            .map(|(s, _)| Some((BufConn::new(s), Peer::Unix(self.1.clone()))))
    }
}

/// A byte stream that is its own, only, connection: a session starts when
/// a byte arrives (see [`serve_stream`]).
struct OneStream<S> {
    stream: S,
    name: String,
}

impl<S: AsFd> AsRawFd for OneStream<S> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_fd().as_raw_fd()
    }
}

impl<S: Read + Write + AsFd> Accept for OneStream<S> {
    type Stream<'a>
        = &'a mut S
    where
        Self: 'a;
    fn accept_one(&mut self) -> io::Result<Option<(BufConn<&mut S>, Peer)>> {
        let mut conn = BufConn::new(&mut self.stream);
        // Readable: a packet (`$`) or Ctrl-C starts a session. Acks (`+`,
        // `-`) the last debugger sent after its session ended, or line
        // noise, before it are dropped, so they do not stop the guest for
        // nobody.
        let start = conn.fill_buf()?.iter().position(|&b| b == b'$' || b == 0x03);
        match start {
            Some(at) => {
                conn.consume(at);
                Ok(Some((conn, Peer::Stream(self.name.clone()))))
            }
            None => Ok(None),
        }
    }
    fn stream_name(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

/// Whether losing a connection with `lost` ends serving: on a stream
/// (`stream` is its name), end of file or `EIO` (a pty master whose slave
/// nobody holds open) leaves no next connection to wait for.
fn closed(stream: Option<&str>, lost: &io::Error) -> Option<GdbError> {
    let name = stream?;
    let eof = lost.kind() == io::ErrorKind::UnexpectedEof || lost.raw_os_error() == Some(libc::EIO);
    eof.then(|| GdbError::StreamClosed {
        name: name.to_string(),
        source: io::Error::new(lost.kind(), lost.to_string()),
    })
}

/// Serves GDB on `listener`, one debugger at a time, until the guest ends
/// (see [`Options::end`]); returns its exit code. `on_event` hears of every
/// connection and session end.
///
/// Every vCPU is stopped before a session starts and [`VmDebug::detach`]ed
/// after it, whatever ended it. A stop a vCPU posts while no debugger is
/// attached (one racing a detach) is dropped the same way and the guest
/// runs on. vCPUs the VMM holds before the first debugger connects (as the
/// `gdb_server` example does) stay held until then.
///
/// # Errors
/// [`GdbError::NotLoopback`] for a listener on any other address;
/// [`GdbError::Listener`] if accepting fails; [`GdbError::Vm`] if the vCPUs
/// cannot be stopped for a new session or detached after one.
pub fn serve<M: GuestMemory + Send + Sync + 'static>(
    listener: &TcpListener,
    dbg: &VmDebug<M>,
    options: &Options,
    on_event: impl FnMut(&ServeEvent),
) -> Result<u8, GdbError> {
    let addr = listener.local_addr().map_err(listener_err("getsockname"))?;
    if !addr.ip().is_loopback() {
        return Err(GdbError::NotLoopback { addr });
    }
    serve_on(&mut Tcp(listener), dbg, options, on_event)
}

/// As [`serve`], on a Unix socket: the same sessions, one debugger at a
/// time. Who may connect is the socket file's permissions (the VMM creates
/// it; GDB attaches with `target remote PATH`).
///
/// # Errors
/// [`GdbError::NoSocketPath`] for an abstract or unnamed socket; otherwise
/// as [`serve`].
pub fn serve_unix<M: GuestMemory + Send + Sync + 'static>(
    listener: &UnixListener,
    dbg: &VmDebug<M>,
    options: &Options,
    on_event: impl FnMut(&ServeEvent),
) -> Result<u8, GdbError> {
    let addr = listener.local_addr().map_err(listener_err("getsockname"))?;
    let Some(path) = addr.as_pathname() else {
        return Err(GdbError::NoSocketPath {
            addr: format!("{addr:?}"),
        });
    };
    serve_on(&mut UnixAt(listener, path.to_path_buf()), dbg, options, on_event)
}

/// As [`serve`], on a byte stream the VMM already has: a serial port's
/// host side, a pty master, a vsock or a pipe pair — anything `Read +
/// Write` with a descriptor (`AsFd`: `&File` will do) that polls
/// readable when a byte is there.
/// `name` says which in [`ServeEvent::Connected`] ([`Peer::Stream`]).
///
/// There is nothing to accept: a session starts when the first byte
/// arrives (every vCPU is stopped then), and when it ends (detach, kill, a
/// fatal error) the next byte starts the next. On a pty the VMM keeps a
/// descriptor of the slave open itself, so a debugger that closes it (or
/// dies) leaves the master readable by the next one rather than hung up;
/// the `elf_vmm` example does (`gdb -ex 'target remote /dev/pts/N'`).
///
/// ```no_run
/// # fn f(dbg: kvm_glue::VmDebug<vm_memory::GuestMemoryMmap>, serial: std::fs::File)
/// # -> Result<(), Box<dyn std::error::Error>> {
/// use kvm_glue::gdb::{serve_stream, Options};
/// // `serial`: the host side of the VM's serial line, a pty master, ...
/// serve_stream(&serial, "serial0", &dbg, &Options::default(), |event| eprintln!("{event}"))?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`GdbError::StreamClosed`] when the stream reads end of file or `EIO`
/// (it has no next debugger to wait for); otherwise as [`serve`].
pub fn serve_stream<M, S>(
    stream: S,
    name: &str,
    dbg: &VmDebug<M>,
    options: &Options,
    on_event: impl FnMut(&ServeEvent),
) -> Result<u8, GdbError>
where
    M: GuestMemory + Send + Sync + 'static,
    S: Read + Write + AsFd,
{
    let mut one = OneStream {
        stream,
        name: name.to_string(),
    };
    serve_on(&mut one, dbg, options, on_event)
}

fn listener_err(op: &'static str) -> impl Fn(io::Error) -> GdbError {
    move |source| GdbError::Listener { op, source }
}

fn serve_on<M: GuestMemory + Send + Sync + 'static, L: Accept>(
    listener: &mut L,
    dbg: &VmDebug<M>,
    options: &Options,
    mut on_event: impl FnMut(&ServeEvent),
) -> Result<u8, GdbError> {
    let end_fd = options.end.as_ref().map(GuestEnd::raw_fd);
    // What the host delivers: the VMM's word, or the probe once per process.
    let host = options.host.clone().unwrap_or_else(HostDebug::probed);
    // Wait for a debugger or the guest's end, whichever comes first.
    let accept_waiter = Waiter::new(listener.as_raw_fd(), dbg.stop_fd(), end_fd).map_err(listener_err("epoll"))?;
    loop {
        if let Some(code) = options.end.as_ref().and_then(GuestEnd::code) {
            return Ok(code);
        }
        let Ready { conn, .. } = accept_waiter.wait().map_err(listener_err("epoll_wait"))?;
        if !conn {
            // A stop with no debugger attached (posted before a detach
            // dropped it) or the end: detach drops the former.
            if options.end.as_ref().and_then(GuestEnd::code).is_none() {
                dbg.detach().map_err(|source| GdbError::Vm {
                    what: "detached",
                    source,
                })?;
            }
            continue;
        }
        let stream_name = listener.stream_name();
        let accepted = match listener.accept_one() {
            Ok(a) => a,
            Err(e) => return Err(closed(stream_name.as_deref(), &e).unwrap_or_else(|| listener_err("accept")(e))),
        };
        let Some((stream, peer)) = accepted else {
            continue;
        };
        if let Some(code) = serve_one(stream, peer, dbg, options, &host, stream_name.as_deref(), &mut on_event)? {
            return Ok(code);
        }
    }
}

/// Serves one debugger on a connection that is already made (a socket
/// the VMM accepted itself, one end of `UnixStream::pair`): the session
/// [`serve`] runs for each connection. Returns the guest's exit code if the
/// session ended because the guest did (or the guest ended first).
///
/// The session starts with the stream's first valid packet (`$…#xx`, right
/// checksum): then every vCPU is stopped, and after the session they are
/// [`VmDebug::detach`]ed. Until then bytes are ignored, and a stream that
/// closes first changes nothing: the vCPUs the VMM holds for GDB stay
/// held, its breakpoints stay ([`ServeEvent::NotGdb`]). A stop a vCPU
/// posts meanwhile is dropped as [`serve`] drops it with no debugger.
///
/// # Errors
/// [`GdbError::Vm`] if the vCPUs cannot be stopped for the session or
/// detached after it; [`GdbError::Listener`] if waiting on the stream
/// cannot be set up.
pub fn serve_connection<M, S>(
    stream: S,
    peer: Peer,
    dbg: &VmDebug<M>,
    options: &Options,
    mut on_event: impl FnMut(&ServeEvent),
) -> Result<Option<u8>, GdbError>
where
    M: GuestMemory + Send + Sync + 'static,
    S: Read + Write + AsFd,
{
    let host = options.host.clone().unwrap_or_else(HostDebug::probed);
    serve_one(BufConn::new(stream), peer, dbg, options, &host, None, &mut on_event)
}

/// [`serve_connection`]'s body, for [`serve_on`] too: `host` is what the
/// server serves `Z0`-`Z4` by, `stream_name` names a stream whose end of
/// file ends serving ([`closed`]), `None` for a connection of a listener.
fn serve_one<M, C>(
    stream: C,
    peer: Peer,
    dbg: &VmDebug<M>,
    options: &Options,
    host: &HostDebug,
    stream_name: Option<&str>,
    on_event: &mut dyn FnMut(&ServeEvent),
) -> Result<Option<u8>, GdbError>
where
    M: GuestMemory + Send + Sync + 'static,
    C: ConnectionExt<Error = io::Error> + AsRawFd,
{
    let end_fd = options.end.as_ref().map(GuestEnd::raw_fd);
    let waiter = Waiter::new(stream.as_raw_fd(), dbg.stop_fd(), end_fd).map_err(listener_err("epoll"))?;
    let tids = dbg
        .vcpu_ids()
        .map_err(|source| GdbError::Vm {
            what: "stopped for a debugger",
            source,
        })?
        .into_iter()
        .filter_map(|id| id.checked_add(1))
        .collect();
    let declared = wire::Shared::default();
    let resume_log: Arc<ResumeLog> = Arc::default();
    let mut wire = Wire::new(Watched::new(stream, Arc::clone(&resume_log)), tids, declared.clone());
    // Before the first valid packet: no session yet.
    while !wire.started() {
        let ended = options.end.as_ref().and_then(GuestEnd::code);
        if ended.is_some() {
            return Ok(ended);
        }
        // Bytes the connection already holds (a `BufConn` reads all that
        // is there): epoll would not wake for them.
        match wire.peek() {
            Ok(Some(_)) => {
                if wire.pump().is_err() {
                    break;
                }
                continue;
            }
            Ok(None) => {}
            Err(_) => break,
        }
        let ready = match waiter.wait() {
            Ok(r) => r,
            Err(_) => break,
        };
        if ready.conn {
            if wire.pump().is_err() {
                break;
            }
        } else if ready.stop {
            // A stop with no debugger attached: dropped, as serve does. (A
            // new epoll set reports a stop descriptor left readable by a
            // stop taken long ago: that one is no stop.)
            let taken = dbg.try_take_stop().map_err(|source| GdbError::Vm {
                what: "detached",
                source,
            })?;
            if taken.is_some() {
                dbg.detach().map_err(|source| GdbError::Vm {
                    what: "detached",
                    source,
                })?;
            }
        }
    }
    if !wire.started() {
        on_event(&ServeEvent::NotGdb(peer));
        return Ok(None);
    }
    dbg.stop_all(options.stop_timeout).map_err(|source| GdbError::Vm {
        what: "stopped for a debugger",
        source,
    })?;
    on_event(&ServeEvent::Connected(peer));
    let ended = session(wire, waiter, declared, dbg, options, host, resume_log);
    dbg.detach().map_err(|source| GdbError::Vm {
        what: "detached",
        source,
    })?;
    let code = match ended {
        SessionEnd::GuestEnded(code) => Some(code),
        _ => None,
    };
    let closed = match &ended {
        SessionEnd::ConnectionLost(e) => closed(stream_name, e),
        _ => None,
    };
    on_event(&ServeEvent::Ended(ended));
    match (code, closed) {
        (Some(code), _) => Ok(Some(code)),
        (None, Some(closed)) => Err(closed),
        (None, None) => Ok(None),
    }
}

/// One GDB session on `wire`, every vCPU stopped at its start.
fn session<M, C>(
    wire: Wire<Watched<C>>,
    waiter: Waiter,
    declared: wire::Shared,
    dbg: &VmDebug<M>,
    options: &Options,
    host: &HostDebug,
    resume_log: Arc<ResumeLog>,
) -> SessionEnd
where
    M: GuestMemory + Send + Sync + 'static,
    C: ConnectionExt<Error = io::Error> + AsRawFd,
{
    let mut target = match VmTarget::new(
        dbg.clone(),
        options.stop_timeout,
        options.end.clone(),
        host.clone(),
        Arc::clone(&resume_log),
    ) {
        Ok(t) => t,
        Err(e) => return SessionEnd::Fatal(e),
    };
    target.waiter = Some(waiter);
    target.busy_poll = options.busy_poll;
    target.declared = declared;
    // A fixed buffer: gdbstub grows an owned one with any longer packet,
    // and its `m` loop steps by the grown size (see `wire`).
    let mut buffer = vec![0u8; PACKET_SIZE];
    let stub = match GdbStub::builder(wire).with_packet_buffer(&mut buffer).build() {
        Ok(stub) => stub,
        Err(e) => return SessionEnd::Protocol(e.to_string()),
    };
    // Each vCPU that parks with its stop posted reads what the stop reply
    // and the first memory reads need, on its own thread (no wake-up).
    if let Err(e) = dbg.set_read_at_stop(true) {
        return SessionEnd::Fatal(e);
    }
    // And busy-polls for its release for the session's window.
    if let Err(e) = dbg.set_park_poll(options.busy_poll) {
        return SessionEnd::Fatal(e);
    }
    let end = match event_loop::run(stub, &mut target) {
        Ok(DisconnectReason::Disconnect) => SessionEnd::Detached,
        Ok(DisconnectReason::Kill) => SessionEnd::Killed,
        Ok(DisconnectReason::TargetExited(code)) => SessionEnd::GuestEnded(code),
        Ok(DisconnectReason::TargetTerminated(sig)) => SessionEnd::Protocol(format!("terminated by {sig}")),
        Err(LoopError::Stub(e)) => classify(e),
        Err(LoopError::Connection(e)) => SessionEnd::ConnectionLost(e),
        Err(LoopError::Target(e)) => SessionEnd::Fatal(e),
    };
    let _ = dbg.set_read_at_stop(false);
    let _ = dbg.set_park_poll(Duration::ZERO);
    end
}

fn classify(e: GdbStubError<crate::Error, io::Error>) -> SessionEnd {
    if e.is_target_error() {
        match e.into_target_error() {
            Some(t) => SessionEnd::Fatal(t),
            None => SessionEnd::Protocol("target error".into()),
        }
    } else if e.is_connection_error() {
        match e.into_connection_error() {
            Some((c, _)) => SessionEnd::ConnectionLost(c),
            None => SessionEnd::Protocol("connection error".into()),
        }
    } else {
        SessionEnd::Protocol(e.to_string())
    }
}
