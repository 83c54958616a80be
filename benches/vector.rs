//! Vector search on synthetic embeddings beside an exact numpy peer, in one run.
//!
//!     cargo bench --profile release --bench vector -- [--rows 100000] [--dim 512] [--queries 200]
//!         [--flat-queries 20] [--pq 20/10/80,10/10/80] [--hnsw 20/0/80,10/0/40]   (nprobes/refine/ef)
//!
//! For each of flat (Lance's exact search, no index; on the first `--flat-queries` queries),
//! flat in memory (`vector::InMemory`, what `submit` and `serve` search without an index),
//! IVF_PQ and IVF_HNSW_SQ over the same Lance table, at each search setting given: build
//! time, recall@20 against exact top-20 (brute force in memory), p50/p99 latency of single
//! queries and the throughput of 8 concurrent queries; then benches/peer_numpy_knn.py over the same
//! vectors (matrix product + argpartition). Vectors: unit-length, around 1000 cluster centres
//! (embeddings of individuals), queries drawn the same way.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use futures::StreamExt;
use pipeline::lake::{Catalog, Lake, WriteKind};
use pipeline::model::data::Photo;
use pipeline::model::data::embedding_batch;
use pipeline::stages::index::IndexStage;
use pipeline::tables::EmbeddingSet;
use pipeline::vector::{self, InMemory, SearchParams, Source};
use rand::{Rng, SeedableRng};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn vectors(n: usize, dim: usize, seed: u64, centres: &[f32]) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let nc = centres.len() / dim;
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = rng.random_range(0..nc);
        let v: Vec<f32> = centres[c * dim..(c + 1) * dim].iter().map(|x| x + rng.random_range(-0.5..0.5f32)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}

fn batch(start: usize, dim: usize, values: &[f32]) -> RecordBatch {
    let photos: Vec<Photo> =
        (start..start + values.len() / dim).map(|i| Photo { photo_id: format!("p{i:08}"), uri: format!("p{i:08}"), label: None, crop: None, content_hash: None }).collect();
    embedding_batch(&photos, values, dim, "bench", "none", "bench", &Default::default()).expect("batch")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let rows: usize = arg(&args, "--rows", 100_000);
    let dim: usize = arg(&args, "--dim", 512);
    let nq: usize = arg(&args, "--queries", 200);
    let dir = tempfile::tempdir().expect("temp dir");
    let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::load(None).expect("catalog"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let centres: Vec<f32> = (0..1000 * dim).map(|_| rng.random_range(-1.0..1.0f32)).collect();
    println!("{rows} rows x {dim}-d, {nq} queries, k = 20");
    let t = Instant::now();
    let mut base: Vec<f32> = Vec::with_capacity(rows * dim);
    let mut sink = lake.sink("embeddings", Catalog::builtin("embeddings"), WriteKind::Overwrite);
    for (i, start) in (0..rows).step_by(50_000).enumerate() {
        let n = 50_000.min(rows - start);
        let v = vectors(n, dim, 100 + i as u64, &centres);
        base.extend_from_slice(&v);
        sink.send(batch(start, dim, &v)).await.expect("send");
    }
    sink.finish().await.expect("write");
    println!("wrote the table in {:.1}s", t.elapsed().as_secs_f64());
    let queries = vectors(nq, dim, 1, &centres);

    // Exact answers once, by brute force in memory (libtorch matrix product + top-k): Lance's
    // own exact search is timed below on a subset, as it is far too slow at 1M for every query.
    let exact: Vec<Vec<vector::Hit>> = {
        let base = tch::Tensor::from_slice(&base).view([rows as i64, dim as i64]);
        let qs = tch::Tensor::from_slice(&queries).view([nq as i64, dim as i64]);
        let (_, idx) = qs.mm(&base.tr()).topk(20, 1, true, true);
        let idx: Vec<i64> = Vec::<i64>::try_from(idx.flatten(0, 1)).expect("indices");
        idx.chunks(20)
            .map(|c| c.iter().map(|&i| vector::Hit { photo_id: format!("p{i:08}"), uri: format!("p{i:08}"), individual_id: None, distance: 0.0 }).collect())
            .collect()
    };
    let ds = lake.open("embeddings").await.expect("open").expect("table");
    let exact_p = SearchParams { exact: true, ..Default::default() };
    let nflat = arg(&args, "--flat-queries", nq.min(20)).min(nq);
    let mut flat_lat = Vec::new();
    let mut flat_recall = 0.0;
    for (q, e) in queries.chunks(dim).take(nflat).zip(&exact) {
        let t = Instant::now();
        let a = vector::nearest(&ds, q, 20, &exact_p).await.expect("search");
        flat_lat.push(t.elapsed().as_secs_f64() * 1000.0);
        flat_recall += vector::recall(&a, e);
    }
    let ds = Arc::new(ds);
    let qps = |src: Source, n: usize| {
        let queries = queries.clone();
        async move {
            let t = Instant::now();
            let n = futures::stream::iter(queries.chunks(dim).take(n).map(|q| q.to_vec()).collect::<Vec<_>>())
                .map(|q| {
                    let src = src.clone();
                    async move { vector::similar(&src, &q, 20, vector::Expansion::OFF, None).await.expect("search").len() }
                })
                .buffer_unordered(8)
                .count()
                .await;
            n as f64 / t.elapsed().as_secs_f64()
        }
    };
    let flat_qps = qps(Source::Table(ds.clone(), exact_p.clone()), nflat).await;
    println!("columns: index | search settings | build | recall@20 | p50 ms | p99 ms | queries/s (8 concurrent)");
    println!(
        "| flat (Lance exact, {nflat} queries) | - | - | {:.3} | {:.2} | {:.2} | {:.1} |",
        flat_recall / nflat as f64,
        pct(&mut flat_lat.clone(), 0.5),
        pct(&mut flat_lat, 0.99),
        flat_qps
    );
    // Exact search over the vectors in memory: what `submit` and `serve` do without an index.
    // The set keeps the only copy of the vectors; numpy's file is written from it below.
    let set = Arc::new(EmbeddingSet {
        model_id: "bench".into(),
        photo_ids: (0..rows).map(|i| format!("p{i:08}")).collect(),
        uris: (0..rows).map(|i| format!("p{i:08}")).collect(),
        labels: vec![None; rows],
        values: base,
        dim,
    });
    {
        let t = Instant::now();
        let src = Source::Memory(Arc::new(InMemory::new(set.clone())));
        let load = t.elapsed().as_secs_f64();
        let (mut lat, mut recall) = (Vec::new(), 0.0);
        for (q, e) in queries.chunks(dim).zip(&exact) {
            let t = Instant::now();
            let a = vector::similar(&src, q, 20, vector::Expansion::OFF, None).await.expect("search");
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            recall += vector::recall(&a, e);
        }
        let q = qps(src.clone(), nq).await;
        println!(
            "| flat (in memory) | - | {load:.1} s | {:.3} | {:.2} | {:.2} | {q:.0} |",
            recall / nq as f64,
            pct(&mut lat.clone(), 0.5),
            pct(&mut lat, 0.99)
        );
    }
    // Search settings per index: nprobes/refine/ef, refine 0 = none.
    let settings = |name: &str, default: &str| -> Vec<SearchParams> {
        let list = args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string());
        list.split(',')
            .map(|s| {
                let v: Vec<usize> = s.split('/').map(|x| x.parse().expect("nprobes/refine/ef")).collect();
                SearchParams { nprobes: Some(v[0]), refine: (v[1] > 0).then_some(v[1] as u32), ef: v.get(2).copied(), exact: false }
            })
            .collect()
    };
    for (kind, sets) in [("ivf_pq", settings("--pq", "20/10/80,10/10/80,5/5/80")), ("ivf_hnsw_sq", settings("--hnsw", "20/10/80,20/0/80,10/0/40,5/0/40"))] {
        let mut ds = lake.open("embeddings").await.expect("open").expect("table");
        let t = Instant::now();
        IndexStage::with_kind("embeddings", kind.parse().expect("index kind")).apply_with(&mut ds, rows, dim, |_| {}).await.expect("index");
        let build = t.elapsed().as_secs_f64();
        let ds = Arc::new(ds);
        for p in sets {
            let mut lat = Vec::new();
            let mut recall = 0.0;
            for (q, e) in queries.chunks(dim).zip(&exact) {
                let t = Instant::now();
                let a = vector::nearest(&ds, q, 20, &p).await.expect("search");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                recall += vector::recall(&a, e);
            }
            let q = qps(Source::Table(ds.clone(), p.clone()), nq).await;
            println!(
                "| {kind} | nprobes {} refine {} ef {} | {build:.1} s | {:.3} | {:.2} | {:.2} | {q:.0} |",
                p.nprobes.unwrap_or(0),
                p.refine.map(|r| r.to_string()).unwrap_or("-".into()),
                p.ef.unwrap_or(0),
                recall / nq as f64,
                pct(&mut lat.clone(), 0.5),
                pct(&mut lat, 0.99)
            );
        }
    }
    let bf = dir.path().join("base.f32");
    let qf = dir.path().join("queries.f32");
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(std::fs::File::create(&bf).expect("create base"));
        for x in &set.values {
            w.write_all(&x.to_le_bytes()).expect("write base");
        }
        w.flush().expect("write base");
    }
    std::fs::write(&qf, queries.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).expect("write queries");
    let venv = std::env::var("VIRTUAL_ENV").unwrap_or_else(|_| format!("{}/.cache/pipeline/venv", std::env::var("HOME").unwrap_or_default()));
    let out = std::process::Command::new(format!("{venv}/bin/python"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/peer_numpy_knn.py"))
        .args([bf.to_str().expect("path"), qf.to_str().expect("path"), &dim.to_string(), "20"])
        .output()
        .expect("numpy peer");
    println!("numpy peer: {}", String::from_utf8_lossy(&out.stdout).trim());
}
