//! No-reference image-quality metrics.
//!
//! All metrics are computed on the luma of the upright image after it has been shrunk to fit
//! within [`ANALYSIS_SIDE`](super::ANALYSIS_SIDE)² (smaller images are used as they are). Fixing
//! the analysis scale is what makes sharpness and noise comparable across cameras: measured at
//! full resolution, a 24 MP frame would look blurrier per pixel than the same scene at 4 MP.
//! Shrinking also averages pixels, so `noise` reports the noise that survives at that scale,
//! which for large photos is below the sensor's per-pixel noise.

use fast_image_resize::PixelType;

use super::decode::resize_plane;
use super::{RgbImage, VisionError};

/// Luma threshold at or below which a pixel counts as crushed black.
const DARK_CLIP: f32 = 5.0;
/// Luma threshold at or above which a pixel counts as blown-out white.
const BRIGHT_CLIP: f32 = 250.0;
/// Width the saliency map for `subject_fraction` is computed at.
const SALIENCY_WIDTH: u32 = 128;
/// Smallest luma deviation from the row median that counts as salient.
const SALIENCY_MIN_DEVIATION: f32 = 25.0;

/// Quality metrics of one photo; see the module docs for the scale they are measured at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// Variance of the 4-neighbour Laplacian of luma (0..255 units); higher = sharper.
    pub sharpness: f64,
    /// Mean luma / 255.
    pub brightness: f64,
    /// Fraction of pixels with luma <= 5.
    pub clipped_dark: f64,
    /// Fraction of pixels with luma >= 250.
    pub clipped_bright: f64,
    /// Standard deviation of luma / 255.
    pub contrast: f64,
    /// Immerkær's fast estimate of the noise sigma, in luma units (0..255).
    pub noise: f64,
    /// Stand-in "is there a subject" score until a real detector exists: area fraction of the
    /// largest 4-connected blob of salient pixels.
    ///
    /// Computed on a copy about 128 px wide. A pixel is salient when its luma differs from the
    /// median of its row by more than max(25, 3·MAD of that row); row statistics adapt to
    /// vertical gradients such as sky over sea. The mask is then opened with a 3×3 square to
    /// drop speckle. A dark whale fluke against sea or sky yields one large blob; empty sea with
    /// waves and small splashes yields only tiny ones.
    pub subject_fraction: f64,
}

/// Luma plane, Y = 0.299 R + 0.587 G + 0.114 B, in 0..255: exact values for the metrics and a
/// rounded 8-bit copy for the resizes behind `subject_fraction` and the perceptual hash.
pub(super) struct Luma {
    pub(super) width: u32,
    pub(super) height: u32,
    values: Vec<f32>,
    bytes: Vec<u8>,
}

impl Luma {
    pub(super) fn from_rgb(rgb: &RgbImage) -> Self {
        let values: Vec<f32> = rgb
            .as_raw()
            .chunks_exact(3)
            .map(|p| 0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]))
            .collect();
        // Luma is within 0..=255 (the weights sum to 1), so adding 0.5 and truncating rounds.
        let bytes = values.iter().map(|&v| (v + 0.5) as u8).collect();
        Luma {
            width: rgb.width(),
            height: rgb.height(),
            values,
            bytes,
        }
    }

    /// The 8-bit copy shrunk (bilinear, area-aware) to `target`.
    pub(super) fn resized_u8(&self, target: (u32, u32)) -> Result<Vec<u8>, VisionError> {
        if (self.width, self.height) == target {
            return Ok(self.bytes.clone());
        }
        resize_plane(
            &self.bytes,
            (self.width, self.height),
            PixelType::U8,
            target,
        )
    }
}

impl Quality {
    pub(super) fn measure(luma: &Luma) -> Result<Quality, VisionError> {
        let n = luma.values.len().max(1) as f64;
        let (mut sum, mut sum_sq, mut dark, mut bright) = (0.0f64, 0.0f64, 0usize, 0usize);
        for &v in &luma.values {
            sum += f64::from(v);
            sum_sq += f64::from(v) * f64::from(v);
            dark += usize::from(v <= DARK_CLIP);
            bright += usize::from(v >= BRIGHT_CLIP);
        }
        let mean = sum / n;
        let variance = (sum_sq / n - mean * mean).max(0.0);
        let (sharpness, noise) = sharpness_and_noise(luma);
        Ok(Quality {
            sharpness,
            brightness: mean / 255.0,
            clipped_dark: dark as f64 / n,
            clipped_bright: bright as f64 / n,
            contrast: variance.sqrt() / 255.0,
            noise,
            subject_fraction: subject_fraction(luma)?,
        })
    }
}

/// Both 3×3 filters over interior pixels, in one pass.
///
/// Sharpness: variance of the 4-neighbour Laplacian L = 4·c − up − down − left − right.
///
/// Noise: J. Immerkær, "Fast Noise Variance Estimation" (1996). The mask
/// [[1,-2,1],[-2,4,-2],[1,-2,1]] is the difference of two Laplacians, so it cancels image
/// structure up to second order and leaves mostly noise;
/// sigma = sqrt(π/2) / (6 (W−2)(H−2)) · Σ|I ∗ N|.
fn sharpness_and_noise(luma: &Luma) -> (f64, f64) {
    let (w, h) = (luma.width as usize, luma.height as usize);
    if w < 3 || h < 3 {
        return (0.0, 0.0);
    }
    let (mut lap_sum, mut lap_sq, mut abs_sum) = (0.0f64, 0.0f64, 0.0f64);
    for rows in luma.values.chunks_exact(w).collect::<Vec<_>>().windows(3) {
        let (up, mid, down) = (rows[0], rows[1], rows[2]);
        // Per-row f32 partial sums keep the inner loop cheap; a row is at most 512 wide, far
        // below where f32 accumulation loses meaningful precision.
        let (mut ls, mut lq, mut a) = (0.0f32, 0.0f32, 0.0f32);
        for x in 1..w - 1 {
            let lap = 4.0 * mid[x] - up[x] - down[x] - mid[x - 1] - mid[x + 1];
            ls += lap;
            lq += lap * lap;
            let r = (up[x - 1] + up[x + 1] + down[x - 1] + down[x + 1])
                - 2.0 * (up[x] + down[x] + mid[x - 1] + mid[x + 1])
                + 4.0 * mid[x];
            a += r.abs();
        }
        lap_sum += f64::from(ls);
        lap_sq += f64::from(lq);
        abs_sum += f64::from(a);
    }
    let n = ((w - 2) * (h - 2)) as f64;
    let mean = lap_sum / n;
    let sharpness = (lap_sq / n - mean * mean).max(0.0);
    let noise = std::f64::consts::FRAC_PI_2.sqrt() * abs_sum / (6.0 * n);
    (sharpness, noise)
}

/// Median of samples below 512 by histogram: O(n), no sorting or scratch copies.
fn median(values: impl Iterator<Item = u16>) -> f32 {
    let mut hist = [0u32; 512];
    let mut n = 0u32;
    for v in values {
        hist[usize::from(v)] += 1;
        n += 1;
    }
    // The k-th smallest (0-based) sample.
    let kth = |k: u32| {
        let mut seen = 0;
        for (value, &count) in hist.iter().enumerate() {
            seen += count;
            if seen > k {
                return value as f32;
            }
        }
        511.0
    };
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        kth(n / 2)
    } else {
        (kth(n / 2 - 1) + kth(n / 2)) / 2.0
    }
}

/// See [`Quality::subject_fraction`].
fn subject_fraction(luma: &Luma) -> Result<f64, VisionError> {
    let (w, h) = if luma.width > SALIENCY_WIDTH {
        let h =
            (f64::from(luma.height) * f64::from(SALIENCY_WIDTH) / f64::from(luma.width)).round();
        (SALIENCY_WIDTH, (h as u32).max(1))
    } else {
        (luma.width, luma.height)
    };
    let small = luma.resized_u8((w, h))?;
    let (w, h) = (w as usize, h as usize);

    let mut salient = vec![false; w * h];
    for (pixels, out) in small.chunks_exact(w).zip(salient.chunks_exact_mut(w)) {
        // Work in doubled units: the median of an even count of integers may end in .5, and
        // doubling keeps it and the deviations from it exact integers below 512.
        let med2 = (2.0 * median(pixels.iter().map(|&p| u16::from(p)))) as u16;
        let dev2 = |p: u8| (2 * u16::from(p)).abs_diff(med2);
        let mad2 = median(pixels.iter().map(|&p| dev2(p)));
        let threshold2 = (2.0 * SALIENCY_MIN_DEVIATION).max(3.0 * mad2);
        for (o, &p) in out.iter_mut().zip(pixels) {
            *o = f32::from(dev2(p)) > threshold2;
        }
    }

    // Opening (erode then dilate) removes blobs thinner than 3 px while restoring the outline
    // of larger ones. Out-of-frame neighbours are ignored, so a subject cut by the frame edge is
    // not eaten away from that side.
    let eroded = morph(&salient, w, h, true);
    let opened = morph(&eroded, w, h, false);

    Ok(largest_component(&opened, w, h) as f64 / (w * h).max(1) as f64)
}

/// 3×3 erosion (`erode`: every in-frame neighbour set) or dilation (any set), done separably
/// as a 1×3 pass along rows then a 3×1 pass along columns.
fn morph(mask: &[bool], w: usize, h: usize, erode: bool) -> Vec<bool> {
    let combine = |a: bool, b: bool| if erode { a && b } else { a || b };
    let mut rows = vec![false; w * h];
    for (src, dst) in mask.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        for x in 0..w {
            let mut v = src[x];
            if x > 0 {
                v = combine(v, src[x - 1]);
            }
            if x + 1 < w {
                v = combine(v, src[x + 1]);
            }
            dst[x] = v;
        }
    }
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut v = rows[y * w + x];
            if y > 0 {
                v = combine(v, rows[(y - 1) * w + x]);
            }
            if y + 1 < h {
                v = combine(v, rows[(y + 1) * w + x]);
            }
            out[y * w + x] = v;
        }
    }
    out
}

/// Pixel count of the largest 4-connected set of `true` pixels.
fn largest_component(mask: &[bool], w: usize, h: usize) -> usize {
    let mut seen = vec![false; w * h];
    let mut stack = Vec::new();
    let mut best = 0;
    for start in 0..w * h {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        best = best.max(size);
    }
    best
}
