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
//! With no log attached, marking costs one atomic load per write (a flag the writer's cache
//! keeps shared, as nothing writes it during a migration-free life), and taking a slice costs
//! nothing: slices borrow the region's log ([`RefSlice`]) instead of cloning an `Arc`, which
//! the library's `BitmapMmapRegion` does on every slice and which several workers writing
//! into one region would make them contend for.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::GuestMemoryBackend;

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

    use vm_memory::{Bytes, GuestAddress, GuestMemoryRegion};

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
}
