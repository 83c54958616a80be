//! `pipeline demo-lake`: a deterministic synthetic whale-fluke photo-ID survey with planted
//! defects and the ground truth needed to test ingest, cleaning and re-identification.
//!
//! Same options ⇒ byte-identical files: the lake layout comes from one plan RNG, every
//! individual's fluke from its own RNG and every photo from an RNG keyed by its file number,
//! so the two worker threads can render in any order.

mod encode;
mod fluke;
mod noise;
mod plan;
mod scene;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rand::Rng;

use noise::{DOMAIN_PHOTO, Textures, rng_for, uni};
use plan::{Defect, Dup, Expected, Plan, Shot};
use scene::{Exposure, Renderer, Request};

pub struct DemoOptions {
    /// Lake folder: photos/, the CSV files and README.md are written inside it.
    pub out: PathBuf,
    /// Regular individuals (`W###`); defect photos and singletons come on top.
    pub individuals: usize,
    /// Clean photos per regular individual (at least 3).
    pub photos_per: usize,
    pub seed: u64,
    /// Photo size in pixels (tiny and near-duplicate defects are smaller).
    pub width: u32,
    pub height: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self { out: PathBuf::from("demo-lake"), individuals: 24, photos_per: 8, seed: 7, width: 2400, height: 1000 }
    }
}

pub struct DemoSummary {
    /// Files written to photos/ (every one has a ground_truth.csv row).
    pub photos: usize,
    /// Distinct individual ids, regular and singleton.
    pub individuals: usize,
    /// Files with a planted defect (ground-truth rows whose defect is not `none`).
    pub defects: usize,
    pub seconds: f64,
}

const WORKERS: usize = 2;

/// A fluke box row for boxes.csv, [x0, y0, x1, y1) in displayed pixel coordinates.
type BoxRow = (String, [u32; 4]);

pub fn generate(opts: &DemoOptions) -> Result<DemoSummary> {
    let started = Instant::now();
    ensure!((240..=16384).contains(&opts.width), "width must be between 240 and 16384 pixels");
    ensure!((100..=16384).contains(&opts.height), "height must be between 100 and 16384 pixels");
    let plan = plan::build(opts)?;
    let photos_dir = opts.out.join("photos");
    prepare_dirs(&opts.out, &photos_dir)?;

    let textures = Textures::new(opts.seed);
    let ctx = Ctx { opts, photos_dir: &photos_dir };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let boxes: Mutex<Vec<BoxRow>> = Mutex::new(Vec::new());
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut renderer = Renderer::new(&textures);
                    loop {
                        let g = next.fetch_add(1, Ordering::Relaxed);
                        if g >= plan.groups.len() || stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        match render_group(&ctx, &plan, g, &mut renderer) {
                            Ok(rows) => boxes.lock().unwrap_or_else(|p| p.into_inner()).extend(rows),
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(r) => r?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    })?;
    let mut boxes = boxes.into_inner().unwrap_or_else(|p| p.into_inner());
    boxes.sort();

    let (photos, defects) = write_tables(&opts.out, &plan, &boxes)?;
    fs::write(opts.out.join("README.md"), readme(opts, &plan, photos, defects))?;
    Ok(DemoSummary { photos, individuals: plan.individuals, defects, seconds: started.elapsed().as_secs_f64() })
}

/// Refuses to clear a folder this generator did not write, but regenerates its own lakes in place.
fn prepare_dirs(out: &Path, photos: &Path) -> Result<()> {
    if photos.exists() {
        if !out.join("ground_truth.csv").is_file() {
            bail!(
                "{} exists and is not a demo lake (no ground_truth.csv next to it); refusing to overwrite",
                photos.display()
            );
        }
        fs::remove_dir_all(photos).with_context(|| format!("clearing {}", photos.display()))?;
    }
    fs::create_dir_all(photos).with_context(|| format!("creating {}", photos.display()))?;
    Ok(())
}

struct Ctx<'a> {
    opts: &'a DemoOptions,
    photos_dir: &'a Path,
}

fn render_group(ctx: &Ctx, plan: &Plan, g: usize, renderer: &mut Renderer) -> Result<Vec<BoxRow>> {
    let (subject, shots) = &plan.groups[g];
    // The largest on-screen fluke is 60 % of the frame: a sprite a bit wider than that never
    // needs magnifying, and mip levels serve the smaller ones.
    let top = ((ctx.opts.width as f32 * 0.63).ceil() as usize).clamp(64, 4096);
    let sprite = subject.map(|who| {
        let shape = fluke::FlukeShape::new(&mut who.rng(ctx.opts.seed));
        fluke::build_sprite(&shape, top)
    });
    let mut rows = Vec::new();
    for &i in shots {
        let shot = &plan.shots[i];
        rows.extend(
            render_shot(ctx, shot, sprite.as_ref(), renderer)
                .with_context(|| format!("rendering {}", shot.file_name()))?,
        );
    }
    Ok(rows)
}

fn render_shot(ctx: &Ctx, shot: &Shot, sprite: Option<&fluke::Sprite>, renderer: &mut Renderer) -> Result<Vec<BoxRow>> {
    let mut rng = rng_for(ctx.opts.seed, DOMAIN_PHOTO, shot.index as u64);
    let name = shot.file_name();
    let path = ctx.photos_dir.join(&name);
    match shot.defect {
        Defect::Empty => {
            fs::write(&path, [])?;
            return Ok(Vec::new());
        }
        Defect::NotAnImage => {
            let id = shot.label.map(|w| w.id()).unwrap_or_default();
            let text = format!(
                "Survey log export, vessel track {:04}\nsighting,individual,notes\n{},{},\"fluke up, good light\"\n",
                rng.random_range(0..10_000u32),
                shot.index,
                id
            );
            fs::write(&path, text)?;
            return Ok(Vec::new());
        }
        _ => {}
    }
    let (mut w, mut h) = (ctx.opts.width as usize, ctx.opts.height as usize);
    if shot.defect == Defect::Tiny {
        // About 400 × 170 at the default size; proportionally smaller for small test lakes so
        // that "tiny" stays far below anything else in the lake (near-duplicates are ≥ 60 %).
        let tw = 400.min(w / 3);
        h = (tw * h + w / 2) / w;
        w = tw;
    }
    let req = Request {
        w,
        h,
        sprite: if shot.defect == Defect::NoSubject { None } else { sprite },
        heavy_blur: shot.defect == Defect::Blurred,
        exposure: match shot.defect {
            Defect::Overexposed => Exposure::Over,
            Defect::Underexposed => Exposure::Under,
            _ => Exposure::Normal,
        },
        want16: shot.defect == Defect::Png16,
    };
    let photo = renderer.render(&req, &mut rng);
    let quality: u8 = rng.random_range(88..=93);
    let bytes = match shot.defect {
        Defect::Png => encode::png8(photo.rgb8, w, h)?,
        Defect::Png16 => encode::png16(photo.rgb16.as_deref().context("16-bit render missing")?, w, h)?,
        Defect::Cmyk => encode::jpeg_cmyk(photo.rgb8, w, h, quality)?,
        Defect::Grayscale => encode::jpeg_gray(photo.rgb8, w, h, quality)?,
        Defect::ExifRotated => encode::jpeg_exif_rotated(photo.rgb8, w, h, quality)?,
        Defect::MotionPhoto => encode::jpeg_motion_photo(photo.rgb8, w, h, quality, 64 * 1024)?,
        Defect::Webp => encode::webp(photo.rgb8, w, h)?,
        Defect::Corrupt => {
            encode::corrupt_jpeg(encode::jpeg_rgb(photo.rgb8, w, h, quality)?, &mut || rng.random::<u8>())?
        }
        Defect::Truncated => {
            encode::truncate_jpeg(encode::jpeg_rgb(photo.rgb8, w, h, quality)?, uni(&mut rng, 0.37, 0.43))
        }
        _ => encode::jpeg_rgb(photo.rgb8, w, h, quality)?,
    };
    fs::write(&path, &bytes)?;

    let mut rows = Vec::new();
    let decodes = !matches!(shot.defect, Defect::Corrupt | Defect::Truncated);
    if let (Some(bb), true) = (photo.bbox, decodes) {
        rows.push((name, bb));
    }
    if let (Some(dup), Some((dup_name, _))) = (shot.dup, shot.dup_file_name()) {
        let dup_path = ctx.photos_dir.join(&dup_name);
        let dup_box = match dup {
            Dup::Copy => {
                fs::write(&dup_path, &bytes)?;
                photo.bbox
            }
            Dup::Requality => {
                let q: u8 = rng.random_range(65..=72);
                fs::write(&dup_path, encode::jpeg_rgb(photo.rgb8, w, h, q)?)?;
                photo.bbox
            }
            Dup::Resize => {
                let f = uni(&mut rng, 0.6, 0.8);
                let (nw, nh) = (((w as f32) * f).round() as u32, ((h as f32) * f).round() as u32);
                let img = image::RgbImage::from_raw(w as u32, h as u32, photo.rgb8.to_vec())
                    .context("render buffer does not match its size")?;
                let small = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
                fs::write(&dup_path, encode::jpeg_rgb(small.as_raw(), nw as usize, nh as usize, quality)?)?;
                let (sx, sy) = (nw as f32 / w as f32, nh as f32 / h as f32);
                photo.bbox.map(|b| {
                    [
                        (b[0] as f32 * sx).floor() as u32,
                        (b[1] as f32 * sy).floor() as u32,
                        ((b[2] as f32 * sx).ceil() as u32).min(nw),
                        ((b[3] as f32 * sy).ceil() as u32).min(nh),
                    ]
                })
            }
        };
        if let Some(bb) = dup_box {
            rows.push((dup_name, bb));
        }
    }
    Ok(rows)
}

/// Writes labels.csv, boxes.csv and ground_truth.csv; returns (files, defect files).
fn write_tables(out: &Path, plan: &Plan, boxes: &[BoxRow]) -> Result<(usize, usize)> {
    let mut truth: Vec<[String; 4]> = Vec::new();
    let mut labels: Vec<[String; 2]> = Vec::new();
    for s in &plan.shots {
        let name = s.file_name();
        truth.push([name.clone(), s.defect.name().into(), s.defect.expected().name().into(), s.truth.id()]);
        if let Some(l) = s.label {
            labels.push([name, l.id()]);
        }
        if let Some((dup_name, d)) = s.dup_file_name() {
            truth.push([dup_name.clone(), d.name().into(), d.expected().name().into(), s.truth.id()]);
            if let Some(l) = s.label {
                labels.push([dup_name, l.id()]);
            }
        }
    }
    truth.sort();
    labels.sort();
    // A survey's spreadsheet lists one photo twice (same individual): a repeated row, which
    // ingest counts and keeps once.
    if let Some(row) = labels.iter().find(|r| plan.shots.iter().any(|s| s.defect.expected() == Expected::Keep && s.file_name() == r[0])).cloned() {
        labels.push(row);
        labels.sort();
    }

    let mut w = csv::Writer::from_path(out.join("ground_truth.csv"))?;
    w.write_record(["photo", "defect", "expected", "individual_id"])?;
    for r in &truth {
        w.write_record(r)?;
    }
    w.flush()?;
    let mut w = csv::Writer::from_path(out.join("labels.csv"))?;
    w.write_record(["photo", "individual_id"])?;
    for r in &labels {
        w.write_record(r)?;
    }
    w.flush()?;
    let mut w = csv::Writer::from_path(out.join("boxes.csv"))?;
    w.write_record(["photo", "x0", "y0", "x1", "y1"])?;
    for (name, b) in boxes {
        w.write_record([name.clone(), b[0].to_string(), b[1].to_string(), b[2].to_string(), b[3].to_string()])?;
    }
    w.flush()?;
    let defects = truth.iter().filter(|r| r[1] != Defect::None.name()).count();
    Ok((truth.len(), defects))
}

fn readme(opts: &DemoOptions, plan: &Plan, photos: usize, defects: usize) -> String {
    let mut kinds = String::new();
    for d in Defect::PLANTED {
        let what = match d {
            Defect::Tiny => "a real fluke photo at about 400 × 170 pixels (a third of the width at most)",
            Defect::Blurred => "heavy gaussian blur, sigma = 1.2 % of the width, applied before sensor noise",
            Defect::Overexposed => "mean brightness above 0.88 with large clipped-white areas",
            Defect::Underexposed => "mean brightness below 0.08 with large clipped-black areas",
            Defect::NoSubject => "sea, sky and a dive splash but no fluke; still labelled with a regular individual",
            Defect::ExactDuplicate => "byte-identical copy of a clean photo, `<stem>_copy.jpg`, same label",
            Defect::NearDuplicate => {
                "the same render re-encoded at quality ~70 or resized to 60-80 %, `<stem>_dup.jpg`, same label"
            }
            Defect::Singleton => "the only photo of an `S###` individual",
            Defect::Unlabeled => "a clean photo of a regular individual with no row in labels.csv",
            Defect::Corrupt => "JPEG whose frame header and Huffman tables are overwritten (still starts with FF D8)",
            Defect::Truncated => {
                "JPEG cut at ~40 % of its length, no FF D9 end marker (lenient decoders such as zune-jpeg, behind the `image` crate, \
                 pad it without an error: check for the end marker)"
            }
            Defect::Empty => "zero-byte .jpg",
            Defect::NotAnImage => "a text file named .jpg",
            Defect::Png => "clean photo as 8-bit RGB PNG",
            Defect::Png16 => "clean photo as 16-bit RGB PNG",
            Defect::Cmyk => "clean photo as Adobe CMYK (4-component) JPEG",
            Defect::ExifRotated => {
                "clean photo stored rotated 90° counter-clockwise with EXIF Orientation = 6 (displays upright)"
            }
            Defect::Grayscale => "clean photo as 1-channel greyscale JPEG",
            Defect::MotionPhoto => {
                "clean photo as a phone's motion photo: the JPEG, then 64 KiB of video (an MP4 box) after its end marker"
            }
            Defect::Webp => "clean photo as lossless WebP, `.webp`",
            Defect::None => "",
        };
        kinds.push_str(&format!("| `{}` | {} | {} |\n", d.name(), d.expected().name(), what));
    }
    format!(
        "# Demo whale-fluke lake\n\n\
         Synthetic photo-ID survey generated by `pipeline demo-lake` (seed {seed}, {w} × {h} px, \
         {n} regular individuals × {per} photos, {ind} individual ids in total). {photos} files, \
         {defects} of them with a planted defect. The same options always produce byte-identical files.\n\n\
         ## Files\n\n\
         - `photos/` — `IMG_#####.jpg` (a few `.png`). Clean photos are numbered by individual; \
         defect photos continue the sequence in shuffled order, so names do not give defects away. \
         Duplicates are `<stem>_copy.jpg` / `<stem>_dup.jpg` and sort right after their original.\n\
         - `labels.csv` — `photo,individual_id`: the survey's labels (`W###` regular, `S###` singleton). \
         Unlabeled photos have no row; broken files are labelled, as they would be in a real spreadsheet.\n\
         - `boxes.csv` — `photo,x0,y0,x1,y1`: bounding box of the fluke (with the part of the tail \
         stock above water) in displayed pixel coordinates (after EXIF orientation), x1/y1 \
         exclusive, for every decodable photo that shows a fluke.\n\
         - `ground_truth.csv` — `photo,defect,expected,individual_id`: one row per file in `photos/`. \
         `keep`: the cleaned table must contain exactly these; `drop`: cleaning must remove it; \
         `reject`: cannot be decoded, ingest must record it as rejected. `individual_id` is the true \
         individual (the labelled one for files without a fluke).\n\n\
         Every regular individual keeps at least 3 clean photos, so dropping defects never creates a \
         new singleton.\n\n\
         ## Defects\n\n\
         | defect | expected | what |\n|---|---|---|\n{kinds}",
        seed = opts.seed,
        w = opts.width,
        h = opts.height,
        n = opts.individuals,
        per = opts.photos_per,
        ind = plan.individuals,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// A small lake in its own temp folder, removed when the test ends (pass or fail).
    struct TempLake(PathBuf);

    impl TempLake {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("demo-lake-{tag}-{}", std::process::id()));
            // A leftover from an earlier run that reused this pid is stale, not someone's data.
            let _ = fs::remove_dir_all(&dir);
            // A generator failure is the test failure; there is nothing to recover.
            generate(&small(dir.clone())).expect("generate small lake");
            Self(dir)
        }
    }

    impl Drop for TempLake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn small(out: PathBuf) -> DemoOptions {
        DemoOptions { out, individuals: 4, photos_per: 3, seed: 11, width: 600, height: 250 }
    }

    fn read_csv(path: &Path) -> Vec<Vec<String>> {
        let mut r = csv::Reader::from_path(path).expect("open csv");
        r.records().map(|rec| rec.expect("csv row").iter().map(str::to_owned).collect()).collect()
    }

    /// photo → (defect, expected, individual_id)
    fn truth(out: &Path) -> BTreeMap<String, (String, String, String)> {
        read_csv(&out.join("ground_truth.csv"))
            .into_iter()
            .map(|r| (r[0].clone(), (r[1].clone(), r[2].clone(), r[3].clone())))
            .collect()
    }

    fn boxes(out: &Path) -> BTreeMap<String, Vec<u32>> {
        read_csv(&out.join("boxes.csv"))
            .into_iter()
            .map(|r| (r[0].clone(), r[1..].iter().map(|v| v.parse().expect("box coordinate")).collect()))
            .collect()
    }

    fn photo_names(out: &Path) -> BTreeSet<String> {
        fs::read_dir(out.join("photos"))
            .expect("photos dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn same_seed_gives_identical_bytes() {
        let (a, b) = (TempLake::new("det-a"), TempLake::new("det-b"));
        let names = photo_names(&a.0);
        assert_eq!(names, photo_names(&b.0));
        for n in &names {
            let (fa, fb) = (
                fs::read(a.0.join("photos").join(n)).expect("read a"),
                fs::read(b.0.join("photos").join(n)).expect("read b"),
            );
            assert!(fa == fb, "{n} differs");
        }
        for f in ["labels.csv", "boxes.csv", "ground_truth.csv", "README.md"] {
            assert_eq!(fs::read(a.0.join(f)).expect("read a"), fs::read(b.0.join(f)).expect("read b"), "{f} differs");
        }
    }

    /// Generating costs about a second per small lake in an unoptimised build, so the read-only
    /// checks share one lake and report which check failed.
    #[test]
    fn small_lake_is_consistent() {
        let lake = TempLake::new("checks");
        every_defect_kind_is_planted_with_its_expectation(&lake.0);
        every_photo_file_has_one_ground_truth_row(&lake.0);
        labels_boxes_and_ground_truth_agree(&lake.0);
        files_decode_as_planted(&lake.0);
    }

    fn every_defect_kind_is_planted_with_its_expectation(lake: &Path) {
        let t = truth(lake);
        for d in Defect::PLANTED {
            let rows: Vec<_> = t.values().filter(|(name, _, _)| name == d.name()).collect();
            assert!(!rows.is_empty(), "no {} photo", d.name());
            assert!(rows.iter().all(|(_, exp, _)| exp == d.expected().name()), "wrong expectation for {}", d.name());
        }
    }

    fn every_photo_file_has_one_ground_truth_row(lake: &Path) {
        let rows = read_csv(&lake.join("ground_truth.csv"));
        let listed: BTreeSet<String> = rows.iter().map(|r| r[0].clone()).collect();
        assert_eq!(listed.len(), rows.len(), "duplicate ground-truth rows");
        assert_eq!(photo_names(lake), listed, "photos/ and ground_truth.csv list different files");
    }

    fn labels_boxes_and_ground_truth_agree(lake: &Path) {
        let t = truth(lake);
        let rows = read_csv(&lake.join("labels.csv"));
        let distinct: BTreeSet<&Vec<String>> = rows.iter().collect();
        assert_eq!(rows.len(), distinct.len() + 1, "labels.csv repeats exactly one row");
        let labels: BTreeMap<String, String> =
            read_csv(&lake.join("labels.csv")).into_iter().map(|r| (r[0].clone(), r[1].clone())).collect();
        let boxes = boxes(lake);
        assert!(labels.keys().all(|p| t.contains_key(p)), "label for a file that does not exist");
        assert!(boxes.keys().all(|p| t.contains_key(p)), "box for a file that does not exist");
        for (photo, (defect, _, id)) in &t {
            match labels.get(photo) {
                Some(l) => assert_eq!(l, id, "{photo}"),
                None => assert_eq!(defect, "unlabeled", "{photo} has no label"),
            }
            let has_fluke =
                !matches!(defect.as_str(), "no_subject" | "corrupt" | "truncated" | "empty" | "not_an_image");
            assert_eq!(boxes.contains_key(photo), has_fluke, "{photo} ({defect}) box presence");
        }
        // Regular individuals keep at least 3 photos after cleaning; singletons have exactly one.
        let mut keep: BTreeMap<&str, usize> = BTreeMap::new();
        let mut all: BTreeMap<&str, usize> = BTreeMap::new();
        for (defect, exp, id) in t.values() {
            *all.entry(id).or_default() += 1;
            if exp == "keep" {
                *keep.entry(id).or_default() += 1;
            }
            assert_eq!(defect == "singleton", id.starts_with('S'), "{id} / {defect}");
        }
        for (id, n) in &all {
            if id.starts_with('W') {
                assert!(keep.get(id).copied().unwrap_or(0) >= 3, "{id} keeps fewer than 3");
            } else {
                assert_eq!(*n, 1, "{id}");
            }
        }
    }

    fn files_decode_as_planted(lake: &Path) {
        use image::ImageDecoder;
        let boxes = boxes(lake);
        for (photo, (defect, _, _)) in truth(lake) {
            let bytes = fs::read(lake.join("photos").join(&photo)).expect("read photo");
            let decoded = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .ok()
                .and_then(|r| r.decode().ok());
            match defect.as_str() {
                "corrupt" => assert!(decoded.is_none() && bytes.starts_with(&[0xFF, 0xD8]), "{photo} ({defect})"),
                "empty" | "not_an_image" => assert!(decoded.is_none(), "{photo} ({defect}) decodes"),
                // Lenient decoders pad truncated scans, so the contract is the missing end marker.
                "truncated" => {
                    assert!(bytes.starts_with(&[0xFF, 0xD8]) && !bytes.windows(2).any(|w| w == [0xFF, 0xD9]), "{photo}")
                }
                _ => {
                    let img = decoded.unwrap_or_else(|| panic!("{photo} ({defect}) does not decode"));
                    let (w, h) = if defect == "exif_rotated" {
                        let mut dec =
                            image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(&bytes)).expect("jpeg header");
                        assert_eq!(
                            dec.orientation().expect("orientation"),
                            image::metadata::Orientation::Rotate90,
                            "{photo}"
                        );
                        (img.height(), img.width())
                    } else {
                        (img.width(), img.height())
                    };
                    let color = img.color();
                    match defect.as_str() {
                        "png16" => assert_eq!(color, image::ColorType::Rgb16, "{photo}"),
                        "grayscale" => assert_eq!(color, image::ColorType::L8, "{photo}"),
                        "cmyk" => assert!(bytes.windows(5).any(|w| w == b"Adobe"), "{photo} has no Adobe marker"),
                        _ => assert_eq!(color, image::ColorType::Rgb8, "{photo}"),
                    }
                    match defect.as_str() {
                        "tiny" => assert!(w <= 200 && h < 100, "{photo} is {w}x{h}"),
                        "near_duplicate" => assert!((360..=600).contains(&w), "{photo} is {w}x{h}"),
                        _ => assert_eq!((w, h), (600, 250), "{photo}"),
                    }
                    if let Some(b) = boxes.get(&photo) {
                        assert!(b[0] < b[2] && b[1] < b[3] && b[2] <= w && b[3] <= h, "{photo} box {b:?} in {w}x{h}");
                    }
                    let rgb = img.to_rgb8();
                    let mean =
                        rgb.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / rgb.as_raw().len() as f64 / 255.0;
                    match defect.as_str() {
                        "overexposed" => assert!(mean > 0.88, "{photo} mean {mean}"),
                        "underexposed" => assert!(mean < 0.08, "{photo} mean {mean}"),
                        _ => assert!((0.15..0.8).contains(&mean), "{photo} ({defect}) mean {mean}"),
                    }
                }
            }
            match defect.as_str() {
                "exact_duplicate" => {
                    let orig = photo.replace("_copy", "");
                    assert_eq!(bytes, fs::read(lake.join("photos").join(orig)).expect("original"), "{photo}");
                }
                "png" | "png16" => assert!(photo.ends_with(".png") && bytes.starts_with(b"\x89PNG"), "{photo}"),
                _ => {}
            }
        }
    }
}
