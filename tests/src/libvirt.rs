//! libvirt as operators run it: Debian's `libvirtd` and `virtlogd`, domains defined and driven
//! with `virsh`, QEMU started by libvirt as the unprivileged `libvirt-qemu` user.
//!
//! `cargo xtask test` installs the packages (`libvirt-daemon libvirt-daemon-driver-qemu
//! libvirt-clients`, without recommends). What the full install would add and the suite needs
//! is made here: the `libvirt-qemu` user and group and libvirt's directories. The daemons are
//! started when they are not running (there is no systemd on a test machine) and stopped again
//! by whoever started them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The system libvirt connection (root's libvirtd, QEMU as `libvirt-qemu`).
pub const URI: &str = "qemu:///system";
/// The user and group Debian's libvirt runs QEMU as.
pub const QEMU_USER: &str = "libvirt-qemu";
/// The packages `cargo xtask test` installs for this (kept in step with xtask's list).
pub const PACKAGES: &str = "libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails with what to install when libvirt's programs are missing.
pub fn require_installed() -> Result<()> {
    let missing: Vec<&str> = ["virsh", "libvirtd", "virtlogd"]
        .into_iter()
        .filter(|p| !have(p) && !Path::new("/usr/sbin").join(p).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "libvirt is not installed ({} missing): run the suite with `cargo xtask test`, \
             which installs it, or `apt-get install --no-install-recommends {PACKAGES}`",
            missing.join(", ")
        );
    }
    Ok(())
}

fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the `libvirt-qemu` group and user (also in `kvm`) and libvirt's directories, as the
/// package's recommended parts would; does nothing for what exists.
pub fn ensure_host_setup() -> Result<()> {
    let exists = |db: &str| {
        Command::new("getent")
            .args([db, QEMU_USER])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !exists("group") {
        eprintln!("[libvirt] creating group {QEMU_USER}");
        run_ok(Command::new("groupadd").args(["--system", QEMU_USER]))?;
    }
    if !exists("passwd") {
        eprintln!("[libvirt] creating user {QEMU_USER} (groups {QEMU_USER}, kvm)");
        let mut cmd = Command::new("useradd");
        cmd.args(["--system", "--gid", QEMU_USER, "--no-create-home"])
            .args([
                "--home-dir",
                "/var/lib/libvirt",
                "--shell",
                "/usr/sbin/nologin",
            ]);
        if Command::new("getent")
            .args(["group", "kvm"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            cmd.args(["--groups", "kvm"]);
        }
        run_ok(cmd.arg(QEMU_USER))?;
    }
    for dir in [
        "/var/log/libvirt/qemu",
        "/var/lib/libvirt/qemu",
        "/var/cache/libvirt",
        "/var/run/libvirt",
    ] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    }
    Ok(())
}

/// `virsh -c qemu:///system ARGS`: stdout, or an error with virsh's output.
pub fn virsh(args: &[&str]) -> Result<String> {
    run_ok(Command::new("virsh").args(["-c", URI]).args(args))
}

/// The numeric id of `name` from `getent DB name` (the third field).
pub fn id_of(db: &str, name: &str) -> Result<u32> {
    let line = run_ok(Command::new("getent").args([db, name]))?;
    line.split(':')
        .nth(2)
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("getent {db} {name}: {line:?}"))
}

/// libvirt's two daemons, running for the test; the ones this process started are stopped
/// (SIGTERM, then waited for) when dropped, the ones it found running are left alone.
pub struct Daemons {
    started: Vec<(&'static str, Child)>,
}

impl Daemons {
    /// Starts `virtlogd` and `libvirtd` (in the foreground, as children) unless they answer
    /// already, and waits until `virsh` reaches libvirtd. Their output goes to `log_dir`.
    pub fn ensure(log_dir: &Path) -> Result<Daemons> {
        require_installed()?;
        ensure_host_setup()?;
        let mut daemons = Daemons {
            started: Vec::new(),
        };
        if !virtlogd_answers() {
            daemons.start("virtlogd", log_dir)?;
        }
        if virsh(&["version"]).is_err() {
            daemons.start("libvirtd", log_dir)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match virsh(&["version"]) {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e.context(format!(
                            "libvirtd did not answer within 20 s (its log: {})",
                            log_dir.join("libvirtd.log").display()
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        Ok(daemons)
    }

    fn start(&mut self, program: &'static str, log_dir: &Path) -> Result<()> {
        let log = File::create(log_dir.join(format!("{program}.log")))?;
        let child = Command::new(program)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        eprintln!("[libvirt] started {program} (pid {})", child.id());
        self.started.push((program, child));
        // virtlogd has no client command to poll; its socket answering says it is up.
        if program == "virtlogd" {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !virtlogd_answers() {
                if Instant::now() > deadline {
                    bail!("virtlogd did not answer on {VIRTLOGD_SOCKET} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// virtlogd's socket, which libvirtd logs QEMU's output through.
const VIRTLOGD_SOCKET: &str = "/var/run/libvirt/virtlogd-sock";

/// Whether a virtlogd accepts connections (a socket file alone may be left from a dead one).
fn virtlogd_answers() -> bool {
    std::os::unix::net::UnixStream::connect(VIRTLOGD_SOCKET).is_ok()
}

impl Drop for Daemons {
    fn drop(&mut self) {
        // libvirtd first (it talks to virtlogd), by the pid each was started with.
        for (program, mut child) in self.started.drain(..).rev() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
            eprintln!("[libvirt] stopped {program}");
        }
    }
}

/// What a test domain is made of.
#[derive(Clone, Debug)]
pub struct DomainConfig {
    pub name: String,
    /// libvirt's identity of the domain: `None` lets libvirt choose one on the first
    /// definition; a redefinition must carry the one it chose (see [`Domain::redefine`]).
    pub uuid: Option<String>,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The guest kernel's command line.
    pub cmdline: String,
    pub mac: String,
    /// The vhost-user socket xvdpa serves; QEMU connects to it (`mode='client'`).
    pub socket: PathBuf,
    /// Seconds between QEMU's attempts to connect again when the daemon goes away
    /// (`<reconnect>`); `None` leaves the guest's link down for good.
    pub reconnect: Option<u32>,
    /// The file libvirt writes the serial console to.
    pub console_log: PathBuf,
    /// `<qemu:override>` setting `vectors=0` on the interface: QEMU 7.2 under TCG crashes in
    /// `msix_set_vector_notifiers` with vhost-user and MSI-X, and libvirt has no attribute
    /// for the property.
    pub legacy_interrupts: bool,
}

/// The interface's device alias; libvirt takes user aliases only with the `ua-` prefix.
pub const NIC_ALIAS: &str = "ua-xvdpa0";

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML: TCG (`type='qemu'`), shared memfd RAM (vhost-user maps guest memory),
/// direct kernel boot, libvirt's own vhost-user interface, the serial console to a file.
pub fn domain_xml(c: &DomainConfig) -> String {
    let e = |p: &Path| xml_escape(&p.display().to_string());
    let override_xml = if c.legacy_interrupts {
        format!(
            "  <qemu:override>\n    <qemu:device alias='{NIC_ALIAS}'>\n      <qemu:frontend>\n        \
             <qemu:property name='vectors' type='unsigned' value='0'/>\n      </qemu:frontend>\n    \
             </qemu:device>\n  </qemu:override>\n"
        )
    } else {
        String::new()
    };
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
{uuid}  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='vhostuser'>
      <alias name='{NIC_ALIAS}'/>
      <mac address='{mac}'/>
      <source type='unix' path='{socket}' mode='client'>{reconnect}</source>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
{override_xml}</domain>
",
        name = xml_escape(&c.name),
        uuid = c
            .uuid
            .as_deref()
            .map(|u| format!("  <uuid>{}</uuid>\n", xml_escape(u)))
            .unwrap_or_default(),
        mem = c.memory_mib,
        kernel = e(&c.kernel),
        initrd = e(&c.initrd),
        cmdline = xml_escape(&c.cmdline),
        mac = xml_escape(&c.mac),
        socket = e(&c.socket),
        reconnect = c
            .reconnect
            .map(|t| format!("<reconnect enabled='yes' timeout='{t}'/>"))
            .unwrap_or_default(),
        console = e(&c.console_log),
    )
}

/// A defined domain; destroyed (if running) and undefined when dropped.
pub struct Domain {
    pub name: String,
    pub console_log: PathBuf,
}

impl Domain {
    /// `virsh define` of the XML written to `xml_path`.
    pub fn define(config: &DomainConfig, xml_path: &Path) -> Result<Domain> {
        std::fs::write(xml_path, domain_xml(config))?;
        virsh(&["define", &xml_path.display().to_string()])?;
        Ok(Domain {
            name: config.name.clone(),
            console_log: config.console_log.clone(),
        })
    }

    /// Replaces the definition with `config` (the domain keeps its name and uuid), as an
    /// operator's `virsh define` of an edited XML does; it applies from the next start.
    pub fn redefine(&self, config: &DomainConfig, xml_path: &Path) -> Result<()> {
        let uuid = virsh(&["domuuid", &self.name])?.trim().to_string();
        let config = DomainConfig {
            uuid: Some(uuid),
            ..config.clone()
        };
        std::fs::write(xml_path, domain_xml(&config))?;
        virsh(&["define", &xml_path.display().to_string()]).map(drop)
    }

    pub fn start(&self) -> Result<()> {
        virsh(&["start", &self.name]).map(drop)
    }

    pub fn destroy(&self) -> Result<()> {
        virsh(&["destroy", &self.name]).map(drop)
    }

    /// `virsh domstate`: `running`, `shut off`, ...
    pub fn state(&self) -> Result<String> {
        Ok(virsh(&["domstate", &self.name])?.trim().to_string())
    }

    /// Waits until the domain is in `state`.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.state()?;
            if now == state {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "domain {} is {now:?}, not {state:?}, after {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The console log's text (empty before QEMU writes to it).
    pub fn console(&self) -> String {
        std::fs::read(&self.console_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for a console line containing `needle` after byte `from` of the log; fails with
    /// the console so far if the domain stops first or the time runs out.
    pub fn wait_console(&self, needle: &str, from: usize, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if let Some(line) = text
                .get(from.min(text.len())..)
                .unwrap_or("")
                .lines()
                .find(|l| l.contains(needle))
            {
                return Ok(line.to_string());
            }
            let stopped = self.state().map(|s| s != "running").unwrap_or(true);
            if stopped || Instant::now() > deadline {
                bail!(
                    "the console of {} did not show {needle:?} ({}); console:\n{text}",
                    self.name,
                    if stopped {
                        "the domain stopped".to_string()
                    } else {
                        format!("{timeout:?} passed")
                    }
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_xml_has_vhost_user_memfd_and_the_override() {
        let c = DomainConfig {
            name: "t<1>".into(),
            uuid: Some("dfdb34ef-df7c-47eb-9bab-2abcbef971ee".into()),
            memory_mib: 256,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0 a=b&c".into(),
            mac: "52:54:00:12:34:56".into(),
            socket: "/run/xvdpa/vm0.sock".into(),
            reconnect: Some(1),
            console_log: "/tmp/c.log".into(),
            legacy_interrupts: true,
        };
        let xml = domain_xml(&c);
        assert!(xml.contains("<name>t&lt;1&gt;</name>"), "{xml}");
        assert!(xml.contains("<uuid>dfdb34ef-df7c-47eb-9bab-2abcbef971ee</uuid>"));
        assert!(xml.contains("<cmdline>console=ttyS0 a=b&amp;c</cmdline>"));
        assert!(xml.contains(
            "<source type='unix' path='/run/xvdpa/vm0.sock' mode='client'>\
             <reconnect enabled='yes' timeout='1'/></source>"
        ));
        assert!(xml.contains("<source type='memfd'/>") && xml.contains("<access mode='shared'/>"));
        assert!(xml.contains("<qemu:device alias='ua-xvdpa0'>"));
        assert!(xml.contains("name='vectors' type='unsigned' value='0'"));
        let without = domain_xml(&DomainConfig {
            legacy_interrupts: false,
            uuid: None,
            reconnect: None,
            ..c
        });
        assert!(!without.contains("qemu:override") && !without.contains("<uuid>"));
        assert!(without.contains("mode='client'></source>"));
    }
}
