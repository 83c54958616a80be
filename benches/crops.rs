//! Where the training loader's pixels come from, side by side in one run on the same crops:
//!
//!     cargo bench --profile dev --bench crops -- [--side 224] [--photos 40] [--threads 1]
//!
//!   source       2560×1600 survey JPEGs: fetched, each photo's crop decoded (DCT-scaled) and
//!                resized to side² — an epoch without the crop cache (what filling it costs)
//!   lake cache   the same crops read from the lake's crop cache by a new loader (a later
//!                epoch, a re-embed, a retrain: `model::data::Loader::with_crop_cache`)
//!   pre-cropped  the peer: the crops written beforehand as JPEG files (quality 95) of side²,
//!                each fetched and decoded whole (a dataset cropped ahead of training)
//!
//! Each row: photos per second and milliseconds per photo of loader work, `--threads` decodes at
//! once (1: one core). Training on cached crops is within X % of training on pre-cropped photos
//! when (step + cache) / (step + pre-cropped) ≤ 1 + X; the bench prints that ratio for a
//! training step of `--step-ms` per photo (83 ms: 12 photos/s, the right whales' training rate
//! at 224² on the 2 cores, see the README), since the loader shares the cores with training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use pipeline::model::data::{Loader, Photo};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn photos_in(dir: &Path, crop: Option<[f32; 4]>) -> Vec<Photo> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).expect("dir").filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "jpg")).collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read");
            Photo {
                photo_id: p.file_name().unwrap().to_string_lossy().to_string(),
                uri: format!("file://{}", p.display()),
                label: None,
                crop,
                content_hash: Some(blake3::hash(&bytes).to_hex().to_string()),
            }
        })
        .collect()
}

async fn pass(loader: &Arc<Loader>, photos: &[Photo]) -> (f64, Vec<Arc<Vec<u8>>>) {
    let t = Instant::now();
    let mut out = Vec::new();
    for chunk in photos.chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in chunk.iter().cloned().enumerate() {
            let l = loader.clone();
            set.spawn(async move { (i, l.pixels(&p.uri, p.crop, p.content_hash.as_deref()).await.expect("pixels")) });
        }
        let mut got: Vec<(usize, Arc<Vec<u8>>)> = set.join_all().await;
        got.sort_by_key(|(i, _)| *i);
        out.extend(got.into_iter().map(|(_, p)| p));
    }
    (t.elapsed().as_secs_f64(), out)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let side: u32 = arg(&args, "--side", 224);
    let n: usize = arg(&args, "--photos", 40);
    let threads: usize = arg(&args, "--threads", 1);
    let step_ms: f64 = arg(&args, "--step-ms", 83.0);
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("survey");
    let per = 5usize;
    eprintln!("generating {} 2560x1600 survey photos in {}", n.div_ceil(per) * per, out.display());
    pipeline::demo::generate(&pipeline::demo::DemoOptions { out: out.clone(), individuals: n.div_ceil(per), photos_per: per, seed: 3, width: 2560, height: 1600 }).expect("demo lake");
    let crop = Some([0.2, 0.25, 0.8, 0.75]);
    let mut photos: Vec<Photo> = photos_in(&out.join("photos"), crop)
        .into_iter()
        .filter(|p| pipeline::vision::probe(&std::fs::read(p.uri.trim_start_matches("file://")).unwrap(), &Default::default()).is_ok_and(|pr| pr.width >= 2000))
        .collect();
    photos.truncate(n);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let lake = pipeline::lake::Lake::new(format!("file://{}", tmp.path().join("lake").display()), HashMap::new(), pipeline::lake::Catalog::default());
        // Warm the page cache and the thread-local resizers.
        let warm = Arc::new(Loader::new(side, threads, 0, HashMap::new()));
        pass(&warm, &photos[..2.min(photos.len())]).await;

        let fill = Arc::new(Loader::new(side, threads, 0, HashMap::new()).with_crop_cache(lake.clone()));
        let (t_source, pixels) = pass(&fill, &photos).await;
        let t_flush = Instant::now();
        fill.flush().await.expect("flush");
        let t_flush = t_flush.elapsed().as_secs_f64();

        let cached = Arc::new(Loader::new(side, threads, 0, HashMap::new()).with_crop_cache(lake.clone()));
        let (t_cache, again) = pass(&cached, &photos).await;
        assert_eq!(cached.decoded(), 0, "the cache served every crop");
        assert!(again.iter().zip(&pixels).all(|(a, b)| a == b), "cached pixels are the decoded ones");

        let pre = tmp.path().join("precropped");
        std::fs::create_dir_all(&pre).expect("dir");
        for (p, px) in photos.iter().zip(&pixels) {
            let img = pipeline::vision::RgbImage::from_raw(side, side, px.to_vec()).expect("image");
            let mut f = std::fs::File::create(pre.join(&p.photo_id)).expect("create");
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 95).encode_image(&img).expect("jpeg");
        }
        let pre_photos = photos_in(&pre, None);
        let plain = Arc::new(Loader::new(side, threads, 0, HashMap::new()));
        pass(&plain, &pre_photos[..2.min(pre_photos.len())]).await;
        let plain = Arc::new(Loader::new(side, threads, 0, HashMap::new()));
        let (t_pre, _) = pass(&plain, &pre_photos).await;

        let k = photos.len() as f64;
        println!("{} photos 2560x1600, crop to {side}², {threads} decode thread(s)", photos.len());
        println!("{:<34} {:>10} {:>10}", "pixels from", "photos/s", "ms/photo");
        for (name, t) in [("source (decode + resize the crop)", t_source), ("lake crop cache", t_cache), ("pre-cropped JPEG at side²", t_pre)] {
            println!("{name:<34} {:>10.1} {:>10.2}", k / t, t / k * 1e3);
        }
        println!("cache write (one append of {:.1} MB): {:.2} s", k * (side * side * 3) as f64 / 1e6, t_flush);
        let (c, p, s) = (t_cache / k * 1e3, t_pre / k * 1e3, t_source / k * 1e3);
        println!(
            "training at {step_ms} ms/photo: cached crops {:.3}x the time of pre-cropped photos; uncached source photos {:.3}x",
            (step_ms + c) / (step_ms + p),
            (step_ms + s) / (step_ms + p)
        );
    });
}
