//! The vCPU lifecycle on real /dev/kvm, with real threads: kicks out of an
//! endless guest loop, all-stop, per-vCPU resume actions, jobs on parked
//! vCPUs, and the bugs of issue #8 that this host's KVM can show (execute
//! breakpoints and single-step work everywhere; see HOST.md).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{guest, resume, Event};
use kvm_glue::guest::{self, Exit};
use kvm_glue::{
    Action, AddressSpace, BreakpointType, Handled, Kick, RunState, SignalKick, Stop, StopEvent, VcpuDebug, VcpuOps,
    VmDebug,
};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

const PHYS: AddressSpace<'static> = AddressSpace::Physical;
const T: Duration = Duration::from_secs(10);

type Dbg = VmDebug<GuestMemoryMmap>;

/// The VMM's loop, as a VMM writes it; returns at the routine's end.
fn vcpu_loop(
    mut h: VcpuDebug<GuestMemoryMmap>,
    vcpu: &mut VcpuFd,
    kick: &SignalKick,
    entered: &AtomicUsize,
) -> Result<u32, String> {
    let id = h.id();
    kick.prepare_vcpu_thread(id, vcpu).map_err(|e| e.to_string())?;
    let mut kicks = 0;
    loop {
        h.before_run(&*vcpu).map_err(|e| e.to_string())?;
        entered.fetch_add(1, Ordering::SeqCst);
        match guest::run_once(vcpu).map_err(|e| e.to_string())? {
            Exit::Interrupted => {
                kicks += 1;
                kick.drain().map_err(|e| e.to_string())?;
            }
            exit @ Exit::Debug { .. } => {
                let arch = exit.debug().ok_or("debug data")?;
                if let Handled::Stop(stop) = h.handle_exit(&*vcpu, &arch).map_err(|e| e.to_string())? {
                    h.report_stop(stop).map_err(|e| e.to_string())?;
                }
            }
            Exit::Out(guest::PORT_DONE, _) => return Ok(kicks),
            other => return Err(format!("vCPU {id}: unexpected exit {other:?}")),
        }
    }
}

fn regs(dbg: &Dbg, id: usize) -> kvm_bindings::kvm_regs {
    dbg.with_parked_vcpu(id, |v: &dyn VcpuOps| v.get_regs())
        .expect("parked")
        .expect("KVM_GET_REGS")
}

fn send_to_end(dbg: &Dbg, ids: &[usize]) {
    for &id in ids {
        dbg.with_parked_vcpu(id, |v: &dyn VcpuOps| -> Result<(), kvm_ioctls::Error> {
            let mut r = v.get_regs()?;
            r.rip = guest::STRAIGHT;
            v.set_regs(&r)
        })
        .expect("parked")
        .expect("KVM_SET_REGS");
    }
}

/// Runs `debugger` against two vCPU threads spinning in `LOOP`; every vCPU
/// must end by reaching PORT_DONE (the debugger sends them there).
/// How many times each vCPU thread was about to enter `KVM_RUN`.
type Entered = [AtomicUsize; 2];

fn with_two_spinning_vcpus(name: &str, debugger: impl FnOnce(&Dbg, &Entered)) -> Option<Vec<u32>> {
    let mut g = guest(name, 2)?;
    for id in 0..2 {
        g.start(id, guest::LOOP).expect("start");
    }
    let dbg = VmDebug::new(g.memory().clone());
    let kick = SignalKick::new(1).expect("SIGRTMIN+1 is free in a test binary");
    dbg.set_kick(kick.clone() as Arc<dyn Kick>).expect("set kick");
    let entered: Entered = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let kicks = std::thread::scope(|s| {
        let threads: Vec<_> = g
            .vcpus_mut()
            .iter_mut()
            .enumerate()
            .map(|(id, vcpu)| {
                // The handle is made before the thread starts, so stop_all
                // knows about this vCPU from the beginning.
                let (h, kick, entered) = (dbg.vcpu(id).expect("vCPU handle"), Arc::clone(&kick), &entered[id]);
                s.spawn(move || vcpu_loop(h, vcpu, &kick, entered))
            })
            .collect();
        debugger(&dbg, &entered);
        threads
            .into_iter()
            .map(|t| t.join().expect("vCPU thread").expect("vCPU loop"))
            .collect()
    });
    Some(kicks)
}

#[test]
fn stop_all_kicks_both_vcpus_out_of_an_endless_loop_and_holds_them() {
    let name = "stop_all";
    let Some(kicks) = with_two_spinning_vcpus(name, |dbg, entered| {
        // Both must be in the guest (or about to enter it) before the stop,
        // or one may park before it ever runs and need no kick.
        let start = std::time::Instant::now();
        while entered.iter().any(|e| e.load(Ordering::SeqCst) == 0) {
            assert!(start.elapsed() < T, "a vCPU thread never reached KVM_RUN");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(5));
        dbg.stop_all(T).expect("both park");
        for id in 0..2 {
            assert_eq!(dbg.run_state(id).expect("state"), RunState::Parked);
            let rip = regs(dbg, id).rip;
            assert!((guest::LOOP..guest::LOOP + 5).contains(&rip), "vCPU {id} at {rip:#x}");
        }
        // Held: a second look finds them where they were.
        let before: Vec<u64> = (0..2).map(|id| regs(dbg, id).rip).collect();
        std::thread::sleep(Duration::from_millis(20));
        let after: Vec<u64> = (0..2).map(|id| regs(dbg, id).rip).collect();
        assert_eq!(before, after, "parked vCPUs do not run");
        dbg.stop_all(T).expect("idempotent");
        send_to_end(dbg, &[0, 1]);
        dbg.resume_all().expect("resume");
    }) else {
        return;
    };
    assert!(
        kicks.iter().all(|&k| k >= 1),
        "each vCPU left KVM_RUN by a kick: {kicks:?}"
    );
    println!("{name}: checked two vCPUs kicked out of an endless loop (EINTR counts {kicks:?}), parked, held, resumed");
}

#[test]
fn an_execute_breakpoint_inserted_while_vcpus_run_reaches_them_by_a_kick() {
    let name = "insert_while_running";
    let Some(_) = with_two_spinning_vcpus(name, |dbg, _| {
        std::thread::sleep(Duration::from_millis(20));
        // No stop first: the running vCPUs must pick the change up.
        dbg.insert(PHYS, BreakpointType::Hardware, guest::LOOP, 1)
            .expect("insert");
        let stop = dbg
            .wait_stop(Some(T))
            .expect("wait")
            .expect("a vCPU stops at the breakpoint");
        dbg.stop_all(T).expect("all-stop");
        assert_eq!(stop.pc, guest::LOOP);
        assert!(
            matches!(stop.stop, Stop::Debug { single_step: false, hits } if hits.mask() == 1),
            "{stop:?}"
        );
        while dbg.try_take_stop().expect("take").is_some() {}
        dbg.remove_all().expect("remove");
        send_to_end(dbg, &[0, 1]);
        dbg.resume_all().expect("resume");
    }) else {
        return;
    };
    println!("{name}: checked a breakpoint inserted while both vCPUs spin stops one of them");
}

#[test]
fn a_step_of_one_vcpu_leaves_the_other_parked_and_composes_with_the_step_over() {
    let name = "step_one";
    let Some(_) = with_two_spinning_vcpus(name, |dbg, _| {
        let jmp = guest::LOOP + 3;
        dbg.stop_all(T).expect("stop");
        dbg.insert(PHYS, BreakpointType::Hardware, jmp, 1).expect("insert");
        dbg.resume_all().expect("resume");
        let first: StopEvent = dbg.wait_stop(Some(T)).expect("wait").expect("stop");
        dbg.stop_all(T).expect("all-stop");
        while dbg.try_take_stop().expect("take").is_some() {}
        assert_eq!(first.pc, jmp);
        let (id, other) = (first.vcpu, 1 - first.vcpu);
        let other_rip = regs(dbg, other).rip;
        for expected in [guest::LOOP, jmp] {
            dbg.resume(&[(id, Action::Step)]).expect("step");
            let step = dbg.wait_stop(Some(T)).expect("wait").expect("step stop");
            dbg.stop_all(T).expect("all-stop");
            assert_eq!(step.vcpu, id);
            assert_eq!(
                step.pc, expected,
                "one instruction per step, the breakpoint stepped over"
            );
            assert!(matches!(step.stop, Stop::Debug { single_step: true, .. }), "{step:?}");
        }
        assert_eq!(regs(dbg, other).rip, other_rip, "the other vCPU never ran");
        dbg.remove_all().expect("remove");
        dbg.set_single_step(id, false).expect("step off");
        send_to_end(dbg, &[0, 1]);
        dbg.resume_all().expect("resume");
    }) else {
        return;
    };
    println!(
        "{name}: checked stepi of one vCPU from an execute breakpoint: {:#x} then {:#x}, the other held",
        guest::LOOP,
        guest::LOOP + 3
    );
}

#[test]
fn detach_removes_everything_and_the_guest_runs_on() {
    let name = "detach";
    let Some(_) = with_two_spinning_vcpus(name, |dbg, _| {
        dbg.stop_all(T).expect("stop");
        dbg.insert(PHYS, BreakpointType::Hardware, guest::STRAIGHT_INSNS[3], 1)
            .expect("insert");
        dbg.set_single_step(0, true).expect("step");
        send_to_end(dbg, &[0, 1]);
        let report = dbg.detach().expect("detach");
        assert!(report.is_complete());
        // Both run STRAIGHT to its end with no stop: nothing left armed.
    }) else {
        return;
    };
    println!("{name}: checked detach leaves no breakpoint or step behind and releases every vCPU");
}

/// Bug 1 on real KVM: stop at an execute breakpoint, `step_over`, then ask
/// for a single step before running: one stop, at the next instruction.
#[test]
fn bug1_step_over_then_stepi_stops_at_the_next_instruction_on_kvm() {
    let name = "bug1_kvm";
    let Some(mut g) = guest(name, 1) else { return };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let a = guest::STRAIGHT_INSNS[2];
    dbg.insert(PHYS, BreakpointType::Hardware, a, 1).expect("insert");
    let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
        panic!("no stop")
    };
    assert_eq!(ev.pc, a);
    h.step_over();
    dbg.set_single_step(0, true).expect("stepi");
    let Event::Stop(step) = resume(&mut h, g.vcpu(0)) else {
        panic!("no step stop")
    };
    assert_eq!(step.pc, guest::STRAIGHT_INSNS[3], "not two instructions on");
    assert!(matches!(step.stop, Stop::Debug { single_step: true, .. }), "{step:?}");
    println!(
        "{name}: checked step_over + stepi stops once, at {:#x}",
        guest::STRAIGHT_INSNS[3]
    );
}

/// Bug 4 on real KVM: a debugger session ends without cleaning up (its
/// execute breakpoint is still armed in KVM); a new `VmDebug` with nothing
/// set must disarm it on its first sync, so the guest runs to its end.
#[test]
fn bug4_a_new_session_disarms_what_an_old_one_left_on_kvm() {
    let name = "bug4_kvm";
    let Some(mut g) = guest(name, 1) else { return };
    {
        let old = VmDebug::new(g.memory().clone());
        let mut h = old.vcpu(0).expect("vCPU handle");
        old.insert(PHYS, BreakpointType::Hardware, guest::STRAIGHT_INSNS[2], 1)
            .expect("insert");
        h.sync(&*g.vcpu(0)).expect("sync");
    }
    let new = VmDebug::new(g.memory().clone());
    let mut h = new.vcpu(0).expect("vCPU handle");
    assert_eq!(
        resume(&mut h, g.vcpu(0)),
        Event::Exit(Exit::Out(guest::PORT_DONE, 3)),
        "no stale stop, nothing re-injected"
    );
    println!("{name}: checked a fresh handle clears a stale armed breakpoint before the first run");
}
