//! The crop cache (table `crops`, schemas/crops.toml): the pixels a model sees of each photo,
//! decoded once from the (often 20-megapixel) source and kept in the lake, so a second epoch, a
//! re-embed after a retrain or tomorrow night's run read `side`×`side`×3 bytes instead of
//! fetching and decoding the source again.
//!
//! A row is keyed by what determines its pixels and nothing else: the photo's bytes
//! (`content_hash`, so a renamed photo still hits), the crop (detector box grown by the margin,
//! or the whole photo), the side and the decoder (`vision::pixels_version`, passed in by the
//! loader). A new detector or margin gives other boxes, a changed photo other bytes, another
//! decoder other pixels: all miss and are decoded afresh, so nothing stale is ever served; rows
//! of photos the lake no longer has go at `vacuum` ([`prune_orphans`]).
//!
//! Pixels are stored losslessly, exactly as the decoder produced them, so a model sees the same
//! input whether its photo came from the cache or from the source. Writes are buffered and
//! appended in one commit per [`FLUSH_BYTES`] (appends never conflict with each other, so two
//! stages may fill the cache at once); a run killed before a flush loses only cache entries,
//! which the next run decodes again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, Float32Array, Int32Array, LargeBinaryArray, RecordBatch, StringArray};
use futures::TryStreamExt;
use tokio::sync::OnceCell;

use crate::{Catalog, Error, Lake, Result, WriteKind};

pub const TABLE: &str = "crops";

/// Buffered pixels are appended once they reach this many bytes (and at [`CropCache::flush`]).
pub const FLUSH_BYTES: usize = 64 << 20;

/// See [`CropCache::prune_orphans_of`] (what `vacuum` does first).
pub async fn prune_orphans(lake: &Lake) -> Result<u64> {
    CropCache::prune_orphans_of(lake).await
}

/// The content hashes of every photo some table of the lake (but the crop cache) still has;
/// None when no table records content hashes (nothing tells what is gone).
pub async fn live_hashes(lake: &Lake) -> Result<Option<std::collections::HashSet<String>>> {
    let mut keep = std::collections::HashSet::new();
    let mut any = false;
    for t in lake.tables().await? {
        if t == TABLE {
            continue;
        }
        let Some(ds) = lake.open(&t).await? else { continue };
        if ds.schema().field("content_hash").is_none() {
            continue;
        }
        any = true;
        crate::tables::scan_each(&ds, &t, &["content_hash"], |c| {
            let h = c.strings("content_hash")?;
            keep.extend(h.iter().flatten().map(str::to_string));
            Ok(())
        })
        .await?;
    }
    Ok(any.then_some(keep))
}

/// The cache key of the pixels of photo bytes `content_hash`, cropped to `crop` (None: whole),
/// at `side`, by the decoders `decoder` names (`vision::pixels_version`). Crop coordinates are
/// rounded to 1e-6 of the frame, far below a pixel of any photo.
pub fn key(content_hash: &str, crop: Option<[f32; 4]>, side: u32, decoder: &str) -> String {
    let crop = match crop {
        Some(c) => c.iter().map(|v| format!("{:.6}", v)).collect::<Vec<_>>().join(","),
        None => "whole".to_string(),
    };
    blake3::hash(format!("{content_hash}|{crop}|{side}|{decoder}").as_bytes()).to_hex().to_string()
}

struct Pending {
    key: String,
    content_hash: String,
    side: u32,
    crop: Option<[f32; 4]>,
    pixels: Arc<Vec<u8>>,
}

/// What the cache did, for a stage's summary and for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CropStats {
    /// Crops served from the lake.
    pub hits: u64,
    /// Crops looked up and not found (the caller decoded the source).
    pub misses: u64,
    /// Rows appended to the table.
    pub written: u64,
}

/// One reader and writer of the lake's crop cache. Its view of the table is the version it
/// first reads; rows it writes itself are served from memory by its owner (the loader), not
/// read back.
pub struct CropCache {
    lake: Lake,
    index: OnceCell<Option<(lance::Dataset, HashMap<String, u64>)>>,
    pending: Mutex<(Vec<Pending>, usize)>,
    queued: Mutex<std::collections::HashSet<String>>,
    flushing: tokio::sync::Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    written: AtomicU64,
}

impl CropCache {
    pub fn new(lake: Lake) -> CropCache {
        CropCache {
            lake,
            index: OnceCell::new(),
            pending: Mutex::new((Vec::new(), 0)),
            queued: Mutex::new(Default::default()),
            flushing: tokio::sync::Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            written: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CropStats {
        CropStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
        }
    }

    /// Key → row id of every row, read once (the first row of a key wins: two stages filling
    /// the cache at once may both have written one).
    async fn index(&self) -> Result<Option<&(lance::Dataset, HashMap<String, u64>)>> {
        let lake = &self.lake;
        let ix = self
            .index
            .get_or_try_init(|| async move {
                let Some(ds) = lake.open(TABLE).await? else { return Ok::<_, Error>(None) };
                let lerr = |e| Error::lance(TABLE, e);
                let mut scan = ds.scan();
                scan.project(&["key"]).map_err(lerr)?;
                scan.with_row_id();
                let mut stream = scan.try_into_stream().await.map_err(lerr)?;
                let mut map = HashMap::new();
                while let Some(b) = stream.try_next().await.map_err(lerr)? {
                    let keys = b.column_by_name("key").map(|c| c.as_string::<i32>().clone());
                    let ids = b.column_by_name("_rowid").and_then(|c| c.as_any().downcast_ref::<arrow::array::UInt64Array>().cloned());
                    let (Some(keys), Some(ids)) = (keys, ids) else {
                        return Err(Error::Schema { table: TABLE.into(), column: "key".into(), detail: "scan returned no key or _rowid column".into() });
                    };
                    for i in 0..b.num_rows() {
                        map.entry(keys.value(i).to_string()).or_insert(ids.value(i));
                    }
                }
                Ok(Some((ds, map)))
            })
            .await?;
        Ok(ix.as_ref())
    }

    /// The cached pixels of `key`, None when the cache has none. A row whose pixels are not
    /// `expect_len` bytes is an error naming the table: it would feed the model garbage.
    pub async fn get(&self, key: &str, expect_len: usize) -> Result<Option<Vec<u8>>> {
        let Some((ds, map)) = self.index().await? else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let Some(&id) = map.get(key) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let lerr = |e| Error::lance(TABLE, e);
        let schema = ds.schema().project(&["pixels"]).map_err(lerr)?;
        let b = ds.take_rows(&[id], schema).await.map_err(lerr)?;
        let col = b.column_by_name("pixels").ok_or_else(|| Error::Schema { table: TABLE.into(), column: "pixels".into(), detail: "is missing".into() })?;
        let px = col.as_any().downcast_ref::<LargeBinaryArray>().ok_or_else(|| Error::Schema {
            table: TABLE.into(),
            column: "pixels".into(),
            detail: format!("is {}, expected large_binary", col.data_type()),
        })?;
        if px.len() != 1 || px.is_null(0) || px.value(0).len() != expect_len {
            return Err(Error::Schema {
                table: TABLE.into(),
                column: "pixels".into(),
                detail: format!(
                    "row of key {key} holds {} bytes, expected {expect_len}; drop the table `{TABLE}` to rebuild the cache",
                    if px.len() == 1 && px.is_valid(0) { px.value(0).len() } else { 0 }
                ),
            });
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(px.value(0).to_vec()))
    }

    /// Queues pixels for the table (once per key); appends when enough are queued.
    pub async fn put(&self, key: String, content_hash: &str, crop: Option<[f32; 4]>, side: u32, pixels: Arc<Vec<u8>>) -> Result<()> {
        if let Some((_, map)) = self.index().await? {
            if map.contains_key(&key) {
                return Ok(());
            }
        }
        if !self.queued.lock().expect("crop cache poisoned").insert(key.clone()) {
            return Ok(());
        }
        let full = {
            let mut p = self.pending.lock().expect("crop cache poisoned");
            p.1 += pixels.len();
            p.0.push(Pending { key, content_hash: content_hash.to_string(), side, crop, pixels });
            p.1 >= FLUSH_BYTES
        };
        if full {
            self.flush().await?;
        }
        Ok(())
    }

    /// Appends everything queued, in one commit. Returns the rows written.
    pub async fn flush(&self) -> Result<u64> {
        let _one = self.flushing.lock().await;
        let rows = std::mem::take(&mut *self.pending.lock().expect("crop cache poisoned")).0;
        if rows.is_empty() {
            return Ok(0);
        }
        let schema = Catalog::builtin(TABLE);
        let coord = |i: usize| -> ArrayRef { Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.crop.map(|c| c[i])))) };
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.key.as_str()))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.content_hash.as_str()))),
                Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.side as i32))),
                coord(0),
                coord(1),
                coord(2),
                coord(3),
                Arc::new(LargeBinaryArray::from_iter_values(rows.iter().map(|r| r.pixels.as_slice()))),
            ],
        )?;
        let mut sink = self.lake.sink(TABLE, schema, WriteKind::Append);
        sink.send(batch).await?;
        sink.finish().await?;
        self.written.fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(rows.len() as u64)
    }

    /// Deletes the rows whose photo bytes no other table of the lake records (in a
    /// `content_hash` column): photos deleted or replaced. Nothing when no table records any.
    pub async fn prune_orphans_of(lake: &Lake) -> Result<u64> {
        match live_hashes(lake).await? {
            Some(keep) => CropCache::prune(lake, &keep).await,
            None => Ok(0),
        }
    }

    /// Deletes the rows whose photo bytes are not in `keep` (content hashes of the photos the
    /// lake still has). Returns the rows deleted.
    pub async fn prune(lake: &Lake, keep: &std::collections::HashSet<String>) -> Result<u64> {
        let Some(mut ds) = lake.open(TABLE).await? else { return Ok(0) };
        let lerr = |e| Error::lance(TABLE, e);
        let mut scan = ds.scan();
        scan.project(&["content_hash"]).map_err(lerr)?;
        let batches: Vec<RecordBatch> = scan.try_into_stream().await.map_err(lerr)?.try_collect().await.map_err(lerr)?;
        let mut gone: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let c = b.column(0).as_string::<i32>().clone();
                (0..c.len()).map(move |i| c.value(i).to_string()).collect::<Vec<_>>()
            })
            .filter(|h| !keep.contains(h))
            .collect();
        gone.sort();
        gone.dedup();
        if gone.is_empty() {
            return Ok(0);
        }
        let before = ds.count_rows(None).await.map_err(lerr)?;
        for chunk in gone.chunks(1000) {
            let list = chunk.iter().map(|h| crate::tables::sql_string(h)).collect::<Vec<_>>().join(", ");
            ds.delete(&format!("content_hash IN ({list})")).await.map_err(lerr)?;
        }
        let after = ds.count_rows(None).await.map_err(lerr)?;
        Ok((before - after) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lake(dir: &std::path::Path) -> Lake {
        Lake::new(format!("file://{}", dir.display()), HashMap::new(), Catalog::default())
    }

    #[test]
    fn the_key_changes_with_the_bytes_the_crop_the_side_and_the_decoder_only() {
        let k = key("h1", Some([0.1, 0.2, 0.7, 0.9]), 224, "d1");
        assert_eq!(k, key("h1", Some([0.1, 0.2, 0.7, 0.9]), 224, "d1"));
        assert_ne!(k, key("h2", Some([0.1, 0.2, 0.7, 0.9]), 224, "d1"), "other photo bytes");
        assert_ne!(k, key("h1", Some([0.1, 0.2, 0.7, 0.91]), 224, "d1"), "another box or margin");
        assert_ne!(k, key("h1", Some([0.1, 0.2, 0.7, 0.9]), 256, "d1"), "another side");
        assert_ne!(k, key("h1", None, 224, "d1"), "the whole photo");
        assert_ne!(k, key("h1", Some([0.1, 0.2, 0.7, 0.9]), 224, "d2"), "another decoder");
    }

    #[tokio::test]
    async fn pixels_written_by_one_cache_are_served_by_the_next_and_pruned_with_their_photo() {
        let dir = tempfile::tempdir().unwrap();
        let lake = lake(dir.path());
        let a: Arc<Vec<u8>> = Arc::new((0..12).collect());
        let b: Arc<Vec<u8>> = Arc::new((100..112).collect());
        let (ka, kb) = (key("ha", None, 2, "d"), key("hb", Some([0.0, 0.0, 0.5, 0.5]), 2, "d"));
        let c = CropCache::new(lake.clone());
        assert_eq!(c.get(&ka, 12).await.unwrap(), None);
        c.put(ka.clone(), "ha", None, 2, a.clone()).await.unwrap();
        c.put(ka.clone(), "ha", None, 2, a.clone()).await.unwrap();
        c.put(kb.clone(), "hb", Some([0.0, 0.0, 0.5, 0.5]), 2, b.clone()).await.unwrap();
        assert_eq!(c.flush().await.unwrap(), 2, "one row per key");
        assert_eq!(c.flush().await.unwrap(), 0);

        let d = CropCache::new(lake.clone());
        assert_eq!(d.get(&ka, 12).await.unwrap().as_deref(), Some(a.as_slice()));
        assert_eq!(d.get(&kb, 12).await.unwrap().as_deref(), Some(b.as_slice()));
        assert_eq!(d.get(&key("ha", None, 3, "d"), 27).await.unwrap(), None);
        // What the cache has is not written again.
        d.put(ka.clone(), "ha", None, 2, a.clone()).await.unwrap();
        assert_eq!(d.flush().await.unwrap(), 0);
        assert_eq!(d.stats(), CropStats { hits: 2, misses: 1, written: 0 });
        // A row of the wrong size is an error that names the table, never pixels.
        let e = d.get(&ka, 27).await.unwrap_err().to_string();
        assert!(e.contains("crops") && e.contains("27"), "{e}");

        // Vacuum's pruning: nothing while no table records photos; then the rows of the photo
        // no table has any more.
        assert_eq!(prune_orphans(&lake).await.unwrap(), 0);
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new("content_hash", arrow::datatypes::DataType::Utf8, true)]));
        let mut sink = lake.sink("photos", schema.clone(), WriteKind::Overwrite);
        sink.send(RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec![Some("hb"), None]))]).unwrap()).await.unwrap();
        sink.finish().await.unwrap();
        assert_eq!(prune_orphans(&lake).await.unwrap(), 1);
        assert_eq!(prune_orphans(&lake).await.unwrap(), 0);
        let e = CropCache::new(lake.clone());
        assert_eq!(e.get(&ka, 12).await.unwrap(), None);
        assert!(e.get(&kb, 12).await.unwrap().is_some());
    }
}
