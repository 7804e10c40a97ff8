//! One port's AF_XDP socket on one NIC queue: its own rx and tx rings over the queue's UMEM.
//!
//! UMEM frames are split in two fixed pools: the first cycles through the fill and rx rings,
//! the second through the tx and completion rings. Each socket keeps a few frames of each
//! locally between batches, so the queue's mutex is taken per batch, never per frame.
//!
//! Transmit frames pass through the socket's hands in this order: free (`tx_free`), filled
//! by the guest's copy (`next_buffer`), then staged for the NIC (`stage`) or held for other
//! ports (`hold`), and at the next [`XskSocket::flush_tx`] staged frames go to the kernel and
//! held ones back to the free list. Until that flush, other ports read a staged or held frame
//! through a [`FrameView`], which can neither write nor release it.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::sync::Arc;

use xdpilone::xdp::XdpDesc;
use xdpilone::{RingRx, RingTx, Socket, SocketConfig, User};

use super::multi_buffer::{scatter, RxAssembly, TxFrame, MAX_PIECES, XDP_PKT_CONTD};
use super::queue::NicQueue;
use super::umem::{self, UmemFrame};
use super::{setup_error, XskError, XskKernelStats, XskMode};
use crate::datapath::tx::{TxBuffers, TxDrop};
use crate::nic::vlan;

/// Frames a socket takes from the shared tx pool at a time.
const TX_LOCAL_FRAMES: usize = 64;
/// Rx frames a socket collects before giving them back to the shared fill ring.
const RX_RECYCLE_BATCH: usize = 64;

/// A read-only view of a transmit frame the socket keeps until its next
/// [`XskSocket::flush_tx`]: one staged for the NIC, one held for other ports, or a copy of a
/// frame larger than one buffer kept for other ports. Read it with
/// [`XskSocket::view`]. It is a plain handle (copying it copies no frame and no right): the
/// socket owns the frame, so a view can never release it, and a view kept past the flush
/// reads as empty instead of as a frame that has since been reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameView {
    /// The socket's flush count when the view was made.
    epoch: u64,
    /// Position in its list, which only grows between flushes.
    index: u32,
    list: ViewList,
}

/// Which of the socket's lists a [`FrameView`] points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ViewList {
    Staged,
    Held,
    Kept,
}

/// One port's AF_XDP socket on one NIC queue.
pub struct XskSocket {
    // Field order is drop order: the rings close before the queue (and its UMEM) can go.
    rx: RingRx,
    tx: RingTx,
    user: User,
    queue: Arc<NicQueue>,
    /// Frames read from the rx ring but not yet delivered (the guest had no buffers), and the
    /// pieces of one still arriving.
    received: RxAssembly,
    /// Delivered rx frames not yet handed back to the shared fill ring.
    rx_recycle: Vec<UmemFrame>,
    /// Tx frames taken from the shared pool for the next transmits; the last is the buffer
    /// `next_buffer` hands out.
    tx_free: Vec<UmemFrame>,
    /// Tx frames filled but not yet on the tx ring.
    tx_staged: Vec<TxFrame>,
    /// Tx frames other ports read before the next flush, which returns them to `tx_free`.
    tx_held: Vec<TxFrame>,
    /// Frames larger than one buffer that other ports read before the next flush, which
    /// empties it: their bytes one after another, and where each lies.
    tx_kept: Vec<u8>,
    tx_kept_at: Vec<(usize, usize)>,
    /// Where a frame larger than one buffer gets its VLAN tag before it is cut (reused).
    tx_tagged: Vec<u8>,
    /// Flushes so far: a [`FrameView`] is valid only within the epoch it was made in.
    epoch: u64,
    /// Received frames carry the port's VLAN tag, which the guest must not see.
    strip_vlan: bool,
}

impl XskSocket {
    /// Adds a socket with its own rx and tx rings to `queue`, sharing its UMEM.
    pub fn open(queue: &Arc<NicQueue>) -> Result<Self, XskError> {
        let fail = setup_error(&queue.ifname, queue.queue_id);
        let sock = Socket::new(&queue.info).map_err(fail("socket"))?;
        let ring = NonZeroU32::new(queue.geometry.socket_ring_size);
        // A socket sharing a UMEM may not pass mode flags: it inherits the anchor's.
        let user = queue
            .umem
            .xdp()
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
        queue
            .umem
            .xdp()
            .bind(&user)
            .map_err(fail("shared-UMEM bind"))?;
        Ok(XskSocket {
            rx,
            tx,
            user,
            queue: queue.clone(),
            received: RxAssembly::with_capacity(queue.geometry.socket_ring_size as usize),
            rx_recycle: Vec::with_capacity(2 * RX_RECYCLE_BATCH),
            tx_free: Vec::with_capacity(TX_LOCAL_FRAMES),
            tx_staged: Vec::with_capacity(queue.geometry.socket_ring_size as usize),
            tx_held: Vec::with_capacity(TX_LOCAL_FRAMES),
            tx_kept: Vec::new(),
            tx_kept_at: Vec::new(),
            tx_tagged: Vec::new(),
            epoch: 0,
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

    /// Whether busy polling can reach this socket's NIC queue: only a zero-copy socket is
    /// given the queue's NAPI id (the kernel marks it at bind, for drivers that link their
    /// queues to a NAPI); a copy-mode socket never is, so its NAPI cannot be polled from here.
    pub fn napi_reachable(&self) -> bool {
        self.queue.mode() == super::XskMode::ZeroCopy
    }

    pub fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Turns on the kernel's preferred busy polling for this socket: the worker's syscalls on
    /// it run the NIC queue's NAPI poll (up to `budget` frames) on the worker's CPU, and the
    /// softirq leaves the queue alone while they do (SO_PREFER_BUSY_POLL, SO_BUSY_POLL,
    /// SO_BUSY_POLL_BUDGET; Linux 5.11+).
    pub fn enable_busy_poll(&self, usecs: u32, budget: u16) -> io::Result<()> {
        let fd = SockFd(self.fd());
        fd.set_int("SO_PREFER_BUSY_POLL", libc::SO_PREFER_BUSY_POLL, 1)?;
        fd.set_int("SO_BUSY_POLL", libc::SO_BUSY_POLL, usecs as libc::c_int)?;
        fd.set_int(
            "SO_BUSY_POLL_BUDGET",
            libc::SO_BUSY_POLL_BUDGET,
            libc::c_int::from(budget),
        )
    }

    /// The NAPI instance that filled this socket's rx ring last (0 before the first frame, or
    /// on a queue without one): the id busy polling runs and the netdev family's `napi-set`
    /// takes.
    pub fn napi_id(&self) -> u32 {
        SockFd(self.fd())
            .get_int(libc::SO_INCOMING_NAPI_ID)
            .unwrap_or(0) as u32
    }

    /// Busy-polls the NIC queue once (a non-blocking recvfrom, which the kernel turns into a
    /// NAPI poll on this CPU when busy polling is on), so the rx ring fills without an
    /// interrupt.
    pub fn busy_poll_rx(&self) {
        SockFd(self.fd()).poke();
    }

    /// Largest frame this socket can send: one UMEM frame, or with multi-buffer on, as many
    /// as a frame may span.
    pub fn max_tx_frame(&self) -> usize {
        if self.queue.geometry.multi_buffer {
            self.buffer_len() * MAX_PIECES
        } else {
            self.buffer_len()
        }
    }

    /// Bytes of one transmit buffer (a UMEM frame, less the room for TX metadata).
    pub fn buffer_len(&self) -> usize {
        self.queue.geometry.frame_size as usize - self.queue.tx_data_start()
    }

    /// Whether a frame staged with [`XskSocket::stage_with_checksum`] gets its checksum
    /// completed by the kernel or the NIC (AF_XDP TX metadata); if not, the caller completes
    /// it before staging.
    pub fn completes_checksums(&self) -> bool {
        self.queue.tx_data_start() > 0
    }

    /// Moves up to `max` newly received descriptors into the backlog; a frame larger than one
    /// UMEM frame (multi-buffer) counts once per piece and is waiting only once its last
    /// piece has arrived, in this call or a later one.
    pub fn poll_rx(&mut self, max: u32) -> usize {
        let area = self.queue.area();
        // Two passes at most: the first may stop at xdpilone's cached view of the producer.
        let mut n = 0;
        for _ in 0..2 {
            let room = (self.queue.geometry.socket_ring_size as usize)
                .saturating_sub(self.received.pieces()) as u32;
            let want = max.saturating_sub(n as u32).min(room);
            if want == 0 {
                break;
            }
            let mut reader = self.rx.receive(want);
            let before = n;
            while let Some(desc) = reader.read() {
                n += 1;
                // SAFETY: `desc` comes from this socket's rx ring over the queue's UMEM: a
                // frame the fill ring gave the kernel, which it has filled and hands back.
                // An address outside the UMEM (a kernel bug) gives `None`: nothing to hold.
                let piece = unsafe { area.reclaim(desc.addr) };
                let more = desc.options & XDP_PKT_CONTD != 0;
                let Some(first) = self
                    .received
                    .push(piece, desc.len, more, &mut self.rx_recycle)
                else {
                    continue;
                };
                // A tagged port's tag, or a priority tag an untagged port got, comes off
                // here, once per frame, so the guest sees plain Ethernet. The tag lies in the
                // first piece, which holds thousands of bytes.
                let (start, end) = (first.start as usize, (first.start + first.len) as usize);
                let stripped = area
                    .frame_mut(&mut first.frame)
                    .get_mut(start..end)
                    .is_some_and(|f| vlan::strip_on_receive(f, self.strip_vlan));
                if stripped {
                    first.start += vlan::TAG_LEN as u32;
                    first.len -= vlan::TAG_LEN as u32;
                }
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
        self.received.frames()
    }

    /// Received frames dropped for a bad multi-buffer sequence since the last call (a kernel
    /// that broke the protocol; never expected).
    pub fn take_rx_dropped_malformed(&mut self) -> u64 {
        self.received.take_dropped()
    }

    /// Hands up to `max` backlog frames to `deliver`, which returns how many it consumed
    /// (in order). Consumed frames go back to the fill ring.
    pub fn drain_rx<E>(
        &mut self,
        max: usize,
        deliver: impl FnOnce(&mut dyn Iterator<Item = &[u8]>) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let consumed =
            self.received
                .drain(self.queue.area(), max, &mut self.rx_recycle, deliver)?;
        if self.rx_recycle.len() >= RX_RECYCLE_BATCH || self.received.frames() == 0 {
            self.give_back_rx();
        }
        Ok(consumed)
    }

    /// Drops every frame in the backlog (the guest's queue is gone); returns how many.
    pub fn discard_rx_backlog(&mut self) -> usize {
        let n = self.received.discard_ready(&mut self.rx_recycle);
        self.give_back_rx();
        n
    }

    fn give_back_rx(&mut self) {
        if self.rx_recycle.is_empty() {
            return;
        }
        let mut shared = self.queue.lock();
        shared.rx_recycle.append(&mut self.rx_recycle);
        shared.refill(self.queue.area());
    }

    /// Collects transmitted frames (of every socket on the queue) back into the shared pool
    /// and takes a few for this socket. Returns how many completed.
    pub fn reap_completions(&mut self) -> u32 {
        let mut shared = self.queue.lock();
        let done = shared.reap(self.queue.area());
        let want = TX_LOCAL_FRAMES
            .saturating_sub(self.tx_free.len())
            .min(shared.tx_free.len());
        let from = shared.tx_free.len() - want;
        self.tx_free.extend(shared.tx_free.drain(from..));
        done
    }

    /// Makes sure `n` free buffers are at hand (a TSO frame's segments), taking them from the
    /// queue's shared pool past the usual local share if need be; false if the pool has not
    /// that many free now.
    pub fn reserve(&mut self, n: usize) -> bool {
        take_free(&self.queue, &mut self.tx_free, n)
    }

    /// Puts staged frames on the tx ring and kicks the kernel. Held frames go back to the
    /// free list, and every [`FrameView`] made so far stops reading.
    pub fn flush_tx(&mut self) {
        self.epoch += 1;
        self.tx_free.extend(self.tx_held.drain(..).map(|h| h.frame));
        self.tx_kept.clear();
        self.tx_kept_at.clear();
        if !self.tx_staged.is_empty() {
            let area = self.queue.area();
            let start = self.queue.tx_data_start() as u64;
            let mut placed = 0u32;
            // xdpilone reserves from its cached view of the kernel's consumer and refreshes
            // it only when that view shows no room at all, so one pass may place fewer frames
            // than fit; the next pass sees the real state.
            while !self.tx_staged.is_empty() {
                let mut writer = self.tx.transmit(self.tx_staged.len() as u32);
                let n = writer.insert(self.tx_staged.iter().map(|s| XdpDesc {
                    addr: area.addr(&s.frame) + start,
                    len: s.len,
                    options: s.options(),
                }));
                writer.commit();
                if n == 0 {
                    break;
                }
                // The kernel owns these frames until the completion ring gives them back.
                self.tx_staged.drain(..n as usize);
                placed += n;
            }
            self.queue.lock().tx_in_flight += placed;
        }
        // Copy mode transmits only inside sendto, whatever the need-wakeup flag of a socket
        // sharing the UMEM says; each call moves a bounded batch, so keep kicking while the
        // kernel makes progress rather than leave frames on the ring until the next event.
        super::kick_tx(&mut self.tx, self.queue.mode);
    }

    pub fn kernel_stats(&self) -> XskKernelStats {
        XskKernelStats::of(&self.user)
    }

    /// The first `len` bytes of the buffer `next_buffer` returned last.
    pub fn current(&self, len: usize) -> Option<&[u8]> {
        let frame = self.queue.area().frame(self.tx_free.last()?);
        let frame = &frame[self.queue.tx_data_start()..];
        Some(&frame[..len.min(frame.len())])
    }

    /// Inserts an 802.1Q tag after the MAC addresses of the current buffer, which holds a
    /// `len`-byte frame; returns the new length, or `None` if the buffer has no room.
    pub fn tag_current(&mut self, len: usize, vid: u16) -> Option<usize> {
        let start = self.queue.tx_data_start();
        let frame = self.tx_free.last_mut()?;
        vlan::insert_tag(&mut self.queue.area().frame_mut(frame)[start..], len, vid)
    }

    /// Puts the current buffer, holding `len` bytes, on the way to the NIC. Its bytes stay
    /// readable through the returned view until the next `flush_tx`.
    pub fn stage(&mut self, len: usize) -> Option<FrameView> {
        let frame = self.tx_free.pop()?;
        Some(push_view(
            &mut self.tx_staged,
            frame,
            len,
            self.epoch,
            ViewList::Staged,
        ))
    }

    /// Puts the current buffer, holding `len` bytes, on the way to the NIC with a request in
    /// its TX metadata to complete the checksum over its bytes from `start` on into the
    /// 16-bit field at `start + offset` (which holds the pseudo-header sum, as for a guest's
    /// NEEDS_CSUM). Only when [`XskSocket::completes_checksums`]; `None` otherwise, when no
    /// buffer is at hand, or when the field does not lie inside the frame.
    ///
    /// The kernel refuses a request whose field lies past the frame with EINVAL and leaves
    /// the descriptor at the head of the tx ring for the sender to retry, which would stop
    /// the socket's transmit for good: only requests checked here reach it (the datapath
    /// checked the guest's already, `offload::classify`).
    pub fn stage_with_checksum(
        &mut self,
        len: usize,
        start: usize,
        offset: usize,
    ) -> Option<FrameView> {
        if !self.completes_checksums() || start + offset + 2 > len {
            return None;
        }
        let (start, offset) = (u16::try_from(start).ok()?, u16::try_from(offset).ok()?);
        let room = self.queue.tx_data_start();
        let frame = self.tx_free.last_mut()?;
        umem::write_checksum_request(
            &mut self.queue.area().frame_mut(frame)[..room],
            start,
            offset,
        );
        let view = self.stage(len)?;
        if let Some(staged) = self.tx_staged.last_mut() {
            staged.metadata = true;
        }
        Some(view)
    }

    /// Takes the current buffer, holding `len` bytes, for delivery elsewhere: it stays the
    /// socket's, readable through the returned view, and goes back to the free list at the
    /// next `flush_tx`.
    pub fn hold(&mut self, len: usize) -> Option<FrameView> {
        let frame = self.tx_free.pop()?;
        Some(push_view(
            &mut self.tx_held,
            frame,
            len,
            self.epoch,
            ViewList::Held,
        ))
    }

    /// The bytes of a staged or held frame; empty for a view from before the last flush.
    pub fn view(&self, view: FrameView) -> &[u8] {
        debug_assert_eq!(view.epoch, self.epoch, "a FrameView read after its flush");
        if view.epoch != self.epoch {
            return &[];
        }
        let list = match view.list {
            ViewList::Staged => &self.tx_staged,
            ViewList::Held => &self.tx_held,
            ViewList::Kept => {
                return match self.tx_kept_at.get(view.index as usize) {
                    Some(&(at, len)) => &self.tx_kept[at..at + len],
                    None => &[],
                }
            }
        };
        match list.get(view.index as usize) {
            Some(f) => {
                let start = self.queue.tx_data_start() as u32;
                self.queue.area().data(&f.frame, start, f.len)
            }
            None => &[],
        }
    }

    /// Stages a copy of the frame `src` shows with an 802.1Q tag inserted; `src` is left as
    /// it is. Returns false (nothing staged) when no buffer is free or the tagged frame would
    /// not fit one.
    pub fn stage_tagged_copy(&mut self, src: FrameView, vid: u16) -> bool {
        if self.tx_free.is_empty() {
            self.reap_completions();
        }
        let Some(mut to) = self.tx_free.pop() else {
            return false;
        };
        let start = self.queue.tx_data_start();
        let tagged = vlan::tagged_copy(
            self.view(src),
            &mut self.queue.area().frame_mut(&mut to)[start..],
            vid,
        );
        match tagged {
            Some(len) => {
                push_view(&mut self.tx_staged, to, len, self.epoch, ViewList::Staged);
                true
            }
            None => {
                self.tx_free.push(to);
                false
            }
        }
    }

    /// Stages `frame`, larger than one buffer, for the NIC as a multi-buffer frame, with an
    /// 802.1Q tag for `vid` inserted if given. Returns false (nothing staged) when it would
    /// span more than `MAX_PIECES` buffers (more than one without multi-buffer) or that many
    /// are not free.
    pub fn stage_frame(&mut self, frame: &[u8], vid: Option<u16>) -> bool {
        let bytes = match vid {
            None => frame,
            Some(vid) => {
                self.tx_tagged.resize(frame.len() + vlan::TAG_LEN, 0);
                match vlan::tagged_copy(frame, &mut self.tx_tagged, vid) {
                    Some(n) => &self.tx_tagged[..n],
                    None => return false,
                }
            }
        };
        let start = self.queue.tx_data_start();
        let piece_len = self.queue.geometry.frame_size as usize - start;
        let pieces = bytes.len().div_ceil(piece_len);
        // Without XDP_USE_SG the kernel would take a continued descriptor as invalid.
        let most = if self.queue.geometry.multi_buffer {
            MAX_PIECES
        } else {
            1
        };
        if pieces > most {
            return false;
        }
        // `reserve`, without borrowing all of `self` while `bytes` may point into it.
        take_free(&self.queue, &mut self.tx_free, pieces);
        scatter(
            self.queue.area(),
            bytes,
            start,
            piece_len,
            &mut self.tx_free,
            &mut self.tx_staged,
        )
    }

    /// Keeps a copy of `frame` (one larger than a buffer, staged for the NIC in pieces) for
    /// other ports to read through the returned view until the next `flush_tx`.
    pub fn keep_copy(&mut self, frame: &[u8]) -> FrameView {
        let at = self.tx_kept.len();
        self.tx_kept.extend_from_slice(frame);
        let index = self.tx_kept_at.len() as u32;
        self.tx_kept_at.push((at, frame.len()));
        FrameView {
            epoch: self.epoch,
            index,
            list: ViewList::Kept,
        }
    }
}

/// Makes sure `free` holds `n` frames, taking them from `queue`'s shared pool past the usual
/// local share if need be; false if the pool has not that many free now.
fn take_free(queue: &NicQueue, free: &mut Vec<UmemFrame>, n: usize) -> bool {
    if free.len() >= n {
        return true;
    }
    let mut shared = queue.lock();
    shared.reap(queue.area());
    let want = (n - free.len()).min(shared.tx_free.len());
    let from = shared.tx_free.len() - want;
    free.extend(shared.tx_free.drain(from..));
    free.len() >= n
}

/// Appends `frame`, holding `len` bytes, to a staged or held list and returns its view.
fn push_view(
    list: &mut Vec<TxFrame>,
    frame: UmemFrame,
    len: usize,
    epoch: u64,
    which: ViewList,
) -> FrameView {
    let index = list.len() as u32;
    list.push(TxFrame {
        frame,
        len: len as u32,
        more: false,
        metadata: false,
    });
    FrameView {
        epoch,
        index,
        list: which,
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
        self.received.discard_all(&mut self.rx_recycle);
        self.give_back_rx();
        let mut shared = self.queue.lock();
        shared.tx_free.append(&mut self.tx_free);
        shared
            .tx_free
            .extend(self.tx_staged.drain(..).map(|s| s.frame));
        shared.reap(self.queue.area());
    }
}

impl TxBuffers for XskSocket {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        if self.tx_free.is_empty() {
            self.reap_completions();
        }
        let start = self.queue.tx_data_start();
        let frame = self.tx_free.last_mut()?;
        Some(&mut self.queue.area().frame_mut(frame)[start..])
    }

    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        self.stage(len);
        Ok(())
    }

    fn completes_checksums(&self) -> bool {
        XskSocket::completes_checksums(self)
    }

    fn submit_partial(&mut self, len: usize, start: usize, offset: usize) -> Result<(), TxDrop> {
        self.stage_with_checksum(len, start, offset)
            .map(|_| ())
            .ok_or(TxDrop::Offload)
    }

    fn buffer_len(&self) -> usize {
        XskSocket::buffer_len(self)
    }

    fn submit_frame(&mut self, frame: &[u8]) -> Result<(), TxDrop> {
        if self.stage_frame(frame, None) {
            Ok(())
        } else {
            Err(TxDrop::Oversized)
        }
    }
}

/// The socket's fd, for the two socket calls xdpilone does not make for us.
struct SockFd(RawFd);

impl SockFd {
    /// Sets the `SOL_SOCKET` option `opt` (called `name` in the error) to `value`.
    fn set_int(&self, name: &str, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: setsockopt reads exactly `size_of::<c_int>()` bytes from `value`, which
        // lives across the call; a stale fd fails with EBADF rather than touching memory.
        let rc = unsafe {
            libc::setsockopt(
                self.0,
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
    }

    /// Reads the `SOL_SOCKET` option `opt`.
    fn get_int(&self, opt: libc::c_int) -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `value`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                self.0,
                libc::SOL_SOCKET,
                opt,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// A zero-length, non-blocking recvfrom: with busy polling on, the kernel runs the
    /// queue's NAPI poll in it. EAGAIN is the normal answer and is ignored.
    fn poke(&self) {
        // SAFETY: no buffer and no address: the kernel writes nothing into our memory.
        unsafe {
            libc::recvfrom(
                self.0,
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }
}
