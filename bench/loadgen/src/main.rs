//! The proxy benchmark's load generator (bench/bench_proxy.py builds and runs it).
//!
//! Closed-loop callers over ONE HTTP/2 connection (the h2 crate, on a single-threaded
//! tokio runtime), each sending `ringmesh.demo.v1.Demo/Echo` (unary) or `Demo/Count`
//! (server stream) one call after the other, keyed like the mesh's callers
//! (`ringmesh-service`, `ringmesh-hash-key`), with a `grpc-timeout`. It checks what
//! comes back: HTTP 200, `grpc-status: 0` in the trailers, the expected number of
//! messages. Run: `loadgen --target 127.0.0.1:PORT [--method echo|count] [--payload N]
//! [--messages N] [--concurrency C] [--warmup S] [--duration S] [--keys N]
//! [--service NAME] [--timeout S]`.
//!
//! stdout, one JSON object a line: `{"event":"connected"}`, `{"event":"measuring"}`
//! at the end of the warm-up, `{"event":"done"}` at the end of the measured window,
//! then `{"event":"result",...}` once the calls in flight have ended (each within
//! `--timeout`). A call counts if it ends inside the window: calls/s is exact, and
//! the latencies are of those calls. On a usage or connect error: one
//! `{"event":"error","message":...}` line and exit status 1 (2 for usage).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Receive windows, like a gRPC channel's after BDP probing has grown them.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Attempts of one call that could not even be sent (connection gone, e.g. a GOAWAY):
/// a gRPC client retries those transparently, so they are not errors until this many.
const SEND_ATTEMPTS: usize = 3;

const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[derive(Clone, Copy, PartialEq)]
enum Rpc {
    Echo,
    Count,
}

struct Config {
    target: String,
    rpc: Rpc,
    payload: usize,
    messages: u32,
    concurrency: usize,
    warmup: f64,
    duration: f64,
    keys: usize,
    service: String,
    timeout: f64,
}

fn usage(message: &str) -> ! {
    emit(&format!(
        "{{\"event\":\"error\",\"message\":{}}}",
        json_string(&format!("usage: {message}"))
    ));
    std::process::exit(2)
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| usage(&format!("{name}: not a number: {value:?}")))
}

fn parse_args() -> Config {
    let mut config = Config {
        target: String::new(),
        rpc: Rpc::Echo,
        payload: 100,
        messages: 100,
        concurrency: 1,
        warmup: 1.0,
        duration: 5.0,
        keys: 4096,
        service: "echo".into(),
        timeout: 10.0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.len().is_multiple_of(2) {
        usage("flags come as --name value pairs");
    }
    for pair in args.chunks(2) {
        let (name, value) = (pair[0].as_str(), pair[1].as_str());
        match name {
            "--target" => config.target = value.to_string(),
            "--method" => {
                config.rpc = match value {
                    "echo" => Rpc::Echo,
                    "count" => Rpc::Count,
                    _ => usage("--method is echo or count"),
                }
            }
            "--payload" => config.payload = number(name, value),
            "--messages" => config.messages = number(name, value),
            "--concurrency" => config.concurrency = number(name, value),
            "--warmup" => config.warmup = number(name, value),
            "--duration" => config.duration = number(name, value),
            "--keys" => config.keys = number(name, value),
            "--service" => config.service = value.to_string(),
            "--timeout" => config.timeout = number(name, value),
            _ => usage(&format!("unknown flag {name}")),
        }
    }
    // Every loop below is bounded by these.
    if config.target.is_empty() {
        usage("--target HOST:PORT is required");
    }
    if !(1..=1024).contains(&config.concurrency) {
        usage("--concurrency is 1..1024");
    }
    if !(config.duration > 0.0 && config.duration <= 3600.0) {
        usage("--duration is in (0, 3600] s");
    }
    if !(0.0..=600.0).contains(&config.warmup) {
        usage("--warmup is in [0, 600] s");
    }
    if !(config.timeout > 0.0 && config.timeout <= 60.0) {
        usage("--timeout is in (0, 60] s");
    }
    if config.payload > 16 << 20 || !(1..=100_000).contains(&config.messages) {
        usage("--payload is at most 16 MiB, --messages 1..100000");
    }
    if !(1..=1_000_000).contains(&config.keys) {
        usage("--keys is 1..1000000");
    }
    config
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The request message, gRPC-framed (5-byte prefix, uncompressed).
fn request_body(config: &Config) -> Bytes {
    let mut message = Vec::new();
    match config.rpc {
        Rpc::Echo => {
            // EchoRequest { text = 1: "x" * payload } (delay_ms = 0 is the default)
            message.push(0x0a);
            varint(config.payload as u64, &mut message);
            message.resize(message.len() + config.payload, b'x');
        }
        Rpc::Count => {
            // CountRequest { n = 1: messages, payload = 2: bytes }
            message.push(0x08);
            varint(u64::from(config.messages), &mut message);
            if config.payload > 0 {
                message.push(0x12);
                varint(config.payload as u64, &mut message);
                message.resize(message.len() + config.payload, b'x');
            }
        }
    }
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

/// Counts gRPC messages in a response body, across DATA frame boundaries.
#[derive(Default)]
struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    messages: u64,
}

impl Framer {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    self.messages += 1;
                    self.have = 0;
                }
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if len == 0 {
                    self.messages += 1;
                    self.have = 0;
                } else {
                    self.remaining = len;
                }
            }
        }
    }
}

enum CallError {
    /// Nothing was sent: the connection is gone (retried on a new one).
    NotSent(String),
    /// The call failed; the connection may be gone too.
    Failed { what: String, connection: bool },
}

fn h2_failure(stage: &str, e: &h2::Error) -> CallError {
    CallError::Failed {
        what: format!("{stage}: {e}"),
        connection: e.is_go_away() || e.is_io(),
    }
}

fn status_failure(what: String) -> CallError {
    CallError::Failed {
        what,
        connection: false,
    }
}

/// `Ok` if `grpc-status` is 0, else the status name and message.
fn check_status(headers: &HeaderMap) -> Result<(), CallError> {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match code {
        Some(0) => Ok(()),
        Some(code) => {
            let name = STATUS_NAMES.get(code).copied().unwrap_or("UNKNOWN_CODE");
            let message = headers
                .get("grpc-message")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default();
            Err(status_failure(format!("{name}: {message}")))
        }
        None => Err(status_failure("no grpc-status".into())),
    }
}

struct Shared {
    uri: Uri,
    headers: HeaderMap,
    keys: Vec<HeaderValue>,
    body: Bytes,
    expect_messages: u64,
    timeout: Duration,
    measure: Instant,
    end: Instant,
    connection: Connection,
}

struct Connection {
    target: String,
    current: Mutex<(u64, SendRequest<Bytes>)>,
}

async fn connect(target: &str) -> Result<SendRequest<Bytes>, String> {
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {target}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

impl Connection {
    async fn get(&self) -> (u64, SendRequest<Bytes>) {
        let current = self.current.lock().await;
        (current.0, current.1.clone())
    }

    /// A new connection, unless another caller already replaced generation `seen`.
    async fn replace(&self, seen: u64) -> Result<(u64, SendRequest<Bytes>), String> {
        let mut current = self.current.lock().await;
        if current.0 == seen {
            current.1 = connect(&self.target).await?;
            current.0 += 1;
        }
        Ok((current.0, current.1.clone()))
    }
}

/// One call; the number of response messages on success.
async fn call(
    send: SendRequest<Bytes>,
    shared: &Shared,
    key: &HeaderValue,
) -> Result<u64, CallError> {
    let mut send = send
        .ready()
        .await
        .map_err(|e| CallError::NotSent(format!("{e}")))?;
    let mut request = Request::new(());
    *request.method_mut() = Method::POST;
    *request.uri_mut() = shared.uri.clone();
    let headers = request.headers_mut();
    headers.clone_from(&shared.headers);
    headers.insert(HeaderName::from_static("ringmesh-hash-key"), key.clone());
    let (response, mut request_body) = send
        .send_request(request, false)
        .map_err(|e| CallError::NotSent(format!("{e}")))?;
    request_body
        .send_data(shared.body.clone(), true)
        .map_err(|e| h2_failure("send", &e))?;
    let response = response.await.map_err(|e| h2_failure("response", &e))?;
    let (parts, mut body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(status_failure(format!("HTTP {}", parts.status)));
    }
    if parts.headers.contains_key("grpc-status") {
        // Trailers-only: a status without a message.
        check_status(&parts.headers)?;
        return Err(status_failure("OK without a message".into()));
    }
    let mut framer = Framer::default();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| h2_failure("body", &e))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        framer.feed(&chunk);
    }
    match body
        .trailers()
        .await
        .map_err(|e| h2_failure("trailers", &e))?
    {
        Some(trailers) => check_status(&trailers)?,
        None => return Err(status_failure("no trailers".into())),
    }
    if framer.messages != shared.expect_messages {
        return Err(status_failure(format!(
            "{} response messages, expected {}",
            framer.messages, shared.expect_messages
        )));
    }
    Ok(framer.messages)
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    messages: u64,
    errors: BTreeMap<String, u64>,
    errors_outside: u64,
}

async fn caller(first_key: usize, shared: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    let (mut generation, mut send) = shared.connection.get().await;
    let mut i = first_key;
    loop {
        let start = Instant::now();
        if start >= shared.end {
            return tally;
        }
        let key = &shared.keys[i % shared.keys.len()];
        i += 1;
        let mut outcome = Err(CallError::NotSent("never tried".into()));
        for _ in 0..SEND_ATTEMPTS {
            outcome = match tokio::time::timeout(shared.timeout, call(send.clone(), &shared, key))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(status_failure("DEADLINE_EXCEEDED (client timeout)".into())),
            };
            let gone = matches!(
                outcome,
                Err(CallError::NotSent(_))
                    | Err(CallError::Failed {
                        connection: true,
                        ..
                    })
            );
            if gone {
                match shared.connection.replace(generation).await {
                    Ok((g, s)) => (generation, send) = (g, s),
                    Err(e) => {
                        outcome = Err(status_failure(e));
                        // Bounded: the loop ends at `shared.end`.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        break;
                    }
                }
            }
            if !matches!(outcome, Err(CallError::NotSent(_))) {
                break;
            }
        }
        let finish = Instant::now();
        let inside = finish >= shared.measure && finish <= shared.end;
        match outcome {
            Ok(messages) if inside => {
                tally
                    .latencies_ns
                    .push(finish.duration_since(start).as_nanos() as u64);
                tally.messages += messages;
            }
            Ok(_) => {}
            Err(CallError::NotSent(what)) | Err(CallError::Failed { what, .. }) => {
                if inside {
                    *tally.errors.entry(what).or_default() += 1;
                } else {
                    tally.errors_outside += 1;
                }
            }
        }
    }
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e3
}

fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}

async fn run(config: Config) -> Result<(), String> {
    let path = match config.rpc {
        Rpc::Echo => "/ringmesh.demo.v1.Demo/Echo",
        Rpc::Count => "/ringmesh.demo.v1.Demo/Count",
    };
    let uri: Uri = format!("http://{}{}", config.target, path)
        .parse()
        .map_err(|e| format!("bad --target: {e}"))?;
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(TE, HeaderValue::from_static("trailers"));
    let timeout_ms = (config.timeout * 1e3).round() as u64;
    headers.insert(
        HeaderName::from_static("grpc-timeout"),
        HeaderValue::from_str(&format!("{timeout_ms}m")).map_err(|e| e.to_string())?,
    );
    headers.insert(
        HeaderName::from_static("ringmesh-service"),
        HeaderValue::from_str(&config.service).map_err(|e| format!("bad --service: {e}"))?,
    );
    // The bench's keys, in a fixed shuffled order (a multiplicative permutation).
    let n = config.keys;
    let step = (0..n).map(|k| (k * 2_654_435_761) % n).collect::<Vec<_>>();
    let keys = step
        .iter()
        .map(|k| HeaderValue::from_str(&format!("user-{k}")).expect("ascii"))
        .collect::<Vec<_>>();

    let send = connect(&config.target).await?;
    emit("{\"event\":\"connected\"}");
    let start = Instant::now();
    let measure = start + Duration::from_secs_f64(config.warmup);
    let end = measure + Duration::from_secs_f64(config.duration);
    let shared = Arc::new(Shared {
        uri,
        headers,
        keys,
        body: request_body(&config),
        expect_messages: match config.rpc {
            Rpc::Echo => 1,
            Rpc::Count => u64::from(config.messages),
        },
        timeout: Duration::from_secs_f64(config.timeout),
        measure,
        end,
        connection: Connection {
            target: config.target.clone(),
            current: Mutex::new((0, send)),
        },
    });
    let clock = tokio::spawn(async move {
        tokio::time::sleep_until(measure.into()).await;
        emit("{\"event\":\"measuring\"}");
        tokio::time::sleep_until(end.into()).await;
        emit("{\"event\":\"done\"}");
    });
    let callers = (0..config.concurrency)
        .map(|k| tokio::spawn(caller(k * n / config.concurrency, shared.clone())))
        .collect::<Vec<_>>();
    let mut total = Tally::default();
    for handle in callers {
        let tally = handle.await.map_err(|e| format!("caller: {e}"))?;
        total.latencies_ns.extend(tally.latencies_ns);
        total.messages += tally.messages;
        total.errors_outside += tally.errors_outside;
        for (what, count) in tally.errors {
            *total.errors.entry(what).or_default() += count;
        }
    }
    clock.await.map_err(|e| format!("clock: {e}"))?;
    let mut lat = total.latencies_ns;
    lat.sort_unstable();
    let mean = if lat.is_empty() {
        f64::NAN
    } else {
        lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1e3
    };
    let errors = total
        .errors
        .iter()
        .map(|(what, count)| format!("{}:{count}", json_string(what)))
        .collect::<Vec<_>>()
        .join(",");
    emit(&format!(
        "{{\"event\":\"result\",\"calls\":{},\"seconds\":{},\"messages\":{},\
         \"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"max_us\":{},\"mean_us\":{},\
         \"errors\":{{{errors}}},\"errors_outside_window\":{}}}",
        lat.len(),
        config.duration,
        total.messages,
        json_number(percentile_us(&lat, 50.0)),
        json_number(percentile_us(&lat, 90.0)),
        json_number(percentile_us(&lat, 99.0)),
        json_number(lat.last().map_or(f64::NAN, |&v| v as f64 / 1e3)),
        json_number(mean),
        total.errors_outside,
    ));
    Ok(())
}

fn main() {
    let config = parse_args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(message) = runtime.block_on(run(config)) {
        emit(&format!(
            "{{\"event\":\"error\",\"message\":{}}}",
            json_string(&message)
        ));
        std::process::exit(1);
    }
}
