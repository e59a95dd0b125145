//! The CPU oracle: the model's hit predictions (`x86_debugreg::predict`) and
//! its validation rules checked against this machine's CPU, through ptrace.
//!
//! Each test forks one traced child (see `oracle/`) and asks it for thousands
//! of accesses: the parent programs DR0–3/DR7 with `PTRACE_POKEUSER`, the
//! child makes one exact-width load or store on a page-aligned buffer (or runs
//! a sled of known instructions), and the parent reads DR6 after each SIGTRAP.
//! Configurations come from the typed model ([`HwBreakpoint`], [`HwSlots`],
//! [`Dr7::with_slot`]); every hit mask the CPU reports is compared bit for bit
//! with [`predict::hits`].
//!
//! What is compared, and why only that:
//! * **B-bits of enabled slots.** The SDM lets a CPU set Bn for a matching but
//!   disabled slot; the prediction covers enabled slots, so DR6 is masked with
//!   [`SlotMask::enabled`]. (Linux never shows such bits anyway: the DR6 a
//!   tracer reads is the kernel's "virtual DR6", filled only for the perf
//!   events of enabled slots. The suites count any that appear.)
//! * **Linux is in between.** A DR7 write becomes perf hardware-breakpoint
//!   events (arch/x86/kernel/ptrace.c); the kernel programs the CPU's DR7
//!   itself (always with Gn, LE/GE as it likes), so L-versus-G, LE/GE/GD and
//!   reserved bits never reach the CPU. The fields that decide matching —
//!   DRn, R/Wn, LENn, enabled-or-not — do, unchanged.
//! * **Kernel-enforced rules** (misalignment, execute with LEN ≠ 1 byte, I/O)
//!   are compared with the model's validation in the `oracle_validation_*`
//!   tests; the rules only the kernel has (user addresses only, fields of
//!   disabled slots, reserved bits ignored) are pinned by the `oracle_kernel_*`
//!   tests, which say why the model differs.
//!
//! Case counts: `ORACLE_CASES` (default 2 000) random data cases and a quarter
//! as many random execute cases, on top of fixed sweeps: one run of the suite
//! asks the CPU about some 32 800 data accesses and 800 sled runs. Every test
//! prints how many cases it checked against the CPU. If the host forbids
//! ptrace, one line says so and nothing is checked (unless
//! `ORACLE_REQUIRE_PTRACE` is set, as `.ci/run` does: then it fails). Linux
//! x86-64 only.
//!
//! # Transients: re-run in a fresh child
//!
//! Every question goes through `oracle::Checker` (`oracle/rerun.rs`): an
//! outcome that disagrees with the expectation, or that the harness cannot
//! classify, is asked again of a freshly forked child, and only one that the
//! fresh child reproduces fails the test. Each transient is printed, and each
//! test ends with `oracle: N transient outcomes re-run, all agreed`; more than
//! `MAX_TRANSIENTS_PER_RUN` (3) per run of the suite fail it. A wrong
//! prediction reproduces in every child, so planted bugs still fail
//! (`oracle_a_wrong_prediction_reproduces_in_a_fresh_child_and_fails`, and a
//! mutant of `predict::overlaps` fails five of these tests, each "reproduced
//! in a fresh child"). `ORACLE_REPEAT=N` runs every test N times in one
//! process, each run in a fresh child, to measure the transient rate:
//!
//! ```text
//! ORACLE_REQUIRE_PTRACE=1 ORACLE_REPEAT=100 cargo test -p x86-debugreg --test cpu_oracle -- --nocapture
//! ```
//!
//! # The flake of issue #15: what it was, what was ruled out
//!
//! One CI run, the first oracle run on a fresh machine, failed with
//! "SIGTRAP with si_code 1 during Store { offset: 4093, size: 8 }" in
//! `oracle_every_single_watch_against_every_nearby_access`: an 8-byte store
//! across the buffer's page boundary under a watch. These machines are
//! Firecracker microVMs (kernel `6.18.44-fc`, KVM on an Intel host below,
//! virtio-balloon with free page reporting), so the guest kernel's debug
//! registers are themselves virtualised.
//!
//! *What si_code 1 means.* In Linux's `exc_debug_user`
//! (arch/x86/kernel/traps.c) a hit of a ptrace watchpoint reaches the tracer
//! as `TRAP_HWBKPT` (4): the perf breakpoint handler consumes Bn and
//! `ptrace_triggered` sets it in the virtual DR6. `TRAP_BRKPT` (1) comes only
//! from `icebp = !dr6`: the DR6 the guest kernel read at the `#DB` had no B0–B3,
//! BS, BD or BT at all, and the kernel took it for an `INT1`. (A Bn that was
//! there but lost in the perf layer gives no signal at all — a missed hit,
//! not si_code 1.)
//!
//! *Ruled out.* The child itself: its code is listed bytes with `0xCC`
//! padding, no `0xF1` (`INT1`), and an `int3` would be `SI_KERNEL`, not 1.
//! The CPU's rule: an access that overlaps an enabled watch sets its Bn
//! (SDM Vol. 3B §18.2.5), and the same store was made millions of times
//! without a miss (below). Left: a `#DB` delivered to the guest kernel with
//! its DR6 lost on the way — in the hypervisor, which intercepts the guest's
//! `#DB` and `MOV DR` and hands DR6 over lazily. That is the most likely
//! cause; it is not proven, because it never came back here:
//!
//! * 300 full-suite runs (3 processes × `ORACLE_REPEAT=100` at once, plus two
//!   `yes > /dev/null` loops, load average 17–20 with other engineers'
//!   builds on 2 cores): 0 transients (each run makes this very store 60
//!   times).
//! * 120 000 fresh children making this store as their first access, to
//!   pages never touched (and after a load mapped the second page read-only):
//!   `oracle_a_page_crossing_store_to_untouched_pages_hits_its_watch`, 3 ×
//!   `ORACLE_REPEAT=5000` with two `yes` loops: 0.
//! * 60 full-suite runs, each after touching and freeing 3 GiB so that free
//!   page reporting gives it back to the host (fresh host pages): 0.
//! * 200 full-suite runs (2 × `ORACLE_REPEAT=100`) while kvm-glue's
//!   `kvm_debug` tests ran in a loop (hardware breakpoints and single-step
//!   in guests of this machine's own KVM, which switches the debug
//!   registers of these same vCPUs): 0.
//! * The first oracle run on this machine, 5 minutes after boot: passed.
//!
//! So the transient rate measured here is 0 in 560 runs; the one in CI was
//! one in about 32 runs. The harness now reports such a trap as
//! `OracleError::StrayTrap` with `rip`, DR6 and DR7: if it comes again, `rip`
//! just past the store's `mov` says it was the store's data breakpoint
//! with its DR6 lost, and the fresh child's answer says whether it repeats.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod oracle;

use std::cell::{Cell, RefCell};
use std::time::Instant;

use nix::errno::Errno;
use oracle::{buffer_addr, repeated, sled_addr, Checker, Ledger, OracleError, SLED_INSNS, SLED_LEN};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRng, TestRunner};
use x86_debugreg::predict::{self, Access, AccessKind, SlotMask};
use x86_debugreg::{Condition, Dr7, HwBreakpoint, HwKind, HwSlots, Len, Slot};

// ---------------------------------------------------------------------------
// Fixtures

/// Offsets in the child's (two-page) buffer of the windows the data slots
/// watch: one across a 64-byte cache-line boundary inside a page, one across
/// the page boundary. Accesses around them stay inside the buffer.
const WINDOW_OFFSETS: [u64; 2] = [2048 - 16, 4096 - 16];
/// Bytes in a window: slot ranges lie inside it.
const WINDOW_LEN: u64 = 32;
/// Accesses start up to this many bytes before or after the window, so they
/// miss, touch the edges, and straddle them.
const MARGIN: u64 = 12;
/// The first byte of window `n`.
fn window_at(n: usize) -> u64 {
    buffer_addr() + WINDOW_OFFSETS[n]
}
/// The first byte of the window the fixed tests use.
fn window() -> u64 {
    window_at(0)
}

/// Default number of random data cases.
const DEFAULT_CASES: u32 = 2_000;

/// DR7 for slot `slot` holding raw R/W and LEN codes, enabled by Gn.
fn raw_slot(slot: Slot, rw: u8, len: u8) -> Dr7 {
    Dr7::EMPTY.with_slot(slot, Condition::from_bits(rw), Len::from_bits(len))
}

fn harness_access(access: Access) -> oracle::Access {
    oracle::Access {
        addr: access.addr,
        size: u8::try_from(access.size).expect("access widths are 1, 2, 4 or 8"),
        kind: match access.kind {
            AccessKind::Read => oracle::AccessKind::Read,
            AccessKind::Write => oracle::AccessKind::Write,
            AccessKind::Execute => oracle::AccessKind::Execute,
        },
    }
}

/// Counts of one suite, printed at the end.
#[derive(Default)]
struct Tally {
    cases: u64,
    with_hits: u64,
    multi_hits: u64,
    disabled_bits: u64,
}

impl Tally {
    fn record(&mut self, predicted: SlotMask, cpu_raw: u8, enabled: SlotMask) {
        self.cases += 1;
        self.with_hits += u64::from(!predicted.is_empty());
        self.multi_hits += u64::from(predicted.bits().count_ones() > 1);
        self.disabled_bits += u64::from(cpu_raw & !enabled.bits() != 0);
    }

    fn print(&self, what: &str, started: Instant) {
        println!(
            "oracle: {what}: {} cases checked against the CPU ({} hit, {} hit several slots; \
             {} with B-bits of disabled slots) in {:.2?}",
            self.cases,
            self.with_hits,
            self.multi_hits,
            self.disabled_bits,
            started.elapsed()
        );
    }
}

/// Ask the CPU about one data access and compare with the prediction (an
/// outcome that disagrees, or none, is re-run in a fresh child: see
/// `oracle/rerun.rs`). Returns the CPU's raw B-bits and the prediction.
fn check_data(c: &mut Checker, dr: [u64; 4], dr7: Dr7, access: Access) -> Result<(u8, SlotMask), String> {
    check_data_with(c, predict::hits, dr, dr7, access)
}

/// [`check_data`] against the predictions of `model` (the planted-bug tests
/// give it a wrong one).
fn check_data_with(
    c: &mut Checker,
    model: fn([u64; 4], Dr7, Access) -> SlotMask,
    dr: [u64; 4],
    dr7: Dr7,
    access: Access,
) -> Result<(u8, SlotMask), String> {
    let enabled = SlotMask::enabled(dr7);
    let predicted = model(dr, dr7, access);
    let cpu = c.ask(
        || format!("DR0-3 {dr:x?}, DR7 {:#x}, {access:x?}", dr7.into_bits()),
        |o| o.cpu_hits(dr, dr7.into_bits(), harness_access(access)),
        |&cpu| {
            let seen = SlotMask::from_bits_truncate(cpu).intersection(enabled);
            if seen == predicted {
                Ok(())
            } else {
                Err(format!(
                    "CPU disagrees with the model: CPU set {seen} (raw B-bits {cpu:#06b}), model predicts {predicted}"
                ))
            }
        },
    )?;
    Ok((cpu, predicted))
}

/// Run the execute sled from `entry` and compare the sequence of debug
/// exceptions with the prediction for each instruction fetched (re-run in a
/// fresh child as [`check_data`]).
fn check_sled(c: &mut Checker, dr: [u64; 4], dr7: Dr7, entry: u64) -> Result<Vec<SlotMask>, String> {
    let enabled = SlotMask::enabled(dr7);
    let fetched = SLED_INSNS.iter().map(|o| sled_addr() + o).filter(|&a| a >= entry);
    let predicted: Vec<(u64, SlotMask)> = fetched
        .map(|a| (a, predict::hits(dr, dr7, Access::execute(a))))
        .filter(|(_, m)| !m.is_empty())
        .collect();
    c.ask(
        || {
            format!(
                "DR0-3 {dr:x?}, DR7 {:#x}, sled {:#x} run from {entry:#x}",
                dr7.into_bits(),
                sled_addr()
            )
        },
        |o| {
            o.program(dr, dr7.into_bits()).map_err(|errno| OracleError::Rejected {
                dr,
                dr7: dr7.into_bits(),
                errno,
            })?;
            o.run_sled(entry)
        },
        |traps| {
            let observed: Vec<(u64, SlotMask)> = traps
                .iter()
                .map(|t| (t.rip, SlotMask::from_bits_truncate(t.hits()).intersection(enabled)))
                .collect();
            if observed == predicted {
                Ok(())
            } else {
                Err(format!(
                    "CPU disagrees with the model: CPU stopped at {observed:x?}, model predicts {predicted:x?}"
                ))
            }
        },
    )?;
    Ok(predicted.into_iter().map(|(_, m)| m).collect())
}

/// A runner with a fixed seed: the random cases (and so the hit/miss shares
/// the tests require) are the same on every run for a given `ORACLE_CASES`.
fn runner(cases: u32) -> TestRunner {
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/cpu_oracle.txt"
        )))),
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    TestRunner::new_with_rng(config, rng)
}

// ---------------------------------------------------------------------------
// Strategies: configurations from the typed model

/// How a used slot is enabled in DR7.
#[derive(Debug, Clone, Copy)]
enum Enable {
    Global,
    Local,
    Both,
    Disabled,
}

fn enable() -> impl Strategy<Value = Enable> {
    prop_oneof![
        4 => Just(Enable::Global),
        2 => Just(Enable::Local),
        1 => Just(Enable::Both),
        2 => Just(Enable::Disabled),
    ]
}

/// A breakpoint as a position, resolved against the child's addresses when a
/// case runs (proptest shows these values on failure; the resolved registers
/// are in the failure message).
#[derive(Debug, Clone, Copy)]
enum BpSpec {
    /// A watchpoint of `len` bytes at window + `slot_index * len`.
    Data { kind: HwKind, len: u64, index: u64 },
    /// An execute breakpoint at sled + `offset` (may be inside an instruction
    /// or past the sled).
    Exec { offset: u64 },
    /// A watchpoint over the sled's code bytes: instruction fetches must not
    /// meet it.
    DataOnCode { kind: HwKind, len: u64, index: u64 },
}

impl BpSpec {
    fn resolve(self, window: u64) -> HwBreakpoint {
        let bp = match self {
            BpSpec::Data { kind, len, index } => HwBreakpoint::new(kind, window + index * len, len),
            BpSpec::Exec { offset } => HwBreakpoint::new(HwKind::Execute, sled_addr() + offset, 1),
            BpSpec::DataOnCode { kind, len, index } => HwBreakpoint::new(kind, (sled_addr() & !7) + index * len, len),
        };
        bp.expect("the strategies only produce aligned breakpoints")
    }
}

fn data_kind() -> impl Strategy<Value = HwKind> {
    prop_oneof![Just(HwKind::Write), Just(HwKind::ReadWrite)]
}

fn data_len() -> impl Strategy<Value = u64> {
    prop::sample::select(&[1u64, 2, 4, 8][..])
}

fn data_bp() -> impl Strategy<Value = BpSpec> {
    (data_kind(), data_len(), 0..WINDOW_LEN).prop_map(|(kind, len, i)| BpSpec::Data {
        kind,
        len,
        index: i % (WINDOW_LEN / len),
    })
}

fn exec_bp() -> impl Strategy<Value = BpSpec> {
    (0..SLED_LEN + 2).prop_map(|offset| BpSpec::Exec { offset })
}

fn code_watch_bp() -> impl Strategy<Value = BpSpec> {
    (data_kind(), data_len(), 0..SLED_LEN + 8).prop_map(|(kind, len, i)| BpSpec::DataOnCode {
        kind,
        len,
        index: i / len,
    })
}

/// One to four slots.
#[derive(Debug, Clone)]
enum SlotsSpec {
    /// Inserted into [`HwSlots`] in order (dense slots, duplicates refused),
    /// registers from `HwSlots::addresses` and `HwSlots::dr7`.
    Allocated(Vec<BpSpec>),
    /// Placed in chosen slots with [`Dr7::with_slot`], each enabled by L, G,
    /// both or neither; duplicates allowed.
    Placed([Option<(BpSpec, Enable)>; 4]),
}

impl SlotsSpec {
    fn registers(&self, window: u64) -> ([u64; 4], Dr7) {
        match self {
            SlotsSpec::Allocated(bps) => {
                let mut slots = HwSlots::new();
                for bp in bps {
                    // A duplicate is refused (AlreadyPresent): the slot set
                    // is then simply smaller.
                    let _ = slots.insert(bp.resolve(window));
                }
                (slots.addresses(), slots.dr7())
            }
            SlotsSpec::Placed(placed) => {
                let mut dr = [0; 4];
                let mut dr7 = Dr7::EMPTY;
                for (slot, entry) in Slot::ALL.into_iter().zip(placed) {
                    let Some((spec, enable)) = entry else { continue };
                    let bp = spec.resolve(window);
                    dr[slot.index()] = bp.addr();
                    dr7 = dr7.with_slot(slot, bp.kind().condition(), bp.len());
                    dr7 = match enable {
                        Enable::Global => dr7,
                        Enable::Local => dr7.with_global(slot, false).with_local(slot, true),
                        Enable::Both => dr7.with_local(slot, true),
                        Enable::Disabled => dr7.with_global(slot, false),
                    };
                }
                (dr, dr7)
            }
        }
    }
}

fn slots_spec(bp: impl Strategy<Value = BpSpec> + Clone) -> impl Strategy<Value = SlotsSpec> {
    let placed = [
        prop::option::of((bp.clone(), enable())),
        prop::option::of((bp.clone(), enable())),
        prop::option::of((bp.clone(), enable())),
        prop::option::of((bp.clone(), enable())),
    ]
    .prop_filter("at least one slot", |p| p.iter().any(Option::is_some))
    .prop_map(SlotsSpec::Placed);
    prop_oneof![prop::collection::vec(bp, 1..=4).prop_map(SlotsSpec::Allocated), placed,]
}

/// A data access: near an edge of one of the slots' ranges, or anywhere
/// around the window.
#[derive(Debug, Clone, Copy)]
struct AccessSpec {
    write: bool,
    size: u64,
    /// `Some((n, at_end, delta))`: start `delta` bytes from the start (or
    /// end) of the range of the n-th (modulo their number) slot watching the
    /// window, if any slot does.
    near: Option<(usize, bool, i64)>,
    /// Otherwise: window + `offset` - MARGIN.
    offset: u64,
}

impl AccessSpec {
    fn resolve(self, window: u64, dr: [u64; 4], dr7: Dr7) -> Access {
        let anywhere = window + self.offset - MARGIN;
        // The ranges of the slots that watch the window (enabled or not).
        let ranges: Vec<(u64, u64)> = Slot::ALL
            .into_iter()
            .filter(|&s| matches!(dr7.condition(s), Condition::Write | Condition::ReadWrite))
            .map(|s| {
                let bytes = dr7.len(s).bytes();
                (dr[s.index()] & !(bytes - 1), bytes)
            })
            .filter(|&(start, _)| (window..window + WINDOW_LEN).contains(&start))
            .collect();
        let addr = match self.near {
            Some((n, at_end, delta)) if !ranges.is_empty() => {
                let (start, bytes) = ranges[n % ranges.len()];
                let edge = if at_end { start + bytes } else { start };
                edge.wrapping_add_signed(delta)
            }
            _ => anywhere,
        };
        let size = self.size;
        if self.write {
            Access::write(addr, size)
        } else {
            Access::read(addr, size)
        }
    }
}

fn access_spec() -> impl Strategy<Value = AccessSpec> {
    let near = prop::option::weighted(0.7, (0..4usize, any::<bool>(), -9i64..=8));
    (any::<bool>(), data_len(), near, 0..WINDOW_LEN + 2 * MARGIN).prop_map(|(write, size, near, offset)| AccessSpec {
        write,
        size,
        near,
        offset,
    })
}

// ---------------------------------------------------------------------------
// Golden values and sweeps

/// The measurements recorded in HOST.md, as golden values: an 8-byte write
/// watch at an 8-aligned address and a 4-byte read/write watch 4 bytes in.
#[test]
fn oracle_golden_watch_values_measured_on_these_hosts() {
    repeated("oracle_golden_watch_values_measured_on_these_hosts", |c| {
        let w = window();
        let mut slots = HwSlots::new();
        slots.insert(HwBreakpoint::new(HwKind::Write, w, 8).unwrap()).unwrap();
        slots
            .insert(HwBreakpoint::new(HwKind::ReadWrite, w + 4, 4).unwrap())
            .unwrap();
        let (dr, dr7) = (slots.addresses(), slots.dr7());
        let golden = [
            (Access::write(w + 3, 1), 0b01),
            (Access::write(w + 6, 2), 0b11),
            (Access::write(w + 8, 4), 0b00),
            (Access::read(w + 4, 1), 0b10),
        ];
        for (access, bits) in golden {
            c.ask(
                || format!("golden {access:x?}"),
                |o| o.cpu_hits(dr, dr7.into_bits(), harness_access(access)),
                |&cpu| {
                    if cpu == bits {
                        Ok(())
                    } else {
                        Err(format!("CPU set B-bits {cpu:#06b}, measured {bits:#06b}"))
                    }
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(predict::hits(dr, dr7, access).bits(), bits, "model for {access:x?}");
        }
        println!(
            "oracle: golden watch values: {} cases checked against the CPU",
            golden.len()
        );
    });
}

/// The SDM's "Breakpoint Examples" table (Vol. 3B §18.2.5), with its pages
/// A0000H, B0000H and C0000H moved to window, window+0x10 and window+0x20.
#[test]
fn oracle_sdm_breakpoint_examples_relocated_into_the_buffer() {
    repeated("oracle_sdm_breakpoint_examples_relocated_into_the_buffer", |c| {
        let (pa, pb, pc) = (window(), window() + 0x10, window() + 0x20);
        let dr = [pa + 1, pa + 2, pb + 2, pc];
        let dr7 = raw_slot(Slot::DR0, 0b11, 0b00)
            .with_slot(Slot::DR1, Condition::Write, Len::B1)
            .with_slot(Slot::DR2, Condition::ReadWrite, Len::B2)
            .with_slot(Slot::DR3, Condition::Write, Len::B4);
        let trap = [
            Access::read(pa + 1, 1),
            Access::write(pa + 1, 2),
            Access::write(pa + 2, 1),
            Access::write(pa + 2, 2),
            Access::read(pb + 1, 4),
            Access::write(pb + 2, 1),
            Access::read(pb + 2, 2),
            Access::write(pc, 4),
            Access::write(pc + 1, 2),
            Access::write(pc + 3, 1),
        ];
        let no_trap = [
            Access::write(pa, 1),
            Access::read(pa + 2, 1),
            Access::write(pa + 3, 4),
            Access::write(pb, 2),
            Access::write(pb + 4, 2),
            Access::read(pc, 4),
            Access::write(pc + 4, 4),
        ];
        for access in trap {
            let (cpu, _) = check_data(c, dr, dr7, access).unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(cpu, 0, "the SDM says {access:x?} traps");
        }
        for access in no_trap {
            let (cpu, _) = check_data(c, dr, dr7, access).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cpu, 0, "{access:x?} must not trap");
        }
        println!(
            "oracle: SDM breakpoint examples: {} cases checked against the CPU",
            trap.len() + no_trap.len()
        );
    });
}

/// Fresh children per run of [`oracle_a_page_crossing_store_to_untouched_pages_hits_its_watch`].
const FRESH_CHILDREN: usize = 8;

/// The access of issue #15's flake — an 8-byte store at page offset 4093,
/// across the page boundary, under a watch on the 8 bytes before it — made
/// as the first access of a fresh child (both pages never touched: the store
/// takes the page faults first), and after a load has mapped the second page
/// read-only (the store then takes the copy-on-write fault). By hand: bytes
/// 4093–4095 are inside the watch 4088–4095, so B3 must be set, for a write
/// watch and a read/write watch alike.
#[test]
fn oracle_a_page_crossing_store_to_untouched_pages_hits_its_watch() {
    let store = Access::write(buffer_addr() + 4093, 8);
    let peek = Access::read(buffer_addr() + 4096, 1);
    repeated("oracle_a_page_crossing_store_to_untouched_pages_hits_its_watch", |c| {
        let mut checked = 0;
        for child in 0..FRESH_CHILDREN {
            // One fresh child per case (the first is the run's own).
            if child > 0 {
                c.respawn().unwrap_or_else(|e| panic!("{e}"));
            }
            let kind = if child % 2 == 0 {
                HwKind::Write
            } else {
                HwKind::ReadWrite
            };
            let bp = HwBreakpoint::new(kind, buffer_addr() + 4088, 8).unwrap_or_else(|e| panic!("{e}"));
            let dr = [0, 0, 0, bp.addr()];
            let dr7 = Dr7::EMPTY.with_slot(Slot::DR3, bp.kind().condition(), bp.len());
            if child % 4 >= 2 {
                // Map the second page (the zero page, read-only) first.
                let (cpu, _) = check_data(c, dr, dr7, peek).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(cpu, 0, "a load at 4096 is outside the watch");
            }
            let (cpu, _) = check_data(c, dr, dr7, store).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cpu, 0b1000, "the store's bytes 4093-4095 are watched by DR3");
            checked += 1;
        }
        println!("oracle: page-crossing stores to untouched pages: {checked} fresh children checked against the CPU");
    });
}

/// Every single watchpoint (both kinds, every length, every aligned address
/// of the 16 bytes before a cache-line boundary and before a page boundary,
/// rotating through the four slots) against every access of every width and
/// kind starting within 8 bytes of those 16.
#[test]
fn oracle_every_single_watch_against_every_nearby_access() {
    repeated("oracle_every_single_watch_against_every_nearby_access", |c| {
        let started = Instant::now();
        let mut tally = Tally::default();
        let mut config = 0;
        let stretches = (0..WINDOW_OFFSETS.len()).map(window_at);
        for (base, kind) in stretches.flat_map(|b| [(b, HwKind::Write), (b, HwKind::ReadWrite)]) {
            for bytes in [1u64, 2, 4, 8] {
                for addr in (base..base + 16).step_by(bytes as usize) {
                    let bp = HwBreakpoint::new(kind, addr, bytes).unwrap();
                    let slot = Slot::ALL[config % 4];
                    config += 1;
                    let mut dr = [0; 4];
                    dr[slot.index()] = bp.addr();
                    let dr7 = Dr7::EMPTY.with_slot(slot, bp.kind().condition(), bp.len());
                    for start in base - 8..base + 24 {
                        for size in [1, 2, 4, 8] {
                            for access in [Access::read(start, size), Access::write(start, size)] {
                                let (cpu, predicted) = check_data(c, dr, dr7, access).unwrap_or_else(|e| panic!("{e}"));
                                tally.record(predicted, cpu, SlotMask::enabled(dr7));
                            }
                        }
                    }
                }
            }
        }
        tally.print("every single watch x every nearby access", started);
        assert!(tally.with_hits > 0 && tally.with_hits < tally.cases);
    });
}

/// An execute breakpoint at every byte of the sled (and just past it), in
/// every slot, alone and next to a read/write watch on the same bytes: only
/// instruction starts stop, and only the execute slot.
#[test]
fn oracle_execute_breakpoints_stop_only_at_instruction_starts() {
    repeated("oracle_execute_breakpoints_stop_only_at_instruction_starts", |c| {
        let started = Instant::now();
        let (mut runs, mut stops) = (0, 0);
        for slot in Slot::ALL {
            let other = Slot::ALL[(slot.index() + 1) % 4];
            for offset in 0..SLED_LEN + 2 {
                let addr = sled_addr() + offset;
                let bp = HwBreakpoint::new(HwKind::Execute, addr, 1).unwrap();
                let mut dr = [0; 4];
                dr[slot.index()] = bp.addr();
                let alone = Dr7::EMPTY.with_slot(slot, bp.kind().condition(), bp.len());
                // The same bytes under a read/write watch: fetches do not meet it.
                let watch = HwBreakpoint::new(HwKind::ReadWrite, addr & !7, 8).unwrap();
                let mut dr_both = dr;
                dr_both[other.index()] = watch.addr();
                let both = alone.with_slot(other, watch.kind().condition(), watch.len());
                for (dr, dr7) in [(dr, alone), (dr_both, both)] {
                    let hits = check_sled(c, dr, dr7, sled_addr()).unwrap_or_else(|e| panic!("{e}"));
                    runs += 1;
                    stops += hits.len();
                    let is_start = SLED_INSNS.contains(&offset);
                    assert_eq!(hits, if is_start { vec![SlotMask::single(slot)] } else { vec![] });
                }
            }
        }
        println!(
        "oracle: execute breakpoint at every sled byte: {runs} sled runs ({stops} stops) checked against the CPU in {:.2?}",
        started.elapsed()
    );
    });
}

// ---------------------------------------------------------------------------
// Random configurations

/// Random 1–4-slot configurations of every kind and length (allocated by
/// `HwSlots` or placed slot by slot, enabled by L, G, both or neither, with
/// overlapping, adjacent and duplicate ranges) against random loads and
/// stores around them, compared bit for bit with the prediction.
#[test]
fn oracle_random_data_configurations_match_the_prediction() {
    repeated("oracle_random_data_configurations_match_the_prediction", |c| {
        let started = Instant::now();
        let oracle = RefCell::new(c);
        let tally = RefCell::new(Tally::default());
        let bp = prop_oneof![6 => data_bp(), 1 => exec_bp()];
        let strategy = (0..WINDOW_OFFSETS.len(), slots_spec(bp), access_spec());
        let result = runner(oracle::cases(DEFAULT_CASES)).run(&strategy, |(window, slots, access)| {
            let window = window_at(window);
            let (dr, dr7) = slots.registers(window);
            let access = access.resolve(window, dr, dr7);
            let (cpu, predicted) = check_data(*oracle.borrow_mut(), dr, dr7, access).map_err(TestCaseError::fail)?;
            tally.borrow_mut().record(predicted, cpu, SlotMask::enabled(dr7));
            Ok(())
        });
        let tally = tally.into_inner();
        tally.print("random data configurations", started);
        if let Err(e) = result {
            panic!("{e}");
        }
        // The generator must produce both outcomes often, or it tests little.
        // About 24% of cases hit (2 000 cases: 474). The seed is fixed, so this is
        // deterministic for a given ORACLE_CASES; and from 100 cases on, a share
        // under 10% would be more than 3 standard deviations below 24%
        // (sqrt(0.24 * 0.76 / 100) = 4.3%), so another seed would pass as well.
        // Under 100 cases the shares mean nothing and are not checked.
        if tally.cases >= 100 {
            assert!(
                tally.with_hits * 10 >= tally.cases,
                "too few hits: {} of {}",
                tally.with_hits,
                tally.cases
            );
            let misses = tally.cases - tally.with_hits;
            assert!(
                misses * 10 >= tally.cases,
                "too few misses: {misses} of {}",
                tally.cases
            );
        }
    });
}

/// Random configurations mixing execute breakpoints on the sled (at
/// instruction starts, inside instructions, past the end), watches over the
/// sled's code and watches on the buffer; the sled runs from a random
/// instruction, and the sequence of stops must be the prediction's.
#[test]
fn oracle_random_execute_configurations_match_the_prediction() {
    repeated("oracle_random_execute_configurations_match_the_prediction", |c| {
        let started = Instant::now();
        let oracle = RefCell::new(c);
        let (runs, stops) = (Cell::new(0u64), Cell::new(0u64));
        let bp = prop_oneof![4 => exec_bp(), 1 => code_watch_bp(), 1 => data_bp()];
        let entry = prop::sample::select(&SLED_INSNS[..]);
        let result =
            runner((oracle::cases(DEFAULT_CASES) / 4).max(1)).run(&(slots_spec(bp), entry), |(slots, entry)| {
                let (dr, dr7) = slots.registers(window());
                let hits =
                    check_sled(*oracle.borrow_mut(), dr, dr7, sled_addr() + entry).map_err(TestCaseError::fail)?;
                runs.set(runs.get() + 1);
                stops.set(stops.get() + hits.len() as u64);
                Ok(())
            });
        println!(
            "oracle: random execute configurations: {} sled runs ({} stops) checked against the CPU in {:.2?}",
            runs.get(),
            stops.get(),
            started.elapsed()
        );
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(stops.get() > 0, "no execute breakpoint ever fired");
    });
}

// ---------------------------------------------------------------------------
// Validation: the model's rules against the kernel's

/// The kernel's answer to DR0–3 = `dr`, DR7 = `dr7`, programmed from a clean
/// state, must be `expected` (a different answer is asked again of a fresh
/// child, as in [`check_data`]).
///
/// # Errors
/// If the kernel answers otherwise, in the fresh child too.
fn kernel_answers(c: &mut Checker, dr: [u64; 4], dr7: u64, expected: Result<(), Errno>) -> Result<(), String> {
    c.ask(
        || format!("DR0-3 {dr:x?}, DR7 {dr7:#x}"),
        |o| Ok(o.program(dr, dr7)),
        |&kernel| {
            if kernel == expected {
                Ok(())
            } else {
                Err(format!("the kernel answered {kernel:?}, expected {expected:?}"))
            }
        },
    )
    .map(drop)
}

/// Watchpoints: the model refuses exactly the misaligned ones, and so does
/// the kernel for the same DRn/R/W/LEN (in every slot).
#[test]
fn oracle_validation_watch_alignment_agrees_with_the_kernel() {
    repeated("oracle_validation_watch_alignment_agrees_with_the_kernel", |c| {
        let mut checked = 0;
        for slot in Slot::ALL {
            for kind in [HwKind::Write, HwKind::ReadWrite] {
                for bytes in [1u64, 2, 4, 8] {
                    for addr in window()..window() + 16 {
                        let model = HwBreakpoint::new(kind, addr, bytes);
                        let len = Len::from_bytes(bytes).unwrap();
                        let mut dr = [0; 4];
                        dr[slot.index()] = addr;
                        let dr7 = Dr7::EMPTY.with_slot(slot, kind.condition(), len);
                        match model {
                            Ok(_) => kernel_answers(c, dr, dr7.into_bits(), Ok(())).unwrap_or_else(|e| panic!("{e}")),
                            Err(e) => {
                                assert_eq!(e, x86_debugreg::HwError::Misaligned { addr, len: bytes });
                                kernel_answers(c, dr, dr7.into_bits(), Err(Errno::EINVAL))
                                    .unwrap_or_else(|e| panic!("{e}"));
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
        println!("oracle: validation of watch alignment: {checked} cases checked against the kernel");
    });
}

/// Execute breakpoints: the model makes every execute breakpoint 1 byte
/// (whatever length was asked for) at any address, and the kernel accepts
/// what it produces; the kernel refuses R/W = 00 with LEN ≠ 00, an encoding
/// the model never produces (the SDM calls it undefined).
#[test]
fn oracle_validation_execute_length_agrees_with_the_kernel() {
    repeated("oracle_validation_execute_length_agrees_with_the_kernel", |c| {
        let mut checked = 0;
        for slot in Slot::ALL {
            for offset in 0..8 {
                let addr = sled_addr() + offset;
                for asked in [1u64, 2, 3, 4, 8] {
                    let bp = HwBreakpoint::new(HwKind::Execute, addr, asked).unwrap();
                    assert_eq!(bp.len(), Len::B1);
                    let mut dr = [0; 4];
                    dr[slot.index()] = bp.addr();
                    let dr7 = Dr7::EMPTY.with_slot(slot, bp.kind().condition(), bp.len());
                    kernel_answers(c, dr, dr7.into_bits(), Ok(())).unwrap_or_else(|e| panic!("{e}"));
                    checked += 1;
                }
                for len in [0b01, 0b10, 0b11] {
                    let mut dr = [0; 4];
                    dr[slot.index()] = addr;
                    let raw = raw_slot(slot, 0b00, len).into_bits();
                    kernel_answers(c, dr, raw, Err(Errno::EINVAL)).unwrap_or_else(|e| panic!("{e}"));
                    checked += 1;
                }
            }
        }
        println!("oracle: validation of execute lengths: {checked} cases checked against the kernel");
    });
}

/// I/O breakpoints: the model has no hardware kind for R/W = 10
/// (`HwKind::from_condition` is `None`) and predicts no memory hit for it;
/// the kernel refuses R/W = 10 in every slot with every length.
#[test]
fn oracle_validation_io_condition_agrees_with_the_kernel() {
    repeated("oracle_validation_io_condition_agrees_with_the_kernel", |c| {
        assert_eq!(HwKind::from_condition(Condition::Io), None);
        let mut checked = 0;
        for slot in Slot::ALL {
            for len in 0..4 {
                let mut dr = [0; 4];
                dr[slot.index()] = window();
                let dr7 = raw_slot(slot, 0b10, len);
                assert_eq!(dr7.condition(slot), Condition::Io);
                assert!(predict::hits(dr, dr7, Access::write(window(), 8)).is_empty());
                kernel_answers(c, dr, dr7.into_bits(), Err(Errno::EINVAL)).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
        println!("oracle: validation of I/O conditions: {checked} cases checked against the kernel");
    });
}

/// Enables and the exact/general-detect bits: every combination the model's
/// `Dr7::new_checked` accepts with valid slot fields — G only, L only, both,
/// LE, GE, GD — the kernel accepts too.
#[test]
fn oracle_validation_enable_bits_agree_with_the_kernel() {
    repeated("oracle_validation_enable_bits_agree_with_the_kernel", |c| {
        let bp = HwBreakpoint::new(HwKind::Write, window(), 8).unwrap();
        let mut checked = 0;
        for slot in Slot::ALL {
            let mut dr = [0; 4];
            dr[slot.index()] = bp.addr();
            let armed = Dr7::EMPTY.with_slot(slot, bp.kind().condition(), bp.len());
            for enables in 0..4u8 {
                for extra in [0, 1 << 8, 1 << 9, 3 << 8, 1 << 13, 1 << 11] {
                    let dr7 = armed
                        .with_global(slot, enables & 2 != 0)
                        .with_local(slot, enables & 1 != 0)
                        .into_bits()
                        | extra;
                    let model = Dr7::new_checked(dr7);
                    assert!(model.is_ok(), "{dr7:#x}");
                    kernel_answers(c, dr, dr7, Ok(())).unwrap_or_else(|e| panic!("{e}"));
                    checked += 1;
                }
            }
        }
        println!("oracle: validation of enable bits: {checked} cases checked against the kernel");
    });
}

// ---------------------------------------------------------------------------
// Where the kernel's rules are not the model's (documented differences)

/// Difference: `Dr7::new_checked` refuses reserved bits 12, 14, 15 and 32–63
/// (a `MOV DR7` with bits 63:32 set raises #GP); Linux silently drops them
/// (`DR_CONTROL_RESERVED` in `ptrace_write_dr7`) and never loads the tracer's
/// DR7 into the CPU as such, so it accepts them. The model is stricter on
/// purpose: it validates values to be loaded by `MOV DR7`.
#[test]
fn oracle_kernel_ignores_reserved_dr7_bits_the_model_refuses() {
    repeated("oracle_kernel_ignores_reserved_dr7_bits_the_model_refuses", |c| {
        let armed = Dr7::EMPTY.with_slot(Slot::DR0, Condition::Write, Len::B8).into_bits();
        let dr = [window(), 0, 0, 0];
        let mut checked = 0;
        for bit in [12, 14, 15, 32, 47, 63] {
            let dr7 = armed | 1 << bit;
            assert!(Dr7::new_checked(dr7).is_err(), "model accepts bit {bit}");
            kernel_answers(c, dr, dr7, Ok(())).unwrap_or_else(|e| panic!("{e}"));
            // And the watchpoint still works as programmed.
            let (cpu, _) =
                check_data(c, dr, Dr7::from_bits(dr7), Access::write(window(), 1)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cpu, 0b1);
            checked += 1;
        }
        println!(
            "oracle: reserved DR7 bits (kernel ignores, model refuses): {checked} cases checked against the kernel"
        );
    });
}

/// Difference: the model accepts a breakpoint at any 64-bit address (DRn
/// holds any linear address); Linux lets a tracer watch only user space and
/// refuses addresses whose range reaches `TASK_SIZE_MAX` (0x7fff_ffff_f000
/// with 4-level paging): the kernel half, non-canonical addresses, and the
/// guard page at the top of user space.
#[test]
fn oracle_kernel_refuses_non_user_addresses_the_model_accepts() {
    repeated("oracle_kernel_refuses_non_user_addresses_the_model_accepts", |c| {
        let mut checked = 0;
        for addr in [
            0xffff_8000_0000_0000u64,
            0x0000_8000_0000_0000,
            0x7fff_ffff_fff8,
            u64::MAX - 7,
        ] {
            let bp = HwBreakpoint::new(HwKind::Write, addr, 8).expect("the model accepts any aligned address");
            let dr7 = Dr7::EMPTY.with_slot(Slot::DR0, bp.kind().condition(), bp.len());
            kernel_answers(c, [bp.addr(), 0, 0, 0], dr7.into_bits(), Err(Errno::EINVAL))
                .unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
        println!(
            "oracle: non-user addresses (kernel refuses, model accepts): {checked} cases checked against the kernel"
        );
    });
}

/// Difference: for the model a disabled slot's R/W and LEN fields are inert
/// (it predicts nothing for the slot whatever they hold). Linux keeps a perf
/// event per slot once its DRn has been written and re-validates that event's
/// fields on every DR7 write, enabled or not: an I/O, LEN ≠ 00 execute or
/// misaligned field in a *disabled* slot makes the DR7 write fail too.
#[test]
fn oracle_kernel_validates_fields_of_disabled_slots_the_model_ignores() {
    repeated(
        "oracle_kernel_validates_fields_of_disabled_slots_the_model_ignores",
        |c| {
            let mut checked = 0;
            let cases = [
                ("I/O", window(), 0b10, 0b00),
                ("execute with LEN 4", sled_addr(), 0b00, 0b11),
                ("misaligned 4-byte watch", window() + 2, 0b01, 0b11),
            ];
            for (what, addr, rw, len) in cases {
                for slot in Slot::ALL {
                    let mut dr = [0; 4];
                    dr[slot.index()] = addr;
                    let dr7 = raw_slot(slot, rw, len).with_global(slot, false);
                    assert!(!SlotMask::enabled(dr7).contains(slot));
                    assert!(Dr7::new_checked(dr7.into_bits()).is_ok());
                    assert!(predict::hits(dr, dr7, Access::write(addr, 8)).is_empty());
                    kernel_answers(c, dr, dr7.into_bits(), Err(Errno::EINVAL))
                        .unwrap_or_else(|e| panic!("disabled {what} in {slot}: {e}"));
                    checked += 1;
                }
            }
            println!(
        "oracle: fields of disabled slots (kernel validates, model ignores): {checked} cases checked against the kernel"
    );
        },
    );
}

/// The harness must not pretend: an access it cannot make is an error, not a
/// silent "no hit".
#[test]
fn oracle_harness_refuses_accesses_it_cannot_make() {
    repeated("oracle_harness_refuses_accesses_it_cannot_make", |c| {
        let outside = oracle::Access {
            addr: buffer_addr() + oracle::BUFFER_LEN as u64 - 4,
            size: 8,
            kind: oracle::AccessKind::Read,
        };
        let mid_instruction = oracle::Access {
            addr: sled_addr() + 2,
            size: 1,
            kind: oracle::AccessKind::Execute,
        };
        let odd_width = oracle::Access {
            addr: window(),
            size: 3,
            kind: oracle::AccessKind::Write,
        };
        for access in [outside, mid_instruction, odd_width] {
            let result = c.oracle().cpu_hits([0; 4], 0, access);
            assert!(
                matches!(result, Err(OracleError::BadAccess(_))),
                "{access:x?}: {result:?}"
            );
        }
        // The child still serves after the refusals.
        let dr7 = Dr7::EMPTY.with_slot(Slot::DR2, Condition::Write, Len::B1);
        assert_eq!(
            check_data(c, [0, 0, window(), 0], dr7, Access::write(window(), 1))
                .unwrap_or_else(|e| panic!("{e}"))
                .0,
            0b100
        );
        println!("oracle: harness refusals: 4 cases checked against the CPU");
    });
}

// ---------------------------------------------------------------------------
// The re-run rule (oracle/rerun.rs): transients pass, disagreements fail

/// A model with a planted bug, as a mutant of `predict.rs` would be: a write
/// watchpoint misses a store to the last byte of its range.
fn planted_hits(dr: [u64; 4], dr7: Dr7, access: Access) -> SlotMask {
    let right = predict::hits(dr, dr7, access);
    Slot::ALL
        .into_iter()
        .filter(|&s| right.contains(s))
        .filter(|&s| {
            let bytes = dr7.len(s).bytes();
            let last = dr[s.index()] + bytes - 1;
            !(access.kind == AccessKind::Write && access.size == 1 && access.addr == last)
        })
        .fold(SlotMask::EMPTY, SlotMask::with)
}

/// A wrong prediction is the model's, not the child's: the fresh child
/// reproduces the disagreement, so the check fails and no transient is
/// counted. (Planted bugs stay caught.)
#[test]
fn oracle_a_wrong_prediction_reproduces_in_a_fresh_child_and_fails() {
    let Some(oracle) = oracle::spawn_or_skip() else {
        return;
    };
    let ledger = Ledger::new(oracle::rerun::MAX_TRANSIENTS_PER_RUN);
    let mut c = Checker::new(oracle, &ledger);
    let dr7 = Dr7::EMPTY.with_slot(Slot::DR1, Condition::Write, Len::B4);
    let dr = [0, window(), 0, 0];
    // Bytes before the planted bug's byte agree with the CPU...
    for at in window()..window() + 3 {
        check_data_with(&mut c, planted_hits, dr, dr7, Access::write(at, 1)).unwrap_or_else(|e| panic!("{e}"));
    }
    // ...the last byte of the range does not, in any child.
    let result = check_data_with(&mut c, planted_hits, dr, dr7, Access::write(window() + 3, 1));
    let err = result.expect_err("a planted wrong prediction passed the CPU oracle");
    assert!(err.contains("reproduced in a fresh child"), "{err}");
    assert_eq!((c.transients(), ledger.count()), (0, 0));
    println!("oracle: planted wrong prediction: failed as it must ({err})");
}

/// An outcome that disagrees once but not in a fresh child is a transient:
/// the check passes with the fresh child's answer, the transient is counted,
/// and the checker goes on with the fresh child.
#[test]
fn oracle_a_disagreement_a_fresh_child_does_not_repeat_is_a_counted_transient() {
    let Some(oracle) = oracle::spawn_or_skip() else {
        return;
    };
    let ledger = Ledger::new(oracle::rerun::MAX_TRANSIENTS_PER_RUN);
    let mut c = Checker::new(oracle, &ledger);
    let dr7 = Dr7::EMPTY.with_slot(Slot::DR0, Condition::Write, Len::B1);
    let dr = [window(), 0, 0, 0];
    let access = harness_access(Access::write(window(), 1));
    let (mut pids, mut judged) = (Vec::new(), 0);
    let answer = c.ask(
        || "a store to a watched byte".to_string(),
        |o| {
            pids.push(o.pid());
            o.cpu_hits(dr, dr7.into_bits(), access)
        },
        |&cpu| {
            judged += 1;
            // The first judgement plays a transient: it rejects the right answer.
            if judged == 1 {
                Err("planted transient".to_string())
            } else if cpu == 0b1 {
                Ok(())
            } else {
                Err(format!("CPU set {cpu:#06b}, the SDM says B0"))
            }
        },
    );
    assert_eq!(answer, Ok(0b1));
    assert_eq!(pids.len(), 2, "asked once and re-run once");
    assert_ne!(pids[0], pids[1], "the re-run must be in a fresh child");
    assert_eq!((c.transients(), ledger.count()), (1, 1));
    // The checker now serves from the fresh child.
    let (mut later, mut asked) = (0, 0);
    c.ask(
        String::new,
        |o| {
            later = o.pid();
            asked += 1;
            o.cpu_hits(dr, dr7.into_bits(), access)
        },
        |&cpu| if cpu == 0b1 { Ok(()) } else { Err(format!("{cpu:#06b}")) },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((later, asked), (pids[1], 1));
}

/// An outcome the oracle cannot classify — here the stray `TRAP_BRKPT` of
/// issue #15, played by the query — is re-run in a fresh child too, and is a
/// transient if that child answers as expected.
#[test]
fn oracle_an_unclassifiable_outcome_is_re_run_in_a_fresh_child() {
    let Some(oracle) = oracle::spawn_or_skip() else {
        return;
    };
    let ledger = Ledger::new(oracle::rerun::MAX_TRANSIENTS_PER_RUN);
    let mut c = Checker::new(oracle, &ledger);
    let dr7 = Dr7::EMPTY.with_slot(Slot::DR3, Condition::ReadWrite, Len::B8);
    let dr = [0, 0, 0, window_at(1) + 8];
    // The access of the flake: an 8-byte store at page offset 4093.
    let access = Access::write(buffer_addr() + 4093, 8);
    let mut asked = 0;
    let answer = check_data_with(&mut c, predict::hits, dr, dr7, access);
    assert_eq!(answer, Ok((0b1000, SlotMask::single(Slot::DR3))));
    let answer = c.ask(
        || "planted stray trap".to_string(),
        |o| {
            asked += 1;
            if asked == 1 {
                return Err(OracleError::StrayTrap {
                    si_code: 1,
                    rip: 0,
                    dr6: 0,
                    dr7: 0,
                    command: "Store { offset: 4093, size: 8 }".to_string(),
                });
            }
            o.cpu_hits(dr, dr7.into_bits(), harness_access(access))
        },
        |&cpu| {
            if cpu == 0b1000 {
                Ok(())
            } else {
                Err(format!("{cpu:#06b}"))
            }
        },
    );
    assert_eq!((answer, asked), (Ok(0b1000), 2));
    assert_eq!((c.transients(), ledger.count()), (1, 1));
}

/// More transients than the budget fail the run, whatever the fresh children
/// answer: a regression that comes and goes cannot pass as noise.
#[test]
fn oracle_more_transients_than_the_budget_fail_the_run() {
    let Some(oracle) = oracle::spawn_or_skip() else {
        return;
    };
    let budget = oracle::rerun::MAX_TRANSIENTS_PER_RUN;
    let ledger = Ledger::new(budget);
    let mut c = Checker::new(oracle, &ledger);
    let dr7 = Dr7::EMPTY.with_slot(Slot::DR2, Condition::Write, Len::B2);
    let dr = [0, 0, window(), 0];
    let access = harness_access(Access::write(window() + 1, 1));
    let mut results = Vec::new();
    for _ in 0..=budget {
        let mut judged = 0;
        results.push(c.ask(
            String::new,
            |o| o.cpu_hits(dr, dr7.into_bits(), access),
            |&cpu| {
                judged += 1;
                match (judged, cpu) {
                    (1, _) => Err("planted transient".to_string()),
                    (_, 0b100) => Ok(()),
                    (_, other) => Err(format!("{other:#06b}")),
                }
            },
        ));
    }
    let last = results.pop().expect("budget + 1 asks");
    assert!(results.iter().all(|r| *r == Ok(0b100)), "{results:?}");
    let err = last.expect_err("one transient over the budget passed");
    assert!(err.contains(&format!("more than the {budget} allowed")), "{err}");
    assert_eq!(ledger.count(), budget + 1);
}
