//! A live systemd to run xvdpa's unit under: the host's own root booted as a throw-away
//! container with `systemd-nspawn --boot` (Debian package `systemd-container`).
//!
//! PID 1 on the test machines is not systemd, so there is nothing to `systemctl start` on the
//! host itself. The container's root is an overlay whose lower layer is the host's `/` and
//! whose upper layer is a tmpfs, mounted in a private mount namespace: `dpkg -i` and edits to
//! `/etc` inside land in the tmpfs and vanish with the container; the host's `/usr`, `/etc`
//! and package database stay as they were. (`systemd-nspawn --directory=/ --volatile=overlay`
//! would be the one-flag form, but nspawn 252 refuses to boot the host's root directory itself,
//! and `--ephemeral` copies the whole tree on a filesystem without snapshots.)
//!
//! The container runs in a lab's host namespace (`--network-namespace-path`), so the daemon
//! inside sees the lab's NIC and the wire is where the other tests have it. Its filesystem is
//! reached from the host through `/proc/<its PID 1>/root`, which is also how a QEMU on the
//! host connects to a vhost-user socket the unit's `RuntimeDirectory=` made inside. Commands
//! run inside with `nsenter` into all of PID 1's namespaces (no machined runs on the host,
//! so `machinectl shell` and `systemd-run --machine` have nothing to talk to).
//!
//! nspawn's own sandbox is opened as far as the unit needs, so that what restricts the daemon
//! is the unit's hardening: the capabilities of its `CapabilityBoundingSet=` that nspawn's
//! default set lacks (`CAP_NET_ADMIN`, `CAP_BPF`, `CAP_IPC_LOCK`), and `bpf(2)`, which nspawn's
//! system call allow-list leaves out (every `bpf()` of the daemon got EPERM without it). No
//! more than that: the container runs the host's enabled services, which must not reach the
//! host's clock or kernel modules.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::daemon::{socket_dir, SocketDir};
use crate::lab::Lab;
use crate::output::LineLog;

/// The boot, in a private mount namespace (`unshare --mount`): a tmpfs for the upper layer,
/// the overlay over `/`, a tmpfs for nspawn's own state under /run (it refuses to clean up
/// directories on a disk filesystem, which /run is here), then nspawn in place of the shell.
const BOOT_SCRIPT: &str = r#"set -e
dir="$1"; netns="$2"; name="$3"
mount -t tmpfs -o mode=0700 xvdpa-container "$dir/layers"
mkdir "$dir/layers/upper" "$dir/layers/work"
mount -t overlay -o "lowerdir=/,upperdir=$dir/layers/upper,workdir=$dir/layers/work" overlay "$dir/root"
mkdir -p /run/systemd/nspawn
mount -t tmpfs tmpfs /run/systemd/nspawn
exec systemd-nspawn --quiet --directory="$dir/root" --machine="$name" --boot \
    --register=no --keep-unit --network-namespace-path="/run/netns/$netns" \
    --capability=CAP_NET_ADMIN,CAP_BPF,CAP_IPC_LOCK --system-call-filter=bpf
"#;

/// A booted container; shut down (and everything written inside forgotten) when dropped.
pub struct Container {
    nspawn: Option<Child>,
    pid1: u32,
    console: Arc<LineLog>,
    /// Holds the mount points; the mounts themselves live in the private namespace.
    _dir: SocketDir,
}

impl Container {
    /// Boots the host's root in `lab`'s host namespace and waits until systemd inside has
    /// finished starting up (`systemctl is-system-running` says running or degraded).
    pub fn boot(lab: &Lab, timeout: Duration) -> Result<Container> {
        if Command::new("systemd-nspawn")
            .arg("--version")
            .output()
            .is_err()
        {
            bail!("systemd-nspawn is missing: Debian package systemd-container (`cargo xtask test` installs it)");
        }
        let dir = socket_dir("nspawn")?;
        for sub in ["layers", "root"] {
            std::fs::create_dir(dir.join(sub))?;
        }
        // Machine names are host names: letters, digits and dashes.
        let name = lab.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
        let mut nspawn = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                BOOT_SCRIPT,
                "sh",
            ])
            .arg(&*dir)
            .arg(&lab.host_ns)
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("unshare (util-linux)")?;
        let console = LineLog::capture(&mut nspawn, "container");
        let mut container = Container {
            pid1: 0,
            nspawn: Some(nspawn),
            console,
            _dir: dir,
        };
        container.pid1 = container.wait_for_init(timeout)?;
        container.wait_until_up(timeout)?;
        Ok(container)
    }

    /// The container's PID 1 (as the host numbers it): nspawn's child, once it runs systemd.
    fn wait_for_init(&mut self, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        let nspawn = self.nspawn.as_mut().context("container stopped")?;
        let pid = nspawn.id();
        loop {
            if let Some(status) = nspawn.try_wait()? {
                bail!(
                    "systemd-nspawn exited ({status}) before the container booted:\n{}",
                    self.console.lines().join("\n")
                );
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                let exe = std::fs::read_link(format!("/proc/{child}/exe")).unwrap_or_default();
                if exe.ends_with("systemd") {
                    return Ok(child);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "no systemd in the container after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_until_up(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut state = String::new();
        while Instant::now() < deadline {
            let out = self
                .command("systemctl")
                .arg("is-system-running")
                .output()?;
            state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                return Ok(());
            }
            if let Some(status) = self
                .nspawn
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("the container stopped ({status}) while booting");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("the container's systemd still says {state:?} after {timeout:?}")
    }

    /// `program` to run inside the container: in all of its PID 1's namespaces, as root.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.pid1.to_string(), "--all", "--"])
            .arg(program);
        cmd
    }

    /// Runs `program args` inside and returns its stdout; fails with its output if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.command(program).args(args).output()?;
        ensure!(
            out.status.success(),
            "{program} {args:?} in the container: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The host's path to `path` inside the container (through its PID 1's root).
    pub fn path(&self, path: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid1)).join(path.trim_start_matches('/'))
    }

    /// Shuts the container down as its init would be (nspawn turns SIGTERM into an orderly
    /// poweroff), killing it if that takes longer than `timeout`.
    pub fn shut_down(&mut self, timeout: Duration) -> Result<()> {
        let Some(mut nspawn) = self.nspawn.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child's pid, which we have not waited for yet.
        unsafe { libc::kill(nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while nspawn.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                bail!("the container did not shut down within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.shut_down(Duration::from_secs(20));
    }
}
