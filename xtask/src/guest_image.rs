//! The test guest: Debian's kernel package and an initramfs of busybox-static plus the
//! virtio modules and the workspace's static `tcpperf`, cached under target/guest and rebuilt
//! when an input changes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::bootstrap::{ensure_packages, VM_PACKAGES};
use crate::say;
use crate::util::{output, run, workspace_root};

/// The kernel package verified to boot under TCG here (see ../shared/docs/platform.md).
pub const KERNEL_PACKAGE: &str = "linux-image-6.1.0-56-amd64";

/// Bump when the image's layout changes in a way the stamp does not see (the cpio contents).
const IMAGE_LAYOUT: u32 = 6;

/// Loaded in dependency order.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];

/// The guest's /init: loads the virtio modules, configures eth0 from `xvdpa.ip=`, then runs
/// the gzipped, base64 script from `xvdpa.script=` (printing its exit code and powering off) or gives
/// an interactive shell on the console.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp; mount -t tmpfs tmp /tmp
for m in MODULES; do insmod /lib/modules/$m.ko || echo "XVDPA-ERROR cannot load $m"; done
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up
  addr=$(arg xvdpa.ip); [ -n "$addr" ] && ip addr add "$addr" dev eth0
  echo "XVDPA-READY $(cat /sys/class/net/eth0/address)"
else
  echo "XVDPA-ERROR no eth0"
fi
script=$(arg xvdpa.script)
if [ -n "$script" ]; then
  echo "$script" | base64 -d | gunzip > /tmp/script.sh
  sh /tmp/script.sh
  echo "XVDPA-DONE rc=$?"
  poweroff -f
fi
echo "xvdpa test guest: eth0 is the vhost-user device; 'poweroff -f' ends the VM"
setsid cttyhack sh
poweroff -f
"#;

/// The host's ethtool, copied into the guest with its libraries: busybox has no `ethtool -L`,
/// which the multiqueue tests use to change the guest's queue pairs.
const ETHTOOL: &str = "/usr/sbin/ethtool";

/// Adds a dynamically linked host binary and the libraries `ldd` names, at their host paths.
fn add_host_binary(cpio: &mut Cpio, path: &str) -> Result<()> {
    let out = Command::new("ldd").arg(path).output().context("ldd")?;
    let mut files = vec![PathBuf::from(path)];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let target = line
            .split("=>")
            .last()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("");
        if target.starts_with('/') {
            files.push(PathBuf::from(target));
        }
    }
    for f in files {
        let name = f
            .to_str()
            .context("non-UTF-8 path")?
            .trim_start_matches('/')
            .to_string();
        // Parent directories first; the cpio tolerates a directory listed twice.
        let mut dir = PathBuf::new();
        for part in Path::new(&name)
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
        {
            dir.push(part);
            cpio.dir(dir.to_str().unwrap_or_default());
        }
        // Follow symlinks (ld-linux and many libraries are links): the guest gets the bytes.
        cpio.file(
            &name,
            &fs::read(&f).with_context(|| format!("reading {}", f.display()))?,
            0o755,
        );
    }
    Ok(())
}

pub struct GuestImage {
    /// The kernel QEMU boots: the package's kernel decompressed into the ELF image with its
    /// PVH entry point (see [`pvh_kernel`]), or the package's bzImage where that fails.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The static `tcpperf` the image carries at /bin/tcpperf (the host side runs it too).
    pub tcpperf: PathBuf,
}

/// Builds the workspace's TCP stream tool as a static executable and returns its path.
/// Static (`+crt-static` on the gnu target, a static-pie) so that the busybox guest, which has
/// no C library, runs the same binary as the host; stripped to keep the initramfs small.
pub fn build_tcpperf() -> Result<PathBuf> {
    say!("building tcpperf (static)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args([
            "rustc",
            "--quiet",
            "--package",
            "xvdpa-tcpperf",
            "--bin",
            "tcpperf",
            "--release",
            "--message-format=json-render-diagnostics",
            "--",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo rustc (tcpperf)")?;
    if !out.status.success() {
        bail!("building tcpperf failed ({})", out.status);
    }
    // Cargo says where the executable is (it honours CARGO_TARGET_DIR and the like).
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|m| m.get("executable")?.as_str().map(PathBuf::from))
        .context("cargo named no tcpperf executable")
}

/// A short fingerprint of a file's bytes for the image stamp (FNV-1a).
fn fingerprint(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn guest_dir() -> PathBuf {
    workspace_root().join("target/guest")
}

/// Builds (or reuses) the guest image.
pub fn ensure() -> Result<GuestImage> {
    ensure_packages(VM_PACKAGES)?;
    let dir = guest_dir();
    fs::create_dir_all(&dir)?;
    let busybox = PathBuf::from("/bin/busybox");
    let bb_meta = fs::metadata(&busybox).context("/bin/busybox (busybox-static)")?;
    let init = INIT.replace("MODULES", &MODULES.join(" "));
    let ethtool = fs::metadata(ETHTOOL).context("/usr/sbin/ethtool (package ethtool)")?;
    let tcpperf_path = build_tcpperf()?;
    let tcpperf =
        fs::read(&tcpperf_path).with_context(|| format!("reading {}", tcpperf_path.display()))?;
    let stamp = format!(
        "layout {IMAGE_LAYOUT}\n{KERNEL_PACKAGE}\n{}\n{:?}\n{}\ntcpperf {:016x}\n{}\n",
        bb_meta.len(),
        bb_meta.modified().ok(),
        ethtool.len(),
        fingerprint(&tcpperf),
        init
    );
    let image = GuestImage {
        kernel: dir.join("vmlinux"),
        initrd: dir.join("initrd.gz"),
        tcpperf: tcpperf_path,
    };
    let stamp_path = dir.join("stamp");
    if image.kernel.exists()
        && image.initrd.exists()
        && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
    {
        return Ok(image);
    }

    let root = dir.join("kernel-root");
    if !root.join("boot").exists() {
        let deb = download_kernel(&dir)?;
        say!("unpacking {}", deb.display());
        let _ = fs::remove_dir_all(&root);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    let vmlinuz = fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let bzimage = fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    match pvh_kernel(&bzimage) {
        Ok(elf) => fs::write(&image.kernel, elf)?,
        Err(e) => {
            say!("booting the guest through its compressed kernel, more slowly under TCG: {e:#}");
            fs::write(&image.kernel, &bzimage)?;
        }
    }

    say!("building the guest initramfs ({})", image.initrd.display());
    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "usr",
        "usr/bin",
        "usr/sbin",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init before anything mounts devtmpfs.
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", &fs::read(&busybox)?, 0o755);
    cpio.file("init", init.as_bytes(), 0o755);
    let modules = root.join("lib/modules");
    for m in MODULES {
        let path = find_module(&modules, m)?
            .with_context(|| format!("module {m} not in {KERNEL_PACKAGE}"))?;
        cpio.file(&format!("lib/modules/{m}.ko"), &fs::read(&path)?, 0o644);
    }
    add_host_binary(&mut cpio, ETHTOOL)?;
    cpio.file("bin/tcpperf", &tcpperf, 0o755);
    let archive = cpio.finish();
    let mut gz = Command::new("gzip")
        .args(["-6", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("gzip")?;
    let mut stdin = gz.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&archive));
    let out = gz.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer panicked"))??;
    if !out.status.success() {
        bail!("gzip failed");
    }
    fs::write(&image.initrd, out.stdout)?;
    fs::write(&stamp_path, stamp)?;
    Ok(image)
}

/// The kernel of a bzImage as the ELF image inside it, which QEMU starts at its PVH entry
/// point (`-kernel` with an ELF that carries the Xen PHYS32_ENTRY note). Under TCG that
/// skips the firmware's real-mode boot path and the kernel's own decompressor: about 3.4 of
/// the 7.4 s a guest took to reach its init here, which every QEMU test pays per boot.
fn pvh_kernel(bzimage: &[u8]) -> Result<Vec<u8>> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
    let at = bzimage
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .context("no XZ-compressed kernel in the bzImage")?;
    // The payload is followed by the setup's trailer: one stream, the rest ignored.
    let mut xz = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("xz (package xz-utils)")?;
    let mut stdin = xz.stdin.take().context("xz stdin")?;
    let payload = bzimage[at..].to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let out = xz.wait_with_output()?;
    // xz stops reading after the stream: a broken pipe on the trailer is expected.
    let _ = writer.join();
    if !out.status.success() {
        bail!(
            "xz could not decompress the kernel: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !has_pvh_entry(&out.stdout) {
        bail!("the kernel has no PVH entry point (CONFIG_PVH)");
    }
    Ok(out.stdout)
}

/// Whether `elf` (ELF64, little-endian) has the Xen `PHYS32_ENTRY` note QEMU's PVH loader
/// starts the kernel from.
fn has_pvh_entry(elf: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    // ELF64 (class 2), little-endian (data 1).
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let ph = phoff as usize + i * usize::from(phentsize);
        if u32_at(ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            return false;
        };
        let (mut at, end) = (off as usize, (off + size) as usize);
        while at + 12 <= end {
            let (Some(namesz), Some(descsz), Some(kind)) =
                (u32_at(at), u32_at(at + 4), u32_at(at + 8))
            else {
                return false;
            };
            let align = |n: u32| (n as usize).div_ceil(4) * 4;
            let name = elf.get(at + 12..at + 12 + namesz as usize);
            let desc_end = at + 12 + align(namesz) + descsz as usize;
            if kind == XEN_ELFNOTE_PHYS32_ENTRY
                && name == Some(b"Xen\0".as_slice())
                && desc_end <= elf.len()
            {
                return true;
            }
            at += 12 + align(namesz) + align(descsz);
        }
        false
    })
}

fn download_kernel(dir: &Path) -> Result<PathBuf> {
    let find = || -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("{KERNEL_PACKAGE}_")) && n.ends_with(".deb")
                })
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    say!("downloading the guest kernel package {KERNEL_PACKAGE}");
    let try_download = || {
        output(
            Command::new("apt-get")
                .args(["download", "-q", KERNEL_PACKAGE])
                .current_dir(dir),
        )
    };
    if try_download().is_err() {
        say!("refreshing the package lists (apt-get update)");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        try_download().with_context(|| format!("apt-get download {KERNEL_PACKAGE}"))?;
    }
    find().context("apt-get download left no .deb")
}

fn find_module(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            if let Some(found) = find_module(&p, name)? {
                return Ok(Some(found));
            }
        } else if p.file_name().and_then(|n| n.to_str()) == Some(&format!("{name}.ko")) {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// A cpio archive in the "newc" format the kernel unpacks as an initramfs.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry_dev(name, mode, body, (0, 0));
    }

    fn entry_dev(&mut self, name: &str, mode: u32, body: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, body.len(), 0, 0, rdev.0, rdev.1, name.len() + 1, 0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry_dev(name, 0o020600, &[], (major, minor));
    }

    pub fn file(&mut self, name: &str, body: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, body);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::{has_pvh_entry, Cpio};

    /// An ELF64 header with one PT_NOTE segment holding one note (name `name`, type `kind`).
    fn elf_with_note(name: &[u8], kind: u32) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&8u32.to_le_bytes());
        note.extend_from_slice(&kind.to_le_bytes());
        note.extend_from_slice(name);
        note.resize(note.len().div_ceil(4) * 4, 0);
        note.extend_from_slice(&[0x50, 0x08, 0, 1, 0, 0, 0, 0]);
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[64 + 8..64 + 16].copy_from_slice(&(120u64).to_le_bytes());
        elf[64 + 32..64 + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        elf
    }

    #[test]
    fn the_pvh_entry_note_is_found_and_nothing_else_passes_for_it() {
        assert!(has_pvh_entry(&elf_with_note(b"Xen\0", 18)));
        assert!(!has_pvh_entry(&elf_with_note(b"Xen\0", 17)));
        assert!(!has_pvh_entry(&elf_with_note(b"Xyz\0", 18)));
        let whole = elf_with_note(b"Xen\0", 18);
        for cut in [0, 6, 63, 100, whole.len() - 1] {
            assert!(!has_pvh_entry(&whole[..cut]), "cut at {cut}");
        }
        let mut elf32 = whole.clone();
        elf32[4] = 1;
        assert!(!has_pvh_entry(&elf32));
    }

    #[test]
    fn cpio_newc_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.file("init", b"abc", 0o755);
        let a = c.finish();
        assert!(a.starts_with(b"070701"));
        // 110-byte header + "init\0" padded to 116, body 3 padded to 4, then the trailer.
        assert_eq!(&a[110..115], b"init\0");
        assert_eq!(&a[116..119], b"abc");
        assert_eq!(&a[120..126], b"070701");
        assert_eq!(a.len() % 4, 0);
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
