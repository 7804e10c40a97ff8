//! Transmit: frames from the guest's transmit queue into NIC buffers.
//!
//! A transmit chain is a `virtio_net_hdr_v1` followed by the frame, gathered across any number
//! of device-readable descriptors (ANY_LAYOUT), directly or through an indirect table. The
//! frame is copied into a buffer the caller provides (a UMEM frame) and the chain is returned
//! to the guest at once, since the copy no longer needs it.

use super::GuestMemory;
use virtio_queue::{Queue, QueueT};

use super::offload::{
    self, NetHeader, Offload, Offloads, TsoPlan, F_NEEDS_CSUM, MAX_GSO_FRAME, TCP_CSUM_OFFSET,
};
use super::split_ring::{publish_used, Chains};
use super::zero_copy_tx::{guest_pieces, slot_headers, PieceLayout};
use super::{read_at, GuestMemoryCursor, QueueError, Segment};
use crate::datapath::device::{rx_header, ETH_HLEN, VLAN_TAG_LEN, VNET_HDR_LEN};

/// Where transmitted frames go: free NIC buffers, taken one at a time, or (for a sink that
/// switches) straight to another port.
pub trait TxBuffers {
    /// A free buffer for the next frame, or `None` when all are in flight.
    fn next_buffer(&mut self) -> Option<&mut [u8]>;
    /// Hands the buffer last returned by `next_buffer`, holding `len` bytes, on (to the NIC,
    /// or to another port). A sink that refuses the frame (policy) says why; the buffer then
    /// stays free for the next frame.
    fn submit(&mut self, len: usize) -> Result<(), TxDrop>;
    /// Whether the frame just routed may leave a checksum for the NIC to complete
    /// (`submit_partial`); if not, the datapath completes it before `submit`.
    fn completes_checksums(&self) -> bool {
        false
    }
    /// Like `submit`, the checksum over the frame's bytes from `start` on left for the NIC
    /// (the kernel's AF_XDP TX metadata) to put into the field at `start + offset`, which holds
    /// the pseudo-header sum. Only after `completes_checksums` said yes.
    fn submit_partial(&mut self, _len: usize, _start: usize, _offset: usize) -> Result<(), TxDrop> {
        Err(TxDrop::Offload)
    }
    /// Bytes one buffer of `next_buffer` holds for a frame; a larger frame goes whole to
    /// `submit_frame` instead. Unbounded for a sink whose buffers take any frame it is given.
    fn buffer_len(&self) -> usize {
        usize::MAX
    }
    /// Hands on a whole frame larger than `buffer_len`, which the sink spreads over as many
    /// buffers as it takes (a jumbo frame over multi-buffer AF_XDP), after `reserve` made sure
    /// of them. Routed like `submit`; a sink that cannot take such frames drops them.
    fn submit_frame(&mut self, _frame: &[u8]) -> Result<(), TxDrop> {
        Err(TxDrop::Oversized)
    }
    /// Makes sure the next `n` calls of `next_buffer` find a buffer (a TSO frame's segments
    /// go out together or not at all); false if that many are not free now.
    fn reserve(&mut self, _n: usize) -> bool {
        true
    }
    /// Decides where a frame goes from its Ethernet header and length, before it is copied
    /// anywhere; called once per frame, before `next_buffer` and `submit` (which a TSO
    /// frame's segments call once each).
    fn route(&mut self, _eth: &[u8], _len: usize) -> Route {
        Route::Copy
    }
    /// Takes back the last [`Route::Copy`] decision, for a `len`-byte frame that found no
    /// free buffer and will be routed again later (a policer returns its tokens).
    fn unroute(&mut self, _len: usize) {}
    /// Takes the batch's [`Route::Direct`] frames, whose bytes are in `arena` (the sink may
    /// finish their offloads there).
    fn deliver_direct(&mut self, _frames: &[DirectFrame], _arena: &mut [u8]) {}
    /// For a sink whose NIC reads guest memory (its UMEM is the guest's memory file): where a
    /// frame's pieces lie, so that it can go out from where the guest put it. `None` (every
    /// frame is copied) otherwise.
    fn in_place(&self) -> Option<PieceLayout<'_>> {
        None
    }
    /// Hands on chain `head`'s frame, routed [`Route::Copy`], as the first `headers` bytes
    /// the caller wrote into the buffer `next_buffer` returned (the headers the route was
    /// decided on), then `pieces` of guest memory (UMEM address, length). The chain stays
    /// the sink's until the NIC is done with the frame: it gets no used entry now.
    fn submit_in_place(
        &mut self,
        _head: u16,
        _headers: usize,
        _pieces: &[(u64, u32)],
    ) -> Result<(), TxDrop> {
        Err(TxDrop::Oversized)
    }
    /// Whether the TSO frame just routed [`Route::Copy`] goes to the kernel whole, as one GSO
    /// frame the kernel (software GSO at the driver) or the NIC (TSO) cuts, rather than cut
    /// here: `Some` with how the sink sends it. The frame then waits in the batch's list of
    /// [`KernelGsoFrame`]s (`TxScratch::kernel_gso_frames`), which the caller sends after the
    /// batch's NIC frames. `None` (the default): the datapath segments it.
    fn kernel_gso(&self) -> Option<KernelGso> {
        None
    }
}

/// How a sink hands TSO frames to the kernel whole ([`TxBuffers::kernel_gso`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelGso {
    /// The 802.1Q tag the sink inserts after the MAC addresses: every offset of the header
    /// sent with the frame moves 4 bytes further.
    pub vlan: Option<u16>,
    /// How many GSO frames the sink sends at once: the batch ends before a further one, so
    /// the arena holds at most this many (each up to 64 KiB).
    pub batch: usize,
    /// Frame bytes the kernel takes now without refusing them (room in the socket's send
    /// buffer): a TSO frame that would not fit behind the batch's others is cut by the
    /// daemon instead, rather than dropped by the kernel.
    pub room: usize,
}

/// A TSO frame of the batch for the kernel: the header it is sent with and where its bytes
/// lie in the batch's arena. The header is the daemon's, made from the frame as parsed and
/// checked ([`kernel_gso_header`]), never the guest's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelGsoFrame {
    pub header: NetHeader,
    /// The 802.1Q tag to insert after the MAC addresses, if any.
    pub vlan: Option<u16>,
    /// Where the frame starts in the arena.
    pub start: usize,
    /// The frame's length up to the end of its IP packet (Ethernet padding left out), tag not
    /// included.
    pub len: usize,
}

impl KernelGsoFrame {
    /// The frame's bytes (without the tag the sink inserts).
    pub fn bytes<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.start..self.start + self.len]
    }
}

/// The net header the kernel gets with a checked TSO frame: every field from the frame as
/// [`TsoPlan`] parsed it, shifted by a tag the sink inserts (`tagged`). `csum_start` is the
/// TCP header, whose checksum field holds the pseudo-header sum the guest left there (the
/// kernel adjusts it per segment, as for a tap's frames).
pub fn kernel_gso_header(plan: &TsoPlan, tagged: bool) -> NetHeader {
    let shift = if tagged { VLAN_TAG_LEN } else { 0 };
    let gso_type = if plan.ipv6 {
        offload::GSO_TCPV6
    } else {
        offload::GSO_TCPV4
    };
    NetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: if plan.ecn {
            gso_type | offload::GSO_ECN
        } else {
            gso_type
        },
        hdr_len: (plan.headers + shift) as u16,
        gso_size: plan.mss as u16,
        csum_start: (plan.l4 + shift) as u16,
        csum_offset: TCP_CSUM_OFFSET as u16,
    }
}

/// Where one frame goes, as the sink decides from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Into a NIC buffer (`next_buffer`, then `submit`).
    Copy,
    /// Elsewhere, by the sink itself, with this tag of its choosing: the frame is read into
    /// the batch's arena and handed to `deliver_direct` at the end of the batch, skipping
    /// the NIC buffer pool (frames between two ports of the daemon).
    Direct(u32),
    Drop(TxDrop),
}

/// A frame routed [`Route::Direct`]: its tag and where it lies in the arena. The arena holds
/// a receive-side net header right before the frame (`rx_header(1)`, or the sender's
/// offload request, checked, with `num_buffers` 1), so the receiving port writes header and
/// frame into its guest with one copy, or finishes the offload first if it cannot take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectFrame {
    pub tag: u32,
    /// Where the net header starts; the frame follows it.
    pub start: usize,
    /// The frame's length, without the header.
    pub len: usize,
}

impl DirectFrame {
    /// The frame alone.
    pub fn bytes<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.start + VNET_HDR_LEN..self.start + VNET_HDR_LEN + self.len]
    }

    /// The net header and the frame, as a receive queue takes them.
    pub fn with_rx_header<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.start..self.start + VNET_HDR_LEN + self.len]
    }
}

/// Why a transmitted frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxDrop {
    /// Larger than the MTU allows or than a NIC buffer.
    Oversized,
    /// Shorter than an Ethernet header, or the chain is shorter than the net header.
    Runt,
    /// Asks for an offload that was not negotiated, or a malformed one (`offload::BadOffload`).
    Offload,
    /// Sent with a source MAC the port may not use.
    Spoofed,
    /// Over the port's rate limit.
    RateLimited,
    /// Carries a VLAN tag of its own, which the port does not allow.
    Vlan,
}

/// Totals of one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxTally {
    pub frames: u64,
    pub bytes: u64,
    pub dropped_oversized: u64,
    pub dropped_runt: u64,
    pub dropped_offload: u64,
    pub dropped_spoofed: u64,
    pub dropped_rate_limited: u64,
    pub dropped_vlan: u64,
    /// TSO frames taken from the guest (each also counts once in `frames`).
    pub gso_frames: u64,
    /// Frames the software segmenter made for the NIC.
    pub segments: u64,
    /// TSO frames the kernel took whole (counted by the caller, which sends them).
    pub gso_kernel: u64,
    /// TSO frames for the kernel it did not take (counted by the caller; their frames and
    /// bytes are taken back out of `frames` and `bytes`).
    pub dropped_gso_kernel: u64,
    /// Partial checksums completed in software.
    pub csum_computed: u64,
    /// Frames handed to the NIC with their checksum left for it to complete (NEEDS_CSUM
    /// frames and segments of TSO frames).
    pub csum_offloaded: u64,
    /// Frames sent from guest memory as they lay (each also counts once in `frames`); their
    /// chains go back to the guest when the NIC is done with them, not in this batch.
    pub in_place: u64,
}

impl TxTally {
    fn drop(&mut self, why: TxDrop) {
        match why {
            TxDrop::Oversized => self.dropped_oversized += 1,
            TxDrop::Runt => self.dropped_runt += 1,
            TxDrop::Offload => self.dropped_offload += 1,
            TxDrop::Spoofed => self.dropped_spoofed += 1,
            TxDrop::RateLimited => self.dropped_rate_limited += 1,
            TxDrop::Vlan => self.dropped_vlan += 1,
        }
    }
}

/// How a transmit batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStop {
    /// The guest's ring is empty.
    RingEmpty,
    /// No free NIC buffer: the rest waits for completions.
    NoBuffers,
    /// The batch limit was reached with more chains waiting.
    Budget,
}

/// What a port may send: the largest frame without segmentation (Ethernet header included),
/// and the offloads the guest negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxLimits {
    pub max_frame: usize,
    pub offloads: Offloads,
}

/// Chains up to this long (net header included) are read out of the guest in one piece
/// before they are routed.
const WHOLE_READ: usize = 256;

/// Reusable per-worker state.
#[derive(Default)]
pub struct TxScratch {
    segs: Vec<Segment>,
    /// The batch's direct frames and their bytes (the arena only grows, and stays warm).
    direct: Vec<DirectFrame>,
    arena: Vec<u8>,
    /// The batch's handled chains (head, 0 bytes written), returned to the used ring together.
    used: Vec<(u16, u32)>,
    /// The guest-memory pieces of the frame sent in place.
    pieces: Vec<(u64, u32)>,
    /// The batch's TSO frames for the kernel, in the order the guest posted them; their
    /// bytes are in `arena`.
    kernel_gso: Vec<KernelGsoFrame>,
}

impl TxScratch {
    /// The last batch's TSO frames for the kernel ([`TxBuffers::kernel_gso`]) and the arena
    /// their bytes are in, for the caller to send once the batch's NIC frames are out.
    pub fn kernel_gso_frames(&self) -> (&[KernelGsoFrame], &[u8]) {
        (&self.kernel_gso, &self.arena)
    }
}

/// How one chain's frame left the batch.
enum Sent {
    /// Handed on: `len` bytes of frame.
    Frame(usize),
    /// Waits for NIC buffers: the chain goes back to the ring.
    NoBuffers,
    /// Handed on from guest memory: `len` bytes of frame, and the chain is the sink's until
    /// the NIC is done with it.
    InPlace(usize),
    /// Must leave after the batch's kernel GSO frames (a frame for the NIC behind one), or
    /// the list is full: the batch ends, and the chain goes back to the ring for the next.
    AfterKernelGso,
}

/// Moves up to `budget` frames from the guest's transmit queue into `buffers`. The handled
/// chains go back to the used ring together, with one index update; the caller decides the
/// notification with `switch::notify_guest_since`.
///
/// A frame asking for an offload is checked against `limits.offloads` and itself
/// ([`offload::classify`]); to the NIC its checksum is completed, or it is segmented, here;
/// to another port it goes as it is, and the receiver finishes what its guest cannot take.
/// Returns why it stopped; on `Err` the queue is unusable until the device is reset.
pub fn transmit_batch(
    mem: &GuestMemory,
    queue: &mut Queue,
    buffers: &mut impl TxBuffers,
    limits: TxLimits,
    budget: usize,
    scratch: &mut TxScratch,
    tally: &mut TxTally,
) -> Result<TxStop, QueueError> {
    let mut cursor = GuestMemoryCursor::new(mem);
    scratch.used.clear();
    scratch.direct.clear();
    scratch.kernel_gso.clear();
    let mut arena_used = 0usize;
    let mut stop = TxStop::Budget;
    let next_avail = {
        // One pass over the avail ring per batch: the avail index is read once.
        let Some(mut chains) = Chains::open(mem, queue)? else {
            return Ok(TxStop::RingEmpty);
        };
        for _ in 0..budget {
            let Some((head, total)) = chains.take(false, &mut scratch.segs)? else {
                stop = TxStop::RingEmpty;
                break;
            };
            if let Some(next) = chains.peek_buffer(super::rx::PREFETCH_AHEAD) {
                cursor.prefetch(next);
            }
            let mut frame = ChainFrame {
                cursor: &mut cursor,
                segs: &scratch.segs,
                pieces: &mut scratch.pieces,
                arena: &mut scratch.arena,
                at: arena_used,
                total: total as usize,
                head,
            };
            let kept = Kept {
                direct: &mut scratch.direct,
                kernel_gso: &mut scratch.kernel_gso,
            };
            match frame.send(buffers, limits, kept, tally)? {
                Ok(Sent::Frame(len)) => {
                    tally.frames += 1;
                    tally.bytes += len as u64;
                }
                Ok(Sent::InPlace(len)) => {
                    tally.frames += 1;
                    tally.bytes += len as u64;
                    tally.in_place += 1;
                    continue;
                }
                Ok(Sent::NoBuffers) => {
                    // The chain waits for a NIC buffer; the ring resumes with it, and the
                    // sink forgot the route (it is routed again then).
                    chains.untake();
                    stop = TxStop::NoBuffers;
                    break;
                }
                Ok(Sent::AfterKernelGso) => {
                    // The batch ends here: its NIC frames are kicked, then its GSO frames
                    // sent, and this chain starts the next batch.
                    chains.untake();
                    stop = TxStop::Budget;
                    break;
                }
                Err(why) => tally.drop(why),
            }
            if let Some(last) = scratch.direct.last() {
                arena_used = arena_used.max(last.start + VNET_HDR_LEN + last.len);
            }
            if let Some(last) = scratch.kernel_gso.last() {
                arena_used = arena_used.max(last.start + last.len);
            }
            scratch.used.push((head, 0));
        }
        chains.next_avail()
    };
    queue.set_next_avail(next_avail);
    if !scratch.direct.is_empty() {
        buffers.deliver_direct(&scratch.direct, &mut scratch.arena[..arena_used]);
    }
    publish_used(mem, queue, &scratch.used)?;
    Ok(stop)
}

/// The batch's frames whose bytes stay in the arena until the batch ends.
struct Kept<'a> {
    direct: &'a mut Vec<DirectFrame>,
    kernel_gso: &'a mut Vec<KernelGsoFrame>,
}

/// One transmit chain on its way out: its buffers, and the arena where its bytes are read.
struct ChainFrame<'a, 'm> {
    cursor: &'a mut GuestMemoryCursor<'m>,
    segs: &'a [Segment],
    pieces: &'a mut Vec<(u64, u32)>,
    arena: &'a mut Vec<u8>,
    /// Where in the arena this chain's bytes (net header first) go.
    at: usize,
    /// Chain length, net header included.
    total: usize,
    head: u16,
}

/// Both headers: what routing needs before anything else is read.
const HEADERS: usize = VNET_HDR_LEN + ETH_HLEN;

impl ChainFrame<'_, '_> {
    /// Reads bytes `[from, to)` of the chain into the arena at the same offsets.
    fn read(&mut self, from: usize, to: usize) -> Result<(), QueueError> {
        let (at, head) = (self.at, self.head);
        if self.arena.len() < at + to {
            self.arena.resize(at + to, 0);
        }
        read_at(
            self.cursor,
            self.segs,
            from,
            &mut self.arena[at + from..at + to],
        )
        .map(|_| ())
        .map_err(|source| QueueError::OutOfMemory { head, source })
    }

    /// The frame's bytes in the arena, `len` long.
    fn frame(&self, len: usize) -> &[u8] {
        &self.arena[self.at + VNET_HDR_LEN..self.at + VNET_HDR_LEN + len]
    }

    /// Checks, routes and hands on the chain's frame. The outer `Err` breaks the queue; the
    /// inner one is a counted drop.
    fn send(
        &mut self,
        buffers: &mut impl TxBuffers,
        limits: TxLimits,
        kept: Kept<'_>,
        tally: &mut TxTally,
    ) -> Result<Result<Sent, TxDrop>, QueueError> {
        let total = self.total;
        if total < VNET_HDR_LEN {
            return Ok(Err(TxDrop::Runt));
        }
        // A small chain is read whole into the arena in one go (every read of guest memory
        // has a fixed cost a short frame does not amortise); a larger one only up to the end
        // of its Ethernet header, the rest once its route is known.
        let mut read = if total <= WHOLE_READ {
            total
        } else {
            total.min(HEADERS)
        };
        self.read(0, read)?;
        let hdr = NetHeader::parse(self.arena[self.at..].first_chunk().expect("read above"));
        let len = total - VNET_HDR_LEN;
        let limit = if hdr.gso_type == offload::GSO_NONE {
            limits.max_frame
        } else {
            MAX_GSO_FRAME
        };
        if len > limit {
            return Ok(Err(TxDrop::Oversized));
        }
        if len < ETH_HLEN {
            return Ok(Err(TxDrop::Runt));
        }
        // An offload is checked on the whole frame, read once: every byte the checks saw is
        // the byte that is sent.
        let offload = if hdr.wants_offload() {
            if read < total {
                self.read(read, total)?;
                read = total;
            }
            match offload::classify(&hdr, self.frame(len), limits.offloads) {
                Ok(o) => o,
                Err(_) => return Ok(Err(TxDrop::Offload)),
            }
        } else {
            Offload::None
        };
        match buffers.route(&self.frame(ETH_HLEN)[..ETH_HLEN], len) {
            Route::Drop(why) => Ok(Err(why)),
            Route::Direct(tag) => {
                // The frame stays where it was read; its tx header makes way for the
                // receiver's, which keeps a checked offload request for it.
                if read < total {
                    self.read(read, total)?;
                }
                let rx = match offload {
                    Offload::None => rx_header(1),
                    _ => NetHeader {
                        flags: hdr.flags & F_NEEDS_CSUM,
                        ..hdr
                    }
                    .to_bytes(1),
                };
                self.arena[self.at..self.at + VNET_HDR_LEN].copy_from_slice(&rx);
                kept.direct.push(DirectFrame {
                    tag,
                    start: self.at,
                    len,
                });
                Ok(Ok(Sent::Frame(len)))
            }
            Route::Copy => {
                if let Offload::Tso(plan) = offload {
                    // Segments must fit the link, whoever cuts them: an MSS the MTU does not
                    // allow is the guest's mistake.
                    if plan.max_segment_len() > limits.max_frame {
                        return Ok(Err(TxDrop::Offload));
                    }
                }
                let listed = || kept.kernel_gso.iter().map(|f| f.len).sum::<usize>();
                let to_kernel = match offload {
                    // One segment is no GSO frame to the kernel: it is only copied.
                    Offload::Tso(plan) if plan.segments() > 1 => buffers
                        .kernel_gso()
                        .filter(|k| listed() + plan.headers + plan.payload <= k.room),
                    _ => None,
                };
                // Frames for the NIC are kicked at the end of the batch, before its GSO
                // frames are sent: one behind a GSO frame waits for the next batch, so that
                // a flow's frames leave in the order the guest posted them.
                let full = to_kernel.is_some_and(|k| kept.kernel_gso.len() >= k.batch);
                if !kept.kernel_gso.is_empty() && (to_kernel.is_none() || full) {
                    buffers.unroute(len);
                    return Ok(Ok(Sent::AfterKernelGso));
                }
                match (offload, to_kernel) {
                    (Offload::Tso(plan), Some(sink)) => {
                        // Read whole for the offload's checks above: the kernel gets the
                        // bytes they saw, up to the end of the IP packet.
                        kept.kernel_gso.push(KernelGsoFrame {
                            header: kernel_gso_header(&plan, sink.vlan.is_some()),
                            vlan: sink.vlan,
                            start: self.at + VNET_HDR_LEN,
                            len: plan.headers + plan.payload,
                        });
                        tally.gso_frames += 1;
                        Ok(Ok(Sent::Frame(len)))
                    }
                    (Offload::Tso(plan), None) => self.segment(buffers, &plan, len, tally),
                    _ if len > buffers.buffer_len() => {
                        if read < total {
                            // The bytes read so far (the routed Ethernet header) stay as
                            // they are.
                            self.read(read, total)?;
                        }
                        self.copy_whole(buffers, &offload, len, tally)
                    }
                    _ => match self.in_place(buffers, &offload, len, read, tally)? {
                        Some(sent) => Ok(sent),
                        None => self.copy(buffers, &offload, len, read, tally),
                    },
                }
            }
        }
    }

    /// Writes the frame's first `dst.len()` bytes (at least its Ethernet header) into `dst`:
    /// from the arena where `read` bytes of the chain were read, else the routed Ethernet
    /// header from the arena, not a second read of guest memory another vCPU may have
    /// rewritten since, and the rest from guest memory.
    fn write_start(&mut self, read: usize, dst: &mut [u8]) -> Result<(), QueueError> {
        let (frame, head) = (self.at + VNET_HDR_LEN, self.head);
        if read >= VNET_HDR_LEN + dst.len() {
            dst.copy_from_slice(&self.arena[frame..frame + dst.len()]);
            return Ok(());
        }
        dst[..ETH_HLEN].copy_from_slice(&self.arena[frame..self.at + HEADERS]);
        read_at(self.cursor, self.segs, HEADERS, &mut dst[ETH_HLEN..])
            .map_err(|source| QueueError::OutOfMemory { head, source })?;
        Ok(())
    }

    /// Copies the frame into one NIC buffer, completing a partial checksum there.
    fn copy(
        &mut self,
        buffers: &mut impl TxBuffers,
        offload: &Offload,
        len: usize,
        read: usize,
        tally: &mut TxTally,
    ) -> Result<Result<Sent, TxDrop>, QueueError> {
        let to_nic = buffers.completes_checksums();
        let Some(buf) = buffers.next_buffer() else {
            buffers.unroute(len);
            return Ok(Ok(Sent::NoBuffers));
        };
        if len > buf.len() {
            return Ok(Err(TxDrop::Oversized));
        }
        self.write_start(read, &mut buf[..len])?;
        let sent = match *offload {
            Offload::Checksum { start, offset } if to_nic => {
                tally.csum_offloaded += 1;
                buffers.submit_partial(len, start, offset)
            }
            Offload::Checksum { .. } => {
                offload::complete_checksum(&mut buf[..len], offload);
                tally.csum_computed += 1;
                buffers.submit(len)
            }
            _ => buffers.submit(len),
        };
        Ok(sent.map(|()| Sent::Frame(len)))
    }

    /// Hands on the frame from where it lies in guest memory, its first bytes (the headers
    /// routed, and a checksum completed here) from a NIC buffer; `None` if the sink does not
    /// send from guest memory or the frame cannot go so (`zero_copy_tx::NotInPlace`), to be
    /// copied instead.
    fn in_place(
        &mut self,
        buffers: &mut impl TxBuffers,
        offload: &Offload,
        len: usize,
        read: usize,
        tally: &mut TxTally,
    ) -> Result<Option<Result<Sent, TxDrop>>, QueueError> {
        let (at, head) = (self.at, self.head);
        let csum_end = match *offload {
            Offload::Checksum { start, offset } => Some(start + offset + 2),
            _ => None,
        };
        let headers = {
            let Some(layout) = buffers.in_place() else {
                return Ok(None);
            };
            let Ok(headers) = slot_headers(len, csum_end, buffers.buffer_len()) else {
                return Ok(None);
            };
            if guest_pieces(layout, self.segs, VNET_HDR_LEN + headers, self.pieces).is_err() {
                return Ok(None);
            }
            headers
        };
        let Some(buf) = buffers.next_buffer() else {
            buffers.unroute(len);
            return Ok(Some(Ok(Sent::NoBuffers)));
        };
        if let Offload::Checksum { .. } = offload {
            // An offload was checked on the whole frame, read into the arena: the sum is
            // taken there and the field goes out from the slot. The guest may change the
            // rest before the NIC reads it; that spoils only its own frame.
            offload::complete_checksum(
                &mut self.arena[at + VNET_HDR_LEN..at + VNET_HDR_LEN + len],
                offload,
            );
            tally.csum_computed += 1;
        }
        self.write_start(read, &mut buf[..headers])?;
        let sent = buffers.submit_in_place(head, headers, self.pieces);
        Ok(Some(sent.map(|()| Sent::InPlace(len))))
    }

    /// Hands on a frame larger than one NIC buffer (jumbo MTU), read whole into the arena:
    /// its partial checksum is completed there, and the sink spreads it over buffers.
    fn copy_whole(
        &mut self,
        buffers: &mut impl TxBuffers,
        offload: &Offload,
        len: usize,
        tally: &mut TxTally,
    ) -> Result<Result<Sent, TxDrop>, QueueError> {
        if !buffers.reserve(len.div_ceil(buffers.buffer_len())) {
            buffers.unroute(len);
            return Ok(Ok(Sent::NoBuffers));
        }
        let at = self.at + VNET_HDR_LEN;
        let frame = &mut self.arena[at..at + len];
        if let Offload::Checksum { .. } = offload {
            offload::complete_checksum(frame, offload);
            tally.csum_computed += 1;
        }
        Ok(buffers.submit_frame(frame).map(|()| Sent::Frame(len)))
    }

    /// Cuts a TSO frame into NIC buffers: all its segments, or none while too few buffers
    /// are free. Where the sink has the NIC complete checksums, a segment's TCP checksum is
    /// left to it and the payload is only copied; otherwise it is summed while copied. A
    /// segment larger than one buffer (a jumbo MTU's) is written after the frame in the arena,
    /// checksums complete, and handed on whole.
    fn segment(
        &mut self,
        buffers: &mut impl TxBuffers,
        plan: &TsoPlan,
        len: usize,
        tally: &mut TxTally,
    ) -> Result<Result<Sent, TxDrop>, QueueError> {
        let buffer_len = buffers.buffer_len();
        let pieces = (0..plan.segments())
            .map(|i| plan.segment_len(i).div_ceil(buffer_len))
            .sum();
        if !buffers.reserve(pieces) {
            buffers.unroute(len);
            return Ok(Ok(Sent::NoBuffers));
        }
        let end = self.at + VNET_HDR_LEN + len;
        if plan.max_segment_len() > buffer_len && self.arena.len() < end + plan.max_segment_len() {
            self.arena.resize(end + plan.max_segment_len(), 0);
        }
        let (taken, spare) = self.arena.split_at_mut(end);
        let frame = &taken[self.at + VNET_HDR_LEN..];
        let partial = buffers.completes_checksums();
        for i in 0..plan.segments() {
            let sent = if plan.segment_len(i) > buffer_len {
                let n = plan.write_segment(frame, i, spare);
                buffers.submit_frame(&spare[..n])
            } else {
                let Some(buf) = buffers.next_buffer() else {
                    // `reserve` promised these; a sink that breaks it loses the rest.
                    return Ok(Err(TxDrop::Oversized));
                };
                if buf.len() < plan.segment_len(i) {
                    return Ok(Err(TxDrop::Oversized));
                }
                if partial {
                    let n = plan.write_segment_partial(frame, i, buf);
                    tally.csum_offloaded += 1;
                    buffers.submit_partial(n, plan.l4, TCP_CSUM_OFFSET)
                } else {
                    let n = plan.write_segment(frame, i, buf);
                    buffers.submit(n)
                }
            };
            if let Err(why) = sent {
                return Ok(Err(why));
            }
            tally.segments += 1;
        }
        tally.gso_frames += 1;
        Ok(Ok(Sent::Frame(len)))
    }
}

#[cfg(test)]
mod tests;
