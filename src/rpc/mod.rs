//! JSON-RPC 2.0 over HTTP POST: envelope, batches, dispatch. Methods live in [`methods`],
//! the error table in [`error`].

pub mod error;
mod methods;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use self::error::{INVALID_REQUEST, PARSE_ERROR, RpcError};
use crate::app::AppState;

/// Most calls one batch may carry.
pub const MAX_BATCH: usize = 100;

/// `POST /`: one call or a batch. Each call of a batch gets its own result or error, in order;
/// notifications (no `id`) get none.
pub(crate) async fn handle(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let request_id = state.next_request_id();
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
            let mut out = Vec::with_capacity(calls.len());
            for call in &calls {
                out.extend(handle_call(&state, call, &request_id).await);
            }
            reply((!out.is_empty()).then_some(Value::Array(out)))
        }
        call => reply(handle_call(&state, &call, &request_id).await),
    }
}

fn reply(body: Option<Value>) -> Response {
    match body {
        Some(v) => axum::Json(v).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

fn error_response(id: Value, err: RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": err.to_json() })
}

async fn handle_call(state: &AppState, call: &Value, request_id: &str) -> Option<Value> {
    let invalid = |id: Value, why: &str| {
        Some(error_response(
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
        Some(_) => return invalid(reply_id, "`params` must be an array (positional)"),
    };
    let outcome = methods::call(state, method, params, request_id).await;
    if let Err(e) = &outcome {
        tracing::debug!(request_id, method, code = e.code, message = %e.message, "call failed");
    }
    // A notification (no `id`) gets no response (JSON-RPC 2.0 §4.1).
    let id = id?;
    Some(match outcome {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => error_response(id, e),
    })
}
