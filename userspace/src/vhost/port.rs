//! A VM port: its vhost-user socket and the loop that serves one frontend after another.
//!
//! In server mode the port listens and accepts one frontend after another; in client mode
//! QEMU listens and the port connects, and connects again with back-off
//! ([`ReconnectBackoff`]) whenever QEMU is not there yet or has gone away. Either way the
//! connection then goes through the same shim, library and workers.
//!
//! Every connection gets fresh AF_XDP sockets and UMEM, so nothing a previous VM (or a
//! previous boot of the same VM) left behind can leak into the next one. The port's sockets
//! are in the steering map only while a frontend is connected.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::datapath::GuestMemory;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::api::{PortSpec, SocketRole, TxGso};
use crate::datapath::device::{NetConfig, DUPLEX_FULL, ETH_HLEN};
use crate::datapath::dirty_log::FrontendLogSlot;
use crate::nic::kernel_gso::KernelGsoSocket;
use crate::nic::packet_tap::PacketTap;
use crate::nic::steering::SteeringError;
use crate::nic::xsk::{XskError, XskSocket};
use crate::nic::Nic;
use crate::stats::QueueStats;
use crate::switch::{AnnounceRequests, RateLimit, SwitchPort, SwitchTable, TxPolicy};
use crate::vhost::backend::{Datapath, NetBackend, MAX_QUEUE_SIZE};
use crate::vhost::exit_events::ExitEvents;
use crate::vhost::protocol_shim::Shim;
use crate::vhost::single_copy::{copy_path_sockets, DedicatedNic};
use crate::vhost::socket_file;
use crate::vring::RingErrorFds;
use crate::worker::{QueuePairWorker, WorkerConfig};

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("socket group {group}: {why}")]
    SocketGroup { group: String, why: String },
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
    /// rust-vmm's library could not create its epoll sets, eventfds or threads.
    #[error("vhost-user on {path}: out of resources: {message}")]
    LibraryResources { path: PathBuf, message: String },
}

impl PortError {
    /// A shortage of fds, memory or threads while preparing for a frontend. It may pass, so
    /// the port waits and tries again instead of stopping for good.
    fn is_shortage(&self) -> bool {
        let source = match self {
            PortError::LibraryResources { .. } => return true,
            PortError::SocketPath { source, .. }
            | PortError::Tap { source, .. }
            | PortError::Worker(source)
            | PortError::Xsk(XskError::Mmap { source, .. } | XskError::Setup { source, .. }) => {
                source
            }
            _ => return false,
        };
        is_fd_shortage(source)
            || matches!(
                source.raw_os_error(),
                Some(libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN)
            )
    }
}

/// The library's set-up error as a [`PortError`]. Creating its epoll sets and eventfds,
/// spawning its threads, and accepting or duplicating the private connection the port has
/// just made to it fail only for want of resources.
fn library_error(path: &Path, e: vhost_user_backend::Error) -> PortError {
    use vhost_user_backend::{Error, VhostUserHandlerError as Handler};
    let message = e.to_string();
    let path = path.to_path_buf();
    match e {
        Error::NewVhostUserHandler(
            Handler::CreateEpollHandler(_) | Handler::SpawnVringWorker(_),
        )
        | Error::StartDaemon(_)
        | Error::CreateBackendListener(_)
        | Error::CreateBackendReqHandler(_) => PortError::LibraryResources { path, message },
        _ => PortError::VhostUser { path, message },
    }
}

/// Where a port is in its life, for `xvdpa ctl list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortState {
    /// Listening; no frontend connected.
    Waiting,
    Connected,
    /// Stopped for good by an error of its own (other ports are unaffected).
    Failed(String),
    /// Being removed.
    Stopping,
}

impl std::fmt::Display for PortState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortState::Waiting => f.write_str("waiting"),
            PortState::Connected => f.write_str("connected"),
            PortState::Failed(e) => write!(f, "failed: {e}"),
            PortState::Stopping => f.write_str("stopping"),
        }
    }
}

/// A port while the daemon runs.
pub struct Port {
    pub index: u32,
    pub spec: PortSpec,
    pub stats: Vec<Arc<QueueStats>>,
    pub switch_port: Arc<SwitchPort>,
    state: Mutex<PortState>,
    /// The path the current (or last) connection's frames take.
    datapath: Arc<Mutex<Datapath>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
    stopping: AtomicBool,
    /// The kernel GSO socket (`tx-gso=kernel`) could not be made and the port fell back to
    /// the daemon's segmenter: said once in the log, not on every connection.
    kernel_gso_refused: AtomicBool,
    /// Set once the port is ready for a frontend (its socket listens, or a client port
    /// starts connecting) or has failed before that: what start-up waits for before telling
    /// the service manager the daemon is ready.
    settled: (Mutex<bool>, Condvar),
}

impl Port {
    pub fn new(index: u32, spec: PortSpec) -> Self {
        Port {
            index,
            switch_port: SwitchPort::new(spec.mac, spec.vlan, index),
            stats: (0..spec.queue_pairs.max(1))
                .map(|_| Arc::new(QueueStats::default()))
                .collect(),
            spec,
            state: Mutex::new(PortState::Waiting),
            datapath: Arc::default(),
            shutdown: Mutex::new(None),
            stopping: AtomicBool::new(false),
            kernel_gso_refused: AtomicBool::new(false),
            settled: (Mutex::new(false), Condvar::new()),
        }
    }

    fn settle(&self) {
        *crate::sync::lock(&self.settled.0) = true;
        self.settled.1.notify_all();
    }

    /// Waits up to `timeout` for the port to be ready for a frontend or to have failed
    /// trying; whether it settled in time.
    pub fn wait_settled(&self, timeout: Duration) -> bool {
        let guard = crate::sync::lock(&self.settled.0);
        let (settled, _) = self
            .settled
            .1
            .wait_timeout_while(guard, timeout, |settled| !*settled)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *settled
    }

    pub fn state(&self) -> PortState {
        crate::sync::lock(&self.state).clone()
    }

    pub fn datapath(&self) -> Datapath {
        crate::sync::lock(&self.datapath).clone()
    }

    fn set_state(&self, state: PortState) {
        *crate::sync::lock(&self.state) = state;
    }

    /// Disconnects the frontend, if any, and makes `serve` return after it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.set_state(PortState::Stopping);
        if let Some(h) = crate::sync::lock(&self.shutdown).take() {
            h.shutdown();
        }
        // A port waiting in accept() wakes up on a connection; `serve` then sees `stopping`.
        // A client port's socket is QEMU's: it must not get a stray connection, and the
        // port's reconnect loop sees `stopping` between tries.
        if self.spec.mode == SocketRole::Server {
            let _ = UnixStream::connect(&self.spec.socket);
        }
    }

    /// Sleeps for `delay`, or less if the port is stopping meanwhile.
    fn pause(&self, delay: Duration) {
        const SLICE: Duration = Duration::from_millis(20);
        let end = Instant::now() + delay;
        while !self.stopping.load(Ordering::Acquire) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }

    fn policy(&self) -> TxPolicy {
        TxPolicy::new(
            self.spec.mac,
            &self.spec.allow_macs,
            RateLimit::new(self.spec.rate_pps, self.spec.rate_bps),
            self.spec.vlan,
        )
        .with_vlan_passthrough(self.spec.vlan_passthrough)
    }
}

/// How long an accept loop waits after a failed accept before it tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Failures closer together than this are one episode, logged once.
const ACCEPT_EPISODE_GAP: Duration = Duration::from_secs(10);

/// What an accept loop (a port's, the control socket's, the metrics endpoint's) does when
/// `accept` fails. The usual cause is a full fd table (EMFILE/ENFILE): the pending connection
/// stays in the backlog, the listener stays readable, and retrying at once would spin a CPU
/// until some fd is freed, while giving up would end the loop for good. So the loop waits
/// [`ACCEPT_RETRY`] between tries. While fds come free one at a time, accepts succeed and
/// fail in turn; failures less than [`ACCEPT_EPISODE_GAP`] apart are one episode and get one
/// log line.
pub struct AcceptBackoff {
    endpoint: String,
    last_failure: Option<Instant>,
}

impl AcceptBackoff {
    pub fn new(endpoint: impl Into<String>) -> Self {
        AcceptBackoff {
            endpoint: endpoint.into(),
            last_failure: None,
        }
    }

    /// `accept` failed with `error`: logs it if it starts an episode, and returns how long to
    /// wait before the next try.
    pub fn accept_failed(&mut self, error: &io::Error) -> Duration {
        let cause = if is_fd_shortage(error) {
            "out of file descriptors"
        } else {
            "accept failed"
        };
        self.failed(error, cause)
    }

    /// Something the next connection needs failed with `error`, for `cause`: logs it if it
    /// starts an episode, and returns how long to wait before the next try.
    pub fn failed(&mut self, error: &dyn std::fmt::Display, cause: &str) -> Duration {
        let now = Instant::now();
        let new_episode = self
            .last_failure
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_EPISODE_GAP);
        self.last_failure = Some(now);
        if new_episode {
            tracing::warn!(endpoint = %self.endpoint, error = %error, "{cause}: connections wait; retrying every {} ms", ACCEPT_RETRY.as_millis());
        }
        ACCEPT_RETRY
    }
}

fn is_fd_shortage(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether a failed `accept` may work when tried again: a shortage of fds or memory, or a
/// connection that went away before it was accepted.
fn accept_may_recover(error: &io::Error) -> bool {
    is_fd_shortage(error)
        || matches!(
            error.raw_os_error(),
            Some(libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED | libc::EPROTO | libc::EINTR)
        )
}

/// The first wait of a client port whose frontend is not listening; it doubles up to
/// [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// When a client port tries to connect again: QEMU (re)starting takes from a fraction of a
/// second to a few, so the first tries come quickly, and a QEMU that stays away costs one
/// `connect` every [`RECONNECT_MAX`]. A connection that lasts resets the schedule; one that
/// ends sooner counts as a failure, so a frontend that hangs up at once cannot make the port
/// build and tear down a connection's sockets and threads in a tight loop.
#[derive(Debug)]
pub struct ReconnectBackoff {
    next: Duration,
    connected_at: Option<Instant>,
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        ReconnectBackoff {
            next: RECONNECT_FIRST,
            connected_at: None,
        }
    }
}

impl ReconnectBackoff {
    /// A connect failed: how long to wait before the next.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(RECONNECT_MAX);
        delay
    }

    /// Whether no try has failed since the last connection (the start of an episode).
    pub fn is_fresh(&self) -> bool {
        self.next == RECONNECT_FIRST
    }

    /// A connection was made.
    pub fn connected(&mut self) {
        self.connected_at = Some(Instant::now());
    }

    /// The last connection (if any) has ended: how long to wait before connecting again.
    pub fn after_connection(&mut self) -> Duration {
        match self.connected_at.take() {
            Some(at) => self.ended_after(at.elapsed()),
            None => Duration::ZERO,
        }
    }

    /// A connection ended after `lasted`: at once again if it lasted [`RECONNECT_MAX`] (the
    /// schedule starts over), else the schedule's next wait.
    fn ended_after(&mut self, lasted: Duration) -> Duration {
        if lasted >= RECONNECT_MAX {
            self.next = RECONNECT_FIRST;
            Duration::ZERO
        } else {
            self.failed()
        }
    }
}

/// Where a port's frontends come from.
enum Frontends {
    /// Server mode: the port's listening socket.
    Listening(std::os::unix::net::UnixListener),
    /// Client mode: QEMU's socket, connected to with back-off.
    Connecting(ReconnectBackoff),
}

/// Makes a port's socket path ready: in server mode as [`prepare_socket_path`] does; in
/// client mode the path is QEMU's, and only something there that is not a socket is refused
/// (QEMU need not have started yet).
pub fn prepare(spec: &PortSpec) -> Result<(), PortError> {
    match spec.mode {
        SocketRole::Server => {
            // A group the daemon cannot give its socket fails the request that names it,
            // not the port later.
            if let Some(name) = &spec.socket_group {
                let gid = crate::privilege::group_id(name).map_err(|e| PortError::SocketGroup {
                    group: name.clone(),
                    why: e.to_string(),
                })?;
                if !crate::privilege::may_give_group(gid) {
                    return Err(PortError::SocketGroup {
                        group: name.clone(),
                        why: "the daemon's user is not a member of it".into(),
                    });
                }
            }
            prepare_socket_path(&spec.socket)
        }
        SocketRole::Client => match std::fs::symlink_metadata(&spec.socket) {
            Ok(meta) if !meta.file_type().is_socket() => {
                Err(PortError::NotASocket(spec.socket.clone()))
            }
            _ => Ok(()),
        },
    }
}

/// Makes `path` ready to bind: refuses one a live process listens on or that is not a
/// socket, removes a stale one, creates the parent directory.
pub fn prepare_socket_path(path: &Path) -> Result<(), PortError> {
    let err = |source| PortError::SocketPath {
        path: path.to_path_buf(),
        source,
    };
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
        // 0750: the daemon's group may reach the sockets inside (each has its own mode too).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o750)
            .create(parent)
            .map_err(err)?;
    }
    Ok(())
}

/// Serves frontends on the port's socket until [`Port::stop`]. An error ends this port only;
/// it is recorded in the port's state for `xvdpa ctl list`.
pub fn serve(nic: &Arc<Nic>, switch: &Arc<SwitchTable>, port: &Port) -> Result<(), PortError> {
    let result = serve_connections(nic, switch, port);
    if let Err(e) = &result {
        port.set_state(PortState::Failed(e.to_string()));
    }
    port.settle();
    result
}

fn serve_connections(
    nic: &Arc<Nic>,
    switch: &Arc<SwitchTable>,
    port: &Port,
) -> Result<(), PortError> {
    let path = &port.spec.socket;
    // A server port's socket has the port's group and mode (by default 0660 and the daemon's
    // group: a QEMU in that group, nobody else) before anyone can reach it. A client port
    // connects to the socket QEMU serves.
    let socket_err = |source| PortError::SocketPath {
        path: path.clone(),
        source,
    };
    let mut frontends = match port.spec.mode {
        SocketRole::Server => {
            let gid = match &port.spec.socket_group {
                Some(name) => Some(
                    crate::privilege::group_id(name)
                        .map_err(|e| socket_err(io::Error::new(io::ErrorKind::NotFound, e)))?,
                ),
                None => None,
            };
            Frontends::Listening(
                socket_file::bind_with_access(path, port.spec.socket_mode, gid)
                    .map_err(socket_err)?,
            )
        }
        SocketRole::Client => Frontends::Connecting(ReconnectBackoff::default()),
    };
    tracing::info!(port = port.index, socket = %path.display(), mode = %port.spec.mode, mac = %port.spec.mac, "port ready for a frontend");
    port.settle();
    let mut shortage = AcceptBackoff::new(path.display().to_string());
    while !port.stopping.load(Ordering::Acquire) {
        match serve_one(nic, switch, port, &mut frontends) {
            Ok(()) => {}
            Err(e) if e.is_shortage() => {
                std::thread::sleep(shortage.failed(&e, "out of resources"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Prepares a connection's workers and the library, serves one frontend until it leaves,
/// and closes everything the connection had. Returns at once when the port is stopping.
fn serve_one(
    nic: &Arc<Nic>,
    switch: &Arc<SwitchTable>,
    port: &Port,
    frontends: &mut Frontends,
) -> Result<(), PortError> {
    let path = &port.spec.socket;
    let pairs = usize::from(port.spec.queue_pairs.max(1));
    let ring_errors = RingErrorFds::new(2 * pairs);
    let workers = build_workers(nic, switch, port, &ring_errors)?;
    let config = NetConfig {
        mac: port.spec.mac,
        link_up: true,
        max_virtqueue_pairs: workers.len() as u16,
        mtu: nic.mtu,
        speed: nic.speed,
        duplex: DUPLEX_FULL,
    };
    // The library's view of the guest memory; the backend keeps its own (see `NetBackend`).
    let mem = GuestMemoryAtomic::new(GuestMemory::new());
    // Made before the library asks for them: it cannot report failing to get one.
    let exit_events = ExitEvents::new(workers.len()).map_err(PortError::Worker)?;
    // The frontend's SEND_RARP wakes queue pair 0, which sends the announcement.
    let announce = Arc::new(AnnounceRequests::new(
        workers[0].waker().map_err(PortError::Worker)?,
    ));
    // The log the frontend shares, as the shim maps it, for the memory tables after it.
    let frontend_log = Arc::new(FrontendLogSlot::default());
    // A dedicated NIC's path is made when the guest's memory arrives.
    let dedicated = nic.dedicated.then(|| {
        DedicatedNic::new(
            nic.clone(),
            port.index,
            port.spec.vlan,
            port.spec.guest_umem_tx,
            port.datapath.clone(),
        )
    });
    if !nic.dedicated {
        *crate::sync::lock(&port.datapath) = Datapath::Copy;
    }
    let backend = NetBackend::new(
        config,
        workers,
        port.switch_port.clone(),
        exit_events,
        announce.clone(),
        frontend_log.clone(),
        dedicated,
    );
    let name = format!("xvdpa-port{}", port.index);
    let mut daemon =
        VhostUserDaemon::new(name, backend.clone(), mem).map_err(|e| library_error(path, e))?;
    let handlers = daemon.get_epoll_handlers();
    if let Some(dedicated) = backend.dedicated() {
        dedicated.set_handlers(&handlers);
    }
    for (i, handler) in handlers.iter().enumerate() {
        for (fd, events, id) in backend.worker(i).event_sources(backend.event_ids()) {
            handler
                .register_listener(fd, events, u64::from(id))
                .map_err(PortError::Worker)?;
        }
    }

    let next = match frontends {
        Frontends::Listening(public) => accept_frontend(public, port)?,
        Frontends::Connecting(backoff) => connect_frontend(port, backoff),
    };
    let Some(frontend) = next else {
        return Ok(());
    };
    // Steer the port's MAC to its sockets before the frontend's first message goes
    // through: once the frontend has its acks (its rings enabled) it may expect frames,
    // and a frame steered before its socket is in the map is dropped by XDP.
    let bound = bind_sockets(nic, port, &backend);
    let num_queues = 2 * backend.queue_pairs() as u32;
    let shim = connect_library(path, &mut daemon)
        .and_then(|library_side| {
            let max_size = MAX_QUEUE_SIZE as u16;
            Shim::start(
                frontend,
                library_side,
                num_queues,
                max_size,
                ring_errors,
                announce,
                frontend_log,
            )
            .map_err(PortError::Worker)
        })
        .inspect_err(|_| unbind_sockets(nic, port, &backend))?;
    *crate::sync::lock(&port.shutdown) = daemon.shutdown_handle();
    // A stop that came before the handle was stored found nothing to shut down.
    if port.stopping.load(Ordering::Acquire) {
        if let Some(h) = crate::sync::lock(&port.shutdown).take() {
            h.shutdown();
        }
    }
    if !port.stopping.load(Ordering::Acquire) {
        port.set_state(PortState::Connected);
    }
    tracing::info!(port = port.index, socket = %path.display(), "frontend connected");
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
    if !port.stopping.load(Ordering::Acquire) {
        port.set_state(PortState::Waiting);
    }
    crate::sync::lock(&port.shutdown).take();
    port.switch_port.unpublish();
    unbind_sockets(nic, port, &backend);
    for handler in &handlers {
        handler.send_exit_event();
    }
    drop(handlers);
    drop(daemon);
    // Queue pair 0's thread publishes the receive queue on its first event, and an event
    // taken before its exit event (a kick the frontend wrote just before it left, the
    // housekeeping timer) can come after the unpublish above when the machine is busy: the
    // switch would keep this connection's ring and guest memory (the memfd and its mapping,
    // the whole of a departed VM's RAM) until the next frontend. Its threads are joined now,
    // so nothing publishes again.
    port.switch_port.unpublish();
    match result {
        Ok(()) => {
            tracing::info!(socket = %path.display(), "frontend disconnected; waiting for the next")
        }
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "connection ended with an error; waiting for the next")
        }
    }
    Ok(())
}

/// The next frontend, or `None` once the port is stopping. A failed accept that may
/// recover (no fd free: see [`AcceptBackoff`]) is tried again; any other ends the port.
fn accept_frontend(
    public: &std::os::unix::net::UnixListener,
    port: &Port,
) -> Result<Option<UnixStream>, PortError> {
    let mut backoff = AcceptBackoff::new(port.spec.socket.display().to_string());
    loop {
        let accepted = public.accept();
        if port.stopping.load(Ordering::Acquire) {
            return Ok(None);
        }
        match accepted {
            Ok((frontend, _)) => return Ok(Some(frontend)),
            Err(e) if accept_may_recover(&e) => std::thread::sleep(backoff.accept_failed(&e)),
            Err(source) => {
                return Err(PortError::SocketPath {
                    path: port.spec.socket.clone(),
                    source,
                })
            }
        }
    }
}

/// A connection to the frontend listening on a client port's socket, or `None` once the port
/// is stopping. Every failure (no socket yet, nobody listening, QEMU's backlog full, a
/// permission the operator has yet to fix) is tried again after [`ReconnectBackoff`]'s
/// wait, and logged once per episode.
fn connect_frontend(port: &Port, backoff: &mut ReconnectBackoff) -> Option<UnixStream> {
    let path = &port.spec.socket;
    port.pause(backoff.after_connection());
    loop {
        if port.stopping.load(Ordering::Acquire) {
            return None;
        }
        match UnixStream::connect(path) {
            Ok(frontend) => {
                backoff.connected();
                return Some(frontend);
            }
            Err(e) => {
                if backoff.is_fresh() {
                    tracing::info!(port = port.index, socket = %path.display(), error = %e, "frontend not listening; connecting again with back-off up to {} ms", RECONNECT_MAX.as_millis());
                }
                port.pause(backoff.failed());
            }
        }
    }
}

/// One worker per queue pair. Pair `i` serves the NIC queues `q` with `q % pairs == i`, so
/// every NIC queue's frames for this port have exactly one reader, and transmits through a
/// socket of its own on NIC queue `i % queues`, which is never in the steering map (nor in
/// the worker's epoll set). Group-addressed copies from the tap go to pair 0.
fn build_workers(
    nic: &Nic,
    switch: &Arc<SwitchTable>,
    port: &Port,
    ring_errors: &Arc<RingErrorFds>,
) -> Result<Vec<QueuePairWorker>, PortError> {
    let pairs = usize::from(port.spec.queue_pairs.max(1));
    let mut tap = Some(
        PacketTap::open(nic.ifindex, port.spec.vlan, port.spec.promisc).map_err(|source| {
            PortError::Tap {
                iface: nic.iface.clone(),
                source,
            }
        })?,
    );
    // One policy for the port; each pair's copy shares its policer.
    let policy = port.policy();
    let mut workers = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        // A dedicated NIC's sockets come with the guest's memory (`single_copy`).
        let (sockets, tx) = match nic.dedicated {
            true => (Vec::new(), None),
            false => {
                let strip = port.spec.vlan.is_some();
                let (sockets, tx) = copy_path_sockets(&nic.queues, pairs, pair, strip)?;
                (sockets, Some(tx))
            }
        };
        let max_tx = tx.as_ref().map_or(usize::MAX, XskSocket::max_tx_frame);
        let config = WorkerConfig {
            max_frame: (usize::from(nic.mtu) + ETH_HLEN).min(max_tx),
            busy_poll: nic.busy_poll,
            adaptive_poll: nic.adaptive_poll,
            napi: nic.napi.clone(),
            policy: policy.clone(),
            switch: switch.clone(),
            own: port.switch_port.clone(),
            cpu: (!port.spec.cpus.is_empty()).then(|| port.spec.cpus[pair % port.spec.cpus.len()]),
            ring_errors: ring_errors.clone(),
            // Also on a dedicated NIC: its guest may take the copy path after all (memory
            // the kernel cannot register), whose sink uses it; the single-copy sink does not.
            kernel_gso: match port.spec.tx_gso {
                TxGso::Kernel => kernel_gso_socket(nic, port),
                TxGso::Daemon => None,
            },
        };
        let worker = QueuePairWorker::new(
            pair,
            sockets,
            tx,
            tap.take(),
            config,
            port.stats[pair].clone(),
        )
        .map_err(PortError::Worker)?;
        workers.push(worker);
    }
    Ok(workers)
}

/// A queue pair's socket for handing TSO frames to the kernel whole, or `None` where it
/// cannot be made (no CAP_NET_RAW, say): the port's TSO frames are then cut by the daemon,
/// as with `tx-gso=daemon`, which the log says once for the port.
fn kernel_gso_socket(nic: &Nic, port: &Port) -> Option<KernelGsoSocket> {
    match KernelGsoSocket::open(nic.ifindex) {
        Ok(socket) => Some(socket),
        Err(e) => {
            if !port.kernel_gso_refused.swap(true, Ordering::Relaxed) {
                tracing::warn!(port = port.index, iface = %nic.iface, error = %e, "cannot open the socket that hands TSO frames to the kernel whole: the daemon segments them (as tx-gso=daemon)");
            }
            None
        }
    }
}

/// Hands the library its end of a private connection: it accepts on a listener bound inside
/// a fresh 0700 directory next to the port's socket, gone as soon as the connection exists,
/// so no other local process can slip in as the library's peer.
fn connect_library(
    path: &Path,
    daemon: &mut VhostUserDaemon<NetBackend>,
) -> Result<UnixStream, PortError> {
    let (listener, ours) =
        socket_file::private_pair(path).map_err(|source| PortError::SocketPath {
            path: path.to_path_buf(),
            source,
        })?;
    daemon
        .start(&mut Listener::from(listener))
        .map_err(|e| library_error(path, e))?;
    Ok(ours)
}

fn bind_sockets(nic: &Nic, port: &Port, backend: &NetBackend) -> Result<(), SteeringError> {
    let mut steering = crate::sync::lock(&nic.steering);
    for i in 0..backend.queue_pairs() {
        for (queue, fd) in backend.worker(i).receiving_sockets() {
            steering.bind_socket(port.index, queue, fd)?;
        }
    }
    Ok(())
}

fn unbind_sockets(nic: &Nic, port: &Port, backend: &NetBackend) {
    let mut steering = crate::sync::lock(&nic.steering);
    for i in 0..backend.queue_pairs() {
        for (queue, _) in backend.worker(i).receiving_sockets() {
            if let Err(e) = steering.unbind_socket(port.index, queue) {
                tracing::warn!(error = %e, "cannot remove socket from the steering map");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_from_100_ms_to_2_s_and_start_over_after_a_lasting_connection() {
        let mut b = ReconnectBackoff::default();
        assert!(b.is_fresh());
        let ms: Vec<u128> = (0..8).map(|_| b.failed().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert!(!b.is_fresh());
        // A connection that lasts starts the schedule over, and the next try comes at once.
        assert_eq!(b.ended_after(Duration::from_secs(60)), Duration::ZERO);
        assert!(b.is_fresh());
        assert_eq!(b.failed(), Duration::from_millis(100));
        // Connections that end at once are failures: the waits between them grow.
        let mut b = ReconnectBackoff::default();
        let ms: Vec<u128> = (0..6)
            .map(|_| b.ended_after(Duration::from_millis(5)).as_millis())
            .collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000]);
        // No connection yet: nothing to wait for.
        assert_eq!(
            ReconnectBackoff::default().after_connection(),
            Duration::ZERO
        );
    }

    #[test]
    fn a_client_port_accepts_a_missing_socket_and_refuses_a_file() {
        let dir = std::env::temp_dir().join(format!("xvdpa-client-prep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = |name: &str| PortSpec {
            socket: dir.join(name),
            mode: SocketRole::Client,
            ..Default::default()
        };
        assert!(prepare(&spec("absent.sock")).is_ok());
        // Not created on the way: the path is QEMU's to make.
        assert!(!dir.join("absent.sock").exists());
        std::fs::write(dir.join("file"), b"x").unwrap();
        assert!(matches!(
            prepare(&spec("file")),
            Err(PortError::NotASocket(_))
        ));
        // A live listener (QEMU's) is what a client port connects to, not a conflict.
        let _qemu = std::os::unix::net::UnixListener::bind(dir.join("live.sock")).unwrap();
        assert!(prepare(&spec("live.sock")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
