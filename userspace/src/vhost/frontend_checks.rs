//! What the daemon checks in a frontend's vhost-user messages before rust-vmm's library acts
//! on them: the frontend is another process, and anything it hands over (file descriptors,
//! sizes, indexes) must not let it block, crash or exhaust the daemon.
//!
//! - `SET_VRING_KICK`, `SET_VRING_CALL`, `SET_VRING_ERR`: the fd must be an eventfd (a pipe
//!   with one byte in it would block the 8-byte kick read while the vring lock is held), and
//!   it is made non-blocking (a call eventfd whose counter the frontend saturated would block
//!   the notifying write forever; EAGAIN there means the guest is signalled already);
//! - `SET_VRING_NUM`: a power of two from 1 to the device's maximum (virtio-queue ignores
//!   other sizes and the library acks them);
//! - `SET_MEM_TABLE`: one fd per region, each region inside its file (vm-memory maps it
//!   without comparing, and the first access past the end raises SIGBUS in the daemon). A
//!   memfd that allows sealing gets `F_SEAL_SHRINK`, so it cannot be cut short later;
//! - `SET_LOG_BASE`: one fd, the dirty log inside it and sealed the same way (the workers
//!   write into the log during a migration);
//! - `SEND_RARP` (which the shim handles itself, see [`check_send_rarp`]): only after the
//!   frontend acknowledged the RARP protocol feature, 8 bytes, no fd, a unicast MAC.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::mac::MacAddr;

pub const REQ_SET_MEM_TABLE: u32 = 5;
pub const REQ_SET_LOG_BASE: u32 = 6;
pub const REQ_SET_VRING_NUM: u32 = 8;
pub const REQ_SET_VRING_KICK: u32 = 12;
pub const REQ_SET_VRING_CALL: u32 = 13;
pub const REQ_SET_VRING_ERR: u32 = 14;

pub const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
pub const REQ_SEND_RARP: u32 = 19;

/// `VHOST_USER_VRING_NOFD_MASK`: the message carries no fd (polling instead).
const VRING_NOFD: u64 = 1 << 8;

/// Why a message was refused, for the log and the frontend.
pub type Refusal = String;

/// Checks one request; `Ok` lets it through (possibly after making its fds safe to use).
pub fn check_request(
    request: u32,
    payload: &[u8],
    fds: &[OwnedFd],
    max_queue_size: u16,
) -> Result<(), Refusal> {
    match request {
        REQ_SET_VRING_KICK | REQ_SET_VRING_CALL | REQ_SET_VRING_ERR => check_vring_fd(payload, fds),
        REQ_SET_VRING_NUM => check_vring_num(payload, max_queue_size),
        REQ_SET_MEM_TABLE => check_mem_table(payload, fds),
        REQ_SET_LOG_BASE => check_log_base(payload, fds),
        _ => Ok(()),
    }
}

/// Checks a `SEND_RARP` (the guest's MAC in the first 6 of 8 bytes) and returns the MAC to
/// announce. `rarp_acked`: the frontend's `SET_PROTOCOL_FEATURES` included RARP.
pub fn check_send_rarp(
    payload: &[u8],
    fds: &[OwnedFd],
    rarp_acked: bool,
) -> Result<MacAddr, Refusal> {
    if !rarp_acked {
        return Err("SEND_RARP without the RARP protocol feature negotiated".into());
    }
    if !fds.is_empty() {
        return Err(format!("SEND_RARP with {} fds", fds.len()));
    }
    let Ok(value) = <[u8; 8]>::try_from(payload) else {
        return Err(format!(
            "SEND_RARP of {} bytes; it carries 8 (a MAC and padding)",
            payload.len()
        ));
    };
    let mac = MacAddr([value[0], value[1], value[2], value[3], value[4], value[5]]);
    if mac.is_multicast() || mac.0 == [0; 6] {
        return Err(format!(
            "SEND_RARP for {mac}, which no guest can have (group or zero address)"
        ));
    }
    Ok(mac)
}

fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
    let b = payload.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(payload: &[u8], at: usize) -> Option<u64> {
    let lo = u64::from(u32_at(payload, at)?);
    let hi = u64::from(u32_at(payload, at + 4)?);
    Some(lo | hi << 32)
}

fn check_vring_fd(payload: &[u8], fds: &[OwnedFd]) -> Result<(), Refusal> {
    let value = u64_at(payload, 0).ok_or("vring fd message shorter than 8 bytes")?;
    let ring = value & 0xff;
    match (value & VRING_NOFD != 0, fds) {
        (true, []) => Ok(()),
        (false, [fd]) => {
            if !is_eventfd(fd) {
                return Err(format!("ring {ring}: the fd is not an eventfd"));
            }
            set_nonblocking(fd)
                .map_err(|e| format!("ring {ring}: cannot make the eventfd non-blocking: {e}"))
        }
        (nofd, fds) => Err(format!(
            "ring {ring}: {} fds with the no-fd flag {}",
            fds.len(),
            if nofd { "set" } else { "clear" }
        )),
    }
}

fn check_vring_num(payload: &[u8], max_queue_size: u16) -> Result<(), Refusal> {
    let (Some(ring), Some(num)) = (u32_at(payload, 0), u32_at(payload, 4)) else {
        return Err("SET_VRING_NUM shorter than 8 bytes".into());
    };
    if num.is_power_of_two() && num <= u32::from(max_queue_size) {
        Ok(())
    } else {
        Err(format!(
            "ring {ring}: size {num} is not a power of two from 1 to {max_queue_size}"
        ))
    }
}

/// `struct VhostUserMemoryRegion`: guest address, size, frontend address, offset in the fd.
const REGION_LEN: usize = 32;
/// The memory table's header: region count and padding.
const TABLE_HEADER_LEN: usize = 8;

fn check_mem_table(payload: &[u8], fds: &[OwnedFd]) -> Result<(), Refusal> {
    let count = u32_at(payload, 0).ok_or("SET_MEM_TABLE shorter than its header")? as usize;
    if count != fds.len() {
        return Err(format!("{count} memory regions but {} fds", fds.len()));
    }
    for (i, fd) in fds.iter().enumerate() {
        let at = TABLE_HEADER_LEN + i * REGION_LEN;
        let (Some(size), Some(offset)) = (u64_at(payload, at + 8), u64_at(payload, at + 24)) else {
            return Err(format!("memory region {i} is cut short"));
        };
        check_inside_file(&format!("memory region {i}"), fd, size, offset)?;
    }
    Ok(())
}

/// A SET_LOG_BASE's `VhostUserLog`: the log's size and its offset in the fd.
pub fn log_range(payload: &[u8]) -> Option<(u64, u64)> {
    Some((u64_at(payload, 0)?, u64_at(payload, 8)?))
}

fn check_log_base(payload: &[u8], fds: &[OwnedFd]) -> Result<(), Refusal> {
    let Some((size, offset)) = log_range(payload) else {
        return Err("SET_LOG_BASE is cut short".into());
    };
    match fds {
        [fd] => check_inside_file("the dirty log", fd, size, offset),
        _ => Err(format!("SET_LOG_BASE with {} fds", fds.len())),
    }
}

/// `[offset, offset + size)` lies in `fd`'s file, which is then sealed against shrinking.
fn check_inside_file(what: &str, fd: &OwnedFd, size: u64, offset: u64) -> Result<(), Refusal> {
    let file_len = file_size(fd).map_err(|e| format!("{what}: fstat: {e}"))?;
    let end = offset.checked_add(size);
    if end.is_none_or(|end| end > file_len) {
        return Err(format!(
            "{what} ({size} bytes at offset {offset}) lies past the end of its {file_len}-byte file"
        ));
    }
    seal_against_shrinking(fd);
    Ok(())
}

/// Whether `fd` is an eventfd (what /proc says the fd is).
fn is_eventfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd this function borrows; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with an integer argument on the same fd.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn file_size(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: libc::stat is plain data; fstat fills it for an fd this function borrows.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a live local.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// Adds `F_SEAL_SHRINK` to a memfd that allows sealing (QEMU's memfd backend seals by
/// default; other frontends may not). Files that are not memfds, and memfds created without
/// `MFD_ALLOW_SEALING`, are left as they are: README says what that leaves open.
fn seal_against_shrinking(fd: &OwnedFd) {
    // SAFETY: F_ADD_SEALS with an integer argument on an fd this function borrows; it fails
    // harmlessly (EINVAL, EPERM) on files that cannot be sealed.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    if rc < 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "guest memory file not sealed against shrinking");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn owned(raw: libc::c_int) -> OwnedFd {
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh fd returned by the call above, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: plain eventfd(2).
        owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) })
    }

    fn memfd(len: i64, flags: libc::c_uint) -> OwnedFd {
        // SAFETY: plain memfd_create(2) with a NUL-terminated name.
        let fd = owned(unsafe { libc::memfd_create(c"xvdpa-test".as_ptr(), flags) });
        // SAFETY: ftruncate on the fd just created.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }, 0);
        fd
    }

    #[test]
    fn send_rarp_needs_the_feature_eight_bytes_no_fd_and_a_unicast_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let payload = [&mac[..], &[0, 0]].concat();
        assert_eq!(check_send_rarp(&payload, &[], true), Ok(MacAddr(mac)));
        let refused = |payload: &[u8], fds: &[OwnedFd], acked: bool| {
            check_send_rarp(payload, fds, acked).unwrap_err()
        };
        assert!(refused(&payload, &[], false).contains("without the RARP protocol feature"));
        assert!(refused(&mac, &[], true).contains("6 bytes"));
        assert!(refused(&[payload.clone(), vec![0]].concat(), &[], true).contains("9 bytes"));
        assert!(refused(&payload, &[eventfd()], true).contains("1 fds"));
        assert!(refused(&[0xff; 8], &[], true).contains("group"));
        assert!(refused(&[0; 8], &[], true).contains("zero"));
    }

    fn vring_fd_payload(ring: u64, nofd: bool) -> Vec<u8> {
        (ring | if nofd { VRING_NOFD } else { 0 })
            .to_le_bytes()
            .to_vec()
    }

    fn mem_table(regions: &[(u64, u64)]) -> Vec<u8> {
        let mut p = (regions.len() as u32).to_le_bytes().to_vec();
        p.extend([0u8; 4]);
        for &(size, offset) in regions {
            for v in [0x1000_0000u64, size, 0x7f00_0000_0000, offset] {
                p.extend(v.to_le_bytes());
            }
        }
        p
    }

    #[test]
    fn the_dirty_log_must_lie_inside_its_file() {
        let log = |size: u64, offset: u64| {
            let mut p = size.to_le_bytes().to_vec();
            p.extend(offset.to_le_bytes());
            p
        };
        let file = || memfd(8192, libc::MFD_ALLOW_SEALING);
        assert!(check_request(REQ_SET_LOG_BASE, &log(8192, 0), &[file()], 256).is_ok());
        assert!(check_request(REQ_SET_LOG_BASE, &log(8192, 4096), &[file()], 256).is_err());
        assert!(check_request(REQ_SET_LOG_BASE, &log(u64::MAX, 1), &[file()], 256).is_err());
        assert!(check_request(REQ_SET_LOG_BASE, &log(4096, 0), &[], 256).is_err());
        assert!(check_request(REQ_SET_LOG_BASE, &log(4096, 0)[..8], &[file()], 256).is_err());
    }

    #[test]
    fn kick_and_call_fds_must_be_eventfds_and_become_non_blocking() {
        let efd = eventfd();
        for req in [REQ_SET_VRING_KICK, REQ_SET_VRING_CALL, REQ_SET_VRING_ERR] {
            check_request(
                req,
                &vring_fd_payload(1, false),
                std::slice::from_ref(&efd),
                256,
            )
            .unwrap();
        }
        // SAFETY: F_GETFL on a live fd.
        let flags = unsafe { libc::fcntl(efd.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);

        // A pipe with one byte in it: the 8-byte kick read would block.
        let mut ends = [0; 2];
        // SAFETY: pipe(2) into a live array of two ints.
        assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0);
        let (read_end, _write_end) = (owned(ends[0]), owned(ends[1]));
        let e = check_request(
            REQ_SET_VRING_KICK,
            &vring_fd_payload(0, false),
            &[read_end],
            256,
        )
        .unwrap_err();
        assert!(e.contains("not an eventfd"), "{e}");

        // The no-fd flag and the fds must agree.
        assert!(check_request(REQ_SET_VRING_CALL, &vring_fd_payload(0, true), &[], 256).is_ok());
        assert!(check_request(REQ_SET_VRING_CALL, &vring_fd_payload(0, false), &[], 256).is_err());
        assert!(check_request(
            REQ_SET_VRING_CALL,
            &vring_fd_payload(0, true),
            &[eventfd()],
            256
        )
        .is_err());
        assert!(check_request(REQ_SET_VRING_CALL, &[1, 2], &[], 256).is_err());
    }

    #[test]
    fn ring_sizes_must_be_powers_of_two_within_the_maximum() {
        let num = |ring: u32, n: u32| {
            let mut p = ring.to_le_bytes().to_vec();
            p.extend(n.to_le_bytes());
            check_request(REQ_SET_VRING_NUM, &p, &[], 1024)
        };
        assert!(num(0, 256).is_ok());
        assert!(num(1, 1024).is_ok());
        assert!(num(0, 1).is_ok());
        for bad in [0, 100, 2048, u32::MAX] {
            assert!(num(0, bad).is_err(), "{bad}");
        }
        assert!(check_request(REQ_SET_VRING_NUM, &[0; 6], &[], 1024).is_err());
    }

    #[test]
    fn memory_regions_must_lie_inside_their_files_and_memfds_get_sealed() {
        let fd = memfd(1 << 20, libc::MFD_ALLOW_SEALING);
        check_request(
            REQ_SET_MEM_TABLE,
            &mem_table(&[(1 << 19, 1 << 19)]),
            &[fd.try_clone().unwrap()],
            256,
        )
        .unwrap();
        // SAFETY: F_GET_SEALS on a live fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0, "sealed against shrinking");

        // One byte past the end, an offset that overflows, a count that lies.
        let small = || memfd(1 << 20, 0);
        let e = check_request(
            REQ_SET_MEM_TABLE,
            &mem_table(&[(1 << 20, 1)]),
            &[small()],
            256,
        )
        .unwrap_err();
        assert!(e.contains("past the end"), "{e}");
        assert!(check_request(
            REQ_SET_MEM_TABLE,
            &mem_table(&[(1 << 12, u64::MAX - 10)]),
            &[small()],
            256
        )
        .is_err());
        assert!(check_request(REQ_SET_MEM_TABLE, &mem_table(&[(4096, 0)]), &[], 256).is_err());
        let mut short = mem_table(&[(4096, 0)]);
        short.truncate(20);
        assert!(check_request(REQ_SET_MEM_TABLE, &short, &[small()], 256).is_err());
        // A memfd that cannot be sealed is still accepted when it fits.
        assert!(
            check_request(REQ_SET_MEM_TABLE, &mem_table(&[(4096, 0)]), &[small()], 256).is_ok()
        );
    }
}
