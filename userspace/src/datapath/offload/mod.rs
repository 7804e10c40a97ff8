//! Offloads: what a guest's net header asks of the device (complete a checksum, segment a
//! TCP frame), checked against the frame before anything acts on it, and carried out in
//! software where the receiver (the NIC, or another guest) cannot take the frame as it is.
//!
//! - [`NetHeader`]: `virtio_net_hdr_v1`, both ways;
//! - [`Offloads`]: which offloads one side negotiated (CSUM / HOST_* for what a guest may
//!   send, GUEST_* for what it takes);
//! - [`classify`]: a transmitted frame's request, validated: [`Offload`] or [`BadOffload`];
//! - [`checksum`], [`segment`]: the work itself, on plain byte slices;
//! - [`finish`]: frames from one guest made fit for another that lacks an offload;
//! - [`coalesce`]: software GRO, frames from the NIC merged for a guest that takes TSO.
//!
//! Nothing here trusts the guest's `hdr_len` or `csum_start`: the segmenter finds the headers
//! by parsing the frame, and a checksum request is bounds-checked against the frame (a TSO
//! request's `hdr_len` and checksum fields too, though only the parsed headers are used).

pub mod checksum;
pub mod coalesce;
pub mod finish;
pub mod segment;

pub use coalesce::{is_tcp, CoalesceTally, Coalescer};
pub use finish::{FinishTally, Finished};
pub use segment::TsoPlan;

pub use super::device::Offloads;
use super::device::{ETH_HLEN, VNET_HDR_LEN, VNET_HDR_NUM_BUFFERS};

/// `virtio_net_hdr.flags`: the checksum from `csum_start` on is left for the device.
pub const F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags` (device to driver): the frame's checksums were verified.
pub const F_DATA_VALID: u8 = 2;

/// Where a TCP header's checksum field lies, from the start of the header (the
/// `csum_offset` of a TCP checksum request).
pub const TCP_CSUM_OFFSET: usize = 16;

/// `virtio_net_hdr.gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
/// Flag on `gso_type`: the TCP frame has CWR set for ECN (HOST_ECN / GUEST_ECN).
pub const GSO_ECN: u8 = 0x80;

/// Frames a guest may hand over for segmentation are at most this long (Ethernet header and
/// one VLAN tag included): Linux's GSO_LEGACY_MAX_SIZE of 64 KiB, the most virtio-net sends.
pub const MAX_GSO_FRAME: usize = 65536 + ETH_HLEN + 4;

/// One TSO frame becomes at most this many segments: a bound on the NIC buffers one guest
/// frame may take (a gso_size of 1 would otherwise turn 64 KiB into 65000 frames). 64 KiB at
/// an MSS of 128 bytes or more stays under it; Linux never builds a TSO frame of more
/// segments than its MSS allows under 64 KiB, so only an MSS below 128 meets the bound.
pub const MAX_SEGMENTS: usize = 512;

/// `virtio_net_hdr_v1`, as the guest sent it or as it goes to a guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl NetHeader {
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// The header as a receive queue takes it, `num_buffers` filled in.
    pub fn to_bytes(&self, num_buffers: u16) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[VNET_HDR_NUM_BUFFERS..].copy_from_slice(&num_buffers.to_le_bytes());
        b
    }

    /// Whether the header asks for anything at all.
    pub fn wants_offload(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0 || self.gso_type != GSO_NONE
    }
}

impl Offloads {
    /// Whether a frame with this (validated) offload can be handed over unchanged.
    pub fn accept(&self, offload: &Offload) -> bool {
        match offload {
            Offload::None => true,
            Offload::Checksum { .. } => self.csum,
            Offload::Tso(plan) => {
                // A TSO frame always carries a partial checksum too.
                self.csum
                    && if plan.ipv6 { self.tso6 } else { self.tso4 }
                    && (!plan.ecn || self.ecn)
            }
        }
    }
}

/// A transmitted frame's offload request, checked against the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    None,
    /// Complete the checksum over `frame[start..]` into the field at `start + offset`.
    Checksum {
        start: usize,
        offset: usize,
    },
    /// Segment into `plan.segments()` frames, each with complete checksums.
    Tso(TsoPlan),
}

/// Why an offload request was refused: each is a counted drop, never a frame on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadOffload {
    #[error("offload not negotiated")]
    NotNegotiated,
    #[error("checksum start or offset outside the frame")]
    ChecksumOutsideFrame,
    #[error("checksum field at an odd offset from its start")]
    ChecksumOffsetOdd,
    #[error("unknown or unsupported gso_type")]
    GsoType,
    #[error("gso_size is 0")]
    ZeroGsoSize,
    #[error("segmentation of a frame that is not TCP over IPv4/IPv6")]
    NotTcp,
    #[error("IP header malformed, fragmented or with IPv6 extension headers")]
    IpHeader,
    #[error("TCP header malformed or outside the frame")]
    TcpHeader,
    #[error("frame would become more than MAX_SEGMENTS segments")]
    TooManySegments,
    #[error("hdr_len past the end of the frame")]
    HeaderLength,
}

/// Checks what `hdr` asks for against `frame` (the Ethernet frame after the header) and the
/// offloads the sender negotiated.
pub fn classify(hdr: &NetHeader, frame: &[u8], allowed: Offloads) -> Result<Offload, BadOffload> {
    match hdr.gso_type {
        GSO_NONE => {
            if hdr.flags & F_NEEDS_CSUM == 0 {
                return Ok(Offload::None);
            }
            if !allowed.csum {
                return Err(BadOffload::NotNegotiated);
            }
            let (start, offset) = checksum_field(hdr, frame)?;
            // An Internet checksum field is a 16-bit word of the data it covers: at an odd
            // offset no value makes the sum verify (found by fuzzing). TCP's is at 16, UDP's
            // at 6.
            if offset % 2 != 0 {
                return Err(BadOffload::ChecksumOffsetOdd);
            }
            Ok(Offload::Checksum { start, offset })
        }
        t if t & !GSO_ECN == GSO_TCPV4 || t & !GSO_ECN == GSO_TCPV6 => {
            let ipv6 = t & !GSO_ECN == GSO_TCPV6;
            let ecn = t & GSO_ECN != 0;
            let negotiated = if ipv6 { allowed.tso6 } else { allowed.tso4 };
            if !negotiated || (ecn && !allowed.ecn) {
                return Err(BadOffload::NotNegotiated);
            }
            if hdr.gso_size == 0 {
                return Err(BadOffload::ZeroGsoSize);
            }
            // The segmenter and the header sent to the kernel use the headers as parsed, not
            // these fields; but a guest that names bytes past its frame sent a malformed
            // request, which is dropped as the kernel's own check would drop it.
            if usize::from(hdr.hdr_len) > frame.len() {
                return Err(BadOffload::HeaderLength);
            }
            if hdr.flags & F_NEEDS_CSUM != 0 {
                checksum_field(hdr, frame)?;
            }
            let plan = TsoPlan::new(frame, ipv6, ecn, usize::from(hdr.gso_size))?;
            if plan.segments() > MAX_SEGMENTS {
                return Err(BadOffload::TooManySegments);
            }
            Ok(Offload::Tso(plan))
        }
        _ => Err(BadOffload::GsoType),
    }
}

/// Where the checksum `hdr` asks for starts and where its field lies from there: the 16-bit
/// field must lie inside the frame, after the Ethernet header.
fn checksum_field(hdr: &NetHeader, frame: &[u8]) -> Result<(usize, usize), BadOffload> {
    let (start, offset) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
    if start < ETH_HLEN || start + offset + 2 > frame.len() {
        return Err(BadOffload::ChecksumOutsideFrame);
    }
    Ok((start, offset))
}

/// Makes a frame whose checksum is complete out of one with `offload` (a partial checksum
/// or none; TSO frames go through [`segment`]), in place.
pub fn complete_checksum(frame: &mut [u8], offload: &Offload) {
    if let Offload::Checksum { start, offset } = *offload {
        checksum::complete(frame, start, offset);
    }
}

#[cfg(test)]
mod tests;
