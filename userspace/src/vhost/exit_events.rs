//! The exit events rust-vmm's library asks the backend for, one per epoll thread.
//!
//! vhost-user-backend 0.24 puts the consumer end of each exit event into the thread's epoll
//! set with `into_raw_fd` and never closes it: every connection would leave one eventfd per
//! queue pair open, and a frontend reconnecting in a loop would run the whole daemon out of
//! fds. [`ExitEvents`] remembers those fds and closes them when the connection's backend is
//! dropped, which is after every epoll thread has been joined and its epoll fd closed (each
//! epoll handler holds a clone of the backend).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The consumer fds handed to the library, closed on drop.
#[derive(Default)]
pub struct ExitEvents {
    abandoned: Mutex<Vec<RawFd>>,
}

impl ExitEvents {
    /// A fresh exit event for one epoll thread; the library takes the consumer's fd over
    /// without ever closing it, so its number is kept here.
    pub fn create(&self) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot create an exit event"))
                .ok()?;
        crate::sync::lock(&self.abandoned).push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        for fd in crate::sync::lock(&self.abandoned).drain(..) {
            // SAFETY: `fd` is the consumer end the library turned into a bare number and
            // never closes; the epoll set that held it is gone with the library's handlers,
            // which kept this value alive through their backend clones. Nothing else owns it,
            // so it is closed exactly once, here.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}
