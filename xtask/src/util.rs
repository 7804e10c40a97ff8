//! Running commands the way xtask does everywhere: say what runs, fail with what it said.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Progress for the person at the terminal.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { eprintln!("xtask: {}", format!($($t)*)) };
}

pub fn workspace_root() -> PathBuf {
    xvdpa_tests::workspace_root()
}

/// Runs `cmd` with inherited output; an error names the command and its status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is kept for the error message.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` can be found on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A `cargo` for another toolchain, free of the variables the outer `cargo run` set for
/// the stable one (they would otherwise leak into the nightly build).
pub fn toolchain_cargo(toolchain: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", toolchain, "cargo"]);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = k == "CARGO_HOME" || k == "RUSTUP_HOME" || k == "CARGO_TERM_COLOR";
        if !keep && (k.starts_with("CARGO") || k.starts_with("RUST") || k == "RUSTC_WRAPPER") {
            c.env_remove(&k);
        }
    }
    c
}
