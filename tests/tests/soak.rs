//! A short run of the lifecycle soak (`cargo xtask soak` runs the long one): frontends come
//! and go and reset their device on one port while another port streams; the daemon's fds,
//! threads and memory must come back. `XVDPA_SOAK_CYCLES` sets the number of cycles.
//! Needs root (namespaces, XDP); `cargo xtask test` runs it.

use anyhow::{Context, Result};
use xvdpa_tests::lab::Lab;
use xvdpa_tests::soak;

#[test]
fn connect_reset_disconnect_cycles_leave_the_daemon_as_it_was() -> Result<()> {
    let cycles = match std::env::var("XVDPA_SOAK_CYCLES") {
        Ok(n) => n.parse().context("XVDPA_SOAK_CYCLES")?,
        Err(_) => 50,
    };
    let lab = Lab::unique("soak")?;
    let report = soak::run(&lab, cycles, |_| {})?;
    println!("{report}");
    report.check()
}
