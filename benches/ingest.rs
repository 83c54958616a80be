//! Ingest throughput beside Pillow, in one run on the same files.
//!
//!     cargo bench --profile dev --bench ingest -- [DIR] [--side 480] [--repeat 5]
//!
//! DIR defaults to a generated set of 2560×1600 survey JPEGs. Measured, in order:
//!   rust decode_square 1 thread   DCT-scaled JPEG decode + SIMD resize to side², one core
//!   rust decode_square N threads  the same on every core (what ingest's decode pool does)
//!   rust analyze N threads        what ingest does per photo: decode + metrics + hashes
//!   ingest stage                  the whole stage: list, fetch, analyze, BLAKE3, Lance commit
//!   pillow / pillow-draft         benches/peer_pillow.py: Pillow decode (+draft) + resize, one process
//!   pillow-draft N processes      N of those at once (N = cores), each on every file, clocks
//!                                 started together; images/s is the sum of theirs
//! The last column is against single-thread Pillow without draft; the lines after the table put
//! Rust on 1 and N threads against Pillow-draft in 1 and N processes (issue #8's yardstick).
//! PIPELINE_JPEG_DECODER=jpeg-decoder measures the pure-Rust decoder that libjpeg-turbo replaced.
//! Every decoding row (Rust and Pillow) goes over the files `--repeat` times (default 5), so that
//! no clock times only a fraction of a second: 33 photos on two threads took 0.3 s, and single
//! runs spread by ±15 %. The ingest stage row goes over them once (a second pass adds nothing).

use std::path::{Path, PathBuf};
use std::time::Instant;

use pipeline::vision::{self, DecodeLimits};

struct Row {
    name: String,
    images: usize,
    seconds: f64,
    source_mp: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse::<u32>().ok());
    let side: u32 = flag("--side").unwrap_or(480);
    let repeat = flag("--repeat").unwrap_or(5).max(1) as usize;
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = match args.iter().find(|a| !a.starts_with("--") && Path::new(a).is_dir()) {
        Some(d) => PathBuf::from(d),
        None => {
            let out = tmp.path().join("survey");
            eprintln!("generating 2560x1600 survey photos in {}", out.display());
            pipeline::demo::generate(&pipeline::demo::DemoOptions {
                out: out.clone(),
                individuals: 6,
                photos_per: 5,
                seed: 1,
                width: 2560,
                height: 1600,
            })
            .expect("demo lake");
            let photos = out.join("photos");
            // Only decodable RGB JPEGs at full size: the peer and we must see the same files.
            let keep = tmp.path().join("jpegs");
            std::fs::create_dir_all(&keep).expect("dir");
            for e in std::fs::read_dir(&photos).expect("photos") {
                let p = e.expect("entry").path();
                let bytes = std::fs::read(&p).expect("read");
                let ok = p.extension().is_some_and(|x| x == "jpg")
                    && vision::probe(&bytes, &DecodeLimits::default()).is_ok_and(|pr| pr.width >= 2000 && pr.color == "rgb8")
                    && vision::analyze(&bytes, &DecodeLimits::default()).is_ok();
                if ok {
                    std::fs::copy(&p, keep.join(p.file_name().expect("name"))).expect("copy");
                }
            }
            keep
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg")))
        .collect();
    files.sort();
    let bytes: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("read")).collect();
    let limits = DecodeLimits::default();
    let mp: f64 = bytes.iter().map(|b| vision::probe(b, &limits).map(|p| p.width as f64 * p.height as f64 / 1e6).unwrap_or(0.0)).sum();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    eprintln!("{} JPEGs, {:.1} MP in all, side {side}, {threads} cores, each decoding row over them {repeat}x", bytes.len(), mp);
    // Warm-up (page cache, thread-local resizers).
    for b in bytes.iter().take(2) {
        let _ = vision::decode_square(b, &limits, side);
    }

    let mut rows = Vec::new();
    // Each file `repeat` times, in file order per pass.
    let n = bytes.len() * repeat;
    let t = Instant::now();
    for i in 0..n {
        vision::decode_square(&bytes[i % bytes.len()], &limits, side).expect("decode");
    }
    rows.push(Row { name: "rust decode_square 1 thread".into(), images: n, seconds: t.elapsed().as_secs_f64(), source_mp: mp * repeat as f64 });

    let par = |f: &(dyn Fn(&[u8]) + Sync)| {
        let t = Instant::now();
        std::thread::scope(|s| {
            for chunk in 0..threads {
                let bytes = &bytes;
                s.spawn(move || {
                    for i in (chunk..n).step_by(threads) {
                        f(&bytes[i % bytes.len()]);
                    }
                });
            }
        });
        t.elapsed().as_secs_f64()
    };
    let secs = par(&|b| {
        vision::decode_square(b, &limits, side).expect("decode");
    });
    rows.push(Row { name: format!("rust decode_square {threads} threads"), images: n, seconds: secs, source_mp: mp * repeat as f64 });
    let secs = par(&|b| {
        vision::analyze(b, &limits).expect("analyze");
        blake3::hash(b);
    });
    rows.push(Row { name: format!("rust analyze+blake3 {threads} threads"), images: n, seconds: secs, source_mp: mp * repeat as f64 });

    // The whole ingest stage through the engine, into a fresh lake.
    let pipe = tmp.path().join("bench.toml");
    std::fs::write(
        &pipe,
        format!("[pipeline]\nlake = \"file://bench-lake\"\n[stages.ingest]\nkind = \"ingest\"\nsource = \"{}\"\n", dir.display()),
    )
    .expect("write pipeline");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let secs = rt.block_on(async {
        let plan = pipeline::load(&pipe, &[]).await.expect("plan");
        let t = Instant::now();
        let r = pipeline::dag::run(&plan, &pipeline::dag::RunOptions { quiet: true, force: true, ..Default::default() }).await.expect("run");
        assert_eq!(r.stage("ingest").map(|s| s.rows_out as usize), Some(bytes.len()));
        t.elapsed().as_secs_f64()
    });
    rows.push(Row { name: "ingest stage (list+fetch+analyze+commit)".into(), images: bytes.len(), seconds: secs, source_mp: mp });

    let python = std::env::var("VIRTUAL_ENV").map(|v| format!("{v}/bin/python")).unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer_pillow.py");
    for draft in [false, true] {
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(&script).arg(&dir).arg("--side").arg(side.to_string()).arg("--repeat").arg(repeat.to_string());
        if draft {
            cmd.arg("--draft");
        }
        let out = cmd.output().expect("run the Pillow peer");
        if !out.status.success() {
            eprintln!("peer failed: {}", String::from_utf8_lossy(&out.stderr));
            continue;
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or("{}")).expect("peer JSON");
        rows.push(Row {
            name: v["peer"].as_str().unwrap_or("pillow").to_string() + " 1 process",
            images: v["images"].as_u64().unwrap_or(0) as usize,
            seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
            source_mp: mp * repeat as f64,
        });
    }
    // N Pillow-draft processes at once, as many as the Rust rows have threads: each reads the
    // files and warms up, then all start their clocks at the same instant.
    let start_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64() + 3.0;
    let peers: Vec<_> = (0..threads)
        .map(|_| {
            std::process::Command::new(&python)
                .arg(&script)
                .arg(&dir)
                .args(["--side", &side.to_string(), "--repeat", &repeat.to_string(), "--draft", "--start-at", &format!("{start_at:.3}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start a Pillow peer")
        })
        .collect();
    let outs: Vec<_> = peers.into_iter().map(|p| p.wait_with_output().expect("Pillow peer")).collect();
    if let Some(bad) = outs.iter().find(|o| !o.status.success()) {
        eprintln!("peer failed: {}", String::from_utf8_lossy(&bad.stderr));
    } else {
        let parsed: Vec<serde_json::Value> = outs
            .iter()
            .map(|o| serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim().lines().last().unwrap_or("{}")).expect("peer JSON"))
            .collect();
        let images: usize = parsed.iter().map(|v| v["images"].as_u64().unwrap_or(0) as usize).sum();
        let rate: f64 = parsed.iter().map(|v| v["images"].as_f64().unwrap_or(0.0) / v["seconds"].as_f64().unwrap_or(f64::NAN)).sum();
        // Seconds such that images / seconds is the summed rate; source MP scale with the files done.
        rows.push(Row {
            name: format!("pillow-draft {threads} processes"),
            images,
            seconds: images as f64 / rate,
            source_mp: mp * (threads * repeat) as f64,
        });
    }
    let base = rows.iter().find(|r| r.name == "pillow 1 process").map(|r| r.images as f64 / r.seconds);
    println!("{:<44} {:>7} {:>9} {:>10} {:>10} {:>9}", "what", "images", "seconds", "images/s", "source MP/s", "vs Pillow");
    for r in &rows {
        let ips = r.images as f64 / r.seconds;
        println!(
            "{:<44} {:>7} {:>9.2} {:>10.1} {:>10.1} {:>8.2}x",
            r.name,
            r.images,
            r.seconds,
            ips,
            r.source_mp / r.seconds,
            base.map(|b| ips / b).unwrap_or(f64::NAN)
        );
    }
    let rate = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.images as f64 / r.seconds);
    let decoder = if std::env::var("PIPELINE_JPEG_DECODER").as_deref() == Ok("jpeg-decoder") { "jpeg-decoder" } else { "libjpeg-turbo" };
    for (rust, peer) in [
        ("rust decode_square 1 thread".to_owned(), "pillow-draft 1 process".to_owned()),
        (format!("rust decode_square {threads} threads"), format!("pillow-draft {threads} processes")),
    ] {
        if let (Some(a), Some(b)) = (rate(&rust), rate(&peer)) {
            println!("{rust} ({decoder}) / {peer}: {:.2}x", a / b);
        }
    }
}
