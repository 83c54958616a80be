//! Object storage that misbehaves: the S3 server (moto) behind a fault-injecting proxy on
//! loopback that answers requests with 503 SlowDown (throttling), 500, a response cut off
//! mid-body (a reset connection) or a response slower than the pipeline's request timeout, and
//! one photo that stays broken. The run finishes with every other photo; the broken one is a
//! retryable reject, ingested by the next run once the store heals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::AsArray;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use object_store::aws::AmazonS3Builder;
use pipeline::dag::{self, RunOptions, ledger::Status};
use pipeline::lake::{Catalog, Lake};

use crate::common;
use crate::s3::{create_bucket, moto, set_env, test_keys, upload_demo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fault {
    Throttle,
    ServerError,
    Reset,
    Slow,
}

const FAULTS: [Fault; 4] = [Fault::Throttle, Fault::ServerError, Fault::Reset, Fault::Slow];

struct Proxy {
    upstream: String,
    client: reqwest::Client,
    /// Requests seen per method and path: the first of each gets a fault (all but one in
    /// five), the retries go through.
    seen: Mutex<HashMap<String, u64>>,
    injected: Mutex<HashMap<Fault, u64>>,
    /// Requests for this key fail with 503 for as long as it is set.
    broken: Mutex<Option<String>>,
    broken_hits: AtomicU64,
    slow: Duration,
    started: AtomicBool,
}

fn xml_error(status: StatusCode, code: &str) -> Response {
    let body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test's proxy</Message></Error>");
    Response::builder().status(status).header("content-type", "application/xml").body(Body::from(body)).unwrap()
}

async fn forward(State(p): State<Arc<Proxy>>, req: Request) -> Response {
    p.started.store(true, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map(|x| x.to_string()).unwrap_or_default();
    let key = format!("{} {}", parts.method, parts.uri.path());
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    if p.broken.lock().unwrap().as_ref().is_some_and(|b| parts.uri.path().ends_with(b.as_str())) {
        p.broken_hits.fetch_add(1, Ordering::SeqCst);
        return xml_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    }
    let attempt = {
        let mut seen = p.seen.lock().unwrap();
        let n = seen.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    // Faults on GETs of objects (photos, labels): the reads every stage makes.
    let fault = (attempt == 1 && parts.method == "GET" && !parts.uri.path().ends_with('/')).then(|| {
        let h = blake3::hash(key.as_bytes()).as_bytes()[0] as usize;
        (h % 5 < 4).then(|| FAULTS[h % 4])
    });
    let fault = fault.flatten();
    if let Some(f) = fault {
        *p.injected.lock().unwrap().entry(f).or_insert(0) += 1;
    }
    match fault {
        Some(Fault::Throttle) => return xml_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown"),
        Some(Fault::ServerError) => return xml_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        Some(Fault::Slow) => tokio::time::sleep(p.slow).await,
        _ => {}
    }
    let mut headers = HeaderMap::new();
    for (k, v) in parts.headers.iter() {
        if k != "host" && k != "content-length" {
            headers.append(k.clone(), v.clone());
        }
    }
    let up = p.client.request(parts.method.clone(), format!("{}{path}", p.upstream)).headers(headers).body(body).send().await;
    let up = match up {
        Ok(r) => r,
        Err(e) => return Response::builder().status(StatusCode::BAD_GATEWAY).body(Body::from(e.to_string())).unwrap(),
    };
    let status = up.status();
    let mut out = Response::builder().status(status);
    for (k, v) in up.headers() {
        if k != "transfer-encoding" && k != "connection" {
            out = out.header(k, v);
        }
    }
    let bytes = up.bytes().await.unwrap_or_default();
    if fault == Some(Fault::Reset) && bytes.len() > 1 {
        // The headers (with the whole length) and half the body, then the connection drops.
        let half = bytes.slice(..bytes.len() / 2);
        let cut = futures::stream::iter([Ok::<Bytes, std::io::Error>(half), Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected reset"))]);
        return out.body(Body::from_stream(cut)).unwrap();
    }
    out.body(Body::from(bytes)).unwrap()
}

async fn count(lake: &Lake, sql: &str) -> i64 {
    let (_, b) = pipeline::query::query(lake, sql).await.unwrap();
    b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_store_loses_no_photo_and_what_stays_broken_is_retried_next_run() {
    let (_server, port) = moto();
    create_bucket(port, "faulty").await;
    let f = common::demo(4, 3, 23);
    let direct = AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_allow_http(true)
        .with_bucket_name("faulty")
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap();
    upload_demo(&direct, &f).await;

    let broken_photo = f.truth.iter().find(|(_, (_, e))| e != "reject").map(|(p, _)| p.clone()).unwrap();
    let proxy = Arc::new(Proxy {
        upstream: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
        seen: Mutex::new(HashMap::new()),
        injected: Mutex::new(HashMap::new()),
        broken: Mutex::new(Some(broken_photo.clone())),
        broken_hits: AtomicU64::new(0),
        slow: Duration::from_millis(2500),
        started: AtomicBool::new(false),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(forward).with_state(proxy.clone());
    let served = tokio::spawn(async move { axum::serve(listener, app).await });

    // Every request of the run goes through the proxy.
    set_env(&test_keys(&format!("http://{addr}")));
    set_env(&[("AWS_EC2_METADATA_DISABLED", "true")]);
    // Photos and labels behind the proxy; the lake on local disk. A request that takes over a
    // second is given up and tried again (the slow responses take 2.5 s).
    let text = std::fs::read_to_string(&f.pipeline)
        .unwrap()
        .replace("file://demo-lake/photos", "s3://faulty/photos")
        .replace("file://demo-lake/labels.csv", "s3://faulty/labels.csv")
        .replace("[stages.ingest]\n", "[pipeline.storage]\nretries = 3\nretry_timeout = 30\ntimeout = 1\nconnect_timeout = 1\n\n[stages.ingest]\n");
    std::fs::write(&f.pipeline, text).unwrap();
    let plan = pipeline::load(&f.pipeline, &[]).await.unwrap();
    let opts = RunOptions { quiet: true, until: Some("embed".into()), ..Default::default() };
    let report = dag::run(&plan, &opts).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == Status::Succeeded), "{report:#?}");
    assert!(proxy.started.load(Ordering::SeqCst));
    let injected = proxy.injected.lock().unwrap().clone();
    for fault in FAULTS {
        assert!(injected.get(&fault).copied().unwrap_or(0) > 0, "no {fault:?} was injected: {injected:?}");
    }
    // Ingest's 4 fetches, each a request and `retries = 3` retries of it: the setting reached
    // the photos' store.
    assert_eq!(proxy.broken_hits.load(Ordering::SeqCst), 16, "4 fetches × (1 + 3 retries) of the broken photo");

    let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
    let readable = f.truth.values().filter(|(_, e)| e != "reject").count() as i64;
    let rejects = f.truth.values().filter(|(_, e)| e == "reject").count() as i64;
    assert_eq!(count(&lake, "SELECT count(*) FROM images").await, readable - 1, "every photo but the broken one");
    assert_eq!(count(&lake, "SELECT count(*) FROM embeddings").await, readable - 1);
    assert_eq!(count(&lake, "SELECT count(*) FROM rejects").await, rejects + 1);
    let (_, b) = pipeline::query::query(&lake, "SELECT uri, detail FROM rejects WHERE reason = 'fetch_error'").await.unwrap();
    assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "only the broken photo is a retryable reject");
    let uri = b[0].column(0).as_string::<i32>().value(0).to_string();
    assert!(uri.ends_with(&broken_photo), "{uri}");
    println!(
        "faults injected: {injected:?}; the broken photo asked for {} times; photos in: {} of {readable} (1 retryable reject, 0 lost)",
        proxy.broken_hits.load(Ordering::SeqCst),
        readable - 1
    );

    // The store heals: the next run ingests the photo, and only it.
    *proxy.broken.lock().unwrap() = None;
    let report = dag::run(&plan, &opts).await.unwrap();
    assert!(report.stages.iter().all(|s| matches!(s.status, Status::Succeeded | Status::UpToDate)), "{report:#?}");
    assert_eq!(count(&lake, "SELECT count(*) FROM images").await, readable);
    assert_eq!(count(&lake, "SELECT count(*) FROM rejects").await, rejects);
    assert_eq!(count(&lake, "SELECT count(*) FROM rejects WHERE reason = 'fetch_error'").await, 0);
    println!("after the store healed: photos in: {readable} of {readable}");
    served.abort();
}
