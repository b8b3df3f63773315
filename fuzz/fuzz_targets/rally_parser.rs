//! Fuzzes Rally's answer parsing: any JSON body, and each row of an array body (a list
//! page), goes through `parse_record`; any body through the record-verdict classifier.
#![no_main]

use crmbridge::connectors::rally::{RecordVerdictClassifier, parse_record};
use crmbridge::http::Classifier;
use crmbridge_fuzz::{STATUSES, json, response, value_and_elements};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = json(data);
    if let Some(v) = &body {
        for row in value_and_elements(v) {
            let _ = parse_record(row);
        }
    }
    for status in STATUSES {
        let _ = RecordVerdictClassifier.classify(&response(status, data, body.as_ref()));
    }
});
