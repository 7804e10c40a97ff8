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

use super::zero_copy_rx::GuestFile;
use super::Segment;

/// Most pieces of one frame the kernel's copy mode takes: one for the skb's linear part and
/// `MAX_SKB_FRAGS` (17) fragments; a frame of more is refused whole, every descriptor counted
/// invalid (measured on Linux 6.18 by the guest-memory UMEM kernel test).
pub const MAX_PIECES: usize = 18;

/// Why a frame cannot go out from guest memory as it lies (the caller copies it instead, or
/// drops it if it is malformed anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotInPlace {
    #[error("frame is shorter than the headers the daemon sends itself")]
    ShorterThanHeaders,
    #[error("a buffer of the frame is not inside one region of the guest memory file")]
    OutsideFile,
    #[error("frame needs more than {MAX_PIECES} pieces")]
    TooManyPieces,
}

/// The guest-memory pieces (UMEM address, length) of a frame made of `segs`, after its first
/// `headers` bytes (which the daemon sends from its slot), each at most `chunk_size` long,
/// into `out`. With the slot's piece the frame may have [`MAX_PIECES`] pieces in all.
pub fn guest_pieces(
    file: &GuestFile,
    chunk_size: u32,
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
        let mut offset = file.file_offset(addr, len).ok_or(NotInPlace::OutsideFile)?;
        while len > 0 {
            let piece = len.min(u64::from(chunk_size));
            if out.len() + 1 >= MAX_PIECES {
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

/// The daemon's area cut into slots of `slot_size` bytes, each holding one in-flight frame's
/// headers, and which guest chain each belongs to.
#[derive(Debug)]
pub struct HeaderSlots {
    /// UMEM address of the first slot.
    base: u64,
    slot_size: u64,
    free: Vec<u32>,
    /// The chain head whose frame is in each slot, while it is in flight.
    in_flight: Vec<Option<u16>>,
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
            in_flight: vec![None; count as usize],
        }
    }

    /// A free slot for chain `head`'s frame: its UMEM address.
    pub fn take(&mut self, head: u16) -> Option<u64> {
        let slot = self.free.pop()?;
        self.in_flight[slot as usize] = Some(head);
        Some(self.base + u64::from(slot) * self.slot_size)
    }

    /// The completion ring returned `addr`: the chain head whose frame it ends, if `addr` is a
    /// slot in flight (the slot is free again). Guest addresses, and anything else, are `None`.
    pub fn complete(&mut self, addr: u64) -> Option<u16> {
        let rel = addr.checked_sub(self.base)?;
        if rel % self.slot_size != 0 {
            return None;
        }
        let slot = usize::try_from(rel / self.slot_size).ok()?;
        let head = self.in_flight.get_mut(slot)?.take()?;
        self.free.push(slot as u32);
        Some(head)
    }

    /// Frames in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::zero_copy_rx::FileRegion;
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

    fn seg(addr: u64, len: u32) -> Segment {
        (GuestAddress(addr), len)
    }

    #[test]
    fn the_pieces_after_the_headers_are_where_the_guest_put_them_in_the_file() {
        let mut out = Vec::new();
        // A 14-byte header alone in the first buffer, then the payload in two buffers.
        let segs = [seg(0x1000, 14), seg(0x10_2001, 1000), seg(0x3000, 500)];
        guest_pieces(&file(), 2048, &segs, 14, &mut out).unwrap();
        assert_eq!(out, vec![(0x2001, 1000), (0x20_3000, 500)]);
        // Headers and payload in one buffer: the payload starts after the headers.
        guest_pieces(&file(), 2048, &[seg(0x1000, 1514)], 14, &mut out).unwrap();
        assert_eq!(out, vec![(0x20_1000 + 14, 1500)]);
        // A frame that is all headers has no guest pieces.
        guest_pieces(&file(), 2048, &[seg(0x1000, 14)], 14, &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn a_buffer_longer_than_a_chunk_goes_as_several_pieces() {
        let mut out = Vec::new();
        guest_pieces(&file(), 2048, &[seg(0x1000, 14 + 5000)], 14, &mut out).unwrap();
        let base = 0x20_1000 + 14;
        assert_eq!(
            out,
            vec![(base, 2048), (base + 2048, 2048), (base + 4096, 904)]
        );
    }

    #[test]
    fn guest_buffers_outside_the_file_or_too_fragmented_or_short_are_refused() {
        let mut out = Vec::new();
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
                guest_pieces(&file(), 2048, &segs, 14, &mut out),
                Err(want),
                "{segs:x?}"
            );
        }
        // One piece fewer fits, with the slot's piece.
        let segs: Vec<_> = (0..MAX_PIECES as u64 - 1)
            .map(|i| seg(0x1000 + 0x100 * i, 64))
            .collect();
        guest_pieces(&file(), 2048, &segs, 0, &mut out).unwrap();
        assert_eq!(out.len(), MAX_PIECES - 1);
    }

    #[test]
    fn a_completed_slot_names_its_chain_once_and_guest_addresses_name_none() {
        let mut slots = HeaderSlots::new(0x30_0000, 4 * 64, 64);
        let a = slots.take(7).unwrap();
        let b = slots.take(9).unwrap();
        assert_eq!((a, b), (0x30_0000, 0x30_0040));
        assert_eq!(slots.in_flight(), 2);
        // Pieces in guest memory come back too: they name no frame.
        assert_eq!(slots.complete(0x2001), None);
        assert_eq!(slots.complete(b + 1), None);
        assert_eq!(slots.complete(b), Some(9));
        assert_eq!(slots.complete(b), None, "a slot completes once");
        assert_eq!(slots.complete(0x30_0000 + 4 * 64), None, "past the slots");
        assert_eq!(slots.complete(a), Some(7));
        assert_eq!(slots.in_flight(), 0);
    }

    #[test]
    fn no_more_frames_are_in_flight_than_there_are_slots() {
        let mut slots = HeaderSlots::new(0x30_0000, 2 * 64 + 10, 64);
        assert!(slots.take(1).is_some() && slots.take(2).is_some());
        assert_eq!(slots.take(3), None);
        assert_eq!(slots.complete(0x30_0000), Some(1));
        assert_eq!(slots.take(3), Some(0x30_0000));
    }
}
