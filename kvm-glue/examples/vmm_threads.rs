//! A small VMM with two vCPU threads and a debugger thread, using kvm-glue's
//! lifecycle API: kick both vCPUs out of an endless guest loop, stop them,
//! set an execute breakpoint, resume, report each stop, single-step one vCPU
//! alone, step both and say which of them moved (`VmDebug::moved`), then
//! remove everything and let the guest run to its end.
//!
//! ```sh
//! cargo run -p kvm-glue --example vmm_threads
//! ```
//!
//! The VMM writes no `unsafe` and no signal code: `SignalKick` blocks its
//! signal outside `KVM_RUN`, so a kick is never lost, and `KVM_RUN` returns
//! `EINTR` (`Exit::Interrupted`) when one arrives.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kvm_glue::guest::{self, Exit, Guest, GuestError};
use kvm_glue::{
    Action, AddressSpace, BreakpointType, Handled, SignalKick, Stop, StopEvent, VcpuDebug, VcpuOps, VmDebug,
};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

type Dbg = VmDebug<GuestMemoryMmap>;
type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// Generous bound for a stop: kicks take microseconds, but CI machines are slow.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The VMM's vCPU loop: `before_run`, `KVM_RUN`, handle the exit.
fn vcpu_thread(mut h: VcpuDebug<GuestMemoryMmap>, vcpu: &mut VcpuFd, kick: &SignalKick) -> Result<(), AnyError> {
    let id = h.id();
    kick.prepare_vcpu_thread(id, vcpu)?;
    loop {
        h.before_run(&*vcpu)?;
        match guest::run_once(vcpu)? {
            Exit::Interrupted => kick.drain()?,
            exit @ Exit::Debug { .. } => {
                let arch = exit.debug().ok_or("a debug exit has debug data")?;
                if let Handled::Stop(stop) = h.handle_exit(&*vcpu, &arch)? {
                    h.report_stop(stop)?;
                }
            }
            Exit::Out(guest::PORT_DONE, _) => return Ok(()),
            other => return Err(format!("vCPU {id}: unexpected exit {other:?}").into()),
        }
    }
}

fn rip(dbg: &Dbg, id: usize) -> Result<u64, AnyError> {
    Ok(dbg.with_parked_vcpu(id, |v: &dyn VcpuOps| v.get_regs().map(|r| r.rip))??)
}

fn describe(ev: &StopEvent) -> String {
    match ev.stop {
        Stop::Debug { single_step: true, .. } => format!("vCPU {} stepped to {:#x}", ev.vcpu, ev.pc),
        _ => ev.to_string(),
    }
}

/// The debugger's side. Never touches a vCPU: intents, kicks, and jobs.
fn debugger(dbg: &Dbg) -> Result<(), AnyError> {
    std::thread::sleep(Duration::from_millis(50));
    dbg.stop_all(STOP_TIMEOUT)?;
    println!(
        "stopped both vCPUs inside their endless loop: rip {:#x} and {:#x}",
        rip(dbg, 0)?,
        rip(dbg, 1)?
    );

    let jmp = guest::LOOP + 3;
    dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, jmp, 1)?;
    println!("hbreak *{jmp:#x}; continue");
    dbg.resume_all()?;
    let first = dbg.wait_stop(Some(STOP_TIMEOUT))?.ok_or("no stop")?;
    dbg.stop_all(STOP_TIMEOUT)?;
    println!("  {}", describe(&first));
    // The other vCPU may have hit it too before it was kicked: that stop is
    // pending (a resume would report it at once, without running anyone).
    while let Some(also) = dbg.try_take_stop()? {
        println!("  {} (pending from the same round)", describe(&also));
    }

    let id = first.vcpu;
    let other = 1 - id;
    let other_rip = rip(dbg, other)?;
    println!("stepi on vCPU {id} only");
    dbg.resume(&[(id, Action::Step)])?;
    let step = dbg.wait_stop(Some(STOP_TIMEOUT))?.ok_or("no step")?;
    dbg.stop_all(STOP_TIMEOUT)?;
    println!("  {}", describe(&step));
    if rip(dbg, other)? != other_rip {
        return Err("the other vCPU moved while one was stepped".into());
    }
    println!("  vCPU {other} stayed at {other_rip:#x}");
    if dbg.moved(other)? {
        return Err("moved() says the held vCPU ran".into());
    }

    // All-stop ends a multi-vCPU step as soon as one vCPU stops: ask which
    // of them ran their instruction (the others are where they were).
    println!("stepi on both vCPUs");
    let before = [rip(dbg, 0)?, rip(dbg, 1)?];
    dbg.resume(&[(0, Action::Step), (1, Action::Step)])?;
    let step = dbg.wait_stop(Some(STOP_TIMEOUT))?.ok_or("no step")?;
    dbg.stop_all(STOP_TIMEOUT)?;
    println!("  {}", describe(&step));
    while let Some(also) = dbg.try_take_stop()? {
        println!("  {} (pending from the same round)", describe(&also));
    }
    for v in [0, 1] {
        let (moved, now) = (dbg.moved(v)?, rip(dbg, v)?);
        if moved == (now == before[v]) {
            return Err(format!("vCPU {v}: moved() = {moved} but rip {:#x} -> {now:#x}", before[v]).into());
        }
        println!("  vCPU {v} moved: {moved} (rip {:#x} -> {now:#x})", before[v]);
    }

    println!("delete; send both vCPUs to the straight-line routine; continue");
    dbg.remove_all()?;
    for v in [0, 1] {
        dbg.with_parked_vcpu(v, |vcpu: &dyn VcpuOps| -> Result<(), kvm_ioctls::Error> {
            let mut regs = vcpu.get_regs()?;
            regs.rip = guest::STRAIGHT;
            vcpu.set_regs(&regs)
        })??;
    }
    dbg.resume(&[(0, Action::Continue), (1, Action::Continue)])?;
    Ok(())
}

fn run() -> Result<(), AnyError> {
    let mut g = match Guest::new(2) {
        Ok(g) => g,
        Err(GuestError::NoKvm(e)) => return Err(format!("no /dev/kvm here ({e}): nothing to run").into()),
        Err(e) => return Err(e.into()),
    };
    for id in 0..2 {
        g.start(id, guest::LOOP)?;
    }
    let dbg = VmDebug::new(g.memory().clone());
    let kick = SignalKick::new(0)?;
    dbg.set_kick(kick.clone() as Arc<dyn kvm_glue::Kick>)?;
    std::thread::scope(|s| -> Result<(), AnyError> {
        let mut threads = Vec::new();
        for (id, vcpu) in g.vcpus_mut().iter_mut().enumerate() {
            // Make each vCPU's handle before its thread starts: stop_all
            // waits for every vCPU that has a handle.
            let (h, kick) = (dbg.vcpu(id)?, Arc::clone(&kick));
            threads.push(s.spawn(move || vcpu_thread(h, vcpu, &kick)));
        }
        if let Err(e) = debugger(&dbg) {
            // The vCPUs spin in an endless loop: end the process, not them.
            eprintln!("vmm_threads: {e}");
            std::process::exit(1);
        }
        for (id, t) in threads.into_iter().enumerate() {
            match t.join() {
                Ok(r) => r?,
                Err(_) => return Err(format!("vCPU {id}'s thread panicked").into()),
            }
            println!("vCPU {id} ran to its end");
        }
        Ok(())
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm_threads: {e}");
            ExitCode::FAILURE
        }
    }
}
