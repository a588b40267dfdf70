//! Rate limits over HTTP: per sender (policy `[rate]`), hit and recovered; per API key; HTTP 429
//! for a single call, a per-call error inside a batch; stubs are not counted.

use std::time::Duration;

use alloy::primitives::Address;
use serde_json::{Value, json};
use session_paymaster::apikey::ApiKey;
use session_paymaster::policy::Rate;
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;
use sha2::{Digest, Sha256};

use crate::helpers::{TempDir, TestApp, TestResult, config, counter_op, repo_dir};

fn op_json(sender: u8, nonce: u64) -> Value {
    counter_op(Address::repeat_byte(sender), nonce, "increment()").to_json()
}

fn sponsor(sender: u8, nonce: u64) -> Value {
    json!({
        "jsonrpc": "2.0", "id": nonce, "method": "pm_sponsorUserOperation",
        "params": [op_json(sender, nonce), EntryPointVersion::V0_7.canonical_address()]
    })
}

async fn rate_limited_app(per_sender: &str) -> TestResult<(TestApp, TempDir)> {
    let dir = TempDir::new("rates");
    std::fs::copy(
        repo_dir().join("policies/dev-counter.toml"),
        dir.0.join("dev-counter.toml"),
    )?;
    let mut text = std::fs::read_to_string(dir.0.join("dev-counter.toml"))?;
    text.push_str(&format!("\n[rate]\nper_sender = \"{per_sender}\"\n"));
    std::fs::write(dir.0.join("dev-counter.toml"), text)?;
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    Ok((TestApp::spawn(c).await?, dir))
}

#[tokio::test]
async fn per_sender_limit_is_hit_and_recovers() -> TestResult {
    // 3 per 10 s: a burst of 3, then one more every 3.3 s (wide enough for a slow machine).
    let (app, _dir) = rate_limited_app("3/10s").await?;
    for n in 0..3 {
        let (status, v) = app.post(&sponsor(0x11, n).to_string()).await?;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = app.post(&sponsor(0x11, 3).to_string()).await?;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], json!(-32006));
    assert_eq!(
        v["error"]["data"]["scope"],
        json!("dev-counter.rate.per_sender")
    );
    let retry = v["error"]["data"]["retryAfterMs"]
        .as_u64()
        .ok_or("retryAfterMs")?;
    assert!((1..=3334).contains(&retry), "{retry}");

    // Another sender is not affected; stubs are not counted.
    assert_eq!(app.post(&sponsor(0x12, 0).to_string()).await?.0, 200);
    let stub = json!({
        "jsonrpc": "2.0", "id": 9, "method": "pm_getPaymasterStubData",
        "params": [op_json(0x11, 9), EntryPointVersion::V0_7.canonical_address(), "0x7a69", null]
    });
    assert_eq!(app.post(&stub.to_string()).await?.0, 200);

    // Inside a batch the limited call gets its own error, the HTTP status stays 200.
    let (status, v) = app.post(&json!([sponsor(0x11, 5)]).to_string()).await?;
    assert_eq!(
        (status, v[0]["error"]["code"].clone()),
        (200, json!(-32006))
    );

    tokio::time::sleep(Duration::from_millis(retry + 50)).await;
    let (status, v) = app.post(&sponsor(0x11, 6).to_string()).await?;
    assert_eq!(status, 200, "recovered after retryAfterMs: {v}");
    Ok(())
}

#[tokio::test]
async fn per_api_key_limit() -> TestResult {
    let key = "sp_test_key";
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.api_keys = vec![format!("shop:0x{}", hex::encode(Sha256::digest(key))).parse::<ApiKey>()?];
    c.rate_per_key = Some(Rate {
        count: 3,
        per: Duration::from_secs(60),
    });
    let app = TestApp::spawn(c).await?;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for n in 0..4 {
        let resp = client
            .post(&app.url)
            .header("authorization", format!("Bearer {key}"))
            .json(&json!({
                "jsonrpc": "2.0", "id": n, "method": "eth_chainId"
            }))
            .send()
            .await?;
        statuses.push(resp.status().as_u16());
        if n == 3 {
            let v: Value = resp.json().await?;
            assert_eq!(v["error"]["data"]["scope"], json!("apiKey:shop"), "{v}");
        }
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    Ok(())
}
