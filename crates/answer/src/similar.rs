//! The neighbours of one photo (`pipeline similar`, `pipeline serve`): a photo of the
//! collection is looked up by photo id or URI and searched with its stored embedding; a new
//! photo (a path, a URI or bytes) is decoded, cropped by the model's detector, embedded with the
//! model that made the table's embeddings (loaded once, on one worker thread that batches
//! concurrent requests) and searched the same way. [`Service`] is the HTTP API's shared state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

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
    queue: Arc<Queue>,
    times: Arc<PhaseTimes>,
}

/// Where an upload's time goes, summed over every upload since the model was loaded
/// ([`Embedder::phase_times`]; the serve bench prints it): the decode for the detector, the wait
/// for and the detector's pass, the crop's decode, the wait for and the embedding pass; and of
/// those waits, the model thread's forward passes alone (a batch's pass counted once per photo).
#[derive(Default)]
pub struct PhaseTimes {
    uploads: std::sync::atomic::AtomicU64,
    nanos: [std::sync::atomic::AtomicU64; 6],
}

impl PhaseTimes {
    pub const NAMES: [&'static str; 6] = [
        "decode for the detector",
        "detector (queue + pass)",
        "decode of the crop",
        "embedding (queue + pass)",
        "of which the detector's pass",
        "of which the embedding passes (views summed)",
    ];

    fn add(&self, phase: usize, since: std::time::Instant) {
        self.nanos[phase].fetch_add(since.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Mean milliseconds per upload of each phase in [`PhaseTimes::NAMES`]' order, and the uploads counted.
    pub fn mean_ms(&self) -> ([f64; 6], u64) {
        let n = self.uploads.load(std::sync::atomic::Ordering::Relaxed);
        let ms = |i: usize| self.nanos[i].load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6 / n.max(1) as f64;
        (std::array::from_fn(ms), n)
    }
}

/// Work for the model threads: pixels at the model's (or the detector's) input size. An embedding
/// is asked for one view at a time (the photo, or its mirror image for flip TTA), so the two
/// views of one upload run at once on two model threads.
enum Job {
    Embed { px: Vec<u8>, flipped: bool, reply: oneshot::Sender<Result<Vec<f32>>> },
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
        let load_net = || -> Result<Net> {
            let mut net = Net::load(&spec, &best, device).map_err(|e| Error::Other(e.to_string()))?;
            net.use_channels_last();
            net.fold_batchnorm();
            Ok(net)
        };
        let (info, det_dir) = match &spec.crop {
            Some(c) => {
                let ddir = model_dir(lake, &c.detector).await?;
                let info_file = ddir.local.join(detect::INFO);
                let info: detect::DetectorInfo = std::fs::read_to_string(&info_file)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or_else(|| Error::Other(format!("model `{id}` crops with detector `{}`, whose {} is missing", c.detector, info_file.display())))?;
                (Some(info), Some(ddir))
            }
            None => (None, None),
        };
        let load_detector = || -> Result<Option<Detector>> {
            match (&info, &det_dir) {
                (Some(info), Some(ddir)) => Detector::load(&info.spec, &ddir.local.join(detect::WEIGHTS), device).map(Some).map_err(|e| Error::Other(e.to_string())),
                _ => Ok(None),
            }
        };
        let crop = match (&spec.crop, &info) {
            (Some(c), Some(i)) => Some((i.spec.input_size, c.margin)),
            _ => None,
        };
        let input_size = spec.input_size;
        let dim = spec.neck.embedding_dim as usize;
        // On a CPU, two model threads of one intra-op thread each (on 2 cores: one each). A
        // lone upload's two flip views and its neighbours' passes then run side by side, and
        // no pass waits at libtorch's thread barriers for a core the other thread holds: on the
        // 2-core machine one pass on two intra-op threads took twice as long in the server as
        // alone (README Figures). One thread on a GPU, which runs one pass at a time anyway.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let (workers, threads) = if device == Device::Cpu { (cores.clamp(1, 2), (cores / 2).max(1)) } else { (1, cores) };
        let queue = Arc::new(Queue::default());
        let times = Arc::new(PhaseTimes::default());
        let models = (0..workers).map(|_| Ok((load_net()?, load_detector()?))).collect::<Result<Vec<_>>>()?;
        let keep = Arc::new((dir, det_dir));
        for (w, (net, detector)) in models.into_iter().enumerate() {
            let (queue, model_times, keep) = (queue.clone(), times.clone(), keep.clone());
            std::thread::Builder::new()
                .name(format!("embedder-{w}"))
                .spawn(move || {
                    let _keep = keep;
                    if device == Device::Cpu {
                        tch::set_num_threads(threads as i32);
                    }
                    model_thread(&queue, &net, detector.as_ref(), input_size, dim, &model_times);
                })
                .map_err(|e| Error::Other(format!("cannot start the embedding thread: {e}")))?;
        }
        Ok(Embedder { model_id: id, input_size, flip_tta, crop, queue, times })
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
                let t = std::time::Instant::now();
                let (back, px) = blocking(move || {
                    let px = photo.square(det_side);
                    (photo, px)
                })
                .await?;
                self.times.add(0, t);
                photo = back;
                let t = std::time::Instant::now();
                let d = self.ask(|tx| Job::Detect(px.into_raw(), tx)).await?;
                self.times.add(1, t);
                Some(vision::expand_box(d.bbox, margin))
            }
            None => None,
        };
        let side = self.input_size;
        let t = std::time::Instant::now();
        let (photo, px) = blocking(move || {
            let px = match crop {
                Some(c) => photo.crop_square(side, c),
                None => photo.square(side),
            };
            (photo, px)
        })
        .await?;
        self.times.add(2, t);
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
        let t = std::time::Instant::now();
        let px = px.into_raw();
        let e = if self.flip_tta {
            // Both views at once (two model threads), combined as `Net::embed` combines them.
            let mirror = px.clone();
            let (a, b) = tokio::try_join!(
                self.ask(|reply| Job::Embed { px, flipped: false, reply }),
                self.ask(|reply| Job::Embed { px: mirror, flipped: true, reply })
            )?;
            normalized(a.iter().zip(&b).map(|(x, y)| x + y).collect())
        } else {
            self.ask(|reply| Job::Embed { px, flipped: false, reply }).await?
        };
        self.times.add(3, t);
        self.times.uploads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((e, seen))
    }

    /// Where uploads' time went so far ([`PhaseTimes`]).
    pub fn phase_times(&self) -> &PhaseTimes {
        &self.times
    }

    /// Queues a job for the model thread and waits for its answer; a full queue is refused at once.
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T>>) -> Job) -> Result<T> {
        let stopped = || Error::Other("the embedding thread has stopped".into());
        let (tx, rx) = oneshot::channel();
        self.queue.push(job(tx))?;
        rx.await.map_err(|_| stopped())?
    }
}

impl Drop for Embedder {
    /// The model threads finish what is queued and stop.
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// The jobs waiting for the model threads, at most [`QUEUE`]. A model thread takes the oldest
/// and every other waiting job of the same kind (detector, photo, mirror image) as one batch,
/// leaving the rest to the other thread: a lone upload's two views run at once, and under load
/// each pass batches what piled up meanwhile.
#[derive(Default)]
struct Queue {
    state: std::sync::Mutex<QueueState>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: std::collections::VecDeque<Job>,
    closed: bool,
}

impl Job {
    fn kind(&self) -> u8 {
        match self {
            Job::Detect(..) => 0,
            Job::Embed { flipped: false, .. } => 1,
            Job::Embed { flipped: true, .. } => 2,
        }
    }
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job; a full queue is refused at once ([`Error::Overloaded`]).
    fn push(&self, job: Job) -> Result<()> {
        let mut q = self.lock();
        if q.closed {
            return Err(Error::Other("the embedding thread has stopped".into()));
        }
        if q.jobs.len() >= QUEUE {
            return Err(Error::Overloaded(format!("{QUEUE} photos are already waiting for the model")));
        }
        q.jobs.push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    /// The oldest job and the waiting ones of its kind (up to [`MAX_BATCH`]); waits for one.
    /// None once closed and drained.
    fn take(&self) -> Option<Vec<Job>> {
        let mut q = self.lock();
        while q.jobs.is_empty() {
            if q.closed {
                return None;
            }
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let first = q.jobs.pop_front()?;
        let kind = first.kind();
        let mut batch = vec![first];
        let mut i = 0;
        while i < q.jobs.len() && batch.len() < MAX_BATCH {
            if q.jobs[i].kind() == kind {
                batch.extend(q.jobs.remove(i));
            } else {
                i += 1;
            }
        }
        if !q.jobs.is_empty() {
            self.ready.notify_one();
        }
        Some(batch)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// One model thread: runs the batches [`Queue::take`] gives it (a detector's pass, or one
/// embedding pass of one view) and answers each job, until the embedder is dropped. A lone photo
/// does not wait for company: uploads that arrive meanwhile queue up and share the next pass.
fn model_thread(queue: &Queue, net: &Net, detector: Option<&Detector>, input_size: u32, dim: usize, times: &PhaseTimes) {
    while let Some(jobs) = queue.take() {
        let (mut views, mut detects) = ([Vec::new(), Vec::new()], Vec::new());
        for j in jobs {
            match j {
                Job::Embed { px, flipped, reply } => views[usize::from(flipped)].push((px, reply)),
                Job::Detect(px, reply) => detects.push((px, reply)),
            }
        }
        if let (false, Some(det)) = (detects.is_empty(), detector) {
            let t = std::time::Instant::now();
            let x = stack(&detects, det.spec.input_size);
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| det.detect(&to_input(&x, det.device()))));
            (0..detects.len()).for_each(|_| times.add(4, t));
            for (i, (_, reply)) in detects.into_iter().enumerate() {
                let r = match &out {
                    Ok(v) if v.len() > i => Ok(v[i]),
                    _ => Err(Error::Other("the detector failed on this batch".into())),
                };
                let _ = reply.send(r);
            }
        }
        for (flipped, view) in views.into_iter().enumerate() {
            if view.is_empty() {
                continue;
            }
            let t = std::time::Instant::now();
            let x = stack(&view, input_size);
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let x = to_input(&x, net.device());
                let x = if flipped == 1 { x.flip([3]) } else { x };
                let e = net.embed(&x, false).to_device(Device::Cpu).contiguous();
                Vec::<f32>::try_from(e.flatten(0, -1)).unwrap_or_default()
            }));
            (0..view.len()).for_each(|_| times.add(5, t));
            for (i, (_, reply)) in view.into_iter().enumerate() {
                let r = match &out {
                    Ok(v) if v.len() >= (i + 1) * dim => Ok(v[i * dim..(i + 1) * dim].to_vec()),
                    _ => Err(Error::Other("the model failed on this batch".into())),
                };
                let _ = reply.send(r);
            }
        }
    }
}

/// `v` scaled to unit length (as `model::net`'s `l2_normalize`).
fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
    v
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
    let Some(found) = vector::embedding_of(ds, id).await? else { return Ok(None) };
    Ok(Some(similar_to_found(ds, src, found, k, x).await?))
}

/// [`similar_to_id`] of a photo already found in `ds` (its embedding and row).
pub async fn similar_to_found(ds: &lance::Dataset, src: &Source, (v, me): (Vec<f32>, Hit), k: usize, x: Expansion) -> Result<Similar> {
    let hits = vector::similar(src, &v, k, x, Some(&me.uri)).await?;
    let model_id = model_of(ds).await?;
    let root = ds.uri().trim_end_matches('/').rsplit_once('/').map(|(r, _)| r.to_string()).unwrap_or_default();
    Ok(Similar {
        query: me.photo_id.clone(),
        in_collection: true,
        model_id,
        geometric: None,
        neighbours: neighbours(ds, hits),
        query_uri: Some(lake::store::locate(&root, &me.uri)),
    })
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
    /// Its photos by id and URI ([`vector::RowIndex`]): a lookup is one take, not a scan.
    pub rows: vector::RowIndex,
}

impl Snapshot {
    /// The embedding and row of the photo with this id (else this URI); None when the table
    /// has no such photo.
    pub async fn embedding_of(&self, id: &str) -> Result<Option<(Vec<f32>, Hit)>> {
        Ok(self.rows.embedding_of(&self.ds, id).await?)
    }
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
    let rows = vector::RowIndex::build(&ds).await?;
    Ok(Snapshot { ds, embedder, no_embedder, source, version, model_id, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embed(flipped: bool) -> Job {
        Job::Embed { px: vec![u8::from(flipped)], flipped, reply: oneshot::channel().0 }
    }

    fn detect() -> Job {
        Job::Detect(vec![9], oneshot::channel().0)
    }

    fn kinds(jobs: &[Job]) -> Vec<u8> {
        jobs.iter().map(Job::kind).collect()
    }

    #[test]
    fn a_model_thread_takes_one_kind_at_a_time_and_leaves_the_rest_for_the_other() {
        let q = Queue::default();
        for j in [embed(false), embed(true), embed(false), detect(), embed(true)] {
            q.push(j).unwrap();
        }
        // An upload's photo and its mirror image go to two threads, not one after the other.
        assert_eq!(kinds(&q.take().unwrap()), [1, 1]);
        assert_eq!(kinds(&q.take().unwrap()), [2, 2]);
        assert_eq!(kinds(&q.take().unwrap()), [0]);
        // Batches stop at MAX_BATCH; the queue refuses past QUEUE, saying so.
        for _ in 0..QUEUE {
            q.push(embed(false)).unwrap();
        }
        assert!(matches!(q.push(embed(false)), Err(Error::Overloaded(_))));
        assert_eq!(q.take().unwrap().len(), MAX_BATCH);
        // Closed: what is queued is still handed out, then the threads are told to stop.
        q.close();
        assert!(q.push(detect()).is_err());
        let mut left = 0;
        while let Some(b) = q.take() {
            left += b.len();
        }
        assert_eq!(left, QUEUE - MAX_BATCH);
    }

    #[test]
    fn two_views_combine_as_the_network_combines_them() {
        // `Net::embed` with flip TTA: l2(l2(f(x)) + l2(f(flip x))); the model threads hand back
        // each view already normalised.
        let (a, b) = (normalized(vec![3.0, 4.0, 0.0]), normalized(vec![0.0, 0.0, 2.0]));
        let e = normalized(a.iter().zip(&b).map(|(x, y)| x + y).collect());
        let want = [0.6 / 2f32.sqrt(), 0.8 / 2f32.sqrt(), 1.0 / 2f32.sqrt()];
        assert!(e.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-6), "{e:?}");
    }
}
