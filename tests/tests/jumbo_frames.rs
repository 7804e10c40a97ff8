//! Jumbo frames (`--mtu 9000`) on a veth whose both ends run at MTU 9000: the XDP program
//! attaches in native mode (it is marked for multi-buffer frames), and frames larger than one
//! UMEM frame cross AF_XDP in several pieces both ways, whole and unchanged. The project's
//! own frontend plays the VMs. Needs root (namespaces, XDP); `cargo xtask test` runs it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::{tagged, test_frame, BROADCAST};
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for a frame that must not arrive.
const QUIET: Duration = Duration::from_millis(400);
/// The largest frame at MTU 9000, without a VLAN tag.
const JUMBO: usize = 9014;
/// Receive buffers that take a whole jumbo frame and its net header (no MRG_RXBUF).
const RX_BUFFER: u32 = 9216;

/// A lab whose veth runs at MTU 9000 on both ends.
fn jumbo_lab(tag: &str) -> Result<Lab> {
    let lab = Lab::unique(tag)?;
    lab.set_mtu(9000)?;
    Ok(lab)
}

/// A frontend with data slots and receive buffers large enough for a jumbo frame.
fn jumbo_vm(socket: &std::path::Path) -> Result<VirtioNetFrontend> {
    let opts = FrontendOptions {
        slot_len: u64::from(RX_BUFFER) + 1024,
        ..FrontendOptions::default()
    };
    let mut fe = VirtioNetFrontend::connect(socket, opts)?;
    fe.post_rx_buffers(128, RX_BUFFER)?;
    // The worker's housekeeping timer (200 ms) guarantees an event even without traffic,
    // after which the switch reaches this port's receive queue.
    std::thread::sleep(Duration::from_millis(300));
    Ok(fe)
}

/// Receives `want` frames (or what came within `within`) and posts fresh buffers.
fn received(fe: &mut VirtioNetFrontend, want: usize, within: Duration) -> Result<Vec<Vec<u8>>> {
    fe.recv_and_repost(want, within, RX_BUFFER, 128)
}

/// Sends `frame` from `fe` in `pieces` descriptors and waits until the device used the chain.
fn send(fe: &mut VirtioNetFrontend, frame: &[u8], pieces: usize) -> Result<()> {
    fe.send_and_wait(frame, pieces, WAIT)
}

/// The wire's frames carrying sequence number `seq`, tagged or not, seen within `QUIET`.
fn wire_frames_with(wire: &WireSocket, seq: u32) -> Vec<Vec<u8>> {
    wire.frames_with_seq(seq, QUIET)
}

fn lens(frames: &[Vec<u8>]) -> Vec<usize> {
    frames.iter().map(Vec::len).collect()
}

struct OnePort {
    daemon: Daemon,
    wire: WireSocket,
    wire_mac: [u8; 6],
    socket: PathBuf,
    _dir: SocketDir,
    _lab: Lab,
}

fn one_port(tag: &str, xdp_mode: &str) -> Result<OnePort> {
    let lab = jumbo_lab(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let daemon = Daemon::start(
        &lab,
        &socket,
        &mac_str(guest_mac(0)),
        &["--mtu", "9000", "--xdp-mode", xdp_mode],
    )?;
    Ok(OnePort {
        wire: WireSocket::open(&lab)?,
        wire_mac: lab.wire_mac()?,
        daemon,
        socket,
        _dir: dir,
        _lab: lab,
    })
}

/// Every size around the piece boundaries crosses both ways, unchanged; one byte over the
/// MTU is dropped and counted.
fn both_ways_at_every_size(s: &OnePort) -> Result<()> {
    let mut fe = jumbo_vm(&s.socket)?;
    let cfg = fe.config()?;
    let mtu = u16::from_le_bytes([cfg[10], cfg[11]]);
    ensure!(mtu == 9000, "the device's config space says MTU {mtu}");

    // Wire -> VM: a received piece holds 3840 bytes (4096 less the kernel's headroom).
    let sizes = [60usize, 1514, 3840, 3841, 7680, 7681, 8000, JUMBO];
    let frames: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| test_frame(guest_mac(0), s.wire_mac, i as u32, n))
        .collect();
    for f in &frames {
        s.wire.send(f)?;
    }
    let got = received(&mut fe, frames.len(), WAIT)?;
    ensure!(
        got == frames,
        "VM got sizes {:?}, the wire sent {sizes:?} (or different bytes)",
        lens(&got)
    );

    // VM -> wire: a transmitted piece holds 4096 bytes; the frame comes from the guest in
    // several descriptors too.
    let sizes = [60usize, 4096, 4097, 8192, 8193, JUMBO];
    for (i, &n) in sizes.iter().enumerate() {
        let seq = 100 + i as u32;
        let f = test_frame(s.wire_mac, guest_mac(0), seq, n);
        send(&mut fe, &f, 1 + i % 3)?;
        let seen = wire_frames_with(&s.wire, seq);
        ensure!(
            seen == vec![f],
            "a {n}-byte frame reached the wire as {:?}",
            lens(&seen)
        );
    }
    let over = test_frame(s.wire_mac, guest_mac(0), 200, JUMBO + 1);
    send(&mut fe, &over, 1)?;
    ensure!(
        wire_frames_with(&s.wire, 200).is_empty(),
        "a frame over the MTU reached the wire"
    );
    drop(fe);
    let oversized = s.daemon.counter_reaching("tx_dropped_oversized", 1)?;
    ensure!(oversized == 1, "tx_dropped_oversized: {oversized}");
    let steered = s.daemon.counter_reaching("steered", 8)?;
    ensure!(steered >= 8, "xdp steered counter: {steered}");
    Ok(())
}

#[test]
fn jumbo_frames_cross_both_ways_with_xdp_in_native_mode() -> Result<()> {
    let mut s = one_port("jdrv", "auto")?;
    // Native mode on a veth at MTU 9000 takes a program marked for frags; without the mark
    // the kernel refuses it and the daemon would fall back to generic mode.
    let line = s.daemon.wait_for_log("XDP steering attached", WAIT)?;
    ensure!(line.contains("Driver"), "XDP attached as: {line}");
    both_ways_at_every_size(&s)?;
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn jumbo_frames_cross_both_ways_with_xdp_in_generic_mode() -> Result<()> {
    let s = one_port("jskb", "skb")?;
    both_ways_at_every_size(&s)?;
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn jumbo_frames_on_a_vlan_are_tagged_untagged_switched_and_flooded() -> Result<()> {
    let tag = "jvlan";
    let lab = jumbo_lab(tag)?;
    let dir = socket_dir(tag)?;
    let sock = |i: u8| dir.join(format!("vm{i}.sock"));
    let spec = |i: u8, vlan: &str| Daemon::port_spec(&sock(i), guest_mac(i), vlan);
    let specs = [spec(0, ",vlan=100"), spec(1, ",vlan=100"), spec(2, "")];
    let daemon = Daemon::start_specs(&lab, &dir.join("ctl.sock"), &specs, &["--mtu", "9000"])?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let (mut a, mut b, mut c) = (
        jumbo_vm(&sock(0))?,
        jumbo_vm(&sock(1))?,
        jumbo_vm(&sock(2))?,
    );

    // Wire -> VLAN 100 port: 9018 bytes tagged, delivered as 9014 untagged.
    let to_a = test_frame(guest_mac(0), wire_mac, 1, JUMBO);
    wire.send(&tagged(&to_a, 100))?;
    let got = received(&mut a, 1, WAIT)?;
    ensure!(got == vec![to_a], "A got {:?}", lens(&got));

    // VLAN 100 port -> wire: tagged on the way, 9018 bytes in three pieces.
    let out = test_frame(wire_mac, guest_mac(0), 2, JUMBO);
    send(&mut a, &out, 2)?;
    let seen = wire_frames_with(&wire, 2);
    ensure!(
        seen == vec![tagged(&out, 100)],
        "A's frame on the wire: {:?}",
        lens(&seen)
    );

    // A -> B within the VLAN: switched in the daemon, never on the wire.
    let ab = test_frame(guest_mac(1), guest_mac(0), 3, JUMBO);
    send(&mut a, &ab, 1)?;
    let got = received(&mut b, 1, WAIT)?;
    ensure!(got == vec![ab], "B got {:?} from A", lens(&got));
    ensure!(
        wire_frames_with(&wire, 3).is_empty(),
        "A->B left through the NIC"
    );

    // A's jumbo broadcast: B gets it whole and untagged, the wire tagged; C (another
    // domain) not at all.
    let bcast = test_frame(BROADCAST, guest_mac(0), 4, JUMBO);
    send(&mut a, &bcast, 3)?;
    let got = received(&mut b, 1, WAIT)?;
    ensure!(
        got == vec![bcast.clone()],
        "B got {:?} of A's broadcast",
        lens(&got)
    );
    let seen = wire_frames_with(&wire, 4);
    ensure!(
        seen == vec![tagged(&bcast, 100)],
        "A's broadcast on the wire: {:?}",
        lens(&seen)
    );
    ensure!(
        received(&mut c, 1, QUIET)?.is_empty(),
        "C got VLAN 100's broadcast"
    );

    // The untagged port's jumbo broadcast leaves as it is.
    let bcast_c = test_frame(BROADCAST, guest_mac(2), 5, JUMBO);
    send(&mut c, &bcast_c, 1)?;
    let seen = wire_frames_with(&wire, 5);
    ensure!(
        seen == vec![bcast_c],
        "C's broadcast on the wire: {:?}",
        lens(&seen)
    );

    // A jumbo broadcast from the wire reaches both VLAN 100 ports through the host stack.
    let wb = test_frame(BROADCAST, wire_mac, 6, JUMBO);
    wire.send(&tagged(&wb, 100))?;
    for (name, fe) in [("A", &mut a), ("B", &mut b)] {
        let got = received(fe, 1, WAIT)?;
        ensure!(
            got == vec![wb.clone()],
            "{name} got {:?} of the wire's broadcast",
            lens(&got)
        );
    }
    drop((a, b, c));
    daemon.stop()?;
    Ok(())
}

#[test]
fn an_mtu_over_9000_is_refused_and_one_over_the_nics_is_warned_about() -> Result<()> {
    let lab = Lab::unique("jmtu")?;
    let dir = socket_dir("jmtu")?;
    let socket = dir.join("vm0.sock");
    let (sock, mac) = (socket.to_str().unwrap(), mac_str(guest_mac(0)));
    let mut refused = Daemon::spawn(&lab, &["--socket", sock, "--mac", &mac, "--mtu", "9001"])?;
    let status = refused.wait_exit(WAIT)?;
    let out = refused.output();
    ensure!(
        !status.success() && out.contains("MTU 9001 is outside 68..=9000"),
        "{status}: {out}"
    );
    // The lab's NIC is at 1500: the guests' larger frames could not leave, and the operator
    // is told so at start.
    let mut d = Daemon::start(&lab, &socket, &mac, &["--mtu", "9000"])?;
    d.wait_for_log("the NIC's MTU is below --mtu", WAIT)?;
    d.stop()?;
    Ok(())
}
