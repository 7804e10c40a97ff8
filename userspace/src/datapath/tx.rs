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
use crate::device::{TxHeader, ETH_HLEN, VNET_HDR_LEN};

/// Where transmitted frames go: free NIC buffers, taken one at a time.
pub trait TxBuffers {
    /// A free buffer for the next frame, or `None` when all are in flight.
    fn next_buffer(&mut self) -> Option<&mut [u8]>;
    /// Hands the buffer last returned by `next_buffer`, holding `len` bytes, on (to the NIC,
    /// or to another port). A sink that refuses the frame (policy) says why; the buffer then
    /// stays free for the next frame.
    fn submit(&mut self, len: usize) -> Result<(), TxDrop>;
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
}

impl TxTally {
    fn drop(&mut self, why: TxDrop) {
        match why {
            TxDrop::Oversized => self.dropped_oversized += 1,
            TxDrop::Runt => self.dropped_runt += 1,
            TxDrop::Offload => self.dropped_offload += 1,
            TxDrop::Spoofed => self.dropped_spoofed += 1,
            TxDrop::RateLimited => self.dropped_rate_limited += 1,
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

/// Reusable per-worker state.
#[derive(Default)]
pub struct TxScratch {
    segs: Vec<Segment>,
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
            let Some(buf) = buffers.next_buffer() else {
                // The chain waits for a buffer; the ring resumes with it.
                chains.untake();
                stop = TxStop::NoBuffers;
                break;
            };
            let oom = |source| QueueError::OutOfMemory { head, source };

            let verdict = if total < VNET_HDR_LEN as u64 {
                Err(TxDrop::Runt)
            } else {
                let mut hdr = [0u8; VNET_HDR_LEN];
                read_at(&mut cursor, &scratch.segs, 0, &mut hdr).map_err(oom)?;
                let len = (total - VNET_HDR_LEN as u64) as usize;
                if TxHeader::parse(&hdr).wants_offload() {
                    Err(TxDrop::Offload)
                } else if len > max_frame || len > buf.len() {
                    Err(TxDrop::Oversized)
                } else if len < ETH_HLEN {
                    Err(TxDrop::Runt)
                } else {
                    read_at(&mut cursor, &scratch.segs, VNET_HDR_LEN, &mut buf[..len])
                        .map_err(oom)?;
                    Ok(len)
                }
            };
            match verdict.and_then(|len| buffers.submit(len).map(|()| len)) {
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
    if publish_used(mem, queue, &scratch.used)? {
        return Ok(stop);
    }
    for &(head, len) in &scratch.used {
        queue
            .add_used(mem, head, len)
            .map_err(|_| QueueError::Malformed {
                head,
                why: "used ring is outside guest memory",
            })?;
    }
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::testing::{memory, Buf, TestQueue, BUF_BASE, MEM_SIZE};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    /// NIC buffers as plain vectors.
    struct VecBuffers {
        free: usize,
        current: Vec<u8>,
        sent: Vec<Vec<u8>>,
    }

    impl VecBuffers {
        fn new(free: usize) -> Self {
            VecBuffers {
                free,
                current: vec![0; 2048],
                sent: Vec::new(),
            }
        }
    }

    impl TxBuffers for VecBuffers {
        fn next_buffer(&mut self) -> Option<&mut [u8]> {
            if self.free == 0 {
                return None;
            }
            Some(&mut self.current)
        }
        fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
            self.free -= 1;
            self.sent.push(self.current[..len].to_vec());
            Ok(())
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    fn run(
        t: &TestQueue<'_>,
        q: &mut Queue,
        bufs: &mut VecBuffers,
        budget: usize,
    ) -> (Result<TxStop, QueueError>, TxTally) {
        let mut tally = TxTally::default();
        let r = transmit_batch(
            t.mem,
            q,
            bufs,
            1518,
            budget,
            &mut TxScratch::default(),
            &mut tally,
        );
        (r, tally)
    }

    #[test]
    fn header_and_frame_in_one_buffer() {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        let f = frame(60, 1);
        t.write(BUF_BASE, &[0u8; 12]);
        t.write(BUF_BASE + 12, &f);
        let head = t.post(&[Buf(BUF_BASE, 72, false)]);
        let mut q = t.queue();
        let mut bufs = VecBuffers::new(8);
        let (r, tally) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        assert_eq!(bufs.sent, vec![f]);
        assert_eq!(t.used(0), vec![(u32::from(head), 0)]);
        assert_eq!(tally.frames, 1);
        assert_eq!(tally.bytes, 60);
    }

    #[test]
    fn gathers_across_descriptors_and_indirect_tables() {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        let f = frame(1514, 2);
        // Header split 4 + 8, frame split 100 + rest.
        t.write(BUF_BASE + 0x1000, &f[..100]);
        t.write(BUF_BASE + 0x2000, &f[100..]);
        t.post(&[
            Buf(BUF_BASE, 4, false),
            Buf(BUF_BASE + 0x100, 8, false),
            Buf(BUF_BASE + 0x1000, 100, false),
            Buf(BUF_BASE + 0x2000, 1414, false),
        ]);
        t.post_indirect(
            0x9000,
            &[
                Buf(BUF_BASE, 12, false),
                Buf(BUF_BASE + 0x1000, 100, false),
                Buf(BUF_BASE + 0x2000, 1414, false),
            ],
        );
        let mut q = t.queue();
        let mut bufs = VecBuffers::new(8);
        let (r, tally) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        assert_eq!(bufs.sent, vec![f.clone(), f]);
        assert_eq!(tally.frames, 2);
    }

    #[test]
    fn stops_without_losing_a_chain_when_nic_buffers_run_out() {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        for i in 0..3 {
            t.post(&[Buf(BUF_BASE + i * 0x1000, 80, false)]);
        }
        let mut q = t.queue();
        let mut bufs = VecBuffers::new(2);
        let (r, _) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::NoBuffers));
        assert_eq!(t.used(0).len(), 2);
        assert_eq!(
            q.next_avail(),
            2,
            "the third chain is still the guest's to send"
        );
        bufs.free = 1;
        let (r, _) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        assert_eq!(bufs.sent.len(), 3);
    }

    #[test]
    fn budget_bounds_a_batch() {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        for i in 0..5 {
            t.post(&[Buf(BUF_BASE + i * 0x1000, 80, false)]);
        }
        let mut q = t.queue();
        let (r, tally) = run(&t, &mut q, &mut VecBuffers::new(64), 3);
        assert_eq!(r, Ok(TxStop::Budget));
        assert_eq!(tally.frames, 3);
    }

    #[test]
    fn bad_frames_are_dropped_counted_and_returned() {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        t.post(&[Buf(BUF_BASE, 12 + 1519, false)]); // one byte over the MTU frame
        t.post(&[Buf(BUF_BASE, 12 + 10, false)]); // runt frame
        t.post(&[Buf(BUF_BASE, 8, false)]); // shorter than the header
        t.post(&[Buf(BUF_BASE, 0, false)]); // zero-length
        t.write(BUF_BASE + 0x3000, &[1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        t.post(&[Buf(BUF_BASE + 0x3000, 12 + 60, false)]); // NEEDS_CSUM without the feature
        let mut q = t.queue();
        let mut bufs = VecBuffers::new(8);
        let (r, tally) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        assert!(bufs.sent.is_empty());
        assert_eq!(
            (
                tally.dropped_oversized,
                tally.dropped_runt,
                tally.dropped_offload
            ),
            (1, 3, 1)
        );
        assert_eq!(t.used(0).len(), 5, "every chain goes back to the guest");
    }

    #[test]
    fn malformed_chains_are_refused() {
        let w = VRING_DESC_F_WRITE as u16;
        let n = VRING_DESC_F_NEXT as u16;
        for (descs, what) in [
            (vec![(BUF_BASE, 80, w, 0)], "write-only buffer"),
            (vec![(BUF_BASE, 12, n, 1), (BUF_BASE, 80, n, 0)], "loop"),
            (
                vec![(MEM_SIZE as u64 - 20, 80, 0, 0)],
                "outside guest memory",
            ),
        ] {
            let mem = memory();
            let mut t = TestQueue::new(&mem);
            t.post_raw(&descs);
            let mut q = t.queue();
            let (r, _) = run(&t, &mut q, &mut VecBuffers::new(8), 64);
            assert!(r.is_err(), "{what}: {r:?}");
        }
    }
}
