//! Fuzzes Marketo's answer parsing: any JSON body (and each element of an array, and each
//! row of its `result`) goes through `parse_record`; the body through `Describe::parse`
//! and `first_error`; any body through the classifier that reads `success: false`.
#![no_main]

use crmbridge::connectors::marketo::wire::{Describe, MarketoClassifier, first_error, parse_record};
use crmbridge::http::Classifier;
use crmbridge_fuzz::{STATUSES, json, response, value_and_elements};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let body = json(data);
    if let Some(v) = &body {
        let _ = Describe::parse(v);
        let _ = first_error(v);
        let rows = v.get("result").and_then(Value::as_array).into_iter().flatten();
        for row in value_and_elements(v).chain(rows) {
            let _ = parse_record(row);
        }
    }
    for status in STATUSES {
        let _ = MarketoClassifier::default().classify(&response(status, data, body.as_ref()));
    }
});
