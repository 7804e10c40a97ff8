//! The NIC side of the datapath, shared by every port of the daemon: one UMEM and AF_XDP
//! binding per NIC receive queue ([`xsk`]), the XDP program that steers each frame to its
//! port's sockets by destination MAC ([`steering`]), the AF_PACKET copy of broadcast and
//! multicast frames for the guests ([`packet_tap`]), and the 802.1Q tag work a tagged port's
//! frames need on their way in and out ([`vlan`]).

pub mod napi;
pub mod packet_tap;
pub mod steering;
pub mod vlan;
pub mod xsk;

use std::sync::{Arc, Mutex};

use napi::NapiTakeover;
use steering::Steering;
use xsk::NicQueue;

/// The NIC every port of the daemon serves its guest on.
pub struct Nic {
    pub iface: String,
    pub ifindex: u32,
    /// One UMEM and binding per NIC receive queue, shared by every port's socket on it.
    pub queues: Vec<Arc<NicQueue>>,
    /// Mbit/s for the config space.
    pub speed: u32,
    pub mtu: u16,
    pub busy_poll: bool,
    /// Spin while frames come, sleep after a short idle, and let the worker's busy polling
    /// take the NIC queues' receive work over (see `worker`); off with `--no-adaptive-poll`.
    pub adaptive_poll: bool,
    /// The NAPI knobs set on the queues served, put back at exit; None when polling is off.
    pub napi: Option<Arc<NapiTakeover>>,
    pub steering: Mutex<Steering>,
}
