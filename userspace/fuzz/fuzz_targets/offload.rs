//! The offload parser and the segmenter, on frames the fuzzer writes.
//!
//! A net header and a frame come from the input; `offload::classify` must refuse or accept
//! without panicking, and what it accepts must be safe to act on: a checksum request is
//! completed inside the frame and verifies, and every segment of a TSO plan fits the
//! length the plan promised, carries its share of the payload and verifies as IP and TCP.
//!
//! Input layout (missing bytes read as zero): `[allowed][net header: 10 bytes]` then the
//! frame; if the allowed byte's 0x80 bit is set, the frame is first given a valid
//! Ethernet + IPv4/IPv6 + TCP skeleton (so the fuzzer reaches the segmenter often) whose
//! fields the rest of the input overwrites.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xvdpa::datapath::device::Offloads;
use xvdpa::datapath::offload::{checksum, classify, CoalesceTally, Coalescer, NetHeader, Offload};
use xvdpa_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let allowed = input.u8();
    let offloads = Offloads {
        csum: allowed & 1 != 0,
        tso4: allowed & 2 != 0,
        tso6: allowed & 4 != 0,
        ecn: allowed & 8 != 0,
    };
    let mut raw = [0u8; 12];
    raw[..10].copy_from_slice(&{
        let mut h = [0u8; 10];
        let b = input.bytes(10);
        h[..b.len()].copy_from_slice(b);
        h
    });
    let hdr = NetHeader::parse(&raw);
    let rest = input.bytes(usize::MAX);
    let mut frame = if allowed & 0x80 != 0 {
        // A skeleton: Ethernet, IP with lengths that fit, TCP with a 20-byte header.
        let ipv6 = allowed & 0x40 != 0;
        let len = 14 + if ipv6 { 40 } else { 20 } + 20 + rest.len();
        let mut f = vec![0u8; len];
        if ipv6 {
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f[14] = 0x60;
            f[18..20].copy_from_slice(&((len - 54) as u16).to_be_bytes());
            f[20] = 6;
            f[54 + 12] = 0x50;
        } else {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            f[14] = 0x45;
            f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
            f[23] = 6;
            f[34 + 12] = 0x50;
        }
        // The input overwrites the payload and, with bit 0x20, the headers too.
        let from = if allowed & 0x20 != 0 { 0 } else { len - rest.len() };
        let n = rest.len().min(len - from);
        f[from..from + n].copy_from_slice(&rest[..n]);
        f
    } else {
        rest.to_vec()
    };

    // Coalescing: the frame, then copies of it cut at the header's gso_size, as one batch.
    // Whatever merges must account for every input and come out as a valid TSO frame.
    let mut coalescer = Coalescer::default();
    let mut tally = CoalesceTally::default();
    coalescer.clear();
    let cut = usize::from(hdr.gso_size).clamp(1, frame.len().max(1));
    let mut pushed = 1;
    coalescer.push(&frame, offloads, &mut tally);
    for piece in frame.chunks(cut).take(8) {
        coalescer.push(piece, offloads, &mut tally);
        pushed += 1;
    }
    coalescer.finish();
    let outputs = coalescer.frames().count();
    assert_eq!(coalescer.inputs_in(outputs), pushed);
    for out in coalescer.frames() {
        let h = NetHeader::parse(out[..12].try_into().expect("every output has its header"));
        if h.gso_type != 0 {
            let all = Offloads { csum: true, tso4: true, tso6: true, ecn: true };
            assert!(matches!(classify(&h, &out[12..], all), Ok(Offload::Tso(_))));
        }
    }

    match classify(&hdr, &frame, offloads) {
        Err(_) | Ok(Offload::None) => {}
        Ok(Offload::Checksum { start, offset }) => {
            assert!(start + offset + 2 <= frame.len());
            let field = [frame[start + offset], frame[start + offset + 1]];
            let pseudo = u64::from(u16::from_be_bytes(field));
            checksum::complete(&mut frame, start, offset);
            assert!(checksum::verifies(&frame[start..], pseudo));
        }
        Ok(Offload::Tso(plan)) => {
            assert!(plan.segments() >= 1);
            let mut carried = 0;
            let mut out = vec![0u8; plan.max_segment_len()];
            for i in 0..plan.segments() {
                let want = plan.segment_len(i);
                assert!(want <= plan.max_segment_len());
                let n = plan.write_segment(&frame, i, &mut out);
                assert_eq!(n, want);
                let seg = &out[..n];
                carried += n - plan.headers;
                let (l3, l4) = (plan.l3, plan.l4);
                let l4_len = n - l4;
                let pseudo = if plan.ipv6 {
                    checksum::pseudo_header(&seg[l3 + 8..l3 + 24], &seg[l3 + 24..l3 + 40], 6, l4_len)
                } else {
                    assert!(checksum::verifies(&seg[l3..l4], 0), "IPv4 header checksum");
                    checksum::pseudo_header(&seg[l3 + 12..l3 + 16], &seg[l3 + 16..l3 + 20], 6, l4_len)
                };
                assert!(checksum::verifies(&seg[l4..], pseudo), "TCP checksum");
            }
            assert_eq!(carried, plan.payload, "every payload byte once");
        }
    }
});
