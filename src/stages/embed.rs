//! Stage kind `embed`: embeds every photo of a table with a trained model, in batches, with
//! optional flip test-time augmentation, and writes unit-length vectors to a table (default
//! `embeddings`). It streams: photos are read, decoded, embedded and written a chunk at a time,
//! so memory does not grow with the table.
//!
//! Incremental: when the table already holds this model's embeddings (same model id and TTA),
//! only photos it lacks are embedded and appended, and rows of photos no longer in the input
//! are deleted — the nightly re-ingest embeds the night's new photos, not the collection, and a
//! vector index on the table takes the appended rows as a delta.
//!
//! ```toml
//! [stages.embed]
//! kind = "embed"
//! inputs = ["train", "ingest"]
//! model = "train"          # the table a train stage wrote (it names the model), or a model id
//! table = "images"         # photos to embed: every photo of the collection
//! flip_tta = true
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, SchemaRef};
use futures::TryStreamExt;

use super::train::{ModelDir, model_dir};
use super::{Checked, Inputs, Outcome};
use crate::config::{Keys, Loc, Reporter};
use crate::dag::StageCtx;
use crate::lake::{Catalog, Lake, WriteKind};
use crate::model::data::{Loader, Photo};
use crate::model::net::{Net, NetSpec};
use crate::model::train::{self, TrainConfig, embed_photos};
use crate::{Error, Result};

const KEYS: &[&str] = &["model", "table", "output", "crops", "flip_tta", "batch_size", "chunk", "device", "loader_threads", "prefetch", "channels_last"];

#[derive(Debug, Clone)]
pub struct EmbedStage {
    pub model: String,
    pub table: String,
    pub output: String,
    /// Table of detector boxes to crop with, for a model trained on crops (default: the table
    /// the model was trained with).
    pub crops: Option<String>,
    pub flip_tta: bool,
    pub batch_size: usize,
    /// Photos read, embedded and written at a time.
    pub chunk: usize,
    pub device: String,
    pub loader_threads: usize,
    pub prefetch: usize,
    /// Convolutions in channels-last memory order (faster; same embeddings to float rounding).
    pub channels_last: bool,
}

impl EmbedStage {
    pub fn parse(k: &mut Keys) -> Option<EmbedStage> {
        let model = k.str("model");
        if model.is_none() && !k.has("model") {
            k.missing("model", "the table a train stage wrote, or a model id");
        }
        let device = k.device();
        let ok = model.is_some() && device.is_some();
        let device = device.unwrap_or_default();
        let (loader_threads, prefetch) = k.loader();
        let s = EmbedStage {
            model: model.unwrap_or_default(),
            table: k.str("table").unwrap_or_else(|| "images".into()),
            output: k.str("output").unwrap_or_else(|| "embeddings".into()),
            crops: k.str("crops"),
            flip_tta: k.bool("flip_tta").unwrap_or(true),
            batch_size: k.int("batch_size", 1, 4096).unwrap_or(32) as usize,
            chunk: k.int("chunk", 1, 1_000_000).unwrap_or(1024) as usize,
            device,
            loader_threads,
            prefetch,
            channels_last: k.bool("channels_last").unwrap_or(true),
        };
        super::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        ins.need(rep, &mut reads, &self.table, &["photo_id", "uri", "individual_id"]);
        if let Some(c) = &self.crops {
            ins.need(rep, &mut reads, c, &["photo_id", "detector_id", "x0", "y0", "x1", "y1"]);
        }
        // `model` is a train stage's table when one is visible, else a model id in the lake.
        if let Some(s) = visible.get(&self.model) {
            if s.field_with_name("model_id").is_err() {
                rep.error(at, Some(stage), format!("`model = \"{}\"` names a table without `model_id` (a train stage's table)", self.model));
            }
            reads.push(self.model.clone());
        }
        Checked { reads, writes: vec![(self.output.clone(), Catalog::builtin("embeddings"))], hash_extra: String::new() }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let (model_id, dir) = resolve_model(&ctx.lake, &self.model).await?;
        let (spec, best) = model_files(&dir, &model_id)?;
        let device = train::pick_device(ctx.device.as_deref().unwrap_or(&self.device)).map_err(Error::Other)?;
        let crops = crop_boxes(&ctx.lake, &spec, self.crops.as_deref()).await?;
        let mut uncropped = 0u64;
        let mut net = Net::load(&spec, &best, device).map_err(|e| Error::Other(e.to_string()))?;
        if self.channels_last {
            net.use_channels_last();
        }
        let loader = Arc::new(Loader::new(spec.input_size, self.loader_threads, 0, ctx.lake.options().clone()));
        let ds = ctx.lake.open(&self.table).await?.ok_or_else(|| Error::Other(format!("table `{}` does not exist", self.table)))?;
        let total = ds.count_rows(None).await.map_err(|e| Error::lance(&self.table, e))? as u64;
        ctx.progress.set_length(total);
        ctx.progress.set_message(format!("{model_id}: photos"));
        let tta = if self.flip_tta { "flip" } else { "none" };
        // What the output already holds of this very embedding (model and TTA).
        let have = existing(&ctx.lake, &self.output, &model_id, tta).await?;
        let incremental = have.is_some();
        let have = have.unwrap_or_default();
        let mut seen_uris: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut scan = ds.scan();
        scan.project(&["photo_id", "uri", "individual_id"]).map_err(|e| Error::lance(&self.table, e))?;
        let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance(&self.table, e))?;
        let kind = if incremental { WriteKind::Append } else { WriteKind::Overwrite };
        let mut sink = ctx.lake.sink(&self.output, Catalog::builtin("embeddings"), kind);
        let mut kept = 0u64;
        let mut net = Some(net);
        let mut pending: Vec<Photo> = Vec::new();
        let mut rows = 0u64;
        let mut dim = 0usize;
        loop {
            let next = stream.try_next().await.map_err(|e| Error::lance(&self.table, e))?;
            let done = next.is_none();
            if let Some(b) = next {
                let (pid, uri, lab) = (b.column(0).as_string::<i32>(), b.column(1).as_string::<i32>(), b.column(2).as_string::<i32>());
                for i in 0..b.num_rows() {
                    if incremental {
                        seen_uris.insert(uri.value(i).to_string());
                        if have.contains(uri.value(i)) {
                            kept += 1;
                            ctx.progress.inc(1);
                            continue;
                        }
                    }
                    let crop = crops.get(pid.value(i)).copied();
                    uncropped += u64::from(spec.crop.is_some() && crop.is_none());
                    pending.push(Photo {
                        photo_id: pid.value(i).to_string(),
                        uri: uri.value(i).to_string(),
                        label: lab.is_valid(i).then(|| lab.value(i).to_string()),
                        crop,
                    });
                }
            }
            while pending.len() >= self.chunk || (done && !pending.is_empty()) {
                let take = pending.len().min(self.chunk);
                let chunk: Arc<Vec<Photo>> = Arc::new(pending.drain(..take).collect());
                let m = net.take().expect("model is returned after each chunk");
                let (loader, handle, cancel) = (loader.clone(), tokio::runtime::Handle::current(), ctx.cancel.clone());
                let (batch, prefetch, flip) = (self.batch_size, self.prefetch, self.flip_tta);
                let c2 = chunk.clone();
                let (m, res) = tokio::task::spawn_blocking(move || {
                    let r = embed_photos(&m, &loader, &c2, batch, flip, &handle, prefetch, &|| cancel.is_cancelled());
                    (m, r)
                })
                .await
                .map_err(|e| Error::Other(format!("embedding panicked: {e}")))?;
                net = Some(m);
                let (values, d) = res?;
                dim = d;
                sink.send(embedding_batch(&chunk, &values, d, &model_id, tta, &ctx.run_id)?).await?;
                rows += chunk.len() as u64;
                ctx.progress.inc(chunk.len() as u64);
            }
            if done {
                break;
            }
        }
        let mut version = sink.finish().await?.version;
        // Photos that left the input leave the table.
        let gone: Vec<&String> = if incremental { have.iter().filter(|u| !seen_uris.contains(*u)).collect() } else { Vec::new() };
        if !gone.is_empty() {
            if let Some(mut out) = ctx.lake.open(&self.output).await? {
                for chunk in gone.chunks(1000) {
                    let list = chunk.iter().map(|u| format!("'{}'", u.replace('\'', "''"))).collect::<Vec<_>>().join(", ");
                    out.delete(&format!("uri IN ({list})")).await.map_err(|e| Error::lance(&self.output, e))?;
                }
                version = out.version().version;
            }
        }
        let how = if incremental {
            format!("{rows} new photos embedded, {kept} already embedded, {} removed", gone.len())
        } else {
            format!("{rows} photos embedded")
        };
        let how = if uncropped > 0 { format!("{how} ({uncropped} without a detection, embedded whole)") } else { how };
        Ok(Outcome {
            rows_in: total,
            rows_out: rows,
            written: BTreeMap::from([(self.output.clone(), version)]),
            summary: format!(
                "{how} with {model_id} ({}{})",
                if dim > 0 { format!("{dim}-d") } else { "model unchanged".into() },
                if self.flip_tta { ", flip TTA" } else { "" }
            ),
        })
    }
}

/// `model`: a table with a `model_id` column (a train stage's) or a model id. Returns the id
/// and the model's folder.
pub async fn resolve_model(lake: &Lake, model: &str) -> Result<(String, ModelDir)> {
    let id = match lake.open(model).await? {
        Some(ds) if ds.schema().field("model_id").is_some() => {
            let mut scan = ds.scan();
            scan.project(&["model_id"]).map_err(|e| Error::lance(model, e))?;
            scan.limit(Some(1), None).map_err(|e| Error::lance(model, e))?;
            let batches: Vec<RecordBatch> = scan
                .try_into_stream()
                .await
                .map_err(|e| Error::lance(model, e))?
                .try_collect()
                .await
                .map_err(|e| Error::lance(model, e))?;
            batches
                .iter()
                .find(|b| b.num_rows() > 0)
                .map(|b| b.column(0).as_string::<i32>().value(0).to_string())
                .ok_or_else(|| Error::Other(format!("table `{model}` names no model (it is empty)")))?
        }
        _ => model.to_string(),
    };
    let dir = model_dir(lake, &id).await?;
    Ok((id, dir))
}

/// The network spec and best weights of a trained model's folder.
pub fn model_files(dir: &ModelDir, model_id: &str) -> Result<(NetSpec, PathBuf)> {
    let spec_file = dir.local.join(train::SPEC);
    let text = std::fs::read_to_string(&spec_file).map_err(|e| {
        Error::Other(format!("model `{model_id}`: cannot read {} ({e}); is it a trained model of this lake?", spec_file.display()))
    })?;
    let cfg: TrainConfig =
        serde_json::from_str(&text).map_err(|e| Error::Other(format!("model `{model_id}`: {}: {e}", spec_file.display())))?;
    let best = dir.local.join(train::BEST);
    if !best.is_file() {
        return Err(Error::Other(format!("model `{model_id}`: {} is missing (did its training finish an epoch?)", best.display())));
    }
    Ok((cfg.net, best))
}

/// The crop of every photo the model's detector found, by photo id, margin included; empty for
/// a model that sees whole photos. `table` overrides the table the model was trained with.
pub async fn crop_boxes(lake: &Lake, spec: &NetSpec, table: Option<&str>) -> Result<HashMap<String, [f32; 4]>> {
    let Some(c) = &spec.crop else { return Ok(HashMap::new()) };
    let (_, boxes) = super::detect::read_boxes(lake, table.unwrap_or(&c.table), Some(&c.detector)).await?;
    Ok(boxes.into_iter().map(|(k, b)| (k, crate::vision::expand_box(b, c.margin))).collect())
}

/// URIs in `table` when every row of it is of `model_id` with `tta`; None when the table is
/// missing, empty or of another embedding (then it is rewritten whole).
async fn existing(lake: &Lake, table: &str, model_id: &str, tta: &str) -> Result<Option<std::collections::HashSet<String>>> {
    let Some(ds) = lake.open(table).await? else { return Ok(None) };
    if ds.schema().field("tta").is_none() {
        return Ok(None);
    }
    let mut scan = ds.scan();
    scan.project(&["uri", "model_id", "tta"]).map_err(|e| Error::lance(table, e))?;
    let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
    let mut uris = std::collections::HashSet::new();
    while let Some(b) = stream.try_next().await.map_err(|e| Error::lance(table, e))? {
        let (u, m, t) = (b.column(0).as_string::<i32>(), b.column(1).as_string::<i32>(), b.column(2).as_string::<i32>());
        for i in 0..b.num_rows() {
            if m.value(i) != model_id || t.value(i) != tta {
                return Ok(None);
            }
            uris.insert(u.value(i).to_string());
        }
    }
    Ok((!uris.is_empty()).then_some(uris))
}

/// One chunk of rows for the `embeddings` table.
pub fn embedding_batch(photos: &[Photo], values: &[f32], dim: usize, model_id: &str, tta: &str, run_id: &str) -> Result<RecordBatch> {
    let n = photos.len();
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let vectors = FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(values.to_vec())), None)?;
    let schema = Catalog::builtin("embeddings");
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| if f.name() == "embedding" { Field::new("embedding", vectors.data_type().clone(), false) } else { f.as_ref().clone() })
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        vec![
            Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.photo_id.as_str()))),
            Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.uri.as_str()))),
            Arc::new(StringArray::from(photos.iter().map(|p| p.label.as_deref()).collect::<Vec<_>>())),
            Arc::new(StringArray::from(vec![model_id; n])),
            Arc::new(StringArray::from(vec![tta; n])),
            Arc::new(vectors),
            Arc::new(StringArray::from(vec![run_id; n])),
        ],
    )?)
}
