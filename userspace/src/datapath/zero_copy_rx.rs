//! Receive into the guest's own buffers: the guest's RAM file is the AF_XDP UMEM of a port
//! with a NIC queue of its own, its receive buffers go on the fill ring ahead of traffic, and
//! the kernel (or a zero-copy NIC) writes each frame straight into one. The daemon writes only
//! the net header in front of it and the used entry.
//!
//! A buffer at guest address `g`, at file offset `f`, is posted as fill address
//! `f + 12 - data_offset`, where `data_offset` is where the kernel puts a frame after its fill
//! address (256 + the UMEM's headroom): the frame then starts at `f + 12`, right after the net
//! header. The kernel writes nothing in front of the frame and at most `max_frame` bytes of it
//! (the UMEM's layout makes it drop longer ones), so only a buffer holding `12 + max_frame`
//! bytes, all in one memory region, is posted. Everything about a buffer is the guest's to
//! choose and is checked here: a buffer that cannot be posted goes back to the guest at once,
//! unused (length 0), and is counted; it is never handed to the kernel, which would silently
//! consume an address it cannot use and never give the buffer back.
//!
//! The kernel can fill only the buffers the guest has posted. When the guest is late in
//! posting them again, spare frames of the daemon's own area of the same UMEM go on the fill
//! ring, a small batch at a time (the fill ring is FIFO: a guest that catches up must not
//! find its buffers queued behind hundreds of spares). A frame that lands in a spare is
//! copied, behind its net header, into the guest's next available chain, and the spare goes
//! back to the pool. Used entries follow the frames' order of arrival across both kinds: a
//! spare frame that finds no chain waits in a pending list, with every frame after it, and
//! chains the guest makes available drain that list before any goes to the kernel again. The
//! list holds at most the spares and the guest buffers the kernel had, so nothing the guest
//! does makes it grow.
//!
//! Invariant: every head taken from the avail ring (every entry before the queue's next avail
//! index, the ring's base a frontend reads at `GET_VRING_BASE`) gets exactly one used entry,
//! and no other head gets one, in every path, errors included. A taken head is always in
//! exactly one place: the used entries of the current round (published by `post` and
//! `complete` also when they fail), the buffers the kernel holds, or the frames waiting for a
//! chain (both given back unused by `give_back`). A round that fails part-way moves the next
//! avail index past the chains it handed over and no further, so a restart from the base
//! neither loses a chain nor uses one twice.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::device::{rx_header, VNET_HDR_LEN};
use super::dirty_log::region_log;
use super::rx::{copy_frame, Copied, RxScratch};
use super::split_ring::{publish_used, Chains};
use super::{GuestMemory, GuestMemoryCursor, QueueError, Segment};

/// One guest memory region and where it lies in the guest's RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Why a guest's memory cannot be its port's UMEM: the port keeps the copy path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotOneFile {
    #[error("guest memory region at {guest_addr:#x} is not backed by a file")]
    NoFile { guest_addr: u64 },
    #[error("guest memory comes from {files} files, not one")]
    SeveralFiles { files: usize },
    #[error("guest memory region at {guest_addr:#x}: cannot inspect its file: {error}")]
    Stat { guest_addr: u64, error: String },
    #[error("guest memory has no regions")]
    Empty,
}

/// The guest's RAM as one file: which guest address is at which file offset.
#[derive(Debug, Clone)]
pub struct GuestFile {
    regions: Vec<FileRegion>,
    file: Option<Arc<File>>,
    file_len: u64,
}

impl GuestFile {
    /// The file behind every region of `mem`, if there is exactly one (QEMU's
    /// `memory-backend-memfd`, split into regions at different offsets).
    pub fn of(mem: &GuestMemory) -> Result<Self, NotOneFile> {
        let mut regions = Vec::new();
        let mut files: Vec<(u64, u64)> = Vec::new();
        let mut file = None;
        let mut file_len = 0;
        for r in mem.iter() {
            let guest_addr = r.start_addr().0;
            let fo = r.file_offset().ok_or(NotOneFile::NoFile { guest_addr })?;
            let meta = fo.file().metadata().map_err(|e| NotOneFile::Stat {
                guest_addr,
                error: e.to_string(),
            })?;
            let id = (meta.dev(), meta.ino());
            if !files.contains(&id) {
                files.push(id);
            }
            file.get_or_insert_with(|| fo.arc().clone());
            file_len = meta.len();
            regions.push(FileRegion {
                guest_addr,
                len: r.len(),
                file_offset: fo.start(),
            });
        }
        match files.len() {
            0 => Err(NotOneFile::Empty),
            1 => Ok(GuestFile {
                regions,
                file,
                file_len,
            }),
            files => Err(NotOneFile::SeveralFiles { files }),
        }
    }

    /// A guest file described by its regions alone (no open file), `file_len` bytes long.
    pub fn from_regions(regions: Vec<FileRegion>, file_len: u64) -> Self {
        GuestFile {
            regions,
            file: None,
            file_len,
        }
    }

    /// The file, to map and register as the UMEM.
    pub fn file(&self) -> Option<&Arc<File>> {
        self.file.as_ref()
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The file offset of guest range `[addr, addr + len)`, if it lies in one region and in
    /// the file.
    pub fn file_offset(&self, addr: u64, len: u64) -> Option<u64> {
        let end = addr.checked_add(len)?;
        let r = self
            .regions
            .iter()
            .find(|r| addr >= r.guest_addr && end <= r.guest_addr.saturating_add(r.len))?;
        let offset = r.file_offset.checked_add(addr - r.guest_addr)?;
        (offset.checked_add(len)? <= self.file_len).then_some(offset)
    }
}

/// Where the kernel puts a frame after its fill address, and how long it may be (from the
/// UMEM's layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillLayout {
    pub data_offset: u64,
    pub max_frame: u32,
    /// On a zero-copy NIC, the DMA page size: the kernel takes a fill address only if its
    /// whole chunk (`data_offset + max_frame` bytes from it) stays within one such page,
    /// unless the pages are DMA-contiguous, which user space cannot see, and consumes any
    /// other address silently (`xp_check_unaligned`). `None` in copy mode, where the kernel
    /// copies through one contiguous mapping and any placement works.
    pub dma_page: Option<u64>,
}

/// Why a receive buffer was not posted (it went back to the guest unused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unpostable {
    #[error("receive buffer of {len} bytes cannot hold the net header and the largest frame")]
    TooSmall { len: u32 },
    #[error("receive buffer is not inside one region of the guest memory file")]
    OutsideFile,
    #[error("receive buffer lies too close to the start of the guest memory file")]
    BeforeFileStart,
    #[error("receive buffer is already on the fill ring in another chain")]
    AlreadyPosted,
    #[error("receive buffer's chunk crosses a DMA page of the zero-copy NIC")]
    CrossesDmaPage,
}

/// The fill address for a receive buffer: the frame then lands right after the net header.
pub fn fill_address(
    file: &GuestFile,
    layout: FillLayout,
    buffer: Segment,
) -> Result<u64, Unpostable> {
    let (addr, len) = (buffer.0 .0, buffer.1);
    let need = VNET_HDR_LEN as u64 + u64::from(layout.max_frame);
    if u64::from(len) < need {
        return Err(Unpostable::TooSmall { len });
    }
    // Only the part the kernel and the daemon may write needs to be in the file.
    let offset = file
        .file_offset(addr, need)
        .ok_or(Unpostable::OutsideFile)?;
    let fill = (offset + VNET_HDR_LEN as u64)
        .checked_sub(layout.data_offset)
        .ok_or(Unpostable::BeforeFileStart)?;
    if let Some(page) = layout.dma_page.filter(|&p| p > 0) {
        // The chunk's last byte is the last one the kernel may write: `offset + need - 1`.
        if fill / page != (offset + need - 1) / page {
            return Err(Unpostable::CrossesDmaPage);
        }
    }
    Ok(fill)
}

/// A guest buffer on the fill ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Posted {
    head: u16,
    buffer: u64,
}

/// Counts of one round, added to the port's counters by the caller.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZeroCopyRxTally {
    pub posted: u64,
    pub frames: u64,
    pub bytes: u64,
    pub returned_too_small: u64,
    pub returned_outside_file: u64,
    pub returned_already_posted: u64,
    /// Zero-copy NICs only: chunks the kernel would consume without using.
    pub returned_crosses_dma_page: u64,
    /// Receive descriptors naming no buffer the daemon posted (a kernel fault, not the
    /// guest's): ignored.
    pub unknown_completions: u64,
    /// Receive descriptors naming a posted guest buffer or spare with a frame at another
    /// offset than the layout's or longer than its largest (a kernel fault): the buffer goes
    /// back to the guest unused, in its place among the frames, the spare to the pool.
    pub bad_completions: u64,
    /// Guest buffers among `bad_completions` (they count as refused).
    pub returned_bad_completion: u64,
    /// Guest chains the frames used (a spare frame may take several with MRG_RXBUF).
    pub buffers: u64,
    /// Frames that landed in a spare frame and were copied into a guest chain (included in
    /// `frames`).
    pub spare_frames: u64,
    /// Spare frames too large for the guest's chains (no MRG_RXBUF): dropped.
    pub dropped_too_large: u64,
    /// Spare frames put on the fill ring.
    pub spares_posted: u64,
}

impl ZeroCopyRxTally {
    /// Buffers that went back to the guest unused.
    pub fn refused(&self) -> u64 {
        self.returned_too_small
            + self.returned_outside_file
            + self.returned_already_posted
            + self.returned_crosses_dma_page
            + self.returned_bad_completion
    }

    fn returned(&mut self, why: Unpostable) {
        match why {
            Unpostable::TooSmall { .. } => self.returned_too_small += 1,
            Unpostable::OutsideFile | Unpostable::BeforeFileStart => {
                self.returned_outside_file += 1
            }
            Unpostable::AlreadyPosted => self.returned_already_posted += 1,
            Unpostable::CrossesDmaPage => self.returned_crosses_dma_page += 1,
        }
    }
}

/// Hashes a fill address with one multiply-xorshift round: the default SipHash was a
/// noticeable part of a received frame's cost. The guest chooses its buffers' addresses and
/// could make them collide, but the map holds at most a fill ring's worth of its own buffers,
/// so that slows its own port only, and boundedly.
#[derive(Debug, Default, Clone, Copy)]
struct FillHasher(u64);

impl std::hash::Hasher for FillHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in a word at a time.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_ne_bytes(word));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

type FillMap = HashMap<u64, Posted, std::hash::BuildHasherDefault<FillHasher>>;

/// Spare frames posted at a time, once the kernel holds fewer than [`SPARE_LOW_WATER`]
/// buffers and the guest has no more available: few enough that a guest catching up finds
/// its buffers behind at most this many spares more.
pub const SPARE_BATCH: usize = 32;
/// Below this many buffers on the fill ring (the guest's and spares), spares are posted.
pub const SPARE_LOW_WATER: usize = 128;

/// The bytes of the daemon's own area of the UMEM, where spare frames lie.
pub trait SpareMemory {
    /// The `len` bytes at UMEM address `addr`, if they lie in the daemon's area. Only called
    /// for a spare the kernel returned and that is not on the fill ring again, so the kernel
    /// does not write them meanwhile.
    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]>;
}

/// What a round needs to copy spare frames into the guest's chains.
#[derive(Clone, Copy)]
pub struct SpareCopy<'a> {
    pub memory: &'a dyn SpareMemory,
    /// The guest takes a frame across several chains (VIRTIO_NET_F_MRG_RXBUF).
    pub mrg_rxbuf: bool,
}

impl SpareCopy<'static> {
    /// For a path without spare frames (a guest without MRG_RXBUF).
    pub const WITHOUT_SPARES: Self = SpareCopy {
        memory: &NoSpares,
        mrg_rxbuf: false,
    };
}

/// The daemon's area of a path without spare frames: nothing in it.
struct NoSpares;

impl SpareMemory for NoSpares {
    fn bytes(&self, _addr: u64, _len: usize) -> Option<&[u8]> {
        None
    }
}

/// The daemon's spare receive frames: `count` slots of `slot` bytes from UMEM address
/// `start`, each posted at its first byte (a slot holds a whole chunk).
#[derive(Debug, Clone)]
pub struct SpareFrames {
    start: u64,
    slot: u64,
    /// Slots neither on the fill ring nor holding a frame.
    free: Vec<u32>,
    on_ring: Vec<bool>,
    posted: usize,
}

impl SpareFrames {
    pub fn new(start: u64, slot: u32, count: u32) -> Self {
        SpareFrames {
            start,
            slot: u64::from(slot),
            free: (0..count).rev().collect(),
            on_ring: vec![false; count as usize],
            posted: 0,
        }
    }

    /// No spares at all.
    pub fn none() -> Self {
        Self::new(0, 1, 0)
    }

    /// Spares in the pool (neither on the fill ring nor holding a frame).
    pub fn free(&self) -> usize {
        self.free.len()
    }

    fn count(&self) -> usize {
        self.on_ring.len()
    }

    fn address(&self, slot: u32) -> u64 {
        self.start + u64::from(slot) * self.slot
    }

    /// The slot posted at `fill`, taken off the ring, if it is one on the ring.
    fn take_back(&mut self, fill: u64) -> Option<u32> {
        let offset = fill.checked_sub(self.start)?;
        if offset % self.slot != 0 {
            return None;
        }
        let slot = u32::try_from(offset / self.slot).ok()?;
        let on_ring = self.on_ring.get_mut(slot as usize)?;
        if !std::mem::replace(on_ring, false) {
            return None;
        }
        self.posted -= 1;
        Some(slot)
    }

    fn post(&mut self) -> Option<u64> {
        let slot = self.free.pop()?;
        self.on_ring[slot as usize] = true;
        self.posted += 1;
        Some(self.address(slot))
    }

    /// Every slot back in the pool (the socket that held them is closed).
    fn reset(&mut self) {
        *self = Self::new(self.start, self.slot as u32, self.count() as u32);
    }
}

/// A frame the kernel wrote, waiting for the frames before it to reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrived {
    /// In a guest buffer, net header written: needs only its used entry.
    Guest { head: u16, len: u32 },
    /// In a spare slot: needs a guest chain to be copied into.
    Spare { slot: u32, len: u32 },
    /// No frame to trust in a guest buffer (a bad completion): goes back unused.
    Unused { head: u16 },
}

/// Where `drain` or `post_chains` stopped on an error: the avail index right after the chains
/// of the last frame or buffer handed over, which the queue resumes at.
struct Stopped {
    resume: u16,
    error: QueueError,
}

/// The guest buffers (and spare frames) the kernel holds, by fill address, and the frames
/// waiting for a guest chain.
#[derive(Debug)]
pub struct PostedBuffers {
    layout: FillLayout,
    file: GuestFile,
    by_fill: FillMap,
    /// Most guest buffers on the fill ring at once.
    capacity: usize,
    /// Available chains left on the ring for frames the daemon copies (see `holding_back`).
    hold_back: u16,
    spares: SpareFrames,
    /// Frames in arrival order behind a spare frame that found no guest chain; its first is
    /// always a spare one.
    pending: VecDeque<Arrived>,
    /// Spare frames among `pending`.
    pending_spares: usize,
    /// Scratch: used entries of one round, fill addresses to post.
    used: Vec<(u16, u32)>,
    segs: Vec<Segment>,
    rx: RxScratch,
}

impl PostedBuffers {
    pub fn new(file: GuestFile, layout: FillLayout, capacity: usize) -> Self {
        PostedBuffers {
            layout,
            file,
            by_fill: FillMap::with_capacity_and_hasher(capacity, Default::default()),
            capacity,
            hold_back: 0,
            spares: SpareFrames::none(),
            pending: VecDeque::new(),
            pending_spares: 0,
            used: Vec::new(),
            segs: Vec::new(),
            rx: RxScratch::default(),
        }
    }

    /// Receives into `spares` when the guest's buffers run out.
    pub fn with_spares(mut self, spares: SpareFrames) -> Self {
        self.pending = VecDeque::with_capacity(spares.count() + self.capacity);
        self.spares = spares;
        self
    }

    /// Leaves the last `chains` available receive chains on the ring rather than posting
    /// them: broadcast and multicast frames (ARP, neighbour discovery, DHCP) reach the guest
    /// through the daemon's packet tap, copied into an avail buffer, and would find none if
    /// the kernel held them all.
    pub fn holding_back(mut self, chains: u16) -> Self {
        self.hold_back = chains;
        self
    }

    /// Most buffers on the fill ring at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Guest buffers on the fill ring.
    pub fn len(&self) -> usize {
        self.by_fill.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_fill.is_empty()
    }

    /// Spare frames on the fill ring.
    pub fn spares_posted(&self) -> usize {
        self.spares.posted
    }

    /// Spare frames in the pool.
    pub fn spares_free(&self) -> usize {
        self.spares.free()
    }

    /// Frames waiting for guest chains.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Hands the guest the frames waiting for its chains, in order, while it has chains for
    /// the spare ones; appends their used entries to `used`. Returns the avail index to
    /// resume at if the chains ran out part-way through a frame (nothing of it counts). On
    /// an error the frame it stopped at still waits, and everything before it has its entry.
    fn drain(
        &mut self,
        cursor: &mut GuestMemoryCursor<'_>,
        chains: &mut Chains<'_, '_>,
        spares: SpareCopy<'_>,
        tally: &mut ZeroCopyRxTally,
    ) -> Result<Option<u16>, Stopped> {
        while let Some(&first) = self.pending.front() {
            match first {
                Arrived::Guest { head, len } => hand_over(&mut self.used, head, Some(len), tally),
                Arrived::Unused { head } => hand_over(&mut self.used, head, None, tally),
                Arrived::Spare { slot, len } => {
                    let before = chains.next_avail();
                    let data = self.spares.address(slot) + self.layout.data_offset;
                    // Spare slots lie in the daemon's area by construction; a frame that
                    // cannot be read there is dropped as one too large would be.
                    let copied = match spares.memory.bytes(data, len as usize) {
                        Some(frame) => copy_frame(
                            cursor,
                            chains,
                            frame,
                            spares.mrg_rxbuf,
                            &mut self.rx,
                            &mut self.used,
                        )
                        .map_err(|error| Stopped {
                            resume: before,
                            error,
                        })?,
                        None => Copied::TooLarge,
                    };
                    match copied {
                        Copied::Delivered { chains } => {
                            tally.frames += 1;
                            tally.bytes += u64::from(len);
                            tally.buffers += u64::from(chains);
                            tally.spare_frames += 1;
                        }
                        Copied::TooLarge => tally.dropped_too_large += 1,
                        Copied::NoBuffers => return Ok(Some(before)),
                    }
                    self.spares.free.push(slot);
                    self.pending_spares -= 1;
                }
            }
            self.pending.pop_front();
        }
        Ok(None)
    }

    /// Takes the guest's available receive chains: first for the frames waiting for them
    /// (copied in, in order), then, once none wait, onto the fill ring up to its free room
    /// (and `room`, what the caller's fill ring takes now), putting the fill address of each
    /// postable one in `fill`. Unpostable chains go back to the guest unused and counted. If
    /// the kernel is then left with fewer than [`SPARE_LOW_WATER`] buffers and the guest has
    /// no more, spare frames follow in batches of [`SPARE_BATCH`].
    pub fn post(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        room: usize,
        fill: &mut Vec<u64>,
        spares: SpareCopy<'_>,
        tally: &mut ZeroCopyRxTally,
    ) -> Result<(), QueueError> {
        fill.clear();
        self.publishing(mem, queue, |this, queue| {
            let waiting = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_or(0, |idx| idx.0.wrapping_sub(queue.next_avail()));
            let mut cursor = GuestMemoryCursor::new(mem);
            let (next_avail, guest_has_more) = {
                let Some(mut chains) = Chains::open(mem, queue)? else {
                    return Ok(());
                };
                let start = chains.next_avail();
                match this.drain(&mut cursor, &mut chains, spares, tally) {
                    Err(stopped) => (stopped.resume, Err(stopped.error)),
                    // The chains ran out before the frames waiting for them.
                    Ok(Some(resume)) => (resume, Ok(false)),
                    Ok(None) => {
                        let left = waiting.saturating_sub(chains.next_avail().wrapping_sub(start));
                        // A chain stays on the ring for every spare frame ahead of the guest's
                        // next buffer on the fill ring or waiting: the kernel fills that buffer
                        // after them, and its frame may reach the guest only after theirs, so
                        // with every chain on the fill ring they would wait for a chain the guest
                        // posts only once it got frames back, and the guest for them.
                        let reserved = this.spares.posted + this.pending_spares;
                        let kept = usize::from(this.hold_back).saturating_add(reserved);
                        let offered = usize::from(left).saturating_sub(kept);
                        let room = room.min(this.capacity - this.by_fill.len()).min(offered);
                        match this.post_chains(&mut chains, room, fill, tally) {
                            Err(stopped) => (stopped.resume, Err(stopped.error)),
                            Ok(()) => {
                                let taken = chains.next_avail().wrapping_sub(start);
                                (
                                    chains.next_avail(),
                                    Ok(usize::from(waiting.saturating_sub(taken)) > kept),
                                )
                            }
                        }
                    }
                }
            };
            queue.set_next_avail(next_avail);
            if !guest_has_more? {
                this.post_spares(room.saturating_sub(fill.len()), fill, tally);
            }
            Ok(())
        })
    }

    /// Posts up to `room` chains from `chains` (see [`PostedBuffers::post`]). A malformed
    /// chain stops it before that chain: the ones before it are posted or given back.
    fn post_chains(
        &mut self,
        chains: &mut Chains<'_, '_>,
        room: usize,
        fill: &mut Vec<u64>,
        tally: &mut ZeroCopyRxTally,
    ) -> Result<(), Stopped> {
        while fill.len() < room {
            let before = chains.next_avail();
            let taken = chains.take(true, &mut self.segs).map_err(|error| Stopped {
                resume: before,
                error,
            })?;
            let Some((head, _)) = taken else {
                break;
            };
            // Only the first buffer of a chain is used: it must take a whole frame.
            let placed = fill_address(&self.file, self.layout, self.segs[0]).and_then(|a| {
                if self.by_fill.contains_key(&a) {
                    Err(Unpostable::AlreadyPosted)
                } else {
                    Ok(a)
                }
            });
            match placed {
                Ok(addr) => {
                    let buffer = self.segs[0].0 .0;
                    self.by_fill.insert(addr, Posted { head, buffer });
                    fill.push(addr);
                    tally.posted += 1;
                }
                Err(why) => {
                    tally.returned(why);
                    self.used.push((head, 0));
                }
            }
        }
        Ok(())
    }

    /// Spares onto the fill ring, a batch at a time, while the kernel holds fewer than the
    /// low-water mark and the pool and `room` last.
    fn post_spares(&mut self, room: usize, fill: &mut Vec<u64>, tally: &mut ZeroCopyRxTally) {
        let held = self.by_fill.len() + self.spares.posted;
        if held >= SPARE_LOW_WATER {
            return;
        }
        let want = (SPARE_LOW_WATER - held).div_ceil(SPARE_BATCH) * SPARE_BATCH;
        for _ in 0..want.min(room) {
            let Some(addr) = self.spares.post() else {
                break;
            };
            fill.push(addr);
            tally.spares_posted += 1;
        }
    }

    /// Hands received frames to the guest in the order they came: `received` holds the
    /// kernel's receive descriptors as (fill address, data offset from it, length). Writes
    /// each guest buffer's net header and marks what the kernel wrote for a migration's dirty
    /// log; copies each spare frame into the guest's next available chain; a spare frame that
    /// finds none waits, with every frame after it, for the guest's next chains. Publishes the
    /// used entries once.
    pub fn complete(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        received: impl IntoIterator<Item = (u64, u64, u32)>,
        spares: SpareCopy<'_>,
        tally: &mut ZeroCopyRxTally,
    ) -> Result<(), QueueError> {
        self.publishing(mem, queue, |this, queue| {
            let mut cursor = GuestMemoryCursor::new(mem);
            let header = rx_header(1);
            for (fill, offset, len) in received {
                let as_laid_out = offset == this.layout.data_offset && len <= this.layout.max_frame;
                if let Some(p) = this.by_fill.remove(&fill) {
                    // The frame's length, or `None` for a buffer going back unused.
                    let frame = if as_laid_out {
                        // The buffer was checked when posted: header and frame lie in one region.
                        if let Err(source) = cursor.write(GuestAddress(p.buffer), &header) {
                            // Still the guest's buffer to give back when the path stops.
                            this.by_fill.insert(fill, p);
                            return Err(QueueError::OutOfMemory {
                                head: p.head,
                                source,
                            });
                        }
                        mark_written(mem, p.buffer + VNET_HDR_LEN as u64, len);
                        Some(len)
                    } else {
                        tally.bad_completions += 1;
                        tally.returned_bad_completion += 1;
                        None
                    };
                    let head = p.head;
                    if this.pending.is_empty() {
                        hand_over(&mut this.used, head, frame, tally);
                    } else {
                        this.pending.push_back(match frame {
                            Some(len) => Arrived::Guest { head, len },
                            None => Arrived::Unused { head },
                        });
                    }
                } else if let Some(slot) = this.spares.take_back(fill) {
                    if as_laid_out {
                        this.pending.push_back(Arrived::Spare { slot, len });
                        this.pending_spares += 1;
                    } else {
                        tally.bad_completions += 1;
                        this.spares.free.push(slot);
                    }
                } else {
                    tally.unknown_completions += 1;
                }
            }
            if this.pending.is_empty() {
                return Ok(());
            }
            let (resume, drained) = {
                let Some(mut chains) = Chains::open(mem, queue)? else {
                    return Ok(());
                };
                match this.drain(&mut cursor, &mut chains, spares, tally) {
                    Ok(resume) => (resume.unwrap_or(chains.next_avail()), Ok(())),
                    Err(stopped) => (stopped.resume, Err(stopped.error)),
                }
            };
            queue.set_next_avail(resume);
            drained
        })
    }

    /// Runs one round's `work` and publishes the used entries it gathered, also when it
    /// failed part-way: each names a head taken and held in no other list (the invariant
    /// above). The first error is returned.
    fn publishing(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        work: impl FnOnce(&mut Self, &mut Queue) -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        self.used.clear();
        let worked = work(self, queue);
        let published = publish_used(mem, queue, &self.used);
        worked.and(published)
    }

    /// Forgets every posted buffer (the socket that held them is closed: the kernel gave them
    /// up) and every frame waiting for a chain, and returns the heads of the guest buffers
    /// among them, to go back to the guest unused if its queue still runs. Spares go back to
    /// the pool.
    pub fn forget(&mut self) -> Vec<u16> {
        let mut heads: Vec<u16> = self.by_fill.drain().map(|(_, p)| p.head).collect();
        heads.extend(self.pending.drain(..).filter_map(|a| match a {
            Arrived::Guest { head, .. } | Arrived::Unused { head } => Some(head),
            Arrived::Spare { .. } => None,
        }));
        self.pending_spares = 0;
        self.spares.reset();
        heads
    }

    /// Gives every posted buffer back to the guest unused (length 0), once the socket that
    /// held them is closed: the ring's next avail index has already moved past them, so a
    /// frontend reading the ring's base (`GET_VRING_BASE`) would otherwise never see them
    /// again. A completion for one of them later is an unknown one, never a write. Returns how
    /// many went back.
    pub fn give_back(&mut self, mem: &GuestMemory, queue: &mut Queue) -> Result<usize, QueueError> {
        let used: Vec<(u16, u32)> = self.forget().into_iter().map(|h| (h, 0)).collect();
        publish_used(mem, queue, &used)?;
        Ok(used.len())
    }
}

/// Appends the used entry of guest buffer `head`, holding a frame of `len` bytes behind its
/// net header or, with `None`, going back unused; counts the frame.
fn hand_over(used: &mut Vec<(u16, u32)>, head: u16, len: Option<u32>, tally: &mut ZeroCopyRxTally) {
    match len {
        Some(len) => {
            used.push((head, VNET_HDR_LEN as u32 + len));
            tally.frames += 1;
            tally.bytes += u64::from(len);
            tally.buffers += 1;
        }
        None => used.push((head, 0)),
    }
}

/// Marks `[addr, addr + len)` dirty for a migration: the kernel wrote it, not the daemon.
fn mark_written(mem: &GuestMemory, addr: u64, len: u32) {
    if let Some(r) = mem.find_region(GuestAddress(addr)) {
        let offset = addr - r.start_addr().0;
        region_log(r).mark_dirty(offset as usize, len as usize);
    }
}

#[cfg(test)]
mod tests;
