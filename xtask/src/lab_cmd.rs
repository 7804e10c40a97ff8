//! `cargo xtask lab up|down|status`.

use anyhow::{bail, Result};
use xvdpa_tests::lab::{self, Lab};

use crate::bootstrap::{ensure_packages, BUILD_PACKAGES};
use crate::say;
use crate::util::is_root;

pub const DEFAULT_LAB: &str = "xvdpa-lab";

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LabAction {
    Up,
    Down,
    Status,
}

/// Creates the lab unless it exists; returns it (left running).
pub fn up(name: &str) -> Result<Lab> {
    if !is_root() {
        bail!("the lab needs root (network namespaces, veth, XDP): run as root");
    }
    ensure_packages(BUILD_PACKAGES)?;
    let lab = Lab::named(name);
    if lab.exists() {
        return Ok(lab);
    }
    say!(
        "creating lab {name}: {} ({} {}/{}) <-veth-> {} ({} {}/{})",
        lab.host_ns,
        lab::NIC,
        lab::HOST_IP,
        lab::PREFIX,
        lab.wire_ns,
        lab::WIRE,
        lab::WIRE_IP,
        lab::PREFIX
    );
    lab.create()?;
    Ok(lab)
}

pub fn lab(action: LabAction, name: &str) -> Result<()> {
    match action {
        LabAction::Up => {
            let lab = up(name)?;
            say!("lab {name} is up; `ip netns exec {} ...` runs on the NIC side, `ip netns exec {} ...` on the wire", lab.host_ns, lab.wire_ns);
        }
        LabAction::Down => {
            let lab = Lab::named(name);
            if lab.exists() {
                lab.destroy();
                say!("lab {name} removed");
            } else {
                say!("lab {name} does not exist");
            }
        }
        LabAction::Status => {
            let lab = Lab::named(name);
            say!("lab {name}: {}", if lab.exists() { "up" } else { "down" });
        }
    }
    Ok(())
}
