//! Hostile vhost-user frontends against a live daemon with two ports. Whatever reaches port 0
//! (lying sizes, unknown requests, out-of-order and out-of-range messages, bad memory tables,
//! fds of the wrong kind, floods, a saturated call eventfd), the daemon keeps serving: it
//! stays up, `stats` answers, port 1's VM keeps receiving from the wire, port 0 takes a good
//! frontend afterwards, and the daemon holds no more fds than before. Needs root;
//! `cargo xtask test` runs it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::{test_frame, test_seq};
use xvdpa_tests::frontend::{memfd, FrontendOptions, VirtioNetFrontend, RX_QUEUE, TX_QUEUE};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::raw_vhost::*;
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);

struct Setup {
    _lab: Lab,
    daemon: Daemon,
    wire: WireSocket,
    wire_mac: [u8; 6],
    _dir: SocketDir,
    sockets: Vec<PathBuf>,
    ctl: Ctl,
}

fn setup(tag: &str) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let specs: Vec<(PathBuf, String)> = (0..2)
        .map(|i| (dir.join(format!("vm{i}.sock")), mac_str(guest_mac(i))))
        .collect();
    let daemon = Daemon::start_ports(&lab, &specs, &[])?;
    let wire = WireSocket::open(&lab)?;
    let wire_mac = lab.wire_mac()?;
    let ctl = Ctl::new(&dir.join("ctl.sock"));
    Ok(Setup {
        _lab: lab,
        daemon,
        wire,
        wire_mac,
        sockets: specs.into_iter().map(|(s, _)| s).collect(),
        _dir: dir,
        ctl,
    })
}

fn vm(socket: &std::path::Path) -> Result<VirtioNetFrontend> {
    let mut fe = VirtioNetFrontend::connect(socket, FrontendOptions::default())?;
    fe.post_rx_buffers(256, 2048)?;
    // The worker's housekeeping timer (200 ms) publishes the queue even without traffic.
    std::thread::sleep(Duration::from_millis(300));
    Ok(fe)
}

fn open_fds(daemon: &Daemon) -> Result<usize> {
    let pid = daemon.pid().context("daemon pid")?;
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The daemon is up, `stats` answers within 2 s, and `vm` (port `port`) receives a frame
/// from the wire.
fn still_serving(
    s: &mut Setup,
    vm: &mut VirtioNetFrontend,
    port: u8,
    seq: u32,
    after: &str,
) -> Result<()> {
    ensure!(
        s.daemon.try_wait()?.is_none(),
        "the daemon died after: {after}"
    );
    let t = Instant::now();
    s.ctl
        .stats()
        .with_context(|| format!("stats after: {after}"))?;
    ensure!(
        t.elapsed() < Duration::from_secs(2),
        "stats took {:?} after: {after}",
        t.elapsed()
    );
    let f = test_frame(guest_mac(port), s.wire_mac, seq, 200);
    s.wire.send(&f)?;
    let got = vm.recv_frames(1, WAIT)?;
    ensure!(
        got.iter().any(|(_, g)| test_seq(g) == Some(seq)),
        "port {port} no longer receives after: {after}"
    );
    vm.post_rx_buffers(vm.free_descriptors(RX_QUEUE).min(256), 2048)?;
    Ok(())
}

/// One attack on a fresh connection: `run` sends, then the connection is dropped.
type Attack = (&'static str, Box<dyn Fn(&mut RawFrontend) -> Result<()>>);

fn attacks(memory: &File, pipe: &(File, File), dir: &File) -> Vec<Attack> {
    let (mem, rpipe, dirfd) = (memory.as_raw_fd(), pipe.0.as_raw_fd(), dir.as_raw_fd());
    let ask = VERSION | NEED_REPLY;
    vec![
        (
            "a header claiming 256 MiB of payload",
            Box::new(|f: &mut RawFrontend| {
                f.send_raw(GET_FEATURES, VERSION, 0x1000_0000, &[], &[])?;
                ensure!(f.closed_within(WAIT), "the connection stayed open");
                Ok(())
            }),
        ),
        (
            "a message cut short: 40 bytes announced, 10 sent, then the end",
            Box::new(|f: &mut RawFrontend| {
                Ok(f.send_raw(SET_FEATURES, VERSION, 40, &[0; 10], &[])?)
            }),
        ),
        (
            "an unknown request",
            Box::new(move |f: &mut RawFrontend| Ok(f.send(9999, ask, &[1, 2, 3], &[])?)),
        ),
        (
            "a version the protocol does not have",
            Box::new(|f: &mut RawFrontend| Ok(f.send(GET_FEATURES, 0x3, &[], &[])?)),
        ),
        (
            "ring messages before SET_OWNER and features, for queue 5000",
            Box::new(move |f: &mut RawFrontend| {
                f.send(SET_VRING_NUM, ask, &vring_state(5000, 256), &[])?;
                f.send(SET_VRING_BASE, ask, &vring_state(5000, 7), &[])?;
                f.send(GET_VRING_BASE, ask, &vring_state(5000, 0), &[])?;
                let mut addr = vec![0u8; 40];
                addr[0..4].copy_from_slice(&0u32.to_le_bytes());
                addr[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                f.send(SET_VRING_ADDR, ask, &addr, &[])?;
                Ok(())
            }),
        ),
        (
            "a ring size of 0 and of 3, and a ring of a queue past the device's",
            Box::new(move |f: &mut RawFrontend| {
                f.send(SET_OWNER, VERSION, &[], &[])?;
                f.send(SET_VRING_NUM, ask, &vring_state(0, 0), &[])?;
                f.send(SET_VRING_NUM, ask, &vring_state(0, 3), &[])?;
                f.send(SET_VRING_NUM, ask, &vring_state(2, 256), &[])?;
                f.send(SET_VRING_ENABLE, ask, &vring_state(u32::MAX, 1), &[])?;
                Ok(())
            }),
        ),
        (
            "nine memory regions, one fd",
            Box::new(move |f: &mut RawFrontend| {
                f.send(SET_OWNER, VERSION, &[], &[])?;
                let regions: Vec<_> = (0..9u64).map(|i| (i << 20, 1 << 20, 0, i << 20)).collect();
                f.send(SET_MEM_TABLE, ask, &mem_table(&regions), &[mem])?;
                Ok(())
            }),
        ),
        (
            "a region larger than its file, and one past the file's end",
            Box::new(move |f: &mut RawFrontend| {
                f.send(SET_OWNER, VERSION, &[], &[])?;
                f.send(
                    SET_MEM_TABLE,
                    ask,
                    &mem_table(&[(0, 64 << 20, 0, 0)]),
                    &[mem],
                )?;
                f.send(
                    SET_MEM_TABLE,
                    ask,
                    &mem_table(&[(0, 1 << 20, 0, 2 << 20)]),
                    &[mem],
                )?;
                Ok(())
            }),
        ),
        (
            "a pipe and a directory as guest memory",
            Box::new(move |f: &mut RawFrontend| {
                f.send(SET_OWNER, VERSION, &[], &[])?;
                f.send(
                    SET_MEM_TABLE,
                    ask,
                    &mem_table(&[(0, 1 << 20, 0, 0)]),
                    &[rpipe],
                )?;
                f.send(
                    SET_MEM_TABLE,
                    ask,
                    &mem_table(&[(0, 1 << 20, 0, 0)]),
                    &[dirfd],
                )?;
                Ok(())
            }),
        ),
        (
            "a pipe as kick fd, a directory as call fd, a kick with no fd",
            Box::new(move |f: &mut RawFrontend| {
                f.send(SET_OWNER, VERSION, &[], &[])?;
                f.send(SET_VRING_KICK, ask, &u64_payload(0), &[rpipe])?;
                f.send(SET_VRING_CALL, ask, &u64_payload(1), &[dirfd])?;
                f.send(SET_VRING_KICK, ask, &u64_payload(0), &[])?;
                Ok(())
            }),
        ),
        (
            "SEND_RARP before the RARP protocol feature, then of the wrong size after it",
            Box::new(move |f: &mut RawFrontend| {
                // RARP, and REPLY_ACK for the library to answer SET_PROTOCOL_FEATURES.
                const RARP_AND_REPLY_ACK: u64 = 1 << 2 | 1 << 3;
                let nack = Answer::Reply(SEND_RARP, u64_payload(1));
                let rarp = [0x52, 0x54, 0, 0, 0, 9, 0, 0];
                f.send(SET_OWNER, VERSION, &[], &[])?;
                f.send(SEND_RARP, ask, &rarp, &[])?;
                ensure!(f.answer(WAIT) == nack, "SEND_RARP before the feature");
                f.send(GET_FEATURES, VERSION, &[], &[])?;
                ensure!(matches!(f.answer(WAIT), Answer::Reply(GET_FEATURES, _)));
                f.send(
                    SET_PROTOCOL_FEATURES,
                    ask,
                    &u64_payload(RARP_AND_REPLY_ACK),
                    &[],
                )?;
                let ack = Answer::Reply(SET_PROTOCOL_FEATURES, u64_payload(0));
                ensure!(f.answer(WAIT) == ack, "SET_PROTOCOL_FEATURES with RARP");
                f.send(SEND_RARP, ask, &rarp[..6], &[])?;
                ensure!(f.answer(WAIT) == nack, "a SEND_RARP of 6 bytes");
                // Nobody to NACK: the connection ends.
                f.send(SEND_RARP, VERSION, &rarp[..3], &[])?;
                ensure!(f.closed_within(WAIT), "a SEND_RARP of 3 bytes left it open");
                Ok(())
            }),
        ),
        (
            "twenty fds on a message that takes none",
            Box::new(move |f: &mut RawFrontend| {
                let fds = [mem; 20];
                f.send(GET_FEATURES, VERSION, &[], &fds)?;
                f.send(GET_PROTOCOL_FEATURES, VERSION, &[], &fds)?;
                Ok(())
            }),
        ),
        (
            "20000 requests whose replies are never read",
            Box::new(|f: &mut RawFrontend| {
                for _ in 0..20_000 {
                    if f.send(GET_CONFIG, VERSION, &[0; 12 + 256], &[]).is_err() {
                        break;
                    }
                }
                Ok(())
            }),
        ),
    ]
}

#[test]
fn protocol_and_fd_attacks_end_one_connection_and_leave_the_daemon_serving() -> Result<()> {
    let mut s = setup("hostile")?;
    let mut good = vm(&s.sockets[1])?;
    still_serving(&mut s, &mut good, 1, 1, "nothing")?;
    let fds_before = open_fds(&s.daemon)?;

    let memory = memfd(1 << 20, false)?;
    let (r, w) = {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two-element array on success.
        ensure!(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, "pipe");
        use std::os::fd::FromRawFd;
        // SAFETY: fresh fds we own from here.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    };
    let dir = File::open("/")?;
    let pipe = (r, w);
    for (seq, (what, attack)) in attacks(&memory, &pipe, &dir).into_iter().enumerate() {
        let mut f = RawFrontend::connect(&s.sockets[0])?;
        attack(&mut f).with_context(|| what.to_string())?;
        drop(f);
        still_serving(&mut s, &mut good, 1, 100 + seq as u32, what)?;
    }

    // Port 0 is not wedged: a proper frontend gets a working device.
    let mut fresh = vm(&s.sockets[0])?;
    still_serving(&mut s, &mut fresh, 0, 1000, "all the attacks, on port 0")?;
    drop(fresh);
    // Every attacker's fds and connections were let go (the good VM's are still open; the
    // fresh one's may take a moment to close).
    let deadline = Instant::now() + WAIT;
    let mut fds_after = open_fds(&s.daemon)?;
    while fds_after > fds_before + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        fds_after = open_fds(&s.daemon)?;
    }
    ensure!(
        fds_after <= fds_before + 2,
        "the daemon holds {fds_after} fds, {fds_before} before the attacks"
    );
    drop(good);
    s.daemon.stop()?;
    Ok(())
}

#[test]
fn a_saturated_call_eventfd_never_blocks_the_datapath() -> Result<()> {
    let mut s = setup("satcall")?;
    let mut other = vm(&s.sockets[1])?;
    let mut victim = vm(&s.sockets[0])?;
    victim.saturate_call(RX_QUEUE)?;
    victim.saturate_call(TX_QUEUE)?;

    // Frames from the wire to the port whose guest "cannot be signalled", and frames it
    // sends to the wire: both go through, and nothing else stalls meanwhile.
    for seq in 0..50u32 {
        s.wire
            .send(&test_frame(guest_mac(0), s.wire_mac, seq, 300))?;
    }
    for seq in 0..20u32 {
        victim.send(
            &test_frame(s.wire_mac, guest_mac(0), 500 + seq, 300),
            1,
            false,
        )?;
    }
    victim.kick(TX_QUEUE)?;
    let deadline = Instant::now() + WAIT;
    let mut received = 0;
    while received < 50 && Instant::now() < deadline {
        received += victim.take_used(RX_QUEUE)?.len();
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        received == 50,
        "the guest with a saturated call fd got {received} of 50 frames"
    );
    let sent = s.wire.recv_until(WAIT, |g| {
        g.iter()
            .filter(|f| test_seq(f).is_some_and(|q| q >= 500))
            .count()
            >= 20
    });
    ensure!(
        sent.iter()
            .filter(|f| test_seq(f).is_some_and(|q| q >= 500))
            .count()
            == 20,
        "its frames did not all reach the wire"
    );
    still_serving(
        &mut s,
        &mut other,
        1,
        900,
        "a saturated call eventfd on port 0",
    )?;
    ensure!(
        s.daemon.counter("queue_errors")? == 0,
        "no queue was stopped"
    );
    drop(victim);
    drop(other);
    s.daemon.stop()?;
    Ok(())
}
