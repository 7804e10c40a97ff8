//! Unit tests of `datapath::tx` over virtio-queue's mock queues.
use super::*;
use crate::datapath::offload::{checksum, GSO_ECN, GSO_TCPV4, GSO_TCPV6};
use crate::datapath::testing::packets::{build, payload, Flow};
use crate::datapath::testing::{memory, Buf, TestQueue, BUF_BASE, MEM_SIZE};
use crate::datapath::zero_copy_tx::{MAX_PIECES, SLOT_HEADERS};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

/// NIC buffers as plain vectors.
struct VecBuffers {
    free: usize,
    current: Vec<u8>,
    sent: Vec<Vec<u8>>,
    /// Frames over one buffer go whole to `submit_frame` (multi-buffer).
    multi_buffer: bool,
    /// Checksums may be left to the "NIC" (`submit_partial`), which completes them here as
    /// the kernel does for a CHECKSUM_PARTIAL skb.
    nic_checksums: bool,
    /// (start, offset) of every checksum left to it.
    partial: Vec<(usize, usize)>,
}

impl VecBuffers {
    fn new(free: usize) -> Self {
        VecBuffers {
            free,
            current: vec![0; 2048],
            sent: Vec::new(),
            multi_buffer: false,
            nic_checksums: false,
            partial: Vec::new(),
        }
    }

    /// `free` buffers whose "NIC" completes checksums.
    fn nic_checksums(free: usize) -> Self {
        VecBuffers {
            nic_checksums: true,
            ..VecBuffers::new(free)
        }
    }

    /// `free` buffers of 2048 bytes, a larger frame spread over several.
    fn multi_buffer(free: usize) -> Self {
        VecBuffers {
            multi_buffer: true,
            ..VecBuffers::new(free)
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
    fn completes_checksums(&self) -> bool {
        self.nic_checksums
    }
    fn submit_partial(&mut self, len: usize, start: usize, offset: usize) -> Result<(), TxDrop> {
        assert!(
            self.nic_checksums,
            "a checksum left to a NIC that does not take it"
        );
        let mut frame = self.current[..len].to_vec();
        checksum::complete(&mut frame, start, offset);
        self.partial.push((start, offset));
        self.free -= 1;
        self.sent.push(frame);
        Ok(())
    }
    fn reserve(&mut self, n: usize) -> bool {
        self.free >= n
    }
    fn buffer_len(&self) -> usize {
        if self.multi_buffer {
            self.current.len()
        } else {
            usize::MAX
        }
    }
    fn submit_frame(&mut self, frame: &[u8]) -> Result<(), TxDrop> {
        let pieces = frame.len().div_ceil(self.current.len());
        if !self.multi_buffer || pieces > self.free {
            return Err(TxDrop::Oversized);
        }
        self.free -= pieces;
        self.sent.push(frame.to_vec());
        Ok(())
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// A 1500-byte MTU link, no offloads negotiated.
const PLAIN: TxLimits = TxLimits {
    max_frame: 1518,
    offloads: Offloads {
        csum: false,
        tso4: false,
        tso6: false,
        ecn: false,
    },
};

/// A 1500-byte MTU link, every offload negotiated.
const OFFLOADS: TxLimits = TxLimits {
    max_frame: 1518,
    offloads: Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    },
};

fn run(
    t: &TestQueue<'_>,
    q: &mut Queue,
    bufs: &mut impl TxBuffers,
    budget: usize,
) -> (Result<TxStop, QueueError>, TxTally) {
    run_with(t, q, bufs, budget, PLAIN)
}

fn run_with(
    t: &TestQueue<'_>,
    q: &mut Queue,
    bufs: &mut impl TxBuffers,
    budget: usize,
    limits: TxLimits,
) -> (Result<TxStop, QueueError>, TxTally) {
    let mut tally = TxTally::default();
    let r = transmit_batch(
        t.mem,
        q,
        bufs,
        limits,
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
    // 200 bytes are read whole before routing, 1514 in two steps: both gather alike.
    for size in [200usize, 1514] {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        let f = frame(size, 2);
        let rest = size as u32 - 100;
        // Header split 4 + 8, frame split 100 + rest.
        t.write(BUF_BASE + 0x1000, &f[..100]);
        t.write(BUF_BASE + 0x2000, &f[100..]);
        t.post(&[
            Buf(BUF_BASE, 4, false),
            Buf(BUF_BASE + 0x100, 8, false),
            Buf(BUF_BASE + 0x1000, 100, false),
            Buf(BUF_BASE + 0x2000, rest, false),
        ]);
        t.post_indirect(
            0x9000,
            &[
                Buf(BUF_BASE, 12, false),
                Buf(BUF_BASE + 0x1000, 100, false),
                Buf(BUF_BASE + 0x2000, rest, false),
            ],
        );
        let mut q = t.queue();
        let mut bufs = VecBuffers::new(8);
        let (r, tally) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        assert_eq!(bufs.sent, vec![f.clone(), f], "{size}-byte frame");
        assert_eq!(tally.frames, 2);
    }
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

/// A sink that routes by the destination's first byte: 0xd0 + n goes direct with tag n,
/// 0xdd is dropped as spoofed, anything else is copied.
struct RoutingBuffers {
    nic: VecBuffers,
    routed: usize,
    direct: Vec<(u32, Vec<u8>)>,
}

impl TxBuffers for RoutingBuffers {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.nic.next_buffer()
    }
    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        self.nic.submit(len)
    }
    fn route(&mut self, eth: &[u8], len: usize) -> Route {
        self.routed += 1;
        assert_eq!(eth.len(), ETH_HLEN);
        assert!(len >= ETH_HLEN);
        match eth[0] {
            0xdd => Route::Drop(TxDrop::Spoofed),
            b @ 0xd0..=0xd3 => Route::Direct(u32::from(b - 0xd0)),
            _ => Route::Copy,
        }
    }
    fn reserve(&mut self, n: usize) -> bool {
        self.nic.reserve(n)
    }
    fn deliver_direct(&mut self, frames: &[DirectFrame], arena: &mut [u8]) {
        self.direct.extend(
            frames
                .iter()
                .map(|f| (f.tag, f.with_rx_header(arena).to_vec())),
        );
    }
}

#[test]
fn direct_frames_skip_nic_buffers_and_keep_their_order() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let mut sent = Vec::new();
    for (i, (dst, len)) in [
        (0xd1u8, 60usize),
        (0x02, 70),
        (0xd0, 1514),
        (0xdd, 60),
        (0xd1, 61),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = frame(len, i as u8);
        f[0] = dst;
        let at = BUF_BASE + 0x1000 * i as u64;
        t.write(at, &[0u8; 12]);
        t.write(at + 12, &f);
        t.post(&[Buf(at, 12 + len as u32, false)]);
        sent.push(f);
    }
    let mut q = t.queue();
    // One NIC buffer: enough for the one copied frame; direct frames need none.
    let mut bufs = RoutingBuffers {
        nic: VecBuffers::new(1),
        routed: 0,
        direct: Vec::new(),
    };
    let (r, tally) = run(&t, &mut q, &mut bufs, 64);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!(bufs.routed, 5, "each frame is routed once");
    assert_eq!(bufs.nic.sent, vec![sent[1].clone()]);
    let with_header = |f: &Vec<u8>| [&rx_header(1)[..], f].concat();
    assert_eq!(
        bufs.direct,
        vec![
            (1, with_header(&sent[0])),
            (0, with_header(&sent[2])),
            (1, with_header(&sent[4]))
        ]
    );
    assert_eq!((tally.frames, tally.dropped_spoofed), (4, 1));
    assert_eq!(t.used(0).len(), 5);
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

/// A sink that, like a second vCPU of a hostile guest, rewrites the frame's source MAC in
/// guest memory right after the header was examined (`route`), before the frame is copied.
struct FlippingBuffers<'m> {
    inner: VecBuffers,
    mem: &'m GuestMemory,
    /// Where the frame's source MAC lies in guest memory.
    src_at: u64,
    seen_sources: Vec<[u8; 6]>,
}

impl TxBuffers for FlippingBuffers<'_> {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.inner.next_buffer()
    }
    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        self.inner.submit(len)
    }
    fn route(&mut self, eth: &[u8], _len: usize) -> Route {
        self.seen_sources.push(eth[6..12].try_into().unwrap());
        self.mem
            .write_slice(&[0x66; 6], GuestAddress(self.src_at))
            .unwrap();
        Route::Copy
    }
}

/// What reaches the NIC carries the Ethernet header the sink examined, whatever the guest
/// wrote meanwhile: anti-spoofing and the switch decide on that header, so a frame whose
/// source changed between the check and the copy must not leave with the new one.
#[test]
fn the_header_that_was_checked_is_the_header_that_is_sent() {
    let mem = memory();
    for len in [60usize, 1500] {
        let mut t = TestQueue::new(&mem);
        let f = frame(len, 7);
        t.write(BUF_BASE, &[0u8; 12]);
        t.write(BUF_BASE + 12, &f);
        t.post(&[Buf(BUF_BASE, 12 + len as u32, false)]);
        let mut q = t.queue();
        let mut bufs = FlippingBuffers {
            inner: VecBuffers::new(8),
            mem: &mem,
            src_at: BUF_BASE + 12 + 6,
            seen_sources: Vec::new(),
        };
        let (r, _) = run(&t, &mut q, &mut bufs, 64);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        assert_eq!(
            bufs.seen_sources,
            vec![<[u8; 6]>::try_from(&f[6..12]).unwrap()]
        );
        assert_eq!(bufs.inner.sent.len(), 1);
        let sent = &bufs.inner.sent[0];
        assert_eq!(sent[6..12], f[6..12], "source MAC of the {len}-byte frame");
        assert!(*sent == f, "the rest of the {len}-byte frame");
    }
}

/// A guest's TSO request for `frame` (a TCP frame etherparse built, checksums complete): the
/// header as Linux's virtio-net fills it, and the TCP checksum field holding the
/// pseudo-header sum as a guest leaves it.
fn guest_tso(frame: &[u8], ipv6: bool, mss: u16) -> (Vec<u8>, Vec<u8>) {
    let (l3, l4) = (14, if ipv6 { 54 } else { 34 });
    let mut f = frame.to_vec();
    let tcp_len = f.len() - l4;
    let pseudo = if ipv6 {
        checksum::pseudo_header(&f[l3 + 8..l3 + 24], &f[l3 + 24..l3 + 40], 6, tcp_len)
    } else {
        checksum::pseudo_header(&f[l3 + 12..l3 + 16], &f[l3 + 16..l3 + 20], 6, tcp_len)
    };
    f[l4 + 16..l4 + 18].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    let hdr = NetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: if ipv6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (l4 + 32) as u16,
        gso_size: mss,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    (hdr.to_bytes(0).to_vec(), f)
}

/// Posts header and frame as a two-descriptor chain at `at`.
fn post_frame(t: &mut TestQueue<'_>, at: u64, hdr: &[u8], frame: &[u8]) -> u16 {
    t.write(at, hdr);
    t.write(at + 0x100, frame);
    t.post(&[
        Buf(at, hdr.len() as u32, false),
        Buf(at + 0x100, frame.len() as u32, false),
    ])
}

/// Sends a TSO frame of `payload_len` bytes with MSS `mss` (by IP version) to a sink of
/// `bufs` and checks it arrives as exactly the segments an independent build makes; returns
/// their lengths.
fn tso_to_the_nic(
    payload_len: usize,
    mss: [usize; 2],
    limits: TxLimits,
    bufs: impl Fn() -> VecBuffers,
) -> Vec<Vec<usize>> {
    tso_to_the_nic_tallied(payload_len, mss, limits, bufs)
        .into_iter()
        .map(|(lens, _, _)| lens)
        .collect()
}

/// One IP version's TSO frame at the NIC: segment lengths, the batch's tally, and the
/// (start, offset) of each checksum left to the sink.
type TsoSent = (Vec<usize>, TxTally, Vec<(usize, usize)>);

/// [`tso_to_the_nic`], with each IP version's tally and the checksum requests its sink got.
fn tso_to_the_nic_tallied(
    payload_len: usize,
    mss: [usize; 2],
    limits: TxLimits,
    bufs: impl Fn() -> VecBuffers,
) -> Vec<TsoSent> {
    let mut lens = Vec::new();
    for ipv6 in [false, true] {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        let f = Flow {
            ipv6,
            fin: true,
            ..Flow::default()
        };
        let data = payload(payload_len);
        let mss = mss[usize::from(ipv6)];
        let big = build(&f, f.seq, f.id, true, true, false, &data);
        let (hdr, frame) = guest_tso(&big, ipv6, mss as u16);
        post_frame(&mut t, BUF_BASE, &hdr, &frame);
        let mut q = t.queue();
        let mut bufs = bufs();
        let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, limits);
        assert_eq!(r, Ok(TxStop::RingEmpty));
        let want: Vec<Vec<u8>> = data
            .chunks(mss)
            .enumerate()
            .map(|(i, c)| {
                let last = (i + 1) * mss >= data.len();
                let seq = f.seq.wrapping_add((i * mss) as u32);
                build(&f, seq, f.id.wrapping_add(i as u16), last, last, false, c)
            })
            .collect();
        let sent: Vec<usize> = bufs.sent.iter().map(Vec::len).collect();
        assert!(bufs.sent == want, "ipv6 {ipv6}: sent {sent:?}, {tally:?}");
        assert_eq!((tally.frames, tally.bytes), (1, frame.len() as u64));
        assert_eq!((tally.gso_frames, tally.segments), (1, want.len() as u64));
        lens.push((sent, tally, bufs.partial));
    }
    lens
}

#[test]
fn segments_leave_their_tcp_checksums_to_a_nic_that_completes_them() {
    for (i, (lens, tally, partial)) in
        tso_to_the_nic_tallied(20_000, [1448, 1428], OFFLOADS, || {
            VecBuffers::nic_checksums(64)
        })
        .into_iter()
        .enumerate()
    {
        // Completed by the "NIC", every segment equals the independent build (checked in
        // `tso_to_the_nic_tallied`); none was summed here.
        let l4 = if i == 0 { 34 } else { 54 };
        assert_eq!(partial, vec![(l4, 16); lens.len()]);
        assert_eq!(tally.csum_offloaded, lens.len() as u64);
        assert_eq!(tally.csum_computed, 0);
    }
}

#[test]
fn a_tso_frame_to_the_nic_becomes_mtu_sized_segments() {
    let lens = tso_to_the_nic(20_000, [1448, 1428], OFFLOADS, || VecBuffers::new(64));
    assert!(lens.iter().flatten().all(|&n| n <= 1514));
}

/// Sends a TCP frame of `payload_len` bytes with a partial checksum to `bufs` and checks it
/// arrives once, its checksum completed (by the daemon, or by a sink that takes checksums).
/// Posts a TCP frame of `payload_len` bytes whose checksum the guest left partial
/// (NEEDS_CSUM); returns the frame with its checksum complete.
fn post_partial_checksum(t: &mut TestQueue<'_>, payload_len: usize) -> Vec<u8> {
    let want = build(
        &Flow::default(),
        1,
        2,
        false,
        true,
        false,
        &payload(payload_len),
    );
    let (_, frame) = guest_tso(&want, false, 1448);
    let hdr = NetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..NetHeader::default()
    };
    post_frame(t, BUF_BASE, &hdr.to_bytes(0), &frame);
    want
}

fn partial_checksum_to_the_nic(
    payload_len: usize,
    limits: TxLimits,
    mut bufs: VecBuffers,
) -> (TxTally, VecBuffers) {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let want = post_partial_checksum(&mut t, payload_len);
    let mut q = t.queue();
    let (_, tally) = run_with(&t, &mut q, &mut bufs, 64, limits);
    assert_eq!(bufs.sent, vec![want]);
    (tally, bufs)
}

#[test]
fn a_partial_checksum_to_the_nic_is_completed() {
    let (tally, _) = partial_checksum_to_the_nic(1000, OFFLOADS, VecBuffers::new(8));
    assert_eq!((tally.csum_computed, tally.csum_offloaded), (1, 0));
}

#[test]
fn a_partial_checksum_is_left_to_a_nic_that_completes_it() {
    let (tally, bufs) = partial_checksum_to_the_nic(1000, OFFLOADS, VecBuffers::nic_checksums(8));
    assert_eq!((tally.csum_computed, tally.csum_offloaded), (0, 1));
    assert_eq!(bufs.partial, vec![(34, 16)]);
}

#[test]
fn a_tso_frame_waits_until_all_its_segments_have_buffers() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(5000));
    let (hdr, frame) = guest_tso(&big, false, 1448);
    post_frame(&mut t, BUF_BASE, &hdr, &frame);
    let mut q = t.queue();
    // Four segments, three buffers: nothing goes, the chain stays in the ring.
    let mut bufs = VecBuffers::new(3);
    let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, OFFLOADS);
    assert_eq!(r, Ok(TxStop::NoBuffers));
    assert!(bufs.sent.is_empty());
    assert_eq!(tally, TxTally::default());
    assert!(t.used(0).is_empty());
    bufs.free = 4;
    let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, OFFLOADS);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!((bufs.sent.len(), tally.segments), (4, 4));
    assert_eq!(t.used(0).len(), 1);
}

#[test]
fn offload_requests_not_negotiated_or_malformed_are_dropped() {
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(5000));
    let (hdr, frame) = guest_tso(&big, false, 1448);
    let parsed = NetHeader::parse(hdr[..12].try_into().unwrap());
    let cases: Vec<(NetHeader, TxLimits, &str)> = vec![
        (parsed, PLAIN, "TSO without HOST_TSO4"),
        (
            NetHeader {
                gso_type: GSO_TCPV4 | GSO_ECN,
                ..parsed
            },
            TxLimits {
                offloads: Offloads {
                    ecn: false,
                    ..OFFLOADS.offloads
                },
                ..OFFLOADS
            },
            "ECN without HOST_ECN",
        ),
        (
            NetHeader {
                gso_size: 0,
                ..parsed
            },
            OFFLOADS,
            "gso_size 0",
        ),
        (
            NetHeader {
                gso_size: 1480,
                ..parsed
            },
            OFFLOADS,
            "segments over the MTU",
        ),
        (
            NetHeader {
                gso_type: GSO_TCPV6,
                ..parsed
            },
            OFFLOADS,
            "IPv4 frame as TCPV6",
        ),
        (
            NetHeader {
                gso_type: 3,
                ..parsed
            },
            OFFLOADS,
            "UFO",
        ),
    ];
    for (hdr, limits, what) in cases {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        post_frame(&mut t, BUF_BASE, &hdr.to_bytes(0), &frame);
        let mut q = t.queue();
        let mut bufs = VecBuffers::new(64);
        let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, limits);
        assert_eq!(r, Ok(TxStop::RingEmpty), "{what}");
        assert!(bufs.sent.is_empty(), "{what}");
        assert_eq!((tally.frames, tally.dropped_offload), (0, 1), "{what}");
        assert_eq!(t.used(0).len(), 1, "{what}");
    }
    // A partial checksum whose field lies past the end of the frame.
    let small = build(&Flow::default(), 1, 1, false, true, false, &payload(100));
    let bad = NetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: small.len() as u16 - 34 - 1,
        ..NetHeader::default()
    };
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    post_frame(&mut t, BUF_BASE, &bad.to_bytes(0), &small);
    let mut q = t.queue();
    let mut bufs = VecBuffers::new(64);
    let (_, tally) = run_with(&t, &mut q, &mut bufs, 64, OFFLOADS);
    assert!(bufs.sent.is_empty());
    assert_eq!(tally.dropped_offload, 1);

    // A TSO frame over 64 KiB is oversized whatever it asks.
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    t.post(&[Buf(BUF_BASE, 12 + MAX_GSO_FRAME as u32 + 1, false)]);
    t.write(BUF_BASE, &hdr[..12]);
    let mut q = t.queue();
    let (_, tally) = run_with(&t, &mut q, &mut VecBuffers::new(64), 64, OFFLOADS);
    assert_eq!(tally.dropped_oversized, 1);
}

#[test]
fn a_tso_frame_to_another_port_keeps_its_checked_request() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let f = Flow {
        seq: 9,
        ..Flow::default()
    };
    let mut big = build(&f, 9, 1, false, true, false, &payload(5000));
    big[0] = 0xd1; // routed direct, tag 1
    let (hdr, frame) = guest_tso(&big, false, 1448);
    post_frame(&mut t, BUF_BASE, &hdr, &frame);
    let mut q = t.queue();
    let mut bufs = RoutingBuffers {
        nic: VecBuffers::new(0),
        routed: 0,
        direct: Vec::new(),
    };
    let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, OFFLOADS);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!((tally.frames, tally.segments), (1, 0));
    let (tag, got) = &bufs.direct[0];
    assert_eq!(*tag, 1);
    let mut want_hdr = NetHeader::parse(hdr[..12].try_into().unwrap()).to_bytes(1);
    want_hdr[0] = F_NEEDS_CSUM;
    assert_eq!(&got[..12], &want_hdr, "the request, num_buffers 1");
    assert_eq!(&got[12..], &frame[..]);
}

/// A 9000-byte MTU link, every offload negotiated.
const JUMBO: TxLimits = TxLimits {
    max_frame: 9014,
    ..OFFLOADS
};

#[test]
fn jumbo_frames_go_whole_to_a_sink_whose_buffers_are_smaller() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let sizes = [60usize, 2048, 2049, 5000, 9014];
    let mut at = BUF_BASE;
    let frames: Vec<Vec<u8>> = sizes.iter().map(|&n| frame(n, n as u8)).collect();
    for f in &frames {
        // Header and frame in three descriptors, so the frame is gathered, not just copied.
        t.write(at, &[0u8; 12]);
        t.write(at + 0x100, f);
        let half = f.len() / 2;
        t.post(&[
            Buf(at, 12, false),
            Buf(at + 0x100, half as u32, false),
            Buf(at + 0x100 + half as u64, (f.len() - half) as u32, false),
        ]);
        at += 0x4000;
    }
    let mut q = t.queue();
    let mut bufs = VecBuffers::multi_buffer(64);
    let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, JUMBO);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!(bufs.sent, frames);
    assert_eq!(bufs.free, 64 - (1 + 1 + 2 + 3 + 5));
    assert_eq!(tally.frames, sizes.len() as u64);
    assert_eq!(tally.bytes, sizes.iter().sum::<usize>() as u64);
}

#[test]
fn a_jumbo_frame_over_the_mtu_is_still_dropped() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let f = frame(9015, 1);
    post_frame(&mut t, BUF_BASE, &[0u8; 12], &f);
    let mut q = t.queue();
    let mut bufs = VecBuffers::multi_buffer(64);
    let (_, tally) = run_with(&t, &mut q, &mut bufs, 64, JUMBO);
    assert!(bufs.sent.is_empty());
    assert_eq!(tally.dropped_oversized, 1);
}

#[test]
fn a_jumbo_frame_waits_for_all_its_buffers() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let f = frame(9014, 2);
    post_frame(&mut t, BUF_BASE, &[0u8; 12], &f);
    let mut q = t.queue();
    // Five buffers needed, four free: nothing goes, the chain stays on the ring.
    let mut bufs = VecBuffers::multi_buffer(4);
    let (r, tally) = run_with(&t, &mut q, &mut bufs, 64, JUMBO);
    assert_eq!(r, Ok(TxStop::NoBuffers));
    assert!(bufs.sent.is_empty());
    assert_eq!((tally.frames, tally.dropped_oversized), (0, 0));
    assert!(t.used(0).is_empty());
    bufs.free = 5;
    let (r, _) = run_with(&t, &mut q, &mut bufs, 64, JUMBO);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!(bufs.sent, vec![f]);
}

#[test]
fn a_jumbo_frame_to_a_sink_without_multi_buffer_is_dropped() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    post_frame(&mut t, BUF_BASE, &[0u8; 12], &frame(5000, 3));
    let mut q = t.queue();
    let mut bufs = VecBuffers::new(64);
    let (_, tally) = run_with(&t, &mut q, &mut bufs, 64, JUMBO);
    assert!(bufs.sent.is_empty());
    assert_eq!(tally.dropped_oversized, 1);
}

#[test]
fn a_jumbo_frame_with_a_partial_checksum_is_completed_before_it_is_cut() {
    let (tally, _) = partial_checksum_to_the_nic(8000, JUMBO, VecBuffers::multi_buffer(8));
    assert_eq!(tally.csum_computed, 1);
    // Also where the NIC would complete checksums: a frame in pieces carries no request.
    let bufs = VecBuffers {
        nic_checksums: true,
        ..VecBuffers::multi_buffer(8)
    };
    let (tally, bufs) = partial_checksum_to_the_nic(8000, JUMBO, bufs);
    assert_eq!((tally.csum_computed, tally.csum_offloaded), (1, 0));
    assert!(bufs.partial.is_empty());
}

#[test]
fn a_tso_frame_on_a_jumbo_link_becomes_jumbo_segments() {
    // Ethernet, IP and TCP with timestamps: 66 or 86 bytes of headers in 9014.
    let lens = tso_to_the_nic(30_000, [8948, 8928], JUMBO, || VecBuffers::multi_buffer(64));
    assert!(lens.iter().all(|l| l[0] == 9014), "{lens:?}");
}

/// A chain held by [`InPlaceBuffers`]: its head, its slot's bytes and its guest pieces.
type HeldChain = (u16, Vec<u8>, Vec<(u64, u32)>);

/// A sink whose "NIC" reads guest memory: the test memory is the one file, guest address =
/// file offset. A frame sent in place is put back together from its slot and its pieces,
/// read from guest memory when the "NIC" sends it (`send_held`), as the kernel does.
struct InPlaceBuffers<'m> {
    copy: VecBuffers,
    file: crate::datapath::zero_copy_rx::GuestFile,
    mem: &'m GuestMemory,
    held: Vec<HeldChain>,
}

impl<'m> InPlaceBuffers<'m> {
    fn new(mem: &'m GuestMemory, free: usize) -> Self {
        let file = crate::datapath::zero_copy_rx::GuestFile::from_regions(
            vec![crate::datapath::zero_copy_rx::FileRegion {
                guest_addr: 0,
                len: MEM_SIZE as u64,
                file_offset: 0,
            }],
            MEM_SIZE as u64,
        );
        InPlaceBuffers {
            copy: VecBuffers::multi_buffer(free),
            file,
            mem,
            held: Vec::new(),
        }
    }

    /// The frames held, as the NIC reads them now.
    fn send_held(&self) -> Vec<Vec<u8>> {
        self.held
            .iter()
            .map(|(_, slot, pieces)| {
                let mut f = slot.clone();
                for &(addr, len) in pieces {
                    let mut piece = vec![0; len as usize];
                    self.mem.read_slice(&mut piece, GuestAddress(addr)).unwrap();
                    f.extend(piece);
                }
                f
            })
            .collect()
    }
}

impl TxBuffers for InPlaceBuffers<'_> {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.copy.next_buffer()
    }
    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        self.copy.submit(len)
    }
    fn buffer_len(&self) -> usize {
        self.copy.buffer_len()
    }
    fn in_place(&self) -> Option<PieceLayout<'_>> {
        Some(PieceLayout {
            file: &self.file,
            chunk_size: 2048,
            dma_page: None,
            max_pieces: MAX_PIECES,
        })
    }
    fn submit_in_place(
        &mut self,
        head: u16,
        headers: usize,
        pieces: &[(u64, u32)],
    ) -> Result<(), TxDrop> {
        self.copy.free -= 1;
        let slot = self.copy.current[..headers].to_vec();
        self.held.push((head, slot, pieces.to_vec()));
        Ok(())
    }
}

#[test]
fn a_frame_past_the_slot_headers_goes_from_guest_memory_and_its_chain_is_held() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    // A 1000-byte frame over three buffers (net header, 100 bytes, the rest), and a
    // 60-byte one, which is copied.
    let (big, small) = (frame(1000, 1), frame(60, 2));
    t.write(BUF_BASE, &[0; 12]);
    t.write(BUF_BASE + 0x100, &big[..100]);
    t.write(BUF_BASE + 0x1000, &big[100..]);
    let held = t.post(&[
        Buf(BUF_BASE, 12, false),
        Buf(BUF_BASE + 0x100, 100, false),
        Buf(BUF_BASE + 0x1000, 900, false),
    ]);
    let copied = post_frame(&mut t, BUF_BASE + 0x4000, &[0; 12], &small);
    let mut q = t.queue();
    let mut bufs = InPlaceBuffers::new(&mem, 8);
    let (stop, tally) = run(&t, &mut q, &mut bufs, 64);
    assert_eq!(stop.unwrap(), TxStop::RingEmpty);
    assert_eq!((tally.frames, tally.in_place, tally.bytes), (2, 1, 1060));
    assert_eq!(bufs.copy.sent, vec![small]);
    assert_eq!(bufs.send_held(), vec![big.clone()]);
    let (head, slot, pieces) = &bufs.held[0];
    assert_eq!((*head, slot.len()), (held, SLOT_HEADERS));
    assert_eq!(pieces, &vec![(BUF_BASE + 0x1000 + 28, 872)]);
    // Only the copied frame's chain is used; the held one waits for its completion.
    assert_eq!(t.used(0), vec![(u32::from(copied), 0)]);
    // The guest rewriting its buffer after the batch changes the payload the NIC reads,
    // never the headers the route was decided on.
    t.write(BUF_BASE + 0x100, &[0xee; 100]);
    t.write(BUF_BASE + 0x1000, &[0xee; 900]);
    let sent = &bufs.send_held()[0];
    assert_eq!(sent[..SLOT_HEADERS], big[..SLOT_HEADERS]);
    assert_eq!(sent[SLOT_HEADERS..], [0xee; 1000 - SLOT_HEADERS][..]);
}

#[test]
fn a_partial_checksum_of_a_frame_sent_in_place_is_completed_in_the_slot() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let want = post_partial_checksum(&mut t, 1000);
    let mut q = t.queue();
    let mut bufs = InPlaceBuffers::new(&mem, 8);
    let (_, tally) = run_with(&t, &mut q, &mut bufs, 64, OFFLOADS);
    assert_eq!((tally.in_place, tally.csum_computed), (1, 1));
    assert_eq!(bufs.send_held(), vec![want]);
    assert!(t.used(0).is_empty());
}

#[test]
fn without_a_free_slot_a_frame_waits_on_the_ring_for_one() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let big = frame(1000, 3);
    post_frame(&mut t, BUF_BASE, &[0; 12], &big);
    post_frame(&mut t, BUF_BASE + 0x1000, &[0; 12], &big);
    let mut q = t.queue();
    let mut bufs = InPlaceBuffers::new(&mem, 1);
    let (stop, tally) = run(&t, &mut q, &mut bufs, 64);
    assert_eq!(stop.unwrap(), TxStop::NoBuffers);
    assert_eq!((tally.in_place, q.next_avail()), (1, 1));
    assert!(t.used(0).is_empty());
    // A completion frees the slot: the second frame goes.
    bufs.copy.free = 1;
    let (stop, tally) = run(&t, &mut q, &mut bufs, 64);
    assert_eq!((stop.unwrap(), tally.in_place), (TxStop::RingEmpty, 1));
    assert_eq!(bufs.send_held(), vec![big.clone(), big]);
}

#[test]
fn a_frame_outside_the_guest_file_is_copied() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let big = frame(1000, 4);
    let head = post_frame(&mut t, BUF_BASE, &[0; 12], &big);
    let mut q = t.queue();
    let mut bufs = InPlaceBuffers::new(&mem, 8);
    // The file covers only the first part of the memory the frame lies in.
    bufs.file = crate::datapath::zero_copy_rx::GuestFile::from_regions(
        vec![crate::datapath::zero_copy_rx::FileRegion {
            guest_addr: 0,
            len: BUF_BASE + 0x200,
            file_offset: 0,
        }],
        BUF_BASE + 0x200,
    );
    let (_, tally) = run(&t, &mut q, &mut bufs, 64);
    assert_eq!((tally.frames, tally.in_place), (1, 0));
    assert_eq!(bufs.copy.sent, vec![big]);
    assert_eq!(t.used(0), vec![(u32::from(head), 0)]);
}

/// A sink whose NIC frames are [`VecBuffers`] and whose TSO frames go to the kernel whole
/// (`tx-gso=kernel`), tagged with `vlan` there.
struct KernelGsoBuffers {
    nic: VecBuffers,
    vlan: Option<u16>,
    /// The bytes the "kernel" takes now.
    room: usize,
}

impl TxBuffers for KernelGsoBuffers {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.nic.next_buffer()
    }
    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        self.nic.submit(len)
    }
    fn reserve(&mut self, n: usize) -> bool {
        self.nic.reserve(n)
    }
    fn kernel_gso(&self) -> Option<KernelGso> {
        Some(KernelGso {
            vlan: self.vlan,
            batch: 4,
            room: self.room,
        })
    }
}

fn kernel_sink(vlan: Option<u16>) -> KernelGsoBuffers {
    KernelGsoBuffers {
        nic: VecBuffers::new(64),
        vlan,
        room: usize::MAX,
    }
}

/// The kernel GSO frames one batch collected: (header, tag, bytes).
fn kernel_frames(scratch: &TxScratch) -> Vec<(NetHeader, Option<u16>, Vec<u8>)> {
    let (frames, arena) = scratch.kernel_gso_frames();
    frames
        .iter()
        .map(|f| (f.header, f.vlan, f.bytes(arena).to_vec()))
        .collect()
}

fn run_kernel(
    t: &TestQueue<'_>,
    q: &mut Queue,
    bufs: &mut KernelGsoBuffers,
    scratch: &mut TxScratch,
) -> (Result<TxStop, QueueError>, TxTally) {
    let mut tally = TxTally::default();
    let r = transmit_batch(t.mem, q, bufs, OFFLOADS, 64, scratch, &mut tally);
    (r, tally)
}

#[test]
fn a_tso_frame_for_the_kernel_goes_whole_with_the_daemons_header() {
    for (ipv6, ecn, vlan) in [
        (false, false, None),
        (true, false, None),
        (false, true, Some(100)),
        (true, false, Some(4000)),
    ] {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        let f = Flow {
            ipv6,
            tcp_options: true,
            cwr: ecn,
            ..Flow::default()
        };
        let big = build(&f, f.seq, f.id, false, true, ecn, &payload(30_000));
        let (hdr, frame) = guest_tso(&big, ipv6, 1400);
        // The guest's own header fields the daemon must not pass on as they are.
        let mut guest = NetHeader::parse(hdr[..12].try_into().unwrap());
        guest.hdr_len = 60;
        guest.csum_start = 20;
        if ecn {
            guest.gso_type |= GSO_ECN;
        }
        let head = post_frame(&mut t, BUF_BASE, &guest.to_bytes(0), &frame);
        let mut q = t.queue();
        let mut bufs = kernel_sink(vlan);
        let mut scratch = TxScratch::default();
        let (r, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
        let what = format!("ipv6 {ipv6} ecn {ecn} vlan {vlan:?}");
        assert_eq!(r, Ok(TxStop::RingEmpty), "{what}");
        assert!(bufs.nic.sent.is_empty(), "{what}: segmented");
        let shift = if vlan.is_some() { 4 } else { 0 };
        let l4 = if ipv6 { 54 } else { 34 };
        let base = if ipv6 { GSO_TCPV6 } else { GSO_TCPV4 };
        let want = NetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if ecn { base | GSO_ECN } else { base },
            hdr_len: (l4 + 32 + shift) as u16,
            gso_size: 1400,
            csum_start: (l4 + shift) as u16,
            csum_offset: 16,
        };
        assert_eq!(
            kernel_frames(&scratch),
            vec![(want, vlan, frame.clone())],
            "{what}"
        );
        assert_eq!(
            (tally.frames, tally.bytes, tally.gso_frames, tally.segments),
            (1, frame.len() as u64, 1, 0),
            "{what}"
        );
        assert_eq!(t.used(0), vec![(u32::from(head), 0)], "{what}");
    }
}

#[test]
fn a_tso_frame_for_the_kernel_leaves_its_ethernet_padding_behind() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(5000));
    let (hdr, mut frame) = guest_tso(&big, false, 1448);
    let packet = frame.len();
    frame.extend_from_slice(&[0xee; 30]);
    post_frame(&mut t, BUF_BASE, &hdr, &frame);
    let mut q = t.queue();
    let mut bufs = kernel_sink(None);
    let mut scratch = TxScratch::default();
    let (r, _) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    let got = kernel_frames(&scratch);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, frame[..packet]);
}

#[test]
fn a_tso_frame_of_one_segment_is_copied_not_handed_to_the_kernel() {
    // The kernel takes a "GSO" frame no longer than its MSS as a plain one, and refuses
    // gso_size 0xffff (GSO_BY_FRAGS) outright: the daemon copies such a frame itself.
    for mss in [1448u16, u16::MAX] {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        let small = build(&Flow::default(), 1, 1, false, true, false, &payload(1000));
        let (hdr, frame) = guest_tso(&small, false, mss);
        post_frame(&mut t, BUF_BASE, &hdr, &frame);
        let mut q = t.queue();
        let mut bufs = kernel_sink(None);
        let mut scratch = TxScratch::default();
        let (_, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
        assert!(kernel_frames(&scratch).is_empty(), "mss {mss}");
        assert_eq!(bufs.nic.sent, vec![small], "mss {mss}");
        assert_eq!(tally.segments, 1, "mss {mss}");
    }
}

#[test]
fn malformed_tso_requests_never_reach_the_kernel() {
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(5000));
    let (hdr, frame) = guest_tso(&big, false, 1448);
    let parsed = NetHeader::parse(hdr[..12].try_into().unwrap());
    let mut hdr_past_frame = frame.clone();
    // The IP packet claims more bytes than the frame has.
    hdr_past_frame[16..18].copy_from_slice(&9000u16.to_be_bytes());
    let mut tcp_past_frame = frame[..60].to_vec();
    tcp_past_frame[16..18].copy_from_slice(&46u16.to_be_bytes());
    tcp_past_frame[46] = 0xf0; // data offset 60 bytes: past the packet
    let cases: Vec<(NetHeader, &[u8], &str)> = vec![
        (
            NetHeader {
                gso_size: 0,
                ..parsed
            },
            &frame,
            "gso_size 0",
        ),
        (
            NetHeader {
                gso_size: 1,
                ..parsed
            },
            &frame,
            "gso_size 1: 5000 segments",
        ),
        (
            NetHeader {
                gso_size: 1480,
                ..parsed
            },
            &frame,
            "segments over the MTU",
        ),
        (
            NetHeader {
                hdr_len: 60_000,
                ..parsed
            },
            &frame,
            "hdr_len past the frame",
        ),
        (
            NetHeader {
                csum_start: 60_000,
                ..parsed
            },
            &frame,
            "csum_start past the frame",
        ),
        (
            NetHeader {
                csum_offset: frame.len() as u16 - 34 - 1,
                ..parsed
            },
            &frame,
            "checksum field past the frame",
        ),
        (
            NetHeader {
                csum_start: 4,
                ..parsed
            },
            &frame,
            "csum_start in the Ethernet header",
        ),
        (parsed, &hdr_past_frame, "IP length past the frame"),
        (parsed, &tcp_past_frame, "TCP header past the packet"),
        (
            NetHeader {
                gso_type: GSO_TCPV6,
                ..parsed
            },
            &frame,
            "IPv4 frame as TCPV6",
        ),
        (
            NetHeader {
                gso_type: 3,
                ..parsed
            },
            &frame,
            "UFO",
        ),
    ];
    for (hdr, frame, what) in cases {
        let mem = memory();
        let mut t = TestQueue::new(&mem);
        post_frame(&mut t, BUF_BASE, &hdr.to_bytes(0), frame);
        let mut q = t.queue();
        let mut bufs = kernel_sink(None);
        let mut scratch = TxScratch::default();
        let (r, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
        assert_eq!(r, Ok(TxStop::RingEmpty), "{what}");
        assert!(
            kernel_frames(&scratch).is_empty(),
            "{what}: sent to the kernel"
        );
        assert!(bufs.nic.sent.is_empty(), "{what}");
        assert_eq!((tally.frames, tally.dropped_offload), (0, 1), "{what}");
        assert_eq!(t.used(0).len(), 1, "{what}");
    }
}

#[test]
fn a_frame_for_the_nic_behind_a_kernel_gso_frame_waits_for_the_next_batch() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let first = frame(100, 1);
    let last = frame(200, 2);
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(5000));
    let (hdr, tso) = guest_tso(&big, false, 1448);
    let a = post_frame(&mut t, BUF_BASE, &[0u8; 12], &first);
    let g = post_frame(&mut t, BUF_BASE + 0x10000, &hdr, &tso);
    let b = post_frame(&mut t, BUF_BASE + 0x20000, &[0u8; 12], &last);
    let mut q = t.queue();
    let mut bufs = kernel_sink(None);
    let mut scratch = TxScratch::default();
    // The NIC frame before the GSO frame goes in this batch (kicked before the GSO frame is
    // sent); the one after it ends the batch and stays on the ring.
    let (r, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::Budget));
    assert_eq!(bufs.nic.sent, vec![first.clone()]);
    assert_eq!(kernel_frames(&scratch).len(), 1);
    assert_eq!(tally.frames, 2);
    assert_eq!(t.used(0), vec![(u32::from(a), 0), (u32::from(g), 0)]);
    let (r, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!(bufs.nic.sent, vec![first, last]);
    assert!(kernel_frames(&scratch).is_empty());
    assert_eq!(tally.frames, 1);
    assert_eq!(t.used(2), vec![(u32::from(b), 0)]);
}

#[test]
fn a_batch_holds_at_most_as_many_kernel_gso_frames_as_the_sink_sends_at_once() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(3000));
    let (hdr, tso) = guest_tso(&big, false, 1448);
    for i in 0..5 {
        post_frame(&mut t, BUF_BASE + 0x2000 * i as u64, &hdr, &tso);
    }
    let mut q = t.queue();
    let mut bufs = kernel_sink(None);
    let mut scratch = TxScratch::default();
    let (r, _) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::Budget));
    let got = kernel_frames(&scratch);
    assert_eq!(got.len(), 4);
    assert!(
        got.iter().all(|(_, _, f)| *f == tso),
        "every frame kept its own bytes"
    );
    let (r, _) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert_eq!(kernel_frames(&scratch).len(), 1);
}

#[test]
fn a_tso_frame_the_kernel_has_no_room_for_is_cut_by_the_daemon() {
    let mem = memory();
    let mut t = TestQueue::new(&mem);
    let big = build(&Flow::default(), 1, 1, false, true, false, &payload(3000));
    let (hdr, tso) = guest_tso(&big, false, 1448);
    let g1 = post_frame(&mut t, BUF_BASE, &hdr, &tso);
    let g2 = post_frame(&mut t, BUF_BASE + 0x2000, &hdr, &tso);
    let mut q = t.queue();
    // Room for one frame: the second would be refused by the kernel, so it is not listed;
    // cut here, its segments go behind the listed one, in the next batch.
    let mut bufs = KernelGsoBuffers {
        room: tso.len() + 100,
        ..kernel_sink(None)
    };
    let mut scratch = TxScratch::default();
    let (r, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::Budget));
    assert_eq!(kernel_frames(&scratch).len(), 1);
    assert!(bufs.nic.sent.is_empty());
    assert_eq!(t.used(0), vec![(u32::from(g1), 0)]);
    assert_eq!(tally.segments, 0);
    bufs.room = 0;
    let (r, tally) = run_kernel(&t, &mut q, &mut bufs, &mut scratch);
    assert_eq!(r, Ok(TxStop::RingEmpty));
    assert!(kernel_frames(&scratch).is_empty());
    assert_eq!((bufs.nic.sent.len(), tally.segments), (3, 3));
    assert_eq!(t.used(1), vec![(u32::from(g2), 0)]);
}
