//! Renders one survey photo: sky, horizon and perspective sea, the fluke warped in from its
//! sprite, water streaming off it, then camera effects (blur, exposure, colour cast, vignette,
//! sensor noise). Everything is drawn from the photo's own RNG.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::fluke::{Sprite, U_EXTENT, V_LO};
use super::noise::{GRAIN_LEN, Textures, floor_i, lerp, lerp3, mix64, smoothstep, uni};

/// Planar linear-ish RGB in [0, 1]; planar keeps the blur passes simple and vectorisable.
pub(crate) struct Canvas {
    w: usize,
    h: usize,
    ch: [Vec<f32>; 3],
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self { w, h, ch: [vec![0.0; w * h], vec![0.0; w * h], vec![0.0; w * h]] }
    }

    /// Reuses the allocation: every pass overwrites all samples, so stale contents are harmless,
    /// and keeping ~30 MB alive avoids faulting fresh zeroed pages in for every photo.
    fn reset(&mut self, w: usize, h: usize) {
        self.w = w;
        self.h = h;
        for plane in &mut self.ch {
            plane.resize(w * h, 0.0);
        }
    }

    #[inline]
    fn blend(&mut self, i: usize, col: [f32; 3], a: f32) {
        for (c, plane) in self.ch.iter_mut().enumerate() {
            let p = &mut plane[i];
            *p += (col[c] - *p) * a;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Exposure {
    Normal,
    Over,
    Under,
}

pub(crate) struct Request<'a> {
    pub(crate) w: usize,
    pub(crate) h: usize,
    /// None renders an empty sea (with the splash of a whale that already dived).
    pub(crate) sprite: Option<&'a Sprite>,
    pub(crate) heavy_blur: bool,
    pub(crate) exposure: Exposure,
    pub(crate) want16: bool,
}

pub(crate) struct Photo<'a> {
    /// Interleaved RGB, 8 bits.
    pub(crate) rgb8: &'a [u8],
    /// Interleaved RGB, 16 bits, when requested (quantised from the float canvas, not from rgb8).
    pub(crate) rgb16: Option<Vec<u16>>,
    /// Fluke box in pixels, [x0, y0, x1, y1) over pixels at least half covered by the fluke.
    pub(crate) bbox: Option<[u32; 4]>,
}

struct Scene {
    w: f32,
    h: f32,
    cx: f32,
    horizon: f32,
    roll: f32,
    sky_top: [f32; 3],
    sky_hor: [f32; 3],
    cloud_col: [f32; 3],
    cloud_amt: f32,
    cloud_thr: f32,
    cloud_scale: (f32, f32),
    cloud_off: (f32, f32),
    sea_deep: [f32; 3],
    sea_far: [f32; 3],
    wave_g: f32,
    focal: f32,
    wave_rot: (f32, f32),
    wave_off: (f32, f32),
    wave_contrast: f32,
    sun_x: f32,
    /// Sun height above the horizon (may be above the frame), for the glow in the sky.
    sun_y: f32,
    sun_w: f32,
    /// Hazy glow around the sun.
    glare: f32,
    /// Broad brightening of the sea under the sun (the sun path), beneath the sparkle.
    sheen: f32,
    glint: f32,
    glint_thr: f32,
    /// Brightness of the sea in the foreground relative to its deep colour.
    near_tone: f32,
    /// Overall daylight level, which also lights the fluke and the foam.
    ambient: f32,
    foam: [f32; 3],
}

const SKY_PALETTES: [([f32; 3], [f32; 3]); 4] = [
    ([0.28, 0.48, 0.78], [0.74, 0.83, 0.92]),
    ([0.50, 0.54, 0.60], [0.79, 0.81, 0.83]),
    ([0.44, 0.54, 0.68], [0.90, 0.87, 0.80]),
    ([0.36, 0.44, 0.55], [0.66, 0.70, 0.74]),
];

const SEA_PALETTES: [[f32; 3]; 3] = [[0.03, 0.12, 0.20], [0.05, 0.15, 0.17], [0.07, 0.10, 0.14]];

impl Scene {
    fn draw(rng: &mut ChaCha8Rng, w: usize, h: usize) -> Self {
        let (wf, hf) = (w as f32, h as f32);
        let p0 = rng.random_range(0..SKY_PALETTES.len());
        let p1 = rng.random_range(0..SKY_PALETTES.len());
        let t = uni(rng, 0.0, 1.0);
        let bright = uni(rng, 0.92, 1.08);
        let sky_top = lerp3(SKY_PALETTES[p0].0, SKY_PALETTES[p1].0, t).map(|c| c * bright);
        let sky_hor = lerp3(SKY_PALETTES[p0].1, SKY_PALETTES[p1].1, t).map(|c| (c * bright).min(0.97));
        let sky_lum = (sky_hor[0] + sky_hor[1] + sky_hor[2]) / 3.0;
        let ambient = 0.75 + 0.45 * sky_lum * bright;
        let s0 = rng.random_range(0..SEA_PALETTES.len());
        let s1 = rng.random_range(0..SEA_PALETTES.len());
        let sea_deep = lerp3(SEA_PALETTES[s0], SEA_PALETTES[s1], uni(rng, 0.0, 1.0)).map(|c| c * (0.7 + 0.6 * sky_lum));
        let sea_far = lerp3(sea_deep.map(|c| c * 1.4), sky_hor.map(|c| c * 0.72), uni(rng, 0.3, 0.55));
        let overcast = p0 == 1 || p1 == 1;
        let cloud_amt = uni(rng, 0.0, 0.9);
        let cloud_sx = 256.0 / (wf * uni(rng, 0.4, 1.2));
        let angle = uni(rng, 0.0, std::f32::consts::TAU);
        let cloud_tone = bright * uni(rng, 0.85, 1.0);
        Self {
            w: wf,
            h: hf,
            cx: wf / 2.0,
            // A wide spread of horizon heights, tilts and light makes photos differ in their
            // overall layout too, not only in detail (perceptual hashes look at the layout).
            horizon: hf * uni(rng, 0.14, 0.55),
            roll: uni(rng, -0.05, 0.05),
            sky_top,
            sky_hor,
            cloud_col: [0.93, 0.94, 0.95].map(|c| c * cloud_tone),
            cloud_amt,
            cloud_thr: uni(rng, -0.25, 0.3),
            cloud_scale: (cloud_sx, cloud_sx * uni(rng, 2.0, 4.0)),
            cloud_off: (uni(rng, 0.0, 256.0), uni(rng, 0.0, 256.0)),
            sea_deep,
            sea_far,
            wave_g: uni(rng, 90.0, 320.0),
            focal: wf * uni(rng, 0.8, 1.6),
            wave_rot: (angle.cos(), angle.sin()),
            wave_off: (uni(rng, 0.0, 512.0), uni(rng, 0.0, 512.0)),
            wave_contrast: uni(rng, 0.45, 1.1),
            sun_x: wf * uni(rng, -0.2, 1.2),
            sun_y: hf * uni(rng, 0.1, 0.8),
            sun_w: wf * uni(rng, 0.12, 0.45),
            glare: if overcast { uni(rng, 0.0, 0.12) } else { uni(rng, 0.0, 0.35) },
            sheen: if overcast { uni(rng, 0.0, 0.1) } else { uni(rng, 0.0, 0.3) },
            glint: if overcast { uni(rng, 0.0, 0.3) } else { uni(rng, 0.2, 1.2) },
            glint_thr: uni(rng, 0.45, 0.8),
            near_tone: uni(rng, 0.7, 1.3),
            ambient,
            foam: [0.90, 0.93, 0.95].map(|c| c * ambient.min(1.05)),
        }
    }

    #[inline]
    fn tilted_y(&self, px: f32, py: f32) -> f32 {
        py - (px - self.cx) * self.roll
    }
}

/// Paints sky and sea at half resolution: they are smooth enough that a 2× bilinear upsample is
/// invisible after lens softness and JPEG, and it makes the background four times cheaper. The
/// fluke, foam and droplets are drawn afterwards at full resolution.
fn paint_background(sc: &Scene, tex: &Textures, small: &mut Canvas, full: &mut Canvas) {
    small.reset(full.w.div_ceil(2), full.h.div_ceil(2));
    paint_sky_and_sea(small, sc, tex);
    upsample2(small, full);
}

/// Doubles the size with the fixed 1/4, 3/4 bilinear weights of an exact 2× scale; vertical
/// first on the small rows so that every full-size sample is written exactly once.
fn upsample2(small: &Canvas, out: &mut Canvas) {
    let (ws, hs, w, h) = (small.w, small.h, out.w, out.h);
    let mut tmp = vec![0.0f32; ws];
    for (plane, dst) in small.ch.iter().zip(out.ch.iter_mut()) {
        for y in 0..h {
            let j = y / 2;
            let nb = if y % 2 == 0 { j.saturating_sub(1) } else { (j + 1).min(hs - 1) };
            let (a, b) = (&plane[j * ws..(j + 1) * ws], &plane[nb * ws..(nb + 1) * ws]);
            for i in 0..ws {
                tmp[i] = 0.75 * a[i] + 0.25 * b[i];
            }
            let row = &mut dst[y * w..(y + 1) * w];
            // Output pair (2i, 2i+1) sits a quarter pixel either side of small sample i.
            let mut pairs = row.chunks_exact_mut(2);
            if ws >= 3 {
                if let Some(p) = pairs.next() {
                    p[0] = tmp[0];
                    p[1] = 0.75 * tmp[0] + 0.25 * tmp[1];
                }
                for (p, t) in (&mut pairs).zip(tmp.windows(3)) {
                    p[0] = 0.75 * t[1] + 0.25 * t[0];
                    p[1] = 0.75 * t[1] + 0.25 * t[2];
                }
            }
            // Edges (and degenerate widths) with clamped neighbours.
            let start = if ws >= 3 { ws - 1 } else { 0 };
            for i in start..ws {
                let c = 0.75 * tmp[i];
                let l = tmp[i.saturating_sub(1)];
                let r = tmp[(i + 1).min(ws - 1)];
                row[2 * i] = c + 0.25 * l;
                if 2 * i + 1 < w {
                    row[2 * i + 1] = c + 0.25 * r;
                }
            }
        }
    }
}

/// Renders into `cv`, whose pixel (x, y) is centred on full-resolution point (2x + 1, 2y + 1).
fn paint_sky_and_sea(cv: &mut Canvas, sc: &Scene, tex: &Textures) {
    let (w, h) = (cv.w, cv.h);
    let sea_h = (sc.h - sc.horizon).max(1.0);
    let path: Vec<f32> = (0..w)
        .map(|x| {
            let t = (2.0 * x as f32 + 1.0 - sc.sun_x) / sc.sun_w;
            (-t * t).exp()
        })
        .collect();
    let deep_near = sc.sea_deep.map(|c| c * sc.near_tone);
    let sun_y = sc.horizon - sc.sun_y;
    let glare_r2 = 1.0 / (2.25 * sc.sun_w * sc.sun_w);
    let fg = sc.focal * sc.wave_g;
    let top_lod = tex.waves.len() as i32 - 1;
    let (rc, rs) = sc.wave_rot;
    let [r, g, b] = &mut cv.ch;
    for y in 0..h {
        let py = 2.0 * y as f32 + 1.0;
        let row = y * w;
        for x in 0..w {
            let px = 2.0 * x as f32 + 1.0;
            let yy = sc.tilted_y(px, py);
            let d = yy - sc.horizon;
            let sky = |yy: f32| {
                let t = (yy / sc.horizon).clamp(0.0, 1.0);
                let base = lerp3(sc.sky_top, sc.sky_hor, t * (2.0 - t));
                // Clouds thin out towards the horizon, where haze takes over.
                let n =
                    tex.blobs.sample(px * sc.cloud_scale.0 + sc.cloud_off.0, yy * sc.cloud_scale.1 + sc.cloud_off.1);
                let k = smoothstep(sc.cloud_thr, sc.cloud_thr + 0.45, n) * sc.cloud_amt * (1.0 - 0.5 * t);
                let c = lerp3(base, sc.cloud_col.map(|v| v * (0.82 + 0.25 * n)), k);
                let (dx, dy) = (px - sc.sun_x, yy - sun_y);
                let glow = sc.glare / (1.0 + (dx * dx + dy * dy) * glare_r2);
                [c[0] + glow, c[1] + glow, c[2] + 0.9 * glow]
            };
            let sea = |d: f32| {
                let dd = d.max(0.5);
                let inv = 1.0 / dd;
                let zt = fg * inv;
                let xt = (px - sc.cx) * sc.wave_g * inv;
                let tu = rc * xt - rs * zt + sc.wave_off.0;
                let tv = rs * xt + rc * zt + sc.wave_off.1;
                // Texels per (half-resolution) pixel grow towards the horizon: pick the mip level
                // from the footprint's exponent bits, and fade out what even the coarsest level
                // cannot resolve, which doubles as atmospheric haze.
                let fp = 2.0 * fg * inv * inv;
                let lod = ((fp.to_bits() >> 23) as i32 - 127).clamp(0, top_lod);
                let scale = 1.0 / (1u32 << lod) as f32;
                let far = fp * (1.0 / 48.0);
                let fade = 1.0 / (1.0 + far * far);
                let sv = tex.waves[lod as usize].sample(tu * scale, tv * scale) * fade * sc.wave_contrast;
                let t = (d / (0.6 * sea_h)).clamp(0.0, 1.0);
                let base = lerp3(sc.sea_far, deep_near, t * (2.0 - t));
                let lift = 1.0 + 0.55 * sv;
                let refl = 0.12 * sv.max(0.0) + sc.sheen * path[x] * (1.0 - 0.6 * t);
                let gl = (sv - sc.glint_thr).max(0.0) * sc.glint * path[x] * 5.0;
                [
                    base[0] * lift + refl * sc.sky_hor[0] + gl,
                    base[1] * lift + refl * sc.sky_hor[1] + gl,
                    base[2] * lift + refl * sc.sky_hor[2] + gl,
                ]
            };
            let c = if d <= -1.0 {
                sky(yy)
            } else if d >= 1.0 {
                sea(d)
            } else {
                // A blend over the pixel's footprint keeps the horizon anti-aliased at any roll.
                lerp3(sky(yy.min(sc.horizon)), sea(1.0), (d + 1.0) * 0.5)
            };
            r[row + x] = c[0];
            g[row + x] = c[1];
            b[row + x] = c[2];
        }
    }
}

/// A foam patch: an elliptical falloff broken up by blob noise, so no two patches look alike.
struct Foam {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    strength: f32,
    /// Offset into the blob texture.
    off: (f32, f32),
}

impl Foam {
    /// Draws its noise offset from the RNG, so callers only say where and how big.
    fn new(rng: &mut ChaCha8Rng, cx: f32, cy: f32, rx: f32, ry: f32, strength: f32) -> Self {
        Self { cx, cy, rx, ry, strength, off: (uni(rng, 0.0, 256.0), uni(rng, 0.0, 256.0)) }
    }
}

fn foam_patch(cv: &mut Canvas, tex: &Textures, sc: &Scene, f: &Foam) {
    let Foam { cx, cy, rx, ry, strength, off } = *f;
    if rx < 0.5 || ry < 0.3 {
        return;
    }
    let x0 = (cx - rx).floor().max(0.0) as usize;
    let x1 = ((cx + rx).ceil().max(0.0) as usize).min(cv.w);
    let y0 = (cy - ry).floor().max(0.0) as usize;
    let y1 = ((cy + ry).ceil().max(0.0) as usize).min(cv.h);
    let fs = 160.0 / rx;
    for y in y0..y1 {
        let dy = (y as f32 + 0.5 - cy) / ry;
        for x in x0..x1 {
            let dx = (x as f32 + 0.5 - cx) / rx;
            let q = dx * dx + dy * dy;
            if q >= 1.0 {
                continue;
            }
            let n = tex.blobs.sample((x as f32) * fs + off.0, (y as f32) * fs * 2.0 + off.1);
            // Translucent, lacy edges around a denser core; brightness varies with the bubbles.
            let a = strength * smoothstep(0.0, 0.6, 1.3 * n + 0.9 * (1.0 - q) - 0.4);
            if a > 0.0 {
                let lum = 0.85 + 0.3 * n;
                cv.blend(y * cv.w + x, sc.foam.map(|c| c * lum), a);
            }
        }
    }
}

fn disc(cv: &mut Canvas, cx: f32, cy: f32, r: f32, col: [f32; 3], alpha: f32) {
    let x0 = (cx - r - 1.0).floor().max(0.0) as usize;
    let x1 = ((cx + r + 1.0).ceil().max(0.0) as usize).min(cv.w);
    let y0 = (cy - r - 1.0).floor().max(0.0) as usize;
    let y1 = ((cy + r + 1.0).ceil().max(0.0) as usize).min(cv.h);
    for y in y0..y1 {
        for x in x0..x1 {
            let dx = x as f32 + 0.5 - cx;
            let dy = y as f32 + 0.5 - cy;
            let k = (r - (dx * dx + dy * dy).sqrt() + 0.5).clamp(0.0, 1.0);
            if k > 0.0 {
                cv.blend(y * cv.w + x, col, alpha * k);
            }
        }
    }
}

/// A falling stream of water: a thin ribbon under the edge it pours from that tapers, breaks
/// up into drops lower down and fades before reaching the sea.
struct Stream {
    x0: f32,
    y0: f32,
    y1: f32,
    width: f32,
    alpha: f32,
    /// Sideways pixels per pixel of fall (wind).
    drift: f32,
    /// Where in the blob texture its break-up pattern comes from.
    key: f32,
}

fn stream(cv: &mut Canvas, tex: &Textures, sc: &Scene, s: &Stream) {
    let Stream { x0, y0, y1, width, alpha, drift, key } = *s;
    let ys = y0.max(0.0) as usize;
    let ye = (y1.max(0.0) as usize).min(cv.h);
    let len = (y1 - y0).max(1.0);
    for y in ys..ye {
        let t = (y as f32 - y0) / len;
        let xc = x0 + drift * (y as f32 - y0);
        let n = tex.blobs.sample(key, y as f32 * (12.0 / width.max(1.0)) + key);
        let a = alpha * smoothstep(-0.3 + 0.6 * t, 0.0 + 0.6 * t, n) * (1.0 - t) * (1.0 - t);
        if a <= 0.0 {
            continue;
        }
        let wd = width * (1.0 - 0.5 * t);
        let xs = (xc - wd - 1.0).floor().max(0.0) as usize;
        let xe = ((xc + wd + 1.0).ceil().max(0.0) as usize).min(cv.w);
        for x in xs..xe {
            let k = (wd - (x as f32 + 0.5 - xc).abs() + 0.5).clamp(0.0, 1.0);
            if k > 0.0 {
                cv.blend(y * cv.w + x, sc.foam, a * k);
            }
        }
    }
}

fn whitecaps(cv: &mut Canvas, tex: &Textures, sc: &Scene, rng: &mut ChaCha8Rng) {
    let n = rng.random_range(0..7usize);
    for _ in 0..n {
        let t = uni(rng, 0.15, 1.0);
        let cy = sc.horizon + t * (sc.h - sc.horizon);
        let cx = uni(rng, 0.0, sc.w);
        // Perspective: caps near the camera are larger and taller.
        let rx = sc.w * uni(rng, 0.01, 0.035) * t;
        let (ry, strength) = (rx * uni(rng, 0.12, 0.3), uni(rng, 0.4, 0.85));
        let foam = Foam::new(rng, cx, cy, rx, ry, strength);
        foam_patch(cv, tex, sc, &foam);
    }
}

type Mat3 = [f32; 9];

fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut m = [0.0; 9];
    for r in 0..3 {
        for c in 0..3 {
            m[r * 3 + c] = (0..3).map(|k| a[r * 3 + k] * b[k * 3 + c]).sum();
        }
    }
    m
}

fn invert(m: &Mat3) -> Mat3 {
    let det =
        m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6]) + m[2] * (m[3] * m[7] - m[4] * m[6]);
    let id = 1.0 / det;
    [
        (m[4] * m[8] - m[5] * m[7]) * id,
        (m[2] * m[7] - m[1] * m[8]) * id,
        (m[1] * m[5] - m[2] * m[4]) * id,
        (m[5] * m[6] - m[3] * m[8]) * id,
        (m[0] * m[8] - m[2] * m[6]) * id,
        (m[2] * m[3] - m[0] * m[5]) * id,
        (m[3] * m[7] - m[4] * m[6]) * id,
        (m[1] * m[6] - m[0] * m[7]) * id,
        (m[0] * m[4] - m[1] * m[3]) * id,
    ]
}

#[inline]
fn apply(m: &Mat3, u: f32, v: f32) -> (f32, f32) {
    let x = m[0] * u + m[1] * v + m[2];
    let y = m[3] * u + m[4] * v + m[5];
    let w = m[6] * u + m[7] * v + m[8];
    (x / w, y / w)
}

/// Where and how one photo shows the fluke: a homography from fluke units to pixels (scale,
/// in-plane roll, yaw foreshortening with a little perspective, pitch), plus the water line.
struct Pose {
    fwd: Mat3,
    inv: Mat3,
    screen_ppu: f32,
    water_y: f32,
    wob_amp: f32,
    wob_k: f32,
    wob_phase: f32,
    width_px: f32,
}

impl Pose {
    fn choose(sp: &Sprite, sc: &Scene, rng: &mut ChaCha8Rng) -> Self {
        let roll = uni(rng, -15.0, 15.0).to_radians();
        let yaw = uni(rng, -35.0, 35.0).to_radians();
        let pitch = uni(rng, 0.8, 1.05);
        let persp = 0.16 * yaw.sin();
        let target = sc.w * uni(rng, 0.25, 0.6);
        let emerge = uni(rng, 0.06, 0.3);
        let (fx, fy) = (uni(rng, 0.0, 1.0), uni(rng, 0.0, 1.0));
        let p: Mat3 = [yaw.cos(), 0.0, 0.0, 0.0, pitch, 0.0, persp, 0.0, 1.0];
        let r: Mat3 = [roll.cos(), -roll.sin(), 0.0, roll.sin(), roll.cos(), 0.0, 0.0, 0.0, 1.0];
        let rp = mul(&r, &p);
        let extents = |m: &Mat3| {
            let (mut x0, mut x1, mut y0, mut ylow) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
            for &(u, te, le) in &sp.outline {
                let (xa, ya) = apply(m, u, te);
                let (xb, yb) = apply(m, u, le);
                x0 = x0.min(xa).min(xb);
                x1 = x1.max(xa).max(xb);
                y0 = y0.min(ya).min(yb);
                ylow = ylow.max(ya).max(yb);
            }
            (x0, x1, y0, ylow)
        };
        let flip: Mat3 = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0];
        let unit = mul(&flip, &rp);
        let (ux0, ux1, _, _) = extents(&unit);
        let mut k = target / (ux1 - ux0).max(1e-3);
        let margin_x = 0.02 * sc.w;
        let margin_top = 0.02 * sc.h;
        let margin_bottom = 0.04 * sc.h;
        // Shrink until the whole fluke fits in the frame with its base on the sea; small or
        // unusually tall frames need it, normal ones almost never do.
        let (mut tx, mut ty, mut water_rel) = (0.0, 0.0, 0.0);
        for _ in 0..40 {
            let s: Mat3 = [k, 0.0, 0.0, 0.0, -k, 0.0, 0.0, 0.0, 1.0];
            let (x0, x1, y0, ylow) = extents(&mul(&s, &rp));
            water_rel = ylow + emerge * k;
            let (tx_lo, tx_hi) = (margin_x - x0, sc.w - margin_x - x1);
            let ty_lo = (margin_top - y0).max(sc.horizon + 0.04 * sc.h + 0.02 * sc.w * sc.roll.abs() - water_rel);
            let ty_hi = sc.h - margin_bottom - water_rel;
            // Should it never fit (absurd aspect ratios), the last, smallest try is centred
            // on its ranges rather than left at the origin.
            let fits = tx_lo <= tx_hi && ty_lo <= ty_hi;
            tx = if fits { lerp(tx_lo, tx_hi, fx) } else { (tx_lo + tx_hi) * 0.5 };
            ty = if fits { lerp(ty_lo, ty_hi, fy) } else { (ty_lo + ty_hi) * 0.5 };
            if fits {
                break;
            }
            k *= 0.9;
        }
        let s: Mat3 = [k, 0.0, tx, 0.0, -k, ty, 0.0, 0.0, 1.0];
        let fwd = mul(&s, &rp);
        let wob_amp = k * uni(rng, 0.004, 0.015);
        Self {
            fwd,
            inv: invert(&fwd),
            screen_ppu: k,
            water_y: water_rel + ty,
            wob_amp,
            wob_k: uni(rng, 8.0, 25.0) / k,
            wob_phase: uni(rng, 0.0, std::f32::consts::TAU),
            width_px: (ux1 - ux0) * k,
        }
    }

    #[inline]
    fn water_at(&self, x: f32) -> f32 {
        self.water_y + self.wob_amp * (self.wob_k * x + self.wob_phase).sin()
    }
}

fn draw_fluke(
    cv: &mut Canvas,
    sp: &Sprite,
    pose: &Pose,
    sc: &Scene,
    tex: &Textures,
    rng: &mut ChaCha8Rng,
) -> Option<[u32; 4]> {
    let lvl = sp.level_for(pose.screen_ppu);
    let amb = sc.ambient * uni(rng, 0.85, 1.1);
    let dark = [0.05, 0.055, 0.065].map(|c| c * amb * uni(rng, 0.8, 1.25));
    let white = [0.8, 0.82, 0.83].map(|c| c * amb);
    // Light falls across the raised fluke from one side; a gentle gradient sells the 3-D form.
    let gx = uni(rng, -0.25, 0.25) / pose.width_px;
    let gy = uni(rng, -0.2, 0.1) / pose.width_px;
    let sheen = uni(rng, 0.0, 0.06);
    let sheen_off = (uni(rng, 0.0, 256.0), uni(rng, 0.0, 256.0));
    let patchy = uni(rng, 0.05, 0.2);

    let corners = [(-U_EXTENT, V_LO), (U_EXTENT, V_LO), (-U_EXTENT, sp.v_top), (U_EXTENT, sp.v_top)];
    let (mut bx0, mut bx1, mut by0, mut by1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
    for &(u, v) in &corners {
        let (x, y) = apply(&pose.fwd, u, v);
        bx0 = bx0.min(x);
        bx1 = bx1.max(x);
        by0 = by0.min(y);
        by1 = by1.max(y);
    }
    let xs = (bx0.floor().max(0.0) as usize).min(cv.w);
    let xe = (bx1.ceil().max(0.0) as usize + 1).min(cv.w);
    let ys = (by0.floor().max(0.0) as usize).min(cv.h);
    let ye = ((by1.min(pose.water_y + pose.wob_amp + 2.0)).ceil().max(0.0) as usize).min(cv.h);
    if xs >= xe || ys >= ye {
        return None;
    }
    let water: Vec<f32> = (xs..xe).map(|x| pose.water_at(x as f32 + 0.5)).collect();
    let (fcx, fcy) = ((bx0 + bx1) * 0.5, (by0 + by1) * 0.5);
    let m = &pose.inv;
    let (lw, lh) = (lvl.w as isize, lvl.h as isize);
    let mut bb = [u32::MAX, u32::MAX, 0u32, 0u32];
    for y in ys..ye {
        let py = y as f32 + 0.5;
        for x in xs..xe {
            let px = x as f32 + 0.5;
            let occ = (water[x - xs] - py + 0.5).clamp(0.0, 1.0);
            if occ <= 0.0 {
                continue;
            }
            let hw = m[6] * px + m[7] * py + m[8];
            let u = (m[0] * px + m[1] * py + m[2]) / hw;
            let v = (m[3] * px + m[4] * py + m[5]) / hw;
            let sx = (u + U_EXTENT) * lvl.ppu - 0.5;
            let sy = (sp.v_top - v) * lvl.ppu - 0.5;
            if sx < -1.0 || sy < -1.0 || sx >= lw as f32 || sy >= lh as f32 {
                continue;
            }
            let (ix, iy) = (floor_i(sx), floor_i(sy));
            let (fx, fy) = (sx - ix as f32, sy - iy as f32);
            let (ix, iy) = (ix as isize, iy as isize);
            let fetch = |xx: isize, yy: isize| {
                if xx < 0 || yy < 0 || xx >= lw || yy >= lh {
                    [0.0, 0.0]
                } else {
                    lvl.texels[yy as usize * lvl.w + xx as usize]
                }
            };
            let (t00, t10, t01, t11) = (fetch(ix, iy), fetch(ix + 1, iy), fetch(ix, iy + 1), fetch(ix + 1, iy + 1));
            let a = lerp(lerp(t00[0], t10[0], fx), lerp(t01[0], t11[0], fx), fy) * occ;
            if a <= 0.0 {
                continue;
            }
            let pa = lerp(lerp(t00[1], t10[1], fx), lerp(t01[1], t11[1], fx), fy) * occ;
            // Uneven daylight over the curved fluke, and wet highlights that move between photos.
            let shade =
                (1.0 + gx * (px - fcx) + gy * (py - fcy) + patchy * tex.blobs.sample(u * 12.0 + sheen_off.1, v * 12.0))
                    .max(0.3);
            let wet = sheen * tex.blobs.sample(u * 60.0 + sheen_off.0, v * 60.0 + sheen_off.1).max(0.0) * a;
            let i = y * cv.w + x;
            for c in 0..3 {
                let f = shade * (dark[c] * a + (white[c] - dark[c]) * pa) + wet;
                let p = &mut cv.ch[c][i];
                *p = *p * (1.0 - a) + f;
            }
            if a >= 0.5 {
                bb[0] = bb[0].min(x as u32);
                bb[1] = bb[1].min(y as u32);
                bb[2] = bb[2].max(x as u32 + 1);
                bb[3] = bb[3].max(y as u32 + 1);
            }
        }
    }
    (bb[0] < bb[2] && bb[1] < bb[3]).then_some(bb)
}

/// Water pouring off the raised fluke, the spray around it and the foam where it leaves the sea.
fn fluke_water(cv: &mut Canvas, sp: &Sprite, pose: &Pose, sc: &Scene, tex: &Textures, rng: &mut ChaCha8Rng) {
    let fw = pose.width_px;
    // Where the tail stock enters the water: walk down its axis to the water line.
    let mut base = apply(&pose.fwd, 0.0, V_LO);
    for i in 0..=100 {
        let v = sp.v_top - (sp.v_top - V_LO) * i as f32 / 100.0;
        let p = apply(&pose.fwd, 0.0, v);
        if p.1 >= pose.water_y {
            base = p;
            break;
        }
    }
    let n_streams = rng.random_range(1..6usize);
    for _ in 0..n_streams {
        let Some(&(u, te, le)) = sp.outline.get(rng.random_range(0..sp.outline.len())) else {
            continue;
        };
        let (x0, y0) = if u.abs() > 0.9 { apply(&pose.fwd, u, (te + le) * 0.5) } else { apply(&pose.fwd, u, le) };
        let water = pose.water_at(x0);
        let reach = uni(rng, 0.15, 0.7);
        if water > y0 {
            let width = (fw * uni(rng, 0.001, 0.004)).max(0.6);
            let y1 = y0 + (water - y0) * reach;
            let s = Stream {
                x0,
                y0,
                y1,
                width,
                alpha: uni(rng, 0.2, 0.5),
                drift: uni(rng, -0.03, 0.03),
                key: uni(rng, 0.0, 256.0),
            };
            stream(cv, tex, sc, &s);
        }
    }
    let rx = fw * uni(rng, 0.1, 0.3);
    let (ry, strength) = (rx * uni(rng, 0.08, 0.2), uni(rng, 0.6, 0.95));
    let foam = Foam::new(rng, base.0, pose.water_y, rx, ry, strength);
    foam_patch(cv, tex, sc, &foam);
    let drops = (uni(rng, 5.0, 60.0) * (fw / 1000.0).max(0.3)) as usize;
    for _ in 0..drops {
        let Some(&(u, te, le)) = sp.outline.get(rng.random_range(0..sp.outline.len())) else {
            continue;
        };
        // Mostly below the lobes, where water falls, and a few flung above the trailing edge.
        let v = if rng.random::<f32>() < 0.85 { le - uni(rng, 0.0, 0.35).powi(2) } else { te + uni(rng, 0.0, 0.1) };
        let (x, y) = apply(&pose.fwd, u + uni(rng, -0.03, 0.03), v);
        if y > pose.water_at(x) {
            continue;
        }
        let r = (fw * uni(rng, 0.0006, 0.0028)).max(0.5);
        disc(cv, x, y, r, sc.foam, uni(rng, 0.3, 0.85));
    }
}

/// An empty sea where a whale just dived: the foam and spray of the dive, no fluke. The splash
/// stays small (well under 1 % of the frame), so no subject detector can take it for a whale.
fn dive_splash(cv: &mut Canvas, sc: &Scene, tex: &Textures, rng: &mut ChaCha8Rng) {
    let cx = sc.w * uni(rng, 0.2, 0.8);
    let cy = sc.horizon + (sc.h - sc.horizon) * uni(rng, 0.35, 0.8);
    let rx = sc.w * uni(rng, 0.02, 0.05);
    let (ry, strength) = (rx * uni(rng, 0.1, 0.2), uni(rng, 0.5, 0.9));
    let foam = Foam::new(rng, cx, cy, rx, ry, strength);
    foam_patch(cv, tex, sc, &foam);
    for _ in 0..rng.random_range(8..30usize) {
        let x = cx + rx * uni(rng, -1.5, 1.5);
        let y = cy - rx * uni(rng, 0.0, 0.6) * uni(rng, 0.0, 1.0);
        let r = (sc.w * uni(rng, 0.0004, 0.0015)).max(0.5);
        disc(cv, x, y, r, sc.foam, uni(rng, 0.3, 0.8));
    }
}

/// Gaussian blur of any size as three box passes per axis (running sums: cost independent of
/// sigma), for the planted out-of-focus photos.
fn heavy_blur(cv: &mut Canvas, sigma: f32) {
    let wi = (12.0 * sigma * sigma / 3.0 + 1.0).sqrt();
    let r = (((wi - 1.0) / 2.0).round() as usize).max(1);
    let (w, h) = (cv.w, cv.h);
    let mut tmp = vec![0.0f32; w * h];
    let inv = 1.0 / (2 * r + 1) as f32;
    for plane in &mut cv.ch {
        for _ in 0..3 {
            for y in 0..h {
                let src = &plane[y * w..(y + 1) * w];
                let dst = &mut tmp[y * w..(y + 1) * w];
                let at = |i: isize| src[i.clamp(0, w as isize - 1) as usize];
                let mut acc: f32 = (-(r as isize)..=r as isize).map(at).sum();
                for (x, d) in dst.iter_mut().enumerate() {
                    *d = acc * inv;
                    acc += at(x as isize + r as isize + 1) - at(x as isize - r as isize);
                }
            }
            std::mem::swap(plane, &mut tmp);
        }
        for _ in 0..3 {
            let row = |y: isize| y.clamp(0, h as isize - 1) as usize * w;
            let mut acc = vec![0.0f32; w];
            for k in -(r as isize)..=r as isize {
                let o = row(k);
                for x in 0..w {
                    acc[x] += plane[o + x];
                }
            }
            for y in 0..h {
                let (add, sub) = (row(y as isize + r as isize + 1), row(y as isize - r as isize));
                let dst = &mut tmp[y * w..(y + 1) * w];
                let (add_row, sub_row) = (&plane[add..add + w], &plane[sub..sub + w]);
                for (((d, a), p), m) in dst.iter_mut().zip(acc.iter_mut()).zip(add_row).zip(sub_row) {
                    *d = *a * inv;
                    *a += p - m;
                }
            }
            std::mem::swap(plane, &mut tmp);
        }
    }
}

struct Tone {
    gain: f32,
    contrast: f32,
    offset: f32,
    cast: [f32; 3],
    vignette: f32,
    noise_sd: f32,
    salt: u64,
}

impl Tone {
    #[inline]
    fn map(&self, v: f32, c: usize, vig: f32) -> f32 {
        (v * self.cast[c] * self.gain * vig - 0.5) * self.contrast + 0.5 + self.offset
    }

    /// Mean output level over a sparse pixel lattice, for calibrating planted exposure defects.
    fn sampled_mean(&self, cv: &Canvas, vx: &[f32], vy: &[f32]) -> f32 {
        let (mut sum, mut n) = (0.0f64, 0u32);
        for y in (0..cv.h).step_by(7) {
            for x in (0..cv.w).step_by(11) {
                let i = y * cv.w + x;
                for c in 0..3 {
                    sum += f64::from(self.map(cv.ch[c][i], c, vx[x] * vy[y]).clamp(0.0, 1.0));
                    n += 1;
                }
            }
        }
        (sum / f64::from(n.max(1))) as f32
    }

    /// Fractions of a sparse pixel lattice whose luma would clip to black (≤ 5) or white (≥ 250).
    fn sampled_clipping(&self, cv: &Canvas, vx: &[f32], vy: &[f32]) -> (f32, f32) {
        let (mut dark, mut bright, mut n) = (0u32, 0u32, 0u32);
        for y in (0..cv.h).step_by(7) {
            for x in (0..cv.w).step_by(11) {
                let i = y * cv.w + x;
                let m = |c: usize| self.map(cv.ch[c][i], c, vx[x] * vy[y]).clamp(0.0, 1.0);
                let luma = 0.299 * m(0) + 0.587 * m(1) + 0.114 * m(2);
                dark += u32::from(luma <= 5.0 / 255.0);
                bright += u32::from(luma >= 250.0 / 255.0);
                n += 1;
            }
        }
        let n = n.max(1) as f32;
        (dark as f32 / n, bright as f32 / n)
    }
}

/// How to develop one photo's canvas into output samples.
struct Look {
    exposure: Exposure,
    /// Sigma of the slight lens blur (0 for none), applied before the noise.
    soft: f32,
    /// Use the low end of the sensor-noise range (see `render`).
    quiet: bool,
    want16: bool,
}

/// Lens softness, exposure, colour cast, vignette and sensor noise, in one pass over the canvas.
fn develop(cv: &Canvas, tex: &Textures, rng: &mut ChaCha8Rng, look: &Look, out8: &mut Vec<u8>) -> Option<Vec<u16>> {
    let (exposure, soft, want16) = (look.exposure, look.soft, look.want16);
    let noise = uni(rng, 0.0, 1.0);
    let mut tone = Tone {
        gain: uni(rng, 0.9, 1.1),
        contrast: uni(rng, 0.9, 1.12),
        offset: 0.0,
        cast: [uni(rng, 0.95, 1.05), uni(rng, 0.97, 1.03), uni(rng, 0.95, 1.05)],
        vignette: uni(rng, 0.0, 0.25),
        noise_sd: if look.quiet { lerp(0.6, 1.0, noise) } else { lerp(0.8, 2.2, noise) } / 255.0,
        salt: rng.random::<u64>(),
    };
    let (w, h) = (cv.w, cv.h);
    let vx: Vec<f32> =
        (0..w).map(|x| 1.0 - tone.vignette * ((x as f32 + 0.5) / w as f32 * 2.0 - 1.0).powi(2)).collect();
    let vy: Vec<f32> =
        (0..h).map(|y| 1.0 - 0.6 * tone.vignette * ((y as f32 + 0.5) / h as f32 * 2.0 - 1.0).powi(2)).collect();
    // Planted exposure defects are calibrated rather than guessed, so that they always clear
    // the thresholds (mean > 0.88 or < 0.08) with a safe margin and clip large areas.
    match exposure {
        // Like a camera's auto-exposure: bright skies and sun glare may not burn out more than a
        // few percent of the frame, so only the planted exposure defects fail exposure checks.
        Exposure::Normal => {
            for _ in 0..30 {
                let (dark, bright) = tone.sampled_clipping(cv, &vx, &vy);
                if bright > 0.02 {
                    tone.gain *= 0.95;
                } else if dark > 0.02 {
                    tone.offset += 0.01;
                } else {
                    break;
                }
            }
        }
        Exposure::Over => {
            tone.contrast = 1.0;
            tone.offset = 0.12;
            tone.gain = 1.3;
            while tone.sampled_mean(cv, &vx, &vy) < 0.93 && tone.gain < 40.0 {
                tone.gain *= 1.1;
            }
        }
        Exposure::Under => {
            tone.contrast = 1.0;
            tone.offset = -0.02;
            tone.gain = 0.5;
            while tone.sampled_mean(cv, &vx, &vy) > 0.04 && tone.gain > 0.01 {
                tone.gain *= 0.88;
            }
        }
    }
    // v' = (v·cast·gain·vig − ½)·contrast + ½ + offset, folded into one multiply-add per sample.
    let k = tone.cast.map(|c| c * tone.gain * tone.contrast);
    let k0 = 0.5 - 0.5 * tone.contrast + tone.offset;
    // Three-tap gaussian weights; a tiny sigma degenerates to the identity.
    let e = if soft < 0.2 { 0.0 } else { (-1.0 / (2.0 * soft * soft)).exp() };
    let blur = (1.0 / (1.0 + 2.0 * e), e / (1.0 + 2.0 * e));
    let pass = Pass { w, h, vx: &vx, vy: &vy, k, k0, sd: tone.noise_sd, salt: tone.salt, blur, grain: &tex.grain };
    out8.resize(w * h * 3, 0);
    // Adding 2^23 puts round-to-nearest of v into the low mantissa bits: an exact, branch-free
    // and vectorisable float-to-integer conversion for v in [0, 65535].
    pass.run(cv, 255.0, out8, |v| (v + 8_388_608.0).to_bits() as u8);
    // The 16-bit variant repeats the pass with identical noise, so it is the same photo with
    // finer levels rather than an 8-bit image padded to 16 bits.
    want16.then(|| {
        let mut o16 = vec![0u16; w * h * 3];
        pass.run(cv, 65535.0, &mut o16, |v| (v + 8_388_608.0).to_bits() as u16);
        o16
    })
}

struct Pass<'a> {
    w: usize,
    h: usize,
    vx: &'a [f32],
    vy: &'a [f32],
    k: [f32; 3],
    k0: f32,
    sd: f32,
    salt: u64,
    /// Centre and side weights of the separable three-tap blur.
    blur: (f32, f32),
    grain: &'a [Vec<f32>; 3],
}

impl Pass<'_> {
    /// Blur, tone curve, vignette and noise into interleaved output samples. Horizontally
    /// blurred rows live in a three-row ring, so the canvas is read once and never rewritten;
    /// every step is a planar row loop that the compiler can vectorise, and only the final
    /// interleave is scalar. Generic over the sample type so each depth gets its own loop.
    fn run<T: Copy>(&self, cv: &Canvas, scale: f32, out: &mut [T], conv: impl Fn(f32) -> T) {
        let (w, h, sd) = (self.w, self.h, self.sd);
        let (b0, b1) = self.blur;
        let mut ring: [[Vec<f32>; 3]; 3] = std::array::from_fn(|_| std::array::from_fn(|_| vec![0.0f32; w]));
        let mut planar: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; w]);
        let mut noise: [Vec<f32>; 3] = std::array::from_fn(|_| vec![0.0f32; w]);
        let hblur = |src: &[f32], dst: &mut [f32]| {
            if w < 2 {
                dst.copy_from_slice(src);
                return;
            }
            dst[0] = src[0] * (b0 + b1) + src[1] * b1;
            for ((d, c), (l, r)) in dst[1..w - 1].iter_mut().zip(&src[1..w - 1]).zip(src[..w - 2].iter().zip(&src[2..]))
            {
                *d = c * b0 + (l + r) * b1;
            }
            dst[w - 1] = src[w - 1] * (b0 + b1) + src[w - 2] * b1;
        };
        for (c, slots) in ring.iter_mut().enumerate() {
            hblur(&cv.ch[c][..w], &mut slots[0]);
            if h > 1 {
                hblur(&cv.ch[c][w..2 * w], &mut slots[1]);
            }
        }
        for y in 0..h {
            if y + 1 < h && y >= 1 {
                for (c, slots) in ring.iter_mut().enumerate() {
                    hblur(&cv.ch[c][(y + 1) * w..(y + 2) * w], &mut slots[(y + 1) % 3]);
                }
            }
            let (su, sm, sn) = (y.saturating_sub(1) % 3, y % 3, (y + 1).min(h - 1) % 3);
            let off = (mix64(self.salt ^ y as u64) % (GRAIN_LEN - w) as u64) as usize;
            let (gl, gr, gb) =
                (&self.grain[0][off..off + w], &self.grain[1][off..off + w], &self.grain[2][off..off + w]);
            // Luminance noise is shared by the channels; chroma noise tilts red and blue.
            let [nr, ng, nb] = &mut noise;
            for x in 0..w {
                nr[x] = sd * (gl[x] + gr[x]);
                ng[x] = sd * (gl[x] - 0.5 * (gr[x] + gb[x]));
                nb[x] = sd * (gl[x] + gb[x]);
            }
            let vy = self.vy[y];
            for c in 0..3 {
                let (up, mid, dn) = (&ring[c][su], &ring[c][sm], &ring[c][sn]);
                let (kc, k0) = (self.k[c] * vy, self.k0);
                let n = &noise[c];
                for (x, p) in planar[c].iter_mut().enumerate() {
                    let v = mid[x] * b0 + (up[x] + dn[x]) * b1;
                    *p = (v * kc * self.vx[x] + k0 + n[x]).clamp(0.0, 1.0) * scale;
                }
            }
            let row = &mut out[y * w * 3..(y + 1) * w * 3];
            let [pr, pg, pb] = &planar;
            for (o, ((r, g), b)) in row.chunks_exact_mut(3).zip(pr.iter().zip(pg).zip(pb)) {
                o[0] = conv(*r);
                o[1] = conv(*g);
                o[2] = conv(*b);
            }
        }
    }
}

/// Renders photos for one worker thread, keeping its large buffers alive between photos.
pub(crate) struct Renderer<'a> {
    tex: &'a Textures,
    small: Canvas,
    full: Canvas,
    out8: Vec<u8>,
}

impl<'a> Renderer<'a> {
    pub(crate) fn new(tex: &'a Textures) -> Self {
        Self { tex, small: Canvas::new(0, 0), full: Canvas::new(0, 0), out8: Vec::new() }
    }

    pub(crate) fn render(&mut self, req: &Request, rng: &mut ChaCha8Rng) -> Photo<'_> {
        let tex = self.tex;
        let sc = Scene::draw(rng, req.w, req.h);
        let cv = &mut self.full;
        cv.reset(req.w, req.h);
        paint_background(&sc, tex, &mut self.small, cv);
        whitecaps(cv, tex, &sc, rng);
        let bbox = match req.sprite {
            Some(sp) => {
                let pose = Pose::choose(sp, &sc, rng);
                let bb = draw_fluke(cv, sp, &pose, &sc, tex, rng);
                fluke_water(cv, sp, &pose, &sc, tex, rng);
                bb
            }
            None => {
                dive_splash(cv, &sc, tex, rng);
                None
            }
        };
        // Blur before noise: sensor noise is added after the optics, so even a badly focused
        // photo keeps a sharp noise texture, as real ones do.
        let soft = uni(rng, 0.35, 0.9) * (req.w as f32 / 2400.0).max(0.3);
        if req.heavy_blur {
            heavy_blur(cv, 0.012 * req.w as f32);
        }
        // Sensor noise reads as fine detail to sharpness measures (variance of the Laplacian), so
        // out-of-focus photos come from the quiet end of the noise range: their blur must be
        // unmistakable, whatever the measure.
        let look = Look {
            exposure: req.exposure,
            soft: if req.heavy_blur { 0.0 } else { soft },
            quiet: req.heavy_blur,
            want16: req.want16,
        };
        let rgb16 = develop(cv, tex, rng, &look, &mut self.out8);
        Photo { rgb8: &self.out8, rgb16, bbox }
    }
}
