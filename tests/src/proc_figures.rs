//! What a running process holds, read from /proc: open fds, threads, resident memory and CPU
//! time. The lifecycle tests and `cargo xtask soak` compare these before and after.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};

/// One reading of a process's resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcFigures {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

impl ProcFigures {
    /// Reads process `pid` now.
    pub fn read(pid: u32) -> Result<ProcFigures> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .count();
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("listing /proc/{pid}/task"))?
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let rss_kib = status_field(&status, "VmRSS:").context("VmRSS in /proc/PID/status")?;
        Ok(ProcFigures {
            fds,
            threads,
            rss_kib,
        })
    }
}

impl fmt::Display for ProcFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} open fds, {} threads, {} KiB resident",
            self.fds, self.threads, self.rss_kib
        )
    }
}

/// Reads process `pid` until its fds and threads stay the same over three readings 100 ms
/// apart, or `within` has passed; returns the last reading. Right after a frontend leaves,
/// a port closes that connection's fds and joins its threads, then builds the next
/// connection's: readings in between catch it half way.
pub fn steady(pid: u32, within: Duration) -> Result<ProcFigures> {
    let deadline = std::time::Instant::now() + within;
    let mut last = ProcFigures::read(pid)?;
    let mut same = 0;
    while same < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = ProcFigures::read(pid)?;
        let unchanged = (now.fds, now.threads) == (last.fds, last.threads);
        same = if unchanged { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

/// The names of process `pid`'s threads, sorted (for a message when a count went up).
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// `VmRSS:   1234 kB` -> 1234.
fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

/// CPU time (user + system, all threads) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("/proc/PID/stat field")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = ProcFigures::read(std::process::id()).unwrap();
        assert!(me.fds >= 3 && me.threads >= 1 && me.rss_kib > 0, "{me}");
        let f = std::fs::File::open("/proc/self/status").unwrap();
        // Other tests of this binary may open fds meanwhile, never close ours.
        assert!(ProcFigures::read(std::process::id()).unwrap().fds > me.fds);
        drop(f);
        // Spinning shows up as CPU time (on a busy machine, in wall time that may take long).
        let before = cpu_time(std::process::id()).unwrap();
        let give_up = std::time::Instant::now() + Duration::from_secs(20);
        while cpu_time(std::process::id()).unwrap() < before + Duration::from_millis(50) {
            assert!(std::time::Instant::now() < give_up, "CPU time did not grow");
            for _ in 0..1_000_000 {
                std::hint::black_box(0u64);
            }
        }
    }
}
