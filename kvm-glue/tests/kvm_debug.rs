//! kvm-glue on a real /dev/kvm with the tiny guest. Each test probes first and
//! prints one line saying what it checked and what the probe made it skip.

mod common;

use common::{guest, probe, resume, stops_until_done, Counting, Event};
use kvm_glue::guest::{self, Exit};
use kvm_glue::{AddressSpace, Handled, Insert, Resume, StepOver, VmDebug};
use vm_memory::{Bytes, GuestAddress};
use x86_debugreg::exit::Exception;
use x86_debugreg::{BreakpointType, ControlFlags, HwKind, Stop};

const PHYS: AddressSpace<'static> = AddressSpace::Physical;

fn hit_slots(stop: &Stop) -> Vec<(u8, u64, HwKind)> {
    match stop {
        Stop::Debug { hits, .. } => hits
            .iter()
            .map(|h| (h.slot.get(), h.breakpoint.addr(), h.breakpoint.kind()))
            .collect(),
        Stop::Software { .. } => Vec::new(),
    }
}

#[test]
fn an_execute_breakpoint_in_each_of_the_four_slots_stops_at_its_pc_with_its_slot() {
    let name = "execute breakpoints";
    let Some(mut g) = guest(name, 1) else { return };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    // Slots fill in order: DRn holds the breakpoint on instruction n + 1.
    let addrs = &guest::STRAIGHT_INSNS[1..5];
    for &a in addrs {
        assert!(matches!(
            dbg.insert(PHYS, BreakpointType::Hardware, a, 1).expect("insert"),
            Insert::Inserted(_)
        ));
    }
    let stops = stops_until_done(&mut h, g.vcpu(0));
    let got: Vec<_> = stops.iter().map(|s| (s.pc, hit_slots(&s.stop), s.dr6 & 0xf)).collect();
    let want: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(n, &a)| (a, vec![(n as u8, a, HwKind::Execute)], 1u64 << n))
        .collect();
    assert_eq!(got, want);
    println!("{name}: checked slots 0-3 stop at their pc with their slot and DR6 bit, step_over past each");
}

#[test]
fn removing_an_execute_breakpoint_lets_the_guest_run_on() {
    let name = "execute breakpoint removal";
    let Some(mut g) = guest(name, 1) else { return };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let a = guest::STRAIGHT_INSNS[3];
    dbg.insert(PHYS, BreakpointType::Hardware, a, 1).expect("insert");
    let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
        panic!("no stop")
    };
    assert_eq!(ev.pc, a);
    dbg.remove(PHYS, BreakpointType::Hardware, a, 1).expect("remove");
    // No step_over: with the breakpoint gone, the vCPU runs on from it.
    assert_eq!(resume(&mut h, g.vcpu(0)), Event::Exit(Exit::Out(guest::PORT_DONE, 3)));
    assert_eq!(h.applied().expect("synced").control, ControlFlags::NONE);
    println!("{name}: checked the guest runs to its end once the breakpoint it stopped at is removed");
}

#[test]
fn step_over_continues_past_an_execute_breakpoint_and_leaves_it_armed() {
    let name = "step_over";
    let Some(mut g) = guest(name, 1) else { return };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let a = guest::STRAIGHT_INSNS[2];
    dbg.insert(PHYS, BreakpointType::Hardware, a, 1).expect("insert");
    let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
        panic!("no stop")
    };
    assert_eq!(ev.pc, a);
    // Without a step over, the same breakpoint stops again.
    let Event::Stop(again) = resume(&mut h, g.vcpu(0)) else {
        panic!("no stop")
    };
    assert_eq!(again.pc, a, "resuming at an execute breakpoint hits it again");
    assert_eq!(h.step_over(), StepOver::Requested { pc: a });
    assert!(h.sync(&*g.vcpu(0)).expect("sync"), "the step over is applied by sync");
    let exit = guest::run_once(g.vcpu(0)).expect("run");
    let arch = exit.debug().expect("the single step exits");
    assert_eq!(arch.pc, guest::STRAIGHT_INSNS[3]);
    assert_eq!(
        h.handle_exit(&*g.vcpu(0), &arch).expect("handle"),
        Handled::Resume(Resume::SteppedOver)
    );
    assert_eq!(resume(&mut h, g.vcpu(0)), Event::Exit(Exit::Out(guest::PORT_DONE, 3)));
    // Still armed: a second pass stops again.
    g.start(0, guest::STRAIGHT).expect("restart");
    let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
        panic!("no stop")
    };
    assert_eq!(ev.pc, a);
    println!(
        "{name}: checked stepping over an execute breakpoint runs on and re-arms it (RF not used: {})",
        if probe().resume_flag.supported {
            "this host honours RF too"
        } else {
            "this host ignores RF"
        }
    );
}

#[test]
fn single_step_yields_exactly_the_expected_pcs() {
    let name = "single-step";
    let Some(mut g) = guest(name, 1) else { return };
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    dbg.set_single_step(0, true).expect("single-step");
    let mut pcs = Vec::new();
    loop {
        match resume(&mut h, g.vcpu(0)) {
            Event::Stop(ev) => {
                assert_eq!(
                    ev.stop,
                    Stop::Debug {
                        single_step: true,
                        hits: Default::default()
                    }
                );
                assert_eq!(ev.dr6 & 0x4000, 0x4000, "DR6.BS");
                pcs.push(ev.pc);
            }
            Event::Exit(Exit::Out(guest::PORT_DONE, 3)) => break,
            Event::Exit(other) => panic!("{other:?} after {pcs:x?}"),
        }
    }
    assert_eq!(pcs, guest::STRAIGHT_INSNS[1..]);
    assert_eq!(h.set_guest_debug_calls(), 1, "one ioctl for the whole walk");
    println!("{name}: checked {} steps stop at {:x?}", pcs.len(), pcs);
}

#[test]
fn the_guests_own_debug_exceptions_are_reinjected_and_reach_its_idt_handler() {
    let name = "re-injection";
    let Some(mut g) = guest(name, 1) else { return };
    let p = probe();
    let dbg = VmDebug::new(g.memory().clone());
    dbg.set_int1_pc(p.guest_int1_pc).expect("int1 pc");
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    // An execute breakpoint the routines never reach keeps USE_HW_BP on.
    dbg.insert(PHYS, BreakpointType::Hardware, guest::LOOP, 1)
        .expect("insert");
    let mut checked = Vec::new();

    // #DB
    if p.guest_int1.supported {
        g.start(0, guest::INT1).expect("start");
        h.sync(&*g.vcpu(0)).expect("sync");
        let exit = guest::run_once(g.vcpu(0)).expect("run");
        let arch = exit.debug().unwrap_or_else(|| panic!("int1 gave {exit:?}"));
        let got = h.handle_exit(&*g.vcpu(0), &arch).expect("handle");
        assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Debug)));
        checked.push("the guest's int1");
    } else {
        println!(
            "{name}: SKIPPED (part): the guest's own int1; probe: {}",
            p.guest_int1.detail
        );
        // What can be checked: an exit with a B-bit the debugger did not set
        // (B3; only DR0 is armed) is re-injected, and the #DB reaches the IDT.
        g.start(0, guest::STRAIGHT).expect("start");
        h.sync(&*g.vcpu(0)).expect("sync");
        let exit = kvm_bindings::kvm_debug_exit_arch {
            exception: 1,
            pad: 0,
            pc: guest::STRAIGHT,
            dr6: 0xffff_0ff8,
            dr7: 0,
        };
        let got = h.handle_exit(&*g.vcpu(0), &exit).expect("handle");
        assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Debug)));
        checked.push("a B-bit the debugger did not set");
    }
    assert_eq!(
        guest::run_once(g.vcpu(0)).expect("run"),
        Exit::Out(guest::PORT_VECTOR, 1),
        "#DB handler"
    );
    assert!(
        matches!(guest::run_once(g.vcpu(0)).expect("run"), Exit::Out(guest::PORT_DONE, _)),
        "guest went on"
    );

    // #BP
    dbg.insert(PHYS, BreakpointType::Software, guest::LOOP + 3, 1)
        .expect("sw (USE_SW_BP on)");
    if p.sw_breakpoint.supported {
        g.start(0, guest::INT3).expect("start");
        h.sync(&*g.vcpu(0)).expect("sync");
        let exit = guest::run_once(g.vcpu(0)).expect("run");
        let arch = exit.debug().unwrap_or_else(|| panic!("int3 gave {exit:?}"));
        let got = h.handle_exit(&*g.vcpu(0), &arch).expect("handle");
        assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Breakpoint)));
        checked.push("the guest's int3");
    } else {
        println!(
            "{name}: SKIPPED (part): the guest's own int3; probe: {}",
            p.sw_breakpoint.detail
        );
        // What can be checked: a #BP exit at an int3 that is not the
        // debugger's is re-injected, and the #BP reaches the IDT.
        g.start(0, guest::STRAIGHT).expect("start");
        h.sync(&*g.vcpu(0)).expect("sync");
        let exit = kvm_bindings::kvm_debug_exit_arch {
            exception: 3,
            pad: 0,
            pc: guest::INT3,
            dr6: 0,
            dr7: 0,
        };
        let got = h.handle_exit(&*g.vcpu(0), &exit).expect("handle");
        assert_eq!(got, Handled::Resume(Resume::Reinjected(Exception::Breakpoint)));
        checked.push("a #BP exit at the guest's own int3 (synthesised)");
    }
    assert_eq!(
        guest::run_once(g.vcpu(0)).expect("run"),
        Exit::Out(guest::PORT_VECTOR, 3),
        "#BP handler"
    );
    assert!(
        matches!(guest::run_once(g.vcpu(0)).expect("run"), Exit::Out(guest::PORT_DONE, _)),
        "guest went on"
    );
    println!(
        "{name}: checked re-injection of {} reaches the guest's IDT handlers (seen on their I/O port)",
        checked.join(", ")
    );
}

#[test]
fn two_vcpus_get_an_insert_with_one_ioctl_each_and_many_operations_still_cost_one() {
    let name = "two vCPUs";
    let Some(mut g) = guest(name, 2) else { return };
    let dbg = VmDebug::new(g.memory().clone());
    let mut handles = [dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle")];
    let a = guest::STRAIGHT_INSNS[2];
    dbg.insert(PHYS, BreakpointType::Hardware, a, 1).expect("insert");
    let (v0, v1) = g.vcpus_mut().split_at_mut(1);
    let fds = [&mut v0[0], &mut v1[0]];
    let costs: Vec<usize> = handles
        .iter_mut()
        .zip(&fds)
        .map(|(h, fd)| {
            let c = Counting::new(fd);
            h.sync(&c).expect("sync");
            c.set_guest_debug.get()
        })
        .collect();
    assert_eq!(costs, [1, 1], "one KVM_SET_GUEST_DEBUG per vCPU for the insert");
    // Both run, each on its own thread, and stop at the breakpoint.
    let [h0, h1] = &mut handles;
    let [f0, f1] = fds;
    let (s0, s1) = std::thread::scope(|s| {
        let t0 = s.spawn(|| resume(h0, f0));
        let t1 = s.spawn(|| resume(h1, f1));
        (t0.join().expect("vCPU 0 thread"), t1.join().expect("vCPU 1 thread"))
    });
    for (id, ev) in [(0, s0), (1, s1)] {
        let Event::Stop(ev) = ev else {
            panic!("vCPU {id}: {ev:?}")
        };
        assert_eq!(
            (ev.vcpu, ev.pc, hit_slots(&ev.stop)),
            (id, a, vec![(0, a, HwKind::Execute)])
        );
    }
    // Many operations while both are stopped.
    let ops = 9;
    dbg.insert(PHYS, BreakpointType::Hardware, guest::LOOP, 1)
        .expect("op 1");
    dbg.insert(PHYS, BreakpointType::Hardware, guest::SW, 1).expect("op 2");
    dbg.insert(PHYS, BreakpointType::Software, guest::SW_PATCH, 1)
        .expect("op 3");
    dbg.insert(PHYS, BreakpointType::Software, guest::LOOP + 3, 1)
        .expect("op 4");
    dbg.insert(PHYS, BreakpointType::Software, guest::SW_AFTER, 1)
        .expect("op 5");
    dbg.remove(PHYS, BreakpointType::Hardware, guest::SW, 1).expect("op 6");
    dbg.remove(PHYS, BreakpointType::Software, guest::SW_AFTER, 1)
        .expect("op 7");
    dbg.remove(PHYS, BreakpointType::Hardware, a, 1).expect("op 8");
    dbg.set_single_step(1, true).expect("op 9");
    let [h0, h1] = &mut handles;
    let c0 = Counting::new(f0);
    let c1 = Counting::new(f1);
    h0.sync(&c0).expect("sync");
    h1.sync(&c1).expect("sync");
    assert_eq!((c0.set_guest_debug.get(), c1.set_guest_debug.get()), (1, 1));
    // vCPU 0 runs to the end; vCPU 1 single-steps one instruction.
    assert_eq!(resume(h0, f0), Event::Exit(Exit::Out(guest::PORT_DONE, 3)));
    let Event::Stop(ev) = resume(h1, f1) else {
        panic!("vCPU 1 did not step")
    };
    assert_eq!(
        (ev.pc, ev.stop),
        (
            guest::STRAIGHT_INSNS[3],
            Stop::Debug {
                single_step: true,
                hits: Default::default()
            }
        )
    );
    println!(
        "{name}: checked an insert costs 1 ioctl per vCPU, and {ops} operations between two resumes cost 1 per vCPU \
         (the seed: {} in all)",
        ops * 2
    );
}

#[test]
fn data_watchpoints_stop_after_each_overlapping_access_where_the_host_supports_them() {
    let name = "data watchpoints";
    let Some(_) = guest(name, 1) else { return };
    let p = probe();
    let mut checked = 0;
    for (ty, kind, finding) in [
        (BreakpointType::WriteWatch, HwKind::Write, &p.write_watch),
        (BreakpointType::AccessWatch, HwKind::ReadWrite, &p.rw_watch),
    ] {
        for len in [1u64, 2, 4, 8] {
            let Some(mut g) = guest(name, 1) else { return };
            g.start(0, guest::DATA_ACCESS).expect("start");
            let dbg = VmDebug::new(g.memory().clone());
            let mut h = dbg.vcpu(0).expect("vCPU handle");
            dbg.insert(PHYS, ty, guest::DATA, len).expect("insert");
            h.sync(&*g.vcpu(0)).expect("sync");
            // What holds on any host: the applied configuration.
            let applied = h.applied().expect("synced");
            assert!(applied.uses_hw_breakpoints());
            assert_eq!(applied.debugreg[0], guest::DATA);
            let dr7 = applied.debugreg[7];
            let rw = if kind == HwKind::Write { 0b01 } else { 0b11 };
            let len_code = match len {
                1 => 0b00,
                2 => 0b01,
                4 => 0b11,
                _ => 0b10,
            };
            assert_eq!((dr7 >> 16) & 0xf, rw | len_code << 2, "R/W0 and LEN0");
            assert_eq!(dr7 & 0b11, 0b10, "G0 only");
            let stops = stops_until_done(&mut h, g.vcpu(0));
            if finding.supported {
                let want: Vec<_> = guest::DATA_ACCESSES
                    .iter()
                    .filter(|acc| acc.addr < guest::DATA + len && guest::DATA < acc.addr + acc.len)
                    .filter(|acc| acc.write || kind == HwKind::ReadWrite)
                    .map(|acc| (acc.next, vec![(0u8, guest::DATA, kind)]))
                    .collect();
                let got: Vec<_> = stops.iter().map(|s| (s.pc, hit_slots(&s.stop))).collect();
                assert_eq!(got, want, "{kind} watchpoint, {len} bytes");
                checked += 1;
            } else {
                assert!(
                    stops.is_empty(),
                    "the probe saw no watchpoint fire, but this run stopped: {stops:x?}"
                );
            }
        }
        if !finding.supported {
            println!(
                "{name}: SKIPPED (part): {kind} watchpoint stops; probe: {}",
                finding.detail
            );
        }
    }
    println!(
        "{name}: checked DR0/DR7 encoding for write and read/write, lengths 1/2/4/8; stops checked for {checked} of 8"
    );
}

#[test]
fn software_breakpoints_by_virtual_address_stop_and_step_over_where_the_host_supports_them() {
    let name = "software breakpoints";
    let Some(mut g) = guest(name, 1) else { return };
    let p = probe();
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    let original: Vec<u8> = {
        let mut buf = vec![0u8; 0x1000];
        g.memory()
            .read_slice(&mut buf, GuestAddress(guest::CODE))
            .expect("read");
        buf
    };
    let virt = guest::ALIAS + guest::SW_PATCH;
    let phys_byte = |g: &guest::Guest| -> u8 { g.memory().read_obj(GuestAddress(guest::SW_PATCH)).expect("read") };
    dbg.insert(AddressSpace::Virtual(&*g.vcpu(0)), BreakpointType::Software, virt, 1)
        .expect("insert");
    assert_eq!(phys_byte(&g), 0xCC, "patched at the translated physical address");
    let c = Counting::new(g.vcpu(0));
    h.sync(&c).expect("sync");
    assert_eq!(c.set_guest_debug.get(), 1);
    assert_eq!(
        h.applied().expect("synced").control,
        ControlFlags::ENABLE | ControlFlags::USE_SW_BP
    );
    dbg.insert(AddressSpace::Virtual(&*g.vcpu(0)), BreakpointType::Software, virt, 1)
        .expect("insert twice");
    let c = Counting::new(g.vcpu(0));
    h.sync(&c).expect("sync");
    assert_eq!(c.set_guest_debug.get(), 0, "a second insert costs no ioctl");
    if p.sw_breakpoint.supported {
        g.start(0, guest::ALIAS + guest::SW).expect("start");
        let Event::Stop(ev) = resume(&mut h, g.vcpu(0)) else {
            panic!("no stop")
        };
        assert_eq!(ev.stop, Stop::Software { addr: virt });
        assert_eq!(h.step_over(), StepOver::Requested { pc: virt });
        // mov eax, 0x1234; inc eax; out 0x10, al: the original instruction ran.
        assert_eq!(
            resume(&mut h, g.vcpu(0)),
            Event::Exit(Exit::Out(guest::PORT_DONE, 0x35))
        );
        assert_eq!(phys_byte(&g), 0xCC, "re-armed after the step");
    } else {
        println!(
            "{name}: SKIPPED (part): int3 stops and step over; probe: {}",
            p.sw_breakpoint.detail
        );
    }
    dbg.remove(AddressSpace::Virtual(&*g.vcpu(0)), BreakpointType::Software, virt, 1)
        .expect("remove");
    assert_eq!(phys_byte(&g), 0xCC, "one use left");
    dbg.insert(PHYS, BreakpointType::Software, guest::SW_AFTER, 1)
        .expect("physical insert");
    let report = dbg.remove_all().expect("remove all");
    assert!(report.is_complete(), "{report:?}");
    let mut now = vec![0u8; 0x1000];
    g.memory()
        .read_slice(&mut now, GuestAddress(guest::CODE))
        .expect("read");
    assert!(now == original, "remove_all restores guest memory byte for byte");
    h.sync(&*g.vcpu(0)).expect("sync");
    assert_eq!(h.applied().expect("synced").control, ControlFlags::NONE);
    println!(
        "{name}: checked patching through KVM_TRANSLATE, use counts, control flags, ioctl counts, byte-exact restore{}",
        if p.sw_breakpoint.supported {
            ", stop and step over"
        } else {
            ""
        }
    );
}

#[test]
fn the_probe_reports_every_feature() {
    let name = "probe";
    let Some(_) = guest(name, 1) else { return };
    let p = probe();
    let text = p.to_string();
    assert_eq!(text.lines().count(), 10);
    // Facts every KVM with guest debugging offers (HOST.md, and kvm-ioctls' own test).
    assert!(p.execute.supported, "{}", p.execute.detail);
    assert!(p.single_step.supported, "{}", p.single_step.detail);
    assert!(p.inject.supported, "{}", p.inject.detail);
    println!("{name}: this host's KVM:\n{text}");
}
