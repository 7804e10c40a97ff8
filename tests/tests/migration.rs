//! Migration between two ports of one daemon, with the project's frontend playing the two
//! QEMUs: the destination port is added with `migrate_from` and the source's MAC, the source
//! keeps the MAC's frames while the destination's frontend is connected but its rings are
//! not started (QEMU's `-incoming` side during the migration), and the frames move to the
//! destination when it starts them (the migrated guest runs). Needs root; `cargo xtask test`
//! runs it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::frames::{test_frame, test_seq};
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
    let added = add_port(&ctl, &dst_sock, mac, Some(&src_sock))?;
    ensure!(added.contains(r#""ok":true"#), "add-port: {added}");

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
