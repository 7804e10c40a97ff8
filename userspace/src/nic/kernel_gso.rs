//! TSO frames from a guest handed to the kernel whole, as one GSO skb each.
//!
//! AF_XDP carries no GSO metadata: a TSO frame sent through it must be cut into MSS-sized
//! frames by the daemon, each of which becomes an skb of its own that the receiver's stack
//! handles one by one. An AF_PACKET socket with `PACKET_VNET_HDR` takes a
//! `struct virtio_net_hdr` in front of each frame and turns frame and header into a GSO skb
//! (`virtio_net_hdr_to_skb`), as a tap's vnet header does: a NIC with TSO cuts it in hardware,
//! any other device gets it cut once by the kernel's software GSO at the driver.
//!
//! The socket only sends: bound with protocol 0, the kernel registers no receive hook for it.
//! It goes through the qdisc, not around it (`PACKET_QDISC_BYPASS`): the bypass sends with
//! `__dev_direct_xmit`, which drops every skb that `validate_xmit_skb` had to change, so on a
//! device without TSO (or with transmit checksumming off) every GSO frame would be lost
//! instead of cut in software (tested: `tso_frames_the_kernel_cuts_reach_the_wire_finished`).
//! It never blocks: a frame the kernel cannot take at once (socket buffer full, or the qdisc
//! dropped it) is dropped and counted.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::packet_socket::{self, check, setsockopt};
use crate::datapath::tx::KernelGsoFrame;
use crate::nic::vlan;

/// Frames handed to the kernel in one `sendmmsg`; a batch of the datapath collects at most
/// this many.
pub const GSO_SEND_BATCH: usize = 32;

/// Bytes of `struct virtio_net_hdr` (without `num_buffers`), what `PACKET_VNET_HDR` expects.
const VNET_HDR_LEN: usize = 10;

/// The send buffer asked for: room for 64 64-KiB frames the device has not yet freed (a
/// NIC frees an skb when its DMA completes). The kernel caps `SO_SNDBUF` at `wmem_max`;
/// `SO_SNDBUFFORCE` (with CAP_NET_ADMIN) is tried first.
const SEND_BUFFER: libc::c_int = 4 << 20;

const PACKET_VNET_HDR: libc::c_int = 15;

/// What one [`KernelGsoSocket::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GsoSent {
    /// Frames the kernel took.
    pub sent: u64,
    /// Frames it refused, and their bytes (without tags).
    pub dropped: u64,
    pub dropped_bytes: u64,
}

/// The send-only AF_PACKET socket of one queue pair, bound to the NIC.
pub struct KernelGsoSocket {
    fd: OwnedFd,
    /// The send buffer the kernel granted (it doubles what it is asked for, for its
    /// bookkeeping), in bytes of skb memory.
    send_buffer: usize,
}

/// What an skb of a frame costs the send buffer beyond the frame's bytes (its `truesize`:
/// the skb, its shared info and page rounding), counted generously.
const SKB_OVERHEAD: usize = 2048;

impl KernelGsoSocket {
    /// Opens the socket on interface `ifindex` (needs CAP_NET_RAW).
    pub fn open(ifindex: u32) -> io::Result<Self> {
        // Protocol 0, also once bound: no frame is ever delivered to this socket.
        let fd = packet_socket::open()?;
        let raw = fd.as_raw_fd();
        setsockopt(raw, libc::SOL_PACKET, PACKET_VNET_HDR, &1)?;
        if setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &SEND_BUFFER).is_err() {
            setsockopt(raw, libc::SOL_SOCKET, libc::SO_SNDBUF, &SEND_BUFFER)?;
        }
        packet_socket::bind(&fd, ifindex, 0)?;
        let send_buffer = packet_socket::getsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
        Ok(KernelGsoSocket {
            fd,
            send_buffer: usize::try_from(send_buffer).unwrap_or(0),
        })
    }

    /// Frame bytes the kernel takes now, in frames of up to 64 KiB: the send buffer not held
    /// by frames the device has not freed yet (`SIOCOUTQ`), less each frame's skb overhead.
    /// 0 if the kernel cannot say. A frame beyond it would be refused (`EAGAIN`); the
    /// datapath cuts such a frame itself instead.
    pub fn room(&self) -> usize {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one c_int into `queued`, which lives for the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if ret < 0 || queued < 0 {
            return 0;
        }
        let free = self.send_buffer.saturating_sub(queued as usize);
        // Each 64 KiB frame costs up to SKB_OVERHEAD more than its bytes.
        free.saturating_sub(free.div_ceil(65536) * SKB_OVERHEAD)
    }

    /// Sends `frames`, whose bytes are in `arena`, in order, [`GSO_SEND_BATCH`] per call. A
    /// frame the kernel refuses is dropped; once the socket's buffer is full (`EAGAIN`) the
    /// rest of the batch is too, rather than the worker waiting for room.
    pub fn send(&mut self, frames: &[KernelGsoFrame], arena: &[u8]) -> GsoSent {
        let mut done = GsoSent::default();
        let mut rest = frames;
        while !rest.is_empty() {
            let refused = match self.send_some(rest, arena) {
                Ok(n) if n > 0 => {
                    let n = n.min(rest.len());
                    done.sent += n as u64;
                    rest = &rest[n..];
                    continue;
                }
                Ok(_) => 1,
                // The socket's buffer is full: so it stays for the rest of this batch.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => rest.len(),
                // The device's queue was full (ENOBUFS), or the kernel refused this frame:
                // the next may go.
                Err(e) => {
                    tracing::debug!(error = %e, "the kernel refused a GSO frame");
                    1
                }
            };
            let (gone, left) = rest.split_at(refused);
            done.dropped += refused as u64;
            done.dropped_bytes += gone.iter().map(|f| f.len as u64).sum::<u64>();
            rest = left;
        }
        done
    }

    /// One `sendmmsg` of up to [`GSO_SEND_BATCH`] frames; how many the kernel took (at least
    /// one), or the error of the first.
    fn send_some(&mut self, frames: &[KernelGsoFrame], arena: &[u8]) -> io::Result<usize> {
        let n = frames.len().min(GSO_SEND_BATCH);
        let mut headers = [[0u8; VNET_HDR_LEN]; GSO_SEND_BATCH];
        let mut tags = [[0u8; vlan::TAG_LEN]; GSO_SEND_BATCH];
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iovs = [[empty; 4]; GSO_SEND_BATCH];
        // SAFETY: mmsghdr is plain data; zeroed is a valid starting value.
        let mut msgs: [libc::mmsghdr; GSO_SEND_BATCH] = unsafe { std::mem::zeroed() };
        for (i, f) in frames[..n].iter().enumerate() {
            headers[i].copy_from_slice(&f.header.to_bytes(0)[..VNET_HDR_LEN]);
            let bytes = f.bytes(arena);
            // The tag goes after the MAC addresses; the header's offsets already count it.
            let (macs, rest) = match f.vlan {
                Some(vid) => {
                    tags[i] = vlan::vlan_tag(vid);
                    bytes.split_at(12)
                }
                None => (bytes, &[][..]),
            };
            let tag_len = if f.vlan.is_some() { vlan::TAG_LEN } else { 0 };
            iovs[i] = [
                iovec(&headers[i]),
                iovec(macs),
                iovec(&tags[i][..tag_len]),
                iovec(rest),
            ];
            msgs[i].msg_hdr.msg_iov = iovs[i].as_mut_ptr();
            msgs[i].msg_hdr.msg_iovlen = iovs[i].len();
        }
        // SAFETY: `msgs[..n]` point at iovecs over `headers`, `tags` and `arena`, all alive
        // and unchanged until the call returns; the kernel only reads them.
        let sent = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        check(sent).map(|s| s as usize)
    }
}

/// An iovec over bytes the kernel only reads.
fn iovec(bytes: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    }
}
