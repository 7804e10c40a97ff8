//! The vhost-user message stream, as a hostile frontend sends it, into the real protocol
//! shim (`vhost::protocol_shim::Shim`), whose request thread also runs every message through
//! the frontend checks (`vhost/frontend_checks.rs`: vring fds, ring sizes, memory tables
//! against their files). The library side of the shim is drained and dropped; what matters
//! is that the shim never panics or hangs, whatever it is sent.
//!
//! Input: a run of `[fds][header 12][payload]` records. `fds`'s low two bits say how many
//! fds (0 to 3) ride with the message, the next six pick each one's kind (eventfd, pipe read
//! end, a 64 KiB memfd that allows sealing, an empty memfd). The header's size field says how
//! much payload follows (cut to what the input has; the shim sees exactly those bytes).
#![no_main]

use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use xvdpa::datapath::dirty_log::FrontendLogSlot;
use xvdpa::switch::AnnounceRequests;
use xvdpa::vhost::protocol_shim::Shim;
use xvdpa::vring::RingErrorFds;

/// How many virtqueues and how large a ring the shim is told the device has (one queue pair,
/// the daemon's defaults).
const NUM_QUEUES: u32 = 2;
const MAX_QUEUE_SIZE: u16 = 1024;

fn owned(raw: RawFd) -> Option<OwnedFd> {
    // SAFETY: `raw` is a fresh fd a syscall just returned, owned by nobody else.
    (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw) })
}

fn make_fd(kind: u8) -> Option<OwnedFd> {
    match kind & 3 {
        // SAFETY: plain eventfd(2), no memory passed.
        0 => owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) }),
        1 => {
            let mut ends = [0; 2];
            // SAFETY: pipe2(2) into a live array of two ints.
            if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // The write end closes at once; the read end is what a frontend would hand over.
            drop(owned(ends[1]));
            owned(ends[0])
        }
        k => {
            // SAFETY: memfd_create(2) with a NUL-terminated name.
            let fd = owned(unsafe {
                libc::memfd_create(
                    c"xvdpa-fuzz".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                )
            })?;
            let len = if k == 2 { 64 * 1024 } else { 0 };
            // SAFETY: ftruncate on the memfd just created.
            unsafe { libc::ftruncate(fd.as_raw_fd(), len) };
            Some(fd)
        }
    }
}

/// Sends `bytes` with `fds` attached (SCM_RIGHTS), as a frontend does; false once the shim
/// has hung up.
fn send(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> bool {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let mut cmsg = [0u64; 8];
    // SAFETY: msghdr is plain data; the pointers set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let n = (fds.len() * std::mem::size_of::<RawFd>()) as u32;
        // SAFETY: one SCM_RIGHTS header inside `cmsg` (64 bytes, CMSG_SPACE of 3 fds is 32).
        unsafe {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(n) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(n) as usize;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: sendmsg of the buffers `msg` describes, all alive for the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return false;
    }
    let mut w = sock;
    std::io::Write::write_all(&mut w, &bytes[n as usize..]).is_ok()
}

fn drain(sock: UnixStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut s = &sock;
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    })
}

fuzz_target!(|data: &[u8]| {
    static IGNORE_SIGPIPE: std::sync::Once = std::sync::Once::new();
    // As in the daemon (Rust's runtime ignores SIGPIPE; libFuzzer's main does not): a write
    // to a hung-up peer is an error, not the end of the process.
    // SAFETY: setting SIGPIPE's disposition to SIG_IGN, once, before any thread writes.
    IGNORE_SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let (frontend, shim_front) = UnixStream::pair().expect("socketpair");
    let (shim_back, library) = UnixStream::pair().expect("socketpair");
    let ring_errors = RingErrorFds::new(NUM_QUEUES as usize);
    let wake = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let announce = Arc::new(AnnounceRequests::new(wake));
    let shim = Shim::start(
        shim_front,
        shim_back,
        NUM_QUEUES,
        MAX_QUEUE_SIZE,
        ring_errors,
        announce,
        Arc::new(FrontendLogSlot::default()),
    )
    .expect("shim");
    let lib_drain = drain(library);
    let replies = drain(frontend.try_clone().expect("clone"));

    let mut rest = data;
    while let Some((&sel, after)) = rest.split_first() {
        let header_len = after.len().min(12);
        let size = if header_len == 12 {
            u32::from_le_bytes(after[8..12].try_into().expect("4 bytes")) as usize
        } else {
            0
        };
        let len = (header_len + size).min(after.len());
        let (message, next) = after.split_at(len);
        rest = next;
        let fds: Vec<OwnedFd> = (0..sel & 3)
            .filter_map(|i| make_fd(sel >> (2 + 2 * i)))
            .collect();
        if !send(&frontend, message, &fds) {
            break;
        }
    }
    let _ = frontend.shutdown(Shutdown::Write);
    // The shim ends both streams once the frontend's ends; then both drains finish.
    let _ = replies.join();
    let _ = lib_drain.join();
    shim.stop();
});
