//! API keys of dapp backends: configured as SHA-256 hashes (the config holds no credential),
//! each with a name for logs and, optionally, the policies it may use. Clients send
//! `Authorization: Bearer <key>` or `?apikey=<key>` (viem's http transport puts it in the URL).

use alloy::primitives::B256;
use sha2::{Digest, Sha256};

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Name shown in logs (never the key).
    pub name: String,
    /// SHA-256 of the key.
    pub sha256: B256,
    /// Policies it may use; `None`: all.
    pub policies: Option<Vec<String>>,
}

impl std::str::FromStr for ApiKey {
    type Err = String;

    /// `name:sha256hex` or `name:sha256hex:policy,policy`, as `apikey new` prints it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().splitn(3, ':');
        let name = parts
            .next()
            .filter(|n| !n.is_empty())
            .ok_or("API key: empty name")?;
        let hash = parts
            .next()
            .ok_or_else(|| format!("API key `{name}`: expected name:sha256[:policies]"))?;
        let sha256 = hash
            .parse::<B256>()
            .map_err(|_| format!("API key `{name}`: `{hash}` is not a 32-byte hex SHA-256"))?;
        let policies = parts.next().map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect()
        });
        Ok(Self {
            name: name.to_owned(),
            sha256,
            policies,
        })
    }
}

/// Whether a credential limited to the policies `allowed` (`None`: every one) reaches policy
/// `id`: an API key's (its `policies`) or a tenant's admin key's.
pub fn reaches(allowed: Option<&[String]>, id: &str) -> bool {
    allowed.is_none_or(|ids| ids.iter().any(|p| p == id))
}

/// Whether SHA-256(`token`) equals `expected`, compared in constant time.
pub fn sha256_matches(token: &str, expected: &B256) -> bool {
    let digest = Sha256::digest(token.as_bytes());
    digest
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The configured keys; empty means keyless (allowed only on loopback).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    /// The keys.
    pub fn new(keys: Vec<ApiKey>) -> Self {
        Self { keys }
    }

    /// Whether no key is configured (keyless mode).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key `token` is, if any. Every key is compared (no early exit on a match), so the
    /// time taken says nothing about which key matched or how close a guess came.
    pub fn authenticate(&self, token: &str) -> Option<&ApiKey> {
        let digest = Sha256::digest(token.as_bytes());
        let mut found = None;
        for key in &self.keys {
            let same = digest
                .iter()
                .zip(key.sha256.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same && found.is_none() {
                found = Some(key);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_authenticate() -> Result<(), String> {
        let hash = hex::encode(Sha256::digest(b"k1"));
        let key: ApiKey = format!("shop:0x{hash}:mint,game").parse()?;
        assert_eq!(
            key.policies,
            Some(vec!["mint".to_owned(), "game".to_owned()])
        );
        let open: ApiKey = format!("ops:{hash}").parse()?;
        assert_eq!(open.policies, None);
        assert!("x".parse::<ApiKey>().is_err());
        assert!("x:0x12".parse::<ApiKey>().is_err());
        let keys = ApiKeys::new(vec![key]);
        assert_eq!(
            keys.authenticate("k1").map(|k| k.name.as_str()),
            Some("shop")
        );
        assert!(keys.authenticate("k2").is_none());
        assert!(keys.authenticate("").is_none());
        assert!(sha256_matches(
            "k1",
            &B256::from_slice(&Sha256::digest(b"k1"))
        ));
        Ok(())
    }
}
