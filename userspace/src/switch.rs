//! The daemon's own L2 switch: what a guest may send, and frames between two ports of the
//! same daemon, which never touch the NIC.
//!
//! Frames from the NIC reach a port through XDP steering (unicast) or the packet tap
//! (broadcast and multicast). Frames a guest sends are classified here, per frame, from their
//! Ethernet header, before they are copied out of the guest ([`PortTx::route`]):
//! - a source MAC the port may not use, or a frame over the port's rate limit: dropped and
//!   counted;
//! - unicast to another port's MAC: read into the batch's arena and written into that port's
//!   receive queue at the end of the batch; it takes no NIC buffer, so traffic between
//!   guests never competes with the wire for the UMEM;
//! - broadcast and multicast: copied into a NIC buffer, sent, and written into every other
//!   port from that buffer;
//! - anything else: copied into a NIC buffer and sent.
//!
//! Deliveries into another port run on the sender's worker thread, under the receiver's rx
//! vring lock; that lock is always taken last and held for one batch, so it cannot deadlock
//! with the receiver's own worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use vhost_user_backend::{VringState, VringT};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::datapath::rx::{self, RxScratch};
use crate::datapath::tx::{DirectFrame, Route, TxBuffers, TxDrop};
use crate::device::{NegotiatedFeatures, ETH_HLEN};
use crate::mac::MacAddr;
use crate::stats::QueueStats;
use crate::worker::Vring;
use crate::xsk::{HeldFrame, XskSocket};

/// A connected port's receive queue, as other ports' workers reach it.
pub struct RxTarget {
    pub vring: Vring,
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pub acked: Arc<AtomicU64>,
    pub stats: Arc<QueueStats>,
    /// Shared with the port's own worker.
    pub shared: Arc<RxQueueShared>,
}

/// What every thread writing into one receive queue (its port's worker, and other ports'
/// workers switching frames into it) shares. Only used under the queue's vring lock.
pub struct RxQueueShared {
    /// The guest broke the ring's rules: the queue is stopped until the device is reset.
    broken: AtomicBool,
    /// The used index when a notification was last decided, or [`NEVER_SIGNALLED`]: with
    /// EVENT_IDX the next decision covers every entry published since (as DPDK's vhost and
    /// Linux's vhost do), so batches published by different threads are not missed.
    signalled: AtomicU32,
}

/// No notification was decided since the ring (re)started: the next one is sent.
const NEVER_SIGNALLED: u32 = u32::MAX;

impl Default for RxQueueShared {
    fn default() -> Self {
        RxQueueShared {
            broken: AtomicBool::new(false),
            signalled: AtomicU32::new(NEVER_SIGNALLED),
        }
    }
}

impl RxQueueShared {
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// The ring stopped (GET_VRING_BASE or a device reset); it restarts from a fresh ring.
    pub fn reset(&self) {
        self.broken.store(false, Ordering::Release);
        self.signalled.store(NEVER_SIGNALLED, Ordering::Release);
    }

    /// Notifies the guest behind `state` if it asked to be for the used entries published
    /// since the last decision (by any thread). Call under the vring lock.
    pub fn notify_guest(
        &self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
        mem: &GuestMemoryMmap,
        stats: &QueueStats,
    ) {
        let new = state.get_queue().next_used();
        let old = self.signalled.swap(u32::from(new), Ordering::AcqRel);
        if old == u32::from(new) {
            return;
        }
        // The first decision after a (re)start has no range to check: with EVENT_IDX it
        // notifies, as DPDK's vhost does; without, only NO_INTERRUPT counts anyway.
        notify_guest_since(state, mem, stats, u16::try_from(old).ok());
    }
}

/// A port as the switch knows it.
pub struct SwitchPort {
    pub mac: MacAddr,
    /// The port's VLAN: it switches only with ports on the same one (or both untagged).
    pub vlan: Option<u16>,
    pub index: u32,
    target: Mutex<Option<RxTarget>>,
}

/// What the classifier needs to know of a port.
pub trait Member {
    fn vlan(&self) -> Option<u16>;
}

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
            target: Mutex::new(None),
        })
    }

    /// Makes the port's receive queue reachable (a frontend connected and its worker runs).
    pub fn publish(&self, target: RxTarget) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(target);
    }

    /// The frontend went away; frames for the port are dropped until the next one.
    pub fn unpublish(&self) {
        self.target.lock().unwrap_or_else(|p| p.into_inner()).take();
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
        let target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        let t = target.as_ref()?;
        let mut offered = 0;
        deliver_into(
            t,
            frames.inspect(|_| offered += 1),
            rx::Framing::Bare,
            scratch,
            false,
            true,
        );
        Some(offered)
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
        self.ports.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn insert(&self, port: Arc<SwitchPort>) {
        let mut guard = self.ports.write().unwrap_or_else(|p| p.into_inner());
        let mut map = HashMap::clone(&guard);
        map.insert(port.mac, port);
        *guard = Arc::new(map);
    }

    pub fn remove(&self, mac: MacAddr) {
        let mut guard = self.ports.write().unwrap_or_else(|p| p.into_inner());
        let mut map = HashMap::clone(&guard);
        if let Some(p) = map.remove(&mac) {
            p.unpublish();
        }
        *guard = Arc::new(map);
    }
}

/// A token bucket over packets and bits per second (a policer: frames over it are dropped).
#[derive(Debug, Clone)]
pub struct RateLimit {
    pps: Option<f64>,
    bps: Option<f64>,
    packets: f64,
    bits: f64,
    last: Option<Instant>,
}

/// How much a bucket holds: this much time at the configured rate, or one full frame.
const BURST_SECONDS: f64 = 0.005;
const MIN_BURST_BITS: f64 = 9216.0 * 8.0;

impl RateLimit {
    pub fn new(pps: Option<u64>, bps: Option<u64>) -> Option<Self> {
        if pps.is_none() && bps.is_none() {
            return None;
        }
        let mut r = RateLimit {
            pps: pps.map(|v| v as f64),
            bps: bps.map(|v| v as f64),
            packets: 0.0,
            bits: 0.0,
            last: None,
        };
        r.packets = r.packet_burst();
        r.bits = r.bit_burst();
        Some(r)
    }

    fn packet_burst(&self) -> f64 {
        self.pps
            .map(|r| (r * BURST_SECONDS).max(1.0))
            .unwrap_or(0.0)
    }

    fn bit_burst(&self) -> f64 {
        self.bps
            .map(|r| (r * BURST_SECONDS).max(MIN_BURST_BITS))
            .unwrap_or(0.0)
    }

    /// Adds the tokens earned since the last refill; called once per batch.
    pub fn refill(&mut self, now: Instant) {
        let elapsed = self
            .last
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        self.last = Some(now);
        if let Some(r) = self.pps {
            self.packets = (self.packets + r * elapsed).min(self.packet_burst());
        }
        if let Some(r) = self.bps {
            self.bits = (self.bits + r * elapsed).min(self.bit_burst());
        }
    }

    /// Gives back the tokens `admit` took for a `len`-byte frame that was not sent after all.
    pub fn refund(&mut self, len: usize) {
        if self.pps.is_some() {
            self.packets = (self.packets + 1.0).min(self.packet_burst());
        }
        if self.bps.is_some() {
            self.bits = (self.bits + (len * 8) as f64).min(self.bit_burst());
        }
    }

    /// Takes the tokens for one frame of `len` bytes, or says it is over the limit.
    pub fn admit(&mut self, len: usize) -> bool {
        let bits = (len * 8) as f64;
        let ok = self.pps.is_none_or(|_| self.packets >= 1.0)
            && self.bps.is_none_or(|_| self.bits >= bits);
        if ok {
            self.packets -= 1.0;
            self.bits -= bits;
        }
        ok
    }
}

/// What a port's guest may send.
#[derive(Debug, Clone)]
pub struct TxPolicy {
    /// Source MACs the guest may use: its own first, then the configured extra ones.
    pub allowed_sources: Vec<MacAddr>,
    pub rate: Option<RateLimit>,
    /// The port's VLAN: its frames get this tag on the NIC and switch within it.
    pub vlan: Option<u16>,
}

impl TxPolicy {
    pub fn new(
        own: MacAddr,
        extra: &[MacAddr],
        rate: Option<RateLimit>,
        vlan: Option<u16>,
    ) -> Self {
        let mut allowed_sources = vec![own];
        allowed_sources.extend(extra.iter().copied().filter(|m| *m != own));
        TxPolicy {
            allowed_sources,
            rate,
            vlan,
        }
    }

    pub fn own_mac(&self) -> MacAddr {
        self.allowed_sources[0]
    }
}

/// Where one transmitted frame goes.
#[derive(Debug, Clone, PartialEq)]
pub enum TxVerdict<'p, V> {
    /// To the NIC only.
    Wire,
    /// To this port, not the NIC.
    Local(&'p V),
    /// To the NIC and every other port.
    Flood,
    Drop(TxDrop),
}

/// Decides where a frame from the guest goes, from its Ethernet header `eth` (at least the
/// two addresses) and its length. `ports` are the daemon's ports by MAC; only those on the
/// sender's VLAN count.
pub fn classify<'p, V: Member, S: std::hash::BuildHasher>(
    eth: &[u8],
    len: usize,
    policy: &mut TxPolicy,
    ports: &'p HashMap<MacAddr, V, S>,
) -> TxVerdict<'p, V> {
    classify_with(eth, len, policy, |dst| ports.get(dst))
}

/// [`classify`] with the port table behind `lookup` (which may remember its last answer).
pub fn classify_with<'p, V: Member>(
    eth: &[u8],
    len: usize,
    policy: &mut TxPolicy,
    lookup: impl FnOnce(&MacAddr) -> Option<&'p V>,
) -> TxVerdict<'p, V> {
    if len < ETH_HLEN || eth.len() < 12 {
        return TxVerdict::Drop(TxDrop::Runt);
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&eth[6..12]);
    if !policy.allowed_sources.contains(&MacAddr(src)) {
        return TxVerdict::Drop(TxDrop::Spoofed);
    }
    if let Some(rate) = &mut policy.rate {
        if !rate.admit(len) {
            return TxVerdict::Drop(TxDrop::RateLimited);
        }
    }
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&eth[0..6]);
    let dst = MacAddr(dst);
    if dst.is_multicast() {
        return TxVerdict::Flood;
    }
    match lookup(&dst) {
        Some(p) if dst != policy.own_mac() && p.vlan() == policy.vlan => TxVerdict::Local(p),
        _ => TxVerdict::Wire,
    }
}

/// A flooded frame waiting, in its NIC buffer, to be written into another port.
pub struct LocalFrame {
    pub to: Arc<SwitchPort>,
    pub frame: HeldFrame,
    /// This entry hands the buffer back after delivery. False when the buffer is also on
    /// its way to the NIC (an untagged flood) or another entry of a tagged flood owns it.
    pub owns: bool,
}

/// Where a frame `route` sent to the NIC buffer path goes once copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    Wire,
    Flood,
}

/// Per-worker state the transmit sink keeps between batches.
#[derive(Default)]
pub struct SwitchScratch {
    /// Destinations of the batch's direct frames; a frame's tag is its index here.
    direct_to: Vec<Arc<SwitchPort>>,
    rx: RxScratch,
}

/// The transmit sink of one port for one batch: the NIC socket, the policy and the switch.
pub struct PortTx<'a> {
    pub sock: &'a mut XskSocket,
    pub policy: &'a mut TxPolicy,
    pub ports: &'a MacMap<Arc<SwitchPort>>,
    /// Flooded frames for the other ports, written after the batch.
    pub local: &'a mut Vec<LocalFrame>,
    pub scratch: &'a mut SwitchScratch,
    /// Frames delivered straight into other ports.
    pub switched: u64,
    /// The route of the frame being copied.
    copied: Option<Copied>,
    /// The last destination found in `ports`: a guest sending a burst mostly sends it to
    /// one peer, and the table lookup was a tenth of the vm-to-vm profile.
    last_found: Option<(MacAddr, &'a Arc<SwitchPort>)>,
}

impl<'a> PortTx<'a> {
    pub fn new(
        sock: &'a mut XskSocket,
        policy: &'a mut TxPolicy,
        ports: &'a MacMap<Arc<SwitchPort>>,
        local: &'a mut Vec<LocalFrame>,
        scratch: &'a mut SwitchScratch,
    ) -> Self {
        scratch.direct_to.clear();
        PortTx {
            sock,
            policy,
            ports,
            local,
            scratch,
            switched: 0,
            copied: None,
            last_found: None,
        }
    }
}

impl TxBuffers for PortTx<'_> {
    fn next_buffer(&mut self) -> Option<&mut [u8]> {
        self.sock.next_buffer()
    }

    fn route(&mut self, eth: &[u8], len: usize) -> Route {
        self.copied = None;
        let (ports, last_found) = (self.ports, &mut self.last_found);
        let lookup = |dst: &MacAddr| match *last_found {
            Some((mac, port)) if mac == *dst => Some(port),
            _ => {
                let port = ports.get(dst);
                *last_found = port.map(|p| (*dst, p));
                port
            }
        };
        match classify_with(eth, len, self.policy, lookup) {
            TxVerdict::Drop(why) => Route::Drop(why),
            TxVerdict::Wire => {
                self.copied = Some(Copied::Wire);
                Route::Copy
            }
            TxVerdict::Flood => {
                self.copied = Some(Copied::Flood);
                Route::Copy
            }
            TxVerdict::Local(to) => {
                let direct_to = &mut self.scratch.direct_to;
                let tag = match direct_to.iter().position(|p| p.index == to.index) {
                    Some(i) => i,
                    None => {
                        direct_to.push(to.clone());
                        direct_to.len() - 1
                    }
                };
                Route::Direct(tag as u32)
            }
        }
    }

    fn unroute(&mut self, len: usize) {
        self.copied = None;
        if let Some(rate) = &mut self.policy.rate {
            rate.refund(len);
        }
    }

    fn deliver_direct(&mut self, frames: &[DirectFrame], arena: &[u8]) {
        for (tag, to) in self.scratch.direct_to.iter().enumerate() {
            let target = to.target.lock().unwrap_or_else(|p| p.into_inner());
            // A known port without a frontend has nobody to deliver to.
            let Some(t) = &*target else { continue };
            let mine = frames
                .iter()
                .filter(|f| f.tag == tag as u32)
                .map(|f| f.with_rx_header(arena));
            // Notified per batch, not per round: a receiver that went to sleep starts on
            // this batch while the next ones are copied and keeps polling, where a wake-up
            // per round let it fall asleep after every round (each wake-up costs the sender
            // several microseconds). A receiver that is polling asked for no notification.
            self.switched += deliver_into(
                t,
                mine,
                rx::Framing::WithHeader,
                &mut self.scratch.rx,
                true,
                true,
            );
        }
    }

    fn submit(&mut self, len: usize) -> Result<(), TxDrop> {
        let Some(route) = self.copied.take() else {
            // `route` runs before every copy; nothing unrouted reaches the NIC.
            return Err(TxDrop::Runt);
        };
        if self.sock.current(len).is_none() {
            return Err(TxDrop::Oversized);
        }
        match route {
            Copied::Wire => {
                let len = match self.policy.vlan {
                    Some(vid) => self.sock.tag_current(len, vid).ok_or(TxDrop::Oversized)?,
                    None => len,
                };
                self.sock.stage(len);
                Ok(())
            }
            Copied::Flood => {
                let (own, vlan) = (self.policy.own_mac(), self.policy.vlan);
                let peers = self
                    .ports
                    .values()
                    .filter(|p| p.mac != own && p.vlan == vlan);
                match vlan {
                    // Untagged: one buffer serves the NIC and, until the flush, the peers.
                    None => {
                        if let Some(frame) = self.sock.stage(len) {
                            for p in peers {
                                self.local.push(LocalFrame {
                                    to: p.clone(),
                                    frame,
                                    owns: false,
                                });
                            }
                        }
                    }
                    // Tagged on the NIC, untagged for the peers: the NIC gets a tagged copy.
                    Some(vid) => {
                        if let Some(frame) = self.sock.hold(len) {
                            self.sock.stage_tagged_copy(frame, vid);
                            let mut any = false;
                            for p in peers {
                                self.local.push(LocalFrame {
                                    to: p.clone(),
                                    frame,
                                    owns: !any,
                                });
                                any = true;
                            }
                            if !any {
                                self.sock.release(frame);
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

/// Whether a driver without EVENT_IDX set VRING_AVAIL_F_NO_INTERRUPT (polling drivers such
/// as DPDK's do; virtio-queue's check ignores the flag). Call after publishing the used index.
fn declined_interrupts(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    // The used index was published before this read (virtio 2.7.7.2).
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags = mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire);
    flags.is_ok_and(|f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}

/// Signals the guest if `wanted`, counting notifications sent and suppressed; `None` (the
/// ring could not be read) does neither.
fn signal_if(
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    stats: &QueueStats,
    wanted: Option<bool>,
) {
    match wanted {
        Some(true) if state.signal_used_queue().is_ok() => stats.add(&stats.notifications_sent, 1),
        Some(false) => stats.add(&stats.notifications_suppressed, 1),
        Some(true) | None => {}
    }
}

/// Notifies the guest behind `state` if it asked to be, for used entries published since the
/// used index was `old` without `add_used` (the transmit path publishes a batch at once, and
/// virtio-queue's own check only counts `add_used` entries). With EVENT_IDX: when used_event
/// lies in `[old, new)`, as virtio specifies, or always when `old` is unknown; without: unless
/// it declined interrupts.
pub fn notify_guest_since(
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    mem: &GuestMemoryMmap,
    stats: &QueueStats,
    old: Option<u16>,
) {
    let queue = state.get_queue();
    let wanted = if queue.event_idx_enabled() {
        let Some(old) = old else {
            signal_if(state, stats, Some(true));
            return;
        };
        let new = queue.next_used();
        // The used index was published before this read (virtio 2.7.7.2).
        std::sync::atomic::fence(Ordering::SeqCst);
        let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
        match mem.load::<u16>(GuestAddress(at), Ordering::Relaxed) {
            Ok(event) => event_idx_wants(old, new, u16::from_le(event)),
            // Unreadable: notifying too often is safe, too rarely is not.
            Err(_) => true,
        }
    } else {
        !declined_interrupts(queue, mem)
    };
    signal_if(state, stats, Some(wanted));
}

/// EVENT_IDX: whether a driver whose used_event is `event` wants a notification now that the
/// used index moved from `old` to `new` (it does when `event` lies in `[old, new)`, modulo 2^16).
fn event_idx_wants(old: u16, new: u16, event: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Writes the batch's flooded frames into their ports, one lock and one notification per
/// receiving port, then returns the frames that went nowhere else to the sender's pool.
/// Returns how many frames were delivered.
pub fn deliver_local(
    local: &mut Vec<LocalFrame>,
    sock: &mut XskSocket,
    scratch: &mut RxScratch,
    to_notify: &mut Vec<Arc<SwitchPort>>,
) -> u64 {
    if local.is_empty() {
        return 0;
    }
    // Stable by receiver, so frames to one port keep their order; a batch to one peer (the
    // usual case) is already in order and is not touched.
    if !local.is_sorted_by_key(|f| f.to.index) {
        local.sort_by_key(|f| f.to.index);
    }
    let mut delivered = 0;
    let mut start = 0;
    while start < local.len() {
        let to = local[start].to.clone();
        let end = start
            + local[start..]
                .iter()
                .take_while(|f| f.to.index == to.index)
                .count();
        let target = to.target.lock().unwrap_or_else(|p| p.into_inner());
        // A known port without a frontend has nobody to deliver to.
        if let Some(t) = &*target {
            let n = deliver_into(
                t,
                local[start..end].iter().map(|f| sock.held(f.frame)),
                rx::Framing::Bare,
                scratch,
                true,
                false,
            );
            if n > 0 && !to_notify.iter().any(|p| p.index == to.index) {
                to_notify.push(to.clone());
            }
            delivered += n;
        }
        drop(target);
        start = end;
    }
    for f in local.drain(..) {
        if f.owns {
            sock.release(f.frame);
        }
    }
    delivered
}

/// Notifies the guests of the ports that got flooded frames since the last call, once per
/// round of batches. (Unicast between ports notifies per batch, see
/// `PortTx::deliver_direct`; floods are rare and several batches of them are one wake-up.)
pub fn notify_ports(to_notify: &mut Vec<Arc<SwitchPort>>) {
    for port in to_notify.drain(..) {
        let target = port.target.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = &*target {
            let mut state = t.vring.get_mut();
            t.shared.notify_guest(&mut state, &t.mem.memory(), &t.stats);
        }
    }
}

/// Writes `frames` into one port's receive queue under its vring lock; `switched`: they come
/// from another port (counted as such); `notify`: signal the guest now (else the caller
/// does, through [`notify_ports`]).
fn deliver_into<'f>(
    target: &RxTarget,
    frames: impl Iterator<Item = &'f [u8]>,
    framing: rx::Framing,
    scratch: &mut RxScratch,
    switched: bool,
    notify: bool,
) -> u64 {
    let stats = &target.stats;
    let mut state = target.vring.get_mut();
    if !state.get_queue().ready() || !state.is_enabled() || target.shared.is_broken() {
        stats.add(&stats.rx_dropped_queue_stopped, frames.count() as u64);
        return 0;
    }
    let mem = target.mem.memory();
    let mrg = NegotiatedFeatures::new(target.acked.load(Ordering::Acquire)).mrg_rxbuf;
    let mut frames = frames;
    let mut pulled = 0u64;
    let mut tally = rx::RxTally::default();
    let consumed = rx::deliver_batch(
        &mem,
        state.get_queue_mut(),
        frames.by_ref().inspect(|_| pulled += 1),
        framing,
        mrg,
        scratch,
        &mut tally,
    );
    let left = frames.count() as u64;
    let (n, bytes, buffers, too_large) = (
        tally.frames,
        tally.bytes,
        tally.buffers,
        tally.dropped_too_large,
    );
    let full = match consumed {
        Ok(c) => pulled - c as u64 + left,
        Err(e) => {
            target.shared.mark_broken();
            stats.add(&stats.queue_errors, 1);
            tracing::error!(error = %e, "guest broke the virtqueue rules; queue stopped until the device is reset");
            0
        }
    };
    stats.add(&stats.rx_packets, n);
    stats.add(&stats.rx_bytes, bytes);
    stats.add(&stats.rx_buffers, buffers);
    if switched {
        stats.add(&stats.rx_switched, n);
    }
    stats.add(&stats.rx_dropped_too_large, too_large);
    stats.add(&stats.rx_dropped_guest_ring_full, full);
    if n > 0 && notify {
        target.shared.notify_guest(&mut state, &mem, stats);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, last])
    }

    fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f
    }

    /// A port as the tests' tables hold it: its MAC (to tell which was chosen) and VLAN.
    type TestPort = (MacAddr, Option<u16>);

    impl Member for TestPort {
        fn vlan(&self) -> Option<u16> {
            self.1
        }
    }

    fn classify_frame<'p>(
        f: &[u8],
        policy: &mut TxPolicy,
        table: &'p HashMap<MacAddr, TestPort>,
    ) -> TxVerdict<'p, TestPort> {
        classify(&f[..f.len().min(ETH_HLEN)], f.len(), policy, table)
    }

    fn ports(macs: &[MacAddr]) -> HashMap<MacAddr, TestPort> {
        macs.iter().map(|m| (*m, (*m, None))).collect()
    }

    #[test]
    fn classification_follows_destination_and_source() {
        let table = ports(&[mac(1), mac(2)]);
        let mut policy = TxPolicy::new(mac(1), &[mac(9)], None, None);
        assert_eq!(
            classify_frame(&frame(mac(2), mac(1), 60), &mut policy, &table),
            TxVerdict::Local(&(mac(2), None))
        );
        assert_eq!(
            classify_frame(&frame(mac(3), mac(1), 60), &mut policy, &table),
            TxVerdict::Wire
        );
        assert_eq!(
            classify_frame(&frame(MacAddr::BROADCAST, mac(1), 60), &mut policy, &table),
            TxVerdict::Flood
        );
        let mcast = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            classify_frame(&frame(mcast, mac(1), 60), &mut policy, &table),
            TxVerdict::Flood
        );
        // To itself: not switched back (no hairpin); the wire decides.
        assert_eq!(
            classify_frame(&frame(mac(1), mac(1), 60), &mut policy, &table),
            TxVerdict::Wire
        );
        // The allow-list admits extra sources; anything else is spoofed.
        assert_eq!(
            classify_frame(&frame(mac(2), mac(9), 60), &mut policy, &table),
            TxVerdict::Local(&(mac(2), None))
        );
        assert_eq!(
            classify_frame(&frame(mac(2), mac(2), 60), &mut policy, &table),
            TxVerdict::Drop(TxDrop::Spoofed)
        );
        assert_eq!(
            classify_frame(&frame(mac(3), mac(7), 60), &mut policy, &table),
            TxVerdict::Drop(TxDrop::Spoofed)
        );
        assert_eq!(
            classify_frame(&[0u8; 10], &mut policy, &table),
            TxVerdict::Drop(TxDrop::Runt)
        );
    }

    #[test]
    fn switching_stays_inside_a_vlan() {
        let table: HashMap<MacAddr, TestPort> = [
            (mac(1), Some(100)),
            (mac(2), Some(100)),
            (mac(3), Some(200)),
            (mac(4), None),
        ]
        .into_iter()
        .map(|(m, v)| (m, (m, v)))
        .collect();
        let mut policy = TxPolicy::new(mac(1), &[], None, Some(100));
        assert_eq!(
            classify_frame(&frame(mac(2), mac(1), 60), &mut policy, &table),
            TxVerdict::Local(&(mac(2), Some(100)))
        );
        // Another VLAN's port or an untagged one is not reachable by switching: the frame
        // goes out tagged, as a real switch port on VLAN 100 would send it.
        assert_eq!(
            classify_frame(&frame(mac(3), mac(1), 60), &mut policy, &table),
            TxVerdict::Wire
        );
        assert_eq!(
            classify_frame(&frame(mac(4), mac(1), 60), &mut policy, &table),
            TxVerdict::Wire
        );
        let mut untagged = TxPolicy::new(mac(4), &[], None, None);
        assert_eq!(
            classify_frame(&frame(mac(1), mac(4), 60), &mut untagged, &table),
            TxVerdict::Wire
        );
    }

    #[test]
    fn event_idx_notifies_exactly_when_used_event_was_passed() {
        // Entries 10 and 11 were published (old 10, new 12).
        assert!(event_idx_wants(10, 12, 10));
        assert!(event_idx_wants(10, 12, 11));
        assert!(
            !event_idx_wants(10, 12, 12),
            "the driver waits for a later entry"
        );
        assert!(!event_idx_wants(10, 12, 9), "already notified for that one");
        // Across the 16-bit wrap.
        assert!(event_idx_wants(65535, 1, 65535));
        assert!(event_idx_wants(65535, 1, 0));
        assert!(!event_idx_wants(65535, 1, 1));
        // Nothing published: never.
        assert!(!event_idx_wants(7, 7, 7));
    }

    #[test]
    fn rate_limit_admits_the_burst_then_the_rate() {
        let mut r = RateLimit::new(Some(10_000), None).unwrap();
        let t0 = Instant::now();
        r.refill(t0);
        // Burst: 5 ms at 10 kpps.
        let burst = (0..100).filter(|_| r.admit(60)).count();
        assert_eq!(burst, 50);
        // 10 ms later: 100 more earned, capped at the burst of 50.
        r.refill(t0 + Duration::from_millis(10));
        assert_eq!((0..100).filter(|_| r.admit(60)).count(), 50);
        // 1 ms later: 10 more.
        r.refill(t0 + Duration::from_millis(11));
        assert_eq!((0..100).filter(|_| r.admit(60)).count(), 10);
        // A frame admitted but not sent gets its token back.
        r.refill(t0 + Duration::from_millis(11) + Duration::from_micros(100));
        assert!(r.admit(60));
        assert!(!r.admit(60));
        r.refund(60);
        assert!(r.admit(60));
    }

    #[test]
    fn bit_rate_limit_counts_bytes() {
        // 8 Mbit/s: a 5 ms burst is 40 kbit, raised to one 9216-byte frame (73.7 kbit).
        let mut r = RateLimit::new(None, Some(8_000_000)).unwrap();
        let t0 = Instant::now();
        r.refill(t0);
        assert_eq!((0..100).filter(|_| r.admit(1000)).count(), 9);
        r.refill(t0 + Duration::from_millis(1));
        // 1 ms at 8 Mbit/s: 1000 bytes.
        assert_eq!((0..100).filter(|_| r.admit(1000)).count(), 1);
        assert!(RateLimit::new(None, None).is_none());
    }

    #[test]
    fn rate_limited_frames_are_dropped_after_the_source_check() {
        let table = ports(&[mac(1)]);
        let mut policy = TxPolicy::new(mac(1), &[], RateLimit::new(Some(200), None), None);
        policy.rate.as_mut().unwrap().refill(Instant::now());
        assert_eq!(
            classify_frame(&frame(mac(3), mac(1), 60), &mut policy, &table),
            TxVerdict::Wire
        );
        assert_eq!(
            classify_frame(&frame(mac(3), mac(1), 60), &mut policy, &table),
            TxVerdict::Drop(TxDrop::RateLimited)
        );
        // A spoofed frame does not spend tokens.
        assert_eq!(
            classify_frame(&frame(mac(3), mac(5), 60), &mut policy, &table),
            TxVerdict::Drop(TxDrop::Spoofed)
        );
    }
}
