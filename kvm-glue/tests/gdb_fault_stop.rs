//! Issue #18 item 3 over the GDB wire: a vCPU's fault reaches GDB as a stop
//! with a signal (QEMU's: SIGQUIT, 3, for a shutdown / triple fault), its
//! registers readable, and a `continue` is refused (`E01`, EPERM) instead
//! of running a vCPU that cannot run on; after GDB detaches, the vCPU's
//! `before_run` says it faulted and the VMM decides.
#![cfg(feature = "gdb")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use kvm_glue::fake::FakeVcpu;
use kvm_glue::gdb::{serve_connection, HostDebug, Options, Peer};
use kvm_glue::{Error, Fault, RunError, VcpuOps, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RIP: u64 = 0x1234;

fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Sends `body`, returns the reply's body (acks skipped).
fn ask(s: &mut UnixStream, body: &str) -> String {
    s.write_all(&packet(body)).expect("write");
    let mut reply = Vec::new();
    let mut b = [0u8];
    loop {
        s.read_exact(&mut b).expect("a reply");
        match b[0] {
            b'+' if reply.is_empty() => {}
            b'$' => reply.clear(),
            b'#' => break,
            c => reply.push(c),
        }
    }
    let mut sum = [0u8; 2];
    s.read_exact(&mut sum).expect("checksum");
    let _ = s.write_all(b"+"); // after `D` the server may have closed
    String::from_utf8_lossy(&reply).into_owned()
}

/// Undoes the RSP's run-length encoding: `X*N` is X and N - 29 more.
fn unrle(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '*' {
            let n = it.next().map_or(0, |n| n as usize - 29);
            let last = out.chars().last().unwrap_or('0');
            out.extend(std::iter::repeat_n(last, n));
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn gdb_sees_a_triple_fault_as_sigquit_and_its_continue_is_refused() {
    let dbg = VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).expect("memory"));
    dbg.hold_until_attached().expect("hold");
    let mut h = dbg.vcpu(0).expect("handle");
    let vcpu_thread = std::thread::spawn(move || {
        let fake = FakeVcpu::new();
        let regs = kvm_bindings::kvm_regs {
            rip: RIP,
            rflags: 2,
            ..Default::default()
        };
        fake.set_regs(&regs).expect("regs");
        h.before_run(&fake).expect("held until GDB continues");
        // "KVM_RUN" ended in KVM_EXIT_SHUTDOWN.
        h.report_fault(&fake, Fault::Shutdown).expect("report");
        h.before_run(&fake).expect_err("cannot run on")
    });
    let (ours, mut gdb) = UnixStream::pair().expect("socketpair");
    gdb.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let server = {
        let dbg = dbg.clone();
        std::thread::spawn(move || {
            let options = Options {
                stop_timeout: Duration::from_secs(5),
                host: Some(HostDebug::full("a fake vCPU")),
                ..Options::default()
            };
            serve_connection(ours, Peer::Stream("test".into()), &dbg, &options, |_| {})
        })
    };
    assert!(ask(&mut gdb, "?").starts_with("T05"), "stopped at attach");
    let stop = ask(&mut gdb, "vCont;c");
    assert!(stop.starts_with("T03"), "a shutdown is SIGQUIT (3): {stop:?}");
    // The registers at the fault: rip is register 16 of the g packet.
    let g = unrle(&ask(&mut gdb, "g"));
    let rip_hex: String = RIP.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(&g[16 * 16..17 * 16], rip_hex, "rip in the g packet");
    assert_eq!(ask(&mut gdb, "vCont;c"), "E01", "a faulted vCPU is not resumed");
    // Still stopped there: the registers read the same.
    assert_eq!(&unrle(&ask(&mut gdb, "g"))[16 * 16..17 * 16], rip_hex);
    assert_eq!(ask(&mut gdb, "D"), "OK");
    drop(gdb);
    let err = vcpu_thread.join().expect("vCPU thread");
    assert!(
        matches!(
            err,
            Error::Run(RunError::Faulted {
                vcpu: 0,
                fault: Fault::Shutdown
            })
        ),
        "{err}"
    );
    let _ = server.join().expect("server thread");
}
