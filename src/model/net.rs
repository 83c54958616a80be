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
}

/// Where a network's weights were read from, or why they could not be.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("unknown backbone: {0}")]
    Arch(String),
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
    mean: Tensor,
    std: Tensor,
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
        let arch = spec.arch().map_err(NetError::Arch)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = Backbone::new(&(&root / "backbone"), arch);
        let neck = Neck::new(&root.sub("neck").set_group(1), arch.out_channels(), &spec.neck);
        let mean = Tensor::from_slice(&MEAN).to_kind(Kind::Float).view([1, 3, 1, 1]).to_device(device);
        let std = Tensor::from_slice(&STD).to_kind(Kind::Float).view([1, 3, 1, 1]).to_device(device);
        Ok(Net { spec: spec.clone(), vs, backbone, neck, mean, std })
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
        let x = (x01 - &self.mean) / &self.std;
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

    pub fn save(&self, file: &Path) -> Result<(), NetError> {
        self.vs.save(file).map_err(|e| NetError::Checkpoint { path: file.into(), detail: e.to_string() })
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

pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x.norm_scalaropt_dim(2.0, [1], true).clamp_min(1e-12);
    x / n
}

/// `[N,S,S,3]` u8 (HWC, as decoded) → `[N,3,S,S]` f32 in 0..1 on `device`.
pub fn to_input(hwc: &Tensor, device: Device) -> Tensor {
    hwc.to_device(device).permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0
}
