//! API keys: required when configured (Bearer header or `?apikey=`), limited to their policies,
//! created by `apikey new`; keyless mode refuses to serve anywhere but loopback.

use std::process::Command;

use alloy::primitives::Address;
use serde_json::{Value, json};
use session_paymaster::apikey::ApiKey;
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;

use crate::helpers::{TestApp, TestResult, config, counter_op};

/// `apikey new`, run as an operator would; returns (key, config value).
fn new_key(name: &str, policies: &str) -> TestResult<(String, String)> {
    let mut args = vec!["apikey", "new", "--name", name];
    if !policies.is_empty() {
        args.extend(["--policies", policies]);
    }
    credential(&args, "--api-key ")
}

/// `admin-token --name --policies`, run as an operator would; returns (token, config value).
fn new_admin_key(name: &str, policies: &str) -> TestResult<(String, String)> {
    credential(
        &["admin-token", "--name", name, "--policies", policies],
        "--admin-key ",
    )
}

/// The credential a command prints (its second line) and its config value (the fourth, after
/// `flag`).
fn credential(args: &[&str], flag: &str) -> TestResult<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(args)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    let secret = lines.get(1).ok_or("credential line")?.to_string();
    let config = lines
        .get(3)
        .and_then(|l| l.strip_prefix(flag))
        .ok_or("config line")?
        .to_string();
    Ok((secret, config))
}

fn op_json() -> Value {
    counter_op(Address::repeat_byte(0x11), 0, "increment()").to_json()
}

async fn post(url: &str, bearer: Option<&str>, body: &Value) -> TestResult<(u16, Value)> {
    let mut req = reqwest::Client::new().post(url).json(body);
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let resp = req.send().await?;
    Ok((resp.status().as_u16(), resp.json().await?))
}

#[tokio::test]
async fn keys_are_required_and_limited_to_their_policies() -> TestResult {
    let (shop_key, shop_cfg) = new_key("shop", "dev-counter")?;
    let (ops_key, ops_cfg) = new_key("ops", "")?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.api_keys = vec![shop_cfg.parse::<ApiKey>()?, ops_cfg.parse::<ApiKey>()?];
    let app = TestApp::spawn(c).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    let sponsor = |ctx: Value| json!({ "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation", "params": [op_json(), ep, ctx] });

    for bearer in [None, Some("sp_wrong"), Some("")] {
        let (status, v) = post(&app.url, bearer, &sponsor(Value::Null)).await?;
        assert_eq!(
            (status, v["error"]["code"].clone()),
            (401, json!(-32005)),
            "{v}"
        );
        assert!(v.get("result").is_none());
    }
    let batch = json!([sponsor(Value::Null), sponsor(Value::Null)]);
    assert_eq!(
        post(&app.url, None, &batch).await?.0,
        401,
        "a batch without a key is refused whole"
    );

    let (status, v) = post(&app.url, Some(&shop_key), &sponsor(Value::Null)).await?;
    assert_eq!(status, 200);
    assert!(v["result"]["paymasterData"].is_string(), "{v}");
    let (_, v) = post(
        &format!("{}/?apikey={ops_key}", app.url),
        None,
        &sponsor(Value::Null),
    )
    .await?;
    assert!(
        v["result"]["paymasterData"].is_string(),
        "viem's http transport puts the key in the URL: {v}"
    );

    // The shop key may use dev-counter only.
    let (_, v) = post(
        &app.url,
        Some(&shop_key),
        &sponsor(json!({ "sponsorshipPolicyId": "game-moves" })),
    )
    .await?;
    assert_eq!(
        v["error"]["data"]["reason"],
        json!("policy_not_allowed"),
        "{v}"
    );
    let (_, v) = post(
        &app.url,
        Some(&ops_key),
        &sponsor(json!({ "sponsorshipPolicyId": "game-moves" })),
    )
    .await?;
    assert_eq!(
        v["error"]["data"]["reason"],
        json!("session_required"),
        "an unrestricted key reaches the policy: {v}"
    );
    Ok(())
}

#[tokio::test]
async fn keyless_mode_refuses_to_listen_beyond_loopback() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args(["serve", "--listen", "0.0.0.0:0", "--policies"])
        .arg(crate::helpers::repo_dir().join("policies"))
        .env_remove("SP_API_KEYS")
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no API key configured"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A key limited to some policies reads and uses nothing of the others: another tenant's
/// session is no session to it (status, sponsorship, explanation), and neither explain nor
/// validate shows another policy's rules.
#[tokio::test]
async fn a_key_reads_nothing_of_other_tenants() -> TestResult {
    use crate::sessions::{create_session, grant_request};

    let (shop_key, shop_cfg) = new_key("shop", "dev-counter")?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.api_keys = vec![shop_cfg.parse::<ApiKey>()?];
    let app = TestApp::spawn(c).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    let account = Address::repeat_byte(0x11);
    let session = create_session(
        &app,
        grant_request(account, Address::repeat_byte(0x12), "game-moves"),
    )
    .await?;
    let call = |method: &str, params: Value| json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });

    let (_, v) = post(
        &app.url,
        Some(&shop_key),
        &call("pm_getSessionStatus", json!([session])),
    )
    .await?;
    assert_eq!(
        v["error"]["data"]["reason"],
        json!("session_not_found"),
        "{v}"
    );
    assert!(v.get("result").is_none(), "{v}");
    for method in ["pm_sponsorUserOperation", "pm_explainSponsorship"] {
        let (_, v) = post(
            &app.url,
            Some(&shop_key),
            &call(method, json!([op_json(), ep, { "sessionId": session }])),
        )
        .await?;
        let text = v.to_string();
        assert!(text.contains("session_not_found"), "{method}: {v}");
        assert!(
            !text.contains("game-moves"),
            "{method} names the other tenant's policy: {v}"
        );
    }
    let (_, v) = post(
        &app.url,
        Some(&shop_key),
        &call(
            "pm_explainSponsorship",
            json!([op_json(), ep, { "sponsorshipPolicyId": "game-moves" }]),
        ),
    )
    .await?;
    assert_eq!(
        v["result"]["rejection"]["reason"],
        json!("policy_not_allowed"),
        "{v}"
    );
    assert_eq!(
        v["result"]["checks"],
        json!([]),
        "no rule of another policy shown: {v}"
    );
    let (_, v) = post(
        &app.url,
        Some(&shop_key),
        &call(
            "pm_validateSponsorshipPolicies",
            json!([op_json(), ep, ["game-moves", "dev-counter"]]),
        ),
    )
    .await?;
    assert_eq!(v["result"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["result"][0]["sponsorshipPolicyId"], json!("dev-counter"));

    // Whether another tenant's policy id exists is not this key's to learn: a loaded policy it
    // may not use and an id nothing loads get the same refusal, in sponsorship and explanation.
    let ids = ["game-moves", "no-such-policy"];
    for method in ["pm_sponsorUserOperation", "pm_explainSponsorship"] {
        let mut answers = Vec::new();
        for id in ids {
            let (status, v) = post(
                &app.url,
                Some(&shop_key),
                &call(
                    method,
                    json!([op_json(), ep, { "sponsorshipPolicyId": id }]),
                ),
            )
            .await?;
            // The id is the client's own, echoed; the rest must not tell the two apart.
            answers.push((status, v.to_string().replace(id, "<id>")));
        }
        assert!(
            answers[0].1.contains("policy_not_allowed"),
            "{method}: {answers:?}"
        );
        assert_eq!(answers[0], answers[1], "{method}");
    }
    Ok(())
}

/// `pm_validateSponsorshipPolicies` runs one full check per id: the list is capped, and every id
/// it runs counts against the key's rate as a call would. An id named again, or one that
/// could not answer (unknown, or not the key's), is not run: it cost a full check before.
#[tokio::test]
async fn validating_many_policies_costs_as_many_calls() -> TestResult {
    use session_paymaster::policy::Rate;

    let (key, cfg) = new_key("shop", "")?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.api_keys = vec![cfg.parse::<ApiKey>()?];
    c.rate_per_key = Some(Rate {
        count: 5,
        per: std::time::Duration::from_secs(3600),
    });
    let app = TestApp::spawn(c).await?;
    let ep = EntryPointVersion::V0_7.canonical_address();
    let validate = |ids: Vec<String>| json!({ "jsonrpc": "2.0", "id": 1, "method": "pm_validateSponsorshipPolicies", "params": [op_json(), ep, ids] });
    let (_, v) = post(
        &app.url,
        Some(&key),
        &validate(vec!["dev-counter".into(); 21]),
    )
    .await?;
    assert_eq!(
        (
            v["error"]["code"].clone(),
            v["error"]["data"]["field"].clone()
        ),
        (json!(-32602), json!("sponsorshipPolicyIds")),
        "{v}"
    );
    // Three run (four of five), of six named.
    let ids = [
        "dev-counter",
        "dev-counter",
        "no-such-policy",
        "game-moves",
        "dev-counter",
        "mint-campaign",
    ];
    let (_, v) = post(
        &app.url,
        Some(&key),
        &validate(ids.iter().map(|s| s.to_string()).collect()),
    )
    .await?;
    assert_eq!(
        v["result"],
        json!([{
            "sponsorshipPolicyId": "dev-counter",
            "data": v["result"][0]["data"].clone()
        }]),
        "once, the one that sponsors: {v}"
    );
    let (_, v) = post(
        &app.url,
        Some(&key),
        &validate(vec!["usdc-allowance".into()]),
    )
    .await?;
    assert_eq!(v["result"], json!([]), "five of five: {v}");
    let (status, v) = post(&app.url, Some(&key), &validate(vec!["dev-counter".into()])).await?;
    assert_eq!(
        (status, v["error"]["data"]["reason"].clone()),
        (429, json!("rate_limited")),
        "{v}"
    );
    Ok(())
}

/// A tenant's admin key had no bound on the grants it created under a policy without
/// `max_sessions`: one tenant could fill Redis, and a full Redis refuses every tenant's
/// reservations. There it meets `--tenant-default-max-sessions` (two here), counted over the
/// policy's live grants, the operator's too; the operator's token does not; and a policy's own
/// `max_sessions` holds the tenant instead, below the default (1) or above it (3).
#[tokio::test]
async fn a_tenants_sessions_are_bounded_where_its_policy_sets_no_bound() -> TestResult {
    use crate::helpers::{ADMIN_TOKEN, session_policy};
    use crate::sessions::{admin, grant_request};
    let dir = crate::helpers::TempDir::new("tenant-default-max-sessions");
    for (id, bound) in [("open", None), ("one", Some(1)), ("few", Some(3))] {
        std::fs::write(dir.0.join(format!("{id}.toml")), session_policy(id, bound))?;
    }
    let (shop, shop_cfg) = new_admin_key("shop", "open,one,few")?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    c.admin_keys = vec![shop_cfg.parse::<ApiKey>()?];
    c.tenant_default_max_sessions = std::num::NonZeroU64::new(2);
    let app = TestApp::spawn(c).await?;
    let post = |n: u8, policy: &'static str, token: &str| {
        let (app, token) = (&app, token.to_owned());
        async move {
            let body = grant_request(Address::repeat_byte(n), Address::repeat_byte(0xb2), policy);
            admin(app, "POST", "/admin/sessions", Some(body), Some(&token)).await
        }
    };
    let shop = shop.as_str();
    // The operator's grant counts against the tenant's room; the operator is held by nothing.
    let mut open = vec![post(1, "open", ADMIN_TOKEN).await?.0];
    open.push(post(2, "open", shop).await?.0);
    let (status, full) = post(3, "open", shop).await?;
    open.push(status);
    open.push(post(4, "open", ADMIN_TOKEN).await?.0);
    assert_eq!(open, [201, 201, 429, 201]);
    let error = full["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("has 2 live sessions")
            && error.contains("only below 2 (the operator's --tenant-default-max-sessions"),
        "{full}"
    );
    // A policy's own max_sessions holds the tenant instead of the default (2): 1, then 3.
    let mut own = Vec::new();
    for (n, policy) in [
        (11, "one"),
        (12, "one"),
        (21, "few"),
        (22, "few"),
        (23, "few"),
    ] {
        own.push(post(n, policy, shop).await?.0);
    }
    let (status, full) = post(24, "few", shop).await?;
    own.push(status);
    assert_eq!(own, [201, 429, 201, 201, 201, 429]);
    let error = full["error"].as_str().unwrap_or_default();
    assert!(error.contains("its max_sessions is 3"), "{full}");
    Ok(())
}

/// The admin API had one token for every policy, and the docs send each dapp backend to it to
/// create its sessions: one tenant could read, list and revoke another's sessions, and read
/// every policy id and file error (found by review). A tenant's admin key reaches the sessions
/// of its policies only: another's session is no session, another's policy no policy, and the
/// policy set's status is the operator's.
#[tokio::test]
async fn a_tenants_admin_key_reaches_only_its_policies_sessions() -> TestResult {
    use crate::helpers::ADMIN_TOKEN;
    use crate::sessions::{admin, grant_request};
    let key_address = || Address::repeat_byte(0xb3);

    let (games, games_cfg) = new_admin_key("games", "game-moves")?;
    let (shop, shop_cfg) = new_admin_key("shop", "dev-counter")?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.admin_keys = vec![games_cfg.parse::<ApiKey>()?, shop_cfg.parse::<ApiKey>()?];
    let app = TestApp::spawn(c).await?;
    let (account, key) = (Address::repeat_byte(0xa1), Address::repeat_byte(0xb2));

    // Each creates under its own policy only; another's reads as unknown.
    let (status, v) = admin(
        &app,
        "POST",
        "/admin/sessions",
        Some(grant_request(account, key, "game-moves")),
        Some(&games),
    )
    .await?;
    assert_eq!(status, 201, "{v}");
    let id = v["sessionId"].as_str().ok_or("sessionId")?.to_string();
    let mut refusals = Vec::new();
    for policy in ["game-moves", "no-such-policy"] {
        let (status, v) = admin(
            &app,
            "POST",
            "/admin/sessions",
            Some(grant_request(account, key, policy)),
            Some(&shop),
        )
        .await?;
        refusals.push((status, v.to_string().replace(policy, "<id>")));
    }
    assert_eq!(refusals[0].0, 400, "{refusals:?}");
    assert_eq!(refusals[0], refusals[1], "another's policy is no policy");

    // The other tenant: no such session, in reading, revoking and listing.
    let path = format!("/admin/sessions/{id}");
    let unknown = format!("/admin/sessions/0x{}", "ee".repeat(32));
    for method in ["GET", "DELETE"] {
        let (status, v) = admin(&app, method, &path, None, Some(&shop)).await?;
        let (_, none) = admin(&app, method, &unknown, None, Some(&shop)).await?;
        assert_eq!(status, 404, "{method}: {v}");
        assert_eq!(
            v.to_string().replace(&id, "<id>"),
            none.to_string()
                .replace(&format!("0x{}", "ee".repeat(32)), "<id>"),
            "{method}"
        );
    }
    let listing = format!("/admin/sessions?account={account}");
    let (_, v) = admin(&app, "GET", &listing, None, Some(&shop)).await?;
    assert_eq!(v["sessions"], json!([]), "{v}");
    let (_, v) = admin(&app, "GET", &path, None, Some(ADMIN_TOKEN)).await?;
    assert_eq!(
        v["status"],
        json!("active"),
        "not revoked by the other: {v}"
    );

    // The policy set's status is every tenant's: the operator's only.
    let (status, _) = admin(&app, "GET", "/admin/policies", None, Some(&shop)).await?;
    assert_eq!(status, 403);
    let (status, _) = admin(&app, "GET", "/admin/policies", None, Some(ADMIN_TOKEN)).await?;
    assert_eq!(status, 200);

    // Listings page through both tenants' grants of the account: each sees its own, and no
    // cursor names the other's (a cursor is a grant's place: its times and id).
    let create = |key: String, policy: &'static str| {
        let app = &app;
        async move {
            let body = grant_request(account, key_address(), policy);
            let (status, v) = admin(app, "POST", "/admin/sessions", Some(body), Some(&key)).await?;
            assert_eq!(status, 201, "{v}");
            TestResult::Ok(v["sessionId"].as_str().ok_or("sessionId")?.to_string())
        }
    };
    let theirs = create(shop.clone(), "dev-counter").await?;
    let second = create(games.clone(), "game-moves").await?;
    let walk = |key: String| {
        let (app, listing) = (&app, listing.clone());
        async move {
            let (mut ids, mut cursors, mut cursor) = (Vec::new(), Vec::new(), None::<String>);
            loop {
                let page = match &cursor {
                    Some(c) => format!("{listing}&limit=1&cursor={c}"),
                    None => format!("{listing}&limit=1"),
                };
                let (status, v) = admin(app, "GET", &page, None, Some(&key)).await?;
                assert_eq!(status, 200, "{v}");
                for g in v["sessions"].as_array().ok_or("sessions")? {
                    ids.push(g["sessionId"].as_str().ok_or("id")?.to_string());
                }
                match v["nextCursor"].as_str() {
                    Some(c) => {
                        cursors.push(c.to_string());
                        cursor = Some(c.to_string());
                    }
                    None => break,
                }
            }
            TestResult::Ok((ids, cursors))
        }
    };
    // An offset would count the other's grants: refused to a tenant.
    let (status, v) = admin(
        &app,
        "GET",
        &format!("{listing}&cursor=1"),
        None,
        Some(&games),
    )
    .await?;
    assert_eq!(
        (status, v["issues"][0]["path"].clone()),
        (400, json!("cursor")),
        "{v}"
    );
    let (mut ids, cursors) = walk(games.clone()).await?;
    // (Grants of one second are listed by id.)
    ids.sort();
    let mut own = vec![id.clone(), second];
    own.sort();
    assert_eq!(ids, own, "its own, each once");
    let (shop_ids, shop_cursors) = walk(shop.clone()).await?;
    assert_eq!(shop_ids, vec![theirs.clone()]);
    for c in cursors {
        assert!(
            !c.contains(&theirs[2..]),
            "a games cursor names shop's grant: {c}"
        );
    }
    for c in shop_cursors {
        assert!(
            !c.contains(&id[2..]),
            "a shop cursor names games' grant: {c}"
        );
    }

    // Its own tenant lists, reads and revokes it.
    let (_, v) = admin(&app, "GET", &listing, None, Some(&games)).await?;
    let listed: Vec<&Value> = v["sessions"]
        .as_array()
        .ok_or("sessions")?
        .iter()
        .map(|g| &g["sessionId"])
        .collect();
    assert!(listed.contains(&&json!(id)), "{v}");
    let (status, v) = admin(&app, "DELETE", &path, None, Some(&games)).await?;
    assert_eq!(
        (status, v["status"].clone()),
        (200, json!("revoked")),
        "{v}"
    );
    // The operator's token reaches every policy's; a wrong token nothing.
    let (status, _) = admin(&app, "GET", &path, None, Some(ADMIN_TOKEN)).await?;
    assert_eq!(status, 200);
    let (status, _) = admin(&app, "GET", &path, None, Some("sp_wrong")).await?;
    assert_eq!(status, 401);
    Ok(())
}
