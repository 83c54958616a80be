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
//! model = "train"          # the table a train stage wrote (it names the model), a model id,
//!                          # or "current:NAME": the model of that name promoted last
//! table = "images"         # photos to embed: every photo of the collection
//! flip_tta = true
//! crop_cache = true        # read crops from the lake's crop cache and add those decoded
//!                          # (lake::crops): a re-embed decodes no source photo
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use futures::{StreamExt, TryStreamExt};

use lake::models::resolve_model;
use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Device, Keys, Loc, Reporter};
use engine::StageCtx;
use lake::tables::Columns;
use lake::{Catalog, Lake, WriteKind};
use model::data::{Loader, Photo};
use model::net::{Net, NetSpec};
use model::data::embedding_batch;
use model::train::{self, embed_photos, model_files};
use crate::{Error, Result};

const KEYS: &[&str] = &["model", "table", "output", "crops", "flip_tta", "batch_size", "chunk", "device", "loader_threads", "prefetch", "channels_last", "crop_cache"];

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
    pub device: Device,
    pub loader_threads: usize,
    pub prefetch: usize,
    /// Convolutions in channels-last memory order (faster; same embeddings to float rounding).
    pub channels_last: bool,
    /// Read and fill the lake's crop cache (photos with a content hash only).
    pub crop_cache: bool,
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
            crop_cache: k.bool("crop_cache").unwrap_or(true),
        };
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        let ins = Inputs { stage, at, visible, broken };
        ins.need(rep, &mut reads, &self.table, &["photo_id", "uri", "individual_id"]);
        if let Some(c) = &self.crops {
            ins.need(rep, &mut reads, c, &["photo_id", "detector_id", "x0", "y0", "x1", "y1"]);
        }
        // `model` is a train stage's table when one is visible, `current:NAME` (the promoted
        // model: reading `promotions` makes a new promotion re-run this stage), else a model id.
        if let Some(name) = self.model.strip_prefix(lake::models::CURRENT_PREFIX) {
            if name.is_empty() {
                rep.error(at, Some(stage), "`model = \"current:\"` names no model: write `current:NAME` (a train stage's `model`, or its stage name)");
            }
            reads.push(lake::models::PROMOTIONS.to_string());
        } else if let Some(s) = visible.get(&self.model) {
            if s.field_with_name("model_id").is_err() {
                rep.error(at, Some(stage), format!("`model = \"{}\"` names a table without `model_id` (a train stage's table)", self.model));
            }
            reads.push(self.model.clone());
        }
        Checked { reads, writes: vec![(self.output.clone(), Catalog::builtin("embeddings"))], ..Default::default() }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let (model_id, dir) = resolve_model(&ctx.lake, &self.model).await?;
        let (spec, best) = model_files(&dir, &model_id)?;
        let device = train::pick_device(ctx.device.unwrap_or(self.device).as_str()).map_err(Error::Other)?;
        // Crops: the model's detector's boxes, from the crops table; streamed with the photos
        // when both are being written now, each photo then waiting for its box.
        let crops_streamed = spec.crop.is_some() && self.crops.as_deref().is_some_and(|c| ctx.is_streamed(c));
        let mut crops = if crops_streamed { HashMap::new() } else { crop_boxes(&ctx.lake, &spec, self.crops.as_deref()).await? };
        let mut uncropped = 0u64;
        let mut net = Net::load(&spec, &best, device).map_err(|e| Error::Other(e.to_string()))?;
        if self.channels_last {
            net.use_channels_last();
        }
        net.fold_batchnorm();
        let loader = Loader::new(spec.input_size, self.loader_threads, 0, ctx.lake.options().clone()).in_lake(ctx.lake.root());
        let loader = Arc::new(if self.crop_cache { loader.with_crop_cache(ctx.lake.clone()) } else { loader });
        if !ctx.is_streamed(&self.table) {
            if let Some(ds) = ctx.lake.open(&self.table).await? {
                ctx.progress.set_length(ds.count_rows(None).await.map_err(|e| Error::lance(&self.table, e))? as u64);
            }
        }
        ctx.progress.set_message(format!("{model_id}: photos"));
        let tta = if self.flip_tta { "flip" } else { "none" };
        // What the output already holds of this very embedding (model and TTA).
        let have = existing(&ctx.lake, &self.output, &model_id, tta).await?;
        let incremental = have.is_some();
        let have = have.unwrap_or_default();
        // Embedded photos by content: a photo renamed, moved or copied since keeps its embedding.
        let by_hash: HashMap<&str, &str> = have.iter().filter_map(|(u, e)| Some((e.hash.as_deref()?, u.as_str()))).collect();
        let keyed = ctx.lake.catalog().get(&self.table).is_some_and(|s| s.field_with_name("content_hash").is_ok());
        let mut hash_of: HashMap<String, String> = HashMap::new();
        // Photos whose bytes are embedded under another URI, with that URI.
        let mut reuse: Vec<(Photo, String)> = Vec::new();
        let mut seen_uris: std::collections::HashSet<String> = std::collections::HashSet::new();
        // Embedded photos whose label changed, by their new label.
        let mut relabel: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
        let columns: &[&str] = if keyed { &["photo_id", "uri", "individual_id", "content_hash"] } else { &["photo_id", "uri", "individual_id"] };
        let photos = ctx.read(&self.table, columns).map(Input::Photos);
        let mut input = match (crops_streamed, &self.crops, &spec.crop) {
            (true, Some(table), Some(c)) => {
                let boxes = ctx.read(table, &["photo_id", "detector_id", "x0", "y0", "x1", "y1"]).map(Input::Boxes);
                let ended = futures::stream::once(async { Input::BoxesEnded });
                futures::stream::select(photos, boxes.chain(ended)).boxed().map(move |i| (i, Some((table.clone(), c.detector.clone(), c.margin)))).boxed()
            }
            _ => photos.map(|i| (i, None)).boxed(),
        };
        let kind = if incremental { WriteKind::Append } else { WriteKind::Overwrite };
        let mut sink = ctx.sink(&self.output, Catalog::builtin("embeddings"), kind).await?;
        let (mut kept, mut total) = (0u64, 0u64);
        let mut net = Some(net);
        let mut pending: Vec<Photo> = Vec::new();
        // Streamed crops: photos whose box has not come yet, and whether the boxes are all in.
        let mut waiting: HashMap<String, Photo> = HashMap::new();
        let (mut boxes_done, mut boxes_seen) = (!crops_streamed, 0usize);
        let mut rows = 0u64;
        let mut dim = 0usize;
        loop {
            let next = input.next().await;
            let done = next.is_none();
            match next {
                None => {}
                Some((Input::Photos(b), _)) => {
                    let b = b?;
                    let c = Columns::new(&self.table, &b);
                    let (pid, uri, lab) = (c.strings("photo_id")?, c.strings("uri")?, c.strings("individual_id")?);
                    let hashes = if keyed { Some(c.strings("content_hash")?) } else { None };
                    for i in 0..b.num_rows() {
                        // A shard embeds the photos it owns.
                        if !ctx.owns(uri.value(i)) {
                            continue;
                        }
                        total += 1;
                        let hash = hashes.as_ref().filter(|h| h.is_valid(i)).map(|h| h.value(i));
                        if let Some(h) = hash {
                            hash_of.insert(uri.value(i).to_string(), h.to_string());
                        }
                        if incremental {
                            seen_uris.insert(uri.value(i).to_string());
                            if let Some(had) = have.get(uri.value(i)) {
                                // Embedded already; a changed label is a change of its row, not
                                // of its embedding.
                                let now = lab.is_valid(i).then(|| lab.value(i).to_string());
                                if had.label != now {
                                    relabel.entry(now).or_default().push(uri.value(i).to_string());
                                }
                                kept += 1;
                                ctx.progress.inc(1);
                                continue;
                            }
                            if let Some(old) = hash.and_then(|h| by_hash.get(h)) {
                                let label = lab.is_valid(i).then(|| lab.value(i).to_string());
                                let photo = Photo { photo_id: pid.value(i).to_string(), uri: uri.value(i).to_string(), label, ..Photo::default() };
                                reuse.push((photo, old.to_string()));
                                ctx.progress.inc(1);
                                continue;
                            }
                        }
                        let photo = Photo {
                            photo_id: pid.value(i).to_string(),
                            uri: uri.value(i).to_string(),
                            label: lab.is_valid(i).then(|| lab.value(i).to_string()),
                            crop: crops.get(pid.value(i)).copied(),
                            content_hash: hash.map(str::to_string),
                        };
                        if photo.crop.is_none() && !boxes_done {
                            waiting.insert(photo.photo_id.clone(), photo);
                        } else {
                            uncropped += u64::from(spec.crop.is_some() && photo.crop.is_none());
                            pending.push(photo);
                        }
                    }
                }
                Some((Input::Boxes(b), Some((table, detector, margin)))) => {
                    let b = b?;
                    let c = Columns::new(&table, &b);
                    let (pid, did) = (c.strings("photo_id")?, c.strings("detector_id")?);
                    let xy = [c.f32s("x0")?, c.f32s("y0")?, c.f32s("x1")?, c.f32s("y1")?];
                    for i in 0..b.num_rows() {
                        if did.value(i) != detector {
                            continue;
                        }
                        boxes_seen += 1;
                        let bx = vision::expand_box([xy[0].value(i), xy[1].value(i), xy[2].value(i), xy[3].value(i)], margin);
                        match waiting.remove(pid.value(i)) {
                            Some(mut p) => {
                                p.crop = Some(bx);
                                pending.push(p);
                            }
                            None => {
                                crops.insert(pid.value(i).to_string(), bx);
                            }
                        }
                    }
                }
                Some((Input::BoxesEnded, Some((table, detector, _)))) => {
                    if boxes_seen == 0 {
                        return Err(Error::Other(format!(
                            "crops table `{table}` holds no box of detector `{detector}`, which the model was trained with: run that detect stage first"
                        )));
                    }
                    boxes_done = true;
                    uncropped += waiting.len() as u64;
                    pending.extend(waiting.drain().map(|(_, p)| p));
                }
                Some((_, None)) => unreachable!("boxes come only with a crops table"),
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
                sink.send(embedding_batch(&chunk, &values, d, &model_id, tta, &ctx.run_id, &hash_of)?).await?;
                rows += chunk.len() as u64;
                ctx.progress.inc(chunk.len() as u64);
            }
            if done {
                break;
            }
        }
        if !reuse.is_empty() {
            sink.send(reused_rows(&ctx.lake, &self.output, &reuse, &ctx.run_id, &hash_of).await?).await?;
        }
        let mut version = sink.finish().await?.version;
        loader.flush_or_warn(&ctx.name).await;
        // Photos that left the input leave the table.
        let gone: Vec<&String> = if incremental { have.keys().filter(|u| !seen_uris.contains(*u) && ctx.owns(u)).collect() } else { Vec::new() };
        for chunk in gone.chunks(1000) {
            let list = chunk.iter().map(|u| format!("'{}'", u.replace('\'', "''"))).collect::<Vec<_>>().join(", ");
            if let Some(v) = ctx.delete_where(&self.output, &format!("uri IN ({list})")).await? {
                version = v;
            }
        }
        let relabelled: usize = relabel.values().map(Vec::len).sum();
        for (label, uris) in &relabel {
            let value = label.as_deref().map_or("NULL".to_string(), lake::tables::sql_string);
            for chunk in uris.chunks(1000) {
                let list = chunk.iter().map(|u| lake::tables::sql_string(u)).collect::<Vec<_>>().join(", ");
                if let Some(v) = ctx.update_where(&self.output, &format!("uri IN ({list})"), "individual_id", &value).await? {
                    version = v;
                }
            }
        }
        // Reused embeddings whose old name left the input: the photo was renamed or moved.
        // (Counted once per old name: a photo renamed and copied is one move and one copy.)
        let moved = reuse.iter().map(|(_, old)| old).filter(|old| !seen_uris.contains(*old) && ctx.owns(old)).collect::<std::collections::HashSet<_>>().len();
        let how = if incremental {
            let relabelled = if relabelled > 0 { format!(", {relabelled} relabelled") } else { String::new() };
            let reused = match (reuse.len(), moved) {
                (0, _) => String::new(),
                (n, 0) => format!(", {n} copies of embedded photos (embedding reused)"),
                (n, m) => format!(", {n} photos already embedded under another name ({m} renamed or moved; embedding reused)"),
            };
            format!("{rows} new photos embedded, {kept} already embedded{reused}{relabelled}, {} removed", gone.len() - moved)
        } else {
            format!("{rows} photos embedded")
        };
        let how = if uncropped > 0 { format!("{how} ({uncropped} without a detection, embedded whole)") } else { how };
        Ok(Outcome {
            rows_in: total,
            rows_out: rows,
            written: BTreeMap::from([(self.output.clone(), version)]),
            summary: format!(
                "{how} with {model_id} ({}{}){}",
                if dim > 0 { format!("{dim}-d") } else { "model unchanged".into() },
                if self.flip_tta { ", flip TTA" } else { "" },
                if rows > 0 { format!("; {}", loader.summary()) } else { String::new() },
            ),
            changes: engine::stage::Changes {
                new: Some(rows + (reuse.len() - moved) as u64),
                changed: Some((relabelled + moved) as u64),
                deleted: Some((gone.len() - moved) as u64),
                rejected: None,
            },
        })
    }
}



/// The crop of every photo the model's detector found, by photo id, margin included; empty for
/// a model that sees whole photos. `table` overrides the table the model was trained with.
pub async fn crop_boxes(lake: &Lake, spec: &NetSpec, table: Option<&str>) -> Result<HashMap<String, [f32; 4]>> {
    let Some(c) = &spec.crop else { return Ok(HashMap::new()) };
    let (_, boxes) = lake::tables::read_boxes(lake, table.unwrap_or(&c.table), Some(&c.detector)).await?;
    Ok(boxes.into_iter().map(|(k, b)| (k, vision::expand_box(b, c.margin))).collect())
}

/// Rows of `table` for photos whose bytes it holds under another URI (`reuse`: the photo as it is
/// now, and that URI): the embedding and model as they were, the rest as the photo is now.
async fn reused_rows(lake: &Lake, table: &str, reuse: &[(Photo, String)], run_id: &str, hash_of: &HashMap<String, String>) -> Result<RecordBatch> {
    let ds = lake.open(table).await?.ok_or_else(|| Error::Other(format!("table `{table}` went away while embedding")))?;
    let mut olds: Vec<&str> = reuse.iter().map(|(_, old)| old.as_str()).collect();
    olds.sort_unstable();
    olds.dedup();
    let mut batches = Vec::new();
    for chunk in olds.chunks(1000) {
        let list = chunk.iter().map(|u| lake::tables::sql_string(u)).collect::<Vec<_>>().join(", ");
        batches.extend(lake::tables::rows_where(&ds, table, &format!("uri IN ({list})"), None).await?);
    }
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| Error::Other(format!("table `{table}`: the embedded rows to reuse are gone")))?;
    let all = arrow::compute::concat_batches(&schema, &batches)?;
    let c = Columns::new(table, &all);
    let uris = c.strings("uri")?;
    let row_of: HashMap<&str, u32> = (0..all.num_rows()).map(|i| (uris.value(i), i as u32)).collect();
    let idx = reuse
        .iter()
        .map(|(_, old)| row_of.get(old.as_str()).copied().ok_or_else(|| Error::Other(format!("table `{table}`: no row for `{old}` to reuse"))))
        .collect::<Result<Vec<u32>>>()?;
    let idx = arrow::array::UInt32Array::from(idx);
    let photos: Vec<&Photo> = reuse.iter().map(|(p, _)| p).collect();
    let target = Catalog::builtin("embeddings");
    let mut fields = Vec::new();
    let mut cols: Vec<arrow::array::ArrayRef> = Vec::new();
    for f in target.fields() {
        let col: arrow::array::ArrayRef = match f.name().as_str() {
            "photo_id" => Arc::new(arrow::array::StringArray::from_iter_values(photos.iter().map(|p| p.photo_id.as_str()))),
            "uri" => Arc::new(arrow::array::StringArray::from_iter_values(photos.iter().map(|p| p.uri.as_str()))),
            "individual_id" => Arc::new(arrow::array::StringArray::from(photos.iter().map(|p| p.label.as_deref()).collect::<Vec<_>>())),
            "run_id" => Arc::new(arrow::array::StringArray::from(vec![run_id; photos.len()])),
            "content_hash" => Arc::new(arrow::array::StringArray::from_iter(photos.iter().map(|p| hash_of.get(&p.uri).map(String::as_str)))),
            name => {
                let col = all.column_by_name(name).ok_or_else(|| Error::Schema { table: table.into(), column: name.into(), detail: "missing".into() })?;
                arrow::compute::take(col, &idx, None)?
            }
        };
        fields.push(arrow::datatypes::Field::new(f.name(), col.data_type().clone(), f.is_nullable()));
        cols.push(col);
    }
    Ok(RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), cols)?)
}

/// What embed reads: photos, and (streamed crops) the detector's boxes, then their end.
enum Input {
    Photos(Result<RecordBatch>),
    Boxes(Result<RecordBatch>),
    BoxesEnded,
}

/// An embedded photo: its label and content hash (None on rows written without one).
struct Embedded {
    label: Option<String>,
    hash: Option<String>,
}

/// URIs in `table`, with their labels and hashes, when every row of it is of `model_id` with
/// `tta`; None when the table is missing, empty or of another embedding (then it is rewritten
/// whole).
async fn existing(lake: &Lake, table: &str, model_id: &str, tta: &str) -> Result<Option<HashMap<String, Embedded>>> {
    let Some(ds) = lake.open(table).await? else { return Ok(None) };
    if ds.schema().field("tta").is_none() {
        return Ok(None);
    }
    let hashed = ds.schema().field("content_hash").is_some();
    let mut scan = ds.scan();
    let columns: &[&str] = if hashed { &["uri", "model_id", "tta", "individual_id", "content_hash"] } else { &["uri", "model_id", "tta", "individual_id"] };
    scan.project(columns).map_err(|e| Error::lance(table, e))?;
    let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
    let mut uris = HashMap::new();
    while let Some(b) = stream.try_next().await.map_err(|e| Error::lance(table, e))? {
        let (u, m, t) = (b.column(0).as_string::<i32>(), b.column(1).as_string::<i32>(), b.column(2).as_string::<i32>());
        let c = Columns::new(table, &b);
        let l = c.strings("individual_id")?;
        let h = if hashed { Some(c.strings("content_hash")?) } else { None };
        for i in 0..b.num_rows() {
            if m.value(i) != model_id || t.value(i) != tta {
                return Ok(None);
            }
            let hash = h.as_ref().filter(|h| h.is_valid(i)).map(|h| h.value(i).to_string());
            uris.insert(u.value(i).to_string(), Embedded { label: l.is_valid(i).then(|| l.value(i).to_string()), hash });
        }
    }
    Ok((!uris.is_empty()).then_some(uris))
}

impl Stage for EmbedStage {
    fn describe(&self) -> String {
        format!("embed {} with {}", self.table, self.model)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(EmbedStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn streams(&self, table: &str) -> bool {
        table == self.table || self.crops.as_deref() == Some(table)
    }

    fn shards(&self) -> bool {
        true
    }

    fn wants_gpu(&self, run_device: Option<engine::config::Device>) -> bool {
        train::pick_device(run_device.unwrap_or(self.device).as_str()).is_ok_and(|d| d.is_cuda())
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(EmbedStage::run(self, ctx))
    }
}
