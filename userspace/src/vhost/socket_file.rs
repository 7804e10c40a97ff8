//! Unix sockets the daemon listens on, made so that no other process reaches them before
//! they are ready: a socket file gets its group and mode while it sits in a private (0700)
//! directory, and only then is renamed to the path frontends connect to.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh directory only this user can enter, next to `near`; removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn next_to(near: &Path) -> io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            ".xvdpa-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = near.with_file_name(name);
        // Created 0700 (the umask can only narrow it): nobody else can reach what is inside.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(PrivateDir(dir))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Binds a listening socket at `path` with permissions `mode` and, if given, group `gid`
/// (otherwise the daemon's). It is bound in a private directory, given its group and mode
/// there and renamed into place, so no process can connect while it still has the mode the
/// umask gave it or the wrong group.
pub fn bind_with_access(path: &Path, mode: u32, gid: Option<u32>) -> io::Result<UnixListener> {
    let dir = PrivateDir::next_to(path)?;
    let staged = dir.0.join("socket");
    let listener = UnixListener::bind(&staged)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot give the socket group id {gid} (the daemon's user must be a member of the group): {e}"),
            )
        })?;
    }
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// A listener and a connection to it that no other process can reach: the listener is
/// bound inside a private directory, which is gone by the time this returns.
pub fn private_pair(near: &Path) -> io::Result<(UnixListener, UnixStream)> {
    let dir = PrivateDir::next_to(near)?;
    let at = dir.0.join("socket");
    let listener = UnixListener::bind(&at)?;
    let ours = UnixStream::connect(&at)?;
    Ok((listener, ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xvdpa-sockfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_bound_socket_has_its_mode_and_nothing_is_left_beside_it() {
        let dir = scratch_dir("bind");
        let path = dir.join("vm0.sock");
        // Our own primary group: one any user may give its files.
        // SAFETY: getegid has no arguments and cannot fail.
        let gid = unsafe { libc::getegid() };
        let listener = bind_with_access(&path, 0o640, Some(gid)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
        assert_eq!(entries(&dir), vec!["vm0.sock".to_string()]);
        // Connections reach the listener through the final path.
        let mut c = UnixStream::connect(&path).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_private_pair_is_connected_and_leaves_no_file() {
        let dir = scratch_dir("pair");
        let (listener, mut ours) = private_pair(&dir.join("vm0.sock")).unwrap();
        assert!(entries(&dir).is_empty());
        let (mut theirs, _) = listener.accept().unwrap();
        ours.write_all(b"ok").unwrap();
        let mut got = [0u8; 2];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
