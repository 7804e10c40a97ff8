//! NIC -> guest: one queue pair's receive rounds, from its AF_XDP sockets and the multicast
//! tap into the guest's receive queue.

use crate::datapath::GuestMemory;

use super::{QueuePairWorker, BATCH, BUDGET_BATCHES};
use crate::datapath::device::NegotiatedFeatures;
use crate::datapath::offload::{is_tcp, CoalesceTally};
use crate::datapath::rx::{Framing, RxTally};
use crate::nic::xsk::XskSocket;
use crate::vring::{RxQueueLock, Vring};

impl QueuePairWorker {
    /// NIC -> guest. Returns true if work was left for another round.
    pub(super) fn service_rx(
        &mut self,
        vring: &Vring,
        mem: &GuestMemory,
        features: NegotiatedFeatures,
        read_tap: bool,
    ) -> bool {
        if self.guest.is_some() {
            return self.service_guest_rx((vring, mem), features.mrg_rxbuf, read_tap);
        }
        let mut queue =
            RxQueueLock::new(vring, mem, &self.rx_shared, &self.stats, features.mrg_rxbuf);
        let broken = queue.is_broken();
        if !queue.is_running() {
            drop(queue);
            if self.pair != 0 && !broken {
                // The guest disabled this pair (fewer combined channels); its NIC queues
                // still carry the port's traffic, which goes to the first pair instead.
                return self.forward_to_first_pair();
            } else {
                // Nobody to deliver to: keep the NIC's rings moving and count the loss.
                let mut lost = drop_waiting_rx(&mut self.sockets);
                if let Some(tap) = &mut self.tap {
                    lost += tap.recv_batch().count();
                }
                self.stats
                    .add(&self.stats.rx_dropped_queue_stopped, lost as u64);
            }
            return false;
        }

        let mut tally = RxTally::default();
        let mut coalesced = CoalesceTally::default();
        // A guest that takes partial checksums gets verified ones marked, and with TSO,
        // runs of one TCP flow merged (software GRO); any other gets the frames as they are.
        let takes = features.rx_offloads;
        let mut guest_full = false;
        let mut more = false;
        let mut failed = false;
        let n = self.sockets.len();
        'sockets: for k in 0..n {
            let i = (self.next_rx_socket + k) % n;
            let sock = &mut self.sockets[i];
            if self.busy_poll || (self.rx_window.is_open() && self.busy_pollable[i]) {
                sock.busy_poll_rx();
            }
            for batch in 0..BUDGET_BATCHES {
                self.nic_frames += sock.poll_rx(BATCH as u32) as u64;
                if sock.rx_pending() == 0 {
                    break;
                }
                let want = sock.rx_pending().min(BATCH);
                let (scratch, coalescer) = (&mut self.rx_scratch, &mut self.coalescer);
                let got = sock.drain_rx(BATCH, |frames| {
                    if !takes.csum {
                        return queue.deliver(frames, Framing::Bare, scratch, &mut tally);
                    }
                    // A batch with no TCP in it (small UDP, ARP...) has nothing to verify or
                    // merge: it goes as it came, without a copy through the coalescer.
                    let mut batch: [&[u8]; BATCH] = [&[]; BATCH];
                    let mut n = 0;
                    for frame in frames.take(BATCH) {
                        batch[n] = frame;
                        n += 1;
                    }
                    let batch = &batch[..n];
                    if !batch.iter().any(|f| is_tcp(f)) {
                        let mut frames = batch.iter().copied();
                        return queue.deliver(&mut frames, Framing::Bare, scratch, &mut tally);
                    }
                    coalescer.clear();
                    for frame in batch {
                        coalescer.push(frame, takes, &mut coalesced);
                    }
                    coalescer.finish();
                    let out = queue.deliver(
                        &mut coalescer.frames(),
                        Framing::WithHeader,
                        scratch,
                        &mut tally,
                    )?;
                    Ok(coalescer.inputs_in(out))
                });
                match got {
                    Ok(done) if done < want => {
                        guest_full = true;
                        break 'sockets;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        failed = true;
                        break 'sockets;
                    }
                }
                if batch + 1 == BUDGET_BATCHES {
                    more = true;
                }
            }
        }
        self.next_rx_socket = (self.next_rx_socket + 1) % n.max(1);
        if guest_full {
            // The guest has no buffers: drop what waits rather than hold it, so the NIC's
            // ring keeps moving and the guest later sees fresh traffic, not a stale backlog.
            let lost = drop_waiting_rx(&mut self.sockets);
            self.stats
                .add(&self.stats.rx_dropped_guest_ring_full, lost as u64);
        }

        if read_tap && !failed {
            if let Some(tap) = &mut self.tap {
                let frames = tap.recv_batch();
                if guest_full {
                    self.stats.add(
                        &self.stats.rx_dropped_guest_ring_full,
                        frames.count() as u64,
                    );
                } else {
                    let before = tally.frames;
                    let scratch = &mut self.rx_scratch;
                    if let Ok(lost) =
                        queue.deliver_or_drop(frames, Framing::Bare, scratch, &mut tally)
                    {
                        guest_full = lost > 0;
                    }
                    self.stats
                        .add(&self.stats.rx_multicast, tally.frames - before);
                }
            }
        }

        self.progress += tally.frames + tally.dropped_too_large;
        queue.record(&tally, false);
        self.stats.add(&self.stats.rx_coalesced, coalesced.merged);
        self.stats
            .add(&self.stats.rx_csum_verified, coalesced.verified);
        if tally.frames > 0 {
            queue.notify();
        }
        if guest_full {
            // Ask for a kick when the guest posts buffers; if it already has, go again.
            more |= queue.want_kicks();
        } else {
            queue.no_kicks();
        }
        more
    }

    /// Hands the frames waiting on this pair's sockets to the port's first receive queue,
    /// up to a budget per socket, as a running pair's round does: traffic that keeps coming
    /// must not keep the thread here. Returns true if frames may be left for another round.
    fn forward_to_first_pair(&mut self) -> bool {
        let own = self.own.clone();
        let mut more = false;
        for sock in &mut self.sockets {
            more |= budgeted(BUDGET_BATCHES, || {
                sock.poll_rx(BATCH as u32);
                if sock.rx_pending() == 0 {
                    return Batch::Empty;
                }
                let scratch = &mut self.rx_scratch;
                let taken = sock.drain_rx(BATCH, |frames| {
                    own.deliver_from_nic(frames, scratch).ok_or(())
                });
                if taken.is_err() {
                    // No frontend: drop as a stopped queue would.
                    let lost = sock.discard_rx_backlog();
                    self.stats
                        .add(&self.stats.rx_dropped_queue_stopped, lost as u64);
                    return Batch::Stop;
                }
                Batch::Moved
            });
        }
        more
    }
}

/// What one batch of a budgeted loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// Frames moved; there may be more.
    Moved,
    /// Nothing was waiting.
    Empty,
    /// Nothing more can be done this round.
    Stop,
}

/// Runs `batch` until it finds nothing or stops, at most `budget` times. Returns true if
/// the budget ran out, so the caller comes back for the rest after the thread's other events.
fn budgeted(budget: usize, mut batch: impl FnMut() -> Batch) -> bool {
    for _ in 0..budget {
        if batch() != Batch::Moved {
            return false;
        }
    }
    true
}

/// Takes every frame waiting on the sockets' rx rings and returns it to the fill rings.
/// Returns how many were dropped.
pub(super) fn drop_waiting_rx(sockets: &mut [XskSocket]) -> usize {
    sockets
        .iter_mut()
        .map(|s| {
            s.poll_rx(u32::MAX);
            s.discard_rx_backlog()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that never runs dry (a NIC queue under constant traffic) gets one budget per
    /// call, and the caller is told to come back.
    #[test]
    fn an_endless_source_is_served_one_budget_per_round() {
        let mut calls = 0;
        assert!(budgeted(BUDGET_BATCHES, || {
            calls += 1;
            Batch::Moved
        }));
        assert_eq!(calls, BUDGET_BATCHES);
    }

    #[test]
    fn a_source_that_runs_dry_or_stops_ends_the_round() {
        let mut left = 3;
        let mut calls = 0;
        let more = budgeted(BUDGET_BATCHES, || {
            calls += 1;
            if left == 0 {
                return Batch::Empty;
            }
            left -= 1;
            Batch::Moved
        });
        assert!(!more);
        assert_eq!(calls, 4);
        let mut calls = 0;
        assert!(!budgeted(BUDGET_BATCHES, || {
            calls += 1;
            Batch::Stop
        }));
        assert_eq!(calls, 1);
    }
}
