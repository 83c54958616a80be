//! MobileNetV2 (width 1.0) as torchvision defines it, all variables under `features`; the
//! feature map is `features(x)`, 1280 channels after the last ReLU6.
//!
//! Unlike tch's own copy it activates in place (`relu6_` instead of `relu().clamp_max(6)`, which
//! costs two ops and two backward nodes each) and never names a dtype, so it runs in bf16.

use tch::{Tensor, nn};

use super::{ConvBn, KAIMING_FAN_OUT, batch_norm, conv, relu6_};

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// Expansion t, output channels c, repeats n, stride of the first repeat s.
const SETTINGS: [(i64, i64, i64, i64); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl InvertedResidual {
    /// Under `<p>.conv`: `[expand,] depthwise, project conv, project BN`, numbered in that order.
    fn new(p: &nn::Path, cin: i64, cout: i64, stride: i64, expansion: i64) -> InvertedResidual {
        let p = p / "conv";
        let hidden = cin * expansion;
        let expand =
            (expansion != 1).then(|| ConvBn::new(&(&p / "0"), cin, hidden, 1, 1, 1, EPS, MOMENTUM));
        let i = i64::from(expand.is_some());
        InvertedResidual {
            expand,
            depthwise: ConvBn::new(&(&p / i), hidden, hidden, 3, stride, hidden, EPS, MOMENTUM),
            project: ConvBn::from_parts(
                conv(&p / (i + 1), hidden, cout, 1, 1, 1, KAIMING_FAN_OUT),
                batch_norm(&p / (i + 2), cout, EPS, MOMENTUM),
                1,
                1,
                1,
                EPS,
            ),
            residual: stride == 1 && cin == cout,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.expand {
            Some(e) => relu6_(e.forward(x, train)),
            None => x.shallow_clone(),
        };
        let mut y = self.project.forward(&relu6_(self.depthwise.forward(&y, train)), train);
        if self.residual {
            y += x;
        }
        y
    }
}

pub(super) struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
}

impl MobileNetV2 {
    pub(super) fn new(p: &nn::Path) -> MobileNetV2 {
        let p = p / "features";
        let stem = ConvBn::new(&(&p / 0), 3, 32, 3, 2, 1, EPS, MOMENTUM);
        let mut blocks = Vec::new();
        let mut cin = 32;
        for (t, c, n, s) in SETTINGS {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(
                    &(&p / (blocks.len() + 1)),
                    cin,
                    c,
                    stride,
                    t,
                ));
                cin = c;
            }
        }
        let head = ConvBn::new(
            &(&p / (blocks.len() + 1)),
            cin,
            1280,
            1,
            1,
            1,
            EPS,
            MOMENTUM,
        );
        MobileNetV2 { stem, blocks, head }
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
        let mut x = relu6_(self.stem.forward(x, train));
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        relu6_(self.head.forward(&x, train))
    }
}
