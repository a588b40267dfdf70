//! The paymaster's signing key.
//!
//! Where a key comes from is one enum ([`KeySource`]); today every source yields a local
//! secp256k1 key. A remote signer (KMS) is the second implementation this module will grow
//! when it is needed. The key never prints: `Debug` shows the address only, and the secret is
//! zeroized on drop (k256's `SigningKey` is `ZeroizeOnDrop`; the hex text it came from is
//! held in `Zeroizing`). Signatures are k256's, the nonce inverted faster (`ecdsa`).

mod ecdsa;

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use alloy::primitives::{Address, B256, keccak256};
use k256::ecdsa::SigningKey;
use zeroize::Zeroizing;

/// Where the signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding the key as hex (with or without `0x`), e.g. written by `keygen`.
    File(PathBuf),
    /// An environment variable holding the key as hex.
    Env(String),
    /// A fresh random key for this process only: development, never production.
    Ephemeral,
}

/// What can go wrong loading or using a key. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key environment variable is not set.
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    /// Not 32 bytes of hex, or not a valid secp256k1 scalar.
    #[error("{origin} does not hold a valid secp256k1 private key (expected 32 bytes of hex)")]
    Invalid {
        /// The file or variable it came from.
        origin: String,
    },
    /// The key file exists already: keygen never overwrites a key.
    #[error("cannot create key file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The OS random source failed.
    #[error("random number generator failed: {0}")]
    Rng(String),
    /// ECDSA signing failed (should not happen with a valid key).
    #[error("signing failed")]
    Sign,
}

/// The paymaster signer: a secp256k1 key whose address is in SessionPaymaster's signer set.
pub struct Signer {
    key: SigningKey,
    address: Address,
    source: KeySource,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("address", &self.address)
            .field("key", &"***")
            .finish()
    }
}

impl Signer {
    /// Load the key from `source`.
    pub fn load(source: KeySource) -> Result<Self, SignerError> {
        let key = match &source {
            KeySource::File(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    SignerError::Read {
                        path: path.clone(),
                        source,
                    }
                })?);
                parse_hex_key(&text, &path.display().to_string())?
            }
            KeySource::Env(var) => {
                let text = Zeroizing::new(
                    std::env::var(var).map_err(|_| SignerError::EnvMissing(var.clone()))?,
                );
                parse_hex_key(&text, var)?
            }
            KeySource::Ephemeral => random_key()?,
        };
        let address = Address::from_private_key(&key);
        Ok(Self {
            key,
            address,
            source,
        })
    }

    /// The address SessionPaymaster must list as a signer.
    pub fn address(&self) -> Address {
        self.address
    }

    /// Whether this key lives only as long as the process (development mode).
    pub fn is_ephemeral(&self) -> bool {
        self.source == KeySource::Ephemeral
    }

    /// Sign `hash` with the EIP-191 personal-message prefix, as SessionPaymaster verifies it
    /// (`MessageHashUtils.toEthSignedMessageHash`): `r ‖ s ‖ v`, low s, v ∈ {27, 28}.
    pub fn sign_eip191(&self, hash: B256) -> Result<[u8; 65], SignerError> {
        // `eip191_hash_message(hash)`, its 60-byte message on the stack rather than in a Vec.
        let mut message = [0u8; EIP191_PREFIX.len() + 32];
        message[..EIP191_PREFIX.len()].copy_from_slice(EIP191_PREFIX);
        message[EIP191_PREFIX.len()..].copy_from_slice(hash.as_slice());
        let digest = keccak256(message);
        let (sig, recid) = ecdsa::sign_prehash(&self.key, &digest).ok_or(SignerError::Sign)?;
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + u8::from(recid.is_y_odd());
        Ok(out)
    }
}

/// EIP-191's prefix of a 32-byte personal message.
const EIP191_PREFIX: &[u8] = b"\x19Ethereum Signed Message:\n32";

fn parse_hex_key(text: &str, origin: &str) -> Result<SigningKey, SignerError> {
    let invalid = || SignerError::Invalid {
        origin: origin.to_owned(),
    };
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix("0x").unwrap_or(trimmed);
    if digits.len() != 64 {
        return Err(invalid());
    }
    let bytes = Zeroizing::new(hex::decode(digits).map_err(|_| invalid())?);
    SigningKey::from_slice(&bytes).map_err(|_| invalid())
}

fn random_key() -> Result<SigningKey, SignerError> {
    loop {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).map_err(|e| SignerError::Rng(e.to_string()))?;
        // A 32-byte string is a valid scalar except with probability ~2^-128.
        if let Ok(key) = SigningKey::from_slice(bytes.as_ref()) {
            return Ok(key);
        }
    }
}

/// Write a new random key to `path` (created with mode 0600, never overwriting) and return
/// its address.
pub fn keygen(path: &Path) -> Result<Address, SignerError> {
    let key = random_key()?;
    let hex_key = Zeroizing::new(format!("0x{}\n", hex::encode(key.to_bytes())));
    let write_err = |source| SignerError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(write_err)?;
    file.write_all(hex_key.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(Address::from_private_key(&key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{U256, eip191_hash_message, keccak256};
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};

    #[test]
    fn signatures_recover_to_the_address_with_low_s() -> Result<(), Box<dyn std::error::Error>> {
        let signer = Signer::load(KeySource::Ephemeral)?;
        let half_n = U256::from_str_radix(
            "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0",
            16,
        )?;
        for i in 0u32..64 {
            let hash = keccak256(i.to_be_bytes());
            let sig = signer.sign_eip191(hash)?;
            assert!(U256::from_be_slice(&sig[32..64]) <= half_n);
            let recid = RecoveryId::from_byte(sig[64] - 27).ok_or("v")?;
            let vk = VerifyingKey::recover_from_prehash(
                eip191_hash_message(hash).as_slice(),
                &Signature::from_slice(&sig[..64])?,
                recid,
            )?;
            assert_eq!(Address::from_public_key(&vk), signer.address());
        }
        Ok(())
    }

    #[test]
    fn debug_never_prints_the_key() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("sp-signer-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("k.hex");
        let _ = std::fs::remove_file(&path);
        let address = keygen(&path)?;
        let text = std::fs::read_to_string(&path)?;
        let signer = Signer::load(KeySource::File(path.clone()))?;
        assert_eq!(signer.address(), address);
        let debug = format!("{signer:?}");
        assert!(
            !debug.contains(text.trim().trim_start_matches("0x")),
            "{debug}"
        );
        assert!(debug.contains("***"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path)?.permissions().mode() & 0o777,
                0o600
            );
        }
        assert!(
            matches!(keygen(&path), Err(SignerError::Write { .. })),
            "never overwrites"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn bad_keys_are_rejected_without_echoing_them() {
        for bad in ["", "0x1234", &"zz".repeat(32), &"00".repeat(32)] {
            let err = parse_hex_key(bad, "SP_TEST").unwrap_err();
            assert!(!err.to_string().contains(bad) || bad.is_empty(), "{err}");
        }
    }
}
