//! Frame ownership of the UMEM mapping, without a socket (no root needed: nothing is
//! registered with the kernel).

use super::umem::UmemArea;

#[test]
fn a_token_per_frame_each_at_its_own_address() {
    let (area, frames) = UmemArea::new(8, 2048).unwrap();
    assert_eq!(frames.len(), 8);
    let addrs: Vec<u64> = frames.iter().map(|f| area.addr(f)).collect();
    assert_eq!(addrs, (0..8).map(|i| i * 2048).collect::<Vec<_>>());
    assert!(frames.iter().all(|f| area.frame(f).len() == 2048));
}

#[test]
fn writes_through_a_token_stay_in_its_frame() {
    let (area, mut frames) = UmemArea::new(4, 4096).unwrap();
    for (i, f) in frames.iter_mut().enumerate() {
        area.frame_mut(f).fill(i as u8 + 1);
    }
    for (i, f) in frames.iter().enumerate() {
        assert!(area.frame(f).iter().all(|&b| b == i as u8 + 1), "frame {i}");
    }
}

#[test]
fn data_is_bounded_by_the_frame() {
    let (area, mut frames) = UmemArea::new(2, 2048).unwrap();
    let f = &mut frames[0];
    area.frame_mut(f)[256..260].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(area.data(f, 256, 4), &[1, 2, 3, 4]);
    assert_eq!(area.data(f, 0, 2048).len(), 2048);
    // A span past the frame (a bad descriptor) reads as nothing, never as the next frame.
    assert!(area.data(f, 2000, 100).is_empty());
    assert!(area.data(f, u32::MAX, u32::MAX).is_empty());
}

#[test]
fn reclaim_finds_the_frame_and_the_offset_in_it() {
    let (area, frames) = UmemArea::new(4, 2048).unwrap();
    let addr = area.addr(&frames[2]);
    drop(frames);
    // SAFETY: the tokens were dropped above, as handing frames to the kernel does; nothing
    // else holds frame 2.
    let (frame, start) = unsafe { area.reclaim(addr + 256) }.unwrap();
    assert_eq!((area.addr(&frame), start), (addr, 256));
    // SAFETY: outside the area, so no token is made.
    assert!(unsafe { area.reclaim(4 * 2048) }.is_none());
    // SAFETY: as above.
    assert!(unsafe { area.reclaim(u64::MAX) }.is_none());
}

#[test]
#[should_panic(expected = "another UMEM")]
fn a_token_does_not_open_another_area() {
    let (a, mut frames) = UmemArea::new(2, 2048).unwrap();
    let (b, _) = UmemArea::new(2, 2048).unwrap();
    let _ = a.frame_mut(&mut frames[0]);
    let _ = b.frame_mut(&mut frames[0]);
}

#[test]
fn an_empty_area_is_refused() {
    assert!(UmemArea::new(0, 2048).is_err());
}

mod multi_buffer {
    //! Received pieces joined into frames, and frames cut into pieces, as the kernel's
    //! multi-buffer descriptors carry them.

    use super::super::multi_buffer::{scatter, RxAssembly, TxFrame, MAX_PIECES, XDP_PKT_CONTD};
    use super::super::umem::{UmemArea, UmemFrame};

    /// The kernel leaves this much room before received data.
    const HEADROOM: u32 = 256;

    /// An area with `n` frames of 4096 bytes, as the daemon maps.
    fn area(n: u32) -> (UmemArea, Vec<UmemFrame>) {
        UmemArea::new(n, 4096).unwrap()
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// The receive side of one socket, with the kernel's part played by the test: it writes
    /// pieces into free frames and pushes their descriptors.
    struct Rx {
        area: UmemArea,
        free: Vec<UmemFrame>,
        rx: RxAssembly,
        /// Frames the assembly gave back; the "kernel" reuses them when it runs out.
        recycle: Vec<UmemFrame>,
    }

    impl Rx {
        fn new(frames: u32) -> Self {
            let (area, free) = area(frames);
            Rx {
                area,
                free,
                rx: RxAssembly::with_capacity(64),
                recycle: Vec::new(),
            }
        }

        /// Receives one piece (after the kernel's headroom); true if it completed a frame.
        fn piece(&mut self, data: &[u8], more: bool) -> bool {
            if self.free.is_empty() {
                self.free.append(&mut self.recycle);
            }
            let mut frame = self.free.pop().expect("a free frame");
            let start = HEADROOM as usize;
            self.area.frame_mut(&mut frame)[start..start + data.len()].copy_from_slice(data);
            self.rx
                .push(
                    Some((frame, HEADROOM)),
                    data.len() as u32,
                    more,
                    &mut self.recycle,
                )
                .is_some()
        }

        /// Receives `frame` cut into pieces of at most 3840 bytes (4096 less the headroom).
        fn frame(&mut self, frame: &[u8]) -> bool {
            let pieces: Vec<&[u8]> = frame.chunks(4096 - HEADROOM as usize).collect();
            let last = pieces.len() - 1;
            let mut done = false;
            for (i, p) in pieces.into_iter().enumerate() {
                done = self.piece(p, i < last);
            }
            done
        }

        /// Offers up to `max` frames to a guest that takes `take` of them.
        fn drain(&mut self, max: usize, take: usize) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let took = self
                .rx
                .drain(&self.area, max, &mut self.recycle, |frames| {
                    out.extend(frames.map(|f| f.to_vec()));
                    Ok::<_, ()>(take.min(out.len()))
                })
                .unwrap();
            assert_eq!(took, take.min(out.len()));
            out
        }

        fn drain_all(&mut self) -> Vec<Vec<u8>> {
            self.drain(usize::MAX, usize::MAX)
        }
    }

    #[test]
    fn a_jumbo_frame_arriving_over_two_polls_is_handed_out_whole() {
        let mut k = Rx::new(16);
        let jumbo = bytes(9018, 3);
        let (a, rest) = jumbo.split_at(3840);
        let (b, c) = rest.split_at(3840);
        // First poll: two pieces, the frame still open.
        assert!(!k.piece(a, true));
        assert!(!k.piece(b, true));
        assert_eq!(k.rx.frames(), 0, "nothing is waiting before the last piece");
        assert!(k.drain_all().is_empty());
        // Next poll: the last piece.
        assert!(k.piece(c, false));
        assert_eq!(k.rx.frames(), 1);
        assert_eq!(k.drain_all(), vec![jumbo]);
        assert_eq!(k.recycle.len(), 3, "every piece's UMEM frame goes back");
        assert_eq!(k.rx.pieces(), 0);
        assert_eq!(k.rx.take_dropped(), 0);
    }

    #[test]
    fn small_and_jumbo_frames_keep_their_order_and_bytes() {
        let mut k = Rx::new(32);
        let frames = [
            bytes(60, 1),
            bytes(9014, 2),
            bytes(1514, 3),
            bytes(3840, 4),
            bytes(3841, 5),
            bytes(7000, 6),
        ];
        for f in &frames {
            assert!(k.frame(f));
        }
        assert_eq!(k.rx.frames(), frames.len());
        assert_eq!(k.drain_all(), frames.to_vec());
        assert_eq!(k.recycle.len(), 1 + 3 + 1 + 1 + 2 + 2);
    }

    #[test]
    fn a_guest_taking_part_of_a_batch_leaves_the_rest_whole() {
        let mut k = Rx::new(32);
        let frames = [bytes(9000, 1), bytes(100, 2), bytes(8000, 3)];
        for f in &frames {
            k.frame(f);
        }
        assert_eq!(k.drain(2, 1), frames[..2].to_vec(), "offered two, whole");
        assert_eq!(
            k.recycle.len(),
            3,
            "only the consumed frame's pieces go back"
        );
        assert_eq!(k.rx.frames(), 2);
        assert_eq!(k.drain_all(), frames[1..].to_vec());
    }

    #[test]
    fn one_piece_frames_taken_in_part_leave_the_rest_in_order() {
        let mut k = Rx::new(8);
        let frames = [bytes(60, 1), bytes(1514, 2), bytes(3840, 3)];
        for f in &frames {
            assert!(k.frame(f));
        }
        assert_eq!(k.drain(2, 1), frames[..2].to_vec());
        assert_eq!(k.recycle.len(), 1);
        assert_eq!(k.drain_all(), frames[1..].to_vec());
        assert_eq!((k.recycle.len(), k.rx.pieces()), (3, 0));
    }

    #[test]
    fn a_continuation_that_never_ends_is_one_counted_drop_holding_nothing() {
        let mut k = Rx::new(8);
        // A kernel gone wrong: pieces marked "more" forever. Each is given back at once.
        for i in 0..1000 {
            assert!(!k.piece(&bytes(100, i as u8), true));
            assert!(k.rx.pieces() <= MAX_PIECES, "held {} pieces", k.rx.pieces());
        }
        assert_eq!(k.rx.frames(), 0);
        // The bad frame's last piece ends it; the next frame is whole and right.
        assert!(!k.piece(&bytes(10, 0), false));
        assert!(k.piece(&bytes(64, 9), false));
        assert_eq!(k.rx.take_dropped(), 1);
        assert_eq!(k.drain_all(), vec![bytes(64, 9)]);
        assert_eq!(k.rx.pieces(), 0);
    }

    #[test]
    fn a_frame_of_too_many_pieces_is_dropped_and_counted() {
        let mut k = Rx::new(16);
        assert!(!k.frame(&bytes(3840 * MAX_PIECES + 1, 1)));
        assert_eq!(k.rx.take_dropped(), 1);
        assert_eq!(k.rx.frames(), 0);
        assert_eq!(k.recycle.len(), MAX_PIECES + 1, "every piece went back");
        // The longest frame allowed still passes.
        let longest = bytes(3840 * MAX_PIECES, 2);
        assert!(k.frame(&longest));
        assert_eq!(k.drain_all(), vec![longest]);
    }

    #[test]
    fn a_piece_outside_the_umem_loses_its_frame_only() {
        let mut k = Rx::new(8);
        k.piece(&bytes(3840, 1), true);
        // A descriptor whose address named no frame: the frame is lost, and its last piece
        // (still to come) must not start a new one.
        assert!(k.rx.push(None, 3840, true, &mut k.recycle).is_none());
        assert!(!k.piece(&bytes(100, 2), false));
        assert!(k.piece(&bytes(60, 3), false));
        assert_eq!(k.rx.take_dropped(), 1);
        assert_eq!(k.drain_all(), vec![bytes(60, 3)]);
        assert_eq!(k.recycle.len(), 3);
    }

    #[test]
    fn discarding_waiting_frames_keeps_the_one_arriving_whole() {
        let mut k = Rx::new(16);
        k.frame(&bytes(9000, 1));
        let next = bytes(5000, 2);
        k.piece(&next[..3840], true);
        assert_eq!(k.rx.discard_ready(&mut k.recycle), 1);
        assert_eq!(k.recycle.len(), 3);
        assert!(k.piece(&next[3840..], false));
        assert_eq!(k.drain_all(), vec![next]);
        // Closing gives up a frame still arriving too.
        k.piece(&bytes(3840, 3), true);
        let before = k.recycle.len();
        assert_eq!(k.rx.discard_all(&mut k.recycle), 0);
        assert_eq!(k.recycle.len(), before + 1);
        assert_eq!(k.rx.pieces(), 0);
    }

    /// Cuts `frame` into pieces whose data starts at `start` of their 4096-byte frames,
    /// checks that they join back into it, and returns them with their lengths.
    fn cut(
        area: &UmemArea,
        free: &mut Vec<UmemFrame>,
        frame: &[u8],
        start: usize,
    ) -> (Vec<TxFrame>, Vec<u32>) {
        let mut staged = Vec::new();
        assert!(scatter(area, frame, start, 4096 - start, free, &mut staged));
        let joined: Vec<u8> = staged
            .iter()
            .flat_map(|s| area.data(&s.frame, start as u32, s.len).to_vec())
            .collect();
        assert_eq!(joined, frame);
        let lens = staged.iter().map(|s| s.len).collect();
        (staged, lens)
    }

    #[test]
    fn a_jumbo_frame_is_cut_into_marked_pieces_in_order() {
        let (area, mut free) = area(8);
        let (staged, lens) = cut(&area, &mut free, &bytes(9018, 4), 0);
        assert_eq!(free.len(), 5);
        assert_eq!(lens, [4096, 4096, 826]);
        let options: Vec<u32> = staged.iter().map(TxFrame::options).collect();
        assert_eq!(options, [XDP_PKT_CONTD, XDP_PKT_CONTD, 0]);
    }

    #[test]
    fn pieces_start_after_the_tx_metadata_room() {
        let (area, mut free) = area(8);
        let (staged, lens) = cut(&area, &mut free, &bytes(9018, 5), 24);
        assert_eq!(lens, [4072, 4072, 874]);
        // The room before each piece's data is left alone: no piece asks for metadata.
        assert!(staged.iter().all(|s| !s.metadata));
        assert!(staged
            .iter()
            .all(|s| area.data(&s.frame, 0, 24).iter().all(|&b| b == 0)));
    }

    #[test]
    fn a_frame_too_long_or_short_of_buffers_takes_nothing() {
        let (area, mut free) = area(8);
        let mut staged = Vec::new();
        let too_long = bytes(4096 * MAX_PIECES + 1, 1);
        assert!(!scatter(&area, &too_long, 0, 4096, &mut free, &mut staged));
        assert!(!scatter(&area, &[], 0, 4096, &mut free, &mut staged));
        free.truncate(2);
        assert!(!scatter(
            &area,
            &bytes(9000, 1),
            0,
            4096,
            &mut free,
            &mut staged
        ));
        assert_eq!((free.len(), staged.len()), (2, 0));
        // One that fits one buffer is one unmarked piece.
        assert!(scatter(
            &area,
            &bytes(4096, 1),
            0,
            4096,
            &mut free,
            &mut staged
        ));
        assert_eq!(staged.iter().map(TxFrame::options).collect::<Vec<_>>(), [0]);
    }
}
