//! A pseudo-terminal for GDB's serial-line transport: the VMM serves GDB on
//! the master side, GDB opens the slave (`target remote /dev/pts/N`), as it
//! would a VM's serial port that QEMU's `-serial pty` exposes.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Both sides of a pty in raw mode.
pub struct Pty {
    /// What `serve_stream` reads and writes.
    pub master: File,
    /// The slave, held open by the VMM for as long as it serves: a master
    /// whose slave nobody has open reads `EIO` (hangs up) until the next
    /// open, so a debugger that quits would end serving.
    _slave: File,
    /// The slave's path, for `target remote`.
    pub path: PathBuf,
}

impl Pty {
    /// Waits, up to `timeout`, until the debugger has closed its side,
    /// dropping whatever it still sends (its ack of the last packet). A
    /// VMM that exits right after its last packet closes the master under
    /// the debugger, and Linux drops what the slave had not read yet: GDB
    /// would see a hang-up instead of the guest's exit.
    pub fn linger(self, timeout: std::time::Duration) {
        let Pty { master, _slave, .. } = self;
        drop(_slave);
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 64];
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid, initialised pollfd, count 1.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n <= 0 || pfd.revents & libc::POLLHUP != 0 {
                return; // timed out, failed, or the slave is closed
            }
            if std::io::Read::read(&mut &master, &mut buf).is_err() {
                return;
            }
        }
    }
}

fn check(what: &str, rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Opens a new pty and puts its slave side in raw mode (no echo, no line
/// editing, 8-bit bytes): GDB's packets pass through it unchanged.
pub fn open() -> io::Result<Pty> {
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    check("posix_openpt", fd)?;
    // SAFETY: `fd` was just returned by posix_openpt, is open and owned by no one else.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: grantpt and unlockpt take an open pty master descriptor; `master` is one.
    check("grantpt", unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    check("unlockpt", unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is a writable buffer of the length passed; ptsname_r
    // NUL-terminates what it writes or fails with ERANGE.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = PathBuf::from(unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned());
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)?;
    // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `slave` is an open tty and `t` a valid termios to fill.
    check("tcgetattr", unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) })?;
    // SAFETY: `t` is the initialised termios tcgetattr filled.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `slave` is an open tty and `t` an initialised termios.
    check("tcsetattr", unsafe {
        libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t)
    })?;
    Ok(Pty {
        master,
        _slave: slave,
        path,
    })
}
