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
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
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

/// Sends test frames numbered from `first`, one every 50 ms, until `fe` receives some (for
/// 3 s at most): the number of the last one sent and the ones `fe` got.
fn send_until_received(
    fe: &mut VirtioNetFrontend,
    send: &dyn Fn(u32) -> std::io::Result<()>,
    first: u32,
) -> Result<Option<(u32, Vec<u32>)>> {
    let started = Instant::now();
    for seq in first.. {
        send(seq)?;
        let got = seqs(fe, Duration::from_millis(50))?;
        if !got.is_empty() {
            return Ok(Some((seq, got)));
        }
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    Ok(None)
}

/// A migration's destination connects to `socket` without starting its rings, as QEMU's
/// `-incoming` side does; frame `seq` still reaches `holder`, the port the guest runs on.
fn connect_destination(
    socket: &Path,
    holder: &mut VirtioNetFrontend,
    send: &dyn Fn(u32) -> std::io::Result<()>,
    seq: u32,
) -> Result<VirtioNetFrontend> {
    let dst = frontend(socket, false)?;
    std::thread::sleep(Duration::from_millis(600));
    send(seq)?;
    // A frame that must arrive is waited for longer than one that must not (the machine may
    // be busy), and no longer than it takes.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut got = Vec::new();
    while !got.contains(&seq) && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let frames = holder.recv_and_repost(1, left, 2048, 256)?;
        got.extend(frames.iter().filter_map(|f| test_seq(f)));
    }
    ensure!(
        got == [seq],
        "the frames left their port before the guest ran elsewhere: {got:?}"
    );
    Ok(dst)
}

/// The migrated guest runs: its rings start, with receive buffers.
fn start_guest(fe: &mut VirtioNetFrontend) -> Result<()> {
    fe.start_rings()?;
    fe.post_rx_buffers(256, 2048)
}

/// The migrated guest's MAC.
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// A daemon in a lab of its own with a port for [`MAC`] (`source`), its migration target
/// (`target`), and `others` (socket file name, MAC); and the wire's end.
struct Setup {
    source: PathBuf,
    target: PathBuf,
    wire: WireSocket,
    wire_mac: [u8; 6],
    _daemon: Daemon,
    dir: SocketDir,
    _lab: Lab,
}

impl Setup {
    fn start(tag: &str, others: &[(&str, [u8; 6])]) -> Result<Setup> {
        let lab = Lab::unique(tag)?;
        let dir = socket_dir(tag)?;
        let (source, target) = (dir.join("src.sock"), dir.join("dst.sock"));
        let specs: Vec<(PathBuf, String)> = std::iter::once((source.clone(), mac_str(MAC)))
            .chain(
                others
                    .iter()
                    .map(|(name, mac)| (dir.join(name), mac_str(*mac))),
            )
            .collect();
        let daemon = Daemon::start_ports(&lab, &specs, &[])?;
        add_target(&Ctl::new(&dir.join("ctl.sock")), &target, MAC, &source)?;
        Ok(Setup {
            source,
            target,
            wire: WireSocket::open(&lab)?,
            wire_mac: lab.wire_mac()?,
            _daemon: daemon,
            dir,
            _lab: lab,
        })
    }

    /// Sends test frame `seq` from the wire to `mac`.
    fn send_to(&self, mac: [u8; 6], seq: u32) -> std::io::Result<()> {
        self.wire.send(&test_frame(mac, self.wire_mac, seq, 200))
    }
}

/// Adds `socket` as the migration target of the port at `source`.
fn add_target(ctl: &Ctl, socket: &Path, mac: [u8; 6], source: &Path) -> Result<()> {
    let added = add_port(ctl, socket, mac, Some(source))?;
    ensure!(added.contains(r#""ok":true"#), "add-port: {added}");
    Ok(())
}

#[test]
fn the_mac_moves_to_the_destination_when_its_guest_starts() -> Result<()> {
    let (lab, mac) = (Setup::start("migrate", &[])?, MAC);
    let (src_sock, dst_sock, dir) = (&lab.source, &lab.target, &lab.dir);
    let ctl = Ctl::new(&dir.join("ctl.sock"));
    let send = |seq: u32| lab.send_to(mac, seq);

    // Only the source's own MAC, and a MAC only a migration target may share.
    let other: PathBuf = dir.join("other.sock");
    let refused = add_port(&ctl, &other, guest_mac(5), Some(src_sock))?;
    ensure!(refused.contains("not this port's"), "other MAC: {refused}");
    let refused = add_port(&ctl, &other, mac, None)?;
    ensure!(refused.contains("two ports"), "shared MAC: {refused}");

    let mut src = frontend(src_sock, true)?;
    std::thread::sleep(Duration::from_millis(300));
    send(1)?;
    ensure!(
        seqs(&mut src, QUIET)? == [1],
        "the source receives before the migration"
    );

    // The destination connects (features, memory table) without starting its rings.
    let mut dst = connect_destination(dst_sock, &mut src, &send, 2)?;

    // The migrated guest runs: its rings start, and the frames follow it.
    start_guest(&mut dst)?;
    let started = Instant::now();
    let Some((first, got)) = send_until_received(&mut dst, &send, 100)? else {
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
    let (lab, mac) = (Setup::start("rarp", &[("peer.sock", guest_mac(1))])?, MAC);
    let (src_sock, dst_sock, wire) = (&lab.source, &lab.target, &lab.wire);
    let peer_sock = lab.dir.join("peer.sock");
    let send = |seq: u32| lab.send_to(mac, seq);

    let (mut src, mut peer) = (frontend(src_sock, true)?, frontend(&peer_sock, true)?);
    let mut dst = frontend(dst_sock, false)?;
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

/// The way back: after the switch-over the port the guest left is the target of the next
/// migration. Its old frontend (whose rings still run) never pulls the MAC back; a new one
/// (QEMU's `-incoming` on that port) takes it when its rings start, and then the other port
/// is the target again.
#[test]
fn the_port_a_guest_left_takes_it_back_from_a_new_frontend() -> Result<()> {
    let (lab, mac) = (Setup::start("migback", &[])?, MAC);
    let (a_sock, b_sock, wire) = (&lab.source, &lab.target, &lab.wire);
    let send = |seq: u32| lab.send_to(mac, seq);
    let moved_to = |fe: &mut VirtioNetFrontend, first: u32| send_until_received(fe, &send, first);

    let mut a = frontend(a_sock, true)?;
    let mut b = frontend(b_sock, true)?;
    ensure!(
        moved_to(&mut b, 100)?.is_some(),
        "the MAC did not move to b"
    );
    // a's rings still run (this frontend does not stop them as QEMU would): the MAC stays.
    std::thread::sleep(Duration::from_millis(500));
    // (a may still hold frames sent before the switch-over.)
    send(200)?;
    let late = seqs(&mut a, QUIET)?;
    ensure!(!late.contains(&200), "a took the MAC back: {late:?}");
    ensure!(seqs(&mut b, QUIET)?.contains(&200), "b lost the MAC");

    // a's QEMU goes, a new one migrates the guest back.
    drop(a);
    let mut a2 = connect_destination(a_sock, &mut b, &send, 300)?;
    start_guest(&mut a2)?;
    ensure!(
        moved_to(&mut a2, 400)?.is_some(),
        "the MAC did not come back to a"
    );
    // (b may still hold frames sent before the switch-over.)
    send(500)?;
    let late = seqs(&mut b, QUIET)?;
    ensure!(!late.contains(&500), "b after the way back: {late:?}");

    // And there again: b's frontend goes, a new one starts and announces itself.
    drop(b);
    let mut b2 = frontend(b_sock, false)?;
    b2.send_rarp(mac)?;
    // The switch-over runs before the RARP goes out.
    let rarp = wire.recv_until(Duration::from_secs(3), |got| {
        got.iter()
            .any(|f| announcement(f, mac) == Some(Announcement::Rarp))
    });
    ensure!(
        rarp.iter().any(|f| announcement(f, mac).is_some()),
        "no RARP after b2's announcement"
    );
    send(600)?;
    let late = seqs(&mut a2, QUIET)?;
    ensure!(!late.contains(&600), "a after b2's announcement: {late:?}");
    Ok(())
}
