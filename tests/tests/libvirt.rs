//! A guest that libvirt defines and starts, on xvdpa through libvirt's own vhost-user
//! interface (`<interface type='vhostuser'>`, QEMU connecting as client), as an operator's
//! VM would run: libvirtd from Debian, QEMU as the unprivileged `libvirt-qemu` user, TCG.
//! The guest pings the wire through the daemon and powers off; libvirt starts it again with
//! a guest that stays up and keeps pinging while the daemon restarts under it (QEMU
//! reconnects), and `virsh destroy` and `undefine` end it. Needs root and libvirt;
//! `cargo xtask test` installs it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::guest::{self, DONE_MARKER};
use xvdpa_tests::lab::{self, guest_ip, guest_mac, mac_str, Lab, WIRE_IP};
use xvdpa_tests::libvirt::{self, Daemons, Domain, DomainConfig, QEMU_USER};

/// Printed by the guest's script once the wire answered its pings.
const PINGED: &str = "XVDPA-LIBVIRT-PINGED";
/// Printed by the second guest after each ping the wire answered.
const ALIVE: &str = "XVDPA-LIBVIRT-ALIVE";
const BOOT: Duration = Duration::from_secs(60);

/// The guest kernel's command line for the test guest's /init (see `guest::qemu_args`).
fn cmdline(script: &str) -> String {
    guest::kernel_cmdline(&format!("{}/{}", guest_ip(0), lab::PREFIX), Some(script))
}

/// Starts the daemon with the guest's port, its socket in group `libvirt-qemu` (mode 0660,
/// the default) so that QEMU, running as that user, can connect and nobody else can. The
/// daemon sets the group itself, before the socket appears under its name.
fn start_daemon(lab: &Lab, socket: &Path, mac: [u8; 6]) -> Result<Daemon> {
    let spec = Daemon::port_spec(socket, mac, &format!(",socket-group={QEMU_USER}"));
    let ctl = socket.with_file_name("ctl.sock");
    let daemon = Daemon::start_specs(lab, &ctl, &[spec], &[])?;
    let meta = std::fs::metadata(socket)?;
    let gid = libvirt::id_of("group", QEMU_USER)?;
    ensure!(
        meta.gid() == gid && meta.mode() & 0o777 == 0o660,
        "{}: gid {} mode {:o}, wanted gid {gid} ({QEMU_USER}) mode 660",
        socket.display(),
        meta.gid(),
        meta.mode() & 0o777
    );
    Ok(daemon)
}

#[test]
fn libvirt_guest_reaches_the_wire_through_xvdpa() -> Result<()> {
    let started = Instant::now();
    libvirt::require_installed()?;
    let (kernel, initrd) = guest::image()?;
    let lab = Lab::unique("lv")?;
    let dir = socket_dir("libvirt")?;
    // libvirt-qemu must reach into the directory; QEMU reads the kernel from there too (a
    // copy: libvirt relabels the files it boots from while the domain runs).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let (kernel_copy, initrd_copy) = (dir.join("vmlinux"), dir.join("initrd.gz"));
    std::fs::copy(&kernel, &kernel_copy)?;
    std::fs::copy(&initrd, &initrd_copy)?;
    let _daemons = Daemons::ensure(&dir)?;

    let socket = dir.join("vm0.sock");
    let mac = mac_str(guest_mac(0));
    let mut daemon = start_daemon(&lab, &socket, guest_mac(0))?;

    let mut config = DomainConfig {
        name: format!("xvdpa-test-{}", std::process::id()),
        uuid: None,
        memory_mib: 256,
        kernel: kernel_copy,
        initrd: initrd_copy,
        cmdline: cmdline(&format!("ping -c 3 -W 5 {WIRE_IP} && echo {PINGED}")),
        mac: mac.clone(),
        socket: socket.clone(),
        reconnect: None,
        console_log: dir.join("console.log"),
        // Debian's QEMU 7.2 under TCG needs legacy interrupts with vhost-user.
        legacy_interrupts: true,
    };
    let domain = Domain::define(&config, &dir.join("domain.xml"))?;

    // First boot: the guest pings, its script ends and it powers off; libvirt sees it stop.
    domain.start()?;
    domain.wait_console(PINGED, 0, BOOT)?;
    let done = domain.wait_console(DONE_MARKER, 0, Duration::from_secs(20))?;
    ensure!(done.contains("rc=0"), "guest script failed: {done}");
    domain.wait_state("shut off", Duration::from_secs(20))?;
    daemon.wait_for_count("frontend disconnected", 1, Duration::from_secs(10))?;
    // The replies came through the XDP program and the port's queue, the requests out of it.
    let steered = daemon.counter_reaching("steered", 3)?;
    let rx = daemon.counter_reaching("rx_packets", 3)?;
    let tx = daemon.counter_reaching("tx_packets", 3)?;
    ensure!(
        steered >= 3 && rx >= 3 && tx >= 3,
        "counters after the pings: steered={steered} rx_packets={rx} tx_packets={tx}"
    );

    // Second boot of the same domain, redefined with a guest that stays up and pings every
    // second: libvirt's QEMU connects again to the same port. The daemon is then restarted
    // under the running guest; QEMU reconnects (`<reconnect>`) and the pings come back
    // through the new daemon. `virsh destroy` ends the guest.
    config.reconnect = Some(1);
    config.cmdline = cmdline(&format!(
        "while true; do ping -c 1 -W 1 {WIRE_IP} >/dev/null && echo {ALIVE}; sleep 1; done"
    ));
    domain.redefine(&config, &dir.join("domain.xml"))?;
    let from = domain.console().len();
    domain.start()?;
    domain.wait_console(ALIVE, from, BOOT)?;

    daemon.stop()?;
    let mut daemon = start_daemon(&lab, &socket, guest_mac(0))?;
    daemon.wait_for_log("frontend connected", Duration::from_secs(20))?;
    let from = domain.console().len();
    domain.wait_console(ALIVE, from, Duration::from_secs(30))?;
    let rx = daemon.counter_reaching("rx_packets", 1)?;
    let tx = daemon.counter_reaching("tx_packets", 1)?;
    ensure!(
        rx >= 1 && tx >= 1,
        "after the restart: rx_packets={rx} tx_packets={tx}"
    );

    domain.destroy()?;
    domain.wait_state("shut off", Duration::from_secs(10))?;
    daemon.wait_for_count("frontend disconnected", 1, Duration::from_secs(10))?;
    libvirt::virsh(&["undefine", &domain.name])?;
    let all = libvirt::virsh(&["list", "--all", "--name"])?;
    ensure!(
        !all.lines().any(|l| l.trim() == domain.name),
        "{} still defined: {all}",
        domain.name
    );

    let log = daemon.stop()?;
    ensure!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    eprintln!("libvirt test took {:?}", started.elapsed());
    Ok(())
}
