//! The UMEM: the memory every AF_XDP socket of a NIC queue moves frames through, and who may
//! touch which frame of it.
//!
//! This file is the only place where a UMEM offset becomes a slice. Frames are owned through
//! [`UmemFrame`] tokens, which are neither `Copy` nor `Clone`: [`UmemArea::new`] makes one
//! token per frame, holding a token is the right to read and write that frame, and giving a
//! frame to the kernel (fill or tx ring) drops its token. A frame comes back from the kernel
//! (rx or completion ring) as a bare address, which [`UmemArea::reclaim`] turns into a token
//! again; that is the one step whose soundness rests on the kernel, so it is `unsafe`.
//!
//! Two edges, one type each: [`UmemArea`] owns the anonymous mapping (mmap, munmap and the
//! pointer arithmetic), [`RegisteredUmem`] owns its registration with the kernel as an
//! AF_XDP UMEM and keeps the mapping alive as long as the registration.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use xdpilone::UmemConfig;

/// `xdp_umem_reg.flags`: reserve `tx_metadata_len` bytes of TX metadata before each
/// transmitted frame (Linux 6.11+; 6.8 to 6.10 took the length without the flag, and xvdpa
/// does not use their TX metadata).
const XDP_UMEM_TX_METADATA_LEN: u32 = 1 << 2;

/// Bytes reserved for `struct xsk_tx_metadata` before each transmitted frame: its size since
/// Linux 6.14 (flags, then the checksum request and launch time), a multiple of 8 as the
/// kernel wants. Older kernels read the first 16 and ignore the rest.
pub const TX_METADATA_LEN: u32 = 24;

/// `xsk_tx_metadata.flags`: complete the checksum described by `csum_start` and
/// `csum_offset`.
const XDP_TXMD_FLAGS_CHECKSUM: u64 = 1 << 1;

/// Writes `struct xsk_tx_metadata` asking for a checksum over the frame's bytes from `start`
/// on, stored at `start + offset`, into `meta` (the [`TX_METADATA_LEN`] bytes before the
/// frame's data), in the kernel's layout: `__u64 flags`, then `__u16 csum_start`, `__u16
/// csum_offset` and (at 8 bytes further) `__u64 launch_time`, in host byte order.
pub fn write_checksum_request(meta: &mut [u8], start: u16, offset: u16) {
    meta[..TX_METADATA_LEN as usize].fill(0);
    meta[0..8].copy_from_slice(&XDP_TXMD_FLAGS_CHECKSUM.to_ne_bytes());
    meta[8..10].copy_from_slice(&start.to_ne_bytes());
    meta[10..12].copy_from_slice(&offset.to_ne_bytes());
}

/// Why a UMEM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UmemError {
    #[error("cannot map {bytes} bytes of UMEM: {source}")]
    Map { bytes: usize, source: io::Error },
    #[error("UMEM registration: {0}")]
    Register(io::Error),
}

/// The right to one frame of one [`UmemArea`]: whoever holds it may read and write the frame,
/// nobody else (the kernel included) touches it meanwhile.
///
/// Not `Copy` or `Clone`, so a frame has one owner. Dropping a token gives up the frame
/// without returning it anywhere: that is what handing it to the kernel does, and anywhere
/// else it is a leak that shrinks the pool, not a hazard.
#[derive(Debug, PartialEq, Eq)]
pub struct UmemFrame {
    /// Which frame of the area: it starts at `index * frame_size`.
    index: u32,
    /// The area it belongs to ([`UmemArea::id`]), so a token is never read against another.
    area: u32,
}

/// Ids for [`UmemArea`]s, never reused within the process: a token outliving its area can
/// never match a later one.
static NEXT_AREA_ID: AtomicU32 = AtomicU32::new(0);

/// Anonymous memory for a UMEM, cut into equal frames; unmapped on drop.
pub struct UmemArea {
    ptr: NonNull<u8>,
    /// Bytes mapped: `frames * frame_size`.
    len: usize,
    frames: u32,
    frame_size: u32,
    id: u32,
}

// SAFETY: the area is plain memory that this value owns; its bytes are only reached through
// `frame`/`frame_mut`, which need the frame's unique token (a `&mut` one to write), so moving
// the area to or sharing it with another thread cannot create a data race on them.
unsafe impl Send for UmemArea {}
// SAFETY: as above: `&UmemArea` hands out no byte without the frame's token.
unsafe impl Sync for UmemArea {}

impl UmemArea {
    /// Maps `frames` frames of `frame_size` bytes each, and returns the area with a token for
    /// every frame, in address order.
    pub fn new(frames: u32, frame_size: u32) -> Result<(Self, Vec<UmemFrame>), UmemError> {
        let bytes = frames as usize * frame_size as usize;
        let fail = |source| UmemError::Map { bytes, source };
        let id = NEXT_AREA_ID
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1))
            .map_err(|_| fail(io::Error::other("every UMEM id of this process is used")))?;
        if bytes == 0 {
            return Err(fail(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(fail(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast()).expect("mmap never returns null on success");
        let area = UmemArea {
            ptr,
            len: bytes,
            frames,
            frame_size,
            id,
        };
        let tokens = (0..frames)
            .map(|index| UmemFrame { index, area: id })
            .collect();
        Ok((area, tokens))
    }

    /// The address the kernel's rings name `frame` by (its offset in the UMEM).
    pub fn addr(&self, frame: &UmemFrame) -> u64 {
        u64::from(frame.index) * u64::from(self.frame_size)
    }

    /// Where `frame` starts in the mapping.
    fn frame_ptr(&self, frame: &UmemFrame) -> *mut u8 {
        // A token of another area names some other memory: reading it here would alias a
        // frame this area's own token holder may be writing. Only a bug mixes them up.
        assert_eq!(frame.area, self.id, "a UMEM frame used with another UMEM");
        debug_assert!(frame.index < self.frames);
        // SAFETY: the token was made by this area (checked above) for an index below
        // `frames`, so the frame lies inside the mapping.
        unsafe {
            self.ptr
                .as_ptr()
                .add(frame.index as usize * self.frame_size as usize)
        }
    }

    /// The bytes of `frame`.
    ///
    /// # Panics
    /// If `frame` belongs to another area.
    pub(super) fn frame(&self, frame: &UmemFrame) -> &[u8] {
        let ptr = self.frame_ptr(frame);
        // SAFETY: in bounds of the live mapping (`frame_ptr`); the shared borrow of the
        // frame's unique token rules out a `frame_mut` of it meanwhile, and the kernel does
        // not write a frame whose token is held.
        unsafe { std::slice::from_raw_parts(ptr, self.frame_size as usize) }
    }

    /// The bytes of `frame`, to write.
    ///
    /// # Panics
    /// If `frame` belongs to another area.
    pub fn frame_mut<'a>(&'a self, frame: &'a mut UmemFrame) -> &'a mut [u8] {
        let ptr = self.frame_ptr(frame);
        // SAFETY: in bounds of the live mapping (`frame_ptr`); the exclusive borrow of the
        // frame's unique token is the only way to these bytes for as long as the slice lives.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.frame_size as usize) }
    }

    /// `len` bytes of `frame` from `start` on: a frame's data as a ring descriptor placed it.
    /// A span outside the frame (a descriptor the kernel got wrong) reads as empty.
    pub(super) fn data(&self, frame: &UmemFrame, start: u32, len: u32) -> &[u8] {
        let (start, len) = (start as usize, len as usize);
        start
            .checked_add(len)
            .and_then(|end| self.frame(frame).get(start..end))
            .unwrap_or(&[])
    }

    /// Takes back the frame holding `addr`, which the kernel returned on a ring, with where
    /// in the frame `addr` points. `None` if `addr` is outside the area.
    ///
    /// # Safety
    /// `addr` must come from the kernel's rx or completion ring of this UMEM: it names a frame
    /// that was given to the kernel (its token dropped) and that the kernel now hands back and
    /// no longer touches, so no other token for it exists.
    pub(super) unsafe fn reclaim(&self, addr: u64) -> Option<(UmemFrame, u32)> {
        let size = u64::from(self.frame_size);
        let index = u32::try_from(addr / size)
            .ok()
            .filter(|&i| i < self.frames)?;
        let frame = UmemFrame {
            index,
            area: self.id,
        };
        Some((frame, (addr % size) as u32))
    }

    /// Registers the area with the kernel as an AF_XDP UMEM whose fill and completion rings
    /// hold `fill_size` and `complete_size` entries (powers of two).
    ///
    /// With `tx_metadata`, room for AF_XDP TX metadata ([`TX_METADATA_LEN`] bytes) is reserved
    /// before every transmitted frame, so the kernel or the NIC can complete checksums; a
    /// kernel that refuses it (before Linux 6.11, which added `XDP_UMEM_TX_METADATA_LEN`)
    /// gets a registration without, said once in the log. [`RegisteredUmem::tx_metadata_len`]
    /// tells which it got.
    pub fn register(
        self,
        fill_size: u32,
        complete_size: u32,
        tx_metadata: bool,
    ) -> Result<RegisteredUmem, UmemError> {
        let config = |tx_metadata_len: u32| UmemConfig {
            fill_size,
            complete_size,
            frame_size: self.frame_size,
            headroom: 0,
            flags: if tx_metadata_len > 0 {
                XDP_UMEM_TX_METADATA_LEN
            } else {
                0
            },
            tx_metadata_len,
        };
        if tx_metadata {
            match self.register_with(config(TX_METADATA_LEN)) {
                Ok(xdp) => {
                    return Ok(RegisteredUmem {
                        xdp,
                        area: self,
                        tx_metadata_len: TX_METADATA_LEN,
                    })
                }
                Err(e) => {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::info!(error = %e, "the kernel takes no AF_XDP TX metadata (Linux 6.11+): checksums for the NIC are completed in software");
                    });
                }
            }
        }
        let xdp = self.register_with(config(0))?;
        Ok(RegisteredUmem {
            xdp,
            area: self,
            tx_metadata_len: 0,
        })
    }

    fn register_with(&self, config: UmemConfig) -> Result<xdpilone::Umem, UmemError> {
        let area = NonNull::slice_from_raw_parts(self.ptr, self.len);
        // SAFETY: the area is page aligned (fresh mmap), sized for `frames` frames, and
        // outlives the registration: `RegisteredUmem` owns both and drops `xdp` first (a
        // registration that failed closed its socket already).
        unsafe { xdpilone::Umem::new(config, area) }
            .map_err(|e| UmemError::Register(super::errno(e)))
    }
}

impl Drop for UmemArea {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`. A registration using it is
        // dropped first (`RegisteredUmem`'s field order); the kernel pins the pages of a UMEM
        // it still uses, so a socket closing late never writes into unmapped memory.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A [`UmemArea`] registered with the kernel: the UMEM that AF_XDP sockets are made on.
pub struct RegisteredUmem {
    // Field order is drop order: the registration goes before the memory it names.
    xdp: xdpilone::Umem,
    area: UmemArea,
    /// Bytes of TX metadata before each transmitted frame's data: 0 or [`TX_METADATA_LEN`].
    tx_metadata_len: u32,
}

// SAFETY: xdpilone's `Umem` is neither Send nor Sync only because it keeps the area's pointer,
// which it never dereferences for us; its other parts are an `Arc` of the fd and a `Send +
// Sync` device set. The area itself is Send and Sync (above).
unsafe impl Send for RegisteredUmem {}
// SAFETY: as above; xdpilone's `Umem` methods take `&self` and synchronise internally.
unsafe impl Sync for RegisteredUmem {}

impl RegisteredUmem {
    /// The memory, to reach frames through their tokens.
    pub(super) fn area(&self) -> &UmemArea {
        &self.area
    }

    /// The registration, to make and bind sockets with.
    pub fn xdp(&self) -> &xdpilone::Umem {
        &self.xdp
    }

    /// Bytes of TX metadata the kernel expects before each transmitted frame's data (0: the
    /// UMEM was registered without).
    pub fn tx_metadata_len(&self) -> u32 {
        self.tx_metadata_len
    }
}
