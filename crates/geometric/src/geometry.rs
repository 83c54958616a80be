//! Model fitting (affine, homography) and RANSAC.

use crate::{Model, Params};

/// splitmix64: tiny, seedable, good enough for sampling.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform integer in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

pub(crate) type Mat3 = [f64; 9];
type Pt = [f64; 2];

pub(crate) fn apply(h: &Mat3, p: Pt) -> Option<Pt> {
    let w = h[6] * p[0] + h[7] * p[1] + h[8];
    (w.abs() > 1e-12).then(|| [(h[0] * p[0] + h[1] * p[1] + h[2]) / w, (h[3] * p[0] + h[4] * p[1] + h[5]) / w])
}

fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|k| (0..3).map(|i| a[k / 3 * 3 + i] * b[i * 3 + k % 3]).sum())
}

fn centroid(pts: &[Pt], idx: &[usize]) -> Pt {
    let n = idx.len() as f64;
    let s = idx.iter().fold([0.0, 0.0], |s, &i| [s[0] + pts[i][0], s[1] + pts[i][1]]);
    [s[0] / n, s[1] / n]
}

/// Least-squares affine transform a -> b over the matches `idx` (exact for 3 points).
pub(crate) fn fit_affine(pa: &[Pt], pb: &[Pt], idx: &[usize]) -> Option<Mat3> {
    if idx.len() < 3 {
        return None;
    }
    let (ca, cb) = (centroid(pa, idx), centroid(pb, idx));
    // S = sum a a^T, C = sum b a^T (centred); M = C S^-1.
    let (mut s, mut c) = ([0.0f64; 4], [0.0f64; 4]);
    for &i in idx {
        let (ax, ay) = (pa[i][0] - ca[0], pa[i][1] - ca[1]);
        let (bx, by) = (pb[i][0] - cb[0], pb[i][1] - cb[1]);
        s = [s[0] + ax * ax, s[1] + ax * ay, s[2] + ax * ay, s[3] + ay * ay];
        c = [c[0] + bx * ax, c[1] + bx * ay, c[2] + by * ax, c[3] + by * ay];
    }
    let det = s[0] * s[3] - s[1] * s[2];
    if det.abs() <= 1e-9 * (s[0] + s[3]).powi(2) || det == 0.0 {
        return None;
    }
    let si = [s[3] / det, -s[1] / det, -s[2] / det, s[0] / det];
    let m = [
        c[0] * si[0] + c[1] * si[2],
        c[0] * si[1] + c[1] * si[3],
        c[2] * si[0] + c[3] * si[2],
        c[2] * si[1] + c[3] * si[3],
    ];
    let t = [cb[0] - m[0] * ca[0] - m[1] * ca[1], cb[1] - m[2] * ca[0] - m[3] * ca[1]];
    Some([m[0], m[1], t[0], m[2], m[3], t[1], 0.0, 0.0, 1.0])
}

/// Similarity that moves the centroid to the origin and the mean distance to sqrt(2).
fn normaliser(pts: &[Pt], idx: &[usize]) -> Option<(Mat3, Mat3)> {
    let c = centroid(pts, idx);
    let d = idx.iter().map(|&i| (pts[i][0] - c[0]).hypot(pts[i][1] - c[1])).sum::<f64>() / idx.len() as f64;
    if d <= 1e-12 {
        return None;
    }
    let s = std::f64::consts::SQRT_2 / d;
    let t = [s, 0.0, -s * c[0], 0.0, s, -s * c[1], 0.0, 0.0, 1.0];
    let inv = [1.0 / s, 0.0, c[0], 0.0, 1.0 / s, c[1], 0.0, 0.0, 1.0];
    Some((t, inv))
}

/// Homography a -> b by the normalised DLT (h33 = 1 in normalised coordinates, least squares).
pub(crate) fn fit_homography(pa: &[Pt], pb: &[Pt], idx: &[usize]) -> Option<Mat3> {
    if idx.len() < 4 {
        return None;
    }
    let (ta, _) = normaliser(pa, idx)?;
    let (tb, tb_inv) = normaliser(pb, idx)?;
    let mut ata = [[0.0f64; 8]; 8];
    let mut atb = [0.0f64; 8];
    for &i in idx {
        let a = apply(&ta, pa[i])?;
        let b = apply(&tb, pb[i])?;
        let (x, y, u, v) = (a[0], a[1], b[0], b[1]);
        for (row, rhs) in
            [([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y], u), ([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y], v)]
        {
            for r in 0..8 {
                atb[r] += row[r] * rhs;
                for c in 0..8 {
                    ata[r][c] += row[r] * row[c];
                }
            }
        }
    }
    let h = solve(ata, atb)?;
    let hn = [h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], 1.0];
    let mut m = mul(&tb_inv, &mul(&hn, &ta));
    let s = m[8];
    if s.abs() < 1e-12 {
        return None;
    }
    m.iter_mut().for_each(|v| *v /= s);
    Some(m)
}

/// Gaussian elimination with partial pivoting.
fn solve<const N: usize>(mut a: [[f64; N]; N], mut b: [f64; N]) -> Option<[f64; N]> {
    let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..N {
        let piv = (col..N).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for r in col + 1..N {
            let f = a[r][col] / a[col][col];
            let pivot_row = a[col];
            for (x, &pv) in a[r][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * pv;
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = [0.0; N];
    for r in (0..N).rev() {
        let s: f64 = (r + 1..N).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

fn cross(p: Pt, q: Pt, r: Pt) -> f64 {
    (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
}

/// Reject minimal samples that are (nearly) collinear, or whose orientation is inconsistent.
fn sample_ok(pa: &[Pt], pb: &[Pt], idx: &[usize], min_a: f64, min_b: f64, allow_reflection: bool) -> bool {
    let triples: &[[usize; 3]] =
        if idx.len() == 3 { &[[0, 1, 2]] } else { &[[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]] };
    let mut sign = 0.0;
    for t in triples {
        let ca = cross(pa[idx[t[0]]], pa[idx[t[1]]], pa[idx[t[2]]]);
        let cb = cross(pb[idx[t[0]]], pb[idx[t[1]]], pb[idx[t[2]]]);
        if ca.abs() < min_a || cb.abs() < min_b {
            return false;
        }
        let sg = (ca * cb).signum();
        if (!allow_reflection && sg < 0.0) || (sign != 0.0 && sg != sign) {
            return false;
        }
        sign = sg;
    }
    true
}

/// Reject degenerate or implausible models: points of image a going to infinity,
/// local scale change beyond `max_scale_change` (or anisotropy beyond it), reflections.
pub(crate) fn plausible(h: &Mat3, (w, ht): (usize, usize), p: &Params) -> bool {
    if h.iter().any(|v| !v.is_finite()) {
        return false;
    }
    let (w, ht) = (w.max(1) as f64, ht.max(1) as f64);
    let max_s = (p.max_scale_change as f64).max(1.0);
    let pts = [[w / 2.0, ht / 2.0], [0.0, 0.0], [w, 0.0], [0.0, ht], [w, ht]];
    let wc = h[6] * pts[0][0] + h[7] * pts[0][1] + h[8];
    for q in pts {
        let d = h[6] * q[0] + h[7] * q[1] + h[8];
        if d * wc <= 0.0 || (d / wc).abs() > max_s || (wc / d).abs() > max_s {
            return false;
        }
        let Some([x, y]) = apply(h, q) else { return false };
        // Jacobian of the projective map at q.
        let j = [(h[0] - x * h[6]) / d, (h[1] - x * h[7]) / d, (h[3] - y * h[6]) / d, (h[4] - y * h[7]) / d];
        let det = j[0] * j[3] - j[1] * j[2];
        if det < 0.0 && !p.allow_reflection {
            return false;
        }
        // Singular values of the 2x2 Jacobian.
        let fro = j.iter().map(|v| v * v).sum::<f64>();
        let disc = (fro * fro - 4.0 * det * det).max(0.0).sqrt();
        let (s1, s2) = (((fro + disc) / 2.0).sqrt(), ((fro - disc) / 2.0).max(0.0).sqrt());
        if s1 > max_s || s2 * max_s < 1.0 || s1 > s2 * max_s {
            return false;
        }
    }
    true
}

/// Number of inliers and truncated squared-error cost (MSAC) of a model.
fn score(h: &Mat3, pa: &[Pt], pb: &[Pt], tol2: f64) -> (usize, f64) {
    let (mut n, mut cost) = (0, 0.0);
    for (a, b) in pa.iter().zip(pb) {
        let e = apply(h, *a).map_or(f64::INFINITY, |q| (q[0] - b[0]).powi(2) + (q[1] - b[1]).powi(2));
        if e < tol2 {
            n += 1;
            cost += e;
        } else {
            cost += tol2;
        }
    }
    (n, cost)
}

fn fit(model: Model, pa: &[Pt], pb: &[Pt], idx: &[usize]) -> Option<Mat3> {
    match model {
        Model::Affine => fit_affine(pa, pb, idx),
        Model::Homography => fit_homography(pa, pb, idx),
    }
}

/// RANSAC with adaptive termination, then iterated least-squares refits on the inliers.
/// `tol_a` / `tol_b` are the pixel tolerances in each image (`tol_b` is the inlier threshold);
/// `size_a` is the size of image a, used by the plausibility checks. Returns (inliers, model).
pub(crate) fn ransac(
    pa: &[Pt],
    pb: &[Pt],
    p: &Params,
    tol_a: f64,
    tol_b: f64,
    size_a: (usize, usize),
) -> Option<(usize, Mat3)> {
    let m = match p.model {
        Model::Affine => 3,
        Model::Homography => 4,
    };
    let n = pa.len().min(pb.len());
    if n < m {
        return None;
    }
    let tol2 = tol_b * tol_b;
    let (min_a, min_b) = (4.0 * tol_a * tol_a, 4.0 * tol2);
    let conf = (p.confidence as f64).clamp(0.0, 0.999_999);
    let mut rng = Rng(p.seed);
    let mut best: Option<(Mat3, usize, f64)> = None;
    let mut max_iter = p.ransac_iterations;
    let mut idx = [0usize; 4];
    let mut it = 0;
    while it < max_iter {
        it += 1;
        for k in 0..m {
            idx[k] = loop {
                let r = rng.below(n);
                if !idx[..k].contains(&r) {
                    break r;
                }
            };
        }
        let s = &idx[..m];
        if !sample_ok(pa, pb, s, min_a, min_b, p.allow_reflection) {
            continue;
        }
        let Some(h) = fit(p.model, pa, pb, s).filter(|h| plausible(h, size_a, p)) else { continue };
        let (cnt, cost) = score(&h, pa, pb, tol2);
        if best.as_ref().is_none_or(|b| cnt > b.1 || (cnt == b.1 && cost < b.2)) {
            best = Some((h, cnt, cost));
            let w = (cnt as f64 / n as f64).powi(m as i32);
            if w >= 1.0 {
                break;
            }
            let need = ((1.0 - conf).ln() / (1.0 - w).ln()).ceil();
            if need.is_finite() && need >= 0.0 {
                max_iter = max_iter.min(need as usize);
            }
        }
    }
    let (mut h, mut cnt, mut cost) = best?;
    // Local optimisation: refit on all inliers while it helps.
    for _ in 0..4 {
        let inl: Vec<usize> = (0..n)
            .filter(|&i| apply(&h, pa[i]).is_some_and(|q| (q[0] - pb[i][0]).powi(2) + (q[1] - pb[i][1]).powi(2) < tol2))
            .collect();
        let Some(h2) = fit(p.model, pa, pb, &inl).filter(|h| plausible(h, size_a, p)) else { break };
        let (c2, k2) = score(&h2, pa, pb, tol2);
        if c2 < cnt || (c2 == cnt && k2 >= cost) {
            break;
        }
        (h, cnt, cost) = (h2, c2, k2);
    }
    Some((cnt, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(seed: u64, n: usize, h: &Mat3, outliers: usize) -> (Vec<Pt>, Vec<Pt>) {
        let mut r = Rng(seed);
        let mut u = move || (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (mut pa, mut pb) = (vec![], vec![]);
        for k in 0..n + outliers {
            let a = [u() * 400.0, u() * 300.0];
            pa.push(a);
            pb.push(if k < n { apply(h, a).unwrap() } else { [u() * 400.0, u() * 300.0] });
        }
        (pa, pb)
    }

    fn close(a: &Mat3, b: &Mat3, eps: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= eps * (1.0 + y.abs()))
    }

    const AFF: Mat3 = [0.77, -0.21, 31.0, 0.25, 0.80, -12.0, 0.0, 0.0, 1.0];
    const HOM: Mat3 = [0.8, -0.2, 40.0, 0.22, 0.78, -5.0, 2e-4, -1.5e-4, 1.0];

    #[test]
    fn exact_fits() {
        let (pa, pb) = points(1, 10, &AFF, 0);
        assert!(close(&fit_affine(&pa, &pb, &[0, 1, 2]).unwrap(), &AFF, 1e-9));
        assert!(close(&fit_affine(&pa, &pb, &(0..10).collect::<Vec<_>>()).unwrap(), &AFF, 1e-9));
        let (pa, pb) = points(2, 10, &HOM, 0);
        assert!(close(&fit_homography(&pa, &pb, &[0, 1, 2, 3]).unwrap(), &HOM, 1e-7));
        assert!(close(&fit_homography(&pa, &pb, &(0..10).collect::<Vec<_>>()).unwrap(), &HOM, 1e-7));
        // Collinear points are degenerate.
        let line: Vec<Pt> = (0..4).map(|i| [i as f64, 2.0 * i as f64]).collect();
        assert!(fit_affine(&line, &line, &[0, 1, 2]).is_none());
        assert!(fit_homography(&line, &line, &[0, 1, 2, 3]).is_none());
    }

    #[test]
    fn ransac_with_outliers() {
        for (model, h) in [(Model::Affine, AFF), (Model::Homography, HOM)] {
            let p = Params { model, ..Params::default() };
            let (pa, pb) = points(3, 40, &h, 60);
            let (inliers, fit) = ransac(&pa, &pb, &p, 2.0, 2.0, (400, 300)).unwrap();
            assert!((40..43).contains(&inliers), "{model:?}: {inliers}");
            assert!(close(&fit, &h, 1e-6), "{model:?}: {fit:?}");
        }
    }

    #[test]
    fn implausible_models_rejected() {
        let p = Params::default();
        let scaled = |s: f64| [s, 0.0, 0.0, 0.0, s, 0.0, 0.0, 0.0, 1.0];
        assert!(plausible(&scaled(1.0), (100, 100), &p));
        assert!(plausible(&scaled(7.0), (100, 100), &p));
        assert!(!plausible(&scaled(9.0), (100, 100), &p));
        assert!(!plausible(&scaled(0.1), (100, 100), &p));
        let mirror = [-1.0, 0.0, 100.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        assert!(!plausible(&mirror, (100, 100), &p));
        assert!(plausible(&mirror, (100, 100), &Params { allow_reflection: true, ..p.clone() }));
        let horizon = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.02, 0.0, -1.0];
        assert!(!plausible(&horizon, (100, 100), &p));
        // Reflected point sets are not fitted unless allowed.
        let (pa, _) = points(4, 30, &AFF, 0);
        let pb: Vec<Pt> = pa.iter().map(|q| apply(&mirror, *q).unwrap()).collect();
        assert!(ransac(&pa, &pb, &p, 2.0, 2.0, (400, 300)).is_none());
        let allow = Params { allow_reflection: true, ..p };
        assert_eq!(ransac(&pa, &pb, &allow, 2.0, 2.0, (400, 300)).unwrap().0, 30);
    }
}
