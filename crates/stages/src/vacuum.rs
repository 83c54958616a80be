//! Stage kind `vacuum`: the lake's housekeeping as the last stage of a nightly run
//! ([`lake::Lake::vacuum`], what `pipeline vacuum` does): small fragments compacted, `run-*` tags
//! older than `keep_days` dropped (each table's newest kept), and versions older than that which
//! no tag holds removed. It runs inside the run's lease, once a day at most (its fingerprint is
//! the UTC date), and it leaves every stage up to date: the ledger compares table contents, and
//! a compaction rewrites fragments, not rows ([`lake::Lake::content_version`]).
//!
//! ```toml
//! [stages.vacuum]
//! kind = "vacuum"
//! inputs = ["submit"]     # after every stage that writes
//! keep_days = 7
//! ```

use std::collections::{BTreeMap, HashMap};

use arrow::datatypes::SchemaRef;
use futures::future::BoxFuture;

use engine::StageCtx;
use engine::config::{Context, Keys, Loc, Reporter};
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use crate::Result;

const KEYS: &[&str] = &["keep_days"];

#[derive(Debug, Clone)]
pub struct VacuumStage {
    pub keep_days: f64,
}

impl VacuumStage {
    pub fn parse(k: &mut Keys) -> Option<VacuumStage> {
        let keep = k.float("keep_days", 0.0, 36_500.0);
        let ok = keep.is_some() || !k.has("keep_days");
        let s = VacuumStage { keep_days: keep.unwrap_or(7.0) };
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, _stage: &str, _at: &Loc, _visible: &HashMap<String, SchemaRef>, _broken: bool, _rep: &mut Reporter) -> Checked {
        // Every table is its business and none is its own: it reads and owns nothing.
        Checked::default()
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        ctx.progress.set_message("compacting and removing old versions");
        let keep = chrono::Duration::milliseconds((self.keep_days * 86_400_000.0) as i64);
        let done = ctx.lake.vacuum(keep).await?;
        let sum = |f: fn(&lake::history::Vacuumed) -> u64| done.iter().map(f).sum::<u64>();
        let (compacted, versions, bytes, tags) =
            (sum(|v| v.compacted as u64), sum(|v| v.versions_removed), sum(|v| v.bytes_removed), sum(|v| v.tags_dropped as u64));
        let thumbs = lake::thumbnails::DIR;
        let stale: u64 = done.iter().filter(|v| v.table != thumbs).map(|v| v.rows_removed).sum();
        let stale = if stale > 0 { format!(", {stale} crops of photos no longer in the lake removed from the crop cache") } else { String::new() };
        let gone: u64 = done.iter().filter(|v| v.table == thumbs).map(|v| v.rows_removed).sum();
        let gone = if gone > 0 { format!(", {gone} thumbnails of photos no longer in the lake deleted") } else { String::new() };
        Ok(Outcome {
            rows_in: 0,
            rows_out: 0,
            written: BTreeMap::new(),
            summary: format!(
                "{} tables: {compacted} small fragments compacted, {versions} versions older than {} days removed ({:.1} MB), {tags} run tags dropped{stale}{gone}",
                done.iter().filter(|v| v.table != thumbs).count(),
                self.keep_days,
                bytes as f64 / 1e6
            ),
            ..Default::default()
        })
    }
}

impl Stage for VacuumStage {
    fn describe(&self) -> String {
        format!("vacuum (keep {} days)", self.keep_days)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(VacuumStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    /// The UTC date: a run on a day it already ran is up to date.
    fn prepare<'a>(&'a self, _ctx: &'a StageCtx) -> BoxFuture<'a, Result<Prepared>> {
        Box::pin(async { Ok(Prepared { fingerprint: Some(chrono::Utc::now().format("%Y-%m-%d").to_string()), state: None }) })
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(VacuumStage::run(self, ctx))
    }
}
