//! Copies of the NIC's incoming broadcast and multicast frames, for the VMs.
//!
//! XDP cannot clone a frame, and ARP, IPv6 neighbour discovery and DHCP must reach both the
//! host and every VM. The XDP program therefore passes group-addressed frames to the host
//! stack, and this AF_PACKET socket, filtered in the kernel to exactly those frames arriving
//! on the NIC, hands the daemon a copy. They are a small share of traffic, so a plain
//! non-blocking socket is enough.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::packet_socket::{self, setsockopt};

/// Received frames larger than this are truncated by the kernel and dropped here.
const MAX_FRAME: usize = 9216;

/// Frames read per call, at most.
pub const TAP_BATCH: usize = 32;

pub struct PacketTap {
    fd: OwnedFd,
    bufs: Vec<Vec<u8>>,
    /// (buffer index, length) of the frames of the last batch.
    lens: Vec<(usize, usize)>,
}

impl PacketTap {
    /// Opens a tap on `ifindex` that sees only incoming group-addressed frames (and, when
    /// `promisc`, unicast the host does not own) of one L2 domain: tagged with `vlan`, or
    /// untagged when `vlan` is `None`. The kernel moves a
    /// received 802.1Q tag out of the frame before taps see it, so copies arrive untagged
    /// either way and the filter reads the tag from the packet's metadata.
    pub fn open(ifindex: u32, vlan: Option<u16>, promisc: bool) -> io::Result<Self> {
        // Protocol 0 receives nothing until bind, so no frame slips in before the filter.
        let fd = packet_socket::open()?;

        let filter = tap_filter(vlan, promisc);
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut _,
        };
        setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog,
        )?;
        // Frames the host itself transmits are never copies of incoming ones.
        const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
        let one: libc::c_int = 1;
        let _ = setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            &one,
        );

        packet_socket::bind(&fd, ifindex, (libc::ETH_P_ALL as u16).to_be())?;
        Ok(PacketTap {
            fd,
            bufs: vec![vec![0u8; MAX_FRAME]; TAP_BATCH],
            lens: Vec::with_capacity(TAP_BATCH),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads up to [`TAP_BATCH`] waiting frames; returns them in order.
    pub fn recv_batch(&mut self) -> impl Iterator<Item = &[u8]> {
        self.lens.clear();
        for (i, buf) in self.bufs.iter_mut().enumerate() {
            // SAFETY: recv into a buffer we own, of the length passed.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                break;
            }
            let n = n as usize;
            // Truncated (larger than MAX_FRAME): no guest buffer would take it either.
            if n > buf.len() {
                continue;
            }
            self.lens.push((i, n));
        }
        let bufs = &self.bufs;
        self.lens.iter().map(move |&(i, n)| &bufs[i][..n])
    }
}

/// Where a test in [`tap_filter`] goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum To {
    Next,
    /// The VLAN check (the frame is one the port wants, if its VLAN matches).
    Vlan,
    Reject,
}

/// Classic BPF for a port's tap: accept a frame the host did not send whose destination is
/// group-addressed (or, for a promiscuous port, a unicast the host does not own), and whose
/// VLAN (from metadata) is `vlan` (or none, for `None`).
fn tap_filter(vlan: Option<u16>, promisc: bool) -> Vec<libc::sock_filter> {
    const SKF_AD_VLAN_TAG: i32 = 44;
    const SKF_AD_VLAN_TAG_PRESENT: i32 = 48;
    let ad = |off: i32| (libc::SKF_AD_OFF + off) as u32;
    let (ld_b, ld_w) = (
        libc::BPF_LD | libc::BPF_B | libc::BPF_ABS,
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
    );
    let (jset, jeq) = (
        libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
    );
    // (instruction, where a true test goes, where a false one goes); resolved below.
    let mut prog: Vec<(libc::sock_filter, To, To)> = vec![
        (bpf_stmt(ld_b, ad(libc::SKF_AD_PKTTYPE)), To::Next, To::Next),
        (
            bpf_jump(jeq, libc::PACKET_OUTGOING as u32, 0, 0),
            To::Reject,
            To::Next,
        ),
        (bpf_stmt(ld_b, 0), To::Next, To::Next),
    ];
    if promisc {
        prog.push((bpf_jump(jset, 1, 0, 0), To::Vlan, To::Next));
        prog.push((bpf_stmt(ld_b, ad(libc::SKF_AD_PKTTYPE)), To::Next, To::Next));
        prog.push((
            bpf_jump(jeq, libc::PACKET_OTHERHOST as u32, 0, 0),
            To::Vlan,
            To::Reject,
        ));
    } else {
        prog.push((bpf_jump(jset, 1, 0, 0), To::Vlan, To::Reject));
    }
    let vlan_at = prog.len();
    prog.push((
        bpf_stmt(ld_w, ad(SKF_AD_VLAN_TAG_PRESENT)),
        To::Next,
        To::Next,
    ));
    match vlan {
        None => prog.push((bpf_jump(jeq, 0, 0, 0), To::Next, To::Reject)),
        Some(vid) => {
            prog.push((bpf_jump(jeq, 1, 0, 0), To::Next, To::Reject));
            prog.push((bpf_stmt(ld_w, ad(SKF_AD_VLAN_TAG)), To::Next, To::Next));
            prog.push((
                bpf_stmt(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0x0fff),
                To::Next,
                To::Next,
            ));
            prog.push((bpf_jump(jeq, u32::from(vid), 0, 0), To::Next, To::Reject));
        }
    }
    prog.push((
        bpf_stmt(libc::BPF_RET | libc::BPF_K, MAX_FRAME as u32),
        To::Next,
        To::Next,
    ));
    prog.push((bpf_stmt(libc::BPF_RET | libc::BPF_K, 0), To::Next, To::Next));
    let reject = prog.len() - 1;
    let offset = |i: usize, to: To| -> u8 {
        let target = match to {
            To::Next => i + 1,
            To::Vlan => vlan_at,
            To::Reject => reject,
        };
        (target - i - 1) as u8
    };
    prog.iter()
        .enumerate()
        .map(|(i, &(mut ins, t, f))| {
            if ins.code & 0x07 == libc::BPF_JMP as u16 {
                ins.jt = offset(i, t);
                ins.jf = offset(i, f);
            }
            ins
        })
        .collect()
}

fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}
