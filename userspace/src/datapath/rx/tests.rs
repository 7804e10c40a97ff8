//! Unit tests of `datapath::rx` over virtio-queue's mock queues.
use super::*;
use crate::datapath::testing::{memory, Buf, TestQueue, BUF_BASE, MEM_SIZE};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn num_buffers(t: &TestQueue<'_>, addr: u64) -> u16 {
    let b = t.read(addr + 10, 2);
    u16::from_le_bytes([b[0], b[1]])
}

#[test]
fn single_buffer_gets_header_and_frame() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let head = t.post(&[Buf(BUF_BASE, 2048, true)]);
    let mut q = t.queue();
    let f = frame(60, 1);
    let mut tally = RxTally::default();
    let n = deliver_batch(
        &mem,
        &mut q,
        [f.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut tally,
    )
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(t.used(0), vec![(u32::from(head), 72)]);
    assert_eq!(t.read(BUF_BASE, 10), vec![0u8; 10]);
    assert_eq!(num_buffers(&t, BUF_BASE), 1);
    assert_eq!(t.read(BUF_BASE + 12, 60), f);
    assert_eq!(
        tally,
        RxTally {
            frames: 1,
            bytes: 60,
            buffers: 1,
            dropped_too_large: 0
        }
    );
}

#[test]
fn chained_buffers_split_header_and_frame_anywhere() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    // Header split over two descriptors, frame over three.
    let head = t.post(&[
        Buf(BUF_BASE, 5, true),
        Buf(BUF_BASE + 0x100, 10, true),
        Buf(BUF_BASE + 0x200, 2000, true),
    ]);
    let mut q = t.queue();
    let f = frame(1514, 3);
    deliver_batch(
        &mem,
        &mut q,
        [f.as_slice()],
        Framing::Bare,
        false,
        &mut RxScratch::default(),
        &mut RxTally::default(),
    )
    .unwrap();
    assert_eq!(t.used(0), vec![(u32::from(head), 12 + 1514)]);
    let mut got = t.read(BUF_BASE, 5);
    got.extend(t.read(BUF_BASE + 0x100, 10));
    got.extend(t.read(BUF_BASE + 0x200, 1511));
    assert_eq!(&got[10..12], &1u16.to_le_bytes());
    assert_eq!(&got[12..], f.as_slice());
}

#[test]
fn mergeable_frame_spans_several_chains() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let heads: Vec<u16> = (0..4)
        .map(|i| t.post(&[Buf(BUF_BASE + i * 0x1000, 512, true)]))
        .collect();
    let mut q = t.queue();
    let f = frame(1400, 9);
    let mut tally = RxTally::default();
    deliver_batch(
        &mem,
        &mut q,
        [f.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut tally,
    )
    .unwrap();
    // 1412 bytes over 512-byte buffers: 512 + 512 + 388.
    let used = t.used(0);
    assert_eq!(
        used,
        vec![
            (heads[0] as u32, 512),
            (heads[1] as u32, 512),
            (heads[2] as u32, 388)
        ]
    );
    assert_eq!(num_buffers(&t, BUF_BASE), 3);
    let mut got = t.read(BUF_BASE + 12, 500);
    got.extend(t.read(BUF_BASE + 0x1000, 512));
    got.extend(t.read(BUF_BASE + 0x2000, 388));
    assert_eq!(got, f);
    assert_eq!(tally.buffers, 3);
    assert_eq!(
        q.next_avail(),
        3,
        "the fourth buffer stays for the next frame"
    );
}

#[test]
fn too_few_buffers_puts_chains_back_and_keeps_the_frame() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    t.post(&[Buf(BUF_BASE, 512, true)]);
    let mut q = t.queue();
    let small = frame(100, 1);
    let big = frame(1400, 2);
    let n = deliver_batch(
        &mem,
        &mut q,
        [big.as_slice(), small.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut RxTally::default(),
    )
    .unwrap();
    assert_eq!(n, 0, "the big frame waits; order is kept");
    assert!(t.used(0).is_empty());
    assert_eq!(q.next_avail(), 0);
    // Once the guest posts more, it goes through.
    t.post(&[Buf(BUF_BASE + 0x1000, 1024, true)]);
    let n = deliver_batch(
        &mem,
        &mut q,
        [big.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut RxTally::default(),
    )
    .unwrap();
    assert_eq!(n, 1);
    assert_eq!(t.used(0).len(), 2);
}

#[test]
fn frames_with_their_header_land_like_bare_ones() {
    // The same frames, bare into one queue and header-first into another (a buffer
    // of 512 bytes, so the large one spans three chains), must leave the same bytes
    // and used entries in both.
    let small = frame(60, 3);
    let large = frame(1400, 4);
    let with_header = |f: &[u8]| {
        let mut v = rx_header(1).to_vec();
        v.extend_from_slice(f);
        v
    };
    let (small_h, large_h) = (with_header(&small), with_header(&large));
    let mut seen = Vec::new();
    for (framing, frames) in [
        (Framing::Bare, [small.as_slice(), large.as_slice()]),
        (
            Framing::WithHeader,
            [small_h.as_slice(), large_h.as_slice()],
        ),
    ] {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        for i in 0..5 {
            t.post(&[Buf(BUF_BASE + i * 0x1000, 512, true)]);
        }
        let mut q = t.queue();
        let mut tally = RxTally::default();
        let n = deliver_batch(
            &mem,
            &mut q,
            frames,
            framing,
            true,
            &mut RxScratch::default(),
            &mut tally,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!((tally.frames, tally.bytes, tally.buffers), (2, 1460, 4));
        let bytes: Vec<Vec<u8>> = (0..4).map(|i| t.read(BUF_BASE + i * 0x1000, 512)).collect();
        seen.push((t.used(0), bytes));
    }
    assert_eq!(seen[0], seen[1]);
    let (used, bytes) = &seen[1];
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [72, 512, 512, 388]
    );
    assert_eq!(&bytes[0][12..72], small.as_slice());
    assert_eq!(u16::from_le_bytes([bytes[1][10], bytes[1][11]]), 3);
    assert_eq!(&bytes[1][12..], &large[..500]);
}

#[test]
fn frame_larger_than_a_buffer_without_mrg_rxbuf_is_dropped_and_buffer_kept() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    t.post(&[Buf(BUF_BASE, 256, true)]);
    let mut q = t.queue();
    let big = frame(1000, 0);
    let small = frame(64, 0);
    let mut tally = RxTally::default();
    let n = deliver_batch(
        &mem,
        &mut q,
        [big.as_slice(), small.as_slice()],
        Framing::Bare,
        false,
        &mut RxScratch::default(),
        &mut tally,
    )
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(tally.dropped_too_large, 1);
    assert_eq!(tally.frames, 1);
    assert_eq!(
        t.used(0),
        vec![(0, 76)],
        "the buffer carried the small frame"
    );
}

#[test]
fn indirect_table_is_followed() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let head = t.post_indirect(
        0x8000,
        &[Buf(BUF_BASE, 12, true), Buf(BUF_BASE + 0x100, 1600, true)],
    );
    let mut q = t.queue();
    let f = frame(1500, 5);
    deliver_batch(
        &mem,
        &mut q,
        [f.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut RxTally::default(),
    )
    .unwrap();
    assert_eq!(t.used(0), vec![(u32::from(head), 1512)]);
    assert_eq!(t.read(BUF_BASE + 0x100, 1500), f);
}

fn expect_error(descs: &[(u64, u32, u16, u16)]) -> QueueError {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    t.post_raw(descs);
    let mut q = t.queue();
    let f = frame(64, 0);
    deliver_batch(
        &mem,
        &mut q,
        [f.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut RxTally::default(),
    )
    .expect_err("malformed chain must be refused")
}

#[test]
fn malformed_chains_are_refused() {
    // Readable buffer in a receive chain.
    assert!(matches!(
        expect_error(&[(BUF_BASE, 2048, 0, 0)]),
        QueueError::Malformed { .. }
    ));
    // A chain whose next points back at itself.
    assert!(matches!(
        expect_error(&[(BUF_BASE, 4, W | N, 0)]),
        QueueError::Malformed { .. }
    ));
    // next outside the descriptor table.
    assert!(matches!(
        expect_error(&[(BUF_BASE, 4, W | N, 200)]),
        QueueError::Malformed { .. }
    ));
    // Buffer outside guest memory.
    assert!(matches!(
        expect_error(&[(MEM_SIZE as u64 - 8, 2048, W, 0)]),
        QueueError::OutOfMemory { .. }
    ));
    assert!(matches!(
        expect_error(&[(u64::MAX - 100, 2048, W, 0)]),
        QueueError::OutOfMemory { .. }
    ));
    // Zero-length only.
    assert!(matches!(
        expect_error(&[(BUF_BASE, 0, W, 0)]),
        QueueError::Malformed { .. }
    ));
    // Too small for the header.
    assert!(matches!(
        expect_error(&[(BUF_BASE, 8, W, 0)]),
        QueueError::Malformed { .. }
    ));
}

/// A batch whose second chain is malformed: the first frame went into the guest's first chain
/// and the ring moved past it, so its used entry goes out with the error; otherwise the guest
/// never gets that buffer back and the daemon counts a frame the guest never saw.
#[test]
fn frames_delivered_before_a_malformed_chain_are_published() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let head = t.post(&[Buf(BUF_BASE, 2048, true)]);
    // Readable: not a receive buffer.
    t.post_raw(&[(BUF_BASE + 4096, 2048, 0, 0)]);
    let mut q = t.queue();
    let (a, b) = (frame(60, 1), frame(60, 2));
    let mut tally = RxTally::default();
    let err = deliver_batch(
        &mem,
        &mut q,
        [a.as_slice(), b.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut tally,
    )
    .expect_err("the second chain is malformed");
    assert!(matches!(err, QueueError::Malformed { .. }), "{err:?}");
    assert_eq!(t.used(0), vec![(u32::from(head), 72)]);
    assert_eq!(t.read(BUF_BASE + 12, 60), a);
    assert_eq!(tally.frames, 1);
}

#[test]
fn corrupt_avail_index_is_refused() {
    let mem = memory();
    let t = TestQueue::new(&mem);
    let mut q = t.queue();
    let avail = t.mock.avail_addr().0;
    t.write(avail + 2, &100u16.to_le_bytes());
    let f = frame(64, 0);
    let err = deliver_batch(
        &mem,
        &mut q,
        [f.as_slice()],
        Framing::Bare,
        true,
        &mut RxScratch::default(),
        &mut RxTally::default(),
    );
    assert_eq!(err, Err(QueueError::AvailIndex));
}

/// The pages the used ring's index and its entries `from..to` live on.
fn used_pages(t: &TestQueue<'_>, from: u64, to: u64) -> Vec<u64> {
    use crate::datapath::dirty_log::tests::pages_of;
    let used = t.mock.used_addr().0;
    let mut pages = pages_of(used + 2, 2);
    for i in from..to {
        pages.extend(pages_of(used + 4 + 8 * i, 8));
    }
    pages
}

/// Delivers one frame with fresh scratch state; how many frames went in.
fn deliver_one(
    mem: &GuestMemory,
    q: &mut virtio_queue::Queue,
    f: &[u8],
    framing: Framing,
    mrg_rxbuf: bool,
) -> usize {
    let (mut scratch, mut tally) = (RxScratch::default(), RxTally::default());
    deliver_batch(mem, q, [f], framing, mrg_rxbuf, &mut scratch, &mut tally).unwrap()
}

fn sorted(mut pages: Vec<u64>) -> Vec<u64> {
    pages.sort_unstable();
    pages.dedup();
    pages
}

#[test]
fn received_data_and_headers_are_logged_across_pages_and_regions() {
    use crate::datapath::dirty_log::tests::{pages_of, Logged};
    use vm_memory::GuestAddress;
    // A buffer that starts a little before a region (and page) boundary: the header and the
    // frame's start land in the first region, the rest two pages further into the second.
    let cut = BUF_BASE + 0x2_0000;
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), cut as usize),
        (GuestAddress(cut), MEM_SIZE - cut as usize),
    ])
    .unwrap();
    let mut t = TestQueue::new(&mem);
    let at = cut - 0x100;
    t.post(&[Buf(at, 0x3000, true)]);
    let mut q = t.queue();
    let logged = Logged::start(&mem);
    let f = frame(0x2000, 5);
    let n = deliver_one(&mem, &mut q, &f, Framing::Bare, false);
    assert_eq!(n, 1);
    assert_eq!(t.read(at + 12, f.len()), f);
    let want = sorted([pages_of(at, 12 + 0x2000), used_pages(&t, 0, 1)].concat());
    assert_eq!(logged.pages(), want);
    assert!(
        want.contains(&((cut + 0x1000) / 0x1000)),
        "reaches the second region"
    );
}

#[test]
fn merged_buffers_log_every_chain_and_the_late_num_buffers() {
    use crate::datapath::dirty_log::tests::{pages_of, Logged};
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    // The first chain's header sits on its own page (split off by a 12-byte descriptor), so
    // num_buffers, written after the last chain, is logged only if that write is.
    let hdr = BUF_BASE + 0x4000;
    let (a, b) = (BUF_BASE + 0x8000, BUF_BASE + 0xc000);
    t.post(&[Buf(hdr, 12, true), Buf(a, 1000, true)]);
    t.post(&[Buf(b, 2048, true)]);
    let mut q = t.queue();
    let logged = Logged::start(&mem);
    let f = frame(1514, 9);
    deliver_one(&mem, &mut q, &f, Framing::Bare, true);
    assert_eq!(num_buffers(&t, hdr), 2);
    let want = sorted(
        [
            pages_of(hdr, 12),
            pages_of(a, 1000),
            pages_of(b, 1514 - 1000),
            used_pages(&t, 0, 2),
        ]
        .concat(),
    );
    assert_eq!(logged.pages(), want);
    // Now the same again with logging off: nothing new is marked.
    logged.clear();
    crate::datapath::dirty_log::set_log_all(&mem, false);
    t.post(&[Buf(BUF_BASE + 0x1_0000, 2048, true)]);
    let mut q2 = t.queue();
    q2.set_next_avail(2);
    q2.set_next_used(2);
    deliver_one(&mem, &mut q2, &f, Framing::Bare, true);
    assert_eq!(t.used(2).len(), 1, "the frame went in");
    assert!(logged.pages().is_empty());
}

#[test]
fn switched_frames_with_their_header_are_logged() {
    use crate::datapath::device::rx_header;
    use crate::datapath::dirty_log::tests::{pages_of, Logged};
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let at = BUF_BASE + 0x2ff0;
    t.post(&[Buf(at, 2048, true)]);
    let mut q = t.queue();
    let logged = Logged::start(&mem);
    let mut f = rx_header(1).to_vec();
    f.extend(frame(100, 2));
    deliver_one(&mem, &mut q, &f, Framing::WithHeader, true);
    let want = sorted([pages_of(at, f.len() as u64), used_pages(&t, 0, 1)].concat());
    assert_eq!(logged.pages(), want);
}

/// Nanoseconds per frame of `deliver_batch` (16 frames of `len` bytes per batch), with the
/// rings set up afresh outside the timed part.
fn rx_ns_per_frame(len: usize, setup: impl Fn(&GuestMemory)) -> f64 {
    let mem = memory();
    setup(&mem);
    let f = frame(len, 1);
    let frames: Vec<&[u8]> = (0..16).map(|_| f.as_slice()).collect();
    let (mut scratch, mut tally) = (RxScratch::default(), RxTally::default());
    let rounds = 20_000;
    let mut spent = std::time::Duration::ZERO;
    for _ in 0..rounds {
        let mut t = TestQueue::new(&mem);
        for i in 0..16 {
            t.post(&[Buf(BUF_BASE + 0x1000 * i, 2048, true)]);
        }
        let mut q = t.queue();
        let start = std::time::Instant::now();
        let n = deliver_batch(
            &mem,
            &mut q,
            frames.iter().copied(),
            Framing::Bare,
            true,
            &mut scratch,
            &mut tally,
        )
        .unwrap();
        spent += start.elapsed();
        assert_eq!(n, 16);
    }
    spent.as_nanos() as f64 / f64::from(rounds * 16)
}

#[test]
#[ignore = "a measurement: cargo test --release -p xvdpa --lib rx_cost -- --ignored --nocapture"]
fn rx_cost_per_frame() {
    // RX_COST_MODES=off (or on) measures one mode alone, e.g. under callgrind.
    let modes = std::env::var("RX_COST_MODES").unwrap_or_else(|_| "off,on".into());
    for len in [60, 1514] {
        for mode in modes.split(',') {
            let on = mode == "on";
            let ns: Vec<f64> = (0..5)
                .map(|_| {
                    rx_ns_per_frame(len, |mem| {
                        if on {
                            crate::datapath::dirty_log::tests::Logged::start(mem);
                        }
                    })
                })
                .collect();
            println!("rx {len} B, logging {mode}: {ns:.1?} ns/frame");
        }
    }
}
