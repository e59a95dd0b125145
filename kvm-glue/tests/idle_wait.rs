//! The halted vCPU's wait ([`kvm_glue::idle`], issue #20) on fake vCPUs:
//! a VMM without an in-kernel irqchip waits outside `KVM_RUN` after a `hlt`
//! exit, and what would kick a running vCPU (a stop, an intent change, a
//! detach) or the VMM's own waker must end that wait at once, with its
//! reason — also when it came before the wait (no lost wake-up).
//!
//! No timing is asserted. A wait that must be ended by the event has no
//! timeout of its own (a timed-out wait re-checks, and would answer the right
//! reason late); the test thread waits for its answer with a generous
//! timeout as a hang guard only, so a lost wake-up fails the test. The event
//! comes a moment after the vCPU thread starts waiting (a short untimed
//! pause); before the wait is the other case, tested on its own. The real-KVM
//! version is `kvm_idle.rs`; the races are model-checked in `loom.rs`.

use std::sync::mpsc;
use std::time::Duration;

use kvm_glue::fake::FakeVcpu;
use kvm_glue::{AddressSpace, BreakpointType, Error, RunError, RunState, VcpuDebug, VmDebug, Woke};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Only a guard against hanging: every wait below ends long before.
const GUARD: Duration = Duration::from_secs(60);
/// "Nothing woke it": a wait that must time out (it is the expected answer,
/// not a bound on anything).
const QUIET: Duration = Duration::from_millis(50);

fn dbg() -> VmDebug<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mmap");
    VmDebug::new(mem)
}

/// vCPU `id`'s handle, synced as before the `KVM_RUN` that ended in `hlt`.
fn halted(dbg: &VmDebug<GuestMemoryMmap>, id: usize, fake: &FakeVcpu) -> VcpuDebug<GuestMemoryMmap> {
    let mut h = dbg.vcpu(id).expect("vCPU handle");
    h.before_run(fake).expect("before_run");
    h
}

/// Lets the vCPU thread enter its wait before the event comes (either order
/// must work; this makes "during the wait" the likely one). Not a bound.
fn let_it_wait() {
    std::thread::sleep(Duration::from_millis(20));
}

/// A thread that halts vCPU `id` and waits (no timeout), then runs `after`
/// with the handle and the reason, and sends the reason back.
fn waiting_vcpu<T: Send + 'static>(
    dbg: &VmDebug<GuestMemoryMmap>,
    id: usize,
    after: impl FnOnce(&mut VcpuDebug<GuestMemoryMmap>, &FakeVcpu, Woke) -> T + Send + 'static,
) -> mpsc::Receiver<(Woke, T)> {
    let (tx, rx) = mpsc::channel();
    let dbg = dbg.clone();
    std::thread::spawn(move || {
        let fake = FakeVcpu::new();
        let mut h = halted(&dbg, id, &fake);
        let woke = h.wait_idle(None).expect("wait");
        let out = after(&mut h, &fake, woke);
        let _ = tx.send((woke, out));
    });
    rx
}

/// All-stop (EDGE.md §2): a stop request must reach a vCPU that waits
/// after `hlt` — the wait ends with `Woke::Stop`, `before_run` parks, and
/// `stop_all` returns (it waits for every vCPU to park).
#[test]
fn a_stop_request_ends_a_halted_vcpus_wait_and_it_parks() {
    let dbg = dbg();
    let rx = waiting_vcpu(&dbg, 0, |h, fake, woke| {
        if woke == Woke::Stop {
            h.before_run(fake).expect("park, then run on when released");
        }
    });
    let_it_wait();
    dbg.stop_all(GUARD).expect("the halted vCPU parks");
    assert_eq!(dbg.run_state(0).expect("state"), RunState::Parked);
    dbg.resume_all().expect("resume");
    assert_eq!(rx.recv_timeout(GUARD).expect("the wait ended").0, Woke::Stop);
}

/// No lost wake-up: a stop asked for after the `hlt` exit but before the
/// wait began ends the wait at once.
#[test]
fn a_stop_requested_before_the_wait_is_not_lost() {
    let dbg = dbg();
    let fake = FakeVcpu::new();
    let mut h = halted(&dbg, 0, &fake);
    let stopper = {
        let dbg = dbg.clone();
        std::thread::spawn(move || dbg.stop_all(GUARD))
    };
    while dbg.run_state(0).expect("state") != RunState::StopRequested {
        std::thread::yield_now();
    }
    assert_eq!(h.wait_idle(Some(GUARD)).expect("wait"), Woke::Stop);
    // before_run parks; a helper releases it once stop_all is through.
    let releaser = {
        let dbg = dbg.clone();
        std::thread::spawn(move || {
            stopper.join().expect("stopper").expect("stop_all");
            dbg.resume_all()
        })
    };
    h.before_run(&fake).expect("park and release");
    releaser.join().expect("releaser").expect("resume");
    // Dealt with: the next wait has nothing to answer.
    assert_eq!(h.wait_idle(Some(QUIET)).expect("wait"), Woke::TimedOut);
}

/// The VMM's own reason (an interrupt source) ends the wait, from another
/// thread, while the vCPU waits.
#[test]
fn the_vmms_wake_ends_the_wait() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
    // Declared up front: a device may hold a waker before the vCPU thread runs.
    let dbg = VmDebug::with_vcpus(mem, 1).expect("one vCPU");
    let irq = dbg.idle_waker(0).expect("waker");
    assert_eq!(irq.vcpu(), 0);
    let rx = waiting_vcpu(&dbg, 0, |h, _, _| h.idle_waker().vcpu());
    let_it_wait();
    irq.wake().expect("wake");
    assert_eq!(rx.recv_timeout(GUARD).expect("the wait ended"), (Woke::Vmm, 0));
}

/// A wake posted while the vCPU was not waiting (still in `KVM_RUN`, or
/// between the exit and the wait) is kept, once: it ends the next wait at
/// once, and only that one.
#[test]
fn a_vmm_wake_posted_before_the_wait_is_not_lost_and_counts_once() {
    let dbg = dbg();
    let fake = FakeVcpu::new();
    let h = halted(&dbg, 0, &fake);
    let irq = dbg.idle_waker(0).expect("waker");
    irq.wake().expect("wake");
    irq.clone().wake().expect("wake again");
    assert_eq!(h.wait_idle(Some(GUARD)).expect("wait"), Woke::Vmm);
    assert_eq!(h.wait_idle(Some(QUIET)).expect("wait"), Woke::TimedOut);
}

/// A changed intent (EDGE.md §1: "publish, then kick") reaches a halted
/// vCPU: a breakpoint inserted while it waits ends the wait with
/// `Woke::Intent`; `before_run` applies it and the next wait blocks.
#[test]
fn an_intent_change_ends_the_wait_and_before_run_applies_it() {
    let dbg = dbg();
    let rx = waiting_vcpu(&dbg, 0, |h, fake, _| {
        h.before_run(fake).expect("apply");
        let dr0 = fake.guest_debug().map(|g| g.arch.debugreg[0]);
        (dr0, h.wait_idle(Some(QUIET)).expect("wait"))
    });
    let_it_wait();
    dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, 0x1234, 1)
        .expect("insert");
    let (first, (dr0, second)) = rx.recv_timeout(GUARD).expect("the wait ended");
    assert_eq!(first, Woke::Intent);
    assert_eq!(dr0, Some(0x1234), "before_run applied the breakpoint");
    assert_eq!(second, Woke::TimedOut, "applied: nothing left to answer");
}

/// A session ending (detach) reaches a halted vCPU too.
#[test]
fn a_detach_ends_the_wait() {
    let dbg = dbg();
    let rx = waiting_vcpu(&dbg, 0, |_, _, _| ());
    let_it_wait();
    dbg.detach().expect("detach");
    assert_eq!(rx.recv_timeout(GUARD).expect("the wait ended").0, Woke::Intent);
}

/// The debugger first: with a stop asked for and a VMM wake pending, the
/// wait says `Stop`, and the VMM's wake is still there after the park.
#[test]
fn a_stop_is_answered_before_a_vmm_wake_and_the_wake_is_kept() {
    let dbg = dbg();
    let fake = FakeVcpu::new();
    let mut h = halted(&dbg, 0, &fake);
    h.idle_waker().wake().expect("wake");
    let stopper = {
        let dbg = dbg.clone();
        std::thread::spawn(move || {
            dbg.stop_all(GUARD)?;
            dbg.resume_all()
        })
    };
    while dbg.run_state(0).expect("state") != RunState::StopRequested {
        std::thread::yield_now();
    }
    assert_eq!(h.wait_idle(Some(GUARD)).expect("wait"), Woke::Stop);
    h.before_run(&fake).expect("park and release");
    stopper.join().expect("stopper").expect("stop and resume");
    assert_eq!(h.wait_idle(Some(GUARD)).expect("wait"), Woke::Vmm);
}

/// Typed errors: a waker for a vCPU the VM does not have is refused.
#[test]
fn a_waker_for_an_unknown_vcpu_is_a_run_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("mmap");
    let dbg = VmDebug::with_vcpus(mem, 1).expect("one vCPU");
    match dbg.idle_waker(3) {
        Err(Error::Run(RunError::UnknownVcpu { vcpu: 3, .. })) => {}
        other => panic!("expected UnknownVcpu, got {other:?}"),
    }
}

/// Counts each vCPU's kicks.
fn counting_kicks(dbg: &VmDebug<GuestMemoryMmap>) -> std::sync::Arc<[std::sync::atomic::AtomicUsize; 2]> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let kicks: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let counted = Arc::clone(&kicks);
    dbg.set_kick(Arc::new(move |id: usize| {
        counted[id].fetch_add(1, Ordering::AcqRel);
        Ok(())
    }) as Arc<dyn kvm_glue::Kick>)
        .expect("set kick");
    kicks
}

/// A vCPU waiting after `hlt` is outside `KVM_RUN`: a kick cannot reach it
/// there (what would kick it ends its wait instead), so it is not kicked.
/// A `SignalKick`'s real-time signal sent to it would stay queued, one
/// more per stop, until the queue was full and the next kick failed with
/// `EAGAIN`, ending the GDB session (the `gdb_path` bench hit it after
/// about 96,000 stops with vCPU 1 halted).
#[test]
fn a_vcpu_waiting_after_hlt_is_not_kicked() {
    use std::sync::atomic::Ordering;
    let dbg = dbg();
    let kicks = counting_kicks(&dbg);
    const STOPS: usize = 5;
    let (tx, rx) = mpsc::channel();
    // Each wait is announced just before it starts: a stop that came
    // before it would find the vCPU maybe in KVM_RUN, and rightly kick it.
    let (waits_tx, waits) = mpsc::channel();
    let dbg0 = dbg.clone();
    std::thread::spawn(move || {
        let fake = FakeVcpu::new();
        let mut h = halted(&dbg0, 0, &fake);
        for _ in 0..STOPS {
            let _ = waits_tx.send(());
            let woke = h.wait_idle(None).expect("wait");
            assert_eq!(woke, Woke::Stop);
            h.before_run(&fake).expect("park, then back to the wait when released");
        }
        let _ = tx.send(());
    });
    for _ in 0..STOPS {
        waits.recv_timeout(GUARD).expect("vCPU 0 waits again");
        let_it_wait();
        dbg.stop_all(GUARD).expect("the waiting vCPU parks");
        dbg.resume_all().expect("resume");
    }
    rx.recv_timeout(GUARD).expect("vCPU 0 saw every stop");
    assert_eq!(kicks[0].load(Ordering::Acquire), 0, "the waiting vCPU was kicked");
}

/// The other side of the rule above: a vCPU that is not waiting after
/// `hlt` may be in `KVM_RUN`, and a stop kicks it.
#[test]
fn a_vcpu_that_may_be_in_kvm_run_is_kicked() {
    use std::sync::atomic::Ordering;
    let dbg = dbg();
    let kicks = counting_kicks(&dbg);
    let fake = FakeVcpu::new();
    // Synced, then (as far as kvm-glue knows) in KVM_RUN: it never parks.
    let _h = halted(&dbg, 0, &fake);
    assert!(
        dbg.stop_all(QUIET).is_err(),
        "a vCPU that never parks times the stop out"
    );
    assert_eq!(kicks[0].load(Ordering::Acquire), 1, "kicked once by the stop");
}
