//! The vhost-user-net backend: one value per frontend connection, implementing
//! `VhostUserBackend` over the queue-pair workers.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::datapath::GuestMemory;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::datapath::device::{device_features, NegotiatedFeatures, NetConfig, VHOST_F_LOG_ALL};
use crate::datapath::dirty_log::{attach_log, set_log_all, FrontendLogSlot};
use crate::memory_guard::{self, MemoryWatch};
use crate::stats::QueueStats;
use crate::switch::{rarp_frame, AnnounceRequests, SwitchPort};
use crate::vhost::exit_events::ExitEvents;
use crate::vhost::single_copy::DedicatedNic;
use crate::vring::{RxQueue, RxQueueShared, Vring};
use crate::worker::{EventIds, QueuePairWorker};

/// Descriptors per virtqueue the device accepts at most (QEMU's default is 256).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The vhost-user protocol features xvdpa speaks.
///
/// Not CONFIGURE_MEM_SLOTS: with it, QEMU 7.2 sends ADD_MEM_REG from the vhost device of
/// every queue pair, so a multiqueue guest adds each region twice and the backend refuses the
/// overlap; SET_MEM_TABLE is sent once per connection.
///
/// LOG_SHMFD: the frontend shares its dirty log as a file (`SET_LOG_BASE`), which the library
/// maps into every region's `DirtyLog`; with `VHOST_F_LOG_ALL` it lets QEMU migrate the guest.
///
/// RARP: after a migration QEMU asks the backend to announce a guest that cannot announce
/// itself (`SEND_RARP`, handled in `protocol_shim`, which the library does not know).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

/// How a port's frames reach its guest, as `ctl list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Datapath {
    /// Through the NIC queue's own UMEM: the kernel copies in, the worker copies on.
    #[default]
    Copy,
    /// The guest's RAM file is the NIC queue's UMEM (`guest-umem=on`).
    GuestMemory,
    /// The port asked for guest memory and runs on the copy path instead, for this reason.
    Refused(String),
}

impl std::fmt::Display for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Datapath::Copy => f.write_str("copy"),
            Datapath::GuestMemory => f.write_str("guest-memory"),
            Datapath::Refused(why) => write!(f, "copy (guest memory refused: {why})"),
        }
    }
}

struct Inner {
    config: NetConfig,
    acked: Arc<AtomicU64>,
    /// The guest memory the workers write into: the library's memory table, handed on in
    /// `update_memory` only once every region has its dirty log (the library makes the
    /// regions of a new table without one).
    mem: GuestMemoryAtomic<GuestMemory>,
    /// The dirty log the frontend shared last (`SET_LOG_BASE`, mapped by the protocol shim),
    /// for the regions of the memory tables that come after it.
    frontend_log: Arc<FrontendLogSlot>,
    workers: Vec<Mutex<QueuePairWorker>>,
    ids: EventIds,
    /// The port in the daemon's switch; its receive queue is published there on the first
    /// event, which is when the library hands the backend its vrings.
    switch_port: Arc<SwitchPort>,
    published: AtomicBool,
    /// The guest memory's regions in the process-wide SIGBUS guard.
    watch: Mutex<MemoryWatch>,
    /// A region of the current guest memory shrank under the daemon: the queues are stopped
    /// until the frontend sends new memory or reconnects.
    memory_lost: AtomicBool,
    /// The guard's poison count when this backend last looked at its regions.
    poison_seen: AtomicU64,
    /// Where the lost memory is counted (`queue_errors`), once for the port.
    first_pair_stats: Arc<QueueStats>,
    /// Every pair's receive queue flags, which other ports' workers check before switching
    /// frames in.
    rx_shared: Vec<Arc<RxQueueShared>>,
    /// Closes the exit events' fds the library leaves open, once the connection is over.
    exit_events: ExitEvents,
    /// Announcements the frontend asked for (`SEND_RARP`), sent by queue pair 0.
    announce: Arc<AnnounceRequests>,
    /// This connection announced (or failed to) before: later ones are logged at debug level,
    /// so a frontend repeating the request cannot fill the log.
    announced: AtomicBool,
    /// A port with the NIC to itself: its path to the NIC is made when its guest's memory
    /// arrives.
    dedicated: Option<DedicatedNic>,
}

/// The backend of one VM port for one frontend connection.
#[derive(Clone)]
pub struct NetBackend(Arc<Inner>);

impl NetBackend {
    /// The backend keeps its own view of the guest memory; the library keeps another (given
    /// to `VhostUserDaemon::new`) and hands each new table over in `update_memory`.
    pub fn new(
        config: NetConfig,
        workers: Vec<QueuePairWorker>,
        switch_port: Arc<SwitchPort>,
        exit_events: ExitEvents,
        announce: Arc<AnnounceRequests>,
        frontend_log: Arc<FrontendLogSlot>,
        dedicated: Option<DedicatedNic>,
    ) -> Self {
        let num_queues = 2 * workers.len();
        let first_pair_stats = workers.first().map(|w| w.stats()).unwrap_or_default();
        let rx_shared = workers.iter().map(|w| w.rx_shared()).collect();
        NetBackend(Arc::new(Inner {
            config,
            acked: Arc::new(AtomicU64::new(0)),
            mem: GuestMemoryAtomic::new(GuestMemory::new()),
            frontend_log,
            workers: workers.into_iter().map(Mutex::new).collect(),
            ids: EventIds::new(num_queues),
            switch_port,
            published: AtomicBool::new(false),
            watch: Mutex::new(MemoryWatch::default()),
            memory_lost: AtomicBool::new(false),
            poison_seen: AtomicU64::new(memory_guard::poison_events()),
            first_pair_stats,
            rx_shared,
            exit_events,
            announce,
            announced: AtomicBool::new(false),
            dedicated,
        }))
    }

    /// The dedicated NIC's part, to hand it the library's epoll handlers.
    pub fn dedicated(&self) -> Option<&DedicatedNic> {
        self.0.dedicated.as_ref()
    }

    /// Makes a dedicated NIC's path again when the guest's receive ring runs without one
    /// (the single-copy path stopped with the ring, and the frontend restarted the ring
    /// without sending its memory table again).
    fn restore_nic_path(&self, vrings: &[Vring]) {
        let Some(dedicated) = &self.0.dedicated else {
            return;
        };
        let running = {
            let state = vrings[0].get_ref();
            state.get_queue().ready() && state.is_enabled()
        };
        // Only after a stopped single-copy path (`restore` checks): a copy path that could
        // not be bound is not retried on every event.
        let mem = self.0.mem.memory();
        if running && mem.num_regions() > 0 {
            dedicated.restore(&self.0.workers, self.0.ids, &mem);
        }
    }

    /// Sends the announcement the frontend asked for, if it did since the last event. A
    /// migration target's frontend announcing the port's MAC says the migrated guest runs
    /// here now: the MAC's frames move first, then the RARP tells the network.
    fn announce(&self) {
        let Some(mac) = self.0.announce.take() else {
            return;
        };
        let port = &self.0.switch_port;
        if mac == port.mac {
            port.take_over();
        }
        let sent = self.worker(0).send_broadcast(&rarp_frame(mac));
        let first = !self.0.announced.swap(true, Ordering::AcqRel);
        match sent {
            Ok(()) if first => tracing::info!(
                port = port.index,
                %mac,
                "announced the guest (RARP) to the wire and the other ports, as the frontend asked"
            ),
            Ok(()) => tracing::debug!(port = port.index, %mac, "announced the guest (RARP)"),
            Err(e) if first => tracing::warn!(
                port = port.index,
                %mac,
                error = %e,
                "cannot send the announcement (RARP) the frontend asked for"
            ),
            Err(e) => tracing::debug!(port = port.index, %mac, error = %e, "announcement not sent"),
        }
    }

    /// Whether the current guest memory lost a region. One atomic load unless the guard
    /// poisoned a region somewhere since the last look; the first time this port's memory
    /// is found poisoned, its queues are stopped, and that is logged and counted once.
    fn memory_lost(&self) -> bool {
        let events = memory_guard::poison_events();
        if self.0.poison_seen.load(Ordering::Acquire) != events
            && self.0.poison_seen.swap(events, Ordering::AcqRel) != events
            && crate::sync::lock(&self.0.watch).poisoned()
            && !self.0.memory_lost.swap(true, Ordering::AcqRel)
        {
            // Other ports' workers stop switching frames in at once, rather than find the
            // zeroed ring on their own and call it the guest's fault.
            for shared in &self.0.rx_shared {
                shared.stop();
            }
            let stats = &self.0.first_pair_stats;
            stats.add(&stats.queue_errors, 1);
            let port = &self.0.switch_port;
            tracing::error!(
                port = port.index,
                mac = %port.mac,
                "guest memory region shrank under the daemon; the port's queues are stopped until the frontend sends new memory or reconnects"
            );
        }
        self.0.memory_lost.load(Ordering::Acquire)
    }

    /// Makes queue pair 0's receive queue reachable by the other ports' workers.
    fn publish(&self, vrings: &[Vring]) {
        if self.0.published.swap(true, Ordering::AcqRel) {
            return;
        }
        let worker = self.worker(0);
        self.0.switch_port.publish(RxQueue {
            vring: vrings[0].clone(),
            mem: self.0.mem.clone(),
            acked: self.0.acked.clone(),
            stats: worker.stats(),
            shared: worker.rx_shared(),
        });
    }

    pub fn event_ids(&self) -> EventIds {
        self.0.ids
    }

    /// The worker of queue pair `i`. A worker that panicked is still handed out: its state
    /// is plain data and the next reset puts it right.
    pub fn worker(&self, i: usize) -> MutexGuard<'_, QueuePairWorker> {
        crate::sync::lock(&self.0.workers[i])
    }

    pub fn queue_pairs(&self) -> usize {
        self.0.workers.len()
    }

    pub fn negotiated(&self) -> NegotiatedFeatures {
        NegotiatedFeatures::new(self.0.acked.load(Ordering::Acquire))
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = crate::datapath::DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.0.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features(self.0.config.max_virtqueue_pairs)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.0.acked.store(features, Ordering::Release);
        set_log_all(&self.0.mem.memory(), features & (1 << VHOST_F_LOG_ALL) != 0);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn reset_device(&self) {
        self.0.acked.store(0, Ordering::Release);
        set_log_all(&self.0.mem.memory(), false);
        if let Some(dedicated) = &self.0.dedicated {
            // The driver forgot its buffers with the reset: the kernel must stop writing
            // them, and nothing is written into the ring it reset.
            dedicated.forget_guest_path(&self.0.workers[0]);
        }
        for i in 0..self.queue_pairs() {
            self.worker(i).reset();
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The library sets it on each vring's queue; the workers read it from there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.config.read(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        // The library swapped the regions inside its GuestMemoryAtomic; the guard watches
        // the new ones from here on.
        crate::sync::lock(&self.0.watch)
            .watch(&mem)
            .map_err(io::Error::other)?;
        self.0.memory_lost.store(false, Ordering::Release);
        // The same regions as the library's (its later SET_LOG_BASE reaches them), each with
        // the frontend's log attached before any worker can write into it.
        let table = GuestMemory::clone(&mem.memory());
        let log_all = self.0.acked.load(Ordering::Acquire) & (1 << VHOST_F_LOG_ALL) != 0;
        let uncovered = match self.0.frontend_log.current() {
            Some(log) => attach_log(&table, &log),
            None => table.iter().map(|r| (r.start_addr().0, r.len())).collect(),
        };
        if log_all {
            // QEMU grows its log before it sends a table that needs more of it: this is a
            // frontend that does it the other way round, or not at all.
            for (start, len) in uncovered {
                tracing::error!(
                    port = self.0.switch_port.index,
                    start = format_args!("{start:#x}"),
                    len,
                    "guest memory region beyond the dirty log during a migration; the daemon's writes into it are not logged until the frontend shares a log that covers it"
                );
            }
        }
        set_log_all(&table, log_all);
        match self.0.mem.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
        .replace(table);
        // A dedicated NIC's path is chosen for the table the workers now see, logs attached.
        if let Some(dedicated) = &self.0.dedicated {
            dedicated.choose(&self.0.workers, self.0.ids, &self.0.mem.memory());
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queue_pairs())
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.0.exit_events.take(thread_index)
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // A stopped queue restarts from a fresh ring: a queue marked broken gets another go.
        let pair = queue_index as usize / 2;
        if pair < self.queue_pairs() {
            if let Some(dedicated) = &self.0.dedicated {
                // Before the reply: the frontend takes the ring's base as where the guest's
                // buffers end, so the ones the kernel holds go back now: receive buffers it
                // may write, and transmit chains whose frames it may still read (the one
                // socket serves both, so either ring stops the path).
                dedicated.stop_guest_path(&self.0.workers[pair], &self.0.mem.memory());
            }
            self.worker(pair).reset();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if thread_id >= self.queue_pairs() || vrings.len() < 2 {
            return Ok(());
        }
        if thread_id == 0 {
            self.publish(vrings);
            self.announce();
            // A migrated guest runs once QEMU starts its rings at the end of the migration.
            self.0.switch_port.take_over_when(|| {
                let state = vrings[0].get_ref();
                state.get_queue().ready() && state.is_enabled()
            });
            self.restore_nic_path(vrings);
        }
        if self.memory_lost() {
            self.worker(thread_id)
                .handle_without_memory(device_event, self.0.ids);
            return Ok(());
        }
        let mem = self.0.mem.memory();
        let features = self.negotiated();
        self.worker(thread_id)
            .handle(device_event, self.0.ids, vrings, &mem, features);
        // A region that shrank during this event is logged now, not on the next one.
        self.memory_lost();
        Ok(())
    }
}
