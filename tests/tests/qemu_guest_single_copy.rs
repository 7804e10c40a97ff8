//! `qemu_guest.rs` again, on the single-copy path: the guest's port has `guest-umem=on`, so
//! its memory is the NIC queue's UMEM (the test lab's NIC has one queue and the guest one
//! queue pair). The jumbo-frame test runs too: MTU 9000 does not fit one chunk, so that port
//! takes the copy path, as it must. Needs root and QEMU; `cargo xtask test` runs it.

const PORT_SETTINGS: &str = ",guest-umem=on";

#[path = "qemu_guest.rs"]
mod suite;
