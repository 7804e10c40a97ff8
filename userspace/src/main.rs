//! `xvdpa`: the command line of the daemon (which [`xvdpa::runtime`] runs) and of the `ctl`
//! and `stats` clients of its control socket.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use xvdpa::api::{self, PortSpec, Request, StatsSnapshot};
use xvdpa::config::{self, ConfigFile};
use xvdpa::control;
use xvdpa::mac::MacAddr;
use xvdpa::nic::steering::XdpModeChoice;
use xvdpa::nic::xsk::XskModeChoice;
use xvdpa::runtime::{self, RuntimeConfig};
use xvdpa::stats_table;

#[cfg(not(xvdpa_ebpf))]
compile_error!("the XDP program is not built: run `cargo xtask build`, which installs the eBPF toolchain and builds it");
#[cfg(not(xvdpa_ebpf))]
const XDP_OBJECT: &[u8] = &[]; // so that the line above is the only error
#[cfg(xvdpa_ebpf)]
use xvdpa::nic::steering::XDP_OBJECT;

/// Software vDPA: a vhost-user-net backend whose datapath is XDP steering and AF_XDP sockets.
///
/// Without a subcommand, runs the daemon on --iface with the ports given by --port (or
/// --socket/--mac, or the config file).
#[derive(Debug, Parser)]
#[command(name = "xvdpa", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Adds, removes and lists the ports of a running daemon.
    Ctl(CtlArgs),
    /// Shows a running daemon's counters: a line per port, queue pairs with --queues.
    Stats(StatsArgs),
    /// Writes the man page (xvdpa.1) and bash, zsh and fish completions into DIR, for
    /// packaging.
    #[command(hide = true)]
    GenerateDocs {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML file with daemon settings and [[port]] tables; flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The NIC to serve VMs on.
    #[arg(long, value_name = "IFNAME")]
    iface: Option<String>,
    /// A VM port: socket=PATH,mac=MAC[,allow-mac=MAC]...[,rate-pps=N][,rate-bps=N]
    /// [,queues=N][,cpus=A+B][,vlan=N][,vlan-passthrough=on][,promisc=on][,tx-gso=kernel|daemon][,guest-umem=on]
    /// [,socket-group=NAME][,socket-mode=OCTAL]. Repeat for more VMs.
    #[arg(long = "port", value_name = "SPEC", value_parser = parse_port)]
    ports: Vec<PortSpec>,
    /// vhost-user socket of a single port (with --mac); the same as --port socket=...,mac=...
    #[arg(long, value_name = "PATH", requires = "mac")]
    socket: Option<PathBuf>,
    /// The single port's MAC address (with --socket).
    #[arg(long, value_name = "MAC", value_parser = parse_mac, requires = "socket")]
    mac: Option<MacAddr>,
    /// MTU offered to the guests; larger frames from them are dropped and counted [default: 1500].
    #[arg(long)]
    mtu: Option<u16>,
    /// How to attach XDP to the NIC [default: auto].
    #[arg(long, value_parser = mode_parser::<XdpModeChoice>([
        PossibleValue::new("auto")
            .help("Native (driver) mode if the driver has it, generic (skb) mode otherwise"),
        PossibleValue::new("driver"),
        PossibleValue::new("skb"),
    ]))]
    xdp_mode: Option<XdpModeChoice>,
    /// How AF_XDP moves frames [default: auto].
    #[arg(long, value_parser = mode_parser::<XskModeChoice>([
        PossibleValue::new("auto").help("Zero-copy where the driver supports it, else copy"),
        PossibleValue::new("zero-copy"),
        PossibleValue::new("copy"),
    ]))]
    xsk_mode: Option<XskModeChoice>,
    /// Poll the rings continuously instead of sleeping between events, with the kernel's
    /// preferred busy polling (SO_PREFER_BUSY_POLL) on the AF_XDP sockets (a CPU per queue pair).
    #[arg(long)]
    busy_poll: bool,
    /// Sleep as soon as the rings are empty and leave the NIC queues' NAPI settings alone.
    /// By default a worker keeps polling while frames come (its busy polls run the NIC queue's
    /// receive work on its own CPU, with the queue's defer-hard-irqs and gro-flush-timeout set
    /// for that and restored at exit) and sleeps after a short idle.
    #[arg(long, conflicts_with = "busy_poll")]
    no_adaptive_poll: bool,
    /// Control socket for `xvdpa ctl` and `xvdpa stats` [default: xvdpa.ctl next to the first
    /// port's socket, or /run/xvdpa/xvdpa.ctl].
    #[arg(long, value_name = "PATH")]
    ctl: Option<PathBuf>,
    /// Let members of this group use the control socket (mode 0660 in that group) [default:
    /// the daemon's user only, mode 0600]. Members can add and remove ports.
    #[arg(long, value_name = "NAME", value_parser = api::parse_socket_group)]
    ctl_group: Option<String>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// After start-up (XDP attached, NIC queues bound), run as this user and its groups,
    /// keeping only the capabilities the running daemon uses (see README). Needs root.
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Log filter, e.g. `info`, `xvdpa=debug` (RUST_LOG also works).
    #[arg(long, default_value = "info")]
    log: String,
}

const DEFAULT_CTL: &str = "/run/xvdpa/xvdpa.ctl";

#[derive(Debug, Args)]
struct CtlArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CTL, global = true)]
    ctl: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Adds a port; the others keep running untouched.
    AddPort(AddPortArgs),
    /// Removes a port, named by its socket path, MAC or index.
    DelPort { port: String },
    /// Lists the ports.
    List {
        /// Print the daemon's JSON reply.
        #[arg(long)]
        json: bool,
    },
}

/// `xvdpa ctl add-port`: the flags of one [`PortSpec`], checked as `--port` checks them.
#[derive(Debug, Args)]
struct AddPortArgs {
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// `client`: QEMU listens on the socket and the daemon connects (and reconnects).
    #[arg(long, value_parser = api::parse_mode, default_value = "server")]
    mode: api::SocketRole,
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: MacAddr,
    /// Another source MAC the guest may send with (repeatable).
    #[arg(long = "allow-mac", value_name = "MAC", value_parser = parse_mac)]
    allow_macs: Vec<MacAddr>,
    /// Transmit limit in packets per second (k, M, G suffixes).
    #[arg(long, value_parser = api::parse_rate)]
    rate_pps: Option<u64>,
    /// Transmit limit in bits per second (k, M, G suffixes).
    #[arg(long, value_parser = api::parse_rate)]
    rate_bps: Option<u64>,
    /// Queue pairs offered to the guest (multiqueue above 1).
    #[arg(long, value_parser = api::parse_queues)]
    queues: Option<u16>,
    /// Also deliver unicast nobody owns to the port (a promiscuous guest).
    #[arg(long)]
    promisc: bool,
    /// Ask for the guest's memory as the NIC queue's UMEM (single-copy path); the NIC must
    /// be dedicated to this port (the daemon started with it as its only port).
    #[arg(long)]
    guest_umem: bool,
    /// How the single-copy path transmits: auto (from the guest's buffers on a zero-copy
    /// NIC, copied on a copy-mode one), in-place or copy.
    #[arg(long, value_name = "MODE", value_parser = api::parse_guest_umem_tx, default_value = "auto", requires = "guest_umem")]
    guest_umem_tx: api::GuestUmemTx,
    /// Who cuts the guest's TSO frames for the wire: kernel (handed whole to the kernel, for
    /// the NIC's TSO or the kernel's GSO) or daemon (its software segmenter).
    #[arg(long, value_name = "WHO", value_parser = api::parse_tx_gso, default_value = "kernel")]
    tx_gso: api::TxGso,
    /// The port (socket, MAC or index) whose guest migrates to this one: the new port may
    /// share its MAC and takes its frames when the migrated guest starts.
    #[arg(long)]
    migrate_from: Option<String>,
    /// 802.1Q VLAN ID of the port (tag pushed on transmit, stripped on receive).
    #[arg(long, value_parser = api::parse_vlan)]
    vlan: Option<u16>,
    /// Let the guest send frames with VLAN tags of its own (to the wire only); without it
    /// they are dropped and counted (tx_dropped_vlan).
    #[arg(long)]
    vlan_passthrough: bool,
    /// Group of the port's socket (e.g. the QEMU's group) [default: the daemon's group].
    #[arg(long, value_name = "NAME", value_parser = api::parse_socket_group)]
    socket_group: Option<String>,
    /// Permission bits of the port's socket, in octal.
    #[arg(long, value_name = "OCTAL", value_parser = api::parse_socket_mode, default_value = "0660")]
    socket_mode: u32,
    /// CPUs for the queue pairs' threads, e.g. 2+3.
    // The full path keeps clap from reading `Vec` as a repeatable flag: one value, one list.
    #[arg(long, value_name = "CPU+CPU...", value_parser = api::parse_cpus)]
    cpus: Option<::std::vec::Vec<usize>>,
}

impl AddPortArgs {
    /// The port these flags describe, its socket made absolute here: the daemon would
    /// resolve a relative one in its own working directory.
    fn into_spec(self) -> std::io::Result<PortSpec> {
        let socket = if self.socket.is_relative() {
            std::env::current_dir()?.join(self.socket)
        } else {
            self.socket
        };
        Ok(PortSpec {
            socket,
            mode: self.mode,
            mac: self.mac,
            allow_macs: self.allow_macs,
            rate_pps: self.rate_pps,
            rate_bps: self.rate_bps,
            vlan: self.vlan,
            vlan_passthrough: self.vlan_passthrough,
            queue_pairs: self.queues.unwrap_or(1),
            cpus: self.cpus.unwrap_or_default(),
            promisc: self.promisc,
            guest_umem: self.guest_umem,
            guest_umem_tx: self.guest_umem_tx,
            tx_gso: self.tx_gso,
            socket_group: self.socket_group,
            socket_mode: self.socket_mode,
            migrate_from: self.migrate_from,
        })
    }
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CTL)]
    ctl: PathBuf,
    /// Redraw every SECONDS with per-second rates, until interrupted.
    #[arg(long, value_name = "SECONDS")]
    watch: Option<f64>,
    /// Print the daemon's JSON snapshot instead of a table.
    #[arg(long, conflicts_with = "watch")]
    json: bool,
    /// A line for every queue pair under its port's totals (shown anyway when there are
    /// at most 8 queue pairs in all).
    #[arg(long, conflicts_with = "json")]
    queues: bool,
}

/// A mode flag: clap offers `names` (in help and errors) and the library enum reads the one
/// given, in the same kebab-case spelling as the config file.
fn mode_parser<T>(names: [PossibleValue; 3]) -> impl TypedValueParser<Value = T>
where
    T: serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(names).try_map(|name| {
        T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(&name))
    })
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    MacAddr::parse_unicast(s).map_err(|e| e.to_string())
}

fn parse_port(s: &str) -> Result<PortSpec, String> {
    config::parse_port(s).map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Ctl(args)) => ctl(args),
        Some(Command::Stats(args)) => stats(args),
        Some(Command::GenerateDocs { dir }) => generate_docs(&dir),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, which is what ends up in journals.
            eprintln!("xvdpa: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log))
        .context("--log")?;
    // The fmt subscriber also installs the `log` bridge, which carries aya-log's records.
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();

    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let Some(iface) = args.iface.or(file.iface.clone()) else {
        bail!("no interface: give --iface, or iface in the --config file");
    };
    let mut ports = file.ports.clone();
    ports.extend(args.ports);
    if let (Some(socket), Some(mac)) = (args.socket, args.mac) {
        ports.push(PortSpec {
            socket,
            mac,
            ..Default::default()
        });
    }
    let metrics = match (args.metrics, &file.metrics) {
        (Some(a), _) => Some(a),
        (None, Some(s)) => Some(
            s.parse()
                .with_context(|| format!("metrics address {s:?} in the config file"))?,
        ),
        (None, None) => None,
    };
    let ctl = args
        .ctl
        .or(file.ctl.clone())
        .unwrap_or_else(|| runtime::default_ctl_path(&ports));
    let config = RuntimeConfig {
        iface,
        ports,
        mtu: args.mtu.or(file.mtu).unwrap_or(1500),
        xdp_mode: args.xdp_mode.or(file.xdp_mode).unwrap_or_default(),
        xsk_mode: args.xsk_mode.or(file.xsk_mode).unwrap_or_default(),
        busy_poll: args.busy_poll || file.busy_poll.unwrap_or(false),
        adaptive_poll: !args.no_adaptive_poll && file.adaptive_poll.unwrap_or(true),
        ctl,
        ctl_group: args.ctl_group.or(file.ctl_group.clone()),
        metrics,
        user: args.user.or(file.user.clone()),
    };
    Ok(runtime::run(config, XDP_OBJECT)?)
}

/// The man page and completions, from the same clap definition the daemon parses with.
fn generate_docs(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    let man = dir.join("xvdpa.1");
    std::fs::write(&man, page).with_context(|| format!("writing {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "xvdpa", dir)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    Ok(())
}

fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let req = match args.command {
        CtlCommand::AddPort(port) => Request::AddPort(port.into_spec()?),
        CtlCommand::DelPort { port } => Request::DelPort { port },
        CtlCommand::List { json } => {
            let reply = control::request(&args.ctl, &Request::List)?;
            let ports = reply.ports.unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&ports)?);
            } else {
                println!(
                    "{:<5} {:<17} {:<12} {:<6} SOCKET  DATAPATH",
                    "INDEX", "MAC", "STATE", "MODE"
                );
                for p in ports {
                    println!(
                        "{:<5} {:<17} {:<12} {:<6} {}  {}",
                        p.index,
                        p.spec.mac.to_string(),
                        p.state,
                        p.spec.mode.to_string(),
                        p.spec.socket.display(),
                        p.datapath
                    );
                }
            }
            return Ok(());
        }
    };
    let reply = control::request(&args.ctl, &req)?;
    if let Some(p) = reply.port {
        println!(
            "port {} {} {} {}",
            p.index,
            p.spec.mac,
            p.spec.socket.display(),
            p.state
        );
    }
    Ok(())
}

fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let fetch = || -> anyhow::Result<StatsSnapshot> {
        control::request(&args.ctl, &Request::Stats)?
            .stats
            .context("the daemon sent no stats")
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&fetch()?)?);
        return Ok(());
    }
    let Some(every) = args.watch else {
        print!("{}", stats_table::render(&fetch()?, None, args.queues));
        return Ok(());
    };
    if !(0.1..=3600.0).contains(&every) {
        bail!("--watch takes 0.1 to 3600 seconds");
    }
    let clear = std::io::stdout().is_terminal();
    let mut previous: Option<(StatsSnapshot, Instant)> = None;
    loop {
        let now = fetch()?;
        let at = Instant::now();
        let rates = previous
            .as_ref()
            .map(|(p, t)| (p, at.duration_since(*t).as_secs_f64()));
        if clear {
            print!("\x1b[H\x1b[2J");
        }
        print!("{}", stats_table::render(&now, rates, args.queues));
        previous = Some((now, at));
        std::thread::sleep(Duration::from_secs_f64(every));
    }
}
