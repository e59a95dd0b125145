//! The `elf_vmm` example on real `/dev/kvm`, without a debugger: the VMM a
//! VMM author copies (own VM setup, in-kernel irqchip and PIT, an ELF
//! loaded by `linux-loader`, two vCPU threads with kvm-glue's loop) runs
//! the C guest from `tests/guest-c/` to its end. Named `kvm_*` so the KVM
//! lanes run it; the example builds without feature `gdb` for them. A lane
//! without gcc, or without the example beside the test, gives
//! `ELF_VMM_GUEST` and `ELF_VMM_BIN` (see `elf_guest/`), or the test prints
//! one SKIPPED line. `gdb_real_guest.rs` debugs the same guest with gdb.

mod common;
mod elf_guest;

use elf_guest::{after, setup, Needs, Vmm};

#[test]
fn the_example_runs_the_c_guest_to_its_end_with_its_timer() {
    let name = "elf_vmm without a debugger";
    let Some(s) = setup(name, Needs::Nothing) else { return };
    let mut vmm = Vmm::start(&s, &[]);
    assert_eq!(vmm.wait(), 0, "{}", vmm.log());
    let log = vmm.log();
    println!("{log}");
    // 3 rounds of fact(5) = 5! = 120, added up: 120, 240, 360.
    for (round, total) in [(0, 120), (1, 240), (2, 360)] {
        let line = format!("guest: vcpu0: round {round}: fact(5) = 120, counter = {total}");
        assert!(log.contains(&line), "missing {line:?}:\n{log}");
    }
    // The guest waits in hlt for two timer interrupts before it is done.
    let ticks: u64 = after(&log, "vcpu0: timer ticks: ")
        .and_then(|t| t.trim().parse().ok())
        .expect("ticks");
    assert!(ticks >= 2, "{log}");
    let rounds: u64 = after(&log, "guest: vcpu1: ")
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("vcpu1's rounds");
    assert!(rounds > 0, "vCPU 1 ran its own loop: {log}");
    assert!(log.contains("vCPU 0: done") && log.contains("vCPU 1: done"), "{log}");
    println!("{name}: checked both vCPUs ran their code to the end, {ticks} timer ticks, exit code 0");
}
