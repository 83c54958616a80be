//! Shared fixtures for the end-to-end tests: a small demo lake and a pipeline file over it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pipeline::demo::{DemoOptions, generate};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub pipeline: PathBuf,
    /// photo → (defect, expected)
    pub truth: BTreeMap<String, (String, String)>,
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small demo lake (photos 1200×500, so tests stay fast) and a copy of the repository's
/// main pipeline pointed at it, with the lake inside the temp dir and training shrunk to seconds.
pub fn demo(individuals: usize, photos_per: usize, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo-lake");
    generate(&DemoOptions { out: out.clone(), individuals, photos_per, seed, width: 1200, height: 500 }).unwrap();
    let truth = read_truth(&out.join("ground_truth.csv"));
    let text = std::fs::read_to_string(repo().join("pipelines/ingest-to-submission.toml")).unwrap();
    let text = text
        .replace("file://../data/lake", "file://lake")
        .replace("file://../data/demo-lake/", "file://demo-lake/")
        .replace("\"../sql/", &format!("\"{}/sql/", repo().display()))
        // Training sized for tests: tiny inputs, two epochs, from the ImageNet weights (a net
        // trained from scratch for two steps maps every photo to the same vector).
        .replace("input_size = 480", "input_size = 64")
        .replace("epochs = 80", "epochs = 2")
        .replace("device = \"auto\"", "device = \"cpu\"")
        // Geometric re-ranking costs seconds per run; the tests that want it ask for it.
        .replace("geometric = 20", "geometric = 0")
        .replace("\"../data/submission.csv\"", "\"submission.csv\"")
        .replace("\"../data/report.html\"", "\"report.html\"");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(&pipeline, text).unwrap();
    Fixture { dir, pipeline, truth }
}

/// The nightly pipeline (pipelines/nightly-reingest.toml) over the fixture's lake, beside its
/// training pipeline, with the same replacements.
pub fn nightly(f: &Fixture) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("pipelines/nightly-reingest.toml")).unwrap();
    let text = text
        .replace("file://../data/lake", "file://lake")
        .replace("file://../data/demo-lake/", "file://demo-lake/")
        .replace("\"../data/submission.csv\"", "\"nightly-submission.csv\"");
    let p = f.dir.path().join("nightly.toml");
    std::fs::write(&p, text).unwrap();
    p
}

pub fn read_truth(p: &Path) -> BTreeMap<String, (String, String)> {
    let mut r = csv::Reader::from_path(p).unwrap();
    let h = r.headers().unwrap().clone();
    let col = |n: &str| h.iter().position(|x| x == n).unwrap_or_else(|| panic!("ground truth lacks {n}"));
    let (p, d, e) = (col("photo"), col("defect"), col("expected"));
    r.records().map(|rec| {
        let rec = rec.unwrap();
        (rec[p].to_string(), (rec[d].to_string(), rec[e].to_string()))
    }).collect()
}

/// boxes.csv of a demo lake: photo → [x0, y0, x1, y1] in pixels.
pub fn read_boxes(p: &Path) -> BTreeMap<String, [f64; 4]> {
    let mut r = csv::Reader::from_path(p).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            let v = |i: usize| rec[i].parse::<f64>().unwrap();
            (rec[0].to_string(), [v(1), v(2), v(3), v(4)])
        })
        .collect()
}

pub fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h;
    if union > 0.0 { w * h / union } else { 0.0 }
}

/// Runs the `pipeline` binary in `cwd`: (exit code, stdout, stderr).
pub fn cli(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(bin()).args(args).current_dir(cwd).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pipeline")
}

/// Compiles the fixture's pipeline, runs it once and checks every stage succeeded; returns the
/// plan, its lake and the (quiet) run options for further runs.
pub async fn run_fresh(f: &Fixture) -> (pipeline::config::Plan, pipeline::lake::Lake, pipeline::dag::RunOptions) {
    let plan = pipeline::load(&f.pipeline, &[]).await.unwrap();
    let lake = pipeline::lake::Lake::new(plan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).unwrap());
    let opts = pipeline::dag::RunOptions { quiet: true, ..Default::default() };
    let report = pipeline::dag::run(&plan, &opts).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == pipeline::dag::ledger::Status::Succeeded), "{report:#?}");
    (plan, lake, opts)
}

/// `pipeline serve` as a process, killed when dropped.
pub struct Served {
    child: std::process::Child,
    pub port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET `path`: (status, body), None while nothing answers.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port)).await.ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }
}

/// Starts `pipeline serve` with `args` on a free loopback port and waits until it answers.
pub async fn serve(args: &[&str], cwd: &Path) -> Served {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let child = std::process::Command::new(bin())
        .args(["serve", "--addr", &addr, "--device", "cpu"])
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut served = Served { child, port };
    let t = std::time::Instant::now();
    while served.get("/healthz").await.is_none() {
        if let Ok(Some(status)) = served.child.try_wait() {
            panic!("pipeline serve exited with {status}");
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(60), "pipeline serve did not start");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    served
}
