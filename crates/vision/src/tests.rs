//! Fast unit tests on synthetic images made in memory.

use image::codecs::png::PngEncoder;
use image::codecs::tiff::TiffEncoder;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage, imageops};

use super::*;

/// Deterministic xorshift64* with Box–Muller normals; tests need repeatable noise, not a crate.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(1e-12);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

fn jpeg_with(
    data: &[u8],
    w: u32,
    h: u32,
    color: jpeg_encoder::ColorType,
    app1: Option<Vec<u8>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 90);
    if let Some(segment) = app1 {
        encoder
            .add_app_segment(1, segment)
            .expect("APP1 segment fits");
    }
    encoder
        .encode(data, w as u16, h as u16, color)
        .expect("encode test JPEG");
    out
}

fn jpeg(img: &RgbImage) -> Vec<u8> {
    jpeg_with(
        img.as_raw(),
        img.width(),
        img.height(),
        jpeg_encoder::ColorType::Rgb,
        None,
    )
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encode test PNG");
    out
}

fn tiff(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    TiffEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .expect("encode test TIFF");
    out.into_inner()
}

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

/// A smooth "photo": a few soft blobs and a gradient, parameterised so two seeds look unrelated.
fn scene(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let blobs: Vec<(f64, f64, f64, f64)> = (0..6)
        .map(|_| {
            (
                rng.next_f64(),
                rng.next_f64(),
                0.05 + 0.15 * rng.next_f64(),
                rng.next_f64() * 2.0 - 1.0,
            )
        })
        .collect();
    let tilt = rng.next_f64() * 2.0 - 1.0;
    RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (f64::from(x) / f64::from(w), f64::from(y) / f64::from(h));
        let mut l = 128.0 + 50.0 * tilt * (u - v);
        for &(cx, cy, r, a) in &blobs {
            let d2 = (u - cx).powi(2) + (v - cy).powi(2);
            l += 90.0 * a * (-d2 / (2.0 * r * r)).exp();
        }
        let l = l.clamp(0.0, 255.0) as u8;
        Rgb([l, l.saturating_add(10), l.saturating_sub(10)])
    })
}

fn grey(w: u32, h: u32, mut f: impl FnMut(u32, u32) -> f64) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let v = f(x, y).round().clamp(0.0, 255.0) as u8;
        Rgb([v, v, v])
    })
}

/// Minimal big-endian EXIF block with one IFD0 entry: Orientation (0x0112), SHORT, 1, value.
fn exif_app1(orientation: u16) -> Vec<u8> {
    let mut seg = b"Exif\0\0".to_vec();
    seg.extend_from_slice(b"MM\0*");
    seg.extend_from_slice(&8u32.to_be_bytes()); // IFD0 right after the header
    seg.extend_from_slice(&1u16.to_be_bytes()); // one entry
    seg.extend_from_slice(&0x0112u16.to_be_bytes());
    seg.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    seg.extend_from_slice(&1u32.to_be_bytes()); // count
    seg.extend_from_slice(&orientation.to_be_bytes());
    seg.extend_from_slice(&[0, 0]); // value field padding
    seg.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    seg
}

#[test]
fn sniff_recognises_formats_by_magic() {
    let img = scene(16, 16, 1);
    assert_eq!(sniff(&jpeg(&img)), Ok(ImageFormat::Jpeg));
    assert_eq!(sniff(&png(&img)), Ok(ImageFormat::Png));
    assert_eq!(sniff(&tiff(&img)), Ok(ImageFormat::Tiff));
    assert_eq!(sniff(b"MM\0*\0\0\0\x08"), Ok(ImageFormat::Tiff));
    assert_eq!(sniff(b""), Err(VisionError::Empty));
    assert_eq!(
        sniff(b"hello, world"),
        Err(VisionError::UnknownFormat {
            magic: "68656c6c6f2c2077".to_owned()
        })
    );
    assert_eq!(
        [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Tiff, ImageFormat::Webp, ImageFormat::Gif, ImageFormat::Bmp].map(|f| f.to_string()),
        ["jpeg", "png", "tiff", "webp", "gif", "bmp"]
    );
    assert!(VisionError::Empty.to_string().contains("empty"));
}

#[test]
fn jpeg_decodes_to_fit_and_square() {
    let img = scene(800, 600, 2);
    let bytes = jpeg(&img);
    let p = probe(&bytes, &limits()).expect("probe");
    assert_eq!(
        p,
        Probe {
            format: ImageFormat::Jpeg,
            width: 800,
            height: 600,
            orientation: 1,
            color: "rgb8".into()
        }
    );
    let (_, small) = decode_rgb(&bytes, &limits(), (200, 200)).expect("decode");
    assert_eq!(small.dimensions(), (200, 150));
    // Odd target: not an exact IDCT scale, so scaled decode + resize.
    let (_, odd) = decode_rgb(&bytes, &limits(), (333, 1000)).expect("decode");
    assert_eq!(odd.dimensions(), (333, 250));
    // Never enlarged.
    let (_, same) = decode_rgb(&bytes, &limits(), (5000, 5000)).expect("decode");
    assert_eq!(same.dimensions(), (800, 600));
    let square = decode_square(&bytes, &limits(), 96).expect("decode");
    assert_eq!(square.dimensions(), (96, 96));
    // The scaled decode must still be the same picture: compare with a plain full-size resize.
    let reference = imageops::resize(&img, 200, 150, imageops::FilterType::Triangle);
    let mean_abs: f64 = small
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
        .sum::<f64>()
        / small.as_raw().len() as f64;
    assert!(
        mean_abs < 4.0,
        "scaled decode differs from reference by {mean_abs}"
    );
}

#[test]
fn progressive_jpeg_decodes_through_the_scaled_path() {
    let img = scene(640, 480, 6);
    let mut bytes = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 85);
    encoder.set_progressive(true);
    encoder
        .encode(img.as_raw(), 640, 480, jpeg_encoder::ColorType::Rgb)
        .expect("encode");
    let (_, small) = decode_rgb(&bytes, &limits(), (100, 100)).expect("progressive decode");
    assert_eq!(small.dimensions(), (100, 75));
    let baseline = decode_rgb(&jpeg(&img), &limits(), (100, 100))
        .expect("baseline")
        .1;
    let max_diff = small
        .as_raw()
        .iter()
        .zip(baseline.as_raw())
        .map(|(&a, &b)| a.abs_diff(b))
        .max();
    assert!(
        max_diff < Some(24),
        "progressive and baseline differ by {max_diff:?}"
    );
}

#[test]
fn grey_jpeg_tiff_and_16bit_png_decode() {
    let img = scene(120, 80, 3);
    let luma: Vec<u8> = img.pixels().map(|p| p[0]).collect();
    let grey_jpeg = jpeg_with(&luma, 120, 80, jpeg_encoder::ColorType::Luma, None);
    let (p, rgb) = decode_rgb(&grey_jpeg, &limits(), (60, 60)).expect("grey JPEG");
    assert_eq!((p.color.as_str(), rgb.dimensions()), ("l8", (60, 40)));
    assert!(rgb.pixels().all(|px| px[0] == px[1] && px[1] == px[2]));

    let t = tiff(&img);
    let a = analyze(&t, &limits()).expect("TIFF");
    assert_eq!(
        (a.probe.format, a.probe.color.as_str(), a.probe.width),
        (ImageFormat::Tiff, "rgb8", 120)
    );

    let wide: Vec<u8> = img
        .as_raw()
        .iter()
        .flat_map(|&v| (u16::from(v) * 257).to_be_bytes())
        .collect();
    let mut png16 = Vec::new();
    PngEncoder::new(&mut png16)
        .write_image(&wide, 120, 80, ExtendedColorType::Rgb16)
        .expect("encode");
    let (p, rgb) = decode_rgb(&png16, &limits(), (120, 80)).expect("16-bit PNG");
    assert_eq!(p.color, "rgb16");
    assert_eq!(rgb.get_pixel(10, 10), img.get_pixel(10, 10));
}

#[test]
fn exif_orientation_6_swaps_width_and_height() {
    // Stored 64x32: left half red, right half blue. Rotating 90° clockwise puts red on top.
    let stored = RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let bytes = jpeg_with(
        stored.as_raw(),
        64,
        32,
        jpeg_encoder::ColorType::Rgb,
        Some(exif_app1(6)),
    );
    let p = probe(&bytes, &limits()).expect("probe");
    assert_eq!((p.width, p.height, p.orientation), (32, 64, 6));
    let (_, up) = decode_rgb(&bytes, &limits(), (1000, 1000)).expect("decode");
    assert_eq!(up.dimensions(), (32, 64));
    assert!(
        up.get_pixel(16, 8)[0] > 200 && up.get_pixel(16, 8)[2] < 60,
        "top should be red"
    );
    assert!(
        up.get_pixel(16, 56)[2] > 200 && up.get_pixel(16, 56)[0] < 60,
        "bottom should be blue"
    );
    // Fit applies to the displayed shape.
    let (_, fit) = decode_rgb(&bytes, &limits(), (16, 16)).expect("decode");
    assert_eq!(fit.dimensions(), (8, 16));
    // A bogus orientation value is ignored rather than failing the photo.
    let bogus = jpeg_with(
        stored.as_raw(),
        64,
        32,
        jpeg_encoder::ColorType::Rgb,
        Some(exif_app1(9)),
    );
    assert_eq!(probe(&bogus, &limits()).expect("probe").orientation, 1);
}

#[test]
fn truncated_files_are_reported() {
    let img = scene(64, 64, 4);
    let bytes = jpeg(&img);
    assert_eq!(
        probe(&bytes[..bytes.len() / 2], &limits()),
        Err(VisionError::Truncated)
    );
    assert_eq!(
        analyze(&bytes[..bytes.len() - 1], &limits()).unwrap_err(),
        VisionError::Truncated
    );
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0; 100]);
    assert!(
        analyze(&padded, &limits()).is_ok(),
        "zero padding after EOI is fine"
    );

    let p = png(&img);
    assert_eq!(
        probe(&p[..p.len() - 12], &limits()),
        Err(VisionError::Truncated)
    );
    assert_eq!(
        probe(&p[..p.len() / 2], &limits()),
        Err(VisionError::Truncated)
    );
}

#[test]
fn corrupt_header_is_a_decode_error() {
    let bytes = [0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x03, 0x08, 0xFF, 0xD9];
    match probe(&bytes, &limits()) {
        Err(VisionError::Decode(msg)) => assert!(msg.contains("JPEG"), "{msg}"),
        other => panic!("expected Decode, got {other:?}"),
    }
}

/// Bitwise CRC-32 (the PNG/zlib polynomial), enough to forge a few chunks in a test.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Signature, IHDR (8-bit RGB of the given size), one tiny IDAT and IEND, all with valid CRCs.
fn png_with_header(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

#[test]
fn bomb_guard_rejects_before_decoding() {
    let mut bytes = jpeg(&scene(64, 64, 5));
    // Claim 20000x20000 in the frame header; the entropy data no longer matches, which does not
    // matter because nothing past the header may be touched.
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0");
    bytes[sof + 5..sof + 9].copy_from_slice(&[0x4E, 0x20, 0x4E, 0x20]);
    let err = analyze(&bytes, &limits()).unwrap_err();
    assert_eq!(
        err,
        VisionError::TooManyPixels {
            width: 20000,
            height: 20000,
            limit: 120_000_000
        }
    );
    assert!(err.to_string().contains("400000000"), "{err}");

    // A PNG header promising 100000x100000 RGB (30 GB) in a few dozen bytes.
    let bomb = png_with_header(100_000, 100_000);
    assert_eq!(
        analyze(&bomb, &limits()).unwrap_err(),
        VisionError::TooManyPixels {
            width: 100_000,
            height: 100_000,
            limit: 120_000_000
        }
    );

    let small = DecodeLimits { max_pixels: 1000 };
    let p = png(&scene(64, 64, 5));
    assert_eq!(
        decode_square(&p, &small, 32).unwrap_err(),
        VisionError::TooManyPixels {
            width: 64,
            height: 64,
            limit: 1000
        }
    );
    assert!(matches!(
        probe(&tiff(&scene(64, 64, 5)), &small),
        Err(VisionError::TooManyPixels { .. })
    ));
}

#[test]
fn blur_lowers_sharpness() {
    let mut rng = Rng(7);
    // 4 px checkerboard with a little grain.
    let texture = grey(256, 256, |x, y| {
        let base = if (x / 4 + y / 4) % 2 == 0 {
            60.0
        } else {
            190.0
        };
        base + 5.0 * rng.normal()
    });
    let blurred = imageops::blur(&texture, 3.0);
    let sharp = analyze(&png(&texture), &limits()).expect("sharp").quality;
    let soft = analyze(&png(&blurred), &limits()).expect("blurred").quality;
    assert!(
        sharp.sharpness > 10.0 * soft.sharpness,
        "{} vs {}",
        sharp.sharpness,
        soft.sharpness
    );
}

#[test]
fn flat_image_has_no_sharpness_or_noise() {
    let q = analyze(&png(&grey(200, 150, |_, _| 128.0)), &limits())
        .expect("flat")
        .quality;
    assert!(
        q.sharpness < 1e-6 && q.noise < 1e-6 && q.contrast < 1e-6,
        "{q:?}"
    );
    assert!((q.brightness - 128.0 / 255.0).abs() < 1e-3);
    assert_eq!(
        (q.clipped_dark, q.clipped_bright, q.subject_fraction),
        (0.0, 0.0, 0.0)
    );

    let black = analyze(&png(&grey(50, 50, |_, _| 0.0)), &limits())
        .expect("black")
        .quality;
    assert_eq!((black.clipped_dark, black.clipped_bright), (1.0, 0.0));
}

#[test]
fn noise_estimate_tracks_gaussian_sigma() {
    let mut rng = Rng(11);
    // Same noise on all channels, so luma noise is sigma 10 too; a gentle ramp keeps it honest
    // about cancelling structure.
    let img = grey(300, 300, |x, _| {
        100.0 + f64::from(x) * 0.1 + 10.0 * rng.normal()
    });
    let q = analyze(&png(&img), &limits()).expect("noisy").quality;
    assert!(
        (7.0..=13.0).contains(&q.noise),
        "noise estimate {}",
        q.noise
    );
}

#[test]
fn phash_survives_reencoding_and_resizing_but_separates_scenes() {
    let a = scene(640, 480, 21);
    let b = scene(640, 480, 22);
    let hash = |bytes: &[u8]| analyze(bytes, &limits()).expect("analyze").phash;
    let original = hash(&png(&a));
    let small = imageops::resize(&a, 320, 240, imageops::FilterType::Triangle);
    let mut low_quality = Vec::new();
    jpeg_encoder::Encoder::new(&mut low_quality, 60)
        .encode(small.as_raw(), 320, 240, jpeg_encoder::ColorType::Rgb)
        .expect("encode");
    assert!(hamming(original, hash(&jpeg(&a))) <= 4);
    assert!(hamming(original, hash(&low_quality)) <= 4);
    let other = hash(&jpeg(&b));
    assert!(
        hamming(original, other) >= 16,
        "unrelated scenes differ by only {}",
        hamming(original, other)
    );
    assert_eq!(hamming(0, u64::MAX), 64);
}

#[test]
fn subject_fraction_finds_a_dark_blob_not_waves() {
    let mut rng = Rng(5);
    // Sky fading into sea, mild sensor noise, and a few bright 4x4 splashes.
    let splashes: Vec<(u32, u32)> = (0..12)
        .map(|i| (17 + i * 19 % 220, 20 + i * 37 % 150))
        .collect();
    let background = |x: u32, y: u32, rng: &mut Rng| {
        let splash = splashes
            .iter()
            .any(|&(sx, sy)| x.abs_diff(sx) < 2 && y.abs_diff(sy) < 2);
        if splash {
            250.0
        } else {
            190.0 - f64::from(y) * 0.55 + 3.0 * rng.normal()
        }
    };
    let empty = grey(256, 192, |x, y| background(x, y, &mut rng));
    let whale = grey(256, 192, |x, y| {
        let (dx, dy) = ((f64::from(x) - 128.0) / 55.0, (f64::from(y) - 100.0) / 50.0);
        if dx * dx + dy * dy < 1.0 {
            25.0
        } else {
            background(x, y, &mut rng)
        }
    });
    let with = analyze(&png(&whale), &limits())
        .expect("whale")
        .quality
        .subject_fraction;
    let without = analyze(&png(&empty), &limits())
        .expect("sea")
        .quality
        .subject_fraction;
    assert!(with > 0.12, "blob fraction {with}");
    assert!(without < 0.02, "background fraction {without}");
}

/// Ink amounts (0 = none) -> JPEG via jpeg-encoder, which writes Adobe-style inverted CMYK.
fn cmyk_test_image() -> Vec<u8> {
    let mut ink = Vec::new();
    for _y in 0..32 {
        for x in 0..64 {
            // Left: pure cyan ink -> RGB(0,255,255). Right: 50% black -> mid grey.
            ink.extend_from_slice(if x < 32 {
                &[255, 0, 0, 0]
            } else {
                &[0, 0, 0, 128]
            });
        }
    }
    ink
}

fn assert_cmyk_colours(bytes: &[u8]) {
    let (p, rgb) = decode_rgb(bytes, &limits(), (64, 32)).expect("CMYK decode");
    assert_eq!(p.color, "cmyk8");
    let close =
        |px: &Rgb<u8>, want: [u8; 3]| px.0.iter().zip(want).all(|(&a, b)| a.abs_diff(b) <= 12);
    assert!(
        close(rgb.get_pixel(8, 16), [0, 255, 255]),
        "cyan came out {:?}",
        rgb.get_pixel(8, 16)
    );
    assert!(
        close(rgb.get_pixel(56, 16), [127, 127, 127]),
        "grey came out {:?}",
        rgb.get_pixel(56, 16)
    );
}

#[test]
fn cmyk_jpegs_keep_their_colours() {
    let ink = cmyk_test_image();
    // Adobe CMYK (transform 0, inverted samples).
    assert_cmyk_colours(&jpeg_with(
        &ink,
        64,
        32,
        jpeg_encoder::ColorType::Cmyk,
        None,
    ));
    // Adobe YCCK (transform 2).
    assert_cmyk_colours(&jpeg_with(
        &ink,
        64,
        32,
        jpeg_encoder::ColorType::CmykAsYcck,
        None,
    ));
    // Plain CMYK without the Adobe segment stores ink as-is: encode pre-inverted input (the
    // encoder inverts it back) and drop the APP14 segment.
    let inverted: Vec<u8> = ink.iter().map(|&v| 255 - v).collect();
    let mut plain = jpeg_with(&inverted, 64, 32, jpeg_encoder::ColorType::Cmyk, None);
    let app14 = plain
        .windows(2)
        .position(|w| w == [0xFF, 0xEE])
        .expect("Adobe segment");
    let len = usize::from(u16::from_be_bytes([plain[app14 + 2], plain[app14 + 3]]));
    plain.drain(app14..app14 + 2 + len);
    assert_cmyk_colours(&plain);
}

#[test]
fn crop_square_cuts_the_box_out_of_the_displayed_frame() {
    // Four quadrants of a 1200x500 photo: the crop of the lower right one is all blue.
    let img = RgbImage::from_fn(1200, 500, |x, y| match (x < 600, y < 250) {
        (true, true) => Rgb([250, 10, 10]),
        (false, true) => Rgb([10, 250, 10]),
        (true, false) => Rgb([250, 250, 10]),
        (false, false) => Rgb([10, 10, 250]),
    });
    let bytes = png(&img);
    let out = decode_crop_square(&bytes, &limits(), 32, [0.55, 0.55, 0.95, 0.95]).expect("crop");
    assert_eq!(out.dimensions(), (32, 32));
    assert!(out.pixels().all(|p| p[2] > 200 && p[0] < 60 && p[1] < 60), "only the blue quadrant");
    let out = decode_crop_square(&jpeg(&img), &limits(), 16, [0.05, 0.05, 0.45, 0.45]).expect("crop");
    assert!(out.pixels().all(|p| p[0] > 200 && p[1] < 60), "only the red quadrant");
    // A box past the frame is clamped, an inverted one is put right.
    let out = decode_crop_square(&bytes, &limits(), 8, [1.5, 1.2, 0.6, 0.6]).expect("clamped");
    assert!(out.pixels().all(|p| p[2] > 200));
}

#[test]
fn crop_square_cuts_the_displayed_box_under_every_exif_orientation() {
    // The crop is cut in the stored frame (no full-frame rotation); it must be the box of the
    // upright picture all the same: the same crop of the upright pixels saved without EXIF.
    let stored = scene(120, 80, 9);
    let boxes = [[0.1, 0.2, 0.6, 0.9], [0.45, 0.0, 1.0, 0.35]];
    for o in 1..=8u16 {
        let bytes = jpeg_with(stored.as_raw(), 120, 80, jpeg_encoder::ColorType::Rgb, Some(exif_app1(o)));
        let (_, upright) = decode_rgb(&bytes, &limits(), (1000, 1000)).expect("decode");
        let plain = png(&upright);
        for b in boxes {
            // 96 > every box side in pixels: the JPEG is decoded at full size, like the PNG.
            let got = decode_crop_square(&bytes, &limits(), 96, b).expect("crop");
            let want = decode_crop_square(&plain, &limits(), 96, b).expect("crop of the upright copy");
            let worst = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(worst <= 2, "orientation {o}, box {b:?}: pixels differ by up to {worst}");
        }
    }
}

#[test]
fn a_photo_decoded_once_answers_as_the_separate_decodes_do() {
    // The upload path: the detector's square of the whole photo, then the crop of its subject,
    // from one decode of a PNG (kept at full size) and from scaled decodes of a JPEG.
    let img = scene(900, 400, 5);
    for (what, bytes) in [("png", png(&img)), ("jpeg", jpeg(&img)), ("tiff", tiff(&img))] {
        let b = [0.2, 0.1, 0.7, 0.8];
        let mut once = Decoded::new(&bytes, limits());
        assert_eq!(once.square(48).unwrap(), decode_square(&bytes, &limits(), 48).unwrap(), "{what}");
        assert_eq!(once.crop_square(32, b).unwrap(), decode_crop_square(&bytes, &limits(), 32, b).unwrap(), "{what}");
        assert_eq!(once.square(900).unwrap(), decode_square(&bytes, &limits(), 900).unwrap(), "{what}: at full size too");
        // Back to a small size and a crop after the full-size decode: still the separate answers.
        assert_eq!(once.square(48).unwrap(), decode_square(&bytes, &limits(), 48).unwrap(), "{what}: small again");
        assert_eq!(once.crop_square(200, b).unwrap(), decode_crop_square(&bytes, &limits(), 200, b).unwrap(), "{what}: crop after");
    }
    // Over the limit before anything is decoded.
    let small = DecodeLimits { max_pixels: 1000 };
    assert!(matches!(Decoded::new(&png(&img), small).square(8), Err(VisionError::TooManyPixels { .. })));
}

#[test]
fn boxes_are_clamped_and_expanded() {
    assert_eq!(clamp_box([-0.2, 0.1, 1.4, 0.9]), [0.0, 0.1, 1.0, 0.9]);
    assert_eq!(clamp_box([0.8, 0.9, 0.2, 0.1]), [0.2, 0.1, 0.8, 0.9]);
    let tiny = clamp_box([0.5, 0.5, 0.5, 0.5]);
    assert!((tiny[2] - tiny[0] - 0.01).abs() < 1e-6 && (tiny[3] - tiny[1] - 0.01).abs() < 1e-6);
    let e = expand_box([0.2, 0.4, 0.6, 0.6], 0.25);
    for (a, b) in e.iter().zip([0.1, 0.35, 0.7, 0.65]) {
        assert!((a - b).abs() < 1e-6, "{e:?}");
    }
    assert_eq!(expand_box([0.0, 0.0, 1.0, 1.0], 0.5), [0.0, 0.0, 1.0, 1.0]);
}

fn encode_with(img: &RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img.clone()).write_to(&mut out, format).expect("encode test image");
    out.into_inner()
}

/// Mean absolute difference of two same-sized images, per channel value.
fn mean_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs()).sum::<f64>() / a.as_raw().len() as f64
}

#[test]
fn webp_gif_and_bmp_decode_like_the_png_of_the_same_picture() {
    let img = scene(120, 80, 11);
    let reference = decode_square(&png(&img), &limits(), 64).expect("png");
    for (format, name, tolerance) in [
        (image::ImageFormat::WebP, "webp", 0.5), // lossless
        (image::ImageFormat::Bmp, "bmp", 0.5),
        (image::ImageFormat::Gif, "gif", 12.0), // 256 colours
    ] {
        let bytes = encode_with(&img, format);
        let p = probe(&bytes, &limits()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((p.format.to_string().as_str(), p.width, p.height), (name, 120, 80));
        let a = analyze(&bytes, &limits()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(a.probe.format.to_string(), name);
        let got = decode_square(&bytes, &limits(), 64).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = mean_diff(&got, &reference);
        assert!(d <= tolerance, "{name}: mean difference {d} from the PNG");
        // Cut short: truncated, not a decoder's puzzle.
        assert_eq!(probe(&bytes[..bytes.len() * 2 / 3], &limits()).unwrap_err(), VisionError::Truncated, "{name}");
    }
}

#[test]
fn a_jpeg_with_data_after_its_end_is_the_jpeg() {
    let img = scene(200, 100, 12);
    let plain = jpeg(&img);
    // A phone's motion photo: the picture, then a video in the same file; and a second JPEG
    // (an MPF depth map or preview) after the first.
    let mut motion = plain.clone();
    motion.extend_from_slice(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom");
    motion.extend(std::iter::repeat_n(0xFFu8, 300).chain((0..5000u32).map(|i| (i * 7 % 251) as u8)));
    let mut two = plain.clone();
    two.extend_from_slice(&jpeg(&scene(40, 40, 13)));
    for (bytes, what) in [(&motion, "motion photo"), (&two, "two JPEGs")] {
        let a = analyze(bytes, &limits()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(a, analyze(&plain, &limits()).unwrap(), "{what}");
        assert_eq!(decode_square(bytes, &limits(), 64).unwrap(), decode_square(&plain, &limits(), 64).unwrap(), "{what}");
    }
    // An EXIF thumbnail's own end marker inside APP1 does not end the photo.
    let thumb = jpeg(&scene(16, 16, 14));
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&thumb);
    let with_thumb = jpeg_with(img.as_raw(), 200, 100, jpeg_encoder::ColorType::Rgb, Some(app1));
    assert!(analyze(&with_thumb, &limits()).is_ok());
    assert_eq!(probe(&with_thumb[..with_thumb.len() - 40], &limits()).unwrap_err(), VisionError::Truncated);
}

#[test]
fn heic_and_avif_are_named_not_called_garbage() {
    let heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic\x00\x00\x00\x00";
    let err = sniff(heic).unwrap_err();
    assert_eq!(err, VisionError::Unsupported { format: "heic", what: "HEIF/HEIC (High Efficiency Image)" });
    assert!(err.to_string().starts_with("heic: "), "{err}");
    assert!(matches!(sniff(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00"), Err(VisionError::Unsupported { format: "avif", .. })));
    // An MP4 is still unknown.
    assert!(matches!(sniff(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00"), Err(VisionError::UnknownFormat { .. })));
    // "BM" alone is not a bitmap.
    assert!(matches!(sniff(b"BMW is a car, not a bitmap"), Err(VisionError::UnknownFormat { .. })));
}
