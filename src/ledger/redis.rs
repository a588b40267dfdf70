//! The ledger in Redis: one `EVALSHA` of `reserve.lua` per sponsorship (the `redis` crate
//! reloads the script on `NOSCRIPT`). Keys: `sp:{<policy>}:budget:<scope>` (hash: cost, ops)
//! and `sp:{<policy>}:op:<op key>` (the reservation record); the shared `{policy}` hash tag
//! keeps one reservation's keys in one Cluster slot.

use redis::aio::ConnectionManager;

use super::{Exhausted, Outcome, Reservation};
use crate::session::StoreError;

/// Redis-backed ledger.
#[derive(Clone)]
pub struct RedisLedger {
    conn: ConnectionManager,
    reserve: redis::Script,
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

fn op_key(policy: &str, op: alloy::primitives::B256) -> String {
    format!("sp:{{{policy}}}:op:{op}")
}

impl RedisLedger {
    /// A ledger on `conn`.
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            reserve: redis::Script::new(include_str!("reserve.lua")),
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
        for s in &r.scopes {
            inv.key(budget_key(&r.policy, &s.name));
        }
        inv.arg(if check_only { "1" } else { "0" })
            .arg(r.cost_gwei)
            .arg(&r.payload)
            .arg(ttl(r.expires_at));
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
