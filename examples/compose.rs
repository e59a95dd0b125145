//! Composes DR7 for a few breakpoints the way a GDB stub would receive them,
//! prints the `kvm_guest_debug` request, then decodes a few debug exits as a
//! VMM would receive them. Pure: no KVM needed.
//!
//! `cargo run --example compose`

use x86_debugreg::sw::ByteMemory;
use x86_debugreg::{DebugExit, DebugState, Decision, Dr6, Slot, Stop};

/// A tiny guest memory: 256 bytes of `nop`s at 0x40_1000.
struct Ram(Vec<u8>);

const BASE: u64 = 0x40_1000;

impl ByteMemory for Ram {
    type Error = String;
    fn read_byte(&mut self, addr: u64) -> Result<u8, String> {
        let i = addr
            .checked_sub(BASE)
            .ok_or_else(|| format!("{addr:#x} is below guest RAM"))?;
        self.0
            .get(i as usize)
            .copied()
            .ok_or_else(|| format!("{addr:#x} is beyond guest RAM"))
    }
    fn write_byte(&mut self, addr: u64, value: u8) -> Result<(), String> {
        let i = addr
            .checked_sub(BASE)
            .ok_or_else(|| format!("{addr:#x} is below guest RAM"))?;
        *self
            .0
            .get_mut(i as usize)
            .ok_or_else(|| format!("{addr:#x} is beyond guest RAM"))? = value;
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ram = Ram(vec![0x90; 256]);
    let mut state = DebugState::new();

    // Z1 / Z2 / Z4 / Z0 packets, and three requests the model refuses.
    let requests: [(u64, u64, u64); 7] = [
        (1, 0x40_1000, 1),
        (2, 0x60_2000, 4),
        (4, 0x60_2008, 8),
        (0, 0x40_1010, 1),
        (2, 0x60_2002, 4), // misaligned
        (3, 0x60_2000, 4), // read watchpoint: no such x86 condition
        (1, 0x40_1020, 1), // would be a fourth slot: fine
    ];
    for (ty, addr, len) in requests {
        match state.insert_gdb(&mut ram, ty, addr, len) {
            Ok(done) => println!("Z{ty},{addr:x},{len}: {done:?}"),
            Err(e) => println!("Z{ty},{addr:x},{len}: refused: {e}"),
        }
    }
    if let Err(e) = state.insert_gdb(&mut ram, 1, 0x40_1030, 1) {
        println!("Z1,401030,1: refused: {e}");
    }

    let applied = x86_debugreg::Applied::was_set(state.guest_debug());
    println!("\nKVM_SET_GUEST_DEBUG control = {:?}", applied.control);
    for (n, value) in applied.debugreg.iter().enumerate() {
        println!("  debugreg[{n}] = {value:#018x}");
    }
    let dr7 = applied.dr7();
    for slot in Slot::ALL {
        if dr7.enabled(slot) {
            println!("  {slot}: {:?}, {} bytes", dr7.condition(slot), dr7.len(slot).bytes());
        }
    }

    println!("\nDebug exits:");
    let exits = [
        DebugExit {
            exception: 1,
            pc: 0x40_1000,
            dr6: 0xffff_0ff1,
            dr7: 0,
        },
        DebugExit {
            exception: 1,
            pc: 0x40_1044,
            dr6: 0xffff_0ff6,
            dr7: 0,
        },
        DebugExit {
            exception: 3,
            pc: 0x40_1010,
            dr6: 0xffff_0ff0,
            dr7: 0,
        },
        DebugExit {
            exception: 3,
            pc: 0x40_1080,
            dr6: 0xffff_0ff0,
            dr7: 0,
        },
        DebugExit {
            exception: 1,
            pc: 0x40_1090,
            dr6: 0xfffe_4ff0,
            dr7: 0,
        },
    ];
    for exit in exits {
        let dr6 = Dr6::from_kvm(exit.dr6);
        let what = match state.decode(&exit, &applied)? {
            Decision::Stop(Stop::Debug { single_step, hits }) => {
                let hits: Vec<String> = hits.iter().map(|h| h.to_string()).collect();
                format!("stop: single-step {single_step}, hits [{}]", hits.join("; "))
            }
            Decision::Stop(Stop::Software { addr }) => format!("stop: software breakpoint at {addr:#x}"),
            Decision::Reinject(e) => format!("the guest's own exception: re-inject vector {}", e.vector()),
        };
        println!(
            "  #{} at {:#x}, DR6 {:#x}: {what}",
            exit.exception,
            exit.pc,
            dr6.into_bits()
        );
    }

    let report = state.remove_all(&mut ram);
    println!(
        "\nremove-all: {} restored, memory intact: {}",
        report.restored,
        ram.0.iter().all(|&b| b == 0x90)
    );
    Ok(())
}
