//! Frames for the tests: Ethernet with a recognisable payload, and ARP requests.

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
/// An EtherType from the "local experimental" range: nothing in the kernel consumes it.
pub const ETH_P_TEST: u16 = 0x88b5;
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// An Ethernet frame of exactly `len` bytes (header included) whose payload encodes `seq`, so
/// every byte can be checked on the far side.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 18, "test frames carry a 4-byte sequence number");
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETH_P_TEST.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push((f.len() as u32).wrapping_mul(31).wrapping_add(seq) as u8);
    }
    f
}

/// The sequence number of a frame built by [`test_frame`], if it is one.
pub fn test_seq(frame: &[u8]) -> Option<u32> {
    if frame.len() >= 18 && frame[12..14] == ETH_P_TEST.to_be_bytes() {
        Some(u32::from_be_bytes(frame[14..18].try_into().unwrap()))
    } else {
        None
    }
}

/// `frame` with an 802.1Q tag for VLAN `vid` inserted after the MAC addresses.
pub fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// The VLAN ID and untagged form of a tagged frame, or `None` for an untagged one.
pub fn untag(frame: &[u8]) -> Option<(u16, Vec<u8>)> {
    if frame.len() >= 18 && frame[12..14] == 0x8100u16.to_be_bytes() {
        let vid = u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff;
        Some((vid, [&frame[..12], &frame[16..]].concat()))
    } else {
        None
    }
}

fn ipv4(s: &str) -> [u8; 4] {
    let v: Vec<u8> = s
        .split('.')
        .map(|p| p.parse().expect("dotted quad"))
        .collect();
    v.try_into().expect("four octets")
}

/// A broadcast ARP request: who has `target_ip`? tell `sender_ip` at `sender_mac`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: &str, target_ip: &str) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&ipv4(sender_ip));
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ipv4(target_ip));
    f.resize(60, 0);
    f
}

/// If `frame` is an ARP reply, the sender's (MAC, IPv4).
pub fn arp_reply_sender(frame: &[u8]) -> Option<([u8; 6], [u8; 4])> {
    if frame.len() >= 42 && frame[12..14] == ETH_P_ARP.to_be_bytes() && frame[20..22] == [0, 2] {
        Some((
            frame[22..28].try_into().unwrap(),
            frame[28..32].try_into().unwrap(),
        ))
    } else {
        None
    }
}

pub fn ip_bytes(s: &str) -> [u8; 4] {
    ipv4(s)
}

/// How a guest's new place is announced after a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announcement {
    /// The RARP QEMU asks the backend for (`SEND_RARP`): broadcast, ethertype 0x8035, a
    /// reverse request for the guest's own MAC.
    Rarp,
    /// A gratuitous ARP the guest sends itself (`GUEST_ANNOUNCE`): a broadcast request whose
    /// sender and target address are both its own.
    GratuitousArp,
}

/// Whether `frame` announces `mac` (the guest's MAC), and how.
pub fn announcement(frame: &[u8], mac: [u8; 6]) -> Option<Announcement> {
    if frame.len() < 42 || frame[0..6] != BROADCAST || frame[6..12] != mac {
        return None;
    }
    let (ethertype, op) = (&frame[12..14], &frame[20..22]);
    if ethertype == [0x80, 0x35] && op == [0, 3] && frame[22..28] == mac && frame[32..38] == mac {
        return Some(Announcement::Rarp);
    }
    if ethertype == ETH_P_ARP.to_be_bytes() && op == [0, 1] && frame[28..32] == frame[38..42] {
        return Some(Announcement::GratuitousArp);
    }
    None
}
