//! The control socket: [`Request`]s as JSON, one per line, each answered by one
//! [`Response`] line (the wire form is described in [`crate::api`]), carried out on the
//! [`Daemon`]; and [`request`], the client side `xvdpa ctl` and `xvdpa stats` use.
//!
//! The socket is created mode 0600 (0660 in the control group, `--ctl-group`) and every
//! connection's peer must be root, the daemon's own user or, with a control group, a member
//! of it. A bad request gets an error reply and the connection stays usable;
//! nothing a client sends reaches the datapath except through the same checks the command
//! line uses.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::api::{Request, Response};
use crate::daemon::Daemon;
use crate::vhost::port::{self, AcceptBackoff};
use crate::vhost::socket_file;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// Creates the control socket (refusing a path a live daemon listens on): mode 0600, or 0660
/// in group `gid` when one is given. Whoever can connect can add and remove ports, so nobody
/// else reaches it before it has that mode and group.
pub fn bind(path: &Path, gid: Option<u32>) -> io::Result<std::os::unix::net::UnixListener> {
    port::prepare_socket_path(path)
        .map_err(|e| io::Error::other(format!("control socket: {e}")))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    let listener = socket_file::bind_with_access(path, mode, gid)
        .map_err(|e| io::Error::new(e.kind(), format!("control socket {}: {e}", path.display())))?;
    listener.set_nonblocking(true)?;
    tracing::info!(path = %path.display(), mode = format_args!("{mode:o}"), gid, "control socket ready");
    Ok(listener)
}

/// Accepts control connections until the runtime ends; `group` is the control group's id,
/// whose members are served as root and the daemon's user are.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    group: Option<u32>,
    daemon: Arc<Daemon>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "control socket unusable; xvdpa ctl will not work");
            return;
        }
    };
    // SAFETY: geteuid(2) has no failure modes.
    let own_uid = unsafe { libc::geteuid() };
    let mut backoff = AcceptBackoff::new("control socket");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tokio::time::sleep(backoff.accept_failed(&e)).await;
                continue;
            }
        };
        let allowed = stream
            .peer_cred()
            .map(|c| {
                c.uid() == 0
                    || c.uid() == own_uid
                    || group.is_some_and(|g| {
                        crate::privilege::peer_in_group(stream.as_fd(), c.gid(), g)
                    })
            })
            .unwrap_or(false);
        tokio::spawn(connection(stream, allowed, daemon.clone()));
    }
}

async fn connection(stream: tokio::net::UnixStream, allowed: bool, daemon: Arc<Daemon>) {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut lines)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let too_long = n > MAX_REQUEST;
        let reply = if !allowed {
            Response::error(
                "permission denied: the control socket serves root, the daemon's user and the members of its control group only",
            )
        } else if too_long {
            Response::error(format!("request longer than {MAX_REQUEST} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let d = daemon.clone();
                    // Adding and removing ports start and join threads: off the event loop.
                    tokio::task::spawn_blocking(move || handle(&d, req))
                        .await
                        .unwrap_or_else(|e| Response::error(format!("internal error: {e}")))
                }
                Err(e) => Response::error(format!("malformed request: {e}")),
            }
        };
        let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || !allowed || too_long {
            return;
        }
    }
}

/// How long `add-port` waits for the new port's socket before it answers anyway (binding
/// takes microseconds; this bounds a stuck filesystem).
const PORT_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Carries out one request.
pub fn handle(daemon: &Daemon, req: Request) -> Response {
    match req {
        Request::AddPort(spec) => {
            let added = if spec.socket.as_os_str().is_empty() || !spec.socket.is_absolute() {
                Err(format!("socket: {:?} is not an absolute path", spec.socket))
            } else {
                daemon
                    .add_port(spec)
                    .and_then(|info| daemon.settle_new_port(info.index, PORT_SETTLE_TIMEOUT))
                    .map_err(|e| e.to_string())
            };
            match added {
                Ok(info) => Response {
                    ok: true,
                    port: Some(info),
                    ..Default::default()
                },
                Err(e) => Response::error(e),
            }
        }
        Request::DelPort { port } => match daemon.remove_port(&port) {
            Ok(info) => Response {
                ok: true,
                port: Some(info),
                ..Default::default()
            },
            Err(e) => Response::error(e),
        },
        Request::List => Response {
            ok: true,
            ports: Some(daemon.list()),
            ..Default::default()
        },
        Request::Stats => Response {
            ok: true,
            stats: Some(daemon.stats()),
            ..Default::default()
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is xvdpa running? give its socket with --ctl)")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to the daemon at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the daemon's reply is not understood: {0}")]
    Reply(serde_json::Error),
    #[error("{0}")]
    Refused(String),
}

/// Sends one request and returns the daemon's successful reply.
pub fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let io_err = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::Reply)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err)?;
    let reply: Response = serde_json::from_str(&reply).map_err(ClientError::Reply)?;
    if reply.ok {
        Ok(reply)
    } else {
        Err(ClientError::Refused(
            reply.error.unwrap_or_else(|| "request refused".into()),
        ))
    }
}
