//! One HTTP request per rejection reason of the policy checks: each answers `-32003` with the
//! stable reason, the rule that decided, and the offending call where there is one.

use alloy::primitives::{Address, Bytes, FixedBytes, U256, keccak256};
use alloy::sol;
use alloy::sol_types::SolCall;
use serde_json::{Value, json};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::{EntryPointVersion, UserOperation};

use crate::helpers::{TempDir, TestApp, TestResult, config};

sol! {
    function execute(address dest, uint256 value, bytes func);
    interface Erc7579 {
        function execute(bytes32 mode, bytes executionCalldata);
    }
}

const TARGET: Address = Address::repeat_byte(0x71);
const LIBRARY: Address = Address::repeat_byte(0x72);
const DENIED: Address = Address::repeat_byte(0xde);
const ALLOWED: Address = Address::repeat_byte(0xa0);
const SENDER: Address = Address::repeat_byte(0x11);
/// Case marker: send to the v0.8 EntryPoint.
const V08: &str = "v0.8";

fn policies() -> TestResult<TempDir> {
    let dir = TempDir::new("rejections");
    let allow = format!(
        "[[allow]]\ntarget = \"{TARGET}\"\nfunctions = [\"increment()\"]\n\n[[allow]]\ntarget = \"{LIBRARY}\"\nfunctions = [\"*\"]\n"
    );
    let files = [
        (
            "strict",
            format!(
                "chains = [31337]\nentry_points = [\"0.7\"]\n[senders]\ndeny = [\"{DENIED}\"]\n[per_op]\n\
                 max_cost = \"0.01 ether\"\nmax_fee_per_gas = \"10 gwei\"\nmax_priority_fee_per_gas = \"2 gwei\"\n\
                 max_call_gas_limit = 150000\nmax_verification_gas_limit = 250000\n\
                 max_pre_verification_gas = 2000000\n"
            ),
        ),
        (
            "allowlist",
            format!(
                "chains = [31337]\nentry_points = [\"0.7\"]\n[senders]\nallow = [\"{ALLOWED}\"]\n"
            ),
        ),
        (
            "ended",
            "chains = [31337]\nentry_points = [\"0.7\"]\nactive_until = 2020-01-01T00:00:00Z\n"
                .into(),
        ),
        (
            "elsewhere",
            "chains = [1]\nentry_points = [\"0.7\"]\n".into(),
        ),
        (
            "v08only",
            "chains = [31337]\nentry_points = [\"0.8\"]\n".into(),
        ),
        (
            "sessioned",
            "chains = [31337]\nentry_points = [\"0.7\"]\nrequire_session = true\n".into(),
        ),
    ];
    for (id, body) in files {
        // Top-level keys first, then tables: `id` must precede the first table.
        let (top, tables) = body
            .split_once('[')
            .map_or((body.as_str(), String::new()), |(t, rest)| {
                (t, format!("[{rest}"))
            });
        std::fs::write(
            dir.0.join(format!("{id}.toml")),
            format!("id = \"{id}\"\n{top}{tables}\n{allow}"),
        )?;
    }
    Ok(dir)
}

fn call(target: Address, func: &str, value: u64) -> Bytes {
    executeCall {
        dest: target,
        value: U256::from(value),
        func: keccak256(func)[..4].to_vec().into(),
    }
    .abi_encode()
    .into()
}

fn good() -> UserOperation {
    UserOperation {
        sender: SENDER,
        nonce: U256::ZERO,
        call_data: call(TARGET, "increment()", 0),
        call_gas_limit: 100_000,
        verification_gas_limit: 200_000,
        pre_verification_gas: U256::from(50_000),
        max_fee_per_gas: 5_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        ..Default::default()
    }
}

#[tokio::test]
async fn every_policy_rejection_reason_over_http() -> TestResult {
    let dir = policies()?;
    let mut c = config(
        [
            Some(Address::repeat_byte(7)),
            Some(Address::repeat_byte(8)),
            Some(Address::repeat_byte(9)),
        ],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    let app = TestApp::spawn(c).await?;

    let delegate = {
        let mut mode = [0u8; 32];
        mode[0] = 0xff;
        let exec = [LIBRARY.as_slice(), &[1, 2, 3, 4]].concat();
        Erc7579::executeCall {
            mode: FixedBytes::from(mode),
            executionCalldata: exec.into(),
        }
        .abi_encode()
    };
    type Case = (
        &'static str,
        &'static str,
        Box<dyn Fn(&mut UserOperation)>,
        &'static str,
        Option<u64>,
    );
    let cases: Vec<Case> = vec![
        ("elsewhere", "", Box::new(|_| {}), "chain_not_allowed", None),
        (
            "v08only",
            "",
            Box::new(|_| {}),
            "entry_point_not_allowed",
            None,
        ),
        (
            "strict",
            V08,
            Box::new(|_| {}),
            "entry_point_not_allowed",
            None,
        ),
        ("ended", "", Box::new(|_| {}), "policy_inactive", None),
        (
            "strict",
            "",
            Box::new(|o| o.sender = DENIED),
            "sender_denied",
            None,
        ),
        (
            "allowlist",
            "",
            Box::new(|_| {}),
            "sender_not_allowed",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.call_gas_limit = 150_001),
            "gas_limit_too_high",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.verification_gas_limit = 250_001),
            "gas_limit_too_high",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.max_fee_per_gas = 10_000_000_001),
            "fee_too_high",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.max_priority_fee_per_gas = 2_000_000_001),
            "priority_fee_too_high",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.pre_verification_gas = U256::from(1_700_000)),
            "cost_too_high",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.pre_verification_gas = U256::from(2_000_001)),
            "gas_limit_too_high",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.call_data = call(Address::repeat_byte(9), "increment()", 0)),
            "target_not_allowed",
            Some(0),
        ),
        (
            "strict",
            "",
            Box::new(|o| o.call_data = call(TARGET, "reset()", 0)),
            "function_not_allowed",
            Some(0),
        ),
        (
            "strict",
            "",
            Box::new(|o| o.call_data = call(TARGET, "increment()", 1)),
            "value_too_high",
            Some(0),
        ),
        (
            "strict",
            "",
            Box::new(move |o| o.call_data = delegate.clone().into()),
            "delegatecall_not_allowed",
            Some(0),
        ),
        (
            "strict",
            "",
            Box::new(|o| o.call_data = vec![0xde, 0xad, 0xbe, 0xef].into()),
            "unknown_account_call",
            None,
        ),
        (
            "strict",
            "",
            Box::new(|o| o.call_data = vec![0xb6, 0x1d, 0x27, 0xf6, 0].into()),
            "malformed_calldata",
            None,
        ),
        ("nope", "", Box::new(|_| {}), "unknown_policy", None),
        ("sessioned", "", Box::new(|_| {}), "session_required", None),
        (
            "",
            "",
            Box::new(|o| o.call_data = call(TARGET, "reset()", 0)),
            "no_matching_policy",
            None,
        ),
    ];
    for (policy, ep, mutate, reason, call_index) in cases {
        let mut op = good();
        mutate(&mut op);
        let entry_point = if ep == V08 {
            EntryPointVersion::V0_8
        } else {
            EntryPointVersion::V0_7
        }
        .canonical_address();
        let context = if policy.is_empty() {
            Value::Null
        } else {
            json!({ "sponsorshipPolicyId": policy })
        };
        let err = app
            .error(
                "pm_sponsorUserOperation",
                json!([op.to_json(), entry_point, context]),
            )
            .await?;
        assert_eq!(err["code"], json!(-32003), "{reason}: {err}");
        assert_eq!(err["data"]["reason"], json!(reason), "{err}");
        assert!(
            err["data"]["rule"].as_str().is_some_and(|r| !r.is_empty()),
            "{err}"
        );
        assert_eq!(
            err["data"].get("callIndex").and_then(Value::as_u64),
            call_index,
            "{reason}: {err}"
        );
    }
    // No policy serves operations without a session on this chain: only session-only and
    // other-chain policies are loaded.
    for id in ["strict", "allowlist", "ended", "v08only"] {
        std::fs::remove_file(dir.0.join(format!("{id}.toml")))?;
    }
    let mut c = config(
        [Some(Address::repeat_byte(7)), None, None],
        KeySource::Ephemeral,
    );
    c.policies_dir = dir.0.clone();
    let bare = TestApp::spawn(c).await?;
    let err = bare
        .error(
            "pm_sponsorUserOperation",
            json!([
                good().to_json(),
                EntryPointVersion::V0_7.canonical_address()
            ]),
        )
        .await?;
    assert_eq!(err["data"]["reason"], json!("no_policy"), "{err}");

    // The same operation is sponsored by the strict policy when nothing is wrong with it.
    let ok = app.result("pm_sponsorUserOperation", json!([good().to_json(), EntryPointVersion::V0_7.canonical_address(), { "sponsorshipPolicyId": "strict" }])).await?;
    assert!(ok["paymasterData"].is_string());
    Ok(())
}
