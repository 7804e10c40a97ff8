//! Finds the XDP object that `cargo xtask build` compiled, so the daemon can embed it.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=XVDPA_EBPF_OBJECT");
    let path = match std::env::var_os("XVDPA_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/xvdpa-ebpf"),
    };
    if !path.is_file() {
        panic!(
            "the XDP program is not built (looked for {}): run `cargo xtask build`, which \
             installs the eBPF toolchain if needed and builds it",
            path.display()
        );
    }
    let path = path
        .canonicalize()
        .expect("canonical path of an existing file");
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=XVDPA_EBPF_OBJECT={}", path.display());
}
