//! Flooded frames (broadcast and multicast a guest sent) into the other ports of the
//! daemon, from the NIC buffer that also carries them to the wire.

use std::sync::Arc;

use super::SwitchPort;
use crate::datapath::rx::{Framing, RxScratch};
use crate::nic::xsk::{HeldFrame, XskSocket};
use crate::vring::RxQueue;

/// A flooded frame waiting, in its NIC buffer, to be written into another port.
pub struct LocalFrame {
    pub to: Arc<SwitchPort>,
    pub frame: HeldFrame,
    /// This entry hands the buffer back after delivery. False when the buffer is also on
    /// its way to the NIC (an untagged flood) or another entry of a tagged flood owns it.
    pub owns: bool,
}

/// Writes the batch's flooded frames into their ports, one lock and one notification per
/// receiving port, then returns the frames that went nowhere else to the sender's pool.
/// Returns how many frames were delivered.
pub fn deliver_local(
    local: &mut Vec<LocalFrame>,
    sock: &mut XskSocket,
    scratch: &mut RxScratch,
    to_notify: &mut Vec<Arc<SwitchPort>>,
) -> u64 {
    if local.is_empty() {
        return 0;
    }
    // Stable by receiver, so frames to one port keep their order; a batch to one peer (the
    // usual case) is already in order and is not touched.
    if !local.is_sorted_by_key(|f| f.to.index) {
        local.sort_by_key(|f| f.to.index);
    }
    let mut delivered = 0;
    let mut start = 0;
    while start < local.len() {
        let to = local[start].to.clone();
        let end = start
            + local[start..]
                .iter()
                .take_while(|f| f.to.index == to.index)
                .count();
        // A known port without a frontend has nobody to deliver to.
        let n = to
            .with_rx_queue(|rx| {
                let frames = local[start..end].iter().map(|f| sock.held(f.frame));
                rx.deliver(frames, Framing::Bare, scratch, true, false)
            })
            .unwrap_or(0);
        if n > 0 && !to_notify.iter().any(|p| p.index == to.index) {
            to_notify.push(to.clone());
        }
        delivered += n;
        start = end;
    }
    for f in local.drain(..) {
        if f.owns {
            sock.release(f.frame);
        }
    }
    delivered
}

/// Notifies the guests of the ports that got flooded frames since the last call, once per
/// round of batches. (Unicast between ports notifies per batch, see
/// `PortTx::deliver_direct`; floods are rare and several batches of them are one wake-up.)
pub fn notify_ports(to_notify: &mut Vec<Arc<SwitchPort>>) {
    for port in to_notify.drain(..) {
        port.with_rx_queue(RxQueue::notify);
    }
}
