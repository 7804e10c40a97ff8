//! The path a port with the NIC to itself (`guest-umem=on`) takes, decided when its guest's
//! memory arrives: the guest's RAM file registered as the UMEM of the NIC's queue (the
//! single-copy path), or, when that cannot be, the copy path on shared-UMEM queues bound for
//! this connection. Either way the sockets are made after the workers, so they are put into
//! the steering map and the workers' epoll sets here.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use vhost_user_backend::VringEpollHandler;

use crate::api::GuestUmemTx;
use crate::datapath::device::ETH_HLEN;
use crate::datapath::zero_copy_rx::{FillLayout, GuestFile, PostedBuffers};
use crate::datapath::zero_copy_tx::MAX_PIECES;
use crate::datapath::GuestMemory;
use crate::nic::napi::Netlink;
use crate::nic::xsk::guest_umem::{GuestRxSocket, GuestRxSpec, GuestUmemLayout};
use crate::nic::xsk::{NicQueue, XskError, XskMode, XskSocket};
use crate::nic::Nic;
use crate::vhost::backend::{Datapath, NetBackend};
use crate::worker::{EventIds, GuestPath, QueuePairWorker};

/// Guest receive buffers the kernel may hold at once, and the socket's transmit slots.
const GUEST_RING: u32 = 1024;
const GUEST_TX_SLOTS: u32 = 1024;
/// Spare receive frames of the daemon's own, for when the guest is late in posting buffers
/// (as many as the guest's; the copy path queues into 2048 frames of its own). The fill and
/// rx rings take both.
const SPARE_FRAMES: u32 = 1024;

/// The copy path's sockets of queue pair `pair` of `pairs`: one per NIC queue `q` with
/// `q % pairs == pair` to receive on, and one to transmit with on NIC queue
/// `pair % queues` (never in the steering map).
pub fn copy_path_sockets(
    queues: &[Arc<NicQueue>],
    pairs: usize,
    pair: usize,
    strip_vlan: bool,
) -> Result<(Vec<XskSocket>, XskSocket), XskError> {
    let sockets = queues
        .iter()
        .filter(|q| q.queue_id() as usize % pairs == pair)
        .map(|q| XskSocket::open(q).map(|s| s.strip_vlan_on_receive(strip_vlan)))
        .collect::<Result<Vec<_>, _>>()?;
    let tx = XskSocket::open(&queues[pair % queues.len()])?;
    Ok((sockets, tx))
}

/// How a guest-memory socket transmits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TxPlan {
    /// From the guest's buffers, at most `max_pieces` descriptors per frame (slot included).
    InPlace { max_pieces: usize },
    /// Copied once into a slot, for the reason given.
    Copied { why: String },
}

/// How a socket in `mode` sends under `guest-umem-tx=setting`; `zc_max_segs` reads the NIC's
/// zero-copy piece limit (asked only for a zero-copy socket that would send in place). A
/// zero-copy driver takes at most that many descriptors per frame (more leave the frame's
/// slot in flight for good, see `PieceLayout::max_pieces`), and one means no multi-buffer
/// at all: such a limit, or none readable, means copying.
fn tx_plan(
    setting: GuestUmemTx,
    mode: XskMode,
    zc_max_segs: impl FnOnce() -> Result<u32, String>,
) -> TxPlan {
    let zero_copy = mode == XskMode::ZeroCopy;
    if !setting.in_place(zero_copy) {
        let why = match setting {
            GuestUmemTx::Copy => "guest-umem-tx=copy",
            _ => "copy-mode socket: the kernel copies into an skb anyway",
        };
        return TxPlan::Copied { why: why.into() };
    }
    if !zero_copy {
        return TxPlan::InPlace {
            max_pieces: MAX_PIECES,
        };
    }
    match zc_max_segs() {
        Ok(segs) if segs >= 2 => TxPlan::InPlace {
            max_pieces: (segs as usize).min(MAX_PIECES),
        },
        Ok(segs) => TxPlan::Copied {
            why: format!("the NIC takes {segs} piece per zero-copy frame (xdp-zc-max-segs)"),
        },
        Err(e) => TxPlan::Copied {
            why: format!("the NIC's zero-copy piece limit (xdp-zc-max-segs) cannot be read: {e}"),
        },
    }
}

/// The zero-copy piece limit of interface `ifindex`, from the netdev netlink family.
fn read_zc_max_segs(ifindex: u32) -> Result<u32, String> {
    let info = Netlink::open()
        .and_then(|mut nl| nl.dev_get(ifindex))
        .map_err(|e| e.to_string())?;
    info.xdp_zc_max_segs
        .ok_or_else(|| "the kernel reports none (no zero-copy on the device)".to_string())
}

/// What a dedicated NIC's port needs to make its path once its guest's memory is known.
pub struct DedicatedNic {
    pub nic: Arc<Nic>,
    pub port: u32,
    pub vlan: Option<u16>,
    /// Whether frames go out from the guest's buffers (decided per socket, by its mode).
    pub tx: GuestUmemTx,
    /// The path taken, shown by `ctl list`; shared with the port.
    pub datapath: Arc<Mutex<Datapath>>,
    /// The library's epoll handlers, one per queue pair, where the new sockets are
    /// registered (weak: the handlers hold the backend).
    handlers: OnceLock<Vec<Weak<VringEpollHandler<NetBackend>>>>,
    /// Held while the path is made or taken down: a memory table (request thread) and a
    /// restarted ring (queue pair 0's thread) must not both bind the NIC's queue. Taken
    /// before the steering lock and the workers' mutexes, holding neither.
    deciding: Mutex<()>,
}

impl DedicatedNic {
    pub fn new(
        nic: Arc<Nic>,
        port: u32,
        vlan: Option<u16>,
        tx: GuestUmemTx,
        datapath: Arc<Mutex<Datapath>>,
    ) -> Self {
        DedicatedNic {
            nic,
            port,
            vlan,
            tx,
            datapath,
            handlers: OnceLock::new(),
            deciding: Mutex::new(()),
        }
    }

    /// Hands over the library's epoll handlers once they exist.
    pub fn set_handlers(&self, handlers: &[Arc<VringEpollHandler<NetBackend>>]) {
        let _ = self
            .handlers
            .set(handlers.iter().map(Arc::downgrade).collect());
    }

    /// The largest frame a guest receives: the MTU and the Ethernet header (a tagged port
    /// keeps the copy path, so no tag).
    fn max_frame(&self) -> u32 {
        u32::from(self.nic.mtu) + ETH_HLEN as u32
    }

    /// Why this port's guest memory `mem` cannot be the UMEM, or the single-copy path's
    /// socket on NIC queue 0 and the guest buffers it will hold.
    fn guest_path(&self, mem: &GuestMemory, pairs: usize) -> Result<GuestPath, String> {
        if self.nic.rx_queues != 1 {
            return Err(format!(
                "{} has {} receive queues and the single-copy path serves one (ethtool -L {} combined 1)",
                self.nic.iface, self.nic.rx_queues, self.nic.iface
            ));
        }
        if pairs != 1 {
            return Err(format!(
                "the port has {pairs} queue pairs and the single-copy path serves one"
            ));
        }
        if self.vlan.is_some() {
            return Err(
                "a tagged port's frames would need their tag cut out of the guest's buffer".into(),
            );
        }
        let file = GuestFile::of(mem).map_err(|e| e.to_string())?;
        let layout = GuestUmemLayout::for_max_frame(self.max_frame()).map_err(|e| e.to_string())?;
        let fd = file
            .file()
            .ok_or_else(|| "guest memory has no file to register".to_string())?;
        let spec = GuestRxSpec {
            file: fd.as_fd(),
            len: file.file_len(),
            layout,
            ifname: &self.nic.iface,
            ifindex: self.nic.ifindex,
            queue_id: 0,
            ring_size: (GUEST_RING + SPARE_FRAMES).next_power_of_two(),
            tx_slots: GUEST_TX_SLOTS,
            spare_frames: SPARE_FRAMES,
        };
        let mut socket = GuestRxSocket::open(spec, self.nic.xsk_mode).map_err(|e| e.to_string())?;
        let ifindex = self.nic.ifindex;
        match tx_plan(self.tx, socket.mode(), || read_zc_max_segs(ifindex)) {
            TxPlan::InPlace { max_pieces } => {
                socket.send_from_guest_memory(file.clone(), max_pieces);
                tracing::info!(
                    port = self.port,
                    socket_mode = ?socket.mode(),
                    guest_umem_tx = %self.tx,
                    max_pieces,
                    "single-copy transmit from the guest's buffers"
                );
            }
            TxPlan::Copied { why } => tracing::info!(
                port = self.port,
                socket_mode = ?socket.mode(),
                guest_umem_tx = %self.tx,
                reason = %why,
                "single-copy transmit copied once into the daemon's slots"
            ),
        }
        let fill = FillLayout {
            data_offset: u64::from(layout.data_offset()),
            max_frame: layout.max_frame(),
            dma_page: socket.dma_page(),
        };
        let posted =
            PostedBuffers::new(file, fill, GUEST_RING as usize).with_spares(socket.spare_frames());
        Ok(GuestPath::new(socket, posted))
    }

    /// Decides the path for guest memory `mem` (a new memory table): whatever path the
    /// connection had is taken down first, then the guest's memory is registered as the
    /// UMEM, or the copy path's queues are bound, and the workers get the sockets.
    pub fn choose(&self, workers: &[Mutex<QueuePairWorker>], ids: EventIds, mem: &GuestMemory) {
        let _deciding = crate::sync::lock(&self.deciding);
        self.decide(workers, ids, mem);
    }

    /// [`DedicatedNic::choose`], with `deciding` held.
    fn decide(&self, workers: &[Mutex<QueuePairWorker>], ids: EventIds, mem: &GuestMemory) {
        self.take_down(workers, mem);
        let chosen = match self.guest_path(mem, workers.len()) {
            Ok(path) => {
                let mode = path.socket_mode();
                crate::sync::lock(&workers[0]).attach_guest_path(path);
                tracing::info!(port = self.port, iface = %self.nic.iface, ?mode, "guest memory is the NIC queue's UMEM: single-copy path");
                Datapath::GuestMemory
            }
            Err(why) => {
                let again = *crate::sync::lock(&self.datapath) == Datapath::Refused(why.clone());
                if again {
                    tracing::debug!(port = self.port, reason = %why, "guest memory cannot be the NIC queue's UMEM; copy path");
                } else {
                    tracing::warn!(port = self.port, reason = %why, "guest memory cannot be the NIC queue's UMEM; the port takes the copy path");
                }
                if let Err(e) = self.attach_copy_path(workers) {
                    tracing::error!(port = self.port, error = %e, "cannot bind the NIC's queues for the copy path either; the port moves no frames until the next memory table");
                }
                Datapath::Refused(why)
            }
        };
        *crate::sync::lock(&self.datapath) = chosen;
        self.publish(workers, ids);
    }

    /// The copy path on queues bound for this connection.
    fn attach_copy_path(&self, workers: &[Mutex<QueuePairWorker>]) -> Result<(), XskError> {
        let queues = self.nic.copy_path_queues()?;
        for (pair, worker) in workers.iter().enumerate() {
            let (sockets, tx) =
                copy_path_sockets(&queues, workers.len(), pair, self.vlan.is_some())?;
            crate::sync::lock(worker)
                .attach_copy_path(sockets, tx)
                .map_err(|source| XskError::Setup {
                    what: "busy polling",
                    ifname: self.nic.iface.clone(),
                    queue: pair as u32,
                    source,
                })?;
        }
        Ok(())
    }

    /// Puts the workers' receiving sockets into the steering map and their epoll sets.
    fn publish(&self, workers: &[Mutex<QueuePairWorker>], ids: EventIds) {
        let handlers = self.handlers.get();
        for (pair, worker) in workers.iter().enumerate() {
            let (sockets, events) = {
                let w = crate::sync::lock(worker);
                (w.receiving_sockets(), w.nic_event_sources(ids))
            };
            {
                let mut steering = crate::sync::lock(&self.nic.steering);
                for (queue, fd) in sockets {
                    if let Err(e) = steering.bind_socket(self.port, queue, fd) {
                        tracing::error!(port = self.port, queue, error = %e, "cannot put the socket into the steering map");
                    }
                }
            }
            let handler = handlers.and_then(|h| h.get(pair)).and_then(Weak::upgrade);
            for (fd, set, id) in events {
                let registered = handler
                    .as_ref()
                    .map(|h| h.register_listener(fd, set, u64::from(id)));
                if let Some(Err(e)) = registered {
                    tracing::error!(port = self.port, pair, error = %e, "cannot watch the NIC socket");
                }
            }
        }
    }

    /// Takes every pair's path down: sockets out of the steering map, then closed (the
    /// single-copy path's buffers given back to the guest).
    pub fn take_down(&self, workers: &[Mutex<QueuePairWorker>], mem: &GuestMemory) {
        for worker in workers {
            let sockets = crate::sync::lock(worker).receiving_sockets();
            self.unbind(&sockets);
            crate::sync::lock(worker).detach_nic_path(mem);
        }
    }

    /// Makes the single-copy path again if it stopped with the ring and nothing made a path
    /// since (the frontend restarted the ring without a new memory table).
    pub fn restore(&self, workers: &[Mutex<QueuePairWorker>], ids: EventIds, mem: &GuestMemory) {
        let stopped = || {
            *crate::sync::lock(&self.datapath) == Datapath::GuestMemory
                && !crate::sync::lock(&workers[0]).has_nic_path()
        };
        if !stopped() {
            return;
        }
        let _deciding = crate::sync::lock(&self.deciding);
        // Another thread may have made it meanwhile.
        if stopped() {
            self.decide(workers, ids, mem);
        }
    }

    /// Stops the single-copy path of queue pair 0 (one of its rings stopped: the frontend
    /// reads the ring's base next), giving the receive buffers and transmit chains the kernel
    /// held back to the guest once the socket is closed.
    pub fn stop_guest_path(&self, worker: &Mutex<QueuePairWorker>, mem: &GuestMemory) {
        let _deciding = crate::sync::lock(&self.deciding);
        let Some(socket) = crate::sync::lock(worker).guest_socket() else {
            return;
        };
        self.unbind(&[socket]);
        if let Some(n) = crate::sync::lock(worker).stop_guest_path(mem) {
            tracing::debug!(
                port = self.port,
                buffers = n,
                "single-copy path stopped; receive buffers given back unused"
            );
        }
    }

    /// Closes the single-copy path of queue pair 0 without writing into the guest's ring
    /// (a device reset: the driver forgot its buffers).
    pub fn forget_guest_path(&self, worker: &Mutex<QueuePairWorker>) {
        let _deciding = crate::sync::lock(&self.deciding);
        let Some(socket) = crate::sync::lock(worker).guest_socket() else {
            return;
        };
        self.unbind(&[socket]);
        crate::sync::lock(worker).forget_guest_path();
    }

    fn unbind(&self, sockets: &[(u32, std::os::fd::RawFd)]) {
        let mut steering = crate::sync::lock(&self.nic.steering);
        for &(queue, _) in sockets {
            if let Err(e) = steering.unbind_socket(self.port, queue) {
                tracing::warn!(port = self.port, queue, error = %e, "cannot remove socket from the steering map");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreadable() -> Result<u32, String> {
        Err("no netdev family".into())
    }

    #[test]
    fn a_zero_copy_socket_sends_in_place_only_within_its_drivers_piece_limit() {
        let zc = XskMode::ZeroCopy;
        for setting in [GuestUmemTx::Auto, GuestUmemTx::InPlace] {
            assert_eq!(
                tx_plan(setting, zc, || Ok(5)),
                TxPlan::InPlace { max_pieces: 5 }
            );
            // One piece is no multi-buffer; an unknown limit could be one.
            assert!(matches!(
                tx_plan(setting, zc, || Ok(1)),
                TxPlan::Copied { .. }
            ));
            assert!(matches!(
                tx_plan(setting, zc, unreadable),
                TxPlan::Copied { .. }
            ));
            // Never more than copy mode's limit.
            assert_eq!(
                tx_plan(setting, zc, || Ok(64)),
                TxPlan::InPlace {
                    max_pieces: MAX_PIECES
                }
            );
        }
        assert!(matches!(
            tx_plan(GuestUmemTx::Copy, zc, || Ok(5)),
            TxPlan::Copied { .. }
        ));
    }

    #[test]
    fn a_copy_mode_socket_keeps_copy_modes_limit_and_never_asks_the_nic() {
        let copy = XskMode::Copy;
        let asked = || -> Result<u32, String> { panic!("copy mode asked for the zero-copy limit") };
        assert_eq!(
            tx_plan(GuestUmemTx::InPlace, copy, asked),
            TxPlan::InPlace {
                max_pieces: MAX_PIECES
            }
        );
        assert!(matches!(
            tx_plan(GuestUmemTx::Auto, copy, asked),
            TxPlan::Copied { .. }
        ));
    }
}
