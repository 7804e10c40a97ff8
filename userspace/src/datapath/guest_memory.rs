//! Copies between host buffers and guest memory, with the region lookup cached.
//!
//! `GuestMemory::find_region` is a search over all regions; doing it for every descriptor
//! costs more than the copy of a small frame. A guest's buffers almost always live in the same
//! region as the previous one, so the last region found is tried first.

use super::dirty_log::region_log;
use super::{DirtyLog, GuestMemory, GuestRegion};
use vm_memory::bitmap::{Bitmap, RefSlice};
use vm_memory::VolatileSlice;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

/// A guest address range that is not backed by guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest range {addr:#x}+{len} lies outside guest memory")]
pub struct OutOfGuestMemory {
    pub addr: u64,
    pub len: usize,
}

/// A slice of guest memory as vm-memory hands it out.
type GuestSlice<'m> = VolatileSlice<'m, RefSlice<'m, DirtyLog>>;

/// Marks `[offset, offset + len)` of region `r` dirty if a migration is logging.
#[inline(always)]
fn log_write(r: &GuestRegion, offset: u64, len: usize) {
    let log = region_log(r);
    if log.is_on() {
        log.mark_dirty(offset as usize, len);
    }
}

/// Copies `data` into `slice` (as long as each other), leaving the dirty log to the caller.
fn copy_into(slice: &GuestSlice<'_>, data: &[u8]) {
    let len = data.len().min(slice.len());
    let guard = slice.ptr_guard_mut();
    // SAFETY: `slice` is a bounds-checked range of mapped guest memory, which stays mapped
    // while `guard` lives, and `len` fits it and `data`; `data` is host memory, so the two do
    // not overlap. The guest reads these bytes only after the used index that publishes them.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), guard.as_ptr(), len) };
}

/// A view of guest memory that remembers the region of the last access.
pub struct GuestMemoryCursor<'m> {
    mem: &'m GuestMemory,
    last: Option<&'m GuestRegion>,
}

impl<'m> GuestMemoryCursor<'m> {
    pub fn new(mem: &'m GuestMemory) -> Self {
        GuestMemoryCursor { mem, last: None }
    }

    /// The region holding `addr`, from the cache when possible.
    fn region(&mut self, addr: GuestAddress) -> Option<&'m GuestRegion> {
        if let Some(r) = self.last {
            if addr >= r.start_addr() && addr.raw_value() - r.start_addr().raw_value() < r.len() {
                return Some(r);
            }
        }
        let r = self.mem.find_region(addr)?;
        self.last = Some(r);
        Some(r)
    }

    /// Calls `f(offset, slice)` for each piece of `[addr, addr + len)`, split at region
    /// boundaries; `offset` counts from `addr`. Fails before `f` runs on a range that is not
    /// entirely guest memory, so a bad descriptor never half-writes a buffer.
    ///
    /// The pieces of a write (`writes`) are marked in the region's dirty log while a migration
    /// logs, once per piece, with the check for "logging?" inlined here: vm-memory's own marking
    /// is an out-of-line call per copy, which cost about 8 % of a small frame's delivery.
    fn for_each_piece(
        &mut self,
        addr: GuestAddress,
        len: usize,
        writes: bool,
        mut f: impl FnMut(usize, &GuestSlice<'m>),
    ) -> Result<(), OutOfGuestMemory> {
        let oob = OutOfGuestMemory {
            addr: addr.raw_value(),
            len,
        };
        // The usual case: the whole range lies in the region of the last access.
        if let Some(r) = self.last {
            let in_last = addr
                .raw_value()
                .checked_sub(r.start_addr().raw_value())
                .filter(|off| {
                    off.checked_add(len as u64)
                        .is_some_and(|end| end <= r.len())
                });
            if let Some(off) = in_last {
                let slice = r
                    .get_slice(MemoryRegionAddress(off), len)
                    .map_err(|_| oob)?;
                f(0, &slice);
                if writes {
                    log_write(r, off, len);
                }
                return Ok(());
            }
        }
        // Validate first: walk the regions without touching memory.
        let mut pieces: [(GuestAddress, usize); 4] = [(GuestAddress(0), 0); 4];
        let mut n = 0;
        let mut done = 0usize;
        while done < len {
            let a = addr.checked_add(done as u64).ok_or(oob)?;
            let r = self.region(a).ok_or(oob)?;
            let in_region = (r.len() - (a.raw_value() - r.start_addr().raw_value())) as usize;
            let take = in_region.min(len - done);
            // More than four regions for one descriptor is not something a real VMM produces.
            if n == pieces.len() {
                return Err(oob);
            }
            pieces[n] = (a, take);
            n += 1;
            done += take;
        }
        let mut offset = 0;
        for &(a, take) in &pieces[..n] {
            let r = self.region(a).ok_or(oob)?;
            let ra = MemoryRegionAddress(a.raw_value() - r.start_addr().raw_value());
            let slice = r.get_slice(ra, take).map_err(|_| oob)?;
            f(offset, &slice);
            if writes {
                log_write(r, ra.0, take);
            }
            offset += take;
        }
        Ok(())
    }

    /// Asks the CPU to start loading the cache line at guest address `addr`, so a copy a few
    /// frames later does not wait for it. Nothing happens for an address outside guest memory.
    pub fn prefetch(&mut self, addr: GuestAddress) {
        let Some(r) = self.region(addr) else { return };
        let offset = MemoryRegionAddress(addr.raw_value() - r.start_addr().raw_value());
        if let Ok(slice) = r.get_slice(offset, 1) {
            let ptr = slice.ptr_guard().as_ptr();
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint: it never faults and reads or writes nothing the
            // program can observe; `ptr` points into the guest mapping anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    ptr.cast::<i8>(),
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = ptr;
        }
    }

    /// Writes `data` to guest memory at `addr`.
    pub fn write(&mut self, addr: GuestAddress, data: &[u8]) -> Result<(), OutOfGuestMemory> {
        self.for_each_piece(addr, data.len(), true, |off, s| {
            copy_into(s, &data[off..off + s.len()]);
        })
    }

    /// Fills `out` from guest memory at `addr`.
    pub fn read(&mut self, addr: GuestAddress, out: &mut [u8]) -> Result<(), OutOfGuestMemory> {
        let len = out.len();
        self.for_each_piece(addr, len, false, |off, s| {
            s.copy_to(&mut out[off..off + s.len()]);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> GuestMemory {
        // Adjacent regions, so one buffer can straddle the boundary.
        GuestMemory::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
        ])
        .unwrap()
    }

    #[test]
    fn round_trips_across_a_region_boundary() {
        let mem = two_regions();
        let mut c = GuestMemoryCursor::new(&mem);
        let data: Vec<u8> = (0..64u8).collect();
        c.write(GuestAddress(0x1fe0), &data).unwrap();
        let mut back = vec![0u8; 64];
        c.read(GuestAddress(0x1fe0), &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn rejects_ranges_outside_guest_memory_without_writing() {
        let mem = two_regions();
        let mut c = GuestMemoryCursor::new(&mem);
        assert!(c.write(GuestAddress(0x2ff0), &[1u8; 32]).is_err());
        let mut back = [0u8; 16];
        c.read(GuestAddress(0x2ff0), &mut back).unwrap();
        assert_eq!(back, [0u8; 16], "nothing written on a failed range");
        assert!(c.write(GuestAddress(0), &[1]).is_err());
        assert!(c.write(GuestAddress(u64::MAX - 2), &[1u8; 8]).is_err());
    }
}
