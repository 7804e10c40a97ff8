//! Unit tests of the shim over socket pairs: what crosses, what is held back, what is refused.
use super::*;
use std::os::fd::AsFd;

fn msg(request: u32, flags: u32, payload: &[u8]) -> Message {
    Message {
        request,
        flags,
        payload: payload.to_vec(),
        fds: Vec::new(),
    }
}

/// A shim for a device of one queue pair, its announcements going nowhere.
fn start(front: UnixStream, back: UnixStream) -> Shim {
    start_announcing(front, back).0
}

/// A shim for a device of one queue pair and the announcements it takes.
fn start_announcing(front: UnixStream, back: UnixStream) -> (Shim, Arc<AnnounceRequests>) {
    let (shim, announce, _) = start_keeping(front, back);
    (shim, announce)
}

/// A shim for a device of one queue pair, the announcements it takes and the logs it maps.
fn start_keeping(
    front: UnixStream,
    back: UnixStream,
) -> (Shim, Arc<AnnounceRequests>, Arc<FrontendLogSlot>) {
    let wake = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    let announce = Arc::new(AnnounceRequests::new(wake));
    let log = Arc::new(FrontendLogSlot::default());
    let shim = Shim::start(
        front,
        back,
        2,
        1024,
        RingErrorFds::new(2),
        announce.clone(),
        log.clone(),
    )
    .unwrap();
    (shim, announce, log)
}

/// A SET_LOG_BASE's log is mapped for the backend (for the memory tables after it) and
/// forwarded with its fd; one that cannot be mapped (an offset mmap refuses) is refused
/// before the library, and the log mapped before stays.
#[test]
fn set_log_base_is_mapped_for_the_backend_and_forwarded() {
    let (qemu, shim_front) = UnixStream::pair().unwrap();
    let (shim_back, lib) = UnixStream::pair().unwrap();
    let (shim, _, log) = start_keeping(shim_front, shim_back);
    let patience = Some(std::time::Duration::from_secs(5));
    qemu.set_read_timeout(patience).unwrap();
    lib.set_read_timeout(patience).unwrap();
    let set_log_base = |size: u64, offset: u64| Message {
        request: REQ_SET_LOG_BASE,
        flags: FLAG_VERSION | FLAG_NEED_REPLY,
        payload: [size.to_le_bytes(), offset.to_le_bytes()].concat(),
        fds: vec![crate::memory_guard::tests::memfd(8192).into()],
    };

    send_message(&qemu, &set_log_base(4096, 0)).unwrap();
    let forwarded = recv_message(&lib).unwrap().unwrap();
    assert_eq!(
        (forwarded.request, forwarded.fds.len()),
        (REQ_SET_LOG_BASE, 1)
    );
    let mapped = log.current().expect("the log is mapped");
    // 4096 bytes of bits: 32768 pages of 4 KiB.
    assert!(mapped.covers(0, 32768 * 4096) && !mapped.covers(0, 32768 * 4096 + 1));

    send_message(&qemu, &set_log_base(4096, 100)).unwrap();
    let answer = recv_message(&qemu).unwrap().unwrap();
    assert_eq!(answer.payload, 1u64.to_le_bytes(), "NACKed");
    assert!(Arc::ptr_eq(&log.current().unwrap(), &mapped));
    shim.stop();
}

/// SEND_RARP, which the library would end the connection on, is answered by the shim: taken
/// once the RARP protocol feature was acknowledged, refused before that or when malformed
/// (NACKed if the frontend asked for a reply, else the connection ends), and never
/// forwarded.
#[test]
fn send_rarp_is_taken_by_the_shim_after_the_feature_and_refused_otherwise() {
    let (qemu, shim_front) = UnixStream::pair().unwrap();
    let (shim_back, lib) = UnixStream::pair().unwrap();
    let (shim, announce) = start_announcing(shim_front, shim_back);
    let patience = Some(std::time::Duration::from_secs(5));
    qemu.set_read_timeout(patience).unwrap();
    lib.set_read_timeout(patience).unwrap();
    let mac = [0x52, 0x54, 0, 0, 0, 7];
    let rarp = [&mac[..], &[0, 0]].concat();
    let asked = |payload: &[u8]| msg(REQ_SEND_RARP, FLAG_VERSION | FLAG_NEED_REPLY, payload);
    let answer = |m: &Message| {
        send_message(&qemu, m).unwrap();
        let a = recv_message(&qemu).unwrap().unwrap();
        assert_eq!(a.request, REQ_SEND_RARP);
        a.payload
    };
    let (ok, nack) = (0u64.to_le_bytes().to_vec(), 1u64.to_le_bytes().to_vec());

    assert_eq!(answer(&asked(&rarp)), nack, "before the feature");
    let rarp_bit = VhostUserProtocolFeatures::RARP.bits();
    let features = msg(
        REQ_SET_PROTOCOL_FEATURES,
        FLAG_VERSION,
        &rarp_bit.to_le_bytes(),
    );
    send_message(&qemu, &features).unwrap();
    assert_eq!(
        recv_message(&lib).unwrap().unwrap().request,
        REQ_SET_PROTOCOL_FEATURES
    );
    assert_eq!(answer(&asked(&rarp[..6])), nack, "6 bytes");
    assert_eq!(answer(&asked(&[0xff; 8])), nack, "broadcast MAC");
    assert_eq!(announce.take(), None);
    assert_eq!(answer(&asked(&rarp)), ok);
    assert_eq!(announce.take(), Some(crate::mac::MacAddr(mac)));
    // As QEMU sends it: no reply asked for.
    send_message(&qemu, &msg(REQ_SEND_RARP, FLAG_VERSION, &rarp)).unwrap();
    // Nothing of it reached the library: the next message there is the one after it.
    send_message(&qemu, &msg(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8])).unwrap();
    assert_eq!(
        recv_message(&lib).unwrap().unwrap().request,
        REQ_SET_FEATURES
    );
    assert_eq!(announce.take(), Some(crate::mac::MacAddr(mac)));

    // Malformed without a reply asked for: the connection ends.
    send_message(&qemu, &msg(REQ_SEND_RARP, FLAG_VERSION, &rarp[..4])).unwrap();
    assert!(recv_message(&qemu).map_or(true, |m| m.is_none()));
    shim.stop();
}

#[test]
fn messages_and_fds_cross_intact() {
    let (a, b) = UnixStream::pair().unwrap();
    let file = std::fs::File::open("/proc/self/status").unwrap();
    let m = Message {
        request: 5,
        flags: FLAG_VERSION,
        payload: vec![1, 2, 3, 4, 5, 6, 7, 8],
        fds: vec![file.as_fd().try_clone_to_owned().unwrap()],
    };
    send_message(&a, &m).unwrap();
    let got = recv_message(&b).unwrap().unwrap();
    assert_eq!(
        (got.request, got.flags, got.payload.clone()),
        (5, FLAG_VERSION, m.payload.clone())
    );
    assert_eq!(got.fds.len(), 1);
    drop(a);
    assert!(recv_message(&b).unwrap().is_none());
}

#[test]
fn early_vring_enable_is_acked_and_replayed_after_set_features() {
    let (qemu, shim_front) = UnixStream::pair().unwrap();
    let (shim_back, lib) = UnixStream::pair().unwrap();
    let shim = start(shim_front, shim_back);
    let enable = |idx: u32, on: u32| {
        let mut p = idx.to_le_bytes().to_vec();
        p.extend(on.to_le_bytes());
        p
    };
    send_message(&qemu, &msg(1, FLAG_VERSION, &[])).unwrap(); // GET_FEATURES
    send_message(
        &qemu,
        &msg(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &enable(0, 1),
        ),
    )
    .unwrap();
    // The shim answers the early enable itself.
    let ack = recv_message(&qemu).unwrap().unwrap();
    assert_eq!(
        (ack.request, ack.flags & FLAG_REPLY, ack.payload),
        (REQ_SET_VRING_ENABLE, FLAG_REPLY, vec![0; 8])
    );
    send_message(
        &qemu,
        &msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &enable(0, 0)),
    )
    .unwrap();
    send_message(&qemu, &msg(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8])).unwrap();
    send_message(
        &qemu,
        &msg(REQ_SET_VRING_ENABLE, FLAG_VERSION, &enable(1, 1)),
    )
    .unwrap();

    let seen: Vec<(u32, Vec<u8>)> = (0..4)
        .map(|_| {
            let m = recv_message(&lib).unwrap().unwrap();
            assert_eq!(m.flags & FLAG_NEED_REPLY, 0);
            (m.request, m.payload)
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, vec![]),
            (REQ_SET_FEATURES, vec![0; 8]),
            (REQ_SET_VRING_ENABLE, enable(0, 0)), // the latest early state of ring 0
            (REQ_SET_VRING_ENABLE, enable(1, 1)),
        ]
    );
    // Replies flow back untouched.
    send_message(&lib, &msg(1, FLAG_VERSION | FLAG_REPLY, &[9; 8])).unwrap();
    assert_eq!(recv_message(&qemu).unwrap().unwrap().payload, vec![9; 8]);
    shim.stop();
}

/// A frontend that floods early SET_VRING_ENABLEs for rings the device does not have
/// (each could carry fds) must not make the shim hold them: they are refused, and only
/// the device's own rings are replayed after SET_FEATURES.
#[test]
fn early_vring_enable_for_a_ring_the_device_lacks_is_refused_not_held() {
    let (qemu, shim_front) = UnixStream::pair().unwrap();
    let (shim_back, lib) = UnixStream::pair().unwrap();
    let shim = start(shim_front, shim_back);
    let file = std::fs::File::open("/proc/self/status").unwrap();
    for idx in [0u32, 2, 7, u32::MAX, 1] {
        let mut p = idx.to_le_bytes().to_vec();
        p.extend(1u32.to_le_bytes());
        let mut m = msg(REQ_SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &p);
        m.fds.push(file.as_fd().try_clone_to_owned().unwrap());
        send_message(&qemu, &m).unwrap();
        let ack = recv_message(&qemu).unwrap().unwrap();
        let refused = idx >= 2;
        assert_eq!(
            ack.payload,
            u64::from(refused).to_le_bytes().to_vec(),
            "ring {idx}"
        );
    }
    send_message(&qemu, &msg(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8])).unwrap();
    let replayed: Vec<(u32, u32, usize)> = (0..3)
        .map(|_| {
            let m = recv_message(&lib).unwrap().unwrap();
            let idx = u32::from_le_bytes(m.payload[0..4].try_into().unwrap());
            (
                m.request,
                if m.request == REQ_SET_VRING_ENABLE {
                    idx
                } else {
                    0
                },
                m.fds.len(),
            )
        })
        .collect();
    assert_eq!(
        replayed,
        vec![
            (REQ_SET_FEATURES, 0, 0),
            (REQ_SET_VRING_ENABLE, 0, 0),
            (REQ_SET_VRING_ENABLE, 1, 0),
        ]
    );
    shim.stop();
}

/// The frontend's fds and sizes are checked before the library sees them: a pipe as a
/// kick fd (whose 8-byte read would block a worker under the vring lock) and a ring size
/// that is no power of two are refused with a NACK; what passes reaches the library.
#[test]
fn a_pipe_as_kick_fd_and_a_bad_ring_size_are_refused_before_the_library() {
    let (qemu, shim_front) = UnixStream::pair().unwrap();
    let (shim_back, lib) = UnixStream::pair().unwrap();
    let shim = start(shim_front, shim_back);
    // A reply that never comes fails the test instead of hanging it.
    let patience = Some(std::time::Duration::from_secs(5));
    qemu.set_read_timeout(patience).unwrap();
    lib.set_read_timeout(patience).unwrap();
    send_message(&qemu, &msg(REQ_SET_FEATURES, FLAG_VERSION, &[0; 8])).unwrap();
    assert_eq!(
        recv_message(&lib).unwrap().unwrap().request,
        REQ_SET_FEATURES
    );

    let mut ends = [0; 2];
    // SAFETY: pipe(2) into a live array of two ints.
    assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds from pipe(2), owned by nobody else.
    let (read_end, _write_end) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    let mut kick = msg(12, FLAG_VERSION | FLAG_NEED_REPLY, &0u64.to_le_bytes());
    kick.fds.push(read_end);
    send_message(&qemu, &kick).unwrap();
    let nack = recv_message(&qemu).unwrap().unwrap();
    assert_eq!(
        (nack.request, nack.payload),
        (12, 1u64.to_le_bytes().to_vec())
    );

    let mut num = 0u32.to_le_bytes().to_vec();
    num.extend(100u32.to_le_bytes());
    send_message(&qemu, &msg(8, FLAG_VERSION | FLAG_NEED_REPLY, &num)).unwrap();
    let nack = recv_message(&qemu).unwrap().unwrap();
    assert_eq!(
        (nack.request, nack.payload),
        (8, 1u64.to_le_bytes().to_vec())
    );

    // A good size goes through, and nothing refused went before it.
    let mut num = 0u32.to_le_bytes().to_vec();
    num.extend(256u32.to_le_bytes());
    send_message(&qemu, &msg(8, FLAG_VERSION, &num)).unwrap();
    let m = recv_message(&lib).unwrap().unwrap();
    assert_eq!((m.request, m.payload), (8, num));
    shim.stop();
}
