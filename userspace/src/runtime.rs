//! The process around the datapath: checks the configuration and the host (privileges,
//! locked memory, the interface and its queues), attaches XDP steering, opens the NIC
//! queues, builds the [`Daemon`] and its first ports, then runs a tokio current-thread
//! runtime for signals, the XDP program's logs, the control socket and the metrics endpoint
//! until SIGINT or SIGTERM, and shuts everything down.
//!
//! The per-packet work happens on the ports' own threads; nothing here is on the datapath.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use xvdpa_common::MAX_PORTS;

use crate::api::PortSpec;
use crate::daemon::{Daemon, DaemonError};
use crate::datapath::device::{ETH_HLEN, MAX_MTU, SPEED_UNKNOWN};
use crate::nic::napi::{NapiSettings, NapiTakeover};
use crate::nic::steering::{Steering, SteeringError, XdpLogger, XdpModeChoice};
use crate::nic::vlan::TAG_LEN;
use crate::nic::xsk::{rx_queue_count, XskError, XskGeometry, XskMode, XskModeChoice};
use crate::nic::Nic;
use crate::privilege::{self, Account, Capability, PrivilegeError};
use crate::vhost::port::{self, PortError};

/// Everything the daemon is started with.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub iface: String,
    pub ports: Vec<PortSpec>,
    pub mtu: u16,
    pub xdp_mode: XdpModeChoice,
    pub xsk_mode: XskModeChoice,
    pub busy_poll: bool,
    /// Spin while frames come and let the worker take the NIC queues' receive work over
    /// (the default); false with `--no-adaptive-poll`.
    pub adaptive_poll: bool,
    /// The control socket (`xvdpa ctl`, `xvdpa stats`).
    pub ctl: PathBuf,
    /// The group whose members may use the control socket (`--ctl-group`); without one
    /// only the daemon's user may.
    pub ctl_group: Option<String>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// The user to become once the privileged set-up is done (`--user`).
    pub user: Option<String>,
}

/// What the worker sets on each NAPI instance of the NIC queues it serves (see `nic::napi`):
/// after the worker's last busy poll the queue's interrupt stays off for 10 polls 50 µs
/// apart, run by a timer on the worker's CPU, so a pause in the traffic shorter than half a
/// millisecond never moves the queue's receive work back to the CPU that produces the frames;
/// after that the interrupt is back, and an idle queue costs nothing.
const WORKER_NAPI: NapiSettings = NapiSettings {
    defer_hard_irqs: 10,
    gro_flush_timeout_ns: 50_000,
    irq_suspend_timeout_ns: 0,
};

/// The control socket's path when none is given: next to the first port's socket, or in
/// /run/xvdpa.
pub fn default_ctl_path(ports: &[PortSpec]) -> PathBuf {
    ports
        .first()
        .and_then(|p| p.socket.parent())
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("/run/xvdpa"))
        .join("xvdpa.ctl")
}

/// Why the daemon could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no network interface named {0:?}")]
    UnknownInterface(String),
    #[error("xvdpa needs root, or the capabilities {0}: run it with sudo or grant them")]
    Privileges(String),
    #[error("the locked-memory limit is {have} bytes and the AF_XDP buffers need {need}; raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity in systemd) or run as root (CAP_IPC_LOCK)")]
    Memlock { have: u64, need: u64 },
    #[error("MTU {0} is outside 68..={MAX_MTU}")]
    Mtu(u16),
    #[error("{iface} has {queues} receive queues; xvdpa handles up to {max}")]
    TooManyQueues {
        iface: String,
        queues: u32,
        max: u32,
    },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    #[error("control plane: {0}")]
    ControlPlane(io::Error),
    // Not `#[from]`: that would make the error its own cause, and the message would repeat.
    #[error("--user: {0}")]
    Privilege(PrivilegeError),
    #[error("--user: cannot hand directory {path} to the daemon's user: {why}")]
    SocketDir { path: PathBuf, why: io::Error },
}

impl From<PrivilegeError> for RuntimeError {
    fn from(e: PrivilegeError) -> Self {
        RuntimeError::Privilege(e)
    }
}

/// Capabilities the datapath uses, as (bit, name). CAP_IPC_LOCK is not among them: it stands
/// in for a locked-memory limit that covers the UMEMs, which `raise_memlock` checks.
const NEEDED_CAPS: [(u32, &str); 3] = [(12, "CAP_NET_ADMIN"), (13, "CAP_NET_RAW"), (39, "CAP_BPF")];
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string()))
        })
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0)
}

fn check_privileges() -> Result<(), RuntimeError> {
    let caps = effective_caps();
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        // CAP_SYS_ADMIN stands in for CAP_BPF on older kernels.
        .filter(|(bit, name)| {
            caps & (1 << bit) == 0 && !(*name == "CAP_BPF" && caps & (1 << CAP_SYS_ADMIN) != 0)
        })
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::Privileges(missing.join(", ")))
    }
}

/// The NIC queues' UMEM and rings: frames up to the MTU, plus the Ethernet header and the tag
/// of a tagged port; larger than one UMEM frame takes multi-buffer sockets.
pub fn copy_path_geometry(mtu: u16) -> XskGeometry {
    XskGeometry::for_frames_up_to(usize::from(mtu) + ETH_HLEN + TAG_LEN)
}

/// The locked memory start-up asks of RLIMIT_MEMLOCK when it can lift neither the limit nor
/// rely on CAP_IPC_LOCK: the copy path's UMEMs on `rx_queues` NIC queues, and 16 MiB of room.
pub fn copy_path_memlock(mtu: u16, rx_queues: u32) -> u64 {
    copy_path_geometry(mtu).umem_bytes() * u64::from(rx_queues) + (16 << 20)
}

/// How much memory the process may lock, once start-up has tried to lift the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemlockLimit {
    Unlimited,
    /// A limit that stays: what start-up needs is within it, or CAP_IPC_LOCK lets the
    /// process lock beyond it.
    Finite,
}

/// Lifts RLIMIT_MEMLOCK, or proves the current one is enough.
fn raise_memlock(need: u64) -> Result<MemlockLimit, RuntimeError> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return Ok(MemlockLimit::Unlimited);
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) };
    if cur.rlim_cur == libc::RLIM_INFINITY {
        return Ok(MemlockLimit::Unlimited);
    }
    if cur.rlim_cur >= need || effective_caps() & (1 << CAP_IPC_LOCK) != 0 {
        return Ok(MemlockLimit::Finite);
    }
    Err(RuntimeError::Memlock {
        have: cur.rlim_cur,
        need,
    })
}

/// The index of `iface`, or `UnknownInterface`.
pub fn ifindex(iface: &str) -> Result<u32, RuntimeError> {
    let name =
        CString::new(iface).map_err(|_| RuntimeError::UnknownInterface(iface.to_string()))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(RuntimeError::UnknownInterface(iface.to_string())),
        i => Ok(i),
    }
}

fn link_speed(iface: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|&s| s > 0)
        .map(|s| s as u32)
        .unwrap_or(SPEED_UNKNOWN)
}

/// Warns when the NIC's own MTU is below `--mtu`: the kernel drops the guests' larger frames
/// on the way out (and the wire cannot send them), so the guests would see a black hole.
fn warn_if_nic_mtu_below(iface: &str, mtu: u16) {
    let nic_mtu = std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    if let Some(nic_mtu) = nic_mtu.filter(|&m| m < u32::from(mtu)) {
        tracing::warn!(%iface, nic_mtu, mtu, "the NIC's MTU is below --mtu: larger frames from the guests will not reach the wire");
    }
}

/// Checks the configuration on its own, before touching the system.
pub fn validate(config: &RuntimeConfig) -> Result<(), RuntimeError> {
    if !(68..=MAX_MTU).contains(&config.mtu) {
        return Err(RuntimeError::Mtu(config.mtu));
    }
    if config.ports.len() > MAX_PORTS as usize {
        return Err(DaemonError::TooManyPorts.into());
    }
    if let Some(p) = config
        .ports
        .iter()
        .find(|p| p.guest_umem_tx_without_guest_umem())
    {
        return Err(DaemonError::GuestUmemTxWithoutGuestUmem {
            socket: p.socket.clone(),
        }
        .into());
    }
    if let Some(p) = config.ports.iter().find(|p| p.guest_umem) {
        if config.ports.len() > 1 {
            return Err(DaemonError::NicDedicated {
                socket: p.socket.clone(),
            }
            .into());
        }
    }
    let mut macs = HashSet::new();
    let mut sockets = HashSet::new();
    for p in &config.ports {
        if !macs.insert(p.mac) {
            return Err(DaemonError::DuplicateMac(p.mac.to_string()).into());
        }
        if !sockets.insert(p.socket.clone()) {
            return Err(DaemonError::DuplicateSocket(p.socket.clone()).into());
        }
    }
    Ok(())
}

/// Runs the daemon with the XDP program `xdp_object` (see [`Steering::attach`]) until SIGINT
/// or SIGTERM. A port that fails stops alone.
pub fn run(config: RuntimeConfig, xdp_object: &[u8]) -> Result<(), RuntimeError> {
    validate(&config)?;
    // SIGTERM and SIGINT are caught from here on: one that comes while XDP is attached and
    // the ports are made (a service manager or a test stopping the daemon as soon as a port
    // is ready) is taken once start-up is done, and the daemon shuts down in order instead
    // of dying by the signal's default action.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::ControlPlane)?;
    let (mut term, mut int) = {
        let _in_runtime = rt.enter();
        (
            signal(SignalKind::terminate()).map_err(RuntimeError::ControlPlane)?,
            signal(SignalKind::interrupt()).map_err(RuntimeError::ControlPlane)?,
        )
    };
    let ifindex = ifindex(&config.iface)?;
    check_privileges()?;
    let rx_queues = rx_queue_count(&config.iface).unwrap_or(1);
    if rx_queues > xvdpa_common::MAX_NIC_QUEUES {
        return Err(RuntimeError::TooManyQueues {
            iface: config.iface.clone(),
            queues: rx_queues,
            max: xvdpa_common::MAX_NIC_QUEUES,
        });
    }
    let geometry = copy_path_geometry(config.mtu);
    warn_if_nic_mtu_below(&config.iface, config.mtu);
    let memlock = raise_memlock(copy_path_memlock(config.mtu, rx_queues))?;
    let account = config.user.as_deref().map(Account::lookup).transpose()?;
    if account.is_some() {
        privilege::require_root()?;
    }
    let socket_dirs = SocketDirs::before_creating(&config);
    for p in &config.ports {
        port::prepare(p)?;
        // Root may give any group now; the ports are made after the drop, by the user.
        if let (Some(account), Some(group)) = (&account, &p.socket_group) {
            let gid = privilege::group_id(group)?;
            if !account.in_group(gid) {
                return Err(PortError::SocketGroup {
                    group: group.clone(),
                    why: format!("--user {} is not a member of it", account.name),
                }
                .into());
            }
        }
    }
    // Bound before the ports are made, as the control socket below is: once a port is ready
    // for a frontend the metrics endpoint answers too, and an address in use fails start-up
    // before anything is attached.
    let metrics_listener = config
        .metrics
        .map(|addr| {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok::<_, io::Error>((addr, listener))
        })
        .transpose()
        .map_err(RuntimeError::ControlPlane)?;
    // The group is looked up once: the control socket is made in it, and its members are
    // served.
    let ctl_gid = config
        .ctl_group
        .as_deref()
        .map(|name| {
            privilege::group_id(name).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("control socket group: {e}"),
                )
            })
        })
        .transpose()
        .map_err(RuntimeError::ControlPlane)?;
    let ctl_listener =
        crate::control::bind(&config.ctl, ctl_gid).map_err(RuntimeError::ControlPlane)?;

    let (steering, logger) = Steering::attach(xdp_object, &config.iface, config.xdp_mode)?;
    // A port that takes its guest's memory as the UMEM has the NIC to itself (`validate`):
    // its queues stay unbound until its guest's memory arrives.
    let dedicated = config.ports.iter().any(|p| p.guest_umem);
    let queues = if dedicated {
        tracing::info!(iface = %config.iface, queues = rx_queues, "NIC dedicated to one port asking for guest memory as the UMEM: its AF_XDP queues are bound per connection");
        Vec::new()
    } else {
        let queues =
            Nic::open_queues(&config.iface, ifindex, rx_queues, geometry, config.xsk_mode)?;
        tracing::info!(iface = %config.iface, queues = queues.len(), mode = ?queues[0].mode(), "AF_XDP queues bound");
        queues
    };
    // Busy polling reaches a NIC queue's NAPI only from zero-copy sockets (copy-mode ones are
    // never given a NAPI id), so adaptive polling needs the NAPI settings and CAP_NET_ADMIN
    // only on a zero-copy NIC; --busy-poll asks for them anyway.
    let zero_copy = queues.iter().any(|q| q.mode() == XskMode::ZeroCopy);
    let polls_napi = config.busy_poll || (config.adaptive_poll && zero_copy);
    if config.adaptive_poll && !polls_napi {
        tracing::info!(iface = %config.iface, "copy-mode AF_XDP sockets get no NAPI id, so busy polling cannot reach the NIC queues' NAPI: the workers poll their rings while frames come, without preferred busy polling, and the NAPI settings are left alone");
    }
    let nic = Arc::new(Nic {
        iface: config.iface.clone(),
        ifindex,
        queues,
        dedicated,
        rx_queues,
        geometry,
        xsk_mode: config.xsk_mode,
        speed: link_speed(&config.iface),
        mtu: config.mtu,
        busy_poll: config.busy_poll,
        adaptive_poll: config.adaptive_poll,
        napi: polls_napi.then(|| Arc::new(NapiTakeover::new(&config.iface, WORKER_NAPI))),
        steering: Mutex::new(steering),
    });
    let nic_napi = nic.napi.clone();
    if let Some(account) = &account {
        // Everything that needs root is done: the ports below are made exactly as ports
        // added later through the control socket are, by the unprivileged daemon.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let keep = kept_capabilities(polls_napi, &release);
        // One the daemon was started without cannot be kept.
        let held = effective_caps();
        let on_demand: Vec<Capability> = on_demand_capabilities(dedicated, memlock)
            .into_iter()
            .filter(|c| held & (1 << c.bit) != 0)
            .collect();
        let dropped = socket_dirs
            .hand_to(account)
            .and_then(|()| Ok(privilege::drop_to(account, &keep, &on_demand)?));
        if let Err(e) = dropped {
            let _ = std::fs::remove_file(&config.ctl);
            return Err(e);
        }
        let names = |caps: &[Capability]| caps.iter().map(|c| c.name).collect::<Vec<_>>().join(",");
        tracing::info!(user = %account.name, uid = account.uid, capabilities = %names(&keep), on_demand = %names(&on_demand), "dropped root");
    }
    let daemon = Arc::new(Daemon::new(nic));
    for spec in &config.ports {
        if let Err(e) = daemon.add_port(spec.clone()) {
            daemon.shutdown();
            return Err(e.into());
        }
    }
    if config.ports.is_empty() {
        tracing::info!(ctl = %config.ctl.display(), "no ports yet; add them with `xvdpa ctl add-port`");
    }
    // Each port's thread binds its socket; readiness below waits for that.
    let unsettled = daemon.wait_ports_settled(PORTS_SETTLE_TIMEOUT);
    if !unsettled.is_empty() {
        tracing::warn!(ports = ?unsettled, "ports not listening yet; the daemon counts as started anyway");
    }

    let outcome = rt.block_on(async {
        tokio::spawn(pump_xdp_logs(logger));
        tokio::spawn(crate::control::serve(ctl_listener, ctl_gid, daemon.clone()));
        if let Some((addr, listener)) = metrics_listener {
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(RuntimeError::ControlPlane)?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            tokio::spawn(crate::metrics::serve(listener, daemon.clone()));
        }
        tell_service_manager_ready();
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        Ok(())
    });
    drop(rt);
    // Before the ports go: on veth the NAPI instances go with the XDP program.
    if let Some(napi) = &nic_napi {
        napi.restore();
    }
    daemon.shutdown();
    let _ = std::fs::remove_file(&config.ctl);
    outcome
}

/// How long start-up waits for the config file's ports to listen before it counts as done
/// anyway (binding a socket takes microseconds; this is a safety net).
const PORTS_SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Under systemd (`Type=notify`): `READY=1` once the config file's ports listen (or have
/// failed, which `xvdpa ctl list` shows) and the control socket and metrics endpoint are
/// served, so `systemctl start` returns, and units ordered after xvdpa start, only then.
fn tell_service_manager_ready() {
    if let Err(e) = crate::service_notify::ready() {
        // systemd stops a Type=notify service that never says it is ready.
        tracing::error!(error = %e, "could not tell the service manager the daemon is ready");
    }
}

/// The capabilities the running daemon keeps after `--user`, each for something it does after
/// start-up (README says the same; the least-privilege test checks each by running without it):
/// - CAP_NET_RAW: every frontend connection opens fresh AF_XDP sockets on the NIC queues'
///   UMEMs, an AF_PACKET socket for the port's broadcast and multicast copy and, with
///   `tx-gso=kernel`, a send-only AF_PACKET socket per queue pair for TSO frames;
/// - CAP_NET_ADMIN, with `--busy-poll`, or with adaptive polling on a zero-copy NIC (the only
///   sockets busy polling can reach): SO_PREFER_BUSY_POLL (and a SO_BUSY_POLL above the
///   system default) on each new AF_XDP socket, and the NIC queues' NAPI settings
///   (`napi-set`), made on a queue's first traffic and restored at exit;
/// - CAP_BPF, on kernels before 6.5 only: they refuse every bpf(2) call, map updates on
///   maps the daemon already holds included, to a caller without it while
///   `kernel.unprivileged_bpf_disabled` is set (Debian's default); adding and removing a
///   port and each connection update the steering, XSK and counter maps. Since 6.5 only
///   creating maps and loading programs are checked, which the daemon does at start-up.
///
/// Not kept: detaching XDP at exit closes the program's bpf link, which needs no privilege;
/// the locked-memory limit was lifted while root and stays with the process; new sockets
/// share the UMEMs registered at start-up, so nothing new is locked (except on a NIC
/// dedicated to a guest-memory port: see [`on_demand_capabilities`]).
pub fn kept_capabilities(polls_nic: bool, kernel_release: &str) -> Vec<Capability> {
    let mut keep = vec![privilege::CAP_NET_RAW];
    if polls_nic {
        keep.push(privilege::CAP_NET_ADMIN);
    }
    if map_updates_need_cap_bpf(kernel_release) {
        keep.push(privilege::CAP_BPF);
    }
    keep
}

/// The capabilities the running daemon keeps after `--user` as permitted only, raised for the
/// one call that needs each (`privilege::with_capability`):
/// - CAP_IPC_LOCK, on a NIC dedicated to a guest-memory port under a finite locked-memory
///   limit: each connection registers the NIC queue's UMEM after the drop, and when the
///   guest's memory cannot be pinned within the limit, the copy path's own UMEMs (16 MiB a
///   queue) are registered instead, locked as they are at start-up on a shared NIC. Without
///   it the limit would refuse them too, and the port would move no frames. The guest's
///   memory is registered without it: the limit decides how much of it may be pinned.
pub fn on_demand_capabilities(dedicated: bool, memlock: MemlockLimit) -> Vec<Capability> {
    if dedicated && memlock == MemlockLimit::Finite {
        vec![privilege::CAP_IPC_LOCK]
    } else {
        Vec::new()
    }
}

/// Whether the kernel `release` (as `uname -r` says it) checks CAP_BPF on every bpf(2) call.
/// An unreadable release keeps it: a capability too many beats a daemon that cannot add ports.
fn map_updates_need_cap_bpf(release: &str) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (6, 5),
        _ => true,
    }
}

/// Directories the sockets live in that the daemon's user must be able to write after
/// `--user` (to make and remove port sockets): the ones the daemon creates itself, and
/// systemd's `RuntimeDirectory` (`$RUNTIME_DIRECTORY`), which systemd makes for root. Others
/// that already exist are the operator's: they are left alone, with a warning if the user
/// cannot write there.
struct SocketDirs {
    handed: Vec<PathBuf>,
    existing: Vec<PathBuf>,
}

impl SocketDirs {
    /// Notes the directories that do not exist yet, before the sockets' paths are prepared.
    fn before_creating(config: &RuntimeConfig) -> Self {
        let mut handed = runtime_directories();
        let mut existing = Vec::new();
        let sockets = config.ports.iter().map(|p| p.socket.as_path());
        for socket in sockets.chain([config.ctl.as_path()]) {
            let Some(parent) = socket.parent().filter(|p| !p.as_os_str().is_empty()) else {
                continue;
            };
            if parent.exists() {
                if !handed.iter().any(|h| h == parent) {
                    existing.push(parent.to_path_buf());
                }
                continue;
            }
            let missing = parent
                .ancestors()
                .take_while(|d| !d.as_os_str().is_empty() && !d.exists());
            handed.extend(missing.map(Path::to_path_buf));
        }
        for dirs in [&mut handed, &mut existing] {
            dirs.sort();
            dirs.dedup();
        }
        SocketDirs { handed, existing }
    }

    /// Gives the directories to `account`; those the daemon made are 0750 (its group may
    /// reach the sockets), systemd's keeps the mode the unit gave it.
    fn hand_to(&self, account: &Account) -> Result<(), RuntimeError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let runtime = runtime_directories();
        for dir in &self.handed {
            let fail = |why| RuntimeError::SocketDir {
                path: dir.clone(),
                why,
            };
            std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid)).map_err(fail)?;
            if !runtime.contains(dir) {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
                    .map_err(fail)?;
            }
        }
        for dir in &self.existing {
            let Ok(meta) = std::fs::metadata(dir) else {
                continue;
            };
            if !writable_by(account, meta.uid(), meta.gid(), meta.mode()) {
                tracing::warn!(dir = %dir.display(), user = %account.name, "the daemon's user cannot write here: sockets in this directory cannot be added, removed or cleaned up after start-up");
            }
        }
        Ok(())
    }
}

/// systemd's `RuntimeDirectory`, as it tells the service (colon-separated).
fn runtime_directories() -> Vec<PathBuf> {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(|run| {
            std::env::split_paths(&run)
                .filter(|p| p.is_absolute())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `account` may create and remove entries in a directory owned by `uid`:`gid`
/// with `mode` (the permission bits the kernel checks for a non-root user).
fn writable_by(account: &Account, uid: u32, gid: u32, mode: u32) -> bool {
    let wx = |shift: u32| (mode >> shift) & 0o3 == 0o3;
    if uid == account.uid {
        wx(6)
    } else if account.groups.contains(&gid) || gid == account.gid {
        wx(3)
    } else {
        wx(0)
    }
}

/// Forwards the XDP program's aya-log records into `tracing` (through the `log` bridge).
async fn pump_xdp_logs(logger: Option<XdpLogger>) {
    let Some(logger) = logger else { return };
    // SAFETY: the logger owns its ring buffer map fd, which stays open and unchanged until the
    // logger (owned by the AsyncFd) is dropped.
    let Ok(mut fd) =
        (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::MacAddr;

    fn config(ports: Vec<PortSpec>) -> RuntimeConfig {
        RuntimeConfig {
            iface: "eth0".into(),
            ports,
            mtu: 1500,
            xdp_mode: XdpModeChoice::Auto,
            xsk_mode: XskModeChoice::Auto,
            busy_poll: false,
            adaptive_poll: true,
            ctl: "/run/xvdpa/xvdpa.ctl".into(),
            ctl_group: None,
            metrics: None,
            user: None,
        }
    }

    fn spec(sock: &str, mac: &str) -> PortSpec {
        PortSpec {
            socket: sock.into(),
            mac: MacAddr::parse_unicast(mac).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn a_guest_memory_port_must_have_the_nic_to_itself() {
        let mut own = spec("/a", "52:54:00:00:00:01");
        own.guest_umem = true;
        assert!(validate(&config(vec![own.clone()])).is_ok());
        let other = spec("/b", "52:54:00:00:00:02");
        for ports in [vec![own.clone(), other.clone()], vec![other, own]] {
            let e = validate(&config(ports)).unwrap_err();
            assert!(
                matches!(&e, RuntimeError::Daemon(DaemonError::NicDedicated { socket }) if socket == Path::new("/a")),
                "{e}"
            );
            assert!(e.to_string().contains("guest-umem=on"), "{e}");
        }
    }

    #[test]
    fn validation_catches_conflicts() {
        assert!(validate(&config(vec![spec("/a", "52:54:00:00:00:01")])).is_ok());
        assert!(
            validate(&config(vec![])).is_ok(),
            "ports may all come later, through ctl"
        );
        assert!(matches!(
            validate(&config(vec![
                spec("/a", "52:54:00:00:00:01"),
                spec("/b", "52:54:00:00:00:01")
            ])),
            Err(RuntimeError::Daemon(DaemonError::DuplicateMac(_)))
        ));
        assert!(matches!(
            validate(&config(vec![
                spec("/a", "52:54:00:00:00:01"),
                spec("/a", "52:54:00:00:00:02")
            ])),
            Err(RuntimeError::Daemon(DaemonError::DuplicateSocket(_)))
        ));
        let mut c = config(vec![spec("/a", "52:54:00:00:00:01")]);
        c.mtu = 9000;
        assert!(validate(&c).is_ok(), "a jumbo MTU is accepted");
        c.mtu = MAX_MTU + 1;
        assert!(matches!(validate(&c), Err(RuntimeError::Mtu(m)) if m == MAX_MTU + 1));
        c.mtu = 67;
        assert!(matches!(validate(&c), Err(RuntimeError::Mtu(67))));
    }

    #[test]
    fn ctl_socket_defaults_next_to_the_ports() {
        assert_eq!(
            default_ctl_path(&[spec("/srv/vms/a.sock", "52:54:00:00:00:01")]),
            Path::new("/srv/vms/xvdpa.ctl")
        );
        assert_eq!(default_ctl_path(&[]), Path::new("/run/xvdpa/xvdpa.ctl"));
    }

    #[test]
    fn kept_capabilities_follow_the_options_and_the_kernel() {
        let names = |polls_nic, release| -> Vec<&str> {
            kept_capabilities(polls_nic, release)
                .iter()
                .map(|c| c.name)
                .collect()
        };
        assert_eq!(names(false, "6.18.44-fc-v669\n"), ["CAP_NET_RAW"]);
        assert_eq!(names(true, "6.5.0"), ["CAP_NET_RAW", "CAP_NET_ADMIN"]);
        assert_eq!(names(false, "6.1.0-27-amd64"), ["CAP_NET_RAW", "CAP_BPF"]);
        assert_eq!(names(false, "5.15.0"), ["CAP_NET_RAW", "CAP_BPF"]);
        assert_eq!(names(false, ""), ["CAP_NET_RAW", "CAP_BPF"]);
    }

    #[test]
    fn directory_write_access_follows_owner_group_and_others() {
        let user = Account {
            name: "vm".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 64],
        };
        assert!(writable_by(&user, 1000, 0, 0o700));
        assert!(
            !writable_by(&user, 1000, 1000, 0o570),
            "owner bits decide for the owner"
        );
        assert!(writable_by(&user, 0, 64, 0o770));
        assert!(!writable_by(&user, 0, 64, 0o750));
        assert!(!writable_by(&user, 0, 0, 0o755));
        assert!(writable_by(&user, 0, 0, 0o1777));
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let e = ifindex("xvdpa-no-such-if").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no network interface named \"xvdpa-no-such-if\""
        );
    }
}
