//! Types shared by the XDP steering program (`ebpf/`) and the daemon (`userspace/`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel copies these bytes between the two
//! sides through BPF maps, so layout, not Rust semantics, is the contract.
#![no_std]

/// Ports (VM attachments) one daemon can serve on one NIC.
pub const MAX_PORTS: u32 = 256;

/// NIC receive queues the steering map has room for, per port.
pub const MAX_NIC_QUEUES: u32 = 64;

/// Size of the `XSKS` map: one AF_XDP socket slot per (port, NIC queue).
pub const XSK_MAP_ENTRIES: u32 = MAX_PORTS * MAX_NIC_QUEUES;

/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "xvdpa_steer";
/// Destination MAC -> [`PortEntry`].
pub const PORTS_MAP: &str = "PORTS";
/// (port, NIC queue) -> AF_XDP socket.
pub const XSKS_MAP: &str = "XSKS";
/// Per-CPU array of [`XdpCounter`]s.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Per-CPU array, one `u64` per port: frames steered to that port.
pub const PORT_STEERED_MAP: &str = "PORT_STEERED";

/// Key of the steering map: a destination MAC and the 802.1Q VLAN ID the frame carries
/// (0: untagged). 8 bytes with no padding, so hash lookups compare exactly these fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MacKey {
    pub addr: [u8; 6],
    /// VLAN ID in native byte order; 0 for an untagged frame.
    pub vlan: u16,
}

impl MacKey {
    /// An untagged destination.
    pub const fn new(addr: [u8; 6]) -> Self {
        MacKey { addr, vlan: 0 }
    }

    /// A destination on VLAN `vlan` (1..=4094).
    pub const fn tagged(addr: [u8; 6], vlan: u16) -> Self {
        MacKey { addr, vlan }
    }
}

/// The 802.1Q tag protocol identifier.
pub const ETH_P_8021Q: u16 = 0x8100;

/// Value of the steering map: which port owns the MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PortEntry {
    /// Slot of the port; its sockets sit at `XSKS[port_index * MAX_NIC_QUEUES + queue]`.
    pub port_index: u32,
    /// Reserved for per-port steering options (VLAN); zero today.
    pub flags: u32,
}

/// Index into the `XSKS` map for a port and the NIC queue a frame arrived on.
#[inline(always)]
pub const fn xsk_slot(port_index: u32, nic_queue: u32) -> u32 {
    port_index * MAX_NIC_QUEUES + nic_queue
}

/// What the XDP program did with a frame, one per-CPU `u64` each.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Unicast to a served VM, redirected to its AF_XDP socket.
    Steered = 0,
    /// Unicast to a MAC no port owns: left to the host stack.
    PassedUnknownUnicast = 1,
    /// Broadcast or multicast: left to the host stack (the daemon copies it to the VMs).
    PassedMulticast = 2,
    /// Shorter than an Ethernet header: left to the host stack untouched.
    PassedShort = 3,
    /// The frame arrived on a NIC queue beyond `MAX_NIC_QUEUES`: left to the host stack.
    PassedQueueOutOfRange = 4,
    /// Unicast to a served VM whose socket for this queue is not bound (VM not connected).
    DroppedNoSocket = 5,
}

impl XdpCounter {
    pub const COUNT: u32 = 6;
    pub const ALL: [XdpCounter; Self::COUNT as usize] = [
        XdpCounter::Steered,
        XdpCounter::PassedUnknownUnicast,
        XdpCounter::PassedMulticast,
        XdpCounter::PassedShort,
        XdpCounter::PassedQueueOutOfRange,
        XdpCounter::DroppedNoSocket,
    ];

    /// Stable name used in logs, `xvdpa stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::Steered => "steered",
            XdpCounter::PassedUnknownUnicast => "passed_unknown_unicast",
            XdpCounter::PassedMulticast => "passed_multicast",
            XdpCounter::PassedShort => "passed_short",
            XdpCounter::PassedQueueOutOfRange => "passed_queue_out_of_range",
            XdpCounter::DroppedNoSocket => "dropped_no_socket",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only integers and no implicit padding (6 + 2 bytes), so every bit
    // pattern is valid.
    unsafe impl aya::Pod for super::MacKey {}
    // SAFETY: repr(C), two u32s and no padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::PortEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel_side() {
        assert_eq!(core::mem::size_of::<MacKey>(), 8);
        assert_eq!(core::mem::size_of::<PortEntry>(), 8);
        assert_eq!(
            xsk_slot(MAX_PORTS - 1, MAX_NIC_QUEUES - 1),
            XSK_MAP_ENTRIES - 1
        );
        for (i, c) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "ALL must be in discriminant order");
        }
    }
}
