//! Software GRO: consecutive in-order TCP segments of one flow, in one batch from the NIC,
//! become one TSO frame for a guest that takes them (GUEST_TSO4/6 with GUEST_CSUM), so its
//! stack handles one frame where it would handle dozens. Checksums are verified here first;
//! with GUEST_CSUM, frames whose checksums verified are marked DATA_VALID.
//!
//! It merges only what Linux's own GRO (`tcp_gro_receive`, `inet_gro_receive`,
//! `ipv6_gro_receive`) would: same Ethernet and IP headers but for lengths, ids and
//! checksums; IPv4 without options, IPv6 without extension headers; the same TCP header but
//! for the sequence number and checksum (ports, ack, window, flags, options: timestamps
//! included); no SYN, FIN, RST, URG or CWR; consecutive sequence numbers; every segment but
//! the last exactly as long as the first; a PSH segment ends the frame; IPv4 ids
//! incrementing by one (or all equal with DF set); at most 64 KiB of IP packet.

use super::{checksum, NetHeader, Offloads, F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
use crate::datapath::device::{rx_header, ETH_HLEN, VNET_HDR_LEN};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// The largest IP packet a merged frame may carry (its length field is 16 bits).
const MAX_IP_PACKET: usize = 65535;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A TCP segment from the NIC whose checksums verified.
#[derive(Debug, Clone, Copy)]
struct Segment {
    ipv6: bool,
    /// Start of the TCP header (the IP header starts at ETH_HLEN).
    l4: usize,
    /// End of the headers: the payload starts here.
    headers: usize,
    payload: usize,
    seq: u32,
    flags: u8,
}

impl Segment {
    /// Parses and verifies `frame`; `None` for anything that is not a plain TCP segment with
    /// good checksums (those pass through untouched, and unmarked).
    fn parse(frame: &[u8]) -> Option<Segment> {
        if frame.len() < ETH_HLEN + 40 {
            return None;
        }
        let l3 = ETH_HLEN;
        let (ipv6, l4, end) = match be16(frame, 12) {
            ETHERTYPE_IPV4 => {
                let ip = &frame[l3..l3 + 20];
                let total = usize::from(be16(ip, 2));
                // No options, no fragments, TCP, a length that fits the frame.
                if ip[0] != 0x45 || be16(ip, 6) & 0x3fff != 0 || ip[9] != IPPROTO_TCP {
                    return None;
                }
                if total < 40 || l3 + total > frame.len() || !checksum::verifies(ip, 0) {
                    return None;
                }
                (false, l3 + 20, l3 + total)
            }
            ETHERTYPE_IPV6 => {
                let ip = &frame[l3..l3 + 40];
                let payload = usize::from(be16(ip, 4));
                if ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP || l3 + 40 + payload > frame.len() {
                    return None;
                }
                (true, l3 + 40, l3 + 40 + payload)
            }
            _ => return None,
        };
        let doff = usize::from(frame[l4 + 12] >> 4) * 4;
        if doff < 20 || l4 + doff > end {
            return None;
        }
        let pseudo = if ipv6 {
            checksum::pseudo_header(
                &frame[l3 + 8..l3 + 24],
                &frame[l3 + 24..l3 + 40],
                6,
                end - l4,
            )
        } else {
            checksum::pseudo_header(
                &frame[l3 + 12..l3 + 16],
                &frame[l3 + 16..l3 + 20],
                6,
                end - l4,
            )
        };
        if !checksum::verifies(&frame[l4..end], pseudo) {
            return None;
        }
        Some(Segment {
            ipv6,
            l4,
            headers: l4 + doff,
            payload: end - l4 - doff,
            seq: be32(frame, l4 + 4),
            flags: frame[l4 + 13],
        })
    }

    /// Whether a frame may start or continue a merge at all.
    fn mergeable(&self) -> bool {
        self.payload > 0 && self.flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_URG | TCP_CWR) == 0
    }
}

/// Whether `frame` is TCP over IPv4 or IPv6: the only frames coalescing or checksum
/// verification does anything for. A batch without one goes to the guest as it is.
pub fn is_tcp(frame: &[u8]) -> bool {
    match frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]])) {
        Some(ETHERTYPE_IPV4) => frame.get(ETH_HLEN + 9) == Some(&IPPROTO_TCP),
        Some(ETHERTYPE_IPV6) => frame.get(ETH_HLEN + 6) == Some(&IPPROTO_TCP),
        _ => false,
    }
}

/// The frame being built: where it starts in the buffer and what the next segment must be.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Where its net header starts in the buffer.
    start: usize,
    first: Segment,
    /// Segments merged so far.
    count: usize,
    /// Sequence number the next segment must have.
    next_seq: u32,
    /// The last segment's IPv4 id.
    last_id: u16,
    /// The last segment was shorter than the first, or had PSH: nothing may follow it.
    closed: bool,
    /// IP packet length so far.
    ip_len: usize,
}

/// What coalescing a batch did, for the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceTally {
    /// Frames merged into the one before them.
    pub merged: u64,
    /// Frames marked DATA_VALID (their checksums verified here).
    pub verified: u64,
}

/// One batch of frames from the NIC, made ready for a guest that takes GUEST_CSUM (and
/// perhaps GUEST_TSO): each output frame is its net header then the frame. Reused.
#[derive(Default)]
pub struct Coalescer {
    buf: Vec<u8>,
    /// (start in `buf`, length with header, input frames it holds), in order.
    out: Vec<(usize, usize, usize)>,
    run: Option<Run>,
}

impl Coalescer {
    /// Starts a batch.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.out.clear();
        self.run = None;
    }

    /// Adds the next frame of the batch.
    pub fn push(&mut self, frame: &[u8], takes: Offloads, tally: &mut CoalesceTally) {
        let seg = if takes.csum {
            Segment::parse(frame)
        } else {
            None
        };
        if let (Some(seg), Some(run)) = (seg, self.run) {
            if self.fits(&run, frame, &seg) {
                self.append(run, frame, &seg);
                tally.merged += 1;
                return;
            }
        }
        self.close();
        let start = self.buf.len();
        let mut hdr = rx_header(1);
        if let Some(seg) = seg {
            hdr[0] = F_DATA_VALID;
            tally.verified += 1;
            let tso = if seg.ipv6 { takes.tso6 } else { takes.tso4 };
            if tso && seg.mergeable() {
                let ip_len = seg.headers + seg.payload - ETH_HLEN;
                self.run = Some(Run {
                    start,
                    first: seg,
                    count: 1,
                    next_seq: seg.seq.wrapping_add(seg.payload as u32),
                    last_id: be16(frame, ETH_HLEN + 4),
                    closed: seg.flags & TCP_PSH != 0,
                    ip_len,
                });
            }
        }
        // Only the IP packet: Ethernet padding after it is not the guest's business, and a
        // merged frame's payload must follow its headers directly.
        let len = seg.map_or(frame.len(), |s| s.headers + s.payload);
        self.buf.extend_from_slice(&hdr);
        self.buf.extend_from_slice(&frame[..len]);
        self.out.push((start, VNET_HDR_LEN + len, 1));
    }

    /// Whether `seg` (of `frame`) continues the open run.
    fn fits(&self, run: &Run, frame: &[u8], seg: &Segment) -> bool {
        let f = &run.first;
        let first = &self.buf[run.start + VNET_HDR_LEN..];
        if run.closed
            || !seg.mergeable()
            || seg.ipv6 != f.ipv6
            || seg.headers != f.headers
            || seg.seq != run.next_seq
            || seg.payload > f.payload
            || run.ip_len + seg.payload > MAX_IP_PACKET
        {
            return false;
        }
        let l3 = ETH_HLEN;
        // Ethernet header equal.
        if frame[..ETH_HLEN] != first[..ETH_HLEN] {
            return false;
        }
        if f.ipv6 {
            // Version/class/flow label, next header and hop limit, addresses.
            if frame[l3..l3 + 4] != first[l3..l3 + 4]
                || frame[l3 + 6..l3 + 40] != first[l3 + 6..l3 + 40]
            {
                return false;
            }
        } else {
            // Version/IHL/TOS, flags, TTL/protocol, addresses; the id follows the last one.
            let id = be16(frame, l3 + 4);
            let df = frame[l3 + 6] & 0x40 != 0;
            let id_ok = id == run.last_id.wrapping_add(1) || (df && id == run.last_id);
            if frame[l3..l3 + 2] != first[l3..l3 + 2]
                || frame[l3 + 6..l3 + 10] != first[l3 + 6..l3 + 10]
                || frame[l3 + 12..l3 + 20] != first[l3 + 12..l3 + 20]
                || !id_ok
            {
                return false;
            }
        }
        let l4 = f.l4;
        // Ports, ack; data offset, flags but PSH, window; options.
        let flags_differ = (frame[l4 + 13] ^ first[l4 + 13]) & !TCP_PSH != 0;
        frame[l4..l4 + 4] == first[l4..l4 + 4]
            && frame[l4 + 8..l4 + 13] == first[l4 + 8..l4 + 13]
            && !flags_differ
            && frame[l4 + 14..l4 + 16] == first[l4 + 14..l4 + 16]
            && frame[l4 + 20..f.headers] == first[l4 + 20..f.headers]
    }

    fn append(&mut self, mut run: Run, frame: &[u8], seg: &Segment) {
        self.buf
            .extend_from_slice(&frame[seg.headers..seg.headers + seg.payload]);
        let last = self.out.last_mut().expect("the run's frame");
        last.1 += seg.payload;
        last.2 += 1;
        run.count += 1;
        run.next_seq = run.next_seq.wrapping_add(seg.payload as u32);
        run.ip_len += seg.payload;
        if !run.first.ipv6 {
            run.last_id = be16(frame, ETH_HLEN + 4);
        }
        let psh = seg.flags & TCP_PSH != 0;
        if psh {
            // The merged frame carries the PSH of its last segment.
            self.buf[run.start + VNET_HDR_LEN + run.first.l4 + 13] |= TCP_PSH;
        }
        run.closed = psh || seg.payload < run.first.payload;
        self.run = Some(run);
    }

    /// Finishes the open run: one segment stays as it came (DATA_VALID); several become a
    /// TSO frame with lengths and IPv4 header checksum fixed, the TCP checksum left partial
    /// (the pseudo-header sum, NEEDS_CSUM), as Linux hands a GRO frame on.
    fn close(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        if run.count == 1 {
            return;
        }
        let f = run.first;
        let hdr = NetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if f.ipv6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: f.headers as u16,
            gso_size: f.payload as u16,
            csum_start: f.l4 as u16,
            csum_offset: 16,
        };
        let at = run.start;
        self.buf[at..at + VNET_HDR_LEN].copy_from_slice(&hdr.to_bytes(1));
        let frame = &mut self.buf[at + VNET_HDR_LEN..];
        let l3 = ETH_HLEN;
        let l4_len = run.ip_len - (f.l4 - l3);
        if f.ipv6 {
            frame[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        } else {
            frame[l3 + 2..l3 + 4].copy_from_slice(&(run.ip_len as u16).to_be_bytes());
            frame[l3 + 10..l3 + 12].fill(0);
            let c = checksum::finish(checksum::sum(&frame[l3..l3 + 20], 0));
            frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let pseudo = if f.ipv6 {
            checksum::pseudo_header(&frame[l3 + 8..l3 + 24], &frame[l3 + 24..l3 + 40], 6, l4_len)
        } else {
            checksum::pseudo_header(
                &frame[l3 + 12..l3 + 16],
                &frame[l3 + 16..l3 + 20],
                6,
                l4_len,
            )
        };
        let l4 = f.l4;
        frame[l4 + 16..l4 + 18].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    }

    /// Ends the batch: the frames to deliver, each with its net header.
    pub fn finish(&mut self) {
        self.close();
    }

    /// The output frames, in order (after [`Coalescer::finish`]).
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        self.out.iter().map(|&(s, l, _)| &self.buf[s..s + l])
    }

    /// How many input frames the first `outputs` output frames hold.
    pub fn inputs_in(&self, outputs: usize) -> usize {
        self.out.iter().take(outputs).map(|o| o.2).sum()
    }
}
