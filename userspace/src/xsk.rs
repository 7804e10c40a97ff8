//! AF_XDP sockets: one UMEM, fill/completion ring pair and rx/tx ring pair per NIC queue.
//!
//! UMEM frames are split in two fixed pools: the first half cycles through the fill and rx
//! rings, the second half through the tx and completion rings. A frame is therefore always in
//! exactly one place (a kernel ring, the rx backlog, or the tx free list), so a socket never
//! leaks frames and ring overflows are impossible by construction.

use std::collections::VecDeque;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

use crate::datapath::tx::TxBuffers;

/// How the socket moves frames; reported in the log at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XskMode {
    /// The driver DMAs straight into UMEM.
    ZeroCopy,
    /// The kernel copies between its buffers and UMEM (veth, drivers without AF_XDP support).
    Copy,
}

/// Which modes to try, from the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
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
    Setup { what: &'static str, ifname: String, queue: u32, source: io::Error },
}

/// How long a bind may wait for the kernel to release the queue's previous socket.
const BIND_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sizes of one socket's rings and UMEM.
#[derive(Debug, Clone, Copy)]
pub struct XskGeometry {
    /// Bytes per UMEM frame; a received or sent frame must fit one.
    pub frame_size: u32,
    /// Entries of each ring, and frames in each of the two pools (power of two).
    pub ring_size: u32,
}

impl Default for XskGeometry {
    fn default() -> Self {
        XskGeometry { frame_size: 4096, ring_size: 2048 }
    }
}

/// Room the kernel keeps in front of a received frame (XDP_PACKET_HEADROOM).
const XDP_PACKET_HEADROOM: u32 = 256;

/// Anonymous memory for a UMEM, unmapped on drop.
struct UmemArea {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the area is plain memory owned by this value; access is coordinated by the rings.
unsafe impl Send for UmemArea {}

impl UmemArea {
    fn new(len: usize) -> Result<Self, XskError> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(XskError::Mmap { bytes: len, source: io::Error::last_os_error() });
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap never returns null on success");
        Ok(UmemArea { ptr, len })
    }

    fn as_slice_ptr(&self) -> NonNull<[u8]> {
        NonNull::slice_from_raw_parts(self.ptr, self.len)
    }

    /// Bytes `[offset, offset + len)` of the area, if in bounds.
    fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = usize::try_from(offset).ok()?.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of the live mapping (checked above). Callers only ask for frames
        // the kernel handed back through the rx ring, which it no longer writes.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset as usize), len) })
    }

    /// Mutable bytes `[offset, offset + len)`, if in bounds.
    #[allow(clippy::mut_from_ref)]
    fn get_mut(&self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let end = usize::try_from(offset).ok()?.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of the live mapping. Callers only ask for frames on the tx free
        // list, which neither the kernel nor any other reference touches until submitted.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset as usize), len) })
    }
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; the socket holding it as UMEM
        // is closed first (field order in `XskSocket`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
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

/// One AF_XDP socket bound to one NIC queue.
pub struct XskSocket {
    // Field order is drop order: rings and sockets close before the UMEM area is unmapped.
    rx: RingRx,
    tx: RingTx,
    device: DeviceQueue,
    user: User,
    _umem: Umem,
    area: UmemArea,
    geometry: XskGeometry,
    mode: XskMode,
    queue_id: u32,
    /// Frames read from the rx ring but not yet delivered (the guest had no buffers).
    rx_backlog: VecDeque<XdpDesc>,
    /// Rx frames to give back to the fill ring.
    rx_recycle: Vec<u64>,
    /// Tx frames free for the next transmit.
    tx_free: Vec<u64>,
    /// Tx frames filled but not yet on the tx ring.
    tx_staged: Vec<XdpDesc>,
    /// Frames on the tx ring or waiting in the completion ring.
    tx_in_flight: u32,
}

// SAFETY: the rings and UMEM are raw pointers into mappings this value owns exclusively;
// nothing else refers to them, so moving the whole socket to another thread is sound. It is
// not Sync: only the thread holding it (under the worker's mutex) touches the rings.
unsafe impl Send for XskSocket {}

fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

impl XskSocket {
    /// Creates the socket, trying zero-copy first when `choice` allows it.
    ///
    /// The kernel releases a closed socket's hold on its queue after an RCU grace period
    /// (the XSKMAP entry drops its reference late), so binding right after the previous
    /// socket on the queue closed (a VM reconnecting) can see EBUSY for a moment; that is
    /// retried briefly before it counts as a failure.
    pub fn open(
        ifname: &str,
        ifindex: u32,
        queue_id: u32,
        geometry: XskGeometry,
        choice: XskModeChoice,
    ) -> Result<Self, XskError> {
        let deadline = std::time::Instant::now() + BIND_RELEASE_WAIT;
        loop {
            match Self::open_once(ifname, ifindex, queue_id, geometry, choice) {
                Err(XskError::Setup { ref source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open_once(
        ifname: &str,
        ifindex: u32,
        queue_id: u32,
        geometry: XskGeometry,
        choice: XskModeChoice,
    ) -> Result<Self, XskError> {
        match choice {
            XskModeChoice::Copy => Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::Copy),
            XskModeChoice::ZeroCopy => Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::ZeroCopy),
            XskModeChoice::Auto => Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::ZeroCopy)
                .or_else(|zc_err| {
                    tracing::debug!(%ifname, queue_id, error = %zc_err, "zero-copy AF_XDP not available; using copy mode");
                    Self::open_mode(ifname, ifindex, queue_id, geometry, XskMode::Copy)
                }),
        }
    }

    fn open_mode(
        ifname: &str,
        ifindex: u32,
        queue_id: u32,
        geometry: XskGeometry,
        mode: XskMode,
    ) -> Result<Self, XskError> {
        let fail = |what: &'static str| {
            let ifname = ifname.to_string();
            move |e: xdpilone::Errno| XskError::Setup { what, ifname, queue: queue_id, source: errno(e) }
        };
        let pool = geometry.ring_size as usize;
        let area = UmemArea::new(2 * pool * geometry.frame_size as usize)?;
        let config = UmemConfig {
            fill_size: geometry.ring_size,
            complete_size: geometry.ring_size,
            frame_size: geometry.frame_size,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page aligned (fresh mmap), sized for the frames, and outlives
        // the UMEM: `XskSocket` drops `_umem` before `area`.
        let umem = unsafe { Umem::new(config, area.as_slice_ptr()) }.map_err(fail("UMEM registration"))?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex).map_err(fail("interface lookup"))?;
        info.set_queue(queue_id);
        let sock = Socket::with_shared(&info, &umem).map_err(fail("socket"))?;
        let device = umem.fq_cq(&sock).map_err(fail("fill/completion rings"))?;
        let ring = NonZeroU32::new(geometry.ring_size);
        let mode_flag = match mode {
            XskMode::ZeroCopy => SocketConfig::XDP_BIND_ZEROCOPY,
            XskMode::Copy => SocketConfig::XDP_BIND_COPY,
        };
        let user = umem
            .rx_tx(&sock, &SocketConfig { rx_size: ring, tx_size: ring, bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP | mode_flag })
            .map_err(fail("rx/tx rings"))?;
        let rx = user.map_rx().map_err(fail("rx ring mapping"))?;
        let tx = user.map_tx().map_err(fail("tx ring mapping"))?;
        umem.bind(&user).map_err(fail(match mode {
            XskMode::ZeroCopy => "zero-copy bind",
            XskMode::Copy => "copy-mode bind",
        }))?;

        let frame = u64::from(geometry.frame_size);
        let mut sock = XskSocket {
            rx,
            tx,
            device,
            user,
            _umem: umem,
            area,
            geometry,
            mode,
            queue_id,
            rx_backlog: VecDeque::with_capacity(pool),
            rx_recycle: (0..pool as u64).map(|i| i * frame).collect(),
            tx_free: (pool as u64..2 * pool as u64).rev().map(|i| i * frame).collect(),
            tx_staged: Vec::with_capacity(pool),
            tx_in_flight: 0,
        };
        sock.refill();
        Ok(sock)
    }

    pub fn mode(&self) -> XskMode {
        self.mode
    }

    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    pub fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Largest frame this socket can send.
    pub fn max_tx_frame(&self) -> usize {
        self.geometry.frame_size as usize
    }

    /// Moves up to `max` newly received frames into the backlog.
    pub fn poll_rx(&mut self, max: u32) -> usize {
        // Two passes at most: the first may stop at xdpilone's cached view of the producer.
        let mut n = 0;
        for _ in 0..2 {
            let room = (self.rx_backlog.capacity() - self.rx_backlog.len()) as u32;
            let want = max.saturating_sub(n as u32).min(room);
            if want == 0 {
                break;
            }
            let mut reader = self.rx.receive(want);
            let before = n;
            while let Some(desc) = reader.read() {
                self.rx_backlog.push_back(desc);
                n += 1;
            }
            reader.release();
            if n == before {
                break;
            }
        }
        n
    }

    /// Frames waiting for the guest.
    pub fn rx_pending(&self) -> usize {
        self.rx_backlog.len()
    }

    /// Hands up to `max` backlog frames to `deliver`, which returns how many it consumed
    /// (in order). Consumed frames go back to the fill ring.
    pub fn drain_rx<E>(
        &mut self,
        max: usize,
        deliver: impl FnOnce(&mut dyn Iterator<Item = &[u8]>) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let n = max.min(self.rx_backlog.len());
        let area = &self.area;
        let frame = u64::from(self.geometry.frame_size);
        // A descriptor the kernel got wrong would be a kernel bug; it is passed on as empty
        // rather than trusted, so it can never read outside the UMEM.
        let mut frames = self.rx_backlog.iter().take(n).map(|d| area.get(d.addr, d.len as usize).unwrap_or(&[]));
        let consumed = deliver(&mut frames)?;
        for d in self.rx_backlog.drain(..consumed.min(n)) {
            self.rx_recycle.push(d.addr - d.addr % frame);
        }
        self.refill();
        Ok(consumed)
    }

    /// Drops every frame in the backlog (the guest's queue is gone); returns how many.
    pub fn discard_rx_backlog(&mut self) -> usize {
        let frame = u64::from(self.geometry.frame_size);
        let n = self.rx_backlog.len();
        for d in self.rx_backlog.drain(..) {
            self.rx_recycle.push(d.addr - d.addr % frame);
        }
        self.refill();
        n
    }

    /// Returns recycled rx frames to the fill ring, waking the driver if it asks to be.
    fn refill(&mut self) {
        if self.rx_recycle.is_empty() {
            return;
        }
        // As on tx: a pass may be limited by a stale view of the ring; go until no progress.
        while !self.rx_recycle.is_empty() {
            let n = {
                let mut writer = self.device.fill(self.rx_recycle.len() as u32);
                let n = writer.insert(self.rx_recycle.iter().copied()) as usize;
                writer.commit();
                n
            };
            if n == 0 {
                break;
            }
            self.rx_recycle.drain(..n);
        }
        if self.device.needs_wakeup() {
            self.device.wake();
        }
    }

    /// Collects transmitted frames back into the free list.
    pub fn reap_completions(&mut self) -> u32 {
        let frame = u64::from(self.geometry.frame_size);
        let mut total = 0;
        // Two passes at most, for the same cached-view reason as in `poll_rx`.
        for _ in 0..2 {
            let mut reader = self.device.complete(self.tx_in_flight);
            let mut n = 0;
            while let Some(addr) = reader.read() {
                self.tx_free.push(addr - addr % frame);
                n += 1;
            }
            reader.release();
            self.tx_in_flight -= n.min(self.tx_in_flight);
            total += n;
            if n == 0 || self.tx_in_flight == 0 {
                break;
            }
        }
        total
    }

    /// Puts staged frames on the tx ring and kicks the kernel if it needs it.
    pub fn flush_tx(&mut self) {
        // xdpilone reserves from its cached view of the kernel's consumer and refreshes it
        // only when that view shows no room at all, so one pass may place fewer frames than
        // fit; the next pass sees the real state. The ring is as large as the tx pool, so
        // everything staged fits once the view is fresh.
        while !self.tx_staged.is_empty() {
            let mut writer = self.tx.transmit(self.tx_staged.len() as u32);
            let n = writer.insert(self.tx_staged.iter().copied());
            writer.commit();
            if n == 0 {
                break;
            }
            self.tx_staged.drain(..n as usize);
            self.tx_in_flight += n;
        }
        // In copy mode each sendto moves a bounded batch; keep kicking while the kernel
        // makes progress so a full batch does not sit on the ring until the next event.
        for _ in 0..64 {
            if self.tx.pending() == 0 || !self.tx.needs_wakeup() {
                break;
            }
            let before = self.tx.pending();
            self.tx.wake();
            if self.tx.pending() == before {
                break;
            }
        }
    }

    /// Frames on the tx ring the kernel has not taken yet, or completions not reaped.
    pub fn tx_in_flight(&self) -> u32 {
        self.tx_in_flight
    }

    pub fn tx_free(&self) -> usize {
        self.tx_free.len()
    }

    pub fn kernel_stats(&self) -> XskKernelStats {
        match self.user.statistics_v2() {
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

impl TxBuffers for XskSocket {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        let addr = *self.tx_free.last()?;
        self.area.get_mut(addr, self.geometry.frame_size as usize)
    }

    fn submit(&mut self, len: usize) {
        if let Some(addr) = self.tx_free.pop() {
            self.tx_staged.push(XdpDesc { addr, len: len as u32, options: 0 });
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
pub const RX_HEADROOM: u32 = XDP_PACKET_HEADROOM;
