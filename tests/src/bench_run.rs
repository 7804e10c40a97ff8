//! Benchmark scenarios, each measured for one peer (xvdpa, xvdpa in one of its modes, DPDK
//! testpmd, or the bare AF_XDP ceiling) with the same lab, generator, guest side and CPU
//! pinning.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use crate::bench::GeneratorKind;
use crate::bench::{
    cpu_net_rx_softirqs, guest_rx_count, guest_tx_blast, guest_vm_to_vm, iface_counter,
    napi_threads_cpu_seconds, pin_thread, process_cpu_seconds, process_rss_bytes, udp_frame,
    Generator,
};
use crate::daemon::{socket_dir, Daemon, SocketDir};
use crate::dpdk;
use crate::frames::ip_bytes;
use crate::frontend::{
    FrontendOptions, VirtioNetFrontend, LINUX_RX_BUFFER, VIRTIO_RING_F_EVENT_IDX,
};
use crate::lab::{self, guest_mac, mac_str, Lab};
use crate::output::{LineLog, Wait};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// wire -> NIC -> guest rx ring, counted by the guest side.
    Rx,
    /// guest tx ring -> NIC -> wire, counted on the wire.
    Tx,
    /// guest A tx ring -> datapath -> guest B rx ring, counted by B.
    VmToVm,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
            Direction::VmToVm => "vm-to-vm",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Xvdpa,
    /// dpdk-testpmd: net_vhost + net_af_xdp, io forwarding.
    Dpdk,
    /// xvdpa-xsk-limit: XDP + AF_XDP with nothing behind the socket.
    Limit,
    /// xvdpa with the port's guest memory as the NIC queue's UMEM (`guest-umem=on`): the
    /// NIC is the port's alone, so it has no vm-to-vm scenario.
    SingleCopy,
    /// `SingleCopy` sending from the guest's buffers (`guest-umem-tx=in-place`), which on a
    /// copy-mode NIC such as veth is not its default.
    SingleCopyInPlace,
    /// xvdpa as `Xvdpa` runs it, while a migration logs its writes: each guest side shares a
    /// dirty log and turns `VHOST_F_LOG_ALL` and its rings' log flag on before the traffic
    /// starts, as QEMU does when a migration begins.
    DirtyLog,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Xvdpa => "xvdpa",
            Peer::Dpdk => "dpdk",
            Peer::Limit => "limit",
            Peer::SingleCopy => "single-copy",
            Peer::SingleCopyInPlace => "single-copy-in-place",
            Peer::DirtyLog => "dirty-log",
        }
    }

    /// Whether the peer runs the vm-to-vm scenario (two guest ports on one datapath).
    pub fn has_vm_to_vm(self) -> bool {
        matches!(self, Peer::Xvdpa | Peer::Dpdk | Peer::DirtyLog)
    }
}

/// Which CPU the datapath under test gets, and which the generator and guest side share.
#[derive(Clone, Copy, Debug)]
pub struct Pinning {
    pub datapath: usize,
    pub load: usize,
}

#[derive(Clone, Debug)]
pub struct Measurement {
    pub peer: Peer,
    pub direction: Direction,
    /// Frame size on the wire, FCS included (64, 512, 1518).
    pub size: usize,
    pub frames: u64,
    pub seconds: f64,
    pub pps: f64,
    /// CPU seconds the datapath process used per million frames.
    pub cpu_s_per_mpkt: f64,
    /// CPU seconds the guest side used (it must cost less than what it measures).
    pub guest_cpu_s: f64,
    pub rss_bytes: u64,
    /// The generator that made the rx traffic.
    pub generator: Option<&'static str>,
    /// NET_RX softirqs per second on the load CPU and on the datapath CPU over the window
    /// (rx): where the kernel's receive work for the NIC queue ran in softirq.
    pub net_rx_softirqs: Option<(f64, f64)>,
    /// Share of a CPU the NIC's threaded NAPI pollers used over the window (rx; counted in
    /// `cpu_s_per_mpkt` too): the receive work xvdpa moved off the softirq.
    pub napi_thread_share: Option<f64>,
    /// Guest pages the dirty logs marked over the measured window (the dirty-log peer): never
    /// zero, or the run would have measured the unlogged path.
    pub dirty_pages: Option<u64>,
}

/// What an idle daemon costs: its CPU over a window with no traffic, after traffic.
#[derive(Clone, Copy, Debug)]
pub struct IdleCpu {
    pub seconds: f64,
    /// Share of one CPU the daemon used over the window.
    pub share: f64,
}

#[derive(Clone, Debug)]
pub struct Setup {
    pub duration: Duration,
    pub warmup: Duration,
    pub pinning: Pinning,
    /// Flows (UDP source ports) the generator spreads frames over.
    pub flows: u32,
    /// Extra daemon arguments (e.g. `--busy-poll`).
    pub daemon_args: Vec<String>,
    /// What puts rx frames on the wire.
    pub generator: GeneratorKind,
    /// Frame contents beyond the scenario's own addressing.
    pub frame: FrameSpec,
}

/// Frame contents the operator may choose. The scenario fixes what steering depends on: rx
/// frames go to the first guest's MAC, and guests send from their own MAC.
#[derive(Clone, Debug, Default)]
pub struct FrameSpec {
    /// Source MAC of rx frames (default: the wire interface's).
    pub src_mac: Option<[u8; 6]>,
    /// Destination MAC of tx frames (default: a MAC nobody in the lab owns).
    pub dst_mac: Option<[u8; 6]>,
    pub src_ip: Option<[u8; 4]>,
    pub dst_ip: Option<[u8; 4]>,
    /// First UDP source port (flows count up from it); default 1024.
    pub sport: Option<u16>,
    /// UDP destination port; default 9 (discard).
    pub dport: Option<u16>,
}

/// What a measured run cost besides its frames.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    /// CPU seconds the datapath process used over the run, when measured.
    datapath_cpu_s: Option<f64>,
    guest_cpu_s: f64,
    rss_bytes: u64,
}

impl Cost {
    fn of(ut: &UnderTest, datapath_cpu_s: f64, guest_cpu_s: f64) -> Self {
        Cost {
            datapath_cpu_s: Some(datapath_cpu_s),
            guest_cpu_s,
            rss_bytes: process_rss_bytes(ut.pid).unwrap_or(0),
        }
    }
}

impl Measurement {
    fn new(
        peer: Peer,
        direction: Direction,
        size: usize,
        frames: u64,
        seconds: f64,
        cost: Cost,
    ) -> Self {
        let Cost {
            datapath_cpu_s,
            guest_cpu_s,
            rss_bytes,
        } = cost;
        Measurement {
            peer,
            direction,
            size,
            frames,
            seconds,
            pps: frames as f64 / seconds,
            cpu_s_per_mpkt: datapath_cpu_s
                .map_or(f64::NAN, |cpu| cpu / (frames.max(1) as f64 / 1e6)),
            guest_cpu_s,
            rss_bytes,
            generator: None,
            net_rx_softirqs: None,
            napi_thread_share: None,
            dirty_pages: None,
        }
    }
}

/// The guest sides' dirty logs while a dirty-log peer is measured: started before the
/// traffic, cleared after the warm-up (as QEMU clears its log after each copying pass), and
/// read after the measured window.
struct MigrationLog {
    on: bool,
}

impl MigrationLog {
    /// Starts logging on `guests` if `peer` measures a migration's logging.
    fn start(peer: Peer, guests: &mut [&mut VirtioNetFrontend]) -> Result<Self> {
        let on = peer == Peer::DirtyLog;
        if on {
            for fe in guests {
                fe.start_dirty_log().context("starting the dirty log")?;
            }
        }
        Ok(MigrationLog { on })
    }

    /// Forgets what the warm-up marked, so that the pages counted later are the window's.
    fn clear(&self, guests: &[&VirtioNetFrontend]) -> Result<()> {
        if self.on {
            for fe in guests {
                fe.clear_dirty_log()?;
            }
        }
        Ok(())
    }

    /// The pages marked since `clear`, summed over `guests`; an error if there are none,
    /// since the datapath wrote into every guest that took part in the window.
    fn marked(&self, guests: &[&VirtioNetFrontend]) -> Result<Option<u64>> {
        if !self.on {
            return Ok(None);
        }
        let mut pages = 0;
        for fe in guests {
            pages += fe.dirty_pages()?.len() as u64;
        }
        if pages == 0 {
            bail!("no page was marked in the dirty log: the daemon did not log its writes");
        }
        Ok(Some(pages))
    }
}

/// A MAC nobody in the lab owns: tx frames to it are counted by the wire and go no further.
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn limit_binary() -> PathBuf {
    crate::daemon::binary().with_file_name("xvdpa-xsk-limit")
}

fn frame_for(direction: Direction, size: usize, wire_mac: [u8; 6], spec: &FrameSpec) -> Vec<u8> {
    let len = size.saturating_sub(4).max(60);
    let (dst, src, src_ip, dst_ip) = match direction {
        Direction::Rx => (
            guest_mac(0),
            spec.src_mac.unwrap_or(wire_mac),
            ip_bytes(lab::WIRE_IP),
            ip_bytes(&lab::guest_ip(0)),
        ),
        Direction::VmToVm => (
            guest_mac(1),
            guest_mac(0),
            ip_bytes(&lab::guest_ip(0)),
            ip_bytes(&lab::guest_ip(1)),
        ),
        Direction::Tx => (
            spec.dst_mac.unwrap_or(SINK_MAC),
            guest_mac(0),
            ip_bytes(&lab::guest_ip(0)),
            [10, 77, 0, 200],
        ),
    };
    udp_frame(
        dst,
        src,
        spec.src_ip.unwrap_or(src_ip),
        spec.dst_ip.unwrap_or(dst_ip),
        spec.sport.unwrap_or(1024),
        spec.dport.unwrap_or(9),
        len,
    )
}

/// The datapath process under test and its guest-side connection.
struct UnderTest {
    pid: u32,
    daemon: Option<Daemon>,
    testpmd: Option<std::process::Child>,
    dpdk_prefix: Option<String>,
    /// The directory of the peer's vhost-user sockets, removed last.
    dir: Option<SocketDir>,
}

impl UnderTest {
    fn daemon(d: Daemon) -> Result<Self> {
        Ok(UnderTest {
            pid: d.pid().context("daemon pid")?,
            daemon: Some(d),
            testpmd: None,
            dpdk_prefix: None,
            dir: None,
        })
    }

    fn finish(mut self) -> Result<()> {
        if let Some(d) = self.daemon.take() {
            d.stop()?;
        }
        if let Some(mut t) = self.testpmd.take() {
            // SIGINT lets testpmd close its ports, which detaches its XDP program from the NIC.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(t.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while t.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = t.kill();
                    let _ = t.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(p) = self.dpdk_prefix.take() {
            let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{p}"));
        }
        Ok(())
    }
}

impl Drop for UnderTest {
    fn drop(&mut self) {
        if let Some(mut t) = self.testpmd.take() {
            let _ = t.kill();
            let _ = t.wait();
        }
    }
}

/// dpdk-testpmd on the datapath CPU, io-forwarding between the two ports `vdevs` make.
fn start_testpmd(lab: &Lab, pin: Pinning, tag: &str, vdevs: &[String]) -> Result<UnderTest> {
    let prefix = format!("xvbench-{}-{tag}", std::process::id());
    let mut cmd = lab.in_host("taskset");
    cmd.args(["-c", &pin.datapath.to_string(), "dpdk-testpmd"])
        .args(dpdk::eal_args(
            &prefix,
            &format!("0@{0},1@{0}", pin.datapath),
        ));
    for v in vdevs {
        cmd.arg("--vdev").arg(v);
    }
    cmd.args([
        "--",
        "--forward-mode=io",
        "--auto-start",
        "--nb-cores=1",
        "--stats-period=1",
        "--total-num-mbufs=16384",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting dpdk-testpmd")?;
    let log = LineLog::capture(&mut child, "testpmd");
    match log.wait_for(
        "Port statistics",
        0,
        Duration::from_secs(30),
        Some(&mut child),
    )? {
        Wait::Found(_) => {}
        _ => bail!("dpdk-testpmd did not start:\n{}", log.lines().join("\n")),
    }
    Ok(UnderTest {
        pid: child.id(),
        daemon: None,
        testpmd: Some(child),
        dpdk_prefix: Some(prefix),
        dir: None,
    })
}

fn start_vhost_peer(
    peer: Peer,
    lab: &Lab,
    pin: Pinning,
    tag: &str,
    daemon_args: &[String],
) -> Result<(UnderTest, VirtioNetFrontend)> {
    let dir = socket_dir(tag)?;
    let socket = dir.join("bench.sock");
    let _ = std::fs::remove_file(&socket);
    let mut ut = match peer {
        Peer::Xvdpa | Peer::DirtyLog => {
            let mut args: Vec<&str> = vec!["--log", "warn,xvdpa=info"];
            args.extend(daemon_args.iter().map(|s| s.as_str()));
            let d = Daemon::start_pinned(
                lab,
                &socket,
                &mac_str(guest_mac(0)),
                &args,
                Some(pin.datapath),
            )?;
            UnderTest::daemon(d)?
        }
        Peer::SingleCopy | Peer::SingleCopyInPlace => {
            let settings = match peer {
                Peer::SingleCopyInPlace => ",guest-umem=on,guest-umem-tx=in-place",
                _ => ",guest-umem=on",
            };
            let spec = Daemon::port_spec(&socket, guest_mac(0), settings);
            start_daemon_with_ports(lab, pin, &dir.join("ctl.sock"), &[spec], daemon_args)?
        }
        Peer::Dpdk => start_testpmd(
            lab,
            pin,
            tag,
            &[
                format!("net_vhost0,iface={},queues=1", socket.display()),
                format!("net_af_xdp0,iface={},start_queue=0,queue_count=1", lab::NIC),
            ],
        )?,
        Peer::Limit => unreachable!("the limit peer has no vhost side"),
    };
    ut.dir = Some(dir);
    let fe = VirtioNetFrontend::connect(&socket, bench_frontend())?;
    Ok((ut, fe))
}

/// The daemon under test with the ports `specs` (`--port` values) and its control socket at
/// `ctl`, pinned to the datapath CPU, once every port is ready.
fn start_daemon_with_ports(
    lab: &Lab,
    pin: Pinning,
    ctl: &Path,
    specs: &[String],
    daemon_args: &[String],
) -> Result<UnderTest> {
    let mut args: Vec<&str> = vec![
        "--log",
        "warn,xvdpa=info",
        "--ctl",
        ctl.to_str().context("path")?,
    ];
    for s in specs {
        args.extend(["--port", s.as_str()]);
    }
    args.extend(daemon_args.iter().map(|s| s.as_str()));
    let mut d = Daemon::spawn_pinned(lab, &args, Some(pin.datapath))?;
    d.wait_for_count(
        "port ready for a frontend",
        specs.len(),
        Duration::from_secs(20),
    )?;
    UnderTest::daemon(d)
}

/// The guest side's driver settings: large rings and EVENT_IDX, as a Linux guest negotiates
/// (its notifications are NAPI-style, see `VirtioNetFrontend::set_napi_mode`), and buffers
/// laid out as Linux lays out its receive buffers.
fn bench_frontend() -> FrontendOptions {
    let defaults = FrontendOptions::default();
    FrontendOptions {
        queue_size: 1024,
        features: defaults.features | VIRTIO_RING_F_EVENT_IDX,
        slot_len: LINUX_RX_BUFFER,
        ..defaults
    }
}

/// The guest side's receive buffers: one data slot each.
const RX_BUFFER: u32 = LINUX_RX_BUFFER as u32;

/// The vm-to-vm scenario's datapath: xvdpa with two ports, or testpmd forwarding between two
/// vhost ports; returns it with the sending (A) and receiving (B) guest sides.
fn start_vm_to_vm_peer(
    peer: Peer,
    lab: &Lab,
    pin: Pinning,
    tag: &str,
    daemon_args: &[String],
) -> Result<(UnderTest, VirtioNetFrontend, VirtioNetFrontend)> {
    let dir = socket_dir(tag)?;
    let socks = [dir.join("a.sock"), dir.join("b.sock")];
    for s in &socks {
        let _ = std::fs::remove_file(s);
    }
    let mut ut = match peer {
        Peer::Xvdpa | Peer::DirtyLog => {
            let specs: Vec<String> = (0..2)
                .map(|i| {
                    format!(
                        "socket={},mac={}",
                        socks[i].display(),
                        mac_str(guest_mac(i as u8))
                    )
                })
                .collect();
            start_daemon_with_ports(lab, pin, &dir.join("ctl.sock"), &specs, daemon_args)?
        }
        Peer::Dpdk => start_testpmd(
            lab,
            pin,
            tag,
            &[
                format!("net_vhost0,iface={},queues=1", socks[0].display()),
                format!("net_vhost1,iface={},queues=1", socks[1].display()),
            ],
        )?,
        Peer::Limit | Peer::SingleCopy | Peer::SingleCopyInPlace => bail!(
            "the vm-to-vm scenario has no {} peer (no NIC is involved)",
            peer.name()
        ),
    };
    ut.dir = Some(dir);
    let a = VirtioNetFrontend::connect(&socks[0], bench_frontend())?;
    let b = VirtioNetFrontend::connect(&socks[1], bench_frontend())?;
    Ok((ut, a, b))
}

/// Measures one (peer, direction, size) in `lab`, which must be idle.
pub fn measure(
    lab: &Lab,
    peer: Peer,
    direction: Direction,
    size: usize,
    setup: &Setup,
) -> Result<Measurement> {
    let pin = setup.pinning;
    pin_thread(pin.load)?;
    let wire_mac = lab.wire_mac()?;
    let frame = frame_for(direction, size, wire_mac, &setup.frame);
    let tag = format!("bench-{}-{}-{size}", peer.name(), direction.name());
    let total = setup.warmup + setup.duration;

    if !peer.has_vm_to_vm() && direction == Direction::VmToVm {
        bail!(
            "the vm-to-vm scenario has no {} peer (no NIC is involved)",
            peer.name()
        );
    }
    if peer == Peer::Limit {
        let _ = lab
            .in_host("ip")
            .args(["link", "set", "dev", lab::NIC, "xdp", "off"])
            .status();
        let mut cmd = lab.in_host("taskset");
        cmd.args(["-c", &pin.datapath.to_string()])
            .arg(limit_binary());
        cmd.args([
            "--iface",
            lab::NIC,
            "--mac",
            &mac_str(guest_mac(0)),
            "--seconds",
            &format!("{:.3}", total.as_secs_f64()),
        ]);
        if direction == Direction::Tx {
            cmd.args([
                "--tx-len",
                &frame.len().to_string(),
                "--tx-dst",
                &mac_str(SINK_MAC),
            ]);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting xvdpa-xsk-limit")?;
        std::thread::sleep(Duration::from_millis(300));
        let generator = match direction {
            Direction::VmToVm => unreachable!("refused above"),
            Direction::Rx => Some(Generator::start_kind(
                setup.generator,
                &lab.wire_ns,
                lab::WIRE,
                frame.clone(),
                setup.flows,
                Some(pin.load),
            )?),
            Direction::Tx => None,
        };
        let wire0 = iface_counter(&lab.wire_ns, lab::WIRE, "rx_packets")?;
        let out = child.wait_with_output()?;
        let wire1 = iface_counter(&lab.wire_ns, lab::WIRE, "rx_packets")?;
        let generator_name = generator.as_ref().map(|g| g.kind().name());
        if let Some(g) = generator {
            g.stop()?;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "xvdpa-xsk-limit failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |k: &str| -> Option<f64> {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .and_then(|v| v.parse().ok())
        };
        let seconds = field("seconds=").context("limit output")?;
        let frames = match direction {
            Direction::VmToVm => unreachable!("refused above"),
            Direction::Rx => field("rx=").context("limit output")? as u64,
            Direction::Tx => wire1 - wire0,
        };
        // The whole run counts here (no separate warm-up window): the ceiling is a bound.
        let mut m = Measurement::new(peer, direction, size, frames, seconds, Cost::default());
        m.generator = generator_name;
        return Ok(m);
    }

    // Whatever a previous peer left on the NIC (an XDP program) must not decide this run.
    let _ = lab
        .in_host("ip")
        .args(["link", "set", "dev", lab::NIC, "xdp", "off"])
        .status();
    if direction == Direction::VmToVm {
        let (ut, mut a, mut b) = start_vm_to_vm_peer(peer, lab, pin, &tag, &setup.daemon_args)?;
        // The switch reaches B's queue once B's worker has had its first event.
        std::thread::sleep(Duration::from_millis(300));
        let result = (|| -> Result<Measurement> {
            // Both guests log: A's used ring and B's buffers and used ring are written.
            let log = MigrationLog::start(peer, &mut [&mut a, &mut b])?;
            guest_vm_to_vm(&mut a, &mut b, &frame, setup.warmup, RX_BUFFER)?;
            log.clear(&[&a, &b])?;
            let cpu0 = process_cpu_seconds(ut.pid)?;
            let t0 = Instant::now();
            let (frames, guest_cpu) =
                guest_vm_to_vm(&mut a, &mut b, &frame, setup.duration, RX_BUFFER)?;
            let seconds = t0.elapsed().as_secs_f64();
            let cpu = process_cpu_seconds(ut.pid)? - cpu0;
            let mut m = Measurement::new(
                peer,
                direction,
                size,
                frames,
                seconds,
                Cost::of(&ut, cpu, guest_cpu),
            );
            m.dirty_pages = log.marked(&[&a, &b])?;
            Ok(m)
        })();
        drop((a, b));
        let finished = ut.finish();
        let m = result?;
        finished?;
        return Ok(m);
    }
    let (ut, mut fe) = start_vhost_peer(peer, lab, pin, &tag, &setup.daemon_args)?;
    let mut generator_name = None;
    let mut net_rx_softirqs = None;
    let mut napi_thread_share = None;
    let result = (|| -> Result<Measurement> {
        let log = MigrationLog::start(peer, &mut [&mut fe])?;
        // Each direction yields (frames, seconds, datapath CPU seconds, guest CPU seconds).
        let (frames, seconds, cpu, guest_cpu_s) = match direction {
            Direction::VmToVm => unreachable!("measured above"),
            Direction::Rx => {
                let gen = Generator::start_kind(
                    setup.generator,
                    &lab.wire_ns,
                    lab::WIRE,
                    frame.clone(),
                    setup.flows,
                    Some(pin.load),
                )?;
                generator_name = Some(gen.kind().name());
                guest_rx_count(&mut fe, setup.warmup, RX_BUFFER)?;
                log.clear(&[&fe])?;
                // The NAPI threads xvdpa may run for the NIC queue count as its own CPU.
                let napi0 = napi_threads_cpu_seconds(lab::NIC)?;
                let cpu0 = process_cpu_seconds(ut.pid)?;
                let soft0 = (
                    cpu_net_rx_softirqs(pin.load)?,
                    cpu_net_rx_softirqs(pin.datapath)?,
                );
                let t0 = Instant::now();
                let (frames, guest_cpu) = guest_rx_count(&mut fe, setup.duration, RX_BUFFER)?;
                let seconds = t0.elapsed().as_secs_f64();
                let napi = napi_threads_cpu_seconds(lab::NIC)? - napi0;
                let cpu = process_cpu_seconds(ut.pid)? - cpu0 + napi;
                net_rx_softirqs = Some((
                    (cpu_net_rx_softirqs(pin.load)? - soft0.0) as f64 / seconds,
                    (cpu_net_rx_softirqs(pin.datapath)? - soft0.1) as f64 / seconds,
                ));
                napi_thread_share = Some(napi / seconds);
                gen.stop()?;
                (frames, seconds, cpu, guest_cpu)
            }
            Direction::Tx => {
                guest_tx_blast(&mut fe, &frame, setup.warmup)?;
                log.clear(&[&fe])?;
                let wire0 = iface_counter(&lab.wire_ns, lab::WIRE, "rx_packets")?;
                let cpu0 = process_cpu_seconds(ut.pid)?;
                let t0 = Instant::now();
                let (_, guest_cpu) = guest_tx_blast(&mut fe, &frame, setup.duration)?;
                let seconds = t0.elapsed().as_secs_f64();
                let frames = iface_counter(&lab.wire_ns, lab::WIRE, "rx_packets")? - wire0;
                let cpu = process_cpu_seconds(ut.pid)? - cpu0;
                (frames, seconds, cpu, guest_cpu)
            }
        };
        let mut m = Measurement::new(
            peer,
            direction,
            size,
            frames,
            seconds,
            Cost::of(&ut, cpu, guest_cpu_s),
        );
        m.dirty_pages = log.marked(&[&fe])?;
        Ok(m)
    })()
    .map(|mut m| {
        m.generator = generator_name;
        m.net_rx_softirqs = net_rx_softirqs;
        m.napi_thread_share = napi_thread_share;
        m
    });
    drop(fe);
    let finished = ut.finish();
    let m = result?;
    finished?;
    Ok(m)
}

/// The daemon's CPU over `window` with no traffic, after a second of rx traffic (64-byte
/// frames) has made its workers poll and, where the kernel lets it, take the NIC queue's
/// receive work over: what an idle daemon costs once the traffic has stopped.
pub fn measure_idle(lab: &Lab, setup: &Setup, window: Duration) -> Result<IdleCpu> {
    let pin = setup.pinning;
    pin_thread(pin.load)?;
    let frame = frame_for(Direction::Rx, 64, lab.wire_mac()?, &setup.frame);
    let _ = lab
        .in_host("ip")
        .args(["link", "set", "dev", lab::NIC, "xdp", "off"])
        .status();
    let (ut, mut fe) = start_vhost_peer(Peer::Xvdpa, lab, pin, "bench-idle", &setup.daemon_args)?;
    let result = (|| -> Result<IdleCpu> {
        let gen = Generator::start_kind(
            setup.generator,
            &lab.wire_ns,
            lab::WIRE,
            frame,
            setup.flows,
            Some(pin.load),
        )?;
        let (frames, _) = guest_rx_count(&mut fe, Duration::from_secs(1), RX_BUFFER)?;
        gen.stop()?;
        if frames == 0 {
            bail!("no frames reached the guest side before the idle window");
        }
        // Whatever was in flight drains, and the NIC queue's deferred polls run out.
        std::thread::sleep(Duration::from_millis(500));
        let cpu0 = process_cpu_seconds(ut.pid)?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let seconds = t0.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds(ut.pid)? - cpu0;
        Ok(IdleCpu {
            seconds,
            share: cpu / seconds,
        })
    })();
    drop(fe);
    let finished = ut.finish();
    let idle = result?;
    finished?;
    Ok(idle)
}

/// Whether dpdk-testpmd is installed.
pub fn have_dpdk() -> bool {
    Command::new("dpdk-testpmd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
