//! Holds a tx (or rx) load on a daemon for profiling: `cargo run --release -p xvdpa-tests
//! --example tx_load -- <seconds> [rx]` with XVDPA_BIN pointing at the daemon; prints the daemon's pid.
use std::time::Duration;
use xvdpa_tests::bench_run::{measure, Direction, FrameSpec, GeneratorKind, Peer, Pinning, Setup};
use xvdpa_tests::lab::Lab;

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let dir = if std::env::args().nth(2).as_deref() == Some("rx") {
        Direction::Rx
    } else {
        Direction::Tx
    };
    let lab = Lab::unique("prof")?;
    let setup = Setup {
        duration: Duration::from_secs_f64(secs),
        warmup: Duration::from_millis(500),
        pinning: Pinning {
            datapath: 1,
            load: 0,
        },
        flows: 4,
        daemon_args: std::env::var("XVDPA_ARGS")
            .map(|a| a.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
        generator: GeneratorKind::Auto,
        frame: FrameSpec::default(),
    };
    let peer = if std::env::var("PEER").as_deref() == Ok("dpdk") {
        Peer::Dpdk
    } else {
        Peer::Xvdpa
    };
    let m = measure(&lab, peer, dir, 64, &setup)?;
    println!("{:.0} pps, {:.2} CPU s/Mpkt", m.pps, m.cpu_s_per_mpkt);
    Ok(())
}
