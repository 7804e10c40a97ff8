//! `tcpperf`: one TCP stream, measured at the receiver.
//!
//! ```text
//! tcpperf recv <port> [<warmup seconds>]
//! tcpperf send <ipv4:port> <seconds>
//! ```
//!
//! The receiver accepts one connection, ignores what arrives in the first `warmup` seconds
//! after its first byte, then counts bytes until the sender closes. It prints
//! `TCPPERF-LISTENING`, then `TCPPERF-START` when its measured window opens, and
//! `TCPPERF-RESULT bytes=<n> seconds=<s>` for that window. The sender writes 256 KiB buffers
//! for `seconds` and prints `TCPPERF-SENT bytes=<n> seconds=<s>`.
//!
//! It is written against std alone so that it links statically (`-C target-feature=+crt-static`)
//! and runs in the test guest's busybox initramfs as it does on the host: a shell pipeline
//! into busybox `nc` is what limits TCP in an emulated guest, not the network. Addresses are
//! numeric (no name lookup, which a static glibc cannot do).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Bytes per write and per read: large, as a bulk-transfer tool writes.
const BUFFER: usize = 256 * 1024;

fn usage() -> ExitCode {
    eprintln!("usage: tcpperf recv <port> [<warmup seconds>] | tcpperf send <ipv4:port> <seconds>");
    ExitCode::from(2)
}

fn seconds(arg: &str) -> Result<Duration, String> {
    arg.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("invalid seconds {arg:?}"))
}

/// Receives one connection; returns (bytes, seconds) of the window after `warmup`.
fn receive(port: u16, warmup: Duration) -> std::io::Result<(u64, f64)> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("TCPPERF-LISTENING port={port}");
    flush();
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0u8; BUFFER];
    let mut first: Option<Instant> = None;
    let mut window: Option<Instant> = None;
    let mut bytes = 0u64;
    let mut last = Instant::now();
    loop {
        let n = stream.read(&mut buf)?;
        let now = Instant::now();
        if n == 0 {
            break;
        }
        let started = *first.get_or_insert(now);
        match window {
            Some(_) => bytes += n as u64,
            None if now.duration_since(started) >= warmup => {
                window = Some(now);
                println!("TCPPERF-START");
                flush();
            }
            None => {}
        }
        last = now;
    }
    let secs = window.map_or(0.0, |w| last.duration_since(w).as_secs_f64());
    Ok((bytes, secs))
}

fn send(to: SocketAddr, duration: Duration) -> std::io::Result<(u64, f64)> {
    let mut stream = TcpStream::connect(to)?;
    let buf = vec![0x5au8; BUFFER];
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < duration {
        stream.write_all(&buf)?;
        bytes += buf.len() as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // Wait for the receiver to close, so the data is delivered when this process ends.
    let mut sink = [0u8; 64];
    while stream.read(&mut sink)? > 0 {}
    Ok((bytes, t0.elapsed().as_secs_f64()))
}

fn flush() {
    let _ = std::io::stdout().flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args.as_slice() {
        ["recv", port, rest @ ..] if rest.len() <= 1 => {
            let Ok(port) = port.parse::<u16>() else {
                return usage();
            };
            let warmup = match rest.first().map(|s| seconds(s)).transpose() {
                Ok(w) => w.unwrap_or(Duration::ZERO),
                Err(e) => {
                    eprintln!("tcpperf: {e}");
                    return usage();
                }
            };
            receive(port, warmup).map(|(b, s)| format!("TCPPERF-RESULT bytes={b} seconds={s:.6}"))
        }
        ["send", to, secs] => {
            let (Ok(to), Ok(duration)) = (to.parse::<SocketAddr>(), seconds(secs)) else {
                return usage();
            };
            send(to, duration).map(|(b, s)| format!("TCPPERF-SENT bytes={b} seconds={s:.6}"))
        }
        _ => return usage(),
    };
    match outcome {
        Ok(line) => {
            println!("{line}");
            flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcpperf: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener};
    use std::time::Duration;

    #[test]
    fn receiver_counts_only_the_window_after_warmup() {
        // A free port: bind to 0, note it, let it go for the receiver.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rx = std::thread::spawn(move || super::receive(port, Duration::from_millis(200)));
        let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let sent = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                super::send(to, Duration::from_millis(600)).ok()
            })
            .expect("the receiver never listened");
        let (bytes, secs) = rx.join().unwrap().unwrap();
        assert!(
            bytes > 0 && bytes < sent.0,
            "window {bytes} of {} sent",
            sent.0
        );
        assert!(secs > 0.2 && secs < 0.6, "window of {secs} s");
    }
}
