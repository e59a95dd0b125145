//! Issue #18 item 2: "hold every vCPU until a debugger attaches" (QEMU's
//! `-S`), with fake vCPUs on their own threads. Held vCPUs park at their
//! first `before_run`, before any ioctl; the first debugger (`stop_all`,
//! `resume`) takes the hold over; a detach with no session, and a connection
//! that never sends a packet (`ServeEvent::NotGdb`), release nothing;
//! `release_hold` lets a VMM without a debugger run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_glue::fake::{FakeVcpu, Op};
use kvm_glue::{RunState, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Dbg = VmDebug<GuestMemoryMmap>;

fn vm() -> Dbg {
    VmDebug::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory"))
}

/// A vCPU thread that calls `before_run` once (its first) and records that
/// it got past it, and how many ioctls it had issued before.
fn first_entry(dbg: &Dbg, id: usize) -> (JoinHandle<usize>, Arc<AtomicBool>) {
    let mut h = dbg.vcpu(id).expect("handle");
    let entered = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&entered);
    let t = std::thread::spawn(move || {
        let fake = FakeVcpu::new();
        h.before_run(&fake).expect("before_run");
        flag.store(true, Ordering::Release);
        // Past the park: before_run's sync is the first ioctl.
        fake.count(Op::SetGuestDebug)
    });
    (t, entered)
}

fn wait_parked(dbg: &Dbg, id: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while dbg.run_state(id).expect("state") != RunState::Parked {
        assert!(Instant::now() < deadline, "vCPU {id} did not park");
        std::thread::yield_now();
    }
}

#[test]
fn held_vcpus_park_at_their_first_before_run_until_a_debugger_attaches() {
    let dbg = vm();
    dbg.hold_until_attached().expect("hold");
    let (t0, e0) = first_entry(&dbg, 0);
    let (t1, e1) = first_entry(&dbg, 1); // registered after the hold: held too
    wait_parked(&dbg, 0);
    wait_parked(&dbg, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !e0.load(Ordering::Acquire) && !e1.load(Ordering::Acquire),
        "nobody entered the guest"
    );
    assert!(dbg.holding_until_attached().expect("state"));

    // The debugger attaches: its stop_all finds everyone parked already, and
    // takes the hold over.
    dbg.stop_all(Duration::from_secs(5)).expect("stop_all");
    assert!(!dbg.holding_until_attached().expect("state"));
    assert!(
        !dbg.release_hold().expect("release"),
        "a debugger's stop is not the VMM's to release"
    );
    assert_eq!(dbg.run_state(0).expect("state"), RunState::Parked);
    dbg.resume_all().expect("resume");
    assert_eq!(t0.join().expect("vcpu 0"), 1, "one KVM_SET_GUEST_DEBUG, after the park");
    assert_eq!(t1.join().expect("vcpu 1"), 1);
}

#[test]
fn a_detach_with_no_session_keeps_the_hold_and_release_hold_ends_it() {
    let dbg = vm();
    dbg.hold_until_attached().expect("hold");
    let (t, entered) = first_entry(&dbg, 0);
    wait_parked(&dbg, 0);
    // What the GDB server does with a stray stop and no debugger.
    dbg.detach().expect("detach");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!entered.load(Ordering::Acquire), "a detach released the hold");
    assert_eq!(dbg.run_state(0).expect("state"), RunState::Parked);

    // A VMM that serves no debugger after all.
    assert!(dbg.release_hold().expect("release"));
    assert_eq!(t.join().expect("vcpu 0"), 1);
    assert!(!dbg.holding_until_attached().expect("state"));
    assert!(!dbg.release_hold().expect("release"), "nothing left to release");
}

#[test]
fn a_debugger_resume_takes_the_hold_over() {
    let dbg = vm();
    dbg.hold_until_attached().expect("hold");
    let (t, _) = first_entry(&dbg, 0);
    wait_parked(&dbg, 0);
    dbg.resume(&[(0, kvm_glue::Action::Continue)]).expect("resume");
    assert_eq!(t.join().expect("vcpu 0"), 1);
    assert!(!dbg.holding_until_attached().expect("state"));
}

#[cfg(feature = "gdb")]
#[test]
fn a_connection_that_never_sends_a_packet_releases_no_hold() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use kvm_glue::gdb::{serve_connection, HostDebug, Options, Peer, ServeEvent};

    let dbg = vm();
    dbg.hold_until_attached().expect("hold");
    let (t, entered) = first_entry(&dbg, 0);
    wait_parked(&dbg, 0);
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    theirs.write_all(b"++-").expect("acks, no packet");
    drop(theirs);
    let options = Options {
        stop_timeout: Duration::from_secs(5),
        host: Some(HostDebug::full("simulated vCPUs")),
        ..Options::default()
    };
    let mut events = Vec::new();
    let served = serve_connection(ours, Peer::Stream("test".into()), &dbg, &options, |e| {
        events.push(matches!(e, ServeEvent::NotGdb(_)));
    })
    .expect("served");
    assert_eq!(served, None);
    assert_eq!(events, [true], "one NotGdb event");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!entered.load(Ordering::Acquire), "the hold was released");
    assert!(dbg.holding_until_attached().expect("state"));
    assert!(dbg.release_hold().expect("release"));
    assert_eq!(t.join().expect("vcpu 0"), 1);
}
