//! The model registry's files: `<lake>/models/<id>/` holds each model's spec, weights and
//! events. Stages that train write there, stages that embed and the query side read there, all
//! through [`ModelDir`]; for a remote lake the folder is a local copy synced to the store.

use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as ObjectPath};

use crate::{Error, Lake, Result, store, tables};

/// The weights file every trained model's folder holds once it has trained an epoch.
pub const WEIGHTS: &str = "best.safetensors";

/// The registry table: one row per model, merged on `model_id`. Stages add to it through
/// `StageCtx::register_model`, which holds each stage to the model names it declared.
pub const TABLE: &str = "models";

/// Which model of each name is current (append-only, the latest row of a name wins): what
/// `model = "current:NAME"` resolves to.
pub const PROMOTIONS: &str = "promotions";

/// How a stage's `model` key names the current model of a name.
pub const CURRENT_PREFIX: &str = "current:";

/// The model name of an id (`<name>-<12 hex>`, as `StageCtx::register_model` holds stages to).
pub fn name_of(id: &str) -> Option<&str> {
    let (name, hash) = id.rsplit_once('-')?;
    (!name.is_empty() && hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
}

/// A model that is current for its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub name: String,
    pub model_id: String,
    pub reason: String,
    pub map_at_20: Option<f64>,
    /// The model that was current before.
    pub replaced: Option<String>,
    pub run_id: String,
    /// Microseconds since the epoch, UTC.
    pub promoted_at: i64,
}

/// Every name's current model (the latest promotion of each name), by name.
pub async fn current_all(lake: &Lake) -> Result<std::collections::BTreeMap<String, Current>> {
    use arrow::array::{Array, AsArray};
    let mut out: std::collections::BTreeMap<String, Current> = std::collections::BTreeMap::new();
    let Some(ds) = lake.open(PROMOTIONS).await? else { return Ok(out) };
    let batches = tables::rows_where(&ds, PROMOTIONS, "name IS NOT NULL", None).await?;
    for b in &batches {
        let c = tables::Columns::new(PROMOTIONS, b);
        let (names, ids, reasons, runs) = (c.strings("name")?, c.strings("model_id")?, c.strings("reason")?, c.strings("run_id")?);
        let replaced = c.strings("replaced")?;
        let map = b.column_by_name("map_at_20").map(|a| a.as_primitive::<arrow::datatypes::Float64Type>().clone());
        let at = b
            .column_by_name("promoted_at")
            .ok_or_else(|| Error::Schema { table: PROMOTIONS.into(), column: "promoted_at".into(), detail: "is missing".into() })?
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .clone();
        for i in 0..b.num_rows() {
            let row = Current {
                name: names.value(i).to_string(),
                model_id: ids.value(i).to_string(),
                reason: reasons.value(i).to_string(),
                map_at_20: map.as_ref().and_then(|m| m.is_valid(i).then(|| m.value(i))),
                replaced: replaced.is_valid(i).then(|| replaced.value(i).to_string()),
                run_id: runs.value(i).to_string(),
                promoted_at: at.value(i),
            };
            // Later wins; rows of one instant keep the order they were written in.
            if out.get(&row.name).is_none_or(|c| c.promoted_at <= row.promoted_at) {
                out.insert(row.name.clone(), row);
            }
        }
    }
    Ok(out)
}

/// The current model of `name`, None when none was ever promoted.
pub async fn current(lake: &Lake, name: &str) -> Result<Option<Current>> {
    Ok(current_all(lake).await?.remove(name))
}

/// One row of [`PROMOTIONS`]: `id` becomes current for its name.
pub fn promotion_row(id: &str, reason: &str, map_at_20: Option<f64>, replaced: Option<&str>, run_id: &str) -> Result<arrow::array::RecordBatch> {
    use arrow::array::{Float64Array, StringArray, TimestampMicrosecondArray};
    let name = name_of(id).ok_or_else(|| Error::Other(format!("`{id}` is not a model id (<name>-<12 hex digits>)")))?;
    let schema = crate::Catalog::builtin(PROMOTIONS);
    Ok(arrow::array::RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![name])),
            Arc::new(StringArray::from(vec![id])),
            Arc::new(StringArray::from(vec![reason])),
            Arc::new(Float64Array::from(vec![map_at_20])),
            Arc::new(StringArray::from(vec![replaced])),
            Arc::new(StringArray::from(vec![run_id])),
            Arc::new(TimestampMicrosecondArray::from(vec![chrono::Utc::now().timestamp_micros()]).with_timezone("UTC")),
        ],
    )?)
}

/// A registered model's best validation mAP@20 (None: unknown model, or not validated).
pub async fn best_map(lake: &Lake, id: &str) -> Result<Option<f64>> {
    use arrow::array::{Array, AsArray};
    let Some(ds) = lake.open(TABLE).await? else { return Ok(None) };
    let rows = tables::rows_where(&ds, TABLE, &format!("model_id = {}", tables::sql_string(id)), Some(&["best_map_at_20"])).await?;
    for b in &rows {
        let a = b.column(0).as_primitive::<arrow::datatypes::Float64Type>();
        if let Some(i) = (0..a.len()).find(|&i| a.is_valid(i)) {
            return Ok(Some(a.value(i)));
        }
    }
    Ok(None)
}

/// Whether model `id` has a row in the registry.
pub async fn registered(lake: &Lake, id: &str) -> Result<bool> {
    let Some(ds) = lake.open(TABLE).await? else { return Ok(false) };
    Ok(!tables::rows_where(&ds, TABLE, &format!("model_id = {}", tables::sql_string(id)), Some(&["model_id"])).await?.iter().all(|b| b.num_rows() == 0))
}

/// Key in a stage's ledger entry that says it registered model `id` (see [`present`]).
pub fn ledger_key(id: &str) -> String {
    format!("model:{id}")
}

/// The model id of a [`ledger_key`], None for a table's key.
pub fn ledger_id(key: &str) -> Option<&str> {
    key.strip_prefix("model:")
}

/// Whether model `id` is still what registering it left: its row in `models` and, for a
/// trained model, its weights file. A stage that registered it is not up to date without it.
pub async fn present(lake: &Lake, id: &str) -> Result<bool> {
    let Some(ds) = lake.open(TABLE).await? else { return Ok(false) };
    let rows = tables::rows_where(&ds, TABLE, &format!("model_id = {}", tables::sql_string(id)), Some(&["kind"])).await?;
    let mut kinds = Vec::new();
    for b in &rows {
        kinds.extend(tables::Columns::new(TABLE, b).strings("kind")?.iter().flatten().map(str::to_string));
    }
    if kinds.is_empty() {
        return Ok(false);
    }
    if kinds.iter().all(|k| k != "trained") {
        return Ok(true);
    }
    let uri = format!("{}/models/{id}/{WEIGHTS}", lake.root());
    let (store, path) = store::open(&uri, lake.options())?;
    match store.head(&path).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(Error::ObjectStore { uri, source: e }),
    }
}

/// Writes `path` through a temporary file beside it (`write` makes that file), flushed to disk,
/// then renamed over `path` in one step: a kill at any instant leaves the old file or the new
/// one, never a part of one. What `write` returns is passed on; a failed write leaves no
/// temporary file behind.
pub fn write_atomically<T, E: From<Error>>(path: &std::path::Path, write: impl FnOnce(&std::path::Path) -> std::result::Result<T, E>) -> std::result::Result<T, E> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    remove_partials(path);
    let out = match write(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let sync = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    sync.map_err(|e| E::from(Error::io(&tmp, e)))?;
    crate::kill::point(&format!("save:{name}"));
    std::fs::rename(&tmp, path).map_err(|e| E::from(Error::io(path, e)))?;
    // The rename itself reaches the disk with the folder's entry.
    if let Some(dir) = path.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(out)
}

/// [`write_atomically`] of bytes.
pub fn write_file_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e)))
}

/// The object a model folder on an object store is complete by: written after every other file
/// of the folder, it lists them with their sizes and BLAKE3 hashes.
pub const MANIFEST: &str = "_manifest.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct ManifestFile {
    size: u64,
    blake3: String,
}

/// A model's folder: local (a file:// lake) or a local copy synced to the lake's store.
pub struct ModelDir {
    pub local: PathBuf,
    pub uri: String,
    remote: Option<(Arc<dyn ObjectStore>, ObjectPath)>,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

pub struct Sync {
    local: PathBuf,
    remote: Option<(Arc<dyn ObjectStore>, ObjectPath)>,
}

impl Sync {
    /// Copies every file of the local folder to the lake (no-op for a local lake), then writes
    /// its [`MANIFEST`], then removes the objects the manifest no longer lists (an older
    /// checkpoint). A reader trusts only what the manifest lists and checks it against it, so
    /// an upload cut short is seen as such, never taken for a model.
    pub async fn upload(&self) -> Result<()> {
        let Some((store, prefix)) = &self.remote else { return Ok(()) };
        let oerr = |path: &ObjectPath, e| Error::ObjectStore { uri: path.to_string(), source: e };
        let mut manifest = std::collections::BTreeMap::new();
        for entry in walk(&self.local) {
            let rel = entry.strip_prefix(&self.local).unwrap_or(&entry).to_string_lossy().replace('\\', "/");
            if rel.contains(".partial-") {
                continue;
            }
            let bytes = std::fs::read(&entry).map_err(|e| Error::io(&entry, e))?;
            manifest.insert(rel.clone(), ManifestFile { size: bytes.len() as u64, blake3: blake3::hash(&bytes).to_hex().to_string() });
            let path = ObjectPath::from(format!("{prefix}/{rel}"));
            store.put(&path, PutPayload::from(bytes)).await.map_err(|e| oerr(&path, e))?;
        }
        let path = ObjectPath::from(format!("{prefix}/{MANIFEST}"));
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?;
        store.put(&path, PutPayload::from(text)).await.map_err(|e| oerr(&path, e))?;
        let listed: Vec<_> = store.list(Some(prefix)).try_collect().await.map_err(|e| oerr(prefix, e))?;
        for m in listed {
            let rel = m.location.as_ref().strip_prefix(prefix.as_ref()).unwrap_or(m.location.as_ref()).trim_start_matches('/').to_string();
            if rel != MANIFEST && !manifest.contains_key(&rel) {
                store.delete(&m.location).await.map_err(|e| oerr(&m.location, e))?;
            }
        }
        Ok(())
    }
}

impl ModelDir {
    /// A model folder on this machine (a file:// lake's, or one made by hand).
    pub fn local(local: PathBuf) -> ModelDir {
        let uri = format!("file://{}", local.display());
        ModelDir { local, uri, remote: None, _tmp: None }
    }

    pub fn clone_sync(&self) -> Sync {
        Sync { local: self.local.clone(), remote: self.remote.clone() }
    }

    pub async fn upload(&self) -> Result<()> {
        self.clone_sync().upload().await
    }

    /// Publishes a folder made elsewhere as this model's, whole or not at all: on a local
    /// lake `made` (a folder beside this one) is renamed to it in one step, replacing an
    /// incomplete one; on an object store its files are copied here and uploaded, manifest
    /// last ([`Sync::upload`]).
    pub async fn publish(&self, made: &std::path::Path) -> Result<()> {
        if self.remote.is_none() {
            if self.local.exists() {
                std::fs::remove_dir_all(&self.local).map_err(|e| Error::io(&self.local, e))?;
            }
            crate::kill::point("publish");
            std::fs::rename(made, &self.local).map_err(|e| Error::io(&self.local, e))?;
            if let Some(parent) = self.local.parent() {
                let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
            }
            return Ok(());
        }
        std::fs::create_dir_all(&self.local).map_err(|e| Error::io(&self.local, e))?;
        for f in walk(made) {
            let rel = f.strip_prefix(made).unwrap_or(&f).to_path_buf();
            let dest = self.local.join(&rel);
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
            }
            std::fs::copy(&f, &dest).map_err(|e| Error::io(&dest, e))?;
        }
        let _ = std::fs::remove_dir_all(made);
        self.upload().await
    }

    /// A folder to make this model's files in before [`Self::publish`]: beside it on a local
    /// lake (so that the rename stays on one file system), else a temporary one.
    pub fn staging(&self) -> Result<PathBuf> {
        let name = self.local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = match self.remote {
            None => self.local.with_file_name(format!(".{name}.partial-{}", std::process::id())),
            Some(_) => std::env::temp_dir().join(format!("pipeline-{name}.partial-{}", std::process::id())),
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        if self.remote.is_none() {
            remove_partials(&self.local);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir)
    }
}

/// Removes what a killed writer of `path` left beside it: the temporary files or folders
/// (`.<name>.partial-<pid>`) of [`write_atomically`] and [`ModelDir::staging`].
fn remove_partials(path: &std::path::Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
    let stem = format!(".{}.partial-", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&stem) {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// [`model_dir`] for a training that makes (or resumes) this model: a folder on an object store
/// whose last upload was cut short is not resumed from but started afresh (its files are
/// replaced at the next checkpoint).
pub async fn model_dir_to_train(lake: &Lake, id: &str) -> Result<ModelDir> {
    match model_dir(lake, id).await {
        Err(Error::IncompleteModel { uri, detail }) => {
            tracing::warn!(%uri, %detail, "an interrupted upload of this model: training it from the start");
            let (store, prefix) = store::open(&uri, lake.options())?;
            let tmp = tempfile::tempdir().map_err(|e| Error::Other(format!("temporary folder: {e}")))?;
            Ok(ModelDir { local: tmp.path().to_path_buf(), uri, remote: Some((store, prefix)), _tmp: Some(Arc::new(tmp)) })
        }
        other => other,
    }
}

/// Opens `<lake>/models/<id>/`; for a remote lake, downloads what is there to a temporary folder
/// (what its manifest lists, checked against it: [`Error::IncompleteModel`] otherwise).
pub async fn model_dir(lake: &Lake, id: &str) -> Result<ModelDir> {
    let uri = format!("{}/models/{id}", lake.root());
    if let Some(path) = uri.strip_prefix("file://") {
        let local = PathBuf::from(path);
        return Ok(ModelDir { local, uri, remote: None, _tmp: None });
    }
    let (store, prefix) = store::open(&uri, lake.options())?;
    let tmp = tempfile::tempdir().map_err(|e| Error::Other(format!("temporary folder: {e}")))?;
    let objects: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::ObjectStore { uri: uri.clone(), source: e })?;
    let rel_of = |m: &object_store::ObjectMeta| m.location.as_ref().strip_prefix(prefix.as_ref()).unwrap_or(m.location.as_ref()).trim_start_matches('/').to_string();
    let get = |path: ObjectPath| {
        let (store, uri) = (store.clone(), uri.clone());
        async move {
            let got = store.get(&path).await.map_err(|e| Error::ObjectStore { uri: uri.clone(), source: e })?;
            got.bytes().await.map_err(|e| Error::ObjectStore { uri, source: e })
        }
    };
    // With a manifest, exactly the files it lists, each as it lists it; without one (a folder
    // uploaded before manifests existed), every object there.
    let manifest: Option<std::collections::BTreeMap<String, ManifestFile>> = match objects.iter().find(|m| rel_of(m) == MANIFEST) {
        Some(m) => Some(serde_json::from_slice(&get(m.location.clone()).await?).map_err(|e| Error::Other(format!("{uri}/{MANIFEST}: {e}")))?),
        None => None,
    };
    let wanted: Vec<String> = match &manifest {
        Some(files) => files.keys().cloned().collect(),
        None => objects.iter().map(&rel_of).collect(),
    };
    for rel in wanted {
        let bytes = get(ObjectPath::from(format!("{prefix}/{rel}"))).await?;
        if let Some(want) = manifest.as_ref().and_then(|m| m.get(&rel)) {
            if bytes.len() as u64 != want.size || blake3::hash(&bytes).to_hex().as_str() != want.blake3 {
                return Err(Error::IncompleteModel {
                    uri: uri.clone(),
                    detail: format!("`{rel}` is not the file its manifest lists (an upload was cut short, or is under way)"),
                });
            }
        }
        let dest = tmp.path().join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&dest, &bytes).map_err(|e| Error::io(&dest, e))?;
    }
    Ok(ModelDir { local: tmp.path().to_path_buf(), uri, remote: Some((store, prefix)), _tmp: Some(Arc::new(tmp)) })
}

/// `model`: a table with a `model_id` column (a train stage's), `current:NAME` (the model of
/// that name promoted last, see [`PROMOTIONS`]) or a model id. Returns the id and the model's
/// folder.
pub async fn resolve_model(lake: &Lake, model: &str) -> Result<(String, ModelDir)> {
    if let Some(name) = model.strip_prefix(CURRENT_PREFIX) {
        let c = current(lake, name).await?.ok_or_else(|| {
            Error::Other(format!(
                "no model named `{name}` is current in {}: run the training pipeline (its train stage promotes what it trains) or `pipeline promote MODEL_ID`",
                lake.root()
            ))
        })?;
        let dir = model_dir(lake, &c.model_id).await?;
        return Ok((c.model_id, dir));
    }
    let id = match lake.open(model).await? {
        Some(ds) if ds.schema().field("model_id").is_some() => tables::first_string(&ds, model, "model_id")
            .await?
            .ok_or_else(|| Error::Other(format!("table `{model}` names no model (it is empty)")))?,
        _ => model.to_string(),
    };
    let dir = model_dir(lake, &id).await?;
    Ok((id, dir))
}

#[cfg(test)]
mod atomic_tests {
    use super::*;

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    }

    #[test]
    fn a_file_is_replaced_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("best.safetensors");
        write_file_atomically(&f, b"old").unwrap();
        // A writer that fails half-way (a kill is the same to the reader): the old file stays,
        // and no temporary file is left.
        let r: Result<()> = write_atomically(&f, |tmp| {
            std::fs::write(tmp, b"ne").unwrap();
            Err(Error::Other("killed".into()))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["best.safetensors"]);
        write_file_atomically(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["best.safetensors"]);
    }

    #[tokio::test]
    async fn a_model_folder_is_published_with_one_rename_replacing_an_incomplete_one() {
        let root = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", root.path().display()), Default::default(), crate::Catalog::load(None).unwrap());
        let dir = model_dir(&lake, "detect-0123456789ab").await.unwrap();
        // What a killed writer left: a folder without its info file.
        std::fs::create_dir_all(&dir.local).unwrap();
        std::fs::write(dir.local.join("detector.safetensors"), b"half").unwrap();
        let staging = dir.staging().unwrap();
        assert_eq!(staging.parent(), dir.local.parent(), "made beside it, on the same file system");
        std::fs::write(staging.join("detector.safetensors"), b"weights").unwrap();
        std::fs::write(staging.join("detector.json"), b"{}").unwrap();
        assert!(!dir.local.join("detector.json").exists(), "nothing visible before publishing");
        dir.publish(&staging).await.unwrap();
        assert_eq!(names(&dir.local), ["detector.json", "detector.safetensors"]);
        assert_eq!(std::fs::read(dir.local.join("detector.safetensors")).unwrap(), b"weights");
        assert!(!staging.exists());
        assert_eq!(names(&root.path().join("models")), ["detect-0123456789ab"]);
    }
}
