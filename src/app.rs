//! The service: state built from config, the HTTP router and its handlers, and the background
//! tasks (the server loop is [`crate::server`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::session::redis::RedisConn;
use alloy::primitives::B256;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::admin;
use crate::apikey::ApiKeys;
use crate::chain::watcher::Watcher;
use crate::clock::unix_now;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::ledger::memory::MemoryLedger;
use crate::ledger::redis::RedisLedger;
use crate::metrics::Scrape;
use crate::policy::file::{PolicyFileError, load_sources, read_dir_sources, version_of};
use crate::policy::publish;
use crate::ratelimit::RateLimits;
use crate::rpc;
use crate::session;
use crate::session::memory::MemorySessions;
use crate::session::redis::RedisSessions;
use crate::session::{SessionStore, StoreError};
use crate::signer::{Signer, SignerError};
use crate::sponsor::Sponsor;

/// Most gas estimations one replica has a chain's bundler run at once
/// (`pm_sponsorUserOperation` without gas limits). Each holds a request to the bundler for up to
/// `--bundler-timeout`, and one that fails charges nothing: without the bound, one client's
/// concurrent requests were as many requests to the operator's bundler (and sockets to it).
pub const MAX_ESTIMATES_IN_FLIGHT: usize = 64;

/// Most of those one API key holds, so that one client cannot take them all from the others
/// (keys of one name share them; without keys, every client counts as one key).
pub const MAX_ESTIMATES_PER_KEY: usize = 16;

/// The gas estimations in flight at one chain's bundler: at most [`MAX_ESTIMATES_IN_FLIGHT`],
/// at most [`MAX_ESTIMATES_PER_KEY`] of them one API key's. One more is refused at once, not
/// queued.
#[derive(Debug)]
pub struct EstimateSlots {
    /// Taken in all (permits of [`MAX_ESTIMATES_IN_FLIGHT`]).
    all: std::sync::Arc<tokio::sync::Semaphore>,
    /// Per API key name (a configured key: a bounded set).
    keys:
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
}

/// An estimation's slots, given back when dropped.
pub struct EstimateSlot {
    _key: tokio::sync::OwnedSemaphorePermit,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl EstimateSlots {
    fn new() -> Self {
        Self {
            all: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ESTIMATES_IN_FLIGHT)),
            keys: std::sync::Mutex::default(),
        }
    }

    /// A slot for an estimation asked with API key `key` (`""` without keys), or which bound
    /// is full.
    pub fn try_take(&self, key: &str) -> Result<EstimateSlot, String> {
        let per_key = {
            let mut keys = self
                .keys
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            keys.entry(key.to_owned())
                .or_insert_with(|| {
                    std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_ESTIMATES_PER_KEY))
                })
                .clone()
        };
        let _key = per_key.try_acquire_owned().map_err(|_| {
            format!("this API key already has {MAX_ESTIMATES_PER_KEY} estimations at the bundler")
        })?;
        let _all = self.all.clone().try_acquire_owned().map_err(|_| {
            format!("this replica already has {MAX_ESTIMATES_IN_FLIGHT} estimations at the bundler")
        })?;
        Ok(EstimateSlot { _key, _all })
    }
}

/// Shared state of every request.
#[derive(Debug)]
pub struct AppState {
    /// The sponsorship pipeline.
    pub sponsor: Sponsor,
    /// ERC-7677 `sponsor.name`.
    pub sponsor_name: String,
    /// Largest JSON-RPC request body accepted.
    pub max_body_bytes: usize,
    /// API keys; empty: keyless (loopback only).
    pub api_keys: ApiKeys,
    /// Per chain served (in configuration order): when its settlement watcher last polled
    /// successfully (unix seconds; 0: no watcher), and how stale that may get before it is
    /// reported lagging.
    watchers: Vec<WatcherHealth>,
    /// Per chain, the bundler that estimates gas for operations sent without limits, and the
    /// estimations in flight there.
    pub bundlers: Vec<(u64, alloy::rpc::client::RpcClient, EstimateSlots)>,
    /// How long estimation waits for it.
    pub bundler_timeout: std::time::Duration,
    /// SHA-256 of the admin bearer token (every policy's sessions, and their status); `None`:
    /// none.
    pub admin_token_sha256: Option<B256>,
    /// Tenants' admin keys: each the sessions of its policies only.
    pub admin_keys: crate::apikey::ApiKeys,
    /// The bound on a policy's live grants that a tenant's admin key meets where the policy
    /// sets no `max_sessions` (`--tenant-default-max-sessions`); `None`: none.
    pub tenant_default_max_sessions: Option<std::num::NonZeroU64>,
    admin_on_main: bool,
    metrics_on_main: bool,
    /// Shared Redis connection, when configured.
    redis: Option<RedisConn>,
    policies_dir: PathBuf,
    /// Version of the set in this replica's own directory at start.
    directory_version: alloy::primitives::B256,
    request_seq: AtomicU64,
    /// What `/metrics` last read of the policy-wide budgets, and when (it asks for no
    /// credential: a scrape flood costs Redis at most one read per budget every
    /// [`BUDGETS_SCRAPE_MAX_AGE`]).
    budgets_scraped: tokio::sync::Mutex<Option<(std::time::Instant, Budgets)>>,
}

/// `(policy, chain, resource, remaining)` of each policy-wide budget (`Scrape::budgets`).
type Budgets = Vec<(String, u64, &'static str, u64)>;

/// Longest `/metrics` shows the budgets it read before reading them again.
const BUDGETS_SCRAPE_MAX_AGE: Duration = Duration::from_secs(5);

/// One chain's settlement watcher, as `/readyz` and the metrics report it.
#[derive(Debug)]
struct WatcherHealth {
    chain_id: u64,
    ok_at: AtomicU64,
    max_lag: AtomicU64,
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
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
    /// Redis could not be reached.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl AppState {
    /// Load the signer and the policies named by `config`, and connect the session store.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        config.check_entry_points().map_err(StartupError::Config)?;
        let signer = Signer::load(config.signer.clone())?;
        let sources = read_dir_sources(&config.policies_dir).map_err(StartupError::Policies)?;
        let policies =
            load_sources(&config.policies_dir, sources.clone()).map_err(StartupError::Policies)?;
        let mut seed = [0u8; 8];
        // Request ids only correlate logs: a clock seed is enough if the OS RNG fails.
        if getrandom::fill(&mut seed).is_err() {
            seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .to_be_bytes();
        }
        let redis = match &config.redis_url {
            None => None,
            Some(url) => Some(session::redis::connect(url, config.redis_timeout).await?),
        };
        let (sessions, ledger) = match &redis {
            None => (
                SessionStore::Memory(MemorySessions::new()),
                Ledger::Memory(MemoryLedger::new()),
            ),
            Some(conn) => {
                let mut ledger = RedisLedger::connect(conn.clone()).await?;
                if let (Some(wait), Some(url)) = (config.redis_wait, &config.redis_url) {
                    // A connection of their own for the calls that wait for replicas.
                    let waited = session::redis::connect(url, config.redis_timeout).await?;
                    ledger = ledger.with_replica_wait(wait, waited);
                }
                (
                    SessionStore::Redis(
                        RedisSessions::new(conn.clone()).with_copies(config.session_copies),
                    ),
                    Ledger::Redis(ledger),
                )
            }
        };
        // With Redis, every replica serves the published set. This replica's valid directory
        // becomes it only if none is published yet, or when told to (`--publish-policies`, as
        // `policies push` would): a replica started with an older directory must not revert a
        // push for the whole cluster. A directory that differs is reported on /readyz.
        let directory_version = policies.version();
        let mut policies = policies;
        if let Some(conn) = &redis {
            let current = if config.publish_policies {
                publish::push(conn, directory_version, &sources).await?;
                directory_version
            } else {
                publish::push_if_none(conn, directory_version, &sources).await?
            };
            if current != directory_version {
                let published = publish::fetch(conn, current).await?.ok_or_else(|| {
                    StartupError::Config(format!("published policy set {current} is missing"))
                })?;
                policies =
                    load_sources(Path::new("redis"), published).map_err(StartupError::Policies)?;
                tracing::warn!(published = %current, directory = %directory_version, "the policy directory differs from the published set: serving the published set (see /readyz; --publish-policies or `policies push` to publish the directory)");
            }
        }
        // Before signing under a policy: every replica's watcher then settles its reservations.
        ledger
            .serve_policies(&policies.ids(), policies.longest_validity(), unix_now())
            .await?;
        let mut bundlers = Vec::new();
        for chain in &config.chains {
            if let Some(url) = &chain.bundler_url {
                let client = crate::chain::client::json_rpc(
                    url,
                    &format!(
                        "the bundler_url (--bundler-url) of chain {}",
                        chain.chain_id
                    ),
                )
                .map_err(StartupError::Config)?;
                bundlers.push((chain.chain_id, client, EstimateSlots::new()));
            }
        }
        let sponsor = Sponsor::new(
            config
                .chains
                .iter()
                .map(|c| (c.chain_id, c.entry_points.clone()))
                .collect(),
            policies,
            signer,
            sessions,
            ledger,
            RateLimits::new(config.rate_per_key),
        )
        .with_deposit_margin(config.deposit_margin);
        // Before signing for a paymaster: every replica's watcher of its chain then reads its
        // events.
        sponsor
            .serve_paymasters(&sponsor.policies(), unix_now())
            .await?;
        Ok(Self {
            sponsor,
            sponsor_name: config.sponsor_name.clone(),
            max_body_bytes: config.max_body_bytes,
            api_keys: ApiKeys::new(config.api_keys.clone()),
            watchers: config
                .chains
                .iter()
                .map(|c| WatcherHealth {
                    chain_id: c.chain_id,
                    ok_at: AtomicU64::new(0),
                    max_lag: AtomicU64::new(0),
                })
                .collect(),
            bundler_timeout: config.bundler_timeout,
            bundlers,
            admin_token_sha256: config.admin_token_sha256,
            admin_keys: crate::apikey::ApiKeys::new(config.admin_keys.clone()),
            tenant_default_max_sessions: config.tenant_default_max_sessions,
            admin_on_main: config.admin_on_main,
            metrics_on_main: config.metrics_on_main,
            redis,
            policies_dir: config.policies_dir.clone(),
            directory_version,
            request_seq: AtomicU64::new(u64::from_be_bytes(seed) >> 16),
            budgets_scraped: tokio::sync::Mutex::new(None),
        })
    }

    /// A fresh id for one HTTP request, in every log line about it and in internal errors.
    pub fn next_request_id(&self) -> String {
        format!("{:012x}", self.request_seq.fetch_add(1, Ordering::Relaxed))
    }
}

impl AppState {
    /// Run `step` with this state every `every`, in a task of its own (a tick missed is run
    /// late, not twice).
    fn spawn_every<F, Fut>(
        self: &Arc<Self>,
        every: Duration,
        step: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let state = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                step(Arc::clone(&state)).await;
            }
        })
    }

    /// Keep the policy set in step: poll the published version in Redis (every replica then
    /// serves the same set), or the policy directory under the embedded default. A set that
    /// does not load completely never replaces the working one.
    pub fn spawn_policy_watcher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        self.spawn_every(every, |state| async move { state.refresh_policies().await })
    }

    /// Read again, every `every`, what the ledger's Redis allows: whether a replica of 0.3.0
    /// may run on it (records under sessions are then written by key:
    /// `RedisLedger::refresh_record_kind`), whether one of an earlier version than 0.3.11 may
    /// (new session grants then keep a budget key of their own, the same call), and whether it
    /// would evict keys when full (reservations are then refused:
    /// `RedisLedger::refresh_eviction`).
    pub fn spawn_ledger_watcher(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        self.spawn_every(every, |state| async move {
            let ledger = state.sponsor.ledger();
            ledger.refresh_record_kind().await;
            ledger.refresh_eviction().await;
        })
    }

    /// With sessions in Redis, read the revocation feed every `every`, so that this replica's
    /// copies of grants may be served past [`session::cache::MAX_AGE`] (`session::cache`).
    /// Logged when reads start failing (copies then fall back to that age) and when they
    /// recover.
    pub fn spawn_revocation_follower(
        self: &Arc<Self>,
        every: Duration,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !matches!(self.sponsor.sessions(), SessionStore::Redis(_)) {
            return None;
        }
        let failing = Arc::new(AtomicBool::new(false));
        Some(self.spawn_every(every, move |state| {
            let failing = Arc::clone(&failing);
            async move {
                let SessionStore::Redis(sessions) = state.sponsor.sessions() else {
                    return;
                };
                match sessions.follow_revocations().await {
                    Ok(_) => {
                        if failing.swap(false, Ordering::Relaxed) {
                            tracing::info!("the revocation feed is read again");
                        }
                    }
                    Err(e) => {
                        if !failing.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                error = %e,
                                "cannot follow the revocation feed: copies of grants are served for {} s at most until it is read again",
                                session::cache::MAX_AGE.as_secs()
                            );
                        }
                    }
                }
            }
        }))
    }

    /// Forget rate-limit keys that are whole again, every `every` (bounds their memory).
    pub fn spawn_rate_limit_eviction(
        self: &Arc<Self>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_every(every, |state| async move {
            state.sponsor.limits().evict_stale()
        })
    }

    /// Whether this replica serves a published set other than its own directory's (with Redis;
    /// without, the directory is the set).
    pub fn directory_differs(&self) -> bool {
        self.redis.is_some() && self.sponsor.policies().version() != self.directory_version
    }

    /// The shared Redis connection, when configured.
    pub fn redis(&self) -> Option<&RedisConn> {
        self.redis.as_ref()
    }

    /// Poll `watcher` every `every`, forever. A failed poll is retried with backoff (doubling
    /// up to a minute) and logged when it starts failing, then at 2, 4, 8… failures, and when it
    /// recovers; reservations stay at their worst case meanwhile, never under-counted.
    /// Sponsorship does not need the chain, so a lagging watcher never makes this replica
    /// unready: `/readyz` and `sp_watcher_lag_seconds` report it.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        watcher: Watcher,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let state = Arc::clone(self);
        let chain_id = watcher.chain_id();
        let slot = self.watchers.iter().position(|w| w.chain_id == chain_id);
        if slot.is_none() {
            tracing::warn!(
                chain_id,
                "a watcher of a chain this service does not serve: /readyz will not report it"
            );
        }
        // Reported as lagging when no poll succeeded for ten intervals (at least a second).
        if let Some(w) = slot.map(|i| &self.watchers[i]) {
            w.max_lag
                .store(every.saturating_mul(10).as_secs().max(1), Ordering::Relaxed);
            w.ok_at.store(unix_now(), Ordering::Relaxed);
        }
        let span = tracing::info_span!("watcher", chain_id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let mut failures: u32 = 0;
                loop {
                    let polled = watcher.poll_once(&state.sponsor).await;
                    let metrics = state.sponsor.metrics();
                    match polled {
                        Ok(p) => {
                            if let Some(w) = slot.map(|i| &state.watchers[i]) {
                                w.ok_at.store(unix_now(), Ordering::Relaxed);
                            }
                            if failures > 0 {
                                tracing::info!(chain_id, failures, "settlement watcher recovered");
                            }
                            failures = 0;
                            metrics.watcher_ignored(p.ignored);
                            if p.ignored > 0 {
                                tracing::warn!(
                                    chain_id,
                                    events = p.ignored,
                                    block = p.to_block,
                                    "events of our paymaster matched no open reservation"
                                );
                            }
                            if p.settled + p.superseded + p.released > 0 {
                                tracing::info!(
                                    chain_id,
                                    block = p.to_block,
                                    settled = p.settled,
                                    superseded = p.superseded,
                                    released = p.released,
                                    "settlement"
                                );
                            }
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            metrics.watcher_failed();
                            if failures.is_power_of_two() {
                                tracing::warn!(chain_id, error = %e, failures, "settlement watcher poll failed; backing off");
                            }
                        }
                    }
                    tokio::time::sleep(watcher_delay(every, failures)).await;
                }
            },
            span,
        ))
    }

    /// One poll of the policy source (see [`Self::spawn_policy_watcher`]).
    pub async fn refresh_policies(&self) {
        let live = self.sponsor.live_policies();
        let current = live.current().version();
        match &self.redis {
            None => match read_dir_sources(&self.policies_dir) {
                // Back to the set in force (e.g. a broken edit undone): nothing is refused any more.
                Ok(sources) if version_of(&sources) == current => live.clear_error(),
                Ok(sources) => {
                    live.offer(load_sources(&self.policies_dir, sources));
                }
                Err(e) => {
                    live.offer(Err(e));
                }
            },
            Some(conn) => {
                // Noted on every poll, whatever the chain does: a policy no replica noted for a
                // day leaves the watchers once it has nothing open (Ledger::retire_policies);
                // the paymasters, as signing until the set's longest validity from now (without
                // it for the grace hour, this replica stops signing). Each is tried whatever the
                // other did (on a Cluster their keys live on different nodes), and neither
                // stops a new set from being fetched.
                if let Err(e) = self
                    .sponsor
                    .ledger()
                    .serve_policies(
                        &live.current().ids(),
                        live.current().longest_validity(),
                        unix_now(),
                    )
                    .await
                {
                    tracing::warn!(error = %e, "cannot note this replica's policies as served");
                }
                if let Err(e) = self
                    .sponsor
                    .serve_paymasters(&live.current(), unix_now())
                    .await
                {
                    tracing::warn!(error = %e, "cannot note this replica's paymasters as served");
                }
                let published = match publish::current_version(conn).await {
                    Ok(Some(v)) if v != current => v,
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the published policy version");
                        return;
                    }
                };
                match publish::fetch(conn, published).await {
                    Ok(Some(sources)) => {
                        let loaded = load_sources(Path::new("redis"), sources);
                        // Its policies noted as served before this replica signs under them
                        // (every watcher then settles their reservations); not noted, the set
                        // waits a poll. Its paymasters as signing for as long as its validity:
                        // not noted, signatures that would outlast the last note are refused.
                        if let Ok(set) = &loaded {
                            if let Err(e) = self
                                .sponsor
                                .ledger()
                                .serve_policies(&set.ids(), set.longest_validity(), unix_now())
                                .await
                            {
                                tracing::warn!(error = %e, version = %published, "cannot note the published policy set's policies as served: it waits for the next poll");
                                return;
                            }
                            if let Err(e) = self.sponsor.serve_paymasters(set, unix_now()).await {
                                tracing::warn!(error = %e, version = %published, "cannot note this replica's paymasters for the published set");
                            }
                        }
                        live.offer(loaded);
                    }
                    Ok(None) => {
                        tracing::warn!(version = %published, "published policy set is missing")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot fetch the published policy set"),
                }
            }
        }
    }

    /// `/readyz`: Redis reachable (when configured), the policy set in force and whether one
    /// was refused, per chain whether the paymasters' last note covers what this replica signs,
    /// the signer.
    async fn readiness(&self) -> (bool, Value) {
        let redis = match &self.redis {
            None => json!("not configured"),
            Some(conn) => {
                let mut conn = conn.clone();
                match redis::cmd("PING").query_async::<String>(&mut conn).await {
                    Ok(_) => json!("ok"),
                    // Redis' error names nodes, addresses and TLS settings, and this
                    // endpoint asks for no credential: logged, not shown.
                    Err(e) => {
                        tracing::warn!(error = %e, "readiness: Redis unreachable");
                        json!("unreachable")
                    }
                }
            }
        };
        // Reported, never failing readiness: sponsorship does not need the chain, and a chain
        // RPC outage must not take every replica out of service.
        let health = |w: &WatcherHealth| {
            let ok_at = w.ok_at.load(Ordering::Relaxed);
            if ok_at == 0 {
                json!("not configured")
            } else {
                let ago = unix_now().saturating_sub(ok_at);
                json!({ "lastSuccessSecsAgo": ago, "lagging": ago > w.max_lag.load(Ordering::Relaxed) })
            }
        };
        // One chain: its watcher; several: one per chain id.
        let watcher = match self.watchers.as_slice() {
            [one] => health(one),
            many => Value::Object(
                many.iter()
                    .map(|w| (w.chain_id.to_string(), health(w)))
                    .collect(),
            ),
        };
        let set = self.sponsor.policies();
        // Reported, never failing readiness: signing stops where the paymasters' last note does
        // not cover a signature's validity (`Sponsor::serve_paymasters`), but every replica
        // notes the same key, so its node down would take them all out of service at once,
        // stubs and the other chains with them.
        let signs_until = unix_now().saturating_add(set.longest_validity());
        let paymasters_noted: serde_json::Map<String, Value> = self
            .sponsor
            .chains()
            .iter()
            .map(|c| {
                (
                    c.chain_id.to_string(),
                    json!(c.paymasters_noted_until() >= signs_until),
                )
            })
            .collect();
        let ready = !redis.as_str().is_some_and(|s| s.starts_with("unreachable"));
        // Reported, never failing readiness: reservations are refused while Redis would evict
        // keys, or has (`RedisLedger::refresh_eviction`), on every replica alike, but policies
        // without budgets, session status and the admin API (revocations) still work.
        let redis = if redis == "ok" && self.sponsor.ledger().refusing_for_eviction() {
            json!("evicts keys")
        } else {
            redis
        };
        // Whether a set was refused, not why, and no policy's id: the errors name policies,
        // rules and addresses of every tenant, and this endpoint asks for no credential (the
        // log and `GET /admin/policies` have them). Each field is listed here on purpose.
        let policies = json!({
            "version": set.version(),
            "count": set.len(),
            "refusedSet": self.sponsor.live_policies().last_error().is_some(),
            "directoryVersion": self.directory_version,
            "directoryDiffers": self.directory_differs(),
        });
        (
            ready,
            json!({
                "ready": ready,
                "redis": redis,
                "policies": policies,
                "paymastersNoted": paymasters_noted,
                "signer": self.sponsor.signer().address(),
                "watcher": watcher,
            }),
        )
    }

    /// `GET /admin/policies`: the policy set in force, its ids, and the errors of the last set
    /// refused since (null when none; `/readyz` says only whether there are any).
    pub(crate) fn policy_status(&self) -> Value {
        let set = self.sponsor.policies();
        json!({
            "version": set.version(),
            "count": set.len(),
            "ids": set.ids(),
            "refusedErrors": self.sponsor.live_policies().last_error(),
            "directoryVersion": self.directory_version,
            "directoryDiffers": self.directory_differs(),
        })
    }
}

/// The wait before the next watcher poll: `every`, doubled per consecutive failure up to a
/// minute (or `every`, if longer).
fn watcher_delay(every: Duration, failures: u32) -> Duration {
    let cap = every.max(Duration::from_secs(60));
    every.saturating_mul(1 << failures.min(16)).min(cap)
}

/// What is left of each policy-wide budget in its current window (a store failure leaves the
/// series out rather than failing the scrape).
async fn read_budgets(sponsor: &Sponsor, policies: &crate::policy::PolicySet, now: u64) -> Budgets {
    let mut budgets = Vec::new();
    let served: Vec<u64> = sponsor.chains().iter().map(|c| c.chain_id).collect();
    let mut pairs = Vec::new();
    for policy in policies.iter() {
        for &chain in served.iter().filter(|c| policy.chains.contains(c)) {
            pairs.push((policy, chain));
        }
    }
    for (policy, chain) in pairs {
        let scopes = Sponsor::scopes(policy, None, alloy::primitives::Address::ZERO, chain, now);
        for scope in scopes.iter().filter(|s| s.name.starts_with("policy")) {
            let Ok((cost, ops)) = sponsor.ledger().usage(&policy.id, &scope.name).await else {
                continue;
            };
            if let Some(limit) = scope.cost_limit {
                budgets.push((
                    policy.id.clone(),
                    chain,
                    "costGwei",
                    limit.saturating_sub(cost),
                ));
            }
            if let Some(limit) = scope.ops_limit {
                budgets.push((policy.id.clone(), chain, "ops", limit.saturating_sub(ops)));
            }
        }
    }
    budgets
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let sponsor = &state.sponsor;
    let policies = sponsor.policies();
    let now = unix_now();
    // One scrape reads the budgets at a time, the others wait for it and show what it read.
    let budgets = {
        let mut scraped = state.budgets_scraped.lock().await;
        match &*scraped {
            Some((at, budgets)) if at.elapsed() < BUDGETS_SCRAPE_MAX_AGE => budgets.clone(),
            _ => {
                let budgets = read_budgets(sponsor, &policies, now).await;
                *scraped = Some((std::time::Instant::now(), budgets.clone()));
                budgets
            }
        }
    };
    // The most lagging chain's.
    let watcher_lag = state
        .watchers
        .iter()
        .map(|w| w.ok_at.load(Ordering::Relaxed))
        .filter(|&ok_at| ok_at != 0)
        .map(|ok_at| now.saturating_sub(ok_at))
        .max();
    let text = sponsor.metrics().render(&Scrape {
        policies: policies.len(),
        rate_limit_keys: sponsor.limits().len(),
        watcher_lag,
        budgets,
        directory_differs: state.directory_differs(),
        refusing_for_eviction: sponsor.ledger().refusing_for_eviction(),
        ledger_calls: sponsor.ledger().call_counts(),
        revocations_followed: match sponsor.sessions() {
            SessionStore::Redis(sessions) => Some(sessions.follows_revocations()),
            SessionStore::Memory(_) => None,
        },
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (ready, body) = state.readiness().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// The whole HTTP surface: JSON-RPC, health, and the admin API unless it has its own listener.
pub fn router(state: Arc<AppState>) -> Router {
    let router = Router::new()
        // The handler enforces its own (JSON-RPC shaped) limit.
        .route("/", post(rpc::handle).layer(DefaultBodyLimit::disable()))
        // One URL per chain (clients configured per chain): `/8453`, `/rpc/8453`.
        .route(
            "/{chain}",
            post(rpc::handle_chain).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/rpc/{chain}",
            post(rpc::handle_chain).layer(DefaultBodyLimit::disable()),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let router = if state.metrics_on_main {
        router.merge(metrics_routes())
    } else {
        router
    };
    let router = if state.admin_on_main {
        router.merge(admin::router(state.clone()))
    } else {
        router
    };
    router.with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

/// `/metrics`, which asks for no credential.
fn metrics_routes() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

/// The admin API alone, for its own listener (`--admin-listen`); `with_metrics`: `/metrics`
/// and `/healthz` too (`--metrics-listen` at the same address). Those are merged after the
/// admin routes took their authentication layer, so they ask for no credential.
pub fn admin_router(state: Arc<AppState>, with_metrics: bool) -> Router {
    let router = admin::router(state.clone());
    let router = if with_metrics {
        router
            .merge(metrics_routes())
            .route("/healthz", get(healthz))
    } else {
        router
    };
    router.with_state(state)
}

/// `/metrics` (and `/healthz`, for the probes of that address) alone, for their own listener
/// (`--metrics-listen`).
pub fn metrics_router(state: Arc<AppState>) -> Router {
    metrics_routes()
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Whether this process's heap gets transparent huge pages: the kernel gives them to every
/// mapping (`thp_enabled`, `/sys/kernel/mm/transparent_hugepage/enabled`, reads `[always]`)
/// and mimalloc's `MIMALLOC_ALLOW_THP` (`allow_thp`) does not turn them off. mimalloc, built
/// with `no_thp`, no longer asks for them; under `always` they come anyway, and a huge-page
/// fault stalls every request behind it (docs/performance.md).
pub fn heap_gets_huge_pages(thp_enabled: &str, allow_thp: Option<&str>) -> bool {
    // As mimalloc reads an option: 0, false, no or off in any case, or a number that is 0,
    // turn it off; anything else (spaces around a word included) leaves it on.
    let off = allow_thp.is_some_and(|v| {
        ["0", "false", "no", "off"]
            .iter()
            .any(|o| v.eq_ignore_ascii_case(o))
            || v.trim_start().parse::<i64>() == Ok(0)
    });
    thp_enabled.contains("[always]") && !off
}

/// `session-paymaster healthcheck`, the container's HEALTHCHECK: `GET /healthz` of the service
/// listening on `addr` (an unspecified address probed on loopback) over a plain socket, every
/// step bounded to 3 s: `Ok` on a 200, else what failed.
pub fn healthcheck(mut addr: std::net::SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};

    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let limit = std::time::Duration::from_secs(3);
    let mut stream =
        TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(limit))
        .and_then(|()| stream.set_write_timeout(Some(limit)))
        .and_then(|()| {
            stream
                .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        })
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let status_line = status_line.lines().next().unwrap_or_default();
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!("{addr}/healthz answered {status_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::heap_gets_huge_pages;

    #[test]
    fn huge_pages_are_flagged_only_under_always_without_the_opt_out() {
        let always = "[always] madvise never\n";
        let madvise = "always [madvise] never\n";
        assert!(heap_gets_huge_pages(always, None));
        assert!(heap_gets_huge_pages(always, Some("1")));
        assert!(heap_gets_huge_pages(always, Some("")));
        for off in ["0", "false", "OFF", "No", "00", " 0"] {
            assert!(!heap_gets_huge_pages(always, Some(off)), "{off}");
        }
        // mimalloc does not trim a word: " no " is an invalid value, and THP stays on.
        assert!(heap_gets_huge_pages(always, Some(" no ")));
        assert!(!heap_gets_huge_pages(madvise, None));
        assert!(!heap_gets_huge_pages("always madvise [never]", None));
        // No THP support in the kernel: the file is missing, read as empty.
        assert!(!heap_gets_huge_pages("", None));
    }
}
