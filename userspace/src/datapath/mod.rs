//! The per-packet path: plain functions over guest memory and virtqueue state.
//!
//! Nothing here knows about sockets, threads or vhost-user: it depends on vm-memory,
//! virtio-queue and virtio-bindings alone (and on the vhost-user library's dirty-log bitmap,
//! which `dirty_log` wraps). The worker hands in a batch of frames (rx) or a
//! place to put them (tx), these functions walk the guest's descriptor chains, copy, and fill
//! the used ring; [`notify`] decides whether the driver wants to hear of it, and the caller
//! signals once per batch. That keeps every guest-controlled byte's handling unit-testable
//! with virtio-queue's mocks.
//!
//! - [`device`]: the virtio-net device model (features, config space, net header);
//! - `split_ring`: the avail ring and descriptor walk, used-ring publication;
//! - [`rx`], [`tx`]: frames into and out of the guest;
//! - [`zero_copy_rx`]: the guest's receive buffers posted to the kernel, for a port whose guest
//!   memory is its UMEM; [`zero_copy_tx`]: a guest's frame sent from where it lies, its
//!   checked headers from a slot of the daemon's own area;
//! - [`offload`]: checksum and segmentation offloads, checked and done in software;
//! - [`guest_memory`]: translated, bounds-checked access to guest RAM;
//! - [`dirty_log`]: the guest memory type, whose regions log the pages written during a
//!   live migration.

pub mod device;
pub mod dirty_log;
pub mod guest_memory;
pub mod notify;
pub mod offload;
pub mod rx;
mod split_ring;
pub mod tx;
pub mod zero_copy_rx;
pub mod zero_copy_tx;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestAddress;

pub use dirty_log::{DirtyLog, GuestMemory, GuestRegion};
pub use guest_memory::{GuestMemoryCursor, OutOfGuestMemory};

/// A guest mistake that makes a queue unusable until the device is reset: the worker marks
/// the queue broken, signals its error eventfd and counts it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("avail ring index is more than a queue ahead of the device")]
    AvailIndex,
    #[error("descriptor chain at head {head}: {why}")]
    Malformed { head: u16, why: Malformed },
    #[error("descriptor chain at head {head}: {source}")]
    OutOfMemory { head: u16, source: OutOfGuestMemory },
}

/// How a descriptor chain (or the ring around it) breaks the virtio rules: one list for
/// every walker, so a guest's mistake reads the same whichever path met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("device-readable buffer in a receive chain")]
    ReadableInReceiveChain,
    #[error("device-writable buffer in a transmit chain")]
    WritableInTransmitChain,
    #[error("chain has no usable descriptor")]
    NoUsableDescriptor,
    #[error("chain has more descriptors than the queue has entries")]
    ChainTooLong,
    #[error("chain loops, outruns its table or nests indirect tables")]
    Loop,
    #[error("descriptor index outside its table")]
    IndexOutsideTable,
    #[error("descriptor table is unreadable")]
    TableUnreadable,
    #[error("indirect table length is not a whole number of descriptors")]
    IndirectTableLength,
    #[error("receive buffer smaller than the net header")]
    BufferSmallerThanHeader,
    #[error("used ring is outside guest memory")]
    UsedRingOutsideMemory,
}

impl Malformed {
    /// A buffer whose direction does not fit the queue's (`writable`: a receive queue).
    fn wrong_direction(writable: bool) -> Self {
        if writable {
            Malformed::ReadableInReceiveChain
        } else {
            Malformed::WritableInTransmitChain
        }
    }
}

/// One buffer of a descriptor chain: guest address and length.
pub type Segment = (GuestAddress, u32);

/// Collects a chain's buffers into `segs`, requiring all of them to be device-writable (rx)
/// or all device-readable (tx), and at most `max_descriptors` of them (the queue's size,
/// virtio 2.7.5.3.1; an indirect table's length is the guest's to choose, up to 65536
/// entries for virtio-queue). Zero-length buffers are skipped. Returns the total length.
///
/// virtio-queue's iterator ends silently on a loop, a `next` outside the table or a bad
/// indirect table; such a chain always ends on a descriptor that still says NEXT, or yields
/// nothing at all, which is how they are told apart from a proper end.
pub(crate) fn collect_segments(
    chain: DescriptorChain<&GuestMemory>,
    writable: bool,
    max_descriptors: u16,
    segs: &mut Vec<Segment>,
) -> Result<u64, QueueError> {
    let head = chain.head_index();
    segs.clear();
    let mut total = 0u64;
    let mut last: Option<Descriptor> = None;
    for (i, desc) in chain.enumerate() {
        if i >= usize::from(max_descriptors) {
            return Err(QueueError::Malformed {
                head,
                why: Malformed::ChainTooLong,
            });
        }
        if desc.is_write_only() != writable {
            let why = Malformed::wrong_direction(writable);
            return Err(QueueError::Malformed { head, why });
        }
        if desc.len() > 0 {
            segs.push((desc.addr(), desc.len()));
            total += u64::from(desc.len());
        }
        last = Some(desc);
    }
    match last {
        None => Err(QueueError::Malformed {
            head,
            why: Malformed::NoUsableDescriptor,
        }),
        Some(d) if d.has_next() => Err(QueueError::Malformed {
            head,
            why: Malformed::Loop,
        }),
        Some(_) => Ok(total),
    }
}

/// Writes `data` at byte `offset` of the buffer the segments form; returns the bytes that fit.
pub(crate) fn write_at(
    cursor: &mut GuestMemoryCursor<'_>,
    segs: &[Segment],
    offset: usize,
    data: &[u8],
) -> Result<usize, OutOfGuestMemory> {
    let mut seg_start = 0usize;
    let mut done = 0usize;
    for &(addr, len) in segs {
        let len = len as usize;
        let pos = offset + done;
        if done == data.len() {
            break;
        }
        if pos < seg_start + len {
            let in_seg = pos - seg_start;
            let n = (len - in_seg).min(data.len() - done);
            cursor.write(GuestAddress(addr.0 + in_seg as u64), &data[done..done + n])?;
            done += n;
        }
        seg_start += len;
    }
    Ok(done)
}

/// Fills `out` from byte `offset` of the buffer the segments form; returns the bytes read.
pub(crate) fn read_at(
    cursor: &mut GuestMemoryCursor<'_>,
    segs: &[Segment],
    offset: usize,
    out: &mut [u8],
) -> Result<usize, OutOfGuestMemory> {
    let mut seg_start = 0usize;
    let mut done = 0usize;
    for &(addr, len) in segs {
        let len = len as usize;
        let pos = offset + done;
        if done == out.len() {
            break;
        }
        if pos < seg_start + len {
            let in_seg = pos - seg_start;
            let n = (len - in_seg).min(out.len() - done);
            cursor.read(
                GuestAddress(addr.0 + in_seg as u64),
                &mut out[done..done + n],
            )?;
            done += n;
        }
        seg_start += len;
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Guest memory and queues for the datapath tests, on virtio-queue's mock split queue.
    use super::GuestMemory;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    /// TCP frames built by etherparse, an implementation independent of the datapath's.
    pub mod packets {
        use etherparse::{
            IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6FlowLabel,
            Ipv6Header, PacketBuilder, TcpHeader,
        };

        const SRC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
        const DST: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

        #[derive(Clone, Copy)]
        pub struct Flow {
            pub ipv6: bool,
            pub seq: u32,
            pub id: u16,
            pub fin: bool,
            pub psh: bool,
            pub cwr: bool,
            pub ip_options: bool,
            pub tcp_options: bool,
            pub sport: u16,
        }

        impl Default for Flow {
            fn default() -> Self {
                Flow {
                    ipv6: false,
                    seq: 0xffff_f000, // wraps inside the frame
                    id: 0xfffe,       // wraps too
                    fin: false,
                    psh: true,
                    cwr: false,
                    ip_options: false,
                    tcp_options: true,
                    sport: 40000,
                }
            }
        }

        pub fn payload(len: usize) -> Vec<u8> {
            (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
        }

        /// The frame etherparse builds for `data` with the flow's headers at sequence `seq`, id `id`.
        pub fn build(
            f: &Flow,
            seq: u32,
            id: u16,
            fin: bool,
            psh: bool,
            cwr: bool,
            data: &[u8],
        ) -> Vec<u8> {
            let mut tcp = TcpHeader::new(f.sport, 5201, seq, 64240);
            tcp.ack = true;
            tcp.acknowledgment_number = 0x1234_5678;
            tcp.fin = fin;
            tcp.psh = psh;
            tcp.cwr = cwr;
            if f.tcp_options {
                // NOP NOP timestamp(10): 12 bytes, as Linux sends.
                tcp.set_options_raw(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2])
                    .unwrap();
            }
            let ip = if f.ipv6 {
                let h = Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::try_new(0x12345).unwrap(),
                    payload_length: 0,
                    next_header: IpNumber::TCP,
                    hop_limit: 64,
                    source: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                    destination: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                };
                IpHeaders::Ipv6(h, Ipv6Extensions::default())
            } else {
                let mut h =
                    Ipv4Header::new(0, 64, IpNumber::TCP, [10, 0, 0, 1], [10, 0, 0, 2]).unwrap();
                h.identification = id;
                h.dont_fragment = true;
                if f.ip_options {
                    h.options = etherparse::Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
                }
                IpHeaders::Ipv4(h, Ipv4Extensions::default())
            };
            let builder = PacketBuilder::ethernet2(SRC, DST).ip(ip).tcp_header(tcp);
            let mut out = Vec::with_capacity(builder.size(data.len()));
            builder.write(&mut out, data).unwrap();
            out
        }
    }

    pub const QUEUE_SIZE: u16 = 16;
    pub const MEM_SIZE: usize = 0x10_0000;
    /// Where test buffers start, past the rings.
    pub const BUF_BASE: u64 = 0x1_0000;

    pub fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A guest buffer: address, length, device-writable.
    #[derive(Clone, Copy)]
    pub struct Buf(pub u64, pub u32, pub bool);

    /// A driver's side of one split queue: posts chains, reads the used ring.
    pub struct TestQueue<'a> {
        pub mem: &'a GuestMemory,
        pub mock: MockSplitQueue<'a, GuestMemory>,
        next_desc: u16,
    }

    impl<'a> TestQueue<'a> {
        pub fn new(mem: &'a GuestMemory) -> Self {
            TestQueue {
                mem,
                mock: MockSplitQueue::new(mem, QUEUE_SIZE),
                next_desc: 0,
            }
        }

        /// The device's view of the queue.
        pub fn queue(&self) -> Queue {
            let mut q: Queue = self.mock.create_queue().unwrap();
            q.set_event_idx(false);
            q
        }

        fn store(&mut self, d: (u64, u32, u16, u16)) -> u16 {
            let i = self.next_desc;
            let raw = RawDescriptor::from(SplitDescriptor::new(d.0, d.1, d.2, d.3));
            self.mock.desc_table().store(i, raw).unwrap();
            self.next_desc += 1;
            i
        }

        fn publish(&self, head: u16) {
            let avail = self.mock.avail_addr();
            let idx: u16 = self.mem.read_obj(GuestAddress(avail.0 + 2)).unwrap();
            self.mem
                .write_obj(
                    head,
                    GuestAddress(avail.0 + 4 + 2 * u64::from(idx % QUEUE_SIZE)),
                )
                .unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(avail.0 + 2))
                .unwrap();
        }

        /// Posts a chain of buffers; returns its head index.
        pub fn post(&mut self, chain: &[Buf]) -> u16 {
            let head = self.next_desc;
            for (i, b) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let mut flags = if b.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.store((b.0, b.1, flags, if last { 0 } else { head + i as u16 + 1 }));
            }
            self.publish(head);
            head
        }

        /// Posts raw descriptors (addr, len, flags, next) as they are; the first is the head.
        pub fn post_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
            let head = self.next_desc;
            for d in descs {
                self.store(*d);
            }
            self.publish(head);
            head
        }

        /// Writes an indirect table at `table` and posts one head descriptor pointing at it.
        pub fn post_indirect(&mut self, table: u64, bufs: &[Buf]) -> u16 {
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let mut flags = if b.2 { VRING_DESC_F_WRITE as u16 } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let d = RawDescriptor::from(SplitDescriptor::new(
                    b.0,
                    b.1,
                    flags,
                    if last { 0 } else { i as u16 + 1 },
                ));
                self.mem
                    .write_obj(d, GuestAddress(table + 16 * i as u64))
                    .unwrap();
            }
            self.post_raw(&[(
                table,
                16 * bufs.len() as u32,
                VRING_DESC_F_INDIRECT as u16,
                0,
            )])
        }

        /// The used ring entries (id, len) from position `from` on.
        pub fn used(&self, from: u16) -> Vec<(u32, u32)> {
            let used = self.mock.used_addr();
            let idx: u16 = self.mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
            (from..idx)
                .map(|i| {
                    let e = GuestAddress(used.0 + 4 + 8 * u64::from(i % QUEUE_SIZE));
                    let id: u32 = self.mem.read_obj(e).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(e.0 + 4)).unwrap();
                    (id, len)
                })
                .collect()
        }

        pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        pub fn write(&self, addr: u64, data: &[u8]) {
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        }
    }
}
