//! Guest -> NIC (and -> other ports): one queue pair's transmit rounds.

use std::time::Instant;

use crate::datapath::GuestMemory;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use super::{QueuePairWorker, BATCH, BUDGET_BATCHES};
use crate::datapath::device::Offloads;
use crate::datapath::offload::FinishTally;
use crate::datapath::tx::{self, TxLimits, TxStop, TxTally};
use crate::datapath::QueueError;
use crate::memory_guard;
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
        let mut tally = TxTally::default();
        let mut switched = 0;
        let mut finished = FinishTally::default();
        let limits = TxLimits {
            max_frame: self.max_frame,
            offloads,
        };
        let mut more = false;
        let mut result = Ok(());
        let ports = self.switch.snapshot();
        'outer: for round in 0.. {
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
            + tally.dropped_vlan;
        let s = &self.stats;
        s.add(&s.tx_packets, tally.frames);
        s.add(&s.tx_bytes, tally.bytes);
        s.add(&s.tx_dropped_oversized, tally.dropped_oversized);
        s.add(&s.tx_dropped_runt, tally.dropped_runt);
        s.add(&s.tx_dropped_offload, tally.dropped_offload);
        s.add(&s.tx_dropped_spoofed, tally.dropped_spoofed);
        s.add(&s.tx_dropped_rate_limited, tally.dropped_rate_limited);
        s.add(&s.tx_dropped_vlan, tally.dropped_vlan);
        s.add(&s.tx_switched, switched);
        s.add(&s.tx_gso_frames, tally.gso_frames);
        s.add(&s.tx_segments, tally.segments + finished.segments);
        s.add(
            &s.tx_csum_computed,
            tally.csum_computed + finished.csum_computed,
        );
        s.add(&s.tx_csum_offloaded, tally.csum_offloaded);
        s.add(&s.tx_offload_passed, finished.passed);
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
            );
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
            sock.flush_tx();
            sock.reap_completions();
            return batch.map(|stop| (stop, switched, finished));
        }
        let Some(path) = &mut self.guest else {
            return Ok((TxStop::RingEmpty, 0, FinishTally::default()));
        };
        let mut sink = DedicatedNicTx::new(path.socket_mut(), &mut self.policy);
        let batch = tx::transmit_batch(mem, queue, &mut sink, limits, BATCH, scratch, tally);
        path.socket_mut().flush_tx();
        batch.map(|stop| (stop, 0, FinishTally::default()))
    }
}
