//! AF_XDP: one UMEM per NIC queue, shared by the sockets of every port on that queue.
//!
//! - `umem.rs`: the UMEM mapping ([`UmemArea`]), its registration ([`RegisteredUmem`]), and
//!   the [`UmemFrame`] tokens that say who owns which frame; the only code that turns a UMEM
//!   offset into bytes.
//! - `queue.rs`: a [`NicQueue`]: one NIC queue's UMEM, its binding (an anchor socket), and the
//!   fill and completion rings and frame pools that the queue's sockets share.
//! - `socket.rs`: an [`XskSocket`]: one port's rx and tx rings on a NIC queue, and the frames
//!   it holds between batches ([`FrameView`] lets other ports read them until the flush).
//!
//! - `guest_umem.rs`: a guest's RAM file registered as the UMEM of a port with a NIC queue of
//!   its own ([`guest_umem::GuestUmem`]), so received frames land in the guest's buffers, and
//!   its receive socket on that queue ([`guest_umem::GuestRxSocket`]).
//!
//! This file holds what those share: modes, errors, sizes, kernel counters. Outside the
//! daemon, the benchmark's AF_XDP generator maps its UMEM with [`UmemArea`] too.

pub mod guest_umem;
mod multi_buffer;
mod queue;
mod socket;
#[cfg(test)]
mod tests;
mod umem;

use std::io;

pub use multi_buffer::MAX_PIECES;
pub use queue::NicQueue;
pub use socket::{FrameView, XskSocket};
pub use umem::{RegisteredUmem, UmemArea, UmemError, UmemFrame};

/// How the socket moves frames; reported in the log at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XskMode {
    /// The driver DMAs straight into UMEM.
    ZeroCopy,
    /// The kernel copies between its buffers and UMEM (veth, drivers without AF_XDP support).
    Copy,
}

impl XskMode {
    /// The bind flag that asks the kernel for this mode.
    pub(crate) fn bind_flag(self) -> u16 {
        match self {
            XskMode::ZeroCopy => xdpilone::SocketConfig::XDP_BIND_ZEROCOPY,
            XskMode::Copy => xdpilone::SocketConfig::XDP_BIND_COPY,
        }
    }
}

/// Which modes to try, as `--xsk-mode` and the config file's `xsk_mode` spell it (`auto`,
/// `zero-copy`, `copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XskModeChoice {
    /// Zero-copy where the driver supports it, else copy.
    #[default]
    Auto,
    ZeroCopy,
    Copy,
}

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("cannot map {bytes} bytes of UMEM: {source}")]
    Mmap { bytes: usize, source: io::Error },
    #[error("AF_XDP {what} on {ifname} queue {queue}: {source}")]
    Setup {
        what: &'static str,
        ifname: String,
        queue: u32,
        source: io::Error,
    },
}

/// Sizes of a NIC queue's UMEM and of the rings of its sockets.
#[derive(Debug, Clone, Copy)]
pub struct XskGeometry {
    /// Bytes per UMEM frame; a received or sent frame must fit one unless `multi_buffer`.
    pub frame_size: u32,
    /// Entries of the completion ring and frames of the tx pool (power of two).
    pub ring_size: u32,
    /// Entries of the fill ring and frames of the rx pool (power of two). Larger than the
    /// tx side: frames waiting in the sockets' rx rings and backlogs are out of the fill ring,
    /// and an empty fill ring makes the kernel drop (`rx_dropped_no_umem_frame`).
    pub fill_size: u32,
    /// Entries of each port socket's rx and tx rings (power of two).
    pub socket_ring_size: u32,
    /// Frames may span several UMEM frames (`XDP_USE_SG`, Linux 6.6+), for an MTU larger
    /// than one frame holds. Off unless needed: zero-copy drivers without multi-buffer
    /// support refuse the flag.
    pub multi_buffer: bool,
}

impl Default for XskGeometry {
    fn default() -> Self {
        XskGeometry {
            frame_size: 4096,
            ring_size: 2048,
            fill_size: 2048,
            socket_ring_size: 2048,
            multi_buffer: false,
        }
    }
}

impl XskGeometry {
    /// The default geometry for frames up to `max_frame` bytes (Ethernet header and VLAN tag
    /// included): multi-buffer on when one received frame would not fit a UMEM frame after
    /// the kernel's headroom.
    pub fn for_frames_up_to(max_frame: usize) -> Self {
        let geometry = XskGeometry::default();
        XskGeometry {
            multi_buffer: max_frame > geometry.rx_frame_room(),
            ..geometry
        }
    }

    /// Bytes of a received frame one UMEM frame holds.
    pub fn rx_frame_room(&self) -> usize {
        (self.frame_size - RX_HEADROOM) as usize
    }

    /// Bytes of UMEM one NIC queue maps.
    pub fn umem_bytes(&self) -> u64 {
        u64::from(self.fill_size + self.ring_size) * u64::from(self.frame_size)
    }
}

/// Counters the kernel keeps for one socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct XskKernelStats {
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
}

impl XskKernelStats {
    /// The counters of `user`'s socket (zero if the kernel does not tell).
    fn of(user: &xdpilone::User) -> Self {
        match user.statistics_v2() {
            Ok(s) => XskKernelStats {
                rx_dropped: s.rx_dropped,
                rx_ring_full: s.rx_ring_full,
                rx_fill_ring_empty: s.rx_fill_ring_empty_descs,
                rx_invalid_descs: s.rx_invalid_descs,
                tx_invalid_descs: s.tx_invalid_descs,
            },
            Err(_) => XskKernelStats::default(),
        }
    }
}

/// The `io::Error` for an errno xdpilone reports (it may carry it negated).
fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

/// Makes `fail(what)`, which turns an xdpilone error in step `what` of setting up a socket on
/// `ifname` queue `queue_id` into the daemon's error.
fn setup_error(
    ifname: &str,
    queue_id: u32,
) -> impl Fn(&'static str) -> Box<dyn Fn(xdpilone::Errno) -> XskError> + '_ {
    move |what| {
        let ifname = ifname.to_string();
        Box::new(move |e| XskError::Setup {
            what,
            ifname: ifname.clone(),
            queue: queue_id,
            source: errno(e),
        })
    }
}

/// Kicks the kernel to send what waits on `tx`. Copy mode transmits only inside sendto,
/// whatever the need-wakeup flag of a socket sharing the UMEM says; each call moves a bounded
/// batch, so this keeps kicking while the kernel makes progress rather than leave frames on
/// the ring until the next event.
fn kick_tx(tx: &mut xdpilone::RingTx, mode: XskMode) {
    let copy = mode == XskMode::Copy;
    for _ in 0..64 {
        if tx.pending() == 0 || !(copy || tx.needs_wakeup()) {
            break;
        }
        let before = tx.pending();
        tx.wake();
        if tx.pending() == before {
            break;
        }
    }
}

/// How many receive queues the interface has (each gets its own socket).
pub fn rx_queue_count(ifname: &str) -> io::Result<u32> {
    let dir = format!("/sys/class/net/{ifname}/queues");
    let n = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok((n as u32).max(1))
}

/// Headroom the kernel leaves before received data; exported for sizing checks.
/// (XDP_PACKET_HEADROOM; the UMEM itself is registered with none of its own.)
pub const RX_HEADROOM: u32 = 256;
