//! The transmit sink of one port: where each frame the guest sends goes, as the datapath's
//! [`TxBuffers`] asks, one batch at a time.

use std::sync::Arc;

use super::policy::{classify_with, TxPolicy, TxVerdict};
use super::{LocalFrame, MacMap, SwitchPort};
use crate::datapath::offload::{FinishTally, Finished};
use crate::datapath::rx::{Framing, RxScratch};
use crate::datapath::tx::{DirectFrame, KernelGso, Route, TxBuffers, TxDrop};
use crate::mac::MacAddr;
use crate::nic::kernel_gso::{KernelGsoSocket, GSO_SEND_BATCH};
use crate::nic::vlan;
use crate::nic::xsk::{FrameView, XskSocket};

/// Where a frame `route` sent to the NIC buffer path goes once copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    Wire,
    Flood,
}

/// Per-worker state the transmit sink keeps between batches.
#[derive(Default)]
pub struct SwitchScratch {
    /// Destinations of the batch's direct frames; a frame's tag is its index here.
    direct_to: Vec<Arc<SwitchPort>>,
    rx: RxScratch,
    /// One receiver's direct frames, offloads finished for it.
    finished: Finished,
}

/// The transmit sink of one port for one batch: the NIC socket, the policy and the switch.
pub struct PortTx<'a> {
    pub sock: &'a mut XskSocket,
    pub policy: &'a mut TxPolicy,
    pub ports: &'a MacMap<Arc<SwitchPort>>,
    /// Flooded frames for the other ports, written after the batch.
    pub local: &'a mut Vec<LocalFrame>,
    pub scratch: &'a mut SwitchScratch,
    /// Frames handed straight to other ports.
    pub switched: u64,
    /// What finishing offloads for the receivers of direct frames did.
    pub finished: FinishTally,
    /// The route of the frame being copied.
    copied: Option<Copied>,
    /// The last destination found in `ports`: a guest sending a burst mostly sends it to
    /// one peer, and the table lookup was a tenth of the vm-to-vm profile.
    last_found: Option<(MacAddr, &'a Arc<SwitchPort>)>,
    /// TSO frames for the wire go to the kernel whole through this socket, as many bytes of
    /// them as it has room for when each comes (`tx-gso=kernel` with its socket open).
    kernel_gso: Option<&'a KernelGsoSocket>,
}

impl<'a> PortTx<'a> {
    pub fn new(
        sock: &'a mut XskSocket,
        policy: &'a mut TxPolicy,
        ports: &'a MacMap<Arc<SwitchPort>>,
        local: &'a mut Vec<LocalFrame>,
        scratch: &'a mut SwitchScratch,
    ) -> Self {
        scratch.direct_to.clear();
        PortTx {
            sock,
            policy,
            ports,
            local,
            scratch,
            switched: 0,
            finished: FinishTally::default(),
            copied: None,
            last_found: None,
            kernel_gso: None,
        }
    }

    /// Hands TSO frames for the wire to the kernel whole, for `socket`, through which the
    /// caller sends them after the batch's NIC frames (`tx-gso=kernel` with its socket open).
    pub fn with_kernel_gso(mut self, socket: Option<&'a KernelGsoSocket>) -> Self {
        self.kernel_gso = socket;
        self
    }
}

impl TxBuffers for PortTx<'_> {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.sock.next_buffer()
    }

    fn reserve(&mut self, n: usize) -> bool {
        self.sock.reserve(n)
    }

    fn buffer_len(&self) -> usize {
        // A frame for a tagged port gets its tag in the buffer: room is kept for it.
        let tag = if self.policy.vlan.is_some() {
            vlan::TAG_LEN
        } else {
            0
        };
        self.sock.buffer_len() - tag
    }

    fn submit_frame(&mut self, frame: &[u8]) -> Result<(), TxDrop> {
        let Some(route) = self.copied else {
            return Err(TxDrop::Runt);
        };
        let vlan = self.policy.vlan;
        // Too long for the socket (more pieces than a frame may span) or no free buffers
        // after all: the same drop a frame too long for one buffer used to be.
        if !self.sock.stage_frame(frame, vlan) {
            return Err(TxDrop::Oversized);
        }
        if route == Copied::Flood {
            // The NIC has the frame in pieces; the peers read a whole copy, untagged, until
            // the flush.
            let view = self.sock.keep_copy(frame);
            self.flood_to_peers(view);
        }
        Ok(())
    }

    fn route(&mut self, eth: &[u8], len: usize) -> Route {
        self.copied = None;
        let (ports, last_found) = (self.ports, &mut self.last_found);
        let lookup = |dst: &MacAddr| match *last_found {
            Some((mac, port)) if mac == *dst => Some(port),
            _ => {
                let port = ports.get(dst);
                *last_found = port.map(|p| (*dst, p));
                port
            }
        };
        match classify_with(eth, len, self.policy, lookup) {
            TxVerdict::Drop(why) => Route::Drop(why),
            TxVerdict::Wire => {
                self.copied = Some(Copied::Wire);
                Route::Copy
            }
            TxVerdict::Flood => {
                self.copied = Some(Copied::Flood);
                Route::Copy
            }
            TxVerdict::Local(to) => {
                let direct_to = &mut self.scratch.direct_to;
                let tag = match direct_to.iter().position(|p| p.index == to.index) {
                    Some(i) => i,
                    None => {
                        direct_to.push(to.clone());
                        direct_to.len() - 1
                    }
                };
                Route::Direct(tag as u32)
            }
        }
    }

    fn unroute(&mut self, len: usize) {
        self.copied = None;
        if let Some(rate) = &self.policy.rate {
            rate.refund(len);
        }
    }

    fn deliver_direct(&mut self, frames: &[DirectFrame], arena: &mut [u8]) {
        for (tag, to) in self.scratch.direct_to.iter().enumerate() {
            let mine = frames
                .iter()
                .filter(|f| f.tag == tag as u32)
                .map(|f| (f.start, f.len));
            // Notified per batch, not per round: a receiver that went to sleep starts on
            // this batch while the next ones are copied and keeps polling, where a wake-up
            // per round let it fall asleep after every round (each wake-up costs the sender
            // several microseconds). A receiver that is polling asked for no notification.
            // A known port without a frontend has nobody to deliver to.
            let (rx_scratch, finished) = (&mut self.scratch.rx, &mut self.scratch.finished);
            let tally = &mut self.finished;
            // Counted as the sender's frames handed over (a TSO frame cut for the receiver is
            // one), so tx_switched stays a part of tx_packets; the receiver's own counters say
            // what fit its ring.
            let mut handed = 0;
            to.with_rx_queue(|rx| {
                // Each receiver gets what its guest negotiated: offloads as they are, or
                // finished here.
                finished.prepare(mine.inspect(|_| handed += 1), arena, rx.offloads(), tally);
                let frames = finished.frames(arena);
                rx.deliver(frames, Framing::WithHeader, rx_scratch, true, true)
            });
            self.switched += handed;
        }
    }

    fn kernel_gso(&self) -> Option<KernelGso> {
        // For the wire alone: a flooded frame is also read by other ports from its NIC
        // buffers, so it is cut here.
        let socket = self.kernel_gso?;
        // The room is read only for a TSO frame, not on every batch (a syscall): nothing is
        // sent through the socket until the batch ends, so it holds for the whole batch.
        (self.copied == Some(Copied::Wire)).then(|| KernelGso {
            vlan: self.policy.vlan,
            batch: GSO_SEND_BATCH,
            room: socket.room(),
        })
    }

    fn completes_checksums(&self) -> bool {
        // Only a frame for the wire alone: a flooded one is also read by other ports, whose
        // guests must get it complete.
        self.copied == Some(Copied::Wire) && self.sock.completes_checksums()
    }

    fn submit_partial(&mut self, len: usize, start: usize, offset: usize) -> Result<(), TxDrop> {
        if !self.completes_checksums() || self.sock.current(len).is_none() {
            return Err(TxDrop::Offload);
        }
        // A tagged port's tag goes in after the MAC addresses, before the checksummed bytes.
        let (len, start) = match self.policy.vlan {
            Some(vid) => (
                self.sock.tag_current(len, vid).ok_or(TxDrop::Oversized)?,
                start + vlan::TAG_LEN,
            ),
            None => (len, start),
        };
        self.sock
            .stage_with_checksum(len, start, offset)
            .map(|_| ())
            .ok_or(TxDrop::Offload)
    }

    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        // The route holds for every buffer of the frame (a TSO frame's segments) until the
        // next `route`.
        let Some(route) = self.copied else {
            // `route` runs before every copy; nothing unrouted reaches the NIC.
            return Err(TxDrop::Runt);
        };
        if self.sock.current(len).is_none() {
            return Err(TxDrop::Oversized);
        }
        match route {
            Copied::Wire => {
                let len = match self.policy.vlan {
                    Some(vid) => self.sock.tag_current(len, vid).ok_or(TxDrop::Oversized)?,
                    None => len,
                };
                self.sock.stage(len);
                Ok(())
            }
            Copied::Flood => {
                let vlan = self.policy.vlan;
                let frame = match vlan {
                    // Untagged: one buffer serves the NIC and, until the flush, the peers.
                    None => self.sock.stage(len),
                    // Tagged on the NIC, untagged for the peers: the socket holds the untagged
                    // frame for the peers until the flush and stages a tagged copy for the NIC.
                    Some(vid) => self.sock.hold(len).inspect(|&frame| {
                        self.sock.stage_tagged_copy(frame, vid);
                    }),
                };
                if let Some(frame) = frame {
                    self.flood_to_peers(frame);
                }
                Ok(())
            }
        }
    }
}

/// Why a frame the port sends on its guest's behalf (an announcement) did not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OwnFrameDrop {
    #[error("refused by the port's policy: {0:?}")]
    Refused(TxDrop),
    #[error("no free NIC buffer")]
    NoBuffer,
}

impl PortTx<'_> {
    /// Sends `frame`, a broadcast the port sends for its guest (the RARP its frontend asked
    /// for), exactly as if the guest had sent it: the port's policy decides (source MAC,
    /// VLAN, rate), the wire gets it (tagged on a tagged port) and so does every other port
    /// on the VLAN, after the caller's `deliver_local`.
    pub fn send_broadcast(&mut self, frame: &[u8]) -> Result<(), OwnFrameDrop> {
        match self.route(frame, frame.len()) {
            Route::Drop(why) => Err(OwnFrameDrop::Refused(why)),
            // Only a unicast frame goes to one port; a broadcast one never does.
            Route::Direct(_) => {
                self.unroute(frame.len());
                Err(OwnFrameDrop::Refused(TxDrop::Runt))
            }
            Route::Copy => submit_own_frame(self, frame),
        }
    }

    /// Queues a flooded frame for every other port on the sender's VLAN.
    fn flood_to_peers(&mut self, frame: FrameView) {
        let (own, vlan) = (self.policy.own_mac(), self.policy.vlan);
        let peers = self
            .ports
            .values()
            .filter(|p| p.mac != own && p.vlan == vlan);
        for p in peers {
            self.local.push(LocalFrame {
                to: p.clone(),
                frame,
            });
        }
    }
}

/// Copies `frame`, which the sink's `route` just let through as [`Route::Copy`], into the
/// sink's next buffer and submits it; a frame that cannot go is unrouted (its rate tokens
/// given back).
pub(super) fn submit_own_frame(
    sink: &mut impl TxBuffers,
    frame: &[u8],
) -> Result<(), OwnFrameDrop> {
    let Some(buf) = sink.next_buffer() else {
        sink.unroute(frame.len());
        return Err(OwnFrameDrop::NoBuffer);
    };
    let Some(room) = buf.get_mut(..frame.len()) else {
        sink.unroute(frame.len());
        return Err(OwnFrameDrop::Refused(TxDrop::Oversized));
    };
    room.copy_from_slice(frame);
    sink.submit(frame.len()).map_err(OwnFrameDrop::Refused)
}
