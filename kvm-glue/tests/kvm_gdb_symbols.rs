//! The real `gdb`, with the C guest's symbols (`tests/guest-c/guest.c`,
//! `gcc -g`), driving the `elf_vmm` example through every command of issue
//! #17's list in one session, on whatever KVM the lane has: this host's
//! `kvm_pvm`, `kvm_amd` in QEMU/TCG (`.ci/nested-kvm`) and `kvm_intel` in
//! Bochs (`.ci/nested-vmx`). The nested lanes carry Debian's
//! `gdb-minimal` into their initramfs and set `GDB`; gdb runs beside the
//! VMM, inside the VM, on loopback TCP.
//!
//! Every expected value comes from the C source or a hand computation:
//! `fact` is on line 70, `finish` from `fact(3)`, `fact(4)`, `fact(5)`
//! returns 6, 24, 120; `next` from line 161 lands on 162, then 163;
//! `set var counter = 1000` before line 162 makes it 1120, round 1 adds 120
//! and round 2 another (the watch's Old/New values); `shared.x` starts at 1
//! and round `r` writes `r`; `p fact(4)` is 24.
//!
//! What the server serves depends on the host's KVM (`monitor served`):
//! where `int3` exits do not work `break` is a hardware execute slot (4 at
//! most, so at most 2 user breakpoints are alive at a time, beside gdb's
//! own for `next`, `finish`, `until`, `advance` and the inferior call);
//! where data watchpoints do not fire `Z2`-`Z4` are refused, the session
//! uses gdb's software watchpoints (`set can-use-hw-watchpoints 0`) for
//! `watch`, and `rwatch`/`awatch` (which gdb cannot do in software) get one
//! `SKIPPED (part):` line.
//!
//! Needs `/dev/kvm`, gdb (`GDB` or on `PATH`), the example built with
//! feature `gdb` (`ELF_VMM_BIN`, or `cargo build -p kvm-glue --features gdb
//! --example elf_vmm`; one built without it gives a SKIPPED line) and the
//! guest (`ELF_VMM_GUEST`, or gcc).

mod common;
mod elf_guest;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elf_guest::{after, hex_at, image_bytes, setup, symbols, Needs, NoServer, Setup, Vmm};

/// The whole session's deadline: under Bochs a session takes tens of seconds.
const SESSION: Duration = Duration::from_secs(400);

/// The line gdb echoes (`echo`) right before the `continue` that the test
/// interrupts with SIGINT, as Ctrl-C at gdb's prompt does.
const CTRL_C: &str = "@@ ctrl-c now @@";

/// How long after `continue` gdb gets its SIGINT: the guest runs by then.
const INTERRUPT_AFTER: Duration = Duration::from_millis(1000);

/// What this host's server can do, as the probe says (the server's own
/// `monitor served` must agree: asserted).
struct Serves {
    int3: bool,
    hw_watch: bool,
    rw_watch: bool,
}

/// The session: every command of the list, in an order whose outcome the
/// C source fixes (see the module docs). `target` is where to connect.
fn script(target: &str, sv: &Serves) -> String {
    let mut s = String::from("set pagination off\nset confirm off\nset trace-commands on\n");
    if !sv.hw_watch {
        s += "set can-use-hw-watchpoints 0\n";
    }
    s += &format!(
        "target remote {target}
monitor served
info threads
break fact
continue
x/8xb fact
bt
continue
continue
bt
delete
finish
finish
finish
next
set var counter = 1000
next
p counter
p fact(4)
watch shared.x
continue
delete
set var rounds = 1000000000
break fact if n == 2
continue
p n
delete
tbreak 161
continue
step
finish
watch counter
continue
delete
"
    );
    if sv.rw_watch {
        s += "awatch shared.x
continue
delete
rwatch rounds
continue
delete
";
    }
    s += &format!(
        "echo {CTRL_C}\\n
continue
info threads
p vcpu1_rounds
detach
shell sleep 0.3
target remote {target}
p vcpu1_rounds
thread 1
p/x $pc
thread 2
set scheduler-locking on
tbreak vcpu1_work
continue
bt
next
next
thread 1
p/x $pc
set scheduler-locking off
tbreak 161
continue
advance 163
set var rounds = 0
until 174
p vcpu0_done
kill
"
    );
    s
}

/// Runs gdb on `script` with the guest's symbols; sends it SIGINT once,
/// [`INTERRUPT_AFTER`] after it traced the `continue` that follows the
/// [`CTRL_C`] line. What gdb printed: stdout and stderr share one file, so
/// their lines stay in the order gdb wrote them.
fn run_gdb(s: &Setup, script: &str) -> String {
    let tmp = std::env::temp_dir();
    let file = tmp.join(format!("kvm-glue-gdb-symbols-{}.gdb", std::process::id()));
    let log = tmp.join(format!("kvm-glue-gdb-symbols-{}.out", std::process::id()));
    std::fs::write(&file, script).expect("write the gdb script");
    let sink = std::fs::File::create(&log).expect("create gdb's output file");
    let mut child = Command::new(s.gdb.as_ref().expect("setup found gdb"))
        .args(["-nx", "-q", "-batch", "-x"])
        .arg(&file)
        .arg(&s.elf)
        .stdin(Stdio::null())
        .stdout(sink.try_clone().expect("dup gdb's output file"))
        .stderr(sink)
        .spawn()
        .expect("start gdb");
    let read = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let started = Instant::now();
    let deadline = started + SESSION;
    let mut interrupt_at = None;
    let mut interrupted = false;
    // When each traced command first showed (to the poll's 50 ms).
    let mut timing: Vec<(String, Duration)> = Vec::new();
    while child.try_wait().expect("try_wait").is_none() {
        let text = read();
        for cmd in text.lines().filter(|l| l.starts_with('+')).skip(timing.len()) {
            timing.push((cmd.to_string(), started.elapsed()));
        }
        if !interrupted
            && interrupt_at.is_none()
            && text
                .split_once(&format!("{CTRL_C}\n"))
                .is_some_and(|(_, rest)| rest.contains("+continue\n"))
        {
            // gdb traces `continue`, then resumes the target at once: soon
            // after, it waits for a stop, where SIGINT makes it send 0x03.
            interrupt_at = Some(Instant::now() + INTERRUPT_AFTER);
        }
        if interrupt_at.is_some_and(|t| Instant::now() >= t) {
            interrupt_at = None;
            interrupted = true;
            let sent = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(sent.success(), "kill -INT gdb failed");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    let total = started.elapsed();
    let text = read();
    // Each command's share of the session: from its trace line to the next.
    let mut slow: Vec<(Duration, &str)> = timing
        .iter()
        .zip(timing.iter().skip(1).map(|(_, t)| *t).chain([total]))
        .map(|((cmd, at), next)| (next.saturating_sub(*at), cmd.as_str()))
        .collect();
    slow.sort_by_key(|s| std::cmp::Reverse(s.0));
    let first = timing.first().map_or(total, |(_, t)| *t);
    println!(
        "gdb session {:.1} s: gdb's start to its first command {:.1} s; slowest: {}",
        total.as_secs_f64(),
        first.as_secs_f64(),
        slow.iter()
            .take(8)
            .map(|(d, c)| format!("{c} {:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&log);
    text
}

/// Asserts that each of `want` appears in `out`, in this order, each after
/// the end of the one before, from byte `from`; returns where the last ends.
fn in_order(out: &str, from: usize, want: &[&str]) -> usize {
    let mut at = from;
    for w in want {
        match out[at..].find(w) {
            Some(i) => at += i + w.len(),
            None => panic!(
                "gdb's output lacks {w:?} after offset {at} (after {:?}):\n{out}",
                &out[from..at]
            ),
        }
    }
    at
}

/// Where gdb's output of `cmd` starts: after its trace line `+cmd` (`set
/// trace-commands on`), the first one at or after byte `from`.
fn at_cmd(out: &str, from: usize, cmd: &str) -> usize {
    let line = format!("\n+{cmd}\n");
    // The line may start right at `from` (the newline before it just consumed).
    let from = from.saturating_sub(1);
    out[from..]
        .find(&line)
        .map(|i| from + i + line.len())
        .unwrap_or_else(|| panic!("gdb never ran {cmd:?} after offset {from}:\n{out}"))
}

#[test]
fn gdb_13_with_symbols_runs_issue_17s_whole_command_list_on_the_c_guest() {
    let name = "gdb_13_with_symbols_runs_issue_17s_whole_command_list_on_the_c_guest";
    let Some(s) = setup(name, Needs::Gdb) else { return };
    let p = common::probe();
    let sv = Serves {
        int3: p.sw_breakpoint.supported,
        hw_watch: p.write_watch.supported,
        rw_watch: p.rw_watch.supported,
    };
    let mut vmm = match Vmm::try_start(&s, &["--hold", "--gdb-port", "0"]) {
        Ok(vmm) => vmm,
        Err(NoServer::NoGdbFeature(_)) => {
            println!(
                "{name}: SKIPPED: {} was built without feature gdb \
                 (cargo build -p kvm-glue --features gdb --example elf_vmm, or set ELF_VMM_BIN)",
                s.vmm.display()
            );
            return;
        }
    };
    let target = vmm.target.clone().expect("a gdb address");
    let started = Instant::now();
    let out = run_gdb(&s, &script(&target, &sv));
    let took = started.elapsed();
    println!(
        "--- gdb ({:.1} s):\n{out}--- elf_vmm:\n{}---",
        took.as_secs_f64(),
        vmm.log()
    );

    // monitor served agrees with the probe.
    let served = &out[at_cmd(&out, 0, "monitor served")..];
    let z0 = if sv.int3 {
        "break (Z0): int3 in guest memory"
    } else {
        "break (Z0): a hardware execute slot"
    };
    let z2 = if sv.hw_watch {
        "(Z2-Z4): debug-register slots"
    } else {
        "(Z2-Z4): not supported"
    };
    in_order(served, 0, &[z0]);
    in_order(served, 0, &[z2]);

    // Held at the entry: both vCPUs; thread n + 1 is vCPU n.
    let at = in_order(
        &out,
        at_cmd(&out, 0, "info threads"),
        &[
            "Thread 1.1 (vCPU 0) 0x0000000000100000 in _start ()",
            "Thread 1.2 (vCPU 1) 0x0000000000100000 in _start ()",
        ],
    );
    // break: fact's first line after the prologue is 70; vCPU 0 calls fact(5).
    let at = in_order(
        &out,
        at,
        &[
            "Breakpoint 1 at 0x",
            "guest.c, line 70.",
            "+continue",
            "Thread 1 hit Breakpoint 1, fact (n=5) at ",
            "guest.c:70",
        ],
    );
    // x/8xb over the breakpoint: the ELF's bytes, never an int3.
    let fact = symbols(&s.elf)["fact"];
    let want = image_bytes(&s.elf, fact, 8).expect("fact's bytes in the ELF");
    let at = at_cmd(&out, at, "x/8xb fact");
    let got: Vec<u8> = after(&out[at..], "<fact>:")
        .expect("x/8xb's line")
        .split_whitespace()
        .map(|b| u8::try_from(hex_at(b).expect("a byte")).expect("a byte"))
        .collect();
    assert_eq!(got, want, "x/8xb fact over a breakpoint:\n{out}");
    // bt from fact(5); then the recursion down to fact(3).
    let at = in_order(
        &out,
        at_cmd(&out, at, "bt"),
        &[
            "#0  fact (n=5) at ",
            "#1  0x",
            " in vcpu0_main (timer=1) at ",
            "guest.c:161",
            " in guest_main (cpu=0, timer=1) at ",
            " in _start ()",
            "Thread 1 hit Breakpoint 1, fact (n=4)",
            "Thread 1 hit Breakpoint 1, fact (n=3)",
        ],
    );
    let at = in_order(
        &out,
        at_cmd(&out, at, "bt"),
        &[
            "#0  fact (n=3) at ",
            "#1  0x",
            " in fact (n=4) at ",
            "guest.c:72",
            "#2  0x",
            " in fact (n=5) at ",
            "#3  0x",
            " in vcpu0_main (timer=1) at ",
            " in _start ()",
        ],
    );
    // finish, three times: fact(3) = 6, fact(4) = 24, fact(5) = 120.
    let at = in_order(
        &out,
        at_cmd(&out, at, "finish"),
        &["fact (n=4) at ", "guest.c:72", "Value returned is $1 = 6\n"],
    );
    let at = in_order(
        &out,
        at,
        &["fact (n=5) at ", "guest.c:72", "Value returned is $2 = 24\n"],
    );
    let at = in_order(
        &out,
        at,
        &[
            " in vcpu0_main (timer=1) at ",
            "guest.c:161",
            "Value returned is $3 = 120\n",
        ],
    );
    // next, set var, next: the guest computes with gdb's value.
    let at = in_order(&out, at_cmd(&out, at, "next"), &["162\t        counter = counter + f;"]);
    let at = at_cmd(&out, at, "set var counter = 1000");
    let at = in_order(&out, at_cmd(&out, at, "next"), &["163\t        shared.x = (int)round;"]);
    let at = in_order(&out, at_cmd(&out, at, "p counter"), &["$4 = 1120\n"]);
    // An inferior call.
    let at = in_order(&out, at_cmd(&out, at, "p fact(4)"), &["$5 = 24\n"]);
    // watch on a struct field: round 0 writes 0 over the initial 1.
    let kind = if sv.hw_watch {
        "Hardware watchpoint"
    } else {
        "Watchpoint"
    };
    let at = in_order(
        &out,
        at_cmd(&out, at, "watch shared.x"),
        &[
            &format!("{kind} 2: shared.x"),
            "+continue",
            &format!("Thread 1 hit {kind} 2: shared.x"),
            "Old value = 1\nNew value = 0\n",
            "vcpu0_main (timer=1) at ",
            "guest.c:164",
        ],
    );
    // A conditional breakpoint: the recursion's fact(2), in round 1.
    let at = in_order(
        &out,
        at_cmd(&out, at, "break fact if n == 2"),
        &[
            "Breakpoint 3 at 0x",
            "+continue",
            "Thread 1 hit Breakpoint 3, fact (n=2) at ",
        ],
    );
    let at = in_order(&out, at_cmd(&out, at, "p n"), &["$6 = 2\n"]);
    // tbreak, then step into fact(5) and finish back out (round 2).
    let at = in_order(
        &out,
        at_cmd(&out, at, "tbreak 161"),
        &[
            "Temporary breakpoint 4 at 0x",
            "guest.c, line 161.",
            "Thread 1 hit Temporary breakpoint 4, vcpu0_main (timer=1) at ",
        ],
    );
    let at = in_order(&out, at_cmd(&out, at, "step"), &["fact (n=5) at ", "guest.c:70"]);
    let at = in_order(&out, at_cmd(&out, at, "finish"), &["Value returned is $7 = 120\n"]);
    // watch on a global: round 1 left 1240, round 2 adds 120.
    let at = in_order(
        &out,
        at_cmd(&out, at, "watch counter"),
        &[
            &format!("{kind} 5: counter"),
            "+continue",
            &format!("Thread 1 hit {kind} 5: counter"),
            "Old value = 1240\nNew value = 1360\n",
            "guest.c:163",
        ],
    );
    let mut at = at;
    if sv.rw_watch {
        // awatch: round 2 writes 2 over round 1's 1; rwatch: the loop's
        // test reads rounds, as gdb set it.
        at = in_order(
            &out,
            at_cmd(&out, at, "awatch shared.x"),
            &[
                "Hardware access (read/write) watchpoint 6: shared.x",
                "+continue",
                "Thread 1 hit Hardware access (read/write) watchpoint 6: shared.x",
                "Old value = 1\nNew value = 2\n",
            ],
        );
        at = in_order(
            &out,
            at_cmd(&out, at, "rwatch rounds"),
            &[
                "Hardware read watchpoint 7: rounds",
                "+continue",
                "Thread 1 hit Hardware read watchpoint 7: rounds",
                "Value = 1000000000\n",
                "vcpu0_main (timer=1) at ",
                "guest.c:160",
            ],
        );
    } else {
        println!(
            "{name}: SKIPPED (part): rwatch and awatch because this host's KVM fires no data \
             breakpoints (the server refuses Z2-Z4) and gdb has no software read or access watchpoints; \
             watch was checked as gdb's software watchpoint"
        );
    }
    if !sv.int3 {
        println!(
            "{name}: SKIPPED (part): break as an int3 in guest memory because this host's KVM delivers \
             no int3 exits (the server serves Z0 from an execute slot, checked instead)"
        );
    }
    // Ctrl-C: gdb interrupts the running guest; all-stop stops both vCPUs.
    let at = in_order(&out, at, &[CTRL_C, "+continue", "received signal SIGINT, Interrupt."]);
    let at = in_order(
        &out,
        at_cmd(&out, at, "info threads"),
        &["Thread 1.1 (vCPU 0) ", "Thread 1.2 (vCPU 1) "],
    );
    let at = at_cmd(&out, at, "p vcpu1_rounds");
    let before: u64 = after(&out[at..], " = ")
        .and_then(|v| v.trim().parse().ok())
        .expect("p vcpu1_rounds");
    // detach, the guest runs on, a reconnect.
    let at = in_order(&out, at_cmd(&out, at, "detach"), &["[Inferior 1 (process 1) detached]"]);
    let at = at_cmd(&out, at, &format!("target remote {target}"));
    let at = at_cmd(&out, at, "p vcpu1_rounds");
    let later: u64 = after(&out[at..], " = ")
        .and_then(|v| v.trim().parse().ok())
        .expect("p vcpu1_rounds after the reconnect");
    assert!(
        later > before,
        "vCPU 1 ran on between the two sessions ({before} then {later}):\n{out}"
    );
    // thread 2 with scheduler locking: thread 1 does not move.
    let at = at_cmd(&out, at, "thread 1");
    let at = at_cmd(&out, at, "p/x $pc");
    let pc1 = after(&out[at..], " = ").and_then(hex_at).expect("thread 1's pc");
    let at = in_order(
        &out,
        at_cmd(&out, at, "thread 2"),
        &["[Switching to thread 2 (Thread 1.2)]"],
    );
    let at = in_order(
        &out,
        at_cmd(&out, at, "tbreak vcpu1_work"),
        &[
            "+continue",
            "Thread 2 hit Temporary breakpoint ",
            "vcpu1_work () at ",
            "guest.c:179",
        ],
    );
    let at = in_order(
        &out,
        at_cmd(&out, at, "bt"),
        &[
            "#0  vcpu1_work () at ",
            " in vcpu1_main () at ",
            " in guest_main (cpu=1, timer=1) at ",
        ],
    );
    let at = in_order(
        &out,
        at_cmd(&out, at, "next"),
        &["180\t    vcpu1_rounds = vcpu1_rounds + 1;"],
    );
    let at = in_order(&out, at_cmd(&out, at, "next"), &["181\t}"]);
    let at = in_order(
        &out,
        at_cmd(&out, at, "thread 1"),
        &["[Switching to thread 1 (Thread 1.1)]"],
    );
    let at = at_cmd(&out, at, "p/x $pc");
    let pc1_after = after(&out[at..], " = ").and_then(hex_at).expect("thread 1's pc");
    assert_eq!(
        pc1, pc1_after,
        "thread 1 stayed put while thread 2 stepped alone:\n{out}"
    );
    // tbreak, advance, until.
    let at = in_order(
        &out,
        at_cmd(&out, at, "tbreak 161"),
        &[
            "+continue",
            "Thread 1 hit Temporary breakpoint ",
            "vcpu0_main (timer=1) at ",
            "guest.c:161",
        ],
    );
    let at = in_order(
        &out,
        at_cmd(&out, at, "advance 163"),
        &["vcpu0_main (timer=1) at ", "guest.c:163"],
    );
    let at = in_order(
        &out,
        at_cmd(&out, at, "until 174"),
        &["vcpu0_main (timer=1) at ", "guest.c:174", "174\t    vcpu0_done = 1;"],
    );
    let at = in_order(&out, at_cmd(&out, at, "p vcpu0_done"), &[" = 0\n"]);
    // kill: answered, the session ends; elf_vmm's default runs the guest on.
    in_order(&out, at_cmd(&out, at, "kill"), &["[Inferior 1 (process 1) killed]"]);
    assert!(
        !out.contains("Ignoring packet error") && !out.contains("Remote connection closed"),
        "{out}"
    );
    assert_eq!(vmm.wait(), 0, "{}", vmm.log());
    let log = vmm.log();
    assert_eq!(log.matches("GDB connected from").count(), 2, "{log}");
    for ended in ["GDB session ended (detached)", "GDB session ended (killed)"] {
        assert!(log.contains(ended), "{ended:?}:\n{log}");
    }
    assert!(
        log.contains("guest: vcpu0: round 2: fact(5) = 120, counter = 1360"),
        "{log}"
    );
    println!(
        "{name}: checked in {:.1} s: break ({}), bt, x/8xb, finish x3, next, set var, p fact(4), watch ({}), \
         break if, tbreak, step{}, Ctrl-C, detach + reconnect, thread 2 with scheduler locking, advance, \
         until, kill",
        took.as_secs_f64(),
        if sv.int3 { "int3" } else { "execute slot" },
        if sv.hw_watch { "hardware" } else { "software" },
        if sv.rw_watch { ", awatch, rwatch" } else { "" },
    );
}
