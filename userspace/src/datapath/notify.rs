//! Whether the driver wants to be notified of used entries: the EVENT_IDX and NO_INTERRUPT
//! rules over the ring as guest memory holds it. Signalling is the caller's (`vring`).

use std::sync::atomic::Ordering;

use super::GuestMemory;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Whether the driver of `queue` wants a notification for the used entries published since
/// the used index was `old` (`None`: unknown, e.g. the first decision after a (re)start).
///
/// With EVENT_IDX: when used_event lies in `[old, new)`, as virtio specifies, or always when
/// `old` is unknown (as DPDK's vhost does); without: unless the driver set
/// VRING_AVAIL_F_NO_INTERRUPT (polling drivers such as DPDK's do; virtio-queue's own check
/// ignores the flag, and it only counts `add_used` entries, where this datapath publishes a
/// batch at once). Call after publishing the used index.
pub fn wants_notification(queue: &Queue, mem: &GuestMemory, old: Option<u16>) -> bool {
    if queue.event_idx_enabled() {
        let Some(old) = old else {
            return true;
        };
        let new = queue.next_used();
        // The used index was published before this read (virtio 2.7.7.2).
        std::sync::atomic::fence(Ordering::SeqCst);
        let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
        match mem.load::<u16>(GuestAddress(at), Ordering::Relaxed) {
            Ok(event) => event_idx_wants(old, new, u16::from_le(event)),
            // Unreadable: notifying too often is safe, too rarely is not.
            Err(_) => true,
        }
    } else {
        !declined_interrupts(queue, mem)
    }
}

/// Whether a driver without EVENT_IDX set VRING_AVAIL_F_NO_INTERRUPT.
fn declined_interrupts(queue: &Queue, mem: &GuestMemory) -> bool {
    // The used index was published before this read (virtio 2.7.7.2).
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags = mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire);
    flags.is_ok_and(|f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}

/// EVENT_IDX: whether a driver whose used_event is `event` wants a notification now that the
/// used index moved from `old` to `new` (it does when `event` lies in `[old, new)`, modulo 2^16).
fn event_idx_wants(old: u16, new: u16, event: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_idx_notifies_exactly_when_used_event_was_passed() {
        // Entries 10 and 11 were published (old 10, new 12).
        assert!(event_idx_wants(10, 12, 10));
        assert!(event_idx_wants(10, 12, 11));
        assert!(
            !event_idx_wants(10, 12, 12),
            "the driver waits for a later entry"
        );
        assert!(!event_idx_wants(10, 12, 9), "already notified for that one");
        // Across the 16-bit wrap.
        assert!(event_idx_wants(65535, 1, 65535));
        assert!(event_idx_wants(65535, 1, 0));
        assert!(!event_idx_wants(65535, 1, 1));
        // Nothing published: never.
        assert!(!event_idx_wants(7, 7, 7));
    }
}
