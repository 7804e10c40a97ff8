//! Port specifications and the TOML config file, as operators write them.
//!
//! On the command line a port is `--port socket=PATH,mac=MAC[,allow-mac=MAC]...
//! [,rate-pps=N][,rate-bps=N][,queues=N][,cpus=A+B+...]`; rates take k, M and G suffixes
//! (powers of 1000). The same
//! fields, spelled with underscores, make up a `[[port]]` table in the file given to
//! `--config`, next to the daemon-wide settings.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::MAX_QUEUE_PAIRS;
use crate::mac::{MacAddr, MacError};
use crate::port::PortSpec;
use crate::steering::XdpModeChoice;
use crate::xsk::XskModeChoice;

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

fn mac_field(spec: &str, key: &str, value: &str) -> Result<MacAddr, ConfigError> {
    MacAddr::parse_unicast(value).map_err(|e: MacError| port_err(spec, format!("{key}: {e}")))
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
            "mac" => mac = Some(mac_field(spec, "mac", value)?),
            "allow-mac" => port.allow_macs.push(mac_field(spec, "allow-mac", value)?),
            "rate-pps" => port.rate_pps = Some(parse_rate(value).map_err(|e| port_err(spec, e))?),
            "rate-bps" => port.rate_bps = Some(parse_rate(value).map_err(|e| port_err(spec, e))?),
            "queues" => port.queue_pairs = parse_queues(value).map_err(|e| port_err(spec, e))?,
            "cpus" => port.cpus = parse_cpus(value).map_err(|e| port_err(spec, e))?,
            "vlan" => port.vlan = Some(parse_vlan(value).map_err(|e| port_err(spec, e))?),
            "promisc" => {
                port.promisc = match value {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => {
                        return Err(port_err(
                            spec,
                            format!("promisc={value:?}: expected on or off"),
                        ))
                    }
                }
            }
            other => {
                return Err(port_err(
                    spec,
                    format!(
                        "unknown key {other:?} (known: socket, mac, allow-mac, rate-pps, \
                         rate-bps, queues, cpus, vlan, promisc)"
                    ),
                ))
            }
        }
    }
    port.socket = socket.ok_or_else(|| port_err(spec, "socket=PATH is missing"))?;
    port.mac = mac.ok_or_else(|| port_err(spec, "mac=MAC is missing"))?;
    Ok(port)
}

/// A rate in the file or a control request: a number, or a string with a suffix.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum RateValue {
    Int(u64),
    Text(String),
}

impl RateValue {
    fn value(&self) -> Result<u64, String> {
        match self {
            RateValue::Int(0) => Err("a rate must be at least 1".into()),
            RateValue::Int(v) => Ok(*v),
            RateValue::Text(s) => parse_rate(s),
        }
    }
}

/// A port as a `[[port]]` table in the config file or an `add-port` control request spell
/// it; [`PortFields::into_spec`] checks it the same way for both.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortFields {
    pub socket: PathBuf,
    pub mac: String,
    #[serde(default)]
    pub allow_macs: Vec<String>,
    pub rate_pps: Option<RateValue>,
    pub rate_bps: Option<RateValue>,
    pub queues: Option<u16>,
    #[serde(default)]
    pub cpus: Vec<usize>,
    pub vlan: Option<u16>,
    #[serde(default)]
    pub promisc: bool,
}

impl PortFields {
    /// The port these fields describe, or what is wrong with them.
    pub fn into_spec(self) -> Result<PortSpec, String> {
        let mac = MacAddr::parse_unicast(&self.mac).map_err(|e| format!("mac: {e}"))?;
        let allow_macs = self
            .allow_macs
            .iter()
            .map(|m| MacAddr::parse_unicast(m).map_err(|e| format!("allow_macs: {e}")))
            .collect::<Result<_, _>>()?;
        let rate = |r: &Option<RateValue>, key: &str| {
            r.as_ref()
                .map(|v| v.value().map_err(|e| format!("{key}: {e}")))
                .transpose()
        };
        Ok(PortSpec {
            rate_pps: rate(&self.rate_pps, "rate_pps")?,
            rate_bps: rate(&self.rate_bps, "rate_bps")?,
            queue_pairs: match self.queues {
                Some(q) => parse_queues(&q.to_string())?,
                None => 1,
            },
            vlan: self.vlan.map(|v| parse_vlan(&v.to_string())).transpose()?,
            socket: self.socket,
            mac,
            allow_macs,
            cpus: self.cpus,
            promisc: self.promisc,
        })
    }
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
    pub ctl: Option<PathBuf>,
    pub metrics: Option<String>,
    #[serde(default, rename = "port")]
    ports: Vec<PortFields>,
    #[serde(skip)]
    pub parsed_ports: Vec<PortSpec>,
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
        for (i, p) in file.ports.iter().enumerate() {
            let spec = p.clone().into_spec().map_err(|why| {
                parse_err(format!("port {} ({}): {why}", i + 1, p.socket.display()))
            })?;
            file.parsed_ports.push(spec);
        }
        Ok(file)
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
        assert_eq!(
            parse_port("socket=/a,mac=52:54:00:00:00:01,vlan=100")
                .unwrap()
                .vlan,
            Some(100)
        );
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
        assert_eq!(f.parsed_ports.len(), 2);
        assert_eq!(f.parsed_ports[1].rate_bps, Some(100_000_000));
        assert_eq!(f.parsed_ports[1].rate_pps, Some(50_000));
        assert_eq!(f.xsk_mode, Some(XskModeChoice::Copy));

        let bad = ConfigFile::parse(
            Path::new("x.toml"),
            "[[port]]\nsocket = \"/a\"\nmac = \"01:00:5e:00:00:01\"\n",
        );
        assert!(bad.unwrap_err().to_string().contains("port 1 (/a): mac"));
        let unknown = ConfigFile::parse(Path::new("x.toml"), "ifname = \"eth0\"\n");
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }
}
