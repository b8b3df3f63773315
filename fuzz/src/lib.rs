//! Helpers shared by the fuzz targets: turning fuzzer bytes into the JSON values and HTTP
//! answers the connectors' parsers and classifiers are handed in production.

use crmbridge::http::ApiResponse;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// The statuses every classifier is asked about: success, the verdict codes, auth, ban,
/// throttle and server errors (each takes a different branch in some classifier).
pub const STATUSES: [u16; 11] = [200, 204, 400, 401, 403, 404, 409, 422, 429, 500, 503];

/// The bytes parsed as a JSON value, or `None` when they are not JSON (the connectors
/// never hand non-JSON to their parsers: the HTTP client rejects it first).
pub fn json(data: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Value>(data).ok()
}

/// The value itself, then (if it is an array) each of its elements: a page body and its
/// rows both reach the record parsers.
pub fn value_and_elements(v: &Value) -> impl Iterator<Item = &Value> {
    std::iter::once(v).chain(v.as_array().into_iter().flatten())
}

/// An answer with `status` and body `data` as the HTTP client builds it (`json` set when
/// the body parses), for the classifiers.
pub fn response(status: u16, data: &[u8], json: Option<&Value>) -> ApiResponse {
    ApiResponse {
        connector: "fuzz".into(),
        endpoint: "fuzz",
        status: StatusCode::from_u16(status).expect("STATUSES are valid codes"),
        headers: HeaderMap::new(),
        body: data.to_vec(),
        json: json.cloned(),
    }
}
