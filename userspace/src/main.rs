//! `xvdpa`: the daemon's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use xvdpa::daemon::{self, DaemonConfig};
use xvdpa::mac::MacAddr;
use xvdpa::port::PortSpec;
use xvdpa::steering::XdpModeChoice;
use xvdpa::xsk::XskModeChoice;

/// Software vDPA: a vhost-user-net backend whose datapath is XDP steering and AF_XDP sockets.
#[derive(Debug, Parser)]
#[command(name = "xvdpa", version)]
struct Cli {
    /// The NIC to serve VMs on.
    #[arg(long, value_name = "IFNAME")]
    iface: String,
    /// vhost-user socket QEMU connects to (xvdpa is the server).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The VM's MAC address; frames for it are steered to the VM.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: MacAddr,
    /// MTU offered to the guest; larger frames from it are dropped and counted.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// How to attach XDP to the NIC.
    #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
    xdp_mode: XdpModeChoice,
    /// How AF_XDP moves frames.
    #[arg(long, value_enum, default_value_t = XskModeChoice::Auto)]
    xsk_mode: XskModeChoice,
    /// Poll the rings continuously instead of sleeping between events (one CPU per queue pair).
    #[arg(long)]
    busy_poll: bool,
    /// Log filter, e.g. `info`, `xvdpa=debug` (RUST_LOG also works).
    #[arg(long, default_value = "info")]
    log: String,
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    MacAddr::parse_unicast(s).map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line, which is what ends up in journals.
            eprintln!("xvdpa: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cli.log)).context("--log")?;
    // The fmt subscriber also installs the `log` bridge, which carries aya-log's records.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).with_writer(std::io::stderr).init();

    let config = DaemonConfig {
        iface: cli.iface,
        ports: vec![PortSpec { socket: cli.socket, mac: cli.mac }],
        mtu: cli.mtu,
        xdp_mode: cli.xdp_mode,
        xsk_mode: cli.xsk_mode,
        busy_poll: cli.busy_poll,
    };
    Ok(daemon::run(config)?)
}
