//! Benchmark traffic generator: with BPF_PROG_RUN and BPF_F_TEST_XDP_LIVE_FRAMES the kernel
//! runs this program over a template frame again and again, and XDP_TX sends each copy out of
//! the device named as its ingress: wire-rate traffic from the kernel, no per-packet syscall
//! (the technique of xdp-trafficgen, which does not run on this kernel).
//!
//! FLOWS[0] > 1 spreads frames over that many UDP source ports (for RSS on real NICs).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

/// [0]: number of flows; [1]: first UDP source port.
#[map]
static FLOWS: Array<u32> = Array::with_max_entries(2, 0);

#[map]
static SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Ethernet + IPv4 (no options) header bytes before the UDP source port.
const UDP_SPORT_OFFSET: usize = 14 + 20;

#[xdp]
pub fn xvdpa_bench_tx(ctx: XdpContext) -> u32 {
    let flows = FLOWS.get(0).copied().unwrap_or(1);
    if flows > 1 {
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + UDP_SPORT_OFFSET + 2 <= end {
            if let Some(seq) = SEQ.get_ptr_mut(0) {
                let base = FLOWS.get(1).copied().unwrap_or(1024);
                // SAFETY: per-CPU slot; the port bytes were bounds-checked above.
                unsafe {
                    *seq = (*seq).wrapping_add(1);
                    let port = (base + *seq % flows) as u16;
                    let p = (start + UDP_SPORT_OFFSET) as *mut [u8; 2];
                    *p = port.to_be_bytes();
                }
            }
        }
    }
    xdp_action::XDP_TX
}

mod runtime;
