//! Dirty-page logging, as a migrating QEMU asks for it: the project's frontend shares a log
//! (SET_LOG_BASE) and sets VHOST_F_LOG_ALL, and every guest page the real daemon writes
//! (frames from the wire, frames switched in from another port, used-ring entries) must be
//! marked there, and nothing once logging stops. A missing bit would be a page QEMU does not
//! copy again: memory corrupted in the migrated guest. Needs root; `cargo xtask test` runs it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::frames::test_frame;
use xvdpa_tests::frontend::{
    FrontendOptions, RawDesc, Used, VirtioNetFrontend, DIRTY_LOG_PAGE, RX_QUEUE, TX_QUEUE,
    VRING_DESC_F_WRITE,
};
use xvdpa_tests::lab::{guest_mac, mac_str, Lab};
use xvdpa_tests::wire::WireSocket;

const WAIT: Duration = Duration::from_secs(5);

struct Setup {
    lab: Lab,
    daemon: Daemon,
    wire: WireSocket,
    sockets: Vec<PathBuf>,
    _dir: SocketDir,
}

fn setup(tag: &str, ports: u8) -> Result<Setup> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let specs: Vec<(PathBuf, String)> = (0..ports)
        .map(|i| (dir.join(format!("vm{i}.sock")), mac_str(guest_mac(i))))
        .collect();
    let daemon = Daemon::start_ports(&lab, &specs, &[])?;
    let wire = WireSocket::open(&lab)?;
    Ok(Setup {
        lab,
        daemon,
        wire,
        sockets: specs.into_iter().map(|(s, _)| s).collect(),
        _dir: dir,
    })
}

fn vm(socket: &std::path::Path) -> Result<VirtioNetFrontend> {
    let mut fe = VirtioNetFrontend::connect(socket, FrontendOptions::default())?;
    fe.post_rx_buffers(256, 2048)?;
    // The switch reaches a port's receive queue after the worker's first event (its 200 ms
    // housekeeping timer guarantees one).
    std::thread::sleep(Duration::from_millis(300));
    Ok(fe)
}

/// The receive chains the device used, until `count` arrived or the wait ends.
fn take_rx(fe: &mut VirtioNetFrontend, count: usize) -> Result<Vec<Used>> {
    let deadline = Instant::now() + WAIT;
    let mut used = Vec::new();
    while used.len() < count && Instant::now() < deadline {
        used.extend(fe.take_used(RX_QUEUE)?);
        fe.wait_call(RX_QUEUE, Duration::from_millis(50));
    }
    ensure!(
        used.len() == count,
        "{} of {count} frames arrived",
        used.len()
    );
    Ok(used)
}

fn pages(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    addr / DIRTY_LOG_PAGE..=(addr + len.max(1) - 1) / DIRTY_LOG_PAGE
}

/// Every page the frames landed on and the used index's page is marked; nothing outside
/// those and the two used rings is (the device also writes a used ring's flags to turn the
/// driver's kicks on and off).
fn check_log(fe: &VirtioNetFrontend, used: &[Used]) -> Result<()> {
    let dirty: BTreeSet<u64> = fe.dirty_pages()?.into_iter().collect();
    let (ring, ring_len) = fe.used_ring(RX_QUEUE);
    let mut must: BTreeSet<u64> = pages(ring + 2, 2).collect();
    for u in used {
        must.extend(pages(fe.rx_buffer_addr(u.head), u64::from(u.len)));
    }
    let missing: Vec<_> = must.difference(&dirty).collect();
    ensure!(
        missing.is_empty(),
        "pages written but not logged: {missing:?}"
    );
    let (tx_ring, tx_ring_len) = fe.used_ring(TX_QUEUE);
    let may: BTreeSet<u64> = must
        .iter()
        .copied()
        .chain(pages(ring, ring_len))
        .chain(pages(tx_ring, tx_ring_len))
        .collect();
    let extra: Vec<_> = dirty.difference(&may).collect();
    ensure!(
        extra.is_empty(),
        "pages logged that the daemon had no reason to write: {extra:?}"
    );
    Ok(())
}

#[test]
fn frames_from_the_wire_are_logged_while_logging_is_on() -> Result<()> {
    let s = setup("dlog-wire", 1)?;
    let mut fe = vm(&s.sockets[0])?;
    let wire_mac = s.lab.wire_mac()?;
    let send = |seq: u32, len: usize| s.wire.send(&test_frame(guest_mac(0), wire_mac, seq, len));

    // Before logging: frames land, nothing to log into yet.
    send(0, 100)?;
    take_rx(&mut fe, 1)?;

    fe.start_dirty_log()?;
    for seq in 1..=40 {
        send(seq, 60 + seq as usize * 35)?;
    }
    let used = take_rx(&mut fe, 40)?;
    check_log(&fe, &used)?;
    println!(
        "40 frames while logging: {} pages marked",
        fe.dirty_pages()?.len()
    );

    // Logging off (QEMU clears LOG_ALL when the migration ends or is cancelled).
    fe.stop_dirty_log()?;
    fe.clear_dirty_log()?;
    for seq in 41..=50 {
        send(seq, 200)?;
    }
    take_rx(&mut fe, 10)?;
    ensure!(
        fe.dirty_pages()?.is_empty(),
        "pages logged after LOG_ALL was cleared: {:?}",
        fe.dirty_pages()?
    );
    Ok(())
}

#[test]
fn frames_switched_in_from_another_port_are_logged() -> Result<()> {
    let s = setup("dlog-switch", 2)?;
    let mut a = vm(&s.sockets[0])?;
    let mut b = vm(&s.sockets[1])?;
    a.start_dirty_log()?;
    // Written into A's ring by B's worker, not A's.
    for seq in 0..20 {
        b.send_and_wait(&test_frame(guest_mac(0), guest_mac(1), seq, 1000), 1, WAIT)?;
    }
    let used = take_rx(&mut a, 20)?;
    check_log(&a, &used)
}

/// Where QEMU plugs memory in for the test below: far above the frontend's first region, so
/// the log must grow to cover it.
const PLUGGED_AT: u64 = 1 << 30;
const PLUGGED_LEN: u64 = 1 << 20;

/// QEMU may replace the memory table in the middle of a migration (memory plugged in, a
/// region remapped). It then grows the log first if the new memory needs more of it
/// (SET_LOG_BASE), and sends the table after (SET_MEM_TABLE; `vhost_commit` in QEMU's
/// hw/virtio/vhost.c), or the table alone when the log already covers it. Every region of
/// the new table, the ones kept (the rings are there) and the new one (the receive buffers
/// are there), must be logged from the moment the daemon writes into it.
#[test]
fn writes_into_a_memory_table_replaced_while_logging_are_logged() -> Result<()> {
    let s = setup("dlog-plug", 1)?;
    let mut fe = VirtioNetFrontend::connect(&s.sockets[0], FrontendOptions::default())?;
    fe.start_dirty_log()?;
    fe.add_memory_region(PLUGGED_AT, PLUGGED_LEN, true)?;
    frames_into_plugged_memory_are_logged(&s, &mut fe)
}

/// A frontend that sends the new table before a log that covers it (QEMU never does: it
/// grows the log first): the daemon cannot log its writes into the new region until the log
/// arrives, and says so; from then on they are logged.
#[test]
fn a_region_beyond_the_log_is_reported_and_logged_once_a_log_covers_it() -> Result<()> {
    let mut s = setup("dlog-late", 1)?;
    let mut fe = VirtioNetFrontend::connect(&s.sockets[0], FrontendOptions::default())?;
    fe.start_dirty_log()?;
    fe.add_memory_region(PLUGGED_AT, PLUGGED_LEN, false)?;
    s.daemon
        .wait_for_log("beyond the dirty log during a migration", WAIT)?;
    fe.grow_dirty_log()?;
    frames_into_plugged_memory_are_logged(&s, &mut fe)
}

/// Frames from the wire into receive buffers in the plugged-in memory, one page apart: the
/// pages they land on and the used index's page must be marked.
fn frames_into_plugged_memory_are_logged(s: &Setup, fe: &mut VirtioNetFrontend) -> Result<()> {
    let wire_mac = s.lab.wire_mac()?;
    fe.clear_dirty_log()?;
    const FRAMES: u32 = 8;
    let mut buffer_of = std::collections::BTreeMap::new();
    for i in 0..u64::from(FRAMES) {
        let addr = PLUGGED_AT + i * DIRTY_LOG_PAGE;
        let head = fe.post_raw(
            RX_QUEUE,
            &[RawDesc {
                addr,
                len: 2048,
                flags: VRING_DESC_F_WRITE,
                next: 0,
            }],
        )?;
        buffer_of.insert(head, addr);
    }
    fe.kick(RX_QUEUE)?;
    for seq in 0..FRAMES {
        s.wire
            .send(&test_frame(guest_mac(0), wire_mac, seq, 1000))?;
    }
    let used = take_rx(fe, FRAMES as usize)?;

    let dirty: BTreeSet<u64> = fe.dirty_pages()?.into_iter().collect();
    let (ring, _) = fe.used_ring(RX_QUEUE);
    let mut must: BTreeSet<u64> = pages(ring + 2, 2).collect();
    for u in &used {
        must.extend(pages(buffer_of[&u.head], u64::from(u.len)));
    }
    let missing: Vec<_> = must.difference(&dirty).collect();
    ensure!(
        missing.is_empty(),
        "pages written after the memory table was replaced but not logged: {missing:?} \
         (logged: {dirty:?})"
    );
    Ok(())
}
