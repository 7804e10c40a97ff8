//! XDP steering for xvdpa.
//!
//! For each frame on the NIC: unicast to a MAC a VM port owns (on the port's VLAN, or
//! untagged for a port without one) goes to that port's AF_XDP socket for the receiving queue; broadcast and multicast go to the host stack, where the
//! daemon's packet tap copies them to the VMs as well (XDP cannot clone a frame); everything
//! else, short frames included, goes to the host stack untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use xvdpa_common::{
    xsk_slot, MacKey, PortEntry, XdpCounter, ETH_P_8021Q, MAX_NIC_QUEUES, MAX_PORTS,
    XSK_MAP_ENTRIES,
};

#[map]
static PORTS: HashMap<MacKey, PortEntry> = HashMap::with_max_entries(MAX_PORTS, 0);

#[map]
static XSKS: XskMap = XskMap::with_max_entries(XSK_MAP_ENTRIES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(XdpCounter::COUNT, 0);

#[map]
static PORT_STEERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_PORTS, 0);

const ETH_HLEN: usize = 14;

// `frags`: loaded as multi-buffer capable (BPF_F_XDP_HAS_FRAGS), so a driver hands it frames
// larger than a page (jumbo MTU) instead of refusing to attach. Only the first 18 bytes are
// read, which are always in the linear part.
#[xdp(frags)]
pub fn xvdpa_steer(ctx: XdpContext) -> u32 {
    steer(&ctx)
}

#[inline(always)]
fn count(counter: XdpCounter) {
    bump(&COUNTERS, counter as u32);
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and XDP programs do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn steer(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    // The verifier requires this exact bounds check before the header is read.
    if start + ETH_HLEN > end {
        count(XdpCounter::PassedShort);
        return xdp_action::XDP_PASS;
    }
    // SAFETY: [start, start + 14) was bounds-checked against data_end just above.
    let dst: [u8; 6] = unsafe { *(start as *const [u8; 6]) };

    // Group bit: broadcast and multicast. The host needs them (ARP for its own addresses,
    // IPv6 ND) and so do the VMs; the daemon copies them from the host side.
    if dst[0] & 1 != 0 {
        count(XdpCounter::PassedMulticast);
        return xdp_action::XDP_PASS;
    }

    // An 802.1Q tag selects the VLAN the destination is looked up in.
    // SAFETY: bytes 12..14 are inside the 14 bytes checked above.
    let ethertype: [u8; 2] = unsafe { *((start + 12) as *const [u8; 2]) };
    let key = if u16::from_be_bytes(ethertype) == ETH_P_8021Q {
        if start + ETH_HLEN + 4 > end {
            count(XdpCounter::PassedShort);
            return xdp_action::XDP_PASS;
        }
        // SAFETY: [start + 14, start + 16) was bounds-checked just above.
        let tci: [u8; 2] = unsafe { *((start + 14) as *const [u8; 2]) };
        MacKey::tagged(dst, u16::from_be_bytes(tci) & 0x0fff)
    } else {
        MacKey::new(dst)
    };
    let Some(entry) = PORTS.get_ptr(&key) else {
        count(XdpCounter::PassedUnknownUnicast);
        return xdp_action::XDP_PASS;
    };
    // SAFETY: hash map values are preallocated and stay valid for this program run.
    let port_index = unsafe { (*entry).port_index };
    let queue = ctx.rx_queue_index();
    if queue >= MAX_NIC_QUEUES || port_index >= MAX_PORTS {
        count(XdpCounter::PassedQueueOutOfRange);
        return xdp_action::XDP_PASS;
    }

    // Fallback action XDP_DROP: the frame belongs to a VM that is not connected right now;
    // the host stack has no use for it.
    match XSKS.redirect(xsk_slot(port_index, queue), xdp_action::XDP_DROP as u64) {
        Ok(action) if action == xdp_action::XDP_REDIRECT => {
            count(XdpCounter::Steered);
            bump(&PORT_STEERED, port_index);
            action
        }
        Ok(action) | Err(action) => {
            count(XdpCounter::DroppedNoSocket);
            debug!(ctx, "port {} has no socket on queue {}", port_index, queue);
            action
        }
    }
}

mod runtime;
