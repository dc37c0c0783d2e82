//! An open-loop load generator for `bench/server.sh`'s fixed-load rounds,
//! in the manner of wrk2: requests are sent at a set rate whatever the
//! server does, and each one's latency is counted from the moment it was
//! due, not from when it could be sent. A server that stalls for 10 ms
//! therefore delays every request due in those 10 ms, as it would a fleet's
//! polls; a closed loop (wrk, even with a pause per connection) sends
//! nothing while it waits and so counts a stall once per connection.
//!
//! Usage: `openload ADDR PATH TOKENS DIGESTS RATE CONNECTIONS SECONDS`:
//! `RATE` requests a second over `CONNECTIONS` keep-alive connections to
//! `ADDR` (host:port), for `SECONDS`; each `GET PATH?arch=amd64&current=
//! <digest>&nonce=<fresh>` with `Authorization: Bearer <token>`, cycling
//! through the tokens in the file `TOKENS` (one a line) and the
//! comma-separated `DIGESTS`, as bench/resolve.lua does. Each connection
//! has its own schedule (`RATE / CONNECTIONS` a second, the connections
//! staggered); when an answer comes late, the next request goes at once and
//! is still timed from when it was due (a request that waited for its time
//! is timed from when it went: the timer's millisecond ticks are not the
//! server's doing). Prints one line:
//! `BENCH {"rps":..,"p50_ms":..,"p99_ms":..,"max_ms":..,"requests":..,
//! "non2xx":..,"socket_errors":..,"bytes":..}`, the same fields as
//! bench/resolve.lua's. With `OPENLOAD_TRACE_DIR` set, it also writes
//! `<addr>-<salt>.tsv` there: for each answered request, microseconds from
//! the start to when it was due, and its latency (`bench/trace.py` reads it).

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Plan {
    addr: String,
    path: String,
    tokens: Vec<String>,
    digests: Vec<String>,
    connections: usize,
    /// Between two requests of one connection.
    interval: Duration,
    seconds: f64,
    salt: u128,
}

#[derive(Default)]
struct Tally {
    /// Microseconds from when each answered request was due to its answer.
    latencies: Vec<u32>,
    /// Microseconds from the start to when each answered request was due.
    dues: Vec<u32>,
    non2xx: u64,
    socket_errors: u64,
    bytes: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, path, tokens, digests, rate, connections, seconds] = &args[..] else {
        eprintln!("usage: openload ADDR PATH TOKENS DIGESTS RATE CONNECTIONS SECONDS");
        std::process::exit(2);
    };
    let (Ok(rate), Ok(connections), Ok(seconds)) = (
        rate.parse::<f64>(),
        connections.parse::<usize>(),
        seconds.parse::<f64>(),
    ) else {
        eprintln!("error: RATE, CONNECTIONS and SECONDS must be numbers");
        std::process::exit(2);
    };
    if !(rate > 0.0 && connections > 0 && seconds > 0.0) {
        eprintln!("error: RATE, CONNECTIONS and SECONDS must be above zero");
        std::process::exit(2);
    }
    let tokens: Vec<String> = match std::fs::read_to_string(tokens) {
        Ok(t) => t
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        Err(e) => {
            eprintln!("error: reading {tokens}: {e}");
            std::process::exit(2);
        }
    };
    let digests: Vec<String> = digests
        .split(',')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    if tokens.is_empty() || digests.is_empty() {
        eprintln!("error: no tokens or no digests");
        std::process::exit(2);
    }
    let plan = Arc::new(Plan {
        addr: addr.clone(),
        path: path.clone(),
        tokens,
        digests,
        connections,
        interval: Duration::from_secs_f64(connections as f64 / rate),
        seconds,
        salt: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    });
    // Two threads, as wrk's -t2 in the other rounds.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let total = rt.block_on(run(plan.clone()));
    if let Ok(dir) = std::env::var("OPENLOAD_TRACE_DIR") {
        let name = format!("{dir}/{}-{}.tsv", addr.replace(':', "_"), plan.salt);
        let mut out = String::new();
        for (d, l) in total.dues.iter().zip(&total.latencies) {
            out.push_str(&format!("{d}\t{l}\n"));
        }
        std::fs::write(&name, out).expect("writing the trace");
    }
    let mut l = total.latencies;
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((p * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1;
        l[i] as f64 / 1000.0
    };
    let n = l.len() as u64;
    println!(
        "BENCH {{\"rps\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"requests\":{},\"non2xx\":{},\"socket_errors\":{},\"bytes\":{:.1}}}",
        n as f64 / plan.seconds,
        pct(0.50),
        pct(0.99),
        l.last().map_or(0.0, |&m| m as f64 / 1000.0),
        n,
        total.non2xx,
        total.socket_errors,
        total.bytes as f64 / n.max(1) as f64,
    );
}

async fn run(plan: Arc<Plan>) -> Tally {
    // Every connection is open before the clock starts.
    let mut streams = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        match connect(&plan.addr).await {
            Ok(s) => streams.push(s),
            Err(e) => {
                eprintln!("error: connecting to {}: {e}", plan.addr);
                std::process::exit(1);
            }
        }
    }
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + Duration::from_secs_f64(plan.seconds);
    let tasks: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(c, s)| tokio::spawn(connection(plan.clone(), c, s, start, end)))
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.expect("a connection task");
        total.latencies.extend(t.latencies);
        total.dues.extend(t.dues);
        total.non2xx += t.non2xx;
        total.socket_errors += t.socket_errors;
        total.bytes += t.bytes;
    }
    total
}

async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One connection's requests, each sent when due (or at once when the
/// previous answer came after that).
async fn connection(
    plan: Arc<Plan>,
    c: usize,
    mut stream: TcpStream,
    start: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    // Staggered, so the connections' requests are spread over each interval.
    let offset = plan.interval.mul_f64(c as f64 / plan.connections as f64);
    for k in 0u64.. {
        let due = start + offset + plan.interval * k as u32;
        if due >= end {
            break;
        }
        // Timed from when it was due if the last answer held it back (the
        // server's doing); from when it was sent if it waited for its time
        // (the timer's millisecond ticks are this program's, not the server's).
        let from = if due > Instant::now() {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        let i = c as u64 + k * plan.connections as u64;
        let token = &plan.tokens[(i % plan.tokens.len() as u64) as usize];
        let digest = &plan.digests[((i / 7) % plan.digests.len() as u64) as usize];
        let req = format!(
            "GET {}?arch=amd64&current={digest}&nonce=o{}-{c}-{k} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            plan.path, plan.salt, plan.addr
        );
        match exchange(&mut stream, req.as_bytes(), &mut buf).await {
            Ok((status, bytes)) => {
                tally
                    .latencies
                    .push(from.elapsed().as_micros().min(u32::MAX as u128) as u32);
                tally
                    .dues
                    .push(due.duration_since(start).as_micros().min(u32::MAX as u128) as u32);
                tally.bytes += bytes as u64;
                if !(200..300).contains(&status) {
                    tally.non2xx += 1;
                }
            }
            Err(_) => {
                tally.socket_errors += 1;
                match connect(&plan.addr).await {
                    Ok(s) => stream = s,
                    Err(_) => return tally,
                }
            }
        }
    }
    tally
}

/// Sends one request and reads its answer (status line, headers and a
/// `Content-Length` body); its status and its size in bytes.
async fn exchange(
    stream: &mut TcpStream,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, usize)> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    stream.write_all(req).await?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("the server closed the connection"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("headers are not UTF-8"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| bad("no Content-Length"))?;
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("the server closed the connection mid-answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, head_end + length))
}
