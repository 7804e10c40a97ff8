//! A port's receive queue, as every thread that writes into it reaches it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::datapath::GuestMemory;
use vhost_user_backend::VringT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use super::{notify_guest_since, RingError, Vring, VringState};
use crate::datapath::device::{NegotiatedFeatures, Offloads};
use crate::datapath::rx::{self, Framing, RxScratch, RxTally};
use crate::datapath::QueueError;
use crate::memory_guard;
use crate::stats::QueueStats;

/// What every thread writing into one receive queue (its port's worker, and other ports'
/// workers switching frames into it) shares. Only used under the queue's vring lock.
pub struct RxQueueShared {
    /// The guest broke the ring's rules: the queue is stopped until the device is reset.
    broken: AtomicBool,
    /// The used index when a notification was last decided, or [`NEVER_SIGNALLED`]: with
    /// EVENT_IDX the next decision covers every entry published since (as DPDK's vhost and
    /// Linux's vhost do), so batches published by different threads are not missed.
    signalled: AtomicU32,
    /// Tells the frontend when the guest broke the ring and the queue stopped.
    error: RingError,
}

/// No notification was decided since the ring (re)started: the next one is sent.
const NEVER_SIGNALLED: u32 = u32::MAX;

impl RxQueueShared {
    /// A receive queue that reports its stop through `error`.
    pub fn new(error: RingError) -> Self {
        RxQueueShared {
            broken: AtomicBool::new(false),
            signalled: AtomicU32::new(NEVER_SIGNALLED),
            error,
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Stops the queue as broken: its memory is gone (the frontend shrank it). Only a reset
    /// restarts it.
    pub fn stop(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// The ring stopped (GET_VRING_BASE or a device reset); it restarts from a fresh ring.
    pub fn reset(&self) {
        self.broken.store(false, Ordering::Release);
        self.signalled.store(NEVER_SIGNALLED, Ordering::Release);
    }
}

/// A connected port's receive queue, as other ports' workers reach it to switch frames in.
#[derive(Clone)]
pub struct RxQueue {
    pub vring: Vring,
    pub mem: GuestMemoryAtomic<GuestMemory>,
    /// The features the driver acknowledged (the backend's, updated on SET_FEATURES).
    pub acked: Arc<AtomicU64>,
    pub stats: Arc<QueueStats>,
    /// Shared with the port's own worker.
    pub shared: Arc<RxQueueShared>,
}

impl RxQueue {
    /// Writes `frames` into the queue under its vring lock, as one batch; what the guest has
    /// no buffers for is dropped and counted. `switched`: they come from another port
    /// (counted as such); `notify`: signal the guest now (else the caller does, through
    /// [`RxQueue::notify`], once for several batches). Returns how many were delivered.
    pub fn deliver<'f>(
        &self,
        frames: impl Iterator<Item = &'f [u8]>,
        framing: Framing,
        scratch: &mut RxScratch,
        switched: bool,
        notify: bool,
    ) -> u64 {
        let mem = self.mem.memory();
        let mrg_rxbuf = NegotiatedFeatures::new(self.acked.load(Ordering::Acquire)).mrg_rxbuf;
        let mut queue = RxQueueLock::new(&self.vring, &mem, &self.shared, &self.stats, mrg_rxbuf);
        let mut tally = RxTally::default();
        // A broken ring is logged and counted inside; the queue stays stopped until a reset.
        let _ = queue.deliver_or_drop(frames, framing, scratch, &mut tally);
        queue.record(&tally, switched);
        if tally.frames > 0 && notify {
            queue.notify();
        }
        tally.frames
    }

    /// The offloads the guest takes in frames it receives (GUEST_CSUM, GUEST_TSO*).
    pub fn offloads(&self) -> Offloads {
        NegotiatedFeatures::new(self.acked.load(Ordering::Acquire)).rx_offloads
    }

    /// Notifies the guest of what was delivered since the last decision, if it asked to be.
    pub fn notify(&self) {
        let mem = self.mem.memory();
        let mut state = self.vring.get_mut();
        notify_since_last(&self.shared, &mut state, &mem, &self.stats);
    }
}

/// A receive queue under its vring lock: the one place frames enter a guest's receive
/// queue, whichever thread brings them.
pub struct RxQueueLock<'a> {
    state: <Vring as vhost_user_backend::VringStateMutGuard<'a, GuestMemoryAtomic<GuestMemory>>>::G,
    mem: &'a GuestMemory,
    shared: &'a RxQueueShared,
    stats: &'a QueueStats,
    mrg_rxbuf: bool,
}

impl<'a> RxQueueLock<'a> {
    /// Locks `vring` for one round of deliveries.
    pub fn new(
        vring: &'a Vring,
        mem: &'a GuestMemory,
        shared: &'a RxQueueShared,
        stats: &'a QueueStats,
        mrg_rxbuf: bool,
    ) -> Self {
        RxQueueLock {
            state: vring.get_mut(),
            mem,
            shared,
            stats,
            mrg_rxbuf,
        }
    }

    /// Whether the guest broke the ring's rules (the queue stays stopped until a reset).
    pub fn is_broken(&self) -> bool {
        self.shared.is_broken()
    }

    /// Whether the queue takes frames: the driver set it up and enabled it, and did not
    /// break it.
    pub fn is_running(&self) -> bool {
        let state = &self.state;
        state.get_queue().ready() && state.is_enabled() && !self.is_broken()
    }

    /// Delivers frames from `frames` until they or the guest's buffers run out, adding to
    /// `tally`; returns how many it consumed (delivered, or dropped as too large). A queue
    /// that is not running consumes none. A guest that broke the ring's rules gets its queue
    /// stopped, logged and counted; the error is returned so the caller stops too.
    pub fn deliver(
        &mut self,
        frames: &mut dyn Iterator<Item = &[u8]>,
        framing: Framing,
        scratch: &mut RxScratch,
        tally: &mut RxTally,
    ) -> Result<usize, QueueError> {
        if !self.is_running() {
            return Ok(0);
        }
        let mrg_rxbuf = self.mrg_rxbuf;
        self.with_queue(|mem, queue| {
            rx::deliver_batch(mem, queue, frames, framing, mrg_rxbuf, scratch, tally)
        })
    }

    /// Runs `f` on the queue itself (the single-copy path, where the kernel wrote the frames
    /// into buffers taken from the ring before), with a ring the guest broke treated as in
    /// [`RxQueueLock::deliver`]. The caller checks [`RxQueueLock::is_running`] first.
    pub fn with_queue<R>(
        &mut self,
        f: impl FnOnce(&GuestMemory, &mut Queue) -> Result<R, QueueError>,
    ) -> Result<R, QueueError> {
        let result = f(self.mem, self.state.get_queue_mut());
        if let Err(e) = &result {
            self.shared.broken.store(true, Ordering::Release);
            // A ring read from memory that shrank under the daemon is the frontend's doing,
            // which the port's backend reports once.
            if !memory_guard::lost(self.mem) {
                self.stats.add(&self.stats.queue_errors, 1);
                tracing::error!(dir = "rx", error = %e, "guest broke the virtqueue rules; queue stopped until the device is reset");
            }
            self.shared.error.signal();
        }
        result
    }

    /// Delivers every frame of `frames`: what the queue takes (see [`RxQueueLock::deliver`])
    /// and, for the rest, a counted drop: `rx_dropped_queue_stopped` when the queue is not
    /// running, `rx_dropped_guest_ring_full` when the guest ran out of buffers. A queue the
    /// guest just broke counts the frame that broke it as an error only. Returns how many
    /// were dropped.
    pub fn deliver_or_drop<'f>(
        &mut self,
        frames: impl Iterator<Item = &'f [u8]>,
        framing: Framing,
        scratch: &mut RxScratch,
        tally: &mut RxTally,
    ) -> Result<u64, QueueError> {
        let stats = self.stats;
        if !self.is_running() {
            let lost = frames.count() as u64;
            stats.add(&stats.rx_dropped_queue_stopped, lost);
            return Ok(lost);
        }
        let mut pulled = 0u64;
        let mut frames = frames.inspect(|_| pulled += 1);
        let consumed = self.deliver(&mut frames, framing, scratch, tally)?;
        // The frame that found no buffers was pulled but not consumed; the rest never was.
        let left = frames.count() as u64;
        let lost = pulled - consumed as u64 + left;
        stats.add(&stats.rx_dropped_guest_ring_full, lost);
        Ok(lost)
    }

    /// Adds a round's totals to the queue's counters; `switched`: the frames came from
    /// another port of the daemon.
    pub fn record(&self, tally: &RxTally, switched: bool) {
        let s = self.stats;
        s.add(&s.rx_packets, tally.frames);
        s.add(&s.rx_bytes, tally.bytes);
        s.add(&s.rx_buffers, tally.buffers);
        s.add(&s.rx_dropped_too_large, tally.dropped_too_large);
        if switched {
            s.add(&s.rx_switched, tally.frames);
        }
    }

    /// Notifies the guest of everything published since the last decision (by any thread),
    /// if it asked to be.
    pub fn notify(&mut self) {
        notify_since_last(self.shared, &mut self.state, self.mem, self.stats);
    }

    /// Asks the driver for a kick when it posts buffers (after the ring ran dry); returns
    /// true if it already has, so the caller goes again.
    pub fn want_kicks(&mut self) -> bool {
        matches!(
            self.state.get_queue_mut().enable_notification(self.mem),
            Ok(true)
        )
    }

    /// Tells the driver kicks are not needed (the worker comes back by itself).
    pub fn no_kicks(&mut self) {
        let _ = self.state.get_queue_mut().disable_notification(self.mem);
    }
}

/// The notification decision for everything published since the last one, by any thread.
/// Call under the vring lock.
fn notify_since_last(
    shared: &RxQueueShared,
    state: &mut VringState,
    mem: &GuestMemory,
    stats: &QueueStats,
) {
    let new = state.get_queue().next_used();
    let old = shared.signalled.swap(u32::from(new), Ordering::AcqRel);
    if old == u32::from(new) {
        return;
    }
    // The first decision after a (re)start has no range to check: with EVENT_IDX it
    // notifies, as DPDK's vhost does; without, only NO_INTERRUPT counts anyway.
    notify_guest_since(state, mem, stats, u16::try_from(old).ok());
}
