//! EIP-7702 accounts (EntryPoint v0.8 and later): an EOA delegated to a contract, marked in the
//! operation by `factory = 0x7702` and, while the delegation is still to be made, carrying the
//! authorization the bundler puts in its transaction (`eip7702Auth`, the RPC form viem sends).
//!
//! The EntryPoint hashes such an operation with `keccak256(delegate)` in place of
//! `keccak256(initCode)` (`Eip7702Support._getEip7702InitCodeHashOverride`), reading the delegate
//! from the sender's code; we take it from the authorization, with no chain read.

use alloy::eips::eip7702::Authorization;
use alloy::primitives::{Address, B256, Bytes, Signature, U256, keccak256};
use serde_json::{Map, Value};

use crate::wire::{self, FieldError, to_quantity};

/// An EIP-7702 authorization: `address` is the delegate the EOA's code will point at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eip7702Auth {
    /// The delegate (the account implementation).
    pub address: Address,
    /// Chain the authorization is for (0: any).
    pub chain_id: U256,
    /// The EOA's nonce it is signed for.
    pub nonce: u64,
    /// Signature `r`.
    pub r: U256,
    /// Signature `s`.
    pub s: U256,
    /// Signature `yParity` (0 or 1).
    pub y_parity: u8,
}

/// An operation's EIP-7702 part: the marker as the client sent it (the paymaster hash covers
/// `keccak256(initCode)` byte for byte) and the authorization naming the delegate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eip7702 {
    /// `0x7702` padded on the right with zeros, 2 to 20 bytes: what the EntryPoint matches
    /// (`bytes20(0x7702)` over the initCode's first 20 bytes).
    pub marker: Bytes,
    /// The authorization.
    pub auth: Eip7702Auth,
}

impl Eip7702 {
    /// What the EntryPoint hashes in place of `keccak256(initCode)`: `keccak256(delegate)` (the
    /// marker is at most 20 bytes, so nothing follows the delegate).
    pub fn delegate_hash(&self) -> B256 {
        keccak256(self.auth.address)
    }
}

/// What the EntryPoint takes for the EIP-7702 marker: `0x7702` followed by up to 18 zero bytes.
pub fn is_marker(factory: &[u8]) -> bool {
    (2..=20).contains(&factory.len())
        && factory[..2] == [0x77, 0x02]
        && factory[2..].iter().all(|&b| b == 0)
}

/// Whether `factory` looks like the marker in any padding (`0x7702`, `0x7702000…0`, `0x000…7702`):
/// such a factory is never parsed as an ordinary one.
pub fn looks_like_marker(factory: &[u8]) -> bool {
    let start = factory
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(factory.len());
    let end = factory
        .iter()
        .rposition(|&b| b != 0)
        .map_or(start, |i| i + 1);
    factory.get(start..end) == Some(&[0x77, 0x02][..])
}

impl Eip7702Auth {
    /// The address that signed the authorization, if `chain_id` is 0 or `chain`; `None` for a
    /// signature that does not recover (or a high `s`), or another chain's authorization.
    pub fn authority(&self, chain: u64) -> Option<Address> {
        if !self.chain_id.is_zero() && self.chain_id != U256::from(chain) {
            return None;
        }
        let signature = Signature::new(self.r, self.s, self.y_parity == 1);
        // EIP-7702 refuses a high `s`, as EIP-2 does for transactions.
        if signature.normalize_s().is_some() {
            return None;
        }
        let digest = Authorization {
            chain_id: self.chain_id,
            address: self.address,
            nonce: self.nonce,
        }
        .signature_hash();
        signature.recover_address_from_prehash(&digest).ok()
    }

    /// Parse `eip7702Auth`: `{address, chainId, nonce, r, s, yParity}` (hex quantities; viem pads
    /// `r`, `s` to 32 bytes and `yParity` to one).
    pub fn from_json(value: &Value) -> Result<Self, FieldError> {
        let obj: &Map<String, Value> = value
            .as_object()
            .ok_or_else(|| FieldError::invalid("eip7702Auth", "expected an object"))?;
        let field = |name: &str| -> Result<&Value, FieldError> {
            wire::optional(obj, name)
                .ok_or_else(|| FieldError::Missing(format!("eip7702Auth.{name}")))
        };
        let y_parity = wire::quantity("eip7702Auth.yParity", field("yParity")?, 8)?.to::<u8>();
        if y_parity > 1 {
            return Err(FieldError::invalid(
                "eip7702Auth.yParity",
                "expected 0 or 1",
            ));
        }
        let address = wire::address("eip7702Auth.address", field("address")?)?;
        if address.is_zero() {
            // Delegating to 0 clears a delegation: the account would run no code of anyone's.
            return Err(FieldError::invalid(
                "eip7702Auth.address",
                "the zero address clears a delegation; name the delegate",
            ));
        }
        Ok(Self {
            address,
            chain_id: wire::quantity("eip7702Auth.chainId", field("chainId")?, 256)?,
            nonce: wire::quantity_u64("eip7702Auth.nonce", field("nonce")?)?,
            r: wire::quantity("eip7702Auth.r", field("r")?, 256)?,
            s: wire::quantity("eip7702Auth.s", field("s")?, 256)?,
            y_parity,
        })
    }

    /// The RPC form, as viem writes it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "address": self.address,
            "chainId": to_quantity(self.chain_id),
            "nonce": to_quantity(self.nonce),
            "r": B256::from(self.r),
            "s": B256::from(self.s),
            "yParity": to_quantity(self.y_parity),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_marker_is_0x7702_padded_on_the_right() {
        assert!(is_marker(&[0x77, 0x02]));
        assert!(is_marker(&[0x77, 0x02, 0, 0]));
        let mut twenty = [0u8; 20];
        twenty[..2].copy_from_slice(&[0x77, 0x02]);
        assert!(is_marker(&twenty));
        let mut left = [0u8; 20];
        left[18..].copy_from_slice(&[0x77, 0x02]);
        assert!(!is_marker(&left) && looks_like_marker(&left));
        assert!(!is_marker(&[0x77, 0x02, 0x01]) && !looks_like_marker(&[0x77, 0x02, 0x01]));
        assert!(!is_marker(&[
            0x77, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]));
    }

    #[test]
    fn the_authority_is_who_signed_for_this_chain() -> Result<(), Box<dyn std::error::Error>> {
        use alloy::signers::SignerSync;
        use alloy::signers::local::PrivateKeySigner;
        let key = PrivateKeySigner::random();
        let sign = |chain: u64| -> Result<Eip7702Auth, Box<dyn std::error::Error>> {
            let a = Authorization {
                chain_id: U256::from(chain),
                address: Address::repeat_byte(0xd1),
                nonce: 7,
            };
            let sig = key.sign_hash_sync(&a.signature_hash())?;
            Ok(Eip7702Auth {
                address: a.address,
                chain_id: a.chain_id,
                nonce: a.nonce,
                r: sig.r(),
                s: sig.s(),
                y_parity: u8::from(sig.v()),
            })
        };
        assert_eq!(sign(31337)?.authority(31337), Some(key.address()));
        assert_eq!(sign(0)?.authority(31337), Some(key.address()), "any chain");
        assert_eq!(sign(1)?.authority(31337), None, "another chain's");
        let mut other_delegate = sign(31337)?;
        other_delegate.address = Address::repeat_byte(0xd2);
        assert_ne!(other_delegate.authority(31337), Some(key.address()));
        // The high-s twin of a valid signature recovers the same key: refused.
        let mut twin = sign(31337)?;
        let n = U256::from_str_radix(
            "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
            16,
        )?;
        twin.s = n - twin.s;
        twin.y_parity ^= 1;
        assert_eq!(twin.authority(31337), None);
        Ok(())
    }

    #[test]
    fn authorizations_parse_as_viem_writes_them() -> Result<(), FieldError> {
        let viem = json!({
            "address": "0xe6Cae83BdE06E4c305530e199D7217f42808555B",
            "chainId": "0x7a69",
            "nonce": "0x0",
            "r": format!("0x{}", "11".repeat(32)),
            "s": format!("0x{}", "22".repeat(32)),
            "yParity": "0x01"
        });
        let auth = Eip7702Auth::from_json(&viem)?;
        assert_eq!(auth.chain_id, U256::from(31337));
        assert_eq!(auth.y_parity, 1);
        assert_eq!(Eip7702Auth::from_json(&auth.to_json())?, auth);
        for (name, bad) in [
            ("address", json!("0x12")),
            ("address", json!(format!("0x{}", "00".repeat(20)))),
            ("yParity", json!("0x2")),
            ("nonce", json!(format!("0x1{}", "0".repeat(16)))),
            ("r", json!(5)),
        ] {
            let mut v = viem.clone();
            v[name] = bad;
            let err = Eip7702Auth::from_json(&v).unwrap_err();
            assert_eq!(err.field(), format!("eip7702Auth.{name}"), "{err}");
        }
        let mut v = viem.clone();
        v.as_object_mut().map(|o| o.remove("s"));
        assert_eq!(
            Eip7702Auth::from_json(&v).unwrap_err(),
            FieldError::Missing("eip7702Auth.s".into())
        );
        Ok(())
    }
}
