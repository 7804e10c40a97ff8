//! Installs what the build and the tests need on a fresh machine, saying what it does:
//! Debian packages, the nightly's rust-src, and bpf-linker built against the nightly's LLVM.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::say;
use crate::util::{have, is_root, output, run, toolchain_cargo, workspace_root};

/// The toolchain the eBPF crate builds with (see ebpf/rust-toolchain.toml).
pub const EBPF_TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages and the command each provides (checked on PATH first; an empty command
/// means only the package itself will do, as for the static busybox the guest image embeds).
pub const BUILD_PACKAGES: &[(&str, &str)] =
    &[("iproute2", "ip"), ("ethtool", "ethtool"), ("gzip", "gzip")];
/// DPDK's testpmd: an independent vhost-user frontend in the tests, the peer in the benchmark.
pub const PEER_PACKAGES: &[(&str, &str)] = &[
    ("dpdk-dev", "dpdk-testpmd"),
    ("librte-net-af-xdp23", ""),
    ("librte-net-vhost23", ""),
    ("librte-net-virtio23", ""),
];
/// libvirt's daemon, QEMU driver and `virsh`, for the test that runs a guest the way operators
/// do. Without recommends, as everything here: the `libvirt-qemu` user and libvirt's
/// directories a full install would add are made by the test itself
/// (tests/src/libvirt.rs), which also starts `virtlogd` and `libvirtd` (no systemd here).
pub const LIBVIRT_PACKAGES: &[(&str, &str)] = &[
    ("libvirt-daemon", "libvirtd"),
    ("libvirt-daemon-driver-qemu", ""),
    ("libvirt-clients", "virsh"),
];
/// `systemd-nspawn`, which boots the host's root as a throw-away container: the live systemd
/// the packaged unit runs under in its test (tests/tests/systemd_unit.rs); PID 1 on these
/// machines is not systemd.
pub const SYSTEMD_PACKAGES: &[(&str, &str)] = &[("systemd-container", "systemd-nspawn")];
pub const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", ""),
    ("ethtool", "ethtool"),
    // Decompresses the guest kernel for QEMU's PVH boot (guest_image::pvh_kernel).
    ("xz-utils", "xz"),
];

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the packages whose command is missing.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(pkg, cmd)| (cmd.is_empty() || !have(cmd)) && !package_installed(pkg))
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing packages {missing:?} and no apt-get to install them: install them and run again");
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}: run as root (or `sudo apt-get install {}`)",
            missing.join(" ")
        );
    }
    say!("installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update (is the network reachable?)")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {missing:?}"))?;
    Ok(())
}

fn sysroot() -> Result<PathBuf> {
    // Asked by several checks per build; one rustc call is enough.
    static SYSROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = SYSROOT.get() {
        return Ok(p.clone());
    }
    let s = output(Command::new("rustc").args([&format!("+{EBPF_TOOLCHAIN}"), "--print", "sysroot"]))
        .with_context(|| format!("the {EBPF_TOOLCHAIN} toolchain is needed for the eBPF program: `rustup toolchain install {EBPF_TOOLCHAIN}`"))?;
    Ok(SYSROOT.get_or_init(|| PathBuf::from(s.trim())).clone())
}

/// rust-src for `-Z build-std=core`.
pub fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    say!("adding rust-src to the {EBPF_TOOLCHAIN} toolchain (the eBPF build compiles core from source)");
    run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
}

/// The nightly's LLVM: its major version and its shared library.
fn nightly_llvm() -> Result<(u32, PathBuf)> {
    let vv = output(Command::new("rustc").args([&format!("+{EBPF_TOOLCHAIN}"), "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV does not name its LLVM")?;
    let major: u32 = version
        .split('.')
        .next()
        .unwrap_or("")
        .parse()
        .context("LLVM version")?;
    let lib = sysroot()?.join("lib");
    let so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .with_context(|| format!("no libLLVM shared library in {}", lib.display()))?;
    Ok((major, so))
}

/// LD_LIBRARY_PATH under which bpf-linker finds the nightly's LLVM.
pub fn llvm_library_path() -> Result<String> {
    Ok(sysroot()?.join("lib").display().to_string())
}

fn bpf_linker_works() -> bool {
    let Ok(lib) = llvm_library_path() else {
        return false;
    };
    Command::new("bpf-linker")
        .arg("--version")
        .env("LD_LIBRARY_PATH", lib)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// bpf-linker, linked against the same LLVM as the nightly's rustc. No llvm-config exists for
/// that LLVM, so a prefix directory with `lib/libLLVM.so` pointing at the nightly's library
/// stands in for one.
pub fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let (major, so) = nightly_llvm()?;
    let prefix = workspace_root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&so, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    say!("building bpf-linker {BPF_LINKER_VERSION} against the {EBPF_TOOLCHAIN} toolchain's LLVM {major} (a few minutes, once)");
    run(toolchain_cargo("stable")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker")?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but does not run (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

/// Everything `cargo xtask build` needs.
pub fn ensure_build_tools() -> Result<()> {
    ensure_packages(BUILD_PACKAGES)?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}

/// The Debian suite current QEMU comes from: bookworm's own is 7.2, which crashes with
/// vhost-user and MSI-X under TCG (tests then need `vectors=0`); bookworm-backports has 10.0.
const QEMU_SUITE: &str = "bookworm-backports";
/// The packages a QEMU for x86 guests is unpacked from; its libraries are bookworm's, which
/// the system QEMU 7.2 already brought in.
const QEMU_DEBS: &[&str] = &["qemu-system-x86", "qemu-system-common", "qemu-system-data"];

/// Current QEMU from bookworm-backports, unpacked under `target/qemu` next to the system's
/// 7.2 rather than over it: installing it would replace the system QEMU for everything else on
/// the machine, and one test keeps running on 7.2. Apt gets a configuration of its own there
/// (sources with the backports suite, package lists, cache), so the system's apt sources stay
/// as they are. Returns the binary.
pub fn ensure_private_qemu() -> Result<PathBuf> {
    let root = workspace_root().join("target/qemu");
    let binary = root.join("usr/bin/qemu-system-x86_64");
    if binary.exists() {
        return Ok(binary);
    }
    if !have("apt-get") || !have("dpkg") {
        bail!("QEMU from {QEMU_SUITE} is unpacked with apt-get and dpkg, which this machine lacks");
    }
    let apt = root.join("apt");
    for dir in ["lists/partial", "cache/archives/partial", "debs"] {
        std::fs::create_dir_all(apt.join(dir))?;
    }
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    std::fs::write(
        apt.join("sources.list"),
        format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian bookworm main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian {QEMU_SUITE} main\n"
        ),
    )?;
    let config = apt.join("apt.conf");
    std::fs::write(
        &config,
        format!(
            "Dir::Etc::SourceList \"{0}/sources.list\";\nDir::Etc::SourceParts \"/nonexistent\";\n\
             Dir::State::Lists \"{0}/lists\";\nDir::Cache \"{0}/cache\";\n",
            apt.display()
        ),
    )?;
    say!(
        "unpacking QEMU from Debian's {QEMU_SUITE} into {} (apt with the {QEMU_SUITE} suite \
         added in its own configuration there; the system's QEMU stays)",
        root.display()
    );
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("APT_CONFIG", &config))
    .context("apt-get update with the backports suite (is the network reachable?)")?;
    run(Command::new("apt-get")
        .args(["download", "-q", "-t", QEMU_SUITE])
        .args(QEMU_DEBS)
        .current_dir(apt.join("debs"))
        .env("APT_CONFIG", &config))
    .with_context(|| format!("downloading {QEMU_DEBS:?} from {QEMU_SUITE}"))?;
    for deb in std::fs::read_dir(apt.join("debs"))? {
        let deb = deb?.path();
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))
            .with_context(|| format!("unpacking {}", deb.display()))?;
    }
    let version = output(Command::new(&binary).arg("--version"))
        .with_context(|| format!("{} does not run", binary.display()))?;
    say!("{}", version.lines().next().unwrap_or_default());
    Ok(binary)
}
