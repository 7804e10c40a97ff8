//! Receive: frames from the NIC into the guest's receive queue.
//!
//! Each frame is prefixed with a `virtio_net_hdr_v1` and written across as many of the guest's
//! buffers as it needs: one chain without MRG_RXBUF, several with it (`num_buffers` tells the
//! guest how many). If the guest has too few buffers for a frame, the chains taken for it are
//! put back and the caller keeps the frame until the guest posts more.

use super::GuestMemory;
use virtio_queue::{Queue, QueueT};

use super::split_ring::{publish_used, Chains};
use super::{write_at, GuestMemoryCursor, Malformed, QueueError, Segment};
use crate::datapath::device::{rx_header, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS};

/// How many chains ahead of the one being filled the next buffer is prefetched: a guest's
/// buffer is rarely in this CPU's cache, and the copy otherwise waits for it.
pub(crate) const PREFETCH_AHEAD: u16 = 2;

/// Reusable per-worker state, so the packet path does not allocate.
#[derive(Default, Debug)]
pub struct RxScratch {
    segs: Vec<Segment>,
    first: Vec<Segment>,
    taken: Vec<(u16, u32)>,
    /// (head, length) of every chain the batch's delivered frames used.
    used: Vec<(u16, u32)>,
}

/// Totals of one batch, added to the shared counters once per batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RxTally {
    pub frames: u64,
    pub bytes: u64,
    pub buffers: u64,
    pub dropped_too_large: u64,
}

/// How filling one frame ended.
enum Fill {
    /// Written, in this many chains (their used entries are in `scratch.used`).
    Delivered { chains: u16 },
    /// Too large for the buffers; the one chain tried is given back for the next frame.
    TooLarge,
    /// Too large even across 65535 merged buffers: drop it and end the batch there.
    TooLargeEnd,
    /// The ring ran out of chains part-way; nothing of this frame counts.
    NoBuffers,
}

/// How the frames handed to [`deliver_batch`] begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Bare Ethernet frames: the net header is written in front of each.
    Bare,
    /// Each frame already starts with its net header, `rx_header(1)` (frames switched
    /// between ports are read out of the sender that way): one copy per frame, not two.
    WithHeader,
}

/// Writes one frame into chains taken from `chains`.
fn fill_frame(
    cursor: &mut GuestMemoryCursor<'_>,
    chains: &mut Chains<'_, '_>,
    frame: &[u8],
    framing: Framing,
    mrg_rxbuf: bool,
    scratch: &mut RxScratch,
) -> Result<Fill, QueueError> {
    let header = rx_header(1);
    // What goes to the guest is `prefix` then `body`.
    let (prefix, body): (&[u8], &[u8]) = match framing {
        Framing::Bare => (&header, frame),
        Framing::WithHeader if frame.len() >= VNET_HDR_LEN => (&[], frame),
        // Callers build these frames; a short one is a bug, not guest input.
        Framing::WithHeader => return Ok(Fill::TooLarge),
    };
    let need = prefix.len() + body.len();
    let mut written = 0usize;
    scratch.taken.clear();

    while written < need {
        let Some((head, capacity)) = chains.take(true, &mut scratch.segs)? else {
            return Ok(Fill::NoBuffers);
        };
        if let Some(next) = chains.peek_buffer(PREFETCH_AHEAD) {
            cursor.prefetch(next);
        }
        let first = written == 0;
        if first && capacity < VNET_HDR_LEN as u64 {
            return Err(QueueError::Malformed {
                head,
                why: Malformed::BufferSmallerThanHeader,
            });
        }
        if !mrg_rxbuf && capacity < need as u64 {
            // Checked before writing, so the chain goes to the next frame untouched.
            chains.untake();
            return Ok(Fill::TooLarge);
        }
        let oom = |source| QueueError::OutOfMemory { head, source };
        let mut in_chain = 0usize;
        if first {
            in_chain += write_at(cursor, &scratch.segs, 0, prefix).map_err(oom)?;
            // Where num_buffers goes if the frame spans several chains. Remembered cheaply:
            // a slice copy per frame showed up as 14 % of the rx profile.
            scratch.first.clear();
            if mrg_rxbuf {
                if scratch.segs[0].1 as usize >= VNET_HDR_LEN {
                    scratch.first.push(scratch.segs[0]);
                } else {
                    scratch.first.extend_from_slice(&scratch.segs);
                }
            }
        }
        // Body bytes [written - prefix.., ...) go at this chain's offset `in_chain`.
        let body_from = written + in_chain - prefix.len();
        in_chain += write_at(cursor, &scratch.segs, in_chain, &body[body_from..]).map_err(oom)?;
        written += in_chain;
        scratch.taken.push((head, in_chain as u32));
        if written < need && scratch.taken.len() == usize::from(u16::MAX) {
            return Ok(Fill::TooLargeEnd);
        }
    }

    let buffers = scratch.taken.len() as u16;
    if buffers > 1 {
        let head = scratch.taken[0].0;
        write_at(
            cursor,
            &scratch.first,
            VNET_HDR_NUM_BUFFERS,
            &buffers.to_le_bytes(),
        )
        .map_err(|source| QueueError::OutOfMemory { head, source })?;
    }
    for &t in &scratch.taken {
        scratch.used.push(t);
    }
    Ok(Fill::Delivered { chains: buffers })
}

/// How copying one frame with [`copy_frame`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copied {
    /// Written, in this many chains; their used entries were appended.
    Delivered { chains: u16 },
    /// Too large for the guest's buffers: dropped, no chain used.
    TooLarge,
    /// The ring ran out of chains part-way: nothing of the frame counts, and the caller puts
    /// the ring back to where it was before the frame.
    NoBuffers,
}

/// Copies one bare frame, behind a net header, into chains taken from `chains` (several with
/// MRG_RXBUF), for a caller that keeps its own used entries in order with other frames (the
/// single-copy path's spare frames): the used entries go to `used`, not published.
pub(crate) fn copy_frame(
    cursor: &mut GuestMemoryCursor<'_>,
    chains: &mut Chains<'_, '_>,
    frame: &[u8],
    mrg_rxbuf: bool,
    scratch: &mut RxScratch,
    used: &mut Vec<(u16, u32)>,
) -> Result<Copied, QueueError> {
    scratch.used.clear();
    Ok(
        match fill_frame(cursor, chains, frame, Framing::Bare, mrg_rxbuf, scratch)? {
            Fill::Delivered { chains } => {
                used.extend_from_slice(&scratch.used);
                Copied::Delivered { chains }
            }
            // A frame needs 65535 chains only on a ring larger than virtio allows (32768), so
            // the chains taken for it cannot be lost unpublished here.
            Fill::TooLarge | Fill::TooLargeEnd => Copied::TooLarge,
            Fill::NoBuffers => Copied::NoBuffers,
        },
    )
}

/// Delivers frames in order until they run out or the guest's buffers do. Returns how many
/// frames were consumed (delivered, or dropped as too large); the rest stay with the caller.
///
/// One avail-ring iterator serves the whole batch (the avail index is read once), and the
/// used entries of the delivered frames are written after it, in order. Chains a frame could
/// not finish are not consumed: the ring resumes right after the last delivered frame's.
pub fn deliver_batch<'f>(
    mem: &GuestMemory,
    queue: &mut Queue,
    frames: impl IntoIterator<Item = &'f [u8]>,
    framing: Framing,
    mrg_rxbuf: bool,
    scratch: &mut RxScratch,
    tally: &mut RxTally,
) -> Result<usize, QueueError> {
    let header_len = match framing {
        Framing::Bare => 0,
        Framing::WithHeader => VNET_HDR_LEN as u64,
    };
    let mut cursor = GuestMemoryCursor::new(mem);
    scratch.used.clear();
    let mut consumed = 0;
    let (outcome, next_avail) = {
        // One pass over the avail ring per batch: the avail index is read once.
        let Some(mut chains) = Chains::open(mem, queue)? else {
            return Ok(0);
        };
        let mut outcome = Ok(());
        let mut delivered_upto = chains.next_avail();
        for frame in frames {
            match fill_frame(&mut cursor, &mut chains, frame, framing, mrg_rxbuf, scratch) {
                Ok(Fill::Delivered { chains: n }) => {
                    delivered_upto = chains.next_avail();
                    tally.frames += 1;
                    tally.bytes += frame.len() as u64 - header_len;
                    tally.buffers += u64::from(n);
                }
                Ok(Fill::TooLarge) => tally.dropped_too_large += 1,
                Ok(Fill::TooLargeEnd) => {
                    tally.dropped_too_large += 1;
                    consumed += 1;
                    break;
                }
                Ok(Fill::NoBuffers) => break,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
            consumed += 1;
        }
        (outcome, delivered_upto)
    };
    queue.set_next_avail(next_avail);
    // One used-index update per batch; the caller decides the notification for everything
    // published since the last one (`switch::RxQueueShared::notify_guest`). The frames before
    // a chain the guest broke are published too: the ring moved past their chains, so each
    // taken head gets its used entry, and the guest gets what the daemon counted.
    let published = publish_used(mem, queue, &scratch.used);
    outcome?;
    published?;
    Ok(consumed)
}

#[cfg(test)]
mod tests;
