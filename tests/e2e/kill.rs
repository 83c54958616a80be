//! Kill trials: `pipeline run` killed with SIGKILL, then run again to the end, leaves the lake
//! exactly as a run that was never killed (`pipeline digest`: every table's rows and content,
//! every model file) — nothing lost, nothing written twice, no half model.
//!
//! The kills fall at named instants no random kill is likely to hit (a table's rows all sent
//! but its version not written, a version written but not yet recorded by the run, a model
//! file's temporary copy on disk but not renamed, a detector folder published) and at random
//! instants of each third of the run. `scripts/kill-trials.sh` runs the longer series whose
//! figures the README gives.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

/// Small enough that a run takes seconds: a detector of 3 epochs at 128², a 2-epoch model.
const SETS: &[&str] = &["--set", "detect.epochs=3", "--set", "detect.input_size=128"];

/// A folder with the fixture's pipeline writing its own lake, over the fixture's photos.
fn trial_dir(f: &common::Fixture, name: &str) -> PathBuf {
    let dir = f.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(&f.pipeline).unwrap().replace("file://demo-lake/", "file://../demo-lake/");
    std::fs::write(dir.join("pipeline.toml"), text).unwrap();
    dir
}

fn run(dir: &Path, kill_at: Option<&str>) -> Command {
    let mut c = Command::new(common::bin());
    c.args(["run", "-q", "pipeline.toml"]).args(SETS).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    match kill_at {
        Some(p) => c.env("PIPELINE_KILL_AT", p),
        None => c.env_remove("PIPELINE_KILL_AT"),
    };
    c
}

fn finish(dir: &Path) {
    let out = run(dir, None).output().unwrap();
    assert!(out.status.success(), "the run after the kill failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn digest(dir: &Path) -> String {
    let (code, out, err) = common::cli(&["digest", "--pipeline", "pipeline.toml"], dir);
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn a_run_killed_anywhere_and_run_again_leaves_the_lake_of_a_run_never_killed() {
    use std::os::unix::process::ExitStatusExt;
    let f = common::demo(5, 4, 41);
    let reference = trial_dir(&f, "reference");
    let t = Instant::now();
    finish(&reference);
    let took = t.elapsed();
    let want = digest(&reference);
    for table in ["images", "detections", "clean", "models", "embeddings", "submissions"] {
        assert!(want.lines().any(|l| l.starts_with(&format!("table {table} rows ")) && !l.contains(" rows 0 ")), "{table} in:\n{want}");
    }
    assert!(want.contains("/best.safetensors") && want.contains("/detector.safetensors"), "{want}");
    // A second run that was never killed agrees to the bit: the comparison is fair.
    let again = trial_dir(&f, "again");
    finish(&again);
    assert_eq!(digest(&again), want, "two runs of the same pipeline over the same photos");

    let points = [
        "commit:images",
        "committed:detections",
        "publish",
        "save:best.safetensors",
        "save:last.json@2",
        "commit:embeddings",
        "committed:models",
        "commit:submissions",
    ];
    let mut trials = 0;
    for (i, point) in points.iter().enumerate() {
        let dir = trial_dir(&f, &format!("point-{i}"));
        let out = run(&dir, Some(point)).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(9), "{point}: the run was not killed there:\n{err}");
        assert!(err.contains(&format!("killed at {}", point.split('@').next().unwrap())), "{point}: {err}");
        finish(&dir);
        assert_eq!(digest(&dir), want, "killed at {point}, then run again");
        trials += 1;
    }
    // Random instants, one in each third of a run.
    let mut seed = 0x5eed_u64;
    for third in 0..3 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let at = took.mul_f64((third as f64 + (seed >> 33) as f64 / (1u64 << 31) as f64) / 3.0);
        let dir = trial_dir(&f, &format!("random-{third}"));
        let mut child = run(&dir, None).spawn().unwrap();
        std::thread::sleep(at.max(Duration::from_millis(50)));
        let killed = child.kill().is_ok();
        let status = child.wait().unwrap();
        assert!(killed || status.success(), "the run failed on its own: {status:?}");
        finish(&dir);
        assert_eq!(digest(&dir), want, "killed {:.1}s into the run, then run again", at.as_secs_f64());
        trials += 1;
    }
    assert_eq!(trials, points.len() + 3);
}
