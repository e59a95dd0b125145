//! `serve_stream` without KVM: GDB's remote protocol over a byte stream
//! (a socket pair standing in for a serial line or a pty), one simulated
//! vCPU that parks when asked. `gdb_real_guest.rs` drives the real gdb over
//! a pty against the `elf_vmm` example.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_glue::fake::FakeVcpu;
use kvm_glue::gdb::{serve_stream, GdbError, HostDebug, Options, Peer, ServeEvent, SessionEnd};
use kvm_glue::VmDebug;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// What `serve_stream` reported, in order, as text.
type Events = Arc<Mutex<Vec<String>>>;

/// What one serving reported.
struct Served {
    result: Result<u8, GdbError>,
    events: Vec<String>,
    /// The CPU time the serving thread used, all of it.
    cpu: Duration,
}

/// The CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    // SAFETY: `rusage` is plain old data, zeroed is a valid value, and
    // getrusage writes only the one struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_THREAD reports the calling thread.
    let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Serves `stream` on a thread with one simulated vCPU; returns what
/// serving returned, the events it reported and the CPU time it took.
fn serve_with_one_vcpu(stream: UnixStream, drive: impl FnOnce()) -> Served {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let dbg = VmDebug::new(mem);
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let done = Arc::new(AtomicBool::new(false));
    let vcpu_thread = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let fake = FakeVcpu::new();
            // The VMM loop's first half: park when the debugger holds us.
            while !done.load(Ordering::Acquire) {
                h.before_run(&fake).expect("before_run");
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let events: Events = Arc::default();
    let server = {
        let (dbg, events) = (dbg.clone(), Arc::clone(&events));
        std::thread::spawn(move || {
            let options = Options {
                stop_timeout: Duration::from_secs(5),
                host: Some(HostDebug::full("simulated vCPUs")),
                ..Options::default()
            };
            let served = serve_stream(&stream, "test-serial", &dbg, &options, |e: &ServeEvent| {
                let line = match e {
                    ServeEvent::Connected(Peer::Stream(name)) => format!("connected {name}"),
                    ServeEvent::Connected(other) => format!("connected from a non-stream {other}"),
                    ServeEvent::Ended(SessionEnd::ConnectionLost(_)) => "lost".to_string(),
                    ServeEvent::Ended(other) => format!("ended {other:?}"),
                    ServeEvent::NotGdb(peer) => format!("not gdb {peer}"),
                };
                events.lock().expect("events").push(line);
            });
            (served, thread_cpu())
        })
    };
    drive();
    let (result, cpu) = server.join().expect("the server thread panicked");
    done.store(true, Ordering::Release);
    // Serving ended with a detach: the vCPU is released and sees `done`.
    vcpu_thread.join().expect("the vCPU thread panicked");
    let events = events.lock().expect("events").clone();
    Served { result, events, cpu }
}

#[test]
fn a_stray_ack_on_a_stream_starts_no_session_and_end_of_file_ends_serving() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let Served {
        result: served, events, ..
    } = serve_with_one_vcpu(ours, move || {
        let mut theirs = theirs;
        // What a debugger that detached may still send: acks.
        theirs.write_all(b"++-").expect("write");
        std::thread::sleep(Duration::from_millis(100));
        drop(theirs); // end of file
    });
    assert!(events.is_empty(), "no session should start: {events:?}");
    assert!(
        matches!(&served, Err(GdbError::StreamClosed { name, .. }) if name == "test-serial"),
        "{served:?}"
    );
}

#[test]
fn a_packet_on_a_stream_starts_a_session_that_answers_on_the_stream() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let reply = Arc::new(Mutex::new(Vec::new()));
    let got = Arc::clone(&reply);
    let Served {
        result: served, events, ..
    } = serve_with_one_vcpu(ours, move || {
        let mut theirs = theirs;
        // `?`: why did the target stop (checksum 0x3f).
        theirs.write_all(b"$?#3f").expect("write");
        theirs.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = Vec::new();
        let mut b = [0u8];
        // "+" (the ack), then "$T05thread:p01.01;#xx" or similar: read to '#' + 2.
        while !buf.ends_with(b"#") {
            theirs.read_exact(&mut b).expect("a reply");
            buf.push(b[0]);
        }
        let mut sum = [0u8; 2];
        theirs.read_exact(&mut sum).expect("checksum");
        *got.lock().expect("reply") = buf;
        drop(theirs);
    });
    let reply = String::from_utf8_lossy(&reply.lock().expect("reply")).into_owned();
    assert!(reply.starts_with("+$T05"), "a SIGTRAP stop with a thread: {reply:?}");
    assert!(reply.contains("thread:"), "{reply:?}");
    assert_eq!(events, ["connected test-serial", "lost"]);
    assert!(matches!(&served, Err(GdbError::StreamClosed { .. })), "{served:?}");
}

/// Reads one reply (`$…#xx`, after any acks) from `s`; its body.
fn reply(s: &mut UnixStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = [0u8];
    while !buf.ends_with(b"#") {
        s.read_exact(&mut b).expect("a reply");
        buf.push(b[0]);
    }
    let mut sum = [0u8; 2];
    s.read_exact(&mut sum).expect("checksum");
    let start = buf.iter().position(|&c| c == b'$').expect("a packet") + 1;
    buf[start..buf.len() - 1].to_vec()
}

fn send(s: &mut UnixStream, body: &[u8]) {
    let sum = body.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    s.write_all(&[b"$", body, format!("#{sum:02x}").as_bytes()].concat())
        .expect("write");
}

/// The session's busy-polling (`Options::busy_poll`) is bounded: while the
/// guest runs freely the serving thread sleeps, so half a second of a
/// continued guest costs it next to no CPU time. A loop that polled for as
/// long as the guest runs (firecracker's, cloud-hypervisor's) would use
/// all of that half second.
#[test]
fn the_session_sleeps_while_the_guest_runs_freely() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    const RUN: Duration = Duration::from_millis(500);
    let stop = Arc::new(Mutex::new(Vec::new()));
    let got = Arc::clone(&stop);
    let served = serve_with_one_vcpu(ours, move || {
        let mut theirs = theirs;
        theirs.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        send(&mut theirs, b"QStartNoAckMode");
        assert_eq!(reply(&mut theirs), b"OK");
        send(&mut theirs, b"vCont;c");
        std::thread::sleep(RUN);
        theirs.write_all(&[0x03]).expect("Ctrl-C");
        *got.lock().expect("stop") = reply(&mut theirs);
        send(&mut theirs, b"D");
        assert_eq!(reply(&mut theirs), b"OK");
    });
    let stop = String::from_utf8_lossy(&stop.lock().expect("stop")).into_owned();
    assert!(stop.starts_with("T02"), "Ctrl-C stops the guest: {stop:?}");
    assert!(
        served.events.iter().any(|e| e.starts_with("ended Detached")),
        "{:?}",
        served.events
    );
    // A fifth of the run: the whole session's packets and polling windows
    // take a few milliseconds.
    assert!(
        served.cpu < RUN / 5,
        "the serving thread used {:?} of CPU over a {RUN:?} run",
        served.cpu
    );
    println!("serving thread CPU over a {RUN:?} run: {:?}", served.cpu);
}
