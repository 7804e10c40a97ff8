//! The lifecycle soak: on one port, frontends connect, move traffic, reset the device, move
//! traffic again and disconnect, cycle after cycle, while a second port streams both ways
//! (to the wire, from the wire, and switched to the first port). The daemon's open fds,
//! threads and resident memory are read before the cycles and after; they must come back.
//! `cargo xtask soak --cycles N` and the suite's short run (tests/tests/soak.rs) share it.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::daemon::{socket_dir, Daemon};
use crate::frames::test_frame;
use crate::frontend::{FrontendOptions, VirtioNetFrontend, RX_QUEUE, TX_QUEUE};
use crate::lab::{guest_mac, mac_str, Lab};
use crate::proc_figures::{steady, thread_names, FdTable, ProcFigures};
use crate::wire::WireSocket;

/// How much more resident memory the daemon may hold after the cycles than before. The
/// allocator keeps some freed memory for reuse (each connection's worker thread gets a malloc
/// arena, and freed pages are not all handed back), so RSS moves a little with no leak; a
/// leak per cycle shows as growth proportional to the cycles, which is checked separately.
pub const RSS_TOLERANCE_KIB: u64 = 2048;

/// How long a frame may take to arrive.
const WAIT: Duration = Duration::from_secs(5);

/// The daemon's figures before and after the cycles, and what moved meanwhile.
#[derive(Debug)]
pub struct SoakReport {
    pub cycles: usize,
    pub start: ProcFigures,
    pub end: ProcFigures,
    /// Frames the streaming port received from the wire while the cycles ran.
    pub streamed_frames: u64,
    pub elapsed: Duration,
}

impl SoakReport {
    /// Fails unless fds and threads came back exactly and memory within
    /// [`RSS_TOLERANCE_KIB`].
    pub fn check(&self) -> Result<()> {
        let (s, e) = (self.start, self.end);
        ensure!(
            e.fds <= s.fds,
            "open fds {} -> {} after {} cycles",
            s.fds,
            e.fds,
            self.cycles
        );
        ensure!(
            e.threads <= s.threads,
            "threads {} -> {} after {} cycles",
            s.threads,
            e.threads,
            self.cycles
        );
        ensure!(
            e.rss_kib <= s.rss_kib + RSS_TOLERANCE_KIB,
            "resident memory {} -> {} KiB after {} cycles (tolerance {RSS_TOLERANCE_KIB} KiB)",
            s.rss_kib,
            e.rss_kib,
            self.cycles
        );
        ensure!(
            self.streamed_frames > 0,
            "the streaming port received nothing"
        );
        Ok(())
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} connect/traffic/reset/traffic/disconnect cycles in {:.1} s; the other port received {} frames meanwhile",
            self.cycles,
            self.elapsed.as_secs_f64(),
            self.streamed_frames
        )?;
        writeln!(f, "daemon at start: {}", self.start)?;
        write!(f, "daemon at end:   {}", self.end)
    }
}

/// Runs the soak on `lab` with a daemon of its own; `progress` is called after each cycle
/// with the number done.
pub fn run(lab: &Lab, cycles: usize, mut progress: impl FnMut(usize)) -> Result<SoakReport> {
    let dir = socket_dir("soak")?;
    let (cycling, streaming) = (dir.join("cycling.sock"), dir.join("streaming.sock"));
    let ports = [
        (cycling.clone(), mac_str(guest_mac(0))),
        (streaming.clone(), mac_str(guest_mac(1))),
    ];
    let mut daemon = Daemon::start_ports(lab, &ports, &[])?;
    let pid = daemon.pid().context("daemon pid")?;
    let wire = WireSocket::open(lab)?;
    let wire_mac = lab.wire_mac()?;

    let stream = Streamer::start(lab, &streaming, wire_mac)?;
    // The first cycle sets up what lasts as long as the daemon; count from after it.
    let mut seq = 0;
    let figures = |daemon: &Daemon| daemon.port_figures(CYCLING_PORT);
    one_cycle(&cycling, &wire, wire_mac, &mut seq, &|| figures(&daemon))?;
    daemon.wait_for_count("frontend disconnected", 1, WAIT)?;
    let start = steady(pid, WAIT)?;
    let start_fds = FdTable::read(pid)?;
    let began = Instant::now();
    for n in 1..=cycles {
        one_cycle(&cycling, &wire, wire_mac, &mut seq, &|| figures(&daemon))
            .with_context(|| format!("cycle {n}"))?;
        daemon.wait_for_count("frontend disconnected", n + 1, WAIT)?;
        ensure!(
            !stream.failed(),
            "the streaming port failed during cycle {n}"
        );
        progress(n);
    }
    let elapsed = began.elapsed();
    let end = steady(pid, WAIT)?;
    let end_fds = FdTable::read(pid)?;
    let streamed_frames = stream.stop()?;
    let report = SoakReport {
        cycles,
        start,
        end,
        streamed_frames,
        elapsed,
    };
    if report.check().is_err() {
        eprintln!("daemon threads at the end: {:?}", thread_names(pid));
        eprintln!("daemon fds that differ:\n{}", start_fds.diff(&end_fds));
    }
    daemon.stop()?;
    Ok(report)
}

/// The cycling port's index in the daemon: the first port it was started with.
const CYCLING_PORT: u64 = 0;

/// Connect, a frame each way, device reset, a frame from the wire again, disconnect. A
/// failure carries `figures()`, taken while the frontend is still connected (its
/// connection's threads still there, or not).
fn one_cycle(
    socket: &std::path::Path,
    wire: &WireSocket,
    wire_mac: [u8; 6],
    seq: &mut u32,
    figures: &dyn Fn() -> String,
) -> Result<()> {
    let mut fe = VirtioNetFrontend::connect(socket, FrontendOptions::default())?;
    traffic_and_reset(&mut fe, wire, wire_mac, seq).map_err(|e| e.context(figures()))
}

/// A cycle's traffic on a connected frontend: a frame each way, device reset, a frame from
/// the wire again.
fn traffic_and_reset(
    fe: &mut VirtioNetFrontend,
    wire: &WireSocket,
    wire_mac: [u8; 6],
    seq: &mut u32,
) -> Result<()> {
    from_wire(fe, wire, wire_mac, seq)?;
    *seq += 1;
    fe.send(&test_frame(wire_mac, guest_mac(0), *seq, 200), 1, false)?;
    fe.kick(TX_QUEUE)?;
    ensure!(
        fe.wait_tx_used(1, WAIT)? == 1,
        "the device did not take a frame to send"
    );
    fe.reset_device()?;
    from_wire(fe, wire, wire_mac, seq)?;
    Ok(())
}

/// One frame from the wire must reach the frontend; switched frames from the streaming port
/// may arrive around it.
fn from_wire(
    fe: &mut VirtioNetFrontend,
    wire: &WireSocket,
    wire_mac: [u8; 6],
    seq: &mut u32,
) -> Result<()> {
    *seq += 1;
    let frame = test_frame(guest_mac(0), wire_mac, *seq, 300);
    let deadline = Instant::now() + WAIT;
    fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), 2048)?;
    wire.send(&frame)?;
    let mut sent = Instant::now();
    while Instant::now() < deadline {
        let got = fe.recv_frames(1, Duration::from_millis(100))?;
        if got.iter().any(|(_, f)| *f == frame) {
            return Ok(());
        }
        fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), 2048)?;
        // The frontend cannot see when the daemon has the new connection's rings running: a
        // frame that comes before goes to the host, as a real peer's would, and the peer
        // sends again. Frames that do not arrive at all still fail the cycle.
        if sent.elapsed() >= Duration::from_millis(500) {
            wire.send(&frame)?;
            sent = Instant::now();
        }
    }
    bail!("frame {} from the wire did not arrive", *seq)
}

/// The second port's traffic, on a thread of its own: frames from the wire in, frames to the
/// wire and to the cycling port out.
struct Streamer {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl Streamer {
    fn start(lab: &Lab, socket: &std::path::Path, wire_mac: [u8; 6]) -> Result<Streamer> {
        let mut fe = VirtioNetFrontend::connect(socket, FrontendOptions::default())?;
        let wire = WireSocket::open(lab)?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (stop2, received2) = (stop.clone(), received.clone());
        let thread = std::thread::Builder::new()
            .name("soak-stream".into())
            .spawn(move || -> Result<()> {
                let mut seq = 0u32;
                while !stop2.load(Ordering::Relaxed) {
                    fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), 2048)?;
                    for _ in 0..16 {
                        seq = seq.wrapping_add(1);
                        wire.send(&test_frame(guest_mac(1), wire_mac, seq, 500))?;
                    }
                    fe.reclaim_used(TX_QUEUE)?;
                    if fe.free_descriptors(TX_QUEUE) >= 2 {
                        fe.send(&test_frame(wire_mac, guest_mac(1), seq, 400), 1, false)?;
                        fe.send(&test_frame(guest_mac(0), guest_mac(1), seq, 400), 1, false)?;
                        fe.kick(TX_QUEUE)?;
                    }
                    let got = fe.recv_frames(16, Duration::from_millis(20))?;
                    received2.fetch_add(got.len() as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            })?;
        Ok(Streamer {
            stop,
            received,
            thread,
        })
    }

    fn failed(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops the traffic; returns how many frames the port received.
    fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(result) => result.context("streaming port")?,
            Err(_) => bail!("the streaming thread panicked"),
        }
        Ok(self.received.load(Ordering::Relaxed))
    }
}
