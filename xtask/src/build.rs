//! Builds the XDP program with the nightly toolchain, then the daemon that embeds it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::bootstrap::{self, EBPF_TOOLCHAIN};
use crate::say;
use crate::util::{run, toolchain_cargo, workspace_root};

/// Where the eBPF object lands.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("target/ebpf/bpfel-unknown-none/release/xvdpa-ebpf")
}

/// Where cargo puts the daemon: under CARGO_TARGET_DIR when that is set (relative to the
/// workspace root, where the build runs), else under target/.
pub fn daemon_binary(release: bool) -> PathBuf {
    let dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    };
    dir.join(if release { "release" } else { "debug" })
        .join("xvdpa")
}

pub fn build_ebpf() -> Result<PathBuf> {
    bootstrap::ensure_build_tools()?;
    let root = workspace_root();
    say!("building the XDP program (ebpf/, {EBPF_TOOLCHAIN}, bpfel-unknown-none)");
    run(toolchain_cargo(EBPF_TOOLCHAIN)
        .current_dir(root.join("ebpf"))
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("CARGO_TARGET_DIR", root.join("target/ebpf"))
        .env("LD_LIBRARY_PATH", bootstrap::llvm_library_path()?))
    .context("building the eBPF program")?;
    Ok(ebpf_object())
}

/// `cargo xtask build [--release]`: the daemon at target/{debug,release}/xvdpa.
pub fn build(release: bool) -> Result<PathBuf> {
    let object = build_ebpf()?;
    say!(
        "building the daemon ({})",
        if release { "release" } else { "debug" }
    );
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "xvdpa", "--bins"])
        .env("XVDPA_EBPF_OBJECT", &object);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building the daemon")?;
    Ok(daemon_binary(release))
}
