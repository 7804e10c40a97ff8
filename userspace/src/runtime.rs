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
use crate::nic::steering::{Steering, SteeringError, XdpLogger, XdpModeChoice};
use crate::nic::vlan::TAG_LEN;
use crate::nic::xsk::{rx_queue_count, NicQueue, XskError, XskGeometry, XskModeChoice};
use crate::nic::Nic;
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

/// Why the daemon could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no network interface named {0:?}")]
    UnknownInterface(String),
    #[error("xvdpa needs root, or the capabilities {0}: run it with sudo or grant them")]
    Privileges(String),
    #[error("the locked-memory limit is {have} bytes and the AF_XDP buffers need {need}; raise it (ulimit -l unlimited, or LimitMEMLOCK=infinity in systemd) or run as root")]
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

/// Lifts RLIMIT_MEMLOCK, or proves the current one is enough.
fn raise_memlock(need: u64) -> Result<(), RuntimeError> {
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
    // Frames up to the MTU, plus the Ethernet header and the tag of a tagged port; larger
    // than one UMEM frame takes multi-buffer sockets.
    let geometry = XskGeometry::for_frames_up_to(usize::from(config.mtu) + ETH_HLEN + TAG_LEN);
    warn_if_nic_mtu_below(&config.iface, config.mtu);
    raise_memlock(geometry.umem_bytes() * u64::from(rx_queues) + (16 << 20))?;
    for p in &config.ports {
        port::prepare(p)?;
    }
    let ctl_listener = crate::control::bind(&config.ctl).map_err(RuntimeError::ControlPlane)?;

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
    });
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

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError::ControlPlane)?;
    let outcome = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).map_err(RuntimeError::ControlPlane)?;
        let mut int = signal(SignalKind::interrupt()).map_err(RuntimeError::ControlPlane)?;
        tokio::spawn(pump_xdp_logs(logger));
        tokio::spawn(crate::control::serve(ctl_listener, daemon.clone()));
        if let Some(addr) = config.metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(RuntimeError::ControlPlane)?;
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
    fn unknown_interface_is_a_clear_error() {
        let e = ifindex("xvdpa-no-such-if").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no network interface named \"xvdpa-no-such-if\""
        );
    }
}
