//! Dirty-page logging for live migration: the bitmap of every guest memory region.
//!
//! While a guest migrates, QEMU copies its RAM while it runs and asks the backend to record
//! every page it writes (`VHOST_F_LOG_ALL`, the log shared with `SET_LOG_BASE`), so it can
//! copy those pages again. The guest memory type carries a [`DirtyLog`] per region, and
//! vm-memory calls it on every write through its slices (`copy_from`, `store`, `write_obj`):
//! receive data and headers (`GuestMemoryCursor::write`), the used index and virtio-queue's
//! own ring writes. The one raw store in the datapath, the 8-byte used element, marks its
//! page itself (`split_ring::put_used_elem`).
//!
//! The used ring is logged at its guest physical address. QEMU sets each ring's log address
//! (`VHOST_VRING_F_LOG`) to that same address, which is why the ring needs no log of its own.
//!
//! The library attaches the log `SET_LOG_BASE` shares to the regions of the memory table it
//! has at that moment, and makes every region of a later table afresh, without a log. QEMU
//! sends a new table in the middle of a migration (memory plugged in, a region remapped)
//! and sends the log again only when it must grow, and then *before* the table
//! (`vhost_commit` in QEMU's hw/virtio/vhost.c), so the library alone would leave the whole
//! new table unlogged. The daemon therefore maps the frontend's log itself too
//! ([`FrontendLog`], kept per connection in a [`FrontendLogSlot`]) and attaches it to each
//! region of every new table before the workers see the table ([`attach_log`]).
//!
//! With no log attached, marking costs one atomic load per write (a flag the writer's cache
//! keeps shared, as nothing writes it during a migration-free life), and taking a slice costs
//! nothing: slices borrow the region's log ([`RefSlice`]) instead of cloning an `Arc`, which
//! the library's `BitmapMmapRegion` does on every slice and which several workers writing
//! into one region would make them contend for.

use std::fmt;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, MmapRegion, VolatileMemory};

/// Guest memory with a dirty log per region: what every datapath function writes into.
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyLog>;
/// One region of [`GuestMemory`].
pub type GuestRegion = vm_memory::GuestRegionMmap<DirtyLog>;

/// Where the pages of one region that the daemon wrote are recorded. `offset` counts from the
/// region's start; pages are 4096 bytes (`VHOST_LOG_PAGE`).
pub trait PageLog: Send + Sync {
    fn mark(&self, offset: usize, len: usize);
    fn is_marked(&self, offset: usize) -> bool;
}

/// The frontend's log, as the library maps it for `SET_LOG_BASE`.
impl PageLog for BitmapMmapRegion {
    fn mark(&self, offset: usize, len: usize) {
        self.mark_dirty(offset, len);
    }

    fn is_marked(&self, offset: usize) -> bool {
        self.dirty_at(offset)
    }
}

#[derive(Default)]
struct Shared {
    /// Both a log is attached and the frontend acked `VHOST_F_LOG_ALL`; read before every
    /// write, so it is the only cost while nothing migrates.
    on: AtomicBool,
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    log: Option<Box<dyn PageLog>>,
    log_all: bool,
}

impl State {
    fn update(&self, on: &AtomicBool) {
        on.store(self.log_all && self.log.is_some(), Ordering::Release);
    }
}

/// The dirty log of one guest memory region: it records writes while the frontend has
/// attached its log (`SET_LOG_BASE`) and asks for logging (`VHOST_F_LOG_ALL`), and costs one
/// atomic load per write otherwise.
#[derive(Clone, Default)]
pub struct DirtyLog(Arc<Shared>);

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("on", &self.is_on())
            .finish()
    }
}

impl DirtyLog {
    /// Records this region's writes in `log` from now on, instead of wherever they went.
    pub fn attach(&self, log: Box<dyn PageLog>) {
        let mut state = crate::sync::write(&self.0.state);
        state.log = Some(log);
        state.update(&self.0.on);
    }

    /// Follows the frontend's `VHOST_F_LOG_ALL`: QEMU clears it when a migration ends or is
    /// cancelled, and the log is not written after that.
    pub fn set_log_all(&self, log_all: bool) {
        let mut state = crate::sync::write(&self.0.state);
        state.log_all = log_all;
        state.update(&self.0.on);
    }

    /// Whether writes into this region are being logged.
    pub fn is_on(&self) -> bool {
        self.0.on.load(Ordering::Acquire)
    }
}

/// `VHOST_LOG_PAGE`: one bit of the log stands for this many bytes of guest memory.
const LOG_PAGE: u64 = 4096;

/// The frontend's whole dirty log as `SET_LOG_BASE` shares it: bit `p % 8` of byte `p / 8`
/// stands for guest page `p` (guest physical address / 4096), whichever region holds it.
pub struct FrontendLog {
    map: MmapRegion<()>,
}

impl fmt::Debug for FrontendLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontendLog")
            .field("bytes", &self.map.len())
            .finish()
    }
}

impl FrontendLog {
    /// Maps `size` bytes of `file` from `offset`, shared: what the daemon marks there is what
    /// the frontend reads. The caller has checked that the range lies inside the file.
    pub fn map(file: File, offset: u64, size: u64) -> io::Result<Self> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        if size == 0 {
            return Err(io::Error::other("an empty dirty log"));
        }
        let map =
            MmapRegion::from_file(FileOffset::new(file, offset), size).map_err(io::Error::other)?;
        Ok(FrontendLog { map })
    }

    /// Whether the log has a bit for every page of guest addresses `[start, start + len)`.
    pub fn covers(&self, start: u64, len: u64) -> bool {
        let last = len
            .checked_sub(1)
            .and_then(|l| start.checked_add(l))
            .map(|end| end / LOG_PAGE / 8);
        last.is_some_and(|byte| byte < self.map.len() as u64)
    }

    fn bit(&self, page: u64) -> Option<(&AtomicU8, u8)> {
        let byte = usize::try_from(page / 8).ok()?;
        let bits = self.map.get_atomic_ref::<AtomicU8>(byte).ok()?;
        Some((bits, 1 << (page % 8)))
    }
}

/// One region's part of a [`FrontendLog`]: offsets in the region, marked at their guest
/// page.
struct RegionInLog {
    log: Arc<FrontendLog>,
    start: u64,
    len: u64,
}

impl PageLog for RegionInLog {
    fn mark(&self, offset: usize, len: usize) {
        let (offset, len) = (offset as u64, len as u64);
        if len == 0 || offset >= self.len {
            return;
        }
        let last = offset.saturating_add(len - 1).min(self.len - 1);
        for page in (self.start + offset) / LOG_PAGE..=(self.start + last) / LOG_PAGE {
            if let Some((bits, bit)) = self.log.bit(page) {
                bits.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    fn is_marked(&self, offset: usize) -> bool {
        (offset as u64) < self.len
            && self
                .log
                .bit((self.start + offset as u64) / LOG_PAGE)
                .is_some_and(|(bits, bit)| bits.load(Ordering::Relaxed) & bit != 0)
    }
}

/// Attaches `log` to every region of `mem` it covers and returns the guest address ranges of
/// those it does not (`(start, len)`), whose writes stay unlogged until a log that covers
/// them arrives.
pub fn attach_log(mem: &GuestMemory, log: &Arc<FrontendLog>) -> Vec<(u64, u64)> {
    let mut uncovered = Vec::new();
    for r in mem.iter() {
        let (start, len) = (r.start_addr().0, r.len());
        if log.covers(start, len) {
            region_log(r).attach(Box::new(RegionInLog {
                log: Arc::clone(log),
                start,
                len,
            }));
        } else {
            uncovered.push((start, len));
        }
    }
    uncovered
}

/// The log a connection's frontend shared last (`SET_LOG_BASE`), for the memory tables that
/// come after it.
#[derive(Debug, Default)]
pub struct FrontendLogSlot(Mutex<Option<Arc<FrontendLog>>>);

impl FrontendLogSlot {
    pub fn set(&self, log: FrontendLog) {
        *crate::sync::lock(&self.0) = Some(Arc::new(log));
    }

    pub fn current(&self) -> Option<Arc<FrontendLog>> {
        crate::sync::lock(&self.0).clone()
    }
}

/// The log of region `r` itself (`GuestMemoryRegion::bitmap` gives a slice of it).
pub fn region_log(r: &GuestRegion) -> &DirtyLog {
    std::ops::Deref::deref(r).bitmap()
}

/// Turns logging in every region of `mem` on or off, as the frontend's features say.
pub fn set_log_all(mem: &GuestMemory, log_all: bool) {
    for r in mem.iter() {
        region_log(r).set_log_all(log_all);
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, DirtyLog>;
}

impl Bitmap for DirtyLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 || !self.0.on.load(Ordering::Acquire) {
            return;
        }
        if let Some(log) = crate::sync::read(&self.0.state).log.as_ref() {
            log.mark(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_on()
            && crate::sync::read(&self.0.state)
                .log
                .as_ref()
                .is_some_and(|log| log.is_marked(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> RefSlice<'_, DirtyLog> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// How the library attaches the log `SET_LOG_BASE` maps to each region.
impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        let region = BitmapMmapRegion::default();
        region.replace(bitmap);
        self.attach(Box::new(region));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    use vm_memory::{Bytes, GuestAddress};

    pub const PAGE: usize = 4096;

    /// A log for tests: one bit per page of a region, readable afterwards.
    pub struct TestLog(Arc<Vec<AtomicU64>>);

    impl PageLog for TestLog {
        fn mark(&self, offset: usize, len: usize) {
            for page in offset / PAGE..=(offset + len - 1) / PAGE {
                if let Some(word) = self.0.get(page / 64) {
                    word.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
            }
        }

        fn is_marked(&self, offset: usize) -> bool {
            let page = offset / PAGE;
            self.0
                .get(page / 64)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (page % 64)) != 0)
        }
    }

    /// The logs attached to a memory, read as guest page numbers.
    pub struct Logged {
        regions: Vec<(u64, Arc<Vec<AtomicU64>>)>,
    }

    impl Logged {
        /// Attaches a fresh log to every region of `mem` and turns logging on, as a
        /// migrating frontend does.
        pub fn start(mem: &GuestMemory) -> Self {
            let logged = Self::attach(mem);
            set_log_all(mem, true);
            logged
        }

        /// Attaches a fresh log to every region of `mem`; nothing is logged before LOG_ALL.
        pub fn attach(mem: &GuestMemory) -> Self {
            let regions = mem
                .iter()
                .map(|r| {
                    let pages = (r.len() as usize).div_ceil(PAGE);
                    let bits =
                        Arc::new((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect());
                    region_log(r).attach(Box::new(TestLog(Arc::clone(&bits))));
                    (r.start_addr().0, bits)
                })
                .collect();
            Logged { regions }
        }

        /// The guest page numbers marked dirty, in order.
        pub fn pages(&self) -> Vec<u64> {
            let mut out = Vec::new();
            for (start, bits) in &self.regions {
                for (w, word) in bits.iter().enumerate() {
                    let v = word.load(Ordering::Relaxed);
                    for b in 0..64 {
                        if v & (1 << b) != 0 {
                            out.push(start / PAGE as u64 + (w * 64 + b) as u64);
                        }
                    }
                }
            }
            out.sort_unstable();
            out
        }

        pub fn clear(&self) {
            for (_, bits) in &self.regions {
                for w in bits.iter() {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// The guest pages `[addr, addr + len)` touches.
    pub fn pages_of(addr: u64, len: u64) -> Vec<u64> {
        (addr / PAGE as u64..=(addr + len - 1) / PAGE as u64).collect()
    }

    #[test]
    fn only_writes_between_log_all_and_its_end_are_marked() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 * PAGE)]).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let write = |addr| mem.write_slice(&[1u8; 100], GuestAddress(addr)).unwrap();
        write(0x1000);
        assert!(!region_log(region).is_on());
        let logged = Logged::attach(&mem);
        write(0x1000);
        assert!(
            logged.pages().is_empty(),
            "a log alone does not turn logging on"
        );
        set_log_all(&mem, true);
        assert!(region_log(region).is_on());
        write(0x1ff0);
        assert_eq!(logged.pages(), vec![1, 2]);
        assert!(region.bitmap().dirty_at(0x2000));
        set_log_all(&mem, false);
        write(0x3000);
        assert_eq!(
            logged.pages(),
            vec![1, 2],
            "nothing after LOG_ALL is cleared"
        );
    }

    /// The guest pages marked in a log file, read as the frontend reads them.
    fn marked_in(file: &File) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut bytes, 0).unwrap();
        (0..bytes.len() as u64 * 8)
            .filter(|p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect()
    }

    /// A memory table that arrives after the log (QEMU's order when it plugs memory in
    /// during a migration) is logged into the frontend's log from its first write: the kept
    /// region and the new one alike, at their guest pages. A region beyond the log is named
    /// and left alone.
    #[test]
    fn a_later_memory_table_is_logged_into_the_log_that_covers_it() {
        const MIB: u64 = 1 << 20;
        // One bit per page up to 2 MiB: 64 bytes.
        let file = crate::memory_guard::tests::memfd(64);
        let log = Arc::new(FrontendLog::map(file.try_clone().unwrap(), 0, 64).unwrap());
        assert!(log.covers(0, 2 * MIB) && !log.covers(0, 2 * MIB + 1));
        assert!(!log.covers(u64::MAX, 2) && !log.covers(0, 0));

        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), MIB as usize),
            (GuestAddress(MIB + PAGE as u64), PAGE * 4),
            (GuestAddress(4 * MIB), PAGE),
        ])
        .unwrap();
        let uncovered = attach_log(&mem, &log);
        assert_eq!(uncovered, vec![(4 * MIB, PAGE as u64)]);
        set_log_all(&mem, true);
        let write = |addr: u64, len: usize| mem.write_slice(&vec![1u8; len], GuestAddress(addr));
        write(0x1ff0, 0x20).unwrap();
        write(MIB + PAGE as u64 + 10, 2 * PAGE).unwrap();
        write(4 * MIB, 8).unwrap();
        let first_new = (MIB + PAGE as u64) / PAGE as u64;
        assert_eq!(
            marked_in(&file),
            vec![1, 2, first_new, first_new + 1, first_new + 2]
        );
        let region = mem.find_region(GuestAddress(MIB + PAGE as u64)).unwrap();
        assert!(region.bitmap().dirty_at(PAGE));
        assert!(!region.bitmap().dirty_at(3 * PAGE));
    }
}
