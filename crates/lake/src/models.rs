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
    /// Copies every file of the local folder to the lake (no-op for a local lake).
    pub async fn upload(&self) -> Result<()> {
        let Some((store, prefix)) = &self.remote else { return Ok(()) };
        for entry in walk(&self.local) {
            let rel = entry.strip_prefix(&self.local).unwrap_or(&entry).to_string_lossy().replace('\\', "/");
            let bytes = std::fs::read(&entry).map_err(|e| Error::io(&entry, e))?;
            let path = ObjectPath::from(format!("{prefix}/{rel}"));
            store.put(&path, PutPayload::from(bytes)).await.map_err(|e| Error::ObjectStore { uri: path.to_string(), source: e })?;
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

/// Opens `<lake>/models/<id>/`; for a remote lake, downloads what is there to a temporary folder.
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
    for m in objects {
        let rel = m.location.as_ref().strip_prefix(prefix.as_ref()).unwrap_or(m.location.as_ref()).trim_start_matches('/').to_string();
        let bytes = store.get(&m.location).await.map_err(|e| Error::ObjectStore { uri: uri.clone(), source: e })?.bytes().await
            .map_err(|e| Error::ObjectStore { uri: uri.clone(), source: e })?;
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
