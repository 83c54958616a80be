//! The executor: runs a [`Plan`]'s stages as tokio tasks.
//!
//! A stage starts when every input stage has committed; it reads their tables at the versions
//! they committed, and its own output travels over a bounded channel into one Lance commit
//! (see [`crate::lake::TableSink`]). Before running, a stage is compared with its last
//! successful run in the ledger: same options, same input table versions, same external
//! fingerprint and its output tables untouched since → it is skipped as up to date. The first
//! failure (or Ctrl-C) cancels everything still running; nothing half-written is committed.

pub mod ledger;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Plan, StagePlan};
use crate::lake::Lake;
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
    pub device: Option<String>,
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
    /// Device for model stages (`auto`, `cpu`, `cuda`), overriding their `device` key.
    pub device: Option<String>,
}

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
    let pipeline = std::fs::canonicalize(&plan.file).unwrap_or_else(|_| plan.file.clone()).display().to_string();
    let progress = Progress::new(opts.quiet);
    let cancel = CancellationToken::new();

    // Ctrl-C cancels the run the same way a failing stage does.
    let on_signal = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };

    let mut states: HashMap<String, watch::Receiver<Option<bool>>> = HashMap::new();
    let mut set: JoinSet<StageReport> = JoinSet::new();
    let shared = Arc::new(Shared { lake: lake.clone(), run_id: run_id.clone(), pipeline, pipeline_hash: plan.hash.clone(), force: opts.force });
    for stage in &selected {
        let (tx, rx) = watch::channel::<Option<bool>>(None);
        let inputs: Vec<watch::Receiver<Option<bool>>> =
            stage.inputs.iter().filter_map(|i| states.get(i).cloned()).collect();
        states.insert(stage.name.clone(), rx);
        let ctx = StageCtx {
            name: stage.name.clone(),
            run_id: run_id.clone(),
            lake: lake.clone(),
            progress: progress.stage(&stage.name),
            cancel: cancel.clone(),
            resume: opts.resume,
            device: opts.device.clone(),
        };
        let stage = stage.clone();
        let shared = shared.clone();
        set.spawn(async move {
            let report = run_one(&shared, &stage, ctx, inputs).await;
            // Receivers may be gone when the run is being torn down; nothing to tell then.
            let _ = tx.send(Some(matches!(report.status, Status::Succeeded | Status::UpToDate)));
            report
        });
    }

    let mut reports = Vec::new();
    let mut first_error: Option<Error> = None;
    while let Some(joined) = set.join_next().await {
        let report = joined.map_err(|e| Error::Other(format!("a stage task panicked: {e}")))?;
        if report.status == Status::Failed && first_error.is_none() {
            cancel.cancel();
            let msg = report.error.clone().unwrap_or_default();
            first_error = Some(Error::Stage { stage: report.stage.clone(), source: Box::new(Error::Other(msg)) });
        }
        reports.push(report);
    }
    on_signal.abort();
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
}

async fn run_one(
    shared: &Shared,
    stage: &StagePlan,
    ctx: StageCtx,
    mut inputs: Vec<watch::Receiver<Option<bool>>>,
) -> StageReport {
    let span = tracing::info_span!("stage", name = %stage.name, kind = stage.kind.name());
    let _enter = span.enter();
    let mut report = StageReport {
        stage: stage.name.clone(),
        kind: stage.kind.name().to_string(),
        status: Status::Cancelled,
        rows_in: 0,
        rows_out: 0,
        seconds: 0.0,
        summary: String::new(),
        written: BTreeMap::new(),
        error: None,
    };
    // Wait for the inputs; a failed or cancelled input cancels this stage.
    for rx in &mut inputs {
        let ok = tokio::select! {
            _ = ctx.cancel.cancelled() => false,
            r = rx.wait_for(|s| s.is_some()) => r.map(|s| s.unwrap_or(false)).unwrap_or(false),
        };
        if !ok {
            report.summary = "not run: an input did not complete".into();
            ctx.progress.finish_and_clear();
            return report;
        }
    }
    // The stage's time starts when its inputs are ready, not when the run starts.
    let started = Instant::now();
    let started_at = Utc::now();
    let result = tokio::select! {
        _ = ctx.cancel.cancelled() => Err(Error::Cancelled("cancelled".into())),
        r = execute(shared, stage, &ctx) => r,
    };
    report.seconds = started.elapsed().as_secs_f64();
    let mut entry = Entry {
        run_id: shared.run_id.clone(),
        pipeline: shared.pipeline.clone(),
        pipeline_hash: shared.pipeline_hash.clone(),
        stage: stage.name.clone(),
        kind: stage.kind.name().to_string(),
        config_hash: stage.config_hash.clone(),
        input_fingerprint: None,
        status: Status::Failed,
        started_at,
        ended_at: Utc::now(),
        rows_in: 0,
        rows_out: 0,
        tables_read: BTreeMap::new(),
        tables_written: BTreeMap::new(),
        error: None,
    };
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
        }
    }
    ctx.progress.finish_and_clear();
    if let Err(e) = ledger::record(&shared.lake, &entry).await {
        // The stage's own result stands; a ledger failure is reported, not hidden.
        tracing::error!("could not record stage `{}` in the runs ledger: {e}", stage.name);
        if report.status == Status::Succeeded {
            report.status = Status::Failed;
            report.error = Some(format!("runs ledger: {e}"));
        }
    }
    report
}

struct Done {
    status: Status,
    outcome: crate::stages::Outcome,
    fingerprint: Option<String>,
    read: BTreeMap<String, u64>,
}

async fn execute(shared: &Shared, stage: &StagePlan, ctx: &StageCtx) -> Result<Done> {
    let inner = async {
        let prepared = stage.kind.prepare(ctx).await?;
        let fingerprint = prepared.fingerprint.clone();
        let read = shared.lake.versions(&stage.reads).await?;
        if !shared.force {
            if let Some(last) = ledger::last_success(&shared.lake, &shared.pipeline, &stage.name).await? {
                let written_now = shared.lake.versions(&stage.writes).await?;
                let unchanged = last.config_hash == stage.config_hash
                    && last.input_fingerprint == fingerprint
                    && last.tables_read == read
                    && last.tables_written == written_now;
                if unchanged {
                    let outcome = crate::stages::Outcome { written: written_now, summary: "up to date".into(), ..Default::default() };
                    return Ok(Done { status: Status::UpToDate, outcome, fingerprint, read });
                }
            }
        }
        let mut outcome = stage.kind.run(ctx, prepared).await?;
        // Record every table the stage owns, written this time or not, so the next up-to-date
        // check compares like with like.
        for (t, v) in shared.lake.versions(&stage.writes).await? {
            outcome.written.entry(t).or_insert(v);
        }
        Ok(Done { status: Status::Succeeded, outcome, fingerprint, read })
    };
    inner.await
}
