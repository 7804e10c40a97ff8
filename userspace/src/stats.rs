//! Datapath counters: written by the queue workers once per batch, read by the control plane.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $($(#[$fm])* pub $field: AtomicU64,)* }

        impl $name {
            /// (name, value) of every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Counters of one queue pair of one port.
    QueueStats {
        /// Frames written to the guest (unicast from AF_XDP and group-addressed from the tap).
        rx_packets,
        rx_bytes,
        /// Guest buffers (chains) those frames used.
        rx_buffers,
        /// Group-addressed frames copied from the host side.
        rx_multicast,
        /// Frames larger than any buffer the guest posts (no MRG_RXBUF), or than any the link
        /// carries (a multi-buffer frame from the NIC in too many pieces).
        rx_dropped_too_large,
        /// The guest had no receive buffers.
        rx_dropped_guest_ring_full,
        /// The guest's receive queue was not running (driver not loaded, or reset).
        rx_dropped_queue_stopped,
        /// The kernel found the socket's rx ring full (backpressure reached the NIC).
        rx_dropped_xsk_ring_full,
        /// The kernel had no free UMEM frame on the fill ring for a frame to this port.
        rx_dropped_no_umem_frame,
        /// Receive buffers the single-copy path (`guest-umem=on`) could not hand the kernel
        /// (shorter than the net header and the largest frame, outside one region of the guest's
        /// memory file, or already posted): returned to the guest unused.
        rx_buffers_refused,
        /// Frames the single-copy path received into a spare frame of the daemon's own, the
        /// guest having posted too few buffers, and copied into the guest's next chain
        /// (included in rx_packets): how often the guest fell behind.
        rx_spare_frames,
        /// Frames from another port of the daemon (included in rx_packets).
        rx_switched,
        /// Frames from the NIC merged into the frame before them (software GRO): rx_packets
        /// counts the merged frame once.
        rx_coalesced,
        /// Frames from the NIC whose checksums were verified and marked so (DATA_VALID).
        rx_csum_verified,
        tx_packets,
        tx_bytes,
        /// Frames to another port of the daemon, not the NIC (included in tx_packets; the
        /// receiving port's rx counters say what fitted its ring).
        tx_switched,
        /// TSO frames the guest sent (each is one of tx_packets).
        tx_gso_frames,
        /// Frames the software segmenter made from them (for the NIC, or for a guest that
        /// does not take TSO frames).
        tx_segments,
        /// TSO frames handed to the kernel whole (`tx-gso=kernel`), one GSO skb each that the
        /// NIC or the kernel cuts (each is one of tx_gso_frames; tx_segments does not count
        /// their segments).
        tx_gso_kernel,
        /// Partial checksums completed in software.
        tx_csum_computed,
        /// Frames handed to the NIC with their checksum left for the kernel or the NIC to
        /// complete (AF_XDP TX metadata): NEEDS_CSUM frames and segments of TSO frames.
        tx_csum_offloaded,
        /// Frames handed to another guest with their offload intact (it negotiated it).
        tx_offload_passed,
        /// Frames the single-copy path (`guest-umem=on`) sent from the guest's own buffers,
        /// only their headers copied (included in tx_packets; that path copies the others
        /// whole).
        tx_in_place,
        /// Transmit completions that named no frame in flight (ignored).
        tx_completions_unknown,
        tx_dropped_oversized,
        tx_dropped_runt,
        /// Offload requests that were not negotiated or do not fit the frame.
        tx_dropped_offload,
        /// Sent with a source MAC the port may not use.
        tx_dropped_spoofed,
        /// Over the port's rate limit.
        tx_dropped_rate_limited,
        /// Carried a VLAN tag of its own, on a port without `vlan-passthrough`.
        tx_dropped_vlan,
        /// TSO frames for the kernel it did not take (its socket buffer or the device's queue
        /// full, or refused); not in tx_packets.
        tx_dropped_gso_kernel,
        /// Queues stopped because the guest broke the ring's rules.
        queue_errors,
        notifications_sent,
        notifications_suppressed,
    }
}

impl QueueStats {
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
