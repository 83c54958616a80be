//! Stage kind `pseudo_label`: unlabelled photos whose nearest labelled photo (cosine similarity
//! of their embeddings) is at least `threshold` similar get that photo's individual, in a table
//! a later `train` stage takes through `extra`.
//!
//! ```toml
//! [stages.pseudo]
//! kind = "pseudo_label"
//! inputs = ["embed"]
//! embeddings = "embeddings"
//! threshold = 0.9
//! output = "pseudo_labels"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;

use lake::tables::{EmbeddingSet, read_embeddings};
use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Loc, Reporter};
use engine::StageCtx;
use lake::{Catalog, WriteKind};
use crate::{Error, Result};

const KEYS: &[&str] = &["embeddings", "threshold", "output"];

#[derive(Debug, Clone)]
pub struct PseudoLabelStage {
    pub embeddings: String,
    pub threshold: f64,
    pub output: String,
}

/// For each unlabelled photo: `(row, nearest labelled row, similarity)` when the similarity is
/// at least `threshold`.
pub fn pseudo_labels(set: &EmbeddingSet, threshold: f64) -> Vec<(usize, usize, f64)> {
    let labelled: Vec<usize> = (0..set.len()).filter(|&i| set.labels[i].is_some()).collect();
    let values: Vec<f32> = labelled.iter().flat_map(|&l| set.row(l).iter().copied()).collect();
    let gallery = lake::metrics::UnitRows::new(&values, set.dim);
    let mut out = Vec::new();
    for u in (0..set.len()).filter(|&i| set.labels[i].is_none()) {
        let best = gallery.similarities(set.row(u)).into_iter().enumerate().max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        if let Some((j, sim)) = best {
            if sim as f64 >= threshold {
                out.push((u, labelled[j], sim as f64));
            }
        }
    }
    out
}

impl PseudoLabelStage {
    pub fn parse(k: &mut Keys) -> Option<PseudoLabelStage> {
        let s = PseudoLabelStage {
            embeddings: k.str("embeddings").unwrap_or_else(|| "embeddings".into()),
            threshold: k.float("threshold", -1.0, 1.0).unwrap_or(0.9),
            output: k.str("output").unwrap_or_else(|| "pseudo_labels".into()),
        };
        engine::stage::finish_keys(k, KEYS);
        Some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        Inputs { stage, at, visible, broken }.need(rep, &mut reads, &self.embeddings, &["photo_id", "uri", "individual_id", "embedding"]);
        Checked { reads, writes: vec![(self.output.clone(), Catalog::builtin("pseudo_labels"))], ..Default::default() }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let set = Arc::new(read_embeddings(&ctx.lake, &self.embeddings).await?);
        let threshold = self.threshold;
        let s2 = set.clone();
        let found = tokio::task::spawn_blocking(move || pseudo_labels(&s2, threshold))
            .await
            .map_err(|e| Error::Other(format!("pseudo-labelling panicked: {e}")))?;
        let unlabelled = set.labels.iter().filter(|l| l.is_none()).count();
        let n = found.len();
        let batch = RecordBatch::try_new(
            Catalog::builtin("pseudo_labels"),
            vec![
                Arc::new(StringArray::from_iter_values(found.iter().map(|(u, _, _)| set.photo_ids[*u].as_str()))),
                Arc::new(StringArray::from_iter_values(found.iter().map(|(u, _, _)| set.uris[*u].as_str()))),
                Arc::new(StringArray::from_iter_values(found.iter().map(|(_, l, _)| set.labels[*l].as_deref().unwrap_or("")))),
                Arc::new(Float64Array::from_iter_values(found.iter().map(|(_, _, s)| *s))),
                Arc::new(StringArray::from_iter_values(found.iter().map(|(_, l, _)| set.photo_ids[*l].as_str()))),
                Arc::new(StringArray::from(vec![set.model_id.as_str(); n])),
                Arc::new(StringArray::from(vec![ctx.run_id.as_str(); n])),
            ],
        )?;
        let mut sink = ctx.sink(&self.output, Catalog::builtin("pseudo_labels"), WriteKind::Overwrite).await?;
        sink.send(batch).await?;
        let committed = sink.finish().await?;
        Ok(Outcome {
            rows_in: set.len() as u64,
            rows_out: n as u64,
            written: BTreeMap::from([(self.output.clone(), committed.version)]),
            summary: format!("{n} of {unlabelled} unlabelled photos labelled at similarity >= {}", self.threshold),
            ..Default::default()
        })
    }
}


impl Stage for PseudoLabelStage {
    fn describe(&self) -> String {
        format!("pseudo_label {} at {}", self.embeddings, self.threshold)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(PseudoLabelStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(PseudoLabelStage::run(self, ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_confident_unlabelled_photos_are_labelled() {
        let set = EmbeddingSet {
            model_id: "m".into(),
            photo_ids: vec!["a".into(), "b".into(), "u1".into(), "u2".into()],
            uris: vec!["a".into(), "b".into(), "u1".into(), "u2".into()],
            labels: vec![Some("A".into()), Some("B".into()), None, None],
            // u1 is nearly a (cos 0.995), u2 sits between a and b (cos 0.707 to each).
            values: vec![1.0, 0.0, 0.0, 1.0, 0.995, 0.0998, 0.7071, 0.7071],
            dim: 2,
        };
        let got = pseudo_labels(&set, 0.9);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (2, 0));
        assert!((got[0].2 - 0.995 / (0.995f64.powi(2) + 0.0998f64.powi(2)).sqrt()).abs() < 1e-5);
        assert_eq!(pseudo_labels(&set, 0.5).len(), 2);
    }
}
