//! Single-step rate through kvm-glue (`sync` + `KVM_RUN` + `handle_exit`)
//! against a raw kvm-ioctls loop on the same guest, in the same run, and the
//! ioctl count of a burst of debugger operations against the seed's
//! one-per-vCPU-per-operation. Prints both ratios.
//!
//! `cargo bench -p kvm-glue --bench step`

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP};
use kvm_glue::fake::{FakeVcpu, Op};
use kvm_glue::guest::{self, Guest, GuestError};
use kvm_glue::vcpu_debug::{effective, to_kvm};
use kvm_glue::{AddressSpace, Handled, VmDebug};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use x86_debugreg::BreakpointType;

/// Total time and steps measured for one side.
static RAW: Mutex<(Duration, u64)> = Mutex::new((Duration::ZERO, 0));
static GLUE: Mutex<(Duration, u64)> = Mutex::new((Duration::ZERO, 0));

fn record(side: &Mutex<(Duration, u64)>, d: Duration, n: u64) {
    let mut s = side.lock().unwrap_or_else(|e| e.into_inner());
    s.0 += d;
    s.1 += n;
}

fn raw_step(vcpu: &mut VcpuFd) {
    match vcpu.run() {
        Ok(VcpuExit::Debug(d)) => {
            black_box(d);
        }
        other => panic!("raw loop: {other:?}"),
    }
}

fn step_rates(c: &mut Criterion) {
    let mut g = match Guest::new(1) {
        Ok(g) => g,
        Err(GuestError::NoKvm(e)) => {
            println!("step rate: SKIPPED: /dev/kvm cannot be opened ({e})");
            return;
        }
        Err(e) => panic!("cannot build the guest: {e}"),
    };
    g.start(0, guest::LOOP).expect("start");
    let dbg = VmDebug::new(g.memory().clone());
    let mut h = dbg.vcpu(0).expect("vCPU handle");
    dbg.set_single_step(0, true).expect("single-step");
    // Both sides run the very same KVM configuration (debug registers
    // loaded on every entry cost microseconds on a nested host, so a fair
    // comparison needs the same ones).
    let raw_cfg = to_kvm(&effective(dbg.guest_debug_for(0).expect("intent")));
    assert_eq!(raw_cfg.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP);

    let mut group = c.benchmark_group("single_step");
    group.throughput(Throughput::Elements(1));
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.sample_size(20);
    for round in 0..4 {
        // Alternate the two sides so drift on the host hits both alike.
        group.bench_function(format!("raw_kvm_ioctls/{round}"), |b| {
            b.iter_custom(|iters| {
                let vcpu = g.vcpu(0);
                vcpu.set_guest_debug(&raw_cfg).expect("raw config");
                let t = Instant::now();
                for _ in 0..iters {
                    raw_step(vcpu);
                }
                let d = t.elapsed();
                record(&RAW, d, iters);
                d
            })
        });
        group.bench_function(format!("kvm_glue/{round}"), |b| {
            b.iter_custom(|iters| {
                let vcpu = g.vcpu(0);
                // The raw side changed the vCPU behind the handle's back:
                // make the handle re-apply (one ioctl, outside the timing).
                h = dbg.vcpu(0).expect("vCPU handle");
                h.sync(&*vcpu).expect("sync");
                let t = Instant::now();
                for _ in 0..iters {
                    h.sync(&*vcpu).expect("sync");
                    let arch = match vcpu.run() {
                        Ok(VcpuExit::Debug(d)) => d,
                        other => panic!("kvm-glue loop: {other:?}"),
                    };
                    match h.handle_exit(&*vcpu, &arch) {
                        Ok(Handled::Stop(ev)) => {
                            black_box(ev);
                        }
                        other => panic!("kvm-glue loop: {other:?}"),
                    }
                }
                let d = t.elapsed();
                record(&GLUE, d, iters);
                d
            })
        });
    }
    // kvm-glue's own work per step, without KVM: sync + handle_exit of a
    // recorded single-step exit on a fake vCPU.
    let fake = FakeVcpu::new();
    let mut fh = dbg.vcpu(0).expect("vCPU handle");
    fh.sync(&fake).expect("sync");
    let exit = kvm_bindings::kvm_debug_exit_arch {
        exception: 1,
        pad: 0,
        pc: guest::LOOP + 3,
        dr6: 0xffff_4ff0,
        dr7: 0,
    };
    let mut own = Duration::ZERO;
    let mut own_n = 0u64;
    group.bench_function("kvm_glue_own_work", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                fh.sync(&fake).expect("sync");
                black_box(fh.handle_exit(&fake, black_box(&exit)).expect("handle"));
            }
            let d = t.elapsed();
            own += d;
            own_n += iters;
            d
        })
    });
    group.finish();

    let (raw_d, raw_n) = *RAW.lock().unwrap_or_else(|e| e.into_inner());
    let (glue_d, glue_n) = *GLUE.lock().unwrap_or_else(|e| e.into_inner());
    let raw_rate = raw_n as f64 / raw_d.as_secs_f64();
    let glue_rate = glue_n as f64 / glue_d.as_secs_f64();
    println!(
        "single-step rate: kvm-glue {:.0}/s ({:.2} us/step), raw kvm-ioctls {:.0}/s ({:.2} us/step); \
         ratio kvm-glue/raw = {:.3} (goal >= 0.95)",
        glue_rate,
        1e6 / glue_rate,
        raw_rate,
        1e6 / raw_rate,
        glue_rate / raw_rate
    );
    let own_ns = own.as_secs_f64() * 1e9 / own_n as f64;
    println!(
        "kvm-glue's own work per step (sync + handle_exit, no KVM): {own_ns:.0} ns = {:.2}% of a raw step; \
         the ratio above moves with host noise, this does not",
        100.0 * own_ns / (1e9 / raw_rate)
    );
}

/// KVM_SET_GUEST_DEBUG calls for a burst of operations on 2 vCPUs between two
/// resumes, counted on fake vCPUs, against the seed's one per vCPU per operation.
fn ioctl_ratio() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let dbg = VmDebug::new(mem);
    let fakes = [FakeVcpu::new(), FakeVcpu::new()];
    let mut handles = [dbg.vcpu(0).expect("vCPU handle"), dbg.vcpu(1).expect("vCPU handle")];
    let phys = AddressSpace::Physical;
    let mut ops = 0u64;
    let mut ours = 0u64;
    for round in 0..10u64 {
        let base = 0x1000 + round * 0x100;
        dbg.insert(phys, BreakpointType::Hardware, base, 1).expect("hw");
        dbg.insert(phys, BreakpointType::WriteWatch, base + 0x40, 8)
            .expect("watch");
        for i in 0..8 {
            dbg.insert(phys, BreakpointType::Software, base + 0x80 + i, 1)
                .expect("sw");
        }
        dbg.remove(phys, BreakpointType::WriteWatch, base + 0x40, 8)
            .expect("remove");
        dbg.remove(phys, BreakpointType::Hardware, base, 1).expect("remove");
        ops += 12;
        for (h, f) in handles.iter_mut().zip(&fakes) {
            let before = f.count(Op::SetGuestDebug);
            h.sync(f).expect("sync");
            ours += (f.count(Op::SetGuestDebug) - before) as u64;
        }
    }
    let seed = ops * 2;
    println!(
        "ioctls for {ops} operations in 10 bursts on 2 vCPUs: kvm-glue {ours}, seed {seed}; ratio kvm-glue/seed = {:.3}",
        ours as f64 / seed as f64
    );
}

fn main() {
    ioctl_ratio();
    let mut c = Criterion::default().configure_from_args();
    step_rates(&mut c);
    c.final_summary();
}
