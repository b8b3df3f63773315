//! Fuzzes the mapping's read side: any JSON object, as a flat vendor record, goes through
//! each CRM's default mapping (`Mapping::read`) and, when it reads, back out through
//! `Mapping::write`; neither may panic.
#![no_main]

use std::sync::OnceLock;

use crmbridge::mapping::{Mapping, MappingRules};
use crmbridge::model::CrmKind;
use libfuzzer_sys::fuzz_target;

const KINDS: [CrmKind; 3] = [CrmKind::Rally, CrmKind::Marketo, CrmKind::Amocrm];

/// Each CRM's default mapping, compiled once (compiling is not what is fuzzed).
fn mappings() -> &'static [Mapping] {
    static MAPPINGS: OnceLock<Vec<Mapping>> = OnceLock::new();
    MAPPINGS.get_or_init(|| {
        KINDS
            .iter()
            .map(|&k| Mapping::compile(k, &MappingRules::default()).expect("defaults compile"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Object(record)) = serde_json::from_slice(data) else {
        return;
    };
    for mapping in mappings() {
        if let Ok(fields) = mapping.read(&record) {
            let _ = mapping.write(&fields);
        }
    }
});
