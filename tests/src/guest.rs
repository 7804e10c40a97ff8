//! A real Linux guest under QEMU, attached to xvdpa over vhost-user.
//!
//! The kernel and initramfs are built by `cargo xtask` (see `xtask/src/guest_image.rs`) and
//! found through `XVDPA_GUEST_KERNEL` / `XVDPA_GUEST_INITRD`, or at their cache location under
//! `target/guest/`. The initramfs's init loads the virtio modules, configures `eth0` from the
//! kernel command line (`xvdpa.ip=`), runs the script passed as `xvdpa.script=` (gzip, then base64) or an
//! interactive shell, and prints a machine-readable end marker.
//!
//! QEMU is `qemu-system-x86_64` from PATH, or the binary `XVDPA_QEMU` names (a QEMU unpacked
//! into a private directory: its `usr/share/qemu` firmware is used before the system's). The
//! command line depends on its version: see [`qemu_args_for`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::output::{LineLog, Wait};

/// Printed by the guest's init when its script ends: `XVDPA-DONE rc=<exit code>`.
pub const DONE_MARKER: &str = "XVDPA-DONE rc=";
/// Printed when eth0 is up and configured.
pub const READY_MARKER: &str = "XVDPA-READY";

pub fn kernel_path() -> PathBuf {
    std::env::var_os("XVDPA_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/guest/vmlinux"))
}

pub fn initrd_path() -> PathBuf {
    std::env::var_os("XVDPA_GUEST_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/guest/initrd.gz"))
}

/// The QEMU the tests run: `XVDPA_QEMU`, or `qemu-system-x86_64` from PATH.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("XVDPA_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// A QEMU release, `(major, minor)`.
pub type QemuVersion = (u32, u32);

/// The version `qemu --version` prints first: `QEMU emulator version 10.0.2 (Debian ...)`.
pub fn parse_qemu_version(text: &str) -> Option<QemuVersion> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The version of [`qemu_binary`], asked once per test process. A QEMU that cannot say is
/// taken for Debian stable's 7.2, so the work-arounds stay on.
pub fn qemu_version() -> QemuVersion {
    static VERSION: OnceLock<QemuVersion> = OnceLock::new();
    *VERSION.get_or_init(|| version_of(&qemu_binary()))
}

/// The version of the QEMU at `binary` (7.2 if it cannot say, as [`qemu_version`]).
pub fn version_of(binary: &Path) -> QemuVersion {
    Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| parse_qemu_version(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or((7, 2))
}

/// A private QEMU's firmware directory (`<prefix>/usr/share/qemu` for
/// `<prefix>/usr/bin/qemu-system-x86_64`), which QEMU searches before its built-in one.
fn private_firmware_dir(binary: &Path) -> Option<PathBuf> {
    let dir = binary.parent()?.parent()?.join("share/qemu");
    dir.is_dir().then_some(dir)
}

/// The guest's kernel and initramfs, which must exist.
pub fn image() -> Result<(PathBuf, PathBuf)> {
    let (kernel, initrd) = (kernel_path(), initrd_path());
    for p in [&kernel, &initrd] {
        if !p.exists() {
            bail!(
                "{} missing: run the tests with `cargo xtask test` (it builds the guest image)",
                p.display()
            );
        }
    }
    Ok((kernel, initrd))
}

/// How to start a guest.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub socket: PathBuf,
    pub mac: String,
    /// `addr/prefix` for eth0.
    pub ip: String,
    pub memory_mib: u32,
    /// Shell script the guest runs (then powers off); `None` for an interactive shell.
    pub script: Option<String>,
    /// QEMU's chardev `reconnect=` seconds (QEMU reconnects when the backend restarts).
    pub reconnect: Option<u32>,
    /// QEMU listens on `socket` (`server=on,wait=off`) and xvdpa's port, in client mode,
    /// connects to it; `reconnect` is then unused.
    pub qemu_listens: bool,
    /// Let a guest reboot restart it in the same QEMU process (otherwise QEMU exits).
    pub allow_reboot: bool,
    /// Virtqueue pairs (`queues=` and `mq=on` above 1) and as many vCPUs.
    pub queue_pairs: u16,
    /// More `virtio-net-pci` properties, e.g. `,csum=off,host_tso4=off` (empty for none).
    pub device_props: String,
}

/// QEMU's command line for `config` and the QEMU the tests run ([`qemu_version`]).
pub fn qemu_args(config: &GuestConfig, kernel: &Path, initrd: &Path) -> Vec<String> {
    with_firmware(
        qemu_args_for(config, kernel, initrd, qemu_version()),
        &qemu_binary(),
    )
}

/// QEMU's command line for `config` and the QEMU at `binary`, whichever the tests run.
pub fn qemu_args_on(
    binary: &Path,
    config: &GuestConfig,
    kernel: &Path,
    initrd: &Path,
) -> Vec<String> {
    with_firmware(
        qemu_args_for(config, kernel, initrd, version_of(binary)),
        binary,
    )
}

fn with_firmware(mut args: Vec<String>, binary: &Path) -> Vec<String> {
    if let Some(dir) = private_firmware_dir(binary) {
        args.extend(["-L".to_string(), dir.display().to_string()]);
    }
    args
}

/// QEMU's command line for `config` on QEMU `version`, with this platform's work-arounds in
/// one place: shared memfd RAM (vhost-user needs it); before QEMU 8, `vectors=0` (7.2 under
/// TCG crashes in `msix_set_vector_notifiers` with vhost-user and MSI-X; 10.0 runs the
/// device with MSI-X); from 9.2 on, the chardev's `reconnect-ms=` (`reconnect=` is deprecated
/// there).
pub fn qemu_args_for(
    config: &GuestConfig,
    kernel: &Path,
    initrd: &Path,
    version: QemuVersion,
) -> Vec<String> {
    let append = kernel_cmdline(&config.ip, config.script.as_deref());
    let mut chardev = format!("socket,id=c0,path={}", config.socket.display());
    match (config.qemu_listens, config.reconnect) {
        (true, _) => chardev.push_str(",server=on,wait=off"),
        (false, Some(r)) if version >= (9, 2) => {
            chardev.push_str(&format!(",reconnect-ms={}", r * 1000))
        }
        (false, Some(r)) => chardev.push_str(&format!(",reconnect={r}")),
        (false, None) => {}
    }
    let vectors = if version < (8, 0) { ",vectors=0" } else { "" };
    let m = config.memory_mib;
    let pairs = config.queue_pairs.max(1);
    let (netdev, mq) = match pairs {
        1 => ("vhost-user,id=n0,chardev=c0".to_string(), String::new()),
        n => (
            format!("vhost-user,id=n0,chardev=c0,queues={n}"),
            ",mq=on".to_string(),
        ),
    };
    [
        "-machine",
        "q35",
        "-m",
        &format!("{m}M"),
        "-smp",
        &pairs.to_string(),
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-kernel",
        &kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        &append,
        "-object",
        &format!("memory-backend-memfd,id=mem,size={m}M,share=on"),
        "-numa",
        "node,memdev=mem",
        "-chardev",
        &chardev,
        "-netdev",
        &netdev,
        "-device",
        &format!(
            "virtio-net-pci,netdev=n0,mac={}{vectors}{mq}{}",
            config.mac, config.device_props
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((!config.allow_reboot).then(|| "-no-reboot".to_string()))
    .collect()
}

/// QEMU's command line for `config` with QEMU's own virtio-net backend on the tap device
/// `tap` (`-netdev tap,...,vhost=off`: this kernel has no vhost-net) in place of vhost-user.
/// Machine, memory and device stay as [`qemu_args`] makes them (`vectors=0` on QEMU 7.2), so a
/// guest on a tap and a guest on vhost-user differ only in the backend (`config.socket` and
/// `config.reconnect` are unused).
pub fn qemu_tap_args(config: &GuestConfig, tap: &str, kernel: &Path, initrd: &Path) -> Vec<String> {
    let mut args = qemu_args(config, kernel, initrd);
    if let Some(i) = args.iter().position(|a| a == "-chardev") {
        args.drain(i..i + 2);
    }
    if let Some(i) = args.iter().position(|a| a == "-netdev") {
        let queues = match config.queue_pairs.max(1) {
            1 => String::new(),
            n => format!(",queues={n}"),
        };
        args[i + 1] = format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off{queues}");
    }
    args
}

/// The test guest's kernel command line: its address (`addr/prefix`) and the script its init
/// runs (gzipped, then base64), for QEMU's `-append` or libvirt's `<cmdline>`.
pub fn kernel_cmdline(ip: &str, script: Option<&str>) -> String {
    let mut append = format!("console=ttyS0 quiet panic=-1 xvdpa.ip={ip}");
    if let Some(script) = script {
        append.push_str(&format!(
            " xvdpa.script={}",
            base64(&gzip(script.as_bytes()))
        ));
    }
    assert!(
        append.len() <= MAX_KERNEL_COMMAND_LINE,
        "the guest's kernel command line is {} bytes, over {MAX_KERNEL_COMMAND_LINE}: shorten the script",
        append.len()
    );
    append
}

/// `data` gzip-compressed by the host's gzip (the guest's init gunzips the script: test
/// scripts run to a few KiB, the kernel command line holds 2 KiB).
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip (Debian's gzip package) runs");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(data)
        .expect("writing to gzip");
    let out = child.wait_with_output().expect("gzip output");
    assert!(out.status.success(), "gzip failed");
    out.stdout
}

/// The longest kernel command line an x86 guest takes (COMMAND_LINE_SIZE, 2048, with its
/// terminating zero). A longer one does not fail: the guest hung right after "Probing EDD".
pub const MAX_KERNEL_COMMAND_LINE: usize = 2047;

/// Refuses QEMU arguments whose `-append` the guest kernel would cut short.
pub fn check_kernel_command_line(args: &[String]) -> Result<()> {
    if let Some(at) = args.iter().position(|a| a == "-append") {
        let len = args.get(at + 1).map_or(0, String::len);
        if len > MAX_KERNEL_COMMAND_LINE {
            bail!(
                "the guest's kernel command line is {len} bytes, over x86's {MAX_KERNEL_COMMAND_LINE}: \
                 shorten the guest script"
            );
        }
    }
    Ok(())
}

/// The md5 of a host file, as the guests' scripts print theirs (`md5sum`), to compare the
/// two ends of a transfer.
pub fn md5(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = std::process::Command::new("md5sum").arg(path).output()?;
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .context("md5sum output")?
        .to_string())
}

/// Standard base64 (the guest decodes it with busybox `base64 -d`).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub struct Guest {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    console: Arc<LineLog>,
}

impl Guest {
    /// Boots a guest (QEMU in the calling process's network namespace: the socket is a path).
    pub fn boot(config: &GuestConfig) -> Result<Guest> {
        Self::boot_on(&qemu_binary(), config)
    }

    /// [`Guest::boot`] on the QEMU at `binary`.
    pub fn boot_on(binary: &Path, config: &GuestConfig) -> Result<Guest> {
        let (kernel, initrd) = image()?;
        let args = qemu_args_on(binary, config, &kernel, &initrd);
        check_kernel_command_line(&args)?;
        let mut cmd = Command::new(binary);
        cmd.args(args);
        Self::spawn(cmd)
    }

    /// Starts a guest from a prepared QEMU command line (for instance one that runs QEMU in a
    /// namespace under `taskset`: `ip netns exec` and `taskset` exec QEMU, so the child is
    /// QEMU itself), with its serial console on the command's stdio.
    pub fn spawn(mut cmd: Command) -> Result<Guest> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context(
            "starting qemu-system-x86_64 (is QEMU installed? `cargo xtask test` installs it)",
        )?;
        let console = LineLog::capture(&mut child, "guest");
        let stdin = child.stdin.take();
        Ok(Guest {
            child: Some(child),
            stdin,
            console,
        })
    }

    /// The QEMU process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for a console line containing `needle`, failing early if QEMU exits.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_from(needle, 0, timeout)
    }

    /// Like [`Guest::wait_for`], considering only console lines from index `from` on.
    pub fn wait_for_from(
        &mut self,
        needle: &str,
        from: usize,
        timeout: Duration,
    ) -> Result<String> {
        match self
            .console
            .wait_for(needle, from, timeout, self.child.as_mut())?
        {
            Wait::Found(l) => Ok(l),
            Wait::TimedOut => bail!("guest console did not show {needle:?} within {timeout:?}"),
            Wait::Exited(status) => {
                bail!("QEMU exited ({status}) before the console showed {needle:?}")
            }
        }
    }

    /// Number of console lines so far (a starting point for [`Guest::wait_for_from`]).
    pub fn console_len(&self) -> usize {
        self.console.len()
    }

    /// Waits for the script's end marker and returns its exit code.
    pub fn wait_done(&mut self, timeout: Duration) -> Result<i32> {
        let line = self.wait_for(DONE_MARKER, timeout)?;
        let rc = line
            .split(DONE_MARKER)
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .context("malformed end marker")?;
        Ok(rc)
    }

    /// Types a command line into the guest's shell.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("guest console closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// The console output so far.
    pub fn console(&self) -> Vec<String> {
        self.console.lines()
    }

    /// Kills QEMU (SIGKILL), as a crash or an operator's `kill -9` would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while let Some(c) = self.child.as_mut() {
            if c.try_wait()?.is_some() {
                self.child = None;
                break;
            }
            if Instant::now() > deadline {
                bail!("QEMU still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{parse_qemu_version, qemu_args_for, qemu_tap_args, GuestConfig};

    fn sample_config() -> GuestConfig {
        GuestConfig {
            socket: "/tmp/vm0.sock".into(),
            mac: "52:54:00:12:34:56".into(),
            ip: "10.77.0.2/24".into(),
            memory_mib: 256,
            script: None,
            reconnect: Some(1),
            qemu_listens: false,
            allow_reboot: false,
            queue_pairs: 1,
            device_props: String::new(),
        }
    }

    #[test]
    fn tap_args_swap_only_the_backend() {
        let config = GuestConfig {
            device_props: ",csum=off".into(),
            ..sample_config()
        };
        let (k, i) = (Path::new("/k"), Path::new("/i"));
        let vhost = super::qemu_args(&config, k, i);
        let tap = qemu_tap_args(&config, "xvtap0", k, i);
        assert!(!tap
            .iter()
            .any(|a| a == "-chardev" || a.contains("vhost-user")));
        let netdev = tap.iter().position(|a| a == "-netdev").unwrap();
        assert_eq!(
            tap[netdev + 1],
            "tap,id=n0,ifname=xvtap0,script=no,downscript=no,vhost=off"
        );
        // Everything else, the device's properties included, is the vhost-user guest's.
        let rest = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|a| *a != "-chardev" && !a.starts_with("socket,") && !a.contains(",id=n0"))
                .cloned()
                .collect()
        };
        assert_eq!(rest(&vhost), rest(&tap));
        assert!(tap
            .iter()
            .any(|a| a.starts_with("virtio-net-pci,netdev=n0")));
    }

    #[test]
    fn the_command_line_follows_the_qemu_version() {
        let mut config = sample_config();
        let (k, i) = (Path::new("/k"), Path::new("/i"));
        let arg_after = |args: &[String], flag: &str| {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1].clone()
        };
        let old = qemu_args_for(&config, k, i, (7, 2));
        assert!(arg_after(&old, "-device").ends_with(",vectors=0"));
        assert!(arg_after(&old, "-chardev").ends_with(",reconnect=1"));
        let new = qemu_args_for(&config, k, i, (10, 0));
        assert!(!arg_after(&new, "-device").contains("vectors"));
        assert!(arg_after(&new, "-chardev").ends_with(",reconnect-ms=1000"));
        config.qemu_listens = true;
        let listening = qemu_args_for(&config, k, i, (10, 0));
        assert_eq!(
            arg_after(&listening, "-chardev"),
            "socket,id=c0,path=/tmp/vm0.sock,server=on,wait=off"
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some((10, 0))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"),
            Some((7, 2))
        );
        assert_eq!(parse_qemu_version("command not found"), None);
    }

    #[test]
    fn a_command_line_the_kernel_would_cut_is_refused() {
        let args = |n: usize| vec!["-append".to_string(), "x".repeat(n)];
        assert!(super::check_kernel_command_line(&args(2047)).is_ok());
        let err = super::check_kernel_command_line(&args(2048)).unwrap_err();
        assert!(err.to_string().contains("2048 bytes"), "{err}");
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(i.as_bytes()), o);
        }
    }
}
