//! xvdpa: a software vDPA datapath.
//!
//! A vhost-user-net backend whose guest queues are fed by AF_XDP sockets, with an XDP program
//! on the NIC steering each VM's frames to them by destination MAC.
//!
//! - [`device`]: the virtio-net device model (features, config space, net header);
//! - [`datapath`]: the per-packet copy functions over guest memory and virtqueues;
//! - [`xsk`], [`packet_tap`], [`steering`]: the NIC side (AF_XDP, multicast copies, XDP);
//! - [`switch`]: what a guest may send, and frames between two ports of the daemon;
//! - [`worker`], [`backend`], [`port`]: vhost-user serving;
//! - [`daemon`]: the port registry of the running daemon;
//! - [`runtime`], [`config`], [`api`], [`control`], [`metrics`]: the process around it all
//!   (start-up, environment checks, signals), its configuration, its control socket's
//!   requests and replies and the socket itself, and its Prometheus endpoint.
//!
//! Imports run one way at this edge: `runtime` uses `control` and `metrics`, which use
//! `daemon` and `api`; `daemon` uses neither.

pub mod api;
pub mod backend;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod device;
pub mod mac;
pub mod metrics;
pub mod packet_tap;
pub mod port;
pub mod protocol_shim;
pub mod runtime;
pub mod stats;
pub mod steering;
pub mod switch;
pub mod sync;
pub mod worker;
pub mod xsk;
