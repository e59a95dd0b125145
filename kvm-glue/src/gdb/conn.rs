//! A buffered connection for `gdbstub`: [`BufConn`].
//!
//! `gdbstub` reads and writes one byte at a time. Handed a bare
//! [`TcpStream`](std::net::TcpStream), every byte it receives is a 1-byte
//! `recvfrom` plus an `ioctl(FIONBIO)` (its `ConnectionExt` impl switches the
//! socket to blocking before each read), and every byte it sends a 1-byte
//! `sendto` — with `TCP_NODELAY`, one TCP segment per byte: a `g` reply was
//! 87 `sendto` calls. QEMU's stub takes one `recvmsg` and two `sendmsg` per
//! packet.
//!
//! A [`BufConn`] over any byte stream (a TCP or Unix socket, a pty master,
//! the stream given to [`serve_stream`](super::serve_stream)):
//!
//! * **reads what is there in one call**: [`read`](ConnectionExt::read) with
//!   an empty buffer makes one `read` of up to [`READ_CAPACITY`] bytes and
//!   serves the following bytes from the buffer. Several packets, a partial
//!   packet, a Ctrl-C (`0x03`) among packets: the bytes come out in order,
//!   exactly as they came in; nothing is parsed here.
//! * **writes a packet in one call**: what `gdbstub` writes stays in a
//!   buffer until [`flush`](Connection::flush) (`gdbstub` flushes at the end
//!   of every reply), then goes out in one `write` (more only if the kernel
//!   takes part of it). A reply bigger than [`WRITE_LIMIT`] is sent early.
//! * **never waits for input with output unsent**: a read that has to wait
//!   sends the write buffer first (the `+` acknowledging a resume is written
//!   without a flush: `gdbstub` flushes only a reply).
//! * **never spins**: a stream in non-blocking mode is waited for in `poll`,
//!   and [`peek`](ConnectionExt::peek) never blocks.
//! * **a failed flush keeps what was not sent** ([`BufConn::unsent`]).
//!
//! The bytes it holds are invisible to `epoll` on its descriptor: an event
//! loop asks [`peek`](ConnectionExt::peek) before it sleeps (the session's
//! does, and flushes first).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use gdbstub::conn::{Connection, ConnectionExt};

/// The most one read takes in: GDB's packets (the server advertises 4096
/// bytes) fit, and a longer burst is simply read in several calls.
pub const READ_CAPACITY: usize = 4096;

/// Written bytes beyond this are sent without waiting for a flush, so a
/// connection never holds more than this.
pub const WRITE_LIMIT: usize = 64 * 1024;

/// `gdbstub`'s connection over any byte stream `S`: one system call per
/// packet each way instead of one per byte (see the [module docs](self)).
///
/// ```no_run
/// # fn f() -> std::io::Result<()> {
/// use gdbstub::conn::{Connection, ConnectionExt};
/// use kvm_glue::gdb::BufConn;
/// let (stream, _) = std::net::TcpListener::bind("127.0.0.1:0")?.accept()?;
/// let mut conn = BufConn::new(stream);
/// conn.on_session_start()?; // TCP_NODELAY
/// let first = conn.read()?; // one read: the whole packet is buffered
/// conn.write_all(b"+$OK#9a")?; // buffered
/// conn.flush()?; // one write
/// # let _ = first; Ok(()) }
/// ```
#[derive(Debug)]
pub struct BufConn<S: Write + AsFd> {
    inner: S,
    input: Box<[u8]>,
    /// `input[pos..len]` is read and not yet served.
    pos: usize,
    len: usize,
    output: Vec<u8>,
}

impl<S: Write + AsFd> BufConn<S> {
    /// Buffers `inner`.
    pub fn new(inner: S) -> BufConn<S> {
        BufConn {
            inner,
            input: vec![0; READ_CAPACITY].into_boxed_slice(),
            pos: 0,
            len: 0,
            output: Vec::new(),
        }
    }

    /// The bytes read from the stream and not yet served, in order.
    pub fn buffered(&self) -> &[u8] {
        self.input.get(self.pos..self.len).unwrap_or_default()
    }

    /// Drops the first `n` buffered bytes (all of them if there are fewer).
    pub fn consume(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.len);
    }

    /// The bytes written and not yet sent.
    pub fn unsent(&self) -> &[u8] {
        &self.output
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Waits until `fd` has one of `events` (or an error or hang-up), at most
/// `timeout_ms` (`-1`: for ever); `false` if it timed out.
fn wait_for(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid, initialised pollfd, the count passed
        // is 1, and the kernel writes only its `revents`.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl<S: Write + AsFd> BufConn<S> {
    /// Sends the write buffer; what a failure leaves unsent stays buffered.
    fn send(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.inner.write(&self.output) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the GDB connection took no bytes",
                    ))
                }
                Ok(n) => {
                    self.output.drain(..n.min(self.output.len()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_for(self.inner.as_fd(), libc::POLLOUT, -1)?;
                }
                Err(e) => return Err(e),
            }
        }
        self.inner.flush()
    }
}

impl<S: Read + Write + AsFd> BufConn<S> {
    /// With nothing buffered: one read of what the stream has. `wait`:
    /// block until something comes (sending the write buffer first);
    /// otherwise `Ok(false)` if nothing is there now.
    ///
    /// # Errors
    /// The stream's; end of file is [`io::ErrorKind::UnexpectedEof`].
    fn fill(&mut self, wait: bool) -> io::Result<bool> {
        if self.pos < self.len {
            return Ok(true);
        }
        if wait {
            self.send()?;
        } else if !wait_for(self.inner.as_fd(), libc::POLLIN, 0)? {
            return Ok(false);
        }
        loop {
            match self.inner.read(&mut self.input) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the GDB connection closed",
                    ))
                }
                Ok(n) => {
                    self.pos = 0;
                    self.len = n.min(self.input.len());
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A non-blocking stream: wait in poll, never spin.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait {
                        return Ok(false);
                    }
                    wait_for(self.inner.as_fd(), libc::POLLIN, -1)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until at least one byte is buffered (one read, after sending
    /// the write buffer), unless one is already.
    ///
    /// # Errors
    /// As [`read`](ConnectionExt::read).
    pub fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.fill(true)?;
        Ok(self.buffered())
    }
}

impl<S: Write + AsFd> AsFd for BufConn<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<S: Write + AsFd> AsRawFd for BufConn<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_fd().as_raw_fd()
    }
}

impl<S: Write + AsFd> Connection for BufConn<S> {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.output.push(byte);
        if self.output.len() >= WRITE_LIMIT {
            self.send()?;
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.output.extend_from_slice(buf);
        if self.output.len() >= WRITE_LIMIT {
            self.send()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }

    /// Turns Nagle's algorithm off on a TCP socket (as `gdbstub` does for a
    /// `TcpStream`: a reply must not wait for the peer's delayed ack of the
    /// one before); a stream that is no TCP socket is left as it is.
    fn on_session_start(&mut self) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: the option value is `one`, a live c_int, and the length
        // passed is its size; setsockopt reads that much and keeps nothing.
        let r = unsafe {
            libc::setsockopt(
                self.inner.as_fd().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not a socket (a pty, a pipe), or not TCP (a Unix socket).
            Some(libc::ENOTSOCK | libc::EOPNOTSUPP | libc::ENOPROTOOPT | libc::EINVAL) => Ok(()),
            _ => Err(e),
        }
    }
}

impl<S: Read + Write + AsFd> ConnectionExt for BufConn<S> {
    fn read(&mut self) -> io::Result<u8> {
        self.fill(true)?;
        let byte = self
            .buffered()
            .first()
            .copied()
            .ok_or_else(|| io::Error::other("a read filled nothing"))?;
        self.pos += 1;
        Ok(byte)
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        if !self.fill(false)? {
            return Ok(None);
        }
        Ok(self.buffered().first().copied())
    }
}

impl<S: Write + AsFd> Drop for BufConn<S> {
    /// Sends what is still unsent, if the stream takes it (`gdbstub` does
    /// not flush its reply to `k`; the `+` before it still goes out).
    fn drop(&mut self) {
        let _ = self.send();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    /// A stream that counts the read and write calls that reach it.
    #[derive(Debug)]
    struct Counted {
        inner: UnixStream,
        reads: usize,
        writes: usize,
        /// Writes fail with `EPIPE` after this many bytes in all.
        fail_after: Option<usize>,
        written: usize,
    }

    impl Counted {
        fn new(inner: UnixStream) -> Counted {
            Counted {
                inner,
                reads: 0,
                writes: 0,
                fail_after: None,
                written: 0,
            }
        }
    }

    impl Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            Read::read(&mut self.inner, buf)
        }
    }

    impl Write for Counted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            let room = match self.fail_after {
                Some(limit) if self.written >= limit => return Err(io::Error::from_raw_os_error(libc::EPIPE)),
                Some(limit) => (limit - self.written).min(buf.len()),
                None => buf.len(),
            };
            let n = Write::write(&mut self.inner, &buf[..room])?;
            self.written += n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl AsFd for Counted {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.inner.as_fd()
        }
    }

    fn pair() -> (BufConn<Counted>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        theirs.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        (BufConn::new(Counted::new(ours)), theirs)
    }

    fn read_n(conn: &mut BufConn<Counted>, n: usize) -> Vec<u8> {
        (0..n).map(|_| ConnectionExt::read(conn).expect("a byte")).collect()
    }

    #[test]
    fn several_packets_and_a_ctrl_c_in_one_read_come_out_in_order_from_one_read() {
        let (mut conn, mut theirs) = pair();
        let sent = b"$g#67\x03$m10400,40#c5+";
        Write::write_all(&mut theirs, sent).expect("write");
        assert_eq!(read_n(&mut conn, sent.len()), sent);
        assert_eq!(conn.get_ref().reads, 1, "one read for what was there");
    }

    #[test]
    fn a_partial_packet_is_served_and_its_rest_read_when_it_comes() {
        let (mut conn, mut theirs) = pair();
        Write::write_all(&mut theirs, b"$m10").expect("write");
        assert_eq!(read_n(&mut conn, 4), b"$m10");
        assert_eq!(
            ConnectionExt::peek(&mut conn).expect("peek"),
            None,
            "nothing more is there yet"
        );
        Write::write_all(&mut theirs, b"400,40#c5").expect("write");
        assert_eq!(read_n(&mut conn, 9), b"400,40#c5");
        assert_eq!(conn.get_ref().reads, 2);
    }

    #[test]
    fn peek_shows_the_next_byte_until_it_is_read_and_never_blocks() {
        let (mut conn, mut theirs) = pair();
        assert_eq!(ConnectionExt::peek(&mut conn).expect("peek"), None);
        assert_eq!(conn.get_ref().reads, 0, "an idle connection is not read");
        Write::write_all(&mut theirs, b"\x03$?#3f").expect("write");
        assert_eq!(ConnectionExt::peek(&mut conn).expect("peek"), Some(0x03));
        assert_eq!(ConnectionExt::peek(&mut conn).expect("peek"), Some(0x03));
        assert_eq!(ConnectionExt::read(&mut conn).expect("read"), 0x03);
        assert_eq!(ConnectionExt::peek(&mut conn).expect("peek"), Some(b'$'));
        assert_eq!(conn.buffered(), b"$?#3f");
        assert_eq!(conn.get_ref().reads, 1);
    }

    #[test]
    fn writes_wait_for_flush_and_then_go_out_in_one_write() {
        let (mut conn, mut theirs) = pair();
        Connection::write(&mut conn, b'+').expect("write");
        Connection::write_all(&mut conn, b"$OK").expect("write");
        for b in *b"#9a" {
            Connection::write(&mut conn, b).expect("write");
        }
        assert_eq!(conn.get_ref().writes, 0, "nothing sent before flush");
        theirs.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 64];
        assert_eq!(
            Read::read(&mut theirs, &mut buf).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "the peer has nothing yet"
        );
        Connection::flush(&mut conn).expect("flush");
        assert_eq!(conn.get_ref().writes, 1, "one write for the packet");
        let n = Read::read(&mut theirs, &mut buf).expect("the packet");
        assert_eq!(&buf[..n], b"+$OK#9a");
        assert!(conn.unsent().is_empty());
    }

    #[test]
    fn a_read_that_must_wait_sends_what_is_unsent_first() {
        let (mut conn, mut theirs) = pair();
        // The peer answers only once it has the ack: without it, it gives up
        // and closes, and the read below fails.
        let peer = std::thread::spawn(move || {
            let mut b = [0u8];
            if theirs.read_exact(&mut b).is_ok() && b[0] == b'+' {
                Write::write_all(&mut theirs, b"$").expect("answer");
            }
        });
        Connection::write(&mut conn, b'+').expect("write");
        assert_eq!(ConnectionExt::read(&mut conn).expect("the answer to the ack"), b'$');
        peer.join().expect("peer");
    }

    #[test]
    fn a_non_blocking_stream_is_waited_for_in_poll_not_spun_on() {
        let (mut conn, mut theirs) = pair();
        conn.get_ref().inner.set_nonblocking(true).expect("nonblocking");
        let peer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            Write::write_all(&mut theirs, b"x").expect("write");
            theirs
        });
        assert_eq!(ConnectionExt::read(&mut conn).expect("read"), b'x');
        // One read that would block, one that gets the byte: a spin would
        // make thousands in 100 ms.
        assert!(conn.get_ref().reads <= 2, "{} reads", conn.get_ref().reads);
        drop(peer.join().expect("peer"));
    }

    #[test]
    fn end_of_file_is_an_error_not_a_panic() {
        let (mut conn, theirs) = pair();
        drop(theirs);
        let e = ConnectionExt::read(&mut conn).expect_err("end of file");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = ConnectionExt::peek(&mut conn).expect_err("end of file");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_failed_flush_keeps_what_was_not_sent_and_a_later_one_sends_it() {
        let (mut conn, mut theirs) = pair();
        Connection::write_all(&mut conn, b"$OK#9a").expect("write");
        // The stream takes 3 bytes, then fails.
        conn.inner.fail_after = Some(3);
        assert!(Connection::flush(&mut conn).is_err());
        assert_eq!(conn.unsent(), b"#9a");
        conn.inner.fail_after = None;
        Connection::flush(&mut conn).expect("flush");
        assert!(conn.unsent().is_empty());
        let mut got = [0u8; 6];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"$OK#9a");
    }

    #[test]
    fn writing_past_the_limit_sends_without_a_flush() {
        let (mut conn, theirs) = pair();
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut all = Vec::new();
            theirs.read_to_end(&mut all).expect("read");
            all.len()
        });
        let chunk = vec![b'a'; WRITE_LIMIT / 4];
        for _ in 0..4 {
            Connection::write_all(&mut conn, &chunk).expect("write");
        }
        assert!(conn.unsent().is_empty(), "{} bytes held", conn.unsent().len());
        drop(conn);
        assert_eq!(reader.join().expect("reader"), WRITE_LIMIT);
    }

    #[test]
    fn dropping_the_connection_sends_what_is_unsent() {
        let (mut conn, mut theirs) = pair();
        Connection::write(&mut conn, b'+').expect("write");
        drop(conn);
        let mut all = Vec::new();
        theirs.read_to_end(&mut all).expect("read");
        assert_eq!(all, b"+");
    }

    #[test]
    fn session_start_turns_nagle_off_on_tcp_and_leaves_other_streams_alone() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        assert!(!server.nodelay().expect("nodelay"), "Nagle is on by default");
        let mut conn = BufConn::new(server);
        Connection::on_session_start(&mut conn).expect("session start");
        assert!(conn.get_ref().nodelay().expect("nodelay"));
        drop(client);
        let (mut conn, _theirs) = pair();
        Connection::on_session_start(&mut conn).expect("a Unix socket is no error");
    }

    /// Serves `ours` with [`serve_stream`](super::super::serve_stream) and
    /// one simulated vCPU (parks when asked, never stops by itself); runs
    /// `client` on the other end, then closes it.
    fn serve_one_vcpu(client: impl FnOnce(&mut UnixStream)) {
        use crate::fake::FakeVcpu;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use vm_memory::{GuestAddress, GuestMemoryMmap};

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
        let dbg = crate::VmDebug::new(mem);
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        let done = Arc::new(AtomicBool::new(false));
        let vcpu = {
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let fake = FakeVcpu::new();
                while !done.load(Ordering::Acquire) {
                    h.before_run(&fake).expect("before_run");
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        theirs.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let server = std::thread::spawn(move || {
            let options = super::super::Options::default();
            let _ = super::super::serve_stream(&ours, "test", &dbg, &options, |_| {});
        });
        client(&mut theirs);
        drop(theirs);
        server.join().expect("the server panicked");
        done.store(true, Ordering::Release);
        vcpu.join().expect("the vCPU thread panicked");
    }

    /// Reads `+` or a whole `$...#xx` packet; `None` on the read timeout.
    fn next_reply(s: &mut UnixStream) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        let mut b = [0u8];
        loop {
            s.read_exact(&mut b).ok()?;
            out.push(b[0]);
            if out == b"+" {
                return Some(out);
            }
            if out.len() >= 3 && out[out.len() - 3] == b'#' {
                return Some(out);
            }
        }
    }

    #[test]
    fn a_resume_is_acknowledged_while_the_guest_runs() {
        serve_one_vcpu(|gdb| {
            Write::write_all(gdb, b"$vCont;c#a8").expect("write");
            assert_eq!(
                next_reply(gdb).as_deref(),
                Some(&b"+"[..]),
                "the resume's ack, the guest running"
            );
            Write::write_all(gdb, b"\x03").expect("Ctrl-C");
            let stop = next_reply(gdb).expect("a stop reply");
            assert!(
                stop.starts_with(b"$T02"),
                "SIGINT: {:?}",
                String::from_utf8_lossy(&stop)
            );
        });
    }

    #[test]
    fn a_ctrl_c_read_with_the_resume_stops_the_guest() {
        serve_one_vcpu(|gdb| {
            // One write: the server reads both in one read, and must not
            // wait in epoll for the 0x03 it already holds.
            Write::write_all(gdb, b"$vCont;c#a8\x03").expect("write");
            assert_eq!(next_reply(gdb).as_deref(), Some(&b"+"[..]));
            let stop = next_reply(gdb).expect("a stop reply to the Ctrl-C held in the buffer");
            assert!(
                stop.starts_with(b"$T02"),
                "SIGINT: {:?}",
                String::from_utf8_lossy(&stop)
            );
        });
    }
}
