//! Service configuration: command-line flags, each with an `SP_*` environment variable and a
//! default that runs the embedded development setup (docs/operations.md lists them all).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use alloy::primitives::{Address, B256};
use clap::Args;

use crate::apikey::ApiKey;
use crate::policy::Rate;
use crate::signer::KeySource;
use crate::userop::EntryPointVersion;

/// `--tenant-default-max-sessions`' default: the example `max_sessions` of docs/policies.md,
/// which also says what a tenant may store under it.
pub const TENANT_DEFAULT_MAX_SESSIONS: u64 = 10_000;

/// `--session-copies`' default: the grant copies each replica kept before it was a setting.
pub const DEFAULT_SESSION_COPIES: usize = crate::session::cache::CAPACITY;

/// `--session-copies`' most: a generation of copies is one map, grown and freed whole
/// (`session::cache`), under the lock every sponsorship's grant lookup takes.
pub const MAX_SESSION_COPIES: usize = 10_000_000;

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML, keys named like the flags: `chain_id = 8453`). Default:
    /// `session-paymaster.toml` in the working directory, if present. Precedence: defaults <
    /// file < `SP_*` environment < flags.
    #[arg(long, env = "SP_CONFIG")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Address to listen on for JSON-RPC.
    #[arg(long, env = "SP_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Chain id this instance sponsors on (single-chain form; see `--chain`).
    #[arg(long, env = "SP_CHAIN_ID", default_value_t = 31337)]
    pub chain_id: u64,

    /// Serve several chains: one per flag (the configuration file's `[[chains]]` tables), a
    /// JSON object `{"chain_id": 8453, "paymaster_v07": "0x…", "rpc_url": "…"}` with the keys
    /// of the single-chain settings it replaces (`chain_id`, `entry_point_v07`…`v09`,
    /// `paymaster_v07`…`v09`, `rpc_url`, `bundler_url`). Clients name the chain by path
    /// (`POST /{chainId}`, `/rpc/{chainId}`) or by ERC-7677's `chainId`.
    #[arg(
        long = "chain",
        value_parser = parse_chain,
        conflicts_with_all = [
            "chain_id", "entry_point_v07", "entry_point_v08", "entry_point_v09",
            "paymaster_v07", "paymaster_v08", "paymaster_v09", "rpc_url", "bundler_url",
        ],
    )]
    pub chains: Vec<ChainArg>,

    /// EntryPoint v0.7 address.
    #[arg(long, env = "SP_ENTRY_POINT_V07", default_value_t = EntryPointVersion::V0_7.canonical_address())]
    pub entry_point_v07: Address,

    /// EntryPoint v0.8 address.
    #[arg(long, env = "SP_ENTRY_POINT_V08", default_value_t = EntryPointVersion::V0_8.canonical_address())]
    pub entry_point_v08: Address,

    /// EntryPoint v0.9 address (the canonical v0.9.0 one by default; a chain may run another
    /// build, e.g. 0.9.0-rc.1 on a local stack: docs/operations.md).
    #[arg(long, env = "SP_ENTRY_POINT_V09", default_value_t = EntryPointVersion::V0_9.canonical_address())]
    pub entry_point_v09: Address,

    /// SessionPaymaster deployed for the v0.7 EntryPoint (without it, v0.7 requests are refused).
    #[arg(long, env = "SP_PAYMASTER_V07")]
    pub paymaster_v07: Option<Address>,

    /// SessionPaymaster deployed for the v0.8 EntryPoint (without it, v0.8 requests are refused).
    #[arg(long, env = "SP_PAYMASTER_V08")]
    pub paymaster_v08: Option<Address>,

    /// SessionPaymaster deployed for the v0.9 EntryPoint (without it, v0.9 requests are refused).
    #[arg(long, env = "SP_PAYMASTER_V09")]
    pub paymaster_v09: Option<Address>,

    /// File holding the signer's private key as hex (see `keygen`).
    #[arg(long, env = "SP_SIGNER_KEY_FILE", conflicts_with = "signer_key_env")]
    pub signer_key_file: Option<PathBuf>,

    /// Name of an environment variable holding the signer's private key as hex.
    #[arg(long, env = "SP_SIGNER_KEY_ENV")]
    pub signer_key_env: Option<String>,

    /// Directory of policy files (`*.toml`).
    #[arg(long, env = "SP_POLICIES", default_value = "policies")]
    pub policies: PathBuf,

    /// Sponsor name shown to wallets (ERC-7677 `sponsor.name`).
    #[arg(long, env = "SP_SPONSOR_NAME", default_value = "session-paymaster")]
    pub sponsor_name: String,

    /// Redis URL for session grants (e.g. `redis://127.0.0.1:6379`). Without it, sessions live
    /// in this process only (development).
    #[arg(long, env = "SP_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis connect and response timeout; slower answers fail the request closed.
    #[arg(long, env = "SP_REDIS_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Replicas of Redis that must acknowledge each reservation call and each revocation
    /// (`WAIT`) before the service signs or answers: a failover then loses none of them (see
    /// docs/operations.md, "Redis failover"). 0, the default, waits for none.
    #[arg(long, env = "SP_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// How long a reservation call or revocation waits for those replicas; then it fails
    /// closed (`-32004`, the admin API's 503). Below `--redis-timeout`.
    #[arg(long, env = "SP_REDIS_WAIT_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub redis_wait_timeout: Duration,

    /// With Redis: most session grants each replica keeps copies of (those it read for
    /// sponsorships and those it created), so that their sponsorships skip the grant's read
    /// from Redis; about 4 KiB of memory a copy at most on average (usual grants take a few
    /// hundred bytes). Raise it toward the sessions a replica serves within 5 minutes
    /// (docs/operations.md). At most 10,000,000.
    #[arg(long, env = "SP_SESSION_COPIES", default_value_t = DEFAULT_SESSION_COPIES,
        value_parser = parse_session_copies)]
    pub session_copies: usize,

    /// SHA-256 (hex) of the admin API bearer token (see `admin-token`). Without it the admin
    /// API answers 401 to everything.
    #[arg(long, env = "SP_ADMIN_TOKEN_SHA256")]
    pub admin_token_sha256: Option<B256>,

    /// A tenant's admin key: `name:sha256hex:policy,policy` (see `admin-token --name
    /// --policies`): the admin API's sessions of those policies only, no policy status. Repeat
    /// for more, or separate them with `;` in the environment.
    #[arg(long = "admin-key", env = "SP_ADMIN_KEYS", value_delimiter = ';')]
    pub admin_keys: Vec<ApiKey>,

    /// The `max_sessions` a tenant's admin key meets under a policy that sets none: it creates
    /// a grant there only while the policy has fewer live grants, anyone's (the operator's and
    /// other tenants' sharing the policy count too), each policy apart. The operator's token is
    /// held only by a policy's own `max_sessions`. Without a bound one tenant could fill Redis,
    /// and a full Redis refuses every tenant's reservations (docs/policies.md: what a tenant may
    /// store under it). 0: none, as before 0.3.14.
    #[arg(long, env = "SP_TENANT_DEFAULT_MAX_SESSIONS", default_value_t = TENANT_DEFAULT_MAX_SESSIONS)]
    pub tenant_default_max_sessions: u64,

    /// Serve the admin API on this address (e.g. an internal interface) instead of the main
    /// listener.
    #[arg(long, env = "SP_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Serve `/metrics` on this address (an internal interface, or `--admin-listen`'s own)
    /// instead of the main listener: its budget gauges name every policy and what it has left,
    /// which tenants reaching the main listener should not read.
    #[arg(long, env = "SP_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How often the policy set is checked for changes (the directory, or the set published in
    /// Redis), and this replica's policies and paymasters noted for the watchers (at most 10
    /// minutes: a replica whose paymasters were not noted for the grace hour stops signing).
    #[arg(long, env = "SP_POLICY_POLL", default_value = "2s", value_parser = parse_policy_poll)]
    pub policy_poll: Duration,

    /// Chain RPC URL. With it, a watcher settles budget reservations from the paymasters'
    /// `UserOperationEvent`s and releases those that can no longer land; without it they stay
    /// counted at their worst case. Never used on the sponsorship path.
    #[arg(long, env = "SP_RPC_URL")]
    pub rpc_url: Option<String>,

    /// Blocks a log must be deep before it settles a reservation.
    #[arg(long, env = "SP_CONFIRMATIONS", default_value_t = 2)]
    pub confirmations: u64,

    /// How often the watcher polls the chain.
    #[arg(long, env = "SP_WATCH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub watch_interval: Duration,

    /// Share of each paymaster's EntryPoint deposit (per cent) kept free of open reservations:
    /// with the watcher, a sponsorship whose worst case would pass the rest is refused
    /// (`deposit_low`).
    #[arg(long, env = "SP_DEPOSIT_MARGIN", default_value_t = crate::sponsor::deposit::DEFAULT_MARGIN_PERCENT, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub deposit_margin: u64,

    /// With Redis, publish this replica's policy directory at start even when another set is
    /// published (as `policies push` would); without it, the directory is published only if
    /// nothing is, and a directory that differs is reported (`/readyz`, a metric).
    #[arg(long, env = "SP_PUBLISH_POLICIES")]
    pub publish_policies: bool,

    /// Without `--rpc-url`, serve with Redis and budgets anyway: reservations then stay counted
    /// at their worst case for good (nothing settles or releases them).
    #[arg(long, env = "SP_NO_SETTLEMENT")]
    pub no_settlement: bool,

    /// Paymaster deposits below this many wei are reported low (metric and warning).
    #[arg(long, env = "SP_LOW_DEPOSIT_WEI", default_value = "100000000000000000")]
    pub low_deposit_wei: alloy::primitives::U256,

    /// First block to read when no cursor is stored yet (default: before the oldest open
    /// reservation, or the confirmed head when none is open).
    #[arg(long, env = "SP_WATCH_FROM_BLOCK")]
    pub watch_from_block: Option<u64>,

    /// The block whose time releases reservations whose signatures expired unused: `finalized`
    /// (the node's finalized block) or a number of blocks behind the head; never a block the
    /// watcher has not read the logs of (`--confirmations`).
    #[arg(long, env = "SP_FINALITY", default_value = "finalized")]
    pub finality: crate::chain::watcher::Finality,

    /// Most blocks one `eth_getLogs` spans; halved while the node refuses, grown back after.
    #[arg(long, env = "SP_LOG_RANGE", default_value_t = crate::chain::watcher::DEFAULT_LOG_RANGE)]
    pub log_range: u64,

    /// An API key: `name:sha256hex[:policy,policy]` (see `apikey new`); repeat for more, or
    /// separate them with `;` in the environment. Without any, the service is keyless and
    /// refuses to listen anywhere but loopback.
    #[arg(long = "api-key", env = "SP_API_KEYS", value_delimiter = ';')]
    pub api_keys: Vec<ApiKey>,

    /// Most JSON-RPC calls per API key, e.g. `100/s` (per instance); unlimited when absent.
    #[arg(long, env = "SP_RATE_PER_KEY", value_parser = crate::policy::file::parse_rate)]
    pub rate_per_key: Option<Rate>,

    /// Bundler JSON-RPC URL: `pm_sponsorUserOperation` for an op without gas limits estimates
    /// them there (`eth_estimateUserOperationGas`) with our stub data, then signs.
    #[arg(long, env = "SP_BUNDLER_URL")]
    pub bundler_url: Option<String>,

    /// How long gas estimation waits for the bundler; then the request fails (nothing signed).
    #[arg(long, env = "SP_BUNDLER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub bundler_timeout: Duration,

    /// Largest JSON-RPC request body, in bytes (larger ones get a JSON-RPC error, HTTP 413).
    #[arg(long, env = "SP_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// Longest a request's headers may take to arrive, and a kept-alive connection may sit
    /// idle; then the connection is closed (1 s to 10 min).
    #[arg(long, env = "SP_HEADER_TIMEOUT", default_value = crate::server::DEFAULT_HEADER_TIMEOUT, value_parser = parse_connection_timeout)]
    pub header_timeout: Duration,

    /// Longest a request may take from its headers to its answer, its body included; then it
    /// is answered HTTP 408 (1 s to 10 min).
    #[arg(long, env = "SP_REQUEST_TIMEOUT", default_value = crate::server::DEFAULT_REQUEST_TIMEOUT, value_parser = parse_connection_timeout)]
    pub request_timeout: Duration,

    /// Most client connections open at once on the main listener (the admin listener holds at
    /// most 64; further ones wait in the kernel's backlog); lowered to fit the open-file limit.
    #[arg(long, env = "SP_MAX_CONNECTIONS", default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Log format: `text` or `json`.
    #[arg(long, env = "SP_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// One EntryPoint this instance serves, and our paymaster for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPointConfig {
    /// Protocol version.
    pub version: EntryPointVersion,
    /// EntryPoint address.
    pub address: Address,
    /// SessionPaymaster deployed for it, if any.
    pub paymaster: Option<Address>,
}

/// One chain served: its id, its EntryPoints with our paymasters, and the nodes it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainConfig {
    /// Chain id.
    pub chain_id: u64,
    /// EntryPoints served on it.
    pub entry_points: Vec<EntryPointConfig>,
    /// Its node, for the settlement watcher (never on the sponsorship path).
    pub rpc_url: Option<String>,
    /// Its bundler, for gas estimation.
    pub bundler_url: Option<String>,
}

/// What the service needs to build its state.
#[derive(Debug, Clone)]
pub struct Config {
    /// The chains served (at least one; `POST /` serves the first when it is the only one).
    pub chains: Vec<ChainConfig>,
    /// Where the signing key comes from.
    pub signer: KeySource,
    /// Policy directory.
    pub policies_dir: PathBuf,
    /// ERC-7677 sponsor name.
    pub sponsor_name: String,
    /// Largest JSON-RPC request body.
    pub max_body_bytes: usize,
    /// API keys.
    pub api_keys: Vec<ApiKey>,
    /// Per-API-key rate.
    pub rate_per_key: Option<Rate>,
    /// Share of each deposit (per cent) kept free of open reservations.
    pub deposit_margin: u64,
    /// Publish the policy directory at start even over another published set.
    pub publish_policies: bool,
    /// How long estimation waits for the bundler.
    pub bundler_timeout: Duration,
    /// Redis for session grants; `None`: in memory.
    pub redis_url: Option<String>,
    /// Redis timeout.
    pub redis_timeout: Duration,
    /// Replicas each reservation call and revocation waits for; `None`: none.
    pub redis_wait: Option<crate::ledger::redis::ReplicaWait>,
    /// Most grants each replica keeps copies of (with Redis; `--session-copies`).
    pub session_copies: usize,
    /// SHA-256 of the admin token; `None`: none (the admin API is closed without admin keys).
    pub admin_token_sha256: Option<B256>,
    /// Tenants' admin keys, each limited to its policies.
    pub admin_keys: Vec<ApiKey>,
    /// The bound on a policy's live grants that a tenant's admin key meets where the policy
    /// sets no `max_sessions` (`--tenant-default-max-sessions`); `None`: none.
    pub tenant_default_max_sessions: Option<std::num::NonZeroU64>,
    /// Whether the admin API is served on the main listener (no separate admin address).
    pub admin_on_main: bool,
    /// Whether `/metrics` is served on the main listener (no separate metrics address).
    pub metrics_on_main: bool,
}

impl Config {
    /// Each EntryPoint and each paymaster serves one version: requests name the EntryPoint by
    /// address, so two versions at one address would sign with the other version's rules.
    /// Chains are named once each.
    pub fn check_entry_points(&self) -> Result<(), String> {
        if self.chains.is_empty() {
            return Err("no chain configured".into());
        }
        for (i, c) in self.chains.iter().enumerate() {
            if self.chains[i + 1..]
                .iter()
                .any(|d| d.chain_id == c.chain_id)
            {
                return Err(format!("chain {} is configured twice", c.chain_id));
            }
            let several = self.chains.len() > 1;
            check_chain_entry_points(&c.entry_points).map_err(|e| {
                if several {
                    format!("chain {}: {e}", c.chain_id)
                } else {
                    e
                }
            })?;
        }
        Ok(())
    }
}

/// A duration from `min` to `max`, or why not.
fn bounded_duration(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!(
            "`{s}`: between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// `--header-timeout`, `--request-timeout`: a duration from 1 s to 10 minutes.
fn parse_connection_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(s, Duration::from_secs(1), Duration::from_secs(600))
}

/// `--session-copies`: 2 to [`MAX_SESSION_COPIES`].
fn parse_session_copies(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (2..=MAX_SESSION_COPIES).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}`: a count of grants from 2 to {MAX_SESSION_COPIES}"
        )),
    }
}

/// `--policy-poll`: a duration from 1 ms to 10 minutes.
fn parse_policy_poll(s: &str) -> Result<Duration, String> {
    bounded_duration(s, Duration::from_millis(1), Duration::from_secs(600)).map_err(|e| {
        format!("{e} (replicas note their paymasters for the settlement watchers on every poll)")
    })
}

/// Each EntryPoint and each paymaster of one chain serves one version.
fn check_chain_entry_points(entry_points: &[EntryPointConfig]) -> Result<(), String> {
    for (i, a) in entry_points.iter().enumerate() {
        for b in &entry_points[i + 1..] {
            let (fa, fb) = (a.version.flag_suffix(), b.version.flag_suffix());
            if a.address == b.address {
                return Err(format!(
                    "--entry-point-{fa} and --entry-point-{fb} (SP_ENTRY_POINT_{}, \
                     SP_ENTRY_POINT_{}) are both {}: one EntryPoint serves one version",
                    fa.to_uppercase(),
                    fb.to_uppercase(),
                    a.address
                ));
            }
            if let Some(pm) = a.paymaster.filter(|_| a.paymaster == b.paymaster) {
                return Err(format!(
                    "--paymaster-{fa} and --paymaster-{fb} (SP_PAYMASTER_{}, \
                     SP_PAYMASTER_{}) are both {pm}: each SessionPaymaster serves one \
                     EntryPoint",
                    fa.to_uppercase(),
                    fb.to_uppercase()
                ));
            }
        }
    }
    Ok(())
}

/// One chain of `--chain` / `[[chains]]`: the single-chain settings' keys; EntryPoints left out
/// are at their canonical addresses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChainArg {
    /// Chain id.
    pub chain_id: u64,
    /// EntryPoint v0.7 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point_v07: Option<Address>,
    /// EntryPoint v0.8 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point_v08: Option<Address>,
    /// EntryPoint v0.9 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point_v09: Option<Address>,
    /// SessionPaymaster for v0.7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paymaster_v07: Option<Address>,
    /// SessionPaymaster for v0.8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paymaster_v08: Option<Address>,
    /// SessionPaymaster for v0.9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paymaster_v09: Option<Address>,
    /// Its node, for the settlement watcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_url: Option<String>,
    /// Its bundler, for gas estimation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundler_url: Option<String>,
}

/// A node or bundler URL as `--print-config` shows it: scheme, host and port (provider keys
/// hide in credentials, path and query); all of it hidden when it has no scheme.
fn redact_url(url: &str) -> String {
    if url.contains("://") {
        crate::chain::client::redact_urls(url)
    } else {
        "***".into()
    }
}

fn parse_chain(s: &str) -> Result<ChainArg, String> {
    serde_json::from_str(s).map_err(|e| format!("a chain is a JSON object of chain settings: {e}"))
}

impl ChainArg {
    fn config(&self) -> ChainConfig {
        let ep =
            |version: EntryPointVersion, address: Option<Address>, paymaster| EntryPointConfig {
                version,
                address: address.unwrap_or(version.canonical_address()),
                paymaster,
            };
        ChainConfig {
            chain_id: self.chain_id,
            entry_points: vec![
                ep(
                    EntryPointVersion::V0_7,
                    self.entry_point_v07,
                    self.paymaster_v07,
                ),
                ep(
                    EntryPointVersion::V0_8,
                    self.entry_point_v08,
                    self.paymaster_v08,
                ),
                ep(
                    EntryPointVersion::V0_9,
                    self.entry_point_v09,
                    self.paymaster_v09,
                ),
            ],
            rpc_url: self.rpc_url.clone(),
            bundler_url: self.bundler_url.clone(),
        }
    }
}

impl From<&ServeArgs> for Config {
    fn from(args: &ServeArgs) -> Self {
        let signer = match (&args.signer_key_file, &args.signer_key_env) {
            (Some(path), _) => KeySource::File(path.clone()),
            (None, Some(var)) => KeySource::Env(var.clone()),
            (None, None) => KeySource::Ephemeral,
        };
        let chains = if args.chains.is_empty() {
            vec![
                ChainArg {
                    chain_id: args.chain_id,
                    entry_point_v07: Some(args.entry_point_v07),
                    entry_point_v08: Some(args.entry_point_v08),
                    entry_point_v09: Some(args.entry_point_v09),
                    paymaster_v07: args.paymaster_v07,
                    paymaster_v08: args.paymaster_v08,
                    paymaster_v09: args.paymaster_v09,
                    rpc_url: args.rpc_url.clone(),
                    bundler_url: args.bundler_url.clone(),
                }
                .config(),
            ]
        } else {
            args.chains.iter().map(ChainArg::config).collect()
        };
        Self {
            chains,
            signer,
            policies_dir: args.policies.clone(),
            sponsor_name: args.sponsor_name.clone(),
            max_body_bytes: args.max_body_bytes,
            api_keys: args.api_keys.clone(),
            rate_per_key: args.rate_per_key,
            deposit_margin: args.deposit_margin,
            publish_policies: args.publish_policies,
            bundler_timeout: args.bundler_timeout,
            redis_url: args.redis_url.clone(),
            redis_timeout: args.redis_timeout,
            redis_wait: (args.redis_wait_replicas > 0).then_some(
                crate::ledger::redis::ReplicaWait {
                    replicas: args.redis_wait_replicas,
                    timeout: args.redis_wait_timeout,
                },
            ),
            session_copies: args.session_copies,
            admin_token_sha256: args.admin_token_sha256,
            admin_keys: args.admin_keys.clone(),
            tenant_default_max_sessions: std::num::NonZeroU64::new(
                args.tenant_default_max_sessions,
            ),
            admin_on_main: args.admin_listen.is_none(),
            metrics_on_main: args.metrics_listen.is_none(),
        }
    }
}

/// The default configuration file, read when present.
pub const DEFAULT_CONFIG_FILE: &str = "session-paymaster.toml";

/// Where `serve` listens, and `healthcheck` probes, unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4337";

/// Insert the configuration file's settings into `serve`'s command line, below the
/// environment and the flags: a key becomes `--flag value` only when neither its `SP_*`
/// variable nor the flag itself is given. Unknown keys are errors. Other commands pass through.
pub fn with_config_file(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(serve_at) = argv.iter().position(|a| a == "serve") else {
        return Ok(argv);
    };
    let user: Vec<String> = argv[serve_at + 1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let flag_value = |flag: &str| {
        user.iter()
            .position(|a| a == flag)
            .and_then(|i| user.get(i + 1).cloned())
            .or_else(|| {
                user.iter()
                    .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_owned))
            })
    };
    let path = match flag_value("--config").or_else(|| std::env::var("SP_CONFIG").ok()) {
        Some(p) => PathBuf::from(p),
        None if Path::new(DEFAULT_CONFIG_FILE).exists() => PathBuf::from(DEFAULT_CONFIG_FILE),
        None => return Ok(argv),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;

    let command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        if key == "chains" {
            // `[[chains]]` tables: one `--chain <json>` each, unless given on the command line.
            if user
                .iter()
                .any(|a| a == "--chain" || a.starts_with("--chain="))
            {
                continue;
            }
            let tables = value.as_array().ok_or_else(|| {
                format!(
                    "config file {}: `chains` must be [[chains]] tables",
                    path.display()
                )
            })?;
            for t in tables {
                let json = serde_json::to_string(t)
                    .map_err(|e| format!("config file {}: `chains`: {e}", path.display()))?;
                injected.push("--chain".into());
                injected.push(json.into());
            }
            continue;
        }
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(long.as_str()) && long != "config" && long != "print-config"
            })
            .ok_or_else(|| format!("config file {}: unknown key `{key}`", path.display()))?;
        let env_set = arg.get_env().is_some_and(|e| std::env::var_os(e).is_some());
        let flag = format!("--{long}");
        let flag_given = user
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        if env_set || flag_given {
            continue;
        }
        // A switch (`--no-settlement`) takes no value: `true` is the flag, `false` its absence.
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => injected.push(flag.into()),
                toml::Value::Boolean(false) => {}
                _ => {
                    return Err(format!(
                        "config file {}: `{key}`: expected true or false",
                        path.display()
                    ));
                }
            }
            continue;
        }
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(toml_scalar).collect::<Result<_, _>>(),
            v => toml_scalar(v).map(|s| vec![s]),
        }
        .map_err(|e| format!("config file {}: `{key}`: {e}", path.display()))?;
        for v in values {
            injected.push(flag.clone().into());
            injected.push(v.into());
        }
    }
    let mut out = argv;
    // Right after `serve`: the user's flags come later and are distinct. (Chains and the
    // single-chain settings conflict whatever layer gives them: clap refuses the mix.)
    out.splice(serve_at + 1..serve_at + 1, injected);
    Ok(out)
}

fn toml_scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, got {}",
            other.type_str()
        )),
    }
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAt {
    /// The main listener (no `--metrics-listen`).
    Main,
    /// The admin listener (`--metrics-listen` is `--admin-listen`'s address).
    Admin,
    /// A listener of its own.
    Own(SocketAddr),
}

/// The listeners `serve` opens besides the main one, and what each serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// The admin API's own (`--admin-listen`); `None`: on the main listener.
    pub admin: Option<SocketAddr>,
    /// `/metrics`'.
    pub metrics: MetricsAt,
}

impl ServeArgs {
    /// The listeners these arguments ask for: `/metrics` joins the admin listener when
    /// `--metrics-listen` names its address (port 0 excepted: two such are two listeners).
    /// Two listeners on one port (the same address, or an unspecified one and any other) are
    /// refused here, before anything starts, rather than by a failed bind.
    pub fn listeners(&self) -> Result<Listeners, String> {
        let metrics = match self.metrics_listen {
            None => MetricsAt::Main,
            Some(m) if Some(m) == self.admin_listen && m.port() != 0 => MetricsAt::Admin,
            Some(m) => MetricsAt::Own(m),
        };
        let mut bound = vec![("--listen", self.listen)];
        bound.extend(self.admin_listen.map(|a| ("--admin-listen", a)));
        if let MetricsAt::Own(m) = metrics {
            bound.push(("--metrics-listen", m));
        }
        for (i, (flag, a)) in bound.iter().enumerate() {
            for (other, b) in &bound[..i] {
                let overlap =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if a.port() != 0 && a.port() == b.port() && overlap {
                    return Err(format!(
                        "{flag} {a} and {other} {b} would listen on one port: give each its own (--metrics-listen may be --admin-listen's address, to serve /metrics there)"
                    ));
                }
            }
        }
        Ok(Listeners {
            admin: self.admin_listen,
            metrics,
        })
    }

    /// What the clients of each listener may hold of it.
    pub fn connection_limits(&self) -> crate::server::ConnectionLimits {
        crate::server::ConnectionLimits {
            header_timeout: self.header_timeout,
            request_timeout: self.request_timeout,
            max_connections: self.max_connections as usize,
        }
    }

    /// The effective configuration as TOML, secrets masked (a Redis password), for
    /// `--print-config`: the same keys the configuration file takes.
    pub fn effective(&self) -> String {
        let mask_url = |u: &str| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}***{}", &u[..s + 3], &u[at..]),
            _ => u.to_owned(),
        };
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: toml::Value| {
            t.insert(k.to_owned(), v);
        };
        let s = |v: String| toml::Value::String(v);
        put("listen", s(self.listen.to_string()));
        if self.chains.is_empty() {
            put(
                "chain_id",
                toml::Value::Integer(i64::try_from(self.chain_id).unwrap_or(i64::MAX)),
            );
            put("entry_point_v07", s(self.entry_point_v07.to_string()));
            put("entry_point_v08", s(self.entry_point_v08.to_string()));
            put("entry_point_v09", s(self.entry_point_v09.to_string()));
            for (key, paymaster) in [
                ("paymaster_v07", self.paymaster_v07),
                ("paymaster_v08", self.paymaster_v08),
                ("paymaster_v09", self.paymaster_v09),
            ] {
                if let Some(p) = paymaster {
                    put(key, s(p.to_string()));
                }
            }
            // Node and bundler URLs carry provider keys in the path or query too.
            let redact = redact_url;
            if let Some(u) = &self.rpc_url {
                put("rpc_url", s(redact(u)));
            }
            if let Some(u) = &self.bundler_url {
                put("bundler_url", s(redact(u)));
            }
        } else {
            let tables = self.chains.iter().map(|c| {
                let redact = redact_url;
                let masked = ChainArg {
                    rpc_url: c.rpc_url.as_deref().map(redact),
                    bundler_url: c.bundler_url.as_deref().map(redact),
                    ..c.clone()
                };
                toml::Value::try_from(masked).unwrap_or(toml::Value::Table(toml::Table::new()))
            });
            put("chains", toml::Value::Array(tables.collect()));
        }
        if let Some(p) = &self.signer_key_file {
            put("signer_key_file", s(p.display().to_string()));
        }
        if let Some(v) = &self.signer_key_env {
            put("signer_key_env", s(v.clone()));
        }
        put("policies", s(self.policies.display().to_string()));
        put("sponsor_name", s(self.sponsor_name.clone()));
        if let Some(u) = &self.redis_url {
            put("redis_url", s(mask_url(u)));
        }
        put(
            "redis_timeout",
            s(humantime::format_duration(self.redis_timeout).to_string()),
        );
        if self.redis_wait_replicas > 0 {
            put(
                "redis_wait_replicas",
                toml::Value::Integer(i64::from(self.redis_wait_replicas)),
            );
            put(
                "redis_wait_timeout",
                s(humantime::format_duration(self.redis_wait_timeout).to_string()),
            );
        }
        put(
            "session_copies",
            toml::Value::Integer(i64::try_from(self.session_copies).unwrap_or(i64::MAX)),
        );
        if let Some(h) = self.admin_token_sha256 {
            put("admin_token_sha256", s(h.to_string()));
        }
        if let Some(a) = self.admin_listen {
            put("admin_listen", s(a.to_string()));
        }
        if let Some(a) = self.metrics_listen {
            put("metrics_listen", s(a.to_string()));
        }
        put(
            "policy_poll",
            s(humantime::format_duration(self.policy_poll).to_string()),
        );
        put(
            "confirmations",
            toml::Value::Integer(i64::try_from(self.confirmations).unwrap_or(i64::MAX)),
        );
        put(
            "watch_interval",
            s(humantime::format_duration(self.watch_interval).to_string()),
        );
        put("low_deposit_wei", s(self.low_deposit_wei.to_string()));
        put(
            "deposit_margin",
            toml::Value::Integer(i64::try_from(self.deposit_margin).unwrap_or(i64::MAX)),
        );
        put("no_settlement", toml::Value::Boolean(self.no_settlement));
        put(
            "publish_policies",
            toml::Value::Boolean(self.publish_policies),
        );
        put(
            "finality",
            s(match self.finality {
                crate::chain::watcher::Finality::Finalized => "finalized".to_owned(),
                crate::chain::watcher::Finality::Depth(n) => n.to_string(),
            }),
        );
        put(
            "log_range",
            toml::Value::Integer(i64::try_from(self.log_range).unwrap_or(i64::MAX)),
        );
        if let Some(b) = self.watch_from_block {
            put(
                "watch_from_block",
                toml::Value::Integer(i64::try_from(b).unwrap_or(i64::MAX)),
            );
        }
        let keys = |keys: &[ApiKey]| {
            let keys = keys.iter().map(|k| {
                let scope = k
                    .policies
                    .as_ref()
                    .map(|p| format!(":{}", p.join(",")))
                    .unwrap_or_default();
                s(format!("{}:{}{scope}", k.name, k.sha256))
            });
            toml::Value::Array(keys.collect())
        };
        put("api_key", keys(&self.api_keys));
        if !self.admin_keys.is_empty() {
            put("admin_key", keys(&self.admin_keys));
        }
        put(
            "tenant_default_max_sessions",
            toml::Value::Integer(
                i64::try_from(self.tenant_default_max_sessions).unwrap_or(i64::MAX),
            ),
        );
        if let Some(r) = self.rate_per_key {
            put(
                "rate_per_key",
                s(format!("{}/{}", r.count, humantime::format_duration(r.per))),
            );
        }
        put(
            "bundler_timeout",
            s(humantime::format_duration(self.bundler_timeout).to_string()),
        );
        put(
            "max_body_bytes",
            toml::Value::Integer(i64::try_from(self.max_body_bytes).unwrap_or(i64::MAX)),
        );
        put(
            "header_timeout",
            s(humantime::format_duration(self.header_timeout).to_string()),
        );
        put(
            "request_timeout",
            s(humantime::format_duration(self.request_timeout).to_string()),
        );
        put(
            "max_connections",
            toml::Value::Integer(i64::from(self.max_connections)),
        );
        put("log_format", s(self.log_format.clone()));
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_timeouts_are_bounded() {
        assert_eq!(parse_connection_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_connection_timeout("10m"),
            Ok(Duration::from_secs(600))
        );
        for refused in ["0s", "999ms", "11m", "never"] {
            assert!(parse_connection_timeout(refused).is_err(), "{refused}");
        }
    }

    /// `--tenant-default-max-sessions`: 10,000 unless given, and 0 is no bound at all (not a
    /// bound of none, which would refuse every tenant's create).
    #[test]
    fn the_tenants_default_bound_is_on_unless_turned_off() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let bound = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(["serve"].iter().chain(args))
                .map(|cli| Config::from(&cli.serve).tenant_default_max_sessions)
                .map_err(|e| e.to_string())
        };
        assert_eq!(bound(&[]), Ok(std::num::NonZeroU64::new(10_000)));
        assert_eq!(bound(&["--tenant-default-max-sessions", "0"]), Ok(None));
        assert_eq!(
            bound(&["--tenant-default-max-sessions", "25"]),
            Ok(std::num::NonZeroU64::new(25))
        );
        assert!(bound(&["--tenant-default-max-sessions", "-1"]).is_err());
    }

    /// `--metrics-listen` joins the admin listener at its address (not at port 0), and two
    /// listeners on one port are refused before anything starts.
    #[test]
    fn listeners_join_or_refuse_as_their_addresses_say() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let listeners = |args: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(
                ["serve", "--listen", "0.0.0.0:4337"].iter().chain(args),
            )
            .map_err(|e| e.to_string())?;
            cli.serve.listeners()
        };
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(
            listeners(&[]),
            Ok(Listeners {
                admin: None,
                metrics: MetricsAt::Main
            })
        );
        // Both side listeners given.
        let pair = |admin: &str, metrics: &str| {
            listeners(&["--admin-listen", admin, "--metrics-listen", metrics])
        };
        assert_eq!(
            pair("10.0.0.1:9000", "10.0.0.1:9000"),
            Ok(Listeners {
                admin: Some(at("10.0.0.1:9000")),
                metrics: MetricsAt::Admin
            })
        );
        for (admin, metrics) in [
            ("10.0.0.1:9000", "10.0.0.1:9464"),
            ("127.0.0.1:0", "127.0.0.1:0"),
            // Another address on another interface may share a port.
            ("10.0.0.1:9000", "10.0.0.2:9000"),
        ] {
            assert_eq!(
                pair(admin, metrics).map(|l| l.metrics),
                Ok(MetricsAt::Own(at(metrics))),
                "{admin} {metrics}"
            );
        }
        let clashes = [
            listeners(&["--metrics-listen", "0.0.0.0:4337"]),
            listeners(&["--metrics-listen", "127.0.0.1:4337"]),
            listeners(&["--admin-listen", "10.0.0.1:4337"]),
            pair("0.0.0.0:9000", "127.0.0.1:9000"),
        ];
        for (i, clash) in clashes.into_iter().enumerate() {
            let refused = clash.unwrap_err();
            assert!(
                refused.contains("would listen on one port"),
                "{i}: {refused}"
            );
        }
    }

    #[test]
    fn session_copies_are_bounded() {
        assert_eq!(parse_session_copies("2"), Ok(2));
        assert_eq!(parse_session_copies("1000000"), Ok(1_000_000));
        assert_eq!(parse_session_copies("10000000"), Ok(MAX_SESSION_COPIES));
        for refused in ["0", "1", "10000001", "-5", "1e6", ""] {
            assert!(parse_session_copies(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn policy_poll_is_bounded() {
        assert_eq!(parse_policy_poll("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_policy_poll("10m"), Ok(Duration::from_secs(600)));
        for refused in ["0s", "1ns", "11m", "2h", "soon"] {
            assert!(parse_policy_poll(refused).is_err(), "{refused}");
        }
    }
}
