//! One individual's tail fluke: outline, trailing-edge damage and ventral pigmentation, all
//! drawn from the individual's own RNG, and a pre-rendered, anti-aliased sprite pyramid that
//! every photo of that individual warps into its scene.
//!
//! Fluke coordinates: `u` runs tip to tip over [-1, 1], `v` points up (towards the trailing edge,
//! as seen when the whale lifts its tail before a dive and shows the underside).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::noise::{Lattice, lerp, smoothstep, uni};

/// Half-width of the sprite in fluke units; a little beyond the tips for the soft edge.
pub(crate) const U_EXTENT: f32 = 1.08;
/// Lowest point of the tail stock kept in the sprite; always below the water line.
pub(crate) const V_LO: f32 = -1.5;

struct EdgeBump {
    c: f32,
    hw: f32,
    depth: f32,
    sharp: bool,
}

struct TipCut {
    side: usize,
    at: f32,
    tilt: f32,
}

struct Arc {
    cu: f32,
    cv: f32,
    r: f32,
    a0: f32,
    a1: f32,
    width: f32,
    albedo: f32,
}

struct Disc {
    cu: f32,
    cv: f32,
    ru: f32,
    rv: f32,
    ring: bool,
    albedo: f32,
}

struct Streak {
    u0: f32,
    v0: f32,
    u1: f32,
    v1: f32,
    bend: f32,
    width: f32,
}

pub(crate) struct FlukeShape {
    lift: [f32; 2],
    sweep: [f32; 2],
    curl: [f32; 2],
    bow: [f32; 2],
    chord: [f32; 2],
    taper_q: [f32; 2],
    taper_r: [f32; 2],
    center_dip: f32,
    notch_depth: f32,
    notch_width: f32,
    bumps: Vec<EdgeBump>,
    serration: Vec<f32>,
    serr_amp: f32,
    tip_cut: Option<TipCut>,
    ped_w: f32,
    ped_flare: f32,
    // Pigmentation.
    bias: f32,
    sym: f32,
    radial: f32,
    n_sym: Lattice,
    n_asym: Lattice,
    n_mottle: Lattice,
    f_sym: f32,
    f_asym: f32,
    lobe_blob: [(f32, f32, f32, f32); 2],
    margin: f32,
    center_dark: f32,
    white_level: f32,
    patch_soft: f32,
    streaks: Vec<Streak>,
    arcs: Vec<Arc>,
    discs: Vec<Disc>,
}

#[inline]
fn side(u: f32) -> usize {
    usize::from(u >= 0.0)
}

impl FlukeShape {
    pub(crate) fn new(rng: &mut ChaCha8Rng) -> Self {
        // Shared values plus a small per-lobe jitter: real flukes are nearly, never exactly,
        // symmetric.
        let pair = |rng: &mut ChaCha8Rng, lo: f32, hi: f32, jitter: f32| {
            let base = uni(rng, lo, hi);
            let j = (hi - lo) * jitter;
            [base + uni(rng, -j, j), base + uni(rng, -j, j)]
        };
        let lift = pair(rng, 0.0, 0.2, 0.12);
        let sweep = pair(rng, 1.3, 2.6, 0.1);
        let curl = pair(rng, 0.0, 0.9, 0.2);
        let bow = pair(rng, -0.05, 0.06, 0.15);
        let chord = pair(rng, 0.3, 0.46, 0.08);
        let taper_q = pair(rng, 1.4, 3.0, 0.08);
        let taper_r = pair(rng, 0.45, 0.95, 0.08);
        let center_dip = uni(rng, 0.04, 0.14);
        let notch_depth = uni(rng, 0.025, 0.08);
        let notch_width = uni(rng, 0.025, 0.07);

        // Built in two steps: bite depths and pigmentation are placed relative to the outline,
        // so the outline goes in first.
        let mut shape = Self::blank(rng);
        shape.lift = lift;
        shape.sweep = sweep;
        shape.curl = curl;
        shape.bow = bow;
        shape.chord = chord;
        shape.taper_q = taper_q;
        shape.taper_r = taper_r;
        shape.center_dip = center_dip;
        shape.notch_depth = notch_depth;
        shape.notch_width = notch_width;

        // Trailing-edge scallops (soft) and bite notches (sharp) are the classic ID marks; their
        // depth is capped by the local chord so no bite cuts a lobe in two.
        let n_soft = rng.random_range(3..11usize);
        let n_sharp = rng.random_range(0..5usize);
        let mut bumps = Vec::with_capacity(n_soft + n_sharp);
        for i in 0..n_soft + n_sharp {
            let sharp = i >= n_soft;
            let c = uni(rng, 0.12, 0.93) * if rng.random::<bool>() { 1.0 } else { -1.0 };
            let (hw, depth) = if sharp {
                (uni(rng, 0.015, 0.04), uni(rng, 0.02, 0.06))
            } else {
                (uni(rng, 0.025, 0.08), uni(rng, 0.006, 0.03))
            };
            let cap = 0.45 * shape.chord_at(c.abs(), side(c));
            bumps.push(EdgeBump { c, hw, depth: depth.min(cap), sharp });
        }
        shape.bumps = bumps;
        shape.serration = (0..96).map(|_| uni(rng, -1.0, 1.0)).collect();
        shape.serr_amp = uni(rng, 0.002, 0.01);
        shape.tip_cut = if rng.random::<f32>() < 0.18 {
            Some(TipCut { side: rng.random_range(0..2usize), at: uni(rng, 0.8, 0.95), tilt: uni(rng, -0.35, 0.35) })
        } else {
            None
        };
        shape.ped_w = uni(rng, 0.05, 0.08);
        shape.ped_flare = uni(rng, 0.06, 0.14);
        shape.pigmentation(rng);
        shape
    }

    fn blank(rng: &mut ChaCha8Rng) -> Self {
        Self {
            lift: [0.0; 2],
            sweep: [2.0; 2],
            curl: [0.0; 2],
            bow: [0.0; 2],
            chord: [0.3; 2],
            taper_q: [2.0; 2],
            taper_r: [0.7; 2],
            center_dip: 0.0,
            notch_depth: 0.0,
            notch_width: 0.05,
            bumps: Vec::new(),
            serration: vec![0.0; 4],
            serr_amp: 0.0,
            tip_cut: None,
            ped_w: 0.09,
            ped_flare: 0.05,
            bias: 0.0,
            sym: 0.5,
            radial: 0.0,
            n_sym: Lattice::new(rng, 16),
            n_asym: Lattice::new(rng, 16),
            n_mottle: Lattice::new(rng, 32),
            f_sym: 3.0,
            f_asym: 3.0,
            lobe_blob: [(0.0, 0.0, 0.0, 0.0); 2],
            margin: 0.04,
            center_dark: 0.5,
            white_level: 0.85,
            patch_soft: 0.06,
            streaks: Vec::new(),
            arcs: Vec::new(),
            discs: Vec::new(),
        }
    }

    fn pigmentation(&mut self, rng: &mut ChaCha8Rng) {
        // From almost all-black to almost all-white undersides, like the five humpback fluke
        // pattern classes used by photo-ID catalogues.
        self.bias = uni(rng, -0.8, 0.35);
        self.sym = uni(rng, 0.35, 0.85);
        self.radial = uni(rng, 0.0, 0.6);
        self.f_sym = uni(rng, 2.0, 4.5);
        self.f_asym = uni(rng, 2.5, 6.0);
        for s in 0..2 {
            let su = if s == 0 { -1.0 } else { 1.0 };
            let cu = su * uni(rng, 0.3, 0.6);
            let cv = self.trailing_base(cu) - uni(rng, 0.12, 0.25);
            self.lobe_blob[s] = (cu, cv, uni(rng, 0.15, 0.4), uni(rng, 0.0, 0.9));
        }
        self.margin = uni(rng, 0.012, 0.07);
        self.center_dark = uni(rng, 0.0, 1.0);
        self.white_level = uni(rng, 0.8, 0.95);
        self.patch_soft = uni(rng, 0.01, 0.04);

        let le0 = self.leading(0.0);
        for _ in 0..rng.random_range(0..5usize) {
            let su = if rng.random::<bool>() { 1.0 } else { -1.0 };
            let u1 = su * uni(rng, 0.25, 0.85);
            let v1 = self.trailing_base(u1) - uni(rng, 0.0, 0.05);
            let u0 = su * uni(rng, 0.02, 0.2);
            let v0 = le0 + uni(rng, 0.05, 0.25);
            self.streaks.push(Streak { u0, v0, u1, v1, bend: uni(rng, -0.06, 0.06), width: uni(rng, 0.004, 0.014) });
        }
        // Killer-whale rake marks: 2-4 parallel arcs.
        for _ in 0..rng.random_range(0..4usize) {
            let (cu, cv) = self.random_point_on_lobe(rng);
            let r = uni(rng, 0.08, 0.35);
            let dir = uni(rng, 0.0, std::f32::consts::TAU);
            let span = uni(rng, 0.3, 1.1) / (1.0 + r);
            let spacing = uni(rng, 0.015, 0.035);
            let width = uni(rng, 0.003, 0.008);
            let albedo = uni(rng, 0.6, 0.95);
            // Centre the arc family on the chosen point so it lands on the lobe.
            let ccu = cu - r * dir.cos();
            let ccv = cv - r * dir.sin();
            for k in 0..rng.random_range(2..5usize) {
                let rr = r + k as f32 * spacing;
                self.arcs.push(Arc {
                    cu: ccu,
                    cv: ccv,
                    r: rr,
                    a0: dir - span / 2.0,
                    a1: dir + span / 2.0,
                    width,
                    albedo,
                });
            }
        }
        // Cookie-cutter bites, barnacle scars (pale rings and ovals) and black spots.
        for _ in 0..rng.random_range(0..8usize) {
            let (cu, cv) = self.random_point_on_lobe(rng);
            let r = uni(rng, 0.008, 0.025);
            let ring = rng.random::<bool>();
            self.discs.push(Disc { cu, cv, ru: r * uni(rng, 0.8, 1.4), rv: r, ring, albedo: uni(rng, 0.55, 0.95) });
        }
        for _ in 0..rng.random_range(0..25usize) {
            let (cu, cv) = self.random_point_on_lobe(rng);
            let r = uni(rng, 0.004, 0.014);
            self.discs.push(Disc { cu, cv, ru: r, rv: r * uni(rng, 0.7, 1.2), ring: false, albedo: 0.05 });
        }
    }

    fn random_point_on_lobe(&self, rng: &mut ChaCha8Rng) -> (f32, f32) {
        let u = uni(rng, 0.1, 0.85) * if rng.random::<bool>() { 1.0 } else { -1.0 };
        let te = self.trailing_base(u);
        let le = self.leading(u);
        (u, lerp(le, te, uni(rng, 0.15, 0.85)))
    }

    fn chord_at(&self, a: f32, s: usize) -> f32 {
        if a < 1.0 {
            self.chord[s] * (1.0 - a.powf(self.taper_q[s])).max(0.0).powf(self.taper_r[s])
        } else {
            -(a - 1.0) * 3.0
        }
    }

    /// Trailing edge before damage: sweep towards the tips plus tip curl and a concave/convex bow.
    fn trailing_base(&self, u: f32) -> f32 {
        let s = side(u);
        let a = u.abs();
        self.lift[s] * a.powf(self.sweep[s])
            + self.curl[s] * (a - 0.7).max(0.0).powi(2)
            + self.bow[s] * (std::f32::consts::PI * a.min(1.0)).sin()
    }

    pub(crate) fn trailing(&self, u: f32) -> f32 {
        let a = u.abs();
        let mut t = self.trailing_base(u);
        let n = (1.0 - a / self.notch_width).max(0.0);
        t -= self.notch_depth * n * n.sqrt();
        for b in &self.bumps {
            let x = (u - b.c) / b.hw;
            if x.abs() < 1.0 {
                let p = if b.sharp { (1.0 - x.abs()).powi(2) } else { (1.0 - x * x).powi(2) };
                t -= b.depth * p;
            }
        }
        // Fine serration fades out at the tips so it cannot detach slivers where the chord is 0.
        let pos = (u + U_EXTENT) / (2.0 * U_EXTENT) * (self.serration.len() - 2) as f32;
        let i = (pos.floor() as usize).min(self.serration.len() - 2);
        let f = pos - i as f32;
        let f = f * f * (3.0 - 2.0 * f);
        let serr = lerp(self.serration[i], self.serration[i + 1], f);
        t + self.serr_amp * serr * (1.0 - smoothstep(0.85, 1.0, a))
    }

    pub(crate) fn leading(&self, u: f32) -> f32 {
        let s = side(u);
        let a = u.abs();
        self.trailing_base(u) - self.chord_at(a, s) - self.center_dip * (-(a / 0.3) * (a / 0.3)).exp()
    }

    fn tip_cap(&self, u: f32, v: f32) -> f32 {
        match &self.tip_cut {
            Some(c) if side(u) == c.side => c.at - u.abs() + c.tilt * (v - self.lift[c.side]),
            _ => f32::INFINITY,
        }
    }

    /// (u, trailing edge, leading edge) samples across the lobes (no tail stock), for framing
    /// the fluke in a photo and placing water streaming off its edges.
    pub(crate) fn outline(&self) -> Vec<(f32, f32, f32)> {
        let mut pts = Vec::with_capacity(201);
        for i in 0..=200 {
            let u = -1.0 + i as f32 * 0.01;
            let te = self.trailing(u);
            let le = self.leading(u);
            if self.tip_cap(u, te) < 0.0 || te <= le {
                continue;
            }
            pts.push((u, te, le));
        }
        pts
    }

    fn v_top(&self) -> f32 {
        (0..=220).map(|i| self.trailing(-1.1 + i as f32 * 0.01)).fold(f32::MIN, f32::max) + 0.05
    }

    /// Albedo of the ventral side before scars: 0 black skin, about 0.9 white patches.
    fn base_albedo(&self, u: f32, v: f32, d_top: f32, on_stock: bool) -> f32 {
        let a = u.abs();
        let s = side(u);
        let sym = self.n_sym.fbm(a * self.f_sym, v * self.f_sym, 3);
        let asym = self.n_asym.fbm(u * self.f_asym + 5.0, v * self.f_asym, 3);
        // Noise stretched along rays from the tail stock gives the streaky, radiating look of
        // real ventral patterns.
        let (ru, rv) = (a, v + 0.6);
        // A little domain warp keeps the rays from being ruler-straight.
        let ang = rv.atan2(ru) + 0.12 * asym;
        let rad = (ru * ru + rv * rv).sqrt();
        let streaky = self.n_sym.fbm(ang * 9.0 + 3.0, rad * 1.5, 3);
        let (bu, bv, br, bs) = self.lobe_blob[s];
        let blob = bs * (-((u - bu).powi(2) + (v - bv).powi(2)) / (br * br)).exp();
        let tex = lerp(self.sym * sym + (1.0 - self.sym) * asym, streaky, self.radial);
        let mut field = self.bias + blob + 1.5 * tex;
        // Dark trailing margin and dark midline are near-universal in humpback flukes.
        field -= 1.6 * (1.0 - d_top / self.margin).max(0.0);
        field -= self.center_dark * (-(u / 0.07).powi(2)).exp();
        if on_stock {
            field -= 1.2;
        }
        let white = smoothstep(-self.patch_soft, self.patch_soft, field);
        // White skin is never flat: grey mottling, strongest in the white areas.
        let mottle = self.n_mottle.fbm(u * 14.0, v * 14.0, 3) * (0.03 + 0.12 * white);
        (0.05 + (self.white_level - 0.05) * white + mottle).clamp(0.0, 1.0)
    }
}

#[inline]
fn smax(a: f32, b: f32, k: f32) -> f32 {
    let h = (0.5 + 0.5 * (a - b) / k).clamp(0.0, 1.0);
    lerp(b, a, h) + k * h * (1.0 - h)
}

/// One pyramid level: texels hold (coverage, coverage × albedo). Premultiplying keeps bilinear
/// filtering and mip averaging from bleeding black or white fringes into the silhouette.
pub(crate) struct Level {
    pub(crate) w: usize,
    pub(crate) h: usize,
    /// Texels per fluke unit.
    pub(crate) ppu: f32,
    pub(crate) texels: Vec<[f32; 2]>,
}

pub(crate) struct Sprite {
    pub(crate) levels: Vec<Level>,
    /// Fluke-unit `v` of the top texel row's upper edge.
    pub(crate) v_top: f32,
    pub(crate) outline: Vec<(f32, f32, f32)>,
}

impl Sprite {
    /// Picks the level whose texel density is at most twice the on-screen pixel density, so
    /// bilinear sampling never skips texels enough to alias.
    pub(crate) fn level_for(&self, screen_ppu: f32) -> &Level {
        let mut best = &self.levels[0];
        for l in &self.levels {
            if l.ppu >= screen_ppu * 0.999 {
                best = l;
            }
        }
        best
    }
}

pub(crate) fn build_sprite(shape: &FlukeShape, top_width: usize) -> Sprite {
    let w = top_width.max(32);
    let ppu = w as f32 / (2.0 * U_EXTENT);
    let v_top = shape.v_top();
    let h = ((v_top - V_LO) * ppu).ceil() as usize;

    // Edges depend on u only: evaluate once per column, with slope corrections that turn the
    // vertical distance to an edge into an approximate true distance (even soft-edge width on
    // steep notches and at the tips).
    let col_u: Vec<f32> = (0..w).map(|x| -U_EXTENT + (x as f32 + 0.5) / ppu).collect();
    let te: Vec<f32> = col_u.iter().map(|&u| shape.trailing(u)).collect();
    let le: Vec<f32> = col_u.iter().map(|&u| shape.leading(u)).collect();
    let slope_norm = |e: &[f32], x: usize| {
        let l = e[x.saturating_sub(1)];
        let r = e[(x + 1).min(w - 1)];
        let d = (r - l) * ppu / 2.0;
        1.0 / (1.0 + d * d).sqrt()
    };
    let nt: Vec<f32> = (0..w).map(|x| slope_norm(&te, x)).collect();
    let nl: Vec<f32> = (0..w).map(|x| slope_norm(&le, x)).collect();
    let le0 = shape.leading(0.0);
    let v_join = le0 + 0.06;

    // Coverage is computed per texel; the smooth base pigmentation only on every other texel in
    // each direction (it is the costly part) and interpolated, while scars are stamped at full
    // resolution below.
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut coarse = vec![0.0f32; cw * ch];
    let mut cov = vec![0.0f32; w * h];
    for y in 0..h {
        let v = v_top - (y as f32 + 0.5) / ppu;
        // The tail stock is narrow under the flukes and flares towards the body.
        let below = (v_join - v).max(0.0);
        let pw = shape.ped_w + shape.ped_flare * below * below.sqrt();
        let grid_row = y % 2 == 0;
        for x in 0..w {
            let u = col_u[x];
            let a = u.abs();
            let d_top = (te[x] - v) * nt[x];
            let d_lobe = d_top.min((v - le[x]) * nl[x]).min(shape.tip_cap(u, v));
            let d_stock = (pw - a).min(v_join - v);
            let d = smax(d_lobe, d_stock, 0.05);
            cov[y * w + x] = (0.5 + d * ppu).clamp(0.0, 1.0);
            // Grid points up to a few texels outside the silhouette feed the interpolation at
            // its edge.
            if grid_row && x % 2 == 0 && d * ppu > -4.0 {
                coarse[(y / 2) * cw + x / 2] = shape.base_albedo(u, v, d_top.max(0.0), d_lobe < 0.0);
            }
        }
    }
    let mut alb = vec![0.0f32; w * h];
    for y in 0..h {
        let (j0, j1, fy) = ((y / 2).min(ch - 1), (y.div_ceil(2)).min(ch - 1), 0.5 * (y % 2) as f32);
        for x in 0..w {
            let i = y * w + x;
            if cov[i] <= 0.0 {
                continue;
            }
            let (i0, i1, fx) = ((x / 2).min(cw - 1), (x.div_ceil(2)).min(cw - 1), 0.5 * (x % 2) as f32);
            let top = lerp(coarse[j0 * cw + i0], coarse[j0 * cw + i1], fx);
            let bot = lerp(coarse[j1 * cw + i0], coarse[j1 * cw + i1], fx);
            alb[i] = lerp(top, bot, fy);
        }
    }

    let to_px = |u: f32, v: f32| ((u + U_EXTENT) * ppu, (v_top - v) * ppu);
    // Scars and streaks are stamped over their own bounding boxes: cheap, however many.
    let mut stamp = |u0: f32, v0: f32, u1: f32, v1: f32, f: &dyn Fn(f32, f32) -> Option<(f32, f32)>| {
        let (x0, y0) = to_px(u0, v1);
        let (x1, y1) = to_px(u1, v0);
        let xs = (x0.floor().max(0.0) as usize).min(w);
        let xe = (x1.ceil().max(0.0) as usize).min(w);
        let ys = (y0.floor().max(0.0) as usize).min(h);
        let ye = (y1.ceil().max(0.0) as usize).min(h);
        for y in ys..ye {
            let v = v_top - (y as f32 + 0.5) / ppu;
            let row = y * w;
            for ((&u, &c), a) in col_u[xs..xe].iter().zip(&cov[row + xs..row + xe]).zip(&mut alb[row + xs..row + xe]) {
                if c <= 0.0 {
                    continue;
                }
                if let Some((k, target)) = f(u, v) {
                    *a = lerp(*a, target, k);
                }
            }
        }
    };
    let px = 1.0 / ppu;
    for s in &shape.streaks {
        let (du, dv) = (s.u1 - s.u0, s.v1 - s.v0);
        let len2 = du * du + dv * dv;
        let len = len2.sqrt().max(1e-6);
        let pad = s.width + s.bend.abs() + 2.0 * px;
        stamp(s.u0.min(s.u1) - pad, s.v0.min(s.v1) - pad, s.u0.max(s.u1) + pad, s.v0.max(s.v1) + pad, &|u, v| {
            let t = ((u - s.u0) * du + (v - s.v0) * dv) / len2;
            if !(0.0..=1.0).contains(&t) {
                return None;
            }
            // Signed distance from the chord, minus a sine bow: a curved, feathery streak that
            // tapers at both ends.
            let perp = ((u - s.u0) * dv - (v - s.v0) * du) / len;
            let bow = s.bend * (std::f32::consts::PI * t).sin();
            let wdt = s.width * (std::f32::consts::PI * t).sin().sqrt() * (1.0 - 0.5 * t);
            let k = ((wdt - (perp - bow).abs()) / px + 0.5).clamp(0.0, 1.0) * 0.9;
            (k > 0.0).then_some((k, 0.04))
        });
    }
    for a in &shape.arcs {
        let pad = a.width + 2.0 * px;
        stamp(a.cu - a.r - pad, a.cv - a.r - pad, a.cu + a.r + pad, a.cv + a.r + pad, &|u, v| {
            let ang = (v - a.cv).atan2(u - a.cu);
            let mut da = ang - (a.a0 + a.a1) / 2.0;
            da = (da + std::f32::consts::PI).rem_euclid(std::f32::consts::TAU) - std::f32::consts::PI;
            let half = (a.a1 - a.a0) / 2.0;
            if da.abs() > half {
                return None;
            }
            let dist = ((u - a.cu).powi(2) + (v - a.cv).powi(2)).sqrt() - a.r;
            // Rake marks thin out towards their ends.
            let wdt = a.width * (1.0 - (da / half).powi(2)).sqrt();
            let k = ((wdt - dist.abs()) / px + 0.5).clamp(0.0, 1.0);
            (k > 0.0).then_some((k, a.albedo))
        });
    }
    for d in &shape.discs {
        let pad = 2.0 * px;
        stamp(d.cu - d.ru - pad, d.cv - d.rv - pad, d.cu + d.ru + pad, d.cv + d.rv + pad, &|u, v| {
            let q = (((u - d.cu) / d.ru).powi(2) + ((v - d.cv) / d.rv).powi(2)).sqrt();
            let dist = (q - 1.0) * d.rv;
            let k = if d.ring {
                ((0.35 * d.rv - dist.abs()) / px + 0.5).clamp(0.0, 1.0)
            } else {
                (-dist / px + 0.5).clamp(0.0, 1.0)
            };
            (k > 0.0).then_some((k, d.albedo))
        });
    }

    let mut texels = Vec::with_capacity(w * h);
    for i in 0..w * h {
        texels.push([cov[i], cov[i] * alb[i]]);
    }
    let mut levels = vec![Level { w, h, ppu, texels }];
    while levels.last().is_some_and(|l| l.w >= 64 && l.h >= 32) {
        let prev = &levels[levels.len() - 1];
        let (nw, nh) = (prev.w / 2, prev.h / 2);
        let mut t = Vec::with_capacity(nw * nh);
        for y in 0..nh {
            let r0 = &prev.texels[2 * y * prev.w..];
            let r1 = &prev.texels[(2 * y + 1) * prev.w..];
            for x in 0..nw {
                let (a, b, c, d) = (r0[2 * x], r0[2 * x + 1], r1[2 * x], r1[2 * x + 1]);
                t.push([(a[0] + b[0] + c[0] + d[0]) * 0.25, (a[1] + b[1] + c[1] + d[1]) * 0.25]);
            }
        }
        let nppu = prev.ppu * 0.5;
        levels.push(Level { w: nw, h: nh, ppu: nppu, texels: t });
    }
    Sprite { levels, v_top, outline: shape.outline() }
}
