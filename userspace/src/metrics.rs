//! Prometheus text exposition of the daemon's counters on `--metrics ADDR` (GET /metrics).
//!
//! The same snapshot `xvdpa stats` shows: the XDP program's counters, per-port steering and
//! per-queue datapath counters. Drop counters become one metric per direction with a
//! `reason` label, so a dashboard sums or splits them without knowing every reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::{PortCounters, StatsSnapshot};
use crate::daemon::Daemon;
use crate::vhost::port::AcceptBackoff;

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders a snapshot in the Prometheus text format (version 0.0.4).
pub fn render(s: &StatsSnapshot) -> String {
    let mut out = String::new();
    let iface = label(&s.iface);
    let _ = writeln!(
        out,
        "# HELP xvdpa_uptime_seconds Seconds since the daemon started."
    );
    let _ = writeln!(out, "# TYPE xvdpa_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "xvdpa_uptime_seconds{{iface=\"{iface}\"}} {:.3}",
        s.uptime_seconds
    );
    let _ = writeln!(
        out,
        "# HELP xvdpa_xdp_frames_total Frames the XDP steering program handled, by what it did."
    );
    let _ = writeln!(out, "# TYPE xvdpa_xdp_frames_total counter");
    for (k, v) in &s.xdp {
        let _ = writeln!(
            out,
            "xvdpa_xdp_frames_total{{iface=\"{iface}\",action=\"{}\"}} {v}",
            label(k)
        );
    }
    let _ = writeln!(
        out,
        "# HELP xvdpa_port_connected Whether a frontend (VM) is connected to the port."
    );
    let _ = writeln!(out, "# TYPE xvdpa_port_connected gauge");
    for p in &s.ports {
        let _ = writeln!(
            out,
            "xvdpa_port_connected{{{}}} {}",
            port_labels(s, p),
            u8::from(p.port.state == "connected")
        );
    }
    let _ = writeln!(
        out,
        "# HELP xvdpa_port_xdp_steered_total Frames the XDP program steered to the port."
    );
    let _ = writeln!(out, "# TYPE xvdpa_port_xdp_steered_total counter");
    for p in &s.ports {
        let _ = writeln!(
            out,
            "xvdpa_port_xdp_steered_total{{{}}} {}",
            port_labels(s, p),
            p.xdp_steered
        );
    }

    // Metric name -> lines, so each metric's samples follow its one TYPE line.
    let mut metrics: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &s.ports {
        let labels = port_labels(s, p);
        for q in &p.queues {
            for (name, v) in &q.counters {
                let (metric, extra) = match name.split_once("_dropped_") {
                    Some((dir, reason)) => (
                        format!("xvdpa_{dir}_dropped_total"),
                        format!(",reason=\"{}\"", label(reason)),
                    ),
                    None => (format!("xvdpa_{name}_total"), String::new()),
                };
                metrics
                    .entry(metric)
                    .or_default()
                    .push(format!("{{{labels},queue_pair=\"{}\"{extra}}} {v}", q.pair));
            }
        }
    }
    for (metric, samples) in metrics {
        let _ = writeln!(out, "# TYPE {metric} counter");
        for s in samples {
            let _ = writeln!(out, "{metric}{s}");
        }
    }
    out
}

fn port_labels(s: &StatsSnapshot, p: &PortCounters) -> String {
    format!(
        "iface=\"{}\",port=\"{}\",mac=\"{}\",socket=\"{}\"",
        label(&s.iface),
        p.port.index,
        p.port.spec.mac,
        label(&p.port.spec.socket.to_string_lossy())
    )
}

/// Connections answered at once at most. The endpoint has no access control of its own
/// (whoever can reach the address can connect), and each connection holds an fd for up to
/// [`RESPONSE_DEADLINE`]: beyond this many, new ones are closed at once, so idle
/// connections cannot take the fds the ports need.
const MAX_CONNECTIONS: usize = 16;
/// How long one connection may take to send its request and read the answer.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(10);

/// Serves GET /metrics until the runtime ends.
pub async fn serve(listener: tokio::net::TcpListener, daemon: Arc<Daemon>) {
    let mut backoff = AcceptBackoff::new("metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refusing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tokio::time::sleep(backoff.accept_failed(&e)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !std::mem::replace(&mut refusing, true) {
                tracing::warn!(
                    "{MAX_CONNECTIONS} metrics connections open; closing new ones until one ends"
                );
            }
            continue;
        };
        refusing = false;
        let d = daemon.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(RESPONSE_DEADLINE, respond(stream, d)).await;
            drop(slot);
        });
    }
}

async fn respond(mut stream: tokio::net::TcpStream, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_line = buf
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    let mut words = request_line.split(|&b| b == b' ');
    let (method, path) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let (status, body, kind) =
        if method == b"GET" && (path == b"/metrics" || path.starts_with(b"/metrics?")) {
            let snapshot = tokio::task::spawn_blocking(move || daemon.stats())
                .await
                .map_err(std::io::Error::other)?;
            (
                "200 OK",
                render(&snapshot),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        } else {
            (
                "404 Not Found",
                "only /metrics is served here\n".to_string(),
                "text/plain; charset=utf-8",
            )
        };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PortInfo, PortSpec, QueueCounters};
    use crate::mac::MacAddr;

    #[test]
    fn snapshot_renders_as_prometheus_text() {
        let snapshot = StatsSnapshot {
            iface: "eth0".into(),
            uptime_seconds: 1.5,
            xdp: [("steered".to_string(), 7u64)].into_iter().collect(),
            ports: vec![PortCounters {
                port: PortInfo {
                    index: 0,
                    spec: PortSpec {
                        socket: "/run/x/vm\"0.sock".into(),
                        mac: MacAddr::parse_unicast("52:54:00:00:00:01").unwrap(),
                        ..Default::default()
                    },
                    state: "connected".into(),
                    datapath: "copy".into(),
                },
                xdp_steered: 5,
                queues: vec![QueueCounters {
                    pair: 0,
                    counters: [
                        ("rx_packets".to_string(), 3u64),
                        ("tx_dropped_spoofed".to_string(), 2),
                    ]
                    .into_iter()
                    .collect(),
                }],
            }],
        };
        let text = render(&snapshot);
        assert!(
            text.contains("xvdpa_xdp_frames_total{iface=\"eth0\",action=\"steered\"} 7\n"),
            "{text}"
        );
        let labels =
            "iface=\"eth0\",port=\"0\",mac=\"52:54:00:00:00:01\",socket=\"/run/x/vm\\\"0.sock\"";
        assert!(
            text.contains(&format!("xvdpa_port_connected{{{labels}}} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "xvdpa_rx_packets_total{{{labels},queue_pair=\"0\"}} 3\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "xvdpa_tx_dropped_total{{{labels},queue_pair=\"0\",reason=\"spoofed\"}} 2\n"
            )),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE xvdpa_tx_dropped_total counter")
                .count(),
            1
        );
    }
}
