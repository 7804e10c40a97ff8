//! DPDK's `dpdk-testpmd`: an independent vhost-user frontend (virtio-user PMD) to check
//! interoperability, and the peer datapath (vhost PMD + AF_XDP PMD) the benchmark measures
//! against. Flags that work on these machines: no hugepages, no PCI, a unique file prefix.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// `dpdk-testpmd` EAL arguments common to every use here, with memory for `mbufs` buffers.
pub fn eal_args(prefix: &str, lcores: &str) -> Vec<String> {
    [
        "--no-huge",
        "-m",
        "1024",
        "--no-pci",
        "--single-file-segments",
        "--file-prefix",
        prefix,
        "--lcores",
        lcores,
        "--log-level",
        "user1,info",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts testpmd as a virtio-user frontend on `socket` answering ARP and ICMP echo
/// (`icmpecho` forwarding) as a guest with `mac` would.
pub fn icmpecho_frontend(socket: &str, mac: &str, prefix: &str) -> Result<Child> {
    let mut cmd = Command::new("dpdk-testpmd");
    cmd.args(eal_args(prefix, "0@0,1@0"))
        .arg("--vdev")
        .arg(format!("net_virtio_user0,path={socket},mac={mac}"))
        // With --stats-period testpmd runs until killed instead of waiting for Enter on stdin.
        .args([
            "--",
            "--forward-mode=icmpecho",
            "--auto-start",
            "--total-num-mbufs=8192",
            "--nb-cores=1",
            "--stats-period=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.spawn()
        .context("starting dpdk-testpmd (installed by `cargo xtask test`)")
}
