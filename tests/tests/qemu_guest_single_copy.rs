//! `qemu_guest.rs` again, on the single-copy path: the guest's port has `guest-umem=on`, so
//! its memory is the NIC queue's UMEM (the test lab's NIC has one queue and the guest one
//! queue pair). The jumbo-frame test runs too: MTU 9000 does not fit one chunk, so that port
//! takes the copy path, as it must. The guest's frames also go out from its own buffers
//! (`guest-umem-tx=in-place`; on veth, a copy-mode NIC, the default copies them once into the
//! daemon's slots, which `guest_umem_port.rs` covers). Needs root and QEMU; `cargo xtask test`
//! runs it.

const PORT_SETTINGS: &str = ",guest-umem=on,guest-umem-tx=in-place";

#[path = "qemu_guest.rs"]
mod suite;
