//! The closed-loop HTTP/1.1 keep-alive load generator shared by the benches, and the /proc
//! readings they report with it.
//!
//! Include from a bench with `#[path = "support/loadgen.rs"] mod loadgen;`.
//!
//! N connections each send one request, read one response, and repeat (no pipelining), for a
//! warm-up and then a measured period; every measured request's latency is recorded. Being a
//! closed loop, it sends less while the server stalls, so its tail latencies are a lower bound
//! (coordinated omission), as with wrk. The connection is any [`Target`]: plain TCP to a
//! `SocketAddr`, or whatever stream a bench makes (TLS to kube-apiserver).
#![allow(dead_code)] // each bench uses a different subset

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        Err(_) => default,
    }
}

/// The connection counts benches/http.rs measures `secret.get` at by default.
pub const DEFAULT_CONNECTIONS: &str = "1,8,16,24,32,64";

/// `BENCH_CONNECTIONS` (comma-separated connection counts), or `default`.
pub fn connection_counts(default: &str) -> Vec<usize> {
    std::env::var("BENCH_CONNECTIONS")
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .expect("BENCH_CONNECTIONS is a comma-separated list of numbers")
                .max(1)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client: one request, one response, repeat

/// Where a connection goes, and how it is made.
pub trait Target: Clone + Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn connect(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

/// Plain TCP with `TCP_NODELAY`.
impl Target for SocketAddr {
    type Stream = TcpStream;
    async fn connect(&self) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(*self).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// TLS over [`SocketAddr`]'s TCP, checking the server's certificate for `name` against the
/// connector's roots (no client certificate: requests carry bearer tokens).
#[derive(Clone)]
pub struct Tls {
    pub addr: SocketAddr,
    pub name: tokio_rustls::rustls::pki_types::ServerName<'static>,
    pub connector: tokio_rustls::TlsConnector,
}

impl Target for Tls {
    type Stream = tokio_rustls::client::TlsStream<TcpStream>;
    async fn connect(&self) -> std::io::Result<Self::Stream> {
        let tcp = self.addr.connect().await?;
        self.connector.connect(self.name.clone(), tcp).await
    }
}

/// `POST /v1/invoke` with a bearer token and a JSON body, as the CLI sends it.
pub fn request_bytes(addr: SocketAddr, token: &str, body: &str) -> Arc<[u8]> {
    format!(
        "POST /v1/invoke HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into()
}

/// The body of a `secret.get` of `name` on the local node, as benches/http.rs has always sent
/// it (no request `id`).
pub fn secret_get_body(name: &str) -> String {
    format!(r#"{{"nodeId":"local","command":"secret.get","params":{{"name":"{name}"}}}}"#)
}

/// The 1 KiB printable value the `secret.get` benches read (not a secret: a fixed pattern).
pub fn bench_value(len: usize) -> String {
    (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub async fn connect<T: Target<Stream = S>>(target: &T) -> std::io::Result<Conn<S>> {
        Ok(Conn {
            stream: target.connect().await?,
            buf: Vec::with_capacity(8192),
        })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(8192);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(())
    }

    /// Sends `req` and reads one response; returns its status and body.
    pub async fn round_trip(&mut self, req: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        self.stream.write_all(req).await?;
        self.stream.flush().await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| bad("head not UTF-8"))?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status line"))?;
        let mut content_length = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.trim().eq_ignore_ascii_case("chunked");
                } else if k.eq_ignore_ascii_case("connection") && v.trim() == "close" {
                    return Err(bad("server asked to close the connection"));
                }
            }
        }
        if chunked {
            return self.read_chunked(status, head_end).await;
        }
        let len = content_length.ok_or_else(|| bad("response without content-length"))?;
        while self.buf.len() < head_end + len {
            self.fill().await?;
        }
        if self.buf.len() > head_end + len {
            return Err(bad("more bytes than one response (nothing was pipelined)"));
        }
        Ok((status, self.buf[head_end..].to_vec()))
    }

    /// A `Transfer-Encoding: chunked` body starting at `pos` (Go's net/http, so kube-apiserver,
    /// chunks a body of more than 2 KiB); no trailers.
    async fn read_chunked(
        &mut self,
        status: u16,
        mut pos: usize,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf[pos..], b"\r\n") {
                    break pos + i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[pos..line_end])
                .map_err(|_| bad("chunk size not UTF-8"))?;
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("bad chunk size"))?;
            let data_end = line_end + 2 + size;
            while self.buf.len() < data_end + 2 {
                self.fill().await?;
            }
            if &self.buf[data_end..data_end + 2] != b"\r\n" {
                return Err(bad("chunk not followed by CRLF"));
            }
            if size == 0 {
                if self.buf.len() > data_end + 2 {
                    return Err(bad("more bytes than one response (nothing was pipelined)"));
                }
                return Ok((status, body));
            }
            body.extend_from_slice(&self.buf[line_end + 2..data_end]);
            pos = data_end + 2;
        }
    }
}

/// Whether an answer is a successful invoke response (`"ok":true` comes right after the id).
pub fn answer_ok(status: u16, body: &[u8]) -> bool {
    status == 200 && find(&body[..body.len().min(96)], br#""ok":true"#).is_some()
}

// ---------------------------------------------------------------------------------------------
// Load generation

#[derive(Default)]
pub struct ConnResult {
    /// Latencies of the measured requests, in nanoseconds.
    pub latencies: Vec<u64>,
    /// Answers received (any status), warm-up included.
    pub answers: u64,
    /// Answers that `ok` rejected, plus I/O failures.
    pub errors: u64,
    /// Requests whose answer never arrived (I/O failure).
    pub lost: u64,
    pub first_error: Option<String>,
}

pub struct Phase {
    pub warm_end: Instant,
    pub end: Instant,
    pub max_requests: Option<u64>,
}

/// One connection's closed loop: send `req`, read the answer, check it with `ok`, repeat.
pub async fn drive<T: Target>(
    target: T,
    req: Arc<[u8]>,
    ok: fn(u16, &[u8]) -> bool,
    phase: Arc<Phase>,
) -> ConnResult {
    let mut r = ConnResult::default();
    let mut conn = None;
    let mut sent = 0u64;
    loop {
        let now = Instant::now();
        if now >= phase.end || phase.max_requests.is_some_and(|m| sent >= m) {
            break;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match Conn::connect(&target).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    r.errors += 1;
                    r.first_error.get_or_insert(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        sent += 1;
        let start = Instant::now();
        match c.round_trip(&req).await {
            Ok((status, body)) => {
                let took = start.elapsed();
                r.answers += 1;
                if start >= phase.warm_end {
                    r.latencies.push(took.as_nanos() as u64);
                }
                if !ok(status, &body) {
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| describe(status, &body));
                }
            }
            Err(e) => {
                r.errors += 1;
                r.lost += 1;
                r.first_error.get_or_insert(format!("i/o: {e}"));
                conn = None;
            }
        }
    }
    r
}

/// An unexpected answer, for an error message: the body of an error status (an error message),
/// but never that of a 200, which may hold a secret.
pub fn describe(status: u16, body: &[u8]) -> String {
    if status == 200 {
        format!(
            "HTTP 200 without the expected content ({} bytes, not shown)",
            body.len()
        )
    } else {
        let text = String::from_utf8_lossy(body);
        format!(
            "HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        )
    }
}

pub struct LoadConfig {
    pub connections: usize,
    pub warmup: Duration,
    pub measured: Duration,
    pub max_requests: Option<u64>,
}

/// What one load run gave, with `snapshot()` taken at both edges of the measured window.
pub struct Load<S> {
    pub results: Vec<ConnResult>,
    /// From the end of the warm-up until the last measured request finished.
    pub measured_wall: Duration,
    pub window: ((Instant, S), (Instant, S)),
}

/// Runs `cfg.connections` closed loops of `req` against `target` on `client`.
pub fn load<T: Target, S: Send + 'static>(
    client: &tokio::runtime::Runtime,
    target: &T,
    req: Arc<[u8]>,
    ok: fn(u16, &[u8]) -> bool,
    cfg: &LoadConfig,
    snapshot: fn() -> S,
) -> Load<S> {
    run_loops(client, cfg, snapshot, |phase| {
        drive(target.clone(), req.clone(), ok, phase)
    })
}

/// Runs `cfg.connections` closed loops, each the future `start` makes for the run's phases
/// (a warm-up, then the measured window), with `snapshot()` taken at both edges of the window.
pub fn run_loops<S, F>(
    client: &tokio::runtime::Runtime,
    cfg: &LoadConfig,
    snapshot: fn() -> S,
    mut start: impl FnMut(Arc<Phase>) -> F,
) -> Load<S>
where
    S: Send + 'static,
    F: Future<Output = ConnResult> + Send + 'static,
{
    let began = Instant::now();
    let phase = Arc::new(Phase {
        warm_end: began + cfg.warmup,
        end: began + cfg.warmup + cfg.measured,
        max_requests: cfg.max_requests,
    });
    let (results, window) = client.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..cfg.connections {
            tasks.spawn(start(phase.clone()));
        }
        tokio::time::sleep_until(phase.warm_end.into()).await;
        let t0 = (Instant::now(), snapshot());
        // The window ends at `end`, or when every loop is done (`max_requests`).
        let end = tokio::time::sleep_until(phase.end.into());
        tokio::pin!(end);
        let mut t1 = None;
        let mut results = Vec::new();
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(r) => results.push(r.expect("load task")),
                    None => break,
                },
                () = &mut end, if t1.is_none() => t1 = Some((Instant::now(), snapshot())),
            }
        }
        let t1 = t1.unwrap_or_else(|| (Instant::now(), snapshot()));
        (results, (t0, t1))
    });
    let start = began;
    // Requests started before the end may finish after it; the rate counts them over the time
    // until the last one finished.
    Load {
        results,
        measured_wall: start.elapsed().saturating_sub(cfg.warmup),
        window,
    }
}

/// Latency figures of a run, in nanoseconds.
pub struct Latencies {
    pub n: u64,
    pub rps: f64,
    pub mean: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// Totals over all connections of a run: (latencies, answers, errors, lost, first error).
pub fn totals<S>(load: &Load<S>) -> (Latencies, u64, u64, u64, Option<String>) {
    let mut latencies: Vec<u64> = Vec::new();
    let (mut answers, mut errors, mut lost) = (0, 0, 0);
    let mut first_error = None;
    for r in &load.results {
        latencies.extend_from_slice(&r.latencies);
        answers += r.answers;
        errors += r.errors;
        lost += r.lost;
        if first_error.is_none() {
            first_error = r.first_error.clone();
        }
    }
    latencies.sort_unstable();
    let n = latencies.len() as u64;
    let figures = Latencies {
        n,
        rps: n as f64 / load.measured_wall.as_secs_f64(),
        mean: latencies
            .iter()
            .sum::<u64>()
            .checked_div(n)
            .unwrap_or_default(),
        p50: percentile(&latencies, 0.50),
        p90: percentile(&latencies, 0.90),
        p99: percentile(&latencies, 0.99),
        p999: percentile(&latencies, 0.999),
        max: latencies.last().copied().unwrap_or(0),
    };
    (figures, answers, errors, lost, first_error)
}

// ---------------------------------------------------------------------------------------------
// Measuring the machine

/// CPU ticks (user + system) of every other process on the machine, by pid, with its name.
pub fn process_snapshot() -> BTreeMap<u32, (String, u64)> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Some((comm, ticks)) = std::fs::read_to_string(p.path().join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            out.insert(pid, (comm, ticks));
        }
    }
    out
}

/// The name and utime + stime of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat line.
pub fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat[open + 1..close].to_owned();
    // Fields after the comm start with the state (field 3); utime and stime are 14 and 15.
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((comm, ticks))
}

/// (busy, total) jiffies over all CPUs, from /proc/stat.
pub fn system_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Audit records in the log, and how many of them are allowed `secret.get`s.
pub fn audit_counts(path: &std::path::Path) -> (u64, u64) {
    let Ok(file) = std::fs::File::open(path) else {
        return (0, 0);
    };
    let mut records = 0;
    let mut gets = 0;
    for line in std::io::BufRead::split(std::io::BufReader::new(file), b'\n') {
        let line = line.expect("audit log readable");
        records += 1;
        if find(&line, br#""command":"secret.get""#).is_some()
            && find(&line, br#""decision":"allow""#).is_some()
        {
            gets += 1;
        }
    }
    (records, gets)
}

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

/// `secret.create` of `name` holding a `value_len`-byte value over HTTP (admin `token`): the
/// one secret a bench reads. Returns the HTTP status and the answer's body.
pub fn create_bench_secret(
    client: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: &str,
    name: &str,
    value_len: usize,
) -> (u16, Vec<u8>) {
    let value = bench_value(value_len);
    let body = format!(
        r#"{{"nodeId":"local","command":"secret.create","params":{{"name":"{name}","data":{{"value":"{value}"}}}}}}"#
    );
    let req = request_bytes(addr, token, &body);
    client.block_on(async {
        let mut c = Conn::connect(&addr).await.expect("connect");
        c.round_trip(&req).await.expect("secret.create")
    })
}
