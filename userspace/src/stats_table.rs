//! The `xvdpa stats` table: one line per port, totals over its queue pairs, sized to fit a
//! terminal of 120 columns with 16 ports; queue pair lines only when asked for or when there
//! are few of them. Numbers are shortened with SI suffixes (`--json` has the exact counters);
//! with a previous snapshot (`--watch`) they are per-second rates.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::api::{PortCounters, QueueCounters, StatsSnapshot};

/// Queue pair lines are shown without being asked for up to this many pairs in all.
pub const FEW_QUEUE_PAIRS: usize = 8;
/// The widest line the table makes for ports, whatever their counters (checked in tests).
pub const MAX_WIDTH: usize = 120;

/// The numeric columns: header, and how a value is read from a set of counters.
const COLUMNS: [(&str, Column); 9] = [
    ("RX_PKTS", Column::Counter("rx_packets")),
    ("RX_BYTES", Column::Counter("rx_bytes")),
    ("TX_PKTS", Column::Counter("tx_packets")),
    ("TX_BYTES", Column::Counter("tx_bytes")),
    ("RX_DROP", Column::Drops("rx_dropped_")),
    ("TX_DROP", Column::Drops("tx_dropped_")),
    ("STEERED", Column::Steered),
    ("SW_IN", Column::Counter("rx_switched")),
    ("SW_OUT", Column::Counter("tx_switched")),
];
const NUMBER_WIDTH: usize = 8;

#[derive(Clone, Copy)]
enum Column {
    /// One counter.
    Counter(&'static str),
    /// Every counter with this prefix, summed.
    Drops(&'static str),
    /// The XDP program's per-port count (a port's, not a queue pair's).
    Steered,
}

/// Counters summed over queue pairs (a port's totals), or those of one pair.
type Sums = BTreeMap<String, u64>;

fn sum_queues<'a>(queues: impl IntoIterator<Item = &'a QueueCounters>) -> Sums {
    let mut sums = Sums::new();
    for q in queues {
        for (k, v) in &q.counters {
            *sums.entry(k.clone()).or_default() += v;
        }
    }
    sums
}

/// Value of a column for a set of counters; `None` where the column has no meaning.
fn value(column: Column, sums: &Sums, steered: Option<u64>) -> Option<u64> {
    match column {
        Column::Counter(name) => Some(sums.get(name).copied().unwrap_or(0)),
        Column::Drops(prefix) => Some(
            sums.iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v)
                .sum(),
        ),
        Column::Steered => steered,
    }
}

/// A number in at most 6 characters: exact below 10 000, else 3 significant digits and an SI
/// suffix (k, M, G, T, P, E).
pub fn si(v: f64) -> String {
    if v < 9999.5 {
        return format!("{v:.0}");
    }
    let mut scaled = v;
    let mut suffix = ' ';
    for s in ['k', 'M', 'G', 'T', 'P', 'E'] {
        scaled /= 1000.0;
        suffix = s;
        if scaled < 999.5 {
            break;
        }
    }
    let digits = if scaled < 9.995 {
        2
    } else if scaled < 99.95 {
        1
    } else {
        0
    };
    format!("{scaled:.digits$}{suffix}")
}

/// One row's numbers: totals, or rates against `before` over `secs`.
struct Row {
    now: Sums,
    steered: Option<u64>,
    before: Option<(Sums, Option<u64>, f64)>,
}

impl Row {
    fn cells(&self) -> String {
        let mut out = String::new();
        for (_, column) in COLUMNS {
            let now = value(column, &self.now, self.steered);
            let text = match (now, &self.before) {
                (None, _) => "-".to_string(),
                (Some(n), Some((sums, steered, secs))) if *secs > 0.0 => {
                    let old = value(column, sums, *steered).unwrap_or(0);
                    si(n.saturating_sub(old) as f64 / secs)
                }
                (Some(n), _) => si(n as f64),
            };
            let _ = write!(out, " {text:>NUMBER_WIDTH$}");
        }
        out
    }
}

/// The port of `previous` that is `p` (same index and MAC: an index reused by another VM
/// starts over).
fn previous_port<'a>(previous: &'a StatsSnapshot, p: &PortCounters) -> Option<&'a PortCounters> {
    previous
        .ports
        .iter()
        .find(|q| q.port.index == p.port.index && q.port.spec.mac == p.port.spec.mac)
}

/// `name=value` of every non-zero drop and queue error counter in `sums` (totals, also when
/// the table shows rates: a drop that happened once stays in sight).
fn drop_reasons(sums: &Sums) -> Vec<String> {
    sums.iter()
        .filter(|(k, v)| **v > 0 && (k.contains("_dropped_") || k.as_str() == "queue_errors"))
        .map(|(k, v)| format!("{k}={}", si(*v as f64)))
        .collect()
}

/// `words` after `first` into lines of at most `width` characters; the lines after the first
/// start with as many spaces as `first` has characters.
fn wrap(words: &[String], first: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = first.to_string();
    let mut empty = true;
    for w in words {
        if !empty && line.len() + 1 + w.len() > width {
            lines.push(std::mem::replace(&mut line, " ".repeat(first.len())));
        }
        line.push(' ');
        line.push_str(w);
        empty = false;
    }
    if !empty {
        lines.push(line);
    }
    lines
}

/// The table for `s`; with `previous` (the snapshot before and the seconds between them),
/// numeric columns are per-second rates. Queue pair lines appear when `all_queues` is set or
/// the snapshot has at most [`FEW_QUEUE_PAIRS`] of them.
pub fn render(
    s: &StatsSnapshot,
    previous: Option<(&StatsSnapshot, f64)>,
    all_queues: bool,
) -> String {
    let mut out = String::new();
    let pairs: usize = s.ports.iter().map(|p| p.queues.len()).sum();
    let connected = s
        .ports
        .iter()
        .filter(|p| p.port.state == "connected")
        .count();
    let per_queue = all_queues || pairs <= FEW_QUEUE_PAIRS;
    let _ = writeln!(
        out,
        "xvdpa on {}, up {:.0} s: {} ports ({connected} connected), {pairs} queue pairs; {}",
        s.iface,
        s.uptime_seconds,
        s.ports.len(),
        match previous {
            Some((_, secs)) => format!("per second over {secs:.1} s"),
            None => "totals".to_string(),
        }
    );
    let xdp: Vec<String> = s
        .xdp
        .iter()
        .map(|(k, v)| {
            let shown = match previous {
                Some((prev, secs)) if secs > 0.0 => {
                    let old = prev.xdp.get(k).copied().unwrap_or(0);
                    si(v.saturating_sub(old) as f64 / secs)
                }
                _ => v.to_string(),
            };
            format!("{k}={shown}")
        })
        .collect();
    for line in wrap(&xdp, "XDP:", MAX_WIDTH) {
        let _ = writeln!(out, "{line}");
    }
    let mut header = format!("{:<4} {:<17} {:<9} {:>2}", "PORT", "MAC", "STATE", "QP");
    for (name, _) in COLUMNS {
        let _ = write!(header, " {name:>NUMBER_WIDTH$}");
    }
    let _ = writeln!(out, "{header}");
    for p in &s.ports {
        let before = previous.and_then(|(prev, secs)| previous_port(prev, p).map(|b| (b, secs)));
        let totals = sum_queues(&p.queues);
        let row = Row {
            now: totals.clone(),
            steered: Some(p.xdp_steered),
            before: before.map(|(b, secs)| (sum_queues(&b.queues), Some(b.xdp_steered), secs)),
        };
        let state = p.port.state.split(':').next().unwrap_or("");
        let _ = writeln!(
            out,
            "{:<4} {:<17} {:<9.9} {:>2}{}",
            p.port.index,
            p.port.spec.mac.to_string(),
            state,
            p.queues.len(),
            row.cells()
        );
        let drops_label = match previous {
            Some(_) => "     total drops:",
            None => "     drops:",
        };
        for line in wrap(&drop_reasons(&totals), drops_label, MAX_WIDTH) {
            let _ = writeln!(out, "{line}");
        }
        if !per_queue {
            continue;
        }
        for q in &p.queues {
            let row = Row {
                now: sum_queues([q]),
                steered: None,
                before: before.and_then(|(b, secs)| {
                    b.queues
                        .iter()
                        .find(|bq| bq.pair == q.pair)
                        .map(|bq| (sum_queues([bq]), None, secs))
                }),
            };
            let _ = writeln!(
                out,
                "{:<4} {:<17} {:<9} {:>2}{}",
                "",
                format!("  queue pair {}", q.pair),
                "",
                "",
                row.cells()
            );
        }
    }
    if s.ports.is_empty() {
        let _ = writeln!(out, "(no ports)");
    } else if !per_queue {
        let _ = writeln!(
            out,
            "({pairs} queue pairs: --queues shows each, --json every counter)"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PortInfo, PortSpec};
    use crate::mac::MacAddr;
    use crate::stats::QueueStats;

    /// Every counter the datapath has, each set to `value`.
    fn queue(pair: u32, value: u64) -> QueueCounters {
        QueueCounters {
            pair,
            counters: QueueStats::default()
                .snapshot()
                .into_iter()
                .map(|(k, _)| (k.to_string(), value))
                .collect(),
        }
    }

    fn snapshot(ports: u32, pairs: u32, value: u64) -> StatsSnapshot {
        StatsSnapshot {
            iface: "enp1s0f0np0".into(),
            uptime_seconds: 86_400.0 * 400.0,
            xdp: xvdpa_common::XdpCounter::ALL
                .iter()
                .map(|c| (c.name().to_string(), value))
                .collect(),
            ports: (0..ports)
                .map(|i| PortCounters {
                    port: PortInfo {
                        index: i,
                        spec: PortSpec {
                            socket: format!("/run/xvdpa/vm{i}.sock").into(),
                            mac: MacAddr::parse_unicast(&format!("52:54:00:00:00:{i:02x}"))
                                .unwrap(),
                            queue_pairs: pairs as u16,
                            ..Default::default()
                        },
                        state: if i % 5 == 4 {
                            "failed: the frontend sent a memory table with 9 regions".into()
                        } else {
                            "connected".into()
                        },
                        datapath: "copy".into(),
                    },
                    xdp_steered: value,
                    queues: (0..pairs).map(|q| queue(q, value)).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn sixteen_ports_fit_one_line_each_within_the_width() {
        // Counters near u64::MAX: the widest numbers there are.
        let s = snapshot(16, 4, u64::MAX / 64);
        let text = render(&s, None, false);
        for line in text.lines() {
            assert!(
                line.len() <= MAX_WIDTH,
                "{} chars: {line}\n{text}",
                line.len()
            );
        }
        let port_lines = text
            .lines()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .count();
        assert_eq!(port_lines, 16, "{text}");
        assert!(!text.contains("queue pair "), "{text}");
        assert!(
            text.contains("16 ports (13 connected), 64 queue pairs"),
            "{text}"
        );
        // Each port's drop reasons (every one non-zero here) follow its line.
        assert_eq!(text.matches("tx_dropped_spoofed=").count(), 16, "{text}");
        assert!(text.contains("--queues shows each"), "{text}");
        // A failed port shows the state's first word, its reason lives in `ctl list`.
        assert!(
            text.lines()
                .any(|l| l.starts_with("4    52:54:00:00:00:04 failed ")),
            "{text}"
        );
        // Lines in all: title, XDP (wrapped), header, 16 ports with their drop lines (every
        // reason at once takes 4), footnote.
        assert!(text.lines().count() <= 3 + 2 + 16 * 5 + 1, "{text}");

        let all = render(&s, None, true);
        assert_eq!(all.matches("  queue pair").count(), 64, "{all}");
        assert!(all.lines().all(|l| l.len() <= MAX_WIDTH), "{all}");
    }

    #[test]
    fn few_queue_pairs_are_shown_without_asking() {
        let s = snapshot(2, 2, 5);
        let text = render(&s, None, false);
        assert_eq!(text.matches("  queue pair").count(), 4, "{text}");
        assert!(!text.contains("--queues"), "{text}");
    }

    #[test]
    fn watch_shows_rates_per_port_and_queue_pair() {
        let before = snapshot(16, 2, 1000);
        let mut now = snapshot(16, 2, 1000);
        // Port 3, pair 1: 2 000 000 packets and 3 GB more in the 2 s between snapshots.
        let q = &mut now.ports[3].queues[1].counters;
        *q.get_mut("rx_packets").unwrap() += 2_000_000;
        *q.get_mut("rx_bytes").unwrap() += 3_000_000_000;
        now.ports[3].xdp_steered += 2_000_000;
        let text = render(&now, Some((&before, 2.0)), false);
        assert!(text.contains("per second over 2.0 s"), "{text}");
        let port3 = text
            .lines()
            .find(|l| l.starts_with("3 "))
            .unwrap_or_else(|| panic!("{text}"));
        let cells: Vec<&str> = port3.split_whitespace().collect();
        // PORT MAC STATE QP RX_PKTS RX_BYTES TX_PKTS TX_BYTES RX_DROP TX_DROP STEERED ...
        assert_eq!(
            &cells[4..11],
            ["1.00M", "1.50G", "0", "0", "0", "0", "1.00M"],
            "{port3}"
        );
        let port2 = text.lines().find(|l| l.starts_with("2 ")).unwrap();
        assert!(
            port2.split_whitespace().skip(4).all(|c| c == "0"),
            "{port2}"
        );
        // Queue pair lines carry the pair's own rate when asked for.
        let all = render(&now, Some((&before, 2.0)), true);
        assert!(
            all.lines()
                .any(|l| l.starts_with("       queue pair 1 ") && l.contains("1.00M")),
            "{all}"
        );
        // A port whose counters start over (re-added) shows 0, not a wrapped-around rate.
        let text = render(&before, Some((&now, 2.0)), false);
        let port3 = text.lines().find(|l| l.starts_with("3 ")).unwrap();
        assert!(
            port3.split_whitespace().skip(4).all(|c| c == "0"),
            "{port3}"
        );
    }

    #[test]
    fn si_keeps_numbers_short() {
        for (v, s) in [
            (0.0, "0"),
            (9999.0, "9999"),
            (10_000.0, "10.0k"),
            (123_456.0, "123k"),
            (999_499.0, "999k"),
            (999_500.0, "1.00M"),
            (1.5e9, "1.50G"),
            (u64::MAX as f64, "18.4E"),
        ] {
            assert_eq!(si(v), s, "{v}");
        }
    }

    #[test]
    fn no_ports_says_so() {
        let s = snapshot(0, 0, 0);
        assert!(render(&s, None, false).contains("(no ports)"));
    }
}
