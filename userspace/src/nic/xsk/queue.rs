//! One NIC queue's UMEM, its binding, and the rings and frame pools its sockets share.
//!
//! The kernel allows one buffer pool per NIC queue, so ports that share a queue share its UMEM
//! (XDP_SHARED_UMEM) and with it the fill and completion rings. A [`NicQueue`] owns the UMEM
//! and an anchor socket that holds the queue's binding and those two rings for as long as the
//! daemon runs. The shared rings and the pools' free lists sit behind one mutex per NIC queue,
//! taken once per batch by the sockets of `socket.rs`.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};

use xdpilone::{DeviceQueue, IfInfo, Socket, SocketConfig, User};

use super::multi_buffer::XDP_USE_SG;
use super::umem::{RegisteredUmem, UmemArea, UmemError, UmemFrame};
use super::{setup_error, XskError, XskGeometry, XskMode, XskModeChoice};

/// How long a bind may wait for the kernel to release the queue's previous binding (a daemon
/// restarted right after the last one exited).
const BIND_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the sockets of one NIC queue share, behind the queue's mutex.
pub(super) struct SharedRings {
    /// The fill and completion rings (mapped through the anchor socket).
    device: DeviceQueue,
    /// Rx frames waiting to go back on the fill ring (it was full, or the view stale).
    pub(super) rx_recycle: Vec<UmemFrame>,
    /// Tx frames nobody holds.
    pub(super) tx_free: Vec<UmemFrame>,
    /// Tx frames on some socket's tx ring or in the completion ring.
    pub(super) tx_in_flight: u32,
}

impl SharedRings {
    /// Returns recycled rx frames to the fill ring, waking the driver if it asks to be.
    pub(super) fn refill(&mut self, area: &UmemArea) {
        // A pass may be limited by xdpilone's cached view of the ring; go until no progress.
        while !self.rx_recycle.is_empty() {
            let n = {
                let mut writer = self.device.fill(self.rx_recycle.len() as u32);
                let n = writer.insert(self.rx_recycle.iter().map(|f| area.addr(f))) as usize;
                writer.commit();
                n
            };
            if n == 0 {
                break;
            }
            // The kernel owns these frames now; their tokens end here.
            self.rx_recycle.drain(..n);
        }
        if self.device.needs_wakeup() {
            self.device.wake();
        }
    }

    /// Collects transmitted frames back into the free list; returns how many.
    pub(super) fn reap(&mut self, area: &UmemArea) -> u32 {
        let mut total = 0;
        // Two passes at most, for the same cached-view reason as in `refill`.
        for _ in 0..2 {
            if self.tx_in_flight == 0 {
                break;
            }
            let mut reader = self.device.complete(self.tx_in_flight);
            let mut n = 0;
            while let Some(addr) = reader.read() {
                // SAFETY: `addr` comes from this UMEM's completion ring: a frame some socket
                // put on its tx ring (dropping its token) that the kernel has sent.
                if let Some((frame, _)) = unsafe { area.reclaim(addr) } {
                    self.tx_free.push(frame);
                }
                n += 1;
            }
            reader.release();
            self.tx_in_flight -= n.min(self.tx_in_flight);
            total += n;
            if n == 0 {
                break;
            }
        }
        total
    }
}

/// One NIC queue's UMEM, shared rings and binding.
pub struct NicQueue {
    // Field order is drop order: rings and the anchor socket close before the UMEM goes.
    shared: Mutex<SharedRings>,
    _anchor: User,
    pub(super) umem: RegisteredUmem,
    pub(super) info: IfInfo,
    pub(super) ifname: String,
    pub(super) queue_id: u32,
    pub(super) geometry: XskGeometry,
    pub(super) mode: XskMode,
}

impl NicQueue {
    /// Registers the queue's UMEM and binds its anchor socket, trying zero-copy first when
    /// `choice` allows it.
    ///
    /// The kernel releases a closed socket's hold on its queue after an RCU grace period, so
    /// binding right after a previous daemon exited can see EBUSY for a moment; that is
    /// retried briefly before it counts as a failure.
    pub fn open(
        ifname: &str,
        ifindex: u32,
        queue_id: u32,
        geometry: XskGeometry,
        choice: XskModeChoice,
    ) -> Result<Arc<Self>, XskError> {
        let deadline = std::time::Instant::now() + BIND_RELEASE_WAIT;
        loop {
            let attempt = match choice {
                XskModeChoice::Copy => Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::Copy),
                XskModeChoice::ZeroCopy => Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::ZeroCopy),
                XskModeChoice::Auto => Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::ZeroCopy)
                    .or_else(|zc_err| {
                        tracing::debug!(%ifname, queue_id, error = %zc_err, "zero-copy AF_XDP not available; using copy mode");
                        Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::Copy)
                    }),
            };
            match attempt {
                Err(XskError::Setup { ref source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.map(Arc::new),
            }
        }
    }

    fn open_mode(
        ifname: &str,
        ifindex: u32,
        queue_id: u32,
        geometry: XskGeometry,
        mode: XskMode,
    ) -> Result<Self, XskError> {
        let fail = setup_error(ifname, queue_id);
        let (area, mut rx_pool) =
            UmemArea::new(geometry.fill_size + geometry.ring_size, geometry.frame_size)
                .map_err(|e| umem_error(e, ifname, queue_id))?;
        let umem = area
            // TX metadata hands checksums to the kernel, which completes them in copy mode
            // whatever the NIC (a CHECKSUM_PARTIAL skb: the NIC's checksum offload, or
            // software when it has none). A zero-copy driver ignores a request it cannot
            // carry out, unless it announces the offload (netlink's xsk-features), which is
            // not read yet: there the daemon completes checksums itself.
            .register(
                geometry.fill_size,
                geometry.ring_size,
                mode == XskMode::Copy,
            )
            .map_err(|e| umem_error(e, ifname, queue_id))?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(fail("interface lookup"))?;
        info.set_queue(queue_id);
        // The anchor is the UMEM's own socket: it owns the fill and completion rings and a
        // minimal tx ring (a bind needs rx or tx). It is never in the steering map.
        let anchor_sock = Socket::with_shared(&info, umem.xdp()).map_err(fail("socket"))?;
        let device = umem
            .xdp()
            .fq_cq(&anchor_sock)
            .map_err(fail("fill/completion rings"))?;
        let mode_flag = mode.bind_flag();
        // Multi-buffer is a property of the UMEM's binding: the sockets that share it inherit
        // it (they may not pass bind flags of their own).
        let sg_flag = if geometry.multi_buffer { XDP_USE_SG } else { 0 };
        let anchor = umem
            .xdp()
            .rx_tx(
                &anchor_sock,
                &SocketConfig {
                    rx_size: None,
                    tx_size: NonZeroU32::new(64),
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP | mode_flag | sg_flag,
                },
            )
            .map_err(fail("anchor ring"))?;
        umem.xdp().bind(&anchor).map_err(fail(match mode {
            XskMode::ZeroCopy => "zero-copy bind",
            XskMode::Copy => "copy-mode bind",
        }))?;

        // The first `fill_size` frames cycle through the fill and rx rings, the rest through
        // the tx and completion rings. The tx list is reversed so frames go out lowest first.
        let mut tx_pool = rx_pool.split_off(geometry.fill_size as usize);
        tx_pool.reverse();
        let mut shared = SharedRings {
            device,
            rx_recycle: rx_pool,
            tx_free: tx_pool,
            tx_in_flight: 0,
        };
        shared.refill(umem.area());
        Ok(NicQueue {
            shared: Mutex::new(shared),
            _anchor: anchor,
            umem,
            info,
            ifname: ifname.to_string(),
            queue_id,
            geometry,
            mode,
        })
    }

    pub fn mode(&self) -> XskMode {
        self.mode
    }

    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// The UMEM's memory, to reach frames through their tokens.
    pub(super) fn area(&self) -> &UmemArea {
        self.umem.area()
    }

    /// Where a transmitted frame's data starts in its UMEM frame: after the TX metadata, when
    /// the UMEM has room for it (the kernel then checks every tx descriptor for that room).
    pub(super) fn tx_data_start(&self) -> usize {
        self.umem.tx_metadata_len() as usize
    }

    /// The shared rings and pools; taken once per batch, never per frame.
    pub(super) fn lock(&self) -> MutexGuard<'_, SharedRings> {
        crate::sync::lock(&self.shared)
    }
}

/// The daemon's error for a UMEM that could not be set up on `ifname` queue `queue_id`.
fn umem_error(e: UmemError, ifname: &str, queue_id: u32) -> XskError {
    match e {
        UmemError::Map { bytes, source } => XskError::Mmap { bytes, source },
        UmemError::Register(source) => XskError::Setup {
            what: "UMEM registration",
            ifname: ifname.to_string(),
            queue: queue_id,
            source,
        },
    }
}
