//! GDB scripts and what GDB must print for them, shared by the real-KVM
//! test (`gdb_e2e.rs`) and the simulated-vCPU test (`gdb_adapter.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_glue::guest;

/// Generous: one scenario takes well under a second.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// `gdb` from PATH, or `None` after one SKIPPED line (a failure where
/// `KVM_GLUE_REQUIRE_KVM` is set: `.ci/run` installs gdb there).
pub fn find_gdb(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("gdb"))
            .find(|p| p.is_file())
    });
    match found {
        Some(gdb) => Some(gdb),
        None if std::env::var_os("KVM_GLUE_REQUIRE_KVM").is_some() => {
            panic!("{test}: no gdb on PATH but KVM_GLUE_REQUIRE_KVM is set (.ci/run installs it)")
        }
        None => {
            println!("{test}: SKIPPED: no gdb on PATH (apt-get install -y gdb)");
            None
        }
    }
}

/// Everything the issue lists, vCPU 0 on the straight line and vCPU 1 on the
/// software-breakpoint routine, both held at their first instruction:
/// threads, per-thread stepping with the other vCPU held, an int3 hidden from
/// reads (GDB's and a raw `m` packet) and a raw write over it, an unmapped
/// address, hbreak + continue, stepi ×3, registers, delete + continue to the
/// guest's end.
pub fn main() -> (String, Vec<String>) {
    let [i0, _, i2, i3, i4, i5, _] = guest::STRAIGHT_INSNS;
    let script = format!(
        r#"info threads
set scheduler-locking step
thread 2
stepi
printf "T2 after stepi: pc=%#lx\n", $pc
thread 1
printf "T1 held: pc=%#lx\n", $pc
set breakpoint always-inserted on
break *{sw_after:#x}
x/4xb {sw_after:#x}
maint packet m{sw_after:x},4
maint packet M{sw_after:x},1:fe
maint packet m{sw_after:x},1
monitor breakpoints
maint packet M{sw_after:x},1:ff
maint packet m200000,4
maint packet M1ffffe,4:01020304
maint packet m1ffffe,2
delete
set breakpoint always-inserted off
hbreak *{i2:#x}
continue
stepi
printf "step 1: pc=%#lx\n", $pc
stepi
printf "step 2: pc=%#lx\n", $pc
stepi
printf "step 3: pc=%#lx\n", $pc
info registers rip
info threads
delete
continue
"#,
        sw_after = guest::SW_AFTER,
    );
    let t = |n: u64| format!("{n:#018x}");
    let mut expected = Vec::new();
    expected.push(format!("Thread 1.1 (vCPU 0) {} in ?? ()", t(i0)));
    expected.push(format!("Thread 1.2 (vCPU 1) {} in ?? ()", t(guest::SW)));
    expected.push(format!("T2 after stepi: pc={:#x}", guest::SW_PATCH));
    expected.push(format!("T1 held: pc={i0:#x}"));
    // The int3 is in memory (monitor) but reads show the original bytes,
    // through GDB and raw; a write over it updates the saved byte.
    expected.push(format!("{:#x}:\t0xff\t0xc0\t0xe6\t0x10", guest::SW_AFTER));
    expected.push("received: \"ffc0e610\"".to_string());
    expected.push("received: \"fe\"".to_string());
    expected.push(format!("int3 at {:#x}", guest::SW_AFTER));
    // 0x200000 is past the guest's page tables: EFAULT, not a crash.
    expected.push("sending: m200000,4\nreceived: \"E0e\"".to_string());
    // A write that runs off the mapped range changes nothing, not even the
    // two mapped bytes before the boundary.
    expected.push("sending: M1ffffe,4:01020304\nreceived: \"E0e\"".to_string());
    expected.push("sending: m1ffffe,2\nreceived: \"0000\"".to_string());
    expected.push(format!("Thread 1 hit Breakpoint 2, {} in ?? ()", t(i2)));
    expected.push(format!("step 1: pc={i3:#x}"));
    expected.push(format!("step 2: pc={i4:#x}"));
    expected.push(format!("step 3: pc={i5:#x}"));
    expected.push(format!("rip            {i5:#x}"));
    expected.push("[Inferior 1 (process 1) exited normally]".to_string());
    (script, expected)
}

/// A software breakpoint on vCPU 1's path (the instruction after the one
/// the int3 table's routine patches): the thread that ran into it stops
/// there, its memory shows the original byte, and the guest runs on to its
/// end once the breakpoint is deleted.
pub fn software_breakpoint() -> (String, Vec<String>) {
    let at = guest::SW_AFTER;
    let script = format!("break *{at:#x}\ncontinue\nprintf \"at: pc=%#lx\\n\", $pc\nx/1xb $pc\ndelete\ncontinue\n");
    let expected = vec![
        format!("Thread 2 hit Breakpoint 1, {at:#018x}"),
        format!("at: pc={at:#x}"),
        format!("{at:#x}:\t0xff"),
        "[Inferior 1 (process 1) exited normally]".to_string(),
    ];
    (script, expected)
}

/// Detach with an int3 and a hardware breakpoint set on the vCPUs' paths:
/// GDB shows them set (`monitor breakpoints`) before it detaches.
pub fn detach() -> (String, Vec<String>) {
    let script = format!(
        "set breakpoint always-inserted on\nbreak *{:#x}\nhbreak *{:#x}\nmonitor breakpoints\ndetach\n",
        guest::SW_AFTER,
        guest::STRAIGHT_INSNS[3]
    );
    let expected = vec![
        format!("int3 at {:#x}", guest::SW_AFTER),
        format!("DR0: execute breakpoint at {:#x}", guest::STRAIGHT_INSNS[3]),
        "[Inferior 1 (process 1) detached]".to_string(),
    ];
    (script, expected)
}

/// Raw packets GDB itself would not send, then five hardware breakpoints
/// (four slots: GDB says it cannot insert the fifth; an error ends a batch
/// script, so it comes last).
pub fn refusals() -> (String, Vec<String>) {
    let i = guest::STRAIGHT_INSNS;
    let script = format!(
        "maint packet Z3,20000,1\nmaint packet z3,20000,1\nmaint packet Z2,20001,16\nmaint packet Z2,20000,8\nmaint packet z2,20000,8\nmaint packet z1,12345,1\nmaint packet Z9,0,0\nmaint packet Z2,20000,3\nmaint packet z2,20000,3\nmaint packet Z4,1fffd,c\nmaint packet Z2,20000,2\nmaint packet z4,1fffd,c\nmaint packet z2,20000,2\nmonitor breakpoints\nset breakpoint always-inserted on\nhbreak *{:#x}\nhbreak *{:#x}\nhbreak *{:#x}\nhbreak *{:#x}\nhbreak *{:#x}\n",
        i[0], i[1], i[2], i[3], i[4]
    );
    let expected = vec![
        "Cannot insert hardware breakpoint 5.".to_string(),
        // Z3 (read): a read/write slot plus a value check, taken back by z3.
        "sending: Z3,20000,1\nreceived: \"OK\"".to_string(),
        "sending: z3,20000,1\nreceived: \"OK\"".to_string(),
        // 16 bytes at an odd address need five slots: never.
        "sending: Z2,20001,16\nreceived: \"E16\"".to_string(),
        "sending: Z2,20000,8\nreceived: \"OK\"".to_string(),
        "sending: z2,20000,8\nreceived: \"OK\"".to_string(),
        // Removing what is not set: an error reply.
        "sending: z1,12345,1\nreceived: \"E16\"".to_string(),
        // An unknown type: "not supported", the session goes on.
        "sending: Z9,0,0\nreceived: \"\"".to_string(),
        // 3 bytes at DATA: two slots (2 + 1), taken back by z2.
        "sending: Z2,20000,3\nreceived: \"OK\"".to_string(),
        "sending: z2,20000,3\nreceived: \"OK\"".to_string(),
        // 12 bytes at DATA - 3: 1 + 2 + 8 + 1, all four slots; then one more
        // write watchpoint does not fit and changes nothing (z2 finds nothing).
        "sending: Z4,1fffd,c\nreceived: \"OK\"".to_string(),
        "sending: Z2,20000,2\nreceived: \"E16\"".to_string(),
        "sending: z4,1fffd,c\nreceived: \"OK\"".to_string(),
        "sending: z2,20000,2\nreceived: \"E16\"".to_string(),
        "no breakpoints".to_string(),
    ];
    (script, expected)
}

/// When to send gdb its Ctrl-C in [`interrupt`]: well after it connected
/// and sent `continue`.
pub const INTERRUPT_AFTER: Duration = Duration::from_millis(1500);

/// Ctrl-C while both vCPUs run (vCPU 1 loops for ever; vCPU 0 has long
/// finished and idles in its final `hlt`): GDB hears SIGINT on a thread,
/// and every vCPU is stopped where it was.
pub fn interrupt() -> (String, Vec<String>) {
    let script =
        "continue\ninfo threads\nthread 2\nstepi\nprintf \"T2 stepped: pc=%#lx\\n\", $pc\ndetach\n".to_string();
    let expected = vec![
        "received signal SIGINT".to_string(),
        // After its out, vCPU 0 is on the hlt or the jmp back to it.
        "Thread 1.1 (vCPU 0) 0x00000000000100".to_string(),
        "Thread 1.2 (vCPU 1) 0x00000000000104".to_string(),
        "T2 stepped: pc=0x104".to_string(),
        "[Inferior 1 (process 1) detached]".to_string(),
    ];
    (script, expected)
}

/// Both vCPUs run the straight line into one hardware breakpoint: the
/// first is reported, the second after the next continue.
pub fn shared_breakpoint() -> (String, Vec<String>) {
    let at = guest::STRAIGHT_INSNS[2];
    let script = format!("hbreak *{at:#x}\ncontinue\ncontinue\ndelete\ncontinue\n");
    let expected = vec![
        format!("Thread 1 hit Breakpoint 1, {at:#018x}"),
        format!("Thread 2 hit Breakpoint 1, {at:#018x}"),
        "[Inferior 1 (process 1) exited normally]".to_string(),
    ];
    (script, expected)
}

/// vCPU 1 runs the guest's own `int3` while GDB has a software breakpoint
/// set elsewhere (so `#BP` exits are on): the `#BP` goes to the guest's
/// handler, GDB never hears of it, and the guest runs to its end. The
/// server's log must say the handler ran: [`GUEST_OWN_INT3_LOG`].
pub fn guest_own_int3() -> (String, Vec<String>) {
    let script = format!("break *{:#x}\ncontinue\n", guest::SW_AFTER);
    let expected = vec!["[Inferior 1 (process 1) exited normally]".to_string()];
    (script, expected)
}

/// What the VMM logs when the guest's own `#BP` handler ran on vCPU 1.
pub const GUEST_OWN_INT3_LOG: &str = "vCPU 1: the guest's own handler ran for vector 3";

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

/// Watchpoints on regions no single slot covers, and a read watchpoint, on
/// vCPU 1 running the data-access routine (rax given a value first, so every
/// write changes the bytes it writes the first time):
/// * `watch` on 6 bytes at `DATA + 3` (three slots: 1 + 4 + 1): the first
///   write inside is the 1-byte one at `DATA + 8`;
/// * `awatch` on 12 bytes at `DATA - 3` (four slots: 1 + 2 + 8 + 1): the
///   next access inside is the 1-byte write at `DATA`;
/// * `rwatch` on the byte at `DATA + 4`, which the guest first writes (the
///   8-byte write, changing it to 0x44) and then reads (the 8-byte read):
///   only the read is reported.
///
/// Each stop's packet is logged (`set debug remote 1`) to show the address
/// in it is the one GDB set, not the piece's. Returns the script, the lines
/// GDB must print, and lines it must print exactly once.
pub fn region_watchpoints() -> (String, Vec<String>, Vec<String>) {
    let d = guest::DATA;
    let a = &guest::DATA_ACCESSES;
    let script = format!(
        r#"thread 2
set $rax = 0x1122334455667788
watch *(char (*)[6]){d3:#x}
set debug remote 1
continue
set debug remote 0
printf "odd watch stop: pc=%#lx\n", $pc
delete
awatch *(char (*)[12]){dm3:#x}
set debug remote 1
continue
set debug remote 0
printf "odd awatch stop: pc=%#lx\n", $pc
delete
rwatch *(char *){d4:#x}
set debug remote 1
continue
set debug remote 0
printf "rwatch stop: pc=%#lx\n", $pc
delete
continue
"#,
        d3 = d + 3,
        dm3 = d - 3,
        d4 = d + 4,
    );
    let expected = vec![
        format!("Hardware watchpoint 1: *(char (*)[6]){:#x}", d + 3),
        format!("T05thread:p01.02;watch:{};", packet_hex(d + 3)),
        r#"New value = "\000\000\000\000\000\210""#.to_string(),
        format!("odd watch stop: pc={:#x}", a[0].next),
        format!("Hardware access (read/write) watchpoint 2: *(char (*)[12]){:#x}", d - 3),
        format!("T05thread:p01.02;awatch:{};", packet_hex(d - 3)),
        format!("odd awatch stop: pc={:#x}", a[1].next),
        format!("Hardware read watchpoint 3: *(char *){:#x}", d + 4),
        format!("T05thread:p01.02;rwatch:{};", packet_hex(d + 4)),
        "Value = 68 'D'".to_string(),
        // The read, not the write two instructions before it.
        format!("rwatch stop: pc={:#x}", a[9].next),
        "[Inferior 1 (process 1) exited normally]".to_string(),
    ];
    let once = vec![
        "hit Hardware read watchpoint 3".to_string(),
        format!("T05thread:p01.02;rwatch:{};", packet_hex(d + 4)),
    ];
    (script, expected, once)
}

/// An address as a stop packet spells it: hex, whole bytes.
pub fn packet_hex(v: u64) -> String {
    let s = format!("{v:x}");
    if s.len() % 2 == 1 {
        format!("0{s}")
    } else {
        s
    }
}

/// `what` is in `text` exactly once.
#[track_caller]
pub fn expect_once(text: &str, what: &str) {
    assert_eq!(text.matches(what).count(), 1, "expected {what:?} once in:\n{text}");
}

/// What a vCPU's x87/SSE state holds before GDB touches it, as whoever put
/// it there says (the simulated vCPU's setup; KVM's reset state, read from a
/// fresh vCPU of another VM).
#[derive(Debug, Clone, Copy)]
pub struct FpuAtStart {
    /// FCW.
    pub fctrl: u16,
    /// MXCSR.
    pub mxcsr: u32,
    /// xmm0.
    pub xmm0: u128,
    /// st0 as GDB prints it (`p $st0`).
    pub st0: &'static str,
}

/// The value of register `name` in an `info registers NAME` line of `text`.
pub fn info_register(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some(name)).then(|| words.next().map(str::to_string))?
    })
}

/// x87/SSE and segment registers on thread 1 (vCPU 0, held at the straight
/// line's first instruction): read, write, a step (so GDB reads them back
/// from the vCPU, after a run), a selector write, then writes the stub must
/// refuse (a python `try` keeps the batch script going after each error
/// reply), each changing nothing. Returns the script and the lines GDB must
/// print; callers check the `info registers` values with [`info_register`].
pub fn registers(at_start: &FpuAtStart) -> (String, Vec<String>) {
    let i = guest::STRAIGHT_INSNS;
    let script = r#"set scheduler-locking step
thread 1
info registers xmm0
p $xmm0
p $st0
info registers mxcsr
info registers fctrl
set $xmm0.v4_int32[0] = 42
set $xmm15.v2_int64[1] = 0x1122334455667788
set $st0 = 1.5
stepi
printf "after stepi: pc=%#lx\n", $pc
p $xmm0.v4_int32
p/x $xmm15.v2_int64
p $st0
set $ds = 0x18
stepi
printf "selectors: cs=%#x ss=%#x ds=%#x es=%#x\n", $cs, $ss, $ds, $es
python
for cmd in ("set $cs = 0xb", "set $ss = 0", "set $mxcsr = 0x11f80", "set $fop = 0x800"):
    try:
        gdb.execute(cmd)
        print("accepted: " + cmd)
    except gdb.error as e:
        print("refused: %s: %s" % (cmd, e))
end
printf "after refusals: cs=%#x ss=%#x mxcsr=%#x fop=%#x xmm0[0]=%d\n", $cs, $ss, $mxcsr, $fop, $xmm0.v4_int32[0]
printf "pc=%#lx\n", $pc
detach
"#
    .to_string();
    let (cs, ds) = (guest::CODE_SELECTOR, guest::DATA_SELECTOR);
    let low32 = at_start.xmm0 as u32 as i32;
    let expected = vec![
        format!("uint128 = {:#x}}}", at_start.xmm0),
        format!("v4_int32 = {{{}, ", low32),
        format!("$2 = {}", at_start.st0),
        format!("after stepi: pc={:#x}", i[1]),
        format!("= {{42, {}, ", (at_start.xmm0 >> 32) as u32 as i32),
        "= {0x0, 0x1122334455667788}".to_string(),
        "= 1.5".to_string(),
        format!("selectors: cs={cs:#x} ss={ds:#x} ds=0x18 es={ds:#x}"),
        "refused: set $cs = 0xb: Could not write register \"cs\"; remote failure reply 'E16'".to_string(),
        // 64-bit code: a null ss is a state the CPU can be in.
        "accepted: set $ss = 0".to_string(),
        // Bit 16 is outside every CPU's MXCSR_MASK: EINVAL, nothing changed.
        "refused: set $mxcsr = 0x11f80: Could not write register \"mxcsr\"; remote failure reply 'E16'".to_string(),
        "refused: set $fop = 0x800: Could not write register \"fop\"; remote failure reply 'E16'".to_string(),
        format!(
            "after refusals: cs={cs:#x} ss=0 mxcsr={} fop=0 xmm0[0]=42",
            c_hex(at_start.mxcsr)
        ),
        format!("pc={:#x}", i[2]),
        "[Inferior 1 (process 1) detached]".to_string(),
    ];
    (script, expected)
}

/// `printf "%#x"` as C (and GDB) does it: zero is `0`, not `0x0`.
pub fn c_hex(v: u32) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// Checks the `info registers mxcsr` and `fctrl` lines against `at_start`.
#[track_caller]
pub fn expect_fpu_at_start(text: &str, at_start: &FpuAtStart) {
    assert_eq!(
        info_register(text, "mxcsr"),
        Some(format!("{:#x}", at_start.mxcsr)),
        "{text}"
    );
    assert_eq!(
        info_register(text, "fctrl"),
        Some(format!("{:#x}", at_start.fctrl)),
        "{text}"
    );
}

/// Runs `gdb -batch` on `script` (after connecting to `127.0.0.1:port`); returns what it printed.
pub fn gdb(gdb: &Path, port: u16, server_log: &dyn Fn() -> String, name: &str, script: &str) -> String {
    gdb_signalled(gdb, port, server_log, name, script, None)
}

/// As [`gdb`], connecting with `target remote TARGET` (a Unix socket's path).
pub fn gdb_at(gdb: &Path, target: &str, server_log: &dyn Fn() -> String, name: &str, script: &str) -> String {
    run_gdb(gdb, target, server_log, name, script, None)
}

/// As [`gdb`], and sends gdb SIGINT (what Ctrl-C at its prompt does) once,
/// `after` it started: GDB then interrupts the running target.
pub fn gdb_interrupting(
    gdb: &Path,
    port: u16,
    server_log: &dyn Fn() -> String,
    name: &str,
    script: &str,
    after: Option<Duration>,
) -> String {
    gdb_signalled(gdb, port, server_log, name, script, after.map(|a| (a, "-INT")))
}

/// As [`gdb`], and sends gdb `signal` (`-INT`, `-KILL`) once, the given
/// time after it started.
pub fn gdb_signalled(
    gdb: &Path,
    port: u16,
    server_log: &dyn Fn() -> String,
    name: &str,
    script: &str,
    signal: Option<(Duration, &str)>,
) -> String {
    run_gdb(gdb, &format!("127.0.0.1:{port}"), server_log, name, script, signal)
}

fn run_gdb(
    gdb: &Path,
    target: &str,
    server_log: &dyn Fn() -> String,
    name: &str,
    script: &str,
    signal: Option<(Duration, &str)>,
) -> String {
    let dir = std::env::temp_dir().join(format!("kvm-glue-gdb-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{name}.gdb"));
    let full = format!("set pagination off\nset confirm off\nset width 0\ntarget remote {target}\n{script}");
    std::fs::write(&path, &full).expect("write script");
    let mut child = Command::new(gdb)
        .args(["-q", "-nx", "-batch", "-x"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gdb");
    let started = Instant::now();
    let deadline = started + TIMEOUT;
    let mut signal = signal;
    while child.try_wait().expect("try_wait").is_none() {
        if let Some((_, sig)) = signal.filter(|(after, _)| started.elapsed() >= *after) {
            signal = None;
            let sent = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(sent.success(), "kill {sig} gdb failed");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gdb did not finish {name}; server said:\n{}", server_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("gdb output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("---- gdb transcript: {name} ----\n{text}---- end {name} ----");
    text
}

/// Every line of `expected` is in `text`.
#[track_caller]
pub fn expect_all(text: &str, expected: &[String]) {
    for e in expected {
        expect(text, e);
    }
}

/// `what` is in `text`.
#[track_caller]
pub fn expect(text: &str, what: &str) {
    assert!(text.contains(what), "expected {what:?} in:\n{text}");
}

/// Every register the server serves, in regnum order, with its width in
/// bits: gdb's amd64 core and SSE registers (gdb's `64bit-core.xml` and
/// `64bit-sse.xml` order, which gdbstub_arch's `g` packet follows), then
/// QEMU's x86-64 system registers. Written out by hand, not taken from the
/// server's table.
pub const SERVED_REGS: [(&str, usize); 66] = [
    ("rax", 64),
    ("rbx", 64),
    ("rcx", 64),
    ("rdx", 64),
    ("rsi", 64),
    ("rdi", 64),
    ("rbp", 64),
    ("rsp", 64),
    ("r8", 64),
    ("r9", 64),
    ("r10", 64),
    ("r11", 64),
    ("r12", 64),
    ("r13", 64),
    ("r14", 64),
    ("r15", 64),
    ("rip", 64),
    ("eflags", 32),
    ("cs", 32),
    ("ss", 32),
    ("ds", 32),
    ("es", 32),
    ("fs", 32),
    ("gs", 32),
    ("st0", 80),
    ("st1", 80),
    ("st2", 80),
    ("st3", 80),
    ("st4", 80),
    ("st5", 80),
    ("st6", 80),
    ("st7", 80),
    ("fctrl", 32),
    ("fstat", 32),
    ("ftag", 32),
    ("fiseg", 32),
    ("fioff", 32),
    ("foseg", 32),
    ("fooff", 32),
    ("fop", 32),
    ("xmm0", 128),
    ("xmm1", 128),
    ("xmm2", 128),
    ("xmm3", 128),
    ("xmm4", 128),
    ("xmm5", 128),
    ("xmm6", 128),
    ("xmm7", 128),
    ("xmm8", 128),
    ("xmm9", 128),
    ("xmm10", 128),
    ("xmm11", 128),
    ("xmm12", 128),
    ("xmm13", 128),
    ("xmm14", 128),
    ("xmm15", 128),
    ("mxcsr", 32),
    ("fs_base", 64),
    ("gs_base", 64),
    ("k_gs_base", 64),
    ("cr0", 64),
    ("cr2", 64),
    ("cr3", 64),
    ("cr4", 64),
    ("cr8", 64),
    ("efer", 64),
];

/// A raw GDB remote-protocol client: what a client that is neither GDB nor
/// LLDB sends, packet by packet.
pub struct Rsp {
    s: std::net::TcpStream,
}

impl Rsp {
    /// Connects to the server on `127.0.0.1:port`; every answer is awaited
    /// for at most `wait`.
    pub fn connect(port: u16, wait: Duration) -> Rsp {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the server");
        s.set_read_timeout(Some(wait)).expect("read timeout");
        Rsp { s }
    }

    /// Sends one packet.
    pub fn send(&mut self, body: &str) {
        use std::io::Write;
        let sum = body.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        self.s
            .write_all(format!("${body}#{sum:02x}").as_bytes())
            .expect("send a packet");
    }

    /// The next packet's body (run-length and binary escapes decoded), or
    /// `None` if none came in time or the server closed the connection.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        use std::io::{Read, Write};
        let mut byte = [0u8; 1];
        let mut next = |s: &mut std::net::TcpStream| match s.read(&mut byte) {
            Ok(1) => Some(byte[0]),
            _ => None,
        };
        // Acks ('+') and anything else before the packet.
        while next(&mut self.s)? != b'$' {}
        let mut raw = Vec::new();
        loop {
            match next(&mut self.s)? {
                b'#' => break,
                b => raw.push(b),
            }
        }
        next(&mut self.s)?;
        next(&mut self.s)?;
        self.s.write_all(b"+").ok()?;
        let mut body: Vec<u8> = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'}' if i + 1 < raw.len() => {
                    body.push(raw[i + 1] ^ 0x20);
                    i += 2;
                }
                b'*' if i + 1 < raw.len() => {
                    let last = *body.last()?;
                    body.extend(std::iter::repeat_n(last, usize::from(raw[i + 1]).saturating_sub(29)));
                    i += 2;
                }
                b => {
                    body.push(b);
                    i += 1;
                }
            }
        }
        Some(body)
    }

    /// Sends `body` and returns the answer as text (panics if none came).
    pub fn ask(&mut self, body: &str) -> String {
        self.send(body);
        let got = self.recv().unwrap_or_else(|| panic!("no answer to {body:?}"));
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The whole `target.xml`, read with `qXfer:features:read` in pieces.
    pub fn target_xml(&mut self) -> String {
        let mut xml = String::new();
        loop {
            let got = self.ask(&format!("qXfer:features:read:target.xml:{:x},200", xml.len()));
            let (kind, rest) = got.split_at(1.min(got.len()));
            xml.push_str(rest);
            match kind {
                "m" => continue,
                "l" => return xml,
                _ => panic!("qXfer:features:read answered {got:?}"),
            }
        }
    }
}

/// The value of `attr="..."` in the XML element `elem`.
pub fn xml_attr<'a>(elem: &'a str, attr: &str) -> Option<&'a str> {
    let at = elem.find(&format!(" {attr}=\""))? + attr.len() + 3;
    let len = elem[at..].find('"')?;
    Some(&elem[at..at + len])
}

/// Every `<reg .../>` element of `xml`, in order.
pub fn xml_regs(xml: &str) -> Vec<&str> {
    xml.match_indices("<reg ")
        .filter_map(|(at, _)| xml[at..].find("/>").map(|end| &xml[at..at + end]))
        .collect()
}

/// Checks a target description against [`SERVED_REGS`] and a `g` packet
/// of `g_hex_len` hex digits: every register once, regnums 0–65 in order,
/// offsets adding up, the generic roles LLDB needs.
pub fn check_target_xml(xml: &str, g_hex_len: usize) {
    assert!(xml.contains("<architecture>i386:x86-64</architecture>"), "{xml}");
    for feature in [
        "org.gnu.gdb.i386.core",
        "org.gnu.gdb.i386.sse",
        "org.gnu.gdb.i386.segments",
    ] {
        assert!(
            xml.contains(&format!("<feature name=\"{feature}\">")),
            "{feature}: {xml}"
        );
    }
    let regs = xml_regs(xml);
    let names: Vec<&str> = regs.iter().filter_map(|r| xml_attr(r, "name")).collect();
    let want: Vec<&str> = SERVED_REGS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, want, "{xml}");
    let mut offset = 0;
    for (n, (r, (name, bits))) in regs.iter().zip(SERVED_REGS).enumerate() {
        assert_eq!(xml_attr(r, "regnum"), Some(n.to_string().as_str()), "{name}: {r}");
        assert_eq!(xml_attr(r, "bitsize"), Some(bits.to_string().as_str()), "{name}: {r}");
        assert_eq!(xml_attr(r, "offset"), Some(offset.to_string().as_str()), "{name}: {r}");
        assert!(xml_attr(r, "type").is_some() && xml_attr(r, "group").is_some(), "{r}");
        offset += bits / 8;
    }
    assert_eq!(offset, 608);
    assert_eq!(g_hex_len, 2 * offset, "the g packet is not what the description says");
    for (name, role) in [("rip", "pc"), ("rsp", "sp"), ("rbp", "fp"), ("eflags", "flags")] {
        let r = regs.iter().find(|r| xml_attr(r, "name") == Some(name)).copied();
        assert_eq!(r.and_then(|r| xml_attr(r, "generic")), Some(role), "{name}");
    }
}
