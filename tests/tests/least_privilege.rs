//! The daemon as operators run it: `--user` drops root after start-up and keeps only the
//! capabilities README names, and vhost-user sockets get the group and mode the operator
//! asks for. The daemon runs as `nobody`; the test (root) plays the VMs and checks what the
//! kernel reports about the process. Needs root; `cargo xtask test` runs it. Mistakes in
//! `--user` and `socket-group` are in `cli_errors.rs`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::frames::{test_frame, test_seq};
use xvdpa_tests::frontend::{FrontendOptions, VirtioNetFrontend, TX_QUEUE};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab, NIC};
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_NET_RAW: u64 = 1 << 13;
const CAP_BPF: u64 = 1 << 39;

/// What the running daemon keeps besides CAP_NET_RAW: CAP_BPF on kernels before 6.5, which
/// check it on every bpf(2) call (see `runtime::kept_capabilities`).
fn kept_for_maps() -> Result<u64> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut parts = release.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    Ok(if version < (6, 5) { CAP_BPF } else { 0 })
}

/// `Name:` of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {name} in /proc/{pid}/status"))
}

fn caps(pid: u32, set: &str) -> Result<u64> {
    Ok(u64::from_str_radix(&status_field(pid, set)?, 16)?)
}

/// Owner, group and permission bits of `path`.
fn access(path: &Path) -> Result<(u32, u32, u32)> {
    let m = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    Ok((m.uid(), m.gid(), m.permissions().mode() & 0o7777))
}

fn xdp_attached(lab: &Lab) -> Result<bool> {
    let out = lab.in_host("ip").args(["link", "show", NIC]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("xdp"))
}

fn vm(socket: &Path) -> Result<VirtioNetFrontend> {
    let mut fe = VirtioNetFrontend::connect(socket, FrontendOptions::default())?;
    fe.post_rx_buffers(64, 2048)?;
    // The worker's housekeeping timer (200 ms) guarantees an event even without traffic.
    std::thread::sleep(Duration::from_millis(300));
    Ok(fe)
}

/// A frame each way between the wire and the VM behind `socket`.
fn traffic_flows(
    wire: &WireSocket,
    wire_mac: [u8; 6],
    n: u8,
    socket: &Path,
    seq: u32,
) -> Result<()> {
    let mut fe = vm(socket)?;
    let down = test_frame(guest_mac(n), wire_mac, seq, 100);
    wire.send(&down)?;
    let got = fe.recv_frames(1, WAIT)?;
    ensure!(
        got.len() == 1 && got[0].1 == down,
        "the VM on {} did not get its frame from the wire",
        socket.display()
    );
    let up = test_frame(wire_mac, guest_mac(n), seq + 1, 100);
    fe.send(&up, 1, false)?;
    fe.kick(TX_QUEUE)?;
    let seen = wire.recv_until(WAIT, |g| g.iter().any(|f| test_seq(f) == Some(seq + 1)));
    ensure!(
        seen.iter().any(|f| test_seq(f) == Some(seq + 1)),
        "the wire did not get the frame the VM on {} sent",
        socket.display()
    );
    Ok(())
}

/// The `daemon` group, which `nobody` is not in.
const DAEMON_GROUP: u32 = 1;

/// Runs `xvdpa stats` against `ctl` as user nobody with group `gid` and no other groups
/// (a copy of the binary where nobody can run it); returns whether it succeeded, and its
/// output.
fn stats_as_nobody(ctl: &Path, gid: u32) -> Result<(bool, String)> {
    let dir = std::env::temp_dir().join(format!("xvdpa-lp-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let bin = dir.join("xvdpa");
    std::fs::copy(xvdpa_tests::daemon::binary(), &bin)?;
    let out = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ])
        .arg(&bin)
        .args(["stats", "--json", "--ctl"])
        .arg(ctl)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.context("running setpriv (util-linux)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn a_daemon_run_as_nobody_serves_adds_and_removes_ports_and_detaches_on_sigterm() -> Result<()> {
    let lab = Lab::unique("lp")?;
    let dir = socket_dir("lp")?;
    // A directory the daemon makes itself (the test's own is root's): it is handed to the
    // daemon's user so ports can be added and removed there after the drop.
    let run = dir.join("run");
    let first = run.join("vm0.sock");
    let ctl_path = run.join("ctl.sock");
    let port = format!(
        "socket={},mac={},socket-group=nogroup,socket-mode=0660",
        first.display(),
        mac_str(guest_mac(0))
    );
    let mut daemon = Daemon::spawn(
        &lab,
        &[
            "--ctl",
            ctl_path.to_str().unwrap(),
            "--port",
            &port,
            "--user",
            "nobody",
            "--ctl-group",
            "nogroup",
        ],
    )?;
    daemon.wait_for_log("port ready for a frontend", Duration::from_secs(20))?;
    let pid = daemon.pid().context("pid")?;

    // The kernel's word for it: every uid and gid is nobody's, and exactly the capabilities
    // README names are left, in every set that matters.
    for field in ["Uid", "Gid"] {
        let ids = status_field(pid, field)?;
        ensure!(
            ids.split_whitespace().all(|id| id == "65534"),
            "{field}: {ids}"
        );
    }
    // No CAP_NET_ADMIN: adaptive polling, the default, needs it only on a zero-copy NIC,
    // whose sockets busy polling can reach; the lab's veth is copy mode.
    let kept = CAP_NET_RAW | kept_for_maps()?;
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        let have = caps(pid, set)?;
        ensure!(have == kept, "{set} {have:016x}, expected {kept:016x}");
    }
    for set in ["CapInh", "CapAmb"] {
        ensure!(caps(pid, set)? == 0, "{set} is not empty");
    }
    ensure!(
        access(&run)? == (NOBODY, NOGROUP, 0o750),
        "socket directory {:?}",
        access(&run)?
    );
    ensure!(
        access(&first)? == (NOBODY, NOGROUP, 0o660),
        "port socket {:?}",
        access(&first)?
    );

    // `--ctl-group`: the control socket (made by root before the drop) is 0660 in that
    // group; a process in the group reads stats, one outside it is refused by the kernel.
    ensure!(
        access(&ctl_path)? == (0, NOGROUP, 0o660),
        "control socket {:?}",
        access(&ctl_path)?
    );
    let stats_as = |gid: u32| stats_as_nobody(&ctl_path, gid);
    let (ok, out) = stats_as(NOGROUP)?;
    ensure!(
        ok && out.contains("rx_packets"),
        "stats as a member of the ctl group: {out}"
    );
    let (ok, out) = stats_as(DAEMON_GROUP)?;
    ensure!(
        !ok && out.contains("ermission denied"),
        "stats from outside the ctl group: {out}"
    );

    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    traffic_flows(&wire, wire_mac, 0, &first, 100)?;

    // A port added at runtime, by the dropped daemon, works as the first one does.
    let ctl = Ctl::new(&ctl_path);
    let second = run.join("vm1.sock");
    ctl.cli(
        &["ctl"],
        &[
            "add-port",
            "--socket",
            second.to_str().unwrap(),
            "--mac",
            &mac_str(guest_mac(1)),
            "--socket-mode",
            "0600",
        ],
    )?;
    // add-port answers once the socket is there: a frontend can connect right away.
    ensure!(
        second.exists(),
        "add-port answered before the socket existed"
    );
    daemon.wait_for_count("port ready for a frontend", 2, WAIT)?;
    ensure!(
        access(&second)? == (NOBODY, NOGROUP, 0o600),
        "added port socket {:?}",
        access(&second)?
    );
    traffic_flows(&wire, wire_mac, 1, &second, 200)?;
    // Again after a reconnection: fresh AF_XDP sockets on the running daemon.
    traffic_flows(&wire, wire_mac, 1, &second, 300)?;

    // A group the daemon's user is not in: the request is refused and says why, and no
    // port is made.
    let third = run.join("vm2.sock");
    let reply = ctl.raw(&format!(
        r#"{{"cmd":"add-port","socket":"{}","mac":"{}","socket_group":"root"}}"#,
        third.display(),
        mac_str(guest_mac(2))
    ))?;
    ensure!(
        reply["ok"] == false
            && reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("socket group root") && e.contains("not a member")),
        "add-port with a group the daemon cannot give: {reply}"
    );
    let list = ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(
        list["ports"].as_array().map(Vec::len) == Some(2) && !third.exists(),
        "a refused port was made: {list}"
    );

    // A directory the daemon's user cannot write: the port cannot listen, so add-port
    // says why and leaves no port behind.
    let not_writable = dir.join("vm3.sock");
    let reply = ctl.raw(&format!(
        r#"{{"cmd":"add-port","socket":"{}","mac":"{}"}}"#,
        not_writable.display(),
        mac_str(guest_mac(3))
    ))?;
    ensure!(
        reply["ok"] == false
            && reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("ermission denied")),
        "add-port in a directory the daemon cannot write: {reply}"
    );
    let list = ctl.raw(r#"{"cmd":"list"}"#)?;
    ensure!(
        list["ports"].as_array().map(Vec::len) == Some(2),
        "a port that could not listen was left: {list}"
    );

    ctl.cli(&["ctl"], &["del-port", "1"])?;
    ensure!(!second.exists(), "the removed port's socket is still there");

    // SIGTERM: XDP detached and every socket gone, without root.
    ensure!(xdp_attached(&lab)?, "XDP is not attached while running");
    let log = daemon.stop()?;
    ensure!(
        log.contains("XDP steering detached"),
        "no detach in the log:\n{log}"
    );
    ensure!(!xdp_attached(&lab)?, "XDP is still attached after SIGTERM");
    let left: Vec<_> = std::fs::read_dir(&run)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(left.is_empty(), "left in the socket directory: {left:?}");
    Ok(())
}

#[test]
fn busy_poll_keeps_cap_net_admin_for_its_socket_options() -> Result<()> {
    let lab = Lab::unique("lpbp")?;
    let dir = socket_dir("lpbp")?;
    let run = dir.join("run");
    let socket = run.join("vm0.sock");
    let daemon = Daemon::start(
        &lab,
        &socket,
        &mac_str(guest_mac(0)),
        &["--user", "nobody", "--busy-poll"],
    )?;
    let pid = daemon.pid().context("pid")?;
    let have = caps(pid, "CapEff")?;
    ensure!(
        have == CAP_NET_RAW | CAP_NET_ADMIN | kept_for_maps()?,
        "CapEff {have:016x} with --busy-poll"
    );
    // A refused busy-polling socket option would fail the port's workers: no traffic.
    let wire = WireSocket::open(&lab)?;
    traffic_flows(&wire, lab.wire_mac()?, 0, &socket, 100)?;
    daemon.stop()?;
    Ok(())
}
