//! ERC-4337 user operations: the RPC (unpacked) form clients send, the packed form the
//! EntryPoint hashes, the hashes we sign, and the paymaster data we return.
//!
//! What differs by EntryPoint version is selected by [`EntryPointVersion`]; v0.8 uses the v0.7
//! operation shape and differs only in its userOpHash (EIP-712), see [`hash`].

pub mod hash;
pub mod paymaster_data;
pub mod v0_7;

use std::fmt;
use std::str::FromStr;

use alloy::primitives::{Address, address};

pub use v0_7::{IEntryPoint, ISessionPaymaster, PackedUserOperation, UserOperation};

/// The EntryPoint versions this service sponsors for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryPointVersion {
    /// EntryPoint v0.7 (`PackedUserOperation`, plain keccak userOpHash).
    V0_7,
    /// EntryPoint v0.8 (same operation shape, EIP-712 userOpHash).
    V0_8,
}

impl EntryPointVersion {
    /// Every supported version, oldest first.
    pub const ALL: [Self; 2] = [Self::V0_7, Self::V0_8];

    /// The address the canonical deployment has on every chain (DESIGN §3).
    pub const fn canonical_address(self) -> Address {
        match self {
            Self::V0_7 => address!("0x0000000071727De22E5E9d8BAf0edAc6f37da032"),
            Self::V0_8 => address!("0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108"),
        }
    }

    /// The suffix of this version's configuration keys and flags (`paymaster_v07`,
    /// `--paymaster-v08`).
    pub const fn flag_suffix(self) -> &'static str {
        match self {
            Self::V0_7 => "v07",
            Self::V0_8 => "v08",
        }
    }
}

impl fmt::Display for EntryPointVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V0_7 => "0.7",
            Self::V0_8 => "0.8",
        })
    }
}

impl FromStr for EntryPointVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim_start_matches('v') {
            "0.7" => Ok(Self::V0_7),
            "0.8" => Ok(Self::V0_8),
            other => Err(format!(
                "unsupported EntryPoint version `{other}` (supported: 0.7, 0.8)"
            )),
        }
    }
}
