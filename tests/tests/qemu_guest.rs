//! A real Linux guest under QEMU, attached with `-netdev vhost-user` to the real daemon in a
//! lab: ARP from both sides, ping with full-size frames, 16 MiB of TCP each way with checksums
//! compared at the far end, and the lifecycle events VMs go through (reboot, QEMU killed and
//! restarted, daemon killed under traffic and restarted). Needs root and QEMU; `cargo xtask test`
//! provides both and the guest image.
//!
//! The port's settings come from the crate's `PORT_SETTINGS`: this file runs on the copy path,
//! and `qemu_guest_single_copy.rs` runs it again with `guest-umem=on`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use xvdpa_tests::ctl::daemon_counter;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::guest::{self, md5, Guest, GuestConfig, READY_MARKER};
use xvdpa_tests::lab::{self, guest_ip, guest_mac, mac_str, Lab};

/// Settings appended to the guest's port spec (`,key=value...`); see the file's head.
#[allow(dead_code)] // Unused where another crate includes this file with its own.
const PORT_SETTINGS: &str = "";

/// A daemon serving the guest's port at `socket`, with `crate::PORT_SETTINGS` and `args`.
fn start_daemon(lab: &Lab, socket: &Path, args: &[&str]) -> Result<Daemon> {
    let spec = Daemon::port_spec(socket, guest_mac(0), crate::PORT_SETTINGS);
    Daemon::start_specs(lab, &socket.with_file_name("ctl.sock"), &[spec], args)
}

const BOOT: Duration = Duration::from_secs(60);
const BLOB_MIB: usize = 16;

struct Bench {
    lab: Lab,
    daemon: Option<Daemon>,
    socket: PathBuf,
    dir: SocketDir,
    /// The daemon runs with `--mtu` above what one UMEM chunk holds.
    jumbo: bool,
}

fn setup(tag: &str) -> Result<Bench> {
    setup_in(Lab::unique(tag)?, tag, &[])
}

/// [`setup`] in `lab`, with `args` for the daemon.
fn setup_in(lab: Lab, tag: &str, args: &[&str]) -> Result<Bench> {
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let daemon = start_daemon(&lab, &socket, args)?;
    Ok(Bench {
        lab,
        daemon: Some(daemon),
        socket,
        dir,
        jumbo: args.contains(&"--mtu"),
    })
}

fn config(b: &Bench, script: &str) -> GuestConfig {
    GuestConfig {
        socket: b.socket.clone(),
        mac: mac_str(guest_mac(0)),
        ip: format!("{}/{}", guest_ip(0), lab::PREFIX),
        memory_mib: 256,
        script: Some(script.to_string()),
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        device_props: String::new(),
        queue_pairs: 1,
    }
}

/// Runs `cmd` in the wire namespace and returns whether it succeeded.
fn wire_ok(lab: &Lab, args: &[&str]) -> Result<bool> {
    let out = lab.in_wire("busybox").args(args).output()?;
    if !out.status.success() {
        eprintln!(
            "[wire] {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.status.success())
}

/// What a failing test shows when the wire cannot reach the guest: where the daemon's
/// frames went, and what the wire knows of the guest's address.
fn unreachable_guest_figures(b: &Bench) -> String {
    let daemon = b
        .daemon
        .as_ref()
        .map_or("(no daemon)".to_string(), |d| d.port_figures(0));
    let neighbours = b
        .lab
        .in_wire("ip")
        .args(["neigh", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(ip neigh: {e})"));
    format!("{daemon}\nthe wire's neighbours: {neighbours}")
}

/// A TCP listener on the wire that stores what it receives; its stdin stays open (busybox nc
/// closes the connection when its stdin ends).
struct WireReceiver {
    child: Child,
    path: PathBuf,
}

impl WireReceiver {
    fn start(lab: &Lab, port: u16, path: PathBuf) -> Result<Self> {
        let cmd = format!("exec busybox nc -l -p {port} > {}", path.display());
        let child = lab
            .in_wire("sh")
            .args(["-c", &cmd])
            .stdin(Stdio::piped())
            .spawn()?;
        Ok(WireReceiver { child, path })
    }

    fn finish(mut self, timeout: Duration) -> Result<PathBuf> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("wire receiver did not see the connection end");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(self.path.clone())
    }
}

/// Serves `file` to the first TCP client on `port`.
fn wire_sender(lab: &Lab, port: u16, file: &Path) -> Result<Child> {
    let cmd = format!("exec busybox nc -l -p {port} < {}", file.display());
    Ok(lab
        .in_wire("sh")
        .args(["-c", &cmd])
        .stdin(Stdio::null())
        .spawn()?)
}

fn random_file(path: &Path, mib: usize) -> Result<()> {
    let mut f = std::fs::File::open("/dev/urandom")?;
    let mut data = vec![0u8; mib << 20];
    std::io::Read::read_exact(&mut f, &mut data)?;
    std::fs::File::create(path)?.write_all(&data)?;
    Ok(())
}

/// The guest half of the traffic check. It waits for a line on the console first, so the wire
/// resolves the guest's address (ARP from the wire side) before the guest sends anything.
fn traffic_script(tag: &str) -> String {
    traffic_script_pinging(tag, 1472)
}

/// [`traffic_script`] with pings of `ping_size` bytes of payload; the guest also says its MTU.
fn traffic_script_pinging(tag: &str, ping_size: usize) -> String {
    let w = lab::WIRE_IP;
    format!(
        "read go\n\
         echo \"{tag}-FEATURES $(cat /sys/class/net/eth0/device/features)\"\n\
         echo \"{tag}-ETHTOOL $(ethtool -k eth0 | grep -E '^(tx-c|tcp-seg)' | tr -d ' ' | tr '\\n' ';')\"\n\
         echo \"{tag}-MTU $(cat /sys/class/net/eth0/mtu)\"\n\
         ping -c 3 -W 5 {w} || exit 11\n\
         ping -c 2 -W 5 -s {ping_size} {w} || exit 12\n\
         dd if=/dev/urandom of=/tmp/up bs=65536 count={blocks} 2>/dev/null\n\
         echo \"{tag}-UP-MD5 $(md5sum < /tmp/up)\"\n\
         nc {w} 5001 < /tmp/up || exit 13\n\
         nc {w} 5002 > /tmp/down || exit 14\n\
         echo \"{tag}-DOWN-MD5 $(md5sum < /tmp/down)\"\n\
         rm -f /tmp/up /tmp/down\n",
        blocks = BLOB_MIB * 16
    )
}

/// Checks the path `ctl list` names for the guest's port: with `guest-umem=on` the guest's
/// memory is the UMEM, unless its MTU is above what one chunk holds (the jumbo test); without,
/// the copy path.
fn expect_datapath(b: &Bench) -> Result<()> {
    let Some(daemon) = b.daemon.as_ref() else {
        return Ok(());
    };
    let line = listed_port(daemon)?;
    let path = line.rsplit("  ").next().unwrap_or_default();
    let want = match (crate::PORT_SETTINGS.contains("guest-umem=on"), b.jumbo) {
        (false, _) => path == "copy",
        (true, false) => path == "guest-memory",
        (true, true) => path.starts_with("copy (guest memory refused: a 9014-byte frame"),
    };
    ensure!(want, "ctl list: {line}");
    Ok(())
}

/// One round of traffic with a guest that runs [`traffic_script`]: wire pings the guest, then
/// TCP both ways, checksums compared at the far ends. Returns the virtio features the guest's
/// driver negotiated, as its sysfs shows them (one '0'/'1' per bit, bit 0 first).
/// `booting`: the guest is (re)booting and its ready marker comes first.
fn traffic_round(
    b: &Bench,
    guest: &mut Guest,
    tag: &str,
    from_line: usize,
    booting: bool,
) -> Result<String> {
    if booting {
        let t0 = Instant::now();
        guest.wait_for_from(READY_MARKER, from_line, BOOT)?;
        eprintln!(
            "[test] {tag}: guest ready after {:.1}s",
            t0.elapsed().as_secs_f64()
        );
    }
    expect_datapath(b)?;
    let blob = b.dir.join(format!("{tag}-down.blob"));
    random_file(&blob, BLOB_MIB)?;
    let receiver = WireReceiver::start(&b.lab, 5001, b.dir.join(format!("{tag}-up.recv")))?;
    let mut sender = wire_sender(&b.lab, 5002, &blob)?;

    // The wire resolves and pings the guest first.
    let ping_deadline = Instant::now() + Duration::from_secs(20);
    while !wire_ok(&b.lab, &["ping", "-c", "1", "-W", "2", &guest_ip(0)])? {
        if Instant::now() > ping_deadline {
            bail!(
                "{tag}: the wire cannot ping the guest\n{}",
                unreachable_guest_figures(b)
            );
        }
    }
    guest.send_line("go")?;

    let t1 = Instant::now();
    let features = guest
        .wait_for_from(
            &format!("{tag}-FEATURES "),
            from_line,
            Duration::from_secs(10),
        )?
        .split_whitespace()
        .nth(1)
        .context("features in guest output")?
        .to_string();
    let ethtool = guest.wait_for_from(
        &format!("{tag}-ETHTOOL "),
        from_line,
        Duration::from_secs(10),
    )?;
    eprintln!("[test] {tag}: guest's ethtool -k: {ethtool}");
    // (rx-checksumming is not among them: the 6.1 guest driver shows it "on [fixed]" with or
    // without GUEST_CSUM.)
    let offloads_shown = ["tx-checksumming:on", "tcp-segmentation-offload:on"]
        .iter()
        .filter(|o| ethtool.contains(*o))
        .count();
    let up_line = guest.wait_for_from(
        &format!("{tag}-UP-MD5 "),
        from_line,
        Duration::from_secs(60),
    )?;
    let up_md5 = up_line
        .split_whitespace()
        .nth(1)
        .context("md5 in guest output")?
        .to_string();
    let down_line = guest.wait_for_from(
        &format!("{tag}-DOWN-MD5 "),
        from_line,
        Duration::from_secs(120),
    )?;
    let down_md5 = down_line
        .split_whitespace()
        .nth(1)
        .context("md5 in guest output")?
        .to_string();
    eprintln!(
        "[test] {tag}: ping + {BLOB_MIB} MiB each way took {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    let up_recv = receiver.finish(Duration::from_secs(10))?;
    let _ = sender.wait();
    ensure!(
        md5(&up_recv)? == up_md5,
        "{tag}: guest->wire data differs (guest md5 {up_md5}, wire {})",
        md5(&up_recv)?
    );
    ensure!(md5(&blob)? == down_md5, "{tag}: wire->guest data differs");
    let _ = std::fs::remove_file(&blob);
    let _ = std::fs::remove_file(&up_recv);
    // What the guest's driver negotiated and what its ethtool shows must agree.
    let negotiated = offloads_negotiated(&features);
    let expect_shown = if negotiated.is_empty() { 0 } else { 2 };
    ensure!(
        offloads_shown == expect_shown,
        "{tag}: the guest's ethtool shows {offloads_shown} of tx checksumming and TSO on, \
         with {negotiated:?} negotiated"
    );
    Ok(features)
}

/// The offload feature bits (virtio-net): what `ethtool -k` in the guest shows as
/// tx-checksumming (CSUM), rx-checksumming (GUEST_CSUM), tcp-segmentation-offload (HOST_TSO4/6,
/// HOST_ECN) and what the guest takes (GUEST_TSO4/6, GUEST_ECN).
const OFFLOAD_BITS: [(usize, &str); 8] = [
    (0, "CSUM"),
    (1, "GUEST_CSUM"),
    (7, "GUEST_TSO4"),
    (8, "GUEST_TSO6"),
    (9, "GUEST_ECN"),
    (11, "HOST_TSO4"),
    (12, "HOST_TSO6"),
    (13, "HOST_ECN"),
];

/// The offload bits the guest negotiated, by name.
fn offloads_negotiated(features: &str) -> Vec<&'static str> {
    OFFLOAD_BITS
        .iter()
        .filter(|(bit, _)| features.as_bytes().get(*bit) == Some(&b'1'))
        .map(|(_, name)| *name)
        .collect()
}

/// Reads the counters once: the guest has exited, so nothing is moving. `offloads`: the guest
/// sent TSO frames, which went to the wire whole (copy path) or cut by the daemon (single copy).
fn full_size_frames_flowed(daemon: &Daemon, offloads: bool) -> Result<()> {
    let stats = daemon.ctl()?.stats()?;
    let tx_packets = daemon_counter(&stats, "tx_packets")?;
    let tx_bytes = daemon_counter(&stats, "tx_bytes")?;
    let rx_packets = daemon_counter(&stats, "rx_packets")?;
    ensure!(
        tx_packets > 0 && rx_packets > 0,
        "no traffic counted: {stats}"
    );
    // 16 MiB of TCP at MSS 1460 is ~11.5k frames of 1514 bytes; ACKs pull the average down
    // but it stays far above what small frames would give.
    ensure!(
        tx_bytes / tx_packets > 1000,
        "guest->wire frames average {} bytes: not full-size",
        tx_bytes / tx_packets
    );
    let gso = daemon_counter(&stats, "tx_gso_frames")?;
    let segments = daemon_counter(&stats, "tx_segments")?;
    let csum =
        daemon_counter(&stats, "tx_csum_computed")? + daemon_counter(&stats, "tx_csum_offloaded")?;
    ensure!(
        daemon_counter(&stats, "tx_dropped_offload")? == 0,
        "offload requests dropped: {stats}"
    );
    let coalesced = daemon_counter(&stats, "rx_coalesced")?;
    let verified = daemon_counter(&stats, "rx_csum_verified")?;
    let gso_kernel = daemon_counter(&stats, "tx_gso_kernel")?;
    if offloads {
        let single_copy = stats["ports"][0]["port"]["datapath"] == "guest-memory";
        // 16 MiB in TSO frames of up to 64 KiB, handed to the kernel whole (tx-gso=kernel,
        // the default) on either path; a few cut by the daemon when the socket's buffer was
        // full.
        let went_out = gso_kernel > gso / 2 && gso_kernel <= gso;
        ensure!(
            gso > 0 && went_out,
            "the guest's TCP did not go out as TSO frames: {stats}"
        );
        // The download's segments arrive in bursts: some of them were merged. On the
        // single-copy path the kernel writes them into the guest's buffers as they come, and
        // the guest checks their checksums itself.
        ensure!(
            (coalesced > 0 && verified > 0) != single_copy,
            "frames from the wire merged or verified {coalesced}/{verified} (single-copy path: {single_copy}): {stats}"
        );
    } else {
        ensure!(
            gso == 0
                && gso_kernel == 0
                && segments == 0
                && csum == 0
                && coalesced == 0
                && verified == 0,
            "offloads used that the device had turned off: {stats}"
        );
    }
    Ok(())
}

#[test]
fn guest_pings_and_moves_tcp_both_ways_then_again_after_a_reboot() -> Result<()> {
    let mut b = setup("qemu")?;
    let started = Instant::now();
    // After each round the guest waits for a word: "reboot" restarts it in the same QEMU
    // process (driver reset, device reset, renegotiation over the same connection).
    let script = format!(
        "{}echo XVDPA-ROUND-DONE\nread next\n[ \"$next\" = reboot ] && reboot -f\nexit 0\n",
        traffic_script("round")
    );
    let mut cfg = config(&b, &script);
    cfg.allow_reboot = true;
    let mut guest = Guest::boot(&cfg)?;
    let features = traffic_round(&b, &mut guest, "round", 0, true)?;
    // Every offload the device offers is on in a stock guest.
    let all: Vec<&str> = OFFLOAD_BITS.iter().map(|(_, name)| *name).collect();
    ensure!(
        offloads_negotiated(&features) == all,
        "guest features {features}: offloads {:?}",
        offloads_negotiated(&features)
    );
    guest.wait_for("XVDPA-ROUND-DONE", Duration::from_secs(30))?;
    eprintln!(
        "[test] first boot and traffic: {:.1}s wall",
        started.elapsed().as_secs_f64()
    );

    let mark = guest.console_len();
    guest.send_line("reboot")?;
    traffic_round(&b, &mut guest, "round", mark, true)?;
    guest.wait_for_from("XVDPA-ROUND-DONE", mark, Duration::from_secs(30))?;
    guest.send_line("stop")?;
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    let daemon = b.daemon.take().unwrap();
    full_size_frames_flowed(&daemon, true)?;
    let queue_errors = daemon.counter("queue_errors")?;
    ensure!(queue_errors == 0, "queue errors: {queue_errors}");
    daemon.stop()?;
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}

#[test]
fn a_guest_with_the_device_offloads_turned_off_gets_exactly_that() -> Result<()> {
    let mut b = setup("qoff")?;
    let mut cfg = config(&b, &traffic_script("off"));
    cfg.device_props = ",csum=off,guest_csum=off,host_tso4=off,host_tso6=off,host_ecn=off,\
                        guest_tso4=off,guest_tso6=off,guest_ecn=off"
        .to_string();
    let mut guest = Guest::boot(&cfg)?;
    let features = traffic_round(&b, &mut guest, "off", 0, true)?;
    ensure!(
        offloads_negotiated(&features).is_empty(),
        "guest features {features}: offloads {:?}",
        offloads_negotiated(&features)
    );
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    let daemon = b.daemon.take().unwrap();
    full_size_frames_flowed(&daemon, false)?;
    daemon.stop()?;
    Ok(())
}

#[test]
fn qemu_killed_and_started_again_gets_a_working_device() -> Result<()> {
    let mut b = setup("qkill")?;
    let started = Instant::now();
    // A guest that is killed mid-traffic: SIGKILL leaves no chance to say goodbye.
    let mut guest = Guest::boot(&config(
        &b,
        &format!("ping -c 1000 {} >/dev/null\n", lab::WIRE_IP),
    ))?;
    guest.wait_for(READY_MARKER, BOOT)?;
    b.daemon
        .as_mut()
        .unwrap()
        .wait_for_log("frontend connected", Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(500));
    guest.kill();
    b.daemon
        .as_mut()
        .unwrap()
        .wait_for_log("waiting for the next", Duration::from_secs(10))?;

    let mut guest = Guest::boot(&config(&b, &traffic_script("after-kill")))?;
    traffic_round(&b, &mut guest, "after-kill", 0, true)?;
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    b.daemon.take().unwrap().stop()?;
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}

/// Guest shell: waits up to 10 s for eth0's carrier to read `want`, then prints it. Short:
/// the script travels on the kernel command line, which x86 cuts at 2047 bytes.
fn wait_carrier(tag: &str, want: u8) -> String {
    format!(
        "c=/sys/class/net/eth0/carrier; i=0; while [ $i -lt 100 ] && [ \"$(cat $c)\" != {want} ]; do sleep 0.1; i=$((i+1)); done\n\
         echo \"{tag} $(cat $c)\"\n"
    )
}

/// A guest's script across a backend restart: a traffic round ("before"), then at `x` it
/// waits for the carrier to drop, at `y` for it to come back, and runs a round "after".
fn restart_script() -> String {
    format!(
        "{}echo XVDPA-ROUND-DONE\nread x\n{}read y\n{}{}",
        traffic_script("before"),
        wait_carrier("XVDPA-CARRIER-DOWN", 0),
        wait_carrier("XVDPA-CARRIER-UP", 1),
        traffic_script("after")
    )
}

/// With the backend gone, a guest running [`restart_script`] sees its link down. Returns
/// the console position and the time from which the backend's return is awaited.
fn expect_carrier_down(guest: &mut Guest) -> Result<(usize, Instant)> {
    guest.send_line("x")?;
    let down = guest.wait_for("XVDPA-CARRIER-DOWN", Duration::from_secs(30))?;
    ensure!(
        down.trim_end().ends_with(" 0"),
        "link still up with the backend gone: {down}"
    );
    Ok((guest.console_len(), Instant::now()))
}

/// The end of a backend restart under a guest running [`restart_script`], once the new
/// daemon has its frontend: the link comes back (console lines from `mark` on), a traffic
/// round passes, the guest ends cleanly and no queue errors were counted.
fn finish_after_restart(
    mut b: Bench,
    guest: &mut Guest,
    mark: usize,
    t: Instant,
    started: Instant,
) -> Result<()> {
    guest.send_line("y")?;
    let up = guest.wait_for_from("XVDPA-CARRIER-UP", mark, Duration::from_secs(30))?;
    ensure!(
        up.trim_end().ends_with(" 1"),
        "link did not come back: {up}"
    );
    eprintln!(
        "[test] link back {:.1}s after the daemon restarted",
        t.elapsed().as_secs_f64()
    );
    traffic_round(&b, guest, "after", mark, false)?;
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    let daemon = b.daemon.take().unwrap();
    let queue_errors = daemon.counter("queue_errors")?;
    ensure!(queue_errors == 0, "queue errors: {queue_errors}");
    daemon.stop()?;
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}

/// Whether an XDP program is attached to the lab's NIC.
fn xdp_attached(lab: &Lab) -> Result<bool> {
    let out = lab
        .in_host("ip")
        .args(["link", "show", lab::NIC])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("xdp"))
}

/// The daemon is SIGKILLed while the wire pings the guest: nothing of it runs any more, the
/// XDP program goes with it (it is attached through a bpf_link that the process holds), the
/// host's own traffic on the NIC flows meanwhile, and a restarted daemon gets the guest back.
#[test]
fn daemon_killed_under_traffic_and_restarted_brings_the_link_back() -> Result<()> {
    let mut b = setup("dkill")?;
    let started = Instant::now();
    let script = restart_script();
    let mut cfg = config(&b, &script);
    cfg.reconnect = Some(1);
    let mut guest = Guest::boot(&cfg)?;
    traffic_round(&b, &mut guest, "before", 0, true)?;
    guest.wait_for("XVDPA-ROUND-DONE", Duration::from_secs(30))?;

    // Traffic through the daemon when it dies: the wire pings the guest 20 times a second.
    let mut pings = b
        .lab
        .in_wire("busybox")
        .args(["ping", "-q", "-i", "0.05", &guest_ip(0)])
        .stdout(Stdio::null())
        .spawn()?;
    let mut daemon = b.daemon.take().unwrap();
    let rx_before = daemon.counter("rx_packets")?;
    ensure!(
        daemon.counter_reaching("rx_packets", rx_before + 10)? >= rx_before + 10,
        "the guest's pings are not flowing through the daemon"
    );
    ensure!(
        xdp_attached(&b.lab)?,
        "no XDP program on the NIC while the daemon runs"
    );
    daemon.signal(libc::SIGKILL)?;
    daemon.wait_exit(Duration::from_secs(10))?;
    drop(daemon);

    // While no daemon runs: no XDP program is left on the NIC, and the host's own traffic
    // (the wire pinging the NIC's address) gets through.
    let deadline = Instant::now() + Duration::from_secs(5);
    while xdp_attached(&b.lab)? {
        ensure!(
            Instant::now() < deadline,
            "an XDP program is still attached 5 s after the daemon was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        wire_ok(&b.lab, &["ping", "-c", "3", "-W", "2", lab::HOST_IP])?,
        "the host's own address is unreachable with the daemon dead"
    );
    let _ = pings.kill();
    let _ = pings.wait();

    // The backend went away: QEMU reports the link down to the guest.
    let (mark, t) = expect_carrier_down(&mut guest)?;

    // A new daemon on the same socket: QEMU reconnects, renegotiates, and the link comes back.
    b.daemon = Some(start_daemon(&b.lab, &b.socket, &[])?);
    let restarted = b.daemon.as_mut().unwrap();
    ensure!(
        restarted.output().contains("removing stale socket"),
        "the killed daemon's socket was not found stale"
    );
    restarted.wait_for_log("frontend connected", Duration::from_secs(20))?;
    finish_after_restart(b, &mut guest, mark, t, started)
}

/// A wire-side veth counter (`rx_packets`, `rx_bytes`, ...).
fn wire_counter(lab: &Lab, name: &str) -> Result<u64> {
    let out = lab
        .in_wire("cat")
        .arg(format!("/sys/class/net/{}/statistics/{name}", lab::WIRE))
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

#[test]
fn a_guest_at_mtu_9000_pings_with_8000_byte_payloads_and_moves_tcp() -> Result<()> {
    let started = Instant::now();
    let lab = Lab::unique("qjumbo")?;
    lab.set_mtu(9000)?;
    let b = setup_in(lab, "qjumbo", &["--mtu", "9000"])?;
    let mut cfg = config(&b, &traffic_script_pinging("jumbo", 8000));
    // QEMU serves the config space itself: its MTU field (and VIRTIO_NET_F_MTU) comes from
    // the device's host_mtu, which must match the daemon's --mtu.
    cfg.device_props = ",host_mtu=9000".to_string();
    let mut guest = Guest::boot(&cfg)?;
    let (rx_packets, rx_bytes) = (
        wire_counter(&b.lab, "rx_packets")?,
        wire_counter(&b.lab, "rx_bytes")?,
    );
    // Both ends at MTU 9000 fragment nothing: the 8000-byte pings and the TCP segments
    // cross as single jumbo frames, or not at all.
    traffic_round(&b, &mut guest, "jumbo", 0, true)?;
    let mtu = guest.wait_for("jumbo-MTU ", Duration::from_secs(5))?;
    ensure!(
        mtu.split_whitespace().nth(1) == Some("9000"),
        "the guest's MTU: {mtu}"
    );
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    // The guest's upload reached the wire in frames far larger than a 1500-byte MTU allows.
    let packets = wire_counter(&b.lab, "rx_packets")? - rx_packets;
    let bytes = wire_counter(&b.lab, "rx_bytes")? - rx_bytes;
    eprintln!(
        "[test] the wire got {packets} frames averaging {} bytes",
        bytes / packets.max(1)
    );
    ensure!(
        packets > 0 && bytes / packets > 4000,
        "the wire got {packets} frames averaging {} bytes",
        bytes / packets.max(1)
    );
    let daemon = b.daemon.as_ref().context("daemon")?;
    let stats = daemon.ctl()?.stats()?;
    let rx = (
        daemon_counter(&stats, "rx_packets")?,
        daemon_counter(&stats, "rx_bytes")?,
    );
    eprintln!(
        "[test] the guest got {} frames averaging {} bytes",
        rx.0,
        rx.1 / rx.0.max(1)
    );
    ensure!(
        rx.0 > 0 && rx.1 / rx.0 > 4000,
        "the guest got {} frames averaging {} bytes",
        rx.0,
        rx.1 / rx.0.max(1)
    );
    for drop in [
        "tx_dropped_oversized",
        "rx_dropped_too_large",
        "queue_errors",
    ] {
        ensure!(daemon_counter(&stats, drop)? == 0, "{drop}: {stats}");
    }
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}

/// A bench whose port is in client mode: QEMU listens on `vm0.sock` and the daemon connects.
/// The daemon starts first, so its port begins with QEMU not there yet.
fn setup_client(tag: &str) -> Result<Bench> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let daemon = start_client_daemon(&lab, &socket)?;
    Ok(Bench {
        lab,
        daemon: Some(daemon),
        socket,
        dir,
        jumbo: false,
    })
}

fn start_client_daemon(lab: &Lab, socket: &Path) -> Result<Daemon> {
    let settings = format!(",mode=client{}", crate::PORT_SETTINGS);
    let spec = Daemon::port_spec(socket, guest_mac(0), &settings);
    Daemon::start_specs(lab, &socket.with_file_name("ctl.sock"), &[spec], &[])
}

fn client_config(b: &Bench, script: &str) -> GuestConfig {
    GuestConfig {
        qemu_listens: true,
        ..config(b, script)
    }
}

/// `xvdpa ctl list`'s line for the port, which shows its mode.
fn listed_port(daemon: &Daemon) -> Result<String> {
    let text = daemon.ctl()?.cli(&["ctl"], &["list"])?;
    ensure!(
        text.lines().next().is_some_and(|l| l.contains("MODE")),
        "no MODE column: {text}"
    );
    text.lines()
        .nth(1)
        .map(str::to_string)
        .context("no port listed")
}

/// Client mode: the daemon's port connects to the socket QEMU serves (`server=on,wait=off`),
/// trying again with back-off while QEMU is not there yet, pings and moves TCP; QEMU killed
/// and started again on the same socket: the daemon connects to the new QEMU by itself and
/// traffic comes back.
#[test]
fn a_client_port_connects_to_qemu_and_again_to_a_restarted_qemu() -> Result<()> {
    let mut b = setup_client("cli")?;
    let started = Instant::now();
    // No QEMU yet: the port keeps trying.
    b.daemon
        .as_mut()
        .unwrap()
        .wait_for_log("frontend not listening", Duration::from_secs(5))?;
    let line = listed_port(b.daemon.as_ref().unwrap())?;
    ensure!(
        line.contains("waiting") && line.contains("client"),
        "ctl list: {line}"
    );

    // Each guest waits at the end of its script: QEMU is killed, not left to exit.
    let script = |tag: &str| format!("{}{MSIX_REPORT}read z\n", traffic_script(tag));
    let mut guest = Guest::boot(&client_config(&b, &script("cli-first")))?;
    b.daemon
        .as_mut()
        .unwrap()
        .wait_for_log("frontend connected", Duration::from_secs(10))?;
    let line = listed_port(b.daemon.as_ref().unwrap())?;
    ensure!(
        line.contains("connected") && line.contains("client"),
        "ctl list: {line}"
    );
    traffic_round(&b, &mut guest, "cli-first", 0, true)?;
    check_interrupts(&mut guest, guest::qemu_version())?;
    guest.kill();
    let daemon = b.daemon.as_mut().unwrap();
    daemon.wait_for_count("waiting for the next", 1, Duration::from_secs(10))?;
    // QEMU's socket is left behind with nobody listening: the port keeps trying.
    daemon.wait_for_log("Connection refused", Duration::from_secs(5))?;

    let t = Instant::now();
    let mut guest = Guest::boot(&client_config(&b, &script("cli-again")))?;
    b.daemon
        .as_mut()
        .unwrap()
        .wait_for_count("frontend connected", 2, Duration::from_secs(10))?;
    eprintln!(
        "[test] reconnected {:.1}s after QEMU started again",
        t.elapsed().as_secs_f64()
    );
    traffic_round(&b, &mut guest, "cli-again", 0, true)?;

    // Removing the port disconnects QEMU and leaves its socket, which is QEMU's, in place.
    let daemon = b.daemon.as_mut().unwrap();
    daemon.ctl()?.cli(&["ctl"], &["del-port", "0"])?;
    daemon.wait_for_count("waiting for the next", 2, Duration::from_secs(10))?;
    ensure!(b.socket.exists(), "removing the port removed QEMU's socket");
    guest.kill();
    b.daemon.take().unwrap().stop()?;
    eprintln!("[test] total {:.1}s wall", started.elapsed().as_secs_f64());
    Ok(())
}

/// What client mode is for: the daemon stops and a new one starts under a running guest,
/// whose QEMU keeps listening; the new daemon connects, the link comes back and traffic
/// flows, with QEMU never restarted.
#[test]
fn the_daemon_restarts_under_a_running_guest_with_a_client_port() -> Result<()> {
    let mut b = setup_client("clirs")?;
    let started = Instant::now();
    let script = restart_script();
    let mut guest = Guest::boot(&client_config(&b, &script))?;
    let qemu = guest.pid();
    traffic_round(&b, &mut guest, "before", 0, true)?;
    guest.wait_for("XVDPA-ROUND-DONE", Duration::from_secs(30))?;

    b.daemon.take().unwrap().stop()?;
    let (mark, t) = expect_carrier_down(&mut guest)?;
    b.daemon = Some(start_client_daemon(&b.lab, &b.socket)?);
    b.daemon
        .as_mut()
        .unwrap()
        .wait_for_log("frontend connected", Duration::from_secs(20))?;
    ensure!(guest.pid() == qemu, "QEMU was restarted");
    finish_after_restart(b, &mut guest, mark, t, started)
}

/// Guest shell: counts the device's per-queue MSI-X vectors (`virtio0-input.0`, ...). Run
/// after the traffic round, not before its `read go`: the console echoes what the test types
/// onto the line the guest is printing.
const MSIX_REPORT: &str = "echo \"XVDPA-MSIX $(grep -c virtio0-input /proc/interrupts)\"\n";

/// With QEMU 8 or later the device runs with MSI-X, a vector per queue; before, with
/// `vectors=0`, on a shared legacy interrupt.
fn check_interrupts(guest: &mut Guest, version: guest::QemuVersion) -> Result<()> {
    let line = guest.wait_for("XVDPA-MSIX ", Duration::from_secs(10))?;
    let vectors: u32 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("MSI-X count in guest output: {line:?}"))?;
    eprintln!("[test] QEMU {version:?}: {vectors} receive-queue MSI-X vector(s)");
    ensure!(
        (vectors > 0) == (version >= (8, 0)),
        "QEMU {version:?} gave the guest {vectors} per-queue vectors"
    );
    Ok(())
}

/// The QEMU of Debian's stable release (7.2: `XVDPA_QEMU_STABLE`, or the one on PATH) keeps
/// working with its work-around, `vectors=0`, while the other tests run current QEMU.
#[test]
fn debian_stables_qemu_runs_a_guest_with_its_work_around() -> Result<()> {
    let stable = std::env::var_os("XVDPA_QEMU_STABLE")
        .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from);
    let version = guest::version_of(&stable);
    eprintln!("[test] stable QEMU {}: {version:?}", stable.display());
    let mut b = setup("stable")?;
    let cfg = config(&b, &format!("{}{MSIX_REPORT}", traffic_script("stable")));
    let (kernel, initrd) = guest::image()?;
    let args = guest::qemu_args_on(&stable, &cfg, &kernel, &initrd);
    ensure!(
        args.iter().any(|a| a.contains(",vectors=0")) == (version < (8, 0)),
        "vectors=0 must be on exactly for QEMU before 8: {args:?}"
    );
    let mut guest = Guest::boot_on(&stable, &cfg)?;
    traffic_round(&b, &mut guest, "stable", 0, true)?;
    check_interrupts(&mut guest, version)?;
    ensure!(
        guest.wait_done(Duration::from_secs(30))? == 0,
        "guest script failed"
    );
    guest.wait_exit(Duration::from_secs(30))?;
    b.daemon.take().unwrap().stop()?;
    Ok(())
}
