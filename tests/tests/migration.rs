//! Migration between two ports of one daemon, with the project's frontend playing the two
//! QEMUs: the destination port is added with `migrate_from` and the source's MAC, the source
//! keeps the MAC's frames while the destination's frontend is connected but its rings are
//! not started (QEMU's `-incoming` side during the migration), and the frames move to the
//! destination when it starts them (the migrated guest runs), or as soon as its frontend
//! asks the daemon to announce the guest (`SEND_RARP`), whose RARP reaches the wire and the
//! other ports. Needs root; `cargo xtask test` runs it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::frames::{announcement, test_frame, test_seq, Announcement};
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::wire::WireSocket;

/// How long to watch for a frame that must not arrive.
const QUIET: Duration = Duration::from_millis(400);

fn frontend(socket: &Path, start_rings: bool) -> Result<VirtioNetFrontend> {
    let opts = FrontendOptions {
        start_rings,
        ..FrontendOptions::default()
    };
    let mut fe = VirtioNetFrontend::connect(socket, opts)?;
    if start_rings {
        fe.post_rx_buffers(256, 2048)?;
    }
    Ok(fe)
}

/// The sequence numbers of the test frames `fe` receives within `within`.
fn seqs(fe: &mut VirtioNetFrontend, within: Duration) -> Result<Vec<u32>> {
    Ok(fe
        .recv_and_repost(usize::MAX, within, 2048, 256)?
        .iter()
        .filter_map(|f| test_seq(f))
        .collect())
}

fn add_port(ctl: &Ctl, socket: &Path, mac: [u8; 6], from: Option<&Path>) -> Result<String> {
    let from = from.map_or(String::new(), |f| {
        format!(r#","migrate_from":"{}""#, f.display())
    });
    let reply = ctl.raw(&format!(
        r#"{{"cmd":"add-port","socket":"{}","mac":"{}"{from}}}"#,
        socket.display(),
        mac_str(mac)
    ))?;
    Ok(reply.to_string())
}

/// Adds `socket` as the migration target of the port at `source`.
fn add_target(ctl: &Ctl, socket: &Path, mac: [u8; 6], source: &Path) -> Result<()> {
    let added = add_port(ctl, socket, mac, Some(source))?;
    ensure!(added.contains(r#""ok":true"#), "add-port: {added}");
    Ok(())
}

#[test]
fn the_mac_moves_to_the_destination_when_its_guest_starts() -> Result<()> {
    let lab = Lab::unique("migrate")?;
    let dir = socket_dir("migrate")?;
    let (src_sock, dst_sock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mac = guest_mac(0);
    let _daemon = Daemon::start_ports(&lab, &[(src_sock.clone(), mac_str(mac))], &[])?;
    let ctl = Ctl::new(&dir.join("ctl.sock"));
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let send = |seq: u32| wire.send(&test_frame(mac, wire_mac, seq, 200));

    // Only the source's own MAC, and a MAC only a migration target may share.
    let other: PathBuf = dir.join("other.sock");
    let refused = add_port(&ctl, &other, guest_mac(5), Some(&src_sock))?;
    ensure!(refused.contains("not this port's"), "other MAC: {refused}");
    let refused = add_port(&ctl, &other, mac, None)?;
    ensure!(refused.contains("two ports"), "shared MAC: {refused}");
    add_target(&ctl, &dst_sock, mac, &src_sock)?;

    let mut src = frontend(&src_sock, true)?;
    std::thread::sleep(Duration::from_millis(300));
    send(1)?;
    ensure!(
        seqs(&mut src, QUIET)? == [1],
        "the source receives before the migration"
    );

    // The destination connects (features, memory table) without starting its rings.
    let mut dst = frontend(&dst_sock, false)?;
    std::thread::sleep(Duration::from_millis(600));
    send(2)?;
    ensure!(
        seqs(&mut src, QUIET)? == [2],
        "the source keeps its frames while the destination waits"
    );

    // The migrated guest runs: its rings start, and the frames follow it.
    dst.start_rings()?;
    dst.post_rx_buffers(256, 2048)?;
    let started = Instant::now();
    let mut seq = 100;
    let moved = loop {
        send(seq)?;
        let got = seqs(&mut dst, Duration::from_millis(50))?;
        if !got.is_empty() {
            break Some((seq, got));
        }
        if started.elapsed() > Duration::from_secs(3) {
            break None;
        }
        seq += 1;
    };
    let Some((first, got)) = moved else {
        anyhow::bail!("no frame reached the destination within 3 s of its start");
    };
    println!(
        "switch-over {} ms after the destination's rings started (frames {:?}; {} sent to \
         the source meanwhile)",
        started.elapsed().as_millis(),
        got,
        first - 100
    );
    let late = seqs(&mut src, QUIET)?;
    ensure!(
        late.iter().all(|&s| s < first),
        "the source got frames after the switch-over: {late:?}"
    );
    send(500)?;
    ensure!(
        seqs(&mut dst, QUIET)?.contains(&500),
        "destination after the switch-over"
    );
    ensure!(
        seqs(&mut src, QUIET)?.is_empty(),
        "source after the switch-over"
    );

    // The source's QEMU quits and the operator removes its port: the MAC stays with the
    // destination.
    drop(src);
    let removed = ctl.raw(&format!(
        r#"{{"cmd":"del-port","port":"{}"}}"#,
        src_sock.display()
    ))?;
    ensure!(removed["ok"] == true, "del-port: {removed}");
    send(600)?;
    ensure!(
        seqs(&mut dst, QUIET)?.contains(&600),
        "removing the source took the MAC from the destination"
    );
    Ok(())
}

/// QEMU's `SEND_RARP` after a migration (for a guest without GUEST_ANNOUNCE): the daemon
/// sends QEMU's RARP for the guest to the wire and to the other ports, and the destination
/// takes the MAC's frames right then, before its rings start.
#[test]
fn send_rarp_announces_the_guest_and_moves_its_mac() -> Result<()> {
    let lab = Lab::unique("rarp")?;
    let dir = socket_dir("rarp")?;
    let (src_sock, dst_sock, peer_sock) = (
        dir.join("src.sock"),
        dir.join("dst.sock"),
        dir.join("peer.sock"),
    );
    let (mac, peer_mac) = (guest_mac(0), guest_mac(1));
    let _daemon = Daemon::start_ports(
        &lab,
        &[
            (src_sock.clone(), mac_str(mac)),
            (peer_sock.clone(), mac_str(peer_mac)),
        ],
        &[],
    )?;
    add_target(&Ctl::new(&dir.join("ctl.sock")), &dst_sock, mac, &src_sock)?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let send = |seq: u32| wire.send(&test_frame(mac, wire_mac, seq, 200));

    let (mut src, mut peer) = (frontend(&src_sock, true)?, frontend(&peer_sock, true)?);
    let mut dst = frontend(&dst_sock, false)?;
    std::thread::sleep(Duration::from_millis(300));
    send(1)?;
    let before = seqs(&mut src, QUIET)?;
    ensure!(
        before == [1],
        "the source before the announcement: {before:?}"
    );

    // The migrated guest is announced: the RARP goes out, once, as QEMU builds it.
    dst.send_rarp(mac)?;
    let rarps = wire.recv_until(Duration::from_secs(3), |got| {
        got.iter()
            .any(|f| announcement(f, mac) == Some(Announcement::Rarp))
    });
    let rarp = rarps
        .iter()
        .find(|f| announcement(f, mac) == Some(Announcement::Rarp))
        .context("no RARP on the wire")?;
    ensure!(rarp.len() == 60, "a RARP of {} bytes", rarp.len());
    let at_peer = peer.recv_and_repost(usize::MAX, Duration::from_secs(2), 2048, 256)?;
    ensure!(
        at_peer
            .iter()
            .any(|f| announcement(f, mac) == Some(Announcement::Rarp)),
        "the other port got no RARP ({} frames)",
        at_peer.len()
    );
    // The MAC's frames left the source with the announcement, before the rings start ...
    send(2)?;
    ensure!(
        seqs(&mut src, QUIET)?.is_empty(),
        "the source still gets the MAC's frames after SEND_RARP"
    );
    // ... and reach the destination once they do.
    dst.start_rings()?;
    dst.post_rx_buffers(256, 2048)?;
    send(3)?;
    ensure!(
        seqs(&mut dst, Duration::from_secs(2))?.contains(&3),
        "the destination after its rings started"
    );
    Ok(())
}
