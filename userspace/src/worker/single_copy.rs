//! The single-copy path of a port whose guest's memory is its NIC queue's UMEM
//! (`guest-umem=on`): the guest's receive buffers go on the socket's fill ring ahead of
//! traffic and come back as used entries once the kernel wrote a frame into them; broadcast
//! and multicast from the packet tap are copied into the few chains held back from the
//! kernel for them; when the guest is late in posting buffers the kernel fills spare frames
//! of the daemon's, copied into the guest's next chains in arrival order. What the guest
//! sends goes out through `switch::DedicatedNicTx`: from its own buffers or copied once into
//! the daemon's area of the same UMEM, as the port's `guest-umem-tx` decides.

use std::os::fd::RawFd;

use vhost_user_backend::VringT;

use crate::datapath::rx::{Framing, RxTally};
use crate::datapath::zero_copy_rx::{PostedBuffers, SpareCopy, ZeroCopyRxTally};
use crate::datapath::GuestMemory;
use crate::datapath::QueueError;
use crate::nic::xsk::guest_umem::GuestRxSocket;
use crate::nic::xsk::{XskKernelStats, XskMode};
use crate::stats::QueueStats;
use crate::vring::{RxQueueLock, Vring};

use super::{QueuePairWorker, BATCH, BUDGET_BATCHES};

/// Receive chains left on the ring rather than given to the kernel: what the packet tap's
/// broadcast and multicast (ARP, neighbour discovery, DHCP) are copied into.
pub const HELD_BACK_CHAINS: u16 = 8;

/// The guest-memory socket of a queue pair and the guest buffers the kernel holds.
pub struct GuestPath {
    socket: GuestRxSocket,
    posted: PostedBuffers,
    /// Scratch of one round: fill addresses to post, descriptors received.
    fill: Vec<u64>,
    received: Vec<(u64, u64, u32)>,
}

impl GuestPath {
    pub fn new(socket: GuestRxSocket, posted: PostedBuffers) -> Self {
        GuestPath {
            socket,
            posted: posted.holding_back(HELD_BACK_CHAINS),
            fill: Vec::new(),
            received: Vec::new(),
        }
    }

    /// The socket, for the steering map and the worker's epoll set.
    pub fn fd(&self) -> RawFd {
        self.socket.fd()
    }

    pub fn queue_id(&self) -> u32 {
        self.socket.queue_id()
    }

    /// Zero-copy (the NIC DMAs into the guest's buffers) or copy mode (the kernel copies).
    pub fn socket_mode(&self) -> XskMode {
        self.socket.mode()
    }

    pub fn socket_mut(&mut self) -> &mut GuestRxSocket {
        &mut self.socket
    }

    pub fn kernel_stats(&self) -> XskKernelStats {
        self.socket.kernel_stats()
    }

    /// Takes what the kernel received without giving it to the guest, and puts the same
    /// buffers back on the fill ring (they are still the daemon's to post); returns how many
    /// frames were dropped.
    pub(super) fn drop_received(&mut self) -> usize {
        self.received.clear();
        self.socket.receive(u32::MAX, &mut self.received);
        self.fill.clear();
        self.fill
            .extend(self.received.iter().map(|&(fill, _, _)| fill));
        self.socket.fill(&self.fill);
        self.received.len()
    }

    /// Hands the guest what the kernel received since the last call (net headers and used
    /// entries, spare frames copied in, in the order they came), then takes the chains the
    /// guest made available (for frames waiting for them first, then for the fill ring),
    /// with spares when it has too few, and puts them on the fill ring.
    fn exchange(
        &mut self,
        queue: &mut RxQueueLock<'_>,
        mrg_rxbuf: bool,
        zt: &mut ZeroCopyRxTally,
    ) -> Result<(), QueueError> {
        let GuestPath {
            socket,
            posted,
            fill,
            received,
        } = self;
        let spares = SpareCopy {
            memory: socket.umem(),
            mrg_rxbuf,
        };
        // Whatever `post` recorded as posted goes on the ring, also if it then failed.
        fill.clear();
        let done = queue.with_queue(|mem, q| {
            posted.complete(mem, q, received.drain(..), spares, zt)?;
            posted.post(mem, q, usize::MAX, fill, spares, zt)
        });
        // The fill ring has an entry for every guest buffer and spare that may be posted, and
        // every posted one not on it is the kernel's: what `post` takes always fits.
        if socket.fill(fill) < fill.len() {
            // The buffers left off go back to the guest when the path stops.
            tracing::warn!(
                queue = socket.queue_id(),
                "fill ring full: receive buffers left off it"
            );
        }
        done
    }

    /// Whether the guest need not kick for the buffers it posts: the kernel holds a batch of
    /// its buffers and no frame waits for a chain, so the frames coming in bring the worker
    /// back.
    fn kicks_unneeded(&self) -> bool {
        self.posted.pending() == 0 && self.posted.len() >= BATCH.min(self.posted.capacity())
    }

    /// Closes the socket and its registration, then gives every buffer the kernel held back
    /// to the guest unused: once the socket is gone the kernel writes none of them, and the
    /// ring's base the frontend reads has moved past them already. Returns how many went
    /// back.
    pub fn stop(self, mem: &GuestMemory, rx: Option<&Vring>) -> usize {
        let GuestPath {
            socket, mut posted, ..
        } = self;
        drop(socket);
        match rx {
            Some(vring) => {
                let mut state = vring.get_mut();
                posted
                    .give_back(mem, state.get_queue_mut())
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot give the guest back the receive buffers the kernel held");
                        0
                    })
            }
            // The ring never ran: nothing was posted.
            None => posted.forget().len(),
        }
    }
}

impl QueuePairWorker {
    /// NIC -> guest on the single-copy path: hands the guest what the kernel wrote into its
    /// buffers (and copies what landed in spare frames), posts the buffers it made available
    /// since, and copies the tap's frames into the chains held back. Returns true if work was
    /// left for another round.
    pub(super) fn service_guest_rx(
        &mut self,
        (vring, mem): (&Vring, &GuestMemory),
        mrg_rxbuf: bool,
        read_tap: bool,
    ) -> bool {
        let Some(path) = self.guest.as_mut() else {
            return false;
        };
        let mut queue = RxQueueLock::new(vring, mem, &self.rx_shared, &self.stats, mrg_rxbuf);
        if !queue.is_running() {
            drop(queue);
            let mut lost = path.drop_received();
            if let Some(tap) = &mut self.tap {
                lost += tap.recv_batch().count();
            }
            self.stats
                .add(&self.stats.rx_dropped_queue_stopped, lost as u64);
            return false;
        }
        let budget = (BATCH * BUDGET_BATCHES) as u32;
        path.received.clear();
        path.socket.receive(budget, &mut path.received);
        self.nic_frames += path.received.len() as u64;
        let mut more = path.received.len() as u32 >= budget;
        let mut zt = ZeroCopyRxTally::default();
        let done = path.exchange(&mut queue, mrg_rxbuf, &mut zt);
        let mut tally = RxTally::default();
        if done.is_ok() && read_tap {
            if let Some(tap) = &mut self.tap {
                let _ = queue.deliver_or_drop(
                    tap.recv_batch(),
                    Framing::Bare,
                    &mut self.rx_scratch,
                    &mut tally,
                );
                self.stats.add(&self.stats.rx_multicast, tally.frames);
            }
        }
        self.progress += account_guest_rx(&mut queue, &self.stats, self.pair, &zt, tally);
        // Kicks bring the buffers the guest posts to the fill ring once the kernel is short
        // of them, or to the frames waiting for them; until then the frames coming in bring
        // the worker back, and a kick per buffer the guest posts would cost both sides a
        // wake-up.
        let Some(path) = self.guest.as_mut() else {
            return more;
        };
        if path.kicks_unneeded() {
            queue.no_kicks();
            return more;
        }
        if queue.want_kicks() {
            // Buffers came between the post above and asking for kicks: the guest saw no
            // request and will not kick for them, so they are taken now. (The held-back
            // chains alone also make the answer yes; they are not a reason to go again.)
            let mut zt = ZeroCopyRxTally::default();
            let _ = path.exchange(&mut queue, mrg_rxbuf, &mut zt);
            more |= zt.posted > 0 || zt.frames > 0;
            self.progress +=
                account_guest_rx(&mut queue, &self.stats, self.pair, &zt, RxTally::default());
        }
        more
    }
}

/// Adds a round's counts to the port's counters (`tally`: what the tap's frames added) and
/// notifies the guest of what it got; returns the round's progress (frames and buffers
/// handed back).
fn account_guest_rx(
    queue: &mut RxQueueLock<'_>,
    stats: &QueueStats,
    pair: usize,
    zt: &ZeroCopyRxTally,
    mut tally: RxTally,
) -> u64 {
    tally.frames += zt.frames;
    tally.bytes += zt.bytes;
    tally.buffers += zt.buffers;
    tally.dropped_too_large += zt.dropped_too_large;
    queue.record(&tally, false);
    let refused = zt.refused();
    stats.add(&stats.rx_buffers_refused, refused);
    stats.add(&stats.rx_spare_frames, zt.spare_frames);
    if zt.unknown_completions > 0 {
        tracing::debug!(
            pair,
            descriptors = zt.unknown_completions,
            "receive descriptors naming no posted buffer ignored"
        );
    }
    if zt.bad_completions > 0 {
        tracing::debug!(
            pair,
            descriptors = zt.bad_completions,
            "receive descriptors with a frame outside the layout: buffers taken back unused"
        );
    }
    if tally.frames > 0 || refused > 0 {
        queue.notify();
    }
    tally.frames + refused
}
