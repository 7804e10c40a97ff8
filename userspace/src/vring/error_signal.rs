//! The error eventfds a frontend gives for its rings (`VHOST_USER_SET_VRING_ERR`).
//!
//! rust-vmm's library keeps the fd it receives private, so the vhost-user shim keeps a
//! duplicate of each ring's here, and the thread that stops a queue for a broken rule
//! signals it: QEMU then logs that the backend stopped the queue. The fds were checked to be
//! eventfds and made non-blocking before they got here; a write that would block means the
//! counter is saturated, so the frontend has been signalled already.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// One connection's error eventfds, by ring index.
#[derive(Default)]
pub struct RingErrorFds {
    fds: Mutex<Vec<Option<File>>>,
}

impl RingErrorFds {
    /// Room for the `rings` rings the device offers.
    pub fn new(rings: usize) -> Arc<Self> {
        Arc::new(RingErrorFds {
            fds: Mutex::new((0..rings).map(|_| None).collect()),
        })
    }

    /// Ring `ring`'s error eventfd from now on (`None`: the frontend took it away). A ring
    /// the device does not have is ignored (the library refuses the message).
    pub fn set(&self, ring: usize, fd: Option<OwnedFd>) {
        if let Some(slot) = crate::sync::lock(&self.fds).get_mut(ring) {
            *slot = fd.map(File::from);
        }
    }

    /// Tells the frontend ring `ring` was stopped, if it gave an error eventfd for it.
    pub fn signal(&self, ring: usize) {
        let fds = crate::sync::lock(&self.fds);
        let Some(Some(mut event)) = fds.get(ring).map(Option::as_ref) else {
            return;
        };
        match event.write(&1u64.to_ne_bytes()) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(ring, error = %e, "cannot signal the ring's error eventfd"),
        }
    }

    /// Ring `ring`'s error signal, for the thread that may stop it.
    pub fn ring(self: &Arc<Self>, ring: usize) -> RingError {
        RingError {
            fds: self.clone(),
            ring,
        }
    }
}

/// One ring's error signal ([`RingErrorFds::signal`] for that ring).
#[derive(Clone, Default)]
pub struct RingError {
    fds: Arc<RingErrorFds>,
    ring: usize,
}

impl RingError {
    pub fn signal(&self) {
        self.fds.signal(self.ring);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A duplicate of `e` as an owned fd, as the shim keeps one.
    fn owned(e: &EventFd) -> OwnedFd {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `into_raw_fd` hands over the fd the fresh duplicate owned.
        unsafe { OwnedFd::from_raw_fd(e.try_clone().unwrap().into_raw_fd()) }
    }

    #[test]
    fn signals_only_the_ring_that_has_an_fd_and_never_blocks() {
        let fds = RingErrorFds::new(2);
        let err = EventFd::new(EFD_NONBLOCK).unwrap();
        fds.set(1, Some(owned(&err)));
        fds.ring(0).signal();
        assert!(err.read().is_err(), "ring 0 signalled ring 1's fd");
        fds.ring(1).signal();
        assert_eq!(err.read().unwrap(), 1);
        // A saturated counter: the write would block; it is skipped.
        err.write(u64::MAX - 1).unwrap();
        fds.ring(1).signal();
        // Rings the device does not have, and a taken-away fd, are ignored.
        fds.set(7, Some(owned(&err)));
        fds.ring(7).signal();
        fds.set(1, None);
        fds.ring(1).signal();
        assert_eq!(err.read().unwrap(), u64::MAX - 1);
    }
}
