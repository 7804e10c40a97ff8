//! The lab: a "host" namespace whose `nic0` is the NIC xvdpa serves, and a "wire" namespace
//! whose `wire0` is the far end of the cable, with an address guests can reach.
//!
//! Both ends live in namespaces of their own, so a lab never touches the machine's real
//! network and several labs (parallel tests) can coexist.

use std::io;
use std::process::{Command, Output};

/// Interface xvdpa serves, inside the host namespace.
pub const NIC: &str = "nic0";
/// Far end of the veth pair, inside the wire namespace.
pub const WIRE: &str = "wire0";
/// The lab's subnet and its fixed addresses.
pub const WIRE_IP: &str = "10.77.0.1";
pub const HOST_IP: &str = "10.77.0.254";
pub const PREFIX: u8 = 24;

/// Address of guest number `n` (0-based) in the lab subnet.
pub fn guest_ip(n: u8) -> String {
    format!("10.77.0.{}", 2 + n)
}

/// MAC of guest number `n`.
pub fn guest_mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(n)]
}

pub fn mac_str(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Runs a command, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

fn ip(args: &[&str]) -> io::Result<Output> {
    run(Command::new("ip").args(args))
}

/// The ports of a [`Lab::bridged_pair`]'s bridge: the far ends of the first and the second
/// host's cables, in the wire namespace.
pub const BRIDGE_PORTS: [&str; 2] = ["wire-a", "wire-b"];
/// The second host's address in a [`Lab::bridged_pair`] (the first has [`HOST_IP`]).
pub const SECOND_HOST_IP: &str = "10.77.0.253";

/// A lab name unique to this process and call.
fn unique_name(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "xvt{}{}-{}",
        tag,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Adds namespace `ns`, with IPv6 off: the lab speaks IPv4 only, since IPv6
/// autoconfiguration would put router solicitations and MLD reports on the wire at random
/// moments, and tests count frames exactly.
fn add_netns(ns: &str) -> io::Result<()> {
    ip(&["netns", "add", ns])?;
    for knob in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
        run(Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sh",
            "-c",
            &format!("echo 1 > {path}"),
        ]))?;
    }
    Ok(())
}

/// Turns transmit checksum offload off on `dev` in `ns`, so frames leave it complete, as on
/// a real cable (a veth leaves them partial for its peer).
fn wire_tx_checksums_off(ns: &str, dev: &str) -> io::Result<()> {
    run(Command::new("ip").args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"])).map(drop)
}

pub struct Lab {
    pub name: String,
    pub host_ns: String,
    pub wire_ns: String,
    /// Tear down on drop (tests); `false` for a lab left running (`cargo xtask lab up`).
    pub owned: bool,
}

impl Lab {
    /// Namespace names for lab `name`.
    pub fn named(name: &str) -> Lab {
        Lab {
            name: name.to_string(),
            host_ns: format!("{name}-host"),
            wire_ns: format!("{name}-wire"),
            owned: false,
        }
    }

    /// A lab with a name unique to this process and counter, removed on drop.
    pub fn unique(tag: &str) -> io::Result<Lab> {
        Self::unique_with_queues(tag, 1)
    }

    /// [`Lab::unique`] with `queues` receive and transmit queues on both veth ends, so
    /// flows from the wire spread over the NIC's queues (veth delivers on the queue the
    /// sender transmitted on).
    pub fn unique_with_queues(tag: &str, queues: u32) -> io::Result<Lab> {
        let mut lab = Lab::named(&unique_name(tag));
        lab.create_with_queues(queues)?;
        lab.owned = true;
        Ok(lab)
    }

    /// Turns GRO on for the NIC, which makes veth run a receive NAPI (with an id that the
    /// netdev netlink family lists) while no XDP program is attached.
    pub fn nic_with_napi_from_start(&self) -> io::Result<()> {
        run(self.in_host("ethtool").args(["-K", NIC, "gro", "on"])).map(drop)
    }

    pub fn exists(&self) -> bool {
        std::path::Path::new(&format!("/var/run/netns/{}", self.host_ns)).exists()
    }

    /// Creates the namespaces, the veth pair and addresses. The wire end's transmit checksum
    /// offload is turned off so frames leave it complete, as on a real cable.
    pub fn create(&self) -> io::Result<()> {
        self.create_with_queues(1)
    }

    /// [`Lab::create`] with `queues` queues each way on both veth ends.
    pub fn create_with_queues(&self, queues: u32) -> io::Result<()> {
        self.destroy();
        let q = queues.max(1).to_string();
        add_netns(&self.host_ns)?;
        add_netns(&self.wire_ns)?;
        ip(&[
            "link",
            "add",
            NIC,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &self.host_ns,
            "type",
            "veth",
            "peer",
            "name",
            WIRE,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            &self.wire_ns,
        ])?;
        for (ns, dev, addr) in [
            (&self.host_ns, NIC, HOST_IP),
            (&self.wire_ns, WIRE, WIRE_IP),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/{PREFIX}"),
                "dev",
                dev,
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        wire_tx_checksums_off(&self.wire_ns, WIRE)?;
        Ok(())
    }

    /// Two hosts on one network: each host namespace has its own `nic0` (the NIC of that
    /// host's daemon), and the far ends of both cables are ports of one Linux bridge in a
    /// shared wire namespace. The bridge itself is the wire namespace's `wire0` and holds
    /// the wire's address, so [`Lab::in_wire`], `WireSocket` and [`Lab::wire_mac`] work on
    /// either lab as on a one-host lab; the bridge's ports are [`BRIDGE_PORTS`]. The bridge
    /// learns where a MAC is from the frames it sees, as a switch does. The second host's
    /// `nic0` has [`SECOND_HOST_IP`], so the two hosts' addresses do not clash. Both labs are
    /// removed on drop (the shared wire namespace with the first to go).
    pub fn bridged_pair(tag: &str) -> io::Result<(Lab, Lab)> {
        let name = unique_name(tag);
        let wire_ns = format!("{name}-wire");
        let host = |side: &str| Lab {
            name: format!("{name}{side}"),
            host_ns: format!("{name}{side}-host"),
            wire_ns: wire_ns.clone(),
            owned: true,
        };
        let pair = (host("a"), host("b"));
        pair.0.destroy();
        pair.1.destroy();
        add_netns(&wire_ns)?;
        ip(&["-n", &wire_ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &wire_ns, "link", "add", WIRE, "type", "bridge"])?;
        for (lab, port, addr) in [
            (&pair.0, BRIDGE_PORTS[0], HOST_IP),
            (&pair.1, BRIDGE_PORTS[1], SECOND_HOST_IP),
        ] {
            add_netns(&lab.host_ns)?;
            ip(&[
                "link",
                "add",
                NIC,
                "netns",
                &lab.host_ns,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &wire_ns,
            ])?;
            ip(&["-n", &wire_ns, "link", "set", port, "master", WIRE])?;
            ip(&["-n", &wire_ns, "link", "set", port, "up"])?;
            wire_tx_checksums_off(&wire_ns, port)?;
            ip(&["-n", &lab.host_ns, "link", "set", "lo", "up"])?;
            let cidr = format!("{addr}/{PREFIX}");
            ip(&["-n", &lab.host_ns, "addr", "add", &cidr, "dev", NIC])?;
            ip(&["-n", &lab.host_ns, "link", "set", NIC, "up"])?;
        }
        let cidr = format!("{WIRE_IP}/{PREFIX}");
        ip(&["-n", &wire_ns, "addr", "add", &cidr, "dev", WIRE])?;
        ip(&["-n", &wire_ns, "link", "set", WIRE, "up"])?;
        wire_tx_checksums_off(&wire_ns, WIRE)?;
        Ok(pair)
    }

    /// The bridge port a MAC was last seen on, as the bridge of a [`Lab::bridged_pair`]
    /// learned it (`None` when it has not learned the MAC, or it aged out).
    pub fn bridge_port_of(&self, mac: [u8; 6]) -> io::Result<Option<String>> {
        let out =
            run(Command::new("bridge").args(["-n", &self.wire_ns, "fdb", "show", "br", WIRE]))?;
        let mac = mac_str(mac);
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(mac.as_str()) && words.next() == Some("dev"))
                    .then(|| words.next().map(str::to_string))
                    .flatten()
            }))
    }

    /// Sets the MTU of both veth ends (the NIC and the wire), e.g. 9000 for jumbo frames.
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let mtu = mtu.to_string();
        for (ns, dev) in [(&self.host_ns, NIC), (&self.wire_ns, WIRE)] {
            ip(&["-n", ns, "link", "set", dev, "mtu", &mtu])?;
        }
        Ok(())
    }

    /// Removes the namespaces (their veth ends go with them). Never fails.
    pub fn destroy(&self) {
        for ns in [&self.host_ns, &self.wire_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    /// The wire end's MAC address (what frames from the wire carry as source).
    pub fn wire_mac(&self) -> io::Result<[u8; 6]> {
        let out = run(self
            .in_wire("cat")
            .arg(format!("/sys/class/net/{WIRE}/address")))?;
        let s = String::from_utf8_lossy(&out.stdout);
        let bytes: Vec<u8> = s
            .trim()
            .split(':')
            .filter_map(|p| u8::from_str_radix(p, 16).ok())
            .collect();
        bytes
            .try_into()
            .map_err(|_| io::Error::other(format!("bad MAC {s:?} for {WIRE}")))
    }

    /// A command to run inside the host namespace.
    pub fn in_host(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host_ns, program]);
        c
    }

    /// A command to run inside the wire namespace.
    pub fn in_wire(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.wire_ns, program]);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            self.destroy();
        }
    }
}
