//! Frames one guest sends another, made fit for the receiver: a frame whose offload the
//! receiving guest negotiated goes as it is (as a Linux bridge between two taps passes it);
//! otherwise its checksum is completed, or it is segmented, first.

use super::{checksum, classify, NetHeader, Offload, Offloads, F_DATA_VALID};
use crate::datapath::device::{rx_header, VNET_HDR_LEN};

/// What finishing a batch did, for the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FinishTally {
    /// Frames handed on with their offload request intact.
    pub passed: u64,
    /// Partial checksums completed.
    pub csum_computed: u64,
    /// Segments made from TSO frames.
    pub segments: u64,
}

/// Where one frame for the receiver lies: in the sender's arena, or in [`Finished`]'s own
/// buffer (segments).
#[derive(Debug, Clone, Copy)]
enum Piece {
    Arena { start: usize, len: usize },
    Own { start: usize, len: usize },
}

/// One receiver's frames of a batch, finished for it. Reused across batches.
#[derive(Default)]
pub struct Finished {
    pieces: Vec<Piece>,
    buf: Vec<u8>,
}

const ALL: Offloads = Offloads {
    csum: true,
    tso4: true,
    tso6: true,
    ecn: true,
};

impl Finished {
    /// Prepares the frames at `(start, len)` of `arena` (each a receive net header then
    /// `len` bytes of frame, as the transmit path leaves them, offloads already checked) for
    /// a guest that takes `takes`. Partial checksums are completed in the arena itself (each
    /// frame goes to one receiver); segments go to a buffer of their own.
    pub fn prepare(
        &mut self,
        frames: impl Iterator<Item = (usize, usize)>,
        arena: &mut [u8],
        takes: Offloads,
        tally: &mut FinishTally,
    ) {
        self.pieces.clear();
        self.buf.clear();
        for (start, len) in frames {
            let body = start + VNET_HDR_LEN;
            let hdr = NetHeader::parse(arena[start..body].first_chunk().expect("header"));
            if !hdr.wants_offload() {
                self.pieces.push(Piece::Arena { start, len });
                continue;
            }
            // Checked when it was sent; checked again here on the daemon's own copy, so
            // nothing below rests on a guest's promise.
            let Ok(offload) = classify(&hdr, &arena[body..body + len], ALL) else {
                continue;
            };
            if takes.accept(&offload) {
                tally.passed += 1;
                self.pieces.push(Piece::Arena { start, len });
                continue;
            }
            match offload {
                Offload::None => self.pieces.push(Piece::Arena { start, len }),
                Offload::Checksum { start: cs, offset } => {
                    checksum::complete(&mut arena[body..body + len], cs, offset);
                    arena[start..body].copy_from_slice(&rx_header(1));
                    tally.csum_computed += 1;
                    self.pieces.push(Piece::Arena { start, len });
                }
                Offload::Tso(plan) => {
                    let frame = &arena[body..body + len];
                    for i in 0..plan.segments() {
                        let at = self.buf.len();
                        let seg_len = plan.segment_len(i);
                        self.buf.resize(at + VNET_HDR_LEN + seg_len, 0);
                        // Checksums are complete and were just computed: say so, when the
                        // receiver takes that hint, so it does not check them again.
                        let mut h = rx_header(1);
                        if takes.csum {
                            h[0] = F_DATA_VALID;
                        }
                        self.buf[at..at + VNET_HDR_LEN].copy_from_slice(&h);
                        let n = plan.write_segment(frame, i, &mut self.buf[at + VNET_HDR_LEN..]);
                        self.pieces.push(Piece::Own { start: at, len: n });
                        tally.segments += 1;
                    }
                }
            }
        }
    }

    /// The prepared frames, each with its net header, in order.
    pub fn frames<'a>(&'a self, arena: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.pieces.iter().map(move |p| match *p {
            Piece::Arena { start, len } => &arena[start..start + VNET_HDR_LEN + len],
            Piece::Own { start, len } => &self.buf[start..start + VNET_HDR_LEN + len],
        })
    }
}
