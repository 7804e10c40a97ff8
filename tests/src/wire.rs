//! The far end of the lab's cable: a raw AF_PACKET socket on `wire0` in the wire namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::frames::{test_seq, untag};
use crate::lab::{Lab, WIRE};
use crate::netns::in_netns;

pub struct WireSocket {
    fd: OwnedFd,
    /// Each frame comes with the kernel's `struct virtio_net_hdr` (10 bytes) in front
    /// ([`WireSocket::open_with_vnet_hdr`]).
    vnet_hdr: bool,
}

/// Bytes of the `struct virtio_net_hdr` a [`WireSocket::open_with_vnet_hdr`] socket puts in
/// front of each frame.
pub const VNET_HDR_LEN: usize = 10;

impl WireSocket {
    /// Opens a socket that sees every frame arriving on (and sent from) the lab's wire end.
    pub fn open(lab: &Lab) -> io::Result<Self> {
        Self::open_on(lab, WIRE)
    }

    /// [`WireSocket::open`] on device `dev` of the wire namespace, e.g. one port of a
    /// bridged lab's bridge: what it sends goes down that one cable.
    pub fn open_on(lab: &Lab, dev: &str) -> io::Result<Self> {
        Self::open_with(lab, dev, false)
    }

    /// [`WireSocket::open`] with `PACKET_VNET_HDR`: every frame received comes after a
    /// `struct virtio_net_hdr` ([`VNET_HDR_LEN`] bytes) saying how the kernel holds it, and a
    /// GSO skb arrives whole (its `gso_type` and `gso_size` in that header).
    pub fn open_with_vnet_hdr(lab: &Lab) -> io::Result<Self> {
        Self::open_with(lab, WIRE, true)
    }

    fn open_with(lab: &Lab, dev: &str, vnet_hdr: bool) -> io::Result<Self> {
        let dev = dev.to_string();
        in_netns(&lab.wire_ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2).
            let raw = unsafe {
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto)
            };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if vnet_hdr {
                const PACKET_VNET_HDR: libc::c_int = 15;
                let one: libc::c_int = 1;
                // SAFETY: setsockopt with a live int of the size passed.
                if unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_PACKET,
                        PACKET_VNET_HDR,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as u32,
                    )
                } != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            let ifindex = crate::netns::ifindex(&dev)?;
            // SAFETY: zeroed sockaddr_ll is valid; fields set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: bind with a correctly sized address.
            if unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of_val(&addr) as u32,
                )
            } != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The kernel moves a received 802.1Q tag into metadata; ask for it so frames can
            // be shown as they were on the wire.
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a live int of the size passed.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            Ok(WireSocket { fd, vnet_hdr })
        })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: send from a live buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives frames until `done` says enough or `timeout` passes; frames this side sent
    /// itself are skipped. Returns everything received.
    pub fn recv_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            if let Some(frame) = self.recv_one(&mut buf) {
                got.push(frame);
            }
        }
        got
    }

    /// Receives until `stop` is set, keeping only the frames `keep` picks (with when each
    /// arrived): a watch over a busy wire that does not hold on to everything else.
    pub fn watch(
        &self,
        stop: &std::sync::atomic::AtomicBool,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Vec<(Instant, Vec<u8>)> {
        let mut kept = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            while let Some(frame) = self.recv_one(&mut buf) {
                if keep(&frame) {
                    kept.push((Instant::now(), frame));
                }
            }
        }
        kept
    }

    /// The test frames carrying sequence number `seq`, tagged or not, received until one
    /// arrives or `within` passes (a frame that must not arrive is watched for that long).
    pub fn frames_with_seq(&self, seq: u32, within: Duration) -> Vec<Vec<u8>> {
        let has = |f: &Vec<u8>| {
            test_seq(f).or_else(|| untag(f).and_then(|(_, u)| test_seq(&u))) == Some(seq)
        };
        self.recv_until(within, |g| g.iter().any(has))
            .into_iter()
            .filter(has)
            .collect()
    }

    /// One received frame as it was on the wire (its VLAN tag, if any, put back in place);
    /// `None` for nothing waiting or a frame this side sent.
    fn recv_one(&self, buf: &mut [u8]) -> Option<Vec<u8>> {
        // SAFETY: zeroed sockaddr_ll / msghdr are valid starting values; fields set below.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of_val(&from) as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: recvmsg into buffers that live for the call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            return None;
        }
        let data = &buf[..n as usize];
        // The tag goes back after the MAC addresses, behind the net header if there is one.
        let macs_end = if self.vnet_hdr { VNET_HDR_LEN + 12 } else { 12 };
        // SAFETY: walking the control messages the kernel wrote into `control`.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg points into `control` (CMSG_FIRSTHDR/NXTHDR bound it).
            let hdr = unsafe { &*cmsg };
            if hdr.cmsg_level == libc::SOL_PACKET && hdr.cmsg_type == libc::PACKET_AUXDATA {
                // SAFETY: PACKET_AUXDATA carries a tpacket_auxdata.
                let aux: libc::tpacket_auxdata =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
                const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
                if aux.tp_status & TP_STATUS_VLAN_VALID != 0 && data.len() >= macs_end {
                    let tpid = if aux.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                        aux.tp_vlan_tpid
                    } else {
                        0x8100
                    };
                    let mut f = data[..macs_end].to_vec();
                    f.extend_from_slice(&tpid.to_be_bytes());
                    f.extend_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                    f.extend_from_slice(&data[macs_end..]);
                    return Some(f);
                }
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        Some(data.to_vec())
    }
}
