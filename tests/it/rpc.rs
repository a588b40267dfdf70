//! The JSON-RPC surface over HTTP, without a chain: envelopes, methods, and every error code.

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol;
use alloy::sol_types::SolCall;
use serde_json::{Value, json};
use session_paymaster::signer::KeySource;
use session_paymaster::sponsor::VALID_AFTER_SKEW_SECS;
use session_paymaster::userop::hash::paymaster_hash;
use session_paymaster::userop::paymaster_data::{PaymasterData, STUB_SIGNATURE};
use session_paymaster::userop::{EntryPointVersion, UserOperation};

use session_paymaster::server::ConnectionLimits;

use crate::helpers::{TestApp, TestResult, config};

sol! {
    interface ISimpleAccount {
        function execute(address dest, uint256 value, bytes func) external;
    }
}

const PM07: Address = Address::repeat_byte(0x07);
const PM08: Address = Address::repeat_byte(0x08);
const PM09: Address = Address::repeat_byte(0x09);
/// policies/dev-counter.toml's target.
const COUNTER: &str = "0xCF3b87F3D9d62cdF4723D97D8139156c6b2AB4B3";

async fn app() -> TestResult<TestApp> {
    TestApp::spawn(config(
        [Some(PM07), Some(PM08), Some(PM09)],
        KeySource::Ephemeral,
    ))
    .await
}

fn ep07() -> String {
    EntryPointVersion::V0_7
        .canonical_address()
        .to_checksum(None)
}

fn execute(target: &str, func: &str, value: u64) -> String {
    let call = ISimpleAccount::executeCall {
        dest: target.parse().unwrap_or_default(),
        value: U256::from(value),
        func: keccak256(func)[..4].to_vec().into(),
    };
    format!("0x{}", hex::encode(call.abi_encode()))
}

fn op() -> Value {
    json!({
        "sender": "0x1111111111111111111111111111111111111111",
        "nonce": "0x5",
        "callData": execute(COUNTER, "increment()", 0),
        "callGasLimit": "0x186a0",
        "verificationGasLimit": "0x30d40",
        "preVerificationGas": "0xc350",
        "maxFeePerGas": "0x77359400",
        "maxPriorityFeePerGas": "0x3b9aca00",
        "signature": "0x"
    })
}

/// An operation without `callGasLimit`: sponsoring it asks the bundler to estimate.
fn unestimated_op() -> Value {
    let mut op = op();
    if let Some(o) = op.as_object_mut() {
        o.remove("callGasLimit");
    }
    op
}

/// An answer's member names, sorted.
fn members(v: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    names.sort_unstable();
    names
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::test]
async fn chain_id_and_entry_points() -> TestResult {
    let app = app().await?;
    assert_eq!(app.result("eth_chainId", json!([])).await?, json!("0x7a69"));
    assert_eq!(
        app.result("pm_supportedEntryPoints", json!([])).await?,
        json!([
            "0x0000000071727De22E5E9d8BAf0edAc6f37da032",
            "0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108",
            "0x433709009B8330FDa32311DF1C2AFA402eD8D009"
        ])
    );
    Ok(())
}

/// Requests name the EntryPoint by address, so one address (or one paymaster) for two versions
/// would sign under the wrong version's rules: refused at start.
#[tokio::test]
async fn two_versions_at_one_address_do_not_start() -> TestResult {
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.chains[0].entry_points[2].address = c.chains[0].entry_points[1].address;
    let err = session_paymaster::app::AppState::build(&c)
        .await
        .err()
        .ok_or("started")?;
    assert!(
        err.to_string()
            .contains("--entry-point-v08 and --entry-point-v09 (SP_ENTRY_POINT_V08, SP_ENTRY_POINT_V09) are both 0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108"),
        "{err}"
    );

    let mut c = config([Some(PM07), Some(PM08), Some(PM08)], KeySource::Ephemeral);
    let err = session_paymaster::app::AppState::build(&c)
        .await
        .err()
        .ok_or("started")?;
    assert!(
        err.to_string().contains(&format!(
            "--paymaster-v08 and --paymaster-v09 (SP_PAYMASTER_V08, SP_PAYMASTER_V09) are both {PM08}"
        )),
        "{err}"
    );
    c.chains[0].entry_points[2].paymaster = Some(PM09);
    assert!(session_paymaster::app::AppState::build(&c).await.is_ok());
    // One chain twice: which one a request is for would be a guess.
    c.chains.push(c.chains[0].clone());
    let err = session_paymaster::app::AppState::build(&c)
        .await
        .err()
        .ok_or("started")?;
    assert!(
        err.to_string().contains("chain 31337 is configured twice"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn sponsor_signs_the_paymaster_hash_with_the_policy_window() -> TestResult {
    let app = app().await?;
    let before = now();
    let r = app
        .result("pm_sponsorUserOperation", json!([op(), ep07()]))
        .await?;
    assert_eq!(r["paymaster"], json!(PM07));
    assert_eq!(r["paymasterVerificationGasLimit"], json!("0x9c40"));
    assert_eq!(r["paymasterPostOpGasLimit"], json!("0x0"));
    assert_eq!(r["preVerificationGas"], json!("0xc350"));
    assert_eq!(r["verificationGasLimit"], json!("0x30d40"));
    assert_eq!(r["callGasLimit"], json!("0x186a0"));
    assert_eq!(
        members(&r),
        [
            "callGasLimit",
            "paymaster",
            "paymasterData",
            "paymasterPostOpGasLimit",
            "paymasterVerificationGasLimit",
            "preVerificationGas",
            "verificationGasLimit"
        ]
    );

    let data = session_paymaster::wire::data("paymasterData", &r["paymasterData"])?;
    let pd = PaymasterData::decode(&data)?;
    // policies/dev-counter.toml: max_validity = "10m".
    let after = now();
    assert!(
        pd.window.valid_until >= before + 600 && pd.window.valid_until <= after + 600,
        "{:?}",
        pd.window
    );
    assert!(
        pd.window.valid_after + VALID_AFTER_SKEW_SECS >= before
            && pd.window.valid_after + VALID_AFTER_SKEW_SECS <= after
    );

    // The signature recovers to the service's signer over the paymaster hash.
    let mut signed = op();
    signed["paymaster"] = r["paymaster"].clone();
    signed["paymasterVerificationGasLimit"] = r["paymasterVerificationGasLimit"].clone();
    signed["paymasterPostOpGasLimit"] = r["paymasterPostOpGasLimit"].clone();
    let parsed = UserOperation::from_json(&signed)?;
    let gas = parsed.paymaster.as_ref().ok_or("pm")?.gas;
    let hash = paymaster_hash(&parsed, gas, PM07, 31337, pd.window);
    let sig = alloy::primitives::Signature::from_raw(&pd.signature)?;
    let recovered = sig.recover_address_from_msg(hash.as_slice())?;
    assert_eq!(recovered, app.state.sponsor.signer().address());

    // validForSeconds shortens the window, never lengthens it.
    let r = app
        .result(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), {"validForSeconds": 30}]),
        )
        .await?;
    let pd = PaymasterData::decode(&session_paymaster::wire::data("d", &r["paymasterData"])?)?;
    assert!(pd.window.valid_until <= now() + 30);
    let r = app
        .result(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), {"validForSeconds": 100000}]),
        )
        .await?;
    let pd = PaymasterData::decode(&session_paymaster::wire::data("d", &r["paymasterData"])?)?;
    assert!(pd.window.valid_until <= now() + 600);
    Ok(())
}

#[tokio::test]
async fn erc7677_stub_has_final_length_and_sponsor() -> TestResult {
    let app = app().await?;
    // viem sends `0x0` gas before estimation and may omit fees.
    let mut unestimated = op();
    for f in ["callGasLimit", "verificationGasLimit", "preVerificationGas"] {
        unestimated[f] = json!("0x0");
    }
    unestimated
        .as_object_mut()
        .map(|o| o.remove("maxFeePerGas"));
    unestimated
        .as_object_mut()
        .map(|o| o.remove("maxPriorityFeePerGas"));
    let ep08 = EntryPointVersion::V0_8.canonical_address();
    let r = app
        .result(
            "pm_getPaymasterStubData",
            json!([unestimated, ep08, "0x7a69", null]),
        )
        .await?;
    assert_eq!(r["paymaster"], json!(PM08));
    assert_eq!(r["isFinal"], json!(false));
    assert_eq!(r["sponsor"], json!({"name": "test sponsor"}));
    assert_eq!(r["paymasterPostOpGasLimit"], json!("0x0"));
    assert_eq!(
        members(&r),
        [
            "isFinal",
            "paymaster",
            "paymasterData",
            "paymasterPostOpGasLimit",
            "paymasterVerificationGasLimit",
            "sponsor"
        ]
    );
    let data = session_paymaster::wire::data("paymasterData", &r["paymasterData"])?;
    assert_eq!(data.len(), 77, "stub has the final length");
    assert_eq!(&data[12..], &STUB_SIGNATURE[..]);

    // Final data needs the gas limits the signature commits to.
    let err = app
        .error(
            "pm_getPaymasterData",
            json!([unestimated, ep08, "0x7a69", {}]),
        )
        .await?;
    assert_eq!(err["code"], json!(-32602));
    assert_eq!(err["data"]["field"], json!("verificationGasLimit"));
    Ok(())
}

#[tokio::test]
async fn get_paymaster_data_signs_over_the_clients_paymaster_gas() -> TestResult {
    let app = app().await?;
    let mut o = op();
    o["paymaster"] = json!(PM07);
    o["paymasterVerificationGasLimit"] = json!("0x11170"); // 70000: e.g. a bundler's estimate
    o["paymasterPostOpGasLimit"] = json!("0x0");
    let r = app
        .result("pm_getPaymasterData", json!([o, ep07(), "0x7a69", {}]))
        .await?;
    assert_eq!(r["paymasterVerificationGasLimit"], json!("0x11170"));
    assert_eq!(
        members(&r),
        [
            "paymaster",
            "paymasterData",
            "paymasterPostOpGasLimit",
            "paymasterVerificationGasLimit"
        ]
    );

    o["paymasterVerificationGasLimit"] = json!("0x2710"); // 10000: too little to validate
    let err = app
        .error("pm_getPaymasterData", json!([o, ep07(), "0x7a69", {}]))
        .await?;
    assert_eq!(err["data"]["field"], json!("paymasterVerificationGasLimit"));
    Ok(())
}

#[tokio::test]
async fn unsupported_chain_entry_point_and_missing_paymaster() -> TestResult {
    let app = app().await?;
    let err = app
        .error("pm_getPaymasterStubData", json!([op(), ep07(), "0x1", {}]))
        .await?;
    assert_eq!(err["code"], json!(-32001));
    assert_eq!(err["data"]["reason"], json!("unsupported_chain"));

    let v06 = "0x5FF137D4b0FDCD49DcA30c7CF57E578a026d2789";
    let err = app
        .error("pm_sponsorUserOperation", json!([op(), v06]))
        .await?;
    assert_eq!(err["code"], json!(-32001));
    assert_eq!(err["data"]["reason"], json!("unsupported_entry_point"));
    assert_eq!(err["data"]["supported"].as_array().map(Vec::len), Some(3));

    let unconfigured = TestApp::spawn(config([None, None, None], KeySource::Ephemeral)).await?;
    let err = unconfigured
        .error("pm_sponsorUserOperation", json!([op(), ep07()]))
        .await?;
    assert_eq!(err["code"], json!(-32002));
    assert_eq!(err["data"]["reason"], json!("paymaster_not_configured"));
    Ok(())
}

#[tokio::test]
async fn policy_rejections_name_reason_rule_and_call() -> TestResult {
    let app = app().await?;
    let cases = [
        (
            execute(
                "0x2222222222222222222222222222222222222222",
                "increment()",
                0,
            ),
            "target_not_allowed",
            Some(0),
        ),
        (
            execute(COUNTER, "reset()", 0),
            "function_not_allowed",
            Some(0),
        ),
        (
            execute(COUNTER, "increment()", 1),
            "value_too_high",
            Some(0),
        ),
        ("0xdeadbeef".to_owned(), "unknown_account_call", None),
        ("0xb61d27f6".to_owned(), "malformed_calldata", None),
    ];
    for (call_data, reason, call_index) in cases {
        let mut o = op();
        o["callData"] = json!(call_data);
        let err = app
            .error("pm_sponsorUserOperation", json!([o, ep07()]))
            .await?;
        assert_eq!(err["code"], json!(-32003), "{reason}: {err}");
        assert_eq!(err["data"]["reason"], json!(reason), "{err}");
        assert_eq!(
            err["data"].get("callIndex").and_then(Value::as_u64),
            call_index.map(|i| i as u64),
            "{err}"
        );
        // The stub runs the same checks, so wallets fail early.
        let err = app
            .error("pm_getPaymasterStubData", json!([o, ep07(), "0x7a69", {}]))
            .await?;
        assert_eq!(err["data"]["reason"], json!(reason));
    }

    let mut o = op();
    o["maxFeePerGas"] = json!("0x74a5ed5200"); // 501 gwei > 500 gwei cap
    let err = app
        .error("pm_sponsorUserOperation", json!([o, ep07()]))
        .await?;
    assert_eq!(err["data"]["reason"], json!("fee_too_high"));
    assert_eq!(
        err["data"]["rule"],
        json!("dev-counter.per_op.max_fee_per_gas")
    );

    let err = app
        .error(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), {"sponsorshipPolicyId": "nope"}]),
        )
        .await?;
    assert_eq!(err["data"]["reason"], json!("unknown_policy"));
    let ok = app
        .result(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), {"sponsorshipPolicyId": "dev-counter"}]),
        )
        .await?;
    assert_eq!(ok["paymaster"], json!(PM07));

    let session = format!("{}", B256::repeat_byte(1));
    let err = app
        .error(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), {"sessionId": session}]),
        )
        .await?;
    assert_eq!(err["data"]["reason"], json!("session_not_found"));
    Ok(())
}

#[tokio::test]
async fn invalid_params_name_the_field() -> TestResult {
    let app = app().await?;
    for (field, bad) in [
        ("callGasLimit", json!("100")),
        ("sender", json!("0x12")),
        ("nonce", json!(null)),
        // DATA a lenient hex decoder would take: a second prefix, non-hex, non-ASCII digits.
        ("callData", json!("0x0x12")),
        ("callData", json!("0xgg")),
        ("signature", json!("0x１２")),
        ("factoryData", json!("0x+1")),
    ] {
        let mut o = op();
        o[field] = bad;
        let err = app
            .error("pm_sponsorUserOperation", json!([o, ep07()]))
            .await?;
        assert_eq!(err["code"], json!(-32602));
        assert_eq!(err["data"]["field"], json!(field), "{err}");
    }
    let err = app.error("pm_sponsorUserOperation", json!([op()])).await?;
    assert_eq!(err["data"]["field"], json!("entryPoint"));
    let err = app
        .error(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), {"validForSeconds": -1}]),
        )
        .await?;
    assert_eq!(err["data"]["field"], json!("context.validForSeconds"));
    for layout in [json!("Suffix"), json!(true), json!(1)] {
        let err = app
            .error(
                "pm_sponsorUserOperation",
                json!([op(), ep07(), { "paymasterSignature": layout }]),
            )
            .await?;
        assert_eq!(
            err["data"]["field"],
            json!("context.paymasterSignature"),
            "{err}"
        );
    }
    // A suffix needs v0.9: v0.7 hashes all of paymasterAndData.
    let err = app
        .error(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), { "paymasterSignature": "suffix" }]),
        )
        .await?;
    assert_eq!(
        err["data"]["field"],
        json!("context.paymasterSignature"),
        "{err}"
    );
    Ok(())
}

/// An error echoes at most a short prefix of what the client sent: a 100 KiB policy id or
/// method name does not come back whole (it made a 205 KB answer).
#[tokio::test]
async fn errors_echo_a_short_prefix_of_client_text() -> TestResult {
    let app = app().await?;
    let huge = "p".repeat(100 * 1024);
    let err = app
        .error(
            "pm_sponsorUserOperation",
            json!([op(), ep07(), { "sponsorshipPolicyId": huge }]),
        )
        .await?;
    assert_eq!(err["data"]["reason"], json!("unknown_policy"), "{err}");
    assert!(
        err.to_string().len() < 1024,
        "{} bytes",
        err.to_string().len()
    );
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": format!("pm_{huge}"), "params": [] });
    let (_, v) = app.post(&body.to_string()).await?;
    assert_eq!(v["error"]["code"], json!(-32601));
    assert!(v.to_string().len() < 1024, "{} bytes", v.to_string().len());
    Ok(())
}

/// `eip7702Auth` that is not an object is a malformed request, not a field to ignore.
#[tokio::test]
async fn a_malformed_eip7702_auth_is_invalid_params() -> TestResult {
    let app = app().await?;
    let mut bad = op();
    bad["eip7702Auth"] = json!("0x01");
    let err = app
        .error("pm_sponsorUserOperation", json!([bad, ep07()]))
        .await?;
    assert_eq!(
        (err["code"].clone(), err["data"]["field"].clone()),
        (json!(-32602), json!("eip7702Auth")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn json_rpc_envelope_errors_and_batches() -> TestResult {
    let app = app().await?;
    let (status, v) = app.post("{not json").await?;
    assert_eq!(
        (status, v["error"]["code"].clone(), v["id"].clone()),
        (200, json!(-32700), Value::Null)
    );

    let (_, v) = app
        .post(r#"{"jsonrpc":"1.0","id":7,"method":"eth_chainId"}"#)
        .await?;
    assert_eq!(
        (v["error"]["code"].clone(), v["id"].clone()),
        (json!(-32600), json!(7))
    );
    let (_, v) = app.post("[]").await?;
    assert_eq!(v["error"]["code"], json!(-32600));
    // Named params are a valid JSON-RPC shape these methods do not take: invalid params.
    let (_, v) = app
        .post(r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":{}}"#)
        .await?;
    assert_eq!(
        (v["error"]["code"].clone(), v["id"].clone()),
        (json!(-32602), json!(1))
    );
    let (_, v) = app
        .post(r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":"x"}"#)
        .await?;
    assert_eq!(v["error"]["code"], json!(-32600));

    let err = app.error("eth_sendTransaction", json!([])).await?;
    assert_eq!(err["code"], json!(-32601));

    // A batch answers in order, each call with its own result or error; notifications get none.
    let batch = json!([
        {"jsonrpc": "2.0", "id": "a", "method": "eth_chainId"},
        {"jsonrpc": "2.0", "id": 2, "method": "nope"},
        {"jsonrpc": "2.0", "method": "eth_chainId"},
        5,
        {"jsonrpc": "2.0", "id": 3, "method": "pm_sponsorUserOperation", "params": [op(), ep07()]}
    ]);
    let (status, v) = app.post(&batch.to_string()).await?;
    assert_eq!(status, 200);
    let items = v.as_array().ok_or("batch answer is an array")?;
    assert_eq!(items.len(), 4, "{v}");
    assert_eq!(
        (items[0]["id"].clone(), items[0]["result"].clone()),
        (json!("a"), json!("0x7a69"))
    );
    assert_eq!(
        (items[1]["id"].clone(), items[1]["error"]["code"].clone()),
        (json!(2), json!(-32601))
    );
    assert_eq!(
        (items[2]["id"].clone(), items[2]["error"]["code"].clone()),
        (Value::Null, json!(-32600))
    );
    assert_eq!(items[3]["id"], json!(3));
    assert_eq!(items[3]["result"]["paymaster"], json!(PM07));

    let (status, v) = app
        .post(r#"{"jsonrpc":"2.0","method":"eth_chainId"}"#)
        .await?;
    assert_eq!(
        (status, v),
        (204, Value::Null),
        "a lone notification gets no body"
    );
    let (status, v) = app
        .post(r#"[{"jsonrpc":"2.0","method":"eth_chainId"},{"jsonrpc":"2.0","method":"nope"}]"#)
        .await?;
    assert_eq!(
        (status, v),
        (204, Value::Null),
        "a batch of notifications gets no body"
    );
    let (status, v) = app
        .post(
            r#"[{"jsonrpc":"2.0","method":"eth_chainId"},{"jsonrpc":"2.0","id":9,"method":"eth_chainId"}]"#,
        )
        .await?;
    assert_eq!(
        (status, v),
        (
            200,
            json!([{"jsonrpc": "2.0", "id": 9, "result": "0x7a69"}])
        ),
        "a notification first answers nothing, and the call after it its own answer"
    );

    // Answers are JSON, the envelope written as JSON-RPC 2.0 has it, alone or in a batch.
    let answer = |id| json!({"jsonrpc": "2.0", "id": id, "result": "0x7a69"});
    for (body, expected) in [
        (
            r#"{"jsonrpc":"2.0","id":"x\"y","method":"eth_chainId"}"#,
            answer(json!("x\"y")),
        ),
        (
            r#"[{"jsonrpc":"2.0","id":null,"method":"eth_chainId"}]"#,
            json!([answer(Value::Null)]),
        ),
    ] {
        let resp = reqwest::Client::new()
            .post(&app.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        assert_eq!(
            resp.headers().get("content-type").map(|v| v.as_bytes()),
            Some(b"application/json".as_slice())
        );
        assert_eq!(resp.json::<Value>().await?, expected);
    }
    Ok(())
}

#[tokio::test]
async fn explain_lists_every_check_and_the_decoded_calls() -> TestResult {
    let app = app().await?;
    let v = app
        .result("pm_explainSponsorship", json!([op(), ep07()]))
        .await?;
    assert_eq!(v["decision"], json!("sponsored"), "{v}");
    assert_eq!(v["policy"], json!("dev-counter"));
    assert_eq!(v["calls"][0]["target"], json!(COUNTER.parse::<Address>()?));
    assert_eq!(v["calls"][0]["kind"], json!("call"));
    assert!(
        v["checks"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["passed"] == json!(true))),
        "{v}"
    );

    // Several failures at once: all are listed, the decision names the first. 501 gwei breaks
    // the fee cap and, times the op's gas, the 0.05 ether cost cap.
    let mut bad = op();
    bad["maxFeePerGas"] = json!("0x74a5ed5200"); // 501 gwei
    bad["callData"] = json!(execute(COUNTER, "reset()", 0));
    let v = app
        .result("pm_explainSponsorship", json!([bad, ep07()]))
        .await?;
    assert_eq!(v["decision"], json!("rejected"));
    assert_eq!(v["rejection"]["reason"], json!("fee_too_high"));
    let failed: Vec<(&str, &str)> = v["checks"]
        .as_array()
        .ok_or("checks")?
        .iter()
        .filter(|c| c["passed"] == json!(false))
        .filter_map(|c| Some((c["check"].as_str()?, c["rejection"]["reason"].as_str()?)))
        .collect();
    assert_eq!(
        failed,
        vec![
            ("max_fee_per_gas", "fee_too_high"),
            ("max_cost", "cost_too_high"),
            ("calls[0]", "function_not_allowed")
        ]
    );
    // Each of the policy's checks by name, in order, once.
    let named: Vec<&str> = v["checks"]
        .as_array()
        .ok_or("checks")?
        .iter()
        .filter(|c| c["policy"] == json!("dev-counter"))
        .filter_map(|c| c["check"].as_str())
        .collect();
    assert_eq!(
        named[..6],
        [
            "chain",
            "entry_point",
            "active",
            "sender",
            "factory",
            "delegate"
        ]
    );
    // Nothing was signed: no paymasterData in an explanation.
    assert!(v.get("paymasterData").is_none());
    Ok(())
}

#[tokio::test]
async fn a_body_over_the_limit_gets_a_json_rpc_error() -> TestResult {
    let app = app().await?;
    let mut big = op();
    big["callData"] = json!(format!("0x{}", "00".repeat(300 * 1024)));
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation", "params": [big, ep07()] });
    let (status, v) = app.post(&body.to_string()).await?;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], json!(-32600), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("262144")),
        "{v}"
    );
    // Just under the limit is parsed and judged on its merits.
    let (status, v) = app
        .post(&json!({ "jsonrpc": "2.0", "id": 2, "method": "eth_chainId" }).to_string())
        .await?;
    assert_eq!((status, v["result"].clone()), (200, json!("0x7a69")));
    Ok(())
}

/// The service with short connection deadlines (headers and idle 1 s, a request 2 s) and at
/// most `max_connections`.
async fn app_with_deadlines(max_connections: usize) -> TestResult<TestApp> {
    let limits = ConnectionLimits {
        header_timeout: std::time::Duration::from_secs(1),
        request_timeout: std::time::Duration::from_secs(2),
        max_connections,
    };
    let config = config([Some(PM07), None, None], KeySource::Ephemeral);
    TestApp::spawn_with_limits(config, limits).await
}

/// A client that opens connections and never finishes a request holds nothing for long: its
/// headers, and a kept-alive connection's next request, have `header_timeout`; its body goes
/// under `request_timeout` (HTTP 408); connections past the cap wait in the kernel's backlog
/// until one closes. (axum's `serve`, before, gave hyper no timer: each held its socket for
/// ever, so a few thousand exhausted the process's file descriptors before any key was checked.)
#[tokio::test]
async fn slow_idle_and_surplus_connections_are_bounded() -> TestResult {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let app = app_with_deadlines(2).await?;
    let addr = app.url.trim_start_matches("http://").to_owned();
    // Everything the server writes until it closes the connection (a test failure after 5 s).
    async fn until_closed(conn: &mut TcpStream) -> TestResult<String> {
        let mut got = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err("the connection was still open after 5 s".into()),
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    }
    let chain_id = r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}"#;

    // Headers begun, never finished: closed, unanswered.
    let mut conn = TcpStream::connect(&addr).await?;
    conn.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Ty")
        .await?;
    assert_eq!(until_closed(&mut conn).await?, "");

    // A body that stops short of its length: a plain 408, and closed.
    let mut conn = TcpStream::connect(&addr).await?;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        chain_id.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&chain_id.as_bytes()[..10]).await?;
    let answer = until_closed(&mut conn).await?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.ends_with("request timed out\n"), "{answer}");

    // A request answered, then the kept-alive connection left idle: closed after the answer.
    let mut conn = TcpStream::connect(&addr).await?;
    conn.write_all(format!("{head}{chain_id}").as_bytes())
        .await?;
    let answer = until_closed(&mut conn).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""result":"0x7a69""#), "{answer}");

    // Two connections held open (the cap): a third is answered only once one of them is closed
    // by its header timeout.
    let held = [
        TcpStream::connect(&addr).await?,
        TcpStream::connect(&addr).await?,
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let mut third = TcpStream::connect(&addr).await?;
    third
        .write_all(format!("{head}{chain_id}").as_bytes())
        .await?;
    let answer = until_closed(&mut third).await?;
    assert!(answer.contains(r#""result":"0x7a69""#), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the third connection was served at once, past the cap: {:?}",
        started.elapsed()
    );
    drop(held);
    Ok(())
}

/// A client that sends requests and never reads the answers: hyper writes no further answer
/// and reads no further request while one is unsent, so no header or request deadline ran, and
/// the connection (and its place under the cap, and a graceful shutdown waiting for it) was
/// held for ever. An answer the client reads nothing of for `request_timeout` now closes it.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_dropped() -> TestResult {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = app_with_deadlines(4).await?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let conn = socket
        .connect(app.url.trim_start_matches("http://").parse()?)
        .await?;
    let (mut read, mut write) = conn.into_split();
    // Far more answer than the two sockets' buffers hold (each `/metrics` is kilobytes).
    const SENT: usize = 3000;
    let writer = tokio::spawn(async move {
        let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(SENT);
        // (Blocks once the server stops reading; ends when it closes.)
        let _ = write.write_all(requests.as_bytes()).await;
        write
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut got)).await {
        Ok(_) => {}
        Err(_) => return Err("the connection was still open".into()),
    }
    let answered = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    assert!(
        answered < SENT,
        "every answer was delivered: the connection was not cut ({answered})"
    );
    writer.abort();
    // The server still serves.
    let (status, v) = app
        .post(r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}"#)
        .await?;
    assert_eq!((status, v["result"].clone()), (200, json!("0x7a69")));
    Ok(())
}

#[tokio::test]
async fn validate_sponsorship_policies_lists_the_willing_ones() -> TestResult {
    let app = app().await?;
    let v = app
        .result(
            "pm_validateSponsorshipPolicies",
            json!([op(), ep07(), ["dev-counter", "game-moves", "nope"]]),
        )
        .await?;
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v[0]["sponsorshipPolicyId"], json!("dev-counter"));
    assert_eq!(v[0]["data"]["author"], json!("test sponsor"));
    let mut outside = op();
    outside["callData"] = json!(execute(COUNTER, "reset()", 0));
    let v = app
        .result(
            "pm_validateSponsorshipPolicies",
            json!([outside, ep07(), ["dev-counter"]]),
        )
        .await?;
    assert_eq!(v, json!([]));
    let err = app
        .error(
            "pm_validateSponsorshipPolicies",
            json!([op(), ep07(), "dev-counter"]),
        )
        .await?;
    assert_eq!(err["data"]["field"], json!("sponsorshipPolicyIds"));
    Ok(())
}

#[tokio::test]
async fn metrics_count_requests_rejections_and_latency() -> TestResult {
    let app = app().await?;
    let scrape = || async {
        let text = reqwest::get(format!("{}/metrics", app.url))
            .await?
            .text()
            .await?;
        Ok::<String, reqwest::Error>(text)
    };
    let count = |text: &str, series: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = scrape().await?;
    app.result("pm_sponsorUserOperation", json!([op(), ep07()]))
        .await?;
    app.result("pm_sponsorUserOperation", json!([op(), ep07()]))
        .await?;
    let mut bad = op();
    bad["callData"] = json!(execute(COUNTER, "reset()", 0));
    app.error("pm_sponsorUserOperation", json!([bad, ep07()]))
        .await?;
    let after = scrape().await?;
    let ok = "sp_requests_total{method=\"pm_sponsorUserOperation\",outcome=\"ok\"}";
    let rejected = "sp_requests_total{method=\"pm_sponsorUserOperation\",outcome=\"-32003\"}";
    assert_eq!(count(&after, ok) - count(&before, ok), 2, "{after}");
    assert_eq!(count(&after, rejected) - count(&before, rejected), 1);
    let reason = "sp_rejections_total{reason=\"function_not_allowed\"}";
    assert_eq!(count(&after, reason) - count(&before, reason), 1);
    let signs = "sp_sign_seconds_count";
    assert_eq!(
        count(&after, signs) - count(&before, signs),
        2,
        "one signature per signed sponsorship"
    );
    assert_eq!(count(&after, "sp_policies "), 4);
    Ok(())
}

#[tokio::test]
async fn sponsoring_without_gas_limits_needs_a_bundler() -> TestResult {
    let app = app().await?;
    let mut unestimated = op();
    for f in ["callGasLimit", "verificationGasLimit", "preVerificationGas"] {
        unestimated.as_object_mut().map(|o| o.remove(f));
    }
    let err = app
        .error("pm_sponsorUserOperation", json!([unestimated, ep07()]))
        .await?;
    assert_eq!(err["code"], json!(-32602));
    assert!(
        err["data"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no bundler")),
        "{err}"
    );
    Ok(())
}

/// An internal failure (here: a bundler whose estimate lacks fields) answers -32603 with a
/// request id only: no internals reach the client.
#[tokio::test]
async fn internal_errors_answer_a_request_id_only() -> TestResult {
    // A broken "bundler": every call answers an empty estimate.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bundler_url = format!("http://{}", listener.local_addr()?);
    let broken = axum::Router::new().route(
        "/",
        axum::routing::post(|body: axum::Json<Value>| async move {
            axum::Json(json!({ "jsonrpc": "2.0", "id": body.0["id"].clone(), "result": { "secretInternalDetail": 1 } }))
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, broken).await;
    });
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.chains[0].bundler_url = Some(bundler_url);
    let app = TestApp::spawn(c).await?;
    let unestimated = unestimated_op();
    let err = app
        .error("pm_sponsorUserOperation", json!([unestimated, ep07()]))
        .await?;
    assert_eq!(err["code"], json!(-32603), "{err}");
    assert_eq!(err["message"], json!("internal error"));
    assert!(err["data"]["requestId"].is_string());
    assert_eq!(
        err["data"].as_object().map(|o| o.len()),
        Some(1),
        "nothing but the request id: {err}"
    );
    assert!(!err.to_string().contains("preVerificationGas") && !err.to_string().contains("secret"));
    Ok(())
}

/// A bundler URL carries its provider's API key (`/rpc?apikey=…`): when the bundler cannot be
/// reached, the client learns that it did not answer, never the URL or its key.
#[tokio::test]
async fn an_unreachable_bundlers_url_and_key_stay_ours() -> TestResult {
    let closed = crate::helpers::free_port();
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.chains[0].bundler_url = Some(format!(
        "http://127.0.0.1:{closed}/rpc?apikey=bundler-secret-key"
    ));
    let app = TestApp::spawn(c).await?;
    let unestimated = unestimated_op();
    let err = app
        .error("pm_sponsorUserOperation", json!([unestimated, ep07()]))
        .await?;
    assert_eq!(err["data"]["reason"], json!("estimation_failed"), "{err}");
    assert!(
        err["data"]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("the bundler did not answer")),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        !text.contains("bundler-secret-key") && !text.contains(&closed.to_string()),
        "{text}"
    );
    Ok(())
}

/// A bundler that accepts the connection and never answers does not hold the request (nor its
/// task) forever: estimation gives up after `--bundler-timeout`, nothing signed.
#[tokio::test]
async fn a_silent_bundler_times_out() -> TestResult {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bundler_url = format!("http://{}", listener.local_addr()?);
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.chains[0].bundler_url = Some(bundler_url);
    c.bundler_timeout = std::time::Duration::from_millis(300);
    let app = TestApp::spawn(c).await?;
    let unestimated = unestimated_op();
    let started = std::time::Instant::now();
    let err = app
        .error("pm_sponsorUserOperation", json!([unestimated, ep07()]))
        .await?;
    assert_eq!(err["data"]["reason"], json!("estimation_failed"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    silent.abort();
    Ok(())
}

/// Invented method names and client values never become metric labels (measured before: 100
/// invented `pm_*` methods grew `/metrics` from 5 KB to 395 KB, for good).
#[tokio::test]
async fn invented_methods_do_not_grow_the_metrics() -> TestResult {
    let app = app().await?;
    let scrape = || async {
        reqwest::get(format!("{}/metrics", app.url))
            .await?
            .text()
            .await
    };
    // Every series that can appear once exists first.
    app.error("pm_nope", json!([])).await?;
    app.error(
        "pm_sponsorUserOperation",
        json!([{ "sender": "0x12" }, ep07()]),
    )
    .await?;
    let before = scrape().await?.len();
    let batch: Vec<Value> = (0..100)
        .map(|i| json!({ "jsonrpc": "2.0", "id": i, "method": format!("pm_invented{i}"), "params": [] }))
        .collect();
    app.post(&Value::Array(batch).to_string()).await?;
    for i in 0..20 {
        let mut bad = op();
        bad["callGasLimit"] = json!(format!("0x{i}zz"));
        app.error("pm_sponsorUserOperation", json!([bad, ep07()]))
            .await?;
    }
    let after = scrape().await?;
    assert!(
        after.len() < before + 64,
        "grew from {before} to {} bytes:\n{after}",
        after.len()
    );
    assert!(
        after.contains("sp_requests_total{method=\"other\",outcome=\"-32601\"} 101"),
        "{after}"
    );
    Ok(())
}

/// Estimations wait at a chain's bundler at most `MAX_ESTIMATES_IN_FLIGHT` at a time per
/// replica, at most `MAX_ESTIMATES_PER_KEY` of them one API key's: beyond, one is refused at
/// once (`-32004` `estimation_busy`, nothing charged) rather than sent, and the slots come back
/// when the estimations end. Before, a client's concurrent requests without gas limits were as
/// many requests held open at the operator's bundler (found by review).
#[tokio::test]
async fn estimations_at_the_bundler_are_bounded() -> TestResult {
    use session_paymaster::apikey::ApiKey;
    use session_paymaster::app::{MAX_ESTIMATES_IN_FLIGHT, MAX_ESTIMATES_PER_KEY};
    use sha2::{Digest, Sha256};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let bundler_url = format!("http://{}", listener.local_addr()?);
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    // Five keys, each asking for more than its share: together more than the replica's.
    let secrets: Vec<String> = (0..5).map(|i| format!("sp_estimate_key_{i}")).collect();
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.chains[0].bundler_url = Some(bundler_url);
    // (Long enough for every request's checks to reach the bound before the first ends, on a
    // slow runner.)
    c.bundler_timeout = std::time::Duration::from_secs(5);
    c.api_keys = secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| ApiKey {
            name: format!("k{i}"),
            sha256: B256::from_slice(&Sha256::digest(secret)),
            policies: None,
        })
        .collect();
    let app = TestApp::spawn(c).await?;
    let estimate = |secret: String| {
        let url = app.url.clone();
        async move {
            let body = json!({ "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
                               "params": [unestimated_op(), ep07()] });
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(secret)
                .json(&body)
                .send()
                .await?;
            Ok::<Value, reqwest::Error>(resp.json::<Value>().await?["error"].clone())
        }
    };
    let per_key = MAX_ESTIMATES_PER_KEY + 4;
    // `per_key` estimations of each of `keys` at once: (timed out at the bundler, refused for
    // the key's share, refused for the replica's).
    let run = async |keys: &[String]| -> TestResult<(usize, usize, usize)> {
        let mut calls = tokio::task::JoinSet::new();
        for secret in keys {
            for _ in 0..per_key {
                calls.spawn(estimate(secret.clone()));
            }
        }
        let mut found = (0, 0, 0);
        while let Some(err) = calls.join_next().await {
            let err = err??;
            let detail = err["data"]["detail"].as_str().unwrap_or_default();
            match (err["code"].as_i64(), err["data"]["reason"].as_str()) {
                (Some(-32003), Some("estimation_failed")) => found.0 += 1,
                (Some(-32004), Some("estimation_busy")) if detail.contains("API key") => {
                    found.1 += 1;
                }
                (Some(-32004), Some("estimation_busy")) => found.2 += 1,
                _ => return Err(format!("neither: {err}").into()),
            }
        }
        Ok(found)
    };
    let reached = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    // One key alone: its share.
    assert_eq!(
        run(&secrets[..1]).await?,
        (MAX_ESTIMATES_PER_KEY, per_key - MAX_ESTIMATES_PER_KEY, 0)
    );
    assert_eq!(reached(), MAX_ESTIMATES_PER_KEY);
    // Five keys: the replica's bound (each key within its share).
    let (timed_out, for_key, for_replica) = run(&secrets).await?;
    assert_eq!(
        (timed_out, for_key + for_replica),
        (
            MAX_ESTIMATES_IN_FLIGHT,
            secrets.len() * per_key - MAX_ESTIMATES_IN_FLIGHT
        )
    );
    assert!(for_replica > 0, "{for_key} {for_replica}");
    assert_eq!(reached(), MAX_ESTIMATES_PER_KEY + MAX_ESTIMATES_IN_FLIGHT);
    // The slots came back: the next estimation reaches the bundler.
    let err = estimate(secrets[0].clone()).await?;
    assert_eq!(err["data"]["reason"], json!("estimation_failed"), "{err}");
    assert_eq!(
        reached(),
        MAX_ESTIMATES_PER_KEY + MAX_ESTIMATES_IN_FLIGHT + 1
    );
    silent.abort();
    Ok(())
}
