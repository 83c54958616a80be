//! ingest → detect → embed, streamed against not streamed, in one run on the same photos.
//!
//!     cargo bench --profile release --bench streaming -- [--individuals 96] [--photos-per 10] [--rounds 2]
//!
//! A demo lake of about a thousand 2400×1000 photos is generated, and its main pipeline is run
//! once up to `train` (the detector trained on its boxes, the embedding model for one epoch at
//! 224²) to have a detector and a model. Then each round runs `ingest → detect → embed` twice,
//! once with `stream = false` and once streamed, each into a fresh lake holding only those
//! models (so ingest, detect and embed all do their whole work; the detector is reused). It
//! prints the wall time of each run and each stage's busy time (from its start to its end).

use std::path::{Path, PathBuf};
use std::time::Instant;

use pipeline::dag::{self, RunOptions};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let (individuals, photos_per, rounds) = (arg(&args, "--individuals", 96usize), arg(&args, "--photos-per", 10usize), arg(&args, "--rounds", 2usize));
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("temp dir");
    let demo = tmp.path().join("demo-lake");
    eprintln!("generating the demo lake ({individuals} individuals x {photos_per} photos) in {}", demo.display());
    pipeline::demo::generate(&pipeline::demo::DemoOptions { out: demo.clone(), individuals, photos_per, seed: 7, width: 2400, height: 1000 })
        .expect("demo lake");
    let photos = std::fs::read_dir(demo.join("photos")).expect("photos").count();

    let main = std::fs::read_to_string(repo.join("pipelines/ingest-to-submission.toml")).expect("pipeline file");
    let main = main
        .replace("file://../data/lake", "file://lake")
        .replace("file://../data/demo-lake/", "file://demo-lake/")
        .replace("\"../sql/", &format!("\"{}/sql/", repo.display()));
    let file = tmp.path().join("main.toml");
    std::fs::write(&file, &main).expect("write");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let sets: Vec<String> = ["train.input_size=224", "train.epochs=1", "train.batch_size=16", "train.warmup_epochs=0"].iter().map(|s| s.to_string()).collect();
    eprintln!("training the detector and a one-epoch model on {photos} photos");
    let t = Instant::now();
    let plan = rt.block_on(pipeline::load(&file, &sets)).expect("plan");
    rt.block_on(dag::run(&plan, &RunOptions { quiet: true, until: Some("train".into()), ..Default::default() })).expect("training run");
    eprintln!("  {:.0} s", t.elapsed().as_secs_f64());
    let lake = pipeline::lake::Lake::new(plan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).expect("schemas"));
    let (_, b) = rt.block_on(pipeline::query::query(&lake, "SELECT model_id FROM train LIMIT 1")).expect("model id");
    use arrow::array::AsArray;
    let model = b[0].column(0).as_string::<i32>().value(0).to_string();

    let head = &main[..main.find("[stages.usable]").expect("usable stage")];
    let pipeline_for = |name: &str, stream: bool| -> PathBuf {
        let mut text = head.replace("file://lake", &format!("file://{name}"));
        if !stream {
            text = text.replace("inputs = [\"ingest\"]", "inputs = [\"ingest\"]\nstream = false");
        }
        text.push_str(&format!(
            "[stages.embed]\nkind = \"embed\"\ninputs = [\"ingest\", \"detect\"]\nmodel = \"{model}\"\ntable = \"images\"\ncrops = \"detections\"\nflip_tta = true\nstream = {stream}\n"
        ));
        let f = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&f, text).expect("write");
        f
    };
    println!("ingest -> detect -> embed on {photos} photos of {}x{} ({} cores)", 2400, 1000, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!("| round | edges | wall s | ingest s | detect s | embed s |");
    println!("|---|---|---|---|---|---|");
    for round in 0..rounds {
        for stream in [false, true] {
            let name = format!("lake-{round}-{}", if stream { "streamed" } else { "committed" });
            copy_dir(&tmp.path().join("lake/models"), &tmp.path().join(&name).join("models"));
            let plan = rt.block_on(pipeline::load(&pipeline_for(&name, stream), &[])).expect("plan");
            let t = Instant::now();
            let report = rt.block_on(dag::run(&plan, &RunOptions { quiet: true, ..Default::default() })).expect("run");
            let wall = t.elapsed().as_secs_f64();
            let secs = |s: &str| report.stage(s).map(|r| r.seconds).unwrap_or(f64::NAN);
            println!(
                "| {round} | {} | {wall:.1} | {:.1} | {:.1} | {:.1} |",
                if stream { "streamed" } else { "committed" },
                secs("ingest"),
                secs("detect"),
                secs("embed")
            );
            for s in &report.stages {
                eprintln!("    {} {:?} {:.1}s {}", s.stage, s.status, s.seconds, s.summary);
            }
        }
    }
}
