//! The blocking event loop: while the guest runs, the GDB thread sleeps in
//! `epoll` on three descriptors and wakes for whichever comes first:
//!
//! * the GDB connection (a byte: a packet, or Ctrl-C),
//! * kvm-glue's stop descriptor (a vCPU posted a stop),
//! * the guest's end ([`GuestEnd`](super::GuestEnd)), if the VMM gave one.
//!
//! It polls without sleeping only for a bounded window
//! ([`Options::busy_poll`](super::Options::busy_poll), 100 µs by default),
//! and only where an answer is due within microseconds: GDB's next packet
//! after a reply, a step's stop after a resume that only steps. Then it
//! sleeps. (The vCPU that parks at its own stop polls for its release for
//! the same window, on its own thread: see `VcpuDebug`'s park.) While the
//! guest runs freely it sleeps at once: firecracker's and
//! cloud-hypervisor's GDB loops spin on `try_recv` + `peek` and keep a
//! core busy for as long as the guest runs.
//!
//! The polling yields the CPU between looks (`sched_yield`). A peer woken
//! by a reply is often queued on the replying thread's own CPU (a socket
//! write wakes its reader as if the writer were about to sleep); a poller
//! that only spun would hold that CPU for its whole window while GDB waits
//! for it (measured: a Ctrl-C's stop reply 100 µs later, exactly the
//! window).
//!
//! [`run`] drives gdbstub's state machine as its `run_blocking` does, with
//! one difference: a stop reply carries `rbp`, `rsp` and `rip` (gdbserver's
//! expedited registers for x86-64) when the stopped vCPU read them as it
//! parked, so GDB needs no `g` packet to see where a step or breakpoint
//! left it (`run_blocking` has no way to send them).

use std::io;
use std::marker::PhantomData;
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use gdbstub::common::Tid;
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, GdbStubError, MultiThreadStopReason};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::regs::VmRegId;
use super::stop;
use super::target::{VmTarget, EXPEDITED};
use super::wire::Wire;
use crate::error::Error;

const CONN: u64 = 0;
const STOP: u64 = 1;
const END: u64 = 2;

/// What one GDB session waits on.
#[derive(Debug)]
pub struct Waiter {
    epoll: Epoll,
}

impl Waiter {
    /// Watches `conn`, `stop` and, if given, `end` for input.
    ///
    /// `stop` and `end` are edge-triggered: kvm-glue's stop descriptor may
    /// stay readable after the stop it announced was taken (or dropped as
    /// stale), and the end is a latch. The caller checks for a stop and for
    /// the end *before* each [`wait`](Self::wait), so an edge that came
    /// before the check is not needed, and one after it wakes the wait. (The
    /// session's check skips the lock while no stop was posted and no edge
    /// was seen since its last look; an edge it has not looked at yet is
    /// still queued in epoll, so the wait returns at once with it.)
    ///
    /// # Errors
    /// `epoll_create1` or `epoll_ctl` failing.
    pub fn new(conn: RawFd, stop: RawFd, end: Option<RawFd>) -> io::Result<Waiter> {
        let epoll = Epoll::new()?;
        let add =
            |fd: RawFd, set: EventSet, data: u64| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, data));
        add(conn, EventSet::IN, CONN)?;
        add(stop, EventSet::IN | EventSet::EDGE_TRIGGERED, STOP)?;
        if let Some(end) = end {
            add(end, EventSet::IN | EventSet::EDGE_TRIGGERED, END)?;
        }
        Ok(Waiter { epoll })
    }

    /// Blocks until one of the descriptors is readable (or has hung up);
    /// returns which: [`Ready`].
    ///
    /// # Errors
    /// `epoll_wait` failing other than with `EINTR`.
    pub fn wait(&self) -> io::Result<Ready> {
        self.wait_busy(Duration::ZERO, || false)
    }

    /// As [`wait`](Self::wait), busy-polling first: for up to `window` it
    /// asks `epoll` without sleeping, and `early` between the asks, before
    /// it sleeps in `epoll_wait`. Returns as soon as a descriptor is ready,
    /// or with nothing ready once `early` says so (the caller looks for
    /// what `early` saw).
    ///
    /// An answer that comes within the window is taken without the
    /// wake-up of a sleeping thread (on these hosts, tens of µs out of an
    /// idle core's sleep state); one that comes later costs the `window`
    /// of CPU time first. Between looks the thread yields its CPU to any
    /// thread waiting for it (see the [module docs](self)).
    ///
    /// # Errors
    /// `epoll_wait` failing other than with `EINTR`.
    pub fn wait_busy(&self, window: Duration, mut early: impl FnMut() -> bool) -> io::Result<Ready> {
        if !window.is_zero() {
            let start = Instant::now();
            loop {
                if let Some(ready) = self.poll(0)? {
                    return Ok(ready);
                }
                if early() {
                    return Ok(Ready::default());
                }
                if start.elapsed() >= window {
                    break;
                }
                std::thread::yield_now();
            }
        }
        loop {
            if let Some(ready) = self.poll(-1)? {
                return Ok(ready);
            }
        }
    }

    /// One `epoll_wait` of `timeout_ms` (`-1`: for ever); `None` if nothing
    /// was ready (timed out, or interrupted by a signal).
    fn poll(&self, timeout_ms: i32) -> io::Result<Option<Ready>> {
        let mut events = [EpollEvent::default(); 3];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(None);
        }
        let mut ready = Ready::default();
        for ev in events.iter().take(n) {
            match ev.data() {
                CONN => ready.conn = true,
                STOP => ready.stop = true,
                END => ready.end = true,
                _ => {}
            }
        }
        Ok(Some(ready))
    }
}

/// Busy-polls `ready` for up to `window`, yielding the CPU between looks:
/// `Ok(true)` as soon as it says so, `Ok(false)` once the window has
/// passed without.
fn busy_poll(window: Duration, mut ready: impl FnMut() -> io::Result<bool>) -> io::Result<bool> {
    if window.is_zero() {
        return Ok(false);
    }
    let start = Instant::now();
    loop {
        if ready()? {
            return Ok(true);
        }
        if start.elapsed() >= window {
            return Ok(false);
        }
        std::thread::yield_now();
    }
}

/// Which descriptors a [`Waiter::wait`] found ready.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// The GDB connection has a byte (or was closed).
    pub conn: bool,
    /// A stop is queued.
    pub stop: bool,
    /// The guest ended.
    pub end: bool,
}

/// The event loop of a [`VmTarget`] over a connection `C` (a
/// [`TcpStream`] or a [`UnixStream`](std::os::unix::net::UnixStream)) as
/// the [`Wire`] reads it.
///
/// * A stop is taken only while the target runs: a stop still queued when
///   a resume was refused is not reported as that resume's answer.
/// * A resume [`VmTarget`] refused (a thread that does not exist, nothing
///   to run) is answered with its error here: gdbstub 0.7 has no error
///   reply for a resume. gdbstub then waits for a stop that never comes,
///   while every packet is still answered, exactly as when stopped.
/// * Ctrl-C while nothing runs reports nothing (GDB sent it as a stop was
///   already on its way; gdbstub would otherwise keep a SIGINT and answer
///   the next `c` with it at once, the vCPUs running).
#[derive(Debug)]
pub struct VmEventLoop<M, C = TcpStream>(PhantomData<(M, C)>);

type WaitResult = Result<Event<MultiThreadStopReason<u64>>, WaitForStopReasonError<Error, io::Error>>;

impl<M, C> BlockingEventLoop for VmEventLoop<M, C>
where
    M: GuestMemory + Send + Sync + 'static,
    C: ConnectionExt<Error = io::Error>,
{
    type Target = VmTarget<M>;
    type Connection = Wire<C>;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(target: &mut VmTarget<M>, conn: &mut Wire<C>) -> WaitResult {
        if let Some(errno) = target.refused.take() {
            let body = format!("E{errno:02x}");
            conn.reply(body.as_bytes())
                .map_err(WaitForStopReasonError::Connection)?;
        }
        loop {
            if let Some(byte) = conn.next_ready() {
                return Ok(Event::IncomingData(byte));
            }
            // A posted stop first: all-stop, then report it. Looked for
            // under the lock only when one may be new: every stop is posted
            // with the count moved, and one left waiting by a resume is
            // announced on the descriptor (`VmDebug::resume`).
            if target.running {
                let posts = target.dbg.posts();
                if target.stop_signalled || target.seen_posts != Some(posts) {
                    target.stop_signalled = false;
                    target.seen_posts = Some(posts);
                    if let Some(reason) = take_stop(target).map_err(WaitForStopReasonError::Target)? {
                        target.running = false;
                        return Ok(Event::TargetStopped(reason));
                    }
                }
            }
            if let Some(code) = target.end.as_ref().and_then(|e| e.code()) {
                return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(code)));
            }
            let waiter = target
                .waiter
                .as_ref()
                .ok_or_else(|| WaitForStopReasonError::Connection(io::Error::other("the session has no epoll set")))?;
            // Before sleeping: send what the connection holds (a resume's
            // `+` is written without a flush), and take a byte it already
            // read (a `BufConn` reads all that is there, and epoll does not
            // wake for bytes out of the socket).
            // The byte goes through the wire's filter (`pump`): a read here
            // could block on the socket for a byte the filter ignores.
            conn.flush().map_err(WaitForStopReasonError::Connection)?;
            if conn.peek().map_err(WaitForStopReasonError::Connection)?.is_some() {
                conn.pump().map_err(WaitForStopReasonError::Connection)?;
                continue;
            }
            // After a resume that only steps, busy-polled for the session's
            // window first: the step's stop comes within it and is taken
            // without a wake-up. Not while a vCPU runs freely: its stop may
            // be far off, and the polling would take a core from it.
            let window = if target.running && target.stepping {
                target.busy_poll
            } else {
                Duration::ZERO
            };
            let (seen, dbg) = (target.seen_posts, &target.dbg);
            let ready = waiter
                .wait_busy(window, || seen != Some(dbg.posts()))
                .map_err(WaitForStopReasonError::Connection)?;
            // Kept until a look under the lock, also when a byte from GDB
            // ends this wait first (the descriptor's edge is gone by then).
            target.stop_signalled |= ready.stop;
            if ready.conn {
                // A byte from GDB, for gdbstub if it is part of a packet (a
                // stop that came with it is taken next, first thing).
                conn.pump().map_err(WaitForStopReasonError::Connection)?;
            }
            // A byte, a stop or the end: loop to take it.
        }
    }

    fn on_interrupt(target: &mut VmTarget<M>) -> Result<Option<MultiThreadStopReason<u64>>, Error> {
        if !target.running {
            // Stopped already: the stop GDB is waiting for is on the wire.
            return Ok(None);
        }
        // Ctrl-C: bring every vCPU out of KVM_RUN (bounded), then report the
        // stop a vCPU posted meanwhile if there is one, else SIGINT.
        target.stop_all()?;
        target.running = false;
        if let Some(reason) = take_stop(target)? {
            return Ok(Some(reason));
        }
        Ok(stop::interrupted(target.current))
    }
}

/// Why [`run`] ended a session other than by GDB's or the guest's doing.
#[derive(Debug)]
pub(super) enum LoopError {
    /// gdbstub's own error (the protocol, the target, the connection).
    Stub(GdbStubError<Error, io::Error>),
    /// Reading the connection failed.
    Connection(io::Error),
    /// The VM failed.
    Target(Error),
}

/// Runs one session to its end: gdbstub's `run_blocking` over
/// [`VmEventLoop`], with stop replies that carry the expedited registers
/// when they are at hand (see the [module docs](self)).
pub(super) fn run<M, C>(
    stub: GdbStub<'_, VmTarget<M>, Wire<C>>,
    target: &mut VmTarget<M>,
) -> Result<DisconnectReason, LoopError>
where
    M: GuestMemory + Send + Sync + 'static,
    C: ConnectionExt<Error = io::Error>,
{
    let mut gdb = stub.run_state_machine(target).map_err(LoopError::Stub)?;
    loop {
        let next = match gdb {
            GdbStubStateMachine::Idle(mut gdb) => {
                let conn = gdb.borrow_conn();
                // GDB's next packet usually follows the reply at once: look
                // for it for the session's window before sleeping in a read
                // (the reply is flushed first, so it is out).
                if !target.busy_poll.is_zero() {
                    conn.flush().map_err(LoopError::Connection)?;
                    busy_poll(target.busy_poll, || Ok(conn.peek()?.is_some())).map_err(LoopError::Connection)?;
                }
                let byte = conn.read().map_err(LoopError::Connection)?;
                gdb.incoming_data(target, byte)
            }
            GdbStubStateMachine::Disconnected(gdb) => return Ok(gdb.get_reason()),
            GdbStubStateMachine::CtrlCInterrupt(gdb) => {
                let reason = VmEventLoop::<M, C>::on_interrupt(target).map_err(LoopError::Target)?;
                gdb.interrupt_handled(target, reason)
            }
            GdbStubStateMachine::Running(mut gdb) => {
                match VmEventLoop::<M, C>::wait_for_stop_reason(target, gdb.borrow_conn()) {
                    Ok(Event::TargetStopped(reason)) => match stopped_thread(&reason).and_then(|t| target.expedited(t))
                    {
                        Some(values) => {
                            let bytes = values.map(u64::to_le_bytes);
                            let mut regs = EXPEDITED.iter().zip(bytes.iter()).map(|(&n, b)| (VmRegId(n), &b[..]));
                            gdb.report_stop_with_regs(target, reason, &mut regs)
                        }
                        None => gdb.report_stop(target, reason),
                    },
                    Ok(Event::IncomingData(byte)) => gdb.incoming_data(target, byte),
                    Err(WaitForStopReasonError::Target(e)) => return Err(LoopError::Target(e)),
                    Err(WaitForStopReasonError::Connection(e)) => return Err(LoopError::Connection(e)),
                }
            }
        };
        gdb = next.map_err(LoopError::Stub)?;
    }
}

/// The thread a stop reply names (`T` packets), for its registers.
fn stopped_thread(reason: &MultiThreadStopReason<u64>) -> Option<Tid> {
    match *reason {
        MultiThreadStopReason::SignalWithThread { tid, .. }
        | MultiThreadStopReason::SwBreak(tid)
        | MultiThreadStopReason::HwBreak(tid)
        | MultiThreadStopReason::Watch { tid, .. } => Some(tid),
        _ => None,
    }
}

/// Takes a posted stop, stops every vCPU, and translates it.
fn take_stop<M: GuestMemory + Send + Sync + 'static>(
    target: &mut VmTarget<M>,
) -> Result<Option<MultiThreadStopReason<u64>>, Error> {
    let Some(event) = target.dbg.try_take_stop()? else {
        return Ok(None);
    };
    target.stop_all()?;
    target.current = event.vcpu;
    let hits = target.watch_hits(&event)?;
    Ok(stop::stop_reason(&event, &hits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    /// A waiter on one end of a socket pair and a stop eventfd.
    fn waiter() -> (Waiter, UnixStream, UnixStream, EventFd) {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let stop = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let w = Waiter::new(ours.as_raw_fd(), stop.as_raw_fd(), None).expect("epoll");
        (w, ours, theirs, stop)
    }

    /// What a wait returns for a byte from GDB alone, and for a stop alone.
    const A_BYTE: Ready = Ready {
        conn: true,
        stop: false,
        end: false,
    };
    const A_STOP: Ready = Ready {
        conn: false,
        stop: true,
        end: false,
    };

    /// A long window: a poll that missed what came would outlast the test.
    const LONG: Duration = Duration::from_secs(600);

    #[test]
    fn a_busy_wait_returns_with_a_byte_that_comes_while_it_polls() {
        let (w, _ours, mut theirs, _stop) = waiter();
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                io::Write::write_all(&mut theirs, b"$").expect("write");
            });
            let ready = w.wait_busy(LONG, || false).expect("wait");
            assert_eq!(ready, A_BYTE);
        });
    }

    #[test]
    fn a_busy_wait_returns_with_a_stop_signalled_while_it_polls() {
        let (w, _ours, _theirs, stop) = waiter();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                stop.write(1).expect("signal");
            });
            let ready = w.wait_busy(LONG, || false).expect("wait");
            assert_eq!(ready, A_STOP);
        });
    }

    #[test]
    fn a_busy_wait_returns_empty_handed_once_early_says_so() {
        let (w, _ours, _theirs, _stop) = waiter();
        let mut asks = 0;
        let ready = w
            .wait_busy(LONG, || {
                asks += 1;
                asks == 3
            })
            .expect("wait");
        assert_eq!(ready, Ready::default());
        assert_eq!(asks, 3, "asked between polls until it said yes");
    }

    #[test]
    fn after_its_window_a_busy_wait_sleeps_until_something_comes() {
        let (w, _ours, mut theirs, _stop) = waiter();
        let mut asks = 0u64;
        std::thread::scope(|s| {
            s.spawn(move || {
                // Well after the 1 ms window.
                std::thread::sleep(Duration::from_millis(200));
                io::Write::write_all(&mut theirs, b"$").expect("write");
            });
            let ready = w
                .wait_busy(Duration::from_millis(1), || {
                    asks += 1;
                    false
                })
                .expect("wait");
            assert_eq!(ready, A_BYTE);
        });
        assert!(asks > 0, "polled first");
    }

    #[test]
    fn busy_poll_says_whether_it_saw_the_condition_within_its_window() {
        let mut n = 0;
        assert!(busy_poll(LONG, || {
            n += 1;
            Ok(n == 5)
        })
        .expect("poll"));
        assert_eq!(n, 5);
        assert!(!busy_poll(Duration::from_millis(1), || Ok(false)).expect("poll"));
        let mut asked = false;
        assert!(!busy_poll(Duration::ZERO, || {
            asked = true;
            Ok(true)
        })
        .expect("poll"));
        assert!(!asked, "a zero window asks nothing");
    }
}
