//! The neighbours of one photo (`pipeline similar`, `pipeline serve`): a photo of the
//! collection is looked up by photo id or URI and searched with its stored embedding; a new
//! photo (a path, a URI or bytes) is decoded, cropped by the model's detector, embedded with the
//! model that made the table's embeddings (loaded once, on one worker thread that batches
//! concurrent requests) and searched the same way. [`Service`] is the HTTP API's shared state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::AsArray;
use object_store::ObjectStoreExt;
use tch::{Device, Tensor};
use tokio::sync::oneshot;

use lake::{Lake, store};
use model::detect::{Detection, Detector};
use model::net::{Net, to_input};
use model::detect;
use model::train::model_files;
use lake::models::resolve_model;
use lake::models::model_dir;
use lake::vector::{self, Expansion, Hit, Source};
use vision::{self, DecodeLimits};
use crate::{Error, Result};

/// The model of an embeddings table, on a worker thread that embeds batches of photos; with
/// the model's subject detector when it was trained on crops, so a new photo is cropped the
/// way the collection was.
pub struct Embedder {
    pub model_id: String,
    pub input_size: u32,
    pub flip_tta: bool,
    /// Input side of the detector and the crop margin, for a model trained on crops.
    crop: Option<(u32, f32)>,
    tx: std::sync::mpsc::SyncSender<Job>,
}

/// Work for the model thread: pixels at the model's (or the detector's) input size.
enum Job {
    Embed(Vec<u8>, oneshot::Sender<Result<Vec<f32>>>),
    Detect(Vec<u8>, oneshot::Sender<Result<Detection>>),
}

/// Largest number of queued photos embedded in one forward pass.
const MAX_BATCH: usize = 16;

/// Photos that may wait for the model thread; one more is turned away with
/// [`Error::Overloaded`] (the HTTP API's 503) instead of queueing without bound.
pub const QUEUE: usize = 4 * MAX_BATCH;

impl Embedder {
    /// Loads the model whose embeddings fill `table` (from its `model_id` and `tta` columns).
    pub async fn for_table(lake: &Lake, table: &str, device: Device) -> Result<Embedder> {
        let ds = lake.open(table).await?.ok_or_else(|| Error::Other(format!("table `{table}` does not exist")))?;
        let mut scan = ds.scan();
        scan.project(&["model_id", "tta"]).map_err(|e| Error::lance(table, e))?;
        scan.limit(Some(1), None).map_err(|e| Error::lance(table, e))?;
        let b = scan.try_into_batch().await.map_err(|e| Error::lance(table, e))?;
        if b.num_rows() == 0 {
            return Err(Error::Other(format!("table `{table}` is empty")));
        }
        let model_id = b.column(0).as_string::<i32>().value(0).to_string();
        let flip_tta = b.column(1).as_string::<i32>().value(0) == "flip";
        let (id, dir) = resolve_model(lake, &model_id).await?;
        let (spec, best) = model_files(&dir, &id).map_err(|e| {
            Error::Other(format!("{e} (an ensemble's embeddings cannot embed new photos: ask by photo id, or embed with a member model)"))
        })?;
        let mut net = Net::load(&spec, &best, device).map_err(|e| Error::Other(e.to_string()))?;
        net.use_channels_last();
        net.fold_batchnorm();
        let (detector, det_dir) = match &spec.crop {
            Some(c) => {
                let ddir = model_dir(lake, &c.detector).await?;
                let info_file = ddir.local.join(detect::INFO);
                let info: detect::DetectorInfo = std::fs::read_to_string(&info_file)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or_else(|| Error::Other(format!("model `{id}` crops with detector `{}`, whose {} is missing", c.detector, info_file.display())))?;
                let det = Detector::load(&info.spec, &ddir.local.join(detect::WEIGHTS), device).map_err(|e| Error::Other(e.to_string()))?;
                (Some(det), Some(ddir))
            }
            None => (None, None),
        };
        let crop = match (&spec.crop, &detector) {
            (Some(c), Some(d)) => Some((d.spec.input_size, c.margin)),
            _ => None,
        };
        let input_size = spec.input_size;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("embedder".into())
            .spawn(move || {
                let _keep = (dir, det_dir);
                while let Ok(first) = rx.recv() {
                    // Whatever else is already waiting goes in the same forward pass.
                    let mut jobs = vec![first];
                    std::thread::sleep(Duration::from_millis(2));
                    while jobs.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(item) => jobs.push(item),
                            Err(_) => break,
                        }
                    }
                    let (mut embeds, mut detects) = (Vec::new(), Vec::new());
                    for j in jobs {
                        match j {
                            Job::Embed(px, reply) => embeds.push((px, reply)),
                            Job::Detect(px, reply) => detects.push((px, reply)),
                        }
                    }
                    if let (false, Some(det)) = (detects.is_empty(), &detector) {
                        let x = stack(&detects, det.spec.input_size);
                        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| det.detect(&to_input(&x, det.device()))));
                        for (i, (_, reply)) in detects.into_iter().enumerate() {
                            let r = match &out {
                                Ok(v) if v.len() > i => Ok(v[i]),
                                _ => Err(Error::Other("the detector failed on this batch".into())),
                            };
                            let _ = reply.send(r);
                        }
                    }
                    if embeds.is_empty() {
                        continue;
                    }
                    let x = stack(&embeds, input_size);
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let e = net.embed(&to_input(&x, net.device()), flip_tta).to_device(Device::Cpu).contiguous();
                        Vec::<f32>::try_from(e.flatten(0, -1)).unwrap_or_default()
                    }));
                    let dim = net.spec.neck.embedding_dim as usize;
                    for (i, (_, reply)) in embeds.into_iter().enumerate() {
                        let r = match &out {
                            Ok(v) if v.len() >= (i + 1) * dim => Ok(v[i * dim..(i + 1) * dim].to_vec()),
                            _ => Err(Error::Other("the model failed on this batch".into())),
                        };
                        let _ = reply.send(r);
                    }
                }
            })
            .map_err(|e| Error::Other(format!("cannot start the embedding thread: {e}")))?;
        Ok(Embedder { model_id: id, input_size, flip_tta, crop, tx })
    }

    /// Decodes `bytes` (any format [`vision`] reads, within `limits`), crops the subject when
    /// the model was trained on crops, and embeds it, decoding the photo once
    /// ([`vision::Decoded`]). A bad image is [`Error::BadImage`] saying why; a full queue to the
    /// model thread is [`Error::Overloaded`].
    pub async fn embed_bytes(&self, bytes: Vec<u8>, limits: DecodeLimits) -> Result<Vec<f32>> {
        Ok(self.embed_bytes_viewing(bytes, limits, None).await?.0)
    }

    /// [`Embedder::embed_bytes`], and with `view = Some(side)` also the photo as the model reads
    /// it (its crop or all of it) at `side`² RGB8, from the same decode: what geometric
    /// re-ranking describes ([`rerank_geometric`]).
    pub async fn embed_bytes_viewing(&self, bytes: Vec<u8>, limits: DecodeLimits, view: Option<u32>) -> Result<(Vec<f32>, Option<Vec<u8>>)> {
        let mut photo = vision::Decoded::new(bytes, limits);
        let crop = match self.crop {
            Some((det_side, margin)) => {
                let (back, px) = blocking(move || {
                    let px = photo.square(det_side);
                    (photo, px)
                })
                .await?;
                photo = back;
                let d = self.ask(|tx| Job::Detect(px.into_raw(), tx)).await?;
                Some(vision::expand_box(d.bbox, margin))
            }
            None => None,
        };
        let side = self.input_size;
        let (photo, px) = blocking(move || {
            let px = match crop {
                Some(c) => photo.crop_square(side, c),
                None => photo.square(side),
            };
            (photo, px)
        })
        .await?;
        let seen = match view {
            Some(v) => Some(
                blocking(move || {
                    let mut photo = photo;
                    let px = match crop {
                        Some(c) => photo.crop_square(v, c),
                        None => photo.square(v),
                    };
                    ((), px)
                })
                .await?
                .1
                .into_raw(),
            ),
            None => None,
        };
        Ok((self.ask(|tx| Job::Embed(px.into_raw(), tx)).await?, seen))
    }

    /// Queues a job for the model thread and waits for its answer; a full queue is refused at once.
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T>>) -> Job) -> Result<T> {
        let stopped = || Error::Other("the embedding thread has stopped".into());
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(job(tx)) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                return Err(Error::Overloaded(format!("{QUEUE} photos are already waiting for the model")));
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return Err(stopped()),
        }
        rx.await.map_err(|_| stopped())?
    }
}

/// Runs a decode on the blocking pool; its error is [`Error::BadImage`].
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> (T, std::result::Result<vision::RgbImage, vision::VisionError>) + Send + 'static,
) -> Result<(T, vision::RgbImage)> {
    let (back, px) = tokio::task::spawn_blocking(f).await.map_err(|e| Error::Other(format!("decoder panicked: {e}")))?;
    Ok((back, px.map_err(|e| Error::BadImage(e.to_string()))?))
}

/// `[N, side, side, 3]` u8 from the jobs' pixels.
fn stack<R>(jobs: &[(Vec<u8>, R)], side: u32) -> Tensor {
    let s = side as i64;
    let mut buf = Vec::with_capacity(jobs.len() * (s * s * 3) as usize);
    for (px, _) in jobs {
        buf.extend_from_slice(px);
    }
    Tensor::from_slice(&buf).view([jobs.len() as i64, s, s, 3])
}

/// What `similar` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Similar {
    pub query: String,
    /// Whether the query is a photo of the table (searched with its stored embedding).
    pub in_collection: bool,
    pub model_id: String,
    /// How the first neighbours were re-ranked by local features (None: by similarity alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geometric: Option<String>,
    pub neighbours: Vec<Neighbour>,
    /// The query photo's URI (located) when it is a photo of the table.
    #[serde(skip)]
    pub query_uri: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Neighbour {
    pub rank: usize,
    pub photo_id: String,
    pub individual_id: Option<String>,
    pub similarity: f32,
    pub distance: f32,
    pub uri: String,
    /// Verified local-feature matches with the query, for neighbours re-ranked geometrically.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inliers: Option<usize>,
}

/// The hits of a search of `ds`, their URIs located (a lake records local photos relative to
/// itself; see [`lake::store::locate`]).
fn neighbours(ds: &lance::Dataset, hits: Vec<Hit>) -> Vec<Neighbour> {
    let root = ds.uri().trim_end_matches('/').rsplit_once('/').map(|(r, _)| r.to_string()).unwrap_or_default();
    hits.into_iter()
        .enumerate()
        .map(|(i, h)| Neighbour {
            rank: i + 1,
            similarity: h.similarity(),
            distance: h.distance,
            photo_id: h.photo_id,
            individual_id: h.individual_id,
            uri: lake::store::locate(&root, &h.uri),
            inliers: None,
        })
        .collect()
}

/// The `k` nearest photos of table `ds` (searched through `src`) to the photo with this id or
/// URI, itself excluded, with query expansion `x` (off: `Expansion::OFF`); None when no photo
/// has that id.
pub async fn similar_to_id(ds: &lance::Dataset, src: &Source, id: &str, k: usize, x: Expansion) -> Result<Option<Similar>> {
    let Some((v, me)) = vector::embedding_of(ds, id).await? else { return Ok(None) };
    let hits = vector::similar(src, &v, k, x, Some(&me.uri)).await?;
    let model_id = model_of(ds).await?;
    let root = ds.uri().trim_end_matches('/').rsplit_once('/').map(|(r, _)| r.to_string()).unwrap_or_default();
    Ok(Some(Similar {
        query: me.photo_id.clone(),
        in_collection: true,
        model_id,
        geometric: None,
        neighbours: neighbours(ds, hits),
        query_uri: Some(lake::store::locate(&root, &me.uri)),
    }))
}

/// The `k` nearest photos to an embedding, with query expansion `x`.
pub async fn similar_to_vector(ds: &lance::Dataset, src: &Source, label: &str, v: &[f32], k: usize, x: Expansion) -> Result<Similar> {
    let hits = vector::similar(src, v, k, x, None).await?;
    Ok(Similar { query: label.to_string(), in_collection: false, model_id: model_of(ds).await?, geometric: None, neighbours: neighbours(ds, hits), query_uri: None })
}

/// Re-ranks the first `o.k` neighbours of `found` by local features verified geometrically
/// ([`crate::local`]): `query` is the query as the model reads it at `o.side`² RGB8 (an
/// upload, [`Embedder::embed_bytes_viewing`]); None reads the query photo of the table (its
/// crop when the model crops). Each re-scored neighbour gets its inliers; ranks follow the new
/// order; similarities stay the embedding's. A neighbour whose photo cannot be read keeps its
/// similarity (no bonus); a query that cannot be read is an error naming it.
pub async fn rerank_geometric(lake: &Lake, found: &mut Similar, query: Option<Vec<u8>>, o: crate::local::GeoOptions) -> Result<()> {
    if o.k == 0 || found.neighbours.is_empty() {
        return Ok(());
    }
    let side = o.side.max(32);
    let o = crate::local::GeoOptions { side, ..o };
    let crops = crate::local::model_crops(lake, &found.model_id).await?;
    let query = match query {
        Some(px) => px,
        None => {
            let uri = found.query_uri.clone().ok_or_else(|| Error::Other(format!("query `{}`: no photo to describe", found.query)))?;
            let loader = model::data::Loader::new(side, 1, 0, lake.options().clone()).in_lake(lake.root());
            loader.pixels(&uri, crops.get(&found.query).copied(), None).await?.to_vec()
        }
    };
    let k = o.k.min(found.neighbours.len());
    let ids: Vec<String> = found.neighbours[..k].iter().map(|n| n.photo_id.clone()).collect();
    let uris: Vec<String> = found.neighbours[..k].iter().map(|n| n.uri.clone()).collect();
    let feats = crate::local::local_features(lake, &ids, &uris, &crops, o).await?;
    let neighbours = std::mem::take(&mut found.neighbours);
    let reranked = tokio::task::spawn_blocking(move || {
        let q = crate::local::describe(&query, side);
        let by_id: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        crate::local::rerank(neighbours, &o, |n: &Neighbour| n.similarity, |n: &Neighbour| {
            match by_id.get(n.photo_id.as_str()).and_then(|&i| feats.rows[i].as_ref()) {
                Some(f) => geometric::verify(&q, f, &feats.params).inliers,
                None => 0,
            }
        })
    })
    .await
    .map_err(|e| Error::Other(format!("geometric re-ranking panicked: {e}")))?;
    found.neighbours = reranked
        .into_iter()
        .enumerate()
        .map(|(i, (n, inliers))| Neighbour { rank: i + 1, inliers, ..n })
        .collect();
    found.geometric = Some(o.label());
    Ok(())
}

pub(crate) async fn model_of(ds: &lance::Dataset) -> Result<String> {
    let mut scan = ds.scan();
    scan.project(&["model_id"]).map_err(|e| Error::Other(e.to_string()))?;
    scan.limit(Some(1), None).map_err(|e| Error::Other(e.to_string()))?;
    let b = scan.try_into_batch().await.map_err(|e| Error::Other(e.to_string()))?;
    Ok(if b.num_rows() > 0 { b.column(0).as_string::<i32>().value(0).to_string() } else { String::new() })
}

/// Reads a photo given as a local path or an object-store URI.
pub async fn read_photo(target: &str, options: &HashMap<String, String>) -> Result<Vec<u8>> {
    if !target.contains("://") {
        let p = PathBuf::from(target);
        return std::fs::read(&p).map_err(|e| Error::io(&p, e));
    }
    let (store, path) = store::open(target, options)?;
    let bytes = async { store.get(&path).await?.bytes().await }.await.map_err(|e| Error::ObjectStore { uri: target.into(), source: e })?;
    Ok(bytes.to_vec())
}

/// A small JPEG of a photo (longest side `side`), for reports and the HTTP API.
pub fn thumbnail(bytes: &[u8], side: u32) -> Result<Vec<u8>> {
    let (_, rgb) = vision::decode_rgb(bytes, &DecodeLimits::default(), (side, side)).map_err(|e| Error::BadImage(e.to_string()))?;
    let mut out = Vec::new();
    let enc = jpeg_encoder::Encoder::new(&mut out, 82);
    enc.encode(rgb.as_raw(), rgb.width() as u16, rgb.height() as u16, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| Error::Other(format!("thumbnail: {e}")))?;
    Ok(out)
}

/// Shared state of the HTTP API: the lake and table it answers from, and what it answers with
/// now ([`Snapshot`]), which [`Service::refresh`] swaps when the table has a new version (a
/// nightly run appended photos, or re-embedded them with a newly promoted model). A request
/// takes the snapshot once and answers from it, so a swap drops none.
pub struct Service {
    pub lake: Lake,
    pub table: String,
    device: Device,
    search: vector::SearchOverrides,
    now: std::sync::RwLock<Arc<Snapshot>>,
}

/// One version of the table, with the model that embedded it and how it is searched.
pub struct Snapshot {
    pub ds: Arc<lance::Dataset>,
    /// None when no model can embed new photos for it (an ensemble's table; missing weights).
    pub embedder: Option<Arc<Embedder>>,
    /// Why there is no embedder.
    pub no_embedder: Option<String>,
    /// How `/similar` searches `ds`: its index, or its embeddings in memory.
    pub source: Source,
    pub version: u64,
    pub model_id: String,
}

impl Service {
    /// The service over the latest version of `table`.
    pub async fn open(lake: Lake, table: &str, device: Device, search: vector::SearchOverrides) -> Result<Service> {
        let snap = snapshot(&lake, table, device, &search, None).await?;
        Ok(Service { lake, table: table.to_string(), device, search, now: std::sync::RwLock::new(Arc::new(snap)) })
    }

    /// What requests answer from now.
    pub fn now(&self) -> Arc<Snapshot> {
        self.now.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Swaps to the table's latest version when it has a new one; the model is reloaded only
    /// when the new version was embedded by another model. Says what changed (None: nothing).
    /// On an error the service keeps answering from what it had.
    pub async fn refresh(&self) -> Result<Option<String>> {
        let old = self.now();
        let Some(version) = self.lake.version(&self.table).await? else {
            return Err(Error::Other(format!("table `{}` is gone from {}", self.table, self.lake.root())));
        };
        if version == old.version {
            return Ok(None);
        }
        let snap = snapshot(&self.lake, &self.table, self.device, &self.search, Some(&old)).await?;
        let what = if snap.model_id == old.model_id {
            format!("table `{}` version {} -> {} ({} rows)", self.table, old.version, snap.version, snap.ds.count_rows(None).await.unwrap_or(0))
        } else {
            format!(
                "table `{}` version {} -> {}, model {} -> {}{}",
                self.table,
                old.version,
                snap.version,
                old.model_id,
                snap.model_id,
                snap.no_embedder.as_ref().map(|w| format!(" (uploads disabled: {w})")).unwrap_or_default()
            )
        };
        match self.now.write() {
            Ok(mut g) => *g = Arc::new(snap),
            Err(p) => *p.into_inner() = Arc::new(snap),
        }
        Ok(Some(what))
    }
}

/// The table's latest version as a [`Snapshot`], reusing `old`'s model when it is the same.
async fn snapshot(lake: &Lake, table: &str, device: Device, search: &vector::SearchOverrides, old: Option<&Snapshot>) -> Result<Snapshot> {
    let ds = lake.open(table).await?.ok_or_else(|| Error::Other(format!("table `{table}` does not exist in {}", lake.root())))?;
    let version = ds.version().version;
    let ds = Arc::new(ds);
    let model_id = model_of(&ds).await?;
    let (embedder, no_embedder) = match old {
        Some(o) if o.model_id == model_id => (o.embedder.clone(), o.no_embedder.clone()),
        _ => match Embedder::for_table(lake, table, device).await {
            Ok(e) => (Some(Arc::new(e)), None),
            Err(e) => (None, Some(e.to_string())),
        },
    };
    let source = Source::for_serving(ds.clone(), table, search, None).await?;
    Ok(Snapshot { ds, embedder, no_embedder, source, version, model_id })
}
