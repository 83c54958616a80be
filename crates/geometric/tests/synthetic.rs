//! End-to-end tests on procedurally generated "photo-ID like" textures.

use geometric::*;
use std::time::Instant;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.range(1e-12, 1.0), self.range(0.0, std::f64::consts::TAU));
        (-2.0 * u.ln()).sqrt() * v.cos()
    }
}

struct Img {
    w: usize,
    h: usize,
    px: Vec<f32>,
}

impl Img {
    fn gray(&self) -> Gray<'_> {
        Gray { width: self.w, height: self.h, pixels: &self.px }
    }
}

/// Light smooth-gradient background with dark anti-aliased spots, ellipses and strokes.
fn render(seed: u64, w: usize, h: usize) -> Img {
    render_dense(seed, w, h, 1.0)
}

fn render_dense(seed: u64, w: usize, h: usize, density: f64) -> Img {
    let mut r = Rng(seed);
    let (b0, gx, gy, fx, fy) =
        (r.range(0.6, 0.8), r.range(-0.2, 0.2), r.range(-0.2, 0.2), r.range(1.0, 4.0), r.range(1.0, 4.0));
    let mut px: Vec<f32> = (0..w * h)
        .map(|i| {
            let (x, y) = ((i % w) as f64 / w as f64, (i / w) as f64 / h as f64);
            (b0 + gx * (x - 0.5) + gy * (y - 0.5) + 0.05 * (fx * x + fy * y).sin()) as f32
        })
        .collect();
    let mut paint = |cx: f64, cy: f64, rad: f64, dark: f64, cov: &dyn Fn(f64, f64) -> f64| {
        let (x0, x1) = ((cx - rad - 2.0).max(0.0) as usize, ((cx + rad + 2.0).max(0.0) as usize).min(w));
        let (y0, y1) = ((cy - rad - 2.0).max(0.0) as usize, ((cy + rad + 2.0).max(0.0) as usize).min(h));
        for y in y0..y1 {
            for x in x0..x1 {
                let c = cov(x as f64 - cx, y as f64 - cy).clamp(0.0, 1.0);
                px[y * w + x] *= (1.0 - dark * c) as f32;
            }
        }
    };
    let area = density * (w * h) as f64 / (384.0 * 288.0);
    for _ in 0..(260.0 * area) as usize {
        let (cx, cy) = (r.range(0.0, w as f64), r.range(0.0, h as f64));
        let rx = r.range(1.5, 3.0) * r.range(1.0, 3.5);
        let ry = rx * r.range(0.35, 1.0);
        let (s, c) = r.range(0.0, 3.2).sin_cos();
        let dark = r.range(0.35, 0.8);
        paint(cx, cy, rx, dark, &|u, v| {
            let (a, b) = ((u * c + v * s) / rx, (-u * s + v * c) / ry);
            (1.0 - (a * a + b * b).sqrt()) * ry + 0.5
        });
    }
    for _ in 0..(40.0 * area) as usize {
        let (cx, cy, len, hw) = (r.range(0.0, w as f64), r.range(0.0, h as f64), r.range(8.0, 30.0), r.range(0.6, 2.0));
        let (s, c) = r.range(0.0, 3.2).sin_cos();
        let dark = r.range(0.3, 0.7);
        paint(cx, cy, len + hw, dark, &|u, v| {
            let t = (u * c + v * s).clamp(-len, len);
            hw - (u - t * c).hypot(v - t * s) + 0.5
        });
    }
    Img { w, h, px }
}

type H = [f64; 9];

fn apply(h: &H, x: f64, y: f64) -> (f64, f64) {
    let w = h[6] * x + h[7] * y + h[8];
    ((h[0] * x + h[1] * y + h[2]) / w, (h[3] * x + h[4] * y + h[5]) / w)
}

fn invert(m: &H) -> H {
    let e = |r: usize, c: usize| m[(r % 3) * 3 + c % 3];
    let adj: H = std::array::from_fn(|k| {
        let (i, j) = (k / 3, k % 3);
        e(j + 1, i + 1) * e(j + 2, i + 2) - e(j + 1, i + 2) * e(j + 2, i + 1)
    });
    let det = m[0] * adj[0] + m[1] * adj[3] + m[2] * adj[6];
    adj.map(|v| v / det)
}

/// Warp a->b: rotation (degrees), scale, shear and perspective about the image centres, then translation.
type Look = (f64, f64, f64, f64); // contrast, brightness, gamma, noise sigma

fn make_warp(a: (usize, usize), b: (usize, usize), (deg, scale, shear): (f64, f64, f64), p: [f64; 4]) -> H {
    let (s, c) = deg.to_radians().sin_cos();
    let (ca, cb) = ((a.0 as f64 / 2.0, a.1 as f64 / 2.0), (b.0 as f64 / 2.0 + p[2], b.1 as f64 / 2.0 + p[3]));
    // x' = cb + L (x - ca) / (1 + p.(x - ca))
    let m = [scale * c, scale * (c * shear - s), 0.0, scale * s, scale * (s * shear + c), 0.0, p[0], p[1], 1.0];
    let pre = [1.0, 0.0, -ca.0, 0.0, 1.0, -ca.1, 0.0, 0.0, 1.0];
    let post = [1.0, 0.0, cb.0, 0.0, 1.0, cb.1, 0.0, 0.0, 1.0];
    let mul =
        |a: &H, b: &H| -> H { std::array::from_fn(|k| (0..3).map(|i| a[k / 3 * 3 + i] * b[i * 3 + k % 3]).sum()) };
    mul(&post, &mul(&m, &pre))
}

/// Bilinear resampling of `src` through `h` (a->b) into a `w x h` canvas, then recolouring:
/// contrast, brightness, gamma and Gaussian noise.
fn warp(src: &Img, h: &H, (w, ht): (usize, usize), (contrast, bright, gamma, noise): Look, seed: u64) -> Img {
    let hi = invert(h);
    let mut r = Rng(seed);
    let px = (0..w * ht)
        .map(|i| {
            let (x, y) = apply(&hi, (i % w) as f64, (i / w) as f64);
            let v = if x >= 0.0 && y >= 0.0 && x <= (src.w - 1) as f64 && y <= (src.h - 1) as f64 {
                let (x0, y0) = (x as usize, y as usize);
                let (x1, y1) = ((x0 + 1).min(src.w - 1), (y0 + 1).min(src.h - 1));
                let (fx, fy) = (x - x0 as f64, y - y0 as f64);
                let g = |xx: usize, yy: usize| src.px[yy * src.w + xx] as f64;
                (g(x0, y0) * (1.0 - fx) + g(x1, y0) * fx) * (1.0 - fy) + (g(x0, y1) * (1.0 - fx) + g(x1, y1) * fx) * fy
            } else {
                0.45
            };
            let v = (((v - 0.5) * contrast + 0.5 + bright).clamp(0.0, 1.0)).powf(gamma) + noise * r.normal();
            v.clamp(0.0, 1.0) as f32
        })
        .collect();
    Img { w, h: ht, px }
}

/// A random warp + recolouring of `src` into a random canvas.
fn random_view(src: &Img, seed: u64) -> Img {
    let mut r = Rng(seed ^ 0xABCD);
    let (w, h) = (r.range(240.0, 480.0) as usize, r.range(200.0, 400.0) as usize);
    let geo = (r.range(-30.0, 30.0), r.range(0.7, 1.1), r.range(-0.1, 0.1));
    let persp = [r.range(-1e-4, 1e-4), r.range(-1e-4, 1e-4), r.range(-20.0, 20.0), r.range(-20.0, 20.0)];
    let hm = make_warp((src.w, src.h), (w, h), geo, persp);
    let look = (r.range(0.6, 1.0), r.range(-0.15, 0.15), r.range(0.8, 1.4), r.range(0.01, 0.03));
    warp(src, &hm, (w, h), look, seed)
}

/// Largest distance between the estimated and the true mapping of `pts`.
fn worst_error(t: &[f32; 9], truth: &H, pts: &[(f64, f64)]) -> f64 {
    let err = |&(x, y): &(f64, f64)| {
        let ((ex, ey), (tx, ty)) = (project(t, x as f32, y as f32), apply(truth, x, y));
        (ex as f64 - tx).hypot(ey as f64 - ty)
    };
    pts.iter().map(err).fold(0.0, f64::max)
}

fn key_pair() -> (Img, Img, H) {
    let a = render(1, 384, 288);
    let bsize = (352, 320);
    let hm = make_warp((a.w, a.h), bsize, (15.0, 0.8, 0.08), [8e-5, -6e-5, 10.0, -8.0]);
    let b = warp(&a, &hm, bsize, (0.7, 0.15, 1.3, 0.02), 99);
    (a, b, hm)
}

#[test]
fn true_pair_ranks_first_among_distractors() {
    let p = Params::default();
    let (a, b, truth) = key_pair();
    let fa = extract(&a.gray(), &p);
    let fb = extract(&b.gray(), &p);
    assert!(fa.keypoints.len() >= 150, "{}", fa.keypoints.len());
    println!("keypoints: a {}, b {}", fa.keypoints.len(), fb.keypoints.len());
    let vt = verify(&fa, &fb, &p);
    let sizes = [(384, 288), (300, 420), (512, 200), (256, 256)];
    let mut best_d = 0;
    for k in 0..24u64 {
        let (w, h) = sizes[k as usize % sizes.len()];
        let d = random_view(&render(100 + k, w, h), 500 + k);
        let v = verify(&fa, &extract(&d.gray(), &p), &p);
        best_d = best_d.max(v.inliers);
    }
    println!("true pair: {} matches, {} inliers; best of 24 distractors: {} inliers", vt.matches, vt.inliers, best_d);
    assert!(vt.inliers >= 4 * p.min_inliers && vt.inliers > 3 * best_d.max(1), "{vt:?} vs {best_d}");
    assert!(best_d < p.min_inliers);
    // The recovered (affine) transform matches the true warp on interior points.
    let inner = [(100.0, 80.0), (280.0, 80.0), (192.0, 144.0), (100.0, 210.0), (280.0, 210.0)];
    let worst = worst_error(&vt.transform.expect("transform"), &truth, &inner);
    println!("affine: worst error {worst:.2} px");
    assert!(worst < 3.0, "affine error {worst}");
    // The homography model recovers the perspective part too.
    let ph = Params { model: Model::Homography, ..p };
    let vh = verify(&fa, &fb, &ph);
    let outer = [(40.0, 40.0), (344.0, 40.0), (192.0, 144.0), (40.0, 248.0), (344.0, 248.0)];
    let worst = worst_error(&vh.transform.expect("homography"), &truth, &outer);
    println!("homography: {} inliers, worst error {worst:.2} px", vh.inliers);
    assert!(worst < 2.0, "homography error {worst}");
}

#[test]
fn identity() {
    let p = Params::default();
    let a = render(5, 320, 240);
    let f = extract(&a.gray(), &p);
    let v = verify(&f, &f, &p);
    assert!(v.inliers as f64 >= 0.9 * f.keypoints.len() as f64, "{} of {}", v.inliers, f.keypoints.len());
    let t = v.transform.unwrap();
    let id = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    assert!(t.iter().zip(id).all(|(a, b)| (a - b).abs() < 1e-3), "{t:?}");
}

#[test]
fn robustness() {
    let p = Params::default();
    let flat = vec![0.5f32; 200 * 150];
    let ramp: Vec<f32> = (0..200 * 150).map(|i| (i % 200) as f32 / 200.0).collect();
    let textured = render(7, 256, 192);
    let ft = extract(&textured.gray(), &p);
    for (w, h, px) in [
        (200, 150, &flat[..]),
        (200, 150, &ramp[..]),
        (5, 5, &flat[..25]),
        (0, 0, &[][..]),
        (15, 300, &ramp[..4500]),
        (200, 150, &flat[..10]),
    ] {
        let f = extract(&Gray { width: w, height: h, pixels: px }, &p);
        assert!(f.keypoints.is_empty() && f.descriptors.is_empty(), "{w}x{h}: {}", f.keypoints.len());
        for v in [verify(&f, &ft, &p), verify(&ft, &f, &p), verify(&f, &f, &p)] {
            assert_eq!((v.inliers, v.transform), (0, None));
        }
    }
    // Tiny but textured: maybe no features, never a panic.
    let tiny = render(8, 20, 17);
    let f = extract(&tiny.gray(), &p);
    assert!(verify(&f, &ft, &p).inliers < p.min_inliers);
    // Unrelated images (different sizes), both models.
    let other = random_view(&render(9, 420, 300), 3);
    let fo = extract(&other.gray(), &p);
    for model in [Model::Affine, Model::Homography] {
        let q = Params { model, ..p.clone() };
        let v = verify(&ft, &fo, &q);
        println!("unrelated {model:?}: {v:?}");
        assert!(v.inliers < p.min_inliers && v.transform.is_none(), "{v:?}");
    }
}

#[test]
fn deterministic() {
    let (a, b, _) = key_pair();
    for model in [Model::Affine, Model::Homography] {
        let p = Params { model, seed: 42, ..Params::default() };
        let (fa, fb) = (extract(&a.gray(), &p), extract(&b.gray(), &p));
        assert_eq!(fa, extract(&a.gray(), &p));
        let v = verify(&fa, &fb, &p);
        assert_eq!(v, verify(&fa, &fb, &p));
        assert!(v.transform.is_some());
    }
}

/// `cargo test --release -- --ignored --nocapture timing`
#[test]
#[ignore]
fn timing() {
    let p = Params::default();
    let a = render_dense(11, 512, 256, 3.0);
    let hm = make_warp((512, 256), (512, 256), (10.0, 0.9, 0.05), [5e-5, 0.0, 5.0, 5.0]);
    let b = warp(&a, &hm, (512, 256), (0.8, 0.1, 1.2, 0.02), 1);
    let fa = extract(&a.gray(), &p);
    let mut fb = extract(&b.gray(), &p);
    let (t_ext, mut v) = (time(15, || fb = extract(&b.gray(), &p)), verify(&fa, &fb, &p));
    println!("extract 512x256: {t_ext} ({} keypoints)", fb.keypoints.len());
    let (na, nb) = (fa.keypoints.len(), fb.keypoints.len());
    for model in [Model::Affine, Model::Homography] {
        let q = Params { model, ..p.clone() };
        let t = time(31, || v = verify(&fa, &fb, &q));
        println!("verify {na}x{nb} keypoints ({model:?}): {t} ({} matches, {} inliers)", v.matches, v.inliers);
    }
}

fn time(n: usize, mut f: impl FnMut()) -> String {
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    format!("min {:.2} ms, median {:.2} ms", ms[0], ms[n / 2])
}
