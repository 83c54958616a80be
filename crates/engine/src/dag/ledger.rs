//! The run ledger: table `runs`, one row per stage per run, appended when the stage ends.
//! It is also what the up-to-date check reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use chrono::{DateTime, Utc};

use lake::{Catalog, Lake, WriteKind};
use crate::{Error, Result};

pub const TABLE: &str = "runs";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Succeeded,
    UpToDate,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::UpToDate => "up_to_date",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// One ledger row.
#[derive(Debug, Clone)]
pub struct Entry {
    pub run_id: String,
    pub pipeline: String,
    pub pipeline_hash: String,
    pub stage: String,
    pub kind: String,
    pub config_hash: String,
    pub input_fingerprint: Option<String>,
    pub status: Status,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub rows_in: u64,
    pub rows_out: u64,
    pub tables_read: BTreeMap<String, u64>,
    pub tables_written: BTreeMap<String, u64>,
    pub error: Option<String>,
    pub summary: String,
    pub changes: crate::stage::Changes,
}

impl Entry {
    /// The row of `stage` in run `run_id` as it starts: failed until told otherwise, nothing
    /// read, written or counted yet.
    pub fn begun(run_id: &str, pipeline: &str, pipeline_hash: &str, stage: &crate::config::StagePlan, started_at: DateTime<Utc>) -> Entry {
        Entry {
            run_id: run_id.to_string(),
            pipeline: pipeline.to_string(),
            pipeline_hash: pipeline_hash.to_string(),
            stage: stage.name.clone(),
            kind: stage.kind_name.clone(),
            config_hash: stage.config_hash.clone(),
            input_fingerprint: None,
            status: Status::Failed,
            started_at,
            ended_at: Utc::now(),
            rows_in: 0,
            rows_out: 0,
            tables_read: BTreeMap::new(),
            tables_written: BTreeMap::new(),
            error: None,
            summary: String::new(),
            changes: Default::default(),
        }
    }
}

/// What an earlier successful run of a stage saw and left.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSuccess {
    pub config_hash: String,
    pub input_fingerprint: Option<String>,
    pub tables_read: BTreeMap<String, u64>,
    pub tables_written: BTreeMap<String, u64>,
}

pub async fn record(lake: &Lake, e: &Entry) -> Result<()> {
    let schema = Catalog::builtin(TABLE);
    let ts = |t: DateTime<Utc>| TimestampMicrosecondArray::from(vec![t.timestamp_micros()]).with_timezone("UTC");
    let s = |v: &str| Arc::new(StringArray::from(vec![v.to_string()])) as Arc<dyn Array>;
    let json = |m: &BTreeMap<String, u64>| serde_json::to_string(m).unwrap_or_else(|_| "{}".into());
    let n = |v: Option<u64>| Arc::new(Int64Array::from(vec![v.map(|v| v as i64)])) as Arc<dyn Array>;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            s(&e.run_id),
            s(&e.pipeline),
            s(&e.pipeline_hash),
            s(&e.stage),
            s(&e.kind),
            s(&e.config_hash),
            Arc::new(StringArray::from(vec![e.input_fingerprint.clone()])),
            s(e.status.as_str()),
            Arc::new(ts(e.started_at)),
            Arc::new(ts(e.ended_at)),
            Arc::new(Int64Array::from(vec![e.rows_in as i64])),
            Arc::new(Int64Array::from(vec![e.rows_out as i64])),
            s(&json(&e.tables_read)),
            s(&json(&e.tables_written)),
            Arc::new(StringArray::from(vec![e.error.clone()])),
            Arc::new(StringArray::from(vec![(!e.summary.is_empty()).then(|| e.summary.clone())])),
            n(e.changes.new),
            n(e.changes.changed),
            n(e.changes.deleted),
            n(e.changes.rejected),
        ],
    )?;
    let mut sink = lake.sink(TABLE, schema, WriteKind::Append);
    sink.send(batch).await?;
    sink.finish().await?;
    Ok(())
}

/// The latest succeeded (or up-to-date) run of `stage` in `pipeline`.
pub async fn last_success(lake: &Lake, pipeline: &str, stage: &str) -> Result<Option<LastSuccess>> {
    let Some(ds) = lake.open(TABLE).await? else { return Ok(None) };
    let q = |s: &str| s.replace('\'', "''");
    let filter = format!(
        "pipeline = '{}' AND stage = '{}' AND status IN ('succeeded', 'up_to_date')",
        q(pipeline),
        q(stage)
    );
    let batches = lake::tables::rows_where(&ds, TABLE, &filter, None).await?;
    let mut best: Option<(i64, LastSuccess)> = None;
    for b in &batches {
        let col = |n: &str| b.column_by_name(n).ok_or_else(|| Error::Other(format!("runs table lacks `{n}`")));
        let ended = col("ended_at")?.as_primitive::<arrow::datatypes::TimestampMicrosecondType>().clone();
        let (cfg, fp, rd, wr) = (col("config_hash")?, col("input_fingerprint")?, col("tables_read")?, col("tables_written")?);
        let (cfg, fp, rd, wr) = (cfg.as_string::<i32>(), fp.as_string::<i32>(), rd.as_string::<i32>(), wr.as_string::<i32>());
        for i in 0..b.num_rows() {
            let t = ended.value(i);
            if best.as_ref().is_some_and(|(bt, _)| *bt >= t) {
                continue;
            }
            let parse = |s: &str| serde_json::from_str::<BTreeMap<String, u64>>(s).unwrap_or_default();
            best = Some((
                t,
                LastSuccess {
                    config_hash: cfg.value(i).to_string(),
                    input_fingerprint: fp.is_valid(i).then(|| fp.value(i).to_string()),
                    tables_read: parse(rd.value(i)),
                    tables_written: parse(wr.value(i)),
                },
            ));
        }
    }
    Ok(best.map(|(_, l)| l))
}
