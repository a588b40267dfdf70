//! JSON-RPC 2.0 over HTTP POST: envelope, batches, dispatch. Methods live in `methods`,
//! the error table in [`error`].

pub mod error;
mod methods;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::Instrument;

use self::error::{
    INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, RATE_LIMITED, RpcError, UNAUTHORIZED,
};
use crate::apikey::ApiKey;
use crate::app::AppState;

/// The methods served (what `methods::call` dispatches; anything else is -32601). Metrics label
/// calls by these names, and `other` for the rest.
pub const METHODS: [&str; 8] = [
    "eth_chainId",
    "pm_supportedEntryPoints",
    "pm_sponsorUserOperation",
    "pm_getPaymasterStubData",
    "pm_getPaymasterData",
    "pm_getSessionStatus",
    "pm_validateSponsorshipPolicies",
    "pm_explainSponsorship",
];

/// Most calls one batch may carry.
pub const MAX_BATCH: usize = 100;

/// Most `pm_explainSponsorship` calls one batch may carry (each answer is up to tens of
/// kilobytes: `sponsor::explain`); the others of the batch get `-32600`.
pub const MAX_EXPLAINS_PER_BATCH: usize = 10;

/// `POST /`: one call or a batch. Each call of a batch gets its own result or error, in order;
/// notifications (no `id`) get none. Every log line of the request carries its id. Methods
/// without a chain parameter serve the one chain configured (with several, a path must name it).
pub(crate) async fn handle(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    serve(state, None, headers, query, body).await
}

/// `POST /{chainId}` and `POST /rpc/{chainId}` (decimal, or `0x` hex): as `POST /`, for that
/// chain (clients that take one URL per chain).
pub(crate) async fn handle_chain(
    State(state): State<Arc<AppState>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Response {
    let chain = match segment.strip_prefix("0x") {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        None if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) => {
            segment.parse::<u64>().ok()
        }
        _ => None,
    };
    match chain {
        Some(chain) => serve(state, Some(chain), headers, query, body).await,
        None => {
            let err = RpcError::new(
                INVALID_REQUEST,
                "invalid request: the path names a chain id (decimal or 0x hex)",
            );
            let mut resp = reply(Some(error_response(Value::Null, err)));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

async fn serve(
    state: Arc<AppState>,
    chain: Option<u64>,
    headers: HeaderMap,
    query: Option<String>,
    body: Body,
) -> Response {
    let request_id = state.next_request_id();
    let span = tracing::info_span!("request", id = %request_id);
    async {
        let key = if state.api_keys.is_empty() {
            None // keyless: only ever served on loopback (checked at start)
        } else {
            match api_key(&headers, query.as_deref()).and_then(|t| state.api_keys.authenticate(t)) {
                Some(key) => Some(key),
                None => {
                    let err = RpcError {
                        data: Some(json!({ "reason": "unauthorized" })),
                        ..RpcError::new(UNAUTHORIZED, "unauthorized: missing or unknown API key")
                    };
                    let mut resp = reply(Some(error_response(Value::Null, err)));
                    *resp.status_mut() = StatusCode::UNAUTHORIZED;
                    return resp;
                }
            }
        };
        if let Some(key) = key {
            tracing::debug!(api_key = %key.name, "authenticated");
        }
        handle_body(&state, key, chain, body, &request_id).await
    }
    .instrument(span)
    .await
}

/// `Authorization: Bearer <key>`, else `?apikey=<key>`.
fn api_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| query?.split('&').find_map(|kv| kv.strip_prefix("apikey=")))
}

async fn handle_body(
    state: &AppState,
    key: Option<&ApiKey>,
    chain: Option<u64>,
    body: Body,
    request_id: &str,
) -> Response {
    // A body over the limit gets a JSON-RPC error (HTTP 413), not a dropped connection.
    let body = match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            let msg = format!("invalid request: body over {} bytes", state.max_body_bytes);
            let mut resp = reply(Some(error_response(
                Value::Null,
                RpcError::new(INVALID_REQUEST, msg),
            )));
            *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return resp;
        }
    };
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return reply(Some(error_response(
            Value::Null,
            RpcError::new(PARSE_ERROR, "parse error: body is not JSON"),
        )));
    };
    match value {
        Value::Array(calls) if calls.is_empty() || calls.len() > MAX_BATCH => {
            let msg = format!("invalid request: a batch holds 1 to {MAX_BATCH} calls");
            reply(Some(error_response(
                Value::Null,
                RpcError::new(INVALID_REQUEST, msg),
            )))
        }
        Value::Array(calls) => {
            let mut out = b"[".to_vec();
            let mut answered = 0;
            let mut explains_left = MAX_EXPLAINS_PER_BATCH;
            for call in &calls {
                let answer = handle_call(state, key, chain, call, request_id, &mut explains_left);
                if let Some(answer) = answer.await {
                    if answered > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&answer.json);
                    answered += 1;
                }
            }
            out.push(b']');
            // Notifications only: no body (JSON-RPC 2.0 §6).
            reply((answered > 0).then_some(out))
        }
        call => {
            let mut explains_left = MAX_EXPLAINS_PER_BATCH;
            let answer =
                handle_call(state, key, chain, &call, request_id, &mut explains_left).await;
            let limited = answer.as_ref().is_some_and(|a| a.rate_limited);
            let mut resp = reply(answer.map(|a| a.json));
            if limited {
                *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            }
            resp
        }
    }
}

/// One call's answer, written out.
struct Answer {
    /// The response object's JSON text.
    json: Vec<u8>,
    /// Whether the call was refused for a rate limit (HTTP 429 when it came alone).
    rate_limited: bool,
}

impl Answer {
    /// The answer of a call that failed with `err`.
    fn error(id: Value, err: RpcError) -> Self {
        Self {
            rate_limited: err.code == RATE_LIMITED,
            json: error_response(id, err),
        }
    }
}

/// `body` (JSON text) as the HTTP answer, or 204 for a request of notifications only.
fn reply(body: Option<Vec<u8>>) -> Response {
    match body {
        Some(json) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// The answer of a call that failed with `err`.
fn error_response(id: Value, err: RpcError) -> Vec<u8> {
    // (An id and an error object are `Value`s, which always write: the fallback is never used.)
    envelope(&id, "error", &err.to_json()).unwrap_or_else(|_| UNWRITABLE.to_vec())
}

/// What [`error_response`] answers should an error object ever fail to write.
const UNWRITABLE: &[u8] =
    br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}"#;

/// The answer of a call that returned `result`. Should it fail to write (none can: every map
/// key is a string, and every value's text is infallible), the call is answered as any internal
/// error is, with the request id (`-32603`), the cause in the log.
fn result_response(id: Value, result: &impl Serialize, request_id: &str) -> Vec<u8> {
    envelope(&id, "result", result).unwrap_or_else(|e| {
        let cause = format!("a result could not be written: {e}");
        error_response(id, RpcError::internal(request_id, &cause))
    })
}

/// `{"jsonrpc":"2.0","id":id,<member>:body}`, written straight into one buffer (no tree of the
/// answer is built).
fn envelope(id: &Value, member: &str, body: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    serde_json::to_writer(&mut out, id)?;
    out.extend_from_slice(b",\"");
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(b"\":");
    serde_json::to_writer(&mut out, body)?;
    out.push(b'}');
    Ok(out)
}

/// One call of a request; `explains_left`: how many more `pm_explainSponsorship` calls the
/// request may make (one more is refused with `-32600`, as any invalid call is answered,
/// counted and logged).
async fn handle_call(
    state: &AppState,
    key: Option<&ApiKey>,
    chain: Option<u64>,
    call: &Value,
    request_id: &str,
    explains_left: &mut usize,
) -> Option<Answer> {
    let invalid = |id: Value, why: &str| {
        Some(Answer::error(
            id,
            RpcError::new(INVALID_REQUEST, format!("invalid request: {why}")),
        ))
    };
    let Some(obj) = call.as_object() else {
        return invalid(Value::Null, "expected a JSON-RPC 2.0 call object");
    };
    let id = obj.get("id").cloned();
    if let Some(id) = &id
        && !(id.is_string() || id.is_number() || id.is_null())
    {
        return invalid(Value::Null, "`id` must be a string, a number or null");
    }
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid(reply_id, "`jsonrpc` must be \"2.0\"");
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return invalid(reply_id, "`method` must be a string");
    };
    let params: &[Value] = match obj.get("params") {
        None | Some(Value::Null) => &[],
        Some(Value::Array(p)) => p,
        // Named params are a valid JSON-RPC shape that these methods do not take.
        Some(Value::Object(_)) => {
            return id.map(|id| {
                Answer::error(
                    id,
                    RpcError::new(
                        INVALID_PARAMS,
                        "invalid params: these methods take positional params (an array)",
                    ),
                )
            });
        }
        Some(_) => return invalid(reply_id, "`params` must be an array or an object"),
    };
    let started = std::time::Instant::now();
    let explain = method == "pm_explainSponsorship";
    let outcome = if explain && *explains_left == 0 {
        Err(RpcError::new(
            INVALID_REQUEST,
            format!(
                "invalid request: a batch holds at most {MAX_EXPLAINS_PER_BATCH} pm_explainSponsorship calls"
            ),
        ))
    } else {
        if explain {
            *explains_left -= 1;
        }
        match key.map(|k| state.sponsor.limits().check_api_key(&k.name)) {
            Some(Err(limited)) => Err(RpcError::rate_limited(&limited)),
            _ => methods::call(state, key, chain, method, params, request_id).await,
        }
    };
    let metrics = state.sponsor.metrics();
    match &outcome {
        Ok(_) => metrics.request(method, None, started.elapsed()),
        Err(e) => {
            metrics.request(method, Some(e.code), started.elapsed());
            // An invalid-params `reason` is prose about the client's value, not a code.
            let reason = if e.code == INVALID_PARAMS {
                Some("invalid_params")
            } else {
                e.data.as_ref().and_then(|d| d["reason"].as_str())
            };
            if let Some(reason) = reason {
                metrics.rejection(reason);
            }
        }
    }
    if let Err(e) = &outcome {
        tracing::debug!(request_id, method, code = e.code, message = %e.message, "call failed");
    }
    // A notification (no `id`) gets no response (JSON-RPC 2.0 §4.1).
    let id = id?;
    Some(match outcome {
        Ok(result) => Answer {
            json: result_response(id, &result, request_id),
            rate_limited: false,
        },
        Err(e) => Answer::error(id, e),
    })
}

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use serde::ser::{Error, SerializeMap, Serializer};
    use serde_json::{Value, json};

    use super::{UNWRITABLE, result_response};

    /// A result that fails after writing part of itself.
    struct HalfWritten;

    impl Serialize for HalfWritten {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(None)?;
            map.serialize_entry("paymaster", "0x")?;
            Err(S::Error::custom("cannot"))
        }
    }

    #[test]
    fn a_result_that_fails_to_write_is_answered_as_an_internal_error() {
        let answer: Value =
            serde_json::from_slice(&result_response(json!("x\"y"), &HalfWritten, "req-7"))
                .expect("an answer is JSON");
        assert_eq!(
            answer,
            json!({
                "jsonrpc": "2.0",
                "id": "x\"y",
                "error": {"code": -32603, "message": "internal error", "data": {"requestId": "req-7"}}
            })
        );
        let fallback: Value = serde_json::from_slice(UNWRITABLE).expect("the fallback is JSON");
        assert_eq!(fallback["error"]["code"], json!(-32603));
    }
}
