//! Transmit from the guest's own buffers: for a port whose guest memory is its UMEM, a frame
//! the guest sends goes to the kernel as the pieces of one multi-buffer frame: its headers
//! from a slot of the daemon's own area (after the guest's RAM in the same UMEM), where the
//! daemon checked them (source MAC, VLAN) and may rewrite them, and the rest straight from
//! where it lies in guest memory.
//!
//! The guest can rewrite its buffers until the kernel has copied them (copy mode: during the
//! send call; zero-copy: until the NIC's DMA), so nothing the policy decides on may be read
//! from guest memory by the kernel: the headers go from the slot. The payload is the guest's
//! to spoil.
//!
//! The slot also names the frame when it comes back: every piece's address returns on the
//! completion ring, and the slot's (daemon-chosen, even) address identifies the frame. Guest
//! addresses are not used for that: Linux 6.18 returns a one-piece frame's odd address with
//! bit 0 cleared, and a guest may send overlapping buffers.

use std::time::{Duration, Instant};

use virtio_queue::Queue;

use super::split_ring::publish_used;
use super::zero_copy_rx::GuestFile;
use super::{GuestMemory, QueueError, Segment};

/// Most pieces of one frame the kernel's copy mode takes: one for the skb's linear part and
/// `MAX_SKB_FRAGS` (17) fragments; a frame of more is refused whole, every descriptor counted
/// invalid (measured on Linux 6.18 by the guest-memory UMEM kernel test). A zero-copy socket
/// takes at most its driver's `xdp-zc-max-segs`, often fewer: see [`PieceLayout::max_pieces`].
pub const MAX_PIECES: usize = 18;

/// Bytes of a frame sent from its slot at least: the Ethernet header the policy checked and
/// the IP and transport headers after it. Copy mode builds the skb's linear part from the
/// slot and gives every further piece a page of its own, so headers in the slot are headers
/// the stack finds linear rather than pulls out of a fragment; and a frame no longer than
/// this is copied whole (a second piece would cost the kernel more than the copy saves).
pub const SLOT_HEADERS: usize = 128;

/// Why a frame cannot go out from guest memory as it lies (the caller copies it instead, or
/// drops it if it is malformed anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotInPlace {
    #[error("frame is shorter than the headers the daemon sends itself")]
    ShorterThanHeaders,
    #[error("a buffer of the frame is not inside one region of the guest memory file")]
    OutsideFile,
    #[error("frame needs more pieces than the socket takes in one frame")]
    TooManyPieces,
    #[error("the checksum the daemon completes lies beyond the slot")]
    ChecksumBeyondSlot,
}

/// Where a sink that sends from guest memory takes a frame's pieces from: the guest's memory
/// file (guest address -> UMEM address), the UMEM's chunk size (the longest piece the kernel
/// takes) and, on a zero-copy NIC, the DMA page no piece may cross.
#[derive(Debug, Clone, Copy)]
pub struct PieceLayout<'a> {
    pub file: &'a GuestFile,
    pub chunk_size: u32,
    pub dma_page: Option<u64>,
    /// Most pieces of one frame, the slot's included: [`MAX_PIECES`] in copy mode, the
    /// driver's `xdp-zc-max-segs` on a zero-copy socket. There the kernel consumes the first
    /// that many descriptors of a longer frame without sending them or returning them on the
    /// completion ring (the slot would stay in flight for good) and reads the rest as a frame
    /// of its own, which would put guest bytes where the checked headers were.
    pub max_pieces: usize,
}

/// How many of a `len`-byte frame's first bytes go from the daemon's slot of `slot_len`
/// bytes: [`SLOT_HEADERS`], or up to the end of the checksum field the daemon completes
/// (`csum_end`), whichever is more. The rest is sent from guest memory; a frame with no rest
/// is copied.
pub fn slot_headers(
    len: usize,
    csum_end: Option<usize>,
    slot_len: usize,
) -> Result<usize, NotInPlace> {
    let headers = SLOT_HEADERS.max(csum_end.unwrap_or(0));
    if headers > slot_len {
        return Err(NotInPlace::ChecksumBeyondSlot);
    }
    if len <= headers {
        return Err(NotInPlace::ShorterThanHeaders);
    }
    Ok(headers)
}

/// The guest-memory pieces (UMEM address, length) of a frame made of `segs`, after its first
/// `headers` bytes (which the daemon sends from its slot), each at most `chunk_size` long and
/// within one DMA page where there is one, into `out`. With the slot's piece the frame may
/// have the layout's `max_pieces` pieces in all.
pub fn guest_pieces(
    layout: PieceLayout<'_>,
    segs: &[Segment],
    headers: usize,
    out: &mut Vec<(u64, u32)>,
) -> Result<(), NotInPlace> {
    out.clear();
    let mut skip = headers as u64;
    for &(addr, len) in segs {
        let (mut addr, mut len) = (addr.0, u64::from(len));
        let dropped = skip.min(len);
        skip -= dropped;
        addr = addr.checked_add(dropped).ok_or(NotInPlace::OutsideFile)?;
        len -= dropped;
        if len == 0 {
            continue;
        }
        let mut offset = layout
            .file
            .file_offset(addr, len)
            .ok_or(NotInPlace::OutsideFile)?;
        while len > 0 {
            let mut piece = len.min(u64::from(layout.chunk_size));
            if let Some(page) = layout.dma_page.filter(|&p| p > 0) {
                piece = piece.min(page - offset % page);
            }
            if out.len() + 1 >= layout.max_pieces {
                return Err(NotInPlace::TooManyPieces);
            }
            out.push((offset, piece as u32));
            offset += piece;
            len -= piece;
        }
    }
    if skip > 0 {
        return Err(NotInPlace::ShorterThanHeaders);
    }
    Ok(())
}

/// What a slot holds while its frame is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotUse {
    Free,
    /// A whole frame copied into it: nothing waits for it.
    Copied,
    /// The headers of guest chain `head`'s frame, whose rest the kernel reads from guest
    /// memory: the chain goes back to the guest when the slot completes.
    Chain(u16),
}

/// What one address on the completion ring meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// A copied frame's slot: free again.
    Copied,
    /// The slot of chain `head`'s frame: the kernel is done with the frame, the chain is the
    /// guest's again.
    Chain(u16),
    /// A piece in guest memory: the slot of its frame says when the frame is done.
    GuestPiece,
    /// Names no frame in flight (a slot completed twice, or an address the daemon never
    /// sent): ignored.
    Unknown,
}

/// The daemon's area cut into slots of `slot_size` bytes, each holding one in-flight frame
/// (whole, or the headers of a frame sent from guest memory), and which guest chain each
/// frame belongs to. Everything below `base` is guest memory.
#[derive(Debug)]
pub struct HeaderSlots {
    /// UMEM address of the first slot.
    base: u64,
    slot_size: u64,
    free: Vec<u32>,
    slots: Vec<SlotUse>,
    /// Slots holding a chain's frame (asked every worker round, so kept rather than counted).
    chains: usize,
}

impl HeaderSlots {
    /// Slots over `[base, base + len)`, `slot_size` bytes each (a multiple of 2, so a slot's
    /// address never has bit 0 set).
    pub fn new(base: u64, len: u64, slot_size: u32) -> Self {
        let slot_size = u64::from(slot_size.max(2) & !1);
        let count = (len / slot_size) as u32;
        HeaderSlots {
            base,
            slot_size,
            free: (0..count).rev().collect(),
            slots: vec![SlotUse::Free; count as usize],
            chains: 0,
        }
    }

    pub fn slot_size(&self) -> u32 {
        self.slot_size as u32
    }

    /// The UMEM address of the slot the next `take` returns, if one is free.
    pub fn next_free(&self) -> Option<u64> {
        self.free.last().map(|&s| self.address(s))
    }

    fn address(&self, slot: u32) -> u64 {
        self.base + u64::from(slot) * self.slot_size
    }

    /// A free slot for chain `head`'s frame: its UMEM address.
    pub fn take(&mut self, head: u16) -> Option<u64> {
        self.take_for(SlotUse::Chain(head))
    }

    /// A free slot for a frame copied whole: its UMEM address.
    pub fn take_copied(&mut self) -> Option<u64> {
        self.take_for(SlotUse::Copied)
    }

    fn take_for(&mut self, what: SlotUse) -> Option<u64> {
        let slot = self.free.pop()?;
        if let SlotUse::Chain(_) = what {
            self.chains += 1;
        }
        self.slots[slot as usize] = what;
        Some(self.address(slot))
    }

    /// The completion ring returned `addr`: what it ends. A slot completes once; a second
    /// completion of it, or of anything that is no slot in flight, is [`Completion::Unknown`].
    pub fn complete(&mut self, addr: u64) -> Completion {
        let Some(rel) = addr.checked_sub(self.base) else {
            return Completion::GuestPiece;
        };
        if rel % self.slot_size != 0 {
            return Completion::Unknown;
        }
        let Some(slot) = usize::try_from(rel / self.slot_size)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            return Completion::Unknown;
        };
        let done = match std::mem::replace(slot, SlotUse::Free) {
            SlotUse::Free => return Completion::Unknown,
            SlotUse::Copied => Completion::Copied,
            SlotUse::Chain(head) => {
                self.chains -= 1;
                Completion::Chain(head)
            }
        };
        self.free.push((rel / self.slot_size) as u32);
        done
    }

    /// Slots nobody holds.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Frames in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Chains whose frames are in flight.
    pub fn chains_in_flight(&self) -> usize {
        self.chains
    }

    /// Frees every slot and returns the chains whose frames were in flight, for a caller
    /// that has closed the socket (the kernel reads none of them any more).
    pub fn release_all(&mut self) -> Vec<u16> {
        let chains = self
            .slots
            .iter()
            .filter_map(|s| match s {
                SlotUse::Chain(head) => Some(*head),
                _ => None,
            })
            .collect();
        *self = HeaderSlots::new(
            self.base,
            self.slots.len() as u64 * self.slot_size,
            self.slot_size as u32,
        );
        chains
    }
}

/// How long frames may stay in flight with nothing back on the completion ring before the
/// transmit side takes them for lost. A zero-copy NIC completes within its DMA and copy mode
/// within the send call; seconds of silence with slots held means the kernel dropped frames
/// without completing them (a piece limit the daemon did not know of).
pub const COMPLETION_STALL: Duration = Duration::from_secs(5);

/// Watches for frames whose slots never come back: the safety net under the piece limits,
/// since a slot the kernel keeps is held until the socket closes, and with every slot held
/// the port transmits nothing.
#[derive(Debug, Default)]
pub struct CompletionWatch {
    /// Since when frames have been in flight with nothing completed.
    silent_since: Option<Instant>,
    lost: bool,
}

impl CompletionWatch {
    /// The completion ring returned something.
    pub fn completed(&mut self) {
        self.silent_since = None;
    }

    /// A reap at `now` found nothing, with `in_flight` frames held: true the first time (and
    /// only then) frames have been in flight for [`COMPLETION_STALL`] with none coming back.
    pub fn idle(&mut self, now: Instant, in_flight: usize) -> bool {
        if in_flight == 0 {
            self.silent_since = None;
            return false;
        }
        let since = *self.silent_since.get_or_insert(now);
        if self.lost || now.duration_since(since) < COMPLETION_STALL {
            return false;
        }
        self.lost = true;
        true
    }
}

/// Gives chains whose frames the kernel is done with (or will never read again) back to the
/// guest's transmit queue: a used entry each, 0 bytes written, with one index update. The
/// caller notifies.
pub fn return_chains(
    mem: &GuestMemory,
    queue: &mut Queue,
    heads: &[u16],
) -> Result<(), QueueError> {
    let used: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 0)).collect();
    publish_used(mem, queue, &used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::testing::{memory, Buf, TestQueue, BUF_BASE};
    use crate::datapath::zero_copy_rx::FileRegion;
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;

    /// Guest RAM: [0, 1 MiB) at file offset 2 MiB and [1 MiB, 2 MiB) at file offset 0.
    fn file() -> GuestFile {
        GuestFile::from_regions(
            vec![
                FileRegion {
                    guest_addr: 0,
                    len: 0x10_0000,
                    file_offset: 0x20_0000,
                },
                FileRegion {
                    guest_addr: 0x10_0000,
                    len: 0x10_0000,
                    file_offset: 0,
                },
            ],
            0x30_0000,
        )
    }

    fn layout(file: &GuestFile, dma_page: Option<u64>) -> PieceLayout<'_> {
        PieceLayout {
            file,
            chunk_size: 2048,
            dma_page,
            max_pieces: MAX_PIECES,
        }
    }

    fn seg(addr: u64, len: u32) -> Segment {
        (GuestAddress(addr), len)
    }

    #[test]
    fn the_pieces_after_the_headers_are_where_the_guest_put_them_in_the_file() {
        let (f, mut out) = (file(), Vec::new());
        // A 14-byte header alone in the first buffer, then the payload in two buffers.
        let segs = [seg(0x1000, 14), seg(0x10_2001, 1000), seg(0x3000, 500)];
        guest_pieces(layout(&f, None), &segs, 14, &mut out).unwrap();
        assert_eq!(out, vec![(0x2001, 1000), (0x20_3000, 500)]);
        // Headers and payload in one buffer: the payload starts after the headers.
        guest_pieces(layout(&f, None), &[seg(0x1000, 1514)], 14, &mut out).unwrap();
        assert_eq!(out, vec![(0x20_1000 + 14, 1500)]);
        // A frame that is all headers has no guest pieces.
        guest_pieces(layout(&f, None), &[seg(0x1000, 14)], 14, &mut out).unwrap();
        assert!(out.is_empty());
        // The virtio-net header and the slot's bytes skipped across buffers: a chain of a
        // 12-byte net header, then 100 bytes, then the rest.
        let segs = [seg(0x1000, 12), seg(0x5000, 100), seg(0x10_8000, 1400)];
        guest_pieces(layout(&f, None), &segs, 12 + SLOT_HEADERS, &mut out).unwrap();
        assert_eq!(out, vec![(0x8000 + 28, 1372)]);
    }

    #[test]
    fn a_buffer_longer_than_a_chunk_goes_as_several_pieces() {
        let (f, mut out) = (file(), Vec::new());
        guest_pieces(layout(&f, None), &[seg(0x1000, 14 + 5000)], 14, &mut out).unwrap();
        let base = 0x20_1000 + 14;
        assert_eq!(
            out,
            vec![(base, 2048), (base + 2048, 2048), (base + 4096, 904)]
        );
    }

    #[test]
    fn on_a_zero_copy_nic_no_piece_crosses_a_dma_page() {
        let (f, mut out) = (file(), Vec::new());
        // 1500 bytes from 0x20_1f00 on cross into the next page at 0x20_2000.
        guest_pieces(
            layout(&f, Some(4096)),
            &[seg(0x1f00 - 14, 1514)],
            14,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, vec![(0x20_1f00, 0x100), (0x20_2000, 1500 - 0x100)]);
        // Copy mode has one contiguous mapping: one piece.
        guest_pieces(layout(&f, None), &[seg(0x1f00 - 14, 1514)], 14, &mut out).unwrap();
        assert_eq!(out, vec![(0x20_1f00, 1500)]);
    }

    #[test]
    fn guest_buffers_outside_the_file_or_too_fragmented_or_short_are_refused() {
        let (f, mut out) = (file(), Vec::new());
        for (segs, want) in [
            (vec![seg(0x20_0000, 100)], NotInPlace::OutsideFile),
            // Across the boundary between the two regions (not adjacent in the file).
            (vec![seg(0xf_ff00, 0x200)], NotInPlace::OutsideFile),
            (vec![seg(u64::MAX - 4, 100)], NotInPlace::OutsideFile),
            (vec![seg(0x1000, 10)], NotInPlace::ShorterThanHeaders),
            (
                (0..MAX_PIECES as u64)
                    .map(|i| seg(0x1000 + 0x100 * i, 64))
                    .collect(),
                NotInPlace::TooManyPieces,
            ),
        ] {
            assert_eq!(
                guest_pieces(layout(&f, None), &segs, 14, &mut out),
                Err(want),
                "{segs:x?}"
            );
        }
        // One piece fewer fits, with the slot's piece.
        let segs: Vec<_> = (0..MAX_PIECES as u64 - 1)
            .map(|i| seg(0x1000 + 0x100 * i, 64))
            .collect();
        guest_pieces(layout(&f, None), &segs, 0, &mut out).unwrap();
        assert_eq!(out.len(), MAX_PIECES - 1);
    }

    #[test]
    fn a_zero_copy_drivers_lower_piece_limit_counts_the_slot_and_refuses_a_frame_over_it() {
        // A driver that takes 5 pieces per frame: the slot and 4 in guest memory.
        let f = file();
        let five = PieceLayout {
            max_pieces: 5,
            ..layout(&f, Some(4096))
        };
        let mut out = Vec::new();
        let segs =
            |n: u64| -> Vec<Segment> { (0..n).map(|i| seg(0x1000 + 0x100 * i, 64)).collect() };
        guest_pieces(five, &segs(4), 0, &mut out).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(
            guest_pieces(five, &segs(5), 0, &mut out),
            Err(NotInPlace::TooManyPieces)
        );
        // One buffer crossing DMA pages makes pieces of its own: 4 buffers, one crossing.
        let crossing = [
            seg(0x1000, 64),
            seg(0x2000, 64),
            seg(0x3000, 64),
            seg(0x4fc0, 128),
        ];
        assert_eq!(
            guest_pieces(five, &crossing, 0, &mut out),
            Err(NotInPlace::TooManyPieces)
        );
        // Copy mode's limit takes the same frames.
        guest_pieces(layout(&f, Some(4096)), &crossing, 0, &mut out).unwrap();
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn the_slot_takes_the_headers_and_a_checksum_field_or_the_frame_is_copied() {
        assert_eq!(slot_headers(1514, None, 2048), Ok(SLOT_HEADERS));
        // A TCP checksum of a frame with long options still goes into the slot.
        assert_eq!(slot_headers(1514, Some(200), 2048), Ok(200));
        assert_eq!(
            slot_headers(1514, Some(2049), 2048),
            Err(NotInPlace::ChecksumBeyondSlot)
        );
        // Nothing would be left for guest memory: copied.
        assert_eq!(
            slot_headers(SLOT_HEADERS, None, 2048),
            Err(NotInPlace::ShorterThanHeaders)
        );
        assert_eq!(
            slot_headers(60, None, 2048),
            Err(NotInPlace::ShorterThanHeaders)
        );
    }

    #[test]
    fn a_completed_slot_names_its_chain_once_and_guest_addresses_name_none() {
        let mut slots = HeaderSlots::new(0x30_0000, 4 * 64, 64);
        assert_eq!(slots.next_free(), Some(0x30_0000));
        let a = slots.take(7).unwrap();
        let b = slots.take(9).unwrap();
        let c = slots.take_copied().unwrap();
        assert_eq!((a, b, c), (0x30_0000, 0x30_0040, 0x30_0080));
        assert_eq!((slots.in_flight(), slots.chains_in_flight()), (3, 2));
        // Pieces in guest memory come back too: they name no frame.
        assert_eq!(slots.complete(0x2001), Completion::GuestPiece);
        assert_eq!(slots.complete(b + 1), Completion::Unknown);
        assert_eq!(slots.complete(b), Completion::Chain(9));
        assert_eq!(
            slots.complete(b),
            Completion::Unknown,
            "a slot completes once"
        );
        assert_eq!(
            slots.complete(0x30_0000 + 4 * 64),
            Completion::Unknown,
            "past the slots"
        );
        assert_eq!(
            slots.complete(0x30_0000 + 3 * 64),
            Completion::Unknown,
            "never taken"
        );
        assert_eq!(slots.complete(!1), Completion::Unknown);
        assert_eq!(slots.complete(c), Completion::Copied);
        assert_eq!(slots.chains_in_flight(), 1);
        assert_eq!(slots.complete(a), Completion::Chain(7));
        assert_eq!((slots.in_flight(), slots.chains_in_flight()), (0, 0));
    }

    #[test]
    fn frames_in_flight_with_the_completion_ring_idle_for_the_stall_time_are_lost_once() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let stall = COMPLETION_STALL.as_millis() as u64;
        let mut w = CompletionWatch::default();
        // Nothing in flight: never lost, however long.
        assert!(!w.idle(at(0), 0));
        assert!(!w.idle(at(10 * stall), 0));
        // Frames in flight, nothing back: lost after the stall time, and said once.
        assert!(!w.idle(at(10 * stall), 3));
        assert!(!w.idle(at(11 * stall - 1), 3));
        assert!(w.idle(at(11 * stall), 3));
        assert!(!w.idle(at(20 * stall), 3));

        // Completions keep it from being lost while frames stay in flight.
        let mut w = CompletionWatch::default();
        assert!(!w.idle(at(0), 5));
        w.completed();
        assert!(
            !w.idle(at(stall), 5),
            "the clock starts again after a completion"
        );
        assert!(!w.idle(at(2 * stall - 1), 5));
        assert!(w.idle(at(2 * stall), 5));
    }

    #[test]
    fn no_more_frames_are_in_flight_than_there_are_slots() {
        let mut slots = HeaderSlots::new(0x30_0000, 2 * 64 + 10, 64);
        assert!(slots.take(1).is_some() && slots.take_copied().is_some());
        assert_eq!((slots.take(3), slots.next_free()), (None, None));
        assert_eq!(slots.complete(0x30_0000), Completion::Chain(1));
        assert_eq!(slots.take(3), Some(0x30_0000));
    }

    #[test]
    fn releasing_all_slots_names_every_chain_in_flight_and_later_completions_none() {
        let mut slots = HeaderSlots::new(0x30_0000, 4 * 64, 64);
        let a = slots.take(3).unwrap();
        slots.take_copied().unwrap();
        slots.take(5).unwrap();
        let mut chains = slots.release_all();
        chains.sort();
        assert_eq!(chains, vec![3, 5]);
        assert_eq!((slots.in_flight(), slots.chains_in_flight()), (0, 0));
        // A completion that raced the close names nothing.
        assert_eq!(slots.complete(a), Completion::Unknown);
        assert_eq!(slots.release_all(), Vec::<u16>::new());
    }

    #[test]
    fn returned_chains_get_used_entries_of_zero_bytes_together() {
        let mem = memory();
        let mut tq = TestQueue::new(&mem);
        let heads: Vec<u16> = (0..3)
            .map(|i| tq.post(&[Buf(BUF_BASE + 0x1000 * i, 200, false)]))
            .collect();
        let mut q = tq.queue();
        q.set_next_avail(3);
        return_chains(&mem, &mut q, &[heads[2], heads[0]]).unwrap();
        assert_eq!(
            tq.used(0),
            vec![(u32::from(heads[2]), 0), (u32::from(heads[0]), 0)]
        );
        assert_eq!(q.next_used(), 2);
    }
}
