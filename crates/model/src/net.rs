//! The embedding network: backbone → neck (pooling, Linear, BatchNorm) → L2-normalised
//! embedding, with the input normalisation it was trained with. One [`NetSpec`] describes it
//! completely; a checkpoint is the spec (JSON) plus the variables (safetensors), so a model is
//! rebuilt from its files alone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::backbone::{Arch, Backbone, WeightsError, load_weights, load_weights_from};
use super::neck::{Neck, NeckConfig};

/// ImageNet channel statistics, the normalisation every pretrained backbone here expects.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The ImageNet input normalisation on one device: `(x - mean) / std` per channel, for
/// `[N,3,H,W]` inputs in 0..1. Shared by the embedding network and the detector.
pub struct ImagenetNorm {
    mean: Tensor,
    std: Tensor,
}

impl ImagenetNorm {
    pub fn new(device: Device) -> ImagenetNorm {
        let t = |v: &[f64; 3]| Tensor::from_slice(v).to_kind(Kind::Float).view([1, 3, 1, 1]).to_device(device);
        ImagenetNorm { mean: t(&MEAN), std: t(&STD) }
    }

    pub fn apply(&self, x01: &Tensor) -> Tensor {
        (x01 - &self.mean) / &self.std
    }
}

/// Everything needed to rebuild a network (not its weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetSpec {
    /// Backbone name as in the pipeline file (`mobilenet_v2`, `resnet34`, ...).
    pub backbone: String,
    pub neck: NeckConfig,
    /// Side of the square model input in pixels.
    pub input_size: u32,
    /// The model sees the subject a detector found, not the whole photo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<CropSpec>,
}

/// How a model's inputs are cut out of the photos: the boxes of one detector, grown by a margin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CropSpec {
    /// Id of the detector whose boxes the model was trained on (under `<lake>/models/`).
    pub detector: String,
    /// The table of that detector's boxes (a `detect` stage's output).
    pub table: String,
    /// Fraction of the box's width and height added on every side.
    pub margin: f32,
}

impl NetSpec {
    pub fn arch(&self) -> Result<Arch, String> {
        self.backbone.parse::<Arch>().map_err(|e| e.to_string())
    }

    /// Checks every value a spec file could get wrong (libtorch would panic on them): a known
    /// backbone, a valid neck, an input side libtorch and the loader can use, a crop margin.
    pub fn validate(&self) -> Result<(), NetError> {
        self.arch().map_err(NetError::Arch)?;
        self.neck.validate()?;
        if !(16..=8192).contains(&self.input_size) {
            return Err(NetError::Spec(format!("input_size must be in 16..=8192, got {}", self.input_size)));
        }
        if let Some(c) = &self.crop {
            if !(c.margin.is_finite() && (0.0..=1.0).contains(&c.margin)) {
                return Err(NetError::Spec(format!("crop margin must be in [0, 1], got {}", c.margin)));
            }
        }
        Ok(())
    }
}

/// Where a network's weights were read from, or why they could not be.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("unknown backbone: {0}")]
    Arch(String),
    #[error(transparent)]
    Neck(#[from] super::neck::NeckError),
    #[error("network spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(
        "no ImageNet weights for backbone `{backbone}` in {} (have: {have}); run scripts/setup.sh, or use pretrained = \"none\"",
        dir.display()
    )]
    NoImagenet { backbone: String, dir: PathBuf, have: String },
    #[error("checkpoint {}: {detail}", path.display())]
    Checkpoint { path: PathBuf, detail: String },
}

/// Backbone + neck under one `VarStore`, variables named `backbone.*` (torchvision names) and
/// `neck.*`. Not `Sync`: one thread drives it at a time.
pub struct Net {
    pub spec: NetSpec,
    pub vs: nn::VarStore,
    backbone: Backbone,
    neck: Neck,
    norm: ImagenetNorm,
    /// Inputs are put in channels-last order before the backbone (see [`Net::use_channels_last`]).
    channels_last: bool,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("spec", &self.spec).field("device", &self.vs.device()).finish_non_exhaustive()
    }
}

impl Net {
    /// A freshly initialised network on `device`. The backbone's variables are in optimizer
    /// group 0 and the neck's in group 1, so they can have their own learning rates.
    pub fn new(spec: &NetSpec, device: Device) -> Result<Net, NetError> {
        spec.validate()?;
        let arch = spec.arch().map_err(NetError::Arch)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = Backbone::new(&(&root / "backbone"), arch);
        let neck = Neck::new(&root.sub("neck").set_group(1), arch.out_channels(), &spec.neck);
        Ok(Net { spec: spec.clone(), vs, backbone, neck, norm: ImagenetNorm::new(device), channels_last: false })
    }

    /// Puts every 4-D weight, and from now on every input, in channels-last memory order
    /// (NHWC strides, same logical shape): the layout oneDNN's and cuDNN's fastest
    /// convolutions work in. On this project's 2-core CPU a MobileNetV2 training step takes
    /// about 1.5x less time (see benches/train.rs `--channels-last`). Results equal NCHW's to
    /// float rounding. Weights loaded later keep the layout (`copy_`), and checkpoints are
    /// written contiguous as always, so files do not depend on it.
    pub fn use_channels_last(&mut self) {
        vars_to_channels_last(&self.vs);
        self.channels_last = true;
    }

    /// Folds the backbone's BatchNorms into its convolutions for evaluation-mode passes
    /// ([`Backbone::fold_batchnorm`]): for a net loaded to embed, never to train again. After
    /// [`Net::use_channels_last`], so the folded weights keep that order.
    pub fn fold_batchnorm(&self) -> bool {
        self.backbone.fold_batchnorm()
    }

    pub fn is_channels_last(&self) -> bool {
        self.channels_last
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Loads the backbone's ImageNet weights from `dir` (`$PIPELINE_WEIGHTS`).
    pub fn load_imagenet(&self, dir: &Path) -> Result<usize, NetError> {
        let arch = self.spec.arch().map_err(NetError::Arch)?;
        let have = || {
            Arch::ALL
                .iter()
                .filter(|a| a.imagenet_weights_file().is_some_and(|f| dir.join(f).is_file()))
                .map(Arch::name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(file) = arch.imagenet_weights_file() else {
            return Err(NetError::NoImagenet { backbone: arch.name().into(), dir: dir.into(), have: have() });
        };
        let path = dir.join(file);
        if !path.is_file() {
            return Err(NetError::NoImagenet { backbone: arch.name().into(), dir: dir.into(), have: have() });
        }
        Ok(load_weights(&self.vs, "backbone", &path)?)
    }

    /// Loads the backbone (and, when `with_neck`, the neck) from a checkpoint's safetensors:
    /// transfer learning takes the backbone only when the embedding size differs.
    pub fn load_from(&self, file: &Path, with_neck: bool) -> Result<usize, NetError> {
        let mut n = load_prefixed(&self.vs, "backbone", file)?;
        if with_neck {
            n += load_prefixed(&self.vs, "neck", file)?;
        }
        Ok(n)
    }

    /// `[N,3,S,S]` floats in 0..1 (already augmented) → embedding before normalisation, f32.
    /// Under `tch::autocast` (CUDA) the convolutions run in bf16.
    pub fn forward(&self, x01: &Tensor, train: bool) -> Tensor {
        let x = self.norm.apply(x01);
        let x = if self.channels_last { channels_last(&x) } else { x };
        let f = self.backbone.forward_features(&x, train);
        self.neck.forward(&f, train).to_kind(Kind::Float)
    }

    /// Eval-mode, L2-normalised embeddings of `x01` (`[N,3,S,S]` in 0..1), averaged with the
    /// horizontally flipped view when `flip_tta` (then normalised again).
    pub fn embed(&self, x01: &Tensor, flip_tta: bool) -> Tensor {
        let _g = tch::no_grad_guard();
        let mut e = l2_normalize(&self.forward(x01, false));
        if flip_tta {
            let f = l2_normalize(&self.forward(&x01.flip([3]), false));
            e = l2_normalize(&(e + f));
        }
        e
    }

    /// Writes every variable (contiguous, whatever the layout in memory) to a safetensors file.
    pub fn save(&self, file: &Path) -> Result<(), NetError> {
        save_contiguous(self.vs.variables(), file)
    }

    /// Rebuilds a network from a checkpoint (spec + weights).
    pub fn load(spec: &NetSpec, file: &Path, device: Device) -> Result<Net, NetError> {
        let net = Net::new(spec, device)?;
        net.load_from(file, true)?;
        Ok(net)
    }
}

/// Loads the variables under `prefix` from a checkpoint written by `VarStore::save`, whose
/// keys carry the prefix themselves (`backbone.features.0.0.weight`).
fn load_prefixed(vs: &nn::VarStore, prefix: &str, file: &Path) -> Result<usize, NetError> {
    std::fs::metadata(file)
        .map_err(|e| NetError::Checkpoint { path: file.into(), detail: e.to_string() })?;
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .map_err(|e| NetError::Checkpoint { path: file.into(), detail: e.to_string() })?
        .into_iter()
        .collect();
    Ok(load_weights_from(vs, prefix, &format!("{prefix}."), &tensors, file)?)
}

/// Gives every 4-D variable of `vs` NHWC strides, in place (the variables stay the same
/// tensors, so optimizers and other handles see the change).
pub fn vars_to_channels_last(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            if v.dim() == 4 {
                let cl = channels_last(&v);
                v.set_data(&cl);
            }
        }
    });
}

/// The same 4-D tensor with NHWC strides (a copy unless it has them already).
pub fn channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
    x / n
}

/// `[N,S,S,3]` u8 (HWC, as decoded) → `[N,3,S,S]` f32 in 0..1 on `device`.
pub fn to_input(hwc: &Tensor, device: Device) -> Tensor {
    hwc.to_device(device).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0
}

/// Writes variables to a safetensors file in name order, as contiguous copies: safetensors
/// refuses strided (channels-last) tensors, and files should not depend on the layout.
pub fn save_contiguous(vars: impl IntoIterator<Item = (String, Tensor)>, file: &Path) -> Result<(), NetError> {
    let mut vars: Vec<(String, Tensor)> = tch::no_grad(|| vars.into_iter().map(|(n, t)| (n, t.contiguous())).collect());
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&vars, file).map_err(|e| NetError::Checkpoint { path: file.into(), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neck::Pooling;

    fn spec() -> NetSpec {
        NetSpec {
            backbone: "mobilenet_v2".into(),
            neck: NeckConfig { pooling: Pooling::Gem { p: 3.0, learnable: true, eps: 1e-6 }, embedding_dim: 16, dropout: 0.0 },
            input_size: 32,
            crop: None,
        }
    }

    fn var(net: &Net, name: &str) -> Tensor {
        net.vs.variables().remove(name).unwrap_or_else(|| panic!("no variable {name}"))
    }

    #[test]
    fn channels_last_changes_the_layout_not_the_results() {
        tch::manual_seed(3);
        let a = Net::new(&spec(), Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fa = dir.path().join("a.safetensors");
        a.save(&fa).unwrap();
        let mut b = Net::load(&spec(), &fa, Device::Cpu).unwrap();
        b.use_channels_last();
        assert!(b.is_channels_last() && !a.is_channels_last());
        let w = var(&b, "backbone.features.0.0.weight");
        assert_eq!(w.size(), [32, 3, 3, 3]);
        assert_eq!(w.stride(), [27, 1, 9, 3], "NHWC strides");
        assert_eq!(var(&a, "backbone.features.0.0.weight").stride(), [27, 9, 3, 1]);

        let x = Tensor::rand([4, 3, 32, 32], (Kind::Float, Device::Cpu));
        let d = (a.embed(&x, false) - b.embed(&x, false)).abs().max().double_value(&[]);
        assert!(d < 1e-5, "eval embeddings differ by {d}");
        // A training step's gradients agree too (a random projection of the embedding as the
        // loss: the sum of squares of a batch-normalised output would be constant).
        // In float32 the backward of a random network through 19 batch-normalised layers
        // amplifies rounding to about 1 % at the first layer, in PyTorch as much as here, so the
        // gradients are compared in float64, where the two layouts must agree to rounding.
        let mut a64 = Net::load(&spec(), &fa, Device::Cpu).unwrap();
        a64.vs.double();
        let mut b64 = Net::load(&spec(), &fa, Device::Cpu).unwrap();
        b64.vs.double();
        b64.use_channels_last();
        assert_eq!(var(&b64, "backbone.features.0.0.weight").stride(), [27, 1, 9, 3]);
        assert_eq!(var(&b64, "backbone.features.0.0.weight").kind(), Kind::Double);
        let xt = Tensor::rand([8, 3, 64, 64], (Kind::Double, Device::Cpu));
        let r = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        for net in [&a64, &b64] {
            (net.forward(&xt, true) * &r).sum(Kind::Float).backward();
        }
        for name in ["backbone.features.0.0.weight", "backbone.features.18.0.weight", "neck.fc.weight"] {
            let (ga, gb) = (var(&a64, name).grad(), var(&b64, name).grad());
            assert!(ga.abs().max().double_value(&[]) > 0.0, "{name}: no gradient");
            let d = ((&ga - &gb).abs().max() / ga.abs().max()).double_value(&[]);
            assert!(d < 1e-6, "{name}: gradients differ by {d} (relative)");
        }
        // Its checkpoint is an ordinary one: an NCHW network loads it and answers the same.
        let fb = dir.path().join("b.safetensors");
        b.save(&fb).unwrap();
        let c = Net::load(&spec(), &fb, Device::Cpu).unwrap();
        assert!(var(&c, "backbone.features.0.0.weight").is_contiguous());
        let d = (c.embed(&x, false) - b.embed(&x, false)).abs().max().double_value(&[]);
        assert!(d < 1e-5, "reloaded embeddings differ by {d}");
    }
}
