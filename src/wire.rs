//! Ethereum JSON-RPC wire encodings, parsed strictly at the boundary.
//!
//! `QUANTITY` is a `0x`-prefixed hex number (leading zeros tolerated, since some SDKs pad), and
//! `DATA` is `0x`-prefixed hex of whole bytes. Every error names the field it came from, so a
//! client can fix its request without reading our source.

use alloy::primitives::{Address, B256, Bytes, U256};
use serde_json::{Map, Value};

/// A field of a request that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A required field is absent (or `null`).
    #[error("missing field `{0}`")]
    Missing(String),
    /// A field is present but malformed.
    #[error("invalid field `{field}`: {reason}")]
    Invalid {
        /// The field's name, as the client spelled it (e.g. `callGasLimit`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl FieldError {
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// The name of the offending field.
    pub fn field(&self) -> &str {
        match self {
            Self::Missing(f) | Self::Invalid { field: f, .. } => f,
        }
    }
}

fn as_hex_str<'a>(field: &str, value: &'a Value) -> Result<&'a str, FieldError> {
    let s = value
        .as_str()
        .ok_or_else(|| FieldError::invalid(field, "expected a 0x-prefixed hex string"))?;
    s.strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| FieldError::invalid(field, "expected a 0x-prefixed hex string"))
}

/// Parse a QUANTITY that must fit in `bits` bits (at most 256).
pub fn quantity(field: &str, value: &Value, bits: usize) -> Result<U256, FieldError> {
    let digits = as_hex_str(field, value)?;
    if digits.is_empty() {
        return Err(FieldError::invalid(field, "empty quantity: use 0x0"));
    }
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FieldError::invalid(field, "not a hex number"));
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 64 {
        return Err(FieldError::invalid(
            field,
            format!("does not fit in {bits} bits"),
        ));
    }
    let n = U256::from_str_radix(
        if significant.is_empty() {
            "0"
        } else {
            significant
        },
        16,
    )
    .map_err(|e| FieldError::invalid(field, e.to_string()))?;
    if n.bit_len() > bits {
        return Err(FieldError::invalid(
            field,
            format!("does not fit in {bits} bits"),
        ));
    }
    Ok(n)
}

/// Parse a QUANTITY that fits in a `u128` (gas limits and fees are `uint128` when packed).
pub fn quantity_u128(field: &str, value: &Value) -> Result<u128, FieldError> {
    Ok(quantity(field, value, 128)?.to::<u128>())
}

/// Parse a QUANTITY that fits in a `u64` (chain ids, timestamps).
pub fn quantity_u64(field: &str, value: &Value) -> Result<u64, FieldError> {
    Ok(quantity(field, value, 64)?.to::<u64>())
}

/// Parse DATA: hex of whole bytes, `0x` for empty.
pub fn data(field: &str, value: &Value) -> Result<Bytes, FieldError> {
    let digits = as_hex_str(field, value)?;
    if digits.len() % 2 != 0 {
        return Err(FieldError::invalid(field, "odd number of hex digits"));
    }
    // const-hex's vectorised decoder: callData is the longest field of every request (the `hex`
    // crate's byte-at-a-time decoder was 2 % of the service's CPU per sponsorship). It would
    // also strip a second `0x`: the output sized from all the digits refuses that (its length
    // no longer matches).
    let mut out = vec![0u8; digits.len() / 2];
    alloy::hex::decode_to_slice(digits, &mut out)
        .map_err(|_| FieldError::invalid(field, "not hex"))?;
    Ok(Bytes::from(out))
}

/// Parse a 20-byte address (checksum not enforced: clients send lowercase too).
pub fn address(field: &str, value: &Value) -> Result<Address, FieldError> {
    let bytes = data(field, value)?;
    if bytes.len() != 20 {
        return Err(FieldError::invalid(
            field,
            format!("expected 20 bytes, got {}", bytes.len()),
        ));
    }
    Ok(Address::from_slice(&bytes))
}

/// Parse a 32-byte value.
pub fn bytes32(field: &str, value: &Value) -> Result<B256, FieldError> {
    let bytes = data(field, value)?;
    if bytes.len() != 32 {
        return Err(FieldError::invalid(
            field,
            format!("expected 32 bytes, got {}", bytes.len()),
        ));
    }
    Ok(B256::from_slice(&bytes))
}

/// A JSON object's field, `None` when absent or `null` (clients serialise `undefined` as either).
pub fn optional<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

/// A JSON object's required field.
pub fn required<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a Value, FieldError> {
    optional(obj, field).ok_or_else(|| FieldError::Missing(field.to_owned()))
}

/// Most characters of a client's own text echoed back in an error.
pub const ECHO_MAX_CHARS: usize = 64;

/// A client's text as errors echo it: at most [`ECHO_MAX_CHARS`] characters, so an answer never
/// grows with what was sent (a 100 KiB policy id or method name).
pub fn echo(text: &str) -> String {
    cut(text, ECHO_MAX_CHARS)
}

/// `text`'s first `max_chars` characters, and `…` if there were more.
pub fn cut(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Format a number as a QUANTITY (`0x0`, `0x1a`), as JSON-RPC results carry them.
pub fn to_quantity(n: impl std::fmt::LowerHex) -> String {
    format!("{n:#x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantities_are_strict_and_name_the_field() {
        assert_eq!(quantity_u128("x", &json!("0x0")).ok(), Some(0));
        assert_eq!(quantity_u128("x", &json!("0x00ff")).ok(), Some(255));
        for bad in [
            json!("ff"),
            json!("0x"),
            json!("0xg1"),
            json!(12),
            json!("0x-1"),
        ] {
            let err = quantity_u128("callGasLimit", &bad).unwrap_err();
            assert_eq!(err.field(), "callGasLimit", "{bad}");
        }
        let too_big = json!(format!("0x1{}", "0".repeat(32)));
        assert!(
            quantity_u128("g", &too_big)
                .unwrap_err()
                .to_string()
                .contains("128 bits")
        );
        assert!(quantity("n", &json!(format!("0x1{}", "0".repeat(64))), 256).is_err());
        assert_eq!(to_quantity(U256::from(26)), "0x1a");
        assert_eq!(to_quantity(U256::ZERO), "0x0");
    }

    #[test]
    fn data_and_addresses() {
        assert_eq!(data("d", &json!("0x")).ok(), Some(Bytes::new()));
        assert_eq!(
            data("d", &json!("0X00aBff")).ok(),
            Some(Bytes::from(vec![0x00, 0xab, 0xff]))
        );
        assert!(data("d", &json!("0xabc")).is_err());
        // Whatever the decoder forgives: a second prefix, a sign, spaces, non-ASCII digits.
        for bad in ["0x0x12", "0x0X1234", "0x+1", "0x 1", "0xgg", "0x１２"] {
            assert_eq!(
                data("d", &json!(bad)).map_err(|e| e.to_string()),
                Err("invalid field `d`: not hex".to_owned()),
                "{bad}"
            );
        }
        assert!(
            address("a", &json!("0x1234"))
                .unwrap_err()
                .to_string()
                .contains("20 bytes")
        );
        let a = address("a", &json!("0x0000000071727De22E5E9d8BAf0edAc6f37da032"));
        assert_eq!(
            a.ok().map(|a| a.to_string()),
            Some("0x0000000071727De22E5E9d8BAf0edAc6f37da032".into())
        );
    }
}
