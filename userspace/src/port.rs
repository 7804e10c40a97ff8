//! A VM port: its vhost-user socket and the loop that serves one frontend after another.
//!
//! Every connection gets fresh AF_XDP sockets and UMEM, so nothing a previous VM (or a
//! previous boot of the same VM) left behind can leak into the next one. The port's sockets
//! are in the steering map only while a frontend is connected.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::NetBackend;
use crate::device::{NetConfig, DUPLEX_FULL, ETH_HLEN};
use crate::mac::MacAddr;
use crate::packet_tap::PacketTap;
use crate::protocol_shim::Shim;
use crate::stats::QueueStats;
use crate::steering::{Steering, SteeringError};
use crate::worker::QueuePairWorker;
use crate::xsk::{XskError, XskGeometry, XskModeChoice, XskSocket};

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("socket path {0} is in use by a live process")]
    SocketInUse(PathBuf),
    #[error("socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("socket path {path}: {source}")]
    SocketPath { path: PathBuf, source: io::Error },
    #[error("vhost-user on {path}: {message}")]
    VhostUser { path: PathBuf, message: String },
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    #[error("multicast tap on {iface}: {source}")]
    Tap { iface: String, source: io::Error },
    #[error("worker setup: {0}")]
    Worker(io::Error),
}

/// What a port is, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub socket: PathBuf,
    pub mac: MacAddr,
}

/// The NIC side every port of the daemon shares.
pub struct Nic {
    pub iface: String,
    pub ifindex: u32,
    pub rx_queues: u32,
    /// Mbit/s for the config space.
    pub speed: u32,
    pub mtu: u16,
    pub geometry: XskGeometry,
    pub xsk_mode: XskModeChoice,
    pub busy_poll: bool,
    pub steering: Mutex<Steering>,
}

/// A port while the daemon runs.
pub struct Port {
    pub index: u32,
    pub spec: PortSpec,
    pub stats: Vec<Arc<QueueStats>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
    stopping: AtomicBool,
    connected: AtomicBool,
}

impl Port {
    pub fn new(index: u32, spec: PortSpec) -> Self {
        Port {
            index,
            spec,
            stats: vec![Arc::new(QueueStats::default())],
            shutdown: Mutex::new(None),
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Disconnects the frontend, if any, and makes `serve` return after it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        if let Some(h) = self.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.shutdown();
        }
    }
}

/// Makes `path` ready to bind: refuses one a live process listens on or that is not a
/// socket, removes a stale one, creates the parent directory.
pub fn prepare_socket_path(path: &Path) -> Result<(), PortError> {
    let err = |source| PortError::SocketPath { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(PortError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(PortError::SocketInUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "removing stale socket");
                    std::fs::remove_file(path).map_err(err)?;
                }
                Err(e) => return Err(err(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    Ok(())
}

fn vhost_err(path: &Path) -> impl Fn(String) -> PortError + '_ {
    move |message| PortError::VhostUser { path: path.to_path_buf(), message }
}

/// Serves frontends on the port's socket until [`Port::stop`].
pub fn serve(nic: &Nic, port: &Port) -> Result<(), PortError> {
    let path = &port.spec.socket;
    let public = UnixListener::bind(path).map_err(|source| PortError::SocketPath { path: path.clone(), source })?;
    tracing::info!(socket = %path.display(), mac = %port.spec.mac, "port ready for a frontend");
    let mut logged_mode = false;
    while !port.stopping.load(Ordering::Acquire) {
        let sockets = (0..nic.rx_queues)
            .map(|q| XskSocket::open(&nic.iface, nic.ifindex, q, nic.geometry, nic.xsk_mode))
            .collect::<Result<Vec<_>, _>>()?;
        if !logged_mode {
            tracing::info!(iface = %nic.iface, queues = sockets.len(), mode = ?sockets[0].mode(), "AF_XDP sockets open");
            logged_mode = true;
        }
        let tap = PacketTap::open(nic.ifindex).map_err(|source| PortError::Tap { iface: nic.iface.clone(), source })?;
        let max_frame = (usize::from(nic.mtu) + ETH_HLEN).min(sockets[0].max_tx_frame());
        let worker = QueuePairWorker::new(0, sockets, Some(tap), max_frame, nic.busy_poll, port.stats[0].clone())
            .map_err(PortError::Worker)?;
        let config = NetConfig {
            mac: port.spec.mac,
            link_up: true,
            max_virtqueue_pairs: 1,
            mtu: nic.mtu,
            speed: nic.speed,
            duplex: DUPLEX_FULL,
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = NetBackend::new(config, mem.clone(), vec![worker]);
        let name = format!("xvdpa-port{}", port.index);
        let mut daemon =
            VhostUserDaemon::new(name, backend.clone(), mem).map_err(|e| vhost_err(path)(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (i, handler) in handlers.iter().enumerate() {
            for (fd, events, id) in backend.worker(i).event_sources(backend.event_ids()) {
                handler.register_listener(fd, events, u64::from(id)).map_err(PortError::Worker)?;
            }
        }

        let (frontend, _) = public.accept().map_err(|source| PortError::SocketPath { path: path.clone(), source })?;
        let library_side = connect_library(path, port.index, &mut daemon)?;
        let shim = Shim::start(frontend, library_side).map_err(PortError::Worker)?;
        *port.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
        let bound = bind_sockets(nic, port, &backend);
        port.connected.store(true, Ordering::Release);
        tracing::info!(socket = %path.display(), "frontend connected");
        let result = match bound {
            Ok(()) => match daemon.wait() {
                // A frontend that goes away (VM shut down, QEMU killed) is the normal end.
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
                )) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => {
                daemon.request_shutdown();
                let _ = daemon.wait();
                Err(e.to_string())
            }
        };
        shim.stop();
        port.connected.store(false, Ordering::Release);
        port.shutdown.lock().unwrap_or_else(|p| p.into_inner()).take();
        unbind_sockets(nic, port, &backend);
        for handler in &handlers {
            handler.send_exit_event();
        }
        drop(handlers);
        drop(daemon);
        match result {
            Ok(()) => tracing::info!(socket = %path.display(), "frontend disconnected; waiting for the next"),
            Err(e) => tracing::warn!(socket = %path.display(), error = %e, "connection ended with an error; waiting for the next"),
        }
    }
    Ok(())
}

/// Hands the library its end of a private connection: it accepts on a listener bound to a
/// hidden path next to the port's socket, which is removed as soon as the connection exists.
fn connect_library(path: &Path, index: u32, daemon: &mut VhostUserDaemon<NetBackend>) -> Result<UnixStream, PortError> {
    let inner = path.with_file_name(format!(".xvdpa-{}-{}.inner", std::process::id(), index));
    let err = |source| PortError::SocketPath { path: inner.clone(), source };
    let _ = std::fs::remove_file(&inner);
    let listener = UnixListener::bind(&inner).map_err(err)?;
    let ours = UnixStream::connect(&inner).map_err(err);
    let _ = std::fs::remove_file(&inner);
    let ours = ours?;
    daemon.start(&mut Listener::from(listener)).map_err(|e| vhost_err(path)(e.to_string()))?;
    Ok(ours)
}

fn bind_sockets(nic: &Nic, port: &Port, backend: &NetBackend) -> Result<(), SteeringError> {
    let mut steering = nic.steering.lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..backend.queue_pairs() {
        for s in backend.worker(i).sockets() {
            steering.bind_socket(port.index, s.queue_id(), s.fd())?;
        }
    }
    Ok(())
}

fn unbind_sockets(nic: &Nic, port: &Port, backend: &NetBackend) {
    let mut steering = nic.steering.lock().unwrap_or_else(|p| p.into_inner());
    for i in 0..backend.queue_pairs() {
        for s in backend.worker(i).sockets() {
            if let Err(e) = steering.unbind_socket(port.index, s.queue_id()) {
                tracing::warn!(error = %e, "cannot remove socket from the steering map");
            }
        }
    }
}
