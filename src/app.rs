//! The service: state built from config, the HTTP router, and the server loop.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::B256;
use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::admin;
use crate::config::Config;
use crate::policy::file::{PolicyFileError, load_dir};
use crate::rpc;
use crate::session::memory::MemorySessions;
use crate::session::redis::RedisSessions;
use crate::session::{SessionStore, StoreError};
use crate::signer::{Signer, SignerError};
use crate::sponsor::Sponsor;

/// Shared state of every request.
#[derive(Debug)]
pub struct AppState {
    /// The sponsorship pipeline.
    pub sponsor: Sponsor,
    /// ERC-7677 `sponsor.name`.
    pub sponsor_name: String,
    /// SHA-256 of the admin bearer token; `None`: admin API closed.
    pub admin_token_sha256: Option<B256>,
    admin_on_main: bool,
    request_seq: AtomicU64,
}

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The signing key.
    #[error("signer: {0}")]
    Signer(#[from] SignerError),
    /// One or more policy files are invalid.
    #[error("invalid policies:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Policies(Vec<PolicyFileError>),
    /// Redis could not be reached.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl AppState {
    /// Load the signer and the policies named by `config`, and connect the session store.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let signer = Signer::load(config.signer.clone())?;
        let policies = load_dir(&config.policies_dir).map_err(StartupError::Policies)?;
        let mut seed = [0u8; 8];
        // Request ids only correlate logs: a clock seed is enough if the OS RNG fails.
        if getrandom::fill(&mut seed).is_err() {
            seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .to_be_bytes();
        }
        let sessions = match &config.redis_url {
            None => SessionStore::Memory(MemorySessions::new()),
            Some(url) => {
                SessionStore::Redis(RedisSessions::connect(url, config.redis_timeout).await?)
            }
        };
        Ok(Self {
            sponsor: Sponsor::new(
                config.chain_id,
                config.entry_points.clone(),
                policies,
                signer,
                sessions,
            ),
            sponsor_name: config.sponsor_name.clone(),
            admin_token_sha256: config.admin_token_sha256,
            admin_on_main: config.admin_on_main,
            request_seq: AtomicU64::new(u64::from_be_bytes(seed) >> 16),
        })
    }

    /// A fresh id for one HTTP request, in every log line about it and in internal errors.
    pub fn next_request_id(&self) -> String {
        format!("{:012x}", self.request_seq.fetch_add(1, Ordering::Relaxed))
    }
}

/// The whole HTTP surface: JSON-RPC, health, and the admin API unless it has its own listener.
pub fn router(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/", post(rpc::handle))
        .route("/healthz", get(|| async { "ok" }));
    let router = if state.admin_on_main {
        router.merge(admin::router(state.clone()))
    } else {
        router
    };
    router.with_state(state)
}

/// The admin API alone, for its own listener (`--admin-listen`).
pub fn admin_router(state: Arc<AppState>) -> Router {
    admin::router(state.clone()).with_state(state)
}

/// Serve `router` on `listener` until `shutdown` resolves, then finish in-flight requests.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
