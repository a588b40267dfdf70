//! One test per attack, named after it (docs/security.md lists them with what the service does).
//! Before its fix, each of these got an operation paid that no policy meant to pay, made the
//! ledger forget a cost, or handed a client something unusable. Requests go through the
//! service's HTTP surface, with Redis where the atomic script is what must hold; settlement
//! runs the watcher against anvil with the real EntryPoint; the revocation race, which HTTP
//! cannot time, hands the ledger a grant read before the revocation.

use alloy::eips::eip7702::Authorization;
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{SolCall, SolValue};
use serde_json::{Value, json};
use session_paymaster::clock::unix_now;
use session_paymaster::ledger::{
    GRACE_SECS, MAX_OPEN_PER_NONCE_ANY, MAX_RECORDS_PER_NONCE, Outcome, Reservation, SessionCharge,
    landing_key,
};
use session_paymaster::session::{GrantSource, SessionStatus, StoreError};
use session_paymaster::signer::KeySource;
use session_paymaster::userop::paymaster_data::{PaymasterData, ValidityWindow};
use session_paymaster::userop::{EntryPointVersion, UserOperation};

use crate::helpers::{
    COUNTER, Stack, TempDir, TestApp, TestRedis, TestResult, config, counter_op, counter_policy,
    counter_policy_dir, repo_dir,
};
use crate::sessions::{
    TOKEN, create_session, grant_request, proof, proof_until, revoke, transfer_op,
};

sol! {
    function execute(address dest, uint256 value, bytes func);
    struct Call { address target; uint256 value; bytes data; }
    function increaseAllowance(address spender, uint256 added);
    function createAccount(address owner, uint256 salt);
}

const PM07: Address = Address::repeat_byte(0x07);
const PM08: Address = Address::repeat_byte(0x08);
const PM09: Address = Address::repeat_byte(0x09);
const SENDER: Address = Address::repeat_byte(0x5e);
/// SimpleAccountFactory of the v0.7 samples: listed by the shipped policies.
const FACTORY07: Address = Address::new(alloy::primitives::hex!(
    "91E60e0613810449d098b0b5Ec8b51A0FE8c8985"
));

fn ep(v: EntryPointVersion) -> Address {
    v.canonical_address()
}

fn reason(v: &Value) -> &str {
    v["error"]["data"]["reason"].as_str().unwrap_or("")
}

/// An error's `data.detail` ("" without one).
fn detail(v: &Value) -> &str {
    v["error"]["data"]["detail"].as_str().unwrap_or("")
}

async fn sponsor(app: &TestApp, op: &Value, entry_point: Address, ctx: Value) -> TestResult<Value> {
    let body = json!({
        "jsonrpc": "2.0", "id": 1, "method": "pm_sponsorUserOperation",
        "params": [op, entry_point, ctx]
    });
    Ok(app.post(&body.to_string()).await?.1)
}

/// The repository's policies plus `extra` files, served with Redis.
async fn app_with(redis: &TestRedis, extra: &[(String, String)]) -> TestResult<(TestApp, TempDir)> {
    let dir = TempDir::new("hostile");
    for entry in std::fs::read_dir(repo_dir().join("policies"))? {
        let path = entry?.path();
        std::fs::copy(&path, dir.0.join(path.file_name().ok_or("name")?))?;
    }
    for (name, text) in extra {
        std::fs::write(dir.0.join(name), text)?;
    }
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(redis.url.clone());
    Ok((TestApp::spawn(c).await?, dir))
}

/// dev-counter with a budget, so that sponsorships are reserved.
fn budgeted_counter() -> (String, String) {
    (
        "budgeted.toml".into(),
        format!(
            "id = \"budgeted\"\nchains = [31337]\nentry_points = [\"0.7\", \"0.8\"]\n\
             factories = [\"{FACTORY07}\"]\n\
             [budgets]\npolicy = {{ cost = \"1 ether\", ops = 100, period = \"1d\" }}\n\
             [[allow]]\ntarget = \"{COUNTER}\"\nfunctions = [\"increment()\"]\n"
        ),
    )
}

/// A session-only policy whose sessions may call anything on TOKEN, with `extra` settings.
fn token_policy(id: &str, extra: &str) -> (String, String) {
    (
        format!("{id}.toml"),
        format!(
            "id = \"{id}\"\nchains = [31337]\nentry_points = [\"0.7\"]\nrequire_session = true\n{extra}\n\
             [[allow]]\ntarget = \"{TOKEN}\"\nfunctions = [\"*\"]\n"
        ),
    )
}

/// A session of `account` under `policy` that may move at most `limit` of TOKEN.
async fn capped_session(
    app: &TestApp,
    account: Address,
    policy: &str,
    limit: u64,
) -> TestResult<B256> {
    let mut body = grant_request(account, Address::repeat_byte(0xb1), policy);
    body.as_object_mut().map(|o| o.remove("budget"));
    body["permissions"] = json!({ "spend": [{ "token": TOKEN, "limit": limit.to_string() }] });
    create_session(app, body).await
}

async fn spent(app: &TestApp, session: B256) -> TestResult<Value> {
    Ok(
        app.result("pm_getSessionStatus", json!([session])).await?["spent"][TOKEN.to_string()]
            .clone(),
    )
}

/// An op of SENDER whose callData is `call_data` (gas and fees set).
fn op_calling(call_data: Vec<u8>, nonce: u64) -> Value {
    UserOperation {
        call_data: call_data.into(),
        ..counter_op(SENDER, nonce, "increment()")
    }
    .to_json()
}

/// The paymaster `app` serves `version` with.
fn ep_config(app: &TestApp, version: EntryPointVersion) -> TestResult<Address> {
    app.state
        .sponsor
        .chain(31337)?
        .entry_points
        .iter()
        .find(|e| e.version == version)
        .and_then(|e| e.paymaster)
        .ok_or_else(|| format!("no paymaster for v{version}").into())
}

// 1. EIP-7702 marker escapes the ledger ------------------------------------------------------

/// `factory = 0x7702…` parsed as an ordinary factory was signed; the v0.8 EntryPoint hashes such
/// an op with the sender's delegate, so its event never matched the reservation, which was
/// then released although the deposit paid. EIP-7702 accounts are now sponsored, but only in
/// the form the EntryPoint reads as one and whose delegate we know: the marker with an
/// authorization naming the delegate (hashed as the EntryPoint hashes it), no `factoryData`
/// (which the EntryPoint would call the account with), on v0.8 and later, and a delegate the
/// policy lists. Everything else is refused on every method.
#[tokio::test]
async fn eip7702_operations_only_in_the_form_the_entry_point_hashes() -> TestResult {
    let app = TestApp::spawn(config(
        [Some(PM07), Some(PM08), Some(PM09)],
        KeySource::Ephemeral,
    ))
    .await?;
    let auth = |delegate: &str| {
        json!({ "address": delegate, "chainId": "0x7a69", "nonce": "0x0",
                "r": "0x1", "s": "0x1", "yParity": "0x0" })
    };
    // policies/dev-counter.toml lists the v0.8 Simple7702Account.
    let listed = auth("0xe6Cae83BdE06E4c305530e199D7217f42808555B");
    let padded = format!("0x7702{}", "00".repeat(18));
    let address_style = format!("0x{}7702", "00".repeat(18));
    let refusals: Vec<(&str, Value, Value, &str)> = vec![
        (
            "no authorization",
            json!("0x7702"),
            Value::Null,
            "eip7702Auth",
        ),
        (
            "no authorization, padded",
            json!(padded),
            Value::Null,
            "eip7702Auth",
        ),
        (
            "left-padded marker",
            json!(address_style),
            listed.clone(),
            "factory",
        ),
        (
            "authorization without marker",
            Value::Null,
            listed.clone(),
            "eip7702Auth",
        ),
    ];
    for version in EntryPointVersion::ALL {
        let mut cases = refusals.clone();
        if !version.spec().eip7702 {
            cases.push((
                "no EIP-7702 before v0.8",
                json!("0x7702"),
                listed.clone(),
                "factory",
            ));
        }
        for (why, factory, eip7702_auth, field) in cases {
            for factory_data in ["0x", "0xc0ffee"] {
                let mut op = counter_op(SENDER, 0, "increment()").to_json();
                op["factory"] = factory.clone();
                op["factoryData"] = json!(factory_data);
                op["eip7702Auth"] = eip7702_auth.clone();
                // Parsing refuses factoryData with the marker before the version is looked at.
                let field = if why.starts_with("no EIP-7702") && factory_data != "0x" {
                    "factoryData"
                } else {
                    field
                };
                for (method, params) in [
                    ("pm_sponsorUserOperation", json!([op, ep(version)])),
                    (
                        "pm_getPaymasterStubData",
                        json!([op, ep(version), "0x7a69", {}]),
                    ),
                    (
                        "pm_getPaymasterData",
                        json!([op, ep(version), "0x7a69", {}]),
                    ),
                ] {
                    let err = app.error(method, params).await?;
                    assert_eq!(
                        (err["code"].clone(), err["data"]["field"].clone()),
                        (json!(-32602), json!(field)),
                        "{why}, {method} v{version}: {err}"
                    );
                }
            }
        }
    }
    // A real authorization by the sender, for this chain or any (0); the sender's own key.
    let eoa = PrivateKeySigner::random();
    let signed = |key: &PrivateKeySigner, delegate: Address, chain: u64| -> TestResult<Value> {
        let a = Authorization {
            chain_id: U256::from(chain),
            address: delegate,
            nonce: 0,
        };
        let sig = key.sign_hash_sync(&a.signature_hash())?;
        let s = a.into_signed(sig);
        Ok(
            json!({ "address": delegate, "chainId": format!("{chain:#x}"), "nonce": "0x0",
                   "r": B256::from(s.r()), "s": B256::from(s.s()),
                   "yParity": format!("{:#x}", s.y_parity()) }),
        )
    };
    let v08_delegate: Address = "0xe6Cae83BdE06E4c305530e199D7217f42808555B".parse()?;
    let stranger = PrivateKeySigner::random();
    for version in EntryPointVersion::ALL
        .into_iter()
        .filter(|v| v.spec().eip7702)
    {
        let pm = ep_config(&app, version)?;
        let mut op = counter_op(eoa.address(), 0, "increment()").to_json();
        op["factory"] = json!("0x7702");
        op["factoryData"] = json!("0xc0ffee");
        op["eip7702Auth"] = signed(&eoa, v08_delegate, 31337)?;
        let err = app
            .error("pm_sponsorUserOperation", json!([op, ep(version)]))
            .await?;
        assert_eq!(err["data"]["field"], json!("factoryData"), "{err}");

        // The well-formed account: sponsored for a listed delegate (by an authorization for
        // this chain or any), refused for another delegate.
        op["factoryData"] = json!("0x");
        for chain in [31337, 0] {
            op["eip7702Auth"] = signed(&eoa, v08_delegate, chain)?;
            let ok = app
                .result("pm_sponsorUserOperation", json!([op, ep(version)]))
                .await?;
            assert_eq!(ok["paymaster"], json!(pm), "{ok}");
        }
        op["eip7702Auth"] = signed(&eoa, Address::repeat_byte(0xba), 31337)?;
        let err = app
            .error("pm_sponsorUserOperation", json!([op, ep(version)]))
            .await?;
        assert_eq!(
            err["data"]["reason"],
            json!("delegate_not_allowed"),
            "{err}"
        );

        // An authorization the bundler's transaction would skip (someone else's signature, a
        // made-up one, another chain's) delegates nothing: the account would run whatever code
        // it has. Refused on final requests; a stub (wallets estimate with a dummy-signed
        // authorization) only checks the policy.
        for (why, forged) in [
            ("another key", signed(&stranger, v08_delegate, 31337)?),
            ("another chain", signed(&eoa, v08_delegate, 1)?),
            (
                "made up",
                auth("0xe6Cae83BdE06E4c305530e199D7217f42808555B"),
            ),
        ] {
            op["eip7702Auth"] = forged;
            for (method, params) in [
                ("pm_sponsorUserOperation", json!([op, ep(version)])),
                (
                    "pm_getPaymasterData",
                    json!([op, ep(version), "0x7a69", {}]),
                ),
            ] {
                let err = app.error(method, params).await?;
                assert_eq!(
                    err["data"]["field"],
                    json!("eip7702Auth"),
                    "{why}, {method}: {err}"
                );
            }
            let stub = app
                .result(
                    "pm_getPaymasterStubData",
                    json!([op, ep(version), "0x7a69", {}]),
                )
                .await?;
            assert_eq!(stub["paymaster"], json!(pm), "{why}: {stub}");
        }
    }
    Ok(())
}

/// Settlement matched events by our userOpHash alone: any op the EntryPoint hashed otherwise, or
/// a second sponsorship of the same nonce, stayed open and was released at expiry although a
/// cost was paid. Now an event closes every reservation of its (EntryPoint, sender, nonce):
/// the one it names is settled, the others released at once. (When no hash matches, every
/// reservation of the nonce is settled at the event's cost: the ledger suite in
/// tests/it/ledger.rs, `landings_by_nonce`, on memory, Redis and a Cluster.)
#[tokio::test]
async fn a_landed_nonce_closes_every_reservation_of_it() -> TestResult {
    use crate::e2e::User;
    use session_paymaster::chain::watcher::{Cursor, Finality, Watcher};
    use session_paymaster::ledger::wei_to_gwei_ceil;

    let redis = TestRedis::start().await?;
    let dir = TempDir::new("landed-nonce");
    let (name, text) = budgeted_counter();
    std::fs::write(dir.0.join(name), text)?;
    let stack = Stack::start_with(Some(dir.0.clone()), Some(redis.url.clone())).await?;
    let sponsor = &stack.app.state.sponsor;
    let scope = crate::helpers::policy_day_scope();
    let user = User::new(&stack, EntryPointVersion::V0_7).await?;

    // Two sponsorships of one nonce: the op, and the op with another fee.
    let mut ops = Vec::new();
    for tip in [1_000_000_000u64, 1_000_000_001] {
        let mut op_json = user.op_json();
        op_json["maxPriorityFeePerGas"] = json!(format!("{tip:#x}"));
        ops.push(user.sponsored(op_json).await?);
    }
    assert_eq!(sponsor.ledger().usage("budgeted", &scope).await?.1, 2);

    let event = user.submit(&ops[1]).await?;
    let conn =
        session_paymaster::session::redis::connect(&redis.url, std::time::Duration::from_secs(2))
            .await?;
    let watcher = Watcher::new(
        stack.anvil.provider.clone(),
        sponsor.chain(31337)?,
        0,
        Some(0),
        Cursor::redis(conn, 31337),
    )
    .with_finality(Finality::Depth(0));
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!((poll.settled, poll.superseded), (1, 1), "{poll:?}");
    assert_eq!(
        sponsor.ledger().usage("budgeted", &scope).await?,
        (wei_to_gwei_ceil(event.actualGasCost), 1),
        "the landed op at its cost; the other, which can never land, released"
    );
    assert_eq!(sponsor.ledger().open("budgeted", &scope).await?, 0);
    Ok(())
}

// 2. Operations with no calls pass every policy -----------------------------------------------

/// "Every call matches a rule" is true of an empty batch: such ops were signed, and with a
/// factory that paid for deploying anything. Refused in every account shape, nested too.
#[tokio::test]
async fn an_operation_without_calls_is_refused() -> TestResult {
    let app = TestApp::spawn(config(
        [Some(PM07), Some(PM08), Some(PM09)],
        KeySource::Ephemeral,
    ))
    .await?;
    let mut batch_7579 = [0u8; 32];
    batch_7579[0] = 0x01;
    let empty_v07 = [
        &keccak256("executeBatch(address[],uint256[],bytes[])")[..4],
        &(
            Vec::<Address>::new(),
            Vec::<U256>::new(),
            Vec::<Bytes>::new(),
        )
            .abi_encode_params(),
    ]
    .concat();
    let shapes: Vec<(&str, Vec<u8>)> = vec![
        (
            "executeBatch v0.6",
            [
                &keccak256("executeBatch(address[],bytes[])")[..4],
                &(Vec::<Address>::new(), Vec::<Bytes>::new()).abi_encode_params(),
            ]
            .concat(),
        ),
        ("executeBatch v0.7", empty_v07.clone()),
        (
            "executeBatch v0.8",
            [
                &keccak256("executeBatch((address,uint256,bytes)[])")[..4],
                &(Vec::<Call>::new(),).abi_encode_params(),
            ]
            .concat(),
        ),
        (
            "ERC-7579 batch",
            [
                &keccak256("execute(bytes32,bytes)")[..4],
                &(
                    B256::from(batch_7579),
                    Bytes::from(Vec::<Call>::new().abi_encode()),
                )
                    .abi_encode_params(),
            ]
            .concat(),
        ),
        (
            "self-call of an empty batch",
            executeCall {
                dest: SENDER,
                value: U256::ZERO,
                func: empty_v07.clone().into(),
            }
            .abi_encode(),
        ),
    ];
    for (shape, call_data) in shapes {
        for with_factory in [false, true] {
            let mut op = op_calling(call_data.clone(), 0);
            if with_factory {
                op["factory"] = json!(FACTORY07);
                op["factoryData"] = json!(Bytes::from(
                    createAccountCall {
                        owner: SENDER,
                        salt: U256::ZERO
                    }
                    .abi_encode()
                ));
            }
            let v = sponsor(&app, &op, ep(EntryPointVersion::V0_7), Value::Null).await?;
            assert_eq!(
                reason(&v),
                "no_calls",
                "{shape}, factory {with_factory}: {v}"
            );
        }
    }
    Ok(())
}

/// A factory runs code no `[[allow]]` rule sees: deployments are paid only through the
/// factories a policy lists.
#[tokio::test]
async fn deployment_through_an_unlisted_factory_is_refused() -> TestResult {
    let app = TestApp::spawn(config(
        [Some(PM07), Some(PM08), Some(PM09)],
        KeySource::Ephemeral,
    ))
    .await?;
    let with_factory = |factory: Address| {
        let mut op = counter_op(SENDER, 0, "increment()").to_json();
        op["factory"] = json!(factory);
        op["factoryData"] = json!(Bytes::from(
            createAccountCall {
                owner: SENDER,
                salt: U256::ZERO
            }
            .abi_encode()
        ));
        op
    };
    let v = sponsor(
        &app,
        &with_factory(Address::repeat_byte(0xfa)),
        ep(EntryPointVersion::V0_7),
        Value::Null,
    )
    .await?;
    assert_eq!(reason(&v), "factory_not_allowed", "{v}");
    assert_eq!(v["error"]["data"]["rule"], json!("dev-counter.factories"));
    let v = sponsor(
        &app,
        &with_factory(FACTORY07),
        ep(EntryPointVersion::V0_7),
        Value::Null,
    )
    .await?;
    assert!(
        v["result"]["paymasterData"].is_string(),
        "a listed factory is paid: {v}"
    );
    Ok(())
}

// 3. ERC-20 spend recorded in the wrong place --------------------------------------------------

/// Spend was committed before the rate limit: a limited request still used up the allowance.
#[tokio::test]
async fn a_rate_limited_request_spends_no_token_allowance() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(
        &redis,
        &[token_policy("tokens", "[rate]\nper_session = \"1/min\"")],
    )
    .await?;
    let account = Address::repeat_byte(0xa1);
    let session = capped_session(&app, account, "tokens", 100).await?;
    let ctx = json!({ "sessionId": session });
    let ep07 = ep(EntryPointVersion::V0_7);
    assert!(
        sponsor(
            &app,
            &transfer_op(account, 60, 1).to_json(),
            ep07,
            ctx.clone()
        )
        .await?["result"]
            .is_object()
    );
    let limited = sponsor(&app, &transfer_op(account, 30, 2).to_json(), ep07, ctx).await?;
    assert_eq!(
        limited["error"]["data"]["reason"],
        json!("rate_limited"),
        "{limited}"
    );
    assert_eq!(spent(&app, session).await?, json!("60"));
    Ok(())
}

/// Spend was committed before the budget reservation: a refused request used up the allowance.
#[tokio::test]
async fn a_budget_refused_request_spends_no_token_allowance() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(
        &redis,
        &[token_policy("tokens", "[budgets]\nsession = { ops = 1 }")],
    )
    .await?;
    let account = Address::repeat_byte(0xa2);
    let session = capped_session(&app, account, "tokens", 100).await?;
    let ctx = json!({ "sessionId": session });
    let ep07 = ep(EntryPointVersion::V0_7);
    assert!(
        sponsor(
            &app,
            &transfer_op(account, 10, 1).to_json(),
            ep07,
            ctx.clone()
        )
        .await?["result"]
            .is_object()
    );
    let refused = sponsor(&app, &transfer_op(account, 10, 2).to_json(), ep07, ctx).await?;
    assert_eq!(reason(&refused), "budget_exhausted", "{refused}");
    assert_eq!(spent(&app, session).await?, json!("10"));
    Ok(())
}

/// Spend was committed before the idempotency lookup: a retry counted twice, or was refused
/// `spend_limit_exceeded` instead of getting its stored answer.
#[tokio::test]
async fn a_repeated_operation_counts_its_token_spend_once() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[token_policy("tokens", "")]).await?;
    let account = Address::repeat_byte(0xa3);
    let session = capped_session(&app, account, "tokens", 100).await?;
    let ctx = json!({ "sessionId": session });
    let ep07 = ep(EntryPointVersion::V0_7);
    let op = transfer_op(account, 60, 1).to_json();
    let first = sponsor(&app, &op, ep07, ctx.clone()).await?;
    let again = sponsor(&app, &op, ep07, ctx).await?;
    assert!(first["result"]["paymasterData"].is_string(), "{first}");
    assert_eq!(
        again["result"], first["result"],
        "the stored answer: {again}"
    );
    assert_eq!(spent(&app, session).await?, json!("60"));
    Ok(())
}

/// Only `transfer`/`transferFrom`/`approve` amounts were counted: any other function on a
/// capped token (or a spend call that does not decode) moved tokens without counting.
#[tokio::test]
async fn other_functions_on_a_capped_token_are_refused() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[token_policy("tokens", "")]).await?;
    let account = Address::repeat_byte(0xa4);
    let session = capped_session(&app, account, "tokens", 100).await?;
    let on_token = |data: Vec<u8>| UserOperation {
        call_data: executeCall {
            dest: TOKEN,
            value: U256::ZERO,
            func: data.into(),
        }
        .abi_encode()
        .into(),
        ..transfer_op(account, 1, 7)
    };
    let transfer = transfer_op(account, 1, 7);
    let inner = &executeCall::abi_decode(&transfer.call_data)?.func;
    let calls: Vec<(&str, Vec<u8>)> = vec![
        (
            "increaseAllowance",
            increaseAllowanceCall {
                spender: account,
                added: U256::from(1_000_000u64),
            }
            .abi_encode(),
        ),
        (
            "permit",
            [
                &keccak256("permit(address,address,uint256,uint256,uint8,bytes32,bytes32)")[..4],
                &[0u8; 224][..],
            ]
            .concat(),
        ),
        (
            "transferAndCall",
            [
                &keccak256("transferAndCall(address,uint256,bytes)")[..4],
                &[0u8; 128][..],
            ]
            .concat(),
        ),
        (
            "multicall",
            [&keccak256("multicall(bytes[])")[..4], &[0u8; 64][..]].concat(),
        ),
        ("a truncated transfer", inner[..36].to_vec()),
    ];
    for (what, data) in calls {
        let v = sponsor(
            &app,
            &on_token(data).to_json(),
            ep(EntryPointVersion::V0_7),
            json!({ "sessionId": session }),
        )
        .await?;
        assert_eq!(reason(&v), "token_call_not_allowed", "{what}: {v}");
    }
    assert_eq!(spent(&app, session).await?, Value::Null, "nothing counted");
    Ok(())
}

// 4. A session proof replayed with other gas ---------------------------------------------------

/// The proof signed only chain, EntryPoint, sender, nonce, callData and sessionId: anyone who
/// saw it could send variants with other fees, gas or factory, each reserving up to the
/// per-op maximum. It now binds every field the paymaster signs (but its own) and a deadline.
#[tokio::test]
async fn a_session_proof_cannot_be_replayed_with_other_gas_or_later() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[]).await?;
    let key = PrivateKeySigner::random();
    let account = Address::repeat_byte(0xa5);
    let session = create_session(&app, grant_request(account, key.address(), "game-moves")).await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let good = counter_op(account, 3, "increment()");
    let ctx = |proof: Value| {
        let mut c = proof;
        c["sessionId"] = json!(session);
        c
    };
    let observed = proof(&key, &good, session)?;
    let variants: Vec<(&str, UserOperation)> = vec![
        (
            "maxFeePerGas",
            UserOperation {
                max_fee_per_gas: good.max_fee_per_gas + 1,
                ..good.clone()
            },
        ),
        (
            "maxPriorityFeePerGas",
            UserOperation {
                max_priority_fee_per_gas: good.max_priority_fee_per_gas - 1,
                ..good.clone()
            },
        ),
        (
            "callGasLimit",
            UserOperation {
                call_gas_limit: good.call_gas_limit + 1,
                ..good.clone()
            },
        ),
        (
            "verificationGasLimit",
            UserOperation {
                verification_gas_limit: good.verification_gas_limit + 1,
                ..good.clone()
            },
        ),
        (
            "preVerificationGas",
            UserOperation {
                pre_verification_gas: good.pre_verification_gas + U256::from(1),
                ..good.clone()
            },
        ),
        (
            "factory",
            UserOperation {
                factory: Some(FACTORY07),
                factory_data: createAccountCall {
                    owner: account,
                    salt: U256::ZERO,
                }
                .abi_encode()
                .into(),
                ..good.clone()
            },
        ),
    ];
    for (field, variant) in variants {
        let v = sponsor(&app, &variant.to_json(), ep07, ctx(observed.clone())).await?;
        assert_eq!(reason(&v), "invalid_session_proof", "{field}: {v}");
    }
    let mut later = observed.clone();
    later["sessionProofDeadline"] = json!(
        observed["sessionProofDeadline"]
            .as_u64()
            .ok_or("deadline")?
            + 3600
    );
    let v = sponsor(&app, &good.to_json(), ep07, ctx(later)).await?;
    assert_eq!(
        reason(&v),
        "invalid_session_proof",
        "a deadline it did not sign: {v}"
    );
    let past = proof_until(&key, &good, session, unix_now() - 1)?;
    let v = sponsor(&app, &good.to_json(), ep07, ctx(past)).await?;
    assert_eq!(
        reason(&v),
        "invalid_session_proof",
        "a deadline that has passed: {v}"
    );

    // The proof's deadline bounds the signature made with it.
    let deadline = unix_now() + 20;
    let v = sponsor(
        &app,
        &good.to_json(),
        ep07,
        ctx(proof_until(&key, &good, session, deadline)?),
    )
    .await?;
    let data = v["result"]["paymasterData"]
        .as_str()
        .ok_or_else(|| format!("signed: {v}"))?;
    let valid_until = u64::from_str_radix(&data[2..14], 16)?;
    assert_eq!(valid_until, deadline, "{v}");
    Ok(())
}

// 5. A repeat returned an expired signature -----------------------------------------------------

/// A stored answer was handed out again until its record expired, an hour after its
/// `validUntil`. One that expires within 30 s is now replaced, counted once.
#[tokio::test]
async fn a_repeat_never_returns_a_signature_about_to_expire() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[budgeted_counter()]).await?;
    let op = counter_op(SENDER, 9, "increment()").to_json();
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = json!({ "sponsorshipPolicyId": "budgeted" });
    let mut short = ctx.clone();
    short["validForSeconds"] = json!(1);
    let first = sponsor(&app, &op, ep07, short).await?;
    let repeat = sponsor(&app, &op, ep07, ctx.clone()).await?;
    let valid_until = |v: &Value| -> TestResult<u64> {
        let data = v["result"]["paymasterData"]
            .as_str()
            .ok_or_else(|| format!("signed: {v}"))?;
        Ok(u64::from_str_radix(&data[2..14], 16)?)
    };
    assert!(valid_until(&first)? <= unix_now() + 1);
    let fresh = valid_until(&repeat)?;
    assert!(
        fresh > unix_now() + 30,
        "a fresh signature, valid until {fresh}"
    );
    assert_eq!(
        sponsor(&app, &op, ep07, ctx).await?["result"],
        repeat["result"],
        "now stored"
    );
    let scope = crate::helpers::policy_day_scope();
    assert_eq!(
        app.state
            .sponsor
            .ledger()
            .usage("budgeted", &scope)
            .await?
            .1,
        1,
        "counted once"
    );
    Ok(())
}

// 6. Client-chosen paymaster gas -------------------------------------------------------------

/// `pm_getPaymasterData` signed any paymaster gas the client kept: a postOp limit (we have no
/// postOp) only pays the EntryPoint's unused-gas penalty to the bundler, and a huge
/// verification limit inflates the worst case.
#[tokio::test]
async fn client_chosen_paymaster_gas_is_bounded() -> TestResult {
    let app = TestApp::spawn(config(
        [Some(PM07), Some(PM08), Some(PM09)],
        KeySource::Ephemeral,
    ))
    .await?;
    let with_gas = |verification: u64, post_op: u64| {
        let mut op = counter_op(SENDER, 0, "increment()").to_json();
        op["paymaster"] = json!(PM07);
        op["paymasterVerificationGasLimit"] = json!(format!("{verification:#x}"));
        op["paymasterPostOpGasLimit"] = json!(format!("{post_op:#x}"));
        op["paymasterData"] = json!("0x");
        json!([op, ep(EntryPointVersion::V0_7), "0x7a69", {}])
    };
    let err = app
        .error("pm_getPaymasterData", with_gas(40_000, 0x10000))
        .await?;
    assert_eq!(
        err["data"]["field"],
        json!("paymasterPostOpGasLimit"),
        "{err}"
    );
    let err = app
        .error("pm_getPaymasterData", with_gas(80_001, 0))
        .await?;
    assert_eq!(
        err["data"]["field"],
        json!("paymasterVerificationGasLimit"),
        "{err}"
    );
    let ok = app
        .result("pm_getPaymasterData", with_gas(80_000, 0))
        .await?;
    assert_eq!(
        ok["paymasterVerificationGasLimit"],
        json!("0x13880"),
        "kept: {ok}"
    );
    assert_eq!(ok["paymasterPostOpGasLimit"], json!("0x0"));
    Ok(())
}

// 7. Revocation race ---------------------------------------------------------------------------

/// The reservation did not re-check the session: a request that had read the grant before
/// `DELETE` could still be signed after `DELETE` answered. The revocation is now written where
/// the reservation script reads it, before the admin API answers: a reservation built from a
/// grant read before the revocation (a request in flight) is refused after it.
#[tokio::test]
async fn a_request_in_flight_during_revocation_is_not_signed_after_it() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[token_policy("tokens", "")]).await?;
    let account = Address::repeat_byte(0xa6);
    let session = capped_session(&app, account, "tokens", 100).await?;
    let sponsor = &app.state.sponsor;
    // The in-flight request has read the grant: active.
    let grant = sponsor.sessions().get(session).await?.ok_or("grant")?;
    let (status, _) = revoke(&app, session).await?;
    assert_eq!(status, 200);
    // It now reaches the atomic step with what it read.
    let now = unix_now();
    let op = transfer_op(account, 1, 1);
    let reservation = Reservation {
        policy: grant.policy.clone(),
        op_key: B256::repeat_byte(1),
        landing_key: landing_key(31337, ep(EntryPointVersion::V0_7), account, op.nonce),
        user_op_hashes: vec![B256::repeat_byte(2)],
        answer: PaymasterData {
            window: ValidityWindow::new(now - 60, now + 600)?,
            signature: [1; 65],
        },
        cost_gwei: 1,
        scopes: vec![],
        session: Some(SessionCharge {
            id: grant.session_id,
            expires_at: grant.valid_until + GRACE_SECS,
            spend: vec![],
        }),
        expires_at: now + 600 + GRACE_SECS,
    };
    assert_eq!(
        sponsor.ledger().reserve(&reservation, false, now).await?,
        Outcome::SessionRevoked
    );
    // A request that starts after the revocation reads the revoked grant: refused too, but that
    // alone would not show the race.
    let v = crate::hostile::sponsor(
        &app,
        &op.to_json(),
        ep(EntryPointVersion::V0_7),
        json!({ "sessionId": session }),
    )
    .await?;
    assert_eq!(reason(&v), "session_revoked", "{v}");
    Ok(())
}

/// A replica keeps a copy of each grant it read or created (`session::cache`, for up to 10 s), so it does
/// not see another replica's revocation at once. Its copy must not decide: the ledger step reads
/// the revocation, and every request under a grant runs it, signed ones, stubs and explanations
/// alike, before it hands back even an answer given earlier. A guard written with the copies
/// (before them, each request read the grant from Redis): without the ledger's check it fails.
/// With and without a session budget: where the session's budget is shared (its grant of
/// version 2), the ledger reads its status in that budget's hash, else in its state key. And
/// with the copy a read (the grant created at b) as well as a create (at a) kept.
#[tokio::test]
async fn a_replicas_copy_of_a_grant_revoked_elsewhere_signs_nothing() -> TestResult {
    copy_of_a_grant_revoked_elsewhere_signs_nothing("", false).await?;
    copy_of_a_grant_revoked_elsewhere_signs_nothing("[budgets]\nsession = { ops = 100 }", false)
        .await?;
    copy_of_a_grant_revoked_elsewhere_signs_nothing("", true).await
}

async fn copy_of_a_grant_revoked_elsewhere_signs_nothing(
    extra: &str,
    created_at_b: bool,
) -> TestResult {
    let redis = TestRedis::start().await?;
    let policies = [token_policy("tokens", extra)];
    let (a, _dir_a) = app_with(&redis, &policies).await?;
    let (b, _dir_b) = app_with(&redis, &policies).await?;
    let account = Address::repeat_byte(0xa7);
    let creator = if created_at_b { &b } else { &a };
    let session = capped_session(creator, account, "tokens", 100).await?;
    let ctx = json!({ "sessionId": session });
    let ep07 = ep(EntryPointVersion::V0_7);
    let v = sponsor(&a, &transfer_op(account, 1, 1).to_json(), ep07, ctx.clone()).await?;
    assert!(v["result"]["paymasterData"].is_string(), "{v}");

    let (status, _) = revoke(&b, session).await?;
    assert_eq!(status, 200);
    // Replica a still holds its copy, active: without the ledger's check it would sign.
    let (copy, source) = a
        .state
        .sponsor
        .sessions()
        .get_for_sponsorship(session)
        .await?;
    assert_eq!(source, GrantSource::Copy);
    let copy = copy.ok_or("a's copy")?;
    assert_eq!(copy.status, SessionStatus::Active);
    assert!(
        copy.shared_budget,
        "a grant of version 2 on a Redis of this build alone"
    );

    let v = sponsor(&a, &transfer_op(account, 1, 2).to_json(), ep07, ctx.clone()).await?;
    assert_eq!(reason(&v), "session_revoked", "{v}");
    let stub = a
        .error(
            "pm_getPaymasterStubData",
            json!([transfer_op(account, 1, 3).to_json(), ep07, "0x7a69", ctx]),
        )
        .await?;
    assert_eq!(stub["data"]["reason"], json!("session_revoked"), "{stub}");
    let explained = a
        .result(
            "pm_explainSponsorship",
            json!([transfer_op(account, 1, 3).to_json(), ep07, ctx.clone()]),
        )
        .await?;
    assert_eq!(explained["decision"], json!("rejected"), "{explained}");
    assert_eq!(
        explained["rejection"]["reason"],
        json!("session_revoked"),
        "{explained}"
    );
    // The operation signed before the revocation, asked again: not handed out again either.
    let v = sponsor(&a, &transfer_op(account, 1, 1).to_json(), ep07, ctx).await?;
    assert_eq!(reason(&v), "session_revoked", "{v}");
    // Nothing was spent under it after the revocation: the first transfer's 1 only.
    assert_eq!(spent(&b, session).await?, json!("1"));
    // The first request read the grant from Redis and the four after the revocation took
    // a's copy; where a created the grant, all five took the copy it kept then.
    let text = reqwest::get(format!("{}/metrics", a.url))
        .await?
        .text()
        .await?;
    let reads: &[&str] = if created_at_b {
        &[
            "sp_session_grant_reads_total{source=\"store\"} 1",
            "sp_session_grant_reads_total{source=\"copy\"} 4",
        ]
    } else {
        &["sp_session_grant_reads_total{source=\"copy\"} 5"]
    };
    for line in reads {
        assert!(text.lines().any(|l| l == *line), "{line} in:\n{text}");
    }
    assert_eq!(
        text.contains("source=\"store\"} "),
        created_at_b,
        "in:\n{text}"
    );
    Ok(())
}

/// With copies served for up to five minutes while the revocation feed is followed
/// (`session::cache`), a revocation on one replica must reach another's copy through the feed
/// (the ledger refuses the session either way; the copy decides whether the grant's own checks
/// and the signing run). And a feed this replica cannot trust (emptied, or an entry this
/// service did not write) must break its run of reads, so that copies fall back to 10 s.
#[tokio::test]
async fn a_revocation_reaches_another_replicas_copy_through_the_feed() -> TestResult {
    use session_paymaster::session::SessionStore;
    use session_paymaster::session::redis::REVOCATIONS_KEY;
    let redis = TestRedis::start().await?;
    let policies = [token_policy("tokens", "")];
    let (a, _dir_a) = app_with(&redis, &policies).await?;
    let (b, _dir_b) = app_with(&redis, &policies).await?;
    let SessionStore::Redis(a_sessions) = a.state.sponsor.sessions() else {
        return Err("replica a keeps its sessions in Redis".into());
    };
    let account = Address::repeat_byte(0xa9);
    // Created at b: a reads them from Redis once its run of reads of the feed has begun.
    let (first, second) = (
        capped_session(&b, account, "tokens", 100).await?,
        capped_session(&b, account, "tokens", 100).await?,
    );
    // The first read finds the feed's end (nothing before it is read); an empty feed gets an
    // entry, so that a feed emptied later is below every replica's place.
    assert_eq!(a_sessions.follow_revocations().await?, 0);
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let length: u64 = redis::cmd("XLEN")
        .arg(REVOCATIONS_KEY)
        .query_async(&mut conn)
        .await?;
    assert_eq!(length, 1);
    let store = a.state.sponsor.sessions();
    for id in [first, second] {
        assert_eq!(store.get_for_sponsorship(id).await?.1, GrantSource::Store);
        assert_eq!(store.get_for_sponsorship(id).await?.1, GrantSource::Copy);
    }

    let (status, _) = revoke(&b, first).await?;
    assert_eq!(status, 200);
    // b wrote the revocation to the feed, the grant's id as it is.
    let feed = crate::sessions::feed_entries(&mut conn).await?;
    assert_eq!(feed.len(), 2, "{feed:?}");
    assert_eq!(feed[1].1, vec![(b"id".to_vec(), first.to_vec())]);
    // Until a reads the feed its copy stands (the ledger refuses the session meanwhile);
    // once it has, a reads the revoked grant from Redis, and keeps its other copy.
    assert_eq!(store.get_for_sponsorship(first).await?.1, GrantSource::Copy);
    assert_eq!(a_sessions.follow_revocations().await?, 1);
    let (grant, source) = store.get_for_sponsorship(first).await?;
    assert_eq!(source, GrantSource::Store);
    assert_eq!(grant.ok_or("first")?.status, SessionStatus::Revoked);
    assert_eq!(
        store.get_for_sponsorship(second).await?.1,
        GrantSource::Copy
    );
    assert_eq!(a_sessions.follow_revocations().await?, 0, "read once");

    assert!(a_sessions.follows_revocations());
    // The feed emptied (a Redis flushed, or behind a after a failover): a stops following,
    // then follows again from the feed's end. Twice: the second time no revocation came
    // since a began again, its place the entry its own first read wrote. Then emptied and
    // written again (a revocation) before a reads it: the same.
    for revoke_after_flush in [false, false, true] {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        if revoke_after_flush {
            let (status, _) = revoke(&b, second).await?;
            assert_eq!(status, 404, "flushed");
        }
        let lost = a_sessions.follow_revocations().await;
        assert!(
            matches!(&lost, Err(StoreError::Unavailable(m)) if m.contains("revocation feed was lost")),
            "{lost:?}"
        );
        assert!(!a_sessions.follows_revocations(), "copies back to 10 s");
        assert_eq!(a_sessions.follow_revocations().await?, 0);
        assert!(a_sessions.follows_revocations());
        assert_eq!(a_sessions.follow_revocations().await?, 0);
    }
    // An unknown id's revocation is still written (a copy of a grant deleted by hand).
    let (status, _) = revoke(&b, second).await?;
    assert_eq!(status, 404);
    assert_eq!(a_sessions.follow_revocations().await?, 1);
    // An entry this service did not write names nothing it can drop: the same as lost.
    let _: String = redis::cmd("XADD")
        .arg(REVOCATIONS_KEY)
        .arg("*")
        .arg("id")
        .arg("not a grant id")
        .query_async(&mut conn)
        .await?;
    assert!(a_sessions.follow_revocations().await.is_err());
    assert!(!a_sessions.follows_revocations());
    assert_eq!(a_sessions.follow_revocations().await?, 0);
    Ok(())
}

/// A revocation whose feed cannot be written (here `sp:g:revocations` made a string by hand)
/// answers 503 and says it may stand in part: it does, the ledger and the grant already refuse
/// the session, and no replica follows the feed meanwhile (copies back to 10 s). Once the key
/// is mended, the retry answers 200. A grant read that fails keeps the plain 503 (nothing was
/// written).
#[tokio::test]
async fn a_revocation_whose_feed_write_fails_already_stands_and_says_so() -> TestResult {
    use session_paymaster::session::SessionStore;
    use session_paymaster::session::redis::REVOCATIONS_KEY;
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[token_policy("tokens", "")]).await?;
    let SessionStore::Redis(sessions) = app.state.sponsor.sessions() else {
        return Err("sessions in Redis".into());
    };
    let account = Address::repeat_byte(0xaa);
    let session = capped_session(&app, account, "tokens", 100).await?;
    let ctx = json!({ "sessionId": session });
    let ep07 = ep(EntryPointVersion::V0_7);
    let v = sponsor(
        &app,
        &transfer_op(account, 1, 1).to_json(),
        ep07,
        ctx.clone(),
    )
    .await?;
    assert!(v["result"]["paymasterData"].is_string(), "{v}");
    assert_eq!(sessions.follow_revocations().await?, 0);
    assert!(sessions.follows_revocations());

    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL")
        .arg(REVOCATIONS_KEY)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg(REVOCATIONS_KEY)
        .arg("not a stream")
        .query_async(&mut conn)
        .await?;
    let (status, body) = revoke(&app, session).await?;
    assert_eq!(status, 503, "{body}");
    let said = body["error"].as_str().unwrap_or_default();
    assert!(
        said.contains("may be written in part") && said.contains("retry"),
        "{body}"
    );
    assert!(!said.contains("WRONGTYPE"), "no Redis internals: {body}");
    // It stands: the grant reads revoked, and the ledger refuses the session.
    let grant = app.state.sponsor.sessions().get(session).await?;
    assert_eq!(grant.ok_or("the grant")?.status, SessionStatus::Revoked);
    let v = sponsor(&app, &transfer_op(account, 1, 2).to_json(), ep07, ctx).await?;
    assert_eq!(reason(&v), "session_revoked", "{v}");
    // The feed cannot be read either: copies are held to 10 s.
    assert!(sessions.follow_revocations().await.is_err());
    assert!(!sessions.follows_revocations());

    let _: () = redis::cmd("DEL")
        .arg(REVOCATIONS_KEY)
        .query_async(&mut conn)
        .await?;
    let (status, body) = revoke(&app, session).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], json!("revoked"), "{body}");

    // A read that fails (a grant's key of another type) wrote nothing, and says to retry.
    let odd = B256::repeat_byte(0x5d);
    let _: () = redis::cmd("HSET")
        .arg([b"sp:g:".as_slice(), odd.as_slice()].concat())
        .arg("x")
        .arg(1)
        .query_async(&mut conn)
        .await?;
    let path = format!("/admin/sessions/{odd}");
    let (status, body) =
        crate::sessions::admin(&app, "GET", &path, None, Some(crate::helpers::ADMIN_TOKEN)).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["error"],
        json!("session store unavailable: retry"),
        "{body}"
    );
    Ok(())
}

/// Session ids a stranger makes up must not fill a replica's grant copies: only grants found are
/// kept (`session::cache`), so an unknown id is looked up in Redis every time and leaves nothing.
#[tokio::test]
async fn made_up_session_ids_are_not_remembered() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[token_policy("tokens", "")]).await?;
    let op = transfer_op(Address::repeat_byte(0xa8), 1, 1).to_json();
    for n in [1u8, 2, 1, 2] {
        let ctx = json!({ "sessionId": B256::repeat_byte(n) });
        let v = sponsor(&app, &op, ep(EntryPointVersion::V0_7), ctx).await?;
        assert_eq!(reason(&v), "session_not_found", "{v}");
    }
    let text = reqwest::get(format!("{}/metrics", app.url))
        .await?
        .text()
        .await?;
    assert!(
        text.lines()
            .any(|l| l == "sp_session_grant_reads_total{source=\"store\"} 4"),
        "each lookup went to Redis:\n{text}"
    );
    assert!(
        !text.contains("source=\"copy\"} "),
        "no copy served:\n{text}"
    );
    Ok(())
}

/// Found in review: a repeat of an answer about to expire released its reservation (and could
/// make a new one that expired first) while the first signature could still land, uncounted.
/// The reservation is now extended to the fresh answer, and released only after every
/// signature of it expired.
#[tokio::test]
async fn a_refreshed_answer_keeps_every_signature_of_it_reserved() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[budgeted_counter()]).await?;
    let op = counter_op(SENDER, 11, "increment()").to_json();
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = |secs: u64| json!({ "sponsorshipPolicyId": "budgeted", "validForSeconds": secs });
    let first = sponsor(&app, &op, ep07, ctx(29)).await?;
    assert!(first["result"]["paymasterData"].is_string(), "{first}");
    let shorter = sponsor(&app, &op, ep07, ctx(1)).await?;
    assert_eq!(
        shorter["result"], first["result"],
        "a shorter answer is no refresh"
    );
    let fresh = sponsor(&app, &op, ep07, ctx(600)).await?;
    assert_ne!(fresh["result"], first["result"], "a fresh answer");
    let ledger = app.state.sponsor.ledger();
    let scope = crate::helpers::policy_day_scope();
    assert_eq!(ledger.usage("budgeted", &scope).await?.1, 1, "counted once");
    // A confirmed block past the first answer's end releases nothing: the fresh one is valid.
    let policies = vec!["budgeted".to_owned()];
    assert_eq!(ledger.release_expired(&policies, unix_now() + 35).await?, 0);
    assert_eq!(ledger.usage("budgeted", &scope).await?.1, 1);
    Ok(())
}

/// Found in review: a reservation refreshed again and again kept only its latest 8 hashes, so
/// the first answers, still valid, could land unknown to it (and, with another operation of the
/// nonce ground to the same 8 bytes on EntryPoint v0.9, have that one settled in its place:
/// `ledger::*_ledger_contract`). Through HTTP: eight answers of one operation, each asked for
/// with a window just under the refresh margin, extend one reservation; the ninth is a new one,
/// charged again, and the first stays open beside it.
#[tokio::test]
async fn an_answer_refreshed_past_its_records_hashes_is_reserved_again() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[budgeted_counter()]).await?;
    let op = counter_op(SENDER, 12, "increment()").to_json();
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = |secs: u64| json!({ "sponsorshipPolicyId": "budgeted", "validForSeconds": secs });
    let ledger = app.state.sponsor.ledger();
    let scope = crate::helpers::policy_day_scope();
    let mut answers = Vec::new();
    let mut one_worst_case = 0;
    // One hash an answer on v0.7: eight fill a record.
    for secs in 21..=29 {
        let v = sponsor(&app, &op, ep07, ctx(secs)).await?;
        assert!(v["result"]["paymasterData"].is_string(), "{secs} s: {v}");
        assert!(
            !answers.contains(&v["result"]),
            "a fresh answer at {secs} s"
        );
        answers.push(v["result"].clone());
        let ops = ledger.usage("budgeted", &scope).await?.1;
        assert_eq!(
            ops,
            if secs < 29 { 1 } else { 2 },
            "after the answer of {secs} s"
        );
        if secs == 21 {
            one_worst_case = ledger.open("budgeted", &scope).await?;
        }
    }
    // Both open at their worst case: the record of the first eight answers was kept, not closed.
    assert!(one_worst_case > 0);
    assert_eq!(ledger.open("budgeted", &scope).await?, 2 * one_worst_case);
    Ok(())
}

/// Found in review: variants of one operation under a session (other fees, or other paymaster
/// gas kept by the client; one observed proof is enough) each reserved their worst case,
/// though only one can land: they could tie up the whole session budget. One nonce holds at
/// most four open reservations per session.
#[tokio::test]
async fn variants_of_one_nonce_hold_a_bounded_budget() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[token_policy("tokens", "")]).await?;
    let account = Address::repeat_byte(0xa9);
    let session = capped_session(&app, account, "tokens", 1_000).await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = json!({ "sessionId": session });
    let variant = |tip: u128| {
        UserOperation {
            max_priority_fee_per_gas: tip,
            ..transfer_op(account, 1, 12)
        }
        .to_json()
    };
    for tip in 1..=4 {
        let v = sponsor(&app, &variant(tip), ep07, ctx.clone()).await?;
        assert!(
            v["result"]["paymasterData"].is_string(),
            "variant {tip}: {v}"
        );
    }
    let v = sponsor(&app, &variant(5), ep07, ctx.clone()).await?;
    assert_eq!(reason(&v), "nonce_pending", "{v}");
    assert!(
        sponsor(&app, &transfer_op(account, 1, 13).to_json(), ep07, ctx).await?["result"]
            .is_object()
    );
    Ok(())
}

/// Found in review: a nonce's records were capped only while open. Released ones stay an hour
/// past their end (a late event still finds them), so a client cycling variants of one
/// operation with `validForSeconds: 1`, each released as it expired and its budget given back,
/// grew the nonce's Redis key, which every call on the nonce reads, without bound. A nonce now
/// keeps at most MAX_RECORDS_PER_NONCE records, and a full one drops its oldest released ones:
/// whoever filled it blocks nothing, and another operation of that nonce is still sponsored.
#[tokio::test]
async fn cycled_variants_of_one_nonce_keep_its_records_bounded() -> TestResult {
    let redis = TestRedis::start().await?;
    let policy = counter_policy("cycled", 1_000);
    let (app, _dir) = app_with(&redis, &[("cycled.toml".into(), policy)]).await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = json!({ "sponsorshipPolicyId": "cycled", "validForSeconds": 1 });
    let nonce = 21;
    let variant = |tip: u128| {
        UserOperation {
            max_priority_fee_per_gas: tip,
            ..counter_op(SENDER, nonce, "increment()")
        }
        .to_json()
    };
    let ledger = app.state.sponsor.ledger();
    let policies = vec!["cycled".to_owned()];
    let mut tip = 1;
    for cycle in 0..MAX_RECORDS_PER_NONCE / MAX_OPEN_PER_NONCE_ANY + 2 {
        for _ in 0..MAX_OPEN_PER_NONCE_ANY {
            let v = sponsor(&app, &variant(tip), ep07, ctx.clone()).await?;
            assert!(
                v["result"]["paymasterData"].is_string(),
                "cycle {cycle}, tip {tip}: {v}"
            );
            tip += 1;
        }
        // Released once a confirmed block is past their end, as the watcher would.
        assert_eq!(
            ledger.release_expired(&policies, unix_now() + 5).await?,
            MAX_OPEN_PER_NONCE_ANY
        );
    }
    // The nonce's key: its entries are a u8-prefixed id and a u16-prefixed record each.
    let landing = landing_key(31337, ep07, SENDER, U256::from(nonce));
    let key = [&b"sp:{cycled}:n:"[..], &landing[..20]].concat();
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let data: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
    let (mut records, mut at) = (0, 0);
    while at < data.len() {
        at += 1 + usize::from(data[at]);
        let body = data.get(at..at + 2).ok_or("a truncated entry")?;
        at += 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
        records += 1;
    }
    assert_eq!(at, data.len(), "whole entries");
    assert!(
        (1..=MAX_RECORDS_PER_NONCE).contains(&records),
        "{records} records in the nonce's key after {} variants",
        tip - 1
    );
    // Another operation of that nonce (the account's own, say) is still sponsored.
    let own = sponsor(&app, &variant(tip), ep07, ctx).await?;
    assert!(own["result"]["paymasterData"].is_string(), "{own}");
    Ok(())
}

/// Found in review: under a policy with op-count budgets but no cost cap, an absurd gas field
/// made a worst case beyond what the ledger's counters hold (2^53 gwei); the next reservations
/// of the scope then overflowed Redis integers and failed for the rest of the period.
#[tokio::test]
async fn an_absurd_worst_case_cannot_break_the_counters() -> TestResult {
    let redis = TestRedis::start().await?;
    let policy = counter_policy("ops-only", 100);
    let (app, _dir) = app_with(&redis, &[("ops-only.toml".into(), policy)]).await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = json!({ "sponsorshipPolicyId": "ops-only" });
    // 6·10^17 gas at 2 gwei: 1.2·10^18 gwei, past 2^53 and below 2^63.
    let mut absurd = counter_op(SENDER, 14, "increment()").to_json();
    absurd["preVerificationGas"] = json!(format!("{:#x}", 600_000_000_000_000_000u64));
    let v = sponsor(&app, &absurd, ep07, ctx.clone()).await?;
    assert_eq!(reason(&v), "cost_too_high", "{v}");
    for nonce in 15..18 {
        let v = sponsor(
            &app,
            &counter_op(SENDER, nonce, "increment()").to_json(),
            ep07,
            ctx.clone(),
        )
        .await?;
        assert!(
            v["result"]["paymasterData"].is_string(),
            "the scope still works: {v}"
        );
    }
    Ok(())
}

/// A sender's budget is a field, the sender's 20 bytes, of one Redis hash its window shares
/// with every sender (ledger 0.3), and the sender is the field of it a stranger picks. Senders
/// one byte apart (the first, the last) each spend their own budget only, however many share
/// the hash; the refusal names the refused sender's own scope and its own count; the same
/// sender under another policy has another counter.
#[tokio::test]
async fn a_senders_budget_is_its_own_in_its_windows_shared_hash() -> TestResult {
    let redis = TestRedis::start().await?;
    let policy = |id: &str| {
        (
            format!("{id}.toml"),
            format!(
                "id = \"{id}\"\nchains = [31337]\nentry_points = [\"0.7\"]\n\
                 [budgets]\nsender = {{ ops = 2, period = \"1d\" }}\n\
                 [[allow]]\ntarget = \"{COUNTER}\"\nfunctions = [\"increment()\"]\n"
            ),
        )
    };
    let (app, _dir) = app_with(&redis, &[policy("senders"), policy("others")]).await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = |id: &str| json!({ "sponsorshipPolicyId": id });
    let one_byte_off = |at: usize| {
        let mut a = [0x5e; 20];
        a[at] = 0x5f;
        Address::from(a)
    };
    let senders = [SENDER, one_byte_off(0), one_byte_off(19)];
    let mut nonce = 0;
    let mut next = |sender: Address| {
        nonce += 1;
        counter_op(sender, nonce, "increment()").to_json()
    };
    for sender in senders {
        for _ in 0..2 {
            let v = sponsor(&app, &next(sender), ep07, ctx("senders")).await?;
            assert!(v.get("result").is_some(), "{sender}: {v}");
        }
    }
    let day = unix_now() / 86_400;
    for sender in senders {
        let v = sponsor(&app, &next(sender), ep07, ctx("senders")).await?;
        assert_eq!(reason(&v), "budget_exhausted", "{sender}: {v}");
        let data = &v["error"]["data"];
        assert_eq!(
            data["scope"],
            json!(format!("sender:0x{}:{day}", alloy::hex::encode(sender))),
            "{v}"
        );
        assert_eq!(
            (&data["used"], &data["limit"]),
            (&json!(2), &json!(2)),
            "{v}"
        );
    }
    let v = sponsor(&app, &next(SENDER), ep07, ctx("others")).await?;
    assert!(v.get("result").is_some(), "another policy's counter: {v}");
    Ok(())
}

/// Flood one policy while Redis is slow, to grow what the service holds for it without end
/// (under load a policy's reservations wait for its calls in flight, `ledger::batch`), or to
/// get reserved what the service refused. Redis pauses its writes and 600 requests of one
/// policy come meanwhile: the first goes in a call alone (the others are sent once Redis holds
/// it: else those that came while its task yielded would go in it too, `ledger::batch`), the
/// next 32 fill a second call in flight, 512 wait (`ledger::MAX_IN_FLIGHT`, `MAX_BATCH`,
/// `MAX_WAITING`), and the other 55 are refused at once (`store_unavailable`, retryable),
/// never sent to Redis; once it is back, the 545 are signed, and the budget counts exactly
/// those. (Redis stays paused until the 55 refusals are in, however long 600 requests take to
/// come on a slow machine.)
#[tokio::test]
async fn a_flood_of_one_policy_while_redis_is_slow_waits_in_bounds() -> TestResult {
    use session_paymaster::ledger::{MAX_BATCH, MAX_IN_FLIGHT, MAX_WAITING};
    // (1,200 sockets in this process: the client's and the service's.)
    session_paymaster::server::raise_open_files();
    let held = (1 + (MAX_IN_FLIGHT - 1) * MAX_BATCH + MAX_WAITING) as u64;
    let (total, over) = (held + 55, 55);
    let redis = TestRedis::start().await?;
    let dir = counter_policy_dir("hostile", "flood", 1000)?;
    let mut c = config([Some(PM07), Some(PM08), Some(PM09)], KeySource::Ephemeral);
    c.policies_dir = dir.0.clone();
    c.redis_url = Some(redis.url.clone());
    // Longer than the pause: the calls in flight wait for Redis, and the requests for them,
    // not time out.
    c.redis_timeout = std::time::Duration::from_secs(120);
    let limits = session_paymaster::server::ConnectionLimits {
        request_timeout: std::time::Duration::from_secs(300),
        ..Default::default()
    };
    let app = TestApp::spawn_with_limits(c, limits).await?;
    let client = redis::Client::open(redis.url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("WRITE")
        .query_async::<()>(&mut conn)
        .await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    // One client for all (a client each would spend the pause making clients); the answers as
    // they come.
    let http = reqwest::Client::new();
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let send = |i: u64| {
        let (url, http) = (app.url.clone(), http.clone());
        let sender = Address::from_word(B256::from(U256::from(0x5e00 + i)));
        let body = json!({
            "jsonrpc": "2.0", "id": i, "method": "pm_sponsorUserOperation",
            "params": [counter_op(sender, 0, "increment()").to_json(), ep07,
                       { "sponsorshipPolicyId": "flood" }]
        });
        let answers = answers.clone();
        tokio::spawn(async move {
            let v = http
                .post(url)
                .json(&body)
                .send()
                .await?
                .json::<Value>()
                .await?;
            let _ = answers.send(v);
            Ok::<_, reqwest::Error>(())
        })
    };
    let mut tasks = vec![send(0)];
    // Redis holds the first call (its client blocked by the pause, `flags=b`).
    let held_in_redis = async || -> TestResult<bool> {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn.clone())
            .await?;
        Ok(clients
            .lines()
            .any(|l| l.contains(" flags=b ") && l.contains(" cmd=fcall ")))
    };
    let wait_until = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !held_in_redis().await? {
        assert!(
            tokio::time::Instant::now() < wait_until,
            "the first call never reached Redis"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tasks.extend((1..total).map(send));
    drop(answers);
    let (mut signed, mut refused) = (0u64, 0u64);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(100);
    let mut unpaused = false;
    while let Ok(Some(v)) = tokio::time::timeout_at(deadline, answered.recv()).await {
        if v["result"]["paymasterData"].is_string() {
            signed += 1;
        } else {
            assert_eq!(reason(&v), "store_unavailable", "{v}");
            refused += 1;
        }
        if refused == over && !unpaused {
            // Every request is in: the held ones wait, the rest were refused.
            assert_eq!(signed, 0, "nothing signed while Redis is paused");
            redis::cmd("CLIENT")
                .arg("UNPAUSE")
                .query_async::<()>(&mut conn)
                .await?;
            unpaused = true;
        }
    }
    assert!(
        unpaused,
        "by the deadline: {refused} refused, {signed} signed"
    );
    for task in tasks {
        task.await??;
    }
    // Exactly the bound: had the refused waited, they would have been signed once Redis was
    // back (the budget allows 1000).
    assert_eq!((signed, refused), (held, over));
    let day = unix_now() / 86_400;
    let (_, ops) = app
        .state
        .sponsor
        .ledger()
        .usage("flood", &format!("policy:{day}"))
        .await?;
    assert_eq!(
        ops, signed,
        "the budget counts what was signed, none of what was refused"
    );
    Ok(())
}

mod erc7579 {
    alloy::sol! {
        function execute(bytes32 mode, bytes executionCalldata);
    }
}

mod safe {
    alloy::sol! {
        function executeUserOp(address to, uint256 value, bytes data, uint8 operation);
        function multiSend(bytes transactions);
    }
}

/// Found in review: three fields a stranger writes that reached the ledger or a grant while no
/// EntryPoint or account would treat them as the checks did, each refused now at the boundary:
/// - a `preVerificationGas` above 120 bits (every EntryPoint refuses it, AA94; its wrapping sum
///   made the worst case next to nothing): `-32602` on the field, not a policy's refusal;
/// - a call to `address(0)` in ERC-7579 `execute`, which an ERC-7821 account (the same selector
///   and batch mode) runs as a call to itself: refused even under a policy that lists `0x0`;
///   and a Safe's MultiSend transaction to `address(0)`, which MultiSend 1.5 runs as one to the
///   Safe itself;
/// - a session `spend` cap on `0x0` or the native placeholder, which no token call targets:
///   refused by the admin API rather than stored as a cap that caps nothing.
#[tokio::test]
async fn fields_no_entry_point_or_account_runs_as_checked_are_refused() -> TestResult {
    use crate::helpers::ADMIN_TOKEN;
    use alloy::primitives::FixedBytes;

    let redis = TestRedis::start().await?;
    let zero_target = (
        "zero.toml".to_owned(),
        "id = \"zero\"\nchains = [31337]\nentry_points = [\"0.7\"]\n\
         [[allow]]\ntarget = \"0x0000000000000000000000000000000000000000\"\nfunctions = [\"*\"]\n"
            .to_owned(),
    );
    let (app, _dir) = app_with(&redis, &[budgeted_counter(), zero_target]).await?;
    let ep07 = ep(EntryPointVersion::V0_7);

    let mut op = counter_op(SENDER, 0, "increment()").to_json();
    op["preVerificationGas"] = json!(format!("0x1{}", "0".repeat(30)));
    let v = sponsor(
        &app,
        &op,
        ep07,
        json!({ "sponsorshipPolicyId": "budgeted" }),
    )
    .await?;
    assert_eq!(
        (
            v["error"]["code"].clone(),
            v["error"]["data"]["field"].clone()
        ),
        (json!(-32602), json!("preVerificationGas")),
        "{v}"
    );

    let mut single = Address::ZERO.to_vec();
    single.extend_from_slice(&[0; 32]);
    single.extend_from_slice(&keccak256("owner()")[..4]);
    let owner = Bytes::from(keccak256("owner()")[..4].to_vec());
    let batch = vec![Call {
        target: Address::ZERO,
        value: U256::ZERO,
        data: owner,
    }]
    .abi_encode();
    let mut batch_mode = [0u8; 32];
    batch_mode[0] = 0x01;
    for (nonce, (mode, exec)) in [
        (FixedBytes::ZERO, Bytes::from(single)),
        (FixedBytes::from(batch_mode), Bytes::from(batch)),
    ]
    .into_iter()
    .enumerate()
    {
        let call = erc7579::executeCall {
            mode,
            executionCalldata: exec,
        }
        .abi_encode();
        let v = sponsor(
            &app,
            &op_calling(call, 1 + nonce as u64),
            ep07,
            json!({ "sponsorshipPolicyId": "zero" }),
        )
        .await?;
        assert_eq!(reason(&v), "malformed_calldata", "mode {mode}: {v}");
    }
    // A Safe delegatecalling the canonical MultiSend 1.4.1 with one transaction, to 0x0: its
    // packed form (operation, to, value, data length, data).
    let mut packed = vec![0u8];
    packed.extend_from_slice(Address::ZERO.as_slice());
    packed.extend_from_slice(&U256::ZERO.to_be_bytes::<32>());
    packed.extend_from_slice(&U256::from(4u64).to_be_bytes::<32>());
    packed.extend_from_slice(&keccak256("owner()")[..4]);
    let multi_send = safe::executeUserOpCall {
        to: session_paymaster::policy::calldata::KNOWN_MULTISEND[3],
        value: U256::ZERO,
        data: safe::multiSendCall {
            transactions: packed.into(),
        }
        .abi_encode()
        .into(),
        operation: 1,
    }
    .abi_encode();
    let v = sponsor(
        &app,
        &op_calling(multi_send, 3),
        ep07,
        json!({ "sponsorshipPolicyId": "zero" }),
    )
    .await?;
    assert_eq!(reason(&v), "malformed_calldata", "multiSend to 0x0: {v}");
    assert!(detail(&v).contains("address(0)"), "{v}");

    for token in [
        Address::ZERO.to_string(),
        "0xEeeeeEeeeEeEeeEeEeEeeEEEeeeeEeeeeeeeEEeE".to_owned(),
    ] {
        let mut body = grant_request(SENDER, Address::repeat_byte(0xb1), "budgeted");
        body["permissions"] = json!({ "spend": [{ "token": token, "limit": "1" }] });
        let (status, v) = crate::sessions::admin(
            &app,
            "POST",
            "/admin/sessions",
            Some(body),
            Some(ADMIN_TOKEN),
        )
        .await?;
        assert_eq!(status, 400, "{token}: {v}");
        assert_eq!(
            v["issues"][0]["path"],
            json!("$.permissions.spend[0].token"),
            "{v}"
        );
    }
    Ok(())
}

/// SENDER's `executeBatch((address,uint256,bytes)[])` callData nested `entries.len()` levels
/// deep, the innermost first: each level's entries all name, by their offsets, one call after
/// them (no encoder writes it; Solidity's decoder, so the account, reads it as that call each
/// time): at the innermost level `(target, 0, data)`, above it a call of SENDER to itself of the
/// level below.
fn aliased_levels(entries: &[usize], target: Address, data: &[u8]) -> Vec<u8> {
    let word = |v: usize| U256::from(v).to_be_bytes::<32>();
    let (mut call_data, mut target) = (data.to_vec(), target);
    let selector =
        session_paymaster::policy::calldata::SimpleAccountV08::executeBatchCall::SELECTOR;
    for &entries in entries {
        let mut level = selector.to_vec();
        level.extend(word(0x20));
        level.extend(word(entries));
        for _ in 0..entries {
            level.extend(word(32 * entries));
        }
        level.extend([0; 12]);
        level.extend(target.as_slice());
        for w in [0, 0x60, call_data.len()] {
            level.extend(word(w));
        }
        level.extend(&call_data);
        level.resize(
            level.len() + call_data.len().next_multiple_of(32) - call_data.len(),
            0,
        );
        (call_data, target) = (level, SENDER);
    }
    call_data
}

/// Found in review: a batch's entries may point at the same call (the ABI allows it, and the
/// account's decoder follows it), and each level of self-calls multiplied the calls of the one
/// below, so a few kilobytes named millions of calls (7.5 kB, a hundred million: gigabytes)
/// before any policy ran, in every method that decodes. Here 3,684 bytes of five levels of
/// sixteen entries name 16^5 = 1,048,576 `increment()`s: refused as malformed by each method,
/// and the replica serves the next request.
#[tokio::test]
async fn a_calldata_bomb_is_refused_by_every_method_that_decodes() -> TestResult {
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(
        &redis,
        &[("ops-only.toml".into(), counter_policy("ops-only", 100))],
    )
    .await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let ctx = json!({ "sponsorshipPolicyId": "ops-only" });
    let call_data = aliased_levels(&[16; 5], COUNTER, &keccak256("increment()")[..4]);
    assert_eq!(call_data.len(), 3_684);
    let bomb = op_calling(call_data, 14);

    let v = sponsor(&app, &bomb, ep07, ctx.clone()).await?;
    assert_eq!(reason(&v), "malformed_calldata", "{v}");
    let detail = &v["error"]["data"]["detail"];
    assert!(
        detail
            .as_str()
            .is_some_and(|d| d.contains("offsets point at the same data")),
        "{v}"
    );
    let stub = app
        .error(
            "pm_getPaymasterStubData",
            json!([bomb, ep07, "0x7a69", ctx]),
        )
        .await?;
    let explained = app
        .result("pm_explainSponsorship", json!([bomb, ep07, ctx]))
        .await?;
    for refusal in [&stub["data"], &explained["rejection"]] {
        assert_eq!(
            (&refusal["reason"], &refusal["detail"]),
            (&json!("malformed_calldata"), detail),
            "{refusal}"
        );
    }
    let v = sponsor(
        &app,
        &counter_op(SENDER, 15, "increment()").to_json(),
        ep07,
        ctx,
    )
    .await?;
    assert!(v["result"]["paymasterData"].is_string(), "{v}");
    Ok(())
}

/// A repeat after the paymaster configured changed (a rotation, replicas of both sharing
/// Redis) got the answer stored for the old paymaster beside the new one's address: its
/// signature covers the old address, so the operation failed (`AA34`) until that answer was
/// about to expire (found by review). The paymaster is part of an operation's identity now: the
/// new one's answer is its own.
#[tokio::test]
async fn a_repeat_after_the_paymaster_changes_is_signed_for_the_new_one() -> TestResult {
    let redis = TestRedis::start().await?;
    let dir = crate::e2e::budgeted_policies()?;
    let app = |paymaster: Address| {
        let mut c = config([Some(paymaster), None, None], KeySource::Ephemeral);
        c.policies_dir = dir.0.clone();
        c.redis_url = Some(redis.url.clone());
        TestApp::spawn(c)
    };
    let (old, new) = (app(PM07).await?, app(Address::repeat_byte(0x17)).await?);
    let op = counter_op(SENDER, 0, "increment()").to_json();
    let entry_point = ep(EntryPointVersion::V0_7);
    let first = sponsor(&old, &op, entry_point, json!({})).await?;
    let again = sponsor(&old, &op, entry_point, json!({})).await?;
    assert_eq!(
        first["result"], again["result"],
        "a repeat, the same answer"
    );
    let rotated = sponsor(&new, &op, entry_point, json!({})).await?;
    assert_eq!(
        rotated["result"]["paymaster"],
        json!(Address::repeat_byte(0x17)),
        "{rotated}"
    );
    assert_ne!(
        rotated["result"]["paymasterData"], first["result"]["paymasterData"],
        "signed anew for the new paymaster, not the old one's answer: {rotated}"
    );
    Ok(())
}

/// Found in review: a call of the account to itself that the decoder does not follow (one with
/// value) was a leaf call to the sender, so under a policy allowing calls to the sender it was
/// signed, while an account that lets itself call its own `execute` (payable) runs whatever
/// that wraps, which no rule saw. Refused now through HTTP; a plain self-call of value 0 is
/// still followed (and its wrapped call checked).
#[tokio::test]
async fn a_self_call_the_decoder_does_not_follow_is_refused() -> TestResult {
    let redis = TestRedis::start().await?;
    let selfish = (
        "selfish.toml".to_owned(),
        format!(
            "id = \"selfish\"\nchains = [31337]\nentry_points = [\"0.7\"]\n\
             [[allow]]\ntarget = \"{SENDER}\"\nfunctions = [\"*\"]\nmax_value = \"1\"\n"
        ),
    );
    let (app, _dir) = app_with(&redis, &[budgeted_counter(), selfish]).await?;
    let ep07 = ep(EntryPointVersion::V0_7);
    let hidden = executeCall {
        dest: Address::repeat_byte(0x77),
        value: U256::ZERO,
        func: keccak256("drain()")[..4].to_vec().into(),
    }
    .abi_encode();
    let wrapping = |value: u64| {
        executeCall {
            dest: SENDER,
            value: U256::from(value),
            func: hidden.clone().into(),
        }
        .abi_encode()
    };
    let v = sponsor(
        &app,
        &op_calling(wrapping(1), 1),
        ep07,
        json!({ "sponsorshipPolicyId": "selfish" }),
    )
    .await?;
    assert_eq!(reason(&v), "malformed_calldata", "{v}");
    assert!(detail(&v).contains("the account itself"), "{v}");
    // Of value 0 it is followed: the wrapped call is what the policy judges (and refuses).
    let v = sponsor(
        &app,
        &op_calling(wrapping(0), 2),
        ep07,
        json!({ "sponsorshipPolicyId": "selfish" }),
    )
    .await?;
    assert_eq!(reason(&v), "target_not_allowed", "{v}");
    Ok(())
}

/// Found in review: `pm_explainSponsorship` listed every decoded call and every check of every
/// policy tried, and a batch held up to 100 of them: 2.4 KB of `callData` making 1,024 calls
/// answered megabytes, which a client reading slowly held in memory. An explanation now lists
/// at most `MAX_CALLS_SHOWN` calls and `MAX_CHECKS_SHOWN` checks (with their counts), and a
/// batch holds at most `MAX_EXPLAINS_PER_BATCH` explanations.
#[tokio::test]
async fn an_explanation_stays_small_whatever_the_call_data_makes() -> TestResult {
    use session_paymaster::rpc::MAX_EXPLAINS_PER_BATCH;
    use session_paymaster::sponsor::{MAX_CALLS_SHOWN, MAX_CHECKS_SHOWN};
    let redis = TestRedis::start().await?;
    let (app, _dir) = app_with(&redis, &[budgeted_counter()]).await?;
    // 32 self-calls, each of 31 calls to a target no rule allows: 992 calls (1,024 counted
    // with the self-calls, the most one `callData` may make).
    let call_data = aliased_levels(&[31, 32], Address::repeat_byte(0x77), &[1, 2, 3, 4]);
    let op = op_calling(call_data, 1);
    let asked = MAX_EXPLAINS_PER_BATCH + 2;
    let batch: Vec<Value> = (0..asked)
        .map(|i| {
            json!({ "jsonrpc": "2.0", "id": i, "method": "pm_explainSponsorship",
                    "params": [op, ep(EntryPointVersion::V0_7), {}] })
        })
        .collect();
    let (_, answers) = app.post(&Value::Array(batch).to_string()).await?;
    let body = answers.to_string();
    let answers = answers.as_array().ok_or("not a batch answer")?;
    assert_eq!(answers.len(), asked);
    for (i, a) in answers.iter().enumerate() {
        if i < MAX_EXPLAINS_PER_BATCH {
            let r = &a["result"];
            assert_eq!(
                (
                    r["decision"].clone(),
                    r["callCount"].clone(),
                    r["calls"].as_array().map(Vec::len),
                ),
                (json!("rejected"), json!(992), Some(MAX_CALLS_SHOWN)),
                "{}",
                session_paymaster::wire::cut(&a.to_string(), 2000)
            );
            assert!(
                r["checksOmitted"].as_u64().is_some_and(|n| n > 1000),
                "{}",
                r["checksOmitted"]
            );
            // The decision's rejection is whole, and each policy tried shows a failed check.
            assert_eq!(
                r["rejection"]["reason"],
                json!("no_matching_policy"),
                "{}",
                r["rejection"]
            );
            let checks = r["checks"].as_array().ok_or("checks")?;
            let failed: std::collections::BTreeSet<&str> = checks
                .iter()
                .filter(|c| c["passed"] == json!(false))
                .filter_map(|c| c["policy"].as_str())
                .collect();
            let tried: std::collections::BTreeSet<&str> =
                checks.iter().filter_map(|c| c["policy"].as_str()).collect();
            assert!(tried.len() > 1 && failed == tried, "{tried:?} {failed:?}");
            // The first 128 checks, then one a further policy.
            assert!(
                (MAX_CHECKS_SHOWN..=MAX_CHECKS_SHOWN + tried.len()).contains(&checks.len()),
                "{} checks of {} policies",
                checks.len(),
                tried.len()
            );
        } else {
            assert_eq!(a["error"]["code"], json!(-32600), "{a}");
        }
    }
    // (Hundreds of kilobytes each with the bounds lifted: `checksOmitted` above counts what
    // each would have listed.)
    assert!(body.len() < 600_000, "{} bytes", body.len());

    // A small explanation omits nothing, and says so; past the cap, one with an id of another
    // type is answered with a null id and a notification is answered nothing, as every call
    // is; and each refused one is counted among the requests.
    let small = op_calling(
        executeCall {
            dest: COUNTER,
            value: U256::ZERO,
            func: keccak256("increment()")[..4].to_vec().into(),
        }
        .abi_encode(),
        2,
    );
    let mut batch: Vec<Value> = (0..=MAX_EXPLAINS_PER_BATCH)
        .map(|i| {
            json!({ "jsonrpc": "2.0", "id": i, "method": "pm_explainSponsorship",
                    "params": [small, ep(EntryPointVersion::V0_7), {}] })
        })
        .collect();
    batch[MAX_EXPLAINS_PER_BATCH]["id"] = json!({ "an": "object" });
    let mut notification = batch[0].clone();
    notification.as_object_mut().ok_or("a call")?.remove("id");
    batch.push(notification);
    let mut last = batch[0].clone();
    last["id"] = json!("last");
    batch.push(last);
    let counted = |text: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("sp_requests_total{")
                    && l.contains("method=\"pm_explainSponsorship\"")
                    && l.contains("outcome=\"-32600\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let metrics = async || -> TestResult<String> {
        Ok(reqwest::get(format!("{}/metrics", app.url))
            .await?
            .text()
            .await?)
    };
    let before = counted(&metrics().await?);
    let (_, answers) = app.post(&Value::Array(batch).to_string()).await?;
    let answers = answers.as_array().ok_or("not a batch answer")?;
    assert_eq!(
        answers.len(),
        MAX_EXPLAINS_PER_BATCH + 2,
        "the notification unanswered"
    );
    assert_eq!(
        (
            answers[MAX_EXPLAINS_PER_BATCH + 1]["id"].clone(),
            answers[MAX_EXPLAINS_PER_BATCH + 1]["error"]["code"].clone()
        ),
        (json!("last"), json!(-32600))
    );
    assert_eq!(
        counted(&metrics().await?) - before,
        2,
        "the two past the cap"
    );
    assert_eq!(
        answers[0]["result"]["checksOmitted"],
        json!(0),
        "{}",
        answers[0]
    );
    assert_eq!(
        (
            answers[MAX_EXPLAINS_PER_BATCH]["id"].clone(),
            answers[MAX_EXPLAINS_PER_BATCH]["error"]["code"].clone()
        ),
        (Value::Null, json!(-32600))
    );
    Ok(())
}
