//! A vhost-user frontend: the project plays the VMM and the guest driver.
//!
//! [`VirtioNetFrontend`] connects to a vhost-user-net backend the way QEMU does (owner,
//! features, protocol features, memory table, vrings, enable), with memfd-backed guest memory,
//! and drives the two split virtqueues itself: it posts receive buffers, transmits frames
//! through descriptor chains (direct, chained or indirect), and can post deliberately broken
//! chains. It is the guest side of the integration tests and of the benchmark.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::{virtio_config, virtio_net, virtio_ring};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// Feature masks and descriptor flags, from virtio-bindings' bit numbers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const VIRTIO_NET_F_MTU: u64 = 1 << virtio_net::VIRTIO_NET_F_MTU;
pub const VIRTIO_NET_F_MAC: u64 = 1 << virtio_net::VIRTIO_NET_F_MAC;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << virtio_net::VIRTIO_NET_F_MRG_RXBUF;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << virtio_net::VIRTIO_NET_F_STATUS;

pub const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
pub const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
pub const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// `virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// Guest memory layout: rings first (32 KiB per queue), then one data slot per descriptor of
/// each queue, [`FrontendOptions::slot_len`] apart.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// What a Linux guest's virtio-net gives each receive buffer at MTU 1500 (header, Ethernet
/// header, VLAN tag and MTU, rounded up to a cache line), packed back to back in page
/// fragments. Power-of-two strides put the buffers in a fraction of the cache's sets: 2 KiB
/// slots measured 20-25 % below this layout for both xvdpa and DPDK, 4 KiB slots worse still.
pub const LINUX_RX_BUFFER: u64 = 1536;
const RING_AREA: u64 = 0x10000;
/// How long the frontend waits for any one reply of the backend.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A descriptor as the driver writes it; `next` in [`VirtioNetFrontend::post_raw`] is a
/// position within the posted chain, translated to the real descriptor index.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl RawDesc {
    /// The 16-byte little-endian `virtq_desc` layout.
    fn to_bytes(self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// The page size of a vhost-user dirty log (`VHOST_LOG_PAGE`).
pub const DIRTY_LOG_PAGE: u64 = 4096;
/// `VHOST_F_LOG_ALL`.
pub const VHOST_F_LOG_ALL: u64 = 26;

/// One used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// Driver state of one split virtqueue.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    free: Vec<u16>,
    /// Descriptor indices of each in-flight chain, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    /// The avail index at the last kick decision (EVENT_IDX compares avail_event with it).
    kick_checked: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
    /// The device signals it when it stops the queue for a broken rule (SET_VRING_ERR).
    err: EventFd,
    /// First data slot of this queue in guest memory, and the distance between two slots.
    slots: u64,
    slot_len: u64,
}

impl DriverQueue {
    fn new(base: u64, slots: u64, slot_len: u64, size: u16) -> Result<Self> {
        let desc = base;
        let avail = desc + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64 + 3) & !3;
        Ok(DriverQueue {
            desc,
            avail,
            used,
            size,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); size as usize],
            avail_idx: 0,
            kick_checked: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            err: EventFd::new(EFD_NONBLOCK)?,
            slots,
            slot_len,
        })
    }

    fn slot(&self, desc: u16) -> u64 {
        self.slots + desc as u64 * self.slot_len
    }
}

pub struct VirtioNetFrontend {
    frontend: Frontend,
    pub mem: GuestMemoryMmap,
    queues: [DriverQueue; 2],
    /// Features the driver acknowledged (without the vhost-user PROTOCOL_FEATURES bit).
    pub features: u64,
    /// Length of the prebuilt tx chain when every tx descriptor holds the template frame.
    tx_template: Option<u32>,
    /// Length each rx descriptor was last written with (0: not written).
    rx_desc_len: Vec<u32>,
    scratch_heads: Vec<u16>,
    /// Re-arm the device's notification after every reclaim (an interrupt-driven driver).
    /// Off in NAPI mode, where notifications are armed only before sleeping.
    arm_on_reclaim: bool,
    /// The dirty log shared with the backend while a migration is simulated.
    dirty_log: Option<File>,
    /// The connection itself, for the one message the vhost crate's frontend cannot send
    /// (`SEND_RARP`).
    raw: UnixStream,
    /// The backend acks every message (REPLY_ACK negotiated).
    reply_ack: bool,
}

/// Options for [`VirtioNetFrontend::connect`].
#[derive(Clone, Debug)]
pub struct FrontendOptions {
    /// Driver features to acknowledge (intersected with what the device offers).
    pub features: u64,
    /// How long to wait for the backend's socket to accept connections.
    pub connect_timeout: Duration,
    /// Descriptors per virtqueue (a power of two up to [`MAX_QUEUE_SIZE`]).
    pub queue_size: u16,
    /// Bytes of guest memory per descriptor's data slot (a multiple of 64): the largest
    /// buffer or frame one descriptor can carry.
    pub slot_len: u64,
    /// Make the guest memory memfd with `MFD_ALLOW_SEALING`, as QEMU's memfd backend does
    /// (the daemon then seals it against shrinking). Without it the memfd cannot be sealed,
    /// like a tmpfs or hugetlbfs file, and [`VirtioNetFrontend::shrink_guest_memory`] can
    /// cut it short under the daemon.
    pub allow_sealing: bool,
    /// Program and enable the rings in `connect`, as a booting guest's driver does. Off: a
    /// migration's destination, whose rings QEMU starts only when the migrated guest runs
    /// ([`VirtioNetFrontend::start_rings`]).
    pub start_rings: bool,
    /// Guest memory in two files, one region each (the rings and the receive slots in the
    /// first, the transmit slots in the second), as a VMM with memory from several backends
    /// sends it.
    pub two_memory_files: bool,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            features: VIRTIO_F_VERSION_1
                | VIRTIO_NET_F_MAC
                | VIRTIO_NET_F_STATUS
                | VIRTIO_NET_F_MTU
                | VIRTIO_RING_F_INDIRECT_DESC,
            connect_timeout: Duration::from_secs(10),
            queue_size: 256,
            slot_len: 2048,
            allow_sealing: false,
            start_rings: true,
            two_memory_files: false,
        }
    }
}

/// A memfd of `size` bytes, as guest memory; `allow_sealing` as QEMU's memfd backend makes it.
pub fn memfd(size: u64, allow_sealing: bool) -> Result<File> {
    let name = c"xvdpa-test-guest";
    let flags = if allow_sealing {
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fresh fd we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).context("sizing guest memory")?;
    Ok(file)
}

/// Waits until `event` is readable (and reads it) or `timeout` passes; whether it was.
fn wait_eventfd(event: &EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if n > 0 {
        let _ = event.read();
        true
    } else {
        false
    }
}

impl VirtioNetFrontend {
    /// Connects to the backend at `socket` and brings the device up as a driver would.
    pub fn connect(socket: &Path, opts: FrontendOptions) -> Result<Self> {
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", socket.display()))
                }
            }
        };
        // A backend that stops answering fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .context("socket timeout")?;
        let raw = stream.try_clone().context("cloning the connection")?;
        let mut frontend = Frontend::from_stream(stream, 2);

        let qsize = opts.queue_size;
        if !qsize.is_power_of_two() || qsize > MAX_QUEUE_SIZE {
            bail!("queue size {qsize}: a power of two up to {MAX_QUEUE_SIZE}");
        }
        let slot_len = opts.slot_len;
        if slot_len < 64 || !slot_len.is_multiple_of(64) {
            bail!("data slot of {slot_len} bytes: a multiple of 64 is needed");
        }
        let mem_size = RING_AREA + 2 * u64::from(qsize) * slot_len;
        // Split where the transmit slots start, so no slot spans two regions.
        let split = if opts.two_memory_files {
            RING_AREA + u64::from(qsize) * slot_len
        } else {
            mem_size
        };
        let mut ranges = vec![(
            GuestAddress(0),
            split as usize,
            Some(FileOffset::new(memfd(split, opts.allow_sealing)?, 0)),
        )];
        if split < mem_size {
            let rest = mem_size - split;
            let file = memfd(rest, opts.allow_sealing)?;
            ranges.push((
                GuestAddress(split),
                rest as usize,
                Some(FileOffset::new(file, 0)),
            ));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(ranges)
            .context("mapping guest memory")?;

        frontend.set_owner().context("SET_OWNER")?;
        let offered = frontend.get_features().context("GET_FEATURES")?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            bail!("backend does not offer vhost-user protocol features");
        }
        let proto = frontend
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::RARP;
        frontend
            .set_protocol_features(proto & want)
            .context("SET_PROTOCOL_FEATURES")?;
        let reply_ack = proto.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            // Every later message waits for the backend's ack, so when connect() returns the
            // rings are really enabled on the other side.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queue_num = frontend.get_queue_num().context("GET_QUEUE_NUM")?;
        if queue_num < 2 {
            bail!("backend reports {queue_num} queues, a net device needs 2");
        }
        let features = offered & opts.features;
        frontend
            .set_features(features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .context("SET_FEATURES")?;

        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .context("memory region")?;
        frontend.set_mem_table(&regions).context("SET_MEM_TABLE")?;

        let queues = [
            DriverQueue::new(0, RING_AREA, slot_len, qsize)?,
            DriverQueue::new(
                RING_AREA / 2,
                RING_AREA + u64::from(qsize) * slot_len,
                slot_len,
                qsize,
            )?,
        ];
        let rx_size = usize::from(qsize);
        let mut fe = VirtioNetFrontend {
            frontend,
            mem,
            queues,
            features,
            tx_template: None,
            rx_desc_len: vec![0; rx_size],
            scratch_heads: Vec::new(),
            arm_on_reclaim: true,
            dirty_log: None,
            raw,
            reply_ack,
        };
        if opts.start_rings {
            fe.start_rings()?;
        }
        Ok(fe)
    }

    /// Programs and enables both rings from index 0 (after FEATURES_OK, before DRIVER_OK).
    pub fn start_rings(&mut self) -> Result<()> {
        for (i, q) in self.queues.iter().enumerate() {
            self.frontend
                .set_vring_num(i, q.size)
                .context("SET_VRING_NUM")?;
            self.frontend
                .set_vring_base(i, 0)
                .context("SET_VRING_BASE")?;
            let addr = self.vring_addr(i, false);
            self.frontend
                .set_vring_addr(i, &addr)
                .context("SET_VRING_ADDR")?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .context("SET_VRING_KICK")?;
            self.frontend
                .set_vring_call(i, &q.call)
                .context("SET_VRING_CALL")?;
            // As QEMU does: the device reports a queue it stopped here.
            self.frontend
                .set_vring_err(i, &q.err)
                .context("SET_VRING_ERR")?;
        }
        for i in 0..2 {
            self.frontend
                .set_vring_enable(i, true)
                .context("SET_VRING_ENABLE")?;
        }
        if self.has(VIRTIO_RING_F_EVENT_IDX) {
            // Ask for a notification on every used entry.
            for q in 0..2 {
                self.set_used_event(q, 0)?;
            }
        }
        Ok(())
    }

    /// Ring `i`'s addresses as SET_VRING_ADDR carries them: the frontend's own virtual
    /// addresses, and while a migration logs, `VHOST_VRING_F_LOG` with the used ring's guest
    /// address as the ring's log address (QEMU's `vhost_virtqueue_set_addr`).
    fn vring_addr(&self, i: usize, log: bool) -> VringConfigData {
        let region = self.mem.iter().next().expect("one region");
        let host_base = region.as_ptr() as u64;
        let q = &self.queues[i];
        VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: if log {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            },
            desc_table_addr: host_base + q.desc,
            used_ring_addr: host_base + q.used,
            avail_ring_addr: host_base + q.avail,
            log_addr: log.then_some(q.used),
        }
    }

    /// Sets or clears both rings' log flag and address, as QEMU does right after it turns
    /// `VHOST_F_LOG_ALL` on or off.
    fn set_rings_log(&mut self, on: bool) -> Result<()> {
        for i in 0..self.queues.len() {
            let addr = self.vring_addr(i, on);
            self.frontend
                .set_vring_addr(i, &addr)
                .context("SET_VRING_ADDR")?;
        }
        Ok(())
    }

    /// A driver's device reset as QEMU relays it over vhost-user on the same connection:
    /// rings stopped (GET_VRING_BASE), their memory cleared, then programmed and enabled
    /// again from index 0.
    pub fn reset_device(&mut self) -> Result<()> {
        for i in 0..2 {
            self.frontend
                .set_vring_enable(i, false)
                .context("SET_VRING_ENABLE")?;
            self.frontend.get_vring_base(i).context("GET_VRING_BASE")?;
        }
        for i in 0..2 {
            let q = &self.queues[i];
            let (start, end) = (q.desc, q.used + 6 + 8 * q.size as u64);
            self.mem
                .write_slice(&vec![0u8; (end - start) as usize], GuestAddress(start))?;
            let fresh = DriverQueue::new(q.desc, q.slots, q.slot_len, q.size)?;
            self.queues[i] = fresh;
        }
        self.rx_desc_len.fill(0);
        self.start_rings()
    }

    /// Cuts the guest memory file down to `len` bytes behind the backend's back (what a
    /// hostile frontend can do to a file it did not seal). The frontend's own mapping past
    /// `len` is gone too: nothing here may touch guest memory afterwards.
    pub fn shrink_guest_memory(&self, len: u64) -> Result<()> {
        let region = self.mem.iter().next().expect("one region");
        let file = region
            .file_offset()
            .context("guest memory is not file-backed")?
            .file();
        file.set_len(len).context("shrinking the guest memory file")
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// The device's config space (17 bytes: mac, status, max_virtqueue_pairs, mtu, speed, duplex).
    pub fn config(&mut self) -> Result<Vec<u8>> {
        let buf = [0u8; 17];
        let (_, payload) = self
            .frontend
            .get_config(0, buf.len() as u32, VhostUserConfigFlags::WRITABLE, &buf)
            .context("GET_CONFIG")?;
        Ok(payload)
    }

    /// Stops ring `queue` and returns the device's next available index (GET_VRING_BASE), as
    /// QEMU does when the VM stops or the driver resets the device.
    pub fn get_vring_base(&mut self, queue: usize) -> Result<u32> {
        Ok(self.frontend.get_vring_base(queue)?)
    }

    /// Gives running ring `queue` a fresh kick eventfd (SET_VRING_KICK without stopping the
    /// ring) and returns the old one, which the backend's epoll set may still hold: what a
    /// hostile frontend can do, and what a device reset does to an event the backend has
    /// taken from its epoll set but not read yet.
    pub fn replace_kick(&mut self, queue: usize) -> Result<EventFd> {
        let fresh = EventFd::new(EFD_NONBLOCK)?;
        self.frontend
            .set_vring_kick(queue, &fresh)
            .context("SET_VRING_KICK")?;
        Ok(std::mem::replace(&mut self.queues[queue].kick, fresh))
    }

    /// Sets or clears VRING_AVAIL_F_NO_INTERRUPT on `queue` (what a polling driver does when
    /// EVENT_IDX is not negotiated).
    pub fn set_no_interrupt(&mut self, queue: usize, on: bool) -> Result<()> {
        let at = GuestAddress(self.queues[queue].avail);
        self.mem
            .store(u16::from(on).to_le(), at, Ordering::Release)?;
        Ok(())
    }

    fn set_used_event(&mut self, queue: usize, idx: u16) -> Result<()> {
        let q = &self.queues[queue];
        let at = q.avail + 4 + 2 * q.size as u64;
        self.mem.store(idx, GuestAddress(at), Ordering::Release)?;
        Ok(())
    }

    fn write_desc(&self, queue: usize, index: u16, d: RawDesc) -> Result<()> {
        let at = GuestAddress(self.queues[queue].desc + 16 * index as u64);
        self.mem.write_slice(&d.to_bytes(), at)?;
        Ok(())
    }

    /// Publishes every pushed entry with one index store (a batch, as drivers do).
    fn commit_avail(&mut self, queue: usize) -> Result<()> {
        let q = &self.queues[queue];
        self.mem
            .store(q.avail_idx, GuestAddress(q.avail + 2), Ordering::Release)?;
        Ok(())
    }

    fn publish(&mut self, queue: usize, head: u16) -> Result<()> {
        self.push_avail_many(queue, &[head])?;
        self.commit_avail(queue)
    }

    fn set_chain(&mut self, queue: usize, descs: &[u16]) {
        let c = &mut self.queues[queue].chains[descs[0] as usize];
        c.clear();
        c.extend_from_slice(descs);
    }

    fn alloc(&mut self, queue: usize, n: usize) -> Result<Vec<u16>> {
        let q = &mut self.queues[queue];
        if q.free.len() < n {
            bail!(
                "queue {queue}: {} descriptors free, {n} needed",
                q.free.len()
            );
        }
        Ok((0..n).map(|_| q.free.pop().unwrap()).collect())
    }

    /// Free descriptors in `queue`.
    pub fn free_descriptors(&self, queue: usize) -> usize {
        self.queues[queue].free.len()
    }

    /// Whether the device wants a kick for the entries published in `queue` since the last
    /// call, as a Linux driver decides it: with EVENT_IDX, when the device's avail_event lies
    /// among them; without, when VRING_USED_F_NO_NOTIFY is clear.
    pub fn device_wants_kick(&mut self, queue: usize) -> Result<bool> {
        // The new avail index is visible before the device's wish is read (virtio 2.7.7.2).
        std::sync::atomic::fence(Ordering::SeqCst);
        let q = &mut self.queues[queue];
        if self.features & VIRTIO_RING_F_EVENT_IDX != 0 {
            let at = GuestAddress(q.used + 4 + 8 * u64::from(q.size));
            let event: u16 = u16::from_le(self.mem.load(at, Ordering::Acquire)?);
            let (old, new) = (q.kick_checked, q.avail_idx);
            q.kick_checked = new;
            return Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old));
        }
        let flags: u16 = self.mem.load(GuestAddress(q.used), Ordering::Acquire)?;
        Ok(flags & 1 == 0)
    }

    /// Tells the device there is new work in `queue`.
    pub fn kick(&self, queue: usize) -> Result<()> {
        self.queues[queue].kick.write(1)?;
        Ok(())
    }

    /// Posts `count` device-writable receive buffers of `len` bytes each (one descriptor each).
    pub fn post_rx_buffers(&mut self, count: usize, len: u32) -> Result<()> {
        if u64::from(len) > self.queues[RX_QUEUE].slot_len {
            bail!(
                "rx buffers of {len} bytes do not fit the {}-byte data slots",
                self.queues[RX_QUEUE].slot_len
            );
        }
        if self.queues[RX_QUEUE].free.len() < count {
            bail!(
                "rx queue: {} descriptors free, {count} needed",
                self.queues[RX_QUEUE].free.len()
            );
        }
        let mut heads = std::mem::take(&mut self.scratch_heads);
        heads.clear();
        for _ in 0..count {
            let idx = self.queues[RX_QUEUE].free.pop().unwrap();
            // A descriptor keeps its slot for good; rewrite it only when its length changes.
            if self.rx_desc_len[idx as usize] != len {
                let addr = self.queues[RX_QUEUE].slot(idx);
                self.write_desc(
                    RX_QUEUE,
                    idx,
                    RawDesc {
                        addr,
                        len,
                        flags: VRING_DESC_F_WRITE,
                        next: 0,
                    },
                )?;
                self.rx_desc_len[idx as usize] = len;
            }
            self.set_chain(RX_QUEUE, &[idx]);
            heads.push(idx);
        }
        let pushed = self.push_avail_many(RX_QUEUE, &heads);
        self.scratch_heads = heads;
        pushed?;
        self.commit_avail(RX_QUEUE)?;
        if count > 0 && self.device_wants_kick(RX_QUEUE)? {
            self.kick(RX_QUEUE)?;
        }
        Ok(())
    }

    /// Posts a chain built from `descs` as-is (addresses, lengths, flags), with `next` fields
    /// given as positions in `descs`. For malformed-input tests.
    pub fn post_raw(&mut self, queue: usize, descs: &[RawDesc]) -> Result<u16> {
        let idx = self.alloc(queue, descs.len())?;
        for (i, d) in descs.iter().enumerate() {
            let next = idx.get(d.next as usize).copied().unwrap_or(d.next);
            self.write_desc(queue, idx[i], RawDesc { next, ..*d })?;
        }
        self.set_chain(queue, &idx);
        self.tx_template = None;
        if queue == RX_QUEUE {
            for &i in &idx {
                self.rx_desc_len[i as usize] = 0;
            }
        }
        self.publish(queue, idx[0])?;
        Ok(idx[0])
    }

    /// Address of the data slot of descriptor position `i` in a fresh allocation: for building
    /// raw chains whose buffers lie in guest memory.
    pub fn scratch(&self, queue: usize, i: u16) -> u64 {
        self.queues[queue].slot(i)
    }

    /// Queues one frame for transmission: a zeroed virtio-net header, then `frame` split into
    /// `pieces` descriptors (the header travels in the first), or through an indirect table.
    pub fn send(&mut self, frame: &[u8], pieces: usize, indirect: bool) -> Result<()> {
        self.send_with_header(&[0u8; VNET_HDR_LEN], frame, pieces, indirect)
    }

    /// [`VirtioNetFrontend::send`] with the virtio-net header given (offload requests).
    pub fn send_with_header(
        &mut self,
        header: &[u8; VNET_HDR_LEN],
        frame: &[u8],
        pieces: usize,
        indirect: bool,
    ) -> Result<()> {
        self.tx_template = None;
        let mut data = header.to_vec();
        data.extend_from_slice(frame);
        let pieces = pieces.clamp(1, 16);
        let chunk = data.len().div_ceil(pieces);
        let parts: Vec<&[u8]> = data.chunks(chunk.max(1)).collect();
        if !indirect && chunk as u64 > self.queues[TX_QUEUE].slot_len {
            // Each piece is written at its descriptor's slot: a longer one would run into
            // the next slot and overwrite the piece there.
            bail!(
                "pieces of {chunk} bytes do not fit data slots of {} bytes",
                self.queues[TX_QUEUE].slot_len
            );
        }
        if indirect {
            let head = self.alloc(TX_QUEUE, 1)?[0];
            let base = self.queues[TX_QUEUE].slot(head);
            let table = base;
            let mut at = base + 16 * parts.len() as u64;
            for (i, p) in parts.iter().enumerate() {
                self.mem.write_slice(p, GuestAddress(at))?;
                let more = i + 1 < parts.len();
                let d = RawDesc {
                    addr: at,
                    len: p.len() as u32,
                    flags: if more { VRING_DESC_F_NEXT } else { 0 },
                    next: (i + 1) as u16,
                };
                self.mem
                    .write_slice(&d.to_bytes(), GuestAddress(table + 16 * i as u64))?;
                at += p.len() as u64;
            }
            if at - base > self.queues[TX_QUEUE].slot_len {
                bail!("frame too large for an indirect slot");
            }
            self.write_desc(
                TX_QUEUE,
                head,
                RawDesc {
                    addr: table,
                    len: 16 * parts.len() as u32,
                    flags: VRING_DESC_F_INDIRECT,
                    next: 0,
                },
            )?;
            self.set_chain(TX_QUEUE, &[head]);
            self.publish(TX_QUEUE, head)
        } else {
            let idx = self.alloc(TX_QUEUE, parts.len())?;
            for (i, p) in parts.iter().enumerate() {
                let addr = self.queues[TX_QUEUE].slot(idx[i]);
                self.mem.write_slice(p, GuestAddress(addr))?;
                let more = i + 1 < parts.len();
                let next = if more { idx[i + 1] } else { 0 };
                self.write_desc(
                    TX_QUEUE,
                    idx[i],
                    RawDesc {
                        addr,
                        len: p.len() as u32,
                        flags: if more { VRING_DESC_F_NEXT } else { 0 },
                        next,
                    },
                )?;
            }
            self.set_chain(TX_QUEUE, &idx);
            self.publish(TX_QUEUE, idx[0])
        }
    }

    /// Receives up to `count` frames within `timeout` (net header stripped), then posts fresh
    /// receive buffers of `len` bytes in the freed descriptors, `most` at a time.
    pub fn recv_and_repost(
        &mut self,
        count: usize,
        timeout: Duration,
        len: u32,
        most: usize,
    ) -> Result<Vec<Vec<u8>>> {
        let got = self
            .recv_frames(count, timeout)?
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        self.post_rx_buffers(self.free_descriptors(RX_QUEUE).min(most), len)?;
        Ok(got)
    }

    /// Sends `frame` in `pieces` descriptors, kicks, and waits until the device used the chain.
    pub fn send_and_wait(&mut self, frame: &[u8], pieces: usize, timeout: Duration) -> Result<()> {
        self.send(frame, pieces, false)?;
        self.kick(TX_QUEUE)?;
        if self.wait_tx_used(1, timeout)? != 1 {
            bail!("the device did not use the tx chain");
        }
        Ok(())
    }

    /// Used entries the device has returned since the last call, their descriptors freed.
    pub fn take_used(&mut self, queue: usize) -> Result<Vec<Used>> {
        let mut out = Vec::new();
        self.for_each_used(queue, |u| out.push(u))?;
        Ok(out)
    }

    /// Frees the descriptors of every returned chain and says how many there were.
    pub fn reclaim_used(&mut self, queue: usize) -> Result<usize> {
        self.for_each_used(queue, |_| {})
    }

    fn for_each_used(&mut self, queue: usize, mut each: impl FnMut(Used)) -> Result<usize> {
        let (used, size) = (self.queues[queue].used, self.queues[queue].size);
        let idx: u16 = self.mem.load(GuestAddress(used + 2), Ordering::Acquire)?;
        let pending = idx.wrapping_sub(self.queues[queue].last_used) as usize;
        if pending > size as usize {
            bail!("device's used index moved {pending} entries on a ring of {size}");
        }
        let mut n = 0;
        let mut raw = [0u8; 8 * 64];
        while n < pending {
            // Read used entries in runs that do not wrap, 64 at a time.
            let start = self.queues[queue].last_used % size;
            let run = (pending - n).min((size - start) as usize).min(64);
            self.mem.read_slice(
                &mut raw[..8 * run],
                GuestAddress(used + 4 + 8 * start as u64),
            )?;
            for e in raw[..8 * run].chunks_exact(8) {
                let head = u32::from_le_bytes(e[0..4].try_into().unwrap());
                let len = u32::from_le_bytes(e[4..8].try_into().unwrap());
                if head >= size as u32 {
                    bail!("device returned head {head} outside the ring");
                }
                let DriverQueue {
                    chains,
                    free,
                    last_used,
                    ..
                } = &mut self.queues[queue];
                let chain = &mut chains[head as usize];
                if chain.is_empty() {
                    bail!("device returned head {head} that was not in flight");
                }
                free.append(chain);
                *last_used = last_used.wrapping_add(1);
                each(Used {
                    head: head as u16,
                    len,
                });
            }
            n += run;
        }
        if n > 0 && self.arm_on_reclaim && self.has(VIRTIO_RING_F_EVENT_IDX) {
            let next = self.queues[queue].last_used;
            self.set_used_event(queue, next)?;
        }
        Ok(n)
    }

    /// Pushes `heads` into the avail ring in runs that do not wrap, one write each.
    fn push_avail_many(&mut self, queue: usize, heads: &[u16]) -> Result<()> {
        let mut done = 0;
        let mut raw = [0u8; 2 * 64];
        while done < heads.len() {
            let q = &self.queues[queue];
            let start = q.avail_idx % q.size;
            let run = (heads.len() - done).min((q.size - start) as usize).min(64);
            for (i, h) in heads[done..done + run].iter().enumerate() {
                raw[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
            }
            self.mem.write_slice(
                &raw[..2 * run],
                GuestAddress(q.avail + 4 + 2 * start as u64),
            )?;
            let q = &mut self.queues[queue];
            q.avail_idx = q.avail_idx.wrapping_add(run as u16);
            done += run;
        }
        Ok(())
    }

    /// Writes a virtio-net header and `frame` into every tx data slot and points each tx
    /// descriptor at its slot, so [`VirtioNetFrontend::post_tx_template`] only has to publish
    /// heads: a guest side cheap enough to measure a datapath with.
    pub fn prepare_tx_template(&mut self, frame: &[u8]) -> Result<()> {
        let len = VNET_HDR_LEN + frame.len();
        if len as u64 > self.queues[TX_QUEUE].slot_len {
            bail!("frame too large for a slot");
        }
        let mut data = vec![0u8; VNET_HDR_LEN];
        data.extend_from_slice(frame);
        for i in 0..self.queues[TX_QUEUE].size {
            let addr = self.queues[TX_QUEUE].slot(i);
            self.mem.write_slice(&data, GuestAddress(addr))?;
            self.write_desc(
                TX_QUEUE,
                i,
                RawDesc {
                    addr,
                    len: len as u32,
                    flags: 0,
                    next: 0,
                },
            )?;
        }
        self.tx_template = Some(len as u32);
        Ok(())
    }

    /// Queues up to `n` copies of the template frame (as many as descriptors are free) and
    /// returns how many.
    pub fn post_tx_template(&mut self, n: usize) -> Result<usize> {
        if self.tx_template.is_none() {
            bail!("no tx template prepared");
        }
        let n = n.min(self.queues[TX_QUEUE].free.len());
        let mut heads = std::mem::take(&mut self.scratch_heads);
        heads.clear();
        for _ in 0..n {
            let idx = self.queues[TX_QUEUE].free.pop().unwrap();
            self.set_chain(TX_QUEUE, &[idx]);
            heads.push(idx);
        }
        let pushed = self.push_avail_many(TX_QUEUE, &heads);
        self.scratch_heads = heads;
        pushed?;
        if n > 0 {
            self.commit_avail(TX_QUEUE)?;
        }
        Ok(n)
    }

    /// Switches to NAPI-style notifications, as a loaded Linux virtio-net driver behaves:
    /// while it polls, the device's notifications stay off (no used_event re-armed, or
    /// VRING_AVAIL_F_NO_INTERRUPT set without EVENT_IDX); [`Self::napi_wait`] turns them on
    /// only for as long as the driver sleeps.
    pub fn set_napi_mode(&mut self) -> Result<()> {
        self.arm_on_reclaim = false;
        for q in 0..2 {
            self.disarm_call(q)?;
        }
        Ok(())
    }

    fn disarm_call(&mut self, queue: usize) -> Result<()> {
        if self.has(VIRTIO_RING_F_EVENT_IDX) {
            // An index the used ring has just passed: the device does not notify again until
            // it wraps around (Linux writes a similar stale value).
            let stale = self.queues[queue].last_used.wrapping_sub(1);
            self.set_used_event(queue, stale)
        } else {
            self.set_no_interrupt(queue, true)
        }
    }

    /// Sleeps until the device's notification on `queue` or `timeout`, in NAPI mode: arms the
    /// notification, re-checks the used ring (work that arrived meanwhile needs no sleep),
    /// waits, and disarms again. Returns whether work arrived.
    pub fn napi_wait(&mut self, queue: usize, timeout: Duration) -> Result<bool> {
        let last = self.queues[queue].last_used;
        if self.has(VIRTIO_RING_F_EVENT_IDX) {
            self.set_used_event(queue, last)?;
        } else {
            self.set_no_interrupt(queue, false)?;
        }
        // The arming is visible before the used index is read again (virtio 2.7.7.2).
        std::sync::atomic::fence(Ordering::SeqCst);
        let idx: u16 = self
            .mem
            .load(GuestAddress(self.queues[queue].used + 2), Ordering::Acquire)?;
        let woke = idx != last || self.wait_call(queue, timeout);
        self.disarm_call(queue)?;
        Ok(woke)
    }

    /// Fills `queue`'s call eventfd to its limit (0xffff_ffff_ffff_fffe), as a driver that
    /// never reads it would: a blocking write by the device would then never return.
    pub fn saturate_call(&self, queue: usize) -> Result<()> {
        self.queues[queue]
            .call
            .write(u64::MAX - 1)
            .context("saturating the call eventfd")
    }

    /// Waits for the device's notification on `queue` or `timeout`, whichever comes first.
    /// Returns whether a notification arrived.
    pub fn wait_call(&self, queue: usize, timeout: Duration) -> bool {
        wait_eventfd(&self.queues[queue].call, timeout)
    }

    /// Waits for the device to signal `queue`'s error eventfd (it stopped the queue), or
    /// `timeout`. Returns whether it did.
    pub fn wait_error(&self, queue: usize, timeout: Duration) -> bool {
        wait_eventfd(&self.queues[queue].err, timeout)
    }

    /// Asks the backend to announce `mac` (`VHOST_USER_SEND_RARP`), as QEMU does after a
    /// migration for a guest without GUEST_ANNOUNCE: the MAC in a u64, waiting for the ack
    /// when REPLY_ACK was negotiated.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        const SEND_RARP: u32 = 19;
        let flags = 0x1 | if self.reply_ack { 0x8 } else { 0 };
        let mut msg = Vec::with_capacity(20);
        msg.extend_from_slice(&SEND_RARP.to_le_bytes());
        msg.extend_from_slice(&u32::to_le_bytes(flags));
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&mac);
        msg.extend_from_slice(&[0, 0]);
        self.raw.write_all(&msg).context("SEND_RARP")?;
        if self.reply_ack {
            let mut reply = [0u8; 20];
            self.raw.read_exact(&mut reply).context("SEND_RARP's ack")?;
            if reply[12..20] != [0; 8] {
                bail!("the backend refused SEND_RARP");
            }
        }
        Ok(())
    }

    /// Starts a migration's dirty logging as QEMU does (`vhost_migration_log`): a log of one
    /// bit per 4 KiB page of guest memory in a memfd (SET_LOG_BASE), then the features again
    /// with VHOST_F_LOG_ALL, then each ring's log flag and address (SET_VRING_ADDR).
    pub fn start_dirty_log(&mut self) -> Result<()> {
        self.share_dirty_log()?;
        self.set_log_all(true)?;
        self.set_rings_log(true)
    }

    /// Shares a fresh dirty log covering every guest address up to the end of the highest
    /// region (SET_LOG_BASE), as QEMU does when it starts logging or resizes the log; the
    /// log the backend had before is no longer read.
    pub fn grow_dirty_log(&mut self) -> Result<()> {
        self.share_dirty_log()
    }

    fn share_dirty_log(&mut self) -> Result<()> {
        let end = self.mem.last_addr().0 + 1;
        let log_len = end.div_ceil(DIRTY_LOG_PAGE).div_ceil(8).next_multiple_of(8);
        let file = memfd(log_len, true)?;
        self.frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: log_len,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .context("SET_LOG_BASE")?;
        self.dirty_log = Some(file);
        Ok(())
    }

    /// Adds `len` bytes of guest memory at guest address `at` (a memfd of its own) and sends
    /// the whole memory table again (SET_MEM_TABLE), as QEMU does when memory is plugged in.
    /// While logging, QEMU first shares a log large enough for the new memory
    /// (`vhost_commit` grows the log before it sends the table); `log_first: false` sends
    /// the table alone, leaving the log as it was.
    pub fn add_memory_region(&mut self, at: u64, len: u64, log_first: bool) -> Result<()> {
        let file = memfd(len, true)?;
        let region = vm_memory::GuestRegionMmap::new(
            vm_memory::MmapRegion::from_file(FileOffset::new(file, 0), len as usize)
                .context("mapping the new memory")?,
            GuestAddress(at),
        )
        .context("the new region")?;
        self.mem = self
            .mem
            .insert_region(std::sync::Arc::new(region))
            .context("adding the region")?;
        if log_first {
            self.share_dirty_log()?;
        }
        let regions = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .context("memory regions")?;
        self.frontend
            .set_mem_table(&regions)
            .context("SET_MEM_TABLE")?;
        Ok(())
    }

    /// Ends logging (the features again without VHOST_F_LOG_ALL), as QEMU does when a
    /// migration completes or is cancelled.
    pub fn stop_dirty_log(&mut self) -> Result<()> {
        self.set_log_all(false)?;
        self.set_rings_log(false)
    }

    fn set_log_all(&mut self, on: bool) -> Result<()> {
        let log_all = if on { 1 << VHOST_F_LOG_ALL } else { 0 };
        self.frontend
            .set_features(
                self.features | log_all | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            )
            .context("SET_FEATURES")
    }

    /// The guest page numbers the dirty log marks.
    pub fn dirty_pages(&self) -> Result<Vec<u64>> {
        let file = self.dirty_log.as_ref().context("no dirty log started")?;
        let mut bits = Vec::new();
        (&*file).seek(SeekFrom::Start(0))?;
        (&*file).read_to_end(&mut bits)?;
        Ok(bits
            .iter()
            .enumerate()
            .flat_map(|(i, &b)| {
                (0..8)
                    .filter(move |k| b & (1 << k) != 0)
                    .map(move |k| (i * 8 + k) as u64)
            })
            .collect())
    }

    /// Clears the dirty log, as QEMU does after each copying pass.
    pub fn clear_dirty_log(&self) -> Result<()> {
        let file = self.dirty_log.as_ref().context("no dirty log started")?;
        let len = file.metadata()?.len();
        (&*file).seek(SeekFrom::Start(0))?;
        (&*file).write_all(&vec![0u8; len as usize])?;
        Ok(())
    }

    /// Guest address of receive buffer `head` (its data slot).
    pub fn rx_buffer_addr(&self, head: u16) -> u64 {
        self.queues[RX_QUEUE].slot(head)
    }

    /// Guest address and length of `queue`'s used ring (flags, index, entries, avail_event).
    pub fn used_ring(&self, queue: usize) -> (u64, u64) {
        let q = &self.queues[queue];
        (q.used, 6 + 8 * u64::from(q.size))
    }

    /// Bytes the device wrote into receive buffer `head`.
    pub fn rx_bytes(&self, u: Used) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; u.len as usize];
        self.mem
            .read_slice(&mut buf, GuestAddress(self.queues[RX_QUEUE].slot(u.head)))?;
        Ok(buf)
    }

    /// Receives frames (header stripped, merged buffers joined) until `count` arrived or
    /// `timeout` passed. Each item is (num_buffers from the header, frame).
    pub fn recv_frames(&mut self, count: usize, timeout: Duration) -> Result<Vec<(u16, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut pending: Option<(u16, u16, Vec<u8>)> = None; // (num_buffers, seen, data)
        while frames.len() < count {
            for u in self.take_used(RX_QUEUE)? {
                let bytes = self.rx_bytes(u)?;
                match pending.as_mut() {
                    Some((n, seen, data)) => {
                        data.extend_from_slice(&bytes);
                        *seen += 1;
                        if *seen == *n {
                            let (n, _, data) = pending.take().unwrap();
                            frames.push((n, data));
                        }
                    }
                    None => {
                        if bytes.len() < VNET_HDR_LEN {
                            bail!(
                                "device wrote {} bytes, less than a virtio-net header",
                                bytes.len()
                            );
                        }
                        let n = u16::from_le_bytes([bytes[10], bytes[11]]);
                        let data = bytes[VNET_HDR_LEN..].to_vec();
                        if n <= 1 || !self.has(VIRTIO_NET_F_MRG_RXBUF) {
                            frames.push((n, data));
                        } else {
                            pending = Some((n, 1, data));
                        }
                    }
                }
            }
            if frames.len() >= count {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.wait_call(RX_QUEUE, left.min(Duration::from_millis(50)));
        }
        Ok(frames)
    }

    /// Waits until the device has used `count` more tx chains, or `timeout`.
    pub fn wait_tx_used(&mut self, count: usize, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < count {
            done += self.take_used(TX_QUEUE)?.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if done >= count || left.is_zero() {
                break;
            }
            self.wait_call(TX_QUEUE, left.min(Duration::from_millis(50)));
        }
        Ok(done)
    }
}
