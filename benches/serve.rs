//! Load test of `pipeline serve`'s HTTP API on loopback, in one run.
//!
//!     cargo bench --profile release --bench serve -- --lake file://$PWD/data/lake \
//!         [--table embeddings] [--concurrency 16] [--requests 4000] [--uploads 200]
//!
//! Serves the lake's embeddings table exactly as `pipeline serve` does (same router and limits,
//! same model worker), then drives it with reqwest from a bounded number of keep-alive
//! connections, each sending its next request when the last answer arrived (uploads at once:
//! `--concurrency`, so none is shed):
//! * `GET /similar/{id}?k=20` over photos of the table, one connection and then `--concurrency`;
//! * `POST /similar?k=20` with photos of the lake as the body (decode → detect and crop when the
//!   model was trained on crops → embed → search), one connection and then `--concurrency`,
//!   which shows what batching concurrent uploads on the model thread buys.
//!
//! Prints requests/s, p50 and p99 latency and the count of non-200 answers per case.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::array::{Array, StringArray};
use futures::TryStreamExt;
use pipeline::answer::{self, Service};
use pipeline::lake::{Catalog, Lake};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// One keep-alive connection of the HTTP client (reqwest).
struct Conn(reqwest::Client, SocketAddr);

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn(reqwest::Client::builder().pool_max_idle_per_host(1).tcp_nodelay(true).build().expect("client"), addr)
    }

    /// Sends one request and reads the whole answer: (status, body length).
    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, usize) {
        let r = self.0.request(method.parse().expect("method"), format!("http://{}{path}", self.1)).body(body.to_vec()).send().await;
        let r = r.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status().as_u16();
        let n = r.bytes().await.map(|b| b.len()).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, n)
    }
}

struct Case {
    name: String,
    rps: f64,
    p50: f64,
    p99: f64,
    failed: usize,
}

/// `total` requests from `concurrency` connections; request i is `make(i)`.
async fn drive(
    name: String,
    addr: SocketAddr,
    concurrency: usize,
    total: usize,
    make: Arc<dyn Fn(usize) -> (&'static str, String, Arc<Vec<u8>>) + Send + Sync>,
) -> Case {
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, make) = (next.clone(), make.clone());
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await;
                let (mut lat, mut failed) = (Vec::new(), 0usize);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let (method, path, body) = make(i);
                    let t = Instant::now();
                    let (status, _) = conn.request(method, &path, &body).await;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    failed += usize::from(status != 200);
                }
                (lat, failed)
            })
        })
        .collect();
    let (mut lat, mut failed) = (Vec::new(), 0);
    for w in workers {
        let (l, f) = w.await.expect("worker");
        lat.extend(l);
        failed += f;
    }
    let secs = t.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    Case { name, rps: total as f64 / secs, p50: pct(0.5), p99: pct(0.99), failed }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let Some(uri) = args.iter().position(|a| a == "--lake").and_then(|i| args.get(i + 1)).cloned() else {
        eprintln!("usage: cargo bench --profile release --bench serve -- --lake URI [--table T] [--concurrency C] [--requests N] [--uploads N]");
        std::process::exit(2);
    };
    let table: String = arg(&args, "--table", "embeddings".to_string());
    let concurrency: usize = arg(&args, "--concurrency", 16);
    let requests: usize = arg(&args, "--requests", 4000);
    let uploads: usize = arg(&args, "--uploads", 200);

    let lake = Lake::new(uri.clone(), Default::default(), Catalog::load(None).expect("catalog"));
    let ds = lake.open(&table).await.expect("open").unwrap_or_else(|| panic!("no table `{table}` in {uri}"));
    let mut scan = ds.scan();
    scan.project(&["photo_id", "uri"]).expect("project");
    let batches: Vec<_> = scan.try_into_stream().await.expect("scan").try_collect().await.expect("scan");
    let mut photos: Vec<(String, String)> = Vec::new();
    for b in &batches {
        let ids = b.column(0).as_any().downcast_ref::<StringArray>().expect("photo_id");
        let uris = b.column(1).as_any().downcast_ref::<StringArray>().expect("uri");
        photos.extend((0..b.num_rows()).filter(|&i| ids.is_valid(i)).map(|i| (ids.value(i).to_string(), uris.value(i).to_string())));
    }
    assert!(!photos.is_empty(), "table `{table}` is empty");
    // Uploads: up to 32 distinct photos of the lake, sent in turn.
    let mut bodies = Vec::new();
    for (_, u) in photos.iter().step_by((photos.len() / 32).max(1)).take(32) {
        bodies.push(Arc::new(answer::read_photo(u, lake.options()).await.expect("read photo")));
    }
    let mean_kb = bodies.iter().map(|b| b.len()).sum::<usize>() as f64 / bodies.len() as f64 / 1024.0;

    let service = Arc::new(Service::open(lake, &table, tch::Device::Cpu, Default::default()).await.expect("service over the table"));
    let shared = service.clone();
    let now = service.now();
    assert!(now.embedder.is_some(), "model of the table: {:?}", now.no_embedder);
    let model = now.model_id.clone();
    println!("search: {}", now.source.describe());
    drop(ds);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move { axum::serve(listener, pipeline::serve::router(service, pipeline::serve::Limits { uploads: concurrency.max(1), ..Default::default() })).await });
    println!(
        "{uri} table {table}: {} photos, model {model}; uploads are {} photos of the lake, {mean_kb:.0} KiB on average; {} threads",
        photos.len(),
        bodies.len(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    let ids: Arc<Vec<String>> = Arc::new(photos.into_iter().map(|(id, _)| id).collect());
    let empty = Arc::new(Vec::new());
    let get: Arc<dyn Fn(usize) -> (&'static str, String, Arc<Vec<u8>>) + Send + Sync> = {
        let ids = ids.clone();
        Arc::new(move |i| ("GET", format!("/similar/{}?k=20", ids[(i * 7919) % ids.len()]), empty.clone()))
    };
    let bodies = Arc::new(bodies);
    let post: Arc<dyn Fn(usize) -> (&'static str, String, Arc<Vec<u8>>) + Send + Sync> =
        Arc::new(move |i| ("POST", "/similar?k=20".to_string(), bodies[i % bodies.len()].clone()));

    // Warm-up: the first search opens the table's files, the first upload warms the model.
    drive("warm-up".into(), addr, 1, 20, get.clone()).await;
    drive("warm-up".into(), addr, 1, 4, post.clone()).await;
    let mut cases = Vec::new();
    for c in [1, concurrency] {
        cases.push(drive(format!("GET /similar/{{id}}?k=20, {c} connection(s)"), addr, c, requests, get.clone()).await);
    }
    let mut phases = String::new();
    for c in [1, concurrency] {
        let before = shared.now().embedder.as_ref().map(|e| e.phase_times().mean_ms());
        cases.push(drive(format!("POST /similar?k=20 (photo), {c} connection(s)"), addr, c, uploads, post.clone()).await);
        // Mean time of each phase over this case's uploads (sums after minus sums before).
        if let (Some((b, nb)), Some(e)) = (before, shared.now().embedder.as_ref()) {
            let (a, na) = e.phase_times().mean_ms();
            let n = (na - nb).max(1) as f64;
            let per: Vec<String> = (0..answer::PhaseTimes::NAMES.len())
                .map(|i| format!("{} {:.1} ms", answer::PhaseTimes::NAMES[i], (a[i] * na as f64 - b[i] * nb as f64) / n))
                .collect();
            phases.push_str(&format!("uploads, {c} connection(s), mean per upload: {}\n", per.join(", ")));
        }
    }
    server.abort();
    println!("| case | requests/s | p50 ms | p99 ms | non-200 |");
    println!("|---|---|---|---|---|");
    for c in &cases {
        println!("| {} | {:.1} | {:.2} | {:.2} | {} |", c.name, c.rps, c.p50, c.p99, c.failed);
    }
    print!("{phases}");
}
