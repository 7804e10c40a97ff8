//! What the kernel does with a guest's RAM file registered as an AF_XDP UMEM, measured on the
//! running kernel rather than assumed: registration of a memfd (and a hugetlb memfd) mapping in
//! unaligned chunk mode, what it costs against RLIMIT_MEMLOCK, where a received frame lands
//! relative to its fill address and what else is written, chunks across page boundaries, and
//! what happens to frames longer than the layout allows and to fill addresses outside the file,
//! and what closing a registration stops (a ring stop or reconnect must).
//!
//! No daemon: the daemon's XDP program steers frames for one MAC into one AF_XDP socket bound
//! to a veth in copy mode, with [`GuestUmem`] as its UMEM, and a raw socket on the wire end
//! sends the frames. Needs root (namespaces, XDP) and `XVDPA_EBPF_OBJECT`.

use std::num::NonZeroU32;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, User};
use xvdpa::mac::MacAddr;
use xvdpa::nic::steering::{Steering, XdpModeChoice};
use xvdpa::nic::xsk::guest_umem::{split_rx_addr, GuestUmem, GuestUmemError, GuestUmemLayout};
use xvdpa_tests::frontend::memfd;
use xvdpa_tests::lab::{Lab, NIC};
use xvdpa_tests::netns::{ifindex, in_netns};
use xvdpa_tests::wire::WireSocket;

/// The guest's MAC, which the XDP program steers to the socket.
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x01];
/// What guest memory holds before any frame arrives; frames never contain this byte.
const PATTERN: u8 = 0xa5;
const PAGE: u64 = 4096;
/// The largest untagged frame at MTU 1500 plus a VLAN tag.
const MAX_FRAME: u32 = 1518;
const WAIT: Duration = Duration::from_secs(3);

/// Tests here change process-wide state (RLIMIT_MEMLOCK) and XDP on their own labs: one at a
/// time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The XDP object, copied to 8-byte alignment as the ELF parser wants it.
struct XdpObject {
    words: Vec<u64>,
    len: usize,
}

impl XdpObject {
    fn load() -> Result<Self> {
        let path = std::env::var("XVDPA_EBPF_OBJECT").context("XVDPA_EBPF_OBJECT not set")?;
        let bytes = std::fs::read(&path).with_context(|| path.clone())?;
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                u64::from_ne_bytes(b)
            })
            .collect();
        Ok(XdpObject {
            words,
            len: bytes.len(),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` is a live slice of u64s holding at least `len` bytes, and any byte
        // pattern is a valid u8.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// A test frame of `len` bytes to the guest, none of whose bytes is [`PATTERN`].
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed & 0x7f]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((f.len()..len).map(|i| ((i as u8) ^ seed) & 0x7f));
    f.truncate(len);
    f
}

/// A guest memory file of `len` bytes filled with [`PATTERN`].
fn guest_memory(len: u64) -> Result<std::fs::File> {
    let file = memfd(len, true)?;
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![PATTERN; len as usize], 0)?;
    Ok(file)
}

/// One receive descriptor as the kernel wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RxDesc {
    addr: u64,
    len: u32,
}

/// What one run saw.
#[derive(Debug)]
struct Received {
    descs: Vec<RxDesc>,
    /// The guest memory file's bytes afterwards.
    memory: Vec<u8>,
    rx_dropped: u64,
    rx_invalid: u64,
    fill_empty: u64,
    /// Fill entries the kernel had not consumed at the end.
    fill_left: u32,
}

/// A copy-mode AF_XDP socket on the lab's NIC queue 0 whose UMEM is a guest memory file, with
/// [`GUEST_MAC`] steered to it, and the wire to send from.
struct Rig {
    // Field order is drop order: rings and socket before the UMEM.
    device: DeviceQueue,
    rx: RingRx,
    /// With [`with_tx_rig`]: a tx ring, bound for multi-buffer frames.
    tx: Option<RingTx>,
    user: User,
    umem: GuestUmem,
    wire: WireSocket,
}

fn errno(what: &'static str) -> impl Fn(xdpilone::Errno) -> anyhow::Error {
    move |e| anyhow::anyhow!("AF_XDP {what}: errno {}", e.get_raw())
}

impl Rig {
    /// Puts `addrs` on the fill ring.
    fn fill(&mut self, addrs: &[u64]) -> Result<()> {
        fill_ring(&mut self.device, addrs)
    }

    fn send(&self, frames: &[Vec<u8>]) -> Result<()> {
        for f in frames {
            self.wire.send(f)?;
        }
        Ok(())
    }

    /// `expect` receive descriptors, or what came within [`WAIT`].
    fn recv(&mut self, expect: usize) -> Vec<RxDesc> {
        recv_descs(&mut self.rx, expect)
    }
}

/// Puts `addrs` on `device`'s fill ring, all of them or an error.
fn fill_ring(device: &mut DeviceQueue, addrs: &[u64]) -> Result<()> {
    let mut w = device.fill(addrs.len() as u32);
    let n = w.insert(addrs.iter().copied());
    w.commit();
    ensure!(
        n as usize == addrs.len(),
        "fill ring took {n} of {}",
        addrs.len()
    );
    Ok(())
}

/// `expect` receive descriptors from `rx`, or what came within [`WAIT`].
fn recv_descs(rx: &mut RingRx, expect: usize) -> Vec<RxDesc> {
    let mut descs = Vec::new();
    let deadline = Instant::now() + WAIT;
    while descs.len() < expect && Instant::now() < deadline {
        let mut r = rx.receive(64);
        while let Some(d) = r.read() {
            descs.push(RxDesc {
                addr: d.addr,
                len: d.len,
            });
        }
        r.release();
        std::thread::sleep(Duration::from_millis(5));
    }
    descs
}

/// Registers `file` (`len` bytes) as a UMEM with `layout`, binds a copy-mode socket on the
/// lab's NIC queue 0, steers [`GUEST_MAC`] to it and runs `body` with it, in the lab's host
/// namespace.
fn with_rig<T: Send + 'static>(
    lab: &Lab,
    file: std::fs::File,
    len: u64,
    layout: GuestUmemLayout,
    body: impl FnOnce(&mut Rig) -> Result<T> + Send + 'static,
) -> Result<T> {
    rig(lab, file, len, None, layout, XdpModeChoice::Auto, body)
}

/// [`with_rig`] with `own_len` bytes of daemon-owned memory after the file in the UMEM, and
/// a tx ring bound for multi-buffer frames (`XDP_USE_SG`).
fn with_tx_rig<T: Send + 'static>(
    lab: &Lab,
    file: std::fs::File,
    len: u64,
    own_len: usize,
    layout: GuestUmemLayout,
    body: impl FnOnce(&mut Rig) -> Result<T> + Send + 'static,
) -> Result<T> {
    rig(
        lab,
        file,
        len,
        Some(own_len),
        layout,
        XdpModeChoice::Auto,
        body,
    )
}

/// `XDP_USE_SG` in the bind flags; `XDP_PKT_CONTD` in a descriptor's options.
const XDP_USE_SG: u16 = 1 << 4;
const XDP_PKT_CONTD: u32 = 1;

/// A copy-mode socket on the lab's NIC queue 0 (in the calling thread's namespace) with
/// `umem`'s fill and completion rings, an rx ring and, with `tx`, a tx ring for multi-buffer
/// frames; not yet bound.
fn open_socket(umem: &GuestUmem, tx: bool) -> Result<(DeviceQueue, User)> {
    let mut info = IfInfo::invalid();
    info.from_ifindex(ifindex(NIC)?)
        .map_err(errno("interface"))?;
    info.set_queue(0);
    let sock = Socket::with_shared(&info, umem.xdp()).map_err(errno("socket"))?;
    let device = umem.xdp().fq_cq(&sock).map_err(errno("fill ring"))?;
    let user = umem
        .xdp()
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: NonZeroU32::new(64),
                tx_size: NonZeroU32::new(64).filter(|_| tx),
                bind_flags: SocketConfig::XDP_BIND_COPY | if tx { XDP_USE_SG } else { 0 },
            },
        )
        .map_err(errno("rx ring"))?;
    Ok((device, user))
}

fn rig<T: Send + 'static>(
    lab: &Lab,
    file: std::fs::File,
    len: u64,
    tx_own_len: Option<usize>,
    layout: GuestUmemLayout,
    xdp_mode: XdpModeChoice,
    body: impl FnOnce(&mut Rig) -> Result<T> + Send + 'static,
) -> Result<T> {
    let wire = WireSocket::open(lab)?;
    let object = XdpObject::load()?;
    in_netns(&lab.host_ns, move || {
        let run = || -> Result<T> {
            let own_len = tx_own_len.unwrap_or(0);
            let umem =
                GuestUmem::register_with_own_area(file.as_fd(), len, own_len, layout, 64, 64)?;
            let (device, user) = open_socket(&umem, tx_own_len.is_some())?;
            let rx = user.map_rx().map_err(errno("rx ring mapping"))?;
            let tx = match tx_own_len {
                Some(_) => Some(user.map_tx().map_err(errno("tx ring mapping"))?),
                None => None,
            };
            umem.xdp().bind(&user).map_err(errno("bind"))?;
            let (mut steering, _logger) = Steering::attach(object.bytes(), NIC, xdp_mode)?;
            steering.add_port(MacAddr(GUEST_MAC), None, 0)?;
            steering.bind_socket(0, 0, user.as_raw_fd())?;
            let mut rig = Rig {
                device,
                rx,
                tx,
                user,
                umem,
                wire,
            };
            let out = body(&mut rig);
            steering.detach();
            out
        };
        run().map_err(|e| std::io::Error::other(format!("{e:#}")))
    })
    .map_err(Into::into)
}

/// [`with_rig`] that posts `fill`, sends `frames` from the wire and collects `expect` receive
/// descriptors (or what came within [`WAIT`]), then the memory and counters.
fn receive(
    lab: &Lab,
    file: std::fs::File,
    len: u64,
    layout: GuestUmemLayout,
    fill: Vec<u64>,
    frames: Vec<Vec<u8>>,
    expect: usize,
) -> Result<Received> {
    with_rig(lab, file, len, layout, move |rig| {
        rig.fill(&fill)?;
        rig.send(&frames)?;
        let descs = rig.recv(expect);
        // Whatever else is coming has come by now.
        std::thread::sleep(Duration::from_millis(200));
        let stats = rig.user.statistics_v2().map_err(errno("statistics"))?;
        let mut memory = vec![0u8; len as usize];
        rig.umem.read(0, &mut memory).context("read back")?;
        Ok(Received {
            descs,
            memory,
            rx_dropped: stats.rx_dropped,
            rx_invalid: stats.rx_invalid_descs,
            fill_empty: stats.rx_fill_ring_empty_descs,
            fill_left: rig.device.pending(),
        })
    })
}

/// The ranges of `memory` that no longer hold [`PATTERN`].
fn changed(memory: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &b) in memory.iter().enumerate() {
        if b == PATTERN {
            continue;
        }
        let i = i as u64;
        match out.last_mut() {
            Some((_, end)) if *end == i => *end = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

#[test]
fn a_memfd_mapping_registers_as_an_unaligned_umem_within_one_page_chunks() -> Result<()> {
    let _s = serial();
    let len = 16 * PAGE;
    let file = guest_memory(len)?;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    assert_eq!(
        layout,
        GuestUmemLayout {
            chunk_size: 2048,
            headroom: 2048 - 256 - 1518
        }
    );
    GuestUmem::register(file.as_fd(), len, layout, 64, 64)?;
    // Unaligned chunks need not be powers of two...
    let odd = GuestUmemLayout {
        chunk_size: 3000,
        headroom: 0,
    };
    GuestUmem::register(file.as_fd(), len, odd, 64, 64)?;
    // ...but a chunk may not exceed a page, on small pages.
    let big = GuestUmemLayout {
        chunk_size: PAGE as u32 + 1,
        headroom: 0,
    };
    match GuestUmem::register(file.as_fd(), len, big, 64, 64) {
        Err(GuestUmemError::Register { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL), "{source}")
        }
        other => bail!("a chunk larger than a page: {:?}", other.map(|_| ())),
    }
    // A whole page is the largest chunk: frame + 256 bytes of kernel headroom.
    let whole_page = GuestUmemLayout::for_max_frame(PAGE as u32 - 256)?;
    assert_eq!((whole_page.chunk_size, whole_page.headroom), (4096, 0));
    GuestUmem::register(file.as_fd(), len, whole_page, 64, 64)?;
    assert!(GuestUmemLayout::for_max_frame(PAGE as u32 - 255).is_err());
    Ok(())
}

#[test]
fn a_received_frame_lands_at_the_fill_address_plus_256_plus_headroom_and_nothing_else_changes(
) -> Result<()> {
    let _s = serial();
    let lab = Lab::unique("gum")?;
    let len = 16 * PAGE;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let off = u64::from(layout.data_offset());
    assert_eq!(off, 256 + 274);
    // Two buffers: one at an odd address whose frame straddles a page boundary, one at 0.
    let odd = 3 * PAGE - off - 100 + 3;
    let frames = vec![frame(600, 1), frame(60, 2)];
    let got = receive(
        &lab,
        guest_memory(len)?,
        len,
        layout,
        vec![odd, 0],
        frames.clone(),
        2,
    )?;
    eprintln!("rx descriptors: {:#x?}", got.descs);
    eprintln!("bytes changed: {:#x?}", changed(&got.memory));
    ensure!(got.descs.len() == 2, "received {:?}", got.descs);
    // The descriptor names the fill address in its low 48 bits and the data's offset from it
    // (256 + headroom) in its high 16 bits.
    let placed: Vec<_> = got
        .descs
        .iter()
        .map(|d| (split_rx_addr(d.addr), d.len))
        .collect();
    assert_eq!(placed, vec![((odd, off), 600), ((0, off), 60)]);
    // Exactly the frames' bytes changed: nothing in front (no metadata), nothing behind.
    assert_eq!(
        changed(&got.memory),
        vec![(off, off + 60), (odd + off, odd + off + 600)]
    );
    let odd_data = (odd + off) as usize;
    assert_eq!(&got.memory[odd_data..odd_data + 600], &frames[0][..]);
    assert!(odd_data / PAGE as usize != (odd_data + 600) / PAGE as usize);
    assert_eq!(&got.memory[off as usize..off as usize + 60], &frames[1][..]);
    assert_eq!((got.rx_dropped, got.rx_invalid), (0, 0));
    Ok(())
}

#[test]
fn the_kernel_drops_a_frame_longer_than_the_layout_and_skips_fill_addresses_outside_the_file(
) -> Result<()> {
    let _s = serial();
    let lab = Lab::unique("gux")?;
    let len = 16 * PAGE;
    // A limit below the wire's MTU, so the wire can send a frame one byte longer.
    let max = 1000;
    let layout = GuestUmemLayout::for_max_frame(max)?;
    let off = u64::from(layout.data_offset());
    // First a fill address whose chunk runs past the file by one byte, then one that ends
    // exactly at the end of the file, then a spare one.
    let past = len - u64::from(layout.chunk_size) + 1;
    let last = len - u64::from(layout.chunk_size);
    let spare = 4 * PAGE;
    let frames = vec![frame(max as usize + 1, 3), frame(max as usize, 4)];
    let got = receive(
        &lab,
        guest_memory(len)?,
        len,
        layout,
        vec![past, last, spare],
        frames.clone(),
        1,
    )?;
    eprintln!("rx descriptors: {:#x?}", got.descs);
    eprintln!("bytes changed: {:#x?}", changed(&got.memory));
    eprintln!(
        "rx_dropped {} rx_invalid {} fill_empty {} fill_left {}",
        got.rx_dropped, got.rx_invalid, got.fill_empty, got.fill_left
    );
    // The long frame was dropped without touching memory; the next one took the first valid
    // fill address, which ends exactly at the end of the file, and its last byte is the file's.
    assert_eq!(got.rx_dropped, 1);
    assert_eq!(
        got.descs,
        vec![RxDesc {
            addr: last | off << 48,
            len: max
        }]
    );
    assert_eq!(changed(&got.memory), vec![(last + off, len)]);
    assert_eq!(&got.memory[(last + off) as usize..], &frames[1][..]);
    Ok(())
}

/// Runs `f` on a thread without `CAP_IPC_LOCK` in its effective set (capabilities are per
/// thread), under an RLIMIT_MEMLOCK of `limit` bytes for the process, restored afterwards.
fn without_ipc_lock<T: Send + 'static>(
    limit: u64,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    const CAP_VERSION_3: u32 = 0x2008_0522;
    const CAP_IPC_LOCK: u32 = 14;

    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a live struct.
    ensure!(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut old) } == 0);
    let low = libc::rlimit {
        rlim_cur: limit,
        rlim_max: old.rlim_max,
    };
    // SAFETY: setrlimit from a live struct; lowering the soft limit is always allowed.
    ensure!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &low) } == 0);
    let result = std::thread::spawn(move || -> Result<T> {
        // capget/capset version 3: a header (version, pid) and two (effective, permitted,
        // inheritable) triples of u32, low capability bits first.
        let mut header: [u32; 2] = [CAP_VERSION_3, 0];
        let mut data = [0u32; 6];
        // SAFETY: capget for this thread into a live header and two data triples, as version
        // 3 of the interface takes them.
        let rc = unsafe { libc::syscall(libc::SYS_capget, header.as_mut_ptr(), data.as_mut_ptr()) };
        ensure!(rc == 0, "capget: {}", std::io::Error::last_os_error());
        data[0] &= !(1 << CAP_IPC_LOCK);
        // SAFETY: capset for this thread only (pid 0), from the live arrays read above.
        let rc = unsafe { libc::syscall(libc::SYS_capset, header.as_mut_ptr(), data.as_ptr()) };
        ensure!(rc == 0, "capset: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread without CAP_IPC_LOCK panicked"));
    // SAFETY: setrlimit from a live struct, restoring what getrlimit read.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &old) };
    result?
}

/// Registers a fresh `len`-byte guest memory file; whether the kernel accepted it, or refused
/// it for the locked-memory limit (any other failure is an error).
fn try_register(len: u64) -> Result<Option<(GuestUmem, std::fs::File)>> {
    let file = guest_memory(len)?;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    match GuestUmem::register(file.as_fd(), len, layout, 64, 64) {
        Ok(umem) => Ok(Some((umem, file))),
        Err(GuestUmemError::Memlock { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// [`try_register`] until it is accepted or two seconds pass: a closed UMEM gives its pages
/// back to the count only when the kernel's deferred release has run.
fn register_once_released(len: u64) -> Result<Option<(GuestUmem, std::fs::File)>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match try_register(len)? {
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => return Ok(other),
        }
    }
}

#[test]
fn without_cap_ipc_lock_every_byte_of_guest_memory_counts_against_the_users_memlock_limit(
) -> Result<()> {
    let _s = serial();
    let limit = 1 << 20;
    without_ipc_lock(limit, move || {
        // One file the size of the limit fits (once an earlier test's registrations are
        // released); one page more does not.
        ensure!(
            register_once_released(limit)?.is_some(),
            "1 MiB under a 1 MiB limit"
        );
        ensure!(try_register(limit + PAGE)?.is_none(), "1 MiB + 4 KiB");
        // The count is the user's, across registrations: two halves fill it.
        let a = register_once_released(limit / 2)?.context("first half")?;
        let b = try_register(limit / 2)?.context("second half")?;
        ensure!(try_register(PAGE)?.is_none(), "a page over two halves");
        // Closing a registration gives its pages back.
        drop(a);
        ensure!(
            register_once_released(PAGE)?.is_some(),
            "a page after one half went"
        );
        drop(b);
        Ok(())
    })
}

/// Makes sure one 2 MiB huge page is free, reserving one for the test if none is (and giving
/// it back on drop).
struct HugePage {
    restore: Option<String>,
}

impl HugePage {
    const NR: &'static str = "/proc/sys/vm/nr_hugepages";

    fn reserve() -> Result<Self> {
        let free = std::fs::read_to_string("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if free > 0 {
            return Ok(HugePage { restore: None });
        }
        let old = std::fs::read_to_string(Self::NR)?;
        let n: u64 = old.trim().parse()?;
        std::fs::write(Self::NR, (n + 1).to_string())?;
        Ok(HugePage {
            restore: Some(old.trim().to_string()),
        })
    }
}

impl Drop for HugePage {
    fn drop(&mut self) {
        if let Some(old) = &self.restore {
            let _ = std::fs::write(Self::NR, old);
        }
    }
}

/// A hugetlb memfd of `len` bytes, as QEMU's `memory-backend-memfd,hugetlb=on` makes guest
/// memory; its pages are allocated when first touched.
fn huge_memfd(len: u64) -> Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = c"xvdpa-test-huge";
    // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
    let fd = unsafe {
        libc::memfd_create(
            name.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
        )
    };
    ensure!(
        fd >= 0,
        "memfd_create(MFD_HUGETLB): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

#[test]
fn a_hugetlb_memfd_registers_and_receives_like_small_pages_and_counts_by_bytes() -> Result<()> {
    let _s = serial();
    let _page = HugePage::reserve()?;
    let len = 2 << 20;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let off = u64::from(layout.data_offset());
    // A 2 MiB huge page counts as 2 MiB against the limit, not as one page.
    without_ipc_lock(1 << 20, move || {
        let file = huge_memfd(len)?;
        let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
        match GuestUmem::register(file.as_fd(), len, layout, 64, 64) {
            Err(GuestUmemError::Memlock { .. }) => Ok(()),
            other => bail!(
                "2 MiB huge page under a 1 MiB limit: {:?}",
                other.map(|_| ())
            ),
        }
    })?;
    // A chunk larger than a small page is still refused on huge pages.
    let file = huge_memfd(len)?;
    // hugetlbfs takes no write(2): fill through a mapping (a registration is one).
    GuestUmem::register(file.as_fd(), len, layout, 64, 64)?
        .write(0, &vec![PATTERN; len as usize])
        .context("fill")?;
    let big = GuestUmemLayout {
        chunk_size: 2 * PAGE as u32,
        headroom: 0,
    };
    let refused = GuestUmem::register(file.as_fd(), len, big, 64, 64);
    eprintln!(
        "8 KiB chunk on huge pages: {:?}",
        refused.as_ref().map(|_| ())
    );
    ensure!(
        matches!(&refused, Err(GuestUmemError::Register { source, .. })
            if source.raw_os_error() == Some(libc::EINVAL)),
        "8 KiB chunk on huge pages: {:?}",
        refused.map(|_| ())
    );
    // Received frames land as on small pages, across a 4 KiB boundary too.
    let lab = Lab::unique("guh")?;
    let addr = 5 * PAGE - off - 50;
    let sent = frame(1000, 5);
    let got = receive(&lab, file, len, layout, vec![addr], vec![sent.clone()], 1)?;
    ensure!(got.descs.len() == 1, "received {:?}", got.descs);
    assert_eq!(split_rx_addr(got.descs[0].addr), (addr, off));
    assert_eq!(changed(&got.memory), vec![(addr + off, addr + off + 1000)]);
    assert_eq!(&got.memory[(addr + off) as usize..][..1000], &sent[..]);
    Ok(())
}

/// The guest's side of one split receive queue of `QSIZE` entries in guest memory, written
/// as a driver would.
mod driver {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress};
    use xvdpa::datapath::GuestMemory;

    pub const QSIZE: u16 = 16;
    pub const DESC: u64 = 0;
    pub const AVAIL: u64 = 0x1000;
    pub const USED: u64 = 0x2000;
    const WRITE: u16 = 2;

    /// The device's view of that queue, ready.
    pub fn queue() -> anyhow::Result<Queue> {
        let mut q = Queue::new(QSIZE)?;
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        Ok(q)
    }

    /// Posts one single-buffer receive chain per (address, length), heads 0, 1, ...
    pub fn post(mem: &GuestMemory, buffers: &[(u64, u32)]) {
        for (i, &(addr, len)) in buffers.iter().enumerate() {
            let d = DESC + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(WRITE, GuestAddress(d + 12)).unwrap();
            mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
            mem.write_obj(i as u16, GuestAddress(AVAIL + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(buffers.len() as u16, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// The used ring's entries (head, length).
    pub fn used(mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let e = USED + 4 + 8 * u64::from(i % QSIZE);
                (
                    mem.read_obj(GuestAddress(e)).unwrap(),
                    mem.read_obj(GuestAddress(e + 4)).unwrap(),
                )
            })
            .collect()
    }

    pub fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn guest_receive_buffers_posted_to_the_kernel_get_frames_from_the_wire_and_attackers_get_nothing(
) -> Result<()> {
    use vm_memory::{FileOffset, GuestAddress};
    use xvdpa::datapath::device::rx_header;
    use xvdpa::datapath::zero_copy_rx::{
        FillLayout, GuestFile, PostedBuffers, SpareCopy, ZeroCopyRxTally,
    };
    use xvdpa::datapath::GuestMemory;

    let _s = serial();
    let lab = Lab::unique("gue")?;
    // One file, two regions at swapped offsets: rings low in guest memory but high in the
    // file, buffers high in guest memory but low in the file, as QEMU splits RAM around the
    // PCI hole.
    let file_len = 64 * PAGE;
    let file = guest_memory(file_len)?;
    let (ring_gpa, ring_len, ring_off) = (0u64, 16 * PAGE, 32 * PAGE);
    let (buf_gpa, buf_len, buf_off) = (0x10_0000u64, 32 * PAGE, 0u64);
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let fill_layout = FillLayout {
        data_offset: u64::from(layout.data_offset()),
        max_frame: layout.max_frame(),
        dma_page: None,
    };
    // Buffers at odd places, some of whose frames straddle a page; then an attacker's.
    let good: Vec<(u64, u32)> = (0..4)
        .map(|i| (buf_gpa + PAGE + i * 0x700 + 5, 0x700))
        .collect();
    let mut buffers = good.clone();
    buffers.extend([
        (0x50_0000, 2048),                     // outside guest memory
        (buf_gpa + 16 * PAGE, 64),             // too small for a frame
        (buf_gpa + buf_len - 100, 2048),       // runs off the end of its region
        (buf_gpa, 2048),                       // before the file's start, once placed
        (ring_gpa + ring_len - 0x400, 0x1000), // across the end of the rings' region
    ]);
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(60 + 400 * i, i as u8)).collect();
    let sent = frames.clone();
    let mem_file = file.try_clone()?;
    let (mem, used, tally) = with_rig(&lab, file, file_len, layout, move |rig| {
        let mem = GuestMemory::from_ranges_with_files([
            (
                GuestAddress(ring_gpa),
                ring_len as usize,
                Some(FileOffset::new(mem_file.try_clone()?, ring_off)),
            ),
            (
                GuestAddress(buf_gpa),
                buf_len as usize,
                Some(FileOffset::new(mem_file, buf_off)),
            ),
        ])?;
        let guest_file = GuestFile::of(&mem)?;
        ensure!(guest_file.file_len() == file_len);
        let mut q = driver::queue()?;
        driver::post(&mem, &buffers);
        let mut posted = PostedBuffers::new(guest_file, fill_layout, 64);
        // The guest's buffers alone: no spare frames of the daemon's.
        let no_spares = SpareCopy::WITHOUT_SPARES;
        let (mut fill, mut tally) = (Vec::new(), ZeroCopyRxTally::default());
        posted.post(&mem, &mut q, 64, &mut fill, no_spares, &mut tally)?;
        ensure!(fill.len() == 4, "posted {fill:x?}");
        rig.fill(&fill)?;
        rig.send(&frames)?;
        let descs = rig.recv(frames.len());
        posted.complete(
            &mem,
            &mut q,
            descs.iter().map(|d| {
                let (fill, offset) = split_rx_addr(d.addr);
                (fill, offset, d.len)
            }),
            no_spares,
            &mut tally,
        )?;
        let used = driver::used(&mem);
        Ok((mem, used, tally))
    })?;
    eprintln!("used ring: {used:?}\n{tally:?}");
    // The attacker's five chains came back unused at once; each frame is in its buffer,
    // after the net header.
    let mut want: Vec<(u32, u32)> = (4..9).map(|h| (h, 0)).collect();
    want.extend(
        sent.iter()
            .enumerate()
            .map(|(i, f)| (i as u32, 12 + f.len() as u32)),
    );
    assert_eq!(used, want);
    for (i, f) in sent.iter().enumerate() {
        let addr = good[i].0;
        assert_eq!(driver::read(&mem, addr, 12), rx_header(1), "header {i}");
        assert_eq!(&driver::read(&mem, addr + 12, f.len()), f, "frame {i}");
        assert_eq!(
            driver::read(&mem, addr + 12 + f.len() as u64, 4),
            vec![PATTERN; 4],
            "after frame {i}"
        );
    }
    assert_eq!(
        (
            tally.posted,
            tally.frames,
            tally.returned_outside_file,
            tally.returned_too_small,
            tally.unknown_completions
        ),
        (4, 4, 4, 1, 0)
    );
    Ok(())
}

#[test]
fn a_frame_sent_with_its_header_from_the_daemons_area_cannot_be_spoofed_after_the_check(
) -> Result<()> {
    let _s = serial();
    let lab = Lab::unique("gut")?;
    let len = 16 * PAGE;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let spoofed = [0x02, 0x66, 0x66, 0x66, 0x66, 0x66];
    // Two frames the guest sends, from its own memory, with its own MAC as source.
    let guest_frame = |seed: u8| {
        let mut f = frame(200, seed);
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        f[6..12].copy_from_slice(&GUEST_MAC);
        f
    };
    let (split_at, whole_at) = (8 * PAGE + 100, 10 * PAGE + 3);
    let (split, whole) = (guest_frame(7), guest_frame(8));
    let (s2, w2) = (split.clone(), whole.clone());
    let (own, completed, on_wire) =
        with_tx_rig(&lab, guest_memory(len)?, len, 4096, layout, move |rig| {
            let umem = &rig.umem;
            umem.write(split_at, &s2).context("guest frame")?;
            umem.write(whole_at, &w2).context("guest frame")?;
            // The daemon's check, then its copy of the header it checked, in its own area.
            let own = umem.own_area().start;
            ensure!(umem.own_area().end - own == 4096 && own == len);
            let mut header = [0u8; 14];
            umem.read(split_at, &mut header).context("header")?;
            ensure!(header[6..12] == GUEST_MAC);
            umem.write(own, &header).context("own area")?;
            let tx = rig.tx.as_mut().context("tx ring")?;
            {
                let descs = [
                    // Header from the daemon's area, the rest from guest memory.
                    XdpDesc {
                        addr: own,
                        len: 14,
                        options: XDP_PKT_CONTD,
                    },
                    XdpDesc {
                        addr: split_at + 14,
                        len: s2.len() as u32 - 14,
                        options: 0,
                    },
                    // For comparison: the whole frame from guest memory.
                    XdpDesc {
                        addr: whole_at,
                        len: w2.len() as u32,
                        options: 0,
                    },
                ];
                let mut w = tx.transmit(descs.len() as u32);
                ensure!(w.insert(descs.into_iter()) == 3);
                w.commit();
            }
            // The guest rewrites its source MAC after the check, before the kernel reads.
            umem.write(split_at + 6, &spoofed).context("flip")?;
            umem.write(whole_at + 6, &spoofed).context("flip")?;
            tx.wake();
            let mut completed = Vec::new();
            let deadline = Instant::now() + WAIT;
            while completed.len() < 3 && Instant::now() < deadline {
                let mut c = rig.device.complete(3);
                while let Some(addr) = c.read() {
                    completed.push(addr);
                }
                c.release();
                std::thread::sleep(Duration::from_millis(5));
            }
            let is_test = |f: &Vec<u8>| f.len() > 14 && f[12..14] == [0x88, 0xb5];
            let on_wire: Vec<Vec<u8>> = rig
                .wire
                .recv_until(WAIT, |g| g.iter().filter(|f| is_test(f)).count() >= 2)
                .into_iter()
                .filter(is_test)
                .collect();
            Ok((own, completed, on_wire))
        })?;
    eprintln!("completed: {completed:#x?}");
    // The frame whose header came from the daemon's area left with the MAC the daemon
    // checked; the one sent whole from guest memory left with the guest's rewrite.
    let mut spoofed_whole = whole.clone();
    spoofed_whole[6..12].copy_from_slice(&spoofed);
    assert_eq!(on_wire, vec![split.clone(), spoofed_whole]);
    // Every piece comes back on the completion ring. A one-piece frame at an odd address
    // comes back with bit 0 cleared on Linux 6.18: copy mode keeps a one-piece frame's
    // address in the skb's destructor_arg tagged with bit 0 (`xsk_skb_destructor_set_addr`)
    // and masks the tag off again with the address's own bit. So completions are matched
    // with bit 0 ignored.
    let even = |mut v: Vec<u64>| {
        v.iter_mut().for_each(|a| *a &= !1);
        v.sort();
        v
    };
    assert_eq!(
        even(completed.clone()),
        even(vec![own, split_at + 14, whole_at])
    );
    eprintln!(
        "odd one-piece tx address {whole_at:#x} completed as {:#x?}",
        completed.iter().find(|&&a| a & !1 == whole_at & !1)
    );
    Ok(())
}

#[test]
fn copy_mode_sends_a_frame_of_one_linear_piece_and_max_skb_frags_more_and_no_longer() -> Result<()>
{
    let _s = serial();
    let lab = Lab::unique("gup")?;
    let len = 16 * PAGE;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    // The sysctl's default is the kernel's MAX_SKB_FRAGS, which copy mode's limit is.
    let max_frags = std::fs::read_to_string("/proc/sys/net/core/max_skb_frags")?
        .trim()
        .parse::<usize>()?;
    let counts = [max_frags, max_frags + 1, max_frags + 2];
    let sent: Vec<(usize, bool, u64)> =
        with_tx_rig(&lab, guest_memory(len)?, len, 4096, layout, move |rig| {
            let mut out = Vec::new();
            for (k, &n) in counts.iter().enumerate() {
                // A frame of `n` pieces of 64 bytes, each from its own place in memory.
                let f = frame(64 * n, 10 + k as u8);
                let at = |i: usize| (k * 4 + 1) as u64 * PAGE + 128 * i as u64;
                for (i, piece) in f.chunks(64).enumerate() {
                    rig.umem.write(at(i), piece).context("piece")?;
                }
                let descs: Vec<XdpDesc> = (0..n)
                    .map(|i| XdpDesc {
                        addr: at(i),
                        len: 64,
                        options: if i + 1 < n { XDP_PKT_CONTD } else { 0 },
                    })
                    .collect();
                let tx = rig.tx.as_mut().context("tx ring")?;
                {
                    let mut w = tx.transmit(n as u32);
                    ensure!(w.insert(descs.into_iter()) as usize == n);
                    w.commit();
                }
                tx.wake();
                let is_it = |g: &Vec<u8>| g.len() == f.len() && g[6..12] == f[6..12];
                let arrived = rig
                    .wire
                    .recv_until(Duration::from_millis(500), |g| g.iter().any(is_it))
                    .iter()
                    .any(|g| is_it(g) && *g == f);
                let invalid = rig
                    .user
                    .statistics_v2()
                    .map_err(errno("statistics"))?
                    .tx_invalid_descs;
                out.push((n, arrived, invalid));
            }
            Ok(out)
        })?;
    eprintln!("max_skb_frags {max_frags}: (pieces, on the wire, tx_invalid_descs) {sent:?}");
    // The first piece goes into the skb's linear part, each further one into a fragment; a
    // frame with more is refused whole, every descriptor of it counted invalid.
    assert!(
        sent[0].1 && sent[1].1,
        "up to max_skb_frags + 1 pieces: {sent:?}"
    );
    assert_eq!(
        (sent[2].1, sent[2].2),
        (false, max_frags as u64 + 2),
        "{sent:?}"
    );
    Ok(())
}

#[test]
fn a_nic_queue_takes_one_umem_so_a_second_guests_memory_cannot_bind_to_it() -> Result<()> {
    let _s = serial();
    let lab = Lab::unique("guq")?;
    let len = 16 * PAGE;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let other = guest_memory(len)?;
    let refused = with_rig(&lab, guest_memory(len)?, len, layout, move |_rig| {
        // Another guest's memory, registered and bound to the same NIC queue.
        let umem = GuestUmem::register(other.as_fd(), len, layout, 64, 64)?;
        let (_device, user) = open_socket(&umem, false)?;
        Ok(umem.xdp().bind(&user).err().map(|e| e.get_raw().abs()))
    })?;
    assert_eq!(refused, Some(libc::EBUSY));
    Ok(())
}

#[test]
fn with_multi_buffer_a_longer_frame_is_split_over_fill_addresses_each_piece_after_its_offset(
) -> Result<()> {
    let _s = serial();
    let lab = Lab::unique("gus")?;
    let len = 16 * PAGE;
    let max = 1000;
    let layout = GuestUmemLayout::for_max_frame(max)?;
    let off = u64::from(layout.data_offset());
    let (a, b) = (2 * PAGE, 6 * PAGE + 7);
    let sent = frame(1400, 9);
    let f = sent.clone();
    let (descs, memory) = with_tx_rig(&lab, guest_memory(len)?, len, 0, layout, move |rig| {
        rig.fill(&[a, b])?;
        rig.send(&[f])?;
        let mut descs = Vec::new();
        let deadline = Instant::now() + WAIT;
        while descs.len() < 2 && Instant::now() < deadline {
            let mut r = rig.rx.receive(64);
            while let Some(d) = r.read() {
                descs.push((d.addr, d.len, d.options));
            }
            r.release();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut memory = vec![0u8; len as usize];
        rig.umem.read(0, &mut memory).context("read back")?;
        Ok((descs, memory))
    })?;
    eprintln!("rx descriptors (addr, len, options): {descs:#x?}");
    // Two pieces, the first marked as continued, each after its own fill address's offset:
    // a second piece cannot start a buffer (where a mergeable receive buffer's data goes).
    assert_eq!(
        descs,
        vec![
            (a | off << 48, max, XDP_PKT_CONTD),
            (b | off << 48, 1400 - max, 0)
        ]
    );
    assert_eq!(
        changed(&memory),
        vec![
            (a + off, a + off + u64::from(max)),
            (b + off, b + off + 400)
        ]
    );
    assert_eq!(
        &memory[(a + off) as usize..][..max as usize],
        &sent[..max as usize]
    );
    assert_eq!(&memory[(b + off) as usize..][..400], &sent[max as usize..]);
    Ok(())
}

#[test]
fn generic_xdp_receives_into_guest_memory_exactly_as_native_xdp_does() -> Result<()> {
    let _s = serial();
    let lab = Lab::unique("gug")?;
    let len = 16 * PAGE;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let off = u64::from(layout.data_offset());
    let at = 5 * PAGE - off - 20 + 1;
    let sent = frame(300, 11);
    let f = sent.clone();
    let file = guest_memory(len)?;
    let (descs, memory) = rig(
        &lab,
        file,
        len,
        None,
        layout,
        XdpModeChoice::Skb,
        move |rig| {
            rig.fill(&[at])?;
            rig.send(&[f])?;
            let descs = rig.recv(1);
            let mut memory = vec![0u8; len as usize];
            rig.umem.read(0, &mut memory).context("read back")?;
            Ok((descs, memory))
        },
    )?;
    assert_eq!(
        descs,
        vec![RxDesc {
            addr: at | off << 48,
            len: 300
        }]
    );
    assert_eq!(changed(&memory), vec![(at + off, at + off + 300)]);
    assert_eq!(&memory[(at + off) as usize..][..300], &sent[..]);
    Ok(())
}

/// What a ring stop or a reconnect needs, with the daemon's receive pieces: guest buffers
/// from a receive queue posted through a [`GuestRxSocket`], one frame received, then the
/// socket dropped (it owns the registration: a UMEM's first socket is the one it was
/// registered on) and the buffers still posted given back to the guest unused. After that the
/// kernel writes nothing into them, even with the XSKMAP entry left in place; and the NIC
/// queue takes the same memory again, as a new registration, for the next run of the ring
/// (how soon is printed: the kernel frees a queue's UMEM slot in deferred work).
#[test]
fn a_closed_guest_rx_socket_writes_nothing_into_buffers_given_back_and_the_queue_takes_the_memory_again(
) -> Result<()> {
    use vm_memory::{Bytes, FileOffset, GuestAddress};
    use xvdpa::datapath::device::rx_header;
    use xvdpa::datapath::zero_copy_rx::{
        FillLayout, GuestFile, PostedBuffers, SpareCopy, ZeroCopyRxTally,
    };
    use xvdpa::datapath::GuestMemory;
    use xvdpa::nic::xsk::guest_umem::{GuestRxSocket, GuestRxSpec};
    use xvdpa::nic::xsk::{XskMode, XskModeChoice};

    let _s = serial();
    let lab = Lab::unique("gur")?;
    let len = 64 * PAGE;
    let layout = GuestUmemLayout::for_max_frame(MAX_FRAME)?;
    let fill_layout = FillLayout {
        data_offset: u64::from(layout.data_offset()),
        max_frame: layout.max_frame(),
        dma_page: None,
    };
    // Three receive buffers; one frame fills the first, two stay with the kernel.
    let buffers: Vec<(u64, u32)> = (0..3).map(|i| (8 * PAGE + i * 0x1000 + 3, 0x700)).collect();
    let (first, late, again) = (frame(500, 1), frame(700, 2), frame(300, 3));
    let sent = (first.clone(), again.clone());
    let wire = WireSocket::open(&lab)?;
    let object = XdpObject::load()?;
    let file = guest_memory(len)?;
    let bufs = buffers.clone();
    let (used, memory_after_close, waited, used_again, memory_end) =
        in_netns(&lab.host_ns, move || {
            let run = || -> Result<_> {
                let (mut steering, _logger) =
                    Steering::attach(object.bytes(), NIC, XdpModeChoice::Auto)?;
                steering.add_port(MacAddr(GUEST_MAC), None, 0)?;
                let mem = GuestMemory::from_ranges_with_files([(
                    GuestAddress(0),
                    len as usize,
                    Some(FileOffset::new(file.try_clone()?, 0)),
                )])?;
                let spec = GuestRxSpec {
                    file: file.as_fd(),
                    len,
                    layout,
                    ifname: NIC,
                    ifindex: ifindex(NIC)?,
                    queue_id: 0,
                    ring_size: 64,
                    tx_slots: 0,
                    spare_frames: 0,
                };
                let open = || GuestRxSocket::open(spec, XskModeChoice::Auto);
                // One frame, or none within [`WAIT`].
                let receive = |sock: &mut GuestRxSocket| {
                    let mut received = Vec::new();
                    let deadline = Instant::now() + WAIT;
                    while received.is_empty() && Instant::now() < deadline {
                        sock.receive(64, &mut received);
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    received
                };
                let mut sock = open()?;
                ensure!(sock.mode() == XskMode::Copy, "a veth has no zero-copy");
                steering.bind_socket(0, 0, sock.fd())?;
                let mut q = driver::queue()?;
                driver::post(&mem, &bufs);
                let mut posted = PostedBuffers::new(GuestFile::of(&mem)?, fill_layout, 64);
                // The guest's buffers alone: no spare frames of the daemon's.
                let no_spares = SpareCopy::WITHOUT_SPARES;
                let (mut fill, mut tally) = (Vec::new(), ZeroCopyRxTally::default());
                let room = sock.fill_room();
                posted.post(&mem, &mut q, room, &mut fill, no_spares, &mut tally)?;
                ensure!(sock.fill(&fill) == 3, "posted {fill:x?}");
                wire.send(&first)?;
                let received = receive(&mut sock);
                let received = received.iter().copied();
                posted.complete(&mem, &mut q, received, no_spares, &mut tally)?;
                // The ring stops: the socket goes first, then the buffers go back.
                drop(sock);
                ensure!(posted.give_back(&mem, &mut q)? == 2);
                let used = driver::used(&mem);
                wire.send(&late)?;
                std::thread::sleep(Duration::from_millis(300));
                let mut memory_after_close = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut memory_after_close, 0)?;
                // The next run of the ring registers the memory again and the guest posts
                // the buffers it got back.
                let start = Instant::now();
                let mut sock = open()?;
                let waited = start.elapsed();
                steering.bind_socket(0, 0, sock.fd())?;
                for off in [driver::DESC, driver::AVAIL, driver::USED] {
                    mem.write_slice(&[0; 0x100], GuestAddress(off))?;
                }
                let mut q = driver::queue()?;
                driver::post(&mem, &bufs[1..]);
                let room = sock.fill_room();
                posted.post(&mem, &mut q, room, &mut fill, no_spares, &mut tally)?;
                ensure!(sock.fill(&fill) == 2, "posted again {fill:x?}");
                wire.send(&again)?;
                let received = receive(&mut sock);
                let received = received.iter().copied();
                posted.complete(&mem, &mut q, received, no_spares, &mut tally)?;
                let used_again = driver::used(&mem);
                let mut memory_end = vec![0u8; len as usize];
                sock.umem().read(0, &mut memory_end).context("read back")?;
                drop(sock);
                steering.detach();
                Ok((used, memory_after_close, waited, used_again, memory_end))
            };
            run().map_err(|e| std::io::Error::other(format!("{e:#}")))
        })?;
    eprintln!("re-registration after the close took {waited:?}");
    let (first, again) = sent;
    let (a, b) = (buffers[0].0, buffers[1].0);
    // The frame received before the stop, then the two buffers back unused (any order).
    let mut back = used[1..].to_vec();
    back.sort();
    assert_eq!(used[0], (0, 12 + first.len() as u32));
    assert_eq!(back, vec![(1, 0), (2, 0)]);
    // Only that frame and its header are in the buffers: the late frame went nowhere,
    // although two buffers had been on the closed socket's fill ring.
    let in_buffers = |m: &[u8]| {
        changed(m)
            .into_iter()
            .filter(|&(s, _)| s >= buffers[0].0)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        in_buffers(&memory_after_close),
        vec![(a, a + 12 + first.len() as u64)]
    );
    assert_eq!(&memory_after_close[a as usize..][..12], &rx_header(1)[..]);
    assert_eq!(
        &memory_after_close[(a + 12) as usize..][..first.len()],
        &first[..]
    );
    // The new registration receives into a buffer the guest posted again.
    assert_eq!(used_again, vec![(0, 12 + again.len() as u32)]);
    assert_eq!(&memory_end[(b + 12) as usize..][..again.len()], &again[..]);
    Ok(())
}

/// The in-place transmit keeps to a zero-copy driver's `xdp-zc-max-segs`, read through the
/// netdev family's `dev-get`. veth has no zero-copy, and the kernel (`netdev_nl_dev_fill`)
/// sends the attribute only for a device with `NETDEV_XDP_ACT_XSK_ZEROCOPY`: the daemon
/// finds no limit there, and a zero-copy socket on such a device would copy.
#[test]
fn dev_get_names_the_device_and_gives_veth_no_zero_copy_piece_limit() -> Result<()> {
    use xvdpa::nic::napi::{Netlink, XDP_ACT_XSK_ZEROCOPY};
    let lab = Lab::unique("gzc")?;
    let (index, info, missing) = in_netns(&lab.host_ns, || {
        let index = ifindex(NIC)?;
        let mut nl = Netlink::open().map_err(std::io::Error::other)?;
        let info = nl.dev_get(index).map_err(std::io::Error::other)?;
        let missing = nl
            .dev_get(u32::MAX >> 1)
            .map(|_| ())
            .map_err(|e| e.to_string());
        Ok((index, info, missing))
    })?;
    eprintln!("{NIC}: {info:x?}; unknown interface: {missing:?}");
    ensure!(info.ifindex == index, "reply names {info:?}, asked {index}");
    ensure!(
        info.xdp_features != 0,
        "veth reports XDP features: {info:?}"
    );
    ensure!(info.xdp_features & XDP_ACT_XSK_ZEROCOPY == 0, "{info:?}");
    ensure!(info.xdp_zc_max_segs.is_none(), "{info:?}");
    ensure!(missing.is_err(), "an unknown ifindex answered");
    Ok(())
}
