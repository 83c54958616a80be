//! `pipeline digest`: what a lake holds, as hashes a person or a test can compare between two
//! lakes — one line per table (its rows and a BLAKE3 of their content, in any order) and one
//! per model file. Two runs of the same pipeline over the same photos give the same digest;
//! the kill trials compare a run killed and re-run against one that was not.
//!
//! What a run cannot repeat is left out: the `runs` table (the log of runs, killed ones
//! included), the columns saying which run wrote a row and when (`run_id`, `*_at`), timings
//! in JSON values and model files (`seconds`, `images_per_second`), TensorBoard event files and
//! a remote model folder's `_manifest.json` (the hashes of its files as written, timings included). Everything else counts, to the bit: a row lost or written twice changes the table's
//! row count and hash, a float that differs in its last bit changes the hash.

use arrow::array::{Array, RecordBatch};
use arrow::util::display::array_value_to_string;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

use lake::{Error, Lake, Result, store};

/// Columns that say which run wrote a row and when.
fn volatile_column(name: &str) -> bool {
    name == "run_id" || name.ends_with("_at")
}

/// Keys of JSON values and files that hold timings.
const VOLATILE_KEYS: &[&str] = &["seconds", "images_per_second"];

/// Tables that record runs rather than data.
const LOGS: &[&str] = &["runs"];

/// One line of a digest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Line {
    /// `table` or `file`.
    pub kind: &'static str,
    /// A table's name, or a model file's path under the lake (`models/<id>/<file>`).
    pub name: String,
    /// Rows of a table; bytes of a file (of a JSON file, as compared: without its timings).
    pub size: u64,
    /// Rows that are another row's exact copy (tables only).
    pub repeated: u64,
    pub blake3: String,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            "table" => write!(f, "table {} rows {} repeated {} blake3 {}", self.name, self.size, self.repeated, self.blake3),
            _ => write!(f, "file {} bytes {} blake3 {}", self.name, self.size, self.blake3),
        }
    }
}

/// The digest of `lake`: its tables (but `runs`), then every file under `models/`, by name.
pub async fn digest(lake: &Lake) -> Result<Vec<Line>> {
    let mut out = Vec::new();
    for table in lake.tables().await? {
        if LOGS.contains(&table.as_str()) {
            continue;
        }
        let Some(ds) = lake.open(&table).await? else { continue };
        let mut rows: Vec<[u8; 32]> = Vec::new();
        let mut stream = ds.scan().try_into_stream().await.map_err(|e| Error::lance(&table, e))?;
        while let Some(batch) = stream.try_next().await.map_err(|e| Error::lance(&table, e))? {
            rows.extend(row_hashes(&batch)?);
        }
        rows.sort_unstable();
        let repeated = rows.windows(2).filter(|w| w[0] == w[1]).count() as u64;
        let mut h = blake3::Hasher::new();
        for r in &rows {
            h.update(r);
        }
        out.push(Line { kind: "table", name: table, size: rows.len() as u64, repeated, blake3: h.finalize().to_hex().to_string() });
    }
    let uri = format!("{}/models", lake.root());
    let (store, prefix) = store::open(&uri, lake.options())?;
    let mut files: Vec<object_store::ObjectMeta> = match store.list(Some(&prefix)).try_collect().await {
        Ok(f) => f,
        Err(object_store::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(Error::ObjectStore { uri, source: e }),
    };
    files.sort_by(|a, b| a.location.cmp(&b.location));
    for m in files {
        let rel = m.location.as_ref().strip_prefix(prefix.as_ref()).unwrap_or(m.location.as_ref()).trim_start_matches('/').to_string();
        // A remote model folder's manifest holds the BLAKE3 of each file as written, timings
        // included; the files themselves are compared (without their timings).
        if rel.contains("/tensorboard/") || rel.ends_with(&format!("/{}", lake::models::MANIFEST)) {
            continue;
        }
        let bytes = store.get(&m.location).await.map_err(|e| Error::ObjectStore { uri: format!("{uri}/{rel}"), source: e })?;
        let bytes = bytes.bytes().await.map_err(|e| Error::ObjectStore { uri: format!("{uri}/{rel}"), source: e })?;
        let content = match (rel.ends_with(".json"), serde_json::from_slice::<serde_json::Value>(&bytes)) {
            (true, Ok(v)) => serde_json::to_vec(&without_timings(v)).unwrap_or_default(),
            _ => bytes.to_vec(),
        };
        out.push(Line { kind: "file", name: format!("models/{rel}"), size: content.len() as u64, repeated: 0, blake3: blake3::hash(&content).to_hex().to_string() });
    }
    Ok(out)
}

/// One BLAKE3 per row, over its columns in name order (but [`volatile_column`]s), each as
/// `name=value` with JSON values stripped of their timings.
fn row_hashes(batch: &RecordBatch) -> Result<Vec<[u8; 32]>> {
    let schema = batch.schema();
    let mut cols: Vec<(usize, &str)> =
        schema.fields().iter().enumerate().map(|(i, f)| (i, f.name().as_str())).filter(|(_, n)| !volatile_column(n)).collect();
    cols.sort_by_key(|(_, n)| *n);
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let mut h = blake3::Hasher::new();
        for (i, name) in &cols {
            let col = batch.column(*i);
            let text = if col.is_null(row) {
                "\u{0}null".to_string()
            } else {
                array_value_to_string(col, row).map_err(|e| Error::Other(format!("column `{name}`: {e}")))?
            };
            let text = match text.starts_with('{') || text.starts_with('[') {
                true => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) => serde_json::to_string(&without_timings(v)).unwrap_or(text),
                    Err(_) => text,
                },
                false => text,
            };
            h.update(name.as_bytes());
            h.update(b"=");
            h.update(&(text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        out.push(*h.finalize().as_bytes());
    }
    Ok(out)
}

fn without_timings(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(k, _)| !VOLATILE_KEYS.contains(&k.as_str())).map(|(k, v)| (k, without_timings(v))).collect()),
        Value::Array(a) => Value::Array(a.into_iter().map(without_timings).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, StringArray};
    use std::sync::Arc;

    fn batch(ids: &[&str], runs: &[&str], x: &[f32], history: &[&str]) -> RecordBatch {
        RecordBatch::try_from_iter([
            ("photo_id", Arc::new(StringArray::from(ids.to_vec())) as Arc<dyn Array>),
            ("run_id", Arc::new(StringArray::from(runs.to_vec())) as Arc<dyn Array>),
            ("x", Arc::new(Float32Array::from(x.to_vec())) as Arc<dyn Array>),
            ("history", Arc::new(StringArray::from(history.to_vec())) as Arc<dyn Array>),
        ])
        .unwrap()
    }

    #[test]
    fn rows_hash_by_content_not_by_run_or_timing() {
        let a = row_hashes(&batch(&["a", "b"], &["r1", "r1"], &[1.0, 2.0], &[r#"{"loss":1,"seconds":2.5}"#, "[]"])).unwrap();
        let b = row_hashes(&batch(&["a", "b"], &["r2", "r9"], &[1.0, 2.0], &[r#"{"seconds":9.1,"loss":1}"#, "[]"])).unwrap();
        assert_eq!(a, b, "run ids, timings and key order do not count");
        let c = row_hashes(&batch(&["a", "b"], &["r1", "r1"], &[1.0, f32::from_bits(2.0f32.to_bits() + 1)], &[r#"{"loss":1}"#, "[]"])).unwrap();
        assert_eq!(a[0], c[0]);
        assert_ne!(a[1], c[1], "a float one bit off is another row");
        let d = row_hashes(&batch(&["a"], &["r1"], &[1.0], &[r#"{"loss":2,"seconds":2.5}"#])).unwrap();
        assert_ne!(a[0], d[0], "what is not a timing counts");
    }
}
