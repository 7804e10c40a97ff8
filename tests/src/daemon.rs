//! The real `xvdpa` binary, started inside a lab's host namespace and stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ctl::{daemon_counter, Ctl};
use crate::lab::{Lab, NIC};
use crate::output::{LineLog, Wait};
use crate::proc_figures::thread_names;

/// The daemon binary: `$XVDPA_BIN`, or the debug build `cargo xtask build` leaves behind.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("XVDPA_BIN") {
        return PathBuf::from(p);
    }
    crate::workspace_root().join("target/debug/xvdpa")
}

fn checked_binary() -> Result<PathBuf> {
    let bin = binary();
    if !bin.exists() {
        bail!("{} does not exist: run the tests with `cargo xtask test`, which builds it with its eBPF program", bin.display());
    }
    Ok(bin)
}

pub struct Daemon {
    child: Option<Child>,
    log: Arc<LineLog>,
    pub sockets: Vec<PathBuf>,
    /// The control socket given with `--ctl`, if any.
    ctl: Option<PathBuf>,
}

/// A test's directory for its sockets, removed with what is in it when dropped: keep it
/// alive as long as the daemon and frontends use its sockets.
#[derive(Debug)]
pub struct SocketDir(PathBuf);

impl std::ops::Deref for SocketDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for SocketDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for one test's sockets.
pub fn socket_dir(tag: &str) -> Result<SocketDir> {
    let dir = std::env::temp_dir().join(format!("xvdpa-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(SocketDir(dir))
}

impl Daemon {
    /// Starts `xvdpa --iface nic0 <args>` in the lab's host namespace without waiting.
    pub fn spawn(lab: &Lab, args: &[&str]) -> Result<Daemon> {
        Self::spawn_pinned(lab, args, None)
    }

    /// Like [`Daemon::spawn`], with every thread of the daemon confined to `cpu`.
    pub fn spawn_pinned(lab: &Lab, args: &[&str], cpu: Option<usize>) -> Result<Daemon> {
        match cpu {
            Some(cpu) => Self::spawn_wrapped(lab, &["taskset", "-c", &cpu.to_string()], args),
            None => Self::spawn_wrapped(lab, &[], args),
        }
    }

    /// Like [`Daemon::spawn`], with the daemon run by `wrapper`: a command line that runs the
    /// one after it in a changed process (`taskset -c 1`, `prlimit --memlock=...`,
    /// `setpriv ... --`), inside the lab's host namespace.
    pub fn spawn_wrapped(lab: &Lab, wrapper: &[&str], args: &[&str]) -> Result<Daemon> {
        let bin = checked_binary()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.host_ns]).args(wrapper);
        cmd.arg(&bin).args(["--iface", NIC]).args(args);
        Self::spawn_command(cmd, ctl_arg(args))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts the binary with exactly `args` (for command-line error tests).
    pub fn spawn_raw(netns: Option<&str>, args: &[&str]) -> Result<Daemon> {
        Self::spawn_binary(&checked_binary()?, netns, args)
    }

    /// Starts the daemon binary `bin` (an installed one, say) with exactly `args`.
    pub fn spawn_binary(bin: &Path, netns: Option<&str>, args: &[&str]) -> Result<Daemon> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(args);
        Self::spawn_command(cmd, ctl_arg(args))
    }

    fn spawn_command(mut cmd: Command, ctl: Option<PathBuf>) -> Result<Daemon> {
        // RUST_LOG overrides the daemon's --log; set it only when the tester asks.
        match std::env::var("XVDPA_TEST_LOG") {
            Ok(filter) => cmd.env("RUST_LOG", filter),
            Err(_) => cmd.env_remove("RUST_LOG"),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let log = LineLog::capture(&mut child, "xvdpa");
        Ok(Daemon {
            child: Some(child),
            log,
            sockets: Vec::new(),
            ctl,
        })
    }

    /// Starts a daemon serving one port and waits until it accepts frontends. Its control
    /// socket is `ctl.sock` next to the port's socket.
    pub fn start(lab: &Lab, socket: &Path, mac: &str, extra: &[&str]) -> Result<Daemon> {
        Self::start_pinned(lab, socket, mac, extra, None)
    }

    /// [`Daemon::start`] confined to one CPU (benchmarks).
    pub fn start_pinned(
        lab: &Lab,
        socket: &Path,
        mac: &str,
        extra: &[&str],
        cpu: Option<usize>,
    ) -> Result<Daemon> {
        let socket_s = socket.to_str().context("socket path")?;
        let ctl = socket.with_file_name("ctl.sock");
        let ctl = ctl.to_str().context("ctl path")?;
        let mut args = vec!["--socket", socket_s, "--mac", mac, "--ctl", ctl];
        args.extend_from_slice(extra);
        let mut d = Self::spawn_pinned(lab, &args, cpu)?;
        d.sockets.push(socket.to_path_buf());
        d.wait_for_log("port ready for a frontend", Duration::from_secs(20))?;
        Ok(d)
    }

    /// A `--port` value: the port at `socket` with MAC `mac`, then `extra` settings as they
    /// follow in the spec (e.g. `,vlan=100`, or nothing).
    pub fn port_spec(socket: &Path, mac: [u8; 6], extra: &str) -> String {
        format!(
            "socket={},mac={}{extra}",
            socket.display(),
            crate::lab::mac_str(mac)
        )
    }

    /// Starts a daemon serving several ports (`--port socket=...,mac=...` each) and waits until
    /// every one accepts frontends. Its control socket is `ctl.sock` next to the first socket.
    pub fn start_ports(lab: &Lab, ports: &[(PathBuf, String)], extra: &[&str]) -> Result<Daemon> {
        let specs: Vec<String> = ports
            .iter()
            .map(|(s, m)| format!("socket={},mac={m}", s.display()))
            .collect();
        let ctl = ports
            .first()
            .context("no ports")?
            .0
            .with_file_name("ctl.sock");
        let mut d = Self::start_specs(lab, &ctl, &specs, extra)?;
        d.sockets.extend(ports.iter().map(|(s, _)| s.clone()));
        Ok(d)
    }

    /// Starts a daemon serving the ports `specs` (`--port` values, see [`Daemon::port_spec`])
    /// with its control socket at `ctl`, and waits until every one accepts frontends.
    pub fn start_specs(lab: &Lab, ctl: &Path, specs: &[String], extra: &[&str]) -> Result<Daemon> {
        Self::start_specs_wrapped(lab, &[], ctl, specs, extra)
    }

    /// [`Daemon::start_specs`] with the daemon run by `wrapper` (see [`Daemon::spawn_wrapped`]).
    pub fn start_specs_wrapped(
        lab: &Lab,
        wrapper: &[&str],
        ctl: &Path,
        specs: &[String],
        extra: &[&str],
    ) -> Result<Daemon> {
        let ctl = ctl.to_str().context("ctl path")?;
        let mut args: Vec<&str> = vec!["--ctl", ctl];
        for s in specs {
            args.extend(["--port", s.as_str()]);
        }
        args.extend_from_slice(extra);
        let mut d = Self::spawn_wrapped(lab, wrapper, &args)?;
        d.wait_for_count(
            "port ready for a frontend",
            specs.len(),
            Duration::from_secs(20),
        )?;
        Ok(d)
    }

    /// Waits until `n` log lines contain `needle`; fails early if the daemon exits.
    pub fn wait_for_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .log
                .lines()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
                >= n
            {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                bail!(
                    "daemon exited ({status}) before logging {needle:?} {n} times:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon did not log {needle:?} {n} times within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until a log line contains `needle`; fails early if the daemon exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        match self.log.wait_for(needle, 0, timeout, self.child.as_mut())? {
            Wait::Found(l) => Ok(l),
            Wait::TimedOut => bail!("daemon did not log {needle:?} within {timeout:?}"),
            Wait::Exited(status) => bail!(
                "daemon exited ({status}) before logging {needle:?}:\n{}",
                self.output()
            ),
        }
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("daemon already stopped"),
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                std::thread::sleep(Duration::from_millis(100));
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("daemon still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon logged so far.
    pub fn output(&self) -> String {
        self.log.lines().join("\n")
    }

    /// Sends `signal` to the daemon (through `ip netns exec`, which execs it: same pid).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.child.as_ref().context("daemon not running")?.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit. Returns the full log.
    pub fn stop(mut self) -> Result<String> {
        self.signal(libc::SIGTERM)?;
        let status = self.wait_exit(Duration::from_secs(10))?;
        let out = self.output();
        if !status.success() {
            bail!("daemon exited with {status} after SIGTERM:\n{out}");
        }
        Ok(out)
    }

    /// The daemon's control socket, as `xvdpa ctl` and `xvdpa stats` reach it.
    pub fn ctl(&self) -> Result<Ctl> {
        let path = self
            .ctl
            .as_ref()
            .context("the daemon was started without --ctl")?;
        Ok(Ctl::new(path))
    }

    /// Counter `name` of the running daemon, read with `xvdpa stats --json`: an XDP program
    /// counter, or a queue counter summed over every queue pair of every port.
    pub fn counter(&self, name: &str) -> Result<u64> {
        daemon_counter(&self.ctl()?.stats()?, name)
    }

    /// Counter `name` once it has reached `at_least`, or its last value if it has not within
    /// `COUNTER_WAIT`; the caller asserts on what it gets. The datapath adds a batch to its
    /// counters after handing the frames on, so right after traffic a counter may still be
    /// catching up; counters only grow, so a value past `at_least` is returned at once.
    pub fn counter_reaching(&self, name: &str, at_least: u64) -> Result<u64> {
        let deadline = Instant::now() + COUNTER_WAIT;
        loop {
            let value = self.counter(name)?;
            if value >= at_least || Instant::now() > deadline {
                return Ok(value);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// What a failing test shows of port `port`: its queues' counters (where its frames
    /// went: delivered, dropped as the queue stopped or the ring full, never steered), the
    /// XDP program's counters, the path the port took, and the daemon's threads (a queue
    /// pair's epoll thread, `vring_worker`, that ended leaves its port's frames where they
    /// are). Read from the running daemon; never fails, as it is only ever said.
    pub fn port_figures(&self, port: u64) -> String {
        let stats = match self.ctl().and_then(|ctl| ctl.stats()) {
            Ok(stats) => stats,
            Err(e) => return format!("(no counters from the daemon: {e:#})"),
        };
        let entry = stats["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"]["index"] == port));
        format!(
            "port {port}: {}\nits counters: {}\nXDP counters: {}\ndaemon threads: {:?}",
            entry.map_or("(no such port)".to_string(), |p| p["port"].to_string()),
            entry.map_or("-".to_string(), |p| p["queues"].to_string()),
            stats["xdp"],
            self.pid().map(thread_names).unwrap_or_default()
        )
    }
}

/// How long [`Daemon::counter_reaching`] waits for a counter to catch up.
const COUNTER_WAIT: Duration = Duration::from_secs(10);

/// The path given with `--ctl PATH` among a daemon's arguments.
fn ctl_arg(args: &[&str]) -> Option<PathBuf> {
    args.windows(2)
        .find(|w| w[0] == "--ctl")
        .map(|w| PathBuf::from(w[1]))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
