//! Boots kvm-glue's tiny guest, prints what this host's KVM can do, then sets
//! an execute breakpoint (and, where the host supports them, a write
//! watchpoint and a software breakpoint), single-steps a few instructions and
//! prints every stop, one line each.
//!
//! `cargo run -p kvm-glue --example debug_demo`

use std::process::ExitCode;

use kvm_glue::guest::{self, Exit, Guest, GuestError};
use kvm_glue::{AddressSpace, Handled, VcpuDebug, VmDebug};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;
use x86_debugreg::BreakpointType;

type Error = Box<dyn std::error::Error>;

/// What a resume came back with.
enum Next {
    Stopped,
    Done(u8),
}

/// sync + KVM_RUN + handle_exit until a stop (printed) or the routine's end.
fn resume(h: &mut VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd) -> Result<Next, Error> {
    loop {
        h.sync(&*vcpu)?;
        let exit = guest::run_once(vcpu)?;
        match exit {
            Exit::Debug { .. } => {
                let arch = exit.debug().ok_or("debug exit without data")?;
                match h.handle_exit(&*vcpu, &arch)? {
                    Handled::Stop(ev) => {
                        println!("  {ev}");
                        return Ok(Next::Stopped);
                    }
                    Handled::Resume(why) => println!("  (resumed: {why:?})"),
                }
            }
            Exit::Out(guest::PORT_DONE, v) => return Ok(Next::Done(v)),
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
}

/// Resumes until the routine ends, stepping over each breakpoint it stops at.
fn run_to_end(h: &mut VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd) -> Result<(), Error> {
    for _ in 0..32 {
        match resume(h, vcpu)? {
            Next::Stopped => {
                h.step_over();
            }
            Next::Done(al) => {
                println!("  routine finished (out {:#x}, al = {al:#x})", guest::PORT_DONE);
                return Ok(());
            }
        }
    }
    Err("the routine did not end".into())
}

fn demo(mut g: Guest) -> Result<(), Error> {
    let probe = kvm_glue::probe::probe()?;
    println!("What this host's KVM does with guest debugging:");
    for line in probe.to_string().lines() {
        println!("  {line}");
    }

    let dbg = VmDebug::new(g.memory().clone());
    dbg.set_int1_pc(probe.guest_int1_pc)?;
    let mut h = dbg.vcpu(0)?;

    println!(
        "\nExecute breakpoint at {:#x}, then 3 single steps:",
        guest::STRAIGHT_INSNS[2]
    );
    dbg.insert(
        AddressSpace::Physical,
        BreakpointType::Hardware,
        guest::STRAIGHT_INSNS[2],
        1,
    )?;
    g.start(0, guest::STRAIGHT)?;
    if let Next::Done(_) = resume(&mut h, g.vcpu(0))? {
        return Err("the execute breakpoint did not stop the guest".into());
    }
    dbg.set_single_step(0, true)?;
    h.step_over();
    for _ in 0..3 {
        if let Next::Done(_) = resume(&mut h, g.vcpu(0))? {
            break;
        }
    }
    dbg.set_single_step(0, false)?;
    run_to_end(&mut h, g.vcpu(0))?;
    dbg.remove_all()?;

    println!("\nWrite watchpoint on 4 bytes at {:#x}:", guest::DATA);
    if probe.write_watch.supported {
        dbg.insert(AddressSpace::Physical, BreakpointType::WriteWatch, guest::DATA, 4)?;
        g.start(0, guest::DATA_ACCESS)?;
        run_to_end(&mut h, g.vcpu(0))?;
        dbg.remove_all()?;
    } else {
        println!("  skipped: {}", probe.write_watch.detail);
    }

    println!(
        "\nSoftware breakpoint at virtual {:#x} (physical {:#x}):",
        guest::ALIAS + guest::SW_PATCH,
        guest::SW_PATCH
    );
    if probe.sw_breakpoint.supported {
        let space = AddressSpace::Virtual(&*g.vcpu(0));
        dbg.insert(space, BreakpointType::Software, guest::ALIAS + guest::SW_PATCH, 1)?;
        g.start(0, guest::ALIAS + guest::SW)?;
        run_to_end(&mut h, g.vcpu(0))?;
        dbg.remove_all()?;
    } else {
        println!("  skipped: {}", probe.sw_breakpoint.detail);
    }
    Ok(())
}

fn main() -> ExitCode {
    let g = match Guest::new(1) {
        Ok(g) => g,
        Err(GuestError::NoKvm(e)) => {
            eprintln!("debug_demo: no usable /dev/kvm ({e}); nothing to demonstrate");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("debug_demo: cannot build the guest: {e}");
            return ExitCode::FAILURE;
        }
    };
    match demo(g) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("debug_demo: {e}");
            ExitCode::FAILURE
        }
    }
}
