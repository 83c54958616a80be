//! Stage kind `evaluate`: retrieval quality of an embeddings table on its labelled photos —
//! precision@1, mAP@20, recall@5/10/20 and MAP@R ([`lake::metrics`]) — for each query
//! set the split of the model allows, written to a table (one row per query set and gallery)
//! and summarised in the run report.
//!
//! | queries | gallery | what it measures |
//! |---|---|---|
//! | `val_unseen` | `queries` | held-out individuals among themselves (the usual re-id protocol) |
//! | `val_unseen` | `all` | the same queries against the whole collection |
//! | `val_seen` | `all` | held-out photos of trained individuals against the whole collection |
//! | `all` | `all` | every labelled photo (optimistic: includes training photos) |
//!
//! ```toml
//! [stages.evaluate]
//! kind = "evaluate"
//! inputs = ["embed"]
//! embeddings = "embeddings"
//! splits = "train"      # the train stage's table; without it only all/all is computed
//! query_expansion = 5   # also report each row re-ranked with α-query expansion (k = 5)
//! qe_alpha = 3.0
//! geometric = 20       # also report each row with its first 20 re-ranked by local features
//!                      # verified geometrically ([`answer::local`]); geometric_weight = 0.3,
//!                      # geometric_min_inliers = 8, geometric_side = 384
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Loc, Reporter};
use engine::StageCtx;
use lake::tables::{EmbeddingSet, read_embeddings, read_splits};
use lake::{Catalog, WriteKind};
use lake::metrics::{RetrievalMetrics, alpha_query_expansion, retrieval_metrics, retrieval_metrics_reranked};
use answer::local::{GeoOptions, LocalFeatures};
use crate::{Error, Result};

const KEYS: &[&str] =
    &["embeddings", "splits", "output", "query_expansion", "qe_alpha", "geometric", "geometric_weight", "geometric_side", "geometric_min_inliers"];

#[derive(Debug, Clone)]
pub struct EvaluateStage {
    pub embeddings: String,
    pub splits: Option<String>,
    pub output: Option<String>,
    /// α-query expansion: neighbours added to each query (0: off) and their weight exponent.
    pub qe_k: usize,
    pub qe_alpha: f32,
    /// Geometric re-ranking of the first `geo.k` (0: off).
    pub geo: GeoOptions,
}






/// Embeddings, labels, URIs and rows of `set` of a query or gallery set.
type Subset = (Vec<f32>, Vec<String>, Vec<String>, Vec<usize>);

/// One evaluation: `(queries, gallery, metrics, gallery size, re-ranking)`.
pub type Evaluation = (String, String, RetrievalMetrics, usize, String);

/// The evaluations of the embeddings table on `set`, given the split of each photo (by URI).
/// With `qe = Some((k, alpha))` every evaluation is made a second time with α-query-expanded
/// queries (re-ranking `aqe k=.. alpha=..`); with `geo` (local features of every row of `set`)
/// once more with the first candidates re-ranked geometrically (re-ranking `geometric ...`).
pub fn evaluate(set: &EmbeddingSet, splits: &HashMap<String, String>, qe: Option<(usize, f32)>, geo: Option<&LocalFeatures>) -> Vec<Evaluation> {
    let subset = |rows: &[usize]| -> Subset {
        let mut v = Vec::with_capacity(rows.len() * set.dim);
        for &i in rows {
            v.extend_from_slice(set.row(i));
        }
        (
            v,
            rows.iter().map(|&i| set.labels[i].clone().unwrap_or_else(|| format!("\u{0}unlabelled:{}", set.uris[i]))).collect(),
            rows.iter().map(|&i| set.uris[i].clone()).collect(),
            rows.to_vec(),
        )
    };
    let all: Vec<usize> = (0..set.len()).collect();
    let labelled: Vec<usize> = all.iter().copied().filter(|&i| set.labels[i].is_some()).collect();
    let in_split = |name: &str| -> Vec<usize> {
        labelled.iter().copied().filter(|&i| splits.get(&set.uris[i]).is_some_and(|s| s == name)).collect()
    };
    let ks = [5, 10, 20];
    let dim = set.dim;
    let mut out = Vec::new();
    let mut push = |qn: &str, gn: &str, q: &Subset, g: &Subset| {
        let m = retrieval_metrics(&q.0, &q.1, &q.2, &g.0, &g.1, &g.2, dim, &ks);
        out.push((qn.to_string(), gn.to_string(), m, g.1.len(), "none".to_string()));
        if let Some((k, alpha)) = qe {
            let e = alpha_query_expansion(&q.0, &q.2, &g.0, &g.2, dim, k, alpha);
            let m = retrieval_metrics(&e, &q.1, &q.2, &g.0, &g.1, &g.2, dim, &ks);
            out.push((qn.to_string(), gn.to_string(), m, g.1.len(), format!("aqe k={k} alpha={alpha}")));
        }
        if let Some(geo) = geo.filter(|g| g.options.k > 0) {
            // Candidates come as rows of the gallery subset; the features are by row of `set`.
            let rescore = |qi: usize, c: &[(usize, f32)]| {
                let mapped: Vec<(usize, f32)> = c.iter().map(|&(gi, sim)| (g.3[gi], sim)).collect();
                geo.rescore(q.3[qi], &mapped)
            };
            let m = retrieval_metrics_reranked(&q.0, &q.1, &q.2, &g.0, &g.1, &g.2, dim, &ks, Some((geo.options.k, &rescore)));
            out.push((qn.to_string(), gn.to_string(), m, g.1.len(), geo.options.label()));
        }
    };
    let gallery = subset(&all);
    let unseen = in_split("val_unseen");
    if !unseen.is_empty() {
        let q = subset(&unseen);
        push("val_unseen", "queries", &q, &q);
        push("val_unseen", "all", &q, &gallery);
    }
    let seen = in_split("val_seen");
    if !seen.is_empty() {
        push("val_seen", "all", &subset(&seen), &gallery);
    }
    if !labelled.is_empty() {
        push("all", "all", &subset(&labelled), &gallery);
    }
    out
}

impl EvaluateStage {
    pub fn parse(k: &mut Keys) -> Option<EvaluateStage> {
        let s = EvaluateStage {
            embeddings: k.str("embeddings").unwrap_or_else(|| "embeddings".into()),
            splits: k.str("splits"),
            output: k.str("output"),
            qe_k: k.int("query_expansion", 0, 1000).unwrap_or(0) as usize,
            qe_alpha: k.float("qe_alpha", 0.0, 100.0).unwrap_or(3.0) as f32,
            geo: crate::shared::geo_options(k),
        };
        engine::stage::finish_keys(k, KEYS);
        Some(s)
    }

    pub fn output(&self, stage: &str) -> String {
        self.output.clone().unwrap_or_else(|| stage.to_string())
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        ins.need(rep, &mut reads, &self.embeddings, &["uri", "individual_id", "embedding"]);
        if let Some(s) = &self.splits {
            ins.need(rep, &mut reads, s, &["uri", "split"]);
        }
        Checked { reads, writes: vec![(self.output(stage), Catalog::builtin("evaluations"))], ..Default::default() }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let set = read_embeddings(&ctx.lake, &self.embeddings).await?;
        let splits = match &self.splits {
            Some(t) => read_splits(&ctx.lake, t).await?,
            None => HashMap::new(),
        };
        let geo = if self.geo.k > 0 {
            ctx.progress.set_message(format!("local features of {} photos", set.len()));
            let crops = answer::local::model_crops(&ctx.lake, &set.model_id).await?;
            let f = answer::local::local_features(&ctx.lake, &set.photo_ids, &set.uris, &crops, self.geo).await?;
            if f.unreadable == set.len() && !set.is_empty() {
                return Err(Error::Other(format!(
                    "geometric re-ranking: none of the {} photos of `{}` could be read ({})",
                    set.len(),
                    self.embeddings,
                    f.first_error.unwrap_or_default()
                )));
            }
            Some(f)
        } else {
            None
        };
        let geo_note = geo.as_ref().map(|f| {
            format!(
                "; local features of {} photos ({} cropped) in {:.1} s{}",
                f.rows.len() - f.unreadable,
                f.cropped,
                f.seconds,
                if f.unreadable > 0 { format!(", {} unreadable (first: {})", f.unreadable, f.first_error.clone().unwrap_or_default()) } else { String::new() }
            )
        });
        let evals = tokio::task::spawn_blocking({
            let set = Arc::new(set);
            let s2 = set.clone();
            let qe = (self.qe_k > 0).then_some((self.qe_k, self.qe_alpha));
            move || (evaluate(&s2, &splits, qe, geo.as_ref()), s2)
        })
        .await
        .map_err(|e| Error::Other(format!("evaluation panicked: {e}")))?;
        let (evals, set) = evals;
        if evals.is_empty() {
            return Err(Error::Other(format!("table `{}` has no labelled photo to evaluate", self.embeddings)));
        }
        let n = evals.len();
        let recall = |m: &RetrievalMetrics, k: usize| m.recall_at.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r).unwrap_or(0.0);
        let now = chrono::Utc::now().timestamp_micros();
        let batch = RecordBatch::try_new(
            Catalog::builtin("evaluations"),
            vec![
                Arc::new(StringArray::from(vec![set.model_id.as_str(); n])),
                Arc::new(StringArray::from_iter_values(evals.iter().map(|e| e.0.as_str()))),
                Arc::new(StringArray::from_iter_values(evals.iter().map(|e| e.1.as_str()))),
                Arc::new(Int64Array::from_iter_values(evals.iter().map(|e| e.2.queries as i64))),
                Arc::new(Int64Array::from_iter_values(evals.iter().map(|e| e.3 as i64))),
                Arc::new(Float64Array::from_iter_values(evals.iter().map(|e| e.2.precision_at_1))),
                Arc::new(Float64Array::from_iter_values(evals.iter().map(|e| e.2.map_at_20))),
                Arc::new(Float64Array::from_iter_values(evals.iter().map(|e| e.2.map_at_r))),
                Arc::new(Float64Array::from_iter_values(evals.iter().map(|e| recall(&e.2, 5)))),
                Arc::new(Float64Array::from_iter_values(evals.iter().map(|e| recall(&e.2, 10)))),
                Arc::new(Float64Array::from_iter_values(evals.iter().map(|e| recall(&e.2, 20)))),
                Arc::new(StringArray::from_iter_values(evals.iter().map(|e| e.4.as_str()))),
                Arc::new(StringArray::from(vec![ctx.run_id.as_str(); n])),
                Arc::new(TimestampMicrosecondArray::from(vec![now; n]).with_timezone("UTC")),
            ],
        )?;
        let out = self.output(&ctx.name);
        let mut sink = ctx.sink(&out, Catalog::builtin("evaluations"), WriteKind::Overwrite).await?;
        sink.send(batch).await?;
        let committed = sink.finish().await?;
        let lines: Vec<String> = evals
            .iter()
            .map(|(q, g, m, _, r)| {
                let r = if r == "none" { String::new() } else { format!(" [{r}]") };
                format!("{q}/{g}{r}: P@1 {:.3} mAP@20 {:.3} ({} queries)", m.precision_at_1, m.map_at_20, m.queries)
            })
            .collect();
        Ok(Outcome {
            rows_in: set.len() as u64,
            rows_out: n as u64,
            written: BTreeMap::from([(out, committed.version)]),
            summary: format!("{}: {}{}", set.model_id, lines.join("; "), geo_note.unwrap_or_default()),
            ..Default::default()
        })
    }
}

impl Stage for EvaluateStage {
    fn describe(&self) -> String {
        format!("evaluate {}", self.embeddings)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(EvaluateStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(EvaluateStage::run(self, ctx))
    }
}
