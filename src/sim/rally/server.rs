//! The Rally simulator's HTTP side: routes under `/api/v1/companies`, API-key auth, the
//! per-second rate limit, fault injection and request statistics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::store::{ApiError, ListQuery, Patch, RESPONSE_FIELDS, Store};
use crate::sim::common::{Fault, Faults, RollingWindow, Stats};

/// Page size when `limit` is not given (Rally's documented example).
pub const DEFAULT_LIMIT: usize = 25;

/// Most records one `POST /bulk` accepts.
pub const BULK_MAX: usize = 100;

/// State shared by the handlers and the [`super::RallySim`] handle.
#[derive(Debug)]
pub struct Shared {
    /// The key `X-Api-Key` must carry.
    pub api_key: String,
    /// Largest page a list answers; larger `limit`s are cut down silently, as Rally does.
    pub max_page: usize,
    /// The company table. A std mutex: it is never held across an await.
    pub store: Mutex<Store>,
    /// Fault injection.
    pub faults: Faults,
    /// Request counters.
    pub stats: Stats,
    /// Requests-per-second window; replaced whole when the limit changes.
    pub limiter: Mutex<Arc<RollingWindow>>,
}

/// A rolling one-second window admitting `rps` requests (`0` = unlimited).
pub fn limiter(rps: u32) -> Arc<RollingWindow> {
    Arc::new(RollingWindow::new(rps as usize, Duration::from_secs(1)))
}

/// The router with every endpoint and middleware.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/v1/companies",
            get(list).post(create).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/companies/upsert",
            put(upsert).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/companies/bulk",
            post(bulk).fallback(method_not_allowed),
        )
        .route(
            "/api/v1/companies/{id}",
            get(get_one)
                .put(update)
                .delete(delete_one)
                .fallback(method_not_allowed),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Resource not found") })
        .layer(middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared)
}

async fn method_not_allowed() -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
}

/// A JSON error answer, `{"error": message}`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        };
        error(status, &self.to_string())
    }
}

/// Everything in front of the handlers: statistics, latency and faults, auth, rate limit;
/// then, for the faults that damage an answer, the damage.
async fn gate(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    s.stats.request(&format!("{} {route}", req.method()));
    let (_in_flight, _) = s.stats.enter();

    let latency = s.faults.extra_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let fault = s.faults.pick();
    if fault.is_some() {
        s.stats.fault();
    }
    match fault {
        Some(Fault::ServerError(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error(
                status,
                "An unexpected error occurred. Please try again later.",
            );
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        _ => {}
    }

    let key_ok = req
        .headers()
        .get("x-api-key")
        .is_some_and(|v| v.as_bytes() == s.api_key.as_bytes());
    if !key_ok {
        return error(StatusCode::UNAUTHORIZED, "Invalid or missing API key");
    }

    if fault == Some(Fault::Throttled) {
        // Counted apart from real limit rejections: the caller kept to the limit.
        s.stats.rejection("429-injected");
        let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded");
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        return resp;
    }
    let window = s.limiter.lock().unwrap().clone();
    if !window.try_admit() {
        s.stats.rejection("429");
        // Whole seconds, rounded up and at least 1, as HTTP's delta-seconds form requires.
        let wait = window.retry_after().as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "Rate limit exceeded");
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return resp;
    }

    let resp = next.run(req).await;
    match fault {
        Some(Fault::Malformed) => damage(resp, false).await,
        Some(Fault::DropConnection) => damage(resp, true).await,
        _ => resp,
    }
}

/// Replaces a handled answer by a 200 carrying its first half: as plain truncated JSON,
/// or (`drop`) as a body stream that fails there, so the client sees a broken connection.
/// The request itself was processed — only the answer is lost, as with a failing proxy.
async fn damage(resp: Response, drop: bool) -> Response {
    let full = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let full = if full.len() < 2 {
        Bytes::from_static(br#"{"id":"#)
    } else {
        full
    };
    let half = full.slice(..full.len() / 2);
    let body = if drop {
        use futures::StreamExt;
        // The pause lets the status line, headers and first half reach the client before
        // the stream fails, so it sees a 200 whose body breaks off.
        let fail = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated connection drop",
            ))
        });
        Body::from_stream(futures::stream::once(async { Ok(half) }).chain(fail))
    } else {
        Body::from(half)
    };
    let mut out = Response::new(body);
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    out
}

fn parse_body(bytes: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("Request body is not valid JSON: {e}")))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("Invalid company id '{raw}'")))
}

/// Parses `updatedSince`: RFC 3339 (`Z` or an offset, any fraction); a time without a zone
/// or a bare date is taken as UTC, as the server's clock is.
pub fn parse_since(raw: &str) -> Result<DateTime<Utc>, ApiError> {
    let t = raw.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f") {
        return Ok(d.and_utc());
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(ApiError::BadRequest(format!(
        "The value '{raw}' is not a valid ISO-8601 date for 'updatedSince'"
    )))
}

fn parse_count(name: &str, raw: &str, min: usize) -> Result<usize, ApiError> {
    raw.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= min)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "The value '{raw}' is not valid for '{name}': expected an integer >= {min}"
            ))
        })
}

/// Validates list parameters (names case-insensitive, as ASP.NET binds them).
pub fn parse_list_query(query: Option<&str>, max_page: usize) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: DEFAULT_LIMIT.min(max_page),
        offset: 0,
        since: None,
        fields: None,
    };
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.to_ascii_lowercase().as_str() {
            "limit" => q.limit = parse_count("limit", &v, 1)?.min(max_page),
            "offset" => q.offset = parse_count("offset", &v, 0)?,
            "updatedsince" => q.since = Some(parse_since(&v)?),
            "fields" => {
                // Unknown names are ignored; `id` always comes back so rows stay addressable.
                let mut fields = vec!["id"];
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    if let Some(f) = RESPONSE_FIELDS
                        .iter()
                        .find(|f| f.eq_ignore_ascii_case(name))
                    {
                        fields.push(f);
                    }
                }
                q.fields = (!v.trim().is_empty()).then_some(fields);
            }
            _ => {}
        }
    }
    Ok(q)
}

async fn list(State(s): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let q = match parse_list_query(query.as_deref(), s.max_page) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let page = s.store.lock().unwrap().list(&q);
    axum::Json(Value::Array(page)).into_response()
}

async fn create(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let p = Patch::parse(&parse_body(&body)?, true)?;
    let mut store = s.store.lock().unwrap();
    let at = store.next_write_time();
    let rec = store.create(&p, at)?.to_json();
    Ok((StatusCode::CREATED, axum::Json(rec)).into_response())
}

async fn get_one(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let store = s.store.lock().unwrap();
    let rec = store.get(&id).ok_or(ApiError::NotFound)?;
    Ok(axum::Json(rec.to_json()).into_response())
}

async fn update(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let p = Patch::parse(&parse_body(&body)?, false)?;
    let mut store = s.store.lock().unwrap();
    if store.get(&id).is_none() {
        return Err(ApiError::NotFound);
    }
    let at = store.next_write_time();
    let rec = store.update(&id, &p, at)?.to_json();
    Ok(axum::Json(rec).into_response())
}

async fn delete_one(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if s.store.lock().unwrap().delete(&id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::NotFound)
    }
}

async fn upsert(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let p = Patch::parse(&parse_body(&body)?, true)?;
    if p.domain()
        .flatten()
        .and_then(super::store::domain_key)
        .is_none()
    {
        return Err(ApiError::BadRequest("domain is required for upsert".into()));
    }
    let mut store = s.store.lock().unwrap();
    let at = store.next_write_time();
    let (action, id) = store.upsert(&p, at)?;
    Ok(axum::Json(json!({ "action": action.as_str(), "id": id.to_string() })).into_response())
}

async fn bulk(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let Value::Array(items) = parse_body(&body)? else {
        return Err(ApiError::BadRequest(
            "Request body must be a JSON array of companies".into(),
        ));
    };
    if items.len() > BULK_MAX {
        return Err(ApiError::BadRequest(format!(
            "Bulk requests are limited to {BULK_MAX} companies, got {}",
            items.len()
        )));
    }
    let mut store = s.store.lock().unwrap();
    // One bulk call is one transaction: every record it writes shares one timestamp.
    let at = store.next_write_time();
    let (mut created, mut updated) = (0u64, 0u64);
    let mut created_ids = Vec::new();
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let outcome = Patch::parse(item, true).and_then(|p| store.upsert(&p, at));
        match outcome {
            Ok((super::store::UpsertAction::Created, id)) => {
                created += 1;
                created_ids.push(Value::String(id.to_string()));
            }
            Ok((super::store::UpsertAction::Updated, _)) => updated += 1,
            Err(e) => errors.push(json!({ "index": index, "error": e.to_string() })),
        }
    }
    Ok(axum::Json(json!({
        "created": created,
        "updated": updated,
        "failed": errors.len(),
        "createdIds": created_ids,
        "errors": errors,
    }))
    .into_response())
}
