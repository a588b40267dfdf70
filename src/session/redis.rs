//! Sessions in Redis, shared by every replica. A sponsorship reads its grant with one `GET`,
//! or takes this replica's recent copy of it ([`super::cache`]); a revocation is
//! seen by the next request on any replica all the same, since the ledger step reads it.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `sp:g:<session id, 32 raw bytes>` | string | the grant, packed (see [`super::codec`]); revocation rewrites its first byte. It expires [`RETAIN_SECS`](super::RETAIN_SECS) after the grant ends |
//! | `sp:ga:<first 2 bytes of keccak256(account)>` | sorted set | per grant `account ‖ createdAt ‖ expiry ‖ id` (60 bytes, scores 0: ordered by account, then creation), for listing an account's grants (a listing resumes after a member, [`ListCursor::After`]); ended grants' members leave as grants go into the bucket: among the new grant's account's 64 oldest, and among a random 64 (`index.lua`); a create that loses its id to another takes its own back |
//! | `sp:{<policy>}:grants-live` | hash | the policy's live grants (its `max_sessions`): `total`, `swept` (the last day whose ended days left it) and per UTC end day how many grants end then, at most about 3,650 days; a create reads a few fields, and once a day walks them (`live.lua`) |
//! | `sp:g:revocations` | stream | the revocation feed: an entry per revocation (field `id`, the grant's 32 bytes; `begin` marks where a first reader found it empty), kept [`REVOCATIONS_KEPT`] by Redis' clock; every replica reads it every `--policy-poll` to drop its copies of revoked grants ([`RedisSessions::follow_revocations`]) |
//!
//! About 330 bytes of Redis per grant over a million of them (`scripts/bench`,
//! docs/performance.md). Grants written by 0.1 (`sp:session:{<id>}` hashes of JSON,
//! `sp:account-sessions:<account>` sorted sets) are still read, revoked and listed (an
//! account's old grants first: they are older), at the cost of one more round trip for ids
//! unknown in the new layout, and a new grant may not take an id one of them holds;
//! docs/operations.md has the upgrade notes.
//!
//! A create: the id checked free (in both layouts) before anything is written; the grant
//! counted in its policy's live grants (`live.lua`, refused there past its bound); listed
//! under its account (`index.lua`); stored (`SET NX`). One that loses the id to another create
//! at that last step takes its listing and its count back ([`RedisSessions::undo_lost_create`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, keccak256};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use super::cache::GrantCache;
use super::{
    GrantSource, ListCursor, ListPlace, Page, RETAIN_SECS, SessionGrant, SessionStatus, StoreError,
    codec, forgotten,
};
use crate::clock::unix_now;

/// Redis-backed session store.
#[derive(Clone)]
pub struct RedisSessions {
    conn: RedisConn,
    /// The sponsorship path's copies of grants ([`super::cache`]).
    cache: Arc<GrantCache>,
    /// Where this replica has read the revocation feed to (`follow_revocations`); `None` before
    /// its first read.
    feed_place: Arc<Mutex<Option<Place>>>,
    /// Held for each read of the feed: one reader at a time (two would move the place back).
    feed_reader: Arc<tokio::sync::Mutex<()>>,
    revoke: redis::Script,
    revoke_legacy: redis::Script,
    /// revoked.lua: a revocation written to the feed.
    announce: redis::Script,
    /// follow.lua: a read of the feed.
    follow: redis::Script,
    index: redis::Script,
    /// live.lua: a new grant counted among its policy's live ones.
    live: redis::Script,
    /// A place for each create in flight, and how many there are ([`MAX_CREATES_IN_FLIGHT`]).
    creates: (Arc<tokio::sync::Semaphore>, usize),
}

/// Most creates of grants one replica has in flight. Each runs in a task of its own, which a
/// client that hangs up leaves running (`RedisSessions::create`): without a bound a flood of
/// creates whose clients leave at once would pile up tasks while Redis is slow. One more is
/// refused at once (the admin API's 503), as a store failure is. Not a setting.
pub const MAX_CREATES_IN_FLIGHT: usize = 256;

/// The revocation feed: a stream, an entry per revocation (field `id`, the grant's 32 bytes),
/// that every replica reads to drop its copies of revoked grants (`super::cache`); see
/// [`FeedEntry`].
pub const REVOCATIONS_KEY: &str = "sp:g:revocations";

/// How long the feed keeps an entry (by Redis' clock): as long as a copy may be served, and a
/// minute more.
const REVOCATIONS_KEPT: Duration =
    Duration::from_secs(super::cache::MAX_AGE_FOLLOWED.as_secs() + 60);

/// The same in milliseconds (a stream id's first part).
const REVOCATIONS_KEPT_MS: u64 = REVOCATIONS_KEPT.as_secs() * 1000;

/// Most entries the feed keeps, whatever Redis' clock does (a reader behind by more begins
/// again).
const REVOCATIONS_MAX: u64 = 100_000;

/// Entries read from the feed per round trip.
const FEED_PAGE: usize = 1024;

/// Where a replica has read the feed to: the entry, and how many entries the feed had been
/// given up to it (XINFO's `entries-added`), so that entries removed after it are seen to be.
///
/// And the run id of the Redis that answered, since one that took over (a failover, a
/// restart) may hold that entry but not all after it.
#[derive(Debug, Clone, Copy)]
struct Place {
    at: StreamId,
    counted: u64,
    run_id: RunId,
}

/// A Redis run id: 40 hex digits (`INFO server`), kept as they are.
type RunId = [u8; 40];

fn run_of(run_id: &str) -> RunId {
    let mut kept = [0; 40];
    for (k, b) in kept.iter_mut().zip(run_id.bytes()) {
        *k = b;
    }
    kept
}

/// What a read of the revocation feed found.
enum FeedRead {
    /// Its end, from which this replica now reads.
    AtEnd,
    /// Every revocation since this replica's last read, this many (their copies dropped).
    Read(usize),
    /// Not what this replica read before (emptied, behind it after a failover, an entry this
    /// service did not write) or too many revocations at once: this replica begins again at
    /// its end, and revocations before may be unknown to it.
    Lost,
}

/// A stream entry's id, `<ms>-<seq>`, in the order Redis gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId {
    ms: u64,
    seq: u64,
}

impl StreamId {
    /// Below every entry: an empty feed's end.
    const ZERO: Self = Self { ms: 0, seq: 0 };

    fn parse(s: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(s).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// An entry of the revocation feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeedEntry {
    /// A revocation (field `id`: the grant's 32 bytes).
    Revoked(B256),
    /// Written by the first replica to follow an empty feed (field `begin`), so that a feed
    /// emptied later (a Redis restarted without persistence, flushed) is below every place read.
    Marker,
    /// Neither: not written by this service.
    Unknown,
}

/// The entries of an `XRANGE` or `XREVRANGE` answer, each with its id.
fn stream_entries(v: &redis::Value) -> Result<Vec<(StreamId, FeedEntry)>, StoreError> {
    use redis::Value;
    let malformed =
        || StoreError::Unavailable("the revocation feed answered a malformed reply".into());
    let entries = match v {
        Value::Array(entries) => entries,
        Value::Nil => return Ok(Vec::new()),
        _ => return Err(malformed()),
    };
    entries
        .iter()
        .map(|entry| {
            let Value::Array(parts) = entry else {
                return Err(malformed());
            };
            let [Value::BulkString(at), fields] = parts.as_slice() else {
                return Err(malformed());
            };
            let at = StreamId::parse(at).ok_or_else(malformed)?;
            let pairs: Vec<(&Value, &Value)> = match fields {
                Value::Array(flat) => flat
                    .chunks_exact(2)
                    .map(|pair| (&pair[0], &pair[1]))
                    .collect(),
                Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
                _ => return Err(malformed()),
            };
            let entry = match pairs.as_slice() {
                [(Value::BulkString(k), Value::BulkString(v))] if k == b"id" && v.len() == 32 => {
                    FeedEntry::Revoked(B256::from_slice(v))
                }
                [(Value::BulkString(k), _)] if k == b"begin" => FeedEntry::Marker,
                _ => FeedEntry::Unknown,
            };
            Ok((at, entry))
        })
        .collect()
}

impl std::fmt::Debug for RedisSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisSessions")
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A policy's count of live grants, by the UTC day they end (live.lua).
fn live_key(policy: &str) -> String {
    format!("sp:{{{policy}}}:grants-live")
}

fn grant_key(id: B256) -> Vec<u8> {
    [b"sp:g:".as_slice(), id.as_slice()].concat()
}

/// The account's index bucket: by a hash of the account, so that addresses sharing a prefix
/// (vanity or counterfactual ones) do not crowd one bucket.
fn index_key(account: Address) -> Vec<u8> {
    [b"sp:ga:".as_slice(), &keccak256(account)[..2]].concat()
}

/// The grant's member in its account's index bucket (see the module's table): the account,
/// then the grant's place in its listing (creation, the time it is forgotten, id).
fn index_member(grant: &SessionGrant) -> Vec<u8> {
    [grant.account.as_slice(), &ListPlace::of(grant).to_bytes()].concat()
}

/// Layout before 0.2: a hash of `grant` (JSON) and `status`.
fn legacy_session_key(id: B256) -> String {
    format!("sp:session:{{{id}}}")
}

/// Layout before 0.2: a sorted set of the account's session ids by creation time.
fn legacy_account_key(account: Address) -> String {
    format!("sp:account-sessions:{account}")
}

/// The shared Redis connection: one node (reconnecting by itself) or a Cluster (commands
/// routed by key slot; every multi-key script here keeps its keys in one slot).
#[derive(Clone)]
pub enum RedisConn {
    /// A single Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Connect to Redis at `url`, or to a Cluster when `url` lists several nodes separated by
/// commas; every command fails (closed) after `timeout`. The connection is shared (cheap
/// clones) by the stores that use Redis. Redis older than 7.0 is refused: the scripts use
/// `EXPIRE … GT` (7.0), and a script that fails half-way keeps what it wrote.
pub async fn connect(url: &str, timeout: Duration) -> Result<RedisConn, StoreError> {
    let mut conn = open(url, timeout).await?;
    check_version(&info_of_every_node(&mut conn, &["server"]).await?)?;
    Ok(conn)
}

/// The keys each run of a node was seen to have evicted: a hash of the node's `run_id` (from
/// `INFO server`; a new one each start) to the highest `evicted_keys` count a check read of it.
/// Kept after the node restarts or fails over, so that what it evicted still counts until
/// acknowledged ([`EVICTIONS_ACKNOWLEDGED_KEY`]).
pub const EVICTIONS_SEEN_KEY: &str = "sp:ledger:evictions-seen";

/// Where operators acknowledge the keys a node evicted, once they checked the ledger: a hash of
/// `run_id` to exactly the count [`EVICTIONS_SEEN_KEY`] holds for it (a larger one would let
/// that many more go unseen, and is refused too).
pub const EVICTIONS_ACKNOWLEDGED_KEY: &str = "sp:ledger:evictions-acknowledged";

/// What every node of the Redis behind `conn` (a Cluster's replicas included) says of eviction:
/// read by the ledger when `serve` starts (which refuses any finding but `hidden`) and again
/// every `--policy-poll`, refusing reservations while one would evict keys or any run of a node
/// evicted keys not acknowledged (`RedisLedger::refresh_eviction`). Counts read above those
/// seen before are noted in [`EVICTIONS_SEEN_KEY`]. `Err` when `INFO` or the counts seen could
/// not be read as a whole: on a Cluster, one node unreachable fails the whole `INFO`.
pub async fn eviction(conn: &mut RedisConn) -> Result<Eviction, StoreError> {
    let info = info_of_nodes(conn, &["server", "memory", "stats"]).await?;
    let seen = counts(
        conn.hgetall(EVICTIONS_SEEN_KEY)
            .await
            .map_err(unavailable)?,
    );
    // Unreadable, nothing is acknowledged: refused rather than passed.
    let acknowledged = counts(
        conn.hgetall(EVICTIONS_ACKNOWLEDGED_KEY)
            .await
            .unwrap_or_default(),
    );
    let found = eviction_in(&info, &seen, &acknowledged);
    for (run, count) in &found.counted {
        if seen.get(run).is_none_or(|was| was < count) {
            let _: () = conn
                .hset(EVICTIONS_SEEN_KEY, run, count)
                .await
                .map_err(unavailable)?;
        }
    }
    Ok(found)
}

/// A hash of counts, as text: a value that is no count is left out (it acknowledges nothing).
fn counts(fields: HashMap<String, String>) -> HashMap<String, u64> {
    fields
        .into_iter()
        .filter_map(|(run, n)| Some((run, n.trim().parse().ok()?)))
        .collect()
}

/// What the nodes' `INFO server memory stats` answers say of eviction ([`eviction`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// Why keys would be, or were, evicted, on the first node or run found: `maxmemory` not
    /// shown as 0 with a `maxmemory-policy` other than `noeviction`, or evicted keys (a node's
    /// `evicted_keys` now, or any count seen of a run before) not acknowledged. Budget
    /// counters, reservation records and session states all have TTLs, so even a `volatile-*`
    /// policy drops them under memory pressure: costs forgotten, budgets whole again,
    /// revocations undone.
    pub why: Option<String>,
    /// A node that answered an error (loading, `INFO` refused) or a count that does not parse,
    /// or no node at all: not checked.
    pub unread: Option<String>,
    /// A node whose answer names no maxmemory policy or no evicted-key count (a managed Redis
    /// hiding them): passed on what it does show.
    pub hidden: bool,
    /// The evicted-key count above 0 of each node that answered, by `run_id`.
    pub counted: Vec<(String, u64)>,
}

/// The warning for [`Eviction::hidden`].
pub const HIDDEN_POLICY: &str = "a Redis node's INFO names no maxmemory policy or no evicted_keys: make sure it is noeviction (docs/operations.md)";

/// `INFO <sections>` of every node, errors refused ([`info_of_nodes`]).
async fn info_of_every_node(
    conn: &mut RedisConn,
    sections: &[&str],
) -> Result<redis::Value, StoreError> {
    let answers = info_of_nodes(conn, sections).await?;
    // A node that answered an error (loading, refusing the credentials) was not checked.
    if let Some(e) = node_error(&answers) {
        return Err(StoreError::Unavailable(format!(
            "a Redis node answered INFO {} with an error: {e}",
            sections.join(" ")
        )));
    }
    Ok(answers)
}

/// `INFO <sections>` of the Redis, or of every node of a Cluster, replicas included (a replica
/// becomes a primary at a failover; redis-rs routes `INFO` to the primaries alone): one answer
/// per node, by address, a node's error among them.
async fn info_of_nodes(
    conn: &mut RedisConn,
    sections: &[&str],
) -> Result<redis::Value, StoreError> {
    let mut info = redis::cmd("INFO");
    info.arg(sections);
    match conn {
        RedisConn::Single(c) => info.query_async(c).await,
        RedisConn::Cluster(c) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            c.route_command(
                info,
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None)),
            )
            .await
        }
    }
    .map_err(unavailable)
}

/// The first error a node answered among `answers` (or an answer that is no text).
fn node_error(answers: &redis::Value) -> Option<String> {
    node_answers(answers)
        .into_iter()
        .find_map(|(_, answer)| answer.err())
}

/// [`Eviction`] of the nodes' `INFO server memory stats` answers `info` holds, each judged
/// alone, with the counts `seen` of earlier runs and those `acknowledged`, by `run_id`.
fn eviction_in(
    info: &redis::Value,
    seen: &HashMap<String, u64>,
    acknowledged: &HashMap<String, u64>,
) -> Eviction {
    let mut found = Eviction::default();
    let answers = node_answers(info);
    if answers.is_empty() {
        found.unread = Some("no Redis node answered INFO".into());
    }
    let mut nodes_of_runs = HashMap::new();
    for (node, answer) in answers {
        let at = if node.is_empty() {
            String::new()
        } else {
            format!(" {node}")
        };
        let text = match answer {
            Ok(text) => text,
            Err(e) => {
                found
                    .unread
                    .get_or_insert(format!("Redis node{at} answered INFO with an error: {e}"));
                continue;
            }
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        match (field("maxmemory:"), field("maxmemory_policy:")) {
            (max, Some(policy)) if max.as_deref() != Some("0") && policy != "noeviction" => {
                let max = max.unwrap_or_else(|| "not shown".into());
                found.why.get_or_insert(format!(
                    "Redis{at} evicts keys when full (maxmemory {max}, maxmemory-policy \
                     {policy}): budget counters and reservations would be dropped and their \
                     costs forgotten; set maxmemory-policy noeviction (docs/operations.md)"
                ));
            }
            (_, Some(_)) => {}
            (_, None) => found.hidden = true,
        }
        let evicted = match field("evicted_keys:").map(|n| n.parse::<u64>()) {
            None => {
                found.hidden = true;
                continue;
            }
            Some(Err(_)) => {
                found.unread.get_or_insert(format!(
                    "Redis node{at} shows an evicted_keys that is no count"
                ));
                continue;
            }
            Some(Ok(0)) => continue,
            Some(Ok(n)) => n,
        };
        match field("run_id:").filter(|r| !r.is_empty()) {
            Some(run) => {
                nodes_of_runs.insert(run.clone(), at);
                found.counted.push((run, evicted));
            }
            None => {
                found.why.get_or_insert(format!(
                    "Redis{at} evicted {evicted} keys and shows no run_id to acknowledge them \
                     by: budget counters, reservations or revocations may be gone"
                ));
            }
        }
    }
    // Every run seen to evict, this one's count the highest read of it.
    let mut runs: std::collections::BTreeMap<&str, u64> =
        seen.iter().map(|(run, n)| (run.as_str(), *n)).collect();
    for (run, n) in &found.counted {
        let was = runs.entry(run).or_default();
        *was = (*was).max(*n);
    }
    for (run, evicted) in runs.into_iter().filter(|(_, n)| *n > 0) {
        let acked = acknowledged.get(run).copied();
        if acked == Some(evicted) {
            continue;
        }
        let at = nodes_of_runs.get(run).map_or("", String::as_str);
        let more = match acked {
            Some(acked) if acked > evicted => format!(
                " ({acked} acknowledged, more than were seen: that many more would go unseen)"
            ),
            _ => String::new(),
        };
        found.why.get_or_insert(format!(
            "Redis{at} (run {run}) evicted {evicted} keys{more}: budget counters, reservations \
             or revocations may be gone; once the ledger is checked, acknowledge exactly them: \
             HSET {EVICTIONS_ACKNOWLEDGED_KEY} {run} {evicted} (docs/operations.md)"
        ));
    }
    found
}

/// Each node's answer in `info` (one Redis: its answer, by ""; a Cluster: a map by address):
/// its text, or the error it answered.
fn node_answers(info: &redis::Value) -> Vec<(String, Result<String, String>)> {
    fn text(v: &redis::Value) -> Option<String> {
        match v {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) | redis::Value::VerbatimString { text: s, .. } => {
                Some(s.clone())
            }
            _ => None,
        }
    }
    let answer = |v: &redis::Value| match v {
        redis::Value::ServerError(e) => Err(format!("{e:?}")),
        other => text(other).ok_or_else(|| "an answer that is no text".to_owned()),
    };
    match info {
        redis::Value::Map(pairs) => pairs
            .iter()
            .map(|(node, v)| (text(node).unwrap_or_default(), answer(v)))
            .collect(),
        one => vec![(String::new(), answer(one))],
    }
}

/// The Redis 7.0 check of [`connect`], on every node's `INFO server` answer `info` holds.
fn check_version(info: &redis::Value) -> Result<(), StoreError> {
    let texts: Vec<String> = node_answers(info)
        .into_iter()
        .filter_map(|(_, answer)| answer.ok())
        .collect();
    let versions: Vec<&str> = texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .collect();
    if versions.is_empty() {
        return Err(StoreError::Unavailable(
            "INFO server named no redis_version".into(),
        ));
    }
    for v in versions {
        let major: u32 = v
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 7 {
            return Err(StoreError::Unavailable(format!(
                "Redis {v} is too old: 7.0 or later is needed (the scripts use EXPIRE GT)"
            )));
        }
    }
    Ok(())
}

/// `TCP_NODELAY` (redis-rs leaves it off): calls are pipelined on one connection, and with
/// Nagle's algorithm a call written while an earlier one is unacknowledged can wait for that
/// ACK: the reply, or the server's delayed ACK (40 ms or more on Linux).
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

async fn open(url: &str, timeout: Duration) -> Result<RedisConn, StoreError> {
    if url.contains(',') {
        let nodes: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .tcp_settings(tcp_settings())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(unavailable)?;
        return Ok(RedisConn::Cluster(
            client.get_async_connection().await.map_err(unavailable)?,
        ));
    }
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(unavailable)?;
    let client = redis::Client::open(info.set_tcp_settings(tcp_settings())).map_err(unavailable)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    Ok(RedisConn::Single(
        client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?,
    ))
}

impl RedisSessions {
    /// Sessions on `conn`.
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            cache: Arc::default(),
            feed_place: Arc::default(),
            feed_reader: Arc::default(),
            revoke: redis::Script::new(include_str!("revoke.lua")),
            revoke_legacy: redis::Script::new(include_str!("revoke_legacy.lua")),
            announce: redis::Script::new(include_str!("revoked.lua")),
            follow: redis::Script::new(include_str!("follow.lua")),
            index: redis::Script::new(include_str!("index.lua")),
            live: redis::Script::new(include_str!("live.lua")),
            creates: (
                Arc::new(tokio::sync::Semaphore::new(MAX_CREATES_IN_FLIGHT)),
                MAX_CREATES_IN_FLIGHT,
            ),
        }
    }

    /// The same, keeping copies of at most `copies` grants (`--session-copies`, at least 2;
    /// [`super::cache`]) instead of the default 65,536. Call it before cloning: clones made
    /// before keep the copies they share.
    #[must_use]
    pub fn with_copies(mut self, copies: usize) -> Self {
        self.cache = Arc::new(GrantCache::sized(copies));
        self
    }

    /// The same, with at most `n` creates in flight (tests).
    #[doc(hidden)]
    #[must_use]
    pub fn with_max_creates(mut self, n: usize) -> Self {
        self.creates = (Arc::new(tokio::sync::Semaphore::new(n)), n);
        self
    }

    /// Connect to `url` (see [`connect`]).
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self::new(connect(url, timeout).await?))
    }

    /// Stores a new grant, its policy holding at most `most` live (see the module doc), in a
    /// task of its own, awaited: a request cancelled meanwhile (its client gone, its deadline
    /// past) stops none of its steps, so it leaves nothing a Redis failure at the same step
    /// would not (a counted grant, listed or not: over, never under). At most
    /// [`MAX_CREATES_IN_FLIGHT`] at once (or [`Self::with_max_creates`]'s); one more is refused.
    pub(super) async fn create(
        &self,
        grant: &SessionGrant,
        most: Option<u64>,
    ) -> Result<super::Created, StoreError> {
        let (places, count) = &self.creates;
        let Ok(place) = Arc::clone(places).try_acquire_owned() else {
            return Err(StoreError::Unavailable(format!(
                "{count} creates of grants already in flight at this replica"
            )));
        };
        let (this, new) = (self.clone(), grant.clone());
        tokio::spawn(async move {
            // (The place is held until the task ends, however it ends: dropped with it.)
            let _place = place;
            this.create_steps(&new, most).await
        })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(session = %grant.session_id, error = %e, "a session create's task ended abnormally; what it wrote, it keeps (counted)");
                Err(StoreError::Unavailable("the create ended abnormally".into()))
            })
    }

    async fn create_steps(
        &self,
        grant: &SessionGrant,
        most: Option<u64>,
    ) -> Result<super::Created, StoreError> {
        let mut conn = self.conn.clone();
        let now = unix_now();
        let expires_at = grant.valid_until.saturating_add(RETAIN_SECS);
        // A TTL Redis takes (a `validUntil` centuries ahead is kept for a century).
        let ttl = expires_at.saturating_sub(now).clamp(1, 100 * 365 * 86_400);
        // An id taken (or held by a grant of the old layout) is refused before anything is
        // written: each refused create would otherwise leave its member in an account's index
        // until its own `validUntil` (up to ten years ahead), Redis growing without a bound by
        // requests that create nothing (found by review). One that loses a race for the id
        // below takes back what it wrote.
        // (One `EXISTS` of both keys, which counts those that exist; a Cluster's client asks
        // each key's node and adds the counts.)
        let taken: u64 = conn
            .exists(&[
                grant_key(grant.session_id),
                legacy_session_key(grant.session_id).into_bytes(),
            ])
            .await
            .map_err(unavailable)?;
        if taken > 0 {
            return Ok(super::Created::Exists);
        }
        // Counted first: a grant counted and then not stored (its id taken: given back below
        // once its member is; a failure between, or the process stopping: kept) counts over,
        // never under, so the bound covers every member written.
        let day = super::end_day(grant.valid_until);
        let (counted, live): (i64, u64) = self
            .live
            .key(live_key(&grant.policy))
            .arg("count")
            .arg(super::end_day(now))
            .arg(day)
            .arg(most.unwrap_or(0))
            .arg(ttl)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if counted != 1 {
            // (An id another create took meanwhile is taken, as the memory store answers.)
            let taken: bool = conn
                .exists(grant_key(grant.session_id))
                .await
                .map_err(unavailable)?;
            return Ok(if taken {
                super::Created::Exists
            } else {
                super::Created::Full { live }
            });
        }
        // Listed first: a member whose grant was never stored (this SET NX lost, or failed)
        // shows nothing in a listing, which shows only grants whose account and place (creation
        // time, end, id) match their member (one of a lost create is taken back below; one a
        // failure leaves stays, counted, until it ends); a grant stored but not listed would be
        // live and out of sight.
        let member = index_member(grant);
        let _: i64 = self
            .index
            .key(index_key(grant.account))
            .arg(&member)
            .arg(now)
            .arg(ttl)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // SET NX: a concurrent create of the same id loses here, and nothing is overwritten.
        let encoded = codec::encode(grant)?;
        // The copy kept below counts as read from here (`super::cache`): a revocation that
        // answers from now on either drops it or finds it overtaken.
        let ticket = self.cache.ticket(Instant::now());
        let created: Option<String> = redis::cmd("SET")
            .arg(grant_key(grant.session_id))
            .arg(&encoded)
            .arg("NX")
            .arg("EX")
            .arg(ttl)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if created.is_none() {
            // Another create took the id since the check above.
            self.undo_lost_create(grant, &member, now, day).await;
            return Ok(super::Created::Exists);
        }
        // This replica's copy is what it wrote, as a read would decode it: the session's first
        // sponsorships here skip the grant's round trip (one `GET` among every grant in Redis,
        // docs/performance.md). Kept only where the newer generation of copies has room (a
        // create does not itself drop the older); it replaces, or else drops, any copy of an
        // earlier grant of this id (its key deleted by hand).
        match codec::decode(grant.session_id, &encoded) {
            Ok(copy) => {
                self.cache
                    .insert_created(grant.session_id, Arc::new(copy), ticket);
            }
            Err(_) => self.cache.forget(grant.session_id),
        }
        Ok(super::Created::Created)
    }

    /// What a create of `grant` (at `now`, ending on UTC day `day`) wrote before it lost its id
    /// to another create, taken back: its index `member` (unless it is the winner's own, the
    /// same account, times and id, which lists that grant), then its place in the policy's
    /// count. Best effort, in that order: a member that stays (a failure, logged) keeps its
    /// count, so the policy's bound covers what it holds; a count that stays counts over, never
    /// under.
    async fn undo_lost_create(&self, grant: &SessionGrant, member: &[u8], now: u64, day: u64) {
        let mut conn = self.conn.clone();
        match self.get(grant.session_id).await {
            Ok(Some(winner)) if index_member(&winner) == member => {}
            // Another grant's, or none's (the winner gone already): this member lists nothing.
            Ok(_) => {
                let removed: redis::RedisResult<i64> =
                    conn.zrem(index_key(grant.account), member).await;
                if let Err(e) = removed {
                    tracing::warn!(session = %grant.session_id, error = %e, "cannot take back a lost create's index member; it stays, counted, until it ends");
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(session = %grant.session_id, error = %e, "cannot read the grant a create lost its id to; its index member stays, counted, until it ends");
                return;
            }
        }
        let back: redis::RedisResult<i64> = self
            .live
            .key(live_key(&grant.policy))
            .arg("back")
            .arg(super::end_day(now))
            .arg(day)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = back {
            tracing::warn!(session = %grant.session_id, error = %e, "cannot give back a lost create's place in its policy's count; it counts until its day ends");
        }
    }

    pub(super) async fn get(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        let mut conn = self.conn.clone();
        let data: Option<Vec<u8>> = conn.get(grant_key(id)).await.map_err(unavailable)?;
        let grant = match data {
            Some(data) => Some(codec::decode(id, &data)?),
            None => self.get_legacy(id).await?,
        };
        // Its key may outlive it by up to a second (a TTL is at least one).
        Ok(grant.filter(|g| !forgotten(g, unix_now())))
    }

    /// The grant with this id for a sponsorship: this replica's copy while it may be served
    /// ([`super::cache`]: 10 s, or up to 5 minutes while the revocation feed is followed),
    /// else [`Self::get`] (and a copy kept). Why a stale copy costs no money: [`super::cache`].
    pub(super) async fn get_for_sponsorship(
        &self,
        id: B256,
    ) -> Result<(Option<Arc<SessionGrant>>, GrantSource), StoreError> {
        // Its age counts from before the read: a revocation that answered before then is in it.
        let read_at = Instant::now();
        if let Some(grant) = self.cache.get(id, read_at) {
            let live = Some(grant).filter(|g| !forgotten(g, unix_now()));
            return Ok((live, GrantSource::Copy));
        }
        let ticket = self.cache.ticket(read_at);
        let Some(grant) = self.get(id).await? else {
            return Ok((None, GrantSource::Store));
        };
        let grant = Arc::new(grant);
        self.cache.insert(id, grant.clone(), ticket);
        Ok((Some(grant), GrantSource::Store))
    }

    /// A grant of the layout before 0.2 (one more round trip, for unknown ids only).
    async fn get_legacy(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        let mut conn = self.conn.clone();
        let mut fields: HashMap<String, String> = conn
            .hgetall(legacy_session_key(id))
            .await
            .map_err(unavailable)?;
        let Some(grant) = fields.remove("grant") else {
            return Ok(None);
        };
        let mut grant: SessionGrant =
            serde_json::from_str(&grant).map_err(|_| StoreError::Corrupt(id))?;
        // The id asked for is the one the ledger's session state and a copy are kept under.
        if grant.session_id != id {
            return Err(StoreError::Corrupt(id));
        }
        // Fail closed: anything but an explicit "active" is treated as revoked.
        grant.status = match fields.get("status").map(String::as_str) {
            Some("active") => SessionStatus::Active,
            _ => SessionStatus::Revoked,
        };
        Ok(Some(grant))
    }

    pub(super) async fn revoke(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        let mut conn = self.conn.clone();
        let mut found: i64 = self
            .revoke
            .key(grant_key(id))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if found == 0 {
            found = self
                .revoke_legacy
                .key(legacy_session_key(id))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        // Once the status is written (a read in flight before then keeps its copy for
        // MAX_AGE only).
        self.cache.revoked(&[id]);
        // Then the other replicas drop theirs (`follow_revocations`), an unknown id's too (a
        // grant whose key was deleted by hand may still be copied). Not written, the
        // revocation still stands (the ledger refuses the session), but their copies would
        // outlive it: the caller is told, and a retry writes it (revoking again changes nothing
        // else).
        self.announce
            .key(REVOCATIONS_KEY)
            .arg(id.as_slice())
            .arg(REVOCATIONS_KEPT.as_secs())
            .arg(REVOCATIONS_MAX)
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        if found == 0 {
            return Ok(None);
        }
        self.get(id).await
    }

    /// Read the revocation feed from where this replica last read it, and drop the copies of
    /// grants it names (`super::cache`); `Ok(n)`: read, `n` revocations new. The first read
    /// only finds the feed's end. Copies are served past [`MAX_AGE`](super::cache::MAX_AGE) only
    /// while these reads go on succeeding; one that fails, or finds the feed lost or too far
    /// ahead, stops that until reads begin again.
    pub async fn follow_revocations(&self) -> Result<usize, StoreError> {
        let _reading = self.feed_reader.lock().await;
        let began = Instant::now();
        let got = self.read_revocations().await;
        match got {
            Ok(FeedRead::AtEnd) => {
                // Revocations from the feed's end on are read: copies read from now on.
                self.cache.followed(Instant::now());
                Ok(0)
            }
            Ok(FeedRead::Read(read)) => {
                self.cache.followed(began);
                Ok(read)
            }
            Ok(FeedRead::Lost) => {
                self.cache.unfollowed();
                Err(StoreError::Unavailable(
                    "the revocation feed was lost or ran ahead of this replica; following it anew"
                        .into(),
                ))
            }
            Err(e) => {
                self.cache.unfollowed();
                Err(e)
            }
        }
    }

    /// Whether this replica follows the revocation feed now (its copies may outlive
    /// [`MAX_AGE`](super::cache::MAX_AGE)).
    pub fn follows_revocations(&self) -> bool {
        self.cache.following(Instant::now())
    }

    async fn read_revocations(&self) -> Result<FeedRead, StoreError> {
        let mut conn = self.conn.clone();
        let held = *self
            .feed_place
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let malformed =
            || StoreError::Unavailable("the revocation feed answered a malformed reply".into());
        let Some(Place {
            mut at,
            mut counted,
            run_id: held_run,
        }) = held
        else {
            // Where the feed ends now: every revocation after this is read.
            let (added, _, _, newest, run_id): (u64, u8, redis::Value, String, String) = self
                .follow
                .key(REVOCATIONS_KEY)
                .arg("")
                .arg(FEED_PAGE)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let at = StreamId::parse(newest.as_bytes()).ok_or_else(malformed)?;
            self.set_feed_place(Place {
                at,
                counted: added,
                run_id: run_of(&run_id),
            });
            return Ok(FeedRead::AtEnd);
        };
        let mut read = 0;
        loop {
            let (added, here, page, newest, run_id): (u64, u8, redis::Value, String, String) = self
                .follow
                .key(REVOCATIONS_KEY)
                .arg(at.to_string())
                .arg(FEED_PAGE)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            // Another Redis answers (a failover, a restart): it may hold the place's entry but
            // not every one after it, which nothing else here would show.
            if run_of(&run_id) != held_run {
                return Ok(self.lost());
            }
            let newest = StreamId::parse(newest.as_bytes()).unwrap_or(StreamId::ZERO);
            // The entry at this replica's place is gone: trimmed, when it is older than the
            // feed keeps (no revocation since, then one); otherwise the feed was emptied or
            // lost entries (a failover), revocations with them.
            let trimmed = at.ms.saturating_add(REVOCATIONS_KEPT_MS) < newest.ms;
            if here == 0 && !trimmed {
                return Ok(self.lost());
            }
            let entries = stream_entries(&page)?;
            // Each page's revocations drop their copies before the place moves past them.
            let mut ids = Vec::with_capacity(entries.len());
            let mut unknown = false;
            for (id, entry) in &entries {
                match entry {
                    FeedEntry::Revoked(grant) => ids.push(*grant),
                    FeedEntry::Marker => {}
                    // Not one this service wrote: whatever it named is unknown.
                    FeedEntry::Unknown => unknown = true,
                }
                at = *id;
            }
            if !ids.is_empty() {
                self.cache.revoked(&ids);
            }
            read += ids.len();
            counted += entries.len() as u64;
            // Every entry added since the place is in the pages read, or some were removed
            // (trimmed unread, the feed emptied and written again) or never reached this
            // Redis: revocations may be missing.
            let whole = entries.len() < FEED_PAGE;
            if unknown || (whole && counted != added) {
                return Ok(self.lost());
            }
            self.set_feed_place(Place {
                at,
                counted,
                run_id: held_run,
            });
            if whole {
                return Ok(FeedRead::Read(read));
            }
            if read >= self.cache.capacity().min(REVOCATIONS_MAX as usize) {
                // More revocations at once than copies kept (checked a page at a time), or
                // than the feed keeps (revocations written as fast as they are read): reading
                // on is no better than serving every copy for MAX_AGE only, from the feed's end
                // on.
                return Ok(self.lost());
            }
        }
    }

    /// The feed is not what this replica read before: the next read begins anew at its end
    /// (and writes an entry there if it is empty).
    fn lost(&self) -> FeedRead {
        *self
            .feed_place
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        FeedRead::Lost
    }

    fn set_feed_place(&self, place: Place) {
        *self
            .feed_place
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(place);
    }

    pub(super) async fn list_by_account(
        &self,
        account: Address,
        cursor: ListCursor,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut conn = self.conn.clone();
        // Grants of the old layout (older than any new one) come first, by offset.
        let legacy: Vec<String> = conn
            .zrange(legacy_account_key(account), 0, -1)
            .await
            .map_err(unavailable)?;
        let skip_legacy = match cursor {
            ListCursor::Offset(n) => usize::try_from(n).unwrap_or(usize::MAX),
            ListCursor::After(_) => usize::MAX,
        };
        // (id, where a page that ends on it resumes: past its index member's place, or, in the
        // old layout's list, which only an offset reads, past its offset).
        let mut ids: Vec<(B256, ListCursor)> = legacy
            .iter()
            .enumerate()
            .skip(skip_legacy)
            .filter_map(|(at, id)| {
                let past = u64::try_from(at).map_or(u64::MAX, |at| at.saturating_add(1));
                id.parse().ok().map(|id| (id, ListCursor::Offset(past)))
            })
            .take(limit.saturating_add(1))
            .collect();
        if ids.len() <= limit {
            // One more than asked tells whether another page follows.
            let want = limit.saturating_add(1) - ids.len();
            let (min, offset) = match cursor {
                // Past the place given: nothing that left since shifts where this resumes.
                ListCursor::After(place) => (
                    [b"(".as_slice(), account.as_slice(), &place.to_bytes()].concat(),
                    0,
                ),
                ListCursor::Offset(n) => (
                    [b"[".as_slice(), account.as_slice()].concat(),
                    n.saturating_sub(legacy.len() as u64),
                ),
            };
            let max = [b"[".as_slice(), account.as_slice(), &[0xff; 40]].concat();
            let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(index_key(account))
                .arg(min)
                .arg(max)
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(offset)
                .arg(want)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            ids.extend(members.iter().filter(|m| m.len() == 60).filter_map(|m| {
                ListPlace::from_bytes(&m[20..])
                    .map(|place| (B256::from_slice(&m[28..]), ListCursor::After(place)))
            }));
        }
        let more = ids.len() > limit;
        let next_cursor = more.then(|| ids[limit - 1].1);
        let mut sessions = Vec::with_capacity(limit.min(ids.len()));
        for (id, resume) in ids.into_iter().take(limit) {
            // Only the grant its member was written for: not one stored under a reused id for
            // another account, nor the winner again through a member a create that lost its SET
            // NX left (the same account and id, another creation time or end).
            if let Some(grant) = self.get(id).await?
                && grant.account == account
                && match resume {
                    ListCursor::After(place) => place == ListPlace::of(&grant),
                    ListCursor::Offset(_) => true,
                }
            {
                sessions.push(grant);
            }
        }
        Ok(Page {
            sessions,
            next_cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::*;

    fn info(version: &str) -> Value {
        Value::BulkString(
            format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n")
                .into_bytes(),
        )
    }

    #[test]
    fn a_node_that_answers_info_with_an_error_is_found() -> redis::RedisResult<()> {
        let loading = redis::parse_redis_value(b"-LOADING Redis is loading the dataset\r\n")?;
        assert!(matches!(loading, Value::ServerError(_)), "{loading:?}");
        let ok = Value::BulkString(b"# Memory\r\nmaxmemory:0\r\n".to_vec());
        assert_eq!(node_error(&ok), None);
        let nodes = Value::Map(vec![
            (Value::SimpleString("10.0.0.1:6379".into()), ok),
            (Value::SimpleString("10.0.0.2:6379".into()), loading),
        ]);
        assert!(node_error(&nodes).is_some_and(|e| e.contains("loading")));
        Ok(())
    }

    #[test]
    fn a_redis_that_evicts_or_evicted_keys_is_found_on_any_node() -> redis::RedisResult<()> {
        let info = |max: &str, policy: &str, evicted: u64| {
            redis::Value::BulkString(
                format!(
                    "# Server\r\nredis_version:7.0.15\r\nrun_id:r1\r\n\r\n# Memory\r\nused_memory:1000\r\nmaxmemory:{max}\r\nmaxmemory_policy:{policy}\r\n\r\n# Stats\r\nexpired_keys:7\r\nevicted_keys:{evicted}\r\n"
                )
                .into_bytes(),
            )
        };
        let none = HashMap::new();
        let judge = |v: &redis::Value, seen: &[(&str, u64)], acked: &[(&str, u64)]| {
            let map = |pairs: &[(&str, u64)]| {
                pairs
                    .iter()
                    .map(|(r, n)| ((*r).to_owned(), *n))
                    .collect::<HashMap<_, _>>()
            };
            eviction_in(v, &map(seen), &map(acked))
        };
        let why = |v: &redis::Value| eviction_in(v, &none, &none).why;
        assert_eq!(
            judge(&info("0", "noeviction", 0), &[], &[]),
            Eviction::default()
        );
        assert_eq!(
            why(&info("0", "allkeys-lru", 0)),
            None,
            "no limit: nothing evicted"
        );
        assert_eq!(why(&info("104857600", "noeviction", 0)), None);
        for policy in ["volatile-lru", "allkeys-lru", "volatile-ttl"] {
            assert!(
                why(&info("104857600", policy, 0)).is_some_and(|why| why.contains(policy)),
                "{policy}"
            );
        }
        // Keys evicted before the policy was set back, until acknowledged exactly, for that run.
        let found = judge(&info("0", "noeviction", 3), &[], &[]);
        assert!(found.why.is_some_and(|why| why.contains("evicted 3 keys")));
        assert_eq!(found.counted, vec![("r1".to_owned(), 3)], "noted as seen");
        assert_eq!(
            judge(&info("0", "noeviction", 3), &[], &[("r1", 3)]).why,
            None
        );
        assert!(
            judge(&info("0", "noeviction", 4), &[], &[("r1", 3)])
                .why
                .is_some()
        );
        assert!(
            judge(&info("0", "noeviction", 3), &[], &[("r1", 50)])
                .why
                .is_some_and(|why| why.contains("more than were seen")),
            "an acknowledgement above the count would let more go unseen"
        );
        assert!(
            judge(&info("0", "noeviction", 3), &[], &[("r0", 3)])
                .why
                .is_some()
        );
        // A run seen to evict before (the node restarted, or failed over) counts until
        // acknowledged, and the highest count of a run is the one to acknowledge.
        let restarted = info("0", "noeviction", 0);
        assert!(
            judge(&restarted, &[("r0", 5)], &[])
                .why
                .is_some_and(|why| why.contains("r0"))
        );
        assert_eq!(judge(&restarted, &[("r0", 5)], &[("r0", 5)]).why, None);
        assert!(
            judge(&info("0", "noeviction", 2), &[("r1", 5)], &[("r1", 2)])
                .why
                .is_some()
        );
        // No run_id to acknowledge by: refused.
        let anonymous = Value::BulkString(
            b"# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n# Stats\r\nevicted_keys:2\r\n".to_vec(),
        );
        assert!(
            judge(&anonymous, &[], &[("", 2)])
                .why
                .is_some_and(|why| why.contains("no run_id"))
        );
        // An evicting policy whose maxmemory is not shown is refused.
        let no_max = Value::BulkString(
            b"# Server\r\nrun_id:r1\r\n# Memory\r\nmaxmemory_policy:allkeys-lru\r\n# Stats\r\nevicted_keys:0\r\n".to_vec(),
        );
        assert!(why(&no_max).is_some());
        // A Cluster answers per node, by address: each node is judged alone, and named.
        let nodes = |a: redis::Value, b: redis::Value| {
            Value::Map(vec![
                (Value::BulkString(b"10.0.0.1:6379".to_vec()), a),
                (Value::BulkString(b"10.0.0.2:6379".to_vec()), b),
            ])
        };
        let clean = nodes(info("0", "noeviction", 0), info("0", "noeviction", 0));
        assert_eq!(judge(&clean, &[], &[]), Eviction::default());
        assert!(
            why(&nodes(
                info("0", "noeviction", 0),
                info("1000", "volatile-lru", 0)
            ))
            .is_some_and(|why| why.contains("10.0.0.2:6379"))
        );
        assert!(
            judge(&Value::Map(vec![]), &[], &[]).unread.is_some(),
            "no node answered"
        );
        // A node that answers an error, or a count that does not parse, is unread; the others
        // are still judged.
        let loading = redis::parse_redis_value(b"-LOADING Redis is loading the dataset\r\n")?;
        let found = judge(
            &nodes(loading.clone(), info("0", "noeviction", 0)),
            &[],
            &[],
        );
        assert!(found.why.is_none() && found.unread.is_some_and(|e| e.contains("loading")));
        let found = judge(&nodes(loading, info("1000", "allkeys-lru", 0)), &[], &[]);
        assert!(found.why.is_some() && found.unread.is_some());
        let garbled = Value::BulkString(
            b"# Memory\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n# Stats\r\nevicted_keys:x\r\n".to_vec(),
        );
        assert!(judge(&garbled, &[], &[]).unread.is_some());
        // A node that hides its policy passes, marked, but not its evicted keys; one whose
        // answer holds nothing of either is marked too.
        let hidden = |evicted: &str| {
            redis::Value::BulkString(
                format!(
                    "# Server\r\nrun_id:r2\r\n# Memory\r\nused_memory:1000\r\n# Stats\r\n{evicted}"
                )
                .into_bytes(),
            )
        };
        let found = judge(
            &nodes(hidden("evicted_keys:0\r\n"), info("0", "noeviction", 0)),
            &[],
            &[],
        );
        assert_eq!((found.why, found.hidden), (None, true));
        let found = judge(&hidden("evicted_keys:5\r\n"), &[], &[]);
        assert!(found.why.is_some_and(|why| why.contains("evicted 5 keys")) && found.hidden);
        let found = judge(&Value::BulkString(b"# Keyspace\r\n".to_vec()), &[], &[]);
        assert_eq!((found.why, found.hidden), (None, true));
        // Acknowledgements that are no count acknowledge nothing.
        let read = counts(HashMap::from([
            ("r1".to_owned(), "3".to_owned()),
            ("r2".to_owned(), "three".to_owned()),
        ]));
        assert_eq!(read, HashMap::from([("r1".to_owned(), 3)]));
        Ok(())
    }

    #[test]
    fn redis_older_than_7_is_refused_on_any_node() {
        assert!(check_version(&info("7.0.15")).is_ok());
        assert!(check_version(&info("8.2.1")).is_ok());
        assert!(check_version(&info("6.2.14")).is_err());
        // A Cluster answers per node: every node must do.
        let nodes = |a: &str, b: &str| {
            Value::Map(vec![
                (Value::SimpleString("n1".into()), info(a)),
                (Value::SimpleString("n2".into()), info(b)),
            ])
        };
        assert!(check_version(&nodes("7.2.4", "7.0.0")).is_ok());
        assert!(check_version(&nodes("7.2.4", "6.0.16")).is_err());
        assert!(check_version(&Value::Nil).is_err(), "no version named");
    }
}
