//! The budget ledger: one suite against memory and a real Redis, then over HTTP: 200
//! concurrent sponsorships against a budget for K sign exactly K, on one instance and on two
//! sharing Redis; a repeated operation gets the same answer and reserves nothing more.

use std::collections::BTreeMap;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use serde_json::{Value, json};
use session_paymaster::ledger::memory::MemoryLedger;
use session_paymaster::ledger::redis::RedisLedger;
use session_paymaster::ledger::redis::SESSION_RECORDS_BY_ID_KEY;
use session_paymaster::ledger::{
    CallCounts, Exhausted, GRACE_SECS, Landing, Ledger, LedgerCalls, MAX_OPEN_PER_NONCE,
    MAX_OPEN_PER_NONCE_ANY, MAX_RECORDS_PER_NONCE, Outcome, Reservation, Resource, Scope,
    SessionCharge, Settled, SpendExceeded, TokenCharge, session_budget_scope, session_scope_name,
};
use session_paymaster::session::{SessionGrant, SessionStatus};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;
use session_paymaster::userop::paymaster_data::{PaymasterData, ValidityWindow};

use crate::helpers::{
    TempDir, TestApp, TestRedis, TestResult, config, counter_op, counter_policy_dir,
};

const NOW: u64 = 1_800_000_000;

fn scope(name: &str, cost: Option<u64>, ops: Option<u64>) -> Scope {
    Scope {
        name: name.into(),
        rule: format!("p.budgets.{name}"),
        cost_limit: cost,
        ops_limit: ops,
        expires_at: NOW + 3600,
        resets_at: None,
        starts_at: None,
    }
}

/// The signed answer of op `op` (a signature that is just its number) valid until `valid_until`.
fn answer(op: u8, valid_until: u64) -> PaymasterData {
    PaymasterData {
        window: ValidityWindow {
            valid_after: NOW - 60,
            valid_until,
        },
        signature: [op; 65],
    }
}

/// Op `op` (its own nonce unless a test shares one), valid for ten minutes.
fn reservation(op: u8, cost: u64, scopes: Vec<Scope>) -> Reservation {
    Reservation {
        policy: "p".into(),
        op_key: B256::repeat_byte(op),
        landing_key: B256::repeat_byte(op ^ 0x40),
        cost_gwei: cost,
        scopes,
        user_op_hashes: vec![B256::repeat_byte(op ^ 0x80)],
        answer: answer(op, NOW + 600),
        session: None,
        expires_at: NOW + 4200,
    }
}

/// The event of op `op` landing at `actual` gwei, with the hash we expect for it.
fn landing(op: u8, actual: u64) -> Landing {
    Landing {
        landing_key: B256::repeat_byte(op ^ 0x40),
        user_op_hash: B256::repeat_byte(op ^ 0x80),
        actual_gwei: actual,
    }
}

/// The key of op `op`'s nonce (its records) under policy `p`.
fn nonce_of(op: u8) -> Vec<u8> {
    [&b"sp:{p}:n:"[..], &[op ^ 0x40; 20]].concat()
}

/// What settling an event of a nonce we know did.
fn settled(settled: usize, superseded: usize, hash_matched: bool) -> Settled {
    Settled {
        settled,
        superseded,
        hash_matched,
        charged_back: 0,
        known: true,
        ambiguous: false,
    }
}

/// The ops among `ops` whose nonce's key (under policy `p`, [`nonce_of`]) exists in Redis.
async fn nonces_held(
    c: &mut impl redis::aio::ConnectionLike,
    ops: impl IntoIterator<Item = u8>,
) -> TestResult<Vec<u8>> {
    let mut held = Vec::new();
    for op in ops {
        let exists: u64 = redis::cmd("EXISTS")
            .arg(nonce_of(op))
            .query_async(c)
            .await?;
        if exists == 1 {
            held.push(op);
        }
    }
    Ok(held)
}

/// A connection to `redis` as the service makes it.
async fn ledger_conn(
    redis: &TestRedis,
) -> TestResult<session_paymaster::session::redis::RedisConn> {
    Ok(session_paymaster::session::redis::connect(&redis.url, Duration::from_secs(2)).await?)
}

/// A Redis ledger on `redis`, opened as the service opens it, and a connection of its own for
/// looking at the keys.
async fn redis_ledger(
    redis: &TestRedis,
) -> TestResult<(Ledger, session_paymaster::session::redis::RedisConn)> {
    let conn = ledger_conn(redis).await?;
    Ok((
        Ledger::Redis(RedisLedger::connect(conn.clone()).await?),
        conn,
    ))
}

/// A reservation's charge under session `id` (its grant ending two hours after NOW), with
/// its token amounts.
fn session_charge(id: B256, spend: Vec<TokenCharge>) -> Option<SessionCharge> {
    Some(SessionCharge {
        id,
        expires_at: NOW + 7200,
        spend,
    })
}

/// A grant of `policy` for session `id`, valid until `valid_until`, its budget `shared` or of
/// a key of its own.
fn session_grant(policy: &str, id: B256, valid_until: u64, shared: bool) -> SessionGrant {
    SessionGrant {
        session_id: id,
        account: Address::from_slice(&id[..20]),
        session_key: Address::from_slice(&id[12..]),
        chain_id: 1,
        policy: policy.into(),
        valid_after: NOW - 60,
        valid_until,
        status: SessionStatus::Active,
        permissions: None,
        budget: None,
        created_at: NOW - 60,
        shared_budget: shared,
    }
}

/// A shared session budget's field in its day's hash: its id's keccak's first 20 bytes.
fn field_of(session: B256) -> Vec<u8> {
    alloy::primitives::keccak256(session)[..20].to_vec()
}

/// `amount` of `token` against the session's first cap, `limit`.
fn token_charge(token: Address, amount: U256, limit: U256) -> TokenCharge {
    TokenCharge {
        token,
        amount,
        limit,
        rule: "session.permissions.spend[0]".into(),
    }
}

/// The name of a ledger library that cannot read records under a session by id, as 0.3.0's
/// (`load_earlier_library`).
const EARLIER_LIBRARY: &str = "sp_ledger_000000030000";

/// Load [`EARLIER_LIBRARY`] where `c` leads (a node, or every primary through a Cluster's
/// connection), as a 0.3.0 replica loads its own when it starts.
async fn load_earlier_library(c: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(format!(
            "#!lua name={EARLIER_LIBRARY}\nredis.register_function('sp_reserve_000000030000', function() return 0 end)"
        ))
        .query_async(c)
        .await
}

/// `FUNCTION DELETE` of [`EARLIER_LIBRARY`] where `c` leads.
async fn delete_earlier_library(c: &mut impl redis::aio::ConnectionLike) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(EARLIER_LIBRARY)
        .query_async(c)
        .await
}

/// Op `op` of policy `policy` under session `id` (its budget its one scope), reserved by
/// `ledger`: its nonce's stored string.
async fn session_record(
    ledger: &Ledger,
    conn: &session_paymaster::session::redis::RedisConn,
    policy: &str,
    id: B256,
    op: u8,
) -> TestResult<Vec<u8>> {
    let r = Reservation {
        policy: policy.into(),
        session: session_charge(id, vec![]),
        ..reservation(op, 30, vec![scope(&session_scope_name(id), None, None)])
    };
    assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    let key = [format!("sp:{{{policy}}}:n:").as_bytes(), &[op ^ 0x40; 20]].concat();
    Ok(redis::cmd("GET")
        .arg(key)
        .query_async(&mut conn.clone())
        .await?)
}

/// Whether a nonce's stored string names a session of `policy` by its state key in full (a
/// record by key, as 0.3.0 wrote every record).
fn names_state_key(record: &[u8], policy: &str) -> bool {
    let state = format!("sp:{{{policy}}}:session:");
    record.windows(state.len()).any(|w| w == state.as_bytes())
}

/// The counter `pm` (as the deposit's: it lives as long as the answers it sums), to live
/// `lives` seconds past NOW.
fn pm(lives: u64) -> Scope {
    Scope {
        expires_at: NOW + lives,
        ..scope("pm", None, None)
    }
}

/// Op 1 reserved at NOW, its counter `pm` to live 4200 s; then, ten seconds before its answer
/// expires, extended to a fresh answer valid 1600 s more (its counter to live 1000 s longer).
/// `between` looks at the ledger in between. Returns the fresh reservation and when it was made.
async fn reserve_then_refresh(
    ledger: &Ledger,
    between: impl AsyncFnOnce() -> TestResult,
) -> TestResult<(Reservation, u64)> {
    let first = reservation(1, 5, vec![pm(600 + 3600)]);
    assert_eq!(ledger.reserve(&first, false, NOW).await?, Outcome::Reserved);
    between().await?;
    let later = NOW + 590;
    let fresh = Reservation {
        answer: answer(1, later + 1600),
        expires_at: later + 1600 + session_paymaster::ledger::GRACE_SECS,
        ..reservation(1, 5, vec![pm(590 + 1600 + 3600)])
    };
    assert_eq!(
        ledger.reserve(&fresh, false, later).await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("p", "pm").await?, (5, 1), "charged once");
    Ok((fresh, later))
}

async fn ledger_contract(ledger: Ledger) -> TestResult {
    let scopes = || {
        vec![
            scope("sender", Some(100), None),
            scope("policy", None, Some(3)),
        ]
    };
    assert_eq!(
        ledger
            .reserve(&reservation(1, 60, scopes()), false, NOW)
            .await?,
        Outcome::Reserved
    );
    // Check-only (stub) changes nothing.
    assert_eq!(
        ledger
            .reserve(&reservation(2, 40, scopes()), true, NOW)
            .await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("p", "sender").await?, (60, 1));
    // Over the cost limit: named precisely, and no scope keeps a partial reservation.
    assert_eq!(
        ledger
            .reserve(&reservation(3, 41, scopes()), false, NOW)
            .await?,
        Outcome::Exhausted(Exhausted {
            scope: "sender".into(),
            rule: "p.budgets.sender".into(),
            resource: Resource::Cost,
            limit: 100,
            used: 60,
            requested: 41
        })
    );
    assert_eq!(
        ledger.usage("p", "policy").await?,
        (60, 1),
        "no partial reservation"
    );
    // The same operation again: its stored answer, nothing reserved twice.
    assert_eq!(
        ledger
            .reserve(&reservation(1, 60, scopes()), false, NOW)
            .await?,
        Outcome::Existing(answer(1, NOW + 600))
    );
    assert_eq!(ledger.usage("p", "sender").await?, (60, 1));
    // Op-count limit.
    assert_eq!(
        ledger
            .reserve(&reservation(4, 40, scopes()), false, NOW)
            .await?,
        Outcome::Reserved
    );
    let r = ledger
        .reserve(&reservation(5, 0, scopes()), false, NOW)
        .await?;
    assert_eq!(r, Outcome::Reserved);
    let Outcome::Exhausted(e) = ledger
        .reserve(&reservation(6, 0, scopes()), false, NOW)
        .await?
    else {
        return Err("fourth op must exceed ops = 3".into());
    };
    assert_eq!(
        (e.scope.as_str(), e.resource.as_str(), e.limit, e.used),
        ("policy", "ops", 3, 3)
    );
    // Large amounts (gwei beyond 32 bits) are exact.
    let big = vec![scope("big", Some(5_000_000_000_000), None)];
    assert_eq!(
        ledger
            .reserve(&reservation(7, 4_999_999_999_999, big.clone()), false, NOW)
            .await?,
        Outcome::Reserved
    );
    let Outcome::Exhausted(e) = ledger.reserve(&reservation(8, 2, big), false, NOW).await? else {
        return Err("over the big limit".into());
    };
    assert_eq!((e.used, e.requested), (4_999_999_999_999, 2));

    // Settlement to the chain's cost, once; release of what can no longer land, once.
    let q = |op: u8, cost: u64| Reservation {
        policy: "q".into(),
        ..reservation(op, cost, vec![scope("s", Some(1000), None)])
    };
    assert_eq!(
        ledger.reserve(&q(10, 100), false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger.reserve(&q(11, 50), false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("q", "s").await?, (150, 2));
    let all = vec!["p".to_owned(), "q".to_owned()];
    assert_eq!(ledger.open("q", "s").await?, 150, "all open");
    assert_eq!(
        ledger.settle(&all, &landing(10, 30)).await?,
        settled(1, 0, true)
    );
    assert_eq!(
        ledger.open("q", "s").await?,
        50,
        "the settled one left the open part"
    );
    assert_eq!(
        ledger.usage("q", "s").await?,
        (80, 2),
        "settled to the actual cost"
    );
    assert_eq!(
        ledger.settle(&all, &landing(10, 30)).await?,
        settled(0, 0, true),
        "never twice (its settled record names the event)"
    );
    assert_eq!(
        ledger.settle(&all, &landing(0x42, 1)).await?,
        Settled::default(),
        "unknown ops are not ours"
    );
    let policies = vec!["q".to_owned()];
    assert_eq!(
        ledger.release_expired(&policies, NOW + 600).await?,
        0,
        "still valid at validUntil"
    );
    assert_eq!(
        ledger.release_expired(&policies, NOW + 601).await?,
        1,
        "only the open one"
    );
    assert_eq!(
        ledger.usage("q", "s").await?,
        (30, 1),
        "released: neither cost nor op counts"
    );
    assert_eq!(ledger.open("q", "s").await?, 0);
    assert_eq!(ledger.release_expired(&policies, NOW + 601).await?, 0);
    assert_eq!(
        ledger.settle(&all, &landing(11, 50)).await?.charged_back,
        1,
        "a released op that lands after all is charged back"
    );
    assert_eq!(ledger.usage("q", "s").await?, (80, 2));
    late_events_charge_back(&ledger).await?;
    landings_by_nonce(&ledger).await?;
    expiring_answers_are_replaced(&ledger).await?;
    a_nonce_keeps_at_most_max_records(&ledger).await?;
    a_stub_counts_the_open_records_its_request_would(&ledger).await?;
    a_ground_hash_prefix_charges_every_operation_that_carries_it(&ledger).await?;
    an_answer_past_max_hashes_is_a_new_reservation(&ledger).await?;
    an_event_read_again_settles_nothing_new(&ledger).await?;
    sessions_in_the_atomic_step(&ledger).await?;
    a_shared_budgets_session_is_revoked_in_the_atomic_step(&ledger).await
}

/// An event read again (after a rewind, or by two watchers over one range) found its settled
/// record no match, and took the event for one we hashed differently: it settled every open
/// record of the nonce at its cost, among them any a stranger had asked for since (anyone may
/// ask for an operation of a landed nonce), charged to the sender for good. Now those are
/// released and nothing is charged again.
async fn an_event_read_again_settles_nothing_new(ledger: &Ledger) -> TestResult {
    let policies = vec!["rr".to_owned()];
    let op = |op: u8| Reservation {
        policy: "rr".into(),
        landing_key: B256::repeat_byte(0x7c),
        ..reservation(op, 7, vec![scope("sender", None, None)])
    };
    let event = Landing {
        landing_key: B256::repeat_byte(0x7c),
        user_op_hash: B256::repeat_byte(0x93 ^ 0x80),
        actual_gwei: 5,
    };
    assert_eq!(
        ledger.reserve(&op(0x93), false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.settle(&policies, &event).await?, settled(1, 0, true));
    // A stranger asks for another operation of the landed nonce: held, as any request is.
    assert_eq!(
        ledger.reserve(&op(0x94), false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("rr", "sender").await?, (12, 2));
    assert_eq!(ledger.settle(&policies, &event).await?, settled(0, 1, true));
    assert_eq!(
        ledger.usage("rr", "sender").await?,
        (5, 1),
        "released, not charged"
    );
    Ok(())
}

/// A reservation extended as often as it keeps hashes is kept aside, and the next answer is a
/// new reservation. It dropped its oldest hashes instead: an answer still valid then landed
/// unknown to its record, and where a client had ground another operation of the nonce to that
/// answer's 8 bytes (on EntryPoint v0.9, two hashes an answer, after four extensions), Redis
/// settled that one and released this one, its session's spending given back.
async fn an_answer_past_max_hashes_is_a_new_reservation(ledger: &Ledger) -> TestResult {
    let policies = vec!["h".to_owned()];
    let token = Address::repeat_byte(0x72);
    let id = B256::repeat_byte(0x6c);
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let budget = session_scope_name(id);
    // A hash of 8 bytes `prefix` and 24 bytes `own`.
    let h = |prefix: u8, own: u8| B256::from_slice(&[[prefix; 8].as_slice(), &[own; 24]].concat());
    // Answer `i` (1 to 5) of the operation that spends: two hashes, as on v0.9; the first
    // answer's first one shares its 8 bytes with the harmless operation's.
    let spending = |i: u8| Reservation {
        policy: "h".into(),
        landing_key: B256::repeat_byte(0x7a),
        user_op_hashes: vec![
            if i == 1 {
                h(0xa5, 0x11)
            } else {
                h(0xb0 + i, 1)
            },
            h(0xc0 + i, 2),
        ],
        answer: answer(0x51, NOW + 20 + u64::from(i)),
        expires_at: NOW + 20 + u64::from(i) + GRACE_SECS,
        session: session_charge(id, vec![token_charge(token, unit, unit * U256::from(9u64))]),
        ..reservation(
            0x51,
            7,
            vec![scope("all", None, None), scope(&budget, None, None)],
        )
    };
    for i in 1..=5 {
        assert_eq!(
            ledger.reserve(&spending(i), false, NOW).await?,
            Outcome::Reserved,
            "answer {i}"
        );
    }
    assert_eq!(
        ledger.usage("h", &budget).await?,
        (14, 2),
        "four answers in one reservation (eight hashes), the fifth a new one"
    );
    let harmless = Reservation {
        policy: "h".into(),
        landing_key: B256::repeat_byte(0x7a),
        user_op_hashes: vec![h(0xa5, 0x22)],
        ..reservation(0x52, 7, vec![scope("all", None, None)])
    };
    assert_eq!(
        ledger.reserve(&harmless, false, NOW).await?,
        Outcome::Reserved
    );
    let landed = Landing {
        landing_key: B256::repeat_byte(0x7a),
        user_op_hash: h(0xa5, 0x11),
        actual_gwei: 5,
    };
    let done = ledger.settle(&policies, &landed).await?;
    // The first answer landed: its record (kept aside) is settled, the fifth's released.
    assert_eq!(
        ledger.session_spent("h", id).await?,
        BTreeMap::from([(token, unit)])
    );
    assert_eq!(ledger.usage("h", &budget).await?, (5, 1));
    assert_eq!(
        (done.settled, done.superseded, done.ambiguous),
        if matches!(ledger, Ledger::Memory(_)) {
            (1, 2, false)
        } else {
            (2, 1, true)
        }
    );
    Ok(())
}

/// Two operations of one nonce whose hashes share their first 8 bytes (all a record keeps in
/// Redis: on EntryPoint v0.9 a client can grind such a pair before we sign, settle.lua): the
/// one that did not land must not be settled in place of the one that did, which would then
/// be released, its session's spending and budget given back. Redis charges every operation
/// the prefix names (counted twice, never forgotten); memory keeps full hashes and settles the
/// one exactly, and one operation's records are charged once. Open; then both released before
/// a late event; then the harmless one open and the other released before it landed; then the
/// harmless one settled and the other landed in its place.
async fn a_ground_hash_prefix_charges_every_operation_that_carries_it(
    ledger: &Ledger,
) -> TestResult {
    let full_hashes = matches!(ledger, Ledger::Memory(_));
    let policies = vec!["g".to_owned()];
    let token = Address::repeat_byte(0x71);
    let id = B256::repeat_byte(0x6a);
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let budget = session_scope_name(id);
    // A hash of 8 bytes shared by the pair and 24 of the operation's own.
    let hash = |own: u8| B256::from_slice(&[[0xa5; 8].as_slice(), &[own; 24]].concat());
    // Op `op` of nonce `nonce`, valid until `valid_until`, with hash `hash(op)`: the harmless
    // one without a session, the one that spends under session `id`.
    let harmless = |op: u8, nonce: u8, valid_until: u64| Reservation {
        policy: "g".into(),
        landing_key: B256::repeat_byte(nonce),
        user_op_hashes: vec![hash(op)],
        answer: answer(op, valid_until),
        expires_at: valid_until + GRACE_SECS,
        ..reservation(op, 7, vec![scope("all", None, None)])
    };
    let spending = |op: u8, nonce: u8, valid_until: u64| Reservation {
        session: session_charge(id, vec![token_charge(token, unit, unit * U256::from(9u64))]),
        scopes: vec![scope("all", None, None), scope(&budget, Some(1_000), None)],
        ..harmless(op, nonce, valid_until)
    };
    let landed = |op: u8, nonce: u8| Landing {
        landing_key: B256::repeat_byte(nonce),
        user_op_hash: hash(op),
        actual_gwei: 5,
    };
    // The harmless one twice: its first answer about to expire, asked again under another
    // session, it is kept aside and a second record added (one charge covers both).
    let again = Reservation {
        session: session_charge(B256::repeat_byte(0x6b), vec![]),
        ..harmless(0x61, 0x77, NOW + 600)
    };
    for r in [
        harmless(0x61, 0x77, NOW + 20),
        again,
        spending(0x62, 0x77, NOW + 600),
    ] {
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    }
    let done = ledger.settle(&policies, &landed(0x62, 0x77)).await?;
    // What landed stays charged: its spending, and its session's budget at its cost.
    assert_eq!(
        ledger.session_spent("g", id).await?,
        BTreeMap::from([(token, unit)])
    );
    assert_eq!(ledger.usage("g", &budget).await?, (5, 1));
    assert_eq!(
        (
            done.settled,
            done.superseded,
            done.hash_matched,
            done.ambiguous
        ),
        if full_hashes {
            (1, 2, true, false)
        } else {
            (2, 1, true, true)
        }
    );
    assert_eq!(
        ledger.usage("g", "all").await?,
        if full_hashes { (5, 1) } else { (10, 2) }
    );

    // Both released (their signatures expired unused, by a block time a reorg then undid),
    // and the one that spends landed after all: charged back, with the harmless one in Redis.
    for r in [
        harmless(0x63, 0x78, NOW + 10),
        spending(0x64, 0x78, NOW + 10),
    ] {
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    }
    assert_eq!(ledger.release_expired(&policies, NOW + 11).await?, 2);
    assert_eq!(
        ledger.session_spent("g", id).await?,
        BTreeMap::from([(token, unit)])
    );
    let done = ledger.settle(&policies, &landed(0x64, 0x78)).await?;
    assert_eq!(
        (
            done.settled,
            done.charged_back,
            done.hash_matched,
            done.ambiguous
        ),
        if full_hashes {
            (0, 1, true, false)
        } else {
            (0, 2, true, true)
        }
    );
    assert_eq!(
        ledger.session_spent("g", id).await?,
        BTreeMap::from([(token, unit * U256::from(2u64))])
    );
    assert_eq!(ledger.usage("g", &budget).await?, (10, 2));
    assert_eq!(
        ledger.usage("g", "all").await?,
        if full_hashes { (10, 2) } else { (20, 4) }
    );

    // The harmless one open, the one that spends released and landed after all: charged back,
    // with the harmless one settled in Redis.
    for r in [
        harmless(0x65, 0x79, NOW + 600),
        spending(0x66, 0x79, NOW + 10),
    ] {
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    }
    assert_eq!(ledger.release_expired(&policies, NOW + 11).await?, 1);
    let done = ledger.settle(&policies, &landed(0x66, 0x79)).await?;
    assert_eq!(
        ledger.session_spent("g", id).await?,
        BTreeMap::from([(token, unit * U256::from(3u64))])
    );
    assert_eq!(ledger.usage("g", &budget).await?, (15, 3));
    assert_eq!(
        (
            done.settled,
            done.superseded,
            done.charged_back,
            done.ambiguous
        ),
        if full_hashes {
            (0, 1, 1, false)
        } else {
            (1, 0, 1, true)
        }
    );
    assert_eq!(
        ledger.usage("g", "all").await?,
        if full_hashes { (15, 3) } else { (30, 6) }
    );

    // The harmless one landed and settled; the one that spends, asked for since, lands in its
    // place (a reorganisation): the settled record's 8 bytes do not make its event one read
    // before, and it is settled.
    let h = harmless(0x67, 0x7d, NOW + 600);
    assert_eq!(ledger.reserve(&h, false, NOW).await?, Outcome::Reserved);
    ledger.settle(&policies, &landed(0x67, 0x7d)).await?;
    let s = spending(0x68, 0x7d, NOW + 600);
    assert_eq!(ledger.reserve(&s, false, NOW).await?, Outcome::Reserved);
    let done = ledger.settle(&policies, &landed(0x68, 0x7d)).await?;
    assert_eq!(
        ledger.session_spent("g", id).await?,
        BTreeMap::from([(token, unit * U256::from(4u64))])
    );
    assert_eq!(ledger.usage("g", &budget).await?, (20, 4));
    assert_eq!(
        (done.settled, done.superseded, done.ambiguous),
        (1, 0, false)
    );
    assert_eq!(
        ledger.usage("g", "all").await?,
        if full_hashes { (25, 5) } else { (40, 8) }
    );
    Ok(())
}

/// An operation whose open record is of another budget window keeps that record under an id of
/// its own and adds one: its stub counts that record among the nonce's open ones, as the signed
/// request does (reserve.lua renames it only when it writes).
async fn a_stub_counts_the_open_records_its_request_would(ledger: &Ledger) -> TestResult {
    let op = |op: u8, window: &str| Reservation {
        policy: "w".into(),
        landing_key: B256::repeat_byte(0x9b),
        ..reservation(op, 1, vec![scope(window, None, None)])
    };
    let others = MAX_OPEN_PER_NONCE_ANY as u8 - 1;
    for other in 0..others {
        assert_eq!(
            ledger.reserve(&op(200 + other, "day1"), false, NOW).await?,
            Outcome::Reserved
        );
    }
    // The sixteenth open record, its answer about to expire a few seconds later.
    let expiring = Reservation {
        answer: answer(250, NOW + 20),
        ..op(250, "day1")
    };
    assert_eq!(
        ledger.reserve(&expiring, false, NOW).await?,
        Outcome::Reserved
    );
    // Asked again in the next window, for a fresh answer: its record stays, and a seventeenth
    // would be open.
    let later = NOW + 5;
    let fresh = Reservation {
        answer: answer(250, later + 600),
        ..op(250, "day2")
    };
    for check_only in [true, false] {
        assert_eq!(
            ledger.reserve(&fresh, check_only, later).await?,
            Outcome::NoncePending,
            "check only: {check_only}"
        );
    }
    Ok(())
}

/// Released records stay until their grace ends, so a client cycling short-lived variants of
/// one operation (each released as it expires, its budget given back) would grow its nonce's
/// records, which every call on the nonce reads, without bound: a nonce keeps at most
/// MAX_RECORDS_PER_NONCE live records. A new one makes room by dropping the released records of
/// the earliest validUntil (a stranger filling someone's nonce blocks nothing); with none
/// released it is refused, stubs included.
async fn a_nonce_keeps_at_most_max_records(ledger: &Ledger) -> TestResult {
    let policies = vec!["m".to_owned()];
    let budget = || vec![scope("s", Some(1_000_000), None)];
    // Op `op` of nonce `nonce`, reserved at `at`, valid for ten seconds.
    let variant = |op: u8, nonce: u8, at: u64| Reservation {
        policy: "m".into(),
        landing_key: B256::repeat_byte(nonce),
        answer: answer(op, at + 10),
        expires_at: at + 10 + GRACE_SECS,
        ..reservation(op, 7, budget())
    };
    // Op `op` of nonce `nonce` landing.
    let landed = |op: u8, nonce: u8| Landing {
        landing_key: B256::repeat_byte(nonce),
        user_op_hash: B256::repeat_byte(op ^ 0x80),
        actual_gwei: 5,
    };
    // Cycles of MAX_OPEN_PER_NONCE_ANY variants, each released once it has expired.
    let per_cycle = MAX_OPEN_PER_NONCE_ANY as u8;
    let cycles = (MAX_RECORDS_PER_NONCE / MAX_OPEN_PER_NONCE_ANY) as u8;
    for cycle in 0..cycles {
        let at = NOW + 100 * u64::from(cycle);
        for op in 0..per_cycle {
            assert_eq!(
                ledger
                    .reserve(&variant(cycle * per_cycle + op, 0x99, at), false, at)
                    .await?,
                Outcome::Reserved,
                "cycle {cycle}, variant {op}"
            );
        }
        assert_eq!(
            ledger.release_expired(&policies, at + 11).await?,
            usize::from(per_cycle)
        );
    }
    assert_eq!(ledger.usage("m", "s").await?, (0, 0), "all released");
    // Full: the next one drops the first cycle's records (the earliest validUntil).
    let at = NOW + 100 * u64::from(cycles);
    let next = cycles * per_cycle;
    assert_eq!(
        ledger.reserve(&variant(next, 0x99, at), true, at).await?,
        Outcome::Reserved,
        "a stub: room would be made"
    );
    assert_eq!(
        ledger.reserve(&variant(next, 0x99, at), false, at).await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("m", "s").await?, (7, 1));
    // A late event of a record kept is charged back; one of a dropped record matches none.
    let kept = ledger.settle(&policies, &landed(per_cycle, 0x99)).await?;
    assert_eq!((kept.hash_matched, kept.charged_back), (true, 1));
    let dropped = ledger.settle(&policies, &landed(0, 0x99)).await?;
    assert_eq!((dropped.hash_matched, dropped.charged_back), (false, 0));

    // A nonce whose records are all landed (none released: nothing to drop) takes no more.
    // (Other ops: an op names its nonce.)
    let first = 100;
    for op in first..first + MAX_RECORDS_PER_NONCE as u8 {
        assert_eq!(
            ledger.reserve(&variant(op, 0x9a, NOW), false, NOW).await?,
            Outcome::Reserved
        );
        assert_eq!(
            ledger.settle(&policies, &landed(op, 0x9a)).await?.settled,
            1
        );
    }
    let used = ledger.usage("m", "s").await?;
    let full = Outcome::NonceFull(MAX_RECORDS_PER_NONCE as u64);
    let last = first + MAX_RECORDS_PER_NONCE as u8;
    assert_eq!(
        ledger
            .reserve(&variant(last, 0x9a, NOW), false, NOW)
            .await?,
        full
    );
    assert_eq!(
        ledger.reserve(&variant(last, 0x9a, NOW), true, NOW).await?,
        full,
        "stubs too"
    );
    assert_eq!(ledger.usage("m", "s").await?, used, "nothing charged");
    // Once they are past their grace, there is room again.
    let later = NOW + 10 + GRACE_SECS + 1;
    assert_eq!(
        ledger
            .reserve(&variant(last, 0x9a, later), false, later)
            .await?,
        Outcome::Reserved
    );
    Ok(())
}

/// A reservation released as expired whose operation lands after all (a reorg undid the block
/// whose time released it, or the watcher came late) has its cost charged back, once.
async fn late_events_charge_back(ledger: &Ledger) -> TestResult {
    let policies = vec!["late".to_owned()];
    let r = Reservation {
        policy: "late".into(),
        answer: answer(90, NOW + 10),
        ..reservation(90, 50, vec![scope("l", None, None)])
    };
    assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    assert_eq!(ledger.oldest_open(&policies).await?, Some(NOW + 10));
    assert_eq!(ledger.release_expired(&policies, NOW + 11).await?, 1);
    assert_eq!(ledger.oldest_open(&policies).await?, None);
    assert_eq!(ledger.usage("late", "l").await?, (0, 0));
    let late = ledger.settle(&policies, &landing(90, 9)).await?;
    assert_eq!((late.charged_back, late.settled), (1, 0), "{late:?}");
    assert_eq!(ledger.usage("late", "l").await?, (9, 1), "charged back");
    assert_eq!(
        ledger
            .settle(&policies, &landing(90, 9))
            .await?
            .charged_back,
        0,
        "once"
    );
    Ok(())
}

/// Several reservations of one nonce (the same sender and nonce with other fees, or under
/// another policy): the one the event's hash names is settled and the rest released; when the
/// EntryPoint's hash matches none (an EIP-7702 op hashes its delegate), every one is settled at
/// the event's cost rather than released later as if it never landed.
async fn landings_by_nonce(ledger: &Ledger) -> TestResult {
    let one_nonce = |op: u8, policy: &str| Reservation {
        policy: policy.into(),
        landing_key: B256::repeat_byte(0x33),
        ..reservation(op, 100, vec![scope("n", None, None)])
    };
    let all = vec!["n1".to_owned(), "n2".to_owned()];
    for (op, policy) in [(20, "n1"), (21, "n1"), (22, "n2")] {
        assert_eq!(
            ledger.reserve(&one_nonce(op, policy), false, NOW).await?,
            Outcome::Reserved
        );
    }
    let event = Landing {
        landing_key: B256::repeat_byte(0x33),
        ..landing(21, 40)
    };
    assert_eq!(ledger.settle(&all, &event).await?, settled(1, 2, true));
    assert_eq!(
        ledger.usage("n1", "n").await?,
        (40, 1),
        "21 settled, 20 released"
    );
    assert_eq!(ledger.usage("n2", "n").await?, (0, 0), "22 released");
    assert_eq!(ledger.open("n1", "n").await?, 0);

    for (op, policy) in [(23, "n1"), (24, "n2")] {
        let r = Reservation {
            landing_key: B256::repeat_byte(0x34),
            ..one_nonce(op, policy)
        };
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    }
    let unmatched = Landing {
        landing_key: B256::repeat_byte(0x34),
        user_op_hash: B256::repeat_byte(0xee),
        actual_gwei: 70,
    };
    assert_eq!(ledger.settle(&all, &unmatched).await?, settled(2, 0, false));
    assert_eq!(ledger.usage("n1", "n").await?, (110, 2));
    assert_eq!(ledger.usage("n2", "n").await?, (70, 1));
    assert_eq!(
        ledger.release_expired(&all, NOW + 10_000).await?,
        0,
        "nothing of a landed nonce is left to release"
    );

    // A v0.9 answer may land with either of two hashes (signature inline or in the suffix):
    // the second one names its reservation as well as the first.
    let two = |op: u8| Reservation {
        landing_key: B256::repeat_byte(0x35),
        user_op_hashes: vec![B256::repeat_byte(0xc0 ^ op), B256::repeat_byte(0xd0 ^ op)],
        ..one_nonce(op, "n1")
    };
    for op in [25, 26] {
        assert_eq!(
            ledger.reserve(&two(op), false, NOW).await?,
            Outcome::Reserved
        );
    }
    let second_layout = Landing {
        landing_key: B256::repeat_byte(0x35),
        user_op_hash: B256::repeat_byte(0xd0 ^ 26),
        actual_gwei: 5,
    };
    assert_eq!(
        ledger.settle(&all, &second_layout).await?,
        settled(1, 1, true)
    );
    assert_eq!(
        ledger.usage("n1", "n").await?,
        (115, 3),
        "26 settled at 5, 25 released"
    );
    Ok(())
}

/// A repeat whose stored signature expires within the margin gets a fresh answer, and the
/// reservation is extended to it: counted once, never released while either signature is
/// valid, and settled by the event of either.
async fn expiring_answers_are_replaced(ledger: &Ledger) -> TestResult {
    let policies = vec!["r".to_owned()];
    let short = |valid_until: u64, hash: u8| Reservation {
        policy: "r".into(),
        answer: answer(30, valid_until),
        user_op_hashes: vec![B256::repeat_byte(hash)],
        ..reservation(30, 100, vec![scope("s", Some(150), Some(5))])
    };
    assert_eq!(
        ledger.reserve(&short(NOW + 20, 0xa1), false, NOW).await?,
        Outcome::Reserved
    );
    let later = NOW + 3;
    assert_eq!(
        ledger
            .reserve(&short(later + 600, 0xa2), false, later)
            .await?,
        Outcome::Reserved,
        "about to expire: a fresh answer, within a budget that holds only one"
    );
    assert_eq!(ledger.usage("r", "s").await?, (100, 1), "counted once");
    assert_eq!(
        ledger
            .reserve(&short(later + 900, 0xa3), false, later)
            .await?,
        Outcome::Existing(answer(30, later + 600)),
        "valid long enough: the stored answer"
    );
    assert_eq!(
        ledger.release_expired(&policies, NOW + 21).await?,
        0,
        "not released while the fresh signature is valid"
    );
    // The first signature lands (before its validUntil): the reservation settles.
    let first = Landing {
        user_op_hash: B256::repeat_byte(0xa1),
        ..landing(30, 7)
    };
    assert_eq!(ledger.settle(&policies, &first).await?, settled(1, 0, true));
    assert_eq!(
        ledger
            .reserve(&short(later + 900, 0xa3), false, later + 700)
            .await?,
        Outcome::Existing(answer(30, later + 600)),
        "landed: a repeat gets the stored answer, never a new reservation"
    );
    assert_eq!(ledger.usage("r", "s").await?, (7, 1));

    // Under one session, one nonce holds at most MAX_OPEN_PER_NONCE open reservations.
    let variant = |op: u8, session: Option<u8>| Reservation {
        policy: "r".into(),
        landing_key: B256::repeat_byte(0x77),
        session: session.and_then(|id| session_charge(B256::repeat_byte(id), vec![])),
        ..reservation(op, 1, vec![])
    };
    for op in 50..50 + MAX_OPEN_PER_NONCE as u8 {
        assert_eq!(
            ledger.reserve(&variant(op, Some(1)), false, NOW).await?,
            Outcome::Reserved
        );
    }
    assert_eq!(
        ledger.reserve(&variant(60, Some(1)), false, NOW).await?,
        Outcome::NoncePending
    );
    assert_eq!(
        ledger.reserve(&variant(50, Some(1)), false, NOW).await?,
        Outcome::Existing(answer(50, NOW + 600)),
        "a repeat of one of them is still answered"
    );
    assert_eq!(
        ledger.reserve(&variant(61, Some(2)), false, NOW).await?,
        Outcome::Reserved,
        "another session"
    );
    // Whatever the sessions, at most MAX_OPEN_PER_NONCE_ANY open reservations a nonce.
    let open_now = MAX_OPEN_PER_NONCE + 1;
    for op in 0..(MAX_OPEN_PER_NONCE_ANY - open_now) as u8 {
        assert_eq!(
            ledger.reserve(&variant(100 + op, None), false, NOW).await?,
            Outcome::Reserved
        );
    }
    assert_eq!(
        ledger.reserve(&variant(200, None), false, NOW).await?,
        Outcome::NoncePending,
        "no session, but the nonce is full"
    );

    // A repeat in another budget window (or under another session) than its reservation: the
    // reservation stays open as it is (its signature may land) and the repeat is a new one.
    let in_window = |window: &str, valid_until: u64, hash: u8| Reservation {
        policy: "w".into(),
        answer: answer(70, valid_until),
        user_op_hashes: vec![B256::repeat_byte(hash)],
        ..reservation(70, 10, vec![scope(window, None, None)])
    };
    assert_eq!(
        ledger
            .reserve(&in_window("day1", NOW + 20, 0xb1), false, NOW)
            .await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger
            .reserve(&in_window("day2", NOW + 600, 0xb2), false, NOW)
            .await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger.usage("w", "day1").await?,
        (10, 1),
        "the first stays charged"
    );
    assert_eq!(
        ledger.usage("w", "day2").await?,
        (10, 1),
        "the second is charged where it is made"
    );
    let first_lands = Landing {
        landing_key: B256::repeat_byte(70 ^ 0x40),
        user_op_hash: B256::repeat_byte(0xb1),
        actual_gwei: 4,
    };
    assert_eq!(
        ledger.settle(&["w".to_owned()], &first_lands).await?,
        settled(1, 1, true)
    );
    assert_eq!(ledger.usage("w", "day1").await?, (4, 1));
    assert_eq!(
        ledger.usage("w", "day2").await?,
        (0, 0),
        "the other can never land"
    );

    // Counters stay exact: past 2^53 gwei a reservation is refused as an exhausted budget where
    // the scope has a cost limit (one above 2^53 included).
    let huge = |op: u8, scope: Scope| Reservation {
        policy: "x".into(),
        ..reservation(op, 5_000_000_000_000_000, vec![scope])
    };
    let capped = || scope("x", Some(1 << 60), Some(10));
    assert_eq!(
        ledger.reserve(&huge(80, capped()), false, NOW).await?,
        Outcome::Reserved
    );
    let Outcome::Exhausted(e) = ledger.reserve(&huge(81, capped()), false, NOW).await? else {
        return Err("past 2^53".into());
    };
    assert_eq!((e.resource, e.limit), (Resource::Cost, (1 << 53) - 1));
    // Found in review: a scope without a cost limit was refused there too, and the deposit's
    // (`pm:`), which lives as long as operations keep coming, would then refuse every operation
    // once its lifetime's costs passed 2^53 gwei (nine million of the chain's coin). It is
    // refused only where what is open would pass 2^53; its cost counts up to 2^53 and stays
    // there, and what comes back comes off that.
    let open = || scope("y", None, Some(10));
    let huge_y = |op| huge(op, open());
    assert_eq!(
        ledger.reserve(&huge_y(82), false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger
            .settle(&["x".to_owned()], &landing(82, 5_000_000_000_000_000))
            .await?,
        settled(1, 0, true)
    );
    assert_eq!(
        ledger.reserve(&huge_y(83), false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("x", "y").await?, ((1 << 53) - 1, 2));
    let Outcome::Exhausted(e) = ledger.reserve(&huge_y(84), false, NOW).await? else {
        return Err("open past 2^53".into());
    };
    assert_eq!(
        (e.resource, e.limit, e.used),
        (Resource::Cost, (1 << 53) - 1, 5_000_000_000_000_000)
    );
    assert_eq!(
        ledger.settle(&["x".to_owned()], &landing(83, 7)).await?,
        settled(1, 0, true)
    );
    assert_eq!(
        ledger.usage("x", "y").await?,
        ((1 << 53) - 1 - 5_000_000_000_000_000 + 7, 2)
    );
    assert_eq!(
        ledger.reserve(&huge_y(84), false, NOW).await?,
        Outcome::Reserved
    );
    Ok(())
}

/// A session whose budget is shared (its status in its budget's hash, in Redis): revoked, it
/// is refused from the next reservation on, a repeat and a check too, whether the operation
/// is charged to its budget or not (a policy without a session budget has no such scope).
/// Another session of the same day's hash is not, though its id differs from the revoked
/// one's in its last byte alone (a tenant may name ids: the field is the id's keccak's).
async fn a_shared_budgets_session_is_revoked_in_the_atomic_step(ledger: &Ledger) -> TestResult {
    let id = B256::repeat_byte(0x5f);
    let mut other = id;
    other[31] = 0x60;
    let budget = |id: B256| {
        let g = session_grant("t", id, NOW + 7200, true);
        Scope {
            expires_at: NOW + 7200 + GRACE_SECS,
            ..scope(&session_budget_scope(&g), Some(1000), None)
        }
    };
    let under = |op: u8, id: B256, scopes: Vec<Scope>| Reservation {
        policy: "t".into(),
        session: session_charge(id, vec![]),
        ..reservation(op, 10, scopes)
    };
    let charged = under(50, id, vec![budget(id)]);
    assert_eq!(
        ledger.reserve(&charged, false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger
            .reserve(&under(51, other, vec![budget(other)]), false, NOW)
            .await?,
        Outcome::Reserved
    );
    ledger
        .revoke_session(&session_grant("t", id, NOW + 7200, true), NOW)
        .await?;
    for (r, check_only) in [
        (under(52, id, vec![budget(id)]), false),
        (under(52, id, vec![budget(id)]), true),
        (charged, false),
        (under(53, id, vec![]), false),
    ] {
        assert_eq!(
            ledger.reserve(&r, check_only, NOW).await?,
            Outcome::SessionRevoked,
            "op {} {check_only}",
            r.op_key[0]
        );
    }
    assert_eq!(
        ledger
            .reserve(&under(54, other, vec![budget(other)]), false, NOW)
            .await?,
        Outcome::Reserved,
        "another session of that day"
    );
    assert_eq!(ledger.usage("t", &budget(id).name).await?, (10, 1));
    assert_eq!(ledger.usage("t", &budget(other).name).await?, (20, 2));
    Ok(())
}

/// Under a session: revocation is seen by the reservation itself, and token spending is
/// cumulative (uint256, beyond any integer Redis or Lua has), checked and recorded in the same
/// step, given back when the reservation is released, kept when it is settled.
async fn sessions_in_the_atomic_step(ledger: &Ledger) -> TestResult {
    let token = Address::repeat_byte(0x70);
    let id = B256::repeat_byte(0x5e);
    let unit = U256::from(10u64).pow(U256::from(24u64));
    let limit = unit * U256::from(3u64);
    let under = |op: u8, amount: U256| Reservation {
        policy: "s".into(),
        session: session_charge(id, vec![token_charge(token, amount, limit)]),
        ..reservation(op, 10, vec![])
    };
    let policies = vec!["s".to_owned()];
    assert_eq!(
        ledger
            .reserve(&under(40, unit * U256::from(2u64)), false, NOW)
            .await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger
            .reserve(&under(40, unit * U256::from(2u64)), false, NOW)
            .await?,
        Outcome::Existing(answer(40, NOW + 600)),
        "a repeat is answered before any cap is checked, and counts nothing"
    );
    assert_eq!(
        ledger
            .reserve(&under(41, unit + U256::from(1u64)), false, NOW)
            .await?,
        Outcome::SpendExceeded(SpendExceeded {
            token,
            rule: "session.permissions.spend[0]".into(),
            limit,
            spent: unit * U256::from(2u64),
            requested: unit + U256::from(1u64),
        })
    );
    assert_eq!(
        ledger.reserve(&under(41, unit), true, NOW).await?,
        Outcome::Reserved,
        "exactly the limit fits"
    );
    assert_eq!(
        ledger.session_spent("s", id).await?,
        BTreeMap::from([(token, unit * U256::from(2u64))]),
        "refusals and checks record nothing"
    );
    // An op that never lands gives its spending back.
    let mut short_lived = Reservation {
        answer: answer(42, NOW + 10),
        ..under(42, unit)
    };
    assert_eq!(
        ledger.reserve(&short_lived, false, NOW).await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger.session_spent("s", id).await?,
        BTreeMap::from([(token, limit)])
    );
    assert_eq!(ledger.release_expired(&policies, NOW + 11).await?, 1);
    assert_eq!(
        ledger.session_spent("s", id).await?,
        BTreeMap::from([(token, unit * U256::from(2u64))])
    );
    short_lived.op_key = B256::repeat_byte(43);
    short_lived.user_op_hashes = vec![B256::repeat_byte(43 ^ 0x80)];
    assert_eq!(
        ledger.reserve(&short_lived, false, NOW).await?,
        Outcome::Reserved
    );
    // Another operation of the released one's nonce lands: it settles, the released one stays.
    assert_eq!(
        ledger
            .settle(
                &policies,
                &Landing {
                    user_op_hash: B256::repeat_byte(43 ^ 0x80),
                    ..landing(42, 1)
                }
            )
            .await?,
        settled(1, 0, true),
        "settled: the spending stays"
    );
    assert_eq!(
        ledger.session_spent("s", id).await?,
        BTreeMap::from([(token, limit)])
    );
    let open = under(45, U256::ZERO);
    assert_eq!(ledger.reserve(&open, false, NOW).await?, Outcome::Reserved);
    // Revoked: the very next reservation under it is refused, even one that fits.
    ledger
        .revoke_session(&session_grant("s", id, NOW + 7200, false), NOW)
        .await?;
    assert_eq!(
        ledger.reserve(&under(44, U256::ZERO), false, NOW).await?,
        Outcome::SessionRevoked
    );
    // A repeat too, of an operation still open or landed: the answer given before is not
    // handed out again (a replica whose copy of the grant predates the revocation gets here).
    assert_eq!(
        ledger.reserve(&open, false, NOW).await?,
        Outcome::SessionRevoked
    );
    assert_eq!(
        ledger.reserve(&short_lived, false, NOW).await?,
        Outcome::SessionRevoked
    );
    // Revoking again with an end past what Redis takes as a TTL: idempotent, no error.
    ledger
        .revoke_session(&session_grant("s", id, u64::MAX, false), NOW)
        .await?;
    assert_eq!(
        ledger.reserve(&under(44, U256::ZERO), true, NOW).await?,
        Outcome::SessionRevoked,
        "stubs too"
    );
    Ok(())
}

#[tokio::test]
async fn memory_ledger_contract() -> TestResult {
    ledger_contract(Ledger::Memory(MemoryLedger::new())).await
}

#[tokio::test]
async fn redis_ledger_contract() -> TestResult {
    let redis = TestRedis::start().await?;
    ledger_contract(redis_ledger(&redis).await?.0).await
}

#[tokio::test]
async fn redis_cluster_ledger_contract() -> TestResult {
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    let conn =
        session_paymaster::session::redis::connect(&cluster.url, Duration::from_secs(2)).await?;
    // Records under a session by id on a Cluster too, once no primary has a library of an
    // earlier ledger: one on the last primary alone keeps them by key. (Policy `cl`: the
    // contract's counts are of `p`.)
    let last = cluster.url.rsplit(',').next().unwrap_or_default();
    let mut node = redis::Client::open(last)?
        .get_multiplexed_async_connection()
        .await?;
    load_earlier_library(&mut node).await?;
    let id = B256::repeat_byte(0x5e);
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let record = session_record(&ledger, &conn, "cl", id, 0x31).await?;
    assert!(names_state_key(&record, "cl"));
    delete_earlier_library(&mut node).await?;
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let by_id = session_record(&ledger, &conn, "cl", id, 0x32).await?;
    assert!(!names_state_key(&by_id, "cl"));
    assert_eq!(by_id.len(), record.len() - 56 - "cl".len());
    ledger_contract(ledger).await
}

/// The whole service on a 3-master Cluster: 200 concurrent sponsorships against a budget for
/// K sign exactly K.
#[tokio::test]
async fn concurrent_sponsorships_sign_exactly_the_budget_on_redis_cluster() -> TestResult {
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    let dir = budget_dir()?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(cluster.url.clone());
    // The claim is exactness under contention, not latency: 200 requests at once on two
    // debug-built replicas keep two cores busy, and the default 500 ms would fail some closed.
    c.redis_timeout = Duration::from_secs(5);
    let apps = vec![TestApp::spawn(c.clone()).await?, TestApp::spawn(c).await?];
    exactly_k_of(&apps, 200).await
}

const K: u64 = 7;

fn budget_dir() -> TestResult<TempDir> {
    counter_policy_dir("budgets", "budgeted", K)
}

fn op_json(nonce: u64) -> Value {
    counter_op(Address::repeat_byte(0x11), nonce, "increment()").to_json()
}

async fn apps(n: usize, redis: Option<&TestRedis>, dir: &TempDir) -> TestResult<Vec<TestApp>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = config(
            [Some(Address::repeat_byte(7)), None, None],
            KeySource::Ephemeral,
        );
        c.policies_dir = dir.0.clone();
        c.redis_url = redis.map(|r| r.url.clone());
        c.redis_timeout = Duration::from_secs(5);
        out.push(TestApp::spawn(c).await?);
    }
    Ok(out)
}

/// `n` distinct sponsorships at once against a budget of K operations.
async fn exactly_k_of(apps: &[TestApp], n: u64) -> TestResult {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = apps[i as usize % apps.len()].url.clone();
            let body = json!({
                "jsonrpc": "2.0", "id": i, "method": "pm_sponsorUserOperation",
                "params": [op_json(i), EntryPointVersion::V0_7.canonical_address()]
            });
            tokio::spawn(async move {
                reqwest::Client::new()
                    .post(url)
                    .json(&body)
                    .send()
                    .await?
                    .json::<Value>()
                    .await
            })
        })
        .collect();
    let (mut signed, mut exhausted) = (0u64, 0u64);
    for t in tasks {
        let v = t.await??;
        if v["result"]["paymasterData"].is_string() {
            signed += 1;
        } else {
            assert_eq!(
                v["error"]["data"]["reason"],
                json!("budget_exhausted"),
                "{v}"
            );
            assert_eq!(v["error"]["data"]["limit"], json!(K));
            exhausted += 1;
        }
    }
    assert_eq!((signed, exhausted), (K, n - K));
    let day = session_paymaster::clock::unix_now() / 86_400;
    let (_, ops) = apps[0]
        .state
        .sponsor
        .ledger()
        .usage("budgeted", &format!("policy:{day}"))
        .await?;
    assert_eq!(ops, K, "ledger totals equal the signed operations");
    Ok(())
}

#[tokio::test]
async fn concurrent_sponsorships_sign_exactly_the_budget_in_memory() -> TestResult {
    let dir = budget_dir()?;
    exactly_k_of(&apps(1, None, &dir).await?, 200).await
}

#[tokio::test]
async fn concurrent_sponsorships_sign_exactly_the_budget_on_two_instances_sharing_redis()
-> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    exactly_k_of(&apps(2, Some(&redis), &dir).await?, 200).await
}

/// A burst of 400 sponsorships of one policy at one replica, against a healthy Redis: each is
/// answered on its merits (K signed, the rest `budget_exhausted`), none refused as
/// `store_unavailable` for want of room to wait for the policy's calls in flight (23-25 were
/// with 0.3.11's 64 waiting, `ledger::MAX_WAITING`), and they went to Redis together (fewer
/// calls than sponsorships: they did come at once, and `/metrics` says so).
#[tokio::test]
async fn a_burst_at_one_replica_waits_for_a_healthy_redis_rather_than_being_refused() -> TestResult
{
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    let before = fcalls(&redis).await?;
    exactly_k_of(&apps, 400).await?;
    let calls = fcalls(&redis).await? - before;
    assert!(calls < 400, "{calls} calls");
    // `/metrics` counts those calls and the 400 operations they carried (K reserved, the rest
    // refused there for the budget): how full they were.
    let text = reqwest::get(format!("{}/metrics", apps[0].url))
        .await?
        .text()
        .await?;
    for line in [
        format!("sp_ledger_calls_total{{kind=\"sign\"}} {calls}"),
        "sp_ledger_call_operations_total{kind=\"sign\"} 400".to_owned(),
        "sp_ledger_calls_total{kind=\"check\"} 0".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in {text}");
    }
    Ok(())
}

#[tokio::test]
async fn a_repeated_operation_gets_the_same_answer_and_reserves_once() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    let apps = apps(2, Some(&redis), &dir).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    let stub = apps[0]
        .result(
            "pm_getPaymasterStubData",
            json!([op_json(1), ep, "0x7a69", {}]),
        )
        .await?;
    assert!(stub["paymasterData"].is_string());
    let first = apps[0]
        .result("pm_sponsorUserOperation", json!([op_json(1), ep]))
        .await?;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later second would change the window
    let again = apps[1]
        .result("pm_sponsorUserOperation", json!([op_json(1), ep]))
        .await?;
    assert_eq!(first, again, "same paymasterData from either replica");
    let day = session_paymaster::clock::unix_now() / 86_400;
    let (_, ops) = apps[0]
        .state
        .sponsor
        .ledger()
        .usage("budgeted", &format!("policy:{day}"))
        .await?;
    assert_eq!(
        ops, 1,
        "the stub reserved nothing and the repeat reserved nothing more"
    );
    Ok(())
}

#[tokio::test]
async fn ledger_outage_fails_closed() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    drop(redis);
    let err = apps[0]
        .error(
            "pm_sponsorUserOperation",
            json!([op_json(1), EntryPointVersion::V0_7.canonical_address()]),
        )
        .await?;
    assert_eq!(err["code"], json!(-32004), "{err}");
    Ok(())
}

/// DESIGN §1: a sponsorship without a session costs Redis exactly one call of a script (an
/// `FCALL` of the ledger's library) and nothing else. Redis counts the commands a script runs
/// too, so the expected counts are those of one `reserve.lua` run per sponsorship (one budget
/// scope); a client command anywhere would add to them.
#[tokio::test]
async fn a_sponsorship_is_one_fcall() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    // The service loaded the library when it connected; the first call makes the counters.
    apps[0]
        .result("pm_sponsorUserOperation", json!([op_json(999), ep]))
        .await?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let before = command_calls(&mut conn).await?;
    for i in 0..5 {
        apps[0]
            .result("pm_sponsorUserOperation", json!([op_json(1000 + i), ep]))
            .await?;
    }
    let after = command_calls(&mut conn).await?;
    let delta: BTreeMap<&str, u64> = after
        .iter()
        .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    // Per run of reserve.lua with one scope and no session, a new nonce: SET … NX GET the
    // nonce's key (none: the new record written with its TTL, in the same command), HMGET the
    // scope's counters, TIME (Redis' clock, to see whether the counter lives long enough), HSET
    // the counters, APPEND the nonce to its expiry bucket; no DEL (each is reserved). No
    // EXPIRE of the scope: the first call gave it its TTL and noted it (`until`), and these
    // need it no longer. The bucket exists (the first call
    // made it, with its TTL and index entry), unless a 10 s boundary passed meanwhile: then one
    // call makes the next (EXPIRE it, ZADD it, trim). The budget's day may end meanwhile too:
    // then one call makes the next day's counter (its EXPIRE).
    let new_bucket = delta.get("zadd").copied().unwrap_or(0);
    assert!(new_bucket <= 1, "{delta:?}");
    let expire = delta.get("expire").copied().unwrap_or(0);
    assert!((new_bucket..=new_bucket + 1).contains(&expire), "{delta:?}");
    let mut expected = BTreeMap::from([
        ("fcall", 5),
        ("hmget", 5),
        ("time", 5),
        ("hset", 5),
        ("set", 5),
        ("append", 5),
    ]);
    if expire > 0 {
        expected.insert("expire", expire);
    }
    if new_bucket == 1 {
        expected.extend([("zadd", 1), ("zremrangebyscore", 1)]);
    }
    assert_eq!(delta, expected, "Redis commands for 5 sponsorships");
    Ok(())
}

/// How many times Redis ran `cmd` between two [`command_calls`].
fn ran(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, cmd: &str) -> u64 {
    after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0)
}

/// How many times Redis ran each command (`INFO commandstats`), but `INFO`.
pub(crate) async fn command_calls(
    conn: &mut redis::aio::MultiplexedConnection,
) -> TestResult<BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (cmd, rest) = l.split_once(':')?;
            let calls = rest
                .split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((cmd.to_owned(), calls))
        })
        .filter(|(cmd, _)| cmd != "info")
        .collect())
}

/// How many `FCALL`s Redis has run.
async fn fcalls(redis: &TestRedis) -> TestResult<u64> {
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    Ok(command_calls(&mut conn)
        .await?
        .get("fcall")
        .copied()
        .unwrap_or(0))
}

/// What a Redis ledger counts of its calls (`Ledger::call_counts`, `/metrics`): its signing
/// runs' and its checks', each `(calls, operations)`.
fn call_counts(sign: (u64, u64), check: (u64, u64)) -> Option<LedgerCalls> {
    let counts = |(calls, operations)| CallCounts { calls, operations };
    Some(LedgerCalls {
        sign: counts(sign),
        check: counts(check),
    })
}

/// The reservations (each `(reservation, check only)`) made at once, each in a task of its own
/// (on the test's one thread, all submit before the first call's task runs), and their
/// outcomes in order.
async fn reserve_at_once(
    ledger: &std::sync::Arc<Ledger>,
    calls: Vec<(Reservation, bool)>,
) -> TestResult<Vec<Result<Outcome, session_paymaster::session::StoreError>>> {
    reserve_at_once_at(ledger, calls, NOW).await
}

/// [`reserve_at_once`] at time `now`.
async fn reserve_at_once_at(
    ledger: &std::sync::Arc<Ledger>,
    calls: Vec<(Reservation, bool)>,
    now: u64,
) -> TestResult<Vec<Result<Outcome, session_paymaster::session::StoreError>>> {
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|(r, check_only)| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.reserve(&r, check_only, now).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await?);
    }
    Ok(out)
}

/// Reservations of one policy made at once go to Redis together, several to a call
/// (`ledger::batch`), and each is counted as a call of its own would count it: 40 at once, of
/// four senders allowed three operations each, reserve exactly three of each, with the
/// counters each read after the operations before it, in its call or the call before, wrote
/// them.
#[tokio::test]
async fn reservations_made_together_share_calls_and_count_exactly() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let before = fcalls(&redis).await?;
    let sender = |i: u8| scope(&format!("sender:0x{:040x}:20833", i % 4), None, Some(3));
    let calls = (0..40u8)
        .map(|i| {
            let r = reservation(i + 1, 7, vec![sender(i), scope("pm", Some(1000), None)]);
            (r, false)
        })
        .collect();
    let mut reserved = 0;
    for outcome in reserve_at_once(&ledger, calls).await? {
        match outcome? {
            Outcome::Reserved => reserved += 1,
            Outcome::Exhausted(e) => {
                assert_eq!((e.resource, e.limit, e.used), (Resource::Ops, 3, 3));
                assert!(e.scope.starts_with("sender:"), "{e:?}");
            }
            other => return Err(format!("{other:?}").into()),
        }
    }
    assert_eq!(reserved, 12, "three of each of four senders");
    for i in 0..4 {
        assert_eq!(ledger.usage("p", &sender(i).name).await?, (21, 3));
    }
    assert_eq!(ledger.usage("p", "pm").await?, (84, 12));
    // Two calls: the 32 after the first filled one (at most MAX_BATCH, 32), which went at
    // once beside the first's; the first's task yielded before its call went (ledger::batch),
    // which took the 7 after them.
    let calls = fcalls(&redis).await? - before;
    assert_eq!(calls, 2, "40 reservations in {calls} calls");
    // What the ledger counts of its calls (`/metrics`) is what Redis ran.
    assert_eq!(ledger.call_counts(), call_counts((2, 40), (0, 0)));
    // The senders' window hash, new in that call, got its TTL there.
    let mut c = conn.clone();
    let ttl: i64 = redis::cmd("TTL")
        .arg("sp:{p}:budget:sender:20833")
        .query_async(&mut c)
        .await?;
    assert!(ttl > 0, "TTL {ttl}");
    Ok(())
}

/// What one call may hold besides new operations, each as a call of its own would answer it:
/// the same operation twice (reserved once, then its answer) and two operations of one session
/// whose token cap fits only the first; and a stub made with them (checked, nothing reserved),
/// which goes in a call of its own (checks wait apart).
#[tokio::test]
async fn a_call_of_several_answers_each_as_alone() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, _) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let before = fcalls(&redis).await?;
    let token = Address::repeat_byte(0x70);
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let under = |op: u8| Reservation {
        session: session_charge(
            B256::repeat_byte(0x5e),
            vec![token_charge(
                token,
                unit * U256::from(2u64),
                unit * U256::from(3u64),
            )],
        ),
        ..reservation(op, 10, vec![pm(4200)])
    };
    // They go in one call (the first's task yields before its call goes, and takes the others,
    // waiting by then), but for the stub: checks wait apart, and it goes in a call of its own.
    let calls = vec![
        (reservation(1, 10, vec![pm(4200)]), false),
        (reservation(2, 10, vec![pm(4200)]), false),
        (reservation(2, 10, vec![pm(4200)]), false),
        (reservation(3, 10, vec![pm(4200)]), true),
        (under(4), false),
        (under(5), false),
    ];
    let answers = reserve_at_once(&ledger, calls)
        .await?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(
        answers[..5],
        vec![
            Outcome::Reserved,
            Outcome::Reserved,
            Outcome::Existing(answer(2, NOW + 600)),
            Outcome::Reserved,
            Outcome::Reserved,
        ]
    );
    let Outcome::SpendExceeded(e) = &answers[5] else {
        return Err(format!("{:?}", answers[5]).into());
    };
    assert_eq!(
        (e.spent, e.requested),
        (unit * U256::from(2u64), unit * U256::from(2u64))
    );
    assert_eq!(
        ledger.usage("p", "pm").await?,
        (30, 3),
        "ops 1, 2 and 4: the repeat and the stub reserved nothing"
    );
    assert_eq!(fcalls(&redis).await? - before, 2);
    // (The signing runs' call of 5, the stub's of 1, as the ledger counts them.)
    assert_eq!(ledger.call_counts(), call_counts((1, 5), (1, 1)));
    Ok(())
}

/// Checks (stubs, explanations) are free to ask and rated per key only: a flood of them filled
/// the queue a policy's reservations wait in, and its signing runs were refused
/// (`store_unavailable`) while it lasted (found by review). They wait apart now, each kind
/// with its own bound.
#[tokio::test]
async fn a_flood_of_checks_leaves_signing_runs_their_own_queue() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, _) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    // More checks than the calls in flight and the queue hold (1 + 32 + 512: checks of 250
    // operations in turn, each check alone reserving nothing), then one signing run.
    use session_paymaster::ledger::{MAX_BATCH, MAX_IN_FLIGHT, MAX_WAITING};
    let held = 1 + (MAX_IN_FLIGHT - 1) * MAX_BATCH + MAX_WAITING;
    let mut calls: Vec<_> = (0..600u16)
        .map(|i| (reservation((i % 250 + 1) as u8, 10, vec![pm(4200)]), true))
        .collect();
    calls.push((reservation(251, 10, vec![pm(4200)]), false));
    let answers = reserve_at_once(&ledger, calls).await?;
    let refused = answers[..600]
        .iter()
        .filter(|a| matches!(a, Err(e) if e.to_string().contains("waiting")))
        .count();
    assert_eq!(refused, 600 - held, "the checks overflowed their queue");
    assert_eq!(
        answers[600].as_ref().map_err(ToString::to_string),
        Ok(&Outcome::Reserved),
        "the signing run, after {refused} checks refused"
    );
    assert_eq!(ledger.usage("p", "pm").await?, (10, 1));
    Ok(())
}

/// A session's state (its token totals) lives to the session's end, set when totals are
/// written; an operation of the session that writes none (no token cap) leaves it as it is:
/// the session's end is the grant's, fixed for its id, so there is nothing to extend.
#[tokio::test]
async fn a_sessions_totals_live_to_its_end() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let id = B256::repeat_byte(0x5e);
    let key = format!("sp:{{p}}:session:{id}");
    let under = |op: u8, spend: Vec<TokenCharge>| Reservation {
        session: session_charge(id, spend),
        ..reservation(op, 10, vec![])
    };
    let capped = || {
        vec![token_charge(
            Address::repeat_byte(0x70),
            U256::from(5u64),
            U256::from(100u64),
        )]
    };
    let ttl = async |c: &mut session_paymaster::session::redis::RedisConn| -> TestResult<i64> {
        Ok(redis::cmd("TTL").arg(&key).query_async(c).await?)
    };
    assert_eq!(
        ledger.reserve(&under(1, capped()), false, NOW).await?,
        Outcome::Reserved
    );
    assert!((7190..=7200).contains(&ttl(&mut c).await?));
    // As if an hour had passed: an operation without a cap changes neither totals nor TTL.
    redis::cmd("EXPIRE")
        .arg(&key)
        .arg(3600)
        .query_async::<()>(&mut c)
        .await?;
    assert_eq!(
        ledger.reserve(&under(2, vec![]), false, NOW).await?,
        Outcome::Reserved
    );
    assert!((3590..=3600).contains(&ttl(&mut c).await?));
    assert_eq!(
        ledger.reserve(&under(3, capped()), false, NOW).await?,
        Outcome::Reserved
    );
    assert!((7190..=7200).contains(&ttl(&mut c).await?));
    let spent: String = redis::cmd("HGET")
        .arg(&key)
        .arg(format!("spent:{}", Address::repeat_byte(0x70)))
        .query_async(&mut c)
        .await?;
    assert_eq!(spent, "10");
    Ok(())
}

/// An operation that fails in `reserve.lua` fails alone, and what it wrote stays written but
/// its new record: here its expiry bucket is a key of another type, so it fails after its
/// counters were charged (the `APPEND` after them), and the record written as it began is
/// deleted. It is refused (fail closed); its charge stays
/// (counted over, never under), and the operations after it in its call see it: of nine
/// operations of a sender allowed six, in one call, five are reserved, one fails
/// with its charge kept, three find the budget spent.
#[tokio::test]
async fn a_reservation_that_fails_leaves_the_others_of_its_call_reserved() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let before = fcalls(&redis).await?;
    // The failing operation's answer ends 100 s after the others', in a bucket of its own.
    let failing = 4;
    let mut c = conn.clone();
    redis::cmd("HSET")
        .arg(format!("sp:{{p}}:x:{}", (NOW + 700) / 10))
        .arg("not")
        .arg("a string")
        .query_async::<()>(&mut c)
        .await?;
    let sender = scope(
        "sender:0x00000000000000000000000000000000000000aa:20833",
        None,
        Some(6),
    );
    let calls = (0..9u8)
        .map(|i| {
            let mut r = reservation(i + 1, 5, vec![sender.clone(), scope("pm", None, None)]);
            if i == failing {
                r.answer = answer(i + 1, NOW + 700);
            }
            (r, false)
        })
        .collect();
    let mut answers = Vec::new();
    for (i, outcome) in reserve_at_once(&ledger, calls)
        .await?
        .into_iter()
        .enumerate()
    {
        match outcome {
            Err(e) if i == usize::from(failing) => {
                assert!(e.to_string().contains("WRONGTYPE"), "{e}");
                answers.push("failed");
            }
            Ok(Outcome::Reserved) => answers.push("reserved"),
            Ok(Outcome::Exhausted(e)) if e.used == 6 => answers.push("spent"),
            other => return Err(format!("op {i}: {other:?}").into()),
        }
    }
    assert_eq!(
        answers,
        [
            "reserved", "reserved", "reserved", "reserved", "failed", "reserved", "spent", "spent",
            "spent"
        ]
    );
    assert_eq!(
        ledger.usage("p", &sender.name).await?,
        (30, 6),
        "the failed one's charge kept"
    );
    assert_eq!(ledger.usage("p", "pm").await?, (30, 6));
    // All nine in one call (the first's task yielded before it went, and took the eight,
    // waiting by then).
    assert_eq!(fcalls(&redis).await? - before, 1);
    // Each operation's new record is written as the operation begins (`SET … NX GET`): the
    // failed one's and the refused ones' are gone, so none of them is a reservation.
    assert_eq!(nonces_held(&mut c, 1..=9).await?, [1, 2, 3, 4, 6]);
    // Its bucket mended, the failed operation asked again is refused for the budget its
    // failure charged, not answered with the signature of its record, which no expiry bucket
    // lists (its charge never released).
    redis::cmd("DEL")
        .arg(format!("sp:{{p}}:x:{}", (NOW + 700) / 10))
        .query_async::<()>(&mut c)
        .await?;
    let mut again = reservation(
        failing + 1,
        5,
        vec![sender.clone(), scope("pm", None, None)],
    );
    again.answer = answer(failing + 1, NOW + 700);
    match ledger.reserve(&again, false, NOW).await? {
        Outcome::Exhausted(e) if e.used == 6 => {}
        other => return Err(format!("the failed operation again: {other:?}").into()),
    }
    assert_eq!(nonces_held(&mut c, 1..=9).await?, [1, 2, 3, 4, 6]);
    Ok(())
}

/// Two operations of one nonce in one call (two variants of an operation, say), the first
/// refused for its budget after it wrote its nonce's new key as it began (`SET … NX GET`): the
/// call deletes that key before the second runs, so the second is a reservation of its own,
/// charged, alone in the nonce's key, and its landing settles it and nothing else. Had the
/// first's record stayed, it would sit open beside the second with no charge, and the landing
/// would supersede it, giving back a cost never counted.
#[tokio::test]
async fn a_refused_operation_leaves_no_record_for_the_next_of_its_nonce() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, mut c) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let before = fcalls(&redis).await?;
    let capped = scope("pm", Some(50), None);
    let first = reservation(1, 100, vec![capped.clone()]);
    let second = Reservation {
        landing_key: first.landing_key,
        ..reservation(2, 10, vec![capped.clone()])
    };
    let outcomes = reserve_at_once(&ledger, vec![(first, false), (second, false)]).await?;
    match &outcomes[..] {
        [Ok(Outcome::Exhausted(e)), Ok(Outcome::Reserved)] if e.used == 0 => {}
        other => return Err(format!("{other:?}").into()),
    }
    assert_eq!(fcalls(&redis).await? - before, 1, "both in one call");
    assert_eq!(ledger.usage("p", "pm").await?, (10, 1));
    assert_eq!(nonces_held(&mut c, [1]).await?, [1], "the second's record");
    let landed = Landing {
        landing_key: B256::repeat_byte(1 ^ 0x40),
        user_op_hash: B256::repeat_byte(2 ^ 0x80),
        actual_gwei: 7,
    };
    assert_eq!(
        ledger.settle(&["p".to_owned()], &landed).await?,
        settled(1, 0, true)
    );
    assert_eq!(ledger.usage("p", "pm").await?, (7, 1));
    Ok(())
}

/// The senders' fields that several operations of a call read are read at once, one `HMGET`
/// per window's hash, before they run (counted below), and each operation counts on what the
/// ones before it charged; a hash that cannot be read (here a key of another type) fails only
/// the operations that read it, each alone, with nothing charged, not even in the scope before
/// it: of eight operations at once, four in a sound window (three senders, one of them twice)
/// and four in a broken one, the four in the sound window are reserved and
/// counted, and the policy counts only them.
#[tokio::test]
async fn a_window_that_cannot_be_read_fails_only_its_operations() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let mut c = conn.clone();
    redis::cmd("SET")
        .arg("sp:{p}:budget:sender:20834")
        .arg("not a hash")
        .query_async::<()>(&mut c)
        .await?;
    let sender = |i: u8| {
        let window = if i.is_multiple_of(2) { 20833 } else { 20834 };
        // (Op 2 is op 0's sender again; the others are one each.)
        let account = if i == 2 { 1 } else { i + 1 };
        scope(&format!("sender:0x{account:040x}:{window}"), None, Some(10))
    };
    let calls = (0..8u8)
        .map(|i| {
            (
                reservation(i + 1, 5, vec![scope("pm", None, None), sender(i)]),
                false,
            )
        })
        .collect();
    let mut stats = redis.conn().await?;
    let before = command_calls(&mut stats).await?;
    for (i, outcome) in reserve_at_once(&ledger, calls)
        .await?
        .into_iter()
        .enumerate()
    {
        match outcome {
            Ok(Outcome::Reserved) if i % 2 == 0 => {}
            Err(e) if i % 2 == 1 => assert!(e.to_string().contains("WRONGTYPE"), "{e}"),
            other => return Err(format!("op {i}: {other:?}").into()),
        }
    }
    let after = command_calls(&mut stats).await?;
    let calls = |cmd: &str| ran(&before, &after, cmd);
    // All eight in one call (the first's task yielded before it went, and took the seven,
    // waiting by then).
    assert_eq!(calls("fcall"), 1);
    // Each window's senders at once (the broken one's fails), then `pm` once, and each
    // operation of the broken window its own sender (failing). Read one by one, the sound
    // window's three senders would take three, not one.
    assert_eq!(calls("hmget"), 2 + 1 + 4);
    assert_eq!(ledger.usage("p", &sender(0).name).await?, (10, 2));
    for i in [4, 6] {
        assert_eq!(ledger.usage("p", &sender(i).name).await?, (5, 1));
    }
    assert_eq!(ledger.usage("p", "pm").await?, (20, 4));
    // The failed operations' new records, written as each began, are gone.
    assert_eq!(nonces_held(&mut c, 1..=8).await?, [1, 3, 5, 7]);
    // The window mended, one of them asked again is a new reservation, charged: not the
    // answer of a record its failure left.
    redis::cmd("DEL")
        .arg("sp:{p}:budget:sender:20834")
        .query_async::<()>(&mut c)
        .await?;
    let again = reservation(2, 5, vec![scope("pm", None, None), sender(1)]);
    assert_eq!(ledger.reserve(&again, false, NOW).await?, Outcome::Reserved);
    assert_eq!(ledger.usage("p", &sender(1).name).await?, (5, 1));
    assert_eq!(ledger.usage("p", "pm").await?, (25, 5));
    Ok(())
}

/// A call writes each counter hash its operations charged once, after they have all run (one
/// `HSET` of every field they changed, `write_counters` in `lib.lua`), not once a scope an
/// operation; what each operation counts on is what those before it charged, and a hash new in
/// the call gets its TTL after it exists. Eight operations at once, each of its own sender in
/// one window and all of the policy's `pm` (both hashes new): the seventh refused by its
/// sender's ops limit, charging nothing; the eighth's sender limited to what the fourth (the
/// same sender) leaves, so it is refused, as it is only if the fourth's charge is counted. Then
/// eight more on the same hashes: again two `HSET`s, and no TTL set.
#[tokio::test]
async fn a_call_writes_each_counter_hash_once() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let mut c = conn.clone();
    let sender = |account: u64, ops: Option<u64>| {
        scope(&format!("sender:0x{account:040x}:20833"), None, ops)
    };
    let op = |i: u8| {
        let s = match i {
            6 => sender(6, Some(0)),
            // The fourth's sender, one op allowed: the fourth took it.
            7 => sender(3, Some(1)),
            _ => sender(u64::from(i), Some(1)),
        };
        (
            reservation(i + 1, 5, vec![scope("pm", None, None), s]),
            false,
        )
    };
    let mut stats = redis.conn().await?;
    let before = command_calls(&mut stats).await?;
    let outcomes = reserve_at_once(&ledger, (0..8u8).map(op).collect()).await?;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(Outcome::Reserved) if i < 6 => {}
            // Each for its sender's ops (scope 1): the seventh's limit 0, the eighth's 1, taken.
            Ok(Outcome::Exhausted(e))
                if i >= 6
                    && e.scope == sender(if i == 6 { 6 } else { 3 }, None).name
                    && e.resource == Resource::Ops
                    && e.used == u64::from(i == 7) => {}
            other => return Err(format!("op {i}: {other:?}").into()),
        }
    }
    let after = command_calls(&mut stats).await?;
    let calls = |cmd: &str| ran(&before, &after, cmd);
    assert_eq!(calls("fcall"), 1);
    assert_eq!(
        calls("hset"),
        2,
        "one HSET per hash, not per operation and scope"
    );
    // Each new hash's TTL, once, and the new expiry bucket's. (Their order, after the `HSET`s,
    // is what the TTLs below show: an `EXPIRE` of a hash not yet written sets none.)
    assert_eq!(calls("expire"), 3);
    assert_eq!(calls("zadd"), 1);
    for key in ["sp:{p}:budget:pm", "sp:{p}:budget:sender:20833"] {
        let ttl: i64 = redis::cmd("TTL").arg(key).query_async(&mut c).await?;
        assert!(ttl > 0, "{key}: TTL {ttl}");
    }
    assert_eq!(ledger.usage("p", "pm").await?, (30, 6));
    for i in 0..6 {
        assert_eq!(
            ledger.usage("p", &sender(i, None).name).await?,
            (5, 1),
            "sender {i}"
        );
    }
    assert_eq!(ledger.usage("p", &sender(6, None).name).await?, (0, 0));
    assert_eq!(nonces_held(&mut c, 1..=8).await?, [1, 2, 3, 4, 5, 6]);
    // Eight more, new senders of the same window: the hashes exist and live long enough.
    let before = command_calls(&mut stats).await?;
    let more = (0..8u8)
        .map(|i| {
            let s = sender(100 + u64::from(i), None);
            (
                reservation(i + 101, 5, vec![scope("pm", None, None), s]),
                false,
            )
        })
        .collect();
    for outcome in reserve_at_once(&ledger, more).await? {
        assert_eq!(outcome?, Outcome::Reserved);
    }
    let after = command_calls(&mut stats).await?;
    let calls = |cmd: &str| ran(&before, &after, cmd);
    assert_eq!(calls("fcall"), 1);
    assert_eq!(calls("hset"), 2);
    assert_eq!(calls("expire"), 0);
    assert_eq!(ledger.usage("p", "pm").await?, (70, 14));
    Ok(())
}

/// A reservation extended to a fresh answer in a call among new ones (`reserve_then_refresh`'s
/// op 1, between two new operations charging its counter, which was gone and the first makes
/// anew): the extension reads the counter from Redis, which first gets what the operations
/// before it in the call charged (otherwise held until the call ends, `write_counters`), and
/// the counter lives as long as the fresh answer may land; every charge counted once.
#[tokio::test]
async fn a_call_extends_a_reservation_among_new_ones() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let ledger = std::sync::Arc::new(ledger);
    let mut c = conn.clone();
    let first = reservation(1, 5, vec![pm(600 + 3600)]);
    assert_eq!(ledger.reserve(&first, false, NOW).await?, Outcome::Reserved);
    let later = NOW + 590;
    let lives = 590 + 1600 + 3600;
    let fresh = Reservation {
        answer: answer(1, later + 1600),
        expires_at: later + 1600 + session_paymaster::ledger::GRACE_SECS,
        ..reservation(1, 5, vec![pm(lives)])
    };
    // (Their counter's end, 3,020 s on, is sooner than the fresh answer's: the counter lives
    // as long as that only if the extension extends it.)
    let new = |op: u8| Reservation {
        answer: answer(op, later + 600),
        ..reservation(op, 5, vec![pm(600 + 3600 - 590)])
    };
    // Op 1's counter gone meanwhile: op 2 makes it anew, in the call.
    redis::cmd("DEL")
        .arg("sp:{p}:budget:pm")
        .query_async::<i64>(&mut c)
        .await?;
    let mut stats = redis.conn().await?;
    let before = command_calls(&mut stats).await?;
    let calls = vec![(new(2), false), (fresh, false), (new(3), false)];
    for outcome in reserve_at_once_at(&ledger, calls, later).await? {
        assert_eq!(outcome?, Outcome::Reserved);
    }
    let after = command_calls(&mut stats).await?;
    let calls = |cmd: &str| ran(&before, &after, cmd);
    assert_eq!(calls("fcall"), 1);
    // Op 2's charge, written (with the new hash's TTL) before the extension reads; the
    // extension's `until`; op 3's charge at the end.
    assert_eq!(calls("hset"), 3);
    assert_eq!(ledger.usage("p", "pm").await?, (10, 2), "ops 2 and 3");
    // The new counter extended to the fresh answer's end. (Op 2's charge held to the end, the
    // extension would find no counter, and op 2's `EXPIRE` would then give it op 2's end.)
    let ttl: i64 = redis::cmd("TTL")
        .arg("sp:{p}:budget:pm")
        .query_async(&mut c)
        .await?;
    assert!(
        (5195..=5200).contains(&ttl),
        "extended with the answer: {ttl}"
    );
    // Each nonce's key its own TTL (the call's operations do not share one here).
    for (op, lives) in [
        (1, 1600 + session_paymaster::ledger::GRACE_SECS),
        (3, 4200 - 590),
    ] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(nonce_of(op))
            .query_async(&mut c)
            .await?;
        assert!(
            (lives - 5..=lives).contains(&(ttl as u64)),
            "op {op}: {ttl}"
        );
    }
    Ok(())
}

/// A call of `reserve.lua` whose frame does not add up to its keys and arguments (a frame cut
/// short, one naming an argument more than sent, one of odd length) runs nothing: it is refused
/// whole, before any operation runs, and Redis holds what it held.
#[tokio::test]
async fn a_call_whose_frame_does_not_add_up_runs_nothing() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    // One reservation: the library is loaded, and Redis holds its keys.
    let r = reservation(1, 10, vec![pm(4200)]);
    assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    let functions: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await?;
    let functions = format!("{functions:?}");
    let at = functions
        .find("sp_reserve_")
        .ok_or("no reserve function loaded")?;
    let reserve = &functions[at..at + "sp_reserve_".len() + 12];
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(&mut c).await?;
    let (numbers, entry, scopes) = (vec![0u8; 112], vec![0u8; 23], Vec::<u8>::new());
    // Each: the frame, then the arguments after it (one key, `sp:{p}:n:x`, in every call).
    for (frame, args) in [
        (vec![1u8], vec![&numbers, &entry, &scopes]),
        (vec![1u8, 4], vec![&numbers, &entry, &scopes]),
        (vec![1u8, 3, 0], vec![&numbers, &entry, &scopes]),
        (vec![2u8, 3], vec![&numbers, &entry, &scopes]),
    ] {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(reserve).arg(1).arg("sp:{p}:n:x").arg(&frame);
        for a in args {
            cmd.arg(a.as_slice());
        }
        let err = match cmd.query_async::<redis::Value>(&mut c).await {
            Err(e) => e,
            Ok(v) => return Err(format!("the frame {frame:?} ran: {v:?}").into()),
        };
        assert!(err.to_string().contains("reserve.lua: a frame of"), "{err}");
    }
    let after: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(&mut c).await?;
    assert_eq!(
        (after.len(), ledger.usage("p", "pm").await?),
        (keys.len(), (10, 1))
    );
    Ok(())
}

/// A settlement or release that fails midway (a Cluster refusing a key whose slot is
/// migrating, here a counter of the wrong type) keeps what it wrote: the record is saved closed
/// before any cost is given back, so the next try gives back nothing twice (counted over,
/// never under).
#[tokio::test]
async fn a_closing_that_fails_midway_gives_nothing_back_twice() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let scopes = || vec![scope("a", Some(1000), None), scope("b", Some(1000), None)];
    let policies = vec!["p".to_owned()];
    for (op, close) in [(1u8, "settle"), (2, "release")] {
        let r = Reservation {
            answer: answer(op, NOW + 600 + u64::from(op) * 1000),
            ..reservation(op, 100, scopes())
        };
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
        // Counter `b` broken: the script fails after giving `a` its part back.
        let kept: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
            .arg("sp:{p}:budget:b")
            .query_async(&mut c)
            .await?;
        redis::pipe()
            .del("sp:{p}:budget:b")
            .ignore()
            .set("sp:{p}:budget:b", "not a hash")
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        let at = NOW + 601 + u64::from(op) * 1000;
        let failed = match close {
            "settle" => ledger.settle(&policies, &landing(op, 30)).await.is_err(),
            _ => ledger.release_expired(&policies, at).await.is_err(),
        };
        assert!(failed, "{close}: the broken counter fails the script");
        let mut p = redis::pipe();
        p.del("sp:{p}:budget:b").ignore();
        for (field, value) in &kept {
            p.hset("sp:{p}:budget:b", field, value).ignore();
        }
        p.query_async::<()>(&mut c).await?;
        // The next try finds the record closed.
        match close {
            "settle" => {
                let again = ledger.settle(&policies, &landing(op, 30)).await?;
                assert_eq!((again.settled, again.superseded), (0, 0), "{again:?}");
            }
            _ => assert_eq!(ledger.release_expired(&policies, at).await?, 0),
        }
    }
    // `a`: op 1 settled at 30 once, op 2 released once; `b` kept both at their worst case.
    assert_eq!(ledger.usage("p", "a").await?, (30, 1));
    assert_eq!(ledger.usage("p", "b").await?, (200, 2));
    Ok(())
}

/// The ledger's scripts are a library of Redis Functions: a Redis that lost it (restarted
/// without persistence, a new Cluster node, `FUNCTION FLUSH`) gets it again on the next call,
/// and the call is made once.
#[tokio::test]
async fn a_redis_without_the_ledgers_functions_gets_them_again() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let scopes = || vec![scope("s", Some(1000), None)];
    assert_eq!(
        ledger
            .reserve(&reservation(1, 10, scopes()), false, NOW)
            .await?,
        Outcome::Reserved
    );
    let mut c = conn.clone();
    redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async::<()>(&mut c)
        .await?;
    assert_eq!(
        ledger
            .reserve(&reservation(2, 20, scopes()), false, NOW)
            .await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("p", "s").await?, (30, 2), "each charged once");
    let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await?;
    assert_eq!(libraries.len(), 1, "loaded again");
    Ok(())
}

/// Redis crashes mid-run and comes back from its append-only file: requests during the outage
/// fail closed (nothing signed), and the budgets after the restart are those before it.
#[tokio::test]
async fn redis_restart_with_aof_keeps_budgets_and_fails_closed_meanwhile() -> TestResult {
    let mut redis = TestRedis::start_persistent().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    for i in 0..3 {
        apps[0]
            .result("pm_sponsorUserOperation", json!([op_json(i), ep]))
            .await?;
    }
    let scope = crate::helpers::policy_day_scope();
    let ledger = apps[0].state.sponsor.ledger();
    assert_eq!(ledger.usage("budgeted", &scope).await?.1, 3);

    redis.kill();
    let err = apps[0]
        .error("pm_sponsorUserOperation", json!([op_json(3), ep]))
        .await?;
    assert_eq!(
        err["code"],
        json!(-32004),
        "fail closed while Redis is down: {err}"
    );

    redis.restart().await?;
    // The connection reconnects by itself; the first request may still see the old socket.
    let mut usage = None;
    for _ in 0..20 {
        if let Ok(u) = ledger.usage("budgeted", &scope).await {
            usage = Some(u.1);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        usage,
        Some(3),
        "budgets after the restart equal those before"
    );
    let mut signed = 3;
    for i in 10..20 {
        if apps[0]
            .call("pm_sponsorUserOperation", json!([op_json(i), ep]))
            .await?["result"]
            .is_object()
        {
            signed += 1;
        }
    }
    assert_eq!(
        signed, K,
        "the budget still holds exactly K after the restart"
    );
    Ok(())
}

/// pm_getSessionStatus shows each budget the session is charged to: limit, used, remaining.
#[tokio::test]
async fn session_status_shows_budgets() -> TestResult {
    let dir = budget_dir()?;
    let policy = dir.0.join("budgeted.toml");
    let text = std::fs::read_to_string(&policy)?
        .replace("[budgets]\n", "[budgets]\nsession = { ops = 4 }\n");
    std::fs::write(&policy, text)?;
    let apps = apps(1, None, &dir).await?;
    let account = Address::repeat_byte(0x11);
    let now = session_paymaster::clock::unix_now();
    let body = json!({
        "account": account, "sessionKey": account, "chainId": 31337, "policy": "budgeted",
        "validAfter": now - 5, "validUntil": now + 3600, "budget": { "ops": 3 }
    });
    let resp = reqwest::Client::new()
        .post(format!("{}/admin/sessions", apps[0].url))
        .header(
            "authorization",
            format!("Bearer {}", crate::helpers::ADMIN_TOKEN),
        )
        .json(&body)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 201);
    let session = resp.json::<Value>().await?["sessionId"].clone();
    let ep = EntryPointVersion::V0_7.canonical_address();
    apps[0]
        .result(
            "pm_sponsorUserOperation",
            json!([op_json(1), ep, { "sessionId": session }]),
        )
        .await?;
    let status = apps[0]
        .result("pm_getSessionStatus", json!([session]))
        .await?;
    let budgets = status["budgets"].as_array().ok_or("budgets")?;
    // (A session created on a Redis every replica of which reads shared budgets: its
    // counter's name has its end day.)
    assert_eq!(
        budgets[0]["scope"],
        json!(format!(
            "session:{}:{}",
            (now + 3600) / 86_400,
            session.as_str().ok_or("id")?
        ))
    );
    assert_eq!(
        budgets[0]["ops"],
        json!({ "limit": 3, "used": 1, "remaining": 2 }),
        "the smaller of grant and policy"
    );
    assert_eq!(budgets[0]["resetsAt"], Value::Null);
    let reserved = budgets[0]["reservedGwei"].as_u64().ok_or("reserved")?;
    assert!(
        reserved > 0 && budgets[0]["spentGwei"] == json!(0),
        "open until settled: {status}"
    );
    assert_eq!(
        budgets[1]["ops"],
        json!({ "limit": K, "used": 1, "remaining": K - 1 })
    );
    assert_eq!(budgets[1]["resetsAt"], json!((now / 86_400 + 1) * 86_400));
    Ok(())
}

/// A session's grant says where its budget is counted, for good: one created while Redis holds
/// the library of a replica that would refuse a shared one keeps a key of its
/// own, on every replica and after the upgrade ends; one created once no such library is
/// loaded is counted in its end day's hash. Two replicas count each session in one place.
#[tokio::test]
async fn a_sessions_budget_stays_where_its_grant_put_it() -> TestResult {
    let redis = TestRedis::start().await?;
    let conn = ledger_conn(&redis).await?;
    let mut c = conn.clone();
    load_earlier_library(&mut c).await?;
    let dir = budget_dir()?;
    let policy = dir.0.join("budgeted.toml");
    let text = std::fs::read_to_string(&policy)?
        .replace("[budgets]\n", "[budgets]\nsession = { ops = 4 }\n");
    std::fs::write(&policy, text)?;
    let now = session_paymaster::clock::unix_now();
    let create = async |app: &TestApp, account: Address| -> TestResult<Value> {
        let resp = reqwest::Client::new()
            .post(format!("{}/admin/sessions", app.url))
            .header(
                "authorization",
                format!("Bearer {}", crate::helpers::ADMIN_TOKEN),
            )
            .json(&json!({
                "account": account, "sessionKey": account, "chainId": 31337,
                "policy": "budgeted", "validAfter": now - 5, "validUntil": now + 3600
            }))
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 201);
        Ok(resp.json::<Value>().await?["sessionId"].clone())
    };
    let budget = async |app: &TestApp, session: &Value| -> TestResult<(Value, Value)> {
        let status = app.result("pm_getSessionStatus", json!([session])).await?;
        Ok((
            status["budgets"][0]["scope"].clone(),
            status["budgets"][0]["ops"]["used"].clone(),
        ))
    };
    let first = apps(1, Some(&redis), &dir).await?.remove(0);
    let own = create(&first, Address::repeat_byte(0x11)).await?;
    let own_id = own.as_str().ok_or("id")?;
    delete_earlier_library(&mut c).await?;
    let second = apps(1, Some(&redis), &dir).await?.remove(0);
    let shared = create(&second, Address::repeat_byte(0x11)).await?;
    let shared_id = shared.as_str().ok_or("id")?;
    let day = (now + 3600) / 86_400;
    let ep = EntryPointVersion::V0_7.canonical_address();
    // Each session sponsored by the replica that did not create it.
    for (app, session, nonce) in [(&second, &own, 1), (&first, &shared, 2)] {
        app.result(
            "pm_sponsorUserOperation",
            json!([op_json(nonce), ep, { "sessionId": session }]),
        )
        .await?;
    }
    for app in [&first, &second] {
        assert_eq!(
            budget(app, &own).await?,
            (json!(format!("session:{own_id}")), json!(1))
        );
        assert_eq!(
            budget(app, &shared).await?,
            (json!(format!("session:{day}:{shared_id}")), json!(1))
        );
    }
    let exists = async |c: &mut session_paymaster::session::redis::RedisConn, key: String| {
        redis::cmd("EXISTS").arg(key).query_async::<i64>(c).await
    };
    assert_eq!(
        exists(&mut c, format!("sp:{{budgeted}}:budget:session:{own_id}")).await?,
        1
    );
    assert_eq!(
        exists(
            &mut c,
            format!("sp:{{budgeted}}:budget:session:{shared_id}")
        )
        .await?,
        0
    );
    let field: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(format!("sp:{{budgeted}}:budget:sender:d{day}"))
        .arg(&alloy::primitives::keccak256(alloy::hex::decode(shared_id)?)[..20])
        .query_async(&mut c)
        .await?;
    assert_eq!(field.map(|f| f.len()), Some(24), "its packed counter");
    Ok(())
}

/// `/metrics` shows what is left of each policy-wide budget.
#[tokio::test]
async fn metrics_show_budget_remaining() -> TestResult {
    let dir = budget_dir()?;
    let apps = apps(1, None, &dir).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    for i in 0..2 {
        apps[0]
            .result("pm_sponsorUserOperation", json!([op_json(i), ep]))
            .await?;
    }
    let text = reqwest::get(format!("{}/metrics", apps[0].url))
        .await?
        .text()
        .await?;
    let remaining = |n: u64| {
        format!("sp_budget_remaining{{policy=\"budgeted\",chain=\"31337\",resource=\"ops\"}} {n}")
    };
    assert!(text.contains(&remaining(K - 2)), "{text}");
    // The embedded ledger makes no calls to count (the Redis one's: the burst test).
    assert!(!text.contains("sp_ledger_call"), "{text}");
    // `/metrics` asks for no credential: scrapes read the budgets from the ledger at most every
    // 5 s, the ones between show what the last read (a third sponsorship is not seen yet)...
    let scraped = std::time::Instant::now();
    apps[0]
        .result("pm_sponsorUserOperation", json!([op_json(2), ep]))
        .await?;
    let scrape = || async {
        reqwest::get(format!("{}/metrics", apps[0].url))
            .await?
            .text()
            .await
    };
    for _ in 0..20 {
        let text = scrape().await?;
        if scraped.elapsed() >= std::time::Duration::from_secs(5) {
            return Err("20 scrapes took 5 s: too slow to tell a cached value".into());
        }
        assert!(text.contains(&remaining(K - 2)), "{text}");
    }
    // ... and the first after them reads it.
    tokio::time::sleep(std::time::Duration::from_secs(5).saturating_sub(scraped.elapsed())).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let text = scrape().await?;
    assert!(text.contains(&remaining(K - 3)), "{text}");
    Ok(())
}

/// Without a watcher nothing released reservations, and the index of open ones grew for good:
/// each reservation now drops the expiry buckets whose records have expired.
#[tokio::test]
async fn the_open_set_is_trimmed_without_a_watcher() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    for op in 1..=5u8 {
        assert_eq!(
            ledger
                .reserve(&reservation(op, 1, vec![]), false, NOW)
                .await?,
            Outcome::Reserved
        );
    }
    // Past the whole 10 s bucket of validUntil NOW + 600, plus the grace its records lived.
    let later = NOW + 610 + session_paymaster::ledger::GRACE_SECS;
    let live = Reservation {
        answer: answer(6, later + 600),
        expires_at: later + 600 + session_paymaster::ledger::GRACE_SECS,
        ..reservation(6, 1, vec![])
    };
    assert_eq!(
        ledger.reserve(&live, false, later).await?,
        Outcome::Reserved
    );
    let mut c = conn.clone();
    let open: u64 = redis::cmd("ZCARD")
        .arg("sp:{p}:x")
        .query_async(&mut c)
        .await?;
    assert_eq!(open, 1, "only the live one is left");
    Ok(())
}

/// A budget counter lives until the latest end any reservation gave it (a policy republished
/// with a later window may name the same counter), never shorter; a reservation whose counter
/// already lives long enough sets no TTL (reserve.lua notes the expiry, on Redis' clock, as
/// `until`), and a counter without that note (written by an earlier version) is still extended.
#[tokio::test]
async fn a_budget_counter_lives_to_the_latest_end_it_was_given() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let key = "sp:{p}:budget:w";
    // TTL, `until` less Redis' clock (how long the counter was noted to live), and how many
    // EXPIREs Redis has run so far.
    let state =
        async |mut c: session_paymaster::session::redis::RedisConn| -> TestResult<(i64, i64, u64)> {
            let ttl: i64 = redis::cmd("TTL").arg(key).query_async(&mut c).await?;
            let noted: Option<i64> = redis::cmd("HGET")
                .arg(key)
                .arg("until")
                .query_async(&mut c)
                .await?;
            let (now, _): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await?;
            let stats: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut c)
                .await?;
            let expires = stats
                .lines()
                .find_map(|l| l.strip_prefix("cmdstat_expire:calls="))
                .and_then(|v| v.split(',').next()?.parse().ok())
                .unwrap_or(0);
            Ok((ttl, noted.map_or(-1, |u| u - now), expires))
        };
    let reserve = async |op: u8, lives: u64| -> TestResult {
        let w = Scope {
            expires_at: NOW + lives,
            ..scope("w", None, None)
        };
        let outcome = ledger
            .reserve(&reservation(op, 1, vec![w]), false, NOW)
            .await?;
        assert_eq!(outcome, Outcome::Reserved);
        Ok(())
    };
    reserve(1, 1000).await?;
    let (ttl, noted, expires) = state(conn.clone()).await?;
    assert!(
        (995..=1000).contains(&ttl),
        "a new counter gets its TTL: {ttl}"
    );
    assert!((995..=1001).contains(&noted), "and notes it: {noted}");
    // An end within EXTEND_SLACK (60 s) of the noted one, or earlier: no EXPIRE, nothing noted.
    reserve(2, 1020).await?;
    reserve(3, 50).await?;
    let (ttl, noted_after, expires_after) = state(conn.clone()).await?;
    assert_eq!(
        expires_after, expires,
        "no EXPIRE for a counter living long enough"
    );
    assert!(
        (990..=1000).contains(&ttl),
        "an earlier end leaves it: {ttl}"
    );
    assert!(
        (noted - 5..=noted).contains(&noted_after),
        "{noted_after} vs {noted}"
    );
    // A later end extends it, and is noted.
    reserve(4, 5000).await?;
    let (ttl, noted, _) = state(conn.clone()).await?;
    assert!(
        (4995..=5000).contains(&ttl),
        "a later end extends it: {ttl}"
    );
    assert!((4995..=5001).contains(&noted), "{noted}");
    assert_eq!(ledger.usage("p", "w").await?, (4, 4));
    // The counter as another writer left it: its `until` (`None`: absent), its TTL if given.
    let leave = async |until: Option<i64>, ttl: Option<i64>| -> TestResult {
        let mut p = redis::pipe();
        match until {
            None => p.hdel(key, "until"),
            Some(u) => p.hset(key, "until", u),
        }
        .ignore();
        if let Some(t) = ttl {
            p.expire(key, t).ignore();
        }
        p.query_async::<()>(&mut conn.clone()).await?;
        Ok(())
    };
    // As an earlier version left it: no `until`; extended (GT) to a later end, never shortened.
    leave(None, Some(10)).await?;
    reserve(5, 5000).await?;
    let (ttl, noted, _) = state(conn.clone()).await?;
    assert!(
        (4995..=5000).contains(&ttl),
        "extended without a note: {ttl}"
    );
    assert!((4995..=5001).contains(&noted), "and noted: {noted}");
    leave(None, Some(10_000)).await?;
    reserve(6, 5000).await?;
    let (ttl, _, _) = state(conn.clone()).await?;
    assert!((9990..=10_000).contains(&ttl), "not shortened: {ttl}");
    // A note below the key's real life (GT refused an earlier extension) shortens nothing.
    leave(Some(0), None).await?;
    reserve(7, 5000).await?;
    let (ttl, _, _) = state(conn.clone()).await?;
    assert!((9990..=10_000).contains(&ttl), "not shortened: {ttl}");
    assert_eq!(ledger.usage("p", "w").await?, (7, 7));
    Ok(())
}

/// Versions before 0.3 kept a counter's totals as decimal fields `cost`, `ops` and `open`; this
/// one packs them in one field `c`. A counter such a version wrote (or, in a rolling upgrade,
/// is still writing) counts: its totals are the sum of both, against limits and in usage, and
/// settling or releasing a reservation it counted leaves the sum right.
#[tokio::test]
async fn a_counter_an_earlier_version_wrote_still_counts() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let key = "sp:{old}:budget:s";
    let old = |op: u8, cost: u64| Reservation {
        policy: "old".into(),
        ..reservation(op, cost, vec![scope("s", Some(250), None)])
    };
    assert_eq!(
        ledger.reserve(&old(1, 100), false, NOW).await?,
        Outcome::Reserved
    );
    // As 0.2 left it after reserving op 1: its record as it is, its totals in decimal fields.
    redis::pipe()
        .hdel(key, "c")
        .ignore()
        .hset_multiple(key, &[("cost", "100"), ("ops", "1"), ("open", "100")])
        .ignore()
        .query_async::<()>(&mut c)
        .await?;
    assert_eq!(ledger.usage("old", "s").await?, (100, 1));
    assert_eq!(ledger.open("old", "s").await?, 100);
    // Closed into the packed field, which starts here (below zero): the sum is right.
    let policies = vec!["old".to_owned()];
    assert_eq!(
        ledger.settle(&policies, &landing(1, 30)).await?,
        settled(1, 0, true)
    );
    assert_eq!(
        ledger.usage("old", "s").await?,
        (30, 1),
        "op 1 at its actual cost"
    );
    assert_eq!(ledger.open("old", "s").await?, 0);
    assert_eq!(
        ledger.reserve(&old(2, 100), false, NOW).await?,
        Outcome::Reserved
    );
    // 30 + 100 counted: 150 more is over 250 (without the decimal fields it would fit).
    let Outcome::Exhausted(e) = ledger.reserve(&old(3, 150), false, NOW).await? else {
        return Err("the decimal fields count against the limit".into());
    };
    assert_eq!((e.used, e.limit, e.requested), (130, 250, 150));
    // A 0.2 replica charging meanwhile: seen too.
    redis::cmd("HINCRBY")
        .arg(key)
        .arg("cost")
        .arg(20)
        .query_async::<i64>(&mut c)
        .await?;
    assert_eq!(ledger.usage("old", "s").await?, (150, 2));
    assert_eq!(ledger.release_expired(&policies, NOW + 601).await?, 1);
    assert_eq!(ledger.usage("old", "s").await?, (50, 1), "op 2 released");
    assert_eq!(ledger.open("old", "s").await?, 0);
    // The decimal fields are left as they were: a 0.2 replica reads and writes them alone.
    let legacy: (i64, i64, i64) = redis::cmd("HMGET")
        .arg(key)
        .arg("cost")
        .arg("ops")
        .arg("open")
        .query_async(&mut c)
        .await?;
    assert_eq!(legacy, (120, 1, 100));
    Ok(())
}

/// A sender's counter is its field in a hash its window shares with every sender; each
/// sender's is its own (a test of `counter_slot` and `lib.lua`'s `counter_of` agreeing:
/// reserved by the service's key and field, settled and released by the script's), for a
/// window, a chain's window and a budget without a period.
#[tokio::test]
async fn sender_counters_share_their_windows_hash() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let a = "0x1111111111111111111111111111111111111111";
    let b = "0xabcdefabcdefabcdefabcdefabcdefabcdefabcd";
    let policies = vec!["p".to_owned()];
    for (op, rest) in [(1u8, ":20833"), (5, ":c8453:20833"), (9, "")] {
        let sender = |who: &str| scope(&format!("sender:{who}{rest}"), Some(250), None);
        for (i, who) in [a, b].into_iter().enumerate() {
            let r = reservation(op + i as u8, 100, vec![sender(who)]);
            assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
        }
        let r = reservation(op + 2, 100, vec![sender(a)]);
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
        let Outcome::Exhausted(e) = ledger
            .reserve(&reservation(op + 3, 100, vec![sender(a)]), false, NOW)
            .await?
        else {
            return Err(format!("{a}{rest} is over its budget").into());
        };
        assert_eq!((e.scope.as_str(), e.used), (sender(a).name.as_str(), 200));
        // One hash for the window, a field per sender, no key per sender.
        let key = format!("sp:{{p}}:budget:sender{rest}");
        let fields: i64 = redis::cmd("HLEN").arg(&key).query_async(&mut c).await?;
        assert_eq!(fields, 3, "{key}: two senders and `until`");
        let own: i64 = redis::cmd("EXISTS")
            .arg(format!("sp:{{p}}:budget:sender:{a}{rest}"))
            .query_async(&mut c)
            .await?;
        assert_eq!(own, 0);
        let usage = async |who: &str| ledger.usage("p", &sender(who).name).await;
        assert_eq!(
            ledger.settle(&policies, &landing(op, 30)).await?,
            settled(1, 0, true)
        );
        assert_eq!(usage(a).await?, (130, 2), "{rest}: settled by the script");
        assert_eq!(
            usage(b).await?,
            (100, 1),
            "{rest}: the other sender untouched"
        );
        assert_eq!(ledger.open("p", &sender(a).name).await?, 100);
    }
    assert_eq!(ledger.release_expired(&policies, NOW + 601).await?, 6);
    for rest in [":20833", ":c8453:20833", ""] {
        let name = |who: &str| format!("sender:{who}{rest}");
        assert_eq!(
            ledger.usage("p", &name(a)).await?,
            (30, 1),
            "{rest}: released"
        );
        assert_eq!(
            ledger.usage("p", &name(b)).await?,
            (0, 0),
            "{rest}: released"
        );
    }
    Ok(())
}

/// A session whose grant shares its budget (version 2) is counted in a field of one hash of
/// its policy's sessions that end the same UTC day: no key per session, the hash living to the
/// latest end it was given; reserved, refused, settled and released there, each session apart.
/// A session of version 1 keeps its key.
#[tokio::test]
async fn shared_session_budgets_are_fields_of_their_end_days_hash() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let policies = vec!["p".to_owned()];
    let day = (NOW + 7200) / 86_400;
    // Two sessions ending that day, hours apart; a third of version 1.
    let grant = |id: u8, valid_until, shared| {
        session_grant("p", B256::repeat_byte(id), valid_until, shared)
    };
    let (x, y, own) = (
        grant(0x51, day * 86_400 + 60, true),
        grant(0x52, day * 86_400 + 80_000, true),
        grant(0x53, day * 86_400 + 60, false),
    );
    let budget = |g: &SessionGrant| Scope {
        expires_at: g.valid_until + GRACE_SECS,
        ..scope(&session_budget_scope(g), Some(250), None)
    };
    assert_eq!(
        budget(&x).name,
        format!("session:{day}:{}", x.session_id),
        "the end day in its name"
    );
    assert_eq!(budget(&own).name, session_scope_name(own.session_id));
    let under = |op: u8, g: &SessionGrant| Reservation {
        session: session_charge(g.session_id, vec![]),
        ..reservation(op, 100, vec![budget(g)])
    };
    for (op, g) in [(1, &x), (2, &y), (3, &x), (4, &own)] {
        assert_eq!(
            ledger.reserve(&under(op, g), false, NOW).await?,
            Outcome::Reserved
        );
    }
    let Outcome::Exhausted(e) = ledger.reserve(&under(5, &x), false, NOW).await? else {
        return Err("x is over its budget".into());
    };
    assert_eq!((e.scope, e.used), (budget(&x).name, 200));
    // One hash for the day: a field per session and `until`; no key per shared session.
    let key = format!("sp:{{p}}:budget:sender:d{day}");
    let mut fields: Vec<Vec<u8>> = redis::cmd("HKEYS").arg(&key).query_async(&mut c).await?;
    fields.sort();
    let mut want = vec![
        field_of(x.session_id),
        field_of(y.session_id),
        b"until".to_vec(),
    ];
    want.sort();
    assert_eq!(fields, want, "{key}");
    let exists = async |c: &mut session_paymaster::session::redis::RedisConn, key: String| {
        redis::cmd("EXISTS").arg(key).query_async::<i64>(c).await
    };
    assert_eq!(
        exists(&mut c, format!("sp:{{p}}:budget:session:{}", x.session_id)).await?,
        0
    );
    assert_eq!(
        exists(&mut c, format!("sp:{{p}}:budget:{}", budget(&x).name)).await?,
        0
    );
    assert_eq!(
        exists(
            &mut c,
            format!("sp:{{p}}:budget:session:{}", own.session_id)
        )
        .await?,
        1,
        "version 1 keeps its key"
    );
    // It lives to the later session's end (plus grace), whichever reserved first.
    let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut c).await?;
    let latest = i64::try_from(y.valid_until + GRACE_SECS - NOW)?;
    assert!(ttl > latest - 60 && ttl <= latest, "{ttl} against {latest}");
    // Settled and released in its field, the other session untouched.
    assert_eq!(
        ledger.settle(&policies, &landing(1, 30)).await?,
        settled(1, 0, true)
    );
    let usage = async |g: &SessionGrant| ledger.usage("p", &budget(g).name).await;
    assert_eq!(usage(&x).await?, (130, 2));
    assert_eq!(usage(&y).await?, (100, 1));
    assert_eq!(ledger.open("p", &budget(&x).name).await?, 100);
    assert_eq!(ledger.release_expired(&policies, NOW + 601).await?, 3);
    assert_eq!(usage(&x).await?, (30, 1), "released");
    assert_eq!(usage(&y).await?, (0, 0), "released");
    assert_eq!(usage(&own).await?, (0, 0), "released");
    Ok(())
}

/// A revocation of a session whose budget is shared, in Redis: its status is a field of the day's
/// hash (beside its state key's), which lives at least to the session's end plus grace, even
/// when the revocation made it and a session ending sooner reserves in it next; the operations
/// of one call read the statuses with the counters (`prefetch_senders`), each refused or
/// reserved as alone.
#[tokio::test]
async fn a_shared_budgets_revocation_is_read_with_its_counter() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let day = (NOW + 7200) / 86_400;
    let (late, early) = (day * 86_400 + 80_000, day * 86_400 + 60);
    let budget = |id: u8, end: u64| Scope {
        expires_at: end + GRACE_SECS,
        ..scope(
            &session_budget_scope(&session_grant("p", B256::repeat_byte(id), end, true)),
            Some(1000),
            None,
        )
    };
    // Revoked before any reservation: the revocation makes the hash.
    ledger
        .revoke_session(
            &session_grant("p", B256::repeat_byte(0x71), late, true),
            NOW,
        )
        .await?;
    let key = format!("sp:{{p}}:budget:sender:d{day}");
    let status: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg([field_of(B256::repeat_byte(0x71)), b"r".to_vec()].concat())
        .query_async(&mut c)
        .await?;
    assert_eq!(status.as_deref(), Some("revoked"));
    let state: Option<String> = redis::cmd("HGET")
        .arg(format!("sp:{{p}}:session:{}", B256::repeat_byte(0x71)))
        .arg("status")
        .query_async(&mut c)
        .await?;
    assert_eq!(state.as_deref(), Some("revoked"), "its state key too");
    let ttl = async |c: &mut session_paymaster::session::redis::RedisConn| -> TestResult<i64> {
        Ok(redis::cmd("TTL").arg(&key).query_async(c).await?)
    };
    let lives = i64::try_from(late + GRACE_SECS - NOW)?;
    assert!((lives - 60..=lives).contains(&ttl(&mut c).await?));
    // A session ending sooner reserves in it: the hash keeps its life.
    let under = |op: u8, id: u8, end: u64| Reservation {
        session: session_charge(B256::repeat_byte(id), vec![]),
        ..reservation(op, 10, vec![budget(id, end)])
    };
    assert_eq!(
        ledger.reserve(&under(1, 0x72, early), false, NOW).await?,
        Outcome::Reserved
    );
    assert!((lives - 60..=lives).contains(&ttl(&mut c).await?));
    // Together in calls: the revoked session's operations refused, the others' reserved.
    let ledger = std::sync::Arc::new(ledger);
    let calls = (0..24u8)
        .map(|i| {
            let id = [0x71, 0x72, 0x73][usize::from(i % 3)];
            (
                under(10 + i, id, if id == 0x73 { late } else { early }),
                false,
            )
        })
        .collect();
    let outcomes = reserve_at_once(&ledger, calls).await?;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let want = if i % 3 == 0 {
            Outcome::SessionRevoked
        } else {
            Outcome::Reserved
        };
        assert_eq!(outcome?, want, "op {i}");
    }
    assert_eq!(ledger.usage("p", &budget(0x72, early).name).await?, (90, 9));
    assert_eq!(ledger.usage("p", &budget(0x73, late).name).await?, (80, 8));
    assert_eq!(ledger.usage("p", &budget(0x71, late).name).await?, (0, 0));
    Ok(())
}

/// Before 0.3 a sender's counter was a hash of its own (`sp:{P}:budget:sender:0x…:<window>`,
/// decimal fields). In a window begun before the first replica of 0.3 ran, a replica of an
/// earlier version may have counted (or, during the upgrade, still count) the sender there:
/// that key is read and summed, and a reservation counted there is closed there. In a window
/// begun later, only the window's hash is read.
#[tokio::test]
async fn a_sender_counter_an_earlier_version_kept_still_counts() -> TestResult {
    let redis = TestRedis::start().await?;
    let conn = ledger_conn(&redis).await?;
    let mut c = conn.clone();
    let since_key = session_paymaster::ledger::redis::LAYOUT_SINCE_KEY;
    let name = "sender:0x1111111111111111111111111111111111111111:20833";
    let legacy = format!("sp:{{p}}:budget:{name}");
    // On a Redis no replica has served (no policy set published), nothing of 0.2 is read: a
    // sender's old key, even in a budget without a period, is not there to count.
    let fresh = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let noted: u64 = redis::cmd("GET").arg(since_key).query_async(&mut c).await?;
    assert_eq!(noted, 0);
    redis::cmd("HSET")
        .arg(&legacy)
        .arg("cost")
        .arg(1_000_000)
        .query_async::<i64>(&mut c)
        .await?;
    for starts_at in [Some(0), None] {
        let r = Reservation {
            policy: "p".into(),
            ..reservation(
                9,
                10,
                vec![Scope {
                    starts_at,
                    ..scope(name, Some(250), None)
                }],
            )
        };
        assert_eq!(fresh.reserve(&r, false, NOW).await?, Outcome::Reserved);
        let _: () = redis::cmd("DEL")
            .arg(nonce_of(9))
            .query_async(&mut c)
            .await?;
    }
    // A Redis a 0.2 replica served (it published its policies) before the first 0.3 one.
    redis::pipe()
        .del(&[since_key, legacy.as_str(), "sp:{p}:budget:sender:20833"][..])
        .ignore()
        .set("sp:policies:current", "0x01")
        .ignore()
        .query_async::<()>(&mut c)
        .await?;
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let since: u64 = redis::cmd("GET")
        .arg(session_paymaster::ledger::redis::LAYOUT_SINCE_KEY)
        .query_async(&mut c)
        .await?;
    // Noted once: a replica started later reads the first one's time.
    redis::cmd("INCRBY")
        .arg(session_paymaster::ledger::redis::LAYOUT_SINCE_KEY)
        .arg(-100)
        .query_async::<i64>(&mut c)
        .await?;
    let again = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let kept: u64 = redis::cmd("GET")
        .arg(session_paymaster::ledger::redis::LAYOUT_SINCE_KEY)
        .query_async(&mut c)
        .await?;
    assert_eq!(kept, since - 100);
    let sender = |starts_at: u64| Scope {
        starts_at: Some(starts_at),
        ..scope(name, Some(250), None)
    };
    // Op 1 as a 0.2 replica reserved it: its record lists the sender as `sender:0x…` (0.3's
    // records say `s:0x…`), its charge in the sender's own key, which lives 100 s more.
    let before = sender(since - 3600);
    assert_eq!(
        ledger
            .reserve(&reservation(1, 100, vec![before.clone()]), false, NOW)
            .await?,
        Outcome::Reserved
    );
    let renamed: i64 = redis::Script::new(&format!(
        "{}\nlocal entries = load_nonce(KEYS[1])
         for _, e in ipairs(entries) do
           for i, n in ipairs(e[2].scopes) do
             e[2].scopes[i] = string.gsub(n, '^s:', 'sender:')
           end
         end
         save_nonce(KEYS[1], entries)
         return #entries",
        include_str!("../../src/ledger/lib.lua")
    ))
    .key(nonce_of(1))
    .invoke_async(&mut c)
    .await?;
    assert_eq!(renamed, 1);
    redis::pipe()
        .hdel("sp:{p}:budget:sender:20833", &[0x11u8; 20][..])
        .ignore()
        .hset_multiple(&legacy, &[("cost", "100"), ("ops", "1"), ("open", "100")])
        .ignore()
        .expire(&legacy, 100)
        .ignore()
        .query_async::<()>(&mut c)
        .await?;
    assert_eq!(ledger.usage("p", name).await?, (100, 1));
    assert_eq!(
        ledger
            .reserve(&reservation(2, 100, vec![before.clone()]), false, NOW)
            .await?,
        Outcome::Reserved
    );
    assert_eq!(ledger.usage("p", name).await?, (200, 2));
    let ttl: i64 = redis::cmd("TTL").arg(&legacy).query_async(&mut c).await?;
    assert!(
        (3590..=3600).contains(&ttl),
        "the old key lives as long as the counter it is part of: {ttl}"
    );
    // Op 1 closes where 0.2 counted it, though the sender has a field now.
    let policies = vec!["p".to_owned()];
    assert_eq!(
        ledger.settle(&policies, &landing(1, 30)).await?,
        settled(1, 0, true)
    );
    let old: (i64, i64, i64) = redis::cmd("HMGET")
        .arg(&legacy)
        .arg("cost")
        .arg("ops")
        .arg("open")
        .query_async(&mut c)
        .await?;
    assert_eq!(old, (30, 1, 0), "op 1 settled in the old key");
    assert_eq!(ledger.usage("p", name).await?, (130, 2));
    assert_eq!(ledger.open("p", name).await?, 100, "op 2's, in the field");
    // 100 in the window's hash and 30 in the old key: 150 more is over 250.
    let Outcome::Exhausted(e) = ledger
        .reserve(&reservation(3, 150, vec![before]), false, NOW)
        .await?
    else {
        return Err("the old key counts in a window begun before".into());
    };
    assert_eq!((e.scope.as_str(), e.used), (name, 130));
    // A window begun after the first 0.3 replica ran (and the margin): the old key is not read.
    assert_eq!(
        ledger
            .reserve(&reservation(3, 150, vec![sender(since + 600)]), false, NOW)
            .await?,
        Outcome::Reserved
    );
    // Each replica goes by the time noted first: the second one's bound is `since - 100` plus
    // the margin, so a window begun at `since + 250` is past it there, not for the first.
    let other = "sender:0x2222222222222222222222222222222222222222:20833";
    redis::cmd("HSET")
        .arg(format!("sp:{{p}}:budget:{other}"))
        .arg("cost")
        .arg(1000)
        .query_async::<i64>(&mut c)
        .await?;
    let late = || Scope {
        starts_at: Some(since + 250),
        ..scope(other, Some(250), None)
    };
    assert!(matches!(
        ledger
            .reserve(&reservation(7, 10, vec![late()]), false, NOW)
            .await?,
        Outcome::Exhausted(_)
    ));
    assert_eq!(
        again
            .reserve(&reservation(8, 10, vec![late()]), false, NOW)
            .await?,
        Outcome::Reserved
    );
    Ok(())
}

/// A reservation extended to a fresh answer (its signature about to expire) keeps its counters
/// alive as long as it may now land and settle (the deposit's counter lives only as long as the
/// answers it sums); a counter already gone is not brought back.
#[tokio::test]
async fn an_extended_reservation_extends_its_counters() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let key = "sp:{p}:budget:pm";
    let (fresh, later) = reserve_then_refresh(&ledger, async || {
        let ttl: i64 = redis::cmd("TTL")
            .arg(key)
            .query_async(&mut c.clone())
            .await?;
        assert!((4195..=4200).contains(&ttl), "{ttl}");
        Ok(())
    })
    .await?;
    let ttl: i64 = redis::cmd("TTL").arg(key).query_async(&mut c).await?;
    assert!(
        (5195..=5200).contains(&ttl),
        "extended with the answer: {ttl}"
    );
    // Gone meanwhile: an extension does not bring it back.
    redis::cmd("DEL")
        .arg(key)
        .query_async::<i64>(&mut c)
        .await?;
    let again = Reservation {
        answer: answer(1, later + 2200),
        ..fresh
    };
    assert_eq!(
        ledger.reserve(&again, false, later + 1590).await?,
        Outcome::Reserved
    );
    let exists: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut c).await?;
    assert_eq!(exists, 0);
    Ok(())
}

/// The same in memory: a counter extended with its refreshed reservation outlives the first
/// answer's end (without the extension it was forgotten, and the next charge started afresh).
#[tokio::test]
async fn an_extended_reservation_extends_its_counters_in_memory() -> TestResult {
    let ledger = Ledger::Memory(MemoryLedger::new());
    reserve_then_refresh(&ledger, async || Ok(())).await?;
    // Past the first answer's end plus grace, within the fresh one's.
    let after = NOW + 4300;
    let next = Reservation {
        answer: answer(2, after + 600),
        expires_at: after + 600 + session_paymaster::ledger::GRACE_SECS,
        ..reservation(2, 7, vec![pm(4300 + 600 + 3600)])
    };
    assert_eq!(
        ledger.reserve(&next, false, after).await?,
        Outcome::Reserved
    );
    assert_eq!(
        ledger.usage("p", "pm").await?,
        (12, 2),
        "the counter lived on"
    );
    Ok(())
}

/// Redis held 1,750 bytes per reservation (three keys each, measured: used_memory over 10k
/// reservations); at 10k sponsorships/s kept an hour that is tens of GB. An entry in its
/// nonce's string and 20 bytes of an expiry bucket now, measured the same way: at most 400.
/// A reservation of a sender new in the window adds the sender's counter: a key of its own
/// until 0.3 (650 bytes in all), a field of the window's hash now (430-510 measured, as the
/// hash's and the keyspace's tables double). Under a session (without token caps), at most
/// 400 too with its record by id (0.3.0's record by key: printed).
#[tokio::test]
async fn a_reservation_takes_at_most_400_bytes_550_with_a_new_sender() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let mut used = async || -> TestResult<u64> {
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut c).await?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    };
    // A sender and a policy budget, and (with the watcher) the paymaster's deposit.
    let sender = |i: u64| format!("sender:0x{:040x}:20833", i);
    let scopes = vec![
        scope(&sender(0), Some(1 << 50), None),
        scope("policy:20833", Some(1 << 50), None),
        scope(
            &session_paymaster::sponsor::deposit::paymaster_scope(
                31337,
                EntryPointVersion::V0_7.canonical_address(),
            ),
            None,
            None,
        ),
    ];
    let n = 10_000u64;
    let session = B256::repeat_byte(0x5e);
    #[derive(Clone, Copy, PartialEq)]
    enum Ops {
        OneSender,
        NewSenders,
        // Sender 0's, under one session with a budget of its own key (a grant of version 1).
        UnderSession,
        // The same, the session's budget shared (version 2: the session load's shape).
        UnderSharedSession,
    }
    let shared = session_budget_scope(&session_grant("p", session, NOW + 7200, true));
    // Ops `from..from + count`, by `ledger`.
    let reserve_many = async |ledger: &Ledger, from: u64, count: u64, ops: Ops| -> TestResult {
        for i in from..from + count {
            let mut scopes = scopes.clone();
            if ops == Ops::NewSenders {
                scopes[0].name = sender(i);
            }
            match ops {
                Ops::UnderSession => {
                    scopes.insert(0, scope(&session_scope_name(session), Some(1 << 50), None));
                }
                Ops::UnderSharedSession => scopes.insert(0, scope(&shared, Some(1 << 50), None)),
                Ops::OneSender | Ops::NewSenders => {}
            }
            let r = Reservation {
                policy: "dev-counter".into(),
                op_key: alloy::primitives::keccak256(i.to_be_bytes()),
                landing_key: alloy::primitives::keccak256((i ^ u64::MAX).to_be_bytes()),
                user_op_hashes: vec![alloy::primitives::keccak256((i ^ 7).to_be_bytes())],
                answer: answer(7, NOW + 600),
                session: match ops {
                    Ops::UnderSession | Ops::UnderSharedSession => session_charge(session, vec![]),
                    Ops::OneSender | Ops::NewSenders => None,
                },
                ..reservation(0, 123_456, scopes)
            };
            assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
        }
        Ok(())
    };
    // The scope counters are shared; what grows is per reservation (and, as the keys grow in
    // number, the keyspace's tables: each batch doubles them once).
    reserve_many(&ledger, 0, 1, Ops::OneSender).await?;
    let before = used().await?;
    reserve_many(&ledger, 1, n, Ops::OneSender).await?;
    let middle = used().await?;
    reserve_many(&ledger, n + 1, n, Ops::NewSenders).await?;
    let after = used().await?;
    // Under a session, its records by id, with its budget shared and not, then by key as 0.3.0
    // wrote them (the session's counter made first: what grows is per reservation). Half or a
    // quarter as many each, so that the keyspace's tables (doubling at 32,768 keys) double in
    // none.
    let (half, quarter) = (n / 2, n / 4);
    reserve_many(&ledger, 2 * n + 1, 1, Ops::UnderSession).await?;
    let by_id_before = used().await?;
    reserve_many(&ledger, 2 * n + 2, half, Ops::UnderSession).await?;
    let by_id_after = used().await?;
    reserve_many(&ledger, 2 * n + half + 2, 1, Ops::UnderSharedSession).await?;
    let shared_before = used().await?;
    reserve_many(&ledger, 2 * n + half + 3, quarter, Ops::UnderSharedSession).await?;
    let shared_after = used().await?;
    let by_key = ledger_as_after_0_3_0(&redis).await?;
    let by_key_before = used().await?;
    reserve_many(&by_key, 3 * n, half, Ops::UnderSession).await?;
    let by_key_after = used().await?;
    let per_op = |from: u64, to: u64, n: u64| (to as i64 - from as i64) / n as i64;
    let (per, per_new) = (per_op(before, middle, n), per_op(middle, after, n));
    let per_session = per_op(by_id_before, by_id_after, half);
    let per_session_by_key = per_op(by_key_before, by_key_after, half);
    let per_shared = per_op(shared_before, shared_after, quarter);
    eprintln!(
        "{per} bytes per reservation, {per_new} with a new sender each, {per_session} under a \
         session ({per_shared} with its budget shared, {per_session_by_key} with 0.3.0's records)"
    );
    assert!(
        per_session_by_key > per_session,
        "0.3.0's records under a session: {per_session_by_key} bytes"
    );
    assert!((1..=400).contains(&per), "{per} bytes per reservation");
    assert!(
        (1..=550).contains(&per_new),
        "{per_new} bytes per reservation of a new sender"
    );
    assert!(
        (1..=400).contains(&per_session),
        "{per_session} bytes per reservation under a session"
    );
    assert!(
        (1..=400).contains(&per_shared),
        "{per_shared} bytes per reservation under a session whose budget is shared"
    );
    Ok(())
}

/// The service packs a new reservation's record itself (reserve.lua stores it as it is); the
/// scripts unpack and repack it when they settle, release or extend it. Both packings must
/// agree byte for byte: a record read back by `lib.lua` and packed again is the record stored.
#[tokio::test]
async fn the_service_packs_records_as_lib_lua_does() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let under_session = Reservation {
        policy: "p".into(),
        session: session_charge(
            B256::repeat_byte(0x5e),
            vec![token_charge(
                Address::repeat_byte(0x70),
                U256::from(10u64).pow(U256::from(30u64)),
                U256::MAX,
            )],
        ),
        // Two hashes: a v0.9 answer (signature inline or in the suffix).
        user_op_hashes: vec![B256::repeat_byte(0xa1), B256::repeat_byte(0xa2)],
        ..reservation(
            9,
            123_456_789,
            vec![
                scope(
                    "sender:0x1111111111111111111111111111111111111111:20833",
                    None,
                    None,
                ),
                scope(
                    "session:0x5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e",
                    None,
                    None,
                ),
                // Not packed: mixed case, and a hex run of another length.
                scope(
                    "x:0xAbCdEf0123456789abcdef0123456789abcdef01:0x12",
                    None,
                    None,
                ),
            ],
        )
    };
    // Without a session (the common shape), names at the edges of what pack_name packs.
    let plain = reservation(
        10,
        1,
        vec![
            scope("a:0x", None, None),
            scope("0x2222222222222222222222222222222222222222", None, None),
            scope(
                "b:0x3333333333333333333333333333333333333333333333333333333333333333x",
                None,
                None,
            ),
            scope(
                "c:0x44444444444444444444444444444444444444440x5555555555555555555555555555555555555555",
                None,
                None,
            ),
        ],
    );
    // A session without token caps, and no scopes.
    let bare_session = Reservation {
        session: session_charge(B256::repeat_byte(0x6e), vec![]),
        ..reservation(11, 2, vec![])
    };
    // A session whose budget is shared (its name in records a sender's form).
    let shared = B256::repeat_byte(0x7e);
    let shared_session = Reservation {
        session: session_charge(shared, vec![]),
        ..reservation(
            13,
            3,
            vec![scope(
                &session_budget_scope(&session_grant("p", shared, NOW + 7200, true)),
                None,
                None,
            )],
        )
    };
    let script = format!(
        "{}\nlocal e = load_nonce(KEYS[1])[1]\nreturn entry(e[1], pack_record(e[2]))",
        include_str!("../../src/ledger/lib.lua")
    );
    let mut c = conn.clone();
    // And under a session by key, as 0.3.0 packed records (and 0.3.1 on a Redis 0.3.0 served).
    let by_key = ledger_as_after_0_3_0(&redis).await?;
    let under_session_by_key = Reservation {
        op_key: B256::repeat_byte(12),
        landing_key: B256::repeat_byte(12 ^ 0x40),
        ..under_session.clone()
    };
    for (ledger, op, r) in [
        (&ledger, 9u8, under_session),
        (&ledger, 10, plain),
        (&ledger, 11, bare_session),
        (&by_key, 12, under_session_by_key),
        (&ledger, 13, shared_session.clone()),
        // (By key too: sharing needs no records by id.)
        (
            &by_key,
            14,
            Reservation {
                op_key: B256::repeat_byte(14),
                landing_key: B256::repeat_byte(14 ^ 0x40),
                user_op_hashes: vec![B256::repeat_byte(14 ^ 0x80)],
                ..shared_session.clone()
            },
        ),
    ] {
        assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
        let key = [b"sp:{p}:n:".as_slice(), &B256::repeat_byte(op ^ 0x40)[..20]].concat();
        let stored: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
        let repacked: Vec<u8> = redis::Script::new(&script)
            .key(&key)
            .invoke_async(&mut c)
            .await?;
        assert!(stored.len() > 100, "op {op}: {} bytes", stored.len());
        assert_eq!(
            names_state_key(&stored, "p"),
            op == 12 || op == 14,
            "op {op}: by key only through the ledger writing by key"
        );
        assert_eq!(hex::encode(&repacked), hex::encode(&stored), "op {op}");
    }
    // Both records of the shared session close in its field: the one by key settled, the one
    // by id released.
    let name = &shared_session.scopes[0].name;
    assert_eq!(ledger.usage("p", name).await?, (6, 2));
    assert_eq!(
        by_key
            .settle(&["p".to_owned()], &landing(14, 1))
            .await?
            .settled,
        1
    );
    assert_eq!(ledger.usage("p", name).await?, (4, 2));
    assert_eq!(
        ledger.release_expired(&["p".to_owned()], NOW + 601).await?,
        5
    );
    assert_eq!(ledger.usage("p", name).await?, (1, 1));
    Ok(())
}

/// 0.3.0's record of a reservation under a session (`git show 38d8e07:src/ledger/lib.lua`,
/// `entry(id, pack_record(r))` of `under(2, NOW + 600)`'s record below, its session `0x5e…`):
/// the state key and the budget's name in full.
const SESSION_RECORD_OF_0_3_0: &str = "14020202020202020202020202020202020202020200de00000000000000001e00006b49d458000002940202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202018282828282828282022973657373696f6e3a025e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e03706f6c013073703a7b707d3a73657373696f6e3a025e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e011b7370656e743a017070707070707070707070707070707070707070023430";

/// A ledger on `redis` opened as on a Redis 0.3.0 served (it published a policy set) and no
/// operator said yet that no 0.3.0 replica runs: its records under a session are 0.3.0's.
async fn ledger_as_after_0_3_0(redis: &TestRedis) -> TestResult<Ledger> {
    let conn = ledger_conn(redis).await?;
    let mut c = conn.clone();
    redis::cmd("SET")
        .arg(session_paymaster::policy::publish::CURRENT)
        .arg("0x00")
        .query_async::<()>(&mut c)
        .await?;
    redis::cmd("DEL")
        .arg(SESSION_RECORDS_BY_ID_KEY)
        .query_async::<()>(&mut c)
        .await?;
    Ok(Ledger::Redis(RedisLedger::connect(conn).await?))
}

/// Under a session, a record names the session by its state key and its budget in full as
/// 0.3.0 did, byte for byte, on a Redis 0.3.0 served; by its id and one byte (56 bytes fewer,
/// and the policy's name) once the operator sets SESSION_RECORDS_BY_ID_KEY, or on a Redis no
/// earlier version served. Each is repeated, extended, released, settled and charged back
/// where it was counted: its budget and its token totals.
#[tokio::test]
async fn a_session_record_by_key_as_0_3_0_wrote_it_or_by_id_closes_where_it_was_counted()
-> TestResult {
    let redis = TestRedis::start().await?;
    let conn = ledger_conn(&redis).await?;
    let mut c = conn.clone();
    let by_key = ledger_as_after_0_3_0(&redis).await?;
    redis::cmd("SET")
        .arg(SESSION_RECORDS_BY_ID_KEY)
        .arg(NOW)
        .query_async::<()>(&mut c)
        .await?;
    let by_id = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let token = Address::repeat_byte(0x70);
    let policies = vec!["p".to_owned()];
    // Session `id`'s ops `first` (released, then landing after all) and `first + 1` (settled).
    for (ledger, id, first) in [(&by_key, 0x5e, 1u8), (&by_id, 0x6e, 3)] {
        let id = B256::repeat_byte(id);
        let budget = session_scope_name(id);
        let under = |op: u8, valid_until: u64| Reservation {
            session: session_charge(
                id,
                vec![token_charge(token, U256::from(40u64), U256::from(1000u64))],
            ),
            answer: answer(op, valid_until),
            ..reservation(
                op,
                30,
                vec![scope(&budget, Some(1000), None), scope("pol", None, None)],
            )
        };
        let (released, settles) = (under(first, NOW + 10), under(first + 1, NOW + 600));
        for r in [&released, &settles] {
            assert_eq!(ledger.reserve(r, false, NOW).await?, Outcome::Reserved);
        }
        let record: Vec<u8> = redis::cmd("GET")
            .arg(nonce_of(first + 1))
            .query_async(&mut c)
            .await?;
        if first == 1 {
            assert_eq!(hex::encode(&record), SESSION_RECORD_OF_0_3_0);
        } else {
            assert_eq!(
                record.len(),
                SESSION_RECORD_OF_0_3_0.len() / 2 - 56 - "p".len()
            );
            assert!(
                !record.windows(8).any(|w| w == b"session:"),
                "by id: neither the state key nor the budget named"
            );
        }
        let counted = async |cost: u64, ops: u64, spent: u64| -> TestResult {
            assert_eq!(ledger.usage("p", &budget).await?, (cost, ops));
            assert_eq!(
                ledger.session_spent("p", id).await?,
                BTreeMap::from([(token, U256::from(spent))])
            );
            Ok(())
        };
        counted(60, 2, 80).await?;
        assert_eq!(
            ledger.reserve(&settles, false, NOW).await?,
            Outcome::Existing(answer(first + 1, NOW + 600)),
            "repeated"
        );
        // Asked again when its answer is about to expire: extended to a fresh one, in its
        // session and scopes, charged nothing more.
        let fresh = Reservation {
            answer: answer(first + 1, NOW + 900),
            ..settles.clone()
        };
        assert_eq!(
            ledger.reserve(&fresh, false, NOW + 580).await?,
            Outcome::Reserved
        );
        counted(60, 2, 80).await?;
        assert_eq!(ledger.release_expired(&policies, NOW + 11).await?, 1);
        counted(30, 1, 40).await?;
        assert_eq!(
            ledger.settle(&policies, &landing(first + 1, 7)).await?,
            settled(1, 0, true)
        );
        counted(7, 1, 40).await?;
        assert_eq!(
            ledger
                .settle(&policies, &landing(first, 9))
                .await?
                .charged_back,
            1,
            "the released one landed after all"
        );
        counted(16, 2, 80).await?;
    }
    // Both sessions' operations in the policy's budget.
    assert_eq!(by_id.usage("p", "pol").await?, (32, 4));
    // As replicas switch once the key is set (or back): a record by key extended by a replica
    // writing by id becomes one by id, and the other way round, charged once.
    let id = B256::repeat_byte(0x7e);
    let budget = session_scope_name(id);
    for (first, then, op) in [(&by_key, &by_id, 5u8), (&by_id, &by_key, 6)] {
        let r = Reservation {
            session: session_charge(id, vec![]),
            ..reservation(op, 30, vec![scope(&budget, Some(1000), None)])
        };
        assert_eq!(first.reserve(&r, false, NOW).await?, Outcome::Reserved);
        let fresh = Reservation {
            answer: answer(op, NOW + 900),
            ..r.clone()
        };
        assert_eq!(
            then.reserve(&fresh, false, NOW + 580).await?,
            Outcome::Reserved
        );
        let record: Vec<u8> = redis::cmd("GET")
            .arg(nonce_of(op))
            .query_async(&mut c)
            .await?;
        assert_eq!(
            names_state_key(&record, "p"),
            op == 6,
            "op {op}: the kind of the replica that extended it"
        );
    }
    assert_eq!(
        by_id.usage("p", &budget).await?,
        (60, 2),
        "each charged once"
    );
    Ok(())
}

/// A record whose session byte this version does not know (a later format) is an error, not a
/// record without a session: read so, its session would be given back nothing, or charged
/// nothing. The settlement fails and leaves the counters as they were.
#[tokio::test]
async fn a_record_of_an_unknown_session_kind_is_refused() -> TestResult {
    let redis = TestRedis::start().await?;
    let (ledger, conn) = redis_ledger(&redis).await?;
    let mut c = conn.clone();
    let r = reservation(1, 30, vec![scope("pol", None, None)]);
    assert_eq!(ledger.reserve(&r, false, NOW).await?, Outcome::Reserved);
    let mut record: Vec<u8> = redis::cmd("GET")
        .arg(nonce_of(1))
        .query_async(&mut c)
        .await?;
    // Without a session, its last byte is the session's: 0.
    assert_eq!(record.last(), Some(&0));
    if let Some(last) = record.last_mut() {
        *last = 7;
    }
    redis::cmd("SET")
        .arg(nonce_of(1))
        .arg(&record)
        .arg("KEEPTTL")
        .query_async::<()>(&mut c)
        .await?;
    let policies = vec!["p".to_owned()];
    let refused = ledger.settle(&policies, &landing(1, 7)).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("ledger record with session byte 7")),
        "{refused:?}"
    );
    assert_eq!(
        ledger.usage("p", "pol").await?,
        (30, 1),
        "counted as it was"
    );
    Ok(())
}

/// A library of a ledger that cannot read records by id (0.3.0's, which a replica of it loads
/// when it starts and again when it finds it gone) keeps records by key, whatever the key says:
/// such a replica may run.
#[tokio::test]
async fn records_by_id_wait_until_no_earlier_ledger_library_is_loaded() -> TestResult {
    let redis = TestRedis::start().await?;
    let conn = ledger_conn(&redis).await?;
    let mut c = conn.clone();
    load_earlier_library(&mut c).await?;
    let id = B256::repeat_byte(0x5e);
    // A Redis no replica used: the key is set, but the library is there.
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let exists: bool = redis::cmd("EXISTS")
        .arg(SESSION_RECORDS_BY_ID_KEY)
        .query_async(&mut c)
        .await?;
    assert!(exists);
    let record = session_record(&ledger, &conn, "p", id, 1).await?;
    assert!(names_state_key(&record, "p"));
    delete_earlier_library(&mut c).await?;
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let by_id = session_record(&ledger, &conn, "p", id, 2).await?;
    assert!(!names_state_key(&by_id, "p"));
    assert_eq!(by_id.len() + 56 + "p".len(), record.len());
    // A 0.3.0 replica started later loads its library again: the next check (the service's,
    // every `--policy-poll`) turns records by id off.
    load_earlier_library(&mut c).await?;
    ledger.refresh_record_kind().await;
    assert!(names_state_key(
        &session_record(&ledger, &conn, "p", id, 3).await?,
        "p"
    ));
    Ok(())
}

/// New grants share their budget only while no ledger library of a replica that would refuse
/// them is loaded: 0.3.10's reads records by id but lacks the shared-budget mark, and holds
/// sharing off (`sessions_share_budgets`, which the admin API reads to make a grant of version
/// 1 or 2; records still by id) until it is deleted; loaded again (its replica started later),
/// the next poll turns sharing off.
#[tokio::test]
async fn shared_budgets_wait_until_no_library_without_their_mark_is_loaded() -> TestResult {
    let redis = TestRedis::start().await?;
    let conn = ledger_conn(&redis).await?;
    let mut c = conn.clone();
    let library = "sp_ledger_000000031000";
    let load = async |c: &mut session_paymaster::session::redis::RedisConn| {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(format!(
                "#!lua name={library}\n-- records-by-id: this ledger reads records under a session by id\nredis.register_function('sp_reserve_000000031000', function() return 0 end)"
            ))
            .query_async::<String>(c)
            .await
    };
    load(&mut c).await?;
    let ledger = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    assert!(!ledger.sessions_share_budgets());
    let by_id = session_record(&ledger, &conn, "p", B256::repeat_byte(0x5e), 1).await?;
    assert!(!names_state_key(&by_id, "p"), "records by id all the same");
    redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(library)
        .query_async::<()>(&mut c)
        .await?;
    ledger.refresh_record_kind().await;
    assert!(ledger.sessions_share_budgets());
    load(&mut c).await?;
    ledger.refresh_record_kind().await;
    assert!(!ledger.sessions_share_budgets());
    Ok(())
}

/// Every replica's watcher settles the policies any replica served, and a policy leaves that
/// set only once no replica noted serving it for a day and none of its reservations is open;
/// the embedded default watches every policy it reserved under.
#[tokio::test]
async fn watchers_watch_every_policy_served_until_it_retires() -> TestResult {
    use session_paymaster::ledger::redis::{RETIRED_AFTER_SECS, SERVED_POLICIES_KEY};
    use std::collections::BTreeSet;

    let redis = TestRedis::start().await?;
    let (ledger, mut conn) = redis_ledger(&redis).await?;
    let old = NOW - RETIRED_AFTER_SECS - 1;
    let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let set = |v: Vec<String>| v.into_iter().collect::<BTreeSet<_>>();
    ledger
        .serve_policies(&names(&["gone", "open", "mine"]), 600, old)
        .await?;
    ledger
        .serve_policies(&names(&["recent"]), 86_400, NOW - 60)
        .await?;
    // A replica whose clock is behind does not make one look served longer ago, nor one of
    // shorter validity the longest noted shorter.
    ledger.serve_policies(&names(&["recent"]), 60, old).await?;
    assert_eq!(ledger.longest_validity_noted().await?, 86_400);
    let open = Reservation {
        policy: "open".into(),
        answer: answer(0x31, NOW + 10),
        expires_at: NOW + 10 + GRACE_SECS,
        ..reservation(0x31, 5, vec![scope("all", None, None)])
    };
    assert_eq!(ledger.reserve(&open, false, NOW).await?, Outcome::Reserved);
    assert_eq!(
        ledger.retire_policies(&names(&["mine"]), NOW).await?,
        names(&["gone"]),
        "`open` still has a reservation open; `recent` was served lately; `mine` is served here"
    );
    assert_eq!(
        set(ledger.watched_policies(&names(&["p"])).await?),
        set(names(&["p", "open", "recent", "mine"]))
    );
    let served: Vec<String> =
        redis::AsyncCommands::zrange(&mut conn, SERVED_POLICIES_KEY, 0, -1).await?;
    assert_eq!(set(served), set(names(&["open", "recent", "mine"])));
    assert_eq!(
        ledger.release_expired(&names(&["open"]), NOW + 11).await?,
        1
    );
    assert_eq!(
        ledger.retire_policies(&names(&["mine"]), NOW).await?,
        names(&["open"])
    );
    // A replica that serves a policy again keeps it, however long it was away.
    ledger.serve_policies(&names(&["gone"]), 600, NOW).await?;
    assert!(
        ledger
            .retire_policies(&names(&["mine"]), NOW + 1)
            .await?
            .is_empty()
    );
    assert_eq!(
        set(ledger.watched_policies(&names(&["p"])).await?),
        set(names(&["p", "recent", "mine", "gone"]))
    );

    let memory = Ledger::Memory(MemoryLedger::new());
    assert_eq!(memory.reserve(&open, false, NOW).await?, Outcome::Reserved);
    assert_eq!(
        memory.watched_policies(&names(&["p"])).await?,
        names(&["p", "open"])
    );
    Ok(())
}

/// Every replica's watcher of a chain reads the events of every (EntryPoint, paymaster) pair
/// any replica noted signing for on that chain, until a final block it read is later than
/// every signature the pair's replicas said they may make.
#[tokio::test]
async fn watchers_read_every_paymaster_noted_until_its_signatures_expire() -> TestResult {
    use session_paymaster::ledger::redis::SERVED_PAYMASTERS_PREFIX;
    use std::collections::BTreeSet;

    let redis = TestRedis::start().await?;
    let (ledger, mut conn) = redis_ledger(&redis).await?;
    let pair = |n: u8| (Address::repeat_byte(n), Address::repeat_byte(n + 0x10));
    let set = |v: Vec<(Address, Address)>| v.into_iter().collect::<BTreeSet<_>>();
    ledger
        .serve_paymasters(1, &[pair(1), pair(2)], NOW + 100)
        .await?;
    ledger.serve_paymasters(1, &[pair(3)], NOW + 1000).await?;
    // A replica whose clock is behind, or whose policies grant less, does not shorten it.
    ledger.serve_paymasters(1, &[pair(3)], NOW + 10).await?;
    ledger.serve_paymasters(2, &[pair(4)], NOW).await?;
    assert_eq!(
        set(ledger.watched_paymasters(1, &[pair(5)]).await?),
        set(vec![pair(1), pair(2), pair(3), pair(5)]),
        "this replica's, and every pair noted on this chain (not chain 2's)"
    );
    assert_eq!(
        ledger.forget_paymasters(1, NOW + 100).await?,
        0,
        "a signature may land in a block of the time it ends"
    );
    assert_eq!(ledger.forget_paymasters(1, NOW + 101).await?, 2);
    assert_eq!(
        set(ledger.watched_paymasters(1, &[pair(5)]).await?),
        set(vec![pair(3), pair(5)])
    );
    // A member that is no pair fails the read (its pair would go unread), never skipped.
    let _: i64 = redis::AsyncCommands::zadd(
        &mut conn,
        format!("{SERVED_PAYMASTERS_PREFIX}1"),
        "0x12:nope",
        NOW,
    )
    .await?;
    let err = ledger
        .watched_paymasters(1, &[])
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("0x12:nope")),
        "{err:?}"
    );

    let memory = Ledger::Memory(MemoryLedger::new());
    memory.serve_paymasters(1, &[pair(1)], NOW).await?;
    assert_eq!(
        memory.watched_paymasters(1, &[pair(5)]).await?,
        vec![pair(5)],
        "one process's pairs are its watcher's own"
    );
    Ok(())
}

/// `CONFIG SET maxmemory <max> maxmemory-policy <policy>` on `conn`.
async fn config_memory(
    conn: &mut impl redis::aio::ConnectionLike,
    max: &str,
    policy: &str,
) -> TestResult {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(max)
        .arg("maxmemory-policy")
        .arg(policy)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// `CONFIG SET maxmemory 100mb maxmemory-policy <policy>` on `conn`.
async fn evicting(conn: &mut impl redis::aio::ConnectionLike, policy: &str) -> TestResult {
    config_memory(conn, "100mb", policy).await
}

/// A Redis that evicts keys when full (`maxmemory` set, a policy other than `noeviction`) would
/// drop budget counters, reservations and revocations, which all have TTLs, under memory
/// pressure: costs forgotten. The service refuses to start on one.
#[tokio::test]
async fn a_redis_that_evicts_keys_is_refused() -> TestResult {
    use session_paymaster::ledger::redis::RedisLedger;
    use session_paymaster::session::redis::connect;

    let redis = TestRedis::start().await?;
    let ledger =
        || async { RedisLedger::connect(connect(&redis.url, Duration::from_secs(2)).await?).await };
    let mut conn = connect(&redis.url, Duration::from_secs(2)).await?;
    evicting(&mut conn, "volatile-lru").await?;
    match ledger().await {
        Err(e) => assert!(e.to_string().contains("volatile-lru"), "{e}"),
        Ok(_) => panic!("a Redis that evicts keys was taken"),
    }
    // The commands that only read or publish (`status`, `policies push`) still connect.
    connect(&redis.url, Duration::from_secs(2)).await?;
    evicting(&mut conn, "noeviction").await?;
    assert!(ledger().await.is_ok(), "noeviction is taken");
    // On a Cluster every node is read: one of three set to evict is enough to refuse it.
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    let ledger = || async {
        RedisLedger::connect(connect(&cluster.url, Duration::from_secs(2)).await?).await
    };
    assert!(ledger().await.is_ok());
    let last = cluster.url.rsplit(',').next().ok_or("a node")?;
    let mut node = redis::Client::open(last)?
        .get_multiplexed_async_connection()
        .await?;
    evicting(&mut node, "allkeys-lru").await?;
    match ledger().await {
        Err(e) => assert!(e.to_string().contains("allkeys-lru"), "{e}"),
        Ok(_) => panic!("a Cluster with a node that evicts keys was taken"),
    }
    Ok(())
}

/// A check that cannot read a node (here `INFO` refused to the service's user) changes
/// nothing: refused reservations stay refused however the policy changes meanwhile, and are
/// taken again only once a check reads every node without a finding.
#[tokio::test]
async fn an_unread_eviction_check_leaves_the_last_finding() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    let ledger = apps[0].state.sponsor.ledger();
    let mut conn = redis.conn().await?;
    let acl = |rule: &'static str| {
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg(rule)
            .clone()
    };
    evicting(&mut conn, "allkeys-lru").await?;
    ledger.refresh_eviction().await;
    assert!(ledger.refusing_for_eviction());
    let _: () = acl("-info").query_async(&mut conn).await?;
    evicting(&mut conn, "noeviction").await?;
    ledger.refresh_eviction().await;
    assert!(ledger.refusing_for_eviction(), "unread: still refused");
    let _: () = acl("+info").query_async(&mut conn).await?;
    ledger.refresh_eviction().await;
    assert!(
        !ledger.refusing_for_eviction(),
        "read, nothing found: taken again"
    );
    // And the other way: taken while unread, whatever the policy became.
    let _: () = acl("-info").query_async(&mut conn).await?;
    evicting(&mut conn, "allkeys-lru").await?;
    ledger.refresh_eviction().await;
    assert!(
        !ledger.refusing_for_eviction(),
        "unread: the last finding stands"
    );
    let _: () = acl("+info").query_async(&mut conn).await?;
    ledger.refresh_eviction().await;
    assert!(ledger.refusing_for_eviction());
    Ok(())
}

/// A Redis set to evict keys after the service started (`CONFIG SET`, or a node that did not
/// answer at start) would drop counters and records under memory pressure: from the next check
/// every reservation is refused (replicas stay ready: `/readyz` and a gauge say why). Keys it
/// evicted meanwhile keep them refused after the policy is set back, and after a restart,
/// until the operator acknowledges exactly them.
#[tokio::test]
async fn a_redis_that_starts_evicting_keys_refuses_reservations_until_it_stops() -> TestResult {
    // (With its append-only file: what was seen evicted outlives a restart.)
    let mut redis = TestRedis::start_persistent().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    let app = &apps[0];
    // The task `serve` runs every --policy-poll.
    let watcher = app.state.spawn_ledger_watcher(Duration::from_millis(100));
    let ep = EntryPointVersion::V0_7.canonical_address();
    let readyz = || async {
        let r = reqwest::get(format!("{}/readyz", app.url)).await?;
        Ok::<_, reqwest::Error>((r.status().as_u16(), r.json::<Value>().await?))
    };
    // Until `redis` reads `want` (at most 5 s of checks).
    let until = |want: &'static str| async move {
        for _ in 0..50 {
            let (status, body) = readyz().await?;
            if body["redis"] == want {
                assert_eq!((status, &body["ready"]), (200, &json!(true)), "{body}");
                return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("/readyz never said redis: {want}").into())
    };
    let metrics = || async {
        reqwest::get(format!("{}/metrics", app.url))
            .await?
            .text()
            .await
    };
    let refused = || async {
        for method in ["pm_sponsorUserOperation", "pm_getPaymasterStubData"] {
            let params = if method == "pm_sponsorUserOperation" {
                json!([op_json(1), ep])
            } else {
                json!([op_json(1), ep, "0x7a69", {}])
            };
            let e = app.error(method, params).await?;
            assert_eq!(e["code"], -32004, "{method}: {e}");
            assert_eq!(e["data"]["reason"], "store_unavailable", "{method}: {e}");
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    until("ok").await?;
    app.result("pm_sponsorUserOperation", json!([op_json(0), ep]))
        .await?;
    let mut conn = redis.conn().await?;
    evicting(&mut conn, "volatile-ttl").await?;
    until("evicts keys").await?;
    refused().await?;
    let text = metrics().await?;
    assert!(text.contains("sp_ledger_refusing_eviction 1"), "{text}");
    // Nothing was counted meanwhile: one operation of K.
    assert!(
        text.contains(&format!(
            "sp_budget_remaining{{policy=\"budgeted\",chain=\"31337\",resource=\"ops\"}} {}",
            K - 1
        )),
        "{text}"
    );
    // Full, it evicts (the ledger's keys among others); set back, the evictions still count.
    config_memory(&mut conn, "1", "allkeys-random").await?;
    let _: Result<(), _> = redis::cmd("SET")
        .arg("filler")
        .arg("x")
        .query_async(&mut conn)
        .await;
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await?;
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("evicted_keys:") && l != "evicted_keys:0"),
        "{stats}"
    );
    config_memory(&mut conn, "0", "noeviction").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    until("evicts keys").await?;
    refused().await?;
    // Restarted, the node is a new run that evicted nothing: what the last run evicted still
    // counts, until the operator, having checked the ledger, acknowledges exactly that.
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let run = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .map(str::to_owned)
        .ok_or(format!("no run_id in {info}"))?;
    redis.restart().await?;
    let mut conn = redis.conn().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    until("evicts keys").await?;
    refused().await?;
    let seen: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(session_paymaster::session::redis::EVICTIONS_SEEN_KEY)
        .query_async(&mut conn)
        .await?;
    let evicted = *seen.get(&run).ok_or(format!("{run} not in {seen:?}"))?;
    assert!(evicted > 0, "{seen:?}");
    let acknowledge = |n: u64| {
        redis::cmd("HSET")
            .arg(session_paymaster::session::redis::EVICTIONS_ACKNOWLEDGED_KEY)
            .arg(&run)
            .arg(n)
            .clone()
    };
    // More than were seen would let that many more go unseen: refused too.
    let _: () = acknowledge(evicted + 10).query_async(&mut conn).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    until("evicts keys").await?;
    let _: () = acknowledge(evicted).query_async(&mut conn).await?;
    until("ok").await?;
    assert!(metrics().await?.contains("sp_ledger_refusing_eviction 0"));
    app.result("pm_sponsorUserOperation", json!([op_json(1), ep]))
        .await?;
    watcher.abort();
    Ok(())
}

/// A Redis failover loses the writes its replicas had not received: a reservation (its cost
/// forgotten once its operation lands unmatched) or a revocation (the session usable again).
/// With `--redis-wait-replicas`, nothing is signed or answered revoked before the replicas
/// acknowledge it: a replica that stalls fails the call closed (`Unavailable`), the write
/// standing on the primary, counted; a retry once it is back gets the reservation's answer.
#[tokio::test]
async fn reservations_and_revocations_wait_for_the_replicas_asked_for() -> TestResult {
    use session_paymaster::ledger::redis::ReplicaWait;
    use session_paymaster::session::StoreError;

    let primary = TestRedis::start().await?;
    let replica = TestRedis::start_replica_of(&primary).await?;
    let conn =
        session_paymaster::session::redis::connect(&primary.url, Duration::from_secs(10)).await?;
    // A replica that answers is given seconds (the machine may be busy); one that stalls, a
    // fifth of one.
    let url = primary.url.as_str();
    let waiting = |timeout: Duration| {
        let conn = conn.clone();
        async move {
            let wait = ReplicaWait {
                replicas: 1,
                timeout,
            };
            let ledger = RedisLedger::connect(conn.clone()).await?;
            // (The waits on a connection of their own, as the service keeps them.)
            let waited =
                session_paymaster::session::redis::connect(url, Duration::from_secs(10)).await?;
            TestResult::Ok(Ledger::Redis(ledger.with_replica_wait(wait, waited)))
        }
    };
    let patient = waiting(Duration::from_secs(5)).await?;
    let hasty = waiting(Duration::from_millis(200)).await?;
    // Another service replica's ledger, on connections of its own.
    let other = waiting(Duration::from_millis(200)).await?;
    let not_waiting = Ledger::Redis(RedisLedger::connect(conn.clone()).await?);
    let mut on_replica = replica.conn().await?;
    let scopes = || vec![pm(4200)];

    // Acknowledged: the replica holds the record when the answer comes.
    assert_eq!(
        patient
            .reserve(&reservation(1, 10, scopes()), false, NOW)
            .await?,
        Outcome::Reserved
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sp:{p}:n:*")
        .query_async(&mut on_replica)
        .await?;
    assert_eq!(keys.len(), 1, "on the replica: {keys:?}");

    // A replica that stalls (having acknowledged everything written before): the call fails
    // closed, its reservation counted on the primary.
    replica.caught_up(&primary).await?;
    replica.pause()?;
    let stalled = hasty
        .reserve(&reservation(2, 10, scopes()), false, NOW)
        .await;
    // Its retry through another service replica finds the reservation made, and writes
    // nothing of its own: its wait still covers that reservation (found by review: a wait
    // covers its own connection's writes only, and that one had made none). (On Redis 7.0.15,
    // which this machine runs, a connection that wrote nothing waits too, so this step passes
    // without the marker write as well: it guards the behaviour, the marker is for Redis whose
    // `WAIT` answers such a connection at once.)
    let retried = other
        .reserve(&reservation(2, 10, scopes()), false, NOW)
        .await;
    // A check writes nothing, and waits for no replica.
    let checked = hasty
        .reserve(&reservation(4, 10, scopes()), true, NOW)
        .await;
    let unanswered = not_waiting
        .reserve(&reservation(3, 10, scopes()), false, NOW)
        .await;
    let session = B256::repeat_byte(0x5e);
    let revoked = hasty
        .revoke_session(&session_grant("p", session, NOW + 7200, false), NOW)
        .await;
    let shared = session_grant("p", B256::repeat_byte(0x5d), NOW + 7200, true);
    let revoked_shared = hasty.revoke_session(&shared, NOW).await;
    replica.resume()?;
    assert!(
        matches!(&stalled, Err(StoreError::Unavailable(m)) if m.contains("0 of the 1 Redis replicas")),
        "signed before a replica held it: {stalled:?}"
    );
    assert!(
        matches!(&retried, Err(StoreError::Unavailable(m)) if m.contains("0 of the 1 Redis replicas")),
        "its answer handed out by another replica before a replica held it: {retried:?}"
    );
    assert_eq!(checked?, Outcome::Reserved, "checked, without waiting");
    assert_eq!(waiting_usage(&patient).await?, (30, 3), "counted over");
    // Without the wait it is answered.
    assert_eq!(unanswered?, Outcome::Reserved);
    assert!(
        matches!(&revoked, Err(StoreError::Unavailable(m)) if m.contains("replicas")),
        "{revoked:?}"
    );
    assert!(
        matches!(&revoked_shared, Err(StoreError::Unavailable(m)) if m.contains("replicas")),
        "{revoked_shared:?}"
    );

    // Back: the retry gets the reservation's answer, and the revocation stands.
    replica.caught_up(&primary).await?;
    assert_eq!(
        patient
            .reserve(&reservation(2, 10, scopes()), false, NOW)
            .await?,
        Outcome::Existing(answer(2, NOW + 600))
    );
    patient
        .revoke_session(&session_grant("p", session, NOW + 7200, false), NOW)
        .await?;
    let status: Option<String> = redis::cmd("HGET")
        .arg(format!("sp:{{p}}:session:{session}"))
        .arg("status")
        .query_async(&mut on_replica)
        .await?;
    assert_eq!(status.as_deref(), Some("revoked"));
    // A session whose budget is shared: refused above while the replica stalled, and its
    // status in the day's hash is on the replica once the revocation answers (written by the
    // script the wait confirms).
    patient.revoke_session(&shared, NOW).await?;
    let status: Option<String> = redis::cmd("HGET")
        .arg(format!("sp:{{p}}:budget:sender:d{}", (NOW + 7200) / 86_400))
        .arg([field_of(shared.session_id), b"r".to_vec()].concat())
        .query_async(&mut on_replica)
        .await?;
    assert_eq!(status.as_deref(), Some("revoked"));

    // Through the service: `-32004`, then the answer.
    let dir = crate::e2e::budgeted_policies()?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(primary.url.clone());
    // (Below the service's Redis timeout, 500 ms here.)
    c.redis_wait = Some(ReplicaWait {
        replicas: 1,
        timeout: Duration::from_millis(300),
    });
    let app = crate::helpers::TestApp::spawn(c).await?;
    let op = crate::helpers::counter_op(Address::repeat_byte(0x11), 0, "increment()");
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
        "params": [op.to_json(), EntryPointVersion::V0_7.canonical_address(), {}]
    })
    .to_string();
    replica.pause()?;
    let (_, stalled) = app.post(&body).await?;
    replica.resume()?;
    assert_eq!(stalled["error"]["code"], json!(-32004), "{stalled}");
    replica.caught_up(&primary).await?;
    let (_, v) = app.post(&body).await?;
    assert!(v["result"]["paymasterData"].is_string(), "{v}");
    Ok(())
}

/// Policy `p`'s `pm` counter.
async fn waiting_usage(ledger: &Ledger) -> TestResult<(u64, u64)> {
    Ok(ledger.usage("p", "pm").await?)
}

/// A wait for replicas first confirms that the primary it reaches holds what the call wrote
/// (`src/ledger/confirm.lua`): after a failover between the call and its wait, the wait may
/// reach a promoted replica that never had the write, whose replicas would acknowledge the
/// marker alone, and a lost reservation would be signed (found by review). It looks for the
/// signature the answer gives, unique to it: an extended or replaced record keeps its
/// operation's id, so the id would find the record as it was before (found by review).
/// Missing, the script fails and writes nothing; found, it writes the marker the wait covers.
#[tokio::test]
async fn a_wait_confirms_the_write_is_on_the_primary_it_reaches() -> TestResult {
    const CONFIRM: &str = include_str!("../../src/ledger/confirm.lua");
    let redis = TestRedis::start().await?;
    let mut c = redis.conn().await?;
    let (marker, nonce, state) = ("sp:{p}:replicated", "sp:{p}:n:x", "sp:{p}:session:0x5e");
    let (id, signature) = ([7u8; 20], [0x51u8; 65]);
    let confirm = |key: &'static str, want: Vec<u8>| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(CONFIRM).arg(2).arg(marker).arg(key).arg(want);
        cmd
    };
    let record = |signature: &[u8]| [&[20u8][..], &id, b"head", signature, b"tail"].concat();
    let missing: redis::RedisResult<i64> =
        confirm(nonce, signature.to_vec()).query_async(&mut c).await;
    assert!(
        missing
            .as_ref()
            .is_err_and(|e| e.to_string().contains("not on this primary")),
        "{missing:?}"
    );
    // The operation's record as it was before this answer (another signature).
    let before = record(&[0x52u8; 65]);
    let _: () = redis::cmd("SET")
        .arg(nonce)
        .arg(&before)
        .query_async(&mut c)
        .await?;
    let earlier: redis::RedisResult<i64> =
        confirm(nonce, signature.to_vec()).query_async(&mut c).await;
    assert!(
        earlier.is_err(),
        "the record before the answer: {earlier:?}"
    );
    let exists: bool = redis::cmd("EXISTS").arg(marker).query_async(&mut c).await?;
    assert!(!exists, "nothing written");
    let _: () = redis::cmd("SET")
        .arg(nonce)
        .arg(record(&signature))
        .query_async(&mut c)
        .await?;
    let found: i64 = confirm(nonce, signature.to_vec())
        .query_async(&mut c)
        .await?;
    assert_eq!(found, 1);
    let exists: bool = redis::cmd("EXISTS").arg(marker).query_async(&mut c).await?;
    assert!(exists, "the marker the wait covers");
    // A revocation: the session state's status.
    let unrevoked: redis::RedisResult<i64> = confirm(state, b"revoked".to_vec())
        .query_async(&mut c)
        .await;
    assert!(unrevoked.is_err(), "{unrevoked:?}");
    let _: () = redis::cmd("HSET")
        .arg(state)
        .arg("status")
        .arg("revoked")
        .query_async(&mut c)
        .await?;
    let revoked: i64 = confirm(state, b"revoked".to_vec())
        .query_async(&mut c)
        .await?;
    assert_eq!(revoked, 1);
    Ok(())
}
