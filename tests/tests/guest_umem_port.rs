//! A port that asks for its guest's memory as the NIC queue's UMEM (`guest-umem=on`): the
//! NIC is its alone, `ctl list` says which path it takes, and a guest whose memory cannot be
//! registered falls back to the copy path with one log line and keeps its traffic.
//! Needs root (namespaces, XDP); `cargo xtask test` runs it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::{test_frame, test_seq};
use xvdpa_tests::frontend::{FrontendOptions, RawDesc, VirtioNetFrontend, RX_QUEUE, TX_QUEUE};
use xvdpa_tests::lab::{guest_mac, Lab};
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);

struct Setup {
    lab: Lab,
    daemon: Daemon,
    socket: PathBuf,
    _dir: SocketDir,
}

/// A daemon whose only port (guest 0) asks for guest memory, started with `--port`.
fn guest_umem_daemon(tag: &str, extra: &[&str]) -> Result<Setup> {
    guest_umem_daemon_with(tag, "", extra)
}

/// [`guest_umem_daemon`] with more port settings (`,key=value...`).
fn guest_umem_daemon_with(tag: &str, port_settings: &str, extra: &[&str]) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let socket = dir.join("vm0.sock");
    let spec = Daemon::port_spec(
        &socket,
        guest_mac(0),
        &format!(",guest-umem=on{port_settings}"),
    );
    let daemon = Daemon::start_specs(&lab, &dir.join("ctl.sock"), &[spec], extra)?;
    Ok(Setup {
        lab,
        daemon,
        socket,
        _dir: dir,
    })
}

/// The port `index` of `ctl list --json`.
fn listed_port(s: &Setup, index: u64) -> Result<Value> {
    let reply = s.daemon.ctl()?.raw(r#"{"cmd":"list"}"#)?;
    reply["ports"]
        .as_array()
        .context("list reply without ports")?
        .iter()
        .find(|p| p["index"] == index)
        .cloned()
        .with_context(|| format!("port {index} not listed: {reply}"))
}

fn add_port_error(ctl: &Path, request: &str) -> Result<String> {
    let reply = xvdpa_tests::ctl::Ctl::new(ctl).raw(request)?;
    ensure!(reply["ok"] == false, "accepted: {reply}");
    Ok(reply["error"].as_str().unwrap_or_default().to_string())
}

/// Frames both ways between the wire and the frontend's guest.
fn traffic_flows(s: &Setup, fe: &mut VirtioNetFrontend) -> Result<()> {
    let wire = WireSocket::open(&s.lab)?;
    let wire_mac = s.lab.wire_mac()?;
    fe.post_rx_buffers(64, 2048)?;
    // On the single-copy path a frame finds a buffer only once the worker put the guest's
    // buffers on the fill ring, in its round after the kick (or its 200 ms tick).
    std::thread::sleep(Duration::from_millis(300));
    let frames: Vec<Vec<u8>> = [60usize, 1514]
        .iter()
        .enumerate()
        .map(|(i, &len)| test_frame(guest_mac(0), wire_mac, i as u32 + 1, len))
        .collect();
    for f in &frames {
        wire.send(f)?;
    }
    let got = fe.recv_frames(frames.len(), WAIT)?;
    ensure!(
        got.iter().map(|(_, f)| f).eq(frames.iter()),
        "the guest received {} of {} frames, or others",
        got.len(),
        frames.len()
    );
    let out = test_frame(wire_mac, guest_mac(0), 77, 1000);
    fe.send(&out, 1, false)?;
    fe.kick(TX_QUEUE)?;
    let seen = wire.recv_until(WAIT, |g| g.iter().any(|x| x == &out));
    ensure!(
        seen.iter().any(|x| x == &out),
        "the guest's frame did not reach the wire"
    );
    Ok(())
}

#[test]
fn a_guest_memory_port_has_the_nic_to_itself() -> Result<()> {
    let s = guest_umem_daemon("gu-own", &[])?;
    let ctl = s.socket.with_file_name("ctl.sock");
    let port = listed_port(&s, 0)?;
    ensure!(port["guest_umem"] == true, "{port}");
    let other = s.socket.with_file_name("vm1.sock");
    let err = add_port_error(
        &ctl,
        &format!(
            r#"{{"cmd":"add-port","socket":"{}","mac":"52:54:00:00:00:02"}}"#,
            other.display()
        ),
    )?;
    ensure!(
        err.contains("dedicated to port") && err.contains("vm0.sock"),
        "{err}"
    );
    s.daemon.stop()?;

    // Two ports given at start-up, one asking for guest memory: refused before XDP.
    let lab = Lab::unique("gu-two")?;
    let dir = socket_dir("gu-two")?;
    let mut d = Daemon::spawn(
        &lab,
        &[
            "--ctl",
            dir.join("ctl.sock").to_str().context("path")?,
            "--port",
            &Daemon::port_spec(&dir.join("a.sock"), guest_mac(0), ",guest-umem=on"),
            "--port",
            &Daemon::port_spec(&dir.join("b.sock"), guest_mac(1), ""),
        ],
    )?;
    let status = d.wait_exit(Duration::from_secs(10))?;
    ensure!(
        !status.success(),
        "started with two ports on a dedicated NIC"
    );
    ensure!(
        d.output().contains("no other port can share its queues"),
        "{}",
        d.output()
    );

    // A daemon whose queues are shared takes no guest-memory port later.
    let shared = Daemon::start(
        &lab,
        &dir.join("c.sock"),
        &xvdpa_tests::lab::mac_str(guest_mac(2)),
        &[],
    )?;
    let err = add_port_error(
        &dir.join("ctl.sock"),
        &format!(
            r#"{{"cmd":"add-port","socket":"{}","mac":"52:54:00:00:00:05","guest_umem":true}}"#,
            dir.join("d.sock").display()
        ),
    )?;
    ensure!(
        err.contains("guest-umem=on needs the NIC to itself"),
        "{err}"
    );
    shared.stop()?;
    Ok(())
}

#[test]
fn a_guest_memory_port_moves_traffic_on_the_single_copy_path_on_each_connection() -> Result<()> {
    let s = guest_umem_daemon("gu-single", &[])?;
    for _ in 0..2 {
        let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
        let port = listed_port(&s, 0)?;
        ensure!(port["datapath"] == "guest-memory", "{port}");
        traffic_flows(&s, &mut fe)?;
        drop(fe);
        s.daemon_wait_for_disconnect()?;
    }
    ensure!(s.daemon.counter("rx_packets")? >= 4, "rx_packets");
    ensure!(s.daemon.counter("tx_packets")? >= 2, "tx_packets");
    let log = s.daemon.stop()?;
    ensure!(
        log.matches("single-copy path").count() == 2,
        "one line per connection:\n{log}"
    );
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

#[test]
fn guest_memory_in_two_files_falls_back_to_the_copy_path_with_one_line() -> Result<()> {
    let s = guest_umem_daemon("gu-two-files", &[])?;
    let opts = FrontendOptions {
        two_memory_files: true,
        ..FrontendOptions::default()
    };
    let mut fe = VirtioNetFrontend::connect(&s.socket, opts)?;
    let port = listed_port(&s, 0)?;
    let path = port["datapath"].as_str().unwrap_or_default();
    ensure!(
        path == "copy (guest memory refused: guest memory comes from 2 files, not one)",
        "{port}"
    );
    traffic_flows(&s, &mut fe)?;
    let log = s.daemon.stop()?;
    ensure!(
        log.matches("guest memory cannot be the NIC queue's UMEM")
            .count()
            == 1,
        "one line:\n{log}"
    );
    ensure!(log.contains("guest memory comes from 2 files"), "{log}");
    Ok(())
}

/// The locked-memory limit of the memlock test's daemon: the hard limit these machines give
/// root (whose bounding set lacks `CAP_SYS_RESOURCE`), so it holds wherever the test runs.
const MEMLOCK_LIMIT: u64 = 8 << 20;

/// Runs the daemon with RLIMIT_MEMLOCK at [`MEMLOCK_LIMIT`] (soft and hard) and without the
/// capabilities `drop` names (setpriv's list, `-sys_resource,...`), gone from its bounding
/// and inheritable sets, so from every set after exec. Without `CAP_SYS_RESOURCE` it can
/// neither lift the limit nor be given it back: a service started with `LimitMEMLOCK=8M` on
/// a host that withholds `CAP_SYS_RESOURCE`.
fn limited_memlock(drop: &str) -> Vec<String> {
    [
        "prlimit".to_string(),
        format!("--memlock={MEMLOCK_LIMIT}:{MEMLOCK_LIMIT}"),
        "--".into(),
        "setpriv".into(),
        format!("--bounding-set={drop}"),
        format!("--inh-caps={drop}"),
        "--".into(),
    ]
    .into()
}

/// Counters of every queue and of the XDP program that say something went wrong (drops,
/// errors, refusals, unknown completions), with their values, where not zero.
fn error_counters(s: &Setup) -> Result<Vec<(String, u64)>> {
    let stats = s.daemon.ctl()?.stats()?;
    let bad = |name: &str| {
        ["dropped", "error", "refused", "unknown"]
            .iter()
            .any(|w| name.contains(w))
    };
    let names: std::collections::BTreeSet<String> = stats["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["queues"].as_array().into_iter().flatten())
        .filter_map(|q| q["counters"].as_object())
        .flat_map(|c| c.keys().cloned())
        .chain(
            stats["xdp"]
                .as_object()
                .into_iter()
                .flat_map(|x| x.keys().cloned()),
        )
        .filter(|n| bad(n))
        .collect();
    let mut nonzero = Vec::new();
    for name in names {
        let value = xvdpa_tests::ctl::daemon_counter(&stats, &name)?;
        if value != 0 {
            nonzero.push((name, value));
        }
    }
    Ok(nonzero)
}

/// A daemon that runs as a service user (`--user nobody`: no `CAP_IPC_LOCK` after start-up)
/// under a locked-memory limit its guest's memory does not fit: the guest cannot be pinned,
/// and the port takes the copy path with one warning that names the limit and the remedy;
/// traffic flows both ways and no counter says anything went wrong.
#[test]
fn guest_memory_over_the_memlock_limit_falls_back_to_the_copy_path_with_one_line() -> Result<()> {
    let tag = "gu-memlock";
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    // A directory the daemon makes and hands to its user, who makes the port's socket there.
    let run = dir.join("run");
    let socket = run.join("vm0.sock");
    let spec = Daemon::port_spec(&socket, guest_mac(0), ",guest-umem=on");
    let wrapper = limited_memlock("-sys_resource");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let daemon = Daemon::start_specs_wrapped(
        &lab,
        &wrapper,
        &run.join("ctl.sock"),
        &[spec],
        &["--user", "nobody"],
    )?;
    let s = Setup {
        lab,
        daemon,
        socket,
        _dir: dir,
    };
    // 256 receive and 256 transmit slots of 32 KiB: 16 MiB of guest memory, twice the limit.
    let opts = FrontendOptions {
        slot_len: 32 << 10,
        ..FrontendOptions::default()
    };
    // The next connection falls back the same way: the copy path's UMEMs count against no
    // limit, however late the kernel releases the first connection's.
    for _ in 0..2 {
        let mut fe = VirtioNetFrontend::connect(&s.socket, opts.clone())?;
        let port = listed_port(&s, 0)?;
        let path = port["datapath"].as_str().unwrap_or_default();
        ensure!(
            path.starts_with("copy (guest memory refused: cannot pin ")
                && path.contains(&format!("locked-memory limit of {MEMLOCK_LIMIT} bytes"))
                && path.contains("LimitMEMLOCK"),
            "{port}"
        );
        traffic_flows(&s, &mut fe)?;
        drop(fe);
        s.daemon_wait_for_disconnect()?;
    }
    let errors = error_counters(&s)?;
    ensure!(errors.is_empty(), "error counters: {errors:?}");
    let log = s.daemon.stop()?;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("guest memory cannot be the NIC queue's UMEM"))
        .collect();
    ensure!(
        lines.len() == 1
            && lines[0].contains("WARN")
            && lines[0].contains(&format!("{MEMLOCK_LIMIT} bytes"))
            && lines[0].contains("LimitMEMLOCK"),
        "one warning naming the limit and the remedy:\n{log}"
    );
    ensure!(
        !log.contains("ERROR") && !log.contains("panicked"),
        "nothing else went wrong:\n{log}"
    );
    Ok(())
}

/// A daemon started without `CAP_IPC_LOCK` at all (nor `CAP_SYS_RESOURCE`) counts every UMEM
/// against its limit, so the limit must cover the copy path's, the guest-memory port's
/// fallback: under one that does not, start-up stops with the memlock line naming both
/// figures, before XDP is attached.
#[test]
fn without_cap_ipc_lock_start_up_asks_the_limit_to_cover_the_copy_path() -> Result<()> {
    let tag = "gu-nolock";
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let spec = Daemon::port_spec(&dir.join("vm0.sock"), guest_mac(0), ",guest-umem=on");
    let wrapper = limited_memlock("-ipc_lock,-sys_resource");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let ctl = dir.join("ctl.sock");
    let mut d = Daemon::spawn_wrapped(
        &lab,
        &wrapper,
        &["--ctl", ctl.to_str().context("path")?, "--port", &spec],
    )?;
    let status = d.wait_exit(Duration::from_secs(10))?;
    let out = d.output();
    ensure!(!status.success(), "started: {out}");
    // The daemon's default MTU, on the lab's one-queue NIC.
    let need = xvdpa::runtime::copy_path_memlock(1500, 1);
    ensure!(
        out.contains(&format!(
            "the locked-memory limit is {MEMLOCK_LIMIT} bytes and the AF_XDP buffers need {need}"
        )) && !out.contains("XDP steering attached"),
        "{out}"
    );
    Ok(())
}

/// Receive buffers the kernel cannot be given (too short for a frame, outside the guest's
/// memory) go back to the guest unused and are counted; the good ones still receive.
#[test]
fn unusable_receive_buffers_are_refused_and_counted() -> Result<()> {
    let s = guest_umem_daemon("gu-hostile", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    let writable = xvdpa_tests::frontend::VRING_DESC_F_WRITE;
    let short = fe.scratch(RX_QUEUE, 0);
    let bad = [
        RawDesc {
            addr: short,
            len: 1024,
            flags: writable,
            next: 0,
        },
        RawDesc {
            addr: 1 << 40,
            len: 2048,
            flags: writable,
            next: 0,
        },
        RawDesc {
            addr: u64::MAX - 100,
            len: 2048,
            flags: writable,
            next: 0,
        },
    ];
    let mut heads = Vec::new();
    for d in bad {
        heads.push(fe.post_raw(RX_QUEUE, &[d])?);
    }
    // More than the chains held back for the tap and for the spare frames the kernel may
    // have been given before the guest posted anything (one chain kept per spare), so the
    // bad ones, first on the ring, are offered to the kernel.
    let kept =
        xvdpa::worker::HELD_BACK_CHAINS as usize + xvdpa::datapath::zero_copy_rx::SPARE_LOW_WATER;
    fe.post_rx_buffers(kept + 32, 2048)?;
    fe.kick(RX_QUEUE)?;
    let refused = s.daemon.counter_reaching("rx_buffers_refused", 3)?;
    ensure!(refused == 3, "rx_buffers_refused {refused}");
    let used = fe.take_used(RX_QUEUE)?;
    for h in &heads {
        ensure!(
            used.iter().any(|u| u.head == *h && u.len == 0),
            "bad buffer {h} not given back unused: {used:?}"
        );
    }
    // The port still receives into the good buffers.
    let wire = WireSocket::open(&s.lab)?;
    let frame = test_frame(guest_mac(0), s.lab.wire_mac()?, 9, 600);
    wire.send(&frame)?;
    let got = fe.recv_frames(1, WAIT)?;
    ensure!(got.first().map(|(_, f)| f) == Some(&frame), "frame lost");
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

impl Setup {
    fn daemon_wait_for_disconnect(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if listed_port(self, 0)?["state"] == "waiting" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        anyhow::bail!("the port did not go back to waiting")
    }
}

/// GET_VRING_BASE on the receive ring closes the guest-memory socket and gives every buffer
/// the kernel held back to the guest unused (the ring's base the frontend reads has moved
/// past them); the ring's next run registers the memory again and receives.
#[test]
fn stopping_the_receive_ring_gives_the_buffers_back_and_the_next_run_registers_again() -> Result<()>
{
    let s = guest_umem_daemon("gu-stop", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    fe.post_rx_buffers(200, 2048)?;
    std::thread::sleep(Duration::from_millis(300));
    let base = fe.get_vring_base(RX_QUEUE)?;
    // The chains held back for broadcasts, and those kept for the spare frames the kernel
    // has ahead of the guest's buffers, stay on the ring: the kernel had the rest.
    ensure!(base > 0 && base <= 192, "ring base {base}");
    let used = fe.take_used(RX_QUEUE)?;
    ensure!(
        used.len() == base as usize && used.iter().all(|u| u.len == 0),
        "given back: {used:?}"
    );
    fe.reset_device()?;
    traffic_flows(&s, &mut fe)?;
    ensure!(listed_port(&s, 0)?["datapath"] == "guest-memory");
    let log = s.daemon.stop()?;
    ensure!(
        log.matches("single-copy path").count() == 2,
        "registered once per ring run:\n{log}"
    );
    Ok(())
}

/// The single-copy path's transmit applies the port's policy as the copy path does: a frame
/// with a source MAC the port may not use is dropped and counted, a broadcast goes to the
/// wire (no other port shares the NIC).
#[test]
fn the_single_copy_transmit_keeps_the_ports_policy() -> Result<()> {
    let s = guest_umem_daemon("gu-policy", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    ensure!(listed_port(&s, 0)?["datapath"] == "guest-memory");
    let wire = WireSocket::open(&s.lab)?;
    let wire_mac = s.lab.wire_mac()?;
    let stranger = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    let spoofed = test_frame(wire_mac, stranger, 5, 200);
    let broadcast = test_frame([0xff; 6], guest_mac(0), 6, 200);
    for f in [&spoofed, &broadcast] {
        fe.send(f, 1, false)?;
    }
    fe.kick(TX_QUEUE)?;
    let seen = wire.recv_until(WAIT, |g| g.iter().any(|x| x == &broadcast));
    ensure!(
        seen.iter().any(|x| x == &broadcast),
        "broadcast not on the wire"
    );
    ensure!(
        !seen.iter().any(|x| x == &spoofed),
        "spoofed frame on the wire"
    );
    let dropped = s.daemon.counter_reaching("tx_dropped_spoofed", 1)?;
    ensure!(dropped == 1, "tx_dropped_spoofed {dropped}");
    s.daemon.stop()?;
    Ok(())
}

// Transmit from the guest's own buffers: a frame longer than the slot's headers goes to the
// kernel as the daemon's slot (its headers, checked there) and the rest straight from guest
// memory; its chain comes back once the kernel completed it.

/// Bytes the daemon sends from its slot (`zero_copy_tx::SLOT_HEADERS`): longer frames go from
/// guest memory, shorter ones are copied.
const SLOT_HEADERS: usize = 128;

/// Waits until the wire saw every frame of `want` (compared byte for byte); returns those
/// it did not see.
fn missing_on_wire(wire: &WireSocket, want: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let seen = wire.recv_until(WAIT, |g| want.iter().all(|f| g.contains(f)));
    want.iter().filter(|f| !seen.contains(f)).cloned().collect()
}

/// A guest-memory daemon (`tag`) sending from guest memory (`guest-umem-tx=in-place`), its
/// frontend connected on the single-copy path, the wire and the wire's MAC.
fn single_copy_guest(tag: &str) -> Result<(Setup, VirtioNetFrontend, WireSocket, [u8; 6])> {
    // veth is a copy-mode NIC, where `auto` copies: the tests of sending in place ask for it.
    single_copy_guest_with(tag, ",guest-umem-tx=in-place")
}

fn single_copy_guest_with(
    tag: &str,
    port_settings: &str,
) -> Result<(Setup, VirtioNetFrontend, WireSocket, [u8; 6])> {
    let s = guest_umem_daemon_with(tag, port_settings, &[])?;
    let fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    ensure!(listed_port(&s, 0)?["datapath"] == "guest-memory");
    let wire = WireSocket::open(&s.lab)?;
    let wire_mac = s.lab.wire_mac()?;
    Ok((s, fe, wire, wire_mac))
}

/// Frames on both sides of the slot's headers, each in chains of 1 to 4 descriptors, from a
/// port with `port_settings`: all reach the wire intact and every chain comes back; returns
/// the daemon's `tx_in_place` and how many of the frames were longer than the slot's headers.
fn send_frames_of_every_shape(tag: &str, port_settings: &str) -> Result<(u64, u64)> {
    let (s, mut fe, wire, wire_mac) = single_copy_guest_with(tag, port_settings)?;
    // The first descriptor holds the net header and the start of the frame.
    let sizes = [60, SLOT_HEADERS, SLOT_HEADERS + 1, 200, 512, 1000, 1514];
    let mut frames = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        for pieces in 1..=4 {
            let f = test_frame(wire_mac, guest_mac(0), (10 * i + pieces) as u32, len);
            fe.send(&f, pieces, false)?;
            frames.push(f);
        }
    }
    fe.kick(TX_QUEUE)?;
    let missing = missing_on_wire(&wire, &frames);
    ensure!(
        missing.is_empty(),
        "{} of {} frames not on the wire intact (lengths {:?})",
        missing.len(),
        frames.len(),
        missing.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // Every chain comes back, the in-place ones once the kernel completed them.
    let used = fe.wait_tx_used(frames.len(), WAIT)?;
    ensure!(
        used == frames.len(),
        "{used} of {} chains used",
        frames.len()
    );
    let longer = frames.iter().filter(|f| f.len() > SLOT_HEADERS).count() as u64;
    ensure!(s.daemon.counter("tx_packets")? == frames.len() as u64);
    let in_place = s.daemon.counter("tx_in_place")?;
    ensure!(s.daemon.counter("tx_completions_unknown")? == 0);
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok((in_place, longer))
}

#[test]
fn frames_longer_than_the_slot_headers_go_out_from_guest_memory_intact() -> Result<()> {
    let (in_place, longer) = send_frames_of_every_shape("gu-inplace", ",guest-umem-tx=in-place")?;
    ensure!(in_place == longer, "tx_in_place {in_place}, want {longer}");
    Ok(())
}

/// veth is a copy-mode NIC: `auto` (the default) and `copy` copy every frame once into the
/// daemon's slots, which costs less there than sending from guest memory.
#[test]
fn on_a_copy_mode_nic_the_default_transmit_copies_and_so_does_copy() -> Result<()> {
    for (tag, settings) in [("gu-txauto", ""), ("gu-txcopy", ",guest-umem-tx=copy")] {
        let (in_place, _) = send_frames_of_every_shape(tag, settings)?;
        ensure!(
            in_place == 0,
            "{settings:?}: tx_in_place {in_place}, want 0"
        );
    }
    Ok(())
}

/// `guest-umem-tx` without `guest-umem=on` is a mistake said at start-up, not ignored.
#[test]
fn guest_umem_tx_without_guest_umem_is_refused_at_start_up() -> Result<()> {
    let lab = Lab::unique("gu-txbad")?;
    let dir = socket_dir("gu-txbad")?;
    let spec = Daemon::port_spec(
        &dir.join("vm0.sock"),
        guest_mac(0),
        ",guest-umem-tx=in-place",
    );
    let started = Daemon::start_specs(&lab, &dir.join("ctl.sock"), &[spec], &[]);
    let err = match started {
        Ok(_) => anyhow::bail!("a daemon started with guest-umem-tx and no guest-umem"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("guest-umem-tx applies to the single-copy path only"),
        "{err}"
    );
    Ok(())
}

/// The guest rewrites the source MAC in the buffer of the frames it sends, from another
/// vCPU, all the time (between the spoofed one and its own): the daemon's check sees one or
/// the other, and the headers the kernel sends come from the daemon's slot, so the wire sees
/// the checked MAC or nothing (the check saw the spoofed one and dropped the frame), never the
/// spoofed one.
#[test]
fn a_guest_rewriting_its_source_mac_after_the_kick_gets_no_spoofed_frame_on_the_wire() -> Result<()>
{
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::{Bytes, GuestAddress};
    let (s, mut fe, wire, wire_mac) = single_copy_guest("gu-flip")?;
    let spoofed = [0x52, 0x54, 0x00, 0x66, 0x66, 0x66];
    const FRAMES: u32 = 300;
    let buf = fe.scratch(TX_QUEUE, 0);
    let mac_at = GuestAddress(buf + 12 + 6);
    let flipping = AtomicBool::new(true);
    let mem = fe.mem.clone();
    let mut seen = Vec::new();
    let mut sent_frames = Vec::new();
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(|| {
            let mut i = 0u32;
            while flipping.load(Ordering::Relaxed) {
                let mac = if i.is_multiple_of(2) {
                    spoofed
                } else {
                    guest_mac(0)
                };
                let _ = mem.write_slice(&mac, mac_at);
                i = i.wrapping_add(1);
            }
        });
        let mut run = || -> Result<()> {
            for seq in 0..FRAMES {
                let f = test_frame(wire_mac, guest_mac(0), seq, 600);
                let mut chain = vec![0u8; 12];
                chain.extend_from_slice(&f);
                // Everything but the source MAC, which the other vCPU keeps rewriting.
                fe.mem.write_slice(&chain[..18], GuestAddress(buf))?;
                fe.mem.write_slice(&chain[24..], GuestAddress(buf + 24))?;
                fe.post_raw(
                    TX_QUEUE,
                    &[RawDesc {
                        addr: buf,
                        len: chain.len() as u32,
                        flags: 0,
                        next: 0,
                    }],
                )?;
                fe.kick(TX_QUEUE)?;
                ensure!(fe.wait_tx_used(1, WAIT)? == 1, "chain {seq} not used");
                // Read as it goes: a frame sent from guest memory carries a page per piece in
                // copy mode, so a burst overruns the packet socket's buffer.
                let mine = |g: &Vec<u8>| xvdpa_tests::frames::test_seq(g) == Some(seq);
                seen.extend(
                    wire.recv_until(Duration::from_millis(20), |g| g.iter().any(mine))
                        .into_iter()
                        .filter(|g| g[..6] == wire_mac && mine(g)),
                );
                sent_frames.push(f);
            }
            Ok(())
        };
        let result = run();
        flipping.store(false, Ordering::Relaxed);
        result
    })?;
    let sent = s.daemon.counter("tx_packets")?;
    let dropped = s.daemon.counter("tx_dropped_spoofed")?;
    ensure!(
        sent + dropped == u64::from(FRAMES),
        "tx_packets {sent} + tx_dropped_spoofed {dropped}"
    );
    let spoofs = seen.iter().filter(|f| f[6..12] == spoofed).count();
    ensure!(spoofs == 0, "{spoofs} spoofed frames on the wire");
    ensure!(
        seen.len() as u64 == sent && seen.iter().all(|f| sent_frames.contains(f)),
        "{} frames on the wire, {sent} sent",
        seen.len()
    );
    ensure!(s.daemon.counter("tx_in_place")? == sent);
    eprintln!("sent {sent}, dropped as spoofed {dropped}");
    s.daemon.stop()?;
    Ok(())
}

/// GET_VRING_BASE on the transmit ring while frames sent from guest memory may be in flight:
/// the socket closes, every chain the device took is used by the time the base is read (the
/// in-flight ones given back), nothing is written into the ring afterwards, and the next run
/// and the next connection send from guest memory again.
#[test]
fn stopping_the_transmit_ring_gives_in_flight_chains_back_and_the_path_comes_back() -> Result<()> {
    let s = guest_umem_daemon_with("gu-txstop", ",guest-umem-tx=in-place", &[])?;
    let wire_mac = s.lab.wire_mac()?;
    for round in 0..2 {
        let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
        ensure!(listed_port(&s, 0)?["datapath"] == "guest-memory");
        let frames: Vec<Vec<u8>> = (0..64)
            .map(|i| test_frame(wire_mac, guest_mac(0), i, 1514))
            .collect();
        for f in &frames {
            fe.send(f, 3, false)?;
        }
        fe.kick(TX_QUEUE)?;
        // Some of the burst is on its way when the ring stops.
        std::thread::sleep(Duration::from_micros(300));
        let base = fe.get_vring_base(TX_QUEUE)?;
        let used = fe.take_used(TX_QUEUE)?;
        ensure!(
            used.len() as u32 == base,
            "round {round}: ring base {base}, {} chains used",
            used.len()
        );
        std::thread::sleep(Duration::from_millis(300));
        let late = fe.take_used(TX_QUEUE)?;
        ensure!(
            late.is_empty(),
            "used entries after the ring stopped: {late:?}"
        );
        fe.reset_device()?;
        traffic_flows(&s, &mut fe)?;
        ensure!(
            fe.wait_tx_used(1, WAIT)? == 1,
            "round {round}: the chain of the frame sent after the restart not used"
        );
        let wire = WireSocket::open(&s.lab)?;
        let f = test_frame(wire_mac, guest_mac(0), 999, 1400);
        fe.send(&f, 2, false)?;
        fe.kick(TX_QUEUE)?;
        ensure!(
            missing_on_wire(&wire, &[f]).is_empty(),
            "round {round}: frame lost"
        );
        ensure!(
            fe.wait_tx_used(1, WAIT)? == 1,
            "round {round}: chain not used"
        );
        drop(fe);
        s.daemon_wait_for_disconnect()?;
    }
    ensure!(s.daemon.counter("tx_in_place")? > 0);
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// The UMEM is bound for multi-buffer (transmit sends frames in pieces), so a frame longer
/// than the port's largest (a priority-tagged full-size one, which the wire allows) reaches
/// the socket split over several guest buffers: it is dropped and counted, its buffers stay
/// posted, and the next frame lands whole.
#[test]
fn a_received_frame_split_over_guest_buffers_is_dropped_and_counted() -> Result<()> {
    let (s, mut fe, wire, wire_mac) = single_copy_guest("gu-split")?;
    fe.post_rx_buffers(64, 2048)?;
    std::thread::sleep(Duration::from_millis(300));
    let long = xvdpa_tests::frames::tagged(&test_frame(guest_mac(0), wire_mac, 1, 1514), 0);
    let next = test_frame(guest_mac(0), wire_mac, 2, 1514);
    wire.send(&long)?;
    wire.send(&next)?;
    let got = fe.recv_frames(2, Duration::from_secs(1))?;
    ensure!(
        got.len() == 1 && got[0].1 == next,
        "the guest got {:?}",
        got.iter().map(|(_, f)| f.len()).collect::<Vec<_>>()
    );
    let dropped = s.daemon.counter_reaching("rx_dropped_too_large", 1)?;
    ensure!(dropped == 1, "rx_dropped_too_large {dropped}");
    s.daemon.stop()?;
    Ok(())
}

/// Sends frames numbered `from..=to` from the wire to the guest, a few at a time so the
/// worker's rounds keep up as a NIC's interrupts would let it.
fn send_numbered(s: &Setup, wire: &WireSocket, from: u32, to: u32) -> Result<()> {
    let wire_mac = s.lab.wire_mac()?;
    for seq in from..=to {
        wire.send(&test_frame(guest_mac(0), wire_mac, seq, 600))?;
        if seq % 32 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

/// Receives until `count` frames came or none came for a while, posting up to `batch`
/// receive buffers whenever the guest has taken what it got; returns their sequence numbers
/// in the order the used ring gave them.
fn receive_posting(fe: &mut VirtioNetFrontend, count: usize, batch: usize) -> Result<Vec<u32>> {
    let mut seqs = Vec::new();
    let mut last = Instant::now();
    while seqs.len() < count && last.elapsed() < WAIT {
        let free = fe.free_descriptors(RX_QUEUE);
        fe.post_rx_buffers(free.min(batch), 2048)?;
        fe.kick(RX_QUEUE)?;
        let want = batch.min(count - seqs.len());
        for (_, f) in fe.recv_frames(want, Duration::from_millis(100))? {
            seqs.push(test_seq(&f).context("a frame that is not a test frame")?);
            last = Instant::now();
        }
    }
    Ok(seqs)
}

/// Spare frames of the daemon's pool carry a guest that posted only a few receive buffers
/// through a burst many times larger, without loss and in order: the frames past the guest's
/// buffers are copied into the chains it posts later, and counted.
#[test]
fn a_guest_with_few_buffers_gets_a_larger_burst_in_order_through_spare_frames() -> Result<()> {
    let s = guest_umem_daemon("gu-spare", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    let wire = WireSocket::open(&s.lab)?;
    // 8 are held back for broadcasts: the kernel gets 16 of the guest's.
    fe.post_rx_buffers(24, 2048)?;
    std::thread::sleep(Duration::from_millis(300));
    const BURST: u32 = 400;
    send_numbered(&s, &wire, 1, BURST)?;
    std::thread::sleep(Duration::from_millis(300));
    let seqs = receive_posting(&mut fe, BURST as usize, 64)?;
    ensure!(
        seqs.iter().copied().eq(1..=BURST),
        "received {} frames, out of order or lost: {seqs:?}",
        seqs.len()
    );
    let packets = s.daemon.counter_reaching("rx_packets", u64::from(BURST))?;
    let spare = s.daemon.counter("rx_spare_frames")?;
    ensure!(packets == u64::from(BURST), "rx_packets {packets}");
    ensure!(
        (u64::from(BURST) - 16..=u64::from(BURST)).contains(&spare),
        "rx_spare_frames {spare}: at most 16 frames found a guest buffer"
    );
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// A guest that posts no receive buffers for a while, then does, gets every frame of the
/// meantime in order, up to the daemon's pool of 1024 spare frames; the frames past the pool
/// are dropped at the NIC, and the port then receives as before.
#[test]
fn a_guest_that_posts_late_gets_the_frames_of_the_meantime_in_order_up_to_the_pool() -> Result<()> {
    let s = guest_umem_daemon("gu-late", &[])?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    let wire = WireSocket::open(&s.lab)?;
    std::thread::sleep(Duration::from_millis(300));
    send_numbered(&s, &wire, 1, 300)?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        fe.take_used(RX_QUEUE)?.is_empty(),
        "used entries without buffers"
    );
    let seqs = receive_posting(&mut fe, 300, 40)?;
    ensure!(
        seqs.iter().copied().eq(1..=300),
        "received {} frames, out of order or lost: {seqs:?}",
        seqs.len()
    );
    let spare = s.daemon.counter_reaching("rx_spare_frames", 300)?;
    ensure!(spare == 300, "rx_spare_frames {spare}");

    // A guest that posts nothing while more than the pool arrives (a new connection: none
    // of its buffers are with the kernel) gets the pool's worth.
    drop(fe);
    s.daemon_wait_for_disconnect()?;
    let mut fe = VirtioNetFrontend::connect(&s.socket, FrontendOptions::default())?;
    let pool = 1024;
    std::thread::sleep(Duration::from_millis(300));
    send_numbered(&s, &wire, 1001, 1000 + pool + 100)?;
    std::thread::sleep(Duration::from_millis(300));
    let seqs = receive_posting(&mut fe, pool as usize + 100, 64)?;
    ensure!(
        seqs.iter().copied().eq(1001..=1000 + pool),
        "received {} frames, out of order or more than the pool: first {:?} last {:?}",
        seqs.len(),
        seqs.first(),
        seqs.last()
    );
    let dropped = s.daemon.counter_reaching("rx_dropped_no_umem_frame", 100)?;
    ensure!(dropped >= 100, "rx_dropped_no_umem_frame {dropped}");
    // And the port receives as before.
    send_numbered(&s, &wire, 5000, 5009)?;
    let seqs = receive_posting(&mut fe, 10, 64)?;
    ensure!(seqs.iter().copied().eq(5000..=5009), "afterwards: {seqs:?}");
    let log = s.daemon.stop()?;
    ensure!(!log.contains("panicked"), "{log}");
    Ok(())
}
