//! Stage kind `ensemble`: a meta-embedding made of several models' embeddings of the same
//! photos — each L2-normalised, multiplied by its weight, concatenated and normalised again —
//! written as an embeddings table of its own model id (and registered in `models`).
//! Concatenating normalised embeddings makes the ensemble's cosine similarity the weighted
//! mean of the members' similarities (up to the final normalisation).
//!
//! ```toml
//! [stages.ensemble]
//! kind = "ensemble"
//! inputs = ["embed_mobilenet", "embed_efficientnet"]
//! members = ["emb_mobilenet", "emb_efficientnet"]   # embeddings tables
//! weights = [1.0, 1.0]
//! output = "embeddings"
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Float64Array, Int32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::SchemaRef;

use model::data::embedding_batch;
use lake::tables::read_embeddings;
use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Loc, Reporter, Val};
use engine::StageCtx;
use lake::{Catalog, WriteKind};
use model::data::Photo;
use crate::{Error, Result};

const KEYS: &[&str] = &["members", "weights", "output", "model"];

#[derive(Debug, Clone)]
pub struct EnsembleStage {
    pub members: Vec<String>,
    pub weights: Vec<f64>,
    pub output: String,
    pub model: Option<String>,
}

impl EnsembleStage {
    pub fn parse(k: &mut Keys) -> Option<EnsembleStage> {
        let members = k.str_list("members").unwrap_or_default();
        let mut ok = true;
        if members.len() < 2 {
            k.error("members", "an ensemble needs at least two embeddings tables in `members`");
            ok = false;
        }
        let weights = match k.node("weights") {
            None => vec![1.0; members.len()],
            Some(n) => match &n.val {
                Val::Array(items) => items
                    .iter()
                    .filter_map(|it| match it.val {
                        Val::Float(f) if f >= 0.0 => Some(f),
                        Val::Int(i) if i >= 0 => Some(i as f64),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            },
        };
        if weights.len() != members.len() || weights.iter().all(|w| *w == 0.0) {
            k.error("weights", format!("`weights` must be {} non-negative numbers, not all zero, one per member", members.len()));
            ok = false;
        }
        let s = EnsembleStage {
            members,
            weights,
            output: k.str("output").unwrap_or_else(|| "embeddings".into()),
            model: k.str("model"),
        };
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        for m in &self.members {
            ins.need(rep, &mut reads, m, &["photo_id", "uri", "embedding"]);
        }
        Checked {
            reads,
            writes: vec![(self.output.clone(), Catalog::builtin("embeddings"))],
            models: vec![self.model.clone().unwrap_or_else(|| stage.to_string())],
            ..Default::default()
        }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let mut sets = Vec::new();
        for m in &self.members {
            let s = read_embeddings(&ctx.lake, m).await?;
            if s.is_empty() {
                return Err(Error::Other(format!("member `{m}` has no embeddings")));
            }
            sets.push(s);
        }
        // Photos every member embedded, in the first member's order.
        let index: Vec<HashMap<&str, usize>> =
            sets.iter().map(|s| s.uris.iter().enumerate().map(|(i, u)| (u.as_str(), i)).collect()).collect();
        let first = &sets[0];
        let common: Vec<usize> = (0..first.len()).filter(|&i| index.iter().all(|ix| ix.contains_key(first.uris[i].as_str()))).collect();
        let missing = first.len() - common.len();
        if common.is_empty() {
            return Err(Error::Other(format!("the members {} share no photo", self.members.join(", "))));
        }
        let dim: usize = sets.iter().map(|s| s.dim).sum();
        let ids: Vec<&str> = sets.iter().map(|s| s.model_id.as_str()).collect();
        let mut h = blake3::Hasher::new();
        h.update(format!("{ids:?}{:?}", self.weights).as_bytes());
        let model_id = format!("{}-{}", self.model.clone().unwrap_or_else(|| ctx.name.clone()), &h.finalize().to_hex()[..12]);
        let mut sink = ctx.sink(&self.output, Catalog::builtin("embeddings"), WriteKind::Overwrite).await?;
        for rows in common.chunks(4096) {
            let mut values = Vec::with_capacity(rows.len() * dim);
            let mut photos = Vec::with_capacity(rows.len());
            for &i in rows {
                let start = values.len();
                for (s, (ix, w)) in sets.iter().zip(index.iter().zip(&self.weights)) {
                    let v = s.row(ix[first.uris[i].as_str()]);
                    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    values.extend(v.iter().map(|x| x / n * *w as f32));
                }
                let n = values[start..].iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                values[start..].iter_mut().for_each(|x| *x /= n);
                photos.push(Photo { photo_id: first.photo_ids[i].clone(), uri: first.uris[i].clone(), label: first.labels[i].clone(), crop: None, content_hash: None });
            }
            sink.send(embedding_batch(&photos, &values, dim, &model_id, "none", &ctx.run_id, &HashMap::new())?).await?;
        }
        let committed = sink.finish().await?;
        let config = serde_json::json!({ "members": self.members, "member_models": ids, "weights": self.weights }).to_string();
        let registry = RecordBatch::try_new(
            Catalog::builtin("models"),
            vec![
                Arc::new(StringArray::from(vec![model_id.as_str()])),
                Arc::new(StringArray::from(vec!["ensemble"])),
                Arc::new(StringArray::from(vec![ctx.name.as_str()])),
                Arc::new(StringArray::from(vec![ctx.run_id.as_str()])),
                Arc::new(StringArray::from(vec![ids.join("+")])),
                Arc::new(Int32Array::from(vec![dim as i32])),
                Arc::new(Int32Array::from(vec![None::<i32>])),
                Arc::new(StringArray::from(vec![config])),
                Arc::new(StringArray::from(vec!["[]"])),
                Arc::new(Int32Array::from(vec![None::<i32>])),
                Arc::new(Float64Array::from(vec![None::<f64>])),
                Arc::new(StringArray::from(vec![None::<&str>])),
                Arc::new(TimestampMicrosecondArray::from(vec![chrono::Utc::now().timestamp_micros()]).with_timezone("UTC")),
            ],
        )?;
        ctx.register_model(registry).await?;
        let dropped = if missing > 0 { format!(", {missing} photos of `{}` missing from another member left out", self.members[0]) } else { String::new() };
        Ok(Outcome {
            rows_in: sets.iter().map(|s| s.len() as u64).sum(),
            rows_out: common.len() as u64,
            written: BTreeMap::from([(self.output.clone(), committed.version)]),
            summary: format!("{model_id}: {} photos, {dim}-d from {}{dropped}", common.len(), ids.join(" + ")),
            ..Default::default()
        })
    }
}

impl Stage for EnsembleStage {
    fn describe(&self) -> String {
        format!("ensemble {}", self.members.join(" + "))
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(EnsembleStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(EnsembleStage::run(self, ctx))
    }
}
