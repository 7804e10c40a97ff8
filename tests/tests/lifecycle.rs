//! What a frontend's comings and goings, and a local process's connections, leave behind in
//! the daemon: open fds, threads, CPU. Drives the real daemon with the test frontend on a lab.
//! Needs root (namespaces, XDP); `cargo xtask test` runs it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::proc_figures::{cpu_time, steady, thread_names, FdTable, ProcFigures};

/// How long a port may take to close a finished connection's fds, join its threads and
/// build the next connection's.
const SETTLE: Duration = Duration::from_secs(5);

/// How the test frontend's guest memory shows in the daemon's fd table.
const GUEST_MEMORY: &str = "memfd:xvdpa-test-guest";

/// A lab and a daemon serving one port. Bind every field (`..` would drop the lab and the
/// socket directory at once).
struct OnePort {
    daemon: Daemon,
    socket: PathBuf,
    lab: Lab,
    _dir: SocketDir,
}

fn one_port(tag: &str, daemon_args: &[&str]) -> Result<OnePort> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let daemon = Daemon::start(&lab, &socket, &mac_str(guest_mac(0)), daemon_args)?;
    Ok(OnePort {
        daemon,
        socket,
        lab,
        _dir: dir,
    })
}

#[test]
fn reconnecting_frontends_leave_no_fds_or_threads_behind() -> Result<()> {
    let OnePort {
        mut daemon,
        socket,
        _dir,
        lab: _lab,
    } = one_port("fdleak", &[])?;
    let pid = daemon.pid().context("daemon pid")?;
    let cycle = |daemon: &mut Daemon, n: usize| -> Result<()> {
        let fe = VirtioNetFrontend::connect(&socket, FrontendOptions::default())?;
        drop(fe);
        daemon.wait_for_count("frontend disconnected", n, Duration::from_secs(10))
    };
    // The first connection may set up what lives as long as the daemon (thread pools).
    cycle(&mut daemon, 1)?;
    let before = steady(pid, SETTLE)?;
    let before_fds = FdTable::read(pid)?;
    const CYCLES: usize = 40;
    for n in 2..=CYCLES + 1 {
        cycle(&mut daemon, n)?;
    }
    let after = steady(pid, SETTLE)?;
    let after_fds = FdTable::read(pid)?;
    ensure!(
        after.fds <= before.fds && after.threads <= before.threads,
        "after {CYCLES} more connections: {after} (was {before}); threads: {:?}; fds that differ:\n{}",
        thread_names(pid),
        before_fds.diff(&after_fds)
    );
    // Every frontend has left: none of their guest memory may stay open (and mapped), even
    // when the count above came back because something else closed meanwhile.
    ensure!(
        !after_fds.to_string().contains(GUEST_MEMORY),
        "the daemon still holds a departed frontend's guest memory:\n{after_fds}"
    );
    daemon.stop()?;
    Ok(())
}

/// What [`accept_loop_backs_off_when_out_of_fds`] connects to.
enum Endpoint {
    Control(std::path::PathBuf),
    Metrics { netns: String, addr: String },
}

impl Endpoint {
    /// One idle connection (the daemon keeps an fd for it once accepted).
    fn connect(&self) -> Result<Box<dyn Send>> {
        Ok(match self {
            Endpoint::Control(path) => Box::new(std::os::unix::net::UnixStream::connect(path)?),
            Endpoint::Metrics { netns, addr } => {
                let addr = addr.clone();
                Box::new(xvdpa_tests::netns::in_netns(netns, move || {
                    std::net::TcpStream::connect(&addr)
                })?)
            }
        })
    }
}

/// A daemon's fd table held full: its soft fd limit lowered to 8 above what it had open, and more
/// connections open to one of its endpoints than that (the rest wait in the listen
/// backlog). Dropping it closes the connections and gives the daemon its limit back, as
/// when whoever held the fds lets them go.
struct FullFdTable {
    pid: u32,
    /// `SOFT:HARD` as it was.
    limit: String,
    _held: Vec<Box<dyn Send>>,
}

fn prlimit_nofile(pid: u32, limit: &str) -> Result<()> {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={limit}")])
        .status()?;
    ensure!(status.success(), "prlimit failed: {status}");
    Ok(())
}

fn fill_fd_table(pid: u32, endpoint: &Endpoint) -> Result<FullFdTable> {
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            "--nofile",
            "--raw",
            "--noheadings",
        ])
        .args(["-o", "SOFT,HARD"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let limit = text.split_whitespace().collect::<Vec<_>>().join(":");
    ensure!(limit.contains(':'), "prlimit printed {text:?}");
    // Only the soft limit: giving it back is then allowed without CAP_SYS_RESOURCE.
    let hard = limit.rsplit(':').next().unwrap_or("unlimited");
    let low = ProcFigures::read(pid)?.fds + 8;
    prlimit_nofile(pid, &format!("{low}:{hard}"))?;
    let held = (0..24).map(|_| endpoint.connect()).collect::<Result<_>>()?;
    Ok(FullFdTable {
        pid,
        limit,
        _held: held,
    })
}

impl Drop for FullFdTable {
    fn drop(&mut self) {
        if let Err(e) = prlimit_nofile(self.pid, &self.limit) {
            eprintln!("cannot restore the daemon's fd limit: {e:#}");
        }
    }
}

/// With its fd table full, the daemon's accept loop for `endpoint` must neither spin (CPU
/// time while it stays full) nor stop (it serves again once fds are free), and logs the
/// episode once.
fn accept_loop_backs_off_when_out_of_fds(
    daemon: &Daemon,
    endpoint: &Endpoint,
    serves: impl Fn() -> Result<()>,
) -> Result<()> {
    let pid = daemon.pid().context("daemon pid")?;
    serves().context("before the fd table filled up")?;
    let held = fill_fd_table(pid, endpoint)?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu_before = cpu_time(pid)?;
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(pid)? - cpu_before;
    ensure!(
        spent < Duration::from_millis(300),
        "the daemon used {spent:?} of CPU in 2 s with its fd table full"
    );
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while serves().is_err() {
        ensure!(
            std::time::Instant::now() < deadline,
            "not serving again 10 s after the fds were freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let episodes = daemon.output().matches("out of file descriptors").count();
    ensure!(episodes == 1, "{episodes} log lines for one episode");
    Ok(())
}

#[test]
fn control_socket_backs_off_when_out_of_fds() -> Result<()> {
    let OnePort {
        daemon,
        socket,
        _dir,
        lab: _lab,
    } = one_port("emfctl", &[])?;
    let ctl = daemon.ctl()?;
    let endpoint = Endpoint::Control(socket.with_file_name("ctl.sock"));
    accept_loop_backs_off_when_out_of_fds(&daemon, &endpoint, || ctl.stats().map(drop))?;
    daemon.stop()?;
    Ok(())
}

#[test]
fn metrics_endpoint_backs_off_when_out_of_fds() -> Result<()> {
    let addr = format!("127.0.0.1:{}", 20000 + (std::process::id() % 1000) as u16);
    let OnePort {
        daemon,
        lab,
        _dir,
        socket: _,
    } = one_port("emfmet", &["--metrics", addr.as_str()])?;
    let netns = lab.host_ns.clone();
    let endpoint = Endpoint::Metrics {
        netns: netns.clone(),
        addr: addr.clone(),
    };
    let serves = || -> Result<()> {
        let addr = addr.clone();
        let reply = xvdpa_tests::netns::in_netns(&netns, move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(&addr)?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            c.read_to_string(&mut out)?;
            Ok(out)
        })?;
        ensure!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        Ok(())
    };
    accept_loop_backs_off_when_out_of_fds(&daemon, &endpoint, serves)?;
    daemon.stop()?;
    Ok(())
}

#[test]
fn a_port_waits_out_a_full_fd_table() -> Result<()> {
    let OnePort {
        daemon,
        socket,
        _dir,
        lab: _lab,
    } = one_port("emfport", &[])?;
    let pid = daemon.pid().context("daemon pid")?;
    let held = fill_fd_table(pid, &Endpoint::Control(socket.with_file_name("ctl.sock")))?;
    // A frontend knocks while the daemon has no fd to accept it with, and gives up.
    let knock = std::os::unix::net::UnixStream::connect(&socket)?;
    std::thread::sleep(Duration::from_millis(500));
    drop(knock);
    drop(held);
    // Once fds are free, the port serves the next frontend.
    let mut fe = VirtioNetFrontend::connect(&socket, FrontendOptions::default())?;
    ensure!(fe.config()?.len() == 17, "no device config");
    let list = daemon.ctl()?.cli(&["ctl"], &["list"])?;
    ensure!(
        list.contains("connected"),
        "port state after the episode: {list}"
    );
    drop(fe);
    daemon.stop()?;
    Ok(())
}

#[test]
fn idle_metrics_connections_cannot_take_the_daemons_fds() -> Result<()> {
    let addr = format!("127.0.0.1:{}", 21000 + (std::process::id() % 1000) as u16);
    let OnePort {
        daemon, lab, _dir, ..
    } = one_port("metcap", &["--metrics", addr.as_str()])?;
    let pid = daemon.pid().context("daemon pid")?;
    let before = ProcFigures::read(pid)?.fds;
    let endpoint = Endpoint::Metrics {
        netns: lab.host_ns.clone(),
        addr: addr.clone(),
    };
    // Anyone who can reach the endpoint can open connections and send nothing.
    let held: Vec<_> = (0..200)
        .map(|_| endpoint.connect())
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let during = ProcFigures::read(pid)?.fds;
    ensure!(
        during <= before + 40,
        "200 idle metrics connections: the daemon went from {before} to {during} fds"
    );
    drop(held);
    daemon.stop()?;
    Ok(())
}

/// SIGTERM while the daemon is still starting (XDP attached, ports not made yet: a service
/// manager or a script stopping it at once) is an orderly shutdown once start-up is done,
/// not death by the signal's default action.
#[test]
fn sigterm_during_start_up_shuts_down_in_order() -> Result<()> {
    let lab = Lab::unique("lcterm")?;
    let dir = socket_dir("lcterm")?;
    let socket = dir.join("vm0.sock");
    let ctl = dir.join("ctl.sock");
    let port = format!("socket={},mac={}", socket.display(), mac_str(guest_mac(0)));
    let mut daemon = Daemon::spawn(
        &lab,
        &["--ctl", ctl.to_str().context("ctl path")?, "--port", &port],
    )?;
    daemon.wait_for_log("XDP steering attached", Duration::from_secs(20))?;
    let log = daemon.stop()?;
    ensure!(
        log.contains("SIGTERM: shutting down") && log.contains("XDP steering detached"),
        "no orderly shutdown:\n{log}"
    );
    ensure!(!socket.exists(), "the port's socket was left behind");
    Ok(())
}
