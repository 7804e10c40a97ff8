//! Software TCP segmentation (GSO): one TSO frame from a guest becomes MSS-sized frames,
//! each with its own IP length, IPv4 id and header checksum, TCP sequence number, flags and
//! checksum, as Linux's `tcp_gso_segment` makes them: FIN and PSH only on the last segment,
//! CWR only on the first.

use super::checksum;
use super::BadOffload;
use crate::datapath::device::ETH_HLEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Where a TSO frame's headers lie and how it is cut, found by parsing the frame (the
/// guest's `hdr_len` is a hint Linux does not trust either).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsoPlan {
    pub ipv6: bool,
    pub ecn: bool,
    /// Start of the IP header (after the Ethernet header and at most one VLAN tag).
    pub l3: usize,
    /// Start of the TCP header.
    pub l4: usize,
    /// Length of all headers, TCP options included: every segment starts with these bytes.
    pub headers: usize,
    /// TCP payload bytes of the whole frame.
    pub payload: usize,
    pub mss: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

impl TsoPlan {
    /// Parses `frame`'s Ethernet, IP and TCP headers for segmentation into `mss`-byte
    /// payloads. IPv4 options and TCP options are carried into every segment; fragments,
    /// IPv6 extension headers and anything but TCP are refused.
    pub fn new(frame: &[u8], ipv6: bool, ecn: bool, mss: usize) -> Result<Self, BadOffload> {
        if frame.len() < ETH_HLEN + 4 {
            return Err(BadOffload::IpHeader);
        }
        let mut l3 = ETH_HLEN;
        let mut ethertype = be16(frame, 12);
        if ethertype == ETHERTYPE_VLAN {
            ethertype = be16(frame, 16);
            l3 += 4;
        }
        // The IP packet ends where its header says, not where the frame does (Ethernet
        // padding is not payload).
        let (l4, end) = match (ipv6, ethertype) {
            (false, ETHERTYPE_IPV4) => {
                let ip = frame.get(l3..l3 + 20).ok_or(BadOffload::IpHeader)?;
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let total = usize::from(be16(ip, 2));
                let fragment = be16(ip, 6) & 0x3fff != 0;
                if ip[0] >> 4 != 4 || ihl < 20 || fragment || total < ihl {
                    return Err(BadOffload::IpHeader);
                }
                if ip[9] != IPPROTO_TCP {
                    return Err(BadOffload::NotTcp);
                }
                if l3 + total > frame.len() {
                    return Err(BadOffload::IpHeader);
                }
                (l3 + ihl, l3 + total)
            }
            (true, ETHERTYPE_IPV6) => {
                let ip = frame.get(l3..l3 + IPV6_HLEN).ok_or(BadOffload::IpHeader)?;
                let payload = usize::from(be16(ip, 4));
                if ip[0] >> 4 != 6 || l3 + IPV6_HLEN + payload > frame.len() {
                    return Err(BadOffload::IpHeader);
                }
                match ip[6] {
                    IPPROTO_TCP => {}
                    // Hop-by-hop, routing, fragment, destination options, AH, ESP...: not cut.
                    0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => {
                        return Err(BadOffload::IpHeader)
                    }
                    _ => return Err(BadOffload::NotTcp),
                }
                (l3 + IPV6_HLEN, l3 + IPV6_HLEN + payload)
            }
            _ => return Err(BadOffload::NotTcp),
        };
        let tcp = frame.get(l4..l4 + 20).ok_or(BadOffload::TcpHeader)?;
        let doff = usize::from(tcp[12] >> 4) * 4;
        if doff < 20 || l4 + doff > end {
            return Err(BadOffload::TcpHeader);
        }
        let headers = l4 + doff;
        Ok(TsoPlan {
            ipv6,
            ecn,
            l3,
            l4,
            headers,
            payload: end - headers,
            mss,
        })
    }

    /// How many frames the TSO frame becomes (one, for a frame with no payload).
    pub fn segments(&self) -> usize {
        self.payload.div_ceil(self.mss).max(1)
    }

    /// Length of segment `i`.
    pub fn segment_len(&self, i: usize) -> usize {
        let from = i * self.mss;
        self.headers + self.mss.min(self.payload.saturating_sub(from))
    }

    /// The longest segment.
    pub fn max_segment_len(&self) -> usize {
        self.segment_len(0)
    }

    /// Writes segment `i` of `frame` into `out` (at least [`TsoPlan::segment_len`] bytes) with
    /// headers fixed up and checksums complete; returns its length.
    pub fn write_segment(&self, frame: &[u8], i: usize, out: &mut [u8]) -> usize {
        self.write(frame, i, out, false)
    }

    /// [`TsoPlan::write_segment`] with the TCP checksum left partial, for a NIC that completes
    /// it: the field holds the pseudo-header sum, as in a guest's NEEDS_CSUM frame
    /// (`csum_start` at [`TsoPlan::l4`], `csum_offset` 16), and the payload is copied without
    /// being summed. The IPv4 header checksum is complete.
    pub fn write_segment_partial(&self, frame: &[u8], i: usize, out: &mut [u8]) -> usize {
        self.write(frame, i, out, true)
    }

    fn write(&self, frame: &[u8], i: usize, out: &mut [u8], partial: bool) -> usize {
        let len = self.segment_len(i);
        let from = self.headers + i * self.mss;
        let n = len - self.headers;
        out[..self.headers].copy_from_slice(&frame[..self.headers]);
        let (dst, src) = (&mut out[self.headers..len], &frame[from..from + n]);
        // The payload's checksum is summed while it is copied; the headers are added below.
        // (The payload starts at an even offset of the TCP segment: TCP headers are whole
        // 32-bit words.)
        let payload_sum = if partial {
            dst.copy_from_slice(src);
            0
        } else {
            checksum::copy_and_sum(dst, src, 0)
        };
        let seg = &mut out[..len];
        let (l3, l4) = (self.l3, self.l4);
        let l4_len = len - l4;

        // IP: lengths, id, header checksum.
        if self.ipv6 {
            seg[l3 + 4..l3 + 6].copy_from_slice(&((len - l3 - IPV6_HLEN) as u16).to_be_bytes());
        } else {
            seg[l3 + 2..l3 + 4].copy_from_slice(&((len - l3) as u16).to_be_bytes());
            let id = be16(seg, l3 + 4).wrapping_add(i as u16);
            seg[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            seg[l3 + 10..l3 + 12].fill(0);
            let c = checksum::finish(checksum::sum(&seg[l3..l4], 0));
            seg[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }

        // TCP: sequence number, flags, checksum.
        let seq = u32::from_be_bytes([seg[l4 + 4], seg[l4 + 5], seg[l4 + 6], seg[l4 + 7]])
            .wrapping_add((i * self.mss) as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 < self.segments() {
            seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            seg[l4 + 13] &= !TCP_CWR;
        }
        seg[l4 + 16..l4 + 18].fill(0);
        let pseudo = if self.ipv6 {
            checksum::pseudo_header(&seg[l3 + 8..l3 + 24], &seg[l3 + 24..l3 + 40], 6, l4_len)
        } else {
            checksum::pseudo_header(&seg[l3 + 12..l3 + 16], &seg[l3 + 16..l3 + 20], 6, l4_len)
        };
        let c = if partial {
            checksum::fold(pseudo)
        } else {
            checksum::finish(checksum::sum(&seg[l4..self.headers], pseudo + payload_sum))
        };
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        len
    }
}
