//! The same pipeline with photos, labels and the lake all on a real S3-compatible server
//! (moto, from the project's venv), started by the test on a free loopback port.

use crate::common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use pipeline::dag::{self, RunOptions, ledger::Status};
use pipeline::lake::lease::{self, Holder, Lease, Wait};
use pipeline::lake::{Catalog, Lake};

pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn moto() -> (Server, u16) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let venv = std::env::var("VIRTUAL_ENV").unwrap_or_else(|_| format!("{}/.cache/pipeline/venv", std::env::var("HOME").unwrap()));
    let exe = format!("{venv}/bin/moto_server");
    let child = Command::new(&exe)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {exe} (scripts/setup.sh installs it): {e}"));
    let server = Server(child);
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "moto did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, port)
}

/// Sets `vars` in this test's environment. SAFETY of each `set_var`: called before any other
/// thread of the test process reads the environment (nextest runs each test in its own process).
pub(crate) fn set_env(vars: &[(&str, &str)]) {
    for (k, v) in vars {
        // SAFETY: see above.
        unsafe { std::env::set_var(k, v) };
    }
}

/// The S3 server at `endpoint` and the test keys, given as a user gives them: the AWS_*
/// environment, which both the ingest's object store and Lance read.
pub(crate) fn test_keys(endpoint: &str) -> [(&'static str, &str); 5] {
    [
        ("AWS_ENDPOINT", endpoint),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ALLOW_HTTP", "true"),
    ]
}

/// Creates a bucket with an unsigned PUT (object_store has no bucket API; moto needs no signature).
pub(crate) async fn create_bucket(port: u16, bucket: &str) {
    let r = reqwest::Client::new().put(format!("http://127.0.0.1:{port}/{bucket}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
}

/// The demo photos and labels of `f`, put in `bucket` under photos/ and labels.csv.
pub(crate) async fn upload_demo(s3: &dyn ObjectStore, f: &common::Fixture) {
    let local = f.dir.path().join("demo-lake");
    for e in std::fs::read_dir(local.join("photos")).unwrap() {
        let p = e.unwrap().path();
        let key = ObjectPath::from(format!("photos/{}", p.file_name().unwrap().to_str().unwrap()));
        s3.put(&key, std::fs::read(&p).unwrap().into()).await.unwrap();
    }
    s3.put(&ObjectPath::from("labels.csv"), std::fs::read(local.join("labels.csv")).unwrap().into()).await.unwrap();
}

/// With only `AWS_PROFILE` (no keys in the environment), the photos and the lake are read with
/// the profile's credentials: ingest and Lance use one credential chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_profile_is_enough_for_the_photos_and_the_lake() {
    let (_server, port) = moto();
    create_bucket(port, "profiled").await;
    let f = common::demo(3, 3, 22);
    let aws = f.dir.path().join("aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(aws.join("credentials"), "[survey]\naws_access_key_id = profilekey\naws_secret_access_key = profilesecret\n").unwrap();
    std::fs::write(aws.join("config"), "[profile survey]\nregion = us-east-1\n").unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    set_env(&[
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_PROFILE", "survey"),
        ("AWS_SHARED_CREDENTIALS_FILE", aws.join("credentials").to_str().unwrap()),
        ("AWS_CONFIG_FILE", aws.join("config").to_str().unwrap()),
        // Nothing may reach for an instance role outside loopback.
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"] {
        // SAFETY: as in set_env.
        unsafe { std::env::remove_var(k) };
    }
    let s3 = AmazonS3Builder::from_env().with_bucket_name("profiled").with_access_key_id("x").with_secret_access_key("y").build().unwrap();
    upload_demo(&s3, &f).await;
    let text = std::fs::read_to_string(&f.pipeline)
        .unwrap()
        .replace("file://lake", "s3://profiled/lake")
        .replace("file://demo-lake/photos", "s3://profiled/photos")
        .replace("file://demo-lake/labels.csv", "s3://profiled/labels.csv");
    std::fs::write(&f.pipeline, text).unwrap();
    let plan = pipeline::load(&f.pipeline, &[]).await.unwrap();
    let report = dag::run(&plan, &RunOptions { quiet: true, until: Some("ingest".into()), ..Default::default() }).await.unwrap();
    let ingest = report.stage("ingest").unwrap();
    assert_eq!(ingest.status, Status::Succeeded, "{report:#?}");
    let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
    let (_, b) = pipeline::query::query(&lake, "SELECT count(*) FROM images").await.unwrap();
    assert_eq!(b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0) as u64, ingest.rows_out);
    assert!(ingest.rows_out > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_pipeline_with_photos_lake_and_models_on_s3() {
    let (_server, port) = moto();
    create_bucket(port, "survey").await;
    set_env(&test_keys(&format!("http://127.0.0.1:{port}")));
    let f = common::demo(3, 3, 21);
    let s3 = AmazonS3Builder::from_env().with_bucket_name("survey").build().unwrap();
    upload_demo(&s3, &f).await;

    let text = std::fs::read_to_string(&f.pipeline)
        .unwrap()
        .replace("file://lake", "s3://survey/lake")
        .replace("file://demo-lake/photos", "s3://survey/photos")
        .replace("file://demo-lake/labels.csv", "s3://survey/labels.csv");
    std::fs::write(&f.pipeline, text).unwrap();
    let plan = pipeline::load(&f.pipeline, &[]).await.unwrap();
    assert_eq!(plan.lake, "s3://survey/lake");
    let report = dag::run(&plan, &RunOptions { quiet: true, ..Default::default() }).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == Status::Succeeded), "{report:#?}");

    let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
    assert_eq!(lake.tables().await.unwrap(), vec!["clean", "crops", "detections", "embeddings", "evaluate", "images", "models", "promotions", "proposals", "rejects", "runs", "submissions", "train", "usable"]);
    let (_, b) = pipeline::query::query(&lake, "SELECT uri FROM rejects").await.unwrap();
    let rejected: BTreeSet<String> = b.iter().flat_map(|b| b.column(0).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>()).collect();
    let want: BTreeSet<String> = f.truth.iter().filter(|(_, (_, e))| e == "reject").map(|(p, _)| format!("s3://survey/photos/{p}")).collect();
    assert_eq!(rejected, want);
    // The model's files went to the bucket, next to the tables.
    let listed: Vec<String> = s3
        .list(Some(&ObjectPath::from("lake/models")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    // Each epoch's checkpoint under its own name (the last one stays), the manifest last.
    for f in ["best.safetensors", "model.json", "last-0002.safetensors", "last-0002.optim.safetensors", "last.json", "_manifest.json"] {
        assert!(listed.iter().any(|l| l.ends_with(f)), "{f} not uploaded: {listed:?}");
    }
    assert!(listed.iter().any(|l| l.contains("/tensorboard/events.out.tfevents.")), "{listed:?}");
    assert!(!listed.iter().any(|l| l.contains("last-0001")), "an older checkpoint leaves the bucket: {listed:?}");
    let again = dag::run(&plan, &RunOptions { quiet: true, ..Default::default() }).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");

    // One writer at a time on S3: the runs gave their lease back; a held lease turns a run away
    // naming its holder; an expired one (its holder died) is taken over.
    let record = ObjectPath::from(format!("lake/{}", lease::RECORD));
    assert!(s3.head(&record).await.is_err(), "released after the run");
    let ttl = std::time::Duration::from_secs(60);
    let held = Lease::acquire(&plan.lake, &Default::default(), Holder::new("run X of pipeline `other`", ttl), ttl, Wait::No).await.unwrap();
    let busy = dag::run(&plan, &RunOptions { quiet: true, ..Default::default() }).await.unwrap_err().to_string();
    assert!(busy.contains("s3://survey/lake") && busy.contains("run X of pipeline `other`"), "{busy}");
    held.release().await;
    let mut dead = Holder::new("run Y that was killed", ttl);
    dead.expires_ms = 0;
    s3.put(&record, serde_json::to_vec(&dead).unwrap().into()).await.unwrap();
    let again = dag::run(&plan, &RunOptions { quiet: true, ..Default::default() }).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    assert!(s3.head(&record).await.is_err(), "released after the run");

    // A model folder whose upload was cut short (a file that is not the one its manifest lists)
    // is refused by name, never loaded.
    let model_id = pipeline::lake::models::current(&lake, "train").await.unwrap().unwrap().model_id;
    assert!(pipeline::lake::models::model_dir(&lake, &model_id).await.is_ok());
    let best = ObjectPath::from(format!("lake/models/{model_id}/best.safetensors"));
    let bytes = s3.get(&best).await.unwrap().bytes().await.unwrap();
    s3.put(&best, bytes.slice(..bytes.len() / 2).into()).await.unwrap();
    let e = pipeline::lake::models::model_dir(&lake, &model_id).await.err().expect("a cut upload is refused").to_string();
    assert!(e.contains(&format!("models/{model_id} is incomplete")) && e.contains("`best.safetensors` is not the file its manifest lists"), "{e}");
}
