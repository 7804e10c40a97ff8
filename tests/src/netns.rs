//! Running code inside a named network namespace (`ip netns add`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::other(format!("bad interface name {name:?}")))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::other(format!(
            "no interface {name} in this namespace"
        ))),
        i => Ok(i),
    }
}

/// Runs `f` on a thread that has joined network namespace `ns`. Sockets created there stay
/// in that namespace and can be used from any thread afterwards.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a namespace fd we hold open.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("thread in namespace panicked"))?
}
