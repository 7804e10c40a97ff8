//! Benchmark building blocks: a traffic generator (the kernel's pktgen where it exists, XDP
//! live frames, or an AF_XDP transmitter), the guest side (the test frontend counting received
//! frames or keeping its tx ring full), counters on the wire, CPU pinning and per-process CPU
//! and memory figures.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::frontend::{VirtioNetFrontend, RX_QUEUE, TX_QUEUE};

/// The eBPF object holding the generator program, built by `cargo xtask build`.
pub fn generator_object() -> PathBuf {
    std::env::var_os("XVDPA_BENCH_TX_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            crate::workspace_root().join("target/ebpf/bpfel-unknown-none/release/xvdpa-bench-tx")
        })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP/IPv4 frame of `len` bytes (Ethernet header included, FCS not: a "64-byte frame" on
/// the wire is 60 here), with a valid IPv4 header checksum and UDP checksum 0 (none).
pub fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    src_ip: [u8; 4],
    dst_ip: [u8; 4],
    sport: u16,
    dport: u16,
    len: usize,
) -> Vec<u8> {
    assert!(len >= 42, "Ethernet + IPv4 + UDP need 42 bytes");
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src_ip);
    ip[16..20].copy_from_slice(&dst_ip);
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// `union bpf_attr`'s BPF_PROG_TEST_RUN member.
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// How the generator puts frames on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeneratorKind {
    /// The first of the others that works here.
    Auto,
    /// The kernel's pktgen (`/proc/net/pktgen`), on the load CPU's kernel thread.
    Pktgen,
    /// BPF_PROG_RUN with BPF_F_TEST_XDP_LIVE_FRAMES: XDP_TX of a template from the kernel.
    XdpLive,
    /// An AF_XDP socket on the wire interface, transmitting from userspace (copy mode).
    AfXdp,
}

impl GeneratorKind {
    pub fn name(self) -> &'static str {
        match self {
            GeneratorKind::Auto => "auto",
            GeneratorKind::Pktgen => "pktgen",
            GeneratorKind::XdpLive => "xdp-live",
            GeneratorKind::AfXdp => "af-xdp",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => GeneratorKind::Auto,
            "pktgen" => GeneratorKind::Pktgen,
            "xdp-live" => GeneratorKind::XdpLive,
            "af-xdp" => GeneratorKind::AfXdp,
            other => bail!("unknown generator {other:?} (auto, pktgen, xdp-live, af-xdp)"),
        })
    }
}

/// Sends copies of a template frame out of an interface as fast as one CPU allows, until
/// stopped. With `flows` > 1 the UDP source port cycles through `flows` values from the
/// template's.
pub struct Generator {
    kind: GeneratorKind,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
    /// pktgen's control file (opened inside the namespace: pktgen is per namespace), written
    /// "stop" to end a run.
    pktgen_ctl: Option<std::fs::File>,
}

/// Moves the calling (generator) thread into the namespace `ns_file` names, and onto `cpu`.
fn enter_namespace(ns_file: &std::fs::File, cpu: Option<usize>) -> Result<()> {
    // SAFETY: setns on this thread with a namespace fd we hold open.
    if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    if let Some(cpu) = cpu {
        pin_thread(cpu)?;
    }
    Ok(())
}

/// Hands a generator thread's setup outcome to the thread that started it (`R`) and returns
/// what the generator keeps (`T`); a failed setup ends the thread with the same error.
fn report<T, R>(setup: Result<(T, R)>, ready: &std::sync::mpsc::Sender<Result<R>>) -> Result<T> {
    match setup {
        Ok((keep, give)) => {
            let _ = ready.send(Ok(give));
            Ok(keep)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = ready.send(Err(e));
            bail!("{msg}")
        }
    }
}

/// The UDP source port of a frame from [`udp_frame`].
fn frame_sport(frame: &[u8]) -> u16 {
    frame
        .get(34..36)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .unwrap_or(1024)
}

impl Generator {
    /// Starts a generator of `kind` on `ifname` in namespace `netns`, pinned to `cpu`.
    /// `Auto` tries pktgen, then XDP live frames, then AF_XDP, and says which it took.
    pub fn start_kind(
        kind: GeneratorKind,
        netns: &str,
        ifname: &str,
        frame: Vec<u8>,
        flows: u32,
        cpu: Option<usize>,
    ) -> Result<Generator> {
        match kind {
            GeneratorKind::Pktgen => Self::start_pktgen(netns, ifname, frame, flows, cpu),
            GeneratorKind::XdpLive => Self::start(netns, ifname, frame, flows, cpu),
            GeneratorKind::AfXdp => Self::start_af_xdp(netns, ifname, frame, flows, cpu),
            GeneratorKind::Auto => Self::start_pktgen(netns, ifname, frame.clone(), flows, cpu)
                .or_else(|e| {
                    eprintln!("[bench] pktgen unavailable ({e:#}); trying XDP live frames");
                    Self::start(netns, ifname, frame.clone(), flows, cpu)
                })
                .or_else(|e| {
                    eprintln!(
                        "[bench] XDP live frames unavailable ({e:#}); using an AF_XDP transmitter"
                    );
                    Self::start_af_xdp(netns, ifname, frame, flows, cpu)
                }),
        }
    }

    /// Which generator runs.
    pub fn kind(&self) -> GeneratorKind {
        self.kind
    }

    /// Starts generating with XDP live frames on `ifname` in namespace `netns`, pinned to
    /// `cpu`.
    pub fn start(
        netns: &str,
        ifname: &str,
        frame: Vec<u8>,
        flows: u32,
        cpu: Option<usize>,
    ) -> Result<Generator> {
        let object = std::fs::read(generator_object()).with_context(|| {
            format!(
                "{} (built by `cargo xtask build`)",
                generator_object().display()
            )
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let ns_file = std::fs::File::open(format!("/var/run/netns/{netns}"))
            .with_context(|| format!("namespace {netns}"))?;
        let ifname = ifname.to_string();
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let thread = std::thread::Builder::new()
            .name("bench-generator".into())
            .spawn(move || -> Result<()> {
                let setup = (|| -> Result<((aya::Ebpf, u32), ())> {
                    enter_namespace(&ns_file, cpu)?;
                    let ifindex =
                        crate::netns::ifindex(&ifname).context("the generator's interface")?;
                    let mut ebpf =
                        aya::Ebpf::load(&object).context("loading the generator program")?;
                    {
                        let mut flows_map: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
                            ebpf.map_mut("FLOWS").context("FLOWS map")?,
                        )?;
                        flows_map.set(0, flows.max(1), 0)?;
                        flows_map.set(1, u32::from(frame_sport(&frame)), 0)?;
                    }
                    let prog: &mut aya::programs::Xdp = ebpf
                        .program_mut("xvdpa_bench_tx")
                        .context("generator program")?
                        .try_into()?;
                    prog.load().context("verifying the generator program")?;
                    Ok(((ebpf, ifindex), ()))
                })();
                let (ebpf, ifindex) = report(setup, &ready_tx)?;
                let prog: &aya::programs::Xdp =
                    ebpf.program("xvdpa_bench_tx").unwrap().try_into()?;
                let fd = prog.fd()?.as_fd().as_raw_fd();
                let mut data = frame.clone();
                let mut ctx = XdpMd {
                    data: 0,
                    data_end: data.len() as u32,
                    ingress_ifindex: ifindex,
                    ..Default::default()
                };
                // Setting up a live-frames run costs ~25 ms, so each call is long, and stop()
                // interrupts it with a signal (the kernel checks for one between batches).
                const REPEAT: u32 = 1 << 26;
                while !stop2.load(Ordering::Relaxed) {
                    let mut attr = TestRunAttr {
                        prog_fd: fd as u32,
                        data_size_in: data.len() as u32,
                        data_in: data.as_mut_ptr() as u64,
                        repeat: REPEAT,
                        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
                        ctx_in: (&mut ctx as *mut XdpMd) as u64,
                        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
                        batch_size: 64,
                        ..Default::default()
                    };
                    // SAFETY: bpf(2) with a correctly laid out attribute whose pointers reference
                    // live buffers of the sizes given.
                    let r = unsafe {
                        libc::syscall(
                            libc::SYS_bpf,
                            BPF_PROG_TEST_RUN,
                            &mut attr as *mut TestRunAttr,
                            std::mem::size_of::<TestRunAttr>(),
                        )
                    };
                    if r != 0 {
                        let e = std::io::Error::last_os_error();
                        if e.raw_os_error() == Some(libc::EINTR) {
                            continue;
                        }
                        return Err(e).context("BPF_PROG_TEST_RUN with live frames");
                    }
                    sent2.fetch_add(u64::from(REPEAT), Ordering::Relaxed);
                }
                Ok(())
            })?;
        ready_rx.recv().context("generator thread died")??;
        Ok(Generator {
            kind: GeneratorKind::XdpLive,
            stop,
            sent,
            thread: Some(thread),
            pktgen_ctl: None,
        })
    }

    /// The kernel's pktgen, on the kernel thread of `cpu` (0 when unpinned). pktgen is
    /// per network namespace, so it is configured through this thread's view of /proc/net.
    fn start_pktgen(
        netns: &str,
        ifname: &str,
        frame: Vec<u8>,
        flows: u32,
        cpu: Option<usize>,
    ) -> Result<Generator> {
        let _ = std::process::Command::new("modprobe")
            .arg("pktgen")
            .stderr(std::process::Stdio::null())
            .status();
        let ns_file = std::fs::File::open(format!("/var/run/netns/{netns}"))
            .with_context(|| format!("namespace {netns}"))?;
        let ifname = ifname.to_string();
        let cpu = cpu.unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<std::fs::File>>();
        let thread = std::thread::Builder::new()
            .name("bench-pktgen".into())
            .spawn(move || -> Result<()> {
                let setup = (|| -> Result<PathBuf> {
                    enter_namespace(&ns_file, None)?;
                    let dir = PathBuf::from("/proc/thread-self/net/pktgen");
                    let ctl = dir.join("pgctrl");
                    if !ctl.exists() {
                        bail!("this kernel has no pktgen ({} missing)", ctl.display());
                    }
                    let put = |file: &std::path::Path, cmd: &str| -> Result<()> {
                        std::fs::write(file, cmd)
                            .with_context(|| format!("pktgen: {cmd:?} > {}", file.display()))
                    };
                    let thread_file = dir.join(format!("kpktgend_{cpu}"));
                    put(&thread_file, "rem_device_all")?;
                    put(&thread_file, &format!("add_device {ifname}"))?;
                    let dev = dir.join(&ifname);
                    let mac = |b: &[u8]| {
                        b.iter()
                            .map(|x| format!("{x:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    };
                    let ip = |b: &[u8]| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3]);
                    let sport = frame_sport(&frame);
                    for cmd in [
                        "count 0".to_string(),
                        "clone_skb 1000".to_string(),
                        "burst 32".to_string(),
                        format!("pkt_size {}", frame.len()),
                        format!("dst_mac {}", mac(&frame[0..6])),
                        format!("src_mac {}", mac(&frame[6..12])),
                        format!("src_min {}", ip(&frame[26..30])),
                        format!("src_max {}", ip(&frame[26..30])),
                        format!("dst {}", ip(&frame[30..34])),
                        format!("udp_src_min {sport}"),
                        format!("udp_src_max {}", u32::from(sport) + flows.max(1) - 1),
                        format!("udp_dst_min {}", u16::from_be_bytes([frame[36], frame[37]])),
                        format!("udp_dst_max {}", u16::from_be_bytes([frame[36], frame[37]])),
                    ] {
                        put(&dev, &cmd)?;
                    }
                    Ok(ctl)
                })();
                let setup = setup.and_then(|ctl| {
                    let stopper = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&ctl)
                        .context("opening pgctrl")?;
                    Ok((ctl, stopper))
                });
                let ctl = report(setup, &ready_tx)?;
                // Blocks until another thread writes "stop".
                std::fs::write(&ctl, "start").context("pktgen start")?;
                Ok(())
            })?;
        let ctl = ready_rx.recv().context("pktgen thread died")??;
        Ok(Generator {
            kind: GeneratorKind::Pktgen,
            stop,
            sent,
            thread: Some(thread),
            pktgen_ctl: Some(ctl),
        })
    }

    /// An AF_XDP transmitter on `ifname` queue 0 (copy mode): a UMEM of prebuilt frames, one
    /// per flow, resent as completions come back.
    fn start_af_xdp(
        netns: &str,
        ifname: &str,
        frame: Vec<u8>,
        flows: u32,
        cpu: Option<usize>,
    ) -> Result<Generator> {
        use std::num::NonZeroU32;
        use xdpilone::xdp::XdpDesc;
        use xdpilone::{IfInfo, Socket, SocketConfig};
        use xvdpa::nic::xsk::UmemArea;

        let ns_file = std::fs::File::open(format!("/var/run/netns/{netns}"))
            .with_context(|| format!("namespace {netns}"))?;
        let ifname = ifname.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("bench-afxdp".into())
            .spawn(move || -> Result<()> {
                const FRAMES: u32 = 4096;
                const FRAME_SIZE: u32 = 2048;
                let setup = (|| -> Result<_> {
                    enter_namespace(&ns_file, cpu)?;
                    if frame.len() > FRAME_SIZE as usize {
                        bail!(
                            "frame of {} bytes does not fit a {FRAME_SIZE}-byte UMEM frame",
                            frame.len()
                        );
                    }
                    // The daemon's own UMEM type: it maps, registers and unmaps in order.
                    let (area, mut frames) =
                        UmemArea::new(FRAMES, FRAME_SIZE).context("UMEM mapping")?;
                    let sport = frame_sport(&frame);
                    for (i, slot) in frames.iter_mut().enumerate() {
                        let buf = area.frame_mut(slot);
                        buf[..frame.len()].copy_from_slice(&frame);
                        if flows > 1 && frame.len() >= 36 {
                            let p = (u32::from(sport) + i as u32 % flows) as u16;
                            buf[34..36].copy_from_slice(&p.to_be_bytes());
                        }
                    }
                    // From here on the frames only go round the tx and completion rings, by
                    // address; nothing writes them again.
                    let free: Vec<u64> = frames.iter().map(|f| area.addr(f)).collect();
                    let umem = area
                        .register(FRAMES, FRAMES, false)
                        .context("AF_XDP UMEM")?;
                    let errno = |what: &'static str| {
                        move |e: xdpilone::Errno| {
                            anyhow::anyhow!("AF_XDP {what}: errno {}", e.get_raw())
                        }
                    };
                    let mut info = IfInfo::invalid();
                    info.from_ifindex(crate::netns::ifindex(&ifname)?)
                        .map_err(errno("interface"))?;
                    info.set_queue(0);
                    let sock = Socket::with_shared(&info, umem.xdp()).map_err(errno("socket"))?;
                    let device = umem.xdp().fq_cq(&sock).map_err(errno("rings"))?;
                    let user = umem
                        .xdp()
                        .rx_tx(
                            &sock,
                            &SocketConfig {
                                rx_size: None,
                                tx_size: NonZeroU32::new(FRAMES),
                                bind_flags: SocketConfig::XDP_BIND_COPY
                                    | SocketConfig::XDP_BIND_NEED_WAKEUP,
                            },
                        )
                        .map_err(errno("tx ring"))?;
                    let tx = user.map_tx().map_err(errno("tx ring mapping"))?;
                    umem.xdp().bind(&user).map_err(errno("bind"))?;
                    Ok(((umem, device, user, tx, free), ()))
                })();
                // Bindings drop in reverse order: the rings and socket before the UMEM.
                let (_umem, mut device, _user, mut tx, mut free) = report(setup, &ready_tx)?;
                let mut in_flight = 0u32;
                while !stop2.load(Ordering::Relaxed) {
                    {
                        let mut c = device.complete(in_flight);
                        while let Some(addr) = c.read() {
                            free.push(addr - addr % u64::from(FRAME_SIZE));
                            in_flight -= 1;
                            sent2.fetch_add(1, Ordering::Relaxed);
                        }
                        c.release();
                    }
                    let n = free.len().min(64);
                    if n > 0 {
                        let mut w = tx.transmit(n as u32);
                        let put = w.insert(free[free.len() - n..].iter().map(|&addr| XdpDesc {
                            addr,
                            len: frame.len() as u32,
                            options: 0,
                        }));
                        w.commit();
                        free.truncate(free.len() - put as usize);
                        in_flight += put;
                    }
                    tx.wake();
                }
                Ok(())
            })?;
        ready_rx.recv().context("AF_XDP generator thread died")??;
        Ok(Generator {
            kind: GeneratorKind::AfXdp,
            stop,
            sent,
            thread: Some(thread),
            pktgen_ctl: None,
        })
    }

    /// Interrupts the generator's running syscall: a no-op SIGUSR1 handler installed without
    /// SA_RESTART makes BPF_PROG_RUN return EINTR at its next batch.
    fn interrupt(&self) {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        extern "C" fn nothing(_: libc::c_int) {}
        HANDLER.call_once(|| {
            // SAFETY: installing a handler that does nothing; sigaction is zeroed plain data.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
            }
        });
        if let Some(t) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the thread is alive until joined, which happens after this.
            unsafe { libc::pthread_kill(t.as_pthread_t(), libc::SIGUSR1) };
        }
    }

    /// Frames handed to the device by completed runs (a run interrupted by stop() is not
    /// counted: receivers count what arrived).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.interrupt();
        if let Some(mut ctl) = self.pktgen_ctl.take() {
            std::io::Write::write_all(&mut ctl, b"stop").context("pktgen stop")?;
        }
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| anyhow::anyhow!("generator panicked"))??;
        }
        Ok(self.sent())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.interrupt();
        if let Some(mut ctl) = self.pktgen_ctl.take() {
            let _ = std::io::Write::write_all(&mut ctl, b"stop");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An interface counter from sysfs, read inside `netns`. (sysfs shows the interfaces of the
/// namespace that mounted it, so the read goes through `ip netns exec`, which remounts it.)
pub fn iface_counter(netns: &str, ifname: &str, counter: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{ifname}/statistics/{counter}");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "cat", &path])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| {
        format!(
            "{path} in {netns}: {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) one thread `tid` of process `pid` has used.
pub fn task_cpu_seconds(pid: u32, tid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// CPU seconds used so far by the kernel threads that poll `iface`'s NAPI instances when
/// they run threaded (`napi/<iface>-<id>`): receive work done for the datapath, counted with
/// it.
pub fn napi_threads_cpu_seconds(iface: &str) -> Result<f64> {
    let prefix = format!("napi/{iface}-");
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim_end().starts_with(&prefix) {
            // A thread that ends between the listing and here used nothing more.
            total += process_cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// NET_RX softirqs CPU `cpu` has run so far (/proc/softirqs): each is a round of the kernel's
/// receive work (NAPI polls, XDP, the copy into an AF_XDP UMEM) in that CPU's softirq.
pub fn cpu_net_rx_softirqs(cpu: usize) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/softirqs").context("reading /proc/softirqs")?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .context("no NET_RX in /proc/softirqs")?;
    line.split_whitespace()
        .nth(cpu + 1)
        .with_context(|| format!("no CPU {cpu} in /proc/softirqs"))?
        .parse()
        .context("/proc/softirqs format")
}

/// utime + stime from a `/proc/.../stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (u64, u64) = (fields[11].parse()?, fields[12].parse()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) as f64 / hz)
}

/// Resident memory of a process in bytes.
pub fn process_rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// CPU seconds the calling thread has used.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// While traffic flows, the rx guest side looks at its ring at most this often unless a look
/// finds [`RX_COALESCE_FRAMES`] or more: interrupt coalescing (`ethtool -C rx-usecs`) in a
/// polling loop. Looking after every device batch (a few dozen frames) took 18 % of the CPU
/// it shares with the generator at 64 B; this takes 9-10 %. A sleep lasts 50-100 µs (timer
/// slack included), which the 1024-entry ring holds up to 10 Mpps.
const RX_COALESCE_INTERVAL: Duration = Duration::from_micros(50);
const RX_COALESCE_FRAMES: usize = 256;

/// The guest side of the rx scenario: keeps the rx ring stocked and counts what arrives,
/// sleeping on the device's notification when the ring is quiet (light polling).
pub fn guest_rx_count(
    fe: &mut VirtioNetFrontend,
    duration: Duration,
    buf_len: u32,
) -> Result<(u64, f64)> {
    let cpu0 = thread_cpu_seconds();
    fe.set_napi_mode()?;
    fe.post_rx_buffers(fe.free_descriptors(RX_QUEUE), buf_len)?;
    let end = Instant::now() + duration;
    let mut frames = 0u64;
    while Instant::now() < end {
        let n = fe.reclaim_used(RX_QUEUE)?;
        if n == 0 {
            fe.napi_wait(RX_QUEUE, Duration::from_millis(1))?;
            continue;
        }
        frames += n as u64;
        fe.post_rx_buffers(n, buf_len)?;
        if n < RX_COALESCE_FRAMES {
            std::thread::sleep(RX_COALESCE_INTERVAL);
        }
    }
    Ok((frames, thread_cpu_seconds() - cpu0))
}

/// Refills the tx ring with the template (kicking only when the device asks for kicks) and
/// returns how many chains the device had finished since the last call.
fn keep_tx_full(fe: &mut VirtioNetFrontend) -> Result<usize> {
    if fe.post_tx_template(usize::MAX)? > 0 && fe.device_wants_kick(TX_QUEUE)? {
        fe.kick(TX_QUEUE)?;
    }
    fe.reclaim_used(TX_QUEUE)
}

/// The guest side of the tx scenario: keeps the tx ring full of `frame`, kicking only when
/// the device asks for kicks. Returns (frames the device consumed, CPU seconds spent).
pub fn guest_tx_blast(
    fe: &mut VirtioNetFrontend,
    frame: &[u8],
    duration: Duration,
) -> Result<(u64, f64)> {
    let cpu0 = thread_cpu_seconds();
    fe.set_napi_mode()?;
    fe.prepare_tx_template(frame)?;
    let end = Instant::now() + duration;
    let mut done = 0u64;
    while Instant::now() < end {
        let n = keep_tx_full(fe)?;
        done += n as u64;
        // Sleep until the device returns buffers rather than spin on a nearly idle ring.
        if n < 32 {
            fe.napi_wait(TX_QUEUE, Duration::from_millis(1))?;
        }
    }
    Ok((done, thread_cpu_seconds() - cpu0))
}

/// The guest side of the vm-to-vm scenario: `a` keeps its tx ring full of `frame` (addressed
/// to `b`), `b` keeps its rx ring full of buffers; one thread drives both, sleeping only when
/// neither ring moved. Returns (frames `b` received, CPU seconds spent).
pub fn guest_vm_to_vm(
    a: &mut VirtioNetFrontend,
    b: &mut VirtioNetFrontend,
    frame: &[u8],
    duration: Duration,
    buf_len: u32,
) -> Result<(u64, f64)> {
    let cpu0 = thread_cpu_seconds();
    a.set_napi_mode()?;
    b.set_napi_mode()?;
    a.prepare_tx_template(frame)?;
    b.post_rx_buffers(b.free_descriptors(RX_QUEUE), buf_len)?;
    let end = Instant::now() + duration;
    let mut received = 0u64;
    while Instant::now() < end {
        let sent = keep_tx_full(a)?;
        let got = b.reclaim_used(RX_QUEUE)?;
        if got > 0 {
            received += got as u64;
            b.post_rx_buffers(got, buf_len)?;
        }
        if got < 32 && sent < 32 {
            b.napi_wait(RX_QUEUE, Duration::from_millis(1))?;
        }
    }
    Ok((received, thread_cpu_seconds() - cpu0))
}
