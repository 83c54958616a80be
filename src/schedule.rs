//! `pipeline schedule`: runs a pipeline for as long as it lives, on a cron schedule
//! (`--cron "0 2 * * *" --tz Europe/Paris`) or when the objects under its sources change
//! (`--watch`: the ingest listing polled, debounced).
//!
//! - One run at a time: a tick that comes while this scheduler's run is still going is skipped,
//!   and so is one while another process holds the lake's lease (a manual run, a second
//!   scheduler); both are logged, never queued.
//! - A failed run is retried with exponential backoff and jitter (`--retries`, `--retry-after`);
//!   an invalid pipeline file is not retried (it is read again at the next tick, so an edit
//!   takes effect without a restart).
//! - Ctrl-C or SIGTERM stops it; a run in progress is cancelled the way `pipeline run` is
//!   (nothing half-written is committed, the lease is released).
//!
//! Every event is one timestamped line on stdout, for a journal or a log file.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lake::{Error, Result};

/// When runs start.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// At each occurrence of a cron pattern (5 fields, or 6 with seconds first), in a zone.
    Cron { cron: croner::Cron, zone: Zone },
    /// When the sources' listing differs from what the last run saw, once it has stayed the same
    /// for `debounce` (photos still being copied are not ingested half-way).
    Watch { poll: Duration, debounce: Duration },
}

/// The time zone a cron pattern is read in.
#[derive(Debug, Clone, Copy)]
pub enum Zone {
    Local,
    Named(chrono_tz::Tz),
}

impl Trigger {
    /// `pattern` with `tz` (an IANA name; None: the machine's local time).
    pub fn cron(pattern: &str, tz: Option<&str>) -> Result<Trigger> {
        let cron: croner::Cron = pattern.parse().map_err(|e| Error::Other(format!("--cron \"{pattern}\": {e}")))?;
        let zone = match tz {
            None => Zone::Local,
            Some(name) => Zone::Named(
                name.parse::<chrono_tz::Tz>()
                    .map_err(|e| Error::Other(format!("--tz {name}: not a time zone of the IANA database (e.g. Europe/Paris, UTC): {e}")))?,
            ),
        };
        // A pattern that never fires (30 February) is an error now, not a silent scheduler.
        let t = Trigger::Cron { cron, zone };
        t.next_after(Utc::now())?;
        Ok(t)
    }

    /// The first occurrence strictly after `now`.
    fn next_after(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let Trigger::Cron { cron, zone } = self else { return Ok(now) };
        let err = |e: croner::errors::CronError| Error::Other(format!("cron pattern `{}`: {e}", cron.pattern));
        Ok(match zone {
            Zone::Local => cron.find_next_occurrence(&now.with_timezone(&chrono::Local), false).map_err(err)?.with_timezone(&Utc),
            Zone::Named(tz) => cron.find_next_occurrence(&now.with_timezone(tz), false).map_err(err)?.with_timezone(&Utc),
        })
    }

    fn describe(&self) -> String {
        match self {
            Trigger::Cron { cron, zone: Zone::Local } => format!("on cron \"{}\" (local time)", cron.pattern),
            Trigger::Cron { cron, zone: Zone::Named(tz) } => format!("on cron \"{}\" ({tz})", cron.pattern),
            Trigger::Watch { poll, debounce } => {
                format!("when its sources change (listed every {}s, run once unchanged for {}s)", poll.as_secs_f64(), debounce.as_secs_f64())
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub trigger: Trigger,
    /// Attempts after a failed run, each after twice the wait of the one before.
    pub retries: u32,
    /// The wait before the first retry.
    pub retry_after: Duration,
    /// Stop once this many runs have ended, succeeded or failed (None: run until stopped).
    pub max_runs: Option<u64>,
}

/// How one run ended, as the scheduler sees it.
#[derive(Debug)]
pub enum RunEnd {
    Succeeded(String),
    /// The lake's lease is held elsewhere: the tick is skipped, not retried.
    Busy(String),
    Failed(Error),
}

/// What one attempt's runner returns.
pub fn classify(r: Result<crate::dag::RunReport>) -> RunEnd {
    match r {
        Ok(report) => {
            let ran = report.stages.iter().filter(|s| s.status == crate::dag::ledger::Status::Succeeded).count();
            let up = report.stages.len() - ran;
            RunEnd::Succeeded(format!("run {} succeeded: {ran} stage(s) ran, {up} up to date", report.run_id))
        }
        Err(e @ Error::Busy { .. }) => RunEnd::Busy(e.to_string()),
        Err(e) => RunEnd::Failed(e),
    }
}

/// What happened, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Runs started (a tick skipped because the lake was held is not one).
    pub runs: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Ticks skipped because this scheduler's previous run was still going.
    pub skipped_running: u64,
    /// Ticks skipped because another process held the lake.
    pub skipped_busy: u64,
    pub retries: u64,
}

/// Prints one timestamped line (stdout: the scheduler's log).
pub fn log(line: &str) {
    println!("{} {line}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
}

/// One pipeline run, started afresh for each attempt.
pub type Attempt = std::sync::Arc<dyn Fn() -> futures::future::BoxFuture<'static, RunEnd> + Send + Sync>;

/// Whether a failed run is worth trying again soon: not a pipeline file that does not compile,
/// not a cancelled run.
fn retryable(e: &Error) -> bool {
    !matches!(e, Error::Config(_) | Error::Cancelled(_))
}

/// The attempts of one tick: the run, and its retries after failures.
async fn attempts(attempt: Attempt, retries: u32, base: Duration) -> (RunEnd, u64) {
    let mut n = 0u64;
    loop {
        match attempt().await {
            RunEnd::Failed(e) if (n as u32) < retries && retryable(&e) => {
                let wait = base.mul_f64(2f64.powi(n as i32) * (0.75 + 0.5 * rand::random::<f64>()));
                log(&format!("run failed: {e}; retry {}/{retries} in {:.0}s", n + 1, wait.as_secs_f64()));
                n += 1;
                tokio::time::sleep(wait).await;
            }
            other => return (other, n),
        }
    }
}

fn report(end: &RunEnd, tally: &mut Tally) {
    match end {
        RunEnd::Succeeded(s) => {
            tally.succeeded += 1;
            log(s);
        }
        RunEnd::Busy(s) => {
            // Not a run: the tick is skipped.
            tally.runs -= 1;
            tally.skipped_busy += 1;
            log(&format!("tick skipped: {s}"));
        }
        RunEnd::Failed(e) => {
            tally.failed += 1;
            log(&format!("run failed: {e}"));
        }
    }
}

/// Runs `attempt` (one pipeline run) at each tick of `opts.trigger` until `stop` resolves or
/// `max_runs` runs have ended. For [`Trigger::Watch`], `changed(false)` is called every poll and
/// says what differs in the sources since the last run (None: nothing), and `changed(true)` after
/// each run, to take the new baseline.
pub async fn drive<C, CF, S>(opts: &Options, attempt: Attempt, mut changed: C, stop: S) -> Tally
where
    C: FnMut(bool) -> CF,
    CF: Future<Output = Result<Option<String>>>,
    S: Future<Output = ()>,
{
    let mut tally = Tally::default();
    tokio::pin!(stop);
    let mut running: Option<tokio::task::JoinHandle<(RunEnd, u64)>> = None;
    // Watch: the listing that differs, and since when it has stayed that way.
    let mut pending: Option<(String, tokio::time::Instant)> = None;
    // Runs that ran: a tick skipped because the lake was held does not count.
    let done_runs = |t: &Tally| t.succeeded + t.failed;
    // The cron occurrence slept for last: the next one is after it even if the wall clock,
    // read after a wake-up on the monotonic one, is a hair behind it.
    let mut last_tick: Option<DateTime<Utc>> = None;
    loop {
        if opts.max_runs.is_some_and(|m| done_runs(&tally) >= m) && running.is_none() {
            log(&format!("stopping after {} run(s)", done_runs(&tally)));
            return tally;
        }
        let mut this_tick = None;
        let wake = match &opts.trigger {
            Trigger::Cron { .. } => match opts.trigger.next_after(last_tick.map_or(Utc::now(), |t| t.max(Utc::now()))) {
                Ok(next) => {
                    this_tick = Some(next);
                    tokio::time::Instant::now() + (next - Utc::now()).to_std().unwrap_or_default()
                }
                Err(e) => {
                    log(&format!("stopping: {e}"));
                    return tally;
                }
            },
            Trigger::Watch { poll, .. } => tokio::time::Instant::now() + *poll,
        };
        let finished = async {
            match running.as_mut() {
                Some(h) => h.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => {
                if let Some(h) = running.take() {
                    log("stopping: waiting for the run in progress to cancel");
                    if let Ok((end, _)) = h.await {
                        report(&end, &mut tally);
                    }
                }
                log("stopped");
                return tally;
            }
            done = finished => {
                running = None;
                if let Some((end, retries)) = done {
                    tally.retries += retries;
                    report(&end, &mut tally);
                }
                if matches!(opts.trigger, Trigger::Watch { .. }) {
                    pending = None;
                    if let Err(e) = changed(true).await {
                        log(&format!("cannot list the sources after the run: {e}"));
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(wake) => last_tick = this_tick,
        }
        // A tick.
        if running.is_some() {
            if matches!(opts.trigger, Trigger::Cron { .. }) {
                tally.skipped_running += 1;
                log("tick skipped: the previous run is still going");
            }
            continue;
        }
        if let Trigger::Watch { debounce, .. } = &opts.trigger {
            match changed(false).await {
                Ok(None) => {
                    pending = None;
                    continue;
                }
                Ok(Some(seen_now)) => {
                    let settled = match &pending {
                        Some((seen, since)) if *seen == seen_now => since.elapsed() >= *debounce,
                        _ if debounce.is_zero() => true,
                        _ => {
                            log(&format!("the sources changed; running once they stay unchanged for {}s", debounce.as_secs_f64()));
                            pending = Some((seen_now, tokio::time::Instant::now()));
                            false
                        }
                    };
                    if !settled {
                        continue;
                    }
                }
                Err(e) => {
                    log(&format!("cannot list the sources: {e}"));
                    continue;
                }
            }
        }
        tally.runs += 1;
        log("tick: starting a run");
        running = Some(tokio::spawn(attempts(attempt.clone(), opts.retries, opts.retry_after)));
    }
}

/// `pipeline schedule FILE`: [`drive`] over `pipeline run FILE`, until Ctrl-C or SIGTERM.
pub async fn schedule(file: PathBuf, sets: Vec<String>, run: crate::dag::RunOptions, opts: Options) -> Result<Tally> {
    // A pipeline file that does not compile is refused now; later ticks read it again.
    let plan = crate::load(&file, &sets).await?;
    log(&format!("scheduling pipeline {} ({}) {}", plan.name, file.display(), opts.trigger.describe()));
    if let Trigger::Cron { .. } = &opts.trigger {
        log(&format!("next run at {}", opts.trigger.next_after(Utc::now())?.format("%Y-%m-%dT%H:%M:%SZ")));
    }
    let attempt: Attempt = {
        let (file, sets, run) = (file.clone(), sets.clone(), run.clone());
        std::sync::Arc::new(move || {
            let (file, sets, run) = (file.clone(), sets.clone(), run.clone());
            Box::pin(async move {
                let plan = match crate::load(&file, &sets).await {
                    Ok(p) => p,
                    Err(e) => return RunEnd::Failed(e),
                };
                classify(crate::dag::run(&plan, &run).await)
            })
        })
    };
    // Watch: the listing the last run saw (at first, what the ledger recorded).
    let baseline = std::sync::Arc::new(std::sync::Mutex::new(crate::dag::recorded_fingerprints(&plan).await?));
    let changed = |after_run: bool| {
        let (file, sets, baseline) = (file.clone(), sets.clone(), baseline.clone());
        async move {
            let plan = crate::load(&file, &sets).await?;
            let now = crate::dag::source_fingerprints(&plan).await?;
            let mut base = baseline.lock().map_err(|_| Error::Other("watch state poisoned".into()))?;
            if after_run {
                *base = now;
                return Ok(None);
            }
            Ok((now != *base).then(|| now.values().cloned().collect::<Vec<_>>().join(",")))
        }
    };
    Ok(drive(&opts, attempt, changed, stop_signal()).await)
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn every_second(max_runs: u64) -> Options {
        Options { trigger: Trigger::cron("* * * * * *", Some("UTC")).unwrap(), retries: 0, retry_after: Duration::from_millis(10), max_runs: Some(max_runs) }
    }

    fn no_watch(_: bool) -> std::future::Ready<Result<Option<String>>> {
        std::future::ready(Ok(None))
    }

    #[tokio::test]
    async fn a_run_longer_than_a_tick_skips_the_ticks_it_overlaps() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let attempt: Attempt = Arc::new(move || {
            let c = c.clone();
            Box::pin(async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2300)).await;
                RunEnd::Succeeded("slow run".into())
            })
        });
        let t = drive(&every_second(2), attempt, no_watch, std::future::pending()).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!((t.runs, t.succeeded), (2, 2));
        // Each 2.3 s run spans at least one tick of a one-second cron.
        assert!(t.skipped_running >= 2, "{t:?}");
    }

    #[tokio::test]
    async fn a_failed_run_is_retried_and_a_held_lake_is_skipped() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let attempt: Attempt = Arc::new(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match n {
                    0 => RunEnd::Busy("lake held by run x".into()),
                    1 => RunEnd::Failed(Error::Other("S3 timed out".into())),
                    _ => RunEnd::Succeeded("ok".into()),
                }
            })
        });
        let mut o = every_second(2);
        o.retries = 2;
        let t = drive(&o, attempt, no_watch, std::future::pending()).await;
        // Tick 1: the lake is held (skipped, not counted); tick 2: fails, retried, succeeds;
        // tick 3: succeeds.
        assert_eq!(t, Tally { runs: 2, succeeded: 2, failed: 0, skipped_running: 0, skipped_busy: 1, retries: 1 });
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_invalid_pipeline_is_not_retried_and_stop_ends_it() {
        let attempt: Attempt = Arc::new(|| Box::pin(async { RunEnd::Failed(Error::Config(Default::default())) }));
        let mut o = every_second(1);
        o.retries = 5;
        let t = drive(&o, attempt, no_watch, std::future::pending()).await;
        assert_eq!((t.failed, t.retries), (1, 0));
        let never: Attempt = Arc::new(|| Box::pin(async { RunEnd::Succeeded(String::new()) }));
        let t = drive(&every_second(100), never, no_watch, tokio::time::sleep(Duration::from_millis(1500))).await;
        assert!(t.runs <= 2, "{t:?}");
    }

    #[tokio::test]
    async fn watch_runs_once_a_change_has_settled() {
        // The listing changes at poll 1 and stays; with a debounce of 2 polls the run starts
        // on the third poll of the same listing, and a run resets the baseline.
        let polls = Arc::new(AtomicU64::new(0));
        let p = polls.clone();
        let changed = move |after: bool| {
            let n = if after { u64::MAX } else { p.fetch_add(1, Ordering::SeqCst) };
            std::future::ready(Ok(if after || n == 0 { None } else { Some("listing-2".to_string()) }))
        };
        let o = Options {
            trigger: Trigger::Watch { poll: Duration::from_millis(50), debounce: Duration::from_millis(120) },
            retries: 0,
            retry_after: Duration::from_millis(10),
            max_runs: Some(1),
        };
        let attempt: Attempt = Arc::new(|| Box::pin(async { RunEnd::Succeeded("ran".into()) }));
        let t = drive(&o, attempt, changed, std::future::pending()).await;
        assert_eq!(t.succeeded, 1);
        assert!(polls.load(Ordering::SeqCst) >= 4, "ran before the change settled: {} polls", polls.load(Ordering::SeqCst));
    }

    #[test]
    fn bad_patterns_and_zones_are_named() {
        let e = Trigger::cron("61 * * * *", None).unwrap_err().to_string();
        assert!(e.contains("61 * * * *"), "{e}");
        let e = Trigger::cron("0 2 * * *", Some("Mars/Olympus")).unwrap_err().to_string();
        assert!(e.contains("Mars/Olympus"), "{e}");
        let t = Trigger::cron("0 2 * * *", Some("Europe/Paris")).unwrap();
        let next = t.next_after("2026-12-01T12:00:00Z".parse().unwrap()).unwrap();
        // 02:00 in Paris in December is 01:00 UTC.
        assert_eq!(next.to_rfc3339(), "2026-12-02T01:00:00+00:00");
    }
}
