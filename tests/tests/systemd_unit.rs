//! xvdpa's systemd unit under a live systemd, in one sequence as an operator goes through it:
//! the Debian package `cargo xtask dist` builds installed with `dpkg -i` on a booted system
//! (the host's own root as a throw-away container, tests/src/systemd.rs, in a lab's host
//! namespace), the service started with the shipped config (refused: its NIC is not there),
//! the config edited, the service started again, the daemon checked to run as the user
//! `xvdpa` with only the capabilities README names, a real guest on the host pinging the wire
//! through the socket the unit's runtime directory holds, an operator in group `xvdpa` using
//! the control socket, and `systemctl stop` detaching XDP and leaving no socket behind.
//! Needs root, `$XVDPA_DEB`, QEMU and the guest image (`cargo xtask test` provides them all,
//! `systemd-nspawn` included).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use xvdpa_tests::guest::{Guest, GuestConfig};
use xvdpa_tests::lab::{self, guest_ip, guest_mac, mac_str, Lab, NIC};
use xvdpa_tests::systemd::Container;

const BOOT: Duration = Duration::from_secs(60);
const GUEST: Duration = Duration::from_secs(60);
const VM_SOCKET: &str = "/run/xvdpa/vm0.sock";

fn package() -> Result<PathBuf> {
    match std::env::var_os("XVDPA_DEB") {
        Some(p) if Path::new(&p).is_file() => Ok(PathBuf::from(p)),
        _ => bail!("XVDPA_DEB does not name a package: build one with `cargo xtask dist` (`cargo xtask test` does and sets it)"),
    }
}

/// `systemctl is-active xvdpa` (it exits non-zero for every state but active).
fn state(machine: &Container) -> Result<String> {
    let out = machine
        .command("systemctl")
        .args(["is-active", "xvdpa"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn journal(machine: &Container) -> Result<String> {
    machine.run(
        "journalctl",
        &["--unit", "xvdpa", "--no-pager", "--output", "cat"],
    )
}

/// The journal's last lines, for a failure message short enough to read in a CI log.
fn journal_tail(machine: &Container) -> String {
    match journal(machine) {
        Ok(all) => {
            let lines: Vec<&str> = all.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        }
        Err(e) => format!("(journal unreadable: {e:#})"),
    }
}

/// Waits for `text` in the unit's journal. journald reads the daemon's output stream on its
/// own schedule, so a line the daemon wrote just before it exited can reach the journal
/// after `systemctl stop` has returned.
fn journal_shows(machine: &Container, text: &str) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if journal(machine)?.contains(text) {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether the lab's NIC has an XDP program attached.
fn xdp_attached(lab: &Lab) -> Result<bool> {
    let out = lab::run(lab.in_host("ip").args(["-details", "link", "show", NIC]))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
}

/// `Name:` of /proc/PID/status, for a process of the container.
fn status_field(machine: &Container, pid: &str, name: &str) -> Result<String> {
    let path = machine.path(&format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {name} in {}", path.display()))
}

#[test]
fn the_packaged_unit_serves_a_guest_under_a_live_systemd() -> Result<()> {
    let started = Instant::now();
    let deb = package()?;
    let lab = Lab::unique("sd")?;
    let mut machine = Container::boot(&lab, BOOT)?;
    eprintln!("booted in {:?}", started.elapsed());

    // Install. The man-db trigger rebuilds its whole index otherwise (10 s here); this is
    // what `man-db/auto-update false` in debconf does.
    let _ = std::fs::remove_file(machine.path("/var/lib/man-db/auto-update"));
    std::fs::copy(&deb, machine.path("/root/xvdpa.deb"))?;
    machine.run("dpkg", &["--install", "/root/xvdpa.deb"])?;
    let passwd = machine.run("getent", &["passwd", "xvdpa"])?;
    let uid = passwd.split(':').nth(2).context("uid")?.to_string();
    // The postinst reloaded systemd: the unit is loaded, and left for the operator to enable.
    let enabled = machine
        .command("systemctl")
        .args(["is-enabled", "xvdpa"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&enabled.stdout).trim() == "disabled",
        "is-enabled: {}",
        String::from_utf8_lossy(&enabled.stdout)
    );

    // Started before the config is edited: its iface (eth0) is not on this machine, and
    // `systemctl start` itself says the start failed.
    let config = machine.path("/etc/xvdpa.toml");
    let shipped = std::fs::read_to_string(&config)?;
    ensure!(shipped.contains("\niface = \"eth0\"\n"), "{shipped}");
    let first = machine
        .command("systemctl")
        .args(["start", "xvdpa"])
        .output()?;
    ensure!(
        !first.status.success(),
        "`systemctl start xvdpa` succeeded with iface = \"eth0\", which this machine lacks \
         (state now {:?}); the journal:\n{}",
        state(&machine)?,
        journal_tail(&machine)
    );
    ensure!(
        journal_shows(&machine, "no network interface named \"eth0\"")?,
        "the journal does not say why the start failed:\n{}",
        journal_tail(&machine)
    );
    // Restart=on-failure keeps trying; the operator stops that and clears the failure (if
    // the unit is still loaded: it may be gone from memory once stopped, hence no check).
    machine.run("systemctl", &["stop", "xvdpa"])?;
    let _ = machine
        .command("systemctl")
        .args(["reset-failed", "xvdpa"])
        .output()?;

    // The operator's edit: the lab's NIC, a VM's port, the control socket for group xvdpa.
    let edited = shipped
        .replace("\niface = \"eth0\"\n", &format!("\niface = \"{NIC}\"\n"))
        .replace("# ctl_group = \"xvdpa\"", "ctl_group = \"xvdpa\"")
        + &format!(
            "\n[[port]]\nsocket = \"{VM_SOCKET}\"\nmac = \"{}\"\n",
            mac_str(guest_mac(0))
        );
    std::fs::write(&config, edited)?;
    machine.run("systemctl", &["start", "xvdpa"])?;
    // Started means ready: the config's ports exist when `systemctl start` returns, which is
    // what libvirt, ordered after the unit, relies on when it starts its domains.
    let socket = machine.path(VM_SOCKET);
    ensure!(
        socket.exists(),
        "`systemctl start xvdpa` returned before {VM_SOCKET} existed; the journal:\n{}",
        journal_tail(&machine)
    );
    ensure!(state(&machine)? == "active");
    ensure!(xdp_attached(&lab)?, "no XDP program on {NIC}");

    // The daemon as the unit runs it: the xvdpa user, only the capabilities it keeps.
    let pid = machine.run(
        "systemctl",
        &["show", "--property", "MainPID", "--value", "xvdpa"],
    )?;
    let pid = pid.trim();
    let uids = status_field(&machine, pid, "Uid")?;
    ensure!(
        uids.split_whitespace().all(|u| u == uid),
        "Uid: {uids}, the xvdpa user is {uid}"
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let kept = xvdpa::runtime::kept_capabilities(false, &release)
        .iter()
        .fold(0u64, |m, c| m | 1 << c.bit);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let have = u64::from_str_radix(&status_field(&machine, pid, set)?, 16)?;
        ensure!(have == kept, "{set} {have:016x}, expected {kept:016x}");
    }
    for set in ["CapInh", "CapAmb"] {
        ensure!(
            status_field(&machine, pid, set)? == "0000000000000000",
            "{set} not empty"
        );
    }
    ensure!(status_field(&machine, pid, "NoNewPrivs")? == "1");

    // A guest on the host, connected through the container's runtime directory.
    let mut guest = Guest::boot(&GuestConfig {
        socket: socket.clone(),
        mac: mac_str(guest_mac(0)),
        ip: format!("{}/{}", guest_ip(0), lab::PREFIX),
        memory_mib: 256,
        script: Some(format!(
            "ping -c 3 -W 5 {w} || exit 11\necho XVDPA-PINGED\nread go\n",
            w = lab::WIRE_IP
        )),
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        device_props: String::new(),
        queue_pairs: 1,
    })?;
    guest.wait_for("XVDPA-PINGED", GUEST)?;
    // An operator in group xvdpa (ctl_group) sees the guest's port connected.
    machine.run(
        "useradd",
        &["--no-create-home", "--groups", "xvdpa", "xvdpa-op"],
    )?;
    let listed = machine.run("runuser", &["-u", "xvdpa-op", "--", "xvdpa", "ctl", "list"])?;
    ensure!(
        listed.contains("connected") && listed.contains(&mac_str(guest_mac(0))),
        "ctl list as a member of ctl_group: {listed}"
    );
    guest.send_line("go")?;
    ensure!(guest.wait_done(GUEST)? == 0, "the guest's script failed");
    guest.wait_exit(GUEST)?;

    // Stopped: XDP detached, the runtime directory and its sockets gone, a clean exit.
    machine.run("systemctl", &["stop", "xvdpa"])?;
    let after_stop = state(&machine)?;
    ensure!(
        after_stop == "inactive",
        "after stop the unit is {after_stop:?}; the journal ends:\n{}",
        journal_tail(&machine)
    );
    ensure!(
        !xdp_attached(&lab)?,
        "XDP still attached after systemctl stop; the journal ends:\n{}",
        journal_tail(&machine)
    );
    ensure!(
        !machine.path("/run/xvdpa").exists(),
        "/run/xvdpa left behind"
    );
    ensure!(
        journal_shows(&machine, "XDP steering detached")?,
        "the journal does not say XDP was detached; it ends:\n{}",
        journal_tail(&machine)
    );
    machine.shut_down(Duration::from_secs(20))?;
    eprintln!("the whole sequence took {:?}", started.elapsed());
    Ok(())
}
