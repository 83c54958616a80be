//! The one-class subject detector: where the fluke is in a survey photo, and whether there is
//! one at all.
//!
//! An ImageNet backbone, frozen, turns the photo (stretched to `input_size`²) into a feature map
//! of stride 32; a small head on it predicts, for every cell, the probability that the cell's
//! centre lies in the central part of the subject (FCOS-style centre sampling) and the
//! distances from the cell's centre to the four sides of the box. The photo's box is the
//! probability-weighted mean of the boxes of the cells scoring at least half the best one; its
//! score is the best cell's probability — near 0 on a photo with no subject, which is what the
//! cleaning SQL filters on.
//!
//! Training needs only ~300 boxes: the backbone is frozen, so each photo (and its mirror image,
//! the one augmentation that moves a box) goes through it once and the head trains for many
//! epochs on the cached feature maps, in seconds on a CPU. Every cell outside a box is a
//! negative example, so photos of empty sea are not needed to learn what "no subject" is.

use std::collections::HashMap;
use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor, nn, nn::OptimizerConfig};

use super::backbone::{Arch, Backbone, load_weights, load_weights_from};
use super::net::{ImagenetNorm, NetError, channels_last, save_contiguous, vars_to_channels_last};

/// Cells whose centre is within this fraction of the box's half-size from its centre are
/// positives (the cell holding the centre always is).
const CENTRE_RADIUS: f32 = 0.5;

/// Everything needed to rebuild a detector (not its weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorSpec {
    pub backbone: String,
    /// Side of the square input in pixels; the grid is about `input_size / 32` cells a side.
    pub input_size: u32,
    /// Channels of the head's hidden layer.
    pub hidden: i64,
}

/// A detection: the best box and how sure the detector is that a subject is there at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub score: f32,
    /// `[x0, y0, x1, y1]`, fractions of the frame.
    pub bbox: [f32; 4],
}

/// The trainable part: 1×1 conv → ReLU → dropout → 3×3 conv to 5 channels per cell (objectness
/// logit, then left, top, right, bottom distances through a sigmoid).
pub struct Head {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
}

impl Head {
    pub fn new(p: &nn::Path, channels: i64, hidden: i64) -> Head {
        let conv1 = nn::conv2d(p / "conv1", channels, hidden, 1, Default::default());
        let conv2 = nn::conv2d(p / "conv2", hidden, 5, 3, nn::ConvConfig { padding: 1, ..Default::default() });
        Head { conv1, conv2 }
    }

    /// `[N,C,G,G]` features → `[N,5,G,G]` raw outputs.
    pub fn forward(&self, f: &Tensor, train: bool) -> Tensor {
        f.dropout(0.2, train).apply(&self.conv1).relu().dropout(0.1, train).apply(&self.conv2)
    }
}

/// Backbone (frozen, eval mode) + head, each in its own `VarStore` so only the head trains.
pub struct Detector {
    pub spec: DetectorSpec,
    pub backbone_vs: nn::VarStore,
    pub head_vs: nn::VarStore,
    backbone: Backbone,
    pub head: Head,
    norm: ImagenetNorm,
}

impl Detector {
    pub fn new(spec: &DetectorSpec, device: Device) -> Result<Detector, NetError> {
        let arch: Arch = spec.backbone.parse().map_err(|e: super::backbone::UnknownArch| NetError::Arch(e.to_string()))?;
        let backbone_vs = nn::VarStore::new(device);
        let backbone = Backbone::new(&(backbone_vs.root() / "backbone"), arch);
        // The frozen backbone runs in channels-last order (faster; see `Net::use_channels_last`).
        vars_to_channels_last(&backbone_vs);
        let head_vs = nn::VarStore::new(device);
        let head = Head::new(&(head_vs.root() / "head"), arch.out_channels(), spec.hidden);
        Ok(Detector { spec: spec.clone(), backbone_vs, head_vs, backbone, head, norm: ImagenetNorm::new(device) })
    }

    pub fn device(&self) -> Device {
        self.head_vs.device()
    }

    /// ImageNet weights for the backbone from `dir` (`$PIPELINE_WEIGHTS`).
    pub fn load_imagenet(&self, dir: &Path) -> Result<usize, NetError> {
        let arch: Arch = self.spec.backbone.parse().map_err(|e: super::backbone::UnknownArch| NetError::Arch(e.to_string()))?;
        let file = arch.imagenet_weights_file().map(|f| dir.join(f)).filter(|p| p.is_file()).ok_or_else(|| {
            NetError::NoImagenet { backbone: arch.name().into(), dir: dir.into(), have: String::new() }
        })?;
        let n = load_weights(&self.backbone_vs, "backbone", &file)?;
        // Frozen: never trained, so its BatchNorms fold into the convolutions.
        self.backbone.fold_batchnorm();
        Ok(n)
    }

    /// Frozen feature map of `x01` (`[N,3,S,S]` in 0..1).
    pub fn features(&self, x01: &Tensor) -> Tensor {
        let _g = tch::no_grad_guard();
        let x = channels_last(&self.norm.apply(x01));
        self.backbone.forward_features(&x, false).to_kind(Kind::Float)
    }

    /// The best box and score of every photo of `x01`.
    pub fn detect(&self, x01: &Tensor) -> Vec<Detection> {
        let _g = tch::no_grad_guard();
        decode(&self.head.forward(&self.features(x01), false))
    }

    /// Backbone and head in one safetensors file.
    pub fn save(&self, file: &Path) -> Result<(), NetError> {
        save_contiguous(self.backbone_vs.variables().into_iter().chain(self.head_vs.variables()), file)
    }

    pub fn load(spec: &DetectorSpec, file: &Path, device: Device) -> Result<Detector, NetError> {
        let det = Detector::new(spec, device)?;
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(file)
            .map_err(|e| NetError::Checkpoint { path: file.into(), detail: e.to_string() })?
            .into_iter()
            .collect();
        load_weights_from(&det.backbone_vs, "backbone", "backbone.", &tensors, file)?;
        load_weights_from(&det.head_vs, "head", "head.", &tensors, file)?;
        det.backbone.fold_batchnorm();
        Ok(det)
    }
}

/// Training targets on a `g`×`g` grid for `boxes`: objectness `[N,G,G]` (1 for positive cells)
/// and distances `[N,4,G,G]` (left, top, right, bottom from each cell's centre). A photo without
/// a subject (None) has no positive cell and no distances to learn.
pub fn targets(boxes: &[Option<[f32; 4]>], g: i64) -> (Tensor, Tensor) {
    let gs = g as usize;
    let mut obj = vec![0f32; boxes.len() * gs * gs];
    let mut reg = vec![0f32; boxes.len() * 4 * gs * gs];
    for (n, b) in boxes.iter().enumerate() {
        let Some(b) = b else { continue };
        let (bcx, bcy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
        let (rx, ry) = ((b[2] - b[0]) / 2.0 * CENTRE_RADIUS, (b[3] - b[1]) / 2.0 * CENTRE_RADIUS);
        let centre_cell = (((bcy * g as f32) as usize).min(gs - 1), ((bcx * g as f32) as usize).min(gs - 1));
        for i in 0..gs {
            for j in 0..gs {
                let (cx, cy) = ((j as f32 + 0.5) / g as f32, (i as f32 + 0.5) / g as f32);
                let positive = ((cx - bcx).abs() <= rx && (cy - bcy).abs() <= ry) || (i, j) == centre_cell;
                if positive {
                    obj[(n * gs + i) * gs + j] = 1.0;
                }
                let d = [cx - b[0], cy - b[1], b[2] - cx, b[3] - cy];
                for (c, v) in d.iter().enumerate() {
                    reg[((n * 4 + c) * gs + i) * gs + j] = v.clamp(0.0, 1.0);
                }
            }
        }
    }
    let n = boxes.len() as i64;
    (Tensor::from_slice(&obj).view([n, g, g]), Tensor::from_slice(&reg).view([n, 4, g, g]))
}

/// Objectness (balanced binary cross-entropy over all cells) + 5 × L1 of the distances on the
/// positive cells.
pub fn loss(out: &Tensor, obj_t: &Tensor, reg_t: &Tensor) -> Tensor {
    let obj = out.select(1, 0);
    let reg = out.narrow(1, 1, 4).sigmoid();
    let pos = obj_t.sum(Kind::Float);
    let total = obj_t.numel() as f64;
    let pos_weight = ((Tensor::from(total) - &pos) / pos.clamp_min(1.0)).clamp(1.0, 100.0).to_device(out.device());
    let l_obj = obj.binary_cross_entropy_with_logits(obj_t, None::<Tensor>, Some(pos_weight), Reduction::Mean);
    let mask = obj_t.unsqueeze(1);
    let l_reg = ((reg - reg_t).abs() * &mask).sum(Kind::Float) / (pos * 4.0).clamp_min(1.0);
    l_obj + l_reg * 5.0
}

/// `[N,5,G,G]` raw outputs → one detection per photo.
pub fn decode(out: &Tensor) -> Vec<Detection> {
    let out = out.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let size = out.size();
    let (n, g) = (size[0] as usize, size[2] as usize);
    let prob = Vec::<f32>::try_from(out.select(1, 0).sigmoid().flatten(0, -1)).unwrap_or_default();
    let dist = Vec::<f32>::try_from(out.narrow(1, 1, 4).sigmoid().flatten(0, -1)).unwrap_or_default();
    let cells = g * g;
    (0..n)
        .map(|k| {
            let p = &prob[k * cells..(k + 1) * cells];
            let best = p.iter().copied().fold(0f32, f32::max);
            let (mut acc, mut wsum) = ([0f32; 4], 0f32);
            for (c, &w) in p.iter().enumerate() {
                if w < best * 0.5 {
                    continue;
                }
                let (i, j) = (c / g, c % g);
                let (cx, cy) = ((j as f32 + 0.5) / g as f32, (i as f32 + 0.5) / g as f32);
                let d = |ch: usize| dist[(k * 4 + ch) * cells + c];
                let b = [cx - d(0), cy - d(1), cx + d(2), cy + d(3)];
                for (a, v) in acc.iter_mut().zip(b) {
                    *a += w * v;
                }
                wsum += w;
            }
            let bbox = if wsum > 0.0 { acc.map(|a| a / wsum) } else { [0.0, 0.0, 1.0, 1.0] };
            Detection { score: best, bbox: vision::clamp_box(bbox) }
        })
        .collect()
}

/// Boxes nobody drew: where a collection of photos of one kind of subject has it, found by
/// Deep Descriptor Transforming (Wei et al., "Deep Descriptor Transforming for Image
/// Co-Localization", IJCAI 2017). The cells of the frozen ImageNet backbone's feature maps of
/// every photo are centred on their common mean; the first principal direction of those
/// descriptors separates what the photos share (the subject: flukes in every photo) from what
/// varies (sea, sky, shore). A cell's projection on it is positive where the subject is; the
/// photo's box is the extent of its positive region of largest mass, on the map upsampled 4×
/// (bilinear) for sub-cell edges.
///
/// The direction's sign is chosen so that the positive side carries the higher backbone
/// activation (the subject is what an ImageNet network responds to, not the water). A photo whose
/// strongest cell projects below `min_peak` of the median photo's strongest has no box (`None`):
/// nothing of the shared subject is in it.
#[derive(Debug, Clone)]
pub struct PseudoBoxes {
    /// One per photo of the input, in order.
    pub boxes: Vec<Option<[f32; 4]>>,
    /// Each photo's strongest projection over the median photo's (≈ 1 for a photo with a subject).
    pub peaks: Vec<f32>,
    /// Share of the descriptors' variance along the direction used.
    pub explained: f64,
}

/// See [`PseudoBoxes`]. `feats`: `[N,C,G,G]` frozen feature maps of N photos of the collection.
/// `level`: the region traced is where the projection exceeds this share of the photo's own
/// peak (0: DDT's positive region, which the backbone's receptive field widens beyond the
/// subject by about a cell on every side).
pub fn pseudo_boxes(feats: &Tensor, min_peak: f32, level: f32) -> PseudoBoxes {
    let _g = tch::no_grad_guard();
    let f = feats.to_device(Device::Cpu).to_kind(Kind::Double);
    let size = f.size();
    let (n, c, gh, gw) = (size[0], size[1], size[2], size[3]);
    if n == 0 {
        return PseudoBoxes { boxes: Vec::new(), peaks: Vec::new(), explained: 0.0 };
    }
    let x = f.permute([0, 2, 3, 1]).reshape([-1, c]);
    let m = x.size()[0];
    let centred = &x - x.mean_dim([0i64].as_slice(), true, None::<Kind>);
    let cov = centred.tr().matmul(&centred) / m as f64;
    // First principal direction by power iteration, from a fixed start (deterministic): the
    // gap to the second eigenvalue of such covariances is wide, 200 steps are plenty.
    let mut v = Tensor::ones([c, 1], (Kind::Double, Device::Cpu)) / (c as f64).sqrt();
    for _ in 0..200 {
        let w = cov.matmul(&v);
        let norm = w.norm().double_value(&[]);
        if norm.is_nan() || norm <= 0.0 {
            break;
        }
        v = w / norm;
    }
    let lambda = v.tr().matmul(&cov).matmul(&v).double_value(&[0, 0]);
    let trace = cov.trace().double_value(&[]);
    let explained = if trace > 0.0 { lambda / trace } else { 0.0 };
    let mut proj = centred.matmul(&v).view([m]);
    // Positive where the backbone responds more strongly.
    let energy = x.sum_dim_intlist([1i64].as_slice(), false, None::<Kind>);
    let corr = ((&proj - proj.mean(Kind::Double)) * (&energy - energy.mean(Kind::Double))).sum(Kind::Double).double_value(&[]);
    if corr < 0.0 {
        proj = -proj;
    }
    let p = Vec::<f64>::try_from(proj.contiguous()).unwrap_or_default();
    let (gh, gw) = (gh as usize, gw as usize);
    let cells = gh * gw;
    let raw_peaks: Vec<f64> = (0..n as usize).map(|k| p[k * cells..(k + 1) * cells].iter().copied().fold(f64::MIN, f64::max)).collect();
    let mut sorted: Vec<f64> = raw_peaks.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2].max(1e-12);
    let mut boxes = Vec::with_capacity(n as usize);
    let mut peaks = Vec::with_capacity(n as usize);
    for k in 0..n as usize {
        let peak = (raw_peaks[k] / median) as f32;
        peaks.push(peak);
        let cut = raw_peaks[k] * f64::from(level.clamp(0.0, 0.99));
        let shifted: Vec<f64> = p[k * cells..(k + 1) * cells].iter().map(|v| v - cut).collect();
        boxes.push(if peak < min_peak { None } else { positive_region_box(&shifted, gh, gw, UPSAMPLE) });
    }
    PseudoBoxes { boxes, peaks, explained }
}

/// Upsampling of the projection map before its positive region is traced.
const UPSAMPLE: usize = 4;

/// The box (fractions of the frame) of the 8-connected region of positive values of largest
/// mass in `map` (`gh`×`gw`, row-major), traced on the map upsampled `up`× bilinearly (cell
/// centres at (i + 0.5) / g, as `align_corners = false`). `None` when nothing is positive.
pub fn positive_region_box(map: &[f64], gh: usize, gw: usize, up: usize) -> Option<[f32; 4]> {
    let (h, w) = (gh * up, gw * up);
    let sample = |y: f64, x: f64| {
        // (y, x) in cell units, centres at i + 0.5; clamped at the borders.
        let fy = (y - 0.5).clamp(0.0, (gh - 1) as f64);
        let fx = (x - 0.5).clamp(0.0, (gw - 1) as f64);
        let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(gh - 1), (x0 + 1).min(gw - 1));
        let (ty, tx) = (fy - y0 as f64, fx - x0 as f64);
        let at = |i: usize, j: usize| map[i * gw + j];
        (1.0 - ty) * ((1.0 - tx) * at(y0, x0) + tx * at(y0, x1)) + ty * ((1.0 - tx) * at(y1, x0) + tx * at(y1, x1))
    };
    let fine: Vec<f64> =
        (0..h * w).map(|k| sample(((k / w) as f64 + 0.5) / up as f64, ((k % w) as f64 + 0.5) / up as f64)).collect();
    let mut label = vec![usize::MAX; h * w];
    let mut best: Option<(f64, [usize; 4])> = None;
    let mut stack = Vec::new();
    for start in 0..h * w {
        if fine[start] <= 0.0 || label[start] != usize::MAX {
            continue;
        }
        label[start] = start;
        stack.push(start);
        let (mut mass, mut ext) = (0.0, [usize::MAX, usize::MAX, 0, 0]);
        while let Some(k) = stack.pop() {
            let (i, j) = (k / w, k % w);
            mass += fine[k];
            ext = [ext[0].min(j), ext[1].min(i), ext[2].max(j), ext[3].max(i)];
            for di in -1i64..=1 {
                for dj in -1i64..=1 {
                    let (ni, nj) = (i as i64 + di, j as i64 + dj);
                    if ni < 0 || nj < 0 || ni >= h as i64 || nj >= w as i64 {
                        continue;
                    }
                    let nk = ni as usize * w + nj as usize;
                    if fine[nk] > 0.0 && label[nk] == usize::MAX {
                        label[nk] = start;
                        stack.push(nk);
                    }
                }
            }
        }
        if best.is_none_or(|(m, _)| mass > m) {
            best = Some((mass, ext));
        }
    }
    best.map(|(_, e)| vision::clamp_box([e[0] as f32 / w as f32, e[1] as f32 / h as f32, (e[2] + 1) as f32 / w as f32, (e[3] + 1) as f32 / h as f32]))
}

/// Intersection over union of two boxes.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// A box mirrored left-right (for the mirrored photo).
pub fn hflip_box(b: &[f32; 4]) -> [f32; 4] {
    [1.0 - b[2], b[1], 1.0 - b[0], b[3]]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadTrainConfig {
    pub epochs: u32,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

/// Trains `head` on cached feature maps `feats` (`[N,C,G,G]`, on the head's device) with their
/// `boxes` (None: a photo that shows no subject); Adam with decoupled weight decay, cosine-annealed learning rate, batches shuffled
/// by (seed, epoch). Returns the mean loss of each epoch.
pub fn train_head(
    vs: &nn::VarStore,
    head: &Head,
    feats: &Tensor,
    boxes: &[Option<[f32; 4]>],
    cfg: &HeadTrainConfig,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<f64>, String> {
    let n = boxes.len();
    if n == 0 || feats.size()[0] as usize != n {
        return Err(format!("{} feature maps for {n} boxes", feats.size()[0]));
    }
    let g = feats.size()[2];
    let (obj_t, reg_t) = targets(boxes, g);
    let (obj_t, reg_t) = (obj_t.to_device(vs.device()), reg_t.to_device(vs.device()));
    let mut opt = nn::AdamW { wd: cfg.weight_decay, ..Default::default() }.build(vs, cfg.lr).map_err(|e| e.to_string())?;
    let mut history = Vec::with_capacity(cfg.epochs as usize);
    let mut order: Vec<i64> = (0..n as i64).collect();
    for epoch in 0..cfg.epochs {
        if cancelled() {
            return Err("interrupted while training the detector".into());
        }
        let t = epoch as f64 / cfg.epochs.max(1) as f64;
        opt.set_lr(cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())));
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
        let (mut sum, mut count) = (0.0, 0usize);
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let idx = Tensor::from_slice(chunk).to_device(vs.device());
            let out = head.forward(&feats.index_select(0, &idx), true);
            let l = loss(&out, &obj_t.index_select(0, &idx), &reg_t.index_select(0, &idx));
            opt.zero_grad();
            l.backward();
            opt.step();
            sum += l.double_value(&[]) * chunk.len() as f64;
            count += chunk.len();
        }
        history.push(sum / count.max(1) as f64);
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_mark_the_centre_of_the_box() {
        // A box over the middle of a 4x4 grid: cells (1..3, 1..3) have centres inside its
        // central half; distances are measured from each cell's centre.
        let (obj, reg) = targets(&[Some([0.25, 0.25, 0.75, 0.75])], 4);
        let o = Vec::<f32>::try_from(obj.flatten(0, -1)).unwrap();
        let expect: Vec<f32> = (0..16).map(|c| if [5, 6, 9, 10].contains(&c) { 1.0 } else { 0.0 }).collect();
        assert_eq!(o, expect);
        // Cell (1,1) has its centre at (0.375, 0.375): left/top 0.125, right/bottom 0.375.
        let r = Vec::<f32>::try_from(reg.select(0, 0).flatten(0, -1)).unwrap();
        let at = |ch: usize| r[ch * 16 + 5];
        assert!((at(0) - 0.125).abs() < 1e-6 && (at(1) - 0.125).abs() < 1e-6);
        assert!((at(2) - 0.375).abs() < 1e-6 && (at(3) - 0.375).abs() < 1e-6);
        // A box smaller than a cell still has its centre cell positive.
        let (obj, _) = targets(&[Some([0.6, 0.1, 0.65, 0.15])], 4);
        let o = Vec::<f32>::try_from(obj.flatten(0, -1)).unwrap();
        assert_eq!(o.iter().sum::<f32>(), 1.0);
        assert_eq!(o[2], 1.0, "row 0, column 2 holds (0.625, 0.125)");
        // No subject: nothing positive, nothing to regress.
        let (obj, reg) = targets(&[None, Some([0.25, 0.25, 0.75, 0.75])], 4);
        assert_eq!(obj.select(0, 0).sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(reg.select(0, 0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(obj.select(0, 1).sum(Kind::Float).double_value(&[]), 4.0);
    }

    #[test]
    fn decode_inverts_the_targets() {
        // Outputs that are the targets themselves (logits ±10, distances through the inverse
        // sigmoid) decode to the box, with a score near 1; all-negative outputs score near 0.
        let b = [0.2, 0.3, 0.7, 0.8];
        let (obj, reg) = targets(&[Some(b)], 6);
        let logit = obj * 20.0 - 10.0;
        let r = reg.clamp(1e-4, 1.0 - 1e-4);
        let inv = (&r / (r.ones_like() - &r)).log();
        let out = Tensor::cat(&[logit.unsqueeze(1), inv], 1);
        let d = decode(&out);
        assert_eq!(d.len(), 1);
        assert!(d[0].score > 0.99);
        assert!(iou(&d[0].bbox, &b) > 0.99, "{:?}", d[0].bbox);
        let empty = Tensor::full([1, 5, 6, 6], -10.0, (Kind::Float, Device::Cpu));
        assert!(decode(&empty)[0].score < 1e-3);
    }

    #[test]
    fn iou_and_flip() {
        assert!((iou(&[0.0, 0.0, 0.5, 0.5], &[0.0, 0.0, 0.5, 0.5]) - 1.0).abs() < 1e-6);
        assert!((iou(&[0.0, 0.0, 0.5, 0.5], &[0.25, 0.0, 0.75, 0.5]) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(iou(&[0.0, 0.0, 0.1, 0.1], &[0.5, 0.5, 0.6, 0.6]), 0.0);
        assert_eq!(hflip_box(&[0.1, 0.2, 0.4, 0.9]), [0.6, 0.2, 0.9, 0.9]);
    }

    #[test]
    fn positive_region_box_takes_the_heaviest_region() {
        // 4x4 map: a heavy 2x2 region at the top left, a light single cell at the bottom right.
        #[rustfmt::skip]
        let map = [
            2.0, 2.0, -1.0, -1.0,
            2.0, 2.0, -1.0, -1.0,
            -1.0, -1.0, -1.0, -1.0,
            -1.0, -1.0, -1.0, 0.5,
        ];
        let b = positive_region_box(&map, 4, 4, 1).unwrap();
        assert_eq!(b, [0.0, 0.0, 0.5, 0.5]);
        // Upsampled, the edge falls between the cells' centres, where the values cross zero.
        // Between a cell of 2 and one of -1 the value crosses zero 2/3 of the way: 1.1667 cells
        // from the block's last centre; the block spans 0..2.1667 cells of 4 (0.54 of the frame).
        let b = positive_region_box(&map, 4, 4, 4).unwrap();
        assert!(iou(&b, &[0.0, 0.0, 0.54, 0.54]) > 0.9, "{b:?}");
        assert_eq!(positive_region_box(&[-1.0; 9], 3, 3, 4), None);
    }

    /// Photos of one kind of subject on backgrounds that vary from photo to photo: the subject's
    /// cells share a pattern across the photos, the backgrounds do not. The boxes come back
    /// without being told where anything is; a photo with background only gets none.
    #[test]
    fn pseudo_boxes_find_the_shared_subject() {
        use rand::Rng;
        let (n, c, g) = (40usize, 32usize, 12usize);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let subject: Vec<f32> = (0..c).map(|_| rng.random_range(0.5..2.0f32)).collect();
        let mut data = vec![0f32; n * c * g * g];
        let mut truth = Vec::new();
        for k in 0..n {
            let (w, h) = (rng.random_range(0.3..0.7f32), rng.random_range(0.3..0.7f32));
            let (x0, y0) = (rng.random_range(0.0..1.0 - w), rng.random_range(0.0..1.0 - h));
            let b = [x0, y0, x0 + w, y0 + h];
            // Each photo's own background: a few random channels, weaker than the subject.
            let background: Vec<f32> = (0..c).map(|_| if rng.random_bool(0.3) { rng.random_range(0.0..0.8f32) } else { 0.0 }).collect();
            let empty = k == n - 1;
            for i in 0..g {
                for j in 0..g {
                    let (cx, cy) = ((j as f32 + 0.5) / g as f32, (i as f32 + 0.5) / g as f32);
                    let inside = !empty && cx >= b[0] && cx <= b[2] && cy >= b[1] && cy <= b[3];
                    for ch in 0..c {
                        let v = if inside { subject[ch] } else { background[ch] };
                        data[((k * c + ch) * g + i) * g + j] = (v + rng.random_range(-0.1..0.1f32)).max(0.0);
                    }
                }
            }
            truth.push(b);
        }
        let feats = Tensor::from_slice(&data).view([n as i64, c as i64, g as i64, g as i64]);
        let found = pseudo_boxes(&feats, 0.3, 0.0);
        assert_eq!(found.boxes.len(), n);
        let ious: Vec<f32> = (0..n - 1).map(|k| found.boxes[k].map_or(0.0, |b| iou(&b, &truth[k]))).collect();
        let mean = ious.iter().sum::<f32>() / ious.len() as f32;
        assert!(mean > 0.75 && ious.iter().all(|&x| x > 0.5), "IoU with the true boxes: mean {mean}, {ious:?}");
        assert_eq!(found.boxes[n - 1], None, "the photo without a subject (peak {})", found.peaks[n - 1]);
        assert!(found.explained > 0.1, "{}", found.explained);
        // Deterministic.
        assert_eq!(pseudo_boxes(&feats, 0.3, 0.0).boxes, found.boxes);
    }

    /// Synthetic feature maps: cells inside the box carry one pattern, the rest another, both
    /// noisy. The head must learn to find the box in photos it did not train on.
    #[test]
    fn head_learns_to_find_the_box() {
        tch::manual_seed(0);
        let (c, g) = (16i64, 6i64);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let make = |rng: &mut ChaCha8Rng, n: usize| {
            use rand::Rng;
            let mut boxes = Vec::new();
            let mut data = vec![0f32; n * (c * g * g) as usize];
            for k in 0..n {
                let (w, h) = (rng.random_range(0.3..0.6f32), rng.random_range(0.3..0.6f32));
                let (x0, y0) = (rng.random_range(0.0..1.0 - w), rng.random_range(0.0..1.0 - h));
                let b = [x0, y0, x0 + w, y0 + h];
                for i in 0..g as usize {
                    for j in 0..g as usize {
                        let (cx, cy) = ((j as f32 + 0.5) / g as f32, (i as f32 + 0.5) / g as f32);
                        let inside = cx >= b[0] && cx <= b[2] && cy >= b[1] && cy <= b[3];
                        for ch in 0..c as usize {
                            let base = if inside == (ch % 2 == 0) { 1.0 } else { 0.0 };
                            data[((k * c as usize + ch) * g as usize + i) * g as usize + j] = base + rng.random_range(-0.3..0.3f32);
                        }
                    }
                }
                boxes.push(b);
            }
            (Tensor::from_slice(&data).view([n as i64, c, g, g]), boxes)
        };
        let (train_f, train_b) = make(&mut rng, 64);
        let (val_f, val_b) = make(&mut rng, 16);
        let vs = nn::VarStore::new(Device::Cpu);
        let head = Head::new(&(vs.root() / "head"), c, 16);
        let cfg = HeadTrainConfig { epochs: 60, batch_size: 16, lr: 3e-3, weight_decay: 1e-4, seed: 1 };
        let train_b: Vec<Option<[f32; 4]>> = train_b.into_iter().map(Some).collect();
        let hist = train_head(&vs, &head, &train_f, &train_b, &cfg, &|| false).unwrap();
        assert!(hist.last().unwrap() < &(hist[0] * 0.5), "loss fell: {hist:?}");
        let d = {
            let _g = tch::no_grad_guard();
            decode(&head.forward(&val_f, false))
        };
        let mean_iou: f32 = d.iter().zip(&val_b).map(|(d, b)| iou(&d.bbox, b)).sum::<f32>() / val_b.len() as f32;
        assert!(mean_iou > 0.5, "mean IoU on unseen maps {mean_iou}");
        // Maps with no box anywhere score lower than every map with one.
        let empty = Tensor::cat(&[Tensor::zeros([4, 1, g, g], (Kind::Float, Device::Cpu)), Tensor::ones([4, 1, g, g], (Kind::Float, Device::Cpu))], 1)
            .repeat([1, c / 2, 1, 1]);
        let e = {
            let _g = tch::no_grad_guard();
            decode(&head.forward(&empty, false))
        };
        let min_real = d.iter().map(|d| d.score).fold(1.0f32, f32::min);
        assert!(e.iter().all(|e| e.score < min_real), "empty {:?} vs real min {min_real}", e.iter().map(|e| e.score).collect::<Vec<_>>());
    }
}

/// The files of a detector's folder (`<lake>/models/<detector id>/`).
pub const WEIGHTS: &str = "detector.safetensors";
pub const INFO: &str = "detector.json";

/// What `detector.json` holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DetectorInfo {
    pub detector_id: String,
    pub spec: DetectorSpec,
    pub train: HeadTrainConfig,
    pub train_photos: usize,
    pub val_photos: usize,
    /// Mean IoU of the predicted and true boxes of the held-out photos.
    pub val_mean_iou: Option<f64>,
    /// Fraction of held-out photos found with IoU >= 0.5.
    pub val_hit_rate: Option<f64>,
    /// Lowest score among the held-out photos (all of which have a subject).
    pub val_min_score: Option<f64>,
    pub loss_per_epoch: Vec<f64>,
    pub seconds: f64,
    /// How the boxes were made when nobody drew them (`None`: trained on drawn boxes; then the
    /// `val_*` figures compare with drawn boxes, else with the held-out photos' pseudo-boxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pseudo: Option<PseudoInfo>,
}

/// What `detector.json` says of a detector trained on pseudo-boxes ([`pseudo_boxes`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PseudoInfo {
    /// Photos the principal direction was found on (a seeded sample of the table).
    pub photos: usize,
    /// Of those, photos that got a box (the others: no shared subject found in them).
    pub boxed: usize,
    pub min_peak: f32,
    /// Share of its peak above which a photo's region is traced.
    #[serde(default)]
    pub level: f32,
    /// Share of the descriptors' variance along the direction.
    pub explained: f64,
}
