//! ERC-4337 user operations: the RPC (unpacked) form clients send, the packed form the
//! EntryPoint hashes, the hashes we sign, and the paymaster data we return.
//!
//! v0.7, v0.8 and v0.9 share one operation shape ([`operation`], with EIP-7702 accounts in
//! [`eip7702`]). What differs by EntryPoint version lives in one module each ([`v0_7`],
//! [`v0_8`], [`v0_9`]) as a [`VersionSpec`]: addresses, artifacts, the userOpHash, whether it
//! takes EIP-7702 accounts, whether paymasterAndData may carry a paymaster signature outside the
//! userOpHash. [`EntryPointVersion`] selects one.
//!
//! A new version takes: its module (a `VersionSpec`: names, Foundry profile, addresses, salt)
//! and a variant here; its npm package as an alias in `contracts/package.json`; a Foundry
//! profile in `contracts/foundry.toml` with its `contracts/base/vNN/` (ownership, signature
//! suffix, getHash; and `TestBase.entryPointVersion`); its build and forge run in
//! `scripts/setup-contracts` and `scripts/test`; `--entry-point-vNN`/`--paymaster-vNN` in
//! `config.rs` (and `scripts/dev`, `scripts/compose-dev-setup`); and the example policies'
//! `entry_points`, `factories` and `delegates` for its local stack. The tests that iterate `EntryPointVersion::ALL`
//! (hashes against the contracts, end to end) then cover it.

pub mod eip7702;
pub mod hash;
pub mod operation;
pub mod paymaster_data;
pub mod v0_7;
pub mod v0_8;
pub mod v0_9;

use std::fmt;
use std::str::FromStr;

use alloy::primitives::{Address, B256};

pub use operation::{
    IEntryPoint, ISessionPaymaster, OpDigests, PackedUserOperation, PaymasterFields, UserOperation,
};

/// The EntryPoint versions this service sponsors for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryPointVersion {
    /// EntryPoint v0.7 (`PackedUserOperation`, plain keccak userOpHash).
    V0_7,
    /// EntryPoint v0.8 (same operation shape, EIP-712 userOpHash, EIP-7702 accounts).
    V0_8,
    /// EntryPoint v0.9 (v0.8 plus a paymaster signature outside the userOpHash).
    V0_9,
}

/// Everything that differs by EntryPoint version, as one constant per version module.
#[derive(Debug)]
pub struct VersionSpec {
    /// `0.7`: how the version is written in policies, logs and `deploy --entry-point`.
    pub name: &'static str,
    /// `v07`: the suffix of configuration keys and flags (`paymaster_v07`, `--paymaster-v07`)
    /// and the Foundry profile's output directory (`contracts/out/v07`).
    pub flag_suffix: &'static str,
    /// The Foundry profile that builds SessionPaymaster for it (`FOUNDRY_PROFILE`).
    pub forge_profile: &'static str,
    /// The address the canonical deployment has on every chain (DESIGN §3).
    pub canonical_address: Address,
    /// The npm alias of its `@account-abstraction/contracts` package in `contracts/package.json`.
    pub package: &'static str,
    /// CREATE2 salt with which the package's EntryPoint artifact is deployed (DESIGN §7).
    pub entry_point_salt: B256,
    /// Where that deployment lands: the canonical address, unless the package holds another
    /// build than the canonical one (v0.9: 0.9.0-rc.1).
    pub package_entry_point: Address,
    /// `EntryPoint.getUserOpHash(op)` at `entry_point` on `chain_id`, given the hashes it puts
    /// for the initCode (an EIP-7702 account's delegate's: [`UserOperation::entry_point_init_code_hash`])
    /// and the callData ([`UserOperation::digests`]).
    pub user_op_hash: fn(&PackedUserOperation, &OpDigests, Address, u64) -> B256,
    /// Whether it takes EIP-7702 accounts (`factory = 0x7702` and `eip7702Auth`).
    pub eip7702: bool,
    /// Whether paymasterAndData may end with a paymaster signature that the userOpHash leaves
    /// out (v0.9 `UserOperationLib.getPaymasterSignature`).
    pub paymaster_signature_suffix: bool,
}

impl EntryPointVersion {
    /// Every supported version, oldest first.
    pub const ALL: [Self; 3] = [Self::V0_7, Self::V0_8, Self::V0_9];

    /// What differs in this version.
    pub const fn spec(self) -> &'static VersionSpec {
        match self {
            Self::V0_7 => &v0_7::SPEC,
            Self::V0_8 => &v0_8::SPEC,
            Self::V0_9 => &v0_9::SPEC,
        }
    }

    /// The versions whose spec has `feature`, as `v0.8 or v0.9` (for messages).
    pub fn names_where(feature: fn(&VersionSpec) -> bool) -> String {
        Self::ALL
            .iter()
            .filter(|v| feature(v.spec()))
            .map(|v| format!("v{v}"))
            .collect::<Vec<_>>()
            .join(" or ")
    }

    /// See [`VersionSpec::canonical_address`].
    pub const fn canonical_address(self) -> Address {
        self.spec().canonical_address
    }

    /// See [`VersionSpec::flag_suffix`].
    pub const fn flag_suffix(self) -> &'static str {
        self.spec().flag_suffix
    }
}

impl fmt::Display for EntryPointVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.spec().name)
    }
}

impl FromStr for EntryPointVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim_start_matches('v');
        Self::ALL
            .into_iter()
            .find(|v| v.spec().name == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|v| v.spec().name).collect();
                format!(
                    "unsupported EntryPoint version `{name}` (supported: {})",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_their_names_and_differ() {
        for v in EntryPointVersion::ALL {
            assert_eq!(v.to_string().parse::<EntryPointVersion>(), Ok(v));
            assert_eq!(format!("v{v}").parse::<EntryPointVersion>(), Ok(v));
            let others = EntryPointVersion::ALL.into_iter().filter(|&o| o != v);
            for o in others {
                assert_ne!(v.canonical_address(), o.canonical_address());
                assert_ne!(v.flag_suffix(), o.flag_suffix());
                assert_ne!(v.spec().package, o.spec().package);
            }
        }
        assert!("0.6".parse::<EntryPointVersion>().is_err());
        assert!("0.10".parse::<EntryPointVersion>().is_err());
    }
}
