//! The vring type the daemon hands rust-vmm's library: its `VringRwLock`, with a kick read
//! that survives a kick event which finds the kick eventfd empty.
//!
//! The library's epoll thread (a queue pair's worker) takes a batch of events from
//! `epoll_wait`, then, for a queue's event, reads that queue's *current* kick eventfd, and
//! ends the thread on any error of that read. Between the two, the request thread may give
//! the queue another kick eventfd: a device reset (`GET_VRING_BASE`, then `SET_VRING_KICK`
//! with the driver's new eventfd) while the worker is busy or preempted, or a frontend that
//! replaces the eventfd of a running ring (the old one stays in the epoll set while the
//! frontend keeps it open, and reports the queue whenever it is written). The new eventfd is
//! empty and non-blocking (`frontend_checks` makes every kick eventfd so), its read fails
//! with `EAGAIN`, and the library's thread ends without a log line: the queue pair moves no
//! frame again until the frontend reconnects. Here that read finds no kick, and the event is
//! handled as the spurious wakeup it is.

use std::fs::File;
use std::io;

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;
use vm_memory::GuestAddressSpace;

/// rust-vmm's `VringRwLock` with a kick read that treats an empty eventfd as no kick.
#[derive(Clone)]
pub struct KickTolerantVring<M: GuestAddressSpace>(VringRwLock<M>);

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for KickTolerantVring<M> {
    type G = <VringRwLock<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for KickTolerantVring<M> {
    type G = <VringRwLock<M> as VringStateMutGuard<'a, M>>::G;
}

/// Reads one kick from `state`'s kick eventfd, if it has one; an empty eventfd (`EAGAIN`:
/// the event was for an eventfd the queue no longer has) is no kick. Returns whether the
/// queue is enabled, as the library's read does.
fn read_kick_of<M: GuestAddressSpace>(state: &VringState<M>) -> io::Result<bool> {
    if let Some(kick) = state.get_kick() {
        match kick.consume() {
            Ok(()) => {}
            // Trace level: a frontend that keeps writing an eventfd it replaced gets here as
            // often as a kick flood would get a kick.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::trace!(
                    "queue event with an empty kick eventfd (replaced since the event): no kick"
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(state.is_enabled())
}

impl<M: 'static + GuestAddressSpace> VringT<M> for KickTolerantVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, QueueError> {
        VringRwLock::new(mem, max_queue_size).map(KickTolerantVring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.0.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.0.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.0.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.0.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        read_kick_of(&self.0.get_ref())
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::GuestMemory;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vm_memory::GuestMemoryAtomic;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    type TestVring = KickTolerantVring<GuestMemoryAtomic<GuestMemory>>;

    /// The library's view of a kick eventfd: a `File` over a duplicate of `kick`.
    fn as_file(kick: &EventFd) -> File {
        let fd = kick.try_clone().expect("dup eventfd").into_raw_fd();
        // SAFETY: `fd` is a fresh duplicate that nothing else owns.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn a_queue_event_whose_kick_eventfd_was_replaced_reads_no_kick_instead_of_failing() {
        let vring = TestVring::new(GuestMemoryAtomic::new(GuestMemory::new()), 256).unwrap();
        let old = EventFd::new(EFD_NONBLOCK).unwrap();
        vring.set_kick(Some(as_file(&old)));
        vring.set_enabled(true);
        old.write(1).unwrap();
        assert!(vring.read_kick().unwrap(), "a kick on an enabled queue");
        // The driver's new eventfd (a reset, or a frontend replacing it): the event that
        // came from the old one finds it empty.
        let new = EventFd::new(EFD_NONBLOCK).unwrap();
        vring.set_kick(Some(as_file(&new)));
        assert!(
            vring
                .read_kick()
                .expect("an empty kick eventfd must not fail the read"),
            "the queue is still enabled"
        );
        vring.set_enabled(false);
        assert!(!vring.read_kick().unwrap());
        // A kick that does come is consumed as before: the next read finds none again.
        new.write(1).unwrap();
        vring.set_enabled(true);
        assert!(vring.read_kick().unwrap());
        assert!(new.read().is_err(), "the kick was consumed");
    }
}
