//! Two real Linux guests on one daemon and one NIC: each reaches the wire and the other guest
//! (ARP, ping with full-size frames, 8 MiB of TCP each way between the guests with checksums
//! compared), the guest-to-guest traffic is switched inside the daemon and never touches the
//! NIC, and the wire's ARP broadcasts reach both guests and the host. Needs root and QEMU;
//! `cargo xtask test` provides both and the guest image.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::guest::{Guest, GuestConfig, READY_MARKER};
use xvdpa_tests::lab::{self, guest_ip, guest_mac, mac_str, Lab};

const BOOT: Duration = Duration::from_secs(90);
const BLOCKS: usize = 128; // of 64 KiB: 8 MiB

fn config(socket: std::path::PathBuf, n: u8, script: String) -> GuestConfig {
    GuestConfig {
        socket,
        mac: mac_str(guest_mac(n)),
        ip: format!("{}/{}", guest_ip(n), lab::PREFIX),
        memory_mib: 256,
        script: Some(script),
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        device_props: String::new(),
        queue_pairs: 1,
    }
}

fn md5_of(guest: &mut Guest, tag: &str, timeout: Duration) -> Result<String> {
    let line = guest.wait_for(&format!("{tag} "), timeout)?;
    Ok(line
        .split(tag)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .context("md5 in guest output")?
        .to_string())
}

fn wire_pings(lab: &Lab, ip: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = lab
            .in_wire("busybox")
            .args(["ping", "-c", "1", "-W", "2", ip])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the wire cannot ping {ip}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

#[test]
fn two_guests_reach_the_wire_and_each_other_through_the_daemon() -> Result<()> {
    two_guests("q2", "", |ctl| {
        // Both guests take TSO frames: each one's 8 MiB crossed as its own TSO frames.
        for port in [0, 1] {
            let (passed, segments) = (
                ctl.counter(port, "tx_offload_passed")?,
                ctl.counter(port, "tx_segments")?,
            );
            ensure!(
                passed > 64 && segments == 0,
                "port {port}: {passed} frames passed with their offload, {segments} segments made: {}",
                ctl.stats()?
            );
        }
        Ok(())
    })
}

#[test]
fn a_guest_without_tso_gets_segments_from_one_that_sends_tso() -> Result<()> {
    two_guests(
        "q2n",
        ",guest_tso4=off,guest_tso6=off,guest_ecn=off",
        |ctl| {
            // A's TSO frames are cut for B (5.7k segments for 8 MiB); B's go to A as they are.
            let a_segments = ctl.counter(0, "tx_segments")?;
            let b_passed = ctl.counter(1, "tx_offload_passed")?;
            ensure!(
                a_segments > 5000 && b_passed > 64,
                "A made {a_segments} segments, B passed {b_passed} offloaded frames: {}",
                ctl.stats()?
            );
            Ok(())
        },
    )
}

/// Two guests, B's virtio-net device with `b_props` more properties; `offloads` checks the
/// offload counters after the traffic.
fn two_guests(tag: &str, b_props: &str, offloads: impl Fn(&Ctl) -> Result<()>) -> Result<()> {
    let started = Instant::now();
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socks = [dir.join("vm0.sock"), dir.join("vm1.sock")];
    let mut daemon = Daemon::start_ports(
        &lab,
        &[
            (socks[0].clone(), mac_str(guest_mac(0))),
            (socks[1].clone(), mac_str(guest_mac(1))),
        ],
        &[],
    )?;
    let ctl = Ctl::new(&dir.join("ctl.sock"));
    let (a_ip, b_ip, w) = (guest_ip(0), guest_ip(1), lab::WIRE_IP);

    // B listens for A's upload (stdin held open: busybox nc ends the connection when its
    // stdin does, so it cannot be waited for; B watches the file grow instead) and serves its
    // own file, then checks its own paths.
    let b_script = format!(
        "read go\n\
         dd if=/dev/urandom of=/tmp/up bs=65536 count={BLOCKS} 2>/dev/null\n\
         echo \"B-UP-MD5 $(md5sum < /tmp/up)\"\n\
         nc -l -p 6002 < /tmp/up & SERVE=$!\n\
         : > /tmp/in\n\
         sleep 600 | nc -l -p 6001 >> /tmp/in &\n\
         echo B-LISTENING\n\
         i=0; while [ \"$(wc -c < /tmp/in)\" -lt {bytes} ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done\n\
         echo \"B-IN-MD5 $(md5sum < /tmp/in)\"\n\
         wait $SERVE\n\
         ping -c 2 -W 5 -s 1472 {a_ip} || exit 21\n\
         ping -c 2 -W 5 {w} || exit 22\n\
         echo bye | nc {a_ip} 6003\n",
        bytes = BLOCKS * 65536
    );
    let a_script = format!(
        "read go\n\
         sleep 600 | nc -l -p 6003 > /tmp/bye &\n\
         ping -c 3 -W 5 {b_ip} || exit 11\n\
         ping -c 2 -W 5 -s 1472 {b_ip} || exit 12\n\
         ping -c 2 -W 5 {w} || exit 13\n\
         dd if=/dev/urandom of=/tmp/up bs=65536 count={BLOCKS} 2>/dev/null\n\
         echo \"A-UP-MD5 $(md5sum < /tmp/up)\"\n\
         nc {b_ip} 6001 < /tmp/up || exit 14\n\
         nc {b_ip} 6002 > /tmp/down || exit 15\n\
         echo \"A-DOWN-MD5 $(md5sum < /tmp/down)\"\n\
         i=0; while [ ! -s /tmp/bye ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
    );
    let mut b_config = config(socks[1].clone(), 1, b_script);
    b_config.device_props = b_props.to_string();
    let mut b = Guest::boot(&b_config)?;
    let mut a = Guest::boot(&config(socks[0].clone(), 0, a_script))?;
    a.wait_for(READY_MARKER, BOOT)?;
    b.wait_for(READY_MARKER, BOOT)?;
    eprintln!(
        "[test] both guests ready after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The wire resolves and pings both guests: its ARP requests are broadcasts.
    wire_pings(&lab, &a_ip)?;
    wire_pings(&lab, &b_ip)?;
    for port in [0, 1] {
        ensure!(
            ctl.counter(port, "rx_multicast")? > 0,
            "port {port} got no broadcast from the wire: {}",
            ctl.stats()?
        );
    }
    ensure!(
        ctl.xdp_counter("passed_multicast")? > 0,
        "the host stack got no broadcast"
    );

    let t = Instant::now();
    b.send_line("go")?;
    b.wait_for("B-LISTENING", Duration::from_secs(30))?;
    a.send_line("go")?;
    let a_up = md5_of(&mut a, "A-UP-MD5", Duration::from_secs(60))?;
    let b_in = md5_of(&mut b, "B-IN-MD5", Duration::from_secs(120))?;
    ensure!(
        a_up == b_in,
        "A->B data differs: A sent {a_up}, B got {b_in}"
    );
    let b_up = md5_of(&mut b, "B-UP-MD5", Duration::from_secs(5))?;
    let a_down = md5_of(&mut a, "A-DOWN-MD5", Duration::from_secs(120))?;
    ensure!(
        b_up == a_down,
        "B->A data differs: B sent {b_up}, A got {a_down}"
    );
    eprintln!(
        "[test] pings + 8 MiB each way between the guests took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    ensure!(
        a.wait_done(Duration::from_secs(60))? == 0,
        "guest A's script failed"
    );
    ensure!(
        b.wait_done(Duration::from_secs(60))? == 0,
        "guest B's script failed"
    );

    // The guests' TCP went through the switch: each port switched at least the 8 MiB it
    // sent (over a hundred TSO frames, or 5.7k full-size segments), and the NIC carried only
    // the wire pings.
    let switched: Vec<u64> = (0..2)
        .map(|p| ctl.counter(p, "tx_switched"))
        .collect::<Result<_>>()?;
    ensure!(
        switched.iter().all(|&n| n > 100),
        "tx_switched per port {switched:?}: {}",
        ctl.stats()?
    );
    offloads(&ctl)?;
    for port in [0, 1] {
        ensure!(
            ctl.counter(port, "tx_packets")? - ctl.counter(port, "tx_switched")? < 200,
            "port {port} sent guest traffic to the NIC: {}",
            ctl.stats()?
        );
        ensure!(
            ctl.counter(port, "queue_errors")? == 0,
            "queue errors: {}",
            ctl.stats()?
        );
    }
    a.wait_exit(Duration::from_secs(30))?;
    b.wait_exit(Duration::from_secs(30))?;
    daemon.wait_for_count("waiting for the next", 2, Duration::from_secs(10))?;
    daemon.stop()?;
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}
