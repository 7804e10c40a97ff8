//! The daemon: checks its environment, attaches steering, runs one thread per port and a
//! tokio control plane for signals and the XDP program's logs.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use xvdpa_common::{XdpCounter, MAX_PORTS};

use crate::api::{PortCounters, PortInfo, PortSpec, QueueCounters, StatsSnapshot};
use crate::device::{MAX_MTU, SPEED_UNKNOWN};
use crate::mac::MacAddr;
use crate::port::{self, Nic, Port, PortError};
use crate::stats::QueueStats;
use crate::steering::{Steering, SteeringError, XdpModeChoice};
use crate::switch::SwitchTable;
use crate::sync;
use crate::xsk::{rx_queue_count, NicQueue, XskError, XskGeometry, XskModeChoice};

/// Everything the daemon is started with.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub iface: String,
    pub ports: Vec<PortSpec>,
    pub mtu: u16,
    pub xdp_mode: XdpModeChoice,
    pub xsk_mode: XskModeChoice,
    pub busy_poll: bool,
    /// The control socket (`xvdpa ctl`, `xvdpa stats`).
    pub ctl: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
}

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

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no network interface named {0:?}")]
    UnknownInterface(String),
    #[error("xvdpa needs root, or the capabilities {0}: run it with sudo or grant them")]
    Privileges(String),
    #[error("the locked-memory limit is {have} bytes and the AF_XDP buffers need {need}; raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity in systemd) or run as root")]
    Memlock { have: u64, need: u64 },
    #[error("MTU {0} is outside 68..={MAX_MTU}")]
    Mtu(u16),
    #[error("at most {MAX_PORTS} ports")]
    TooManyPorts,
    #[error("MAC {0} is given to two ports")]
    DuplicateMac(String),
    #[error("socket {0} is given to two ports")]
    DuplicateSocket(PathBuf),
    #[error("no port matches {0:?} (give its socket path, MAC or index)")]
    UnknownPort(String),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error("{iface} has {queues} receive queues; xvdpa handles up to {max}")]
    TooManyQueues {
        iface: String,
        queues: u32,
        max: u32,
    },
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    #[error("control plane: {0}")]
    Runtime(io::Error),
}

/// Capabilities the datapath uses, as (bit, name).
const NEEDED_CAPS: [(u32, &str); 4] = [
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (14, "CAP_IPC_LOCK"),
    (39, "CAP_BPF"),
];
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

fn check_privileges() -> Result<(), DaemonError> {
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
        Err(DaemonError::Privileges(missing.join(", ")))
    }
}

/// Lifts RLIMIT_MEMLOCK, or proves the current one is enough.
fn raise_memlock(need: u64) -> Result<(), DaemonError> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return Ok(());
    }
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) };
    if cur.rlim_cur == libc::RLIM_INFINITY
        || cur.rlim_cur >= need
        || effective_caps() & (1 << 14) != 0
    {
        return Ok(());
    }
    Err(DaemonError::Memlock {
        have: cur.rlim_cur,
        need,
    })
}

/// The index of `iface`, or `UnknownInterface`.
pub fn ifindex(iface: &str) -> Result<u32, DaemonError> {
    let name = CString::new(iface).map_err(|_| DaemonError::UnknownInterface(iface.to_string()))?;
    // SAFETY: valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(DaemonError::UnknownInterface(iface.to_string())),
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

/// Checks the configuration on its own, before touching the system.
pub fn validate(config: &DaemonConfig) -> Result<(), DaemonError> {
    if !(68..=MAX_MTU).contains(&config.mtu) {
        return Err(DaemonError::Mtu(config.mtu));
    }
    if config.ports.len() > MAX_PORTS as usize {
        return Err(DaemonError::TooManyPorts);
    }
    let mut macs = HashSet::new();
    let mut sockets = HashSet::new();
    for p in &config.ports {
        if !macs.insert(p.mac) {
            return Err(DaemonError::DuplicateMac(p.mac.to_string()));
        }
        if !sockets.insert(p.socket.clone()) {
            return Err(DaemonError::DuplicateSocket(p.socket.clone()));
        }
    }
    Ok(())
}

/// A port and the thread serving it.
struct PortSlot {
    port: Arc<Port>,
    thread: Option<JoinHandle<()>>,
}

/// The running daemon: the NIC and its ports. Shared by the control plane, which adds and
/// removes ports while the others keep serving.
pub struct Daemon {
    nic: Arc<Nic>,
    ports: Mutex<BTreeMap<u32, PortSlot>>,
    started: Instant,
}

fn queue_counters(pair: usize, stats: &QueueStats) -> QueueCounters {
    QueueCounters {
        pair: pair as u32,
        counters: stats
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

impl Daemon {
    fn lock_ports(&self) -> MutexGuard<'_, BTreeMap<u32, PortSlot>> {
        sync::lock(&self.ports)
    }

    fn steering(&self) -> MutexGuard<'_, Steering> {
        sync::lock(&self.nic.steering)
    }

    /// Adds a port and starts serving it; the other ports are not touched.
    pub fn add_port(&self, spec: PortSpec) -> Result<PortInfo, DaemonError> {
        let mut ports = self.lock_ports();
        for slot in ports.values() {
            let p = &slot.port.spec;
            if p.mac == spec.mac {
                return Err(DaemonError::DuplicateMac(spec.mac.to_string()));
            }
            if p.socket == spec.socket {
                return Err(DaemonError::DuplicateSocket(spec.socket.clone()));
            }
        }
        let index = (0..MAX_PORTS)
            .find(|i| !ports.contains_key(i))
            .ok_or(DaemonError::TooManyPorts)?;
        port::prepare_socket_path(&spec.socket)?;
        let port = Arc::new(Port::new(index, spec));
        {
            let mut steering = self.steering();
            steering.reset_port_counter(index)?;
            steering.add_port(port.spec.mac, port.spec.vlan, index)?;
        }
        self.nic.switch.insert(port.switch_port.clone());
        let (nic, p) = (self.nic.clone(), port.clone());
        let thread = std::thread::Builder::new()
            .name(format!("xvdpa-port{index}"))
            .spawn(move || {
                if let Err(e) = port::serve(&nic, &p) {
                    tracing::error!(port = p.index, socket = %p.spec.socket.display(), error = %e, "port failed; the other ports keep running");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.nic.switch.remove(port.spec.mac);
                let _ = self.steering().remove_port(port.spec.mac, port.spec.vlan);
                return Err(DaemonError::Runtime(e));
            }
        };
        let info = port_info(&port);
        ports.insert(
            index,
            PortSlot {
                port,
                thread: Some(thread),
            },
        );
        tracing::info!(port = index, socket = %info.spec.socket.display(), mac = %info.spec.mac, "port added");
        Ok(info)
    }

    /// Removes a port, named by socket path, MAC or index: its frames go to the host stack
    /// again, its frontend is disconnected, and its sockets, UMEM frames and socket file are
    /// released.
    pub fn remove_port(&self, name: &str) -> Result<PortInfo, DaemonError> {
        let slot = {
            let mut ports = self.lock_ports();
            let index = find_port(&ports, name)
                .ok_or_else(|| DaemonError::UnknownPort(name.to_string()))?;
            ports.remove(&index).expect("found above")
        };
        let info = self.stop_slot(slot);
        tracing::info!(port = info.index, socket = %info.spec.socket.display(), "port removed");
        Ok(info)
    }

    fn stop_slot(&self, mut slot: PortSlot) -> PortInfo {
        let port = slot.port.clone();
        if let Err(e) = self.steering().remove_port(port.spec.mac, port.spec.vlan) {
            tracing::warn!(port = port.index, error = %e, "cannot remove the port's MAC from the steering map");
        }
        self.nic.switch.remove(port.spec.mac);
        port.stop();
        if let Some(t) = slot.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(
                    port = port.index,
                    "port thread did not stop within 5 s; leaving it behind"
                );
            }
        }
        match std::fs::remove_file(&port.spec.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %port.spec.socket.display(), error = %e, "cannot remove socket")
            }
        }
        let mut info = port_info(&port);
        info.state = "removed".into();
        info
    }

    pub fn list(&self) -> Vec<PortInfo> {
        self.lock_ports()
            .values()
            .map(|s| port_info(&s.port))
            .collect()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let ports: Vec<Arc<Port>> = self.lock_ports().values().map(|s| s.port.clone()).collect();
        let steering = self.steering();
        let xdp = XdpCounter::ALL
            .iter()
            .zip(steering.counters())
            .map(|(c, v)| (c.name().to_string(), v))
            .collect();
        let ports = ports
            .iter()
            .map(|p| PortCounters {
                port: port_info(p),
                xdp_steered: steering.port_steered(p.index),
                queues: p
                    .stats
                    .iter()
                    .enumerate()
                    .map(|(i, s)| queue_counters(i, s))
                    .collect(),
            })
            .collect();
        StatsSnapshot {
            iface: self.nic.iface.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            xdp,
            ports,
        }
    }

    /// Stops every port and detaches XDP.
    fn shutdown(&self) {
        let slots: Vec<PortSlot> = std::mem::take(&mut *self.lock_ports())
            .into_values()
            .collect();
        let ports: Vec<Arc<Port>> = slots.iter().map(|s| s.port.clone()).collect();
        // Stop all first (each wakes its thread), then wait for each.
        for p in &ports {
            p.stop();
        }
        for s in slots {
            self.stop_slot(s);
        }
        let mut steering = self.steering();
        log_final_counters(&steering, &ports);
        steering.detach();
    }
}

fn find_port(ports: &BTreeMap<u32, PortSlot>, name: &str) -> Option<u32> {
    let mac = MacAddr::parse_unicast(name).ok();
    let index = name.parse::<u32>().ok();
    ports
        .values()
        .find(|s| {
            Some(s.port.spec.mac) == mac
                || Some(s.port.index) == index
                || s.port.spec.socket == Path::new(name)
        })
        .map(|s| s.port.index)
}

fn port_info(p: &Port) -> PortInfo {
    PortInfo {
        index: p.index,
        spec: p.spec.clone(),
        state: p.state().to_string(),
    }
}

/// Runs the daemon with the XDP program `xdp_object` (see [`Steering::attach`]) until SIGINT
/// or SIGTERM. A port that fails stops alone.
pub fn run(config: DaemonConfig, xdp_object: &[u8]) -> Result<(), DaemonError> {
    validate(&config)?;
    let ifindex = ifindex(&config.iface)?;
    check_privileges()?;
    let rx_queues = rx_queue_count(&config.iface).unwrap_or(1);
    if rx_queues > xvdpa_common::MAX_NIC_QUEUES {
        return Err(DaemonError::TooManyQueues {
            iface: config.iface.clone(),
            queues: rx_queues,
            max: xvdpa_common::MAX_NIC_QUEUES,
        });
    }
    let geometry = XskGeometry::default();
    raise_memlock(geometry.umem_bytes() * u64::from(rx_queues) + (16 << 20))?;
    for p in &config.ports {
        port::prepare_socket_path(&p.socket)?;
    }
    let ctl_listener = crate::control::bind(&config.ctl).map_err(DaemonError::Runtime)?;

    let (steering, logger) = Steering::attach(xdp_object, &config.iface, config.xdp_mode)?;
    let queues = (0..rx_queues)
        .map(|q| NicQueue::open(&config.iface, ifindex, q, geometry, config.xsk_mode))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!(iface = %config.iface, queues = queues.len(), mode = ?queues[0].mode(), "AF_XDP queues bound");
    let nic = Arc::new(Nic {
        iface: config.iface.clone(),
        ifindex,
        queues,
        speed: link_speed(&config.iface),
        mtu: config.mtu,
        busy_poll: config.busy_poll,
        steering: Mutex::new(steering),
        switch: Arc::new(SwitchTable::default()),
    });
    let daemon = Arc::new(Daemon {
        nic,
        ports: Mutex::new(BTreeMap::new()),
        started: Instant::now(),
    });
    for spec in &config.ports {
        if let Err(e) = daemon.add_port(spec.clone()) {
            daemon.shutdown();
            return Err(e);
        }
    }
    if config.ports.is_empty() {
        tracing::info!(ctl = %config.ctl.display(), "no ports yet; add them with `xvdpa ctl add-port`");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let outcome = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
        tokio::spawn(pump_xdp_logs(logger));
        tokio::spawn(crate::control::serve(ctl_listener, daemon.clone()));
        if let Some(addr) = config.metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(DaemonError::Runtime)?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            tokio::spawn(crate::metrics::serve(listener, daemon.clone()));
        }
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        Ok(())
    });
    drop(rt);
    daemon.shutdown();
    let _ = std::fs::remove_file(&config.ctl);
    outcome
}

fn log_final_counters(steering: &Steering, ports: &[Arc<Port>]) {
    let xdp = steering.counters();
    let fields: Vec<String> = XdpCounter::ALL
        .iter()
        .zip(xdp.iter())
        .map(|(c, v)| format!("{}={v}", c.name()))
        .collect();
    tracing::info!("xdp counters: {}", fields.join(" "));
    for p in ports {
        for (q, stats) in p.stats.iter().enumerate() {
            let fields: Vec<String> = stats
                .snapshot()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            tracing::info!(
                port = p.index,
                queue_pair = q,
                steered = steering.port_steered(p.index),
                "{}",
                fields.join(" ")
            );
        }
    }
}

/// Forwards the XDP program's aya-log records into `tracing` (through the `log` bridge).
async fn pump_xdp_logs(logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>) {
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

    fn config(ports: Vec<PortSpec>) -> DaemonConfig {
        DaemonConfig {
            iface: "eth0".into(),
            ports,
            mtu: 1500,
            xdp_mode: XdpModeChoice::Auto,
            xsk_mode: XskModeChoice::Auto,
            busy_poll: false,
            ctl: "/run/xvdpa/xvdpa.ctl".into(),
            metrics: None,
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
            Err(DaemonError::DuplicateMac(_))
        ));
        assert!(matches!(
            validate(&config(vec![
                spec("/a", "52:54:00:00:00:01"),
                spec("/a", "52:54:00:00:00:02")
            ])),
            Err(DaemonError::DuplicateSocket(_))
        ));
        let mut c = config(vec![spec("/a", "52:54:00:00:00:01")]);
        c.mtu = 9000;
        assert!(matches!(validate(&c), Err(DaemonError::Mtu(9000))));
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
    fn unknown_interface_is_a_clear_error() {
        let e = ifindex("xvdpa-no-such-if").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no network interface named \"xvdpa-no-such-if\""
        );
    }
}
