//! Announcing where a migrated guest runs now: the RARP frame a frontend asks for with
//! `VHOST_USER_SEND_RARP`, which the port sends as its guest's broadcast (to the wire and to
//! every other port on its VLAN), so switches on the way learn the MAC's new place.
//!
//! QEMU asks for it after a migration (each round of its self-announcement, and on the
//! `announce-self` command) for a guest that did not negotiate `GUEST_ANNOUNCE`; a guest that
//! did sends its own gratuitous ARP through its transmit ring instead.

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

use crate::mac::MacAddr;

/// Ethernet minimum frame without the FCS, as QEMU builds its announcement.
pub const RARP_FRAME_LEN: usize = 60;

const ETHERTYPE_RARP: u16 = 0x8035;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_PTYPE_IPV4: u16 = 0x0800;
/// "Reverse request" (RFC 903).
const RARP_OP_REQUEST_REVERSE: u16 = 3;

/// The frame QEMU's own announcement is (`announce_self_create`): broadcast, from `mac`, a
/// reverse ARP request for `mac` with both protocol addresses zero, padded to 60 bytes.
pub fn rarp_frame(mac: MacAddr) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&ARP_PTYPE_IPV4.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&RARP_OP_REQUEST_REVERSE.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0);
    // Sender protocol address 0.0.0.0 (28..32), target hardware address, target protocol
    // address 0.0.0.0 (38..42), padding.
    f[32..38].copy_from_slice(&mac.0);
    f
}

/// Marks a waiting request in [`AnnounceRequests::pending`]; a MAC takes the low 48 bits.
const PENDING: u64 = 1 << 63;

/// The announcements one connection's frontend asked for, waiting for the port's first
/// queue pair, whose thread owns the socket they go out through. The frontend's messages are
/// read on another thread; requests that come faster than the worker sends them are merged
/// (the latest MAC is sent once).
pub struct AnnounceRequests {
    pending: AtomicU64,
    /// Wakes the first queue pair's worker (a duplicate of its re-arm eventfd).
    wake: EventFd,
}

impl AnnounceRequests {
    pub fn new(wake: EventFd) -> Self {
        AnnounceRequests {
            pending: AtomicU64::new(0),
            wake,
        }
    }

    /// Asks for an announcement of `mac` and wakes the worker that sends it.
    pub fn request(&self, mac: MacAddr) {
        let [a, b, c, d, e, f] = mac.0;
        let word = u64::from_le_bytes([a, b, c, d, e, f, 0, 0]) | PENDING;
        self.pending.store(word, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            // Only a counter at its maximum fails, and then the worker is awake anyway.
            tracing::debug!(error = %e, "cannot wake the worker for an announcement");
        }
    }

    /// The MAC to announce, if one was asked for since the last call (one atomic load when
    /// none was).
    pub fn take(&self) -> Option<MacAddr> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let word = self.pending.swap(0, Ordering::AcqRel);
        if word & PENDING == 0 {
            return None;
        }
        let b = word.to_le_bytes();
        Some(MacAddr([b[0], b[1], b[2], b[3], b[4], b[5]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn the_rarp_frame_is_the_one_qemu_builds() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let f = rarp_frame(mac);
        let mut want = vec![0xff; 6];
        want.extend_from_slice(&mac.0);
        want.extend_from_slice(&[0x80, 0x35, 0, 1, 0x08, 0, 6, 4, 0, 3]);
        want.extend_from_slice(&mac.0);
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&mac.0);
        want.extend_from_slice(&[0; 4]);
        want.resize(60, 0);
        assert_eq!(f.to_vec(), want);
    }

    #[test]
    fn requests_are_taken_once_and_merged_and_wake_the_worker() {
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let requests = AnnounceRequests::new(wake.try_clone().unwrap());
        assert_eq!(requests.take(), None);
        let (a, b) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        requests.request(a);
        requests.request(b);
        assert_eq!(wake.read().unwrap(), 2);
        assert_eq!(requests.take(), Some(b));
        assert_eq!(requests.take(), None);
        // The zero MAC is still a request (the shim refuses it before it gets here).
        requests.request(MacAddr([0; 6]));
        assert_eq!(requests.take(), Some(MacAddr([0; 6])));
    }
}
