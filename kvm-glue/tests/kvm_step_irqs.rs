//! Issue #18 item 6 on real `/dev/kvm`: a single-step with an interrupt
//! pending stays in the stepped code (`KVM_GUESTDBG_BLOCKIRQ`, kvm-glue's
//! default where the host reports it), as the Linux KVM selftest
//! `x86_64/debug_regs.c` checks with a pending self-IPI.
//!
//! The guest is the C guest of `tests/guest-c/` in the `elf_vmm` example's
//! VM (in-kernel irqchip and PIT), with its 100 Hz timer on: vCPU 0 runs
//! into an execute breakpoint at `fact` (after its `sti`), then is
//! single-stepped, sleeping past a timer period every few steps so a tick is
//! pending at the next entry. Each step must land at the next instruction
//! (the fall-through, or for a jump, call or return an instruction of the
//! guest's code), never in `timer_isr`. The same run with
//! [`StepIrqs::Delivered`] (what kvm-glue did before) is the control: it
//! must enter `timer_isr`, or no tick was pending and the test fails.
//!
//! Needs gcc (or `ELF_VMM_GUEST`) and binutils' `nm` and `objdump` for the
//! guest's symbols and instruction boundaries; without them one SKIPPED line.

mod common;
mod elf_guest;

#[allow(dead_code)]
#[path = "../examples/elf_vmm/vm.rs"]
mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvm_glue::run::{run_once, Exit};
use kvm_glue::{AddressSpace, BreakpointType, Handled, StepIrqs, VmDebug};

type Error = Box<dyn std::error::Error + Send + Sync>;

const STEPS: usize = 60;
/// Longer than the guest's PIT period (1193182 / 11932 Hz: 10 ms).
const TICK: Duration = Duration::from_millis(12);
const RFLAGS_IF: u64 = 1 << 9;

/// The guest's code: each instruction's address, and its mnemonic.
struct Code {
    insns: BTreeMap<u64, String>,
    isr: (u64, u64),
}

impl Code {
    fn read(elf: &Path) -> Option<(Code, u64)> {
        let nm = Command::new("nm").arg(elf).output().ok()?;
        let syms: BTreeMap<String, u64> = String::from_utf8_lossy(&nm.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                let _kind = w.next()?;
                Some((w.next()?.to_string(), addr))
            })
            .collect();
        let dis = Command::new("objdump")
            .args(["-d", "--no-show-raw-insn"])
            .arg(elf)
            .output()
            .ok()?;
        let mut insns = BTreeMap::new();
        for l in String::from_utf8_lossy(&dis.stdout).lines() {
            let Some((addr, rest)) = l.trim_start().split_once(":\t") else {
                continue;
            };
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            insns.insert(addr, rest.split_whitespace().next().unwrap_or("").to_string());
        }
        let isr = *syms.get("timer_isr")?;
        // timer_isr ends at its iretq.
        let end = insns
            .range(isr..)
            .find(|(_, m)| m.starts_with("iret"))
            .map(|(&a, _)| a + 1)?;
        Some((Code { insns, isr: (isr, end) }, *syms.get("fact")?))
    }

    fn in_isr(&self, pc: u64) -> bool {
        (self.isr.0..=self.isr.1).contains(&pc)
    }

    /// Whether one instruction at `from` can end at `to` in the stepped code.
    fn next_of(&self, from: u64, to: u64) -> Result<(), String> {
        let Some(m) = self.insns.get(&from) else {
            return Err(format!("{from:#x} is not an instruction"));
        };
        if self.in_isr(to) {
            return Err(format!("the step from {from:#x} ({m}) entered timer_isr at {to:#x}"));
        }
        if !self.insns.contains_key(&to) {
            return Err(format!(
                "the step from {from:#x} ({m}) ended at {to:#x}, no instruction"
            ));
        }
        let transfer = m.starts_with('j') || m.starts_with("call") || m.starts_with("ret") || m.starts_with("loop");
        let fall = self.insns.range(from + 1..).next().map(|(&a, _)| a);
        if transfer || fall == Some(to) {
            Ok(())
        } else {
            Err(format!(
                "the step from {from:#x} ({m}) ended at {to:#x}, not at {fall:x?}"
            ))
        }
    }
}

/// Runs vCPU 0 to `fact`, then steps it `STEPS` times; the pcs it stopped at.
fn step_from_fact(elf: &Path, fact: u64, irqs: StepIrqs) -> Result<(u64, Vec<u64>), Error> {
    let mut vm = vm::build(elf, 2, true)?;
    let dbg = VmDebug::new(vm.mem.clone());
    dbg.set_step_irqs(irqs)?;
    let vcpu = &mut vm.vcpus[0];
    let mut h = dbg.vcpu(0)?;
    dbg.insert(AddressSpace::Physical, BreakpointType::Hardware, fact, 1)?;
    let next_stop = |h: &mut kvm_glue::VcpuDebug<_>, vcpu: &mut kvm_ioctls::VcpuFd| -> Result<u64, Error> {
        for _ in 0..100_000 {
            h.before_run(&*vcpu)?;
            match run_once(vcpu)? {
                // The console (0x3f8): KVM completes the `out` at the next run.
                Exit::Out(..) => {}
                exit @ Exit::Debug { .. } => {
                    let arch = exit.debug().ok_or("debug data")?;
                    match h.handle_exit(&*vcpu, &arch)? {
                        Handled::Stop(stop) => return Ok(stop.pc),
                        Handled::Resume(r) => return Err(format!("not a stop: {r:?}").into()),
                    }
                }
                other => return Err(format!("vCPU 0 exit {other:?}").into()),
            }
        }
        Err("no stop".into())
    };
    let at = next_stop(&mut h, vcpu)?;
    assert_eq!(at, fact, "the breakpoint at fact");
    let rflags = vcpu.get_regs()?.rflags;
    dbg.remove(AddressSpace::Physical, BreakpointType::Hardware, fact, 1)?;
    dbg.set_single_step(0, true)?;
    let mut pcs = vec![at];
    for n in 0..STEPS {
        if n % 3 == 0 {
            std::thread::sleep(TICK); // a timer tick pends meanwhile
        }
        pcs.push(next_stop(&mut h, vcpu)?);
    }
    Ok((rflags, pcs))
}

fn setup(test: &str) -> Option<(PathBuf, Code, u64)> {
    common::guest(test, 1)?;
    let p = common::probe();
    for (what, f) in [("execute breakpoints", &p.execute), ("single-step", &p.single_step)] {
        if !f.supported {
            println!("{test}: SKIPPED: this host's KVM cannot do {what} ({})", f.detail);
            return None;
        }
    }
    let elf = match std::env::var_os("ELF_VMM_GUEST") {
        Some(e) => PathBuf::from(e),
        None => elf_guest::build_guest(test)?,
    };
    let Some((code, fact)) = Code::read(&elf) else {
        println!("{test}: SKIPPED: no nm/objdump to read the guest's symbols and instructions");
        return None;
    };
    Some((elf, code, fact))
}

#[test]
fn a_step_with_an_interrupt_pending_stays_in_the_stepped_code() {
    let test = "a_step_with_an_interrupt_pending_stays_in_the_stepped_code";
    let Some((elf, code, fact)) = setup(test) else { return };
    if !kvm_glue::probe::host_block_irq() {
        println!(
            "{test}: SKIPPED: this host's KVM does not report KVM_GUESTDBG_BLOCKIRQ \
             (KVM_CAP_SET_GUEST_DEBUG2 = {:x?}): its steps take interrupts",
            kvm_glue::probe::host_guest_debug_flags()
        );
        return;
    }
    let dbg_default = VmDebug::new(vm_memory::GuestMemoryMmap::<()>::new());
    assert_eq!(
        dbg_default.step_irqs(),
        StepIrqs::Blocked,
        "the default where the host has it"
    );

    // The control: with interrupts let into steps, a pending tick is taken.
    let (rflags, pcs) = step_from_fact(&elf, fact, StepIrqs::Delivered).expect("the control run");
    assert_ne!(rflags & RFLAGS_IF, 0, "interrupts are on at fact: {rflags:#x}");
    let entered = pcs.iter().filter(|&&pc| code.in_isr(pc)).count();
    // Else no tick was pending at a step, and the run below would prove nothing.
    assert!(entered > 0, "the control run never entered timer_isr: {pcs:x?}");
    println!("{test}: control (StepIrqs::Delivered): {entered} of {STEPS} steps stopped in timer_isr");

    let (rflags, pcs) = step_from_fact(&elf, fact, StepIrqs::Blocked).expect("the stepped run");
    assert_ne!(rflags & RFLAGS_IF, 0, "interrupts are on at fact: {rflags:#x}");
    for w in pcs.windows(2) {
        if let Err(e) = code.next_of(w[0], w[1]) {
            panic!("{e}; pcs: {pcs:x?}");
        }
    }
    println!(
        "{test}: checked {STEPS} steps from fact ({fact:#x}) with the 100 Hz timer pending: \
         each landed at the next instruction, none in timer_isr"
    );
}
