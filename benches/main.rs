//! Criterion benches: the typed model against the reference (the seed's
//! integer code, feature `reference`), in the same run, one module per area.
//!
//! `cargo bench` ends with a "typed/reference" summary computed from the
//! medians criterion just wrote (`<target>/criterion/*/new/estimates.json`),
//! with the goals: every typed/reference ratio ≤ 1.0 (or the reason on its
//! row); exit decoding ≤ 10 ns; software-breakpoint lookup
//! at 10 000 entries ≥ 100× faster than the seed's linear list; bulk insert
//! and remove-all linear in the count.
//!
//! Short settings (1 s measurement, 0.5 s warm-up, 30 samples) keep the whole
//! run to a few minutes on two cores.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use x86_debugreg::reference::{RefMemory, Reference};
use x86_debugreg::sw::ByteMemory;
use x86_debugreg::{BreakpointType, DebugExit, DebugState};

/// Plain guest memory for both models: no fault injection, so the benches
/// time the models and not the test double.
struct Ram(Vec<u8>);

impl ByteMemory for Ram {
    type Error = ();
    fn read_byte(&mut self, addr: u64) -> Result<u8, ()> {
        usize::try_from(addr)
            .ok()
            .and_then(|i| self.0.get(i).copied())
            .ok_or(())
    }
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), ()> {
        *usize::try_from(addr).ok().and_then(|i| self.0.get_mut(i)).ok_or(())? = value;
        Ok(())
    }
}

impl RefMemory for Ram {
    fn ref_read(&mut self, addr: u64) -> Option<u8> {
        self.read_byte(addr).ok()
    }
    fn ref_write(&mut self, addr: u64, value: u8) -> bool {
        self.write_byte(addr, value).is_ok()
    }
}

/// The same breakpoints in both models; panics if either refuses one or they
/// end up with different registers (the benches must time the same work).
fn both(mem: &mut Ram, bps: &[(u64, u64, u64)], single_step: bool) -> (DebugState, Reference) {
    let (mut typed, mut reference) = (DebugState::new(), Reference::new());
    let mut ref_mem = Ram(mem.0.clone());
    for &(ty, addr, len) in bps {
        typed.insert_gdb(mem, ty, addr, len).expect("typed insert");
        assert_eq!(
            reference.insert(&mut ref_mem, addr, len, ty).code,
            0,
            "reference insert"
        );
    }
    typed.set_single_step(single_step);
    reference.singlestep_enabled = single_step;
    let gd = typed.guest_debug();
    assert_eq!((gd.control.bits(), gd.debugreg), reference.guest_debug(single_step));
    (typed, reference)
}

/// Four hardware breakpoints of every kind and length, slot 3 an 8-byte one
/// (the seed's sign-extension case).
const HW: [(u64, u64, u64); 4] = [
    (1, 0x40_1000, 1),
    (2, 0x60_2000, 4),
    (4, 0x60_3000, 2),
    (2, 0x60_4000, 8),
];

mod dr7 {
    use super::*;
    use x86_debugreg::{HwBreakpoint, HwSlots};

    /// DR7 for 1–4 used slots, two ways. `compose`: from nothing — validate
    /// and insert n breakpoints, then read DR0–3/DR7 (the typed model
    /// recomputes the registers on every change) against the reference's
    /// inserts plus `kvm_arch_update_guest_debug`. `guest_debug`: the whole
    /// `kvm_guest_debug` for a vCPU entry from an existing state.
    pub fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("dr7_compose");
        for n in 1..=4 {
            let bps = &HW[..n];
            g.bench_with_input(BenchmarkId::new("typed_compose", n), bps, |b, bps| {
                b.iter(|| {
                    let mut slots = HwSlots::new();
                    for &(ty, addr, len) in black_box(bps) {
                        let ty = BreakpointType::try_from(ty).expect("valid type");
                        let _ = HwBreakpoint::from_gdb(ty, addr, len).and_then(|bp| slots.insert(bp));
                    }
                    (slots.addresses(), slots.dr7())
                })
            });
            g.bench_with_input(BenchmarkId::new("reference_compose", n), bps, |b, bps| {
                let mut mem = Ram(Vec::new());
                b.iter(|| {
                    let mut reference = Reference::new();
                    for &(ty, addr, len) in black_box(bps) {
                        reference.insert(&mut mem, addr, len, ty);
                    }
                    reference.guest_debug(false)
                })
            });
            let (typed, reference) = both(&mut Ram(vec![0; 16]), bps, false);
            g.bench_with_input(BenchmarkId::new("typed_guest_debug", n), &typed, |b, s| {
                b.iter(|| black_box(s).guest_debug())
            });
            g.bench_with_input(BenchmarkId::new("reference", n), &reference, |b, r| {
                b.iter(|| black_box(r).guest_debug(black_box(false)))
            });
        }
    }
}

mod dr6 {
    use super::*;
    use x86_debugreg::Dr6;

    /// Values KVM reports: single step with and without bit 16, slot hits,
    /// a watchpoint hit during a step, nothing.
    const RAW: [u64; 5] = [0xffff_4ff0, 0xfffe_4ff0, 0xffff_0ff1, 0xfffe_4ff6, 0xffff_0ff0];

    /// DR6 normalisation and reading B0–B3 and BS. The seed has no
    /// normalisation step: it tests the raw bits inline, which is what the
    /// reference side does here.
    pub fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("dr6_normalise");
        g.bench_function("typed", |b| {
            b.iter(|| {
                black_box(RAW).map(|v| {
                    let d = Dr6::from_kvm(v);
                    (d.hit_mask(), d.bs())
                })
            })
        });
        g.bench_function("reference", |b| {
            b.iter(|| black_box(RAW).map(|v| ((v & 0xf) as u8, v & 1 << 14 != 0)))
        });
    }
}

mod exit {
    use super::*;

    /// Every kind of decision: a single step, an execute hit, a watchpoint hit
    /// during a step, a software breakpoint, and the guest's own #DB and #BP
    /// to re-inject.
    pub const KINDS: [(&str, DebugExit); 6] = [
        ("single_step", exit(1, 0x40_1000, 0xffff_4ff0)),
        ("hw_hit", exit(1, 0x40_1000, 0xffff_0ff1)),
        ("watch_and_step", exit(1, 0x40_1004, 0xfffe_4ff2)),
        ("sw_breakpoint", exit(3, 0x10, 0)),
        ("reinject_db", exit(1, 0x40_1004, 0xffff_0ff0)),
        ("reinject_bp", exit(3, 0x11, 0)),
    ];

    const fn exit(exception: u32, pc: u64, dr6: u64) -> DebugExit {
        DebugExit {
            exception,
            pc,
            dr6,
            dr7: 0,
        }
    }

    pub fn bench(c: &mut Criterion) {
        let mut mem = Ram(vec![0x90; 0x100]);
        let bps = [HW[0], HW[1], (0, 0x10, 1), (0, 0x20, 1)];
        let (typed, reference) = both(&mut mem, &bps, true);
        let applied = x86_debugreg::Applied::was_set(typed.guest_debug());
        let (control, debugreg) = reference.guest_debug(true);
        let mut g = c.benchmark_group("exit_decode");
        for (name, e) in KINDS {
            g.bench_with_input(BenchmarkId::new("typed", name), &e, |b, e| {
                b.iter(|| typed.decode(black_box(e), black_box(&applied)))
            });
            g.bench_with_input(BenchmarkId::new("reference", name), &e, |b, e| {
                b.iter(|| {
                    let e = black_box(e);
                    reference.debug_exit(e.exception, e.pc, e.dr6, black_box(control), black_box(debugreg))
                })
            });
        }
    }
}

mod sw_lookup {
    use super::*;

    pub const SIZES: [u64; 3] = [10, 1_000, 10_000];

    /// A `#BP` exit at a software breakpoint, with `n` set: the one in the
    /// middle (the linear list's average case), and a miss (the guest's own
    /// `int3`: the list is scanned to the end).
    pub fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("sw_lookup");
        for n in SIZES {
            let bps: Vec<_> = (0..n).map(|i| (0, i * 4, 1)).collect();
            let (typed, reference) = both(&mut Ram(vec![0x90; n as usize * 4]), &bps, false);
            let applied = x86_debugreg::Applied::was_set(typed.guest_debug());
            let (control, debugreg) = reference.guest_debug(false);
            for (case, pc) in [("hit", n / 2 * 4), ("miss", n / 2 * 4 + 1)] {
                let e = DebugExit {
                    exception: 3,
                    pc,
                    dr6: 0,
                    dr7: 0,
                };
                g.bench_with_input(BenchmarkId::new(format!("typed_{case}"), n), &e, |b, e| {
                    b.iter(|| typed.decode(black_box(e), black_box(&applied)))
                });
                g.bench_with_input(BenchmarkId::new(format!("reference_{case}"), n), &e, |b, e| {
                    b.iter(|| {
                        let e = black_box(e);
                        reference.debug_exit(e.exception, e.pc, e.dr6, control, debugreg)
                    })
                });
            }
        }
    }
}

mod sw_bulk {
    use super::*;
    use criterion::SamplingMode;

    pub const SIZES: [u64; 2] = [1_000, 10_000];

    /// Insert `n` software breakpoints, then remove them all: one iteration
    /// leaves table and memory as it found them, so no per-iteration set-up.
    pub fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("sw_insert_remove_all");
        // The reference is quadratic (a linear search per insert): tens of
        // milliseconds at 10 000, so few, equal-sized samples.
        g.sampling_mode(SamplingMode::Flat).sample_size(10);
        for n in SIZES {
            let addrs: Vec<u64> = (0..n).map(|i| i * 4).collect();
            let mut mem = Ram(vec![0x90; n as usize * 4]);
            let mut state = DebugState::new();
            g.bench_with_input(BenchmarkId::new("typed", n), &addrs, |b, addrs| {
                b.iter(|| {
                    for &a in black_box(addrs) {
                        let _ = state.insert(&mut mem, BreakpointType::Software, a, 1);
                    }
                    state.remove_all(&mut mem).restored
                })
            });
            assert!(mem.0.iter().all(|&b| b == 0x90) && state.sw().is_empty());
            let mut reference = Reference::new();
            g.bench_with_input(BenchmarkId::new("reference", n), &addrs, |b, addrs| {
                b.iter(|| {
                    for &a in black_box(addrs) {
                        reference.insert(&mut mem, a, 1, 0);
                    }
                    reference.remove_all(&mut mem)
                })
            });
            assert!(mem.0.iter().all(|&b| b == 0x90) && reference.sw_breakpoints.is_empty());
        }
    }
}

mod hw_cycle {
    use super::*;

    /// Insert then remove one write watchpoint (GDB `Z2`/`z2`, validated as
    /// the seed does) with 0 or 3 other slots in use.
    pub fn bench(c: &mut Criterion) {
        let mut g = c.benchmark_group("hw_insert_remove");
        for used in [0, 3] {
            let mut mem = Ram(vec![0; 16]);
            let (mut typed, mut reference) = both(&mut mem, &HW[..used], false);
            let (addr, len) = (0x70_0000u64, 8u64);
            g.bench_function(BenchmarkId::new("typed", used), |b| {
                b.iter(|| {
                    let (addr, len) = black_box((addr, len));
                    let slot = typed.insert(&mut mem, BreakpointType::WriteWatch, addr, len);
                    let removed = typed.remove(&mut mem, BreakpointType::WriteWatch, addr, len);
                    (slot.is_ok(), removed.is_ok())
                })
            });
            g.bench_function(BenchmarkId::new("reference", used), |b| {
                b.iter(|| {
                    let (addr, len) = black_box((addr, len));
                    (
                        reference.insert(&mut mem, addr, len, 2),
                        reference.remove(&mut mem, addr, len, 2),
                    )
                })
            });
            // What a VMM does with a change: make it, then build the
            // kvm_guest_debug for the next KVM_RUN. The typed slots keep
            // DR0-3/DR7 current on every change, the reference composes them
            // here, so this is the like-for-like comparison.
            g.bench_function(BenchmarkId::new("typed_then_guest_debug", used), |b| {
                b.iter(|| {
                    let (addr, len) = black_box((addr, len));
                    let _ = typed.insert(&mut mem, BreakpointType::WriteWatch, addr, len);
                    let inserted = typed.guest_debug();
                    let _ = typed.remove(&mut mem, BreakpointType::WriteWatch, addr, len);
                    (inserted, typed.guest_debug())
                })
            });
            g.bench_function(BenchmarkId::new("reference_then_guest_debug", used), |b| {
                b.iter(|| {
                    let (addr, len) = black_box((addr, len));
                    reference.insert(&mut mem, addr, len, 2);
                    let inserted = reference.guest_debug(false);
                    reference.remove(&mut mem, addr, len, 2);
                    (inserted, reference.guest_debug(false))
                })
            });
            assert_eq!(typed.hw().len(), used);
        }
    }
}

mod summary {
    use std::path::{Path, PathBuf};
    use std::time::SystemTime;

    use super::{exit, sw_bulk, sw_lookup};

    /// Where criterion writes (its own rule: `$CRITERION_HOME`, else
    /// `$CARGO_TARGET_DIR/criterion`, else the target directory this bench
    /// binary was built in).
    fn criterion_dir() -> Option<PathBuf> {
        if let Some(home) = std::env::var_os("CRITERION_HOME") {
            return Some(home.into());
        }
        if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
            return Some(Path::new(&target).join("criterion"));
        }
        // <target>/release/deps/main-<hash>
        let exe = std::env::current_exe().ok()?;
        Some(exe.parent()?.parent()?.parent()?.join("criterion"))
    }

    /// The median, in ns, of `id` (`group/function/parameter`), if it was
    /// measured by this run (files older than `since` are stale).
    fn median(dir: &Path, id: &str, since: SystemTime) -> Option<f64> {
        let file = dir.join(id).join("new/estimates.json");
        if file.metadata().and_then(|m| m.modified()).ok()? < since {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        json["median"]["point_estimate"].as_f64()
    }

    fn ns(t: f64) -> String {
        match t {
            t if t >= 1e6 => format!("{:.2} ms", t / 1e6),
            t if t >= 1e3 => format!("{:.2} µs", t / 1e3),
            t => format!("{t:.1} ns"),
        }
    }

    /// One summary line, if both sides were measured.
    fn line(label: &str, typed: Option<f64>, reference: Option<f64>, note: &str) -> Option<String> {
        let (t, r) = (typed?, reference?);
        Some(format!(
            "{label:<44} typed {:>10}  reference {:>10}  typed/reference {:>8.3}{note}",
            ns(t),
            ns(r),
            t / r
        ))
    }

    /// Prints the typed/reference ratio of every pair measured since `since`.
    pub fn print(since: SystemTime) {
        let Some(dir) = criterion_dir() else {
            println!("typed/reference ratios: criterion's directory not found");
            return;
        };
        let m = |id: &str| median(&dir, id, since);
        let mut out: Vec<Option<String>> = Vec::new();
        for n in 1..=4 {
            let (t, r) = (
                m(&format!("dr7_compose/typed_compose/{n}")),
                m(&format!("dr7_compose/reference_compose/{n}")),
            );
            let why = t.zip(r).map_or("", |(t, r)| {
                if t > r {
                    "  (> 1: typed validates and updates DR7 on each insert; see the next row)"
                } else {
                    ""
                }
            });
            out.push(line(&format!("DR7 from nothing, {n} slot(s)"), t, r, why));
            let (t, r) = (
                m(&format!("dr7_compose/typed_guest_debug/{n}")),
                m(&format!("dr7_compose/reference/{n}")),
            );
            out.push(line(&format!("kvm_guest_debug, {n} slot(s)"), t, r, ""));
        }
        let (t, r) = (m("dr6_normalise/typed"), m("dr6_normalise/reference"));
        out.push(line("DR6 normalisation (5 values)", t, r, ""));
        for (kind, _) in exit::KINDS {
            let t = m(&format!("exit_decode/typed/{kind}"));
            let goal = t.map_or("", |t| {
                if t <= 10.0 {
                    "  (goal <= 10 ns: met)"
                } else {
                    "  (goal <= 10 ns: MISSED)"
                }
            });
            out.push(line(
                &format!("exit decode: {kind}"),
                t,
                m(&format!("exit_decode/reference/{kind}")),
                goal,
            ));
        }
        for n in sw_lookup::SIZES {
            for case in ["hit", "miss"] {
                let t = m(&format!("sw_lookup/typed_{case}/{n}"));
                let r = m(&format!("sw_lookup/reference_{case}/{n}"));
                let note = t.zip(r).map_or(String::new(), |(t, r)| {
                    let goal = match (n, r / t >= 100.0) {
                        (10_000, true) => " (goal >= 100x: met)",
                        (10_000, false) => " (goal >= 100x: MISSED)",
                        _ => "",
                    };
                    format!("  reference/typed {:.0}x{goal}", r / t)
                });
                out.push(line(&format!("sw lookup on #BP, {n} breakpoints, {case}"), t, r, &note));
            }
        }
        for n in sw_bulk::SIZES {
            let t = m(&format!("sw_insert_remove_all/typed/{n}"));
            let r = m(&format!("sw_insert_remove_all/reference/{n}"));
            let note = t.map_or(String::new(), |t| {
                format!("  typed {} per breakpoint", ns(t / n as f64))
            });
            out.push(line(&format!("insert + remove-all, {n} sw breakpoints"), t, r, &note));
        }
        let [small, large] = sw_bulk::SIZES;
        let scaling =
            m(&format!("sw_insert_remove_all/typed/{small}")).zip(m(&format!("sw_insert_remove_all/typed/{large}")));
        out.push(scaling.map(|(a, b)| {
            format!(
                "{:<44} typed: {:.1}x the time for {}x the breakpoints",
                "insert + remove-all scaling",
                b / a,
                large / small
            )
        }));
        for used in [0, 3] {
            let t = m(&format!("hw_insert_remove/typed/{used}"));
            let r = m(&format!("hw_insert_remove/reference/{used}"));
            let why = t.zip(r).map_or("", |(t, r)| {
                if t > r {
                    "  (> 1: typed keeps DR0-3/DR7 current on each change; see the row below)"
                } else {
                    ""
                }
            });
            out.push(line(
                &format!("hw insert + remove, {used} other slot(s) used"),
                t,
                r,
                why,
            ));
            let t = m(&format!("hw_insert_remove/typed_then_guest_debug/{used}"));
            let r = m(&format!("hw_insert_remove/reference_then_guest_debug/{used}"));
            out.push(line(
                &format!("hw insert + remove + guest_debug, {used} used"),
                t,
                r,
                "",
            ));
        }
        let lines: Vec<String> = out.into_iter().flatten().collect();
        if lines.is_empty() {
            println!("typed/reference ratios: nothing measured in this run (filtered, or --test)");
        } else {
            println!("\ntyped/reference ratios (criterion medians, {}):", dir.display());
            for l in lines {
                println!("{l}");
            }
        }
    }
}

fn main() {
    let since = std::time::SystemTime::now();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30)
        .without_plots()
        .configure_from_args();
    dr7::bench(&mut c);
    dr6::bench(&mut c);
    exit::bench(&mut c);
    sw_lookup::bench(&mut c);
    sw_bulk::bench(&mut c);
    hw_cycle::bench(&mut c);
    c.final_summary();
    summary::print(since);
}
