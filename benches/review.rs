//! The review page's data routes on a large lake (#9: "pages load in under 300 ms p95 on a lake
//! of 100k photos, no full-table scans per request"), in one run.
//!
//!     cargo bench --profile dev --bench review -- [--photos 100000] [--requests 300]
//!
//! Makes a lake of `--photos` photos in a temp dir: table `embeddings` (256-d unit vectors, a
//! fifth of the photos unlabelled, 5,000 individuals), `proposals` (5 per photo, as `submit`
//! writes them) and 1,000 `decisions`; serves it with `pipeline serve`'s router on loopback
//! (uploads off: no model) and times, one connection at a time:
//! * `GET /review/queue?limit=200` right after a decision (the queue made again) and from its
//!   cache;
//! * `GET /review/photos/{id}` over unlabelled photos (embedding lookup, 100 nearest, proposals,
//!   decisions);
//! * `POST /decisions`;
//! * `GET /photos/{id}/thumbnail?side=256` of photos of 4000×3000 JPEG files (the first
//!   `--thumbs` photos point at 20 such files, each photo with its own content hash): the
//!   first request of each (decoded, then kept in the lake) and the second (read back).
//!
//! Prints p50, p95 and p99 per route.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field};
use pipeline::answer::Service;
use pipeline::lake::{Catalog, Lake, WriteKind};
use rand::{Rng, SeedableRng};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

const DIM: usize = 256;

async fn write(lake: &Lake, table: &str, batches: Vec<RecordBatch>) {
    let mut sink = lake.sink(table, Catalog::builtin(table), WriteKind::Overwrite);
    for b in batches {
        sink.send(b).await.expect("send");
    }
    sink.finish().await.expect("commit");
}

fn percentiles(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let p = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.95), p(0.99))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let n: usize = arg(&args, "--photos", 100_000);
    let requests: usize = arg(&args, "--requests", 300);
    let thumbs: usize = arg(&args, "--thumbs", 100);
    let dir = tempfile::tempdir().expect("temp dir");
    // Camera-sized photos for the thumbnails: 20 files of 4000×3000 (smooth gradients and noise,
    // JPEG quality 90).
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).expect("photos dir");
    for f in 0..20u32 {
        let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
            let n = ((x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ f) >> 7) as u8 & 31;
            image::Rgb([((x / 16) as u8).wrapping_add(n), ((y / 12) as u8).wrapping_add(n), (f * 12) as u8])
        });
        let mut out = std::io::BufWriter::new(std::fs::File::create(photos.join(format!("{f}.jpg"))).expect("photo"));
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).expect("encode");
    }
    let uri_of = |i: usize| if i < thumbs { format!("file://{}/{}.jpg", photos.display(), i % 20) } else { format!("file:///nowhere/P{i:07}.jpg") };
    let hash_of = |i: usize| (i < thumbs).then(|| blake3::hash(format!("photo {i}").as_bytes()).to_hex().to_string());
    let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::load(None).expect("catalog"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let model = "bench-0123456789ab";
    let id = |i: usize| format!("P{i:07}.jpg");
    let label = |i: usize| (i % 5 != 0).then(|| format!("W{:05}", i % 5000));

    let t = Instant::now();
    let mut batches = Vec::new();
    for start in (0..n).step_by(10_000) {
        let rows: Vec<usize> = (start..(start + 10_000).min(n)).collect();
        let mut v: Vec<f32> = Vec::with_capacity(rows.len() * DIM);
        for _ in &rows {
            let x: Vec<f32> = (0..DIM).map(|_| rng.random::<f32>() - 0.5).collect();
            let norm = x.iter().map(|a| a * a).sum::<f32>().sqrt();
            v.extend(x.iter().map(|a| a / norm));
        }
        let vectors = FixedSizeListArray::try_new(Arc::new(Field::new("item", DataType::Float32, true)), DIM as i32, Arc::new(Float32Array::from(v)), None)
            .expect("vectors");
        // The declared `vector<float32, *>` column takes this batch's dimension.
        let base = Catalog::builtin("embeddings");
        let fields: Vec<Arc<Field>> = base
            .fields()
            .iter()
            .map(|f| if f.name() == "embedding" { Arc::new(Field::new("embedding", vectors.data_type().clone(), false)) } else { f.clone() })
            .collect();
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        batches.push(
            RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|&i| id(i)))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|&i| uri_of(i)))),
                    Arc::new(StringArray::from_iter(rows.iter().map(|&i| label(i)))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|_| model))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "none"))),
                    Arc::new(vectors),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "bench"))),
                    Arc::new(StringArray::from_iter(rows.iter().map(|&i| hash_of(i)))),
                ],
            )
            .expect("embeddings batch"),
        );
    }
    write(&lake, "embeddings", batches).await;
    let mut batches = Vec::new();
    for start in (0..n).step_by(20_000) {
        let rows: Vec<(usize, usize)> = (start..(start + 20_000).min(n)).flat_map(|i| (0..5).map(move |r| (i, r))).collect();
        batches.push(
            RecordBatch::try_new(
                Catalog::builtin("proposals"),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|&(i, _)| id(i)))),
                    Arc::new(Int32Array::from_iter_values(rows.iter().map(|&(_, r)| r as i32 + 1))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|&(i, r)| format!("W{:05}", (i * 7 + r * 13) % 5000)))),
                    Arc::new(Float32Array::from_iter_values(rows.iter().map(|&(_, r)| 0.9 - r as f32 * 0.05))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|_| model))),
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "bench"))),
                ],
            )
            .expect("proposals batch"),
        );
    }
    write(&lake, "proposals", batches).await;
    let decided: Vec<_> = (0..1000)
        .map(|k| pipeline::lake::decisions::Decision::new(&id(k * 5), pipeline::lake::decisions::Kind::Unsure, None, "bench").expect("decision"))
        .collect();
    pipeline::lake::decisions::append(&lake, &decided).await.expect("decisions");
    println!("lake of {n} photos ({} unlabelled, 1000 of them decided) made in {:.1} s", n / 5, t.elapsed().as_secs_f64());

    let service = Arc::new(Service::open(lake, "embeddings", tch::Device::Cpu, Default::default()).await.expect("service"));
    println!("search: {}", service.now().source.describe());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move { axum::serve(listener, pipeline::serve::router(service, Default::default())).await });
    let client = reqwest::Client::builder().tcp_nodelay(true).build().expect("client");
    let base = format!("http://{addr}");
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move {
            let t = Instant::now();
            let r = client.get(&url).send().await.expect("request");
            let status = r.status().as_u16();
            let _ = r.bytes().await.expect("body");
            assert_eq!(status, 200, "{url}");
            t.elapsed().as_secs_f64() * 1000.0
        }
    };
    let decide = |photo: String| {
        let client = client.clone();
        let url = format!("{base}/decisions");
        async move {
            let body = format!("{{\"photo_id\":\"{photo}\",\"decision\":\"unsure\"}}");
            let t = Instant::now();
            let r = client.post(&url).header("content-type", "application/json").body(body).send().await.expect("request");
            assert_eq!(r.status().as_u16(), 201);
            t.elapsed().as_secs_f64() * 1000.0
        }
    };
    // Warm-up: the first requests open the tables' files.
    get("/review/queue?limit=200".into()).await;
    get(format!("/review/photos/{}", id(5001))).await;

    let (mut fresh, mut cached, mut photo, mut posted) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..requests {
        // An unlabelled, undecided photo: a multiple of 5 above the decided ones.
        let p = id(5005 + k * 5 * 7 % (n - 5010));
        photo.push(get(format!("/review/photos/{p}")).await);
        if k % 10 == 0 {
            posted.push(decide(p).await);
            fresh.push(get("/review/queue?limit=200".into()).await);
        }
        cached.push(get("/review/queue?limit=200".into()).await);
    }
    // Thumbnails: each photo's first request decodes its 12-MP file and keeps the result in the
    // lake; the second reads it back.
    let (mut decoded, mut kept) = (Vec::new(), Vec::new());
    for i in 0..thumbs {
        decoded.push(get(format!("/photos/{}/thumbnail?side=256", id(i))).await);
    }
    for i in 0..thumbs {
        kept.push(get(format!("/photos/{}/thumbnail?side=256", id(i))).await);
    }
    server.abort();
    println!("| route ({n} photos) | requests | p50 ms | p95 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for (name, ms) in [
        ("GET /review/queue, made again (after a decision)", fresh),
        ("GET /review/queue, cached", cached),
        ("GET /review/photos/{id}", photo),
        ("POST /decisions", posted),
        ("GET /photos/{id}/thumbnail, first (decoded from 4000×3000)", decoded),
        ("GET /photos/{id}/thumbnail, again (kept in the lake)", kept),
    ] {
        let len = ms.len();
        let (a, b, c) = percentiles(ms);
        println!("| {name} | {len} | {a:.1} | {b:.1} | {c:.1} |");
    }
}
