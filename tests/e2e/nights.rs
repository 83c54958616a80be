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

/// The fixture's photos that should be kept, in order; the first `unboxed` lose their rows in
/// boxes.csv (new photos have no hand-drawn box, so the detector's training set stays the same
/// every night) and the first `held` are moved out of the source until a later night.
/// Returns (good photos, the source folder, the folder holding them back).
fn hold_back(f: &common::Fixture, unboxed: usize, held: usize) -> (Vec<String>, std::path::PathBuf, std::path::PathBuf) {
    let photos = f.dir.path().join("demo-lake/photos");
    let aside = f.dir.path().join("held-back");
    std::fs::create_dir_all(&aside).unwrap();
    let good: Vec<String> = f.truth.iter().filter(|(_, (_, e))| e == "keep").map(|(p, _)| p.clone()).collect();
    let boxes = f.dir.path().join("demo-lake/boxes.csv");
    let text = std::fs::read_to_string(&boxes).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !good[..unboxed].iter().any(|p| l.starts_with(&format!("{p},")))).collect();
    std::fs::write(&boxes, kept.join("\n") + "\n").unwrap();
    for p in &good[..held] {
        std::fs::rename(photos.join(p), aside.join(p)).unwrap();
    }
    (good, photos, aside)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nights_add_delete_retry_and_change_nothing_twice() {
    let f = common::demo(5, 4, 31);
    // Three good photos arrive on night 2; `doomed` is deleted then; `flaky` fails to fetch
    // once (retried at once), `down` for the whole of night 2 (tried again on night 3).
    let (good, photos, held) = hold_back(&f, 4, 3);
    let (new, doomed) = (&good[..3], good[3].clone());
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
    // It meets the detector, unless its bytes are a photo's the lake has (the demo plants
    // exact duplicates): those were detected already.
    let twins = count(&lake, &format!("SELECT count(*) FROM images WHERE content_hash = (SELECT content_hash FROM images WHERE photo_id = '{down}')")).await;
    let detected = if twins > 1 { 0 } else { 1 };
    assert!(night3.stage("detect").unwrap().summary.contains(&format!("({detected} detected now, ")), "{:?}", night3.stage("detect"));
    assert_eq!(count(&lake, &format!("SELECT count(*) FROM rejects WHERE photo_id = '{down}'")).await, 0);
    assert_eq!(count(&lake, "SELECT count(*) - count(DISTINCT uri) FROM images").await, 0, "nothing twice");
    assert_eq!(count(&lake, "SELECT count(*) - count(DISTINCT uri) FROM embeddings").await, 0, "nothing twice");
    assert!(strings(&lake, "SELECT photo_id FROM embeddings").await.contains(&down));
    // Night 4, nothing new: nothing runs.
    let night4 = dag::run(&plan, &quiet).await.unwrap();
    assert!(night4.stages.iter().all(|s| s.status == Status::UpToDate), "{night4:#?}");

    // The four nights in the run history, with what each did to the photos.
    let (code, out, err) = common::cli(&["runs", "--pipeline", f.pipeline.to_str().unwrap(), "--format", "csv"], f.dir.path());
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "a header and four nights: {out}");
    assert!(lines[0].ends_with(",photos_new,photos_changed,photos_deleted,photos_rejected"), "{out}");
    assert!(lines[2].ends_with(",2,0,1,2"), "night 2: 2 new, 0 relabelled, 1 deleted, 2 rejected: {out}");
    assert!(lines[3].ends_with(",1,0,0,0"), "night 3: {out}");
    assert!(lines[4].ends_with(",,,,"), "night 4 ran nothing: {out}");
}

/// The split the issue asks for: training promotes its model; the nightly pipeline embeds the
/// night's photos with the current model (and the collection again after a promotion), takes a
/// changed label without re-embedding, cleans up, and `serve` follows it all without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nightly_pipeline_embeds_with_the_current_model_and_serve_follows() {
    use pipeline::lake::models;
    let f = common::demo(5, 4, 32);
    let (good, photos, held) = hold_back(&f, 2, 2);
    let new = &good[..2];

    // Training: the first model of its name becomes current.
    let (_, lake, quiet) = common::run_fresh(&f).await;
    let first = models::current(&lake, "train").await.unwrap().expect("train promoted its model");
    assert_eq!(first.reason, "best");
    assert_eq!(strings(&lake, "SELECT DISTINCT model_id FROM embeddings").await, vec![first.model_id.clone()]);

    let service =
        std::sync::Arc::new(pipeline::answer::Service::open(lake.clone(), "embeddings", tch::Device::Cpu, Default::default()).await.unwrap());
    let before = service.now();
    assert!(pipeline::answer::similar_to_id(&before.ds, &before.source, &new[0], 5, Default::default()).await.unwrap().is_none());
    assert_eq!(service.refresh().await.unwrap(), None, "nothing new yet");
    // `pipeline serve`'s loop, looking every 200 ms.
    let following = tokio::spawn(pipeline::serve::follow(service.clone(), std::time::Duration::from_millis(200)));

    // A night: two new photos, one label changed.
    for p in new {
        std::fs::rename(held.join(p), photos.join(p)).unwrap();
    }
    let labels = f.dir.path().join("demo-lake/labels.csv");
    let text = std::fs::read_to_string(&labels).unwrap();
    let relabelled = text.lines().skip(1).map(|l| l.split(',').next().unwrap().to_string()).find(|p| good[2..].contains(p)).unwrap();
    let text: Vec<String> =
        text.lines().map(|l| if l.starts_with(&format!("{relabelled},")) { format!("{relabelled},W990") } else { l.to_string() }).collect();
    std::fs::write(&labels, text.join("\n") + "\n").unwrap();
    let nightly = pipeline::load(&common::nightly(&f), &[]).await.unwrap();
    let night = dag::run(&nightly, &quiet).await.unwrap();
    let embed = night.stage("embed").unwrap();
    assert!(embed.summary.contains("2 new photos embedded") && embed.summary.contains("1 relabelled"), "{night:#?}");
    assert!(embed.summary.contains(&first.model_id), "{}", embed.summary);
    assert!(night.stage("detect").unwrap().summary.contains("(2 detected now, "), "{:?}", night.stage("detect"));
    assert!(night.stage("vacuum").unwrap().summary.contains("compacted"), "{:?}", night.stage("vacuum"));
    assert_eq!(strings(&lake, &format!("SELECT individual_id FROM embeddings WHERE photo_id = '{relabelled}'")).await, vec!["W990"]);
    assert_eq!(count(&lake, "SELECT count(*) - count(DISTINCT uri) FROM embeddings").await, 0, "nothing twice");
    let csv = std::fs::read_to_string(f.dir.path().join("nightly-submission.csv")).unwrap();
    assert!(csv.lines().any(|l| l.starts_with(&format!("{},", new[0]))), "the new photo has its top-20");

    // Serve swaps to the new version without a restart; answers in flight keep theirs.
    let t = std::time::Instant::now();
    while service.now().version == before.version {
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "serve did not follow the lake");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    following.abort();
    let now = service.now();
    assert_eq!(now.model_id, first.model_id);
    assert!(std::sync::Arc::ptr_eq(now.embedder.as_ref().unwrap(), before.embedder.as_ref().unwrap()), "same model: not reloaded");
    let hit = pipeline::answer::similar_to_id(&now.ds, &now.source, &new[0], 5, Default::default()).await.unwrap().expect("new photo served");
    assert_eq!(hit.neighbours.len(), 5);
    assert!(pipeline::answer::similar_to_id(&before.ds, &before.source, &new[0], 5, Default::default()).await.unwrap().is_none());

    // The same night again, after housekeeping: nothing runs.
    let again = dag::run(&nightly, &quiet).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");

    // Another model, promoted by its stage, then the first one promoted back by hand: the next
    // night re-embeds the whole collection with it, and serve swaps model.
    let retrain = pipeline::load(&f.pipeline, &["train.seed=7".into(), "train.promote=always".into()]).await.unwrap();
    let r = dag::run(&retrain, &quiet).await.unwrap();
    let second = models::current(&lake, "train").await.unwrap().unwrap();
    assert_ne!(second.model_id, first.model_id);
    assert_eq!((second.reason.as_str(), second.replaced.clone()), ("always", Some(first.model_id.clone())), "{:?}", r.stage("train"));
    // The training pipeline embeds with what it trains: serve swaps model.
    let swapped = service.refresh().await.unwrap().unwrap();
    assert!(swapped.contains(&format!("model {} -> {}", first.model_id, second.model_id)), "{swapped}");
    let (code, out, err) = common::cli(&["promote", &first.model_id, "--pipeline", nightly.file.to_str().unwrap()], f.dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("now current for `train` (was {})", second.model_id)), "{out}");
    let (code, out, err) = common::cli(&["models", "--pipeline", nightly.file.to_str().unwrap(), "--format", "csv"], f.dir.path());
    assert_eq!(code, 0, "{err}");
    let current: Vec<&str> = out.lines().skip(1).filter(|l| l.ends_with(",current")).collect();
    assert_eq!(current.len(), 1, "{out}");
    assert!(current[0].starts_with(&first.model_id), "{out}");
    let night = dag::run(&nightly, &quiet).await.unwrap();
    let embed = night.stage("embed").unwrap();
    let all = count(&lake, "SELECT count(*) FROM images").await;
    assert!(embed.summary.starts_with(&format!("{all} photos embedded with {}", first.model_id)), "{}", embed.summary);
    let swapped = service.refresh().await.unwrap().unwrap();
    assert!(swapped.contains(&format!("model {} -> {}", second.model_id, first.model_id)), "{swapped}");
}

/// A photo renamed, one moved to another folder and one copied are recognised by their bytes:
/// none is decoded, detected or embedded again, and the old names leave every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_moved_and_copied_photos_keep_their_work() {
    let f = common::demo(4, 4, 33);
    let (_, lake, quiet) = common::run_fresh(&f).await;
    let nightly = pipeline::load(&common::nightly(&f), &[]).await.unwrap();
    let first = dag::run(&nightly, &quiet).await.unwrap();
    assert!(first.stage("embed").unwrap().summary.contains("0 new photos embedded"), "{first:#?}");
    let all = count(&lake, "SELECT count(*) FROM images").await;
    let ids = strings(&lake, "SELECT photo_id FROM embeddings WHERE individual_id IS NOT NULL ORDER BY photo_id").await;
    let (renamed, moved, copied) = (&ids[0], &ids[1], &ids[2]);
    let vector = |id: String| {
        let lake = lake.clone();
        async move {
            let (_, b) = pipeline::query::query(&lake, &format!("SELECT embedding FROM embeddings WHERE photo_id = '{id}'")).await.unwrap();
            let list = b[0].column(0).as_fixed_size_list().value(0);
            list.as_primitive::<arrow::datatypes::Float32Type>().values().to_vec()
        }
    };
    let (v_renamed, v_moved) = (vector(renamed.clone()).await, vector(moved.clone()).await);

    // `pipeline serve`, the binary, looking for a new version every half second.
    let served = common::serve(&["--pipeline", nightly.file.to_str().unwrap(), "--refresh", "0.5"], f.dir.path()).await;
    let version = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["version"].as_u64().unwrap();
    let (status, health) = served.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{health}");
    let before = version(&health);

    let photos = f.dir.path().join("demo-lake/photos");
    std::fs::rename(photos.join(renamed), photos.join(format!("RENAMED_{renamed}"))).unwrap();
    std::fs::create_dir_all(photos.join("2026")).unwrap();
    std::fs::rename(photos.join(moved), photos.join("2026").join(moved)).unwrap();
    std::fs::copy(photos.join(copied), photos.join(format!("COPY_{copied}"))).unwrap();
    let night = dag::run(&nightly, &quiet).await.unwrap();
    let ingest = night.stage("ingest").unwrap();
    assert!(ingest.summary.contains(", 1 new photos, 0 rejected, 2 renamed or moved (same bytes)"), "{}", ingest.summary);
    assert!(!ingest.summary.contains("gone from the source"), "{}", ingest.summary);
    assert!(night.stage("detect").unwrap().summary.contains(&format!("(0 detected now, {} on an earlier run)", all + 1)), "{night:#?}");
    let embed = night.stage("embed").unwrap();
    assert!(
        embed.summary.starts_with(&format!("0 new photos embedded, {} already embedded, 3 photos already embedded under another name (2 renamed or moved", all - 2)),
        "{}",
        embed.summary
    );
    assert!(embed.summary.contains(", 0 removed"), "{}", embed.summary);
    // The new names carry the embeddings the old ones had; the old names are gone.
    assert_eq!(vector(format!("RENAMED_{renamed}")).await, v_renamed);
    assert_eq!(vector(format!("2026/{moved}")).await, v_moved);
    assert_eq!(vector(format!("COPY_{copied}")).await, vector(copied.clone()).await);
    for old in [renamed, moved] {
        for sql in [
            format!("SELECT count(*) FROM images WHERE photo_id = '{old}'"),
            format!("SELECT count(*) FROM embeddings WHERE photo_id = '{old}'"),
            format!("SELECT count(*) FROM detections WHERE photo_id = '{old}'"),
            format!("SELECT count(*) FROM submissions WHERE query = '{old}' OR neighbour = '{old}'"),
        ] {
            assert_eq!(count(&lake, &sql).await, 0, "{sql}");
        }
    }
    assert_eq!(count(&lake, "SELECT count(*) FROM images").await, all + 1);
    assert_eq!(count(&lake, "SELECT count(*) FROM embeddings").await, all + 1);
    assert!(count(&lake, &format!("SELECT count(*) FROM submissions WHERE query = 'RENAMED_{renamed}'")).await > 0, "the renamed photo is answered");
    // A moved photo keeps its label (labels name photos by file name too); its row is today's.
    let label = strings(&lake, &format!("SELECT individual_id FROM images WHERE photo_id = '2026/{moved}'")).await;
    assert_eq!(strings(&lake, &format!("SELECT individual_id FROM embeddings WHERE photo_id = '2026/{moved}'")).await, label);
    assert!(!label[0].is_empty(), "{label:?}");
    // The server swapped to the night's version without a restart: the new name is answered,
    // the old one no longer is.
    let t = std::time::Instant::now();
    while version(&served.get("/healthz").await.unwrap().1) == before {
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "pipeline serve did not follow the lake");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, body) = served.get(&format!("/similar/RENAMED_{renamed}?k=3")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["neighbours"].as_array().map(Vec::len), Some(3), "{body}");
    assert_eq!(served.get(&format!("/similar/{renamed}")).await.unwrap().0, 404);
    drop(served);

    // Nothing twice, and the same night again does nothing.
    assert_eq!(count(&lake, "SELECT count(*) - count(DISTINCT uri) FROM embeddings").await, 0);
    let again = dag::run(&nightly, &quiet).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    let (code, out, err) = common::cli(&["runs", "--pipeline", nightly.file.to_str().unwrap(), "--format", "csv"], f.dir.path());
    assert_eq!(code, 0, "{err}");
    // Training, the first night, this night, the night again.
    assert!(out.lines().nth(3).is_some_and(|l| l.ends_with(",1,2,0,0")), "the night: 1 new (the copy), 2 changed (moved), none deleted: {out}");
}
