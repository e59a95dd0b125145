//! The GDB adapter without KVM: the real `gdb` against [`serve`] in this
//! process, on two simulated vCPUs.
//!
//! A simulated vCPU is a [`FakeVcpu`] (registers, `KVM_SET_GUEST_DEBUG`,
//! `KVM_TRANSLATE`) plus a small interpreter for the tiny guest's routines
//! that honours the debug configuration the vCPU *applied* the way the SDM
//! says a CPU does: `int3` exits with exception 3 at the `int3` when
//! `USE_SW_BP` is set, execute breakpoints fault before the instruction,
//! data breakpoints and single-step trap after it (DR6 B0–B3, BS). Its
//! thread runs the same VMM loop as the example (`before_run`, run,
//! `handle_exit`, `report_stop`), and a kick sets a flag the interpreter
//! checks between instructions.
//!
//! So the scenarios `gdb_e2e.rs` can only run where the host's KVM delivers
//! them — software breakpoint hits and watchpoints — run here everywhere,
//! through the same adapter code.

mod gdb_scenarios;
use gdb_scenarios as scenarios;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_glue::fake::FakeVcpu;
use kvm_glue::gdb::{serve, serve_unix, GuestEnd, HostDebug, Options};
use kvm_glue::guest;
use kvm_glue::{Handled, RunState, VcpuDebug, VmDebug, Woke};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap;

const ENABLE: u32 = 0x1;
const SINGLESTEP: u32 = 0x2;
const USE_SW_BP: u32 = 0x1_0000;
const USE_HW_BP: u32 = 0x2_0000;
const INJECT_BP: u32 = 0x8_0000;
const DR6_FIXED: u64 = 0xffff_0ff0;
const DR6_BS: u64 = 1 << 14;

/// What one simulated run ended with.
#[derive(Debug)]
enum SimExit {
    Debug(kvm_bindings::kvm_debug_exit_arch),
    Out(u16, u8),
    Hlt,
    /// Kicked, or a slice of instructions done: back to `before_run`.
    Interrupted,
    /// Something the interpreter does not know: a test failure.
    Unknown(u64, u8),
}

/// One decoded instruction of the tiny guest.
enum Insn {
    Plain(u64),
    Out(u64, u16),
    Hlt,
    Jmp(u64, i8),
    /// A data access: length, address register offset, size, write?
    Access {
        len: u64,
        disp: u64,
        size: u64,
        write: bool,
    },
    MovEdi(u32),
    IncRax,
    MovEax(u32),
}

fn decode(b: &[u8]) -> Option<Insn> {
    let imm32 = |i: usize| b.get(i..i + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    Some(match *b {
        [0x90, ..] => Insn::Plain(1),
        [0xB8, ..] => Insn::MovEax(imm32(1)?),
        [0xBF, ..] => Insn::MovEdi(imm32(1)?),
        [0x83, 0xC0, _, ..] => Insn::Plain(3),
        [0xFF, 0xC1 | 0xC0, ..] | [0x31, 0xD2, ..] | [0x89, 0xC3, ..] => Insn::Plain(2),
        [0xE6, port, ..] => Insn::Out(2, u16::from(port)),
        [0xF4, ..] => Insn::Hlt,
        [0xEB, rel, ..] => Insn::Jmp(2, rel as i8),
        [0x48, 0xFF, 0xC0, ..] => Insn::IncRax,
        [0x88, 0x47, d, ..] => acc(3, d, 1, true),
        [0x88, 0x07, ..] => acc(2, 0, 1, true),
        [0x66, 0x89, 0x07, ..] => acc(3, 0, 2, true),
        [0x89, 0x07, ..] => acc(2, 0, 4, true),
        [0x48, 0x89, 0x07, ..] => acc(3, 0, 8, true),
        [0x8A, 0x47, d, ..] => acc(3, d, 1, false),
        [0x8A, 0x07, ..] => acc(2, 0, 1, false),
        [0x66, 0x8B, 0x07, ..] => acc(3, 0, 2, false),
        [0x8B, 0x07, ..] => acc(2, 0, 4, false),
        [0x48, 0x8B, 0x07, ..] => acc(3, 0, 8, false),
        _ => return None,
    })
}

fn acc(len: u64, disp: u8, size: u64, write: bool) -> Insn {
    Insn::Access {
        len,
        disp: u64::from(disp),
        size,
        write,
    }
}

/// A simulated vCPU of the tiny guest.
struct SimVcpu {
    fake: FakeVcpu,
    mem: Mem,
    kicked: AtomicBool,
    /// `KVM_SET_GUEST_DEBUG` calls already looked at for INJECT_BP.
    seen: std::sync::atomic::AtomicUsize,
}

impl SimVcpu {
    /// Runs until an exit, a kick, or 10 000 instructions.
    fn run(&self) -> SimExit {
        let gd = self.fake.guest_debug().unwrap_or_default();
        let on = |flag: u32| gd.control & ENABLE != 0 && gd.control & flag != 0;
        let dr = gd.arch.debugreg;
        let slot = |i: usize| -> Option<(u64, u64, u64)> {
            // (address, R/W, length in bytes) of an enabled slot.
            let enabled = dr[7] >> (2 * i) & 0b11 != 0;
            let rw = dr[7] >> (16 + 4 * i) & 0b11;
            let len = match dr[7] >> (18 + 4 * i) & 0b11 {
                0 => 1,
                1 => 2,
                2 => 8,
                _ => 4,
            };
            (enabled && on(USE_HW_BP)).then_some((dr[i], rw, len))
        };
        let exit = |pc: u64, exception: u32, dr6: u64| {
            SimExit::Debug(kvm_bindings::kvm_debug_exit_arch {
                exception,
                pad: 0,
                pc,
                dr6,
                dr7: dr[7],
            })
        };
        let mut regs = self.fake.regs();
        // KVM queues an injected exception when KVM_SET_GUEST_DEBUG asks for
        // it; the next run delivers it. The #BP exit left RIP at the int3:
        // the guest's handler (report the vector, return) runs, and returns
        // after the int3.
        let history = self.fake.debug_history();
        let seen = self.seen.swap(history.len(), Ordering::AcqRel);
        if history.iter().skip(seen).any(|d| d.control & INJECT_BP != 0) {
            regs.rip += 1;
            self.fake.put_regs(regs);
            return SimExit::Out(guest::PORT_VECTOR, 3);
        }
        for _ in 0..10_000 {
            if self.kicked.swap(false, Ordering::AcqRel) {
                self.fake.put_regs(regs);
                return SimExit::Interrupted;
            }
            let rip = regs.rip;
            let mut bytes = [0u8; 8];
            if self.mem.read_slice(&mut bytes, GuestAddress(rip)).is_err() {
                return SimExit::Unknown(rip, 0);
            }
            if bytes[0] == 0xCC {
                self.fake.put_regs(regs);
                return if on(USE_SW_BP) {
                    exit(rip, 3, DR6_FIXED)
                } else {
                    SimExit::Unknown(rip, 0xCC)
                };
            }
            // Execute breakpoints are faults: before the instruction.
            let exec_hits = (0..4)
                .filter(|&i| slot(i).is_some_and(|(a, rw, _)| rw == 0 && a == rip))
                .fold(0u64, |m, i| m | 1 << i);
            if exec_hits != 0 {
                self.fake.put_regs(regs);
                return exit(rip, 1, DR6_FIXED | exec_hits);
            }
            let Some(insn) = decode(&bytes) else {
                return SimExit::Unknown(rip, bytes[0]);
            };
            let mut data_hits = 0u64;
            let mut out = None;
            match insn {
                Insn::Plain(n) => regs.rip += n,
                Insn::MovEax(v) => {
                    regs.rax = u64::from(v);
                    regs.rip += 5;
                }
                Insn::MovEdi(v) => {
                    regs.rdi = u64::from(v);
                    regs.rip += 5;
                }
                Insn::IncRax => {
                    regs.rax = regs.rax.wrapping_add(1);
                    regs.rip += 3;
                }
                Insn::Out(n, port) => {
                    regs.rip += n;
                    out = Some(port);
                }
                Insn::Hlt => {
                    regs.rip += 1;
                    self.fake.put_regs(regs);
                    return SimExit::Hlt;
                }
                Insn::Jmp(n, rel) => regs.rip = (regs.rip + n).wrapping_add_signed(i64::from(rel)),
                Insn::Access { len, disp, size, write } => {
                    let addr = regs.rdi + disp;
                    let n = size as usize;
                    if write {
                        let _ = self.mem.write_slice(&regs.rax.to_le_bytes()[..n], GuestAddress(addr));
                    } else {
                        let mut v = [0u8; 8];
                        let _ = self.mem.read_slice(&mut v[..n], GuestAddress(addr));
                        let mask = if n == 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 };
                        regs.rax = (regs.rax & !mask) | (u64::from_le_bytes(v) & mask);
                    }
                    // Data breakpoints are traps: after the access, on overlap.
                    data_hits = (0..4)
                        .filter(|&i| {
                            slot(i).is_some_and(|(a, rw, l)| {
                                (rw == 1 && write || rw == 3) && addr < a + l && a < addr + size
                            })
                        })
                        .fold(0u64, |m, i| m | 1 << i);
                    regs.rip += len;
                }
            }
            let step = on(SINGLESTEP);
            if data_hits != 0 || step {
                self.fake.put_regs(regs);
                return exit(regs.rip, 1, DR6_FIXED | data_hits | if step { DR6_BS } else { 0 });
            }
            if let Some(port) = out {
                self.fake.put_regs(regs);
                return SimExit::Out(port, regs.rax as u8);
            }
        }
        self.fake.put_regs(regs);
        SimExit::Interrupted
    }
}

/// The tiny guest's memory: every routine at its address.
fn image() -> Mem {
    let mem = Mem::from_ranges(&[(GuestAddress(0), guest::MEM_SIZE)]).expect("guest memory");
    for (addr, code) in guest::ROUTINES {
        mem.write_slice(code, GuestAddress(addr)).expect("routine");
    }
    mem
}

/// The VMM loop of the example, on a simulated vCPU.
fn vcpu_loop(
    sim: &SimVcpu,
    mut vdbg: VcpuDebug<Mem>,
    quit: &AtomicBool,
    finished: &dyn Fn(),
    vectors: &Mutex<Vec<(usize, u8)>>,
) {
    let mut done = false;
    while !quit.load(Ordering::Acquire) {
        vdbg.before_run(&sim.fake).expect("before_run");
        match sim.run() {
            SimExit::Debug(arch) => {
                if let Handled::Stop(event) = vdbg.handle_exit(&sim.fake, &arch).expect("handle_exit") {
                    vdbg.report_stop(event).expect("report_stop");
                }
            }
            SimExit::Out(guest::PORT_DONE, _) if !done => {
                done = true;
                finished();
            }
            SimExit::Out(guest::PORT_VECTOR, v) => vectors.lock().expect("vectors").push((vdbg.id(), v)),
            SimExit::Out(..) | SimExit::Interrupted => {}
            // As the example: halted outside the (simulated) KVM_RUN until
            // the debugger wants this vCPU; no interrupt source wakes it.
            SimExit::Hlt => {
                while let Woke::Stop | Woke::Intent = vdbg.wait_idle(None).expect("wait_idle") {
                    if quit.load(Ordering::Acquire) {
                        return;
                    }
                    vdbg.before_run(&sim.fake).expect("before_run");
                }
            }
            SimExit::Unknown(rip, byte) => panic!("simulated vCPU: cannot run {byte:#04x} at {rip:#x}"),
        }
    }
}

/// Two simulated vCPUs held at their first instruction, and `serve` on a
/// loopback port, all on threads of this process.
struct SimVm {
    port: u16,
    /// What `target remote` takes: `127.0.0.1:PORT`, or the socket's path.
    target: String,
    sims: Vec<Arc<SimVcpu>>,
    log: Arc<Mutex<String>>,
    served: Option<std::thread::JoinHandle<Result<u8, kvm_glue::gdb::GdbError>>>,
    quit: Arc<AtomicBool>,
    dbg: VmDebug<Mem>,
    mem: Mem,
    /// (vCPU, vector) for each time the guest's own exception handler ran.
    vectors: Arc<Mutex<Vec<(usize, u8)>>>,
}

/// -2 as an x87 80-bit value: sign and exponent 0xC000, mantissa
/// 0x8000_0000_0000_0000.
const MINUS_TWO: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0x00, 0xc0];

/// What the simulated vCPUs' x87/SSE state starts with (put there below).
const SIM_FPU: scenarios::FpuAtStart = scenarios::FpuAtStart {
    fctrl: 0x37f,
    mxcsr: 0x1f80,
    xmm0: 0x0000_0007_0000_0005,
    st0: "-2",
};

/// The segments the tiny guest's setup loads (guest.rs): 64-bit code at
/// CODE_SELECTOR, flat data at DATA_SELECTOR; a base on fs so that a kept
/// base is visible.
fn sim_sregs() -> kvm_sregs {
    let mut s = kvm_sregs {
        cr0: 0x8000_0033,
        cr4: 0x620,
        efer: 0x500,
        ..Default::default()
    };
    s.cs = kvm_segment {
        selector: guest::CODE_SELECTOR,
        limit: 0xffff_ffff,
        type_: 11,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: guest::DATA_SELECTOR,
        limit: 0xffff_ffff,
        type_: 3,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    };
    (s.ss, s.ds, s.es, s.gs) = (data, data, data, data);
    s.fs = kvm_segment {
        base: 0x7000_0000,
        ..data
    };
    s
}

fn sim_fpu() -> kvm_fpu {
    let mut f = kvm_fpu {
        fcw: SIM_FPU.fctrl,
        mxcsr: SIM_FPU.mxcsr,
        // FSW.TOP = 7: st0 is physical register 7, the one tagged valid.
        fsw: 7 << 11,
        ftwx: 0x80,
        ..Default::default()
    };
    f.fpr[0][..10].copy_from_slice(&MINUS_TWO);
    f.xmm[0] = SIM_FPU.xmm0.to_le_bytes();
    f
}

/// Where `serve` listens.
enum Listen {
    Tcp,
    Unix(PathBuf),
}

/// The simulated vCPUs deliver everything a VMX/SVM KVM does.
fn sim_host() -> HostDebug {
    HostDebug::full("simulated vCPUs (int3 exits and data breakpoints)")
}

impl SimVm {
    fn start(vcpu1_rip: u64) -> SimVm {
        SimVm::start_on(vcpu1_rip, Listen::Tcp)
    }

    fn start_on(vcpu1_rip: u64, listen: Listen) -> SimVm {
        SimVm::start_with(vcpu1_rip, listen, sim_host())
    }

    /// As [`SimVm::start_on`], serving as on a host that delivers what `host` says.
    fn start_with(vcpu1_rip: u64, listen: Listen, host: HostDebug) -> SimVm {
        let mem = image();
        let dbg = VmDebug::new(mem.clone());
        let sims: Vec<Arc<SimVcpu>> = [guest::STRAIGHT, vcpu1_rip]
            .iter()
            .enumerate()
            .map(|(id, &rip)| {
                let fake = FakeVcpu::new();
                fake.put_regs(kvm_regs {
                    rip,
                    rsp: guest::STACK_TOP + id as u64 * 0x1000,
                    rflags: guest::RFLAGS_FIXED,
                    ..Default::default()
                });
                fake.put_sregs(sim_sregs());
                fake.put_fpu(sim_fpu());
                Arc::new(SimVcpu {
                    fake,
                    mem: mem.clone(),
                    kicked: AtomicBool::new(false),
                    seen: std::sync::atomic::AtomicUsize::new(0),
                })
            })
            .collect();
        let kick_targets = sims.clone();
        dbg.set_kick(Arc::new(move |id: usize| {
            if let Some(s) = kick_targets.get(id) {
                s.kicked.store(true, Ordering::Release);
            }
            Ok(())
        }))
        .expect("set_kick");
        let handles: Vec<VcpuDebug<Mem>> = (0..sims.len()).map(|id| dbg.vcpu(id).expect("vCPU handle")).collect();
        // Held before the first instruction, as in the example.
        let stopper = {
            let dbg = dbg.clone();
            std::thread::spawn(move || dbg.stop_all(Duration::from_secs(10)))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dbg
            .vcpu_ids()
            .expect("ids")
            .iter()
            .all(|&id| dbg.run_state(id).is_ok_and(|s| s != RunState::Running))
        {
            assert!(Instant::now() < deadline, "vCPUs not held");
            std::thread::sleep(Duration::from_millis(1));
        }
        let end = GuestEnd::new().expect("eventfd");
        let left = Arc::new(Mutex::new(sims.len()));
        let quit = Arc::new(AtomicBool::new(false));
        let go = Arc::new(Barrier::new(sims.len() + 1));
        let vectors = Arc::new(Mutex::new(Vec::new()));
        for (sim, vdbg) in sims.iter().cloned().zip(handles) {
            let (quit, go, left, end) = (quit.clone(), go.clone(), left.clone(), end.clone());
            let vectors = vectors.clone();
            std::thread::spawn(move || {
                go.wait();
                let finished = || {
                    let mut l = left.lock().expect("left");
                    *l -= 1;
                    if *l == 0 {
                        end.end(0).expect("end");
                    }
                };
                vcpu_loop(&sim, vdbg, &quit, &finished, &vectors);
            });
        }
        go.wait();
        stopper.join().expect("stopper").expect("stop_all");
        let log = Arc::new(Mutex::new(String::new()));
        let (dbg2, log2) = (dbg.clone(), log.clone());
        let options = Options {
            end: Some(end),
            host: Some(host),
            ..Options::default()
        };
        let on_event = move |e: &kvm_glue::gdb::ServeEvent| log2.lock().expect("log").push_str(&format!("{e}\n"));
        let (port, target, served) = match listen {
            Listen::Tcp => {
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                let port = listener.local_addr().expect("addr").port();
                let served = std::thread::spawn(move || serve(&listener, &dbg2, &options, on_event));
                (port, format!("127.0.0.1:{port}"), served)
            }
            Listen::Unix(path) => {
                let listener = UnixListener::bind(&path).expect("bind the socket");
                let served = std::thread::spawn(move || serve_unix(&listener, &dbg2, &options, on_event));
                (0, path.display().to_string(), served)
            }
        };
        SimVm {
            port,
            target,
            sims,
            log,
            served: Some(served),
            quit,
            dbg,
            mem,
            vectors,
        }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Waits until the server has logged the end of `n` sessions (it does
    /// after gdb has gone).
    fn wait_sessions(&self, n: usize) -> String {
        let deadline = Instant::now() + scenarios::TIMEOUT;
        loop {
            let log = self.log();
            if log.matches("GDB session ended").count() >= n {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} sessions in the server log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `serve` to return (the guest ended); its exit code.
    fn wait_end(&mut self) -> u8 {
        let deadline = Instant::now() + scenarios::TIMEOUT;
        let handle = self.served.take().expect("served once");
        while !handle.is_finished() {
            assert!(Instant::now() < deadline, "serve did not return:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        handle.join().expect("serve thread").expect("serve")
    }

    fn byte_exact(&self) -> bool {
        guest::ROUTINES.iter().all(|(addr, code)| {
            let mut now = vec![0u8; code.len()];
            self.mem.read_slice(&mut now, GuestAddress(*addr)).is_ok() && now == *code
        })
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Release);
        let _ = self.dbg.detach();
    }
}

fn run(test: &str, vm: &SimVm, name: &str, script: &str) -> Option<String> {
    let gdb = scenarios::find_gdb(test)?;
    Some(scenarios::gdb(&gdb, vm.port, &|| vm.log(), name, script))
}

#[test]
fn sim_gdb_drives_both_vcpus_to_the_end_of_the_guest() {
    let test = "sim_gdb_drives_both_vcpus_to_the_end_of_the_guest";
    let mut vm = SimVm::start(guest::SW);
    let (script, expected) = scenarios::main();
    let Some(out) = run(test, &vm, "sim-main", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    assert_eq!(vm.wait_end(), 0);
    scenarios::expect(&vm.log(), "GDB session ended (the guest ended with code 0)");
    assert!(vm.byte_exact());
}

#[test]
fn sim_software_breakpoint_stops_the_thread_that_ran_into_it() {
    let test = "sim_software_breakpoint_stops_the_thread_that_ran_into_it";
    let mut vm = SimVm::start(guest::SW);
    let (script, expected) = scenarios::software_breakpoint();
    let Some(out) = run(test, &vm, "sim-swbreak", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    assert_eq!(vm.wait_end(), 0);
    assert!(vm.byte_exact());
}

#[test]
fn sim_watchpoints_report_the_address_gdb_set() {
    let test = "sim_watchpoints_report_the_address_gdb_set";
    let mut vm = SimVm::start(guest::DATA_ACCESS);
    let (script, expected) = scenarios::watchpoints();
    let Some(out) = run(test, &vm, "sim-watch", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    assert_eq!(vm.wait_end(), 0);
    assert!(vm.byte_exact());
}

#[test]
fn sim_region_and_read_watchpoints_report_what_gdb_set() {
    let test = "sim_region_and_read_watchpoints_report_what_gdb_set";
    let mut vm = SimVm::start(guest::DATA_ACCESS);
    let (script, expected, once) = scenarios::region_watchpoints();
    let Some(out) = run(test, &vm, "sim-region-watch", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    for o in &once {
        scenarios::expect_once(&out, o);
    }
    assert_eq!(vm.wait_end(), 0);
    assert!(vm.byte_exact());
}

#[test]
fn sim_detach_removes_every_breakpoint_and_lets_the_guest_run_on() {
    let test = "sim_detach_removes_every_breakpoint_and_lets_the_guest_run_on";
    let mut vm = SimVm::start(guest::SW);
    let (script, expected) = scenarios::detach();
    let Some(out) = run(test, &vm, "sim-detach", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    assert_eq!(vm.wait_end(), 0);
    scenarios::expect(&vm.log(), "GDB session ended (detached)");
    assert!(vm.byte_exact());
}

#[test]
fn sim_running_into_a_software_breakpoint_after_detach_is_impossible() {
    // The int3 sits on vCPU 1's path: had detach left it, the simulated vCPU
    // would stop (or, with USE_SW_BP off, fail the test) instead of ending.
    let test = "sim_running_into_a_software_breakpoint_after_detach_is_impossible";
    let mut vm = SimVm::start(guest::SW);
    let script = format!(
        "set breakpoint always-inserted on\nbreak *{:#x}\ndetach\n",
        guest::SW_PATCH
    );
    if run(test, &vm, "sim-detach-int3", &script).is_none() {
        return;
    }
    assert_eq!(vm.wait_end(), 0);
    assert!(vm.byte_exact());
}

#[test]
fn sim_no_free_slot_and_bad_requests_are_refused_as_gdb_expects() {
    let test = "sim_no_free_slot_and_bad_requests_are_refused_as_gdb_expects";
    let vm = SimVm::start(guest::LOOP);
    let (script, expected) = scenarios::refusals();
    let Some(out) = run(test, &vm, "sim-refusals", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    // A packet gdbstub cannot parse ends the session (gdbstub 0.7 treats it
    // as a protocol error): the server detaches and the next debugger finds
    // the VM clean.
    let bad = run(test, &vm, "sim-malformed", "maint packet m10000,zz\n").unwrap_or_default();
    scenarios::expect(&bad, "Remote connection closed");
    let next = run(
        test,
        &vm,
        "sim-after-malformed",
        "monitor breakpoints\ninfo threads\ndetach\n",
    )
    .unwrap_or_default();
    scenarios::expect(&next, "no breakpoints");
    scenarios::expect(&next, "Thread 1.2 (vCPU 1)");
    let log = vm.wait_sessions(3);
    assert_eq!(log.matches("GDB connected").count(), 3, "{log}");
    scenarios::expect(&log, "GDB session ended (protocol error");
}

#[test]
fn sim_ctrl_c_stops_every_vcpu_and_names_a_thread() {
    let test = "sim_ctrl_c_stops_every_vcpu_and_names_a_thread";
    let vm = SimVm::start(guest::LOOP);
    let (script, expected) = scenarios::interrupt();
    let Some(gdb) = scenarios::find_gdb(test) else { return };
    let out = scenarios::gdb_interrupting(
        &gdb,
        vm.port,
        &|| vm.log(),
        "sim-interrupt",
        &script,
        Some(scenarios::INTERRUPT_AFTER),
    );
    scenarios::expect_all(&out, &expected);
}

#[test]
fn sim_both_vcpus_hitting_one_breakpoint_are_both_reported() {
    let test = "sim_both_vcpus_hitting_one_breakpoint_are_both_reported";
    let mut vm = SimVm::start(guest::STRAIGHT);
    let (script, expected) = scenarios::shared_breakpoint();
    let Some(out) = run(test, &vm, "sim-shared", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    assert_eq!(vm.wait_end(), 0);
}

#[test]
fn sim_registers_written_by_gdb_reach_the_vcpu() {
    let test = "sim_registers_written_by_gdb_reach_the_vcpu";
    let vm = SimVm::start(guest::SW);
    // The cache flushed: GDB reads back what the vCPU holds.
    let script = "thread 2\nset $rax = 0x1234\nset $rip = 0x10301\nmaint flush register-cache\nprintf \"rax=%#lx rip=%#lx\\n\", $rax, $rip\n";
    let Some(out) = run(test, &vm, "sim-regs", script) else {
        return;
    };
    scenarios::expect(&out, "rax=0x1234 rip=0x10301");
    drop(vm);
}

/// A scratch directory for Unix sockets, unique to this test process.
fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvm-glue-gdb-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket dir");
    let path = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn sim_x87_sse_and_selectors_read_and_written_by_gdb_reach_the_vcpu() {
    let test = "sim_x87_sse_and_selectors_read_and_written_by_gdb_reach_the_vcpu";
    let vm = SimVm::start(guest::SW);
    let (script, expected) = scenarios::registers(&SIM_FPU);
    let Some(out) = run(test, &vm, "sim-x87-sse", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    scenarios::expect_fpu_at_start(&out, &SIM_FPU);
    // The vCPU holds what GDB wrote, and the rest of every segment as it was.
    let fake = &vm.sims[0].fake;
    let fpu = fake.fpu();
    assert_eq!(u32::from_le_bytes(fpu.xmm[0][..4].try_into().expect("4 bytes")), 42);
    assert_eq!(&fpu.xmm[15][8..], &0x1122_3344_5566_7788u64.to_le_bytes());
    // 1.5 in st0 (physical 7), MXCSR untouched.
    assert_eq!(fpu.fpr[0][..10], [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0x3f]);
    assert_eq!(fpu.mxcsr, SIM_FPU.mxcsr);
    let (was, now) = (sim_sregs(), fake.sregs());
    assert_eq!(
        now.ds,
        kvm_segment {
            selector: 0x18,
            ..was.ds
        }
    );
    assert_eq!(now.ss, kvm_segment { selector: 0, ..was.ss });
    assert_eq!((now.cs, now.es, now.fs, now.gs), (was.cs, was.es, was.fs, was.gs));
    // vCPU 1 was not touched.
    assert_eq!(vm.sims[1].fake.fpu(), sim_fpu());
}

#[test]
fn sim_gdb_on_a_unix_socket_drives_the_guest_to_its_end() {
    let test = "sim_gdb_on_a_unix_socket_drives_the_guest_to_its_end";
    let path = socket_path("sim-main");
    let mut vm = SimVm::start_on(guest::SW, Listen::Unix(path.clone()));
    let Some(gdb) = scenarios::find_gdb(test) else { return };
    let (script, expected) = scenarios::main();
    let out = scenarios::gdb_at(&gdb, &vm.target, &|| vm.log(), "sim-unix-main", &script);
    scenarios::expect_all(&out, &expected);
    assert_eq!(vm.wait_end(), 0);
    scenarios::expect(&vm.log(), &format!("GDB connected from unix socket {}", path.display()));
    assert!(vm.byte_exact());
}

#[test]
fn a_unix_socket_without_a_path_is_refused() {
    use std::os::linux::net::SocketAddrExt;
    // An abstract socket has no file, so no permissions: anyone on the
    // machine could connect. serve_unix refuses it before accepting.
    let name = format!("kvm-glue-gdb-abstract-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let listener = UnixListener::bind_addr(&addr).expect("bind an abstract socket");
    let dbg = VmDebug::new(image());
    let served = serve_unix(&listener, &dbg, &Options::default(), |_| {});
    assert!(
        matches!(served, Err(kvm_glue::gdb::GdbError::NoSocketPath { .. })),
        "{served:?}"
    );
}

#[test]
fn sim_a_unix_socket_session_ends_clean_and_the_next_one_starts_clean() {
    let test = "sim_a_unix_socket_session_ends_clean_and_the_next_one_starts_clean";
    let path = socket_path("sim-again");
    let vm = SimVm::start_on(guest::LOOP, Listen::Unix(path));
    let Some(gdb) = scenarios::find_gdb(test) else { return };
    let first = format!(
        "set breakpoint always-inserted on\nbreak *{:#x}\nhbreak *{:#x}\nmonitor breakpoints\ndetach\n",
        guest::SW_AFTER,
        guest::STRAIGHT_INSNS[2]
    );
    let out = scenarios::gdb_at(&gdb, &vm.target, &|| vm.log(), "sim-unix-first", &first);
    scenarios::expect(&out, &format!("int3 at {:#x}", guest::SW_AFTER));
    scenarios::expect(&out, "[Inferior 1 (process 1) detached]");
    let second = format!(
        "monitor breakpoints\nx/1xb {:#x}\ninfo threads\ndetach\n",
        guest::SW_AFTER
    );
    let out = scenarios::gdb_at(&gdb, &vm.target, &|| vm.log(), "sim-unix-second", &second);
    scenarios::expect(&out, "no breakpoints");
    scenarios::expect(&out, &format!("{:#x}:\t0xff", guest::SW_AFTER));
    scenarios::expect(&out, "Thread 1.2 (vCPU 1)");
    let log = vm.wait_sessions(2);
    assert_eq!(log.matches("GDB session ended (detached)").count(), 2, "{log}");
    assert!(vm.byte_exact());
}

#[test]
fn sim_a_debugger_that_dies_mid_continue_is_detached_and_the_next_one_starts_clean() {
    let test = "sim_a_debugger_that_dies_mid_continue_is_detached_and_the_next_one_starts_clean";
    let vm = SimVm::start(guest::LOOP);
    let Some(gdb) = scenarios::find_gdb(test) else { return };
    let script = format!(
        "set breakpoint always-inserted on\nbreak *{:#x}\nhbreak *{:#x}\ncontinue\ncontinue\n",
        guest::SW_AFTER,
        guest::INT1,
    );
    // gdb is killed while the guest runs (waiting in `continue`): the
    // connection drops with an int3 and a slot set.
    let _ = scenarios::gdb_signalled(
        &gdb,
        vm.port,
        &|| vm.log(),
        "sim-killed",
        &script,
        Some((scenarios::INTERRUPT_AFTER, "-KILL")),
    );
    let log = vm.wait_sessions(1);
    scenarios::expect(&log, "GDB session ended (connection lost");
    let next = scenarios::gdb(
        &gdb,
        vm.port,
        &|| vm.log(),
        "sim-after-killed",
        &format!("monitor breakpoints\nx/1xb {:#x}\ndetach\n", guest::SW_AFTER),
    );
    scenarios::expect(&next, "no breakpoints");
    scenarios::expect(&next, &format!("{:#x}:\t0xff", guest::SW_AFTER));
    assert!(vm.byte_exact());
}

#[test]
fn sim_the_guests_own_int3_goes_to_the_guest_not_to_gdb() {
    let test = "sim_the_guests_own_int3_goes_to_the_guest_not_to_gdb";
    let mut vm = SimVm::start(guest::INT3);
    let (script, expected) = scenarios::guest_own_int3();
    let Some(out) = run(test, &vm, "sim-own-int3", &script) else {
        return;
    };
    scenarios::expect_all(&out, &expected);
    assert!(!out.contains("SIGTRAP"), "{out}");
    assert_eq!(vm.wait_end(), 0);
    assert_eq!(*vm.vectors.lock().expect("vectors"), [(1, 3)]);
    assert!(vm.byte_exact());
}

/// A raw remote-protocol client on the simulated VM, stopped at the start.
fn rsp(vm: &SimVm) -> scenarios::Rsp {
    let mut c = scenarios::Rsp::connect(vm.port, scenarios::TIMEOUT);
    let stop = c.ask("?");
    assert!(stop.starts_with('T'), "{stop}");
    c
}

/// Issue #17 item 1 on simulated vCPUs (whose KVM_GET_FPU, like the
/// kernel's, reports MXCSR as 0): `$mxcsr` is the vCPU's, a write reaches
/// it through KVM_SET_XSAVE, a bit outside MXCSR_MASK is refused.
#[test]
fn sim_mxcsr_is_read_from_xsave_and_a_write_reaches_the_vcpu() {
    let test = "sim_mxcsr_is_read_from_xsave_and_a_write_reaches_the_vcpu";
    let vm = SimVm::start(guest::SW);
    let script = r#"printf "mxcsr at start: %#x\n", $mxcsr
set $mxcsr = 0x1f00
maint flush register-cache
printf "mxcsr now: %#x\n", $mxcsr
python
try:
    gdb.execute("set $mxcsr = 0x11f80")
except gdb.error as e:
    print("refused: %s" % e)
end
detach
"#;
    let Some(out) = run(test, &vm, "sim-mxcsr", script) else {
        return;
    };
    scenarios::expect(&out, &format!("mxcsr at start: {:#x}", SIM_FPU.mxcsr));
    scenarios::expect(&out, "mxcsr now: 0x1f00");
    scenarios::expect(
        &out,
        "refused: Could not write register \"mxcsr\"; remote failure reply 'E16'",
    );
    assert_eq!(vm.sims[0].fake.fpu().mxcsr, 0x1f00);
    assert_eq!(vm.sims[1].fake.fpu().mxcsr, SIM_FPU.mxcsr);
}

/// Issue #17 item 2: `vKill` is answered `OK`, the session ends as
/// "killed", the guest runs on and the next debugger is accepted.
#[test]
fn sim_kill_is_answered_and_the_next_debugger_is_accepted() {
    let mut vm = SimVm::start(guest::SW);
    let mut c = rsp(&vm);
    assert_eq!(c.ask("vKill;1"), "OK");
    let log = vm.wait_sessions(1);
    scenarios::expect(&log, "GDB session ended (killed)");
    drop(c);
    // The guest ran on to its end (no debugger to stop it).
    assert_eq!(vm.wait_end(), 0);
    assert!(vm.byte_exact());
}

/// Issue #17 item 3: the description lists every register of the `g` packet.
#[test]
fn sim_the_target_description_lists_every_register_of_the_g_packet() {
    let vm = SimVm::start(guest::SW);
    let mut c = rsp(&vm);
    let xml = c.target_xml();
    let g = c.ask("g");
    scenarios::check_target_xml(&xml, g.len());
    assert_eq!(c.ask("D"), "OK");
}

/// Issue #17 item 4: a plain `c` resumes every vCPU (the guest ends); a
/// `vCont` naming one thread with no default action runs only that one.
#[test]
fn sim_a_plain_continue_resumes_every_vcpu_and_vcont_of_one_thread_locks() {
    let mut vm = SimVm::start(guest::SW);
    let mut c = rsp(&vm);
    // Scheduler locking: vCPU 0 steps, vCPU 1 stays at its first instruction.
    let stop = c.ask("vCont;s:1");
    assert!(stop.starts_with("T05") && stop.contains("thread:01;"), "{stop}");
    assert_eq!(vm.sims[0].fake.regs().rip, guest::STRAIGHT_INSNS[1]);
    assert_eq!(vm.sims[1].fake.regs().rip, guest::SW);
    // A plain c: both run to their ends.
    assert_eq!(c.ask("c"), "W00", "{}", vm.log());
    assert_eq!(vm.wait_end(), 0);
}

/// Issue #17 item 5: the system registers come from the vCPU's sregs and
/// IA32_KERNEL_GS_BASE, `p` reads one by regnum and `P` writes one.
#[test]
fn sim_kernel_registers_are_read_and_written_one_at_a_time() {
    let vm = SimVm::start(guest::SW);
    vm.sims[0].fake.put_msr(0xc000_0102, 0xffff_8880_0000_1000);
    let mut c = rsp(&vm);
    let le = |v: u64| v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>();
    let s = sim_sregs();
    // Regnums: fs_base 57 (0x39), k_gs_base 59 (0x3b), cr0 60 (0x3c),
    // cr2 61 (0x3d), cr4 63 (0x3f), efer 65 (0x41).
    assert_eq!(c.ask("p39"), le(s.fs.base));
    assert_eq!(c.ask("p3b"), le(0xffff_8880_0000_1000));
    assert_eq!(c.ask("p3c"), le(s.cr0));
    assert_eq!(c.ask("p3f"), le(s.cr4));
    assert_eq!(c.ask("p41"), le(s.efer));
    assert_eq!(c.ask(&format!("P3d={}", le(0x1234_5000))), "OK");
    assert_eq!(c.ask(&format!("P3b={}", le(0xffff_8880_0000_2000))), "OK");
    assert_eq!(c.ask(&format!("P39={}", le(0x7100_0000))), "OK");
    let f = &vm.sims[0].fake;
    assert_eq!(f.sregs().cr2, 0x1234_5000);
    assert_eq!(f.msr(0xc000_0102), Some(0xffff_8880_0000_2000));
    assert_eq!(f.sregs().fs.base, 0x7100_0000);
    assert_eq!(f.sregs().fs.selector, s.fs.selector);
    // mxcsr (56, 0x38) with a reserved bit: refused, nothing changed.
    assert_eq!(c.ask("P38=801f0100"), "E16");
    assert_eq!(c.ask("p38"), "801f0000");
    assert_eq!(c.ask("D"), "OK");
}

/// Issue #20: `g`/`p` are answered from what was read at the stop, so
/// the rule a register cache must keep is checked read by read — a read
/// after any change to the parked vCPU sees the change: GDB's own `P` and
/// `G`, the VMM's own write through `with_parked_vcpu` while the vCPU is
/// parked (with no packet in between), and a step (the vCPU ran).
#[test]
fn sim_a_register_read_after_any_write_or_run_sees_the_new_value() {
    let vm = SimVm::start(guest::SW);
    let mut c = rsp(&vm);
    let le = |v: u64| v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(c.ask("Hg1"), "OK");
    let before = c.ask("g");
    assert_eq!(c.ask("g"), before, "nothing changed: the same answer");
    // GDB's `P` (rax is regnum 0).
    assert_eq!(c.ask(&format!("P0={}", le(0x1111))), "OK");
    assert_eq!(c.ask("p0"), le(0x1111));
    assert_eq!(&c.ask("g")[..16], le(0x1111));
    // GDB's `G`: the whole file, rax changed.
    let mut g = c.ask("g");
    g.replace_range(..16, &le(0x2222));
    assert_eq!(c.ask(&format!("G{g}")), "OK");
    assert_eq!(c.ask("p0"), le(0x2222));
    assert_eq!(vm.sims[0].fake.regs().rax, 0x2222);
    // The VMM's own write on the parked vCPU's thread, between two reads.
    vm.dbg
        .with_parked_vcpu(0, |ops| {
            let mut r = ops.get_regs().expect("get_regs");
            r.rax = 0x3333;
            r.rbx = 0x4444;
            ops.set_regs(&r).expect("set_regs");
        })
        .expect("vCPU 0 is parked");
    assert_eq!(c.ask("p0"), le(0x3333));
    assert_eq!(&c.ask("g")[16..32], le(0x4444), "rbx (regnum 1)");
    // A step: the vCPU ran, rip (regnum 16) is where it is now.
    let rip = c.ask("p10");
    assert!(c.ask("vCont;s:1").starts_with("T05"));
    let now = le(vm.sims[0].fake.regs().rip);
    assert_ne!(now, rip, "the step moved rip");
    assert_eq!(c.ask("p10"), now);
    assert_eq!(c.ask("D"), "OK");
}

/// Issue #17 item 6 on simulated vCPUs that say they cannot deliver int3
/// exits or data breakpoints: `break` takes an execute slot (no int3 in
/// memory), a fifth is refused, and Z2 gets "not supported".
#[test]
fn sim_break_takes_a_hardware_slot_and_watch_is_refused_where_the_host_cannot() {
    let test = "sim_break_takes_a_hardware_slot_and_watch_is_refused_where_the_host_cannot";
    let host = HostDebug {
        int3_exits: false,
        data_watchpoints: false,
        source: "the test".into(),
    };
    let mut vm = SimVm::start_with(guest::SW, Listen::Tcp, host);
    let i = guest::STRAIGHT_INSNS;
    let script = format!(
        "monitor served\nset breakpoint always-inserted on\nbreak *{:#x}\ncontinue\nmonitor breakpoints\nmaint packet Z2,20000,1\ndelete\nbreak *{:#x}\nbreak *{:#x}\nbreak *{:#x}\nbreak *{:#x}\npython\ntry:\n    gdb.execute(\"break *{:#x}\")\nexcept gdb.error as e:\n    print(\"refused: %s\" % e)\nend\ndelete\ncontinue\n",
        i[2], i[3], i[4], i[5], i[6], guest::STRAIGHT_HLT
    );
    let Some(out) = run(test, &vm, "sim-hw-z0", &script) else {
        return;
    };
    scenarios::expect(&out, "break (Z0): a hardware execute slot");
    scenarios::expect(&out, "from: the test");
    scenarios::expect(&out, &format!("Thread 1 hit Breakpoint 1, {:#018x}", i[2]));
    scenarios::expect(&out, &format!("DR0: execute breakpoint at {:#x}", i[2]));
    assert!(!out.contains("int3 at"), "{out}");
    scenarios::expect(&out, "sending: Z2,20000,1\nreceived: \"\"");
    scenarios::expect(&out, "Cannot insert breakpoint 6.");
    scenarios::expect(&out, "[Inferior 1 (process 1) exited normally]");
    assert_eq!(vm.wait_end(), 0);
    // No KVM_SET_GUEST_DEBUG ever asked for int3 exits.
    for sim in &vm.sims {
        assert!(sim.fake.debug_history().iter().all(|d| d.control & USE_SW_BP == 0));
    }
    assert!(vm.byte_exact());
}
