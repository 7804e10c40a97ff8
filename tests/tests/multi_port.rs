//! Several VM ports on one NIC: the in-daemon switch, anti-spoofing, ports added and removed
//! at runtime, the control socket's answers to bad requests, and the metrics endpoint.
//! The project's own frontend plays each VM. Needs root; `cargo xtask test` runs it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::{tagged, test_frame, test_seq, BROADCAST};
use xvdpa_tests::frontend::{
    FrontendOptions, VirtioNetFrontend, RX_QUEUE, TX_QUEUE, VIRTIO_RING_F_EVENT_IDX,
};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for a frame that must not arrive.
const QUIET: Duration = Duration::from_millis(400);

struct Setup {
    lab: Lab,
    daemon: Daemon,
    wire: WireSocket,
    wire_mac: [u8; 6],
    dir: SocketDir,
    sockets: Vec<PathBuf>,
    ctl: Ctl,
}

fn setup(tag: &str, ports: u8, extra: &[&str]) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let specs: Vec<(PathBuf, String)> = (0..ports)
        .map(|i| (dir.join(format!("vm{i}.sock")), mac_str(guest_mac(i))))
        .collect();
    let daemon = Daemon::start_ports(&lab, &specs, extra)?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let ctl = Ctl::new(&dir.join("ctl.sock"));
    Ok(Setup {
        lab,
        daemon,
        wire,
        wire_mac,
        sockets: specs.into_iter().map(|(s, _)| s).collect(),
        dir,
        ctl,
    })
}

/// Connects a frontend to `socket` with receive buffers posted, and waits until the daemon's
/// switch can reach its receive queue (published on the worker's first event).
fn vm(socket: &std::path::Path) -> Result<VirtioNetFrontend> {
    let mut opts = FrontendOptions::default();
    opts.features |= VIRTIO_RING_F_EVENT_IDX;
    let mut fe = VirtioNetFrontend::connect(socket, opts)?;
    fe.post_rx_buffers(256, 2048)?;
    // The worker's housekeeping timer (200 ms) guarantees an event even without traffic.
    std::thread::sleep(Duration::from_millis(300));
    Ok(fe)
}

/// Sends `frame` from `fe` and returns once the device used the chain.
fn send(fe: &mut VirtioNetFrontend, frame: &[u8]) -> Result<()> {
    fe.send_and_wait(frame, 1, WAIT)
}

/// Frames with sequence numbers in `seqs` that `fe` receives within `within`.
fn received(fe: &mut VirtioNetFrontend, want: usize, within: Duration) -> Result<Vec<Vec<u8>>> {
    fe.recv_and_repost(want, within, 2048, 256)
}

fn wire_saw(s: &Setup, seq: u32) -> bool {
    s.wire
        .recv_until(QUIET, |g| g.iter().any(|f| test_seq(f) == Some(seq)))
        .iter()
        .any(|f| test_seq(f) == Some(seq))
}

#[test]
fn two_vms_switch_locally_share_broadcasts_and_cannot_spoof() -> Result<()> {
    let s = setup("mp2", 2, &[])?;
    let (mut a, mut b) = (vm(&s.sockets[0])?, vm(&s.sockets[1])?);

    // A -> B and B -> A: switched inside the daemon, at several sizes, never on the wire.
    for (i, len) in [60usize, 200, 1514].into_iter().enumerate() {
        let f = test_frame(guest_mac(1), guest_mac(0), 100 + i as u32, len);
        send(&mut a, &f)?;
        let got = received(&mut b, 1, WAIT)?;
        ensure!(
            got == vec![f],
            "B got {:?} for a {len}-byte frame from A",
            got.iter().map(|g| g.len()).collect::<Vec<_>>()
        );
        let f = test_frame(guest_mac(0), guest_mac(1), 200 + i as u32, len);
        send(&mut b, &f)?;
        ensure!(
            received(&mut a, 1, WAIT)? == vec![f],
            "A did not get B's {len}-byte frame"
        );
    }
    ensure!(
        !wire_saw(&s, 100),
        "a frame switched between VMs leaked onto the wire"
    );

    // The wire reaches each VM by its MAC, and only that VM.
    let to_a = test_frame(guest_mac(0), s.wire_mac, 300, 100);
    let to_b = test_frame(guest_mac(1), s.wire_mac, 301, 100);
    s.wire.send(&to_a)?;
    s.wire.send(&to_b)?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![to_a],
        "A did not get its frame from the wire"
    );
    ensure!(
        received(&mut b, 1, WAIT)? == vec![to_b],
        "B did not get its frame from the wire"
    );

    // A VM reaches the wire; the other VM does not see it.
    let out = test_frame(s.wire_mac, guest_mac(0), 400, 300);
    send(&mut a, &out)?;
    ensure!(wire_saw(&s, 400), "A's frame to the wire did not arrive");
    ensure!(
        received(&mut b, 1, QUIET)?.is_empty(),
        "B saw a unicast frame for the wire"
    );

    // A broadcast from a VM reaches the wire and the other VM, not the sender.
    let bcast = test_frame(BROADCAST, guest_mac(0), 500, 120);
    send(&mut a, &bcast)?;
    ensure!(
        received(&mut b, 1, WAIT)? == vec![bcast.clone()],
        "B did not get A's broadcast"
    );
    ensure!(wire_saw(&s, 500), "A's broadcast did not reach the wire");
    ensure!(
        received(&mut a, 1, QUIET)?.is_empty(),
        "A got its own broadcast back"
    );

    // A broadcast from the wire reaches both VMs.
    let wb = test_frame(BROADCAST, s.wire_mac, 600, 90);
    s.wire.send(&wb)?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![wb.clone()],
        "A missed the wire's broadcast"
    );
    ensure!(
        received(&mut b, 1, WAIT)? == vec![wb],
        "B missed the wire's broadcast"
    );

    // A forged source MAC goes nowhere and is counted.
    let forged = test_frame(guest_mac(1), [0x52, 0x54, 0, 0xde, 0xad, 0x01], 700, 100);
    send(&mut a, &forged)?;
    let forged_wire = test_frame(s.wire_mac, guest_mac(1), 701, 100);
    send(&mut a, &forged_wire)?;
    ensure!(
        received(&mut b, 1, QUIET)?.is_empty(),
        "B got a frame with a forged source"
    );
    ensure!(
        !wire_saw(&s, 701),
        "a frame with B's MAC as source left through A"
    );
    ensure!(
        s.ctl.counter(0, "tx_dropped_spoofed")? == 2,
        "spoofed counter: {}",
        s.ctl.stats()?
    );

    let stats = s.ctl.stats()?;
    ensure!(
        s.ctl.counter(0, "tx_switched")? >= 4,
        "A tx_switched (3 unicast + 1 broadcast): {stats}"
    );
    ensure!(
        s.ctl.counter(1, "rx_switched")? >= 4,
        "B rx_switched: {stats}"
    );
    // The human table shows both ports.
    let table = s.ctl.cli(&["stats"], &[])?;
    ensure!(
        table.contains(&mac_str(guest_mac(0))) && table.contains(&mac_str(guest_mac(1))),
        "stats table:\n{table}"
    );
    ensure!(
        table.contains("tx_dropped_spoofed=2"),
        "stats table lacks the spoof drops:\n{table}"
    );
    drop((a, b));
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// Lock-step traffic on two established ports: A -> B through the switch and wire -> A
/// through XDP, one window at a time so no guest ring ever runs dry. Returns frames moved.
fn stream(
    s: &Setup,
    a: &mut VirtioNetFrontend,
    b: &mut VirtioNetFrontend,
    stop: &AtomicBool,
) -> Result<u32> {
    const WINDOW: u32 = 32;
    let mut seq = 0u32;
    while !stop.load(Ordering::Acquire) {
        for i in 0..WINDOW {
            a.send(
                &test_frame(guest_mac(1), guest_mac(0), seq + i, 128),
                1,
                false,
            )?;
            s.wire
                .send(&test_frame(guest_mac(0), s.wire_mac, seq + i, 128))?;
        }
        a.kick(TX_QUEUE)?;
        let to_b = b.recv_frames(WINDOW as usize, WAIT)?;
        let to_a = a.recv_frames(WINDOW as usize, WAIT)?;
        a.reclaim_used(TX_QUEUE)?;
        for (who, got) in [("B", &to_b), ("A", &to_a)] {
            let seqs: Vec<u32> = got.iter().filter_map(|(_, f)| test_seq(f)).collect();
            if seqs != (seq..seq + WINDOW).collect::<Vec<_>>() {
                bail!(
                    "{who} lost frames in window {seq}..{}: got {seqs:?}",
                    seq + WINDOW
                );
            }
        }
        b.post_rx_buffers(b.free_descriptors(RX_QUEUE).min(256), 2048)?;
        a.post_rx_buffers(a.free_descriptors(RX_QUEUE).min(256), 2048)?;
        seq += WINDOW;
    }
    Ok(seq)
}

#[test]
fn ports_added_and_removed_at_runtime_leave_the_others_untouched() -> Result<()> {
    let s = setup("mprt", 2, &[])?;
    let (mut a, mut b) = (vm(&s.sockets[0])?, vm(&s.sockets[1])?);
    let stop = Arc::new(AtomicBool::new(false));

    let third = s.dir.join("vm2.sock");
    let ctl = Ctl::new(&s.ctl.path);
    let lab_wire_mac = s.wire_mac;
    // A second wire socket for the churn thread (the first one sees the stream's frames).
    let wire = WireSocket::open(&s.lab)?;
    let stopper = stop.clone();
    let third_c = third.clone();
    let churn = std::thread::spawn(move || -> Result<()> {
        let result = (|| -> Result<()> {
            std::thread::sleep(Duration::from_millis(300));
            let out = ctl.cli(
                &["ctl"],
                &[
                    "add-port",
                    "--socket",
                    third_c.to_str().unwrap(),
                    "--mac",
                    &mac_str(guest_mac(2)),
                ],
            )?;
            ensure!(out.contains(&mac_str(guest_mac(2))), "add-port said: {out}");
            let list = ctl.cli(&["ctl"], &["list"])?;
            ensure!(list.lines().count() == 4, "list after add:\n{list}");
            // The new port works: the wire reaches a VM on it.
            let mut c = vm(&third_c)?;
            let f = test_frame(guest_mac(2), lab_wire_mac, 9000, 100);
            wire.send(&f)?;
            let got = c.recv_frames(1, WAIT)?;
            ensure!(
                got.len() == 1 && got[0].1 == f,
                "the added port's VM did not get its frame"
            );
            std::thread::sleep(Duration::from_millis(300));
            drop(c);
            ctl.cli(&["ctl"], &["del-port", &mac_str(guest_mac(2))])?;
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        })();
        stopper.store(true, Ordering::Release);
        result
    });
    let moved = stream(&s, &mut a, &mut b, &stop);
    stop.store(true, Ordering::Release);
    churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    let moved = moved?;
    eprintln!("streamed {moved} frames per direction while a port was added, used and removed");
    ensure!(
        moved >= 64,
        "only {moved} frames per direction streamed during the churn"
    );

    // Removal freed the port: socket file gone, not listed, its MAC back with the host.
    ensure!(!third.exists(), "del-port left {} behind", third.display());
    let list = s.ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(
        list["ports"].as_array().map(|p| p.len()) == Some(2),
        "list after del: {list}"
    );
    let before = s.ctl.xdp_counter("passed_unknown_unicast")?;
    s.wire
        .send(&test_frame(guest_mac(2), s.wire_mac, 9100, 100))?;
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        s.ctl.xdp_counter("passed_unknown_unicast")? > before,
        "the removed port's MAC is still steered"
    );
    // The slot is reusable with the same socket path and MAC.
    let again = s.ctl.raw(&format!(
        r#"{{"cmd":"add-port","socket":"{}","mac":"{}"}}"#,
        third.display(),
        mac_str(guest_mac(2))
    ))?;
    ensure!(again["ok"] == true, "re-adding the removed port: {again}");
    let c = vm(&third)?;
    drop(c);

    for port in [0, 1] {
        for counter in [
            "rx_dropped_guest_ring_full",
            "rx_dropped_queue_stopped",
            "rx_dropped_xsk_ring_full",
            "queue_errors",
        ] {
            let v = s.ctl.counter(port, counter)?;
            ensure!(v == 0, "port {port} {counter}={v} during the churn");
        }
    }
    drop((a, b));
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn control_socket_answers_bad_requests_with_errors_and_keeps_serving() -> Result<()> {
    let s = setup("mpctl", 1, &[])?;
    let mut a = vm(&s.sockets[0])?;
    let mode = std::fs::metadata(&s.ctl.path)?.permissions();
    ensure!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o600,
        "control socket mode {:o}",
        std::os::unix::fs::PermissionsExt::mode(&mode)
    );

    // The port's vhost-user socket: group-accessible (a QEMU running as its own user in the
    // daemon's group), nobody else; and no helper socket or directory left beside it.
    let port_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&s.sockets[0])?.permissions());
    ensure!(port_mode & 0o777 == 0o660, "port socket mode {port_mode:o}");
    let stray: Vec<_> = std::fs::read_dir(&s.dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    ensure!(stray.is_empty(), "left beside the sockets: {stray:?}");
    // A port with the group and mode the operator chose (a QEMU's group) has them.
    let grouped = s.dir.join("grouped.sock");
    s.ctl.cli(
        &["ctl"],
        &[
            "add-port",
            "--socket",
            grouped.to_str().unwrap(),
            "--mac",
            &mac_str(guest_mac(7)),
            "--socket-group",
            "nogroup",
            "--socket-mode",
            "0640",
        ],
    )?;
    let mut grouped_meta = None;
    for _ in 0..50 {
        if let Ok(m) = std::fs::metadata(&grouped) {
            grouped_meta = Some(m);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let grouped_meta = grouped_meta.context("the grouped port's socket never appeared")?;
    let (gid, mode) = (
        std::os::unix::fs::MetadataExt::gid(&grouped_meta),
        std::os::unix::fs::PermissionsExt::mode(&grouped_meta.permissions()) & 0o777,
    );
    ensure!(
        (gid, mode) == (65534, 0o640),
        "grouped port socket: gid {gid}, mode {mode:o}"
    );
    let listed = s.ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(
        listed["ports"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["socket_group"] == "nogroup" && p["socket_mode"] == "0640")),
        "list does not show the socket's group and mode: {listed}"
    );
    s.ctl
        .cli(&["ctl"], &["del-port", grouped.to_str().unwrap()])?;

    let taken = s.sockets[0].display().to_string();
    let fresh = s.dir.join("new.sock").display().to_string();
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "malformed request"),
        ("[]".into(), "malformed request"),
        (r#"{"cmd":"reboot"}"#.into(), "malformed request"),
        (
            r#"{"cmd":"del-port","port":"52:54:00:99:99:99"}"#.into(),
            "no port matches",
        ),
        (
            r#"{"cmd":"del-port","port":"/nowhere.sock"}"#.into(),
            "no port matches",
        ),
        (
            format!(
                r#"{{"cmd":"add-port","socket":"{fresh}","mac":"{}"}}"#,
                mac_str(guest_mac(0))
            ),
            "is given to two ports",
        ),
        (
            format!(
                r#"{{"cmd":"add-port","socket":"{taken}","mac":"{}"}}"#,
                mac_str(guest_mac(5))
            ),
            "is given to two ports",
        ),
        (
            format!(r#"{{"cmd":"add-port","socket":"{fresh}","mac":"ff:ff:ff:ff:ff:ff"}}"#),
            "unicast",
        ),
        (
            format!(r#"{{"cmd":"add-port","socket":"{fresh}","mac":"52:54:00"}}"#),
            "invalid MAC",
        ),
        (
            format!(
                r#"{{"cmd":"add-port","socket":"relative.sock","mac":"{}"}}"#,
                mac_str(guest_mac(5))
            ),
            "absolute path",
        ),
        (
            format!(
                r#"{{"cmd":"add-port","socket":"{fresh}","mac":"{}","rate_pps":0}}"#,
                mac_str(guest_mac(5))
            ),
            "at least 1",
        ),
        (
            format!(
                r#"{{"cmd":"add-port","socket":"{fresh}","mac":"{}","socket_group":"xvdpa-no-such-group"}}"#,
                mac_str(guest_mac(5))
            ),
            "socket_group: no such group \"xvdpa-no-such-group\"",
        ),
        (
            format!(
                r#"{{"cmd":"add-port","socket":"{fresh}","mac":"{}","socket_mode":"0999"}}"#,
                mac_str(guest_mac(5))
            ),
            "expected octal permission bits",
        ),
    ];
    for (req, want) in &cases {
        let reply = s.ctl.raw(req)?;
        ensure!(reply["ok"] == false, "{req} was accepted: {reply}");
        let err = reply["error"].as_str().unwrap_or_default();
        ensure!(
            err.contains(want),
            "{req}: error {err:?} does not say {want:?}"
        );
    }
    // A line far over the limit is refused and the connection closed; the daemon lives on.
    {
        let mut c = std::os::unix::net::UnixStream::connect(&s.ctl.path)?;
        c.set_read_timeout(Some(WAIT))?;
        let _ = c.write_all(&vec![b'x'; 100_000]);
        let _ = c.write_all(b"\n");
        let mut reply = String::new();
        let _ = c.read_to_string(&mut reply);
        ensure!(
            reply.contains("longer than"),
            "oversized request reply: {reply:?}"
        );
    }
    // The CLI prints the daemon's reason and fails.
    let err = s
        .ctl
        .cli(&["ctl"], &["del-port", "7"])
        .unwrap_err()
        .to_string();
    ensure!(err.contains("no port matches \"7\""), "{err}");
    ensure!(
        !s.dir.join("new.sock").exists(),
        "a refused add-port left a socket"
    );

    // Unharmed: the port still passes traffic, the list is as before.
    let f = test_frame(guest_mac(0), s.wire_mac, 1, 100);
    s.wire.send(&f)?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![f],
        "the port stopped working"
    );
    let list = s.ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(list["ports"][0]["state"] == "connected", "{list}");
    drop(a);
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn metrics_endpoint_serves_prometheus_text() -> Result<()> {
    let port = 19000 + (std::process::id() % 1000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let s = setup("mpmet", 1, &["--metrics", &addr])?;
    let mut a = vm(&s.sockets[0])?;
    let f = test_frame(guest_mac(0), s.wire_mac, 1, 100);
    s.wire.send(&f)?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![f],
        "frame did not arrive"
    );

    let get = |path: &'static str| -> Result<String> {
        let addr = addr.clone();
        let text = xvdpa_tests::netns::in_netns(&s.lab.host_ns, move || {
            let mut c = std::net::TcpStream::connect(&addr)?;
            c.set_read_timeout(Some(WAIT))?;
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })?;
        Ok(text)
    };
    // Counters are added before the guest is notified, so they already show the frame.
    let body = get("/metrics").context("GET /metrics")?;
    ensure!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    ensure!(
        body.contains("xvdpa_xdp_frames_total{iface=\"nic0\",action=\"steered\"} 1"),
        "{body}"
    );
    ensure!(body.contains("xvdpa_port_connected{"), "{body}");
    let rx = body
        .lines()
        .find(|l| l.starts_with("xvdpa_rx_packets_total{"))
        .context("no rx_packets")?;
    ensure!(rx.ends_with(" 1"), "{rx}");
    ensure!(
        body.contains("xvdpa_rx_dropped_total{") && body.contains("reason=\"guest_ring_full\"}"),
        "{body}"
    );
    ensure!(
        get("/other")?.starts_with("HTTP/1.1 404"),
        "non-metrics path not refused"
    );
    drop(a);
    s.daemon.stop()?;
    Ok(())
}

/// Wire frames (tags put back in place) carrying sequence number `seq`, untagged first.
fn wire_frames_with(s: &Setup, seq: u32) -> Vec<Vec<u8>> {
    s.wire.frames_with_seq(seq, QUIET)
}

#[test]
fn vlan_ports_tag_on_the_wire_and_switch_only_within_their_vlan() -> Result<()> {
    let lab = Lab::unique("mpvlan")?;
    let dir = socket_dir("mpvlan")?;
    let sock = |i: u8| dir.join(format!("vm{i}.sock"));
    let spec = |i: u8, vlan: &str| Daemon::port_spec(&sock(i), guest_mac(i), vlan);
    let (p0, p1, p2) = (spec(0, ",vlan=100"), spec(1, ",vlan=100"), spec(2, ""));
    let ctl_path = dir.join("ctl.sock");
    let ctl_s = ctl_path.to_str().unwrap();
    let mut daemon = Daemon::spawn(
        &lab,
        &["--ctl", ctl_s, "--port", &p0, "--port", &p1, "--port", &p2],
    )?;
    daemon.wait_for_count("port ready for a frontend", 3, Duration::from_secs(20))?;
    let s = Setup {
        wire: WireSocket::open(&lab)?,
        wire_mac: lab.wire_mac()?,
        lab,
        daemon,
        sockets: (0..3).map(sock).collect(),
        dir,
        ctl: Ctl::new(&ctl_path),
    };
    let (mut a, mut b, mut c) = (vm(&s.sockets[0])?, vm(&s.sockets[1])?, vm(&s.sockets[2])?);

    // Wire -> VLAN 100 port: the tagged frame arrives untagged; untagged or another VLAN's
    // frames for the same MAC do not arrive.
    let plain = test_frame(guest_mac(0), s.wire_mac, 1, 200);
    s.wire.send(&tagged(&plain, 100))?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![plain.clone()],
        "A did not get its tagged frame untagged"
    );
    s.wire.send(&test_frame(guest_mac(0), s.wire_mac, 2, 200))?;
    s.wire
        .send(&tagged(&test_frame(guest_mac(0), s.wire_mac, 3, 200), 200))?;
    ensure!(
        received(&mut a, 1, QUIET)?.is_empty(),
        "A got an untagged or VLAN 200 frame"
    );
    // The untagged port gets untagged frames only.
    let plain_c = test_frame(guest_mac(2), s.wire_mac, 4, 200);
    s.wire.send(&tagged(&plain_c, 100))?;
    ensure!(
        received(&mut c, 1, QUIET)?.is_empty(),
        "the untagged port got a VLAN 100 frame"
    );
    s.wire.send(&plain_c)?;
    ensure!(
        received(&mut c, 1, WAIT)? == vec![plain_c],
        "the untagged port missed its frame"
    );

    // VLAN 100 port -> wire: tagged with 100.
    let out = test_frame(s.wire_mac, guest_mac(0), 10, 300);
    send(&mut a, &out)?;
    let seen = wire_frames_with(&s, 10);
    ensure!(
        seen == vec![tagged(&out, 100)],
        "A's frame on the wire: {:?}",
        seen.iter().map(|f| f.len()).collect::<Vec<_>>()
    );

    // Within VLAN 100, A and B switch locally; A cannot reach C (another domain) that way.
    let ab = test_frame(guest_mac(1), guest_mac(0), 20, 150);
    send(&mut a, &ab)?;
    ensure!(
        received(&mut b, 1, WAIT)? == vec![ab],
        "B did not get A's frame"
    );
    ensure!(
        wire_frames_with(&s, 20).is_empty(),
        "A->B left through the NIC"
    );
    let ac = test_frame(guest_mac(2), guest_mac(0), 21, 150);
    send(&mut a, &ac)?;
    ensure!(
        received(&mut c, 1, QUIET)?.is_empty(),
        "A reached the untagged port across VLANs"
    );
    ensure!(
        wire_frames_with(&s, 21) == vec![tagged(&ac, 100)],
        "A->C did not leave tagged"
    );

    // Broadcasts stay in their domain, both ways.
    let wb = test_frame(BROADCAST, s.wire_mac, 30, 100);
    s.wire.send(&tagged(&wb, 100))?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![wb.clone()],
        "A missed VLAN 100's broadcast"
    );
    ensure!(
        received(&mut b, 1, WAIT)? == vec![wb.clone()],
        "B missed VLAN 100's broadcast"
    );
    ensure!(
        received(&mut c, 1, QUIET)?.is_empty(),
        "the untagged port got VLAN 100's broadcast"
    );
    let ab_b = test_frame(BROADCAST, guest_mac(0), 31, 100);
    send(&mut a, &ab_b)?;
    ensure!(
        received(&mut b, 1, WAIT)? == vec![ab_b.clone()],
        "B missed A's broadcast"
    );
    ensure!(
        received(&mut c, 1, QUIET)?.is_empty(),
        "C got VLAN 100's broadcast from A"
    );
    ensure!(
        wire_frames_with(&s, 31) == vec![tagged(&ab_b, 100)],
        "A's broadcast did not leave tagged"
    );
    let list = s.ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(
        list["ports"][0]["vlan"] == 100 && list["ports"][2]["vlan"].is_null(),
        "{list}"
    );
    drop((a, b, c));
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn rate_limited_port_is_policed_and_counts_what_it_drops() -> Result<()> {
    let lab = Lab::unique("mprate")?;
    let dir = socket_dir("mprate")?;
    let sock = dir.join("vm0.sock");
    let ctl_path = dir.join("ctl.sock");
    let spec = format!(
        "socket={},mac={},rate-pps=1000",
        sock.display(),
        mac_str(guest_mac(0))
    );
    let mut daemon = Daemon::spawn(
        &lab,
        &["--ctl", ctl_path.to_str().unwrap(), "--port", &spec],
    )?;
    daemon.wait_for_log("port ready for a frontend", Duration::from_secs(20))?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let ctl = Ctl::new(&ctl_path);
    let mut a = vm(&sock)?;
    // 200 frames at once: far over 1000 pps with its 5 ms burst (5 frames).
    for i in 0..200 {
        a.send(&test_frame(wire_mac, guest_mac(0), i, 100), 1, false)?;
    }
    a.kick(TX_QUEUE)?;
    ensure!(
        a.wait_tx_used(200, WAIT)? == 200,
        "the device did not use every chain"
    );
    let got = wire
        .recv_until(QUIET, |_| false)
        .into_iter()
        .filter(|f| test_seq(f).is_some())
        .count() as u64;
    let dropped = ctl.counter(0, "tx_dropped_rate_limited")?;
    let sent = ctl.counter(0, "tx_packets")?;
    eprintln!("[test] 200 frames in a burst at 1000 pps: {sent} sent, {dropped} policed, {got} on the wire");
    ensure!(
        sent + dropped == 200,
        "sent {sent} + policed {dropped} != 200"
    );
    ensure!(got == sent, "the wire saw {got}, the port counted {sent}");
    ensure!(
        (5..=40).contains(&sent),
        "{sent} frames passed a 1000 pps policer in a burst"
    );
    // After a pause the bucket has refilled: a frame passes again.
    std::thread::sleep(Duration::from_millis(50));
    send(&mut a, &test_frame(wire_mac, guest_mac(0), 999, 100))?;
    ensure!(
        wire.recv_until(QUIET, |g| g.iter().any(|f| test_seq(f) == Some(999)))
            .iter()
            .any(|f| test_seq(f) == Some(999)),
        "no frame passed after the pause"
    );
    drop(a);
    daemon.stop()?;
    Ok(())
}

#[test]
fn promiscuous_port_also_gets_unicast_nobody_owns() -> Result<()> {
    let lab = Lab::unique("mppromisc")?;
    let dir = socket_dir("mppromisc")?;
    let sock = |i: u8| dir.join(format!("vm{i}.sock"));
    let a = format!(
        "socket={},mac={},promisc=on",
        sock(0).display(),
        mac_str(guest_mac(0))
    );
    let b = format!("socket={},mac={}", sock(1).display(), mac_str(guest_mac(1)));
    let ctl_path = dir.join("ctl.sock");
    let mut daemon = Daemon::spawn(
        &lab,
        &[
            "--ctl",
            ctl_path.to_str().unwrap(),
            "--port",
            &a,
            "--port",
            &b,
        ],
    )?;
    daemon.wait_for_count("port ready for a frontend", 2, Duration::from_secs(20))?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let (mut pa, mut pb) = (vm(&sock(0))?, vm(&sock(1))?);

    let stranger = test_frame([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc], wire_mac, 1, 100);
    wire.send(&stranger)?;
    ensure!(
        received(&mut pa, 1, WAIT)? == vec![stranger],
        "the promiscuous port missed unknown unicast"
    );
    ensure!(
        received(&mut pb, 1, QUIET)?.is_empty(),
        "a normal port got unknown unicast"
    );
    // Traffic XDP steers to another port stays that port's, as on a switch.
    let to_b = test_frame(guest_mac(1), wire_mac, 2, 100);
    wire.send(&to_b)?;
    ensure!(
        received(&mut pb, 1, WAIT)? == vec![to_b],
        "B missed its frame"
    );
    ensure!(
        received(&mut pa, 1, QUIET)?.is_empty(),
        "the promiscuous port saw B's steered frame"
    );
    let ctl = Ctl::new(&ctl_path);
    ensure!(
        ctl.raw(r#"{"cmd":"list"}"#)?["ports"][0]["promisc"] == true,
        "list does not show promisc"
    );
    drop((pa, pb));
    daemon.stop()?;
    Ok(())
}

fn still_running(daemon: &mut Daemon) -> Result<()> {
    ensure!(
        daemon.try_wait()?.is_none(),
        "the daemon died:\n{}",
        daemon.output()
    );
    Ok(())
}

/// Port `i` (frontend `fe`) gets a frame from the wire and sends one there, with sequence
/// numbers `seq` and `seq + 1`.
fn forwards_both_ways(s: &Setup, fe: &mut VirtioNetFrontend, i: u8, seq: u32) -> Result<()> {
    let from_wire = test_frame(guest_mac(i), s.wire_mac, seq, 200);
    s.wire.send(&from_wire)?;
    ensure!(
        received(fe, 1, WAIT)? == vec![from_wire],
        "nothing received from the wire"
    );
    send(fe, &test_frame(s.wire_mac, guest_mac(i), seq + 1, 200))?;
    ensure!(wire_saw(s, seq + 1), "nothing sent to the wire");
    Ok(())
}

/// A frontend that shrinks its unsealable guest memory file after handing it over: the
/// daemon's next access to it faults. Only that port may stop (counted, logged once); the
/// daemon lives, the other port keeps forwarding, and the port serves again after a
/// reconnect with good memory.
#[test]
fn guest_memory_shrunk_under_the_daemon_stops_only_that_port() -> Result<()> {
    let mut s = setup("mpshrink", 2, &[])?;
    let (mut a, mut b) = (vm(&s.sockets[0])?, vm(&s.sockets[1])?);
    // A's rings are in use (their indexes past zero) when the memory goes.
    forwards_both_ways(&s, &mut a, 0, 20).context("A, before")?;
    let errors_before = s.ctl.counter(0, "queue_errors")?;

    // From here on the test must not touch A's memory: its own mapping faults too.
    a.shrink_guest_memory(0)?;
    // The daemon reads A's rings on a kick and on a frame from the wire.
    a.kick(TX_QUEUE)?;
    a.kick(RX_QUEUE)?;
    s.wire.send(&test_frame(guest_mac(0), s.wire_mac, 1, 100))?;
    // B -> A through the switch: another port's worker writes into A's memory.
    let _ = send(&mut b, &test_frame(guest_mac(0), guest_mac(1), 2, 100));

    let deadline = std::time::Instant::now() + WAIT;
    while s.ctl.counter(0, "queue_errors").unwrap_or(0) == errors_before
        && std::time::Instant::now() < deadline
    {
        still_running(&mut s.daemon)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    still_running(&mut s.daemon)?;
    ensure!(
        s.ctl.counter(0, "queue_errors")? > errors_before,
        "the lost memory was not counted: {}",
        s.ctl.stats()?
    );

    forwards_both_ways(&s, &mut b, 1, 3).context("B, after A's memory shrank")?;
    // More traffic for A is dropped, not a second fault.
    s.wire.send(&test_frame(guest_mac(0), s.wire_mac, 5, 100))?;
    a.kick(TX_QUEUE)?;
    std::thread::sleep(QUIET);
    still_running(&mut s.daemon)?;
    let log = s.daemon.output();
    ensure!(
        log.matches("guest memory region shrank under the daemon")
            .count()
            == 1,
        "expected one log line for the lost memory:\n{log}"
    );
    // Rings that read the zeros are not the guest's fault, and the loss counts once.
    ensure!(
        !log.contains("guest broke the virtqueue rules"),
        "the lost memory was blamed on the guest:\n{log}"
    );
    ensure!(
        s.ctl.counter(0, "queue_errors")? == errors_before + 1,
        "{}",
        s.ctl.stats()?
    );

    // A reconnects with good memory and is served again.
    drop(a);
    let mut a = vm(&s.sockets[0])?;
    forwards_both_ways(&s, &mut a, 0, 6).context("A, after reconnecting")?;
    drop((a, b));
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// What QEMU's memfd backend does: a memfd that allows sealing. The daemon seals it, so the
/// frontend can no longer shrink it at all.
#[test]
fn sealable_guest_memory_is_sealed_against_shrinking() -> Result<()> {
    let s = setup("mpseal", 1, &[])?;
    let opts = FrontendOptions {
        allow_sealing: true,
        ..FrontendOptions::default()
    };
    let a = VirtioNetFrontend::connect(&s.sockets[0], opts)?;
    let err = a
        .shrink_guest_memory(0)
        .expect_err("the daemon should have sealed the memfd");
    ensure!(
        format!("{err:#}").contains("ermitted"),
        "unexpected error: {err:#}"
    );
    drop(a);
    s.daemon.stop()?;
    Ok(())
}

/// A daemon with one port per entry of `options` (appended to the port's `--port` spec, e.g.
/// `",vlan=100"`), the wire and the control socket.
fn setup_with_options(tag: &str, options: &[&str]) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let sockets: Vec<PathBuf> = (0..options.len())
        .map(|i| dir.join(format!("vm{i}.sock")))
        .collect();
    let specs: Vec<String> = options
        .iter()
        .enumerate()
        .map(|(i, opt)| {
            format!(
                "socket={},mac={}{opt}",
                sockets[i].display(),
                mac_str(guest_mac(i as u8))
            )
        })
        .collect();
    let ctl_path = dir.join("ctl.sock");
    let mut args = vec!["--ctl", ctl_path.to_str().unwrap()];
    for spec in &specs {
        args.extend(["--port", spec.as_str()]);
    }
    let mut daemon = Daemon::spawn(&lab, &args)?;
    daemon.wait_for_count(
        "port ready for a frontend",
        options.len(),
        Duration::from_secs(20),
    )?;
    Ok(Setup {
        wire: WireSocket::open(&lab)?,
        wire_mac: lab.wire_mac()?,
        lab,
        daemon,
        sockets,
        dir,
        ctl: Ctl::new(&ctl_path),
    })
}

/// Frames the wire sees within [`QUIET`] whose source MAC is `src`.
fn wire_frames_from(s: &Setup, src: [u8; 6]) -> Vec<Vec<u8>> {
    let from = |f: &Vec<u8>| f.len() >= 12 && f[6..12] == src;
    s.wire
        .recv_until(QUIET, |g| g.iter().any(from))
        .into_iter()
        .filter(from)
        .collect()
}

/// `frame` with a tag of protocol `tpid` and TCI `tci` after the MAC addresses.
fn with_tag(frame: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
    [
        &frame[..12],
        &tpid.to_be_bytes()[..],
        &tci.to_be_bytes()[..],
        &frame[12..],
    ]
    .concat()
}

/// A guest may not put frames on a VLAN of its choosing: tags it adds itself (802.1Q,
/// 802.1ad, priority tags) are dropped and counted, from an untagged port and (as QinQ) from
/// a tagged one. Priority-tagged frames from the wire reach an untagged port without the tag.
#[test]
fn guests_cannot_send_vlan_tags_of_their_own_and_priority_tags_come_off() -> Result<()> {
    let s = setup_with_options("mpvtag", &["", "", ",vlan=100"])?;
    let (mut a, mut b, mut c) = (vm(&s.sockets[0])?, vm(&s.sockets[1])?, vm(&s.sockets[2])?);
    // From the untagged port A: to the wire (802.1Q, 802.1ad, priority tag) and to B.
    let out = test_frame(s.wire_mac, guest_mac(0), 1, 200);
    for f in [
        with_tag(&out, 0x8100, 5),
        with_tag(&out, 0x88a8, 5),
        with_tag(&out, 0x8100, 0),
    ] {
        send(&mut a, &f)?;
    }
    let seen = wire_frames_from(&s, guest_mac(0));
    ensure!(
        seen.is_empty(),
        "A's own tags reached the wire: {:?}",
        seen.iter().map(|f| &f[12..16]).collect::<Vec<_>>()
    );
    send(
        &mut a,
        &tagged(&test_frame(guest_mac(1), guest_mac(0), 2, 200), 0),
    )?;
    ensure!(
        received(&mut b, 1, QUIET)?.is_empty(),
        "B got a tagged frame from A"
    );
    // From C on VLAN 100: it would leave as QinQ.
    send(
        &mut c,
        &tagged(&test_frame(s.wire_mac, guest_mac(2), 3, 200), 7),
    )?;
    ensure!(
        wire_frames_from(&s, guest_mac(2)).is_empty(),
        "C's own tag left under VLAN 100"
    );
    ensure!(
        s.ctl.counter(0, "tx_dropped_vlan")? == 4 && s.ctl.counter(2, "tx_dropped_vlan")? == 1,
        "VLAN drops: {}",
        s.ctl.stats()?
    );
    // Untagged frames still leave.
    send(&mut a, &out)?;
    ensure!(wire_saw(&s, 1), "A's untagged frame did not reach the wire");

    // A priority tag (VID 0, priority 5) from the wire comes off before A sees the frame.
    let plain = test_frame(guest_mac(0), s.wire_mac, 4, 200);
    s.wire.send(&with_tag(&plain, 0x8100, 0xa000))?;
    ensure!(
        received(&mut a, 1, WAIT)? == vec![plain],
        "A did not get the priority-tagged frame untagged"
    );
    drop((a, b, c));
    s.daemon.stop()?;
    Ok(())
}

/// `vlan-passthrough=on`: the guest's own tags leave as sent (QinQ under a tagged port's
/// tag), to the wire only, never switched to another port.
#[test]
fn vlan_passthrough_ports_send_their_tagged_frames_to_the_wire_only() -> Result<()> {
    let s = setup_with_options(
        "mpvpass",
        &[",vlan-passthrough=on", "", ",vlan=100,vlan-passthrough=on"],
    )?;
    let (mut a, mut b, mut c) = (vm(&s.sockets[0])?, vm(&s.sockets[1])?, vm(&s.sockets[2])?);
    let out = tagged(&test_frame(s.wire_mac, guest_mac(0), 1, 200), 5);
    send(&mut a, &out)?;
    ensure!(
        wire_frames_from(&s, guest_mac(0)) == vec![out],
        "A's tagged frame did not leave as sent"
    );
    // Tagged, to B's MAC: the wire's business, not the switch's.
    let to_b = tagged(&test_frame(guest_mac(1), guest_mac(0), 2, 200), 5);
    send(&mut a, &to_b)?;
    ensure!(
        received(&mut b, 1, QUIET)?.is_empty(),
        "B got A's tagged frame through the switch"
    );
    // From VLAN 100: QinQ, the port's tag outside the guest's.
    let inner = tagged(&test_frame(s.wire_mac, guest_mac(2), 3, 200), 7);
    send(&mut c, &inner)?;
    ensure!(
        wire_frames_from(&s, guest_mac(2)) == vec![tagged(&inner, 100)],
        "C's frame did not leave as QinQ"
    );
    ensure!(
        s.ctl.counter(0, "tx_dropped_vlan")? == 0,
        "{}",
        s.ctl.stats()?
    );
    let list = s.ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(
        list["ports"][0]["vlan_passthrough"] == true
            && list["ports"][1]["vlan_passthrough"] == false,
        "{list}"
    );
    drop((a, b, c));
    s.daemon.stop()?;
    Ok(())
}
