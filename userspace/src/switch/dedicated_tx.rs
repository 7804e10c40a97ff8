//! The transmit sink of a port with the NIC to itself, whose guest's memory is the NIC
//! queue's UMEM (`guest-umem=on`): no other port shares the NIC, so nothing is switched or
//! flooded to a peer; every frame the policy lets through goes to the wire from a slot of the
//! daemon's own area of that UMEM (the queue takes no other UMEM): its headers, checked there,
//! and the rest from where it lies in guest memory (`datapath::zero_copy_tx`), or the whole
//! frame copied in when it cannot go so. A TSO frame goes to the kernel whole through the
//! queue pair's kernel GSO socket when there is one, as on the copy path.

use super::policy::{classify_with, TxPolicy, TxVerdict};
use super::port_tx::submit_own_frame;
use super::OwnFrameDrop;
use crate::datapath::tx::{KernelGso, Route, TxBuffers, TxDrop};
use crate::datapath::zero_copy_tx::PieceLayout;
use crate::nic::kernel_gso::{KernelGsoSocket, GSO_SEND_BATCH};
use crate::nic::vlan;
use crate::nic::xsk::guest_umem::GuestRxSocket;

/// The sink for one batch: the guest-memory socket and the port's policy.
pub struct DedicatedNicTx<'a> {
    sock: &'a mut GuestRxSocket,
    policy: &'a mut TxPolicy,
    /// The frame being copied was let through by `route`.
    routed: bool,
    /// Where TSO frames go whole (`tx-gso=kernel`); `None`: the datapath cuts them.
    kernel_gso: Option<&'a KernelGsoSocket>,
}

impl<'a> DedicatedNicTx<'a> {
    pub fn new(sock: &'a mut GuestRxSocket, policy: &'a mut TxPolicy) -> Self {
        DedicatedNicTx {
            sock,
            policy,
            routed: false,
            kernel_gso: None,
        }
    }

    /// TSO frames go to the kernel whole through `socket` (the caller sends the batch's
    /// list after kicking its NIC frames).
    pub fn with_kernel_gso(mut self, socket: Option<&'a KernelGsoSocket>) -> Self {
        self.kernel_gso = socket;
        self
    }

    /// Sends `frame`, a broadcast the port sends for its guest (the RARP its frontend asked
    /// for), as if the guest had sent it: the policy decides and the wire gets it.
    pub fn send_broadcast(&mut self, frame: &[u8]) -> Result<(), OwnFrameDrop> {
        if let Route::Drop(why) = self.route(frame, frame.len()) {
            return Err(OwnFrameDrop::Refused(why));
        }
        let sent = submit_own_frame(self, frame);
        self.sock.flush_tx();
        sent
    }
}

impl TxBuffers for DedicatedNicTx<'_> {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.sock.next_tx_buffer()
    }

    fn reserve(&mut self, n: usize) -> bool {
        self.sock.tx_room() >= n
    }

    fn buffer_len(&self) -> usize {
        // A tagged port's tag goes into the slot too.
        let tag = self.policy.vlan.map_or(0, |_| vlan::TAG_LEN);
        self.sock.max_tx_frame().saturating_sub(tag)
    }

    fn route(&mut self, eth: &[u8], len: usize) -> Route {
        // No other port on this NIC: the lookup finds none, so a frame the policy allows
        // goes to the wire, broadcast and multicast included.
        match classify_with::<std::sync::Arc<super::SwitchPort>>(eth, len, self.policy, |_| None) {
            TxVerdict::Drop(why) => {
                self.routed = false;
                Route::Drop(why)
            }
            TxVerdict::Wire | TxVerdict::Flood | TxVerdict::Local(_) => {
                self.routed = true;
                Route::Copy
            }
        }
    }

    fn unroute(&mut self, len: usize) {
        self.routed = false;
        if let Some(rate) = &self.policy.rate {
            rate.refund(len);
        }
    }

    fn in_place(&self) -> Option<PieceLayout<'_>> {
        // A tagged port's tag would have to go between the slot's bytes and the guest's.
        match self.policy.vlan {
            None => self.sock.tx_piece_layout(),
            Some(_) => None,
        }
    }

    fn submit_in_place(
        &mut self,
        head: u16,
        headers: usize,
        pieces: &[(u64, u32)],
    ) -> Result<(), TxDrop> {
        if !self.routed {
            return Err(TxDrop::Runt);
        }
        if self.sock.stage_tx_in_place(head, headers, pieces) {
            Ok(())
        } else {
            Err(TxDrop::Oversized)
        }
    }

    fn kernel_gso(&self) -> Option<KernelGso> {
        // Every frame the policy lets through goes to the wire alone (no other port reads
        // its buffers): one that was is cut by the kernel. The room is read only for a TSO
        // frame (a syscall), and holds for the batch: nothing is sent until it ends.
        let socket = self.kernel_gso.filter(|_| self.routed)?;
        Some(KernelGso {
            vlan: self.policy.vlan,
            batch: GSO_SEND_BATCH,
            room: socket.room(),
        })
    }

    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        if !self.routed {
            // `route` runs before every copy; nothing unrouted reaches the NIC.
            return Err(TxDrop::Runt);
        }
        let len = match (self.policy.vlan, self.sock.next_tx_buffer()) {
            (_, None) => return Err(TxDrop::Oversized),
            (None, Some(_)) => len,
            (Some(vid), Some(buf)) => vlan::insert_tag(buf, len, vid).ok_or(TxDrop::Oversized)?,
        };
        if self.sock.stage_tx(len) {
            Ok(())
        } else {
            Err(TxDrop::Oversized)
        }
    }
}
