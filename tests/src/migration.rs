//! Pieces of the live-migration tests with real QEMUs: a QMP session, the wire's pinger, a
//! destination QEMU waiting for the guest, QEMU's `migrate` driven and watched, and one
//! migration of a guest streaming TCP both ways with md5 checked at both ends ([`Leg`]).
//! Used on one host (two ports of one daemon) and between two hosts (two daemons whose
//! wires meet in a bridge).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::frames::{announcement, Announcement};
use crate::guest::{self, md5, qemu_args, Guest, GuestConfig, READY_MARKER};
use crate::lab::{self, guest_ip, guest_mac, Lab};
use crate::wire::WireSocket;

/// One block of the TCP streams.
pub const BLOCK: usize = 16 << 20;

/// One QMP session: the greeting read and capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Self> {
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
    pub fn execute(&mut self, command: &str) -> Result<Value> {
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

/// Pings `ip` from the wire once per 100 ms until stopped; returns every attempt.
pub fn ping_from_wire(
    lab: &Lab,
    ip: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<PingLog> {
    let cmd = lab.in_wire("busybox");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    std::thread::spawn(move || {
        let mut attempts = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = Command::new(&program)
                .args(&args)
                .args(["ping", "-c", "1", "-W", "1", &ip])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            attempts.push((t, ok));
            std::thread::sleep(Duration::from_millis(100).saturating_sub(t.elapsed()));
        }
        PingLog { attempts }
    })
}

/// A ping flood from the wire: an echo request every 10 ms (100 a second, what `ping -f`
/// sends at least), the load the issue has the guest answer while it migrates. Its loss
/// measures the time without frames at a finer grain than the 100 ms pinger.
pub struct PingFlood {
    child: Option<Child>,
}

/// What a flood sent and what the guest answered.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    pub sent: u64,
    pub answered: u64,
}

impl PingFlood {
    pub fn start(lab: &Lab, ip: &str) -> Result<Self> {
        let child = lab
            .in_wire("busybox")
            .args(["ping", "-q", "-i", "0.01", ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the wire's ping flood")?;
        Ok(PingFlood { child: Some(child) })
    }

    /// Stops the flood (SIGINT, on which ping prints its summary) and reads the summary.
    pub fn finish(mut self) -> Result<FloodReport> {
        let child = self.child.take().context("ping flood already finished")?;
        // `ip netns exec` execs the program, so this pid is busybox's.
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .context("stopping the ping flood")?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_flood_summary(&text).with_context(|| format!("ping flood summary: {text:?}"))
    }
}

impl Drop for PingFlood {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// "N packets transmitted, M packets received, ..." as busybox and iputils print it.
fn parse_flood_summary(text: &str) -> Option<FloodReport> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u64>().ok());
    Some(FloodReport {
        sent: numbers.next()?,
        answered: numbers.next()?,
    })
}

/// The wire's pings: when each was sent and whether the guest answered (within 1 s).
pub struct PingLog {
    pub attempts: Vec<(Instant, bool)>,
}

impl PingLog {
    /// When the answered pings were sent.
    pub fn replies(&self) -> Vec<Instant> {
        self.attempts
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(t, _)| *t)
            .collect()
    }

    /// The pings sent from `from - 1 s` to `to + 2 s` that the guest did not answer.
    pub fn lost(&self, from: Instant, to: Instant) -> usize {
        self.attempts
            .iter()
            .filter(|(t, ok)| !ok && in_window(*t, from, to))
            .count()
    }

    /// The longest gap between two answered pings from `from - 1 s` to `to + 2 s` (the wire
    /// pings every 100 ms).
    pub fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let window: Vec<Instant> = self
            .replies()
            .into_iter()
            .filter(|t| in_window(*t, from, to))
            .collect();
        window
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }
}

fn in_window(t: Instant, from: Instant, to: Instant) -> bool {
    t + Duration::from_secs(1) >= from && t <= to + Duration::from_secs(2)
}

pub fn qemu(config: &GuestConfig, extra: &[&str]) -> Result<Guest> {
    let (kernel, initrd) = guest::image()?;
    // The QEMU the suite runs, with the command line its version needs.
    let mut cmd = Command::new(guest::qemu_binary());
    cmd.args(qemu_args(config, &kernel, &initrd)).args(extra);
    Guest::spawn(cmd)
}

/// How long a guest may take to boot under TCG.
pub const BOOT: Duration = Duration::from_secs(60);

/// The guest the migration tests move: guest 0's MAC and address, 256 MiB, one queue pair,
/// its port at `socket`, `device_props` added to its virtio-net device.
pub fn migrating_guest(socket: PathBuf, device_props: &str) -> GuestConfig {
    GuestConfig {
        socket,
        mac: lab::mac_str(guest_mac(0)),
        ip: format!("{}/{}", guest_ip(0), lab::PREFIX),
        memory_mib: 256,
        script: None,
        reconnect: None,
        qemu_listens: false,
        allow_reboot: false,
        queue_pairs: 1,
        device_props: device_props.to_string(),
    }
}

/// Boots `config`'s guest with its QMP socket at `qmp_path` (it is the source of the first
/// migration).
pub fn boot_source_guest(config: &GuestConfig, qmp_path: &Path) -> Result<Guest> {
    let mut guest = qemu(config, &["-qmp", &qmp_arg(qmp_path)])?;
    guest.wait_for(READY_MARKER, BOOT)?;
    Ok(guest)
}

/// The QMP argument for a socket at `path`.
pub fn qmp_arg(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// A QEMU waiting for a migration, on port `socket`, with a QMP socket of its own (it is the
/// source of the next migration); where it listens for the migration and its QMP socket.
pub fn start_destination(
    dir: &Path,
    config: &GuestConfig,
    socket: &Path,
    name: &str,
) -> Result<(Guest, PathBuf, PathBuf)> {
    let incoming = dir.join(format!("migrate-{name}.sock"));
    let qmp_path = dir.join(format!("qmp-{name}.sock"));
    let dst_config = GuestConfig {
        socket: socket.to_path_buf(),
        ..config.clone()
    };
    let incoming_arg = format!("unix:{}", incoming.display());
    let dest = qemu(
        &dst_config,
        &["-incoming", &incoming_arg, "-qmp", &qmp_arg(&qmp_path)],
    )?;
    let t_wait = Instant::now();
    while !incoming.exists() {
        ensure!(
            t_wait.elapsed() < Duration::from_secs(20),
            "destination QEMU does not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((dest, incoming, qmp_path))
}

/// Starts the source's migration to `incoming` at `bandwidth` bytes per second at most and
/// with `downtime_ms` as QEMU's downtime limit.
pub fn start_migration(
    qmp_path: &Path,
    incoming: &Path,
    bandwidth: u64,
    downtime_ms: u64,
) -> Result<(Qmp, Instant)> {
    let mut qmp = Qmp::connect(qmp_path)?;
    qmp.execute(&format!(
        r#"{{"execute":"migrate-set-parameters","arguments":{{"max-bandwidth":{bandwidth},"downtime-limit":{downtime_ms}}}}}"#
    ))?;
    let started = Instant::now();
    qmp.execute(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"unix:{}"}}}}"#,
        incoming.display()
    ))?;
    Ok((qmp, started))
}

/// Polls `query-migrate` until the migration ends; its final status and QEMU's downtime (ms).
pub fn wait_migration(qmp: &mut Qmp, started: Instant) -> Result<(String, u64)> {
    loop {
        let info = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
        let status = info["status"].as_str().unwrap_or("").to_string();
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            eprintln!(
                "[test] migration {status} after {:.1}s: {info}",
                started.elapsed().as_secs_f64()
            );
            return Ok((status, info["downtime"].as_u64().unwrap_or(0)));
        }
        ensure!(
            started.elapsed() < Duration::from_secs(180),
            "migration still {status}: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until QEMU has synchronised its dirty bitmap `passes` times (the first at the
/// start): every page has been copied once by then.
pub fn wait_ram_passes(qmp: &mut Qmp, passes: u64) -> Result<()> {
    let t = Instant::now();
    loop {
        let info = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
        if info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= passes {
            return Ok(());
        }
        ensure!(
            matches!(info["status"].as_str(), Some("setup" | "active"))
                && t.elapsed() < Duration::from_secs(120),
            "migration before its pass {passes}: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the wire can ping the guest.
pub fn wire_reaches_guest(lab: &Lab) -> Result<()> {
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

/// The guest's announcements the wire saw, with when each arrived.
pub type Announcements = std::thread::JoinHandle<Vec<(Instant, Announcement)>>;

/// Watches the wire for the guest's announcements until the returned flag is set.
pub fn watch_announcements(lab: &Lab) -> Result<(Arc<AtomicBool>, Announcements)> {
    let wire = WireSocket::open(lab)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let mac = guest_mac(0);
    let watcher = std::thread::spawn(move || {
        wire.watch(&flag, |f| announcement(f, mac).is_some())
            .into_iter()
            .filter_map(|(t, f)| Some((t, announcement(&f, mac)?)))
            .collect()
    });
    Ok((stop, watcher))
}

/// One migration of the guest under TCP streams both ways (`blocks` times 16 MiB each).
pub struct Leg<'a> {
    pub lab: &'a Lab,
    pub dir: &'a Path,
    pub config: &'a GuestConfig,
    /// The port the guest goes to.
    pub to: PathBuf,
    pub name: &'a str,
    pub blocks: usize,
    /// The wire's TCP ports for this leg's streams: down (wire -> guest), up (guest -> wire).
    pub tcp_ports: (u16, u16),
}

/// What a leg measured.
pub struct LegReport {
    pub started: Instant,
    pub ended: Instant,
    pub qemu_downtime_ms: u64,
    pub announced: Vec<Announcement>,
}

impl Leg<'_> {
    /// Migrates the guest running in `from` (QMP at `from_qmp`) to a new QEMU on `self.to`
    /// while it streams; the streams end intact on the new QEMU, which is returned with its
    /// QMP socket.
    pub fn run(&self, from: &mut Guest, from_qmp: &Path) -> Result<(Guest, PathBuf, LegReport)> {
        let (lab, dir, blocks) = (self.lab, self.dir, self.blocks);
        // One 16 MiB random block, sent `blocks` times each way and checked at the far end.
        let block = dir.join(format!("down-{}.block", self.name));
        let mut data = vec![0u8; BLOCK];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut data)?;
        std::fs::write(&block, &data)?;
        let (down_port, up_port) = self.tcp_ports;
        let b = block.display();
        // The wire's stream starts when the test says (`go`), once QEMU has copied the RAM.
        let go = dir.join(format!("go-{}", self.name));
        let g = go.display();
        let mut wire_sender = lab
            .in_wire("sh")
            .args([
                "-c",
                &format!(
                    "(while [ ! -e {g} ]; do sleep 0.1; done; \
                     i=0; while [ $i -lt {blocks} ]; do cat {b}; i=$((i+1)); done) \
                     | exec busybox nc -l -p {down_port}"
                ),
            ])
            .stdin(Stdio::null())
            .spawn()?;
        let received: PathBuf = dir.join(format!("up-{}.recv", self.name));
        let mut receiver: Child = lab
            .in_wire("sh")
            .args([
                "-c",
                &format!("exec busybox nc -l -p {up_port} > {}", received.display()),
            ])
            .stdin(Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        // The markers are split by quotes in the commands, so their echo on the console does
        // not match them. The guest's reader of the wire's stream connects, then is paused
        // (SIGSTOP) until the migration is over; the stream goes through a FIFO so that the
        // reader's pid is known, and its input is a FIFO nobody writes (a background
        // command's stdin is /dev/null, and nc ends the connection at its end). All of it runs
        // in the background, so the shell takes the next command at once. The background
        // shell waits for the reader before it ends: a process group left without its parent
        // while one of its members is stopped gets SIGHUP from the kernel, which would kill
        // the paused reader (and reset its connection) if the guest's own stream ended first.
        let w = lab::WIRE_IP;
        let from_line = from.console_len();
        from.send_line(&format!(
            "(dd if=/dev/urandom of=/tmp/up bs=65536 count=256 2>/dev/null; \
             echo UP\"\"-MD5 $(md5sum < /tmp/up); rm -f /tmp/down /tmp/hold; \
             mkfifo /tmp/down /tmp/hold; exec 3<>/tmp/hold; \
             (echo DOWN\"\"-MD5 $(md5sum < /tmp/down)) & \
             nc {w} {down_port} <&3 > /tmp/down & echo $! > /tmp/down.pid; sleep 1; kill -STOP $!; \
             echo READER\"\"-PAUSED; \
             i=0; while [ $i -lt {blocks} ]; do cat /tmp/up; i=$((i+1)); done \
             | nc {w} {up_port}; echo UP\"\"-DONE rc=$?; wait) &"
        ))?;
        // The line may start with the shell's prompt.
        let sent_md5 = from
            .wait_for_from("UP-MD5 ", from_line, Duration::from_secs(60))?
            .split("UP-MD5 ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .context("md5 in guest output")?
            .to_string();
        from.wait_for_from("READER-PAUSED", from_line, Duration::from_secs(30))?;

        let (mut dest, incoming, dest_qmp) =
            start_destination(dir, self.config, &self.to, self.name)?;
        let (watch_stop, watcher) = watch_announcements(lab)?;
        // Slow enough for several passes over the RAM while the guest streams to the wire,
        // and held from completing (1 ms downtime limit) until the wire's stream has filled
        // the paused reader's socket buffer after QEMU's first pass: see the module's doc.
        let (mut qmp, started) = start_migration(from_qmp, &incoming, 16 << 20, 1)?;
        wait_ram_passes(&mut qmp, 2)?;
        std::fs::write(&go, b"")?;
        std::thread::sleep(Duration::from_millis(1500));
        qmp.execute(r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300}}"#)?;
        let (status, qemu_downtime_ms) = wait_migration(&mut qmp, started)?;
        ensure!(status == "completed", "migration {status}");
        let ended = Instant::now();
        // A short stream to the wire may have ended before the migration did.
        let done_on_source = from
            .console()
            .into_iter()
            .skip(from_line)
            .find(|line| line.contains("UP-DONE rc="));
        from.kill();
        dest.send_line("kill -CONT $(cat /tmp/down.pid)")?;

        // The streams finish from the destination, intact.
        let done = match done_on_source {
            Some(line) => line,
            None => dest.wait_for("UP-DONE rc=", Duration::from_secs(180))?,
        };
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
            up.len() == blocks * BLOCK,
            "{} of {} bytes arrived on the wire",
            up.len(),
            blocks * BLOCK
        );
        for (i, chunk) in up.chunks(BLOCK).enumerate() {
            let path = dir.join("up.chunk");
            std::fs::write(&path, chunk)?;
            if md5(&path)? != sent_md5 {
                // Where it differs from the other copies of the block, to tell a corrupted
                // range from a wrong checksum.
                let differs: Vec<String> = up
                    .chunks(BLOCK)
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(j, other)| {
                        let at = chunk.iter().zip(other).position(|(a, b)| a != b);
                        format!("block {j}: first difference at {at:?}")
                    })
                    .collect();
                bail!(
                    "guest -> wire block {i} arrived corrupted; {}",
                    differs.join(", ")
                );
            }
        }
        let down = dest.wait_for("DOWN-MD5 ", Duration::from_secs(120))?;
        let _ = wire_sender.wait();
        let all = dir.join("down.all");
        std::fs::write(&all, data.repeat(blocks))?;
        let want_down = md5(&all)?;
        ensure!(
            down.contains(&want_down),
            "wire -> guest stream corrupted: the guest read {down:?}, the wire sent {want_down} \
             (stale pages on the destination: a write the daemon did not mark dirty?)"
        );
        println!(
            "{}: {} MiB each way across the migration, md5 equal at both ends",
            self.name,
            blocks * 16
        );
        watch_stop.store(true, Ordering::Relaxed);
        let announced = watcher.join().expect("watcher");
        let announced = announced
            .into_iter()
            .filter(|(t, _)| *t > started)
            .map(|(_, a)| a)
            .collect();
        Ok((
            dest,
            dest_qmp,
            LegReport {
                started,
                ended,
                qemu_downtime_ms,
                announced,
            },
        ))
    }
}

/// Prints each migration's figures (its time, QEMU's downtime, the wire's pings lost and
/// the longest gap between replies, the announcements seen) and checks that the wire saw
/// the guest's gratuitous ARP after each and a ping reply after the last.
pub fn report_legs(pings: &PingLog, flood: FloodReport, legs: &[(&str, &LegReport)]) -> Result<()> {
    let lost = flood.sent.saturating_sub(flood.answered);
    println!(
        "ping flood through all migrations: {} sent (one every 10 ms), {} answered, {lost} lost, \
         about {} ms without replies in all",
        flood.sent,
        flood.answered,
        lost * 10
    );
    // A guest that stopped answering after a migration fails here; a second or two of
    // switch-over, or replies lost under the TCP streams, do not.
    ensure!(
        flood.answered * 2 >= flood.sent,
        "the guest answered only {} of the flood's {} pings",
        flood.answered,
        flood.sent
    );
    for (name, leg) in legs {
        println!(
            "migration {name}: {:.1} s, downtime {} ms as QEMU counts it, {} pings lost \
             (one every 100 ms), longest gap between ping replies {} ms; announcements on the \
             wire: {:?}",
            (leg.ended - leg.started).as_secs_f64(),
            leg.qemu_downtime_ms,
            pings.lost(leg.started, leg.ended),
            pings.longest_gap(leg.started, leg.ended).as_millis(),
            leg.announced
        );
        ensure!(
            leg.announced.contains(&Announcement::GratuitousArp),
            "migration {name}: the wire saw no gratuitous ARP from the guest"
        );
    }
    let last = legs.last().map(|(_, leg)| leg.ended);
    ensure!(
        last.is_none_or(|end| pings.replies().last().is_some_and(|t| *t > end)),
        "no ping reply after the last migration"
    );
    Ok(())
}

/// The guest pings the wire itself.
pub fn guest_reaches_wire(guest: &mut Guest) -> Result<()> {
    guest.send_line(&format!(
        "ping -c 2 -W 5 {} && echo PING\"\"-OK",
        lab::WIRE_IP
    ))?;
    guest.wait_for("PING-OK", Duration::from_secs(30))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_flood_summary;

    #[test]
    fn a_flood_summary_gives_what_was_sent_and_answered() {
        let busybox = "PING 10.0.0.2 (10.0.0.2): 56 data bytes\n\n--- 10.0.0.2 ping statistics ---\n2514 packets transmitted, 2507 packets received, 0% packet loss\nround-trip min/avg/max = 0.2/1.1/9.8 ms\n";
        let r = parse_flood_summary(busybox).unwrap();
        assert_eq!((r.sent, r.answered), (2514, 2507));
        let iputils = "--- 10.0.0.2 ping statistics ---\n300 packets transmitted, 12 received, +3 errors, 96% packet loss, time 2990ms\n";
        let r = parse_flood_summary(iputils).unwrap();
        assert_eq!((r.sent, r.answered), (300, 12));
        assert!(parse_flood_summary("ping: bad address").is_none());
    }
}
