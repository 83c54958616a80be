//! Stage kind `detect`: trains the one-class subject detector ([`model::detect`]) on a
//! file of boxes (~300 are enough) and runs it over every photo of a table, writing one row per
//! photo to `detections`: the best box and the score that there is a subject at all.
//!
//! The cleaning SQL drops photos whose score is under a threshold (no fluke in the frame), and
//! `train` / `embed` with `crops = "detections"` cut each photo's box (plus a margin) out of it,
//! so the embedding model sees the fluke at a useful size instead of a thin strip of a
//! 2400×1000 seascape.
//!
//! The detector is named by a hash of its configuration and its training boxes; its files
//! (`detector.safetensors`, `detector.json` with the validation IoU) live under
//! `<lake>/models/<detector id>/`, and a later run with the same boxes reuses it.
//!
//! ```toml
//! [stages.detect]
//! kind = "detect"
//! inputs = ["ingest"]
//! table = "images"                                  # photo_id, uri, width, height
//! boxes = "file://../data/demo-lake/boxes.csv"      # photo,x0,y0,x1,y1 in displayed pixels
//! input_size = 384
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Device as DeviceChoice, Keys, Loc, Reporter};
use engine::StageCtx;
use lake::tables::Columns;
use lake::{Catalog, WriteKind, store};
use model::data::{Loader, Photo, prefetch};
use model::detect::{self, Detection, Detector, DetectorInfo, DetectorSpec, HeadTrainConfig, INFO, WEIGHTS};
use model::net::to_input;
use model::train;
use crate::{Error, Result};

const KEYS: &[&str] = &[
    "table", "boxes", "boxes_photo_column", "output", "model", "backbone", "input_size", "hidden", "epochs", "batch_size",
    "lr", "weight_decay", "val_fraction", "seed", "device", "loader_threads", "prefetch", "detector", "pseudo_photos", "pseudo_min_peak", "pseudo_level",
    "min_drawn_boxes",
];

/// Files of a detector's folder.

#[derive(Debug, Clone)]
pub struct DetectStage {
    pub table: String,
    /// Resolved location of the boxes file (CSV: photo, x0, y0, x1, y1 in displayed pixels);
    /// empty with [`Self::detector`], and when no boxes are given: then the detector trains on
    /// pseudo-boxes ([`detect::pseudo_boxes`]) of a sample of the table's photos.
    pub boxes: String,
    /// Pseudo-boxes: how many photos (a seeded sample of the table) to find them on and train on.
    pub pseudo_photos: usize,
    /// Pseudo-boxes: a photo whose strongest cell projects under this share of the median
    /// photo's gets no box (no shared subject in it).
    pub pseudo_min_peak: f32,
    /// Pseudo-boxes: the share of a photo's peak projection its box is traced at.
    pub pseudo_level: f32,
    /// Without a boxes file: how many boxes drawn on the review page (table `boxes`) the
    /// detector needs to train on them instead of on pseudo-boxes.
    pub min_drawn_boxes: usize,
    /// A detector trained before, instead of boxes to train one: `current:NAME` (the detector
    /// the model promoted last under NAME was trained on) or a detector id. The nightly pipeline
    /// uses it so that new boxes (a new detector in the training pipeline) cannot leave the
    /// current model without the crops it was trained on.
    pub detector: Option<String>,
    pub boxes_photo_column: String,
    pub output: String,
    pub model: Option<String>,
    pub spec: DetectorSpec,
    pub train: HeadTrainConfig,
    pub val_fraction: f64,
    pub device: DeviceChoice,
    pub loader_threads: usize,
    pub prefetch: usize,
}


impl DetectStage {
    pub fn parse(k: &mut Keys, ctx: &Context) -> Option<DetectStage> {
        let mut ok = true;
        let detector = k.str("detector");
        if detector.is_some() && k.has("boxes") {
            k.error("detector", "set `boxes` (train a detector on them) or `detector` (use one trained before), not both".to_string());
            ok = false;
        }
        let boxes = match k.str("boxes") {
            _ if detector.is_some() => String::new(),
            Some(b) => match ctx.location(&b) {
                Ok(u) => u,
                Err(e) => {
                    k.error("boxes", e.to_string());
                    ok = false;
                    String::new()
                }
            },
            // No boxes: the detector trains on pseudo-boxes (a present but malformed `boxes` was
            // reported by `str`).
            None => {
                ok &= !k.has("boxes");
                String::new()
            }
        };
        let backbone = k.str("backbone").unwrap_or_else(|| "mobilenet_v2".into());
        if backbone.parse::<model::backbone::Arch>().is_err() {
            let names: Vec<&str> = model::backbone::Arch::ALL.iter().map(|a| a.name()).collect();
            k.error("backbone", format!("unknown backbone `{backbone}` (known: {})", names.join(", ")));
            ok = false;
        }
        let device = k.device();
        ok &= device.is_some();
        let device = device.unwrap_or_default();
        let (loader_threads, prefetch) = k.loader();
        let s = DetectStage {
            table: k.str("table").unwrap_or_else(|| "images".into()),
            boxes,
            detector,
            boxes_photo_column: k.str("boxes_photo_column").unwrap_or_else(|| "photo".into()),
            output: k.str("output").unwrap_or_else(|| "detections".into()),
            model: k.str("model"),
            spec: DetectorSpec {
                backbone,
                input_size: k.int("input_size", 64, 2048).unwrap_or(384) as u32,
                hidden: k.int("hidden", 4, 4096).unwrap_or(64),
            },
            train: HeadTrainConfig {
                epochs: k.int("epochs", 1, 100_000).unwrap_or(80) as u32,
                batch_size: k.int("batch_size", 1, 4096).unwrap_or(32) as usize,
                lr: k.float("lr", 1e-8, 10.0).unwrap_or(2e-3),
                weight_decay: k.float("weight_decay", 0.0, 1.0).unwrap_or(1e-4),
                seed: k.int("seed", 0, i64::MAX).unwrap_or(42) as u64,
            },
            val_fraction: k.float("val_fraction", 0.0, 0.9).unwrap_or(0.2),
            pseudo_photos: k.int("pseudo_photos", 8, 1_000_000).unwrap_or(300) as usize,
            pseudo_min_peak: k.float("pseudo_min_peak", 0.0, 1.0).unwrap_or(0.5) as f32,
            pseudo_level: k.float("pseudo_level", 0.0, 0.95).unwrap_or(PSEUDO_LEVEL) as f32,
            min_drawn_boxes: k.int("min_drawn_boxes", 1, 1_000_000).unwrap_or(30) as usize,
            device,
            loader_threads,
            prefetch,
        };
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        ins.need(rep, &mut reads, &self.table, &["photo_id", "uri", "width", "height"]);
        Checked {
            reads,
            writes: vec![(self.output.clone(), Catalog::builtin("detections"))],
            // The options are hashed as written; the boxes file by its content (the fingerprint).
            hash_extra: String::new(),
            // A stage that uses a detector trained before makes none.
            models: if self.detector.is_some() { Vec::new() } else { vec![self.model.clone().unwrap_or_else(|| stage.to_string())] },
        }
    }

    /// Reads the boxes file and the boxes drawn on the review page; their content is the stage's
    /// outside input. With `detector`, the input is the detector it names now (a promotion can
    /// change it).
    pub async fn prepare(&self, ctx: &StageCtx) -> Result<Prepared> {
        if let Some(d) = &self.detector {
            let id = resolve_detector(&ctx.lake, d).await?;
            return Ok(Prepared { fingerprint: Some(id.clone()), state: Some(Box::new(Pinned(id))) });
        }
        let drawn = lake::boxes::latest(&ctx.lake).await?;
        let drawn_digest = (!drawn.is_empty()).then(|| lake::boxes::digest(&drawn));
        if self.boxes.is_empty() {
            // Pseudo-boxes (or drawn ones): nothing read from outside the lake.
            return Ok(Prepared { fingerprint: drawn_digest, state: None });
        }
        let bytes = fetch(&self.boxes).await?;
        let mut fingerprint = blake3::hash(&bytes).to_hex().to_string();
        if let Some(d) = drawn_digest {
            fingerprint = format!("{fingerprint}+drawn:{d}");
        }
        Ok(Prepared { fingerprint: Some(fingerprint), state: Some(Box::new(bytes)) })
    }

    /// What a run starts from: its input (with content hashes when the table has them), the
    /// device and the photo loader.
    fn start(&self, ctx: &StageCtx) -> Result<(Input, Device, Arc<Loader>)> {
        let keyed = ctx.lake.catalog().get(&self.table).is_some_and(|s| s.field_with_name("content_hash").is_ok());
        let columns: &[&str] = if keyed { &["photo_id", "uri", "width", "height", "content_hash"] } else { &["photo_id", "uri", "width", "height"] };
        let input = Input { rows: ctx.read(&self.table, columns), photos: Vec::new(), hash_of: HashMap::new(), keyed };
        let device = train::pick_device(ctx.device.unwrap_or(self.device).as_str()).map_err(Error::Other)?;
        let loader = Arc::new(Loader::new(self.spec.input_size, self.loader_threads, 0, ctx.lake.options().clone()).in_lake(ctx.lake.root()));
        Ok((input, device, loader))
    }

    /// What a sharded run does once on the driver: the detector every shard then loads (trained
    /// now when this configuration has not trained it on these boxes yet).
    pub async fn before_shards(&self, ctx: &StageCtx) -> Result<()> {
        let prepared = self.prepare(ctx).await?;
        let (mut input, device, loader) = self.start(ctx)?;
        self.choose(ctx, prepared, &mut input, device, &loader).await?;
        Ok(())
    }

    pub async fn run(&self, ctx: &StageCtx, prepared: Prepared) -> Result<Outcome> {
        let (mut input, device, loader) = self.start(ctx)?;
        let keyed = input.keyed;
        let handle = tokio::runtime::Handle::current();
        let (batch, depth) = (self.train.batch_size.max(8), self.prefetch);
        let Chosen { det, info, trained, detector_id, unmatched, mut ended, drawn_note, no_subject, people_drew } = self.choose(ctx, prepared, &mut input, device, &loader).await?;
        let Input { mut rows, photos, mut hash_of, .. } = input;
        // A detector loaded with its own input size reads photos at that size.
        let loader = if info.spec.input_size == self.spec.input_size {
            loader
        } else {
            Arc::new(Loader::new(info.spec.input_size, self.loader_threads, 0, ctx.lake.options().clone()).in_lake(ctx.lake.root()))
        };

        // Every photo of the table, a chunk at a time: those gathered, then the rest as it comes.
        ctx.progress.set_message(format!("{detector_id}: photos"));
        let earlier = if keyed { Earlier::read(&ctx.lake, &self.output, &detector_id).await? } else { Earlier::default() };
        let mut sink = ctx.sink(&self.output, Catalog::builtin("detections"), WriteKind::Overwrite).await?;
        let mut det = Some(det);
        let (mut found, mut total, mut reused) = (0usize, 0usize, 0usize);
        let mut pending: Vec<Photo> = photos.into_iter().map(|(p, _, _)| p).collect();
        while !ended || !pending.is_empty() {
            while !ended && pending.len() < CHUNK {
                match rows.try_next().await? {
                    Some(b) => {
                        pending.extend(frames(&self.table, &b)?.into_iter().map(|(p, _, _)| p));
                        hashes(&self.table, &b, keyed, &mut hash_of)?;
                    }
                    None => ended = true,
                }
            }
            // A shard detects in the photos it owns.
            let drained: Vec<Photo> = pending.drain(..pending.len().min(CHUNK)).filter(|p| ctx.owns(&p.uri)).collect();
            // Rows of photos detected before, unchanged since: carried over as they are.
            let (again, todo): (Vec<Photo>, Vec<Photo>) =
                drained.into_iter().partition(|p| earlier.has(hash_of.get(&p.uri)) && !people_drew.contains(&p.photo_id));
            if !again.is_empty() {
                let kept = earlier.rows(&again, &hash_of)?;
                found += earlier.found(&kept);
                total += again.len();
                reused += again.len();
                sink.send(kept).await?;
                ctx.progress.inc(again.len() as u64);
            }
            let chunk: Arc<Vec<Photo>> = Arc::new(todo);
            if chunk.is_empty() {
                continue;
            }
            let d = det.take().expect("detector comes back after each chunk");
            let (loader, handle, cancel, c2) = (loader.clone(), handle.clone(), ctx.cancel.clone(), chunk.clone());
            let (d, res) = tokio::task::spawn_blocking(move || {
                let r = detect_photos(&d, &loader, &c2, batch, &handle, depth, &|| cancel.is_cancelled());
                (d, r)
            })
            .await
            .map_err(|e| Error::Other(format!("detection panicked: {e}")))?;
            det = Some(d);
            let mut dets = res?;
            // A person's "no subject" is the photo's detection: score 0, whatever the detector
            // thought (its box is kept, for the record).
            for (p, d) in chunk.iter().zip(dets.iter_mut()) {
                if no_subject.contains(&p.photo_id) {
                    d.score = 0.0;
                }
            }
            found += dets.iter().filter(|d| d.score >= 0.5).count();
            total += chunk.len();
            let chunk_hashes: Vec<Option<&str>> = chunk.iter().map(|p| hash_of.get(&p.uri).map(String::as_str)).collect();
            sink.send(detections_batch(&chunk, &dets, &detector_id, &ctx.run_id, &chunk_hashes)?).await?;
            ctx.progress.inc(chunk.len() as u64);
        }
        if total == 0 && ctx.shard().is_none() {
            return Err(Error::Other(format!("table `{}` is empty: nothing to detect in", self.table)));
        }
        let version = sink.finish().await?.version;
        let against = if info.pseudo.is_some() { "pseudo-boxes" } else { "boxes" };
        let quality = match (info.val_mean_iou, info.val_hit_rate) {
            (Some(m), Some(r)) => format!(", held-out {against}: mean IoU {m:.3}, {:.0} % found at IoU >= 0.5", r * 100.0),
            _ => String::new(),
        };
        let trained_on = match &info.pseudo {
            Some(p) => format!("{} pseudo-boxes (found in {} of {} sampled photos)", info.train_photos + info.val_photos, p.boxed, p.photos),
            None => format!("{} boxes", info.train_photos + info.val_photos),
        };
        Ok(Outcome {
            rows_in: total as u64,
            rows_out: total as u64,
            written: BTreeMap::from([(self.output.clone(), version)]),
            summary: format!(
                "{total} photos{}, {found} with a subject (score >= 0.5); detector {detector_id} {} on {trained_on}{quality}{}{drawn_note}",
                if reused > 0 { format!(" ({} detected now, {reused} on an earlier run)", total - reused) } else { String::new() },
                if trained { "trained" } else if self.detector.is_some() { "(the current model's), trained" } else { "reused, trained" },
                if unmatched > 0 { format!("; {unmatched} box rows name no photo of `{}`", self.table) } else { String::new() },
            ) + &if no_subject.is_empty() { String::new() } else { format!("; photos said on the review page to show no subject: {}", no_subject.len()) },
            changes: engine::stage::Changes { new: Some((total - reused) as u64), ..Default::default() },
        })
    }
}

impl DetectStage {
    /// The detector this run uses: the one `detector` names, or the one this configuration
    /// trains on the boxes (the file's, the review page's, or pseudo-boxes), trained now unless
    /// it was before. Reads as much of the input as that needs (into `input.photos`).
    async fn choose(&self, ctx: &StageCtx, mut prepared: Prepared, input: &mut Input, device: Device, loader: &Arc<Loader>) -> Result<Chosen> {
        let handle = tokio::runtime::Handle::current();
        let (batch, depth) = (self.train.batch_size.max(8), self.prefetch);
        // Boxes drawn on the review page (table `boxes`): over the file's, or instead of
        // pseudo-boxes once there are enough.
        let drawn = if self.detector.is_some() { Default::default() } else { lake::boxes::latest(&ctx.lake).await? };
        let no_subject: std::collections::HashSet<String> = drawn.values().filter(|d| d.bbox.is_none()).map(|d| d.photo_id.clone()).collect();
        let people_drew: std::collections::HashSet<String> = drawn.keys().cloned().collect();
        let mut drawn_note = String::new();
        let (det, info, trained, detector_id, unmatched, ended) = match &self.detector {
            // A detector trained before: loaded, nothing to gather first.
            Some(named) => {
                let detector_id = match prepared.take::<Pinned>() {
                    Some(Pinned(id)) => id,
                    None => resolve_detector(&ctx.lake, named).await?,
                };
                let dir = lake::models::model_dir(&ctx.lake, &detector_id).await?;
                let (weights, info_file) = (dir.local.join(WEIGHTS), dir.local.join(INFO));
                let text = std::fs::read_to_string(&info_file).map_err(|e| {
                    Error::Other(format!("detector `{detector_id}` (from `detector = \"{named}\"`): {} cannot be read: {e}", info_file.display()))
                })?;
                let info: DetectorInfo = serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", info_file.display())))?;
                let det = Detector::load(&info.spec, &weights, device).map_err(|e| Error::Other(format!("detector `{detector_id}`: {e}")))?;
                (det, info, false, detector_id, 0, false)
            }
            // No boxes: every photo is gathered (ids and sizes), then a seeded sample of them
            // gives the pseudo-boxes the detector trains on.
            None if self.boxes.is_empty() => {
                while let Some(b) = input.rows.try_next().await? {
                    input.photos.extend(frames(&self.table, &b)?);
                    hashes(&self.table, &b, input.keyed, &mut input.hash_of)?;
                }
                if input.photos.is_empty() {
                    return Err(Error::Other(format!("table `{}` is empty: nothing to detect in", self.table)));
                }
                input.photos.sort_by(|a, b| a.0.uri.cmp(&b.0.uri));
                // Enough boxes drawn on the review page: the detector trains on them.
                let (drawn, n_drawn) = with_drawn(Vec::new(), &drawn, &input.photos);
                let source = if n_drawn >= self.min_drawn_boxes {
                    drawn_note = format!("; trained on {n_drawn} boxes drawn on the review page");
                    Source::Drawn(drawn)
                } else {
                    if n_drawn > 0 {
                        drawn_note = format!("; {n_drawn} boxes drawn on the review page, pseudo-boxes until there are {}", self.min_drawn_boxes);
                    }
                    let sample = pseudo_sample(&input.photos, self.pseudo_photos, self.train.seed);
                    Source::Pseudo { photos: sample, min_peak: self.pseudo_min_peak, level: self.pseudo_level }
                };
                let (det, info, trained, detector_id) = self.detector_for(ctx, source, device, loader, &handle, batch, depth).await?;
                (det, info, trained, detector_id, 0, true)
            }
            None => {
                let bytes = match prepared.take::<bytes::Bytes>() {
                    Some(b) => b,
                    None => fetch(&self.boxes).await?,
                };
                // The photos arrive as the table is written (streamed from its producer) or
                // from the committed table. The detector needs every photo its boxes name: rows
                // are gathered (ids and sizes only, no pixels) until each box row names a
                // gathered photo by its exact id, or the input ends; then detection runs as
                // rows keep coming. With the photos' content hashes (an `images`-like input),
                // photos detected on an earlier run by the same detector are not detected again.
                // With boxes drawn on the review page, the whole input is gathered first (they
                // can name any photo).
                let (boxed, unmatched, ended) = loop {
                    let Some(b) = input.rows.try_next().await? else {
                        input.photos.sort_by(|a, b| a.0.uri.cmp(&b.0.uri));
                        let (boxed, unmatched, _) = match_boxes(&bytes, &self.boxes, &self.boxes_photo_column, &input.photos)?;
                        break (boxed, unmatched, true);
                    };
                    input.photos.extend(frames(&self.table, &b)?);
                    hashes(&self.table, &b, input.keyed, &mut input.hash_of)?;
                    if !drawn.is_empty() {
                        continue;
                    }
                    let (boxed, unmatched, by_name) = match_boxes(&bytes, &self.boxes, &self.boxes_photo_column, &input.photos)?;
                    if unmatched == 0 && by_name == 0 && !boxed.is_empty() {
                        break (boxed, unmatched, false);
                    }
                };
                let (boxed, n_drawn) = with_drawn(boxed, &drawn, &input.photos);
                if n_drawn > 0 {
                    drawn_note = format!("; {n_drawn} of its boxes drawn on the review page");
                }
                if input.photos.is_empty() {
                    return Err(Error::Other(format!("table `{}` is empty: nothing to detect in", self.table)));
                }
                if boxed.is_empty() {
                    return Err(Error::Other(format!(
                        "boxes file `{}`: none of its {unmatched} rows names a photo of table `{}`",
                        self.boxes, self.table
                    )));
                }
                let (det, info, trained, detector_id) =
                    self.detector_for(ctx, Source::Drawn(boxed), device, loader, &handle, batch, depth).await?;
                (det, info, trained, detector_id, unmatched, ended)
            }
        };
        Ok(Chosen { det, info, trained, detector_id, unmatched, ended, drawn_note, no_subject, people_drew })
    }

    /// The detector trained by this configuration on `source`'s boxes: the one published before
    /// when there is one (its id hashes the configuration and the boxes, or the pseudo-boxes'
    /// sample), else trained now and published whole.
    #[allow(clippy::too_many_arguments)]
    async fn detector_for(
        &self,
        ctx: &StageCtx,
        source: Source,
        device: Device,
        loader: &Arc<Loader>,
        handle: &tokio::runtime::Handle,
        batch: usize,
        depth: usize,
    ) -> Result<(Detector, DetectorInfo, bool, String)> {
        let mut h = blake3::Hasher::new();
        h.update(serde_json::to_string(&(&self.spec, &self.train, self.val_fraction)).unwrap_or_default().as_bytes());
        match &source {
            Source::Drawn(boxed) => {
                for (p, b) in boxed {
                    h.update(p.uri.as_bytes());
                    match b {
                        Some(b) => b.iter().for_each(|v| {
                            h.update(&v.to_le_bytes());
                        }),
                        None => {
                            h.update(b"no subject");
                        }
                    }
                }
            }
            Source::Pseudo { photos, min_peak, level } => {
                h.update(format!("pseudo-boxes v1, min peak {min_peak}, level {level}").as_bytes());
                for p in photos {
                    h.update(p.uri.as_bytes());
                }
            }
        }
        let name = self.model.clone().unwrap_or_else(|| ctx.name.clone());
        let detector_id = format!("{name}-{}", &h.finalize().to_hex()[..12]);
        let dir = lake::models::model_dir(&ctx.lake, &detector_id).await?;

        // The detector: reused when this configuration already trained on these boxes.
        let (weights, info_file) = (dir.local.join(WEIGHTS), dir.local.join(INFO));
        let existing = std::fs::read_to_string(&info_file).ok().and_then(|t| serde_json::from_str::<DetectorInfo>(&t).ok());
        if let Some(info) = existing.filter(|_| weights.is_file()) {
            let det = Detector::load(&self.spec, &weights, device).map_err(|e| Error::Other(e.to_string()))?;
            return Ok((det, info, false, detector_id));
        }
        if let Some(k) = ctx.shard() {
            return Err(Error::Other(format!(
                "detector `{detector_id}` is not trained yet, and shard {k} does not train it alone: `pipeline run --executor ray` trains it before the shards start; \
                 for shards run by hand, run `pipeline worker FILE --stage {} --before --run RUN` once first",
                ctx.name
            )));
        }
        ctx.progress.set_message(match &source {
            Source::Drawn(boxed) => format!("{detector_id}: training on {} boxes", boxed.len()),
            Source::Pseudo { photos, .. } => format!("{detector_id}: pseudo-boxes of {} photos, then training on them", photos.len()),
        });
        let (spec, cfg, val_fraction) = (self.spec.clone(), self.train.clone(), self.val_fraction);
        let (loader, handle, cancel, id) = (loader.clone(), handle.clone(), ctx.cancel.clone(), detector_id.clone());
        let (det, info) = tokio::task::spawn_blocking(move || {
            train_detector(&spec, &cfg, val_fraction, source, device, &loader, &handle, batch, depth, &id, &|| cancel.is_cancelled())
        })
        .await
        .map_err(|e| Error::Other(format!("detector training panicked: {e}")))??;
        // Made aside and published whole: a reader sees no detector or a complete one, whenever
        // this process is killed.
        let staging = dir.staging()?;
        det.save(&staging.join(WEIGHTS)).map_err(|e| Error::Other(e.to_string()))?;
        let text = serde_json::to_string_pretty(&info).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(staging.join(INFO), text).map_err(|e| Error::io(&staging, e))?;
        dir.publish(&staging).await?;
        Ok((det, info, true, detector_id))
    }
}

/// Default share of a photo's peak projection its pseudo-box is traced at (see the README's
/// figures: on the demo lake it brings the boxes' area to that of the drawn ones).
pub const PSEUDO_LEVEL: f64 = 0.5;

/// What a detector trains on.
pub enum Source {
    /// Boxes drawn by people (the boxes file, the review page), as fractions of the frame; None
    /// where a person said the photo shows no subject.
    Drawn(Vec<(Photo, Option<[f32; 4]>)>),
    /// Photos to find pseudo-boxes on ([`detect::pseudo_boxes`]).
    Pseudo { photos: Vec<Photo>, min_peak: f32, level: f32 },
}

/// Up to `n` photos of `photos`, chosen by a seeded hash of their URIs: the same photos on every
/// run of the same table, in URI order, and a photo added later enters the sample only where its
/// hash places it.
pub fn pseudo_sample(photos: &[(Photo, u32, u32)], n: usize, seed: u64) -> Vec<Photo> {
    let key = |p: &Photo| {
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.update(p.uri.as_bytes());
        *h.finalize().as_bytes()
    };
    let mut keyed: Vec<([u8; 32], &Photo)> = photos.iter().map(|(p, _, _)| (key(p), p)).collect();
    keyed.sort_by_key(|k| k.0);
    let mut out: Vec<Photo> = keyed.into_iter().take(n).map(|(_, p)| p.clone()).collect();
    out.sort_by(|a, b| a.uri.cmp(&b.uri));
    out
}

/// The detector a `detector` option names, resolved when the stage is prepared.
struct Pinned(String);

/// The input of a run as [`DetectStage::choose`] leaves it: the rows still to come, the photos
/// read so far, their content hashes.
struct Input {
    rows: engine::dag::BatchStream,
    photos: Vec<(Photo, u32, u32)>,
    hash_of: HashMap<String, String>,
    keyed: bool,
}

/// The detector a run uses, and how it got it.
struct Chosen {
    det: Detector,
    info: DetectorInfo,
    trained: bool,
    detector_id: String,
    /// Box rows that name no photo of the input.
    unmatched: usize,
    /// Whether the input was read to its end.
    ended: bool,
    drawn_note: String,
    /// Photos a person said show no subject (review page): their detections say so.
    no_subject: std::collections::HashSet<String>,
    /// Photos with anything drawn on the review page: never carried over from an earlier run
    /// (what a person said may have changed since, with the same detector).
    people_drew: std::collections::HashSet<String>,
}

/// The detector id `named` stands for: `current:NAME` is the detector of the model promoted
/// last under NAME (an error when that model was trained on whole photos); anything else is a
/// detector id of this lake.
async fn resolve_detector(lake: &lake::Lake, named: &str) -> Result<String> {
    if named.starts_with(lake::models::CURRENT_PREFIX) {
        let (model_id, dir) = lake::models::resolve_model(lake, named).await?;
        let (spec, _) = train::model_files(&dir, &model_id)?;
        return spec.crop.map(|c| c.detector).ok_or_else(|| {
            Error::Other(format!("`detector = \"{named}\"`: model `{model_id}` was trained on whole photos, with no detector; drop the detect stage or give it `boxes`"))
        });
    }
    Ok(named.to_string())
}

async fn fetch(uri: &str) -> Result<bytes::Bytes> {
    let (s, path) = store::open(uri, &HashMap::new())?;
    let get = async { s.get(&path).await?.bytes().await };
    get.await.map_err(|e| Error::Location { uri: uri.into(), reason: format!("cannot read the boxes file: {e}") })
}

/// Photos detected per blocking task (one chunk of the input at a time).
const CHUNK: usize = 1024;

/// `photo_id`, `uri`, `width`, `height` of every row of a batch of `table`.
fn frames(table: &str, b: &RecordBatch) -> Result<Vec<(Photo, u32, u32)>> {
    let c = Columns::new(table, b);
    let (pid, uri, w, h) = (c.strings("photo_id")?, c.strings("uri")?, c.i32s("width")?, c.i32s("height")?);
    Ok((0..b.num_rows())
        .map(|i| {
            let photo = Photo { photo_id: pid.value(i).to_string(), uri: uri.value(i).to_string(), ..Photo::default() };
            (photo, w.value(i).max(1) as u32, h.value(i).max(1) as u32)
        })
        .collect())
}

/// The boxes of the file that name a photo of the table (by photo id, or by file name), as
/// fractions of the displayed frame; and how many rows named none. A malformed row is an error
/// naming the file and its line.
pub fn parse_boxes(bytes: &[u8], file: &str, photo_col: &str, photos: &[(Photo, u32, u32)]) -> Result<(Vec<(Photo, [f32; 4])>, usize)> {
    match_boxes(bytes, file, photo_col, photos).map(|(boxed, unmatched, _)| (boxed, unmatched))
}

/// [`parse_boxes`], and how many rows matched a photo by file name rather than by exact id
/// (such a match can change as more photos arrive, so a streamed input waits for its end).
fn match_boxes(bytes: &[u8], file: &str, photo_col: &str, photos: &[(Photo, u32, u32)]) -> Result<(Vec<(Photo, [f32; 4])>, usize, usize)> {
    let err = |detail: String| Error::Location { uri: file.to_string(), reason: detail };
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for (i, (p, _, _)) in photos.iter().enumerate() {
        by_id.insert(p.photo_id.as_str(), i);
        by_id.entry(p.photo_id.rsplit('/').next().unwrap_or(&p.photo_id)).or_insert(i);
    }
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(bytes);
    let headers = rdr.headers().map_err(|e| err(format!("not a CSV with a header row: {e}")))?.clone();
    let find = |c: &str| {
        headers
            .iter()
            .position(|h| h == c)
            .ok_or_else(|| err(format!("no column `{c}` (columns: {})", headers.iter().collect::<Vec<_>>().join(", "))))
    };
    let cols = [find(photo_col)?, find("x0")?, find("y0")?, find("x1")?, find("y1")?];
    let mut out = Vec::new();
    let (mut unmatched, mut by_name) = (0, 0);
    let ids: std::collections::HashSet<&str> = photos.iter().map(|(p, _, _)| p.photo_id.as_str()).collect();
    for (n, rec) in rdr.records().enumerate() {
        let line = n + 2;
        let rec = rec.map_err(|e| err(format!("line {line}: {e}")))?;
        let field = |c: usize| rec.get(c).ok_or_else(|| err(format!("line {line}: expected at least {} fields", c + 1)));
        let name = field(cols[0])?;
        let mut v = [0f64; 4];
        for (k, c) in cols[1..].iter().enumerate() {
            let s = field(*c)?;
            v[k] = s.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| err(format!("line {line}: `{s}` is not a number")))?;
        }
        let exact = ids.contains(name);
        let Some(&i) = by_id.get(name).or_else(|| by_id.get(name.rsplit('/').next().unwrap_or(name))) else {
            unmatched += 1;
            continue;
        };
        by_name += usize::from(!exact);
        let (p, w, h) = &photos[i];
        let (w, h) = (f64::from(*w), f64::from(*h));
        if v[2] <= v[0] || v[3] <= v[1] {
            return Err(err(format!("line {line}: box of `{name}` is empty or inverted ({}, {}, {}, {})", v[0], v[1], v[2], v[3])));
        }
        // A pixel of slack for inclusive right/bottom edges; anything further out is a wrong box.
        if v[0] < -1.0 || v[1] < -1.0 || v[2] > w + 1.0 || v[3] > h + 1.0 {
            return Err(err(format!(
                "line {line}: box of `{name}` ({}, {}, {}, {}) lies outside the {w}x{h} photo",
                v[0], v[1], v[2], v[3]
            )));
        }
        let b = vision::clamp_box([(v[0] / w) as f32, (v[1] / h) as f32, (v[2] / w) as f32, (v[3] / h) as f32]);
        out.push((p.clone(), b));
    }
    out.sort_by(|a, b| a.0.uri.cmp(&b.0.uri));
    out.dedup_by(|a, b| a.0.uri == b.0.uri);
    Ok((out, unmatched, by_name))
}

/// `boxed` (the file's boxes) with the boxes drawn on the review page laid over it: a photo's
/// drawn box (or its "no subject", None) replaces its box from the file, and a photo only drawn
/// is added. Only photos of `photos` count. Returns the boxes, in URI order, and how many of
/// them were drawn.
fn with_drawn(
    boxed: Vec<(Photo, [f32; 4])>,
    drawn: &std::collections::BTreeMap<String, lake::boxes::DrawnBox>,
    photos: &[(Photo, u32, u32)],
) -> (Vec<(Photo, Option<[f32; 4]>)>, usize) {
    let mut n = 0;
    let mut boxed: Vec<(Photo, Option<[f32; 4]>)> = boxed.into_iter().filter(|(p, _)| !drawn.contains_key(&p.photo_id)).map(|(p, b)| (p, Some(b))).collect();
    for (p, _, _) in photos {
        if let Some(d) = drawn.get(&p.photo_id) {
            boxed.push((p.clone(), d.bbox.map(vision::clamp_box)));
            n += 1;
        }
    }
    boxed.sort_by(|a, b| a.0.uri.cmp(&b.0.uri));
    boxed.dedup_by(|a, b| a.0.uri == b.0.uri);
    (boxed, n)
}

/// Feature maps of `photos` (and of their mirror images when `flip`, appended after them).
#[allow(clippy::too_many_arguments)]
fn features(
    det: &Detector,
    loader: &Arc<Loader>,
    photos: &Arc<Vec<Photo>>,
    batch: usize,
    flip: bool,
    handle: &tokio::runtime::Handle,
    depth: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<Tensor> {
    let batches: Vec<Vec<usize>> = (0..photos.len()).collect::<Vec<_>>().chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
    let mut rx = prefetch(loader.clone(), photos.clone(), batches, depth, handle);
    let (mut plain, mut mirrored) = (Vec::new(), Vec::new());
    while let Some(item) = rx.blocking_recv() {
        if cancelled() {
            return Err(Error::Cancelled("interrupted while detecting".into()));
        }
        let x = to_input(&item?.1, det.device());
        plain.push(det.features(&x));
        if flip {
            mirrored.push(det.features(&x.flip([3])));
        }
    }
    let n: i64 = plain.iter().map(|t| t.size()[0]).sum();
    if n as usize != photos.len() {
        return Err(Error::Cancelled("the photo loader stopped early".into()));
    }
    plain.extend(mirrored);
    Ok(Tensor::cat(&plain, 0))
}

#[allow(clippy::too_many_arguments)]
fn train_detector(
    spec: &DetectorSpec,
    cfg: &HeadTrainConfig,
    val_fraction: f64,
    source: Source,
    device: Device,
    loader: &Arc<Loader>,
    handle: &tokio::runtime::Handle,
    batch: usize,
    depth: usize,
    id: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Detector, DetectorInfo)> {
    let started = std::time::Instant::now();
    tch::manual_seed(train::seed_for(cfg.seed, u32::MAX));
    let det = Detector::new(spec, device).map_err(|e| Error::Other(e.to_string()))?;
    let weights_dir =
        std::env::var_os("PIPELINE_WEIGHTS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/pipeline/weights"));
    det.load_imagenet(&weights_dir).map_err(|e| Error::Other(format!("detector: {e}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let held_out = |n: usize| if n >= 5 { ((n as f64 * val_fraction).round() as usize).min(n - 2) } else { 0 };
    let (history, train_photos, val, pseudo) = match source {
        Source::Drawn(drawn) => {
            // Boxes are held out to measure the detector by; photos without a subject all train
            // (they teach it what is not a subject).
            let (mut boxed, empty): (Vec<(Photo, [f32; 4])>, Vec<Photo>) = {
                let (with, without): (Vec<_>, Vec<_>) = drawn.into_iter().partition(|(_, b)| b.is_some());
                (with.into_iter().filter_map(|(p, b)| Some((p, b?))).collect(), without.into_iter().map(|(p, _)| p).collect())
            };
            if boxed.is_empty() {
                return Err(Error::Other(format!("no box to train the detector on: all {} photos drawn were marked without a subject", empty.len())));
            }
            boxed.shuffle(&mut rng);
            let (val, tr) = boxed.split_at(held_out(boxed.len()));
            let tr_photos: Arc<Vec<Photo>> = Arc::new(tr.iter().map(|(p, _)| p.clone()).chain(empty.iter().cloned()).collect());
            let plain: Vec<Option<[f32; 4]>> = tr.iter().map(|(_, b)| Some(*b)).chain(empty.iter().map(|_| None)).collect();
            let mut tr_boxes = plain.clone();
            tr_boxes.extend(plain.iter().map(|b| b.as_ref().map(detect::hflip_box)));
            let feats = features(&det, loader, &tr_photos, batch, true, handle, depth, cancelled)?;
            let history = detect::train_head(&det.head_vs, &det.head, &feats, &tr_boxes, cfg, cancelled).map_err(Error::Other)?;
            drop(feats);
            // Held out: detected from their photos, compared with the boxes drawn.
            let val_photos: Arc<Vec<Photo>> = Arc::new(val.iter().map(|(p, _)| p.clone()).collect());
            let found = if val.is_empty() { Vec::new() } else { detect_photos(&det, loader, &val_photos, batch, handle, depth, cancelled)? };
            let val: Vec<(Detection, [f32; 4])> = found.into_iter().zip(val.iter().map(|(_, b)| *b)).collect();
            (history, tr.len() + empty.len(), val, None)
        }
        Source::Pseudo { photos, min_peak, level } => {
            let n = photos.len();
            let photos = Arc::new(photos);
            // Every sampled photo and its mirror image through the frozen backbone once: the
            // plain maps give the pseudo-boxes, both train the head.
            let feats = features(&det, loader, &photos, batch, true, handle, depth, cancelled)?;
            let found = detect::pseudo_boxes(&feats.narrow(0, 0, n as i64), min_peak, level);
            let mut boxed: Vec<usize> = (0..n).filter(|&k| found.boxes[k].is_some()).collect();
            if boxed.len() < 2 {
                return Err(Error::Other(format!(
                    "pseudo-boxes: only {} of {n} sampled photos show a subject the others share; give the stage `boxes` drawn by hand",
                    boxed.len()
                )));
            }
            boxed.shuffle(&mut rng);
            let (val, tr) = boxed.split_at(held_out(boxed.len()));
            let rows: Vec<i64> = tr.iter().map(|&k| k as i64).chain(tr.iter().map(|&k| (k + n) as i64)).collect();
            let mut tr_boxes: Vec<Option<[f32; 4]>> = tr.iter().map(|&k| found.boxes[k]).collect();
            tr_boxes.extend(tr.iter().map(|&k| found.boxes[k].as_ref().map(detect::hflip_box)));
            let tr_feats = feats.index_select(0, &Tensor::from_slice(&rows).to_device(feats.device()));
            let history = detect::train_head(&det.head_vs, &det.head, &tr_feats, &tr_boxes, cfg, cancelled).map_err(Error::Other)?;
            drop(tr_feats);
            // Held out: the trained head on their maps, compared with their pseudo-boxes.
            let val_rows: Vec<i64> = val.iter().map(|&k| k as i64).collect();
            let dets = if val.is_empty() {
                Vec::new()
            } else {
                let _g = tch::no_grad_guard();
                let f = feats.index_select(0, &Tensor::from_slice(&val_rows).to_device(feats.device()));
                detect::decode(&det.head.forward(&f, false))
            };
            let val: Vec<(Detection, [f32; 4])> = dets.into_iter().zip(val.iter().map(|&k| found.boxes[k].unwrap_or_default())).collect();
            let info = detect::PseudoInfo { photos: n, boxed: boxed.len(), min_peak, level, explained: found.explained };
            (history, tr.len(), val, Some(info))
        }
    };
    let (mut mean_iou, mut hit_rate, mut min_score) = (None, None, None);
    if !val.is_empty() {
        let ious: Vec<f64> = val.iter().map(|(d, b)| f64::from(detect::iou(&d.bbox, b))).collect();
        mean_iou = Some(ious.iter().sum::<f64>() / ious.len() as f64);
        hit_rate = Some(ious.iter().filter(|&&x| x >= 0.5).count() as f64 / ious.len() as f64);
        min_score = val.iter().map(|(d, _)| f64::from(d.score)).reduce(f64::min);
    }
    let info = DetectorInfo {
        detector_id: id.to_string(),
        spec: spec.clone(),
        train: cfg.clone(),
        train_photos,
        val_photos: val.len(),
        val_mean_iou: mean_iou,
        val_hit_rate: hit_rate,
        val_min_score: min_score,
        loss_per_epoch: history,
        seconds: started.elapsed().as_secs_f64(),
        pseudo,
    };
    Ok((det, info))
}

/// The detection of every photo, in order.
pub fn detect_photos(
    det: &Detector,
    loader: &Arc<Loader>,
    photos: &Arc<Vec<Photo>>,
    batch: usize,
    handle: &tokio::runtime::Handle,
    depth: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Detection>> {
    let batches: Vec<Vec<usize>> = (0..photos.len()).collect::<Vec<_>>().chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
    let mut rx = prefetch(loader.clone(), photos.clone(), batches, depth, handle);
    let mut out = Vec::with_capacity(photos.len());
    while let Some(item) = rx.blocking_recv() {
        if cancelled() {
            return Err(Error::Cancelled("interrupted while detecting".into()));
        }
        out.extend(det.detect(&to_input(&item?.1, det.device())));
    }
    if out.len() != photos.len() {
        return Err(Error::Cancelled("the photo loader stopped early".into()));
    }
    Ok(out)
}

/// The rows an output table already holds from one detector, by photo content: a photo whose
/// bytes were detected before (under any name: a renamed or moved photo, a copy) is not
/// detected again.
#[derive(Default)]
struct Earlier {
    rows: Option<RecordBatch>,
    by_hash: HashMap<String, usize>,
}

impl Earlier {
    async fn read(lake: &lake::Lake, table: &str, detector_id: &str) -> Result<Earlier> {
        let Some(ds) = lake.open(table).await? else { return Ok(Earlier::default()) };
        if ds.schema().field("content_hash").is_none() {
            return Ok(Earlier::default());
        }
        let filter = format!("detector_id = {} AND content_hash IS NOT NULL", lake::tables::sql_string(detector_id));
        let batches = lake::tables::rows_where(&ds, table, &filter, None).await?;
        let Some(first) = batches.first() else { return Ok(Earlier::default()) };
        let all = arrow::compute::concat_batches(&first.schema(), &batches)?;
        let hashes = Columns::new(table, &all).strings("content_hash")?.clone();
        let by_hash = (0..all.num_rows()).map(|i| (hashes.value(i).to_string(), i)).collect();
        Ok(Earlier { rows: Some(all), by_hash })
    }

    fn has(&self, hash: Option<&String>) -> bool {
        hash.is_some_and(|h| self.by_hash.contains_key(h))
    }

    /// The earlier rows of `photos` (each [`Self::has`] its hash), as the output's schema; the
    /// photo's id and URI are today's.
    fn rows(&self, photos: &[Photo], hash_of: &HashMap<String, String>) -> Result<RecordBatch> {
        let all = self.rows.as_ref().ok_or_else(|| Error::Other("no earlier detections".into()))?;
        let idx = arrow::array::UInt32Array::from_iter_values(photos.iter().map(|p| self.by_hash[&hash_of[&p.uri]] as u32));
        let schema = Catalog::builtin("detections");
        let mut cols = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let col = match f.name().as_str() {
                "photo_id" => Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.photo_id.as_str()))) as arrow::array::ArrayRef,
                "uri" => Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.uri.as_str()))),
                "content_hash" => Arc::new(StringArray::from_iter(photos.iter().map(|p| hash_of.get(&p.uri).map(String::as_str)))),
                name => {
                    let c = all.column_by_name(name).ok_or_else(|| Error::Schema { table: "detections".into(), column: name.into(), detail: "missing in the earlier table".into() })?;
                    arrow::compute::take(c, &idx, None)?
                }
            };
            cols.push(col);
        }
        Ok(RecordBatch::try_new(schema, cols)?)
    }

    /// How many of `rows` score as a subject.
    fn found(&self, rows: &RecordBatch) -> usize {
        Columns::new("detections", rows).f32s("score").map(|s| s.values().iter().filter(|v| **v >= 0.5).count()).unwrap_or(0)
    }
}

/// Adds the content hash of each row's photo, when the input has them.
fn hashes(table: &str, b: &RecordBatch, keyed: bool, into: &mut HashMap<String, String>) -> Result<()> {
    if !keyed {
        return Ok(());
    }
    let c = Columns::new(table, b);
    let (uri, hash) = (c.strings("uri")?, c.strings("content_hash")?);
    for i in 0..b.num_rows() {
        if hash.is_valid(i) {
            into.insert(uri.value(i).to_string(), hash.value(i).to_string());
        }
    }
    Ok(())
}

fn detections_batch(photos: &[Photo], dets: &[Detection], detector_id: &str, run_id: &str, hashes: &[Option<&str>]) -> Result<RecordBatch> {
    let n = photos.len();
    let coord = |k: usize| Arc::new(Float32Array::from_iter_values(dets.iter().map(|d| d.bbox[k])));
    Ok(RecordBatch::try_new(
        Catalog::builtin("detections"),
        vec![
            Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.photo_id.as_str()))),
            Arc::new(StringArray::from_iter_values(photos.iter().map(|p| p.uri.as_str()))),
            Arc::new(StringArray::from(vec![detector_id; n])),
            Arc::new(Float32Array::from_iter_values(dets.iter().map(|d| d.score))),
            coord(0),
            coord(1),
            coord(2),
            coord(3),
            Arc::new(StringArray::from(vec![run_id; n])),
            Arc::new(StringArray::from(hashes.to_vec())),
        ],
    )?)
}



impl Stage for DetectStage {
    fn describe(&self) -> String {
        match (&self.detector, self.boxes.as_str()) {
            (Some(d), _) => format!("detect {} on {}, detector {d}", self.spec.backbone, self.table),
            (None, "") => format!("detect {} on {}, pseudo-boxes of {} photos", self.spec.backbone, self.table, self.pseudo_photos),
            (None, b) => format!("detect {} on {}, boxes {b}", self.spec.backbone, self.table),
        }
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(DetectStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn streams(&self, table: &str) -> bool {
        table == self.table
    }

    fn shards(&self) -> bool {
        true
    }

    fn wants_gpu(&self, run_device: Option<DeviceChoice>) -> bool {
        train::pick_device(run_device.unwrap_or(self.device).as_str()).is_ok_and(|d| d.is_cuda())
    }

    fn before_shards<'a>(&'a self, ctx: &'a StageCtx) -> BoxFuture<'a, Result<()>> {
        Box::pin(DetectStage::before_shards(self, ctx))
    }

    fn prepare<'a>(&'a self, ctx: &'a StageCtx) -> BoxFuture<'a, Result<Prepared>> {
        Box::pin(DetectStage::prepare(self, ctx))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, prepared: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(DetectStage::run(self, ctx, prepared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<(Photo, u32, u32)> {
        ["a/IMG_1.jpg", "b/IMG_2.jpg"]
            .iter()
            .map(|id| (Photo { photo_id: id.to_string(), uri: format!("file:///p/{id}"), ..Photo::default() }, 2000, 1000))
            .collect()
    }

    #[test]
    fn boxes_are_matched_by_id_or_file_name_and_normalised() {
        let csv = "photo,x0,y0,x1,y1\nIMG_1.jpg,500,250,1500,750\nb/IMG_2.jpg,0,0,2000,1000\nother.jpg,1,1,2,2\n";
        let (b, unmatched) = parse_boxes(csv.as_bytes(), "boxes.csv", "photo", &frames()).unwrap();
        assert_eq!(unmatched, 1);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].0.photo_id, "a/IMG_1.jpg");
        assert_eq!(b[0].1, [0.25, 0.25, 0.75, 0.75]);
        assert_eq!(b[1].1, [0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn drawn_boxes_replace_the_files_and_add_photos_of_the_table_only() {
        let csv = "photo,x0,y0,x1,y1\nIMG_1.jpg,500,250,1500,750\n";
        let (file, _) = parse_boxes(csv.as_bytes(), "boxes.csv", "photo", &frames()).unwrap();
        let drawn: std::collections::BTreeMap<String, lake::boxes::DrawnBox> = [
            ("a/IMG_1.jpg", [0.1, 0.1, 0.4, 0.4]),
            ("b/IMG_2.jpg", [0.5, 0.5, 0.9, 0.9]),
            ("elsewhere.jpg", [0.1, 0.1, 0.2, 0.2]),
        ]
        .into_iter()
        .map(|(p, b)| (p.to_string(), lake::boxes::DrawnBox::new(p, b, "ana").unwrap()))
        .collect();
        let (boxed, n) = with_drawn(file.clone(), &drawn, &frames());
        assert_eq!(n, 2, "the photo not in the table does not count");
        let got: Vec<(&str, Option<[f32; 4]>)> = boxed.iter().map(|(p, b)| (p.photo_id.as_str(), *b)).collect();
        assert_eq!(got, vec![("a/IMG_1.jpg", Some([0.1, 0.1, 0.4, 0.4])), ("b/IMG_2.jpg", Some([0.5, 0.5, 0.9, 0.9]))]);
        // A photo said to show no subject replaces its box too: it trains as one without.
        let mut none = drawn.clone();
        none.insert("a/IMG_1.jpg".into(), lake::boxes::DrawnBox::no_subject("a/IMG_1.jpg", "ana").unwrap());
        let (boxed, n) = with_drawn(file.clone(), &none, &frames());
        assert_eq!(n, 2);
        assert_eq!(boxed.iter().find(|(p, _)| p.photo_id == "a/IMG_1.jpg").unwrap().1, None);
        // No drawn boxes: the file's, unchanged.
        let want: Vec<(Photo, Option<[f32; 4]>)> = file.iter().map(|(p, b)| (p.clone(), Some(*b))).collect();
        assert_eq!(with_drawn(file, &Default::default(), &frames()), (want, 0));
    }

    #[test]
    fn bad_boxes_name_the_line() {
        let cases = [
            ("photo,x0,y0,x1,y1\nIMG_1.jpg,500,250,400,750\n", "line 2: box of `IMG_1.jpg` is empty or inverted"),
            ("photo,x0,y0,x1,y1\nIMG_2.jpg,0,0,10,10\nIMG_1.jpg,0,0,2600,750\n", "line 3: box of `IMG_1.jpg`"),
            ("photo,x0,y0,x1,y1\nIMG_1.jpg,a,0,10,10\n", "line 2: `a` is not a number"),
            ("photo,left,top\nIMG_1.jpg,1,2\n", "no column `x0`"),
        ];
        for (csv, want) in cases {
            let e = parse_boxes(csv.as_bytes(), "boxes.csv", "photo", &frames()).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("boxes.csv"), "{e}");
        }
    }
}
