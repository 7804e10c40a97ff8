//! What the control socket speaks, and the one description of a port's settings.
//!
//! [`PortSpec`] is a port wherever it is written down: a `[[port]]` table in the config file
//! and an `add-port` request are its serde form, `--port`'s key=value list
//! ([`crate::config::parse_port`]) and `xvdpa ctl add-port`'s flags build one, and
//! [`PortInfo`] shows it back with the port's index and state. Its keys are `socket`, `mode`
//! (`server`, the default, or `client`), `mac`,
//! `allow_macs`, `rate_pps` and `rate_bps` (a number, or a string with a k, M or G suffix),
//! `queues`, `cpus`, `vlan`, `vlan_passthrough`, `promisc`, `guest_umem`, `socket_group` (a group name) and
//! `socket_mode` (octal digits in a string, e.g. `"0660"`); unknown keys are refused, and every value is
//! checked as the command line checks it. Written back (in `add-port`, `list` and `stats`
//! replies) the queue count is named `queue_pairs` and rates are plain numbers; both
//! spellings of the queue count are read.
//!
//! The control socket takes one JSON object per line and answers each with one line:
//! ```text
//! {"cmd":"add-port","socket":"/run/xvdpa/vm2.sock","mac":"52:54:00:00:00:03"}
//! {"cmd":"del-port","port":"/run/xvdpa/vm2.sock"}      (socket path, MAC or index)
//! {"cmd":"list"}
//! {"cmd":"stats"}
//! ```
//! Replies are `{"ok":true,...}` (with `port`, `ports` or `stats`) or
//! `{"ok":false,"error":"..."}`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::datapath::device::MAX_QUEUE_PAIRS;
use crate::mac::MacAddr;

/// A port's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// The vhost-user socket: the daemon listens on it, or connects to it in client mode.
    pub socket: PathBuf,
    /// Who listens on `socket`.
    #[serde(default)]
    pub mode: SocketRole,
    #[serde(serialize_with = "write_mac", deserialize_with = "read_mac")]
    pub mac: MacAddr,
    /// Source MACs the guest may send with besides `mac`.
    #[serde(
        default,
        serialize_with = "write_macs",
        deserialize_with = "read_allow_macs"
    )]
    pub allow_macs: Vec<MacAddr>,
    /// Transmit rate limit (a policer), packets per second.
    #[serde(default, deserialize_with = "read_rate_pps")]
    pub rate_pps: Option<u64>,
    /// Transmit rate limit (a policer), bits per second.
    #[serde(default, deserialize_with = "read_rate_bps")]
    pub rate_bps: Option<u64>,
    /// 802.1Q VLAN ID: the port's frames carry this tag on the NIC (pushed on transmit,
    /// stripped on receive) and it switches only with ports on the same VLAN.
    #[serde(default, deserialize_with = "read_vlan")]
    pub vlan: Option<u16>,
    /// The guest may send frames that carry VLAN tags of their own (802.1Q, 802.1ad; QinQ on
    /// a tagged port); they go to the wire only. Off: such frames are dropped and counted.
    #[serde(default)]
    pub vlan_passthrough: bool,
    /// Virtqueue pairs offered to the guest (VIRTIO_NET_F_MQ above 1), one worker each.
    #[serde(
        rename(serialize = "queue_pairs", deserialize = "queues"),
        alias = "queue_pairs",
        default = "one_pair",
        deserialize_with = "read_queues"
    )]
    pub queue_pairs: u16,
    /// CPUs for the queue pairs' threads (pair i on `cpus[i % len]`); empty: not pinned.
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Also receive unicast no port and not the host owns (what a switch floods), as a
    /// guest in promiscuous mode expects. The guest's own RX_MODE request stays in QEMU,
    /// which keeps the control queue, so this is the operator's setting.
    #[serde(default)]
    pub promisc: bool,
    /// Ask for the single-copy path: the guest's RAM file becomes the UMEM of the NIC's
    /// queue, so the kernel's copy (or a zero-copy NIC's DMA) lands in the guest's buffer.
    /// The NIC is then this port's alone: no other port may share it. A guest whose memory
    /// cannot be registered keeps the copy path (see [`PortInfo::datapath`]).
    #[serde(default)]
    pub guest_umem: bool,
    /// How the single-copy path transmits (`guest_umem`): from the guest's buffers, or
    /// copied once into the daemon's slots. Only with `guest_umem`.
    #[serde(default, skip_serializing_if = "GuestUmemTx::is_auto")]
    pub guest_umem_tx: GuestUmemTx,
    /// Who cuts the guest's TSO frames for the wire: the kernel (handed whole to it, the
    /// NIC's TSO or the kernel's GSO), or the daemon.
    #[serde(default, skip_serializing_if = "TxGso::is_kernel")]
    pub tx_gso: TxGso,
    /// Group the vhost-user socket belongs to (the frontend's, e.g. `libvirt-qemu`); none:
    /// the daemon's group. The daemon's user must be a member (or the daemon root).
    #[serde(default, deserialize_with = "read_socket_group")]
    pub socket_group: Option<String>,
    /// Permission bits of the vhost-user socket; 0660: its owner and group only.
    #[serde(
        default = "default_socket_mode",
        serialize_with = "write_socket_mode",
        deserialize_with = "read_socket_mode"
    )]
    pub socket_mode: u32,
    /// The port (socket path, MAC or index) whose guest migrates to this port's: it may have
    /// the same MAC, and the MAC's frames move here when this port's guest starts its rings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_from: Option<String>,
}

impl PortSpec {
    /// A transmit mode for the single-copy path on a port that does not ask for it: refused
    /// at start-up and by `add-port` alike.
    pub fn guest_umem_tx_without_guest_umem(&self) -> bool {
        !self.guest_umem && self.guest_umem_tx != GuestUmemTx::Auto
    }
}

impl Default for PortSpec {
    fn default() -> Self {
        PortSpec {
            socket: PathBuf::new(),
            mode: SocketRole::Server,
            mac: MacAddr::default(),
            allow_macs: Vec::new(),
            rate_pps: None,
            rate_bps: None,
            vlan: None,
            vlan_passthrough: false,
            queue_pairs: one_pair(),
            cpus: Vec::new(),
            migrate_from: None,
            promisc: false,
            guest_umem: false,
            guest_umem_tx: GuestUmemTx::Auto,
            tx_gso: TxGso::Kernel,
            socket_group: None,
            socket_mode: default_socket_mode(),
        }
    }
}

fn one_pair() -> u16 {
    1
}

/// A vhost-user socket's mode unless the port says otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

fn default_socket_mode() -> u32 {
    DEFAULT_SOCKET_MODE
}

/// Parses a socket's permission bits in octal (`0660`, `660`, `0o660`), up to 0777.
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "socket-mode={s:?}: expected octal permission bits up to 0777, e.g. 0660"
        )),
    }
}

/// Checks that group `s` exists, so that a misspelt group fails where it is written rather
/// than when the socket is made.
pub fn parse_socket_group(s: &str) -> Result<String, String> {
    let name = s.trim();
    crate::privilege::group_id(name)
        .map(|_| name.to_string())
        .map_err(|e| e.to_string())
}

/// How a single-copy port (`guest_umem`) transmits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestUmemTx {
    /// From the guest's buffers on a zero-copy NIC, copied on a copy-mode one: there the
    /// kernel copies every frame into an skb anyway and takes a page for each piece after
    /// the first, which cost 1.5x the copy's CPU per packet at 512 and 1518 B on veth.
    #[default]
    Auto,
    /// Always from the guest's buffers (headers from a daemon slot), unless a zero-copy
    /// NIC takes one piece per frame or its limit cannot be read.
    InPlace,
    /// Always copied once into a slot of the daemon's area of the UMEM.
    Copy,
}

impl GuestUmemTx {
    fn is_auto(&self) -> bool {
        *self == GuestUmemTx::Auto
    }

    /// Whether frames go out from guest memory on a socket that is zero-copy or not.
    pub fn in_place(self, zero_copy: bool) -> bool {
        match self {
            GuestUmemTx::Auto => zero_copy,
            GuestUmemTx::InPlace => true,
            GuestUmemTx::Copy => false,
        }
    }
}

impl std::fmt::Display for GuestUmemTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestUmemTx::Auto => "auto",
            GuestUmemTx::InPlace => "in-place",
            GuestUmemTx::Copy => "copy",
        })
    }
}

/// Parses `guest-umem-tx`'s value.
pub fn parse_guest_umem_tx(s: &str) -> Result<GuestUmemTx, String> {
    match s.trim() {
        "auto" => Ok(GuestUmemTx::Auto),
        "in-place" => Ok(GuestUmemTx::InPlace),
        "copy" => Ok(GuestUmemTx::Copy),
        _ => Err(format!(
            "guest-umem-tx={s:?}: expected auto, in-place or copy"
        )),
    }
}

/// Who cuts a guest's TSO frames into MSS-sized frames for the wire (copy path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxGso {
    /// The kernel: each TSO frame goes to it whole through an AF_PACKET socket with a
    /// virtio-net header, as one GSO skb that the NIC cuts (TSO) or the kernel cuts once at
    /// the driver. Falls back to `Daemon` where the socket cannot be made.
    #[default]
    Kernel,
    /// The daemon's software segmenter, each segment an AF_XDP frame of its own.
    Daemon,
}

impl TxGso {
    fn is_kernel(&self) -> bool {
        *self == TxGso::Kernel
    }
}

impl std::fmt::Display for TxGso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TxGso::Kernel => "kernel",
            TxGso::Daemon => "daemon",
        })
    }
}

/// Parses `tx-gso`'s value.
pub fn parse_tx_gso(s: &str) -> Result<TxGso, String> {
    match s.trim() {
        "kernel" => Ok(TxGso::Kernel),
        "daemon" => Ok(TxGso::Daemon),
        _ => Err(format!("tx-gso={s:?}: expected kernel or daemon")),
    }
}

/// Who listens on a port's vhost-user socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketRole {
    /// The daemon listens and QEMU connects (QEMU's chardev `reconnect=` brings it back
    /// after a daemon restart).
    #[default]
    Server,
    /// QEMU listens (`-chardev socket,server=on,wait=off`) and the daemon connects,
    /// reconnecting with back-off whenever QEMU is not there: the daemon can restart under
    /// a running guest, which sees only a pause.
    Client,
}

impl std::fmt::Display for SocketRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SocketRole::Server => "server",
            SocketRole::Client => "client",
        })
    }
}

/// Parses a socket mode: `server` or `client`.
pub fn parse_mode(s: &str) -> Result<SocketRole, String> {
    match s.trim() {
        "server" => Ok(SocketRole::Server),
        "client" => Ok(SocketRole::Client),
        _ => Err(format!("mode={s:?}: expected server or client")),
    }
}

/// Parses a rate like `250000`, `100k`, `2.5M` or `10G` (powers of 1000).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1e3),
        Some((i, 'm' | 'M')) => (&s[..i], 1e6),
        Some((i, 'g' | 'G')) => (&s[..i], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| {
        format!("invalid rate {s:?}: expected a number with an optional k, M or G suffix")
    })?;
    let v = v * mult;
    if !(1.0..1e15).contains(&v) {
        return Err(format!(
            "invalid rate {s:?}: must be at least 1 and below 10^15"
        ));
    }
    Ok(v as u64)
}

/// Parses a queue-pair count (1 to [`MAX_QUEUE_PAIRS`]).
pub fn parse_queues(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(n) if (1..=MAX_QUEUE_PAIRS).contains(&n) => Ok(n),
        _ => Err(format!(
            "queues={s:?}: expected 1 to {MAX_QUEUE_PAIRS} queue pairs"
        )),
    }
}

/// Parses an 802.1Q VLAN ID (1 to 4094).
pub fn parse_vlan(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(v) if (1..=4094).contains(&v) => Ok(v),
        _ => Err(format!("vlan={s:?}: expected a VLAN ID from 1 to 4094")),
    }
}

/// Parses a CPU list for the queue pairs' threads: `2+3+4` (pair i runs on the i-th CPU,
/// wrapping around).
pub fn parse_cpus(s: &str) -> Result<Vec<usize>, String> {
    let cpus: Result<Vec<usize>, _> = s.split('+').map(|c| c.trim().parse::<usize>()).collect();
    match cpus {
        Ok(c) if !c.is_empty() && c.iter().all(|&c| c < 4096) => Ok(c),
        _ => Err(format!(
            "cpus={s:?}: expected CPU numbers joined by '+', e.g. 2+3"
        )),
    }
}

fn write_mac<S: Serializer>(mac: &MacAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(mac)
}

fn write_macs<S: Serializer>(macs: &[MacAddr], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(macs.iter().map(MacAddr::to_string))
}

fn unicast<E: serde::de::Error>(key: &str, s: &str) -> Result<MacAddr, E> {
    MacAddr::parse_unicast(s).map_err(|e| E::custom(format!("{key}: {e}")))
}

fn read_mac<'de, D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
    unicast("mac", &String::deserialize(d)?)
}

fn read_allow_macs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<MacAddr>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|m| unicast("allow_macs", m))
        .collect()
}

/// A rate as written: a number, or a string with a suffix.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "invalid rate: expected a number, or a string with an optional k, M or G suffix"
)]
enum RateValue {
    Int(u64),
    Text(String),
}

fn read_rate<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Option<u64>, D::Error> {
    let in_key = |e: &dyn std::fmt::Display| D::Error::custom(format!("{key}: {e}"));
    let value = match Option::<RateValue>::deserialize(d).map_err(|e| in_key(&e))? {
        None => return Ok(None),
        Some(RateValue::Int(0)) => Err("a rate must be at least 1".to_string()),
        Some(RateValue::Int(v)) => Ok(v),
        Some(RateValue::Text(s)) => parse_rate(&s),
    };
    value.map(Some).map_err(|e| in_key(&e))
}

fn read_rate_pps<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    read_rate(d, "rate_pps")
}

fn read_rate_bps<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    read_rate(d, "rate_bps")
}

fn read_queues<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    match Option::<u16>::deserialize(d)? {
        None => Ok(one_pair()),
        Some(q) => parse_queues(&q.to_string()).map_err(D::Error::custom),
    }
}

fn read_socket_group<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    read_group(d, "socket_group")
}

/// An optional group name in a file or request, checked to exist as [`parse_socket_group`]
/// checks it; an error names `field`.
pub fn read_group<'de, D: Deserializer<'de>>(
    d: D,
    field: &str,
) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|g| parse_socket_group(&g).map_err(|e| D::Error::custom(format!("{field}: {e}"))))
        .transpose()
}

/// A socket mode as written: octal digits in a string, or a number (TOML's `0o660`).
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "socket_mode: expected octal permission bits in a string, e.g. \"0660\""
)]
enum ModeValue {
    Int(u32),
    Text(String),
}

fn read_socket_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match ModeValue::deserialize(d)? {
        ModeValue::Int(m) => parse_socket_mode(&format!("{m:o}")),
        ModeValue::Text(s) => parse_socket_mode(&s),
    }
    .map_err(|e| D::Error::custom(e.replace("socket-mode=", "socket_mode: ")))
}

fn write_socket_mode<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{mode:04o}"))
}

fn read_vlan<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    Option::<u16>::deserialize(d)?
        .map(|v| parse_vlan(&v.to_string()).map_err(D::Error::custom))
        .transpose()
}

/// A port as `xvdpa ctl list` shows it: its settings, where it sits and how it is doing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortInfo {
    pub index: u32,
    #[serde(flatten)]
    pub spec: PortSpec,
    /// `waiting`, `connected`, `stopping`, `removed` or `failed: <why>`.
    pub state: String,
    /// How frames reach the guest: `copy` (through the NIC queue's UMEM), `guest-memory`
    /// (the guest's RAM is the UMEM) or `copy (guest memory refused: <why>)` for a port that
    /// asked for guest memory and fell back; empty from a daemon that does not say.
    #[serde(default)]
    pub datapath: String,
}

/// Counters of one queue pair.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueCounters {
    pub pair: u32,
    pub counters: BTreeMap<String, u64>,
}

/// Counters of one port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortCounters {
    pub port: PortInfo,
    /// Frames the XDP program steered to this port (before AF_XDP).
    pub xdp_steered: u64,
    pub queues: Vec<QueueCounters>,
}

/// Everything `xvdpa stats` and the metrics endpoint show.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub iface: String,
    pub uptime_seconds: f64,
    /// The XDP program's counters by name, summed over CPUs.
    pub xdp: BTreeMap<String, u64>,
    pub ports: Vec<PortCounters>,
}

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    AddPort(PortSpec),
    /// Removes the port named by socket path, MAC or index.
    DelPort {
        port: String,
    },
    List,
    Stats,
}

/// The reply to a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsSnapshot>,
}

impl Response {
    /// A refusal saying why.
    pub fn error(e: impl ToString) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(s: &str) -> MacAddr {
        MacAddr::parse_unicast(s).unwrap()
    }

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"add-port","socket":"/a.sock","mac":"52:54:00:00:00:01"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::AddPort(PortSpec {
                socket: "/a.sock".into(),
                mode: SocketRole::Server,
                mac: mac("52:54:00:00:00:01"),
                allow_macs: vec![],
                rate_pps: None,
                rate_bps: None,
                vlan: None,
                vlan_passthrough: false,
                queue_pairs: 1,
                cpus: vec![],
                promisc: false,
                guest_umem: false,
                guest_umem_tx: GuestUmemTx::Auto,
                tx_gso: TxGso::Kernel,
                socket_group: None,
                socket_mode: 0o660,
                migrate_from: None,
            })
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"del-port","port":"3"}"#).unwrap();
        assert_eq!(r, Request::DelPort { port: "3".into() });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"cmd":"add-port","socket":"/a","mac":"52:54:00:00:00:01","speed":1}"#
        )
        .is_err());
        assert_eq!(
            serde_json::to_string(&Request::List).unwrap(),
            r#"{"cmd":"list"}"#
        );
    }

    #[test]
    fn add_port_reads_every_key_and_checks_values() {
        let r: Request = serde_json::from_str(
            r#"{"cmd":"add-port","socket":"/a","mac":"52:54:00:00:00:01",
                "allow_macs":["52:54:00:00:00:09"],"rate_pps":100000,"rate_bps":"2G",
                "queues":2,"cpus":[2,3],"vlan":100,"vlan_passthrough":true,"promisc":true,
                "guest_umem":true,"guest_umem_tx":"in-place","tx_gso":"daemon","socket_group":"root","socket_mode":"0640","mode":"client","migrate_from":"/b"}"#,
        )
        .unwrap();
        let spec = PortSpec {
            socket: "/a".into(),
            mode: SocketRole::Client,
            mac: mac("52:54:00:00:00:01"),
            allow_macs: vec![mac("52:54:00:00:00:09")],
            rate_pps: Some(100_000),
            rate_bps: Some(2_000_000_000),
            vlan: Some(100),
            vlan_passthrough: true,
            queue_pairs: 2,
            cpus: vec![2, 3],
            promisc: true,
            guest_umem: true,
            guest_umem_tx: GuestUmemTx::InPlace,
            tx_gso: TxGso::Daemon,
            socket_group: Some("root".into()),
            socket_mode: 0o640,
            migrate_from: Some("/b".into()),
        };
        assert_eq!(r, Request::AddPort(spec.clone()));
        // What `xvdpa ctl add-port` sends reads back the same.
        let sent = serde_json::to_string(&Request::AddPort(spec.clone())).unwrap();
        assert_eq!(
            serde_json::from_str::<Request>(&sent).unwrap(),
            Request::AddPort(spec)
        );

        let err = |body: &str| {
            let line = format!(r#"{{"cmd":"add-port","socket":"/a",{body}}}"#);
            serde_json::from_str::<Request>(&line)
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#""mac":"ff:ff:ff:ff:ff:ff""#).contains("mac: invalid MAC"));
        assert!(err(r#""mac":"52:54:00""#).contains("invalid MAC"));
        let ok_mac = r#""mac":"52:54:00:00:00:01""#;
        assert!(err(&format!(r#"{ok_mac},"rate_pps":0"#))
            .contains("rate_pps: a rate must be at least 1"));
        assert!(err(&format!(r#"{ok_mac},"rate_bps":"fast""#)).contains("rate_bps: invalid rate"));
        assert!(err(&format!(r#"{ok_mac},"rate_bps":-1"#)).contains("rate_bps: invalid rate"));
        assert!(err(&format!(r#"{ok_mac},"queues":17"#)).contains("1 to 16"));
        assert!(err(&format!(r#"{ok_mac},"vlan":4095"#)).contains("1 to 4094"));
        assert!(err(&format!(r#"{ok_mac},"mode":"listen""#)).contains("unknown variant"));
        assert!(
            err(&format!(r#"{ok_mac},"allow_macs":["01:00:5e:00:00:01"]"#))
                .contains("allow_macs: invalid MAC")
        );
        assert!(
            err(&format!(r#"{ok_mac},"socket_group":"xvdpa-no-such-group""#))
                .contains("socket_group: no such group \"xvdpa-no-such-group\"")
        );
        assert!(err(&format!(r#"{ok_mac},"socket_mode":"0680""#))
            .contains("socket_mode: \"0680\": expected octal permission bits"));
        assert!(err(&format!(r#"{ok_mac},"socket_mode":"1777""#)).contains("up to 0777"));
    }

    #[test]
    fn socket_modes_read_as_octal() {
        assert_eq!(parse_socket_mode("0660"), Ok(0o660));
        assert_eq!(parse_socket_mode("600"), Ok(0o600));
        assert_eq!(parse_socket_mode("0o640"), Ok(0o640));
        assert!(parse_socket_mode("").is_err());
        assert!(parse_socket_mode("0o").is_err());
        assert!(parse_socket_mode("9").is_err());
        assert!(parse_socket_mode("01000").is_err());
        // A number, as TOML's 0o640 arrives, is the mode itself.
        let spec: PortSpec =
            serde_json::from_str(r#"{"socket":"/a","mac":"52:54:00:00:00:01","socket_mode":416}"#)
                .unwrap();
        assert_eq!(spec.socket_mode, 0o640);
    }

    #[test]
    fn port_info_keeps_its_json_field_names() {
        let info = PortInfo {
            index: 2,
            spec: PortSpec {
                socket: "/a".into(),
                mac: mac("52:54:00:00:00:01"),
                rate_bps: Some(2_000_000_000),
                queue_pairs: 2,
                cpus: vec![1],
                ..Default::default()
            },
            state: "waiting".into(),
            datapath: "copy".into(),
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "index": 2, "socket": "/a", "mode": "server", "mac": "52:54:00:00:00:01", "allow_macs": [],
                "rate_pps": null, "rate_bps": 2_000_000_000u64, "vlan": null, "vlan_passthrough": false,
                "queue_pairs": 2, "cpus": [1], "promisc": false, "guest_umem": false,
                "socket_group": null, "socket_mode": "0660", "state": "waiting", "datapath": "copy",
            })
        );
        assert_eq!(serde_json::from_value::<PortInfo>(json).unwrap(), info);
    }
}
