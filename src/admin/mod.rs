//! The admin REST API: session grants (`/admin/sessions`) and the policy set's state
//! (`/admin/policies`), behind a bearer token whose SHA-256 the config holds. A missing or
//! wrong token gets a bare 401, saying neither which.
//!
//! The operator's token (`--admin-token-sha256`) reaches every policy's sessions. A tenant's
//! admin key (`--admin-key name:sha256:policies`) reaches only the sessions of its policies:
//! to it another tenant's session is no session (404), another tenant's policy no policy
//! (400, as an unknown one), a listing shows only its own (read on past the others' to fill
//! its page, its cursor its own last grant's place), and `/admin/policies`, every tenant's,
//! answers 403.
//!
//! | method and path | answer |
//! |---|---|
//! | `POST /admin/sessions` | 201 + grant; 400 `{error, issues: [{path, message}]}`; 409 id taken; 429 its policy's `max_sessions` live (a tenant's key, where the policy sets none: `--tenant-default-max-sessions`) |
//! | `GET /admin/sessions/{id}` | 200 + grant; 404 |
//! | `GET /admin/sessions?account=0x…&cursor=C&limit=N` | 200 `{sessions, nextCursor}` (`C`: a `nextCursor` given, or an offset; `N` clamped to 1..100); 400 a parameter that does not parse; 503 to a tenant's key that finds none of its own in 1,000 grants, more following |
//! | `DELETE /admin/sessions/{id}` | 200 + revoked grant (idempotent); 404 |
//! | `GET /admin/policies` | 200 `{version, count, ids, refusedErrors, directoryVersion, directoryDiffers}` (`refusedErrors`: the last refused set's errors, or null); 403 to a tenant's key |
//!
//! A store failure answers 503: retry. A create answered 503 (or 408, its deadline past) may
//! still be stored, since its steps run to their end in a task of their own: one that names its
//! `sessionId` is retried safely (409 once stored). A revocation may stand in part, and is
//! repeated safely.

use std::sync::Arc;

use alloy::primitives::{Address, B256};
use axum::Router;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::apikey::sha256_matches;
use crate::app::AppState;
use crate::clock::unix_now;
use crate::session::grant::{FieldIssue, SessionGrant};
use crate::session::{Created, ListCursor, ListPlace, StoreError};

/// Most sessions per page.
pub const MAX_PAGE: usize = 100;

/// Routes under `/admin`, authenticated.
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/sessions", get(list).post(create))
        .route("/admin/sessions/{id}", get(fetch).delete(revoke))
        .route("/admin/policies", get(policies))
        .route_layer(middleware::from_fn_with_state(state, authenticate))
}

/// What the request's credential reaches: every policy (the operator's token), or a tenant's
/// admin key's policies.
#[derive(Debug, Clone)]
struct Scope {
    /// The admin key's name (for logs); `None`: the operator's token.
    key: Option<String>,
    /// Its policies; `None`: all.
    policies: Option<Vec<String>>,
}

impl Scope {
    fn reaches(&self, policy: &str) -> bool {
        crate::apikey::reaches(self.policies.as_deref(), policy)
    }

    fn who(&self) -> &str {
        self.key.as_deref().unwrap_or("operator")
    }

    /// Whether it is a tenant's admin key (limited to its policies), not the operator's token.
    fn is_tenant(&self) -> bool {
        self.policies.is_some()
    }
}

async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    // Both compared whatever the first finds (each in constant time).
    let operator = state
        .admin_token_sha256
        .as_ref()
        .is_some_and(|expected| sha256_matches(token, expected));
    let tenant = state.admin_keys.authenticate(token);
    let scope = match (operator, tenant) {
        (true, _) => Scope {
            key: None,
            policies: None,
        },
        (false, Some(k)) => Scope {
            key: Some(k.name.clone()),
            policies: k.policies.clone(),
        },
        (false, None) => return StatusCode::UNAUTHORIZED.into_response(),
    };
    req.extensions_mut().insert(scope);
    next.run(req).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn invalid(issues: Vec<FieldIssue>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "invalid request", "issues": issues })),
    )
        .into_response()
}

fn store_failed(e: StoreError) -> Response {
    tracing::warn!(error = %e, "admin request failed closed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "session store unavailable: retry",
    )
}

fn parse_id(id: &str) -> Option<B256> {
    id.parse::<B256>().ok().filter(|_| id.len() == 66)
}

fn bad_id() -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "session id must be 0x-prefixed 32-byte hex",
    )
}

async fn create(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return invalid(vec![FieldIssue {
            path: "$".into(),
            message: "body is not JSON".into(),
        }]);
    };
    // Drawn before parsing, used only where the request names no id: an id nobody can guess
    // or nothing (a clock's would be guessable, and session ids are credentials of a kind).
    let mut fresh = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut fresh) {
        tracing::error!(error = %e, "no randomness for a session id");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no randomness for a new session id; retry, or name one in sessionId",
        );
    }
    let mut grant = match SessionGrant::from_request(&body, unix_now(), || B256::from(fresh)) {
        Ok(g) => g,
        Err(issues) => return invalid(issues),
    };
    // Its budget counted in its end day's hash where every replica reads such a grant (fixed
    // for the grant from here on).
    grant.shared_budget = state.sponsor.ledger().sessions_share_budgets();
    let policies = state.sponsor.policies();
    // (Another tenant's policy is no policy to this key.)
    let Some(policy) = policies
        .get(&grant.policy)
        .filter(|_| scope.reaches(&grant.policy))
    else {
        return invalid(vec![FieldIssue {
            path: "$.policy".into(),
            message: format!("unknown policy `{}`", grant.policy),
        }]);
    };
    if let Err(issues) = grant.check_within(policy) {
        return invalid(issues);
    }
    // The most live grants the policy may have for this create: its own max_sessions, else for
    // a tenant's key --tenant-default-max-sessions (one tenant filling Redis would have every
    // tenant's reservations refused), else none.
    let bound = match (policy.max_sessions, scope.is_tenant()) {
        (Some(most), _) => Some(Bound::Policy(most)),
        (None, true) => state
            .tenant_default_max_sessions
            .map(|most| Bound::TenantDefault(most.get())),
        (None, false) => None,
    };
    let most = bound.map(Bound::most);
    match state.sponsor.sessions().create_within(&grant, most).await {
        Ok(Created::Created) => {
            tracing::info!(session = %grant.session_id, account = %grant.account, policy = %grant.policy, by = scope.who(), "session created");
            (StatusCode::CREATED, axum::Json(grant)).into_response()
        }
        Ok(Created::Exists) => error(
            StatusCode::CONFLICT,
            format!("session {} exists", grant.session_id),
        ),
        Ok(Created::Full { live }) => {
            let bound = match bound {
                Some(Bound::Policy(most)) => format!("its max_sessions is {most}"),
                Some(Bound::TenantDefault(most)) => format!(
                    "a tenant's key creates under it only below {most} (the operator's --tenant-default-max-sessions, for policies without max_sessions)"
                ),
                // (A store answers Full only to a create it was given a bound for.)
                None => "its bound".to_owned(),
            };
            error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "policy `{}` has {live} live sessions, and {bound}: one more can be created once one leaves the count (at the end of the UTC day it ends in; revoking one does not)",
                    grant.policy
                ),
            )
        }
        Err(e) => {
            tracing::warn!(session = %grant.session_id, error = %e, "session create failed closed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "session store unavailable: the session may or may not have been stored; retry with the same sessionId (409 once it is)",
            )
        }
    }
}

/// What holds a create's policy to a number of live grants (`POST /admin/sessions`).
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// The policy's own `max_sessions`.
    Policy(u64),
    /// A tenant's key under a policy without one: `--tenant-default-max-sessions`.
    TenantDefault(u64),
}

impl Bound {
    /// The most live grants it allows.
    fn most(self) -> u64 {
        match self {
            Self::Policy(most) | Self::TenantDefault(most) => most,
        }
    }
}

async fn policies(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
) -> Response {
    if scope.is_tenant() {
        // Every tenant's ids, and the errors of every tenant's files.
        return error(
            StatusCode::FORBIDDEN,
            "the policy set's status needs the operator's admin token",
        );
    }
    axum::Json(state.policy_status()).into_response()
}

async fn fetch(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return bad_id();
    };
    match state.sponsor.sessions().get(id).await {
        Ok(Some(grant)) if scope.reaches(&grant.policy) => axum::Json(grant).into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, format!("no session {id}")),
        Err(e) => store_failed(e),
    }
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Response {
    let Some(id) = parse_id(&id) else {
        return bad_id();
    };
    if scope.is_tenant() {
        // A tenant revokes only its own: the grant is read first (its policy never changes).
        match state.sponsor.sessions().get(id).await {
            Ok(Some(grant)) if scope.reaches(&grant.policy) => {}
            Ok(_) => return error(StatusCode::NOT_FOUND, format!("no session {id}")),
            Err(e) => return store_failed(e),
        }
    }
    match state.sponsor.revoke_session(id, unix_now()).await {
        Ok(Some(grant)) => {
            tracing::info!(session = %id, by = scope.who(), "session revoked");
            axum::Json(grant).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no session {id}")),
        // A revocation is written in steps (the ledger's session state, the grant, the feed
        // other replicas read): one that failed may stand in part, and a retry writes the rest.
        Err(e) => {
            tracing::warn!(session = %id, error = %e, "revocation failed closed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "session store unavailable: the revocation may be written in part (the session may already be refused); retry, revoking again changes nothing else",
            )
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    account: Option<String>,
    cursor: Option<String>,
    /// Read as text: a number that does not parse gets this API's 400, naming the parameter.
    limit: Option<String>,
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<ListQuery>,
) -> Response {
    let Some(account) = q
        .account
        .as_deref()
        .filter(|a| a.len() == 42)
        .and_then(|a| a.parse::<Address>().ok())
    else {
        return invalid(vec![FieldIssue {
            path: "account".into(),
            message: "query parameter `account` must be an address".into(),
        }]);
    };
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => 50,
        Some(Ok(n)) => n.clamp(1, MAX_PAGE),
        Some(Err(_)) => {
            return invalid(vec![FieldIssue {
                path: "limit".into(),
                message: format!(
                    "query parameter `limit` must be a number (taken as 1 to {MAX_PAGE})"
                ),
            }]);
        }
    };
    let cursor = match q.cursor.as_deref().map(str::parse::<ListCursor>) {
        None => ListCursor::Offset(0),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            return invalid(vec![FieldIssue {
                path: "cursor".into(),
                message: e.to_string(),
            }]);
        }
    };
    // An offset counts every tenant's grants of the account: a tenant's key takes places only
    // (the `nextCursor`s it is given), and an offset of 0, the start.
    if scope.is_tenant() && matches!(cursor, ListCursor::Offset(n) if n > 0) {
        return invalid(vec![FieldIssue {
            path: "cursor".into(),
            message:
                "an offset counts other tenants' sessions too: pass the nextCursor a page gave"
                    .into(),
        }]);
    }
    let sessions = state.sponsor.sessions();
    let page = match &scope.policies {
        None => sessions
            .list_by_account(account, cursor, limit)
            .await
            .map(Some),
        Some(_) => tenant_page(sessions, &scope, account, cursor, limit).await,
    };
    match page {
        Ok(Some(page)) => axum::Json(json!({
            "sessions": page.sessions,
            "nextCursor": page.next_cursor.map(|c| c.to_string()),
        }))
        .into_response(),
        Ok(None) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many sessions of other tenants on this account to find a page of yours in {} (their ids are not this key's to see): the operator's token lists them",
                TENANT_PAGES * MAX_PAGE
            ),
        ),
        Err(e) => store_failed(e),
    }
}

/// Most store pages (of [`MAX_PAGE`] grants) one tenant's listing request reads: each costs the
/// store a round trip per grant.
const TENANT_PAGES: usize = 10;

/// A page of `scope`'s own grants of `account`: the store's pages read from `cursor` until
/// `limit` of them, or the end. Its cursor is the place of its own last grant: the place of
/// another tenant's would name that grant (its id and times). After [`TENANT_PAGES`] without
/// reaching either, the grants of its own found so far; `None` if none. (A place skips the grants of 0.1's layout, which only an offset
/// reaches: a tenant's page that ends among them skips the rest of them.)
async fn tenant_page(
    sessions: &crate::session::SessionStore,
    scope: &Scope,
    account: Address,
    mut cursor: ListCursor,
    limit: usize,
) -> Result<Option<crate::session::Page>, StoreError> {
    let mut own = Vec::new();
    let mut pages = 0;
    loop {
        let page = sessions.list_by_account(account, cursor, MAX_PAGE).await?;
        pages += 1;
        for grant in page.sessions {
            if !scope.reaches(&grant.policy) {
                continue;
            }
            if own.len() == limit {
                // One more of its own follows: the next page starts after the last given.
                let next = own.last().map(|g| ListCursor::After(ListPlace::of(g)));
                return Ok(Some(crate::session::Page {
                    sessions: own,
                    next_cursor: next,
                }));
            }
            own.push(grant);
        }
        match page.next_cursor {
            None => {
                return Ok(Some(crate::session::Page {
                    sessions: own,
                    next_cursor: None,
                }));
            }
            // What it found so far, if anything (the next request reads on after it).
            Some(_) if pages >= TENANT_PAGES => {
                let next = own.last().map(|g| ListCursor::After(ListPlace::of(g)));
                return Ok(next.map(|next| crate::session::Page {
                    sessions: own,
                    next_cursor: Some(next),
                }));
            }
            Some(next) => cursor = next,
        }
    }
}
