//! One queue pair's worker: moves frames between its AF_XDP sockets (one per NIC queue), the
//! multicast tap and the guest's rx/tx virtqueues.
//!
//! It runs on the vhost-user library's epoll thread for that queue pair and is woken by guest
//! kicks, socket readiness, its own re-arm eventfd (more work than one batch) and a slow
//! housekeeping timer. Nothing a guest does can make it return an error to the library, which
//! would end the thread: a guest that breaks the ring's rules gets its queue stopped and
//! counted until the device is reset.
//!
//! `mod.rs` dispatches events; `rx` and `tx` hold the two directions, `sys`
//! the timer and CPU pinning.

mod rx;
mod single_copy;
mod sys;
mod tx;

pub use single_copy::{GuestPath, HELD_BACK_CHAINS};

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::datapath::GuestMemory;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::datapath::device::NegotiatedFeatures;
use crate::datapath::offload::Coalescer;
use crate::datapath::rx::RxScratch;
use crate::datapath::tx::TxScratch;
use crate::datapath::QueueError;
use crate::nic::kernel_gso::KernelGsoSocket;
use crate::nic::napi::NapiTakeover;
use crate::nic::packet_tap::PacketTap;
use crate::nic::xsk::XskSocket;
use crate::stats::QueueStats;
use crate::switch::{LocalFrame, SwitchPort, SwitchScratch, SwitchTable, TxPolicy};
use crate::vring::{RingError, RingErrorFds, RxQueueShared, Vring};
use sys::{pin_current_thread, Timer};

/// Frames moved per batch: one notification and one ring update per batch.
pub const BATCH: usize = 64;
/// Batches per event before yielding to the other direction and the library's events.
pub(crate) const BUDGET_BATCHES: usize = 8;
/// SO_BUSY_POLL for busy-polling sockets. The worker's polls are non-blocking, which run one
/// NAPI poll whatever the value; it only has to be non-zero.
const BUSY_POLL_USECS: u32 = 50;
/// How long an adaptive worker keeps polling after the last frame from the NIC before it
/// sleeps. Measured with `cargo xtask bench --scenarios rx --sizes 64 --runs 2` on a shared,
/// noisy machine (xvdpa/DPDK, min-max over runs; CPU s/Mpkt): 50 µs 0.88x (0.68-1.09) at 0.37,
/// 200 µs 1.32x (1.16-1.48) at 0.30, 1000 µs 1.41x (1.40-1.43) at 0.30. 50 µs lets the worker
/// fall asleep between the generator's bursts (more CPU per packet); past 200 µs nothing
/// measurable is gained while a worker on bursty traffic spins longer after each burst. The
/// same series without adaptive polling gave 2.60x (1.78-3.41) at 0.31, which says how
/// noisy the machine was: the final figures come from a quiet window.
const ADAPTIVE_IDLE: Duration = Duration::from_micros(200);
/// Frames from the NIC per [`ADAPTIVE_IDLE`] (320,000 a second) below which an adaptive
/// worker does not poll at all but sleeps between them. Polling saves a wake-up per batch,
/// which pays at packet rates (the rx benchmark's are millions a second) but not for the
/// ACKs of a guest's TCP upload (about 12,000 a second in the guest-tcp benchmark) or the
/// MSS-sized frames of a download through this lab's veth (about 170,000): there each frame
/// kept the worker spinning for another 200 µs, at twice the daemon's CPU per GB and no
/// measurable gain in throughput (`cargo xtask bench --scenarios guest-tcp --tcp-peers xvdpa`
/// against the same with `--no-adaptive-poll`: up 2.5 against 1.0 CPU s/GB, down 2.3
/// against 1.2, at rates within the runs' spread).
const POLL_MIN_FRAMES: u64 = 64;

/// How fast frames come from the NIC, counted over periods of [`ADAPTIVE_IDLE`]: an
/// adaptive worker polls only while they come at [`POLL_MIN_FRAMES`] per period or faster.
#[derive(Debug, Default, Clone, Copy)]
struct FrameRate {
    period_start: Option<Instant>,
    in_period: u64,
    /// The last whole period had [`POLL_MIN_FRAMES`] or more.
    fast: bool,
}

impl FrameRate {
    /// Adds a round's `frames` at `now`; true while frames come fast enough: the current
    /// period reached [`POLL_MIN_FRAMES`] already, or the one just before it did.
    fn fast_enough(&mut self, frames: u64, now: Instant) -> bool {
        match self.period_start {
            Some(start) if now.saturating_duration_since(start) < ADAPTIVE_IDLE => {}
            Some(start) => {
                // A period ended. One that ended long ago (the worker slept) says nothing
                // about the pace now.
                let recent = now.saturating_duration_since(start) < ADAPTIVE_IDLE * 2;
                self.fast = recent && self.in_period >= POLL_MIN_FRAMES;
                self.period_start = Some(now);
                self.in_period = 0;
            }
            None => self.period_start = Some(now),
        }
        self.in_period += frames;
        self.fast || self.in_period >= POLL_MIN_FRAMES
    }
}

/// Local vring indices inside a queue pair's worker.
const RX: usize = 0;
const TX: usize = 1;

/// Event ids of the worker's own fds, above the library's (queues and exit event).
#[derive(Debug, Clone, Copy)]
pub struct EventIds {
    pub rearm: u16,
    pub timer: u16,
    pub tap: u16,
    pub first_xsk: u16,
}

impl EventIds {
    pub fn new(num_queues: usize) -> Self {
        let base = num_queues as u16 + 1;
        EventIds {
            rearm: base,
            timer: base + 1,
            tap: base + 2,
            first_xsk: base + 3,
        }
    }
}

/// How long a worker on the single-copy path polls for the completions of frames it sent
/// from guest memory after the last one came: the kernel completes a frame when it frees
/// its skb, which in copy mode on veth is usually inside the send call but may wait for the
/// receiving side's softirq (ksoftirqd on a busy host). Past this the housekeeping timer
/// reaps them, so a frame the kernel holds for long does not keep a CPU spinning.
const TX_COMPLETION_WAIT: Duration = Duration::from_millis(20);

/// An adaptive worker's polling window: open while frames came within [`ADAPTIVE_IDLE`].
#[derive(Debug, Default, Clone, Copy)]
struct IdleWindow {
    last_frames: Option<Instant>,
}

impl IdleWindow {
    /// Records a round at `now` that found frames (or not); true while the window is open.
    fn still_polling(&mut self, got_frames: bool, now: Instant) -> bool {
        self.still_polling_within(got_frames, now, ADAPTIVE_IDLE)
    }

    /// [`IdleWindow::still_polling`], closing after `idle` without frames.
    fn still_polling_within(&mut self, got_frames: bool, now: Instant, idle: Duration) -> bool {
        if got_frames {
            self.last_frames = Some(now);
        }
        match self.last_frames {
            Some(at) if now.saturating_duration_since(at) < idle => true,
            _ => {
                self.last_frames = None;
                false
            }
        }
    }

    fn is_open(&self) -> bool {
        self.last_frames.is_some()
    }
}

/// Per-queue-pair datapath state.
pub struct QueuePairWorker {
    pair: usize,
    /// One socket per NIC queue this pair serves, in the steering map while connected.
    /// Empty on a dedicated NIC until the guest's memory decided the path (then empty too
    /// on the single-copy path, which has `guest` instead).
    sockets: Vec<XskSocket>,
    /// The single-copy path: the guest's memory is the NIC queue's UMEM.
    guest: Option<GuestPath>,
    /// The guest's receive ring, kept from the first event: where the single-copy path
    /// gives back the buffers the kernel held when it stops (the library hands the ring to
    /// events only).
    rx_vring: Option<Vring>,
    /// The guest's transmit ring, kept likewise: where the chains of frames the single-copy
    /// path sent from guest memory go back when the path stops before the kernel completed
    /// them.
    tx_vring: Option<Vring>,
    /// Chains of frames sent from guest memory that the kernel completed (scratch).
    sent_chains: Vec<u16>,
    /// Frames sent from guest memory and chains returned so far: while it moves, completions
    /// are coming.
    tx_in_place_progress: u64,
    /// Polling for transmit completions: open while they came within [`TX_COMPLETION_WAIT`].
    tx_completion_window: IdleWindow,
    /// The socket the pair transmits through. It is never in the epoll set: freeing each
    /// sent frame wakes the socket's waiters, and with the socket registered that was an
    /// epoll callback per frame (8-13 % of tx throughput at 64 B). Completions are reaped on
    /// every tx round, and a round short of buffers comes back by itself, so no readiness
    /// event is needed. None on a dedicated NIC: on the single-copy path the pair transmits
    /// through `guest`, and before the path is decided it has nothing to send with.
    tx: Option<XskSocket>,
    /// Where TSO frames for the wire go whole (`tx-gso=kernel`), after `tx`'s frames of the
    /// same batch. Send-only, so in no epoll set either. None: the daemon segments them.
    kernel_gso: Option<KernelGsoSocket>,
    tap: Option<PacketTap>,
    rearm: EventFd,
    timer: Timer,
    busy_poll: bool,
    /// Keep polling while frames come from the NIC (see [`ADAPTIVE_IDLE`]).
    adaptive: bool,
    /// When the last frames from the NIC came, while polling adaptively.
    rx_window: IdleWindow,
    /// How fast they come: below [`POLL_MIN_FRAMES`] the worker does not poll.
    rx_rate: FrameRate,
    /// The NIC queues' NAPI knobs, set once a socket's NAPI id is known.
    napi: Option<Arc<NapiTakeover>>,
    /// Per socket: its NAPI id was looked at and handed to `napi` (or found missing).
    napi_done: Vec<bool>,
    /// Per socket: it carries a NAPI id, so a busy poll on it runs the queue's NAPI.
    busy_pollable: Vec<bool>,
    max_frame: usize,
    stats: Arc<QueueStats>,
    rx_scratch: RxScratch,
    /// Frames from the NIC, merged and marked for a guest that takes offloads.
    coalescer: Coalescer,
    tx_scratch: TxScratch,
    /// Next socket to read first, so one busy NIC queue cannot starve the others.
    next_rx_socket: usize,
    /// Shared with other ports' workers, which deliver switched frames into this rx queue.
    rx_shared: Arc<RxQueueShared>,
    tx_broken: bool,
    /// Tells the frontend the transmit queue stopped.
    tx_error: RingError,
    /// Kernel drop counters already added to the stats: (ring full, fill ring empty).
    xsk_drops_seen: (u64, u64),
    policy: TxPolicy,
    switch: Arc<SwitchTable>,
    /// This port in the switch: where a disabled pair hands its NIC frames.
    own: Arc<SwitchPort>,
    /// Flooded frames of the current tx batch, bound for other ports.
    local: Vec<LocalFrame>,
    switch_scratch: SwitchScratch,
    /// Ports that got switched frames and whose guests are notified after this round.
    to_notify: Vec<Arc<SwitchPort>>,
    /// CPU to move the library's thread for this pair to, on the first event.
    cpu: Option<usize>,
    /// Frames moved (or dropped) so far; a busy-polling round that moved none yields the CPU.
    progress: u64,
    /// Frames read from the NIC's sockets so far.
    nic_frames: u64,
}

/// What a worker needs beyond its sockets: the port's identity and policy.
pub struct WorkerConfig {
    pub max_frame: usize,
    pub busy_poll: bool,
    /// Poll while frames come at packet rates ([`POLL_MIN_FRAMES`]), sleep after
    /// [`ADAPTIVE_IDLE`] without any.
    pub adaptive_poll: bool,
    /// Where to set the NIC queues' NAPI knobs, if anywhere.
    pub napi: Option<Arc<NapiTakeover>>,
    pub policy: TxPolicy,
    pub switch: Arc<SwitchTable>,
    pub own: Arc<SwitchPort>,
    pub cpu: Option<usize>,
    /// The connection's error eventfds: a queue this worker stops signals its ring's.
    pub ring_errors: Arc<RingErrorFds>,
    /// The socket TSO frames go to the kernel whole through, if the port's `tx-gso` says so
    /// and it could be made.
    pub kernel_gso: Option<KernelGsoSocket>,
}

impl QueuePairWorker {
    pub fn new(
        pair: usize,
        sockets: Vec<XskSocket>,
        tx: Option<XskSocket>,
        tap: Option<PacketTap>,
        config: WorkerConfig,
        stats: Arc<QueueStats>,
    ) -> io::Result<Self> {
        let WorkerConfig {
            max_frame,
            busy_poll,
            adaptive_poll,
            napi,
            policy,
            switch,
            own,
            cpu,
            ring_errors,
            kernel_gso,
        } = config;
        let rearm = EventFd::new(EFD_NONBLOCK)?;
        if busy_poll {
            // Left readable for good: the level-triggered epoll returns at once, every time.
            rearm.write(1)?;
        }
        let adaptive = adaptive_poll && !busy_poll;
        let mut worker = QueuePairWorker {
            pair,
            sockets: Vec::new(),
            guest: None,
            rx_vring: None,
            tx_vring: None,
            sent_chains: Vec::new(),
            tx_in_place_progress: 0,
            tx_completion_window: IdleWindow::default(),
            tx: None,
            kernel_gso,
            tap,
            rearm,
            timer: Timer::periodic(200)?,
            busy_poll,
            adaptive,
            rx_window: IdleWindow::default(),
            rx_rate: FrameRate::default(),
            busy_pollable: Vec::new(),
            napi_done: Vec::new(),
            napi,
            max_frame,
            stats,
            rx_scratch: RxScratch::default(),
            coalescer: Coalescer::default(),
            tx_scratch: TxScratch::default(),
            next_rx_socket: 0,
            rx_shared: Arc::new(RxQueueShared::new(ring_errors.ring(2 * pair))),
            tx_broken: false,
            tx_error: ring_errors.ring(2 * pair + 1),
            xsk_drops_seen: (0, 0),
            policy,
            switch,
            own,
            local: Vec::with_capacity(BATCH),
            switch_scratch: SwitchScratch::default(),
            to_notify: Vec::new(),
            cpu,
            progress: 0,
            nic_frames: 0,
        };
        if let Some(tx) = tx {
            worker.attach_copy_path(sockets, tx)?;
        }
        Ok(worker)
    }

    /// Gives the pair its copy-path sockets: `sockets` to receive on, `tx` to send with.
    pub fn attach_copy_path(&mut self, sockets: Vec<XskSocket>, tx: XskSocket) -> io::Result<()> {
        let pair = self.pair;
        if self.busy_poll {
            for s in sockets.iter().chain([&tx]) {
                s.enable_busy_poll(BUSY_POLL_USECS, BATCH as u16)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("busy polling on NIC queue {}: {e}", s.queue_id()),
                        )
                    })?;
            }
        }
        if self.adaptive {
            // Receive sockets only: the transmit socket never receives, so it has no NAPI.
            // Without CAP_NET_ADMIN the kernel refuses; the worker still spins while frames
            // come, and the receive work stays where the kernel runs it.
            // Copy-mode sockets have no NAPI id, so there is nothing to prefer; the daemon
            // does not keep CAP_NET_ADMIN for them either.
            for s in sockets.iter().filter(|s| s.napi_reachable()) {
                if let Err(e) = s.enable_busy_poll(BUSY_POLL_USECS, BATCH as u16) {
                    tracing::warn!(pair, queue = s.queue_id(), error = %e, "no preferred busy polling on this NIC queue's socket; polling it without taking its receive work over");
                    break;
                }
            }
        }
        self.napi_done = vec![false; sockets.len()];
        self.busy_pollable = vec![true; sockets.len()];
        self.sockets = sockets;
        self.tx = Some(tx);
        self.next_rx_socket = 0;
        Ok(())
    }

    /// Puts the pair on the single-copy path.
    pub fn attach_guest_path(&mut self, path: GuestPath) {
        self.guest = Some(path);
    }

    /// Whether the pair has a way to the NIC (a dedicated NIC's pair has none until the
    /// guest's memory decided the path, nor after the single-copy path stopped).
    pub fn has_nic_path(&self) -> bool {
        self.tx.is_some() || self.guest.is_some()
    }

    /// The sockets of the pair's NIC path that receive, as (NIC queue, fd): what goes in the
    /// steering map and the epoll set.
    pub fn receiving_sockets(&self) -> Vec<(u32, RawFd)> {
        let guest = self.guest.iter().map(|g| (g.queue_id(), g.fd()));
        self.sockets
            .iter()
            .map(|s| (s.queue_id(), s.fd()))
            .chain(guest)
            .collect()
    }

    /// The single-copy path's socket, as (NIC queue, fd), if the pair is on that path.
    pub fn guest_socket(&self) -> Option<(u32, RawFd)> {
        self.guest.as_ref().map(|g| (g.queue_id(), g.fd()))
    }

    /// Ends the single-copy path, if the pair is on it: the socket and its registration go
    /// first, then the buffers the kernel held go back to the guest unused (`mem` is the
    /// guest memory they lie in), and so do the transmit chains whose frames it had not
    /// completed. Returns how many receive buffers went back.
    pub fn stop_guest_path(&mut self, mem: &GuestMemory) -> Option<usize> {
        let mut path = self.guest.take()?;
        let tx_chains = path.socket_mut().take_tx_chains();
        // Closes the socket: from here on the kernel reads none of those chains' buffers.
        let given = path.stop(mem, self.rx_vring.as_ref());
        self.give_back_tx_chains(mem, &tx_chains);
        Some(given)
    }

    /// Ends the single-copy path without touching the guest's ring: the socket closes, so
    /// the kernel writes none of the buffers it held, and they are forgotten.
    pub fn forget_guest_path(&mut self) {
        if let Some(path) = self.guest.take() {
            path.stop(&GuestMemory::new(), None);
        }
    }

    /// Drops the pair's way to the NIC (a dedicated NIC's port deciding its path again for
    /// new guest memory); the caller took its sockets out of the steering map first.
    pub fn detach_nic_path(&mut self, mem: &GuestMemory) {
        self.stop_guest_path(mem);
        self.sockets.clear();
        self.tx = None;
        self.napi_done.clear();
        self.busy_pollable.clear();
    }
    /// A duplicate of the re-arm eventfd: another thread wakes the worker with it.
    pub fn waker(&self) -> io::Result<EventFd> {
        self.rearm.try_clone()
    }

    /// The flag other ports' deliveries check before writing into this rx queue.
    pub fn rx_shared(&self) -> Arc<RxQueueShared> {
        self.rx_shared.clone()
    }

    pub fn stats(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    /// The fds to register with the queue pair's epoll handler: (fd, events, id).
    pub fn event_sources(&self, ids: EventIds) -> Vec<(RawFd, EventSet, u16)> {
        let mut v = vec![
            (self.rearm.as_raw_fd(), EventSet::IN, ids.rearm),
            (self.timer.fd(), EventSet::IN, ids.timer),
        ];
        if let Some(tap) = &self.tap {
            v.push((tap.fd(), EventSet::IN, ids.tap));
        }
        v.extend(self.nic_event_sources(ids));
        v
    }

    /// The receiving sockets' entries of [`QueuePairWorker::event_sources`]: registered when
    /// the path to the NIC is made, which on a dedicated NIC is after the workers are.
    pub fn nic_event_sources(&self, ids: EventIds) -> Vec<(RawFd, EventSet, u16)> {
        // Edge-triggered: a backlog the guest cannot take yet must not spin the thread;
        // the guest's rx kick resumes it. Receive only: see `tx`.
        self.receiving_sockets()
            .into_iter()
            .enumerate()
            .map(|(i, (_, fd))| {
                (
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    ids.first_xsk + i as u16,
                )
            })
            .collect()
    }

    pub fn sockets(&self) -> &[XskSocket] {
        &self.sockets
    }

    /// Handles one event. Never fails: errors are the guest's or transient, and are counted.
    pub fn handle(
        &mut self,
        event: u16,
        ids: EventIds,
        vrings: &[Vring],
        mem: &GuestMemory,
        features: NegotiatedFeatures,
    ) {
        // The library hands each thread only its own pair's vrings: rx, then tx.
        if vrings.len() < 2 {
            return;
        }
        if let Some(cpu) = self.cpu.take() {
            pin_current_thread(cpu, self.pair);
        }
        if self.rx_vring.is_none() {
            self.rx_vring = Some(vrings[RX].clone());
        }
        if self.tx_vring.is_none() {
            self.tx_vring = Some(vrings[TX].clone());
        }
        if event == ids.rearm && !self.busy_poll {
            let _ = self.rearm.read();
        }
        if event == ids.timer {
            self.timer.consume();
            self.housekeeping();
        }
        let progress = self.progress;
        let nic_frames = self.nic_frames;
        let tx_in_place = self.tx_in_place_progress;
        let tx_first = event as usize == TX;
        if tx_first {
            self.service_tx(&vrings[TX], mem, features.tx_offloads);
        }
        let more_rx = self.service_rx(
            &vrings[RX],
            mem,
            features,
            event == ids.tap || event == ids.timer,
        );
        let more_tx = self.service_tx(&vrings[TX], mem, features.tx_offloads);
        let mut polling = self.adaptive && self.keep_polling(self.nic_frames - nic_frames);
        if self.tx_chains_in_flight() {
            let moved = self.tx_in_place_progress != tx_in_place;
            polling |= self.tx_completion_window.still_polling_within(
                moved,
                Instant::now(),
                TX_COMPLETION_WAIT,
            );
        }
        if (more_rx || more_tx || polling) && !self.busy_poll {
            // More than one budget of work, or frames coming: come back after the library's
            // other events.
            let _ = self.rearm.write(1);
        }
        if (self.busy_poll || polling) && self.progress == progress {
            // Nothing to do: let other pollers sharing this CPU (another port's queue pair)
            // run, rather than spin through their time slice.
            // SAFETY: sched_yield(2) has no arguments and cannot fail in a way that matters.
            unsafe { libc::sched_yield() };
        }
    }

    /// Whether an adaptive worker polls again at once, having got `frames` from the NIC this
    /// round: while they come at packet rates ([`POLL_MIN_FRAMES`]) and the last came within
    /// [`ADAPTIVE_IDLE`]. Its polls then run the NIC queue's NAPI (preferred busy polling)
    /// where the socket reaches it, so the kernel's receive work happens on this CPU.
    fn keep_polling(&mut self, frames: u64) -> bool {
        let now = Instant::now();
        let fast = self.rx_rate.fast_enough(frames, now);
        let open = self.rx_window.still_polling(frames > 0, now);
        fast && open
    }

    /// Once frames have come from the NIC (a socket learns its NAPI id from its first
    /// frame), hands each socket's NAPI to the NIC queues' NAPI settings, and polls it from
    /// then on only if busy polling reaches it.
    fn take_napi_over(&mut self) {
        let Some(napi) = &self.napi else { return };
        if self.nic_frames == 0 {
            return;
        }
        for (i, sock) in self.sockets.iter().enumerate() {
            if !self.napi_done[i] {
                self.busy_pollable[i] = napi.take_over(sock.queue_id(), sock.napi_id());
                self.napi_done[i] = true;
            }
        }
    }

    /// Handles one event of a port whose guest memory is gone (its file shrank under the
    /// daemon): nothing touches the rings; the NIC's rings keep moving, and what arrives for
    /// the guest is dropped and counted as for a stopped queue.
    pub fn handle_without_memory(&mut self, event: u16, ids: EventIds) {
        if event == ids.rearm && !self.busy_poll {
            let _ = self.rearm.read();
        }
        if event == ids.timer {
            self.timer.consume();
            self.housekeeping();
        }
        let mut lost = rx::drop_waiting_rx(&mut self.sockets);
        if let Some(tap) = &mut self.tap {
            lost += tap.recv_batch().count();
        }
        if let Some(path) = &mut self.guest {
            lost += path.drop_received();
            path.socket_mut().reap_tx();
        }
        self.stats
            .add(&self.stats.rx_dropped_queue_stopped, lost as u64);
        if let Some(tx) = &mut self.tx {
            tx.reap_completions();
        }
    }

    /// Reads kernel socket counters and retries anything left waiting.
    fn housekeeping(&mut self) {
        self.take_napi_over();
        let (mut full, mut empty, mut malformed) = (0, 0, 0);
        for sock in &mut self.sockets {
            let k = sock.kernel_stats();
            full += k.rx_ring_full;
            empty += k.rx_fill_ring_empty;
            malformed += sock.take_rx_dropped_malformed();
        }
        if let Some(path) = &mut self.guest {
            let k = path.kernel_stats();
            full += k.rx_ring_full;
            empty += k.rx_fill_ring_empty;
            // Longer than the layout's largest frame, so split over several guest buffers.
            malformed += path.socket_mut().take_rx_dropped_split();
        }
        let s = &self.stats;
        // A multi-buffer frame longer than any the link carries: too large for the guest too.
        s.add(&s.rx_dropped_too_large, malformed);
        s.add(
            &s.rx_dropped_xsk_ring_full,
            full.saturating_sub(self.xsk_drops_seen.0),
        );
        s.add(
            &s.rx_dropped_no_umem_frame,
            empty.saturating_sub(self.xsk_drops_seen.1),
        );
        self.xsk_drops_seen = (
            full.max(self.xsk_drops_seen.0),
            empty.max(self.xsk_drops_seen.1),
        );
    }

    fn queue_failed(&mut self, dir: &'static str, e: &QueueError) {
        tracing::error!(pair = self.pair, dir, error = %e, "guest broke the virtqueue rules; queue stopped until the device is reset");
        self.stats.add(&self.stats.queue_errors, 1);
    }

    /// The guest stopped or reset the queues: forget per-run state.
    pub fn reset(&mut self) {
        self.rx_shared.reset();
        self.tx_broken = false;
        let stale: usize = self
            .sockets
            .iter_mut()
            .map(|s| s.discard_rx_backlog())
            .sum();
        self.stats
            .add(&self.stats.rx_dropped_queue_stopped, stale as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polling_window_stays_open_while_frames_come_and_closes_after_the_idle_time() {
        let t0 = Instant::now();
        let mut w = IdleWindow::default();
        assert!(!w.still_polling(false, t0), "no frames yet: sleep");
        assert!(w.still_polling(true, t0));
        let step = ADAPTIVE_IDLE / 4;
        // Frames keep coming: the window moves with them, far past one idle time.
        for i in 1..=20 {
            assert!(w.still_polling(true, t0 + step * i));
        }
        let last = t0 + step * 20;
        assert!(w.still_polling(false, last + ADAPTIVE_IDLE - step));
        assert!(!w.still_polling(false, last + ADAPTIVE_IDLE), "idle: sleep");
        assert!(!w.is_open());
        // Once closed it stays closed until frames come again.
        assert!(!w.still_polling(false, last + ADAPTIVE_IDLE * 2));
        assert!(w.still_polling(true, last + ADAPTIVE_IDLE * 3));
    }

    #[test]
    fn frames_below_the_polling_rate_never_make_the_worker_poll() {
        let t0 = Instant::now();
        let mut r = FrameRate::default();
        let step = ADAPTIVE_IDLE / 8;
        // A TCP upload's ACKs: a frame every eighth of a period, far below the rate.
        for i in 0..100 {
            assert!(!r.fast_enough(1, t0 + step * i), "round {i}");
        }
        // Packet rates: a batch of 16 each eighth of a period reaches the rate within the
        // period, and the next period polls from its start on the last one's count.
        let t1 = t0 + step * 100;
        let mut fast_from = None;
        for i in 0..32 {
            if r.fast_enough(16, t1 + step * i) && fast_from.is_none() {
                fast_from = Some(i);
            }
        }
        let from = fast_from.expect("packet rates poll");
        assert!(from <= 8, "polling started at round {from}");
        assert!(
            r.fast_enough(0, t1 + step * 32),
            "a quiet round in a fast period"
        );
        // The frames stop: the worker sleeps (the idle window closes too), and after a long
        // sleep the old pace counts for nothing.
        assert!(!r.fast_enough(1, t1 + step * 32 + ADAPTIVE_IDLE * 10));
    }
}
