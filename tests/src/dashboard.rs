//! The Grafana dashboard in `docs/grafana-xvdpa.json` against what the daemon serves: every
//! metric a query names, and every label it selects or groups by, must exist in the
//! Prometheus text `xvdpa::metrics::render` makes from a snapshot with every counter there
//! is, so that renaming a counter fails the suite instead of silently emptying a panel.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Labels Prometheus adds to every scraped series (the daemon does not render them).
pub const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// The dashboard's path in the workspace.
pub fn dashboard_path() -> std::path::PathBuf {
    crate::workspace_root().join("docs/grafana-xvdpa.json")
}

/// Every PromQL expression in a dashboard: panel targets' `expr` and the variables' queries
/// (`query` as a string or an object with one, `definition`).
pub fn queries(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect(dashboard, &mut out);
    out
}

fn collect(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) if s.contains("xvdpa_") => {
                        out.push(s.clone())
                    }
                    _ => collect(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
        _ => {}
    }
}

/// Metric name -> the label names its samples carry, from Prometheus text.
pub fn exposed(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.rsplit_once('}').map_or("", |(l, _)| l)),
            None => (line.split_whitespace().next().unwrap_or(""), ""),
        };
        let entry = out.entry(name.to_string()).or_default();
        for pair in split_labels(labels) {
            if let Some((label, _)) = pair.split_once('=') {
                entry.insert(label.trim().to_string());
            }
        }
    }
    out
}

/// `a="x",b="y,z"` into its `label="value"` parts (commas inside quotes stay).
fn split_labels(s: &str) -> Vec<String> {
    let (mut parts, mut cur, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur);
    }
    parts
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// What one query refers to: metric names, and per metric the labels its selector names;
/// plus the labels of `by (...)` / `without (...)` clauses and `label_values(..., label)`.
#[derive(Debug, Default, PartialEq)]
pub struct References {
    pub selectors: Vec<(String, Vec<String>)>,
    pub grouping: Vec<String>,
}

pub fn references(query: &str) -> References {
    let mut refs = References::default();
    let bytes: Vec<char> = query.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_name_char(bytes[i - 1]);
        let rest: String = bytes[i..].iter().collect();
        if starts_word && rest.starts_with("xvdpa_") {
            let name: String = rest.chars().take_while(|c| is_name_char(*c)).collect();
            i += name.chars().count();
            let mut labels = Vec::new();
            if bytes.get(i) == Some(&'{') {
                let body: String = bytes[i + 1..].iter().take_while(|c| **c != '}').collect();
                i += body.chars().count() + 1;
                for part in split_labels(&body) {
                    let label: String = part
                        .trim()
                        .chars()
                        .take_while(|c| is_name_char(*c))
                        .collect();
                    labels.push(label);
                }
            }
            refs.selectors.push((name, labels));
            continue;
        }
        for keyword in ["by", "without"] {
            if starts_word && rest.starts_with(keyword) {
                let after = rest[keyword.len()..].trim_start();
                if let Some(list) = after.strip_prefix('(') {
                    let list = list.split(')').next().unwrap_or("");
                    refs.grouping.extend(
                        list.split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                }
            }
        }
        if starts_word && rest.starts_with("label_values(") {
            // label_values(selector, label): the label after the last comma at depth 0.
            let inner = &rest["label_values(".len()..];
            let mut depth = 0i32;
            let mut end = inner.len();
            let mut last_comma = None;
            for (j, c) in inner.char_indices() {
                match c {
                    '(' | '{' => depth += 1,
                    '}' => depth -= 1,
                    ')' if depth == 0 => {
                        end = j;
                        break;
                    }
                    ')' => depth -= 1,
                    ',' if depth == 0 => last_comma = Some(j),
                    _ => {}
                }
            }
            if let Some(c) = last_comma {
                refs.grouping.push(inner[c + 1..end].trim().to_string());
            }
        }
        i += 1;
    }
    refs
}

/// What in `queries` the exposition does not have, one line each (empty: all is there).
pub fn missing(queries: &[String], exposed: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut problems = Vec::new();
    for q in queries {
        let refs = references(q);
        if refs.selectors.is_empty() {
            problems.push(format!("names no xvdpa metric: {q}"));
        }
        let mut labels_of_query: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
        for (metric, labels) in &refs.selectors {
            let Some(have) = exposed.get(metric) else {
                problems.push(format!("metric {metric} is not served: {q}"));
                continue;
            };
            labels_of_query.extend(have.iter().map(String::as_str));
            for l in labels {
                if !have.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                    problems.push(format!("{metric} has no label {l}: {q}"));
                }
            }
        }
        for l in &refs.grouping {
            if !labels_of_query.contains(l.as_str()) {
                problems.push(format!("no metric of the query has label {l}: {q}"));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use xvdpa::api::{PortCounters, PortInfo, PortSpec, QueueCounters, StatsSnapshot};
    use xvdpa::mac::MacAddr;
    use xvdpa::stats::QueueStats;

    /// What the daemon serves with one port, one queue pair and every counter there is.
    fn full_exposition() -> String {
        let snapshot = StatsSnapshot {
            iface: "eth0".into(),
            uptime_seconds: 1.0,
            xdp: xvdpa_common::XdpCounter::ALL
                .iter()
                .map(|c| (c.name().to_string(), 1))
                .collect(),
            ports: vec![PortCounters {
                port: PortInfo {
                    index: 0,
                    spec: PortSpec {
                        socket: "/run/xvdpa/vm0.sock".into(),
                        mac: MacAddr::parse_unicast("52:54:00:00:00:01").unwrap(),
                        ..Default::default()
                    },
                    state: "connected".into(),
                    datapath: "copy".into(),
                },
                xdp_steered: 1,
                queues: vec![QueueCounters {
                    pair: 0,
                    counters: QueueStats::default()
                        .snapshot()
                        .into_iter()
                        .map(|(k, _)| (k.to_string(), 1))
                        .collect(),
                }],
            }],
        };
        xvdpa::metrics::render(&snapshot)
    }

    #[test]
    fn every_metric_and_label_the_dashboard_queries_is_served() {
        let path = dashboard_path();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
        let queries = queries(&dashboard);
        assert!(queries.len() >= 20, "only {} queries found", queries.len());
        let exposed = exposed(&full_exposition());
        let problems = missing(&queries, &exposed);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // The panels the dashboard promises.
        let all = queries.join("\n");
        for metric in [
            "xvdpa_rx_packets_total",
            "xvdpa_tx_packets_total",
            "xvdpa_rx_bytes_total",
            "xvdpa_tx_bytes_total",
            "xvdpa_rx_dropped_total",
            "xvdpa_tx_dropped_total",
            "xvdpa_tx_gso_frames_total",
            "xvdpa_tx_segments_total",
            "xvdpa_tx_csum_computed_total",
            "xvdpa_tx_csum_offloaded_total",
            "xvdpa_tx_offload_passed_total",
            "xvdpa_rx_coalesced_total",
            "xvdpa_rx_csum_verified_total",
            "xvdpa_xdp_frames_total",
            "xvdpa_port_connected",
        ] {
            assert!(all.contains(metric), "no panel queries {metric}");
        }
    }

    #[test]
    fn a_renamed_metric_or_label_is_caught() {
        let exposed = exposed(&full_exposition());
        let bad = [
            r#"sum(rate(xvdpa_rx_pakets_total{mac=~"$mac"}[5m]))"#.to_string(),
            r#"sum(rate(xvdpa_rx_packets_total{vm=~"$mac"}[5m]))"#.to_string(),
            r#"sum by (cause) (rate(xvdpa_tx_dropped_total[5m]))"#.to_string(),
            r#"label_values(xvdpa_port_connected, vm)"#.to_string(),
        ];
        for q in &bad {
            assert_eq!(missing(std::slice::from_ref(q), &exposed).len(), 1, "{q}");
        }
        let good = [
            r#"sum by (instance, reason) (rate(xvdpa_tx_dropped_total{instance=~"$i",mac=~"a,b"}[5m]))"#
                .to_string(),
            r#"label_values(xvdpa_port_connected{instance=~"$instance"}, mac)"#.to_string(),
        ];
        assert!(
            missing(&good, &exposed).is_empty(),
            "{:?}",
            missing(&good, &exposed)
        );
    }

    #[test]
    fn exposition_parsing_reads_names_and_labels() {
        let e = exposed("# TYPE a counter\na{x=\"1,2\",y=\"q\\\"\"} 3\nb 4\n");
        assert_eq!(e["a"], BTreeSet::from(["x".to_string(), "y".to_string()]));
        assert!(e["b"].is_empty());
    }
}
