//! The HTTP server loop: accepts connections and serves a router on each, within
//! [`ConnectionLimits`], until shutdown.
//!
//! axum's own `serve` gives hyper no timer, so hyper's header-read timeout never fires and a
//! connection may hold a socket and its task for ever: a client opening thousands, each sending
//! its headers a byte at a time or a body that never ends (or none at all), exhausts the
//! process's file descriptors before any API key is checked, and nobody is served. Here each
//! connection has a deadline for every request's headers (which hyper also applies to a kept-
//! alive connection waiting for its next request), each request a deadline for its whole
//! answer, body read included, and the connections open at once a cap.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::Service;

use crate::rpc::error::UNAVAILABLE;

/// What one client may hold of the server (`--header-timeout`, `--request-timeout`,
/// `--max-connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest a request's headers may take to arrive, counted from when the connection is
    /// ready for them (so also how long a kept-alive connection may sit idle); then it is closed.
    pub header_timeout: Duration,
    /// Longest a request may take from its headers to its answer, its body's reading included;
    /// then it is answered HTTP 408 and the connection closed.
    pub request_timeout: Duration,
    /// Most connections open at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
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
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// `router`'s answer to `req`, or HTTP 408 once `limit` has passed (the request's future is
/// dropped: what it reserved stays reserved, released when its signature expires or settled
/// when it lands, as for a client that hangs up).
async fn answer(
    mut router: Router,
    req: Request<Incoming>,
    limit: Duration,
) -> Result<Response, Infallible> {
    match tokio::time::timeout(limit, router.call(req.map(Body::new))).await {
        Ok(answered) => answered,
        Err(_) => {
            let body = json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": {
                    "code": UNAVAILABLE,
                    "message": format!("request timed out after {}", humantime::format_duration(limit)),
                    "data": { "reason": "request_timeout" },
                },
            });
            let mut resp = (StatusCode::REQUEST_TIMEOUT, axum::Json(body)).into_response();
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
