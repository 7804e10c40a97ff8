//! Users, groups and capabilities: naming a group for a socket, and `--user`, the drop from
//! root to an unprivileged user that keeps only the capabilities the running daemon uses.
//!
//! The drop happens once, while the process has a single thread: on Linux credentials and
//! capabilities belong to a thread, and every thread the daemon starts afterwards inherits
//! the dropped set from the main thread. Every libc call sits in [`Sys`].

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A capability the running daemon keeps, with why (README lists the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub bit: u32,
    pub name: &'static str,
}

pub const CAP_NET_ADMIN: Capability = Capability {
    bit: 12,
    name: "CAP_NET_ADMIN",
};
pub const CAP_NET_RAW: Capability = Capability {
    bit: 13,
    name: "CAP_NET_RAW",
};
pub const CAP_IPC_LOCK: Capability = Capability {
    bit: 14,
    name: "CAP_IPC_LOCK",
};
pub const CAP_BPF: Capability = Capability {
    bit: 39,
    name: "CAP_BPF",
};

/// Why a name did not resolve or the drop failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no such user {0:?}")]
    NoUser(String),
    #[error("no such group {0:?}")]
    NoGroup(String),
    #[error("looking up {what} {name:?}: {why}")]
    Lookup {
        what: &'static str,
        name: String,
        why: io::Error,
    },
    #[error("--user needs the daemon started as root")]
    NotRoot,
    #[error("--user: privileges are dropped before the daemon starts threads, but it has {0}")]
    Threads(usize),
    #[error("dropping privileges to {user:?}: {step}: {why}")]
    Drop {
        user: String,
        step: &'static str,
        why: io::Error,
    },
}

/// A user the daemon runs as: its ids and every group it is a member of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Account {
    /// Whether the account's processes may give a file group `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Looks `name` up in the user database (and its group memberships).
    pub fn lookup(name: &str) -> Result<Self, PrivilegeError> {
        let lookup_err = |why| PrivilegeError::Lookup {
            what: "user",
            name: name.to_string(),
            why,
        };
        let c_name = CString::new(name).map_err(|_| PrivilegeError::NoUser(name.to_string()))?;
        let (uid, gid) = Sys::user(&c_name)
            .map_err(lookup_err)?
            .ok_or_else(|| PrivilegeError::NoUser(name.to_string()))?;
        let groups = Sys::group_list(&c_name, gid).map_err(lookup_err)?;
        Ok(Account {
            name: name.to_string(),
            uid,
            gid,
            groups,
        })
    }
}

/// The id of group `name`, or [`PrivilegeError::NoGroup`].
pub fn group_id(name: &str) -> Result<u32, PrivilegeError> {
    let c_name = CString::new(name).map_err(|_| PrivilegeError::NoGroup(name.to_string()))?;
    Sys::group(&c_name)
        .map_err(|why| PrivilegeError::Lookup {
            what: "group",
            name: name.to_string(),
            why,
        })?
        .ok_or_else(|| PrivilegeError::NoGroup(name.to_string()))
}

/// Whether this process may give a file it owns group `gid`: root may give any group, any
/// other user only one of its own (its effective group or a supplementary one), which is
/// what `chown(path, -1, gid)` will check.
pub fn may_give_group(gid: u32) -> bool {
    Sys::euid() == 0 || Sys::egid() == gid || Sys::supplementary_groups().contains(&gid)
}

/// Whether the process at the other end of the connected Unix socket `socket` was in group
/// `gid` when it connected: its effective group (`SO_PEERCRED`) or one of its supplementary
/// groups (`SO_PEERGROUPS`), the kernel's own record, so the group database is not asked.
pub fn peer_in_group(socket: BorrowedFd<'_>, peer_gid: u32, gid: u32) -> bool {
    peer_gid == gid
        || Sys::peer_groups(socket.as_raw_fd())
            .map(|groups| groups.contains(&gid))
            .unwrap_or(false)
}

/// Refuses early what [`drop_to`] would refuse late: only root can become another user.
pub fn require_root() -> Result<(), PrivilegeError> {
    if Sys::euid() == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::NotRoot)
    }
}

/// Threads of this process.
fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

/// Becomes `account` (its uid, gid and supplementary groups) keeping exactly `keep` as the
/// permitted and effective capabilities, and `on_demand` as permitted only, for
/// [`with_capability`] to raise around the one call that needs it; nothing is inheritable or
/// ambient (the daemon never executes another program), and the bounding set shrinks to the
/// permitted set so no later execve could regain the rest. Must run while the process has one
/// thread.
pub fn drop_to(
    account: &Account,
    keep: &[Capability],
    on_demand: &[Capability],
) -> Result<(), PrivilegeError> {
    let step_err = |step| {
        move |why| PrivilegeError::Drop {
            user: account.name.clone(),
            step,
            why,
        }
    };
    require_root()?;
    match thread_count() {
        1 => {}
        n => return Err(PrivilegeError::Threads(n)),
    }
    let effective = mask_of(keep);
    let mask = effective | mask_of(on_demand);
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    for bit in (0..=last_cap).filter(|b| mask & (1 << b) == 0) {
        Sys::drop_from_bounding_set(bit).map_err(step_err("shrinking the bounding set"))?;
    }
    Sys::keep_caps_across_setuid(true).map_err(step_err("PR_SET_KEEPCAPS"))?;
    Sys::set_groups(&account.groups).map_err(step_err("setgroups"))?;
    Sys::set_gid(account.gid).map_err(step_err("setresgid"))?;
    Sys::set_uid(account.uid).map_err(step_err("setresuid"))?;
    Sys::set_caps(CapSets {
        effective,
        permitted: mask,
    })
    .map_err(step_err("capset"))?;
    Sys::keep_caps_across_setuid(false).map_err(step_err("PR_SET_KEEPCAPS"))?;
    Sys::clear_ambient().map_err(step_err("clearing ambient capabilities"))?;
    // Proof, not trust: root must be out of reach now.
    if Sys::set_uid(0).is_ok() {
        return Err(PrivilegeError::Drop {
            user: account.name.clone(),
            step: "checking the drop",
            why: io::Error::other("setresuid(0) still succeeds"),
        });
    }
    Ok(())
}

fn mask_of(caps: &[Capability]) -> u64 {
    caps.iter().fold(0u64, |m, c| m | 1 << c.bit)
}

/// Runs `f` with `cap` in the calling thread's effective set when the thread holds it as
/// permitted only (kept on demand by [`drop_to`]), and takes it out again afterwards. A
/// thread that has it effective already, or not at all, runs `f` as it is.
pub fn with_capability<T>(cap: Capability, f: impl FnOnce() -> T) -> T {
    let bit = 1u64 << cap.bit;
    let raised = match Sys::caps() {
        Ok(sets) if sets.permitted & bit != 0 && sets.effective & bit == 0 => {
            let up = CapSets {
                effective: sets.effective | bit,
                ..sets
            };
            Sys::set_caps(up).ok().map(|()| sets)
        }
        _ => None,
    };
    let result = f();
    if let Some(before) = raised {
        if let Err(e) = Sys::set_caps(before) {
            tracing::error!(capability = cap.name, error = %e, "cannot take a capability raised for one call out of the effective set again");
        }
    }
    result
}

/// A thread's effective and permitted capability sets (its inheritable set stays empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CapSets {
    effective: u64,
    permitted: u64,
}

/// The libc calls of this module, each a thin checked wrapper.
struct Sys;

/// Header and data of capget/capset, version 3 (64-bit sets in two halves).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn check(ret: libc::c_long) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Sys {
    fn euid() -> u32 {
        // SAFETY: geteuid has no arguments and cannot fail.
        unsafe { libc::geteuid() }
    }

    fn egid() -> u32 {
        // SAFETY: getegid has no arguments and cannot fail.
        unsafe { libc::getegid() }
    }

    /// The process's supplementary groups (empty if they cannot be read).
    fn supplementary_groups() -> Vec<u32> {
        // SAFETY: with a size of 0, getgroups writes nothing and returns the count.
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let Ok(len) = usize::try_from(n) else {
            return Vec::new();
        };
        let mut groups = vec![0 as libc::gid_t; len];
        // SAFETY: `groups` is writable for `n` entries and getgroups writes at most that many.
        let got = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
        groups.truncate(usize::try_from(got).unwrap_or(0));
        groups
    }

    /// The supplementary groups of a connected Unix socket's peer (`SO_PEERGROUPS`).
    fn peer_groups(fd: libc::c_int) -> io::Result<Vec<u32>> {
        const GID: usize = std::mem::size_of::<libc::gid_t>();
        let mut groups = vec![0 as libc::gid_t; 32];
        loop {
            let mut len = libc::socklen_t::try_from(groups.len() * GID).unwrap_or(0);
            // SAFETY: `groups` is writable for `len` bytes; the kernel writes at most that
            // many and sets `len` to what it wrote, or to what it needs (ERANGE).
            let ret = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let count = usize::try_from(len).unwrap_or(0) / GID;
            if ret == 0 {
                groups.truncate(count);
                return Ok(groups);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
                groups.resize(count, 0);
                continue;
            }
            return Err(err);
        }
    }

    /// Runs a `get*_r` lookup with a growing buffer until it fits.
    fn with_buffer<T>(
        mut call: impl FnMut(&mut [libc::c_char], &mut *mut T) -> libc::c_int,
    ) -> io::Result<bool> {
        let mut size = 1024;
        loop {
            let mut buf = vec![0 as libc::c_char; size];
            let mut result: *mut T = std::ptr::null_mut();
            match call(&mut buf, &mut result) {
                0 => return Ok(!result.is_null()),
                libc::ERANGE if size < 1 << 20 => size *= 4,
                // "Not found" comes back as 0 with a null result, or, from some NSS
                // modules, as one of these.
                libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(false),
                e => return Err(io::Error::from_raw_os_error(e)),
            }
        }
    }

    /// (uid, gid) of user `name`.
    fn user(name: &CStr) -> io::Result<Option<(u32, u32)>> {
        // SAFETY: passwd is plain data; all-zero is a valid value that getpwnam_r overwrites.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let found = Self::with_buffer(|buf, result| {
            // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `pw`
            // and `result` are live, and `buf` is writable for `buf.len()` bytes.
            unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), result) }
        })?;
        Ok(found.then_some((pw.pw_uid, pw.pw_gid)))
    }

    /// The gid of group `name`.
    fn group(name: &CStr) -> io::Result<Option<u32>> {
        // SAFETY: group is plain data; all-zero is a valid value that getgrnam_r overwrites.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let found = Self::with_buffer(|buf, result| {
            // SAFETY: as in `user`: valid name, live out-parameters, writable buffer.
            unsafe { libc::getgrnam_r(name.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), result) }
        })?;
        Ok(found.then_some(gr.gr_gid))
    }

    /// Every group user `name` (primary group `gid`) is a member of.
    fn group_list(name: &CStr, gid: u32) -> io::Result<Vec<u32>> {
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut n = groups.len() as libc::c_int;
            // SAFETY: `groups` is writable for `n` entries, and getgrouplist writes at most
            // that many; it sets `n` to the count it has (or needs).
            let ret =
                unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
            if ret >= 0 {
                groups.truncate(n.max(0) as usize);
                return Ok(groups);
            }
            if n as usize <= groups.len() || groups.len() >= 65536 {
                return Err(io::Error::other("getgrouplist failed"));
            }
            groups.resize(n as usize, 0);
        }
    }

    fn drop_from_bounding_set(bit: u32) -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, bit as libc::c_ulong, 0, 0, 0) };
        match check(ret.into()) {
            // A capability this kernel does not know is not in the set anyway.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }

    fn keep_caps_across_setuid(keep: bool) -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) };
        check(ret.into())
    }

    fn clear_ambient() -> io::Result<()> {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        check(ret.into())
    }

    fn set_groups(groups: &[u32]) -> io::Result<()> {
        // SAFETY: `groups` is readable for `groups.len()` entries.
        let ret = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
        check(ret.into())
    }

    fn set_gid(gid: u32) -> io::Result<()> {
        // SAFETY: setresgid with integer arguments only.
        check(unsafe { libc::setresgid(gid, gid, gid) }.into())
    }

    fn set_uid(uid: u32) -> io::Result<()> {
        // SAFETY: setresuid with integer arguments only.
        check(unsafe { libc::setresuid(uid, uid, uid) }.into())
    }

    /// The calling thread's effective and permitted sets.
    fn caps() -> io::Result<CapSets> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget reads one header and, for version 3, writes two data entries; both
        // are live `repr(C)` values of the kernel's layout.
        let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        check(ret)?;
        let join = |low: u32, high: u32| u64::from(low) | u64::from(high) << 32;
        Ok(CapSets {
            effective: join(data[0].effective, data[1].effective),
            permitted: join(data[0].permitted, data[1].permitted),
        })
    }

    /// Sets the calling thread's effective and permitted sets, inheritable empty.
    fn set_caps(sets: CapSets) -> io::Result<()> {
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |set: u64, i: usize| (set >> (32 * i)) as u32;
        let data = [0, 1].map(|i| CapData {
            effective: half(sets.effective, i),
            permitted: half(sets.permitted, i),
            inheritable: 0,
        });
        // SAFETY: capset reads one header and, for version 3, two data entries; both are
        // live `repr(C)` values of the kernel's layout.
        let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        check(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_socket_peer_is_in_its_supplementary_groups_and_no_other() {
        // Both ends are this process: the kernel recorded its groups at socketpair().
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut seen = Sys::peer_groups(a.as_raw_fd()).unwrap();
        let mut own = Sys::supplementary_groups();
        seen.sort_unstable();
        own.sort_unstable();
        assert_eq!(seen, own);
        for gid in own {
            assert!(peer_in_group(a.as_fd(), u32::MAX - 1, gid));
        }
        assert!(
            peer_in_group(a.as_fd(), 4242, 4242),
            "the effective group counts"
        );
        let stranger = (1..u32::MAX).find(|g| !seen.contains(g)).unwrap();
        assert!(!peer_in_group(a.as_fd(), u32::MAX - 1, stranger));
    }

    #[test]
    fn users_and_groups_resolve_by_name() {
        let root = Account::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(matches!(
            Account::lookup("xvdpa-no-such-user"),
            Err(PrivilegeError::NoUser(_))
        ));
        let e = group_id("xvdpa-no-such-group").unwrap_err();
        assert_eq!(e.to_string(), "no such group \"xvdpa-no-such-group\"");
        assert!(matches!(group_id("a\0b"), Err(PrivilegeError::NoGroup(_))));
    }

    #[test]
    fn a_capability_kept_on_demand_is_effective_for_the_call_only() {
        // Capabilities are per thread: this one's changes stay in it.
        std::thread::spawn(|| {
            let before = Sys::caps().unwrap();
            let bit = 1u64 << CAP_IPC_LOCK.bit;
            if before.permitted & bit == 0 {
                return; // not root here: nothing to raise
            }
            let on_demand = CapSets {
                effective: before.effective & !bit,
                ..before
            };
            Sys::set_caps(on_demand).unwrap();
            let during = with_capability(CAP_IPC_LOCK, || Sys::caps().unwrap());
            assert_eq!(during.effective, before.effective | bit);
            assert_eq!(Sys::caps().unwrap(), on_demand);
            // Effective already: left as it is.
            Sys::set_caps(before).unwrap();
            let during = with_capability(CAP_IPC_LOCK, || Sys::caps().unwrap());
            assert_eq!((during, Sys::caps().unwrap()), (before, before));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn dropping_needs_a_single_thread() {
        // The test harness runs tests on threads of their own: the drop must refuse
        // (or, not being root, refuse for that), and leave this process as it was.
        let before = Sys::euid();
        let e = drop_to(&Account::lookup("root").unwrap(), &[], &[]).unwrap_err();
        assert!(matches!(
            e,
            PrivilegeError::Threads(_) | PrivilegeError::NotRoot
        ));
        assert_eq!(Sys::euid(), before);
    }
}
