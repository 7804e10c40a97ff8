//! Operator mistakes get a clear message and a non-zero exit, never a panic.

use std::time::Duration;

use anyhow::{ensure, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};

/// Runs the daemon with `args` and returns its output after it exits, which it must.
fn fails(netns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut d = Daemon::spawn_raw(netns, args)?;
    let status = d.wait_exit(Duration::from_secs(20))?;
    let out = d.output();
    ensure!(
        !status.success(),
        "expected failure for {args:?}, got {status}:\n{out}"
    );
    ensure!(
        !out.contains("panicked"),
        "the daemon panicked for {args:?}:\n{out}"
    );
    Ok(out)
}

#[test]
fn unknown_interface_is_named_in_the_error() -> Result<()> {
    let dir = socket_dir("cli-if")?;
    let sock = dir.join("vm0.sock");
    let out = fails(
        None,
        &[
            "--iface",
            "nosuchnic0",
            "--socket",
            sock.to_str().unwrap(),
            "--mac",
            "52:54:00:12:34:56",
        ],
    )?;
    ensure!(
        out.contains("nosuchnic0"),
        "error does not name the interface:\n{out}"
    );
    Ok(())
}

#[test]
fn invalid_macs_are_rejected_before_anything_starts() -> Result<()> {
    let dir = socket_dir("cli-mac")?;
    let sock = dir.join("vm0.sock");
    for mac in [
        "52:54:00:12:34",
        "zz:54:00:12:34:56",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "ff:ff:ff:ff:ff:ff",
    ] {
        let out = fails(
            None,
            &[
                "--iface",
                "lo",
                "--socket",
                sock.to_str().unwrap(),
                "--mac",
                mac,
            ],
        )?;
        ensure!(
            out.contains("--mac"),
            "error for {mac} does not point at --mac:\n{out}"
        );
    }
    ensure!(!sock.exists(), "a socket was created despite the bad MAC");
    Ok(())
}

#[test]
fn socket_path_held_by_a_live_daemon_is_refused_and_left_alone() -> Result<()> {
    let lab = Lab::unique("cli-sock")?;
    let dir = socket_dir("cli-sock")?;
    let sock = dir.join("vm0.sock");
    let first = Daemon::start(&lab, &sock, &mac_str(guest_mac(0)), &[])?;
    let out = fails(
        Some(&lab.host_ns),
        &[
            "--iface",
            "nic0",
            "--socket",
            sock.to_str().unwrap(),
            "--mac",
            &mac_str(guest_mac(1)),
        ],
    )?;
    ensure!(out.contains("in use"), "no 'in use' in:\n{out}");
    ensure!(
        sock.exists(),
        "the second daemon removed the first one's socket"
    );
    // The first daemon still serves.
    let fe = xvdpa_tests::frontend::VirtioNetFrontend::connect(&sock, Default::default())?;
    drop(fe);
    first.stop()?;
    Ok(())
}

#[test]
fn stale_socket_file_is_replaced() -> Result<()> {
    let lab = Lab::unique("cli-stale")?;
    let dir = socket_dir("cli-stale")?;
    let sock = dir.join("vm0.sock");
    // A socket nobody listens on, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&sock)?);
    ensure!(sock.exists());
    let d = Daemon::start(&lab, &sock, &mac_str(guest_mac(0)), &[])?;
    let fe = xvdpa_tests::frontend::VirtioNetFrontend::connect(&sock, Default::default())?;
    drop(fe);
    d.stop()?;
    Ok(())
}

#[test]
fn bad_flag_values_are_usage_errors() -> Result<()> {
    let out = fails(
        None,
        &[
            "--iface",
            "lo",
            "--socket",
            "/tmp/x.sock",
            "--mac",
            "52:54:00:12:34:56",
            "--mtu",
            "70000",
        ],
    )?;
    ensure!(out.contains("--mtu"), "{out}");
    let out = fails(
        None,
        &[
            "--iface",
            "lo",
            "--socket",
            "/tmp/x.sock",
            "--mac",
            "52:54:00:12:34:56",
            "--xdp-mode",
            "sideways",
        ],
    )?;
    ensure!(out.contains("--xdp-mode"), "{out}");
    Ok(())
}

#[test]
fn user_and_socket_group_mistakes_are_clear_errors() -> Result<()> {
    let dir = socket_dir("lperr")?;
    let sock = dir.join("vm0.sock");
    let bad_group = format!(
        "socket={},mac=52:54:00:12:34:56,socket-group=xvdpa-no-such-group",
        sock.display()
    );
    let out = fails(None, &["--iface", "lo", "--port", &bad_group])?;
    ensure!(
        out.contains("socket-group: no such group \"xvdpa-no-such-group\""),
        "{out}"
    );
    let bad_mode = format!(
        "socket={},mac=52:54:00:12:34:56,socket-mode=999",
        sock.display()
    );
    let out = fails(None, &["--iface", "lo", "--port", &bad_mode])?;
    ensure!(out.contains("expected octal permission bits"), "{out}");
    let out = fails(
        None,
        &["--iface", "lo", "--ctl-group", "xvdpa-no-such-group"],
    )?;
    ensure!(
        out.contains("--ctl-group") && out.contains("no such group \"xvdpa-no-such-group\""),
        "{out}"
    );
    let port = format!("socket={},mac=52:54:00:12:34:56", sock.display());
    let out = fails(
        None,
        &[
            "--iface",
            "lo",
            "--port",
            &port,
            "--user",
            "xvdpa-no-such-user",
        ],
    )?;
    ensure!(
        out.contains("--user: no such user \"xvdpa-no-such-user\""),
        "{out}"
    );
    // A group `--user` is not in: root could give it, the dropped daemon could not, so
    // start-up refuses it rather than leaving a port that fails later.
    let not_nobodys = format!(
        "socket={},mac=52:54:00:12:34:56,socket-group=root",
        sock.display()
    );
    let out = fails(
        None,
        &["--iface", "lo", "--port", &not_nobodys, "--user", "nobody"],
    )?;
    ensure!(
        out.contains("socket group root: --user nobody is not a member of it"),
        "{out}"
    );
    ensure!(!sock.exists(), "a socket was made before the error");
    Ok(())
}
