//! The offloads against an independent implementation: every segment is compared byte for
//! byte with the frame etherparse builds for it from scratch (its own lengths, checksums and
//! flags), for IPv4 and IPv6, with TCP and IPv4 options, and a short last segment.

use super::*;
use crate::datapath::testing::packets::{build, payload, Flow};

fn segment_all(frame: &[u8], plan: &TsoPlan) -> Vec<Vec<u8>> {
    (0..plan.segments())
        .map(|i| {
            let mut out = vec![0u8; plan.segment_len(i)];
            let n = plan.write_segment(frame, i, &mut out);
            out.truncate(n);
            out
        })
        .collect()
}

fn all() -> Offloads {
    Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    }
}

fn tso_header(ipv6: bool, mss: u16) -> NetHeader {
    NetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: if ipv6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: 0,
        gso_size: mss,
        csum_start: 34,
        csum_offset: 16,
    }
}

/// Segments a frame of `len` payload bytes and compares with etherparse's segments.
fn check_segmentation(f: Flow, len: usize, mss: usize) {
    let data = payload(len);
    let big = build(&f, f.seq, f.id, f.fin, f.psh, f.cwr, &data);
    let mut hdr = tso_header(f.ipv6, mss as u16);
    if f.cwr {
        hdr.gso_type |= GSO_ECN;
    }
    let Ok(Offload::Tso(plan)) = classify(&hdr, &big, all()) else {
        panic!("not a TSO plan");
    };
    let segs = segment_all(&big, &plan);
    let chunks: Vec<&[u8]> = data.chunks(mss).collect();
    assert_eq!(segs.len(), chunks.len());
    for (i, (seg, chunk)) in segs.iter().zip(&chunks).enumerate() {
        let last = i + 1 == chunks.len();
        let seq = f.seq.wrapping_add((i * mss) as u32);
        let id = f.id.wrapping_add(i as u16);
        let want = build(
            &f,
            seq,
            id,
            f.fin && last,
            f.psh && last,
            f.cwr && i == 0,
            chunk,
        );
        assert_eq!(seg, &want, "segment {i} of {}", segs.len());
    }
}

#[test]
fn a_partial_segment_completed_at_l4_equals_the_complete_one() {
    for ipv6 in [false, true] {
        let f = Flow {
            ipv6,
            fin: true,
            ..Flow::default()
        };
        let big = build(&f, f.seq, f.id, true, true, false, &payload(5000));
        let Ok(Offload::Tso(plan)) = classify(&tso_header(ipv6, 1448), &big, all()) else {
            panic!("not a TSO plan");
        };
        for (i, whole) in segment_all(&big, &plan).iter().enumerate() {
            let mut out = vec![0u8; plan.segment_len(i)];
            let n = plan.write_segment_partial(&big, i, &mut out);
            assert_eq!(n, whole.len());
            assert_ne!(
                &out[..n],
                &whole[..],
                "segment {i}: the checksum is left partial"
            );
            // What the NIC (or the kernel's skb_checksum_help) does with the request.
            checksum::complete(&mut out[..n], plan.l4, TCP_CSUM_OFFSET);
            assert_eq!(&out[..n], &whole[..], "ipv6 {ipv6} segment {i}");
        }
    }
}

#[test]
fn ipv4_segments_match_an_independent_builder() {
    check_segmentation(Flow::default(), 10_000, 1448);
    check_segmentation(Flow::default(), 1448 * 4, 1448);
    check_segmentation(Flow::default(), 65_000, 1448);
}

/// `frame` with an 802.1Q tag of VLAN `vid` after its MAC addresses, as a guest's VLAN
/// device sends it.
fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut t = frame[..12].to_vec();
    t.extend_from_slice(&[0x81, 0x00]);
    t.extend_from_slice(&vid.to_be_bytes());
    t.extend_from_slice(&frame[12..]);
    t
}

/// A guest that tags its own frames (`vlan-passthrough`) counts its offsets from the tagged
/// frame; every segment carries the tag, and past it is the segment an untagged frame gives.
#[test]
fn a_guest_tagged_frame_is_cut_into_tagged_segments() {
    for ipv6 in [false, true] {
        let f = Flow {
            ipv6,
            psh: true,
            ..Flow::default()
        };
        let data = payload(7000);
        let big = tagged(&build(&f, f.seq, f.id, false, true, false, &data), 200);
        let mut hdr = tso_header(ipv6, 1448);
        hdr.csum_start += 4;
        let Ok(Offload::Tso(plan)) = classify(&hdr, &big, all()) else {
            panic!("ipv6 {ipv6}: not a TSO plan");
        };
        assert_eq!(plan.l3, ETH_HLEN + 4);
        let segs = segment_all(&big, &plan);
        let chunks: Vec<&[u8]> = data.chunks(1448).collect();
        assert_eq!(segs.len(), chunks.len());
        for (i, (seg, chunk)) in segs.iter().zip(&chunks).enumerate() {
            let last = i + 1 == chunks.len();
            let seq = f.seq.wrapping_add((i * 1448) as u32);
            let want = build(
                &f,
                seq,
                f.id.wrapping_add(i as u16),
                false,
                last,
                false,
                chunk,
            );
            assert_eq!(seg, &tagged(&want, 200), "ipv6 {ipv6} segment {i}");
        }
    }
}

#[test]
fn ipv6_segments_match_an_independent_builder() {
    let f = Flow {
        ipv6: true,
        ..Flow::default()
    };
    check_segmentation(f, 10_000, 1428);
    check_segmentation(f, 3, 1428);
}

#[test]
fn fin_and_psh_only_on_the_last_segment_cwr_only_on_the_first() {
    let f = Flow {
        fin: true,
        psh: true,
        cwr: true,
        ..Flow::default()
    };
    check_segmentation(f, 5000, 1000);
}

#[test]
fn ip_options_and_no_tcp_options_are_carried() {
    let f = Flow {
        ip_options: true,
        tcp_options: false,
        ..Flow::default()
    };
    check_segmentation(f, 4000, 1460);
}

#[test]
fn a_frame_with_no_payload_is_one_segment() {
    let f = Flow::default();
    let big = build(&f, 1, 1, false, false, false, &[]);
    let Ok(Offload::Tso(plan)) = classify(&tso_header(false, 1448), &big, all()) else {
        panic!()
    };
    assert_eq!(plan.segments(), 1);
    assert_eq!(segment_all(&big, &plan), vec![big]);
}

#[test]
fn a_completed_checksum_equals_the_one_etherparse_computes() {
    let f = Flow::default();
    let mut frame = build(&f, 7, 9, false, true, false, &payload(333));
    let want = frame.clone();
    // What a guest sends: the pseudo-header sum, not inverted, in the checksum field.
    let tcp_len = frame.len() - 34;
    let pseudo = checksum::fold(checksum::pseudo_header(
        &frame[26..30],
        &frame[30..34],
        6,
        tcp_len,
    ));
    frame[50..52].copy_from_slice(&pseudo.to_be_bytes());
    let hdr = NetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..NetHeader::default()
    };
    let offload = classify(&hdr, &frame, all()).unwrap();
    assert_eq!(
        offload,
        Offload::Checksum {
            start: 34,
            offset: 16
        }
    );
    complete_checksum(&mut frame, &offload);
    assert_eq!(frame, want);
}

#[test]
fn bad_requests_are_refused() {
    let f = Flow::default();
    let big = build(&f, 1, 1, false, false, false, &payload(3000));
    let refuse = |hdr: NetHeader, frame: &[u8], allowed: Offloads| classify(&hdr, frame, allowed);

    // Not negotiated.
    let none = Offloads::default();
    assert_eq!(
        refuse(tso_header(false, 1448), &big, none),
        Err(BadOffload::NotNegotiated)
    );
    let csum = NetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..NetHeader::default()
    };
    assert_eq!(refuse(csum, &big, none), Err(BadOffload::NotNegotiated));
    let no_ecn = Offloads {
        ecn: false,
        ..all()
    };
    let mut ecn = tso_header(false, 1448);
    ecn.gso_type |= GSO_ECN;
    assert_eq!(refuse(ecn, &big, no_ecn), Err(BadOffload::NotNegotiated));
    let v4_only = Offloads {
        tso6: false,
        ..all()
    };
    assert_eq!(
        refuse(tso_header(true, 1448), &big, v4_only),
        Err(BadOffload::NotNegotiated)
    );

    // Checksum field outside the frame, or inside the Ethernet header.
    for (start, offset) in [
        (34, 60_000),
        (u16::MAX, 16),
        (4, 0),
        (big.len() as u16 - 1, 0),
    ] {
        let h = NetHeader {
            csum_start: start,
            csum_offset: offset,
            ..csum
        };
        assert_eq!(
            refuse(h, &big, all()),
            Err(BadOffload::ChecksumOutsideFrame),
            "{start}+{offset}"
        );
    }

    // A checksum field at an odd offset (the fuzzer's first find: the completed checksum
    // could not verify).
    let odd = NetHeader {
        csum_start: 34,
        csum_offset: 1,
        ..csum
    };
    assert_eq!(refuse(odd, &big, all()), Err(BadOffload::ChecksumOffsetOdd));

    // gso_size 0, UDP, unknown types.
    assert_eq!(
        refuse(tso_header(false, 0), &big, all()),
        Err(BadOffload::ZeroGsoSize)
    );
    for t in [GSO_UDP, 2, 5, 0x7f, GSO_ECN] {
        let h = NetHeader {
            gso_type: t,
            ..tso_header(false, 1448)
        };
        assert_eq!(
            refuse(h, &big, all()),
            Err(BadOffload::GsoType),
            "gso_type {t}"
        );
    }

    // An IPv4 frame sent as TCPV6, and the other way.
    assert_eq!(
        refuse(tso_header(true, 1448), &big, all()),
        Err(BadOffload::NotTcp)
    );

    // Not TCP.
    let mut udp = big.clone();
    udp[23] = 17;
    assert_eq!(
        refuse(tso_header(false, 1448), &udp, all()),
        Err(BadOffload::NotTcp)
    );

    // Fragments, a bad IHL, a length past the frame.
    let mut frag = big.clone();
    frag[20] |= 0x20; // MF
    assert_eq!(
        refuse(tso_header(false, 1448), &frag, all()),
        Err(BadOffload::IpHeader)
    );
    let mut ihl = big.clone();
    ihl[14] = 0x44;
    assert_eq!(
        refuse(tso_header(false, 1448), &ihl, all()),
        Err(BadOffload::IpHeader)
    );
    let mut long = big.clone();
    long[16..18].copy_from_slice(&(big.len() as u16).to_be_bytes());
    assert_eq!(
        refuse(tso_header(false, 1448), &long, all()),
        Err(BadOffload::IpHeader)
    );

    // A TCP header longer than the packet; truncated frames at every length.
    let short = build(&f, 1, 1, false, false, false, &[]);
    let mut doff = short.clone();
    doff[46] = 0xf0;
    assert_eq!(
        refuse(tso_header(false, 1448), &doff, all()),
        Err(BadOffload::TcpHeader)
    );
    for len in 0..short.len() {
        assert!(
            refuse(tso_header(false, 1448), &short[..len], all()).is_err(),
            "{len}"
        );
    }

    // IPv6 extension headers.
    let v6 = Flow { ipv6: true, ..f };
    let mut ext = build(&v6, 1, 1, false, false, false, &payload(3000));
    ext[20] = 0; // hop-by-hop
    assert_eq!(
        refuse(tso_header(true, 1448), &ext, all()),
        Err(BadOffload::IpHeader)
    );

    // More segments than one frame may become.
    assert_eq!(
        refuse(tso_header(false, 1), &big, all()),
        Err(BadOffload::TooManySegments)
    );
}

#[test]
fn receivers_accept_what_they_negotiated() {
    let f = Flow::default();
    let big = build(&f, 1, 1, false, false, false, &payload(3000));
    let tso = classify(&tso_header(false, 1448), &big, all()).unwrap();
    assert!(all().accept(&tso));
    assert!(!Offloads {
        csum: false,
        ..all()
    }
    .accept(&tso));
    assert!(!Offloads {
        tso4: false,
        ..all()
    }
    .accept(&tso));
    assert!(Offloads {
        tso6: false,
        ..all()
    }
    .accept(&tso));
    assert!(Offloads::default().accept(&Offload::None));
    assert!(!Offloads::default().accept(&Offload::Checksum {
        start: 34,
        offset: 16
    }));
}

#[test]
fn headers_round_trip() {
    let h = NetHeader {
        flags: 1,
        gso_type: 4,
        hdr_len: 74,
        gso_size: 1428,
        csum_start: 54,
        csum_offset: 16,
    };
    let b = h.to_bytes(3);
    assert_eq!(NetHeader::parse(&b), h);
    assert_eq!(u16::from_le_bytes([b[10], b[11]]), 3);
}

/// A batch arena as the transmit path leaves it: each frame behind its receive header.
fn arena_of(frames: &[(NetHeader, Vec<u8>)]) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut arena = Vec::new();
    let mut at = Vec::new();
    for (h, f) in frames {
        at.push((arena.len(), f.len()));
        arena.extend_from_slice(&h.to_bytes(1));
        arena.extend_from_slice(f);
    }
    (arena, at)
}

#[test]
fn each_receiver_gets_the_offloads_it_negotiated_and_finished_frames_otherwise() {
    let f = Flow::default();
    let data = payload(4000);
    let whole = build(&f, f.seq, f.id, false, true, false, &data);
    // As a guest sends it: the TCP checksum field holds the pseudo-header sum.
    let mut partial = whole.clone();
    let tcp_len = partial.len() - 34;
    let pseudo = checksum::pseudo_header(&partial[26..30], &partial[30..34], 6, tcp_len);
    partial[50..52].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    let plain = build(&f, 1, 1, false, false, false, &payload(10));
    let csum_hdr = NetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..NetHeader::default()
    };
    let small = build(&f, 5, 5, false, true, false, &payload(100));
    let mut small_partial = small.clone();
    let pseudo = checksum::pseudo_header(&small[26..30], &small[30..34], 6, small.len() - 34);
    small_partial[50..52].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    let frames = vec![
        (NetHeader::default(), plain.clone()),
        (tso_header(false, 1448), partial.clone()),
        (csum_hdr, small_partial.clone()),
    ];

    // A receiver with every offload takes the frames as they were sent.
    let (mut arena, at) = arena_of(&frames);
    let mut fin = Finished::default();
    let mut tally = FinishTally::default();
    fin.prepare(at.iter().copied(), &mut arena, all(), &mut tally);
    let got: Vec<Vec<u8>> = fin.frames(&arena).map(<[u8]>::to_vec).collect();
    let (want_arena, _) = arena_of(&frames);
    assert_eq!(got.concat(), want_arena);
    assert_eq!(
        tally,
        FinishTally {
            passed: 2,
            csum_computed: 0,
            segments: 0
        }
    );

    // One without any gets segments and completed checksums, with plain headers.
    let (mut arena, at) = arena_of(&frames);
    let mut tally = FinishTally::default();
    fin.prepare(
        at.iter().copied(),
        &mut arena,
        Offloads::default(),
        &mut tally,
    );
    let got: Vec<Vec<u8>> = fin.frames(&arena).map(<[u8]>::to_vec).collect();
    let plain_hdr = NetHeader::default().to_bytes(1).to_vec();
    let mut want = vec![[&plain_hdr[..], &plain].concat()];
    for (i, c) in data.chunks(1448).enumerate() {
        let last = (i + 1) * 1448 >= data.len();
        let seg = build(
            &f,
            f.seq.wrapping_add((i * 1448) as u32),
            f.id.wrapping_add(i as u16),
            false,
            last,
            false,
            c,
        );
        want.push([&plain_hdr[..], &seg].concat());
    }
    want.push([&plain_hdr[..], &small].concat());
    assert_eq!(got, want);
    assert_eq!(
        tally,
        FinishTally {
            passed: 0,
            csum_computed: 1,
            segments: 3
        }
    );

    // One with checksums but not TSO: segments marked DATA_VALID, the partial checksum kept.
    let (mut arena, at) = arena_of(&frames);
    let mut tally = FinishTally::default();
    let csum_only = Offloads {
        csum: true,
        ..Offloads::default()
    };
    fin.prepare(at.iter().copied(), &mut arena, csum_only, &mut tally);
    let got: Vec<Vec<u8>> = fin.frames(&arena).map(<[u8]>::to_vec).collect();
    assert_eq!(got.len(), 5);
    assert!(got[1..4].iter().all(|g| g[0] == F_DATA_VALID));
    assert_eq!(got[4], [&csum_hdr.to_bytes(1)[..], &small_partial].concat());
    assert_eq!(
        tally,
        FinishTally {
            passed: 1,
            csum_computed: 0,
            segments: 3
        }
    );
}

/// A flow's consecutive segments as a sender (the wire) puts them out: ids incrementing,
/// PSH on the last.
fn wire_segments(f: &Flow, data: &[u8], mss: usize) -> Vec<Vec<u8>> {
    let n = data.chunks(mss).count();
    data.chunks(mss)
        .enumerate()
        .map(|(i, c)| {
            let seq = f.seq.wrapping_add((i * mss) as u32);
            build(
                f,
                seq,
                f.id.wrapping_add(i as u16),
                false,
                i + 1 == n,
                false,
                c,
            )
        })
        .collect()
}

fn coalesce(frames: &[Vec<u8>], takes: Offloads) -> (Vec<Vec<u8>>, CoalesceTally, Coalescer) {
    let mut c = Coalescer::default();
    let mut tally = CoalesceTally::default();
    c.clear();
    for f in frames {
        c.push(f, takes, &mut tally);
    }
    c.finish();
    let out = c.frames().map(<[u8]>::to_vec).collect();
    (out, tally, c)
}

#[test]
fn in_order_segments_of_one_flow_become_one_tso_frame_that_segments_back_to_them() {
    for ipv6 in [false, true] {
        let f = Flow {
            ipv6,
            ..Flow::default()
        };
        let mss = 1448;
        let data = payload(mss * 30 + 100);
        let segs = wire_segments(&f, &data, mss);
        let (out, tally, c) = coalesce(&segs, all());
        assert_eq!(out.len(), 1, "ipv6 {ipv6}");
        assert_eq!(c.inputs_in(1), segs.len());
        assert_eq!(
            tally,
            CoalesceTally {
                merged: 30,
                verified: 1
            }
        );
        let hdr = NetHeader::parse(out[0][..12].try_into().unwrap());
        let frame = &out[0][12..];
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(hdr.gso_type, if ipv6 { GSO_TCPV6 } else { GSO_TCPV4 });
        assert_eq!(usize::from(hdr.gso_size), mss);
        // What the guest's stack sees is the whole stream in one frame...
        let whole = build(&f, f.seq, f.id, false, true, false, &data);
        assert_eq!(frame.len(), whole.len());
        // ...and cut again at its MSS (as a forwarding guest would), it is what was sent.
        let Ok(Offload::Tso(plan)) = classify(&hdr, frame, all()) else {
            panic!("a merged frame is a valid TSO frame");
        };
        assert_eq!(segment_all(frame, &plan), segs, "ipv6 {ipv6}");
    }
}

#[test]
fn coalescing_stops_where_linux_gro_would() {
    let f = Flow::default();
    let mss = 1000;
    let segs = wire_segments(&f, &payload(mss * 6), mss);
    let count = |frames: &[Vec<u8>]| coalesce(frames, all()).0.len();

    // A gap in the sequence, or reordering.
    let mut gap = segs.clone();
    gap.remove(2);
    assert_eq!(count(&gap), 2);
    let mut swapped = segs.clone();
    swapped.swap(1, 2);
    assert!(count(&swapped) >= 3);
    // Another flow in between breaks the run.
    let other = Flow { sport: 40001, ..f };
    let mut mixed = segs.clone();
    mixed.insert(
        3,
        build(&other, f.seq, 5, false, false, false, &payload(mss)),
    );
    let (out, tally, _) = coalesce(&mixed, all());
    assert_eq!(
        out.len(),
        3,
        "three merged, the other flow's, the last three merged"
    );
    assert_eq!(tally.verified, 3);
    // A bad TCP checksum: neither merged nor marked.
    let mut bad = segs.clone();
    let last = bad[2].len() - 1;
    bad[2][last] ^= 0xff;
    let (out, tally, _) = coalesce(&bad, all());
    assert_eq!(out.len(), 3);
    assert_eq!(out[1][0], 0, "the bad segment is not DATA_VALID");
    assert_eq!(tally.verified, 2);
    // FIN, SYN, a window or option change, a short segment in the middle.
    let with_fin = build(&f, f.seq, f.id, true, false, false, &payload(mss));
    assert_eq!(count(&[with_fin, segs[1].clone()]), 2);
    let mut window = segs.clone();
    window[3] = {
        let mut w = build(
            &f,
            f.seq.wrapping_add(3 * mss as u32),
            f.id.wrapping_add(3),
            false,
            false,
            false,
            &payload(mss * 4)[mss * 3..],
        );
        // Another advertised window (checksum fixed up to match).
        w[48] ^= 1;
        w[50..52].fill(0);
        let pseudo = checksum::pseudo_header(&w[26..30], &w[30..34], 6, w.len() - 34);
        let c = checksum::finish(checksum::sum(&w[34..], pseudo));
        w[50..52].copy_from_slice(&c.to_be_bytes());
        w
    };
    assert_eq!(count(&window), 3, "0-2, 3 alone (another window), 4-5");
    let short = build(&f, f.seq, f.id, false, false, false, &payload(mss - 1));
    assert_eq!(count(&[short, segs[1].clone()]), 2);
}

#[test]
fn what_a_guest_does_not_take_it_does_not_get() {
    let f = Flow::default();
    let segs = wire_segments(&f, &payload(5000), 1000);
    // Checksums but no TSO: every segment alone, marked verified.
    let csum_only = Offloads {
        csum: true,
        ..Offloads::default()
    };
    let (out, tally, _) = coalesce(&segs, csum_only);
    assert_eq!(out.len(), 5);
    assert!(out.iter().all(|o| o[0] == F_DATA_VALID && o[1] == 0));
    assert_eq!(tally.verified, 5);
    // Neither: the frames as they came, plain headers.
    let (out, tally, _) = coalesce(&segs, Offloads::default());
    let plain: Vec<Vec<u8>> = segs
        .iter()
        .map(|s| [&NetHeader::default().to_bytes(1)[..], s].concat())
        .collect();
    assert_eq!(out, plain);
    assert_eq!(tally, CoalesceTally::default());
    // Not TCP at all (an ARP-sized frame): as it came.
    let arp = vec![0xffu8; 60];
    let (out, _, _) = coalesce(std::slice::from_ref(&arp), all());
    assert_eq!(
        out,
        vec![[&NetHeader::default().to_bytes(1)[..], &arp].concat()]
    );
}

#[test]
fn only_tcp_frames_are_worth_coalescing() {
    let v4 = build(&Flow::default(), 1, 1, false, false, false, &payload(10));
    let v6 = build(
        &Flow {
            ipv6: true,
            ..Flow::default()
        },
        1,
        1,
        false,
        false,
        false,
        &[],
    );
    assert!(is_tcp(&v4) && is_tcp(&v6));
    let mut udp = v4.clone();
    udp[23] = 17;
    assert!(!is_tcp(&udp));
    assert!(!is_tcp(&[0xff; 60]));
    assert!(!is_tcp(&v4[..13]));
    assert!(!is_tcp(&v4[..20]));
}
