//! The descriptor walker and the copy paths, over guest memory the fuzzer writes.
//!
//! Guest memory is two regions with a hole between them (so rings and buffers can straddle
//! a region's end, which sends `Chains` to virtio-queue's iterator), filled with the input;
//! the queue's size, ring addresses and positions come from the input too. Then
//! `datapath::tx::transmit_batch` (with a sink that routes, refuses and runs out of buffers
//! as the input says, and with `mode & 2` sends frames from guest memory as the single-copy
//! path does, checking every piece it is handed) or `datapath::rx::deliver_batch` (with frames from the input) runs a
//! few batches. Any panic is a bug: a guest must only be able to get a `QueueError`.
//!
//! Input layout (missing bytes read as zero):
//! `[mode (0x80: the guest negotiated every offload)][size log2][desc u16][avail u16][used u16][next_avail u16][next_used u16]`
//! `[budget][buffers][route][max_frame]` then `[frames: n, n × len u16]` (rx) and the rest
//! is guest memory from address 0 on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use xvdpa::datapath::GuestMemory;
use xvdpa::datapath::device::Offloads;
use xvdpa::datapath::offload::{FinishTally, Finished};
use xvdpa::datapath::rx::{deliver_batch, Framing, RxScratch, RxTally};
use xvdpa::datapath::tx::{
    transmit_batch, DirectFrame, Route, TxBuffers, TxDrop, TxLimits, TxScratch, TxTally,
};
use xvdpa::datapath::zero_copy_rx::{FileRegion, GuestFile};
use xvdpa::datapath::zero_copy_tx::{PieceLayout, MAX_PIECES};
use xvdpa_fuzz::Input;

/// Region 0 is [0, 32 KiB), region 1 [48 KiB, 80 KiB): a 16 KiB hole between them.
const REGION: usize = 0x8000;
const SECOND: u64 = 0xc000;
const MAX_QUEUE: u16 = 256;
const NIC_FRAME: usize = 2048;

/// A NIC buffer pool and a switch, both as the input says: `free` buffers, then none; every
/// `route` decision taken from the frame's own bytes and the input's `route` byte.
struct Sink {
    free: usize,
    buf: Vec<u8>,
    route: u8,
    routed: usize,
    unrouted: usize,
    /// The guest's memory as one file (region 1 first, then region 0), for a sink that sends
    /// frames from guest memory; the DMA page no piece may cross, if any.
    file: Option<GuestFile>,
    dma_page: Option<u64>,
    /// Pieces a frame may have, its slot included: copy mode's [`MAX_PIECES`], or a zero-copy
    /// driver's lower `xdp_zc_max_segs` (with the DMA page, as a zero-copy NIC has both).
    max_pieces: usize,
}

/// The chunk size of the fuzzed guest-memory UMEM: the longest piece it takes.
const CHUNK: u32 = 2048;

fn guest_file() -> GuestFile {
    GuestFile::from_regions(
        vec![
            FileRegion {
                guest_addr: 0,
                len: REGION as u64,
                file_offset: REGION as u64,
            },
            FileRegion {
                guest_addr: SECOND,
                len: REGION as u64,
                file_offset: 0,
            },
        ],
        2 * REGION as u64,
    )
}

impl TxBuffers for Sink {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        (self.free > 0).then_some(&mut self.buf[..])
    }
    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        assert!(
            len <= self.buf.len(),
            "submitted more than the buffer holds"
        );
        if self.route & 0x40 != 0 && len % 3 == 0 {
            return Err(TxDrop::Spoofed);
        }
        self.free -= 1;
        Ok(())
    }
    fn route(&mut self, eth: &[u8], len: usize) -> Route {
        assert_eq!(eth.len(), 14, "route sees exactly the Ethernet header");
        assert!(len >= 14);
        self.routed += 1;
        match (self.route & 3, eth[0] & 3) {
            (0, _) => Route::Copy,
            (1, _) => Route::Direct(len as u32),
            (2, 0) => Route::Drop(TxDrop::Spoofed),
            (2, 1) => Route::Direct(eth[1].into()),
            _ => Route::Copy,
        }
    }
    fn unroute(&mut self, _len: usize) {
        self.unrouted += 1;
    }
    fn reserve(&mut self, n: usize) -> bool {
        self.free >= n
    }
    fn in_place(&self) -> Option<PieceLayout<'_>> {
        Some(PieceLayout {
            file: self.file.as_ref()?,
            chunk_size: CHUNK,
            dma_page: self.dma_page,
            max_pieces: self.max_pieces,
        })
    }
    fn submit_in_place(
        &mut self,
        _head: u16,
        headers: usize,
        pieces: &[(u64, u32)],
    ) -> Result<(), TxDrop> {
        assert!(headers >= 14 && headers <= self.buf.len(), "slot headers {headers}");
        assert!(
            !pieces.is_empty() && pieces.len() < self.max_pieces,
            "{} pieces, limit {} with the slot",
            pieces.len(),
            self.max_pieces
        );
        for &(addr, len) in pieces {
            // Every piece lies in the file, within a chunk and (zero-copy) one DMA page: the
            // kernel would stall the ring on anything else.
            assert!(len > 0 && len <= CHUNK, "piece of {len} bytes");
            assert!(addr + u64::from(len) <= 2 * REGION as u64, "piece past the file");
            if let Some(page) = self.dma_page {
                assert_eq!(addr / page, (addr + u64::from(len) - 1) / page, "piece across a page");
            }
        }
        self.free -= 1;
        Ok(())
    }
    fn deliver_direct(&mut self, frames: &[DirectFrame], arena: &mut [u8]) {
        for f in frames {
            // Both views must lie inside the arena.
            let with = f.with_rx_header(arena);
            assert_eq!(with.len(), 12 + f.bytes(arena).len());
        }
        // Whatever a receiver takes, finishing the batch's offloads for it stays inside the
        // arena and its own buffer, and every finished frame has its header.
        let takes = Offloads {
            csum: self.route & 4 != 0,
            tso4: self.route & 8 != 0,
            tso6: self.route & 16 != 0,
            ecn: self.route & 32 != 0,
        };
        let mut finished = Finished::default();
        let mut tally = FinishTally::default();
        finished.prepare(frames.iter().map(|f| (f.start, f.len)), arena, takes, &mut tally);
        assert!(finished.frames(arena).all(|f| f.len() >= 12));
    }
}

fn memory(contents: &[u8]) -> GuestMemory {
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(SECOND), REGION)])
            .expect("two fixed regions");
    let first = contents.len().min(REGION);
    mem.write_slice(&contents[..first], GuestAddress(0))
        .expect("inside region 0");
    let rest = &contents[first..];
    let second = rest.len().min(REGION);
    mem.write_slice(&rest[..second], GuestAddress(SECOND))
        .expect("inside region 1");
    mem
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let size = 1u16 << (input.u8() % 9); // 1 to 256, powers of two as SET_VRING_NUM allows
    let desc = input.u16();
    let avail = input.u16();
    let used = input.u16();
    let next_avail = input.u16();
    let next_used = input.u16();
    let budget = usize::from(input.u8() % 64) + 1;
    let buffers = usize::from(input.u8() % 16);
    let route = input.u8();
    let max_frame = match input.u8() % 4 {
        0 => 1514,
        1 => 1518,
        2 => 60,
        _ => NIC_FRAME,
    };
    let tx = mode & 1 == 0;
    // Every offload, or none, for what the guest sends.
    let offloads = Offloads {
        csum: mode & 0x80 != 0,
        tso4: mode & 0x80 != 0,
        tso6: mode & 0x80 != 0,
        ecn: mode & 0x80 != 0,
    };
    let mrg_rxbuf = mode & 2 != 0;
    let with_header = mode & 4 != 0;
    // Frames for rx: a count and their lengths; their bytes are a pattern.
    let mut frames = Vec::new();
    if !tx {
        for _ in 0..input.u8() % 8 {
            let len = usize::from(input.u16() % 4096);
            let len = if with_header { len.max(12) } else { len };
            frames.push((0..len).map(|i| i as u8).collect::<Vec<u8>>());
        }
    }
    let mem = memory(input.0);

    let mut q = Queue::new(MAX_QUEUE).expect("a valid maximum size");
    q.set_size(size);
    // Addresses: mostly in region 0 (the u16 as it is), with mode bits moving them into
    // region 1 or the hole.
    let place = |a: u16, bit: u8| -> u64 {
        if mode & bit != 0 {
            SECOND - 0x2000 + u64::from(a)
        } else {
            u64::from(a)
        }
    };
    let (d, a, u) = (place(desc, 0x10), place(avail, 0x20), place(used, 0x40));
    q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
    q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
    q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    q.set_event_idx(mode & 8 != 0);
    q.set_next_avail(next_avail);
    q.set_next_used(next_used);
    q.set_ready(true);

    if tx {
        let mut sink = Sink {
            free: buffers,
            buf: vec![0; NIC_FRAME],
            route,
            routed: 0,
            unrouted: 0,
            file: (mode & 2 != 0).then(guest_file),
            dma_page: (mode & 4 != 0).then_some(4096),
            max_pieces: if mode & 4 != 0 { 5 } else { MAX_PIECES },
        };
        let mut scratch = TxScratch::default();
        for _ in 0..3 {
            let mut tally = TxTally::default();
            let r = transmit_batch(
                &mem,
                &mut q,
                &mut sink,
                TxLimits {
                    max_frame,
                    offloads,
                },
                budget,
                &mut scratch,
                &mut tally,
            );
            if r.is_err() {
                break;
            }
            sink.free = buffers;
        }
        assert!(sink.unrouted <= sink.routed);
    } else {
        let framing = if with_header {
            Framing::WithHeader
        } else {
            Framing::Bare
        };
        let mut scratch = RxScratch::default();
        let mut left: &[Vec<u8>] = &frames;
        for _ in 0..3 {
            let mut tally = RxTally::default();
            let r = deliver_batch(
                &mem,
                &mut q,
                left.iter().map(|f| f.as_slice()),
                framing,
                mrg_rxbuf,
                &mut scratch,
                &mut tally,
            );
            match r {
                Ok(n) => {
                    assert!(n <= left.len(), "consumed more frames than given");
                    left = &left[n..];
                }
                Err(_) => break,
            }
        }
    }
});
