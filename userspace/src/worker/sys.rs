//! What a worker needs from the operating system beyond its sockets: a periodic timer and
//! CPU pinning.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Moves the calling thread (the library's epoll thread for one queue pair) to `cpu`.
pub(super) fn pin_current_thread(cpu: usize, pair: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu checked below).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        tracing::warn!(cpu, pair, "CPU number out of range; queue pair not pinned");
        return;
    }
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity on the calling thread (0) with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        tracing::warn!(cpu, pair, error = %io::Error::last_os_error(), "cannot pin queue pair thread");
    } else {
        tracing::info!(cpu, pair, "queue pair thread pinned");
    }
}

/// A periodic timer fd.
pub(super) struct Timer(OwnedFd);

impl Timer {
    pub(super) fn periodic(ms: u64) -> io::Result<Self> {
        // SAFETY: plain timerfd_create(2).
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ts = libc::timespec {
            tv_sec: (ms / 1000) as i64,
            tv_nsec: ((ms % 1000) * 1_000_000) as i64,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: valid fd and itimerspec.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Timer(fd))
    }

    pub(super) fn consume(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer; EAGAIN is fine.
        unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }
}

impl Timer {
    pub(super) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
