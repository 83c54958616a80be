//! Photos into model inputs: fetched from their object store, decoded and resized to the model
//! input on the blocking pool, kept in a bounded in-memory cache of decoded pixels (so the
//! second epoch decodes nothing when the set fits), and handed to the training or embedding
//! thread a few batches ahead so the model never waits for I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use tch::Tensor;
use tokio::sync::{Semaphore, mpsc};
use url::Url;

use lake::store;
use vision::{self, DecodeLimits};
use crate::{Error, Result};

/// One photo to load: where it is, (for training) whose it is, and (when a detector found the
/// subject) the part of it the model sees.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Photo {
    pub photo_id: String,
    pub uri: String,
    pub label: Option<String>,
    /// `[x0, y0, x1, y1]` as fractions of the displayed frame, margin included; None: all of it.
    pub crop: Option<[f32; 4]>,
}

/// Object stores by root (`s3://bucket`, `file://`), opened once.
#[derive(Default)]
struct Stores {
    by_root: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl Stores {
    fn get(&self, uri: &str, options: &HashMap<String, String>) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
        let url = Url::parse(uri).map_err(|e| Error::Location { uri: uri.into(), reason: e.to_string() })?;
        let root = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
        let path = ObjectPath::from_url_path(url.path())
            .map_err(|e| Error::Location { uri: uri.into(), reason: e.to_string() })?;
        let mut map = self.by_root.lock().expect("store map poisoned");
        if let Some(s) = map.get(&root) {
            return Ok((s.clone(), path));
        }
        let (s, _) = store::open(uri, options)?;
        map.insert(root, s.clone());
        Ok((s, path))
    }
}

/// Decoded pixels by URI, up to a byte budget; first come, first kept (a training set visits
/// every photo each epoch, so any photo kept saves the same work).
struct Cache {
    map: HashMap<String, Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

/// Fetches and decodes photos (or their crops) to `side`×`side` RGB (stretched, as the model
/// sees them).
pub struct Loader {
    stores: Stores,
    options: HashMap<String, String>,
    side: u32,
    limits: DecodeLimits,
    decode_slots: Arc<Semaphore>,
    cache: Mutex<Cache>,
    /// The lake whose tables the URIs come from: a lake-relative record is located against it.
    root: Option<String>,
}

impl Loader {
    /// `threads` photos decode at once; `cache_bytes` of decoded pixels are kept (0: none).
    pub fn new(side: u32, threads: usize, cache_bytes: usize, options: HashMap<String, String>) -> Loader {
        Loader {
            stores: Stores::default(),
            options,
            side: side.max(1),
            limits: DecodeLimits::default(),
            decode_slots: Arc::new(Semaphore::new(threads.max(1))),
            cache: Mutex::new(Cache { map: HashMap::new(), bytes: 0, budget: cache_bytes }),
            root: None,
        }
    }

    /// Photos named as the tables of the lake at `root` record them ([`store::locate`]).
    pub fn in_lake(mut self, root: &str) -> Loader {
        self.root = Some(root.to_string());
        self
    }

    pub fn side(&self) -> u32 {
        self.side
    }

    /// Pixels of one photo (of its `crop` when given), `side*side*3` bytes, HWC.
    pub async fn pixels(&self, uri: &str, crop: Option<[f32; 4]>) -> Result<Arc<Vec<u8>>> {
        let key = match crop {
            Some(c) => format!("{uri}#{:?}", c),
            None => uri.to_string(),
        };
        if let Some(p) = self.cache.lock().expect("cache poisoned").map.get(&key) {
            return Ok(p.clone());
        }
        let located = match &self.root {
            Some(root) => store::locate(root, uri),
            None => uri.to_string(),
        };
        let uri = located.as_str();
        let (store, path) = self.stores.get(uri, &self.options)?;
        let bytes = async { store.get(&path).await?.bytes().await }
            .await
            .map_err(|e| Error::ObjectStore { uri: uri.into(), source: e })?;
        let _permit = self.decode_slots.acquire().await.map_err(|e| Error::Other(e.to_string()))?;
        let (limits, side) = (self.limits.clone(), self.side);
        let img = tokio::task::spawn_blocking(move || match crop {
            Some(c) => vision::decode_crop_square(&bytes, &limits, side, c),
            None => vision::decode_square(&bytes, &limits, side),
        })
            .await
            .map_err(|e| Error::Other(format!("decoder panicked on {uri}: {e}")))?
            .map_err(|e| Error::Location { uri: uri.into(), reason: format!("cannot decode: {e}") })?;
        let px = Arc::new(img.into_raw());
        let mut cache = self.cache.lock().expect("cache poisoned");
        if cache.bytes + px.len() <= cache.budget {
            cache.bytes += px.len();
            cache.map.insert(key, px.clone());
        }
        Ok(px)
    }

    /// A batch as `[N, side, side, 3]` u8, in the order of `items` (URI, crop). Each photo loads in its own
    /// task (decoding is bounded by the loader's thread count).
    pub async fn batch(self: &Arc<Self>, items: Vec<(String, Option<[f32; 4]>)>) -> Result<Tensor> {
        let n = items.len();
        let mut set = tokio::task::JoinSet::new();
        for (i, (u, crop)) in items.into_iter().enumerate() {
            let me = self.clone();
            set.spawn(async move { me.pixels(&u, crop).await.map(|p| (i, p)) });
        }
        let mut parts: Vec<(usize, Arc<Vec<u8>>)> = Vec::with_capacity(n);
        while let Some(r) = set.join_next().await {
            parts.push(r.map_err(|e| Error::Other(format!("photo loader task failed: {e}")))??);
        }
        parts.sort_by_key(|(i, _)| *i);
        let s = self.side as usize;
        let mut buf = Vec::with_capacity(n * s * s * 3);
        for (_, p) in &parts {
            buf.extend_from_slice(p);
        }
        Ok(Tensor::from_slice(&buf).view([n as i64, s as i64, s as i64, 3]))
    }
}

/// Loads `batches` (lists of indices into `photos`) in order on the runtime behind `handle`,
/// at most `depth` batches ahead of the consumer. The consumer (a blocking thread running the
/// model) reads with `blocking_recv`; dropping the receiver stops the loading.
pub fn prefetch(
    loader: Arc<Loader>,
    photos: Arc<Vec<Photo>>,
    batches: Vec<Vec<usize>>,
    depth: usize,
    handle: &tokio::runtime::Handle,
) -> mpsc::Receiver<Result<(Vec<usize>, Tensor)>> {
    let (tx, rx) = mpsc::channel(depth.max(1));
    handle.spawn(async move {
        // Two batches in flight at once keep the decoders busy across batch boundaries.
        let mut stream = futures::stream::iter(batches)
            .map(move |b| {
                let items: Vec<(String, Option<[f32; 4]>)> = b.iter().map(|&i| (photos[i].uri.clone(), photos[i].crop)).collect();
                let loader = loader.clone();
                async move { loader.batch(items).await.map(|t| (b, t)) }
            })
            .buffered(2);
        while let Some(item) = stream.next().await {
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// One chunk of rows for the `embeddings` table; `hash_of` gives photos' content hashes by URI
/// (empty when the input has none).
pub fn embedding_batch(
    photos: &[Photo],
    values: &[f32],
    dim: usize,
    model_id: &str,
    tta: &str,
    run_id: &str,
    hash_of: &HashMap<String, String>,
) -> Result<RecordBatch> {
    let n = photos.len();
    let item = Arc::new(Field::new("item", DataType::Float32, true));
    let vectors = FixedSizeListArray::try_new(item, dim as i32, Arc::new(Float32Array::from(values.to_vec())), None)?;
    let schema = lake::Catalog::builtin("embeddings");
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
            Arc::new(StringArray::from_iter(photos.iter().map(|p| hash_of.get(&p.uri).map(String::as_str)))),
        ],
    )?)
}
