//! A guest's RAM file as an AF_XDP UMEM: the kernel copies (or a zero-copy NIC DMAs) a
//! received frame straight into the guest's receive buffer, and sends a guest's frame from
//! where it lies.
//!
//! The file (QEMU's `memory-backend-memfd`) is mapped once, shared and contiguously, so a UMEM
//! address is a file offset. The UMEM is registered in unaligned chunk mode
//! (`XDP_UMEM_UNALIGNED_CHUNK_FLAG`): a fill-ring address may be any offset, and the kernel
//! puts a received frame at that address + [`XDP_PACKET_HEADROOM`] + the UMEM's headroom
//! (`xp_init_xskb_addr` and `xp_alloc` in the kernel's `net/xdp/xsk_buff_pool.c`). It refuses a
//! fill address whose chunk (`chunk_size` bytes from the address) runs past the UMEM
//! (`xp_check_unaligned`), and in copy mode drops a frame longer than
//! `chunk_size - XDP_PACKET_HEADROOM - headroom` (`__xsk_rcv` in `net/xdp/xsk.c`).
//!
//! So the headroom is the knob that bounds what lands in a guest's buffer: [`GuestUmemLayout`]
//! picks it so that the kernel itself refuses any frame longer than the largest one the port
//! receives, and a buffer holding `12 + max_frame` bytes can never be overrun. Pinning is the
//! price: registration pins every page of the file (`pin_user_pages(FOLL_LONGTERM)`), counted
//! against `RLIMIT_MEMLOCK` of the registering user unless it has `CAP_IPC_LOCK`
//! (`xdp_umem_account_pages` in `net/xdp/xdp_umem.c`).

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, UmemConfig, User};

use super::multi_buffer::{XDP_PKT_CONTD, XDP_USE_SG};
use super::{setup_error, XskError, XskKernelStats, XskMode, XskModeChoice};
use crate::datapath::zero_copy_rx::{GuestFile, SpareFrames, SpareMemory};
use crate::datapath::zero_copy_tx::{Completion, CompletionWatch, HeaderSlots, PieceLayout};

/// Completion ring entries per transmit slot: a frame sent from guest memory returns each of
/// its pieces (the slot's and usually one or two of guest memory).
const TX_PIECES_PER_SLOT: u32 = 4;

/// What the kernel leaves in front of every received frame (`XDP_PACKET_HEADROOM`).
pub const XDP_PACKET_HEADROOM: u32 = 256;
/// The smallest chunk the kernel registers (`XDP_UMEM_MIN_CHUNK_SIZE`).
pub const MIN_CHUNK_SIZE: u32 = 2048;
/// `XDP_UMEM_UNALIGNED_CHUNK_FLAG`: fill and tx addresses may be any offset in the UMEM.
pub const XDP_UMEM_UNALIGNED_CHUNK_FLAG: u32 = 1;
/// In unaligned mode the kernel hands a received frame back as the fill address in the low 48
/// bits and the data's offset from it in the high 16 (`xp_get_handle`,
/// `XSK_UNALIGNED_BUF_OFFSET_SHIFT`).
pub const UNALIGNED_OFFSET_SHIFT: u32 = 48;

/// Why a guest's RAM cannot be its port's UMEM (the port then keeps the copy path).
#[derive(Debug, thiserror::Error)]
pub enum GuestUmemError {
    #[error("a {max_frame}-byte frame does not fit one UMEM chunk of at most {max_chunk} bytes")]
    FrameTooLarge { max_frame: u32, max_chunk: u32 },
    #[error("guest memory of {len} bytes is empty or not whole pages")]
    Size { len: u64 },
    #[error("cannot map {len} bytes of guest memory: {source}")]
    Map { len: u64, source: io::Error },
    #[error(
        "cannot pin {len} bytes of guest memory as a UMEM: over the locked-memory limit of \
         {limit}, which every UMEM of the daemon's user counts against without CAP_IPC_LOCK \
         (raise it above the guest's memory: LimitMEMLOCK= in the unit, ulimit -l)"
    )]
    Memlock { len: u64, limit: String },
    #[error("guest memory UMEM registration ({len} bytes): {source}")]
    Register { len: u64, source: io::Error },
    #[error(transparent)]
    Socket(#[from] XskError),
}

/// The process's RLIMIT_MEMLOCK as `/proc/self/limits` states it ("8388608 bytes"), for the
/// operator reading why a registration was refused.
fn memlock_limit() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))
        .and_then(|rest| rest.split_whitespace().next());
    match soft {
        Some("unlimited") => "unlimited".to_string(),
        Some(bytes) => format!("{bytes} bytes"),
        None => "unknown size".to_string(),
    }
}

/// Where the kernel puts received frames in a guest-memory UMEM, and how long they may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestUmemLayout {
    /// The UMEM's chunk size: how far past a fill address the kernel may reach.
    pub chunk_size: u32,
    /// The UMEM's own headroom, on top of [`XDP_PACKET_HEADROOM`].
    pub headroom: u32,
}

impl GuestUmemLayout {
    /// The layout whose kernel receive limit is exactly `max_frame` bytes: the smallest chunk
    /// that holds the kernel's headroom and the frame, the rest of it UMEM headroom.
    pub fn for_max_frame(max_frame: u32) -> Result<Self, GuestUmemError> {
        let page = page_size();
        let need = max_frame
            .checked_add(XDP_PACKET_HEADROOM)
            .filter(|&n| n <= page && max_frame > 0)
            .ok_or(GuestUmemError::FrameTooLarge {
                max_frame,
                max_chunk: page,
            })?;
        let chunk_size = need.max(MIN_CHUNK_SIZE);
        Ok(GuestUmemLayout {
            chunk_size,
            headroom: chunk_size - need,
        })
    }

    /// How far after its fill address a received frame starts.
    pub fn data_offset(&self) -> u32 {
        XDP_PACKET_HEADROOM + self.headroom
    }

    /// The longest frame the kernel puts into one chunk (longer ones it drops, in copy mode,
    /// or splits over several chunks with multi-buffer).
    pub fn max_frame(&self) -> u32 {
        self.chunk_size - self.data_offset()
    }
}

/// The address a received frame's descriptor names split into (fill address, data offset),
/// as the kernel encodes it in unaligned mode.
pub fn split_rx_addr(addr: u64) -> (u64, u64) {
    let mask = (1u64 << UNALIGNED_OFFSET_SHIFT) - 1;
    (addr & mask, addr >> UNALIGNED_OFFSET_SHIFT)
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(n).unwrap_or(4096)
}

/// A shared mapping of a whole guest-memory file, followed directly by an anonymous area the
/// daemon owns (possibly empty); unmapped on drop.
///
/// The two are one contiguous range of addresses, so they register as one UMEM: file offsets
/// are UMEM addresses, and the daemon's area starts at the file's length. A frame the guest
/// sends can then go out as two pieces (multi-buffer): its Ethernet header from the daemon's
/// area, where the daemon checked it and the guest cannot change it, and the rest from where
/// it lies in guest memory.
struct GuestMapping {
    ptr: NonNull<u8>,
    /// Bytes of the file mapped, then of the daemon's area.
    file_len: usize,
    own_len: usize,
}

impl GuestMapping {
    fn new(fd: BorrowedFd<'_>, len: u64, own_len: usize) -> Result<Self, GuestUmemError> {
        let page = page_size() as usize;
        let file_len = usize::try_from(len)
            .ok()
            .filter(|&b| b > 0 && b % page == 0)
            .ok_or(GuestUmemError::Size { len })?;
        let own_len = own_len.div_ceil(page) * page;
        let map_err = |source| GuestUmemError::Map { len, source };
        // A hugetlb file maps only at its huge page size's alignment (its st_blksize).
        let align = file_block_size(fd).map_err(map_err)?.max(page);
        let total = file_len
            .checked_add(own_len)
            .and_then(|t| t.checked_add(align))
            .ok_or(GuestUmemError::Size { len })?;
        // SAFETY: a fresh inaccessible reservation; no existing memory is affected.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        let base = reserved as usize;
        let start = base.div_ceil(align) * align;
        let end = start + file_len + own_len;
        // SAFETY: gives back the parts of the reservation before `start` and after `end`,
        // which nothing uses.
        unsafe {
            if start > base {
                libc::munmap(reserved, start - base);
            }
            if base + total > end {
                libc::munmap(end as *mut libc::c_void, base + total - end);
            }
        }
        // From here on, dropping `mapping` unmaps exactly [start, end).
        let mapping = GuestMapping {
            ptr: NonNull::new(start as *mut u8).expect("inside a successful mapping"),
            file_len,
            own_len,
        };
        // SAFETY: replaces the start of our own reservation with a shared mapping of the
        // caller's file. The guest (another process) writes the same pages: this mapping is
        // only reached through volatile copies (`read`/`write`), never as a Rust reference.
        let file_map = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                file_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if file_map == libc::MAP_FAILED {
            return Err(map_err(io::Error::last_os_error()));
        }
        if own_len > 0 {
            // SAFETY: replaces the rest of our own reservation with private anonymous memory.
            let own = unsafe {
                libc::mmap(
                    (start + file_len) as *mut libc::c_void,
                    own_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_POPULATE,
                    -1,
                    0,
                )
            };
            if own == libc::MAP_FAILED {
                return Err(map_err(io::Error::last_os_error()));
            }
        }
        Ok(mapping)
    }

    fn len(&self) -> usize {
        self.file_len + self.own_len
    }

    /// `[offset, offset + len)` as a raw range of the mapping, if it lies inside.
    fn range(&self, offset: u64, len: usize) -> Option<*mut u8> {
        let start = usize::try_from(offset).ok()?;
        (start.checked_add(len)? <= self.len()).then(|| {
            // SAFETY: `start + len` is within the mapping (checked above).
            unsafe { self.ptr.as_ptr().add(start) }
        })
    }
}

/// The file's block size: the huge page size for hugetlbfs, a small page otherwise.
fn file_block_size(fd: BorrowedFd<'_>) -> io::Result<usize> {
    // SAFETY: fstat into a zeroed stat, which is a valid starting value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a live descriptor and `st` a live stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(st.st_blksize).unwrap_or(0))
}

impl Drop for GuestMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `new` kept; the registration that pinned its pages
        // is dropped first (`GuestUmem`'s field order), and pinned pages outlive the mapping
        // in the kernel anyway.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len()) };
    }
}

/// A guest's RAM file registered as an AF_XDP UMEM.
pub struct GuestUmem {
    // Field order is drop order: the registration goes before the memory it names.
    xdp: xdpilone::Umem,
    mapping: GuestMapping,
    layout: GuestUmemLayout,
}

// SAFETY: the mapping is shared memory that the guest writes anyway; this type reaches it only
// through bounds-checked volatile copies, which are sound from any thread. xdpilone's `Umem`
// is not Send/Sync only because it keeps the area's pointer, which it never dereferences.
unsafe impl Send for GuestUmem {}
// SAFETY: as above; every method takes `&self` and touches no Rust-visible state.
unsafe impl Sync for GuestUmem {}

impl GuestUmem {
    /// Maps the `len` bytes of guest memory file `fd` once and registers them as a UMEM with
    /// `layout` and fill/completion rings of `fill_size`/`complete_size` entries.
    pub fn register(
        fd: BorrowedFd<'_>,
        len: u64,
        layout: GuestUmemLayout,
        fill_size: u32,
        complete_size: u32,
    ) -> Result<Self, GuestUmemError> {
        Self::register_with_own_area(fd, len, 0, layout, fill_size, complete_size)
    }

    /// [`GuestUmem::register`] with `own_len` bytes (rounded up to pages) of daemon-owned
    /// memory right after the file in the same UMEM, from UMEM address `len` on.
    pub fn register_with_own_area(
        fd: BorrowedFd<'_>,
        len: u64,
        own_len: usize,
        layout: GuestUmemLayout,
        fill_size: u32,
        complete_size: u32,
    ) -> Result<Self, GuestUmemError> {
        let mapping = GuestMapping::new(fd, len, own_len)?;
        let len = mapping.len() as u64;
        let config = UmemConfig {
            fill_size,
            complete_size,
            frame_size: layout.chunk_size,
            headroom: layout.headroom,
            flags: XDP_UMEM_UNALIGNED_CHUNK_FLAG,
            // Transmit from guest memory would need metadata room in front of guest bytes
            // the daemon does not own; checksums stay with the daemon's header slot.
            tx_metadata_len: 0,
        };
        let area = NonNull::slice_from_raw_parts(mapping.ptr, mapping.len());
        // SAFETY: the area is a page-aligned mapping of `mapping.len()` bytes that outlives the
        // registration (`GuestUmem` owns both and drops `xdp` first).
        let xdp = unsafe { xdpilone::Umem::new(config, area) }.map_err(|e| {
            let source = super::errno(e);
            match source.raw_os_error() {
                // `xdp_umem_account_pages`: over RLIMIT_MEMLOCK without CAP_IPC_LOCK.
                Some(libc::ENOBUFS) => GuestUmemError::Memlock {
                    len,
                    limit: memlock_limit(),
                },
                _ => GuestUmemError::Register { len, source },
            }
        })?;
        Ok(GuestUmem {
            xdp,
            mapping,
            layout,
        })
    }

    pub fn layout(&self) -> GuestUmemLayout {
        self.layout
    }

    /// Bytes registered: the guest memory file, then the daemon's own area.
    pub fn len(&self) -> u64 {
        self.mapping.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.len() == 0
    }

    /// The UMEM addresses of the daemon's own area (empty without one).
    pub fn own_area(&self) -> std::ops::Range<u64> {
        self.mapping.file_len as u64..self.mapping.len() as u64
    }

    /// The registration, to make and bind sockets with.
    pub fn xdp(&self) -> &xdpilone::Umem {
        &self.xdp
    }

    /// A copy of `out.len()` bytes at file offset `offset`; `None` (nothing read) if the range
    /// leaves the file.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Option<()> {
        let src = self.mapping.range(offset, out.len())?;
        // SAFETY: `src..src + out.len()` is inside the live mapping (`range`); `out` is host
        // memory, so they do not overlap. The guest may write these bytes meanwhile: a copy
        // reads some mix of old and new bytes, which callers treat as guest-controlled data.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Some(())
    }

    /// Writes `data` at file offset `offset`; `None` (nothing written) if the range leaves the
    /// file.
    pub fn write(&self, offset: u64, data: &[u8]) -> Option<()> {
        let dst = self.mapping.range(offset, data.len())?;
        // SAFETY: as in `read`, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Some(())
    }
}

impl SpareMemory for GuestUmem {
    fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let own = self.own_area();
        let end = addr.checked_add(len as u64)?;
        if addr < own.start || end > own.end {
            return None;
        }
        let ptr = self.mapping.range(addr, len)?;
        // SAFETY: the range lies in the mapping (`range`) and in the daemon's own private
        // anonymous area, which the guest cannot reach. The kernel writes a spare frame only
        // while it is on the fill ring, and callers read only spares it returned and that are
        // not posted again while the slice lives (posting takes the socket mutably).
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

/// How long a bind refused with `EBUSY` is retried: the kernel frees a NIC queue's UMEM slot
/// in deferred work after the previous socket on it closed (a reconnect, a ring restart).
const BIND_RELEASE_WAIT: Duration = Duration::from_secs(2);

/// The receive socket of a guest-memory UMEM on one NIC queue, with the UMEM's fill ring.
///
/// A UMEM's first socket is the one it was registered on (the kernel binds further sockets
/// to a UMEM only through a bound first one), so this type owns the registration: dropping it
/// closes the socket and the registration together, and from then on the kernel writes
/// nothing into buffers left on the fill ring (`tests/tests/guest_umem_kernel.rs`). A ring
/// stop must drop it before the guest reuses those buffers.
pub struct GuestRxSocket {
    // Field order is drop order: rings and socket before the registration.
    device: DeviceQueue,
    rx: RingRx,
    /// The transmit side, when the spec asked for one.
    tx: Option<GuestTx>,
    user: User,
    umem: GuestUmem,
    mode: XskMode,
    queue_id: u32,
    /// Frames received in several pieces, which no guest buffer is posted for.
    split_rx: SplitRx,
    /// The spare receive frames of the daemon's area, as they are before any is posted.
    spares: SpareFrames,
}

/// A multi-buffer frame on the rx ring being dropped piece by piece.
#[derive(Default)]
struct SplitRx {
    /// The last piece read said the frame continues.
    continuing: bool,
    dropped: u64,
}

/// Transmit on a guest-memory UMEM. Every frame has a slot of the daemon's own area (after
/// the guest's file), so the kernel sends headers the guest cannot change after the daemon
/// checked them: a frame copied whole into it, or the headers of a frame whose rest goes as
/// further pieces of one multi-buffer frame (`XDP_USE_SG`) straight from guest memory. Such a
/// frame's guest chain is held until its slot comes back on the completion ring. A NIC queue
/// bound to this UMEM takes no other, so the port's transmit goes through a second socket
/// sharing it (and its completion ring). That socket is in no epoll set: every sent frame
/// wakes a socket's waiters, which on the receive socket was a callback per frame and an
/// event for the worker.
struct GuestTx {
    // Field order is drop order: the ring before its socket.
    ring: RingTx,
    _user: User,
    /// The slots, and the chain whose frame each holds while in flight.
    slots: HeaderSlots,
    /// Descriptors written but not yet on the ring.
    staged: Vec<XdpDesc>,
    /// Descriptors on the tx ring or not yet back from the completion ring.
    in_flight: u32,
    /// The guest's memory file, for frames sent from where they lie (none: all are copied).
    file: Option<GuestFile>,
    /// Most pieces of one frame sent from guest memory, its slot included.
    max_pieces: usize,
    /// Chains whose frames the kernel is done with, not yet handed back to the guest.
    done: Vec<u16>,
    /// Completion addresses that named no frame in flight, and frames given up as lost,
    /// since last taken.
    unknown: u64,
    /// Frames in flight with nothing coming back.
    watch: CompletionWatch,
}

/// Where a [`GuestRxSocket`] goes and what it registers.
#[derive(Clone, Copy)]
pub struct GuestRxSpec<'a> {
    /// The guest memory file and its length.
    pub file: BorrowedFd<'a>,
    pub len: u64,
    pub layout: GuestUmemLayout,
    pub ifname: &'a str,
    pub ifindex: u32,
    pub queue_id: u32,
    /// Entries of the fill and rx rings (a power of two).
    pub ring_size: u32,
    /// Transmit slots in the daemon's own area after the file (a power of two; the tx and
    /// completion rings get as many entries), or 0 for a receive-only socket.
    pub tx_slots: u32,
    /// Spare receive frames in the daemon's area after the transmit slots, for when the
    /// guest's buffers run out (`ring_size` must take them with the guest's).
    pub spare_frames: u32,
}

impl GuestRxSpec<'_> {
    /// Bytes of one transmit slot: a chunk, rounded up to a divisor of the page so no slot
    /// crosses a page (the kernel refuses a tx descriptor that does on a zero-copy NIC
    /// whose pages are not contiguous).
    pub fn tx_slot_size(&self) -> u32 {
        let page = page_size();
        let mut slot = MIN_CHUNK_SIZE;
        while slot < self.layout.chunk_size && slot < page {
            slot *= 2;
        }
        slot
    }
}

impl GuestRxSocket {
    /// Registers the guest memory file of `spec` and binds a receive socket on it to the NIC
    /// queue of `spec`. `Auto` tries zero-copy, then copy mode, registering afresh for each
    /// as `NicQueue` does (a second bind on the socket of a failed one is not relied on).
    /// Without `CAP_IPC_LOCK` the first
    /// registration's pages count against the memlock limit until the kernel's deferred
    /// release, so on a NIC without zero-copy a tight limit makes `Auto` fail where `Copy`
    /// would not.
    pub fn open(spec: GuestRxSpec<'_>, choice: XskModeChoice) -> Result<Self, GuestUmemError> {
        let deadline = Instant::now() + BIND_RELEASE_WAIT;
        let (ifname, queue_id) = (spec.ifname, spec.queue_id);
        loop {
            let attempt = match choice {
                XskModeChoice::Copy => Self::open_mode(spec, XskMode::Copy),
                XskModeChoice::ZeroCopy => Self::open_mode(spec, XskMode::ZeroCopy),
                XskModeChoice::Auto => Self::open_mode(spec, XskMode::ZeroCopy).or_else(|zc_err| {
                    tracing::debug!(%ifname, queue_id, error = %zc_err, "zero-copy AF_XDP not available for guest memory; using copy mode");
                    Self::open_mode(spec, XskMode::Copy)
                }),
            };
            match attempt {
                Err(GuestUmemError::Socket(XskError::Setup { ref source, .. }))
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open_mode(spec: GuestRxSpec<'_>, mode: XskMode) -> Result<Self, GuestUmemError> {
        let fail = setup_error(spec.ifname, spec.queue_id);
        let ring_size = spec.ring_size;
        let slot = spec.tx_slot_size();
        let own_len = (spec.tx_slots as usize + spec.spare_frames as usize) * slot as usize;
        // A frame sent from guest memory returns every piece on the completion ring: room for
        // a few pieces per slot, so the ring rarely holds the kernel back.
        let complete_size = (spec.tx_slots * TX_PIECES_PER_SLOT).max(ring_size);
        let umem = GuestUmem::register_with_own_area(
            spec.file,
            spec.len,
            own_len,
            spec.layout,
            ring_size,
            complete_size,
        )?;
        let mut info = IfInfo::invalid();
        info.from_ifindex(spec.ifindex)
            .map_err(fail("interface lookup"))?;
        info.set_queue(spec.queue_id);
        let sock = Socket::with_shared(&info, umem.xdp()).map_err(fail("socket"))?;
        let device = umem
            .xdp()
            .fq_cq(&sock)
            .map_err(fail("fill/completion rings"))?;
        let mode_flag = mode.bind_flag();
        let user = umem
            .xdp()
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(ring_size),
                    tx_size: None,
                    // Multi-buffer is a property of the UMEM's binding, which the transmit
                    // socket sharing it inherits (it may pass no flags of its own): frames
                    // sent from guest memory are several pieces.
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP
                        | mode_flag
                        | if spec.tx_slots > 0 { XDP_USE_SG } else { 0 },
                },
            )
            .map_err(fail("rx ring"))?;
        let rx = user.map_rx().map_err(fail("rx ring mapping"))?;
        umem.xdp().bind(&user).map_err(fail(match mode {
            XskMode::ZeroCopy => "zero-copy bind",
            XskMode::Copy => "copy-mode bind",
        }))?;
        let tx = match spec.tx_slots {
            0 => None,
            _ => {
                // Bound after the receive socket: the kernel binds a socket to a shared UMEM
                // only through a bound first one. It inherits the mode (no flags of its own).
                let sock = Socket::new(&info).map_err(fail("tx socket"))?;
                let tx_user = umem
                    .xdp()
                    .rx_tx(
                        &sock,
                        &SocketConfig {
                            rx_size: None,
                            tx_size: NonZeroU32::new(spec.tx_slots),
                            bind_flags: 0,
                        },
                    )
                    .map_err(fail("tx ring"))?;
                let ring = tx_user.map_tx().map_err(fail("tx ring mapping"))?;
                umem.xdp()
                    .bind(&tx_user)
                    .map_err(fail("shared-UMEM tx bind"))?;
                let own = umem.own_area();
                // The transmit slots are the start of the daemon's area; spares follow.
                let area = own.start..own.start + u64::from(spec.tx_slots) * u64::from(slot);
                Some(GuestTx {
                    ring,
                    _user: tx_user,
                    slots: HeaderSlots::new(
                        area.start,
                        u64::from(spec.tx_slots) * u64::from(slot),
                        slot,
                    ),
                    staged: Vec::with_capacity(spec.tx_slots as usize),
                    in_flight: 0,
                    file: None,
                    max_pieces: 1,
                    done: Vec::new(),
                    unknown: 0,
                    watch: CompletionWatch::default(),
                })
            }
        };
        let spares = SpareFrames::new(
            umem.own_area().start + u64::from(spec.tx_slots) * u64::from(slot),
            slot,
            spec.spare_frames,
        );
        Ok(GuestRxSocket {
            device,
            rx,
            tx,
            user,
            umem,
            mode,
            queue_id: spec.queue_id,
            split_rx: SplitRx::default(),
            spares,
        })
    }

    /// The socket, for the XSKMAP and the worker's epoll set.
    pub fn fd(&self) -> RawFd {
        self.user.as_raw_fd()
    }

    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// The DMA page a receive chunk must stay within: a zero-copy driver maps the UMEM page
    /// by page and the kernel refuses a chunk that crosses into a page not DMA-contiguous
    /// with it (`xp_check_unaligned`), which user space cannot tell; copy mode has no such
    /// limit.
    pub fn dma_page(&self) -> Option<u64> {
        (self.mode == XskMode::ZeroCopy).then(|| u64::from(page_size()))
    }

    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    pub fn umem(&self) -> &GuestUmem {
        &self.umem
    }

    /// The spare receive frames of the daemon's area (each a chunk at the start of a slot that
    /// divides the page, so a zero-copy NIC takes it), all in the pool.
    pub fn spare_frames(&self) -> SpareFrames {
        self.spares.clone()
    }

    /// Free entries on the fill ring as xdpilone's cached view has them (at most what is
    /// really free; it refreshes its view once it shows none).
    pub fn fill_room(&mut self) -> usize {
        self.device.fill(u32::MAX).capacity() as usize
    }

    /// Puts `addrs` on the fill ring, as many as it takes (all of them when no more than
    /// [`GuestRxSocket::fill_room`]); returns how many.
    pub fn fill(&mut self, addrs: &[u64]) -> usize {
        // xdpilone reserves from its cached view of the kernel's consumer and refreshes it
        // only once that view shows no room at all, so one pass may place fewer than fit:
        // go on until a pass makes no progress.
        let mut placed = 0;
        while placed < addrs.len() {
            let rest = &addrs[placed..];
            let mut w = self.device.fill(rest.len() as u32);
            let n = w.insert(rest.iter().copied()) as usize;
            w.commit();
            if n == 0 {
                break;
            }
            placed += n;
        }
        if self.device.needs_wakeup() {
            self.device.wake();
        }
        placed
    }

    /// Appends up to `max` received frames to `out` as (fill address, data offset from it,
    /// length), and gives their rx ring entries back to the kernel.
    ///
    /// The UMEM is bound for multi-buffer (its transmit sends frames in pieces), so a frame
    /// longer than the layout's largest (a priority-tagged full-size one) arrives split over
    /// several fill addresses rather than dropped: its pieces go straight back on the fill
    /// ring, the guest never sees them, and [`GuestRxSocket::take_rx_dropped_split`] counts
    /// the frame.
    pub fn receive(&mut self, max: u32, out: &mut Vec<(u64, u64, u32)>) {
        let mut r = self.rx.receive(max);
        let mut refill = Vec::new();
        while let Some(d) = r.read() {
            let (fill, offset) = split_rx_addr(d.addr);
            let continues = d.options & XDP_PKT_CONTD != 0;
            if continues || self.split_rx.continuing {
                refill.push(fill);
                if !continues {
                    self.split_rx.dropped += 1;
                }
                self.split_rx.continuing = continues;
                continue;
            }
            out.push((fill, offset, d.len));
        }
        r.release();
        drop(r);
        if !refill.is_empty() {
            self.fill(&refill);
        }
    }

    /// Frames dropped for arriving in several pieces since the last call.
    pub fn take_rx_dropped_split(&mut self) -> u64 {
        std::mem::take(&mut self.split_rx.dropped)
    }

    pub fn kernel_stats(&self) -> XskKernelStats {
        XskKernelStats::of(&self.user)
    }

    /// Bytes of the largest frame [`GuestRxSocket::send`] takes (0 without a tx side).
    pub fn max_tx_frame(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.slots.slot_size() as usize)
    }

    /// Sends frames from guest memory from now on, their pieces found through `file` (the
    /// guest memory file this UMEM registered), at most `max_pieces` per frame with the slot
    /// (what this socket's kernel path takes: `zero_copy_tx::MAX_PIECES` in copy mode, the
    /// driver's `xdp-zc-max-segs` in zero-copy); without it every frame is copied.
    pub fn send_from_guest_memory(&mut self, file: GuestFile, max_pieces: usize) {
        if let Some(tx) = self.tx.as_mut() {
            tx.file = Some(file);
            tx.max_pieces = max_pieces;
        }
    }

    /// Where the pieces of a frame sent from guest memory lie, if frames go so.
    pub fn tx_piece_layout(&self) -> Option<PieceLayout<'_>> {
        let tx = self.tx.as_ref()?;
        Some(PieceLayout {
            file: tx.file.as_ref()?,
            chunk_size: self.umem.layout.chunk_size,
            dma_page: self.dma_page(),
            max_pieces: tx.max_pieces,
        })
    }

    /// Free transmit slots now, after taking back what the kernel has sent.
    pub fn tx_room(&mut self) -> usize {
        self.reap_tx();
        self.tx.as_ref().map_or(0, |t| t.slots.free())
    }

    /// The free transmit slot the next [`GuestRxSocket::stage_tx`] or
    /// [`GuestRxSocket::stage_tx_in_place`] sends, to write a frame (or its headers) into;
    /// `None` when every slot is in flight (or there is no tx side).
    pub fn next_tx_buffer(&mut self) -> Option<&mut [u8]> {
        if self.tx.as_ref()?.slots.next_free().is_none() {
            self.reap_tx();
        }
        let tx = self.tx.as_ref()?;
        let addr = tx.slots.next_free()?;
        let len = tx.slots.slot_size() as usize;
        let ptr = self.umem.mapping.range(addr, len)?;
        // SAFETY: the slot lies in the mapping (`range`) and in the daemon's own private
        // anonymous area, which the guest cannot reach; it is free, so it is on no ring and
        // the kernel does not read it; and the slice borrows `self` mutably, so no second
        // slice of it exists until it is staged.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }

    /// Stages the first `len` bytes of the slot [`GuestRxSocket::next_tx_buffer`] returned
    /// for the tx ring; false if there is none or `len` exceeds it.
    pub fn stage_tx(&mut self, len: usize) -> bool {
        let Some(tx) = self.tx.as_mut() else {
            return false;
        };
        if len > tx.slots.slot_size() as usize {
            return false;
        }
        let Some(addr) = tx.slots.take_copied() else {
            return false;
        };
        tx.staged.push(XdpDesc {
            addr,
            len: len as u32,
            options: 0,
        });
        true
    }

    /// Stages chain `head`'s frame as one multi-buffer frame: the first `headers` bytes of
    /// the slot [`GuestRxSocket::next_tx_buffer`] returned, then `pieces` of guest memory
    /// (UMEM address, length, each checked by `zero_copy_tx::guest_pieces`). The chain is
    /// handed back by [`GuestRxSocket::take_completed_chains`] once the kernel returned the
    /// slot. False (nothing staged) if there is no free slot or the headers exceed it.
    pub fn stage_tx_in_place(&mut self, head: u16, headers: usize, pieces: &[(u64, u32)]) -> bool {
        let Some(tx) = self.tx.as_mut() else {
            return false;
        };
        if headers > tx.slots.slot_size() as usize {
            return false;
        }
        let Some(addr) = tx.slots.take(head) else {
            return false;
        };
        let more = |last: bool| if last { 0 } else { XDP_PKT_CONTD };
        tx.staged.push(XdpDesc {
            addr,
            len: headers as u32,
            options: more(pieces.is_empty()),
        });
        tx.staged
            .extend(pieces.iter().enumerate().map(|(i, &(addr, len))| XdpDesc {
                addr,
                len,
                options: more(i + 1 == pieces.len()),
            }));
        true
    }

    /// Copies `frame` into a free slot of the daemon's area and stages it for the tx ring
    /// (sent by [`GuestRxSocket::flush_tx`]); false when no slot is free or the frame does
    /// not fit one.
    pub fn send(&mut self, frame: &[u8]) -> bool {
        let Some(buf) = self.next_tx_buffer() else {
            return false;
        };
        let Some(room) = buf.get_mut(..frame.len()) else {
            return false;
        };
        room.copy_from_slice(frame);
        self.stage_tx(frame.len())
    }

    /// Puts the staged frames on the tx ring and kicks the kernel, which in copy mode sends
    /// only inside that call (as `XskSocket::flush_tx` does). A frame's pieces may straddle
    /// two flushes: the kernel keeps a frame it has begun until its last piece comes.
    pub fn flush_tx(&mut self) {
        let mode = self.mode;
        let Some(tx) = self.tx.as_mut() else { return };
        while !tx.staged.is_empty() {
            let mut writer = tx.ring.transmit(tx.staged.len() as u32);
            let n = writer.insert(tx.staged.iter().copied());
            writer.commit();
            if n == 0 {
                break;
            }
            tx.staged.drain(..n as usize);
            tx.in_flight += n;
        }
        super::kick_tx(&mut tx.ring, mode);
    }

    /// Takes sent slots back from the completion ring (and kicks descriptors still on the tx
    /// ring); returns how many completion entries came back. The chains of frames sent from
    /// guest memory wait in [`GuestRxSocket::take_completed_chains`].
    pub fn reap_tx(&mut self) -> u32 {
        let mode = self.mode;
        let Some(tx) = self.tx.as_mut() else { return 0 };
        if tx.in_flight == 0 {
            return 0;
        }
        let mut reader = self.device.complete(tx.in_flight);
        let mut n = 0;
        while let Some(addr) = reader.read() {
            match tx.slots.complete(addr) {
                Completion::Chain(head) => tx.done.push(head),
                Completion::Copied | Completion::GuestPiece => {}
                Completion::Unknown => tx.unknown += 1,
            }
            n += 1;
        }
        reader.release();
        tx.in_flight -= n.min(tx.in_flight);
        if n > 0 {
            tx.watch.completed();
        } else if tx.watch.idle(Instant::now(), tx.slots.in_flight()) {
            // The kernel keeps these slots (and their chains) until the socket closes; stop
            // sending from guest memory, the one way frames go out in pieces, so no more are
            // lost, and count the held frames once.
            let held = tx.slots.in_flight();
            tracing::warn!(
                queue = self.queue_id,
                frames = held,
                "transmit frames got no completion for seconds; their slots stay held until the socket closes, and this socket copies every frame from now on"
            );
            tx.unknown += held as u64;
            tx.file = None;
        }
        // A kick that found the kernel busy (or its completion ring full) left descriptors
        // on the ring: they go on now, or frames in flight would never complete.
        super::kick_tx(&mut tx.ring, mode);
        n
    }

    /// Appends the chains whose frames the kernel is done with to `out`, once each.
    pub fn take_completed_chains(&mut self, out: &mut Vec<u16>) {
        if let Some(tx) = self.tx.as_mut() {
            out.append(&mut tx.done);
        }
    }

    /// Chains whose frames the kernel may still read from guest memory.
    pub fn tx_chains_in_flight(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.slots.chains_in_flight())
    }

    /// Completion entries that named no frame in flight since the last call.
    pub fn take_unknown_tx_completions(&mut self) -> u64 {
        self.tx
            .as_mut()
            .map_or(0, |t| std::mem::take(&mut t.unknown))
    }

    /// Every chain the transmit side holds (frames in flight, and frames done but not yet
    /// handed back), its slots freed. Only for a socket about to be dropped: the chains may
    /// go back to the guest once it is, since the kernel then reads none of them.
    pub fn take_tx_chains(&mut self) -> Vec<u16> {
        let Some(tx) = self.tx.as_mut() else {
            return Vec::new();
        };
        let mut chains = std::mem::take(&mut tx.done);
        chains.extend(tx.slots.release_all());
        tx.staged.clear();
        tx.in_flight = 0;
        chains
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_makes_the_kernel_limit_exactly_the_largest_frame() {
        for max_frame in [60, 1514, 1518, 1792, 2000, 3840] {
            let l = GuestUmemLayout::for_max_frame(max_frame).unwrap();
            assert_eq!(l.max_frame(), max_frame, "{l:?}");
            assert_eq!(l.chunk_size, (max_frame + 256).max(MIN_CHUNK_SIZE));
            assert_eq!(l.data_offset(), 256 + l.headroom);
        }
        // One chunk holds at most a small page: larger frames keep the copy path.
        assert!(GuestUmemLayout::for_max_frame(page_size() - 255).is_err());
        assert!(GuestUmemLayout::for_max_frame(9018).is_err());
        assert!(GuestUmemLayout::for_max_frame(0).is_err());
        assert!(GuestUmemLayout::for_max_frame(u32::MAX).is_err());
    }

    #[test]
    fn a_received_address_splits_into_fill_address_and_data_offset() {
        assert_eq!(split_rx_addr(0x212_0000_0000_2d8d), (0x2d8d, 0x212));
        assert_eq!(split_rx_addr(0x1000), (0x1000, 0));
    }
}
