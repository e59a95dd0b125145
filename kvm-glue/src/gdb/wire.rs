//! The GDB connection as kvm-glue reads it: [`Wire`] sits between the
//! socket and `gdbstub` and hands `gdbstub` only whole, well-framed packets.
//!
//! A GDB server is a network-facing parser, and `gdbstub` 0.7.10 trusts its
//! input further than that allows (each point is reproduced, with the text
//! of an upstream report, in `kvm-glue/tests/upstream/`):
//!
//! * **bytes outside packets** (a port probe's `\n`) are a protocol error
//!   that ends the session; the protocol says they are ignored. Here they
//!   are: outside a packet only `$`, `+`, `-` and Ctrl-C (`0x03`) pass, and
//!   before the first valid packet nothing but a packet does (a connection
//!   that never sent one never took part in the session: see
//!   [`serve_connection`](super::serve_connection)).
//! * **the packet buffer grows** with any packet longer than it (an owned
//!   buffer is a `Vec` that `push`es), and `qSupported` then advertises the
//!   grown size. The session's buffer is fixed at [`PACKET_SIZE`] (what
//!   `PacketSize` says), and a longer packet is answered `E07` (`E2BIG`)
//!   here, whole, without reaching `gdbstub`.
//! * **`m` reads in chunks of the buffer's free space** and adds the chunk
//!   offset to the address unchecked (a panic near the top of the address
//!   space), goes on after a short read (splicing a hole shut) and after an
//!   error is returned mid-way (data and `Exx` in one reply). An `m` asking
//!   for more than one chunk is cut here to what one chunk holds — a shorter
//!   reply is allowed ("fewer addressable memory units than requested"),
//!   GDB asks again for the rest — so `gdbstub` calls `read_addrs` once per
//!   packet and its answer is the reply.
//! * **`M`/`X` ignore their length field**: the length a write packet
//!   declares is kept for [`VmTarget`](super::VmTarget)'s `write_addrs`,
//!   which refuses data of another length.
//! * **`M`/`X` split at any `,` or `:`**, so `M1000:2,aabb` writes two
//!   bytes though it is not the protocol's `M addr,length:XX…`. A write
//!   packet not in that form (address, `,`, length, `:`, data; for `M` an
//!   even number of hex digits) is answered `E16` (`EINVAL`) here.
//! * **`qThreadExtraInfo` cannot fail** (its handler's only error ends the
//!   session): for a thread that does not exist, the error reply is sent
//!   here.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use gdbstub::conn::{Connection, ConnectionExt};

/// The session's packet buffer, and the `PacketSize` `qSupported` reports:
/// the longest packet (`$`, body, `#`, checksum) the server takes.
pub const PACKET_SIZE: usize = 4096;

/// What the packet being handled declared, for the target.
#[derive(Debug, Default)]
pub(super) struct Declared {
    /// The length field of an `M` or `X` packet.
    pub(super) write_len: Option<usize>,
}

/// Shared between a [`Wire`] and its session's target (same thread).
pub(super) type Shared = Arc<Mutex<Declared>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Between packets.
    Outside,
    /// After `$`, before `#`.
    Body,
    /// The first, then the second checksum digit.
    Sum1,
    Sum2,
    /// Inside a packet longer than [`PACKET_SIZE`]: skipped up to its end.
    TooLong,
    TooLongSum1,
    TooLongSum2,
}

/// A connection that hands `gdbstub` only whole packets (see the module
/// docs): a socket, or anything `gdbstub` reads and writes bytes on.
#[derive(Debug)]
pub struct Wire<C> {
    inner: C,
    /// Bytes for `gdbstub`, before anything more is read.
    ready: VecDeque<u8>,
    /// The packet being read.
    frame: Vec<u8>,
    state: Framing,
    /// A valid packet has arrived.
    started: bool,
    /// `QStartNoAckMode` went through: replies sent here carry no `+`.
    no_ack: bool,
    /// GDB's ids of the threads that exist.
    tids: Vec<usize>,
    shared: Shared,
}

fn checksum(body: &[u8]) -> u8 {
    body.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// `$body#xx`.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(b'$');
    out.extend_from_slice(body);
    out.extend_from_slice(format!("#{:02x}", checksum(body)).as_bytes());
    out
}

fn hex(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// The length field of a write packet in the protocol's form,
/// `M addr,length:XX…` (an even number of hex digits) or
/// `X addr,length:bin…`; `None` for anything else.
fn write_len(body: &[u8]) -> Option<u64> {
    let (&kind, rest) = body.split_first()?;
    if kind != b'M' && kind != b'X' {
        return None;
    }
    let comma = rest.iter().position(|&b| b == b',')?;
    let colon = rest.iter().position(|&b| b == b':')?;
    if colon < comma {
        return None;
    }
    hex(&rest[..comma])?;
    let len = hex(&rest[comma + 1..colon])?;
    let data = &rest[colon + 1..];
    let data_ok = kind == b'X' || (data.len() % 2 == 0 && data.iter().all(u8::is_ascii_hexdigit));
    data_ok.then_some(len)
}

impl<C: ConnectionExt<Error = io::Error>> Wire<C> {
    /// Wraps `inner` for a session whose threads are GDB ids `tids`.
    pub(super) fn new(inner: C, tids: Vec<usize>, shared: Shared) -> Wire<C> {
        Wire {
            inner,
            ready: VecDeque::new(),
            frame: Vec::with_capacity(PACKET_SIZE),
            state: Framing::Outside,
            started: false,
            no_ack: false,
            tids,
            shared,
        }
    }

    /// Whether a valid packet has arrived.
    pub(super) fn started(&self) -> bool {
        self.started
    }

    /// Reads one byte from the socket (blocking) and takes it in.
    ///
    /// # Errors
    /// The socket's, end of file included.
    pub(super) fn pump(&mut self) -> io::Result<()> {
        let byte = self.inner.read()?;
        self.take(byte)
    }

    /// The next byte for `gdbstub`, if one is waiting.
    pub(super) fn next_ready(&mut self) -> Option<u8> {
        self.ready.pop_front()
    }

    /// Sends `body` as a reply of kvm-glue's own (`+` first unless in
    /// no-ack mode).
    pub(super) fn reply(&mut self, body: &[u8]) -> io::Result<()> {
        if !self.no_ack {
            self.inner.write(b'+')?;
        }
        self.inner.write_all(&framed(body))?;
        self.inner.flush()
    }

    fn take(&mut self, byte: u8) -> io::Result<()> {
        match self.state {
            Framing::Outside => match byte {
                b'$' => {
                    self.frame.clear();
                    self.frame.push(byte);
                    self.state = Framing::Body;
                }
                b'+' | b'-' | 0x03 if self.started => self.ready.push_back(byte),
                // Outside a packet: ignored (GDB's remote protocol, "Packets").
                _ => {}
            },
            Framing::Body => {
                if self.frame.len() + 3 >= PACKET_SIZE && byte != b'#' {
                    // No room for this byte, `#` and the checksum.
                    self.state = Framing::TooLong;
                    self.frame.clear();
                } else {
                    self.frame.push(byte);
                    if byte == b'#' {
                        self.state = Framing::Sum1;
                    }
                }
            }
            Framing::Sum1 => {
                self.frame.push(byte);
                self.state = Framing::Sum2;
            }
            Framing::Sum2 => {
                self.frame.push(byte);
                self.state = Framing::Outside;
                let frame = std::mem::take(&mut self.frame);
                self.packet(frame)?;
            }
            Framing::TooLong => {
                if byte == b'#' {
                    self.state = Framing::TooLongSum1;
                }
            }
            Framing::TooLongSum1 => self.state = Framing::TooLongSum2,
            Framing::TooLongSum2 => {
                self.state = Framing::Outside;
                if self.started {
                    // E2BIG: longer than the PacketSize advertised.
                    self.reply(b"E07")?;
                }
            }
        }
        Ok(())
    }

    /// A whole frame, `$` to the last checksum digit.
    fn packet(&mut self, frame: Vec<u8>) -> io::Result<()> {
        let n = frame.len();
        let body = &frame[1..n - 3];
        let valid = hex(&frame[n - 2..]).is_some_and(|sum| sum == u64::from(checksum(body)));
        if !valid {
            // Before the session, not a packet; in it, gdbstub answers as
            // it does (it ends the session).
            if self.started {
                self.ready.extend(frame);
            }
            return Ok(());
        }
        self.started = true;
        let body = body.to_vec();
        self.declare(&body);
        if let Some(answer) = self.answer(&body) {
            return self.reply(answer);
        }
        if body == b"QStartNoAckMode" {
            // gdbstub always accepts it (use_no_ack_mode is not overridden).
            self.no_ack = true;
        }
        match self.one_chunk(&body) {
            Some(short) => self.ready.extend(framed(&short)),
            None => self.ready.extend(frame),
        }
        Ok(())
    }

    /// Records an `M`/`X` packet's length field (and clears it for others).
    fn declare(&mut self, body: &[u8]) {
        let write_len = write_len(body).and_then(|l| usize::try_from(l).ok());
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).write_len = write_len;
    }

    /// A reply kvm-glue gives itself instead of `gdbstub`.
    fn answer(&self, body: &[u8]) -> Option<&'static [u8]> {
        if matches!(body.first(), Some(b'M' | b'X')) {
            return write_len(body).is_none().then_some(b"E16");
        }
        let id = body.strip_prefix(b"qThreadExtraInfo,")?;
        // `p<pid>.<tid>` or `<tid>`.
        let tid = match id.iter().position(|&b| b == b'.') {
            Some(dot) if id.first() == Some(&b'p') => &id[dot + 1..],
            _ => id,
        };
        // Not one existing thread (`0` "any", `-1` "all", a number no vCPU
        // has, not a number): gdbstub would end the session on the first
        // ones and answer "vCPU 998" to the others.
        let exists = hex(tid)
            .and_then(|t| usize::try_from(t).ok())
            .is_some_and(|t| self.tids.contains(&t));
        (!exists).then_some(b"E16")
    }

    /// An `m` asking for more than one chunk of the packet buffer, cut to
    /// one chunk; `None` for anything else.
    fn one_chunk(&self, body: &[u8]) -> Option<Vec<u8>> {
        let rest = body.strip_prefix(b"m")?;
        let comma = rest.iter().position(|&b| b == b',')?;
        let (addr, len) = (&rest[..comma], &rest[comma + 1..]);
        let asked = hex(len)?;
        // gdbstub reads into the buffer after "$m" and the address's bytes;
        // and a reply longer than PacketSize would be one GDB never asks for.
        let addr_bytes = addr.len().div_ceil(2);
        let room = PACKET_SIZE.saturating_sub(2 + addr_bytes).min((PACKET_SIZE - 4) / 2);
        if asked <= room as u64 {
            return None;
        }
        let mut short = Vec::with_capacity(body.len());
        short.push(b'm');
        short.extend_from_slice(addr);
        short.extend_from_slice(format!(",{room:x}").as_bytes());
        Some(short)
    }
}

impl<C: ConnectionExt<Error = io::Error>> Connection for Wire<C> {
    type Error = io::Error;

    fn write(&mut self, byte: u8) -> io::Result<()> {
        self.inner.write(byte)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    fn on_session_start(&mut self) -> io::Result<()> {
        self.inner.on_session_start()
    }
}

impl<C: ConnectionExt<Error = io::Error>> ConnectionExt for Wire<C> {
    fn read(&mut self) -> io::Result<u8> {
        loop {
            if let Some(byte) = self.ready.pop_front() {
                return Ok(byte);
            }
            self.pump()?;
        }
    }

    /// A byte `gdbstub` would read next, if one is waiting here; the
    /// socket's next byte otherwise (which may yet be ignored).
    fn peek(&mut self) -> io::Result<Option<u8>> {
        match self.ready.front() {
            Some(&b) => Ok(Some(b)),
            None => self.inner.peek(),
        }
    }
}

impl<C: AsRawFd> AsRawFd for Wire<C> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection of bytes in, bytes out.
    #[derive(Default)]
    struct Bytes {
        input: VecDeque<u8>,
        output: Vec<u8>,
    }

    impl Connection for Bytes {
        type Error = io::Error;
        fn write(&mut self, byte: u8) -> io::Result<()> {
            self.output.push(byte);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ConnectionExt for Bytes {
        fn read(&mut self) -> io::Result<u8> {
            self.input
                .pop_front()
                .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
        }
        fn peek(&mut self) -> io::Result<Option<u8>> {
            Ok(self.input.front().copied())
        }
    }

    fn wire(input: &[u8]) -> Wire<Bytes> {
        let bytes = Bytes {
            input: input.iter().copied().collect(),
            output: Vec::new(),
        };
        Wire::new(bytes, vec![1, 2], Shared::default())
    }

    /// Everything `gdbstub` would read, until the input runs out.
    fn passed(w: &mut Wire<Bytes>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Ok(b) = w.read() {
            out.push(b);
        }
        out
    }

    #[test]
    fn bytes_outside_packets_never_reach_gdbstub() {
        // qC's checksum: 'q' + 'C' = 0x71 + 0x43 = 0xb4.
        let mut w = wire(b"\n+\x03garbage$qC#b4\r\n+\x03-");
        assert_eq!(passed(&mut w), b"$qC#b4+\x03-");
    }

    #[test]
    fn a_frame_with_a_wrong_checksum_is_not_a_first_packet() {
        let mut w = wire(b"$qC#00$qC#b4");
        assert_eq!(passed(&mut w), b"$qC#b4");
        assert!(w.started());
    }

    #[test]
    fn an_m_longer_than_one_chunk_is_cut_to_one() {
        // (4096 - 4) / 2 = 2046 = 0x7fe bytes: one reply of at most 4096.
        let mut w = wire(&framed(b"m1000,3000"));
        assert_eq!(passed(&mut w), framed(b"m1000,7fe"));
        let mut w = wire(&framed(b"m1000,7fe"));
        assert_eq!(passed(&mut w), framed(b"m1000,7fe"));
    }

    #[test]
    fn a_packet_longer_than_the_advertised_size_is_answered_e2big() {
        let mut input = framed(b"qC");
        input.extend(framed(&vec![b'q'; PACKET_SIZE]));
        input.extend(framed(b"qC"));
        let mut w = wire(&input);
        let mut twice = framed(b"qC");
        twice.extend(framed(b"qC"));
        assert_eq!(passed(&mut w), twice);
        assert_eq!(w.inner.output, b"+$E07#ac");
    }

    #[test]
    fn the_length_a_write_declares_is_kept_for_the_target() {
        let mut w = wire(&framed(b"M1000,1:aabbccdd"));
        passed(&mut w);
        assert_eq!(w.shared.lock().map(|d| d.write_len).ok(), Some(Some(1)));
        let mut w = wire(&framed(b"g"));
        passed(&mut w);
        assert_eq!(w.shared.lock().map(|d| d.write_len).ok(), Some(None));
    }

    #[test]
    fn extra_info_for_a_thread_that_does_not_exist_is_answered_here() {
        let mut input = Vec::new();
        for id in [&b"3e7"[..], b"0", b"-1", b"p1.2", b"x"] {
            input.extend(framed(&[&b"qThreadExtraInfo,"[..], id].concat()));
        }
        let mut w = wire(&input);
        assert_eq!(passed(&mut w), framed(b"qThreadExtraInfo,p1.2"));
        // 'E' + '1' + '6' = 0x45 + 0x31 + 0x36 = 0xac (as E07), four times.
        assert_eq!(w.inner.output, b"+$E16#ac".repeat(4));
    }
}
