//! The far end of the lab's cable: a raw AF_PACKET socket on `wire0` in the wire namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::lab::{Lab, WIRE};
use crate::netns::in_netns;

pub struct WireSocket {
    fd: OwnedFd,
}

impl WireSocket {
    /// Opens a socket that sees every frame arriving on (and sent from) the lab's wire end.
    pub fn open(lab: &Lab) -> io::Result<Self> {
        in_netns(&lab.wire_ns, || {
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
            let ifindex = crate::netns::ifindex(WIRE)?;
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
            Ok(WireSocket { fd })
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
        let mut buf = vec![0u8; 65536];
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
            // SAFETY: zeroed sockaddr_ll is valid output space.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of_val(&from) as u32;
            // SAFETY: recvfrom into live buffers of the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING as u8 {
                got.push(buf[..n as usize].to_vec());
            }
        }
        got
    }
}
