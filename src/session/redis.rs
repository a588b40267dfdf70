//! Sessions in Redis, shared by every replica: a revocation is seen by the next request on
//! any of them, since each sponsorship reads the grant (one round trip: `HGETALL`).
//!
//! Layout: `sp:session:{<id>}` is a hash with `grant` (JSON, written once) and `status`
//! (changed by revocation without rewriting the grant); `sp:account-sessions:<account>` is a
//! sorted set of the account's session ids by creation time, for listing.

use std::time::Duration;

use std::collections::HashMap;

use alloy::primitives::{Address, B256};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use super::{Page, SessionGrant, SessionStatus, StoreError};

/// Redis-backed session store.
#[derive(Clone)]
pub struct RedisSessions {
    conn: RedisConn,
    revoke: redis::Script,
}

impl std::fmt::Debug for RedisSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisSessions")
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn session_key(id: B256) -> String {
    format!("sp:session:{{{id}}}")
}

fn account_key(account: Address) -> String {
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
/// clones) by the stores that use Redis.
pub async fn connect(url: &str, timeout: Duration) -> Result<RedisConn, StoreError> {
    if url.contains(',') {
        let nodes: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()
            .map_err(unavailable)?;
        return Ok(RedisConn::Cluster(
            client.get_async_connection().await.map_err(unavailable)?,
        ));
    }
    let client = redis::Client::open(url).map_err(unavailable)?;
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
            revoke: redis::Script::new(include_str!("revoke.lua")),
        }
    }

    /// Connect to `url` (see [`connect`]).
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self::new(connect(url, timeout).await?))
    }

    pub(super) async fn create(&self, grant: &SessionGrant) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let json =
            serde_json::to_string(grant).map_err(|_| StoreError::Corrupt(grant.session_id))?;
        let key = session_key(grant.session_id);
        let created: bool = conn
            .hset_nx(&key, "grant", json)
            .await
            .map_err(unavailable)?;
        if !created {
            return Ok(false);
        }
        let status = match grant.status {
            SessionStatus::Active => "active",
            SessionStatus::Revoked => "revoked",
        };
        // A concurrent create of the same id lost the HSETNX above, so only this writer sets
        // the status; the index is idempotent. Two commands, not a pipeline: the keys live in
        // different Cluster slots (this is the admin path, not the sponsorship path).
        let _: () = conn
            .hset(&key, "status", status)
            .await
            .map_err(unavailable)?;
        let _: () = conn
            .zadd(
                account_key(grant.account),
                grant.session_id.to_string(),
                grant.created_at,
            )
            .await
            .map_err(unavailable)?;
        Ok(true)
    }

    pub(super) async fn get(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        let mut conn = self.conn.clone();
        // Grant and status in one round trip.
        let mut fields: HashMap<String, String> =
            conn.hgetall(session_key(id)).await.map_err(unavailable)?;
        let Some(grant) = fields.remove("grant") else {
            return Ok(None);
        };
        let mut grant: SessionGrant =
            serde_json::from_str(&grant).map_err(|_| StoreError::Corrupt(id))?;
        // Fail closed: anything but an explicit "active" is treated as revoked.
        grant.status = match fields.get("status").map(String::as_str) {
            Some("active") => SessionStatus::Active,
            _ => SessionStatus::Revoked,
        };
        Ok(Some(grant))
    }

    pub(super) async fn revoke(&self, id: B256) -> Result<Option<SessionGrant>, StoreError> {
        let mut conn = self.conn.clone();
        let found: i64 = self
            .revoke
            .key(session_key(id))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if found == 0 {
            return Ok(None);
        }
        self.get(id).await
    }

    pub(super) async fn list_by_account(
        &self,
        account: Address,
        cursor: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let mut conn = self.conn.clone();
        let start = isize::try_from(cursor).unwrap_or(isize::MAX);
        let stop = start.saturating_add(isize::try_from(limit).unwrap_or(isize::MAX));
        // One more than asked tells whether another page follows.
        let ids: Vec<String> = conn
            .zrange(account_key(account), start, stop)
            .await
            .map_err(unavailable)?;
        let more = ids.len() > limit;
        let mut sessions = Vec::with_capacity(limit);
        for id in ids.iter().take(limit) {
            let Ok(id) = id.parse::<B256>() else { continue };
            if let Some(grant) = self.get(id).await? {
                sessions.push(grant);
            }
        }
        Ok(Page {
            sessions,
            next_cursor: more.then_some(cursor + limit as u64),
        })
    }
}
