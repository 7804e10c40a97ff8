//! A few seconds of every benchmark scenario for every peer: packets must flow end to end in
//! each (and for dirty-log, the daemon must log its writes). No rate is asserted (speed is
//! reported by `cargo xtask bench`, not tested).

use std::time::Duration;

use anyhow::{ensure, Result};
use xvdpa_tests::bench_run::{measure, Direction, FrameSpec, GeneratorKind, Peer, Pinning, Setup};
use xvdpa_tests::lab::Lab;

#[test]
fn every_scenario_moves_packets_for_every_peer() -> Result<()> {
    let lab = Lab::unique("bench")?;
    let setup = Setup {
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(300),
        pinning: Pinning {
            datapath: 1,
            load: 0,
        },
        flows: 4,
        daemon_args: vec![],
        generator: GeneratorKind::Auto,
        frame: FrameSpec::default(),
    };
    // dirty-log fails its run unless the daemon marked pages in the guest sides' logs.
    for peer in [
        Peer::Xvdpa,
        Peer::SingleCopy,
        Peer::SingleCopyInPlace,
        Peer::DirtyLog,
        Peer::Dpdk,
        Peer::Limit,
    ] {
        for direction in [Direction::Rx, Direction::Tx, Direction::VmToVm] {
            if !peer.has_vm_to_vm() && direction == Direction::VmToVm {
                continue; // no NIC in vm-to-vm (and a single-copy port has the NIC alone)
            }
            let m = measure(&lab, peer, direction, 64, &setup)?;
            eprintln!(
                "[bench-smoke] {} {} 64B: {} frames, {:.0} pps",
                peer.name(),
                direction.name(),
                m.frames,
                m.pps
            );
            ensure!(
                m.frames > 0,
                "{} {}: no frames moved",
                peer.name(),
                direction.name()
            );
        }
    }
    Ok(())
}
