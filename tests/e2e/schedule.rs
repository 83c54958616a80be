//! `pipeline schedule`: a one-second cron that skips the ticks while another process holds the
//! lake, and `--watch`, which runs when a photo arrives and not before.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pipeline::lake::lease::{Holder, Lease, Wait};

/// An ingest-only pipeline over a small demo lake; (fixture, pipeline file, lake folder).
fn ingest_only(seed: u64) -> (common::Fixture, std::path::PathBuf, std::path::PathBuf) {
    let f = common::demo(3, 3, seed);
    let p = f.dir.path().join("ingest.toml");
    std::fs::write(
        &p,
        "[pipeline]\nname = \"nightly\"\nlake = \"file://lake\"\n\n[stages.ingest]\nkind = \"ingest\"\nsource = \"file://demo-lake/photos\"\nlabels = \"file://demo-lake/labels.csv\"\n",
    )
    .unwrap();
    let lake = f.dir.path().join("lake");
    (f, p, lake)
}

fn ledger(pipe: &std::path::Path) -> String {
    let (code, out, err) = common::cli(&["query", "SELECT status FROM runs ORDER BY started_at", "--pipeline", pipe.to_str().unwrap(), "--format", "csv"], std::path::Path::new("/"));
    assert_eq!(code, 0, "{err}");
    out.lines().skip(1).collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_cron_skips_ticks_while_the_lake_is_held_then_runs() {
    let (_f, pipe, lake) = ingest_only(41);
    std::fs::create_dir_all(&lake).unwrap();
    // Another writer holds the lake for the first ticks.
    let ttl = Duration::from_secs(60);
    let held = Lease::acquire(&format!("file://{}", lake.display()), &Default::default(), Holder::new("the test's manual run", ttl), ttl, Wait::No)
        .await
        .unwrap();
    let mut child = Command::new(common::bin())
        .args(["schedule", pipe.to_str().unwrap(), "--cron", "* * * * * *", "--tz", "UTC", "--max-runs", "2", "--retries", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log, line by line; the lease is released once a tick has been skipped for it (a
    // fixed wait would race the scheduler's start on a loaded machine).
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for l in reader.lines().map_while(Result::ok) {
            let _ = tx.send(l.clone());
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let t = Instant::now();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("the scheduler logs a skipped tick");
        if line.contains("tick skipped: ") {
            break;
        }
    }
    held.release().await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_secs(120));
    let stdout = lines.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("tick skipped: ") && stdout.contains("the test's manual run"), "{stdout}");
    assert!(stdout.contains("succeeded: 1 stage(s) ran, 0 up to date") && stdout.contains("succeeded: 0 stage(s) ran, 1 up to date"), "{stdout}");
    // How many ticks are skipped depends on how fast the test sees the first.
    assert!(stdout.contains("runs: 2 (2 succeeded, 0 failed, 0 retries); ticks skipped: "), "{stdout}");
    assert!(!stdout.contains(", 0 while the lake was held"), "{stdout}");
    assert_eq!(ledger(&pipe), "succeeded up_to_date");
}

#[test]
fn watch_runs_when_a_photo_arrives() {
    let (f, pipe, _) = ingest_only(42);
    let photos = f.dir.path().join("demo-lake/photos");
    let one = std::fs::read_dir(&photos).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "jpg")).unwrap();
    let aside = f.dir.path().join("aside.jpg");
    std::fs::rename(&one, &aside).unwrap();
    let (code, _, err) = common::cli(&["run", pipe.to_str().unwrap(), "-q"], f.dir.path());
    assert_eq!(code, 0, "{err}");
    let mut child = Command::new(common::bin())
        .args(["schedule", pipe.to_str().unwrap(), "--watch", "--poll", "0.3", "--debounce", "0.5", "--max-runs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Up to date: nothing runs while nothing arrives.
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "ran with nothing new");
    assert_eq!(ledger(&pipe), "succeeded");
    std::fs::rename(&aside, &one).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("the sources changed") && stdout.contains("succeeded: 1 stage(s) ran"), "{stdout}");
    assert_eq!(ledger(&pipe), "succeeded succeeded");
}

#[test]
fn bad_schedules_are_refused_before_anything_runs() {
    let (f, pipe, lake) = ingest_only(43);
    let p = pipe.to_str().unwrap();
    let (code, _, err) = common::cli(&["schedule", p, "--cron", "0 25 * * *"], f.dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("0 25 * * *"), "{err}");
    let (code, _, err) = common::cli(&["schedule", p, "--cron", "0 2 * * *", "--tz", "Europe/Parsi"], f.dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("Europe/Parsi"), "{err}");
    let (code, _, err) = common::cli(&["schedule", p], f.dir.path());
    assert_ne!(code, 0);
    assert!(err.contains("--cron"), "{err}");
    assert!(!lake.exists(), "nothing ran");
}
