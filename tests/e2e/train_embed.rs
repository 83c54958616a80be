//! End to end over the demo lake: ingest → clean → train → embed → evaluate, with training
//! shrunk to seconds (64×64 inputs, two epochs). Checks what each stage leaves in the lake.

use crate::common;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type};
use pipeline::dag::{self, ledger::Status};
use pipeline::lake::Lake;

async fn query(lake: &Lake, sql: &str) -> Vec<RecordBatch> {
    pipeline::query::query(lake, sql).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_photo_gets_a_unit_embedding_and_the_model_is_evaluated_and_registered() {
    let f = common::demo(6, 4, 11);
    let (plan, lake, opts) = common::run_fresh(&f).await;

    // One embedding per ingested photo, 256 float32, unit length, all of one model.
    let images = query(&lake, "SELECT count(*) FROM images").await[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0);
    let batches = query(&lake, "SELECT photo_id, model_id, embedding FROM embeddings").await;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows as i64, images);
    let mut models = std::collections::BTreeSet::new();
    let mut firsts = std::collections::BTreeSet::new();
    for b in &batches {
        match b.column(2).data_type() {
            DataType::FixedSizeList(item, 256) => assert_eq!(item.data_type(), &DataType::Float32),
            other => panic!("embedding has type {other}"),
        }
        let list = b.column(2).as_fixed_size_list();
        for i in 0..b.num_rows() {
            let v = list.value(i);
            let v = v.as_primitive::<Float32Type>();
            let norm: f32 = v.values().iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "row {i}: norm {norm}");
            firsts.insert((v.value(0) * 1e4).round() as i64);
        }
        models.extend(b.column(1).as_string::<i32>().iter().map(|s| s.unwrap().to_string()));
    }
    assert_eq!(models.len(), 1);
    // Photos are told apart: a collapsed model would give every photo the same vector.
    assert!(firsts.len() * 2 > rows, "only {} distinct embeddings among {rows}", firsts.len());
    let model_id = models.into_iter().next().unwrap();
    assert!(model_id.starts_with("train-"), "{model_id}");

    // The split: held-out individuals share no photo with training.
    let overlap = query(
        &lake,
        "SELECT count(*) FROM train a JOIN train b ON a.individual_id = b.individual_id \
         WHERE a.split = 'train' AND b.split = 'val_unseen'",
    )
    .await;
    assert_eq!(overlap[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 0);

    // Evaluation rows with metrics in range.
    let ev = query(&lake, "SELECT queries, gallery, precision_at_1, map_at_20, n_queries FROM evaluate ORDER BY queries, gallery").await;
    let got: Vec<(String, String)> = ev
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(|i| (b.column(0).as_string::<i32>().value(i).to_string(), b.column(1).as_string::<i32>().value(i).to_string())).collect::<Vec<_>>())
        .collect();
    assert!(got.contains(&("val_unseen".into(), "queries".into())), "{got:?}");
    assert!(got.contains(&("all".into(), "all".into())), "{got:?}");
    // The pipeline asks for α-query expansion too: every row again, re-ranked.
    let rr = query(&lake, "SELECT rerank, count(*) FROM evaluate GROUP BY rerank ORDER BY rerank").await;
    let rr: Vec<(String, i64)> = rr
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(|i| (b.column(0).as_string::<i32>().value(i).to_string(), b.column(1).as_primitive::<arrow::datatypes::Int64Type>().value(i))).collect::<Vec<_>>())
        .collect();
    assert_eq!(rr, vec![("aqe k=5 alpha=3".to_string(), got.len() as i64 / 2), ("none".to_string(), got.len() as i64 / 2)]);
    for b in &ev {
        for c in [2, 3] {
            let v = b.column(c).as_primitive::<arrow::datatypes::Float64Type>();
            assert!(v.values().iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    // Geometric re-ranking asked for: only `evaluate` and `submit` run again; each evaluation
    // row comes a third time, from the photos' crops as the model reads them (every photo
    // described, none unreadable, each with a detection read by its box).
    let boxed = query(&lake, "SELECT count(DISTINCT photo_id) FROM detections").await[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0);
    assert!(boxed > 0);
    let geo_plan = pipeline::load(&f.pipeline, &["evaluate.geometric=10".to_string(), "submit.geometric=10".to_string()]).await.unwrap();
    let r = dag::run(&geo_plan, &opts).await.unwrap();
    let ev_stage = r.stage("evaluate").unwrap();
    assert_eq!(ev_stage.status, Status::Succeeded, "{r:#?}");
    assert!(r.stages.iter().all(|s| s.status == Status::UpToDate || ["evaluate", "submit", "report"].contains(&s.stage.as_str())), "{r:#?}");
    let described = format!("local features of {images} photos ({boxed} cropped)");
    assert!(ev_stage.summary.contains(&described) && !ev_stage.summary.contains("unreadable"), "{}", ev_stage.summary);
    let submit = r.stage("submit").unwrap();
    assert!(submit.summary.contains("first 10 re-ranked geometrically") && submit.summary.contains(&format!("{images} photos, {boxed} cropped")), "{}", submit.summary);
    // The re-ranked submission is still 20 distinct photos per query, never the query.
    let geo_csv = std::fs::read_to_string(f.dir.path().join("submission.csv")).unwrap();
    assert_eq!(geo_csv.lines().count() as i64, images + 1);
    for line in geo_csv.lines().skip(1) {
        let (photo, neighbours) = line.split_once(',').unwrap();
        let n: std::collections::BTreeSet<&str> = neighbours.split(' ').collect();
        assert!(n.len() == 20 && !n.contains(photo), "{line}");
    }
    let geo = query(&lake, "SELECT rerank, count(*), min(precision_at_1), max(map_at_20) FROM evaluate WHERE rerank LIKE 'geometric%' GROUP BY rerank").await;
    assert_eq!(geo[0].num_rows(), 1);
    assert_eq!(geo[0].column(0).as_string::<i32>().value(0), "geometric k=10 w=0.3 min=8 side=384");
    assert_eq!(geo[0].column(1).as_primitive::<arrow::datatypes::Int64Type>().value(0), got.len() as i64 / 2);
    // Asked no more: `evaluate` runs again without it (and `report`, which reads it).
    let back = dag::run(&plan, &opts).await.unwrap();
    assert!(back.stages.iter().all(|s| s.status == Status::UpToDate || ["evaluate", "submit", "report"].contains(&s.stage.as_str())), "{back:#?}");

    // The registry row points at the model's files; its history has both epochs.
    let m = query(&lake, &format!("SELECT checkpoint_uri, history FROM models WHERE model_id = '{model_id}'")).await;
    assert_eq!(m[0].num_rows(), 1);
    let recorded = m[0].column(0).as_string::<i32>().value(0);
    assert_eq!(recorded, format!("models/{model_id}"), "recorded relative to the lake");
    let dir = lake.locate(recorded).strip_prefix("file://").unwrap().to_string();
    let history: serde_json::Value = serde_json::from_str(m[0].column(1).as_string::<i32>().value(0)).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 2);
    for f in ["best.safetensors", "model.json", "last-0002.safetensors", "last-0002.optim.safetensors", "last.json"] {
        assert!(std::path::Path::new(&dir).join(f).is_file(), "{f} missing in {dir}");
    }
    let tb = std::fs::read_dir(std::path::Path::new(&dir).join("tensorboard")).unwrap().next().unwrap().unwrap().path();
    let events = pipeline::model::tensorboard::read_scalars(&tb).unwrap();
    assert!(events.iter().any(|e| e.tag == "train/loss"));

    // The submission: every photo, exactly 20 distinct neighbours, never itself.
    let csv = std::fs::read_to_string(f.dir.path().join("submission.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("photo,neighbours"));
    let mut queries = 0;
    for line in lines {
        let (photo, neighbours) = line.split_once(',').unwrap();
        let n: Vec<&str> = neighbours.split(' ').collect();
        assert_eq!(n.len(), 20, "{line}");
        assert_eq!(n.iter().collect::<std::collections::BTreeSet<_>>().len(), 20, "distinct: {line}");
        assert!(!n.contains(&photo), "{photo} is its own neighbour");
        queries += 1;
    }
    assert_eq!(queries as i64, images);
    let per_query = query(&lake, "SELECT query, count(*) AS n, count(DISTINCT neighbour) AS d, sum(CAST(query = neighbour AS INT)) AS selfs FROM submissions GROUP BY query").await;
    for b in &per_query {
        for i in 0..b.num_rows() {
            assert_eq!(b.column(1).as_primitive::<arrow::datatypes::Int64Type>().value(i), 20);
            assert_eq!(b.column(2).as_primitive::<arrow::datatypes::Int64Type>().value(i), 20);
            assert_eq!(b.column(3).as_primitive::<arrow::datatypes::Int64Type>().value(i), 0);
        }
    }
    // The pipeline's submit re-ranks with α-query expansion (k 5, α 3): each answer is the
    // top-20 of the expanded query, rank by rank, recomputed here from the embeddings (exact
    // search: the demo table is below the index threshold).
    let (mut ids, mut vecs) = (Vec::new(), Vec::<Vec<f32>>::new());
    for b in &batches {
        let list = b.column(2).as_fixed_size_list();
        for i in 0..b.num_rows() {
            ids.push(b.column(0).as_string::<i32>().value(i).to_string());
            vecs.push(list.value(i).as_primitive::<Float32Type>().values().to_vec());
        }
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let top = |q: usize, v: &[f32], n: usize| -> Vec<usize> {
        let mut o: Vec<usize> = (0..ids.len()).filter(|&j| j != q).collect();
        o.sort_by(|&a, &b| dot(v, &vecs[b]).total_cmp(&dot(v, &vecs[a])));
        o.truncate(n);
        o
    };
    let row_of: std::collections::HashMap<&str, usize> = ids.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    let mut reordered = 0;
    for line in csv.lines().skip(1) {
        let (photo, neighbours) = line.split_once(',').unwrap();
        let q = row_of[photo];
        let first = top(q, &vecs[q], 5);
        let e = pipeline::metrics::expand_query(&vecs[q], first.iter().map(|&j| (dot(&vecs[q], &vecs[j]), vecs[j].as_slice())), 3.0);
        let want = top(q, &e, 20);
        let got: Vec<usize> = neighbours.split(' ').map(|n| row_of[n]).collect();
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            let (sg, sw) = (dot(&e, &vecs[*g]), dot(&e, &vecs[*w]));
            assert!((sg - sw).abs() < 1e-4, "{photo} rank {}: {} ({sg}) where the expanded query ranks {} ({sw})", r + 1, ids[*g], ids[*w]);
        }
        reordered += usize::from(got != top(q, &vecs[q], 20));
    }
    assert!(reordered > 0, "query expansion changed no answer: is it applied?");
    // The distance written is the photo's own to its neighbour (what the new-individual
    // threshold was fitted on), not the expanded query's.
    let written = query(&lake, "SELECT query, neighbour, distance FROM submissions").await;
    let mut checked = 0;
    for b in &written {
        for i in 0..b.num_rows() {
            let (q, n) = (row_of[b.column(0).as_string::<i32>().value(i)], row_of[b.column(1).as_string::<i32>().value(i)]);
            let d = b.column(2).as_primitive::<Float32Type>().value(i);
            let want = 1.0 - dot(&vecs[q], &vecs[n]);
            assert!((d - want).abs() < 1e-4, "{} -> {}: distance {d}, the photos are {want} apart", ids[q], ids[n]);
            checked += 1;
        }
    }
    assert_eq!(checked, 20 * queries);
    let inds = std::fs::read_to_string(f.dir.path().join("submission_individuals.csv")).unwrap();
    assert!(inds.starts_with("photo,individuals\n"));
    assert!(inds.contains("new_individual"), "the new-individual answer is placed somewhere");

    // knn from SQL joins with images.
    let some_photo = query(&lake, "SELECT photo_id FROM embeddings ORDER BY photo_id LIMIT 1").await;
    let some_photo = some_photo[0].column(0).as_string::<i32>().value(0).to_string();
    let joined = query(
        &lake,
        &format!("SELECT k.rank, i.width FROM knn('embeddings', '{some_photo}', 5) k JOIN images i ON i.uri = k.uri ORDER BY k.rank"),
    )
    .await;
    assert_eq!(joined.iter().map(|b| b.num_rows()).sum::<usize>(), 5);

    // The report: one HTML file whose images are all embedded (and so resolve).
    let html = std::fs::read_to_string(f.dir.path().join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"), "{}", &html[..80.min(html.len())]);
    let imgs = html.matches("<img ").count();
    assert!(imgs >= 21, "query and neighbour thumbnails: {imgs}");
    let embedded = html.matches("src=\"data:image/jpeg;base64,").count();
    assert_eq!(embedded, imgs, "every image is embedded, none points elsewhere");
    assert!(html.contains("<svg"), "training curves");
    assert!(html.contains("val_unseen"), "evaluation table");

    // The HTTP API on a loopback port: known and unknown ids, uploads good, bad and too big.
    let service = std::sync::Arc::new(pipeline::answer::Service::open(lake.clone(), "embeddings", tch::Device::Cpu, Default::default()).await.unwrap());
    let now = service.now();
    assert!(now.embedder.is_some(), "{:?}", now.no_embedder);
    assert!(now.source.describe().contains("in memory"), "a table without an index is searched in memory: {}", now.source.describe());
    drop(now);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, pipeline::serve::router(service, pipeline::serve::Limits { max_body: 200_000, ..Default::default() })).await });
    let (code, body) = http(addr, "GET", &format!("/similar/{some_photo}?k=7"), &[]).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["neighbours"].as_array().unwrap().len(), 7);
    assert_eq!(http(addr, "GET", "/similar/no-such-photo.jpg", &[]).await.0, 404);
    assert_eq!(http(addr, "GET", &format!("/similar/{some_photo}?k=0"), &[]).await.0, 400);
    assert_eq!(http(addr, "GET", &format!("/similar/{some_photo}?expand=101"), &[]).await.0, 400);
    assert_eq!(http(addr, "GET", &format!("/similar/{some_photo}?geometric=101"), &[]).await.0, 400);
    // Geometric re-ranking of the first 5: the same 5 photos, each with its inliers, in the
    // order of the fused score; the 6th and 7th untouched.
    let plain: Vec<String> = v["neighbours"].as_array().unwrap().iter().map(|n| n["photo_id"].as_str().unwrap().to_string()).collect();
    let (code, body) = http(addr, "GET", &format!("/similar/{some_photo}?k=7&geometric=5"), &[]).await;
    assert_eq!(code, 200, "{body}");
    let g: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(g["geometric"].as_str().unwrap().starts_with("geometric k=5 "), "{body}");
    let gn = g["neighbours"].as_array().unwrap();
    let ids = |r: std::ops::Range<usize>| -> std::collections::BTreeSet<String> { r.map(|i| gn[i]["photo_id"].as_str().unwrap().to_string()).collect() };
    assert_eq!(ids(0..5), plain[..5].iter().cloned().collect(), "{body}");
    assert_eq!(gn[5]["photo_id"], plain[5].as_str());
    assert_eq!(gn[6]["photo_id"], plain[6].as_str());
    assert!(gn[..5].iter().all(|n| n["inliers"].is_u64()) && gn[5..].iter().all(|n| n.get("inliers").is_none()), "{body}");
    let fused = |n: &serde_json::Value| {
        let (s, i) = (n["similarity"].as_f64().unwrap(), n["inliers"].as_u64().unwrap() as f64);
        s + if i >= 8.0 { 0.3 * i.min(40.0) / 40.0 } else { 0.0 }
    };
    assert!(gn[..5].windows(2).all(|w| fused(&w[0]) >= fused(&w[1]) - 1e-5), "{body}");
    // With the submission's expansion, the API answers what the submission says.
    let (code, body) = http(addr, "GET", &format!("/similar/{some_photo}?k=20&expand=5&alpha=3"), &[]).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let api: Vec<&str> = v["neighbours"].as_array().unwrap().iter().map(|n| n["photo_id"].as_str().unwrap()).collect();
    let line = csv.lines().find(|l| l.split_once(',').unwrap().0 == some_photo).unwrap();
    assert_eq!(api.join(" "), line.split_once(',').unwrap().1, "HTTP with expand=5 vs the submission");
    assert_eq!(http(addr, "GET", "/healthz", &[]).await.0, 200);
    assert_eq!(http(addr, "GET", "/models", &[]).await.0, 200);
    let (code, _) = http(addr, "GET", &format!("/photos/{some_photo}/thumbnail"), &[]).await;
    assert_eq!(code, 200);
    // A new photo: any JPEG of the demo lake, sent as bytes.
    let photo = std::fs::read(f.dir.path().join("demo-lake/photos").join(&some_photo)).unwrap();
    let (code, body) = http(addr, "POST", "/similar?k=3", &photo).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The same bytes embed to the stored vector (an exact duplicate of it may tie for first).
    let me = v["neighbours"].as_array().unwrap().iter().find(|n| n["photo_id"] == some_photo.as_str());
    assert!(me.is_some_and(|n| n["similarity"].as_f64().unwrap() > 0.999), "a photo finds itself: {body}");
    // Re-ranked geometrically, the upload (read as the model reads it, its crop) and its own
    // stored photo share many verified matches.
    let (code, body) = http(addr, "POST", "/similar?k=3&geometric=3", &photo).await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let me = v["neighbours"].as_array().unwrap().iter().find(|n| n["photo_id"] == some_photo.as_str()).expect("itself among 3");
    assert!(me["inliers"].as_u64().unwrap() >= 8, "{body}");
    let (code, body) = http(addr, "POST", "/similar", b"this is not an image").await;
    assert_eq!(code, 400, "{body}");
    // One byte over the limit: the server has read the whole body when it answers 413.
    assert_eq!(http(addr, "POST", "/similar", &vec![0xFFu8; 200_001]).await.0, 413);
    server.abort();

    // Nothing changed: everything is up to date, training included.
    let again = dag::run(&plan, &opts).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");

    // The project folder moves (pipeline file, photos and lake together): still up to date,
    // nothing retrained, and the lake finds its photos in their new place.
    let moved = tempfile::tempdir().unwrap();
    let to = moved.path().join("project");
    std::fs::rename(f.dir.path(), &to).unwrap();
    let mplan = pipeline::load(&to.join("pipeline.toml"), &[]).await.unwrap();
    let mlake = Lake::new(mplan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).unwrap());
    let again = dag::run(&mplan, &opts).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    let b = query(&mlake, &format!("SELECT uri FROM images WHERE photo_id = '{some_photo}'")).await;
    let recorded = b[0].column(0).as_string::<i32>().value(0).to_string();
    assert_eq!(recorded, format!("../demo-lake/photos/{some_photo}"), "recorded relative to the lake");
    let bytes = pipeline::answer::read_photo(&mlake.locate(&recorded), mlake.options()).await.unwrap();
    assert_eq!(bytes, std::fs::read(to.join("demo-lake/photos").join(&some_photo)).unwrap());

    // The registered model's weights are lost: `train` is no longer up to date and trains it
    // again; the run after that is up to date.
    let model_id = {
        let b = query(&mlake, "SELECT model_id FROM models WHERE stage = 'train'").await;
        b[0].column(0).as_string::<i32>().value(0).to_string()
    };
    std::fs::remove_file(to.join("lake/models").join(&model_id).join("best.safetensors")).unwrap();
    let again = dag::run(&mplan, &opts).await.unwrap();
    let train = again.stages.iter().find(|s| s.stage == "train").unwrap();
    assert_eq!(train.status, Status::Succeeded, "{again:#?}");
    // Its photos' crops come from the lake's crop cache: no source photo decoded, in any epoch.
    assert!(train.summary.contains(" 0 photos decoded, ") && !train.summary.contains(" 0 crops from the lake's crop cache"), "{}", train.summary);
    assert!(to.join("lake/models").join(&model_id).join("best.safetensors").is_file());
    let again = dag::run(&mplan, &opts).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    // A re-embed (without flip TTA now) reads every crop from the cache, decoding nothing.
    let reembed = pipeline::load(&to.join("pipeline.toml"), &["embed.flip_tta=false".to_string()]).await.unwrap();
    let again = dag::run(&reembed, &opts).await.unwrap();
    let embed = again.stage("embed").unwrap();
    assert_eq!(embed.status, Status::Succeeded, "{again:#?}");
    assert!(embed.summary.contains(&format!("{images} new photos embedded")) || embed.summary.contains(&format!("{images} photos embedded")), "{}", embed.summary);
    assert!(embed.summary.contains(&format!("0 photos decoded, {images} crops from the lake's crop cache, 0 added")), "{}", embed.summary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_training_options_are_reported_with_their_line() {
    let f = common::demo(3, 3, 5);
    let sets = ["train.backbone=resnet9".to_string(), "train.loss=arcface + 2*focal".to_string(), "train.sampler=random".to_string()];
    let e = pipeline::load(&f.pipeline, &sets).await.unwrap_err().to_string();
    assert!(e.contains("unknown backbone `resnet9`"), "{e}");
    assert!(e.contains("unknown loss `focal`"), "{e}");
    assert!(e.contains("unknown sampler `random`"), "{e}");
    let e = pipeline::load(&f.pipeline, &["embed.model=nope".to_string(), "evaluate.splits=missing".to_string()]).await.unwrap_err().to_string();
    assert!(e.contains("reads table `missing`"), "{e}");
}

/// One request with the tests' HTTP client: (status, body).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let r = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("http://{addr}{path}"))
        .body(body.to_vec())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}
