//! Seeding, cheap per-pixel hashing and the tileable textures shared by all photos.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// RNG domains keep the streams of plan, individuals, photos and textures apart, so adding a
/// draw in one place never shifts the random numbers used anywhere else.
pub(crate) const DOMAIN_PLAN: u64 = 1;
pub(crate) const DOMAIN_REGULAR: u64 = 2;
pub(crate) const DOMAIN_SINGLETON: u64 = 3;
pub(crate) const DOMAIN_PHOTO: u64 = 4;
pub(crate) const DOMAIN_TEXTURE: u64 = 5;

/// A ChaCha8 stream keyed by (seed, domain, index): independent of which thread asks for it and
/// of the order in which photos are rendered.
pub(crate) fn rng_for(seed: u64, domain: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(mix64(seed ^ domain.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    rng.set_stream(index);
    rng
}

/// SplitMix64 finaliser: a fast, well-mixed stateless hash for per-pixel noise.
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform draw that tolerates an empty interval (lo == hi), unlike `random_range`, which panics.
#[inline]
pub(crate) fn uni(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.random::<f32>()
}

/// Approximately normal N(0, 1) draw from the RNG (Irwin-Hall with four terms is plenty for
/// scene parameters and keeps the draw count fixed).
pub(crate) fn gauss(rng: &mut ChaCha8Rng) -> f32 {
    let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
    (s - 2.0) * 1.732_050_8
}

/// Floor to integer without a libm call: the x86-64 baseline target has no SSE4.1 `roundss`,
/// so `f32::floor` is a function call, and it sits in the innermost loops.
#[inline]
pub(crate) fn floor_i(x: f32) -> i32 {
    let i = x as i32;
    i - i32::from(x < i as f32)
}

#[inline]
pub(crate) fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

#[inline]
pub(crate) fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

#[inline]
pub(crate) fn lerp3(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [lerp(a[0], b[0], t), lerp(a[1], b[1], t), lerp(a[2], b[2], t)]
}

/// Tileable value noise on an n×n lattice (n a power of two), used for fluke pigmentation (each
/// individual owns its lattices, which is what makes its pattern unique and stable across photos).
pub(crate) struct Lattice {
    n: usize,
    vals: Vec<f32>,
}

impl Lattice {
    pub(crate) fn new(rng: &mut ChaCha8Rng, n: usize) -> Self {
        let n = n.next_power_of_two();
        let vals = (0..n * n).map(|_| uni(rng, -1.0, 1.0)).collect();
        Self { n, vals }
    }

    pub(crate) fn sample(&self, x: f32, y: f32) -> f32 {
        let xi = floor_i(x);
        let yi = floor_i(y);
        let tx = x - xi as f32;
        let ty = y - yi as f32;
        // Power-of-two size: masking the two's complement value is a correct modulo.
        let m = self.n - 1;
        let x0 = (xi as u32 as usize) & m;
        let y0 = (yi as u32 as usize) & m;
        let x1 = (x0 + 1) & m;
        let y1 = (y0 + 1) & m;
        let sx = tx * tx * (3.0 - 2.0 * tx);
        let sy = ty * ty * (3.0 - 2.0 * ty);
        let v = |xx: usize, yy: usize| self.vals[yy * self.n + xx];
        lerp(lerp(v(x0, y0), v(x1, y0), sx), lerp(v(x0, y1), v(x1, y1), sx), sy)
    }

    /// Fractal sum; octave offsets decorrelate the octaves, which share one lattice.
    pub(crate) fn fbm(&self, x: f32, y: f32, octaves: u32) -> f32 {
        let mut sum = 0.0;
        let mut amp = 0.6;
        let mut f = 1.0;
        for o in 0..octaves {
            let off = o as f32 * 7.31;
            sum += amp * self.sample(x * f + off, y * f - off);
            amp *= 0.5;
            f *= 2.03;
        }
        sum
    }
}

/// A power-of-two, tileable scalar texture sampled bilinearly with wrap-around.
pub(crate) struct Tex {
    mask: usize,
    shift: u32,
    data: Vec<f32>,
}

impl Tex {
    #[inline]
    pub(crate) fn sample(&self, u: f32, v: f32) -> f32 {
        let ui = floor_i(u);
        let vi = floor_i(v);
        let fu = u - ui as f32;
        let fv = v - vi as f32;
        // Two's complement wrap of the i32 followed by the mask gives a correct modulo for
        // negative coordinates too, because the size is a power of two.
        let x0 = (ui as u32 as usize) & self.mask;
        let y0 = (vi as u32 as usize) & self.mask;
        let x1 = (x0 + 1) & self.mask;
        let y1 = (y0 + 1) & self.mask;
        let r0 = y0 << self.shift;
        let r1 = y1 << self.shift;
        let d = &self.data;
        let a = d[r0 + x0] + (d[r0 + x1] - d[r0 + x0]) * fu;
        let b = d[r1 + x0] + (d[r1 + x1] - d[r1 + x0]) * fu;
        a + (b - a) * fv
    }
}

impl Tex {
    /// Next mip level: 2×2 box average, still tileable.
    fn half(&self) -> Tex {
        // Power-of-two sizes: half of mask + 1.
        let n = self.mask / 2 + 1;
        let src_n = self.mask + 1;
        let mut data = Vec::with_capacity(n * n);
        for y in 0..n {
            for x in 0..n {
                let at = |xx: usize, yy: usize| self.data[yy * src_n + xx];
                data.push(
                    0.25 * (at(2 * x, 2 * y) + at(2 * x + 1, 2 * y) + at(2 * x, 2 * y + 1) + at(2 * x + 1, 2 * y + 1)),
                );
            }
        }
        Tex { mask: n - 1, shift: self.shift - 1, data }
    }
}

/// Textures shared read-only by every photo of one lake. They depend on the seed only, and each
/// photo samples them through its own random offset, rotation and scale.
pub(crate) struct Textures {
    /// Sea surface shading in about [-1, 1]: a directional sum of sines (swell and chop), as a
    /// mip chain. Towards the horizon one pixel covers many texels; the coarser levels keep
    /// that from aliasing and keep the lookups inside the cache.
    pub(crate) waves: Vec<Tex>,
    /// Blobby fractal noise in about [-1, 1], for clouds and foam.
    pub(crate) blobs: Tex,
    /// Sensor noise: a unit-variance luminance table and two weaker chroma tables. Each photo row reads a
    /// contiguous run at a hashed offset, which costs a load instead of a hash per pixel and
    /// lets the tone pass vectorise; runs of 2^18 samples are far too long to repeat visibly.
    pub(crate) grain: [Vec<f32>; 3],
}

pub(crate) const GRAIN_LEN: usize = 1 << 18;

impl Textures {
    pub(crate) fn new(seed: u64) -> Self {
        let mut rng = rng_for(seed, DOMAIN_TEXTURE, 0);
        let mut waves = vec![wave_texture(&mut rng, 9)];
        while waves.len() < 6 {
            let next = waves[waves.len() - 1].half();
            waves.push(next);
        }
        let blobs = blob_texture(&mut rng, 8);
        let mut table = |sd: f32| -> Vec<f32> {
            (0..GRAIN_LEN)
                .map(|_| {
                    // Sum of four uniforms: near-gaussian, bounded, cheap.
                    let z = rng.random::<u64>();
                    let b = |k: u32| ((z >> (16 * k)) & 0xFFFF) as f32 / 65535.0;
                    (b(0) + b(1) + b(2) + b(3) - 2.0) * 1.732_050_8 * sd
                })
                .collect()
        };
        let grain = [table(1.0), table(0.45), table(0.45)];
        Self { waves, blobs, grain }
    }
}

fn wave_texture(rng: &mut ChaCha8Rng, log2: u32) -> Tex {
    let n = 1usize << log2;
    let mut data = vec![0.0f32; n * n];
    let tau = std::f32::consts::TAU;
    // Integer wave vectors keep the texture tileable; most energy travels along one wind
    // direction, with a spread that gives the crossing chop of a real sea.
    let wind = uni(rng, 0.0, tau);
    let mut sx = vec![0.0f32; n];
    let mut cx = vec![0.0f32; n];
    let mut sy = vec![0.0f32; n];
    let mut cy = vec![0.0f32; n];
    for i in 0..40 {
        let k = 3.0 * (90.0f32 / 3.0).powf(uni(rng, 0.0, 1.0));
        let spread = if i % 5 == 0 { 1.6 } else { 0.45 };
        let dir = wind + spread * gauss(rng);
        let kx = (k * dir.cos()).round();
        let ky = (k * dir.sin()).round();
        if kx == 0.0 && ky == 0.0 {
            continue;
        }
        let kk = (kx * kx + ky * ky).sqrt();
        let amp = kk.powf(-0.35);
        let phase = uni(rng, 0.0, tau);
        for t in 0..n {
            let a = tau * kx * t as f32 / n as f32 + phase;
            sx[t] = a.sin();
            cx[t] = a.cos();
            let b = tau * ky * t as f32 / n as f32;
            sy[t] = b.sin();
            cy[t] = b.cos();
        }
        // sin(a + b) = sin a cos b + cos a sin b makes every wave separable: two multiplies per
        // texel instead of a sine.
        for y in 0..n {
            let row = &mut data[y * n..(y + 1) * n];
            let (c, s) = (cy[y] * amp, sy[y] * amp);
            for x in 0..n {
                row[x] += sx[x] * c + cx[x] * s;
            }
        }
    }
    // Sharpen crests and flatten troughs the way wind waves look, then normalise.
    let rms = (data.iter().map(|v| v * v).sum::<f32>() / data.len() as f32).sqrt().max(1e-6);
    for v in &mut data {
        let x = *v / (2.2 * rms);
        *v = if x > 0.0 { x.powf(0.75) } else { -(-x).powf(1.3) }.clamp(-1.0, 1.0);
    }
    Tex { mask: n - 1, shift: log2, data }
}

fn blob_texture(rng: &mut ChaCha8Rng, log2: u32) -> Tex {
    let n = 1usize << log2;
    let mut data = vec![0.0f32; n * n];
    let mut amp = 0.55;
    let mut cells = 4usize;
    while cells <= n / 2 {
        let lat = Lattice::new(rng, cells);
        let scale = cells as f32 / n as f32;
        for y in 0..n {
            for x in 0..n {
                data[y * n + x] += amp * lat.sample(x as f32 * scale, y as f32 * scale);
            }
        }
        amp *= 0.55;
        cells *= 2;
    }
    Tex { mask: n - 1, shift: log2, data }
}
