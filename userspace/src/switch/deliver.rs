//! Flooded frames (broadcast and multicast a guest sent) into the other ports of the
//! daemon, from the NIC buffer that also carries them to the wire.

use std::sync::Arc;

use super::SwitchPort;
use crate::datapath::rx::{Framing, RxScratch};
use crate::nic::xsk::{FrameView, XskSocket};
use crate::vring::RxQueue;

/// A flooded frame waiting, in its NIC buffer, to be written into another port. The
/// sender's socket owns the buffer until its next flush (staged for the NIC, or held for the
/// peers only); this is a view of it, so however many ports read it, none releases it.
pub struct LocalFrame {
    pub to: Arc<SwitchPort>,
    pub frame: FrameView,
}

/// Writes the batch's flooded frames into their ports, one lock and one notification per
/// receiving port; call it before the sender's `flush_tx`, which ends the views. Returns how
/// many frames were delivered.
pub fn deliver_local(
    local: &mut Vec<LocalFrame>,
    sock: &XskSocket,
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
                let frames = local[start..end].iter().map(|f| sock.view(f.frame));
                rx.deliver(frames, Framing::Bare, scratch, true, false)
            })
            .unwrap_or(0);
        if n > 0 && !to_notify.iter().any(|p| p.index == to.index) {
            to_notify.push(to.clone());
        }
        delivered += n;
        start = end;
    }
    local.clear();
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
