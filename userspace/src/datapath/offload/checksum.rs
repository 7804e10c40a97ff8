//! The Internet checksum (RFC 1071), as the offloads need it: over a frame's bytes, with a
//! pseudo-header, and completing a checksum the guest left partial.

/// The ones'-complement sum of `data` (as big-endian 16-bit words, an odd last byte padded
/// with zero) added to `acc`, not yet folded. Sums 32-bit words into 64 bits: the carries
/// stay in the upper half and [`fold`] adds them back, which gives the same 16-bit result
/// as summing 16-bit words one at a time, with a quarter of the additions.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Copies `src` into `dst` (the same length) and returns [`sum`]`(src, acc)`: one pass over
/// the bytes where a copy and a sum would take two. `src` must start at an even offset of the
/// data being summed, as a segment's payload does.
pub fn copy_and_sum(dst: &mut [u8], src: &[u8], mut acc: u64) -> u64 {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let w = u64::from_be_bytes(s.try_into().expect("8 bytes"));
        d.copy_from_slice(s);
        acc += w >> 32;
        acc += w & 0xffff_ffff;
    }
    let rest = s.remainder();
    d.into_remainder().copy_from_slice(rest);
    sum(rest, acc)
}

/// Folds a [`sum`] to 16 bits with end-around carries.
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum field's value for data whose [`sum`] is `acc`.
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// The TCP/UDP pseudo-header's [`sum`]: addresses, protocol, and the transport length.
pub fn pseudo_header(src: &[u8], dst: &[u8], protocol: u8, l4_len: usize) -> u64 {
    let acc = sum(src, 0);
    let acc = sum(dst, acc);
    acc + u64::from(protocol) + l4_len as u64
}

/// Completes a checksum the guest left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM): the field at
/// `start + offset` holds the pseudo-header sum, and the checksum over `frame[start..]` goes
/// there, as Linux's `skb_checksum_help` does (a result of 0 is sent as 0xffff, which UDP
/// needs and TCP does not mind). The caller checked that the field lies inside `frame`.
pub fn complete(frame: &mut [u8], start: usize, offset: usize) {
    let at = start + offset;
    let value = finish(sum(&frame[start..], 0));
    let value = if value == 0 { 0xffff } else { value };
    frame[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Whether the checksum over `data` (field included) plus `acc` verifies.
pub fn verifies(data: &[u8], acc: u64) -> bool {
    fold(sum(data, acc)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's reference: 16-bit words one at a time.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for w in data.chunks(2) {
            let word = u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]);
            acc += u32::from(word);
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn matches_the_rfc_1071_reference_for_every_length() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(
                finish(sum(&data[..len], 0)),
                reference(&data[..len]),
                "{len}"
            );
        }
        let ones = vec![0xffu8; 70_000];
        assert_eq!(finish(sum(&ones, 0)), reference(&ones));
    }

    #[test]
    fn copy_and_sum_copies_and_sums_like_sum() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 13 + 5) as u8).collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 999, 1000] {
            let mut out = vec![0u8; len];
            let acc = copy_and_sum(&mut out, &data[..len], 12345);
            assert_eq!(out, &data[..len]);
            assert_eq!(fold(acc), fold(sum(&data[..len], 12345)), "{len}");
        }
    }

    #[test]
    fn rfc_1071_example() {
        // RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
    }

    #[test]
    fn completed_checksum_verifies() {
        let mut frame: Vec<u8> = (0..101u32).map(|i| (i * 31) as u8).collect();
        // A partial checksum at offset 16 of a "transport header" starting at 20.
        frame[36] = 0x12;
        frame[37] = 0x34;
        complete(&mut frame, 20, 16);
        // The receiver adds the pseudo-header sum the field held.
        assert!(verifies(&frame[20..], 0x1234));
        assert!(!verifies(&frame[20..], 0x1235));
    }
}
