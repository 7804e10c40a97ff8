//! The socket that hands a guest's TSO frames to the kernel whole (`nic::kernel_gso`), on the
//! lab's veth without a daemon: what reaches the wire, and that a frame the kernel refuses or
//! cannot queue is a counted drop which holds back neither the worker nor the frames after
//! it. Needs root (namespaces, CAP_NET_RAW).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use xvdpa::datapath::offload::{checksum, NetHeader, F_NEEDS_CSUM, GSO_TCPV4};
use xvdpa::datapath::tx::KernelGsoFrame;
use xvdpa::nic::kernel_gso::KernelGsoSocket;
use xvdpa_tests::lab::{self, guest_mac, Lab, NIC};
use xvdpa_tests::netns::{ifindex, in_netns};
use xvdpa_tests::wire::{WireSocket, VNET_HDR_LEN};

const WAIT: Duration = Duration::from_secs(3);

/// A TCP/IPv4 frame of `payload_len` bytes to the wire's MAC, its TCP checksum field holding
/// the pseudo-header sum as a guest's TSO frame has it; `seq` tells frames apart.
fn tso_frame(wire_mac: [u8; 6], seq: u32, payload_len: usize) -> Vec<u8> {
    let mut tcp = etherparse::TcpHeader::new(40000, 5201, seq, 64240);
    tcp.ack = true;
    let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + i / 253) as u8).collect();
    let mut f = Vec::new();
    etherparse::PacketBuilder::ethernet2(guest_mac(0), wire_mac)
        .ipv4([10, 77, 0, 2], [192, 0, 2, 1], 64)
        .tcp_header(tcp)
        .write(&mut f, &payload)
        .expect("frame");
    let pseudo = checksum::pseudo_header(&f[26..30], &f[30..34], 6, f.len() - 34);
    f[50..52].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    f
}

/// The header the daemon sends with such a frame.
fn gso_header() -> NetHeader {
    NetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    }
}

/// `frames` laid one after the other in an arena, each with its header.
fn arena_of(frames: &[(NetHeader, Vec<u8>)]) -> (Vec<KernelGsoFrame>, Vec<u8>) {
    let mut arena = Vec::new();
    let mut list = Vec::new();
    for (header, f) in frames {
        list.push(KernelGsoFrame {
            header: *header,
            vlan: None,
            start: arena.len(),
            len: f.len(),
        });
        arena.extend_from_slice(f);
    }
    (list, arena)
}

fn open(lab: &Lab) -> Result<KernelGsoSocket> {
    Ok(in_netns(&lab.host_ns, || {
        KernelGsoSocket::open(ifindex(NIC)?)
    })?)
}

/// The TCP sequence numbers of the test's frames the wire received whole (one GSO frame each).
fn received(wire: &WireSocket, want: usize) -> Vec<u32> {
    let ours = |f: &Vec<u8>| f.get(VNET_HDR_LEN + 6..VNET_HDR_LEN + 12) == Some(&guest_mac(0)[..]);
    let got = wire.recv_until(WAIT, |g| g.iter().filter(|f| ours(f)).count() >= want);
    got.iter()
        .filter(|f| ours(f))
        .map(|f| {
            let tcp = VNET_HDR_LEN + 34;
            u32::from_be_bytes([f[tcp + 4], f[tcp + 5], f[tcp + 6], f[tcp + 7]])
        })
        .collect()
}

#[test]
fn a_frame_the_kernel_refuses_is_dropped_and_the_frames_after_it_go() -> Result<()> {
    let lab = Lab::unique("kgso")?;
    let wire = WireSocket::open_with_vnet_hdr(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let mut sock = open(&lab)?;
    // A checksum start past the frame: the kernel's virtio_net_hdr_to_skb refuses it.
    let bad = NetHeader {
        csum_start: 40_000,
        ..gso_header()
    };
    let (list, arena) = arena_of(&[
        (gso_header(), tso_frame(wire_mac, 1, 20_000)),
        (bad, tso_frame(wire_mac, 2, 20_000)),
        (gso_header(), tso_frame(wire_mac, 3, 20_000)),
    ]);
    let sent = sock.send(&list, &arena);
    ensure!(
        (sent.sent, sent.dropped) == (2, 1),
        "sent {sent:?}, want 2 sent and the refused one dropped"
    );
    ensure!(sent.dropped_bytes == list[1].len as u64, "{sent:?}");
    let seqs = received(&wire, 2);
    ensure!(seqs == vec![1, 3], "the wire got frames {seqs:?}");
    Ok(())
}

#[test]
fn a_full_device_queue_drops_frames_without_waiting() -> Result<()> {
    let lab = Lab::unique("kgsoq")?;
    let wire_mac = lab.wire_mac()?;
    // A shaper that lets one burst of 70 kB through and queues as much again: the rest of 20
    // frames of 20 kB finds the queue full.
    lab::run(lab.in_host("tc").args([
        "qdisc", "add", "dev", NIC, "root", "tbf", "rate", "8kbit", "burst", "70000", "limit",
        "70000",
    ]))?;
    let mut sock = open(&lab)?;
    let frames: Vec<(NetHeader, Vec<u8>)> = (0..20)
        .map(|i| (gso_header(), tso_frame(wire_mac, i, 20_000)))
        .collect();
    let (list, arena) = arena_of(&frames);
    // Root gets the send buffer it asks for (SO_SNDBUFFORCE): room for dozens of frames.
    let room = sock.room();
    ensure!(room > 1 << 20, "room for {room} bytes");
    let started = Instant::now();
    let sent = sock.send(&list, &arena);
    let took = started.elapsed();
    // The frames the shaper holds still count against the socket's send buffer.
    ensure!(
        sock.room() < room - 20_000,
        "room {} after the send, {room} before",
        sock.room()
    );
    ensure!(
        sent.sent + sent.dropped == 20 && sent.dropped >= 10 && sent.sent >= 1,
        "{sent:?}"
    );
    ensure!(took < Duration::from_millis(500), "the send took {took:?}");
    Ok(())
}
