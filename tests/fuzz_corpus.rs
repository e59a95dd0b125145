//! The fuzz corpus under plain `cargo test` (stable, no libFuzzer): every file
//! of `fuzz/corpus/<target>/` goes through the same function `cargo fuzz run
//! <target>` calls (`x86_debugreg::fuzzing::<target>`), and the hand-made
//! seeds below are kept in sync with the committed `seed-*` files.
//!
//! After a change to the case types, `FUZZ_WRITE_SEEDS=1 cargo test --test
//! fuzz_corpus` rewrites the seed files.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use x86_debugreg::differential::Op;
use x86_debugreg::fuzzing::{self, Applied, Dr7Case, ExitCase, RegionOp, RegionsCase, SwCase, SwOp};
use x86_debugreg::region::Mode;
use x86_debugreg::watch::WatchKind;
use x86_debugreg::DebugExit;

/// A fuzz target's body: runs one input, says whether it is worth keeping.
type Body = fn(&[u8]) -> bool;

/// Every target and its body.
const TARGETS: [(&str, Body); 4] = [
    ("dr7", fuzzing::dr7),
    ("exit", fuzzing::exit),
    ("sw", fuzzing::sw),
    ("regions", fuzzing::regions),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_of_every_target_replays_cleanly() {
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let files = corpus(target);
        assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
        for file in files {
            let data = fs::read(&file).expect("readable corpus file");
            match panic::catch_unwind(AssertUnwindSafe(|| run(&data))) {
                Ok(true) => {}
                Ok(false) => failures.push(format!("{}: rejected as useless", file.display())),
                Err(_) => failures.push(format!("{}: failed (message above)", file.display())),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus files failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const fn exit(exception: u32, pc: u64, dr6: u64) -> DebugExit {
    DebugExit {
        exception,
        pc,
        dr6,
        dr7: 0,
    }
}

fn dr7_seeds() -> Vec<(&'static str, Dr7Case)> {
    let hw = |ty, addr, len| Op::Insert { ty, addr, len };
    let rm = |ty, addr, len| Op::Remove { ty, addr, len };
    vec![
        (
            "every-type-and-length",
            Dr7Case {
                dr7: 0xffff_0402,
                dr6: 0xfffe_4ff1,
                fail_at: None,
                ops: vec![
                    hw(0, 0x10, 1),
                    hw(1, 0x1003, 3),
                    hw(2, 0x1000, 8),
                    hw(3, 0x2000, 4),
                    hw(4, 0x2004, 4),
                    hw(2, 0x3001, 2),
                    hw(4, 0x3000, 3),
                    hw(5, 0x10, 1),
                    hw(2, 0x4000, 2),
                    Op::SingleStep(true),
                    Op::Apply,
                    Op::Decode(exit(1, 0x1003, 0xffff_4ff0)),
                    Op::Decode(exit(1, 0x1003, 0xffff_0ff1)),
                    Op::Decode(exit(1, 0x1003, 0xfffe_4ff6)),
                    Op::Decode(exit(3, 0x10, 0)),
                    Op::Decode(exit(3, 0x11, 0)),
                    Op::Decode(exit(14, 0x10, 0)),
                    rm(1, 0x1003, 1),
                    rm(2, 0x1000, 8),
                    rm(2, 0x1000, 4),
                    rm(4, 0x2004, 4),
                    rm(0, 0x10, 1),
                    rm(0, 0x10, 1),
                ],
            },
        ),
        (
            "slots-full-and-duplicate",
            Dr7Case {
                dr7: 0xffff_ffff_ffff_ffff,
                dr6: 0,
                fail_at: None,
                ops: vec![
                    hw(1, 0x100, 1),
                    hw(1, 0x100, 1),
                    hw(2, 0x108, 8),
                    hw(4, 0x110, 4),
                    hw(4, 0xffff_ffff_ffff_fff8, 8),
                    hw(1, 0x200, 1),
                    rm(2, 0x108, 8),
                    hw(2, 0x108, 8),
                    Op::Apply,
                    Op::Decode(exit(1, 0x100, 0xffff_0fff)),
                    Op::RemoveAll,
                    Op::Apply,
                    Op::Decode(exit(1, 0x100, 0xffff_0fff)),
                ],
            },
        ),
        (
            "guest-rewrites-and-poison",
            Dr7Case {
                dr7: 0x8000_0000,
                dr6: 0xffff_ffff,
                fail_at: None,
                ops: vec![
                    hw(0, 0x10, 1),
                    hw(0, 0x10, 1),
                    hw(0, 0x18, 1),
                    hw(0, 0x11, 1),
                    hw(0, 0x20, 1),
                    hw(0, 0x21, 1),
                    hw(0, 0x40, 1),
                    Op::GuestWrite {
                        addr: 0x10,
                        value: 0x90,
                    },
                    Op::GuestWrite {
                        addr: 0x18,
                        value: 0xcc,
                    },
                    rm(0, 0x10, 1),
                    rm(0, 0x10, 1),
                    Op::Poison {
                        addr: 0x11,
                        reads: true,
                        writes: false,
                    },
                    Op::RemoveAll,
                    Op::Poison {
                        addr: 0x11,
                        reads: false,
                        writes: false,
                    },
                    Op::RemoveAll,
                ],
            },
        ),
        (
            "failing-access",
            Dr7Case {
                dr7: 0x400,
                dr6: 0xffff_0ff0,
                fail_at: Some(1),
                ops: vec![hw(0, 0x8, 1), hw(0, 0x8, 1), hw(0, 0x9, 1), Op::RemoveAll],
            },
        ),
    ]
}

fn exit_seeds() -> Vec<(&'static str, ExitCase)> {
    let every_kind = vec![
        exit(1, 0x1000, 0xffff_4ff0),
        exit(1, 0x1000, 0xfffe_4ff0),
        exit(1, 0x1000, 0xffff_0ff1),
        exit(1, 0x1000, 0xffff_4ff2),
        exit(1, 0x1000, 0xffff_0ffc),
        exit(1, 0x1000, 0xffff_0ff0),
        exit(3, 0x10, 0),
        exit(3, 0x11, 0),
        exit(14, 0x10, 0),
        DebugExit {
            exception: 1,
            pc: 0x1000,
            dr6: 0xffff_0ff1,
            dr7: 0xffff_ffff,
        },
    ];
    vec![
        (
            "built",
            ExitCase {
                applied: Applied::Built(vec![
                    Op::Insert {
                        ty: 1,
                        addr: 0x1000,
                        len: 1,
                    },
                    Op::Insert {
                        ty: 2,
                        addr: 0x2000,
                        len: 8,
                    },
                    Op::Insert {
                        ty: 0,
                        addr: 0x10,
                        len: 1,
                    },
                    Op::SingleStep(true),
                ]),
                exits: every_kind.clone(),
            },
        ),
        (
            "raw-io-slot-and-every-length",
            ExitCase {
                applied: Applied::Raw {
                    control: 0x3_0003,
                    // DR0 execute, DR1 write 2 bytes, DR2 I/O (never a hit),
                    // DR3 read/write 8 bytes; L/G bits mixed.
                    debugreg: [
                        0x1000,
                        0x2002,
                        0x3000,
                        0x4008,
                        0,
                        0,
                        0xffff_0ff0,
                        0xb25d_0000 | 0x400 | 0b1001_1101,
                    ],
                    sw: vec![0x10, 0xffff_ffff_ffff_ffff],
                },
                exits: every_kind.clone(),
            },
        ),
        (
            "raw-disabled",
            ExitCase {
                applied: Applied::Raw {
                    control: 0x3_0002,
                    debugreg: [0x1000, 0, 0, 0, 0, 0, 0, 0x602],
                    sw: vec![],
                },
                exits: every_kind,
            },
        ),
    ]
}

fn sw_seeds() -> Vec<(&'static str, SwCase)> {
    use SwOp::*;
    vec![
        (
            "counts",
            SwCase {
                ops: vec![
                    Insert {
                        addr: 0x10,
                        fault: None,
                    },
                    Insert {
                        addr: 0x10,
                        fault: None,
                    },
                    Remove {
                        addr: 0x10,
                        fault: None,
                    },
                    Remove {
                        addr: 0x10,
                        fault: None,
                    },
                    Remove {
                        addr: 0x10,
                        fault: None,
                    },
                    Insert {
                        addr: 0xff,
                        fault: None,
                    },
                ],
            },
        ),
        (
            "faults",
            SwCase {
                ops: vec![
                    Insert {
                        addr: 0x20,
                        fault: Some(0),
                    },
                    Insert {
                        addr: 0x20,
                        fault: Some(1),
                    },
                    Insert {
                        addr: 0x20,
                        fault: None,
                    },
                    Insert {
                        addr: 0x21,
                        fault: None,
                    },
                    Remove {
                        addr: 0x20,
                        fault: Some(1),
                    },
                    Remove {
                        addr: 0x20,
                        fault: Some(0),
                    },
                    RemoveAll { fault: Some(2) },
                    RemoveAll { fault: None },
                ],
            },
        ),
        (
            "guest-writes",
            SwCase {
                ops: vec![
                    Insert {
                        addr: 0x30,
                        fault: None,
                    },
                    GuestWrite {
                        addr: 0x30,
                        value: 0x90,
                    },
                    Insert {
                        addr: 0x31,
                        fault: None,
                    },
                    GuestWrite {
                        addr: 0x31,
                        value: 0xcc,
                    },
                    GuestWrite {
                        addr: 0x32,
                        value: 0xcc,
                    },
                    Insert {
                        addr: 0x32,
                        fault: None,
                    },
                    Remove {
                        addr: 0x30,
                        fault: None,
                    },
                    RemoveAll { fault: None },
                ],
            },
        ),
        (
            "failing-memory",
            SwCase {
                ops: vec![
                    Insert {
                        addr: 0x40,
                        fault: None,
                    },
                    Insert {
                        addr: 0x41,
                        fault: None,
                    },
                    FailReads { addr: 0x40 },
                    FailWrites { addr: 0x41 },
                    RemoveAll { fault: None },
                    Remove {
                        addr: 0x41,
                        fault: None,
                    },
                    Insert {
                        addr: 0x42,
                        fault: None,
                    },
                    FailWrites { addr: 0x43 },
                    Insert {
                        addr: 0x43,
                        fault: None,
                    },
                    Heal,
                    Insert {
                        addr: 0x43,
                        fault: None,
                    },
                    FailReads { addr: 0x43 },
                ],
            },
        ),
    ]
}

fn regions_seeds() -> Vec<(&'static str, RegionsCase)> {
    use RegionOp::*;
    use WatchKind::*;
    vec![
        (
            "planner-examples",
            RegionsCase {
                mode: Mode::Long,
                ops: vec![
                    Plan { addr: 0x1003, len: 6 },
                    Plan { addr: 0x2004, len: 12 },
                    Plan { addr: 0x1001, len: 16 },
                    Plan { addr: 0, len: 0 },
                    Plan { addr: u64::MAX, len: 2 },
                    Plan {
                        addr: 0xffff_ffff_ffff_fff8,
                        len: 8,
                    },
                    Plan { addr: 1, len: u64::MAX },
                    Plan {
                        addr: 0x3,
                        len: 0x1_0000,
                    },
                ],
            },
        ),
        (
            "sharing-and-full",
            RegionsCase {
                mode: Mode::Long,
                ops: vec![
                    Insert {
                        kind: Write,
                        addr: 0x1003,
                        len: 6,
                    },
                    Insert {
                        kind: Write,
                        addr: 0x1004,
                        len: 4,
                    },
                    Insert {
                        kind: ReadWrite,
                        addr: 0x2004,
                        len: 12,
                    },
                    Insert {
                        kind: Execute,
                        addr: 0x40_1000,
                        len: 1,
                    },
                    Insert {
                        kind: Write,
                        addr: 0x1001,
                        len: 16,
                    },
                    Stop {
                        mask: 0b0010,
                        changed: None,
                    },
                    Remove {
                        kind: Write,
                        addr: 0x1003,
                        len: 6,
                    },
                    Insert {
                        kind: ReadWrite,
                        addr: 0x2004,
                        len: 12,
                    },
                    Insert {
                        kind: Execute,
                        addr: 0x40_1000,
                        len: 0,
                    },
                    Stop {
                        mask: 0b1111,
                        changed: None,
                    },
                    RemoveSet { index: 1 },
                    Remove {
                        kind: Write,
                        addr: 0x1004,
                        len: 5,
                    },
                    Insert {
                        kind: Write,
                        addr: 0,
                        len: 0,
                    },
                    Insert {
                        kind: Write,
                        addr: u64::MAX,
                        len: 2,
                    },
                    Clear,
                    RemoveSet { index: 0 },
                ],
            },
        ),
        (
            "read-watch-values",
            RegionsCase {
                mode: Mode::Legacy,
                ops: vec![
                    Insert {
                        kind: Read,
                        addr: 0x1003,
                        len: 6,
                    },
                    Insert {
                        kind: ReadWrite,
                        addr: 0x1004,
                        len: 4,
                    },
                    Stop {
                        mask: 0b0010,
                        changed: None,
                    },
                    Stop {
                        mask: 0b0010,
                        changed: Some(1),
                    },
                    Stop {
                        mask: 0b0001,
                        changed: Some(0),
                    },
                    Insert {
                        kind: Read,
                        addr: 0x2004,
                        len: 12,
                    },
                    Remove {
                        kind: Read,
                        addr: 0x1003,
                        len: 6,
                    },
                    Insert {
                        kind: Read,
                        addr: 0x2004,
                        len: 12,
                    },
                    Stop {
                        mask: 0b1110,
                        changed: Some(0x2a),
                    },
                ],
            },
        ),
    ]
}

/// Every hand-made seed: target, file name, bytes.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut all = Vec::new();
    for (name, case) in dr7_seeds() {
        all.push(("dr7", format!("seed-{name}"), case.to_bytes()));
    }
    for (name, case) in exit_seeds() {
        all.push(("exit", format!("seed-{name}"), case.to_bytes()));
    }
    for (name, case) in sw_seeds() {
        all.push(("sw", format!("seed-{name}"), case.to_bytes()));
    }
    for (name, case) in regions_seeds() {
        all.push(("regions", format!("seed-{name}"), case.to_bytes()));
    }
    all
}

#[test]
fn hand_made_seeds_decode_to_themselves_and_pass() {
    for (name, case) in dr7_seeds() {
        assert_eq!(
            fuzzing::parse_dr7(&case.to_bytes()).as_ref(),
            Some(&case),
            "dr7 seed {name}"
        );
        assert_eq!(case.check(), Ok(()), "dr7 seed {name}");
    }
    for (name, case) in exit_seeds() {
        assert_eq!(
            fuzzing::parse_exit(&case.to_bytes()).as_ref(),
            Some(&case),
            "exit seed {name}"
        );
        assert_eq!(case.check(), Ok(()), "exit seed {name}");
    }
    for (name, case) in sw_seeds() {
        assert_eq!(
            fuzzing::parse_sw(&case.to_bytes()).as_ref(),
            Some(&case),
            "sw seed {name}"
        );
        assert_eq!(case.check(), Ok(()), "sw seed {name}");
    }
    for (name, case) in regions_seeds() {
        assert_eq!(
            fuzzing::parse_regions(&case.to_bytes()).as_ref(),
            Some(&case),
            "regions seed {name}"
        );
        assert_eq!(case.check(), Ok(()), "regions seed {name}");
    }
}

#[test]
fn hand_made_seeds_are_committed() {
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let path = corpus_dir(target).join(&name);
        if write {
            fs::create_dir_all(corpus_dir(target)).expect("corpus directory");
            fs::write(&path, &bytes).expect("seed written");
        }
        let committed = fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is not the seed the code describes; rewrite it with \
             FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_corpus",
            path.display()
        );
    }
}

#[test]
fn a_reproducer_names_every_operation() {
    let (_, case) = dr7_seeds().swap_remove(2);
    let text = format!("{case:?}");
    assert!(text.starts_with("use x86_debugreg::differential::Op;"), "{text}");
    assert!(text.ends_with("assert_eq!(case.check(), Ok(()));"), "{text}");
    assert!(
        text.contains("Op::Poison { addr: 0x11, reads: true, writes: false },"),
        "{text}"
    );
    assert!(text.contains("Op::GuestWrite { addr: 0x18, value: 0xcc },"), "{text}");
    let (_, sw) = sw_seeds().swap_remove(1);
    assert!(format!("{sw:?}").contains("SwOp::Insert { addr: 0x20, fault: Some(1) },"));
}
