//! Live migration of a real guest between two QEMU processes on this host, attached to two
//! ports of one daemon (the destination port marked `migrate_from` the source's): QEMU's own
//! `migrate` over QMP while the guest streams 128 MiB of TCP each way and the wire pings it.
//! Both streams must arrive with the sender's md5, and the guest must answer from the
//! destination. Prints the downtime (the longest gap between ping replies).
//!
//! What this test does not catch: a write the daemon forgot to log. Run with logging switched
//! off in the daemon it still passed here: the pages the daemon writes (receive buffers, the
//! used ring) are stale on the destination only if the guest reads them there before anything
//! rewrites them, and TCP retransmits what a stale used ring loses. The unit tests
//! (`datapath::dirty_log`, `rx`, `split_ring`) and `tests/tests/dirty_log.rs` check every
//! write path's bits instead. Needs root and QEMU; `cargo xtask test` provides both.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use xvdpa_tests::ctl::Ctl;
use xvdpa_tests::daemon::{socket_dir, Daemon, SocketDir};
use xvdpa_tests::guest::{self, md5, qemu_args, Guest, GuestConfig, READY_MARKER};
use xvdpa_tests::lab::{self, guest_ip, guest_mac, mac_str, Lab};

const BOOT: Duration = Duration::from_secs(60);
/// One block of the TCP streams.
const BLOCK: usize = 16 << 20;

/// One QMP session: the greeting read and capabilities negotiated.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(e).context("connecting to QMP"),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        qmp.read()?;
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("QMP said {line:?}"))
    }

    /// Sends a command and returns its `return` value (events in between are skipped).
    fn execute(&mut self, command: &str) -> Result<Value> {
        self.writer.write_all(command.as_bytes())?;
        self.writer.write_all(b"\n")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command}: {e}");
            }
        }
    }
}

/// Pings `ip` from the wire once per 100 ms until stopped; returns the reply times.
fn ping_from_wire(
    lab: &Lab,
    ip: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Instant>> {
    let cmd = lab.in_wire("busybox");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    std::thread::spawn(move || {
        let mut replies = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = Command::new(&program)
                .args(&args)
                .args(["ping", "-c", "1", "-W", "1", &ip])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                replies.push(t);
            }
            std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
        }
        replies
    })
}

fn qemu(config: &GuestConfig, extra: &[&str]) -> Result<Guest> {
    let (kernel, initrd) = guest::image()?;
    // The QEMU the suite runs, with the command line its version needs.
    let mut cmd = Command::new(guest::qemu_binary());
    cmd.args(qemu_args(config, &kernel, &initrd)).args(extra);
    Guest::spawn(cmd)
}

/// A daemon with the source port and its migration target, and the source guest booted.
struct Pair {
    lab: Lab,
    dir: SocketDir,
    _daemon: Daemon,
    config: GuestConfig,
    qmp_path: PathBuf,
    source: Guest,
}

fn boot_source(tag: &str) -> Result<Pair> {
    let lab = Lab::unique(tag)?;
    let dir = socket_dir(tag)?;
    let (src, dst) = (dir.join("src.sock"), dir.join("dst.sock"));
    let mac = mac_str(guest_mac(0));
    let daemon = Daemon::start_ports(&lab, &[(src.clone(), mac.clone())], &[])?;
    let ctl = Ctl::new(&dir.join("ctl.sock"));
    let added = ctl.raw(&format!(
        r#"{{"cmd":"add-port","socket":"{}","mac":"{mac}","migrate_from":"{}"}}"#,
        dst.display(),
        src.display()
    ))?;
    ensure!(added["ok"] == true, "add-port: {added}");
    let config = GuestConfig {
        socket: src,
        mac,
        ip: format!("{}/{}", guest_ip(0), lab::PREFIX),
        memory_mib: 256,
        script: None,
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        queue_pairs: 1,
        device_props: String::new(),
    };
    let qmp_path = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_path.display());
    let mut source = qemu(&config, &["-qmp", &qmp_arg])?;
    source.wait_for(READY_MARKER, BOOT)?;
    Ok(Pair {
        lab,
        dir,
        _daemon: daemon,
        config,
        qmp_path,
        source,
    })
}

/// The destination QEMU, waiting for the migration on the second port; and where it listens.
fn start_destination(dir: &Path, config: &GuestConfig) -> Result<(Guest, PathBuf)> {
    let incoming = dir.join("migrate.sock");
    let dst_config = GuestConfig {
        socket: dir.join("dst.sock"),
        ..config.clone()
    };
    let incoming_arg = format!("unix:{}", incoming.display());
    let dest = qemu(&dst_config, &["-incoming", &incoming_arg])?;
    let t_wait = Instant::now();
    while !incoming.exists() {
        ensure!(
            t_wait.elapsed() < Duration::from_secs(20),
            "destination QEMU does not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((dest, incoming))
}

/// Starts the source's migration to `incoming` at `bandwidth` bytes per second at most.
fn start_migration(qmp_path: &Path, incoming: &Path, bandwidth: u64) -> Result<(Qmp, Instant)> {
    let mut qmp = Qmp::connect(qmp_path)?;
    qmp.execute(&format!(
        r#"{{"execute":"migrate-set-parameters","arguments":{{"max-bandwidth":{bandwidth}}}}}"#
    ))?;
    let started = Instant::now();
    qmp.execute(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
        incoming.display()
    ))?;
    Ok((qmp, started))
}

/// Polls `query-migrate` until the migration ends; its final status.
fn wait_migration(qmp: &mut Qmp, started: Instant) -> Result<String> {
    loop {
        let info = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
        let status = info["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            eprintln!(
                "[test] migration {status} after {:.1}s: {info}",
                started.elapsed().as_secs_f64()
            );
            return Ok(status);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(180),
            "migration still {status}: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the wire can ping the guest.
fn wire_reaches_guest(lab: &Lab) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab
        .in_wire("busybox")
        .args(["ping", "-c", "1", "-W", "2", &guest_ip(0)])
        .status()?
        .success()
    {
        ensure!(Instant::now() < deadline, "the wire cannot ping the guest");
    }
    Ok(())
}

#[test]
fn a_guest_streaming_tcp_migrates_to_another_port() -> Result<()> {
    let pair = boot_source("qmig")?;
    let (lab, dir, config, mut source) = (&pair.lab, &pair.dir, &pair.config, pair.source);

    // The wire reaches the guest, then pings it throughout.
    wire_reaches_guest(lab)?;
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = ping_from_wire(lab, guest_ip(0), stop.clone());

    // Streams both ways across the migration: 8 copies of a 16 MiB random block each way
    // (long enough under TCG to outlast the migration), checked block by block against the
    // md5 of the block at the sending end.
    let block = dir.join("down.block");
    let mut data = vec![0u8; BLOCK];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut data)?;
    std::fs::write(&block, &data)?;
    let down_md5 = md5(&block)?;
    let b = block.display();
    let mut wire_sender = lab
        .in_wire("sh")
        .args([
            "-c",
            &format!("for i in 1 2 3 4 5 6 7 8; do cat {b}; done | exec busybox nc -l -p 5002"),
        ])
        .stdin(Stdio::null())
        .spawn()?;
    let received: PathBuf = dir.join("up.recv");
    let mut receiver: Child = lab
        .in_wire("sh")
        .args([
            "-c",
            &format!("exec busybox nc -l -p 5001 > {}", received.display()),
        ])
        .stdin(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    // The markers are split by quotes in the commands, so their echo on the console does not
    // match them.
    let w = lab::WIRE_IP;
    source.send_line(&format!(
        "dd if=/dev/urandom of=/tmp/up bs=65536 count=256 2>/dev/null; \
         echo UP\"\"-MD5 $(md5sum < /tmp/up); \
         (echo DOWN\"\"-MD5 $(nc {w} 5002 | md5sum)) & \
         (for i in 1 2 3 4 5 6 7 8; do cat /tmp/up; done) | nc {w} 5001; echo UP\"\"-DONE rc=$?"
    ))?;
    let sent_md5 = source
        .wait_for("UP-MD5 ", Duration::from_secs(60))?
        .split_whitespace()
        .nth(1)
        .context("md5 in guest output")?
        .to_string();

    let (mut dest, incoming) = start_destination(dir, config)?;

    // Slow enough for several passes over the RAM while the streams run, so pages the
    // daemon writes after their first copy must be copied again.
    let (mut qmp, started) = start_migration(&pair.qmp_path, &incoming, 16 << 20)?;
    let status = wait_migration(&mut qmp, started)?;
    ensure!(status == "completed", "migration {status}");
    source.kill();

    // The streams finish from the destination, intact.
    let done = dest.wait_for("UP-DONE rc=", Duration::from_secs(180))?;
    ensure!(done.contains("rc=0"), "guest nc: {done}");
    let t_recv = Instant::now();
    while receiver.try_wait()?.is_none() {
        if t_recv.elapsed() > Duration::from_secs(30) {
            let _ = receiver.kill();
            bail!("the wire receiver did not see the stream end");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = std::fs::read(&received)?;
    ensure!(
        up.len() == 8 * BLOCK,
        "{} of {} bytes arrived on the wire",
        up.len(),
        8 * BLOCK
    );
    for (i, chunk) in up.chunks(BLOCK).enumerate() {
        let path = dir.join("up.chunk");
        std::fs::write(&path, chunk)?;
        ensure!(
            md5(&path)? == sent_md5,
            "guest -> wire block {i} arrived corrupted"
        );
    }
    let down = dest.wait_for("DOWN-MD5 ", Duration::from_secs(120))?;
    let _ = wire_sender.wait();
    let mut eight = Vec::with_capacity(8 * BLOCK);
    for _ in 0..8 {
        eight.extend_from_slice(&data);
    }
    let all = dir.join("down.all");
    std::fs::write(&all, &eight)?;
    let want_down = md5(&all)?;
    ensure!(
        down.contains(&want_down),
        "wire -> guest stream corrupted: guest says {down:?}, sent {want_down} (block {down_md5})"
    );
    println!("128 MiB each way across the migration, md5 equal at both ends");

    // The guest answers from the destination, and reaches the wire itself.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let replies = pinger.join().expect("pinger");
    let after = replies.iter().filter(|t| **t > started).count();
    let gap = replies
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    println!(
        "migration: {} ping replies (every 100 ms), {after} after the migration began; longest \
         gap without a reply {} ms",
        replies.len(),
        gap.as_millis()
    );
    ensure!(
        replies.last().is_some_and(|t| *t > started),
        "no ping reply after the migration"
    );
    dest.send_line(&format!(
        "ping -c 2 -W 5 {} && echo PING\"\"-OK",
        lab::WIRE_IP
    ))?;
    dest.wait_for("PING-OK", Duration::from_secs(30))?;
    dest.kill();
    Ok(())
}

#[test]
fn a_cancelled_migration_leaves_the_source_working() -> Result<()> {
    let pair = boot_source("qmigc")?;
    let (lab, dir, config, mut source) = (&pair.lab, &pair.dir, &pair.config, pair.source);
    wire_reaches_guest(lab)?;
    let (mut dest, incoming) = start_destination(dir, config)?;
    // Slow, so it is cancelled halfway.
    let (mut qmp, started) = start_migration(&pair.qmp_path, &incoming, 1 << 20)?;
    std::thread::sleep(Duration::from_secs(2));
    qmp.execute(r#"{"execute":"migrate_cancel"}"#)?;
    let status = wait_migration(&mut qmp, started)?;
    ensure!(status == "cancelled", "migration {status}");
    dest.kill();

    // The source's guest keeps its port and its MAC.
    wire_reaches_guest(lab)?;
    source.send_line(&format!(
        "ping -c 2 -W 5 {} && echo PING\"\"-OK",
        lab::WIRE_IP
    ))?;
    source.wait_for("PING-OK", Duration::from_secs(30))?;
    source.kill();
    Ok(())
}
