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

/// `model`: a table with a `model_id` column (a train stage's) or a model id. Returns the id
/// and the model's folder.
pub async fn resolve_model(lake: &Lake, model: &str) -> Result<(String, ModelDir)> {
    let id = match lake.open(model).await? {
        Some(ds) if ds.schema().field("model_id").is_some() => tables::first_string(&ds, model, "model_id")
            .await?
            .ok_or_else(|| Error::Other(format!("table `{model}` names no model (it is empty)")))?,
        _ => model.to_string(),
    };
    let dir = model_dir(lake, &id).await?;
    Ok((id, dir))
}
