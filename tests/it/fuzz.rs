//! Fuzz targets, proptest-driven so they run on the stable toolchain: every parser a stranger
//! reaches, fed arbitrary and mutated input, must answer with a typed error, never a panic or a
//! 500. `scripts/test` runs them at proptest's default case count; `scripts/fuzz` runs each for
//! a bounded time with many more. A failure of a `proptest!` target is shrunk and saved in
//! `tests/it/fuzz.proptest-regressions` (commit it: it is replayed first on every run); the
//! HTTP target prints the failing body, to be added to `tests/it/rpc.rs` as a case.

use std::path::Path;

use alloy::primitives::{Address, B256, U256};
use alloy::sol_types::SolCall;
use proptest::prelude::*;
use serde_json::{Value, json};
use session_paymaster::policy::calldata;
use session_paymaster::policy::file::parse as parse_policy;
use session_paymaster::session::grant::SessionGrant;
use session_paymaster::userop::UserOperation;
use session_paymaster::userop::paymaster_data::PaymasterData;

use crate::helpers::{counter_op, repo_dir};

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[ -~]{0,40}".prop_map(Value::String),
        "0x[0-9a-fA-F]{0,80}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,24}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid operation in the RPC form with one field replaced by arbitrary JSON (or removed).
fn mutated_op() -> impl Strategy<Value = Value> {
    let fields = [
        "sender",
        "nonce",
        "factory",
        "factoryData",
        "callData",
        "callGasLimit",
        "verificationGasLimit",
        "preVerificationGas",
        "maxFeePerGas",
        "maxPriorityFeePerGas",
        "paymaster",
        "paymasterVerificationGasLimit",
        "paymasterPostOpGasLimit",
        "paymasterData",
        "signature",
        "eip7702Auth",
    ];
    (0..fields.len(), prop::option::of(arb_json())).prop_map(move |(i, v)| {
        let mut op = counter_op(Address::repeat_byte(0x11), 0, "increment()").to_json();
        match v {
            Some(v) => op[fields[i]] = v,
            None => {
                op.as_object_mut().map(|o| o.remove(fields[i]));
            }
        }
        op
    })
}

/// Calldata: arbitrary bytes, or a known account selector with arbitrary arguments.
fn arb_calldata() -> impl Strategy<Value = Vec<u8>> {
    let selectors: Vec<[u8; 4]> = vec![
        [0xb6, 0x1d, 0x27, 0xf6], // execute
        [0x18, 0xdf, 0xb3, 0xc7], // executeBatch v0.6
        [0x47, 0xe1, 0xda, 0x2a], // executeBatch v0.7
        [0x34, 0xfc, 0xd5, 0xbe], // executeBatch v0.8
        [0xe9, 0xae, 0x5c, 0x53], // ERC-7579 execute
        [0x7b, 0xb3, 0x74, 0x28], // Safe executeUserOp
        [0x54, 0x1d, 0x63, 0xc8], // Safe executeUserOpWithErrorString
    ];
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        (
            prop::sample::select(selectors),
            prop::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(sel, tail)| [&sel[..], &tail].concat()),
        // A well-formed execute whose inner call is arbitrary (nested shapes, self-calls).
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300)).prop_map(|(to_self, func)| {
            let dest = if to_self {
                Address::repeat_byte(0xaa)
            } else {
                Address::repeat_byte(0x22)
            };
            session_paymaster::policy::calldata::SimpleAccount::executeCall {
                dest,
                value: U256::ZERO,
                func: func.into(),
            }
            .abi_encode()
        }),
    ]
}

/// A valid policy file with lines dropped, duplicated or replaced by arbitrary text.
fn mutated_policy() -> impl Strategy<Value = String> {
    let text =
        std::fs::read_to_string(repo_dir().join("policies/game-moves.toml")).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let n = lines.len().max(1);
    (
        prop::collection::vec((0..n, 0..3u8, "[ -~]{0,40}"), 1..4),
        Just(lines),
    )
        .prop_map(|(edits, mut lines)| {
            for (i, kind, junk) in edits {
                let i = i.min(lines.len().saturating_sub(1));
                match kind {
                    0 if !lines.is_empty() => {
                        lines.remove(i);
                    }
                    1 if !lines.is_empty() => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    _ => lines.insert(i, junk),
                }
            }
            lines.join("\n")
        })
}

proptest! {
    #[test]
    fn user_op_parsing_never_panics(v in prop_oneof![arb_json(), mutated_op()]) {
        let _ = UserOperation::from_json(&v);
    }

    #[test]
    fn calldata_decoding_never_panics(data in arb_calldata()) {
        if let Ok(calls) = calldata::decode(&data, Address::repeat_byte(0xaa)) {
            for call in calls {
                let _ = call.token_spend();
            }
        }
    }

    #[test]
    fn paymaster_data_decoding_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(decoded) = PaymasterData::decode(&data) {
            prop_assert_eq!(PaymasterData::decode(&decoded.encode())?, decoded);
        }
    }

    #[test]
    fn policy_parsing_never_panics(text in prop_oneof![mutated_policy(), "[ -~\n]{0,400}"]) {
        let _ = parse_policy(Path::new("fuzz.toml"), &text);
    }

    #[test]
    fn admin_grant_parsing_never_panics(v in arb_json(), mutate in prop::option::of(("[a-zA-Z]{1,12}", arb_json()))) {
        let mut body = v;
        if let Some((key, value)) = mutate {
            body = json!({
                "account": Address::repeat_byte(1), "sessionKey": Address::repeat_byte(2),
                "chainId": 31337, "policy": "game-moves", "validAfter": 1, "validUntil": 2,
            });
            body[key] = value;
        }
        let _ = SessionGrant::from_request(&body, 0, || B256::ZERO);
    }
}

/// The JSON-RPC surface over HTTP: arbitrary bodies (bytes, JSON, calls with arbitrary params)
/// get a JSON-RPC answer, never a 500 or a dropped connection.
#[tokio::test]
async fn json_rpc_bodies_never_get_a_500() -> crate::helpers::TestResult {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};

    let app = crate::helpers::TestApp::spawn(crate::helpers::config(
        [Some(Address::repeat_byte(7)), None, None],
        session_paymaster::signer::KeySource::Ephemeral,
    ))
    .await?;
    let methods = session_paymaster::rpc::METHODS;
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        arb_json().prop_map(|v| v.to_string()),
        (
            prop::sample::select(methods.to_vec()),
            prop::collection::vec(prop_oneof![arb_json(), mutated_op()], 0..5)
        )
            .prop_map(|(m, params)| {
                json!({ "jsonrpc": "2.0", "id": 1, "method": m, "params": params }).to_string()
            }),
    ];
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(200);
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let client = reqwest::Client::new();
    for _ in 0..cases {
        let text = body
            .new_tree(&mut runner)
            .map_err(|e| e.to_string())?
            .current();
        let resp = client
            .post(&app.url)
            .header("content-type", "application/json")
            .body(text.clone())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let answer = resp.text().await?;
        assert!(
            matches!(status, 200 | 204 | 413 | 429),
            "HTTP {status} for {text}: {answer}"
        );
        if status != 204 {
            let v: Value = serde_json::from_str(&answer)?;
            assert!(v.is_object() || v.is_array(), "{text}: {answer}");
        }
    }
    Ok(())
}
