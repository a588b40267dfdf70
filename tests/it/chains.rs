//! Several chains in one process: each chain's EntryPoints, paymasters, deposits, budgets and
//! settlement; the chain named by the path (`POST /{chainId}`, `/rpc/{chainId}`) or by ERC-7677's
//! `chainId`; `POST /` only where one chain is served.

use alloy::providers::Provider;
use serde_json::json;
use session_paymaster::chain::watcher::{Cursor, ReleaseClock, Watcher};
use session_paymaster::ledger::wei_to_gwei_ceil;
use session_paymaster::signer::{KeySource, keygen};
use session_paymaster::sponsor::deposit::paymaster_scope;
use session_paymaster::userop::{EntryPointVersion, UserOperation};

use crate::e2e::{User, budgeted_policies, set_paymaster};
use crate::helpers::{Stack, TempDir, TestApp, TestResult, chain_config, config};

const BASE: u64 = 8453;

/// Two anvils (chains 31337 and 8453), each with the local stack and paymasters that trust one
/// signer; one service for both.
#[tokio::test]
async fn one_process_serves_two_chains() -> TestResult {
    let dir = budgeted_policies()?;
    let policy = dir.0.join("dev-counter.toml");
    // Two operations a day per chain (`budgeted_policies` allows 100).
    let text = std::fs::read_to_string(&policy)?
        .replace("chains = [31337]", "chains = [31337, 8453]")
        .replace("ops = 100", "ops = 2");
    std::fs::write(&policy, text)?;
    let keys = TempDir::new("chains");
    let key_file = keys.0.join("signer.key");
    keygen(&key_file)?;
    let (dev, base) = (
        Stack::start_on(
            31337,
            Some(dir.0.clone()),
            None,
            key_file.clone(),
            TempDir::new("a"),
        )
        .await?,
        Stack::start_on(
            BASE,
            Some(dir.0.clone()),
            None,
            key_file.clone(),
            TempDir::new("b"),
        )
        .await?,
    );
    let mut c = config([None; 3], KeySource::File(key_file));
    c.chains = vec![chain_config(&dev.deployed), chain_config(&base.deployed)];
    c.policies_dir = dir.0.clone();
    let app = TestApp::spawn(c).await?;
    let sponsor = &app.state.sponsor;

    // The path names the chain; `/` serves none of two.
    for (path, chain) in [
        ("/31337", "0x7a69"),
        ("/8453", "0x2105"),
        ("/rpc/8453", "0x2105"),
        ("/0x2105", "0x2105"),
    ] {
        assert_eq!(
            app.result_at(path, "eth_chainId", json!([])).await?,
            json!(chain),
            "{path}"
        );
    }
    let err = app.error("eth_chainId", json!([])).await?;
    assert_eq!(
        (err["code"].clone(), err["data"]["field"].clone()),
        (json!(-32602), json!("chainId")),
        "{err}"
    );
    let err = app.error_at("/1", "eth_chainId", json!([])).await?;
    assert_eq!(err["data"]["reason"], json!("unsupported_chain"), "{err}");
    assert_eq!(
        err["data"]["supported"],
        json!(["0x7a69", "0x2105"]),
        "{err}"
    );
    let (status, v) = app
        .post_at(
            "/base",
            r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}"#,
        )
        .await?;
    assert_eq!(status, 404, "{v}");
    let v09 = |s: &Stack| {
        s.version(EntryPointVersion::V0_9)
            .entry_point
            .to_checksum(None)
    };
    let supported = app
        .result_at("/8453", "pm_supportedEntryPoints", json!([]))
        .await?;
    assert_eq!(supported[2], json!(v09(&base)), "{supported}");

    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", app.url))
        .await?
        .json()
        .await?;
    assert_eq!(
        ready["watcher"],
        json!({ "31337": "not configured", "8453": "not configured" }),
        "one entry per chain: {ready}"
    );

    // A watcher per chain, before anything is sponsored: deposits are then tracked per chain;
    // releases wait for both (one clock).
    let clock = ReleaseClock::new(2);
    let watcher = |s: &Stack, chain: u64, slot: usize| -> TestResult<Watcher> {
        Ok(
            crate::helpers::dev_watcher(s.anvil.provider.clone(), sponsor.chain(chain)?)
                .with_release_clock(clock.clone(), slot),
        )
    };
    let (dev_watcher, base_watcher) = (watcher(&dev, 31337, 0)?, watcher(&base, BASE, 1)?);

    // The same op shape on each chain, sponsored there and landed there.
    let mut landed = Vec::new();
    for (stack, path, chain) in [(&dev, "/31337", 31337), (&base, "/8453", BASE)] {
        let user = User::new(stack, EntryPointVersion::V0_7).await?;
        let ep = user.entry_point();
        let mut op_json = user.op_json();
        let result = app
            .result_at(path, "pm_sponsorUserOperation", json!([op_json, ep]))
            .await?;
        assert_eq!(
            result["paymaster"],
            json!(stack.version(EntryPointVersion::V0_7).paymaster),
            "{result}"
        );
        set_paymaster(&mut op_json, &result);
        let mut op = UserOperation::from_json(&op_json)?;
        user.finish(&mut op)?;
        let open = sponsor
            .ledger()
            .open("dev-counter", &paymaster_scope(chain, ep))
            .await?;
        assert_eq!(
            open,
            wei_to_gwei_ceil(op.max_cost(op.paymaster.clone().ok_or("pm")?.gas)),
            "chain {chain}'s deposit holds its op"
        );
        let event = user.submit(&op).await?;
        assert!(event.success);
        assert_eq!(user.counter().await?, alloy::primitives::U256::from(1));
        landed.push(wei_to_gwei_ceil(event.actualGasCost));
    }

    // ERC-7677 names the chain itself: on `/`, and on its own path; another chain's path is
    // refused rather than signed for the wrong chain.
    let user = User::new(&base, EntryPointVersion::V0_8).await?;
    let ep = user.entry_point();
    let stub = app
        .result(
            "pm_getPaymasterStubData",
            json!([user.op_json(), ep, "0x2105", {}]),
        )
        .await?;
    assert_eq!(
        stub["paymaster"],
        json!(base.version(EntryPointVersion::V0_8).paymaster),
        "{stub}"
    );
    app.result_at(
        "/8453",
        "pm_getPaymasterStubData",
        json!([user.op_json(), ep, "0x2105", {}]),
    )
    .await?;
    let err = app
        .error_at(
            "/31337",
            "pm_getPaymasterStubData",
            json!([user.op_json(), ep, "0x2105", {}]),
        )
        .await?;
    assert_eq!(err["data"]["field"], json!("chainId"), "{err}");

    // Each watcher settles its own chain's event, and nothing of the other's.
    for w in [&dev_watcher, &base_watcher] {
        let poll = w.poll_once(sponsor).await?;
        assert_eq!((poll.settled, poll.ignored), (1, 0), "{poll:?}");
    }
    // Budgets are per chain: a policy of two chains counts each on its own.
    let day = crate::helpers::policy_day_scope();
    let day = day.strip_prefix("policy:").ok_or("policy scope")?;
    for (chain, cost) in [(31337, landed[0]), (BASE, landed[1])] {
        let scope = format!("policy:c{chain}:{day}");
        assert_eq!(
            sponsor.ledger().usage("dev-counter", &scope).await?,
            (cost, 1),
            "{scope}"
        );
    }

    // A reservation expires on chain 8453: the ledger releases by time, for every chain at
    // once, so 31337's watcher alone releases nothing while 8453's has not read past it.
    let user = User::new(&base, EntryPointVersion::V0_7).await?;
    let ep = user.entry_point();
    let params = json!([user.op_json(), ep, { "validForSeconds": 5 }]);
    app.result_at("/8453", "pm_sponsorUserOperation", params)
        .await?;
    for s in [&dev, &base] {
        let p = &s.anvil.provider;
        let _: serde_json::Value = p.raw_request("evm_increaseTime".into(), (100u64,)).await?;
        let _: serde_json::Value = p.raw_request("evm_mine".into(), ()).await?;
    }
    let scope = paymaster_scope(BASE, ep);
    assert!(sponsor.ledger().open("dev-counter", &scope).await? > 0);
    assert_eq!(
        dev_watcher.poll_once(sponsor).await?.released,
        0,
        "8453 not read past it"
    );
    assert!(sponsor.ledger().open("dev-counter", &scope).await? > 0);
    assert_eq!(
        base_watcher.poll_once(sponsor).await?.released,
        1,
        "both read past it"
    );
    assert_eq!(sponsor.ledger().open("dev-counter", &scope).await?, 0);

    // Each chain has its own budget: 31337 spends its two operations and is refused a third,
    // while 8453 (one landed, one released) still sponsors.
    let sponsor_on = async |s: &Stack, path: &str| -> TestResult<serde_json::Value> {
        let user = User::new(s, EntryPointVersion::V0_7).await?;
        let params = json!([user.op_json(), user.entry_point()]);
        app.call_at(path, "pm_sponsorUserOperation", params).await
    };
    assert!(sponsor_on(&dev, "/31337").await?.get("result").is_some());
    let refused = sponsor_on(&dev, "/31337").await?;
    assert_eq!(
        refused["error"]["data"]["reason"],
        json!("budget_exhausted"),
        "{refused}"
    );
    let other = sponsor_on(&base, "/8453").await?;
    assert!(
        other.get("result").is_some(),
        "8453's budget is its own: {other}"
    );

    // A path naming a chain not served is refused whatever the method.
    let err = app
        .error_at(
            "/999",
            "pm_getSessionStatus",
            json!([format!("0x{}", "11".repeat(32))]),
        )
        .await?;
    assert_eq!(err["data"]["reason"], json!("unsupported_chain"), "{err}");

    // `status` reads every chain through its own rpc_url: one report each.
    let chain_flag = |s: &Stack| {
        json!({
            "chain_id": s.deployed.chain_id,
            "entry_point_v09": s.version(EntryPointVersion::V0_9).entry_point,
            "paymaster_v07": s.version(EntryPointVersion::V0_7).paymaster,
            "rpc_url": s.anvil.url,
        })
        .to_string()
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-paymaster"))
        .args([
            "status",
            "--chain",
            &chain_flag(&dev),
            "--chain",
            &chain_flag(&base),
        ])
        .arg("--signer-key-file")
        .arg(keys.0.join("signer.key"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let chains: Vec<_> = reports
        .as_array()
        .ok_or("one report per chain")?
        .iter()
        .map(|r| r["chainId"].clone())
        .collect();
    assert_eq!(chains, vec![json!(31337), json!(BASE)]);
    for r in reports.as_array().ok_or("reports")? {
        assert_eq!(r["paymasters"][0]["deployed"], json!(true), "{r}");
        assert_eq!(
            r["paymasters"][0]["signer"]["authorised"],
            json!(true),
            "{r}"
        );
    }
    // Watchers run by the service: `/readyz` reports each chain's.
    for (s, chain) in [(&dev, 31337), (&base, BASE)] {
        let w = Watcher::new(
            s.anvil.provider.clone(),
            sponsor.chain(chain)?,
            0,
            Some(0),
            Cursor::memory(),
        );
        let _task = app
            .state
            .spawn_watcher(w, std::time::Duration::from_millis(50));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", app.url))
        .await?
        .json()
        .await?;
    for chain in ["31337", "8453"] {
        assert_eq!(ready["watcher"][chain]["lagging"], json!(false), "{ready}");
    }
    drop(keys);
    Ok(())
}
