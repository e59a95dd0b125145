//! Reaching a vCPU that is inside `KVM_RUN`.
//!
//! Changes to the debug intent apply at a vCPU's next
//! [`before_run`](crate::VcpuDebug::before_run) / [`sync`](crate::VcpuDebug::sync),
//! but a guest that never exits never gets there. A [`Kick`] makes `KVM_RUN`
//! return; [`VmDebug`](crate::VmDebug) calls it for every running vCPU when
//! the intent changes and when it stops all vCPUs. The VMM chooses the
//! mechanism:
//!
//! * [`SignalKick`], built in: a real-time signal sent to the vCPU's thread,
//!   which keeps it **blocked** except inside `KVM_RUN`
//!   (`KVM_SET_SIGNAL_MASK`, as QEMU and uhyve do). A kick that lands between
//!   the thread's last check and the ioctl stays pending, and `KVM_RUN`
//!   returns `EINTR` at once: there is no window in which a kick is lost, and
//!   nothing writes the `kvm_run` area behind the `&mut VcpuFd` that
//!   `VcpuFd::run` holds. After `EINTR`, call [`SignalKick::drain`].
//! * any `Fn(usize) -> io::Result<()>` (a closure is a [`Kick`]): for a VMM
//!   that already owns a signal scheme. An eventfd alone cannot interrupt
//!   `KVM_RUN`; it only wakes a thread waiting in `poll`.
//!
//! A VMM needs no `unsafe` for any of it; the only `unsafe` in kvm-glue is in
//! this module.
//!
//! ```no_run
//! use kvm_glue::kick::SignalKick;
//! # fn vcpu_thread(kick: &SignalKick, vcpu: &mut kvm_ioctls::VcpuFd) -> Result<(), Box<dyn std::error::Error>> {
//! kick.prepare_vcpu_thread(0, vcpu)?; // once, on vCPU 0's own thread
//! loop {
//!     // vcpu_dbg.before_run(&*vcpu)?;
//!     match vcpu.run() {
//!         Err(e) if e.errno() == libc::EINTR => kick.drain()?, // kicked: loop to before_run
//!         Ok(_exit) => { /* handle it */ }
//!         Err(e) => return Err(e.into()),
//!     }
//! }
//! # }
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::VcpuFd;
use libc::c_int;
use vmm_sys_util::signal;

/// Makes vCPU `vcpu` leave `KVM_RUN` (or not enter it) soon.
///
/// Called by [`VmDebug`](crate::VmDebug) from the debugger's thread, never
/// from a vCPU's own thread for itself. Must not block for long.
pub trait Kick: Send + Sync {
    /// Kicks vCPU `vcpu`.
    ///
    /// # Errors
    /// If the kick could not be delivered.
    fn kick(&self, vcpu: usize) -> io::Result<()>;

    /// Called on a vCPU's own thread, outside `KVM_RUN`, when it leaves a
    /// wait after a `hlt` exit ([`wait_idle`](crate::VcpuDebug::wait_idle)):
    /// drops kicks pending for this thread. Each kick's change is already
    /// visible to the [`before_run`](crate::VcpuDebug::before_run) that
    /// comes before any `KVM_RUN`, and a kick sent later still lands. A
    /// kick that queues while its thread is outside `KVM_RUN` (a real-time
    /// signal) would otherwise pile up while the guest stays halted, one
    /// more per stop, until sending fails. The default does nothing.
    ///
    /// # Errors
    /// If the pending kicks could not be dropped.
    fn drop_pending(&self) -> io::Result<()> {
        Ok(())
    }
}

impl<F: Fn(usize) -> io::Result<()> + Send + Sync> Kick for F {
    fn kick(&self, vcpu: usize) -> io::Result<()> {
        self(vcpu)
    }
}

/// Why setting up a [`SignalKick`] failed.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// The signal number is not a real-time signal.
    #[error("signal {signo} is not a real-time signal (SIGRTMIN..=SIGRTMAX)")]
    NotRealTime {
        /// The number asked for.
        signo: c_int,
    },
    /// Someone else (the VMM) already handles this signal: kvm-glue never
    /// overwrites a handler it does not own.
    #[error("signal {signo} already has a handler; choose another SIGRTMIN offset")]
    InUse {
        /// The signal.
        signo: c_int,
    },
    /// A signal syscall failed.
    #[error("{op} failed: {source}")]
    Sys {
        /// The call.
        op: &'static str,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// `KVM_SET_SIGNAL_MASK` failed.
    #[error("KVM_SET_SIGNAL_MASK failed: {0}")]
    SignalMask(#[source] io::Error),
}

/// `_IOW(KVMIO, 0x8b, struct kvm_signal_mask)`: the header is 4 bytes.
const KVM_SET_SIGNAL_MASK: libc::c_ulong = (1 << 30) | (4 << 16) | (0xAE << 8) | 0x8b;

/// The handler kvm-glue installs: it never runs on a prepared vCPU thread
/// (the signal is blocked there outside `KVM_RUN`, and inside it KVM takes
/// it as "exit now"); it exists so that a stray delivery does not kill the
/// process (a real-time signal's default action).
extern "C" fn ignore(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Per-thread record of a prepared vCPU thread; unregisters itself when the
/// thread exits, so a kick is never sent to a thread that is gone.
struct Registration {
    kick: Weak<Threads>,
    vcpu: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(threads) = self.kick.upgrade() {
            if let Ok(mut map) = threads.lock() {
                map.remove(&self.vcpu);
            }
        }
    }
}

thread_local! {
    static REGISTRATIONS: RefCell<Vec<Registration>> = const { RefCell::new(Vec::new()) };
}

type Threads = Mutex<BTreeMap<usize, libc::pthread_t>>;

/// The built-in kick: a real-time signal, blocked on vCPU threads except
/// inside `KVM_RUN`. See the [module docs](self).
#[derive(Debug)]
pub struct SignalKick {
    signo: c_int,
    threads: Arc<Threads>,
}

impl SignalKick {
    /// A kick with signal `SIGRTMIN() + offset`. Installs a handler that
    /// ignores the signal (a stray one must not end the process).
    ///
    /// # Errors
    /// [`KickError::NotRealTime`] if the signal is past `SIGRTMAX`;
    /// [`KickError::InUse`] if the signal already has a handler that is not
    /// kvm-glue's.
    pub fn new(offset: c_int) -> Result<Arc<SignalKick>, KickError> {
        let signo = signal::SIGRTMIN().saturating_add(offset);
        if offset < 0 || signo > signal::SIGRTMAX() {
            return Err(KickError::NotRealTime { signo });
        }
        // SAFETY: sigaction with a null new action only reads the current
        // disposition into `old`, a zeroed POD struct we own.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: see above; the return value is checked.
        if unsafe { libc::sigaction(signo, std::ptr::null(), &mut old) } != 0 {
            return Err(KickError::Sys {
                op: "sigaction",
                source: io::Error::last_os_error(),
            });
        }
        let ours = ignore as *const () as usize;
        if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != ours {
            return Err(KickError::InUse { signo });
        }
        signal::register_signal_handler(signo, ignore).map_err(|e| KickError::Sys {
            op: "sigaction",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        Ok(Arc::new(SignalKick {
            signo,
            threads: Arc::new(Mutex::new(BTreeMap::new())),
        }))
    }

    /// The signal number.
    pub fn signo(&self) -> c_int {
        self.signo
    }

    /// Call once on vCPU `vcpu`'s own thread, before its first `KVM_RUN`:
    /// blocks the signal in this thread, tells KVM to unblock it only while
    /// `vcpu` runs (`KVM_SET_SIGNAL_MASK`), and records the thread as the one
    /// to kick for `vcpu` until the thread exits.
    ///
    /// # Errors
    /// [`KickError::Sys`] or [`KickError::SignalMask`]; the thread's signal
    /// mask is then as it was.
    pub fn prepare_vcpu_thread(&self, vcpu: usize, fd: &VcpuFd) -> Result<(), KickError> {
        // The thread's mask as it is, as the kernel's 64-bit sigset.
        // SAFETY: a zeroed sigset_t is a valid out-parameter; a null `set`
        // makes pthread_sigmask only report the current mask.
        let mut current: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: see above; the return value is checked.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current) };
        if rc != 0 {
            return Err(KickError::Sys {
                op: "pthread_sigmask",
                source: io::Error::from_raw_os_error(rc),
            });
        }
        let mut kernel_mask = 0u64;
        for sig in 1..=64 {
            // SAFETY: `current` is an initialised sigset_t and 1..=64 are valid signals.
            if sig != self.signo && unsafe { libc::sigismember(&current, sig) } == 1 {
                kernel_mask |= 1 << (sig - 1);
            }
        }
        set_kvm_signal_mask(fd, kernel_mask).map_err(KickError::SignalMask)?;
        signal::block_signal(self.signo).map_err(|e| KickError::Sys {
            op: "pthread_sigmask(SIG_BLOCK)",
            source: io::Error::other(e.to_string()),
        })?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads.lock().map_err(|_| poisoned())?.insert(vcpu, me);
        REGISTRATIONS.with(|r| {
            r.borrow_mut().push(Registration {
                kick: Arc::downgrade(&self.threads),
                vcpu,
            })
        });
        Ok(())
    }

    /// Call on a vCPU thread after `KVM_RUN` returned `EINTR`: consumes the
    /// pending kick so the next `KVM_RUN` does not return at once.
    ///
    /// # Errors
    /// [`KickError::Sys`] if the signal calls fail.
    pub fn drain(&self) -> Result<(), KickError> {
        signal::clear_signal(self.signo).map_err(|e| KickError::Sys {
            op: "sigtimedwait",
            source: io::Error::other(e.to_string()),
        })
    }
}

fn poisoned() -> KickError {
    KickError::Sys {
        op: "lock",
        source: io::Error::other("a thread panicked while holding the kick's thread table"),
    }
}

impl Kick for SignalKick {
    fn kick(&self, vcpu: usize) -> io::Result<()> {
        let threads = self
            .threads
            .lock()
            .map_err(|_| io::Error::other("kick thread table poisoned"))?;
        // A vCPU whose thread is not prepared yet is not in KVM_RUN: it will
        // see the request at its first before_run.
        let Some(&thread) = threads.get(&vcpu) else {
            return Ok(());
        };
        // SAFETY: `thread` is a live thread: registrations are removed (under
        // this lock, which we hold) by a thread-local destructor before the
        // thread exits.
        let rc = unsafe { libc::pthread_kill(thread, self.signo) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }

    /// Consumes the kick signals pending for the calling thread (as
    /// [`drain`](SignalKick::drain)).
    fn drop_pending(&self) -> io::Result<()> {
        self.drain().map_err(io::Error::other)
    }
}

fn set_kvm_signal_mask(fd: &VcpuFd, mask: u64) -> io::Result<()> {
    // struct kvm_signal_mask { __u32 len; __u8 sigset[0]; } followed by the
    // 8-byte kernel sigset.
    #[repr(C)]
    struct SignalMask {
        len: u32,
        sigset: [u8; 8],
    }
    let arg = SignalMask {
        len: 8,
        sigset: mask.to_ne_bytes(),
    };
    // SAFETY: KVM_SET_SIGNAL_MASK reads `len` and then `len` (8) bytes of
    // sigset from `arg`, which is 12 bytes we own and outlives the call; the
    // fd is a vCPU fd; the return value is checked.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_SET_SIGNAL_MASK as _, &arg as *const SignalMask) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_set_signal_mask_number_is_the_kernels() {
        // include/uapi/linux/kvm.h: #define KVM_SET_SIGNAL_MASK _IOW(KVMIO, 0x8b, struct kvm_signal_mask)
        // with KVMIO 0xAE and sizeof(struct kvm_signal_mask) == 4: 0x4004ae8b.
        assert_eq!(KVM_SET_SIGNAL_MASK, 0x4004_ae8b);
        assert_eq!(std::mem::size_of::<kvm_bindings::kvm_signal_mask>(), 4);
    }

    #[test]
    fn a_closure_is_a_kick() {
        let seen = Mutex::new(Vec::new());
        let k = |v: usize| {
            seen.lock().map_err(|_| io::Error::other("poisoned"))?.push(v);
            Ok(())
        };
        k.kick(3).expect("kick");
        assert_eq!(*seen.lock().expect("lock"), [3]);
    }

    /// Whether `signo` is pending for the calling thread.
    fn pending(signo: c_int) -> bool {
        // SAFETY: a zeroed sigset_t is a valid (empty) set; sigpending
        // writes only the one set it is given.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sigpending(&mut set) }, 0, "sigpending");
        // SAFETY: `set` is a valid, initialised set.
        unsafe { libc::sigismember(&set, signo) == 1 }
    }

    /// Kicks sent to a thread outside `KVM_RUN` (the signal blocked, as a
    /// prepared vCPU thread has it there) queue up, one per kick;
    /// `drop_pending` on that thread takes them all, so a vCPU halted for a
    /// long debug session does not pile up one per stop until sending fails.
    #[test]
    fn drop_pending_takes_every_kick_queued_for_the_calling_thread() {
        // An offset of its own: other tests' kicks use other signals.
        let kick = SignalKick::new(5).expect("signal kick");
        std::thread::spawn(move || {
            // SAFETY: the set is zeroed then filled by sigemptyset /
            // sigaddset; pthread_sigmask changes only this thread's mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, kick.signo);
                assert_eq!(libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()), 0);
                for _ in 0..3 {
                    assert_eq!(libc::pthread_kill(libc::pthread_self(), kick.signo), 0);
                }
            }
            assert!(pending(kick.signo), "the kicks are queued while blocked");
            kick.drop_pending().expect("drop pending");
            assert!(!pending(kick.signo), "every queued kick was taken");
        })
        .join()
        .expect("the test thread");
    }
}
