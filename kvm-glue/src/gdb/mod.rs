//! A GDB server for a kvm-ioctls VM (feature `gdb`): a [`gdbstub`] target
//! over [`VmDebug`], one GDB thread per vCPU, x86-64 registers
//! ([`gdbstub_arch::x86::X86_64_SSE`]).
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
//!   (`st0`–`st7`, `fctrl`…`fop`), `xmm0`–`xmm15` and `mxcsr`, read and
//!   written on the vCPU's own thread, all together or not at all; see
//!   [`regs`] for what a selector write does and what is refused.
//! * **threads**: GDB thread `n + 1` is vCPU `n`; `info threads` lists them
//!   all; memory is read and written through the selected thread's page
//!   tables (`KVM_TRANSLATE` on that vCPU's own thread).
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
//!   (`set scheduler-locking step` steps one vCPU while the others stay).
//! * **stop reasons** from kvm-glue's decoded stops ([`stop`]), always with
//!   the thread: `swbreak`, `hwbreak`, `watch:ADDR`/`rwatch:ADDR`/
//!   `awatch:ADDR` with the address GDB set (not the piece that fired),
//!   `SIGTRAP` for a step, `SIGINT` for Ctrl-C. The guest's own `#DB`/`#BP`
//!   never reach GDB.
//! * **one system call per packet**: every session's stream goes through a
//!   [`BufConn`] (one read for what arrived, one write per reply), not
//!   `gdbstub`'s byte at a time; `benches/gdb_path.rs` measures the path.
//! * **one debugger at a time**: every vCPU is stopped before a session
//!   starts; when it ends (detach, kill, a dropped connection, a fatal
//!   error), [`VmDebug::detach`] removes every breakpoint, restores guest
//!   memory byte for byte, turns single-step off and lets the guest run on;
//!   then the next connection is accepted.
//! * **the guest's end**: a VMM that gives [`Options::end`] a [`GuestEnd`]
//!   and calls [`GuestEnd::end`] when its guest is done makes GDB print
//!   `[Inferior 1 (process 1) exited normally]`, and [`serve`] return.

pub mod conn;
mod event_loop;
pub mod regs;
pub mod stop;
mod target;

pub use conn::BufConn;
pub use event_loop::VmEventLoop;
pub use regs::{from_gdb, to_gdb, RegisterWriteError, VcpuRegs};
pub use target::VmTarget;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gdbstub::stub::{DisconnectReason, GdbStub, GdbStubError};
use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::VmDebug;
use event_loop::{Ready, Waiter};

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

/// How [`serve`] behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long stopping every vCPU may take (a session's start, a stop,
    /// Ctrl-C) before the session ends with an error naming the vCPU.
    pub stop_timeout: Duration,
    /// The guest's end, if the VMM announces it.
    pub end: Option<GuestEnd>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            stop_timeout: Duration::from_secs(5),
            end: None,
        }
    }
}

/// How a GDB session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// GDB detached (`detach`, `quit`).
    Detached,
    /// GDB sent `kill`: the VM is not killed, the debugger is detached.
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
    /// A byte stream given to [`serve_stream`], by the name given with it.
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
    /// The session ended and the debugger is detached.
    Ended(SessionEnd),
}

impl fmt::Display for ServeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServeEvent::Connected(peer) => write!(f, "GDB connected from {peer}; every vCPU is stopped"),
            ServeEvent::Ended(end) => {
                f.write_str("GDB session ended (")?;
                match end {
                    SessionEnd::Detached => f.write_str("detached")?,
                    SessionEnd::Killed => f.write_str("kill: detached, the VM runs on")?,
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
        dbg.stop_all(options.stop_timeout).map_err(|source| GdbError::Vm {
            what: "stopped for a debugger",
            source,
        })?;
        on_event(&ServeEvent::Connected(peer));
        let ended = session(stream, dbg, options);
        dbg.detach().map_err(|source| GdbError::Vm {
            what: "detached",
            source,
        })?;
        let code = match ended {
            SessionEnd::GuestEnded(code) => Some(code),
            _ => None,
        };
        let closed = match &ended {
            SessionEnd::ConnectionLost(e) => closed(stream_name.as_deref(), e),
            _ => None,
        };
        on_event(&ServeEvent::Ended(ended));
        if let Some(code) = code {
            return Ok(code);
        }
        if let Some(closed) = closed {
            return Err(closed);
        }
    }
}

/// One GDB session on `stream`, every vCPU stopped at its start: through
/// a [`BufConn`], one system call per packet each way, not per byte.
fn session<M, S>(stream: BufConn<S>, dbg: &VmDebug<M>, options: &Options) -> SessionEnd
where
    M: GuestMemory + Send + Sync + 'static,
    S: Read + Write + AsFd,
{
    let mut target = match VmTarget::new(dbg.clone(), options.stop_timeout, options.end.clone()) {
        Ok(t) => t,
        Err(e) => return SessionEnd::Fatal(e),
    };
    let end_fd = options.end.as_ref().map(GuestEnd::raw_fd);
    match Waiter::new(stream.as_raw_fd(), dbg.stop_fd(), end_fd) {
        Ok(w) => target.waiter = Some(w),
        Err(e) => return SessionEnd::ConnectionLost(e),
    }
    match GdbStub::new(stream).run_blocking::<VmEventLoop<M, BufConn<S>>>(&mut target) {
        Ok(DisconnectReason::Disconnect) => SessionEnd::Detached,
        Ok(DisconnectReason::Kill) => SessionEnd::Killed,
        Ok(DisconnectReason::TargetExited(code)) => SessionEnd::GuestEnded(code),
        Ok(DisconnectReason::TargetTerminated(sig)) => SessionEnd::Protocol(format!("terminated by {sig}")),
        Err(e) => classify(e),
    }
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
