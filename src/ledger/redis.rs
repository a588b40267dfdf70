//! The ledger in Redis: one `FCALL` of `reserve.lua` per sponsorship, or under load one for
//! several sponsorships of a policy (those that waited for its calls in flight, see
//! `ledger::batch`). The three scripts are one library of Redis Functions (see `library`),
//! loaded when the service connects and again whenever a Redis answers that it has no such
//! function (a restart without persistence, a new Cluster node). Keys, all but the last two
//! under the policy's `{policy}` hash tag so one reservation's keys share one Cluster slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `sp:{<policy>}:budget:<scope>` | hash | a scope's counter, field `c`: cost (gwei), ops and open (gwei), packed as three big-endian i64 (plus the decimal `cost`, `ops` and `open` of versions before 0.3, see `COUNTER` in `lib.lua`), and `until` (when Redis last made it expire, unix seconds by its own clock; see `reserve.lua`) |
//! | `sp:{<policy>}:budget:sender[:c<chain>][:<window>]` | hash | every sender's counter of a window: field the sender's 20 bytes, packed as `c` above; and `until` (see `counter_slot`; before 0.3, a hash per sender, `…:budget:sender:0x<sender>…`) |
//! | `sp:{<policy>}:budget:sender:d<day>` | hash | the counters of the policy's sessions that end UTC day `<day>` and whose grant shares its budget's (version 2, since 0.3.11): field the first 20 bytes of the session id's keccak-256, packed as `c` above, and beside it that field and `r`: `revoked` once the session is; and `until` (named as a sender's window is, so every library closes them; see `counter_slot`). A session of version 1 keeps `…:budget:session:0x<id>` |
//! | `sp:{<policy>}:n:<landing id>` | string | the reservations of one (EntryPoint, sender, nonce): per operation (20-byte idempotency id) a packed record (see `lib.lua`): state, cost, the signed answer, userOpHashes, scopes, session and spend |
//! | `sp:{<policy>}:x:<bucket>` | string | 20-byte landing ids of the signatures whose validUntil falls in this 10 s bucket, for release on expiry |
//! | `sp:{<policy>}:x` | sorted set | the expiry buckets |
//! | `sp:{<policy>}:session:<id>` | hash | the session's `status` (revocation seen by reservations; one charged to the session's shared budget reads it beside that budget's counter instead, `…:budget:sender:d<day>` above, where revocation writes it too) and `spent:<token>` totals |
//! | `sp:ledger:session-records-by-id` | string | set once no 0.3.0 replica may run: records under a session name it by id ([`SESSION_RECORDS_BY_ID_KEY`]) |
//! | `sp:ledger:sender-windows-since` | string | when the first replica of this layout ran (Redis' clock; 0 on a Redis no earlier version ran on): windows begun before it may have senders counted the old way ([`LAYOUT_SINCE_KEY`]) |
//!
//! Ids and hashes are raw bytes: landing ids and idempotency ids are the first 20 bytes of
//! their keccak keys, userOpHashes their first 8 (they only tell the few reservations of one
//! nonce apart). A reservation charged to a sender and a policy budget, with or without a
//! session (whose record names it by its id), takes under 400 bytes: its entry in the nonce's
//! string and 20 bytes of a bucket; with a sender new in the window, its field of the window's
//! hash too, about 510 in all (`cargo test --test it
//! ledger::a_reservation_takes_at_most_400_bytes_550_with_a_new_sender`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use alloy::primitives::{Address, B256, U256};
use redis::AsyncCommands;

use super::batch::{Batches, MAX_BATCH};
use super::{
    CallCounts, Exhausted, Landing, LedgerCalls, Outcome, Reservation, Resource, Settled,
    SpendExceeded,
};
use crate::session::StoreError;
use crate::session::redis::RedisConn;
use crate::userop::paymaster_data::{PaymasterData, ValidityWindow};

/// How many of Redis' replicas must hold a reservation or a revocation before the service
/// acts on it (`--redis-wait-replicas`), and how long it waits for them (`WAIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaWait {
    /// Replicas (at least 1).
    pub replicas: u32,
    /// Longest wait; then the write fails closed (it stands on the primary, counted).
    pub timeout: std::time::Duration,
}

/// What a call that waits for replicas wrote, for [`replicated`] to find on the primary before
/// it waits: each reservation answered (its nonce key and the 65-byte signature it is answered
/// with, unique to that answer), or a session state revoked.
enum Written<'a> {
    Reservations(Vec<(&'a [u8], &'a [u8])>),
    Revoked(&'a str),
}

/// `confirm.lua`'s text (`EVAL`: Redis keeps it compiled by its hash).
const CONFIRM: &str = include_str!("confirm.lua");

/// That `wait.replicas` replicas hold what a call `written` (keys of one policy, so of one
/// slot): `confirm.lua`, which finds it on the primary the pipeline reaches and writes a marker
/// key of the policy (`sp:{P}:replicated`), then `WAIT` for that marker, in one pipeline.
/// `WAIT` covers the writes of its own connection only, up to its last: the marker makes that
/// last write come after what the call wrote or found (a retry answered with the reservation
/// another service replica made, whose own wait failed, writes nothing else); and the
/// confirmation makes it the same primary's (after a failover the pipeline may reach a promoted
/// replica that never had the write, whose replicas would acknowledge the marker alone). A
/// write a failover would lose is a reservation forgotten, its cost with it, or a revocation
/// undone: with the wait, nothing is signed or answered revoked before a replica holds it. One
/// not found, or not acknowledged in time, fails closed: what was written stands where it
/// stands (a reservation counted until it expires; a retry gets its answer once the replicas
/// have it).
async fn replicated(
    conn: &mut RedisConn,
    wait: ReplicaWait,
    written: Written<'_>,
) -> Result<(), StoreError> {
    let (keys, wants): (Vec<&[u8]>, Vec<&[u8]>) = match &written {
        Written::Reservations(records) => records.iter().copied().unzip(),
        Written::Revoked(key) => (vec![key.as_bytes()], vec![b"revoked".as_slice()]),
    };
    // (Nothing answered: nothing to wait for.)
    let Some(first) = keys.first() else {
        return Ok(());
    };
    // The marker: `sp:{P}:` of the first key (a policy id has no `}`), then `replicated`.
    let prefix_end = first
        .windows(2)
        .position(|w| w == b"}:")
        .map(|i| i + 2)
        .ok_or_else(|| unavailable("a ledger key without its policy's slot"))?;
    let mut marker = first[..prefix_end].to_vec();
    marker.extend_from_slice(b"replicated");
    // (0 would wait for ever.)
    let ms = u64::try_from(wait.timeout.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut confirm = redis::cmd("EVAL");
    confirm.arg(CONFIRM).arg(keys.len() + 1).arg(marker);
    for key in &keys {
        confirm.arg(*key);
    }
    for want in &wants {
        confirm.arg(*want);
    }
    let (_, acknowledged): (i64, i64) = redis::pipe()
        .add_command(confirm)
        .cmd("WAIT")
        .arg(wait.replicas)
        .arg(ms)
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    if acknowledged < i64::from(wait.replicas) {
        return Err(StoreError::Unavailable(format!(
            "{acknowledged} of the {} Redis replicas waited for (--redis-wait-replicas) acknowledged the write within {ms} ms; it stands on the primary, retry",
            wait.replicas
        )));
    }
    Ok(())
}

/// Redis-backed ledger.
#[derive(Clone)]
pub struct RedisLedger {
    conn: RedisConn,
    /// Replicas each signing run's call and each revocation waits for, and the connection they
    /// go on (one of their own: Redis holds a connection's later commands while it waits, and
    /// every other request of this replica goes on `conn`); `None`: none.
    wait: Option<(ReplicaWait, RedisConn)>,
    /// Signing runs of a policy that wait for its call in flight, sent together in the next.
    batches: Arc<Batches<ReserveOp, redis::Value>>,
    /// Its checks (stubs, explanations: free to ask, rated per key only), apart, with bounds of
    /// their own, so that a flood of them refuses no signing run; they write nothing, and wait
    /// for no replica.
    checks: Arc<Batches<ReserveOp, redis::Value>>,
    /// A sender's counter in a window begun before this time (unix seconds: the time in
    /// [`LAYOUT_SINCE_KEY`] plus `LEGACY_MARGIN_SECS`), or in a budget without a period, may
    /// also be in the key a version before 0.3 kept it in (`budget_key` of its name), which `reserve.lua`
    /// then reads too. `u64::MAX`: every window; 0: none (no earlier version ran on this Redis).
    legacy_before: u64,
    /// Whether a reservation's record names its session by id (`SESSION_BY_ID` in `lib.lua`),
    /// or by its state key in full, as 0.3.0 did and still reads ([`SESSION_RECORDS_BY_ID_KEY`]):
    /// [`RedisLedger::refresh_record_kind`] sets it when the ledger connects, and again every
    /// `--policy-poll` (`AppState::spawn_ledger_watcher`).
    session_records_by_id: Arc<AtomicBool>,
    /// Whether new session grants may share their budget's counter (grant version 2,
    /// `SessionGrant::shared_budget`): where every ledger library loaded is of a replica that
    /// reads such grants ([`SHARED_BUDGETS_MARK`]). Set with `session_records_by_id`.
    shared_session_budgets: Arc<AtomicBool>,
    /// The ledger libraries this replica has read the code of, and what each one's marks say
    /// (a library's name carries a hash of its code, so what it says never changes).
    libraries_read: Arc<std::sync::Mutex<BTreeMap<String, Marks>>>,
    /// Why records are written by key ("" while by id), as last logged.
    record_kind_why: LastSaid,
    /// Why new grants keep a budget key of their own ("" while they share), as last logged.
    shared_budgets_why: LastSaid,
    /// Set while Redis would evict keys when full, or has: every reservation is then refused
    /// ([`RedisLedger::refresh_eviction`]).
    refusing_for_eviction: Arc<AtomicBool>,
    /// What the last eviction check found ("" when nothing), as last logged.
    eviction_said: LastSaid,
}

/// What a check run every poll last logged, so that it logs again only when that changes.
#[derive(Clone, Default)]
struct LastSaid(Arc<std::sync::Mutex<String>>);

impl LastSaid {
    /// Whether `now` differs from what was last said (then noted as said).
    fn changed(&self, now: &str) -> bool {
        self.0
            .lock()
            .map(|mut last| {
                let changed = *last != now;
                if changed {
                    now.clone_into(&mut last);
                }
                changed
            })
            .unwrap_or(true)
    }
}

/// Where Redis keeps the time the first replica of this ledger layout ran (`RedisLedger::connect`).
pub const LAYOUT_SINCE_KEY: &str = "sp:ledger:sender-windows-since";

/// Set when no replica of 0.3.0 may run on this Redis any more: replicas that start after it
/// is set name a reservation's session in its record by id (while no library of 0.3.0's ledger
/// is loaded either). 0.3.0 reads such a record as one without a session, and so would
/// under-count the session (charging a released operation that landed after all back to no
/// session). The first replica of a Redis no replica used before sets it; on one 0.3.0 served,
/// the operator does once the last 0.3.0 replica has stopped (docs/operations.md, upgrading
/// from 0.3.0 to 0.3.1).
pub const SESSION_RECORDS_BY_ID_KEY: &str = "sp:ledger:session-records-by-id";

/// The policies replicas served, a sorted set: each id scored with the latest time (Unix
/// seconds, a replica's clock) a replica noted it served it: at start, before a published set
/// comes into force, and on every policy poll. Every replica's watcher settles and releases
/// the reservations of all of them (`Ledger::watched_policies`), also those its own set lacks.
pub const SERVED_POLICIES_KEY: &str = "sp:ledger:policies";

/// The longest `max_validity` (s) of any policy set a replica served, a sorted set of one member
/// (`validity`) scored with it, only ever raised (`ZADD GT`): noted with the policies served,
/// before a set comes into force. A watcher without a cursor goes back by it, not only by its
/// own set's (another replica's policy, one since removed or shortened, may have signed for
/// longer): `Ledger::longest_validity_noted`.
pub const LONGEST_VALIDITY_KEY: &str = "sp:ledger:longest-validity";

/// A policy that no replica noted serving for this long, and that has no open reservation left
/// (no expiry index: every one settled or released), leaves [`SERVED_POLICIES_KEY`]: its
/// records are closed, and gone within their grace.
pub const RETIRED_AFTER_SECS: u64 = 86_400;

/// The (EntryPoint, paymaster) pairs replicas signed for on a chain, a sorted set per chain
/// (this prefix and the chain id): members `<EntryPoint>:<paymaster>` (lowercase 0x-hex), each
/// scored with the latest time until which a replica said a signature of its may land
/// (`Ledger::serve_paymasters`, `Ledger::watched_paymasters`).
pub const SERVED_PAYMASTERS_PREFIX: &str = "sp:ledger:paymasters:";

fn served_paymasters_key(chain_id: u64) -> String {
    format!("{SERVED_PAYMASTERS_PREFIX}{chain_id}")
}

/// How long after the time in [`LAYOUT_SINCE_KEY`] (Redis' clock) a window may begin (by a
/// replica's clock) and still be read as one an earlier version may have written to: the
/// replicas' clocks and Redis' differ by less.
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

/// Where a scope's counter lives: a sender's (`sender:0x<40 hex>…`) is a field, the address's
/// 20 bytes, of one hash per policy and window shared by every sender (`sp:{P}:budget:sender…`,
/// the name without the address), so a new sender makes no key and sets no TTL; every other
/// scope's is field `c` of its own hash. Before 0.3 a sender's counter was a hash of its own
/// under its full name (`budget_key` of it). A record lists the scopes it was counted in by `record`
/// names, which tell apart a sender counted this way (`s:0x…`, short: a record is stored per
/// reservation) from one counted in its own key (`sender:0x…`, a record of 0.2), so that each
/// is closed where it was counted (`counter_of` in `lib.lua`, which must agree).
struct CounterSlot<'a> {
    key: String,
    field: Cow<'static, [u8]>,
    /// A sender's (a version before 0.3 kept it under `budget_key` of its name).
    sender: bool,
    record: Cow<'a, str>,
    /// The session whose shared budget this is: its hash holds the session's status too,
    /// field [`STATUS_SUFFIX`] after the counter's (read by `reserve.lua`, written by
    /// `revoke_session.lua`).
    shared_session: Option<B256>,
}

/// The packed totals' field of a scope's own hash (`COUNTER` in `lib.lua`).
const COUNTER_FIELD: &[u8] = b"c";

/// A sender scope's address bytes and what follows them (`:c<chain>`, `:<window>`).
fn sender_scope(name: &str) -> Option<(Vec<u8>, &str)> {
    let rest = name.strip_prefix("sender:0x")?;
    // Lua's `0x(%x+)`: exactly 40 hex digits, then no further digit.
    let digits = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
    if digits != 40 {
        return None;
    }
    let raw = alloy::hex::decode(&rest[..40]).ok()?;
    Some((raw, &rest[40..]))
}

/// A shared session budget's name (`session:<end day>:0x<64 hex>`,
/// [`super::session_budget_scope`]): its day's digits and the session's id.
fn shared_session_scope(name: &str) -> Option<(&str, B256)> {
    let (day, id) = name.strip_prefix("session:")?.split_once(":0x")?;
    let digits = !day.is_empty() && day.bytes().all(|b| b.is_ascii_digit());
    let hex = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    Some((day, id.parse().ok()?)).filter(|_| digits && hex)
}

/// What follows a shared session budget's field, in its end day's hash, to name the field of
/// the session's status (`STATUS_SUFFIX` in `lib.lua`).
const STATUS_SUFFIX: &[u8] = b"r";

fn counter_slot<'a>(policy: &str, name: &'a str) -> CounterSlot<'a> {
    // A shared session budget is counted as a sender of a window is: a field of 20 bytes, in
    // one hash of the policy's sessions that end that day, `sp:{P}:budget:sender:d<day>` (a
    // sender's window is `:c<chain>` and `:<number>`, never `:d`). The field is the first 20
    // bytes of the id's keccak-256, not of the id: a tenant may name its sessions' ids, and
    // one that shares a policy with another and knew one of its ids could otherwise make a
    // session of its own that drains that one's budget, or revokes it. Its record name has the
    // sender's form, `s:0x<40 hex>:d<day>`, which `counter_of` has read since 0.3, so the
    // library of every version since closes it where it was counted. (Short: a record is
    // stored per reservation; `:session:<day>` took a reservation under a session from 384 to
    // 448 bytes of Redis.)
    if let Some((day, id)) = shared_session_scope(name) {
        let field = alloy::primitives::keccak256(id)[..20].to_vec();
        let record = format!("s:0x{}:d{day}", alloy::hex::encode(&field));
        return CounterSlot {
            key: format!("sp:{{{policy}}}:budget:sender:d{day}"),
            field: field.into(),
            sender: false,
            record: record.into(),
            shared_session: Some(id),
        };
    }
    match sender_scope(name) {
        Some((raw, rest)) => CounterSlot {
            key: format!("sp:{{{policy}}}:budget:sender{rest}"),
            field: raw.into(),
            sender: true,
            record: format!("s{}", &name["sender".len()..]).into(),
            shared_session: None,
        },
        None => CounterSlot {
            key: budget_key(policy, name),
            field: COUNTER_FIELD.into(),
            sender: false,
            record: name.into(),
            shared_session: None,
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
    format!("spent:0x{}", alloy::hex::encode(token))
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
                // (const-hex's vectorised decoder: a record packs two or three names a
                // sponsorship.)
                match alloy::hex::decode(hex) {
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

/// A record's session byte without a session (`NO_SESSION` in `lib.lua`).
const NO_SESSION: u8 = 0;
/// A record's session byte when its session's state key follows (`SESSION_BY_KEY`).
const SESSION_BY_KEY: u8 = 1;
/// A record's session byte when its session's 32-byte id follows (`SESSION_BY_ID`).
const SESSION_BY_ID: u8 = 2;

/// In a record by id, the name that stands for its session's budget,
/// [`super::session_scope_name`] (`SESSION_SCOPE` in `lib.lua`).
const SESSION_SCOPE: u8 = 3;

/// Where [`pack_entry`] puts the answer's signature: after the id's length and 20 bytes, the
/// record's u16 length, its state u8, cost u64, validUntil u48 and span u32.
const ENTRY_SIGNATURE: std::ops::Range<usize> = 42..107;

/// A new reservation's entry in its nonce's key, as `lib.lua`'s `entry` frames it: its
/// idempotency id, then its open record packed as `lib.lua`'s `pack_record` packs it: each
/// scope by its name in records (`slots`, in `r.scopes`' order); its session, `by_id`, by its
/// 32-byte id with its budget's name as one byte, or else by its state key with every name in
/// full (as 0.3.0 did, [`SESSION_RECORDS_BY_ID_KEY`]). The script stores it as it is, so the
/// hot path packs nothing in Lua. The two packers must agree byte for byte
/// (`ledger::the_service_packs_records_as_lib_lua_does` repacks records of each shape in Lua
/// and compares); settlement, release and extension unpack it in Lua.
fn pack_entry(r: &Reservation, slots: &[CounterSlot], by_id: bool) -> Result<Vec<u8>, StoreError> {
    let window = r.answer.window;
    let span = u32::try_from(window.valid_until.saturating_sub(window.valid_after))
        .map_err(|_| unavailable("a validity window over 2^32 seconds"))?;
    if window.valid_until >= 1 << 48 {
        return Err(unavailable("validUntil over 2^48"));
    }
    let mut out = Vec::with_capacity(192);
    short(&mut out, &r.op_key[..20])?;
    out.extend_from_slice(&[0, 0]); // the record's length, once packed
    let start = out.len();
    out.push(0); // open
    out.extend_from_slice(&r.cost_gwei.to_be_bytes());
    out.extend_from_slice(&window.valid_until.to_be_bytes()[2..]);
    out.extend_from_slice(&span.to_be_bytes());
    out.extend_from_slice(&r.answer.signature);
    out.push(u8::try_from(r.user_op_hashes.len()).map_err(|_| unavailable("over 255 hashes"))?);
    for h in &r.user_op_hashes {
        out.extend_from_slice(&h[..8]);
    }
    out.push(u8::try_from(slots.len()).map_err(|_| unavailable("over 255 scopes"))?);
    // By id, the session's budget's name is one byte.
    let budget = r
        .session
        .as_ref()
        .filter(|_| by_id)
        .map(|s| super::session_scope_name(s.id));
    for slot in slots {
        if budget.as_deref() == Some(&*slot.record) {
            short(&mut out, &[SESSION_SCOPE])?;
        } else {
            short(&mut out, &pack_name(&slot.record))?;
        }
    }
    match &r.session {
        Some(session) => {
            if by_id {
                // Its id, which with the policy names its state key.
                out.push(SESSION_BY_ID);
                out.extend_from_slice(session.id.as_slice());
            } else {
                out.push(SESSION_BY_KEY);
                short(&mut out, &pack_name(&session_key(&r.policy, session.id)))?;
            }
            out.push(
                u8::try_from(session.spend.len())
                    .map_err(|_| unavailable("over 255 token caps"))?,
            );
            for t in &session.spend {
                short(&mut out, &pack_name(&spent_field(t.token)))?;
                short(&mut out, t.amount.to_string().as_bytes())?;
            }
        }
        None => out.push(NO_SESSION),
    }
    let len = u16::try_from(out.len() - start)
        .map_err(|_| unavailable("ledger record over 65535 bytes"))?;
    out[start - 2..start].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// The ledger's scripts as one library of Redis Functions: `lib.lua`'s helpers, then each of
/// `reserve.lua`, `settle.lua` and `release.lua` as a function of `(KEYS, ARGV)`. A library's
/// helpers are made once, when it loads; an `EVALSHA` ran the whole text, helpers included, on
/// every call: the function takes about 8 % less of redis-server's CPU per reservation
/// (`ROUNDS=21 python3 benches/reserve_lua.py variants`, docs/performance.md). The names carry
/// a hash of the code, so replicas of different versions on one Redis each call their own.
struct Library {
    /// The library's code, for `FUNCTION LOAD`.
    code: String,
    /// The functions: `reserve.lua`, `settle.lua` and `release.lua`.
    reserve: String,
    settle: String,
    release: String,
}

/// The ledger's library of Redis Functions.
fn library() -> &'static Library {
    static LIBRARY: std::sync::OnceLock<Library> = std::sync::OnceLock::new();
    LIBRARY.get_or_init(|| {
        let lib = include_str!("lib.lua");
        let bodies = [
            include_str!("reserve.lua"),
            include_str!("settle.lua"),
            include_str!("release.lua"),
        ];
        // Each function: a script's text as the body of a function of (KEYS, ARGV).
        const REGISTER: &str = "redis.register_function('NAME', function(KEYS, ARGV)\nBODY\nend)\n";
        // The tag covers every byte of the code but itself.
        let digest =
            alloy::primitives::keccak256([REGISTER, lib, bodies[0], bodies[1], bodies[2]].concat());
        let tag = hex::encode(&digest[..6]);
        let names = ["reserve", "settle", "release"].map(|f| format!("sp_{f}_{tag}"));
        let mut code = format!("#!lua name=sp_ledger_{tag}\n{lib}\n");
        for (name, body) in names.iter().zip(bodies) {
            code.push_str(&REGISTER.replacen("NAME", name, 1).replacen("BODY", body, 1));
        }
        let [reserve, settle, release] = names;
        Library {
            code,
            reserve,
            settle,
            release,
        }
    })
}

/// retire.lua, run as the session store runs its scripts (`EVALSHA`, loaded when missing).
fn retire_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(include_str!("retire.lua")))
}

/// revoke_session.lua, run as retire.lua is.
fn revoke_session_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(include_str!("revoke_session.lua")))
}

/// `FCALL function numkeys keys… args…`.
fn fcall(function: &str, keys: &[&[u8]]) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(function).arg(keys.len());
    for k in keys {
        cmd.arg(*k);
    }
    cmd
}

/// `reserve.lua`'s reply for an operation that failed with an error (`FAILED` in `lib.lua`).
const RESERVE_FAILED: i64 = 9;

/// One reservation's part of a call of `reserve.lua`: its keys and its arguments.
struct ReserveOp {
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl ReserveOp {
    /// The call's frame counts each operation's keys and arguments in a byte.
    fn new(keys: Vec<Vec<u8>>, args: Vec<Vec<u8>>) -> Result<Self, StoreError> {
        if keys.len() > 255 || args.len() > 255 {
            return Err(unavailable("a reservation of over 255 keys or arguments"));
        }
        Ok(Self { keys, args })
    }
}

/// The calls of reservations gathered per policy (`ledger::batch`), on `conn`, each followed by
/// a wait for replicas where one is asked for: a call's replies are given only once they hold
/// it (a wait that fails fails every reservation of the call, closed).
fn reserve_batches(
    conn: RedisConn,
    wait: Option<ReplicaWait>,
) -> Arc<Batches<ReserveOp, redis::Value>> {
    Batches::new(Arc::new(move |ops| {
        let mut conn = conn.clone();
        Box::pin(async move {
            let replies: Vec<redis::Value> = call(&mut conn, &reserve_call(&ops)).await?;
            if let Some(wait) = wait {
                replicated(&mut conn, wait, answered(&ops, &replies)?).await?;
            }
            Ok(replies)
        })
    }))
}

/// The reservations of a call that signing answers (codes 0, reserved, and 1, a reservation
/// made before), each by its nonce key and the signature it is answered with, which its record
/// holds (an extended or replaced record keeps its operation's id, so the id would find the
/// record as it was before the answer). The others sign nothing.
fn answered<'a>(
    ops: &'a [ReserveOp],
    replies: &'a [redis::Value],
) -> Result<Written<'a>, StoreError> {
    if replies.len() != ops.len() {
        return Err(unavailable(
            "reserve.lua answered another count of operations",
        ));
    }
    let mut answered = Vec::new();
    for (op, reply) in ops.iter().zip(replies) {
        let fields = match reply {
            redis::Value::Array(fields) => fields.as_slice(),
            _ => &[],
        };
        let signature = match fields.first() {
            // The new record's, in its entry.
            Some(redis::Value::Int(0)) => op.args.get(1).and_then(|e| e.get(ENTRY_SIGNATURE)),
            // The stored answer's.
            Some(redis::Value::Int(1)) => match fields.get(3) {
                Some(redis::Value::BulkString(sig)) => Some(sig.as_slice()),
                _ => None,
            },
            _ => continue,
        };
        let (Some(key), Some(signature)) = (op.keys.first(), signature) else {
            return Err(unavailable(
                "an answer of reserve.lua without its signature",
            ));
        };
        answered.push((key.as_slice(), signature));
    }
    Ok(Written::Reservations(answered))
}

/// `FCALL` of `reserve.lua` for `ops` (at most [`MAX_BATCH`]), in turn: their keys, then the
/// frame (each one's count of keys and of arguments, a byte each), then their arguments.
fn reserve_call(ops: &[ReserveOp]) -> redis::Cmd {
    debug_assert!(ops.len() <= MAX_BATCH);
    let keys: Vec<&[u8]> = ops
        .iter()
        .flat_map(|op| op.keys.iter().map(Vec::as_slice))
        .collect();
    let mut cmd = fcall(&library().reserve, &keys);
    // (ReserveOp::new keeps both counts below 256.)
    let frame: Vec<u8> = ops
        .iter()
        .flat_map(|op| [op.keys.len() as u8, op.args.len() as u8])
        .collect();
    cmd.arg(frame);
    for op in ops {
        for arg in &op.args {
            cmd.arg(arg.as_slice());
        }
    }
    cmd
}

/// Run a call of the ledger's library; where Redis has no such function (never loaded, lost in
/// a restart without persistence, a new Cluster node), load the library on every primary and
/// call again (the call did nothing: it never ran). One load at a time in this process: the
/// calls that found no function while it loads try again once it is done, and load only if
/// they still find none.
async fn call<T: redis::FromRedisValue>(
    conn: &mut RedisConn,
    cmd: &redis::Cmd,
) -> Result<T, StoreError> {
    static LOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    // Redis' answer exactly (`ERR Function not found`): no error a function raises reads so.
    let missing = |e: &redis::RedisError| e.detail() == Some("Function not found");
    match cmd.query_async(conn).await {
        Err(e) if missing(&e) => {
            let _one = LOADING.lock().await;
            match cmd.query_async(conn).await {
                Err(e) if missing(&e) => {
                    load_library(conn).await?;
                    cmd.query_async(conn).await.map_err(unavailable)
                }
                other => other.map_err(unavailable),
            }
        }
        other => other.map_err(unavailable),
    }
}

/// `FUNCTION LOAD REPLACE` of the ledger's library (on every primary of a Cluster). Replacing
/// it with the same code changes nothing for calls in flight elsewhere.
async fn load_library(conn: &mut RedisConn) -> Result<(), StoreError> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&library().code)
        .query_async::<redis::Value>(conn)
        .await
        .map(drop)
        .map_err(unavailable)
}

/// The line every library of the ledger that reads records under a session by id carries
/// (in `lib.lua`; `library_code_carries_its_marks` checks it is there).
const RECORDS_BY_ID_MARK: &str =
    "\n-- records-by-id: this ledger reads records under a session by id\n";

/// The line every library of a ledger whose replicas read session grants of version 2 (a
/// session's budget counted in its end day's hash, since 0.3.11) carries. Replicas of every
/// earlier version refuse such a grant (as corrupt): new grants are made so only while no
/// library without the line is loaded, so that sessions are not refused by a replica of a
/// rolling upgrade.
const SHARED_BUDGETS_MARK: &str =
    "\n-- shared-session-budgets: this ledger's replicas read grants whose budget is shared\n";

/// What this replica writes, as what Redis holds allows ([`RedisLedger::refresh_record_kind`]),
/// each with why not ("" when it does).
#[derive(Debug, PartialEq, Eq)]
struct Layout {
    /// Records under a session by id.
    by_id: bool,
    why: String,
    /// New session grants whose budget is shared (version 2).
    shared: bool,
    shared_why: String,
}

impl Layout {
    /// From whether [`SESSION_RECORDS_BY_ID_KEY`] is set (`said`) and the libraries loaded that
    /// lack a mark (`earlier`; anything unread is neither).
    fn of(said: &Result<bool, String>, earlier: &Result<Vec<(String, Marks)>, String>) -> Self {
        let lacking = |mark: fn(&Marks) -> bool| {
            earlier.as_ref().map(|e| {
                e.iter()
                    .filter(|(_, m)| !mark(m))
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
            })
        };
        let not_by_id = lacking(|m| m.by_id);
        let by_id = matches!(said, Ok(true)) && not_by_id.as_ref().is_ok_and(Vec::is_empty);
        let why = match (said, &not_by_id) {
            _ if by_id => String::new(),
            (Err(e), _) => format!("{SESSION_RECORDS_BY_ID_KEY} could not be read ({e})"),
            (_, Err(e)) => format!("the ledger's libraries could not be read ({e})"),
            (_, Ok(earlier)) if !earlier.is_empty() => format!(
                "Redis has the library of a ledger that cannot read them by id, {earlier:?}: FUNCTION DELETE each on every primary once no replica of its build runs"
            ),
            _ => format!("{SESSION_RECORDS_BY_ID_KEY} is not set"),
        };
        // Grants whose budget is shared, only where no replica that would refuse them may run
        // (every earlier version refuses a grant of another version: such a session is
        // refused there, never counted in a key of its own).
        let not_shared = lacking(|m| m.shared_budgets);
        let shared = not_shared.as_ref().is_ok_and(Vec::is_empty);
        let shared_why = match &not_shared {
            _ if shared => String::new(),
            Err(e) => format!("the ledger's libraries could not be read ({e})"),
            Ok(earlier) => format!(
                "Redis has the library of a ledger whose replicas refuse such grants, {earlier:?}: FUNCTION DELETE each on every primary once no replica of its build runs"
            ),
        };
        Self {
            by_id,
            why,
            shared,
            shared_why,
        }
    }
}

/// What a ledger library's code says of the replicas that load it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Marks {
    /// It reads records under a session by id ([`RECORDS_BY_ID_MARK`]).
    by_id: bool,
    /// Its replicas read grants whose budget is shared ([`SHARED_BUDGETS_MARK`]).
    shared_budgets: bool,
}

/// `FUNCTION LIST LIBRARYNAME <pattern>` (`WITHCODE` if `code`) on every primary: one reply
/// each. On a Cluster, fewer replies than primaries serving slots is an error: a primary not
/// asked may hold what the others do not.
async fn function_list(
    conn: &RedisConn,
    pattern: &str,
    code: bool,
) -> Result<Vec<redis::Value>, String> {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LIST").arg("LIBRARYNAME").arg(pattern);
    if code {
        cmd.arg("WITHCODE");
    }
    match conn.clone() {
        RedisConn::Single(mut c) => Ok(vec![
            cmd.query_async(&mut c).await.map_err(|e| e.to_string())?,
        ]),
        RedisConn::Cluster(mut c) => {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            let primaries = info
                .lines()
                .find_map(|l| l.strip_prefix("cluster_size:"))
                .and_then(|n| n.trim().parse::<usize>().ok())
                .ok_or("CLUSTER INFO named no cluster_size")?;
            // (Without a response policy: each node's reply under its address.)
            let replies = c
                .route_command(
                    cmd,
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await
                .map_err(|e| e.to_string())?;
            let redis::Value::Map(pairs) = replies else {
                return Err(format!(
                    "FUNCTION LIST answered {:.200}",
                    format!("{replies:?}")
                ));
            };
            if pairs.len() < primaries {
                return Err(format!(
                    "FUNCTION LIST answered by {} of {primaries} primaries",
                    pairs.len()
                ));
            }
            Ok(pairs.into_iter().map(|(_, v)| v).collect())
        }
    }
}

/// The libraries `FUNCTION LIST` replies (one a node) list: each name, and its code where the
/// replies hold it (`WITHCODE`); what a reply of another shape is, where one is.
fn listed_libraries(replies: &[redis::Value]) -> Result<Vec<(String, Option<String>)>, String> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    for reply in replies {
        let Value::Array(libraries) = reply else {
            return Err(format!(
                "FUNCTION LIST answered {:.200}",
                format!("{reply:?}")
            ));
        };
        for library in libraries {
            // Each library a map: RESP2 sends it as a flat array of names and values.
            let pairs: Vec<(&Value, &Value)> = match library {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|p| Some((p.first()?, p.get(1)?)))
                    .collect(),
                Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
                other => {
                    return Err(format!(
                        "FUNCTION LIST listed {:.200}",
                        format!("{other:?}")
                    ));
                }
            };
            let field = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| text(k).as_deref() == Some(name))
                    .and_then(|(_, v)| text(v))
            };
            let name =
                field("library_name").ok_or("FUNCTION LIST listed a library without its name")?;
            out.push((name, field("library_code")));
        }
    }
    Ok(out)
}

/// What library `name`, in `FUNCTION LIST LIBRARYNAME <name> WITHCODE` replies (one a node),
/// says of its replicas: the marks its code carries. Not listed with its code (gone since it
/// was listed, say): an error, nothing known.
fn library_marks(replies: &[redis::Value], name: &str) -> Result<Marks, String> {
    let listed = listed_libraries(replies)?;
    let code = listed
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, code)| code.as_deref())
        .ok_or_else(|| format!("{name}: its code could not be read"))?;
    Ok(Marks {
        by_id: code.contains(RECORDS_BY_ID_MARK),
        shared_budgets: code.contains(SHARED_BUDGETS_MARK),
    })
}

impl RedisLedger {
    /// A ledger on `conn` that reads, besides each sender's counter, the key versions before
    /// 0.3 kept it in, in every window, and writes records under a session by key, as 0.3.0
    /// did: for tools and tests. The service opens its ledger with [`RedisLedger::connect`].
    pub fn new(conn: RedisConn) -> Self {
        Self {
            batches: reserve_batches(conn.clone(), None),
            checks: reserve_batches(conn.clone(), None),
            conn,
            wait: None,
            legacy_before: u64::MAX,
            session_records_by_id: Arc::new(AtomicBool::new(false)),
            shared_session_budgets: Arc::new(AtomicBool::new(false)),
            libraries_read: Arc::default(),
            record_kind_why: LastSaid::default(),
            shared_budgets_why: LastSaid::default(),
            refusing_for_eviction: Arc::default(),
            eviction_said: LastSaid::default(),
        }
    }

    /// This ledger with its signing runs' calls and its revocations waiting for `wait`, on
    /// `conn`, a connection to the same Redis kept for them (see [`ReplicaWait`]).
    #[must_use]
    pub fn with_replica_wait(mut self, wait: ReplicaWait, conn: RedisConn) -> Self {
        // (Before any reservation: the new calls' counts start again from none.)
        debug_assert_eq!(self.batches.counts(), CallCounts::default());
        self.batches = reserve_batches(conn.clone(), Some(wait));
        self.wait = Some((wait, conn));
        self
    }

    /// Read again what every node of Redis says of eviction (`session::redis::eviction`), which
    /// [`Self::connect`] checked at start: a `CONFIG SET` since, a node added or one that did
    /// not answer then may evict keys when full, or may have. While one would, or has, every
    /// reservation is refused, checks included (fail closed: a counter or a record evicted is a
    /// cost forgotten, a revocation undone), and `/readyz` and `sp_ledger_refusing_eviction` say
    /// so; they resume once every node answers without such a finding. A node that answers an
    /// error, or an `INFO` that fails as a whole (on a Cluster, one node unreachable fails it
    /// for every node), leaves what the last check found (the next check reads again; keys a
    /// node evicted meanwhile are still counted once every node answers). Logs what it found
    /// when that changes; the service calls it every `--policy-poll`.
    pub async fn refresh_eviction(&self) {
        let mut conn = self.conn.clone();
        let found = crate::session::redis::eviction(&mut conn)
            .await
            .unwrap_or_else(|e| crate::session::redis::Eviction {
                unread: Some(e.to_string()),
                ..Default::default()
            });
        let refusing = match (&found.why, &found.unread) {
            (Some(_), _) => true,
            (None, None) => false,
            (None, Some(_)) => self.refusing_for_eviction(),
        };
        self.refusing_for_eviction
            .store(refusing, Ordering::Relaxed);
        let said = format!(
            "{refusing} {:?} {:?} {}",
            found.why, found.unread, found.hidden
        );
        if !self.eviction_said.changed(&said) {
            return;
        }
        match (&found.why, &found.unread) {
            (Some(why), _) => tracing::error!("reservations refused: {why}"),
            (None, Some(unread)) => tracing::warn!(
                refusing,
                "eviction unchecked on a Redis node ({unread}): reservations stay as the last check left them; read again next poll"
            ),
            (None, None) => tracing::info!("no Redis node evicts keys: reservations are taken"),
        }
        if found.hidden {
            tracing::warn!("{}", crate::session::redis::HIDDEN_POLICY);
        }
    }

    /// Whether reservations are refused because Redis would evict keys when full, or has, as
    /// the last [`Self::refresh_eviction`] found.
    pub fn refusing_for_eviction(&self) -> bool {
        self.refusing_for_eviction.load(Ordering::Relaxed)
    }

    /// The calls of `reserve.lua` this ledger (and its clones) made so far and the operations
    /// they carried, its signing runs' and its checks' (each gathered apart, `ledger::batch`).
    pub fn call_counts(&self) -> LedgerCalls {
        LedgerCalls {
            sign: self.batches.counts(),
            check: self.checks.counts(),
        }
    }

    /// Whether this replica may write records under a session by id, read afresh: the operator
    /// said no 0.3.0 replica runs ([`SESSION_RECORDS_BY_ID_KEY`]), and no primary has a
    /// library of a ledger that cannot read them (a 0.3.0 replica loads its own when it starts,
    /// and again when it finds it gone). Anything it cannot read counts as such a library.
    /// Logs which kind and why when that changes; the service calls it every `--policy-poll`,
    /// so a 0.3.0 replica started later turns records by id off within one poll. Reads with
    /// them whether new session grants may share their budget's counter
    /// ([`Self::shared_session_budgets`]): where every library loaded carries
    /// [`SHARED_BUDGETS_MARK`] (a replica of an earlier version started later turns it off
    /// within one poll; the grants that already share keep sharing, and such a replica refuses
    /// them).
    pub async fn refresh_record_kind(&self) -> bool {
        self.read_record_kind(false).await
    }

    /// [`Self::refresh_record_kind`], logging which kind and why when `announce`, else only
    /// when the why changes.
    async fn read_record_kind(&self, announce: bool) -> bool {
        let mut c = self.conn.clone();
        let said = c
            .exists::<_, bool>(SESSION_RECORDS_BY_ID_KEY)
            .await
            .map_err(|e| e.to_string());
        let earlier = match function_list(&self.conn, "sp_ledger_*", false).await {
            Ok(replies) => self.earlier_libraries(&replies).await,
            Err(e) => Err(e),
        };
        let Layout {
            by_id,
            why,
            shared,
            shared_why,
        } = Layout::of(&said, &earlier);
        self.session_records_by_id.store(by_id, Ordering::Relaxed);
        self.shared_session_budgets.store(shared, Ordering::Relaxed);
        if announce || self.shared_budgets_why.changed(&shared_why) {
            if shared {
                tracing::info!(
                    "new sessions share their budget's counter (one hash a policy and end day)"
                );
            } else {
                tracing::warn!(
                    "new sessions keep a budget key of their own, as 0.3.10 made them: {shared_why} (docs/operations.md, upgrading to 0.3.11)"
                );
            }
        }
        let changed = self.record_kind_why.changed(&why);
        if announce || changed {
            if by_id {
                tracing::info!("records under sessions are written by id");
            } else {
                tracing::warn!(
                    "records under sessions are written as 0.3.0 wrote them (by key): {why} (docs/operations.md, upgrading from 0.3.0)"
                );
            }
        }
        by_id
    }

    /// Of the libraries `replies` name (`FUNCTION LIST` without code), those that lack a mark,
    /// with their marks, each one's code read once (a library's name carries a hash of its code).
    async fn earlier_libraries(
        &self,
        replies: &[redis::Value],
    ) -> Result<Vec<(String, Marks)>, String> {
        let mut earlier: Vec<(String, Marks)> = Vec::new();
        for (name, _) in listed_libraries(replies)? {
            let known = self
                .libraries_read
                .lock()
                .map_err(|_| "a lock was poisoned")?
                .get(&name)
                .copied();
            let marks = match known {
                Some(m) => m,
                None => {
                    // (The name as the pattern: only the library of this very name is read.)
                    let replies = function_list(&self.conn, &name, true).await?;
                    let m = library_marks(&replies, &name)?;
                    self.libraries_read
                        .lock()
                        .map_err(|_| "a lock was poisoned")?
                        .insert(name.clone(), m);
                    m
                }
            };
            let complete = marks.by_id && marks.shared_budgets;
            if !complete && !earlier.iter().any(|(n, _)| *n == name) {
                earlier.push((name, marks));
            }
        }
        Ok(earlier)
    }

    /// Whether new session grants may share their budget's counter, as the last
    /// [`Self::refresh_record_kind`] found.
    pub fn shared_session_budgets(&self) -> bool {
        self.shared_session_budgets.load(Ordering::Relaxed)
    }

    /// The service's ledger on `conn`, its library of functions loaded. The first replica of
    /// this layout to run notes Redis' time in [`LAYOUT_SINCE_KEY`] (0 if no replica has used
    /// this Redis before): a version before 0.3 counted senders in keys of their own, which
    /// are read only in windows begun before that time (plus the margin) and in budgets
    /// without a period. A replica of such a version must not run beside this one
    /// (docs/operations.md, upgrading to 0.3). It writes records under a session by id where
    /// [`SESSION_RECORDS_BY_ID_KEY`] is set and no library of a ledger that cannot read them
    /// is loaded, else by key (as 0.3.0 did).
    pub async fn connect(conn: RedisConn) -> Result<Self, StoreError> {
        let mut c = conn.clone();
        // No ledger on a Redis that evicts keys, or did (`refresh_eviction` reads it again
        // every poll); the commands that only read or publish connect without this check.
        let found = crate::session::redis::eviction(&mut c).await?;
        if let Some(why) = found.why.or(found.unread) {
            return Err(StoreError::Unavailable(why));
        }
        if found.hidden {
            tracing::warn!("{}", crate::session::redis::HIDDEN_POLICY);
        }
        let (now, _): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        // A Redis no replica has served yet (none published a policy set) holds no counter of
        // an earlier layout: 0, no window to read the old keys in.
        let served: bool = c
            .exists(crate::policy::publish::CURRENT)
            .await
            .map_err(unavailable)?;
        let first = if served { now } else { 0 };
        // The first replica's time stays: NX, and GET answers what was there.
        let noted: Option<u64> = redis::cmd("SET")
            .arg(LAYOUT_SINCE_KEY)
            .arg(first)
            .arg("NX")
            .arg("GET")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let since = noted.unwrap_or(first);
        // Records by id from the start on a Redis no replica used before this one (it noted
        // the layout's time first, on a Redis with no policy set published); on any other,
        // once the operator says no 0.3.0 replica runs (SESSION_RECORDS_BY_ID_KEY). And in
        // either case only while no library of a ledger that cannot read them is loaded: a
        // replica of that build may still run (it loads its library when it starts, and again
        // when it finds it gone).
        if !served && noted.is_none() {
            let _: () = redis::cmd("SET")
                .arg(SESSION_RECORDS_BY_ID_KEY)
                .arg(now)
                .arg("NX")
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
        }
        load_library(&mut conn.clone()).await?;
        let ledger = Self {
            legacy_before: match since {
                0 => 0,
                since => since.saturating_add(LEGACY_MARGIN_SECS),
            },
            ..Self::new(conn)
        };
        ledger.read_record_kind(true).await;
        Ok(ledger)
    }

    pub(super) async fn reserve(
        &self,
        r: &Reservation,
        check_only: bool,
        now: u64,
    ) -> Result<Outcome, StoreError> {
        if self.refusing_for_eviction() {
            return Err(StoreError::Unavailable(
                "Redis evicts keys, or has: reservations are refused until no node does \
                 (docs/operations.md)"
                    .into(),
            ));
        }
        let ttl = |at: u64| ttl_secs(at, now);
        let nonce = nonce_key(&r.policy, r.landing_key);
        let bucket = r.answer.window.valid_until / BUCKET_SECS;
        let index = index_key(&r.policy);
        let bucket_key = bucket_key(&r.policy, bucket);
        let session = r.session.as_ref().map(|s| session_key(&r.policy, s.id));
        let slots: Vec<CounterSlot> = r
            .scopes
            .iter()
            .map(|s| counter_slot(&r.policy, &s.name))
            .collect();
        // An operation's args[3] (see reserve.lua), per scope: cost limit (Scope::cost_cap;
        // u64::MAX: none), ops limit (u64::MAX: none), TTL, the counter's field and the scope's
        // name in records (u8-length-prefixed), and its kind: 1 if the key an earlier version
        // kept a sender's counter in is to be read too, 2 for the budget of the operation's
        // session where its hash holds the session's status (a shared one), else 0.
        let mut scopes = Vec::with_capacity(r.scopes.len() * 96);
        for (s, slot) in r.scopes.iter().zip(&slots) {
            // A window begun since the first replica of 0.3 ran has no sender counted the old
            // way, nor has any window of a Redis no earlier version ran on.
            let legacy = slot.sender
                && self.legacy_before > 0
                && s.starts_at.is_none_or(|start| start < self.legacy_before);
            // (The slot parsed the name already: no second parse on the signing path.)
            let status = r
                .session
                .as_ref()
                .is_some_and(|session| slot.shared_session == Some(session.id));
            for n in [
                s.cost_cap().unwrap_or(u64::MAX),
                s.ops_limit.unwrap_or(u64::MAX),
                ttl(s.expires_at),
            ] {
                scopes.extend_from_slice(&n.to_be_bytes());
            }
            short(&mut scopes, &slot.field)?;
            short(&mut scopes, slot.record.as_bytes())?;
            scopes.push(match (legacy, status) {
                (true, _) => 1,
                (false, true) => 2,
                (false, false) => 0,
            });
        }
        // Its args[2]: the new record's whole entry in the nonce's key (its id, signature and
        // hashes, which reserve.lua reads from it).
        let entry = pack_entry(
            r,
            &slots,
            self.session_records_by_id.load(Ordering::Relaxed),
        )?;
        // Its keys (the slots' moved in); without a session the nonce's again in the session's
        // place (unused there).
        let session = match session {
            Some(key) => key.into_bytes(),
            None => nonce.clone(),
        };
        let mut keys: Vec<Vec<u8>> = Vec::with_capacity(4 + slots.len());
        keys.extend([nonce, index.into_bytes(), bucket_key.into_bytes(), session]);
        keys.extend(slots.into_iter().map(|s| s.key.into_bytes()));
        let spend = r
            .session
            .as_ref()
            .map(|s| s.spend.as_slice())
            .unwrap_or_default();
        // Its args[1], in reserve.lua's order: big-endian u64s that Lua unpacks without parsing.
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
        let mut args = Vec::with_capacity(3 + 3 * spend.len());
        args.extend([numbers, entry, scopes]);
        for t in spend {
            args.extend([
                spent_field(t.token).into_bytes(),
                t.amount.to_string().into_bytes(),
                t.limit.to_string().into_bytes(),
            ]);
        }
        // Its own reply, from the call it went in with any others of its policy (its checks
        // with its checks).
        let batches = if check_only {
            &self.checks
        } else {
            &self.batches
        };
        let reply = batches
            .submit(&r.policy, ReserveOp::new(keys, args)?)
            .await?;
        let reply: Vec<redis::Value> = redis::from_redis_value(reply).map_err(unavailable)?;
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
                // The scope's place in r.scopes.
                let scope = usize::try_from(number(1)?)
                    .ok()
                    .and_then(|i| r.scopes.get(i))
                    .ok_or_else(|| unavailable("reserve.lua named no scope of ours"))?;
                let (scope, rule) = (scope.name.clone(), scope.rule.clone());
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
            5 => Ok(Outcome::NoncePending),
            6 => Ok(Outcome::NonceFull(number(1)?)),
            // An error of this operation's (the others of its call went on).
            RESERVE_FAILED => Err(unavailable(format!("reserve.lua: {}", text(1)?))),
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
            let mut cmd = fcall(
                &library().settle,
                &[&nonce_key(policy, landing.landing_key)],
            );
            cmd.arg("probe").arg(&landing.user_op_hash[..8]);
            let (found, records): (i64, i64) = call(&mut conn, &cmd).await?;
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
            let mut cmd = fcall(
                &library().settle,
                &[&nonce_key(policy, landing.landing_key)],
            );
            cmd.arg("settle")
                .arg(&landing.user_op_hash[..8])
                .arg(landing.actual_gwei)
                .arg(found);
            let (settled, superseded, charged, ambiguous): (usize, usize, usize, u8) =
                call(&mut conn, &cmd).await?;
            out.settled += settled;
            out.superseded += superseded;
            out.charged_back += charged;
            out.ambiguous |= ambiguous == 1;
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
                    let mut cmd = fcall(
                        &library().release,
                        &[
                            bucket_key(policy, bucket).as_bytes(),
                            index_key(policy).as_bytes(),
                        ],
                    );
                    cmd.arg(confirmed_time)
                        .arg(bucket)
                        .arg(offset)
                        .arg(RELEASE_SLICE)
                        .arg(left);
                    let (n, next, still): (usize, i64, i64) = call(&mut conn, &cmd).await?;
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
        budget: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        let mut conn = match &self.wait {
            Some((_, waited)) => waited.clone(),
            None => self.conn.clone(),
        };
        let key = session_key(policy, session);
        let ttl = i64::try_from(ttl_secs(expires_at, now)).unwrap_or(i64::MAX);
        let mut script = revoke_session_script().key(&key);
        script.arg(ttl);
        // A shared budget's hash holds the status too: reservations read it there.
        let slot = counter_slot(policy, budget);
        if slot.shared_session == Some(session) {
            script
                .key(&slot.key)
                .arg([&*slot.field, STATUS_SUFFIX].concat());
        }
        let _: i64 = script.invoke_async(&mut conn).await.map_err(unavailable)?;
        if let Some((wait, _)) = self.wait {
            // (It confirms the state key's status alone: the one script wrote both, so a
            // primary that holds one holds the other. Split them, and confirm.lua must check
            // both.)
            replicated(&mut conn, wait, Written::Revoked(&key)).await?;
        }
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

    /// `ZADD GT` of `members` at `score` to the sorted set `key` (none: nothing): a replica
    /// whose clock is behind never lowers a member's score.
    async fn note_served(
        &self,
        key: &str,
        members: impl IntoIterator<Item = String>,
        score: u64,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(key).arg("GT");
        let mut any = false;
        for member in members {
            cmd.arg(score).arg(member);
            any = true;
        }
        if any {
            let _: i64 = cmd
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// `own`, then every member of the sorted set `key` not among them, parsed by `parse`
    /// (a member that does not parse fails the read).
    async fn read_served<T: PartialEq + Clone>(
        &self,
        key: &str,
        own: &[T],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, StoreError> {
        let served: Vec<String> = self
            .conn
            .clone()
            .zrange(key, 0, -1)
            .await
            .map_err(unavailable)?;
        let mut out = own.to_vec();
        for member in served {
            let item = parse(&member).ok_or_else(|| {
                StoreError::Unavailable(format!("{key} holds `{member}`, which does not parse"))
            })?;
            if !out.contains(&item) {
                out.push(item);
            }
        }
        Ok(out)
    }

    pub(super) async fn serve_policies(
        &self,
        policies: &[String],
        longest_validity: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        self.note_served(SERVED_POLICIES_KEY, policies.iter().cloned(), now)
            .await?;
        self.note_served(
            LONGEST_VALIDITY_KEY,
            ["validity".to_owned()],
            longest_validity,
        )
        .await
    }

    pub(super) async fn longest_validity_noted(&self) -> Result<u64, StoreError> {
        let score: Option<f64> = self
            .conn
            .clone()
            .zscore(LONGEST_VALIDITY_KEY, "validity")
            .await
            .map_err(unavailable)?;
        // (Seconds, far below 2^53: exact as a score.)
        Ok(score.map_or(0, |s| s as u64))
    }

    pub(super) async fn watched_policies(
        &self,
        serving: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.read_served(SERVED_POLICIES_KEY, serving, |p| Some(p.to_owned()))
            .await
    }

    pub(super) async fn serve_paymasters(
        &self,
        chain_id: u64,
        pairs: &[(Address, Address)],
        until: u64,
    ) -> Result<(), StoreError> {
        let members = pairs.iter().map(|(e, p)| format!("{e:#x}:{p:#x}"));
        self.note_served(&served_paymasters_key(chain_id), members, until)
            .await
    }

    pub(super) async fn watched_paymasters(
        &self,
        chain_id: u64,
        own: &[(Address, Address)],
    ) -> Result<Vec<(Address, Address)>, StoreError> {
        // Only replicas write it; one member that does not parse fails the read (a pair left
        // unread would have its reservations released), never skipped.
        self.read_served(&served_paymasters_key(chain_id), own, |member| {
            let (e, p) = member.split_once(':')?;
            Some((e.parse().ok()?, p.parse().ok()?))
        })
        .await
    }

    pub(super) async fn forget_paymasters(
        &self,
        chain_id: u64,
        before: u64,
    ) -> Result<usize, StoreError> {
        let removed: usize = self
            .conn
            .clone()
            .zrembyscore(
                served_paymasters_key(chain_id),
                "-inf",
                format!("({before}"),
            )
            .await
            .map_err(unavailable)?;
        Ok(removed)
    }

    pub(super) async fn retire_policies(
        &self,
        serving: &[String],
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let retired_by = now.saturating_sub(RETIRED_AFTER_SECS);
        let stale: Vec<String> = conn
            .zrangebyscore(SERVED_POLICIES_KEY, "-inf", retired_by)
            .await
            .map_err(unavailable)?;
        let mut retired = Vec::new();
        for policy in stale {
            if serving.contains(&policy) {
                continue;
            }
            let indexed: bool = conn.exists(index_key(&policy)).await.map_err(unavailable)?;
            if indexed {
                continue;
            }
            let removed: i64 = retire_script()
                .key(SERVED_POLICIES_KEY)
                .arg(&policy)
                .arg(retired_by)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if removed == 1 {
                retired.push(policy);
            }
        }
        Ok(retired)
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
    /// wrote, in the same hash or, for a sender, in the key it kept the sender's counter in
    /// (read here in every window: what reserve.lua reads or more, never less).
    async fn counter(&self, policy: &str, scope: &str) -> Result<Counter, StoreError> {
        let mut conn = self.conn.clone();
        let slot = counter_slot(policy, scope);
        // A sender's as a version before 0.3 kept it: a hash of its own under the scope's name
        // (reserve.lua builds the same key from the record name, `s:0x…` for `sender:0x…`).
        let legacy = match slot.sender {
            true => budget_key(policy, scope),
            false => slot.key.clone(),
        };
        type Legacy = (Option<i64>, Option<i64>, Option<i64>);
        let (packed, (cost, ops, open)): (Option<Vec<u8>>, Legacy) = redis::pipe()
            .hget(&slot.key, &*slot.field)
            .cmd("HMGET")
            .arg(&legacy)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait for replicas finds a new record by its signature, where [`ENTRY_SIGNATURE`]
    /// says `pack_entry` puts it.
    #[test]
    fn an_entry_holds_its_signature_where_the_wait_looks() {
        use crate::userop::paymaster_data::{PaymasterData, ValidityWindow};

        let signature = [0x5a; 65];
        let r = Reservation {
            policy: "p".into(),
            op_key: B256::repeat_byte(1),
            landing_key: B256::repeat_byte(2),
            cost_gwei: 7,
            scopes: Vec::new(),
            user_op_hashes: vec![B256::repeat_byte(3)],
            answer: PaymasterData {
                window: ValidityWindow {
                    valid_after: 1_800_000_000,
                    valid_until: 1_800_000_600,
                },
                signature,
            },
            session: None,
            expires_at: 1_800_004_200,
        };
        let entry = pack_entry(&r, &[], true).expect("packed");
        assert_eq!(entry[ENTRY_SIGNATURE], signature);
        assert_eq!(&entry[1..21], &r.op_key[..20]);
    }

    /// Records by id need the key and every library's by-id mark; shared budgets every
    /// library's shared mark alone; libraries that cannot be read allow neither, and each
    /// refusal says why.
    #[test]
    fn the_layout_follows_the_libraries_loaded() {
        let marks = |by_id, shared_budgets| Marks {
            by_id,
            shared_budgets,
        };
        let set: Result<bool, String> = Ok(true);
        let none = Ok(vec![]);
        let ten = Ok(vec![("sp_ledger_10".to_owned(), marks(true, false))]);
        let zero = Ok(vec![("sp_ledger_0".to_owned(), marks(false, false))]);
        let unread = Err("down".to_owned());
        let all = Layout::of(&set, &none);
        assert_eq!(
            all,
            Layout {
                by_id: true,
                why: String::new(),
                shared: true,
                shared_why: String::new()
            }
        );
        let l = Layout::of(&set, &ten);
        assert!(l.by_id && !l.shared, "{l:?}");
        assert!(l.shared_why.contains("sp_ledger_10"), "{l:?}");
        let l = Layout::of(&set, &zero);
        assert!(!l.by_id && !l.shared, "{l:?}");
        assert!(l.why.contains("sp_ledger_0") && l.shared_why.contains("sp_ledger_0"));
        let l = Layout::of(&Ok(false), &none);
        assert!(!l.by_id && l.shared, "{l:?}");
        assert!(l.why.contains("is not set"), "{l:?}");
        let l = Layout::of(&set, &unread);
        assert!(!l.by_id && !l.shared, "{l:?}");
        assert!(l.why.contains("could not be read (down)"), "{l:?}");
        assert!(l.shared_why.contains("could not be read (down)"), "{l:?}");
        let l = Layout::of(&Err("gone".to_owned()), &none);
        assert!(!l.by_id && l.shared, "{l:?}");
        assert!(l.why.contains("could not be read (gone)"), "{l:?}");
    }

    #[test]
    fn library_code_carries_its_marks() {
        assert!(library().code.contains(RECORDS_BY_ID_MARK));
        assert!(library().code.contains(SHARED_BUDGETS_MARK));
    }

    /// The scripts' cap on a nonce's records is the one the service names in its refusals.
    #[test]
    fn lib_lua_caps_a_nonce_at_max_records_per_nonce() {
        let line = format!(
            "\nlocal MAX_RECORDS = {}\n",
            super::super::MAX_RECORDS_PER_NONCE
        );
        assert!(include_str!("lib.lua").contains(&line));
    }

    /// `FUNCTION LIST` replies, RESP2 and RESP3, one a node: every library listed by name; a
    /// library reads records by id only if listed with its code carrying the mark; a reply of
    /// another shape, or a library gone since it was listed, is an error (records by key).
    #[test]
    fn ledger_libraries_are_read_from_function_list() {
        use redis::Value;
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let resp2 = |name: &str, code: &str| {
            Value::Array(vec![s("library_name"), s(name), s("library_code"), s(code)])
        };
        let resp3 = |name: &str, code: &str| {
            Value::Map(vec![
                (s("library_name"), s(name)),
                (s("library_code"), s(code)),
            ])
        };
        let ours = format!("#!lua name=sp_ledger_1{RECORDS_BY_ID_MARK}");
        // The mark in a comment of other words, or the constant's name alone, is no mark.
        let old = "#!lua name=sp_ledger_0\nlocal SESSION_BY_ID -- records-by-id\n";
        let newest = format!("#!lua name=sp_ledger_3{RECORDS_BY_ID_MARK}{SHARED_BUDGETS_MARK}");
        let nodes = [
            Value::Array(vec![resp2("sp_ledger_1", &ours), resp2("sp_ledger_0", old)]),
            Value::Array(vec![
                resp3("sp_ledger_0", old),
                resp3("sp_ledger_3", &newest),
            ]),
            Value::Array(vec![]),
        ];
        assert_eq!(
            listed_libraries(&nodes).map(|l| l.into_iter().map(|(n, _)| n).collect::<Vec<_>>()),
            Ok(vec![
                "sp_ledger_1".into(),
                "sp_ledger_0".into(),
                "sp_ledger_0".into(),
                "sp_ledger_3".into()
            ])
        );
        let marks = |by_id, shared_budgets| {
            Ok(Marks {
                by_id,
                shared_budgets,
            })
        };
        assert_eq!(library_marks(&nodes, "sp_ledger_1"), marks(true, false));
        assert_eq!(library_marks(&nodes, "sp_ledger_0"), marks(false, false));
        assert_eq!(library_marks(&nodes, "sp_ledger_3"), marks(true, true));
        assert!(library_marks(&nodes, "sp_ledger_2").is_err(), "not listed");
        let names_only = [Value::Array(vec![Value::Array(vec![
            s("library_name"),
            s("sp_ledger_1"),
        ])])];
        assert!(
            library_marks(&names_only, "sp_ledger_1").is_err(),
            "no code"
        );
        // (A node's error comes as a value of its own kind, not an array.)
        for odd in [
            Value::Nil,
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![s("library_code"), s("x")])]),
        ] {
            assert!(
                listed_libraries(std::slice::from_ref(&odd)).is_err(),
                "{odd:?}"
            );
        }
    }

    /// Where each kind of scope name is counted, and what a record lists it by (`counter_of` in
    /// `lib.lua` reads the record names back: `ledger::sender_counters_share_their_windows_hash`
    /// checks the two agree on Redis).
    #[test]
    fn scopes_are_counted_where_their_names_say() {
        let a = "1111111111111111111111111111111111111111";
        for (name, key, field, record) in [
            (
                format!("sender:0x{a}:20833"),
                "sp:{p}:budget:sender:20833",
                vec![0x11; 20],
                format!("s:0x{a}:20833"),
            ),
            (
                format!("sender:0x{a}:c8453:20833"),
                "sp:{p}:budget:sender:c8453:20833",
                vec![0x11; 20],
                format!("s:0x{a}:c8453:20833"),
            ),
            (
                format!("sender:0x{a}"),
                "sp:{p}:budget:sender",
                vec![0x11; 20],
                format!("s:0x{a}"),
            ),
        ] {
            let slot = counter_slot("p", &name);
            assert_eq!(
                (
                    slot.key.as_str(),
                    slot.field.into_owned(),
                    slot.sender,
                    slot.record.into_owned()
                ),
                (key, field, true, record)
            );
        }
        // A shared session budget: a 20-byte field of its end day's hash, the id's keccak's,
        // named in records as a sender of that hash would be (no earlier key of its own read).
        let id = format!("{a}{}", "2".repeat(24));
        let session = format!("session:20791:0x{id}");
        let slot = counter_slot("p", &session);
        let hashed = alloy::primitives::keccak256(alloy::hex::decode(&id).expect("hex"));
        assert_eq!(
            slot.shared_session.map(|s| s.to_string()),
            Some(format!("0x{id}"))
        );
        assert_eq!(
            (
                slot.key.as_str(),
                slot.field.into_owned(),
                slot.sender,
                slot.record.into_owned()
            ),
            (
                "sp:{p}:budget:sender:d20791",
                hashed[..20].to_vec(),
                false,
                format!("s:0x{}:d20791", alloy::hex::encode(&hashed[..20]))
            )
        );
        // Not a sender's: 41 or 39 digits, no `0x`, another scope (a session's of a key of its
        // own among them).
        for name in [
            format!("sender:0x{a}1:20833"),
            format!("sender:0x{}:20833", &a[1..]),
            format!("sender:{a}:20833"),
            "policy:20833".to_owned(),
            format!("session:0x{a}{a}0000"),
            // (Nor a shared session's: no day, a day not digits, 63 or 65 digits.)
            format!("session::0x{id}"),
            format!("session:2o791:0x{id}"),
            format!("session:20791:0x{}", &id[..63]),
            format!("session:20791:0x{id}0"),
        ] {
            let slot = counter_slot("p", &name);
            assert_eq!(slot.shared_session, None, "{name}");
            assert_eq!(
                (
                    slot.key,
                    slot.field.into_owned(),
                    slot.sender,
                    &*slot.record
                ),
                (
                    budget_key("p", &name),
                    COUNTER_FIELD.to_vec(),
                    false,
                    name.as_str()
                )
            );
        }
    }

    #[test]
    fn a_counter_is_three_big_endian_i64s() {
        let mut packed = Vec::new();
        for n in [-70i64, 1, 9_007_199_254_740_991] {
            packed.extend_from_slice(&n.to_be_bytes());
        }
        assert_eq!(
            unpack_counter(&packed),
            Some([-70, 1, 9_007_199_254_740_991])
        );
        assert_eq!(unpack_counter(&packed[..23]), None);
        assert_eq!(unpack_counter(&[packed.clone(), vec![0]].concat()), None);
    }
}
