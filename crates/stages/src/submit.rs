//! Stage kind `submit`: for each query photo, the 20 most similar photos of the whole
//! collection (itself excluded), found through the embeddings table's vector index — as a CSV
//! in the seed's format and as table `submissions` — and a per-individual answer: the best
//! distinct individuals by their best match, with `new_individual` inserted where the best
//! similarity falls under a threshold chosen on the validation split.
//!
//! ```toml
//! [stages.submit]
//! kind = "submit"
//! inputs = ["index"]
//! embeddings = "embeddings"
//! splits = "train"                 # queries = "val" needs it, and the threshold is fitted on it
//! queries = "all"                  # all | val | val_unseen | val_seen | unlabelled
//! k = 20
//! csv = "../data/submission.csv"   # relative to the pipeline file; file:// or s3:// also work
//! individuals = 5
//! new_individual_threshold = "auto"   # or a similarity, e.g. 0.55
//! geometric = 20                   # re-rank each query's first 20 by local features verified
//!                                  # with RANSAC (answer::local; off by default), with
//!                                  # geometric_weight, geometric_side, geometric_min_inliers
//!                                  # as in `evaluate`
//! ```
//!
//! CSV: `photo,neighbours`, the 20 photo ids separated by spaces, nearest first (the format of
//! the Kaggle whale competitions). A second CSV next to it (`<name>_individuals.csv`):
//! `photo,individuals`, the best individual ids with `new_individual` where it ranks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Float32Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutPayload};

use lake::tables::{EmbeddingSet, read_embeddings, read_splits};
use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Loc, Reporter, Val};
use engine::StageCtx;
use lake::{Catalog, WriteKind, store};
use lake::vector::{self, Hit, InMemory, SearchOverrides, Source};
use crate::{Error, Result};

const KEYS: &[&str] = &[
    "embeddings", "splits", "queries", "k", "csv", "individuals", "new_individual_threshold", "nprobes", "refine", "ef",
    "concurrency", "output", "proposals", "query_expansion", "qe_alpha", "geometric", "geometric_weight", "geometric_side", "geometric_min_inliers",
];

/// The answer for one photo whose individual is not in the collection.
pub use lake::decisions::NEW_INDIVIDUAL;

lake::choice! { "query set",
    /// `queries = ...`: which photos get a top-k line.
    pub enum QuerySet {
        All = "all",
        /// The held-out photos of the train stage's split (`val_unseen` and `val_seen`).
        Val = "val",
        /// Photos of individuals held out of training entirely.
        ValUnseen = "val_unseen",
        /// Held-out photos of trained individuals.
        ValSeen = "val_seen",
        /// Photos without a label.
        Unlabelled = "unlabelled",
    }
}

impl QuerySet {
    /// Whether a photo with `split` (empty: none) and, or without, a label is in the set.
    pub fn holds(self, split: &str, labelled: bool) -> bool {
        match self {
            QuerySet::All => true,
            QuerySet::Val => split.starts_with("val"),
            QuerySet::ValUnseen | QuerySet::ValSeen => split == self.as_str(),
            QuerySet::Unlabelled => !labelled,
        }
    }

    /// Whether it is defined by the train stage's split.
    pub fn needs_splits(self) -> bool {
        matches!(self, QuerySet::Val | QuerySet::ValUnseen | QuerySet::ValSeen)
    }
}

#[derive(Debug, Clone)]
pub struct SubmitStage {
    pub embeddings: String,
    pub splits: Option<String>,
    pub queries: QuerySet,
    pub k: usize,
    /// Resolved location of the CSV.
    pub csv: Option<String>,
    pub individuals: usize,
    /// None: fitted on the validation split.
    pub threshold: Option<f64>,
    /// Index search settings given in the file; the rest are those measured for the index.
    pub search: SearchOverrides,
    pub concurrency: usize,
    pub output: String,
    /// Table of the proposals: per query photo, its individuals best first with
    /// `new_individual` where it ranks (what `<csv>_individuals.csv` lists; the review page
    /// shows it).
    pub proposals: String,
    /// α-query expansion: each query is searched again as itself plus its first `k` neighbours
    /// weighted by similarity^`qe_alpha` (0: off), as `evaluate`'s `query_expansion` measures.
    pub query_expansion: usize,
    pub qe_alpha: f32,
    /// Geometric re-ranking of each query's first candidates (k 0: off).
    pub geo: answer::local::GeoOptions,
}

/// The similarity under which a query is answered `new_individual` first, fitted on labelled
/// validation queries: for each, `known` = its best similarity to another photo of its own
/// individual and `other` = its best similarity to any other individual. With its individual
/// in the collection the best match is `max(known, other)`; had it been new, `other`. The
/// threshold maximises the share of both situations answered right (new when under it). Returns
/// the threshold and that accuracy; None without queries that have a match.
pub fn fit_threshold(pairs: &[(f32, f32)]) -> Option<(f64, f64)> {
    if pairs.is_empty() {
        return None;
    }
    // Right at t: best match `max(known, other)` ≥ t (found) plus `other` < t (new). Both
    // counts come from sorted values by binary search: O(n log n) over 3n candidates.
    let mut best_of: Vec<f32> = pairs.iter().map(|(k, o)| k.max(*o)).collect();
    let mut others: Vec<f32> = pairs.iter().map(|(_, o)| *o).collect();
    best_of.sort_by(f32::total_cmp);
    others.sort_by(f32::total_cmp);
    let mut cands: Vec<f32> = pairs.iter().flat_map(|(k, o)| [*k, *o, k.max(*o)]).collect();
    cands.sort_by(f32::total_cmp);
    cands.dedup();
    let n = pairs.len() as f64 * 2.0;
    let mut best = (f64::NEG_INFINITY, 0.0);
    for t in cands.iter().map(|c| *c + 1e-6).chain([f32::MIN]) {
        let found = best_of.len() - best_of.partition_point(|&m| m < t);
        let new = others.partition_point(|&o| o < t);
        let acc = (found + new) as f64 / n;
        if acc > best.1 || best.0 == f64::NEG_INFINITY {
            best = (t as f64, acc);
        }
    }
    Some(best)
}

/// `(known, other)` best similarities of each labelled row of `rows` (exact, in memory: one
/// pass of the dot-product kernels over all rows of `all`, the set's rows, per query).
fn known_other(set: &EmbeddingSet, all: &InMemory, rows: &[usize]) -> Vec<(f32, f32)> {
    let mut out = Vec::new();
    for &q in rows {
        let Some(lq) = &set.labels[q] else { continue };
        let (mut known, mut other) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for (g, s) in all.similarities(set.row(q)).into_iter().enumerate() {
            if g == q {
                continue;
            }
            if set.labels[g].as_ref() == Some(lq) {
                known = known.max(s);
            } else {
                other = other.max(s);
            }
        }
        if known.is_finite() && other.is_finite() {
            out.push((known, other));
        }
    }
    out
}

/// Distinct individuals in the order of their first hit with their best similarity,
/// `new_individual` inserted before the first whose best similarity is under the threshold,
/// cut at `n`. (With query expansion the ranking is the expanded query's while similarities are
/// the photo's own, so a later hit of an individual can be its best.)
pub fn individuals(hits: &[Hit], threshold: Option<f64>, n: usize) -> Vec<(String, f32)> {
    let mut out: Vec<(String, f32)> = lake::vector::by_individual(hits.iter().map(|h| (h.individual_id.as_deref(), h.similarity())))
        .into_iter()
        .map(|(i, s, _)| (i, s))
        .collect();
    if let Some(t) = threshold {
        let at = out.iter().position(|(_, s)| (*s as f64) < t).unwrap_or(out.len());
        out.insert(at, (NEW_INDIVIDUAL.to_string(), t as f32));
    }
    out.truncate(n);
    out
}

/// Rows of table `proposals` for `proposed` (query row, its individuals best first).
fn proposal_rows(set: &EmbeddingSet, proposed: &[(usize, Vec<(String, f32)>)], run_id: &str) -> Result<RecordBatch> {
    let n: usize = proposed.iter().map(|(_, p)| p.len()).sum();
    let (mut photo, mut rank, mut ind, mut sim) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for (q, inds) in proposed {
        for (r, (i, s)) in inds.iter().enumerate() {
            photo.push(set.photo_ids[*q].as_str());
            rank.push(r as i32 + 1);
            ind.push(i.as_str());
            sim.push(*s);
        }
    }
    Ok(RecordBatch::try_new(
        Catalog::builtin("proposals"),
        vec![
            Arc::new(StringArray::from(photo)),
            Arc::new(Int32Array::from(rank)),
            Arc::new(StringArray::from(ind)),
            Arc::new(Float32Array::from(sim)),
            Arc::new(StringArray::from(vec![set.model_id.as_str(); n])),
            Arc::new(StringArray::from(vec![run_id; n])),
        ],
    )?)
}

impl SubmitStage {
    pub fn parse(k: &mut Keys, ctx: &Context) -> Option<SubmitStage> {
        let mut ok = true;
        let queries = k.choice("queries", QuerySet::All);
        ok &= queries.is_some();
        let queries = queries.unwrap_or(QuerySet::All);
        let csv = match k.str("csv") {
            Some(c) => match ctx.location(&c) {
                Ok(u) => Some(u),
                Err(e) => {
                    k.error("csv", e.to_string());
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let threshold = match k.node("new_individual_threshold").map(|n| n.val.clone()) {
            None => None,
            Some(Val::Str(s)) if s == "auto" => None,
            Some(Val::Float(f)) if (-1.0..=1.0).contains(&f) => Some(f),
            Some(Val::Int(i)) if (-1..=1).contains(&i) => Some(i as f64),
            Some(_) => {
                k.error("new_individual_threshold", "must be \"auto\" or a cosine similarity in -1..1");
                ok = false;
                None
            }
        };
        let s = SubmitStage {
            embeddings: k.str("embeddings").unwrap_or_else(|| "embeddings".into()),
            splits: k.str("splits"),
            queries,
            k: k.int("k", 1, 1000).unwrap_or(20) as usize,
            csv,
            individuals: k.int("individuals", 1, 100).unwrap_or(5) as usize,
            threshold,
            search: SearchOverrides {
                nprobes: k.int("nprobes", 1, 100_000).map(|n| n as usize),
                // 0: no re-ranking (IVF_HNSW_SQ's own distances are close enough, and cheaper).
                refine: k.int("refine", 0, 1000).map(|n| n as u32),
                ef: k.int("ef", 1, 100_000).map(|n| n as usize),
            },
            concurrency: k.int("concurrency", 1, 256).unwrap_or(8) as usize,
            output: k.str("output").unwrap_or_else(|| "submissions".into()),
            proposals: k.str("proposals").unwrap_or_else(|| "proposals".into()),
            query_expansion: k.int("query_expansion", 0, 100).unwrap_or(0) as usize,
            qe_alpha: k.float("qe_alpha", 0.0, 100.0).unwrap_or(3.0) as f32,
            geo: crate::shared::geo_options(k),
        };
        if s.queries.needs_splits() && s.splits.is_none() {
            k.error("queries", format!("queries = \"{}\" needs `splits` (the train stage's table)", s.queries));
            ok = false;
        }
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        ins.need(rep, &mut reads, &self.embeddings, &["photo_id", "uri", "individual_id", "embedding"]);
        if let Some(s) = &self.splits {
            ins.need(rep, &mut reads, s, &["uri", "split"]);
        }
        Checked {
            reads,
            writes: vec![(self.output.clone(), Catalog::builtin("submissions")), (self.proposals.clone(), Catalog::builtin("proposals"))],
            ..Default::default()
        }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let set = Arc::new(read_embeddings(&ctx.lake, &self.embeddings).await?);
        if set.len() < 2 {
            return Err(Error::Other(format!("table `{}` has {} embeddings: nothing to search", self.embeddings, set.len())));
        }
        // The rows packed for exact search: the threshold fit, and the queries without an index.
        let memory = Arc::new(InMemory::new(set.clone()));
        let splits = match &self.splits {
            Some(t) => read_splits(&ctx.lake, t).await?,
            None => HashMap::new(),
        };
        let split_of = |i: usize| splits.get(&set.uris[i]).map(String::as_str).unwrap_or("");
        let rows: Vec<usize> = (0..set.len())
            .filter(|&i| self.queries.holds(split_of(i), set.labels[i].is_some()))
            .collect();
        if rows.is_empty() {
            return Err(Error::Other(format!("no photo of `{}` is in query set `{}`", self.embeddings, self.queries)));
        }
        // The new-individual threshold, fitted on held-out photos (or all labelled ones).
        let (threshold, fitted) = match self.threshold {
            Some(t) => (Some(t), String::from("given")),
            None => {
                let val: Vec<usize> = (0..set.len()).filter(|&i| split_of(i).starts_with("val")).collect();
                let basis = if val.is_empty() { (0..set.len()).collect::<Vec<_>>() } else { val };
                let (s2, m2) = (set.clone(), memory.clone());
                let pairs = tokio::task::spawn_blocking(move || known_other(&s2, &m2, &basis))
                    .await
                    .map_err(|e| Error::Other(format!("threshold fit panicked: {e}")))?;
                match fit_threshold(&pairs) {
                    Some((t, acc)) => (Some(t), format!("fitted on {} held-out photos, {:.0} % right", pairs.len(), acc * 100.0)),
                    None => (None, String::from("not fitted: no labelled query with a match")),
                }
            }
        };

        let ds = Arc::new(ctx.lake.open(&self.embeddings).await?.ok_or_else(|| Error::Other(format!("table `{}` does not exist", self.embeddings)))?);
        // Through the index when there is one; otherwise exactly, over the embeddings already
        // in memory (Lance's exact scan per query would cost 30× more: benches/vector.rs).
        let src = Source::for_serving(ds.clone(), &self.embeddings, &self.search, Some(memory)).await?;
        ctx.progress.set_length(rows.len() as u64);
        ctx.progress.set_message("queries");
        let k = self.k;
        let expansion = vector::Expansion { k: self.query_expansion, alpha: self.qe_alpha };
        // Geometric re-ranking: every photo described once, each query's first candidates
        // verified against it (off the async threads: RANSAC is CPU work).
        let geo = if self.geo.k > 0 {
            ctx.progress.set_message(format!("local features of {} photos", set.len()));
            let crops = answer::local::model_crops(&ctx.lake, &set.model_id).await?;
            let f = answer::local::local_features(&ctx.lake, &set.photo_ids, &set.uris, &crops, self.geo).await?;
            if f.unreadable == set.len() {
                return Err(Error::Other(format!(
                    "geometric re-ranking: none of the {} photos of `{}` could be read ({})",
                    set.len(),
                    self.embeddings,
                    f.first_error.unwrap_or_default()
                )));
            }
            let row_of: HashMap<String, usize> = set.uris.iter().enumerate().map(|(i, u)| (u.clone(), i)).collect();
            Some(Arc::new((f, row_of)))
        } else {
            None
        };
        let geo_note = geo.as_ref().map(|g| {
            let f = &g.0;
            format!(
                ", first {} re-ranked geometrically (local features of {} photos, {} cropped, in {:.1} s{})",
                self.geo.k,
                f.rows.len() - f.unreadable,
                f.cropped,
                f.seconds,
                if f.unreadable > 0 { format!(", {} unreadable, first: {}", f.unreadable, f.first_error.clone().unwrap_or_default()) } else { String::new() }
            )
        });
        ctx.progress.set_message("queries");
        let mut answers = futures::stream::iter(rows.iter().copied())
            .map(|q| {
                let src = src.clone();
                let set = set.clone();
                let geo = geo.clone();
                async move {
                    let hits = vector::similar(&src, set.row(q), k, expansion, Some(&set.uris[q])).await?;
                    let hits = match geo {
                        Some(g) => tokio::task::spawn_blocking(move || {
                            let (f, row_of) = (&g.0, &g.1);
                            answer::local::rerank(hits, &f.options, Hit::similarity, |h: &Hit| row_of.get(&h.uri).map_or(0, |&r| f.inliers(q, r)))
                                .into_iter()
                                .map(|(h, _)| h)
                                .collect()
                        })
                        .await
                        .map_err(|e| Error::Other(format!("geometric re-ranking panicked: {e}")))?,
                        None => hits,
                    };
                    Ok::<_, Error>((q, hits))
                }
            })
            .buffered(self.concurrency);
        let mut sink = ctx.sink(&self.output, Catalog::builtin("submissions"), WriteKind::Overwrite).await?;
        let mut proposals = ctx.sink(&self.proposals, Catalog::builtin("proposals"), WriteKind::Overwrite).await?;
        let mut proposed: Vec<(usize, Vec<(String, f32)>)> = Vec::new();
        // The csv crate quotes what needs it (an id with a comma, a quote, a line break); inside
        // a field, ids are separated by spaces, so a space inside an id is written %20.
        let mut csv_text = csv::Writer::from_writer(Vec::new());
        let mut ind_text = csv::Writer::from_writer(Vec::new());
        let cerr = |e: csv::Error| Error::Other(format!("writing the submission CSV: {e}"));
        csv_text.write_record(["photo", "neighbours"]).map_err(cerr)?;
        ind_text.write_record(["photo", "individuals"]).map_err(cerr)?;
        let mut rows_out = 0u64;
        let mut short = 0usize;
        let mut buf: Vec<(usize, Vec<Hit>)> = Vec::new();
        while let Some(r) = answers.next().await {
            let (q, hits) = r?;
            if hits.len() < k {
                short += 1;
            }
            let neighbours = hits.iter().map(|h| h.photo_id.replace(' ', "%20")).collect::<Vec<_>>().join(" ");
            csv_text.write_record([set.photo_ids[q].as_str(), &neighbours]).map_err(cerr)?;
            let inds = individuals(&hits, threshold, self.individuals);
            let text = inds.iter().map(|(i, _)| i.replace(' ', "%20")).collect::<Vec<_>>().join(" ");
            ind_text.write_record([set.photo_ids[q].as_str(), &text]).map_err(cerr)?;
            proposed.push((q, inds));
            buf.push((q, hits));
            ctx.progress.inc(1);
            if buf.len() >= 256 {
                rows_out += self.send(&mut sink, &set, &std::mem::take(&mut buf), &ctx.run_id).await?;
                proposals.send(proposal_rows(&set, &std::mem::take(&mut proposed), &ctx.run_id)?).await?;
            }
        }
        rows_out += self.send(&mut sink, &set, &buf, &ctx.run_id).await?;
        proposals.send(proposal_rows(&set, &proposed, &ctx.run_id)?).await?;
        let committed = sink.finish().await?;
        let proposals_committed = proposals.finish().await?;
        let mut wrote = String::new();
        if let Some(csv) = &self.csv {
            let bytes = |w: csv::Writer<Vec<u8>>| w.into_inner().map_err(|e| Error::Other(format!("writing the submission CSV: {e}")));
            put(csv, bytes(csv_text)?, ctx).await?;
            let ind_uri = match csv.strip_suffix(".csv") {
                Some(stem) => format!("{stem}_individuals.csv"),
                None => format!("{csv}_individuals.csv"),
            };
            put(&ind_uri, bytes(ind_text)?, ctx).await?;
            wrote = format!("; wrote {csv} and {ind_uri}");
        }
        let short = if short > 0 { format!(" ({short} queries have fewer than {k}: the collection is small)") } else { String::new() };
        Ok(Outcome {
            rows_in: set.len() as u64,
            rows_out,
            written: BTreeMap::from([(self.output.clone(), committed.version), (self.proposals.clone(), proposals_committed.version)]),
            summary: format!(
                "top-{k} of {} query photos among {} ({}{}{}){short}; new_individual threshold {}{wrote}",
                rows.len(),
                set.len(),
                src.describe(),
                if expansion.k > 0 { format!(", alpha-query expansion k {} alpha {}", expansion.k, expansion.alpha) } else { String::new() },
                geo_note.unwrap_or_default(),
                threshold.map(|t| format!("{t:.3} ({fitted})")).unwrap_or(fitted),
            ),
            ..Default::default()
        })
    }

    async fn send(&self, sink: &mut lake::TableSink, set: &EmbeddingSet, buf: &[(usize, Vec<Hit>)], run_id: &str) -> Result<u64> {
        let n: usize = buf.iter().map(|(_, h)| h.len()).sum();
        if n == 0 {
            return Ok(0);
        }
        let mut query = Vec::with_capacity(n);
        let mut rank = Vec::with_capacity(n);
        let mut nb = Vec::with_capacity(n);
        let mut nb_ind = Vec::with_capacity(n);
        let mut dist = Vec::with_capacity(n);
        for (q, hits) in buf {
            for (r, h) in hits.iter().enumerate() {
                query.push(set.photo_ids[*q].as_str());
                rank.push(r as i32 + 1);
                nb.push(h.photo_id.as_str());
                nb_ind.push(h.individual_id.as_deref());
                dist.push(h.distance);
            }
        }
        let batch = RecordBatch::try_new(
            Catalog::builtin("submissions"),
            vec![
                Arc::new(StringArray::from(query)),
                Arc::new(Int32Array::from(rank)),
                Arc::new(StringArray::from(nb)),
                Arc::new(StringArray::from(nb_ind)),
                Arc::new(Float32Array::from(dist)),
                Arc::new(StringArray::from(vec![set.model_id.as_str(); n])),
                Arc::new(StringArray::from(vec![run_id; n])),
            ],
        )?;
        sink.send(batch).await?;
        Ok(n as u64)
    }
}

/// Writes `bytes` at `uri` (any object store), replacing what is there.
async fn put(uri: &str, bytes: Vec<u8>, ctx: &StageCtx) -> Result<()> {
    if let Some(path) = uri.strip_prefix("file://") {
        if let Some(parent) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
    }
    let (store, path) = store::open(uri, ctx.lake.options())?;
    store.put(&path, PutPayload::from(bytes)).await.map_err(|e| Error::ObjectStore { uri: uri.into(), source: e })?;
    Ok(())
}


impl Stage for SubmitStage {
    fn describe(&self) -> String {
        format!("submit top-{} for {} photos", self.k, self.queries)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(SubmitStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(SubmitStage::run(self, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(p: &str, ind: Option<&str>, sim: f32) -> Hit {
        Hit { photo_id: p.into(), uri: p.into(), individual_id: ind.map(Into::into), distance: 1.0 - sim }
    }

    #[test]
    fn individuals_are_distinct_in_rank_order_with_new_individual_at_its_threshold() {
        let hits = [hit("a", Some("W1"), 0.9), hit("b", Some("W1"), 0.8), hit("c", None, 0.7), hit("d", Some("W2"), 0.6), hit("e", Some("W3"), 0.4)];
        let got = individuals(&hits, Some(0.5), 5);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["W1", "W2", NEW_INDIVIDUAL, "W3"]);
        let got = individuals(&hits, Some(0.95), 2);
        assert_eq!(got[0].0, NEW_INDIVIDUAL);
        assert_eq!(got.len(), 2);
        assert_eq!(individuals(&hits, None, 5).len(), 3);
    }

    #[test]
    fn an_individual_keeps_its_best_similarity_when_ranks_are_not_by_similarity() {
        // As query expansion leaves them: W1's second hit is its best, and lifts it above the
        // threshold; W2 first appears above W3 although its similarity is lower.
        let hits = [hit("a", Some("W1"), 0.4), hit("b", Some("W2"), 0.3), hit("c", Some("W1"), 0.7), hit("d", Some("W3"), 0.6)];
        let got = individuals(&hits, Some(0.5), 5);
        assert_eq!(got[0], ("W1".to_string(), 0.7));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["W1", NEW_INDIVIDUAL, "W2", "W3"]);
    }

    #[test]
    fn the_threshold_separates_known_from_new() {
        // Known matches are near 0.8, the best other individual near 0.4: any threshold in
        // between answers both situations right.
        let pairs = [(0.8, 0.4), (0.85, 0.35), (0.75, 0.45), (0.9, 0.3)];
        let (t, acc) = fit_threshold(&pairs).unwrap();
        assert!(t > 0.45 && t <= 0.75 + 1e-5, "{t}");
        assert_eq!(acc, 1.0);
        assert!(fit_threshold(&[]).is_none());
    }

    #[test]
    fn the_threshold_sweep_agrees_with_counting_every_pair() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let pairs: Vec<(f32, f32)> = (0..300).map(|_| (rng.random_range(0.2..1.0f32), rng.random_range(0.0..0.8f32))).collect();
        let (t, acc) = fit_threshold(&pairs).unwrap();
        let count = |t: f32| pairs.iter().map(|(k, o)| usize::from(k.max(*o) >= t) + usize::from(*o < t)).sum::<usize>() as f64 / 600.0;
        assert_eq!(acc, count(t as f32));
        let brute = pairs.iter().flat_map(|(k, o)| [*k, *o, k.max(*o)]).map(|c| count(c + 1e-6)).fold(count(f32::MIN), f64::max);
        assert_eq!(acc, brute, "the sweep finds the best threshold");
        assert!(acc > 0.5 && acc < 1.0, "{acc}");
    }
}
