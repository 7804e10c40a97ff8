//! A message-level shim between the frontend (QEMU) and the vhost-user library.
//!
//! QEMU's virtio-net sends VHOST_USER_SET_VRING_ENABLE when the device is realized or reset,
//! before VHOST_USER_SET_FEATURES, as soon as the backend *offers* PROTOCOL_FEATURES. The
//! vhost crate (0.18) reads "negotiated" as "acknowledged by SET_FEATURES" and drops the whole
//! connection on such a message, so no QEMU guest could ever attach. The shim forwards every
//! message unchanged (with its file descriptors) except those early SET_VRING_ENABLEs: it
//! acknowledges them itself and replays the latest state per ring right after SET_FEATURES,
//! which is exactly what the spec asks the ring state to be at that point.
//!
//! It also answers `SEND_RARP`, which the library does not know (it would end the
//! connection): the request goes to the port's first queue pair, which sends the RARP. And it
//! maps the dirty log of each `SET_LOG_BASE` for the backend before forwarding it: the
//! library attaches a log only to the memory it has when the log arrives, and the backend
//! attaches this one to the memory tables that come after it (`datapath::dirty_log`).

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::frontend_checks::{
    check_request, check_send_rarp, log_range, REQ_SEND_RARP, REQ_SET_LOG_BASE,
    REQ_SET_PROTOCOL_FEATURES, REQ_SET_VRING_ERR,
};
use crate::datapath::dirty_log::{FrontendLog, FrontendLogSlot};
use crate::switch::AnnounceRequests;
use crate::vring::RingErrorFds;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

const HDR_LEN: usize = 12;
/// Largest payload any vhost-user message has (SET_MEM_TABLE with 8 regions is ~330 bytes;
/// GET/SET_CONFIG up to 256); anything beyond this is a broken peer.
const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One vhost-user message with its header fields decoded.
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn header(&self) -> [u8; HDR_LEN] {
        let mut h = [0u8; HDR_LEN];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads one message; `Ok(None)` on a clean end of stream.
fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; HDR_LEN];
    // Room for MAX_FDS descriptors in one SCM_RIGHTS message.
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HDR_LEN,
    };
    // SAFETY: msghdr is plain data; all pointers set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: recvmsg into the buffers described by `msg`.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok(None);
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(invalid(
            "too many file descriptors in one vhost-user message",
        ));
    }
    let mut got = n as usize;
    let mut rd = sock;
    while got < HDR_LEN {
        let m = rd.read(&mut hdr[got..])?;
        if m == 0 {
            return Err(invalid("vhost-user header cut short"));
        }
        got += m;
    }
    let request = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(hdr[4..8].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_PAYLOAD {
        return Err(invalid("vhost-user payload too large"));
    }
    let mut payload = vec![0u8; size];
    rd.read_exact(&mut payload)?;
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

fn send_message(sock: &UnixStream, m: &Message) -> io::Result<()> {
    let hdr = m.header();
    let mut iov = [
        libc::iovec {
            iov_base: hdr.as_ptr() as *mut _,
            iov_len: HDR_LEN,
        },
        libc::iovec {
            iov_base: m.payload.as_ptr() as *mut _,
            iov_len: m.payload.len(),
        },
    ];
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    // SAFETY: msghdr is plain data; all pointers set below point at live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = 2;
    if !m.fds.is_empty() {
        let bytes = m.fds.len() * std::mem::size_of::<RawFd>();
        // SAFETY: fills one SCM_RIGHTS header inside `cmsg`, sized with CMSG_SPACE.
        unsafe {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in m.fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    let total = HDR_LEN + m.payload.len();
    // SAFETY: sendmsg of the buffers described by `msg`.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < total {
        // The descriptors went with the first byte; send the rest plainly.
        let mut rest = Vec::with_capacity(total - n);
        rest.extend_from_slice(&hdr);
        rest.extend_from_slice(&m.payload);
        let mut w = sock;
        w.write_all(&rest[n..])?;
    }
    Ok(())
}

/// The two forwarding threads of one connection.
pub struct Shim {
    frontend: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl Shim {
    /// Starts forwarding between `frontend` (QEMU) and `backend` (the library's connection).
    /// `num_queues` is how many virtqueues the device offers: early SET_VRING_ENABLEs for
    /// any other ring are refused rather than held.
    /// `max_queue_size` bounds SET_VRING_NUM. A duplicate of each ring's error eventfd
    /// (SET_VRING_ERR) goes into `ring_errors`, where the workers signal it; a SEND_RARP's
    /// MAC goes to `announce`; each SET_LOG_BASE's log, mapped, to `frontend_log`.
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        num_queues: u32,
        max_queue_size: u16,
        ring_errors: Arc<RingErrorFds>,
        announce: Arc<AnnounceRequests>,
        frontend_log: Arc<FrontendLogSlot>,
    ) -> io::Result<Shim> {
        let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
        let f_in = frontend.try_clone()?;
        let b_out = backend.try_clone()?;
        let b_in = backend.try_clone()?;
        let (f_close, b_close) = (frontend.try_clone()?, backend.try_clone()?);
        let (f_close2, b_close2) = (frontend.try_clone()?, backend.try_clone()?);
        let tf = to_frontend.clone();
        let down = std::thread::Builder::new()
            .name("xvdpa-shim-req".into())
            .spawn(move || {
                let limits = (num_queues, max_queue_size);
                let kept = (&*ring_errors, &*announce, &*frontend_log);
                if let Err(e) = forward_requests(&f_in, &b_out, &tf, limits, kept) {
                    tracing::debug!(error = %e, "frontend request stream ended");
                }
                let _ = f_close.shutdown(Shutdown::Both);
                let _ = b_close.shutdown(Shutdown::Both);
            })?;
        let up = std::thread::Builder::new()
            .name("xvdpa-shim-reply".into())
            .spawn(move || {
                let result = (|| -> io::Result<()> {
                    while let Some(m) = recv_message(&b_in)? {
                        send_message(&crate::sync::lock(&to_frontend), &m)?;
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    tracing::debug!(error = %e, "backend reply stream ended");
                }
                let _ = f_close2.shutdown(Shutdown::Both);
                let _ = b_close2.shutdown(Shutdown::Both);
            })?;
        Ok(Shim {
            frontend,
            backend,
            threads: vec![down, up],
        })
    }

    /// Cuts both connections and waits for the threads.
    pub fn stop(mut self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The REPLY_ACK answer to `request`: 0 for success, 1 for failure.
fn reply_ack(request: u32, ok: bool) -> Message {
    Message {
        request,
        flags: FLAG_VERSION | FLAG_REPLY,
        payload: u64::from(!ok).to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

fn nack(request: u32) -> Message {
    reply_ack(request, false)
}

/// Frontend -> library, holding back SET_VRING_ENABLE until SET_FEATURES has been seen, and
/// refusing what [`check_request`] finds unsafe (NACKed when the frontend asked for a reply,
/// else the connection ends).
/// At most one message per ring the device has (`num_queues`) is held, without fds (the
/// message carries none); one for any other ring is refused. SEND_RARP is answered here.
fn forward_requests(
    from: &UnixStream,
    to: &UnixStream,
    reply: &Mutex<UnixStream>,
    (num_queues, max_queue_size): (u32, u16),
    (ring_errors, announce, frontend_log): (&RingErrorFds, &AnnounceRequests, &FrontendLogSlot),
) -> io::Result<()> {
    let mut features_seen = false;
    // The library takes any protocol features it is given; the last ones set are in force.
    let mut rarp_acked = false;
    // Latest early enable state per ring index (the payload is {u32 index, u32 num}).
    let mut held: BTreeMap<u32, Message> = BTreeMap::new();
    while let Some(m) = recv_message(from)? {
        if m.request == REQ_SET_VRING_ENABLE && !features_seen {
            // {u32 index, u32 num}
            let Some(&[a, b, c, d, ..]) = m.payload.first_chunk::<8>() else {
                return Err(invalid("short SET_VRING_ENABLE"));
            };
            let index = u32::from_le_bytes([a, b, c, d]);
            let known = index < num_queues;
            if m.flags & FLAG_NEED_REPLY != 0 {
                let ack = reply_ack(m.request, known);
                send_message(&crate::sync::lock(reply), &ack)?;
            }
            if known {
                let m = Message {
                    flags: m.flags & !FLAG_NEED_REPLY,
                    fds: Vec::new(),
                    ..m
                };
                held.insert(index, m);
            } else {
                tracing::warn!(
                    ring = index,
                    num_queues,
                    "SET_VRING_ENABLE for a ring the device does not have; refused"
                );
            }
            continue;
        }
        if m.request == REQ_SEND_RARP {
            match check_send_rarp(&m.payload, &m.fds, rarp_acked) {
                Ok(mac) => {
                    announce.request(mac);
                    if m.flags & FLAG_NEED_REPLY != 0 {
                        send_message(&crate::sync::lock(reply), &reply_ack(m.request, true))?;
                    }
                }
                Err(why) => refuse(&m, &why, reply)?,
            }
            continue;
        }
        if m.request == REQ_SET_PROTOCOL_FEATURES {
            if let Some(bits) = m.payload.first_chunk::<8>() {
                let rarp = VhostUserProtocolFeatures::RARP.bits();
                rarp_acked = u64::from_le_bytes(*bits) & rarp != 0;
            }
        }
        if let Err(why) = check_request(m.request, &m.payload, &m.fds, max_queue_size) {
            refuse(&m, &why, reply)?;
            continue;
        }
        if m.request == REQ_SET_VRING_ERR {
            keep_error_fd(&m, ring_errors)?;
        }
        if m.request == REQ_SET_LOG_BASE {
            if let Err(e) = keep_log(&m, frontend_log) {
                refuse(&m, &format!("cannot map the dirty log: {e}"), reply)?;
                continue;
            }
        }
        let is_features = m.request == REQ_SET_FEATURES;
        send_message(to, &m)?;
        if is_features && !features_seen {
            features_seen = true;
            for (_, m) in std::mem::take(&mut held) {
                send_message(to, &m)?;
            }
        }
    }
    Ok(())
}

/// Refuses `m`: a NACK if the frontend asked for a reply, else the end of the connection
/// (nothing to NACK: the frontend would go on as if it had been applied).
fn refuse(m: &Message, why: &str, reply: &Mutex<UnixStream>) -> io::Result<()> {
    tracing::warn!(request = m.request, %why, "frontend message refused");
    if m.flags & FLAG_NEED_REPLY == 0 {
        return Err(invalid(&format!("refused request {}: {why}", m.request)));
    }
    send_message(&crate::sync::lock(reply), &nack(m.request))
}

/// Keeps a duplicate of a (checked) SET_VRING_ERR's eventfd for the ring's workers; the
/// library keeps its own copy private. No fd (the no-fd flag) takes the ring's away.
fn keep_error_fd(m: &Message, ring_errors: &RingErrorFds) -> io::Result<()> {
    // {u64 ring index | flags}: the index is the low byte.
    let ring = m.payload.first().copied().map_or(0, usize::from);
    let fd = m.fds.first().map(OwnedFd::try_clone).transpose()?;
    ring_errors.set(ring, fd);
    Ok(())
}

/// Maps a (checked) SET_LOG_BASE's log for the backend, which attaches it to the memory
/// tables that come after it.
fn keep_log(m: &Message, frontend_log: &FrontendLogSlot) -> io::Result<()> {
    let (Some((size, offset)), Some(fd)) = (log_range(&m.payload), m.fds.first()) else {
        return Err(invalid("SET_LOG_BASE without its log"));
    };
    let log = FrontendLog::map(std::fs::File::from(fd.try_clone()?), offset, size)?;
    frontend_log.set(log);
    Ok(())
}

#[cfg(test)]
mod tests;
