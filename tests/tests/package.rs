//! The Debian package `cargo xtask dist` builds, installed into a scratch root with
//! `dpkg-deb -x`: every file where the package says, the unit accepted by systemd-analyze,
//! the man page and completions generated from the command line, and the installed daemon
//! started from the scratch root on a lab with the shipped config, serving a VM as an
//! unprivileged user; and the maintainer script run in a mount namespace over a copy of
//! /etc, making the service user. Needs root and `$XVDPA_DEB` (`cargo xtask test` builds
//! the package and sets it).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab, NIC};

fn package() -> Result<PathBuf> {
    match std::env::var_os("XVDPA_DEB") {
        Some(p) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        _ => bail!("XVDPA_DEB does not name a package: build one with `cargo xtask dist` (`cargo xtask test` does and sets it)"),
    }
}

fn stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The package unpacked into a fresh directory, as `dpkg --root` would lay it out.
fn unpacked(tag: &str) -> Result<SocketDir> {
    let root = socket_dir(tag)?;
    stdout(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(package()?)
            .arg(&*root),
    )?;
    Ok(root)
}

#[test]
fn the_package_holds_the_daemon_unit_config_man_page_and_completions() -> Result<()> {
    let deb = package()?;
    let fields = stdout(
        Command::new("dpkg-deb")
            .arg("-f")
            .arg(&deb)
            .args(["Package", "Version", "Depends"]),
    )?;
    ensure!(fields.contains("Package: xvdpa"), "{fields}");
    let version = stdout(Command::new(xvdpa_tests::daemon::binary()).arg("--version"))?;
    ensure!(
        fields.contains(&format!(
            "Version: {}",
            version.trim().trim_start_matches("xvdpa ")
        )),
        "package {fields} for daemon {version}"
    );
    let control = socket_dir("pkgctl")?;
    stdout(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&*control))?;
    let conffiles = std::fs::read_to_string(control.join("conffiles"))?;
    ensure!(
        conffiles.trim() == "/etc/xvdpa.toml",
        "conffiles {conffiles:?}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    ensure!(
        postinst.contains("useradd --system"),
        "postinst:\n{postinst}"
    );

    let root = unpacked("pkgfiles")?;
    let bin = root.join("usr/bin/xvdpa");
    let mode = std::fs::metadata(&bin)?.permissions().mode();
    ensure!(mode & 0o777 == 0o755, "binary mode {mode:o}");
    // The installed binary runs and is this build's.
    ensure!(stdout(Command::new(&bin).arg("--version"))? == version);

    // The man page is the command line's, flags and subcommands included.
    let mut page = String::new();
    flate_read(&root.join("usr/share/man/man1/xvdpa.1.gz"), &mut page)?;
    for needle in [".TH xvdpa 1", "\\-\\-user", "\\-\\-port", "ctl"] {
        ensure!(page.contains(needle), "the man page lacks {needle:?}");
    }
    for (path, needle) in [
        ("usr/share/bash-completion/completions/xvdpa", "add-port"),
        ("usr/share/zsh/vendor-completions/_xvdpa", "#compdef xvdpa"),
        (
            "usr/share/fish/vendor_completions.d/xvdpa.fish",
            "socket-group",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(path)).with_context(|| path.to_string())?;
        ensure!(text.contains(needle), "{path} lacks {needle:?}");
    }

    // The unit starts the installed binary, unprivileged, hardened; systemd accepts it.
    let unit_path = "usr/lib/systemd/system/xvdpa.service";
    let unit = std::fs::read_to_string(root.join(unit_path))?;
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("no ExecStart")?;
    let program = exec.split_whitespace().next().unwrap_or_default();
    ensure!(
        program == "/usr/bin/xvdpa" && exec.contains("--user xvdpa"),
        "ExecStart={exec}"
    );
    ensure!(
        exec.contains("--config /etc/xvdpa.toml") && root.join("etc/xvdpa.toml").is_file(),
        "the config the unit reads is not in the package"
    );
    for line in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RuntimeDirectory=xvdpa",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF CAP_IPC_LOCK CAP_CHOWN CAP_SETUID CAP_SETGID CAP_SETPCAP",
    ] {
        ensure!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    systemd_accepts(&root, unit_path)?;
    Ok(())
}

fn flate_read(path: &Path, into: &mut String) -> Result<()> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .arg(path)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdout
        .take()
        .context("gzip stdout")?
        .read_to_string(into)?;
    ensure!(child.wait()?.success(), "gzip -dc {}", path.display());
    Ok(())
}

/// `systemd-analyze verify` on the unit inside `root`, with the host's own units beside it
/// (the targets it is ordered against), as on a system the package is installed on.
fn systemd_accepts(root: &Path, unit: &str) -> Result<()> {
    let units = Path::new("/usr/lib/systemd/system");
    for entry in std::fs::read_dir(units)? {
        let entry = entry?;
        let to = root.join("usr/lib/systemd/system").join(entry.file_name());
        if entry.file_type()?.is_file() && !to.exists() {
            std::fs::copy(entry.path(), to)?;
        }
    }
    let out = Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        .args(["--man=no", "verify"])
        .arg(Path::new("/").join(unit))
        .output()
        .context("systemd-analyze (Debian package systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    Ok(())
}

#[test]
fn the_installed_daemon_starts_from_the_package_with_its_config() -> Result<()> {
    let root = unpacked("pkgrun")?;
    let bin = root.join("usr/bin/xvdpa");
    let config = root.join("etc/xvdpa.toml");
    let lab = Lab::unique("pkg")?;
    let dir = socket_dir("pkgsock")?;
    let run = dir.join("run");
    let ctl = run.join("xvdpa.ctl");
    let socket = run.join("vm0.sock");
    let port = format!("socket={},mac={}", socket.display(), mac_str(guest_mac(0)));
    // systemd's RuntimeDirectory=xvdpa with RuntimeDirectoryMode=0755: made for root before
    // the daemon starts, named in $RUNTIME_DIRECTORY.
    std::fs::create_dir(&run)?;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
    let runtime_directory = format!("RUNTIME_DIRECTORY={}", run.display());
    // As the unit runs it, with the lab's NIC and a user that exists here (the package's
    // postinst makes `xvdpa`, which dpkg-deb -x does not run). `env` execs the daemon.
    let mut daemon = Daemon::spawn_binary(
        Path::new("env"),
        Some(&lab.host_ns),
        &[
            &runtime_directory,
            bin.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--iface",
            NIC,
            "--ctl",
            ctl.to_str().unwrap(),
            "--port",
            &port,
            "--user",
            "nobody",
        ],
    )?;
    daemon.wait_for_log("port ready for a frontend", Duration::from_secs(20))?;
    let log = daemon.output();
    ensure!(log.contains("dropped root"), "{log}");
    // The runtime directory is the daemon's user's now, with the mode the unit gave it.
    let meta = std::fs::metadata(&run)?;
    ensure!(
        (meta.uid(), meta.permissions().mode() & 0o7777) == (65534, 0o755),
        "runtime directory: uid {}, mode {:o}",
        meta.uid(),
        meta.permissions().mode()
    );

    let fe = VirtioNetFrontend::connect(&socket, FrontendOptions::default())?;
    let mut listed = String::new();
    for _ in 0..50 {
        listed = stdout(
            Command::new(&bin)
                .args(["ctl", "--ctl"])
                .arg(&ctl)
                .arg("list"),
        )?;
        if listed.contains("connected") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        listed.contains("connected") && listed.contains(&mac_str(guest_mac(0))),
        "the installed ctl lists {listed}"
    );
    drop(fe);
    let stats = Ctl::new(&ctl).stats()?;
    ensure!(stats["iface"] == NIC, "stats {stats}");
    daemon.stop()?;
    Ok(())
}

#[test]
fn the_maintainer_script_makes_the_service_user_once() -> Result<()> {
    let control = socket_dir("pkgpost")?;
    stdout(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(package()?)
            .arg(&*control),
    )?;
    let etc = control.join("etc");
    // A private mount namespace with a copy of /etc over the real one: the script runs as
    // dpkg would run it, and the host's user database is left untouched.
    let script = format!(
        "set -e; cp -a /etc {etc}; mount --bind {etc} /etc; \
         if getent passwd xvdpa; then echo the user exists already >&2; exit 3; fi; \
         sh {post} configure; sh {post} configure; \
         getent passwd xvdpa; id -gn xvdpa",
        etc = etc.display(),
        post = control.join("postinst").display()
    );
    let out = stdout(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script),
    )?;
    let mut lines = out.lines();
    let passwd = lines.next().unwrap_or_default();
    let fields: Vec<&str> = passwd.split(':').collect();
    ensure!(
        fields.first() == Some(&"xvdpa")
            && fields.get(5) == Some(&"/nonexistent")
            && fields.get(6) == Some(&"/usr/sbin/nologin")
            && fields
                .get(2)
                .and_then(|u| u.parse::<u32>().ok())
                .is_some_and(|u| u < 1000),
        "the service user: {passwd:?}"
    );
    ensure!(lines.next() == Some("xvdpa"), "its group: {out}");
    ensure!(
        !std::fs::read_to_string("/etc/passwd")?.contains("\nxvdpa:"),
        "the host's /etc/passwd was changed"
    );
    Ok(())
}
