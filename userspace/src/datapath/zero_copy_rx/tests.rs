//! Guest receive buffers posted to the kernel and completed, against virtio-queue's mock
//! queue; the kernel's part (writing a frame after the fill address) is played by the test.

use super::*;
use crate::datapath::device::VNET_HDR_NUM_BUFFERS;
use crate::datapath::testing::{memory, Buf, TestQueue, BUF_BASE, MEM_SIZE, QUEUE_SIZE};
use crate::datapath::Malformed;
use vm_memory::Bytes;

/// Where the test guest's memory starts in its file (a region at an offset, as QEMU splits
/// RAM around the PCI hole).
const FILE_OFFSET: u64 = 0x4000;
const LAYOUT: FillLayout = FillLayout {
    data_offset: 256 + 274,
    max_frame: 1518,
    dma_page: None,
};
/// The same on a zero-copy NIC whose DMA pages are 4 KiB and not known to be contiguous.
const ZERO_COPY_LAYOUT: FillLayout = FillLayout {
    dma_page: Some(4096),
    ..LAYOUT
};
/// Net header + largest frame: the smallest buffer posted.
const NEED: u32 = 12 + 1518;

fn one_region() -> GuestFile {
    GuestFile::from_regions(
        vec![FileRegion {
            guest_addr: 0,
            len: MEM_SIZE as u64,
            file_offset: FILE_OFFSET,
        }],
        FILE_OFFSET + MEM_SIZE as u64,
    )
}

/// The daemon's own area in the tests: spare slots right after the guest's file.
const SPARE_START: u64 = FILE_OFFSET + MEM_SIZE as u64;
const SLOT: u32 = 2048;

struct TestSpares {
    bytes: Vec<u8>,
}

impl SpareMemory for TestSpares {
    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let from = usize::try_from(addr.checked_sub(SPARE_START)?).ok()?;
        self.bytes.get(from..from.checked_add(len)?)
    }
}

/// The device's side after the guest posted `chains` and the daemon posted what it could to a
/// fill ring of `capacity` entries.
struct Posting<'m> {
    tq: TestQueue<'m>,
    q: Queue,
    posted: PostedBuffers,
    fill: Vec<u64>,
    tally: ZeroCopyRxTally,
    heads: Vec<u16>,
    spares: TestSpares,
    mrg_rxbuf: bool,
}

fn posting<'m>(mem: &'m GuestMemory, chains: &[&[Buf]], capacity: usize) -> Posting<'m> {
    let mut tq = TestQueue::new(mem);
    let heads = chains.iter().map(|c| tq.post(c)).collect();
    let mut p = Posting {
        q: tq.queue(),
        tq,
        posted: PostedBuffers::new(one_region(), LAYOUT, capacity),
        fill: Vec::new(),
        tally: ZeroCopyRxTally::default(),
        heads,
        spares: TestSpares { bytes: Vec::new() },
        mrg_rxbuf: false,
    };
    p.post().unwrap();
    p
}

impl Posting<'_> {
    fn post(&mut self) -> Result<(), QueueError> {
        self.post_room(64)
    }

    fn post_room(&mut self, room: usize) -> Result<(), QueueError> {
        let mem = self.tq.mem;
        let copy = SpareCopy {
            memory: &self.spares,
            mrg_rxbuf: self.mrg_rxbuf,
        };
        self.posted.post(
            mem,
            &mut self.q,
            room,
            &mut self.fill,
            copy,
            &mut self.tally,
        )
    }

    fn complete(&mut self, received: &[(u64, u64, u32)]) {
        let mem = self.tq.mem;
        let copy = SpareCopy {
            memory: &self.spares,
            mrg_rxbuf: self.mrg_rxbuf,
        };
        self.posted
            .complete(
                mem,
                &mut self.q,
                received.iter().copied(),
                copy,
                &mut self.tally,
            )
            .unwrap();
    }

    /// Receives into spares too: a pool of `count` slots, none posted yet.
    fn with_spares(mut self, count: u32) -> Self {
        let posted = std::mem::replace(
            &mut self.posted,
            PostedBuffers::new(one_region(), LAYOUT, 0),
        );
        self.posted = posted.with_spares(SpareFrames::new(SPARE_START, SLOT, count));
        self.spares.bytes = vec![0; count as usize * SLOT as usize];
        self
    }

    /// The guest posts one chain of `len` bytes at `addr`; returns its head.
    fn guest_posts(&mut self, addr: u64, len: u32) -> u16 {
        self.tq.post(&[Buf(addr, len, true)])
    }

    /// The kernel writes `frame` where fill address `fill` puts it (a guest buffer or a
    /// spare), and returns its receive descriptor.
    fn kernel_writes(&mut self, fill: u64, frame: &[u8]) -> (u64, u64, u32) {
        let at = fill + LAYOUT.data_offset;
        if at >= SPARE_START {
            let from = (at - SPARE_START) as usize;
            self.spares.bytes[from..from + frame.len()].copy_from_slice(frame);
        } else {
            self.tq.write(at - FILE_OFFSET, frame);
        }
        (fill, LAYOUT.data_offset, frame.len() as u32)
    }
}

impl Posting<'_> {
    /// Stops as at GET_VRING_BASE (the library marks the queue not ready first) and gives
    /// back what the kernel held and what waited for a chain; returns how many went back.
    fn stop(&mut self) -> usize {
        self.q.set_ready(false);
        let mem = self.tq.mem;
        self.posted.give_back(mem, &mut self.q).unwrap()
    }

    /// The invariant of the receive path, checked once nothing may be left in flight (after
    /// `stop`): every head taken from the avail ring (every entry before the queue's next
    /// avail index, which the frontend reads as the ring's base) has exactly one used entry,
    /// and no head the ring still offers has any, so a restart from that base neither loses
    /// a chain nor uses one twice.
    fn assert_each_taken_head_used_once(&self) {
        let avail = self.tq.mock.avail_addr().0;
        let ring =
            |offset: u64| -> u16 { self.tq.mem.read_obj(GuestAddress(avail + offset)).unwrap() };
        let offered = ring(2);
        let taken = self.q.next_avail();
        let used = self.tq.used(0);
        for i in 0..offered {
            let head = u32::from(ring(4 + 2 * u64::from(i % QUEUE_SIZE)));
            let uses = used.iter().filter(|&&(h, _)| h == head).count();
            let want = usize::from(i < taken);
            assert_eq!(
                uses, want,
                "used entries of head {head} (avail entry {i}, base {taken})"
            );
        }
        assert!(used
            .iter()
            .all(|&(h, _)| (0..offered)
                .any(|i| u32::from(ring(4 + 2 * u64::from(i % QUEUE_SIZE))) == h)));
    }
}

/// A numbered frame: `n` in every byte, `len` bytes.
fn numbered(n: u8, len: usize) -> Vec<u8> {
    vec![n; len]
}

/// The frames the guest's used entries from `from` on name, as (head, what the chain holds
/// after its net header), each checked for its net header and length.
fn delivered(p: &Posting<'_>, from: u16, buffers: &[(u16, u64)]) -> Vec<Vec<u8>> {
    p.tq.used(from)
        .into_iter()
        .map(|(head, len)| {
            let &(_, addr) = buffers
                .iter()
                .find(|(h, _)| u32::from(*h) == head)
                .expect("a used entry names a chain the guest posted");
            assert_eq!(p.tq.read(addr, 12), rx_header(1), "net header of {head}");
            p.tq.read(addr + 12, len as usize - 12)
        })
        .collect()
}

/// `e` is a malformed chain, for reason `want`.
fn assert_malformed(e: QueueError, want: Malformed) {
    assert!(
        matches!(e, QueueError::Malformed { why, .. } if why == want),
        "{e:?}"
    );
}

fn seg(addr: u64, len: u32) -> Segment {
    (GuestAddress(addr), len)
}

#[test]
fn a_buffer_is_posted_so_that_the_frame_lands_right_after_the_net_header() {
    let file = one_region();
    let fill = fill_address(&file, LAYOUT, seg(BUF_BASE, NEED)).unwrap();
    assert_eq!(fill + LAYOUT.data_offset, FILE_OFFSET + BUF_BASE + 12);
}

#[test]
fn buffers_the_kernel_could_overrun_or_that_leave_the_file_are_not_posted() {
    let file = one_region();
    let mem_end = MEM_SIZE as u64;
    for (buffer, want) in [
        (
            seg(BUF_BASE, NEED - 1),
            Unpostable::TooSmall { len: NEED - 1 },
        ),
        (seg(BUF_BASE, 0), Unpostable::TooSmall { len: 0 }),
        (seg(mem_end, NEED), Unpostable::OutsideFile),
        (seg(mem_end - 100, NEED), Unpostable::OutsideFile),
        (seg(u64::MAX - 10, NEED), Unpostable::OutsideFile),
    ] {
        assert_eq!(fill_address(&file, LAYOUT, buffer), Err(want), "{buffer:?}");
    }
    // Memory at the very start of the file: the fill address would be negative.
    let at_start = GuestFile::from_regions(
        vec![FileRegion {
            guest_addr: 0,
            len: MEM_SIZE as u64,
            file_offset: 0,
        }],
        MEM_SIZE as u64,
    );
    assert_eq!(
        fill_address(&at_start, LAYOUT, seg(0, NEED)),
        Err(Unpostable::BeforeFileStart)
    );
    // A buffer whose tail (past header + largest frame) leaves memory is fine: nobody writes
    // there.
    assert!(fill_address(&file, LAYOUT, seg(mem_end - u64::from(NEED), 65535)).is_ok());
}

#[test]
fn on_a_zero_copy_nic_a_chunk_across_a_dma_page_is_not_posted_and_in_copy_mode_it_is() {
    // The kernel takes [fill, fill + chunk) from a zero-copy fill ring only if it stays in
    // one DMA page (or the pages are contiguous), and consumes any other address silently:
    // such a buffer would be lost to the guest until the socket closes.
    let file = one_region();
    let chunk = LAYOUT.data_offset + u64::from(LAYOUT.max_frame);
    // The buffer whose chunk starts at a page of the file.
    let page_start = FILE_OFFSET + BUF_BASE;
    let first = BUF_BASE + LAYOUT.data_offset - 12;
    for (buffer, fits) in [
        (first, true),
        (first + (4096 - chunk), true),
        (first + (4096 - chunk) + 1, false),
        (first - 1, false),
        (first + 2049, false),
    ] {
        let zero_copy = fill_address(&file, ZERO_COPY_LAYOUT, seg(buffer, NEED));
        if fits {
            let fill = zero_copy.unwrap();
            assert!(fill >= page_start - 4096 && fill + chunk <= page_start + 4096);
        } else {
            assert_eq!(zero_copy, Err(Unpostable::CrossesDmaPage), "{buffer:#x}");
        }
        assert!(fill_address(&file, LAYOUT, seg(buffer, NEED)).is_ok());
    }
    let mut tally = ZeroCopyRxTally::default();
    tally.returned(Unpostable::CrossesDmaPage);
    assert_eq!((tally.returned_crosses_dma_page, tally.refused()), (1, 1));
}

#[test]
fn a_buffer_across_two_regions_is_not_posted_and_each_region_keeps_its_own_offset() {
    // Two regions of one file at non-adjacent offsets (RAM below and above a hole).
    let file = GuestFile::from_regions(
        vec![
            FileRegion {
                guest_addr: 0,
                len: 0x8_0000,
                file_offset: 0,
            },
            FileRegion {
                guest_addr: 0x8_0000,
                len: 0x8_0000,
                file_offset: 0x20_0000,
            },
        ],
        0x28_0000,
    );
    assert_eq!(
        fill_address(&file, LAYOUT, seg(0x8_0000 - 100, NEED)),
        Err(Unpostable::OutsideFile)
    );
    let fill = fill_address(&file, LAYOUT, seg(0x9_0000, NEED)).unwrap();
    assert_eq!(fill + LAYOUT.data_offset, 0x21_0000 + 12);
    // A region whose file offset runs past the file's end.
    let short = GuestFile::from_regions(
        vec![FileRegion {
            guest_addr: 0,
            len: 0x10_0000,
            file_offset: 0x1000,
        }],
        0x8_0000,
    );
    assert_eq!(
        fill_address(&short, LAYOUT, seg(0x9_0000, NEED)),
        Err(Unpostable::OutsideFile)
    );
}

#[test]
fn unpostable_chains_go_back_unused_and_counted_and_good_ones_go_to_the_fill_ring() {
    let mem = memory();
    let mut p = posting(
        &mem,
        &[
            &[Buf(BUF_BASE, 2048, true)],
            &[Buf(BUF_BASE + 0x1000, 64, true)],
            &[Buf(MEM_SIZE as u64 + 0x1000, 2048, true)],
            // The same buffer again, while the kernel holds it.
            &[Buf(BUF_BASE, 2048, true)],
            // A chain: only its first buffer counts, and it is large enough.
            &[Buf(BUF_BASE + 0x2000, 2048, true), Buf(BUF_BASE, 8, true)],
        ],
        16,
    );
    let expect = |addr: u64| FILE_OFFSET + addr + 12 - LAYOUT.data_offset;
    assert_eq!(p.fill, vec![expect(BUF_BASE), expect(BUF_BASE + 0x2000)]);
    let returned: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&i| (u32::from(p.heads[i]), 0))
        .collect();
    assert_eq!(p.tq.used(0), returned);
    let t = p.tally;
    assert_eq!(
        (
            t.posted,
            t.returned_too_small,
            t.returned_outside_file,
            t.returned_already_posted
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(p.posted.len(), 2);
    assert_eq!(p.stop(), 2);
    p.assert_each_taken_head_used_once();
}

#[test]
fn a_chain_with_a_readable_buffer_breaks_the_queue() {
    let mem = memory();
    let mut p = posting(&mem, &[], 16);
    p.tq.post(&[Buf(BUF_BASE, 2048, false)]);
    let e = p.post().unwrap_err();
    assert_malformed(e, Malformed::ReadableInReceiveChain);
    assert!(p.fill.is_empty() && p.posted.is_empty());
}

#[test]
fn no_more_buffers_than_the_fill_ring_holds_are_taken() {
    let mem = memory();
    let bufs: Vec<[Buf; 1]> = (0..3)
        .map(|i| [Buf(BUF_BASE + 0x1000 * i, 2048, true)])
        .collect();
    let chains: Vec<&[Buf]> = bufs.iter().map(|b| &b[..]).collect();
    let mut p = posting(&mem, &chains, 2);
    assert_eq!(p.fill.len(), 2);
    p.post().unwrap();
    assert!(p.fill.is_empty());
    let first = FILE_OFFSET + BUF_BASE + 12 - LAYOUT.data_offset;
    p.complete(&[(first, LAYOUT.data_offset, 60)]);
    // The caller's fill ring has no room.
    p.post_room(0).unwrap();
    assert!(p.fill.is_empty());
    p.post().unwrap();
    assert_eq!(p.fill, vec![first + 0x2000]);
    assert!(p.tq.used(0).iter().all(|&(_, len)| len != 0));
}

#[test]
fn a_completed_frame_gets_its_net_header_and_used_entry_and_nothing_else_is_written() {
    let mem = memory();
    // What the guest's buffer held before: none of it may change beyond header and frame.
    TestQueue::new(&mem).write(BUF_BASE, &[0xee; 2048]);
    let mut p = posting(&mem, &[&[Buf(BUF_BASE, 2048, true)]], 16);
    // The kernel writes the frame at fill + data_offset, i.e. buffer + 12.
    let frame: Vec<u8> = (0..100u8).collect();
    p.tq.write(BUF_BASE + 12, &frame);
    p.complete(&[(p.fill[0], LAYOUT.data_offset, 100)]);
    assert_eq!(p.tq.used(0), vec![(u32::from(p.heads[0]), 112)]);
    assert_eq!(p.tq.read(BUF_BASE, 12), rx_header(1));
    assert_eq!(p.tq.read(BUF_BASE + 12, 100), frame);
    assert_eq!(
        p.tq.read(BUF_BASE + 112, 2048 - 112),
        vec![0xee; 2048 - 112]
    );
    assert_eq!((p.tally.frames, p.tally.bytes), (1, 100));
    assert!(p.posted.is_empty());
}

#[test]
fn completions_that_name_no_posted_buffer_are_counted_and_ignored() {
    let mem = memory();
    let mut p = posting(&mem, &[&[Buf(BUF_BASE, 2048, true)]], 16);
    let (fill, off) = (p.fill[0], LAYOUT.data_offset);
    p.complete(&[(fill + 1, off, 60), (fill - 1, off, 60)]);
    assert_eq!(p.tally.unknown_completions, 2);
    assert!(p.tq.used(0).is_empty());
    // The buffer is still posted: the real completion finds it, once.
    p.complete(&[(fill, off, 60), (fill, off, 60)]);
    assert_eq!((p.tally.frames, p.tally.unknown_completions), (1, 3));
    assert_eq!(p.tq.used(0).len(), 1);
}

#[test]
fn forgetting_returns_every_posted_head() {
    let mem = memory();
    let mut p = posting(
        &mem,
        &[
            &[Buf(BUF_BASE, 2048, true)],
            &[Buf(BUF_BASE + 0x1000, 2048, true)],
        ],
        16,
    );
    let mut heads = p.posted.forget();
    heads.sort();
    assert_eq!(heads, p.heads);
    assert!(p.posted.is_empty());
}

#[test]
fn buffers_given_back_come_back_unused_and_a_late_completion_writes_nothing() {
    let mem = memory();
    TestQueue::new(&mem).write(BUF_BASE + 0x1000, &[0xee; 2048]);
    let mut p = posting(
        &mem,
        &[
            &[Buf(BUF_BASE, 2048, true)],
            &[Buf(BUF_BASE + 0x1000, 2048, true)],
            &[Buf(BUF_BASE + 0x2000, 2048, true)],
        ],
        16,
    );
    p.complete(&[(p.fill[0], LAYOUT.data_offset, 60)]);
    // As at GET_VRING_BASE: the library marks the queue not ready before the device stops it.
    p.q.set_ready(false);
    let mem_ref = p.tq.mem;
    assert_eq!(p.posted.give_back(mem_ref, &mut p.q).unwrap(), 2);
    let mut used = p.tq.used(0);
    used[1..].sort();
    let h: Vec<u32> = p.heads.iter().map(|&h| u32::from(h)).collect();
    assert_eq!(used, vec![(h[0], 72), (h[1], 0), (h[2], 0)]);
    assert!(p.posted.is_empty());
    // The kernel naming a given-back buffer afterwards changes nothing in it or the ring.
    p.complete(&[(p.fill[1], LAYOUT.data_offset, 60)]);
    assert_eq!(p.tally.unknown_completions, 1);
    assert_eq!(p.tq.used(0).len(), 3);
    assert_eq!(p.tq.read(BUF_BASE + 0x1000, 2048), vec![0xee; 2048]);
    p.assert_each_taken_head_used_once();
}

#[test]
fn chains_held_back_for_copied_frames_stay_on_the_ring_until_more_arrive() {
    let mem = memory();
    let bufs: Vec<[Buf; 1]> = (0..7)
        .map(|i| [Buf(BUF_BASE + 0x1000 * i, 2048, true)])
        .collect();
    let mut p = posting(&mem, &[], 16);
    p.posted = PostedBuffers::new(one_region(), LAYOUT, 16).holding_back(2);
    for b in &bufs[..5] {
        p.tq.post(b);
    }
    p.post().unwrap();
    // Two of five stay on the ring, for frames the daemon copies (broadcasts from the tap).
    assert_eq!((p.fill.len(), p.q.next_avail()), (3, 3));
    // A copied frame takes one of them; the kernel gets none of the last one.
    p.q.set_next_avail(4);
    p.post().unwrap();
    assert_eq!((p.fill.len(), p.q.next_avail()), (0, 4));
    // The guest posts two more: one goes to the kernel, two stay.
    for b in &bufs[5..] {
        p.tq.post(b);
    }
    p.post().unwrap();
    assert_eq!((p.fill.len(), p.q.next_avail()), (1, 5));
    assert_eq!(p.posted.len(), 4);
}

#[test]
fn frames_in_spares_and_in_guest_buffers_reach_the_guest_in_the_order_they_arrived() {
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(2);
    let buf = |i: u64| BUF_BASE + 0x1000 * i;
    let spare = |i: u64| SPARE_START + i * u64::from(SLOT);
    let mut buffers = Vec::new();
    // The guest posts one buffer: the kernel gets it, then the spares (the guest has no more).
    buffers.push((p.guest_posts(buf(0), 2048), buf(0)));
    p.post().unwrap();
    assert_eq!(p.fill, [p.fill[0], spare(0), spare(1)]);
    let a = p.fill[0];
    assert_eq!((p.posted.spares_posted(), p.tally.spares_posted), (2, 2));
    // Frame 1 lands in the guest's buffer, frame 2 in a spare and finds no chain: it waits.
    let r1 = p.kernel_writes(a, &numbered(1, 60));
    let r2 = p.kernel_writes(spare(0), &numbered(2, 100));
    p.complete(&[r1, r2]);
    assert_eq!(delivered(&p, 0, &buffers), vec![numbered(1, 60)]);
    assert_eq!(p.posted.pending(), 1);
    // Three chains: the first takes frame 2, the next goes to the kernel, the last stays for
    // the spare still ahead of it; the spare back in the pool goes to the kernel after it.
    for i in 1..4 {
        buffers.push((p.guest_posts(buf(i), 2048), buf(i)));
    }
    p.post().unwrap();
    let c = p.fill[0];
    assert_eq!(p.fill, [c, spare(0)]);
    assert_eq!((p.tally.spare_frames, p.q.next_avail()), (1, 3));
    // A broadcast from the tap takes the chain kept for the spare (the daemon copies those
    // into any chain): frame 3 in the spare finds none, and frame 4 in the guest's buffer
    // and frame 5 in the other spare wait behind it.
    p.q.set_next_avail(4);
    let r3 = p.kernel_writes(spare(1), &numbered(3, 1518));
    let r4 = p.kernel_writes(c, &numbered(4, 300));
    let r5 = p.kernel_writes(spare(0), &numbered(5, 64));
    p.complete(&[r3, r4, r5]);
    assert_eq!((p.tq.used(0).len(), p.posted.pending()), (2, 3));
    // One chain: frames 3 and 4 go, 5 waits; another: 5 goes.
    buffers.push((p.guest_posts(buf(4), 2048), buf(4)));
    p.post().unwrap();
    assert_eq!((p.tq.used(0).len(), p.posted.pending()), (4, 1));
    buffers.push((p.guest_posts(buf(5), 2048), buf(5)));
    p.post().unwrap();
    assert_eq!(p.posted.pending(), 0);
    let want: Vec<Vec<u8>> = [(1, 60), (2, 100), (3, 1518), (4, 300), (5, 64)]
        .iter()
        .map(|&(n, len)| numbered(n, len))
        .collect();
    assert_eq!(delivered(&p, 0, &buffers), want);
    let t = p.tally;
    assert_eq!(
        (t.frames, t.spare_frames, t.buffers, t.bytes),
        (5, 3, 5, 60 + 100 + 1518 + 300 + 64)
    );
    // Every spare is back in the pool or on the ring again; none is lost.
    assert_eq!(p.posted.spares_free() + p.posted.spares_posted(), 2);
}

#[test]
fn spare_frames_ahead_of_a_guest_buffer_on_the_fill_ring_always_find_a_chain() {
    // Were every chain the guest posts put on the fill ring behind the spares, the spare
    // frames would wait for a chain and the frames in those buffers for them, while the
    // guest posts more only once it got frames back: with a real guest's ring the daemon
    // would hold it whole, and the port would stop for good.
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(2);
    let buf = |i: u64| BUF_BASE + 0x1000 * i;
    let mut buffers = vec![(p.guest_posts(buf(0), 2048), buf(0))];
    p.post().unwrap();
    let posted_first = p.fill.clone();
    for i in 1..4 {
        buffers.push((p.guest_posts(buf(i), 2048), buf(i)));
    }
    p.post().unwrap();
    // Two chains stay for the two spares ahead; the third goes to the kernel.
    assert_eq!((p.fill.len(), p.q.next_avail()), (1, 2));
    // The kernel fills everything the daemon gave it, in order: every frame arrives.
    let all: Vec<u64> = posted_first.iter().chain(&p.fill).copied().collect();
    let received: Vec<_> = all
        .iter()
        .enumerate()
        .map(|(n, &f)| p.kernel_writes(f, &numbered(n as u8, 80)))
        .collect();
    p.complete(&received);
    assert_eq!(p.posted.pending(), 0);
    assert_eq!(
        delivered(&p, 0, &buffers),
        (0..4).map(|n| numbered(n, 80)).collect::<Vec<_>>()
    );
}

#[test]
fn a_spare_frame_takes_several_small_chains_with_mergeable_buffers_and_is_dropped_without() {
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(2);
    p.mrg_rxbuf = true;
    p.post().unwrap();
    let frame: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    let r = p.kernel_writes(SPARE_START, &frame);
    p.complete(&[r]);
    let h1 = p.guest_posts(BUF_BASE, 512);
    let h2 = p.guest_posts(BUF_BASE + 0x1000, 512);
    p.post().unwrap();
    assert_eq!(
        p.tq.used(0),
        vec![(u32::from(h1), 512), (u32::from(h2), 500)]
    );
    let mut header = rx_header(1);
    header[VNET_HDR_NUM_BUFFERS..VNET_HDR_NUM_BUFFERS + 2].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(p.tq.read(BUF_BASE, 12), header);
    let mut got = p.tq.read(BUF_BASE + 12, 500);
    got.extend(p.tq.read(BUF_BASE + 0x1000, 500));
    assert_eq!(got, frame);
    assert_eq!((p.tally.spare_frames, p.tally.buffers), (1, 2));

    // Without MRG_RXBUF a frame larger than the next chain is dropped and counted; the
    // chain, too short for the kernel as well, goes back unused.
    p.mrg_rxbuf = false;
    let r = p.kernel_writes(SPARE_START + u64::from(SLOT), &frame);
    p.complete(&[r]);
    p.guest_posts(BUF_BASE + 0x2000, 512);
    p.post().unwrap();
    // The chain stays on the ring (for the spare on the fill ring), unused.
    assert!(p.tq.used(2).is_empty());
    assert_eq!((p.tally.dropped_too_large, p.posted.pending()), (1, 0));
    assert_eq!(p.posted.spares_free() + p.posted.spares_posted(), 2);
}

#[test]
fn frames_wait_for_chains_only_as_far_as_the_pool_goes() {
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(3);
    p.post().unwrap();
    assert_eq!(p.fill.len(), 3);
    let fills = p.fill.clone();
    let received: Vec<_> = fills
        .iter()
        .enumerate()
        .map(|(i, &f)| p.kernel_writes(f, &numbered(i as u8, 60)))
        .collect();
    p.complete(&received);
    assert_eq!((p.posted.pending(), p.posted.spares_free()), (3, 0));
    // No chains and no spares left: nothing more is posted and nothing waits beyond them.
    p.post().unwrap();
    assert!(p.fill.is_empty());
    // A kernel naming the same spares again (it cannot, they are off the ring) is ignored.
    p.complete(&received);
    assert_eq!((p.posted.pending(), p.tally.unknown_completions), (3, 3));
    // The guest comes back: everything arrives, in order, and the pool is whole again.
    let bufs: Vec<_> = (0..3u64)
        .map(|i| {
            let addr = BUF_BASE + 0x1000 * i;
            (p.guest_posts(addr, 2048), addr)
        })
        .collect();
    p.post().unwrap();
    assert_eq!(
        delivered(&p, 0, &bufs),
        (0..3).map(|n| numbered(n, 60)).collect::<Vec<_>>()
    );
    assert_eq!(p.posted.spares_free() + p.posted.spares_posted(), 3);
}

#[test]
fn spares_go_to_the_kernel_in_batches_only_when_the_guest_has_no_more_buffers() {
    let mem = memory();
    // Capacity for two guest buffers: the third stays with the guest, so no spares yet.
    let mut p = posting(&mem, &[], 2).with_spares(300);
    for i in 0..3 {
        p.guest_posts(BUF_BASE + 0x1000 * i, 2048);
    }
    p.post_room(usize::MAX).unwrap();
    assert_eq!((p.fill.len(), p.posted.spares_posted()), (2, 0));
    // Two frames free room for the third; then the guest has none left to offer: spares up
    // to the low-water mark, in whole batches.
    let received: Vec<_> = p
        .fill
        .iter()
        .map(|&f| (f, LAYOUT.data_offset, 60))
        .collect();
    p.complete(&received);
    p.post_room(usize::MAX).unwrap();
    assert_eq!(p.q.next_avail(), 3);
    let batches = (SPARE_LOW_WATER - 1).div_ceil(SPARE_BATCH) * SPARE_BATCH;
    assert_eq!(
        (p.fill.len(), p.posted.spares_posted()),
        (1 + batches, batches)
    );
    // At the mark nothing more goes; below it, whole batches again.
    p.post_room(usize::MAX).unwrap();
    assert!(p.fill.is_empty());
    let taken: Vec<_> = (0..2 * SPARE_BATCH as u64 + 1)
        .map(|i| (SPARE_START + i * u64::from(SLOT), LAYOUT.data_offset, 60))
        .collect();
    p.complete(&taken);
    p.post_room(usize::MAX).unwrap();
    assert_eq!(p.fill.len(), 2 * SPARE_BATCH);
    // The caller's fill ring room bounds them too.
    let next = SPARE_START + (2 * SPARE_BATCH as u64 + 1) * u64::from(SLOT);
    p.complete(&[(next, LAYOUT.data_offset, 60)]);
    p.post_room(0).unwrap();
    assert!(p.fill.is_empty());
}

#[test]
fn stopping_with_frames_waiting_gives_the_guest_buffers_back_unused_and_the_spares_to_the_pool() {
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(1);
    let h0 = p.guest_posts(BUF_BASE, 2048);
    p.post().unwrap();
    let (a, s0) = (p.fill[0], p.fill[1]);
    let h1 = p.guest_posts(BUF_BASE + 0x1000, 2048);
    let h2 = p.guest_posts(BUF_BASE + 0x2000, 2048);
    p.guest_posts(BUF_BASE + 0x3000, 2048);
    p.post().unwrap();
    // h1 and h2 go to the kernel, the last chain stays for the spare; a broadcast takes it.
    // The kernel fills h0, the spare and h1, whose frame waits behind the spare's.
    let b = p.fill[0];
    assert_eq!(p.fill.len(), 2);
    p.q.set_next_avail(p.q.next_avail() + 1);
    let received = [
        p.kernel_writes(a, &numbered(1, 60)),
        p.kernel_writes(s0, &numbered(2, 60)),
        p.kernel_writes(b, &numbered(3, 60)),
    ];
    p.complete(&received);
    assert_eq!((p.posted.pending(), p.posted.len()), (2, 1));
    p.q.set_ready(false);
    let mem_ref = p.tq.mem;
    assert_eq!(p.posted.give_back(mem_ref, &mut p.q).unwrap(), 2);
    let mut used = p.tq.used(0);
    used[1..].sort();
    let mut back = [u32::from(h1), u32::from(h2)];
    back.sort();
    assert_eq!(used, vec![(u32::from(h0), 72), (back[0], 0), (back[1], 0)]);
    assert_eq!(
        (
            p.posted.pending(),
            p.posted.spares_free(),
            p.posted.spares_posted()
        ),
        (0, 1, 0)
    );
    assert!(p.posted.is_empty());
}

#[test]
fn a_guest_frame_completed_before_a_spare_frame_meets_a_malformed_chain_still_gets_its_entry() {
    // Frame 1 lands in the guest's buffer, frame 2 in a spare; the guest's next chain starts
    // with a buffer shorter than the net header, so copying frame 2 breaks the queue. Frame
    // 1's buffer left the kernel's hands in that call: it must reach the used ring then, or
    // it is in no list a stop gives back.
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(1);
    let h0 = p.guest_posts(BUF_BASE, 2048);
    p.post().unwrap();
    let (a, s0) = (p.fill[0], p.fill[1]);
    p.tq.post(&[Buf(BUF_BASE + 0x1000, 4, true)]);
    let received = [
        p.kernel_writes(a, &numbered(1, 60)),
        p.kernel_writes(s0, &numbered(2, 60)),
    ];
    let mem_ref = p.tq.mem;
    let copy = SpareCopy {
        memory: &p.spares,
        mrg_rxbuf: false,
    };
    let e = p
        .posted
        .complete(mem_ref, &mut p.q, received, copy, &mut p.tally)
        .unwrap_err();
    assert_malformed(e, Malformed::BufferSmallerThanHeader);
    assert_eq!(p.tq.used(0), vec![(u32::from(h0), 72)]);
    // The malformed chain is not taken: the ring's base stays in front of it.
    assert_eq!(p.q.next_avail(), 1);
    assert_eq!(p.stop(), 0);
    p.assert_each_taken_head_used_once();
}

#[test]
fn chains_posted_before_a_malformed_one_are_past_the_base_and_given_back_once() {
    // The first chain goes to the kernel, the second has a device-readable buffer: the
    // queue breaks. The first is the kernel's now (it goes on the fill ring), so the ring's
    // base must be past it: a restart from the base would otherwise take it again while a
    // stop gives it back, two used entries for one avail entry.
    let mem = memory();
    let mut p = posting(&mem, &[], 16);
    p.guest_posts(BUF_BASE, 2048);
    p.tq.post(&[Buf(BUF_BASE + 0x1000, 2048, false)]);
    let e = p.post().unwrap_err();
    assert_malformed(e, Malformed::ReadableInReceiveChain);
    assert_eq!((p.fill.len(), p.posted.len(), p.q.next_avail()), (1, 1, 1));
    assert_eq!(p.stop(), 1);
    p.assert_each_taken_head_used_once();
}

#[test]
fn frames_drained_before_a_malformed_chain_keep_their_entries_and_the_rest_waits() {
    // Waiting: frame 1 in a spare, frame 2 in a guest buffer, frame 3 in a spare. The guest
    // posts a good chain (frame 1 goes in it, frame 2 follows) and then one whose first
    // buffer cannot hold the net header (frame 3 breaks the queue). Frames 1 and 2 reached
    // the guest: their entries are published, the base is past frame 1's chain only, and
    // frame 3 still waits.
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(2);
    let h0 = p.guest_posts(BUF_BASE, 2048);
    p.post().unwrap();
    let (a, s0, s1) = (p.fill[0], p.fill[1], p.fill[2]);
    let received = [
        p.kernel_writes(s0, &numbered(1, 60)),
        p.kernel_writes(a, &numbered(2, 60)),
        p.kernel_writes(s1, &numbered(3, 60)),
    ];
    p.complete(&received);
    assert_eq!(p.posted.pending(), 3);
    let c = p.guest_posts(BUF_BASE + 0x1000, 2048);
    p.tq.post(&[Buf(BUF_BASE + 0x2000, 4, true)]);
    let e = p.post().unwrap_err();
    assert_malformed(e, Malformed::BufferSmallerThanHeader);
    assert_eq!(p.tq.used(0), vec![(u32::from(c), 72), (u32::from(h0), 72)]);
    assert_eq!(p.tq.read(BUF_BASE + 0x1000 + 12, 60), numbered(1, 60));
    assert_eq!((p.q.next_avail(), p.posted.pending()), (2, 1));
    // Only a spare frame waits: no guest buffer is left to give back.
    assert_eq!(p.stop(), 0);
    p.assert_each_taken_head_used_once();
}

#[test]
fn a_completion_of_a_posted_buffer_at_the_wrong_offset_or_too_long_takes_it_back() {
    // The kernel names a posted guest buffer and a posted spare but not where or how the
    // layout puts a frame: neither holds a frame to trust. The guest buffer goes back unused,
    // in its place among the frames, and the spare to the pool; neither stays posted.
    let mem = memory();
    let mut p = posting(&mem, &[], 16).with_spares(2);
    let ha = p.guest_posts(BUF_BASE, 2048);
    let hb = p.guest_posts(BUF_BASE + 0x1000, 2048);
    p.post().unwrap();
    let (a, b, s0, s1) = (p.fill[0], p.fill[1], p.fill[2], p.fill[3]);
    let off = LAYOUT.data_offset;
    let first = p.kernel_writes(s0, &numbered(1, 60));
    let last = p.kernel_writes(b, &numbered(2, 60));
    p.complete(&[
        first,
        (a, off + 1, 60),
        (s1, off, LAYOUT.max_frame + 1),
        last,
    ]);
    let t = p.tally;
    assert_eq!(
        (t.bad_completions, t.returned_bad_completion, t.refused()),
        (2, 1, 1)
    );
    assert_eq!(t.unknown_completions, 0);
    assert!(p.posted.is_empty());
    assert_eq!(p.posted.pending(), 3);
    let c = p.guest_posts(BUF_BASE + 0x2000, 2048);
    p.post().unwrap();
    assert_eq!(
        p.tq.used(0),
        vec![(u32::from(c), 72), (u32::from(ha), 0), (u32::from(hb), 72)]
    );
    assert_eq!(p.tq.read(BUF_BASE + 0x2000 + 12, 60), numbered(1, 60));
    assert_eq!(p.posted.spares_free() + p.posted.spares_posted(), 2);
    assert_eq!(p.stop(), 0);
    p.assert_each_taken_head_used_once();
}
