//! A multiqueue guest: QEMU with `-netdev vhost-user,queues=2` and `mq=on`, two vCPUs, on a
//! lab NIC with two queues. Traffic flows on both queue pairs in both directions (per-queue
//! counters), `ethtool -L combined 1` in the guest (VQ_PAIRS_SET, which QEMU turns into
//! SET_VRING_ENABLE) keeps the port reachable on every NIC queue, and `combined 2` brings the
//! second pair back. Needs root and QEMU; `cargo xtask test` provides both.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::guest::{Guest, GuestConfig, READY_MARKER};
use xvdpa_tests::lab::{self, guest_ip, guest_mac, mac_str, Lab};

const BOOT: Duration = Duration::from_secs(90);

/// Pings the guest from the wire, from `cpu`: with XPS set up below, the echo requests leave
/// on wire tx queue `cpu` and arrive on NIC rx queue `cpu`.
fn wire_ping_from_cpu(lab: &Lab, cpu: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lab
            .in_wire("taskset")
            .args([
                "-c",
                &cpu.to_string(),
                "busybox",
                "ping",
                "-c",
                "3",
                "-W",
                "2",
                &guest_ip(0),
            ])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the wire cannot ping the guest from CPU {cpu}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

/// rx_packets and tx_packets of each queue pair of port 0.
fn per_pair(ctl: &Ctl) -> Result<Vec<(u64, u64)>> {
    let stats = ctl.stats()?;
    let queues = stats["ports"][0]["queues"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Ok(queues
        .iter()
        .map(|q| {
            (
                q["counters"]["rx_packets"].as_u64().unwrap_or(0),
                q["counters"]["tx_packets"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

#[test]
fn multiqueue_guest_uses_both_pairs_and_survives_fewer_channels() -> Result<()> {
    let started = Instant::now();
    let lab = Lab::unique_with_queues("qmq", 2)?;
    // Wire tx queue N carries what CPU N sends (XPS), so the test picks the NIC rx queue.
    for q in 0..2 {
        let path = format!("/sys/class/net/{}/queues/tx-{q}/xps_cpus", lab::WIRE);
        let out = lab
            .in_wire("sh")
            .args(["-c", &format!("echo {} > {path}", 1 << q)])
            .output()?;
        ensure!(
            out.status.success(),
            "setting {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = socket_dir("qmq")?;
    let sock = dir.join("vm0.sock");
    let spec = format!(
        "socket={},mac={},queues=2",
        sock.display(),
        mac_str(guest_mac(0))
    );
    let ctl_path = dir.join("ctl.sock");
    let mut daemon = Daemon::spawn(
        &lab,
        &["--port", &spec, "--ctl", ctl_path.to_str().unwrap()],
    )?;
    daemon.wait_for_log("port ready for a frontend", Duration::from_secs(20))?;
    let ctl = Ctl::new(&ctl_path);

    let w = lab::WIRE_IP;
    let channels = "$(ethtool -l eth0 | grep Combined | tail -1 | tr -d ' \\t')";
    let script = format!(
        "echo \"XVDPA-CH {channels}\"\n\
         read go\n\
         taskset -c 0 ping -c 5 -W 5 {w} || exit 11\n\
         taskset -c 1 ping -c 5 -W 5 {w} || exit 12\n\
         echo XVDPA-PHASE1\n\
         read go\n\
         ethtool -L eth0 combined 1 || exit 13\n\
         echo \"XVDPA-CH1 {channels}\"\n\
         taskset -c 1 ping -c 3 -W 5 {w} || exit 14\n\
         echo XVDPA-PHASE2\n\
         read go\n\
         ethtool -L eth0 combined 2 || exit 15\n\
         taskset -c 1 ping -c 3 -W 5 {w} || exit 16\n\
         echo XVDPA-PHASE3\n\
         read done\n"
    );
    let cfg = GuestConfig {
        socket: sock.clone(),
        mac: mac_str(guest_mac(0)),
        ip: format!("{}/{}", guest_ip(0), lab::PREFIX),
        memory_mib: 256,
        script: Some(script),
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        device_props: String::new(),
        queue_pairs: 2,
    };
    let mut guest = Guest::boot(&cfg)?;
    guest.wait_for(READY_MARKER, BOOT)?;
    let ch = guest.wait_for("XVDPA-CH ", Duration::from_secs(10))?;
    ensure!(
        ch.contains("Combined:2"),
        "the guest does not use two queue pairs: {ch}"
    );

    // Both directions on both pairs: the wire pings from each CPU (NIC rx queue 0 and 1),
    // the guest pings from each vCPU (its tx queue 0 and 1).
    wire_ping_from_cpu(&lab, 0)?;
    wire_ping_from_cpu(&lab, 1)?;
    guest.send_line("go")?;
    guest.wait_for("XVDPA-PHASE1", Duration::from_secs(60))?;
    let p1 = per_pair(&ctl)?;
    ensure!(
        p1.len() == 2,
        "expected two queue pairs in the stats: {p1:?}"
    );
    for (pair, (rx, tx)) in p1.iter().enumerate() {
        ensure!(
            *rx > 0 && *tx > 0,
            "queue pair {pair} carried rx={rx} tx={tx}: {}",
            ctl.stats()?
        );
    }
    eprintln!("[test] per pair (rx, tx) with two channels: {p1:?}");

    // One channel: pair 1 is disabled, and what NIC queue 1 carries goes to pair 0.
    guest.send_line("go")?;
    let ch1 = guest.wait_for("XVDPA-CH1 ", Duration::from_secs(30))?;
    ensure!(ch1.contains("Combined:1"), "ethtool -L did not take: {ch1}");
    guest.wait_for("XVDPA-PHASE2", Duration::from_secs(60))?;
    let before = per_pair(&ctl)?;
    wire_ping_from_cpu(&lab, 1)?;
    let after = per_pair(&ctl)?;
    ensure!(
        after[1].0 == before[1].0,
        "the disabled pair still received: {before:?} -> {after:?}"
    );
    ensure!(
        after[0].0 >= before[0].0 + 3,
        "pair 0 did not take NIC queue 1's frames: {before:?} -> {after:?}"
    );
    eprintln!(
        "[test] with one channel, NIC queue 1's pings went to pair 0: {before:?} -> {after:?}"
    );

    // Two channels again: pair 1 receives again.
    guest.send_line("go")?;
    guest.wait_for("XVDPA-PHASE3", Duration::from_secs(60))?;
    let before = per_pair(&ctl)?;
    if let Err(e) = wire_ping_from_cpu(&lab, 1) {
        bail!("{e}\nstats: {}", ctl.stats()?);
    }
    let after = per_pair(&ctl)?;
    ensure!(
        after[1].0 >= before[1].0 + 3,
        "pair 1 did not come back: {before:?} -> {after:?}: {}",
        ctl.stats()?
    );
    eprintln!("[test] two channels again, pair 1 receives: {before:?} -> {after:?}");
    guest.send_line("done")?;
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    let queue_errors = daemon.counter("queue_errors")?;
    ensure!(queue_errors == 0, "queue errors: {queue_errors}");
    daemon.stop()?;
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}
