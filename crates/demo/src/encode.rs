//! File encodings for the lake: baseline RGB JPEGs and the planted format variants (greyscale,
//! Adobe CMYK, EXIF-rotated, 8/16-bit PNG) and damaged files.

use anyhow::{Context, Result, bail};
use image::ImageEncoder;
use jpeg_encoder::{ColorType, Encoder, SamplingFactor};

/// Baseline JPEG with 4:2:0 chroma, like most cameras, for any quality. jpeg-encoder would
/// otherwise switch subsampling at quality 90, and 4:2:0 also halves encoding time.
pub(crate) fn jpeg_rgb(rgb: &[u8], w: usize, h: usize, quality: u8) -> Result<Vec<u8>> {
    jpeg(rgb, w, h, quality, ColorType::Rgb, None)
}

pub(crate) fn jpeg_gray(rgb: &[u8], w: usize, h: usize, quality: u8) -> Result<Vec<u8>> {
    let luma: Vec<u8> = rgb
        .chunks_exact(3)
        .map(|p| ((299 * u32::from(p[0]) + 587 * u32::from(p[1]) + 114 * u32::from(p[2]) + 500) / 1000) as u8)
        .collect();
    jpeg(&luma, w, h, quality, ColorType::Luma, None)
}

/// Naive RGB → CMYK (K = 1 - max, CMY from the remainder). jpeg-encoder stores it the Adobe way
/// (inverted, APP14 "Adobe" marker), which is what decoders expect from Photoshop files.
pub(crate) fn jpeg_cmyk(rgb: &[u8], w: usize, h: usize, quality: u8) -> Result<Vec<u8>> {
    let mut cmyk = Vec::with_capacity(w * h * 4);
    for p in rgb.chunks_exact(3) {
        let mx = p[0].max(p[1]).max(p[2]);
        let k = 255 - mx;
        let conv =
            |c: u8| if mx == 0 { 0 } else { ((u32::from(mx - c) * 255 + u32::from(mx) / 2) / u32::from(mx)) as u8 };
        cmyk.extend_from_slice(&[conv(p[0]), conv(p[1]), conv(p[2]), k]);
    }
    jpeg(&cmyk, w, h, quality, ColorType::Cmyk, None)
}

/// Stores the upright photo as a camera held sideways would: pixels rotated 90° counter-
/// clockwise plus EXIF Orientation 6 ("rotate 90° clockwise to display"), so viewers that honour
/// EXIF show it upright again.
pub(crate) fn jpeg_exif_rotated(rgb: &[u8], w: usize, h: usize, quality: u8) -> Result<Vec<u8>> {
    let mut rot = vec![0u8; rgb.len()];
    // Stored image is h wide and w tall; stored (row r, col c) shows upright (row c, col w-1-r).
    for r in 0..w {
        for c in 0..h {
            let src = (c * w + (w - 1 - r)) * 3;
            let dst = (r * h + c) * 3;
            rot[dst..dst + 3].copy_from_slice(&rgb[src..src + 3]);
        }
    }
    jpeg(&rot, h, w, quality, ColorType::Rgb, Some(exif_orientation(6)))
}

/// Minimal EXIF APP1 payload: big-endian TIFF header and one IFD with only the Orientation tag.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(32);
    d.extend_from_slice(b"Exif\0\0");
    d.extend_from_slice(b"MM\0\x2A");
    d.extend_from_slice(&8u32.to_be_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&0x0112u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    // A SHORT value sits left-justified in the 4-byte value field.
    d.extend_from_slice(&value.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&0u32.to_be_bytes());
    d
}

fn jpeg(data: &[u8], w: usize, h: usize, quality: u8, color: ColorType, app1: Option<Vec<u8>>) -> Result<Vec<u8>> {
    let (w16, h16) =
        (u16::try_from(w).context("JPEG width over 65535")?, u16::try_from(h).context("JPEG height over 65535")?);
    let mut out = Vec::with_capacity(w * h / 4);
    let mut enc = Encoder::new(&mut out, quality);
    if matches!(color, ColorType::Rgb) {
        enc.set_sampling_factor(SamplingFactor::F_2_2);
    }
    if let Some(seg) = app1 {
        enc.add_app_segment(1, seg)?;
    }
    enc.encode(data, w16, h16, color)?;
    Ok(out)
}

/// A phone's motion photo: the JPEG, then (after its end marker) the video the phone appends,
/// here an MP4 `ftyp` box and filler, as Google's and Samsung's cameras write them.
pub(crate) fn jpeg_motion_photo(rgb: &[u8], w: usize, h: usize, quality: u8, video_bytes: usize) -> Result<Vec<u8>> {
    let mut out = jpeg_rgb(rgb, w, h, quality)?;
    let mut video = Vec::with_capacity(video_bytes.max(32));
    video.extend_from_slice(&24u32.to_be_bytes());
    video.extend_from_slice(b"ftypmp42\0\0\0\0mp42isom");
    video.extend_from_slice(&((video_bytes.max(32) - 24) as u32).to_be_bytes());
    video.extend_from_slice(b"mdat");
    // Bytes that look like JPEG markers, as compressed video does.
    video.extend((0..video_bytes.max(32) - 32).map(|i| if i % 97 == 0 { 0xFF } else { (i * 31 % 251) as u8 }));
    out.extend_from_slice(&video);
    Ok(out)
}

/// Lossless WebP (the encoder the `image` crate has).
pub(crate) fn webp(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut out).write_image(rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)?;
    Ok(out)
}

pub(crate) fn png8(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        rgb,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

pub(crate) fn png16(rgb16: &[u16], w: usize, h: usize) -> Result<Vec<u8>> {
    let buf = image::ImageBuffer::<image::Rgb<u16>, &[u16]>::from_raw(w as u32, h as u32, rgb16)
        .context("16-bit buffer does not match the photo size")?;
    let mut out = Vec::new();
    buf.write_with_encoder(image::codecs::png::PngEncoder::new(&mut out))?;
    Ok(out)
}

/// Overwrites every frame header (SOFn) and Huffman table (DHT) segment, marker bytes included,
/// with garbage that contains no 0xFF. Without a frame header no decoder can even learn the
/// image size, and a decoder that resynchronises on the next marker meets a scan with no frame.
pub(crate) fn corrupt_jpeg(mut bytes: Vec<u8>, garbage: &mut impl FnMut() -> u8) -> Result<Vec<u8>> {
    let mut pos = 2;
    let mut hit = 0;
    while pos + 4 <= bytes.len() {
        if bytes[pos] != 0xFF {
            bail!("unexpected byte in JPEG header at {pos}");
        }
        let marker = bytes[pos + 1];
        if marker == 0xDA {
            break;
        }
        let len = usize::from(u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]));
        let end = (pos + 2 + len).min(bytes.len());
        let is_sof = (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof || marker == 0xC4 {
            for b in &mut bytes[pos..end] {
                *b = garbage() % 0xFF;
            }
            hit += 1;
        }
        pos = end;
    }
    if hit == 0 {
        bail!("no frame header found to corrupt");
    }
    Ok(bytes)
}

/// Cuts a JPEG inside its entropy-coded data. Byte stuffing guarantees no 0xFF 0xD9 can occur
/// before the real end marker, so the result has no end-of-image marker.
pub(crate) fn truncate_jpeg(mut bytes: Vec<u8>, fraction: f32) -> Vec<u8> {
    let keep = ((bytes.len() as f32) * fraction) as usize;
    bytes.truncate(keep.max(4));
    bytes
}
