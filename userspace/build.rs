//! Finds the XDP object that `cargo xtask build` compiled, so the daemon can embed it.
//!
//! The object comes from `XVDPA_EBPF_OBJECT` (which `cargo xtask` sets), else from the eBPF
//! crate's usual output under `target/`. When it exists, the crate is built with the cfg
//! `xvdpa_ebpf` and `XVDPA_EBPF_OBJECT` names it for `include_bytes!`; when it does not, the
//! library and its unit tests still build (they never load it) and the binaries stop with a
//! `compile_error!` that says how to build it.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(xvdpa_ebpf)");
    println!("cargo:rerun-if-env-changed=XVDPA_EBPF_OBJECT");
    println!("cargo:rerun-if-changed=build.rs");
    let path = match std::env::var_os("XVDPA_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/xvdpa-ebpf"),
    };
    if !path.is_file() {
        // Cargo reruns a build script on every build while a path it watches is missing
        // (which would rebuild the crate each time), and walks a watched folder whole. So
        // watch the eBPF crate's output folder, where the object appears when it is built,
        // and nothing else.
        if let Some(dir) = path
            .parent()
            .filter(|d| d.ends_with("bpfel-unknown-none/release") && d.is_dir())
        {
            println!("cargo:rerun-if-changed={}", canonical(dir).display());
        }
        return;
    }
    let path = canonical(&path);
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=XVDPA_EBPF_OBJECT={}", path.display());
    println!("cargo:rustc-cfg=xvdpa_ebpf");
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .expect("canonical path of an existing file or folder")
}
