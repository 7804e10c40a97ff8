//! `cargo xtask run`: the daemon, on the lab by default.

use std::path::Path;
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};
use xvdpa_tests::lab::{self, guest_mac, mac_str, Lab};

use crate::build;
use crate::say;
use crate::util::is_root;

pub const LAB_SOCKET: &str = "/run/xvdpa/vm0.sock";

/// The daemon arguments `cargo xtask run` uses on the lab.
pub fn lab_daemon_args() -> Vec<String> {
    [
        "--iface",
        lab::NIC,
        "--socket",
        LAB_SOCKET,
        "--mac",
        &mac_str(guest_mac(0)),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts the daemon binary, inside `netns` if given.
pub fn spawn_daemon(bin: &Path, netns: Option<&str>, args: &[String]) -> Result<Child> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args);
    cmd.spawn().with_context(|| format!("starting {cmd:?}"))
}

/// The daemon's control socket for a port socket (its default: next to it).
fn ctl_path(socket: &str) -> std::path::PathBuf {
    std::path::Path::new(socket).with_file_name("xvdpa.ctl")
}

/// The command line an operator adds to their own VM, for the lab's port.
pub fn print_qemu_hint(socket: &str, mac: &str) {
    let lines = [
        "attach a VM with (guest RAM must be shared with the daemon):".to_string(),
        String::new(),
        "  qemu-system-x86_64 -machine q35 -m 1G \\".to_string(),
        "    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\".to_string(),
        format!("    -chardev socket,id=c0,path={socket} \\"),
        "    -netdev vhost-user,id=n0,chardev=c0 \\".to_string(),
        format!("    -device virtio-net-pci,netdev=n0,mac={mac} \\"),
        "    <your disk or -kernel/-initrd>".to_string(),
        String::new(),
        "(QEMU 7.2 under TCG crashes with vhost-user and MSI-X: there add vectors=0 to the device; QEMU 10 and KVM need nothing.)".to_string(),
        format!("In the guest: ip link set eth0 up; ip addr add {}/{} dev eth0; ping {}", lab::guest_ip(0), lab::PREFIX, lab::WIRE_IP),
        "Or boot the ready-made test guest: cargo xtask vm".to_string(),
        format!(
            "Ports and counters at runtime: target/debug/xvdpa ctl --ctl {} list | add-port ... | del-port ...; target/debug/xvdpa stats --ctl {} --watch 1",
            ctl_path(socket).display(),
            ctl_path(socket).display()
        ),
    ];
    for l in lines {
        eprintln!("{l}");
    }
}

/// Ignores SIGINT in xtask itself so Ctrl-C reaches the daemon and xtask waits for its clean
/// shutdown (XDP detached, socket removed).
pub fn let_child_handle_ctrl_c() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

pub fn run(release: bool, daemon_args: &[String]) -> Result<()> {
    let bin = build::build(release)?;
    if !daemon_args.is_empty() {
        say!("starting {} {}", bin.display(), daemon_args.join(" "));
        let mut child = spawn_daemon(&bin, None, daemon_args)?;
        let_child_handle_ctrl_c();
        let status = child.wait()?;
        if !status.success() {
            bail!("xvdpa exited with {status}");
        }
        return Ok(());
    }
    if !is_root() {
        bail!("the lab needs root: run `cargo xtask run` as root, or pass your own daemon arguments after `--`");
    }
    let lab: Lab = crate::lab_cmd::up(crate::lab_cmd::DEFAULT_LAB)?;
    std::fs::create_dir_all(Path::new(LAB_SOCKET).parent().unwrap())?;
    let args = lab_daemon_args();
    say!(
        "starting the daemon in namespace {}: xvdpa {}",
        lab.host_ns,
        args.join(" ")
    );
    print_qemu_hint(LAB_SOCKET, &mac_str(guest_mac(0)));
    let mut child = spawn_daemon(&bin, Some(&lab.host_ns), &args)?;
    let_child_handle_ctrl_c();
    let status = child.wait()?;
    say!("daemon stopped ({status}); the lab stays up: `cargo xtask lab down` removes it");
    if !status.success() {
        bail!("xvdpa exited with {status}");
    }
    Ok(())
}
