//! The exit events rust-vmm's library asks the backend for, one per epoll thread.
//!
//! They are made with the connection's workers, before the library asks: its
//! `exit_event` cannot report a failure, and an epoll thread without an exit event could
//! never be stopped (the port would hang joining it).
//!
//! vhost-user-backend 0.24 puts the consumer end of each exit event into the thread's epoll
//! set with `into_raw_fd` and never closes it: every connection would leave one eventfd per
//! queue pair open, and a frontend reconnecting in a loop would run the whole daemon out of
//! fds. [`ExitEvents`] remembers those fds and closes them when the connection's backend is
//! dropped, which is after every epoll thread has been joined and its epoll fd closed (each
//! epoll handler holds a clone of the backend).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type ExitEvent = (EventConsumer, EventNotifier);

/// One connection's exit events: handed out once each, their consumer fds closed on drop.
pub struct ExitEvents {
    /// Not yet handed to the library, by epoll thread.
    ready: Mutex<Vec<Option<ExitEvent>>>,
    /// Consumer fds the library took over and will not close.
    abandoned: Mutex<Vec<RawFd>>,
}

fn new_exit_event() -> io::Result<ExitEvent> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
}

impl ExitEvents {
    /// An exit event for each of `threads` epoll threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        let ready = (0..threads)
            .map(|_| new_exit_event().map(Some))
            .collect::<io::Result<_>>()?;
        Ok(ExitEvents {
            ready: Mutex::new(ready),
            abandoned: Mutex::new(Vec::new()),
        })
    }

    /// Thread `thread`'s exit event, for the library, which takes the consumer's fd over
    /// without ever closing it; its number is kept here. Asked again for the same thread (the
    /// library does not), a fresh one is made if it can be.
    pub fn take(&self, thread: usize) -> Option<ExitEvent> {
        let prepared = crate::sync::lock(&self.ready)
            .get_mut(thread)
            .and_then(Option::take);
        let (consumer, notifier) = match prepared {
            Some(event) => event,
            None => new_exit_event()
                .inspect_err(|e| tracing::warn!(thread, error = %e, "cannot create an exit event"))
                .ok()?,
        };
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
