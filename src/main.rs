//! The `pipeline` command line: parse arguments, set up logging, call the library, map errors to
//! exit codes (0 ok, 1 failure, 2 invalid pipeline file, 130 interrupted).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use arrow::array::AsArray;
use clap::{Parser, Subcommand};
use pipeline::config::Plan;
use pipeline::dag::{self, RunOptions};
use pipeline::lake::{Catalog, Lake, store};
use pipeline::query::{self, Format};
use pipeline::{Error, answer, demo};

#[derive(Parser)]
#[command(name = "pipeline", version, about = "Streaming dataflow pipeline over an image lake for re-identification")]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. `info` or `pipeline=debug`.
    #[arg(long, global = true, default_value = "warn,lance=error")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a pipeline file.
    Run {
        file: PathBuf,
        /// Override an option for this run: STAGE.KEY=VALUE (repeatable).
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
        /// Run only this stage and the stages it depends on.
        #[arg(long)]
        until: Option<String>,
        /// Re-run stages that are up to date.
        #[arg(long)]
        force: bool,
        /// Continue an interrupted training from its last finished epoch (same configuration,
        /// same data): weights, optimizer state, schedule and random streams.
        #[arg(long)]
        resume: bool,
        /// Where train and embed stages run: auto (CUDA when libtorch sees it), cpu or cuda.
        /// Overrides their `device` key.
        #[arg(long, value_parser = ["auto", "cpu", "cuda"])]
        device: Option<String>,
        /// When another run holds the lake (one writer at a time), wait up to this many seconds
        /// for it instead of failing at once.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        /// Where the map stages (ingest, detect, embed) run: `local` (this process, the
        /// default) or `ray[=ADDRESS]`, as shards on a Ray cluster (ADDRESS: its GCS,
        /// `HOST:PORT`; without it RAY_ADDRESS, a cluster `ray start` made here, or a Ray
        /// started for this run). Also `[pipeline] executor` in the file.
        #[arg(long, value_name = "local|ray[=ADDRESS]")]
        executor: Option<String>,
        /// Shards per map stage with `--executor ray` (default: `[pipeline] shards`, else 4).
        #[arg(long, value_name = "N")]
        shards: Option<u32>,
    },
    /// Run one shard of a map stage, writing its tables' files without committing them (what
    /// `--executor ray` runs on each node; Slurm array jobs or Kubernetes indexed Jobs can
    /// run it too, then `pipeline commit`).
    Worker {
        file: PathBuf,
        #[arg(long)]
        stage: String,
        /// This worker's shard: K/N, 0 <= K < N.
        #[arg(long, value_name = "K/N", required_unless_present = "before")]
        shard: Option<String>,
        /// The run the shard belongs to (any id of letters, digits, `-`, `_`, `.`; the same for
        /// every shard and for the commit).
        #[arg(long, value_name = "RUN")]
        run: String,
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, value_parser = ["auto", "cpu", "cuda"])]
        device: Option<String>,
        /// No output but errors.
        #[arg(long, short)]
        quiet: bool,
        /// Instead of a shard, do what the stage needs done once before its shards (detect:
        /// train its detector). `--shard` is then not needed.
        #[arg(long)]
        before: bool,
    },
    /// Land the shards of a map stage (`pipeline worker`) as one Lance commit per table, once
    /// every shard 0..N of the run has finished, and record the stage in the run ledger.
    Commit {
        file: PathBuf,
        #[arg(long)]
        stage: String,
        #[arg(long, value_name = "RUN")]
        run: String,
        /// How many shards the run has.
        #[arg(long, value_name = "N")]
        shards: u32,
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Check a pipeline file and report every error at once; runs nothing.
    Validate {
        file: PathBuf,
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print the stage graph.
    Graph {
        file: PathBuf,
        /// Graphviz DOT instead of text.
        #[arg(long)]
        dot: bool,
    },
    /// Read-only SQL over the lake's tables.
    Query {
        sql: String,
        #[command(flatten)]
        at: LakeArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Read the lake as it was after this run (its id from `pipeline runs`, or `run-<id>`).
        #[arg(long, value_name = "RUN")]
        as_of: Option<String>,
        /// Memory for joins, sorts and aggregations: a size (4G, 512M) or a share of this
        /// machine's memory; a query that needs more fails with a clear error.
        #[arg(long, default_value = "50%", value_parser = query::parse_memory, value_name = "SIZE")]
        memory_limit: u64,
    },
    /// Housekeeping: compacts each table's small fragments and removes versions older than
    /// --keep-days that no run tag holds (run tags older than that go too, but each table's
    /// newest). Holds the lake like a run.
    Vacuum {
        #[arg(long, default_value_t = 7.0)]
        keep_days: f64,
        /// Wait up to this many seconds for a run that holds the lake.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
        #[command(flatten)]
        at: LakeArgs,
    },
    /// Run a pipeline for as long as this lives: on a cron schedule, or when objects under its
    /// sources change (--watch). A tick is skipped while a run holds the lake; a failed run is
    /// retried with backoff. One timestamped line per event on stdout. Ctrl-C or SIGTERM stops it.
    Schedule {
        file: PathBuf,
        /// Cron pattern: 5 fields (minute hour day month weekday), or 6 with seconds first;
        /// e.g. "0 2 * * *" for 02:00 every night.
        #[arg(long, conflicts_with = "watch", required_unless_present = "watch")]
        cron: Option<String>,
        /// Time zone of --cron (IANA name, e.g. Europe/Paris); default: the machine's.
        #[arg(long, requires = "cron")]
        tz: Option<String>,
        /// Run when the listing of the pipeline's sources differs from what the last run saw.
        #[arg(long)]
        watch: bool,
        /// --watch: seconds between listings.
        #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
        poll: f64,
        /// --watch: run once the listing has stayed unchanged this long (photos still being
        /// copied are not ingested half-way).
        #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
        debounce: f64,
        /// Attempts after a failed run, each after twice the wait of the one before.
        #[arg(long, default_value_t = 3)]
        retries: u32,
        /// Seconds before the first retry (with jitter).
        #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
        retry_after: f64,
        /// Stop after this many runs (default: run until stopped).
        #[arg(long)]
        max_runs: Option<u64>,
        /// Override an option: STAGE.KEY=VALUE (repeatable), as for `run`.
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long, value_parser = ["auto", "cpu", "cuda"])]
        device: Option<String>,
    },
    /// The lake's models (table `models`) and which is current for each name (table
    /// `promotions`): what `model = "current:NAME"` embeds with.
    Models {
        #[command(flatten)]
        at: LakeArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Make a model current for its name; the next run of a pipeline that embeds with
    /// `model = "current:NAME"` re-embeds the collection with it. Holds the lake like a run.
    Promote {
        /// A model id from `pipeline models`.
        model_id: String,
        #[command(flatten)]
        at: LakeArgs,
        /// Wait up to this many seconds for a run that holds the lake.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Record a person's decision about a photo, as the review page of `pipeline serve` does:
    /// `same W12`, `new NAME`, `unsure`, `bad` or `undo`. Appended to table `decisions`; the
    /// next run's `ingest` lays each photo's latest decision over the survey's labels.
    Decide {
        /// The photo (`images.photo_id`).
        photo_id: String,
        /// same | new | unsure | bad | undo
        decision: String,
        /// The individual (`same`), or the new individual's name (`new`).
        individual: Option<String>,
        /// Who decided (default: $USER, else $LOGNAME, else `cli`).
        #[arg(long)]
        who: Option<String>,
        #[command(flatten)]
        at: LakeArgs,
    },
    /// What the lake holds, as hashes to compare with another lake: one line per table (rows,
    /// rows that repeat another, BLAKE3 of the content in any order) and per model file; run
    /// ids, times, timings and the `runs` log left out. Two runs over the same photos agree.
    Digest {
        #[command(flatten)]
        at: LakeArgs,
    },
    /// The run history of a lake (its ledger, table `runs`): start, end, status, stages run and up to date;
    /// `pipeline runs ID` details one run stage by stage.
    Runs {
        /// A run id (or its unique beginning) to show stage by stage.
        id: Option<String>,
        /// List the last N runs.
        #[arg(long, default_value_t = 20)]
        last: usize,
        #[command(flatten)]
        at: LakeArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// The photos most similar to one photo: an id or URI of the collection, or a new photo
    /// (a path or URI), which is embedded with the table's model first.
    Similar {
        photo: String,
        #[arg(long, default_value_t = 20)]
        k: usize,
        #[arg(long, value_enum, default_value = "table")]
        format: SimilarFormat,
        /// Embeddings table to search.
        #[arg(long, default_value = "embeddings")]
        table: String,
        /// Exact search, ignoring the vector index.
        #[arg(long)]
        exact: bool,
        /// α-query expansion: search again with the photo's first N neighbours added to it
        /// (0: off). Distances shown stay the photo's own.
        #[arg(long, default_value_t = 0)]
        expand: usize,
        /// Weight exponent of α-query expansion.
        #[arg(long, default_value_t = 3.0)]
        alpha: f32,
        /// Geometric re-ranking: the first N neighbours re-scored by local features verified
        /// with RANSAC, each photo read as the model reads it (0: off).
        #[arg(long, default_value_t = 0)]
        geometric: usize,
        /// Weight of the verified matches against the similarity (with --geometric).
        #[arg(long, default_value_t = 0.3)]
        geometric_weight: f32,
        #[command(flatten)]
        search: SearchFlags,
        #[command(flatten)]
        at: LakeArgs,
    },
    /// A static HTML page: query photos with their top-20, the evaluation, training curves.
    Report {
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
        /// Query photos shown.
        #[arg(long, default_value_t = 40)]
        queries: usize,
        #[arg(long, default_value = "embeddings")]
        embeddings: String,
        #[arg(long, default_value = "submissions")]
        submissions: String,
        #[arg(long, default_value = "evaluate")]
        evaluations: String,
        #[command(flatten)]
        at: LakeArgs,
    },
    /// HTTP JSON API: GET /similar/{photo_id}?k=20, POST /similar (image body), GET
    /// /photos/{id}/thumbnail, GET /healthz, GET /models.
    Serve {
        /// Listen address; loopback unless told otherwise.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "embeddings")]
        table: String,
        /// Largest accepted upload, in bytes.
        #[arg(long, default_value_t = pipeline::serve::Limits::default().max_body)]
        max_body: usize,
        /// Largest accepted upload in pixels (width × height from its header, checked before
        /// decoding).
        #[arg(long, default_value_t = pipeline::serve::Limits::default().max_upload_pixels)]
        max_upload_pixels: u64,
        /// Seconds a request may take before it is answered 503.
        #[arg(long, default_value_t = pipeline::serve::Limits::default().timeout.as_secs_f64(), value_name = "SECONDS")]
        timeout: f64,
        /// Uploads decoded and embedded at once; one more is answered 503 with Retry-After.
        #[arg(long, default_value_t = pipeline::serve::Limits::default().uploads)]
        uploads: usize,
        /// Require `Authorization: Bearer <token>` on every route but /healthz; the file holds
        /// one `NAME TOKEN` per line (tokens of at least 16 characters).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        #[arg(long, value_parser = ["auto", "cpu", "cuda"], default_value = "auto")]
        device: String,
        #[command(flatten)]
        search: SearchFlags,
        #[command(flatten)]
        at: LakeArgs,
        /// Seconds between looks for a new version of the table (a nightly run's photos, a
        /// newly promoted model), served without a restart; 0: never.
        #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
        refresh: f64,
    },
    /// Generate the synthetic whale-fluke survey used by the demo and the tests.
    DemoLake {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = demo::DemoOptions::default().individuals)]
        individuals: usize,
        #[arg(long, default_value_t = demo::DemoOptions::default().photos_per)]
        photos_per: usize,
        #[arg(long, default_value_t = demo::DemoOptions::default().seed)]
        seed: u64,
        #[arg(long, default_value_t = demo::DemoOptions::default().width)]
        width: u32,
        #[arg(long, default_value_t = demo::DemoOptions::default().height)]
        height: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            let code = match e.downcast_ref::<Error>() {
                Some(Error::Config(_)) => 2,
                Some(Error::Cancelled(_)) => 130,
                _ => 1,
            };
            match e.downcast_ref::<Error>() {
                Some(Error::Config(d)) => eprint!("{d}"),
                _ => eprintln!("error: {}", said_once(&e)),
            }
            ExitCode::from(code)
        }
    }
}

/// An error and its causes, each said once: a cause whose message the text already holds (a
/// wrapper that quotes its source, as DataFusion's and ours do) is left out.
fn said_once(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        let msg = msg.trim();
        if msg.is_empty() || text.contains(msg) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(msg);
    }
    text
}

/// `--executor` and `--shards`, over `[pipeline] executor` and `shards` of the file.
fn ray_options(
    plan: &pipeline::config::Plan,
    executor: Option<&str>,
    shards: Option<u32>,
    sets: &[String],
    device_arg: Option<&str>,
    device: Option<pipeline::config::Device>,
) -> anyhow::Result<Option<pipeline::engine::shard::RayOptions>> {
    let chosen = executor.map(str::to_string).or_else(|| plan.executor.clone());
    let address = match chosen.as_deref() {
        None | Some("local") => return Ok(None),
        Some("ray") => None,
        Some(other) => match other.strip_prefix("ray=") {
            Some(a) if !a.is_empty() => Some(a.to_string()),
            _ => anyhow::bail!("executor `{other}`: write `local`, `ray` or `ray=HOST:PORT`"),
        },
    };
    let shards = shards.or(plan.shards).unwrap_or(4);
    if shards == 0 {
        anyhow::bail!("--shards 0: a stage needs at least one shard");
    }
    let mut worker_args = vec!["-q".to_string()];
    for s in sets {
        worker_args.extend(["--set".to_string(), s.clone()]);
    }
    if let Some(d) = device_arg {
        worker_args.extend(["--device".to_string(), d.to_string()]);
    }
    Ok(Some(pipeline::engine::shard::RayOptions { address, shards, retries: 2, worker_args, device }))
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Run { file, sets, until, force, resume, device, wait, quiet, executor, shards } => {
            let plan = pipeline::load(&file, &sets).await?;
            println!("pipeline {} ({}), lake {}", plan.name, file.display(), plan.lake);
            let device_arg = device.clone();
            let device = device.map(|d| d.parse::<pipeline::config::Device>()).transpose().map_err(anyhow::Error::msg)?;
            let executor = ray_options(&plan, executor.as_deref(), shards, &sets, device_arg.as_deref(), device)?;
            let report = dag::run(&plan, &RunOptions {
                    force,
                    until,
                    quiet,
                    resume,
                    device,
                    fail_after: None,
                    fail_fetch: Vec::new(),
                    executor,
                    wait: wait.map_or(pipeline::lake::lease::Wait::No, |s| pipeline::lake::lease::Wait::For(std::time::Duration::from_secs(s))),
                }).await?;
            print_report(&report);
            if let Ok(lake) = lake_of(&plan) {
                if let Ok((_, b)) = query::query(&lake, "SELECT count(*) AS n FROM rejects").await {
                    if let Some(n) = b.first().and_then(|b| b.column(0).as_any().downcast_ref::<arrow::array::Int64Array>()) {
                        println!("rejects: {} photo(s) could not be read; see: pipeline query \"SELECT photo_id, reason, detail FROM rejects\"", n.value(0));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Worker { file, stage, shard, run, sets, device, quiet, before } => {
            let plan = pipeline::load(&file, &sets).await?;
            let device = device.map(|d| d.parse::<pipeline::config::Device>()).transpose().map_err(anyhow::Error::msg)?;
            if before {
                pipeline::engine::shard::before(&plan, &stage, &run, device).await?;
                if !quiet {
                    println!("stage {stage}, run {run}: ready for its shards");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let shard: pipeline::lake::staging::Shard = shard.unwrap_or_default().parse().map_err(anyhow::Error::msg)?;
            let m = pipeline::engine::shard::work(&plan, &stage, shard, &run, device).await?;
            if !quiet {
                let rows: Vec<String> = m.tables.iter().map(|t| format!("{} {} rows", t.table, t.rows)).collect();
                println!(
                    "shard {shard} of stage {stage}, run {run}: staged {}{}; {}",
                    if rows.is_empty() { "nothing".into() } else { rows.join(", ") },
                    if m.fixups.is_empty() { String::new() } else { format!(", {} change(s) to rows already there", m.fixups.len()) },
                    m.meta.get("summary").and_then(|s| s.as_str()).unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Commit { file, stage, run, shards, sets } => {
            let plan = pipeline::load(&file, &sets).await?;
            let outcome = pipeline::engine::shard::commit(&plan, &stage, &run, shards).await?;
            let versions: Vec<String> = outcome.written.iter().map(|(t, v)| format!("{t} v{v}")).collect();
            println!("stage {stage} of run {run} committed: {}; {}", versions.join(", "), outcome.summary);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate { file, sets } => {
            let plan = pipeline::load(&file, &sets).await?;
            println!("{}: ok, {} stage(s): {}", file.display(), plan.stages.len(), names(&plan));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Graph { file, dot } => {
            let plan = pipeline::load(&file, &[]).await?;
            print!("{}", if dot { graph_dot(&plan) } else { graph_text(&plan) });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Runs { id, last, at, format } => {
            let lake = at.open().await?;
            if lake.open(dag::ledger::TABLE).await?.is_none() {
                anyhow::bail!("lake {} has no runs yet", lake.root());
            }
            // Lakes from before the per-stage photo counts have no such columns until their next run.
            let counted = lake.open(dag::ledger::TABLE).await?.is_some_and(|ds| ds.schema().field("photos_new").is_some());
            let nulls = ", CAST(NULL AS BIGINT) AS photos_new, CAST(NULL AS BIGINT) AS photos_changed, CAST(NULL AS BIGINT) AS photos_deleted, \
                         CAST(NULL AS BIGINT) AS photos_rejected, CAST(NULL AS VARCHAR) AS summary";
            let extra = if counted { "" } else { nulls };
            let seconds = "round(extract(epoch FROM max(ended_at)) - extract(epoch FROM min(started_at)), 1)";
            let count = |s: &str| format!("sum(CASE WHEN status = '{s}' THEN 1 ELSE 0 END)");
            let sql = match &id {
                None => format!(
                    "SELECT run_id, pipeline, min(started_at) AS started, max(ended_at) AS ended, {seconds} AS seconds, \
                     CASE WHEN {f} > 0 THEN 'failed' WHEN {c} > 0 THEN 'cancelled' ELSE 'succeeded' END AS status, \
                     {s} AS stages_run, {u} AS up_to_date, sum(rows_out) AS rows_out, \
                     sum(CASE WHEN kind = 'ingest' THEN photos_new END) AS photos_new, sum(CASE WHEN kind = 'ingest' THEN photos_changed END) AS photos_changed, \
                     sum(CASE WHEN kind = 'ingest' THEN photos_deleted END) AS photos_deleted, sum(CASE WHEN kind = 'ingest' THEN photos_rejected END) AS photos_rejected \
                     FROM (SELECT *{extra} FROM runs WHERE run_id IN (SELECT run_id FROM runs GROUP BY run_id ORDER BY max(ended_at) DESC LIMIT {last})) \
                     GROUP BY run_id, pipeline ORDER BY started",
                    f = count("failed"),
                    c = count("cancelled"),
                    s = count("succeeded"),
                    u = count("up_to_date"),
                ),
                Some(id) => {
                    let q = id.replace('\'', "''");
                    let (_, b) = query::query(&lake, &format!("SELECT DISTINCT run_id FROM runs WHERE starts_with(run_id, '{q}')")).await?;
                    let ids: Vec<String> =
                        b.iter().flat_map(|b| b.column(0).as_string::<i32>().iter().flatten().map(str::to_string).collect::<Vec<_>>()).collect();
                    let run = match ids.as_slice() {
                        [one] => one.clone(),
                        [] => anyhow::bail!("no run `{id}` in {} (see `pipeline runs`)", lake.root()),
                        many => anyhow::bail!("`{id}` begins {} runs: {}", many.len(), many.join(", ")),
                    };
                    format!(
                        "SELECT stage, kind, status, started_at, round(extract(epoch FROM ended_at) - extract(epoch FROM started_at), 1) AS seconds, \
                         rows_in, rows_out, photos_new, photos_changed, photos_deleted, photos_rejected, summary, tables_written, error \
                         FROM (SELECT *{extra} FROM runs) WHERE run_id = '{run}' ORDER BY started_at, stage"
                    )
                }
            };
            print_query(&lake, &sql, format).await
        }
        Cmd::Schedule { file, cron, tz, watch, poll, debounce, retries, retry_after, max_runs, sets, device } => {
            use pipeline::schedule::{Options, Trigger};
            let secs = |name: &str, v: f64| -> anyhow::Result<std::time::Duration> {
                if !(v >= 0.0 && v.is_finite()) {
                    anyhow::bail!("--{name} must be 0 or more seconds, not {v}");
                }
                Ok(std::time::Duration::from_secs_f64(v))
            };
            let trigger = match (cron, watch) {
                (Some(c), false) => Trigger::cron(&c, tz.as_deref())?,
                (None, true) => {
                    let poll = secs("poll", poll)?;
                    if poll.is_zero() {
                        anyhow::bail!("--poll must be more than 0 seconds");
                    }
                    Trigger::Watch { poll, debounce: secs("debounce", debounce)? }
                }
                _ => anyhow::bail!("give --cron PATTERN or --watch"),
            };
            let device = device.map(|d| d.parse::<pipeline::config::Device>()).transpose().map_err(anyhow::Error::msg)?;
            // Without a terminal (cron, systemd) each stage logs a line when it starts and ends.
            let run = RunOptions { quiet: false, device, ..Default::default() };
            let opts = Options { trigger, retries, retry_after: secs("retry-after", retry_after)?, max_runs };
            let tally = pipeline::schedule::schedule(file, sets, run, opts).await?;
            println!(
                "runs: {} ({} succeeded, {} failed, {} retries); ticks skipped: {} while a run was going, {} while the lake was held",
                tally.runs, tally.succeeded, tally.failed, tally.retries, tally.skipped_running, tally.skipped_busy
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Models { at, format } => {
            let lake = at.open().await?;
            if lake.open(pipeline::lake::models::TABLE).await?.is_none() {
                anyhow::bail!("lake {} has no models yet", lake.root());
            }
            let current = pipeline::lake::models::current_all(&lake).await?;
            let ids = current.values().map(|c| pipeline::lake::tables::sql_string(&c.model_id)).collect::<Vec<_>>();
            let is_current = if ids.is_empty() { "false".to_string() } else { format!("model_id IN ({})", ids.join(", ")) };
            let sql = format!(
                "SELECT model_id, kind, stage, backbone, embedding_dim, input_size, best_epoch, round(best_map_at_20, 4) AS best_map_at_20, \
                 CAST(created_at AS VARCHAR) AS created_at, CASE WHEN {is_current} THEN 'current' ELSE '' END AS current \
                 FROM models ORDER BY created_at"
            );
            print_query(&lake, &sql, format).await
        }
        Cmd::Digest { at } => {
            let lake = at.open().await?;
            for line in pipeline::digest::digest(&lake).await? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Decide { photo_id, decision, individual, who, at } => {
            use pipeline::lake::decisions;
            let lake = at.open().await?;
            let who = who
                .or_else(|| std::env::var("USER").ok())
                .or_else(|| std::env::var("LOGNAME").ok())
                .filter(|w| !w.trim().is_empty())
                .unwrap_or_else(|| "cli".to_string());
            let d = decisions::Decision::new(&photo_id, decisions::Kind::parse(&decision)?, individual.as_deref(), &who)?;
            if !decisions::known_photo(&lake, &photo_id).await? {
                anyhow::bail!("no photo `{photo_id}` in table `images` of {}", lake.root());
            }
            decisions::append(&lake, std::slice::from_ref(&d)).await?;
            println!(
                "decided: {photo_id} {}{} (by {}); the next run's ingest applies it",
                d.kind.as_str(),
                d.individual_id.as_deref().map(|i| format!(" {i}")).unwrap_or_default(),
                d.who
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Promote { model_id, at, wait } => {
            use pipeline::lake::models;
            let lake = at.open().await?;
            if models::name_of(&model_id).is_none() || !models::registered(&lake, &model_id).await? {
                anyhow::bail!("no model `{model_id}` in {} (see `pipeline models`)", lake.root());
            }
            if !models::present(&lake, &model_id).await? {
                anyhow::bail!("model `{model_id}` has lost its weights ({}/models/{model_id}/{}): train it again", lake.root(), models::WEIGHTS);
            }
            let ttl = dag::LEASE_TTL;
            let wait = wait.map_or(pipeline::lake::lease::Wait::No, |s| pipeline::lake::lease::Wait::For(std::time::Duration::from_secs(s)));
            let holder = pipeline::lake::lease::Holder::new(format!("pipeline promote {model_id}"), ttl);
            let lease = pipeline::lake::lease::Lease::acquire(lake.root(), lake.options(), holder, ttl, wait).await?;
            let result = async {
                let name = models::name_of(&model_id).unwrap_or_default().to_string();
                let before = models::current(&lake, &name).await?;
                if before.as_ref().is_some_and(|c| c.model_id == model_id) {
                    println!("model {model_id} is already current for `{name}`");
                    return Ok::<_, anyhow::Error>(());
                }
                let map = models::best_map(&lake, &model_id).await?;
                let row = models::promotion_row(&model_id, "named", map, before.as_ref().map(|c| c.model_id.as_str()), "cli")?;
                let schema = lake.catalog().get(models::PROMOTIONS).unwrap_or_else(|| Catalog::builtin(models::PROMOTIONS));
                let mut sink = lake.sink(models::PROMOTIONS, schema, pipeline::lake::WriteKind::Append);
                sink.send(row).await?;
                sink.finish().await?;
                match before {
                    Some(b) => println!("model {model_id} is now current for `{name}` (was {})", b.model_id),
                    None => println!("model {model_id} is now current for `{name}`"),
                }
                Ok(())
            }
            .await;
            lease.release().await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vacuum { keep_days, wait, at } => {
            let lake = at.open().await?;
            if !(keep_days >= 0.0) {
                anyhow::bail!("--keep-days must be 0 or more, not {keep_days}");
            }
            let ttl = dag::LEASE_TTL;
            let wait = wait.map_or(pipeline::lake::lease::Wait::No, |s| pipeline::lake::lease::Wait::For(std::time::Duration::from_secs(s)));
            let holder = pipeline::lake::lease::Holder::new("pipeline vacuum", ttl);
            let lease = pipeline::lake::lease::Lease::acquire(lake.root(), lake.options(), holder, ttl, wait).await?;
            let keep = chrono::Duration::milliseconds((keep_days * 86_400_000.0) as i64);
            let done = lake.vacuum(keep).await;
            lease.release().await;
            println!("{:<16} {:>10} {:>10} {:>9} {:>12} {:>5} {:>8}", "table", "fragments", "compacted", "versions", "bytes freed", "tags", "removed");
            for v in done? {
                println!(
                    "{:<16} {:>4} -> {:<3} {:>10} {:>9} {:>12} {:>5} {:>8}",
                    v.table, v.fragments_before, v.fragments_after, v.compacted, v.versions_removed, v.bytes_removed, v.tags_dropped, v.rows_removed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Query { sql, at, format, out, as_of, memory_limit } => {
            let lake = at.open().await?;
            let (schema, batches) = query::query_limited(&lake, &sql, as_of.as_deref(), Some(memory_limit)).await?;
            match out {
                Some(p) => {
                    let mut f = std::fs::File::create(&p).with_context(|| format!("cannot create {}", p.display()))?;
                    query::write(format, &schema, &batches, &mut f)?;
                }
                None => {
                    use std::io::IsTerminal;
                    if format == Format::Parquet && std::io::stdout().is_terminal() {
                        anyhow::bail!("parquet is binary: pass --out FILE or redirect stdout");
                    }
                    let stdout = std::io::stdout();
                    let mut lock = stdout.lock();
                    query::write(format, &schema, &batches, &mut lock)?;
                    lock.flush()?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Similar { photo, k, format, table, exact, expand, alpha, geometric, geometric_weight, search, at } => {
            let lake = at.open().await?;
            let ds = lake.open(&table).await?.ok_or_else(|| anyhow::anyhow!("table `{table}` does not exist in {}", lake.root()))?;
            // One question: Lance's own scan where there is no index (reading the table into
            // memory first would cost as much).
            let params = pipeline::vector::SearchParams { exact, ..pipeline::vector::SearchParams::for_table(&ds, &search.overrides()).await? };
            if !(0.0..=100.0).contains(&alpha) {
                anyhow::bail!("--alpha {alpha}: must be 0..100");
            }
            let x = pipeline::vector::Expansion { k: expand, alpha };
            if !(0.0..=100.0).contains(&geometric_weight) {
                anyhow::bail!("--geometric-weight {geometric_weight}: must be 0..100");
            }
            let geo = answer::local::GeoOptions { k: geometric, weight: geometric_weight, ..Default::default() };
            let ds = std::sync::Arc::new(ds);
            let src = pipeline::vector::Source::Table(ds.clone(), params);
            let found = match answer::similar_to_id(&ds, &src, &photo, k, x).await? {
                Some(mut f) => {
                    answer::rerank_geometric(&lake, &mut f, None, geo).await?;
                    f
                }
                None => {
                    let looks_like_file = photo.contains("://") || std::path::Path::new(&photo).exists();
                    if !looks_like_file {
                        anyhow::bail!("`{photo}` is neither a photo of `{table}` (photo id or URI) nor a file");
                    }
                    let bytes = answer::read_photo(&photo, lake.options()).await?;
                    let device = pipeline::model::train::pick_device("auto").map_err(anyhow::Error::msg)?;
                    let embedder = answer::Embedder::for_table(&lake, &table, device).await?;
                    let view = (geo.k > 0).then_some(geo.side);
                    let (v, seen) = embedder.embed_bytes_viewing(bytes, Default::default(), view).await?;
                    let mut f = answer::similar_to_vector(&ds, &src, &photo, &v, k, x).await?;
                    if let Some(px) = seen {
                        answer::rerank_geometric(&lake, &mut f, Some(px), geo).await?;
                    }
                    f
                }
            };
            print_similar(&found, format)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { out, queries, embeddings, submissions, evaluations, at } => {
            let lake = at.open().await?;
            let title = format!("{} — {}", at.pipeline.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default(), lake.root());
            let opts = answer::ReportOptions { embeddings, submissions, evaluations, queries, thumb_side: 160 };
            let html = answer::report(&lake, &title, &opts).await?;
            std::fs::write(&out, html).with_context(|| format!("cannot write {}", out.display()))?;
            println!("report: {}", std::fs::canonicalize(&out).unwrap_or(out).display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve { addr, table, max_body, max_upload_pixels, timeout, uploads, token_file, device, search, at, refresh } => {
            if !(timeout > 0.0 && timeout.is_finite()) || uploads == 0 {
                anyhow::bail!("--timeout must be more than 0 seconds and --uploads at least 1");
            }
            let tokens = token_file.as_deref().map(pipeline::serve::Tokens::load).transpose()?.map(std::sync::Arc::new);
            let limits = pipeline::serve::Limits {
                max_body,
                max_upload_pixels,
                timeout: std::time::Duration::from_secs_f64(timeout),
                uploads,
                tokens,
                ..Default::default()
            };
            let lake = at.open().await?;
            let device = pipeline::model::train::pick_device(&device).map_err(anyhow::Error::msg)?;
            let service = answer::Service::open(lake, &table, device, search.overrides()).await?;
            if !(refresh >= 0.0 && refresh.is_finite()) {
                anyhow::bail!("--refresh must be 0 (never) or more seconds, not {refresh}");
            }
            let refresh = (refresh > 0.0).then(|| std::time::Duration::from_secs_f64(refresh));
            pipeline::serve::serve(service, addr, limits, refresh).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::DemoLake { out, individuals, photos_per, seed, width, height } => {
            let opts = demo::DemoOptions { out: out.clone(), individuals, photos_per, seed, width, height };
            let s = tokio::task::spawn_blocking(move || demo::generate(&opts)).await??;
            println!(
                "demo lake in {}: {} photos of {} individuals ({} planted defects) in {:.1}s",
                out.display(),
                s.photos,
                s.individuals,
                s.defects,
                s.seconds
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Vector-index search settings; unset ones are the ones measured for the table's kind of
/// index (`benches/vector.rs`).
#[derive(Debug, Clone, clap::Args)]
struct SearchFlags {
    /// IVF partitions probed.
    #[arg(long)]
    nprobes: Option<usize>,
    /// Re-rank refine × k index candidates with the exact vectors (0: none).
    #[arg(long)]
    refine: Option<u32>,
    /// HNSW search list size.
    #[arg(long)]
    ef: Option<usize>,
}

impl SearchFlags {
    fn overrides(&self) -> pipeline::vector::SearchOverrides {
        pipeline::vector::SearchOverrides { nprobes: self.nprobes, refine: self.refine, ef: self.ef }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SimilarFormat {
    Table,
    Json,
    Csv,
}

fn print_similar(f: &answer::Similar, format: SimilarFormat) -> anyhow::Result<()> {
    match format {
        SimilarFormat::Json => println!("{}", serde_json::to_string_pretty(f)?),
        SimilarFormat::Csv => {
            let mut w = csv::Writer::from_writer(std::io::stdout());
            let geo = f.geometric.is_some();
            let mut head = vec!["rank", "photo_id", "individual_id", "similarity", "distance", "uri"];
            if geo {
                head.push("inliers");
            }
            w.write_record(head)?;
            for n in &f.neighbours {
                let mut row = vec![
                    n.rank.to_string(),
                    n.photo_id.clone(),
                    n.individual_id.clone().unwrap_or_default(),
                    format!("{:.4}", n.similarity),
                    format!("{:.4}", n.distance),
                    n.uri.clone(),
                ];
                if geo {
                    row.push(n.inliers.map(|i| i.to_string()).unwrap_or_default());
                }
                w.write_record(row)?;
            }
            w.flush()?;
        }
        SimilarFormat::Table => {
            println!(
                "{} nearest to {}{} (model {}):",
                f.neighbours.len(),
                f.query,
                if f.in_collection { "" } else { " (new photo, embedded now)" },
                f.model_id
            );
            if let Some(g) = &f.geometric {
                println!("re-ranked: {g}");
            }
            println!("{:>4}  {:<28} {:<14} {:>10} {:>7}  uri", "rank", "photo_id", "individual", "similarity", "inliers");
            for n in &f.neighbours {
                println!(
                    "{:>4}  {:<28} {:<14} {:>10.4} {:>7}  {}",
                    n.rank,
                    n.photo_id,
                    n.individual_id.as_deref().unwrap_or("-"),
                    n.similarity,
                    n.inliers.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    n.uri
                );
            }
        }
    }
    Ok(())
}

fn names(plan: &Plan) -> String {
    plan.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(" -> ")
}

fn lake_of(plan: &Plan) -> pipeline::Result<Lake> {
    Ok(Lake::new(plan.lake.clone(), plan.storage_options.clone(), plan.catalog.clone()))
}

/// Which lake a reading command works on.
#[derive(Debug, clap::Args)]
struct LakeArgs {
    /// Lake location; default: $PIPELINE_LAKE, else the lake of --pipeline.
    #[arg(long, env = "PIPELINE_LAKE")]
    lake: Option<String>,
    /// Pipeline file whose lake to use.
    #[arg(long, default_value = "pipelines/ingest-to-submission.toml")]
    pipeline: PathBuf,
}

impl LakeArgs {
    async fn open(&self) -> anyhow::Result<Lake> {
        open_lake(self.lake.as_deref(), &self.pipeline).await
    }
}

async fn open_lake(lake: Option<&str>, pipeline: &Path) -> anyhow::Result<Lake> {
    match lake {
        Some(l) => {
            let cwd = std::env::current_dir()?;
            Ok(Lake::new(store::resolve(l, &cwd)?, Default::default(), Catalog::load(None)?))
        }
        None if pipeline.exists() => Ok(lake_of(&pipeline::load(pipeline, &[]).await?)?),
        None => anyhow::bail!("no lake given: pass --lake URI, set PIPELINE_LAKE, or --pipeline FILE ({} not found)", pipeline.display()),
    }
}

/// Runs read-only `sql` on `lake` and prints the result to stdout in `format`.
async fn print_query(lake: &Lake, sql: &str, format: Format) -> anyhow::Result<ExitCode> {
    let (schema, batches) = query::query(lake, sql).await?;
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    query::write(format, &schema, &batches, &mut lock)?;
    lock.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &dag::RunReport) {
    println!("run {}", r.run_id);
    for s in &r.stages {
        let status = s.status.as_str().replace('_', " ");
        println!(
            "  {:<12} {:<11} {:>7} in {:>7} out {:>8.1}s  {}",
            s.stage, status, s.rows_in, s.rows_out, s.seconds, s.summary
        );
    }
}

fn graph_text(plan: &Plan) -> String {
    let mut out = format!("pipeline {} (lake {})\n", plan.name, plan.lake);
    for s in &plan.stages {
        // `-> c` waits for this stage's commit; `~> c (table)` streams the table as it is written.
        let consumers: Vec<String> = plan
            .stages
            .iter()
            .filter(|c| c.inputs.contains(&s.name))
            .map(|c| match c.streamed.iter().find(|(p, _)| p == &s.name) {
                Some((_, t)) => format!("~{} ({t} streamed)", c.name),
                None => c.name.clone(),
            })
            .collect();
        out.push_str(&format!("  {} [{}] writes {}", s.name, s.kind.describe(), s.writes.join(", ")));
        if !consumers.is_empty() {
            out.push_str(&format!(" -> {}", consumers.join(", ")));
        }
        out.push('\n');
    }
    out
}

fn graph_dot(plan: &Plan) -> String {
    let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, style=rounded];\n", q(&plan.name));
    for s in &plan.stages {
        out.push_str(&format!(
            "  \"{}\" [label=\"{}\\n{}\\n→ {}\"];\n",
            q(&s.name),
            q(&s.name),
            q(&s.kind.describe()),
            q(&s.writes.join(", "))
        ));
        for i in &s.inputs {
            // A streamed edge: dashed, labelled with the table that flows while it is written.
            match s.streamed.iter().find(|(p, _)| p == i) {
                Some((_, t)) => out.push_str(&format!("  \"{}\" -> \"{}\" [style=dashed, label=\"{} (streamed)\"];\n", q(i), q(&s.name), q(t))),
                None => out.push_str(&format!("  \"{}\" -> \"{}\";\n", q(i), q(&s.name))),
            }
        }
    }
    out.push_str("}\n");
    out
}
