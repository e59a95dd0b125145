//! The all-stop rules on fake vCPUs, one thread driving both sides where it
//! can (the real-thread versions are `kvm_lifecycle.rs` and `loom.rs`).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_glue::fake::FakeVcpu;
use kvm_glue::{Action, AddressSpace, BreakpointType, Error, Handled, Kick, RunState, StopEvent, VcpuDebug, VmDebug};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;

fn dbg() -> VmDebug<GuestMemoryMmap> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("mmap");
    VmDebug::new(mem)
}

fn exit(exception: u32, pc: u64, dr6: u64) -> kvm_debug_exit_arch {
    kvm_debug_exit_arch {
        exception,
        pad: 0,
        pc,
        dr6,
        dr7: 0,
    }
}

/// Decodes `exit` on `h` and posts the stop, as a vCPU thread does.
fn post(h: &mut VcpuDebug<GuestMemoryMmap>, f: &FakeVcpu, e: kvm_debug_exit_arch) -> StopEvent {
    let Handled::Stop(ev) = h.handle_exit(f, &e).expect("exit") else {
        panic!("not the debugger's: {e:?}")
    };
    h.report_stop(ev).expect("report");
    ev
}

/// A closure is a kick: record who was kicked.
fn recording_kick(dbg: &VmDebug<GuestMemoryMmap>) -> Arc<Mutex<Vec<usize>>> {
    let kicked = Arc::new(Mutex::new(Vec::new()));
    let k = Arc::clone(&kicked);
    let kick = move |v: usize| -> io::Result<()> {
        k.lock().map_err(|_| io::Error::other("poisoned"))?.push(v);
        Ok(())
    };
    dbg.set_kick(Arc::new(kick) as Arc<dyn Kick>).expect("set kick");
    kicked
}

#[test]
fn a_change_of_configuration_kicks_running_vcpus_and_marks_them_for_sync() {
    let dbg = dbg();
    let kicked = recording_kick(&dbg);
    let (mut h0, h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let f0 = FakeVcpu::new();
    h0.sync(&f0).expect("sync");
    assert!(!dbg.needs_sync(0).expect("needs"), "vCPU 0 is up to date");
    assert!(dbg.needs_sync(1).expect("needs"), "vCPU 1 never synced");
    dbg.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("insert");
    assert_eq!(*kicked.lock().expect("lock"), [0, 1], "both run: both kicked");
    assert!(dbg.needs_sync(0).expect("needs"));
    h0.sync(&f0).expect("sync");
    assert!(!dbg.needs_sync(0).expect("needs"));
    kicked.lock().expect("lock").clear();
    dbg.insert(PHYS, BreakpointType::Software, 0x200, 1).expect("insert");
    assert!(
        kicked.lock().expect("lock").is_empty(),
        "a second int3 changes memory, not the configuration: nobody kicked"
    );
    drop(h1);
}

#[test]
fn a_posted_stop_holds_every_vcpu_and_kicks_the_others() {
    let dbg = dbg();
    let kicked = recording_kick(&dbg);
    let (mut h0, _h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let f0 = FakeVcpu::new();
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h0.sync(&f0).expect("sync");
    kicked.lock().expect("lock").clear();
    let ev = post(&mut h0, &f0, exit(1, 0x1000, 0xffff_0ff1));
    assert_eq!(
        *kicked.lock().expect("lock"),
        [1],
        "the others are kicked, not the reporter"
    );
    assert_eq!(dbg.run_state(0).expect("state"), RunState::StopRequested);
    assert_eq!(dbg.run_state(1).expect("state"), RunState::StopRequested);
    assert_eq!(dbg.try_take_stop().expect("take"), Some(ev));
    assert_eq!(dbg.try_take_stop().expect("take"), None, "reported once");
}

#[test]
fn a_pending_stop_whose_breakpoint_was_removed_is_dropped_at_resume() {
    let dbg = dbg();
    let (mut h0, mut h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let (f0, f1) = (FakeVcpu::new(), FakeVcpu::new());
    dbg.insert(PHYS, BreakpointType::Software, 0x100, 1).expect("insert");
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h0.sync(&f0).expect("sync");
    h1.sync(&f1).expect("sync");
    let first = post(&mut h0, &f0, exit(1, 0x1000, 0xffff_0ff1));
    let _second = post(&mut h1, &f1, exit(3, 0x100, 0));
    assert_eq!(dbg.try_take_stop().expect("take"), Some(first));
    // The debugger removes the int3 vCPU 1 hit before resuming: its stop is
    // stale (RIP is at the int3, which now runs the original instruction).
    dbg.remove(PHYS, BreakpointType::Software, 0x100, 1).expect("remove");
    dbg.resume_all().expect("resume");
    assert_eq!(dbg.try_take_stop().expect("take"), None, "the stale stop is gone");
    assert_eq!(dbg.run_state(0).expect("state"), RunState::Running);
    assert_eq!(dbg.run_state(1).expect("state"), RunState::Running);
}

#[test]
fn a_pending_stop_still_valid_is_reported_before_anyone_runs() {
    let dbg = dbg();
    let (mut h0, mut h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let (f0, f1) = (FakeVcpu::new(), FakeVcpu::new());
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h0.sync(&f0).expect("sync");
    h1.sync(&f1).expect("sync");
    let first = post(&mut h0, &f0, exit(1, 0x1000, 0xffff_0ff1));
    let second = post(&mut h1, &f1, exit(1, 0x1000, 0xffff_0ff1));
    assert_eq!(dbg.try_take_stop().expect("take"), Some(first));
    dbg.resume(&[(0, Action::Step), (1, Action::Continue)]).expect("resume");
    assert_eq!(
        dbg.run_state(0).expect("state"),
        RunState::StopRequested,
        "nobody released"
    );
    assert_eq!(dbg.run_state(1).expect("state"), RunState::StopRequested);
    assert_eq!(dbg.try_take_stop().expect("take"), Some(second), "reported at once");
    dbg.resume_all().expect("resume");
    assert_eq!(dbg.run_state(1).expect("state"), RunState::Running);
}

#[test]
fn a_pending_single_step_is_dropped_when_the_vcpu_is_told_to_continue() {
    let dbg = dbg();
    let (mut h0, mut h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let (f0, f1) = (FakeVcpu::new(), FakeVcpu::new());
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    dbg.set_single_step(1, true).expect("step");
    h0.sync(&f0).expect("sync");
    h1.sync(&f1).expect("sync");
    let first = post(&mut h0, &f0, exit(1, 0x1000, 0xffff_0ff1));
    let _step = post(&mut h1, &f1, exit(1, 0x2000, 0xffff_4ff0));
    assert_eq!(dbg.try_take_stop().expect("take"), Some(first));
    dbg.resume(&[(0, Action::Continue), (1, Action::Continue)])
        .expect("resume");
    assert_eq!(
        dbg.try_take_stop().expect("take"),
        None,
        "the step is done; nobody asked for it now"
    );
    assert_eq!(dbg.run_state(1).expect("state"), RunState::Running);
}

#[test]
fn stop_all_names_the_vcpu_that_does_not_park() {
    let dbg = dbg();
    let _silent = dbg.vcpu(3).expect("vCPU handle"); // a thread that never reaches before_run
    let err = dbg.stop_all(Duration::from_millis(20)).expect_err("times out");
    assert!(matches!(err, Error::StopTimeout { vcpu: 3, .. }), "{err:?}");
    assert_eq!(dbg.run_state(3).expect("state"), RunState::StopRequested);
}

#[test]
fn jobs_need_a_parked_vcpu() {
    let dbg = dbg();
    let _h = dbg.vcpu(0).expect("vCPU handle");
    let err = dbg.with_parked_vcpu(0, |_| ()).expect_err("running");
    assert!(matches!(err, Error::NotParked { vcpu: 0 }), "{err:?}");
    let err = dbg.with_parked_vcpu(7, |_| ()).expect_err("no such vCPU");
    assert!(
        matches!(err, Error::Run(kvm_glue::RunError::UnknownVcpu { vcpu: 7, .. })),
        "{err:?}"
    );
}

#[test]
fn detach_drops_pending_stops_turns_stepping_off_and_releases_everyone() {
    let dbg = dbg();
    let (mut h0, _h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let f0 = FakeVcpu::new();
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    dbg.set_single_step(1, true).expect("step");
    h0.sync(&f0).expect("sync");
    post(&mut h0, &f0, exit(1, 0x1000, 0xffff_0ff1));
    dbg.detach().expect("detach");
    assert_eq!(dbg.try_take_stop().expect("take"), None);
    assert!(!dbg.single_step(1).expect("step"));
    assert!(dbg.watch_slots().expect("slots").is_empty());
    for id in 0..2 {
        assert_eq!(dbg.run_state(id).expect("state"), RunState::Running);
    }
}

#[test]
fn a_parked_vcpu_runs_jobs_on_its_own_thread_and_leaves_when_released() {
    let dbg = dbg();
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let fake = FakeVcpu::new();
    let mut regs = fake.regs();
    regs.rip = 0x4242;
    fake.put_regs(regs);
    let quit = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let q = Arc::clone(&quit);
    let t = std::thread::spawn(move || {
        let me = std::thread::current().id();
        // The vCPU loop, with "KVM_RUN" a short sleep.
        while !q.load(std::sync::atomic::Ordering::SeqCst) {
            h.before_run(&fake).expect("park, then sync");
            std::thread::sleep(Duration::from_millis(1));
        }
        (me, fake.regs().rax)
    });
    dbg.stop_all(Duration::from_secs(10)).expect("parks");
    let (rip, thread) = dbg
        .with_parked_vcpu(0, |v| {
            let mut r = v.get_regs().expect("regs");
            r.rax = 7;
            v.set_regs(&r).expect("set");
            (r.rip, std::thread::current().id())
        })
        .expect("job");
    assert_eq!(rip, 0x4242);
    quit.store(true, std::sync::atomic::Ordering::SeqCst);
    dbg.resume_all().expect("resume");
    let (vcpu_thread, rax) = t.join().expect("vCPU thread");
    assert_eq!(thread, vcpu_thread, "the job ran on the vCPU's thread");
    assert_eq!(rax, 7);
}

/// Whether `fd` is readable now (poll with no wait).
fn readable(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = [vmm_sys_util::epoll::EpollEvent::default(); 1];
    let ep = vmm_sys_util::epoll::Epoll::new().expect("epoll");
    ep.ctl(
        vmm_sys_util::epoll::ControlOperation::Add,
        fd,
        vmm_sys_util::epoll::EpollEvent::new(vmm_sys_util::epoll::EventSet::IN, 0),
    )
    .expect("epoll_ctl");
    ep.wait(0, &mut pfd).expect("epoll_wait") == 1
}

/// Issue #20: the stop descriptor announces a stop once its vCPU has
/// parked, so the debugger woken by it takes the stop and finds that vCPU
/// parked (its `stop_all` does not sleep a second time for it); and the
/// debugger's `stop_all` after the stop kicks only the vCPUs that may be
/// inside `KVM_RUN`, not the one that posted (EDGE.md §1: the kick would
/// stay pending and turn its next entry into an `EINTR`).
#[test]
fn a_posted_stop_is_announced_when_its_vcpu_parks_and_it_is_not_kicked() {
    let dbg = dbg();
    let kicked = recording_kick(&dbg);
    let (mut h0, h1) = (dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle"));
    let f0 = FakeVcpu::new();
    dbg.insert(PHYS, BreakpointType::Hardware, 0x1000, 1).expect("insert");
    h0.sync(&f0).expect("sync");
    kicked.lock().expect("lock").clear();
    let _ = post(&mut h0, &f0, exit(1, 0x1000, 0xffff_0ff1));
    assert!(!readable(dbg.stop_fd()), "vCPU 0 has not parked yet");
    assert!(dbg.try_take_stop().expect("take").is_some(), "posted all the same");
    kicked.lock().expect("lock").clear();
    assert!(matches!(dbg.stop_all(Duration::ZERO), Err(Error::StopTimeout { .. })));
    assert_eq!(*kicked.lock().expect("lock"), [1], "the poster is not kicked");
    assert_eq!(h0.poll_park(&f0).expect("park"), kvm_glue::vcpu_debug::Park::Held);
    assert!(readable(dbg.stop_fd()), "announced at the park");
    drop(h1);
    dbg.stop_all(Duration::ZERO).expect("vCPU 0 parked, vCPU 1 gone");
}
