//! A process-wide SIGBUS guard over guest memory.
//!
//! Guest memory is a file the frontend shares (a memfd, a tmpfs or hugetlbfs file) mapped
//! into the daemon. `frontend_checks` refuses regions that do not fit their file and seals
//! memfds that allow it, but a file that cannot be sealed can still be cut short after it
//! was handed over; the daemon's next access past the new end raises SIGBUS, which by
//! default kills every port. The guard turns that into one port's failure:
//!
//! - Every mapping of guest memory is registered here ([`MemoryWatch`]) in a fixed table of
//!   atomics that a signal handler may read: no lock, no allocation.
//! - The SIGBUS handler looks up the faulting address. In a registered region it maps
//!   anonymous zero pages over the whole region (`mmap(MAP_FIXED)`, async-signal-safe),
//!   marks the region poisoned and returns: the faulting access is retried and reads zeros.
//!   Anywhere else it hands the signal on to the handler installed before it (Rust's own, or
//!   the default action), so any other fault still ends the process as it did.
//! - The port's backend sees the poisoned flag and stops the port's queues until the
//!   frontend hands over new memory or reconnects. A ring that read the zeros before that
//!   asks [`lost`] before blaming the guest.
//!
//! It sits beside `sync` and `stats` at the bottom of the import order, so that the workers
//! and receive queues below the backend can ask about the memory they read.
//!
//! A registration holds the mapping itself (an `Arc` of the guest memory), so a region is
//! never unmapped while it is registered, and it is released only once nothing else holds
//! that memory: no thread can then touch the range, and a range the kernel hands out again
//! can never be zeroed by mistake.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use std::any::Any;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Regions the guard can watch at once, over all ports: 256 ports with 8 regions each (the
/// most a vhost-user memory table holds), and as many again for replaced memory that a
/// worker still reads.
const SLOTS: usize = 4096;

/// Why guest memory could not be guarded.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("installing the SIGBUS handler: {0}")]
    Install(io::Error),
    #[error("every guest-memory guard slot is in use")]
    Full,
}

/// One watched region. `seq` is a sequence lock: odd while a writer changes the slot, so the
/// signal handler never acts on a half-written range. `len == 0` marks a free slot.
struct Slot {
    seq: AtomicU32,
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            seq: AtomicU32::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Rewrites the slot. Writers are serialised by the caller.
    fn write(&self, start: usize, len: usize) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.poisoned.store(false, Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The slot's range, if it is in use and was not being rewritten meanwhile.
    fn range(&self) -> Option<(usize, usize)> {
        let before = self.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            return None;
        }
        let (start, len) = (
            self.start.load(Ordering::Relaxed),
            self.len.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        (len != 0 && self.seq.load(Ordering::Relaxed) == before).then_some((start, len))
    }
}

/// The table of watched regions. Lookups and [`Registry::poison`] are async-signal-safe;
/// `claim` and `release` must be serialised by the caller.
pub(crate) struct Registry<const N: usize> {
    slots: [Slot; N],
    /// Regions poisoned so far: a backend compares it with the value it last saw, so the
    /// per-event check costs one load until something happens.
    poison_events: AtomicU64,
}

impl<const N: usize> Registry<N> {
    pub(crate) const fn new() -> Self {
        Registry {
            slots: [const { Slot::new() }; N],
            poison_events: AtomicU64::new(0),
        }
    }

    /// Puts `[start, start + len)` in a free slot and returns its index.
    pub(crate) fn claim(&self, start: usize, len: usize) -> Option<usize> {
        if len == 0 {
            return None;
        }
        let i = self
            .slots
            .iter()
            .position(|s| s.len.load(Ordering::Relaxed) == 0)?;
        self.slots[i].write(start, len);
        Some(i)
    }

    pub(crate) fn release(&self, i: usize) {
        self.slots[i].write(0, 0);
    }

    /// The slot whose range holds `addr`: (index, start, len).
    pub(crate) fn find(&self, addr: usize) -> Option<(usize, usize, usize)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            s.range()
                .filter(|&(start, len)| addr >= start && addr - start < len)
                .map(|(start, len)| (i, start, len))
        })
    }

    pub(crate) fn poison(&self, i: usize) {
        self.slots[i].poisoned.store(true, Ordering::Release);
        self.poison_events.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn is_poisoned(&self, i: usize) -> bool {
        self.slots[i].poisoned.load(Ordering::Acquire)
    }

    pub(crate) fn poison_events(&self) -> u64 {
        self.poison_events.load(Ordering::Acquire)
    }
}

static REGISTRY: Registry<SLOTS> = Registry::new();

/// The SIGBUS action in place before the guard's: faults outside guest memory go there.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Whether the handler is installed (or why not, as an errno).
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// Regions no longer current (memory replaced, connection ended) that some thread may still
/// read. The lock also serialises every write to the registry.
static RETIRED: Mutex<Vec<Guarded>> = Mutex::new(Vec::new());

/// How many regions poisoned so far, process-wide (see [`Registry::poison_events`]).
pub fn poison_events() -> u64 {
    REGISTRY.poison_events()
}

/// Whether a region of `mem` was replaced by zero pages because its file shrank: a ring
/// that read nonsense from it met lost memory, not a guest breaking the rules. Costs a scan
/// of the registry per region; for error paths.
pub fn lost<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> bool {
    poison_events() != 0
        && mem.iter().any(|region| {
            REGISTRY
                .find(region.as_ptr() as usize)
                .is_some_and(|(i, _, _)| REGISTRY.is_poisoned(i))
        })
}

fn install() -> Result<(), GuardError> {
    let installed = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no action" value to read the current one
        // into; sigaction(2) with a null new action only reads.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to a sigaction for the kernel to fill.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        let _ = PREVIOUS.set(old);
        // SAFETY: as above; every field of the new action is set below or left empty.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sigemptyset on a sigset_t this function owns.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: a fully initialised action whose handler only does async-signal-safe work.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(())
    });
    installed.map_err(|errno| GuardError::Install(io::Error::from_raw_os_error(errno)))
}

/// The SIGBUS handler: zero pages over a shrunk guest region, or the previous action.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((i, start, len)) = REGISTRY.find(addr) {
        // SAFETY: [start, start + len) is a guest-memory mapping the registry holds (an `Arc`
        // keeps it mapped while registered): replacing it with private anonymous pages
        // touches no other mapping. mmap is a plain system call, safe in a signal handler.
        let zeros = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if zeros != libc::MAP_FAILED {
            REGISTRY.poison(i);
            return;
        }
    }
    previous_action(sig, info, ctx);
}

/// Hands a fault that is not the guard's to the action installed before it; with none, the
/// default action is restored, so the retried access ends the process as it would have.
fn previous_action(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let handler = PREVIOUS.get().map(|p| (p.sa_sigaction, p.sa_flags));
    match handler {
        Some((h, flags)) if h != libc::SIG_DFL && h != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO the previous action's handler has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: without SA_SIGINFO the previous action's handler takes the signal.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
        }
        // Ignoring a fault would retry it forever: the default action it is.
        _ => {
            // SAFETY: a zeroed sigaction is SIG_DFL with no flags and an empty mask.
            let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: sigaction is async-signal-safe; the pointer is to a valid action.
            unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
    }
}

/// The regions of one guest memory, registered, and the memory itself, kept mapped.
struct Guarded {
    slots: Vec<usize>,
    /// Whatever its regions' dirty-log type; held only to keep the mapping.
    mem: Arc<dyn Any + Send + Sync>,
}

impl Guarded {
    fn poisoned(&self) -> bool {
        self.slots.iter().any(|&i| REGISTRY.is_poisoned(i))
    }
}

/// Releases every retired region nothing reads any more: its slots first, then the mapping.
/// Called with `RETIRED` locked.
fn sweep(retired: &mut Vec<Guarded>) {
    retired.retain(|g| {
        // Ours is the last reference: no thread can reach the mapping (the memory was
        // swapped out of its GuestMemoryAtomic, which paid every reader's debt).
        if Arc::strong_count(&g.mem) > 1 {
            return true;
        }
        for &i in &g.slots {
            REGISTRY.release(i);
        }
        false
    });
}

/// The guest memory of one connection, as the guard watches it.
#[derive(Default)]
pub struct MemoryWatch {
    current: Option<Guarded>,
}

impl MemoryWatch {
    /// Watches the regions `mem` holds now instead of the ones watched before, which are
    /// released once no thread reads them.
    pub fn watch<B: Bitmap + Send + Sync + 'static>(
        &mut self,
        mem: &GuestMemoryAtomic<GuestMemoryMmap<B>>,
    ) -> Result<(), GuardError> {
        install()?;
        let mem = mem.memory().into_inner();
        let mut retired = crate::sync::lock(&RETIRED);
        let mut slots = Vec::new();
        for region in mem.iter() {
            let start = region.as_ptr() as usize;
            match REGISTRY.claim(start, region.len() as usize) {
                Some(i) => slots.push(i),
                None => {
                    for i in slots {
                        REGISTRY.release(i);
                    }
                    return Err(GuardError::Full);
                }
            }
        }
        retired.extend(self.current.replace(Guarded {
            slots,
            mem: mem as Arc<dyn Any + Send + Sync>,
        }));
        sweep(&mut retired);
        Ok(())
    }

    /// Whether the current memory lost a region (its file shrank and the daemon touched it).
    pub fn poisoned(&self) -> bool {
        self.current.as_ref().is_some_and(Guarded::poisoned)
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        let mut retired = crate::sync::lock(&RETIRED);
        retired.extend(self.current.take());
        sweep(&mut retired);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, FileOffset, GuestAddress};

    #[test]
    fn lookup_finds_the_slot_holding_an_address_and_nothing_else() {
        let r: Registry<4> = Registry::new();
        let a = r.claim(0x10000, 0x1000).unwrap();
        let b = r.claim(0x20000, 0x2000).unwrap();
        assert_ne!(a, b);
        assert_eq!(r.find(0x10000), Some((a, 0x10000, 0x1000)));
        assert_eq!(r.find(0x10fff), Some((a, 0x10000, 0x1000)));
        assert_eq!(r.find(0x11000), None, "one past the end");
        assert_eq!(r.find(0xffff), None);
        assert_eq!(r.find(0x21fff), Some((b, 0x20000, 0x2000)));
        assert_eq!(r.find(0), None);
        assert_eq!(r.find(usize::MAX), None);
        // A released slot no longer answers, and is reused.
        r.release(a);
        assert_eq!(r.find(0x10000), None);
        assert_eq!(r.claim(0x30000, 0x10), Some(a));
        assert_eq!(r.find(0x30000), Some((a, 0x30000, 0x10)));
    }

    #[test]
    fn a_full_registry_refuses_and_empty_ranges_are_not_registered() {
        let r: Registry<2> = Registry::new();
        assert_eq!(r.claim(0x1000, 0), None);
        assert!(r.claim(0x1000, 1).is_some());
        assert!(r.claim(0x2000, 1).is_some());
        assert_eq!(r.claim(0x3000, 1), None);
    }

    #[test]
    fn poison_marks_one_slot_and_counts_the_event_until_the_slot_is_reused() {
        let r: Registry<2> = Registry::new();
        let a = r.claim(0x1000, 0x1000).unwrap();
        let b = r.claim(0x2000, 0x1000).unwrap();
        assert_eq!(r.poison_events(), 0);
        r.poison(a);
        assert!(r.is_poisoned(a) && !r.is_poisoned(b));
        assert_eq!(r.poison_events(), 1);
        r.release(a);
        let c = r.claim(0x5000, 0x1000).unwrap();
        assert!(!r.is_poisoned(c), "a new region starts healthy");
    }

    #[test]
    fn a_slot_being_rewritten_is_not_matched() {
        let r: Registry<1> = Registry::new();
        let a = r.claim(0x1000, 0x1000).unwrap();
        // What the handler sees in the middle of a write: an odd sequence.
        r.slots[a].seq.fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.find(0x1000), None);
        r.slots[a].seq.fetch_add(1, Ordering::Relaxed);
        assert_eq!(r.find(0x1000), Some((a, 0x1000, 0x1000)));
    }

    /// A memfd of `len` zero bytes, for tests of mappings.
    pub(crate) fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"guard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    /// The real thing: a memfd shrunk under a watched mapping reads as zeros afterwards
    /// instead of killing the test process, and the watch reports it.
    #[test]
    fn a_shrunk_memfd_reads_zeros_and_is_reported() {
        shrunk_file_reads_zeros_and_is_reported(memfd(4 * 4096));
    }

    /// The same for guest RAM in a tmpfs file (as in /dev/shm, or a hugetlbfs file, which
    /// cannot be sealed either).
    #[test]
    fn a_shrunk_tmpfs_file_reads_zeros_and_is_reported() {
        let path = format!("/dev/shm/xvdpa-guard-test-{}", std::process::id());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(4 * 4096).unwrap();
        shrunk_file_reads_zeros_and_is_reported(file);
    }

    fn shrunk_file_reads_zeros_and_is_reported(file: File) {
        let len = file.metadata().unwrap().len() as usize;
        let shrink = file.try_clone().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        mem.write_obj(0xabu8, GuestAddress(4096)).unwrap();
        let atomic = GuestMemoryAtomic::new(mem);
        let mut watch = MemoryWatch::default();
        watch.watch(&atomic).unwrap();
        assert!(!watch.poisoned());
        let events = poison_events();

        shrink.set_len(0).unwrap();
        let guard = atomic.memory();
        let byte: u8 = guard.read_obj(GuestAddress(4096)).unwrap();
        assert_eq!(byte, 0, "the shrunk region reads as zero pages");
        assert!(watch.poisoned());
        assert!(lost(&guard));
        assert!(poison_events() > events);
        // Still usable memory (private now): writes land and read back.
        guard.write_obj(7u8, GuestAddress(8192)).unwrap();
        assert_eq!(guard.read_obj::<u8>(GuestAddress(8192)).unwrap(), 7);
        drop(guard);

        // New memory replaces it: the watch is healthy again.
        let fresh = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        atomic.lock().unwrap().replace(fresh);
        watch.watch(&atomic).unwrap();
        assert!(!watch.poisoned());
        assert!(!lost(&atomic.memory()));
    }

    /// A fault the guard does not own still ends the process with SIGBUS, as it did before
    /// the guard (checked in a child process, which it kills).
    #[test]
    fn a_fault_outside_guest_memory_still_kills_the_process() {
        install().unwrap();
        let file = memfd(4096);
        // SAFETY: a fresh shared mapping of the memfd, never registered with the guard and
        // only read by the child below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        file.set_len(0).unwrap();
        // SAFETY: the child only reads the mapping and exits; it allocates nothing and takes
        // no lock another thread of the test process could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // A handler that swallowed the fault would retry it forever: SIGALRM ends that.
            // SAFETY: alarm(2) has no memory-safety preconditions.
            unsafe { libc::alarm(5) };
            // SAFETY: the mapping is live; past the file's end, this read raises SIGBUS.
            let byte = unsafe { std::ptr::read_volatile(map as *const u8) };
            // SAFETY: _exit(2) ends the child at once; reaching it means the fault was eaten.
            unsafe { libc::_exit(i32::from(byte) + 100) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // SAFETY: munmap of the mapping made above, which nothing uses any more.
        unsafe { libc::munmap(map, 4096) };
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "child status {status:#x}"
        );
    }

    /// A retired mapping stays registered (and mapped) while a reader holds it.
    #[test]
    fn replaced_memory_is_released_only_when_nothing_reads_it() {
        let old = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8192)]).unwrap();
        let addr = old.iter().next().unwrap().as_ptr() as usize;
        let atomic = GuestMemoryAtomic::new(old);
        let mut watch = MemoryWatch::default();
        watch.watch(&atomic).unwrap();
        assert!(REGISTRY.find(addr).is_some());

        let reader = atomic.memory();
        let fresh = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        atomic.lock().unwrap().replace(fresh);
        watch.watch(&atomic).unwrap();
        assert!(
            REGISTRY.find(addr).is_some(),
            "a worker still reads the old memory: it stays guarded"
        );
        drop(reader);
        // The next sweep (any watch's) lets it go. Under the lock no other test can claim a
        // slot for a mapping the kernel puts at the same address meanwhile.
        let mut retired = crate::sync::lock(&RETIRED);
        sweep(&mut retired);
        assert!(REGISTRY.find(addr).is_none());
        drop(retired);
        drop(watch);
    }
}
