//! The one table from internal errors to JSON-RPC errors. Nowhere else invents a code.
//!
//! | code   | meaning                                   | `data`                                  |
//! |--------|-------------------------------------------|-----------------------------------------|
//! | -32700 | parse error (body is not JSON)            |                                         |
//! | -32600 | invalid request (not a JSON-RPC 2.0 call) |                                         |
//! | -32601 | method not found                          | `{method}`                              |
//! | -32602 | invalid params                            | `{field, reason}`                       |
//! | -32603 | internal error                            | `{requestId}` only, details in the log  |
//! | -32001 | unsupported chain or EntryPoint           | `{reason, supported}`                   |
//! | -32002 | no paymaster configured for the EntryPoint| `{reason, entryPointVersion}`           |
//! | -32003 | sponsorship rejected                      | `{reason, rule, detail, callIndex?}`    |
//! | -32004 | a dependency failed, nothing was signed   | `{reason, retryable: true, requestId or detail}` |
//! | -32005 | missing or unknown API key (HTTP 401)     | `{reason: \"unauthorized\"}`              |
//! | -32006 | rate limited (HTTP 429 for a single call)  | `{reason, scope, retryAfterMs}`         |
//!
//! docs/rpc.md documents the same table for clients.

use serde_json::{Value, json};

use crate::sponsor::SponsorError;
use crate::wire::FieldError;

/// JSON-RPC 2.0 parse error.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC 2.0 invalid request.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC 2.0 method not found.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC 2.0 invalid params.
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC 2.0 internal error.
pub const INTERNAL_ERROR: i64 = -32603;
/// Chain or EntryPoint not served.
pub const UNSUPPORTED: i64 = -32001;
/// EntryPoint served but no paymaster deployed for it.
pub const NOT_CONFIGURED: i64 = -32002;
/// A policy (or the decoder) refused the operation.
pub const REJECTED: i64 = -32003;
/// A dependency (Redis) failed: nothing was signed; retry.
pub const UNAVAILABLE: i64 = -32004;
/// Missing or unknown API key (HTTP 401).
pub const UNAUTHORIZED: i64 = -32005;
/// A rate limit was hit (HTTP 429 for a single call).
pub const RATE_LIMITED: i64 = -32006;

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Error code.
    pub code: i64,
    /// Short message.
    pub message: String,
    /// Structured detail.
    pub data: Option<Value>,
}

impl RpcError {
    /// An error without data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// The error object as JSON.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "code": self.code, "message": self.message });
        if let Some(data) = &self.data {
            v["data"] = data.clone();
        }
        v
    }

    /// `-32006`.
    pub fn rate_limited(l: &crate::ratelimit::Limited) -> Self {
        Self {
            data: Some(json!({
                "reason": "rate_limited",
                "scope": l.scope,
                "retryAfterMs": u64::try_from(l.retry_after.as_millis()).unwrap_or(u64::MAX).max(1),
            })),
            ..Self::new(RATE_LIMITED, format!("rate limited by {}", l.scope))
        }
    }

    /// `-32601`.
    pub fn method_not_found(method: &str) -> Self {
        let method = crate::wire::echo(method);
        Self {
            data: Some(json!({ "method": method })),
            ..Self::new(METHOD_NOT_FOUND, format!("method `{method}` not found"))
        }
    }

    /// `-32603`: the client learns only the request id; the cause goes to the log.
    pub fn internal(request_id: &str, cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(request_id, error = %cause, "internal error");
        Self {
            data: Some(json!({ "requestId": request_id })),
            ..Self::new(INTERNAL_ERROR, "internal error")
        }
    }

    /// `-32003` `estimation_failed`: the bundler refused the operation, or did not answer
    /// (`detail` says which, never its URL).
    pub fn estimation_failed(detail: String) -> Self {
        Self {
            data: Some(json!({
                "reason": crate::rejection::Reason::EstimationFailed.as_str(),
                "detail": detail,
            })),
            ..Self::new(REJECTED, "gas estimation by the bundler failed")
        }
    }

    /// `-32004` `estimation_busy`: this replica already has as many estimations at the
    /// bundler as it allows (in all, or for this API key); nothing was asked of it.
    pub fn estimation_busy(detail: String) -> Self {
        Self {
            data: Some(json!({ "reason": "estimation_busy", "retryable": true, "detail": detail })),
            ..Self::new(
                UNAVAILABLE,
                "temporarily unavailable: gas estimation is busy, retry or send gas limits",
            )
        }
    }

    /// Map a sponsorship error.
    pub fn from_sponsor(
        err: SponsorError,
        request_id: &str,
        supported_entry_points: &[String],
    ) -> Self {
        match err {
            SponsorError::InvalidParams(e) => e.into(),
            SponsorError::UnsupportedChain { ref served, .. } => Self {
                data: Some(json!({
                    "reason": "unsupported_chain",
                    "supported": served.iter().map(|c| format!("{c:#x}")).collect::<Vec<_>>(),
                })),
                ..Self::new(UNSUPPORTED, err.to_string())
            },
            SponsorError::UnsupportedEntryPoint(_) => Self {
                data: Some(
                    json!({ "reason": "unsupported_entry_point", "supported": supported_entry_points }),
                ),
                ..Self::new(UNSUPPORTED, err.to_string())
            },
            SponsorError::PaymasterNotConfigured(version) => Self {
                data: Some(
                    json!({ "reason": "paymaster_not_configured", "entryPointVersion": version.to_string() }),
                ),
                ..Self::new(NOT_CONFIGURED, err.to_string())
            },
            SponsorError::Rejected(_) | SponsorError::BudgetExhausted(_) => {
                let data = err.rejection_fields();
                let reason = data
                    .as_ref()
                    .and_then(|d| d["reason"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                Self {
                    data,
                    ..Self::new(REJECTED, format!("sponsorship rejected: {reason}"))
                }
            }
            SponsorError::RateLimited(l) => Self::rate_limited(&l),
            SponsorError::Signer(e) => Self::internal(request_id, &e),
            SponsorError::Store(e) => {
                tracing::warn!(request_id, error = %e, "failing closed");
                Self {
                    data: Some(
                        json!({ "reason": "store_unavailable", "retryable": true, "requestId": request_id }),
                    ),
                    ..Self::new(
                        UNAVAILABLE,
                        "temporarily unavailable: nothing was signed, retry",
                    )
                }
            }
        }
    }
}

impl From<FieldError> for RpcError {
    fn from(e: FieldError) -> Self {
        let reason = match &e {
            FieldError::Missing(_) => "missing".to_owned(),
            FieldError::Invalid { reason, .. } => reason.clone(),
        };
        Self {
            data: Some(json!({ "field": e.field(), "reason": reason })),
            ..Self::new(INVALID_PARAMS, e.to_string())
        }
    }
}
