//! The XDP steering program: loading, attaching, and its maps.

use std::os::fd::RawFd;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use xvdpa_common::{
    xsk_slot, MacKey, PortEntry, XdpCounter, COUNTERS_MAP, MAX_NIC_QUEUES, MAX_PORTS, PORTS_MAP,
    PORT_STEERED_MAP, XDP_PROGRAM, XSKS_MAP,
};

use crate::mac::MacAddr;

/// The compiled XDP program, built by `cargo xtask build` and embedded at compile time; only
/// there when it was built (the cfg `xvdpa_ebpf`, set by `build.rs`), so the rest of the
/// library builds and tests without the eBPF toolchain. The binaries hand it to
/// [`Steering::attach`].
#[cfg(xvdpa_ebpf)]
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XVDPA_EBPF_OBJECT"));

/// The aya-log reader of the XDP program's log records.
pub type XdpLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// How to attach the XDP program, as `--xdp-mode` and the config file's `xdp_mode` spell it
/// (`auto`, `driver`, `skb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpModeChoice {
    /// Native (driver) mode if the driver has it, generic (skb) mode otherwise.
    #[default]
    Auto,
    Driver,
    Skb,
}

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("cannot load the XDP program: {0} (needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load(#[source] aya::EbpfError),
    #[error("XDP program {0} missing from the embedded object")]
    MissingProgram(&'static str),
    #[error("BPF map {0} missing from the embedded object")]
    MissingMap(&'static str),
    #[error("cannot verify the XDP program: {0}")]
    Verify(#[source] aya::programs::ProgramError),
    #[error("cannot attach XDP to {iface}: {source}")]
    Attach {
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("port index {0} is beyond the {MAX_PORTS} ports the steering map holds")]
    PortIndex(u32),
    #[error("NIC queue {0} is beyond the {MAX_NIC_QUEUES} queues the steering map holds")]
    Queue(u32),
    #[error("cannot size per-CPU counters: {0}")]
    Cpus(std::io::Error),
}

/// The program attached to one NIC, and handles on its maps.
pub struct Steering {
    ebpf: Ebpf,
    link: Option<aya::programs::xdp::XdpLinkId>,
    iface: String,
    mode: XdpMode,
    ports: BpfHashMap<MapData, MacKey, PortEntry>,
    xsks: XskMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
    port_steered: PerCpuArray<MapData, u64>,
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> SteeringError {
    move |source| SteeringError::Map { map, source }
}

impl Steering {
    /// Loads the program from `object` (the ELF bytes, aligned as
    /// `aya::include_bytes_aligned!` gives them, e.g. `XDP_OBJECT`) and attaches it to
    /// `iface`. Returns the aya-log logger too, which must stay alive (and be polled) for as
    /// long as the program runs.
    pub fn attach(
        object: &[u8],
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<(Self, Option<XdpLogger>), SteeringError> {
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .map_err(SteeringError::Load)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "XDP program logs unavailable");
                None
            }
        };
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SteeringError::MissingMap(name))
        };
        let ports =
            BpfHashMap::try_from(take(&mut ebpf, PORTS_MAP)?).map_err(map_err(PORTS_MAP))?;
        let xsks = XskMap::try_from(take(&mut ebpf, XSKS_MAP)?).map_err(map_err(XSKS_MAP))?;
        let counters =
            PerCpuArray::try_from(take(&mut ebpf, COUNTERS_MAP)?).map_err(map_err(COUNTERS_MAP))?;
        let port_steered = PerCpuArray::try_from(take(&mut ebpf, PORT_STEERED_MAP)?)
            .map_err(map_err(PORT_STEERED_MAP))?;

        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(SteeringError::MissingProgram(XDP_PROGRAM))?
            .try_into()
            .map_err(SteeringError::Verify)?;
        program.load().map_err(SteeringError::Verify)?;
        let modes: &[XdpMode] = match choice {
            XdpModeChoice::Auto => &[XdpMode::Driver, XdpMode::Skb],
            XdpModeChoice::Driver => &[XdpMode::Driver],
            XdpModeChoice::Skb => &[XdpMode::Skb],
        };
        let mut last_err = None;
        let mut attached = None;
        for &mode in modes {
            match program.attach(iface, mode) {
                Ok(link) => {
                    attached = Some((link, mode));
                    break;
                }
                Err(e) => {
                    tracing::debug!(iface, ?mode, error = %e, "XDP attach mode refused");
                    last_err = Some(e);
                }
            }
        }
        let (link, mode) = match (attached, last_err) {
            (Some(a), _) => a,
            (None, Some(source)) => {
                return Err(SteeringError::Attach {
                    iface: iface.to_string(),
                    source,
                })
            }
            (None, None) => unreachable!("at least one mode is always tried"),
        };
        tracing::info!(iface, mode = ?mode, "XDP steering attached");
        Ok((
            Steering {
                ebpf,
                link: Some(link),
                iface: iface.to_string(),
                mode,
                ports,
                xsks,
                counters,
                port_steered,
            },
            logger,
        ))
    }

    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// Steers frames for `mac` (tagged with `vlan`, or untagged) to port `port_index`'s
    /// sockets.
    pub fn add_port(
        &mut self,
        mac: MacAddr,
        vlan: Option<u16>,
        port_index: u32,
    ) -> Result<(), SteeringError> {
        if port_index >= MAX_PORTS {
            return Err(SteeringError::PortIndex(port_index));
        }
        let entry = PortEntry {
            port_index,
            flags: 0,
        };
        self.ports
            .insert(Self::key(mac, vlan), entry, 0)
            .map_err(map_err(PORTS_MAP))
    }

    fn key(mac: MacAddr, vlan: Option<u16>) -> MacKey {
        MacKey::tagged(mac.0, vlan.unwrap_or(0))
    }

    /// Stops steering `mac` to port `port_index`; its frames go to the host stack again. An
    /// entry that points at another port (a migration target that took the MAC over) stays.
    pub fn remove_port(
        &mut self,
        mac: MacAddr,
        vlan: Option<u16>,
        port_index: u32,
    ) -> Result<(), SteeringError> {
        let key = Self::key(mac, vlan);
        match self.ports.get(&key, 0) {
            Ok(entry) if entry.port_index != port_index => return Ok(()),
            Ok(_) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(PORTS_MAP)(e)),
        }
        match self.ports.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(PORTS_MAP)(e)),
        }
    }

    fn slot(port_index: u32, queue: u32) -> Result<u32, SteeringError> {
        if port_index >= MAX_PORTS {
            return Err(SteeringError::PortIndex(port_index));
        }
        if queue >= MAX_NIC_QUEUES {
            return Err(SteeringError::Queue(queue));
        }
        Ok(xsk_slot(port_index, queue))
    }

    /// Points (port, NIC queue) at an AF_XDP socket.
    pub fn bind_socket(
        &mut self,
        port_index: u32,
        queue: u32,
        fd: RawFd,
    ) -> Result<(), SteeringError> {
        let slot = Self::slot(port_index, queue)?;
        self.xsks.set(slot, fd, 0).map_err(map_err(XSKS_MAP))
    }

    /// Removes the socket of (port, NIC queue); its frames are dropped and counted until the
    /// next bind.
    pub fn unbind_socket(&mut self, port_index: u32, queue: u32) -> Result<(), SteeringError> {
        let slot = Self::slot(port_index, queue)?;
        match self.xsks.unset(slot) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(XSKS_MAP)(e)),
        }
    }

    /// The program's counters, summed over CPUs, in [`XdpCounter::ALL`] order.
    pub fn counters(&self) -> [u64; XdpCounter::COUNT as usize] {
        let mut out = [0u64; XdpCounter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Zeroes a port slot's steered counter, so a new port in a reused slot starts from 0.
    pub fn reset_port_counter(&mut self, port_index: u32) -> Result<(), SteeringError> {
        if port_index >= MAX_PORTS {
            return Err(SteeringError::PortIndex(port_index));
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| SteeringError::Cpus(e))?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![0u64; cpus]).map_err(SteeringError::Cpus)?;
        self.port_steered
            .set(port_index, zeros, 0)
            .map_err(map_err(PORT_STEERED_MAP))
    }

    /// Frames steered to one port, summed over CPUs.
    pub fn port_steered(&self, port_index: u32) -> u64 {
        self.port_steered
            .get(&port_index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Detaches the program now (it would also go when the daemon exits and its link closes).
    pub fn detach(&mut self) {
        if let Some(link) = self.link.take() {
            if let Some(Ok(program)) = self.ebpf.program_mut(XDP_PROGRAM).map(<&mut Xdp>::try_from)
            {
                match program.detach(link) {
                    Ok(()) => tracing::info!(iface = %self.iface, "XDP steering detached"),
                    Err(e) => tracing::warn!(iface = %self.iface, error = %e, "XDP detach failed"),
                }
            }
        }
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.detach();
    }
}
