//! The ledger in Redis: one `EVALSHA` of `reserve.lua` per sponsorship (the `redis` crate
//! reloads the script on `NOSCRIPT`). Keys: `sp:{<policy>}:budget:<scope>` (hash: cost, ops),
//! `sp:{<policy>}:op:<op key>` (the reservation record), `sp:{<policy>}:open` (open records by
//! validUntil) and `sp:{<policy>}:userop:<userOpHash>` (settlement index); the shared
//! `{policy}` hash tag keeps one reservation's keys in one Cluster slot.

use crate::session::redis::RedisConn;
use alloy::primitives::B256;
use redis::AsyncCommands;

use super::{Exhausted, Outcome, Reservation};
use crate::session::StoreError;

/// Redis-backed ledger.
#[derive(Clone)]
pub struct RedisLedger {
    conn: RedisConn,
    reserve: redis::Script,
    settle: redis::Script,
}

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisLedger")
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn budget_key(policy: &str, scope: &str) -> String {
    format!("sp:{{{policy}}}:budget:{scope}")
}

fn op_key(policy: &str, op: B256) -> String {
    format!("sp:{{{policy}}}:op:{op}")
}

fn open_key(policy: &str) -> String {
    format!("sp:{{{policy}}}:open")
}

fn user_op_key(policy: &str, user_op_hash: B256) -> String {
    format!("sp:{{{policy}}}:userop:{user_op_hash}")
}

impl RedisLedger {
    /// A ledger on `conn`.
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            reserve: redis::Script::new(include_str!("reserve.lua")),
            settle: redis::Script::new(include_str!("settle.lua")),
        }
    }

    pub(super) async fn reserve(
        &self,
        r: &Reservation,
        check_only: bool,
        now: u64,
    ) -> Result<Outcome, StoreError> {
        let mut conn = self.conn.clone();
        let ttl = |at: u64| at.saturating_sub(now).max(1);
        let mut inv = self.reserve.key(op_key(&r.policy, r.op_key));
        inv.key(open_key(&r.policy));
        inv.key(user_op_key(&r.policy, r.user_op_hash));
        for s in &r.scopes {
            inv.key(budget_key(&r.policy, &s.name));
        }
        inv.arg(if check_only { "1" } else { "0" })
            .arg(r.cost_gwei.to_string())
            .arg(&r.payload)
            .arg(ttl(r.expires_at))
            .arg(r.valid_until);
        let limit = |l: Option<u64>| l.map_or(-1i128, i128::from);
        for s in &r.scopes {
            inv.arg(limit(s.cost_limit).to_string())
                .arg(limit(s.ops_limit).to_string())
                .arg(ttl(s.expires_at))
                .arg(&s.name);
        }
        let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        let text = |i: usize| -> Result<String, StoreError> {
            redis::from_redis_value(reply.get(i).cloned().unwrap_or(redis::Value::Nil))
                .map_err(unavailable)
        };
        let number = |i: usize| -> Result<u64, StoreError> {
            // Lua numbers come back as decimal strings (tostring), possibly with an exponent
            // for very large values: parse through f64 only as a fallback.
            let t = text(i)?;
            t.parse::<u64>()
                .or_else(|_| t.parse::<f64>().map(|f| f as u64))
                .map_err(unavailable)
        };
        let code: i64 =
            redis::from_redis_value(reply.first().cloned().unwrap_or(redis::Value::Nil))
                .map_err(unavailable)?;
        match code {
            0 => Ok(Outcome::Reserved),
            1 => Ok(Outcome::Existing(text(1)?)),
            2 => {
                let scope = text(1)?;
                let rule = r
                    .scopes
                    .iter()
                    .find(|s| s.name == scope)
                    .map(|s| s.rule.clone())
                    .unwrap_or_default();
                Ok(Outcome::Exhausted(Exhausted {
                    scope,
                    rule,
                    resource: text(2)?,
                    limit: number(3)?,
                    used: number(4)?,
                    requested: number(5)?,
                }))
            }
            other => Err(unavailable(format!(
                "unexpected reply {other} from reserve.lua"
            ))),
        }
    }

    /// The index of a userOpHash lives in its policy's slot (written by `reserve.lua` in the
    /// same atomic step), so settlement looks in each policy's: off the hot path, and the
    /// policies are few.
    pub(super) async fn settle(
        &self,
        policies: &[String],
        user_op_hash: B256,
        actual_gwei: u64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        for policy in policies {
            let record: Option<String> = conn
                .get(user_op_key(policy, user_op_hash))
                .await
                .map_err(unavailable)?;
            if let Some(record) = record {
                return self.close(policy, &record, "settle", actual_gwei).await;
            }
        }
        Ok(false)
    }

    /// Close one record: its scope keys are read first, so the script declares every key it
    /// touches (required on Redis Cluster).
    async fn close(
        &self,
        policy: &str,
        record: &str,
        mode: &str,
        actual_gwei: u64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let scopes: Option<String> = conn.hget(record, "scopes").await.map_err(unavailable)?;
        let Some(scopes) = scopes else {
            return Ok(false);
        };
        let mut inv = self.settle.key(record);
        inv.key(open_key(policy));
        for scope in scopes.split('\n').filter(|s| !s.is_empty()) {
            inv.key(scope);
        }
        inv.arg(mode).arg(actual_gwei.to_string());
        let closed: i64 = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(closed == 1)
    }

    pub(super) async fn release_expired(
        &self,
        policies: &[String],
        confirmed_time: u64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let mut released = 0;
        for policy in policies {
            // validUntil < confirmed_time: the EntryPoint can no longer accept the operation.
            let records: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(open_key(policy))
                .arg("-inf")
                .arg(format!("({confirmed_time}"))
                .arg("LIMIT")
                .arg(0)
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for record in records {
                if self.close(policy, &record, "release", 0).await? {
                    released += 1;
                } else {
                    // Expired or already closed record still listed: drop it from the set.
                    let _: () = conn
                        .zrem(open_key(policy), &record)
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
        Ok(released)
    }

    pub(super) async fn open(&self, policy: &str, scope: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let open: Option<u64> = conn
            .hget(budget_key(policy, scope), "open")
            .await
            .map_err(unavailable)?;
        Ok(open.unwrap_or(0))
    }

    pub(super) async fn usage(&self, policy: &str, scope: &str) -> Result<(u64, u64), StoreError> {
        let mut conn = self.conn.clone();
        let (cost, ops): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(budget_key(policy, scope))
            .arg("cost")
            .arg("ops")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok((cost.unwrap_or(0), ops.unwrap_or(0)))
    }
}
