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

/// Serves `stream` on a thread with one simulated vCPU; returns what
/// serving returned and the events it reported.
fn serve_with_one_vcpu(stream: UnixStream, drive: impl FnOnce()) -> (Result<u8, GdbError>, Vec<String>) {
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
            serve_stream(&stream, "test-serial", &dbg, &options, |e: &ServeEvent| {
                let line = match e {
                    ServeEvent::Connected(Peer::Stream(name)) => format!("connected {name}"),
                    ServeEvent::Connected(other) => format!("connected from a non-stream {other}"),
                    ServeEvent::Ended(SessionEnd::ConnectionLost(_)) => "lost".to_string(),
                    ServeEvent::Ended(other) => format!("ended {other:?}"),
                    ServeEvent::NotGdb(peer) => format!("not gdb {peer}"),
                };
                events.lock().expect("events").push(line);
            })
        })
    };
    drive();
    let served = server.join().expect("the server thread panicked");
    done.store(true, Ordering::Release);
    // Serving ended with a detach: the vCPU is released and sees `done`.
    vcpu_thread.join().expect("the vCPU thread panicked");
    let events = events.lock().expect("events").clone();
    (served, events)
}

#[test]
fn a_stray_ack_on_a_stream_starts_no_session_and_end_of_file_ends_serving() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (served, events) = serve_with_one_vcpu(ours, move || {
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
    let (served, events) = serve_with_one_vcpu(ours, move || {
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
