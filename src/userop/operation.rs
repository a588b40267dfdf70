//! The user operation of EntryPoint v0.7, v0.8 and v0.9: RPC form, parsing and packing.
//!
//! RPC form fields per ERC-4337 (`eth_sendUserOperation` for v0.7): `sender, nonce, factory,
//! factoryData, callData, callGasLimit, verificationGasLimit, preVerificationGas, maxFeePerGas,
//! maxPriorityFeePerGas, paymaster, paymasterVerificationGasLimit, paymasterPostOpGasLimit,
//! paymasterData, signature`, and for v0.9 `paymasterSignature` (as viem sends it: packed after
//! `paymasterData` with its length and magic, see [`super::v0_9`]). ERC-7677 stub requests may omit gas and fee fields (viem sends
//! `0x0` or nothing before estimation), so those default to zero here and the signing methods
//! check them with [`UserOperation::require_gas_limits`].

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol;
use serde_json::Value;

use super::eip7702::{self, Eip7702, Eip7702Auth};
use super::paymaster_data::PaymasterGas;
use crate::wire::{self, FieldError, to_quantity};

sol! {
    /// The packed user operation the v0.7, v0.8 and v0.9 EntryPoints take (`PackedUserOperation.sol`).
    #[derive(Debug, PartialEq, Eq)]
    struct PackedUserOperation {
        address sender;
        uint256 nonce;
        bytes initCode;
        bytes callData;
        bytes32 accountGasLimits;
        uint256 preVerificationGas;
        bytes32 gasFees;
        bytes paymasterAndData;
        bytes signature;
    }

    /// What this service uses of the v0.7, v0.8 and v0.9 EntryPoint (`IEntryPoint.sol`, `IStakeManager.sol`).
    #[sol(rpc)]
    interface IEntryPoint {
        event UserOperationEvent(bytes32 indexed userOpHash, address indexed sender, address indexed paymaster, uint256 nonce, bool success, uint256 actualGasCost, uint256 actualGasUsed);
        error FailedOp(uint256 opIndex, string reason);
        error FailedOpWithRevert(uint256 opIndex, string reason, bytes inner);
        function handleOps(PackedUserOperation[] calldata ops, address payable beneficiary) external;
        function getUserOpHash(PackedUserOperation calldata userOp) external view returns (bytes32);
        function balanceOf(address account) external view returns (uint256);
        function getNonce(address sender, uint192 key) external view returns (uint256 nonce);
        function getDepositInfo(address account) external view returns (DepositInfo memory info);
        function depositTo(address account) external payable;
    }

    /// `IStakeManager.DepositInfo`.
    struct DepositInfo {
        uint256 deposit;
        bool staked;
        uint112 stake;
        uint32 unstakeDelaySec;
        uint48 withdrawTime;
    }

    /// `contracts/src/SessionPaymaster.sol`.
    #[sol(rpc)]
    interface ISessionPaymaster {
        error InvalidPaymasterDataLength(uint256 length);
        function getHash(PackedUserOperation calldata userOp, uint48 validUntil, uint48 validAfter) external view returns (bytes32);
        function isSigner(address signer) external view returns (bool);
        function signers() external view returns (address[] memory);
        function addSigner(address signer) external;
        function removeSigner(address signer) external;
        function deposit() external payable;
        function getDeposit() external view returns (uint256);
        function owner() external view returns (address);
        function pendingOwner() external view returns (address);
        function addStake(uint32 unstakeDelaySec) external payable;
        function entryPoint() external view returns (address);
    }
}

/// An operation's initCode and callData hashes ([`UserOperation::digests`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpDigests {
    /// [`UserOperation::entry_point_init_code_hash`]: `keccak256(initCode)`, or an EIP-7702
    /// account's delegate's hash.
    pub init_code: B256,
    /// `keccak256(callData)`.
    pub call_data: B256,
}

/// A user operation in the RPC (unpacked) form, parsed and typed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserOperation {
    /// The smart account.
    pub sender: Address,
    /// 192-bit key ‖ 64-bit sequence.
    pub nonce: U256,
    /// Account factory for a counterfactual account, with its calldata.
    pub factory: Option<Address>,
    /// Calldata for `factory` (empty without one).
    pub factory_data: Bytes,
    /// An EIP-7702 account's marker and authorization (`factory = 0x7702`, `eip7702Auth`);
    /// `factory` is `None` then.
    pub eip7702: Option<Eip7702>,
    /// What the EntryPoint calls on the account.
    pub call_data: Bytes,
    /// Gas for the account's execution call.
    pub call_gas_limit: u128,
    /// Gas for the account's validation (and deployment).
    pub verification_gas_limit: u128,
    /// Gas paid to the bundler for overhead.
    pub pre_verification_gas: U256,
    /// EIP-1559 fee cap.
    pub max_fee_per_gas: u128,
    /// EIP-1559 tip cap.
    pub max_priority_fee_per_gas: u128,
    /// The paymaster fields the client sent (stub or stale); ignored when we sign our own.
    pub paymaster: Option<PaymasterFields>,
    /// The account's signature (a placeholder until the user signs).
    pub signature: Bytes,
}

/// The paymaster part of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PaymasterFields {
    /// Paymaster contract.
    pub paymaster: Address,
    /// Gas limits the EntryPoint gives the paymaster.
    pub gas: PaymasterGas,
    /// Paymaster-specific data after the static fields.
    pub data: Bytes,
    /// v0.9: a paymaster signature packed after `data`, outside the userOpHash
    /// (`paymasterSignature`; at most 65,535 bytes).
    pub signature: Option<Bytes>,
}

impl UserOperation {
    /// Parse the RPC form. Unknown fields are ignored (clients add their own); every error names
    /// the field.
    pub fn from_json(value: &Value) -> Result<Self, FieldError> {
        let obj = value
            .as_object()
            .ok_or_else(|| FieldError::invalid("userOp", "expected a JSON object"))?;
        let q128 = |field: &str| -> Result<u128, FieldError> {
            wire::optional(obj, field).map_or(Ok(0), |v| wire::quantity_u128(field, v))
        };
        let data = |field: &str| -> Result<Bytes, FieldError> {
            wire::optional(obj, field).map_or(Ok(Bytes::new()), |v| wire::data(field, v))
        };

        let mut eip7702_marker = None;
        let factory = match wire::optional(obj, "factory") {
            None => None,
            Some(v) => {
                let bytes = wire::data("factory", v)?;
                if eip7702::is_marker(&bytes) {
                    eip7702_marker = Some(bytes);
                    None
                } else if eip7702::looks_like_marker(&bytes) {
                    // 0x…7702 is no marker to the EntryPoint: it would be called as a factory.
                    return Err(FieldError::invalid(
                        "factory",
                        "the EIP-7702 marker is 0x7702, padded on the right to at most 20 bytes",
                    ));
                } else {
                    match bytes.len() {
                        0 => None,
                        20 => Some(Address::from_slice(&bytes)),
                        n => {
                            return Err(FieldError::invalid(
                                "factory",
                                format!("expected a 20-byte address, got {n} bytes"),
                            ));
                        }
                    }
                }
            }
        };
        let factory_data = data("factoryData")?;
        let eip7702 = match (eip7702_marker, wire::optional(obj, "eip7702Auth")) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(FieldError::invalid(
                    "eip7702Auth",
                    "set without the EIP-7702 marker (factory 0x7702): the bundler would delegate \
                     the account to code the operation does not name",
                ));
            }
            (Some(_), None) => {
                // The EntryPoint hashes the delegate, which only the authorization names here.
                return Err(FieldError::invalid(
                    "eip7702Auth",
                    "required with factory 0x7702: it names the delegate the EntryPoint hashes \
                     (an EOA already delegated sends no factory)",
                ));
            }
            (Some(marker), Some(auth)) => {
                if !factory_data.is_empty() {
                    // initCode longer than 20 bytes: the EntryPoint calls the account with the
                    // rest (`initEip7702Sender`), code no policy sees.
                    return Err(FieldError::invalid(
                        "factoryData",
                        "must be empty for an EIP-7702 account",
                    ));
                }
                Some(Eip7702 {
                    marker,
                    auth: Eip7702Auth::from_json(auth)?,
                })
            }
        };
        if factory.is_none() && eip7702.is_none() && !factory_data.is_empty() {
            return Err(FieldError::invalid("factoryData", "set without `factory`"));
        }
        if factory.is_some() && factory_data.is_empty() {
            // A factory is called with its data (an empty call reaches only a fallback); and
            // `keccak256(factory)` alone is what an EIP-7702 account delegated to that address
            // hashes: a signature for the one would do for the other.
            return Err(FieldError::invalid(
                "factoryData",
                "empty: a factory is called with the data that deploys the account",
            ));
        }

        let paymaster = match wire::optional(obj, "paymaster") {
            None => None,
            Some(v) => Some(PaymasterFields {
                paymaster: wire::address("paymaster", v)?,
                gas: PaymasterGas {
                    verification: q128("paymasterVerificationGasLimit")?,
                    post_op: q128("paymasterPostOpGasLimit")?,
                },
                data: data("paymasterData")?,
                signature: match wire::optional(obj, "paymasterSignature") {
                    None => None,
                    Some(v) => {
                        let sig = wire::data("paymasterSignature", v)?;
                        if sig.len() > usize::from(u16::MAX) {
                            return Err(FieldError::invalid(
                                "paymasterSignature",
                                format!("longer than 65535 bytes ({})", sig.len()),
                            ));
                        }
                        // An empty one packs to nothing (viem sends none then).
                        (!sig.is_empty()).then_some(sig)
                    }
                },
            }),
        };

        Ok(Self {
            sender: wire::address("sender", wire::required(obj, "sender")?)?,
            nonce: wire::quantity("nonce", wire::required(obj, "nonce")?, 256)?,
            factory,
            factory_data,
            eip7702,
            call_data: wire::data("callData", wire::required(obj, "callData")?)?,
            call_gas_limit: q128("callGasLimit")?,
            verification_gas_limit: q128("verificationGasLimit")?,
            // Packed as a uint256, but every EntryPoint refuses a gas value above 120 bits
            // (AA94): an operation with one can never land.
            pre_verification_gas: wire::optional(obj, "preVerificationGas")
                .map_or(Ok(U256::ZERO), |v| {
                    wire::quantity("preVerificationGas", v, 120)
                })?,
            max_fee_per_gas: q128("maxFeePerGas")?,
            max_priority_fee_per_gas: q128("maxPriorityFeePerGas")?,
            paymaster,
            signature: data("signature")?,
        })
    }

    /// The RPC form, as [`Self::from_json`] reads it (e.g. to send to a bundler). Absent
    /// optional fields are omitted.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({
            "sender": self.sender,
            "nonce": to_quantity(self.nonce),
            "callData": self.call_data,
            "callGasLimit": to_quantity(self.call_gas_limit),
            "verificationGasLimit": to_quantity(self.verification_gas_limit),
            "preVerificationGas": to_quantity(self.pre_verification_gas),
            "maxFeePerGas": to_quantity(self.max_fee_per_gas),
            "maxPriorityFeePerGas": to_quantity(self.max_priority_fee_per_gas),
            "signature": self.signature,
        });
        if let Some(factory) = self.factory {
            v["factory"] = serde_json::json!(factory);
            v["factoryData"] = serde_json::json!(self.factory_data);
        }
        if let Some(e) = &self.eip7702 {
            v["factory"] = serde_json::json!(e.marker);
            v["factoryData"] = serde_json::json!(Bytes::new());
            v["eip7702Auth"] = e.auth.to_json();
        }
        if let Some(pm) = &self.paymaster {
            v["paymaster"] = serde_json::json!(pm.paymaster);
            v["paymasterVerificationGasLimit"] =
                serde_json::json!(to_quantity(pm.gas.verification));
            v["paymasterPostOpGasLimit"] = serde_json::json!(to_quantity(pm.gas.post_op));
            v["paymasterData"] = serde_json::json!(pm.data);
            if let Some(sig) = &pm.signature {
                v["paymasterSignature"] = serde_json::json!(sig);
            }
        }
        v
    }

    /// Final paymaster data commits to every gas and fee field, so they must be set before we
    /// sign it; ERC-7677 stub requests are exempt (they come before estimation).
    pub fn require_gas_limits(&self) -> Result<(), FieldError> {
        let zero = |field: &str| {
            Err(FieldError::invalid(
                field,
                "zero or missing: set gas limits and fees before asking for final paymaster data \
                 (estimate with pm_getPaymasterStubData first)",
            ))
        };
        if self.verification_gas_limit == 0 {
            return zero("verificationGasLimit");
        }
        if self.call_gas_limit == 0 {
            return zero("callGasLimit");
        }
        if self.pre_verification_gas.is_zero() {
            return zero("preVerificationGas");
        }
        if self.max_fee_per_gas == 0 {
            return zero("maxFeePerGas");
        }
        if self.max_priority_fee_per_gas > self.max_fee_per_gas {
            return Err(FieldError::invalid(
                "maxPriorityFeePerGas",
                "exceeds maxFeePerGas",
            ));
        }
        Ok(())
    }

    /// `factory ‖ factoryData` (the EIP-7702 marker for such an account), empty for a deployed
    /// account.
    pub fn init_code(&self) -> Bytes {
        match (self.factory, &self.eip7702) {
            (_, Some(e)) => e.marker.clone(),
            (None, None) => Bytes::new(),
            (Some(factory), None) => [factory.as_slice(), &self.factory_data].concat().into(),
        }
    }

    /// What the EntryPoint's userOpHash (v0.8 and later) and `SessionPaymaster.getHash` put for
    /// the initCode: its hash, or for an EIP-7702 account its delegate's (see
    /// [`Eip7702::delegate_hash`]), so that the signature binds the code that will run.
    pub fn entry_point_init_code_hash(&self) -> B256 {
        if let Some(e) = &self.eip7702 {
            return e.delegate_hash();
        }
        match self.init_code() {
            // No initCode (most operations): the hash of no bytes, not hashed again each time.
            code if code.is_empty() => alloy::primitives::utils::KECCAK256_EMPTY,
            code => alloy::primitives::keccak256(code),
        }
    }

    /// Bytes the paymaster hashes during validation (`initCode` and `callData`): what its
    /// verification gas grows with.
    pub fn hashed_len(&self) -> usize {
        self.init_code().len() + self.call_data.len()
    }

    /// The hashes of its initCode (as the EntryPoint puts it) and callData: what every digest
    /// of the operation takes in place of those bytes. A sponsorship computes them once and
    /// hands them to each (the idempotency key, the userOpHash, the paymaster hash).
    pub fn digests(&self) -> OpDigests {
        OpDigests {
            init_code: self.entry_point_init_code_hash(),
            call_data: alloy::primitives::keccak256(&self.call_data),
        }
    }

    /// Every field the paymaster signature covers except the paymaster's own (and the account's
    /// signature), with the chain and EntryPoint: what the idempotency key and a session proof
    /// bind. A tuple of static ABI types, so nested in a larger tuple it encodes inline (as if
    /// its fields were listed there).
    #[allow(clippy::type_complexity)]
    pub fn bound_fields(
        &self,
        chain_id: u64,
        entry_point: Address,
        digests: &OpDigests,
    ) -> (U256, Address, Address, U256, B256, B256, B256, U256, B256) {
        (
            U256::from(chain_id),
            entry_point,
            self.sender,
            self.nonce,
            digests.init_code,
            digests.call_data,
            self.account_gas_limits(),
            self.pre_verification_gas,
            self.gas_fees(),
        )
    }

    /// `verificationGasLimit(16) ‖ callGasLimit(16)`.
    pub fn account_gas_limits(&self) -> B256 {
        pack_u128s(self.verification_gas_limit, self.call_gas_limit)
    }

    /// `maxPriorityFeePerGas(16) ‖ maxFeePerGas(16)`.
    pub fn gas_fees(&self) -> B256 {
        pack_u128s(self.max_priority_fee_per_gas, self.max_fee_per_gas)
    }

    /// Worst-case cost in wei if sponsored with `gas` (DESIGN §3): what the ledger reserves.
    /// Saturating: `preVerificationGas` is a client's 256-bit value, and a sum that wrapped
    /// would reserve next to nothing (the EntryPoint refuses gas values above 120 bits, but a
    /// cost must never be computed below what it is).
    pub fn max_cost(&self, gas: PaymasterGas) -> U256 {
        let total_gas = [
            U256::from(self.verification_gas_limit),
            U256::from(self.call_gas_limit),
            U256::from(gas.verification),
            U256::from(gas.post_op),
        ]
        .into_iter()
        .fold(self.pre_verification_gas, U256::saturating_add);
        total_gas.saturating_mul(U256::from(self.max_fee_per_gas))
    }

    /// The packed form, with `paymaster` in place of the client's paymaster fields.
    pub fn pack(&self, paymaster: Option<&PaymasterFields>) -> PackedUserOperation {
        let paymaster = paymaster.or(self.paymaster.as_ref());
        PackedUserOperation {
            sender: self.sender,
            nonce: self.nonce,
            initCode: self.init_code(),
            callData: self.call_data.clone(),
            accountGasLimits: self.account_gas_limits(),
            preVerificationGas: self.pre_verification_gas,
            gasFees: self.gas_fees(),
            paymasterAndData: paymaster.map_or_else(Bytes::new, PaymasterFields::pack),
            signature: self.signature.clone(),
        }
    }
}

impl PaymasterFields {
    /// `paymaster(20) ‖ verificationGasLimit(16) ‖ postOpGasLimit(16) ‖ data`, then, with a
    /// v0.9 paymaster signature, `‖ signature ‖ uint16 length ‖ magic`.
    pub fn pack(&self) -> Bytes {
        let mut out = Vec::with_capacity(52 + self.data.len());
        out.extend_from_slice(self.paymaster.as_slice());
        out.extend_from_slice(&self.gas.verification.to_be_bytes());
        out.extend_from_slice(&self.gas.post_op.to_be_bytes());
        out.extend_from_slice(&self.data);
        match &self.signature {
            // Parsing caps the length at a uint16, so the suffix always encodes.
            Some(sig) => {
                super::paymaster_data::with_paymaster_signature(&out, sig).unwrap_or(out.into())
            }
            None => out.into(),
        }
    }
}

/// `hi(16) ‖ lo(16)` as the EntryPoint packs gas limits and fees.
pub(crate) fn pack_u128s(hi: u128, lo: u128) -> B256 {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&hi.to_be_bytes());
    out[16..].copy_from_slice(&lo.to_be_bytes());
    B256::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    prop_compose! {
        fn arb_op()(
            sender in any::<[u8; 20]>(),
            nonce in any::<[u8; 32]>(),
            factory in prop::option::of(any::<[u8; 20]>()),
            factory_data in prop::collection::vec(any::<u8>(), 1..64),
            call_data in prop::collection::vec(any::<u8>(), 0..256),
            gas in any::<[u128; 4]>(),
            pvg in any::<[u8; 15]>(),
            paymaster in prop::option::of((any::<[u8; 20]>(), any::<[u128; 2]>(), prop::collection::vec(any::<u8>(), 0..100), prop::option::of(prop::collection::vec(any::<u8>(), 1..70)))),
            signature in prop::collection::vec(any::<u8>(), 0..70),
            delegate in prop::option::of((any::<[u8; 20]>(), 2usize..=20, any::<u64>())),
        ) -> UserOperation {
            // An EIP-7702 account has no factory.
            let factory = factory.filter(|_| delegate.is_none());
            UserOperation {
                sender: Address::from(sender),
                nonce: U256::from_be_bytes(nonce),
                factory: factory.map(Address::from),
                factory_data: if factory.is_some() { factory_data.into() } else { Bytes::new() },
                eip7702: delegate.map(|(d, marker_len, n)| {
                    let mut marker = vec![0u8; marker_len];
                    marker[..2].copy_from_slice(&[0x77, 0x02]);
                    Eip7702 {
                        marker: marker.into(),
                        auth: Eip7702Auth {
                            address: Address::from(d),
                            chain_id: U256::from(n % 3),
                            nonce: n,
                            r: U256::from(n),
                            s: U256::from(n / 2),
                            y_parity: (n % 2) as u8,
                        },
                    }
                }),
                call_data: call_data.into(),
                call_gas_limit: gas[0],
                verification_gas_limit: gas[1],
                // At most 120 bits, as parsing takes it.
                pre_verification_gas: U256::from_be_slice(&pvg),
                max_fee_per_gas: gas[2],
                max_priority_fee_per_gas: gas[3],
                paymaster: paymaster.map(|(a, g, d, s)| PaymasterFields {
                    paymaster: Address::from(a),
                    gas: PaymasterGas { verification: g[0], post_op: g[1] },
                    data: d.into(),
                    signature: s.map(Bytes::from),
                }),
                signature: signature.into(),
            }
        }
    }

    proptest! {
        #[test]
        fn rpc_form_round_trips(op in arb_op()) {
            prop_assert_eq!(UserOperation::from_json(&op.to_json())?, op);
        }

        /// The initCode hash, whose empty case is a constant, is the hash of what the
        /// EntryPoint reads: the packed initCode, or an EIP-7702 account's delegate.
        #[test]
        fn the_init_code_hash_is_of_the_packed_init_code(op in arb_op()) {
            let expected = match &op.eip7702 {
                Some(e) => alloy::primitives::keccak256(e.auth.address),
                None => alloy::primitives::keccak256(&op.pack(None).initCode),
            };
            prop_assert_eq!(op.entry_point_init_code_hash(), expected);
        }

        /// Packing places every field where the EntryPoint reads it (UserOperationLib).
        #[test]
        fn packing_round_trips(op in arb_op()) {
            let p = op.pack(None);
            prop_assert_eq!(u128::from_be_bytes(p.accountGasLimits[..16].try_into()?), op.verification_gas_limit);
            prop_assert_eq!(u128::from_be_bytes(p.accountGasLimits[16..].try_into()?), op.call_gas_limit);
            prop_assert_eq!(u128::from_be_bytes(p.gasFees[..16].try_into()?), op.max_priority_fee_per_gas);
            prop_assert_eq!(u128::from_be_bytes(p.gasFees[16..].try_into()?), op.max_fee_per_gas);
            prop_assert_eq!(
                p.initCode.len(),
                op.factory.map_or(0, |_| 20 + op.factory_data.len())
                    + op.eip7702.as_ref().map_or(0, |e| e.marker.len())
            );
            prop_assert_eq!(op.hashed_len(), p.initCode.len() + p.callData.len());
            match &op.paymaster {
                None => prop_assert!(p.paymasterAndData.is_empty()),
                Some(pm) => {
                    let pmd = &p.paymasterAndData;
                    prop_assert_eq!(&pmd[..20], pm.paymaster.as_slice());
                    prop_assert_eq!(u128::from_be_bytes(pmd[20..36].try_into()?), pm.gas.verification);
                    prop_assert_eq!(u128::from_be_bytes(pmd[36..52].try_into()?), pm.gas.post_op);
                    prop_assert_eq!(&pmd[52..52 + pm.data.len()], &pm.data[..]);
                    let suffix = &pmd[52 + pm.data.len()..];
                    match &pm.signature {
                        None => prop_assert!(suffix.is_empty()),
                        Some(sig) => {
                            prop_assert_eq!(crate::userop::paymaster_data::paymaster_signature_len(pmd), Some(sig.len()));
                            prop_assert_eq!(&suffix[..sig.len()], &sig[..]);
                        }
                    }
                }
            }
        }
    }

    fn sample() -> Value {
        json!({
            "sender": "0x1111111111111111111111111111111111111111",
            "nonce": "0x0",
            "factory": "0x2222222222222222222222222222222222222222",
            "factoryData": "0xdeadbeef",
            "callData": "0xb61d27f6",
            "callGasLimit": "0x186a0",
            "verificationGasLimit": "0x30d40",
            "preVerificationGas": "0xc350",
            "maxFeePerGas": "0x77359400",
            "maxPriorityFeePerGas": "0x3b9aca00",
            "signature": "0x",
            "eip7702Auth": null,
            "someWalletField": {"x": 1}
        })
    }

    #[test]
    fn parses_rpc_form_and_packs() -> Result<(), FieldError> {
        let op = UserOperation::from_json(&sample())?;
        assert_eq!(op.call_gas_limit, 100_000);
        assert_eq!(op.verification_gas_limit, 200_000);
        let packed = op.pack(None);
        assert_eq!(&packed.initCode[..20], &[0x22; 20]);
        assert_eq!(&packed.initCode[20..], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(packed.accountGasLimits, pack_u128s(200_000, 100_000));
        assert_eq!(packed.gasFees, pack_u128s(1_000_000_000, 2_000_000_000));
        assert!(packed.paymasterAndData.is_empty());
        op.require_gas_limits()
    }

    #[test]
    fn errors_name_the_field() {
        for (field, bad) in [
            ("sender", json!("0x12")),
            ("nonce", json!(5)),
            ("callData", json!("0xabc")),
            ("callGasLimit", json!("100")),
            ("maxFeePerGas", json!(format!("0x1{}", "0".repeat(32)))),
            ("factory", json!(format!("0x{}7702", "00".repeat(18)))),
            ("paymaster", json!("0x")),
            ("eip7702Auth", json!("0x1234")),
        ] {
            let mut v = sample();
            v[field] = bad;
            let err = UserOperation::from_json(&v).unwrap_err();
            assert_eq!(err.field(), field, "{err}");
        }
        let mut v = sample();
        v.as_object_mut().map(|o| o.remove("sender"));
        assert_eq!(
            UserOperation::from_json(&v).unwrap_err(),
            FieldError::Missing("sender".into())
        );
    }

    fn auth() -> Value {
        json!({
            "address": "0xe6Cae83BdE06E4c305530e199D7217f42808555B",
            "chainId": "0x7a69", "nonce": "0x0",
            "r": "0x1", "s": "0x2", "yParity": "0x0"
        })
    }

    #[test]
    fn eip7702_accounts_need_the_marker_and_an_authorization() -> Result<(), FieldError> {
        let delegate: Address = "0xe6Cae83BdE06E4c305530e199D7217f42808555B"
            .parse()
            .map_err(|_| FieldError::invalid("test", "address"))?;
        let marker_right = format!("0x7702{}", "00".repeat(18));
        for marker in ["0x7702", "0x770200", marker_right.as_str()] {
            let mut v = sample();
            v["factory"] = json!(marker);
            v["factoryData"] = json!("0x");
            v["eip7702Auth"] = auth();
            let op = UserOperation::from_json(&v)?;
            assert_eq!(op.factory, None);
            assert_eq!(op.init_code().to_string(), marker, "the marker as sent");
            assert_eq!(
                op.entry_point_init_code_hash(),
                alloy::primitives::keccak256(delegate),
                "the EntryPoint hashes the delegate"
            );
            assert_eq!(UserOperation::from_json(&op.to_json())?, op);

            v.as_object_mut().map(|o| o.remove("eip7702Auth"));
            assert_eq!(
                UserOperation::from_json(&v).unwrap_err().field(),
                "eip7702Auth"
            );
            v["eip7702Auth"] = auth();
            v["factoryData"] = json!("0xc0ffee");
            assert_eq!(
                UserOperation::from_json(&v).unwrap_err().field(),
                "factoryData"
            );
        }
        // A factory without data: refused (keccak256(factory) is also a delegate's hash).
        let mut v = sample();
        v["factoryData"] = json!("0x");
        assert_eq!(
            UserOperation::from_json(&v).unwrap_err().field(),
            "factoryData"
        );
        // 0x…7702 is no marker to the EntryPoint (it would call it as a factory).
        let mut v = sample();
        v["factory"] = json!(format!("0x{}7702", "00".repeat(18)));
        v["factoryData"] = json!("0x");
        v["eip7702Auth"] = auth();
        assert_eq!(UserOperation::from_json(&v).unwrap_err().field(), "factory");
        // An authorization without the marker would delegate the account unseen.
        let mut v = sample();
        v["eip7702Auth"] = auth();
        assert_eq!(
            UserOperation::from_json(&v).unwrap_err().field(),
            "eip7702Auth"
        );
        Ok(())
    }

    #[test]
    fn stub_requests_may_omit_gas_but_signing_may_not() -> Result<(), FieldError> {
        let mut v = sample();
        for f in [
            "callGasLimit",
            "verificationGasLimit",
            "preVerificationGas",
            "maxFeePerGas",
        ] {
            v.as_object_mut().map(|o| o.remove(f));
        }
        let op = UserOperation::from_json(&v)?;
        assert_eq!(
            op.require_gas_limits().unwrap_err().field(),
            "verificationGasLimit"
        );
        Ok(())
    }

    #[test]
    fn max_cost_sums_every_gas_field() -> Result<(), FieldError> {
        let op = UserOperation::from_json(&sample())?;
        let gas = PaymasterGas {
            verification: 40_000,
            post_op: 0,
        };
        let expected =
            U256::from(50_000u64 + 200_000 + 100_000 + 40_000) * U256::from(2_000_000_000u64);
        assert_eq!(op.max_cost(gas), expected);
        Ok(())
    }

    #[test]
    fn pre_verification_gas_fits_what_the_entry_point_takes() {
        let with = |pvg: &str| {
            let mut v = sample();
            v["preVerificationGas"] = json!(pvg);
            UserOperation::from_json(&v)
        };
        assert!(with(&format!("0x{}", "f".repeat(30))).is_ok(), "2^120 - 1");
        assert_eq!(
            with(&format!("0x1{}", "0".repeat(30)))
                .err()
                .map(|e| e.field().to_owned()),
            Some("preVerificationGas".to_owned()),
            "2^120"
        );
    }

    #[test]
    fn max_cost_saturates_rather_than_wrapping() -> Result<(), FieldError> {
        let mut op = UserOperation::from_json(&sample())?;
        let gas = PaymasterGas {
            verification: 40_000,
            post_op: 0,
        };
        // The other gas fields add up past 2^256 - 1: a wrapping sum would be about 300,000
        // gas.
        op.pre_verification_gas = U256::MAX - U256::from(10u64);
        assert_eq!(op.max_cost(gas), U256::MAX);
        op.max_fee_per_gas = 1;
        assert_eq!(op.max_cost(gas), U256::MAX);
        Ok(())
    }
}
