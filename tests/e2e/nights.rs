//! Night after night on one lake: new, changed, deleted, corrupt and unreachable photos.

use crate::common;

use arrow::array::AsArray;
use pipeline::dag::{self, RunOptions, ledger::Status};
use pipeline::lake::{Catalog, Lake};

async fn strings(lake: &Lake, sql: &str) -> Vec<String> {
    let (_, b) = pipeline::query::query(lake, sql).await.unwrap();
    b.iter().flat_map(|b| b.column(0).as_string::<i32>().iter().map(|s| s.unwrap_or("").to_string()).collect::<Vec<_>>()).collect()
}

async fn count(lake: &Lake, sql: &str) -> i64 {
    let (_, b) = pipeline::query::query(lake, sql).await.unwrap();
    b[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nights_add_delete_retry_and_change_nothing_twice() {
    let f = common::demo(5, 4, 31);
    let photos = f.dir.path().join("demo-lake/photos");
    let held = f.dir.path().join("held-back");
    std::fs::create_dir_all(&held).unwrap();
    // Three good photos arrive on night 2; `doomed` is deleted then; `flaky` fails to fetch
    // once (retried at once), `down` for the whole of night 2 (tried again on night 3).
    let good: Vec<String> = f.truth.iter().filter(|(_, (_, e))| e == "keep").map(|(p, _)| p.clone()).collect();
    // They have no hand-drawn box: the detector's training set stays the same every night.
    let boxes = f.dir.path().join("demo-lake/boxes.csv");
    let text = std::fs::read_to_string(&boxes).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !good[..4].iter().any(|p| l.starts_with(&format!("{p},")))).collect();
    std::fs::write(&boxes, kept.join("\n") + "\n").unwrap();
    let (new, doomed) = (&good[..3], good[3].clone());
    for p in new {
        std::fs::rename(photos.join(p), held.join(p)).unwrap();
    }
    let plan = pipeline::load(&f.pipeline, &[]).await.unwrap();
    let lake = Lake::new(plan.lake.clone(), Default::default(), Catalog::load(None).unwrap());
    let quiet = RunOptions { quiet: true, ..Default::default() };

    // Night 1: everything.
    let night1 = dag::run(&plan, &quiet).await.unwrap();
    assert!(night1.stages.iter().all(|s| s.status == Status::Succeeded), "{night1:#?}");
    let images1 = count(&lake, "SELECT count(*) FROM images").await;
    assert!(strings(&lake, "SELECT query FROM submissions").await.contains(&doomed));

    // Night 2.
    for p in new {
        std::fs::rename(held.join(p), photos.join(p)).unwrap();
    }
    std::fs::write(photos.join("IMG_CORRUPT.jpg"), b"\xFF\xD8\xFF\xE0 not really a jpeg").unwrap();
    std::fs::remove_file(photos.join(&doomed)).unwrap();
    let (flaky, down) = (new[0].clone(), new[1].clone());
    let night = RunOptions { fail_fetch: vec![(flaky.clone(), 1), (down.clone(), 100)], ..quiet.clone() };
    let night2 = dag::run(&plan, &night).await.unwrap();
    let ingest = night2.stage("ingest").unwrap();
    assert!(ingest.summary.contains("2 new photos, 2 rejected") && ingest.summary.contains("1 gone from the source"), "{}", ingest.summary);
    assert_eq!(count(&lake, "SELECT count(*) FROM images").await, images1 + 2 - 1);
    // Only the new photos meet the detector; the rest keep their rows.
    let detect = night2.stage("detect").unwrap();
    assert!(detect.summary.contains(&format!("(2 detected now, {} on an earlier run)", images1 - 1)), "{}", detect.summary);
    let reasons = strings(&lake, &format!("SELECT reason FROM rejects WHERE photo_id IN ('{down}', 'IMG_CORRUPT.jpg') ORDER BY photo_id")).await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons.contains(&"fetch_error".to_string()), "{reasons:?}");
    // The deleted photo left the lake and every answer.
    for sql in [
        format!("SELECT count(*) FROM images WHERE photo_id = '{doomed}'"),
        format!("SELECT count(*) FROM embeddings WHERE photo_id = '{doomed}'"),
        format!("SELECT count(*) FROM submissions WHERE query = '{doomed}' OR neighbour = '{doomed}'"),
    ] {
        assert_eq!(count(&lake, &sql).await, 0, "{sql}");
    }
    let csv = std::fs::read_to_string(f.dir.path().join("submission.csv")).unwrap();
    assert!(!csv.contains(&doomed), "a deleted photo is nobody's neighbour");
    assert!(strings(&lake, "SELECT photo_id FROM embeddings").await.contains(&flaky), "a fetch that failed once was retried");

    // Night 3, the same source and no faults: only the photo that could not be fetched flows.
    let night3 = dag::run(&plan, &quiet).await.unwrap();
    let ingest = night3.stage("ingest").unwrap();
    assert!(ingest.summary.contains("1 new photos, 0 rejected"), "{}", ingest.summary);
    assert!(night3.stage("detect").unwrap().summary.contains("(1 detected now, "), "{:?}", night3.stage("detect"));
    assert_eq!(count(&lake, &format!("SELECT count(*) FROM rejects WHERE photo_id = '{down}'")).await, 0);
    assert_eq!(count(&lake, "SELECT count(*) - count(DISTINCT uri) FROM images").await, 0, "nothing twice");
    assert_eq!(count(&lake, "SELECT count(*) - count(DISTINCT uri) FROM embeddings").await, 0, "nothing twice");
    assert!(strings(&lake, "SELECT photo_id FROM embeddings").await.contains(&down));
    // Night 4, nothing new: nothing runs.
    let night4 = dag::run(&plan, &quiet).await.unwrap();
    assert!(night4.stages.iter().all(|s| s.status == Status::UpToDate), "{night4:#?}");
}
