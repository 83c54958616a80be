//! Shards that write without committing, and the one commit that lands them.
//!
//! A map stage run as `N` shards (`pipeline worker FILE --stage S --shard K/N --run R`, or a
//! Ray task that runs it) sends its tables' batches to a [staged sink](crate::Lake::staged_sink):
//! Lance writes the data files under the table, exactly as a commit would, but no version is
//! made. What each write made (its Lance transaction, protobuf) and what the shard still wants
//! done to rows already there ([`Fixup`]s: rows of photos gone from the source, relabelled rows)
//! go under the lake's staging area:
//!
//! ```text
//! <lake>/_staging/<run>/<stage>/shard-00003-of-00008/<table>.txn
//! <lake>/_staging/<run>/<stage>/shard-00003-of-00008.json      written last: the shard is done
//! ```
//!
//! [`commit`] gathers the manifests of one run and one stage, refuses unless every shard
//! `0..N` of that run is there, and lands each table in one Lance transaction: the shards' data
//! files as one `Overwrite` or one `Append`; for a merge by key, one merge-insert whose source is
//! the shards' staged rows. Readers see every shard of a table or none. A shard run again
//! replaces its files and its manifest, so a retried shard never doubles rows; the data files of
//! an attempt that died are never referenced and go with `pipeline vacuum` (Lance removes
//! unreferenced files older than a week).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::{StreamExt, TryStreamExt};
use lance::Dataset;
use lance::dataset::transaction::{Operation, Transaction, TransactionBuilder};
use lance::dataset::{CommitBuilder, InsertBuilder, MergeInsertBuilder, WhenMatched, WhenNotMatched, WriteMode, WriteParams};
use lance::table::format::{Fragment, pb};
use object_store::{ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{Committed, Error, Lake, Result, WriteKind, kill, store};

/// The staging area under a lake's root.
pub const DIR: &str = "_staging";

/// Shard `index` of `count`: the part of a stage's work one worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `K/N`, 0 <= K < N.
    fn from_str(s: &str) -> std::result::Result<Shard, String> {
        let bad = || format!("`{s}` is not a shard: write K/N with 0 <= K < N (`0/4` is the first of four)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// Whether the row or object with this key (a photo's URI) is this shard's: a stable hash
    /// of the key, modulo the shard count. Every shard sees the same listing or table and keeps
    /// its part, so the parts are disjoint and together the whole, however the listing is
    /// ordered or the table is laid out in fragments.
    pub fn owns(&self, key: &str) -> bool {
        let h = blake3::hash(key.as_bytes());
        let v = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        v % u64::from(self.count) == u64::from(self.index)
    }

    fn dir_name(&self) -> String {
        format!("shard-{:05}-of-{:05}", self.index, self.count)
    }
}

/// How a staged table lands (the [`WriteKind`] its stage asked for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Landing {
    Overwrite,
    Append,
    Merge { keys: Vec<String>, update_existing: bool },
}

impl From<&WriteKind> for Landing {
    fn from(k: &WriteKind) -> Landing {
        match k {
            WriteKind::Overwrite => Landing::Overwrite,
            WriteKind::Append => Landing::Append,
            WriteKind::Merge { keys, update_existing } => Landing::Merge { keys: keys.clone(), update_existing: *update_existing },
        }
    }
}

/// One table a shard wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagedTable {
    pub table: String,
    pub landing: Landing,
    /// The table's version the shard wrote against (None: the table did not exist).
    pub read_version: Option<u64>,
    pub rows: u64,
    /// The Lance transaction file, under the shard's folder.
    pub transaction: String,
}

/// A change to rows a table already holds, made after the shards' rows land (in a local run,
/// right after the stage's commit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Fixup {
    /// `DELETE FROM table WHERE filter`.
    Delete { table: String, filter: String },
    /// `UPDATE table SET column = value WHERE filter` (`value` a SQL literal).
    Update { table: String, filter: String, column: String, value: String },
}

impl Fixup {
    pub fn table(&self) -> &str {
        match self {
            Fixup::Delete { table, .. } | Fixup::Update { table, .. } => table,
        }
    }

    /// Applies it now (nothing when the table does not exist); the table's version after.
    pub async fn apply(&self, lake: &Lake) -> Result<Option<u64>> {
        let table = self.table();
        let Some(mut ds) = lake.open(table).await? else { return Ok(None) };
        let lerr = |e| Error::lance(table, e);
        match self {
            Fixup::Delete { filter, .. } => {
                ds.delete(filter).await.map_err(lerr)?;
                Ok(Some(ds.version().version))
            }
            Fixup::Update { filter, column, value, .. } => {
                let job = lance::dataset::UpdateBuilder::new(Arc::new(ds))
                    .update_where(filter)
                    .map_err(lerr)?
                    .set(column, value)
                    .map_err(lerr)?
                    .build()
                    .map_err(lerr)?;
                Ok(Some(job.execute().await.map_err(lerr)?.new_dataset.version().version))
            }
        }
    }
}

/// What one shard did: written last, so its presence means the shard finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub stage: String,
    pub shard: Shard,
    pub tables: Vec<StagedTable>,
    pub fixups: Vec<Fixup>,
    /// What the engine keeps of the shard's run (its outcome, fingerprint, the versions read).
    pub meta: serde_json::Value,
    pub written_at: String,
}

/// A shard's writes in progress: handed to [`Lake::staged_sink`] for every table it writes.
#[derive(Clone)]
pub struct Staging {
    inner: Arc<Inner>,
}

struct Inner {
    run_id: String,
    stage: String,
    shard: Shard,
    tables: Mutex<Vec<StagedTable>>,
    fixups: Mutex<Vec<Fixup>>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging(run {}, stage {}, shard {})", self.inner.run_id, self.inner.stage, self.inner.shard)
    }
}

fn poisoned() -> Error {
    Error::Other("staging state poisoned".into())
}

/// `<lake>/_staging/<run>/<stage>`.
fn stage_dir(lake: &Lake, run_id: &str, stage: &str) -> String {
    format!("{}/{DIR}/{run_id}/{stage}", lake.root())
}

async fn put(lake: &Lake, uri: &str, bytes: Vec<u8>) -> Result<()> {
    let (s, p) = store::open(uri, lake.options())?;
    s.put(&p, bytes.into()).await.map_err(|e| Error::ObjectStore { uri: uri.to_string(), source: e })?;
    Ok(())
}

async fn get(lake: &Lake, uri: &str) -> Result<bytes::Bytes> {
    let (s, p) = store::open(uri, lake.options())?;
    let oerr = |e| Error::ObjectStore { uri: uri.to_string(), source: e };
    s.get(&p).await.map_err(oerr)?.bytes().await.map_err(oerr)
}

/// Every object under `uri` (none when it does not exist).
async fn list(lake: &Lake, uri: &str) -> Result<(Arc<dyn ObjectStore>, ObjectPath, Vec<ObjectPath>)> {
    let (s, p) = store::open(uri, lake.options())?;
    let objects = match s.list(Some(&p)).map_ok(|m| m.location).try_collect::<Vec<_>>().await {
        Ok(o) => o,
        Err(object_store::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(Error::ObjectStore { uri: uri.to_string(), source: e }),
    };
    Ok((s, p, objects))
}

/// Removes everything under `uri`.
async fn remove_all(lake: &Lake, uri: &str) -> Result<()> {
    let (s, _, objects) = list(lake, uri).await?;
    for o in objects {
        match s.delete(&o).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Error::ObjectStore { uri: format!("{uri} ({o})"), source: e }),
        }
    }
    Ok(())
}

impl Staging {
    /// Shard `shard` of stage `stage` in run `run_id`. What an earlier attempt of the same shard
    /// left is replaced as this one writes.
    pub fn new(run_id: &str, stage: &str, shard: Shard) -> Staging {
        Staging {
            inner: Arc::new(Inner {
                run_id: run_id.to_string(),
                stage: stage.to_string(),
                shard,
                tables: Mutex::new(Vec::new()),
                fixups: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn shard(&self) -> Shard {
        self.inner.shard
    }

    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    fn shard_dir(&self, lake: &Lake) -> String {
        format!("{}/{}", stage_dir(lake, &self.inner.run_id, &self.inner.stage), self.inner.shard.dir_name())
    }

    /// Keeps `fixup` for the commit instead of applying it now.
    pub fn defer(&self, fixup: Fixup) -> Result<()> {
        self.inner.fixups.lock().map_err(|_| poisoned())?.push(fixup);
        Ok(())
    }

    /// Writes `stream` as `table`'s data files without committing (the writer side of
    /// [`Lake::staged_sink`]). Against the table as it is: appended files for an append or a
    /// merge (the commit merges them by key), replacing ones for an overwrite; a table that does
    /// not exist yet is created by the commit.
    pub(crate) async fn write(
        &self,
        lake: &Lake,
        table: &str,
        kind: &WriteKind,
        existing: Option<Dataset>,
        stream: SendableRecordBatchStream,
        rows: &std::sync::atomic::AtomicU64,
    ) -> Result<Committed> {
        let read_version = existing.as_ref().map(|d| d.version().version);
        let mode = match (&existing, kind) {
            (None, _) => WriteMode::Create,
            (Some(_), WriteKind::Overwrite) => WriteMode::Overwrite,
            (Some(_), _) => WriteMode::Append,
        };
        let lerr = |e| Error::lance(table, e);
        let uri = lake.table_uri(table);
        let params = WriteParams { mode, store_params: lake.store_params(), ..Default::default() };
        let txn = match existing {
            Some(ds) => InsertBuilder::new(Arc::new(ds)).with_params(&params).execute_uncommitted_stream(stream).await.map_err(lerr)?,
            None => InsertBuilder::new(uri.as_str()).with_params(&params).execute_uncommitted_stream(stream).await.map_err(lerr)?,
        };
        kill::point(&format!("staged:{table}"));
        let bytes = pb::Transaction::try_from(&txn).map_err(lerr)?.encode_to_vec();
        let file = format!("{table}.txn");
        put(lake, &format!("{}/{file}", self.shard_dir(lake)), bytes).await?;
        let n = rows.load(std::sync::atomic::Ordering::Relaxed);
        let mut tables = self.inner.tables.lock().map_err(|_| poisoned())?;
        tables.retain(|t| t.table != table);
        tables.push(StagedTable { table: table.to_string(), landing: kind.into(), read_version, rows: n, transaction: file });
        Ok(Committed { version: read_version.unwrap_or(0), rows_sent: n, inserted: n, updated: 0 })
    }

    /// Records the shard as done: its manifest, with `meta` (the engine's account of the run).
    pub async fn finish(&self, lake: &Lake, meta: serde_json::Value) -> Result<Manifest> {
        let manifest = Manifest {
            run_id: self.inner.run_id.clone(),
            stage: self.inner.stage.clone(),
            shard: self.inner.shard,
            tables: self.inner.tables.lock().map_err(|_| poisoned())?.clone(),
            fixups: self.inner.fixups.lock().map_err(|_| poisoned())?.clone(),
            meta,
            written_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?;
        kill::point("manifest");
        put(lake, &format!("{}.json", self.shard_dir(lake)), json).await?;
        Ok(manifest)
    }
}

/// Removes what shards of `stage` in run `run_id` staged (before a run starts its shards).
pub async fn clear(lake: &Lake, run_id: &str, stage: &str) -> Result<()> {
    remove_all(lake, &stage_dir(lake, run_id, stage)).await
}

/// The manifests of the shards of `stage` in run `run_id` that finished, by shard index.
pub async fn manifests(lake: &Lake, run_id: &str, stage: &str) -> Result<BTreeMap<u32, Manifest>> {
    let dir = stage_dir(lake, run_id, stage);
    let (_, prefix, objects) = list(lake, &dir).await?;
    let mut out = BTreeMap::new();
    for o in objects {
        let rel = o.as_ref().strip_prefix(prefix.as_ref()).unwrap_or(o.as_ref()).trim_start_matches('/');
        if rel.contains('/') || !rel.ends_with(".json") {
            continue;
        }
        let uri = format!("{dir}/{rel}");
        let m: Manifest = serde_json::from_slice(&get(lake, &uri).await?).map_err(|e| Error::Other(format!("shard manifest {uri}: {e}")))?;
        if m.run_id != run_id || m.stage != stage {
            return Err(Error::Other(format!("shard manifest {uri} is of run {} stage `{}`, not of run {run_id} stage `{stage}`", m.run_id, m.stage)));
        }
        out.insert(m.shard.index, m);
    }
    Ok(out)
}

/// The runs that staged shards of `stage` (for the message of a commit that cannot go on).
async fn runs_staging(lake: &Lake, stage: &str) -> Result<Vec<String>> {
    let (_, prefix, objects) = list(lake, &format!("{}/{DIR}", lake.root())).await?;
    let mut runs: Vec<String> = objects
        .iter()
        .filter_map(|o| {
            let rel = o.as_ref().strip_prefix(prefix.as_ref()).unwrap_or(o.as_ref()).trim_start_matches('/');
            let mut parts = rel.split('/');
            let (run, st) = (parts.next()?, parts.next()?);
            (st == stage).then(|| run.to_string())
        })
        .collect();
    runs.sort();
    runs.dedup();
    Ok(runs)
}

/// What [`commit`] landed.
#[derive(Debug, Clone)]
pub struct Landed {
    /// Each table the shards wrote or fixed up, with its version after.
    pub versions: BTreeMap<String, u64>,
    /// The shards' manifests, by index.
    pub shards: Vec<Manifest>,
}

/// Lands the `count` shards of `stage` in run `run_id`: every shard must have finished, each of
/// its tables lands in one Lance transaction, then the shards' fixups apply, then the staging
/// area of the stage in this run is removed. Nothing is committed when a shard is missing or
/// the shards disagree; a table whose commit fails stays at its previous version.
pub async fn commit(lake: &Lake, run_id: &str, stage: &str, count: u32) -> Result<Landed> {
    let found = manifests(lake, run_id, stage).await?;
    let missing: Vec<String> = (0..count).filter(|k| !found.contains_key(k)).map(|k| format!("{k}/{count}")).collect();
    if !missing.is_empty() {
        let others: Vec<String> = runs_staging(lake, stage).await?.into_iter().filter(|r| r != run_id).collect();
        return Err(Error::Other(format!(
            "stage `{stage}` of run {run_id}: shard(s) {} have not finished, nothing was committed{}",
            missing.join(", "),
            if others.is_empty() {
                String::new()
            } else {
                format!(" (shards of other runs are staged for this stage: {}; a run's shards are never committed with another's)", others.join(", "))
            }
        )));
    }
    if let Some((_, m)) = found.iter().find(|(_, m)| m.shard.count != count) {
        return Err(Error::Other(format!(
            "stage `{stage}` of run {run_id}: shard {} was run as one of {}, not of {count}; nothing was committed",
            m.shard, m.shard.count
        )));
    }
    let shards: Vec<Manifest> = found.into_values().collect();
    let dir = stage_dir(lake, run_id, stage);

    // Tables in the order the shards wrote them.
    let mut order: Vec<String> = Vec::new();
    for m in &shards {
        for t in &m.tables {
            if !order.contains(&t.table) {
                order.push(t.table.clone());
            }
        }
    }
    let mut versions = BTreeMap::new();
    for table in &order {
        let mut staged: Vec<(StagedTable, Transaction)> = Vec::new();
        for m in &shards {
            for t in m.tables.iter().filter(|t| &t.table == table) {
                let uri = format!("{dir}/{}/{}", m.shard.dir_name(), t.transaction);
                let bytes = get(lake, &uri).await?;
                let lerr = |e| Error::lance(table, e);
                let pb = pb::Transaction::decode(bytes.as_ref()).map_err(|e| Error::Other(format!("{uri}: {e}")))?;
                staged.push((t.clone(), Transaction::try_from(pb).map_err(lerr)?));
            }
        }
        let v = land(lake, table, staged).await?;
        kill::point(&format!("committed:{table}"));
        versions.insert(table.clone(), v);
    }
    for m in &shards {
        for f in &m.fixups {
            if let Some(v) = f.apply(lake).await? {
                versions.insert(f.table().to_string(), v);
            }
        }
    }
    remove_all(lake, &dir).await?;
    Ok(Landed { versions, shards })
}

/// The fragments an operation wrote.
fn fragments_of(table: &str, txn: &Transaction) -> Result<Vec<Fragment>> {
    match &txn.operation {
        Operation::Append { fragments } | Operation::Overwrite { fragments, .. } => Ok(fragments.clone()),
        other => Err(Error::Other(format!("table `{table}`: a staged write made a {} transaction, not an append or an overwrite", other.name()))),
    }
}

/// One table's staged writes, as one transaction; its version after.
async fn land(lake: &Lake, table: &str, staged: Vec<(StagedTable, Transaction)>) -> Result<u64> {
    let lerr = |e| Error::lance(table, e);
    let landing = staged[0].0.landing.clone();
    if let Some((t, _)) = staged.iter().find(|(t, _)| t.landing != landing) {
        return Err(Error::Other(format!("table `{table}`: shards wrote it as {:?} and as {:?}", landing, t.landing)));
    }
    let existing = lake.open(table).await?;
    let created: Vec<&(StagedTable, Transaction)> = staged.iter().filter(|(t, _)| t.read_version.is_none()).collect();
    let mut fragments = Vec::new();
    for (_, txn) in &staged {
        fragments.extend(fragments_of(table, txn)?);
    }
    // A new table, or a replaced one: the shards' files are the whole table.
    if existing.is_none() || landing == Landing::Overwrite {
        if existing.is_some() && !created.is_empty() {
            return Err(Error::Other(format!("table `{table}` was created by another writer while the shards wrote it; run the stage again")));
        }
        let schema = staged
            .iter()
            .find_map(|(_, txn)| match &txn.operation {
                Operation::Overwrite { schema, .. } => Some(schema.clone()),
                _ => None,
            })
            .ok_or_else(|| Error::Other(format!("table `{table}` does not exist and no shard created it")))?;
        let op = Operation::Overwrite { fragments, schema, config_upsert_values: None, initial_bases: None };
        let ds = match existing {
            Some(ds) => {
                let v = ds.version().version;
                CommitBuilder::new(Arc::new(ds)).execute(TransactionBuilder::new(v, op).build()).await.map_err(lerr)?
            }
            None => {
                let uri = lake.table_uri(table);
                let mut b = CommitBuilder::new(uri.as_str());
                if let Some(p) = lake.store_params() {
                    b = b.with_store_params(p);
                }
                b.execute(TransactionBuilder::new(0, op).build()).await.map_err(lerr)?
            }
        };
        return Ok(ds.version().version);
    }
    let ds = existing.expect("checked above");
    if !created.is_empty() {
        return Err(Error::Other(format!("table `{table}` was created by another writer while the shards wrote it; run the stage again")));
    }
    if fragments.is_empty() {
        return Ok(ds.version().version);
    }
    match landing {
        Landing::Append => {
            // New fragments take their ids at the commit.
            for f in &mut fragments {
                f.id = 0;
            }
            let read = staged.iter().filter_map(|(t, _)| t.read_version).min().unwrap_or(ds.version().version);
            let ds = CommitBuilder::new(Arc::new(ds)).execute(TransactionBuilder::new(read, Operation::Append { fragments }).build()).await.map_err(lerr)?;
            Ok(ds.version().version)
        }
        Landing::Merge { keys, update_existing } => {
            // The staged rows, read back from their files (never part of a version), are the
            // source of one merge by key; the files are then removed.
            let mut next = ds.manifest().max_fragment_id().map_or(0, |m| m + 1).max(1 << 40);
            let files: Vec<String> = fragments.iter().flat_map(|f| f.files.iter().map(|d| d.path.clone())).collect();
            for f in &mut fragments {
                f.id = next;
                next += 1;
            }
            let ds = Arc::new(ds);
            let mut scan = ds.scan();
            scan.with_fragments(fragments);
            let schema = Arc::new(arrow_schema::Schema::from(ds.schema()));
            let rows = scan.try_into_stream().await.map_err(lerr)?;
            let t = table.to_string();
            let rows = rows.map(move |r| r.map_err(|e| datafusion::error::DataFusionError::External(Box::new(Error::lance(&t, e)))));
            let source: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(schema, rows));
            let mut b = MergeInsertBuilder::try_new(ds.clone(), keys).map_err(lerr)?;
            b.when_matched(if update_existing { WhenMatched::UpdateAll } else { WhenMatched::DoNothing }).when_not_matched(WhenNotMatched::InsertAll);
            let (after, _) = b.try_build().map_err(lerr)?.execute(source).await.map_err(lerr)?;
            let data = format!("{}/data", lake.table_uri(table));
            let (s, p) = store::open(&data, lake.options())?;
            for f in files {
                let _ = s.delete(&p.clone().join(f.as_str())).await;
            }
            Ok(after.version().version)
        }
        Landing::Overwrite => unreachable!("overwrites land above"),
    }
}

/// How many rows each shard staged for each table (for a run's summary).
pub fn rows_by_table(shards: &[Manifest]) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for m in shards {
        for t in &m.tables {
            *out.entry(t.table.clone()).or_insert(0) += t.rows;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;
    use arrow::array::{AsArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("uri", DataType::Utf8, false), Field::new("n", DataType::Int64, true)]))
    }

    fn batch(rows: &[(&str, i64)]) -> RecordBatch {
        let uris: StringArray = rows.iter().map(|r| Some(r.0)).collect();
        let ns: Int64Array = rows.iter().map(|r| Some(r.1)).collect();
        RecordBatch::try_new(schema(), vec![Arc::new(uris), Arc::new(ns)]).unwrap()
    }

    async fn rows(lake: &Lake, table: &str) -> Vec<(String, i64)> {
        let ds = lake.open(table).await.unwrap().unwrap();
        let mut out = Vec::new();
        for b in ds.scan().try_into_stream().await.unwrap().try_collect::<Vec<_>>().await.unwrap() {
            let (u, n) = (b.column(0).as_string::<i32>(), b.column(1).as_primitive::<Int64Type>());
            out.extend((0..b.num_rows()).map(|i| (u.value(i).to_string(), n.value(i))));
        }
        out.sort();
        out
    }

    /// One shard of `run`: writes the keys of `rows` it owns to `table` as `kind`, then finishes.
    async fn shard(lake: &Lake, run: &str, k: u32, n: u32, table: &str, kind: WriteKind, rows: &[(&str, i64)]) -> Staging {
        let s = Staging::new(run, "st", Shard { index: k, count: n });
        let mine: Vec<(&str, i64)> = rows.iter().filter(|r| s.shard().owns(r.0)).cloned().collect();
        let mut sink = lake.staged_sink(table, schema(), kind, s.clone());
        if !mine.is_empty() {
            sink.send(batch(&mine)).await.unwrap();
        }
        sink.finish().await.unwrap();
        s
    }

    #[test]
    fn shards_split_keys_into_disjoint_parts_that_cover_them_all() {
        assert_eq!("3/8".parse::<Shard>().unwrap(), Shard { index: 3, count: 8 });
        for bad in ["8/8", "1/0", "x/2", "2", "-1/3"] {
            assert!(bad.parse::<Shard>().unwrap_err().contains(bad), "{bad}");
        }
        let keys: Vec<String> = (0..2000).map(|i| format!("s3://b/photos/{i}.jpg")).collect();
        let n = 4;
        let mut per = vec![0usize; n as usize];
        for key in &keys {
            let owners: Vec<u32> = (0..n).filter(|k| Shard { index: *k, count: n }.owns(key)).collect();
            assert_eq!(owners.len(), 1, "{key}: {owners:?}");
            per[owners[0] as usize] += 1;
        }
        // A hash, not a range: every shard gets about a quarter.
        assert!(per.iter().all(|c| (400..600).contains(c)), "{per:?}");
    }

    #[tokio::test]
    async fn shards_land_as_one_version_per_table_and_only_when_all_finished() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::default());
        let merge = WriteKind::Merge { keys: vec!["uri".into()], update_existing: true };
        let mut seed = lake.sink("m", schema(), merge.clone());
        seed.send(batch(&[("a", 1), ("b", 2)])).await.unwrap();
        let before = seed.finish().await.unwrap().version;

        let news = [("a", 10), ("c", 3), ("d", 4), ("e", 5), ("f", 6), ("g", 7)];
        let s0 = shard(&lake, "run-1", 0, 2, "m", merge.clone(), &news).await;
        s0.defer(Fixup::Delete { table: "m".into(), filter: "uri = 'b'".into() }).unwrap();
        s0.finish(&lake, serde_json::json!({})).await.unwrap();
        // Staged, not committed: readers still see the table as it was.
        assert_eq!(lake.version("m").await.unwrap(), Some(before));
        assert_eq!(rows(&lake, "m").await, vec![("a".into(), 1), ("b".into(), 2)]);
        // Shard 1 has not finished: nothing lands.
        let e = commit(&lake, "run-1", "st", 2).await.unwrap_err().to_string();
        assert!(e.contains("shard(s) 1/2 have not finished") && e.contains("nothing was committed"), "{e}");
        assert_eq!(lake.version("m").await.unwrap(), Some(before));

        // Shard 1 runs twice (a retry after a kill): its second attempt replaces the first.
        for _ in 0..2 {
            let s1 = shard(&lake, "run-1", 1, 2, "m", merge.clone(), &news).await;
            s1.finish(&lake, serde_json::json!({})).await.unwrap();
        }
        let landed = commit(&lake, "run-1", "st", 2).await.unwrap();
        assert_eq!(landed.shards.len(), 2);
        let want: Vec<(String, i64)> = [("a", 10), ("c", 3), ("d", 4), ("e", 5), ("f", 6), ("g", 7)].iter().map(|(u, n)| (u.to_string(), *n)).collect();
        assert_eq!(rows(&lake, "m").await, want, "merged once, the deferred delete applied, no row twice");
        // One version for the merge, one for the delete.
        assert_eq!(lake.version("m").await.unwrap(), Some(before + 2));
        assert!(manifests(&lake, "run-1", "st").await.unwrap().is_empty(), "the staging area of the run is cleared");
        let left = std::fs::read_dir(dir.path().join("m.lance/data")).unwrap().count();
        let live: usize = lake.open("m").await.unwrap().unwrap().get_fragments().iter().map(|f| f.metadata().files.len()).sum();
        assert!(left <= live + 2, "staged merge files are removed once merged ({left} files, {live} live, the retried attempt's first files may stay)");

        // A new table from shards, then replaced by shards; appended to by shards.
        for (table, kind) in [("o", WriteKind::Overwrite), ("o", WriteKind::Overwrite), ("p", WriteKind::Append), ("p", WriteKind::Append)] {
            let run = format!("run-{table}-{}", lake.version(table).await.unwrap().unwrap_or(0));
            for k in 0..3 {
                shard(&lake, &run, k, 3, table, kind.clone(), &news).await.finish(&lake, serde_json::json!({})).await.unwrap();
            }
            commit(&lake, &run, "st", 3).await.unwrap();
        }
        assert_eq!(rows(&lake, "o").await.len(), news.len(), "an overwrite is the shards' rows, once");
        assert_eq!(rows(&lake, "p").await.len(), 2 * news.len(), "two appends of every shard's rows");
        assert_eq!(lake.version("o").await.unwrap(), Some(2));
    }

    #[tokio::test]
    async fn shards_of_two_runs_are_never_committed_together() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::default());
        let news = [("a", 1), ("b", 2), ("c", 3), ("d", 4)];
        shard(&lake, "run-a", 0, 2, "t", WriteKind::Append, &news).await.finish(&lake, serde_json::json!({})).await.unwrap();
        shard(&lake, "run-b", 1, 2, "t", WriteKind::Append, &news).await.finish(&lake, serde_json::json!({})).await.unwrap();
        for run in ["run-a", "run-b"] {
            let e = commit(&lake, run, "st", 2).await.unwrap_err().to_string();
            let other = if run == "run-a" { "run-b" } else { "run-a" };
            assert!(e.contains("have not finished") && e.contains(other) && e.contains("never committed with another's"), "{e}");
        }
        assert_eq!(lake.version("t").await.unwrap(), None, "nothing landed");
        // A shard run as one of another count is refused too.
        shard(&lake, "run-a", 1, 3, "t", WriteKind::Append, &news).await.finish(&lake, serde_json::json!({})).await.unwrap();
        let e = commit(&lake, "run-a", "st", 2).await.unwrap_err().to_string();
        assert!(e.contains("one of 3, not of 2"), "{e}");
        assert_eq!(lake.version("t").await.unwrap(), None);
    }
}
