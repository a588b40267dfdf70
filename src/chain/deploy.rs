//! Deterministic deployment (DESIGN §4, §7): EntryPoint, SimpleAccountFactory and (v0.8 on)
//! Simple7702Account from the official `@account-abstraction/contracts` artifacts of each
//! version (at the salts its `VersionSpec` names), SessionPaymaster and the demo Counter
//! from `forge build`, all through the CREATE2 deployer so they land at fixed addresses.
//!
//! `deploy-dev` sends with `eth_sendTransaction` from an account the node unlocks (anvil's dev
//! accounts). `session-paymaster deploy` (production) plans a paymaster's deployment
//! ([`plan_paymaster`]: the CREATE2 deployment unless its code is there, the deposit and stake
//! topped up to what was asked) and sends it ([`execute`]) through a provider that signs with
//! the operator's key; `deploy-dev` runs the same plan for its paymasters.

use std::path::{Path, PathBuf};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256, address, b256, keccak256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolValue;
use serde::Serialize;

use crate::userop::{EntryPointVersion, IEntryPoint, ISessionPaymaster};

/// The deterministic deployment proxy (Arachnid's), present on anvil and most chains.
pub const CREATE2_DEPLOYER: Address = address!("0x4e59b44847b379578588920cA78FbF26c0B4956C");

/// keccak256 of the deterministic deployment proxy's runtime code (the same on every chain it
/// is on): any other code at [`CREATE2_DEPLOYER`] would not put ours at the predicted address.
pub const CREATE2_DEPLOYER_CODE_HASH: B256 =
    b256!("0x2fa86add0aed31f33a762c9d88e807c475bd51d0f52bd0955754b2608f7e4989");

/// Salt with which the EntryPoint artifact of `version` is deployed (DESIGN §7).
pub const fn entry_point_salt(version: EntryPointVersion) -> B256 {
    version.spec().entry_point_salt
}

/// What can go wrong deploying.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// An artifact is missing or unreadable (run `scripts/setup-contracts`).
    #[error("artifact {path}: {reason}")]
    Artifact {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The node refused or failed a request.
    #[error("chain RPC: {0}")]
    Rpc(String),
    /// The chain has no CREATE2 deployer at [`CREATE2_DEPLOYER`].
    #[error("no CREATE2 deployer at {CREATE2_DEPLOYER} on this chain")]
    NoDeployer,
    /// The sending key or an argument is unusable (the message never holds key material).
    #[error("{0}")]
    Key(String),
    /// The chain is not as a deployment needs it (see the message); nothing was sent.
    #[error("refused: {0}")]
    Refused(String),
    /// A transaction was sent but no receipt came within [`RECEIPT_TIMEOUT`] (underpriced, or
    /// the node dropped it): look it up by hash before running `deploy` again.
    #[error(
        "transaction {hash} not mined within {secs} s; check it on the chain before running again"
    )]
    NotMined {
        /// The transaction.
        hash: B256,
        /// How long we waited.
        secs: u64,
    },
    /// A deployment transaction did not leave code at the expected address.
    #[error("deployment of {what} left no code at {address}")]
    NoCode {
        /// Which contract.
        what: String,
        /// Expected address.
        address: Address,
    },
}

/// Creation code followed by its one constructor argument, an address.
fn with_constructor_arg(code: &Bytes, arg: Address) -> Bytes {
    [code.as_ref(), &arg.abi_encode()].concat().into()
}

fn rpc_err(e: impl std::error::Error + 'static) -> DeployError {
    DeployError::Rpc(super::client::error_chain(&e))
}

/// Compiled contracts: the npm artifacts and `forge build` output under a contracts directory.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    /// Artifacts under `contracts_dir` (the repository's `contracts/`).
    pub fn new(contracts_dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: contracts_dir.into(),
        }
    }

    fn package(version: EntryPointVersion) -> &'static str {
        version.spec().package
    }

    /// Creation bytecode of the EntryPoint of `version` (its npm package's artifact).
    pub fn entry_point(&self, version: EntryPointVersion) -> Result<Bytes, DeployError> {
        self.bytecode(&format!(
            "node_modules/{}/artifacts/EntryPoint.json",
            Self::package(version)
        ))
    }

    /// Creation bytecode of the sample SimpleAccountFactory (constructor: EntryPoint).
    pub fn simple_account_factory(&self, version: EntryPointVersion) -> Result<Bytes, DeployError> {
        self.bytecode(&format!(
            "node_modules/{}/artifacts/SimpleAccountFactory.json",
            Self::package(version)
        ))
    }

    /// Init code of the sample Simple7702Account, an EIP-7702 delegate, for an EntryPoint of
    /// `version` at `entry_point` (0.8.0's names the canonical EntryPoint itself; 0.9's takes it
    /// as its constructor's argument); `None` for a version without EIP-7702 accounts.
    pub fn simple_7702_account(
        &self,
        version: EntryPointVersion,
        entry_point: Address,
    ) -> Result<Option<Bytes>, DeployError> {
        if !version.spec().eip7702 {
            return Ok(None);
        }
        let relative = format!(
            "node_modules/{}/artifacts/Simple7702Account.json",
            Self::package(version)
        );
        let json = self.read(&relative)?;
        let code = self.code_of(&relative, &json)?;
        let takes_entry_point = json["abi"]
            .as_array()
            .and_then(|abi| abi.iter().find(|item| item["type"] == "constructor"))
            .is_some_and(|c| c["inputs"].as_array().is_some_and(|i| i.len() == 1));
        Ok(Some(if takes_entry_point {
            with_constructor_arg(&code, entry_point)
        } else {
            code
        }))
    }

    /// Creation bytecode of SessionPaymaster built against `version`.
    pub fn session_paymaster(&self, version: EntryPointVersion) -> Result<Bytes, DeployError> {
        self.bytecode(&format!(
            "out/{}/SessionPaymaster.sol/SessionPaymaster.json",
            version.flag_suffix()
        ))
    }

    /// Init code of SessionPaymaster(entryPoint, owner, signers) for `version`: with salt 0
    /// through [`CREATE2_DEPLOYER`] it lands at [`Self::session_paymaster_address`], as
    /// `contracts/script/Deploy.s.sol` does.
    pub fn session_paymaster_init_code(
        &self,
        version: EntryPointVersion,
        entry_point: Address,
        owner: Address,
        signers: &[Address],
    ) -> Result<Bytes, DeployError> {
        let args = (entry_point, owner, signers.to_vec()).abi_encode_params();
        Ok([self.session_paymaster(version)?.as_ref(), &args]
            .concat()
            .into())
    }

    /// The deterministic address of SessionPaymaster(entryPoint, owner, signers).
    pub fn session_paymaster_address(
        &self,
        version: EntryPointVersion,
        entry_point: Address,
        owner: Address,
        signers: &[Address],
    ) -> Result<Address, DeployError> {
        let init_code = self.session_paymaster_init_code(version, entry_point, owner, signers)?;
        Ok(CREATE2_DEPLOYER.create2(B256::ZERO, keccak256(init_code)))
    }

    /// Creation bytecode of the demo Counter.
    pub fn counter(&self) -> Result<Bytes, DeployError> {
        self.bytecode("out/v07/Counter.sol/Counter.json")
    }

    /// An artifact's JSON.
    fn read(&self, relative: &str) -> Result<serde_json::Value, DeployError> {
        let path = self.dir.join(relative);
        let err = |reason: String| DeployError::Artifact {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("{e} (run scripts/setup-contracts)")))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// `bytecode` of a Hardhat artifact (a hex string) or a Foundry one (`{object}`).
    fn bytecode(&self, relative: &str) -> Result<Bytes, DeployError> {
        self.code_of(relative, &self.read(relative)?)
    }

    /// `bytecode` of the artifact `json` read from `relative`.
    fn code_of(&self, relative: &str, json: &serde_json::Value) -> Result<Bytes, DeployError> {
        let path = self.dir.join(relative);
        let err = |reason: String| DeployError::Artifact {
            path: path.clone(),
            reason,
        };
        let code = json["bytecode"]
            .as_str()
            .or_else(|| json["bytecode"]["object"].as_str())
            .ok_or_else(|| err("no bytecode".into()))?;
        let bytes = hex::decode(code.trim_start_matches("0x")).map_err(|e| err(e.to_string()))?;
        if bytes.is_empty() {
            return Err(err("empty bytecode".into()));
        }
        Ok(bytes.into())
    }

    /// The contracts directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Deploy `init_code` through the CREATE2 deployer with `salt`, from `from`; a no-op when the
/// address already has code. Returns the address.
pub async fn create2(
    provider: &DynProvider,
    from: Address,
    salt: B256,
    init_code: &[u8],
    what: &str,
) -> Result<Address, DeployError> {
    let address = CREATE2_DEPLOYER.create2(salt, keccak256(init_code));
    if !provider
        .get_code_at(address)
        .await
        .map_err(rpc_err)?
        .is_empty()
    {
        return Ok(address);
    }
    if provider
        .get_code_at(CREATE2_DEPLOYER)
        .await
        .map_err(rpc_err)?
        .is_empty()
    {
        return Err(DeployError::NoDeployer);
    }
    let input: Bytes = [salt.as_slice(), init_code].concat().into();
    let tx = TransactionRequest::default()
        .with_from(from)
        .with_to(CREATE2_DEPLOYER)
        .with_input(input);
    send(provider, tx).await?;
    if provider
        .get_code_at(address)
        .await
        .map_err(rpc_err)?
        .is_empty()
    {
        return Err(DeployError::NoCode {
            what: what.to_owned(),
            address,
        });
    }
    Ok(address)
}

/// How long [`send`] waits for a transaction's receipt.
pub const RECEIPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Send a transaction and wait (at most [`RECEIPT_TIMEOUT`]) for a successful receipt.
pub async fn send(provider: &DynProvider, tx: TransactionRequest) -> Result<B256, DeployError> {
    let pending = provider.send_transaction(tx).await.map_err(rpc_err)?;
    let hash = *pending.tx_hash();
    let receipt = pending
        .with_timeout(Some(RECEIPT_TIMEOUT))
        .get_receipt()
        .await
        .map_err(|e| match e {
            alloy::providers::PendingTransactionError::TxWatcher(
                alloy::providers::WatchTxError::Timeout,
            ) => DeployError::NotMined {
                hash,
                secs: RECEIPT_TIMEOUT.as_secs(),
            },
            e => rpc_err(e),
        })?;
    if !receipt.status() {
        return Err(DeployError::Rpc(format!(
            "transaction {} reverted",
            receipt.transaction_hash
        )));
    }
    Ok(receipt.transaction_hash)
}

/// The contracts of one EntryPoint version on a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionDeployment {
    /// EntryPoint version ("0.7", "0.8", "0.9").
    #[serde(serialize_with = "serialize_display")]
    pub version: EntryPointVersion,
    /// EntryPoint address.
    pub entry_point: Address,
    /// SimpleAccountFactory for it.
    pub simple_account_factory: Address,
    /// Simple7702Account for it, the delegate of EIP-7702 accounts (v0.8 and later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub simple_7702_account: Option<Address>,
    /// SessionPaymaster for it.
    pub paymaster: Address,
}

fn serialize_display<S: serde::Serializer>(v: &EntryPointVersion, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn serialize_decimal<S: serde::Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A local stack: every EntryPoint version with factory and paymaster, and the demo Counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DevStack {
    /// Chain id of the node.
    pub chain_id: u64,
    /// One entry per EntryPoint version.
    pub entry_points: Vec<VersionDeployment>,
    /// Demo target contract.
    pub counter: Address,
}

/// Deploy (or find, when already deployed) everything a local stack needs, owned by `owner`,
/// with `signers` authorised and `deposit` wei deposited for each paymaster.
pub async fn deploy_dev_stack(
    provider: &DynProvider,
    artifacts: &Artifacts,
    from: Address,
    owner: Address,
    signers: &[Address],
    deposit: U256,
) -> Result<DevStack, DeployError> {
    let chain_id = provider.get_chain_id().await.map_err(rpc_err)?;
    let mut entry_points = Vec::new();
    for version in EntryPointVersion::ALL {
        let entry_point = create2(
            provider,
            from,
            entry_point_salt(version),
            &artifacts.entry_point(version)?,
            "EntryPoint",
        )
        .await?;
        if entry_point != version.spec().package_entry_point {
            // The policies and docs name the addresses that follow from it.
            return Err(DeployError::Refused(format!(
                "EntryPoint v{version} from {} landed at {entry_point}, not at {}: the npm \
                 artifact is not the one VersionSpec describes",
                version.spec().package,
                version.spec().package_entry_point
            )));
        }
        let factory = create2(
            provider,
            from,
            B256::ZERO,
            &with_constructor_arg(&artifacts.simple_account_factory(version)?, entry_point),
            "SimpleAccountFactory",
        )
        .await?;
        // The same plan as `deploy`: a second run finds the paymaster and tops its deposit up
        // to `deposit` rather than adding it again.
        let target = PaymasterTarget {
            version,
            entry_point,
            owner,
            signers: signers.to_vec(),
            deposit,
            stake: U256::ZERO,
            unstake_delay_secs: 0,
        };
        let plan = plan_paymaster(provider, artifacts, from, &target).await?;
        execute(provider, chain_id, from, &plan).await?;
        let paymaster = plan.paymaster;
        let simple_7702_account = match artifacts.simple_7702_account(version, entry_point)? {
            None => None,
            Some(code) => {
                Some(create2(provider, from, B256::ZERO, &code, "Simple7702Account").await?)
            }
        };
        entry_points.push(VersionDeployment {
            version,
            entry_point,
            simple_account_factory: factory,
            simple_7702_account,
            paymaster,
        });
    }
    let counter = create2(provider, from, B256::ZERO, &artifacts.counter()?, "Counter").await?;
    Ok(DevStack {
        chain_id,
        entry_points,
        counter,
    })
}

/// What `deploy` is asked for one paymaster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymasterTarget {
    /// EntryPoint version (selects the build of SessionPaymaster).
    pub version: EntryPointVersion,
    /// The EntryPoint it serves.
    pub entry_point: Address,
    /// Its owner (may differ from the sender).
    pub owner: Address,
    /// Its initial signers.
    pub signers: Vec<Address>,
    /// Deposit to have at the EntryPoint, wei (topped up to it, never above).
    pub deposit: U256,
    /// Stake to have, wei (topped up to it; 0: none asked).
    pub stake: U256,
    /// Unstake delay of the stake, seconds.
    pub unstake_delay_secs: u32,
}

/// One transaction of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedTx {
    /// What it does.
    pub what: String,
    /// Recipient.
    pub to: Address,
    /// Value, wei (a decimal string in JSON).
    #[serde(serialize_with = "serialize_decimal")]
    pub value: U256,
    /// Calldata.
    pub data: Bytes,
}

/// What deploying one paymaster takes from where the chain is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymasterPlan {
    /// EntryPoint version.
    #[serde(serialize_with = "serialize_display")]
    pub version: EntryPointVersion,
    /// The EntryPoint.
    pub entry_point: Address,
    /// Its address: predicted from (EntryPoint, owner, signers) and the build.
    pub paymaster: Address,
    /// Whether code is already there (then it is reused).
    pub deployed: bool,
    /// The sender's transactions, in order (none: nothing to do).
    pub transactions: Vec<PlannedTx>,
    /// Transactions only the owner may send (staking, when the sender is not the owner).
    pub owner_transactions: Vec<PlannedTx>,
}

/// Plan `target` for a sender `from`: deploy through the CREATE2 deployer unless the predicted
/// address has code, deposit what is missing of `target.deposit`, stake what is missing of
/// `target.stake` (the owner's step). Reads the chain; sends nothing.
pub async fn plan_paymaster(
    provider: &DynProvider,
    artifacts: &Artifacts,
    from: Address,
    target: &PaymasterTarget,
) -> Result<PaymasterPlan, DeployError> {
    let init_code = artifacts.session_paymaster_init_code(
        target.version,
        target.entry_point,
        target.owner,
        &target.signers,
    )?;
    let paymaster = CREATE2_DEPLOYER.create2(B256::ZERO, keccak256(&init_code));
    let deployed = !provider
        .get_code_at(paymaster)
        .await
        .map_err(rpc_err)?
        .is_empty();
    let mut plan = PaymasterPlan {
        version: target.version,
        entry_point: target.entry_point,
        paymaster,
        deployed,
        transactions: Vec::new(),
        owner_transactions: Vec::new(),
    };
    if deployed {
        // CREATE2 fixes how it started, not who runs it now: refuse to fund a paymaster whose
        // owner, EntryPoint or signers have changed since.
        check_deployed(provider, target, paymaster).await?;
    } else {
        // Only the deterministic deployment proxy puts our code at the predicted address.
        let deployer = provider
            .get_code_at(CREATE2_DEPLOYER)
            .await
            .map_err(rpc_err)?;
        if deployer.is_empty() {
            return Err(DeployError::NoDeployer);
        }
        if keccak256(&deployer) != CREATE2_DEPLOYER_CODE_HASH {
            return Err(DeployError::Refused(format!(
                "the code at {CREATE2_DEPLOYER} is not the deterministic deployment proxy"
            )));
        }
        plan.transactions.push(PlannedTx {
            what: "deploy SessionPaymaster through the CREATE2 deployer (salt 0)".into(),
            to: CREATE2_DEPLOYER,
            value: U256::ZERO,
            data: [B256::ZERO.as_slice(), &init_code].concat().into(),
        });
    }
    // Read whatever the case: anyone may deposit to an address before code lands there.
    let info = IEntryPoint::new(target.entry_point, provider)
        .getDepositInfo(paymaster)
        .call()
        .await
        .map_err(rpc_err)?;
    if target.deposit > info.deposit {
        let top_up = target.deposit - info.deposit;
        plan.transactions.push(PlannedTx {
            what: format!(
                "depositTo(paymaster) {top_up} wei (to {} wei)",
                target.deposit
            ),
            to: target.entry_point,
            value: top_up,
            data: alloy::sol_types::SolCall::abi_encode(&IEntryPoint::depositToCall {
                account: paymaster,
            })
            .into(),
        });
    }
    if !target.stake.is_zero() {
        if target.unstake_delay_secs == 0 {
            return Err(DeployError::Refused(
                "a stake needs an unstake delay above zero".into(),
            ));
        }
        // The EntryPoint never lets the delay shrink; an unlocked stake is locked again.
        let stake = U256::from(info.stake);
        let delay = target.unstake_delay_secs.max(info.unstakeDelaySec);
        if target.stake > stake || delay > info.unstakeDelaySec || !info.staked {
            let top_up = target.stake.saturating_sub(stake);
            let step = PlannedTx {
                what: format!(
                    "addStake({delay}) with {top_up} wei (to {} wei)",
                    target.stake
                ),
                to: paymaster,
                value: top_up,
                data: alloy::sol_types::SolCall::abi_encode(&ISessionPaymaster::addStakeCall {
                    unstakeDelaySec: delay,
                })
                .into(),
            };
            if from == target.owner {
                plan.transactions.push(step);
            } else {
                plan.owner_transactions.push(step);
            }
        }
    }
    Ok(plan)
}

/// Send the sender's transactions of `plan` from `from`, in order, each waited for, each
/// signed for `chain_id` (the chain checked, not whatever the RPC says when signing); no
/// transaction carrying value is sent before the paymaster's code is there. The owner's
/// transactions are not sent. Returns how many were sent.
pub async fn execute(
    provider: &DynProvider,
    chain_id: u64,
    from: Address,
    plan: &PaymasterPlan,
) -> Result<usize, DeployError> {
    let has_code = || async {
        Ok::<bool, DeployError>(
            !provider
                .get_code_at(plan.paymaster)
                .await
                .map_err(rpc_err)?
                .is_empty(),
        )
    };
    let mut sent = 0;
    for tx in &plan.transactions {
        // Nothing of value leaves before the paymaster's code is there.
        if !tx.value.is_zero() && !has_code().await? {
            return Err(DeployError::NoCode {
                what: "SessionPaymaster".into(),
                address: plan.paymaster,
            });
        }
        let request = TransactionRequest::default()
            .with_chain_id(chain_id)
            .with_from(from)
            .with_to(tx.to)
            .with_value(tx.value)
            .with_input(tx.data.clone());
        send(provider, request).await?;
        sent += 1;
    }
    if !has_code().await? {
        return Err(DeployError::NoCode {
            what: "SessionPaymaster".into(),
            address: plan.paymaster,
        });
    }
    Ok(sent)
}

/// A deployed paymaster must be the one asked for: its EntryPoint, owner (no transfer under
/// way) and every signer.
async fn check_deployed(
    provider: &DynProvider,
    target: &PaymasterTarget,
    paymaster: Address,
) -> Result<(), DeployError> {
    let pm = ISessionPaymaster::new(paymaster, provider);
    let refused = |why: String| Err(DeployError::Refused(format!("{paymaster}: {why}")));
    let entry_point = pm.entryPoint().call().await.map_err(rpc_err)?;
    if entry_point != target.entry_point {
        return refused(format!("serves EntryPoint {entry_point}"));
    }
    let owner = pm.owner().call().await.map_err(rpc_err)?;
    if owner != target.owner {
        return refused(format!("is owned by {owner} now"));
    }
    // Offered to another owner, who may accept and withdraw what is topped up now.
    let pending = pm.pendingOwner().call().await.map_err(rpc_err)?;
    if !pending.is_zero() {
        return refused(format!(
            "its ownership is being transferred to {pending}; accept or cancel that first"
        ));
    }
    for signer in &target.signers {
        if !pm.isSigner(*signer).call().await.map_err(rpc_err)? {
            return refused(format!("{signer} is no longer one of its signers"));
        }
    }
    Ok(())
}

/// A `deploy` run: where, what, and with which key.
#[derive(Debug)]
pub struct DeployRequest {
    /// Chain RPC URL.
    pub rpc_url: String,
    /// The chain the operator means (needed to send: a wrong URL would spend on another).
    pub chain_id: Option<u64>,
    /// The paymaster asked for.
    pub target: PaymasterTarget,
    /// The sending key (`None`: a dry run only).
    pub key: Option<alloy::signers::local::PrivateKeySigner>,
    /// The sender to plan for without a key (default: the owner).
    pub from: Option<Address>,
    /// Plan only: send nothing.
    pub dry_run: bool,
    /// Where SessionPaymaster's build is.
    pub artifacts: Artifacts,
}

/// What a `deploy` run planned and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeployReport {
    /// The chain the RPC serves.
    pub chain_id: u64,
    /// The sender planned for.
    pub from: Address,
    /// Whether nothing was to be sent.
    pub dry_run: bool,
    /// Transactions sent.
    pub transactions_sent: usize,
    /// The plan.
    pub plan: PaymasterPlan,
    /// The `serve` configuration lines for this paymaster.
    pub serve_config: Vec<String>,
}

/// Where `deploy`'s sending key comes from; never a flag's value (shell history, `ps`).
#[derive(Debug, Clone, Copy)]
pub enum KeyFrom<'a> {
    /// The environment variable of this name, holding the key as hex (`None` when unset).
    Env(&'a str),
    /// A file holding the key as hex.
    File(&'a Path),
    /// An encrypted JSON keystore (Web3 Secret Storage, as `cast wallet import` and geth write
    /// it), its password in the environment variable `password_env`.
    Keystore {
        /// The keystore file.
        path: &'a Path,
        /// Name of the variable holding its password.
        password_env: &'a str,
    },
}

/// A name of an environment variable (A-Z, 0-9, _): anything else may be a secret pasted by
/// mistake, refused without being echoed.
fn env_name(flag: &str, name: &str) -> Result<(), DeployError> {
    let is_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if is_name {
        Ok(())
    } else {
        Err(DeployError::Key(format!(
            "{flag} takes the NAME of an environment variable (A-Z, 0-9, _)"
        )))
    }
}

/// The sending key of `deploy` (`None`: the variable of [`KeyFrom::Env`] is unset). The hex
/// text and the password are wiped from memory once parsed; no message holds key material.
pub fn deploy_key(
    from: KeyFrom<'_>,
) -> Result<Option<alloy::signers::local::PrivateKeySigner>, DeployError> {
    let hex = match from {
        KeyFrom::Env(name) => {
            env_name("--key-env", name)?;
            match std::env::var(name) {
                Ok(hex) => zeroize::Zeroizing::new(hex),
                Err(_) => return Ok(None),
            }
        }
        KeyFrom::File(path) => zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| DeployError::Key(format!("--key-file {}: {e}", path.display())))?,
        ),
        KeyFrom::Keystore { path, password_env } => {
            env_name("--password-env", password_env)?;
            let password = zeroize::Zeroizing::new(std::env::var(password_env).map_err(|_| {
                DeployError::Key(format!(
                    "--keystore needs its password in the environment variable {password_env}"
                ))
            })?);
            if !path.is_file() {
                return Err(DeployError::Key(format!(
                    "--keystore {}: no such file",
                    path.display()
                )));
            }
            return alloy::signers::local::PrivateKeySigner::decrypt_keystore(path, &*password)
                .map(Some)
                .map_err(|e| {
                    DeployError::Key(format!(
                        "--keystore {}: cannot decrypt ({}; wrong password?)",
                        path.display(),
                        keystore_reason(&e)
                    ))
                });
        }
    };
    hex.trim()
        .parse()
        .map(Some)
        .map_err(|_| DeployError::Key("the sending key is not a hex private key".into()))
}

/// Why a keystore did not open, in words that never carry key material.
fn keystore_reason(e: &alloy::signers::local::LocalSignerError) -> &'static str {
    use alloy::signers::local::LocalSignerError;
    match e {
        LocalSignerError::EthKeystoreError(_) => "not a keystore, or the MAC does not match",
        LocalSignerError::IoError(_) => "unreadable",
        _ => "not a key",
    }
}

/// Plan `req.target` from where the chain is and, unless a dry run, send the sender's part.
pub async fn run(req: DeployRequest) -> Result<DeployReport, DeployError> {
    use alloy::network::EthereumWallet;
    use alloy::providers::ProviderBuilder;

    let client = super::client::json_rpc(&req.rpc_url, "--rpc-url").map_err(DeployError::Key)?;
    if req.key.is_none() && !req.dry_run {
        return Err(DeployError::Key(
            "no sending key: set SP_DEPLOYER_KEY (or the variable --key-env names), or give \
             --key-file or --keystore (or use --dry-run)"
                .into(),
        ));
    }
    let from = req
        .key
        .as_ref()
        .map(|k| k.address())
        .or(req.from)
        .unwrap_or(req.target.owner);
    let provider = match req.key {
        Some(key) => ProviderBuilder::new()
            .wallet(EthereumWallet::from(key))
            .connect_client(client)
            .erased(),
        None => ProviderBuilder::new().connect_client(client).erased(),
    };
    let chain_id = provider.get_chain_id().await.map_err(rpc_err)?;
    match req.chain_id {
        Some(asked) if asked != chain_id => {
            return Err(DeployError::Refused(format!(
                "--rpc-url serves chain {chain_id}, not --chain-id {asked}: nothing sent"
            )));
        }
        None if !req.dry_run => {
            return Err(DeployError::Refused(format!(
                "give --chain-id (the RPC serves chain {chain_id}) to send; nothing sent"
            )));
        }
        _ => {}
    }
    let plan = plan_paymaster(&provider, &req.artifacts, from, &req.target).await?;
    let flag = req.target.version.flag_suffix();
    let serve_config = vec![
        format!("chain_id = {chain_id}"),
        format!("entry_point_{flag} = \"{}\"", req.target.entry_point),
        format!("paymaster_{flag} = \"{}\"", plan.paymaster),
    ];
    let transactions_sent = if req.dry_run {
        0
    } else {
        execute(&provider, chain_id, from, &plan).await?
    };
    Ok(DeployReport {
        chain_id,
        from,
        dry_run: req.dry_run,
        transactions_sent,
        plan,
        serve_config,
    })
}
