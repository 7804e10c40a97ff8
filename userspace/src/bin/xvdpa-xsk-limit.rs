//! `xvdpa-xsk-limit`: the benchmark's ceiling. The same XDP steering program and AF_XDP socket
//! code as the daemon, with no guest behind them: received frames are dropped at once (rx), or
//! a prebuilt frame is sent as fast as the socket takes it (tx). What this reaches is the most
//! this kernel and NIC allow through AF_XDP; the daemon's figures are read against it.
//!
//! Runs busy-polling for `--seconds`, then prints one line: `rx=<frames> tx=<frames> seconds=<s>`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use xvdpa::datapath::tx::TxBuffers;
use xvdpa::mac::MacAddr;
use xvdpa::nic::steering::{Steering, XdpModeChoice};
use xvdpa::nic::xsk::{NicQueue, XskGeometry, XskModeChoice, XskSocket};

#[cfg(not(xvdpa_ebpf))]
compile_error!("the XDP program is not built: run `cargo xtask build`, which installs the eBPF toolchain and builds it");
#[cfg(not(xvdpa_ebpf))]
const XDP_OBJECT: &[u8] = &[]; // so that the line above is the only error
#[cfg(xvdpa_ebpf)]
use xvdpa::nic::steering::XDP_OBJECT;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    iface: String,
    /// rx: frames to this MAC are steered to the socket and dropped.
    #[arg(long, value_parser = |s: &str| MacAddr::parse_unicast(s).map_err(|e| e.to_string()))]
    mac: MacAddr,
    /// tx: send this many bytes per frame (0: do not send).
    #[arg(long, default_value_t = 0)]
    tx_len: usize,
    /// tx: destination MAC of the frames sent.
    #[arg(long, default_value = "02:00:00:00:00:01")]
    tx_dst: String,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (mut steering, _logger) =
        Steering::attach(XDP_OBJECT, &cli.iface, XdpModeChoice::Auto).context("attaching XDP")?;
    steering.add_port(cli.mac, None, 0)?;
    let queue = NicQueue::open(
        &cli.iface,
        xvdpa::runtime::ifindex(&cli.iface)?,
        0,
        XskGeometry::default(),
        XskModeChoice::Auto,
    )?;
    let mut sock = XskSocket::open(&queue)?;
    steering.bind_socket(0, 0, sock.fd())?;

    let dst = MacAddr::parse_unicast(&cli.tx_dst).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut frame = vec![0u8; cli.tx_len.max(60)];
    frame[0..6].copy_from_slice(&dst.0);
    frame[6..12].copy_from_slice(&cli.mac.0);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());

    let (mut rx, mut tx) = (0u64, 0u64);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(cli.seconds);
    while Instant::now() < end {
        for _ in 0..64 {
            sock.poll_rx(64);
            rx += sock.discard_rx_backlog() as u64;
            if cli.tx_len > 0 {
                let mut staged = 0;
                while staged < 64 {
                    let Some(buf) = sock.next_buffer() else { break };
                    buf[..frame.len()].copy_from_slice(&frame);
                    let _ = sock.submit(frame.len());
                    staged += 1;
                }
                sock.flush_tx();
                tx += u64::from(sock.reap_completions());
            }
        }
    }
    println!(
        "rx={rx} tx={tx} seconds={:.3}",
        start.elapsed().as_secs_f64()
    );
    steering.detach();
    Ok(())
}
