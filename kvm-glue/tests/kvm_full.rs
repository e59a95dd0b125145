//! kvm-glue on a real /dev/kvm, for the paths only a full KVM reaches:
//! software breakpoints end to end, data watchpoints of every length, two
//! vCPUs on one `int3`, RFLAGS.RF resume.
//!
//! Where KVM emulates guest code (`kvm_pvm`, our machines' /dev/kvm) none of
//! these work, and each test prints one `<check>: SKIPPED: <why>` line and
//! checks nothing; `.ci/nested-kvm` runs the same binary on `kvm_amd` nested
//! in QEMU/TCG, where they run. A test skips only on the probe's word
//! ([`kvm_glue::probe`]), or when /dev/kvm is missing and
//! `KVM_GLUE_REQUIRE_KVM` is unset, so a check the probe says this host can
//! do always runs.
//!
//! The kvm-glue API used is `VmDebug::{new, vcpu, insert, remove}`,
//! `VcpuDebug::{sync, handle_exit, step_over}`, the tiny guest and the probe
//! (through `common`, shared with the other real-KVM tests). A step-over is
//! asked for with `step_over()` and armed by the next `sync`.

mod common;

use common::{guest_for, probe};
use kvm_glue::guest::{self, Exit, Guest};
use kvm_glue::probe::{Finding, Probe};
use kvm_glue::{AddressSpace, Handled, Insert, Resume, StepOver, StopEvent, VcpuDebug, VmDebug};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86_debugreg::{BreakpointType, Hit, HwBreakpoint, HwKind, Slot, Stop};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;
/// What `mov eax, 0x1234; inc eax; out 0x10, al` leaves in `al`: the software
/// breakpoint routine ran its original instruction.
const SW_DONE: Exit = Exit::Out(guest::PORT_DONE, 0x35);
const INT3: u8 = 0xCC;

/// What a resumed vCPU came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Stop(StopEvent),
    Exit(Exit),
}

/// `sync`, `KVM_RUN`, `handle_exit`, repeated while the answer is "run again".
fn resume(h: &mut VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd) -> Event {
    for _ in 0..64 {
        h.sync(&*vcpu).expect("sync");
        let exit = guest::run_once(vcpu).expect("KVM_RUN");
        let Some(arch) = exit.debug() else {
            return Event::Exit(exit);
        };
        match h.handle_exit(&*vcpu, &arch).expect("handle_exit") {
            Handled::Stop(ev) => return Event::Stop(ev),
            Handled::Resume(_) => continue,
        }
    }
    panic!("64 debug exits in a row without a stop");
}

/// Resumes until the routine's `out` to PORT_DONE, collecting every stop and
/// stepping over each (a no-op after a watchpoint).
fn stops_until_done(h: &mut VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd) -> Vec<StopEvent> {
    let mut stops = Vec::new();
    for _ in 0..32 {
        match resume(h, vcpu) {
            Event::Stop(ev) => {
                stops.push(ev);
                h.step_over();
            }
            Event::Exit(Exit::Out(guest::PORT_DONE, _)) => return stops,
            Event::Exit(other) => panic!("unexpected exit {other:?} after stops {stops:x?}"),
        }
    }
    panic!("no end after 32 stops: {stops:x?}");
}

/// The guest's code page, byte for byte.
fn code_page(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut buf = vec![0u8; 0x1000];
    mem.read_slice(&mut buf, GuestAddress(guest::CODE))
        .expect("read the code page");
    buf
}

fn byte_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).expect("read guest memory")
}

fn hit(slot: u8, kind: HwKind, addr: u64, len: u64) -> Hit {
    Hit {
        slot: Slot::new(slot).expect("slot"),
        breakpoint: HwBreakpoint::new(kind, addr, len).expect("valid breakpoint"),
    }
}

fn hits_of(stop: &Stop) -> Vec<Hit> {
    match stop {
        Stop::Debug { hits, .. } => hits.iter().collect(),
        Stop::Software { .. } => Vec::new(),
    }
}

#[test]
fn a_software_breakpoint_stops_at_its_int3_steps_over_it_and_is_removed_byte_exact() {
    let check = "software breakpoint end to end";
    let Some(mut g) = guest_for(check, 1, |p| &p.sw_breakpoint) else {
        return;
    };
    let mem = g.memory().clone();
    let original = code_page(&mem);
    let dbg = VmDebug::new(mem.clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let at = guest::SW_PATCH;
    assert!(matches!(
        dbg.insert(PHYS, BreakpointType::Software, at, 1).expect("insert"),
        Insert::Inserted(_)
    ));
    assert_eq!(byte_at(&mem, at), INT3, "insert writes int3");

    // The #BP exit, decoded: a stop at the int3, for our breakpoint.
    g.start(0, guest::SW).expect("start");
    h.sync(&*g.vcpu(0)).expect("sync");
    let exit = guest::run_once(g.vcpu(0)).expect("run");
    let arch = exit.debug().unwrap_or_else(|| panic!("the int3 gave {exit:?}"));
    assert_eq!((arch.exception, arch.pc), (3, at), "#BP exit at the int3");
    let Handled::Stop(ev) = h.handle_exit(&*g.vcpu(0), &arch).expect("handle_exit") else {
        panic!("our int3 was not a stop")
    };
    assert_eq!((ev.vcpu, ev.pc, ev.stop), (0, at, Stop::Software { addr: at }));
    assert_eq!(g.vcpu(0).get_regs().expect("regs").rip, at, "RIP left at the int3");

    // step_over, armed by the next sync: the original byte back for exactly
    // one instruction.
    assert_eq!(h.step_over(), StepOver::Requested { pc: at });
    assert!(
        h.sync(&*g.vcpu(0)).expect("sync arms the step"),
        "one ioctl for the step"
    );
    assert_eq!(byte_at(&mem, at), guest::SW_PATCH_BYTE, "original byte while stepping");
    let exit = guest::run_once(g.vcpu(0)).expect("run the step");
    let arch = exit.debug().unwrap_or_else(|| panic!("the step gave {exit:?}"));
    assert_eq!(
        (arch.exception, arch.pc),
        (1, guest::SW_AFTER),
        "one instruction, the original one"
    );
    assert_eq!(
        h.handle_exit(&*g.vcpu(0), &arch).expect("handle_exit"),
        Handled::Resume(Resume::SteppedOver)
    );
    assert_eq!(byte_at(&mem, at), INT3, "re-armed after the step");
    assert_eq!(resume(&mut h, g.vcpu(0)), Event::Exit(SW_DONE), "mov eax, 0x1234 ran");

    // Still armed: a second pass stops again.
    g.start(0, guest::SW).expect("restart");
    let Event::Stop(again) = resume(&mut h, g.vcpu(0)) else {
        panic!("no second stop")
    };
    assert_eq!(again.stop, Stop::Software { addr: at });

    // Removed while stopped at it: memory is what it was, and the vCPU runs on
    // from the int3's address through the original instruction.
    dbg.remove(PHYS, BreakpointType::Software, at, 1).expect("remove");
    assert!(
        code_page(&mem) == original,
        "remove restores the code page byte for byte"
    );
    assert_eq!(resume(&mut h, g.vcpu(0)), Event::Exit(SW_DONE));
    g.start(0, guest::SW).expect("restart");
    assert_eq!(resume(&mut h, g.vcpu(0)), Event::Exit(SW_DONE), "no stop once removed");
    println!(
        "{check}: checked insert, #BP exit at {at:#x} decoded as ours, step_over runs the original \
         instruction and re-arms, a second stop, remove restores memory byte-exact"
    );
}

#[test]
fn two_vcpus_stop_at_the_same_software_breakpoint_and_both_step_over_it() {
    let check = "two vCPUs on one int3";
    let Some(mut g) = guest_for(check, 2, |p| &p.sw_breakpoint) else {
        return;
    };
    let mem = g.memory().clone();
    let original = code_page(&mem);
    let dbg = VmDebug::new(mem.clone());
    let mut handles = [dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle")];
    let at = guest::SW_PATCH;
    dbg.insert(PHYS, BreakpointType::Software, at, 1).expect("insert");
    g.start(0, guest::SW).expect("start 0");
    g.start(1, guest::SW).expect("start 1");
    let (v0, v1) = g.vcpus_mut().split_at_mut(1);
    let (f0, f1) = (&mut v0[0], &mut v1[0]);
    let [h0, h1] = &mut handles;
    // Both run at once, each on its own thread, into the same int3.
    let (s0, s1) = std::thread::scope(|s| {
        let t0 = s.spawn(|| resume(h0, f0));
        let t1 = s.spawn(|| resume(h1, f1));
        (t0.join().expect("vCPU 0 thread"), t1.join().expect("vCPU 1 thread"))
    });
    for (id, ev) in [(0, s0), (1, s1)] {
        let Event::Stop(ev) = ev else {
            panic!("vCPU {id}: {ev:?}")
        };
        assert_eq!((ev.vcpu, ev.pc, ev.stop), (id, at, Stop::Software { addr: at }));
    }
    // One at a time (a step-over puts the original byte back, which the
    // other vCPU must not run through): each steps over and runs to its end.
    for (id, (h, f)) in [(0, (h0, f0)), (1, (h1, f1))] {
        assert_eq!(h.step_over(), StepOver::Requested { pc: at }, "vCPU {id}");
        assert_eq!(
            resume(h, f),
            Event::Exit(SW_DONE),
            "vCPU {id} ran the original instruction"
        );
        assert_eq!(byte_at(&mem, at), INT3, "re-armed after vCPU {id}'s step");
    }
    dbg.remove(PHYS, BreakpointType::Software, at, 1).expect("remove");
    assert!(code_page(&mem) == original, "memory byte-exact after remove");
    println!("{check}: checked both vCPUs stop at {at:#x} concurrently, each steps over and ends, memory byte-exact");
}

/// Watchpoints of `ty` at `guest::DATA`, each length in turn: a stop after
/// each overlapping access, at the next instruction, with exactly the slot's
/// hit.
fn watchpoints_of_each_length(check: &str, ty: BreakpointType, kind: HwKind, feature: fn(&Probe) -> &Finding) {
    let Some(_) = guest_for(check, 1, feature) else {
        return;
    };
    let mut stops_seen = 0;
    for len in [1u64, 2, 4, 8] {
        let mut g = Guest::new(1).expect("guest");
        g.start(0, guest::DATA_ACCESS).expect("start");
        let dbg = VmDebug::new(g.memory().clone());
        let mut h = dbg.vcpu(0).expect("vCPU handle");
        dbg.insert(PHYS, ty, guest::DATA, len).expect("insert");
        let stops = stops_until_done(&mut h, g.vcpu(0));
        let want: Vec<(u64, Vec<Hit>)> = guest::DATA_ACCESSES
            .iter()
            .filter(|a| a.addr < guest::DATA + len && guest::DATA < a.addr + a.len)
            .filter(|a| a.write || kind == HwKind::ReadWrite)
            .map(|a| (a.next, vec![hit(0, kind, guest::DATA, len)]))
            .collect();
        let got: Vec<(u64, Vec<Hit>)> = stops.iter().map(|s| (s.pc, hits_of(&s.stop))).collect();
        assert_eq!(
            got, want,
            "{kind} watchpoint of {len} bytes: (pc after the access, hits)"
        );
        for s in &stops {
            assert_eq!(s.dr6 & 0xf, 1, "DR6.B0 only, {len} bytes: {s}");
            assert!(matches!(s.stop, Stop::Debug { single_step: false, .. }), "{s}");
        }
        stops_seen += stops.len();
    }
    println!("{check}: checked lengths 1/2/4/8: {stops_seen} stops, each after its access with the slot-0 hit");
}

#[test]
fn write_watchpoints_of_1_2_4_8_bytes_stop_after_each_overlapping_write() {
    watchpoints_of_each_length("write watchpoints", BreakpointType::WriteWatch, HwKind::Write, |p| {
        &p.write_watch
    });
}

#[test]
fn read_write_watchpoints_of_1_2_4_8_bytes_stop_after_each_overlapping_access() {
    watchpoints_of_each_length(
        "read/write watchpoints",
        BreakpointType::AccessWatch,
        HwKind::ReadWrite,
        |p| &p.rw_watch,
    );
}

#[test]
fn two_watchpoints_in_two_slots_each_report_only_their_own_hits() {
    let check = "watchpoints in two slots";
    let Some(mut g) = guest_for(check, 1, |p| &p.rw_watch) else {
        return;
    };
    if !probe().write_watch.supported {
        println!(
            "{check}: SKIPPED: the probe says this host's KVM cannot: {}",
            probe().write_watch.detail
        );
        return;
    }
    g.start(0, guest::DATA_ACCESS).expect("start");
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    // Slot 0: writes to DATA..DATA+8; slot 1: reads and writes of DATA + 8.
    dbg.insert(PHYS, BreakpointType::WriteWatch, guest::DATA, 8)
        .expect("insert");
    dbg.insert(PHYS, BreakpointType::AccessWatch, guest::DATA + 8, 1)
        .expect("insert");
    let w = hit(0, HwKind::Write, guest::DATA, 8);
    let rw = hit(1, HwKind::ReadWrite, guest::DATA + 8, 1);
    let want: Vec<(u64, Vec<Hit>)> = guest::DATA_ACCESSES
        .iter()
        .filter_map(|a| match (a.addr == guest::DATA, a.write) {
            (false, _) => Some((a.next, vec![rw])),
            (true, true) => Some((a.next, vec![w])),
            (true, false) => None,
        })
        .collect();
    let stops = stops_until_done(&mut h, g.vcpu(0));
    let got: Vec<(u64, Vec<Hit>)> = stops.iter().map(|s| (s.pc, hits_of(&s.stop))).collect();
    assert_eq!(got, want);
    for s in &stops {
        let slot = hits_of(&s.stop)[0].slot.get();
        assert_eq!(s.dr6 & 0xf, 1 << slot, "DR6 names the one slot hit: {s}");
    }
    println!(
        "{check}: checked {} stops: the reads of slot 0's range stay silent, every hit names its own slot",
        stops.len()
    );
}

#[test]
fn resuming_with_rflags_rf_runs_past_an_execute_breakpoint_and_leaves_it_armed() {
    let check = "RF resume";
    let Some(mut g) = guest_for(check, 1, |p| &p.resume_flag) else {
        return;
    };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let at = guest::STRAIGHT_INSNS[2];
    dbg.insert(PHYS, BreakpointType::Hardware, at, 1).expect("insert");
    let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
        panic!("no stop")
    };
    assert_eq!((ev.pc, hits_of(&ev.stop)), (at, vec![hit(0, HwKind::Execute, at, 1)]));
    // Instead of step_over: RF set, the configuration untouched.
    let vcpu = g.vcpu(0);
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rflags |= 1 << 16;
    vcpu.set_regs(&regs).expect("regs");
    assert_eq!(resume(&mut h, g.vcpu(0)), Event::Exit(Exit::Out(guest::PORT_DONE, 3)));
    g.start(0, guest::STRAIGHT).expect("restart");
    let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
        panic!("the breakpoint did not stop a second pass")
    };
    assert_eq!(ev.pc, at);
    println!("{check}: checked RF set at the stop runs past {at:#x}, and the breakpoint stays armed");
}
