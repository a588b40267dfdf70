//! The settlement watcher against a chain RPC that misbehaves: sponsorship goes on, readiness
//! stays, the lag and the failures are reported, and polls back off.

use std::time::Duration;

use alloy::primitives::Address;
use alloy::providers::{Provider, ProviderBuilder};
use serde_json::{Value, json};
use session_paymaster::chain::watcher::{Cursor, Watcher};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::EntryPointVersion;

use crate::helpers::{TestApp, TestResult, config, counter_op};

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The chain RPC is down (connection refused): measured before, `/readyz` answered 503 after a
/// minute on every replica while sponsorship still worked, and the watcher logged a warning
/// every second. Now readiness holds, the lag is reported, and polls back off.
#[tokio::test]
async fn a_chain_rpc_outage_keeps_replicas_ready_and_backs_off() -> TestResult {
    let app = TestApp::spawn(config(
        [Some(Address::repeat_byte(7)), None],
        KeySource::Ephemeral,
    ))
    .await?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let provider = ProviderBuilder::new()
        .connect_http(format!("http://{dead}").parse()?)
        .erased();
    let watcher = Watcher::new(provider, &app.state.sponsor, 0, None, Cursor::memory());
    let _task = app.state.spawn_watcher(watcher, Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(1600)).await;

    let resp = reqwest::get(format!("{}/readyz", app.url)).await?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["watcher"]["lagging"], json!(true), "{body}");
    let ep = EntryPointVersion::V0_7.canonical_address();
    let sponsored = app
        .result(
            "pm_sponsorUserOperation",
            json!([
                counter_op(Address::repeat_byte(0x11), 0, "increment()").to_json(),
                ep
            ]),
        )
        .await?;
    assert!(sponsored["paymasterData"].is_string(), "{sponsored}");

    let text = reqwest::get(format!("{}/metrics", app.url))
        .await?
        .text()
        .await?;
    let failed = metric(&text, "sp_watcher_polls_failed_total");
    // 50 ms doubling: about 5 polls in 1.6 s (32 without backoff).
    assert!((2..=8).contains(&failed), "{failed} failed polls:\n{text}");
    assert!(metric(&text, "sp_watcher_lag_seconds") >= 1, "{text}");
    Ok(())
}
