//! SIFT-like keypoint detection and description.

use crate::{Features, Gray, Keypoint, Params};
use std::f32::consts::{PI, TAU};

/// Shorter side (in pixels) below which an octave is not built.
const MIN_OCTAVE_SIDE: usize = 16;
/// Extrema closer than this to an octave border are ignored.
const BORDER: usize = 4;
/// Blur assumed to be already present in the input image.
const INPUT_BLUR: f32 = 0.5;
/// Orientation window: samples on each side of the centre, spaced `ORI_STEP * sigma`.
const ORI_R: usize = 6;
const ORI_STEP: f32 = 0.75;
const ORI_BINS: usize = 36;
/// Descriptor: 16x16 samples spaced 0.75 sigma, i.e. 4x4 cells of 3 sigma.
const DESC_N: usize = 16;
const DESC_STEP: f32 = 0.75;

struct Octave {
    w: usize,
    h: usize,
    gauss: Vec<Vec<f32>>,
    dog: Vec<Vec<f32>>,
}

/// A keypoint together with where it lives in the scale space.
struct Candidate {
    kp: Keypoint,
    octave: usize,
    level: usize,
    xo: f32,
    yo: f32,
    sigma_o: f32,
}

pub(crate) fn extract(img: &Gray, p: &Params) -> Features {
    let (w, h) = (img.width, img.height);
    let mut out = Features { width: w, height: h, keypoints: Vec::new(), descriptors: Vec::new() };
    let s = p.scales_per_octave.max(1);
    if w.min(h) < MIN_OCTAVE_SIDE || img.pixels.len() < w * h || p.max_keypoints == 0 {
        return out;
    }
    let mut n_oct = 0;
    while n_oct < p.octaves && (w.min(h) >> n_oct) >= MIN_OCTAVE_SIDE {
        n_oct += 1;
    }
    let octaves = build_octaves(&img.pixels[..w * h], w, h, n_oct, s, p.sigma);
    let mut cands = Vec::new();
    for (o, oct) in octaves.iter().enumerate() {
        detect(oct, o, s, p, &mut cands);
    }
    let cands = select(cands, w, h, p.max_keypoints);
    let ori_w = gauss_weights(ORI_R as f32, 2 * ORI_R + 1, 1.5 / ORI_STEP);
    let desc_w = gauss_weights((DESC_N as f32 - 1.0) / 2.0, DESC_N, DESC_N as f32 / 2.0);
    for mut c in cands {
        let oct = &octaves[c.octave];
        let img = &oct.gauss[c.level];
        let angle = orientation(img, oct.w, oct.h, c.xo, c.yo, c.sigma_o, &ori_w);
        c.kp.angle = angle;
        out.descriptors.push(descriptor(img, oct.w, oct.h, c.xo, c.yo, c.sigma_o, angle, &desc_w));
        out.keypoints.push(c.kp);
    }
    out
}

/// 1-D Gaussian weights `exp(-(i - centre)^2 / (2 sigma^2))` for `i in 0..n`.
fn gauss_weights(centre: f32, n: usize, sigma: f32) -> Vec<f32> {
    (0..n).map(|i| (-(i as f32 - centre).powi(2) / (2.0 * sigma * sigma)).exp()).collect()
}

fn build_octaves(px: &[f32], w: usize, h: usize, n_oct: usize, s: usize, sigma: f32) -> Vec<Octave> {
    let k = 2f32.powf(1.0 / s as f32);
    let inc: Vec<f32> = (0..s + 3)
        .map(|i| {
            let prev = sigma * k.powi(i as i32 - 1);
            (prev * prev * (k * k - 1.0)).sqrt()
        })
        .collect();
    let first = (sigma * sigma - INPUT_BLUR * INPUT_BLUR).max(0.01).sqrt();
    let mut base = blur(px, w, h, first);
    let (mut w, mut h) = (w, h);
    let mut octaves = Vec::with_capacity(n_oct);
    for o in 0..n_oct {
        let mut gauss = Vec::with_capacity(s + 3);
        gauss.push(base);
        for &sg in &inc[1..] {
            let g = blur(gauss.last().unwrap(), w, h, sg);
            gauss.push(g);
        }
        let dog = gauss.windows(2).map(|g| g[1].iter().zip(&g[0]).map(|(a, b)| a - b).collect()).collect();
        base = Vec::new();
        if o + 1 < n_oct {
            // The level with twice the base blur, subsampled, seeds the next octave.
            let src = &gauss[s];
            let (nw, nh) = (w / 2, h / 2);
            base = (0..nw * nh).map(|i| src[(i / nw) * 2 * w + (i % nw) * 2]).collect();
        }
        octaves.push(Octave { w, h, gauss, dog });
        (w, h) = (w / 2, h / 2);
    }
    octaves
}

/// Separable Gaussian blur with clamped borders.
fn blur(src: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    let r = ((3.0 * sigma).ceil() as usize).max(1);
    let mut k = gauss_weights(r as f32, 2 * r + 1, sigma);
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    let mut tmp = vec![0.0f32; w * h];
    let mut pad = vec![0.0f32; w + 2 * r];
    for (row, out) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        for (i, p) in pad.iter_mut().enumerate() {
            *p = row[i.saturating_sub(r).min(w - 1)];
        }
        for (o, &v) in out.iter_mut().zip(&pad[r..r + w]) {
            *o = k[r] * v;
        }
        for t in 1..=r {
            for ((o, &a), &b) in out.iter_mut().zip(&pad[r - t..r - t + w]).zip(&pad[r + t..r + t + w]) {
                *o += k[r + t] * (a + b);
            }
        }
    }
    let mut dst = vec![0.0f32; w * h];
    let row = |y: usize| &tmp[y * w..(y + 1) * w];
    for (y, out) in dst.chunks_exact_mut(w).enumerate() {
        for (o, &v) in out.iter_mut().zip(row(y)) {
            *o = k[r] * v;
        }
        for t in 1..=r {
            let (a, b) = (row(y.saturating_sub(t)), row((y + t).min(h - 1)));
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o += k[r + t] * (a + b);
            }
        }
    }
    dst
}

/// Scale-space extrema (over the 26 neighbours) with |DoG| above half the contrast threshold,
/// refined and filtered by `refine`.
fn detect(oct: &Octave, o: usize, s: usize, p: &Params, out: &mut Vec<Candidate>) {
    let (w, h) = (oct.w, oct.h);
    if w <= 2 * BORDER + 2 || h <= 2 * BORDER + 2 {
        return;
    }
    let pre = 0.5 * p.contrast_threshold;
    for l in 1..=s {
        let (d0, d1, d2) = (&oct.dog[l - 1], &oct.dog[l], &oct.dog[l + 1]);
        for y in BORDER..h - BORDER {
            let (up, mid, dn) = (&d1[(y - 1) * w..y * w], &d1[y * w..(y + 1) * w], &d1[(y + 1) * w..(y + 2) * w]);
            for x in BORDER..w - BORDER {
                // Branch-free pre-test against the 4 nearest neighbours in the same level.
                let (v, a, b, c, d) = (mid[x], mid[x - 1], mid[x + 1], up[x], dn[x]);
                let hi = (v >= pre) & (v > a) & (v > b) & (v > c) & (v > d);
                let lo = (v <= -pre) & (v < a) & (v < b) & (v < c) & (v < d);
                if (hi | lo) && is_extremum(d0, d1, d2, y * w + x, w, v) {
                    out.extend(refine(oct, o, s, l, x, y, p));
                }
            }
        }
    }
}

fn is_extremum(d0: &[f32], d1: &[f32], d2: &[f32], i: usize, w: usize, v: f32) -> bool {
    let mut ok = true;
    for j in [i - w - 1, i - w + 1, i + w - 1, i + w + 1, i - w, i - 1, i, i + 1, i + w] {
        ok &= if v > 0.0 {
            d0[j] < v && d2[j] < v && (j == i || d1[j] < v)
        } else {
            d0[j] > v && d2[j] > v && (j == i || d1[j] > v)
        };
        if !ok {
            break;
        }
    }
    ok
}

/// Sub-pixel / sub-scale refinement (quadratic fit), contrast and edge rejection.
fn refine(oct: &Octave, o: usize, s: usize, l: usize, x: usize, y: usize, p: &Params) -> Option<Candidate> {
    let (w, h) = (oct.w, oct.h);
    let (mut l, mut x, mut y) = (l, x, y);
    for _ in 0..5 {
        let (d0, d1, d2) = (&oct.dog[l - 1], &oct.dog[l], &oct.dog[l + 1]);
        let i = y * w + x;
        let v = d1[i];
        let g = [0.5 * (d1[i + 1] - d1[i - 1]), 0.5 * (d1[i + w] - d1[i - w]), 0.5 * (d2[i] - d0[i])];
        let dxx = d1[i + 1] + d1[i - 1] - 2.0 * v;
        let dyy = d1[i + w] + d1[i - w] - 2.0 * v;
        let dss = d2[i] + d0[i] - 2.0 * v;
        let dxy = 0.25 * (d1[i + w + 1] - d1[i + w - 1] - d1[i - w + 1] + d1[i - w - 1]);
        let dxs = 0.25 * (d2[i + 1] - d2[i - 1] - d0[i + 1] + d0[i - 1]);
        let dys = 0.25 * (d2[i + w] - d2[i - w] - d0[i + w] + d0[i - w]);
        let hm = [[dxx, dxy, dxs], [dxy, dyy, dys], [dxs, dys, dss]];
        let off = solve3(hm, [-g[0], -g[1], -g[2]])?;
        if off.iter().all(|v| v.abs() < 0.5) {
            let contrast = v + 0.5 * (g[0] * off[0] + g[1] * off[1] + g[2] * off[2]);
            let (tr, det) = (dxx + dyy, dxx * dyy - dxy * dxy);
            let r = p.edge_ratio;
            if contrast.abs() < p.contrast_threshold || det <= 0.0 || tr * tr * r >= (r + 1.0).powi(2) * det {
                return None;
            }
            let (xo, yo) = (x as f32 + off[0], y as f32 + off[1]);
            let sigma_o = p.sigma * 2f32.powf((l as f32 + off[2]) / s as f32);
            let f = (1usize << o) as f32;
            let kp = Keypoint { x: xo * f, y: yo * f, scale: sigma_o * f, angle: 0.0, response: contrast.abs() };
            return Some(Candidate { kp, octave: o, level: l, xo, yo, sigma_o });
        }
        let step = |c: usize, d: f32| (c as f32 + d.round()) as isize;
        let (nx, ny, nl) = (step(x, off[0]), step(y, off[1]), step(l, off[2]));
        let b = BORDER as isize;
        if nl < 1 || nl > s as isize || nx < b || ny < b || nx >= (w as isize - b) || ny >= (h as isize - b) {
            return None;
        }
        (x, y, l) = (nx as usize, ny as usize, nl as usize);
    }
    None
}

/// Solve a 3x3 system by Cramer's rule.
fn solve3(m: [[f32; 3]; 3], b: [f32; 3]) -> Option<[f32; 3]> {
    let det3 = |m: &[[f32; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det3(&m);
    if d.abs() < 1e-12 || !d.is_finite() {
        return None;
    }
    let mut r = [0.0; 3];
    for (c, rc) in r.iter_mut().enumerate() {
        let mut mc = m;
        for (row, &bv) in mc.iter_mut().zip(&b) {
            row[c] = bv;
        }
        *rc = det3(&mc) / d;
    }
    r.iter().all(|v| v.is_finite()).then_some(r)
}

/// Keep the `n` strongest candidates, spread over the image: the image is cut into
/// cells, and candidates are taken by their response rank within their cell first.
fn select(mut cands: Vec<Candidate>, w: usize, h: usize, n: usize) -> Vec<Candidate> {
    cands.sort_by(|a, b| b.kp.response.total_cmp(&a.kp.response));
    if cands.len() <= n {
        return cands;
    }
    let cell = (w.max(h) as f32 / 8.0).max(1.0);
    let (gx, gy) = ((w as f32 / cell).ceil() as usize, (h as f32 / cell).ceil() as usize);
    let mut count = vec![0usize; gx * gy];
    let mut order: Vec<(usize, usize)> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let cx = ((c.kp.x / cell) as usize).min(gx - 1);
            let cy = ((c.kp.y / cell) as usize).min(gy - 1);
            let k = &mut count[cy * gx + cx];
            *k += 1;
            (*k, i)
        })
        .collect();
    order.sort_unstable();
    let mut keep = vec![false; cands.len()];
    for &(_, i) in &order[..n] {
        keep[i] = true;
    }
    let mut it = keep.into_iter();
    cands.retain(|_| it.next().unwrap_or(false));
    cands
}

/// atan2 approximation (max error about 2e-4 rad), result in `(-pi, pi]`.
fn fast_atan2(y: f32, x: f32) -> f32 {
    let (ax, ay) = (x.abs(), y.abs());
    let mx = ax.max(ay);
    if mx == 0.0 {
        return 0.0;
    }
    let a = ax.min(ay) / mx;
    let s = a * a;
    let mut r = ((-0.046_496_473 * s + 0.159_314_22) * s - 0.327_622_76) * s * a + a;
    if ay > ax {
        r = PI / 2.0 - r;
    }
    if x < 0.0 {
        r = PI - r;
    }
    if y < 0.0 { -r } else { r }
}

/// Circular bin of an angle in `[-pi, pi]` for `n` bins: (lower bin, fraction towards the next).
fn angle_bin(a: f32, n: usize) -> (usize, f32) {
    let mut b = a * (n as f32 / TAU);
    if b < 0.0 {
        b += n as f32;
    }
    let b0 = b as usize; // b >= 0: truncation is floor
    (if b0 >= n { b0 - n } else { b0 }, b - b0 as f32)
}

/// Resample an `n x n` grid of points around `(xo, yo)`, spaced `step`, rotated by `angle`
/// (bilinear interpolation, clamped at the image border).
fn sample_grid(img: &[f32], w: usize, h: usize, (xo, yo): (f32, f32), n: usize, step: f32, angle: f32) -> Vec<f32> {
    let (sn, cs) = angle.sin_cos();
    let c = (n as f32 - 1.0) / 2.0;
    let (ux, uy, vx, vy) = (cs * step, sn * step, -sn * step, cs * step);
    let reach = c * step * std::f32::consts::SQRT_2 + 1.0;
    let inside = xo - reach >= 0.0 && yo - reach >= 0.0 && xo + reach < (w - 1) as f32 && yo + reach < (h - 1) as f32;
    let (xmax, ymax) = ((w - 1) as f32, (h - 1) as f32);
    let mut out = Vec::with_capacity(n * n);
    for j in 0..n {
        let v = j as f32 - c;
        let (mut x, mut y) = (xo - c * ux + v * vx, yo - c * uy + v * vy);
        for _ in 0..n {
            let (cx, cy) = if inside { (x, y) } else { (x.max(0.0).min(xmax), y.max(0.0).min(ymax)) };
            let (x0, y0) = (cx as usize, cy as usize);
            let (fx, fy) = (cx - x0 as f32, cy - y0 as f32);
            let i = y0 * w + x0;
            let (dx, dy) = (usize::from(x0 + 1 < w), if y0 + 1 < h { w } else { 0 });
            let top = img[i] + fx * (img[i + dx] - img[i]);
            let bot = img[i + dy] + fx * (img[i + dy + dx] - img[i + dy]);
            out.push(top + fy * (bot - top));
            x += ux;
            y += uy;
        }
    }
    out
}

/// Gradient (magnitude, angle) at interior point `(i, j)` of an `n`-wide grid.
fn gradient(g: &[f32], n: usize, i: usize, j: usize) -> (f32, f32) {
    let gx = g[j * n + i + 1] - g[j * n + i - 1];
    let gy = g[(j + 1) * n + i] - g[(j - 1) * n + i];
    ((gx * gx + gy * gy).sqrt(), fast_atan2(gy, gx))
}

/// Dominant gradient orientation (peak of a smoothed 36-bin histogram).
fn orientation(img: &[f32], w: usize, h: usize, xo: f32, yo: f32, sigma: f32, wt: &[f32]) -> f32 {
    let n = 2 * ORI_R + 3;
    let g = sample_grid(img, w, h, (xo, yo), n, ORI_STEP * sigma, 0.0);
    let mut hist = [0.0f32; ORI_BINS];
    for j in 1..n - 1 {
        let dv = j.abs_diff(ORI_R + 1);
        for i in 1..n - 1 {
            let du = i.abs_diff(ORI_R + 1);
            if du * du + dv * dv > ORI_R * ORI_R {
                continue;
            }
            let (m, a) = gradient(&g, n, i, j);
            let (b0, f) = angle_bin(a, ORI_BINS);
            let m = m * wt[i - 1] * wt[j - 1];
            hist[b0] += m * (1.0 - f);
            hist[(b0 + 1) % ORI_BINS] += m * f;
        }
    }
    for _ in 0..2 {
        let src = hist;
        for (k, v) in hist.iter_mut().enumerate() {
            let at = |d: usize| src[(k + ORI_BINS - 2 + d) % ORI_BINS];
            *v = (at(0) + at(4) + 4.0 * (at(1) + at(3)) + 6.0 * at(2)) / 16.0;
        }
    }
    let (k, _) = hist.iter().enumerate().fold((0, f32::MIN), |b, (k, &v)| if v > b.1 { (k, v) } else { b });
    let (l, c, r) = (hist[(k + ORI_BINS - 1) % ORI_BINS], hist[k], hist[(k + 1) % ORI_BINS]);
    let den = l - 2.0 * c + r;
    let off = if den < 0.0 { (0.5 * (l - r) / den).clamp(-0.5, 0.5) } else { 0.0 };
    ((k as f32 + off) * TAU / ORI_BINS as f32).rem_euclid(TAU)
}

/// Spatial cell interpolation for descriptor sample `i`: (cell, weight) pairs, cells may be
/// -1 or 4 (outside, ignored).
fn cell_weights(i: usize) -> [(isize, f32); 2] {
    let c = (i as f32 + 0.5) / (DESC_N / 4) as f32 - 0.5 + 1.0; // shifted by one: always > 0
    let c0 = c as usize;
    let f = c - c0 as f32;
    [(c0 as isize - 1, 1.0 - f), (c0 as isize, f)]
}

/// 4x4x8 gradient-orientation histogram on a rotated, scaled 16x16 sample grid;
/// normalised, clipped at 0.2, then RootSIFT (L1 + sqrt), quantised to u8.
#[allow(clippy::too_many_arguments)]
fn descriptor(img: &[f32], w: usize, h: usize, xo: f32, yo: f32, sigma: f32, angle: f32, wt: &[f32]) -> [u8; 128] {
    let n = DESC_N + 2;
    let g = sample_grid(img, w, h, (xo, yo), n, DESC_STEP * sigma, angle);
    let cw: [[(isize, f32); 2]; DESC_N] = std::array::from_fn(cell_weights);
    let mut hist = [0.0f32; 128];
    for j in 0..DESC_N {
        for i in 0..DESC_N {
            let (m, a) = gradient(&g, n, i + 1, j + 1);
            let m = m * wt[i] * wt[j];
            let (o0, fo) = angle_bin(a, 8);
            let o1 = (o0 + 1) % 8;
            for (yi, wy) in cw[j] {
                for (xi, wx) in cw[i] {
                    if (0..4).contains(&yi) && (0..4).contains(&xi) {
                        let base = (yi * 4 + xi) as usize * 8;
                        let v = m * wy * wx;
                        hist[base + o0] += v * (1.0 - fo);
                        hist[base + o1] += v * fo;
                    }
                }
            }
        }
    }
    let l2 = hist.iter().map(|v| v * v).sum::<f32>().sqrt();
    let mut out = [0u8; 128];
    if l2 <= 1e-12 {
        return out;
    }
    hist.iter_mut().for_each(|v| *v = (*v / l2).min(0.2));
    let l1: f32 = hist.iter().sum();
    for (o, v) in out.iter_mut().zip(&hist) {
        *o = ((v / l1).sqrt() * 512.0 + 0.5).min(255.0) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atan2_accuracy() {
        for k in 0..3600 {
            let t = k as f32 * TAU / 3600.0 - PI + 1e-4;
            let (y, x) = (t.sin() * 3.0, t.cos() * 3.0);
            assert!((fast_atan2(y, x) - y.atan2(x)).abs() < 3e-4, "{t}");
        }
    }

    #[test]
    fn blur_preserves_constant() {
        let img = vec![0.25f32; 20 * 7];
        assert!(blur(&img, 20, 7, 2.3).iter().all(|v| (v - 0.25).abs() < 1e-5));
    }
}
