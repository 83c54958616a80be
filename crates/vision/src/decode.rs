//! Header probing and scaled decoding for JPEG, PNG, TIFF, WebP, GIF and BMP.
//!
//! A [`Source`] is an opened file whose header has been read, checked for completeness and
//! against the pixel limit; nothing full-size has been allocated yet. `decode_upright` then
//! produces the small upright RGB image the caller asked for, doing as little full-size work as
//! the format allows.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::io::Cursor;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

use fast_image_resize::images::{Image as FirImage, ImageRef as FirImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::bmp::BmpDecoder;
use image::codecs::gif::GifDecoder;
use image::codecs::png::PngDecoder;
use image::codecs::tiff::TiffDecoder;
use image::codecs::webp::WebPDecoder;
use image::{DynamicImage, ImageDecoder, RgbImage, imageops};
use jpeg_decoder::{CodingProcess, PixelFormat};

use super::{DecodeLimits, ImageFormat, Probe, VisionError, sniff};

/// Headroom for decoder bookkeeping (strip buffers, tag values, zlib state) on top of the
/// output buffer when bounding the `image` crate's allocations.
const DECODER_SLACK_BYTES: u64 = 64 * 1024 * 1024;

thread_local! {
    // `Resizer` keeps scratch buffers between calls; one per blocking-pool thread avoids both
    // reallocating them per photo and any locking.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
    // A TurboJPEG decompressor handle, made on first use and kept by the thread: creating one
    // allocates libjpeg's state, which costs more than decoding a small photo.
    static DECOMPRESSOR: RefCell<Option<turbojpeg::Decompressor>> = const { RefCell::new(None) };
    // Whether this thread sends JPEGs libjpeg-turbo can take to it; starts from the process-wide
    // choice ([`turbo_by_default`]), tests flip it per thread.
    static USE_TURBO: Cell<bool> = Cell::new(turbo_by_default());
}

/// Which decoder produced a JPEG's pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JpegBackend {
    /// libjpeg-turbo (SIMD Huffman decoding, IDCT, upsampling and colour conversion).
    Turbo,
    /// The pure-Rust `jpeg-decoder`: what libjpeg-turbo's TurboJPEG 2 API does not decode
    /// (12-bit, lossless, CMYK/YCCK), and every file libjpeg-turbo rejects or warns about.
    JpegDecoder,
}

/// `PIPELINE_JPEG_DECODER=jpeg-decoder` sends every JPEG through `jpeg-decoder`, the decoder
/// before libjpeg-turbo (to measure one against the other); unset or anything else, libjpeg-turbo
/// takes what it can.
fn turbo_by_default() -> bool {
    static TURBO: OnceLock<bool> = OnceLock::new();
    *TURBO.get_or_init(|| std::env::var("PIPELINE_JPEG_DECODER").map_or(true, |v| v != "jpeg-decoder"))
}

/// Names the decoders a JPEG's pixels come from in this process, and their version where it
/// changes pixels: caches of decoded pixels key on it ([`crate::pixels_version`]).
pub(super) fn jpeg_pixels_version() -> &'static str {
    // `+crop1`: crops are cut and resized in one step from the scaled decode (decode_crop_upright).
    if turbo_by_default() { "libjpeg-turbo-2+jpeg-decoder-0.3+crop1" } else { "jpeg-decoder-0.3+crop1" }
}

/// Turns libjpeg-turbo on or off for JPEGs decoded on this thread from now on.
#[cfg(test)]
pub(super) fn set_turbo(on: bool) {
    USE_TURBO.set(on);
}

/// An opened image: header parsed and validated, pixels not yet decoded.
pub(super) struct Source<'a> {
    format: ImageFormat,
    /// Size as stored in the file, before orientation.
    stored: (u32, u32),
    orientation: u16,
    color: String,
    codec: Codec<'a>,
}

enum Codec<'a> {
    Jpeg(Box<JpegSource<'a>>),
    Png(Box<PngDecoder<Cursor<&'a [u8]>>>),
    Tiff(Box<TiffDecoder<Cursor<&'a [u8]>>>),
    Webp(Box<WebPDecoder<Cursor<&'a [u8]>>>),
    Gif(Box<GifDecoder<Cursor<&'a [u8]>>>),
    Bmp(Box<BmpDecoder<Cursor<&'a [u8]>>>),
}

struct JpegSource<'a> {
    /// The file up to its end-of-image marker.
    bytes: &'a [u8],
    decoder: jpeg_decoder::Decoder<&'a [u8]>,
    pixel_format: PixelFormat,
    precision: u8,
    lossless: bool,
    /// 4-channel JPEG without an Adobe segment, whose samples jpeg-decoder wrongly inverts.
    plain_cmyk: bool,
    /// 8-bit, Huffman-coded (baseline, extended or progressive), one or three components:
    /// what libjpeg-turbo decodes straight to grey or RGB.
    turbo: bool,
}

/// A decode kept for a photo's next ask: a JPEG's pixels at `eighths`/8 IDCT scale (8 for
/// everything else, at full size).
pub(super) struct Kept {
    eighths: u32,
    raster: Raster,
}

/// Pixels in stored orientation, one (luma) or three (RGB) interleaved u8 channels.
pub(super) struct Raster {
    data: Vec<u8>,
    width: u32,
    height: u32,
    channels: u8,
}

pub(super) fn open<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    match sniff(bytes)? {
        ImageFormat::Jpeg => open_jpeg(bytes, limits),
        ImageFormat::Png => open_png(bytes, limits),
        ImageFormat::Tiff => open_tiff(bytes, limits),
        ImageFormat::Webp => open_webp(bytes, limits),
        ImageFormat::Gif => open_gif(bytes, limits),
        ImageFormat::Bmp => open_bmp(bytes, limits),
    }
}

impl Source<'_> {
    pub(super) fn probe(&self) -> Probe {
        let (width, height) = displayed(self.stored, self.orientation);
        Probe {
            format: self.format,
            width,
            height,
            orientation: self.orientation,
            color: self.color.clone(),
        }
    }

    /// Decodes and resizes to exactly `target` (displayed orientation), then makes it upright.
    pub(super) fn decode_upright(self, target: (u32, u32)) -> Result<RgbImage, VisionError> {
        let stored_target = displayed(target, self.orientation);
        let raster = match self.codec {
            Codec::Jpeg(jpeg) => guarded("JPEG", || decode_jpeg(*jpeg, self.stored, stored_target))?.0,
            codec => full_size(codec, self.stored)?,
        };
        let raster = resize(raster, stored_target)?;
        let rgb = into_rgb(raster)?;
        Ok(orient(rgb, self.orientation))
    }

    /// [`Self::decode_upright`] for a photo asked for at several sizes, with the same result:
    /// the decode is kept in `kept` and reused by the next ask that needs the same one (a JPEG
    /// at the same IDCT scale, e.g. an upload's detector view and then its subject's crop;
    /// anything else at full size).
    pub(super) fn decode_upright_keeping(self, target: (u32, u32), kept: &mut Option<Kept>) -> Result<RgbImage, VisionError> {
        let orientation = self.orientation;
        let stored_target = displayed(target, orientation);
        let raster = self.kept_raster(stored_target, kept)?;
        let out = if (raster.width, raster.height) == stored_target {
            Raster { data: raster.data.clone(), ..*raster }
        } else {
            raster.resized(stored_target, None)?
        };
        Ok(orient(into_rgb(out)?, orientation))
    }

    /// What a decode for `stored_target` gives (a JPEG at the smallest IDCT scale covering it,
    /// which is all its pixels depend on; any other format at full size), from `kept` when it
    /// holds that decode; kept there for the next ask.
    fn kept_raster(self, stored_target: (u32, u32), kept: &mut Option<Kept>) -> Result<&Raster, VisionError> {
        let eighths = match &self.codec {
            Codec::Jpeg(_) => idct_scale_for(self.stored, stored_target),
            _ => 8,
        };
        if kept.as_ref().is_none_or(|k| k.eighths != eighths) {
            let raster = match self.codec {
                Codec::Jpeg(jpeg) => guarded("JPEG", || decode_jpeg(*jpeg, self.stored, stored_target))?.0,
                codec => full_size(codec, self.stored)?,
            };
            *kept = Some(Kept { eighths, raster });
        }
        Ok(&kept.as_ref().expect("kept above").raster)
    }

    /// The box `crop` (`[x0, y0, x1, y1]`, fractions of the displayed frame, as
    /// [`super::clamp_box`] leaves it) at `side`²: decoded at the smallest size that still gives
    /// the box at least `side` pixels each way (a JPEG's IDCT scale; other formats at full size;
    /// from and into `kept`, [`Self::decode_upright_keeping`]), then cut and resized in ONE
    /// resampling step (bilinear, area-aware when shrinking, at sub-pixel box edges) in stored
    /// orientation, and made upright. Nothing outside the box is resized.
    pub(super) fn decode_crop_upright(self, side: u32, crop: [f32; 4], kept: &mut Option<Kept>) -> Result<RgbImage, VisionError> {
        let (w, h) = displayed(self.stored, self.orientation);
        let (cw, ch) = (f64::from(crop[2] - crop[0]), f64::from(crop[3] - crop[1]));
        let scale = (f64::from(side) / (cw * f64::from(w))).max(f64::from(side) / (ch * f64::from(h))).min(1.0);
        let target = (
            ((f64::from(w) * scale).round() as u32).clamp(1, w),
            ((f64::from(h) * scale).round() as u32).clamp(1, h),
        );
        let (stored_crop, orientation) = (stored_box(crop, self.orientation), self.orientation);
        let raster = self.kept_raster(displayed(target, orientation), kept)?;
        let cut = crop_resize(raster, stored_crop, side)?;
        Ok(orient(into_rgb(cut)?, orientation))
    }
}

/// A box of the displayed frame (fractions) in the stored frame of EXIF orientation `o`: the
/// inverse of [`orient`], corner by corner.
fn stored_box(b: [f32; 4], o: u16) -> [f32; 4] {
    let map = |u: f32, v: f32| -> (f32, f32) {
        match o {
            2 => (1.0 - u, v),
            3 => (1.0 - u, 1.0 - v),
            4 => (u, 1.0 - v),
            5 => (v, u),
            6 => (v, 1.0 - u),
            7 => (1.0 - v, 1.0 - u),
            8 => (1.0 - v, u),
            _ => (u, v),
        }
    };
    let (a, c) = (map(b[0], b[1]), map(b[2], b[3]));
    [a.0.min(c.0), a.1.min(c.1), a.0.max(c.0), a.1.max(c.1)]
}

/// The box `b` (fractions) of `raster` resized to `side`² in one step, keeping its channels.
fn crop_resize(raster: &Raster, b: [f32; 4], side: u32) -> Result<Raster, VisionError> {
    let (w, h) = (f64::from(raster.width), f64::from(raster.height));
    // Inside the frame, at least a hundredth of a pixel wide (fir refuses boxes past the edge).
    let left = (f64::from(b[0]) * w).clamp(0.0, w - 0.01);
    let top = (f64::from(b[1]) * h).clamp(0.0, h - 0.01);
    let width = (f64::from(b[2]) * w).min(w) - left;
    let height = (f64::from(b[3]) * h).min(h) - top;
    let (width, height) = (width.max(0.01).min(w - left), height.max(0.01).min(h - top));
    raster.resized((side, side), Some((left, top, width, height)))
}

/// The full-size pixels of a format the `image` crate decodes.
fn full_size(codec: Codec<'_>, stored: (u32, u32)) -> Result<Raster, VisionError> {
    match codec {
        Codec::Jpeg(jpeg) => guarded("JPEG", || decode_jpeg(*jpeg, stored, stored)).map(|(r, _)| r),
        Codec::Png(png) => guarded("PNG", || decode_with_image(*png, stored)),
        Codec::Tiff(tiff) => guarded("TIFF", || decode_with_image(*tiff, stored)),
        Codec::Webp(webp) => guarded("WebP", || decode_with_image(*webp, stored)),
        Codec::Gif(gif) => guarded("GIF", || decode_with_image(*gif, stored)),
        Codec::Bmp(bmp) => guarded("BMP", || decode_with_image(*bmp, stored)),
    }
}

/// Size inside `fit` with the aspect ratio of `size`, never larger than `size` itself.
pub(super) fn fit_inside(size: (u32, u32), fit: (u32, u32)) -> (u32, u32) {
    let (w, h) = (size.0.max(1), size.1.max(1));
    let (fw, fh) = (fit.0.max(1), fit.1.max(1));
    if w <= fw && h <= fh {
        return (w, h);
    }
    let scale = (f64::from(fw) / f64::from(w)).min(f64::from(fh) / f64::from(h));
    let tw = (f64::from(w) * scale).round().clamp(1.0, f64::from(fw)) as u32;
    let th = (f64::from(h) * scale).round().clamp(1.0, f64::from(fh)) as u32;
    (tw, th)
}

/// Orientations 5..=8 store the picture transposed: displayed width is stored height.
fn displayed(size: (u32, u32), orientation: u16) -> (u32, u32) {
    if (5..=8).contains(&orientation) {
        (size.1, size.0)
    } else {
        size
    }
}

fn check_pixels(width: u32, height: u32, limits: &DecodeLimits) -> Result<(), VisionError> {
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(VisionError::TooManyPixels {
            width,
            height,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// Runs a decoder step, turning a panic inside a third-party decoder (reachable with hostile
/// input) into an error for this one photo instead of taking down the worker thread.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, VisionError>) -> Result<T, VisionError> {
    panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload: Box<dyn Any + Send>| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(VisionError::Decode(format!(
            "{what} decoder crashed on malformed data: {message}"
        )))
    })
}

// ---------------------------------------------------------------------------------------------
// JPEG

/// What the lenient marker walk finds before the first scan.
#[derive(Default)]
struct JpegMarkers<'a> {
    /// APP1 Exif payload, starting at the TIFF header.
    exif: Option<&'a [u8]>,
    /// Transform byte of an Adobe APP14 segment (0 = CMYK/RGB, 1 = YCbCr, 2 = YCCK).
    adobe_transform: Option<u8>,
    /// (precision, component count) from the frame header.
    frame: Option<(u8, u8)>,
    /// The frame header's marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC3
    /// lossless, 0xC9.. arithmetic-coded.
    sof: Option<u8>,
}

/// Walks marker segments up to the first SOS. Never fails: anything malformed just stops the
/// walk, and `jpeg-decoder` then reports the real error with its own message.
fn scan_jpeg_markers(bytes: &[u8]) -> JpegMarkers<'_> {
    let mut found = JpegMarkers::default();
    let mut pos = 2; // after SOI, which sniff() has checked
    loop {
        // Stray bytes between segments are tolerated by libjpeg and jpeg-decoder, so photos with
        // them exist; skip them the same way. Markers may then have any number of 0xFF fill bytes.
        while bytes.get(pos).is_some_and(|&b| b != 0xFF) {
            pos += 1;
        }
        while bytes.get(pos) == Some(&0xFF) && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return found;
        };
        pos += 2;
        match marker {
            // Standalone markers carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8..=0xDA => return found,
            _ => {}
        }
        let Some(len) = bytes
            .get(pos..pos + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return found;
        };
        let Some(segment) = bytes.get(pos + 2..pos + len).filter(|_| len >= 2) else {
            return found;
        };
        match marker {
            0xE1 if found.exif.is_none() && segment.starts_with(b"Exif\0\0") => {
                found.exif = Some(&segment[6..]);
            }
            0xEE if segment.len() >= 12 && segment.starts_with(b"Adobe") => {
                found.adobe_transform = Some(segment[11]);
            }
            // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) && segment.len() >= 6 => {
                found.frame = Some((segment[0], segment[5]));
                found.sof = Some(marker);
            }
            _ => {}
        }
        pos += len;
    }
}

/// Where the JPEG image ends: just past the EOI marker of its last scan, found by walking the
/// marker segments and the entropy-coded data; None when the file ends first (truncated).
/// Whatever follows is not the image's: zero padding (cameras, transfer tools), the video of a
/// phone's motion photo, a second picture (MPF). The walk skips length-delimited segments, so
/// an embedded EXIF thumbnail's own EOI does not end it.
fn jpeg_end(bytes: &[u8]) -> Option<usize> {
    let mut pos = 2; // after SOI, which sniff() has checked
    loop {
        // Fill bytes and stray bytes between segments, as libjpeg tolerates them.
        while bytes.get(pos).is_some_and(|&b| b != 0xFF) {
            pos += 1;
        }
        while bytes.get(pos) == Some(&0xFF) && bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let marker = *bytes.get(pos + 1)?;
        pos += 2;
        match marker {
            0xD9 => return Some(pos),
            0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([*bytes.get(pos)?, *bytes.get(pos + 1)?]));
        if len < 2 || pos + len > bytes.len() {
            return None;
        }
        pos += len;
        if marker == 0xDA {
            // Entropy-coded data: up to the next marker that is not a stuffed 0x00, a restart
            // marker or a fill byte. This walks the whole file, so with SIMD (memchr): a
            // byte-at-a-time search cost about 2 % of a 4-megapixel photo's decode.
            loop {
                let at = pos + memchr::memchr(0xFF, bytes.get(pos..)?)?;
                match *bytes.get(at + 1)? {
                    0x00 | 0xD0..=0xD7 | 0xFF => pos = at + 1,
                    _ => {
                        pos = at;
                        break;
                    }
                }
            }
        }
    }
}

fn exif_orientation(tiff: &[u8]) -> u16 {
    // A damaged EXIF block must not make an otherwise good photo unusable: fall back to
    // "no rotation", which is what most viewers do too.
    exif::Reader::new()
        .read_raw(tiff.to_vec())
        .ok()
        .and_then(|exif| {
            exif.get_field(exif::Tag::Orientation, exif::In::PRIMARY)
                .and_then(|field| field.value.get_uint(0))
        })
        .and_then(|v| u16::try_from(v).ok())
        .filter(|v| (1..=8).contains(v))
        .unwrap_or(1)
}

fn open_jpeg<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    let bytes = &bytes[..jpeg_end(bytes).ok_or(VisionError::Truncated)?];
    let markers = scan_jpeg_markers(bytes);
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    guarded("JPEG", || {
        decoder
            .read_info()
            .map_err(|e| VisionError::Decode(format!("invalid JPEG header: {e}")))
    })?;
    // `Decoder::info` panics on component counts other than 1, 3 and 4 instead of erroring, so
    // reject those first. Should the walk have missed the frame header that the decoder found,
    // assume the common 8-bit three-channel case; the guarded `info` call below still catches
    // a panic.
    let (precision, components) = markers.frame.unwrap_or((8, 3));
    if !matches!(components, 1 | 3 | 4) {
        return Err(VisionError::Decode(format!(
            "unsupported JPEG with {components} colour components (expected 1, 3 or 4)"
        )));
    }
    // Guarded as well, should the marker walk above have missed the frame header.
    let info = guarded("JPEG", || {
        decoder
            .info()
            .ok_or_else(|| VisionError::Decode("JPEG header has no frame (SOF) segment".to_owned()))
    })?;
    let stored = (u32::from(info.width), u32::from(info.height));
    check_pixels(stored.0, stored.1, limits)?;

    // jpeg-decoder assumes every 4-channel JPEG follows Adobe's convention of storing inverted
    // CMYK, and inverts it back. Without the Adobe APP14 segment the samples are plain ink
    // amounts (libjpeg and Pillow read them that way), so its output must be inverted again.
    // (Asking it for `ColorTransform::None` instead is no way out: in 0.3 that path writes each
    // row planar, not interleaved.)
    let plain_cmyk = components == 4 && markers.adobe_transform.is_none();
    let color = match info.pixel_format {
        PixelFormat::L8 => "l8",
        PixelFormat::L16 => "l16",
        PixelFormat::RGB24 => "rgb8",
        PixelFormat::CMYK32 => "cmyk8",
    };
    Ok(Source {
        format: ImageFormat::Jpeg,
        stored,
        orientation: markers.exif.map_or(1, exif_orientation),
        color: color.to_owned(),
        codec: Codec::Jpeg(Box::new(JpegSource {
            bytes,
            decoder,
            pixel_format: info.pixel_format,
            precision,
            lossless: info.coding_process == CodingProcess::Lossless,
            plain_cmyk,
            turbo: turbo_decodes(markers.sof, precision, info.pixel_format),
        })),
    })
}

/// Whether libjpeg-turbo's TurboJPEG 2 API decodes a JPEG with this frame header marker,
/// sample precision and layout straight to grey or RGB: 8-bit, Huffman-coded (baseline 0xC0,
/// extended 0xC1, progressive 0xC2), one or three components. Not lossless (0xC3), 12-bit,
/// arithmetic-coded (0xC9..) nor CMYK/YCCK, which stays with jpeg-decoder's inversion handling.
fn turbo_decodes(sof: Option<u8>, precision: u8, layout: PixelFormat) -> bool {
    precision == 8 && matches!(sof, Some(0xC0..=0xC2)) && matches!(layout, PixelFormat::L8 | PixelFormat::RGB24)
}

/// Output size of jpeg-decoder's IDCT at `scale`/8 (it rounds up).
fn idct_scaled(len: u32, scale: u32) -> u32 {
    (len * scale).div_ceil(8)
}

/// Smallest IDCT scale, in eighths, that covers `target` in BOTH axes, so the final resize only
/// ever shrinks; 8 (full size) when none smaller does.
fn idct_scale_for(stored: (u32, u32), target: (u32, u32)) -> u32 {
    [1, 2, 4]
        .into_iter()
        .find(|&s| idct_scaled(stored.0, s) >= target.0 && idct_scaled(stored.1, s) >= target.1)
        .unwrap_or(8)
}

/// Decodes at the smallest IDCT scale covering `target`, through libjpeg-turbo where it can and
/// this thread has it on, else (or when libjpeg-turbo fails or warns) through `jpeg-decoder`,
/// whose errors name the fault. Says which decoder made the pixels.
fn decode_jpeg(
    jpeg: JpegSource<'_>,
    stored: (u32, u32),
    target: (u32, u32),
) -> Result<(Raster, JpegBackend), VisionError> {
    if jpeg.turbo && USE_TURBO.get() {
        let eighths = idct_scale_for(stored, target);
        let gray = jpeg.pixel_format == PixelFormat::L8;
        if let Ok(raster) = decode_turbo(jpeg.bytes, stored, eighths, gray) {
            return Ok((raster, JpegBackend::Turbo));
        }
    }
    decode_jpeg_decoder(jpeg, stored, target).map(|r| (r, JpegBackend::JpegDecoder))
}

/// libjpeg-turbo at `eighths`/8 scale, straight into grey or RGB. Any error, and any warning
/// (libjpeg's "corrupt JPEG data" class, which TurboJPEG reports as a failure after decoding
/// what it could), is returned for the caller to retry with `jpeg-decoder`, so a file this path
/// does not decode cleanly gets exactly the old treatment.
fn decode_turbo(bytes: &[u8], stored: (u32, u32), eighths: u32, gray: bool) -> Result<Raster, turbojpeg::Error> {
    // TurboJPEG picks the largest of its scaling factors whose output fits the size asked for;
    // asking for exactly the size of `eighths`/8 (both round up: TJSCALED) gets that factor, or
    // one with the same output size. Either way the buffer is filled completely.
    let (width, height) = (idct_scaled(stored.0, eighths), idct_scaled(stored.1, eighths));
    let format = if gray { turbojpeg::PixelFormat::GRAY } else { turbojpeg::PixelFormat::RGB };
    let channels = format.size();
    let (w, h) = (width as usize, height as usize);
    let mut data = vec![0u8; w * h * channels];
    let image = turbojpeg::Image { pixels: data.as_mut_slice(), width: w, pitch: w * channels, height: h, format };
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(d) => d,
            None => slot.insert(turbojpeg::Decompressor::new()?),
        };
        decompressor.decompress(bytes, image)
    })?;
    Ok(Raster { data, width, height, channels: channels as u8 })
}

fn decode_jpeg_decoder(
    mut jpeg: JpegSource<'_>,
    stored: (u32, u32),
    target: (u32, u32),
) -> Result<Raster, VisionError> {
    let err = |e: jpeg_decoder::Error| VisionError::Decode(format!("corrupt JPEG data: {e}"));
    // Lossless JPEGs have no IDCT to scale.
    if !jpeg.lossless {
        // Smallest IDCT scale that still covers the target in BOTH axes, so the final resize only
        // ever shrinks. `Decoder::scale` itself settles for either axis, so ask it for the exact
        // size that scale yields.
        let scale = idct_scale_for(stored, target);
        if scale < 8 {
            let request = (idct_scaled(stored.0, scale), idct_scaled(stored.1, scale));
            // Both fit in u16: they are at most the stored size, which came from u16 header fields.
            let (w, h) = jpeg
                .decoder
                .scale(request.0 as u16, request.1 as u16)
                .map_err(err)?;
            if u32::from(w) < target.0 || u32::from(h) < target.1 {
                // Only for images a few pixels across, where neighbouring scales round to the
                // same size in one axis; full size is then cheap anyway.
                jpeg.decoder
                    .scale(stored.0 as u16, stored.1 as u16)
                    .map_err(err)?;
            }
        }
    }
    let data = jpeg.decoder.decode().map_err(err)?;
    // `info` is Some after a successful decode; after `scale` it reports the scaled size.
    let info = jpeg
        .decoder
        .info()
        .ok_or_else(|| VisionError::Decode("JPEG lost its frame header".to_owned()))?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    let pixels = width as usize * height as usize;
    let expect = pixels * jpeg.pixel_format.pixel_bytes();
    if data.len() < expect {
        return Err(VisionError::Decode(format!(
            "JPEG decoder returned {} bytes for a {width}x{height} image, expected {expect}",
            data.len()
        )));
    }
    let (data, channels) = match jpeg.pixel_format {
        PixelFormat::L8 => (data, 1),
        PixelFormat::RGB24 => (data, 3),
        PixelFormat::L16 => (l16_to_l8(&data[..expect], jpeg.precision), 1),
        PixelFormat::CMYK32 => (cmyk_to_rgb(&data[..expect], jpeg.plain_cmyk), 3),
    };
    Ok(Raster {
        data,
        width,
        height,
        channels,
    })
}

/// jpeg-decoder emits native-endian u16 samples holding `precision` significant bits.
fn l16_to_l8(data: &[u8], precision: u8) -> Vec<u8> {
    let shift = u32::from(precision.clamp(8, 16) - 8);
    data.chunks_exact(2)
        .map(|b| (u16::from_ne_bytes([b[0], b[1]]) >> shift).min(255) as u8)
        .collect()
}

/// Naive (profile-free) conversion from ink amounts, 0 = no ink. jpeg-decoder has already undone
/// Adobe's inversion (and the YCCK transform) by the time samples get here; `inverted` says it
/// applied that inversion to a file that never had it.
fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let flip = if inverted { 255 } else { 0 };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for px in cmyk.chunks_exact(4) {
        let white = 255 - u32::from(px[3] ^ flip);
        for &ink in &px[..3] {
            // Rounded (255-ink)*(255-k)/255; always <= 255.
            rgb.push((((255 - u32::from(ink ^ flip)) * white + 127) / 255) as u8);
        }
    }
    rgb
}

// ---------------------------------------------------------------------------------------------
// PNG and TIFF (via the `image` crate)

fn image_limits(max_alloc: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_alloc);
    limits
}

/// Bound for one full-size decode: the widest sample layout (RGBA f32, 16 bytes) plus slack.
fn decode_budget(pixels: u64) -> u64 {
    pixels
        .saturating_mul(16)
        .saturating_add(DECODER_SLACK_BYTES)
}

fn image_err(format: &str) -> impl Fn(image::ImageError) -> VisionError + '_ {
    move |e| VisionError::Decode(format!("invalid {format}: {e}"))
}

fn color_name(color: image::ExtendedColorType) -> String {
    // Debug names are exactly the compact lower-case style wanted ("Rgb16" -> "rgb16").
    format!("{color:?}").to_lowercase()
}

/// A PNG is complete when its chunk chain reaches IEND. Walking chunk headers costs nothing
/// next to inflating the data, and catches files cut anywhere, not only in the last chunk.
fn png_is_complete(bytes: &[u8]) -> bool {
    let mut pos: usize = 8;
    while let Some(head) = bytes.get(pos..pos + 8) {
        if &head[4..8] == b"IEND" {
            return true;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        pos = pos.saturating_add(12).saturating_add(len);
    }
    false
}

fn open_png<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    if !png_is_complete(bytes) {
        return Err(VisionError::Truncated);
    }
    // The png crate fixes its internal allocation bound at construction, before the header is
    // known, so size it for the largest image the limit admits; the exact check follows.
    let mut decoder = guarded("PNG", || {
        PngDecoder::with_limits(
            Cursor::new(bytes),
            image_limits(decode_budget(limits.max_pixels)),
        )
        .map_err(image_err("PNG"))
    })?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, limits)?;
    let orientation = orientation_of(&mut decoder);
    Ok(Source {
        format: ImageFormat::Png,
        stored: (width, height),
        orientation,
        color: color_name(decoder.original_color_type()),
        codec: Codec::Png(Box::new(decoder)),
    })
}

fn open_tiff<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    open_with_image(bytes, limits, ImageFormat::Tiff, "TIFF", TiffDecoder::new, |d| Codec::Tiff(Box::new(d)))
}

/// A RIFF (WebP) file is complete when it holds the bytes its header says.
fn riff_is_complete(bytes: &[u8]) -> bool {
    bytes.get(4..8).is_some_and(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) + 8 <= bytes.len() as u64)
}

fn open_webp<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    if !riff_is_complete(bytes) {
        return Err(VisionError::Truncated);
    }
    open_with_image(bytes, limits, ImageFormat::Webp, "WebP", WebPDecoder::new, |d| Codec::Webp(Box::new(d)))
}

/// A GIF is complete when it ends with its trailer byte (0x3B), zero padding allowed.
fn gif_is_complete(bytes: &[u8]) -> bool {
    bytes.iter().rposition(|&b| b != 0).is_some_and(|i| bytes[i] == 0x3B)
}

/// The first frame; an animation's other frames are not the photo.
fn open_gif<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    if !gif_is_complete(bytes) {
        return Err(VisionError::Truncated);
    }
    open_with_image(bytes, limits, ImageFormat::Gif, "GIF", GifDecoder::new, |d| Codec::Gif(Box::new(d)))
}

/// A BMP is complete when it holds the bytes its file header says (a zero size is allowed by
/// the format; the decoder then finds a short file itself).
fn bmp_is_complete(bytes: &[u8]) -> bool {
    bytes.get(2..6).is_some_and(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) <= bytes.len() as u64)
}

fn open_bmp<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Source<'a>, VisionError> {
    if !bmp_is_complete(bytes) {
        return Err(VisionError::Truncated);
    }
    open_with_image(bytes, limits, ImageFormat::Bmp, "BMP", BmpDecoder::new, |d| Codec::Bmp(Box::new(d)))
}

/// Opens a format the `image` crate decodes (at full size): the decoder made by `new` (guarded
/// against panics), the pixel limit checked from its header before anything is allocated, its
/// allocations bounded by that size, the orientation from its metadata (upright without any).
fn open_with_image<'a, D: ImageDecoder>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
    format: ImageFormat,
    name: &str,
    new: impl FnOnce(Cursor<&'a [u8]>) -> image::ImageResult<D>,
    codec: impl FnOnce(D) -> Codec<'a>,
) -> Result<Source<'a>, VisionError> {
    let mut decoder = guarded(name, || new(Cursor::new(bytes)).map_err(image_err(name)))?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, limits)?;
    let pixels = u64::from(width) * u64::from(height);
    decoder.set_limits(image_limits(decode_budget(pixels))).map_err(image_err(name))?;
    let orientation = orientation_of(&mut decoder);
    let color = color_name(decoder.original_color_type());
    Ok(Source { format, stored: (width, height), orientation, color, codec: codec(decoder) })
}

/// PNG eXIf chunk or TIFF Orientation tag; unreadable metadata counts as upright, as for JPEG.
fn orientation_of(decoder: &mut impl ImageDecoder) -> u16 {
    decoder.orientation().map_or(1, |o| u16::from(o.to_exif()))
}

fn decode_with_image(
    decoder: impl ImageDecoder,
    stored: (u32, u32),
) -> Result<Raster, VisionError> {
    let image = DynamicImage::from_decoder(decoder).map_err(image_err("image data"))?;
    let (width, height) = stored;
    let has_color = image.color().has_color();
    // Grey stays one channel through the resize (a third of the work); everything else —
    // 16-bit, float, alpha (dropped, as Pillow's convert('RGB') does) — becomes RGB8.
    let (data, channels) = match image {
        DynamicImage::ImageLuma8(img) => (img.into_raw(), 1),
        DynamicImage::ImageRgb8(img) => (img.into_raw(), 3),
        other if !has_color => (other.into_luma8().into_raw(), 1),
        other => (other.into_rgb8().into_raw(), 3),
    };
    Ok(Raster {
        data,
        width,
        height,
        channels,
    })
}

// ---------------------------------------------------------------------------------------------
// Resize, colour expansion, orientation

fn resize(raster: Raster, target: (u32, u32)) -> Result<Raster, VisionError> {
    if (raster.width, raster.height) == target {
        return Ok(raster);
    }
    raster.resized(target, None)
}

impl Raster {
    /// This raster (or the box `crop` of it: left, top, width, height in pixels) resized to
    /// `target` in one step ([`resize_plane`]), keeping its channels.
    fn resized(&self, target: (u32, u32), crop: Option<(f64, f64, f64, f64)>) -> Result<Raster, VisionError> {
        let pixel_type = if self.channels == 1 { PixelType::U8 } else { PixelType::U8x3 };
        let data = resize_region(&self.data, (self.width, self.height), pixel_type, target, crop)?;
        Ok(Raster { data, width: target.0, height: target.1, channels: self.channels })
    }
}

/// Bilinear (area-aware when shrinking, like Pillow's BILINEAR) resize of a u8 image.
pub(super) fn resize_plane(
    data: &[u8],
    size: (u32, u32),
    pixel_type: PixelType,
    target: (u32, u32),
) -> Result<Vec<u8>, VisionError> {
    resize_region(data, size, pixel_type, target, None)
}

/// [`resize_plane`] of the box `crop` (left, top, width, height; sub-pixel) or of everything.
fn resize_region(
    data: &[u8],
    size: (u32, u32),
    pixel_type: PixelType,
    target: (u32, u32),
    crop: Option<(f64, f64, f64, f64)>,
) -> Result<Vec<u8>, VisionError> {
    let src = FirImageRef::new(size.0, size.1, data, pixel_type)
        .map_err(|e| VisionError::Decode(format!("decoded buffer does not match its size: {e}")))?;
    let mut dst = FirImage::new(target.0, target.1, pixel_type);
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    if let Some((left, top, width, height)) = crop {
        options = options.crop(left, top, width, height);
    }
    // The RefCell is only borrowed inside this call, which never re-enters resize_plane.
    RESIZER
        .with_borrow_mut(|resizer| resizer.resize(&src, &mut dst, &options))
        .map_err(|e| VisionError::Decode(format!("resize failed: {e}")))?;
    Ok(dst.into_vec())
}

fn into_rgb(raster: Raster) -> Result<RgbImage, VisionError> {
    let data = if raster.channels == 1 {
        raster.data.iter().flat_map(|&v| [v, v, v]).collect()
    } else {
        raster.data
    };
    RgbImage::from_raw(raster.width, raster.height, data).ok_or_else(|| {
        VisionError::Decode("decoded buffer is smaller than its stated size".to_owned())
    })
}

/// Applies EXIF orientation `o` (1..=8), turning the stored picture upright.
fn orient(rgb: RgbImage, o: u16) -> RgbImage {
    match o {
        2 => imageops::flip_horizontal(&rgb),
        3 => imageops::rotate180(&rgb),
        4 => imageops::flip_vertical(&rgb),
        // Transpose: stored rows are displayed columns.
        5 => imageops::flip_horizontal(&imageops::rotate90(&rgb)),
        6 => imageops::rotate90(&rgb),
        // Transverse.
        7 => imageops::flip_horizontal(&imageops::rotate270(&rgb)),
        8 => imageops::rotate270(&rgb),
        _ => rgb,
    }
}

#[cfg(test)]
mod tests {
    use image::metadata::Orientation;

    use super::*;

    #[test]
    fn orient_matches_the_image_crate_for_all_eight() {
        let stored = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        for o in 1..=8u8 {
            let mut expected = DynamicImage::ImageRgb8(stored.clone());
            // 1..=8 are exactly the values from_exif accepts.
            expected.apply_orientation(Orientation::from_exif(o).expect("valid EXIF orientation"));
            assert_eq!(
                orient(stored.clone(), u16::from(o)),
                expected.into_rgb8(),
                "orientation {o}"
            );
        }
    }

    #[test]
    fn jpeg_uses_the_smallest_idct_scale_covering_the_target() {
        let img = RgbImage::from_fn(1600, 1200, |x, y| image::Rgb([x as u8, y as u8, 90]));
        let mut bytes = Vec::new();
        jpeg_encoder::Encoder::new(&mut bytes, 80)
            .encode(img.as_raw(), 1600, 1200, jpeg_encoder::ColorType::Rgb)
            .expect("encode");
        let decoded_size = |target: (u32, u32)| {
            let source = open(&bytes, &DecodeLimits::default()).expect("open");
            let Codec::Jpeg(jpeg) = source.codec else {
                panic!("not a JPEG")
            };
            let (raster, _) = decode_jpeg(*jpeg, source.stored, target).expect("decode");
            (raster.width, raster.height)
        };
        assert_eq!(decoded_size((200, 150)), (200, 150)); // 1/8
        assert_eq!(decoded_size((201, 100)), (400, 300)); // width needs 1/4
        assert_eq!(decoded_size((480, 480)), (800, 600)); // height needs 1/2
        assert_eq!(decoded_size((1000, 10)), (1600, 1200)); // full
    }

    /// A textured "photo": smooth colour gradients, a few hard edges and deterministic noise, so
    /// that decoders differing in IDCT, upsampling or colour conversion would show it.
    fn photo(w: u32, h: u32) -> RgbImage {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        RgbImage::from_fn(w, h, |x, y| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 17) as i32 - 8;
            let (u, v) = (f64::from(x) / f64::from(w), f64::from(y) / f64::from(h));
            let edge = if (x / 97 + y / 61) % 2 == 0 { 40 } else { -40 };
            let c = |base: f64| (base as i32 + edge + noise).clamp(0, 255) as u8;
            image::Rgb([c(40.0 + 170.0 * u), c(200.0 - 150.0 * v), c(90.0 + 80.0 * (u * 9.0).sin() * v)])
        })
    }

    fn encode(data: &[u8], w: u32, h: u32, color: jpeg_encoder::ColorType, quality: u8, progressive: bool, app1: Option<Vec<u8>>) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, quality);
        encoder.set_progressive(progressive);
        if let Some(segment) = app1 {
            encoder.add_app_segment(1, segment).expect("APP1 fits");
        }
        encoder.encode(data, w as u16, h as u16, color).expect("encode");
        bytes
    }

    /// The decoded raster at `target` and the decoder that made it, with libjpeg-turbo on or off.
    fn raster(bytes: &[u8], target: (u32, u32), turbo: bool) -> (Raster, JpegBackend) {
        set_turbo(turbo);
        let source = open(bytes, &DecodeLimits::default()).expect("open");
        let Codec::Jpeg(jpeg) = source.codec else { panic!("not a JPEG") };
        let out = decode_jpeg(*jpeg, source.stored, target);
        set_turbo(true);
        out.expect("decode")
    }

    /// Mean absolute difference per channel value of two equally sized rasters.
    fn mean_abs(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(&x, &y)| f64::from(x.abs_diff(y))).sum::<f64>() / a.len() as f64
    }

    #[test]
    fn turbo_and_jpeg_decoder_agree_at_every_scale() {
        let img = photo(1000, 700);
        let grey: Vec<u8> = img.pixels().map(|p| p[1]).collect();
        let cases = [
            ("rgb 4:2:0", encode(img.as_raw(), 1000, 700, jpeg_encoder::ColorType::Rgb, 85, false, None), 3),
            ("rgb 4:4:4", encode(img.as_raw(), 1000, 700, jpeg_encoder::ColorType::Rgb, 95, false, None), 3),
            ("rgb progressive", encode(img.as_raw(), 1000, 700, jpeg_encoder::ColorType::Rgb, 85, true, None), 3),
            ("grey", encode(&grey, 1000, 700, jpeg_encoder::ColorType::Luma, 85, false, None), 1),
        ];
        // 1/8, 1/4, 1/2 and full size, each asked for by a target just inside it.
        for (target, size) in [((120, 80), (125, 88)), ((200, 100), (250, 175)), ((480, 300), (500, 350)), ((900, 10), (1000, 700))] {
            for (what, bytes, channels) in &cases {
                let (turbo, by) = raster(bytes, target, true);
                let (reference, reference_by) = raster(bytes, target, false);
                assert_eq!((by, reference_by), (JpegBackend::Turbo, JpegBackend::JpegDecoder), "{what}");
                assert_eq!((turbo.width, turbo.height, turbo.channels), (size.0, size.1, *channels), "{what} at {target:?}");
                assert_eq!((reference.width, reference.height, reference.channels), (size.0, size.1, *channels), "{what} at {target:?}");
                let d = mean_abs(&turbo.data, &reference.data);
                assert!(d <= 3.0, "{what} at {target:?}: the decoders differ by {d:.2} per value");
                // Not a blank or shifted picture either: against the source, scaled the same way.
                let expected = imageops::resize(&img, size.0, size.1, imageops::FilterType::Triangle);
                let expected: Vec<u8> = if *channels == 1 { expected.pixels().map(|p| p[1]).collect() } else { expected.into_raw() };
                let d = mean_abs(&turbo.data, &expected);
                assert!(d <= 12.0, "{what} at {target:?}: {d:.2} per value from the source");
            }
        }
    }

    #[test]
    fn exif_rotated_and_grey_photos_come_out_the_same_either_way() {
        let img = photo(640, 400);
        let grey: Vec<u8> = img.pixels().map(|p| p[0]).collect();
        let mut exif = b"Exif\0\0MM\0*".to_vec();
        // IFD0 at 8 with one entry: Orientation (0x0112), SHORT, count 1, value 6; no next IFD.
        exif.extend_from_slice(&[0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
        let rotated = encode(img.as_raw(), 640, 400, jpeg_encoder::ColorType::Rgb, 85, false, Some(exif));
        let grey = encode(&grey, 640, 400, jpeg_encoder::ColorType::Luma, 85, false, None);
        for (what, bytes, fit, size) in [("rotated", &rotated, (100, 200), (100, 160)), ("grey", &grey, (300, 300), (300, 188))] {
            for fit in [fit, (2000, 2000)] {
                set_turbo(false);
                let old = crate::decode_rgb(bytes, &DecodeLimits::default(), fit);
                set_turbo(true);
                let (probe, new) = crate::decode_rgb(bytes, &DecodeLimits::default(), fit).expect(what);
                let (old_probe, old) = old.expect(what);
                assert_eq!(probe, old_probe, "{what}");
                if fit != (2000, 2000) {
                    assert_eq!(new.dimensions(), size, "{what}");
                }
                assert_eq!(new.dimensions(), old.dimensions(), "{what}");
                let d = mean_abs(new.as_raw(), old.as_raw());
                assert!(d <= 3.0, "{what} at {fit:?}: {d:.2} per value apart");
            }
        }
        // Upright: the stored top-left corner ends up top-right after orientation 6.
        let (_, up) = crate::decode_rgb(&rotated, &DecodeLimits::default(), (400, 640)).expect("rotated");
        assert_eq!(up.dimensions(), (400, 640));
        let corner = image::imageops::crop_imm(&img, 0, 0, 40, 40).to_image();
        let shown = image::imageops::rotate270(&image::imageops::crop_imm(&up, 360, 0, 40, 40).to_image());
        assert!(mean_abs(corner.as_raw(), shown.as_raw()) <= 12.0);
    }

    #[test]
    fn libjpeg_turbo_takes_the_files_it_decodes_and_only_those() {
        let img = photo(64, 48);
        let open_turbo = |bytes: &[u8]| {
            let Codec::Jpeg(jpeg) = open(bytes, &DecodeLimits::default()).expect("open").codec else { panic!("not a JPEG") };
            jpeg.turbo
        };
        let baseline = encode(img.as_raw(), 64, 48, jpeg_encoder::ColorType::Rgb, 85, false, None);
        let progressive = encode(img.as_raw(), 64, 48, jpeg_encoder::ColorType::Rgb, 85, true, None);
        assert!(open_turbo(&baseline) && open_turbo(&progressive));
        assert_eq!(raster(&baseline, (32, 24), true).1, JpegBackend::Turbo);
        assert_eq!(raster(&progressive, (64, 48), true).1, JpegBackend::Turbo);
        // CMYK stays with jpeg-decoder, whose handling of Adobe inversion the tests pin down.
        let cmyk = encode(&[40u8; 64 * 48 * 4], 64, 48, jpeg_encoder::ColorType::Cmyk, 85, false, None);
        assert!(!open_turbo(&cmyk));
        assert_eq!(raster(&cmyk, (64, 48), true).1, JpegBackend::JpegDecoder);
        // Lossless, 12-bit and arithmetic-coded frames are not for the TurboJPEG 2 API.
        assert!(turbo_decodes(Some(0xC1), 8, PixelFormat::RGB24) && turbo_decodes(Some(0xC2), 8, PixelFormat::L8));
        assert!(!turbo_decodes(Some(0xC3), 8, PixelFormat::RGB24), "lossless");
        assert!(!turbo_decodes(Some(0xC1), 12, PixelFormat::L16), "12-bit");
        assert!(!turbo_decodes(Some(0xC9), 8, PixelFormat::RGB24), "arithmetic");
        assert!(!turbo_decodes(None, 8, PixelFormat::RGB24), "no frame header found");
    }

    #[test]
    fn a_file_libjpeg_turbo_finds_corrupt_gets_the_old_treatment() {
        let img = photo(256, 192);
        let good = encode(img.as_raw(), 256, 192, jpeg_encoder::ColorType::Rgb, 85, false, None);
        // A restart marker in the middle of the entropy-coded data: libjpeg-turbo warns ("corrupt
        // JPEG data"), so the photo goes to jpeg-decoder, and the answer is what it was before.
        let sos = good.windows(2).position(|w| w == [0xFF, 0xDA]).expect("SOS");
        let mut bad = good.clone();
        let at = sos + (good.len() - sos) / 2;
        bad[at..at + 2].copy_from_slice(&[0xFF, 0xD3]);
        assert!(decode_turbo(&bad, (256, 192), 8, false).is_err(), "libjpeg-turbo should complain");
        set_turbo(false);
        let before = crate::decode_square(&bad, &DecodeLimits::default(), 64);
        set_turbo(true);
        let after = crate::decode_square(&bad, &DecodeLimits::default(), 64);
        assert_eq!(after, before);
        if let Err(e) = &after {
            assert!(e.to_string().contains("JPEG"), "{e}");
        }
    }
}
