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
