//! DenseNet-121 as torchvision defines it (growth 32, bottleneck 4×, blocks 6/12/24/16), all
//! variables under `features`. The feature map is `relu(features(x))`: torchvision's `features`
//! end with `norm5`, and its forward applies this ReLU before pooling.
//!
//! tch's own densenet passes `divisor_override = 1` to its average pools, which turns them into
//! sums; the pools here average.

use tch::{Tensor, nn};

use super::{batch_norm, conv, relu_};

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;
const GROWTH: i64 = 32;
const BOTTLENECK: i64 = 4;

/// torchvision initialises densenet convolutions with plain `kaiming_normal_` (fan in).
const INIT: nn::Init = nn::init::DEFAULT_KAIMING_NORMAL;

struct DenseLayer {
    norm1: nn::BatchNorm,
    conv1: nn::Conv2D,
    norm2: nn::BatchNorm,
    conv2: nn::Conv2D,
}

impl DenseLayer {
    fn new(p: &nn::Path, cin: i64) -> DenseLayer {
        let mid = BOTTLENECK * GROWTH;
        DenseLayer {
            norm1: batch_norm(p / "norm1", cin, EPS, MOMENTUM),
            conv1: conv(p / "conv1", cin, mid, 1, 1, 1, INIT),
            norm2: batch_norm(p / "norm2", mid, EPS, MOMENTUM),
            conv2: conv(p / "conv2", mid, GROWTH, 3, 1, 1, INIT),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = relu_(x.apply_t(&self.norm1, train)).apply(&self.conv1);
        relu_(y.apply_t(&self.norm2, train)).apply(&self.conv2)
    }
}

struct Transition {
    norm: nn::BatchNorm,
    conv: nn::Conv2D,
}

pub(super) struct DenseNet {
    conv0: nn::Conv2D,
    norm0: nn::BatchNorm,
    /// Dense block i is followed by transition i, except the last block.
    blocks: Vec<(Vec<DenseLayer>, Option<Transition>)>,
    norm5: nn::BatchNorm,
}

impl DenseNet {
    pub(super) fn densenet121(p: &nn::Path) -> DenseNet {
        let p = p / "features";
        let init_features = 64;
        let depths = [6, 12, 24, 16];
        let conv0 = conv(&p / "conv0", 3, init_features, 7, 2, 1, INIT);
        let norm0 = batch_norm(&p / "norm0", init_features, EPS, MOMENTUM);
        let mut c = init_features;
        let mut blocks = Vec::with_capacity(depths.len());
        for (i, &depth) in depths.iter().enumerate() {
            let bp = &p / format!("denseblock{}", i + 1);
            let layers: Vec<DenseLayer> = (0..depth)
                .map(|j| DenseLayer::new(&(&bp / format!("denselayer{}", j + 1)), c + j * GROWTH))
                .collect();
            c += depth * GROWTH;
            let transition = (i + 1 < depths.len()).then(|| {
                let tp = &p / format!("transition{}", i + 1);
                let t = Transition {
                    norm: batch_norm(&tp / "norm", c, EPS, MOMENTUM),
                    conv: conv(&tp / "conv", c, c / 2, 1, 1, 1, INIT),
                };
                c /= 2;
                t
            });
            blocks.push((layers, transition));
        }
        let norm5 = batch_norm(&p / "norm5", c, EPS, MOMENTUM);
        DenseNet {
            conv0,
            norm0,
            blocks,
            norm5,
        }
    }

    pub(super) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = relu_(x.apply(&self.conv0).apply_t(&self.norm0, train)).max_pool2d(
            [3, 3],
            [2, 2],
            [1, 1],
            [1, 1],
            false,
        );
        for (layers, transition) in &self.blocks {
            // Each layer reads the concatenation of the block input and all earlier outputs.
            let mut features = vec![x];
            for layer in layers {
                let new = layer.forward(&Tensor::cat(&features, 1), train);
                features.push(new);
            }
            x = Tensor::cat(&features, 1);
            if let Some(t) = transition {
                x = relu_(x.apply_t(&t.norm, train)).apply(&t.conv).avg_pool2d(
                    [2, 2],
                    [2, 2],
                    [0, 0],
                    false,
                    true,
                    None,
                );
            }
        }
        relu_(x.apply_t(&self.norm5, train))
    }
}
