//! A queue event that finds its kick eventfd replaced: the library's epoll thread reads the
//! queue's current eventfd, which may be a new, empty one (a device reset between the event
//! and its read, or a frontend replacing the eventfd of a running ring). The queue pair must
//! keep moving frames. Needs root (namespaces, XDP); `cargo xtask test` runs it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::frames::test_frame;
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend, RX_QUEUE};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::proc_figures::thread_names;
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);

/// The library's name for a queue pair's epoll thread.
const EPOLL_THREAD: &str = "vring_worker";

fn epoll_threads(pid: u32) -> usize {
    thread_names(pid)
        .iter()
        .filter(|n| n.as_str() == EPOLL_THREAD)
        .count()
}

/// A frame from the wire reaches the frontend.
fn from_wire(fe: &mut VirtioNetFrontend, wire: &WireSocket, frame: &[u8]) -> Result<()> {
    fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), 2048)?;
    wire.send(frame)?;
    let got = fe.recv_frames(1, WAIT)?;
    ensure!(
        got.iter().any(|(_, f)| f == frame),
        "the frame from the wire did not arrive (got {} others)",
        got.len()
    );
    Ok(())
}

#[test]
fn a_kick_event_for_a_replaced_kick_eventfd_leaves_the_queue_pair_running() -> Result<()> {
    let lab = Lab::unique("kick")?;
    let dir = socket_dir("kick")?;
    let socket = dir.join("vm0.sock");
    let mut daemon = Daemon::start(&lab, &socket, &mac_str(guest_mac(0)), &[])?;
    let pid = daemon.pid().context("daemon pid")?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let mut fe = VirtioNetFrontend::connect(&socket, FrontendOptions::default())?;
    from_wire(&mut fe, &wire, &test_frame(guest_mac(0), wire_mac, 1, 300))?;
    let threads = epoll_threads(pid);
    ensure!(threads >= 1, "no {EPOLL_THREAD} thread in the daemon");

    // The old eventfd stays in the library's epoll set while this side holds it open, and
    // reports the receive queue when written; the library then reads the new, empty one.
    let old = fe.replace_kick(RX_QUEUE)?;
    old.write(1)?;
    std::thread::sleep(Duration::from_millis(200));
    // Closed: the kernel takes it out of the epoll set with its last reference.
    drop(old);

    let got = epoll_threads(pid);
    ensure!(
        got == threads,
        "the queue pair's epoll thread ended: {threads} -> {got} {EPOLL_THREAD} threads"
    );
    from_wire(&mut fe, &wire, &test_frame(guest_mac(0), wire_mac, 2, 300))
        .context("after the stale kick event")?;
    drop(fe);
    daemon.wait_for_count("frontend disconnected", 1, WAIT)?;
    daemon.stop()?;
    Ok(())
}
