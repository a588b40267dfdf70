//! The HTTP server loop: accepts connections and serves a router on each, within
//! [`ConnectionLimits`], until shutdown.
//!
//! axum's own `serve` gives hyper no timer, so hyper's header-read timeout never fires and a
//! connection may hold a socket and its task for ever: a client opening thousands, each sending
//! its headers a byte at a time or a body that never ends (or none at all), exhausts the
//! process's file descriptors before any API key is checked, and nobody is served. Here each
//! connection has a deadline for every request's headers (which hyper also applies to a kept-
//! alive connection waiting for its next request), each request a deadline for its whole
//! answer, body read included, each answer a deadline for the client to read it
//! (`WriteDeadline`), and the connections open at once a cap that fits the open-file limit.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::Service;

/// What a listener's clients may hold of it (`--header-timeout`, `--request-timeout`,
/// `--max-connections`): the cap is the listener's, shared by all its clients (no per-client
/// share: docs/security.md, "Still open").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest a request's headers may take to arrive, counted from when the connection is
    /// ready for them (so also how long a kept-alive connection may sit idle); then it is closed.
    pub header_timeout: Duration,
    /// Longest a request may take from its headers to its answer, its body's reading included;
    /// then it is answered a plain HTTP 408 and the connection closed.
    pub request_timeout: Duration,
    /// Most connections open at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
}

/// `--header-timeout`'s default.
pub const DEFAULT_HEADER_TIMEOUT: &str = "30s";
/// `--request-timeout`'s default.
pub const DEFAULT_REQUEST_TIMEOUT: &str = "30s";
/// `--max-connections`' default.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

impl Default for ConnectionLimits {
    /// The flags' defaults.
    fn default() -> Self {
        let secs = |d: &str| humantime::parse_duration(d).unwrap_or(Duration::from_secs(30));
        Self {
            header_timeout: secs(DEFAULT_HEADER_TIMEOUT),
            request_timeout: secs(DEFAULT_REQUEST_TIMEOUT),
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
        }
    }
}

/// Serve `router` on `listener` within `limits` until `shutdown` resolves, then stop accepting
/// and finish the requests in flight (connections close once idle).
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = open.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
        };
        let (tcp, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // Answers go out as they are written: with Nagle's algorithm a response written in two
        // parts, or while the client has not yet acknowledged the last one, can wait for its ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set on an accepted connection: {e}");
        }
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            answer(router.clone(), req, limits.request_timeout)
        });
        // An answer the client does not read for as long as a request may take closes the
        // connection (hyper reads no further request meanwhile, so no header timeout runs).
        let io = TokioIo::new(WriteDeadline::new(tcp, limits.request_timeout));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    // Every connection ends within a request's and an idle connection's deadlines; one that
    // somehow does not is not waited for.
    let longest = limits.header_timeout.saturating_add(limits.request_timeout);
    if tokio::time::timeout(longest, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open {longest:?} after shutdown began: dropped");
    }
    Ok(())
}

/// Files this process keeps open besides client connections (Redis, chain RPC and bundler
/// connections, the policy directory, logs), counted off its open-file limit.
const OPEN_FILES_KEPT: u64 = 256;

impl ConnectionLimits {
    /// These limits, with `max_connections` lowered (with a warning) so that a full listener,
    /// and `reserved` connections of others (the admin and metrics listeners'), stay within this process's
    /// open-file limit (`ulimit -n`): past it, `accept` fails before the cap does, and so does
    /// every new connection to Redis or the chain.
    pub fn within_open_files(mut self, reserved: usize) -> Self {
        let Some(soft) = open_file_limit() else {
            return self;
        };
        let room = room_for_connections(soft, reserved);
        if self.max_connections > room {
            tracing::warn!(
                max_connections = self.max_connections,
                open_file_limit = soft,
                lowered_to = room,
                "--max-connections does not fit the open-file limit: lowered (raise the hard open-file limit: LimitNOFILE=, --ulimit nofile=)"
            );
            self.max_connections = room;
        }
        self
    }

    /// Those of a listener besides the main one (`--admin-listen`, `--metrics-listen`): these,
    /// with at most [`SIDE_MAX_CONNECTIONS`].
    pub fn for_side_listener(self) -> Self {
        Self {
            max_connections: self.max_connections.min(SIDE_MAX_CONNECTIONS),
            ..self
        }
    }
}

/// Most connections each listener besides the main one holds (the admin API's, `/metrics`'):
/// an operator's tools and scrapers, not the public.
pub const SIDE_MAX_CONNECTIONS: usize = 64;

/// Client connections a listener may hold under a soft open-file limit of `soft`, with
/// `reserved` taken by other listeners (at least one).
fn room_for_connections(soft: u64, reserved: usize) -> usize {
    let reserved = u64::try_from(reserved).unwrap_or(u64::MAX);
    usize::try_from(
        soft.saturating_sub(OPEN_FILES_KEPT)
            .saturating_sub(reserved),
    )
    .unwrap_or(usize::MAX)
    .max(1)
}

/// Most open files [`raise_open_files`] asks for: room for `--max-connections`' default many
/// times over, and the most a Linux process may have by default (`fs.nr_open`).
const OPEN_FILES_WANTED: u64 = 1 << 20;

/// Raise this process's soft open-file limit (`ulimit -Sn`) to its hard limit, at most
/// [`OPEN_FILES_WANTED`] and the kernel's `fs.nr_open`, as servers do at start: many hosts
/// start services at a soft 1,024 under a much higher hard limit (systemd's default: 524,288),
/// which would hold the main listener to about 770 connections
/// ([`ConnectionLimits::within_open_files`], which reads the limit after this). Logged when
/// raised, or when it cannot be.
pub fn raise_open_files() {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let now = getrlimit(Resource::Nofile);
        // (An unlimited hard limit still stops at `fs.nr_open`, where Linux has one.)
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let wanted = now
            .maximum
            .unwrap_or(u64::MAX)
            .min(OPEN_FILES_WANTED)
            .min(nr_open);
        let Some(soft) = now.current.filter(|&soft| soft < wanted) else {
            return;
        };
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: now.maximum,
            },
        ) {
            Ok(()) => tracing::info!(from = soft, to = wanted, "open-file limit raised"),
            Err(e) => {
                tracing::warn!(error = %e, soft, wanted, "the open-file limit could not be raised")
            }
        }
    }
}

/// This process's soft open-file limit (`None`: unlimited, or not a Unix).
fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A client connection whose writes must make progress: one the peer keeps pending (a full
/// receive window: it reads nothing) for `limit` fails, and the connection closes.
struct WriteDeadline {
    io: TcpStream,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn new(io: TcpStream, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled: None,
        }
    }

    /// `polled`, or a timeout once writes have been pending for `limit`.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of its answer",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// `router`'s answer to `req`, or once `limit` has passed a plain HTTP 408 that closes the
/// connection, as a proxy in front would answer: the cut is the transport's, so it carries no
/// JSON-RPC error (the request may not have been read far enough to have an id). The
/// request's future is dropped: what it reserved stays reserved, released when its signature
/// expires or settled when it lands, as for a client that hangs up.
async fn answer(
    mut router: Router,
    req: Request<Incoming>,
    limit: Duration,
) -> Result<Response, Infallible> {
    match tokio::time::timeout(limit, router.call(req.map(Body::new))).await {
        Ok(answered) => answered,
        Err(_) => {
            tracing::warn!("request timed out: not answered within --request-timeout");
            let mut resp = (StatusCode::REQUEST_TIMEOUT, "request timed out\n").into_response();
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            Ok(resp)
        }
    }
}

/// An `accept` that failed: a connection reset before it was taken is nothing; anything else
/// (out of file descriptors, most often) is logged and waited out for a second, so the loop
/// does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_for_connections_leaves_files_for_the_rest() {
        assert_eq!(room_for_connections(1024, 0), 768);
        assert_eq!(room_for_connections(1024, SIDE_MAX_CONNECTIONS), 704);
        assert_eq!(room_for_connections(100, 0), 1, "at least one");
    }
}
