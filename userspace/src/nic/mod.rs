//! The NIC side of the datapath, shared by every port of the daemon: one UMEM and AF_XDP
//! binding per NIC receive queue ([`xsk`]), the XDP program that steers each frame to its
//! port's sockets by destination MAC ([`steering`]), the AF_PACKET copy of broadcast and
//! multicast frames for the guests ([`packet_tap`]), the AF_PACKET socket that hands the
//! kernel a guest's TSO frames whole ([`kernel_gso`]), and the 802.1Q tag work a tagged port's
//! frames need on their way in and out ([`vlan`]).

pub mod kernel_gso;
pub mod napi;
mod packet_socket;
pub mod packet_tap;
pub mod steering;
pub mod vlan;
pub mod xsk;

use std::sync::{Arc, Mutex};

use napi::NapiTakeover;
use steering::Steering;
use xsk::{NicQueue, XskError, XskGeometry, XskModeChoice};

/// The NIC every port of the daemon serves its guest on.
pub struct Nic {
    pub iface: String,
    pub ifindex: u32,
    /// One UMEM and binding per NIC receive queue, shared by every port's socket on it.
    /// Empty on a NIC dedicated to a guest-memory port (see `dedicated`).
    pub queues: Vec<Arc<NicQueue>>,
    /// The NIC's queues are left unbound for the one port that asked for its guest's
    /// memory as their UMEM (`guest-umem=on`): a NIC queue takes one UMEM, so no other
    /// port can share them.
    pub dedicated: bool,
    /// Receive queues of the NIC, and how a queue's shared UMEM is made: what a dedicated
    /// NIC's port opens when its guest's memory cannot be the UMEM.
    pub rx_queues: u32,
    pub geometry: XskGeometry,
    pub xsk_mode: XskModeChoice,
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

impl Nic {
    /// Binds an ordinary shared UMEM to every queue of the NIC: the copy path's queues, made
    /// at start-up for the daemon's life, or for one connection of a dedicated NIC's port.
    pub fn open_queues(
        iface: &str,
        ifindex: u32,
        rx_queues: u32,
        geometry: XskGeometry,
        xsk_mode: XskModeChoice,
    ) -> Result<Vec<Arc<NicQueue>>, XskError> {
        (0..rx_queues)
            .map(|q| NicQueue::open(iface, ifindex, q, geometry, xsk_mode))
            .collect()
    }

    /// The copy path's NIC queues for a connection: the daemon's shared ones, or on a
    /// dedicated NIC queues bound now for this connection alone (they are released with its
    /// sockets, so the next connection finds the queues free again). Their UMEMs are the
    /// daemon's own, locked under CAP_IPC_LOCK as a shared NIC's are at start-up (kept on
    /// demand after `--user` under a finite memlock limit): a guest whose memory that limit
    /// refused must still get its frames.
    pub fn copy_path_queues(&self) -> Result<Vec<Arc<NicQueue>>, XskError> {
        if self.dedicated {
            crate::privilege::with_capability(crate::privilege::CAP_IPC_LOCK, || {
                Self::open_queues(
                    &self.iface,
                    self.ifindex,
                    self.rx_queues,
                    self.geometry,
                    self.xsk_mode,
                )
            })
        } else {
            Ok(self.queues.clone())
        }
    }
}
