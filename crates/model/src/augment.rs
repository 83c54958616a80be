//! Heavy training augmentation on batched image tensors.
//!
//! The input is a float batch `[N, 3, H, W]` with values in `0..=1`, on whatever device the
//! training step uses; every op runs there, so on a GPU the augmentation never leaves it.
//!
//! Every [`Aug`] has a probability `p` that each image of the batch decides on independently,
//! and every image draws its own parameters. The images that fire are gathered with one
//! `index_select`, the op runs on that sub-batch with its parameters held as tensors, and the
//! result is scattered back with one `index_copy`. So an op with a small `p` costs only its
//! share of the batch, and `p = 0` leaves the batch bit-for-bit untouched. All randomness comes
//! from libtorch's generator, so `tch::manual_seed` makes a run reproducible.
//!
//! Geometry: consecutive `Rotate`, `Affine` and `Perspective` ops are composed per image into
//! one 3×3 homography and resampled with a single bilinear `grid_sample`, so a chain of rotate,
//! affine and perspective blurs the image once and costs one pass. Matrices act on normalised
//! coordinates (`-1..1` across each axis, pixel centres as with `align_corners = false`, origin
//! at the image centre), conjugated by the aspect ratio so that rotations and shears are true
//! in pixels on non-square images. Every transform is centred on the image centre and
//! translations are capped at half the size, so the subject stays roughly centred. Pixels that
//! map from outside the image are filled by **reflection** rather than zeros: a black wedge
//! is a shortcut a re-identification model could learn, sea and sky reflected are not. Flips
//! stay exact tensor flips (no resampling) and end a geometric run.
//!
//! Convolutions (blurs, sharpen) pad by replicating the border, which works at any image size.
//! Values are clamped to `0..=1` after every op that can leave that range, as albumentations
//! does, so a later colour op never sees out-of-range input.

use std::collections::BTreeMap;
use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

/// One augmentation and its parameter ranges. Each image draws its own values uniformly in the
/// stated range.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AugOp {
    /// Mirror left–right. Note that a mirrored fluke shows a mirrored pattern: if the labels
    /// treat a mirrored fluke as another individual, leave this op out.
    HFlip,
    /// Mirror top–bottom.
    VFlip,
    /// Rotation about the image centre by an angle uniform in `±degrees`.
    Rotate { degrees: f64 },
    /// Isotropic scale uniform in `scale`, translation uniform in `±translate` of the width and
    /// height, shear uniform in `±shear` degrees along each axis.
    Affine {
        scale: (f64, f64),
        translate: f64,
        shear: f64,
    },
    /// Each image corner moves by up to `±distortion / 2` of the half-size along each axis (so at
    /// 1 a corner moves by up to a quarter of the image), and the image follows that homography.
    Perspective { distortion: f64 },
    /// Brightness factor uniform in `1 ± brightness`, then contrast factor uniform in
    /// `1 ± contrast` around the image's mean luma (as torchvision's ColorJitter).
    BrightnessContrast { brightness: f64, contrast: f64 },
    /// Hue shift uniform in `±hue` of the colour circle, then saturation factor uniform in
    /// `1 ± saturation`.
    HueSaturation { hue: f64, saturation: f64 },
    /// Per-channel additive shift, each uniform in `±shift`.
    RgbShift { shift: f64 },
    /// Additive per-pixel Gaussian noise with standard deviation `std`.
    GaussianNoise { std: f64 },
    /// Gaussian blur with sigma (in pixels) uniform in `sigma`.
    GaussianBlur { sigma: (f64, f64) },
    /// Blur along a line through the centre at a uniform direction; the line length is an odd
    /// number of pixels drawn uniformly from `3..=max_kernel`.
    MotionBlur { max_kernel: i64 },
    /// Laplacian sharpening `x + alpha * (8x - sum of 8 neighbours)`, alpha uniform in `alpha`.
    Sharpen { alpha: (f64, f64) },
    /// Cut-out of one rectangle whose area is a fraction uniform in `area` of the image and
    /// whose height/width ratio is log-uniform in `aspect`; each image fills it either with
    /// uniform noise or with its own per-channel mean (even odds).
    RandomErasing {
        area: (f64, f64),
        aspect: (f64, f64),
    },
}

/// An op and the probability that each image gets it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Aug {
    pub op: AugOp,
    pub p: f64,
}

/// One numeric config parameter: its default and its valid closed range.
struct Param {
    name: &'static str,
    default: f64,
    min: f64,
    max: f64,
    integer: bool,
}

const fn real(name: &'static str, default: f64, min: f64, max: f64) -> Param {
    Param {
        name,
        default,
        min,
        max,
        integer: false,
    }
}

const NAMES: &[&str] = &[
    "hflip",
    "vflip",
    "rotate",
    "affine",
    "perspective",
    "brightness_contrast",
    "hue_saturation",
    "rgb_shift",
    "gaussian_noise",
    "gaussian_blur",
    "motion_blur",
    "sharpen",
    "random_erasing",
];

/// Parameters of each config name, in the order `from_config` destructures them. The ranges
/// keep every draw well-posed: shear below 45° keeps the affine matrix invertible, translate at
/// most half the size keeps the subject in view, factors `1 ± x` with `x <= 1` stay >= 0.
fn params_of(name: &str) -> Option<&'static [Param]> {
    const ROTATE: &[Param] = &[real("degrees", 15.0, 0.0, 180.0)];
    const AFFINE: &[Param] = &[
        real("scale_min", 0.9, 0.25, 4.0),
        real("scale_max", 1.1, 0.25, 4.0),
        real("translate", 0.0625, 0.0, 0.5),
        real("shear", 5.0, 0.0, 30.0),
    ];
    const PERSPECTIVE: &[Param] = &[real("distortion", 0.2, 0.0, 1.0)];
    const BRIGHTNESS_CONTRAST: &[Param] = &[
        real("brightness", 0.2, 0.0, 1.0),
        real("contrast", 0.2, 0.0, 1.0),
    ];
    const HUE_SATURATION: &[Param] = &[
        real("hue", 0.05, 0.0, 0.5),
        real("saturation", 0.3, 0.0, 1.0),
    ];
    const RGB_SHIFT: &[Param] = &[real("shift", 0.08, 0.0, 1.0)];
    const GAUSSIAN_NOISE: &[Param] = &[real("std", 0.03, 0.0, 1.0)];
    const GAUSSIAN_BLUR: &[Param] = &[
        real("sigma_min", 0.1, 0.0, 10.0),
        real("sigma_max", 2.0, 0.0, 10.0),
    ];
    const MOTION_BLUR: &[Param] = &[Param {
        name: "max_kernel",
        default: 7.0,
        min: 3.0,
        max: 31.0,
        integer: true,
    }];
    const SHARPEN: &[Param] = &[
        real("alpha_min", 0.2, 0.0, 1.0),
        real("alpha_max", 0.5, 0.0, 1.0),
    ];
    const RANDOM_ERASING: &[Param] = &[
        real("area_min", 0.02, 0.001, 1.0),
        real("area_max", 0.2, 0.001, 1.0),
        real("aspect_min", 0.3, 0.05, 20.0),
        real("aspect_max", 3.3, 0.05, 20.0),
    ];
    Some(match name {
        "hflip" | "vflip" => &[],
        "rotate" => ROTATE,
        "affine" => AFFINE,
        "perspective" => PERSPECTIVE,
        "brightness_contrast" => BRIGHTNESS_CONTRAST,
        "hue_saturation" => HUE_SATURATION,
        "rgb_shift" => RGB_SHIFT,
        "gaussian_noise" => GAUSSIAN_NOISE,
        "gaussian_blur" => GAUSSIAN_BLUR,
        "motion_blur" => MOTION_BLUR,
        "sharpen" => SHARPEN,
        "random_erasing" => RANDOM_ERASING,
        _ => return None,
    })
}

fn param_list(spec: &[Param]) -> String {
    if spec.is_empty() {
        "(none)".to_string()
    } else {
        spec.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
    }
}

/// Err unless `lo <= hi`, naming both params.
fn ordered(op: &str, lo_name: &str, lo: f64, hi_name: &str, hi: f64) -> Result<(), String> {
    if lo <= hi {
        Ok(())
    } else {
        Err(format!(
            "augmentation op \"{op}\": param \"{lo_name}\" ({lo}) must not exceed \"{hi_name}\" ({hi})"
        ))
    }
}

impl AugOp {
    /// Builds an op from its config name and numeric params, e.g. `("rotate", {"degrees": 15})`.
    ///
    /// | name | params: default [valid range] |
    /// |---|---|
    /// | `hflip`, `vflip` | none |
    /// | `rotate` | `degrees`: 15 [0, 180] |
    /// | `affine` | `scale_min`: 0.9, `scale_max`: 1.1 [0.25, 4]; `translate`: 0.0625 [0, 0.5]; `shear`: 5 [0, 30] |
    /// | `perspective` | `distortion`: 0.2 [0, 1] |
    /// | `brightness_contrast` | `brightness`: 0.2, `contrast`: 0.2 [0, 1] |
    /// | `hue_saturation` | `hue`: 0.05 [0, 0.5]; `saturation`: 0.3 [0, 1] |
    /// | `rgb_shift` | `shift`: 0.08 [0, 1] |
    /// | `gaussian_noise` | `std`: 0.03 [0, 1] |
    /// | `gaussian_blur` | `sigma_min`: 0.1, `sigma_max`: 2 [0, 10] |
    /// | `motion_blur` | `max_kernel`: 7 [3, 31], a whole number |
    /// | `sharpen` | `alpha_min`: 0.2, `alpha_max`: 0.5 [0, 1] |
    /// | `random_erasing` | `area_min`: 0.02, `area_max`: 0.2 [0.001, 1]; `aspect_min`: 0.3, `aspect_max`: 3.3 [0.05, 20] |
    ///
    /// Every `*_min` must not exceed its `*_max`. An unknown name, an unknown param, a value
    /// that is not finite or out of range returns Err naming the op and the param and listing
    /// the valid ops, params or range.
    pub fn from_config(name: &str, params: &BTreeMap<String, f64>) -> Result<AugOp, String> {
        let spec = params_of(name).ok_or_else(|| {
            format!(
                "unknown augmentation op \"{name}\"; valid ops: {}",
                NAMES.join(", ")
            )
        })?;
        for (key, &value) in params {
            let Some(p) = spec.iter().find(|p| p.name == key) else {
                return Err(format!(
                    "augmentation op \"{name}\": unknown param \"{key}\"; valid params: {}",
                    param_list(spec)
                ));
            };
            if !value.is_finite() || value < p.min || value > p.max {
                return Err(format!(
                    "augmentation op \"{name}\": param \"{key}\" = {value} is out of range [{}, {}]",
                    p.min, p.max
                ));
            }
            if p.integer && value.fract() != 0.0 {
                return Err(format!(
                    "augmentation op \"{name}\": param \"{key}\" = {value} must be a whole number"
                ));
            }
        }
        let values: Vec<f64> = spec
            .iter()
            .map(|p| params.get(p.name).copied().unwrap_or(p.default))
            .collect();
        Ok(match (name, values.as_slice()) {
            ("hflip", []) => AugOp::HFlip,
            ("vflip", []) => AugOp::VFlip,
            ("rotate", &[degrees]) => AugOp::Rotate { degrees },
            ("affine", &[smin, smax, translate, shear]) => {
                ordered(name, "scale_min", smin, "scale_max", smax)?;
                AugOp::Affine {
                    scale: (smin, smax),
                    translate,
                    shear,
                }
            }
            ("perspective", &[distortion]) => AugOp::Perspective { distortion },
            ("brightness_contrast", &[brightness, contrast]) => AugOp::BrightnessContrast {
                brightness,
                contrast,
            },
            ("hue_saturation", &[hue, saturation]) => AugOp::HueSaturation { hue, saturation },
            ("rgb_shift", &[shift]) => AugOp::RgbShift { shift },
            ("gaussian_noise", &[std]) => AugOp::GaussianNoise { std },
            ("gaussian_blur", &[lo, hi]) => {
                ordered(name, "sigma_min", lo, "sigma_max", hi)?;
                AugOp::GaussianBlur { sigma: (lo, hi) }
            }
            // Checked above to be a whole number in [3, 31], so the cast is exact.
            ("motion_blur", &[k]) => AugOp::MotionBlur {
                max_kernel: k as i64,
            },
            ("sharpen", &[lo, hi]) => {
                ordered(name, "alpha_min", lo, "alpha_max", hi)?;
                AugOp::Sharpen { alpha: (lo, hi) }
            }
            ("random_erasing", &[amin, amax, rmin, rmax]) => {
                ordered(name, "area_min", amin, "area_max", amax)?;
                ordered(name, "aspect_min", rmin, "aspect_max", rmax)?;
                AugOp::RandomErasing {
                    area: (amin, amax),
                    aspect: (rmin, rmax),
                }
            }
            // Only reachable if `params_of` and this match disagree on a param list.
            _ => {
                return Err(format!(
                    "augmentation op \"{name}\": internal parameter table mismatch"
                ));
            }
        })
    }

    /// The config names `from_config` accepts.
    pub fn names() -> &'static [&'static str] {
        NAMES
    }

    /// Ops that become a homography and are fused into one resampling.
    fn is_warp(&self) -> bool {
        matches!(
            self,
            AugOp::Rotate { .. } | AugOp::Affine { .. } | AugOp::Perspective { .. }
        )
    }
}

/// An ordered list of ops applied to training batches.
pub struct Augmenter {
    pub ops: Vec<Aug>,
}

impl Augmenter {
    pub fn new(ops: Vec<Aug>) -> Augmenter {
        Augmenter { ops }
    }

    /// A heavy default close to the usual whale-fluke re-identification recipe (flip, affine,
    /// perspective, colour, noise, blur, cut-out), for datasets with few photos per whale:
    ///
    /// | op | p |
    /// |---|---|
    /// | HFlip | 0.5 |
    /// | Rotate ±15° | 0.5 |
    /// | Affine scale 0.85–1.15, translate ±6.25 %, shear ±10° | 0.7 |
    /// | Perspective 0.3 | 0.3 |
    /// | BrightnessContrast ±25 %, ±25 % | 0.7 |
    /// | HueSaturation hue ±3 %, saturation ±30 % | 0.3 |
    /// | RgbShift ±0.05 | 0.2 |
    /// | GaussianNoise std 0.03 | 0.3 |
    /// | GaussianBlur sigma 0.1–1.5 | 0.2 |
    /// | MotionBlur up to 7 px | 0.1 |
    /// | Sharpen alpha 0.1–0.4 | 0.2 |
    /// | RandomErasing area 2–20 %, aspect 0.3–3.3 | 0.5 |
    ///
    /// Rotate, Affine and Perspective sit next to each other, so they cost one resampling.
    /// Hue moves little because fluke photos are nearly grey; vertical flips are left out
    /// because flukes are photographed upright. HFlip mirrors the fluke pattern: see
    /// [`AugOp::HFlip`].
    pub fn heavy() -> Augmenter {
        use AugOp::*;
        let aug = |op, p| Aug { op, p };
        Augmenter::new(vec![
            aug(HFlip, 0.5),
            aug(Rotate { degrees: 15.0 }, 0.5),
            aug(
                Affine {
                    scale: (0.85, 1.15),
                    translate: 0.0625,
                    shear: 10.0,
                },
                0.7,
            ),
            aug(Perspective { distortion: 0.3 }, 0.3),
            aug(
                BrightnessContrast {
                    brightness: 0.25,
                    contrast: 0.25,
                },
                0.7,
            ),
            aug(
                HueSaturation {
                    hue: 0.03,
                    saturation: 0.3,
                },
                0.3,
            ),
            aug(RgbShift { shift: 0.05 }, 0.2),
            aug(GaussianNoise { std: 0.03 }, 0.3),
            aug(GaussianBlur { sigma: (0.1, 1.5) }, 0.2),
            aug(MotionBlur { max_kernel: 7 }, 0.1),
            aug(Sharpen { alpha: (0.1, 0.4) }, 0.2),
            aug(
                RandomErasing {
                    area: (0.02, 0.2),
                    aspect: (0.3, 3.3),
                },
                0.5,
            ),
        ])
    }

    /// Applies the ops in order, each image deciding on each op by itself. The output has the
    /// input's shape, dtype and device, and values clamped to `0..=1`. Runs under `no_grad`.
    /// Half-precision input is processed in f32 and converted back. The input is never
    /// modified.
    ///
    /// # Panics
    /// If `x` is not 4-D `[N, C, H, W]`; the colour ops also need `C = 3`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        assert_eq!(
            x.dim(),
            4,
            "Augmenter::apply expects [N, C, H, W], got {:?}",
            x.size()
        );
        let kind = x.kind();
        // grid_sample, linalg and rand need a full float type; f16/bf16 lose too much in the
        // homography solve.
        let work = if kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        // `to_kind` to the same kind returns the caller's tensor itself, which is not ours to
        // write into.
        let mut batch = Batch {
            owned: kind != work,
            t: x.to_kind(work),
        };
        let mut i = 0;
        while i < self.ops.len() {
            if self.ops[i].op.is_warp() {
                let end = (i..self.ops.len())
                    .find(|&j| !self.ops[j].op.is_warp())
                    .unwrap_or(self.ops.len());
                batch.warp_run(&self.ops[i..end]);
                i = end;
            } else {
                batch.apply_one(&self.ops[i]);
                i += 1;
            }
        }
        // The ops clamp as they go; this catches out-of-range input that no op touched.
        let Batch { mut t, owned } = batch;
        let t = if owned {
            let _ = t.clamp_(0.0, 1.0);
            t
        } else {
            t.clamp(0.0, 1.0)
        };
        t.to_kind(kind)
    }
}

/// Which images of a batch an op fires on.
enum Pick {
    None,
    All,
    Some(Tensor),
}

/// A NaN probability fires never, like 0, rather than on every image.
fn never(p: f64) -> bool {
    p.is_nan() || p <= 0.0
}

fn pick(n: i64, p: f64, device: Device) -> Pick {
    if n == 0 || never(p) {
        return Pick::None;
    }
    if p >= 1.0 {
        return Pick::All;
    }
    let idx = Tensor::rand([n], (Kind::Float, device))
        .lt(p)
        .nonzero()
        .squeeze_dim(1);
    match idx.size()[0] {
        0 => Pick::None,
        k if k == n => Pick::All,
        _ => Pick::Some(idx),
    }
}

/// The batch under augmentation. `owned` says whether `t` is already a tensor of our own, which
/// later ops may overwrite in place, or still the caller's, which must be copied first.
struct Batch {
    t: Tensor,
    owned: bool,
}

impl Batch {
    /// Runs `f` on the images that fire and puts its output in their place. `f` must return a
    /// fresh tensor, never a view of its argument, since the result may be written in place.
    fn update(&mut self, p: f64, f: impl FnOnce(&Tensor) -> Tensor) {
        match pick(self.t.size()[0], p, self.t.device()) {
            Pick::None => {}
            Pick::All => {
                self.t = f(&self.t);
                self.owned = true;
            }
            Pick::Some(idx) => {
                let sub = f(&self.t.index_select(0, &idx));
                self.write(&idx, &sub);
            }
        }
    }

    fn write(&mut self, idx: &Tensor, sub: &Tensor) {
        if self.owned {
            let _ = self.t.index_copy_(0, idx, sub);
        } else {
            self.t = self.t.index_copy(0, idx, sub);
            self.owned = true;
        }
    }

    fn apply_one(&mut self, aug: &Aug) {
        let p = aug.p;
        match &aug.op {
            AugOp::HFlip => self.update(p, |s| s.flip([3])),
            AugOp::VFlip => self.update(p, |s| s.flip([2])),
            AugOp::BrightnessContrast {
                brightness: b,
                contrast: c,
            } => self.update(p, |s| {
                let n = s.size()[0];
                let bf = uniform(&[n], 1.0 - b, 1.0 + b, s);
                let cf = uniform(&[n], 1.0 - c, 1.0 + c, s);
                brightness_contrast(s, &bf, &cf)
            }),
            AugOp::HueSaturation { hue, saturation } => self.update(p, |s| {
                let n = s.size()[0];
                let turn = uniform(&[n], -hue, *hue, s);
                let sat = uniform(&[n], 1.0 - saturation, 1.0 + saturation, s);
                hue_saturation(s, &turn, &sat)
            }),
            AugOp::RgbShift { shift } => self.update(p, |s| {
                let (n, c, _, _) = dims(s);
                clamped(s + uniform(&[n, c, 1, 1], -shift, *shift, s))
            }),
            AugOp::GaussianNoise { std } => self.update(p, |s| {
                let mut noise = s.empty_like();
                let _ = noise.normal_(0.0, *std);
                noise += s;
                clamped(noise)
            }),
            AugOp::GaussianBlur { sigma: (lo, hi) } => self.update(p, |s| {
                let sigma = uniform(&[s.size()[0]], *lo, *hi, s);
                gaussian_blur(s, &sigma, *hi)
            }),
            AugOp::MotionBlur { max_kernel } => self.update(p, |s| motion_blur(s, *max_kernel)),
            AugOp::Sharpen { alpha: (lo, hi) } => self.update(p, |s| {
                let alpha = uniform(&[s.size()[0]], *lo, *hi, s);
                sharpen(s, &alpha)
            }),
            AugOp::RandomErasing { area, aspect } => {
                self.update(p, |s| random_erasing(s, *area, *aspect))
            }
            // A lone warp op is a run of one.
            AugOp::Rotate { .. } | AugOp::Affine { .. } | AugOp::Perspective { .. } => {
                self.warp_run(std::slice::from_ref(aug))
            }
        }
    }

    /// Composes a run of warp ops into one forward homography per image, then resamples only
    /// the images that any op of the run fired on.
    fn warp_run(&mut self, ops: &[Aug]) {
        let x = &self.t;
        let (n, _, h, w) = dims(x);
        if n == 0 {
            return;
        }
        let eye = Tensor::eye(3, (x.kind(), x.device())).expand([n, 3, 3], false);
        let mut total: Option<Tensor> = None;
        let mut fired: Option<Tensor> = None;
        let mut projective = false;
        for aug in ops {
            let mask = if never(aug.p) {
                continue;
            } else if aug.p >= 1.0 {
                Tensor::ones([n], (Kind::Bool, x.device()))
            } else {
                Tensor::rand([n], (Kind::Float, x.device())).lt(aug.p)
            };
            let m = match &aug.op {
                AugOp::Rotate { degrees } => rotation(&uniform(&[n], -degrees, *degrees, x), h, w),
                AugOp::Affine {
                    scale,
                    translate,
                    shear,
                } => random_affine(n, h, w, *scale, *translate, *shear, x),
                AugOp::Perspective { distortion } => {
                    projective = true;
                    random_perspective(n, *distortion, x)
                }
                // Runs are cut at the first non-warp op, so nothing else reaches here.
                _ => continue,
            };
            let m = m.where_self(&mask.view([n, 1, 1]), &eye);
            total = Some(match total {
                None => m,
                Some(t) => m.matmul(&t),
            });
            fired = Some(match fired {
                None => mask,
                Some(f) => f.logical_or(&mask),
            });
        }
        let (Some(total), Some(fired)) = (total, fired) else {
            return;
        };
        let idx = fired.nonzero().squeeze_dim(1);
        match idx.size()[0] {
            0 => {}
            k if k == n => {
                self.t = warp(x, &total, projective);
                self.owned = true;
            }
            _ => {
                let sub = warp(
                    &x.index_select(0, &idx),
                    &total.index_select(0, &idx),
                    projective,
                );
                self.write(&idx, &sub);
            }
        }
    }
}

/// Clamps a tensor the caller just made, in place.
fn clamped(mut t: Tensor) -> Tensor {
    let _ = t.clamp_(0.0, 1.0);
    t
}

/// `shape`-sized draws uniform in `[lo, hi)`; `lo == hi` gives exactly `lo`.
fn uniform(shape: &[i64], lo: f64, hi: f64, like: &Tensor) -> Tensor {
    Tensor::rand(shape, (like.kind(), like.device())) * (hi - lo) + lo
}

/// Per-image scalar params broadcast over `[C, H, W]`.
fn per_image(t: &Tensor) -> Tensor {
    t.view([-1, 1, 1, 1])
}

fn dims(x: &Tensor) -> (i64, i64, i64, i64) {
    let s = x.size();
    (s[0], s[1], s[2], s[3])
}

/// A small constant tensor in `like`'s kind and device.
fn constant(values: &[f64], shape: &[i64], like: &Tensor) -> Tensor {
    Tensor::from_slice(values)
        .to_kind(like.kind())
        .to_device(like.device())
        .view(shape)
}

// ---------------------------------------------------------------------------------------------
// Geometry

/// Resamples each image by its forward homography `fwd` `[N, 3, 3]` (maps an input point to
/// where it lands in the output, in normalised coordinates), bilinear, reflection fill. Without
/// `projective` the bottom rows must be `[0, 0, 1]`, and the grid comes from the fused
/// `affine_grid` kernel instead of a matmul and a division.
pub(crate) fn warp(x: &Tensor, fwd: &Tensor, projective: bool) -> Tensor {
    let (n, c, h, w) = dims(x);
    let opts = (x.kind(), x.device());
    // Singular matrices cannot come from the validated ranges, but a stray one must not panic
    // mid-training or feed NaN coordinates to the sampler: such an image is left unwarped.
    let (inv, _) = Tensor::linalg_inv_ex(fwd, false);
    let finite = inv
        .isfinite()
        .flatten(1, 2)
        .all_dim(1, false)
        .view([n, 1, 1]);
    let inv = inv.where_self(&finite, &Tensor::eye(3, opts).expand([n, 3, 3], false));
    let grid = if projective {
        let xs = (Tensor::arange(w, opts) * 2.0 + 1.0) / w as f64 - 1.0;
        let ys = (Tensor::arange(h, opts) * 2.0 + 1.0) / h as f64 - 1.0;
        let base = Tensor::stack(
            &[
                xs.view([1, w]).expand([h, w], false),
                ys.view([h, 1]).expand([h, w], false),
                Tensor::ones([h, w], opts),
            ],
            -1,
        )
        .view([1, h * w, 3]);
        let src = base.matmul(&inv.transpose(1, 2));
        // Only a degenerate draw puts output pixels behind the horizon (z <= 0); the clamp
        // keeps their coordinates finite.
        let z = src.narrow(2, 2, 1).clamp_min(1e-6);
        (src.narrow(2, 0, 2) / z).view([n, h, w, 2])
    } else {
        Tensor::affine_grid_generator(&inv.narrow(1, 0, 2), [n, c, h, w], false)
    };
    // interpolation 0 = bilinear, padding 2 = reflection.
    x.grid_sampler_2d(&grid, 0, 2, false)
}

/// Builds `[N, 3, 3]` from nine `[N]` entries in row-major order.
fn mat3(entries: &[Tensor; 9]) -> Tensor {
    let n = entries[0].size()[0];
    Tensor::stack(entries, 1).view([n, 3, 3])
}

/// Forward matrices rotating each image counter-clockwise (as seen on screen) by `degrees`
/// `[N]` about its centre, in normalised coordinates of an `h × w` image.
pub(crate) fn rotation(degrees: &Tensor, h: i64, w: i64) -> Tensor {
    let rad = degrees * (PI / 180.0);
    let (c, s) = (rad.cos(), rad.sin());
    let (z, o) = (c.zeros_like(), c.ones_like());
    // With y pointing down, counter-clockwise on screen is [[c, s], [-s, c]] in pixels;
    // conjugating by diag(w/2, h/2) moves it to normalised coordinates.
    let ar = h as f64 / w as f64;
    mat3(&[
        c.shallow_clone(),
        &s * ar,
        z.shallow_clone(),
        -&s / ar,
        c,
        z.shallow_clone(),
        z.shallow_clone(),
        z,
        o,
    ])
}

/// Forward affine matrices from per-image `[N]` params: isotropic `scale`, shear angles in
/// degrees along x and y, and translations as fractions of the width and height.
pub(crate) fn affine(
    scale: &Tensor,
    shear_x: &Tensor,
    shear_y: &Tensor,
    tx: &Tensor,
    ty: &Tensor,
    h: i64,
    w: i64,
) -> Tensor {
    let shx = (shear_x * (PI / 180.0)).tan();
    let shy = (shear_y * (PI / 180.0)).tan();
    let (z, o) = (scale.zeros_like(), scale.ones_like());
    let ar = h as f64 / w as f64;
    // Pixel-space linear part [[s, shx s], [shy s, s]], conjugated to normalised coordinates,
    // where a fraction f of the size is 2f.
    mat3(&[
        scale.shallow_clone(),
        &shx * scale * ar,
        tx * 2.0,
        &shy * scale / ar,
        scale.shallow_clone(),
        ty * 2.0,
        z.shallow_clone(),
        z,
        o,
    ])
}

fn random_affine(
    n: i64,
    h: i64,
    w: i64,
    scale: (f64, f64),
    translate: f64,
    shear: f64,
    like: &Tensor,
) -> Tensor {
    affine(
        &uniform(&[n], scale.0, scale.1, like),
        &uniform(&[n], -shear, shear, like),
        &uniform(&[n], -shear, shear, like),
        &uniform(&[n], -translate, translate, like),
        &uniform(&[n], -translate, translate, like),
        h,
        w,
    )
}

/// Forward homographies taking the image corners (-1,-1), (1,-1), (1,1), (-1,1) to `dst`
/// `[N, 4, 2]`, solved per image as the usual 8×8 linear system.
pub(crate) fn homography_from_corners(dst: &Tensor) -> Tensor {
    let n = dst.size()[0];
    let opts = (dst.kind(), dst.device());
    let src = constant(
        &[-1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0],
        &[1, 4, 2],
        dst,
    )
    .expand([n, 4, 2], false);
    let (sx, sy) = (src.narrow(2, 0, 1), src.narrow(2, 1, 1));
    let (u, v) = (dst.narrow(2, 0, 1), dst.narrow(2, 1, 1));
    let (z, o) = (
        Tensor::zeros([n, 4, 1], opts),
        Tensor::ones([n, 4, 1], opts),
    );
    // Rows for u: [x, y, 1, 0, 0, 0, -u x, -u y]; rows for v: [0, 0, 0, x, y, 1, -v x, -v y].
    let rows_u = Tensor::cat(&[&sx, &sy, &o, &z, &z, &z, &(-&u * &sx), &(-&u * &sy)], 2);
    let rows_v = Tensor::cat(&[&z, &z, &z, &sx, &sy, &o, &(-&v * &sx), &(-&v * &sy)], 2);
    let a = Tensor::cat(&[rows_u, rows_v], 1);
    let b = Tensor::cat(&[u, v], 1);
    // Corners jittered by at most a quarter of the size keep the quad non-degenerate, so the
    // solve succeeds; a failure would give non-finite entries, which `warp` neutralises.
    let (coef, _) = Tensor::linalg_solve_ex(&a, &b, true, false);
    Tensor::cat(&[coef.squeeze_dim(2), Tensor::ones([n, 1], opts)], 1).view([n, 3, 3])
}

/// Corners jittered by `±distortion / 2` along each axis (normalised units are half-sizes).
fn random_perspective(n: i64, distortion: f64, like: &Tensor) -> Tensor {
    let corners = constant(
        &[-1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0],
        &[1, 4, 2],
        like,
    );
    let half = distortion / 2.0;
    homography_from_corners(&(corners + uniform(&[n, 4, 2], -half, half, like)))
}

// ---------------------------------------------------------------------------------------------
// Colour

const LUMA: [f64; 3] = [0.299, 0.587, 0.114];

/// Brightness factor `bf` then contrast factor `cf` (both `[N]`) about the mean luma (BT.601;
/// the plain mean if `C != 3`), as one fused `x * (bf cf) + mean bf (1 - cf)`, so factors of
/// exactly 1 return `x` exactly.
pub(crate) fn brightness_contrast(x: &Tensor, bf: &Tensor, cf: &Tensor) -> Tensor {
    let c = x.size()[1];
    // The mean luma is the luma of the channel means: one reduction pass, no luma image.
    let channel_means = x.mean_dim([2i64, 3].as_slice(), false, None::<Kind>);
    let mean = if c == 3 {
        channel_means
            .matmul(&constant(&LUMA, &[3, 1], x))
            .squeeze_dim(1)
    } else {
        channel_means.mean_dim([1i64].as_slice(), false, None::<Kind>)
    };
    let gain = bf * cf;
    let offset = mean * bf * (1f64 - cf);
    clamped(per_image(&offset).addcmul(x, &per_image(&gain)))
}

/// Hue turn (fraction of the circle) and saturation factor, both `[N]`, as one 3×3 colour
/// matrix per image. The hue turn rotates the RGB cube about its grey axis, which matches an
/// HSV hue shift up to the hexagon-versus-circle difference and costs one small matmul instead
/// of an HSV round trip; saturation then blends with the luma.
pub(crate) fn hue_saturation(x: &Tensor, turn: &Tensor, sat: &Tensor) -> Tensor {
    let (n, c, h, w) = dims(x);
    let theta = (turn * (2.0 * PI)).view([n, 1, 1]);
    let eye = Tensor::eye(3, (x.kind(), x.device())).unsqueeze(0);
    let third = Tensor::full([1, 3, 3], 1.0 / 3.0, (x.kind(), x.device()));
    // Cross-product matrix of the unit grey axis (1, 1, 1)/sqrt(3).
    let cross = constant(
        &[0.0, -1.0, 1.0, 1.0, 0.0, -1.0, -1.0, 1.0, 0.0],
        &[1, 3, 3],
        x,
    ) / 3f64.sqrt();
    // Rodrigues: R = cos I + (1 - cos) k k^T + sin [k]x.
    let rot = &eye * theta.cos() + &third * (1f64 - theta.cos()) + &cross * theta.sin();
    let luma_rows = constant(&LUMA, &[1, 1, 3], x).expand([1, 3, 3], false);
    let sat = sat.view([n, 1, 1]);
    let saturate = &eye * &sat + luma_rows * (1f64 - &sat);
    let m = saturate.matmul(&rot);
    clamped(m.bmm(&x.reshape([n, c, h * w])).view([n, c, h, w]))
}

// ---------------------------------------------------------------------------------------------
// Filters

/// Folds the batch into the channel axis, `[1, N C, H + 2 ph, W + 2 pw]`, replicating the
/// border: one grouped conv over this does every image with its own kernel (and libtorch's
/// depthwise path is several times faster on this layout than on `[N, C, ..]` with C groups).
fn fold_padded(x: &Tensor, ph: i64, pw: i64) -> Tensor {
    let (n, c, h, w) = dims(x);
    x.reshape([1, n * c, h, w])
        .pad([pw, pw, ph, ph], "replicate", None::<f64>)
}

/// Valid depthwise conv of a folded batch with one kernel per image, `[N, kh, kw]`, shared by
/// that image's `c` channels.
fn per_image_conv(folded: &Tensor, kernels: &Tensor, c: i64) -> Tensor {
    let ks = kernels.size();
    let (n, kh, kw) = (ks[0], ks[1], ks[2]);
    let weight = kernels
        .unsqueeze(1)
        .expand([n, c, kh, kw], false)
        .reshape([n * c, 1, kh, kw]);
    folded.conv2d(&weight, None::<Tensor>, [1, 1], [0, 0], [1, 1], n * c)
}

/// Separable Gaussian blur with per-image `sigma` `[N]`; the kernel is sized for `sigma_max`,
/// so smaller sigmas just have near-zero tails. Normalised non-negative kernels keep the range.
fn gaussian_blur(x: &Tensor, sigma: &Tensor, sigma_max: f64) -> Tensor {
    let (n, c, h, w) = dims(x);
    let r = (3.0 * sigma_max).ceil().max(1.0) as i64;
    let k = 2 * r + 1;
    let t = Tensor::arange_start(-r, r + 1, (x.kind(), x.device())).view([1, k]);
    // A zero sigma would divide by zero; 1e-3 px is already a delta kernel.
    let sig = sigma.clamp_min(1e-3).view([n, 1]);
    let g = (-(&t * &t) / (sig.square() * 2.0)).exp();
    let g = &g / g.sum_dim_intlist([1i64].as_slice(), true, None::<Kind>);
    // One padding for both passes: the horizontal pass also blurs the padded rows, which the
    // vertical pass then consumes.
    let rows = per_image_conv(&fold_padded(x, r, r), &g.view([n, 1, k]), c);
    per_image_conv(&rows, &g.view([n, k, 1]), c).view([n, c, h, w])
}

/// Motion blur: an antialiased line kernel through the centre, direction uniform in `[0, π)`,
/// length an odd number of pixels uniform in `3..=max_kernel`.
fn motion_blur(x: &Tensor, max_kernel: i64) -> Tensor {
    let (n, c, h, w) = dims(x);
    let opts = (x.kind(), x.device());
    // Even maxima round down to the next odd size; anything below 3 still blurs over 3.
    let kmax = if max_kernel % 2 == 0 {
        max_kernel - 1
    } else {
        max_kernel
    }
    .max(3);
    let r = kmax / 2;
    let choices = ((kmax - 3) / 2 + 1) as f64;
    let len = ((Tensor::rand([n], opts) * choices)
        .floor()
        .clamp_max(choices - 1.0)
        * 2.0
        + 3.0)
        .view([n, 1, 1]);
    let angle = (Tensor::rand([n], opts) * PI).view([n, 1, 1]);
    let d = Tensor::arange_start(-r, r + 1, opts);
    let dx = d.view([1, 1, kmax]);
    let dy = d.view([1, kmax, 1]);
    let (cos, sin) = (angle.cos(), angle.sin());
    let along = (&dx * &cos + &dy * &sin).abs();
    let across = (&dy * &cos - &dx * &sin).abs();
    let kernel = (1f64 - across).clamp_min(0.0) * along.le_tensor(&(len / 2.0)).to_kind(x.kind());
    // The centre tap always has weight 1, so the sum is never zero.
    let kernel = &kernel / kernel.sum_dim_intlist([1i64, 2].as_slice(), true, None::<Kind>);
    per_image_conv(&fold_padded(x, r, r), &kernel, c).view([n, c, h, w])
}

/// `x + alpha * (8 x - sum of the 8 neighbours)` with per-image `alpha` `[N]`, as one 3×3
/// kernel per image.
fn sharpen(x: &Tensor, alpha: &Tensor) -> Tensor {
    let (n, c, h, w) = dims(x);
    let delta = constant(
        &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        &[1, 3, 3],
        x,
    );
    let laplacian = constant(
        &[-1.0, -1.0, -1.0, -1.0, 8.0, -1.0, -1.0, -1.0, -1.0],
        &[1, 3, 3],
        x,
    );
    let kernels = delta + laplacian * alpha.view([n, 1, 1]);
    clamped(per_image_conv(&fold_padded(x, 1, 1), &kernels, c).view([n, c, h, w]))
}

/// One rectangle per image, filled with uniform noise or the image's per-channel mean.
pub(crate) fn random_erasing(x: &Tensor, area: (f64, f64), aspect: (f64, f64)) -> Tensor {
    let (n, _, h, w) = dims(x);
    let opts = (x.kind(), x.device());
    let pixels = uniform(&[n], area.0, area.1, x) * (h * w) as f64;
    let ratio = uniform(&[n], aspect.0.ln(), aspect.1.ln(), x).exp();
    // Clamping to the image keeps a tall/wide draw inside it, at the cost of a smaller area.
    let eh = (&pixels * &ratio).sqrt().round().clamp(1.0, h as f64);
    let ew = (&pixels / &ratio).sqrt().round().clamp(1.0, w as f64);
    let top = (Tensor::rand([n], opts) * (-&eh + (h + 1) as f64)).floor();
    let left = (Tensor::rand([n], opts) * (-&ew + (w + 1) as f64)).floor();
    let rows = Tensor::arange(h, opts).view([1, h, 1]);
    let cols = Tensor::arange(w, opts).view([1, 1, w]);
    let (top, eh) = (top.view([n, 1, 1]), eh.view([n, 1, 1]));
    let (left, ew) = (left.view([n, 1, 1]), ew.view([n, 1, 1]));
    let inside = rows
        .ge_tensor(&top)
        .logical_and(&rows.lt_tensor(&(&top + &eh)))
        .logical_and(&cols.ge_tensor(&left))
        .logical_and(&cols.lt_tensor(&(&left + &ew)))
        .unsqueeze(1);
    let noisy = per_image(&Tensor::rand([n], opts).lt(0.5));
    let mean = x.mean_dim([2i64, 3].as_slice(), true, None::<Kind>);
    let fill = x.rand_like().where_self(&noisy, &mean);
    fill.where_self(&inside, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};
    use std::time::Instant;

    /// libtorch's generator is process-global and tests run on parallel threads, so every test
    /// that draws random numbers holds this lock to keep seeded sequences intact.
    fn serial() -> MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    const CPU: Device = Device::Cpu;

    fn batch(seed: i64, device: Device) -> Tensor {
        tch::manual_seed(seed);
        Tensor::rand([4, 3, 32, 32], (Kind::Float, device))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn one(op: AugOp, p: f64) -> Augmenter {
        Augmenter::new(vec![Aug { op, p }])
    }

    fn config(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn scalars(values: &[f32]) -> Tensor {
        Tensor::from_slice(values)
    }

    /// The contract every op must keep, on any device.
    fn check_every_op(device: Device) {
        let x = batch(1, device);
        let before = x.copy();
        for name in AugOp::names() {
            let op = AugOp::from_config(name, &BTreeMap::new()).expect(name);
            for p in [1.0, 0.5] {
                let y = one(op.clone(), p).apply(&x);
                assert_eq!(y.size(), x.size(), "{name}");
                assert_eq!(y.kind(), Kind::Float, "{name}");
                assert_eq!(y.device(), device, "{name}");
                assert!(y.min().double_value(&[]) >= 0.0, "{name}");
                assert!(y.max().double_value(&[]) <= 1.0, "{name}");
                if p == 1.0 {
                    assert!(
                        max_abs_diff(&x, &y) > 1e-3,
                        "{name} left the batch unchanged"
                    );
                }
            }
        }
        assert!(x.equal(&before), "an op wrote into its input");
    }

    fn check_seeded_runs_repeat(device: Device) {
        let x = batch(5, device);
        let aug = Augmenter::heavy();
        tch::manual_seed(42);
        let a = aug.apply(&x);
        tch::manual_seed(42);
        let b = aug.apply(&x);
        tch::manual_seed(43);
        let c = aug.apply(&x);
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
    }

    #[test]
    fn every_op_keeps_shape_kind_range_and_input() {
        let _g = serial();
        check_every_op(CPU);
    }

    #[test]
    fn p_zero_is_the_identity() {
        let _g = serial();
        let x = batch(2, CPU);
        let mut aug = Augmenter::heavy();
        aug.ops.iter_mut().for_each(|a| a.p = 0.0);
        assert!(aug.apply(&x).equal(&x));
    }

    #[test]
    fn p_one_flips_exactly() {
        let _g = serial();
        let x = batch(3, CPU);
        assert!(one(AugOp::HFlip, 1.0).apply(&x).equal(&x.flip([3])));
        assert!(one(AugOp::VFlip, 1.0).apply(&x).equal(&x.flip([2])));
    }

    #[test]
    fn each_image_decides_for_itself() {
        let _g = serial();
        tch::manual_seed(4);
        let x = Tensor::rand([64, 3, 8, 8], (Kind::Float, CPU));
        // Two ops, so the second writes in place into the copy the first one made.
        let aug = Augmenter::new(vec![
            Aug {
                op: AugOp::HFlip,
                p: 0.5,
            },
            Aug {
                op: AugOp::VFlip,
                p: 0.5,
            },
        ]);
        let y = aug.apply(&x);
        let mut seen = [0; 4];
        for i in 0..64 {
            let xi = x.get(i);
            let found = [xi.copy(), xi.flip([2]), xi.flip([1]), xi.flip([1, 2])]
                .iter()
                .position(|c| y.get(i).equal(c));
            let found = found.unwrap_or_else(|| panic!("image {i} is no flip of its input"));
            seen[found] += 1;
        }
        assert!(seen.iter().all(|&k| k >= 5), "outcomes {seen:?}");
    }

    #[test]
    fn seeded_runs_repeat() {
        let _g = serial();
        check_seeded_runs_repeat(CPU);
    }

    #[test]
    fn rotation_moves_a_bright_pixel_where_expected() {
        // Non-square, odd sizes: the centre is pixel (10, 20), and distances must stay true
        // in pixels despite the aspect ratio.
        let (h, w) = (21, 41);
        let x = Tensor::zeros([1, 3, h, w], (Kind::Float, CPU));
        let _ = x.narrow(2, 10, 1).narrow(3, 28, 1).fill_(1.0);
        for projective in [false, true] {
            let y = warp(&x, &rotation(&scalars(&[90.0]), h, w), projective);
            // 8 px right of centre turns counter-clockwise to 8 px above it.
            let plane = y.get(0).get(0);
            let flat = plane.argmax(None, false).int64_value(&[]);
            assert_eq!((flat / w, flat % w), (2, 20), "projective {projective}");
            assert!(plane.double_value(&[2, 20]) > 0.99);
            assert!(plane.sum(Kind::Float).double_value(&[]) < 1.01);
        }
    }

    #[test]
    fn affine_translates_and_scales_about_the_centre() {
        let (h, w) = (32, 64);
        let x = Tensor::zeros([1, 1, h, w], (Kind::Float, CPU));
        let _ = x.narrow(2, 20, 1).narrow(3, 40, 1).fill_(1.0);
        let zero = scalars(&[0.0]);
        // A quarter of the width right and an eighth of the height down: +16 px, +4 px.
        let m = affine(
            &scalars(&[1.0]),
            &zero,
            &zero,
            &scalars(&[0.25]),
            &scalars(&[0.125]),
            h,
            w,
        );
        let y = warp(&x, &m, false).get(0).get(0);
        assert!(y.double_value(&[24, 56]) > 0.99);
        // Scale 2 about the centre (15.5, 31.5) doubles the offset (4.5, 8.5) to (9, 17):
        // the point lands between pixels, so its mass spreads over a 2×2 block.
        let m = affine(&scalars(&[2.0]), &zero, &zero, &zero, &zero, h, w);
        let y = warp(&x, &m, false).get(0).get(0);
        let block = y
            .narrow(0, 24, 2)
            .narrow(1, 48, 2)
            .sum(Kind::Float)
            .double_value(&[]);
        assert!(block > 0.99, "block {block}");
    }

    #[test]
    fn homography_takes_corners_to_targets() {
        let dst =
            Tensor::from_slice(&[-0.8f32, -1.1, 1.2, -0.9, 0.9, 1.1, -1.05, 0.85]).view([1, 4, 2]);
        let m = homography_from_corners(&dst).get(0);
        for (i, (x, y)) in [(-1.0f32, -1.0f32), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
            .iter()
            .enumerate()
        {
            let p = m.mv(&scalars(&[*x, *y, 1.0]));
            let (u, v) = (
                p.double_value(&[0]) / p.double_value(&[2]),
                p.double_value(&[1]) / p.double_value(&[2]),
            );
            assert!(
                (u - dst.double_value(&[0, i as i64, 0])).abs() < 1e-4,
                "corner {i}"
            );
            assert!(
                (v - dst.double_value(&[0, i as i64, 1])).abs() < 1e-4,
                "corner {i}"
            );
        }
    }

    #[test]
    fn both_grid_paths_agree_and_identity_is_near_exact() {
        let _g = serial();
        let x = batch(6, CPU);
        let m = rotation(&scalars(&[10.0, -20.0, 5.0, 0.0]), 32, 32);
        assert!(max_abs_diff(&warp(&x, &m, false), &warp(&x, &m, true)) < 1e-4);
        let aug = Augmenter::new(vec![
            Aug {
                op: AugOp::Rotate { degrees: 0.0 },
                p: 1.0,
            },
            Aug {
                op: AugOp::Affine {
                    scale: (1.0, 1.0),
                    translate: 0.0,
                    shear: 0.0,
                },
                p: 1.0,
            },
            Aug {
                op: AugOp::Perspective { distortion: 0.0 },
                p: 1.0,
            },
        ]);
        assert!(max_abs_diff(&aug.apply(&x), &x) < 1e-5);
    }

    #[test]
    fn singular_warps_leave_the_image_alone() {
        let _g = serial();
        let x = batch(10, CPU);
        let y = warp(&x, &Tensor::zeros([4, 3, 3], (Kind::Float, CPU)), false);
        assert!(max_abs_diff(&x, &y) < 1e-5);
    }

    #[test]
    fn unit_brightness_and_contrast_are_the_identity() {
        let _g = serial();
        let x = batch(7, CPU);
        let ones = Tensor::ones([4], (Kind::Float, CPU));
        assert!(brightness_contrast(&x, &ones, &ones).equal(&x));
        let op = AugOp::BrightnessContrast {
            brightness: 0.0,
            contrast: 0.0,
        };
        assert!(one(op, 1.0).apply(&x).equal(&x));
        // Contrast 0 leaves every pixel at the mean luma.
        let flat = brightness_contrast(&x, &ones, &Tensor::zeros([4], (Kind::Float, CPU)));
        let luma = (&x
            * Tensor::from_slice(&LUMA)
                .to_kind(Kind::Float)
                .view([1, 3, 1, 1]))
        .sum_dim_intlist([1i64].as_slice(), false, None::<Kind>);
        let expected = luma.mean_dim([1i64, 2].as_slice(), false, None::<Kind>);
        assert!(max_abs_diff(&flat.amax([1i64, 2, 3].as_slice(), false), &expected) < 1e-5);
        assert!(max_abs_diff(&flat.amin([1i64, 2, 3].as_slice(), false), &expected) < 1e-5);
    }

    #[test]
    fn hue_turns_red_to_green_and_saturation_zero_is_grey() {
        let red = Tensor::from_slice(&[1.0f32, 0.0, 0.0]).view([1, 3, 1, 1]);
        let one_ = scalars(&[1.0]);
        let green = hue_saturation(&red, &scalars(&[1.0 / 3.0]), &one_);
        assert!(
            max_abs_diff(&green.view([3]), &scalars(&[0.0, 1.0, 0.0])) < 1e-5,
            "{green:?}"
        );
        let x = Tensor::rand([2, 3, 4, 4], (Kind::Float, CPU));
        let two = Tensor::ones([2], (Kind::Float, CPU));
        assert!(max_abs_diff(&hue_saturation(&x, &two.zeros_like(), &two), &x) < 1e-5);
        assert!(max_abs_diff(&hue_saturation(&x, &two, &two), &x) < 1e-5);
        let grey = hue_saturation(&x, &two.zeros_like(), &two.zeros_like());
        assert!(max_abs_diff(&grey.narrow(1, 0, 1), &grey.narrow(1, 2, 1)) < 1e-5);
    }

    #[test]
    fn erasing_covers_the_expected_area() {
        let _g = serial();
        let x = batch(8, CPU);
        let op = AugOp::RandomErasing {
            area: (0.25, 0.25),
            aspect: (1.0, 1.0),
        };
        let y = one(op, 1.0).apply(&x);
        let changed = (&y - &x)
            .abs()
            .amax([1i64].as_slice(), false)
            .gt(0.0)
            .to_kind(Kind::Float);
        let fraction = changed.mean_dim([1i64, 2].as_slice(), false, None::<Kind>);
        for i in 0..4 {
            let f = fraction.double_value(&[i]);
            assert!((f - 0.25).abs() < 0.01, "image {i}: changed fraction {f}");
        }
    }

    #[test]
    fn blurs_keep_a_flat_image_flat() {
        let _g = serial();
        let x = Tensor::full([2, 3, 16, 16], 0.4, (Kind::Float, CPU));
        for op in [
            AugOp::GaussianBlur { sigma: (0.5, 3.0) },
            AugOp::MotionBlur { max_kernel: 9 },
            AugOp::Sharpen { alpha: (1.0, 1.0) },
        ] {
            let y = one(op.clone(), 1.0).apply(&x);
            assert!(max_abs_diff(&x, &y) < 1e-5, "{op:?}");
        }
    }

    #[test]
    fn other_dtypes_round_trip() {
        let _g = serial();
        let x = batch(9, CPU);
        for kind in [Kind::Double, Kind::BFloat16, Kind::Half] {
            let y = Augmenter::heavy().apply(&x.to_kind(kind));
            assert_eq!(y.kind(), kind);
            assert_eq!(y.size(), x.size());
        }
    }

    #[test]
    fn config_defaults_and_values() {
        let affine = AugOp::from_config("affine", &BTreeMap::new()).expect("defaults");
        assert_eq!(
            affine,
            AugOp::Affine {
                scale: (0.9, 1.1),
                translate: 0.0625,
                shear: 5.0
            }
        );
        let rotate = AugOp::from_config("rotate", &config(&[("degrees", 30.0)])).expect("valid");
        assert_eq!(rotate, AugOp::Rotate { degrees: 30.0 });
        let blur =
            AugOp::from_config("motion_blur", &config(&[("max_kernel", 9.0)])).expect("valid");
        assert_eq!(blur, AugOp::MotionBlur { max_kernel: 9 });
        assert_eq!(AugOp::names().len(), 13);
        for name in AugOp::names() {
            assert!(AugOp::from_config(name, &BTreeMap::new()).is_ok(), "{name}");
        }
    }

    #[test]
    fn config_errors_name_the_op_and_param() {
        let err = |name: &str, pairs: &[(&str, f64)]| {
            AugOp::from_config(name, &config(pairs)).expect_err("must be rejected")
        };
        let e = err("twirl", &[]);
        assert!(
            e.contains("\"twirl\"") && e.contains("hflip") && e.contains("random_erasing"),
            "{e}"
        );
        let e = err("rotate", &[("angle", 3.0)]);
        assert!(
            e.contains("\"rotate\"") && e.contains("\"angle\"") && e.contains("degrees"),
            "{e}"
        );
        let e = err("hflip", &[("p", 0.5)]);
        assert!(
            e.contains("\"hflip\"") && e.contains("\"p\"") && e.contains("(none)"),
            "{e}"
        );
        let e = err("gaussian_noise", &[("std", -0.1)]);
        assert!(
            e.contains("\"gaussian_noise\"") && e.contains("\"std\"") && e.contains("[0, 1]"),
            "{e}"
        );
        let e = err("rotate", &[("degrees", f64::NAN)]);
        assert!(e.contains("\"rotate\"") && e.contains("\"degrees\""), "{e}");
        let e = err("affine", &[("scale_min", 1.2)]);
        assert!(
            e.contains("\"affine\"") && e.contains("\"scale_min\"") && e.contains("\"scale_max\""),
            "{e}"
        );
        let e = err("motion_blur", &[("max_kernel", 5.5)]);
        assert!(
            e.contains("\"motion_blur\"") && e.contains("\"max_kernel\"") && e.contains("whole"),
            "{e}"
        );
    }

    /// The contract on CUDA, and CPU/CUDA agreement of the deterministic kernels. Skips when no
    /// GPU is visible: `cargo test --lib cuda -- --ignored`.
    #[test]
    #[ignore]
    fn cuda_keeps_the_contract() {
        let _g = serial();
        if !tch::Cuda::is_available() {
            eprintln!("no CUDA device; skipped");
            return;
        }
        let gpu = Device::Cuda(0);
        check_every_op(gpu);
        check_seeded_runs_repeat(gpu);
        let x = batch(11, CPU);
        let m = rotation(&scalars(&[10.0, -20.0, 5.0, 0.0]), 32, 32);
        let on_cpu = warp(&x, &m, true);
        let on_gpu = warp(&x.to_device(gpu), &m.to_device(gpu), true).to_device(CPU);
        assert!(max_abs_diff(&on_cpu, &on_gpu) < 1e-4);
        let ones = Tensor::ones([4], (Kind::Float, gpu));
        assert!(
            brightness_contrast(&x.to_device(gpu), &ones, &ones)
                .to_device(CPU)
                .equal(&x)
        );
        let xg = x.to_device(gpu);
        assert!(one(AugOp::HFlip, 1.0).apply(&xg).equal(&xg.flip([3])));
        let y = Augmenter::heavy().apply(&xg.to_kind(Kind::Half));
        assert_eq!((y.kind(), y.device()), (Kind::Half, gpu));
    }

    /// `cargo test --lib timing -- --ignored --nocapture`: ms per 32×3×224×224 batch for
    /// `Augmenter::heavy()` (min and median of the timed runs), plus each op alone at p = 1, on
    /// the CPU with 2 threads and, if visible, on CUDA.
    #[test]
    #[ignore]
    fn timing_heavy_batch_32x224() {
        let _g = serial();
        let mut devices = vec![CPU];
        if tch::Cuda::is_available() {
            devices.push(Device::Cuda(0));
        }
        let threads = tch::get_num_threads();
        for device in devices {
            // The budget this is measured against is a training step on 2 CPU threads.
            tch::set_num_threads(if device == CPU { 2 } else { threads });
            let x = Tensor::rand([32, 3, 224, 224], (Kind::Float, device));
            let time = |aug: &Augmenter, reps: usize| {
                let _ = aug.apply(&x);
                let mut ms = Vec::new();
                for _ in 0..reps {
                    let t = Instant::now();
                    let y = aug.apply(&x);
                    // Waits for pending device work before the clock stops.
                    let _ = y.sum(Kind::Float).double_value(&[]);
                    ms.push(t.elapsed().as_secs_f64() * 1e3);
                }
                ms.sort_by(f64::total_cmp);
                (ms[0], ms[ms.len() / 2])
            };
            let reps = if device == CPU { 9 } else { 50 };
            println!("device {device:?}, threads {}", tch::get_num_threads());
            let (min, med) = time(&Augmenter::heavy(), reps);
            println!("heavy(): min {min:.1} ms, median {med:.1} ms per batch");
            for aug in Augmenter::heavy().ops {
                let name = format!("{:?}", aug.op);
                let (min, med) = time(&one(aug.op, 1.0), reps / 2);
                println!("  {name:<72} p=1: min {min:7.1} ms, median {med:7.1} ms");
            }
        }
        tch::set_num_threads(threads);
    }
}
