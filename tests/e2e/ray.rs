//! Map stages as shards on a Ray cluster: a real Ray (2.60, the project's venv) of two simulated
//! nodes on loopback only (tests/e2e/ray_cluster.py, as shared/notes/ray.md says), a real
//! S3-compatible server for the photos and the lake (moto), and the `pipeline` binary as every
//! shard's worker.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use pipeline::dag::{self, RunOptions, ledger::Status};
use pipeline::engine::shard::RayOptions;
use pipeline::lake::{Catalog, Lake};

use crate::common;
use crate::s3::{create_bucket, moto, set_env, test_keys, upload_demo};

/// The cluster, shut down when dropped (closing its stdin ends the helper).
struct Cluster {
    child: Child,
    address: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn python() -> String {
    let venv = std::env::var("VIRTUAL_ENV").unwrap_or_else(|_| format!("{}/.cache/pipeline/venv", std::env::var("HOME").unwrap()));
    format!("{venv}/bin/python")
}

fn cluster(dir: &Path) -> Cluster {
    let script = common::repo().join("tests/e2e/ray_cluster.py");
    let mut child = Command::new(python())
        .arg(&script)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} (scripts/setup.sh installs ray): {e}", script.display()));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let address = line.trim().to_string();
    assert!(address.starts_with("127.0.0.1:"), "the cluster is on loopback: `{address}`");
    Cluster { child, address }
}

/// The fixture's pipeline with its photos, labels and lake in `bucket` (the lake under `lake`),
/// and a `sql` stage that maps `images` row by row (`sizes`).
fn on_s3(f: &common::Fixture, bucket: &str, lake: &str) -> std::path::PathBuf {
    std::fs::write(f.dir.path().join("sizes.sql"), "SELECT photo_id, uri, width, height, width * height AS pixels FROM images WHERE width >= 600").unwrap();
    let sizes = "\n[stages.sizes]\nkind = \"sql\"\ninputs = [\"ingest\"]\nquery = \"sizes.sql\"\n";
    let text = std::fs::read_to_string(&f.pipeline).unwrap() + sizes;
    let text = text
        .replace("file://lake", &format!("s3://{bucket}/{lake}"))
        .replace("file://demo-lake/photos", &format!("s3://{bucket}/photos"))
        .replace("file://demo-lake/labels.csv", &format!("s3://{bucket}/labels.csv"))
        .replace("file://demo-lake/boxes.csv", &format!("s3://{bucket}/boxes.csv"));
    let p = f.dir.path().join(format!("{lake}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

async fn digest(plan: &pipeline::config::Plan) -> Vec<String> {
    let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
    // The crop cache is a cache: which run filled which entry is not the data.
    pipeline::digest::digest(&lake).await.unwrap().iter().map(|l| l.to_string()).filter(|l| !l.starts_with("table crops ")).collect()
}

async fn lake_version(plan: &pipeline::config::Plan, table: &str) -> Option<u64> {
    Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap()).version(table).await.unwrap()
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(common::bin()).args(args).envs(env.iter().cloned()).output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_detect_and_embed_as_shards_on_ray_give_the_tables_of_a_local_run() {
    let (_server, port) = moto();
    create_bucket(port, "survey").await;
    let f = common::demo(3, 3, 61);
    let ray_tmp = f.dir.path().join("r");
    std::fs::create_dir_all(&ray_tmp).unwrap();
    let killed_once = f.dir.path().join("killed-once");
    set_env(&test_keys(&format!("http://127.0.0.1:{port}")));
    set_env(&[
        ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_AUTH_MODE", "disabled"),
        ("RAY_TMPDIR", ray_tmp.to_str().unwrap()),
        ("PIPELINE_BIN", common::bin()),
    ]);
    let s3 = object_store::aws::AmazonS3Builder::from_env().with_bucket_name("survey").build().unwrap();
    upload_demo(&s3, &f).await;
    use object_store::ObjectStoreExt;
    let boxes = std::fs::read(f.dir.path().join("demo-lake/boxes.csv")).unwrap();
    s3.put(&object_store::path::Path::from("boxes.csv"), boxes.into()).await.unwrap();

    // The reference: the same pipeline, every stage in this process.
    let local = pipeline::load(&on_s3(&f, "survey", "local-lake"), &[]).await.unwrap();
    let report = dag::run(&local, &RunOptions { quiet: true, until: Some("embed".into()), ..Default::default() }).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == Status::Succeeded), "{report:#?}");
    let report = dag::run(&local, &RunOptions { quiet: true, until: Some("sizes".into()), ..Default::default() }).await.unwrap();
    assert_eq!(report.stage("sizes").unwrap().status, Status::Succeeded, "{report:#?}");

    // On Ray: two nodes, three shards per map stage; the first embed shard to have written its
    // files is killed before it keeps them, and Ray runs it again.
    let c = cluster(&ray_tmp);
    set_env(&[("PIPELINE_KILL_AT", "staged:embeddings"), ("PIPELINE_KILL_ONCE", killed_once.to_str().unwrap())]);
    let ray_file = on_s3(&f, "survey", "ray-lake");
    let plan = pipeline::load(&ray_file, &[]).await.unwrap();
    let ray = RayOptions { address: Some(c.address.clone()), shards: 3, retries: 2, worker_args: vec!["-q".into()], device: None };
    let opts = RunOptions { quiet: true, until: Some("embed".into()), executor: Some(ray.clone()), ..Default::default() };
    let report = dag::run(&plan, &opts).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == Status::Succeeded), "{report:#?}");
    for stage in ["ingest", "detect", "embed"] {
        let s = report.stage(stage).unwrap();
        assert!(s.summary.starts_with("3 shards on Ray (") && s.summary.contains("of 2 node(s) used"), "{stage}: {}", s.summary);
    }
    for stage in ["usable", "clean", "train"] {
        assert!(!report.stage(stage).unwrap().summary.contains("shards"), "{stage} runs on the driver");
    }
    // A query that maps one table row by row runs as shards too.
    let sizes = dag::run(&plan, &RunOptions { until: Some("sizes".into()), ..opts.clone() }).await.unwrap();
    let s = sizes.stage("sizes").unwrap();
    assert!(s.status == Status::Succeeded && s.summary.starts_with("3 shards on Ray ("), "{sizes:#?}");
    assert!(killed_once.exists(), "an embed shard was killed mid-shard");
    let (want, got) = (digest(&local).await, digest(&plan).await);
    for table in ["images", "rejects", "detections", "embeddings"] {
        assert!(got.iter().any(|l| l.starts_with(&format!("table {table} rows ")) && !l.contains(" rows 0 ")), "{table} in {got:#?}");
    }
    // Ingest's tables, and what the driver derives from them alone, are the same to the bit.
    let exact = |lines: &[String]| -> Vec<String> {
        lines.iter().filter(|l| ["images", "rejects", "clean", "train", "sizes"].iter().any(|t| l.starts_with(&format!("table {t} rows ")))).cloned().collect()
    };
    assert_eq!(exact(&got), exact(&want), "ingest's tables made by shards on Ray are those of a local run, row for row");
    assert_eq!(exact(&want).len(), 5);
    // Detections and embeddings: the same rows (every photo once, the same detector and model),
    // the numbers equal but for libtorch's arithmetic, which depends on how photos are batched
    // (3 shards batch them otherwise than one process) and, through the detector's boxes, on
    // the crops the model trained on.
    let rows = |plan: &pipeline::config::Plan, sql: &'static str| {
        let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
        async move {
            let (_, b) = pipeline::query::query(&lake, sql).await.unwrap();
            let b = arrow::compute::concat_batches(&b[0].schema(), &b).unwrap();
            let keys: Vec<String> = (0..b.num_rows())
                .map(|i| (0..b.num_columns() - 1).map(|c| arrow::util::display::array_value_to_string(b.column(c), i).unwrap()).collect::<Vec<_>>().join(" "))
                .collect();
            let last = b.column(b.num_columns() - 1);
            let values: Vec<Vec<f32>> = match last.data_type() {
                arrow::datatypes::DataType::FixedSizeList(_, _) => {
                    let l = last.as_fixed_size_list();
                    (0..l.len()).map(|i| l.value(i).as_primitive::<arrow::datatypes::Float32Type>().values().to_vec()).collect()
                }
                _ => {
                    let s = last.as_string::<i32>();
                    (0..s.len()).map(|i| s.value(i).split(',').map(|v| v.parse().unwrap()).collect()).collect()
                }
            };
            (keys, values)
        }
    };
    use arrow::array::{Array, AsArray};
    let det = "SELECT photo_id, uri, detector_id, content_hash, concat_ws(',', score, x0, y0, x1, y1) FROM detections ORDER BY photo_id";
    let ((k0, v0), (k1, v1)) = (rows(&local, det).await, rows(&plan, det).await);
    assert_eq!(k1, k0);
    let worst = v0.iter().zip(&v1).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(worst < 1e-5, "detections differ by {worst}");
    let emb = "SELECT photo_id, uri, model_id, tta, individual_id, embedding FROM embeddings ORDER BY photo_id";
    let ((k0, v0), (k1, v1)) = (rows(&local, emb).await, rows(&plan, emb).await);
    assert_eq!(k1, k0);
    let cos = v0.iter().zip(&v1).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()).fold(1f32, f32::min);
    eprintln!("detections differ by at most {worst:e}; embeddings' least cosine {cos}");
    assert!(cos > 0.999, "embeddings' least cosine similarity {cos}");

    // Run again on Ray: every stage is up to date (the shards' commit recorded what they read).
    let again = dag::run(&plan, &opts).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    drop(c);
    // A cluster that is not there is said at once, and nothing is committed.
    let images = lake_version(&plan, "images").await;
    let (code, out) = cli(&["run", "-q", ray_file.to_str().unwrap(), "--until", "ingest", "--force", "--executor", "ray=127.0.0.1:1"], &[]);
    assert!(code != 0 && out.contains("no Ray cluster answers at 127.0.0.1:1") && out.contains("nothing was committed"), "{out}");
    assert_eq!(lake_version(&plan, "images").await, images);

    // By hand (as a Slurm array or a Kubernetes indexed Job would): a shard killed before it
    // finished is not committed; a run's shards never land with another run's; a failing commit
    // leaves the table as it was.
    let file = ray_file.to_str().unwrap();
    let set = ["--set", "embed.flip_tta=false"];
    let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
    let before = lake.version("embeddings").await.unwrap().unwrap();
    let worker = |shard: &str, run: &str, env: &[(&str, &str)]| {
        let mut args = vec!["worker", file, "--stage", "embed", "--shard", shard, "--run", run];
        args.extend(set);
        cli(&args, env)
    };
    let no_kill = [("PIPELINE_KILL_AT", "")];
    let (code, out) = worker("0/2", "night-a", &no_kill);
    assert_eq!(code, 0, "{out}");
    let (code, out) = worker("1/2", "night-b", &no_kill);
    assert_eq!(code, 0, "{out}");
    let commit = |run: &str| {
        let mut args = vec!["commit", file, "--stage", "embed", "--run", run, "--shards", "2"];
        args.extend(set);
        cli(&args, &no_kill)
    };
    let (code, out) = commit("night-a");
    assert_ne!(code, 0);
    assert!(out.contains("shard(s) 1/2 have not finished") && out.contains("night-b"), "{out}");
    // Shard 1 of night-a killed after its files, before its manifest: still not finished.
    let (code, out) = worker("1/2", "night-a", &[("PIPELINE_KILL_AT", "manifest"), ("PIPELINE_KILL_ONCE", "")]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("killed at manifest"), "{out}");
    let (code, out) = commit("night-a");
    assert!(code != 0 && out.contains("shard(s) 1/2 have not finished"), "{out}");
    // Its retry finishes; a transaction file lost from the staging area fails the commit.
    let (code, out) = worker("1/2", "night-a", &no_kill);
    assert_eq!(code, 0, "{out}");
    let txn = object_store::path::Path::from("ray-lake/_staging/night-a/embed/shard-00001-of-00002/embeddings.txn");
    let kept = s3.get(&txn).await.unwrap().bytes().await.unwrap();
    s3.delete(&txn).await.unwrap();
    let (code, out) = commit("night-a");
    assert!(code != 0 && out.contains("embeddings.txn"), "{out}");
    assert_eq!(lake.version("embeddings").await.unwrap(), Some(before), "a failed commit changes nothing");
    s3.put(&txn, kept.into()).await.unwrap();
    let (code, out) = commit("night-a");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("stage embed of run night-a committed") && out.contains("2 shards committed"), "{out}");
    assert_eq!(lake.version("embeddings").await.unwrap(), Some(before + 1), "both shards in one version");
    let (_, b) = pipeline::query::query(&lake, "SELECT count(*), count(DISTINCT uri), min(tta) FROM embeddings").await.unwrap();
    let (n, distinct) = (b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), b[0].column(1).as_primitive::<arrow::datatypes::Int64Type>().value(0));
    let images = pipeline::query::query(&lake, "SELECT count(*) FROM images").await.unwrap().1[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0);
    assert_eq!((n, distinct), (images, images), "every photo once");
    assert_eq!(b[0].column(2).as_string::<i32>().value(0), "none");

    // A lake another run holds is not written to by a shard of a different run.
    let ttl = std::time::Duration::from_secs(60);
    let held = pipeline::lake::lease::Lease::acquire(&plan.lake, &Default::default(), pipeline::lake::lease::Holder::new("run X of pipeline `other`", ttl), ttl, pipeline::lake::lease::Wait::No)
        .await
        .unwrap();
    let (code, out) = worker("0/2", "night-c", &no_kill);
    assert!(code != 0 && out.contains("run X of pipeline `other`") && out.contains("shard 0/2 of run night-c"), "{out}");
    held.release().await;
}
