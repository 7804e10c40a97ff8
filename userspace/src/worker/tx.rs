//! Guest -> NIC (and -> other ports): one queue pair's transmit rounds.

use std::time::Instant;

use crate::datapath::GuestMemory;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::{QueuePairWorker, BATCH, BUDGET_BATCHES};
use crate::datapath::device::Offloads;
use crate::datapath::offload::FinishTally;
use crate::datapath::tx::{self, TxLimits, TxScratch, TxStop, TxTally};
use crate::datapath::zero_copy_tx;
use crate::datapath::QueueError;
use crate::memory_guard;
use crate::nic::kernel_gso::KernelGsoSocket;
use crate::switch::{self, DedicatedNicTx, MacMap, OwnFrameDrop, PortTx, SwitchPort};
use crate::vring::{notify_guest_since, Vring};
use std::sync::Arc;
use virtio_queue::Queue;

impl QueuePairWorker {
    /// Sends a broadcast `frame` for the guest, outside its ring (the announcement its
    /// frontend asked for): to the wire and to the other ports, under the port's policy.
    pub fn send_broadcast(&mut self, frame: &[u8]) -> Result<(), OwnFrameDrop> {
        let ports = self.switch.snapshot();
        if let Some(rate) = &self.policy.rate {
            rate.refill(Instant::now());
        }
        let Some(sock) = &mut self.tx else {
            return match &mut self.guest {
                Some(path) => {
                    DedicatedNicTx::new(path.socket_mut(), &mut self.policy).send_broadcast(frame)
                }
                None => Err(OwnFrameDrop::NoBuffer),
            };
        };
        let policy = &mut self.policy;
        let (local, scratch) = (&mut self.local, &mut self.switch_scratch);
        sock.reap_completions();
        let sent = PortTx::new(sock, policy, &ports, local, scratch).send_broadcast(frame);
        switch::deliver_local(
            &mut self.local,
            sock,
            &mut self.rx_scratch,
            &mut self.to_notify,
        );
        sock.flush_tx();
        switch::notify_ports(&mut self.to_notify);
        sent
    }

    /// Guest -> NIC. Returns true if work was left for another round.
    pub(super) fn service_tx(
        &mut self,
        vring: &Vring,
        mem: &GuestMemory,
        offloads: Offloads,
    ) -> bool {
        if let Some(sock) = &mut self.tx {
            sock.reap_completions();
        }
        // A dedicated NIC's pair has nothing to send with until its guest's memory decided
        // the path: the guest's frames wait on its ring.
        if self.tx_broken || !self.has_nic_path() {
            return false;
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        // The guest is notified (or not) for everything this round puts in the used ring.
        let used_before = state.get_queue().next_used();
        // Chains whose frames went from guest memory come back as the kernel completes
        // them, every round, whether or not the guest sent more.
        let mut result = self.return_sent_chains(mem, state.get_queue_mut());
        let mut tally = TxTally::default();
        let mut switched = 0;
        let mut finished = FinishTally::default();
        let limits = TxLimits {
            max_frame: self.max_frame,
            offloads,
        };
        let mut more = false;
        let ports = self.switch.snapshot();
        'outer: for round in 0.. {
            if result.is_err() {
                break;
            }
            let _ = state.get_queue_mut().disable_notification(mem);
            let mut stop = TxStop::Budget;
            for _ in 0..BUDGET_BATCHES {
                if let Some(rate) = &self.policy.rate {
                    rate.refill(Instant::now());
                }
                let batch = self.tx_batch(mem, state.get_queue_mut(), limits, &ports, &mut tally);
                stop = match batch {
                    Ok((s, batch_switched, f)) => {
                        switched += batch_switched;
                        finished.passed += f.passed;
                        finished.csum_computed += f.csum_computed;
                        finished.segments += f.segments;
                        s
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                };
                if stop != TxStop::Budget {
                    break;
                }
            }
            match stop {
                // The queue's shared tx pool is empty: other ports' completions do not wake
                // this socket, so come back after the library's other events.
                TxStop::NoBuffers => {
                    more = true;
                    break;
                }
                TxStop::Budget => {
                    more = true;
                    break;
                }
                TxStop::RingEmpty => {
                    // Re-enable kicks; if the guest added chains meanwhile, go again once.
                    match state.get_queue_mut().enable_notification(mem) {
                        Ok(true) if round == 0 => continue,
                        Ok(true) => {
                            more = true;
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
        self.progress += tally.frames
            + tally.dropped_oversized
            + tally.dropped_runt
            + tally.dropped_offload
            + tally.dropped_spoofed
            + tally.dropped_rate_limited
            + tally.dropped_vlan
            + tally.dropped_gso_kernel;
        let s = &self.stats;
        s.add(&s.tx_packets, tally.frames);
        s.add(&s.tx_bytes, tally.bytes);
        s.add(&s.tx_dropped_oversized, tally.dropped_oversized);
        s.add(&s.tx_dropped_runt, tally.dropped_runt);
        s.add(&s.tx_dropped_offload, tally.dropped_offload);
        s.add(&s.tx_dropped_spoofed, tally.dropped_spoofed);
        s.add(&s.tx_dropped_rate_limited, tally.dropped_rate_limited);
        s.add(&s.tx_dropped_vlan, tally.dropped_vlan);
        s.add(&s.tx_dropped_gso_kernel, tally.dropped_gso_kernel);
        s.add(&s.tx_gso_kernel, tally.gso_kernel);
        s.add(&s.tx_switched, switched);
        s.add(&s.tx_gso_frames, tally.gso_frames);
        s.add(&s.tx_segments, tally.segments + finished.segments);
        s.add(
            &s.tx_csum_computed,
            tally.csum_computed + finished.csum_computed,
        );
        s.add(&s.tx_csum_offloaded, tally.csum_offloaded);
        s.add(&s.tx_offload_passed, finished.passed);
        s.add(&s.tx_in_place, tally.in_place);
        self.tx_in_place_progress += tally.in_place;
        if state.get_queue().next_used() != used_before {
            notify_guest_since(&mut state, mem, &self.stats, Some(used_before));
        }
        drop(state);
        switch::notify_ports(&mut self.to_notify);
        if let Err(e) = result {
            self.tx_broken = true;
            // A ring read from memory that shrank under the daemon is the frontend's doing,
            // which the backend reports once for the port.
            if !memory_guard::lost(mem) {
                self.queue_failed("tx", &e);
            }
            self.tx_error.signal();
        }
        more
    }

    /// One batch of the guest's frames into the pair's sink: the shared NIC queue's socket
    /// and the switch, or on the single-copy path the guest-memory socket. Returns where the
    /// batch stopped, frames switched to other ports and what finishing offloads for them did.
    fn tx_batch(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        limits: TxLimits,
        ports: &MacMap<Arc<SwitchPort>>,
        tally: &mut TxTally,
    ) -> Result<(TxStop, u64, FinishTally), QueueError> {
        let scratch = &mut self.tx_scratch;
        if let Some(sock) = &mut self.tx {
            let mut sink = PortTx::new(
                sock,
                &mut self.policy,
                ports,
                &mut self.local,
                &mut self.switch_scratch,
            )
            .with_kernel_gso(self.kernel_gso.as_ref());
            let batch = tx::transmit_batch(mem, queue, &mut sink, limits, BATCH, scratch, tally);
            let (mut switched, finished) = (sink.switched, sink.finished);
            // Flooded frames before the flush: they are also staged for the NIC and must
            // be read before the flush can complete them and free their buffers.
            switched += switch::deliver_local(
                &mut self.local,
                sock,
                &mut self.rx_scratch,
                &mut self.to_notify,
            );
            // The batch's NIC frames leave in this kick, before its GSO frames, which the
            // guest posted after them (a NIC frame behind a GSO frame waits for the next
            // batch): one flow's frames keep their order.
            sock.flush_tx();
            send_kernel_gso(self.kernel_gso.as_mut(), scratch, tally);
            sock.reap_completions();
            return batch.map(|stop| (stop, switched, finished));
        }
        let Some(path) = &mut self.guest else {
            return Ok((TxStop::RingEmpty, 0, FinishTally::default()));
        };
        let mut sink = DedicatedNicTx::new(path.socket_mut(), &mut self.policy)
            .with_kernel_gso(self.kernel_gso.as_ref());
        let batch = tx::transmit_batch(mem, queue, &mut sink, limits, BATCH, scratch, tally);
        // As above: the NIC frames first, then the GSO frames the guest posted after them.
        path.socket_mut().flush_tx();
        send_kernel_gso(self.kernel_gso.as_mut(), scratch, tally);
        let stop = batch?;
        self.return_sent_chains(mem, queue)?;
        Ok((stop, 0, FinishTally::default()))
    }

    /// On the single-copy path: takes back what the kernel has sent and gives the chains of
    /// frames it sent from guest memory back to the guest, in one used-ring update (the
    /// caller notifies).
    fn return_sent_chains(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
    ) -> Result<(), QueueError> {
        let Some(path) = &mut self.guest else {
            return Ok(());
        };
        let sock = path.socket_mut();
        sock.reap_tx();
        sock.take_completed_chains(&mut self.sent_chains);
        let unknown = sock.take_unknown_tx_completions();
        if unknown > 0 {
            self.stats.add(&self.stats.tx_completions_unknown, unknown);
            tracing::debug!(
                pair = self.pair,
                addresses = unknown,
                "transmit completions naming no frame in flight ignored"
            );
        }
        if self.sent_chains.is_empty() {
            return Ok(());
        }
        self.tx_in_place_progress += self.sent_chains.len() as u64;
        let returned = zero_copy_tx::return_chains(mem, queue, &self.sent_chains);
        self.sent_chains.clear();
        returned
    }

    /// Whether the pair has frames the kernel still reads from guest memory: their chains
    /// come back only as the completion ring says, which no event announces (the transmit
    /// socket is in no epoll set), so the worker polls for them.
    pub(super) fn tx_chains_in_flight(&mut self) -> bool {
        self.guest
            .as_mut()
            .is_some_and(|p| p.socket_mut().tx_chains_in_flight() > 0)
    }

    /// Gives back, after the single-copy path's socket closed, the transmit chains whose
    /// frames were still in flight: the kernel reads none of them now, and the ring's base
    /// the frontend reads next has moved past them.
    pub(super) fn give_back_tx_chains(&mut self, mem: &GuestMemory, chains: &[u16]) {
        let (Some(vring), false) = (&self.tx_vring, chains.is_empty()) else {
            return;
        };
        let mut state = vring.get_mut();
        let before = state.get_queue().next_used();
        match zero_copy_tx::return_chains(mem, state.get_queue_mut(), chains) {
            Ok(()) => {
                tracing::debug!(
                    pair = self.pair,
                    chains = chains.len(),
                    "transmit chains in flight given back after the socket closed"
                );
                notify_guest_since(&mut state, mem, &self.stats, Some(before));
            }
            Err(e) => {
                tracing::warn!(pair = self.pair, error = %e, "cannot give the guest back the transmit chains the kernel held")
            }
        }
    }
}

/// Sends the batch's TSO frames that go to the kernel whole, once its NIC frames were
/// kicked, and takes the ones the kernel refused out of the batch's tally.
fn send_kernel_gso(socket: Option<&mut KernelGsoSocket>, scratch: &TxScratch, tally: &mut TxTally) {
    let Some(socket) = socket else {
        return;
    };
    let (frames, arena) = scratch.kernel_gso_frames();
    if frames.is_empty() {
        return;
    }
    let sent = socket.send(frames, arena);
    tally.gso_kernel += sent.sent;
    tally.dropped_gso_kernel += sent.dropped;
    tally.frames -= sent.dropped;
    tally.bytes -= sent.dropped_bytes;
}
