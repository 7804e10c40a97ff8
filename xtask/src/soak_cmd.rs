//! `cargo xtask soak`: the lifecycle soak (`xvdpa_tests::soak`) on a lab of its own, for as
//! many cycles as asked. The suite runs the same code for 50 cycles (tests/tests/soak.rs).

use anyhow::{bail, Result};
use xvdpa_tests::lab::Lab;
use xvdpa_tests::soak;

use crate::build;
use crate::say;
use crate::util::is_root;

pub fn soak(cycles: usize, release: bool) -> Result<()> {
    if !is_root() {
        bail!("the soak needs root (namespaces, XDP, AF_XDP): run `cargo xtask soak` as root");
    }
    // A daemon given in XVDPA_BIN (an installed or release build) is soaked as it is.
    match std::env::var_os("XVDPA_BIN") {
        Some(bin) => say!("soaking {}", std::path::Path::new(&bin).display()),
        None => {
            let daemon = build::build(release)?;
            // The soak starts the daemon it finds here.
            std::env::set_var("XVDPA_BIN", &daemon);
        }
    }
    let mut lab = Lab::named("xvdpa-soak");
    lab.create()?;
    lab.owned = true;
    say!("{cycles} cycles on port 0 while port 1 streams");
    let step = (cycles / 10).max(1);
    let report = soak::run(&lab, cycles, |n| {
        if n % step == 0 {
            say!("{n}/{cycles} cycles");
        }
    })?;
    println!("{report}");
    report.check()?;
    say!("fds and threads came back; resident memory within the tolerance");
    Ok(())
}
