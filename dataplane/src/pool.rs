//! Upstream connections: one multiplexed HTTP/2 connection per address, made on
//! first use, remade after it closes, dropped when the address leaves the topology.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::body::ReplayBody;
use crate::snapshot::lock;
use crate::tls::{self, Identity, Tls};

/// After a failed connect, calls to the same address fail at once for this long
/// instead of each waiting for its own connect: they fail over sooner.
const FAIL_FAST: Duration = Duration::from_millis(100);
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 4 << 20;
pub const MAX_FRAME: u32 = 64 << 10;
pub const MAX_HEADER_LIST: u32 = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError(pub String);

type Sender = SendRequest<ReplayBody>;

struct Upstream {
    /// The service the peer at this address must prove it is (with TLS).
    service: Option<String>,
    /// Held across a connect: concurrent calls to a new peer share one connection.
    sender: tokio::sync::Mutex<Option<Sender>>,
    failed: Mutex<Option<(Instant, ConnectError)>>,
}

/// Connections to peer sidecars (mutual TLS when the mesh has certificates) or
/// to the app (always plaintext: it is on loopback).
#[derive(Default)]
pub struct Pool {
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
    tls: Option<Arc<Tls>>,
}

impl Pool {
    pub fn new(tls: Option<Arc<Tls>>) -> Self {
        Pool {
            upstreams: Mutex::new(HashMap::new()),
            tls,
        }
    }

    fn upstream(&self, address: &str, service: Option<&str>) -> Arc<Upstream> {
        let mut upstreams = lock(&self.upstreams);
        if let Some(upstream) = upstreams.get(address) {
            if upstream.service.as_deref() == service {
                return upstream.clone();
            }
        }
        // New, or the address now belongs to another service: a new connection.
        let upstream = Arc::new(Upstream {
            service: service.map(str::to_owned),
            sender: tokio::sync::Mutex::new(None),
            failed: Mutex::new(None),
        });
        upstreams.insert(address.to_owned(), upstream.clone());
        upstream
    }

    /// A sender on a live connection to `address` (an instance of `service`:
    /// with TLS, its certificate must say so), connecting within `wait` if needed.
    pub async fn get(
        &self,
        address: &str,
        service: Option<&str>,
        wait: Duration,
    ) -> Result<Sender, ConnectError> {
        let upstream = self.upstream(address, service);
        let deadline = tokio::time::Instant::now() + wait;
        let mut slot = match tokio::time::timeout_at(deadline, upstream.sender.lock()).await {
            Ok(slot) => slot,
            Err(_) => {
                return Err(ConnectError(format!(
                    "{address} did not connect within {:.2} s",
                    wait.as_secs_f64()
                )))
            }
        };
        if let Some(sender) = slot.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
            *slot = None;
        }
        if let Some((at, err)) = lock(&upstream.failed).clone() {
            if at.elapsed() < FAIL_FAST {
                return Err(err);
            }
        }
        let tls = match (&self.tls, service) {
            (Some(tls), Some(service)) => Some((tls.current(), service)),
            _ => None,
        };
        match tokio::time::timeout_at(deadline, connect(address, tls)).await {
            Ok(Ok(sender)) => {
                *lock(&upstream.failed) = None;
                *slot = Some(sender.clone());
                Ok(sender)
            }
            Ok(Err(err)) => {
                *lock(&upstream.failed) = Some((Instant::now(), err.clone()));
                Err(err)
            }
            Err(_) => Err(ConnectError(format!(
                "{address} did not connect within {:.2} s",
                wait.as_secs_f64()
            ))),
        }
    }

    /// Drop connections to addresses no longer registered (calls on them finish).
    pub fn retain(&self, addresses: &HashSet<&str>) {
        lock(&self.upstreams).retain(|a, _| addresses.contains(a.as_str()));
    }

    pub fn clear(&self) {
        lock(&self.upstreams).clear();
    }
}

async fn connect(
    address: &str,
    tls: Option<(Arc<Identity>, &str)>,
) -> Result<Sender, ConnectError> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|e| ConnectError(format!("cannot connect to {address}: {e}")))?;
    let _ = stream.set_nodelay(true);
    match tls {
        None => handshake(address, stream).await,
        Some((identity, service)) => {
            let name = tls::server_name(service).map_err(|e| ConnectError(e.0))?;
            let stream = identity
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| ConnectError(format!("TLS with {address} failed: {e}")))?;
            handshake(address, stream).await
        }
    }
}

async fn handshake<S>(address: &str, stream: S) -> Result<Sender, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (heard, first_bytes) = oneshot::channel();
    let stream = FirstRead {
        inner: stream,
        heard: Some(heard),
    };
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError(format!("cannot speak HTTP/2 to {address}: {e}")))?;
    tokio::spawn(async move {
        // Ends when the peer closes or every sender and stream is gone.
        let _ = connection.await;
    });
    // A peer that accepts TCP but never speaks HTTP/2 (hung, or not a gRPC
    // server) would hold every call until its deadline, leaving no time to
    // fail over: the connection counts only once the peer's SETTINGS arrive.
    match first_bytes.await {
        Ok(()) => Ok(sender),
        Err(_) => Err(ConnectError(format!(
            "{address} closed the connection before speaking HTTP/2"
        ))),
    }
}

/// A socket that says when the peer's first bytes arrive.
struct FirstRead<S> {
    inner: S,
    heard: Option<oneshot::Sender<()>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstRead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(heard) = self.heard.take() {
                let _ = heard.send(());
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstRead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
