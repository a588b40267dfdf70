//! The budget ledger: one suite against memory and a real Redis, then over HTTP: 200
//! concurrent sponsorships against a budget for K sign exactly K, on one instance and on two
//! sharing Redis; a repeated operation gets the same answer and reserves nothing more.

use std::collections::BTreeMap;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use serde_json::{Value, json};
use session_paymaster::ledger::memory::MemoryLedger;
use session_paymaster::ledger::redis::RedisLedger;
use session_paymaster::ledger::{Exhausted, Ledger, Outcome, Reservation, Scope};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;

use crate::helpers::{COUNTER, TempDir, TestApp, TestRedis, TestResult, config, counter_op};

const NOW: u64 = 1_800_000_000;

fn scope(name: &str, cost: Option<u64>, ops: Option<u64>) -> Scope {
    Scope {
        name: name.into(),
        rule: format!("p.budgets.{name}"),
        cost_limit: cost,
        ops_limit: ops,
        expires_at: NOW + 3600,
        resets_at: None,
    }
}

fn reservation(op: u8, cost: u64, scopes: Vec<Scope>) -> Reservation {
    Reservation {
        policy: "p".into(),
        op_key: B256::repeat_byte(op),
        cost_gwei: cost,
        scopes,
        payload: format!("answer-{op}"),
        user_op_hash: B256::repeat_byte(op ^ 0x80),
        valid_until: NOW + 600,
        expires_at: NOW + 4200,
    }
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
            resource: "cost".into(),
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
        Outcome::Existing("answer-1".into())
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
    assert!(
        ledger
            .settle(&all, B256::repeat_byte(10 ^ 0x80), 30)
            .await?
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
    assert!(
        !ledger
            .settle(&all, B256::repeat_byte(10 ^ 0x80), 30)
            .await?,
        "never twice"
    );
    assert!(
        !ledger.settle(&all, B256::repeat_byte(0x42), 1).await?,
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
    assert!(
        !ledger
            .settle(&all, B256::repeat_byte(11 ^ 0x80), 50)
            .await?,
        "a released op is closed"
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
    let conn =
        session_paymaster::session::redis::connect(&redis.url, Duration::from_secs(2)).await?;
    ledger_contract(Ledger::Redis(RedisLedger::new(conn))).await
}

#[tokio::test]
async fn redis_cluster_ledger_contract() -> TestResult {
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    let conn =
        session_paymaster::session::redis::connect(&cluster.url, Duration::from_secs(2)).await?;
    ledger_contract(Ledger::Redis(RedisLedger::new(conn))).await
}

/// The whole service on a 3-master Cluster: 200 concurrent sponsorships against a budget for
/// K sign exactly K.
#[tokio::test]
async fn concurrent_sponsorships_sign_exactly_the_budget_on_redis_cluster() -> TestResult {
    let cluster = crate::helpers::TestRedisCluster::start().await?;
    let dir = budget_dir()?;
    let mut c = config([Some(Address::repeat_byte(7)), None], KeySource::Ephemeral);
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(cluster.url.clone());
    let apps = vec![TestApp::spawn(c.clone()).await?, TestApp::spawn(c).await?];
    exactly_k_of_200(&apps).await
}

const K: u64 = 7;

fn budget_dir() -> TestResult<TempDir> {
    let dir = TempDir::new("budgets");
    std::fs::write(
        dir.0.join("budgeted.toml"),
        format!(
            "id = \"budgeted\"\nchains = [31337]\nentry_points = [\"0.7\"]\n\n[budgets]\npolicy = {{ ops = {K}, period = \"1d\" }}\n\n\
             [[allow]]\ntarget = \"{COUNTER}\"\nfunctions = [\"increment()\"]\n"
        ),
    )?;
    Ok(dir)
}

fn op_json(nonce: u64) -> Value {
    counter_op(Address::repeat_byte(0x11), nonce, "increment()").to_json()
}

async fn apps(n: usize, redis: Option<&TestRedis>, dir: &TempDir) -> TestResult<Vec<TestApp>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c = config([Some(Address::repeat_byte(7)), None], KeySource::Ephemeral);
        c.policies_dir = dir.0.clone();
        c.redis_url = redis.map(|r| r.url.clone());
        out.push(TestApp::spawn(c).await?);
    }
    Ok(out)
}

/// 200 distinct sponsorships at once against a budget of K operations.
async fn exactly_k_of_200(apps: &[TestApp]) -> TestResult {
    let tasks: Vec<_> = (0..200u64)
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
    assert_eq!((signed, exhausted), (K, 200 - K));
    let day = session_paymaster::app::unix_now() / 86_400;
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
    exactly_k_of_200(&apps(1, None, &dir).await?).await
}

#[tokio::test]
async fn concurrent_sponsorships_sign_exactly_the_budget_on_two_instances_sharing_redis()
-> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    exactly_k_of_200(&apps(2, Some(&redis), &dir).await?).await
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
    let day = session_paymaster::app::unix_now() / 86_400;
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

/// DESIGN §1: a sponsorship without a session costs Redis exactly one EVALSHA and nothing else.
/// Redis counts the commands a script runs too, so the expected counts are those of one
/// `reserve.lua` run per sponsorship (one budget scope); a client command anywhere would add to them.
#[tokio::test]
async fn a_sponsorship_is_one_evalsha() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budget_dir()?;
    let apps = apps(1, Some(&redis), &dir).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    // The first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA); later calls do not.
    apps[0]
        .result("pm_sponsorUserOperation", json!([op_json(999), ep]))
        .await?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let parse = |info: &str| -> BTreeMap<String, u64> {
        info.lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter_map(|l| {
                let (cmd, rest) = l.split_once(':')?;
                Some((
                    cmd.to_owned(),
                    rest.split("calls=")
                        .nth(1)?
                        .split(',')
                        .next()?
                        .parse()
                        .ok()?,
                ))
            })
            .filter(|(cmd, _)| cmd != "info")
            .collect()
    };
    let before = parse(
        &redis::cmd("INFO")
            .arg("commandstats")
            .query_async::<String>(&mut conn)
            .await?,
    );
    for i in 0..5 {
        apps[0]
            .result("pm_sponsorUserOperation", json!([op_json(1000 + i), ep]))
            .await?;
    }
    let after = parse(
        &redis::cmd("INFO")
            .arg("commandstats")
            .query_async::<String>(&mut conn)
            .await?,
    );
    let delta: BTreeMap<&str, u64> = after
        .iter()
        .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    // Per run of reserve.lua with one scope: HGET record, HGET cost+ops, HINCRBY cost, open
    // and ops, EXPIRE scope, HSET record, EXPIRE record, ZADD open, SET index.
    let expected = BTreeMap::from([
        ("evalsha", 5),
        ("hget", 15),
        ("hincrby", 15),
        ("expire", 10),
        ("hset", 5),
        ("zadd", 5),
        ("set", 5),
    ]);
    assert_eq!(delta, expected, "Redis commands for 5 sponsorships");
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
    let scope = format!("policy:{}", session_paymaster::app::unix_now() / 86_400);
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
    let now = session_paymaster::app::unix_now();
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
    assert_eq!(
        budgets[0]["scope"],
        json!(format!("session:{}", session.as_str().ok_or("id")?))
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
    assert!(
        text.contains(&format!(
            "sp_budget_remaining{{policy=\"budgeted\",resource=\"ops\"}} {}",
            K - 2
        )),
        "{text}"
    );
    Ok(())
}
