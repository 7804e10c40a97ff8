//! Generator check: how many frames per second the live-frames generator pushes through the
//! lab's veth with nothing else running (`cargo run -p xvdpa-tests --example gen_probe`).
use std::time::Duration;
use xvdpa_tests::bench::{iface_counter, udp_frame, Generator};
use xvdpa_tests::lab::{self, Lab};

fn main() -> anyhow::Result<()> {
    let lab = Lab::unique("probe")?;
    let frame = udp_frame(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        [2, 0, 0, 0, 0, 2],
        [10, 77, 0, 1],
        [10, 77, 0, 2],
        1024,
        9,
        60,
    );
    let sink = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.host_ns,
            "taskset",
            "-c",
            "1",
            "target/release/xvdpa-xsk-limit",
            "--iface",
            "nic0",
            "--mac",
            "52:54:00:12:34:56",
            "--seconds",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    let before = iface_counter(&lab.host_ns, lab::NIC, "rx_packets")?;
    let flows: u32 = std::env::var("FLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let g = Generator::start(&lab.wire_ns, lab::WIRE, frame, flows, Some(0))?;
    std::thread::sleep(Duration::from_secs(2));
    let sent = g.stop()?;
    let after = iface_counter(&lab.host_ns, lab::NIC, "rx_packets")?;
    let out = sink.wait_with_output()?;
    println!("sink: {}", String::from_utf8_lossy(&out.stdout));
    let st = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.wire_ns, "ethtool", "-S", lab::WIRE])
        .output()?;
    println!("{}", String::from_utf8_lossy(&st.stdout));
    println!(
        "generator sent {sent} in 2 s; nic0 rx_packets +{}",
        after - before
    );
    for c in ["rx_dropped", "tx_dropped"] {
        println!("nic0 {c} {}", iface_counter(&lab.host_ns, lab::NIC, c)?);
        println!("wire0 {c} {}", iface_counter(&lab.wire_ns, lab::WIRE, c)?);
    }
    Ok(())
}
