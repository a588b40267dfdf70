//! Policy sets published to Redis, so every replica serves the same set (DESIGN §5).
//!
//! `sp:policies:set:<version>` holds the files (JSON `[[name, toml], …]`, written once);
//! `sp:policies:current` names the version in force. Publishing writes the set, then switches
//! `current`; replicas poll `current` and load a new version only if it parses completely.
//! A replica starting with its own directory publishes it only if nothing is published yet
//! (or when told to, `--publish-policies`): an older directory never reverts a push.

use crate::session::redis::RedisConn;
use alloy::primitives::B256;
use redis::AsyncCommands;

use super::file::Sources;
use crate::session::StoreError;

/// The version in force. Every replica with Redis publishes one when it starts (since before
/// 0.2): a Redis without it has served no replica yet.
pub const CURRENT: &str = "sp:policies:current";

fn set_key(version: B256) -> String {
    format!("sp:policies:set:{version}")
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Store `sources` under `version` (not yet current); the connection, for what follows.
async fn store(
    conn: &RedisConn,
    version: B256,
    sources: &Sources,
) -> Result<RedisConn, StoreError> {
    let mut conn = conn.clone();
    let json = serde_json::to_string(sources).map_err(unavailable)?;
    let _: () = conn
        .set(set_key(version), json)
        .await
        .map_err(unavailable)?;
    Ok(conn)
}

/// Publish `sources` (already validated) as `version` and make it current.
pub async fn push(conn: &RedisConn, version: B256, sources: &Sources) -> Result<(), StoreError> {
    let mut conn = store(conn, version, sources).await?;
    let _: () = conn
        .set(CURRENT, version.to_string())
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Publish `sources` as `version` only if no set is published yet; the version in force
/// afterwards (this one, or the one already published).
pub async fn push_if_none(
    conn: &RedisConn,
    version: B256,
    sources: &Sources,
) -> Result<B256, StoreError> {
    let mut conn = store(conn, version, sources).await?;
    let _: bool = conn
        .set_nx(CURRENT, version.to_string())
        .await
        .map_err(unavailable)?;
    Ok(current_version(&conn).await?.unwrap_or(version))
}

/// The version in force, if any was published.
pub async fn current_version(conn: &RedisConn) -> Result<Option<B256>, StoreError> {
    let mut conn = conn.clone();
    let v: Option<String> = conn.get(CURRENT).await.map_err(unavailable)?;
    Ok(v.and_then(|v| v.parse().ok()))
}

/// The files of a published version.
pub async fn fetch(conn: &RedisConn, version: B256) -> Result<Option<Sources>, StoreError> {
    let mut conn = conn.clone();
    let json: Option<String> = conn.get(set_key(version)).await.map_err(unavailable)?;
    json.map(|j| serde_json::from_str(&j).map_err(unavailable))
        .transpose()
}
