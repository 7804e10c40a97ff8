//! `cargo xtask bench`: every packet scenario for xvdpa, DPDK testpmd and the AF_XDP ceiling,
//! in the same lab with the same generator, guest side and pinning, and (`guest-tcp`) real
//! guests' TCP streams on xvdpa and on QEMU's virtio-net over a tap; medians of several runs,
//! ratios taken pairwise within each run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use xvdpa_tests::bench_run::{
    measure, measure_idle, Direction, FrameSpec, GeneratorKind, IdleCpu, Measurement, Peer,
    Pinning, Setup,
};
use xvdpa_tests::bench_tcp::{measure_tcp, TcpDirection, TcpMeasurement, TcpPeer, TcpSetup};
use xvdpa_tests::lab::Lab;

use crate::bootstrap::{ensure_packages, BUILD_PACKAGES, PEER_PACKAGES};
use crate::build;
use crate::guest_image;
use crate::say;
use crate::util::{is_root, run, workspace_root};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scenarios: rx, tx, vm-to-vm (frames from the test frontend), guest-tcp (TCP streams
    /// of QEMU guests up, down and VM-to-VM; about a minute per peer and run).
    #[arg(long, value_delimiter = ',', default_value = "rx,tx,vm-to-vm")]
    scenarios: Vec<String>,
    /// Frame sizes on the wire, FCS included.
    #[arg(long, value_delimiter = ',', default_value = "64,512,1518")]
    sizes: Vec<usize>,
    /// Peers to measure: xvdpa, single-copy (xvdpa with guest-umem=on; rx and tx only),
    /// single-copy-in-place (the same, sending from the guest's buffers; not in the default
    /// list), dpdk,
    /// limit, dirty-log (xvdpa while a migration logs its writes; not in the default list:
    /// `--scenarios rx,vm-to-vm --peers xvdpa,dirty-log` gives its cost per packet).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "xvdpa,single-copy,dpdk,limit"
    )]
    peers: Vec<String>,
    /// Peers of the guest-tcp scenario: xvdpa, tap (QEMU's virtio-net on a tap bridged with
    /// the NIC). DPDK testpmd cannot carry a TSO guest to an AF_XDP port (see bench_tcp.rs).
    #[arg(long, value_delimiter = ',', default_value = "xvdpa,tap")]
    tcp_peers: Vec<String>,
    /// More settings for the guest-tcp xvdpa peer's ports, appended to each `--port`, e.g.
    /// `,tx-gso=daemon` to measure the daemon's segmenter against the kernel's GSO.
    #[arg(long, value_name = ",KEY=VALUE...", default_value = "")]
    tcp_port_settings: String,
    /// Seconds measured per figure (after a warm-up of a third of that).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Runs per figure; the table shows medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// CPU for the datapath under test (daemon, testpmd or the ceiling's socket loop).
    #[arg(long, default_value_t = 1)]
    datapath_cpu: usize,
    /// CPU shared by the traffic generator and the guest side.
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
    /// UDP flows the generator spreads frames over.
    #[arg(long, default_value_t = 4)]
    flows: u32,
    /// Run xvdpa with --busy-poll (it then spins on its CPU, as DPDK does).
    #[arg(long)]
    busy_poll: bool,
    /// Run xvdpa with --no-adaptive-poll (it sleeps as soon as its rings are empty and leaves
    /// the NIC queue's NAPI alone: the behaviour before adaptive polling).
    #[arg(long, conflicts_with = "busy_poll")]
    no_adaptive_poll: bool,
    /// Seconds over which the idle daemon's CPU is measured (0: not measured).
    #[arg(long, default_value_t = 10.0)]
    idle_seconds: f64,
    /// Traffic generator for rx: auto (pktgen, else XDP live frames, else AF_XDP), pktgen,
    /// xdp-live, af-xdp.
    #[arg(long, default_value = "auto")]
    generator: String,
    /// Source MAC of rx frames (default: the lab wire's).
    #[arg(long, value_parser = parse_mac)]
    src_mac: Option<[u8; 6]>,
    /// Destination MAC of tx frames (default: a MAC nobody owns; they stop at the wire).
    #[arg(long, value_parser = parse_mac)]
    dst_mac: Option<[u8; 6]>,
    /// Source IPv4 address of the frames.
    #[arg(long)]
    src_ip: Option<std::net::Ipv4Addr>,
    /// Destination IPv4 address of the frames.
    #[arg(long)]
    dst_ip: Option<std::net::Ipv4Addr>,
    /// First UDP source port (flows count up from it).
    #[arg(long)]
    udp_sport: Option<u16>,
    /// UDP destination port.
    #[arg(long)]
    udp_dport: Option<u16>,
    /// Write the raw figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw a chart (PNG, with gnuplot): the packet scenarios' at this path, and guest-tcp's
    /// there too when it ran alone, else beside it as STEM-guest-tcp.png.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("invalid MAC {s:?}"))?;
    bytes
        .try_into()
        .map_err(|_| format!("invalid MAC {s:?}: expected six octets"))
}

fn parse_direction(s: &str) -> Result<Direction> {
    match s {
        "rx" => Ok(Direction::Rx),
        "tx" => Ok(Direction::Tx),
        "vm-to-vm" => Ok(Direction::VmToVm),
        other => bail!("unknown scenario {other:?} (rx, tx, vm-to-vm, guest-tcp)"),
    }
}

fn parse_peer(s: &str) -> Result<Peer> {
    match s {
        "xvdpa" => Ok(Peer::Xvdpa),
        "dpdk" => Ok(Peer::Dpdk),
        "limit" => Ok(Peer::Limit),
        "single-copy" => Ok(Peer::SingleCopy),
        "single-copy-in-place" => Ok(Peer::SingleCopyInPlace),
        "dirty-log" => Ok(Peer::DirtyLog),
        other => bail!(
            "unknown peer {other:?} (xvdpa, single-copy, single-copy-in-place, dpdk, limit, \
             dirty-log)"
        ),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The smallest and largest finite value, for run-to-run spread.
fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    (lo <= hi).then_some((lo, hi))
}

/// The guest-tcp scenario's name on the command line.
const GUEST_TCP: &str = "guest-tcp";

type Key = (Direction, usize);

pub fn bench(args: BenchArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark needs root (namespaces, XDP, AF_XDP): run `cargo xtask bench` as root"
        );
    }
    let directions: Vec<Direction> = args
        .scenarios
        .iter()
        .filter(|s| *s != GUEST_TCP)
        .map(|s| parse_direction(s))
        .collect::<Result<_>>()?;
    let guest_tcp = args.scenarios.iter().any(|s| s == GUEST_TCP);
    let tcp_peers: Vec<TcpPeer> = args
        .tcp_peers
        .iter()
        .map(|s| TcpPeer::parse(s))
        .collect::<Result<_>>()?;
    let peers: Vec<Peer> = args
        .peers
        .iter()
        .map(|s| parse_peer(s))
        .collect::<Result<_>>()?;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if args.datapath_cpu >= cpus || args.load_cpu >= cpus {
        bail!("--datapath-cpu/--load-cpu must be below {cpus} (CPUs on this machine)");
    }
    ensure_packages(BUILD_PACKAGES)?;
    if peers.contains(&Peer::Dpdk) && !directions.is_empty() {
        ensure_packages(PEER_PACKAGES)?;
    }
    let daemon = build::build(true)?;
    // The scenario runner finds the daemon, the ceiling binary and the generator from here.
    std::env::set_var("XVDPA_BIN", &daemon);
    let tcpperf = if guest_tcp {
        let image = guest_image::ensure()?;
        std::env::set_var("XVDPA_GUEST_KERNEL", &image.kernel);
        std::env::set_var("XVDPA_GUEST_INITRD", &image.initrd);
        Some(image.tcpperf)
    } else {
        None
    };

    // A lab of its own: creating a lab first removes one of the same name, so two benchmarks
    // on one machine sharing a name would tear down each other's namespaces mid-run.
    let mut lab = Lab::named(&format!("xvdpa-bench-{}", std::process::id()));
    lab.create()?;
    lab.owned = true;
    let pinning = Pinning {
        datapath: args.datapath_cpu,
        load: args.load_cpu,
    };
    let setup = Setup {
        duration: Duration::from_secs_f64(args.duration),
        warmup: Duration::from_secs_f64(args.duration / 3.0),
        pinning,
        flows: args.flows,
        daemon_args: if args.busy_poll {
            vec!["--busy-poll".to_string()]
        } else if args.no_adaptive_poll {
            vec!["--no-adaptive-poll".to_string()]
        } else {
            vec![]
        },
        generator: GeneratorKind::parse(&args.generator)?,
        frame: FrameSpec {
            src_mac: args.src_mac,
            dst_mac: args.dst_mac,
            src_ip: args.src_ip.map(|a| a.octets()),
            dst_ip: args.dst_ip.map(|a| a.octets()),
            sport: args.udp_sport,
            dport: args.udp_dport,
        },
    };
    let mut all: Vec<(usize, Measurement)> = Vec::new();
    let mut tcp: Vec<(usize, TcpMeasurement)> = Vec::new();
    let mut idle: Option<IdleCpu> = None;
    let no_vm_to_vm = peers.iter().filter(|p| !p.has_vm_to_vm()).count()
        * usize::from(directions.contains(&Direction::VmToVm));
    let total = (directions.len() * peers.len() - no_vm_to_vm) * args.sizes.len() * args.runs;
    let mut done = 0;
    let result = (|| -> Result<()> {
        for &d in &directions {
            for &size in &args.sizes {
                for run_no in 0..args.runs {
                    for &peer in peers
                        .iter()
                        .filter(|p| p.has_vm_to_vm() || d != Direction::VmToVm)
                    {
                        done += 1;
                        let m = measure(&lab, peer, d, size, &setup)
                            .with_context(|| format!("{} {} {size}B", peer.name(), d.name()))?;
                        say!(
                            "[{done}/{total}] {} {:>4}B run {} {:<5} {:>9.0} pps  ({:.2} CPU s/Mpkt)",
                            d.name(),
                            size,
                            run_no + 1,
                            peer.name(),
                            m.pps,
                            m.cpu_s_per_mpkt
                        );
                        all.push((run_no, m));
                    }
                }
            }
        }
        if args.idle_seconds > 0.0 && peers.contains(&Peer::Xvdpa) && !directions.is_empty() {
            let m = measure_idle(&lab, &setup, Duration::from_secs_f64(args.idle_seconds))
                .context("xvdpa idle")?;
            say!(
                "xvdpa idle: {:.2} % of a CPU over {:.1} s with no traffic",
                m.share * 100.0,
                m.seconds
            );
            idle = Some(m);
        }
        if let Some(tcpperf) = &tcpperf {
            let tcp_setup = TcpSetup {
                duration: setup.duration,
                warmup: setup.warmup,
                pinning,
                daemon_args: setup.daemon_args.clone(),
                port_settings: args.tcp_port_settings.clone(),
                tcpperf: tcpperf.clone(),
            };
            // Peers alternate within each run, so a ratio compares neighbours in time.
            for run_no in 0..args.runs {
                for &peer in &tcp_peers {
                    let ms = measure_tcp(&lab, peer, &TcpDirection::ALL, &tcp_setup)
                        .with_context(|| format!("guest-tcp {} run {}", peer.name(), run_no + 1))?;
                    for m in ms {
                        say!(
                            "guest-tcp {:<8} run {} {:<5} {:>6.2} Gbit/s  ({:.2} CPU s/GB {})",
                            m.direction.name(),
                            run_no + 1,
                            peer.name(),
                            m.gbit_s,
                            m.datapath_cpu_s_per_gb(),
                            peer.datapath_label()
                        );
                        tcp.push((run_no, m));
                    }
                }
            }
        }
        Ok(())
    })();
    lab.destroy();
    result?;

    if !all.is_empty() {
        println!("{}", render_table(&all, &peers, &args, pinning, idle));
        for against in [&SINGLE_COPY, &SINGLE_COPY_IN_PLACE, &DIRTY_LOG] {
            if peers.contains(&against.peer) && peers.contains(&Peer::Xvdpa) {
                println!("{}", render_against_xvdpa(&all, against));
            }
        }
    }
    if !tcp.is_empty() {
        println!("{}", render_tcp_table(&tcp, &tcp_peers, &args, pinning));
    }
    if let Some(path) = &args.json {
        write_json(path, &all, &tcp, &args, pinning, idle)?;
        say!("raw figures written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        if !all.is_empty() {
            plot(path, &all, &peers)?;
            say!("chart written to {}", path.display());
        }
        if !tcp.is_empty() {
            // Beside the packet chart when there is one.
            let tcp_path = if all.is_empty() {
                path.clone()
            } else {
                path.with_file_name(format!(
                    "{}-guest-tcp.png",
                    path.file_stem().and_then(|s| s.to_str()).unwrap_or("bench")
                ))
            };
            plot_tcp(&tcp_path, &tcp, &tcp_peers)?;
            say!("guest TCP chart written to {}", tcp_path.display());
        }
    }
    Ok(())
}

/// `median (min-max)` of `values`, each formatted with `fmt`.
fn spread(values: &[f64], fmt: impl Fn(f64) -> String) -> String {
    match min_max(values) {
        Some((lo, hi)) => format!("{} ({}-{})", fmt(median(values.to_vec())), fmt(lo), fmt(hi)),
        None => "-".into(),
    }
}

/// `a`'s Gbit/s over `b`'s for each run both measured `d` in.
fn tcp_ratios(
    tcp: &[(usize, TcpMeasurement)],
    d: TcpDirection,
    a: TcpPeer,
    b: TcpPeer,
) -> Vec<f64> {
    let of = |peer: TcpPeer, run: usize| {
        tcp.iter()
            .find(|(r, m)| *r == run && m.peer == peer && m.direction == d)
            .map(|(_, m)| m.gbit_s)
    };
    tcp.iter()
        .filter(|(_, m)| m.peer == a && m.direction == d)
        .filter_map(|(run, m)| Some(m.gbit_s / of(b, *run)?))
        .collect()
}

fn render_tcp_table(
    tcp: &[(usize, TcpMeasurement)],
    peers: &[TcpPeer],
    args: &BenchArgs,
    pin: Pinning,
) -> String {
    let mut out = format!(
        "\nguest TCP: one stream of tcpperf (256 KiB writes) between TCG guests (no KVM) and the wire, {} run(s) x {:.1} s after {:.1} s of warm-up; median (min-max over runs)\n",
        args.runs,
        args.duration,
        args.duration / 3.0
    );
    let _ = writeln!(
        out,
        "pinning: CPU {} = datapath (xvdpa daemon) + QEMU's non-vCPU threads (main loop: interrupts, and the tap backend); CPU {} = guest vCPUs + the wire's tcpperf",
        pin.datapath, pin.load
    );
    if !args.tcp_port_settings.is_empty() {
        let _ = writeln!(
            out,
            "xvdpa ports: socket=...,mac=...{}",
            args.tcp_port_settings
        );
    }
    let mut header = "| direction |".to_string();
    for p in peers {
        let _ = write!(header, " {} Gbit/s |", p.name());
    }
    let pair = peers.contains(&TcpPeer::Xvdpa) && peers.contains(&TcpPeer::Tap);
    if pair {
        header.push_str(" xvdpa/tap |");
    }
    for p in peers {
        let _ = write!(header, " {} CPU s/GB |", p.name());
    }
    // For tap the datapath is QEMU's I/O threads already; for xvdpa they come on top.
    if peers.contains(&TcpPeer::Xvdpa) {
        header.push_str(" xvdpa's QEMU I/O CPU s/GB |");
    }
    for p in peers {
        let _ = write!(header, " {} vCPUs busy |", p.name());
    }
    let _ = writeln!(out, "{header}");
    let cols = header.matches('|').count() - 1;
    let _ = writeln!(out, "|{}", "---|".repeat(cols));
    for d in TcpDirection::ALL {
        let of = |p: TcpPeer, f: &dyn Fn(&TcpMeasurement) -> f64| -> Vec<f64> {
            tcp.iter()
                .filter(|(_, m)| m.peer == p && m.direction == d)
                .map(|(_, m)| f(m))
                .collect()
        };
        if peers.iter().all(|&p| of(p, &|m| m.gbit_s).is_empty()) {
            continue;
        }
        let mut line = format!("| {} |", d.name());
        for &p in peers {
            let _ = write!(
                line,
                " {} |",
                spread(&of(p, &|m| m.gbit_s), |v| format!("{v:.2}"))
            );
        }
        if pair {
            let r = tcp_ratios(tcp, d, TcpPeer::Xvdpa, TcpPeer::Tap);
            let _ = write!(line, " {} |", spread(&r, |v| format!("{v:.2}x")));
        }
        for &p in peers {
            let _ = write!(
                line,
                " {} |",
                spread(&of(p, &|m| m.datapath_cpu_s_per_gb()), |v| format!(
                    "{v:.2}"
                ))
            );
        }
        if peers.contains(&TcpPeer::Xvdpa) {
            let io = median(of(TcpPeer::Xvdpa, &|m| m.qemu_io_cpu_s_per_gb()));
            let _ = write!(line, " {io:.2} |");
        }
        for &p in peers {
            let vcpu = median(of(p, &|m| m.vcpu_cpu_s / m.seconds));
            let _ = write!(line, " {:.0} % |", vcpu * 100.0);
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "\nup: guest -> NIC -> wire; down: wire -> NIC -> guest; vm-to-vm: guest A -> guest B on the same datapath. Gbit/s of TCP payload counted by the receiver.");
    let _ = writeln!(out, "tap: QEMU's virtio-net (vhost=off; no vhost-net here) on a vnet_hdr tap in a Linux bridge with the same veth NIC; vm-to-vm = two taps on that bridge.");
    let _ = writeln!(out, "CPU s/GB: CPU seconds per 1e9 payload bytes over the receiver's window, from /proc/PID/stat: xvdpa = {}; tap = {}, kernel time in them included;", TcpPeer::Xvdpa.datapath_label(), TcpPeer::Tap.datapath_label());
    let _ = writeln!(out, "xvdpa's QEMU I/O: the same QEMU threads when the guests are on xvdpa (interrupt injection), on top of the daemon. vCPUs busy: the guests' vCPU threads, % of one CPU (TCG).");
    out
}

fn by_key(all: &[(usize, Measurement)]) -> BTreeMap<Key, Vec<(usize, Measurement)>> {
    let mut map: BTreeMap<Key, Vec<(usize, Measurement)>> = BTreeMap::new();
    for (run, m) in all {
        map.entry((m.direction, m.size))
            .or_default()
            .push((*run, m.clone()));
    }
    map
}

/// `a`'s figure `f` divided by `b`'s for each run that measured both, each ratio from that
/// run.
fn paired_ratios(
    ms: &[(usize, Measurement)],
    a: Peer,
    b: Peer,
    f: fn(&Measurement) -> f64,
) -> Vec<f64> {
    let mut ratios = Vec::new();
    for (run, m) in ms.iter().filter(|(_, m)| m.peer == a) {
        if let Some((_, other)) = ms.iter().find(|(r, o)| r == run && o.peer == b) {
            ratios.push(f(m) / f(other));
        }
    }
    ratios
}

/// Paired ratios as `median (min-max)`, the median alone from a single run, `-` from none.
fn ratio_spread(ratios: &[f64]) -> String {
    match min_max(ratios) {
        Some((lo, hi)) if ratios.len() > 1 => {
            format!("{:.2}x ({lo:.2}-{hi:.2})", median(ratios.to_vec()))
        }
        Some(_) => format!("{:.2}x", median(ratios.to_vec())),
        None => "-".into(),
    }
}

fn render_table(
    all: &[(usize, Measurement)],
    peers: &[Peer],
    args: &BenchArgs,
    pin: Pinning,
    idle: Option<IdleCpu>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nxvdpa benchmark: median of {} runs x {:.1} s, datapath pinned to CPU {}, generator + guest side on CPU {}, {} flow(s), xvdpa {}",
        args.runs, args.duration, pin.datapath, pin.load, args.flows, if args.busy_poll { "busy-polling" } else if args.no_adaptive_poll { "event-driven (--no-adaptive-poll)" } else { "adaptive polling (default)" }
    );
    let mut generators: Vec<&str> = all.iter().filter_map(|(_, m)| m.generator).collect();
    generators.sort();
    generators.dedup();
    if !generators.is_empty() {
        let _ = writeln!(out, "rx traffic generator: {}", generators.join(", "));
    }
    let mut header = "| scenario | frame |".to_string();
    for p in peers {
        let _ = write!(header, " {} Mpps |", p.name());
    }
    header.push_str(" xvdpa/dpdk | xvdpa/limit | xvdpa CPU s/Mpkt | dpdk CPU s/Mpkt | guest side CPU | xvdpa RSS | NET_RX softirqs/s load/datapath CPU | xvdpa NAPI thread CPU |");
    let _ = writeln!(out, "{header}");
    let cols = header.matches('|').count() - 1;
    let _ = writeln!(out, "|{}", "---|".repeat(cols));
    for ((d, size), ms) in by_key(all) {
        let mut line = format!("| {} | {size} B |", d.name());
        for p in peers {
            let pps = median(
                ms.iter()
                    .filter(|(_, m)| m.peer == *p)
                    .map(|(_, m)| m.pps)
                    .collect(),
            );
            if pps.is_finite() {
                let _ = write!(line, " {:.3} |", pps / 1e6);
            } else {
                line.push_str(" - |");
            }
        }
        let cpu = |p: Peer| {
            median(
                ms.iter()
                    .filter(|(_, m)| m.peer == p)
                    .map(|(_, m)| m.cpu_s_per_mpkt)
                    .collect(),
            )
        };
        let fmt_cpu = |c: f64| {
            if c.is_finite() {
                format!("{c:.2}")
            } else {
                "-".into()
            }
        };
        let guest = median(
            ms.iter()
                .filter(|(_, m)| m.peer == Peer::Xvdpa)
                .map(|(_, m)| m.guest_cpu_s / m.seconds)
                .collect(),
        );
        let rss = median(
            ms.iter()
                .filter(|(_, m)| m.peer == Peer::Xvdpa)
                .map(|(_, m)| m.rss_bytes as f64)
                .collect(),
        );
        let ratio = |b: Peer| ratio_spread(&paired_ratios(&ms, Peer::Xvdpa, b, |m| m.pps));
        let of_xvdpa = |f: &dyn Fn(&Measurement) -> Option<f64>| {
            median(
                ms.iter()
                    .filter(|(_, m)| m.peer == Peer::Xvdpa)
                    .filter_map(|(_, m)| f(m))
                    .collect(),
            )
        };
        let soft_load = of_xvdpa(&|m| m.net_rx_softirqs.map(|s| s.0));
        let soft_dp = of_xvdpa(&|m| m.net_rx_softirqs.map(|s| s.1));
        let napi_thread = of_xvdpa(&|m| m.napi_thread_share);
        let _ = writeln!(
            line,
            " {} | {} | {} | {} | {} | {} | {} | {} |",
            ratio(Peer::Dpdk),
            ratio(Peer::Limit),
            fmt_cpu(cpu(Peer::Xvdpa)),
            fmt_cpu(cpu(Peer::Dpdk)),
            if guest.is_finite() {
                format!("{:.0} %", guest * 100.0)
            } else {
                "-".into()
            },
            if rss.is_finite() {
                format!("{:.1} MiB", rss / (1 << 20) as f64)
            } else {
                "-".into()
            },
            if soft_load.is_finite() {
                format!("{:.0}k / {:.0}k", soft_load / 1e3, soft_dp / 1e3)
            } else {
                "-".into()
            },
            if napi_thread.is_finite() {
                format!("{:.0} %", napi_thread * 100.0)
            } else {
                "-".into()
            },
        );
        out.push_str(&line);
    }
    if let Some(idle) = idle {
        let _ = writeln!(
            out,
            "| xvdpa idle | - | {:.2} % of a CPU over {:.0} s with no traffic, after 1 s of rx |",
            idle.share * 100.0,
            idle.seconds
        );
    }
    let _ = writeln!(out, "\nrx: wire -> NIC -> XDP -> AF_XDP -> guest rx ring, counted by the guest side; tx: guest tx ring -> AF_XDP -> NIC -> wire, counted on the wire;");
    let _ = writeln!(out, "vm-to-vm: guest A's tx ring -> guest B's rx ring through the datapath (xvdpa's switch; testpmd io-forwarding between two vhost ports), counted by B.");
    let _ = writeln!(out, "limit: the same XDP program and AF_XDP socket with nothing behind it (drops on rx, sends a prebuilt frame on tx).");
    let _ = writeln!(out, "CPU s/Mpkt: the datapath process's CPU seconds per million frames; guest side CPU: share of a CPU the measuring frontend used.");
    let _ = writeln!(out, "Ratios: median over runs, each paired within its run, (min-max over runs). NET_RX softirqs/s: rounds of the kernel's receive work in softirq on the load CPU / the datapath CPU during xvdpa's rx window (/proc/softirqs);");
    let _ = writeln!(out, "NAPI thread CPU: share of a CPU the NIC queue's threaded NAPI poller used (xvdpa runs it on its CPU where busy polling cannot reach the queue; included in xvdpa CPU s/Mpkt).");
    out
}

/// A mode of xvdpa measured against xvdpa's default path in the same runs.
struct Against {
    peer: Peer,
    /// The table's first line.
    title: &'static str,
    /// The mode's and the default path's names in the column headers, long and in ratios.
    name: &'static str,
    short: &'static str,
    base_name: &'static str,
    base_short: &'static str,
}

const SINGLE_COPY: Against = Against {
    peer: Peer::SingleCopy,
    title: "single-copy (guest-umem=on: the guest's memory is the NIC queue's UMEM) against the copy path (xvdpa), same runs, same pinning:",
    name: "single-copy",
    short: "single",
    base_name: "copy",
    base_short: "copy",
};

const SINGLE_COPY_IN_PLACE: Against = Against {
    peer: Peer::SingleCopyInPlace,
    title: "single-copy-in-place (guest-umem=on,guest-umem-tx=in-place: frames also sent from the guest's buffers) against the copy path (xvdpa), same runs, same pinning:",
    name: "in-place",
    short: "in-place",
    base_name: "copy",
    base_short: "copy",
};

const DIRTY_LOG: Against = Against {
    peer: Peer::DirtyLog,
    title: "dirty-log (VHOST_F_LOG_ALL on, a log shared with SET_LOG_BASE, as during a migration) against logging off (xvdpa), same runs, same pinning:",
    name: "logging",
    short: "on",
    base_name: "no log",
    base_short: "off",
};

/// A mode next to the default path, run by run: the rate and the daemon's CPU per packet of
/// `against.peer` divided by `xvdpa`'s, each ratio from one run.
fn render_against_xvdpa(all: &[(usize, Measurement)], against: &Against) -> String {
    let Against {
        peer,
        title,
        name,
        short,
        base_name,
        base_short,
    } = *against;
    let mut out = String::new();
    let _ = writeln!(out, "\n{title}");
    let _ = writeln!(out, "| scenario | frame | {name} Mpps | {base_name} Mpps | rate {short}/{base_short} | {name} CPU s/Mpkt | {base_name} CPU s/Mpkt | CPU per packet {short}/{base_short} |");
    let _ = writeln!(out, "|{}", "---|".repeat(8));
    for ((d, size), ms) in by_key(all) {
        let of = |p: Peer, f: fn(&Measurement) -> f64| {
            median(
                ms.iter()
                    .filter(|(_, m)| m.peer == p)
                    .map(|(_, m)| f(m))
                    .collect(),
            )
        };
        let (pps, base_pps) = (of(peer, |m| m.pps), of(Peer::Xvdpa, |m| m.pps));
        if !pps.is_finite() || !base_pps.is_finite() {
            continue;
        }
        let paired = |f| ratio_spread(&paired_ratios(&ms, peer, Peer::Xvdpa, f));
        let _ = writeln!(
            out,
            "| {} | {size} B | {:.3} | {:.3} | {} | {:.2} | {:.2} | {} |",
            d.name(),
            pps / 1e6,
            base_pps / 1e6,
            paired(|m| m.pps),
            of(peer, |m| m.cpu_s_per_mpkt),
            of(Peer::Xvdpa, |m| m.cpu_s_per_mpkt),
            paired(|m| m.cpu_s_per_mpkt),
        );
    }
    out
}

fn write_json(
    path: &PathBuf,
    all: &[(usize, Measurement)],
    tcp: &[(usize, TcpMeasurement)],
    args: &BenchArgs,
    pin: Pinning,
    idle: Option<IdleCpu>,
) -> Result<()> {
    let tcp_rows: Vec<serde_json::Value> = tcp
        .iter()
        .map(|(run, m)| {
            serde_json::json!({
                "run": run, "peer": m.peer.name(), "scenario": GUEST_TCP, "direction": m.direction.name(),
                "bytes": m.bytes, "seconds": m.seconds, "gbit_s": m.gbit_s,
                "datapath_cpu_s": m.datapath_cpu_s, "datapath": m.peer.datapath_label(),
                "datapath_cpu_s_per_gb": m.datapath_cpu_s_per_gb(),
                "qemu_io_cpu_s": m.qemu_io_cpu_s, "vcpu_cpu_s": m.vcpu_cpu_s,
            })
        })
        .collect();
    let rows: Vec<serde_json::Value> = all
        .iter()
        .map(|(run, m)| {
            serde_json::json!({
                "run": run, "peer": m.peer.name(), "scenario": m.direction.name(), "frame_size": m.size,
                "frames": m.frames, "seconds": m.seconds, "pps": m.pps,
                "cpu_s_per_mpkt": if m.cpu_s_per_mpkt.is_finite() { Some(m.cpu_s_per_mpkt) } else { None },
                "guest_cpu_s": m.guest_cpu_s, "rss_bytes": m.rss_bytes, "generator": m.generator,
                "net_rx_softirqs_per_s_load_cpu": m.net_rx_softirqs.map(|s| s.0),
                "net_rx_softirqs_per_s_datapath_cpu": m.net_rx_softirqs.map(|s| s.1),
                "napi_thread_cpu_share": m.napi_thread_share,
                "dirty_pages_marked": m.dirty_pages,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "pinning": {"datapath_cpu": pin.datapath, "generator_and_guest_cpu": pin.load},
        "duration_s": args.duration, "runs": args.runs, "flows": args.flows,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "measurements": rows,
        "guest_tcp": tcp_rows,
        "xvdpa_idle": idle.map(|i| serde_json::json!({"seconds": i.seconds, "cpu_share": i.share})),
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn plot(path: &Path, all: &[(usize, Measurement)], peers: &[Peer]) -> Result<()> {
    let mut text = String::from("scenario");
    for p in peers {
        let _ = write!(text, " {}", p.name());
    }
    text.push('\n');
    for ((d, size), ms) in by_key(all) {
        // Two-line tick labels: "vm-to-vm 1518B" on one line overlaps its neighbours.
        let _ = write!(text, "\"{}\\n{}B\"", d.name(), size);
        for p in peers {
            let pps = median(
                ms.iter()
                    .filter(|(_, m)| m.peer == *p)
                    .map(|(_, m)| m.pps)
                    .collect(),
            );
            let _ = write!(text, " {:.4}", pps / 1e6);
        }
        text.push('\n');
    }
    gnuplot("bench", &text, |data| {
        let mut script = format!(
            "set terminal pngcairo noenhanced size 1100,560 font 'sans,11'\nset output '{}'\n\
             set title 'xvdpa vs DPDK testpmd vs AF_XDP ceiling (median Mpps, higher is better)'\n\
             set style data histograms\nset style histogram clustered gap 1\nset style fill solid 0.85 border -1\n\
             set boxwidth 0.9\nset bmargin 4\nset ylabel 'Mpps'\nset grid ytics\nset key top right\nset yrange [0:*]\n\
             plot '{}' using 2:xtic(1) title columnheader(2)",
            path.display(),
            data.display()
        );
        for i in 1..peers.len() {
            let _ = write!(script, ", '' using {} title columnheader({})", i + 2, i + 2);
        }
        script.push('\n');
        script
    })
}

/// Writes `data` and the script `script` makes for that file's path under target/bench, as
/// NAME.dat and NAME.gp, and runs gnuplot on them (installing it first if it is missing).
fn gnuplot(name: &str, data: &str, script: impl FnOnce(&Path) -> String) -> Result<()> {
    ensure_packages(&[("gnuplot-nox", "gnuplot")])?;
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let data_path = dir.join(format!("{name}.dat"));
    std::fs::write(&data_path, data)?;
    let script_path = dir.join(format!("{name}.gp"));
    std::fs::write(&script_path, script(&data_path))?;
    run(Command::new("gnuplot").arg(&script_path)).context("gnuplot")
}

/// The guest-tcp chart: per direction, each peer's median Gbit/s with its min-max over the
/// runs as an error bar.
fn plot_tcp(path: &Path, tcp: &[(usize, TcpMeasurement)], peers: &[TcpPeer]) -> Result<()> {
    // The header is a comment: the titles come from the script, and a header row would
    // count as a cluster of its own.
    let mut text = String::from("# direction");
    for p in peers {
        let _ = write!(text, " {0} {0}-min {0}-max", p.name());
    }
    text.push('\n');
    for d in TcpDirection::ALL {
        let _ = write!(text, "\"{}\"", d.name());
        for &p in peers {
            let v: Vec<f64> = tcp
                .iter()
                .filter(|(_, m)| m.peer == p && m.direction == d)
                .map(|(_, m)| m.gbit_s)
                .collect();
            let (lo, hi) = min_max(&v).unwrap_or((f64::NAN, f64::NAN));
            let _ = write!(text, " {:.3} {lo:.3} {hi:.3}", median(v));
        }
        text.push('\n');
    }
    gnuplot("guest-tcp", &text, |data| {
        let mut script = format!(
            "set terminal pngcairo noenhanced size 900,520 font 'sans,11'\nset output '{}'\n\
             set title 'TCP of one TCG guest stream: xvdpa vs QEMU virtio-net on a tap (median Gbit/s, bars: min-max over runs)'\n\
             set style data histograms\nset style histogram errorbars gap 1 lw 1\nset style fill solid 0.85 border -1\n\
             set boxwidth 0.9\nset ylabel 'Gbit/s'\nset grid ytics\nset key top right\nset yrange [0:*]\n\
             plot '{}' using 2:3:4:xtic(1) title '{}'",
            path.display(),
            data.display(),
            peers.first().map_or("", |p| p.name())
        );
        for (i, p) in peers.iter().enumerate().skip(1) {
            let c = 2 + 3 * i;
            let _ = write!(
                script,
                ", '' using {}:{}:{} title '{}'",
                c,
                c + 1,
                c + 2,
                p.name()
            );
        }
        script.push('\n');
        script
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(run: usize, peer: TcpPeer, d: TcpDirection, gbit_s: f64) -> (usize, TcpMeasurement) {
        let m = TcpMeasurement {
            peer,
            direction: d,
            bytes: 1,
            seconds: 1.0,
            gbit_s,
            datapath_cpu_s: 0.0,
            qemu_io_cpu_s: 0.0,
            vcpu_cpu_s: 0.0,
        };
        (run, m)
    }

    fn frames(run: usize, peer: Peer, pps: f64, cpu_s_per_mpkt: f64) -> (usize, Measurement) {
        let m = Measurement {
            peer,
            direction: Direction::Rx,
            size: 64,
            frames: pps as u64,
            seconds: 1.0,
            pps,
            cpu_s_per_mpkt,
            guest_cpu_s: 0.0,
            rss_bytes: 0,
            generator: None,
            net_rx_softirqs: None,
            napi_thread_share: None,
            dirty_pages: None,
        };
        (run, m)
    }

    #[test]
    fn a_mode_against_xvdpa_pairs_rate_and_cpu_within_a_run() {
        use Peer::{DirtyLog, Xvdpa};
        let all = [
            frames(0, Xvdpa, 1.0e6, 2.0),
            frames(0, DirtyLog, 0.8e6, 2.4),
            frames(1, Xvdpa, 2.0e6, 1.0),
            frames(1, DirtyLog, 1.0e6, 2.0),
            // Run 2 has no xvdpa figure: no ratio, though its rate counts in the median.
            frames(2, DirtyLog, 0.9e6, 9.0),
        ];
        let table = render_against_xvdpa(&all, &DIRTY_LOG);
        let row = table.lines().last().unwrap();
        assert_eq!(
            row,
            "| rx | 64 B | 0.900 | 1.500 | 0.65x (0.50-0.80) | 2.40 | 1.50 | 1.60x (1.20-2.00) |"
        );
        // Without xvdpa in the runs there is nothing to compare with.
        let alone: Vec<_> = all
            .iter()
            .filter(|(_, m)| m.peer == DirtyLog)
            .cloned()
            .collect();
        assert!(!render_against_xvdpa(&alone, &DIRTY_LOG).contains("| rx |"));
        assert_eq!(ratio_spread(&[1.5]), "1.50x");
        assert_eq!(ratio_spread(&[]), "-");
    }

    #[test]
    fn tcp_ratios_pair_peers_within_a_run() {
        use TcpDirection::{Down, Up};
        use TcpPeer::{Tap, Xvdpa};
        let tcp = [
            stream(0, Xvdpa, Up, 2.0),
            stream(0, Tap, Up, 1.0),
            stream(1, Xvdpa, Up, 3.0),
            stream(1, Tap, Up, 6.0),
            stream(1, Xvdpa, Down, 9.0),
            // Run 2's xvdpa figure has no tap partner: no ratio.
            stream(2, Xvdpa, Up, 5.0),
        ];
        assert_eq!(tcp_ratios(&tcp, Up, Xvdpa, Tap), vec![2.0, 0.5]);
        assert!(tcp_ratios(&tcp, Down, Xvdpa, Tap).is_empty());
        assert_eq!(
            spread(&tcp_ratios(&tcp, Up, Xvdpa, Tap), |v| format!("{v:.2}x")),
            "1.25x (0.50x-2.00x)"
        );
        assert_eq!(spread(&[], |v| format!("{v}")), "-");
    }
}
