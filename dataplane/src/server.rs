//! The sidecar's HTTP/2 servers (outbound and inbound ports), their drain,
//! and the background probes that bring peers and the app back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Version};
use http_body_util::BodyExt;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use std::future::Future;
use std::pin::Pin;

use http::Response;
use hyper::body::Incoming;

use crate::body::{RelayBody, RelayError, ReplayBody};
use crate::grpc;
use crate::plane::Plane;
use crate::pool::{CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, STREAM_WINDOW};
use crate::snapshot::lock;
use crate::tls::{self, Tls};
use crate::{inbound, log, outbound};

/// Streams one connection may have open at once; more wait (HTTP/2 flow control).
const MAX_STREAMS: u32 = 1024;
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A client that has not sent its HTTP/2 preface (or finished its TLS
/// handshake) by then is not a peer: its connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Outbound,
    Inbound,
}

/// Bind a port the sidecar must own: SO_REUSEADDR (restarts), never SO_REUSEPORT.
pub fn bind(address: &str) -> Result<std::net::TcpListener, String> {
    let addr: SocketAddr = address
        .parse()
        .map_err(|_| format!("cannot listen on {address}: not an IP address and port"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    let _ = socket.set_reuse_address(true);
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    socket
        .bind(&addr.into())
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    socket
        .listen(1024)
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {address}: {e}"))?;
    Ok(socket.into())
}

/// A server accepting connections until told to stop, then draining them.
pub struct Server {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    pub fn start(
        listener: std::net::TcpListener,
        plane: Arc<Plane>,
        side: Side,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::from_std(listener)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept(listener, plane, side, stopped));
        Ok(Server { stop, task })
    }

    /// Stop accepting and send GOAWAY on every connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Wait for the connections' calls to finish (the caller bounds the wait).
    pub async fn drained(self) {
        self.stop();
        let _ = self.task.await;
    }
}

async fn accept(
    listener: TcpListener,
    plane: Arc<Plane>,
    side: Side,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .auto_date_header(false);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let _ = stream.set_nodelay(true);
                    let tls = match side {
                        Side::Inbound => plane.config.tls.clone(),
                        Side::Outbound => None, // the app's leg: plaintext on loopback
                    };
                    // A connection's errors (garbage, a reset, a failed handshake)
                    // end that connection only.
                    tokio::spawn(serve_connection(
                        plane.clone(),
                        side,
                        stream,
                        from,
                        tls,
                        builder.clone(),
                        graceful.watcher(),
                    ));
                }
                Err(err) => {
                    // Out of file descriptors, most likely: breathe, then go on.
                    log::warning(&format!("accepting a connection failed: {err}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serve one accepted connection; with TLS, only a mesh peer's, whose
/// certificate names the calling service.
async fn serve_connection(
    plane: Arc<Plane>,
    side: Side,
    stream: tokio::net::TcpStream,
    from: SocketAddr,
    tls: Option<Arc<Tls>>,
    builder: http2::Builder<TokioExecutor>,
    watcher: Watcher,
) {
    let Some(tls) = tls else {
        // A client that connects and says nothing holds a connection for
        // nothing: HTTP/2 clients send their preface at once.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(read)) if read > 0 => {}
            _ => return,
        }
        let service = service_fn(move |request| handle(plane.clone(), side, None, request));
        let _ = watcher
            .watch(builder.serve_connection(TokioIo::new(stream), service))
            .await;
        return;
    };
    let identity = tls.current();
    let stream =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, identity.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                log::info(&format!(
                    "refused a connection from {from}: TLS handshake failed: {err}"
                ));
                return;
            }
            Err(_) => {
                log::info(&format!(
                "refused a connection from {from}: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
            ));
                return;
            }
        };
    let caller = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(tls::service_of);
    let caller: Arc<str> = match caller {
        Some(Ok(service)) => service.into(),
        Some(Err(err)) => {
            log::info(&format!("refused a connection from {from}: {err}"));
            return;
        }
        None => return,
    };
    let service =
        service_fn(move |request| handle(plane.clone(), side, Some(caller.clone()), request));
    let _ = watcher
        .watch(builder.serve_connection(TokioIo::new(stream), service))
        .await;
}

fn handle(
    plane: Arc<Plane>,
    side: Side,
    caller: Option<Arc<str>>,
    request: Request<Incoming>,
) -> Pin<Box<dyn Future<Output = Result<Response<RelayBody>, RelayError>> + Send>> {
    match side {
        Side::Outbound => Box::pin(outbound::serve(plane, request)),
        Side::Inbound => Box::pin(inbound::serve(plane, caller, request)),
    }
}

/// Every second: probe the peers ejected as unreachable, and the app while it is down.
pub async fn probes(plane: Arc<Plane>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Some(tls) = &plane.config.tls {
            tls.reload_if_changed();
        }
        probe_peers(&plane).await;
        if let Some(app) = plane.config.app.as_deref() {
            if !plane.app_up() && plane.app.get(app, None, PROBE_TIMEOUT).await.is_ok() {
                plane.note_app(true);
            }
        }
    }
}

async fn probe_peers(plane: &Plane) {
    let snapshot = plane.routes.load_full();
    for routes in snapshot.services.values() {
        let waiting = lock(&routes.state.ejector).awaiting_probe(Instant::now());
        for id in waiting {
            let Some(peer) = routes.peers.iter().find(|p| p.id == id) else {
                continue;
            };
            if serving(plane, &routes.name, &peer.address).await {
                log::info(&format!(
                    "{}/{} passed its health probe: back in rotation",
                    routes.name, id
                ));
                lock(&routes.state.ejector).probe_passed(&id);
            }
        }
    }
}

/// Does the sidecar at `address` answer SERVING to a grpc.health.v1 check?
pub async fn serving(plane: &Plane, service: &str, address: &str) -> bool {
    let probe = async {
        let mut sender = plane
            .peers
            .get(address, Some(service), PROBE_TIMEOUT)
            .await
            .ok()?;
        let mut request = Request::new(ReplayBody::once(grpc::frame_message(b"")));
        *request.method_mut() = http::Method::POST;
        *request.version_mut() = Version::HTTP_2;
        *request.uri_mut() = format!("http://{address}{}", inbound::HEALTH_CHECK)
            .parse()
            .ok()?;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let response = sender.send_request(request).await.ok()?;
        let collected = response.into_body().collect().await.ok()?;
        let trailers_ok = collected.trailers().and_then(grpc::status_of) == Some(grpc::OK);
        let body = collected.to_bytes();
        Some(trailers_ok && grpc::unframe_message(&body) == Some(&[0x08, 0x01][..]))
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}
