//! Session grants end to end: the admin API, sponsorship under a session (narrowing, proof,
//! revocation), the same store tests against memory and a real Redis, revocation seen by a
//! second instance sharing Redis, and failing closed when Redis is gone.

use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::SolCall;
use serde_json::{Value, json};
use session_paymaster::session::grant::{SessionGrant, SessionStatus, proof_digest};
use session_paymaster::session::memory::MemorySessions;
use session_paymaster::session::redis::RedisSessions;
use session_paymaster::session::{GrantSource, ListCursor, SessionStore, StoreError};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::{EntryPointVersion, UserOperation};

use crate::helpers::{ADMIN_TOKEN, TestApp, TestRedis, TestResult, config, counter_op};

sol! {
    function execute(address dest, uint256 value, bytes func);
}

const COUNTER: Address = Address::new(alloy::primitives::hex!(
    "CF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3"
));
const PM07: Address = Address::repeat_byte(0x07);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn app(redis: Option<&TestRedis>) -> TestResult<TestApp> {
    let mut c = config([Some(PM07), None, None], KeySource::Ephemeral);
    c.redis_url = redis.map(|r| r.url.clone());
    TestApp::spawn(c).await
}

/// `DELETE /admin/sessions/{session}` with the admin token: (status, body).
pub(crate) async fn revoke(app: &TestApp, session: B256) -> TestResult<(u16, Value)> {
    admin(
        app,
        "DELETE",
        &format!("/admin/sessions/{session}"),
        None,
        Some(ADMIN_TOKEN),
    )
    .await
}

/// The revocation feed's entries as Redis holds them: (id, [(field, value)]).
pub(crate) async fn feed_entries(
    conn: &mut redis::aio::MultiplexedConnection,
) -> TestResult<Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>> {
    Ok(redis::cmd("XRANGE")
        .arg(session_paymaster::session::redis::REVOCATIONS_KEY)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?)
}

/// An admin request; returns status and JSON body (Null when empty).
pub(crate) async fn admin(
    app: &TestApp,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> TestResult<(u16, Value)> {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", app.url);
    let mut req = match method {
        "POST" => client.post(&url),
        "DELETE" => client.delete(&url),
        _ => client.get(&url),
    };
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        },
    ))
}

pub(crate) fn grant_request(account: Address, key: Address, policy: &str) -> Value {
    json!({
        "account": account,
        "sessionKey": key,
        "chainId": 31337,
        "policy": policy,
        "validAfter": now() - 10,
        "validUntil": now() + 3600,
        "budget": { "cost": "0.01 ether", "ops": 10 }
    })
}

/// `POST /admin/sessions` of `body` with the operator's token: the status and the answer.
async fn post_session(app: &TestApp, body: Value) -> TestResult<(u16, Value)> {
    admin(
        app,
        "POST",
        "/admin/sessions",
        Some(body),
        Some(ADMIN_TOKEN),
    )
    .await
}

pub(crate) async fn create_session(app: &TestApp, body: Value) -> TestResult<B256> {
    let (status, v) = post_session(app, body).await?;
    assert_eq!(status, 201, "{v}");
    Ok(v["sessionId"].as_str().ok_or("sessionId")?.parse()?)
}

fn op(sender: Address, func: &str) -> UserOperation {
    counter_op(sender, 3, func)
}

/// A session proof of `op` valid for ten minutes: `{sessionProof, sessionProofDeadline}`.
pub(crate) fn proof(
    key: &PrivateKeySigner,
    op: &UserOperation,
    session: B256,
) -> TestResult<Value> {
    proof_until(key, op, session, session_paymaster::clock::unix_now() + 600)
}

pub(crate) fn proof_until(
    key: &PrivateKeySigner,
    op: &UserOperation,
    session: B256,
    deadline: u64,
) -> TestResult<Value> {
    let digest = proof_digest(
        31337,
        EntryPointVersion::V0_7.canonical_address(),
        op,
        session,
        deadline,
    );
    let signature = hex::encode(key.sign_message_sync(digest.as_slice())?.as_bytes());
    Ok(json!({ "sessionProof": format!("0x{signature}"), "sessionProofDeadline": deadline }))
}

async fn sponsor(app: &TestApp, op: &UserOperation, context: Value) -> TestResult<Value> {
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
        "params": [op.to_json(), EntryPointVersion::V0_7.canonical_address(), context]
    });
    Ok(app.post(&body.to_string()).await?.1)
}

fn reason(v: &Value) -> &str {
    v["error"]["data"]["reason"].as_str().unwrap_or("")
}

#[tokio::test]
async fn admin_api_authenticates_validates_and_narrows() -> TestResult {
    let app = app(None).await?;
    let (account, key) = (Address::repeat_byte(0xa1), Address::repeat_byte(0xb2));
    let body = grant_request(account, key, "game-moves");

    for token in [None, Some("wrong"), Some("")] {
        let (status, v) = admin(&app, "POST", "/admin/sessions", Some(body.clone()), token).await?;
        assert_eq!(
            (status, v),
            (401, Value::Null),
            "no detail about which check failed"
        );
    }
    let (status, _) = admin(&app, "GET", "/admin/sessions?account=0x00", None, None).await?;
    assert_eq!(status, 401);

    // Every bad field is reported, by JSON path.
    let mut bad = body.clone();
    bad["account"] = json!("0x12");
    bad["chainId"] = json!("x");
    bad["extra"] = json!(1);
    bad["permissions"] = json!({ "allow": [{ "target": "nope", "functions": [] }], "spend": [{ "token": COUNTER }] });
    let (status, v) = admin(
        &app,
        "POST",
        "/admin/sessions",
        Some(bad),
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 400, "{v}");
    let paths: Vec<&str> = v["issues"]
        .as_array()
        .ok_or("issues")?
        .iter()
        .filter_map(|i| i["path"].as_str())
        .collect();
    for expected in [
        "$.account",
        "$.chainId",
        "$.extra",
        "$.permissions.allow[0].target",
        "$.permissions.allow[0].functions",
        "$.permissions.spend[0].limit",
    ] {
        assert!(paths.contains(&expected), "{expected} in {paths:?}");
    }

    // Grants a stranger's permissions could make huge (a dapp backend passing its users'
    // through): too many rules, too many functions, too long a signature. 400, by path.
    let long = format!("f{}()", "a".repeat(300));
    let huge = [
        (
            json!({ "allow": (1..=65).map(|i| json!({ "target": Address::with_last_byte(i), "functions": ["*"] })).collect::<Vec<_>>() }),
            "$.permissions.allow",
        ),
        (
            json!({ "allow": [{ "target": COUNTER, "functions": vec!["*"; 65] }] }),
            "$.permissions.allow[0].functions",
        ),
        (
            json!({ "allow": [{ "target": COUNTER, "functions": [long] }] }),
            "$.permissions.allow[0].functions[0]",
        ),
    ];
    for (permissions, path) in huge {
        let mut big = body.clone();
        big["permissions"] = permissions;
        let (status, v) = admin(
            &app,
            "POST",
            "/admin/sessions",
            Some(big),
            Some(ADMIN_TOKEN),
        )
        .await?;
        assert_eq!(
            (status, v["issues"][0]["path"].clone()),
            (400, json!(path)),
            "{v}"
        );
        let message = v["issues"][0]["message"].as_str().unwrap_or("");
        assert!(message.starts_with("at most"), "{v}");
    }

    // Wider than the policy: refused, not clipped.
    let cases = [
        (
            json!({ "permissions": { "allow": [{ "target": Address::repeat_byte(9), "functions": ["*"] }] } }),
            "$.permissions.allow[0].target",
        ),
        (
            json!({ "permissions": { "allow": [{ "target": COUNTER, "functions": ["reset()"] }] } }),
            "$.permissions.allow[0].functions[0]",
        ),
        (
            json!({ "permissions": { "allow": [{ "target": COUNTER, "functions": ["increment()"], "maxValue": "1" }] } }),
            "$.permissions.allow[0].maxValue",
        ),
        (json!({ "budget": { "cost": "1 ether" } }), "$.budget.cost"),
        (json!({ "budget": { "ops": 501 } }), "$.budget.ops"),
        (json!({ "chainId": 1 }), "$.chainId"),
    ];
    for (patch, path) in cases {
        let mut wide = body.clone();
        for (k, v) in patch.as_object().ok_or("patch")? {
            wide[k] = v.clone();
        }
        let (status, v) = admin(
            &app,
            "POST",
            "/admin/sessions",
            Some(wide),
            Some(ADMIN_TOKEN),
        )
        .await?;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["issues"][0]["path"], json!(path), "{v}");
    }

    // Created (id generated), fetched, listed page by page, revoked.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(create_session(&app, body.clone()).await?);
    }
    let (status, v) = admin(
        &app,
        "GET",
        &format!("/admin/sessions/{}", ids[0]),
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(
        (status, v["status"].clone(), v["account"].clone()),
        (200, json!("active"), json!(account))
    );
    let mut chosen = body.clone();
    chosen["sessionId"] = json!(ids[0]);
    let (status, _) = admin(
        &app,
        "POST",
        "/admin/sessions",
        Some(chosen),
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 409, "an existing id is never overwritten");

    let (_, page1) = admin(
        &app,
        "GET",
        &format!("/admin/sessions?account={account}&limit=2"),
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(page1["sessions"].as_array().map(Vec::len), Some(2));
    // The second grant's place (creation time, end, id), which nothing leaving shifts.
    let next = page1["nextCursor"].as_str().ok_or("a cursor")?;
    assert_eq!(next.len(), 82, "{next}");
    let last = page1["sessions"][1]["sessionId"].as_str().ok_or("an id")?;
    assert!(
        next.ends_with(&last[2..]),
        "{next} names the page's last grant"
    );
    let (_, page2) = admin(
        &app,
        "GET",
        &format!("/admin/sessions?account={account}&limit=2&cursor={next}"),
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(page2["sessions"].as_array().map(Vec::len), Some(1));
    assert_eq!(page2["nextCursor"], Value::Null);
    let mut listed: Vec<Value> = [&page1, &page2]
        .iter()
        .flat_map(|p| p["sessions"].as_array().cloned().unwrap_or_default())
        .map(|g| g["sessionId"].clone())
        .collect();
    listed.sort_by_key(Value::to_string);
    let mut created: Vec<Value> = ids.iter().map(|id| json!(id)).collect();
    created.sort_by_key(Value::to_string);
    assert_eq!(listed, created, "each grant listed once");
    // An offset (the cursors before 0.3.5) is still taken; anything else is refused.
    let page = |cursor: String| {
        let path = format!("/admin/sessions?account={account}&limit=2&cursor={cursor}");
        let app = &app;
        async move { admin(app, "GET", &path, None, Some(ADMIN_TOKEN)).await }
    };
    assert_eq!(
        page("2".into()).await?.1["sessions"][0]["sessionId"],
        page2["sessions"][0]["sessionId"]
    );
    for bad in [
        "-1".into(),
        "0x12".into(),
        "two".into(),
        format!("{next}00"),
        u64::MAX.to_string(),
    ] {
        let (status, v) = page(bad.clone()).await?;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    // A limit that is no number: this API's 400, naming it (axum's plain text before).
    for bad in ["-1", "two", "1e3"] {
        let path = format!("/admin/sessions?account={account}&limit={bad}");
        let (status, v) = admin(&app, "GET", &path, None, Some(ADMIN_TOKEN)).await?;
        assert_eq!(
            (status, v["issues"][0]["path"].clone()),
            (400, json!("limit")),
            "{bad}: {v}"
        );
    }

    let (status, v) = admin(
        &app,
        "DELETE",
        &format!("/admin/sessions/{}", ids[1]),
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!((status, v["status"].clone()), (200, json!("revoked")));
    let missing = B256::repeat_byte(0xee);
    let (status, _) = admin(
        &app,
        "DELETE",
        &format!("/admin/sessions/{missing}"),
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 404);
    let (status, _) = admin(
        &app,
        "GET",
        "/admin/sessions/0x1234",
        None,
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(status, 400);
    Ok(())
}

#[tokio::test]
async fn sponsorship_under_a_session_checks_grant_proof_and_revocation() -> TestResult {
    let app = app(None).await?;
    let key = PrivateKeySigner::random();
    let account = Address::repeat_byte(0xa2);
    let session = create_session(&app, grant_request(account, key.address(), "game-moves")).await?;
    let ctx = |proof: Option<Value>| {
        let mut c = proof.unwrap_or_else(|| json!({}));
        c["sessionId"] = json!(session);
        c
    };
    let good = op(account, "increment()");

    // game-moves requires the session key's proof.
    assert_eq!(
        reason(&sponsor(&app, &good, ctx(None)).await?),
        "invalid_session_proof"
    );
    let other = PrivateKeySigner::random();
    assert_eq!(
        reason(&sponsor(&app, &good, ctx(Some(proof(&other, &good, session)?))).await?),
        "invalid_session_proof"
    );
    let ok = sponsor(&app, &good, ctx(Some(proof(&key, &good, session)?))).await?;
    assert_eq!(ok["result"]["paymaster"], json!(PM07), "{ok}");
    // A proof binds the nonce: replaying it for another op fails.
    let mut next = good.clone();
    next.nonce = U256::from(4);
    assert_eq!(
        reason(&sponsor(&app, &next, ctx(Some(proof(&key, &good, session)?))).await?),
        "invalid_session_proof"
    );

    // The policy still applies under a session, and the grant is bound to its account.
    let reset = op(account, "reset()");
    assert_eq!(
        reason(&sponsor(&app, &reset, ctx(Some(proof(&key, &reset, session)?))).await?),
        "function_not_allowed"
    );
    let stranger = op(Address::repeat_byte(0xa3), "increment()");
    assert_eq!(
        reason(&sponsor(&app, &stranger, ctx(Some(proof(&key, &stranger, session)?))).await?),
        "session_account_mismatch"
    );
    // A session-only policy named without a session.
    assert_eq!(
        reason(&sponsor(&app, &good, json!({ "sponsorshipPolicyId": "game-moves" })).await?),
        "session_required"
    );

    let status = app.result("pm_getSessionStatus", json!([session])).await?;
    assert_eq!(status["status"], json!("active"));
    assert_eq!(status["policy"], json!("game-moves"));
    assert_eq!(
        status["effectivePermissions"]["allow"][0]["functions"],
        json!(["increment()"])
    );

    let (code, _) = revoke(&app, session).await?;
    assert_eq!(code, 200);
    assert_eq!(
        reason(&sponsor(&app, &good, ctx(Some(proof(&key, &good, session)?))).await?),
        "session_revoked"
    );
    assert_eq!(
        app.result("pm_getSessionStatus", json!([session])).await?["status"],
        json!("revoked")
    );
    let err = app
        .error("pm_getSessionStatus", json!([B256::repeat_byte(7)]))
        .await?;
    assert_eq!(err["data"]["reason"], json!("session_not_found"));
    Ok(())
}

#[tokio::test]
async fn a_session_narrows_a_policy_that_needs_none() -> TestResult {
    let app = app(None).await?;
    let account = Address::repeat_byte(0xa4);
    let mut body = grant_request(account, Address::repeat_byte(0xb4), "dev-counter");
    body["validAfter"] = json!(now() + 3000);
    let future = create_session(&app, body.clone()).await?;
    let good = op(account, "increment()");
    assert_eq!(
        reason(&sponsor(&app, &good, json!({ "sessionId": future })).await?),
        "session_not_yet_valid"
    );

    body["validAfter"] = json!(now() - 10);
    body["validUntil"] = json!(now() + 60);
    let short = create_session(&app, body).await?;
    let r = sponsor(&app, &good, json!({ "sessionId": short })).await?;
    let data = session_paymaster::wire::data("paymasterData", &r["result"]["paymasterData"])?;
    let window = session_paymaster::userop::paymaster_data::PaymasterData::decode(&data)?.window;
    assert!(
        window.valid_until <= now() + 60,
        "the signature does not outlive the session"
    );
    assert_eq!(
        reason(
            &sponsor(
                &app,
                &good,
                json!({ "sessionId": short, "sponsorshipPolicyId": "game-moves" })
            )
            .await?
        ),
        "policy_mismatch"
    );
    Ok(())
}

fn grant(id: u8, account: Address, created_at: u64) -> SessionGrant {
    SessionGrant {
        session_id: B256::repeat_byte(id),
        account,
        session_key: Address::repeat_byte(0x5e),
        chain_id: 31337,
        policy: "dev-counter".into(),
        valid_after: 1,
        valid_until: 4_000_000_000,
        status: SessionStatus::Active,
        permissions: None,
        budget: None,
        created_at,
        shared_budget: false,
    }
}

/// The same behaviour from both stores.
async fn store_contract(store: SessionStore) -> TestResult {
    let account = Address::repeat_byte(0x42);
    let g = grant(1, account, 10);
    assert!(store.create(&g).await?);
    assert!(
        !store
            .create(&SessionGrant {
                policy: "other".into(),
                ..g.clone()
            })
            .await?,
        "no overwrite"
    );
    assert_eq!(store.get(g.session_id).await?, Some(g.clone()));
    assert_eq!(store.get(B256::repeat_byte(9)).await?, None);
    for (i, id) in [2u8, 3, 4].into_iter().enumerate() {
        store.create(&grant(id, account, 11 + i as u64)).await?;
    }
    store
        .create(&grant(5, Address::repeat_byte(0x43), 1))
        .await?;
    let ids = |p: &session_paymaster::session::Page| -> Vec<u8> {
        p.sessions.iter().map(|s| s.session_id[0]).collect()
    };
    let p1 = store
        .list_by_account(account, ListCursor::Offset(0), 3)
        .await?;
    assert_eq!(ids(&p1), vec![1, 2, 3]);
    let next = p1.next_cursor.ok_or("more")?;
    assert!(matches!(next, ListCursor::After(_)), "{next:?}");
    let p2 = store.list_by_account(account, next, 3).await?;
    assert_eq!(ids(&p2), vec![4]);
    assert_eq!(p2.next_cursor, None);
    assert_eq!(
        ids(&store
            .list_by_account(account, ListCursor::Offset(3), 3)
            .await?),
        vec![4],
        "an offset, as cursors were before 0.3.5"
    );
    // A listing resumes after the last grant it showed, whatever left meanwhile: an ended grant
    // listed first leaves as the account gets a new one, and an offset would then skip one.
    let busy = Address::repeat_byte(0x45);
    let gone_soon = SessionGrant {
        valid_until: 1_000_000,
        ..grant(0x70, busy, 5)
    };
    for (i, id) in [0x71u8, 0x72, 0x73].into_iter().enumerate() {
        store.create(&grant(id, busy, 20 + i as u64)).await?;
    }
    // (Created last, listed first: no creation since has dropped it yet.)
    store.create(&gone_soon).await?;
    let q1 = store
        .list_by_account(busy, ListCursor::Offset(0), 2)
        .await?;
    assert_eq!(
        ids(&q1),
        vec![0x71],
        "the ended grant takes a place, not shown"
    );
    store.create(&grant(0x74, busy, 30)).await?;
    let q2 = store
        .list_by_account(busy, q1.next_cursor.ok_or("more")?, 2)
        .await?;
    assert_eq!(ids(&q2), vec![0x72, 0x73], "nothing skipped");
    assert_eq!(
        ids(&store
            .list_by_account(busy, ListCursor::Offset(2), 2)
            .await?),
        vec![0x73, 0x74],
        "an offset skips 0x72: the ended grant left"
    );
    let revoked = store.revoke(g.session_id).await?.ok_or("revoked")?;
    assert_eq!(revoked.status, SessionStatus::Revoked);
    assert_eq!(
        store.get(g.session_id).await?.map(|s| s.status),
        Some(SessionStatus::Revoked)
    );
    assert_eq!(
        store.revoke(B256::repeat_byte(9)).await?,
        None,
        "unknown ids are not created"
    );
    assert_eq!(store.get(B256::repeat_byte(9)).await?, None);
    // A grant a day past its end is forgotten: unknown to reads, revocation and listings
    // (Redis expires its key; the memory store prunes it).
    let ended = SessionGrant {
        valid_until: 1_000_000,
        ..grant(6, Address::repeat_byte(0x44), 12)
    };
    assert!(store.create(&ended).await?, "stored, and forgotten at once");
    assert_eq!(store.get(ended.session_id).await?, None);
    assert_eq!(store.revoke(ended.session_id).await?, None);
    assert!(
        store
            .list_by_account(ended.account, ListCursor::Offset(0), 10)
            .await?
            .sessions
            .is_empty()
    );
    Ok(())
}

#[tokio::test]
async fn memory_store_contract() -> TestResult {
    store_contract(SessionStore::Memory(MemorySessions::new())).await
}

#[tokio::test]
async fn redis_store_contract() -> TestResult {
    let redis = TestRedis::start().await?;
    store_contract(SessionStore::Redis(
        RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?,
    ))
    .await
}

/// A session store on `redis`, its commands given `timeout`.
async fn redis_store(redis: &TestRedis, timeout: Duration) -> TestResult<SessionStore> {
    Ok(SessionStore::Redis(
        RedisSessions::connect(&redis.url, timeout).await?,
    ))
}

/// `CLIENT PAUSE` of `redis` for `ms` in `mode` (`ALL`, or `WRITE`: reads still answered), and
/// the connection that paused it.
async fn pause_redis(
    redis: &TestRedis,
    ms: u64,
    mode: &str,
) -> TestResult<redis::aio::MultiplexedConnection> {
    let mut conn = redis.conn().await?;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg(mode)
        .query_async::<()>(&mut conn)
        .await?;
    Ok(conn)
}

/// Each create of a grant runs in a task of its own, which a client that hangs up leaves
/// running (found by review: a flood of them piled up tasks while Redis was slow): a replica
/// has at most `MAX_CREATES_IN_FLIGHT` (one here), and one more is refused at once rather than
/// queued; the place comes back when its create ends.
#[tokio::test]
async fn creates_in_flight_at_a_replica_are_bounded() -> TestResult {
    let redis = TestRedis::start().await?;
    let store = std::sync::Arc::new(SessionStore::Redis(
        RedisSessions::connect(&redis.url, Duration::from_secs(5))
            .await?
            .with_max_creates(1),
    ));
    // Redis answers no one for a second and a half.
    pause_redis(&redis, 1500, "ALL").await?;
    let held = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .create(&grant(0x81, Address::repeat_byte(0x81), 10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = store
        .create(&grant(0x82, Address::repeat_byte(0x82), 10))
        .await;
    assert!(!held.is_finished(), "refused while the first was in flight");
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(why)) if why.contains("in flight")),
        "{refused:?}"
    );
    assert!(held.await??, "the first created once Redis answers");
    assert!(
        store
            .create(&grant(0x83, Address::repeat_byte(0x83), 10))
            .await?,
        "its place came back"
    );
    Ok(())
}

/// An account that gets one grant and never another left its index member for as long as any
/// account of its bucket (one of 65,536) got new grants: Redis grew by a member per account for
/// good. Ended members of the bucket now leave as any grant goes into it (those of a random
/// sample of 64 members, so all of a bucket this small).
#[tokio::test]
async fn ended_grants_leave_the_index_whatever_their_account() -> TestResult {
    use alloy::primitives::keccak256;
    let redis = TestRedis::start().await?;
    let store = redis_store(&redis, Duration::from_secs(2)).await?;
    let once = Address::repeat_byte(0x46);
    let bucket = keccak256(once)[..2].to_vec();
    // Another account in the same bucket.
    let other = (1u64..)
        .map(|i| Address::left_padding_from(&i.to_be_bytes()))
        .find(|a| keccak256(a)[..2] == bucket[..])
        .ok_or("an account")?;
    // A live grant first, so the bucket lives long whatever the ended one's TTL.
    store.create(&grant(0x62, other, 6)).await?;
    store
        .create(&SessionGrant {
            valid_until: 1_000_000,
            ..grant(0x61, once, 5)
        })
        .await?;
    let key = [b"sp:ga:".as_slice(), &bucket].concat();
    let mut conn = redis.conn().await?;
    let owners = |members: Vec<Vec<u8>>| -> Vec<Address> {
        members
            .iter()
            .map(|m| Address::from_slice(&m[..20]))
            .collect()
    };
    let mut listed = redis::cmd("ZRANGE");
    listed.arg(&key).arg(0).arg(-1);
    let before: Vec<Vec<u8>> = listed.query_async(&mut conn).await?;
    let mut expected = vec![once, other];
    expected.sort();
    let mut got = owners(before);
    got.sort();
    assert_eq!(got, expected, "both listed");
    store.create(&grant(0x63, other, 7)).await?;
    let after: Vec<Vec<u8>> = listed.query_async(&mut conn).await?;
    assert_eq!(
        owners(after),
        vec![other, other],
        "the other account's ended member left"
    );
    Ok(())
}

/// Grants written before 0.2 (a hash of JSON and status per grant, a sorted set per account)
/// are still read, revoked (the revocation is seen) and listed, before the account's new ones.
#[tokio::test]
async fn grants_of_the_old_layout_are_read_revoked_and_listed() -> TestResult {
    let redis = TestRedis::start().await?;
    let store =
        SessionStore::Redis(RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?);
    let account = Address::repeat_byte(0x42);
    let old = grant(1, account, 10);
    let client = redis::Client::open(redis.url.as_str())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    // The JSON 0.1 wrote (a literal: not today's serialiser).
    let json = format!(
        r#"{{"sessionId":"{}","account":"{account}","sessionKey":"{}","chainId":31337,"policy":"dev-counter","validAfter":1,"validUntil":4000000000,"status":"active","createdAt":10}}"#,
        old.session_id, old.session_key
    );
    // 0.1's record of a grant: its JSON and status in a hash keyed by `id`.
    let put_old = |id: B256| {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(format!("sp:session:{{{id}}}"))
            .arg("grant")
            .arg(&json)
            .arg("status")
            .arg("active");
        cmd
    };
    let _: () = put_old(old.session_id).query_async(&mut c).await?;
    let _: () = redis::cmd("ZADD")
        .arg(format!("sp:account-sessions:{account}"))
        .arg(10)
        .arg(old.session_id.to_string())
        .query_async(&mut c)
        .await?;
    assert_eq!(store.get(old.session_id).await?, Some(old.clone()));
    assert!(!store.create(&old).await?, "its id is taken");
    store.create(&grant(2, account, 11)).await?;
    let ids = |p: session_paymaster::session::Page| -> Vec<u8> {
        p.sessions.iter().map(|s| s.session_id[0]).collect()
    };
    assert_eq!(
        ids(store
            .list_by_account(account, ListCursor::Offset(0), 10)
            .await?),
        vec![1, 2]
    );
    // Within the old layout's list a page ends at an offset; past it, at a place.
    let page = store
        .list_by_account(account, ListCursor::Offset(0), 1)
        .await?;
    assert_eq!(
        (ids(page.clone()), page.next_cursor),
        (vec![1], Some(ListCursor::Offset(1)))
    );
    assert_eq!(
        ids(store
            .list_by_account(account, ListCursor::Offset(1), 1)
            .await?),
        vec![2]
    );
    let revoked = store.revoke(old.session_id).await?.ok_or("known")?;
    assert_eq!(revoked.status, SessionStatus::Revoked);
    assert_eq!(
        store.get(old.session_id).await?.map(|g| g.status),
        Some(SessionStatus::Revoked)
    );
    // A record whose JSON names another id than its key is unreadable, not that other grant
    // (the ledger's session state and a replica's copy are kept under the id asked for).
    let elsewhere = B256::repeat_byte(0x77);
    let _: () = put_old(elsewhere).query_async(&mut c).await?;
    assert!(matches!(store.get(elsewhere).await, Err(StoreError::Corrupt(id)) if id == elsewhere));
    assert!(matches!(
        store.get_for_sponsorship(elsewhere).await,
        Err(StoreError::Corrupt(_))
    ));
    Ok(())
}

#[tokio::test]
async fn redis_cluster_store_contract() -> TestResult {
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    store_contract(SessionStore::Redis(
        RedisSessions::connect(&cluster.url, Duration::from_secs(2)).await?,
    ))
    .await
}

/// The revocation feed on a Redis Cluster: written by one replica's revoke (a script of one
/// key), read by another's (a pipeline of two reads of one key), which drops its copy.
#[tokio::test]
async fn revocations_are_followed_on_a_redis_cluster() -> TestResult {
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    let one = RedisSessions::connect(&cluster.url, Duration::from_secs(2)).await?;
    let two =
        SessionStore::Redis(RedisSessions::connect(&cluster.url, Duration::from_secs(2)).await?);
    let SessionStore::Redis(follower) = &two else {
        unreachable!()
    };
    let g = grant(1, Address::repeat_byte(0x44), 10);
    assert!(SessionStore::Redis(one.clone()).create(&g).await?);
    assert_eq!(follower.follow_revocations().await?, 0);
    assert_eq!(
        two.get_for_sponsorship(g.session_id).await?.1,
        GrantSource::Store
    );
    assert_eq!(
        two.get_for_sponsorship(g.session_id).await?.1,
        GrantSource::Copy
    );
    SessionStore::Redis(one).revoke(g.session_id).await?;
    assert_eq!(follower.follow_revocations().await?, 1);
    let (got, source) = two.get_for_sponsorship(g.session_id).await?;
    assert_eq!(source, GrantSource::Store);
    assert_eq!(got.ok_or("the grant")?.status, SessionStatus::Revoked);
    Ok(())
}

/// The revocation feed tells what it may lose from what it may not: its place's entry trimmed
/// for age (no revocation for 6 minutes, then one) is no loss; an unread entry removed is, and
/// so is another Redis answering (a restart here: a failover may keep the place's entry but not
/// those after it). A loss puts copies back to 10 s once; reads then begin anew.
#[tokio::test]
async fn the_revocation_feed_tells_a_trim_from_a_loss() -> TestResult {
    use session_paymaster::session::redis::REVOCATIONS_KEY;
    let mut redis = TestRedis::start_persistent().await?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let writer =
        SessionStore::Redis(RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?);
    let reader = RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?;
    let lost = |r: &Result<usize, StoreError>| matches!(r, Err(StoreError::Unavailable(m)) if m.contains("revocation feed was lost"));
    // The feed's only entry 7 minutes old: the reader's place.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let old: String = redis::cmd("XADD")
        .arg(REVOCATIONS_KEY)
        .arg(format!("{}-0", now_ms - 420_000))
        .arg("begin")
        .arg(1)
        .query_async(&mut conn)
        .await?;
    assert_eq!(reader.follow_revocations().await?, 0);
    // A revocation, and the old entry trimmed (exactly, as `~` trims whole nodes).
    writer.revoke(B256::repeat_byte(0x51)).await?;
    let _: u64 = redis::cmd("XTRIM")
        .arg(REVOCATIONS_KEY)
        .arg("MINID")
        .arg(format!("{}", now_ms - 360_000))
        .query_async(&mut conn)
        .await?;
    let gone: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(REVOCATIONS_KEY)
        .arg(&old)
        .arg(&old)
        .query_async(&mut conn)
        .await?;
    assert!(gone.is_empty(), "the place's entry is trimmed");
    assert_eq!(
        reader.follow_revocations().await?,
        1,
        "a trim for age is no loss"
    );
    assert!(reader.follows_revocations());

    // An unread revocation deleted: lost (the count is short), then read anew.
    writer.revoke(B256::repeat_byte(0x52)).await?;
    writer.revoke(B256::repeat_byte(0x53)).await?;
    let newest = feed_entries(&mut conn).await?;
    let unread = &newest[newest.len() - 2].0;
    let _: u64 = redis::cmd("XDEL")
        .arg(REVOCATIONS_KEY)
        .arg(unread)
        .query_async(&mut conn)
        .await?;
    assert!(
        lost(&reader.follow_revocations().await),
        "an unread entry removed"
    );
    assert!(!reader.follows_revocations());
    assert_eq!(reader.follow_revocations().await?, 0);
    assert_eq!(reader.follow_revocations().await?, 0);
    assert!(reader.follows_revocations());

    // Redis restarted with its data: another run answers. Lost once, then read on.
    redis.restart().await?;
    let mut tries = 0;
    let after = loop {
        match reader.follow_revocations().await {
            // (Reconnecting.)
            Err(StoreError::Unavailable(m))
                if !m.contains("revocation feed was lost") && tries < 100 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other,
        }
    };
    assert!(lost(&after), "{after:?}");
    assert_eq!(reader.follow_revocations().await?, 0);
    // (The writer's connection, unused since the restart, reconnects on its first command.)
    for _ in 0..100 {
        if writer.get(B256::ZERO).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.revoke(B256::repeat_byte(0x54)).await?;
    assert_eq!(reader.follow_revocations().await?, 1);
    Ok(())
}

/// A replica keeps a copy of each grant it creates, as a read would decode it: the session's
/// sponsorships there never read Redis for it, while another replica reads it once. Another
/// replica's revocation reaches the copy through the revocation feed, and its own revocation
/// drops the copy (the next read finds the grant revoked); a grant created again under the id
/// after its key was deleted by hand replaces it.
#[tokio::test]
async fn a_replica_serves_the_grants_it_created_from_its_copy() -> TestResult {
    let redis = TestRedis::start().await?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let creator =
        SessionStore::Redis(RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?);
    let other =
        SessionStore::Redis(RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?);
    let SessionStore::Redis(follower) = &creator else {
        unreachable!()
    };
    // The creator's run of reads of the feed begins before its creates.
    assert_eq!(follower.follow_revocations().await?, 0);
    let g = SessionGrant {
        permissions: Some(serde_json::from_value(serde_json::json!({
            "allow": [{
                "target": Address::repeat_byte(0x70),
                "functions": ["transfer(address,uint256)"],
                "maxValue": "5",
            }],
            "spend": [{ "token": Address::repeat_byte(0x71), "limit": "100" }],
        }))?),
        budget: Some(serde_json::from_value(serde_json::json!({ "ops": 7 }))?),
        shared_budget: true,
        ..grant(0x61, Address::repeat_byte(0x46), 10)
    };
    assert!(creator.create(&g).await?);
    let gets =
        |calls: std::collections::BTreeMap<String, u64>| calls.get("get").copied().unwrap_or(0);
    let before = gets(crate::ledger::command_calls(&mut conn).await?);
    for _ in 0..3 {
        let (copy, source) = creator.get_for_sponsorship(g.session_id).await?;
        assert_eq!(source, GrantSource::Copy);
        assert_eq!(*copy.ok_or("the copy")?, g, "what was written");
    }
    assert_eq!(
        gets(crate::ledger::command_calls(&mut conn).await?),
        before,
        "no GET"
    );
    // Another replica reads it from Redis once: the same grant as the creator's copy.
    let (read, source) = other.get_for_sponsorship(g.session_id).await?;
    assert_eq!(source, GrantSource::Store);
    assert_eq!(
        read,
        creator.get_for_sponsorship(g.session_id).await?.0,
        "the copy is what a read finds"
    );
    assert_eq!(
        other.get_for_sponsorship(g.session_id).await?.1,
        GrantSource::Copy
    );
    assert_eq!(
        gets(crate::ledger::command_calls(&mut conn).await?),
        before + 1
    );

    // Revoked at the other replica: the creator's copy stands until it reads the feed.
    other.revoke(g.session_id).await?;
    assert_eq!(
        creator.get_for_sponsorship(g.session_id).await?.1,
        GrantSource::Copy
    );
    assert_eq!(follower.follow_revocations().await?, 1);
    let (got, source) = creator.get_for_sponsorship(g.session_id).await?;
    assert_eq!(source, GrantSource::Store, "its copy dropped");
    assert_eq!(got.ok_or("the grant")?.status, SessionStatus::Revoked);

    // Its own revocation drops its copy at once.
    let h = grant(0x62, Address::repeat_byte(0x46), 10);
    assert!(creator.create(&h).await?);
    assert_eq!(
        creator.get_for_sponsorship(h.session_id).await?.1,
        GrantSource::Copy
    );
    creator.revoke(h.session_id).await?;
    let (got, source) = creator.get_for_sponsorship(h.session_id).await?;
    assert_eq!(source, GrantSource::Store, "its copy dropped");
    assert_eq!(got.ok_or("the grant")?.status, SessionStatus::Revoked);

    // Its key deleted by hand, the id created again for another account: the new copy.
    let _: () = redis::cmd("DEL")
        .arg([b"sp:g:".as_slice(), g.session_id.as_slice()].concat())
        .query_async(&mut conn)
        .await?;
    let again = grant(0x61, Address::repeat_byte(0x47), 11);
    assert!(creator.create(&again).await?);
    let (copy, source) = creator.get_for_sponsorship(g.session_id).await?;
    assert_eq!(source, GrantSource::Copy);
    assert_eq!(*copy.ok_or("the copy")?, again);
    Ok(())
}

/// The revocation feed read a page at a time: a replica behind by more than a page
/// (`FEED_PAGE`, 1,024 entries) reads every page in one follow, and drops its copy of a grant
/// revoked on the last page; one behind by as many revocations as it keeps copies (65,536 by
/// default, 2,048 with `--session-copies 2048`) stops there: lost, copies back to 10 s, then
/// read anew from the feed's end.
#[tokio::test]
async fn the_revocation_feed_is_read_page_by_page_up_to_the_copies_kept() -> TestResult {
    use session_paymaster::session::redis::REVOCATIONS_KEY;
    let redis = TestRedis::start().await?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let writer =
        SessionStore::Redis(RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?);
    let reader =
        SessionStore::Redis(RedisSessions::connect(&redis.url, Duration::from_secs(2)).await?);
    let SessionStore::Redis(follower) = &reader else {
        unreachable!()
    };
    // How many EVALSHAs Redis has run (follow.lua is one).
    async fn evalshas(conn: &mut redis::aio::MultiplexedConnection) -> TestResult<u64> {
        let calls = crate::ledger::command_calls(conn).await?;
        Ok(calls.get("evalsha").copied().unwrap_or(0))
    }
    // `n` revocations of other grants, as the service writes them (`id`: 32 bytes), in one go.
    let revocations = |n: u32| {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(
            "for i = 1, tonumber(ARGV[1]) do \
               redis.call('XADD', KEYS[1], '*', 'id', string.rep('\\0', 28) .. struct.pack('>I4', i)) \
             end",
        )
        .arg(1)
        .arg(REVOCATIONS_KEY)
        .arg(n);
        cmd
    };
    let g = grant(0x5a, Address::repeat_byte(0x45), 10);
    assert!(writer.create(&g).await?);
    assert_eq!(follower.follow_revocations().await?, 0);
    assert_eq!(
        reader.get_for_sponsorship(g.session_id).await?.1,
        GrantSource::Store
    );
    assert_eq!(
        reader.get_for_sponsorship(g.session_id).await?.1,
        GrantSource::Copy
    );

    // Three pages (FEED_PAGE 1,024): 2,500 others, then this grant's revocation, last; each
    // page one run of follow.lua (an EVALSHA).
    let _: () = revocations(2_500).query_async(&mut conn).await?;
    writer.revoke(g.session_id).await?;
    let before = evalshas(&mut conn).await?;
    assert_eq!(follower.follow_revocations().await?, 2_501);
    assert_eq!(evalshas(&mut conn).await? - before, 3, "three pages");
    assert!(follower.follows_revocations());
    let (got, source) = reader.get_for_sponsorship(g.session_id).await?;
    assert_eq!(source, GrantSource::Store, "its copy dropped");
    assert_eq!(got.ok_or("the grant")?.status, SessionStatus::Revoked);
    // The place moved to the last page's end: one more is one more.
    writer.revoke(B256::repeat_byte(0x5b)).await?;
    assert_eq!(follower.follow_revocations().await?, 1);

    // As many at once as copies are kept: no better than copies held to 10 s, from the end on.
    // It stops after the 64th full page, as many as copies are kept: not at a later page (a
    // count found short, an entry not understood), which would be a 65th read.
    let _: () = revocations(65_536).query_async(&mut conn).await?;
    let before = evalshas(&mut conn).await?;
    assert!(matches!(
        follower.follow_revocations().await,
        Err(StoreError::Unavailable(m)) if m.contains("revocation feed was lost")
    ));
    assert_eq!(evalshas(&mut conn).await? - before, 64);
    assert!(!follower.follows_revocations());
    assert_eq!(follower.follow_revocations().await?, 0);
    assert!(follower.follows_revocations());
    writer.revoke(B256::repeat_byte(0x5c)).await?;
    assert_eq!(follower.follow_revocations().await?, 1);

    // `--session-copies 2048`: the same at that many, two pages.
    let small = RedisSessions::connect(&redis.url, Duration::from_secs(2))
        .await?
        .with_copies(2_048);
    assert_eq!(small.follow_revocations().await?, 0);
    let _: () = revocations(2_048).query_async(&mut conn).await?;
    let before = evalshas(&mut conn).await?;
    assert!(matches!(
        small.follow_revocations().await,
        Err(StoreError::Unavailable(m)) if m.contains("revocation feed was lost")
    ));
    assert_eq!(evalshas(&mut conn).await? - before, 2);
    assert_eq!(small.follow_revocations().await?, 0);
    let _: () = revocations(2_047).query_async(&mut conn).await?;
    assert_eq!(
        small.follow_revocations().await?,
        2_047,
        "one fewer is read"
    );
    Ok(())
}

#[tokio::test]
async fn revocation_is_seen_by_another_instance_sharing_redis() -> TestResult {
    let redis = TestRedis::start().await?;
    let (one, two) = (app(Some(&redis)).await?, app(Some(&redis)).await?);
    let account = Address::repeat_byte(0xa5);
    let session = create_session(
        &one,
        grant_request(account, Address::repeat_byte(0xb5), "dev-counter"),
    )
    .await?;
    let good = op(account, "increment()");
    assert!(sponsor(&two, &good, json!({ "sessionId": session })).await?["result"].is_object());
    let (code, _) = revoke(&one, session).await?;
    assert_eq!(code, 200);
    assert_eq!(
        reason(&sponsor(&two, &good, json!({ "sessionId": session })).await?),
        "session_revoked"
    );
    Ok(())
}

#[tokio::test]
async fn redis_outage_fails_closed() -> TestResult {
    let redis = TestRedis::start().await?;
    let app = app(Some(&redis)).await?;
    let account = Address::repeat_byte(0xa6);
    let session = create_session(
        &app,
        grant_request(account, Address::repeat_byte(0xb6), "dev-counter"),
    )
    .await?;
    drop(redis);
    let r = sponsor(
        &app,
        &op(account, "increment()"),
        json!({ "sessionId": session }),
    )
    .await?;
    assert_eq!(r["error"]["code"], json!(-32004), "{r}");
    assert_eq!(r["error"]["data"]["retryable"], json!(true));
    assert!(r.get("result").is_none(), "nothing signed");
    let (code, _) = admin(
        &app,
        "POST",
        "/admin/sessions",
        Some(grant_request(account, account, "dev-counter")),
        Some(ADMIN_TOKEN),
    )
    .await?;
    assert_eq!(code, 503);
    // Without a session the hot path needs no Redis.
    let r = sponsor(&app, &op(account, "increment()"), Value::Null).await?;
    assert!(r["result"].is_object(), "{r}");
    Ok(())
}

sol! {
    function transfer(address to, uint256 amount);
}

pub(crate) const TOKEN: Address = Address::repeat_byte(0x70);

/// A session-only policy on the local chain for a token, so spend limits can be exercised.
fn token_policy_dir() -> TestResult<crate::helpers::TempDir> {
    let dir = crate::helpers::TempDir::new("token-policy");
    std::fs::write(
        dir.0.join("token.toml"),
        format!(
            "id = \"token\"\nchains = [31337]\nentry_points = [\"0.7\"]\nrequire_session = true\n\n\
             [[allow]]\ntarget = \"{TOKEN}\"\nfunctions = [\"transfer(address,uint256)\"]\n"
        ),
    )?;
    Ok(dir)
}

pub(crate) fn transfer_op(account: Address, amount: u64, nonce: u64) -> UserOperation {
    let inner = transferCall {
        to: Address::repeat_byte(0x99),
        amount: U256::from(amount),
    }
    .abi_encode();
    UserOperation {
        nonce: U256::from(nonce),
        call_data: executeCall {
            dest: TOKEN,
            value: U256::ZERO,
            func: inner.into(),
        }
        .abi_encode()
        .into(),
        ..op(account, "transfer(address,uint256)")
    }
}

async fn spend_limits_are_cumulative(redis: Option<&TestRedis>) -> TestResult {
    let dir = token_policy_dir()?;
    let mut c = config([Some(PM07), None, None], KeySource::Ephemeral);
    c.policies_dir = dir.0.clone();
    c.redis_url = redis.map(|r| r.url.clone());
    let app = TestApp::spawn(c).await?;
    let account = Address::repeat_byte(0xa7);
    let mut body = grant_request(account, Address::repeat_byte(0xb7), "token");
    body.as_object_mut().map(|o| o.remove("budget"));
    body["permissions"] = json!({ "spend": [{ "token": TOKEN, "limit": "100" }] });
    let session = create_session(&app, body).await?;
    let ctx = json!({ "sessionId": session });

    assert!(sponsor(&app, &transfer_op(account, 60, 1), ctx.clone()).await?["result"].is_object());
    assert_eq!(
        reason(&sponsor(&app, &transfer_op(account, 50, 2), ctx.clone()).await?),
        "spend_limit_exceeded"
    );
    assert!(sponsor(&app, &transfer_op(account, 40, 3), ctx.clone()).await?["result"].is_object());
    let status = app.result("pm_getSessionStatus", json!([session])).await?;
    assert_eq!(status["spent"][TOKEN.to_string()], json!("100"), "{status}");
    // The stub runs the same check, counting what was already signed for.
    let stub = json!({
        "jsonrpc": "2.0", "id": 1, "method": "pm_getPaymasterStubData",
        "params": [transfer_op(account, 1, 4).to_json(), EntryPointVersion::V0_7.canonical_address(), "0x7a69", ctx]
    });
    assert_eq!(
        reason(&app.post(&stub.to_string()).await?.1),
        "spend_limit_exceeded"
    );
    Ok(())
}

#[tokio::test]
async fn spend_limits_are_cumulative_in_memory() -> TestResult {
    spend_limits_are_cumulative(None).await
}

#[tokio::test]
async fn spend_limits_are_cumulative_in_redis() -> TestResult {
    let redis = TestRedis::start().await?;
    spend_limits_are_cumulative(Some(&redis)).await
}

/// Concurrent sponsorships never spend the same remainder twice.
#[tokio::test]
async fn concurrent_spending_never_exceeds_the_limit() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = token_policy_dir()?;
    let mut c = config([Some(PM07), None, None], KeySource::Ephemeral);
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(redis.url.clone());
    let (one, two) = (TestApp::spawn(c.clone()).await?, TestApp::spawn(c).await?);
    let account = Address::repeat_byte(0xa8);
    let mut body = grant_request(account, Address::repeat_byte(0xb8), "token");
    body.as_object_mut().map(|o| o.remove("budget"));
    body["permissions"] = json!({ "spend": [{ "token": TOKEN, "limit": "100" }] });
    let session = create_session(&one, body).await?;

    let requests = (0..40u64).map(|i| {
        let url = if i % 2 == 0 { one.url.clone() } else { two.url.clone() };
        let body = json!({
            "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
            "params": [transfer_op(account, 10, 100 + i).to_json(), EntryPointVersion::V0_7.canonical_address(), { "sessionId": session }]
        });
        async move {
            let resp = reqwest::Client::new().post(url).json(&body).send().await?;
            resp.json::<Value>().await
        }
    });
    let answers = futures_join_all(requests).await;
    let mut signed = 0u64;
    for a in answers {
        let a = a?;
        if a["result"].is_object() {
            signed += 1;
        } else {
            assert_eq!(reason(&a), "spend_limit_exceeded", "{a}");
        }
    }
    let status = one.result("pm_getSessionStatus", json!([session])).await?;
    assert_eq!(signed, 10, "exactly 100 / 10 transfers signed");
    assert_eq!(
        status["spent"][TOKEN.to_string()],
        json!((signed * 10).to_string()),
        "totals equal what was signed"
    );
    Ok(())
}

/// Run futures concurrently on the test runtime.
pub(crate) async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// A policy's `max_sessions` bounds its live grants: one more is refused (429) until one ends,
/// a create refused for its taken id takes no place, and (in Redis) days that have ended leave
/// the count. Without it a tenant's admin key could create grants until Redis was full, every
/// tenant's reservations then refused (found by review).
async fn a_policys_live_sessions_are_bounded(redis: Option<&TestRedis>) -> TestResult {
    let dir = crate::helpers::TempDir::new("max-sessions");
    std::fs::write(
        dir.0.join("few.toml"),
        crate::helpers::session_policy("few", Some(3)),
    )?;
    let mut c = config([Some(PM07), None, None], KeySource::Ephemeral);
    c.policies_dir = dir.0.clone();
    c.redis_url = redis.map(|r| r.url.clone());
    let app = TestApp::spawn(c).await?;
    if let Some(r) = redis {
        // Grants that ended yesterday count no more (and leave the count).
        let mut conn = r.conn().await?;
        let _: () = redis::cmd("HSET")
            .arg("sp:{few}:grants-live")
            .arg(now() / 86_400 - 1)
            .arg(100)
            .arg("total")
            .arg(100)
            .query_async(&mut conn)
            .await?;
    }
    let post = |n: u8, id: Option<B256>| {
        let mut body = grant_request(Address::repeat_byte(n), Address::repeat_byte(0xb0), "few");
        if let Some(id) = id {
            body["sessionId"] = json!(id);
        }
        admin(
            &app,
            "POST",
            "/admin/sessions",
            Some(body),
            Some(ADMIN_TOKEN),
        )
    };
    let first = B256::repeat_byte(0x51);
    let mut statuses = vec![post(1, Some(first)).await?.0];
    // The same id again: 409, and its place is not taken.
    statuses.push(post(2, Some(first)).await?.0);
    for n in 3..=4 {
        statuses.push(post(n, None).await?.0);
    }
    let (status, full) = post(6, None).await?;
    statuses.push(status);
    assert_eq!(statuses, [201, 409, 201, 201, 429]);
    assert!(
        full["error"]
            .as_str()
            .is_some_and(|e| e.contains("3 live sessions")),
        "{full}"
    );
    if let Some(r) = redis {
        // Three counted, yesterday's day gone, a lifetime set.
        let mut conn = r.conn().await?;
        let key = "sp:{few}:grants-live";
        let (total, yesterday, ttl): (Option<u64>, Option<u64>, i64) = redis::pipe()
            .hget(key, "total")
            .hget(key, now() / 86_400 - 1)
            .ttl(key)
            .query_async(&mut conn)
            .await?;
        assert_eq!((total, yesterday), (Some(3), None));
        assert!(ttl > 0, "{ttl}");
        // The days' counts add up to the total (the give-back took from both).
        let fields: Vec<(String, i64)> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await?;
        let days: i64 = fields
            .iter()
            .filter(|(f, _)| f.parse::<u64>().is_ok())
            .map(|(_, n)| n)
            .sum();
        assert_eq!(days, 3, "{fields:?}");
    }
    Ok(())
}

/// Every member of the accounts' index buckets in Redis, and policy `dev-counter`'s live count.
async fn listed_and_live(mut conn: redis::aio::MultiplexedConnection) -> TestResult<(u64, u64)> {
    let buckets: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("sp:ga:*")
        .query_async(&mut conn)
        .await?;
    let mut members = 0;
    for b in buckets {
        let n: u64 = redis::cmd("ZCARD").arg(b).query_async(&mut conn).await?;
        members += n;
    }
    let live: Option<u64> = redis::cmd("HGET")
        .arg("sp:{dev-counter}:grants-live")
        .arg("total")
        .query_async(&mut conn)
        .await?;
    Ok((members, live.unwrap_or(0)))
}

/// The status of the operator's create of a `dev-counter` grant with session `id`, for an
/// account and an end of its own for each `n`.
async fn create_numbered(app: &TestApp, n: u16, id: B256) -> TestResult<u16> {
    let mut body = grant_request(
        Address::left_padding_from(&n.to_be_bytes()),
        Address::repeat_byte(0xb0),
        "dev-counter",
    );
    body["sessionId"] = json!(id);
    body["validUntil"] = json!(now() + 3600 + u64::from(n));
    Ok(post_session(app, body).await?.0)
}

/// An app on a fresh Redis, and a connection to that Redis.
async fn app_on_redis() -> TestResult<(TestApp, TestRedis, redis::aio::MultiplexedConnection)> {
    let redis = TestRedis::start().await?;
    let mut c = config([Some(PM07), None, None], KeySource::Ephemeral);
    c.redis_url = Some(redis.url.clone());
    let app = TestApp::spawn(c).await?;
    let conn = redis.conn().await?;
    Ok((app, redis, conn))
}

/// A create refused for its taken id writes nothing: it counted the grant and listed it under
/// its account before finding the id taken, and the member stayed until the refused grant's own
/// `validUntil` (up to ten years), so a tenant's key could grow Redis without a bound by 409s
/// (found by review).
#[tokio::test]
async fn a_create_refused_for_its_taken_id_writes_nothing_in_redis() -> TestResult {
    let (app, _redis, conn) = app_on_redis().await?;
    let taken = B256::repeat_byte(0x71);
    assert_eq!(create_numbered(&app, 1, taken).await?, 201);
    // The same id again and again, each time for another account and end: no script runs (the
    // count, the listing), nothing is set.
    let writes = |mut conn: redis::aio::MultiplexedConnection| async move {
        let calls = crate::ledger::command_calls(&mut conn).await?;
        TestResult::Ok(["evalsha", "eval", "set", "zadd", "hincrby"].map(|c| calls.get(c).copied()))
    };
    let before = writes(conn.clone()).await?;
    for n in 2..52 {
        assert_eq!(create_numbered(&app, n, taken).await?, 409);
    }
    assert_eq!(writes(conn.clone()).await?, before);
    assert_eq!(listed_and_live(conn).await?, (1, 1));
    Ok(())
}

/// Creates of one new id at once: one is created, the others 409, and those that lost it at
/// its `SET NX` (past the check of the id) take back their listing and their count, unless
/// the listing is the winner's own (found by review).
#[tokio::test]
async fn creates_racing_for_an_id_leave_one_listing_and_one_count() -> TestResult {
    let (app, _redis, conn) = app_on_redis().await?;
    // Six at once (`tokio::join!`: `futures_join_all` takes 'static futures, these borrow the
    // app), their answers sorted.
    let at_once = |id: B256, n: [u16; 6]| {
        let app = &app;
        async move {
            let got = tokio::join!(
                create_numbered(app, n[0], id),
                create_numbered(app, n[1], id),
                create_numbered(app, n[2], id),
                create_numbered(app, n[3], id),
                create_numbered(app, n[4], id),
                create_numbered(app, n[5], id)
            );
            let mut statuses = [got.0?, got.1?, got.2?, got.3?, got.4?, got.5?];
            statuses.sort_unstable();
            TestResult::Ok(statuses)
        }
    };
    let zrems = |mut conn: redis::aio::MultiplexedConnection| async move {
        let calls = crate::ledger::command_calls(&mut conn).await?;
        TestResult::Ok(calls.get("zrem").copied().unwrap_or(0))
    };
    let before = zrems(conn.clone()).await?;
    for round in 0..20u16 {
        let id = B256::left_padding_from(&(1000 + round).to_be_bytes());
        let n = 1000 + round * 10;
        let statuses = at_once(id, [n, n + 1, n + 2, n + 3, n + 4, n + 5]).await?;
        assert_eq!(statuses, [201, 409, 409, 409, 409, 409], "round {round}");
    }
    assert_eq!(listed_and_live(conn.clone()).await?, (20, 20));
    // (Losers got past the check of the id, so the path was taken.)
    assert!(zrems(conn.clone()).await? > before, "no create lost a race");
    // Six of one body: one account and end, and the same creation second unless the clock
    // turns between them (then the losers' members are others', taken back as above). A loser
    // whose member is the winner's own leaves it, listing the winner.
    let id = B256::repeat_byte(0x72);
    assert_eq!(at_once(id, [7; 6]).await?, [201, 409, 409, 409, 409, 409]);
    let conn_for_listing = conn.clone();
    assert_eq!(listed_and_live(conn).await?, (21, 21));
    let account = Address::left_padding_from(&7u16.to_be_bytes());
    // The account's first page, as the operator lists it: its sessions' ids.
    let listed = || async {
        let (status, page) = admin(
            &app,
            "GET",
            &format!("/admin/sessions?account={account}"),
            None,
            Some(ADMIN_TOKEN),
        )
        .await?;
        assert_eq!(status, 200, "{page}");
        let ids = page["sessions"]
            .as_array()
            .map(|s| s.iter().map(|g| g["sessionId"].clone()).collect::<Vec<_>>());
        TestResult::Ok(ids.unwrap_or_default())
    };
    assert_eq!(listed().await?, [json!(id)]);
    // A member of the winner's account and id with another end (a loser's that a failure left)
    // lists nothing: a listing matches a member's whole place, not only its creation time.
    let mut c = conn_for_listing;
    let bucket = [
        b"sp:ga:".as_slice(),
        &alloy::primitives::keccak256(account)[..2],
    ]
    .concat();
    let members: Vec<Vec<u8>> = redis::cmd("ZRANGE")
        .arg(&bucket)
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await?;
    let mut other_end = members
        .into_iter()
        .find(|m| m[..20] == account[..])
        .ok_or("the winner's member")?;
    other_end[27] ^= 1;
    let _: () = redis::cmd("ZADD")
        .arg(&bucket)
        .arg(0)
        .arg(other_end)
        .query_async(&mut c)
        .await?;
    assert_eq!(listed().await?, [json!(id)]);
    Ok(())
}

/// A create runs to its end in a task of its own: one cut off while Redis holds it (its client
/// gone, its deadline past) still stores the grant, counted and listed once, rather than
/// leaving a count or a listing without it (found by review).
#[tokio::test]
async fn a_create_cut_off_midway_still_runs_to_its_end() -> TestResult {
    let redis = TestRedis::start().await?;
    let store = redis_store(&redis, Duration::from_secs(5)).await?;
    // Redis holds writes (the count's script among them) for a second.
    let conn = pause_redis(&redis, 1000, "WRITE").await?;
    let g = grant(0x84, Address::repeat_byte(0x84), 10);
    let cut = tokio::time::timeout(Duration::from_millis(200), store.create(&g)).await;
    assert!(cut.is_err(), "cut off while Redis held it: {cut:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        store.get(g.session_id).await?.map(|s| s.session_id),
        Some(g.session_id)
    );
    assert_eq!(listed_and_live(conn).await?, (1, 1));
    Ok(())
}

#[tokio::test]
async fn a_policys_live_sessions_are_bounded_in_memory() -> TestResult {
    a_policys_live_sessions_are_bounded(None).await
}

#[tokio::test]
async fn a_policys_live_sessions_are_bounded_in_redis() -> TestResult {
    let redis = TestRedis::start().await?;
    a_policys_live_sessions_are_bounded(Some(&redis)).await
}
