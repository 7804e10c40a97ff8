//! Telling the service manager that start-up is done: systemd's `Type=notify` readiness
//! protocol (sd_notify(3)), one `READY=1` datagram to the socket `$NOTIFY_SOCKET` names.
//!
//! Under the packaged unit, `systemctl start xvdpa` returns only then, and units ordered after
//! xvdpa (libvirt, whose domains connect to the ports at once) start only then: with XDP
//! attached, the NIC queues bound and the config file's ports listening. Without it systemd
//! takes the daemon for started as soon as it is executed, before any of that, and a start-up
//! error (a missing NIC) fails the service after `systemctl start` has already said it
//! started. Written here rather than taken from a crate: it is a dozen lines of std.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;

/// The variable systemd sets for a service whose readiness it waits for.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `READY=1` to the service manager if one waits for it (`$NOTIFY_SOCKET` is set);
/// does nothing otherwise (run by hand, or by a manager that does not ask).
pub fn ready() -> io::Result<()> {
    notify(std::env::var_os(NOTIFY_SOCKET).as_deref(), "READY=1")
}

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the notification socket
/// `socket`: a path, or an abstract socket name written with a leading `@`.
pub fn notify(socket: Option<&OsStr>, state: &str) -> io::Result<()> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let name = socket.as_bytes();
    let address = match name.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name)?,
        None if name.starts_with(b"/") => SocketAddr::from_pathname(Path::new(socket))?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{NOTIFY_SOCKET}={socket:?} is neither a path nor an abstract socket name"),
            ))
        }
    };
    let sent = UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address)?;
    if sent != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("{NOTIFY_SOCKET}: {sent} of {} bytes sent", state.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn received(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_reaches_a_socket_named_by_path() {
        let dir = std::env::temp_dir().join(format!("xvdpa-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(Some(path.as_os_str()), "READY=1").unwrap();
        assert_eq!(received(&listener), "READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ready_reaches_an_abstract_socket() {
        let name = format!("xvdpa-notify-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&address).unwrap();
        notify(Some(OsStr::new(&format!("@{name}"))), "READY=1").unwrap();
        assert_eq!(received(&listener), "READY=1");
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_a_bad_one_is_an_error() {
        notify(None, "READY=1").unwrap();
        notify(Some(OsStr::new("")), "READY=1").unwrap();
        let relative = notify(Some(OsStr::new("run/notify")), "READY=1").unwrap_err();
        assert_eq!(relative.kind(), io::ErrorKind::InvalidInput);
        let missing = Path::new("/nonexistent/xvdpa/notify");
        assert!(notify(Some(missing.as_os_str()), "READY=1").is_err());
    }
}
