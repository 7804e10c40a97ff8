//! Another process's socket options, read through a duplicate of its socket (pidfd_getfd,
//! Linux 5.6+, needs ptrace rights over it: root in the test suite).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context, Result};

/// Busy-polling options of one AF_XDP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPollOptions {
    pub prefer_busy_poll: i32,
    pub busy_poll_usecs: i32,
    /// `None` where the kernel cannot report it (getsockopt of SO_BUSY_POLL_BUDGET is newer
    /// than setting it).
    pub budget: Option<i32>,
}

fn pidfd_open(pid: u32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) on a valid pidfd; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_getfd");
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn int_option(fd: &OwnedFd, name: libc::c_int) -> Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a local c_int with its size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(value)
}

/// The busy-polling options of every AF_XDP socket process `pid` holds.
pub fn xdp_socket_busy_poll(pid: u32) -> Result<Vec<BusyPollOptions>> {
    let pidfd = pidfd_open(pid)?;
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        let entry = entry?;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("socket:") {
            continue;
        }
        let Ok(num) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // The fd may close between the listing and here.
        let Ok(fd) = pidfd_getfd(&pidfd, num) else {
            continue;
        };
        if int_option(&fd, libc::SO_DOMAIN)? != libc::AF_XDP {
            continue;
        }
        out.push(BusyPollOptions {
            prefer_busy_poll: int_option(&fd, libc::SO_PREFER_BUSY_POLL)?,
            busy_poll_usecs: int_option(&fd, libc::SO_BUSY_POLL)?,
            budget: match int_option(&fd, libc::SO_BUSY_POLL_BUDGET) {
                Ok(v) => Some(v),
                Err(e)
                    if e.downcast_ref::<std::io::Error>()
                        .and_then(|e| e.raw_os_error())
                        == Some(libc::ENOPROTOOPT) =>
                {
                    None
                }
                Err(e) => return Err(e),
            },
        });
    }
    if out.is_empty() {
        bail!("process {pid} holds no AF_XDP socket");
    }
    Ok(out)
}
