//! An independent vhost-user frontend, DPDK's virtio-user PMD in `dpdk-testpmd`, drives the
//! daemon: its negotiation order and ring handling are not ours, yet ARP and ping from the wire
//! must work through it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::dpdk;
use xvdpa_tests::lab::{guest_ip, guest_mac, mac_str, Lab};

#[test]
fn dpdk_virtio_user_answers_ping_from_the_wire() -> Result<()> {
    let lab = Lab::unique("dpdk")?;
    let dir = socket_dir("dpdk")?;
    let socket = dir.join("vm0.sock");
    let mut daemon = Daemon::start(&lab, &socket, &mac_str(guest_mac(0)), &[])?;
    let prefix = format!("xvt-dpdk-{}", std::process::id());
    let mut testpmd =
        dpdk::icmpecho_frontend(socket.to_str().unwrap(), &mac_str(guest_mac(0)), &prefix)?;
    let result = (|| {
        daemon.wait_for_log("frontend connected", Duration::from_secs(30))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = lab
                .in_wire("busybox")
                .args(["ping", "-c", "3", "-W", "2", &guest_ip(0)])
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no echo from testpmd: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
    })();
    let _ = testpmd.kill();
    let _ = testpmd.wait();
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
    result?;
    daemon.wait_for_log("waiting for the next", Duration::from_secs(10))?;
    daemon.stop()?;
    Ok(())
}
