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
//! A port with the NIC to itself (`guest-umem=on`) has no peer: its sink
//! ([`DedicatedNicTx`]) applies the same policy and sends everything it lets through to the
//! wire, from the daemon's area of the guest-memory UMEM.
//!
//! Deliveries into another port run on the sender's worker thread, under the receiver's rx
//! vring lock ([`RxQueue`]); that lock is always taken last and held for one batch, so it
//! cannot deadlock with the receiver's own worker.

pub mod announce;
mod dedicated_tx;
pub mod deliver;
pub mod policy;
mod port_tx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::datapath::rx::{Framing, RxScratch};
use crate::mac::MacAddr;
use crate::sync;
use crate::vring::RxQueue;

pub use announce::{rarp_frame, AnnounceRequests};
pub use dedicated_tx::DedicatedNicTx;
pub use deliver::{deliver_local, notify_ports, LocalFrame};
pub use policy::{classify, classify_with, Member, RateLimit, TxPolicy, TxVerdict};
pub use port_tx::{OwnFrameDrop, PortTx, SwitchScratch};

/// A port as the switch knows it.
pub struct SwitchPort {
    pub mac: MacAddr,
    /// The port's VLAN: it switches only with ports on the same one (or both untagged).
    pub vlan: Option<u16>,
    pub index: u32,
    /// The port's first receive queue while a frontend is connected.
    rx: Mutex<Option<RxQueue>>,
    /// A migration target's switch-over (its MAC's steering entry and switch table slot
    /// moving here), run once when its guest starts its rings or its frontend announces it.
    takeover: Mutex<Option<Takeover>>,
    /// [`NOT_TARGET`], [`TARGET`] or [`TARGET_AFTER_STOP`].
    takeover_state: AtomicU8,
    /// The port was removed: it takes no MAC over any more.
    retired: AtomicBool,
}

/// What moves a migrated guest's MAC to its new port.
pub type Takeover = Box<dyn FnOnce() + Send>;

/// No switch-over waits on the port.
const NOT_TARGET: u8 = 0;
/// The switch-over runs when the port's guest runs.
const TARGET: u8 = 1;
/// The port's guest migrated away: the switch-over back runs only for a guest started after
/// that one stopped (its rings seen stopped, or a new frontend), never for the guest that
/// left, whose rings a frontend may not have stopped.
const TARGET_AFTER_STOP: u8 = 2;

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
            takeover_state: AtomicU8::new(NOT_TARGET),
            retired: AtomicBool::new(false),
        })
    }

    /// Makes the port's receive queue reachable (a frontend connected and its worker runs).
    pub fn publish(&self, rx: RxQueue) {
        *sync::lock(&self.rx) = Some(rx);
    }

    /// Makes this port a migration target: `takeover` runs when its guest starts. A removed
    /// port stays without one.
    pub fn set_takeover(&self, takeover: Takeover) {
        self.arm(takeover, TARGET);
    }

    /// Makes the port a guest just left the target of its migration back: `takeover` runs
    /// when a guest starts here after the one that left stopped.
    pub fn set_takeover_back(&self, takeover: Takeover) {
        self.arm(takeover, TARGET_AFTER_STOP);
    }

    fn arm(&self, takeover: Takeover, state: u8) {
        let mut slot = sync::lock(&self.takeover);
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        *slot = Some(takeover);
        self.takeover_state.store(state, Ordering::Release);
    }

    /// A migration target takes its MAC's frames once `guest_started` says its guest runs
    /// (asked only while the switch-over is pending: one atomic load for every other port).
    pub fn take_over_when(&self, guest_started: impl FnOnce() -> bool) {
        match self.takeover_state.load(Ordering::Acquire) {
            NOT_TARGET => {}
            TARGET_AFTER_STOP => {
                if !guest_started() {
                    self.advance_after_stop();
                }
            }
            _ => {
                if guest_started() {
                    self.run_takeover();
                }
            }
        }
    }

    /// A migration target takes its MAC's frames now (its frontend announced the migrated
    /// guest); nothing happens for a port that is not one, nor for the port a guest left
    /// while the guest that left may still be the one announcing.
    pub fn take_over(&self) {
        if self.takeover_state.load(Ordering::Acquire) == TARGET {
            self.run_takeover();
        }
    }

    fn run_takeover(&self) {
        let armed = self.takeover_state.compare_exchange(
            TARGET,
            NOT_TARGET,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if armed.is_err() {
            return;
        }
        // Taken out first: the switch-over makes the other port a target (`arm` on that
        // port), and it runs holding no lock.
        let takeover = sync::lock(&self.takeover).take();
        if let Some(takeover) = takeover {
            takeover();
        }
    }

    /// The guest that left has stopped here: the next one to start takes the MAC back.
    fn advance_after_stop(&self) {
        let _ = self.takeover_state.compare_exchange(
            TARGET_AFTER_STOP,
            TARGET,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The port was removed: a pending switch-over is dropped, and none is accepted later.
    fn retire(&self) {
        let mut slot = sync::lock(&self.takeover);
        self.retired.store(true, Ordering::Release);
        self.takeover_state.store(NOT_TARGET, Ordering::Release);
        slot.take();
    }

    /// The frontend went away; frames for the port are dropped until the next one (whose
    /// guest may take the MAC back, if this port's guest migrated away).
    pub fn unpublish(&self) {
        sync::lock(&self.rx).take();
        self.advance_after_stop();
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
        port.retire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn counting(runs: &Arc<AtomicU32>) -> Takeover {
        let runs = runs.clone();
        Box::new(move || {
            runs.fetch_add(1, Ordering::Relaxed);
        })
    }

    #[test]
    fn a_target_switches_over_once_when_its_guest_starts_or_is_announced() {
        let port = SwitchPort::new(MacAddr([2, 0, 0, 0, 0, 1]), None, 1);
        let runs = Arc::new(AtomicU32::new(0));
        port.take_over();
        port.set_takeover(counting(&runs));
        port.take_over_when(|| false);
        assert_eq!(runs.load(Ordering::Relaxed), 0);
        port.take_over_when(|| true);
        port.take_over_when(|| true);
        port.take_over();
        assert_eq!(runs.load(Ordering::Relaxed), 1);
        port.set_takeover(counting(&runs));
        port.take_over();
        assert_eq!(
            runs.load(Ordering::Relaxed),
            2,
            "announced before its rings start"
        );
    }

    #[test]
    fn the_port_a_guest_left_takes_it_back_only_from_a_guest_started_later() {
        let port = SwitchPort::new(MacAddr([2, 0, 0, 0, 0, 1]), None, 1);
        let runs = Arc::new(AtomicU32::new(0));
        // The guest that left still has its rings running, or its QEMU announces it: nothing
        // moves.
        port.set_takeover_back(counting(&runs));
        port.take_over_when(|| true);
        port.take_over();
        assert_eq!(runs.load(Ordering::Relaxed), 0);
        // Its rings stopped (QEMU stops them before the migration's last stage) ...
        port.take_over_when(|| false);
        port.take_over_when(|| false);
        assert_eq!(runs.load(Ordering::Relaxed), 0);
        // ... so the next guest to start here takes the MAC back.
        port.take_over_when(|| true);
        assert_eq!(runs.load(Ordering::Relaxed), 1);
        // The frontend that left went away: the next one's guest takes it back.
        port.set_takeover_back(counting(&runs));
        port.unpublish();
        port.take_over_when(|| true);
        assert_eq!(runs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_removed_port_takes_nothing_over() {
        let table = SwitchTable::default();
        let port = SwitchPort::new(MacAddr([2, 0, 0, 0, 0, 1]), None, 1);
        let runs = Arc::new(AtomicU32::new(0));
        port.set_takeover(counting(&runs));
        table.remove(&port);
        port.take_over();
        port.set_takeover(counting(&runs));
        port.take_over_when(|| true);
        assert_eq!(runs.load(Ordering::Relaxed), 0);
    }
}
