//! A short guest-tcp benchmark run: real guests move TCP up, down and VM-to-VM on xvdpa, and up
//! on QEMU's virtio-net over a bridged tap (the reference needs to work, not every direction:
//! one guest instead of two keeps the test near a minute), and every figure the benchmark
//! reports is there. No rate is asserted (speed is reported by `cargo xtask bench --scenarios guest-tcp`). Needs
//! root, QEMU and the guest image with `tcpperf` (`cargo xtask test` builds it).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use xvdpa_tests::bench_tcp::{
    measure_tcp, tcpperf_binary, Pinning, TcpDirection, TcpPeer, TcpSetup,
};
use xvdpa_tests::lab::Lab;

#[test]
fn guest_tcp_streams_flow_on_xvdpa_and_tap() -> Result<()> {
    let started = Instant::now();
    let lab = Lab::unique("gtcp")?;
    // The benchmark's default pinning: datapath on CPU 1, guests' vCPUs and the wire on 0.
    let pinning = Pinning {
        datapath: 1,
        load: 0,
    };
    let setup = TcpSetup {
        tcpperf: tcpperf_binary(),
        duration: Duration::from_millis(700),
        warmup: Duration::from_millis(300),
        daemon_args: vec![],
        port_settings: String::new(),
        pinning,
    };
    for (peer, directions) in [
        (TcpPeer::Xvdpa, &TcpDirection::ALL[..]),
        (TcpPeer::Tap, &[TcpDirection::Up][..]),
    ] {
        let ms = measure_tcp(&lab, peer, directions, &setup)?;
        ensure!(
            ms.len() == directions.len(),
            "{}: {} directions measured",
            peer.name(),
            ms.len()
        );
        for m in ms {
            eprintln!(
                "[guest-tcp-smoke] {} {}: {} bytes in {:.2} s, {:.2} Gbit/s, datapath {:.3} CPU s",
                peer.name(),
                m.direction.name(),
                m.bytes,
                m.seconds,
                m.gbit_s,
                m.datapath_cpu_s
            );
            ensure!(
                m.bytes > 0 && m.datapath_cpu_s >= 0.0 && m.vcpu_cpu_s > 0.0,
                "{} {}: {m:?}",
                peer.name(),
                m.direction.name()
            );
        }
    }
    eprintln!(
        "[guest-tcp-smoke] {:.1} s wall",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
