//! One writer at a time: two runs on one lake, a killed holder, SIGTERM.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn start(pipe: &Path, args: &[&str]) -> Child {
    Command::new(common::bin())
        .arg("run")
        .arg(pipe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run(pipe: &Path, args: &[&str]) -> Output {
    start(pipe, args).wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Waits until the run's lease record is in the lake: it holds the lake from then on.
fn wait_for_lease(lake: &Path) {
    let t = Instant::now();
    while !lake.join("_lease.json").is_file() {
        assert!(t.elapsed() < Duration::from_secs(60), "no lease taken");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(pipe: &Path, sql: &str) -> String {
    let o = Command::new(common::bin()).args(["query", sql, "--pipeline", pipe.to_str().unwrap(), "--format", "csv"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).lines().nth(1).unwrap_or("").to_string()
}

#[test]
fn a_second_run_on_a_held_lake_fails_naming_the_holder_or_waits_for_it() {
    let f = common::demo(4, 4, 21);
    let lake = f.dir.path().join("lake");
    let first = start(&f.pipeline, &["--until", "detect"]);
    wait_for_lease(&lake);
    let second = run(&f.pipeline, &["--until", "detect"]);
    let said = text(&second);
    assert!(!second.status.success(), "{said}");
    assert!(said.contains("is in use by run") && said.contains("of pipeline `ingest-to-submission`"), "{said}");
    assert!(said.contains(&format!("process {}", first.id())), "names the holder's process: {said}");
    // A third waits for the first instead, then finds everything it asks for up to date.
    let third = start(&f.pipeline, &["--until", "detect", "--wait", "300"]);
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    let third = third.wait_with_output().unwrap();
    assert!(third.status.success(), "{}", text(&third));
    assert_eq!(text(&third).matches("up to date").count(), 4, "ingest and detect up to date: {}", text(&third));
    // Every photo once.
    assert_eq!(count(&f.pipeline, "SELECT count(*) - count(DISTINCT uri) FROM images"), "0");
    assert!(!lake.join("_lease.json").exists(), "released");

    // Without a terminal, each stage says when it starts and ends.
    let log = String::from_utf8_lossy(&first.stderr).to_string();
    for line in ["ingest started", "ingest succeeded in", "detect started", "detect succeeded in"] {
        assert!(log.contains(line), "`{line}` in {log}");
    }
}

#[test]
fn a_killed_holder_leaves_no_lease_and_sigterm_stops_a_run_cleanly() {
    let f = common::demo(4, 4, 22);
    let lake = f.dir.path().join("lake");
    // kill -9 while it holds the lake: the next run takes it at once.
    let mut doomed = start(&f.pipeline, &["--until", "detect"]);
    wait_for_lease(&lake);
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let next = run(&f.pipeline, &["--until", "ingest"]);
    assert!(next.status.success(), "{}", text(&next));

    // SIGTERM while detect trains: cancelled like Ctrl-C, detect's table not committed, lease given back.
    let child = start(&f.pipeline, &["--until", "detect", "--force"]);
    wait_for_lease(&lake);
    std::thread::sleep(Duration::from_millis(1500));
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cancelled"), "{said}");
    assert!(!lake.join("detections.lance").exists(), "nothing half-written: {said}");
    assert!(!lake.join("_lease.json").exists(), "released on SIGTERM: {said}");
    // And the run after it converges.
    let again = run(&f.pipeline, &["--until", "detect"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(count(&f.pipeline, "SELECT count(*) - count(DISTINCT uri) FROM images"), "0");
}
