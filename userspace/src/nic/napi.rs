//! A NIC queue's NAPI settings, read and changed through the kernel's netdev netlink family
//! (`napi-get`, `napi-set`; Linux 6.13+), so that the worker's busy polling can take the
//! queue's receive work over while frames flow and hand it back when they stop.
//!
//! What the daemon sets, per NAPI instance of a queue it serves (and puts back at exit):
//! - `defer-hard-irqs`: after a busy poll, or a poll that found work, the queue's interrupt
//!   (on veth: the producer's NAPI schedule) stays off for this many empty polls, which a
//!   timer on the polling CPU runs instead of the producer's CPU;
//! - `gro-flush-timeout`: that timer's period.
//!
//!
//! Only where the worker's socket carries the queue's NAPI id: busy polling cannot reach any
//! other, and without it deferring the interrupt would only batch the producer's softirq.
//!
//! `irq-suspend-timeout` is left alone: only epoll's own busy polling (`EPIOCSPARAMS`) honours
//! it, and the worker's epoll loop belongs to the vhost-user library, which sleeps on more
//! than the NIC's sockets. Every libc call sits in [`Netlink`].
//!
//! The same family's `dev-get` says how many pieces one zero-copy frame may have on a NIC
//! (`xdp-zc-max-segs`), which the single-copy path's transmit from guest memory keeps to.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// Generic netlink's controller, which names families.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// include/uapi/linux/netdev.h
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
const NETDEV_A_DEV_XDP_ZC_MAX_SEGS: u16 = 4;
/// `NETDEV_XDP_ACT_XSK_ZEROCOPY` in `xdp-features`.
pub const XDP_ACT_XSK_ZEROCOPY: u64 = 1 << 3;
const NETDEV_CMD_NAPI_GET: u8 = 11;
const NETDEV_CMD_NAPI_SET: u8 = 14;
const NETDEV_A_NAPI_IFINDEX: u16 = 1;
const NETDEV_A_NAPI_ID: u16 = 2;
const NETDEV_A_NAPI_DEFER_HARD_IRQS: u16 = 5;
const NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT: u16 = 6;
const NETDEV_A_NAPI_IRQ_SUSPEND_TIMEOUT: u16 = 7;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// What the kernel reports of one NAPI instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NapiInfo {
    pub id: u32,
    pub ifindex: u32,
    pub settings: NapiSettings,
}

/// The per-NAPI knobs the daemon sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NapiSettings {
    pub defer_hard_irqs: u32,
    pub gro_flush_timeout_ns: u64,
    /// Read for the record; never changed (see the module's comment).
    pub irq_suspend_timeout_ns: u64,
}

/// What the kernel reports of one network device's XDP abilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    pub ifindex: u32,
    /// `NETDEV_XDP_ACT_*` bits.
    pub xdp_features: u64,
    /// Most descriptors of one frame a zero-copy socket on the device takes; the kernel
    /// reports it only for a device with zero-copy (`XDP_ACT_XSK_ZEROCOPY`).
    pub xdp_zc_max_segs: Option<u32>,
}

/// Why a NAPI instance (or a device) could not be read or set.
#[derive(Debug, thiserror::Error)]
pub enum NapiError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("the kernel has no netdev netlink family (Linux 6.13+ sets NAPI knobs per queue)")]
    NoFamily,
    #[error("dev-get of interface {ifindex}: {source}")]
    Device { ifindex: u32, source: io::Error },
    #[error("{op} NAPI {id}: {source}")]
    Request {
        op: &'static str,
        id: u32,
        source: io::Error,
    },
}

/// A generic netlink socket talking to the netdev family.
pub struct Netlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl Netlink {
    /// Opens a socket and looks the netdev family up.
    pub fn open() -> Result<Self, NapiError> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(NapiError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut nl = Netlink {
            fd,
            family: GENL_ID_CTRL,
            seq: 0,
        };
        let mut msg = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 0);
        msg.attr(CTRL_ATTR_FAMILY_NAME, b"netdev\0");
        let replies = nl.exchange(msg).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => NapiError::NoFamily,
            _ => NapiError::Socket(e),
        })?;
        nl.family = replies
            .iter()
            .find_map(|r| attr(r, CTRL_ATTR_FAMILY_ID))
            .and_then(|v| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))
            .ok_or(NapiError::NoFamily)?;
        Ok(nl)
    }

    /// One NAPI instance's settings.
    pub fn napi_get(&mut self, id: u32) -> Result<NapiInfo, NapiError> {
        let mut msg = Message::new(self.family, NETDEV_CMD_NAPI_GET, 0);
        msg.attr(NETDEV_A_NAPI_ID, &id.to_ne_bytes());
        let replies = self.exchange(msg).map_err(|source| NapiError::Request {
            op: "napi-get",
            id,
            source,
        })?;
        replies
            .first()
            .map(|r| parse_napi(r))
            .ok_or_else(|| NapiError::Request {
                op: "napi-get",
                id,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"),
            })
    }

    /// The XDP abilities of the interface `ifindex` (`dev-get`).
    pub fn dev_get(&mut self, ifindex: u32) -> Result<DeviceInfo, NapiError> {
        let mut msg = Message::new(self.family, NETDEV_CMD_DEV_GET, 0);
        msg.attr(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes());
        let replies = self
            .exchange(msg)
            .map_err(|source| NapiError::Device { ifindex, source })?;
        replies
            .first()
            .map(|r| parse_device(r))
            .ok_or_else(|| NapiError::Device {
                ifindex,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "no answer"),
            })
    }

    /// Every NAPI instance of the interface `ifindex`.
    pub fn napis_of(&mut self, ifindex: u32) -> Result<Vec<NapiInfo>, NapiError> {
        let mut msg = Message::new(self.family, NETDEV_CMD_NAPI_GET, libc::NLM_F_DUMP as u16);
        msg.attr(NETDEV_A_NAPI_IFINDEX, &ifindex.to_ne_bytes());
        let replies = self.exchange(msg).map_err(|source| NapiError::Request {
            op: "napi-get (dump)",
            id: 0,
            source,
        })?;
        Ok(replies.iter().map(|r| parse_napi(r)).collect())
    }

    /// Sets `defer-hard-irqs` and `gro-flush-timeout` of NAPI `id`.
    pub fn napi_set(&mut self, id: u32, s: NapiSettings) -> Result<(), NapiError> {
        let mut msg = Message::new(self.family, NETDEV_CMD_NAPI_SET, 0);
        msg.attr(NETDEV_A_NAPI_ID, &id.to_ne_bytes());
        msg.attr(
            NETDEV_A_NAPI_DEFER_HARD_IRQS,
            &s.defer_hard_irqs.to_ne_bytes(),
        );
        msg.attr(
            NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT,
            &s.gro_flush_timeout_ns.to_ne_bytes(),
        );
        self.exchange(msg)
            .map(drop)
            .map_err(|source| NapiError::Request {
                op: "napi-set",
                id,
                source,
            })
    }

    /// Sends `msg` (asking for an acknowledgement) and collects the payloads of the answers
    /// (each starting at its generic netlink header) until the ack, the error or the end of
    /// a dump.
    fn exchange(&mut self, mut msg: Message) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        // SAFETY: send(2) reads `bytes.len()` bytes from a live buffer; the kernel is the
        // default destination of an unbound netlink socket.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 32 << 10];
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap_or_default());
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let body = &rest[NLMSG_HDRLEN..len];
                rest = &rest[align4(len).min(rest.len())..];
                if seq != self.seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                            .unwrap_or(-libc::EINVAL);
                        return if code == 0 {
                            Ok(replies)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(body.to_vec()),
                }
            }
            // A `do` answers with its reply, then the ack; a dump ends with NLMSG_DONE.
        }
    }
}

/// One generic netlink request being built.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(family: u16, cmd: u8, extra_flags: u16) -> Self {
        let flags = libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16 | extra_flags;
        let mut bytes = vec![0u8; NLMSG_HDRLEN];
        bytes[4..6].copy_from_slice(&family.to_ne_bytes());
        bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&[cmd, 1, 0, 0]);
        Message { bytes }
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = (4 + value.len()) as u16;
        self.bytes.extend_from_slice(&len.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(align4(self.bytes.len()), 0);
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.bytes
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The value of attribute `kind` in a reply (generic netlink header first).
fn attr(reply: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = reply.get(GENL_HDRLEN..)?;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let t = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if t == kind {
            return Some(&rest[4..len]);
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    None
}

/// An unsigned attribute of 4 or 8 bytes (netlink's `uint`), 0 when absent.
fn uint(reply: &[u8], kind: u16) -> u64 {
    match attr(reply, kind) {
        Some(v) if v.len() == 8 => u64::from_ne_bytes(v.try_into().unwrap_or_default()),
        Some(v) if v.len() == 4 => u64::from(u32::from_ne_bytes(v.try_into().unwrap_or_default())),
        _ => 0,
    }
}

fn parse_napi(reply: &[u8]) -> NapiInfo {
    NapiInfo {
        id: uint(reply, NETDEV_A_NAPI_ID) as u32,
        ifindex: uint(reply, NETDEV_A_NAPI_IFINDEX) as u32,
        settings: NapiSettings {
            defer_hard_irqs: uint(reply, NETDEV_A_NAPI_DEFER_HARD_IRQS) as u32,
            gro_flush_timeout_ns: uint(reply, NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT),
            irq_suspend_timeout_ns: uint(reply, NETDEV_A_NAPI_IRQ_SUSPEND_TIMEOUT),
        },
    }
}

fn parse_device(reply: &[u8]) -> DeviceInfo {
    DeviceInfo {
        ifindex: uint(reply, NETDEV_A_DEV_IFINDEX) as u32,
        xdp_features: uint(reply, NETDEV_A_DEV_XDP_FEATURES),
        xdp_zc_max_segs: attr(reply, NETDEV_A_DEV_XDP_ZC_MAX_SEGS)
            .map(|_| uint(reply, NETDEV_A_DEV_XDP_ZC_MAX_SEGS) as u32),
    }
}

/// The NAPI instances the daemon changed, with what they had before; each is set once, by
/// the first worker that finds it, and put back by [`NapiTakeover::restore`] (or on drop).
pub struct NapiTakeover {
    wanted: NapiSettings,
    iface: String,
    /// NAPI id -> the settings it had.
    changed: Mutex<HashMap<u32, NapiSettings>>,
    /// Queues already handled (their NAPI set, tried, or found missing).
    queues: Mutex<Vec<u32>>,
}

impl NapiTakeover {
    pub fn new(iface: &str, wanted: NapiSettings) -> Self {
        NapiTakeover {
            wanted,
            iface: iface.to_string(),
            changed: Mutex::new(HashMap::new()),
            queues: Mutex::new(Vec::new()),
        }
    }

    /// Sets the wanted knobs on NAPI `napi`, the one a worker's socket on NIC queue `queue`
    /// carries (0: none), unless that queue was handled before. Logs what it changed, or which
    /// knob it could not set and why. Returns whether the worker's busy polls on the socket
    /// now run the queue's NAPI.
    pub fn take_over(&self, queue: u32, napi: u32) -> bool {
        {
            let mut queues = crate::sync::lock(&self.queues);
            if queues.contains(&queue) {
                return napi != 0;
            }
            queues.push(queue);
        }
        if napi == 0 {
            tracing::warn!(iface = %self.iface, queue, "the kernel gave this NIC queue's socket no NAPI id, so busy polling cannot reach the queue's NAPI and its defer-hard-irqs and gro-flush-timeout are left alone (veth with GRO off adds its NAPI with the XDP program, after registering the queue without an id): the worker polls its ring while frames come, and the queue's receive work stays on the CPU that raises it");
            return false;
        }
        let before = Netlink::open().and_then(|mut nl| {
            let before = nl.napi_get(napi)?.settings;
            nl.napi_set(napi, self.wanted)?;
            Ok(before)
        });
        match before {
            Ok(before) => {
                crate::sync::lock(&self.changed).insert(napi, before);
                tracing::info!(
                    iface = %self.iface,
                    queue,
                    napi,
                    defer_hard_irqs = %format_args!("{} -> {}", before.defer_hard_irqs, self.wanted.defer_hard_irqs),
                    gro_flush_timeout_ns = %format_args!("{} -> {}", before.gro_flush_timeout_ns, self.wanted.gro_flush_timeout_ns),
                    irq_suspend_timeout_ns = before.irq_suspend_timeout_ns,
                    "NIC queue's NAPI set for the worker's busy polling (irq-suspend-timeout left alone: only epoll's own busy polling uses it, and the worker's epoll loop is the vhost-user library's)"
                );
                true
            }
            Err(e) => {
                tracing::warn!(iface = %self.iface, queue, napi, error = %e, "cannot set the NIC queue's defer-hard-irqs and gro-flush-timeout; the worker's busy polls still run the queue's NAPI, but between them the receive work goes back to the CPU that raises it");
                true
            }
        }
    }

    /// Puts every changed NAPI instance back as it was. A queue handled before stays handled:
    /// a worker still running does not set it again.
    pub fn restore(&self) {
        let mut changed = crate::sync::lock(&self.changed);
        if changed.is_empty() {
            return;
        }
        let mut nl = match Netlink::open() {
            Ok(nl) => nl,
            Err(e) => {
                tracing::warn!(iface = %self.iface, error = %e, "cannot restore the NIC queues' NAPI settings");
                return;
            }
        };
        for (id, before) in changed.drain() {
            match nl.napi_set(id, before) {
                Ok(()) => {
                    tracing::info!(iface = %self.iface, napi = id, defer_hard_irqs = before.defer_hard_irqs, gro_flush_timeout_ns = before.gro_flush_timeout_ns, "NAPI settings restored")
                }
                // The NIC went away with its NAPI instances.
                Err(e) => {
                    tracing::warn!(iface = %self.iface, napi = id, error = %e, "cannot restore the NAPI settings")
                }
            }
        }
    }
}

impl Drop for NapiTakeover {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes_and_read_back() {
        let mut m = Message::new(20, NETDEV_CMD_NAPI_SET, 0);
        m.attr(NETDEV_A_NAPI_ID, &7u32.to_ne_bytes());
        // A string of an odd length between two numbers (type 9: no netdev NAPI attribute).
        m.attr(9, b"netdev\0");
        m.attr(NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT, &20_000u64.to_ne_bytes());
        let bytes = m.finish(1).to_vec();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        let reply = &bytes[NLMSG_HDRLEN..];
        assert_eq!(uint(reply, NETDEV_A_NAPI_ID), 7);
        assert_eq!(uint(reply, NETDEV_A_NAPI_GRO_FLUSH_TIMEOUT), 20_000);
        assert_eq!(attr(reply, 9), Some(&b"netdev\0"[..]));
        assert_eq!(uint(reply, NETDEV_A_NAPI_DEFER_HARD_IRQS), 0);
    }

    #[test]
    fn a_device_reply_names_its_zero_copy_limit_only_when_the_kernel_sent_one() {
        let mut m = Message::new(20, NETDEV_CMD_DEV_GET, 0);
        m.attr(NETDEV_A_DEV_IFINDEX, &7u32.to_ne_bytes());
        m.attr(NETDEV_A_DEV_XDP_FEATURES, &0x2bu64.to_ne_bytes());
        let without = parse_device(&m.finish(1)[NLMSG_HDRLEN..]);
        assert_eq!((without.ifindex, without.xdp_features), (7, 0x2b));
        assert_eq!(without.xdp_zc_max_segs, None);
        m.attr(NETDEV_A_DEV_XDP_ZC_MAX_SEGS, &5u32.to_ne_bytes());
        let with = parse_device(&m.finish(2)[NLMSG_HDRLEN..]);
        assert_eq!(with.xdp_zc_max_segs, Some(5));
    }

    #[test]
    fn a_truncated_attribute_reads_as_absent() {
        let reply = [0u8, 0, 0, 0, 12, 0, 2, 0, 1, 0];
        assert_eq!(attr(&reply, NETDEV_A_NAPI_ID), None);
    }
}
