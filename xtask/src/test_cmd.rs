//! `cargo xtask test`: everything, as CI runs it.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::bootstrap::{
    ensure_packages, ensure_private_qemu, BUILD_PACKAGES, LIBVIRT_PACKAGES, PEER_PACKAGES,
    SYSTEMD_PACKAGES, VM_PACKAGES,
};
use crate::say;
use crate::util::{is_root, output, run, workspace_root};
use crate::{build, dist_cmd, fuzz_cmd, guest_image};

/// How long the suite runs each fuzz target (`cargo xtask fuzz` runs them longer).
const FUZZ_SECONDS: u64 = 10;

/// Removes namespaces that test labs of an earlier, interrupted run left behind.
fn remove_stale_test_labs() -> Result<()> {
    let list = output(Command::new("ip").args(["netns", "list"]))?;
    for ns in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("xvt"))
    {
        say!("removing stale test namespace {ns}");
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    Ok(())
}

pub fn test(cargo_args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the suite needs root (namespaces, XDP, AF_XDP, QEMU with vhost-user): run `cargo xtask test` as root");
    }
    ensure_packages(BUILD_PACKAGES)?;
    ensure_packages(VM_PACKAGES)?;
    ensure_packages(PEER_PACKAGES)?;
    ensure_packages(LIBVIRT_PACKAGES)?;
    ensure_packages(SYSTEMD_PACKAGES)?;
    let daemon = build::build(false)?;
    // The package tests install and start (tests/tests/package.rs, systemd_unit.rs).
    let package = dist_cmd::suite_package(&daemon)?;
    let image = guest_image::ensure()?;
    // The guests run on current QEMU; the system's (Debian stable's 7.2) stays for the test
    // that keeps it working (XVDPA_QEMU_STABLE).
    let qemu = ensure_private_qemu()?;
    remove_stale_test_labs()?;
    let fuzz_build = fuzz_cmd::BackgroundBuild::start()?;
    say!("running the test suite");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(["test", "--workspace"])
        .args(cargo_args)
        .env("XVDPA_EBPF_OBJECT", build::ebpf_object())
        .env("XVDPA_BIN", &daemon)
        .env("XVDPA_DEB", &package)
        .env("XVDPA_GUEST_KERNEL", &image.kernel)
        .env("XVDPA_GUEST_INITRD", &image.initrd)
        .env("XVDPA_QEMU", &qemu)
        .env("XVDPA_QEMU_STABLE", "qemu-system-x86_64")
        // The tests return anyhow errors; with a backtrace captured (RUST_BACKTRACE set, as CI
        // does) each message comes with 30 frames after it, and a log's tail shows the frames
        // and not the message. Panics still honour RUST_BACKTRACE.
        .env("RUST_LIB_BACKTRACE", "0");
    run(&mut cmd).context("the test suite failed")?;
    // Every fuzz target for a short while over its committed corpus; a crash fails the suite.
    say!("fuzzing each target for {FUZZ_SECONDS} s");
    fuzz_build.run_targets(fuzz_cmd::TARGETS, FUZZ_SECONDS)?;
    say!("all tests passed");
    Ok(())
}
