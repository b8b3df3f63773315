//! Fuzzes amoCRM's answer parsing: any JSON body is read as a custom field catalogue page
//! and as a company list page; the body and each element of an array are flattened as a
//! company against both the shipped fixture catalogue and the catalogue read from the
//! body itself; any body goes through the classifier of each kind of call.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use crmbridge::connectors::amocrm::classify::{AmoClassifier, CallKind};
use crmbridge::connectors::amocrm::wire::{
    Catalogue, CustomField, flatten_company, parse_company_page,
};
use crmbridge::http::Classifier;
use crmbridge_fuzz::{STATUSES, json, response, value_and_elements};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The catalogue entries of a `GET companies/custom_fields` answer.
fn catalogue_of(body: &Value) -> Catalogue {
    let entries = body
        .get("_embedded")
        .and_then(|e| e.get("custom_fields"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    Catalogue::new(entries.filter_map(CustomField::from_json).collect())
}

/// A realistic catalogue (codes, enums, numeric fields), so that flattening takes the
/// branches of known fields even when the input carries no catalogue.
fn fixture_catalogue() -> &'static Catalogue {
    static CATALOGUE: OnceLock<Catalogue> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        let text = include_str!("../../wiremock-fixtures/amocrm/custom_fields.json");
        catalogue_of(&serde_json::from_str(text).expect("the fixture is JSON"))
    })
}

fuzz_target!(|data: &[u8]| {
    let body = json(data);
    if let Some(v) = &body {
        let own = catalogue_of(v);
        for catalogue in [fixture_catalogue(), &own] {
            let _ = parse_company_page(v, catalogue);
            for company in value_and_elements(v) {
                let _ = flatten_company(company, catalogue);
            }
            for f in catalogue.fields() {
                for key in f.keys() {
                    let _ = catalogue.resolve(&key);
                }
            }
        }
    }
    for kind in [CallKind::Read, CallKind::BatchWrite, CallKind::Token] {
        let classifier = AmoClassifier {
            kind,
            ban_cooldown: Duration::from_secs(60),
        };
        for status in STATUSES {
            let _ = classifier.classify(&response(status, data, body.as_ref()));
        }
    }
});
