//! One queue pair's worker: moves frames between its AF_XDP sockets (one per NIC queue), the
//! multicast tap and the guest's rx/tx virtqueues.
//!
//! It runs on the vhost-user library's epoll thread for that queue pair and is woken by guest
//! kicks, socket readiness, its own re-arm eventfd (more work than one batch) and a slow
//! housekeeping timer. Nothing a guest does can make it return an error to the library, which
//! would end the thread: a guest that breaks the ring's rules gets its queue stopped and
//! counted until the device is reset.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::datapath::rx::{self, RxScratch, RxTally};
use crate::datapath::tx::{self, TxScratch, TxStop, TxTally};
use crate::datapath::QueueError;
use crate::device::NegotiatedFeatures;
use crate::packet_tap::PacketTap;
use crate::stats::QueueStats;
use crate::switch::{
    self, LocalFrame, PortTx, RxQueueShared, SwitchPort, SwitchScratch, SwitchTable, TxPolicy,
};
use crate::xsk::XskSocket;

pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;

/// Frames moved per batch: one notification and one ring update per batch.
pub const BATCH: usize = 64;
/// Batches per event before yielding to the other direction and the library's events.
const BUDGET_BATCHES: usize = 8;
/// SO_BUSY_POLL for busy-polling sockets. The worker's polls are non-blocking, which run one
/// NAPI poll whatever the value; it only has to be non-zero.
const BUSY_POLL_USECS: u32 = 50;

/// Local vring indices inside a queue pair's worker.
const RX: usize = 0;
const TX: usize = 1;

/// Moves the calling thread (the library's epoll thread for one queue pair) to `cpu`.
fn pin_current_thread(cpu: usize, pair: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu checked below).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        tracing::warn!(cpu, pair, "CPU number out of range; queue pair not pinned");
        return;
    }
    // SAFETY: as above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity on the calling thread (0) with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        tracing::warn!(cpu, pair, error = %io::Error::last_os_error(), "cannot pin queue pair thread");
    } else {
        tracing::info!(cpu, pair, "queue pair thread pinned");
    }
}

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

/// A periodic timer fd.
struct Timer(OwnedFd);

impl Timer {
    fn periodic(ms: u64) -> io::Result<Self> {
        // SAFETY: plain timerfd_create(2).
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ts = libc::timespec {
            tv_sec: (ms / 1000) as i64,
            tv_nsec: ((ms % 1000) * 1_000_000) as i64,
        };
        let spec = libc::itimerspec {
            it_interval: ts,
            it_value: ts,
        };
        // SAFETY: valid fd and itimerspec.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Timer(fd))
    }

    fn consume(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer; EAGAIN is fine.
        unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }
}

/// Per-queue-pair datapath state.
pub struct QueuePairWorker {
    pair: usize,
    /// One socket per NIC queue this pair serves, in the steering map while connected.
    sockets: Vec<XskSocket>,
    /// The socket the pair transmits through. It is never in the epoll set: freeing each
    /// sent frame wakes the socket's waiters, and with the socket registered that was an
    /// epoll callback per frame (8-13 % of tx throughput at 64 B). Completions are reaped on
    /// every tx round, and a round short of buffers comes back by itself, so no readiness
    /// event is needed.
    tx: XskSocket,
    tap: Option<PacketTap>,
    rearm: EventFd,
    timer: Timer,
    busy_poll: bool,
    max_frame: usize,
    stats: Arc<QueueStats>,
    rx_scratch: RxScratch,
    tx_scratch: TxScratch,
    /// Next socket to read first, so one busy NIC queue cannot starve the others.
    next_rx_socket: usize,
    /// Shared with other ports' workers, which deliver switched frames into this rx queue.
    rx_shared: Arc<RxQueueShared>,
    tx_broken: bool,
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
}

/// What a worker needs beyond its sockets: the port's identity and policy.
pub struct WorkerConfig {
    pub max_frame: usize,
    pub busy_poll: bool,
    pub policy: TxPolicy,
    pub switch: Arc<SwitchTable>,
    pub own: Arc<SwitchPort>,
    pub cpu: Option<usize>,
}

impl QueuePairWorker {
    pub fn new(
        pair: usize,
        sockets: Vec<XskSocket>,
        tx: XskSocket,
        tap: Option<PacketTap>,
        config: WorkerConfig,
        stats: Arc<QueueStats>,
    ) -> io::Result<Self> {
        let WorkerConfig {
            max_frame,
            busy_poll,
            policy,
            switch,
            own,
            cpu,
        } = config;
        let rearm = EventFd::new(EFD_NONBLOCK)?;
        if busy_poll {
            for s in sockets.iter().chain([&tx]) {
                s.enable_busy_poll(BUSY_POLL_USECS, BATCH as u16)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("busy polling on NIC queue {}: {e}", s.queue_id()),
                        )
                    })?;
            }
            // Left readable for good: the level-triggered epoll returns at once, every time.
            rearm.write(1)?;
        }
        Ok(QueuePairWorker {
            pair,
            sockets,
            tx,
            tap,
            rearm,
            timer: Timer::periodic(200)?,
            busy_poll,
            max_frame,
            stats,
            rx_scratch: RxScratch::default(),
            tx_scratch: TxScratch::default(),
            next_rx_socket: 0,
            rx_shared: Arc::new(RxQueueShared::default()),
            tx_broken: false,
            xsk_drops_seen: (0, 0),
            policy,
            switch,
            own,
            local: Vec::with_capacity(BATCH),
            switch_scratch: SwitchScratch::default(),
            to_notify: Vec::new(),
            cpu,
            progress: 0,
        })
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
            (self.timer.0.as_raw_fd(), EventSet::IN, ids.timer),
        ];
        if let Some(tap) = &self.tap {
            v.push((tap.fd(), EventSet::IN, ids.tap));
        }
        for (i, s) in self.sockets.iter().enumerate() {
            // Edge-triggered: a backlog the guest cannot take yet must not spin the thread;
            // the guest's rx kick resumes it. Receive only: see `tx`.
            v.push((
                s.fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                ids.first_xsk + i as u16,
            ));
        }
        v
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
        mem: &GuestMemoryMmap,
        features: NegotiatedFeatures,
    ) {
        // The library hands each thread only its own pair's vrings: rx, then tx.
        if vrings.len() < 2 {
            return;
        }
        if let Some(cpu) = self.cpu.take() {
            pin_current_thread(cpu, self.pair);
        }
        if event == ids.rearm && !self.busy_poll {
            let _ = self.rearm.read();
        }
        if event == ids.timer {
            self.timer.consume();
            self.housekeeping();
        }
        let progress = self.progress;
        let tx_first = event as usize == TX;
        if tx_first {
            self.service_tx(&vrings[TX], mem);
        }
        let more_rx = self.service_rx(
            &vrings[RX],
            mem,
            features,
            event == ids.tap || event == ids.timer,
        );
        let more_tx = self.service_tx(&vrings[TX], mem);
        if (more_rx || more_tx) && !self.busy_poll {
            // More than one budget of work: come back after the library's other events.
            let _ = self.rearm.write(1);
        }
        if self.busy_poll && self.progress == progress {
            // Nothing to do: let other pollers sharing this CPU (another port's queue pair)
            // run, rather than spin through their time slice.
            // SAFETY: sched_yield(2) has no arguments and cannot fail in a way that matters.
            unsafe { libc::sched_yield() };
        }
    }

    /// Reads kernel socket counters and retries anything left waiting.
    fn housekeeping(&mut self) {
        let (mut full, mut empty) = (0, 0);
        for k in self.sockets.iter().map(|s| s.kernel_stats()) {
            full += k.rx_ring_full;
            empty += k.rx_fill_ring_empty;
        }
        let s = &self.stats;
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

    /// Guest -> NIC. Returns true if work was left for another round.
    fn service_tx(&mut self, vring: &Vring, mem: &GuestMemoryMmap) -> bool {
        let sock = &mut self.tx;
        sock.reap_completions();
        if self.tx_broken {
            return false;
        }
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return false;
        }
        // The guest is notified (or not) for everything this round puts in the used ring.
        let used_before = state.get_queue().next_used();
        let mut tally = TxTally::default();
        let mut switched = 0;
        let mut more = false;
        let mut result = Ok(());
        let ports = self.switch.snapshot();
        'outer: for round in 0.. {
            let _ = state.get_queue_mut().disable_notification(mem);
            let mut stop = TxStop::Budget;
            for _ in 0..BUDGET_BATCHES {
                if let Some(rate) = &mut self.policy.rate {
                    rate.refill(Instant::now());
                }
                let mut sink = PortTx::new(
                    sock,
                    &mut self.policy,
                    &ports,
                    &mut self.local,
                    &mut self.switch_scratch,
                );
                let batch = tx::transmit_batch(
                    mem,
                    state.get_queue_mut(),
                    &mut sink,
                    self.max_frame,
                    BATCH,
                    &mut self.tx_scratch,
                    &mut tally,
                );
                switched += sink.switched;
                // Flooded frames before the flush: they are also staged for the NIC and must
                // be read before the flush can complete them and free their buffers.
                switched += switch::deliver_local(
                    &mut self.local,
                    sock,
                    &mut self.rx_scratch,
                    &mut self.to_notify,
                );
                sock.flush_tx();
                sock.reap_completions();
                stop = match batch {
                    Ok(s) => s,
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                };
                if stop != TxStop::Budget {
                    break;
                }
            }
            match stop {
                // The queue's shared tx pool is empty: other ports' completions do not wake
                // this socket, so come back after the library's other events.
                TxStop::NoBuffers => {
                    more = true;
                    break;
                }
                TxStop::Budget => {
                    more = true;
                    break;
                }
                TxStop::RingEmpty => {
                    // Re-enable kicks; if the guest added chains meanwhile, go again once.
                    match state.get_queue_mut().enable_notification(mem) {
                        Ok(true) if round == 0 => continue,
                        Ok(true) => {
                            more = true;
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
        self.progress += tally.frames
            + tally.dropped_oversized
            + tally.dropped_runt
            + tally.dropped_offload
            + tally.dropped_spoofed
            + tally.dropped_rate_limited;
        let s = &self.stats;
        s.add(&s.tx_packets, tally.frames);
        s.add(&s.tx_bytes, tally.bytes);
        s.add(&s.tx_dropped_oversized, tally.dropped_oversized);
        s.add(&s.tx_dropped_runt, tally.dropped_runt);
        s.add(&s.tx_dropped_offload, tally.dropped_offload);
        s.add(&s.tx_dropped_spoofed, tally.dropped_spoofed);
        s.add(&s.tx_dropped_rate_limited, tally.dropped_rate_limited);
        s.add(&s.tx_switched, switched);
        if state.get_queue().next_used() != used_before {
            switch::notify_guest_since(&mut state, mem, &self.stats, Some(used_before));
        }
        drop(state);
        switch::notify_ports(&mut self.to_notify);
        if let Err(e) = result {
            self.tx_broken = true;
            self.queue_failed("tx", &e);
        }
        more
    }

    /// NIC -> guest. Returns true if work was left for another round.
    fn service_rx(
        &mut self,
        vring: &Vring,
        mem: &GuestMemoryMmap,
        features: NegotiatedFeatures,
        read_tap: bool,
    ) -> bool {
        let mut state = vring.get_mut();
        let broken = self.rx_shared.is_broken();
        let running = state.get_queue().ready() && state.is_enabled() && !broken;
        if !running && self.pair != 0 && !broken {
            // The guest disabled this pair (fewer combined channels); its NIC queues still
            // carry the port's traffic, which goes to the first pair instead.
            drop(state);
            self.forward_to_first_pair();
            return false;
        }
        if !running {
            // Nobody to deliver to: keep the NIC's rings moving and count the loss.
            let mut lost = self.drop_waiting_rx();
            if let Some(tap) = &mut self.tap {
                lost += tap.recv_batch().count();
            }
            self.stats
                .add(&self.stats.rx_dropped_queue_stopped, lost as u64);
            return false;
        }

        let mut tally = RxTally::default();
        let mut guest_full = false;
        let mut more = false;
        let mut result = Ok(());
        let n = self.sockets.len();
        'sockets: for k in 0..n {
            let sock = &mut self.sockets[(self.next_rx_socket + k) % n];
            if self.busy_poll {
                sock.busy_poll_rx();
            }
            for batch in 0..BUDGET_BATCHES {
                sock.poll_rx(BATCH as u32);
                if sock.rx_pending() == 0 {
                    break;
                }
                let want = sock.rx_pending().min(BATCH);
                let queue = state.get_queue_mut();
                let scratch = &mut self.rx_scratch;
                let got = sock.drain_rx(BATCH, |frames| {
                    rx::deliver_batch(
                        mem,
                        queue,
                        frames,
                        rx::Framing::Bare,
                        features.mrg_rxbuf,
                        scratch,
                        &mut tally,
                    )
                });
                match got {
                    Ok(done) if done < want => {
                        guest_full = true;
                        break 'sockets;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break 'sockets;
                    }
                }
                if batch + 1 == BUDGET_BATCHES {
                    more = true;
                }
            }
        }
        self.next_rx_socket = (self.next_rx_socket + 1) % n.max(1);
        if guest_full {
            // The guest has no buffers: drop what waits rather than hold it, so the NIC's
            // ring keeps moving and the guest later sees fresh traffic, not a stale backlog.
            let lost = self.drop_waiting_rx();
            self.stats
                .add(&self.stats.rx_dropped_guest_ring_full, lost as u64);
        }

        if read_tap && result.is_ok() {
            if let Some(tap) = &mut self.tap {
                for frame in tap.recv_batch() {
                    if guest_full {
                        self.stats.add(&self.stats.rx_dropped_guest_ring_full, 1);
                        continue;
                    }
                    match rx::deliver_frame(
                        mem,
                        state.get_queue_mut(),
                        frame,
                        features.mrg_rxbuf,
                        &mut self.rx_scratch,
                    ) {
                        Ok(rx::RxOutcome::Delivered { buffers }) => {
                            tally.frames += 1;
                            tally.bytes += frame.len() as u64;
                            tally.buffers += u64::from(buffers);
                            self.stats.add(&self.stats.rx_multicast, 1);
                        }
                        Ok(rx::RxOutcome::TooLarge) => tally.dropped_too_large += 1,
                        Ok(rx::RxOutcome::NoBuffers) => {
                            guest_full = true;
                            self.stats.add(&self.stats.rx_dropped_guest_ring_full, 1);
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
            }
        }

        self.progress += tally.frames + tally.dropped_too_large;
        let s = &self.stats;
        s.add(&s.rx_packets, tally.frames);
        s.add(&s.rx_bytes, tally.bytes);
        s.add(&s.rx_buffers, tally.buffers);
        s.add(&s.rx_dropped_too_large, tally.dropped_too_large);
        if tally.frames > 0 {
            self.rx_shared.notify_guest(&mut state, mem, &self.stats);
        }
        if guest_full {
            // Ask for a kick when the guest posts buffers; if it already has, go again.
            if let Ok(true) = state.get_queue_mut().enable_notification(mem) {
                more = true;
            }
        } else {
            let _ = state.get_queue_mut().disable_notification(mem);
        }
        drop(state);
        if let Err(e) = result {
            self.rx_shared.mark_broken();
            self.queue_failed("rx", &e);
        }
        more
    }

    /// Hands every frame waiting on this pair's sockets to the port's first receive queue.
    fn forward_to_first_pair(&mut self) {
        let own = self.own.clone();
        for sock in &mut self.sockets {
            loop {
                sock.poll_rx(BATCH as u32);
                if sock.rx_pending() == 0 {
                    break;
                }
                let scratch = &mut self.rx_scratch;
                let taken = sock.drain_rx(BATCH, |frames| {
                    own.deliver_from_nic(frames, scratch).ok_or(())
                });
                if taken.is_err() {
                    // No frontend: drop as a stopped queue would.
                    let lost = sock.discard_rx_backlog();
                    self.stats
                        .add(&self.stats.rx_dropped_queue_stopped, lost as u64);
                    break;
                }
            }
        }
    }

    /// Takes every frame waiting on the sockets' rx rings and returns it to the fill rings.
    /// Returns how many were dropped.
    fn drop_waiting_rx(&mut self) -> usize {
        self.sockets
            .iter_mut()
            .map(|s| {
                s.poll_rx(u32::MAX);
                s.discard_rx_backlog()
            })
            .sum()
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
