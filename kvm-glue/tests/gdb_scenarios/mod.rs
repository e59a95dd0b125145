//! GDB scripts and what GDB must print for them, shared by the real-KVM
//! test (`gdb_e2e.rs`) and the simulated-vCPU test (`gdb_adapter.rs`).
#![allow(dead_code)]

use kvm_glue::guest;

/// Watchpoints on vCPU 1 running the data-access routine (vCPU 0 runs the
/// straight line). GDB reports a `watch` only when the value changed, so the
/// script first gives vCPU 1's rax a value. Checks: a write watchpoint on 8
/// aligned bytes; an access watchpoint on one byte; a write watchpoint on 4
/// bytes at `DATA + 2` (two slots, reported at the address GDB set); then the
/// guest runs to its end.
pub fn watchpoints() -> (String, Vec<String>) {
    let d = guest::DATA;
    let a = &guest::DATA_ACCESSES;
    let script = format!(
        r#"thread 2
set $rax = 0x1122334455667788
watch *(long *){d:#x}
continue
printf "watch 1 stop: pc=%#lx\n", $pc
delete
awatch *(char *){d1:#x}
continue
printf "watch 2 stop: pc=%#lx\n", $pc
delete
watch *(int *){d2:#x}
continue
printf "watch 3 stop: pc=%#lx\n", $pc
delete
continue
"#,
        d1 = d + 1,
        d2 = d + 2,
    );
    let expected = vec![
        // The first write inside [DATA, DATA+8): 1 byte (al = 0x88).
        format!("Hardware watchpoint 1: *(long *){d:#x}"),
        "Old value = 0".to_string(),
        "New value = 136".to_string(),
        format!("watch 1 stop: pc={:#x}", a[1].next),
        // The first access touching DATA+1: the 2-byte write.
        format!("Hardware access (read/write) watchpoint 2: *(char *){:#x}", d + 1),
        format!("watch 2 stop: pc={:#x}", a[2].next),
        // The first write touching DATA+2..DATA+6: the 4-byte write.
        format!("Hardware watchpoint 3: *(int *){:#x}", d + 2),
        format!("watch 3 stop: pc={:#x}", a[3].next),
        "[Inferior 1 (process 1) exited normally]".to_string(),
    ];
    (script, expected)
}
