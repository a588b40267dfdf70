//! A grant as Redis stores it: a compact binary record, about 90 bytes for a grant without
//! narrowed permissions (its JSON took over 400, and Redis kept it in a hash with its status).
//!
//! ```text
//! status u8 ('a' active; anything else: revoked)   <- the one byte revocation rewrites
//! version u8 (1; 2: its budget's counter is shared, `SessionGrant::shared_budget`)
//! account [20] ‖ session key [20]
//! chainId u64 ‖ validAfter u64 ‖ validUntil u64 ‖ createdAt u64   (big-endian)
//! policy: u8 length ‖ bytes
//! the rest: `{"permissions":…,"budget":…}` as JSON when the grant narrows either, else empty
//! ```
//!
//! The session id is the key, not part of the record.

use alloy::primitives::{Address, B256};
use serde::{Deserialize, Serialize};

use super::grant::{Permissions, SessionBudget};
use super::{SessionGrant, SessionStatus, StoreError};

/// The status byte of an active grant; revocation writes [`REVOKED`] over it.
pub(super) const ACTIVE: u8 = b'a';
/// The status byte of a revoked grant.
pub(super) const REVOKED: u8 = b'r';
/// The version of a grant whose budget's counter is a key of its own.
const VERSION: u8 = 1;
/// The version of a grant whose budget's counter is a field of its end day's hash (since
/// 0.3.11). Every earlier version refuses it as corrupt, so none counts such a session in a key
/// of its own beside the replicas that count it in the shared hash.
const VERSION_SHARED_BUDGET: u8 = 2;
/// Bytes before the policy id.
const FIXED: usize = 2 + 20 + 20 + 4 * 8;

/// What a grant narrows, kept as JSON (rare, and shaped like the admin API's).
#[derive(Serialize, Deserialize)]
struct Narrowing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    permissions: Option<Permissions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget: Option<SessionBudget>,
}

/// The record of `grant`.
pub(super) fn encode(grant: &SessionGrant) -> Result<Vec<u8>, StoreError> {
    let corrupt = || StoreError::Corrupt(grant.session_id);
    let policy = grant.policy.as_bytes();
    let mut out = Vec::with_capacity(FIXED + 1 + policy.len());
    out.push(match grant.status {
        SessionStatus::Active => ACTIVE,
        SessionStatus::Revoked => REVOKED,
    });
    out.push(if grant.shared_budget {
        VERSION_SHARED_BUDGET
    } else {
        VERSION
    });
    out.extend_from_slice(grant.account.as_slice());
    out.extend_from_slice(grant.session_key.as_slice());
    for n in [
        grant.chain_id,
        grant.valid_after,
        grant.valid_until,
        grant.created_at,
    ] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.push(u8::try_from(policy.len()).map_err(|_| corrupt())?);
    out.extend_from_slice(policy);
    if grant.permissions.is_some() || grant.budget.is_some() {
        let narrowing = Narrowing {
            permissions: grant.permissions.clone(),
            budget: grant.budget.clone(),
        };
        serde_json::to_writer(&mut out, &narrowing).map_err(|_| corrupt())?;
    }
    Ok(out)
}

/// The grant `id` stored as `data`; anything that does not parse is [`StoreError::Corrupt`].
pub(super) fn decode(id: B256, data: &[u8]) -> Result<SessionGrant, StoreError> {
    let corrupt = || StoreError::Corrupt(id);
    if data.len() < FIXED + 1 || ![VERSION, VERSION_SHARED_BUDGET].contains(&data[1]) {
        return Err(corrupt());
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let policy_len = usize::from(data[FIXED]);
    let rest_at = FIXED + 1 + policy_len;
    let policy = data.get(FIXED + 1..rest_at).ok_or_else(corrupt)?;
    let narrowing: Narrowing = match &data[rest_at..] {
        [] => Narrowing {
            permissions: None,
            budget: None,
        },
        json => serde_json::from_slice(json).map_err(|_| corrupt())?,
    };
    Ok(SessionGrant {
        session_id: id,
        account: Address::from_slice(&data[2..22]),
        session_key: Address::from_slice(&data[22..42]),
        chain_id: u64_at(42),
        valid_after: u64_at(50),
        valid_until: u64_at(58),
        created_at: u64_at(66),
        policy: String::from_utf8(policy.to_vec()).map_err(|_| corrupt())?,
        // Fail closed: anything but the active byte is revoked.
        status: if data[0] == ACTIVE {
            SessionStatus::Active
        } else {
            SessionStatus::Revoked
        },
        permissions: narrowing.permissions,
        budget: narrowing.budget,
        shared_budget: data[1] == VERSION_SHARED_BUDGET,
    })
}

#[cfg(test)]
mod tests {
    use alloy::primitives::U256;

    use super::*;
    use crate::session::grant::{SessionAllow, SpendLimit};

    fn grant() -> SessionGrant {
        SessionGrant {
            session_id: B256::repeat_byte(7),
            account: Address::repeat_byte(1),
            session_key: Address::repeat_byte(2),
            chain_id: 8453,
            policy: "game-moves".into(),
            valid_after: 1_790_000_000,
            valid_until: 1_790_086_400,
            status: SessionStatus::Active,
            permissions: None,
            budget: None,
            created_at: 1_789_999_999,
            shared_budget: false,
        }
    }

    #[test]
    fn a_plain_grant_round_trips_in_under_100_bytes() -> Result<(), StoreError> {
        let g = grant();
        let data = encode(&g)?;
        assert!(data.len() < 100, "{} bytes", data.len());
        assert_eq!(decode(g.session_id, &data)?, g);
        Ok(())
    }

    #[test]
    fn a_grant_with_a_shared_budget_is_version_2_and_round_trips() -> Result<(), StoreError> {
        let own = grant();
        assert_eq!(encode(&own)?[1], 1);
        let shared = SessionGrant {
            shared_budget: true,
            ..grant()
        };
        let data = encode(&shared)?;
        assert_eq!(data[1], 2);
        assert_eq!(decode(shared.session_id, &data)?, shared);
        assert_eq!(decode(own.session_id, &encode(&own)?)?, own);
        Ok(())
    }

    #[test]
    fn a_narrowed_revoked_grant_round_trips() -> Result<(), StoreError> {
        let g = SessionGrant {
            status: SessionStatus::Revoked,
            permissions: Some(Permissions {
                allow: Some(vec![SessionAllow {
                    target: Address::repeat_byte(3),
                    functions: vec!["increment()".into()],
                    max_value: U256::from(5),
                }]),
                spend: vec![SpendLimit {
                    token: Address::repeat_byte(4),
                    limit: U256::MAX,
                }],
            }),
            budget: Some(SessionBudget {
                cost: Some(U256::from(10u64).pow(U256::from(16u64))),
                ops: Some(9),
            }),
            ..grant()
        };
        assert_eq!(decode(g.session_id, &encode(&g)?)?, g);
        Ok(())
    }

    #[test]
    fn only_the_active_byte_is_active_and_bad_records_are_corrupt() -> Result<(), StoreError> {
        let g = grant();
        let mut data = encode(&g)?;
        data[0] = b'x';
        assert_eq!(decode(g.session_id, &data)?.status, SessionStatus::Revoked);
        for bad in [&data[..10], &data[..data.len() - 1], b"".as_slice()] {
            assert!(matches!(
                decode(g.session_id, bad),
                Err(StoreError::Corrupt(_))
            ));
        }
        for version in [0, 3, 255] {
            let mut later = data.clone();
            later[1] = version;
            assert!(matches!(
                decode(g.session_id, &later),
                Err(StoreError::Corrupt(_))
            ));
        }
        let mut tail = encode(&g)?;
        tail.extend_from_slice(b"{not json");
        assert!(matches!(
            decode(g.session_id, &tail),
            Err(StoreError::Corrupt(_))
        ));
        Ok(())
    }
}
