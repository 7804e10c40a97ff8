//! Taking descriptor chains from a split virtqueue's avail ring, a batch at a time.
//!
//! virtio-queue's iterators translate a guest address through the memory map for every avail
//! entry and every descriptor; with 64-byte frames that was about a third of the switch path.
//! [`Chains`] translates the descriptor table and the avail ring once per batch into slices of
//! the guest's mapping, so each access is a bounds-checked read inside them. Used entries
//! still go through virtio-queue (`add_used`), which keeps its notification bookkeeping.
//! Rings that do not lie within one memory region (no VMM here does that) fall back to
//! virtio-queue's iterator, with the same checks and results.

use std::sync::atomic::Ordering;

use super::dirty_log::region_log;
use super::{DirtyLog, GuestMemory};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{AvailIter, DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::{Bitmap, RefSlice};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    VolatileSlice,
};

use super::{collect_segments, Malformed, OutOfGuestMemory, QueueError, Segment};

type Slice<'m> = VolatileSlice<'m, RefSlice<'m, DirtyLog>>;

/// `[addr, addr + len)` of guest memory as one slice, if it lies in one region.
fn slice(mem: &GuestMemory, addr: u64, len: usize) -> Option<Slice<'_>> {
    region_slice(mem, addr, len).map(|(s, _, _)| s)
}

/// [`slice`], with the region's dirty log and the slice's offset in the region.
fn region_slice(mem: &GuestMemory, addr: u64, len: usize) -> Option<(Slice<'_>, &DirtyLog, u64)> {
    let r = mem.find_region(GuestAddress(addr))?;
    let offset = addr.checked_sub(r.start_addr().raw_value())?;
    let s = r.get_slice(MemoryRegionAddress(offset), len).ok()?;
    Some((s, region_log(r), offset))
}

/// The chains of one batch.
pub(crate) enum Chains<'q, 'm> {
    Direct(SplitRing<'m>),
    Iter {
        it: AvailIter<'q, &'m GuestMemory>,
        /// The queue's size: the most descriptors one chain may hold.
        size: u16,
        start: u16,
        taken: u16,
        /// The last chain taken, kept so it can be given back.
        last: Option<DescriptorChain<&'m GuestMemory>>,
        /// `last` was given back and is the next to take.
        back: bool,
    },
}

impl<'q, 'm> Chains<'q, 'm> {
    /// The batch's chains, or `None` when the queue is not ready (nothing to take now). A
    /// corrupt avail index is an error.
    pub fn open(mem: &'m GuestMemory, queue: &'q mut Queue) -> Result<Option<Self>, QueueError> {
        if !queue.ready() {
            return Ok(None);
        }
        if let Some(ring) = SplitRing::open(mem, queue)? {
            return Ok(Some(Chains::Direct(ring)));
        }
        let start = queue.next_avail();
        let size = queue.size();
        match queue.iter(mem) {
            Ok(it) => Ok(Some(Chains::Iter {
                it,
                size,
                start,
                taken: 0,
                last: None,
                back: false,
            })),
            Err(virtio_queue::Error::InvalidAvailRingIndex) => Err(QueueError::AvailIndex),
            Err(_) => Ok(None),
        }
    }

    /// Takes the next chain: returns its head and total length, with its buffers in `segs`
    /// (all device-writable when `writable`, all device-readable otherwise; zero-length ones
    /// skipped). `None` when this batch's chains are used up.
    pub fn take(
        &mut self,
        writable: bool,
        segs: &mut Vec<Segment>,
    ) -> Result<Option<(u16, u64)>, QueueError> {
        match self {
            Chains::Direct(ring) => ring.take(writable, segs),
            Chains::Iter {
                it,
                size,
                taken,
                last,
                back,
                ..
            } => {
                let chain = if *back {
                    *back = false;
                    last.clone()
                } else {
                    let c = it.next();
                    *last = c.clone();
                    c
                };
                let Some(chain) = chain else { return Ok(None) };
                *taken = taken.wrapping_add(1);
                let head = chain.head_index();
                Ok(Some((
                    head,
                    collect_segments(chain, writable, *size, segs)?,
                )))
            }
        }
    }

    /// Gives back the chain `take` returned last; it is the next one taken.
    pub fn untake(&mut self) {
        match self {
            Chains::Direct(ring) => ring.next = ring.next.wrapping_sub(1),
            Chains::Iter { taken, back, .. } => {
                *taken = taken.wrapping_sub(1);
                *back = true;
            }
        }
    }

    /// The first buffer of the chain `ahead` places after the next one, if this batch has it
    /// and it is a plain descriptor: something to prefetch while the current frame is copied.
    pub fn peek_buffer(&self, ahead: u16) -> Option<GuestAddress> {
        match self {
            Chains::Direct(ring) => ring.peek_buffer(ahead),
            Chains::Iter { .. } => None,
        }
    }

    /// The avail index after the chains taken (and not given back).
    pub fn next_avail(&self) -> u16 {
        match self {
            Chains::Direct(ring) => ring.next,
            Chains::Iter { start, taken, .. } => start.wrapping_add(*taken),
        }
    }
}

/// Returns chains to the used ring, as (head, bytes written) pairs, through one slice and
/// publishes the used index once, instead of once per chain as `add_used` does. A used ring
/// that does not lie in one region goes through `add_used`, entry by entry. The caller
/// decides notifications itself (see `switch::notify_guest_since`): virtio-queue's own check
/// only counts `add_used` entries.
pub(crate) fn publish_used(
    mem: &GuestMemory,
    queue: &mut Queue,
    entries: &[(u16, u32)],
) -> Result<(), QueueError> {
    let unwritable = |head| QueueError::Malformed {
        head,
        why: Malformed::UsedRingOutsideMemory,
    };
    let size = queue.size();
    let Some(&(first, _)) = entries.first() else {
        return Ok(());
    };
    let Some((used, log, used_offset)) =
        region_slice(mem, queue.used_ring(), 4 + 8 * usize::from(size))
    else {
        for &(head, len) in entries {
            queue
                .add_used(mem, head, len)
                .map_err(|_| unwritable(head))?;
        }
        return Ok(());
    };
    let start = queue.next_used();
    let mut next = start;
    for &(head, len) in entries {
        let at = 4 + 8 * usize::from(next % size);
        put_used_elem(&used, at, head, len).map_err(|_| unwritable(head))?;
        next = next.wrapping_add(1);
    }
    // The raw stores above bypass vm-memory's marking: the entries are logged here, once per
    // batch (in two ranges when they wrap around the ring).
    if log.is_on() {
        let (from, count) = (
            usize::from(start % size),
            entries.len().min(usize::from(size)),
        );
        let first = count.min(usize::from(size) - from);
        let base = used_offset as usize + 4;
        log.mark_dirty(base + 8 * from, 8 * first);
        log.mark_dirty(base, 8 * (count - first));
    }
    // Release: the entries are visible before the index that covers them.
    used.store(next.to_le(), 2, Ordering::Release)
        .map_err(|_| unwritable(first))?;
    queue.set_next_used(next);
    Ok(())
}

/// The descriptor table and avail ring of a split queue, as slices of guest memory.
pub(crate) struct SplitRing<'m> {
    mem: &'m GuestMemory,
    desc: Slice<'m>,
    avail: Slice<'m>,
    size: u16,
    /// Next avail entry to take, and the avail index read when the batch started.
    next: u16,
    end: u16,
}

impl<'m> SplitRing<'m> {
    fn open(mem: &'m GuestMemory, queue: &Queue) -> Result<Option<Self>, QueueError> {
        let size = queue.size();
        if size == 0 {
            return Ok(None);
        }
        let (Some(desc), Some(avail)) = (
            slice(mem, queue.desc_table(), 16 * usize::from(size)),
            slice(mem, queue.avail_ring(), 4 + 2 * usize::from(size)),
        ) else {
            return Ok(None);
        };
        // Acquire: the entries and descriptors the index covers are read after it.
        let Ok(end) = avail.load::<u16>(2, Ordering::Acquire).map(u16::from_le) else {
            return Ok(None);
        };
        let next = queue.next_avail();
        if end.wrapping_sub(next) > size {
            return Err(QueueError::AvailIndex);
        }
        Ok(Some(SplitRing {
            mem,
            desc,
            avail,
            size,
            next,
            end,
        }))
    }

    fn peek_buffer(&self, ahead: u16) -> Option<GuestAddress> {
        let at = self.next.wrapping_add(ahead);
        if at.wrapping_sub(self.next) >= self.end.wrapping_sub(self.next) {
            return None;
        }
        let slot = 4 + 2 * usize::from(at % self.size);
        let head = u16::from_le(self.avail.load::<u16>(slot, Ordering::Relaxed).ok()?);
        if head >= self.size {
            return None;
        }
        let (addr, _, flags, _) = read_descriptor(&self.desc, 16 * usize::from(head))?;
        if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
            return None;
        }
        Some(GuestAddress(addr))
    }

    fn take(
        &mut self,
        writable: bool,
        segs: &mut Vec<Segment>,
    ) -> Result<Option<(u16, u64)>, QueueError> {
        if self.next == self.end {
            return Ok(None);
        }
        let slot = 4 + 2 * usize::from(self.next % self.size);
        let head = self
            .avail
            .load::<u16>(slot, Ordering::Relaxed)
            .map(u16::from_le)
            .map_err(|_| QueueError::AvailIndex)?;
        self.next = self.next.wrapping_add(1);
        let total = self.walk(head, writable, segs)?;
        Ok(Some((head, total)))
    }

    /// Follows the chain at `head` through the table and at most one indirect table. The
    /// chain may hold at most as many descriptors as the queue has entries, indirect ones
    /// included (virtio 2.7.5.3.1), which bounds both the walk and the segments it collects.
    fn walk(&self, head: u16, writable: bool, segs: &mut Vec<Segment>) -> Result<u64, QueueError> {
        let malformed = |why| QueueError::Malformed { head, why };
        segs.clear();
        let mut table = self.desc;
        let mut entries = usize::from(self.size);
        let mut index = usize::from(head);
        // Descriptors walked in the current table, and in the whole chain.
        let mut steps = 0usize;
        let mut walked = 0usize;
        let mut indirect = false;
        let mut total = 0u64;
        loop {
            if index >= entries {
                return Err(malformed(Malformed::IndexOutsideTable));
            }
            steps += 1;
            if steps > entries {
                return Err(malformed(Malformed::Loop));
            }
            walked += 1;
            if walked > usize::from(self.size) {
                return Err(malformed(Malformed::ChainTooLong));
            }
            let (addr, len, flags, next) = read_descriptor(&table, 16 * index)
                .ok_or_else(|| malformed(Malformed::TableUnreadable))?;
            if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
                if indirect || u32::from(flags) & VRING_DESC_F_NEXT != 0 {
                    return Err(malformed(Malformed::Loop));
                }
                if len == 0 || !len.is_multiple_of(16) {
                    return Err(malformed(Malformed::IndirectTableLength));
                }
                // The indirect descriptor itself does not count; its table's entries do.
                walked -= 1;
                if walked + len as usize / 16 > usize::from(self.size) {
                    return Err(malformed(Malformed::ChainTooLong));
                }
                table = slice(self.mem, addr, len as usize).ok_or(QueueError::OutOfMemory {
                    head,
                    source: OutOfGuestMemory {
                        addr,
                        len: len as usize,
                    },
                })?;
                entries = len as usize / 16;
                index = 0;
                steps = 0;
                indirect = true;
                continue;
            }
            if (u32::from(flags) & VRING_DESC_F_WRITE != 0) != writable {
                return Err(malformed(Malformed::wrong_direction(writable)));
            }
            if len > 0 {
                segs.push((GuestAddress(addr), len));
                total += u64::from(len);
            }
            if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
                return Ok(total);
            }
            index = usize::from(next);
        }
    }
}

/// Writes the used element (id, len) at byte `at` of the used ring as one 8-byte store.
/// Elements sit at 4 mod 8 in a ring aligned as the spec asks, so no aligned 8-byte access
/// fits them, and vm-memory's `write_obj` splits them into smaller stores; a batch's worth of
/// those, each waiting for a line the driver's CPU holds, filled the store buffer.
fn put_used_elem(
    used: &Slice<'_>,
    at: usize,
    id: u16,
    len: u32,
) -> Result<(), vm_memory::VolatileMemoryError> {
    let elem = (u64::from(len) << 32 | u64::from(id)).to_le_bytes();
    let slice = used.subslice(at, elem.len())?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `subslice` checked that these 8 bytes lie in the used ring's slice of mapped
    // guest memory, which stays mapped while `guard` lives; `[u8; 8]` has no alignment to
    // meet, and the volatile store never forms a reference to memory the driver shares.
    unsafe { guard.as_ptr().cast::<[u8; 8]>().write_volatile(elem) };
    Ok(())
}

/// The descriptor at byte `at` of `table` as (addr, len, flags, next). Two 8-byte loads
/// straight into registers: copying the 16 bytes to the stack first and picking the fields
/// out of the copy was the hottest spot of the switch path. A table without the spec's
/// 16-byte alignment (an indirect table a driver placed oddly) is read bytewise instead.
/// Always inlined: LTO kept it a call of its own, a tenth of the vm-to-vm profile; inlined
/// into the chain walk, vm-to-vm went up 8 %.
#[inline(always)]
fn read_descriptor(table: &Slice<'_>, at: usize) -> Option<(u64, u32, u16, u16)> {
    let (lo, hi) = match (
        table.load::<u64>(at, Ordering::Relaxed),
        table.load::<u64>(at + 8, Ordering::Relaxed),
    ) {
        (Ok(lo), Ok(hi)) => (u64::from_le(lo), u64::from_le(hi)),
        _ => {
            let raw = table.read_obj::<[u8; 16]>(at).ok()?;
            let (lo, hi) = raw.split_at(8);
            (
                u64::from_le_bytes(lo.try_into().ok()?),
                u64::from_le_bytes(hi.try_into().ok()?),
            )
        }
    };
    Some((lo, hi as u32, (hi >> 32) as u16, (hi >> 48) as u16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::testing::{memory, Buf, TestQueue, BUF_BASE, MEM_SIZE};

    /// Guest memory whose first region ends inside the descriptor table (at 0).
    fn split_memory() -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x80),
            (GuestAddress(0x80), MEM_SIZE - 0x80),
        ])
        .unwrap()
    }

    #[test]
    fn both_ways_of_reading_the_ring_agree() {
        for (mem, direct) in [(memory(), true), (split_memory(), false)] {
            let mut t = TestQueue::new(&mem);
            let h0 = t.post(&[Buf(BUF_BASE, 100, true), Buf(BUF_BASE + 0x1000, 50, true)]);
            let h1 = t.post(&[Buf(BUF_BASE + 0x2000, 10, true)]);
            let mut q = t.queue();
            let mut segs = Vec::new();
            let mut c = Chains::open(&mem, &mut q).unwrap().unwrap();
            assert_eq!(matches!(c, Chains::Direct(_)), direct);
            assert_eq!(c.take(true, &mut segs).unwrap(), Some((h0, 150)));
            assert_eq!(
                segs,
                vec![
                    (GuestAddress(BUF_BASE), 100),
                    (GuestAddress(BUF_BASE + 0x1000), 50)
                ]
            );
            // Given back, it is taken again first.
            c.untake();
            assert_eq!(c.next_avail(), 0);
            assert_eq!(c.take(true, &mut segs).unwrap(), Some((h0, 150)));
            assert_eq!(c.take(true, &mut segs).unwrap(), Some((h1, 10)));
            assert_eq!(c.take(true, &mut segs).unwrap(), None);
            assert_eq!(c.next_avail(), 2);
            // A transmit batch refuses the same (device-writable) chains.
            let mut q = t.queue();
            let mut c = Chains::open(&mem, &mut q).unwrap().unwrap();
            assert!(matches!(
                c.take(false, &mut segs),
                Err(QueueError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn used_entries_land_alike_whether_or_not_the_used_ring_is_in_one_region() {
        // Where the mock puts the used ring; the second memory splits it inside entry 3.
        let used = TestQueue::new(&memory()).mock.used_addr().0;
        let cut = used + 4 + 8 * 3 + 4;
        let split = GuestMemory::from_ranges(&[
            (GuestAddress(0), cut as usize),
            (GuestAddress(cut), MEM_SIZE - cut as usize),
        ])
        .unwrap();
        for mem in [memory(), split] {
            let mut t = TestQueue::new(&mem);
            let heads: Vec<u16> = (0..6)
                .map(|i| t.post(&[Buf(BUF_BASE + 0x1000 * i, 64, true)]))
                .collect();
            let mut q = t.queue();
            let entries: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 60 + u32::from(h))).collect();
            publish_used(&mem, &mut q, &entries[..4]).unwrap();
            publish_used(&mem, &mut q, &entries[4..]).unwrap();
            publish_used(&mem, &mut q, &[]).unwrap();
            assert_eq!(q.next_used(), 6);
            let want: Vec<(u32, u32)> = entries.iter().map(|&(h, l)| (u32::from(h), l)).collect();
            assert_eq!(t.used(0), want);
        }
    }

    #[test]
    fn used_entries_and_index_are_logged_on_the_pages_they_land_on() {
        use crate::datapath::dirty_log::tests::{pages_of, Logged};
        // The used ring right before a page boundary: the index and entry 0 on page 2,
        // entries 1 and 2 crossing onto page 3. The second memory splits the ring between
        // regions, so the entries go through virtio-queue's `add_used` instead.
        let used = 0x2ff0u64;
        let split = GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x3000),
            (GuestAddress(0x3000), MEM_SIZE - 0x3000),
        ])
        .unwrap();
        for mem in [memory(), split] {
            let mut t = TestQueue::new(&mem);
            let heads: Vec<u16> = (0..3)
                .map(|i| t.post(&[Buf(BUF_BASE + 0x1000 * i, 64, true)]))
                .collect();
            let mut q = t.queue();
            q.set_used_ring_address(Some(used as u32), Some(0));
            let logged = Logged::start(&mem);
            publish_used(&mem, &mut q, &[(heads[0], 60)]).unwrap();
            assert_eq!(logged.pages(), vec![2], "entry 0 and the index");
            publish_used(&mem, &mut q, &[(heads[1], 60), (heads[2], 60)]).unwrap();
            let mut want = pages_of(used + 2, 2);
            for i in 0..3 {
                want.extend(pages_of(used + 4 + 8 * i, 8));
            }
            want.dedup();
            assert_eq!(logged.pages(), want);
            assert_eq!(want, vec![2, 3]);
        }
    }

    #[test]
    fn indirect_tables_read_alike_wherever_the_driver_put_them() {
        let mem = memory();
        // 16-byte aligned (two 8-byte loads) and at an odd address (read bytewise).
        for table in [BUF_BASE + 0x8000, BUF_BASE + 0x8003] {
            let mut t = TestQueue::new(&mem);
            let bufs = [
                Buf(BUF_BASE + 0x100, 12, false),
                Buf(BUF_BASE + 0x2000, 1500, false),
            ];
            let head = t.post_indirect(table, &bufs);
            let mut q = t.queue();
            let mut segs = Vec::new();
            let mut c = Chains::open(&mem, &mut q).unwrap().unwrap();
            assert_eq!(c.take(false, &mut segs).unwrap(), Some((head, 1512)));
            assert_eq!(
                segs,
                vec![
                    (GuestAddress(BUF_BASE + 0x100), 12),
                    (GuestAddress(BUF_BASE + 0x2000), 1500)
                ],
                "table at {table:#x}"
            );
        }
    }

    /// Whatever way the ring is read, no chain may hold more descriptors than the queue has
    /// entries (virtio 2.7.5.3.1), indirect tables included: an indirect table's length is
    /// the guest's to choose (up to 2^28 entries), and every entry walked is a segment kept
    /// in the worker's scratch.
    #[test]
    fn chains_longer_than_the_queue_are_malformed_even_through_an_indirect_table() {
        let size = usize::from(crate::datapath::testing::QUEUE_SIZE);
        for (mem, direct) in [(memory(), true), (split_memory(), false)] {
            for (entries, ok) in [(size, true), (size + 1, false), (4 * size, false)] {
                let mut t = TestQueue::new(&mem);
                let bufs: Vec<Buf> = (0..entries)
                    .map(|i| Buf(BUF_BASE + 0x100 * i as u64, 64, false))
                    .collect();
                let head = t.post_indirect(BUF_BASE + 0x8_0000, &bufs);
                let mut q = t.queue();
                let mut segs = Vec::new();
                let mut c = Chains::open(&mem, &mut q).unwrap().unwrap();
                assert_eq!(matches!(c, Chains::Direct(_)), direct);
                let got = c.take(false, &mut segs);
                if ok {
                    assert_eq!(got.unwrap(), Some((head, 64 * entries as u64)));
                    assert_eq!(segs.len(), entries);
                } else {
                    assert_eq!(
                        got,
                        Err(QueueError::Malformed {
                            head,
                            why: Malformed::ChainTooLong
                        }),
                        "{entries} descriptors, direct: {direct}"
                    );
                }
            }
        }
    }
}
