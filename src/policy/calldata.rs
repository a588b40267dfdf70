//! What an operation really calls: the account's `callData` decoded into calls (DESIGN §6).
//!
//! This slice knows the SimpleAccount shapes of every EntryPoint version. An outer selector it
//! does not know is rejected, never guessed (ERC-7579 and Safe arrive with the policy issue).

use alloy::primitives::{Address, Bytes, FixedBytes, U256};
use alloy::sol;
use alloy::sol_types::SolCall;

sol! {
    /// SimpleAccount (all versions): `execute(address,uint256,bytes)`.
    interface SimpleAccount {
        function execute(address dest, uint256 value, bytes func);
    }
    /// SimpleAccount v0.6: `executeBatch(address[],bytes[])`.
    interface SimpleAccountV06 {
        function executeBatch(address[] dest, bytes[] func);
    }
    /// SimpleAccount v0.7: `executeBatch(address[],uint256[],bytes[])`; an empty value array means zero values.
    interface SimpleAccountV07 {
        function executeBatch(address[] dest, uint256[] value, bytes[] func);
    }
    /// `BaseAccount.Call`, as SimpleAccount v0.8 and Coinbase Smart Wallet batch it.
    struct BatchCall {
        address target;
        uint256 value;
        bytes data;
    }
    /// SimpleAccount v0.8: `executeBatch((address,uint256,bytes)[])`.
    interface SimpleAccountV08 {
        function executeBatch(BatchCall[] calls);
    }
}

/// One call the account makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// Called contract (or value recipient).
    pub target: Address,
    /// Native value sent.
    pub value: U256,
    /// Calldata (empty for a plain transfer).
    pub data: Bytes,
}

impl Call {
    /// The 4-byte function selector, if the calldata has one.
    pub fn selector(&self) -> Option<FixedBytes<4>> {
        self.data.get(..4).map(FixedBytes::<4>::from_slice)
    }
}

/// Why callData could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalldataError {
    /// The outer selector is no account shape we decode.
    #[error("unknown account call {0}: not an account shape this paymaster decodes")]
    UnknownAccountCall(String),
    /// A known selector with arguments that do not decode, or arrays of different lengths.
    #[error("malformed {shape} calldata: {reason}")]
    Malformed {
        /// The account function.
        shape: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn malformed(shape: &'static str) -> impl Fn(alloy::sol_types::Error) -> CalldataError {
    move |e| CalldataError::Malformed {
        shape,
        reason: e.to_string(),
    }
}

/// Decode an account's `callData` into the calls it makes.
pub fn decode(call_data: &[u8]) -> Result<Vec<Call>, CalldataError> {
    let selector: [u8; 4] = match call_data.get(..4) {
        Some(s) => [s[0], s[1], s[2], s[3]],
        None => {
            return Err(CalldataError::UnknownAccountCall(format!(
                "0x{}",
                hex::encode(call_data)
            )));
        }
    };
    // Strict (validating) decoding: an encoding the account might read differently is refused.
    match selector {
        SimpleAccount::executeCall::SELECTOR => {
            let c = SimpleAccount::executeCall::abi_decode_validate(call_data)
                .map_err(malformed("execute"))?;
            Ok(vec![Call {
                target: c.dest,
                value: c.value,
                data: c.func,
            }])
        }
        SimpleAccountV06::executeBatchCall::SELECTOR => {
            let c = SimpleAccountV06::executeBatchCall::abi_decode_validate(call_data)
                .map_err(malformed("executeBatch(address[],bytes[])"))?;
            if c.dest.len() != c.func.len() {
                return Err(lengths("executeBatch(address[],bytes[])"));
            }
            Ok(c.dest
                .into_iter()
                .zip(c.func)
                .map(|(target, data)| Call {
                    target,
                    value: U256::ZERO,
                    data,
                })
                .collect())
        }
        SimpleAccountV07::executeBatchCall::SELECTOR => {
            let shape = "executeBatch(address[],uint256[],bytes[])";
            let c = SimpleAccountV07::executeBatchCall::abi_decode_validate(call_data)
                .map_err(malformed(shape))?;
            // SimpleAccount v0.7: `value.length == 0 || value.length == func.length`.
            if c.dest.len() != c.func.len()
                || !(c.value.is_empty() || c.value.len() == c.func.len())
            {
                return Err(lengths(shape));
            }
            Ok(c.dest
                .into_iter()
                .zip(c.func)
                .enumerate()
                .map(|(i, (target, data))| Call {
                    target,
                    value: c.value.get(i).copied().unwrap_or_default(),
                    data,
                })
                .collect())
        }
        SimpleAccountV08::executeBatchCall::SELECTOR => {
            let c = SimpleAccountV08::executeBatchCall::abi_decode_validate(call_data)
                .map_err(malformed("executeBatch((address,uint256,bytes)[])"))?;
            Ok(c.calls
                .into_iter()
                .map(|c| Call {
                    target: c.target,
                    value: c.value,
                    data: c.data,
                })
                .collect())
        }
        other => Err(CalldataError::UnknownAccountCall(format!(
            "0x{}",
            hex::encode(other)
        ))),
    }
}

fn lengths(shape: &'static str) -> CalldataError {
    CalldataError::Malformed {
        shape,
        reason: "array lengths differ".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn selectors_match_design() {
        assert_eq!(
            hex::encode(SimpleAccount::executeCall::SELECTOR),
            "b61d27f6"
        );
        assert_eq!(
            hex::encode(SimpleAccountV06::executeBatchCall::SELECTOR),
            "18dfb3c7"
        );
        assert_eq!(
            hex::encode(SimpleAccountV07::executeBatchCall::SELECTOR),
            "47e1da2a"
        );
        assert_eq!(
            hex::encode(SimpleAccountV08::executeBatchCall::SELECTOR),
            "34fcd5be"
        );
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        assert!(matches!(
            decode(&[]),
            Err(CalldataError::UnknownAccountCall(_))
        ));
        assert!(matches!(
            decode(&[1, 2, 3, 4, 5]),
            Err(CalldataError::UnknownAccountCall(_))
        ));
        let mut truncated = SimpleAccount::executeCall {
            dest: Address::ZERO,
            value: U256::ZERO,
            func: Bytes::new(),
        }
        .abi_encode();
        truncated.truncate(40);
        assert!(matches!(
            decode(&truncated),
            Err(CalldataError::Malformed { .. })
        ));
        let mismatched = SimpleAccountV07::executeBatchCall {
            dest: vec![Address::ZERO; 2],
            value: vec![U256::ZERO],
            func: vec![Bytes::new(), Bytes::new()],
        }
        .abi_encode();
        assert!(matches!(
            decode(&mismatched),
            Err(CalldataError::Malformed { .. })
        ));
    }

    fn arb_call() -> impl Strategy<Value = Call> {
        (
            any::<[u8; 20]>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(|(a, v, d)| Call {
                target: Address::from(a),
                value: U256::from(v),
                data: d.into(),
            })
    }

    proptest! {
        /// Random batches, encoded by the ABI encoder in every shape, decode to the calls that built them.
        #[test]
        fn batches_round_trip(calls in prop::collection::vec(arb_call(), 0..6)) {
            let v08 = SimpleAccountV08::executeBatchCall {
                calls: calls.iter().map(|c| BatchCall { target: c.target, value: c.value, data: c.data.clone() }).collect(),
            }.abi_encode();
            prop_assert_eq!(decode(&v08)?, calls.clone());

            let v07 = SimpleAccountV07::executeBatchCall {
                dest: calls.iter().map(|c| c.target).collect(),
                value: calls.iter().map(|c| c.value).collect(),
                func: calls.iter().map(|c| c.data.clone()).collect(),
            }.abi_encode();
            prop_assert_eq!(decode(&v07)?, calls.clone());

            let zero_values: Vec<Call> = calls.iter().map(|c| Call { value: U256::ZERO, ..c.clone() }).collect();
            let v06 = SimpleAccountV06::executeBatchCall {
                dest: calls.iter().map(|c| c.target).collect(),
                func: calls.iter().map(|c| c.data.clone()).collect(),
            }.abi_encode();
            prop_assert_eq!(decode(&v06)?, zero_values);

            if let Some(c) = calls.first() {
                let single = SimpleAccount::executeCall { dest: c.target, value: c.value, func: c.data.clone() }.abi_encode();
                prop_assert_eq!(decode(&single)?, vec![c.clone()]);
            }
        }
    }
}
