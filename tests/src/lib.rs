//! Test support for xvdpa, shared by the integration tests, `cargo xtask` and the benchmark:
//!
//! - [`lab`]: network namespaces and a veth pair standing in for a NIC and its wire;
//! - [`wire`]: raw frames on the wire side;
//! - [`daemon`]: the real `xvdpa` binary, started and stopped like an operator would;
//! - [`frontend`]: a vhost-user frontend (a VMM in a process) with memfd guest memory and its
//!   own split-queue driver;
//! - [`guest`]: a real Linux guest under QEMU;
//! - [`libvirt`]: libvirtd and `virsh` driving a guest as operators run one;
//! - [`systemd`]: a live systemd (the host's root booted as a throw-away container) for the
//!   packaged unit;
//! - [`bench`], [`bench_run`], [`bench_tcp`]: the benchmark's generator, packet scenarios and
//!   guest TCP streams;
//! - [`frames`]: Ethernet, ARP and IPv4 frames to send and check;
//! - [`sockopts`]: another process's AF_XDP socket options;
//! - [`proc_figures`]: a process's open fds, threads, memory and CPU time, from /proc;
//! - [`soak`]: connect/reset/disconnect cycles on one port while another streams;
//! - [`raw_vhost`]: a vhost-user frontend that sends whatever it is told, for attack tests;
//! - [`dashboard`]: the Grafana dashboard in docs/ checked against the metrics served.

pub mod bench;
pub mod bench_run;
pub mod bench_tcp;
pub mod ctl;
pub mod daemon;
pub mod dashboard;
pub mod dpdk;
pub mod frames;
pub mod frontend;
pub mod guest;
pub mod lab;
pub mod libvirt;
pub mod migration;
pub mod netns;
pub mod output;
pub mod proc_figures;
pub mod raw_vhost;
pub mod soak;
pub mod sockopts;
pub mod systemd;
pub mod wire;

use std::path::PathBuf;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}
