//! Pieces both benchmarks share: a connector that is never called (pages are fed straight
//! into the engine) and synthetic Rally-shaped records from a seed universe.

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use crmbridge::connector::{
    Connector, ConnectorError, Cursor, Page, PollMode, PushItem, PushOutcome, VendorRecord,
};
use crmbridge::sim::common::seed_company;
use serde_json::{Map, Value, json};

/// Never called: the benchmark feeds pages straight into the engine.
pub struct Offline(pub String);

#[async_trait]
impl Connector for Offline {
    fn name(&self) -> &str {
        &self.0
    }
    async fn start(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn poll(&self, _: &Cursor, _: &PollMode) -> Result<Page, ConnectorError> {
        unreachable!("offline benchmark")
    }
    fn max_batch(&self) -> usize {
        100
    }
    async fn push(&self, _: &[PushItem]) -> Result<Vec<PushOutcome>, ConnectorError> {
        unreachable!("offline benchmark")
    }
}

/// Company `i` of seed universe 7 as a Rally record with id `<id_prefix>-<i>`, updated at
/// `epoch + i` seconds; with `domain_prefix`, its domain becomes `<prefix>-<i>.<domain>`.
pub fn synthetic_record(
    i: usize,
    id_prefix: &str,
    domain_prefix: Option<&str>,
    epoch: i64,
) -> VendorRecord {
    let c = seed_company(7, i);
    let domain = match domain_prefix {
        Some(p) => format!("{p}-{i}.{}", c.domain),
        None => c.domain,
    };
    let fields: Map<String, Value> = json!({
        "name": c.name, "domain": domain, "industry": c.industry,
        "employeeCount": c.employee_count,
        "annualRevenue": serde_json::from_str::<Value>(&c.annual_revenue.to_string()).unwrap(),
        "phone": c.phone, "city": c.city, "country": c.country, "tags": c.tags,
    })
    .as_object()
    .unwrap()
    .clone();
    VendorRecord {
        vendor_id: format!("{id_prefix}-{i}"),
        updated_at: Utc.timestamp_opt(epoch + i as i64, 0).unwrap(),
        fields,
        deleted: false,
    }
}
