//! The guest-tcp benchmark: real QEMU guests move one TCP stream up (guest -> a peer on the
//! wire), down (wire -> guest) and VM-to-VM (guest A -> guest B), through xvdpa or through
//! QEMU's own virtio-net on a tap in a Linux bridge with the NIC: what a user runs without
//! xvdpa (with vnet_hdr; this kernel has no vhost-net).
//!
//! Both setups share the lab's veth (its wire end with transmit checksumming off, as
//! [`Lab::create`] leaves it), the guest image, the device (`virtio-net-pci`, `vectors=0`),
//! the TCP tool (`tcpperf`, the same static binary in the guests and on the wire) and the CPU
//! pinning (see [`Pinning`]). Whatever offloads the guest and the datapath negotiate decide
//! the figures; nothing here depends on which those are.
//!
//! DPDK testpmd (22.11, net_vhost + net_af_xdp) is not a peer here: it cannot carry a TSO
//! guest to the wire. Its vhost PMD lets a guest negotiate TSO only with `tso=1`, and then hands
//! the guest's 64 KiB segments, checksums partial, to the output port. For the AF_XDP port,
//! `show port 0 tx_offload capabilities` lists nothing (no TCP_TSO, no TCP_CKSUM, not even
//! MULTI_SEGS), so io forwarding would put unsegmented frames with unfinished checksums on
//! the wire. The documented software path, the csum engine with `set port N gso on`, segments
//! but, as DPDK's GSO library says, does not compute the segments' checksums: that is left to
//! the port's hardware offload, which AF_XDP lacks. Without `tso=1` the guest segments itself,
//! which measures a guest without TCP offloads rather than the datapaths compared here.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::bench::{process_cpu_seconds, task_cpu_seconds};
pub use crate::bench_run::Pinning;
use crate::daemon::{socket_dir, Daemon, SocketDir};
use crate::guest::{self, Guest, GuestConfig, READY_MARKER};
use crate::lab::{self, guest_ip, guest_mac, mac_str, Lab};
use crate::output::{LineLog, Wait};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpDirection {
    /// Guest A sends to the wire's `tcpperf`.
    Up,
    /// The wire sends to guest A.
    Down,
    /// Guest A sends to guest B on the same datapath.
    VmToVm,
}

impl TcpDirection {
    pub const ALL: [TcpDirection; 3] = [TcpDirection::Up, TcpDirection::Down, TcpDirection::VmToVm];

    pub fn name(self) -> &'static str {
        match self {
            TcpDirection::Up => "up",
            TcpDirection::Down => "down",
            TcpDirection::VmToVm => "vm-to-vm",
        }
    }

    /// The receiver's TCP port (one per direction, so a slow close never collides).
    fn port(self) -> u16 {
        match self {
            TcpDirection::Up => 5201,
            TcpDirection::Down => 5202,
            TcpDirection::VmToVm => 5203,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpPeer {
    /// Guests on xvdpa over vhost-user.
    Xvdpa,
    /// Guests on QEMU's virtio-net backend, each on a tap in a bridge with the NIC.
    Tap,
}

impl TcpPeer {
    pub fn name(self) -> &'static str {
        match self {
            TcpPeer::Xvdpa => "xvdpa",
            TcpPeer::Tap => "tap",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "xvdpa" => Ok(TcpPeer::Xvdpa),
            "tap" => Ok(TcpPeer::Tap),
            other => bail!("unknown guest-tcp peer {other:?} (xvdpa, tap)"),
        }
    }

    /// What the datapath CPU figure counts for this peer.
    pub fn datapath_label(self) -> &'static str {
        match self {
            TcpPeer::Xvdpa => "xvdpa daemon",
            TcpPeer::Tap => "QEMU I/O threads (tap backend)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TcpSetup {
    /// Measured seconds per direction (the receiver's window).
    pub duration: Duration,
    /// Seconds of the stream before the window opens (slow start, the first ARP).
    pub warmup: Duration,
    pub pinning: Pinning,
    /// Extra daemon arguments (e.g. `--busy-poll`).
    pub daemon_args: Vec<String>,
    /// Appended to each xvdpa port's `--port` spec (e.g. `,tx-gso=daemon`).
    pub port_settings: String,
    /// The host's `tcpperf` (the same binary as the guests').
    pub tcpperf: PathBuf,
}

/// The host's `tcpperf`: `$XVDPA_TCPPERF`, else where building the guest image left it (the
/// release build under `$CARGO_TARGET_DIR`, or the workspace's target/).
pub fn tcpperf_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("XVDPA_TCPPERF") {
        return PathBuf::from(p);
    }
    let root = crate::workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), |d| root.join(d))
        .join("release/tcpperf")
}

#[derive(Clone, Debug)]
pub struct TcpMeasurement {
    pub peer: TcpPeer,
    pub direction: TcpDirection,
    /// Payload bytes the receiver counted in its window.
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_s: f64,
    /// CPU seconds of the datapath over the window ([`TcpPeer::datapath_label`]).
    pub datapath_cpu_s: f64,
    /// CPU seconds of the guests' QEMU threads other than the vCPUs (main loop, I/O).
    pub qemu_io_cpu_s: f64,
    /// CPU seconds of the guests' vCPU threads (TCG emulation).
    pub vcpu_cpu_s: f64,
}

impl TcpMeasurement {
    /// Datapath CPU seconds per GB (1e9 bytes) of payload.
    pub fn datapath_cpu_s_per_gb(&self) -> f64 {
        self.datapath_cpu_s / (self.bytes.max(1) as f64 / 1e9)
    }

    pub fn qemu_io_cpu_s_per_gb(&self) -> f64 {
        self.qemu_io_cpu_s / (self.bytes.max(1) as f64 / 1e9)
    }
}

const BOOT: Duration = Duration::from_secs(120);
/// What a guest's script prints after each command it was given.
const CMD_DONE: &str = "XVDPA-CMD rc=";
/// The guests' script: run each console line as a command, then say so.
const COMMAND_LOOP: &str = "stty -echo 2>/dev/null\n\
    while read -r line; do eval \"$line\"; echo \"XVDPA-CMD rc=$?\"; done\n";
const BRIDGE: &str = "xvbr0";

fn tap_name(n: u8) -> String {
    format!("xvtap{n}")
}

/// A booted guest with its QEMU process.
struct BenchGuest {
    guest: Guest,
    pid: u32,
    name: String,
}

impl BenchGuest {
    /// Runs `command` in the guest's shell and waits until it ends; fails on a non-zero exit.
    fn run(&mut self, command: &str, timeout: Duration) -> Result<()> {
        let from = self.guest.console_len();
        self.guest.send_line(command)?;
        let line = self.guest.wait_for_from(CMD_DONE, from, timeout)?;
        ensure!(
            line.trim_end().ends_with("rc=0"),
            "guest {}: `{command}` failed: {line}",
            self.name
        );
        Ok(())
    }

    /// Thread ids of the vCPU threads (QEMU names them "CPU n/TCG" with debug-threads=on).
    fn vcpu_threads(&self) -> Result<Vec<u32>> {
        let mut tids = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let entry = entry?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.starts_with("CPU ") {
                if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                    tids.push(tid);
                }
            }
        }
        ensure!(!tids.is_empty(), "no vCPU thread in QEMU {}", self.pid);
        Ok(tids)
    }

    /// (vCPU threads, everything else) CPU seconds of this QEMU.
    fn cpu_split(&self) -> Result<(f64, f64)> {
        let total = process_cpu_seconds(self.pid)?;
        let mut vcpu = 0.0;
        for tid in self.vcpu_threads()? {
            vcpu += task_cpu_seconds(self.pid, tid)?;
        }
        Ok((vcpu, total - vcpu))
    }
}

/// The datapath and its guests for one run.
struct Bed {
    peer: TcpPeer,
    daemon: Option<Daemon>,
    guests: Vec<BenchGuest>,
    host_ns: String,
    _dir: SocketDir,
}

impl Bed {
    /// CPU seconds so far: (datapath, QEMU I/O threads, vCPU threads).
    fn cpu(&self) -> Result<(f64, f64, f64)> {
        let (mut vcpu, mut io) = (0.0, 0.0);
        for g in &self.guests {
            let (v, i) = g.cpu_split()?;
            vcpu += v;
            io += i;
        }
        let datapath = match (&self.daemon, self.peer) {
            (Some(d), TcpPeer::Xvdpa) => process_cpu_seconds(d.pid().context("daemon pid")?)?,
            _ => io,
        };
        Ok((datapath, io, vcpu))
    }

    fn finish(mut self) -> Result<()> {
        for g in &mut self.guests {
            let _ = g.guest.send_line("poweroff -f");
        }
        for g in &mut self.guests {
            if g.guest.wait_exit(Duration::from_secs(10)).is_err() {
                g.guest.kill();
            }
        }
        self.guests.clear();
        if self.peer == TcpPeer::Tap {
            remove_bridge(&self.host_ns);
        }
        if let Some(d) = self.daemon.take() {
            d.stop()?;
        }
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for g in &mut self.guests {
            g.guest.kill();
        }
        if self.peer == TcpPeer::Tap {
            remove_bridge(&self.host_ns);
        }
    }
}

fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    lab::run(Command::new("ip").arg("-n").arg(ns).args(args))?;
    Ok(())
}

/// A bridge with the NIC and one vnet_hdr tap per guest, as a host without xvdpa wires
/// QEMU guests to a NIC.
fn create_bridge(ns: &str, guests: u8) -> Result<()> {
    remove_bridge(ns);
    ip_in(ns, &["link", "add", BRIDGE, "type", "bridge"])?;
    ip_in(ns, &["link", "set", lab::NIC, "master", BRIDGE])?;
    for n in 0..guests {
        let tap = tap_name(n);
        ip_in(
            ns,
            &["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"],
        )?;
        ip_in(ns, &["link", "set", &tap, "master", BRIDGE, "up"])?;
    }
    ip_in(ns, &["link", "set", BRIDGE, "up"])
}

/// Removes the bridge and taps (the NIC leaves the bridge with it). Never fails.
fn remove_bridge(ns: &str) {
    for n in 0..2 {
        let _ = Command::new("ip")
            .args(["-n", ns, "link", "del", &tap_name(n)])
            .output();
    }
    let _ = Command::new("ip")
        .args(["-n", ns, "link", "del", BRIDGE])
        .output();
}

fn guest_config(socket: &Path, n: u8) -> GuestConfig {
    GuestConfig {
        socket: socket.to_path_buf(),
        mac: mac_str(guest_mac(n)),
        ip: format!("{}/{}", guest_ip(n), lab::PREFIX),
        memory_mib: 256,
        script: Some(COMMAND_LOOP.to_string()),
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        queue_pairs: 1,
        device_props: String::new(),
    }
}

/// Moves every vCPU thread of the guest to `cpu` (its other threads stay where QEMU started:
/// on the datapath CPU).
fn pin_vcpus(g: &BenchGuest, cpu: usize) -> Result<()> {
    for tid in g.vcpu_threads()? {
        lab::run(Command::new("taskset").args(["-p", "-c", &cpu.to_string(), &tid.to_string()]))?;
    }
    Ok(())
}

/// Boots guest `n` in the host namespace, QEMU under `taskset` on the datapath CPU.
fn boot_guest(lab: &Lab, peer: TcpPeer, socket: &Path, n: u8, pin: Pinning) -> Result<BenchGuest> {
    let (kernel, initrd) = guest::image()?;
    let config = guest_config(socket, n);
    let args = match peer {
        TcpPeer::Xvdpa => guest::qemu_args(&config, &kernel, &initrd),
        TcpPeer::Tap => guest::qemu_tap_args(&config, &tap_name(n), &kernel, &initrd),
    };
    let name = format!("guest{n}");
    let mut cmd = lab.in_host("taskset");
    cmd.args(["-c", &pin.datapath.to_string()])
        .arg(guest::qemu_binary())
        .args(args)
        .args(["-name", &format!("{name},debug-threads=on")]);
    let guest = Guest::spawn(cmd)?;
    let pid = guest.pid().context("QEMU pid")?;
    Ok(BenchGuest { guest, pid, name })
}

fn start_bed(lab: &Lab, peer: TcpPeer, guests: u8, setup: &TcpSetup) -> Result<Bed> {
    let pin = setup.pinning;
    let dir = socket_dir(&format!("guest-tcp-{}", peer.name()))?;
    let socks: Vec<PathBuf> = (0..guests)
        .map(|n| dir.join(format!("vm{n}.sock")))
        .collect();
    let mut bed = Bed {
        peer,
        daemon: None,
        guests: Vec::new(),
        host_ns: lab.host_ns.clone(),
        _dir: dir,
    };
    // Whatever a previous peer left on the NIC (an XDP program) must not decide this run.
    let _ = lab
        .in_host("ip")
        .args(["link", "set", "dev", lab::NIC, "xdp", "off"])
        .status();
    match peer {
        TcpPeer::Xvdpa => {
            let specs: Vec<String> = socks
                .iter()
                .enumerate()
                .map(|(n, s)| {
                    format!(
                        "socket={},mac={}{}",
                        s.display(),
                        mac_str(guest_mac(n as u8)),
                        setup.port_settings
                    )
                })
                .collect();
            let mut args: Vec<&str> = vec!["--log", "warn,xvdpa=info"];
            for s in &specs {
                args.extend(["--port", s.as_str()]);
            }
            args.extend(setup.daemon_args.iter().map(String::as_str));
            let mut d = Daemon::spawn_pinned(lab, &args, Some(pin.datapath))?;
            d.wait_for_count(
                "port ready for a frontend",
                socks.len(),
                Duration::from_secs(20),
            )?;
            bed.daemon = Some(d);
        }
        TcpPeer::Tap => create_bridge(&lab.host_ns, guests)?,
    }
    for (n, s) in socks.iter().enumerate() {
        let g = boot_guest(lab, peer, s, n as u8, pin)?;
        bed.guests.push(g);
    }
    for g in &mut bed.guests {
        g.guest.wait_for(READY_MARKER, BOOT)?;
    }
    for g in &mut bed.guests {
        pin_vcpus(g, pin.load)?;
        g.run("command -v tcpperf >/dev/null", Duration::from_secs(30))
            .context("the guest image has no tcpperf: rebuild it (`cargo xtask bench` does)")?;
    }
    // Every guest resolves and reaches the wire (and, with two, the other guest) before
    // anything is measured; one answered ping each, retried while ARP settles.
    let mut targets: Vec<String> = vec![lab::WIRE_IP.to_string()];
    targets.extend((0..guests).map(guest_ip));
    for (n, g) in bed.guests.iter_mut().enumerate() {
        for ip in targets.iter().filter(|ip| **ip != guest_ip(n as u8)) {
            let once = format!("ping -c 1 -W 3 {ip} >/dev/null");
            g.run(&[once.as_str(); 3].join(" || "), Duration::from_secs(30))?;
        }
    }
    Ok(bed)
}

/// `tcpperf` on the wire, pinned to the load CPU.
fn wire_tcpperf(lab: &Lab, setup: &TcpSetup, args: &[String]) -> Result<(Child, Arc<LineLog>)> {
    let mut cmd = lab.in_wire("taskset");
    cmd.args(["-c", &setup.pinning.load.to_string()])
        .arg(&setup.tcpperf)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", setup.tcpperf.display()))?;
    let log = LineLog::capture(&mut child, "tcpperf");
    Ok((child, log))
}

/// Waits for a line of the wire's `tcpperf` containing `needle`.
fn wait_wire(log: &LineLog, child: &mut Child, needle: &str, timeout: Duration) -> Result<String> {
    match log.wait_for(needle, 0, timeout, Some(child))? {
        Wait::Found(l) => Ok(l),
        Wait::TimedOut => bail!("tcpperf on the wire did not print {needle:?} within {timeout:?}"),
        Wait::Exited(s) => bail!("tcpperf on the wire exited ({s}) before printing {needle:?}"),
    }
}

/// Parses `TCPPERF-RESULT bytes=<n> seconds=<s>`.
fn parse_result(line: &str) -> Result<(u64, f64)> {
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .with_context(|| format!("no {k} in {line:?}"))
    };
    Ok((field("bytes=")?.parse()?, field("seconds=")?.parse()?))
}

/// Runs one stream in `direction` on a running bed and measures it at the receiver.
fn stream(
    lab: &Lab,
    bed: &mut Bed,
    direction: TcpDirection,
    setup: &TcpSetup,
) -> Result<TcpMeasurement> {
    let port = direction.port();
    let send_secs = format!("{:.3}", (setup.warmup + setup.duration).as_secs_f64());
    let warmup = format!("{:.3}", setup.warmup.as_secs_f64());
    let window = setup.warmup + setup.duration + Duration::from_secs(60);
    let listen = Duration::from_secs(30);
    let (bytes, seconds, cpu0, cpu1);
    match direction {
        TcpDirection::Up => {
            let (mut child, log) =
                wire_tcpperf(lab, setup, &["recv".into(), port.to_string(), warmup])?;
            wait_wire(&log, &mut child, "TCPPERF-LISTENING", listen)?;
            let from = bed.guests[0].guest.console_len();
            bed.guests[0]
                .guest
                .send_line(&format!("tcpperf send {}:{port} {send_secs}", lab::WIRE_IP))?;
            wait_wire(&log, &mut child, "TCPPERF-START", window)?;
            cpu0 = bed.cpu()?;
            let line = wait_wire(&log, &mut child, "TCPPERF-RESULT", window)?;
            cpu1 = bed.cpu()?;
            (bytes, seconds) = parse_result(&line)?;
            let done = bed.guests[0].guest.wait_for_from(CMD_DONE, from, listen)?;
            ensure!(done.trim_end().ends_with("rc=0"), "guest sender: {done}");
            child.wait()?;
        }
        TcpDirection::Down | TcpDirection::VmToVm => {
            let (receiver, target) = match direction {
                TcpDirection::Down => (0, guest_ip(0)),
                _ => (1, guest_ip(1)),
            };
            let from = bed.guests[receiver].guest.console_len();
            bed.guests[receiver]
                .guest
                .send_line(&format!("tcpperf recv {port} {warmup}"))?;
            bed.guests[receiver]
                .guest
                .wait_for_from("TCPPERF-LISTENING", from, listen)?;
            let mut sender = None;
            let sender_from = bed.guests[0].guest.console_len();
            if direction == TcpDirection::Down {
                sender = Some(wire_tcpperf(
                    lab,
                    setup,
                    &["send".into(), format!("{target}:{port}"), send_secs],
                )?);
            } else {
                bed.guests[0]
                    .guest
                    .send_line(&format!("tcpperf send {target}:{port} {send_secs}"))?;
            }
            bed.guests[receiver]
                .guest
                .wait_for_from("TCPPERF-START", from, window)?;
            cpu0 = bed.cpu()?;
            let line = bed.guests[receiver]
                .guest
                .wait_for_from("TCPPERF-RESULT", from, window)?;
            cpu1 = bed.cpu()?;
            (bytes, seconds) = parse_result(&line)?;
            let done = bed.guests[receiver]
                .guest
                .wait_for_from(CMD_DONE, from, listen)?;
            ensure!(done.trim_end().ends_with("rc=0"), "guest receiver: {done}");
            match sender {
                Some((mut child, log)) => {
                    let status = child.wait()?;
                    ensure!(
                        status.success(),
                        "tcpperf sender on the wire failed: {}",
                        log.lines().join("\n")
                    );
                }
                None => {
                    let done = bed.guests[0]
                        .guest
                        .wait_for_from(CMD_DONE, sender_from, listen)?;
                    ensure!(done.trim_end().ends_with("rc=0"), "guest sender: {done}");
                }
            }
        }
    }
    ensure!(
        bytes > 0 && seconds > 0.0,
        "{} {}: the receiver measured nothing ({bytes} bytes in {seconds} s)",
        bed.peer.name(),
        direction.name()
    );
    Ok(TcpMeasurement {
        peer: bed.peer,
        direction,
        bytes,
        seconds,
        gbit_s: bytes as f64 * 8.0 / seconds / 1e9,
        datapath_cpu_s: cpu1.0 - cpu0.0,
        qemu_io_cpu_s: cpu1.1 - cpu0.1,
        vcpu_cpu_s: cpu1.2 - cpu0.2,
    })
}

/// One run for `peer`: starts its datapath and guests (two when VM-to-VM is among
/// `directions`, else one), measures each direction in turn, and tears everything down.
pub fn measure_tcp(
    lab: &Lab,
    peer: TcpPeer,
    directions: &[TcpDirection],
    setup: &TcpSetup,
) -> Result<Vec<TcpMeasurement>> {
    ensure!(
        setup.tcpperf.exists(),
        "{} missing (built by `cargo xtask bench`)",
        setup.tcpperf.display()
    );
    let guests = if directions.contains(&TcpDirection::VmToVm) {
        2
    } else {
        1
    };
    let started = Instant::now();
    let mut bed = start_bed(lab, peer, guests, setup)?;
    eprintln!(
        "[guest-tcp] {} with {guests} guest(s) ready in {:.1} s",
        peer.name(),
        started.elapsed().as_secs_f64()
    );
    let result = directions
        .iter()
        .map(|&d| {
            stream(lab, &mut bed, d, setup).with_context(|| format!("{} {}", peer.name(), d.name()))
        })
        .collect::<Result<Vec<_>>>();
    let finished = bed.finish();
    let ms = result?;
    finished?;
    Ok(ms)
}
