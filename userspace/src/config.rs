//! The operator's input: `--port` specifications and the TOML config file.
//!
//! On the command line a port is `--port socket=PATH[,mode=client],mac=MAC[,allow-mac=MAC]...
//! [,rate-pps=N][,rate-bps=N][,queues=N][,cpus=A+B+...][,vlan=N][,vlan-passthrough=on][,promisc=on]
//! [,guest-umem=on[,guest-umem-tx=auto|in-place|copy]][,tx-gso=kernel|daemon][,socket-group=NAME][,socket-mode=OCTAL][,migrate-from=PORT]`; rates take
//! k, M and G suffixes (powers of 1000). The same fields, spelled with underscores, make up
//! a `[[port]]` table in the file given to `--config` (the serde form of
//! [`PortSpec`]), next to the daemon-wide settings.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::{
    parse_cpus, parse_guest_umem_tx, parse_mode, parse_queues, parse_rate, parse_socket_group,
    parse_socket_mode, parse_tx_gso, parse_vlan, PortSpec,
};
use crate::mac::{MacAddr, MacError};
use crate::nic::steering::XdpModeChoice;
use crate::nic::xsk::XskModeChoice;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("port {spec:?}: {why}")]
    Port { spec: String, why: String },
    #[error("cannot read config file {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("config file {path}: {why}")]
    Parse { path: PathBuf, why: String },
}

fn port_err(spec: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Port {
        spec: spec.to_string(),
        why: why.into(),
    }
}

fn mac_field(spec: &str, key: &str, value: &str) -> Result<MacAddr, ConfigError> {
    MacAddr::parse_unicast(value).map_err(|e: MacError| port_err(spec, format!("{key}: {e}")))
}

/// A switch's value: `on` or `off` (or true/false, 1/0).
fn on_off(spec: &str, key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(port_err(
            spec,
            format!("{key}={value:?}: expected on or off"),
        )),
    }
}

/// Parses one `--port` value.
pub fn parse_port(spec: &str) -> Result<PortSpec, ConfigError> {
    let mut socket = None;
    let mut mac = None;
    let mut port = PortSpec::default();
    for field in spec.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        let Some((key, value)) = field.split_once('=') else {
            return Err(port_err(spec, format!("{field:?} is not key=value")));
        };
        match key.trim() {
            "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
            "mode" => port.mode = parse_mode(value).map_err(|e| port_err(spec, e))?,
            "mac" => mac = Some(mac_field(spec, "mac", value)?),
            "allow-mac" => port.allow_macs.push(mac_field(spec, "allow-mac", value)?),
            "rate-pps" => port.rate_pps = Some(parse_rate(value).map_err(|e| port_err(spec, e))?),
            "rate-bps" => port.rate_bps = Some(parse_rate(value).map_err(|e| port_err(spec, e))?),
            "queues" => port.queue_pairs = parse_queues(value).map_err(|e| port_err(spec, e))?,
            "cpus" => port.cpus = parse_cpus(value).map_err(|e| port_err(spec, e))?,
            "vlan" => port.vlan = Some(parse_vlan(value).map_err(|e| port_err(spec, e))?),
            "vlan-passthrough" => port.vlan_passthrough = on_off(spec, "vlan-passthrough", value)?,
            "promisc" => port.promisc = on_off(spec, "promisc", value)?,
            "guest-umem" => port.guest_umem = on_off(spec, "guest-umem", value)?,
            "guest-umem-tx" => {
                port.guest_umem_tx = parse_guest_umem_tx(value).map_err(|e| port_err(spec, e))?
            }
            "tx-gso" => port.tx_gso = parse_tx_gso(value).map_err(|e| port_err(spec, e))?,
            "socket-group" => {
                port.socket_group = Some(
                    parse_socket_group(value)
                        .map_err(|e| port_err(spec, format!("socket-group: {e}")))?,
                )
            }
            "socket-mode" => {
                port.socket_mode = parse_socket_mode(value).map_err(|e| port_err(spec, e))?
            }
            "migrate-from" if !value.is_empty() => port.migrate_from = Some(value.to_string()),
            other => {
                return Err(port_err(
                    spec,
                    format!(
                        "unknown key {other:?} (known: socket, mode, mac, allow-mac, rate-pps, \
                         rate-bps, queues, cpus, vlan, vlan-passthrough, promisc, guest-umem, \
                         guest-umem-tx, tx-gso, socket-group, socket-mode, migrate-from)"
                    ),
                ))
            }
        }
    }
    port.socket = socket.ok_or_else(|| port_err(spec, "socket=PATH is missing"))?;
    port.mac = mac.ok_or_else(|| port_err(spec, "mac=MAC is missing"))?;
    Ok(port)
}

/// The config file: every field optional, command-line flags win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub iface: Option<String>,
    pub mtu: Option<u16>,
    pub xdp_mode: Option<XdpModeChoice>,
    pub xsk_mode: Option<XskModeChoice>,
    pub busy_poll: Option<bool>,
    /// false: `--no-adaptive-poll`.
    pub adaptive_poll: Option<bool>,
    pub ctl: Option<PathBuf>,
    /// The group allowed to use the control socket (`--ctl-group`).
    #[serde(default, deserialize_with = "read_ctl_group")]
    pub ctl_group: Option<String>,
    pub metrics: Option<String>,
    /// The user to run as after start-up (`--user`).
    pub user: Option<String>,
    /// The `[[port]]` tables, each read as a [`PortSpec`] by [`ConfigFile::parse`], which
    /// names the one that is wrong.
    #[serde(default, rename = "port")]
    port_tables: Vec<toml::Table>,
    #[serde(skip)]
    pub ports: Vec<PortSpec>,
}

/// `ctl_group`, checked to exist when the file is read, as `--ctl-group` is.
fn read_ctl_group<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    crate::api::read_group(d, "ctl_group")
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let parse_err = |why: String| ConfigError::Parse {
            path: path.to_path_buf(),
            why,
        };
        let mut file: ConfigFile =
            toml::from_str(text).map_err(|e| parse_err(e.to_string().trim().to_string()))?;
        for (i, table) in std::mem::take(&mut file.port_tables)
            .into_iter()
            .enumerate()
        {
            let socket = match table.get("socket").and_then(toml::Value::as_str) {
                Some(socket) => format!(" ({socket})"),
                None => String::new(),
            };
            let spec = toml::Value::Table(table)
                .try_into::<PortSpec>()
                .map_err(|e| parse_err(format!("port {}{socket}: {}", i + 1, one_line(&e))))?;
            file.ports.push(spec);
        }
        Ok(file)
    }
}

/// A port table's error as `key: what is wrong`, on one line: toml names the key on a line
/// of its own, which the checks in [`PortSpec`]'s deserializer already start with.
fn one_line(e: &toml::de::Error) -> String {
    let text = e.to_string();
    let mut lines = text.trim().lines();
    let what = lines.next().unwrap_or_default();
    let key = lines
        .next()
        .and_then(|l| l.strip_prefix("in `"))
        .and_then(|l| l.strip_suffix('`'));
    match key {
        Some(key) if !what.starts_with(&format!("{key}:")) => format!("{key}: {what}"),
        _ => what.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_with_every_option() {
        let p = parse_port("socket=/run/x/vm0.sock,mac=52:54:00:00:00:01,allow-mac=52:54:00:00:00:09,rate-pps=100k,rate-bps=2.5G")
            .unwrap();
        assert_eq!(p.socket, PathBuf::from("/run/x/vm0.sock"));
        assert_eq!(p.mac.to_string(), "52:54:00:00:00:01");
        assert_eq!(p.allow_macs.len(), 1);
        assert_eq!(p.rate_pps, Some(100_000));
        assert_eq!(p.rate_bps, Some(2_500_000_000));
        let p = parse_port("mac=52:54:00:00:00:01,socket=/a").unwrap();
        assert_eq!((p.rate_pps, p.rate_bps, p.queue_pairs), (None, None, 1));
        let p = parse_port("mac=52:54:00:00:00:01,socket=/a,queues=4,cpus=2+3").unwrap();
        assert_eq!((p.queue_pairs, p.cpus), (4, vec![2, 3]));
        assert_eq!(p.mode, crate::api::SocketRole::Server);
        let p = parse_port("mode=client,socket=/q/vm0.sock,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(p.mode, crate::api::SocketRole::Client);
        assert_eq!(p.migrate_from, None);
        let p = parse_port("mac=52:54:00:00:00:01,socket=/b,migrate-from=/a").unwrap();
        assert_eq!(p.migrate_from.as_deref(), Some("/a"));
    }

    #[test]
    fn bad_port_specs_say_what_is_wrong() {
        let msg = |s: &str| parse_port(s).unwrap_err().to_string();
        assert!(msg("mac=52:54:00:00:00:01").contains("socket=PATH is missing"));
        assert!(msg("socket=/a").contains("mac=MAC is missing"));
        assert!(msg("socket=/a,mac=ff:ff:ff:ff:ff:ff").contains("unicast"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,speed=9").contains("unknown key \"speed\""));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,rate-pps=fast").contains("invalid rate"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,rate-pps=0").contains("at least 1"));
        assert!(msg("socket=/a,mac").contains("not key=value"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,queues=0").contains("1 to 16"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,queues=17").contains("1 to 16"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,cpus=a").contains("CPU numbers"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,vlan=4095").contains("1 to 4094"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,mode=listen").contains("server or client"));
        assert_eq!(
            parse_port("socket=/a,mac=52:54:00:00:00:01,vlan=100")
                .unwrap()
                .vlan,
            Some(100)
        );
        let passthrough = |v: &str| {
            parse_port(&format!(
                "socket=/a,mac=52:54:00:00:00:01,vlan-passthrough={v}"
            ))
            .map(|p| p.vlan_passthrough)
        };
        assert!(passthrough("on").unwrap());
        assert!(!passthrough("off").unwrap());
        assert!(
            !parse_port("socket=/a,mac=52:54:00:00:00:01")
                .unwrap()
                .vlan_passthrough
        );
        assert!(passthrough("maybe")
            .unwrap_err()
            .to_string()
            .contains("vlan-passthrough=\"maybe\": expected on or off"));
    }

    #[test]
    fn tx_gso_is_the_kernels_unless_the_port_says_daemon() {
        let gso = |extra: &str| {
            parse_port(&format!("socket=/a,mac=52:54:00:00:00:01{extra}")).map(|p| p.tx_gso)
        };
        assert_eq!(gso("").unwrap(), crate::api::TxGso::Kernel);
        assert_eq!(gso(",tx-gso=kernel").unwrap(), crate::api::TxGso::Kernel);
        assert_eq!(gso(",tx-gso=daemon").unwrap(), crate::api::TxGso::Daemon);
        assert!(gso(",tx-gso=nic")
            .unwrap_err()
            .to_string()
            .contains("expected kernel or daemon"));
    }

    #[test]
    fn guest_umem_is_a_switch_off_by_default() {
        let guest_umem = |extra: &str| {
            parse_port(&format!("socket=/a,mac=52:54:00:00:00:01{extra}")).map(|p| p.guest_umem)
        };
        assert!(!guest_umem("").unwrap());
        let tx = |extra: &str| {
            parse_port(&format!(
                "socket=/a,mac=52:54:00:00:00:01,guest-umem=on{extra}"
            ))
            .map(|p| p.guest_umem_tx)
        };
        assert_eq!(tx("").unwrap(), crate::api::GuestUmemTx::Auto);
        assert_eq!(
            tx(",guest-umem-tx=in-place").unwrap(),
            crate::api::GuestUmemTx::InPlace
        );
        assert_eq!(
            tx(",guest-umem-tx=copy").unwrap(),
            crate::api::GuestUmemTx::Copy
        );
        assert!(tx(",guest-umem-tx=zero")
            .unwrap_err()
            .to_string()
            .contains("expected auto, in-place or copy"));
        assert!(guest_umem(",guest-umem=on").unwrap());
        assert!(!guest_umem(",guest-umem=off").unwrap());
        assert!(guest_umem(",guest-umem=yes")
            .unwrap_err()
            .to_string()
            .contains("guest-umem=\"yes\": expected on or off"));
        let file = ConfigFile::parse(
            Path::new("x.toml"),
            "[[port]]\nsocket = \"/a\"\nmac = \"52:54:00:00:00:01\"\nguest_umem = true\n",
        )
        .unwrap();
        assert!(file.ports[0].guest_umem);
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let f =
            ConfigFile::parse(Path::new("xvdpa.toml"), include_str!("../dist/xvdpa.toml")).unwrap();
        assert_eq!(f.iface.as_deref(), Some("eth0"));
        assert_eq!(f.ctl, Some(PathBuf::from("/run/xvdpa/xvdpa.ctl")));
        // The unit gives --user; the example port tables are commented out.
        assert_eq!((f.user, f.ports.len()), (None, 0));
    }

    #[test]
    fn socket_group_and_mode_parse_and_say_what_is_wrong() {
        let p = parse_port("socket=/a,mac=52:54:00:00:00:01").unwrap();
        assert_eq!((p.socket_group, p.socket_mode), (None, 0o660));
        let p = parse_port("socket=/a,mac=52:54:00:00:00:01,socket-group=root,socket-mode=0600")
            .unwrap();
        assert_eq!(
            (p.socket_group.as_deref(), p.socket_mode),
            (Some("root"), 0o600)
        );
        let msg = |s: &str| parse_port(s).unwrap_err().to_string();
        assert!(
            msg("socket=/a,mac=52:54:00:00:00:01,socket-group=xvdpa-no-such-group")
                .contains("socket-group: no such group \"xvdpa-no-such-group\"")
        );
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,socket-mode=rw")
            .contains("socket-mode=\"rw\": expected octal permission bits"));
        assert!(msg("socket=/a,mac=52:54:00:00:00:01,socket-mode=4755").contains("up to 0777"));
    }

    #[test]
    fn config_file_parses_and_checks_ports() {
        let text = r#"
            iface = "eth0"
            mtu = 1500
            xsk_mode = "copy"
            ctl = "/run/xvdpa/xvdpa.ctl"
            metrics = "127.0.0.1:9477"

            [[port]]
            socket = "/run/xvdpa/vm0.sock"
            mac = "52:54:00:00:00:01"

            [[port]]
            socket = "/run/xvdpa/vm1.sock"
            mac = "52:54:00:00:00:02"
            allow_macs = ["52:54:00:00:00:12"]
            rate_pps = 50000
            rate_bps = "100M"
        "#;
        let f = ConfigFile::parse(Path::new("x.toml"), text).unwrap();
        assert_eq!(f.iface.as_deref(), Some("eth0"));
        assert_eq!(f.ports.len(), 2);
        assert_eq!(f.ports[1].rate_bps, Some(100_000_000));
        assert_eq!(f.ports[1].rate_pps, Some(50_000));
        assert_eq!(f.xsk_mode, Some(XskModeChoice::Copy));

        let bad = ConfigFile::parse(
            Path::new("x.toml"),
            "[[port]]\nsocket = \"/a\"\nmac = \"01:00:5e:00:00:01\"\n",
        );
        let bad = bad.unwrap_err().to_string();
        assert!(bad.contains("port 1 (/a): mac"));
        assert!(!bad.contains('\n'), "one line: {bad:?}");
        let bad = ConfigFile::parse(
            Path::new("x.toml"),
            "[[port]]\nsocket = \"/a\"\nmac = \"52:54:00:00:00:01\"\npromisc = \"yes\"\n",
        );
        let bad = bad.unwrap_err().to_string();
        assert!(
            bad.contains("port 1 (/a): promisc: invalid type"),
            "{bad:?}"
        );
        let f = ConfigFile::parse(
            Path::new("x.toml"),
            "user = \"nobody\"\n[[port]]\nsocket = \"/a\"\nmac = \"52:54:00:00:00:01\"\n\
             socket_group = \"root\"\nsocket_mode = 0o600\n",
        )
        .unwrap();
        assert_eq!(f.user.as_deref(), Some("nobody"));
        assert_eq!(f.ports[0].socket_group.as_deref(), Some("root"));
        assert_eq!(f.ports[0].socket_mode, 0o600);
        let bad = ConfigFile::parse(
            Path::new("x.toml"),
            "[[port]]\nsocket = \"/a\"\nmac = \"52:54:00:00:00:01\"\nsocket_group = \"no-such-grp\"\n",
        );
        let bad = bad.unwrap_err().to_string();
        assert!(
            bad.contains("port 1 (/a): socket_group: no such group \"no-such-grp\""),
            "{bad:?}"
        );
        let f = ConfigFile::parse(Path::new("x.toml"), "ctl_group = \"root\"\n").unwrap();
        assert_eq!(f.ctl_group.as_deref(), Some("root"));
        let bad = ConfigFile::parse(Path::new("x.toml"), "ctl_group = \"no-such-grp\"\n");
        let bad = bad.unwrap_err().to_string();
        assert!(
            bad.contains("ctl_group: no such group \"no-such-grp\""),
            "{bad:?}"
        );
        let unknown = ConfigFile::parse(Path::new("x.toml"), "ifname = \"eth0\"\n");
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }
}
