//! The executor: runs a [`Plan`]'s stages as tokio tasks.
//!
//! A stage starts when every input stage has committed; it reads their tables at the versions
//! they committed, and its own output travels over a bounded channel into one Lance commit
//! (see [`lake::TableSink`]). Before running, a stage is compared with its last
//! successful run in the ledger: same options, same input table versions, same external
//! fingerprint and its output tables untouched since → it is skipped as up to date. The first
//! failure (or Ctrl-C) cancels everything still running; nothing half-written is committed.

pub mod ledger;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use indicatif::ProgressBar;
use std::sync::Mutex;

use arrow::datatypes::SchemaRef;
use futures::StreamExt;
use futures::stream::BoxStream;
use lake::stream::{EDGE_CAPACITY, Tap, TapSenders, Tee};
use lake::{TableSink, WriteKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Plan, StagePlan};
use lake::Lake;
use crate::progress::Progress;
use crate::{Error, Result};
use ledger::{Entry, Status};

/// What a running stage gets from the engine.
pub struct StageCtx {
    pub name: String,
    pub run_id: String,
    pub lake: Lake,
    pub progress: ProgressBar,
    pub cancel: CancellationToken,
    /// `pipeline run --resume`: training stages continue from their last checkpoint.
    pub resume: bool,
    /// `pipeline run --device`: overrides the `device` key of model stages.
    pub device: Option<crate::config::Device>,
    /// The sending ends of the streamed edges this stage feeds, by table (taken by [`Self::sink`]).
    taps: Mutex<HashMap<String, TapSenders>>,
    /// The streamed edges this stage reads, by table (taken by [`Self::read`]).
    streams: Mutex<HashMap<String, StreamIn>>,
    /// Every producer this stage streams from: its commit waits for theirs.
    producers: Vec<(String, watch::Receiver<Phase>)>,
    /// Fault injection: the sink of this table fails after this many rows.
    fail_after: Option<(String, u64)>,
    /// Fault injection: fetches of these objects fail this many more times.
    fetch_faults: Mutex<HashMap<String, u32>>,
    /// Names of the models this stage may register ([`crate::stage::Checked::models`]).
    models: Vec<String>,
    /// Models it registered this run.
    registered: Mutex<Vec<String>>,
    /// The input fingerprint as the run leaves it ([`Self::leave_fingerprint`]).
    fingerprint_after: Mutex<Option<String>>,
    /// Running as one shard of the stage (`pipeline worker`): its writes are staged, not
    /// committed (see [`crate::shard`]).
    staging: Option<lake::staging::Staging>,
}

/// The reading end of a streamed edge.
struct StreamIn {
    producer: String,
    rx: mpsc::Receiver<Tap>,
    phase: watch::Receiver<Phase>,
}

/// Where a stage is, as its dependants see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for its inputs, preparing, or checking whether it is up to date.
    Waiting,
    /// Running: it will write its tables this run.
    Running,
    /// Done: succeeded (or up to date), or not.
    Done(bool),
}

/// Batches of one table, as a stage reads them.
pub type BatchStream = BoxStream<'static, Result<arrow::array::RecordBatch>>;

/// Waits until `phase` is done; an error naming the producer when it failed.
async fn producer_done(name: &str, mut phase: watch::Receiver<Phase>) -> Result<()> {
    match phase.wait_for(|p| matches!(p, Phase::Done(_))).await.map(|p| *p) {
        Ok(Phase::Done(true)) => Ok(()),
        _ => Err(Error::Cancelled(format!("stage `{name}`, which this stage streams from, did not complete"))),
    }
}

impl StageCtx {
    /// Starts the writer of one of the stage's tables: [`Lake::sink`], plus the stage's place in
    /// the run. The stages that stream the table get its batches as they are sent, and when this
    /// stage streams from others the commit waits for theirs.
    pub async fn sink(&self, table: &str, schema: SchemaRef, kind: WriteKind) -> Result<TableSink> {
        if let Some(staging) = &self.staging {
            let mut sink = self.lake.staged_sink(table, schema, kind, staging.clone());
            if let Some((_, rows)) = self.fail_after.as_ref().filter(|(t, _)| t == table) {
                sink = sink.fail_after(*rows);
            }
            return Ok(sink);
        }
        let readers = self.taps.lock().map_err(|_| Error::Other("stage context poisoned".into()))?.remove(table);
        let mut sink = self.lake.sink(table, schema, kind.clone());
        if let Some(readers) = readers {
            let tee = match &kind {
                WriteKind::Overwrite => Tee::overwrite(table, readers),
                WriteKind::Append => Tee::append(&self.lake, table, readers).await?,
                WriteKind::Merge { keys, update_existing } => Tee::merge(&self.lake, table, keys, *update_existing, readers).await?,
            };
            sink = sink.with_tee(tee);
        }
        if !self.producers.is_empty() {
            let producers = self.producers.clone();
            sink = sink.with_gate(Box::pin(async move {
                for (name, phase) in producers {
                    producer_done(&name, phase).await?;
                }
                Ok(())
            }));
        }
        if let Some((t, rows)) = &self.fail_after {
            if t == table {
                sink = sink.fail_after(*rows);
            }
        }
        Ok(sink)
    }

    /// Adds rows to the `models` registry (merged on `model_id`), committed like the stage's
    /// tables. Each id must be `<name>-...` for a model name the stage declared in its check;
    /// the stage stays up to date only while the models it registered are [present](lake::models::present).
    pub async fn register_model(&self, rows: arrow::array::RecordBatch) -> Result<u64> {
        self.whole("registers a model")?;
        let ids = lake::tables::Columns::new(lake::models::TABLE, &rows).strings("model_id")?;
        let ids: Vec<String> = ids.iter().flatten().map(str::to_string).collect();
        for id in &ids {
            if !self.models.iter().any(|m| id.strip_prefix(m.as_str()).is_some_and(|rest| rest.starts_with('-'))) {
                return Err(Error::Other(format!(
                    "stage `{}` registers model `{id}`, not named after its models ({})",
                    self.name,
                    if self.models.is_empty() { "it declared none".to_string() } else { self.models.join(", ") }
                )));
            }
        }
        let schema = self.lake.catalog().get(lake::models::TABLE).unwrap_or_else(|| lake::Catalog::builtin(lake::models::TABLE));
        let mut sink = self.sink(lake::models::TABLE, schema, WriteKind::Merge { keys: vec!["model_id".into()], update_existing: true }).await?;
        sink.send(rows).await?;
        let committed = sink.finish().await?;
        self.registered.lock().map_err(|_| Error::Other("stage context poisoned".into()))?.extend(ids);
        Ok(committed.version)
    }

    /// Makes model `id` (one this stage registered) current for its name: a row in
    /// `promotions`, committed like the stage's tables. Stages with `model = "current:NAME"`
    /// read that table, so their next run uses it.
    pub async fn promote_model(&self, id: &str, reason: &str, map_at_20: Option<f64>, replaced: Option<&str>) -> Result<u64> {
        self.whole("promotes a model")?;
        if !self.registered.lock().map_err(|_| Error::Other("stage context poisoned".into()))?.iter().any(|r| r == id) {
            return Err(Error::Other(format!("stage `{}` promotes model `{id}`, which it did not register this run", self.name)));
        }
        let row = lake::models::promotion_row(id, reason, map_at_20, replaced, &self.run_id)?;
        let schema = self.lake.catalog().get(lake::models::PROMOTIONS).unwrap_or_else(|| lake::Catalog::builtin(lake::models::PROMOTIONS));
        let mut sink = self.sink(lake::models::PROMOTIONS, schema, WriteKind::Append).await?;
        sink.send(row).await?;
        Ok(sink.finish().await?.version)
    }

    /// The shard this stage runs as (`pipeline worker --shard K/N`), if it runs as one.
    pub fn shard(&self) -> Option<lake::staging::Shard> {
        self.staging.as_ref().map(|s| s.shard())
    }

    /// Whether the photo (or object, or row) keyed `key` — its URI — is this run's to do:
    /// always, unless the stage runs as a shard, which does the keys [its shard
    /// owns](lake::staging::Shard::owns). A kind that [runs as shards](crate::stage::Stage::shards)
    /// asks before it does a photo's work or touches its row.
    pub fn owns(&self, key: &str) -> bool {
        self.staging.as_ref().is_none_or(|s| s.shard().owns(key))
    }

    /// An error naming what a shard may not do (it sees only its part of the tables).
    fn whole(&self, what: &str) -> Result<()> {
        match self.shard() {
            Some(k) => Err(Error::Other(format!("stage `{}` {what}, which it cannot do as shard {k}: it needs every photo", self.name))),
            None => Ok(()),
        }
    }

    /// Deletes the rows of `table` that `filter` (SQL) selects: now, or, for a shard, when the
    /// shards' rows land ([`lake::staging::commit`]). The table's version after, when it was
    /// changed now.
    pub async fn delete_where(&self, table: &str, filter: &str) -> Result<Option<u64>> {
        self.fix(lake::staging::Fixup::Delete { table: table.to_string(), filter: filter.to_string() }).await
    }

    /// Sets `column` to `value` (a SQL literal) in the rows of `table` that `filter` selects,
    /// now or when the shards' rows land, as [`Self::delete_where`].
    pub async fn update_where(&self, table: &str, filter: &str, column: &str, value: &str) -> Result<Option<u64>> {
        let f = lake::staging::Fixup::Update { table: table.to_string(), filter: filter.to_string(), column: column.to_string(), value: value.to_string() };
        self.fix(f).await
    }

    async fn fix(&self, fixup: lake::staging::Fixup) -> Result<Option<u64>> {
        match &self.staging {
            Some(s) => {
                s.defer(fixup)?;
                Ok(None)
            }
            None => fixup.apply(&self.lake).await,
        }
    }

    /// A context for running one stage outside a run's DAG: nothing streamed, no faults, and
    /// its writes staged when `staging` is given.
    pub(crate) fn bare(stage: &StagePlan, run_id: &str, lake: Lake, device: Option<crate::config::Device>, staging: Option<lake::staging::Staging>) -> StageCtx {
        StageCtx {
            name: stage.name.clone(),
            run_id: run_id.to_string(),
            lake,
            progress: ProgressBar::hidden(),
            cancel: CancellationToken::new(),
            resume: false,
            device,
            taps: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            producers: Vec::new(),
            fail_after: None,
            fetch_faults: Mutex::new(HashMap::new()),
            models: stage.models.clone(),
            registered: Mutex::new(Vec::new()),
            fingerprint_after: Mutex::new(None),
            staging,
        }
    }

    /// The fingerprint the run leaves ([`Self::leave_fingerprint`]), if the stage left one.
    pub(crate) fn fingerprint_left(&self) -> Option<String> {
        self.fingerprint_after.lock().ok().and_then(|f| f.clone())
    }

    /// Records `fingerprint` in the ledger instead of the one `prepare` gave, when what the run
    /// did changed it (an ingest whose retried objects all read now leaves the fingerprint of a
    /// source with nothing left to retry, so the next run over the same source is up to date).
    pub fn leave_fingerprint(&self, fingerprint: String) {
        if let Ok(mut f) = self.fingerprint_after.lock() {
            *f = Some(fingerprint);
        }
    }

    /// Whether a fault is injected into this fetch of `key` ([`RunOptions::fail_fetch`]); each
    /// call uses one of its failures up.
    pub fn fetch_fault(&self, key: &str) -> bool {
        let Ok(mut faults) = self.fetch_faults.lock() else { return false };
        match faults.get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Whether `table` reaches this stage over a streamed edge this run.
    pub fn is_streamed(&self, table: &str) -> bool {
        self.streams.lock().map(|s| s.contains_key(table)).unwrap_or(false)
    }

    /// The rows of `table` (the `columns` given, all when empty) as batches: as its producer
    /// writes them when the table reaches this stage over a streamed edge, else from the
    /// committed table. Nothing is waited for until the stream is first polled, so a stage can
    /// hold several and read them together. Streamed, the stream ends in an error if the
    /// producer fails. Polling it again after its end gives `None` again.
    pub fn read(&self, table: &str, columns: &[&str]) -> BatchStream {
        let edge = self.streams.lock().ok().and_then(|mut s| s.remove(table));
        let (t, cols): (String, Vec<String>) = (table.to_string(), columns.iter().map(|c| c.to_string()).collect());
        let lake = self.lake.clone();
        let state = match edge {
            Some(edge) => Read::Edge(edge),
            None => Read::Committed,
        };
        futures::stream::unfold(state, move |state| {
            let (lake, t, cols) = (lake.clone(), t.clone(), cols.clone());
            async move {
                let mut state = state;
                loop {
                    state = match state {
                        Read::Done => return None,
                        Read::Edge(StreamIn { producer, mut rx, phase }) => match rx.recv().await {
                            Some(Tap::Start) => Read::Streaming(producer, rx),
                            // The producer wrote nothing this run: once it is done, its committed
                            // table is what there is to read.
                            None => match producer_done(&producer, phase).await {
                                Ok(()) => Read::Committed,
                                Err(e) => return Some((Err(e), Read::Done)),
                            },
                            Some(other) => {
                                return Some((Err(Error::Other(format!("stage `{producer}`: its stream began with {other:?}"))), Read::Done));
                            }
                        },
                        Read::Streaming(producer, mut rx) => {
                            return match rx.recv().await {
                                Some(Tap::Batch(b)) => Some((project(&t, &cols, b), Read::Streaming(producer, rx))),
                                Some(Tap::End) => None,
                                Some(Tap::Start) => Some((Err(Error::Other(format!("stage `{producer}` started its stream twice"))), Read::Done)),
                                None => Some((Err(Error::Cancelled(format!("stage `{producer}` stopped before its stream ended"))), Read::Done)),
                            };
                        }
                        Read::Committed => match scan(&lake, &t, &cols).await {
                            Ok(s) => Read::Scan(s),
                            Err(e) => return Some((Err(e), Read::Done)),
                        },
                        Read::Scan(mut s) => {
                            return match s.next().await {
                                Some(r) => Some((r, Read::Scan(s))),
                                None => None,
                            };
                        }
                    }
                }
            }
        })
        // Ended stays ended: a stage may poll again after the last batch.
        .fuse()
        .boxed()
    }
}

/// Where [`StageCtx::read`] is.
enum Read {
    Edge(StreamIn),
    Streaming(String, mpsc::Receiver<Tap>),
    Committed,
    Scan(BatchStream),
    Done,
}

/// The `columns` of a streamed batch of `table` (all when empty).
fn project(table: &str, columns: &[String], b: arrow::array::RecordBatch) -> Result<arrow::array::RecordBatch> {
    if columns.is_empty() {
        return Ok(b);
    }
    let idx = columns
        .iter()
        .map(|c| {
            b.schema().index_of(c).map_err(|_| Error::Schema {
                table: table.to_string(),
                column: c.clone(),
                detail: "is missing from the streamed batches".into(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(b.project(&idx)?)
}

/// The committed table, `columns` of it (all when empty).
async fn scan(lake: &Lake, table: &str, columns: &[String]) -> Result<BatchStream> {
    let ds = lake.open(table).await?.ok_or_else(|| Error::Other(format!("table `{table}` does not exist in the lake")))?;
    let mut scan = ds.scan();
    if !columns.is_empty() {
        scan.project(columns).map_err(|e| Error::lance(table, e))?;
    }
    let t = table.to_string();
    let s = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
    Ok(s.map(move |r| r.map_err(|e| Error::lance(&t, e))).boxed())
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Re-run stages even when they are up to date.
    pub force: bool,
    /// Run only this stage and what it depends on.
    pub until: Option<String>,
    /// No progress bars.
    pub quiet: bool,
    /// Training stages continue from their last checkpoint.
    pub resume: bool,
    /// Device for model stages, overriding their `device` key.
    pub device: Option<crate::config::Device>,
    /// Fault injection, for tests of failure handling: the writer of this table fails once it
    /// was sent this many rows, and nothing it wrote is committed.
    pub fail_after: Option<(String, u64)>,
    /// When another run holds the lake: fail at once (the default) or wait.
    pub wait: lake::lease::Wait,
    /// Fault injection, for tests of transient errors: fetching the object with this key
    /// (relative to its source) fails this many times in this run.
    pub fail_fetch: Vec<(String, u32)>,
    /// Where the map stages run: in this process (None), or as shards on a Ray cluster.
    pub executor: Option<crate::shard::RayOptions>,
}

/// How long an object-store lake's lease lasts unless its holder renews it (every third of it).
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// How one stage ended.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub stage: String,
    pub kind: String,
    pub status: Status,
    pub rows_in: u64,
    pub rows_out: u64,
    pub seconds: f64,
    pub summary: String,
    pub written: BTreeMap<String, u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunReport {
    pub run_id: String,
    pub lake: String,
    pub stages: Vec<StageReport>,
}

impl RunReport {
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.stage == name)
    }
}

/// Runs the plan. Returns the report when every stage succeeded or was up to date, else the
/// first stage error (the report of a failed run is in the ledger).
pub async fn run(plan: &Plan, opts: &RunOptions) -> Result<RunReport> {
    let selected: Vec<StagePlan> = match &opts.until {
        Some(u) => plan
            .until(u)
            .ok_or_else(|| Error::Other(format!("--until `{u}`: no such stage in {}", plan.file.display())))?
            .into_iter()
            .cloned()
            .collect(),
        None => plan.stages.clone(),
    };
    let lake = Lake::new(plan.lake.clone(), plan.storage_options.clone(), plan.catalog.clone());
    let run_id = format!("{}-{}", Utc::now().format("%Y%m%dT%H%M%SZ"), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // One writer at a time: the run holds the lake's lease from before its first read of the
    // ledger to after its last commit.
    let holder = lake::lease::Holder::new(format!("run {run_id} of pipeline `{}`", plan.name), LEASE_TTL);
    let lease = lake::lease::Lease::acquire(lake.root(), lake.options(), holder, LEASE_TTL, opts.wait).await?;
    let result = run_leased(plan, opts, selected, lake, run_id, &lease).await;
    lease.release().await;
    result
}

/// What each stage that reads from outside the lake (ingest: its source listing and labels)
/// sees there now, by stage: the fingerprint its `prepare` computes, read-only and without the
/// lease. `pipeline schedule --watch` polls it and starts a run when it changes; a failing
/// listing is the stage's error.
pub async fn source_fingerprints(plan: &Plan) -> Result<BTreeMap<String, String>> {
    let lake = Lake::new(plan.lake.clone(), plan.storage_options.clone(), plan.catalog.clone());
    let mut out = BTreeMap::new();
    for stage in plan.stages.iter().filter(|s| s.inputs.is_empty()) {
        let ctx = StageCtx::bare(stage, "watch", lake.clone(), None, None);
        let prepared = stage.kind.prepare(&ctx).await.map_err(|e| e.in_stage(&stage.name))?;
        if let Some(f) = prepared.fingerprint {
            out.insert(stage.name.clone(), f);
        }
    }
    Ok(out)
}

/// The fingerprints each source stage recorded at its last success in the ledger (what
/// [`source_fingerprints`] gave then), by stage.
pub async fn recorded_fingerprints(plan: &Plan) -> Result<BTreeMap<String, String>> {
    let lake = Lake::new(plan.lake.clone(), plan.storage_options.clone(), plan.catalog.clone());
    let mut out = BTreeMap::new();
    for stage in plan.stages.iter().filter(|s| s.inputs.is_empty()) {
        if let Some(f) = ledger::last_success(&lake, &plan.name, &stage.name).await?.and_then(|l| l.input_fingerprint) {
            out.insert(stage.name.clone(), f);
        }
    }
    Ok(out)
}

async fn run_leased(
    plan: &Plan,
    opts: &RunOptions,
    selected: Vec<StagePlan>,
    lake: Lake,
    run_id: String,
    lease: &lake::lease::Lease,
) -> Result<RunReport> {
    // The ledger knows a pipeline by its name, not its path: a moved project is the same one.
    let pipeline = plan.name.clone();
    let progress = Progress::new(opts.quiet);
    let cancel = CancellationToken::new();

    // Ctrl-C and SIGTERM (systemd, Kubernetes, `timeout`) cancel the run the same way a
    // failing stage does: nothing half-written is committed.
    let on_signal = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                r = tokio::signal::ctrl_c() => if r.is_ok() { cancel.cancel() },
                _ = term => cancel.cancel(),
            }
        })
    };

    // Every stage's phase, and the streamed edges between the selected stages.
    let mut senders: HashMap<String, watch::Sender<Phase>> = HashMap::new();
    let mut phases: HashMap<String, watch::Receiver<Phase>> = HashMap::new();
    for stage in &selected {
        let (tx, rx) = watch::channel(Phase::Waiting);
        senders.insert(stage.name.clone(), tx);
        phases.insert(stage.name.clone(), rx);
    }
    let mut taps: HashMap<String, HashMap<String, TapSenders>> = HashMap::new();
    let mut streams: HashMap<String, HashMap<String, StreamIn>> = HashMap::new();
    // Shards on a cluster read committed tables: no stage streams another's this run.
    for stage in selected.iter().filter(|_| opts.executor.is_none()) {
        for (producer, table) in &stage.streamed {
            let Some(phase) = phases.get(producer) else { continue };
            let (tx, rx) = mpsc::channel(EDGE_CAPACITY);
            taps.entry(producer.clone()).or_default().entry(table.clone()).or_default().push(tx);
            let edge = StreamIn { producer: producer.clone(), rx, phase: phase.clone() };
            streams.entry(stage.name.clone()).or_default().insert(table.clone(), edge);
        }
    }

    let mut set: JoinSet<(StageReport, Option<Error>)> = JoinSet::new();
    // Without a terminal (cron, systemd), a timestamped line when each stage starts and ends.
    let log_lines = !opts.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shared = Arc::new(Shared {
        lake: lake.clone(),
        run_id: run_id.clone(),
        pipeline,
        pipeline_hash: plan.hash.clone(),
        force: opts.force,
        log_lines,
        executor: opts.executor.clone().map(|r| (plan.file.clone(), r)),
    });
    for stage in &selected {
        let Some(tx) = senders.remove(&stage.name) else { continue };
        let streams = streams.remove(&stage.name).unwrap_or_default();
        let producers: Vec<(String, watch::Receiver<Phase>)> = streams.values().map(|e| (e.producer.clone(), e.phase.clone())).collect();
        // Inputs it streams from need only be running; the others must have committed.
        let inputs: Vec<(String, watch::Receiver<Phase>, bool)> = stage
            .inputs
            .iter()
            .filter_map(|i| phases.get(i).map(|rx| (i.clone(), rx.clone(), producers.iter().any(|(p, _)| p == i))))
            .collect();
        let ctx = StageCtx {
            name: stage.name.clone(),
            run_id: run_id.clone(),
            lake: lake.clone(),
            progress: progress.stage(&stage.name),
            cancel: cancel.clone(),
            resume: opts.resume,
            device: opts.device,
            taps: Mutex::new(taps.remove(&stage.name).unwrap_or_default()),
            streams: Mutex::new(streams),
            producers,
            fail_after: opts.fail_after.clone(),
            fetch_faults: Mutex::new(opts.fail_fetch.iter().cloned().collect()),
            models: stage.models.clone(),
            registered: Mutex::new(Vec::new()),
            fingerprint_after: Mutex::new(None),
            staging: None,
        };
        let stage = stage.clone();
        let shared = shared.clone();
        set.spawn(async move {
            let (report, error) = run_one(&shared, &stage, ctx, inputs, &tx).await;
            // Receivers may be gone when the run is being torn down; nothing to tell then.
            let _ = tx.send(Phase::Done(matches!(report.status, Status::Succeeded | Status::UpToDate)));
            (report, error)
        });
    }

    let mut reports = Vec::new();
    let mut first_error: Option<Error> = None;
    while let Some(joined) = set.join_next().await {
        let (report, error) = joined.map_err(|e| Error::Other(format!("a stage task panicked: {e}")))?;
        if report.status == Status::Failed && first_error.is_none() {
            cancel.cancel();
            // The stage's own error, typed, with its cause chain.
            let e = error.unwrap_or_else(|| Error::Other(report.error.clone().unwrap_or_default()));
            first_error = Some(e.in_stage(&report.stage));
        }
        reports.push(report);
    }
    on_signal.abort();
    // The run's tag on every table version it wrote (and on the ledger as it leaves it), so the
    // lake can be read as it was after this run (`pipeline query --as-of`).
    let mut written: BTreeMap<String, u64> = BTreeMap::new();
    for r in reports.iter().filter(|r| r.status == Status::Succeeded) {
        written.extend(r.written.iter().filter(|(t, _)| lake::models::ledger_id(t).is_none()).map(|(t, v)| (t.clone(), *v)));
    }
    written.extend(lake.versions(&[ledger::TABLE.to_string()]).await?);
    if let Err(e) = lake.tag_run(&run_id, &written).await {
        // The run's tables are committed; only its mark in the history is missing.
        tracing::error!("could not tag the versions run {run_id} wrote: {e}");
    }
    // An object-store lease that lapsed (its renewals failed) is reported, not ignored.
    lease.check()?;
    let order: HashMap<&str, usize> = selected.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    reports.sort_by_key(|r| order.get(r.stage.as_str()).copied().unwrap_or(usize::MAX));
    if let Some(e) = first_error {
        return Err(e);
    }
    if cancel.is_cancelled() {
        return Err(Error::Cancelled("interrupted; nothing half-written was committed".into()));
    }
    Ok(RunReport { run_id, lake: lake.root().to_string(), stages: reports })
}

struct Shared {
    lake: Lake,
    run_id: String,
    pipeline: String,
    pipeline_hash: String,
    force: bool,
    log_lines: bool,
    /// The pipeline file and the cluster, when map stages run as shards on Ray.
    executor: Option<(std::path::PathBuf, crate::shard::RayOptions)>,
}

async fn run_one(
    shared: &Shared,
    stage: &StagePlan,
    ctx: StageCtx,
    mut inputs: Vec<(String, watch::Receiver<Phase>, bool)>,
    phase: &watch::Sender<Phase>,
) -> (StageReport, Option<Error>) {
    let span = tracing::info_span!("stage", name = %stage.name, kind = %stage.kind_name);
    let _enter = span.enter();
    let mut report = StageReport {
        stage: stage.name.clone(),
        kind: stage.kind_name.clone(),
        status: Status::Cancelled,
        rows_in: 0,
        rows_out: 0,
        seconds: 0.0,
        summary: String::new(),
        written: BTreeMap::new(),
        error: None,
    };
    // Wait for the inputs: committed, or, for a streamed one, at least running. A failed or
    // cancelled input cancels this stage.
    for (_, rx, streamed) in &mut inputs {
        let streamed = *streamed;
        let ok = tokio::select! {
            _ = ctx.cancel.cancelled() => false,
            r = rx.wait_for(|p| matches!(p, Phase::Done(_)) || (streamed && *p == Phase::Running)) => {
                r.map(|p| !matches!(*p, Phase::Done(false))).unwrap_or(false)
            }
        };
        if !ok {
            report.summary = "not run: an input did not complete".into();
            ctx.progress.finish_and_clear();
            return (report, None);
        }
    }
    // Streaming this run: a streamed producer is running, so what this stage reads is being
    // written now (it cannot be up to date).
    let streaming = inputs.iter().any(|(_, rx, streamed)| *streamed && *rx.borrow() == Phase::Running);
    // The stage's time starts when its inputs are ready, not when the run starts.
    let started = Instant::now();
    if shared.log_lines {
        eprintln!("{} {} started{}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"), stage.name, if streaming { " (streaming its input)" } else { "" });
    }
    let started_at = Utc::now();
    let result = tokio::select! {
        _ = ctx.cancel.cancelled() => Err(Error::Cancelled("cancelled".into())),
        r = execute(shared, stage, &ctx, streaming, phase) => r,
    };
    report.seconds = started.elapsed().as_secs_f64();
    let mut error = None;
    let mut entry = Entry::begun(&shared.run_id, &shared.pipeline, &shared.pipeline_hash, stage, started_at);
    match result {
        Ok(done) => {
            report.status = done.status;
            report.rows_in = done.outcome.rows_in;
            report.rows_out = done.outcome.rows_out;
            report.summary = done.outcome.summary.clone();
            report.written = done.outcome.written.clone();
            entry.status = done.status;
            entry.rows_in = done.outcome.rows_in;
            entry.rows_out = done.outcome.rows_out;
            entry.input_fingerprint = done.fingerprint;
            entry.summary = done.outcome.summary.clone();
            entry.changes = done.outcome.changes;
            entry.tables_read = done.read;
            entry.tables_written = done.outcome.written;
        }
        Err(Error::Cancelled(_)) => {
            report.status = Status::Cancelled;
            entry.status = Status::Cancelled;
        }
        Err(e) => {
            tracing::error!(stage = %stage.name, "{e}");
            report.status = Status::Failed;
            report.error = Some(e.to_string());
            entry.error = Some(e.to_string());
            error = Some(e);
        }
    }
    ctx.progress.finish_and_clear();
    if shared.log_lines {
        eprintln!(
            "{} {} {} in {:.1}s{}",
            Utc::now().format("%Y-%m-%dT%H:%M:%SZ"),
            stage.name,
            report.status.as_str(),
            report.seconds,
            report.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
        );
    }
    if let Err(e) = ledger::record(&shared.lake, &entry).await {
        // The stage's own result stands; a ledger failure is reported, not hidden.
        tracing::error!("could not record stage `{}` in the runs ledger: {e}", stage.name);
        if report.status == Status::Succeeded {
            report.status = Status::Failed;
            report.error = Some(format!("runs ledger: {e}"));
            error = Some(e);
        }
    }
    (report, error)
}

struct Done {
    status: Status,
    outcome: crate::stage::Outcome,
    fingerprint: Option<String>,
    read: BTreeMap<String, u64>,
}

async fn execute(shared: &Shared, stage: &StagePlan, ctx: &StageCtx, streaming: bool, phase: &watch::Sender<Phase>) -> Result<Done> {
    // A table written before its declared schema gained a (nullable) column gets it, as
    // nulls, before anything reads it: the stage then runs again once (its table changed) and
    // fills it, and its readers' queries can name it meanwhile.
    for t in &stage.writes {
        if shared.lake.add_declared_columns(t).await? {
            tracing::info!(stage = %stage.name, table = %t, "added the columns declared since the table was written");
        }
    }
    let prepared = stage.kind.prepare(ctx).await?;
    let fingerprint = prepared.fingerprint.clone();
    let read = shared.lake.versions(&stage.reads).await?;
    if !shared.force && !streaming {
        if let Some(last) = ledger::last_success(&shared.lake, &shared.pipeline, &stage.name).await? {
            let mut written_now = shared.lake.versions(&stage.writes).await?;
            // The models it registered: still there?
            for key in last.tables_written.keys() {
                if let Some(id) = lake::models::ledger_id(key) {
                    written_now.insert(key.clone(), u64::from(lake::models::present(&shared.lake, id).await?));
                }
            }
            let unchanged = last.config_hash == stage.config_hash
                && last.input_fingerprint == fingerprint
                && last.tables_read == read
                && last.tables_written == written_now;
            if unchanged {
                let outcome = crate::stage::Outcome { written: written_now, summary: "up to date".into(), ..Default::default() };
                return Ok(Done { status: Status::UpToDate, outcome, fingerprint, read });
            }
        }
    }
    // Dependants that stream from this stage may start now.
    let _ = phase.send(Phase::Running);
    let mut outcome = match &shared.executor {
        Some((file, ray)) if stage.kind.shards() => crate::shard::run_sharded(&shared.lake, file, ray, stage, ctx, fingerprint.as_deref(), &read).await?,
        _ => stage.kind.run(ctx, prepared).await?,
    };
    // What was read, as committed: a streamed table's version is known once its producer is.
    let read = if streaming { shared.lake.versions(&stage.reads).await? } else { read };
    // Record every table the stage owns, written this time or not, so the next up-to-date
    // check compares like with like.
    for (t, v) in shared.lake.versions(&stage.writes).await? {
        outcome.written.entry(t).or_insert(v);
    }
    let registered = std::mem::take(&mut *ctx.registered.lock().map_err(|_| Error::Other("stage context poisoned".into()))?);
    for id in registered {
        outcome.written.insert(lake::models::ledger_key(&id), 1);
    }
    let fingerprint = ctx.fingerprint_after.lock().ok().and_then(|mut f| f.take()).or(fingerprint);
    Ok(Done { status: Status::Succeeded, outcome, fingerprint, read })
}
