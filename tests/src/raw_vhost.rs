//! A vhost-user frontend that sends whatever bytes and fds it is told to: the attacker's side
//! of the hostile-frontend tests. It knows the message framing (header: request, flags, size;
//! fds as SCM_RIGHTS) and nothing of what makes a session valid.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SEND_RARP: u32 = 19;
pub const GET_CONFIG: u32 = 24;

/// Message flags: protocol version 1, and "answer me" (REPLY_ACK).
pub const VERSION: u32 = 0x1;
pub const NEED_REPLY: u32 = 0x8;

/// How a message was answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// A reply: its request code and payload.
    Reply(u32, Vec<u8>),
    /// The daemon closed the connection.
    Closed,
    /// Nothing within the wait.
    Silence,
}

pub struct RawFrontend {
    stream: UnixStream,
}

impl RawFrontend {
    pub fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(RawFrontend { stream })
    }

    /// Sends a header claiming `size` payload bytes, then `payload` (which may be shorter or
    /// longer than `size`: that is the point), with `fds` attached.
    pub fn send_raw(
        &mut self,
        request: u32,
        flags: u32,
        size: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        let sent = self
            .stream
            .send_with_fds(&[&msg[..]], fds)
            .map_err(io::Error::from)?;
        if sent < msg.len() {
            self.stream.write_all(&msg[sent..])?;
        }
        Ok(())
    }

    /// Sends a well-framed message.
    pub fn send(
        &mut self,
        request: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> io::Result<()> {
        self.send_raw(request, flags, payload.len() as u32, payload, fds)
    }

    /// Waits up to `wait` for a reply or for the daemon to close the connection.
    pub fn answer(&mut self, wait: Duration) -> Answer {
        let deadline = Instant::now() + wait;
        let _ = self
            .stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        let mut hdr = [0u8; 12];
        let mut got = 0;
        while got < hdr.len() {
            match self.stream.read(&mut hdr[got..]) {
                Ok(0) => return Answer::Closed,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Answer::Closed,
                Err(_) if Instant::now() >= deadline => return Answer::Silence,
                Err(_) => {}
            }
        }
        let request = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut payload = vec![0u8; size.min(4096)];
        if self.stream.read_exact(&mut payload).is_err() {
            return Answer::Closed;
        }
        Answer::Reply(request, payload)
    }

    /// Whether the daemon ends the connection within `wait`, reading (and dropping) any
    /// replies it sends before that.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answer(left) {
                Answer::Closed => return true,
                Answer::Silence => return false,
                Answer::Reply(..) if left.is_zero() => return false,
                Answer::Reply(..) => {}
            }
        }
    }
}

/// A u64 payload.
pub fn u64_payload(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A `vhost_vring_state` payload (index, num).
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// A SET_MEM_TABLE payload: (guest address, size, user address, mmap offset) per region.
pub fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, uaddr, offset) in regions {
        for v in [gpa, size, uaddr, offset] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    }
    p
}
