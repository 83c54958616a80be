//! Stage kind `ingest`: lists photos under an object-store prefix, fetches the new or changed
//! ones with bounded concurrency, decodes them off the async workers, measures them
//! ([`vision::analyze`]), hashes them, joins their labels, and upserts table `images`
//! (keyed on the object URI). Objects that cannot be read go to table `rejects` with the
//! reason and the run goes on. Re-running over the same source adds no rows.
//!
//! ```toml
//! [stages.ingest]
//! kind = "ingest"
//! source = "file://../data/demo-lake/photos"   # or s3://bucket/prefix, gs://, az://
//! labels = "file://../data/demo-lake/labels.csv" # CSV or Parquet
//! include = ["*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff"]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array,
};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use tokio::sync::Semaphore;

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Reporter};
use engine::StageCtx;
use lake::{Catalog, WriteKind, store};
use vision::{self, Analysis, DecodeLimits, VisionError};
use crate::{Error, Result};

const KEYS: &[&str] = &[
    "source",
    "labels",
    "labels_photo_column",
    "labels_id_column",
    "include",
    "concurrency",
    "decode_threads",
    "max_pixels",
    "batch_size",
    "storage_options",
];

const DEFAULT_INCLUDE: &[&str] = &["*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff", "*.webp", "*.gif", "*.bmp", "*.heic", "*.heif"];

#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Resolved source URI (no trailing slash).
    pub source: String,
    pub labels: Option<String>,
    pub labels_photo_column: String,
    pub labels_id_column: String,
    pub include: Vec<String>,
    /// Objects fetched (and held in memory) at once.
    pub concurrency: usize,
    /// Photos decoded at once (default: the number of cores).
    pub decode_threads: usize,
    pub max_pixels: u64,
    pub batch_size: usize,
    pub storage_options: BTreeMap<String, String>,
    /// Photos are recorded relative to the lake (source and lake both written relative to the
    /// pipeline file): the project folder can move without re-ingesting anything.
    pub relative: bool,
}

impl IngestConfig {
    pub fn parse(k: &mut Keys, ctx: &Context) -> Option<IngestConfig> {
        let mut ok = true;
        let mut relative = false;
        let source = match k.str("source") {
            Some(s) => match ctx.location(&s) {
                Ok(u) if ctx.recorded_relative(&s) => {
                    relative = true;
                    Some(u)
                }
                Ok(u) => Some(u),
                Err(e) => {
                    k.error("source", e.to_string());
                    None
                }
            },
            None => {
                if !k.has("source") {
                    k.missing("source", "where the photos are: a path, file://, s3://, gs:// or az:// prefix");
                }
                None
            }
        };
        let labels = match k.str("labels") {
            Some(s) => match ctx.location(&s) {
                Ok(u) => Some(u),
                Err(e) => {
                    k.error("labels", e.to_string());
                    ok = false;
                    None
                }
            },
            None => None,
        };
        let include = k.str_list("include").unwrap_or_else(|| DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect());
        if let Err(e) = globs(&include) {
            k.error("include", e);
            ok = false;
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let cfg = IngestConfig {
            source: source.unwrap_or_default(),
            labels,
            labels_photo_column: k.str("labels_photo_column").unwrap_or_else(|| "photo".into()),
            labels_id_column: k.str("labels_id_column").unwrap_or_else(|| "individual_id".into()),
            include,
            concurrency: k.int("concurrency", 1, 1024).unwrap_or(16) as usize,
            decode_threads: k.int("decode_threads", 1, 256).map(|n| n as usize).unwrap_or(cores),
            max_pixels: k.int("max_pixels", 1, 4_000_000_000).unwrap_or(120_000_000) as u64,
            batch_size: k.int("batch_size", 1, 1_000_000).unwrap_or(256) as usize,
            storage_options: k.str_map("storage_options").unwrap_or_default().into_iter().collect(),
            relative,
        };
        engine::stage::finish_keys(k, KEYS);
        (ok && !cfg.source.is_empty()).then_some(cfg)
    }

    /// The pipeline's storage options (`[pipeline] storage_options` and `[pipeline.storage]`:
    /// retries, timeouts, endpoints) overridden by this stage's own `storage_options`.
    fn options(&self, ctx: &StageCtx) -> HashMap<String, String> {
        let mut o = ctx.lake.options().clone();
        o.extend(self.storage_options.clone());
        o
    }

    /// Lists the source and fingerprints the listing and the labels file.
    pub async fn prepare(&self, ctx: &StageCtx) -> Result<Prepared> {
        let (store, prefix) = store::open(&self.source, &self.options(ctx))?;
        let include = globs(&self.include).map_err(Error::Other)?;
        let all: Vec<ObjectMeta> =
            store.list(Some(&prefix)).map_err(|e| Error::ObjectStore { uri: self.source.clone(), source: e }).try_collect().await?;
        // Objects the globs leave out are counted and named in the summary, never dropped
        // without a word (a `.heic` survey, an upper-case extension not listed).
        let (mut objects, left_out): (Vec<ObjectMeta>, Vec<ObjectMeta>) =
            all.into_iter().partition(|m| include.is_match(relative(&prefix, &m.location).as_str()));
        let mut skipped: Vec<String> = left_out.iter().map(|m| relative(&prefix, &m.location)).collect();
        skipped.sort();
        if objects.is_empty() {
            // An empty or mistyped source is almost always a mistake; say so instead of
            // "succeeding" with nothing.
            return Err(Error::Location {
                uri: self.source.clone(),
                reason: format!(
                    "no objects matching {} under it{}",
                    self.include.join(", "),
                    if skipped.is_empty() { String::new() } else { format!(" ({} others: {})", skipped.len(), first_few(&skipped, 3)) }
                ),
            });
        }
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        // Of the listing, what does not change when the project folder moves: each object's
        // path under the source, size and tag (for local files, modification time and size).
        let mut h = blake3::Hasher::new();
        for m in &objects {
            h.update(relative(&prefix, &m.location).as_bytes());
            h.update(&[0]);
            h.update(self.tag(m).as_bytes());
            h.update(&[0]);
        }
        // The labels file by its content.
        if let Some(l) = &self.labels {
            let (lstore, lpath) = store::open(l, &self.options(ctx))?;
            let err = |e: object_store::Error| Error::Labels { uri: l.clone(), detail: e.to_string() };
            let bytes = lstore.get(&lpath).await.map_err(err)?.bytes().await.map_err(err)?;
            h.update(b"labels");
            h.update(blake3::hash(&bytes).as_bytes());
        }
        // People's decisions (the review page's, `pipeline decide`'s) by what they do to labels.
        let decided = lake::decisions::latest(&ctx.lake).await?;
        if !decided.is_empty() {
            h.update(b"decisions");
            h.update(lake::decisions::effects_digest(&decided).as_bytes());
        }
        let base = h.finalize().to_hex().to_string();
        ctx.progress.set_message(format!("{} objects listed", objects.len()));
        Ok(Prepared {
            fingerprint: Some(with_retries(&base, retryable_rejects(ctx).await?, &ctx.run_id)),
            state: Some(Box::new(Listing { store, prefix, objects, skipped, fingerprint: base, decided })),
        })
    }

    pub async fn run(&self, ctx: &StageCtx, mut prepared: Prepared) -> Result<Outcome> {
        let Listing { store, prefix, objects, skipped, fingerprint, decided } =
            prepared.take::<Listing>().ok_or_else(|| Error::Other("ingest ran without its listing".into()))?;
        let (labels, labels_note) = match &self.labels {
            Some(l) => {
                let rows = load_labels(l, &self.options(ctx), &self.labels_photo_column, &self.labels_id_column).await?;
                let rels: Vec<String> = objects.iter().map(|m| relative(&prefix, &m.location)).collect();
                let (labels, note) = rows.resolve(l, rels.iter().map(String::as_str))?;
                (Some(labels), note)
            }
            None => (None, String::new()),
        };
        // A photo's label: its latest decision's when a person named it (or took it away),
        // else the labels file's.
        let label_of = |rel: &str| -> Option<String> {
            lake::decisions::label(&decided, rel, labels.as_ref().and_then(|l| l.get(rel).cloned()))
        };
        // And what a person decided (`images.decision`: a bad photo leaves `usable`).
        let decision_of = |rel: &str| lake::decisions::standing(&decided, rel);
        let decisions_note = match lake::decisions::counts(&decided) {
            (0, 0, 0) => String::new(),
            (same, new, bad) => format!("; people's decisions: {same} same as a known individual, {new} new individuals, {bad} bad photos"),
        };
        let etag = |m: &ObjectMeta| self.tag(m);
        // How rows name their photo: relative to the lake when both were written relative,
        // unless the lake already records this source's photos by absolute URI (a lake made
        // before lake-relative records, kept as it is).
        let (images_before, image_hashes) = recorded_hashes(ctx).await?;
        let image_uris: Vec<String> = image_hashes.iter().map(|(u, _)| u.clone()).collect();
        let reject_uris = recorded_uris(ctx, "rejects").await?;
        // Photos of the lake by content: an object whose bytes are one of them (renamed, moved,
        // copied, or touched) takes that row's measurements instead of being decoded again.
        let by_hash: Arc<HashMap<String, String>> =
            Arc::new(image_hashes.into_iter().filter_map(|(u, h)| Some((h?, u))).collect());
        let legacy = self.relative && image_uris.iter().any(|u| u.starts_with(&format!("{}/", self.source)));
        let record_relative = self.relative && !legacy;
        let root = ctx.lake.root().to_string();
        let uri_of = |m: &ObjectMeta| {
            let abs = format!("{}/{}", self.source, relative(&prefix, &m.location));
            if record_relative { store::lake_relative(&root, &abs).unwrap_or(abs) } else { abs }
        };
        let current: HashMap<String, String> = objects.iter().map(|m| (uri_of(m), etag(m))).collect();
        // How this source's rows begin, to tell them from other sources' rows in the lake.
        let mine = if record_relative { store::lake_relative(&root, &self.source).unwrap_or(self.source.clone()) } else { self.source.clone() };
        let gone_uris: std::collections::HashSet<String> =
            image_uris.iter().filter(|u| u.starts_with(&format!("{mine}/")) && !current.contains_key(*u)).cloned().collect();
        let gone = delete_gone(ctx, &format!("{mine}/"), &current, [("images", image_uris), ("rejects", reject_uris)]).await?;
        // A shard does its part of the listing (every object's URI is one shard's).
        let objects: Vec<ObjectMeta> = objects.into_iter().filter(|m| ctx.owns(&uri_of(m))).collect();
        let listed = objects.len() as u64;

        let images_schema = Catalog::builtin("images");
        let mut images = ctx.sink("images", images_schema.clone(), WriteKind::Merge { keys: vec!["uri".into()], update_existing: true }).await?;
        let mut rejects = ctx.sink("rejects", Catalog::builtin("rejects"), WriteKind::Merge { keys: vec!["uri".into()], update_existing: true }).await?;

        // What the lake already has: unchanged objects are not fetched again; rows whose label
        // changed in the labels file are rewritten with the new label.
        let mut known: HashMap<String, String> = HashMap::new();
        let mut relabelled = 0u64;
        if let Some(ds) = ctx.lake.open("images").await? {
            let mut stream = ds.scan().try_into_stream().await.map_err(|e| Error::lance("images", e))?;
            while let Some(batch) = stream.try_next().await.map_err(|e| Error::lance("images", e))? {
                let uris = batch.column_by_name("uri").map(|c| c.as_string::<i32>().clone());
                // A table made before `images.decision`: no photo had one.
                let decisions = batch.column_by_name("decision").map(|c| c.as_string::<i32>().clone());
                let (Some(uris), Some(tags), Some(ids), Some(pids)) = (
                    uris,
                    batch.column_by_name("etag").map(|c| c.as_string::<i32>().clone()),
                    batch.column_by_name("individual_id").map(|c| c.as_string::<i32>().clone()),
                    batch.column_by_name("photo_id").map(|c| c.as_string::<i32>().clone()),
                ) else {
                    return Err(Error::Schema { table: "images".into(), column: "uri".into(), detail: "existing table lacks key columns".into() });
                };
                let mut changed = Vec::with_capacity(batch.num_rows());
                let mut new_ids: Vec<Option<String>> = Vec::with_capacity(batch.num_rows());
                let mut new_decisions: Vec<Option<&str>> = Vec::with_capacity(batch.num_rows());
                for i in 0..batch.num_rows() {
                    let tag = tags.is_valid(i).then(|| tags.value(i).to_string());
                    known.insert(uris.value(i).to_string(), tag.unwrap_or_default());
                    let still_listed = current.contains_key(uris.value(i));
                    let new_label = if labels.is_some() || decided.contains_key(pids.value(i)) {
                        label_of(pids.value(i))
                    } else {
                        ids.is_valid(i).then(|| ids.value(i).to_string())
                    };
                    let old_label = ids.is_valid(i).then(|| ids.value(i).to_string());
                    let new_decision = decision_of(pids.value(i));
                    let old_decision = decisions.as_ref().and_then(|d| d.is_valid(i).then(|| d.value(i)));
                    changed.push(still_listed && (new_label != old_label || new_decision != old_decision) && ctx.owns(uris.value(i)));
                    new_ids.push(new_label);
                    new_decisions.push(new_decision);
                }
                if changed.iter().any(|c| *c) {
                    let mask = BooleanArray::from(changed);
                    // The row as it is, with its label and decision as they are now (and any
                    // column declared since the row was written, null).
                    let mut cols: Vec<ArrayRef> = Vec::with_capacity(images_schema.fields().len());
                    for f in images_schema.fields() {
                        cols.push(match f.name().as_str() {
                            "individual_id" => Arc::new(StringArray::from(std::mem::take(&mut new_ids))),
                            "decision" => Arc::new(StringArray::from(std::mem::take(&mut new_decisions))),
                            name => match batch.column_by_name(name) {
                                Some(c) => c.clone(),
                                None if f.is_nullable() => arrow::array::new_null_array(f.data_type(), batch.num_rows()),
                                None => return Err(Error::Schema { table: "images".into(), column: name.into(), detail: "missing in the earlier table".into() }),
                            },
                        });
                    }
                    let relabel = RecordBatch::try_new(images_schema.clone(), cols)?;
                    let relabel = arrow::compute::filter_record_batch(&relabel, &mask)?;
                    relabelled += relabel.num_rows() as u64;
                    images.send(relabel).await?;
                }
            }
        }
        // Rejected objects are not fetched again while unchanged, except those whose fetch
        // failed (a timeout, a storage error): they are tried again every run until they read.
        let mut retry: std::collections::HashSet<String> = std::collections::HashSet::new();
        if let Some(ds) = ctx.lake.open("rejects").await? {
            let mut scan = ds.scan();
            scan.project(&["uri", "etag", "reason"]).map_err(|e| Error::lance("rejects", e))?;
            let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance("rejects", e))?;
            while let Some(batch) = stream.try_next().await.map_err(|e| Error::lance("rejects", e))? {
                let c = lake::tables::Columns::new("rejects", &batch);
                let (uris, tags, reasons) = (c.strings("uri")?, c.strings("etag")?, c.strings("reason")?);
                for i in 0..batch.num_rows() {
                    if reasons.value(i) == RETRYABLE {
                        retry.insert(uris.value(i).to_string());
                        continue;
                    }
                    known.insert(uris.value(i).to_string(), if tags.is_valid(i) { tags.value(i).to_string() } else { String::new() });
                }
            }
        }
        let todo: Vec<ObjectMeta> =
            objects.into_iter().filter(|m| known.get(&uri_of(m)).is_none_or(|t| !same_tag(t, &etag(m)))).collect();
        let unchanged = listed - todo.len() as u64;
        ctx.progress.set_length(todo.len() as u64);
        ctx.progress.set_message("photos");

        let limits = DecodeLimits { max_pixels: self.max_pixels };
        let decode_slots = Arc::new(Semaphore::new(self.decode_threads));
        let run_id = ctx.run_id.clone();
        let mut results = futures::stream::iter(todo)
            .map(|meta| {
                let store = store.clone();
                let slots = decode_slots.clone();
                let limits = limits.clone();
                let key = relative(&prefix, &meta.location);
                let by_hash = by_hash.clone();
                async move {
                    let fetched = fetch(store.as_ref(), &meta.location, || ctx.fetch_fault(&key)).await;
                    let outcome = match fetched {
                        Err(e) => Err((RETRYABLE, e)),
                        Ok(bytes) => {
                            // Decoding is CPU-bound: it runs on the blocking pool, at most
                            // `decode_threads` at once, so the async workers keep fetching.
                            let _permit = slots.acquire_owned().await;
                            let b = bytes.clone();
                            match tokio::task::spawn_blocking(move || {
                                let hash = blake3::hash(&b).to_hex().to_string();
                                match by_hash.get(&hash) {
                                    Some(had) => Ok(Got::Known { had: had.clone() }),
                                    None => vision::analyze(&b, &limits).map(|a| Got::Decoded(Box::new(a), hash)),
                                }
                            })
                            .await
                            {
                                Ok(Ok(ok)) => Ok(ok),
                                Ok(Err(e)) => Err((reason(&e), e.to_string())),
                                Err(e) => Err(("decode_error", format!("decoder panicked: {e}"))),
                            }
                        }
                    };
                    (meta, outcome)
                }
            })
            .buffer_unordered(self.concurrency);

        let mut img_rows: Vec<ImageRow> = Vec::new();
        let mut rej_rows: Vec<RejectRow> = Vec::new();
        let mut n_retryable = 0usize;
        let (mut n_images, mut n_rejects) = (0u64, 0u64);
        let mut decoded_uris = Vec::new();
        // Objects whose bytes the lake has under a URI: (object, its URI now, that URI).
        let mut known_bytes: Vec<(ObjectMeta, String, String)> = Vec::new();
        while let Some((meta, outcome)) = results.next().await {
            ctx.progress.inc(1);
            let rel = relative(&prefix, &meta.location);
            let uri = uri_of(&meta);
            match outcome {
                Ok(Got::Known { had }) => {
                    if known.contains_key(&uri) || retry.contains(&uri) {
                        decoded_uris.push(uri.clone());
                    }
                    known_bytes.push((meta, uri, had));
                }
                Ok(Got::Decoded(analysis, content_hash)) => {
                    let analysis = *analysis;
                    n_images += 1;
                    if known.contains_key(&uri) || retry.contains(&uri) {
                        decoded_uris.push(uri.clone());
                    }
                    img_rows.push(ImageRow {
                        individual_id: label_of(&rel),
                        decision: decision_of(&rel),
                        photo_id: rel,
                        uri,
                        size_bytes: meta.size as i64,
                        etag: etag(&meta),
                        last_modified: meta.last_modified,
                        analysis,
                        content_hash,
                    });
                }
                Err((why, detail)) => {
                    n_rejects += 1;
                    n_retryable += usize::from(why == RETRYABLE);
                    tracing::debug!(%uri, why, %detail, "rejected");
                    rej_rows.push(RejectRow { photo_id: rel, uri, size_bytes: meta.size as i64, etag: etag(&meta), reason: why, detail });
                }
            }
            if img_rows.len() >= self.batch_size {
                images.send(image_batch(&std::mem::take(&mut img_rows), &run_id)?).await?;
            }
            if rej_rows.len() >= self.batch_size {
                rejects.send(reject_batch(&std::mem::take(&mut rej_rows), &run_id)?).await?;
            }
        }
        if !img_rows.is_empty() {
            images.send(image_batch(&img_rows, &run_id)?).await?;
        }
        // Renamed, moved, copied or touched photos: their earlier row (read at the version
        // before this run deleted what left the source) under today's name.
        let mut moved = 0u64;
        if let (false, Some(v)) = (known_bytes.is_empty(), images_before) {
            let ds = ctx.lake.open("images").await?.ok_or_else(|| Error::Other("table `images` went away during ingest".into()))?;
            let before = ds.checkout_version(v).await.map_err(|e| Error::lance("images", e))?;
            for chunk in known_bytes.chunks(self.batch_size) {
                let rows: Vec<Carried> = chunk
                    .iter()
                    .map(|(m, uri, had)| {
                        let rel = relative(&prefix, &m.location);
                        Carried { meta: m, uri: uri.clone(), label: label_of(&rel), decision: decision_of(&rel), etag: etag(m), had }
                    })
                    .collect();
                images.send(carried_rows(&before, &rows, &prefix, &run_id).await?).await?;
            }
            moved = known_bytes.iter().map(|(_, _, had)| had).filter(|had| gone_uris.contains(*had)).collect::<std::collections::HashSet<_>>().len() as u64;
        }
        // Bytes the lake had under this very name (a file touched, or rewritten as it was).
        let touched = known_bytes.iter().filter(|(_, uri, had)| uri == had).count() as u64;
        let copies = known_bytes.len() as u64 - moved - touched;
        let unchanged = unchanged + touched;
        if !rej_rows.is_empty() {
            rejects.send(reject_batch(&rej_rows, &run_id)?).await?;
        }
        let img = images.finish().await?;
        let rej = rejects.finish().await?;
        // Whether this run left objects to retry decides the fingerprint it leaves behind.
        ctx.leave_fingerprint(with_retries(&fingerprint, n_retryable, &ctx.run_id));
        let mut written = BTreeMap::from([("images".to_string(), img.version), ("rejects".to_string(), rej.version)]);
        // An object that used to be rejected and now reads fine (it was replaced) leaves rejects.
        if !decoded_uris.is_empty() {
            let list = decoded_uris.iter().map(|u| format!("'{}'", u.replace('\'', "''"))).collect::<Vec<_>>().join(", ");
            if let Some(v) = ctx.delete_where("rejects", &format!("uri IN ({list})")).await? {
                written.insert("rejects".into(), v);
            }
        }
        Ok(Outcome {
            rows_in: listed,
            rows_out: n_images + known_bytes.len() as u64,
            written,
            summary: format!(
                "{listed} listed, {unchanged} unchanged, {} new photos, {n_rejects} rejected{}{}{}{}{}{decisions_note}",
                n_images + copies,
                if moved > 0 { format!(", {moved} renamed or moved (same bytes)") } else { String::new() },
                if relabelled > 0 { format!(", {relabelled} relabelled") } else { String::new() },
                if gone > moved { format!(", {} gone from the source", gone - moved) } else { String::new() },
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!("; {} skipped (not matching {}: {})", skipped.len(), self.include.join(", "), first_few(&skipped, 3))
                },
                if labels_note.is_empty() { String::new() } else { format!("; {labels_note}") },
            ),
            changes: engine::stage::Changes {
                new: Some(n_images + copies),
                changed: Some(relabelled + moved),
                deleted: Some(gone.saturating_sub(moved)),
                rejected: Some(n_rejects),
            },
        })
    }
}

impl IngestConfig {
    /// An object's version tag: the store's e-tag; for local files their modification time and
    /// size (the local store's e-tag also holds the inode, which a copy of the folder changes).
    fn tag(&self, m: &ObjectMeta) -> String {
        let local = format!("{:x}-{:x}", m.last_modified.timestamp_micros(), m.size);
        if self.source.starts_with("file://") { local } else { m.e_tag.clone().unwrap_or(local) }
    }
}

/// Whether `old`, a tag recorded in the lake, is the tag `new`: equal, or a local e-tag of an
/// earlier version (`inode-mtime-size`) with the same modification time and size.
fn same_tag(old: &str, new: &str) -> bool {
    old == new || old.strip_suffix(new).is_some_and(|head| head.ends_with('-') && !head[..head.len() - 1].contains('-'))
}

/// What a fetched object is: new bytes, decoded and measured; or bytes the lake already has
/// under the URI `had` (not decoded again).
enum Got {
    Decoded(Box<Analysis>, String),
    Known { had: String },
}

/// The version of `images` before this run and its `uri` and `content_hash` columns (None and
/// empty when the table does not exist yet).
async fn recorded_hashes(ctx: &StageCtx) -> Result<(Option<u64>, Vec<(String, Option<String>)>)> {
    let Some(ds) = ctx.lake.open("images").await? else { return Ok((None, Vec::new())) };
    let hashed = ds.schema().field("content_hash").is_some();
    let mut scan = ds.scan();
    scan.project(if hashed { &["uri", "content_hash"][..] } else { &["uri"][..] }).map_err(|e| Error::lance("images", e))?;
    let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance("images", e))?;
    let mut out = Vec::new();
    while let Some(b) = stream.try_next().await.map_err(|e| Error::lance("images", e))? {
        let c = lake::tables::Columns::new("images", &b);
        let uris = c.strings("uri")?;
        let hashes = if hashed { Some(c.strings("content_hash")?) } else { None };
        for i in 0..b.num_rows() {
            out.push((uris.value(i).to_string(), hashes.as_ref().filter(|h| h.is_valid(i)).map(|h| h.value(i).to_string())));
        }
    }
    Ok((Some(ds.version().version), out))
}

/// An object whose bytes the lake holds under the URI `had`.
struct Carried<'a> {
    meta: &'a ObjectMeta,
    uri: String,
    label: Option<String>,
    decision: Option<&'static str>,
    etag: String,
    had: &'a str,
}

/// Rows of `images` for objects whose bytes `before` holds under another URI: the measurements
/// and hashes as they were, the object's name, tag, size, time and label as they are now.
async fn carried_rows(before: &lance::Dataset, rows: &[Carried<'_>], prefix: &ObjectPath, run_id: &str) -> Result<RecordBatch> {
    let mut olds: Vec<&str> = rows.iter().map(|r| r.had).collect();
    olds.sort_unstable();
    olds.dedup();
    let list = olds.iter().map(|u| lake::tables::sql_string(u)).collect::<Vec<_>>().join(", ");
    let batches = lake::tables::rows_where(before, "images", &format!("uri IN ({list})"), None).await?;
    let schema = Catalog::builtin("images");
    let all = match batches.first() {
        Some(b) => arrow::compute::concat_batches(&b.schema(), &batches)?,
        None => return Err(Error::Other("table `images`: the rows of photos to carry over are gone".into())),
    };
    let uris = lake::tables::Columns::new("images", &all).strings("uri")?.clone();
    let row_of: HashMap<&str, u32> = (0..all.num_rows()).map(|i| (uris.value(i), i as u32)).collect();
    let idx = rows
        .iter()
        .map(|r| row_of.get(r.had).copied().ok_or_else(|| Error::Other(format!("table `images`: no row for `{}` to carry over", r.had))))
        .collect::<Result<Vec<u32>>>()?;
    let idx = arrow::array::UInt32Array::from(idx);
    let now = Utc::now().timestamp_micros();
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let col: ArrayRef = match f.name().as_str() {
            "photo_id" => Arc::new(StringArray::from_iter_values(rows.iter().map(|r| relative(prefix, &r.meta.location)))),
            "uri" => Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.uri.as_str()))),
            "individual_id" => Arc::new(StringArray::from(rows.iter().map(|r| r.label.clone()).collect::<Vec<_>>())),
            "decision" => Arc::new(StringArray::from(rows.iter().map(|r| r.decision).collect::<Vec<_>>())),
            "size_bytes" => Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.meta.size as i64))),
            "etag" => Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.etag.as_str()))),
            "last_modified" => ts(rows.iter().map(|r| r.meta.last_modified.timestamp_micros()).collect()),
            "ingested_at" => ts(vec![now; rows.len()]),
            "run_id" => Arc::new(StringArray::from(vec![run_id; rows.len()])),
            name => match all.column_by_name(name) {
                Some(c) => arrow::compute::take(c, &idx, None)?,
                // A column added to `images` after that row was written.
                None if f.is_nullable() => arrow::array::new_null_array(f.data_type(), rows.len()),
                None => return Err(Error::Schema { table: "images".into(), column: name.into(), detail: "missing in the earlier table".into() }),
            },
        };
        cols.push(col);
    }
    Ok(RecordBatch::try_new(schema, cols)?)
}

/// The `uri` column of `table` (empty when the table does not exist yet).
async fn recorded_uris(ctx: &StageCtx, table: &str) -> Result<Vec<String>> {
    let Some(ds) = ctx.lake.open(table).await? else { return Ok(Vec::new()) };
    let mut scan = ds.scan();
    scan.project(&["uri"]).map_err(|e| Error::lance(table, e))?;
    let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
    let mut out = Vec::new();
    while let Some(b) = stream.try_next().await.map_err(|e| Error::lance(table, e))? {
        out.extend(lake::tables::Columns::new(table, &b).strings("uri")?.iter().flatten().map(str::to_string));
    }
    Ok(out)
}

/// The reject reason of an object that could not be fetched (after [`FETCH_ATTEMPTS`]): it is
/// tried again next run. Every other reason is for a file that was read and is what it is.
const RETRYABLE: &str = "fetch_error";

/// Tries to fetch an object this many times, with exponential backoff and jitter in between.
const FETCH_ATTEMPTS: u32 = 4;

/// The bytes of one object; transient failures are retried, a missing object is not.
async fn fetch(store: &dyn ObjectStore, location: &ObjectPath, injected: impl Fn() -> bool) -> std::result::Result<bytes::Bytes, String> {
    let mut last = String::new();
    for attempt in 0..FETCH_ATTEMPTS {
        if attempt > 0 {
            // 100, 200, 400 ms, each between half and one and a half of that.
            let base = 100u64 << (attempt - 1);
            tokio::time::sleep(std::time::Duration::from_millis(base / 2 + rand::random_range(0..=base))).await;
        }
        if injected() {
            last = "injected fault (a test's)".into();
            continue;
        }
        match async { store.get(location).await?.bytes().await }.await {
            Ok(b) => return Ok(b),
            Err(e @ object_store::Error::NotFound { .. }) => return Err(e.to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("{last} (after {FETCH_ATTEMPTS} attempts; tried again next run)"))
}

/// How many rejects are [`RETRYABLE`].
async fn retryable_rejects(ctx: &StageCtx) -> Result<usize> {
    let Some(ds) = ctx.lake.open("rejects").await? else { return Ok(0) };
    ds.count_rows(Some(format!("reason = '{RETRYABLE}'"))).await.map_err(|e| Error::lance("rejects", e))
}

/// Deletes the rows of `images` and `rejects` (given with their recorded URIs) whose URI
/// begins with `mine` (this source's) and that are no longer listed: a photo gone from the source
/// leaves the lake, and the answers built from it (its rows stay readable at older versions).
/// Returns how many photos went.
async fn delete_gone(ctx: &StageCtx, mine: &str, current: &HashMap<String, String>, tables: [(&str, Vec<String>); 2]) -> Result<u64> {
    let mut gone_images = 0u64;
    for (table, uris) in tables {
        // A shard removes the rows of the URIs it owns.
        let gone: Vec<&String> = uris.iter().filter(|u| u.starts_with(mine) && !current.contains_key(*u) && ctx.owns(u)).collect();
        if gone.is_empty() {
            continue;
        }
        for chunk in gone.chunks(1000) {
            let list = chunk.iter().map(|u| lake::tables::sql_string(u)).collect::<Vec<_>>().join(", ");
            ctx.delete_where(table, &format!("uri IN ({list})")).await?;
        }
        if table == "images" {
            gone_images = gone.len() as u64;
        }
    }
    Ok(gone_images)
}

/// The source listing made by `prepare`.
pub struct Listing {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    objects: Vec<ObjectMeta>,
    /// Objects under the source that `include` leaves out, by path under it.
    skipped: Vec<String>,
    /// Of the listing and the labels.
    fingerprint: String,
    /// The latest decision of each photo people decided about (lake::decisions), as read when
    /// the listing was fingerprinted.
    decided: BTreeMap<String, lake::decisions::Decision>,
}

/// The input fingerprint: the listing's, made unique to this run while objects wait to be
/// fetched again, so a stage with retries left is never up to date.
fn with_retries(listing: &str, retryable: usize, run_id: &str) -> String {
    if retryable == 0 { listing.to_string() } else { format!("{listing}+retry:{run_id}") }
}

fn globs(patterns: &[String]) -> std::result::Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = GlobBuilder::new(p).case_insensitive(true).build().map_err(|e| format!("bad glob `{p}`: {e}"))?;
        b.add(g);
    }
    b.build().map_err(|e| e.to_string())
}

fn relative(prefix: &ObjectPath, loc: &ObjectPath) -> String {
    match loc.prefix_match(prefix) {
        Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
        None => loc.as_ref().to_string(),
    }
}

#[cfg(test)]
mod tag_tests {
    use super::same_tag;

    #[test]
    fn a_local_tag_matches_the_inode_tag_of_the_same_file_and_nothing_else() {
        assert!(same_tag("5f-1a2b-3c", "5f-1a2b-3c"));
        assert!(same_tag("e4d2-1a2b-3c", "1a2b-3c"), "the inode-mtime-size e-tag recorded before");
        assert!(!same_tag("e4d2-1a2b-3d", "1a2b-3c"));
        assert!(!same_tag("e4d2-11a2b-3c", "1a2b-3c"));
        assert!(!same_tag("x-e4d2-1a2b-3c", "1a2b-3c"));
        assert!(!same_tag("1a2b-3c", "e4d2-1a2b-3c"));
    }
}

fn reason(e: &VisionError) -> &'static str {
    match e {
        VisionError::Empty => "empty",
        VisionError::UnknownFormat { .. } => "unknown_format",
        VisionError::Unsupported { .. } => "unsupported_format",
        VisionError::Truncated => "truncated",
        VisionError::TooManyPixels { .. } => "too_many_pixels",
        VisionError::Decode(_) => "decode_error",
    }
}

/// Reads `photo → individual` from a CSV (header row) or Parquet file.
async fn load_labels(uri: &str, options: &HashMap<String, String>, photo_col: &str, id_col: &str) -> Result<LabelRows> {
    let err = |detail: String| Error::Labels { uri: uri.to_string(), detail };
    let (store, path) = store::open(uri, options)?;
    let bytes = store.get(&path).await.map_err(|e| err(e.to_string()))?.bytes().await.map_err(|e| err(e.to_string()))?;
    let mut out = LabelRows::default();
    if bytes.starts_with(b"PAR1") {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .map_err(|e| err(e.to_string()))?
            .build()
            .map_err(|e| err(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
            let col = |c: &str| {
                batch.column_by_name(c).ok_or_else(|| err(format!("no column `{c}` (columns: {})", names.join(", "))))
            };
            let as_str = |a: &ArrayRef| arrow::compute::cast(a, &arrow::datatypes::DataType::Utf8).map_err(|e| err(e.to_string()));
            let (p, i) = (as_str(col(photo_col)?)?, as_str(col(id_col)?)?);
            let (p, i) = (p.as_string::<i32>(), i.as_string::<i32>());
            for r in 0..batch.num_rows() {
                if p.is_valid(r) && i.is_valid(r) && !i.value(r).is_empty() {
                    out.add(p.value(r), i.value(r), format!("row {}", out.rows + 1));
                }
                out.rows += 1;
            }
        }
        return out.checked(uri);
    }
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(bytes.as_ref());
    let headers = rdr.headers().map_err(|e| err(format!("not a CSV with a header row: {e}")))?.clone();
    let find = |c: &str| {
        headers.iter().position(|h| h == c).ok_or_else(|| {
            err(format!(
                "no column `{c}` (columns: {}); set labels_photo_column / labels_id_column",
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })
    };
    let (pi, ii) = (find(photo_col)?, find(id_col)?);
    for (n, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| err(format!("line {}: {e}", n + 2)))?;
        let (Some(p), Some(i)) = (rec.get(pi), rec.get(ii)) else {
            return Err(err(format!("line {}: expected at least {} fields", n + 2, pi.max(ii) + 1)));
        };
        if !p.is_empty() && !i.is_empty() {
            out.add(p, i, format!("line {}", n + 2));
        }
        out.rows += 1;
    }
    out.checked(uri)
}

/// A labels file as read: photo → (individual, where in the file), and what repeated.
#[derive(Default)]
struct LabelRows {
    by_photo: HashMap<String, (String, String)>,
    rows: usize,
    /// Rows repeating an earlier row exactly (same photo, same individual): harmless.
    repeated: usize,
    /// Photos given two different individuals: (photo, first, second), with where.
    conflicts: Vec<String>,
}

impl LabelRows {
    fn add(&mut self, photo: &str, id: &str, at: String) {
        match self.by_photo.get(photo) {
            Some((had, _)) if had == id => self.repeated += 1,
            Some((had, first)) => self.conflicts.push(format!("`{photo}` is `{had}` ({first}) and `{id}` ({at})")),
            None => {
                self.by_photo.insert(photo.to_string(), (id.to_string(), at));
            }
        }
    }

    /// An error when a photo has two individuals: which one is right would be a guess.
    fn checked(self, uri: &str) -> Result<LabelRows> {
        if self.conflicts.is_empty() {
            return Ok(self);
        }
        Err(Error::Labels {
            uri: uri.to_string(),
            detail: format!("{} photos have two different individuals: {}", self.conflicts.len(), first_few(&self.conflicts, 5)),
        })
    }

    /// The label of every listed photo (by its path under the source), and a note of the label
    /// rows that name no listed photo. A row names a photo by its path under the source, or by
    /// its bare file name when exactly one listed photo has that name; a bare name that several
    /// listed photos share (`a/DSC1.jpg`, `b/DSC1.jpg`) is an error, as the answer would be a guess.
    fn resolve<'a>(&self, uri: &str, listed: impl Iterator<Item = &'a str>) -> Result<(HashMap<String, String>, String)> {
        let listed: Vec<&str> = listed.collect();
        let mut by_name: HashMap<&str, Vec<&str>> = HashMap::new();
        for rel in &listed {
            by_name.entry(rel.rsplit('/').next().unwrap_or(rel)).or_default().push(rel);
        }
        let mut out = HashMap::new();
        let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut ambiguous = Vec::new();
        for rel in &listed {
            if let Some((id, _)) = self.by_photo.get(*rel) {
                out.insert(rel.to_string(), id.clone());
                used.insert(rel);
                continue;
            }
            let name = rel.rsplit('/').next().unwrap_or(rel);
            // A row that names a listed photo by its path is that photo's only.
            if name == *rel || by_name.get(name).is_some_and(|s| s.contains(&name)) {
                continue;
            }
            if let Some((id, at)) = self.by_photo.get(name) {
                let sharing = &by_name[name];
                if sharing.len() > 1 {
                    ambiguous.push(format!("`{name}` ({at}) could be any of {}", first_few(sharing, 3)));
                    used.insert(name);
                    continue;
                }
                out.insert(rel.to_string(), id.clone());
                used.insert(name);
            }
        }
        if !ambiguous.is_empty() {
            ambiguous.sort();
            ambiguous.dedup();
            return Err(Error::Labels {
                uri: uri.to_string(),
                detail: format!(
                    "{} rows name a photo by a file name that several photos have; write their path under the source: {}",
                    ambiguous.len(),
                    first_few(&ambiguous, 3)
                ),
            });
        }
        let mut unknown: Vec<&str> = self.by_photo.keys().map(String::as_str).filter(|p| !used.contains(p)).collect();
        unknown.sort_unstable();
        let mut note = Vec::new();
        if !unknown.is_empty() {
            note.push(format!("{} label rows name no listed photo ({})", unknown.len(), first_few(&unknown, 3)));
        }
        if self.repeated > 0 {
            note.push(format!("{} label rows repeated", self.repeated));
        }
        Ok((out, note.join(", ")))
    }
}

/// The first `n` of `items`, and how many more.
fn first_few<T: std::fmt::Display>(items: &[T], n: usize) -> String {
    let shown: Vec<String> = items.iter().take(n).map(|i| i.to_string()).collect();
    if items.len() > n { format!("{}, and {} more", shown.join(", "), items.len() - n) } else { shown.join(", ") }
}

struct ImageRow {
    photo_id: String,
    uri: String,
    individual_id: Option<String>,
    decision: Option<&'static str>,
    size_bytes: i64,
    etag: String,
    last_modified: DateTime<Utc>,
    analysis: Analysis,
    content_hash: String,
}

struct RejectRow {
    photo_id: String,
    uri: String,
    size_bytes: i64,
    etag: String,
    reason: &'static str,
    detail: String,
}

fn ts(v: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
}

fn image_batch(rows: &[ImageRow], run_id: &str) -> Result<RecordBatch> {
    let now = Utc::now().timestamp_micros();
    let s = |f: &dyn Fn(&ImageRow) -> String| Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef;
    let f = |g: &dyn Fn(&ImageRow) -> f64| Arc::new(Float64Array::from(rows.iter().map(g).collect::<Vec<_>>())) as ArrayRef;
    let i32s = |g: &dyn Fn(&ImageRow) -> i32| Arc::new(Int32Array::from(rows.iter().map(g).collect::<Vec<_>>())) as ArrayRef;
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("photo_id", s(&|r| r.photo_id.clone())),
        ("uri", s(&|r| r.uri.clone())),
        ("individual_id", Arc::new(StringArray::from(rows.iter().map(|r| r.individual_id.clone()).collect::<Vec<_>>()))),
        ("size_bytes", Arc::new(Int64Array::from(rows.iter().map(|r| r.size_bytes).collect::<Vec<_>>()))),
        ("etag", s(&|r| r.etag.clone())),
        ("last_modified", ts(rows.iter().map(|r| r.last_modified.timestamp_micros()).collect())),
        ("format", s(&|r| r.analysis.probe.format.to_string())),
        ("color", s(&|r| r.analysis.probe.color.clone())),
        ("width", i32s(&|r| r.analysis.probe.width as i32)),
        ("height", i32s(&|r| r.analysis.probe.height as i32)),
        ("orientation", i32s(&|r| r.analysis.probe.orientation as i32)),
        ("sharpness", f(&|r| r.analysis.quality.sharpness)),
        ("brightness", f(&|r| r.analysis.quality.brightness)),
        ("clipped_dark", f(&|r| r.analysis.quality.clipped_dark)),
        ("clipped_bright", f(&|r| r.analysis.quality.clipped_bright)),
        ("contrast", f(&|r| r.analysis.quality.contrast)),
        ("noise", f(&|r| r.analysis.quality.noise)),
        ("subject_fraction", f(&|r| r.analysis.quality.subject_fraction)),
        ("content_hash", s(&|r| r.content_hash.clone())),
        ("phash", Arc::new(UInt64Array::from(rows.iter().map(|r| r.analysis.phash).collect::<Vec<_>>()))),
        ("ingested_at", ts(vec![now; rows.len()])),
        ("run_id", s(&|_| run_id.to_string())),
        ("decision", Arc::new(StringArray::from(rows.iter().map(|r| r.decision).collect::<Vec<_>>()))),
    ];
    Ok(RecordBatch::try_from_iter(cols)?)
}

fn reject_batch(rows: &[RejectRow], run_id: &str) -> Result<RecordBatch> {
    let now = Utc::now().timestamp_micros();
    let s = |f: &dyn Fn(&RejectRow) -> String| Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef;
    Ok(RecordBatch::try_from_iter(vec![
        ("photo_id", s(&|r| r.photo_id.clone())),
        ("uri", s(&|r| r.uri.clone())),
        ("size_bytes", Arc::new(Int64Array::from(rows.iter().map(|r| r.size_bytes).collect::<Vec<_>>())) as ArrayRef),
        ("etag", s(&|r| r.etag.clone())),
        ("reason", s(&|r| r.reason.to_string())),
        ("detail", s(&|r| r.detail.clone())),
        ("rejected_at", ts(vec![now; rows.len()])),
        ("run_id", s(&|_| run_id.to_string())),
    ])?)
}

impl Stage for IngestConfig {
    fn describe(&self) -> String {
        format!("ingest {}", self.source)
    }

    fn check<'a>(&'a self, _: Inputs<'a>, _: &'a Context, _: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(Checked {
            reads: Vec::new(),
            writes: ["images", "rejects"].iter().map(|t| (t.to_string(), lake::Catalog::builtin(t))).collect(),
            ..Default::default()
        }))
    }

    fn shards(&self) -> bool {
        true
    }

    fn prepare<'a>(&'a self, ctx: &'a StageCtx) -> BoxFuture<'a, Result<Prepared>> {
        Box::pin(IngestConfig::prepare(self, ctx))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, prepared: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(IngestConfig::run(self, ctx, prepared))
    }
}

#[cfg(test)]
mod label_tests {
    use super::LabelRows;

    fn rows(pairs: &[(&str, &str)]) -> LabelRows {
        let mut r = LabelRows::default();
        for (i, (p, id)) in pairs.iter().enumerate() {
            r.add(p, id, format!("line {}", i + 2));
            r.rows += 1;
        }
        r
    }

    #[test]
    fn a_photo_with_two_individuals_is_an_error_naming_both_lines() {
        let e = rows(&[("a.jpg", "W1"), ("b.jpg", "W2"), ("a.jpg", "W3")]).checked("file:///l.csv").err().unwrap().to_string();
        assert!(e.contains("l.csv") && e.contains("`a.jpg` is `W1` (line 2) and `W3` (line 4)"), "{e}");
        // The same row twice is only counted.
        let r = rows(&[("a.jpg", "W1"), ("a.jpg", "W1")]).checked("l.csv").unwrap();
        let (labels, note) = r.resolve("l.csv", ["a.jpg"].into_iter()).unwrap();
        assert_eq!(labels["a.jpg"], "W1");
        assert_eq!(note, "1 label rows repeated");
    }

    #[test]
    fn rows_name_photos_by_path_or_by_a_file_name_only_one_photo_has() {
        let r = rows(&[("2024/a.jpg", "W1"), ("b.jpg", "W2"), ("gone.jpg", "W3"), ("also-gone.jpg", "W4")]);
        let listed = ["2024/a.jpg", "2025/b.jpg", "2025/c.jpg"];
        let (labels, note) = r.resolve("l.csv", listed.into_iter()).unwrap();
        assert_eq!(labels.len(), 2);
        assert_eq!((labels["2024/a.jpg"].as_str(), labels["2025/b.jpg"].as_str()), ("W1", "W2"));
        assert_eq!(note, "2 label rows name no listed photo (also-gone.jpg, gone.jpg)");
        // Two photos called b.jpg: which one the row means would be a guess.
        let e = r.resolve("l.csv", ["2024/b.jpg", "2025/b.jpg"].into_iter()).unwrap_err().to_string();
        assert!(e.contains("`b.jpg` (line 3) could be any of 2024/b.jpg, 2025/b.jpg") && e.contains("write their path"), "{e}");
        // Unless each is named by its path.
        let exact = rows(&[("2024/b.jpg", "W1"), ("2025/b.jpg", "W2")]);
        let (labels, _) = exact.resolve("l.csv", ["2024/b.jpg", "2025/b.jpg"].into_iter()).unwrap();
        assert_eq!((labels["2024/b.jpg"].as_str(), labels["2025/b.jpg"].as_str()), ("W1", "W2"));
    }
}
