//! The daemon's own L2 switch: what a guest may send, and frames between two ports of the
//! same daemon, which never touch the NIC.
//!
//! Frames from the NIC reach a port through XDP steering (unicast) or the packet tap
//! (broadcast and multicast). Frames a guest sends are classified, per frame, from their
//! Ethernet header, before they are copied out of the guest ([`PortTx`], the transmit sink
//! the datapath fills):
//! - a source MAC the port may not use, or a frame over the port's rate limit: dropped and
//!   counted ([`policy`]);
//! - unicast to another port's MAC: read into the batch's arena and written into that port's
//!   receive queue at the end of the batch; it takes no NIC buffer, so traffic between
//!   guests never competes with the wire for the UMEM;
//! - broadcast and multicast: copied into a NIC buffer, sent, and written into every other
//!   port from that buffer ([`deliver`]);
//! - anything else: copied into a NIC buffer and sent.
//!
//! Deliveries into another port run on the sender's worker thread, under the receiver's rx
//! vring lock ([`RxQueue`]); that lock is always taken last and held for one batch, so it
//! cannot deadlock with the receiver's own worker.

pub mod deliver;
pub mod policy;
mod port_tx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::datapath::rx::{Framing, RxScratch};
use crate::mac::MacAddr;
use crate::sync;
use crate::vring::RxQueue;

pub use deliver::{deliver_local, notify_ports, LocalFrame};
pub use policy::{classify, classify_with, Member, RateLimit, TxPolicy, TxVerdict};
pub use port_tx::{PortTx, SwitchScratch};

/// A port as the switch knows it.
pub struct SwitchPort {
    pub mac: MacAddr,
    /// The port's VLAN: it switches only with ports on the same one (or both untagged).
    pub vlan: Option<u16>,
    pub index: u32,
    /// The port's first receive queue while a frontend is connected.
    rx: Mutex<Option<RxQueue>>,
    /// A migration target's switch-over (its MAC's steering entry and switch table slot
    /// moving here), run once when its guest starts its rings.
    takeover: Mutex<Option<Takeover>>,
    takeover_pending: AtomicBool,
}

/// What moves a migrated guest's MAC to its new port.
pub type Takeover = Box<dyn FnOnce() + Send>;

impl Member for Arc<SwitchPort> {
    fn vlan(&self) -> Option<u16> {
        self.vlan
    }
}

impl SwitchPort {
    pub fn new(mac: MacAddr, vlan: Option<u16>, index: u32) -> Arc<Self> {
        Arc::new(SwitchPort {
            mac,
            vlan,
            index,
            rx: Mutex::new(None),
            takeover: Mutex::new(None),
            takeover_pending: AtomicBool::new(false),
        })
    }

    /// Makes the port's receive queue reachable (a frontend connected and its worker runs).
    pub fn publish(&self, rx: RxQueue) {
        *sync::lock(&self.rx) = Some(rx);
    }

    /// Makes this port a migration target: `takeover` runs when its guest starts.
    pub fn set_takeover(&self, takeover: Takeover) {
        *sync::lock(&self.takeover) = Some(takeover);
        self.takeover_pending.store(true, Ordering::Release);
    }

    /// A migration target takes its MAC's frames once `guest_started` says its guest runs
    /// (asked only while the switch-over is pending: one atomic load for every other port).
    pub fn take_over_when(&self, guest_started: impl FnOnce() -> bool) {
        if self.takeover_pending.load(Ordering::Acquire)
            && guest_started()
            && self.takeover_pending.swap(false, Ordering::AcqRel)
        {
            if let Some(takeover) = sync::lock(&self.takeover).take() {
                takeover();
            }
        }
    }

    /// The frontend went away; frames for the port are dropped until the next one.
    pub fn unpublish(&self) {
        sync::lock(&self.rx).take();
    }

    /// Writes frames from the NIC into the port's first receive queue, for a queue pair the
    /// guest has disabled (VQ_PAIRS_SET) whose NIC queues still carry traffic. Returns how
    /// many frames were taken (all of them: what does not fit is dropped and counted), or
    /// `None` when no frontend is connected.
    pub fn deliver_from_nic(
        &self,
        frames: &mut dyn Iterator<Item = &[u8]>,
        scratch: &mut RxScratch,
    ) -> Option<usize> {
        let mut offered = 0;
        self.with_rx_queue(|rx| {
            rx.deliver(
                frames.inspect(|_| offered += 1),
                Framing::Bare,
                scratch,
                false,
                true,
            )
        })?;
        Some(offered)
    }

    /// Runs `f` on the port's first receive queue if a frontend is connected (`None` if
    /// not). The port's slot stays locked meanwhile, so a frontend that disconnects is
    /// unpublished only after the delivery.
    pub fn with_rx_queue<R>(&self, f: impl FnOnce(&RxQueue) -> R) -> Option<R> {
        sync::lock(&self.rx).as_ref().map(f)
    }
}

/// A hasher for MAC keys: every transmitted frame is looked up, and SipHash's DoS resistance
/// buys nothing here (the table holds the operator's ports, not guest-chosen keys).
#[derive(Default, Clone, Copy)]
pub struct MacHasher(u64);

impl std::hash::Hasher for MacHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, v: u64) {
        // One multiply-xorshift round (MacAddr hashes as one word).
        self.0 = (self.0 ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
}

pub type MacMap<V> = HashMap<MacAddr, V, std::hash::BuildHasherDefault<MacHasher>>;

/// MAC -> port, for every port of the daemon. Readers take a snapshot once per batch.
#[derive(Default)]
pub struct SwitchTable {
    ports: RwLock<Arc<MacMap<Arc<SwitchPort>>>>,
}

impl SwitchTable {
    pub fn snapshot(&self) -> Arc<MacMap<Arc<SwitchPort>>> {
        sync::read(&self.ports).clone()
    }

    pub fn insert(&self, port: Arc<SwitchPort>) {
        let mut guard = sync::write(&self.ports);
        let mut map = HashMap::clone(&guard);
        map.insert(port.mac, port);
        *guard = Arc::new(map);
    }

    /// Takes `port` out of the table, if the table's entry for its MAC is still `port` (a
    /// migration target that took the MAC over keeps it), and drops its receive queue.
    pub fn remove(&self, port: &SwitchPort) {
        let mut guard = sync::write(&self.ports);
        if guard.get(&port.mac).is_some_and(|p| p.index == port.index) {
            let mut map = HashMap::clone(&guard);
            map.remove(&port.mac);
            *guard = Arc::new(map);
        }
        port.unpublish();
    }
}
