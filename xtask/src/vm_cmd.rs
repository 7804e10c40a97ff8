//! `cargo xtask vm`: a test guest attached to the daemon, for trying xvdpa and reproducing bugs.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use xvdpa_tests::guest::{self, GuestConfig, DONE_MARKER};
use xvdpa_tests::lab::{guest_mac, mac_str};

use crate::run_cmd::{lab_daemon_args, let_child_handle_ctrl_c, spawn_daemon, LAB_SOCKET};
use crate::say;
use crate::{build, guest_image};

pub fn vm(cmd: Option<&str>, ip: &str, daemon_args: &[String]) -> Result<()> {
    let image = guest_image::ensure()?;
    // Current QEMU, unpacked from bookworm-backports (MSI-X works under TCG), unless
    // XVDPA_QEMU names one.
    let qemu = match std::env::var_os("XVDPA_QEMU") {
        Some(q) => PathBuf::from(q),
        None => crate::bootstrap::ensure_private_qemu()?,
    };
    let mut args = lab_daemon_args();
    if !daemon_args.is_empty() {
        args.extend(daemon_args.iter().cloned());
    }
    // A daemon already serving the lab socket is used as is (`cargo xtask run` in another
    // terminal); otherwise one is started for this VM and stopped after it.
    let mut started = None;
    if UnixStream::connect(LAB_SOCKET).is_err() {
        let bin = build::build(false)?;
        let lab = crate::lab_cmd::up(crate::lab_cmd::DEFAULT_LAB)?;
        std::fs::create_dir_all(PathBuf::from(LAB_SOCKET).parent().unwrap())?;
        say!(
            "starting the daemon in {}: xvdpa {}",
            lab.host_ns,
            args.join(" ")
        );
        started = Some(spawn_daemon(&bin, Some(&lab.host_ns), &args)?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !PathBuf::from(LAB_SOCKET).exists() {
            if Instant::now() > deadline {
                bail!("the daemon did not create {LAB_SOCKET}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        say!("using the daemon already serving {LAB_SOCKET}");
        // The probe above was a connection of its own; let the daemon see it end before
        // QEMU connects.
        std::thread::sleep(Duration::from_millis(200));
    }

    let config = GuestConfig {
        socket: PathBuf::from(LAB_SOCKET),
        mac: mac_str(guest_mac(0)),
        ip: ip.to_string(),
        memory_mib: 256,
        script: cmd.map(|c| c.to_string()),
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        queue_pairs: 1,
        device_props: String::new(),
    };
    let qemu_args = guest::qemu_args_on(&qemu, &config, &image.kernel, &image.initrd);
    say!("booting the test guest (QEMU, software emulation: a few seconds)");
    let result = if cmd.is_some() {
        let out = Command::new(&qemu)
            .args(&qemu_args)
            .stdin(std::process::Stdio::null())
            .output()
            .context("qemu-system-x86_64")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // Print what the command wrote: the lines between the guest's ready and end markers.
        let mut rc = None;
        let mut printing = false;
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(v) = line.split(DONE_MARKER).nth(1) {
                rc = v.trim().parse::<i32>().ok();
                break;
            } else if line.contains("XVDPA-READY") {
                printing = true;
            } else if printing {
                println!("{line}");
            }
        }
        match rc {
            Some(0) => Ok(()),
            Some(rc) => Err(anyhow::anyhow!("the command exited with {rc} in the guest")),
            None => Err(anyhow::anyhow!(
                "the guest did not finish the command ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    } else {
        eprintln!("(console: the guest's shell; `poweroff -f` ends the VM, Ctrl-A X kills QEMU)");
        let mut child = Command::new(&qemu)
            .args(&qemu_args)
            .spawn()
            .context("qemu-system-x86_64")?;
        let_child_handle_ctrl_c();
        child.wait().map(|_| ()).map_err(Into::into)
    };
    if let Some(mut d) = started {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
        let _ = d.wait();
    }
    result
}
