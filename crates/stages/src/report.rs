//! Stage kind `report`: the static HTML report ([`answer::report`]) written to a file or
//! object-store location after a run: query photos with their top-20 (correct matches marked),
//! the evaluation and the training curves.
//!
//! ```toml
//! [stages.report]
//! kind = "report"
//! inputs = ["submit", "evaluate"]
//! out = "../data/report.html"
//! queries = 40
//! ```

use std::collections::{BTreeMap, HashMap};

use arrow::datatypes::SchemaRef;
use object_store::{ObjectStoreExt, PutPayload};

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use answer::{ReportOptions, report};
use engine::config::{Context, Keys, Loc, Reporter};
use engine::StageCtx;
use lake::store;
use crate::{Error, Result};

const KEYS: &[&str] = &["out", "queries", "embeddings", "submissions", "evaluations", "title"];

#[derive(Debug, Clone)]
pub struct ReportStage {
    /// Resolved location of the HTML file.
    pub out: String,
    pub queries: usize,
    pub embeddings: String,
    pub submissions: String,
    pub evaluations: String,
    pub title: Option<String>,
}

impl ReportStage {
    pub fn parse(k: &mut Keys, ctx: &Context) -> Option<ReportStage> {
        let out = match k.str("out") {
            Some(o) => match ctx.location(&o) {
                Ok(u) => Some(u),
                Err(e) => {
                    k.error("out", e.to_string());
                    None
                }
            },
            None => {
                if !k.has("out") {
                    k.missing("out", "where to write the HTML file, e.g. \"../data/report.html\"");
                }
                None
            }
        };
        let s = ReportStage {
            out: out.clone().unwrap_or_default(),
            queries: k.int("queries", 1, 100_000).unwrap_or(40) as usize,
            embeddings: k.str("embeddings").unwrap_or_else(|| "embeddings".into()),
            submissions: k.str("submissions").unwrap_or_else(|| "submissions".into()),
            evaluations: k.str("evaluations").unwrap_or_else(|| "evaluate".into()),
            title: k.str("title"),
        };
        engine::stage::finish_keys(k, KEYS);
        out.map(|_| s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        ins.need(rep, &mut reads, &self.embeddings, &["photo_id", "uri", "individual_id"]);
        ins.need(rep, &mut reads, &self.submissions, &["query", "rank", "neighbour", "distance"]);
        if visible.contains_key(&self.evaluations) {
            reads.push(self.evaluations.clone());
        }
        Checked { reads, writes: Vec::new(), ..Default::default() }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let title = self.title.clone().unwrap_or_else(|| format!("run {}", ctx.run_id));
        let opts = ReportOptions {
            embeddings: self.embeddings.clone(),
            submissions: self.submissions.clone(),
            evaluations: self.evaluations.clone(),
            queries: self.queries,
            thumb_side: 160,
        };
        let html = report(&ctx.lake, &title, &opts).await?;
        if let Some(path) = self.out.strip_prefix("file://") {
            if let Some(parent) = std::path::Path::new(path).parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
        }
        let bytes = html.len();
        let (st, path) = store::open(&self.out, ctx.lake.options())?;
        st.put(&path, PutPayload::from(html.into_bytes())).await.map_err(|e| Error::ObjectStore { uri: self.out.clone(), source: e })?;
        Ok(Outcome { rows_in: 0, rows_out: 0, written: BTreeMap::new(), summary: format!("wrote {} ({} KiB)", self.out, bytes / 1024), ..Default::default() })
    }
}

impl Stage for ReportStage {
    fn describe(&self) -> String {
        format!("report {}", self.out)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(ReportStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(ReportStage::run(self, ctx))
    }
}
