//! Map stages as shards, and Ray as the executor that runs them.
//!
//! - [`work`] (`pipeline worker FILE --stage S --shard K/N --run R`) runs stage `S` over the
//!   photos shard `K` of `N` owns ([`lake::staging::Shard::owns`]): its writes are staged, not
//!   committed, and its manifest says what it did (see [`lake::staging`]).
//! - [`commit`] (`pipeline commit FILE --stage S --run R --shards N`) checks that the `N` shards
//!   of run `R` all finished, with the stage's options, over the same input versions, and lands
//!   them: each table in one Lance transaction. It records the stage in the run ledger as a
//!   local run of the stage would be.
//! - [`run_sharded`] is the same inside `pipeline run --executor ray[=ADDRESS]`: the driver
//!   (which holds the lake's lease) does what the stage needs done once
//!   ([`crate::stage::Stage::before_shards`]), hands the shards to Ray (one Ray task per shard,
//!   each running `pipeline worker` as a subprocess; Ray retries a task whose worker or node
//!   died, or whose subprocess failed), then commits.
//!
//! The bridge to Ray is the Ray Python API (`ray` from PyPI, in the project's venv), driven by
//! a small script this binary carries (`ray_bridge.py`): Ray's own scheduler, retries and node
//! handling, nothing re-implemented, and no dashboard or job server needed on the cluster
//! (the Jobs API would need both, and a gigabyte more memory on the head).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use chrono::Utc;
use lake::Lake;
use lake::staging::{self, Manifest, Shard, Staging};

use crate::config::{Device, Plan, StagePlan};
use crate::dag::ledger::{self, Entry, Status};
use crate::stage::{Changes, Outcome};
use crate::{Error, Result, StageCtx};

/// The Ray side of the bridge: reads its orders as JSON on stdin, prints one JSON line per
/// event on stdout.
const BRIDGE: &str = include_str!("ray_bridge.py");

/// How `pipeline run --executor ray` runs map stages.
#[derive(Debug, Clone, Default)]
pub struct RayOptions {
    /// The cluster's address (`HOST:PORT` of its GCS); None: `RAY_ADDRESS`, a cluster started on
    /// this machine with `ray start`, or else a Ray started for this run on this machine.
    pub address: Option<String>,
    /// Shards per map stage.
    pub shards: u32,
    /// Attempts after the first for a shard whose worker, node or subprocess failed.
    pub retries: u32,
    /// Arguments every `pipeline worker` gets after its own (`--set`s, `--device`), so that it
    /// runs the stage as the driver plans it.
    pub worker_args: Vec<String>,
    /// The run's `--device`, which decides whether a shard asks Ray for a GPU.
    pub device: Option<Device>,
}

/// What a shard keeps of its run in its manifest, for the commit.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ShardMeta {
    config_hash: String,
    /// What the stage's `prepare` saw outside the lake (the source listing, the boxes file).
    fingerprint: Option<String>,
    /// The fingerprint the shard's run leaves ([`StageCtx::leave_fingerprint`]).
    fingerprint_after: Option<String>,
    /// Versions of the tables the stage reads, as the shard read them.
    tables_read: BTreeMap<String, u64>,
    rows_in: u64,
    rows_out: u64,
    summary: String,
    changes: Changes,
    seconds: f64,
    host: String,
}

fn stage_of<'a>(plan: &'a Plan, name: &str) -> Result<&'a StagePlan> {
    let st = plan.stage(name).ok_or_else(|| {
        Error::Other(format!("no stage `{name}` in {} (its stages: {})", plan.file.display(), plan.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")))
    })?;
    if !st.kind.shards() {
        let can: Vec<&str> = plan.stages.iter().filter(|s| s.kind.shards()).map(|s| s.name.as_str()).collect();
        return Err(Error::Other(format!(
            "stage `{name}` (kind {}) needs its tables whole: it runs on the driver (`pipeline run`), not as shards; stages of {} that run as shards: {}",
            st.kind_name,
            plan.file.display(),
            if can.is_empty() { "none".into() } else { can.join(", ") }
        )));
    }
    Ok(st)
}

fn lake_of(plan: &Plan) -> Lake {
    Lake::new(plan.lake.clone(), plan.storage_options.clone(), plan.catalog.clone())
}

/// `pipeline worker`: runs shard `shard` of stage `stage` for run `run_id`, staging its writes;
/// the shard's manifest. A lake held by another run is not written to.
pub async fn work(plan: &Plan, stage: &str, shard: Shard, run_id: &str, device: Option<Device>) -> Result<Manifest> {
    check_run_id(run_id)?;
    let st = stage_of(plan, stage)?;
    let lake = lake_of(plan);
    if let Some(h) = lake::lease::holder(lake.root(), lake.options()).await? {
        if !h.what.contains(&format!("run {run_id} ")) {
            return Err(Error::Busy { lake: lake.root().to_string(), holder: format!("{} (shard {shard} of run {run_id} does not write to a lake another run holds)", h.what) });
        }
    }
    let started = Instant::now();
    let staging = Staging::new(run_id, stage, shard);
    let ctx = StageCtx::bare(st, run_id, lake.clone(), device, Some(staging.clone()));
    let tables_read = lake.versions(&st.reads).await?;
    let prepared = st.kind.prepare(&ctx).await.map_err(|e| e.in_stage(stage))?;
    let fingerprint = prepared.fingerprint.clone();
    let outcome = st.kind.run(&ctx, prepared).await.map_err(|e| e.in_stage(stage))?;
    let meta = ShardMeta {
        config_hash: st.config_hash.clone(),
        fingerprint,
        fingerprint_after: ctx.fingerprint_left(),
        tables_read,
        rows_in: outcome.rows_in,
        rows_out: outcome.rows_out,
        summary: outcome.summary,
        changes: outcome.changes,
        seconds: started.elapsed().as_secs_f64(),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default(),
    };
    staging.finish(&lake, serde_json::to_value(&meta).map_err(|e| Error::Other(e.to_string()))?).await
}

/// `pipeline worker --before`: what stage `stage` needs done once before its shards run (detect
/// trains its detector), for shards that a scheduler other than Ray runs.
pub async fn before(plan: &Plan, stage: &str, run_id: &str, device: Option<Device>) -> Result<()> {
    check_run_id(run_id)?;
    let st = stage_of(plan, stage)?;
    let lake = lake_of(plan);
    if let Some(h) = lake::lease::holder(lake.root(), lake.options()).await? {
        if !h.what.contains(&format!("run {run_id} ")) {
            return Err(Error::Busy { lake: lake.root().to_string(), holder: h.what });
        }
    }
    let ctx = StageCtx::bare(st, run_id, lake, device, None);
    st.kind.before_shards(&ctx).await.map_err(|e| e.in_stage(stage))
}

/// A run id names a folder of the staging area: letters, digits, `-`, `_` and `.`.
fn check_run_id(run_id: &str) -> Result<()> {
    if run_id.is_empty() || run_id.starts_with('.') || !run_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(Error::Other(format!("run id `{run_id}`: use letters, digits, `-`, `_` and `.` only (it names a folder of the lake's staging area)")));
    }
    Ok(())
}

/// The shards' accounts, checked against the stage as planned and against each other; what the
/// stage did, as one outcome. Nothing is committed yet.
fn merged(stage: &StagePlan, run_id: &str, count: u32, shards: &BTreeMap<u32, Manifest>, fingerprint: Option<&str>, read: &BTreeMap<String, u64>) -> Result<(Vec<ShardMeta>, Option<String>)> {
    let mut metas = Vec::new();
    for (k, m) in shards {
        let meta: ShardMeta =
            serde_json::from_value(m.meta.clone()).map_err(|e| Error::Other(format!("shard {k}/{count} of run {run_id}: its manifest: {e}")))?;
        let at = |what: String| Error::Other(format!("stage `{}`, shard {k}/{count} of run {run_id}: {what}; nothing was committed", stage.name));
        if meta.config_hash != stage.config_hash {
            return Err(at("it ran with other options than the pipeline has now".into()));
        }
        if fingerprint.is_some() && meta.fingerprint.as_deref() != fingerprint {
            return Err(at("it saw other inputs outside the lake (source listing, labels, boxes) than the driver".into()));
        }
        if &meta.tables_read != read {
            return Err(at(format!("it read the tables at {:?}, they are at {:?} now", meta.tables_read, read)));
        }
        metas.push(meta);
    }
    // One fingerprint the shards leave; shards that leave different ones (some still have
    // objects to retry) leave one no listing gives, so the next run does the stage again.
    let mut left: Vec<String> = metas.iter().filter_map(|m| m.fingerprint_after.clone()).collect();
    left.sort();
    left.dedup();
    let after = match left.len() {
        0 => None,
        1 => left.pop(),
        _ => Some(left.join("|")),
    };
    Ok((metas, after))
}

fn outcome_of(metas: &[ShardMeta], landed: &staging::Landed, count: u32, how: &str) -> Outcome {
    let sum = |f: fn(&Changes) -> Option<u64>| metas.iter().map(|m| f(&m.changes)).try_fold(0u64, |a, b| b.map(|b| a + b));
    let seconds: Vec<f64> = metas.iter().map(|m| m.seconds).collect();
    let slowest = seconds.iter().cloned().fold(0.0, f64::max);
    let first = metas.first().map(|m| m.summary.clone()).unwrap_or_default();
    Outcome {
        rows_in: metas.iter().map(|m| m.rows_in).sum(),
        rows_out: metas.iter().map(|m| m.rows_out).sum(),
        written: landed.versions.clone(),
        summary: format!(
            "{count} shards {how} ({} rows in, {} out; slowest shard {slowest:.1}s); shard 0: {first}",
            metas.iter().map(|m| m.rows_in).sum::<u64>(),
            metas.iter().map(|m| m.rows_out).sum::<u64>()
        ),
        changes: Changes { new: sum(|c| c.new), changed: sum(|c| c.changed), deleted: sum(|c| c.deleted), rejected: sum(|c| c.rejected) },
    }
}

/// Checks the `count` shards of `stage` in run `run_id` against the stage, the input versions
/// `read` and the outside inputs `fingerprint` (None: the first shard's), then lands them; the
/// stage's outcome, and the fingerprint it leaves for the ledger.
async fn land(
    lake: &Lake,
    stage: &StagePlan,
    run_id: &str,
    count: u32,
    fingerprint: Option<&str>,
    read: &BTreeMap<String, u64>,
    how: &str,
) -> Result<(Outcome, Option<String>)> {
    let shards = staging::manifests(lake, run_id, &stage.name).await?;
    let first = shards.values().next().and_then(|m| m.meta.get("fingerprint").and_then(|f| f.as_str().map(str::to_string)));
    let expected = fingerprint.map(str::to_string).or(first);
    // A missing shard is reported by the commit, with the runs staged beside.
    let (metas, after) = if shards.len() as u32 == count { merged(stage, run_id, count, &shards, expected.as_deref(), read)? } else { (Vec::new(), None) };
    let landed = staging::commit(lake, run_id, &stage.name, count).await?;
    Ok((outcome_of(&metas, &landed, count, how), after.or(expected)))
}

/// `pipeline commit`: lands the `count` shards of `stage` in run `run_id` and records the stage
/// in the ledger. Holds the lake's lease while it does.
pub async fn commit(plan: &Plan, stage: &str, run_id: &str, count: u32) -> Result<Outcome> {
    check_run_id(run_id)?;
    let st = stage_of(plan, stage)?;
    let lake = lake_of(plan);
    let holder = lake::lease::Holder::new(format!("run {run_id} of pipeline `{}` (commit of stage {stage})", plan.name), crate::dag::LEASE_TTL);
    let lease = lake::lease::Lease::acquire(lake.root(), lake.options(), holder, crate::dag::LEASE_TTL, lake::lease::Wait::No).await?;
    let started_at = Utc::now();
    let result = async {
        lease.check()?;
        let read = lake.versions(&st.reads).await?;
        let (mut outcome, fingerprint) = land(&lake, st, run_id, count, None, &read, "committed").await?;
        for (t, v) in lake.versions(&st.writes).await? {
            outcome.written.entry(t).or_insert(v);
        }
        Ok::<_, Error>((outcome, fingerprint, read))
    }
    .await;
    let entry = |status: Status, error: Option<String>| Entry { status, error, ..Entry::begun(run_id, &plan.name, &plan.hash, st, started_at) };
    let out = match result {
        Ok((outcome, fingerprint, read)) => {
            let mut e = entry(Status::Succeeded, None);
            e.input_fingerprint = fingerprint;
            e.rows_in = outcome.rows_in;
            e.rows_out = outcome.rows_out;
            e.tables_read = read;
            e.tables_written = outcome.written.clone();
            e.summary = outcome.summary.clone();
            e.changes = outcome.changes;
            ledger::record(&lake, &e).await?;
            Ok(outcome)
        }
        Err(err) => {
            let _ = ledger::record(&lake, &entry(Status::Failed, Some(err.to_string()))).await;
            Err(err)
        }
    };
    lease.release().await;
    out
}

/// The stage `stage`, inside a run that holds the lease, as shards on Ray: what it needs done
/// once, then the shards, then the one commit. `fingerprint` and `read` are what the driver saw
/// (the shards must have seen the same).
pub(crate) async fn run_sharded(
    lake: &Lake,
    file: &Path,
    ray: &RayOptions,
    stage: &StagePlan,
    ctx: &StageCtx,
    fingerprint: Option<&str>,
    read: &BTreeMap<String, u64>,
) -> Result<Outcome> {
    let count = ray.shards.max(1);
    stage.kind.before_shards(ctx).await?;
    staging::clear(lake, &ctx.run_id, &stage.name).await?;
    ctx.progress.set_message(format!("{count} shards on Ray"));
    let gpus = if stage.kind.wants_gpu(ray.device) { 1.0 } else { 0.0 };
    let spec = bridge_spec(file, ray, &stage.name, &ctx.run_id, count, gpus)?;
    let cancel = ctx.cancel.clone();
    let name = stage.name.clone();
    let events = tokio::task::spawn_blocking(move || run_bridge(&spec, &name, &cancel))
        .await
        .map_err(|e| Error::Other(format!("the Ray bridge panicked: {e}")))??;
    let (outcome, left) = land(lake, stage, &ctx.run_id, count, fingerprint, read, &format!("on Ray ({events})")).await?;
    if let Some(f) = left {
        ctx.leave_fingerprint(f);
    }
    Ok(outcome)
}

/// The bridge's orders for one stage.
fn bridge_spec(file: &Path, ray: &RayOptions, stage: &str, run_id: &str, count: u32, gpus: f64) -> Result<serde_json::Value> {
    let bin = match std::env::var_os("PIPELINE_BIN") {
        Some(b) => PathBuf::from(b),
        None => std::env::current_exe().map_err(|e| Error::Other(format!("the path of this program, for the workers: {e}")))?,
    };
    let file = std::path::absolute(file).map_err(|e| Error::io(file, e))?;
    let shards: Vec<serde_json::Value> = (0..count)
        .map(|k| {
            let mut argv: Vec<String> = vec![
                bin.display().to_string(),
                "worker".into(),
                file.display().to_string(),
                "--stage".into(),
                stage.into(),
                "--shard".into(),
                format!("{k}/{count}"),
                "--run".into(),
                run_id.into(),
            ];
            argv.extend(ray.worker_args.iter().cloned());
            serde_json::json!({ "index": k, "argv": argv })
        })
        .collect();
    // What the workers need of this process's environment: the pipeline's own settings (fault
    // injection in tests, log filters) and object-store credentials given as variables.
    let env: BTreeMap<String, String> =
        std::env::vars().filter(|(k, _)| k.starts_with("PIPELINE_") || k.starts_with("AWS_") || k == "RUST_LOG" || k == "RUST_BACKTRACE").collect();
    Ok(serde_json::json!({
        "address": ray.address,
        "stage": stage,
        "shards": shards,
        "num_cpus": 1,
        "num_gpus": gpus,
        "max_retries": ray.retries,
        "env": env,
    }))
}

/// The Python that runs the bridge: `PIPELINE_PYTHON`, else the project's venv, else `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PIPELINE_PYTHON") {
        return PathBuf::from(p);
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        let p = PathBuf::from(v).join("bin/python");
        if p.is_file() {
            return p;
        }
    }
    let home = std::env::var_os("PIPELINE_CACHE").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pipeline")));
    if let Some(p) = home.map(|h| h.join("venv/bin/python")).filter(|p| p.is_file()) {
        return p;
    }
    PathBuf::from("python3")
}

/// Runs the bridge for one stage and waits; a short account of where the shards ran ("2 of 2
/// node(s) used"), or the error of the first shard that failed for good.
fn run_bridge(spec: &serde_json::Value, stage: &str, cancel: &tokio_util::sync::CancellationToken) -> Result<String> {
    let dir = tempfile::tempdir().map_err(|e| Error::Other(format!("temporary folder: {e}")))?;
    let script = dir.path().join("ray_bridge.py");
    std::fs::write(&script, BRIDGE).map_err(|e| Error::io(&script, e))?;
    let py = python();
    let mut child = Command::new(&py)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Other(format!("cannot start {} for the Ray bridge (set PIPELINE_PYTHON to a Python with `ray`): {e}", py.display())))?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(spec.to_string().as_bytes()).map_err(|e| Error::Other(format!("the Ray bridge: {e}")))?;
    }
    // Its stderr (Ray's own messages) is kept for the error, read on a thread of its own.
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let (mut done, mut failed, mut nodes) = (0u32, None::<(Option<u64>, String)>, 0u64);
    let mut seen_nodes = std::collections::HashSet::new();
    for line in stdout.lines() {
        if cancel.is_cancelled() {
            let _ = child.kill();
            break;
        }
        let Ok(line) = line else { break };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(&line) else {
            tracing::debug!("ray bridge: {line}");
            continue;
        };
        match ev.get("event").and_then(|e| e.as_str()) {
            Some("connected") => {
                nodes = ev.get("nodes").and_then(|n| n.as_u64()).unwrap_or(0);
                tracing::info!(stage, "Ray: {} node(s), {} CPU(s), {} GPU(s)", nodes, ev["cpus"], ev["gpus"]);
            }
            Some("done") => {
                done += 1;
                if let Some(n) = ev.get("node").and_then(|n| n.as_str()) {
                    seen_nodes.insert(n.to_string());
                }
            }
            Some("failed") => {
                let error = ev.get("error").and_then(|e| e.as_str()).unwrap_or("failed").to_string();
                failed = Some((ev.get("shard").and_then(|s| s.as_u64()), error));
            }
            _ => {}
        }
    }
    let status = child.wait().map_err(|e| Error::Other(format!("the Ray bridge: {e}")))?;
    let err = err_reader.join().unwrap_or_default();
    if cancel.is_cancelled() {
        return Err(Error::Cancelled("cancelled while its shards ran on Ray; nothing of them was committed".into()));
    }
    match failed {
        Some((Some(_), f)) => return Err(Error::Other(format!("a shard failed on Ray after its retries, nothing was committed: {f}"))),
        Some((None, f)) => return Err(Error::Other(format!("Ray: {f}; nothing was committed"))),
        None => {}
    }
    if !status.success() {
        let tail: String = err.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(Error::Other(format!("the Ray bridge ({} {}) ended with {status} after {done} shard(s):\n{tail}", py.display(), BRIDGE_NAME)));
    }
    Ok(format!("{} of {nodes} node(s) used", seen_nodes.len()))
}

const BRIDGE_NAME: &str = "ray_bridge.py";
