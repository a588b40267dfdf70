//! Faults: the service killed outright mid-burst, the chain RPC down then back, a Redis Cluster
//! master killed then back. Money paths fail closed meanwhile, nothing is signed without its
//! reservation, and everything recovers without restarting the service. (A Redis restart from
//! its append-only file is `ledger::redis_restart_with_aof_keeps_budgets_and_fails_closed_meanwhile`.)

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::providers::{Provider, ProviderBuilder};
use serde_json::{Value, json};
use session_paymaster::chain::watcher::{Cursor, Finality, Watcher};
use session_paymaster::userop::EntryPointVersion;

use crate::helpers::{KillOnDrop, TempDir, TestRedis, TestResult, counter_op, counter_policy_dir};

fn budgeted_dir() -> TestResult<TempDir> {
    counter_policy_dir("faults", "budgeted", 100_000)
}

/// The real binary, killed outright on drop (or by `child.kill()`).
struct Service {
    child: KillOnDrop,
    url: String,
}

/// The real binary on Redis, serving `dir`; its log goes to `dir/serve.log`.
async fn serve(dir: &TempDir, redis: &str, key_file: &std::path::Path) -> TestResult<Service> {
    let port = crate::helpers::free_port();
    let log = dir.0.join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--policies")
        .arg(&dir.0)
        .args(["--redis-url", redis, "--no-settlement"])
        .arg("--signer-key-file")
        .arg(key_file)
        .args([
            "--paymaster-v07",
            "0x0707070707070707070707070707070707070707",
        ])
        .env_remove("SP_RPC_URL")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut service = Service {
        child: KillOnDrop(child),
        url: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(format!("{}/healthz", service.url))
        .await
        .is_err()
    {
        if Instant::now() > deadline || service.child.0.try_wait()?.is_some() {
            return Err(format!(
                "service did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(service)
}

fn sponsor_body(nonce: u64) -> Value {
    let ep = EntryPointVersion::V0_7.canonical_address();
    json!({ "jsonrpc": "2.0", "id": nonce, "method": "pm_sponsorUserOperation",
        "params": [counter_op(Address::repeat_byte(0x11), nonce, "increment()").to_json(), ep] })
}

/// `kill -9` in the middle of a burst: every answer a client got is backed by its reservation
/// (a re-send to the restarted service gets the very same answer, and counts nothing more), and
/// the budget counts exactly the operations that were reserved.
#[tokio::test]
async fn kill_9_mid_burst_leaves_no_signature_without_its_reservation() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = budgeted_dir()?;
    let keys = TempDir::new("faults-key");
    let key_file = keys.0.join("signer.key");
    session_paymaster::signer::keygen(&key_file)?;
    let mut service = serve(&dir, &redis.url, &key_file).await?;
    let url = service.url.clone();

    let client = reqwest::Client::new();
    let signed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..300u64)
        .map(|n| {
            let (client, url, signed) = (client.clone(), url.clone(), signed.clone());
            tokio::spawn(async move {
                let resp = client.post(&url).json(&sponsor_body(n)).send().await.ok()?;
                let v: Value = resp.json().await.ok()?;
                let data = v["result"]["paymasterData"].as_str()?.to_owned();
                signed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((n, data));
                Some(())
            })
        })
        .collect();
    // Kill once some answers are back: the rest are in flight or not yet sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while signed.lock().map(|s| s.len()).unwrap_or(0) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    service.child.kill()?;
    for t in tasks {
        let _ = t.await;
    }
    let signed = signed.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(
        signed.len() >= 20 && signed.len() < 300,
        "{} signed",
        signed.len()
    );

    let service = serve(&dir, &redis.url, &key_file).await?;
    let url = service.url.clone();
    let conn =
        session_paymaster::session::redis::connect(&redis.url, Duration::from_secs(2)).await?;
    let ledger = session_paymaster::ledger::Ledger::Redis(
        session_paymaster::ledger::redis::RedisLedger::new(conn),
    );
    let scope = crate::helpers::policy_day_scope();
    let (_, reserved) = ledger.usage("budgeted", &scope).await?;
    assert!(
        reserved >= signed.len() as u64,
        "{reserved} reserved for {} signed",
        signed.len()
    );
    for (n, data) in &signed {
        let v: Value = client
            .post(&url)
            .json(&sponsor_body(*n))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(v["result"]["paymasterData"], json!(data), "op {n}: {v}");
    }
    assert_eq!(
        ledger.usage("budgeted", &scope).await?.1,
        reserved,
        "re-sends counted nothing more"
    );
    Ok(())
}

/// The chain RPC goes away for a while: sponsorship goes on (reservations at their worst case),
/// and once it is back the watcher catches up and settles what landed meanwhile.
#[tokio::test]
async fn the_watcher_catches_up_after_a_chain_rpc_outage() -> TestResult {
    use crate::e2e::User;

    let redis = TestRedis::start().await?;
    let stack = crate::helpers::Stack::start_with(None, Some(redis.url.clone())).await?;
    // The chain RPC the watcher uses, behind a switch.
    let proxy = crate::helpers::RpcProxy::start(stack.anvil.url.clone()).await?;
    let up = proxy.up.clone();
    let sponsor = &stack.app.state.sponsor;
    let provider = ProviderBuilder::new()
        .connect_http(proxy.url.parse()?)
        .erased();
    let watcher = Watcher::new(provider, sponsor.chain(31337)?, 0, None, Cursor::memory())
        .with_finality(Finality::Depth(0));
    watcher.poll_once(sponsor).await?;

    up.store(false, Ordering::Relaxed);
    assert!(
        watcher.poll_once(sponsor).await.is_err(),
        "the chain RPC is down"
    );
    // Meanwhile an operation is sponsored (no chain needed) and lands.
    let user = User::new(&stack, EntryPointVersion::V0_7).await?;
    user.submit(&user.sponsored(user.op_json()).await?).await?;
    assert!(watcher.poll_once(sponsor).await.is_err());

    up.store(true, Ordering::Relaxed);
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!(poll.settled, 1, "caught up: {poll:?}");
    Ok(())
}

/// A Redis Cluster master dies: requests whose keys it holds fail closed (nothing signed),
/// and when it is back the same service serves them again, budgets intact (append-only file).
#[tokio::test]
async fn a_cluster_master_killed_fails_closed_then_recovers() -> TestResult {
    let mut cluster = crate::helpers::TestRedisCluster::start_persistent().await?;
    let dir = budgeted_dir()?;
    let mut c = crate::helpers::config(
        [Some(Address::repeat_byte(7)), None, None],
        session_paymaster::signer::KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(cluster.url.clone());
    let app = crate::helpers::TestApp::spawn(c).await?;
    let sponsor = |n: u64| {
        let app = &app;
        async move {
            let (_, v) = app.post(&sponsor_body(n).to_string()).await?;
            Ok::<Value, Box<dyn std::error::Error + Send + Sync>>(v)
        }
    };
    assert!(sponsor(0).await?["result"]["paymasterData"].is_string());
    // Every key of a policy shares its {policy} hash tag: the node serving one serves all.
    let owner = cluster.owner_of("sp:{budgeted}:x")?;
    cluster.kill(owner)?;
    let v = sponsor(1).await?;
    assert_eq!(v["error"]["code"], json!(-32004), "fails closed: {v}");
    assert!(v.get("result").is_none());

    cluster.restart(owner).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let v = sponsor(2).await?;
        if v["result"].is_object() || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(v["result"]["paymasterData"].is_string(), "recovered: {v}");
    let scope = crate::helpers::policy_day_scope();
    assert_eq!(
        app.state
            .sponsor
            .ledger()
            .usage("budgeted", &scope)
            .await?
            .1,
        2,
        "the op before the failure, and the one after"
    );
    Ok(())
}
