//! The virtio-net device model: feature bits, config space and the net header.
//!
//! Follows Linux vhost-vdpa's virtio-net: only features that work end to end are offered, the
//! config space has the standard layout (mac, status, max_virtqueue_pairs, mtu, speed, duplex),
//! and it is served for frontends that read it through VHOST_USER_GET_CONFIG. What the
//! transport (vhost-user) adds on top lives in `vhost::backend`.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_SPEED_DUPLEX,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::mac::MacAddr;

/// VIRTIO_F_ANY_LAYOUT (bit 27): implied by VERSION_1, offered for legacy-aware drivers.
const VIRTIO_F_ANY_LAYOUT: u32 = 27;

/// Size of `virtio_net_hdr_v1` (VERSION_1 always uses it, with or without MRG_RXBUF).
pub const VNET_HDR_LEN: usize = 12;

/// Offset of `num_buffers` inside `virtio_net_hdr_v1`.
pub const VNET_HDR_NUM_BUFFERS: usize = 10;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;

/// Bytes of an 802.1Q tag (TPID and TCI), which a tagged port's frames carry on the wire.
pub const VLAN_TAG_LEN: usize = 4;

/// Largest MTU the datapath accepts. Above 3800 a frame (MTU + Ethernet header + one VLAN tag)
/// no longer fits one UMEM frame after the kernel's headroom and the NIC side goes
/// multi-buffer; 9000 is the common jumbo MTU, and the packet tap's 9216-byte buffers hold its
/// frames with room to spare.
pub const MAX_MTU: u16 = 9000;

/// Queue pairs one port may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// The offload bits: partial checksums and TCP segmentation both ways, with ECN. What a
/// guest sends is completed or segmented in software where the receiver cannot take it
/// (`datapath::offload`); what it receives carries offloads only from other guests.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN);

/// `VHOST_F_LOG_ALL`: the backend logs every guest page it writes while the frontend asks it
/// to, which QEMU requires before it migrates a guest (`dirty_log`).
pub const VHOST_F_LOG_ALL: u32 = 26;

/// The virtio feature bits xvdpa offers to a port with `queue_pairs` queue pairs. MQ is
/// offered only with more than one; the control queue stays with the VMM (QEMU handles
/// VIRTIO_NET_F_CTRL_VQ itself and turns VQ_PAIRS_SET into SET_VRING_ENABLE).
///
/// GUEST_ANNOUNCE lives on that control queue too: after a migration QEMU sets the
/// ANNOUNCE status bit, the guest sends its gratuitous ARP (and IPv6 neighbour
/// advertisements) through its transmit ring, which the datapath carries like any frame, and
/// acknowledges on the control queue, which QEMU serves. QEMU lets a guest negotiate it only
/// if the backend offers the bit (it is in QEMU's list of vhost-user feature bits) and its own
/// control queue is on; with it, QEMU sends no SEND_RARP for that guest.
pub fn device_features(queue_pairs: u16) -> u64 {
    let mq = if queue_pairs > 1 {
        1u64 << VIRTIO_NET_F_MQ
    } else {
        0
    };
    mq | (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_F_ANY_LAYOUT)
        | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_NET_F_MAC)
        | (1u64 << VIRTIO_NET_F_STATUS)
        | (1u64 << VIRTIO_NET_F_MTU)
        | (1u64 << VIRTIO_NET_F_MRG_RXBUF)
        | (1u64 << VIRTIO_NET_F_SPEED_DUPLEX)
        | (1u64 << VIRTIO_NET_F_GUEST_ANNOUNCE)
        | (1u64 << VHOST_F_LOG_ALL)
        | OFFLOAD_FEATURES
}

/// The offloads one direction of a port negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (CSUM for what the guest sends, GUEST_CSUM for what it takes).
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    /// TSO frames with CWR set (HOST_ECN / GUEST_ECN).
    pub ecn: bool,
}

impl Offloads {
    fn from_bits(bits: u64, csum: u32, tso4: u32, tso6: u32, ecn: u32) -> Self {
        let has = |bit: u32| bits & (1 << bit) != 0;
        Offloads {
            csum: has(csum),
            tso4: has(tso4),
            tso6: has(tso6),
            ecn: has(ecn),
        }
    }
}

/// Features the driver acknowledged, decoded once so the datapath reads plain booleans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NegotiatedFeatures {
    pub bits: u64,
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
    /// What the guest may ask of the device for frames it sends (CSUM, HOST_*).
    pub tx_offloads: Offloads,
    /// What the guest takes in frames it receives (GUEST_*).
    pub rx_offloads: Offloads,
}

impl NegotiatedFeatures {
    pub fn new(bits: u64) -> Self {
        NegotiatedFeatures {
            bits,
            mrg_rxbuf: bits & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            event_idx: bits & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            tx_offloads: Offloads::from_bits(
                bits,
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
            ),
            rx_offloads: Offloads::from_bits(
                bits,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
            ),
        }
    }
}

/// Link duplex as reported in the config space.
pub const DUPLEX_FULL: u8 = 1;
/// `speed` value meaning unknown.
pub const SPEED_UNKNOWN: u32 = u32::MAX;

/// The device config space (`struct virtio_net_config`), up to and including `duplex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: MacAddr,
    pub link_up: bool,
    pub max_virtqueue_pairs: u16,
    pub mtu: u16,
    /// Mbit/s, or [`SPEED_UNKNOWN`].
    pub speed: u32,
    pub duplex: u8,
}

impl NetConfig {
    /// Bytes of the config space this device exposes.
    pub const LEN: usize = 6 + 2 + 2 + 2 + 4 + 1;

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..6].copy_from_slice(&self.mac.0);
        let status: u16 = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        b[6..8].copy_from_slice(&status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b[12..16].copy_from_slice(&self.speed.to_le_bytes());
        b[16] = self.duplex;
        b
    }

    /// The `size` bytes at `offset`, as VHOST_USER_GET_CONFIG asks. Out-of-range requests get
    /// an empty answer, which the vhost-user library reports to the frontend as a failure.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= bytes.len() => bytes[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }
}

/// The receive header: no offloads, `num_buffers` filled in.
pub fn rx_header(num_buffers: u16) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[VNET_HDR_NUM_BUFFERS..].copy_from_slice(&num_buffers.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NetConfig {
        NetConfig {
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            link_up: true,
            max_virtqueue_pairs: 1,
            mtu: 1500,
            speed: 10000,
            duplex: DUPLEX_FULL,
        }
    }

    #[test]
    fn config_space_layout_matches_virtio_net_config() {
        let b = config().to_bytes();
        assert_eq!(&b[0..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 1, "LINK_UP");
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 1);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1500);
        assert_eq!(u32::from_le_bytes([b[12], b[13], b[14], b[15]]), 10000);
        assert_eq!(b[16], DUPLEX_FULL);
    }

    #[test]
    fn config_reads_are_bounds_checked() {
        let c = config();
        assert_eq!(c.read(10, 2), 1500u16.to_le_bytes().to_vec());
        assert!(c.read(16, 2).is_empty());
        assert!(c.read(u32::MAX, 2).is_empty());
        let mut down = c;
        down.link_up = false;
        assert_eq!(down.read(6, 2), vec![0, 0]);
    }

    #[test]
    fn offered_features_are_the_implemented_ones() {
        use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_UFO};
        let f = device_features(1);
        assert_eq!(
            f & (1 << VIRTIO_NET_F_MQ),
            0,
            "MQ only with several queue pairs"
        );
        assert_ne!(device_features(4) & (1 << VIRTIO_NET_F_MQ), 0);
        assert_eq!(f & (1 << VIRTIO_NET_F_HOST_UFO), 0);
        assert_eq!(f & (1 << VIRTIO_NET_F_GUEST_UFO), 0);
        assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
        // Served by QEMU's control queue; the guest's own announcement is an ordinary frame.
        assert_ne!(f & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE), 0);
        let n = NegotiatedFeatures::new(f);
        assert!(n.mrg_rxbuf && n.event_idx);
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
        };
        assert_eq!((n.tx_offloads, n.rx_offloads), (all, all));
        // A guest that turned receive offloads off keeps its transmit ones.
        let n = NegotiatedFeatures::new(f & !(1 << VIRTIO_NET_F_GUEST_TSO4));
        assert!(!n.rx_offloads.tso4 && n.tx_offloads.tso4);
    }

    #[test]
    fn rx_header_carries_num_buffers() {
        let h = rx_header(3);
        assert_eq!(&h[..10], &[0u8; 10]);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 3);
    }
}
