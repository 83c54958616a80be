//! Per-photo vision work done at ingest: format sniffing, header probing, fast scaled decoding,
//! image-quality metrics and a perceptual hash.
//!
//! Everything here is synchronous and CPU-bound; ingest runs it on a blocking thread pool, one
//! photo per call. Inputs are whole files in memory: the format is sniffed from magic bytes
//! (never from a file name) and every entry point first checks the file is complete and that the
//! header's pixel count is within [`DecodeLimits`], before any pixel buffer is allocated.
//!
//! JPEG is the hot path: photos are decoded with DCT scaling (1/2, 1/4 or 1/8 inside the IDCT),
//! so a 4-megapixel photo wanted at 480² never exists at full size, then finished with
//! `fast_image_resize`. 8-bit Huffman-coded grey and colour JPEGs (what cameras and phones
//! write) go through libjpeg-turbo (the `turbojpeg` crate, the system library); 12-bit,
//! lossless and CMYK JPEGs, and any file libjpeg-turbo rejects or warns about, through the
//! pure-Rust `jpeg-decoder`, whose errors name the fault. PNG, TIFF, WebP, GIF (its first frame) and BMP go through
//! the `image` crate at full size. HEIF/HEIC and AVIF are recognised and refused by name
//! ([`VisionError::Unsupported`]), not mistaken for garbage.

mod decode;
mod phash;
mod quality;

use std::fmt;

pub use image::RgbImage;
pub use phash::hamming;
pub use quality::Quality;

/// Container formats the pipeline accepts, sniffed from magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Tiff,
    Webp,
    Gif,
    Bmp,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Webp => "webp",
            ImageFormat::Gif => "gif",
            ImageFormat::Bmp => "bmp",
        })
    }
}

/// Guards against decompression bombs: a tiny file whose header promises billions of pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest `width * height` (from the header) that will be decoded.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 120 MP admits every current camera sensor and panorama-ish stitch, while capping the
        // full-size RGB buffer of a PNG/TIFF at ~360 MB.
        DecodeLimits {
            max_pixels: 120_000_000,
        }
    }
}

/// What the header says, without decoding pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub format: ImageFormat,
    /// Width as displayed, i.e. after applying the EXIF orientation.
    pub width: u32,
    /// Height as displayed, i.e. after applying the EXIF orientation.
    pub height: u32,
    /// EXIF orientation 1..=8; 1 when the file has none (or an unreadable one).
    pub orientation: u16,
    /// Stored colour model and depth, e.g. "rgb8", "l8", "cmyk8", "rgb16", "rgba8".
    pub color: String,
}

/// Everything ingest records for one photo.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub probe: Probe,
    pub quality: Quality,
    pub phash: u64,
}

/// Why a photo could not be used; the messages are shown to people triaging ingest failures.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum VisionError {
    #[error("empty image file: zero bytes")]
    Empty,
    /// `magic` holds the first (up to 8) bytes in hex.
    #[error("unrecognised image format (first bytes {magic}); expected JPEG, PNG, TIFF, WebP, GIF or BMP")]
    UnknownFormat { magic: String },
    /// A format recognised by its magic bytes that this build does not decode.
    #[error("{format}: a {what} file, which is not decoded; convert it to JPEG or PNG")]
    Unsupported { format: &'static str, what: &'static str },
    #[error("truncated image: the file ends before its image data does (no JPEG end marker, PNG IEND chunk, GIF trailer, or fewer bytes than the header says)")]
    Truncated,
    #[error(
        "image is {width}x{height} = {} pixels, over the decode limit of {limit} \
         (possible decompression bomb)",
        u64::from(*width) * u64::from(*height)
    )]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    /// Corrupt or unsupported data, with the decoder's own message.
    #[error("cannot decode image: {0}")]
    Decode(String),
}

/// Size the metrics and the perceptual hash are computed at: the upright image is shrunk to fit
/// in this box (never enlarged), so a 24 MP and a 4 MP shot of the same scene score alike.
pub const ANALYSIS_SIDE: u32 = 512;

/// What decodes photos in this process, as far as it changes their pixels (libjpeg-turbo or
/// `jpeg-decoder` for JPEGs, `PIPELINE_JPEG_DECODER`): a cache of decoded pixels (the lake's
/// crop cache) keys on it, so pixels of one decoder are never served where another would run.
pub fn pixels_version() -> &'static str {
    decode::jpeg_pixels_version()
}

/// Identifies the container from its magic bytes.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, VisionError> {
    if bytes.is_empty() {
        return Err(VisionError::Empty);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(ImageFormat::Png);
    }
    // Classic TIFF (42) and BigTIFF (43), both byte orders.
    if bytes.starts_with(b"II*\0")
        || bytes.starts_with(b"MM\0*")
        || bytes.starts_with(b"II+\0")
        || bytes.starts_with(b"MM\0+")
    {
        return Ok(ImageFormat::Tiff);
    }
    if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
        return Ok(ImageFormat::Webp);
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Ok(ImageFormat::Gif);
    }
    // "BM" alone is too weak a magic: the info header's size must be one of the known ones.
    if bytes.len() >= 18 && bytes.starts_with(b"BM") {
        let info = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
        if matches!(info, 12 | 16 | 40 | 52 | 56 | 64 | 108 | 124) {
            return Ok(ImageFormat::Bmp);
        }
    }
    // ISO base media files (HEIF/HEIC from phones, AVIF): an `ftyp` box with the brand.
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        match &bytes[8..12] {
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"hevm" | b"hevs" | b"mif1" | b"msf1" => {
                return Err(VisionError::Unsupported { format: "heic", what: "HEIF/HEIC (High Efficiency Image)" });
            }
            b"avif" | b"avis" => return Err(VisionError::Unsupported { format: "avif", what: "AVIF" }),
            _ => {}
        }
    }
    let magic = bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    Err(VisionError::UnknownFormat { magic })
}

/// Reads the header only: format, displayed size, orientation and colour model.
///
/// `bytes` must be the whole file: a missing JPEG/PNG end marker is reported as
/// [`VisionError::Truncated`] here already, so a probe that succeeds means the file is complete.
pub fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<Probe, VisionError> {
    decode::open(bytes, limits).map(|source| source.probe())
}

/// Probe, decode at [`ANALYSIS_SIDE`], quality metrics and perceptual hash, in one pass.
pub fn analyze(bytes: &[u8], limits: &DecodeLimits) -> Result<Analysis, VisionError> {
    let (probe, rgb) = decode_rgb(bytes, limits, (ANALYSIS_SIDE, ANALYSIS_SIDE))?;
    let luma = quality::Luma::from_rgb(&rgb);
    let quality = Quality::measure(&luma)?;
    let phash = phash::phash(&luma)?;
    Ok(Analysis {
        probe,
        quality,
        phash,
    })
}

/// Decodes upright (EXIF orientation applied) and shrinks to fit inside `fit` keeping the aspect
/// ratio; never enlarges. A zero in `fit` is treated as 1.
pub fn decode_rgb(
    bytes: &[u8],
    limits: &DecodeLimits,
    fit: (u32, u32),
) -> Result<(Probe, RgbImage), VisionError> {
    let source = decode::open(bytes, limits)?;
    let probe = source.probe();
    let target = decode::fit_inside((probe.width, probe.height), fit);
    let rgb = source.decode_upright(target)?;
    Ok((probe, rgb))
}

/// Decodes upright and resizes (stretching, bilinear) to exactly `side`×`side`: the model-input
/// path. A zero `side` is treated as 1.
pub fn decode_square(
    bytes: &[u8],
    limits: &DecodeLimits,
    side: u32,
) -> Result<RgbImage, VisionError> {
    Decoded::new(bytes, *limits).square(side)
}

/// Decodes upright, cuts out `crop` = `[x0, y0, x1, y1]` (fractions of the displayed width and
/// height, clamped to the frame) and resizes the cut (stretching, bilinear) to `side`×`side`: the
/// model-input path for a detected subject. The photo is decoded at the smallest scale that
/// still gives the cut at least `side` pixels each way, so a small subject in a large photo
/// keeps its detail and a large one costs little.
pub fn decode_crop_square(
    bytes: &[u8],
    limits: &DecodeLimits,
    side: u32,
    crop: [f32; 4],
) -> Result<RgbImage, VisionError> {
    Decoded::new(bytes, *limits).crop_square(side, crop)
}

/// One photo asked for at several sizes (an upload: the detector's view of the whole photo,
/// then the crop of its subject), with the results of [`decode_square`] and
/// [`decode_crop_square`]: a PNG, TIFF, WebP, GIF or BMP is decoded once and kept at full size
/// for the next ask; a JPEG is decoded at the IDCT scale each ask needs (the whole photo for a
/// detector costs an eighth- to half-scale decode), and that decode is kept too: a crop that
/// needs the same scale (often, for an upload's subject) is cut from it without decoding again.
pub struct Decoded<B: AsRef<[u8]>> {
    bytes: B,
    limits: DecodeLimits,
    kept: Option<decode::Kept>,
}

impl<B: AsRef<[u8]>> Decoded<B> {
    pub fn new(bytes: B, limits: DecodeLimits) -> Self {
        Decoded { bytes, limits, kept: None }
    }

    /// As [`decode_square`].
    pub fn square(&mut self, side: u32) -> Result<RgbImage, VisionError> {
        square_of(self.bytes.as_ref(), &self.limits, &mut self.kept, side)
    }

    /// As [`decode_crop_square`].
    pub fn crop_square(&mut self, side: u32, crop: [f32; 4]) -> Result<RgbImage, VisionError> {
        crop_square_of(self.bytes.as_ref(), &self.limits, &mut self.kept, side, crop)
    }
}

// The work of `Decoded`'s generic methods lives in these plain functions, compiled once here
// (opt-level 3 even in dev builds) instead of in each caller's crate at the caller's level: in
// a dev build of the HTTP API (opt-level 1) the same crop took twice as long.
fn square_of(bytes: &[u8], limits: &DecodeLimits, kept: &mut Option<decode::Kept>, side: u32) -> Result<RgbImage, VisionError> {
    let side = side.max(1);
    decode::open(bytes, limits)?.decode_upright_keeping((side, side), kept)
}

fn crop_square_of(bytes: &[u8], limits: &DecodeLimits, kept: &mut Option<decode::Kept>, side: u32, crop: [f32; 4]) -> Result<RgbImage, VisionError> {
    decode::open(bytes, limits)?.decode_crop_upright(side.max(1), clamp_box(crop), kept)
}

/// `[x0, y0, x1, y1]` inside the unit square with at least 1 % of it each way.
pub fn clamp_box(b: [f32; 4]) -> [f32; 4] {
    let fix = |v: f32| if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    let (mut x0, mut y0, mut x1, mut y1) = (fix(b[0]), fix(b[1]), fix(b[2]), fix(b[3]));
    if x1 < x0 {
        std::mem::swap(&mut x0, &mut x1);
    }
    if y1 < y0 {
        std::mem::swap(&mut y0, &mut y1);
    }
    if x1 - x0 < 0.01 {
        let m = ((x0 + x1) / 2.0).clamp(0.005, 0.995);
        (x0, x1) = (m - 0.005, m + 0.005);
    }
    if y1 - y0 < 0.01 {
        let m = ((y0 + y1) / 2.0).clamp(0.005, 0.995);
        (y0, y1) = (m - 0.005, m + 0.005);
    }
    [x0, y0, x1, y1]
}

/// `b` grown by `margin` of its size on every side, then clamped to the frame.
pub fn expand_box(b: [f32; 4], margin: f32) -> [f32; 4] {
    let (dw, dh) = ((b[2] - b[0]) * margin, (b[3] - b[1]) * margin);
    clamp_box([b[0] - dw, b[1] - dh, b[2] + dw, b[3] + dh])
}

#[cfg(test)]
mod tests;
