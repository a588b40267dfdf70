//! Deterministic deployment (DESIGN §4, §7): EntryPoint and SimpleAccountFactory from the
//! official `@account-abstraction/contracts` artifacts, SessionPaymaster and the demo Counter
//! from `forge build`, all through the CREATE2 deployer so they land at fixed addresses.
//!
//! Transactions are sent with `eth_sendTransaction` from an account the node unlocks (anvil's
//! dev accounts): this path is for local stacks and tests. Production deployments of
//! SessionPaymaster use `contracts/script/Deploy.s.sol` with the operator's own key.

use std::path::{Path, PathBuf};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256, address, b256, keccak256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolValue;
use serde::Serialize;

use crate::userop::{EntryPointVersion, ISessionPaymaster};

/// The deterministic deployment proxy (Arachnid's), present on anvil and most chains.
pub const CREATE2_DEPLOYER: Address = address!("0x4e59b44847b379578588920cA78FbF26c0B4956C");

/// Salt of the canonical EntryPoint deployments (DESIGN §7).
pub const fn entry_point_salt(version: EntryPointVersion) -> B256 {
    match version {
        EntryPointVersion::V0_7 => {
            b256!("0x90d8084deab30c2a37c45e8d47f49f2f7965183cb6990a98943ef94940681de3")
        }
        EntryPointVersion::V0_8 => {
            b256!("0x0a59dbff790c23c976a548690c27297883cc66b4c67024f9117b0238995e35e9")
        }
    }
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
    /// A deployment transaction did not leave code at the expected address.
    #[error("deployment of {what} left no code at {address}")]
    NoCode {
        /// Which contract.
        what: String,
        /// Expected address.
        address: Address,
    },
}

fn rpc_err(e: impl std::fmt::Display) -> DeployError {
    DeployError::Rpc(e.to_string())
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
        match version {
            EntryPointVersion::V0_7 => "aa07",
            EntryPointVersion::V0_8 => "aa08",
        }
    }

    fn profile(version: EntryPointVersion) -> &'static str {
        match version {
            EntryPointVersion::V0_7 => "v07",
            EntryPointVersion::V0_8 => "v08",
        }
    }

    /// Creation bytecode of the canonical EntryPoint.
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

    /// Creation bytecode of SessionPaymaster built against `version`.
    pub fn session_paymaster(&self, version: EntryPointVersion) -> Result<Bytes, DeployError> {
        self.bytecode(&format!(
            "out/{}/SessionPaymaster.sol/SessionPaymaster.json",
            Self::profile(version)
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

    /// `bytecode` of a Hardhat artifact (a hex string) or a Foundry one (`{object}`).
    fn bytecode(&self, relative: &str) -> Result<Bytes, DeployError> {
        let path = self.dir.join(relative);
        let err = |reason: String| DeployError::Artifact {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("{e} (run scripts/setup-contracts)")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
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

/// Send a transaction from an unlocked account and wait for a successful receipt.
pub async fn send(provider: &DynProvider, tx: TransactionRequest) -> Result<B256, DeployError> {
    let receipt = provider
        .send_transaction(tx)
        .await
        .map_err(rpc_err)?
        .get_receipt()
        .await
        .map_err(rpc_err)?;
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
    /// EntryPoint version ("0.7", "0.8").
    #[serde(serialize_with = "serialize_display")]
    pub version: EntryPointVersion,
    /// EntryPoint address.
    pub entry_point: Address,
    /// SimpleAccountFactory for it.
    pub simple_account_factory: Address,
    /// SessionPaymaster for it.
    pub paymaster: Address,
}

fn serialize_display<S: serde::Serializer>(v: &EntryPointVersion, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A local stack: both EntryPoint versions with factory and paymaster, and the demo Counter.
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
        let with_ep =
            |code: Bytes| -> Bytes { [code.as_ref(), &entry_point.abi_encode()].concat().into() };
        let factory = create2(
            provider,
            from,
            B256::ZERO,
            &with_ep(artifacts.simple_account_factory(version)?),
            "SimpleAccountFactory",
        )
        .await?;
        let args = (entry_point, owner, signers.to_vec()).abi_encode_params();
        let init_code: Bytes = [artifacts.session_paymaster(version)?.as_ref(), &args]
            .concat()
            .into();
        let paymaster = create2(provider, from, B256::ZERO, &init_code, "SessionPaymaster").await?;
        if !deposit.is_zero() {
            let call = ISessionPaymaster::depositCall {};
            let tx = TransactionRequest::default()
                .with_from(from)
                .with_to(paymaster)
                .with_value(deposit)
                .with_input(alloy::sol_types::SolCall::abi_encode(&call));
            send(provider, tx).await?;
        }
        entry_points.push(VersionDeployment {
            version,
            entry_point,
            simple_account_factory: factory,
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
