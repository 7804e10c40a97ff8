//! What a port's guest may send: its source MACs, its VLAN and its rate (a policer), and
//! where each frame goes by its Ethernet header. Pure functions over the port table.
//!
//! VLANs are the operator's: a guest's frame that carries a tag of its own (802.1Q, 802.1ad,
//! a priority tag) would reach the wire on a VLAN the port was not given, or as QinQ under a
//! tagged port's tag, so it is dropped unless the port allows it (`vlan-passthrough`). What
//! such a port sends tagged goes to the wire only: the daemon's switch and floods carry
//! untagged frames, within the ports' own VLANs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::datapath::device::ETH_HLEN;
use crate::datapath::tx::TxDrop;
use crate::mac::MacAddr;
use crate::nic::vlan::carries_vlan_tag;
use crate::sync;

/// What the classifier needs to know of a port.
pub trait Member {
    fn vlan(&self) -> Option<u16>;
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

/// A port's policer, one for all its queue pairs (each pair's policy holds a clone): a
/// guest with N pairs must not send N times its rate. Only ports with a rate limit have
/// one, and its lock is uncontended unless several pairs transmit at once.
#[derive(Debug, Clone)]
pub struct PortRate(Arc<Mutex<RateLimit>>);

impl PortRate {
    pub fn new(limit: RateLimit) -> Self {
        PortRate(Arc::new(Mutex::new(limit)))
    }

    /// See [`RateLimit::refill`].
    pub fn refill(&self, now: Instant) {
        sync::lock(&self.0).refill(now);
    }

    /// See [`RateLimit::admit`].
    pub fn admit(&self, len: usize) -> bool {
        sync::lock(&self.0).admit(len)
    }

    /// See [`RateLimit::refund`].
    pub fn refund(&self, len: usize) {
        sync::lock(&self.0).refund(len);
    }
}

/// What a port's guest may send. Each queue pair has a copy; the rate is shared.
#[derive(Debug, Clone)]
pub struct TxPolicy {
    /// Source MACs the guest may use: its own first, then the configured extra ones.
    pub allowed_sources: Vec<MacAddr>,
    pub rate: Option<PortRate>,
    /// The port's VLAN: its frames get this tag on the NIC and switch within it.
    pub vlan: Option<u16>,
    /// The guest may send frames carrying VLAN tags of its own (to the wire only).
    pub vlan_passthrough: bool,
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
            rate: rate.map(PortRate::new),
            vlan,
            vlan_passthrough: false,
        }
    }

    /// Lets the guest send frames with VLAN tags of its own (see the module's comment).
    pub fn with_vlan_passthrough(mut self, allowed: bool) -> Self {
        self.vlan_passthrough = allowed;
        self
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

/// Decides where a frame from the guest goes, from its Ethernet header `eth` (addresses and
/// EtherType; a shorter one is a runt) and its length. `ports` are the daemon's ports by MAC; only those on the
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
    if len < ETH_HLEN || eth.len() < ETH_HLEN {
        return TxVerdict::Drop(TxDrop::Runt);
    }
    let mut src = [0u8; 6];
    src.copy_from_slice(&eth[6..12]);
    if !policy.allowed_sources.contains(&MacAddr(src)) {
        return TxVerdict::Drop(TxDrop::Spoofed);
    }
    let tagged = carries_vlan_tag(eth);
    if tagged && !policy.vlan_passthrough {
        return TxVerdict::Drop(TxDrop::Vlan);
    }
    if let Some(rate) = &policy.rate {
        if !rate.admit(len) {
            return TxVerdict::Drop(TxDrop::RateLimited);
        }
    }
    if tagged {
        return TxVerdict::Wire;
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

    /// `frame(dst, src, len)` with a tag of protocol `tpid` for VLAN `vid` after the MACs.
    fn tagged_frame(dst: MacAddr, src: MacAddr, tpid: u16, vid: u16, len: usize) -> Vec<u8> {
        let mut f = frame(dst, src, len);
        f.splice(
            12..12,
            tpid.to_be_bytes().into_iter().chain(vid.to_be_bytes()),
        );
        f
    }

    /// The verdict on a 64-byte frame from `src` to `dst` tagged with (`tpid`, `vid`).
    fn tagged_verdict<'p>(
        (dst, src, tpid, vid): (MacAddr, MacAddr, u16, u16),
        policy: &mut TxPolicy,
        table: &'p HashMap<MacAddr, TestPort>,
    ) -> TxVerdict<'p, TestPort> {
        classify_frame(&tagged_frame(dst, src, tpid, vid, 64), policy, table)
    }

    #[test]
    fn guests_may_not_send_vlan_tags_of_their_own() {
        let table = ports(&[mac(1), mac(2)]);
        let mut untagged = TxPolicy::new(mac(1), &[], None, None);
        // 802.1Q, 802.1ad and pre-standard QinQ tags, a priority tag (VID 0), to the wire,
        // to another port and to everyone: dropped and counted as VLAN drops.
        for (dst, tpid, vid) in [
            (mac(3), 0x8100, 5),
            (mac(3), 0x88a8, 5),
            (mac(3), 0x9100, 5),
            (mac(3), 0x8100, 0),
            (mac(2), 0x8100, 5),
            (MacAddr::BROADCAST, 0x8100, 5),
        ] {
            assert_eq!(
                tagged_verdict((dst, mac(1), tpid, vid), &mut untagged, &table),
                TxVerdict::Drop(TxDrop::Vlan),
                "{tpid:#x} VID {vid} to {dst}"
            );
        }
        // From a tagged port it would leave as QinQ, under the port's own tag.
        let mut on_100 = TxPolicy::new(mac(1), &[], None, Some(100));
        let qinq = (mac(3), mac(1), 0x8100, 7);
        assert_eq!(
            tagged_verdict(qinq, &mut on_100, &table),
            TxVerdict::Drop(TxDrop::Vlan)
        );
        // The source check comes first: a forged frame is a spoofed one, tagged or not.
        let forged = (mac(3), mac(9), 0x8100, 5);
        assert_eq!(
            tagged_verdict(forged, &mut untagged, &table),
            TxVerdict::Drop(TxDrop::Spoofed)
        );
        // A header cut before its EtherType cannot be checked: a runt.
        let f = tagged_frame(mac(3), mac(1), 0x8100, 5, 64);
        assert_eq!(
            classify(&f[..13], f.len(), &mut untagged, &table),
            TxVerdict::Drop(TxDrop::Runt)
        );
    }

    #[test]
    fn vlan_passthrough_sends_tagged_frames_to_the_wire_only() {
        let table = ports(&[mac(1), mac(2)]);
        let mut trunk = TxPolicy::new(mac(1), &[], None, None).with_vlan_passthrough(true);
        // Tagged frames leave as sent; the daemon's switch does not carry them, not even to
        // a port whose MAC they name, nor as a flood.
        for (dst, tpid) in [
            (mac(3), 0x8100),
            (mac(2), 0x8100),
            (MacAddr::BROADCAST, 0x8100),
            (mac(3), 0x88a8),
        ] {
            assert_eq!(
                tagged_verdict((dst, mac(1), tpid, 5), &mut trunk, &table),
                TxVerdict::Wire
            );
        }
        // Untagged frames are switched as before.
        assert_eq!(
            classify_frame(&frame(mac(2), mac(1), 60), &mut trunk, &table),
            TxVerdict::Local(&(mac(2), None))
        );
        // A tagged port that allows it sends QinQ.
        let mut qinq = TxPolicy::new(mac(1), &[], None, Some(100)).with_vlan_passthrough(true);
        assert_eq!(
            tagged_verdict((mac(3), mac(1), 0x8100, 7), &mut qinq, &table),
            TxVerdict::Wire
        );
    }

    #[test]
    fn vlan_drops_spend_no_rate_tokens() {
        let table = ports(&[mac(1)]);
        let mut policy = TxPolicy::new(mac(1), &[], RateLimit::new(Some(200), None), None);
        policy.rate.as_ref().unwrap().refill(Instant::now());
        for _ in 0..3 {
            assert_eq!(
                tagged_verdict((mac(3), mac(1), 0x8100, 5), &mut policy, &table),
                TxVerdict::Drop(TxDrop::Vlan)
            );
        }
        // The one-frame burst is still there.
        assert_eq!(
            classify_frame(&frame(mac(3), mac(1), 60), &mut policy, &table),
            TxVerdict::Wire
        );
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
        policy.rate.as_ref().unwrap().refill(Instant::now());
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

    /// A port's queue pairs each carry a copy of its policy; they must draw on one bucket,
    /// or a guest with N pairs sends N times its rate.
    #[test]
    fn queue_pairs_of_one_port_share_its_rate() {
        let table = ports(&[mac(1)]);
        let mut pair0 = TxPolicy::new(mac(1), &[], RateLimit::new(Some(10_000), None), None);
        let mut pair1 = pair0.clone();
        let t0 = Instant::now();
        for p in [&pair0, &pair1] {
            p.rate.as_ref().unwrap().refill(t0);
        }
        let f = frame(mac(3), mac(1), 60);
        let mut admitted = 0;
        for _ in 0..100 {
            for p in [&mut pair0, &mut pair1] {
                if classify_frame(&f, p, &table) == TxVerdict::Wire {
                    admitted += 1;
                }
            }
        }
        // The burst: 5 ms at 10 kpps, for the port as a whole.
        assert_eq!(admitted, 50);
    }
}
