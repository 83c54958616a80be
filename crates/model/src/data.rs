//! Photos into model inputs: fetched from their object store, decoded and resized to the model
//! input on the blocking pool, kept in a bounded in-memory cache of decoded pixels (so the
//! second epoch decodes nothing when the set fits), and handed to the training or embedding
//! thread a few batches ahead so the model never waits for I/O.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use tch::Tensor;
use tokio::sync::{Semaphore, mpsc};
use url::Url;

use lake::crops::{self, CropCache, CropStats};
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
    /// BLAKE3 of the photo's bytes as ingest recorded them: the key of its crops in the lake's
    /// crop cache ([`lake::crops`]); None: the cache is not used for it.
    pub content_hash: Option<String>,
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
    /// The lake's crop cache, when this loader reads and fills it.
    crops: Option<CropCache>,
    /// Source photos fetched and decoded (not served from memory or the crop cache).
    decoded: AtomicU64,
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
            crops: None,
            decoded: AtomicU64::new(0),
        }
    }

    /// Reads crops from the lake's crop cache and adds those it decodes ([`lake::crops`]), for
    /// photos whose content hash is known. Call [`Loader::flush`] when done.
    pub fn with_crop_cache(mut self, lake: lake::Lake) -> Loader {
        self.crops = Some(CropCache::new(lake));
        self
    }

    /// Source photos fetched and decoded so far.
    pub fn decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }

    /// What the crop cache did so far (None: not used).
    pub fn crop_stats(&self) -> Option<CropStats> {
        self.crops.as_ref().map(CropCache::stats)
    }

    /// Writes the crops decoded since the last flush to the lake's cache.
    pub async fn flush(&self) -> Result<u64> {
        match &self.crops {
            Some(c) => c.flush().await,
            None => Ok(0),
        }
    }

    /// [`Loader::flush`] for a stage: the cache only saves work, so a failed write loses
    /// nothing; it is logged, and the next run decodes those photos again.
    pub async fn flush_or_warn(&self, stage: &str) {
        if let Err(e) = self.flush().await {
            tracing::warn!("stage `{stage}`: crops not added to the lake's crop cache (the next run decodes them again): {e}");
        }
    }

    /// One line for a stage summary: where the pixels came from.
    pub fn summary(&self) -> String {
        match self.crop_stats() {
            Some(s) => format!("{} photos decoded, {} crops from the lake's crop cache, {} added to it", self.decoded(), s.hits, s.written),
            None => format!("{} photos decoded", self.decoded()),
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
    /// With a crop cache and a `content_hash`, the lake's copy is used when it has one, and a
    /// decoded crop is added to it.
    pub async fn pixels(&self, uri: &str, crop: Option<[f32; 4]>, content_hash: Option<&str>) -> Result<Arc<Vec<u8>>> {
        let key = match crop {
            Some(c) => format!("{uri}#{:?}", c),
            None => uri.to_string(),
        };
        if let Some(p) = self.cache.lock().expect("cache poisoned").map.get(&key) {
            return Ok(p.clone());
        }
        let lake_key = match (&self.crops, content_hash) {
            (Some(c), Some(h)) => Some((c, h, crops::key(h, crop, self.side, vision::pixels_version()))),
            _ => None,
        };
        if let Some((c, _, k)) = &lake_key {
            let len = (self.side as usize).pow(2) * 3;
            if let Some(px) = c.get(k, len).await? {
                let px = Arc::new(px);
                self.keep(key, &px);
                return Ok(px);
            }
        }
        let px = self.decode(uri, crop).await?;
        self.keep(key, &px);
        if let Some((c, h, k)) = lake_key {
            c.put(k, h, crop, self.side, px.clone()).await?;
        }
        Ok(px)
    }

    fn keep(&self, key: String, px: &Arc<Vec<u8>>) {
        let mut cache = self.cache.lock().expect("cache poisoned");
        if cache.bytes + px.len() <= cache.budget {
            cache.bytes += px.len();
            cache.map.insert(key, px.clone());
        }
    }

    /// Fetches the photo and decodes it (its crop) to `side`×`side`.
    async fn decode(&self, uri: &str, crop: Option<[f32; 4]>) -> Result<Arc<Vec<u8>>> {
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
        self.decoded.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(img.into_raw()))
    }

    /// A batch as `[N, side, side, 3]` u8, in the order of `items`. Each photo loads in its own
    /// task (decoding is bounded by the loader's thread count).
    pub async fn batch(self: &Arc<Self>, items: Vec<Photo>) -> Result<Tensor> {
        let n = items.len();
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in items.into_iter().enumerate() {
            let me = self.clone();
            set.spawn(async move { me.pixels(&p.uri, p.crop, p.content_hash.as_deref()).await.map(|px| (i, px)) });
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
                let items: Vec<Photo> = b.iter().map(|&i| photos[i].clone()).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Four photos (PNG files) with distinct content, two of them cropped; content hashes as
    /// ingest records them (BLAKE3 of the bytes).
    fn write_photos(dir: &std::path::Path, variant: u8) -> Vec<Photo> {
        (0..4u8)
            .map(|i| {
                let img = image::RgbImage::from_fn(120, 90, |x, y| {
                    image::Rgb([(x as u8).wrapping_mul(i + 1), (y as u8).wrapping_add(40 * i), variant.wrapping_add((x ^ y) as u8)])
                });
                let p = dir.join(format!("p{i}.png"));
                img.save(&p).unwrap();
                let bytes = std::fs::read(&p).unwrap();
                Photo {
                    photo_id: format!("p{i}"),
                    uri: format!("file://{}", p.display()),
                    label: None,
                    crop: (i % 2 == 0).then_some([0.1, 0.2, 0.8, 0.9]),
                    content_hash: Some(blake3::hash(&bytes).to_hex().to_string()),
                }
            })
            .collect()
    }

    #[test]
    fn a_later_run_decodes_no_source_photo_and_a_new_box_or_new_bytes_are_decoded_afresh() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (src, lake_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let lake = lake::Lake::new(format!("file://{}", lake_dir.path().display()), HashMap::new(), lake::Catalog::default());
            let photos = write_photos(src.path(), 0);
            let side = 24;

            // First run, two epochs: every photo decoded once (the memory cache serves epoch 2).
            let first = Arc::new(Loader::new(side, 2, 1 << 20, HashMap::new()).with_crop_cache(lake.clone()));
            let epoch1 = first.batch(photos.clone()).await.unwrap();
            let epoch2 = first.batch(photos.clone()).await.unwrap();
            assert!(epoch1.equal(&epoch2));
            assert_eq!(first.decoded(), 4);
            assert_eq!(first.flush().await.unwrap(), 4);

            // Next run, no memory cache, sources deleted: both epochs come from the lake, equal
            // to what the decoder produced (stored losslessly).
            for p in &photos {
                std::fs::remove_file(p.uri.trim_start_matches("file://")).unwrap();
            }
            let second = Arc::new(Loader::new(side, 2, 0, HashMap::new()).with_crop_cache(lake.clone()));
            for _ in 0..2 {
                assert!(second.batch(photos.clone()).await.unwrap().equal(&epoch1));
            }
            assert_eq!(second.decoded(), 0, "no source photo decoded");
            assert_eq!(second.crop_stats().unwrap().hits, 8);
            assert_eq!(second.flush().await.unwrap(), 0, "nothing new to add");

            // Without the cache the same loader must read the sources, which are gone.
            let plain = Arc::new(Loader::new(side, 2, 0, HashMap::new()));
            assert!(plain.batch(photos.clone()).await.is_err());

            // Invalidation: photo 0 with another margin (another box), photo 1 with new bytes
            // at the same URI; photos 2 and 3 unchanged.
            let mut changed = write_photos(src.path(), 99);
            changed[0].crop = Some([0.05, 0.15, 0.85, 0.95]);
            changed[0].content_hash = photos[0].content_hash.clone();
            changed[2].content_hash = photos[2].content_hash.clone();
            changed[3].content_hash = photos[3].content_hash.clone();
            assert_ne!(changed[1].content_hash, photos[1].content_hash);
            let third = Arc::new(Loader::new(side, 2, 0, HashMap::new()).with_crop_cache(lake.clone()));
            let t = third.batch(changed.clone()).await.unwrap();
            assert_eq!(third.decoded(), 2, "the new box and the new bytes, nothing else");
            assert_eq!(third.crop_stats().unwrap().hits, 2);
            assert!(!t.get(0).equal(&epoch1.get(0)) && !t.get(1).equal(&epoch1.get(1)));
            assert!(t.get(2).equal(&epoch1.get(2)) && t.get(3).equal(&epoch1.get(3)));
            assert_eq!(third.flush().await.unwrap(), 2);

            // A photo without a content hash never touches the cache.
            let mut unkeyed = changed[3].clone();
            unkeyed.content_hash = None;
            let fourth = Arc::new(Loader::new(side, 2, 0, HashMap::new()).with_crop_cache(lake.clone()));
            let _ = fourth.batch(vec![unkeyed]).await.unwrap();
            assert_eq!((fourth.decoded(), fourth.crop_stats().unwrap()), (1, lake::crops::CropStats::default()));
        });
    }
}
