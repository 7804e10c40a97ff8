//! The daemon: checks its environment, attaches steering, runs one thread per port and a
//! tokio control plane for signals and the XDP program's logs.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use xvdpa_common::{XdpCounter, MAX_PORTS};

use crate::device::{MAX_MTU, SPEED_UNKNOWN};
use crate::port::{self, Nic, Port, PortError, PortSpec};
use crate::steering::{Steering, SteeringError, XdpModeChoice};
use crate::xsk::{rx_queue_count, XskGeometry, XskModeChoice};

/// Everything the daemon is started with.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub iface: String,
    pub ports: Vec<PortSpec>,
    pub mtu: u16,
    pub xdp_mode: XdpModeChoice,
    pub xsk_mode: XskModeChoice,
    pub busy_poll: bool,
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
    #[error("no port configured: give --socket and --mac")]
    NoPorts,
    #[error("at most {MAX_PORTS} ports")]
    TooManyPorts,
    #[error("MAC {0} is given to two ports")]
    DuplicateMac(String),
    #[error("socket {0} is given to two ports")]
    DuplicateSocket(PathBuf),
    #[error("{iface} has {queues} receive queues; xvdpa handles up to {max}")]
    TooManyQueues { iface: String, queues: u32, max: u32 },
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    #[error("control plane: {0}")]
    Runtime(io::Error),
}

/// Capabilities the datapath uses, as (bit, name).
const NEEDED_CAPS: [(u32, &str); 4] =
    [(12, "CAP_NET_ADMIN"), (13, "CAP_NET_RAW"), (14, "CAP_IPC_LOCK"), (39, "CAP_BPF")];
const CAP_SYS_ADMIN: u32 = 21;

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0)
}

fn check_privileges() -> Result<(), DaemonError> {
    let caps = effective_caps();
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        // CAP_SYS_ADMIN stands in for CAP_BPF on older kernels.
        .filter(|(bit, name)| caps & (1 << bit) == 0 && !(*name == "CAP_BPF" && caps & (1 << CAP_SYS_ADMIN) != 0))
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
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
        return Ok(());
    }
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) };
    if cur.rlim_cur == libc::RLIM_INFINITY || cur.rlim_cur >= need || effective_caps() & (1 << 14) != 0 {
        return Ok(());
    }
    Err(DaemonError::Memlock { have: cur.rlim_cur, need })
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
    if config.ports.is_empty() {
        return Err(DaemonError::NoPorts);
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

/// Runs the daemon until SIGINT or SIGTERM, or until a port fails.
pub fn run(config: DaemonConfig) -> Result<(), DaemonError> {
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
    let umem_per_socket = 2 * u64::from(geometry.ring_size) * u64::from(geometry.frame_size);
    raise_memlock(umem_per_socket * u64::from(rx_queues) * config.ports.len() as u64 + (16 << 20))?;
    for p in &config.ports {
        port::prepare_socket_path(&p.socket)?;
    }

    let (mut steering, logger) = Steering::attach(&config.iface, config.xdp_mode)?;
    let ports: Vec<Arc<Port>> =
        config.ports.iter().enumerate().map(|(i, spec)| Arc::new(Port::new(i as u32, spec.clone()))).collect();
    for p in &ports {
        steering.add_port(p.spec.mac, p.index)?;
    }
    let nic = Arc::new(Nic {
        iface: config.iface.clone(),
        ifindex,
        rx_queues,
        speed: link_speed(&config.iface),
        mtu: config.mtu,
        geometry,
        xsk_mode: config.xsk_mode,
        busy_poll: config.busy_poll,
        steering: Mutex::new(steering),
    });

    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, PortError)>();
    for p in &ports {
        let (nic, p, failed) = (nic.clone(), p.clone(), failed_tx.clone());
        std::thread::Builder::new()
            .name(format!("xvdpa-port{}", p.index))
            .spawn(move || {
                if let Err(e) = port::serve(&nic, &p) {
                    let _ = failed.send((p.index, e));
                }
            })
            .map_err(DaemonError::Runtime)?;
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    let outcome = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
        tokio::spawn(pump_xdp_logs(logger));
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
            Some((index, e)) = failed_rx.recv() => {
                tracing::error!(port = index, error = %e, "port failed");
                Err(DaemonError::Port(e))
            }
        }
    });

    for p in &ports {
        p.stop();
    }
    // Give connected frontends' threads a moment to see the disconnect.
    std::thread::sleep(Duration::from_millis(50));
    let mut steering = nic.steering.lock().unwrap_or_else(|e| e.into_inner());
    log_final_counters(&steering, &ports);
    steering.detach();
    for p in &ports {
        match std::fs::remove_file(&p.spec.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(socket = %p.spec.socket.display(), error = %e, "cannot remove socket"),
        }
    }
    outcome
}

fn log_final_counters(steering: &Steering, ports: &[Arc<Port>]) {
    let xdp = steering.counters();
    let fields: Vec<String> =
        XdpCounter::ALL.iter().zip(xdp.iter()).map(|(c, v)| format!("{}={v}", c.name())).collect();
    tracing::info!("xdp counters: {}", fields.join(" "));
    for p in ports {
        for (q, stats) in p.stats.iter().enumerate() {
            let fields: Vec<String> = stats.snapshot().iter().map(|(k, v)| format!("{k}={v}")).collect();
            tracing::info!(port = p.index, queue_pair = q, steered = steering.port_steered(p.index), "{}", fields.join(" "));
        }
    }
}

/// Forwards the XDP program's aya-log records into `tracing` (through the `log` bridge).
async fn pump_xdp_logs(logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    let Some(logger) = logger else { return };
    // SAFETY: the logger owns its ring buffer map fd, which stays open and unchanged until the
    // logger (owned by the AsyncFd) is dropped.
    let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
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
        }
    }

    fn spec(sock: &str, mac: &str) -> PortSpec {
        PortSpec { socket: sock.into(), mac: MacAddr::parse_unicast(mac).unwrap() }
    }

    #[test]
    fn validation_catches_conflicts() {
        assert!(validate(&config(vec![spec("/a", "52:54:00:00:00:01")])).is_ok());
        assert!(matches!(validate(&config(vec![])), Err(DaemonError::NoPorts)));
        assert!(matches!(
            validate(&config(vec![spec("/a", "52:54:00:00:00:01"), spec("/b", "52:54:00:00:00:01")])),
            Err(DaemonError::DuplicateMac(_))
        ));
        assert!(matches!(
            validate(&config(vec![spec("/a", "52:54:00:00:00:01"), spec("/a", "52:54:00:00:00:02")])),
            Err(DaemonError::DuplicateSocket(_))
        ));
        let mut c = config(vec![spec("/a", "52:54:00:00:00:01")]);
        c.mtu = 9000;
        assert!(matches!(validate(&c), Err(DaemonError::Mtu(9000))));
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let e = ifindex("xvdpa-no-such-if").unwrap_err();
        assert_eq!(e.to_string(), "no network interface named \"xvdpa-no-such-if\"");
    }
}
