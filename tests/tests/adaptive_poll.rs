//! Adaptive polling, the default: while frames come the worker keeps polling; where its socket
//! carries the NIC queue's NAPI id its busy polls run the queue's receive work on its CPU, with
//! the queue's defer-hard-irqs and gro-flush-timeout set through the netdev netlink family and
//! put back at exit; once the frames stop, the worker sleeps and the daemon uses no CPU.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use xvdpa::nic::napi::{NapiInfo, NapiSettings, NapiTakeover, Netlink};
use xvdpa_tests::bench::process_cpu_seconds;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::test_frame;
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend};
use xvdpa_tests::lab::{self, guest_mac, mac_str, Lab};
use xvdpa_tests::netns::{ifindex, in_netns};
use xvdpa_tests::sockopts::xdp_socket_busy_poll;
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);

/// A lab, a daemon serving one port on it, and the wire's raw socket.
struct Setup {
    lab: Lab,
    daemon: Daemon,
    wire: WireSocket,
    socket: PathBuf,
    _dir: SocketDir,
}

fn setup(tag: &str, daemon_args: &[&str]) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let daemon = Daemon::start(&lab, &socket, &mac_str(guest_mac(0)), daemon_args)?;
    let wire = WireSocket::open(&lab)?;
    Ok(Setup {
        lab,
        daemon,
        wire,
        socket,
        _dir: dir,
    })
}

/// The NAPI instances of the lab's NIC, as the kernel reports them.
fn nic_napis(lab: &Lab) -> Result<Vec<NapiInfo>> {
    in_netns(&lab.host_ns, || {
        let index = ifindex(lab::NIC)?;
        Netlink::open()
            .and_then(|mut nl| nl.napis_of(index))
            .map_err(std::io::Error::other)
    })
    .context("napi-get on the lab's NIC")
}

/// Sends a few frames from the wire and waits until the guest has them.
fn traffic(s: &Setup, fe: &mut VirtioNetFrontend, n: u32) -> Result<()> {
    let wire_mac = s.lab.wire_mac()?;
    for i in 0..n {
        s.wire.send(&test_frame(guest_mac(0), wire_mac, i, 200))?;
    }
    let got = fe.recv_frames(n as usize, WAIT)?;
    ensure!(
        got.len() == n as usize,
        "guest got {} of {n} frames",
        got.len()
    );
    Ok(())
}

#[test]
fn a_copy_mode_socket_carries_no_napi_id_so_the_nic_queues_napi_is_left_alone() -> Result<()> {
    // Linux 6.13+ marks an AF_XDP socket with its queue's NAPI id at bind, for zero-copy
    // sockets only: the lab's veth (copy mode) gives none, and the daemon must say so, set
    // no busy-polling option that could not work (nor keep the capability for it), and
    // leave the NAPI as it was, however long frames keep coming.
    let mut s = setup("napi", &[])?;
    s.daemon
        .wait_for_log("get no NAPI id", WAIT)
        .context("the daemon did not say why it leaves the NIC queues' NAPI alone")?;
    let before = nic_napis(&s.lab)?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    fe.post_rx_buffers(128, 2048)?;
    let pid = s.daemon.pid().context("daemon pid")?;
    let opts = xdp_socket_busy_poll(pid)?;
    ensure!(
        !opts.is_empty() && opts.iter().all(|o| o.prefer_busy_poll == 0),
        "a copy-mode AF_XDP socket was set to prefer busy polling: {opts:?}"
    );
    traffic(&s, &mut fe, 72)?;
    let during = nic_napis(&s.lab)?;
    ensure!(
        during == before,
        "NAPI settings changed: {before:?} -> {during:?}"
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

/// What a worker does with a socket that carries its queue's NAPI id (a zero-copy socket on
/// a driver that links its queues to their NAPI, which these machines do not have), fed the
/// id of the lab NIC's NAPI: the knobs are set, read back through the kernel, and put back.
#[test]
fn a_queues_napi_is_set_for_busy_polling_and_restored() -> Result<()> {
    let lab = Lab::unique("napiset")?;
    lab.nic_with_napi_from_start()?;
    let napis = nic_napis(&lab)?;
    let napi = napis
        .first()
        .context("the lab's NIC has no NAPI instance")?;
    let (id, before) = (napi.id, napi.settings);
    let wanted = NapiSettings {
        defer_hard_irqs: 10,
        gro_flush_timeout_ns: 50_000,
        irq_suspend_timeout_ns: 0,
    };
    let host_ns = lab.host_ns.clone();
    let (during, after, again) = in_netns(&host_ns, move || {
        let index = ifindex(lab::NIC)?;
        let takeover = NapiTakeover::new(lab::NIC, wanted);
        let get = move || -> std::io::Result<NapiSettings> {
            let mut nl = Netlink::open().map_err(std::io::Error::other)?;
            let all = nl.napis_of(index).map_err(std::io::Error::other)?;
            all.iter()
                .find(|n| n.id == id)
                .map(|n| n.settings)
                .ok_or_else(|| std::io::Error::other("NAPI gone"))
        };
        ensure_io(takeover.take_over(0, id), "take_over refused a NAPI id")?;
        let during = get()?;
        // A second worker on the same queue changes nothing more.
        ensure_io(takeover.take_over(0, id), "second take_over")?;
        takeover.restore();
        let after = get()?;
        drop(takeover);
        Ok((during, after, get()?))
    })?;
    ensure!(
        during.defer_hard_irqs == 10 && during.gro_flush_timeout_ns == 50_000,
        "NAPI {id} while taken over: {during:?}"
    );
    ensure!(
        after == before,
        "NAPI {id} restored to {after:?}, was {before:?}"
    );
    ensure!(
        again == before,
        "dropping the takeover changed NAPI {id} again: {again:?}"
    );
    Ok(())
}

fn ensure_io(ok: bool, what: &str) -> std::io::Result<()> {
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(what.to_string()))
    }
}

#[test]
fn an_idle_daemon_uses_no_cpu_once_the_frames_stop() -> Result<()> {
    let s = setup("idle", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    fe.post_rx_buffers(256, 2048)?;
    let pid = s.daemon.pid().context("daemon pid")?;
    // Enough traffic for the worker to go hot and take the NIC queue's NAPI over.
    for _ in 0..4 {
        traffic(&s, &mut fe, 64)?;
        fe.post_rx_buffers(64, 2048)?;
    }
    // The worker stops polling within a fraction of a millisecond and the NAPI's deferred
    // polls run out within one more; a second is plenty.
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = process_cpu_seconds(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = process_cpu_seconds(pid)? - cpu0;
    let seconds = t0.elapsed().as_secs_f64();
    // A worker left spinning would use about all of these 3 s; the 200 ms housekeeping
    // timers and the control plane cost a few milliseconds. Clock ticks are 10 ms.
    ensure!(
        cpu <= 0.05,
        "the idle daemon used {cpu:.2} CPU seconds in {seconds:.1} s"
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

/// Frames closer together than the polling window but far below packet rates (like a TCP
/// upload's ACKs: about 5,000 a second here, a 100 µs sleep between sends) wake the worker
/// per batch: it does not spin between them, as it did when every frame kept it polling for
/// another 200 µs (it then used 1.9 of the 2 s).
#[test]
fn a_slow_stream_of_frames_does_not_keep_the_worker_polling() -> Result<()> {
    let s = setup("slow", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    fe.post_rx_buffers(256, 2048)?;
    let pid = s.daemon.pid().context("daemon pid")?;
    let wire_mac = s.lab.wire_mac()?;
    // Delivered, or dropped once the guest's ring was full: either way the worker had it.
    let handled = || -> Result<u64> {
        Ok(s.daemon.counter("rx_packets")? + s.daemon.counter("rx_dropped_guest_ring_full")?)
    };
    let before = handled()?;
    let cpu0 = process_cpu_seconds(pid)?;
    let t0 = Instant::now();
    let mut sent = 0u32;
    while t0.elapsed() < Duration::from_secs(2) {
        s.wire
            .send(&test_frame(guest_mac(0), wire_mac, sent, 100))?;
        sent += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
    let cpu = process_cpu_seconds(pid)? - cpu0;
    let seconds = t0.elapsed().as_secs_f64();
    let deadline = Instant::now() + WAIT;
    let mut got = handled()? - before;
    while got < u64::from(sent) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        got = handled()? - before;
    }
    eprintln!(
        "{sent} frames in {seconds:.1} s ({:.0} a second), {got} handled; the daemon used {cpu:.2} CPU seconds",
        f64::from(sent) / seconds
    );
    ensure!(
        got == u64::from(sent),
        "the worker handled {got} of {sent} frames"
    );
    // A polling worker would use about all of the 2 s; one woken per frame or batch a
    // fraction of it.
    ensure!(
        cpu < seconds / 2.0,
        "the daemon used {cpu:.2} CPU seconds in {seconds:.1} s for {sent} frames: its worker kept polling"
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn without_adaptive_polling_the_nic_queues_napi_is_left_alone() -> Result<()> {
    let mut s = setup("napi-off", &["--no-adaptive-poll"])?;
    let before = nic_napis(&s.lab)?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    fe.post_rx_buffers(128, 2048)?;
    let pid = s.daemon.pid().context("daemon pid")?;
    ensure!(
        xdp_socket_busy_poll(pid)?
            .iter()
            .all(|o| o.prefer_busy_poll == 0),
        "a socket prefers busy polling with --no-adaptive-poll"
    );
    traffic(&s, &mut fe, 8)?;
    // Past a housekeeping tick, when the NAPI would have been set.
    std::thread::sleep(Duration::from_millis(500));
    let during = nic_napis(&s.lab)?;
    ensure!(
        during == before,
        "NAPI settings changed: {before:?} -> {during:?}"
    );
    ensure!(
        s.daemon
            .wait_for_log("NAPI set", Duration::from_millis(10))
            .is_err(),
        "the daemon set a NAPI"
    );
    drop(fe);
    s.daemon.stop()?;
    Ok(())
}
