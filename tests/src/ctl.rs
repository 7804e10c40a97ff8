//! The daemon's control socket from the test side: raw JSON lines (for malformed-input tests)
//! and the real `xvdpa ctl` / `xvdpa stats` command line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub struct Ctl {
    pub path: PathBuf,
}

impl Ctl {
    pub fn new(path: &Path) -> Ctl {
        Ctl {
            path: path.to_path_buf(),
        }
    }

    /// Sends `line` (a newline is added) and returns the parsed reply.
    pub fn raw(&self, line: &str) -> Result<Value> {
        let mut s = UnixStream::connect(&self.path)
            .with_context(|| format!("connecting to {}", self.path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        serde_json::from_str(&reply).with_context(|| format!("reply {reply:?}"))
    }

    /// Runs `xvdpa <sub> --ctl PATH <args>`; returns stdout, or fails with stderr.
    pub fn cli(&self, sub: &[&str], args: &[&str]) -> Result<String> {
        let out = Command::new(crate::daemon::binary())
            .args(sub)
            .arg("--ctl")
            .arg(&self.path)
            .args(args)
            .output()
            .context("running xvdpa ctl")?;
        if !out.status.success() {
            bail!(
                "xvdpa {sub:?} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `xvdpa stats --json`, parsed.
    pub fn stats(&self) -> Result<Value> {
        let out = self.cli(&["stats"], &["--json"])?;
        serde_json::from_str(&out).context("stats JSON")
    }

    /// Counter `name` of port `index`, summed over its queue pairs.
    pub fn counter(&self, index: u64, name: &str) -> Result<u64> {
        let stats = self.stats()?;
        let Some(port) = stats["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["port"]["index"] == index))
        else {
            bail!("no port {index} in {stats}");
        };
        Ok(port["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|q| q["counters"][name].as_u64().unwrap_or(0))
            .sum())
    }

    /// An XDP program counter.
    pub fn xdp_counter(&self, name: &str) -> Result<u64> {
        Ok(self.stats()?["xdp"][name].as_u64().unwrap_or(0))
    }
}

/// Counter `name` of the whole daemon in an `xvdpa stats --json` snapshot: the XDP program's
/// counter of that name plus the queue counter of that name summed over every queue pair of
/// every port. A name found nowhere is an error, so a misspelt counter cannot read as 0.
pub fn daemon_counter(stats: &Value, name: &str) -> Result<u64> {
    let xdp = stats["xdp"].get(name);
    let queues = stats["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["queues"].as_array().into_iter().flatten())
        .filter_map(|q| q["counters"].get(name));
    let values: Vec<u64> = xdp
        .into_iter()
        .chain(queues)
        .map(|v| v.as_u64().with_context(|| format!("counter {name} is {v}")))
        .collect::<Result<_>>()?;
    if values.is_empty() {
        bail!("no counter {name:?} in {stats}");
    }
    Ok(values.iter().sum())
}
