//! Transmit: frames from the guest's transmit queue into NIC buffers.
//!
//! A transmit chain is a `virtio_net_hdr_v1` followed by the frame, gathered across any number
//! of device-readable descriptors (ANY_LAYOUT), directly or through an indirect table. The
//! frame is copied into a buffer the caller provides (a UMEM frame) and the chain is returned
//! to the guest at once, since the copy no longer needs it.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::split_ring::{publish_used, Chains};
use super::{read_at, GuestMemoryCursor, QueueError, Segment};
use crate::datapath::device::{rx_header, TxHeader, ETH_HLEN, VNET_HDR_LEN};

/// Where transmitted frames go: free NIC buffers, taken one at a time, or (for a sink that
/// switches) straight to another port.
pub trait TxBuffers {
    /// A free buffer for the next frame, or `None` when all are in flight.
    fn next_buffer(&mut self) -> Option<&mut [u8]>;
    /// Hands the buffer last returned by `next_buffer`, holding `len` bytes, on (to the NIC,
    /// or to another port). A sink that refuses the frame (policy) says why; the buffer then
    /// stays free for the next frame.
    fn submit(&mut self, len: usize) -> Result<(), TxDrop>;
    /// Decides where a frame goes from its Ethernet header and length, before it is copied
    /// anywhere; called once per frame, before `next_buffer` and `submit`.
    fn route(&mut self, _eth: &[u8], _len: usize) -> Route {
        Route::Copy
    }
    /// Takes back the last [`Route::Copy`] decision, for a `len`-byte frame that found no
    /// free buffer and will be routed again later (a policer returns its tokens).
    fn unroute(&mut self, _len: usize) {}
    /// Takes the batch's [`Route::Direct`] frames, whose bytes are in `arena`.
    fn deliver_direct(&mut self, _frames: &[DirectFrame], _arena: &[u8]) {}
}

/// Where one frame goes, as the sink decides from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Into a NIC buffer (`next_buffer`, then `submit`).
    Copy,
    /// Elsewhere, by the sink itself, with this tag of its choosing: the frame is read into
    /// the batch's arena and handed to `deliver_direct` at the end of the batch, skipping
    /// the NIC buffer pool (frames between two ports of the daemon).
    Direct(u32),
    Drop(TxDrop),
}

/// A frame routed [`Route::Direct`]: its tag and where it lies in the arena. The arena holds
/// a receive-side net header (`rx_header(1)`) right before the frame, so the receiving port
/// writes header and frame into its guest with one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectFrame {
    pub tag: u32,
    /// Where the net header starts; the frame follows it.
    pub start: usize,
    /// The frame's length, without the header.
    pub len: usize,
}

impl DirectFrame {
    /// The frame alone.
    pub fn bytes<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.start + VNET_HDR_LEN..self.start + VNET_HDR_LEN + self.len]
    }

    /// The net header and the frame, as a receive queue takes them.
    pub fn with_rx_header<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.start..self.start + VNET_HDR_LEN + self.len]
    }
}

/// Why a transmitted frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDrop {
    /// Larger than the MTU allows or than a NIC buffer.
    Oversized,
    /// Shorter than an Ethernet header, or the chain is shorter than the net header.
    Runt,
    /// Asks for checksum or segmentation offload, which was not negotiated.
    Offload,
    /// Sent with a source MAC the port may not use.
    Spoofed,
    /// Over the port's rate limit.
    RateLimited,
    /// Carries a VLAN tag of its own, which the port does not allow.
    Vlan,
}

/// Totals of one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxTally {
    pub frames: u64,
    pub bytes: u64,
    pub dropped_oversized: u64,
    pub dropped_runt: u64,
    pub dropped_offload: u64,
    pub dropped_spoofed: u64,
    pub dropped_rate_limited: u64,
    pub dropped_vlan: u64,
}

impl TxTally {
    fn drop(&mut self, why: TxDrop) {
        match why {
            TxDrop::Oversized => self.dropped_oversized += 1,
            TxDrop::Runt => self.dropped_runt += 1,
            TxDrop::Offload => self.dropped_offload += 1,
            TxDrop::Spoofed => self.dropped_spoofed += 1,
            TxDrop::RateLimited => self.dropped_rate_limited += 1,
            TxDrop::Vlan => self.dropped_vlan += 1,
        }
    }
}

/// How a transmit batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStop {
    /// The guest's ring is empty.
    RingEmpty,
    /// No free NIC buffer: the rest waits for completions.
    NoBuffers,
    /// The batch limit was reached with more chains waiting.
    Budget,
}

/// Chains up to this long (net header included) are read out of the guest in one piece
/// before they are routed.
const WHOLE_READ: usize = 256;

/// Reusable per-worker state.
#[derive(Default)]
pub struct TxScratch {
    segs: Vec<Segment>,
    /// The batch's direct frames and their bytes (the arena only grows, and stays warm).
    direct: Vec<DirectFrame>,
    arena: Vec<u8>,
    /// The batch's handled chains (head, 0 bytes written), returned to the used ring together.
    used: Vec<(u16, u32)>,
}

/// Moves up to `budget` frames from the guest's transmit queue into `buffers`. The handled
/// chains go back to the used ring together, with one index update; the caller decides the
/// notification with `switch::notify_guest_since`.
///
/// `max_frame` is the largest frame (Ethernet header included) the port may send. Returns why
/// it stopped; on `Err` the queue is unusable until the device is reset.
pub fn transmit_batch(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    buffers: &mut impl TxBuffers,
    max_frame: usize,
    budget: usize,
    scratch: &mut TxScratch,
    tally: &mut TxTally,
) -> Result<TxStop, QueueError> {
    let mut cursor = GuestMemoryCursor::new(mem);
    scratch.used.clear();
    scratch.direct.clear();
    let mut arena_used = 0usize;
    let mut stop = TxStop::Budget;
    let next_avail = {
        // One pass over the avail ring per batch: the avail index is read once.
        let Some(mut chains) = Chains::open(mem, queue)? else {
            return Ok(TxStop::RingEmpty);
        };
        for _ in 0..budget {
            let Some((head, total)) = chains.take(false, &mut scratch.segs)? else {
                stop = TxStop::RingEmpty;
                break;
            };
            if let Some(next) = chains.peek_buffer(super::rx::PREFETCH_AHEAD) {
                cursor.prefetch(next);
            }
            let oom = |source| QueueError::OutOfMemory { head, source };

            // A small chain is read whole into the arena in one go (every read of guest
            // memory has a fixed cost a short frame does not amortise); a larger one only
            // up to the end of its Ethernet header, the rest once its route is known.
            let at = arena_used;
            let whole = total as usize <= WHOLE_READ;
            const HEADERS: usize = VNET_HDR_LEN + ETH_HLEN;
            let got = if whole {
                total as usize
            } else {
                (total as usize).min(HEADERS)
            };
            if scratch.arena.len() < at + got {
                scratch.arena.resize(at + got, 0);
            }
            read_at(
                &mut cursor,
                &scratch.segs,
                0,
                &mut scratch.arena[at..at + got],
            )
            .map_err(oom)?;
            // The headers are looked at where they were read.
            let read = &scratch.arena[at..at + got];
            let len = (total as usize).saturating_sub(VNET_HDR_LEN);
            let verdict = if total < VNET_HDR_LEN as u64 {
                Err(TxDrop::Runt)
            } else if read
                .first_chunk::<VNET_HDR_LEN>()
                .is_some_and(|h| TxHeader::parse(h).wants_offload())
            {
                Err(TxDrop::Offload)
            } else if len > max_frame {
                Err(TxDrop::Oversized)
            } else if len < ETH_HLEN {
                Err(TxDrop::Runt)
            } else {
                // `got` covers both headers here: the chain holds at least HEADERS bytes.
                match buffers.route(&read[VNET_HDR_LEN..HEADERS], len) {
                    Route::Drop(why) => Err(why),
                    Route::Direct(tag) => {
                        // The frame stays where it was read; its tx header makes way for
                        // the receiver's.
                        let end = at + VNET_HDR_LEN + len;
                        if !whole {
                            scratch.arena.resize(scratch.arena.len().max(end), 0);
                            read_at(
                                &mut cursor,
                                &scratch.segs,
                                got,
                                &mut scratch.arena[at + got..end],
                            )
                            .map_err(oom)?;
                        }
                        scratch.arena[at..at + VNET_HDR_LEN].copy_from_slice(&rx_header(1));
                        arena_used = end;
                        scratch.direct.push(DirectFrame {
                            tag,
                            start: at,
                            len,
                        });
                        Ok(None)
                    }
                    Route::Copy => match buffers.next_buffer() {
                        Some(buf) if len <= buf.len() => {
                            if whole {
                                buf[..len].copy_from_slice(
                                    &scratch.arena[at + VNET_HDR_LEN..at + VNET_HDR_LEN + len],
                                );
                            } else {
                                // The Ethernet header is the one routed, not a second read of
                                // guest memory another vCPU may have rewritten since.
                                buf[..ETH_HLEN].copy_from_slice(
                                    &scratch.arena[at + VNET_HDR_LEN..at + HEADERS],
                                );
                                read_at(
                                    &mut cursor,
                                    &scratch.segs,
                                    HEADERS,
                                    &mut buf[ETH_HLEN..len],
                                )
                                .map_err(oom)?;
                            }
                            Ok(Some(len))
                        }
                        Some(_) => Err(TxDrop::Oversized),
                        None => {
                            // The chain waits for a NIC buffer; the ring resumes with it, and
                            // the sink forgets the route (it is routed again then).
                            buffers.unroute(len);
                            chains.untake();
                            stop = TxStop::NoBuffers;
                            break;
                        }
                    },
                }
            };
            match verdict.and_then(|copied| match copied {
                Some(len) => buffers.submit(len).map(|()| len),
                None => Ok(len),
            }) {
                Ok(len) => {
                    tally.frames += 1;
                    tally.bytes += len as u64;
                }
                Err(why) => tally.drop(why),
            }
            scratch.used.push((head, 0));
        }
        chains.next_avail()
    };
    queue.set_next_avail(next_avail);
    if !scratch.direct.is_empty() {
        buffers.deliver_direct(&scratch.direct, &scratch.arena[..arena_used]);
    }
    publish_used(mem, queue, &scratch.used)?;
    Ok(stop)
}

#[cfg(test)]
mod tests;
