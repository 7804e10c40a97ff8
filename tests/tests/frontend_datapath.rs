//! The project plays the VMM: a vhost-user frontend with memfd guest memory drives the real
//! daemon, whose real XDP program and AF_XDP sockets serve a veth in a lab namespace.
//! Needs root (namespaces, XDP); `cargo xtask test` runs it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::{
    arp_reply_sender, arp_request, ip_bytes, tagged, test_frame, test_seq, untag, BROADCAST,
};
use xvdpa_tests::frontend::{
    FrontendOptions, RawDesc, VirtioNetFrontend, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use xvdpa_tests::lab::{self, guest_mac, mac_str, Lab};
use xvdpa_tests::sockopts::xdp_socket_busy_poll;
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);
/// A MAC nobody in the lab uses.
const STRANGER: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];

struct Setup {
    lab: Lab,
    daemon: Daemon,
    wire: WireSocket,
    socket: std::path::PathBuf,
    wire_mac: [u8; 6],
    /// Holds the socket's directory until the test ends.
    _dir: SocketDir,
}

fn setup(tag: &str) -> Result<Setup> {
    setup_with(tag, &[])
}

fn setup_with(tag: &str, daemon_args: &[&str]) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let daemon = Daemon::start(&lab, &socket, &mac_str(guest_mac(0)), daemon_args)?;
    with_wire(lab, daemon, socket, dir)
}

/// The setup around a started daemon: the wire's socket opened.
fn with_wire(
    lab: Lab,
    daemon: Daemon,
    socket: std::path::PathBuf,
    dir: SocketDir,
) -> Result<Setup> {
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    Ok(Setup {
        lab,
        daemon,
        wire,
        socket,
        wire_mac,
        _dir: dir,
    })
}

fn connect(s: &Setup, extra_features: u64) -> Result<VirtioNetFrontend> {
    let mut opts = FrontendOptions::default();
    opts.features |= extra_features;
    let fe = VirtioNetFrontend::connect(&s.socket, opts)?;
    Ok(fe)
}

/// Sends `frames` from the wire and checks that the VM receives exactly them, in order.
fn wire_to_vm(s: &Setup, fe: &mut VirtioNetFrontend, frames: &[Vec<u8>]) -> Result<Vec<u16>> {
    for f in frames {
        s.wire.send(f)?;
    }
    let got = fe.recv_frames(frames.len(), WAIT)?;
    ensure!(
        got.len() == frames.len(),
        "VM received {} of {} frames",
        got.len(),
        frames.len()
    );
    for (i, ((_, g), f)) in got.iter().zip(frames).enumerate() {
        ensure!(
            g == f,
            "frame {i}: VM got {} bytes {:02x?}.., sent {} bytes",
            g.len(),
            &g[..g.len().min(20)],
            f.len()
        );
    }
    Ok(got.iter().map(|(n, _)| *n).collect())
}

/// The VM transmits `frame` (in `pieces` descriptors); returns the wire's frames carrying the
/// same sequence number, received until the exact frame arrived or `within` passed.
fn vm_to_wire(
    s: &Setup,
    fe: &mut VirtioNetFrontend,
    frame: &[u8],
    pieces: usize,
    within: Duration,
) -> Result<Vec<Vec<u8>>> {
    let seq = test_seq(frame);
    fe.send(frame, pieces, false)?;
    fe.kick(TX_QUEUE)?;
    let got = s.wire.recv_until(within, |g| g.iter().any(|x| x == frame));
    Ok(got.into_iter().filter(|x| test_seq(x) == seq).collect())
}

#[test]
fn device_config_space_has_mac_link_up_and_mtu() -> Result<()> {
    let s = setup("cfg")?;
    let mut fe = connect(&s, 0)?;
    let cfg = fe.config()?;
    ensure!(cfg[0..6] == guest_mac(0), "config mac {:02x?}", &cfg[0..6]);
    ensure!(
        u16::from_le_bytes([cfg[6], cfg[7]]) & 1 == 1,
        "VIRTIO_NET_S_LINK_UP not set"
    );
    ensure!(
        u16::from_le_bytes([cfg[10], cfg[11]]) == 1500,
        "mtu {}",
        u16::from_le_bytes([cfg[10], cfg[11]])
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn unicast_from_the_wire_reaches_the_vm_at_every_size() -> Result<()> {
    let s = setup("rx")?;
    let mut fe = connect(&s, VIRTIO_RING_F_EVENT_IDX)?;
    fe.post_rx_buffers(128, 2048)?;
    let sizes = [60usize, 61, 64, 128, 511, 512, 1000, 1499, 1514];
    let frames: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| test_frame(guest_mac(0), s.wire_mac, i as u32, n))
        .collect();
    let nb = wire_to_vm(&s, &mut fe, &frames)?;
    ensure!(nb.iter().all(|&n| n == 1), "num_buffers {nb:?}");

    // A burst larger than one batch, with the ring refilled as a driver would.
    let burst: Vec<Vec<u8>> = (0..300)
        .map(|i| test_frame(guest_mac(0), s.wire_mac, 1000 + i, 100))
        .collect();
    fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), 2048)?;
    let mut got = Vec::new();
    for chunk in burst.chunks(100) {
        for f in chunk {
            s.wire.send(f)?;
        }
        got.extend(fe.recv_frames(chunk.len(), WAIT)?);
        fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), 2048)?;
    }
    let seqs: Vec<u32> = got.iter().filter_map(|(_, f)| test_seq(f)).collect();
    ensure!(
        seqs == (1000..1300).collect::<Vec<_>>(),
        "burst arrived as {} frames, first {:?}",
        seqs.len(),
        &seqs[..seqs.len().min(8)]
    );
    drop(fe);
    let steered = s.daemon.counter_reaching("steered", 309)?;
    ensure!(steered >= 309, "xdp steered counter: {steered}");
    let rx_packets = s.daemon.counter_reaching("rx_packets", 309)?;
    ensure!(rx_packets >= 309, "rx_packets counter: {rx_packets}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn mergeable_rx_buffers_carry_a_full_frame_across_three_buffers() -> Result<()> {
    let s = setup("mrg")?;
    let mut fe = connect(&s, VIRTIO_NET_F_MRG_RXBUF)?;
    ensure!(
        fe.has(VIRTIO_NET_F_MRG_RXBUF),
        "device does not offer MRG_RXBUF"
    );
    fe.post_rx_buffers(64, 512)?;
    let frames = vec![
        test_frame(guest_mac(0), s.wire_mac, 1, 1514),
        test_frame(guest_mac(0), s.wire_mac, 2, 500),
        test_frame(guest_mac(0), s.wire_mac, 3, 1514),
    ];
    let nb = wire_to_vm(&s, &mut fe, &frames)?;
    // 12-byte header + 1514 bytes over 512-byte buffers: 3 buffers; 12 + 500 fits one.
    ensure!(nb == [3, 1, 3], "num_buffers {nb:?}");
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn frames_larger_than_every_buffer_are_dropped_and_counted_without_mrg() -> Result<()> {
    let s = setup("big")?;
    let mut fe = connect(&s, 0)?;
    fe.post_rx_buffers(16, 512)?;
    s.wire
        .send(&test_frame(guest_mac(0), s.wire_mac, 1, 1514))?;
    // The next frame that fits must still arrive, in the buffer the big one could not use.
    let small = test_frame(guest_mac(0), s.wire_mac, 2, 200);
    wire_to_vm(&s, &mut fe, &[small])?;
    drop(fe);
    let too_large = s.daemon.counter_reaching("rx_dropped_too_large", 1)?;
    ensure!(too_large == 1, "rx_dropped_too_large: {too_large}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn vm_frames_reach_the_wire_direct_chained_and_indirect() -> Result<()> {
    let s = setup("tx")?;
    let mut fe = connect(&s, VIRTIO_RING_F_EVENT_IDX)?;
    let mut sent = Vec::new();
    let mut seq = 0;
    for (pieces, indirect) in [(1, false), (3, false), (4, true)] {
        for size in [60usize, 64, 512, 1514] {
            let f = test_frame(s.wire_mac, guest_mac(0), seq, size);
            fe.send(&f, pieces, indirect)?;
            sent.push(f);
            seq += 1;
        }
    }
    fe.kick(TX_QUEUE)?;
    let got = s.wire.recv_until(WAIT, |g| {
        g.iter().filter(|f| test_seq(f).is_some()).count() >= sent.len()
    });
    let got: Vec<Vec<u8>> = got.into_iter().filter(|f| test_seq(f).is_some()).collect();
    ensure!(
        got == sent,
        "wire got {} of {} frames (or different bytes)",
        got.len(),
        sent.len()
    );
    ensure!(
        fe.wait_tx_used(sent.len(), WAIT)? == sent.len(),
        "not every tx chain came back used"
    );
    drop(fe);
    let tx_packets = s.daemon.counter_reaching("tx_packets", sent.len() as u64)?;
    ensure!(tx_packets == sent.len() as u64, "tx_packets: {tx_packets}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn broadcast_reaches_vm_and_host_unknown_unicast_stays_with_host() -> Result<()> {
    let s = setup("bcast")?;
    let mut fe = connect(&s, 0)?;
    fe.post_rx_buffers(64, 2048)?;

    // An ARP request for the host's address: the VM sees a copy, and the host still answers.
    let req = arp_request(s.wire_mac, lab::WIRE_IP, lab::HOST_IP);
    s.wire.send(&req)?;
    let got = fe.recv_frames(1, WAIT)?;
    ensure!(
        got.len() == 1 && got[0].1 == req,
        "VM did not receive the broadcast ARP request"
    );
    let replies = s
        .wire
        .recv_until(WAIT, |g| g.iter().any(|f| arp_reply_sender(f).is_some()));
    let reply = replies
        .iter()
        .find_map(|f| arp_reply_sender(f))
        .context("host did not answer ARP")?;
    ensure!(
        reply.1 == ip_bytes(lab::HOST_IP),
        "ARP reply from {:?}",
        reply.1
    );

    // Unicast for a MAC nobody serves goes to the host stack, not the VM.
    s.wire.send(&test_frame(STRANGER, s.wire_mac, 7, 100))?;
    // Broadcast test frame afterwards: if the stranger frame had leaked, it would arrive first.
    let b = test_frame(BROADCAST, s.wire_mac, 8, 100);
    s.wire.send(&b)?;
    let got = fe.recv_frames(1, WAIT)?;
    ensure!(
        got.len() == 1 && test_seq(&got[0].1) == Some(8),
        "VM got {:?} instead of only the broadcast",
        got.iter().map(|g| test_seq(&g.1)).collect::<Vec<_>>()
    );
    ensure!(
        fe.recv_frames(1, Duration::from_millis(300))?.is_empty(),
        "VM received an extra frame"
    );

    // The host's own IP traffic on the NIC keeps working.
    let ping = s
        .lab
        .in_wire("busybox")
        .args(["ping", "-c", "2", "-W", "2", lab::HOST_IP])
        .output()?;
    ensure!(
        ping.status.success(),
        "wire cannot ping the host: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    drop(fe);
    let multicast = s.daemon.counter_reaching("rx_multicast", 2)?;
    ensure!(multicast >= 2, "rx_multicast: {multicast}");
    s.daemon.stop()?;
    Ok(())
}

/// Transmits a descriptor pointing far outside guest memory: the tx queue breaks.
fn send_outside_guest_memory(fe: &mut VirtioNetFrontend) -> Result<()> {
    fe.post_raw(
        TX_QUEUE,
        &[RawDesc {
            addr: 1 << 40,
            len: 100,
            flags: 0,
            next: 0,
        }],
    )?;
    fe.kick(TX_QUEUE)
}

#[test]
fn malformed_tx_chains_stop_only_that_queue_until_a_device_reset() -> Result<()> {
    let s = setup("bad")?;
    let mut fe = connect(&s, 0)?;
    fe.post_rx_buffers(16, 2048)?;
    send_outside_guest_memory(&mut fe)?;
    // The receive queue of the same device keeps working.
    wire_to_vm(&s, &mut fe, &[test_frame(guest_mac(0), s.wire_mac, 1, 300)])?;
    // The broken tx queue stays stopped until the driver resets the device; then it works.
    let f = test_frame(s.wire_mac, guest_mac(0), 10, 200);
    ensure!(
        vm_to_wire(&s, &mut fe, &f, 1, Duration::from_millis(500))?.is_empty(),
        "a broken tx queue kept transmitting"
    );
    fe.reset_device()?;
    ensure!(
        vm_to_wire(&s, &mut fe, &f, 1, WAIT)?.contains(&f),
        "tx did not recover after a device reset"
    );
    fe.post_rx_buffers(16, 2048)?;
    wire_to_vm(
        &s,
        &mut fe,
        &[test_frame(guest_mac(0), s.wire_mac, 11, 300)],
    )?;
    drop(fe);

    // A fresh connection (the VM restarted) gets a working device, tx included, and survives
    // a looping chain and a write-only buffer on tx.
    let mut fe = connect(&s, 0)?;
    let scratch = fe.scratch(TX_QUEUE, 0);
    fe.post_raw(
        TX_QUEUE,
        &[
            RawDesc {
                addr: scratch,
                len: 64,
                flags: VRING_DESC_F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: scratch,
                len: 64,
                flags: VRING_DESC_F_NEXT,
                next: 0,
            },
        ],
    )?;
    fe.kick(TX_QUEUE)?;
    std::thread::sleep(Duration::from_millis(200));
    drop(fe);
    let mut fe = connect(&s, 0)?;
    let scratch = fe.scratch(TX_QUEUE, 0);
    fe.post_raw(
        TX_QUEUE,
        &[RawDesc {
            addr: scratch,
            len: 100,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        }],
    )?;
    fe.kick(TX_QUEUE)?;
    std::thread::sleep(Duration::from_millis(200));
    drop(fe);

    let mut fe = connect(&s, 0)?;
    fe.post_rx_buffers(16, 2048)?;
    wire_to_vm(
        &s,
        &mut fe,
        &[test_frame(guest_mac(0), s.wire_mac, 2, 1514)],
    )?;
    let f = test_frame(s.wire_mac, guest_mac(0), 3, 1514);
    ensure!(
        vm_to_wire(&s, &mut fe, &f, 2, WAIT)?.contains(&f),
        "tx after reconnect did not reach the wire"
    );
    drop(fe);
    let queue_errors = s.daemon.counter_reaching("queue_errors", 3)?;
    ensure!(queue_errors == 3, "queue_errors: {queue_errors}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn a_broken_queue_signals_the_frontends_error_eventfd() -> Result<()> {
    let s = setup("errfd")?;
    let mut fe = connect(&s, 0)?;
    // A receive buffer far outside guest memory breaks the rx queue on the next frame.
    fe.post_raw(
        RX_QUEUE,
        &[RawDesc {
            addr: 1 << 40,
            len: 2048,
            flags: VRING_DESC_F_WRITE,
            next: 0,
        }],
    )?;
    fe.kick(RX_QUEUE)?;
    ensure!(
        !fe.wait_error(RX_QUEUE, Duration::from_millis(200)),
        "error signalled before the guest broke anything"
    );
    s.wire.send(&test_frame(guest_mac(0), s.wire_mac, 1, 300))?;
    ensure!(
        fe.wait_error(RX_QUEUE, WAIT),
        "the rx queue's error eventfd was not signalled"
    );
    ensure!(
        !fe.wait_error(TX_QUEUE, Duration::from_millis(200)),
        "the healthy tx queue signalled an error"
    );
    send_outside_guest_memory(&mut fe)?;
    ensure!(
        fe.wait_error(TX_QUEUE, WAIT),
        "the tx queue's error eventfd was not signalled"
    );
    drop(fe);
    let queue_errors = s.daemon.counter_reaching("queue_errors", 2)?;
    ensure!(queue_errors == 2, "queue_errors: {queue_errors}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn guest_ring_without_buffers_drops_and_counts_then_recovers() -> Result<()> {
    let s = setup("full")?;
    let mut fe = connect(&s, 0)?;
    fe.post_rx_buffers(4, 2048)?;
    let frames: Vec<Vec<u8>> = (0..10)
        .map(|i| test_frame(guest_mac(0), s.wire_mac, i, 200))
        .collect();
    for f in &frames {
        s.wire.send(f)?;
    }
    let got = fe.recv_frames(10, Duration::from_millis(1500))?;
    ensure!(
        got.len() == 4,
        "ring of 4 buffers took {} frames",
        got.len()
    );
    fe.post_rx_buffers(32, 2048)?;
    wire_to_vm(
        &s,
        &mut fe,
        &[test_frame(guest_mac(0), s.wire_mac, 100, 1514)],
    )?;
    drop(fe);
    let ring_full = s.daemon.counter_reaching("rx_dropped_guest_ring_full", 6)?;
    ensure!(ring_full == 6, "rx_dropped_guest_ring_full: {ring_full}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn sigterm_detaches_xdp_and_removes_the_socket() -> Result<()> {
    let s = setup("term")?;
    let fe = connect(&s, 0)?;
    let out = s
        .lab
        .in_host("ip")
        .args(["link", "show", lab::NIC])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("xdp"),
        "no XDP program on the NIC while running"
    );
    s.daemon.stop()?;
    drop(fe);
    let out = s
        .lab
        .in_host("ip")
        .args(["link", "show", lab::NIC])
        .output()?;
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("xdp"),
        "XDP program left attached: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(!s.socket.exists(), "socket left behind");
    Ok(())
}

#[test]
fn a_driver_that_asks_for_no_interrupts_is_not_signalled() -> Result<()> {
    // Without EVENT_IDX a polling driver (DPDK's virtio PMD) sets VRING_AVAIL_F_NO_INTERRUPT.
    let s = setup("noint")?;
    let mut fe = connect(&s, 0)?;
    fe.post_rx_buffers(64, 2048)?;
    while fe.wait_call(RX_QUEUE, Duration::from_millis(100)) {}
    fe.set_no_interrupt(RX_QUEUE, true)?;
    let frames: Vec<Vec<u8>> = (0..10)
        .map(|i| test_frame(guest_mac(0), s.wire_mac, i, 100))
        .collect();
    for f in &frames {
        s.wire.send(f)?;
    }
    let mut got = 0;
    let deadline = std::time::Instant::now() + WAIT;
    while got < 10 && std::time::Instant::now() < deadline {
        got += fe.take_used(RX_QUEUE)?.len();
        std::thread::sleep(Duration::from_millis(5));
    }
    ensure!(got == 10, "polled {got} of 10 frames");
    ensure!(
        !fe.wait_call(RX_QUEUE, Duration::from_millis(200)),
        "the device signalled a driver that asked for no interrupts"
    );
    // Asking again brings the signals back.
    fe.set_no_interrupt(RX_QUEUE, false)?;
    s.wire
        .send(&test_frame(guest_mac(0), s.wire_mac, 99, 100))?;
    ensure!(
        fe.wait_call(RX_QUEUE, WAIT),
        "no signal once interrupts were wanted again"
    );
    drop(fe);
    let suppressed = s.daemon.counter_reaching("notifications_suppressed", 1)?;
    ensure!(suppressed >= 1, "suppressions not counted: {suppressed}");
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn busy_polling_sets_the_kernel_options_and_moves_frames_both_ways() -> Result<()> {
    let s = setup_with("busy", &["--busy-poll"])?;
    let pid = s.daemon.pid().context("daemon pid")?;
    let mut fe = connect(&s, VIRTIO_RING_F_EVENT_IDX)?;
    fe.post_rx_buffers(128, 2048)?;
    // The port's socket (and the queue's anchor) busy-poll with the kernel's preferred mode.
    let opts = xdp_socket_busy_poll(pid)?;
    let busy: Vec<_> = opts.iter().filter(|o| o.prefer_busy_poll == 1).collect();
    ensure!(
        !busy.is_empty(),
        "no AF_XDP socket prefers busy polling: {opts:?}"
    );
    for o in &busy {
        ensure!(
            o.busy_poll_usecs > 0 && o.budget.is_none_or(|b| b == 64),
            "busy-polling socket options {o:?}"
        );
    }
    // Frames move with nothing but the worker's own polling: wire -> VM at several sizes ...
    let frames: Vec<Vec<u8>> = [60usize, 512, 1514]
        .iter()
        .enumerate()
        .map(|(i, &len)| test_frame(guest_mac(0), s.wire_mac, i as u32, len))
        .collect();
    wire_to_vm(&s, &mut fe, &frames)?;
    // ... and VM -> wire.
    let out = test_frame(s.wire_mac, guest_mac(0), 1000, 300);
    let got = vm_to_wire(&s, &mut fe, &out, 1, WAIT)?;
    ensure!(
        got == vec![out],
        "wire got {} copies of the VM's frame",
        got.len()
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

/// A TCP/IPv4 frame from the VM to the wire's MAC, to an address nobody holds (the wire's
/// stack ignores it; its raw socket sees it), checksums complete.
fn tcp_frame(s: &Setup, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut tcp = etherparse::TcpHeader::new(40000, 5201, seq, 64240);
    tcp.ack = true;
    tcp.psh = true;
    let builder = etherparse::PacketBuilder::ethernet2(guest_mac(0), s.wire_mac)
        .ipv4([10, 77, 0, 2], [192, 0, 2, 1], 64)
        .tcp_header(tcp);
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("frame");
    out
}

/// The frame as a guest hands it over with NEEDS_CSUM: the TCP checksum field holds the
/// pseudo-header sum.
fn as_partial(frame: &[u8]) -> Vec<u8> {
    use xvdpa::datapath::offload::checksum;
    let mut f = frame.to_vec();
    let pseudo = checksum::pseudo_header(&f[26..30], &f[30..34], 6, f.len() - 34);
    f[50..52].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
    f
}

fn net_header(
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; 12] {
    xvdpa::datapath::offload::NetHeader {
        flags,
        gso_type,
        hdr_len: 54,
        gso_size,
        csum_start,
        csum_offset,
    }
    .to_bytes(0)
}

/// A wire frame of the test flow: (sequence number, payload), with both checksums verified
/// by etherparse; `None` for other frames.
fn checked_segment(f: &[u8]) -> Option<Result<(u32, Vec<u8>)>> {
    let untagged;
    let f = match untag(f) {
        Some((100, u)) => {
            untagged = u;
            &untagged[..]
        }
        Some(_) => return None,
        None => f,
    };
    let ip = etherparse::Ipv4HeaderSlice::from_slice(f.get(14..)?).ok()?;
    let l4 = 14 + ip.slice().len();
    let tcp = etherparse::TcpHeaderSlice::from_slice(f.get(l4..)?).ok()?;
    if tcp.source_port() != 40000 || ip.destination() != [192, 0, 2, 1] {
        return None;
    }
    let end = 14 + usize::from(ip.total_len());
    let payload = &f[l4 + tcp.slice().len()..end];
    let check = || -> Result<(u32, Vec<u8>)> {
        let ip_h = ip.to_header();
        ensure!(
            ip_h.calc_header_checksum() == ip.header_checksum(),
            "bad IPv4 checksum"
        );
        let want = tcp.to_header().calc_checksum_ipv4(&ip_h, payload)?;
        ensure!(want == tcp.checksum(), "bad TCP checksum");
        ensure!(f.len() <= 1514, "segment of {} bytes", f.len());
        Ok((tcp.sequence_number(), payload.to_vec()))
    };
    Some(check())
}

/// Checks that the daemon's counter `name` reads `want`.
fn counter_is(s: &Setup, name: &str, want: u64) -> Result<()> {
    let got = s.daemon.counter(name)?;
    ensure!(got == want, "{name} {got}, want {want}");
    Ok(())
}

/// A daemon serving one port `socket=...,mac=...{extra}` (e.g. `,tx-gso=daemon`), with the
/// wire's socket open.
fn setup_port(tag: &str, extra: &str) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let spec = Daemon::port_spec(&socket, guest_mac(0), extra);
    let ctl = dir.join("ctl.sock");
    let ctl = ctl.to_str().context("ctl path")?;
    let mut daemon = Daemon::spawn(&lab, &["--port", &spec, "--ctl", ctl])?;
    daemon.wait_for_log("port ready for a frontend", WAIT)?;
    with_wire(lab, daemon, socket, dir)
}

/// The daemon leaves the checksums of NEEDS_CSUM frames and of TSO segments to the kernel
/// (AF_XDP TX metadata): in copy mode each becomes a CHECKSUM_PARTIAL skb, which the NIC's
/// checksum offload completes. A veth has none to speak of (it hands the skb to its peer
/// partial, and the peer's stack trusts it), so the NIC's transmit checksumming is turned off
/// here: the kernel then completes each checksum before the frame leaves, as a NIC would, and
/// the wire sees finished frames. The TSO frame is cut by the daemon here (`tx-gso=daemon`).
#[test]
fn offload_requests_reach_the_wire_finished_and_malformed_ones_are_dropped() -> Result<()> {
    offload_requests_on_the_wire("offl", TxGso::Daemon)
}

/// As above with the TSO frame handed to the kernel whole (`tx-gso=kernel`, the default):
/// without transmit checksumming the NIC has no TSO either, so the kernel cuts the frame at
/// the driver (software GSO), and the wire gets the same finished segments.
#[test]
fn tso_frames_the_kernel_cuts_reach_the_wire_finished() -> Result<()> {
    offload_requests_on_the_wire("offlk", TxGso::Kernel)
}

/// Who cuts the test's TSO frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxGso {
    Kernel,
    Daemon,
}

fn offload_requests_on_the_wire(tag: &str, gso: TxGso) -> Result<()> {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    let s = match gso {
        TxGso::Daemon => setup_port(tag, ",tx-gso=daemon")?,
        TxGso::Kernel => setup(tag)?,
    };
    lab::run(s.lab.in_host("ethtool").args(["-K", lab::NIC, "tx", "off"]))?;
    let mut fe = connect(
        &s,
        (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | VIRTIO_RING_F_EVENT_IDX,
    )?;
    let big: Vec<u8> = (0..8000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let small: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let tso = as_partial(&tcp_frame(&s, 1_000_000, &big));
    let csum = as_partial(&tcp_frame(&s, 2_000_000, &small));

    // The attacks first: none of them may put a frame on the wire.
    let attacks: [([u8; 12], &[u8], &str); 4] = [
        (
            net_header(1, 1, 1, 34, 16),
            &tso,
            "gso_size 1: 8000 segments",
        ),
        (net_header(1, 1, 0, 34, 16), &tso, "gso_size 0"),
        (
            net_header(1, 3, 1448, 34, 6),
            &tso,
            "UDP fragmentation offload, not offered",
        ),
        (
            net_header(1, 0, 0, 34, 60_000),
            &csum,
            "checksum field far past the frame",
        ),
    ];
    for (hdr, frame, _) in &attacks {
        fe.send_with_header(hdr, frame, 5, false)?;
    }
    fe.send_with_header(&net_header(1, 1, 1448, 34, 16), &tso, 5, false)?;
    fe.send_with_header(&net_header(1, 0, 0, 34, 16), &csum, 2, false)?;
    fe.kick(TX_QUEUE)?;

    let want_segments = big.len().div_ceil(1448) + 1;
    let got = s.wire.recv_until(WAIT, |g| {
        g.iter().filter(|f| checked_segment(f).is_some()).count() >= want_segments
    });
    let mut segments = got
        .iter()
        .filter_map(|f| checked_segment(f))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        segments.len() == want_segments,
        "wire got {} frames of the flow, want {want_segments}",
        segments.len()
    );
    // The TSO frame's payload, cut at 1448 bytes, in order; then the checksummed frame.
    let last = segments.pop().context("the checksummed frame")?;
    ensure!(last == (2_000_000, small.clone()), "the NEEDS_CSUM frame");
    let mut stream = Vec::new();
    for (i, (seq, payload)) in segments.iter().enumerate() {
        ensure!(
            *seq == 1_000_000 + (i * 1448) as u32,
            "segment {i} at seq {seq}"
        );
        ensure!(
            payload.len() == 1448 || i + 1 == segments.len(),
            "segment {i}"
        );
        stream.extend_from_slice(payload);
    }
    ensure!(
        stream == big,
        "the segments do not carry the TSO frame's payload"
    );

    let drops = s
        .daemon
        .counter_reaching("tx_dropped_offload", attacks.len() as u64)?;
    ensure!(drops == attacks.len() as u64, "tx_dropped_offload {drops}");
    // Every checksum went through the TX metadata: the segments' (cut by the daemon) and the
    // NEEDS_CSUM frame's; or the GSO frame's, with its header, and the NEEDS_CSUM frame's.
    let (segments, gso_kernel, offloaded) = match gso {
        TxGso::Daemon => (6, 0, 7),
        TxGso::Kernel => (0, 1, 1),
    };
    counter_is(&s, "tx_segments", segments)?;
    counter_is(&s, "tx_gso_kernel", gso_kernel)?;
    counter_is(&s, "tx_csum_offloaded", offloaded)?;
    counter_is(&s, "tx_csum_computed", 0)?;
    // The queue kept running.
    counter_is(&s, "queue_errors", 0)?;
    ensure!(
        fe.wait_tx_used(attacks.len() + 2, WAIT)? == attacks.len() + 2,
        "every chain came back used"
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

/// With transmit checksumming on (so TSO) on the NIC, a guest's TSO frame reaches the wire
/// whole (`tx-gso=kernel`): one GSO skb, which an AF_PACKET socket with a vnet header on the
/// far end of the veth receives as one frame, its gso_type and gso_size in that header and its
/// bytes those the guest sent (the tag of a tagged port inserted, the checksum offsets moved
/// with it; a `vlan-passthrough` guest's own tag kept, with the offsets it gave past it).
/// With `tx-gso=daemon` the same frame arrives as MSS-sized frames.
#[test]
fn a_tso_frame_reaches_the_wire_whole_as_one_gso_frame() -> Result<()> {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    use xvdpa_tests::wire::VNET_HDR_LEN as WIRE_HDR;
    // (tag, port settings, the port's tag, the guest's own tag)
    for (tag, extra, vlan, guest_vlan) in [
        ("gsok", "", None, None),
        ("gsokv", ",vlan=100", Some(100u16), None),
        ("gsokp", ",vlan-passthrough=on", None, Some(200u16)),
        // The single-copy path (the guest's memory is the NIC queue's UMEM).
        ("gsokg", ",guest-umem=on", None, None),
        ("gsod", ",tx-gso=daemon", None, None),
    ] {
        let s = setup_port(tag, extra)?;
        let wire = WireSocket::open_with_vnet_hdr(&s.lab)?;
        let mut fe = connect(
            &s,
            (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | VIRTIO_RING_F_EVENT_IDX,
        )?;
        if extra.contains("guest-umem") {
            let list = s.daemon.ctl()?.raw(r#"{"cmd":"list"}"#)?;
            ensure!(
                list["ports"][0]["datapath"] == "guest-memory",
                "{tag}: not on the single-copy path: {list}"
            );
        }
        let big: Vec<u8> = (0..30_000u32).map(|i| (i * 13 + i / 251) as u8).collect();
        let tso = as_partial(&tcp_frame(&s, 5_000_000, &big));
        // A guest that tags its own frames (a VLAN device on its NIC) counts its offsets
        // from the tagged frame, as Linux's virtio-net driver does.
        let (tso, header) = match guest_vlan {
            Some(vid) => (
                tagged(&tso, vid),
                xvdpa::datapath::offload::NetHeader {
                    flags: 1,
                    gso_type: 1,
                    hdr_len: 58,
                    gso_size: 1448,
                    csum_start: 38,
                    csum_offset: 16,
                }
                .to_bytes(0),
            ),
            None => (tso, net_header(1, 1, 1448, 34, 16)),
        };
        fe.send_with_header(&header, &tso, 16, false)?;
        fe.kick(TX_QUEUE)?;
        // The guest's frames: its source MAC, behind the kernel's header.
        let ours = |f: &Vec<u8>| f.get(WIRE_HDR + 6..WIRE_HDR + 12) == Some(&guest_mac(0)[..]);
        let bytes = |g: &[Vec<u8>]| -> usize {
            g.iter()
                .filter(|f| ours(f))
                .map(|f| f.len() - WIRE_HDR)
                .sum()
        };
        let mut got = wire.recv_until(WAIT, |g| bytes(g) >= tso.len());
        // Anything more of the flow would come right after.
        got.extend(wire.recv_until(Duration::from_millis(300), |_| false));
        let flow: Vec<&Vec<u8>> = got.iter().filter(|f| ours(f)).collect();
        if extra.contains("tx-gso=daemon") {
            let want = big.len().div_ceil(1448);
            ensure!(
                flow.len() == want && flow.iter().all(|f| f[1] == 0),
                "{tag}: {} frames of the flow (want {want} segments, no GSO)",
                flow.len()
            );
            ensure!(s.daemon.counter_reaching("tx_segments", want as u64)? == want as u64);
            ensure!(
                s.daemon.counter("tx_gso_kernel")? == 0,
                "{tag}: tx_gso_kernel"
            );
        } else {
            ensure!(
                flow.len() == 1,
                "{tag}: {} frames of the flow on the wire, want the one GSO frame",
                flow.len()
            );
            let f = flow[0];
            // struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
            // csum_offset. The receiving veth took the tag out of the frame, so the offsets
            // count from its untagged frame again.
            let u16_at = |i: usize| u16::from_le_bytes([f[i], f[i + 1]]);
            ensure!(
                (f[0], f[1], u16_at(4), u16_at(6), u16_at(8)) == (1, 1, 1448, 34, 16),
                "{tag}: header {:?}",
                &f[..WIRE_HDR]
            );
            let want = match vlan {
                Some(vid) => tagged(&tso, vid),
                None => tso.clone(),
            };
            let differ = (0..want.len().min(f.len() - WIRE_HDR))
                .filter(|&i| f[WIRE_HDR + i] != want[i])
                .count();
            ensure!(
                f.len() - WIRE_HDR == want.len() && differ == 0,
                "{tag}: the wire's frame ({} bytes) is not the guest's ({} bytes): {differ} bytes differ",
                f.len() - WIRE_HDR,
                want.len()
            );
            ensure!(s.daemon.counter_reaching("tx_gso_kernel", 1)? == 1, "{tag}");
            counter_is(&s, "tx_segments", 0)?;
        }
        counter_is(&s, "tx_gso_frames", 1)?;
        counter_is(&s, "tx_dropped_gso_kernel", 0)?;
        ensure!(fe.wait_tx_used(1, WAIT)? == 1, "{tag}: the chain came back");
        drop(fe);
        s.daemon.stop()?;
    }
    Ok(())
}

/// On a tagged port the daemon inserts the tag after the MAC addresses of each frame it
/// leaves the checksum of to the kernel: the request must name the bytes 4 further on, or
/// the wire gets wrong sums.
#[test]
fn a_tagged_ports_checksum_requests_follow_the_inserted_tag() -> Result<()> {
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
    // The daemon cuts the TSO frame: each segment's checksum request follows the tag.
    let s = setup_port("offvl", ",vlan=100,tx-gso=daemon")?;
    lab::run(s.lab.in_host("ethtool").args(["-K", lab::NIC, "tx", "off"]))?;
    let mut fe = connect(
        &s,
        (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | VIRTIO_RING_F_EVENT_IDX,
    )?;
    let big: Vec<u8> = (0..5000u32).map(|i| (i * 11 + i / 256) as u8).collect();
    let small: Vec<u8> = (0..301u32).map(|i| (i * 3) as u8).collect();
    let tso = as_partial(&tcp_frame(&s, 3_000_000, &big));
    let csum = as_partial(&tcp_frame(&s, 4_000_000, &small));
    fe.send_with_header(&net_header(1, 1, 1448, 34, 16), &tso, 3, false)?;
    fe.send_with_header(&net_header(1, 0, 0, 34, 16), &csum, 2, false)?;
    fe.kick(TX_QUEUE)?;
    let want = big.len().div_ceil(1448) + 1;
    let got = s.wire.recv_until(WAIT, |g| {
        g.iter().filter(|f| checked_segment(f).is_some()).count() >= want
    });
    ensure!(
        got.iter()
            .filter(|f| checked_segment(f).is_some())
            .all(|f| untag(f).is_some()),
        "a frame of the tagged port reached the wire untagged"
    );
    let segments = got
        .iter()
        .filter_map(|f| checked_segment(f))
        .collect::<Result<Vec<_>>>()?;
    ensure!(segments.len() == want, "wire got {} frames", segments.len());
    ensure!(
        segments.last() == Some(&(4_000_000, small.clone())),
        "the NEEDS_CSUM frame"
    );
    let offloaded = s
        .daemon
        .counter_reaching("tx_csum_offloaded", want as u64)?;
    ensure!(offloaded == want as u64, "tx_csum_offloaded {offloaded}");
    ensure!(
        s.daemon.counter("tx_csum_computed")? == 0,
        "tx_csum_computed"
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}
