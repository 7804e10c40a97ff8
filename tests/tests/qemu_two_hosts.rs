//! Live migration of a real guest between two hosts, each with its own daemon: the source
//! QEMU on daemon A's port (host A's NIC), the destination QEMU on daemon B's port (host B's
//! NIC), both ports ordinary ones with the guest's MAC (nobody else has it on either host).
//! The two NICs' cables end in one Linux bridge, the network both hosts are on, where the
//! wire streams TCP with the guest and pings it (`Lab::bridged_pair`).
//!
//! QEMU's own `migrate` moves the guest while it streams TCP each way (md5 checked at both
//! ends, as on one host: see `qemu_migration.rs` for why the guest's reader is paused) and
//! answers pings; then back to host A the same way. Checked each way: the destination
//! daemon runs the rings from the indexes QEMU hands it (`SET_VRING_BASE`) without a queue
//! error, the bridge learns the guest's new place from its announcement, and the daemon the
//! guest left counts the frames the network still sends it for the guest as dropped (no
//! socket behind the MAC's steering entry once its QEMU is gone) rather than delivering them
//! anywhere. Prints each migration's downtime: QEMU's figure, the pings lost and the longest
//! gap between replies. Needs root and QEMU; `cargo xtask test` provides both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::frames::test_frame;
use xvdpa_tests::lab::{guest_ip, guest_mac, mac_str, Lab, BRIDGE_PORTS};
use xvdpa_tests::migration::{
    boot_source_guest, guest_reaches_wire, migrating_guest, ping_from_wire, report_legs,
    wire_reaches_guest, Leg, PingFlood,
};
use xvdpa_tests::wire::WireSocket;

/// Waits until the bridge has the guest's MAC on `port`, i.e. learned where the guest is.
fn bridge_learns(lab: &Lab, port: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = lab.bridge_port_of(guest_mac(0))?;
        if seen.as_deref() == Some(port) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the bridge has the guest's MAC on {seen:?}, not on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon the guest left (on `lab`, cable `port`) still has the MAC's steering entry,
/// but no socket behind it: frames for the guest that reach its NIC are dropped and counted
/// by the XDP program, none is delivered.
fn left_host_drops_the_guests_frames(lab: &Lab, port: &str, daemon: &Daemon) -> Result<()> {
    let before = daemon.counter("dropped_no_socket")?;
    let rx_before = daemon.counter("rx_packets")?;
    let cable = WireSocket::open_on(lab, port)?;
    let src = lab.wire_mac()?;
    const FRAMES: u64 = 5;
    for seq in 0..FRAMES {
        cable.send(&test_frame(
            guest_mac(0),
            src,
            0x2057_0000 + seq as u32,
            200,
        ))?;
    }
    let dropped = daemon.counter_reaching("dropped_no_socket", before + FRAMES)? - before;
    ensure!(
        dropped == FRAMES,
        "the host the guest left dropped {dropped} of {FRAMES} frames for it"
    );
    ensure!(
        daemon.counter("rx_packets")? <= rx_before,
        "the host the guest left delivered frames for it"
    );
    Ok(())
}

#[test]
fn a_guest_streaming_tcp_migrates_to_another_host_and_back() -> Result<()> {
    let t_test = Instant::now();
    let (lab_a, lab_b) = Lab::bridged_pair("q2h")?;
    let dir = socket_dir("q2h")?;
    // Each host's daemon in a directory of its own (its control socket sits next to its port).
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let (sock_a, sock_b) = (dir_a.join("vm.sock"), dir_b.join("vm.sock"));
    let mac = mac_str(guest_mac(0));
    let daemon_a = Daemon::start_ports(&lab_a, &[(sock_a.clone(), mac.clone())], &[])?;
    let daemon_b = Daemon::start_ports(&lab_b, &[(sock_b.clone(), mac.clone())], &[])?;

    let config = migrating_guest(sock_a.clone(), "");
    let qmp_a = dir.join("qmp-a.sock");
    let mut source = boot_source_guest(&config, &qmp_a)?;
    wire_reaches_guest(&lab_a)?;
    bridge_learns(&lab_a, BRIDGE_PORTS[0])?;

    let stop = Arc::new(AtomicBool::new(false));
    let pinger = ping_from_wire(&lab_a, guest_ip(0), stop.clone());
    let flood = PingFlood::start(&lab_a, &guest_ip(0))?;
    let there = Leg {
        lab: &lab_a,
        dir: &dir,
        config: &config,
        to: sock_b.clone(),
        name: "to-b",
        blocks: 2,
        tcp_ports: (5002, 5001),
    };
    let (mut on_b, qmp_b, first) = there.run(&mut source, &qmp_a)?;
    bridge_learns(&lab_a, BRIDGE_PORTS[1])?;
    ensure!(
        daemon_b.counter("queue_errors")? == 0,
        "host B's daemon stopped a queue of the guest"
    );
    left_host_drops_the_guests_frames(&lab_a, BRIDGE_PORTS[0], &daemon_a)?;

    let back = Leg {
        to: sock_a.clone(),
        name: "to-a",
        tcp_ports: (5004, 5003),
        ..there
    };
    let (mut home, _, second) = back.run(&mut on_b, &qmp_b)?;
    bridge_learns(&lab_a, BRIDGE_PORTS[0])?;
    left_host_drops_the_guests_frames(&lab_a, BRIDGE_PORTS[1], &daemon_b)?;

    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let pings = pinger.join().expect("pinger");
    let flood = flood.finish()?;
    report_legs(&pings, flood, &[("A -> B", &first), ("B -> A", &second)])?;
    ensure!(
        daemon_a.counter("queue_errors")? == 0,
        "host A's daemon stopped a queue of the guest"
    );
    guest_reaches_wire(&mut home).context("the guest back on host A reaches the wire")?;
    home.kill();
    println!("test took {:.0} s", t_test.elapsed().as_secs_f64());
    Ok(())
}
