//! 802.1Q tag bytes: building a tag, and taking it out of or putting it into an Ethernet frame.
//!
//! Plain functions over byte slices, so that every edge (short frames, full buffers, untagged
//! frames) is unit-tested without a socket; the AF_XDP socket calls them on UMEM frames.
//! A tagged port's guest sees plain Ethernet: frames from the wire lose the tag before
//! delivery, and frames the guest sends get it inserted on their way to the NIC. An untagged
//! port's guest gets priority-tagged frames (VID 0, which the steering program treats as
//! untagged) without the tag.
//!
//! The priority tag comes off here, on receive, rather than in the XDP program: this is where
//! a tagged port's tag already comes off, on bytes the copy to the guest reads next anyway,
//! with the same unit-tested byte work; the steering program stays a lookup that never writes
//! a frame, so what it passes to the host stack reaches it exactly as it came off the wire.

use xvdpa_common::ETH_P_8021Q;

/// Bytes of an 802.1Q tag (TPID and TCI): the datapath's, which offsets a tagged port's
/// frames by it.
pub use crate::datapath::device::VLAN_TAG_LEN as TAG_LEN;

/// Where the tag goes: right after the destination and source MAC addresses.
const MACS_LEN: usize = 12;

/// The smallest frame [`strip_in_place`] takes a tag from: MACs, tag and an EtherType.
const MIN_TAGGED_LEN: usize = MACS_LEN + TAG_LEN + 2;

/// Tag protocol identifiers a frame may open with: 802.1Q, 802.1ad (the QinQ service tag)
/// and 0x9100, which QinQ used before 802.1ad.
const VLAN_TPIDS: [u16; 3] = [ETH_P_8021Q, 0x88a8, 0x9100];

/// Whether `frame` (at least its Ethernet header) carries a VLAN tag of any kind, priority
/// tags (VID 0) included. A frame too short to hold an EtherType carries none.
pub fn carries_vlan_tag(frame: &[u8]) -> bool {
    frame
        .get(MACS_LEN..MACS_LEN + 2)
        .is_some_and(|t| VLAN_TPIDS.contains(&u16::from_be_bytes([t[0], t[1]])))
}

/// Takes the tag a port's guest must not see off a received frame, in place as
/// [`strip_in_place`] does: for a tagged port (`tagged_port`) its 802.1Q tag, which is the
/// only one the steering program hands it; for an untagged port a priority tag (802.1Q with
/// VID 0), which the steering program treats as untagged. Returns whether a tag was removed.
pub fn strip_on_receive(frame: &mut [u8], tagged_port: bool) -> bool {
    let priority_tagged = frame
        .get(MACS_LEN + 2..MACS_LEN + TAG_LEN)
        .is_some_and(|tci| u16::from_be_bytes([tci[0], tci[1]]) & 0x0fff == 0);
    (tagged_port || priority_tagged) && strip_in_place(frame)
}

/// The four bytes of an 802.1Q tag for VLAN `vid` (priority 0). Only the low 12 bits of `vid`
/// are a VLAN id; higher bits would set the priority and DEI fields, so they are dropped.
pub fn vlan_tag(vid: u16) -> [u8; TAG_LEN] {
    let [a, b] = ETH_P_8021Q.to_be_bytes();
    let [c, d] = (vid & 0x0fff).to_be_bytes();
    [a, b, c, d]
}

/// Removes the 802.1Q tag of `frame` in place if it has one: the MAC addresses move up four
/// bytes over the tag, so the untagged frame is `frame[TAG_LEN..]`. Returns whether a tag was
/// removed; a frame without one, or too short to hold one and an EtherType, is left alone.
///
/// Moving the 12 bytes of MACs rather than the payload keeps the cost fixed whatever the size.
pub fn strip_in_place(frame: &mut [u8]) -> bool {
    if frame.len() < MIN_TAGGED_LEN || frame[MACS_LEN..MACS_LEN + 2] != ETH_P_8021Q.to_be_bytes() {
        return false;
    }
    frame.copy_within(..MACS_LEN, TAG_LEN);
    true
}

/// Inserts a tag for `vid` after the MAC addresses of the `len`-byte frame at the start of
/// `buf`, moving the rest of the frame back. Returns the tagged length, or `None` (nothing
/// changed) when the frame is shorter than its MAC addresses or `buf` has no room for the tag.
pub fn insert_tag(buf: &mut [u8], len: usize, vid: u16) -> Option<usize> {
    let tagged = len.checked_add(TAG_LEN)?;
    if len < MACS_LEN || tagged > buf.len() {
        return None;
    }
    buf.copy_within(MACS_LEN..len, MACS_LEN + TAG_LEN);
    buf[MACS_LEN..MACS_LEN + TAG_LEN].copy_from_slice(&vlan_tag(vid));
    Some(tagged)
}

/// Writes `frame` with a tag for `vid` inserted into the start of `to`, leaving `frame` as it
/// is (its untagged bytes still go to other ports). Returns the tagged length, or `None`
/// (nothing written) under the same conditions as [`insert_tag`].
pub fn tagged_copy(frame: &[u8], to: &mut [u8], vid: u16) -> Option<usize> {
    let len = frame.len();
    let tagged = len.checked_add(TAG_LEN)?;
    if len < MACS_LEN || tagged > to.len() {
        return None;
    }
    to[..MACS_LEN].copy_from_slice(&frame[..MACS_LEN]);
    to[MACS_LEN..MACS_LEN + TAG_LEN].copy_from_slice(&vlan_tag(vid));
    to[MACS_LEN + TAG_LEN..tagged].copy_from_slice(&frame[MACS_LEN..]);
    Some(tagged)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An untagged frame: dst MAC 1s, src MAC 2s, IPv4 EtherType, `payload` bytes of 0xab.
    fn untagged(payload: usize) -> Vec<u8> {
        let mut f = vec![1; 6];
        f.extend([2; 6]);
        f.extend([0x08, 0x00]);
        f.extend(std::iter::repeat_n(0xab, payload));
        f
    }

    /// The same frame with a tag for `vid` after the MACs.
    fn tagged(payload: usize, vid: u16) -> Vec<u8> {
        let plain = untagged(payload);
        let mut f = plain[..12].to_vec();
        f.extend(vlan_tag(vid));
        f.extend(&plain[12..]);
        f
    }

    #[test]
    fn tag_bytes_are_tpid_then_vid() {
        assert_eq!(vlan_tag(0), [0x81, 0x00, 0x00, 0x00]);
        assert_eq!(vlan_tag(100), [0x81, 0x00, 0x00, 100]);
        assert_eq!(vlan_tag(4095), [0x81, 0x00, 0x0f, 0xff]);
    }

    #[test]
    fn tag_keeps_only_the_twelve_vid_bits() {
        // Priority and DEI bits in the argument must not reach the wire.
        assert_eq!(vlan_tag(0xf064), vlan_tag(0x064));
        assert_eq!(vlan_tag(0x1000), vlan_tag(0));
    }

    #[test]
    fn strip_removes_the_tag_and_keeps_the_frame() {
        let mut f = tagged(46, 7);
        assert!(strip_in_place(&mut f));
        assert_eq!(&f[TAG_LEN..], &untagged(46)[..]);
    }

    #[test]
    fn strip_leaves_untagged_frames_alone() {
        let mut f = untagged(46);
        assert!(!strip_in_place(&mut f));
        assert_eq!(f, untagged(46));
    }

    #[test]
    fn strip_needs_room_for_macs_tag_and_ethertype() {
        // Tagged but cut right after the tag: no EtherType, nothing to deliver.
        let mut f = tagged(0, 7)[..16].to_vec();
        let before = f.clone();
        assert!(!strip_in_place(&mut f));
        assert_eq!(f, before);
        // The shortest frame it takes: MACs, tag and EtherType.
        let mut f = tagged(0, 7);
        assert_eq!(f.len(), MIN_TAGGED_LEN);
        assert!(strip_in_place(&mut f));
        assert_eq!(&f[TAG_LEN..], &untagged(0)[..]);
        // Shorter than the MACs: not even a TPID to look at.
        let mut f = vec![0x81; 5];
        assert!(!strip_in_place(&mut f));
        assert!(!strip_in_place(&mut []));
    }

    #[test]
    fn insert_puts_the_tag_after_the_macs() {
        let plain = untagged(46);
        let mut buf = vec![0; 128];
        buf[..plain.len()].copy_from_slice(&plain);
        assert_eq!(insert_tag(&mut buf, plain.len(), 7), Some(plain.len() + 4));
        assert_eq!(&buf[..plain.len() + 4], &tagged(46, 7)[..]);
    }

    #[test]
    fn insert_masks_the_vid() {
        let plain = untagged(0);
        let mut buf = vec![0; 64];
        buf[..plain.len()].copy_from_slice(&plain);
        insert_tag(&mut buf, plain.len(), 0xf007).unwrap();
        assert_eq!(&buf[12..16], &vlan_tag(7));
    }

    #[test]
    fn insert_fills_a_buffer_exactly_but_not_beyond() {
        let plain = untagged(10);
        let mut exact = plain.clone();
        exact.extend([0; 4]);
        assert_eq!(
            insert_tag(&mut exact, plain.len(), 3),
            Some(plain.len() + 4)
        );
        assert_eq!(exact, tagged(10, 3));

        let mut short = plain.clone();
        short.extend([0; 3]);
        let before = short.clone();
        assert_eq!(insert_tag(&mut short, plain.len(), 3), None);
        assert_eq!(short, before, "a refused insert changes nothing");
    }

    #[test]
    fn insert_refuses_frames_shorter_than_the_macs() {
        let mut buf = vec![9; 64];
        assert_eq!(insert_tag(&mut buf, 11, 3), None);
        assert_eq!(buf, vec![9; 64]);
        // Exactly the MACs: the tag becomes the whole rest of the frame.
        assert_eq!(insert_tag(&mut buf, 12, 3), Some(16));
        assert_eq!(&buf[12..16], &vlan_tag(3));
        // A length past the buffer (or one that would overflow) is no room.
        assert_eq!(insert_tag(&mut buf, 64, 3), None);
        assert_eq!(insert_tag(&mut buf, usize::MAX, 3), None);
    }

    #[test]
    fn tagged_copy_writes_a_tagged_frame_and_keeps_the_source() {
        let plain = untagged(46);
        let mut to = vec![0; 128];
        assert_eq!(tagged_copy(&plain, &mut to, 7), Some(plain.len() + 4));
        assert_eq!(&to[..plain.len() + 4], &tagged(46, 7)[..]);
        assert!(to[plain.len() + 4..].iter().all(|&b| b == 0));
        assert_eq!(plain, untagged(46));
    }

    #[test]
    fn tagged_copy_edges() {
        let plain = untagged(10);
        // Room for exactly the tagged frame.
        let mut exact = vec![0; plain.len() + 4];
        assert_eq!(
            tagged_copy(&plain, &mut exact, 0xf003),
            Some(plain.len() + 4)
        );
        assert_eq!(exact, tagged(10, 3));
        // One byte short.
        let mut short = vec![0; plain.len() + 3];
        assert_eq!(tagged_copy(&plain, &mut short, 3), None);
        assert!(short.iter().all(|&b| b == 0));
        // Shorter than the MACs.
        let mut to = vec![0; 64];
        assert_eq!(tagged_copy(&plain[..11], &mut to, 3), None);
        assert_eq!(tagged_copy(&plain[..12], &mut to, 3), Some(16));
    }

    /// A frame whose first tag has TPID `tpid` and TCI `tci`.
    fn with_tag(tpid: u16, tci: u16) -> Vec<u8> {
        let plain = untagged(46);
        let mut f = plain[..12].to_vec();
        f.extend(tpid.to_be_bytes());
        f.extend(tci.to_be_bytes());
        f.extend(&plain[12..]);
        f
    }

    #[test]
    fn tagged_frames_are_recognised_by_any_vlan_tpid() {
        assert!(carries_vlan_tag(&tagged(46, 7)));
        assert!(carries_vlan_tag(&with_tag(0x88a8, 7)), "802.1ad S-tag");
        assert!(carries_vlan_tag(&with_tag(0x9100, 7)), "pre-standard QinQ");
        assert!(carries_vlan_tag(&with_tag(0x8100, 0)), "priority tag");
        assert!(!carries_vlan_tag(&untagged(46)));
        // Too short to hold an EtherType: nothing to say.
        assert!(!carries_vlan_tag(&tagged(46, 7)[..13]));
        assert!(!carries_vlan_tag(&[]));
    }

    #[test]
    fn receive_strip_takes_any_tag_for_a_tagged_port_and_only_priority_tags_otherwise() {
        // A tagged port: the steering program hands it frames with its own tag only.
        let mut f = tagged(46, 100);
        assert!(strip_on_receive(&mut f, true));
        assert_eq!(&f[TAG_LEN..], &untagged(46)[..]);
        // An untagged port: a VID-0 (priority) tag comes off, priority bits and all...
        let mut f = with_tag(0x8100, 0xe000);
        assert!(strip_on_receive(&mut f, false));
        assert_eq!(&f[TAG_LEN..], &untagged(46)[..]);
        // ...any other tag stays (the steering program never sends it one), and so do
        // untagged frames, 802.1ad tags and frames too short to hold a tag.
        for mut f in [
            tagged(46, 5),
            untagged(46),
            with_tag(0x88a8, 0),
            tagged(0, 0)[..16].to_vec(),
        ] {
            let before = f.clone();
            assert!(!strip_on_receive(&mut f, false));
            assert_eq!(f, before);
        }
    }

    #[test]
    fn strip_undoes_insert() {
        let plain = untagged(30);
        let mut buf = vec![0; 100];
        buf[..plain.len()].copy_from_slice(&plain);
        let len = insert_tag(&mut buf, plain.len(), 42).unwrap();
        assert!(strip_in_place(&mut buf[..len]));
        assert_eq!(&buf[TAG_LEN..len], &plain[..]);
    }
}
