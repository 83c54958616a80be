//! EfficientNet-B0 as torchvision defines it, all variables under `features`; the feature map is
//! `features(x)`, 1280 channels after the last SiLU.
//!
//! tch's own b0 follows the TF original instead (BN eps 1e-3, asymmetric "same" padding), so
//! torchvision weights give different outputs there; this copy uses torchvision's eps 1e-5 and
//! symmetric padding.

use tch::{Tensor, nn};

use super::{ConvBn, KAIMING_FAN_OUT, drop_path, silu_};

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;
/// Stochastic depth of the last block; block i of n drops with `STOCHASTIC_DEPTH * i / n`.
const STOCHASTIC_DEPTH: f64 = 0.2;

/// Expansion, kernel, stride of the first repeat, input channels, output channels, repeats.
const STAGES: [(i64, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
];

/// Squeeze-and-excitation with biased 1×1 convs `fc1`, `fc2`.
struct SqueezeExcitation {
    fc1: nn::Conv2D,
    fc2: nn::Conv2D,
}

impl SqueezeExcitation {
    fn new(p: &nn::Path, channels: i64, squeezed: i64) -> SqueezeExcitation {
        let config = nn::ConvConfig {
            ws_init: KAIMING_FAN_OUT,
            ..Default::default()
        };
        SqueezeExcitation {
            fc1: nn::conv2d(p / "fc1", channels, squeezed, 1, config),
            fc2: nn::conv2d(p / "fc2", squeezed, channels, 1, config),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let scale = x.adaptive_avg_pool2d([1, 1]).apply(&self.fc1);
        let scale = silu_(scale).apply(&self.fc2).sigmoid();
        x * scale
    }
}

struct MBConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    se: SqueezeExcitation,
    project: ConvBn,
    residual: bool,
    drop: f64,
}

impl MBConv {
    /// Under `<p>.block`: `[expand,] depthwise, se, project`, numbered in that order.
    fn new(
        p: &nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        expansion: i64,
        drop: f64,
    ) -> MBConv {
        let p = p / "block";
        let hidden = cin * expansion;
        let expand =
            (expansion != 1).then(|| ConvBn::new(&(&p / "0"), cin, hidden, 1, 1, 1, EPS, MOMENTUM));
        let i = i64::from(expand.is_some());
        MBConv {
            expand,
            depthwise: ConvBn::new(&(&p / i), hidden, hidden, k, stride, hidden, EPS, MOMENTUM),
            // torchvision squeezes to a quarter of the block's input channels, not the expanded ones.
            se: SqueezeExcitation::new(&(&p / (i + 1)), hidden, (cin / 4).max(1)),
            project: ConvBn::new(&(&p / (i + 2)), hidden, cout, 1, 1, 1, EPS, MOMENTUM),
            residual: stride == 1 && cin == cout,
            drop,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.expand {
            Some(e) => silu_(e.forward(x, train)),
            None => x.shallow_clone(),
        };
        let y = self.se.forward(&silu_(self.depthwise.forward(&y, train)));
        let y = self.project.forward(&y, train);
        if self.residual {
            drop_path(y, self.drop, train) + x
        } else {
            y
        }
    }
}

pub(super) struct EfficientNet {
    stem: ConvBn,
    blocks: Vec<MBConv>,
    head: ConvBn,
}

impl EfficientNet {
    pub(super) fn b0(p: &nn::Path) -> EfficientNet {
        let p = p / "features";
        let stem = ConvBn::new(&(&p / 0), 3, 32, 3, 2, 1, EPS, MOMENTUM);
        let total: i64 = STAGES.iter().map(|s| s.5).sum();
        let mut blocks = Vec::new();
        for (stage, (expansion, k, stride, cin, cout, repeats)) in STAGES.into_iter().enumerate() {
            let sp = &p / (stage + 1);
            for i in 0..repeats {
                let drop = STOCHASTIC_DEPTH * blocks.len() as f64 / total as f64;
                let (cin, stride) = if i == 0 { (cin, stride) } else { (cout, 1) };
                blocks.push(MBConv::new(
                    &(&sp / i),
                    cin,
                    cout,
                    k,
                    stride,
                    expansion,
                    drop,
                ));
            }
        }
        let head = ConvBn::new(
            &(&p / (STAGES.len() + 1)),
            320,
            1280,
            1,
            1,
            1,
            EPS,
            MOMENTUM,
        );
        EfficientNet { stem, blocks, head }
    }

    pub(super) fn fold(&self) {
        self.stem.fold();
        for b in &self.blocks {
            if let Some(e) = &b.expand {
                e.fold();
            }
            b.depthwise.fold();
            b.project.fold();
        }
        self.head.fold();
    }

    pub(super) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = silu_(self.stem.forward(x, train));
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        silu_(self.head.forward(&x, train))
    }
}
