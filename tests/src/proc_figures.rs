//! What a running process holds, read from /proc: open fds, threads, resident memory and CPU
//! time. The lifecycle tests and `cargo xtask soak` compare these before and after.

use std::collections::{BTreeMap, HashMap};
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

/// What each of a process's open fds is: its link target, with what tells two alike apart (a
/// unix socket's path, an anonymous inode's fdinfo: an eventfd's count, an epoll set's
/// members, an AF_XDP socket's inode). Read to say WHICH fd a count that went up is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdTable(BTreeMap<u32, String>);

impl FdTable {
    /// Reads process `pid`'s fds now. An fd closed while being read is left out.
    pub fn read(pid: u32) -> Result<FdTable> {
        let unix_paths = unix_socket_paths(pid);
        let mut table = BTreeMap::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("listing /proc/{pid}/fd"))?
            .flatten()
        {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let target = target.display().to_string();
            let detail = if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
            {
                unix_paths
                    .get(inode)
                    .map(|path| format!(" unix {path}"))
                    .unwrap_or_default()
            } else if target.starts_with("anon_inode:") {
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
                    .map(|info| fdinfo_summary(&info))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            table.insert(fd, format!("{target}{detail}"));
        }
        Ok(FdTable(table))
    }

    /// How many fds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What `later` has that this table had not and the other way round, one fd a line:
    /// `+ 33 -> anon_inode:[eventfd] eventfd-count: 0`.
    pub fn diff(&self, later: &FdTable) -> String {
        let mut lines = Vec::new();
        for (fd, was) in &self.0 {
            match later.0.get(fd) {
                Some(now) if now == was => {}
                Some(now) => lines.push(format!("~ {fd} -> {was}  =>  {now}")),
                None => lines.push(format!("- {fd} -> {was}")),
            }
        }
        for (fd, now) in &later.0 {
            if !self.0.contains_key(fd) {
                lines.push(format!("+ {fd} -> {now}"));
            }
        }
        if lines.is_empty() {
            "no fd differs".to_string()
        } else {
            lines.join("\n")
        }
    }
}

impl fmt::Display for FdTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (fd, what) in &self.0 {
            writeln!(f, "{fd} -> {what}")?;
        }
        Ok(())
    }
}

/// What an anonymous inode's fdinfo says it is, on one line, without what changes while it
/// stays the same thing (position, a timer's time left, an eventfd's count): an epoll set as
/// the fds it watches, sorted (`tfds 21 22 24`), anything else by its remaining fields.
fn fdinfo_summary(info: &str) -> String {
    const CHANGING: [&str; 7] = [
        "pos:",
        "flags:",
        "mnt_id:",
        "ino:",
        "it_value:",
        "ticks:",
        "eventfd-count:",
    ];
    let mut watched: Vec<u32> = Vec::new();
    let mut fields = String::new();
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("tfd:") {
            watched.extend(
                rest.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u32>().ok()),
            );
        } else if !CHANGING.iter().any(|p| line.starts_with(p)) {
            fields.push(' ');
            fields.push_str(&line.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    if !watched.is_empty() {
        watched.sort_unstable();
        fields.push_str(" tfds");
        for fd in watched {
            fields.push_str(&format!(" {fd}"));
        }
    }
    fields
}

/// Socket inode -> path of process `pid`'s bound unix sockets (in its network namespace).
fn unix_socket_paths(pid: u32) -> HashMap<String, String> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode [Path]
            let fields: Vec<&str> = l.split_whitespace().collect();
            Some((fields.get(6)?.to_string(), fields.get(7)?.to_string()))
        })
        .collect()
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
    fn an_fd_table_diff_names_the_fd_that_came() {
        let before = FdTable::read(std::process::id()).unwrap();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let after = FdTable::read(std::process::id()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        // Other tests of this binary may open and close fds meanwhile, and the listing's own
        // fd shows too: look for ours only, new or in place of another.
        let diff = before.diff(&after);
        assert!(
            diff.lines().any(|l| (l.starts_with(&format!("+ {fd} -> "))
                || l.starts_with(&format!("~ {fd} -> ")))
                && l.ends_with("/status")),
            "{diff}"
        );
    }

    #[test]
    fn fdinfo_summaries_leave_out_what_changes() {
        let timer = "pos:\t0\nflags:\t02004002\nmnt_id:\t15\nino:\t1039\nclockid: 1\nticks: 3\n\
                     settime flags: 00\nit_value: (0, 115051240)\nit_interval: (0, 200000000)\n";
        assert_eq!(
            fdinfo_summary(timer),
            " clockid: 1 settime flags: 00 it_interval: (0, 200000000)"
        );
        let epoll = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1039\n\
                     tfd:       25 events:       19 data:                4  pos:0 ino:40f sdev:10\n\
                     tfd:       21 events:       19 data:                5  pos:0 ino:64f963 sdev:9\n";
        assert_eq!(fdinfo_summary(epoll), " tfds 21 25");
    }

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
