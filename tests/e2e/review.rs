//! People in the loop (#9): the review page in headless chromium, by keyboard alone (a "same as"
//! and a "new individual" decision, a box corrected, a photo without a subject), and the HTTP API under it: the queue of
//! photos awaiting a decision, what is proposed for one, decisions and boxes recorded with who
//! made them (a read-only token refused), bad ones answered 400/404; then the next run labelling
//! the photos as decided and training its detector with the drawn box, an undo giving a photo
//! back its survey label and its place in the queue, and a photo called bad leaving `usable`.
//! A photo said to show no subject scores 0 in `detections`. Thumbnails are kept in the lake.

use arrow::array::AsArray;

use crate::common;

async fn strings(lake: &pipeline::lake::Lake, sql: &str) -> Vec<Vec<Option<String>>> {
    let (_, batches) = pipeline::query::query(lake, sql).await.unwrap();
    let mut rows = Vec::new();
    for b in &batches {
        let cols: Vec<arrow::array::StringArray> =
            (0..b.num_columns()).map(|c| arrow::compute::cast(b.column(c), &arrow::datatypes::DataType::Utf8).unwrap().as_string::<i32>().clone()).collect();
        for i in 0..b.num_rows() {
            rows.push(cols.iter().map(|c| arrow::array::Array::is_valid(c, i).then(|| c.value(i).to_string())).collect());
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_made_on_the_review_page_become_the_next_runs_labels() {
    let f = common::demo(4, 4, 29);
    // Two photos of the survey arrive without a label: the ones a person is to decide about.
    let keep: Vec<String> = f.truth.iter().filter(|(_, (d, e))| d == "none" && e == "keep").map(|(p, _)| p.clone()).collect();
    let (a, b) = (keep[1].clone(), keep[6].clone());
    let labels_csv = f.dir.path().join("demo-lake/labels.csv");
    let text = std::fs::read_to_string(&labels_csv).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with(&format!("{a},")) && !l.starts_with(&format!("{b},"))).collect();
    std::fs::write(&labels_csv, kept.join("\n") + "\n").unwrap();
    let (plan, lake, opts) = common::run_fresh(&f).await;

    let (ana, viewer) = ("token-of-ana-0123456789", "token-of-a-viewer-0123456");
    std::fs::write(f.dir.path().join("tokens"), format!("ana {ana}\nviewer {viewer} read-only\n")).unwrap();
    let served = common::serve(&["--pipeline", f.pipeline.to_str().unwrap(), "--token-file", "tokens", "--refresh", "0"], f.dir.path()).await;
    let base = format!("http://127.0.0.1:{}", served.port);
    let client = reqwest::Client::new();
    let get = |path: &str, token: &str| client.get(format!("{base}{path}")).header("authorization", format!("Bearer {token}")).send();
    let post_to = |path: &str, body: serde_json::Value, token: &str| {
        client
            .post(format!("{base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
    };

    // The page itself needs no token (it holds no data); its data does.
    let (code, page) = served.get("/review").await.unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("Review proposed matches") && page.contains("/review/queue"), "{}", &page[..200.min(page.len())]);
    assert_eq!(served.get("/review/queue").await.unwrap().0, 401);

    // The queue: every unlabelled photo of the table (a, b, and the survey's photos that never
    // had one), no labelled one.
    let unlabelled: Vec<String> =
        strings(&lake, "SELECT photo_id FROM embeddings WHERE individual_id IS NULL ORDER BY photo_id").await.into_iter().map(|r| r[0].clone().unwrap()).collect();
    let q: serde_json::Value = get("/review/queue", viewer).await.unwrap().text().await.map(|t| serde_json::from_str(&t).unwrap()).unwrap();
    let mut queued: Vec<String> = q["photos"].as_array().unwrap().iter().map(|p| p["photo_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(q["total"].as_u64().unwrap() as usize, queued.len());
    queued.sort();
    assert_eq!(queued, unlabelled);
    assert!(queued.contains(&a) && queued.contains(&b), "{queued:?}");
    assert!(q["photos"][0]["ingested_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{q}");

    // What is proposed for a: labelled individuals, best first, each with photos of its own.
    let r = get(&format!("/review/photos/{a}?individuals=3"), viewer).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let p: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let cands = p["candidates"].as_array().unwrap();
    assert!(!cands.is_empty() && cands.len() <= 3, "{p}");
    let sims: Vec<f64> = cands.iter().map(|c| c["similarity"].as_f64().unwrap()).collect();
    assert!(sims.windows(2).all(|w| w[0] >= w[1]), "{sims:?}");
    let labelled = strings(&lake, "SELECT photo_id, individual_id FROM embeddings WHERE individual_id IS NOT NULL").await;
    for c in cands {
        let ind = c["individual_id"].as_str().unwrap();
        for ph in c["photos"].as_array().unwrap() {
            assert!(labelled.iter().any(|r| r[0].as_deref() == ph.as_str() && r[1].as_deref() == Some(ind)), "{ph} is not {ind}'s");
        }
    }
    assert_eq!(p["model_id"].as_str().unwrap(), q["model_id"].as_str().unwrap());
    assert!(p["crop"].is_array(), "the model crops by the detector: {p}");
    // And what the submission proposed for it (table `proposals`): individuals best first, with
    // `new_individual` where it ranks, as `submission_individuals.csv` lists them.
    let proposed: Vec<&str> = p["proposed"].as_array().unwrap().iter().map(|x| x["individual_id"].as_str().unwrap()).collect();
    assert!(!proposed.is_empty() && proposed.contains(&"new_individual"), "{p}");
    let csv = std::fs::read_to_string(f.dir.path().join("submission_individuals.csv")).unwrap();
    let line = csv.lines().find(|l| l.starts_with(&format!("{a},"))).unwrap();
    assert_eq!(line.split_once(',').unwrap().1.split(' ').collect::<Vec<_>>(), proposed);
    assert_eq!(p["proposed_by"], p["model_id"]);
    assert!(p["text"].as_str().unwrap().starts_with(&format!("{} ", proposed[0])), "{p}");
    assert_eq!(p["decisions"].as_array().unwrap().len(), 0);
    assert_eq!(get("/review/photos/nope.jpg", viewer).await.unwrap().status().as_u16(), 404);
    assert_eq!(get(&format!("/review/photos/{a}?individuals=99"), viewer).await.unwrap().status().as_u16(), 400);
    // Photos for the page: a large view and the photo's own bytes.
    let r = get(&format!("/photos/{a}/thumbnail?side=512"), viewer).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let jpg = r.bytes().await.unwrap().to_vec();
    let img = image::load_from_memory(&jpg).unwrap();
    assert_eq!(img.width().max(img.height()), 512);
    // Kept in the lake by the photo's content, so it is decoded once (a second server would
    // find it too), and served from there.
    let hash = strings(&lake, &format!("SELECT content_hash FROM embeddings WHERE photo_id = '{a}'")).await[0][0].clone().unwrap();
    let kept = std::path::PathBuf::from(lake.root().strip_prefix("file://").unwrap()).join("_thumbnails").join(&hash[..2]).join(format!("{hash}-512.jpg"));
    assert_eq!(std::fs::read(&kept).unwrap(), jpg, "{}", kept.display());
    std::fs::write(&kept, b"kept").unwrap();
    assert_eq!(get(&format!("/photos/{a}/thumbnail?side=512"), viewer).await.unwrap().bytes().await.unwrap().to_vec(), b"kept".to_vec());
    std::fs::write(&kept, &jpg).unwrap();
    let r = get(&format!("/photos/{a}/image"), viewer).await.unwrap();
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    assert_eq!(r.bytes().await.unwrap().to_vec(), std::fs::read(f.dir.path().join("demo-lake/photos").join(&a)).unwrap());

    // Deciding: a read-only token may not; malformed decisions say what is wrong.
    let first = cands[0]["individual_id"].as_str().unwrap().to_string();
    let same_a = serde_json::json!({ "photo_id": a, "decision": "same", "individual_id": first, "model_id": p["model_id"], "proposal": p["text"] });
    let r = post_to("/decisions", same_a, viewer).await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.unwrap().contains("read-only"));
    for (body, code, says) in [
        (serde_json::json!({ "photo_id": a, "decision": "same" }), 400, "needs an individual"),
        (serde_json::json!({ "photo_id": a, "decision": "maybe" }), 400, "unknown decision `maybe`"),
        (serde_json::json!({ "photo_id": a, "decision": "bad", "individual_id": "W1" }), 400, "takes no individual"),
        (serde_json::json!({ "photo_id": a, "decision": "new", "individual_id": "new_individual" }), 400, "reserved"),
        (serde_json::json!({ "photo_id": "nope.jpg", "decision": "unsure" }), 404, "no photo `nope.jpg`"),
        (serde_json::json!({ "photo": a }), 400, "not a decision"),
    ] {
        let r = post_to("/decisions", body.clone(), ana).await.unwrap();
        assert_eq!(r.status().as_u16(), code, "{body}");
        let text = r.text().await.unwrap();
        assert!(text.contains(says), "{body}: {text}");
    }
    // In a real browser, by keyboard alone: the page asks for a token; `j`/`k` walk the queue;
    // `1` says "same as" the first candidate; `n`, a name and Enter record a new individual.
    let mut chrome = crate::browser::Chrome::start();
    chrome.navigate(&format!("{base}/review"));
    chrome.wait_for("document.activeElement !== null && document.activeElement.id === 'token'", 30, "the page to ask for a token");
    chrome.type_text(ana);
    chrome.press("Enter");
    chrome.wait_for("state.queue.length > 0 && state.proposal !== null", 60, "the queue and its first proposal");
    let go_to = |chrome: &mut crate::browser::Chrome, photo: &str| {
        let photo = serde_json::json!(photo);
        loop {
            chrome.wait_for("state.ready", 60, "the page to show its photo");
            let i = chrome.eval(&format!("state.queue.findIndex(p => p.photo_id === {photo})")).as_i64().unwrap();
            assert!(i >= 0, "{photo} is not in the page's queue");
            let at = chrome.eval("state.at").as_i64().unwrap();
            if at == i {
                break;
            }
            chrome.press(if at < i { "j" } else { "k" });
            chrome.wait_for(&format!("state.at !== {at}"), 10, "the next photo");
        }
        chrome.wait_for(&format!("state.ready && state.proposal.photo_id === {photo}"), 60, "its proposal and photos");
    };
    go_to(&mut chrome, &a);
    assert_eq!(chrome.eval("state.proposal.candidates[0].individual_id"), serde_json::json!(first));
    // What the page shows: the photo, every candidate's photos, a photo of the first beside it.
    assert_eq!(chrome.eval("document.getElementById('query-img').naturalWidth"), serde_json::json!(1024));
    let shown = chrome.eval("[...document.querySelectorAll('.cand .thumbs img')].every(i => i.complete && i.naturalWidth > 0)");
    assert_eq!(shown, serde_json::json!(true));
    let n = chrome.eval("state.proposal.candidates.length").as_u64().unwrap();
    assert!(n >= 1);
    assert_eq!(chrome.eval("document.querySelectorAll('.cand').length"), serde_json::json!(n));
    assert!(chrome.eval("document.getElementById('match-title').textContent").as_str().unwrap().starts_with(&format!("{first}: ")));
    assert_eq!(chrome.eval("document.getElementById('query-box').hidden"), serde_json::json!(false));
    let said = chrome.eval("document.getElementById('proposed').textContent");
    assert!(said.as_str().unwrap().starts_with("Proposed: "), "{said}");
    if let Ok(path) = std::env::var("REVIEW_SCREENSHOT") {
        std::fs::write(path, chrome.screenshot()).unwrap();
    }
    chrome.press("1");
    chrome.wait_for(&format!("document.getElementById('status').textContent.startsWith('recorded: {a} same {first} (by ana)')"), 30, "the decision on a");
    go_to(&mut chrome, &b);
    chrome.press("n");
    chrome.wait_for("document.activeElement !== null && document.activeElement.id === 'new-name'", 10, "the name field");
    chrome.type_text("W-new-1");
    chrome.press("Enter");
    chrome.wait_for(&format!("document.getElementById('status').textContent.startsWith('recorded: {b} new W-new-1 (by ana)')"), 30, "the decision on b");

    // Boxes, by keyboard too: `m` lists the photos the detector is least sure about, with its
    // box drawn; an arrow moves the box, Shift+arrows widen it, Enter saves it.
    chrome.press("m");
    chrome.wait_for("state.mode === 'boxes' && state.ready && state.queue.length > 0 && state.box !== null", 60, "the box queue");
    let scores: Vec<f64> = chrome.eval("state.queue.map(p => p.score)").as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] <= w[1]), "least sure first: {scores:?}");
    let boxed_photo = chrome.eval("state.queue[state.at].photo_id").as_str().unwrap().to_string();
    let detector_box: Vec<f64> = serde_json::from_value(chrome.eval("state.box")).unwrap();
    chrome.press("ArrowDown");
    for _ in 0..3 {
        chrome.press_with("ArrowRight", true);
    }
    let drawn: Vec<f64> = serde_json::from_value(chrome.eval("state.box")).unwrap();
    assert!((drawn[1] - detector_box[1] - 0.01).abs() < 1e-6 || detector_box[3] > 0.99, "moved down: {detector_box:?} -> {drawn:?}");
    assert!(drawn[2] - drawn[0] > detector_box[2] - detector_box[0] || detector_box[2] > 0.97, "wider: {detector_box:?} -> {drawn:?}");
    chrome.press("Enter");
    chrome.wait_for(&format!("document.getElementById('status').textContent.startsWith('recorded: box of {boxed_photo} (by ana)')"), 30, "the box");
    // The next least sure photo: `x` says it shows no subject at all.
    chrome.wait_for(&format!("state.ready && state.queue.length > 0 && state.queue[state.at].photo_id !== {}", serde_json::json!(boxed_photo)), 30, "the next photo");
    let empty_photo = chrome.eval("state.queue[state.at].photo_id").as_str().unwrap().to_string();
    chrome.press("x");
    chrome.wait_for(&format!("document.getElementById('status').textContent.startsWith('recorded: no subject in {empty_photo} (by ana)')"), 30, "no subject");
    drop(chrome);
    let said = strings(&lake, "SELECT photo_id, subject FROM boxes ORDER BY drawn_at").await;
    assert_eq!(said, vec![vec![Some(boxed_photo.clone()), Some("true".into())], vec![Some(empty_photo.clone()), Some("false".into())]]);
    let rows = strings(&lake, "SELECT photo_id, who, x0, y0, x1, y1 FROM boxes WHERE subject").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0][..2], [Some(boxed_photo.clone()), Some("ana".into())]);
    let saved: Vec<f64> = rows[0][2..].iter().map(|v| v.as_deref().unwrap().parse().unwrap()).collect();
    assert!(saved.iter().zip(&drawn).all(|(a, b)| (a - b).abs() < 1e-5), "{saved:?} != {drawn:?}");
    assert_eq!(post_to("/boxes", serde_json::json!({ "photo_id": a, "box": [0.1, 0.1, 0.5, 0.5] }), viewer).await.unwrap().status().as_u16(), 403);
    let r = post_to("/boxes", serde_json::json!({ "photo_id": a, "box": [0.5, 0.1, 0.1, 0.5] }), ana).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("inverted"));
    let r = post_to("/boxes", serde_json::json!({ "photo_id": a, "box": [0.1, 0.1, 0.5, 0.5], "no_subject": true }), ana).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("contradict"));
    let r = post_to("/boxes", serde_json::json!({ "photo_id": a }), ana).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("no_subject"));
    assert_eq!(post_to("/boxes", serde_json::json!({ "photo_id": "nope.jpg", "box": [0.1, 0.1, 0.5, 0.5] }), ana).await.unwrap().status().as_u16(), 404);
    let detector_before = strings(&lake, "SELECT DISTINCT detector_id FROM detections").await[0][0].clone();
    // Both left the queue at once.
    let q: serde_json::Value = get("/review/queue", ana).await.unwrap().text().await.map(|t| serde_json::from_str(&t).unwrap()).unwrap();
    let queued: Vec<&str> = q["photos"].as_array().unwrap().iter().map(|p| p["photo_id"].as_str().unwrap()).collect();
    assert!(!queued.contains(&a.as_str()) && !queued.contains(&b.as_str()), "{queued:?}");
    assert_eq!(queued.len(), unlabelled.len() - 2);

    // The decisions are rows of the lake, with who made them and what they answered.
    let rows = strings(&lake, "SELECT photo_id, decision, individual_id, who, model_id, proposal FROM decisions ORDER BY decided_at").await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0][..4], [Some(a.clone()), Some("same".into()), Some(first.clone()), Some("ana".into())]);
    assert_eq!(rows[0][4].as_deref(), p["model_id"].as_str());
    assert_eq!(rows[0][5].as_deref(), p["text"].as_str(), "the proposal as the page showed it");
    assert_eq!(rows[1][..4], [Some(b.clone()), Some("new".into()), Some("W-new-1".into()), Some("ana".into())]);

    // The next run: ingest lays the decisions over the survey's labels, and the embeddings
    // follow (relabelled, not embedded again unless the model changed).
    let r = pipeline::dag::run(&plan, &opts).await.unwrap();
    // ... and detect trains a new detector with the drawn box over the file's.
    let detect = r.stage("detect").unwrap();
    assert!(detect.summary.contains("2 of its boxes drawn on the review page"), "{}", detect.summary);
    assert!(detect.summary.contains("photos said on the review page to show no subject: 1"), "{}", detect.summary);
    // A person's "no subject" is that photo's detection, so `usable` leaves it out.
    assert_eq!(strings(&lake, &format!("SELECT score FROM detections WHERE photo_id = '{empty_photo}'")).await, vec![vec![Some("0.0".into())]]);
    assert!(strings(&lake, &format!("SELECT photo_id FROM usable WHERE photo_id = '{empty_photo}'")).await.is_empty());
    let detector_after = strings(&lake, "SELECT DISTINCT detector_id FROM detections").await[0][0].clone();
    assert_ne!(detector_before, detector_after);
    let ingest = r.stage("ingest").unwrap();
    assert!(ingest.summary.contains("2 relabelled") && ingest.summary.contains("1 same as a known individual, 1 new individuals"), "{}", ingest.summary);
    let label = |t: &'static str, p: String| {
        let lake = lake.clone();
        async move { strings(&lake, &format!("SELECT individual_id FROM {t} WHERE photo_id = '{p}'")).await[0][0].clone() }
    };
    assert_eq!(label("images", a.clone()).await.as_deref(), Some(first.as_str()));
    assert_eq!(label("images", b.clone()).await.as_deref(), Some("W-new-1"));
    assert_eq!(label("embeddings", a.clone()).await.as_deref(), Some(first.as_str()));
    assert_eq!(label("embeddings", b.clone()).await.as_deref(), Some("W-new-1"));
    let decided = strings(&lake, &format!("SELECT photo_id, decision FROM images WHERE photo_id IN ('{a}', '{b}') ORDER BY photo_id")).await;
    let want = |p: &String, d: &str| decided.iter().any(|r| r[0].as_ref() == Some(p) && r[1].as_deref() == Some(d));
    assert!(want(&a, "same") && want(&b, "new"), "images.decision: {decided:?}");
    // Nothing new decided: nothing to do.
    let again = pipeline::dag::run(&plan, &opts).await.unwrap();
    assert_eq!(again.stage("ingest").unwrap().status, pipeline::dag::ledger::Status::UpToDate, "{again:#?}");

    // An undo (`pipeline decide`, as the page's `z`): a is back to the survey's label (none)
    // and back in the queue; a "cannot tell" changes no label and re-runs nothing.
    let pipe = f.pipeline.to_str().unwrap();
    let (code, out, err) = common::cli(&["decide", &a, "undo", "--who", "ana", "--pipeline", pipe], f.dir.path());
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = common::cli(&["decide", "nope.jpg", "unsure", "--pipeline", pipe], f.dir.path());
    assert!(code != 0 && err.contains("no photo `nope.jpg`"), "{err}");
    let (code, _, err) = common::cli(&["decide", &a, "same", "--pipeline", pipe], f.dir.path());
    assert!(code != 0 && err.contains("needs an individual"), "{err}");
    // And a labelled photo called bad: it loses its label and leaves `usable` (so nothing
    // trains on it), while it stays in the collection.
    let bad = keep[3..].iter().find(|p| **p != empty_photo).unwrap().clone();
    assert!(!strings(&lake, &format!("SELECT photo_id FROM usable WHERE photo_id = '{bad}'")).await.is_empty());
    let (code, out, err) = common::cli(&["decide", &bad, "bad", "--who", "ana", "--pipeline", pipe], f.dir.path());
    assert_eq!(code, 0, "{out}{err}");
    let r = pipeline::dag::run(&plan, &opts).await.unwrap();
    assert!(r.stage("ingest").unwrap().summary.contains("2 relabelled"), "{}", r.stage("ingest").unwrap().summary);
    assert_eq!(label("images", bad.clone()).await, None);
    assert_eq!(strings(&lake, &format!("SELECT decision FROM images WHERE photo_id = '{bad}'")).await[0][0].as_deref(), Some("bad"));
    assert!(strings(&lake, &format!("SELECT photo_id FROM usable WHERE photo_id = '{bad}'")).await.is_empty(), "a bad photo is not usable");
    assert_eq!(label("embeddings", bad.clone()).await, None, "still in the collection, unlabelled");
    assert_eq!(strings(&lake, &format!("SELECT decision FROM images WHERE photo_id = '{a}'")).await[0][0], None, "undone");
    assert_eq!(label("images", a.clone()).await, None);
    assert_eq!(label("images", b.clone()).await.as_deref(), Some("W-new-1"));
    let q: serde_json::Value = get("/review/queue", ana).await.unwrap().text().await.map(|t| serde_json::from_str(&t).unwrap()).unwrap();
    assert!(q["photos"].as_array().unwrap().iter().any(|p| p["photo_id"].as_str() == Some(a.as_str())), "undone, a awaits a decision again: {q}");
    let other = keep[2].clone();
    let (code, out, err) = common::cli(&["decide", &other, "unsure", "--pipeline", pipe], f.dir.path());
    assert_eq!(code, 0, "{out}{err}");
    let r = pipeline::dag::run(&plan, &opts).await.unwrap();
    assert_eq!(r.stage("ingest").unwrap().status, pipeline::dag::ledger::Status::UpToDate, "{r:#?}");
}
