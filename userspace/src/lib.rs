//! xvdpa: a software vDPA datapath.
//!
//! A vhost-user-net backend whose guest queues are fed by AF_XDP sockets, with an XDP program
//! on the NIC steering each VM's frames to them by destination MAC. `docs/architecture.md`
//! is the map; the modules, from the process edge down to the per-packet path (each imports
//! only what is below it):
//!
//! - [`runtime`]: start-up, environment checks, signals and shutdown;
//! - [`control`], [`metrics`]: the control socket and the Prometheus endpoint;
//!   [`stats_table`]: the same counters as `xvdpa stats` prints them;
//! - [`daemon`]: the port registry of the running daemon;
//! - [`config`], [`api`]: the configuration, and the control socket's requests and replies
//!   with [`api::PortSpec`], the one description of a port;
//! - [`vhost`]: one VM port: its vhost-user socket, the backend, the protocol shim;
//! - [`worker`]: one queue pair's event loop, moving frames both ways;
//! - [`switch`]: what a guest may send, and frames between two ports of the daemon;
//! - [`nic`]: the NIC side: AF_XDP sockets and UMEM, XDP steering, the multicast tap;
//! - [`vring`]: a guest virtqueue as several threads share it (delivery, notification);
//! - [`datapath`]: the device model and the per-packet copy functions over guest memory and
//!   virtqueues, with no kernel, thread or socket in sight;
//! - [`mac`], [`stats`], [`sync`]: small vocabulary every layer uses;
//! - [`privilege`]: users, groups and capabilities (`--user`, socket groups);
//! - [`service_notify`]: telling systemd the daemon is ready (`Type=notify`);
//! - [`memory_guard`]: the SIGBUS guard over guest memory a frontend shrinks, which the
//!   backend registers memory with and every layer that reads a ring can consult.

pub mod api;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod mac;
pub mod memory_guard;
pub mod metrics;
pub mod nic;
pub mod privilege;
pub mod runtime;
pub mod service_notify;
pub mod stats;
pub mod stats_table;
pub mod switch;
pub mod sync;
pub mod vhost;
pub mod vring;
pub mod worker;
