//! End to end on anvil with the real EntryPoints: a counterfactual SimpleAccount operation,
//! sponsored over HTTP, executes in `handleOps` and is paid by our paymaster; tampering with
//! any signed field afterwards makes the EntryPoint refuse it with AA34.

use alloy::eips::eip7702::{Authorization, SignedAuthorization};
use alloy::network::{TransactionBuilder, TransactionBuilder7702};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::{SolCall, SolEvent};
use serde_json::{Value, json};
use session_paymaster::userop::hash::user_op_hash;
use session_paymaster::userop::paymaster_data::PaymasterData;
use session_paymaster::userop::{EntryPointVersion, IEntryPoint, UserOperation};

use crate::helpers::{Stack, TestResult};

sol! {
    #[sol(rpc)]
    interface ISimpleAccountFactory {
        function getAddress(address owner, uint256 salt) external view returns (address);
        function createAccount(address owner, uint256 salt) external returns (address);
    }
    interface ISimpleAccount {
        function execute(address dest, uint256 value, bytes func) external;
    }
    interface ISimpleAccountV07 {
        function executeBatch(address[] dest, uint256[] value, bytes[] func) external;
    }
    struct Call {
        address target;
        uint256 value;
        bytes data;
    }
    interface ISimpleAccountV08 {
        function executeBatch(Call[] calls) external;
    }
    #[sol(rpc)]
    interface ICounter {
        function increment() external;
        function count(address who) external view returns (uint256);
    }
}

/// A wallet-side user: owner key, counterfactual account, and the ops it builds.
pub(crate) struct User<'a> {
    stack: &'a Stack,
    version: EntryPointVersion,
    owner: PrivateKeySigner,
    sender: Address,
}

impl<'a> User<'a> {
    pub(crate) async fn new(stack: &'a Stack, version: EntryPointVersion) -> TestResult<Self> {
        let owner = PrivateKeySigner::random();
        let factory = ISimpleAccountFactory::new(
            stack.version(version).simple_account_factory,
            &stack.anvil.provider,
        );
        let sender = factory
            .getAddress(owner.address(), U256::ZERO)
            .call()
            .await?;
        Ok(Self {
            stack,
            version,
            owner,
            sender,
        })
    }

    /// The RPC form a client sends: deploys the account and calls Counter.increment().
    pub(crate) fn op_json(&self) -> Value {
        let factory_data = ISimpleAccountFactory::createAccountCall {
            owner: self.owner.address(),
            salt: U256::ZERO,
        }
        .abi_encode();
        let call_data = ISimpleAccount::executeCall {
            dest: self.stack.deployed.counter,
            value: U256::ZERO,
            func: ICounter::incrementCall {}.abi_encode().into(),
        }
        .abi_encode();
        json!({
            "sender": self.sender,
            "nonce": "0x0",
            "factory": self.stack.version(self.version).simple_account_factory,
            "factoryData": Bytes::from(factory_data),
            "callData": Bytes::from(call_data),
            "callGasLimit": "0x30d40",
            "verificationGasLimit": "0x7a120",
            "preVerificationGas": "0xea60",
            "maxFeePerGas": "0x2540be400",
            "maxPriorityFeePerGas": "0x3b9aca00",
            "signature": "0x"
        })
    }

    /// The same op with a batch of `n` Counter.increment() calls, in this version's batch shape.
    fn batch_op_json(&self, n: usize) -> Value {
        let inc: Bytes = ICounter::incrementCall {}.abi_encode().into();
        let counter = self.stack.deployed.counter;
        let call_data = match self.version {
            EntryPointVersion::V0_7 => ISimpleAccountV07::executeBatchCall {
                dest: vec![counter; n],
                value: vec![U256::ZERO; n],
                func: vec![inc; n],
            }
            .abi_encode(),
            // v0.9's SimpleAccount batches as v0.8's does.
            EntryPointVersion::V0_8 | EntryPointVersion::V0_9 => {
                ISimpleAccountV08::executeBatchCall {
                    calls: vec![
                        Call {
                            target: counter,
                            value: U256::ZERO,
                            data: inc
                        };
                        n
                    ],
                }
                .abi_encode()
            }
        };
        let mut op = self.op_json();
        op["callData"] = json!(Bytes::from(call_data));
        op
    }

    /// `op_json` sponsored by `pm_sponsorUserOperation`, with its paymaster fields and the
    /// user's signature: ready to submit.
    pub(crate) async fn sponsored(&self, mut op_json: Value) -> TestResult<UserOperation> {
        let result = self
            .stack
            .app
            .result(
                "pm_sponsorUserOperation",
                json!([op_json, self.entry_point()]),
            )
            .await?;
        set_paymaster(&mut op_json, &result);
        let mut op = UserOperation::from_json(&op_json)?;
        self.finish(&mut op)?;
        Ok(op)
    }

    pub(crate) fn entry_point(&self) -> Address {
        self.stack.version(self.version).entry_point
    }

    /// Apply paymaster fields to the op and sign it as the account owner.
    pub(crate) fn finish(&self, op: &mut UserOperation) -> TestResult<()> {
        let chain = self.stack.deployed.chain_id;
        let hash = user_op_hash(self.version, op, None, self.entry_point(), chain);
        // v0.7 SimpleAccount checks an EIP-191 signature of the userOpHash, v0.8 and v0.9 the
        // raw hash.
        let sig = match self.version {
            EntryPointVersion::V0_7 => self.owner.sign_message_sync(hash.as_slice())?,
            EntryPointVersion::V0_8 | EntryPointVersion::V0_9 => {
                self.owner.sign_hash_sync(&hash)?
            }
        };
        op.signature = sig.as_bytes().to_vec().into();
        Ok(())
    }

    fn handle_ops_tx(&self, op: &UserOperation) -> TransactionRequest {
        let call = IEntryPoint::handleOpsCall {
            ops: vec![op.pack(None)],
            beneficiary: self.stack.bundler,
        };
        TransactionRequest::default()
            .with_from(self.stack.bundler)
            .with_to(self.entry_point())
            .with_input(call.abi_encode())
    }

    /// Submit as a bundler would; returns the UserOperationEvent.
    pub(crate) async fn submit(
        &self,
        op: &UserOperation,
    ) -> TestResult<IEntryPoint::UserOperationEvent> {
        self.submit_with(op, Vec::new()).await
    }

    /// Submit with EIP-7702 authorizations in the transaction (a type-4 transaction when any),
    /// as a bundler does for an op carrying `eip7702Auth`.
    async fn submit_with(
        &self,
        op: &UserOperation,
        authorizations: Vec<SignedAuthorization>,
    ) -> TestResult<IEntryPoint::UserOperationEvent> {
        let mut tx = self.handle_ops_tx(op);
        if !authorizations.is_empty() {
            tx = tx.with_authorization_list(authorizations);
        }
        let receipt = self
            .stack
            .anvil
            .provider
            .send_transaction(tx)
            .await?
            .get_receipt()
            .await?;
        assert!(receipt.status(), "handleOps reverted");
        let event = receipt
            .inner
            .logs()
            .iter()
            .filter(|l| l.address() == self.entry_point())
            .find_map(|l| IEntryPoint::UserOperationEvent::decode_log(&l.inner).ok())
            .ok_or("no UserOperationEvent")?;
        Ok(event.data)
    }

    /// Simulate handleOps and return the EntryPoint's FailedOp reason.
    async fn failed_op_reason(&self, op: &UserOperation) -> TestResult<String> {
        let err = match self.stack.anvil.provider.call(self.handle_ops_tx(op)).await {
            Ok(_) => return Err("handleOps succeeded".into()),
            Err(e) => e,
        };
        let payload = err
            .as_error_resp()
            .ok_or_else(|| format!("not a revert: {err}"))?;
        match payload.as_decoded_interface_error::<IEntryPoint::IEntryPointErrors>() {
            Some(IEntryPoint::IEntryPointErrors::FailedOp(f)) => Ok(f.reason),
            Some(IEntryPoint::IEntryPointErrors::FailedOpWithRevert(f)) => Ok(f.reason),
            None => Err(format!("undecoded revert: {payload:?}").into()),
        }
    }

    pub(crate) async fn counter(&self) -> TestResult<U256> {
        Ok(
            ICounter::new(self.stack.deployed.counter, &self.stack.anvil.provider)
                .count(self.sender)
                .call()
                .await?,
        )
    }
}

pub(crate) fn set_paymaster(op: &mut Value, result: &Value) {
    for f in [
        "paymaster",
        "paymasterData",
        "paymasterVerificationGasLimit",
        "paymasterPostOpGasLimit",
        "paymasterSignature",
    ] {
        if !result[f].is_null() {
            op[f] = result[f].clone();
        }
    }
}

async fn sponsored_op_executes(version: EntryPointVersion, erc7677: bool) -> TestResult {
    let stack = Stack::start().await?;
    let user = User::new(&stack, version).await?;
    let mut op_json = user.op_json();
    let ep = user.entry_point();

    if erc7677 {
        // The wallet flow (viem): stub data for estimation, then final data for the same op.
        let stub = stack
            .app
            .result(
                "pm_getPaymasterStubData",
                json!([op_json, ep, "0x7a69", {}]),
            )
            .await?;
        assert_eq!(stub["isFinal"], json!(false));
        set_paymaster(&mut op_json, &stub);
        let data = stack
            .app
            .result("pm_getPaymasterData", json!([op_json, ep, "0x7a69", {}]))
            .await?;
        assert_eq!(
            data["paymasterVerificationGasLimit"],
            stub["paymasterVerificationGasLimit"]
        );
        set_paymaster(&mut op_json, &data);
    } else {
        let result = stack
            .app
            .result("pm_sponsorUserOperation", json!([op_json, ep]))
            .await?;
        assert_eq!(
            result["callGasLimit"], op_json["callGasLimit"],
            "echoes the op's gas"
        );
        set_paymaster(&mut op_json, &result);
    }
    let mut op = UserOperation::from_json(&op_json)?;
    let pm = op.paymaster.clone().ok_or("no paymaster")?;
    assert_eq!(pm.paymaster, stack.version(version).paymaster);
    let window = PaymasterData::decode(&pm.data)?.window;
    user.finish(&mut op)?;

    let deposit_before = stack.anvil.provider.get_balance(pm.paymaster).await?; // contract holds no ETH
    let ep_contract = IEntryPoint::new(ep, &stack.anvil.provider);
    let pm_deposit_before = ep_contract.balanceOf(pm.paymaster).call().await?;
    // Our Rust userOpHash equals the EntryPoint's.
    let onchain_hash: B256 = ep_contract.getUserOpHash(op.pack(None)).call().await?;
    assert_eq!(onchain_hash, user_op_hash(version, &op, None, ep, 31337));

    let event = user.submit(&op).await?;
    assert!(event.success, "op succeeded");
    assert_eq!(event.paymaster, pm.paymaster, "our paymaster paid");
    assert_eq!(event.sender, user.sender);
    assert_eq!(event.userOpHash, onchain_hash);
    assert_eq!(user.counter().await?, U256::from(1), "the call ran");
    let pm_deposit_after = ep_contract.balanceOf(pm.paymaster).call().await?;
    assert_eq!(
        pm_deposit_before - pm_deposit_after,
        event.actualGasCost,
        "deposit paid actualGasCost"
    );
    assert_eq!(
        stack.anvil.provider.get_balance(pm.paymaster).await?,
        deposit_before
    );
    assert!(window.valid_until > window.valid_after);
    Ok(())
}

#[tokio::test]
async fn v07_sponsor_user_operation_executes() -> TestResult {
    sponsored_op_executes(EntryPointVersion::V0_7, false).await
}

#[tokio::test]
async fn v08_sponsor_user_operation_executes() -> TestResult {
    sponsored_op_executes(EntryPointVersion::V0_8, false).await
}

#[tokio::test]
async fn v09_sponsor_user_operation_executes() -> TestResult {
    sponsored_op_executes(EntryPointVersion::V0_9, false).await
}

#[tokio::test]
async fn v07_erc7677_stub_then_data_executes() -> TestResult {
    sponsored_op_executes(EntryPointVersion::V0_7, true).await
}

#[tokio::test]
async fn v08_erc7677_stub_then_data_executes() -> TestResult {
    sponsored_op_executes(EntryPointVersion::V0_8, true).await
}

/// Every field the signature covers, changed by one unit after signing (and the account
/// signature redone, as an attacker holding the account key would): AA34.
async fn tampering_is_refused(version: EntryPointVersion) -> TestResult {
    let stack = Stack::start().await?;
    let user = User::new(&stack, version).await?;
    let mut op_json = user.op_json();
    let result = stack
        .app
        .result(
            "pm_sponsorUserOperation",
            json!([op_json, user.entry_point()]),
        )
        .await?;
    set_paymaster(&mut op_json, &result);
    let signed = UserOperation::from_json(&op_json)?;

    type Tamper = fn(&mut UserOperation);
    let tampers: Vec<(&str, Tamper)> = vec![
        ("callData", |op| {
            let mut d = op.call_data.to_vec();
            let last = d.len() - 1;
            d[last] ^= 1;
            op.call_data = d.into();
        }),
        ("nonce", |op| op.nonce = U256::from(1) << 64), // another key: still a valid nonce
        ("callGasLimit", |op| op.call_gas_limit += 1),
        ("verificationGasLimit", |op| op.verification_gas_limit += 1),
        ("preVerificationGas", |op| {
            op.pre_verification_gas += U256::from(1)
        }),
        ("maxFeePerGas", |op| op.max_fee_per_gas += 1),
        ("maxPriorityFeePerGas", |op| {
            op.max_priority_fee_per_gas -= 1
        }),
        ("paymasterVerificationGasLimit", |op| {
            if let Some(p) = op.paymaster.as_mut() {
                p.gas.verification += 1;
            }
        }),
        ("validUntil", |op| {
            if let Some(p) = op.paymaster.as_mut() {
                let mut d = p.data.to_vec();
                d[5] ^= 1;
                p.data = d.into();
            }
        }),
    ];
    // The untampered op passes simulation, so each failure below is the tampering's doing.
    let mut good = signed.clone();
    user.finish(&mut good)?;
    stack.anvil.provider.call(user.handle_ops_tx(&good)).await?;
    for (field, tamper) in tampers {
        let mut op = signed.clone();
        tamper(&mut op);
        user.finish(&mut op)?;
        assert_eq!(
            user.failed_op_reason(&op).await?,
            "AA34 signature error",
            "tampered {field}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn v09_erc7677_stub_then_data_executes() -> TestResult {
    sponsored_op_executes(EntryPointVersion::V0_9, true).await
}

/// v0.9 parallel signing: with `paymasterSignature: "suffix"` the stub's window is the final
/// `paymasterData`, so the account signs right after estimation; our signature, asked for in
/// parallel, goes in the suffix outside the userOpHash, and the op lands with both.
#[tokio::test]
async fn v09_account_signs_before_the_paymaster() -> TestResult {
    let stack = Stack::start().await?;
    let user = User::new(&stack, EntryPointVersion::V0_9).await?;
    let ep = user.entry_point();
    let ctx = json!({ "paymasterSignature": "suffix" });
    let mut op_json = user.op_json();
    let stub = stack
        .app
        .result(
            "pm_getPaymasterStubData",
            json!([op_json, ep, "0x7a69", ctx]),
        )
        .await?;
    set_paymaster(&mut op_json, &stub);
    let window_bytes = stub["paymasterData"].clone();
    assert_eq!(
        serde_json::from_value::<Bytes>(window_bytes.clone())?.len(),
        12,
        "paymasterData is the window alone: {stub}"
    );
    assert_eq!(
        serde_json::from_value::<Bytes>(stub["paymasterSignature"].clone())?.len(),
        65
    );

    // The account signs now: the userOpHash leaves the (stub) paymaster signature out.
    let mut op = UserOperation::from_json(&op_json)?;
    user.finish(&mut op)?;
    let ep_contract = IEntryPoint::new(ep, &stack.anvil.provider);
    let signed_hash: B256 = ep_contract.getUserOpHash(op.pack(None)).call().await?;
    assert_eq!(
        signed_hash,
        user_op_hash(EntryPointVersion::V0_9, &op, None, ep, 31337)
    );

    // Later, the final paymaster data for the same op: a second later, so that the window the
    // service would compute now differs from the stub's and keeping the stub's is observable.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let data = stack
        .app
        .result("pm_getPaymasterData", json!([op_json, ep, "0x7a69", ctx]))
        .await?;
    assert_eq!(
        data["paymasterData"], window_bytes,
        "the stub's window is kept"
    );
    assert_ne!(data["paymasterSignature"], stub["paymasterSignature"]);
    set_paymaster(&mut op_json, &data);
    let account_signature = op.signature.clone();
    let mut op = UserOperation::from_json(&op_json)?;
    op.signature = account_signature;
    assert_eq!(
        ep_contract.getUserOpHash(op.pack(None)).call().await?,
        signed_hash,
        "the account's signature still covers the op"
    );
    let event = user.submit(&op).await?;
    assert!(event.success);
    assert_eq!(event.userOpHash, signed_hash);
    assert_eq!(user.counter().await?, U256::from(1), "the call ran");

    // A window the policy would not give (longer than max_validity) is not kept.
    let mut long = op_json.clone();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let far = now + 100_000;
    let mut w = [0u8; 12];
    w[..6].copy_from_slice(&far.to_be_bytes()[2..]);
    long["paymasterData"] = json!(Bytes::from(w.to_vec()));
    long["nonce"] = json!("0x1");
    let data = stack
        .app
        .result("pm_getPaymasterData", json!([long, ep, "0x7a69", ctx]))
        .await?;
    let until = PaymasterData::decode_window(&serde_json::from_value::<Bytes>(
        data["paymasterData"].clone(),
    )?)?
    .valid_until;
    assert_ne!(until, far, "the client's window is not signed");
    assert!(until <= now + 600 + 5, "max_validity 10m, not {until}");

    // Before v0.9 there is no suffix: asking for one is an invalid parameter, not a silent inline.
    let v08 = User::new(&stack, EntryPointVersion::V0_8).await?;
    let err = stack
        .app
        .error(
            "pm_getPaymasterStubData",
            json!([v08.op_json(), v08.entry_point(), "0x7a69", ctx]),
        )
        .await?;
    assert_eq!(err["code"], json!(-32602), "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or("")
            .contains("context.paymasterSignature"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn v07_tampering_after_signing_is_aa34() -> TestResult {
    tampering_is_refused(EntryPointVersion::V0_7).await
}

#[tokio::test]
async fn v08_tampering_after_signing_is_aa34() -> TestResult {
    tampering_is_refused(EntryPointVersion::V0_8).await
}

#[tokio::test]
async fn v09_tampering_after_signing_is_aa34() -> TestResult {
    tampering_is_refused(EntryPointVersion::V0_9).await
}

/// The stub data estimates with a signature that fails validation without reverting.
#[tokio::test]
async fn stub_data_fails_signature_check_without_reverting() -> TestResult {
    let stack = Stack::start().await?;
    for version in EntryPointVersion::ALL {
        let user = User::new(&stack, version).await?;
        let mut op_json = user.op_json();
        let stub = stack
            .app
            .result(
                "pm_getPaymasterStubData",
                json!([op_json, user.entry_point(), "0x7a69"]),
            )
            .await?;
        set_paymaster(&mut op_json, &stub);
        let mut op = UserOperation::from_json(&op_json)?;
        user.finish(&mut op)?;
        assert_eq!(
            user.failed_op_reason(&op).await?,
            "AA34 signature error",
            "v{version}"
        );
    }
    Ok(())
}

/// The decoder reads a batch as the real SimpleAccount executes it: the calls we checked are
/// the calls that ran.
#[tokio::test]
async fn batches_decode_to_the_calls_the_account_executes() -> TestResult {
    let stack = Stack::start().await?;
    for version in EntryPointVersion::ALL {
        let user = User::new(&stack, version).await?;
        let mut op_json = user.batch_op_json(3);
        let decoded = session_paymaster::policy::calldata::decode(
            &session_paymaster::wire::data("callData", &op_json["callData"])?,
            user.sender,
        )?;
        assert_eq!(decoded.len(), 3);
        assert!(decoded.iter().all(|c| c.target == stack.deployed.counter));

        let result = stack
            .app
            .result(
                "pm_sponsorUserOperation",
                json!([op_json, user.entry_point()]),
            )
            .await?;
        set_paymaster(&mut op_json, &result);
        let mut op = UserOperation::from_json(&op_json)?;
        user.finish(&mut op)?;
        assert!(user.submit(&op).await?.success, "v{version}");
        assert_eq!(
            user.counter().await?,
            U256::from(3),
            "v{version}: every decoded call ran"
        );
    }
    Ok(())
}

/// The policy directory with a daily budget on dev-counter, so that sponsorships reserve (a
/// policy without budgets, sessions or a watched deposit has nothing to count).
pub(crate) fn budgeted_policies() -> TestResult<crate::helpers::TempDir> {
    let dir = crate::helpers::TempDir::new("budgeted");
    for entry in std::fs::read_dir(crate::helpers::repo_dir().join("policies"))? {
        let path = entry?.path();
        std::fs::copy(&path, dir.0.join(path.file_name().ok_or("name")?))?;
    }
    let policy_file = dir.0.join("dev-counter.toml");
    let mut text = std::fs::read_to_string(&policy_file)?;
    text.push_str("\n[budgets]\npolicy = { cost = \"1 ether\", ops = 100, period = \"1d\" }\n");
    std::fs::write(&policy_file, text)?;
    Ok(dir)
}

/// An EOA delegated to the real Simple7702Account by a real authorization (in the bundler's
/// type-4 transaction): sponsored with `factory = 0x7702` and `eip7702Auth`, it lands; the
/// userOpHash we reserved under is the EntryPoint's (the delegate in place of the initCode), so
/// the event settles that reservation by its hash (a second variant of the nonce is released,
/// not settled too).
async fn eip7702_account_lands_and_settles(version: EntryPointVersion) -> TestResult {
    let dir = budgeted_policies()?;
    let stack = Stack::start_with(Some(dir.0.clone()), None).await?;
    let owner = PrivateKeySigner::random();
    let user = User {
        stack: &stack,
        version,
        owner: owner.clone(),
        sender: owner.address(),
    };
    let delegate = stack
        .version(version)
        .simple_7702_account
        .ok_or("no Simple7702Account")?;
    let authorization = Authorization {
        chain_id: U256::from(31337),
        address: delegate,
        nonce: 0,
    };
    let signature = owner.sign_hash_sync(&authorization.signature_hash())?;
    let signed = authorization.into_signed(signature);
    let mut op_json = user.op_json();
    op_json["factory"] = json!("0x7702");
    op_json["factoryData"] = json!("0x");
    op_json["eip7702Auth"] = json!({
        "address": delegate,
        "chainId": "0x7a69",
        "nonce": "0x0",
        "r": B256::from(signed.r()),
        "s": B256::from(signed.s()),
        "yParity": format!("{:#x}", signed.y_parity()),
    });
    let op = user.sponsored(op_json.clone()).await?;
    // A variant of the same nonce (another fee): a second reservation, never sent.
    let mut variant = op_json;
    variant["maxPriorityFeePerGas"] = json!("0x3b9aca01");
    user.sponsored(variant).await?;

    let event = user.submit_with(&op, vec![signed]).await?;
    assert!(event.success, "op succeeded");
    assert_eq!(user.counter().await?, U256::from(1), "the call ran");
    let ep = IEntryPoint::new(user.entry_point(), &stack.anvil.provider);
    let hash = user_op_hash(version, &op, None, user.entry_point(), 31337);
    assert_eq!(event.userOpHash, hash, "our hash is the EntryPoint's");
    assert_eq!(ep.getUserOpHash(op.pack(None)).call().await?, hash);

    let sponsor = &stack.app.state.sponsor;
    let watcher = crate::helpers::dev_watcher(stack.anvil.provider.clone(), sponsor.chain(31337)?);
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!(
        (poll.settled, poll.superseded, poll.ignored),
        (1, 1, 0),
        "settled by its hash: {poll:?}"
    );
    Ok(())
}

#[tokio::test]
async fn v08_eip7702_account_lands_and_settles() -> TestResult {
    eip7702_account_lands_and_settles(EntryPointVersion::V0_8).await
}

#[tokio::test]
async fn v09_eip7702_account_lands_and_settles() -> TestResult {
    eip7702_account_lands_and_settles(EntryPointVersion::V0_9).await
}

/// Budgets settle to what the chain charged: an executed op to its event's actualGasCost, an
/// op never submitted released once a block is past its validUntil; a restarted watcher
/// resumes from its cursor and settles nothing twice.
#[tokio::test]
async fn reservations_settle_from_the_chain_and_expire() -> TestResult {
    use session_paymaster::chain::watcher::{Cursor, Finality, Watcher};
    use session_paymaster::ledger::wei_to_gwei_ceil;

    let redis = crate::helpers::TestRedis::start().await?;
    let dir = budgeted_policies()?;
    let stack = Stack::start_with(Some(dir.0.clone()), Some(redis.url.clone())).await?;
    let sponsor = &stack.app.state.sponsor;
    let scope = crate::helpers::policy_day_scope();

    let mut worst = 0u64;
    let mut sponsored = Vec::new();
    for version in EntryPointVersion::ALL {
        let user = User::new(&stack, version).await?;
        let op = user.sponsored(user.op_json()).await?;
        worst += wei_to_gwei_ceil(op.max_cost(op.paymaster.clone().ok_or("pm")?.gas));
        sponsored.push((user, op));
    }
    assert_eq!(
        sponsor.ledger().usage("dev-counter", &scope).await?,
        (worst, 3),
        "every version's op reserved at worst case"
    );

    // The v0.7 and v0.9 ops land; the v0.8 one is never sent.
    let mut actual = 0;
    for (user, op) in [&sponsored[0], &sponsored[2]] {
        actual += wei_to_gwei_ceil(user.submit(op).await?.actualGasCost);
    }
    let never_sent = wei_to_gwei_ceil(
        sponsored[1]
            .1
            .max_cost(sponsored[1].1.paymaster.clone().ok_or("pm")?.gas),
    );

    let conn =
        session_paymaster::session::redis::connect(&redis.url, std::time::Duration::from_secs(2))
            .await?;
    let watcher = Watcher::new(
        stack.anvil.provider.clone(),
        sponsor.chain(31337)?,
        0,
        Some(0),
        Cursor::redis(conn.clone(), 31337),
    )
    .with_finality(Finality::Depth(0))
    .with_low_deposit(U256::from(10u64).pow(U256::from(20u64)));
    let poll = watcher.poll_once(sponsor).await?;
    assert_eq!((poll.settled, poll.released), (2, 0), "{poll:?}");
    assert_eq!(
        sponsor.ledger().usage("dev-counter", &scope).await?,
        (actual + never_sent, 3)
    );
    assert_eq!(
        watcher.poll_once(sponsor).await?.settled,
        0,
        "nothing twice"
    );

    // A restarted watcher resumes from the stored cursor: nothing re-read, nothing re-settled.
    let restarted = Watcher::new(
        stack.anvil.provider.clone(),
        sponsor.chain(31337)?,
        0,
        Some(0),
        Cursor::redis(conn, 31337),
    )
    .with_finality(Finality::Depth(0));
    let poll = restarted.poll_once(sponsor).await?;
    assert_eq!((poll.settled, poll.ignored), (0, 0), "{poll:?}");

    // Past the unsent op's validUntil (10 minutes), it can no longer land: released.
    let _: Value = stack
        .anvil
        .provider
        .raw_request("evm_increaseTime".into(), (700u64,))
        .await?;
    let _: Value = stack
        .anvil
        .provider
        .raw_request("evm_mine".into(), ())
        .await?;
    let poll = restarted.poll_once(sponsor).await?;
    assert_eq!(poll.released, 1, "{poll:?}");
    assert_eq!(
        sponsor.ledger().usage("dev-counter", &scope).await?,
        (actual, 2),
        "spent equals the sum of the events' costs"
    );
    Ok(())
}
