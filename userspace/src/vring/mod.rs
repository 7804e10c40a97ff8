//! A guest's virtqueues as the daemon's threads share them.
//!
//! rust-vmm's library hands each queue pair's worker its vrings behind one lock per vring.
//! A receive queue is written by more than its own worker: other ports' workers switch
//! frames into it. [`RxQueue`] is the one way in for all of them: it takes the vring lock,
//! tells whether the queue runs, delivers a batch through the datapath, stops the queue when
//! the guest broke the ring's rules, counts, and notifies the guest for everything published
//! since the last decision, whoever published it. [`notify_guest_since`] does the same
//! signalling for a transmit queue.

mod error_signal;
mod kick;
mod notify;
mod rx_queue;

use crate::datapath::GuestMemory;
use vm_memory::GuestMemoryAtomic;

pub use error_signal::{RingError, RingErrorFds};
pub use notify::notify_guest_since;
pub use rx_queue::{RxQueue, RxQueueLock, RxQueueShared};

pub use kick::KickTolerantVring;

/// One virtqueue as rust-vmm's vhost-user library shares it with the backend (its
/// `VringRwLock`, whose kick read survives an event for a replaced kick eventfd: see
/// [`KickTolerantVring`]).
pub type Vring = KickTolerantVring<GuestMemoryAtomic<GuestMemory>>;

/// The vring's state, locked.
pub type VringState = vhost_user_backend::VringState<GuestMemoryAtomic<GuestMemory>>;
