//! The vector index against exact search on the same table: recall@20 of IVF_HNSW_SQ and of
//! IVF_PQ with re-ranking, a delta index after an append, and the `knn` SQL function.

use arrow::array::{AsArray, RecordBatch};
use pipeline::lake::{Catalog, Lake, WriteKind};
use pipeline::model::data::Photo;
use pipeline::model::data::embedding_batch;
use pipeline::stages::index::IndexStage;
use pipeline::vector::{self, SearchParams, Source};
use rand::{Rng, SeedableRng};

const DIM: usize = 64;

/// `n` unit vectors around 50 cluster centres (like embeddings of 50 individuals).
fn vectors(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<f32> = (0..50 * DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut out = Vec::with_capacity(n * DIM);
    for i in 0..n {
        let c = &centres[(i % 50) * DIM..(i % 50 + 1) * DIM];
        let v: Vec<f32> = c.iter().map(|x| x + rng.random_range(-0.6..0.6)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(v.iter().map(|x| x / norm));
    }
    out
}

fn batch(start: usize, values: &[f32]) -> RecordBatch {
    let photos: Vec<Photo> = (start..start + values.len() / DIM)
        .map(|i| Photo { photo_id: format!("p{i:06}"), uri: format!("file:///x/p{i:06}.jpg"), label: Some(format!("W{}", i % 50)), crop: None, content_hash: None })
        .collect();
    embedding_batch(&photos, values, DIM, "m", "none", "r", &Default::default()).unwrap()
}

/// A lake in a temporary folder whose table `embeddings` holds `all` (rows of `DIM`).
async fn lake_with(all: &[f32]) -> (tempfile::TempDir, Lake) {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::load(None).unwrap());
    let mut sink = lake.sink("embeddings", Catalog::builtin("embeddings"), WriteKind::Overwrite);
    sink.send(batch(0, all)).await.unwrap();
    sink.finish().await.unwrap();
    (dir, lake)
}

async fn mean_recall(ds: &lance::Dataset, queries: &[f32], p: &SearchParams) -> f64 {
    let exact = SearchParams { exact: true, ..p.clone() };
    let mut sum = 0.0;
    let n = queries.len() / DIM;
    for q in queries.chunks(DIM) {
        let a = vector::nearest(ds, q, 20, p).await.unwrap();
        let e = vector::nearest(ds, q, 20, &exact).await.unwrap();
        assert_eq!(e.len(), 20);
        sum += vector::recall(&a, &e);
    }
    sum / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_top20_matches_exact_top20() {
    let n = 3000;
    let (_dir, lake) = lake_with(&vectors(n, 1)).await;
    let queries = vectors(40, 2);

    for (kind, min_recall) in [("ivf_hnsw_sq", 0.9), ("ivf_pq", 0.9)] {
        let mut ds = lake.open("embeddings").await.unwrap().unwrap();
        let stage = IndexStage::with_kind("embeddings", kind.parse().unwrap());
        let said = stage.apply_with(&mut ds, n, DIM, |_| {}).await.unwrap();
        assert!(said.contains("built"), "{said}");
        assert!(vector::has_index(&ds).await.unwrap());
        assert_eq!(vector::index_kind(&ds).await.unwrap().as_deref(), Some(kind));
        // The settings every reader uses unless told otherwise: those measured for the kind.
        let p = SearchParams::for_table(&ds, &Default::default()).await.unwrap();
        assert_eq!(p, SearchParams::for_index(Some(kind)));
        let r = mean_recall(&ds, &queries, &p).await;
        assert!(r >= min_recall, "{kind}: recall@20 {r}");
        // Asking again changes nothing.
        let again = stage.apply_with(&mut ds, n, DIM, |_| {}).await.unwrap();
        assert!(again.contains("current"), "{again}");
    }

    // An append gets a delta index; the new rows are found.
    let mut sink = lake.sink("embeddings", Catalog::builtin("embeddings"), WriteKind::Append);
    let extra = vectors(200, 3);
    sink.send(batch(n, &extra)).await.unwrap();
    sink.finish().await.unwrap();
    let mut ds = lake.open("embeddings").await.unwrap().unwrap();
    let said = IndexStage::with_kind("embeddings", pipeline::stages::index::IndexKind::IvfPq).apply_with(&mut ds, n + 200, DIM, |_| {}).await.unwrap();
    assert!(said.contains("delta"), "{said}");
    let hits = vector::nearest(&ds, &extra[..DIM], 1, &SearchParams::default()).await.unwrap();
    assert_eq!(hits[0].photo_id, format!("p{n:06}"));

    // knn from SQL, joined with another table.
    let (_, b) = pipeline::query::query(
        &lake,
        "SELECT k.rank, k.photo_id, e.individual_id FROM knn('embeddings', 'p000007', 20) k \
         JOIN embeddings e ON e.uri = k.uri ORDER BY k.rank",
    )
    .await
    .unwrap();
    let rows: usize = b.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 20);
    let ids: Vec<String> = b.iter().flat_map(|b| b.column(1).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>()).collect();
    assert!(!ids.contains(&"p000007".to_string()), "the query is not its own neighbour");
    let e = pipeline::query::query(&lake, "SELECT * FROM knn('embeddings', 'nope', 20)").await.unwrap_err().to_string();
    assert!(e.contains("no photo `nope`"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_expansion_ranks_by_the_expanded_query_and_keeps_the_photos_own_distance() {
    let n = 600;
    let all = vectors(n, 5);
    let (_dir, lake) = lake_with(&all).await;
    let ds = std::sync::Arc::new(lake.open("embeddings").await.unwrap().unwrap());
    let row = |i: usize| &all[i * DIM..(i + 1) * DIM];
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let exact = Source::Table(ds.clone(), SearchParams { exact: true, ..Default::default() });
    // The same table in memory: what `submit` and `serve` search when there is no index.
    let memory = Source::for_serving(ds.clone(), "embeddings", &Default::default(), None).await.unwrap();
    assert!(matches!(memory, Source::Memory(_)), "no index: {}", memory.describe());
    let x = vector::Expansion { k: 5, alpha: 3.0 };
    let mut reordered = 0;
    for (q, src) in (0..n).step_by(37).flat_map(|q| [(q, &exact), (q, &memory)]) {
        let me = format!("file:///x/p{q:06}.jpg");
        let hits = vector::similar(src, row(q), 20, x, Some(&me)).await.unwrap();
        assert_eq!(hits.len(), 20);
        assert!(hits.iter().all(|h| h.uri != me), "the query photo is left out");
        // Brute force: the first 5 others, the expanded query, its top-20.
        let ranked = |v: &[f32]| {
            let mut o: Vec<usize> = (0..n).filter(|&j| j != q).collect();
            o.sort_by(|&a, &b| dot(v, row(b)).total_cmp(&dot(v, row(a))));
            o
        };
        let plain = ranked(row(q));
        let e = pipeline::metrics::expand_query(row(q), plain[..5].iter().map(|&j| (dot(row(q), row(j)), row(j))), 3.0);
        let want = ranked(&e);
        for (r, h) in hits.iter().enumerate() {
            let j: usize = h.photo_id[1..].parse().unwrap();
            assert!((dot(&e, row(j)) - dot(&e, row(want[r]))).abs() < 1e-4, "query {q} rank {}: p{j:06} where p{:06} belongs", r + 1, want[r]);
            assert!((h.distance - (1.0 - dot(row(q), row(j)))).abs() < 1e-4, "query {q}: distance {} to p{j:06}", h.distance);
        }
        let got: Vec<usize> = hits.iter().map(|h| h.photo_id[1..].parse().unwrap()).collect();
        reordered += usize::from(got != plain[..20]);
    }
    assert!(reordered > 0, "expansion changed no answer");
    // Off, it is the plain nearest search less the query photo.
    let me = "file:///x/p000000.jpg";
    let Source::Table(_, exact_p) = &exact else { unreachable!() };
    let plain = vector::nearest(&ds, row(0), 21, exact_p).await.unwrap();
    let plain: Vec<_> = plain.into_iter().filter(|h| h.uri != me).take(20).collect();
    for src in [&exact, &memory] {
        let off = vector::similar(src, row(0), 20, vector::Expansion::OFF, Some(me)).await.unwrap();
        assert_eq!(off.iter().map(|h| &h.uri).collect::<Vec<_>>(), plain.iter().map(|h| &h.uri).collect::<Vec<_>>(), "{}", src.describe());
        for (a, b) in off.iter().zip(&plain) {
            assert!((a.distance - b.distance).abs() < 1e-5, "{}: {} vs {}", src.describe(), a.distance, b.distance);
        }
    }
}

/// Exact search in memory agrees with Lance's exact scan on every query, rank by rank, and a
/// query of the wrong length is an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_search_in_memory_agrees_with_lances_exact_scan() {
    let n = 1500;
    let all = vectors(n, 11);
    let (_dir, lake) = lake_with(&all).await;
    let ds = std::sync::Arc::new(lake.open("embeddings").await.unwrap().unwrap());
    let memory = Source::for_serving(ds.clone(), "embeddings", &Default::default(), None).await.unwrap();
    let Source::Memory(m) = &memory else { panic!("no index, yet {}", memory.describe()) };
    assert_eq!(m.len(), n);
    let exact = SearchParams { exact: true, ..Default::default() };
    for q in vectors(25, 12).chunks(DIM) {
        let want = vector::nearest(&ds, q, 20, &exact).await.unwrap();
        let (got, vecs) = m.search(q, 20, true).unwrap();
        assert_eq!(got.len(), 20);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            // Equal distances may come in either order; the distances must agree rank by rank.
            assert!((g.distance - w.distance).abs() < 1e-5, "rank {}: {} ({}) vs {} ({})", r + 1, g.photo_id, g.distance, w.photo_id, w.distance);
        }
        assert!(vector::recall(&got, &want) >= 0.95, "ties aside, the same photos");
        assert!(got.windows(2).all(|w| w[0].distance <= w[1].distance), "nearest first");
        assert!(got[0].individual_id.is_some(), "labels come along");
        let j: usize = got[0].photo_id[1..].parse().unwrap();
        assert_eq!(vecs[0], all[j * DIM..(j + 1) * DIM], "the hit's own vector, p{j:06}");
    }
    let e = m.search(&[0.5; 3], 20, false).unwrap_err().to_string();
    assert!(e.contains("3 values") && e.contains(&DIM.to_string()), "{e}");
    // More than there are rows: all rows.
    assert_eq!(m.search(&vectors(1, 13), n + 50, false).unwrap().0.len(), n);
}
