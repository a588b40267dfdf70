//! Policy sets at run time: edits to the directory reload (embedded default), replicas follow
//! the set published in Redis, and a set with errors never replaces the working one.

use alloy::primitives::Address;
use serde_json::{Value, json};
use session_paymaster::policy::file::{load_sources, read_dir_sources};
use session_paymaster::policy::publish;
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;

use crate::helpers::{
    ADMIN_TOKEN, TempDir, TestApp, TestRedis, TestResult, config, counter_op, repo_dir,
};
use crate::sessions::admin;

/// A private copy of the shipped policies.
fn policy_dir() -> TestResult<TempDir> {
    let dir = TempDir::new("policies");
    for entry in std::fs::read_dir(repo_dir().join("policies"))? {
        let path = entry?.path();
        std::fs::copy(&path, dir.0.join(path.file_name().ok_or("name")?))?;
    }
    Ok(dir)
}

fn edit(dir: &TempDir, file: &str, from: &str, to: &str) -> TestResult {
    let path = dir.0.join(file);
    let text = std::fs::read_to_string(&path)?;
    assert!(text.contains(from), "{from} in {file}");
    std::fs::write(&path, text.replace(from, to))?;
    Ok(())
}

async fn app(dir: &TempDir, redis: Option<&TestRedis>) -> TestResult<TestApp> {
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    c.redis_url = redis.map(|r| r.url.clone());
    TestApp::spawn(c).await
}

/// The rejection reason for a call of `func` on the Counter, or "" when sponsored.
async fn outcome(app: &TestApp, func: &str) -> TestResult<String> {
    let op = counter_op(Address::repeat_byte(0x11), 0, func);
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
        "params": [op.to_json(), EntryPointVersion::V0_7.canonical_address()]
    });
    let v = app.post(&body.to_string()).await?.1;
    Ok(v["error"]["data"]["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned())
}

async fn readyz(app: &TestApp) -> TestResult<(u16, Value)> {
    let resp = reqwest::get(format!("{}/readyz", app.url)).await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

#[tokio::test]
async fn directory_edits_reload_and_a_broken_set_never_replaces_the_working_one() -> TestResult {
    let dir = policy_dir()?;
    let app = app(&dir, None).await?;
    assert_eq!(outcome(&app, "increment()").await?, "");
    let v1 = app.state.sponsor.policies().version();

    edit(
        &dir,
        "dev-counter.toml",
        "functions = [\"increment()\"]",
        "functions = [\"reset()\"]",
    )?;
    app.state.refresh_policies().await;
    assert_eq!(outcome(&app, "increment()").await?, "function_not_allowed");
    assert_eq!(outcome(&app, "reset()").await?, "");
    let v2 = app.state.sponsor.policies().version();
    assert_ne!(v1, v2);

    // A typo in any file: the whole new set is refused, the working set stays. /readyz (which
    // asks for no credential) says that a set was refused; the admin API says why.
    edit(&dir, "game-moves.toml", "max_validity", "max_validty")?;
    app.state.refresh_policies().await;
    assert_eq!(app.state.sponsor.policies().version(), v2);
    assert_eq!(outcome(&app, "reset()").await?, "");
    let (status, ready) = readyz(&app).await?;
    assert_eq!(status, 200, "the working set still serves");
    assert_eq!(ready["policies"]["refusedSet"], json!(true), "{ready}");
    let text = ready.to_string();
    for secret in ["max_validty", "game-moves", "dev-counter"] {
        assert!(!text.contains(secret), "/readyz shows `{secret}`: {ready}");
    }
    let (status, set) = admin(&app, "GET", "/admin/policies", None, Some(ADMIN_TOKEN)).await?;
    assert_eq!(status, 200, "{set}");
    assert!(
        set["refusedErrors"]
            .as_str()
            .is_some_and(|e| e.contains("max_validty")),
        "{set}"
    );
    assert_eq!(set["version"], json!(v2));
    assert!(
        set["ids"]
            .as_array()
            .is_some_and(|ids| ids.contains(&json!("game-moves"))),
        "{set}"
    );
    for token in [None, Some("wrong")] {
        let (status, _) = admin(&app, "GET", "/admin/policies", None, token).await?;
        assert_eq!(status, 401);
    }

    edit(&dir, "game-moves.toml", "max_validty", "max_validity")?;
    app.state.refresh_policies().await;
    let (_, ready) = readyz(&app).await?;
    assert_eq!(ready["policies"]["refusedSet"], json!(false));
    assert_eq!(
        ready["paymastersNoted"],
        json!({ "31337": true }),
        "{ready}"
    );
    let (_, set) = admin(&app, "GET", "/admin/policies", None, Some(ADMIN_TOKEN)).await?;
    assert_eq!(set["refusedErrors"], Value::Null, "{set}");
    assert_eq!(
        ready["policies"]["version"],
        json!(app.state.sponsor.policies().version())
    );
    Ok(())
}

#[tokio::test]
async fn replicas_follow_the_set_published_in_redis() -> TestResult {
    let redis = TestRedis::start().await?;
    let (dir_a, dir_b) = (policy_dir()?, policy_dir()?);
    let a = app(&dir_a, Some(&redis)).await?;
    assert_eq!(outcome(&a, "increment()").await?, "");

    // Replica b starts with an edited (older, say) directory: measured before, it published
    // that set and the whole cluster reverted to it within seconds. It now serves the
    // published set and says its directory differs.
    edit(
        &dir_b,
        "dev-counter.toml",
        "functions = [\"increment()\"]",
        "functions = [\"reset()\"]",
    )?;
    let b = app(&dir_b, Some(&redis)).await?;
    a.state.refresh_policies().await;
    assert_eq!(
        a.state.sponsor.policies().version(),
        b.state.sponsor.policies().version()
    );
    assert_eq!(outcome(&a, "increment()").await?, "", "nothing reverted");
    assert_eq!(
        outcome(&b, "increment()").await?,
        "",
        "b serves the published set"
    );
    let (_, ready) = readyz(&b).await?;
    assert_eq!(
        ready["policies"]["directoryDiffers"],
        json!(true),
        "{ready}"
    );
    assert_eq!(
        readyz(&a).await?.1["policies"]["directoryDiffers"],
        json!(false)
    );
    let metrics = reqwest::get(format!("{}/metrics", b.url))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("sp_policy_directory_differs 1"),
        "{metrics}"
    );

    // Told to (`--publish-policies`), a replica publishes its directory; every replica follows.
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir_b.0.clone();
    c.redis_url = Some(redis.url.clone());
    c.publish_policies = true;
    let b = TestApp::spawn(c).await?;
    a.state.refresh_policies().await;
    assert_eq!(
        a.state.sponsor.policies().version(),
        b.state.sponsor.policies().version()
    );
    assert_eq!(outcome(&a, "increment()").await?, "function_not_allowed");

    // A published set that does not load (written by hand, bypassing `policies push`) is
    // refused by every replica, which keep serving the working set.
    let mut broken = read_dir_sources(&dir_b.0).map_err(|e| format!("{e:?}"))?;
    broken[0].1.push_str("\nnot_a_key = 1\n");
    let conn =
        session_paymaster::session::redis::connect(&redis.url, std::time::Duration::from_secs(2))
            .await?;
    publish::push(&conn, alloy::primitives::B256::repeat_byte(9), &broken).await?;
    a.state.refresh_policies().await;
    assert_eq!(
        a.state.sponsor.policies().version(),
        b.state.sponsor.policies().version()
    );
    assert_eq!(readyz(&a).await?.1["policies"]["refusedSet"], json!(true));

    // `policies push` of a valid set switches every replica.
    let sources = read_dir_sources(&dir_a.0).map_err(|e| format!("{e:?}"))?;
    let set = load_sources(&dir_a.0, sources.clone()).map_err(|e| format!("{e:?}"))?;
    publish::push(&conn, set.version(), &sources).await?;
    for replica in [&a, &b] {
        replica.state.refresh_policies().await;
        assert_eq!(replica.state.sponsor.policies().version(), set.version());
        assert_eq!(outcome(replica, "increment()").await?, "");
    }

    drop(redis);
    let (status, ready) = readyz(&a).await?;
    assert_eq!(status, 503, "{ready}");
    // Only that: Redis' error (its address, the connection refused) is for the log.
    assert_eq!(ready["redis"], json!("unreachable"), "{ready}");
    // So is it in an explanation, which needs the session's grant from Redis: the error every
    // method answers a store failure with (it was the explanation's `error`, Redis' text).
    let op = counter_op(Address::repeat_byte(0x11), 0, "increment()");
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "pm_explainSponsorship",
        "params": [op.to_json(), EntryPointVersion::V0_7.canonical_address(),
                   { "sessionId": format!("{}", alloy::primitives::B256::repeat_byte(0x5e)) }]
    });
    let v = a.post(&body.to_string()).await?.1;
    assert_eq!(v["error"]["code"], json!(-32004), "{v}");
    assert_eq!(
        v["error"]["data"]["reason"],
        json!("store_unavailable"),
        "{v}"
    );
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    Ok(())
}

/// A replica notes the policies of its set as served in Redis before it serves them, at start
/// and when a published set comes into force, so that every replica's watcher settles their
/// reservations, also one whose own set lacks them
/// (`watcher::a_policy_not_served_here_still_settles_on_redis`).
#[tokio::test]
async fn replicas_note_the_policies_they_serve_before_serving_them() -> TestResult {
    use session_paymaster::ledger::redis::SERVED_POLICIES_KEY;

    let redis = TestRedis::start().await?;
    let dir = policy_dir()?;
    let a = app(&dir, Some(&redis)).await?;
    let mut conn =
        session_paymaster::session::redis::connect(&redis.url, std::time::Duration::from_secs(2))
            .await?;
    let served = |conn: &mut session_paymaster::session::redis::RedisConn| {
        let mut conn = conn.clone();
        async move {
            let mut ids: Vec<String> =
                redis::AsyncCommands::zrange(&mut conn, SERVED_POLICIES_KEY, 0, -1).await?;
            ids.sort();
            TestResult::Ok(ids)
        }
    };
    let mut ids: Vec<String> = a
        .state
        .sponsor
        .policies()
        .iter()
        .map(|p| p.id.clone())
        .collect();
    ids.sort();
    assert!(ids.contains(&"dev-counter".to_owned()));
    assert_eq!(served(&mut conn).await?, ids, "at start");

    // A set with one more policy, published: noted when it comes into force here.
    edit(
        &dir,
        "dev-counter.toml",
        "id = \"dev-counter\"",
        "id = \"dev-counter-2\"",
    )?;
    std::fs::copy(
        repo_dir().join("policies/dev-counter.toml"),
        dir.0.join("dev-counter-1.toml"),
    )?;
    let sources = read_dir_sources(&dir.0).map_err(|e| format!("{e:?}"))?;
    let set = load_sources(&dir.0, sources.clone()).map_err(|e| format!("{e:?}"))?;
    publish::push(&conn, set.version(), &sources).await?;
    a.state.refresh_policies().await;
    assert_eq!(a.state.sponsor.policies().version(), set.version());
    ids.push("dev-counter-2".to_owned());
    ids.sort();
    assert_eq!(served(&mut conn).await?, ids, "the new set's");
    Ok(())
}
