//! What a frontend's comings and goings, and a local process's connections, leave behind in
//! the daemon: open fds, threads, CPU. Drives the real daemon with the test frontend on a lab.
//! Needs root (namespaces, XDP); `cargo xtask test` runs it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::proc_figures::{settled, thread_names, ProcFigures};

/// How long a port may take to close a finished connection's fds and join its threads.
const SETTLE: Duration = Duration::from_secs(5);

#[test]
fn reconnecting_frontends_leave_no_fds_or_threads_behind() -> Result<()> {
    let lab = Lab::unique("fdleak")?;
    let dir = socket_dir("fdleak")?;
    let socket = dir.join("vm0.sock");
    let mut daemon = Daemon::start(&lab, &socket, &mac_str(guest_mac(0)), &[])?;
    let pid = daemon.pid().context("daemon pid")?;
    let cycle = |daemon: &mut Daemon, n: usize| -> Result<()> {
        let fe = VirtioNetFrontend::connect(&socket, FrontendOptions::default())?;
        drop(fe);
        daemon.wait_for_count("frontend disconnected", n, Duration::from_secs(10))
    };
    // The first connection may set up what lives as long as the daemon (thread pools).
    cycle(&mut daemon, 1)?;
    // The port builds the next connection's sockets right after logging the last one's end.
    std::thread::sleep(Duration::from_millis(500));
    let before = ProcFigures::read(pid)?;
    const CYCLES: usize = 40;
    for n in 2..=CYCLES + 1 {
        cycle(&mut daemon, n)?;
    }
    let after = settled(pid, before, SETTLE)?;
    ensure!(
        after.fds <= before.fds && after.threads <= before.threads,
        "after {CYCLES} more connections: {after} (was {before}); threads: {:?}",
        thread_names(pid)
    );
    daemon.stop()?;
    Ok(())
}
