//! ResNet-18/34/50 as torchvision defines them (v1.5: a bottleneck strides in its 3×3 conv),
//! without `avgpool` and `fc`: the features are the output of `layer4`.

use tch::{Tensor, nn};

use super::{KAIMING_FAN_OUT, batch_norm, conv, relu_};

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

fn conv_bn(
    p: &nn::Path,
    conv_name: &str,
    bn_name: &str,
    cin: i64,
    cout: i64,
    k: i64,
    stride: i64,
) -> (nn::Conv2D, nn::BatchNorm) {
    (
        conv(p / conv_name, cin, cout, k, stride, 1, KAIMING_FAN_OUT),
        batch_norm(p / bn_name, cout, EPS, MOMENTUM),
    )
}

/// `downsample.0` (1×1 conv) and `downsample.1` (BN), present where the shortcut changes shape.
struct Downsample {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl Downsample {
    fn new(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> Option<Downsample> {
        if stride == 1 && cin == cout {
            return None;
        }
        let p = p / "downsample";
        let (conv, bn) = conv_bn(&p, "0", "1", cin, cout, 1, stride);
        Some(Downsample { conv, bn })
    }
}

fn shortcut(ds: &Option<Downsample>, x: &Tensor, train: bool) -> Tensor {
    match ds {
        Some(ds) => x.apply(&ds.conv).apply_t(&ds.bn, train),
        None => x.shallow_clone(),
    }
}

/// A basic block (two 3×3 convs) or a bottleneck (1×1, 3×3, 1×1 to 4× the width): `conv<i>`
/// and `bn<i>` in order, ReLU between them, then the shortcut is added and a last ReLU applied.
struct Block {
    convs: Vec<(nn::Conv2D, nn::BatchNorm)>,
    ds: Option<Downsample>,
}

impl Block {
    fn new(p: &nn::Path, cin: i64, planes: i64, stride: i64, bottleneck: bool) -> Block {
        // (input, output, kernel, stride) of each conv.
        let shapes = if bottleneck {
            vec![
                (cin, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, planes * 4, 1, 1),
            ]
        } else {
            vec![(cin, planes, 3, stride), (planes, planes, 3, 1)]
        };
        let cout = shapes[shapes.len() - 1].1;
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s))| {
                conv_bn(
                    p,
                    &format!("conv{}", i + 1),
                    &format!("bn{}", i + 1),
                    ci,
                    co,
                    k,
                    s,
                )
            })
            .collect();
        Block {
            convs,
            ds: Downsample::new(p, cin, cout, stride),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        for (i, (c, b)) in self.convs.iter().enumerate() {
            y = y.apply(c).apply_t(b, train);
            if i + 1 < self.convs.len() {
                y = relu_(y);
            }
        }
        // In place like torchvision's `out += identity`: y is the fresh output of a BN, whose
        // backward does not read it.
        y += shortcut(&self.ds, x, train);
        relu_(y)
    }
}

pub(super) struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    layers: Vec<Vec<Block>>,
}

impl ResNet {
    pub(super) fn resnet18(p: &nn::Path) -> ResNet {
        ResNet::new(p, [2, 2, 2, 2], false)
    }

    pub(super) fn resnet34(p: &nn::Path) -> ResNet {
        ResNet::new(p, [3, 4, 6, 3], false)
    }

    pub(super) fn resnet50(p: &nn::Path) -> ResNet {
        ResNet::new(p, [3, 4, 6, 3], true)
    }

    /// `depths`: blocks per stage; `bottleneck`: bottleneck blocks instead of basic ones.
    fn new(p: &nn::Path, depths: [i64; 4], bottleneck: bool) -> ResNet {
        let expansion = if bottleneck { 4 } else { 1 };
        let (conv1, bn1) = conv_bn(p, "conv1", "bn1", 3, 64, 7, 2);
        let mut cin = 64;
        let mut layers = Vec::with_capacity(4);
        for (i, (&depth, planes)) in depths.iter().zip([64, 128, 256, 512]).enumerate() {
            let lp = p / format!("layer{}", i + 1);
            let blocks = (0..depth)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let bp = &lp / j;
                    let block = Block::new(&bp, cin, planes, stride, bottleneck);
                    cin = planes * expansion;
                    block
                })
                .collect();
            layers.push(blocks);
        }
        ResNet { conv1, bn1, layers }
    }

    pub(super) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = relu_(x.apply(&self.conv1).apply_t(&self.bn1, train)).max_pool2d(
            [3, 3],
            [2, 2],
            [1, 1],
            [1, 1],
            false,
        );
        for block in self.layers.iter().flatten() {
            x = block.forward(&x, train);
        }
        x
    }
}
