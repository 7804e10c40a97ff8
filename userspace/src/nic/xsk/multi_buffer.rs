//! Frames larger than one UMEM frame (jumbo MTU): AF_XDP multi-buffer, Linux 6.6+.
//!
//! With `XDP_USE_SG` on the UMEM's binding, the kernel puts a received frame that does not fit
//! one UMEM frame into several rx descriptors, every one but the last marked `XDP_PKT_CONTD`,
//! and takes a transmitted frame the same way. Here the pieces of a received frame are
//! gathered until the last arrives (possibly in a later poll) and joined for the guest, and a
//! frame to send is cut into pieces. Both are plain code over [`UmemArea`] and its tokens, so
//! they are unit-tested without a kernel.
//!
//! The kernel is trusted with addresses, not with sequences: a frame of more than
//! [`MAX_PIECES`] pieces, or one with a piece that names no frame of the UMEM, is dropped and
//! counted, its pieces recycled at once, so no bad sequence can hold memory.

use std::collections::VecDeque;

use super::umem::{UmemArea, UmemFrame};

/// `XDP_PKT_CONTD` in a descriptor's options: the frame continues in the next descriptor.
pub(super) const XDP_PKT_CONTD: u32 = 1;

/// `XDP_USE_SG` in the bind flags: the socket takes and gives multi-buffer frames.
pub(super) const XDP_USE_SG: u16 = 1 << 4;

/// Most UMEM frames one Ethernet frame may span, either way: a 9000-byte MTU frame with a
/// VLAN tag takes 3 (of 3840 bytes after the kernel's receive headroom, or 4096 to send).
pub const MAX_PIECES: usize = 4;

/// A received piece: its UMEM frame, where the data lies in it, and whether the frame goes on
/// in the next piece.
#[derive(Debug)]
pub(super) struct RxPiece {
    pub(super) frame: UmemFrame,
    pub(super) start: u32,
    pub(super) len: u32,
    pub(super) more: bool,
}

/// `XDP_TX_METADATA` in a tx descriptor's options: the frame carries a TX metadata request
/// (Linux 6.8+) in the bytes before its data.
pub(super) const XDP_TX_METADATA: u32 = 1 << 1;

/// A filled transmit frame: how many of its bytes are to be sent, whether the Ethernet
/// frame goes on in the next one (all pieces of a multi-buffer frame but its last), and
/// whether its TX metadata holds a request (a checksum for the kernel or NIC to complete).
pub(super) struct TxFrame {
    pub(super) frame: UmemFrame,
    pub(super) len: u32,
    pub(super) more: bool,
    pub(super) metadata: bool,
}

impl TxFrame {
    pub(super) fn options(&self) -> u32 {
        let more = if self.more { XDP_PKT_CONTD } else { 0 };
        let metadata = if self.metadata { XDP_TX_METADATA } else { 0 };
        more | metadata
    }
}

/// Received frames waiting for the guest, and the one still arriving.
pub(super) struct RxAssembly {
    /// Pieces of complete frames, each frame's pieces together and in order.
    ready: VecDeque<RxPiece>,
    /// Complete frames in `ready`.
    frames: usize,
    /// Pieces of the frame whose last piece has not arrived yet.
    partial: Vec<RxPiece>,
    /// The frame arriving was dropped: its pieces are recycled until its last has passed.
    skipping: bool,
    /// Frames dropped for a bad piece sequence, not yet reported.
    dropped: u64,
    /// Multi-piece frames joined into one slice each for delivery (reused).
    joined: Vec<u8>,
}

impl RxAssembly {
    /// Room for `capacity` pieces before the deque grows.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        RxAssembly {
            ready: VecDeque::with_capacity(capacity),
            frames: 0,
            partial: Vec::with_capacity(MAX_PIECES),
            skipping: false,
            dropped: 0,
            joined: Vec::new(),
        }
    }

    /// Pieces held (complete frames and the one arriving).
    pub(super) fn pieces(&self) -> usize {
        self.ready.len() + self.partial.len()
    }

    /// Complete frames waiting.
    pub(super) fn frames(&self) -> usize {
        self.frames
    }

    /// Frames dropped for a bad piece sequence since the last call.
    pub(super) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Takes one rx descriptor's piece: `piece` is its frame and the offset of the data in it
    /// (`None` for an address outside the UMEM), `more` its `XDP_PKT_CONTD`. Frames given up
    /// go to `recycle`. Returns the completed frame's first piece, when this was its last.
    pub(super) fn push(
        &mut self,
        piece: Option<(UmemFrame, u32)>,
        len: u32,
        more: bool,
        recycle: &mut Vec<UmemFrame>,
    ) -> Option<&mut RxPiece> {
        let Some((frame, start)) = piece else {
            // Nothing to hold for this piece; the frame it belonged to is lost with it.
            self.give_up(more, recycle);
            return None;
        };
        if self.skipping {
            recycle.push(frame);
            self.skipping = more;
            return None;
        }
        if !more && self.partial.is_empty() {
            // A frame in one piece, by far the most common: straight to the waiting frames.
            self.ready.push_back(RxPiece {
                frame,
                start,
                len,
                more,
            });
            self.frames += 1;
            return self.ready.back_mut();
        }
        self.partial.push(RxPiece {
            frame,
            start,
            len,
            more,
        });
        if more && self.partial.len() >= MAX_PIECES {
            // A continuation past any frame the link can carry: drop what came so far and
            // the rest of it as it arrives.
            self.give_up(more, recycle);
            return None;
        }
        if more {
            return None;
        }
        let first = self.ready.len();
        self.ready.extend(self.partial.drain(..));
        self.frames += 1;
        self.ready.get_mut(first)
    }

    /// Drops the frame arriving (counted once), and the rest of its pieces if `more` says
    /// some are still to come.
    fn give_up(&mut self, more: bool, recycle: &mut Vec<UmemFrame>) {
        if !self.skipping {
            self.dropped += 1;
        }
        recycle.extend(self.partial.drain(..).map(|p| p.frame));
        self.skipping = more;
    }

    /// Hands up to `max` complete frames, each as one slice, to `deliver`, which returns how
    /// many it consumed (in order); their frames go to `recycle`. A one-piece frame is read
    /// where it lies; a multi-piece one is joined into a buffer first.
    pub(super) fn drain<E>(
        &mut self,
        area: &UmemArea,
        max: usize,
        recycle: &mut Vec<UmemFrame>,
        deliver: impl FnOnce(&mut dyn Iterator<Item = &[u8]>) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let n = max.min(self.frames);
        // Every frame waiting in one piece (the common case): nothing to join or count.
        let single = self.ready.len() == self.frames;
        self.joined.clear();
        let end = if single { n } else { self.join(area, n) };
        let mut frames = Frames {
            ready: &self.ready,
            area,
            joined: &self.joined,
            next: 0,
            end,
            joined_at: 0,
        };
        let consumed = deliver(&mut frames)?.min(n);
        let pieces = if single {
            consumed
        } else {
            (0..consumed).fold(0, |end, _| self.frame_end(end))
        };
        recycle.extend(self.ready.drain(..pieces).map(|p| p.frame));
        self.frames -= consumed;
        Ok(consumed)
    }

    /// Joins the multi-piece frames among the first `n`, in order, into `joined`; returns
    /// where the `n`th frame ends in `ready`.
    fn join(&mut self, area: &UmemArea, n: usize) -> usize {
        let mut end = 0;
        for _ in 0..n {
            let first = end;
            end = self.frame_end(first);
            if end - first > 1 {
                for p in self.ready.range(first..end) {
                    self.joined
                        .extend_from_slice(area.data(&p.frame, p.start, p.len));
                }
            }
        }
        end
    }

    /// Where the frame whose first piece is `ready[first]` ends (one past its last piece).
    fn frame_end(&self, first: usize) -> usize {
        let mut i = first;
        while self.ready.get(i).is_some_and(|p| p.more) {
            i += 1;
        }
        (i + 1).min(self.ready.len())
    }

    /// Drops every complete frame; returns how many. The frame still arriving stays, so its
    /// later pieces are not mistaken for a new frame.
    pub(super) fn discard_ready(&mut self, recycle: &mut Vec<UmemFrame>) -> usize {
        recycle.extend(self.ready.drain(..).map(|p| p.frame));
        std::mem::take(&mut self.frames)
    }

    /// Gives up everything held, the frame arriving included (the socket is closing).
    pub(super) fn discard_all(&mut self, recycle: &mut Vec<UmemFrame>) -> usize {
        recycle.extend(self.partial.drain(..).map(|p| p.frame));
        self.discard_ready(recycle)
    }
}

/// The slices [`RxAssembly::drain`] hands out.
struct Frames<'a> {
    ready: &'a VecDeque<RxPiece>,
    area: &'a UmemArea,
    joined: &'a [u8],
    next: usize,
    end: usize,
    joined_at: usize,
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.next >= self.end {
            return None;
        }
        let first = &self.ready[self.next];
        if !first.more {
            self.next += 1;
            // A descriptor the kernel got wrong would be a kernel bug; `data` passes it on as
            // empty rather than trusted, so it can never read outside its frame.
            return Some(self.area.data(&first.frame, first.start, first.len));
        }
        let mut len = 0;
        while self.next < self.end {
            let p = &self.ready[self.next];
            len += self.area.data(&p.frame, p.start, p.len).len();
            self.next += 1;
            if !p.more {
                break;
            }
        }
        let at = self.joined_at;
        self.joined_at += len;
        self.joined.get(at..at + len)
    }
}

/// Copies `bytes` into as many frames from the end of `free` as it takes (`piece_len` bytes
/// each, from `start` on in each frame), in order onto `staged`, all but the last marked as
/// continued. Returns false, with nothing taken, when `bytes` is empty or needs more than
/// [`MAX_PIECES`] or than `free` has.
pub(super) fn scatter(
    area: &UmemArea,
    bytes: &[u8],
    start: usize,
    piece_len: usize,
    free: &mut Vec<UmemFrame>,
    staged: &mut Vec<TxFrame>,
) -> bool {
    let pieces = bytes.len().div_ceil(piece_len.max(1));
    if pieces == 0 || pieces > MAX_PIECES || pieces > free.len() {
        return false;
    }
    let last = pieces - 1;
    for (i, chunk) in bytes.chunks(piece_len).enumerate() {
        let mut frame = free.pop().expect("counted above");
        area.frame_mut(&mut frame)[start..start + chunk.len()].copy_from_slice(chunk);
        staged.push(TxFrame {
            frame,
            len: chunk.len() as u32,
            more: i < last,
            metadata: false,
        });
    }
    true
}
