//! `cargo xtask dist`: the Debian package an operator installs with `apt install ./xvdpa_*.deb`.
//!
//! The release daemon (the XDP program embedded, as every build has it), the systemd unit and
//! example config from `userspace/dist/`, the man page and bash/zsh/fish completions the
//! daemon writes from its own command line (`xvdpa generate-docs`), a control file and the
//! maintainer scripts that make and keep the `xvdpa` system user. Built with
//! `dpkg-deb --build`; no other packaging tool.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bootstrap::ensure_packages;
use crate::build;
use crate::say;
use crate::util::{output, run, workspace_root};

/// Packaging and checking the package: dpkg-deb, strip, and systemd-analyze for the unit.
pub const DIST_PACKAGES: &[(&str, &str)] = &[
    ("dpkg", "dpkg-deb"),
    ("binutils", "strip"),
    ("systemd", "systemd-analyze"),
];

/// Where each file goes in the installed system.
pub const BINARY: &str = "usr/bin/xvdpa";
pub const UNIT: &str = "usr/lib/systemd/system/xvdpa.service";
pub const CONFIG: &str = "etc/xvdpa.toml";
pub const MAN_PAGE: &str = "usr/share/man/man1/xvdpa.1.gz";
const EXAMPLE_CONFIG: &str = "usr/share/doc/xvdpa/examples/xvdpa.toml";
/// (file `xvdpa generate-docs` writes, where it goes)
pub const COMPLETIONS: [(&str, &str); 3] = [
    ("xvdpa.bash", "usr/share/bash-completion/completions/xvdpa"),
    ("_xvdpa", "usr/share/zsh/vendor-completions/_xvdpa"),
    (
        "xvdpa.fish",
        "usr/share/fish/vendor_completions.d/xvdpa.fish",
    ),
];

const POSTINST: &str = r#"#!/bin/sh
# The unit runs the daemon with --user xvdpa: a system user with no login and no home.
set -e
if [ "$1" = configure ] && ! getent passwd xvdpa >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "xvdpa daemon" xvdpa
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
"#;

/// `cargo xtask dist`: builds the release daemon and the package around it,
/// `target/dist/xvdpa_<version>_<arch>.deb`; returns its path.
pub fn dist() -> Result<PathBuf> {
    ensure_packages(DIST_PACKAGES)?;
    // The prebuilt object given by XVDPA_EBPF_OBJECT spares the nightly toolchain.
    let object = match std::env::var_os("XVDPA_EBPF_OBJECT") {
        Some(o) if Path::new(&o).is_file() => PathBuf::from(o),
        _ => build::build_ebpf()?,
    };
    say!("building the release daemon");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args(["build", "--release", "--package", "xvdpa", "--bin", "xvdpa"])
            .env("XVDPA_EBPF_OBJECT", &object),
    )
    .context("building the release daemon")?;
    package(
        &build::daemon_binary(true),
        &workspace_root().join("target/dist"),
    )
}

/// The suite's package (`cargo xtask test`): the same files, unit and maintainer scripts as
/// `dist`'s, around the debug daemon the suite has built already, in `target/dist/suite/` so
/// that it is never taken for the release package. What the package tests check (install,
/// files, the system user, the unit's start-up and hardening, purge) does not depend on the
/// compiler's optimisation, and the release build with fat LTO was two minutes of the suite.
pub fn suite_package(daemon: &Path) -> Result<PathBuf> {
    ensure_packages(DIST_PACKAGES)?;
    package(daemon, &workspace_root().join("target/dist/suite"))
}

/// Builds `xvdpa_<version>_<arch>.deb` in `out` around the daemon `binary`.
fn package(binary: &Path, out: &Path) -> Result<PathBuf> {
    let binary = binary.to_path_buf();
    let version = output(Command::new(&binary).arg("--version"))?
        .trim()
        .strip_prefix("xvdpa ")
        .context("xvdpa --version")?
        .to_string();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let stage = out.join("stage");
    let _ = fs::remove_dir_all(&stage);
    let dist = workspace_root().join("userspace/dist");

    install(&binary, &stage.join(BINARY), 0o755)?;
    // Debug symbols are most of the binary; a package ships without them.
    run(Command::new("strip")
        .arg("--strip-unneeded")
        .arg(stage.join(BINARY)))?;
    install(&dist.join("xvdpa.service"), &stage.join(UNIT), 0o644)?;
    install(&dist.join("xvdpa.toml"), &stage.join(CONFIG), 0o644)?;
    install(&dist.join("xvdpa.toml"), &stage.join(EXAMPLE_CONFIG), 0o644)?;

    let docs = out.join("docs");
    let _ = fs::remove_dir_all(&docs);
    run(Command::new(&binary).arg("generate-docs").arg(&docs))
        .context("writing the man page and completions")?;
    for (written, dest) in COMPLETIONS {
        install(&docs.join(written), &stage.join(dest), 0o644)?;
    }
    // gzip turns .../xvdpa.1 into MAN_PAGE, .../xvdpa.1.gz (-n: no timestamp inside).
    let page = stage.join(MAN_PAGE).with_extension("");
    install(&docs.join("xvdpa.1"), &page, 0o644)?;
    run(Command::new("gzip").args(["-9n", "-f"]).arg(&page))?;

    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let installed_kib = du_kib(&stage)?;
    write(
        &debian.join("control"),
        &format!(
            "Package: xvdpa\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: xvdpa maintainers <maintainers@invalid>\n\
             Installed-Size: {installed_kib}\n\
             Depends: libc6, passwd\n\
             Section: net\n\
             Priority: optional\n\
             Description: software vDPA datapath: vhost-user-net over XDP and AF_XDP\n \
             A vhost-user-net backend for QEMU guests whose datapath is an XDP program\n \
             steering frames by MAC into AF_XDP sockets. Runs as a systemd service that\n \
             drops root after start-up.\n"
        ),
        0o644,
    )?;
    write(&debian.join("conffiles"), &format!("/{CONFIG}\n"), 0o644)?;
    write(&debian.join("postinst"), POSTINST, 0o755)?;
    write(&debian.join("postrm"), POSTRM, 0o755)?;

    let deb = out.join(format!("xvdpa_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&stage)
        .arg(&deb))
    .context("dpkg-deb --build")?;
    say!("package built: {}", deb.display());
    Ok(deb)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Size of the tree under `dir` in KiB, as Installed-Size counts it.
fn du_kib(dir: &Path) -> Result<u64> {
    let out = output(Command::new("du").args(["-sk"]).arg(dir))?;
    match out.split_whitespace().next().map(str::parse) {
        Some(Ok(kib)) => Ok(kib),
        _ => bail!("du -sk {}: {out:?}", dir.display()),
    }
}
