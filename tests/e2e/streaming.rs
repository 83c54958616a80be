//! Streamed edges over the demo lake: ingest → detect → embed, where detect reads `images` and
//! embed reads `images` and `detections` while they are written. Against the same run with
//! `stream = false` (same tables), with the ledger's times (detect and embed start before ingest
//! commits), and with a failure injected halfway through ingest (nothing is committed).

use std::collections::BTreeMap;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int64Type};
use pipeline::dag::{self, RunOptions, ledger::Status};
use pipeline::lake::Lake;

use crate::common;

async fn query(lake: &Lake, sql: &str) -> Vec<RecordBatch> {
    pipeline::query::query(lake, sql).await.unwrap().1
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// `key → values` of a query whose first column is a string key and the others float32 or
/// strings (rendered), or one vector column.
async fn rows(lake: &Lake, sql: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for b in query(lake, sql).await {
        let key = b.column(0).as_string::<i32>();
        for i in 0..b.num_rows() {
            let vals = (1..b.num_columns())
                .flat_map(|c| {
                    let col = b.column(c);
                    match col.data_type() {
                        arrow::datatypes::DataType::Float32 => vec![format!("{:.4}", col.as_primitive::<Float32Type>().value(i))],
                        arrow::datatypes::DataType::FixedSizeList(..) => {
                            let v = col.as_fixed_size_list().value(i);
                            v.as_primitive::<Float32Type>().values().iter().map(|x| format!("{x:.4}")).collect()
                        }
                        _ => vec![arrow::util::display::array_value_to_string(col, i).unwrap()],
                    }
                })
                .collect();
            out.insert(key.value(i).to_string(), vals);
        }
    }
    out
}

/// The stream pipeline over the lake at `lake_dir`: the fixture's ingest and detect, and an
/// embed with the trained `model`.
fn stream_pipeline(f: &common::Fixture, name: &str, lake_dir: &str, model: &str, stream: bool) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&f.pipeline).unwrap();
    let head = &text[..text.find("[stages.usable]").expect("fixture has a usable stage")];
    // Small ingest batches, so that streaming (and a failure halfway) happen between batches.
    let mut text = head.replace("file://lake", &format!("file://{lake_dir}")).replace("[stages.ingest]\n", "[stages.ingest]\nbatch_size = 2\n");
    if !stream {
        text = text.replace("inputs = [\"ingest\"]", "inputs = [\"ingest\"]\nstream = false");
    }
    text.push_str(&format!(
        "[stages.embed]\nkind = \"embed\"\ninputs = [\"ingest\", \"detect\"]\nmodel = \"{model}\"\ntable = \"images\"\ncrops = \"detections\"\n\
         flip_tta = true\ndevice = \"cpu\"\nstream = {stream}\n"
    ));
    let file = f.dir.path().join(name);
    std::fs::write(&file, text).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_detect_embed_stream_with_the_same_tables_and_commit_nothing_when_ingest_fails() {
    let f = common::demo(6, 4, 31);
    let photos = f.dir.path().join("demo-lake/photos");
    let plan = pipeline::load(&f.pipeline, &[]).await.unwrap();
    let opts = RunOptions { quiet: true, until: Some("embed".into()), ..Default::default() };
    dag::run(&plan, &opts).await.unwrap();
    let lake = Lake::new(plan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).unwrap());
    let model = query(&lake, "SELECT model_id FROM train LIMIT 1").await[0].column(0).as_string::<i32>().value(0).to_string();

    // The next night brings new photos (copies of boxed ones under new names, unlabelled: the
    // detector, trained on the boxes, stays the same).
    let boxed = common::read_boxes(&f.dir.path().join("demo-lake/boxes.csv"));
    let names: Vec<String> = boxed.keys().take(8).map(|n| format!("NIGHT2_{n}")).collect();
    for (n, new) in boxed.keys().zip(&names) {
        std::fs::copy(photos.join(n), photos.join(new)).unwrap();
    }
    let lake_dir = f.dir.path().join("lake");
    for twin in ["lake-plain", "lake-failing"] {
        copy_dir(&lake_dir, &f.dir.path().join(twin));
    }
    let streamed = stream_pipeline(&f, "stream.toml", "lake", &model, true);
    let plain = stream_pipeline(&f, "plain.toml", "lake-plain", &model, false);
    let failing = stream_pipeline(&f, "failing.toml", "lake-failing", &model, true);

    // The plan streams: detect reads images, embed images and detections, as they are written.
    let splan = pipeline::load(&streamed, &[]).await.unwrap();
    assert_eq!(splan.stage("detect").unwrap().streamed, vec![("ingest".to_string(), "images".to_string())]);
    let mut e = splan.stage("embed").unwrap().streamed.clone();
    e.sort();
    assert_eq!(e, vec![("detect".to_string(), "detections".to_string()), ("ingest".to_string(), "images".to_string())]);
    let pplan = pipeline::load(&plain, &[]).await.unwrap();
    assert!(pplan.stages.iter().all(|s| s.streamed.is_empty()), "stream = false streams nothing");

    let quiet = RunOptions { quiet: true, ..Default::default() };
    let report = dag::run(&splan, &quiet).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == Status::Succeeded), "{report:#?}");
    // The ledger: detect and embed started before ingest ended (its commit included).
    let started_early = query(
        &lake,
        &format!(
            "SELECT c.stage FROM runs c JOIN runs p ON c.run_id = p.run_id \
             WHERE c.run_id = '{}' AND p.stage = 'ingest' AND c.stage <> 'ingest' AND c.started_at < p.ended_at ORDER BY 1",
            report.run_id
        ),
    )
    .await;
    let early: Vec<String> = started_early.iter().flat_map(|b| b.column(0).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>()).collect();
    assert_eq!(early, vec!["detect", "embed"], "{report:#?}");

    // The same run with stream = false leaves the same tables.
    let preport = dag::run(&pplan, &quiet).await.unwrap();
    assert!(preport.stages.iter().all(|s| s.status == Status::Succeeded), "{preport:#?}");
    let plain_lake = Lake::new(pplan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).unwrap());
    for sql in [
        "SELECT uri, photo_id, individual_id, width, height, content_hash FROM images",
        "SELECT photo_id, detector_id, score, x0, y0, x1, y1 FROM detections",
        "SELECT photo_id, model_id, tta, individual_id, embedding FROM embeddings",
    ] {
        let (a, b) = (rows(&lake, sql).await, rows(&plain_lake, sql).await);
        assert!(!a.is_empty(), "{sql}: no rows");
        assert_eq!(a.len(), b.len(), "{sql}");
        for (k, v) in &a {
            let w = b.get(k).unwrap_or_else(|| panic!("{sql}: {k} only in the streamed run"));
            let close = v.len() == w.len()
                && v.iter().zip(w).all(|(x, y)| x == y || matches!((x.parse::<f32>(), y.parse::<f32>()), (Ok(x), Ok(y)) if (x - y).abs() < 2e-3));
            assert!(close, "{sql}: {k}: streamed {v:?}, not streamed {w:?}");
        }
    }
    let n = |l: &Lake, t: &str| {
        let sql = format!("SELECT count(*) FROM {t}");
        let l = l.clone();
        async move { query(&l, &sql).await[0].column(0).as_primitive::<Int64Type>().value(0) }
    };
    assert_eq!(n(&lake, "embeddings").await, n(&lake, "images").await, "every photo embedded once");

    // A failure halfway through ingest: neither images nor anything streamed from it commits.
    let fplan = pipeline::load(&failing, &[]).await.unwrap();
    let flake = Lake::new(fplan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).unwrap());
    let tables = ["images".to_string(), "detections".to_string(), "embeddings".to_string()];
    let before = flake.versions(&tables).await.unwrap();
    let fopts = RunOptions { quiet: true, fail_after: Some(("images".into(), names.len() as u64 / 2)), ..Default::default() };
    let err = dag::run(&fplan, &fopts).await.unwrap_err().to_string();
    assert!(err.contains("ingest") && err.contains("injected fault"), "{err}");
    assert_eq!(flake.versions(&tables).await.unwrap(), before, "a failed ingest commits nothing downstream");
}
