//! The port registry: the running daemon's NIC and its ports, shared by the control
//! socket and the metrics endpoint, which add, remove, list and count ports while the others
//! keep serving. Each port runs on a thread of its own ([`port::serve`]); adding or removing
//! one touches the steering map and the switch table for that port only.
//!
//! Locks: the registry's port map, then the NIC's steering (never the other way round).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xvdpa_common::{XdpCounter, MAX_PORTS};

use crate::api::{PortCounters, PortInfo, PortSpec, QueueCounters, StatsSnapshot};
use crate::mac::MacAddr;
use crate::nic::steering::{Steering, SteeringError};
use crate::nic::Nic;
use crate::stats::QueueStats;
use crate::switch::{SwitchPort, SwitchTable, Takeover};
use crate::sync;
use crate::vhost::port::{self, Port, PortError, PortState};

/// Why a port cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("at most {MAX_PORTS} ports")]
    TooManyPorts,
    #[error("MAC {0} is given to two ports")]
    DuplicateMac(String),
    #[error("socket {0} is given to two ports")]
    DuplicateSocket(PathBuf),
    #[error("no port matches {0:?} (give its socket path, MAC or index)")]
    UnknownPort(String),
    #[error("migrate-from={from:?}: that port has MAC {mac}{}, not this port's", vlan.map(|v| format!(" on VLAN {v}")).unwrap_or_default())]
    MigrationSourceDiffers {
        from: String,
        mac: String,
        vlan: Option<u16>,
    },
    /// A port asking for guest memory as the UMEM takes the NIC's queues for itself.
    #[error("the NIC is dedicated to port {socket} (guest-umem=on): no other port can share its queues; use a NIC of its own for each such port")]
    NicDedicated { socket: PathBuf },
    #[error("the NIC's queues are kept for one port with guest-umem=on (the daemon started with one): add such a port, or run a daemon on another NIC")]
    NicKeptForGuestUmem,
    #[error("guest-umem=on needs the NIC to itself, and this daemon's NIC queues are bound for the copy path of every port: give the port in the daemon's start-up configuration (--port or the config file), as its only port")]
    GuestUmemNeedsOwnNic,
    #[error("port {socket}: guest-umem-tx applies to the single-copy path only: add guest-umem=on, or leave guest-umem-tx out")]
    GuestUmemTxWithoutGuestUmem { socket: PathBuf },
    #[error(transparent)]
    Port(#[from] PortError),
    #[error(transparent)]
    Steering(#[from] SteeringError),
    /// The port started but could not listen or connect (its socket, its group, ...).
    #[error("{0}")]
    PortFailed(String),
    /// The port's thread could not be started.
    #[error("control plane: {0}")]
    Thread(io::Error),
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
    /// The switch between the ports (frames from one guest to another never reach the NIC).
    switch: Arc<SwitchTable>,
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
    /// A daemon with no ports yet on `nic`; its uptime counts from here.
    pub fn new(nic: Arc<Nic>) -> Self {
        Daemon {
            nic,
            switch: Arc::new(SwitchTable::default()),
            ports: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
        }
    }

    fn lock_ports(&self) -> MutexGuard<'_, BTreeMap<u32, PortSlot>> {
        sync::lock(&self.ports)
    }

    fn steering(&self) -> MutexGuard<'_, Steering> {
        sync::lock(&self.nic.steering)
    }

    /// Adds a port and starts serving it; the other ports are not touched.
    pub fn add_port(&self, spec: PortSpec) -> Result<PortInfo, DaemonError> {
        let mut ports = self.lock_ports();
        // A migration target shares its source's MAC (and VLAN), and only its source's.
        let source = match &spec.migrate_from {
            Some(from) => {
                let index = find_port(&ports, from)
                    .ok_or_else(|| DaemonError::UnknownPort(from.clone()))?;
                let s = &ports[&index].port.spec;
                if s.mac != spec.mac || s.vlan != spec.vlan {
                    return Err(DaemonError::MigrationSourceDiffers {
                        from: from.clone(),
                        mac: s.mac.to_string(),
                        vlan: s.vlan,
                    });
                }
                Some(index)
            }
            None => None,
        };
        self.check_nic_sharing(&ports, &spec)?;
        for slot in ports.values() {
            let p = &slot.port.spec;
            if p.mac == spec.mac && source != Some(slot.port.index) {
                return Err(DaemonError::DuplicateMac(spec.mac.to_string()));
            }
            if p.socket == spec.socket {
                return Err(DaemonError::DuplicateSocket(spec.socket.clone()));
            }
        }
        let index = (0..MAX_PORTS)
            .find(|i| !ports.contains_key(i))
            .ok_or(DaemonError::TooManyPorts)?;
        port::prepare(&spec)?;
        let port = Arc::new(Port::new(index, spec));
        {
            let mut steering = self.steering();
            steering.reset_port_counter(index)?;
            if source.is_none() {
                steering.add_port(port.spec.mac, port.spec.vlan, index)?;
            }
        }
        match source {
            None => self.switch.insert(port.switch_port.clone()),
            // The source keeps receiving until the migrated guest starts here.
            Some(source) => port.switch_port.set_takeover(takeover(
                self.nic.clone(),
                self.switch.clone(),
                Arc::downgrade(&port.switch_port),
                Arc::downgrade(&ports[&source].port.switch_port),
            )),
        }
        let (nic, switch, p) = (self.nic.clone(), self.switch.clone(), port.clone());
        let thread = std::thread::Builder::new()
            .name(format!("xvdpa-port{index}"))
            .spawn(move || {
                if let Err(e) = port::serve(&nic, &switch, &p) {
                    tracing::error!(port = p.index, socket = %p.spec.socket.display(), error = %e, "port failed; the other ports keep running");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.switch.remove(&port.switch_port);
                let _ = self
                    .steering()
                    .remove_port(port.spec.mac, port.spec.vlan, index);
                return Err(DaemonError::Thread(e));
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

    /// A NIC dedicated to a guest-memory port takes that one port (again, after it was
    /// removed); a NIC whose queues the copy path holds takes no guest-memory port.
    fn check_nic_sharing(
        &self,
        ports: &BTreeMap<u32, PortSlot>,
        spec: &PortSpec,
    ) -> Result<(), DaemonError> {
        if spec.guest_umem_tx_without_guest_umem() {
            return Err(DaemonError::GuestUmemTxWithoutGuestUmem {
                socket: spec.socket.clone(),
            });
        }
        if !self.nic.dedicated {
            return match spec.guest_umem {
                true => Err(DaemonError::GuestUmemNeedsOwnNic),
                false => Ok(()),
            };
        }
        let holder = ports.values().next().map(|s| &s.port.spec);
        match holder {
            Some(p) => Err(DaemonError::NicDedicated {
                socket: p.socket.clone(),
            }),
            None if !spec.guest_umem => Err(DaemonError::NicKeptForGuestUmem),
            None => Ok(()),
        }
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
        if let Err(e) = self
            .steering()
            .remove_port(port.spec.mac, port.spec.vlan, port.index)
        {
            tracing::warn!(port = port.index, error = %e, "cannot remove the port's MAC from the steering map");
        }
        self.switch.remove(&port.switch_port);
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
        // A client port's socket is QEMU's, not ours to remove.
        if port.spec.mode == crate::api::SocketRole::Server {
            match std::fs::remove_file(&port.spec.socket) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(socket = %port.spec.socket.display(), error = %e, "cannot remove socket")
                }
            }
        }
        let mut info = port_info(&port);
        info.state = "removed".into();
        info
    }

    /// Every port, by index.
    pub fn list(&self) -> Vec<PortInfo> {
        self.lock_ports()
            .values()
            .map(|s| port_info(&s.port))
            .collect()
    }

    /// The counters of the XDP program and of every port's queue pairs.
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

    /// Waits up to `timeout` for port `index`, just added, to listen (or connect, in client
    /// mode, or wait to) and returns how it stands then, so a request to add a port is
    /// answered once its socket exists. One that failed to start is removed again, and its
    /// error is the answer.
    pub fn settle_new_port(&self, index: u32, timeout: Duration) -> Result<PortInfo, DaemonError> {
        let port = self
            .lock_ports()
            .get(&index)
            .map(|s| s.port.clone())
            .ok_or_else(|| DaemonError::UnknownPort(index.to_string()))?;
        if !port.wait_settled(timeout) {
            tracing::warn!(port = index, "port not listening yet after {timeout:?}");
        }
        if let PortState::Failed(why) = port.state() {
            let _ = self.remove_port(&index.to_string());
            return Err(DaemonError::PortFailed(why));
        }
        Ok(port_info(&port))
    }

    /// Waits up to `timeout` in all until every port is ready for a frontend or has failed
    /// trying (a port's thread binds its socket after `add_port` returns). Returns the
    /// indices of the ports still unsettled then.
    pub fn wait_ports_settled(&self, timeout: Duration) -> Vec<u32> {
        let ports: Vec<Arc<Port>> = self.lock_ports().values().map(|s| s.port.clone()).collect();
        let deadline = Instant::now() + timeout;
        ports
            .iter()
            .filter(|p| !p.wait_settled(deadline.saturating_duration_since(Instant::now())))
            .map(|p| p.index)
            .collect()
    }

    /// Stops every port, logs the final counters and detaches XDP.
    pub fn shutdown(&self) {
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

/// The switch-over of migration target `to`: its MAC's steering entry and switch table slot
/// move to it from `from`, the port its guest left, which becomes the target of the next
/// migration back (two ports of one MAC take turns: whichever's guest started last has the
/// MAC). Runs on `to`'s first queue pair's thread, holding no lock, when the migrated guest
/// starts its rings or its frontend announces it (`SEND_RARP`).
fn takeover(
    nic: Arc<Nic>,
    switch: Arc<SwitchTable>,
    to: Weak<SwitchPort>,
    from: Weak<SwitchPort>,
) -> Takeover {
    Box::new(move || {
        let Some(port) = to.upgrade() else {
            return;
        };
        let (mac, index) = (port.mac, port.index);
        if let Err(e) = sync::lock(&nic.steering).add_port(mac, port.vlan, index) {
            tracing::error!(port = index, %mac, error = %e, "migrated guest started, but its MAC cannot be steered to its new port");
            return;
        }
        switch.insert(port);
        tracing::info!(port = index, %mac, "migrated guest started; its MAC's frames go to this port now");
        if let Some(left) = from.upgrade() {
            left.set_takeover_back(takeover(nic, switch, from, to));
        }
    })
}

/// The index of the port `name` names: its socket path, MAC or index.
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
        datapath: p.datapath().to_string(),
    }
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
