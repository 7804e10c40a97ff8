//! AF_XDP: one UMEM per NIC queue, shared by the sockets of every port on that queue.
//!
//! The kernel allows one buffer pool per NIC queue, so ports that share a queue must share its
//! UMEM (XDP_SHARED_UMEM) and with it the fill and completion rings. A [`NicQueue`] owns the
//! UMEM and an anchor socket that holds the queue's binding and those two rings for as long as
//! the daemon runs; each port connection adds an [`XskSocket`] with its own rx and tx rings.
//!
//! UMEM frames are split in two fixed pools: the first cycles through the fill and rx rings,
//! the second through the tx and completion rings. The shared rings and the pools'
//! free lists sit behind one mutex per NIC queue, taken once per batch; each socket keeps a few
//! frames locally between batches so the lock is never taken per frame.

use std::collections::VecDeque;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

use crate::datapath::tx::{TxBuffers, TxDrop};

/// How the socket moves frames; reported in the log at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XskMode {
    /// The driver DMAs straight into UMEM.
    ZeroCopy,
    /// The kernel copies between its buffers and UMEM (veth, drivers without AF_XDP support).
    Copy,
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

/// How long a bind may wait for the kernel to release the queue's previous binding (a daemon
/// restarted right after the last one exited).
const BIND_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sizes of a NIC queue's UMEM and of the rings of its sockets.
#[derive(Debug, Clone, Copy)]
pub struct XskGeometry {
    /// Bytes per UMEM frame; a received or sent frame must fit one.
    pub frame_size: u32,
    /// Entries of the completion ring and frames of the tx pool (power of two).
    pub ring_size: u32,
    /// Entries of the fill ring and frames of the rx pool (power of two). Larger than the
    /// tx side: frames waiting in the sockets' rx rings and backlogs are out of the fill ring,
    /// and an empty fill ring makes the kernel drop (`rx_dropped_no_umem_frame`).
    pub fill_size: u32,
    /// Entries of each port socket's rx and tx rings (power of two).
    pub socket_ring_size: u32,
}

impl Default for XskGeometry {
    fn default() -> Self {
        XskGeometry {
            frame_size: 4096,
            ring_size: 2048,
            fill_size: 2048,
            socket_ring_size: 2048,
        }
    }
}

impl XskGeometry {
    /// Bytes of UMEM one NIC queue maps.
    pub fn umem_bytes(&self) -> u64 {
        u64::from(self.fill_size + self.ring_size) * u64::from(self.frame_size)
    }
}

/// Frames a socket takes from the shared tx pool at a time.
const TX_LOCAL_FRAMES: usize = 64;
/// Rx frames a socket collects before giving them back to the shared fill ring.
const RX_RECYCLE_BATCH: usize = 64;

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
            return Err(XskError::Mmap {
                bytes: len,
                source: io::Error::last_os_error(),
            });
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
        // SAFETY: unmaps exactly the mapping created in `new`; every socket using it as UMEM
        // is closed first (port sockets hold the `NicQueue`, whose field order closes the
        // anchor before the area).
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

fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

/// What the sockets of one NIC queue share, behind the queue's mutex.
struct SharedRings {
    /// The fill and completion rings (mapped through the anchor socket).
    device: DeviceQueue,
    /// Rx frames waiting to go back on the fill ring (it was full, or the view stale).
    rx_recycle: Vec<u64>,
    /// Tx frames nobody holds.
    tx_free: Vec<u64>,
    /// Tx frames on some socket's tx ring or in the completion ring.
    tx_in_flight: u32,
}

impl SharedRings {
    /// Returns recycled rx frames to the fill ring, waking the driver if it asks to be.
    fn refill(&mut self) {
        // A pass may be limited by xdpilone's cached view of the ring; go until no progress.
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

    /// Collects transmitted frames back into the free list; returns how many.
    fn reap(&mut self, frame_size: u64) -> u32 {
        let mut total = 0;
        // Two passes at most, for the same cached-view reason as in `refill`.
        for _ in 0..2 {
            if self.tx_in_flight == 0 {
                break;
            }
            let mut reader = self.device.complete(self.tx_in_flight);
            let mut n = 0;
            while let Some(addr) = reader.read() {
                self.tx_free.push(addr - addr % frame_size);
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
    // Field order is drop order: rings and the anchor socket close before the area is unmapped.
    shared: Mutex<SharedRings>,
    _anchor: User,
    umem: Umem,
    area: UmemArea,
    info: IfInfo,
    ifname: String,
    queue_id: u32,
    geometry: XskGeometry,
    mode: XskMode,
}

// SAFETY: the rings and UMEM are raw pointers into mappings this value owns; the shared rings
// are only touched under `shared`'s mutex, and the area only through frames whose ownership
// the rings and free lists hand out to exactly one holder at a time.
unsafe impl Send for NicQueue {}
// SAFETY: as above: every mutable access goes through the mutex or through exclusively owned
// frames.
unsafe impl Sync for NicQueue {}

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
        let (rx_pool, tx_pool) = (geometry.fill_size as u64, geometry.ring_size as u64);
        let area = UmemArea::new(geometry.umem_bytes() as usize)?;
        let config = UmemConfig {
            fill_size: geometry.fill_size,
            complete_size: geometry.ring_size,
            frame_size: geometry.frame_size,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page aligned (fresh mmap), sized for the frames, and outlives
        // the UMEM: `NicQueue` drops `umem` before `area`.
        let umem =
            unsafe { Umem::new(config, area.as_slice_ptr()) }.map_err(fail("UMEM registration"))?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(ifindex)
            .map_err(fail("interface lookup"))?;
        info.set_queue(queue_id);
        // The anchor is the UMEM's own socket: it owns the fill and completion rings and a
        // minimal tx ring (a bind needs rx or tx). It is never in the steering map.
        let anchor_sock = Socket::with_shared(&info, &umem).map_err(fail("socket"))?;
        let device = umem
            .fq_cq(&anchor_sock)
            .map_err(fail("fill/completion rings"))?;
        let mode_flag = match mode {
            XskMode::ZeroCopy => SocketConfig::XDP_BIND_ZEROCOPY,
            XskMode::Copy => SocketConfig::XDP_BIND_COPY,
        };
        let anchor = umem
            .rx_tx(
                &anchor_sock,
                &SocketConfig {
                    rx_size: None,
                    tx_size: NonZeroU32::new(64),
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP | mode_flag,
                },
            )
            .map_err(fail("anchor ring"))?;
        umem.bind(&anchor).map_err(fail(match mode {
            XskMode::ZeroCopy => "zero-copy bind",
            XskMode::Copy => "copy-mode bind",
        }))?;

        let frame = u64::from(geometry.frame_size);
        let mut shared = SharedRings {
            device,
            rx_recycle: (0..rx_pool).map(|i| i * frame).collect(),
            tx_free: (rx_pool..rx_pool + tx_pool)
                .rev()
                .map(|i| i * frame)
                .collect(),
            tx_in_flight: 0,
        };
        shared.refill();
        Ok(NicQueue {
            shared: Mutex::new(shared),
            _anchor: anchor,
            umem,
            area,
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

    fn lock(&self) -> MutexGuard<'_, SharedRings> {
        // The guarded state is ring indices and frame lists; a panic elsewhere leaves them
        // consistent (every mutation is a push/pop pair), so a poisoned lock is still usable.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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

/// One port's AF_XDP socket on one NIC queue.
pub struct XskSocket {
    // Field order is drop order: the rings close before the queue (and its UMEM) can go.
    rx: RingRx,
    tx: RingTx,
    user: User,
    queue: Arc<NicQueue>,
    /// Frames read from the rx ring but not yet delivered (the guest had no buffers).
    rx_backlog: VecDeque<XdpDesc>,
    /// Delivered rx frames not yet handed back to the shared fill ring.
    rx_recycle: Vec<u64>,
    /// Tx frames taken from the shared pool for the next transmits.
    tx_free: Vec<u64>,
    /// Tx frames filled but not yet on the tx ring.
    tx_staged: Vec<XdpDesc>,
    /// Received frames carry the port's VLAN tag, which the guest must not see.
    strip_vlan: bool,
}

// SAFETY: the rings are raw pointers into mappings of this socket's own fd, and the frames it
// holds are its alone until returned to the queue; moving the socket to another thread is
// sound. It is not Sync: only the thread holding it (under the worker's mutex) touches it.
unsafe impl Send for XskSocket {}

impl XskSocket {
    /// Adds a socket with its own rx and tx rings to `queue`, sharing its UMEM.
    pub fn open(queue: &Arc<NicQueue>) -> Result<Self, XskError> {
        let fail = setup_error(&queue.ifname, queue.queue_id);
        let sock = Socket::new(&queue.info).map_err(fail("socket"))?;
        let ring = NonZeroU32::new(queue.geometry.socket_ring_size);
        // A socket sharing a UMEM may not pass mode flags: it inherits the anchor's.
        let user = queue
            .umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: ring,
                    tx_size: ring,
                    bind_flags: 0,
                },
            )
            .map_err(fail("rx/tx rings"))?;
        let rx = user.map_rx().map_err(fail("rx ring mapping"))?;
        let tx = user.map_tx().map_err(fail("tx ring mapping"))?;
        queue.umem.bind(&user).map_err(fail("shared-UMEM bind"))?;
        Ok(XskSocket {
            rx,
            tx,
            user,
            queue: queue.clone(),
            rx_backlog: VecDeque::with_capacity(queue.geometry.socket_ring_size as usize),
            rx_recycle: Vec::with_capacity(2 * RX_RECYCLE_BATCH),
            tx_free: Vec::with_capacity(TX_LOCAL_FRAMES),
            tx_staged: Vec::with_capacity(queue.geometry.socket_ring_size as usize),
            strip_vlan: false,
        })
    }

    pub fn mode(&self) -> XskMode {
        self.queue.mode
    }

    /// Makes received frames lose their 802.1Q tag before delivery (a tagged port).
    pub fn strip_vlan_on_receive(mut self, strip: bool) -> Self {
        self.strip_vlan = strip;
        self
    }

    pub fn queue_id(&self) -> u32 {
        self.queue.queue_id
    }

    pub fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Turns on the kernel's preferred busy polling for this socket: the worker's syscalls on
    /// it run the NIC queue's NAPI poll (up to `budget` frames) on the worker's CPU, and the
    /// softirq leaves the queue alone while they do (SO_PREFER_BUSY_POLL, SO_BUSY_POLL,
    /// SO_BUSY_POLL_BUDGET; Linux 5.11+).
    pub fn enable_busy_poll(&self, usecs: u32, budget: u16) -> io::Result<()> {
        let set = |name: &str, opt: libc::c_int, value: libc::c_int| {
            // SAFETY: setsockopt on this socket's own fd with a c_int value and its size.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&value as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                let e = io::Error::last_os_error();
                Err(io::Error::new(e.kind(), format!("{name}: {e}")))
            }
        };
        set("SO_PREFER_BUSY_POLL", libc::SO_PREFER_BUSY_POLL, 1)?;
        set("SO_BUSY_POLL", libc::SO_BUSY_POLL, usecs as libc::c_int)?;
        set(
            "SO_BUSY_POLL_BUDGET",
            libc::SO_BUSY_POLL_BUDGET,
            libc::c_int::from(budget),
        )
    }

    /// Busy-polls the NIC queue once (a non-blocking recvfrom, which the kernel turns into a
    /// NAPI poll on this CPU when busy polling is on), so the rx ring fills without an
    /// interrupt.
    pub fn busy_poll_rx(&self) {
        // SAFETY: a zero-length, non-blocking recvfrom on this socket's fd with no buffers;
        // EAGAIN is the normal answer and is ignored.
        unsafe {
            libc::recvfrom(
                self.fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Largest frame this socket can send.
    pub fn max_tx_frame(&self) -> usize {
        self.queue.geometry.frame_size as usize
    }

    fn frame_size(&self) -> u64 {
        u64::from(self.queue.geometry.frame_size)
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
        if self.strip_vlan {
            // The steering program only hands a tagged port frames with its tag; remove it in
            // place (the MAC addresses move up four bytes) so the guest sees plain Ethernet.
            for d in self
                .rx_backlog
                .iter_mut()
                .take(n)
                .filter(|d| d.options & STRIPPED == 0)
            {
                if let Some(f) = self.queue.area.get_mut(d.addr, d.len as usize) {
                    if f.len() >= 18 && f[12..14] == xvdpa_common::ETH_P_8021Q.to_be_bytes() {
                        f.copy_within(0..12, 4);
                        d.addr += 4;
                        d.len -= 4;
                    }
                }
                d.options |= STRIPPED;
            }
        }
        let area = &self.queue.area;
        let frame = self.frame_size();
        // A descriptor the kernel got wrong would be a kernel bug; it is passed on as empty
        // rather than trusted, so it can never read outside the UMEM.
        let mut frames = self
            .rx_backlog
            .iter()
            .take(n)
            .map(|d| area.get(d.addr, d.len as usize).unwrap_or(&[]));
        let consumed = deliver(&mut frames)?;
        for d in self.rx_backlog.drain(..consumed.min(n)) {
            self.rx_recycle.push(d.addr - d.addr % frame);
        }
        if self.rx_recycle.len() >= RX_RECYCLE_BATCH || self.rx_backlog.is_empty() {
            self.give_back_rx();
        }
        Ok(consumed)
    }

    /// Drops every frame in the backlog (the guest's queue is gone); returns how many.
    pub fn discard_rx_backlog(&mut self) -> usize {
        let frame = self.frame_size();
        let n = self.rx_backlog.len();
        for d in self.rx_backlog.drain(..) {
            self.rx_recycle.push(d.addr - d.addr % frame);
        }
        self.give_back_rx();
        n
    }

    fn give_back_rx(&mut self) {
        if self.rx_recycle.is_empty() {
            return;
        }
        let mut shared = self.queue.lock();
        shared.rx_recycle.append(&mut self.rx_recycle);
        shared.refill();
    }

    /// Collects transmitted frames (of every socket on the queue) back into the shared pool
    /// and takes a few for this socket. Returns how many completed.
    pub fn reap_completions(&mut self) -> u32 {
        let frame = self.frame_size();
        let mut shared = self.queue.lock();
        let done = shared.reap(frame);
        let want = TX_LOCAL_FRAMES
            .saturating_sub(self.tx_free.len())
            .min(shared.tx_free.len());
        let from = shared.tx_free.len() - want;
        self.tx_free.extend(shared.tx_free.drain(from..));
        done
    }

    /// Puts staged frames on the tx ring and kicks the kernel.
    pub fn flush_tx(&mut self) {
        if !self.tx_staged.is_empty() {
            let mut placed = 0u32;
            // xdpilone reserves from its cached view of the kernel's consumer and refreshes
            // it only when that view shows no room at all, so one pass may place fewer frames
            // than fit; the next pass sees the real state.
            while !self.tx_staged.is_empty() {
                let mut writer = self.tx.transmit(self.tx_staged.len() as u32);
                let n = writer.insert(self.tx_staged.iter().copied());
                writer.commit();
                if n == 0 {
                    break;
                }
                self.tx_staged.drain(..n as usize);
                placed += n;
            }
            self.queue.lock().tx_in_flight += placed;
        }
        // Copy mode transmits only inside sendto, whatever the need-wakeup flag of a socket
        // sharing the UMEM says; each call moves a bounded batch, so keep kicking while the
        // kernel makes progress rather than leave frames on the ring until the next event.
        let copy = self.queue.mode == XskMode::Copy;
        for _ in 0..64 {
            if self.tx.pending() == 0 || !(copy || self.tx.needs_wakeup()) {
                break;
            }
            let before = self.tx.pending();
            self.tx.wake();
            if self.tx.pending() == before {
                break;
            }
        }
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

impl Drop for XskSocket {
    /// Gives every frame this socket holds back to the queue. The caller has taken the socket
    /// out of the steering map; frames still on its rx ring are read back, and frames on its
    /// tx ring are pushed out, so the shared pools do not shrink with each reconnect.
    fn drop(&mut self) {
        self.flush_tx();
        for _ in 0..100 {
            if self.tx.pending() == 0 {
                break;
            }
            self.tx.wake();
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let unsent = self.tx.pending();
        if unsent > 0 {
            tracing::warn!(queue = self.queue.queue_id, frames = unsent, "tx frames still on a closing socket's ring; the queue's pool is that much smaller until the daemon restarts");
        }
        self.poll_rx(u32::MAX);
        self.discard_rx_backlog();
        let frame = self.frame_size();
        let mut shared = self.queue.lock();
        shared.tx_free.append(&mut self.tx_free);
        shared
            .tx_free
            .extend(self.tx_staged.drain(..).map(|d| d.addr - d.addr % frame));
        shared.reap(frame);
    }
}

impl TxBuffers for XskSocket {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        if self.tx_free.is_empty() {
            self.reap_completions();
        }
        let addr = *self.tx_free.last()?;
        self.queue
            .area
            .get_mut(addr, self.queue.geometry.frame_size as usize)
    }

    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        self.stage(len);
        Ok(())
    }
}

/// Marks a backlog descriptor whose frame lost its VLAN tag already (our own bit: the kernel
/// hands rx descriptors with `options` zero unless multi-buffer is on, which we never ask for).
const STRIPPED: u32 = 1 << 31;

/// The four bytes of an 802.1Q tag for VLAN `vid` (priority 0).
fn vlan_tag(vid: u16) -> [u8; 4] {
    let [a, b] = xvdpa_common::ETH_P_8021Q.to_be_bytes();
    let [c, d] = (vid & 0x0fff).to_be_bytes();
    [a, b, c, d]
}

/// A tx frame taken off the free list for another port rather than the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldFrame {
    pub addr: u64,
    pub len: u32,
}

impl XskSocket {
    /// The first `len` bytes of the buffer `next_buffer` returned last.
    pub fn current(&self, len: usize) -> Option<&[u8]> {
        let addr = *self.tx_free.last()?;
        self.queue
            .area
            .get(addr, len.min(self.queue.geometry.frame_size as usize))
    }

    /// Puts the current buffer, holding `len` bytes, on the way to the NIC. Its bytes stay
    /// readable through [`XskSocket::held`] until the next `flush_tx`.
    pub fn stage(&mut self, len: usize) -> Option<HeldFrame> {
        let addr = self.tx_free.pop()?;
        self.tx_staged.push(XdpDesc {
            addr,
            len: len as u32,
            options: 0,
        });
        Some(HeldFrame {
            addr,
            len: len as u32,
        })
    }

    /// Takes the current buffer, holding `len` bytes, for delivery elsewhere; hand it back
    /// with [`XskSocket::release`].
    pub fn hold(&mut self, len: usize) -> Option<HeldFrame> {
        let addr = self.tx_free.pop()?;
        Some(HeldFrame {
            addr,
            len: len as u32,
        })
    }

    /// The bytes of a held or staged frame.
    pub fn held(&self, frame: HeldFrame) -> &[u8] {
        self.queue
            .area
            .get(frame.addr, frame.len as usize)
            .unwrap_or(&[])
    }

    /// Inserts an 802.1Q tag after the MAC addresses of the current buffer, which holds a
    /// `len`-byte frame; returns the new length, or `None` if the buffer has no room.
    pub fn tag_current(&mut self, len: usize, vid: u16) -> Option<usize> {
        let addr = *self.tx_free.last()?;
        let buf = self
            .queue
            .area
            .get_mut(addr, self.queue.geometry.frame_size as usize)?;
        if len < 12 || len + 4 > buf.len() {
            return None;
        }
        buf.copy_within(12..len, 16);
        buf[12..16].copy_from_slice(&vlan_tag(vid));
        Some(len + 4)
    }

    /// Stages a copy of `src` with an 802.1Q tag inserted; `src` stays held. Returns false
    /// (nothing staged) when no buffer is free.
    pub fn stage_tagged_copy(&mut self, src: HeldFrame, vid: u16) -> bool {
        if self.tx_free.is_empty() {
            self.reap_completions();
        }
        let Some(addr) = self.tx_free.pop() else {
            return false;
        };
        let size = self.queue.geometry.frame_size as usize;
        let len = src.len as usize;
        match (
            self.queue.area.get(src.addr, len),
            self.queue.area.get_mut(addr, size),
        ) {
            (Some(from), Some(to)) if len >= 12 && len + 4 <= size => {
                to[..12].copy_from_slice(&from[..12]);
                to[12..16].copy_from_slice(&vlan_tag(vid));
                to[16..len + 4].copy_from_slice(&from[12..]);
                self.tx_staged.push(XdpDesc {
                    addr,
                    len: (len + 4) as u32,
                    options: 0,
                });
                true
            }
            _ => {
                self.tx_free.push(addr);
                false
            }
        }
    }

    /// Returns a held frame to the free list.
    pub fn release(&mut self, frame: HeldFrame) {
        self.tx_free.push(frame.addr);
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
