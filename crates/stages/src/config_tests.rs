//! The config compiler over the real stage kinds: every problem of a pipeline file at once.

use std::any::Any;
use std::path::{Path, PathBuf};

use engine::config::{Diagnostic, Loc};
use lake::Error;

fn load(file: &Path, sets: &[String]) -> impl Future<Output = lake::Result<engine::config::Plan>> {
    let (file, sets) = (file.to_path_buf(), sets.to_vec());
    async move { engine::config::load(&file, &sets, &crate::registry()).await }
}

/// The options of stage `name` of a plan, as the kind's own type.
fn options<'a, T: 'static>(plan: &'a engine::config::Plan, name: &str) -> &'a T {
    let any: &dyn Any = plan.stage(name).expect("stage").kind.as_ref();
    any.downcast_ref::<T>().expect("stage of another kind")
}

/// A pipeline folder with sql/ and schemas/ next to it, like the repository's.
fn fixture(toml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::create_dir_all(dir.path().join("sql")).unwrap();
    std::fs::create_dir_all(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("sql/usable.sql"), "SELECT * FROM images WHERE width >= $min_width").unwrap();
    std::fs::write(dir.path().join("sql/count.sql"), "SELECT individual_id, count(*) AS n FROM usable GROUP BY 1").unwrap();
    std::fs::write(dir.path().join("schemas/usable.toml"), "table = \"usable\"\nlike = \"images\"\n").unwrap();
    let file = dir.path().join("pipelines/p.toml");
    std::fs::write(&file, toml).unwrap();
    (dir, file)
}

fn diags(toml: &str, sets: &[&str]) -> Vec<Diagnostic> {
    let (_d, file) = fixture(toml);
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    match rt.block_on(load(&file, &sets)) {
        Err(Error::Config(d)) => d.0,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => Vec::new(),
    }
}

fn line_of(d: &Diagnostic) -> usize {
    match d.at {
        Loc::File { line, .. } => line,
        _ => 0,
    }
}

const GOOD: &str = r#"[pipeline]
name = "t"
lake = "lake"

[stages.ingest]
kind = "ingest"
source = "../photos"

[stages.usable]
kind = "sql"
inputs = ["ingest"]
query = "../sql/usable.sql"
params = { min_width = 800 }

[stages.count]
kind = "sql"
inputs = ["usable"]
query = "../sql/count.sql"
"#;

#[test]
fn a_good_file_compiles_in_run_order() {
    let (_d, file) = fixture(GOOD);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = rt.block_on(load(&file, &[])).unwrap();
    let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["ingest", "usable", "count"]);
    assert_eq!(plan.stage("usable").unwrap().reads, vec!["images".to_string()]);
    assert_eq!(plan.stage("count").unwrap().writes, vec!["count".to_string()]);
    assert!(plan.lake.starts_with("file:///") && plan.lake.ends_with("/pipelines/lake"), "{}", plan.lake);
    let until: Vec<&str> = plan.until("usable").unwrap().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(until, ["ingest", "usable"]);
}

#[test]
fn storage_settings_become_the_stores_options_and_mistakes_are_named() {
    let with = GOOD.replace("lake = \"lake\"\n", "lake = \"lake\"\n\n[pipeline.storage]\nretries = 4\nretry_timeout = 12.5\ntimeout = 2.5\nconnect_timeout = 1\n");
    let (_d, file) = fixture(&with);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = rt.block_on(load(&file, &[])).unwrap();
    let o = &plan.storage_options;
    assert_eq!(o.get("client_max_retries").map(String::as_str), Some("4"));
    assert_eq!(o.get("client_retry_timeout").map(String::as_str), Some("13"), "Lance reads whole seconds");
    assert_eq!(o.get("timeout").map(String::as_str), Some("2500ms"));
    assert_eq!(o.get("connect_timeout").map(String::as_str), Some("1000ms"));
    let bad = GOOD.replace("lake = \"lake\"\n", "lake = \"lake\"\n\n[pipeline.storage]\nretries = -1\ntimeout = \"fast\"\nretry = 3\n");
    let d = diags(&bad, &[]);
    let text: Vec<String> = d.iter().map(|d| format!("{}: {}", line_of(d), d.message)).collect();
    assert_eq!(d.len(), 3, "{text:?}");
    assert!(text.iter().any(|t| t.starts_with("6:") && t.contains("retries")), "{text:?}");
    assert!(text.iter().any(|t| t.starts_with("7:") && t.contains("timeout")), "{text:?}");
    assert!(text.iter().any(|t| t.starts_with("8:") && t.contains("unknown key `retry`") && t.contains("retry_timeout")), "{text:?}");
}

#[test]
fn every_error_is_reported_at_once_with_its_line_and_stage() {
    let broken = r#"[pipeline]
name = "broken"
colour = "red"

[stages.ingest]
kind = "ingest"
source = "../photos"
concurrency = "many"
sauce = 1

[stages.usable]
kind = "sql"
inputs = ["ingest", "nowhere"]
query = "../sql/missing.sql"

[stages.weird]
kind = "teleport"

[stages.count]
kind = "sql"
inputs = ["usable"]
query = "../sql/count.sql"
qurey = "x"

[stages.bad_sql]
kind = "sql"
inputs = ["ingest"]
query = "../sql/count.sql"
"#;
    let d = diags(broken, &[]);
    let shown: Vec<String> = d.iter().map(|x| x.to_string()).collect();
    let find = |needle: &str| {
        d.iter().find(|x| x.to_string().contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in {shown:#?}"))
    };
    assert_eq!(line_of(find("unknown key `colour`")), 3);
    let c = find("`concurrency` must be an integer");
    assert_eq!((line_of(c), c.stage.as_deref()), (8, Some("ingest")));
    assert_eq!(line_of(find("unknown key `sauce`")), 9);
    let i = find("input `nowhere`");
    assert_eq!((line_of(i), i.stage.as_deref()), (13, Some("usable")));
    assert_eq!(line_of(find("missing.sql")), 14);
    assert_eq!(line_of(find("unknown kind `teleport`")), 17);
    let q = find("did you mean `query`");
    assert_eq!((line_of(q), q.stage.as_deref()), (23, Some("count")));
    // count.sql reads `usable`, which bad_sql's inputs do not provide.
    let b = find("does not plan");
    assert_eq!((line_of(b), b.stage.as_deref()), (28, Some("bad_sql")));
    assert!(b.message.contains("usable"), "{}", b.message);
    assert_eq!(d.len(), 8, "{shown:#?}");
    // Sorted by line, each formatted as file:line:col.
    assert!(shown[0].contains("p.toml:3:1: unknown key `colour`"), "{}", shown[0]);
}

#[test]
fn cycles_are_errors() {
    let cyc = r#"[stages.a]
kind = "sql"
inputs = ["c"]
query = "../sql/usable.sql"
params = { min_width = 1 }
output = "ta"

[stages.b]
kind = "sql"
inputs = ["a"]
query = "../sql/usable.sql"
params = { min_width = 1 }
output = "tb"

[stages.c]
kind = "sql"
inputs = ["b"]
query = "../sql/usable.sql"
params = { min_width = 1 }
output = "tc"
"#;
    let d = diags(cyc, &[]);
    let c = d.iter().find(|x| x.message.contains("cycle")).expect("cycle reported");
    assert!(c.message.contains("a -> ") || c.message.contains("b -> ") || c.message.contains("c -> "), "{}", c.message);
}

#[test]
fn missing_sql_parameter_and_bad_column_do_not_plan() {
    let no_param = GOOD.replace("params = { min_width = 800 }", "");
    let d = diags(&no_param, &[]);
    assert!(d.iter().any(|x| x.message.contains("does not plan") && x.message.contains("min_width")), "{d:#?}");
    let (_d, file) = fixture(GOOD);
    std::fs::write(file.parent().unwrap().join("../sql/usable.sql"), "SELECT * FROM images WHERE wdith > $min_width").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let Err(Error::Config(d)) = rt.block_on(load(&file, &[])) else { panic!("expected errors") };
    assert!(d.0.iter().any(|x| x.message.contains("wdith")), "{d}");
}

#[test]
fn result_schema_must_match_the_declared_one() {
    let (_d, file) = fixture(GOOD);
    std::fs::write(file.parent().unwrap().join("../sql/usable.sql"), "SELECT photo_id FROM images WHERE width > $min_width").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let Err(Error::Config(d)) = rt.block_on(load(&file, &[])) else { panic!("expected errors") };
    assert!(d.0.iter().any(|x| x.message.contains("schemas/usable.toml") && x.message.contains("column `uri`")), "{d}");
}

#[test]
fn set_overrides_are_typed_and_checked() {
    let (_d, file) = fixture(GOOD);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = rt.block_on(load(&file, &["ingest.concurrency=3".into(), "usable.params.min_width=10".into()])).unwrap();
    let c: &crate::ingest::IngestConfig = options(&plan, "ingest");
    assert_eq!(c.concurrency, 3);
    let d = diags(GOOD, &["ingest.concurrency=lots", "nostage.x=1", "ingest.bogus=1"]);
    assert!(d.iter().any(|x| matches!(&x.at, Loc::Set(s) if s == "ingest.concurrency=lots") && x.message.contains("integer")), "{d:#?}");
    assert!(d.iter().any(|x| x.message.contains("no stage `nostage`")), "{d:#?}");
    assert!(d.iter().any(|x| x.message.contains("unknown key `bogus`")), "{d:#?}");
}

#[test]
fn config_hash_follows_options_and_sql_text() {
    let (_d, file) = fixture(GOOD);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let a = rt.block_on(load(&file, &[])).unwrap();
    let b = rt.block_on(load(&file, &["usable.params.min_width=801".into()])).unwrap();
    assert_eq!(a.stage("ingest").unwrap().config_hash, b.stage("ingest").unwrap().config_hash);
    assert_ne!(a.stage("usable").unwrap().config_hash, b.stage("usable").unwrap().config_hash);
    std::fs::write(file.parent().unwrap().join("../sql/count.sql"), "SELECT individual_id, count(*) AS n FROM usable GROUP BY 1 -- edited").unwrap();
    let c = rt.block_on(load(&file, &[])).unwrap();
    assert_ne!(a.stage("count").unwrap().config_hash, c.stage("count").unwrap().config_hash);
}

#[test]
fn not_toml_is_one_error_with_a_line() {
    let d = diags("[stages.a]\nkind = \"sql\"\nquery = \n", &[]);
    assert_eq!(d.len(), 1);
    assert_eq!(line_of(&d[0]), 3);
    assert!(d[0].message.contains("not valid TOML"));
}

#[test]
fn submit_refine_zero_turns_re_ranking_off() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/ingest-to-submission.toml");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let refine = |set: &[String]| {
        let plan = rt.block_on(load(&file, set)).unwrap();
        let s: &crate::submit::SubmitStage = options(&plan, "submit");
        (s.search.refine, s.search.nprobes, s.search.ef)
    };
    let ivf_pq = lake::vector::SearchParams::for_index(Some("ivf_pq"));
    assert_eq!(ivf_pq.refine, Some(10), "IVF_PQ re-ranks unless told otherwise");
    let (r, n, e) = refine(&["submit.refine=0".into(), "submit.nprobes=15".into(), "submit.ef=60".into()]);
    assert_eq!((r, n, e), (Some(0), Some(15), Some(60)));
    let given = lake::vector::SearchOverrides { refine: r, nprobes: n, ef: e };
    assert_eq!(given.apply(ivf_pq.clone()).refine, None, "refine = 0 is no re-ranking");
    assert_eq!(refine(&["submit.refine=4".into()]).0, Some(4));
    // Nothing given: the measured settings of whatever index the table has.
    let (r, n, e) = refine(&[]);
    assert_eq!(lake::vector::SearchOverrides { refine: r, nprobes: n, ef: e }.apply(ivf_pq.clone()), ivf_pq);
    let hnsw = lake::vector::SearchParams::for_index(Some("IVF_HNSW_SQ"));
    assert_eq!((hnsw.nprobes, hnsw.refine, hnsw.ef), (Some(15), None, Some(60)));
}

#[test]
fn device_is_typed_and_an_unknown_one_is_an_error_naming_the_choices() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/ingest-to-submission.toml");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = rt.block_on(load(&file, &["train.device=cpu".into()])).unwrap();
    assert_eq!(options::<crate::train::TrainStage>(&plan, "train").device, engine::config::Device::Cpu);
    assert_eq!(options::<crate::embed::EmbedStage>(&plan, "embed").device, engine::config::Device::Auto, "absent: auto");
    let Err(Error::Config(d)) = rt.block_on(load(&file, &["detect.device=gpu".into()])) else { panic!("gpu is no device") };
    assert!(d.0.iter().any(|x| x.stage.as_deref() == Some("detect") && x.message.contains("unknown device `gpu` (auto, cpu, cuda)")), "{d}");
}

#[test]
fn a_model_name_has_one_stage_that_makes_it() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/ingest-to-submission.toml");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = rt.block_on(load(&file, &[])).unwrap();
    assert_eq!(plan.stage("train").unwrap().models, ["train"]);
    assert_eq!(plan.stage("detect").unwrap().models, ["detect"]);
    assert!(plan.stage("embed").unwrap().models.is_empty());
    // The detector named like the embedding model: two stages would make `train-...` models.
    let Err(Error::Config(d)) = rt.block_on(load(&file, &["detect.model=\"train\"".into()])) else { panic!("two makers of `train`") };
    assert!(
        d.0.iter().any(|x| x.stage.as_deref() == Some("train") && x.message.contains("makes models named `train`, which stage `detect` makes too")),
        "{d}"
    );
}

#[test]
fn locations_written_relative_hash_the_same_wherever_the_project_is() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let (a, fa) = fixture(GOOD);
    let (b, fb) = fixture(GOOD);
    let (pa, pb) = (rt.block_on(load(&fa, &[])).unwrap(), rt.block_on(load(&fb, &[])).unwrap());
    assert_ne!(a.path(), b.path());
    for s in ["ingest", "usable", "count"] {
        assert_eq!(pa.stage(s).unwrap().config_hash, pb.stage(s).unwrap().config_hash, "{s}");
    }
    // Photos under a relative source are recorded relative to a relative lake; not otherwise.
    assert!(options::<crate::ingest::IngestConfig>(&pa, "ingest").relative);
    let abs = GOOD.replace("source = \"../photos\"", &format!("source = \"file://{}/photos\"", a.path().display()));
    let (_c, fc) = fixture(&abs);
    assert!(!options::<crate::ingest::IngestConfig>(&rt.block_on(load(&fc, &[])).unwrap(), "ingest").relative);
}

#[test]
fn index_schedule_and_query_set_are_typed_and_an_unknown_one_names_the_choices() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/ingest-to-submission.toml");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let sets = ["index.index=\"ivf_pq\"", "train.schedule=\"multistep\"", "submit.queries=\"val_unseen\""];
    let plan = rt.block_on(load(&file, &sets.map(String::from))).unwrap();
    assert_eq!(options::<crate::index::IndexStage>(&plan, "index").index, crate::index::IndexKind::IvfPq);
    assert_eq!(options::<crate::train::TrainStage>(&plan, "train").config.schedule.kind, model::train::ScheduleKind::MultiStep);
    let submit = options::<crate::submit::SubmitStage>(&plan, "submit");
    assert_eq!(submit.queries, crate::submit::QuerySet::ValUnseen);
    assert!(submit.queries.holds("val_unseen", true) && !submit.queries.holds("val_seen", true));
    // Serialised as the name it had as a string: model ids of earlier runs stay the same.
    assert_eq!(serde_json::to_string(&model::train::ScheduleKind::MultiStep).unwrap(), "\"multistep\"");

    let bad = ["index.index=\"hnsw\"", "train.schedule=\"linear\"", "submit.queries=\"some\""];
    let Err(Error::Config(d)) = rt.block_on(load(&file, &bad.map(String::from))) else { panic!("three unknown names") };
    for (stage, msg) in [
        ("index", "unknown index `hnsw` (auto, flat, ivf_pq, ivf_hnsw_sq)"),
        ("train", "unknown schedule `linear` (cosine, step, multistep, constant)"),
        ("submit", "unknown query set `some` (all, val, val_unseen, val_seen, unlabelled)"),
    ] {
        assert!(d.0.iter().any(|x| x.stage.as_deref() == Some(stage) && x.message.contains(msg)), "{stage}: {d}");
    }
}

#[test]
fn a_loss_is_a_name_a_table_or_a_list_of_tables() {
    use model::loss::LossSpec;
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/ingest-to-submission.toml");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let loss = |set: &str| {
        let plan = rt.block_on(load(&file, &[set.to_string()])).unwrap();
        options::<crate::train::TrainStage>(&plan, "train").config.loss.clone()
    };
    // A name takes the flat keys (the file sets arcface_s = 30, arcface_m = 0.5).
    assert_eq!(loss("train.loss=\"arcface\""), vec![(1.0, LossSpec::ArcFace { s: 30.0, m: 0.5, easy_margin: false })]);
    // A table: its own parameters, the rest from the flat keys and the defaults.
    assert_eq!(
        loss("train.loss={ kind = \"subcenter_arcface\", k = 2, margin_a = 0.3 }"),
        vec![(1.0, LossSpec::SubCenterArcFace { s: 30.0, k: 2, margin_a: 0.3, margin_lambda: 0.25, margin_b: 0.05, easy_margin: false })]
    );
    // A list of tables with weights equals the same sum written as text.
    assert_eq!(
        loss("train.loss=[{ kind = \"arcface\", m = 0.4 }, { kind = \"cross_entropy\", weight = 0.2 }]"),
        vec![(1.0, LossSpec::ArcFace { s: 30.0, m: 0.4, easy_margin: false }), (0.2, LossSpec::CrossEntropy)]
    );
    // Every problem in the tables, at once: unknown kind, a parameter out of range, a key of
    // another loss, a missing kind.
    let toml = std::fs::read_to_string(&file).unwrap().replace(
        "loss = \"arcface\"",
        "loss = [\n  { kind = \"focal\" },\n  { kind = \"arcface\", m = 9.0 },\n  { kind = \"triplet\", k = 3 },\n  { weight = 0.5 },\n]",
    );
    let (_d, f) = fixture(&toml);
    let Err(Error::Config(d)) = rt.block_on(load(&f, &[])) else { panic!("four bad loss tables") };
    let train: Vec<&Diagnostic> = d.0.iter().filter(|x| x.stage.as_deref() == Some("train")).collect();
    let has = |s: &str| train.iter().any(|x| x.message.contains(s));
    assert!(has("unknown loss `focal`"), "{d}");
    assert!(has("`m` must be between 0 and 1.5, found 9"), "{d}");
    assert!(has("`k`"), "a subcenter key in a triplet table: {d}");
    assert!(has("missing `kind`"), "{d}");
    let lines: std::collections::BTreeSet<usize> = train.iter().map(|x| line_of(x)).collect();
    assert!(lines.len() >= 4, "each problem at its own line: {d}");
}

#[test]
fn detect_trains_on_boxes_or_pseudo_boxes_or_uses_a_trained_detector_not_both() {
    let base = "[pipeline]\nname = \"t\"\nlake = \"lake\"\n\n[stages.ingest]\nkind = \"ingest\"\nsource = \"../photos\"\n\n[stages.detect]\nkind = \"detect\"\ninputs = [\"ingest\"]\n";
    // The nightly pipeline's form: the current model's detector, no boxes; it makes no model.
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/nightly-reingest.toml");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let plan = rt.block_on(load(&file, &[])).unwrap();
    assert!(plan.stage("detect").unwrap().models.is_empty());
    assert_eq!(options::<crate::detect::DetectStage>(&plan, "detect").detector.as_deref(), Some("current:train"));
    let both = diags(&format!("{base}boxes = \"../boxes.csv\"\ndetector = \"current:train\"\n"), &[]);
    assert!(both.iter().any(|d| d.message.contains("`boxes` (train a detector on them) or `detector`")), "{both:?}");
    // Neither: the detector trains on pseudo-boxes of a sample of the photos.
    let neither = diags(base, &[]);
    assert!(neither.is_empty(), "{neither:?}");
    let pseudo = diags(&format!("{base}pseudo_photos = 4\n"), &[]);
    assert!(pseudo.iter().any(|d| d.message.contains("pseudo_photos")), "at least 8: {pseudo:?}");
}

#[test]
fn a_lake_where_lance_cannot_write_is_refused_at_validate() {
    for (lake, ok) in [("gs://bucket/lake", false), ("az://container/lake", false), ("s3://bucket/lake", true), ("file:///tmp/lake", true)] {
        let d = diags(&GOOD.replace("lake = \"lake\"", &format!("lake = \"{lake}\"")), &[]);
        let refused = d.iter().any(|x| x.message.contains("is not supported (this build's Lance has file://, s3:// and memory:// stores)"));
        assert_eq!(refused, !ok, "{lake}: {d:?}");
        if !ok {
            assert_eq!(line_of(&d[0]), 3, "{d:?}");
        }
    }
}
