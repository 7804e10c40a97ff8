//! The transmit route step: `switch::classify` (and `classify_with`, the path the worker
//! takes) with an arbitrary port table, policy (own and extra MACs, VLAN, policer) and a run
//! of frames: arbitrary Ethernet header bytes and lengths, with the policer refilled at
//! input-chosen times. Checks the verdicts against the rules README states: a frame whose
//! source is not allowed never leaves, one carrying a VLAN tag of its own leaves only to the
//! wire and only from a port with VLAN passthrough, one is only switched to another port on
//! the sender's VLAN, and multicast floods.
//!
//! Input layout (missing bytes read as zero; flags: 1 pps, 2 bps, 4 `classify_with`,
//! 8 refund, 0x70 bps shift, 0x80 VLAN passthrough):
//! `[flags][vlan u16][rate_pps u32][rate_bps u32][n_ports] n_ports × [mac 6][vlan u16]`
//! `[n_extra] n_extra × [mac 6]` then frames: `[header len][len u32][dt_us u16][header bytes]`.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use xvdpa::datapath::tx::TxDrop;
use xvdpa::mac::MacAddr;
use xvdpa::switch::{classify, classify_with, Member, RateLimit, TxPolicy, TxVerdict};
use xvdpa_fuzz::Input;

/// A port as the table holds it: its MAC (to check which one was chosen) and its VLAN.
#[derive(Debug, PartialEq)]
struct Port(MacAddr, Option<u16>);

impl Member for Port {
    fn vlan(&self) -> Option<u16> {
        self.1
    }
}

fn mac(input: &mut Input<'_>) -> MacAddr {
    MacAddr(std::array::from_fn(|_| input.u8()))
}

fn vlan_of(v: u16) -> Option<u16> {
    (v != 0).then_some(v & 0xfff)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let vlan = vlan_of(input.u16());
    let pps = input.u32();
    let bps = input.u32();
    let rate = RateLimit::new(
        (flags & 1 != 0).then_some(u64::from(pps)),
        (flags & 2 != 0).then_some(u64::from(bps) << ((flags >> 4) & 7)),
    );
    let mut table = HashMap::new();
    for _ in 0..input.u8() % 16 {
        let m = mac(&mut input);
        let v = vlan_of(input.u16());
        table.insert(m, Port(m, v));
    }
    let own = mac(&mut input);
    let extra: Vec<MacAddr> = (0..input.u8() % 4).map(|_| mac(&mut input)).collect();
    let passthrough = flags & 0x80 != 0;
    let mut policy = TxPolicy::new(own, &extra, rate, vlan).with_vlan_passthrough(passthrough);
    let allowed = policy.allowed_sources.clone();
    assert_eq!(policy.own_mac(), own);

    let mut now = Instant::now();
    while !input.0.is_empty() {
        let header_len = usize::from(input.u8() % 20);
        let len = input.u32() as usize;
        let dt = Duration::from_micros(u64::from(input.u16()));
        now = now.checked_add(dt).unwrap_or(now);
        if let Some(r) = &policy.rate {
            r.refill(now);
        }
        let eth = input.bytes(header_len).to_vec();
        let verdict = if flags & 4 != 0 {
            classify_with(&eth, len, &mut policy, |dst| table.get(dst))
        } else {
            classify(&eth, len, &mut policy, &table)
        };
        if eth.len() < 14 || len < 14 {
            assert_eq!(verdict, TxVerdict::Drop(TxDrop::Runt));
            continue;
        }
        let dst = MacAddr(eth[0..6].try_into().unwrap());
        let src = MacAddr(eth[6..12].try_into().unwrap());
        if !allowed.contains(&src) {
            assert_eq!(verdict, TxVerdict::Drop(TxDrop::Spoofed));
            continue;
        }
        let tpid = u16::from_be_bytes([eth[12], eth[13]]);
        let tagged = [0x8100, 0x88a8, 0x9100].contains(&tpid);
        if tagged && !passthrough {
            assert_eq!(verdict, TxVerdict::Drop(TxDrop::Vlan));
            continue;
        }
        match verdict {
            TxVerdict::Local(_) | TxVerdict::Flood if tagged => {
                panic!("a tagged frame was switched: {verdict:?}")
            }
            TxVerdict::Local(p) => {
                assert_eq!(p.0, dst, "switched to the destination's port");
                assert_ne!(dst, own, "never hairpinned");
                assert_eq!(p.1, vlan, "switched only within the VLAN");
                assert!(!dst.is_multicast());
            }
            TxVerdict::Flood => assert!(dst.is_multicast()),
            TxVerdict::Wire => assert!(tagged || !dst.is_multicast()),
            TxVerdict::Drop(why) => {
                assert_eq!(why, TxDrop::RateLimited);
                assert!(policy.rate.is_some());
                continue;
            }
        }
        // An admitted frame that then found no NIC buffer gives its tokens back.
        if flags & 8 != 0 {
            if let Some(r) = &policy.rate {
                r.refund(len);
            }
        }
    }
});
