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
