//! The `pipeline` binary as a user runs it.

use crate::common;


use common::cli as run;

#[test]
fn validate_lists_every_error_with_its_line_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.toml");
    std::fs::write(
        &p,
        "[stages.ingest]\nkind = \"ingest\"\nsource = \"photos\"\nthreads = 4\n\n[stages.clean]\nkind = \"sql\"\ninputs = [\"ingets\"]\nquery = \"nope.sql\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["validate", p.to_str().unwrap()], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 error(s)"), "{err}");
    assert!(err.contains("broken.toml:4:1: stage `ingest`: unknown key `threads`"), "{err}");
    assert!(err.contains("broken.toml:8:") && err.contains("input `ingets`"), "{err}");
    assert!(err.contains("broken.toml:9:") && err.contains("nope.sql"), "{err}");
}

#[test]
fn the_shipped_pipeline_validates_and_graphs() {
    let repo = common::repo();
    let (code, out, err) = run(&["validate", "pipelines/ingest-to-submission.toml"], &repo);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ingest -> detect -> usable -> clean"), "{out}");
    let (code, out, _) = run(&["graph", "pipelines/ingest-to-submission.toml"], &repo);
    assert_eq!(code, 0);
    assert!(out.contains("usable [sql ../sql/usable.sql] writes usable -> clean"), "{out}");
    let (code, dot, _) = run(&["graph", "--dot", "pipelines/ingest-to-submission.toml"], &repo);
    assert_eq!(code, 0);
    assert!(dot.starts_with("digraph") && dot.contains("\"ingest\" -> \"usable\"") && dot.contains("\"usable\" -> \"clean\""), "{dot}");
}

#[test]
fn run_query_and_refused_writes() {
    let f = common::demo(3, 3, 9);
    let cwd = f.dir.path();
    let pipe = f.pipeline.to_str().unwrap();
    let (code, out, err) = run(&["run", pipe, "--until", "usable"], cwd);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ingest") && out.contains("succeeded") && out.contains("rejects:"), "{out}");
    assert!(!out.contains("clean "), "--until usable does not run clean: {out}");
    let (code, out, _) = run(&["run", pipe, "--until", "usable"], cwd);
    assert_eq!(code, 0);
    assert_eq!(out.matches("up to date").count(), 6, "all three stages (ingest, detect, usable) reported up to date: {out}");
    // The ledger, run by run, then one run stage by stage (by the beginning of its id).
    let (code, out, err) = run(&["runs", "--pipeline", pipe, "--format", "csv"], cwd);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two runs: {out}");
    assert!(lines[0].starts_with("run_id,pipeline,started,ended,seconds,status,stages_run,up_to_date"), "{out}");
    assert!(lines[1].contains(",succeeded,3,0,") && lines[2].contains(",succeeded,0,3,"), "{out}");
    let first = lines[1].split(',').next().unwrap();
    let (code, out, err) = run(&["runs", &first[..first.len() - 4], "--pipeline", pipe, "--format", "csv"], cwd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.contains("ingest,ingest,succeeded") && out.contains("usable,sql,succeeded"), "{out}");
    let (code, _, err) = run(&["runs", "nope", "--pipeline", pipe], cwd);
    assert_ne!(code, 0);
    assert!(err.contains("no run `nope`"), "{err}");

    // The lake as it was after the first run, and housekeeping that keeps that history.
    let count = |extra: &[&str]| {
        let mut args = vec!["query", "SELECT count(*) AS n FROM images", "--pipeline", pipe, "--format", "csv"];
        args.extend_from_slice(extra);
        let (code, out, err) = run(&args, cwd);
        assert_eq!(code, 0, "{err}");
        out.lines().nth(1).unwrap().trim().to_string()
    };
    let now = count(&[]);
    assert_eq!(count(&["--as-of", first]), now);
    let (code, _, err) = run(&["query", "SELECT 1", "--pipeline", pipe, "--as-of", "20000101T000000Z-x"], cwd);
    assert_ne!(code, 0);
    assert!(err.contains("run-20000101T000000Z-x"), "{err}");
    let (code, out, err) = run(&["vacuum", "--keep-days", "0", "--pipeline", pipe], cwd);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("images") && out.contains("runs"), "{out}");
    assert_eq!(count(&[]), now);
    assert_eq!(count(&["--as-of", first]), now, "the newest tag of each table survives vacuum");
    // Compaction rewrote fragments, not rows: every stage is still up to date.
    let (code, out, err) = run(&["run", pipe, "--until", "usable"], cwd);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("up to date").count(), 6, "after vacuum: {out}");

    let (code, out, err) = run(&["query", "SELECT count(*) AS n FROM images", "--pipeline", pipe, "--format", "csv"], cwd);
    assert_eq!(code, 0, "{err}");
    let n: usize = out.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(n > 5, "{out}");
    let (code, out, _) = run(&["query", "SELECT photo_id FROM images ORDER BY 1 LIMIT 2", "--lake", "lake", "--format", "json"], cwd);
    assert_eq!(code, 0);
    assert!(out.trim_start().starts_with('[') && out.contains("photo_id"), "{out}");
    let (code, _, err) = run(&["query", "DELETE FROM images", "--lake", "lake"], cwd);
    assert_eq!(code, 1);
    assert!(err.contains("read-only") && err.contains("DELETE FROM"), "{err}");
    let (code, _, err) = run(&["query", "SELECT nope FROM images", "--lake", "lake"], cwd);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
    assert_eq!(err.matches("nope").count(), 1, "said once: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A careless aggregation over a three-way join fails over the limit, saying so; under a
    // larger one it answers.
    let cross = "SELECT a.photo_id, b.photo_id AS b, c.photo_id AS c, count(*) AS n FROM images a, images b, images c GROUP BY 1, 2, 3";
    let (code, _, err) = run(&["query", cross, "--lake", "lake", "--memory-limit", "64K"], cwd);
    assert_eq!(code, 1);
    assert!(err.starts_with("error: the query needs more memory than its limit of 64.0 KiB (--memory-limit"), "{err}");
    let (code, out, err) = run(&["query", cross, "--lake", "lake", "--memory-limit", "2G", "--format", "csv"], cwd);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().count() > 1000, "{}", out.lines().count());
    let (code, _, err) = run(&["query", "SELECT 1", "--lake", "lake", "--memory-limit", "lots"], cwd);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lots"), "{err}");
    let (code, out, _) = run(&["runs", "--lake", "lake"], cwd);
    assert_eq!(code, 0);
    assert!(out.contains("up_to_date") && out.contains("succeeded"), "{out}");
    let pq = cwd.join("images.parquet");
    let (code, _, err) = run(&["query", "SELECT * FROM images", "--lake", "lake", "--format", "parquet", "--out", pq.to_str().unwrap()], cwd);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&pq).unwrap().starts_with(b"PAR1"));
}
