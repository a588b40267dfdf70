//! The ledger in Redis: one `EVALSHA` of `reserve.lua` per sponsorship (the `redis` crate
//! reloads the script on `NOSCRIPT`). Keys, all under the policy's `{policy}` hash tag so one
//! reservation's keys share one Cluster slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `sp:{<policy>}:budget:<scope>` | hash | a scope's counter, field `c`: cost (gwei), ops and open (gwei), packed as three big-endian i64 (plus the decimal `cost`, `ops` and `open` of versions before 0.3, see `COUNTER` in `lib.lua`), and `until` (when Redis last made it expire, unix seconds by its own clock; see `reserve.lua`) |
//! | `sp:{<policy>}:budget:sender[:c<chain>][:<window>]` | hash | every sender's counter of a window: field the sender's 20 bytes, packed as `c` above; and `until` (see `counter_slot`; before 0.3, a hash per sender, `…:budget:sender:0x<sender>…`) |
//! | `sp:ledger:sender-windows-since` | string | when the first replica of this layout ran (Redis' clock): windows begun before it may have senders counted the old way |
//! | `sp:{<policy>}:n:<landing id>` | string | the reservations of one (EntryPoint, sender, nonce): per operation (20-byte idempotency id) a packed record (see `lib.lua`): state, cost, the signed answer, userOpHashes, scopes, session and spend |
//! | `sp:{<policy>}:x:<bucket>` | string | 20-byte landing ids of the signatures whose validUntil falls in this 10 s bucket, for release on expiry |
//! | `sp:{<policy>}:x` | sorted set | the expiry buckets |
//! | `sp:{<policy>}:session:<id>` | hash | the session's `status` (revocation seen by reservations) and `spent:<token>` totals |
//!
//! Ids and hashes are raw bytes: landing ids and idempotency ids are the first 20 bytes of
//! their keccak keys, userOpHashes their first 8 (they only tell the few reservations of one
//! nonce apart). A reservation without a session, charged to a sender and a policy budget,
//! takes under 400 bytes: its entry in the nonce's string and 20 bytes of a bucket
//! (`cargo test --test it ledger::a_reservation_takes_at_most_400_bytes`).

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, U256};
use redis::AsyncCommands;

use super::{Exhausted, Landing, Outcome, Reservation, Resource, Settled, SpendExceeded};
use crate::session::StoreError;
use crate::session::redis::RedisConn;
use crate::userop::paymaster_data::{PaymasterData, ValidityWindow};

/// Redis-backed ledger.
#[derive(Clone)]
pub struct RedisLedger {
    conn: RedisConn,
    reserve: redis::Script,
    settle: redis::Script,
    release: redis::Script,
    /// A sender's counter in a window begun before this time (Redis' clock, unix seconds, less
    /// `LEGACY_MARGIN_SECS`) may also be in the key versions before 0.3 kept it in, which
    /// `reserve.lua` then reads too (`counter_slot`). `u64::MAX`: every window.
    legacy_before: u64,
}

/// Where Redis keeps the time the first replica of this ledger layout ran (`RedisLedger::connect`).
pub const LAYOUT_SINCE_KEY: &str = "sp:ledger:sender-windows-since";

/// How much earlier than `legacy_before` a window may have begun by the service's clock and
/// still not be read as one an earlier version wrote to: the replicas' clocks and Redis'
/// differ by less.
const LEGACY_MARGIN_SECS: u64 = 300;

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisLedger")
    }
}

/// Seconds from `now` to `at` for an `EXPIRE`: at least one, at most a century (Redis refuses
/// an EXPIRE past about 2^63 ms, and a script failing after its first write would keep a
/// charge with no TTL and no record; a revocation would answer 503 after the ledger's half).
fn ttl_secs(at: u64, now: u64) -> u64 {
    at.saturating_sub(now).clamp(1, 100 * 365 * 86_400)
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn budget_key(policy: &str, scope: &str) -> String {
    format!("sp:{{{policy}}}:budget:{scope}")
}

/// Where a scope's counter lives (`counter_of` in `lib.lua`, which must agree): a sender's
/// (`sender:0x<40 hex>…`) is a field, the address's 20 bytes, of one hash per policy and window
/// shared by every sender (`sp:{P}:budget:sender…`, the name without the address), so a new
/// sender makes no key and sets no TTL; every other scope is field `c` of its own hash. Before
/// 0.3 a sender's counter was a hash of its own under its full name: `legacy`.
struct CounterSlot {
    key: String,
    field: Vec<u8>,
    legacy: Option<String>,
}

fn counter_slot(policy: &str, name: &str) -> CounterSlot {
    let sender = name.strip_prefix("sender:0x").and_then(|rest| {
        // Lua's `0x(%x+)`: exactly 40 hex digits, then no further digit.
        let digits = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
        let raw = (digits == 40).then(|| hex::decode(&rest[..40]).ok())??;
        Some((raw, &rest[40..]))
    });
    match sender {
        Some((raw, rest)) => CounterSlot {
            key: format!("sp:{{{policy}}}:budget:sender{rest}"),
            field: raw,
            legacy: Some(budget_key(policy, name)),
        },
        None => CounterSlot {
            key: budget_key(policy, name),
            field: b"c".to_vec(),
            legacy: None,
        },
    }
}

/// Seconds of validUntil one expiry bucket covers (`BUCKET_SECS` in `lib.lua`).
pub const BUCKET_SECS: u64 = 10;

/// Most nonce ids one `release.lua` call reads from a bucket.
const RELEASE_SLICE: usize = 2000;

fn nonce_key(policy: &str, landing: B256) -> Vec<u8> {
    [format!("sp:{{{policy}}}:n:").as_bytes(), &landing[..20]].concat()
}

fn index_key(policy: &str) -> String {
    format!("sp:{{{policy}}}:x")
}

fn bucket_key(policy: &str, bucket: u64) -> String {
    format!("sp:{{{policy}}}:x:{bucket}")
}

fn session_key(policy: &str, session: B256) -> String {
    format!("sp:{{{policy}}}:session:{session}")
}

/// Hash field of a session's total of `token`.
/// Lowercase hex: the ledger stores an address in a name as its 20 bytes.
fn spent_field(token: Address) -> String {
    format!("spent:0x{}", hex::encode(token))
}

/// A name as `lib.lua`'s `pack_name` stores it: each lowercase `0x` + 40 or 64 hex digits (an
/// address, a session id) as a marker byte (1 or 2) and its raw bytes; the rest as it is.
fn pack_name(name: &str) -> Vec<u8> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'0' && bytes.get(i + 1) == Some(&b'x') {
            // Lua's `0x(%x+)`: the longest run of hex digits after `0x`, at least one.
            let run = bytes[i + 2..]
                .iter()
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            if run > 0 {
                let hex = &bytes[i + 2..i + 2 + run];
                let lower = !hex.iter().any(u8::is_ascii_uppercase);
                match hex::decode(hex) {
                    Ok(raw) if lower && (run == 40 || run == 64) => {
                        out.push(if run == 40 { 1 } else { 2 });
                        out.extend_from_slice(&raw);
                    }
                    _ => out.extend_from_slice(&bytes[i..i + 2 + run]),
                }
                i += 2 + run;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// A u8-length-prefixed field of a packed record (`short` in `lib.lua`).
fn short(out: &mut Vec<u8>, field: &[u8]) -> Result<(), StoreError> {
    let len =
        u8::try_from(field.len()).map_err(|_| unavailable("ledger record field over 255 bytes"))?;
    out.push(len);
    out.extend_from_slice(field);
    Ok(())
}

/// The open record of a new reservation, packed as `lib.lua`'s `pack_record` packs it: the
/// script stores it as it is, so the hot path packs nothing in Lua. The two packers must agree
/// byte for byte (`ledger::the_service_packs_records_as_lib_lua_does` repacks records of each
/// shape in Lua and compares); settlement, release and extension unpack it in Lua.
fn pack_record(r: &Reservation) -> Result<Vec<u8>, StoreError> {
    let window = r.answer.window;
    let span = u32::try_from(window.valid_until.saturating_sub(window.valid_after))
        .map_err(|_| unavailable("a validity window over 2^32 seconds"))?;
    if window.valid_until >= 1 << 48 {
        return Err(unavailable("validUntil over 2^48"));
    }
    let mut out = Vec::with_capacity(160);
    out.push(0); // open
    out.extend_from_slice(&r.cost_gwei.to_be_bytes());
    out.extend_from_slice(&window.valid_until.to_be_bytes()[2..]);
    out.extend_from_slice(&span.to_be_bytes());
    out.extend_from_slice(&r.answer.signature);
    out.push(u8::try_from(r.user_op_hashes.len()).map_err(|_| unavailable("over 255 hashes"))?);
    for h in &r.user_op_hashes {
        out.extend_from_slice(&h[..8]);
    }
    out.push(u8::try_from(r.scopes.len()).map_err(|_| unavailable("over 255 scopes"))?);
    for s in &r.scopes {
        short(&mut out, &pack_name(&s.name))?;
    }
    match &r.session {
        Some(session) => {
            out.push(1);
            short(&mut out, &pack_name(&session_key(&r.policy, session.id)))?;
            out.push(
                u8::try_from(session.spend.len())
                    .map_err(|_| unavailable("over 255 token caps"))?,
            );
            for t in &session.spend {
                short(&mut out, &pack_name(&spent_field(t.token)))?;
                short(&mut out, t.amount.to_string().as_bytes())?;
            }
        }
        None => out.push(0),
    }
    if out.len() > usize::from(u16::MAX) {
        return Err(unavailable("ledger record over 65535 bytes"));
    }
    Ok(out)
}

/// A script with the shared helpers of `lib.lua` in front.
fn script(body: &str) -> redis::Script {
    redis::Script::new(&[include_str!("lib.lua"), body].concat())
}

impl RedisLedger {
    /// A ledger on `conn` that reads, besides each sender's counter, the key versions before
    /// 0.3 kept it in, in every window: for tools and tests. The service opens its ledger with
    /// [`RedisLedger::connect`].
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            reserve: script(include_str!("reserve.lua")),
            settle: script(include_str!("settle.lua")),
            release: script(include_str!("release.lua")),
            legacy_before: u64::MAX,
        }
    }

    /// The service's ledger on `conn`. The first replica of this layout to run notes Redis'
    /// time in [`LAYOUT_SINCE_KEY`]; a replica of an earlier version, running beside it during
    /// an upgrade, counts senders in keys of their own, which are read only in the windows
    /// begun before that time (and the margin): a replica of an earlier version still running
    /// when the next window begins is not seen by this one (docs/operations.md: upgrading).
    pub async fn connect(conn: RedisConn) -> Result<Self, StoreError> {
        let since: u64 = redis::Script::new(
            "local now = redis.call('TIME')[1] \
             return tonumber(redis.call('SET', KEYS[1], now, 'NX', 'GET') or now)",
        )
        .key(LAYOUT_SINCE_KEY)
        .invoke_async(&mut conn.clone())
        .await
        .map_err(unavailable)?;
        Ok(Self {
            legacy_before: since.saturating_add(LEGACY_MARGIN_SECS),
            ..Self::new(conn)
        })
    }

    pub(super) async fn reserve(
        &self,
        r: &Reservation,
        check_only: bool,
        now: u64,
    ) -> Result<Outcome, StoreError> {
        let mut conn = self.conn.clone();
        let ttl = |at: u64| ttl_secs(at, now);
        let nonce = nonce_key(&r.policy, r.landing_key);
        let bucket = r.answer.window.valid_until / BUCKET_SECS;
        let mut inv = self.reserve.key(&nonce);
        inv.key(index_key(&r.policy));
        inv.key(bucket_key(&r.policy, bucket));
        match &r.session {
            Some(s) => inv.key(session_key(&r.policy, s.id).into_bytes()),
            None => inv.key(&nonce),
        };
        // ARGV[7], per scope: cost limit, ops limit (u64::MAX: none), TTL, the counter's field
        // and the scope's name (u8-length-prefixed), and 1 if the key an earlier version kept
        // a sender's counter in is to be read too.
        let mut scopes = Vec::with_capacity(r.scopes.len() * 96);
        for s in &r.scopes {
            let mut slot = counter_slot(&r.policy, &s.name);
            if s.starts_at.is_some_and(|start| start >= self.legacy_before) {
                slot.legacy = None;
            }
            inv.key(slot.key);
            for n in [
                s.cost_limit.unwrap_or(u64::MAX),
                s.ops_limit.unwrap_or(u64::MAX),
                ttl(s.expires_at),
            ] {
                scopes.extend_from_slice(&n.to_be_bytes());
            }
            short(&mut scopes, &slot.field)?;
            short(&mut scopes, s.name.as_bytes())?;
            scopes.push(u8::from(slot.legacy.is_some()));
        }
        let spend = r
            .session
            .as_ref()
            .map(|s| s.spend.as_slice())
            .unwrap_or_default();
        // ARGV[6]: the new record's whole entry in the nonce's key (`entry` in `lib.lua`).
        let record = pack_record(r)?;
        let mut entry = Vec::with_capacity(record.len() + 23);
        short(&mut entry, &r.op_key[..20])?;
        let len = u16::try_from(record.len())
            .map_err(|_| unavailable("ledger record over 65535 bytes"))?;
        entry.extend_from_slice(&len.to_be_bytes());
        entry.extend_from_slice(&record);
        // reserve.lua's ARGV[2], in its order: big-endian u64s that Lua unpacks without parsing.
        let numbers: [u64; 14] = [
            u64::from(check_only),
            r.cost_gwei,
            ttl(r.expires_at),
            r.answer.window.valid_until,
            r.answer.window.valid_after,
            now.saturating_add(super::REFRESH_MARGIN_SECS),
            u64::from(r.session.is_some()),
            r.session.as_ref().map_or(1, |s| ttl(s.expires_at)),
            super::MAX_OPEN_PER_NONCE as u64,
            bucket,
            ttl((bucket + 1) * BUCKET_SECS + super::GRACE_SECS),
            now.saturating_sub(super::GRACE_SECS) / BUCKET_SECS,
            now.saturating_sub(super::GRACE_SECS),
            super::MAX_OPEN_PER_NONCE_ANY as u64,
        ];
        let numbers: Vec<u8> = numbers.iter().flat_map(|n| n.to_be_bytes()).collect();
        let hashes: Vec<u8> = r
            .user_op_hashes
            .iter()
            .flat_map(|h| h[..8].iter().copied())
            .collect();
        inv.arg(&r.op_key[..20])
            .arg(numbers)
            .arg(r.answer.signature.as_slice())
            .arg(hashes)
            .arg(&r.landing_key[..20])
            .arg(entry)
            .arg(scopes);
        for t in spend {
            inv.arg(spent_field(t.token))
                .arg(t.amount.to_string())
                .arg(t.limit.to_string());
        }
        let reply: Vec<redis::Value> = inv.invoke_async(&mut conn).await.map_err(unavailable)?;
        let text = |i: usize| -> Result<String, StoreError> {
            redis::from_redis_value(reply.get(i).cloned().unwrap_or(redis::Value::Nil))
                .map_err(unavailable)
        };
        // The script returns numbers as decimal strings written with %d.
        let number =
            |i: usize| -> Result<u64, StoreError> { text(i)?.parse::<u64>().map_err(unavailable) };
        let amount = |i: usize| -> Result<U256, StoreError> {
            U256::from_str_radix(&text(i)?, 10).map_err(unavailable)
        };
        let code: i64 =
            redis::from_redis_value(reply.first().cloned().unwrap_or(redis::Value::Nil))
                .map_err(unavailable)?;
        match code {
            0 => Ok(Outcome::Reserved),
            1 => {
                let signature: Vec<u8> =
                    redis::from_redis_value(reply.get(3).cloned().unwrap_or(redis::Value::Nil))
                        .map_err(unavailable)?;
                Ok(Outcome::Existing(PaymasterData {
                    window: ValidityWindow::new(number(2)?, number(1)?).map_err(unavailable)?,
                    signature: signature
                        .try_into()
                        .map_err(|_| unavailable("a stored signature is not 65 bytes"))?,
                }))
            }
            2 => {
                let scope = text(1)?;
                let rule = r
                    .scopes
                    .iter()
                    .find(|s| s.name == scope)
                    .map(|s| s.rule.clone())
                    .unwrap_or_default();
                let resource = match text(2)?.as_str() {
                    "cost" => Resource::Cost,
                    "ops" => Resource::Ops,
                    other => return Err(unavailable(format!("reserve.lua named `{other}`"))),
                };
                Ok(Outcome::Exhausted(Exhausted {
                    scope,
                    rule,
                    limit: number(3)?,
                    used: number(4)?,
                    // What was asked, exactly (Lua holds it as a double).
                    requested: match resource {
                        Resource::Cost => r.cost_gwei,
                        Resource::Ops => 1,
                    },
                    resource,
                }))
            }
            3 => Ok(Outcome::SessionRevoked),
            5 => Ok(Outcome::NoncePending),
            4 => {
                let field = text(1)?;
                let charge = spend
                    .iter()
                    .find(|t| spent_field(t.token) == field)
                    .ok_or_else(|| unavailable(format!("reserve.lua named {field}")))?;
                Ok(Outcome::SpendExceeded(SpendExceeded {
                    token: charge.token,
                    rule: charge.rule.clone(),
                    limit: amount(2)?,
                    spent: amount(3)?,
                    requested: amount(4)?,
                }))
            }
            other => Err(unavailable(format!(
                "unexpected reply {other} from reserve.lua"
            ))),
        }
    }

    /// The records of a nonce live in each policy's slot (written by `reserve.lua` in
    /// the same atomic step), so settlement looks in each policy's: first whether any holds the
    /// event's hash, then to settle and release. Off the hot path, and the policies are few.
    pub(super) async fn settle(
        &self,
        policies: &[String],
        landing: &Landing,
    ) -> Result<Settled, StoreError> {
        let mut conn = self.conn.clone();
        let mut out = Settled::default();
        let mut released_match = false;
        for policy in policies {
            let (found, records): (i64, i64) = self
                .settle
                .key(nonce_key(policy, landing.landing_key))
                .arg("probe")
                .arg(&landing.user_op_hash[..8])
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.hash_matched |= found == 1;
            released_match |= found == 2;
            out.known |= records > 0;
        }
        let found = match (out.hash_matched, released_match) {
            (true, _) => "open",
            (false, true) => "released",
            (false, false) => "none",
        };
        for policy in policies {
            let (settled, superseded, charged): (usize, usize, usize) = self
                .settle
                .key(nonce_key(policy, landing.landing_key))
                .arg("settle")
                .arg(&landing.user_op_hash[..8])
                .arg(landing.actual_gwei)
                .arg(found)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            out.settled += settled;
            out.superseded += superseded;
            out.charged_back += charged;
        }
        out.hash_matched |= out.charged_back > 0;
        Ok(out)
    }

    pub(super) async fn release_expired(
        &self,
        policies: &[String],
        confirmed_time: u64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let mut released = 0;
        for policy in policies {
            // Buckets that may hold a validUntil < confirmed_time: the EntryPoint can no longer
            // accept those operations.
            let buckets: Vec<u64> = conn
                .zrangebyscore(index_key(policy), "-inf", confirmed_time / BUCKET_SECS)
                .await
                .map_err(unavailable)?;
            for bucket in buckets {
                let (mut offset, mut left) = (0i64, 0i64);
                while offset >= 0 {
                    let (n, next, still): (usize, i64, i64) = self
                        .release
                        .key(bucket_key(policy, bucket))
                        .key(index_key(policy))
                        .arg(confirmed_time)
                        .arg(bucket)
                        .arg(offset)
                        .arg(RELEASE_SLICE)
                        .arg(left)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    released += n;
                    (offset, left) = (next, still);
                }
            }
        }
        Ok(released)
    }

    /// Written before the grant's own status, so that once a revocation has answered no
    /// reservation under the session can succeed.
    pub(super) async fn revoke_session(
        &self,
        policy: &str,
        session: B256,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = session_key(policy, session);
        // Status first: a key left without its TTL by a failure in between is harmless.
        let _: () = conn
            .hset(&key, "status", "revoked")
            .await
            .map_err(unavailable)?;
        let ttl = i64::try_from(ttl_secs(expires_at, now)).unwrap_or(i64::MAX);
        let _: () = conn.expire(&key, ttl).await.map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn session_spent(
        &self,
        policy: &str,
        session: B256,
    ) -> Result<BTreeMap<Address, U256>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: BTreeMap<String, String> = conn
            .hgetall(session_key(policy, session))
            .await
            .map_err(unavailable)?;
        let mut out = BTreeMap::new();
        for (field, value) in fields {
            if let Some(token) = field.strip_prefix("spent:") {
                let token: Address = token.parse().map_err(|_| StoreError::Corrupt(session))?;
                let amount =
                    U256::from_str_radix(&value, 10).map_err(|_| StoreError::Corrupt(session))?;
                if !amount.is_zero() {
                    out.insert(token, amount);
                }
            }
        }
        Ok(out)
    }

    /// From the expiry index: the start of the earliest bucket that still lists an open
    /// reservation (a lower bound of its validUntil: a watcher starts early, never late).
    pub(super) async fn oldest_open(&self, policies: &[String]) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let mut oldest: Option<u64> = None;
        for policy in policies {
            let first: Vec<(String, u64)> = conn
                .zrange_withscores(index_key(policy), 0, 0)
                .await
                .map_err(unavailable)?;
            if let Some((_, bucket)) = first.first() {
                let at = bucket * BUCKET_SECS;
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        Ok(oldest)
    }

    pub(super) async fn open(&self, policy: &str, scope: &str) -> Result<u64, StoreError> {
        Ok(self.counter(policy, scope).await?.open)
    }

    pub(super) async fn usage(&self, policy: &str, scope: &str) -> Result<(u64, u64), StoreError> {
        let c = self.counter(policy, scope).await?;
        Ok((c.cost, c.ops))
    }

    /// A budget counter's totals: its packed field plus the decimal fields an earlier version
    /// may still be writing, in the same hash or, for a sender, the key it kept the sender's
    /// counter in (`counter_totals` in `lib.lua`).
    async fn counter(&self, policy: &str, scope: &str) -> Result<Counter, StoreError> {
        let mut conn = self.conn.clone();
        let slot = counter_slot(policy, scope);
        let legacy = slot.legacy.as_deref().unwrap_or(&slot.key);
        type Legacy = (Option<i64>, Option<i64>, Option<i64>);
        let (packed, (cost, ops, open)): (Option<Vec<u8>>, Legacy) = redis::pipe()
            .hget(&slot.key, &slot.field)
            .cmd("HMGET")
            .arg(legacy)
            .arg("cost")
            .arg("ops")
            .arg("open")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let own = match packed {
            Some(p) => unpack_counter(&p).ok_or_else(|| {
                unavailable(format!("budget counter {scope}: {} bytes, not 24", p.len()))
            })?,
            None => [0; 3],
        };
        // Below zero only while a closing has not met its charge (see COUNTER in lib.lua).
        let total = |i: usize, legacy: Option<i64>| {
            u64::try_from(own[i].saturating_add(legacy.unwrap_or(0))).unwrap_or(0)
        };
        Ok(Counter {
            cost: total(0, cost),
            ops: total(1, ops),
            open: total(2, open),
        })
    }
}

/// A budget counter's totals.
struct Counter {
    cost: u64,
    ops: u64,
    open: u64,
}

/// `lib.lua`'s COUNTER field: cost, ops, open as three big-endian i64.
fn unpack_counter(packed: &[u8]) -> Option<[i64; 3]> {
    let packed: &[u8; 24] = packed.try_into().ok()?;
    let word = |i: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&packed[i * 8..i * 8 + 8]);
        i64::from_be_bytes(w)
    };
    Some([word(0), word(1), word(2)])
}
