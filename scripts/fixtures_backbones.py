#!/usr/bin/env python3
"""Reference outputs for the Rust backbones in src/model/backbone/ (their tests read these).

    fixtures_backbones.py OUT_DIR

Needs the venv's torch==2.11.0 with torchvision==0.26.0, safetensors, and efficientnet-lite-pytorch==0.1.0
(the model definition that the efficientnet-lite0 ImageNet weights were saved from). For each arch it
writes

    OUT_DIR/<arch>.safetensors      the whole model's state_dict (classifier included, so the Rust
                                    loader's skipping of extra keys is exercised), original key names,
                                    without num_batches_tracked
    OUT_DIR/<arch>.io.safetensors   input  [2,3,64,64], features  = reference feature map of input
                                    input2 [1,3,67,75], features2 = the same for an odd, non-square size
                                    (floor/ceil rounding of strided layers and TF "same" padding)
                                    features_bf16 (mobilenet_v2, efficientnet_lite0 only): the model
                                    and `input` cast to bfloat16, so the Rust bf16 path is compared
                                    with PyTorch's own bf16 result (bf16 against f32 differs by
                                    ~20% relative L2 on these random weights, in PyTorch too)

"features" is the map the Rust `Backbone::forward_features` must return, before global pooling:
    resnet*             output of layer4
    densenet121         relu(model.features(x)); torchvision's features end with norm5 and its
                        forward applies the ReLU before pooling, so the ReLU is part of the map
    mobilenet_v2        model.features(x)            (ends with ReLU6)
    efficientnet_b0     model.features(x)            (ends with SiLU)
    efficientnet_lite*  model.extract_features(x)    (ends with ReLU6), built with image_size=None so
                        the TF "same" padding is computed per input size

The io file carries metadata {"format": FORMAT}; an arch whose io file has another format is
regenerated, so a setup run after this script changed brings old fixtures up to date.

Weights are a seeded random init. BatchNorm statistics are first set to the real statistics of a
seeded calibration batch, so activations stay in a sane range through 50+ layers, and are then
perturbed (and BN affine parameters randomized), so loading every buffer is actually tested. Archs
whose two files exist are skipped; files are written under a temporary name and renamed, so an
interrupted run leaves nothing that looks done.
"""

import copy
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "2"
BF16_ARCHS = {"mobilenet_v2", "efficientnet_lite0"}

ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "mobilenet_v2",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
]


def build(arch: str) -> torch.nn.Module:
    if arch.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(arch.replace("_", "-"), image_size=None)
    import torchvision

    return getattr(torchvision.models, arch)(weights=None)


def features(arch: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if arch.startswith("resnet"):
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))
    if arch == "densenet121":
        return F.relu(m.features(x))
    if arch.startswith("efficientnet_lite"):
        return m.extract_features(x)
    return m.features(x)


def randomize_batchnorm(arch: str, m: torch.nn.Module, gen_seed: int) -> None:
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    momenta = [b.momentum for b in bns]
    with torch.no_grad():
        for b in bns:
            b.reset_running_stats()
            b.momentum = None  # cumulative average: after one batch the stats are that batch's
        m.train()
        torch.manual_seed(gen_seed)
        features(arch, m, torch.randn(8, 3, 64, 64))
        for b, mom in zip(bns, momenta):
            b.momentum = mom
            b.weight.uniform_(0.75, 1.25)
            b.bias.uniform_(-0.1, 0.1)
            b.running_var.mul_(torch.empty_like(b.running_var).uniform_(0.75, 1.33))
            b.running_mean.add_(0.1 * torch.randn_like(b.running_mean) * b.running_var.sqrt())
    m.eval()


def up_to_date(weights: Path, io: Path) -> bool:
    if not (weights.exists() and io.exists()):
        return False
    with safe_open(str(io), "pt") as f:
        return (f.metadata() or {}).get("format") == FORMAT


def save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: fixtures_backbones.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for i, arch in enumerate(ARCHS):
        weights, io = out / f"{arch}.safetensors", out / f"{arch}.io.safetensors"
        if up_to_date(weights, io):
            print(f"fixtures_backbones: {arch} exists, skipped")
            continue
        seed = 1000 + 10 * i
        torch.manual_seed(seed)
        m = build(arch)
        randomize_batchnorm(arch, m, seed + 1)
        torch.manual_seed(seed + 2)
        x = torch.randn(2, 3, 64, 64)
        x2 = torch.randn(1, 3, 67, 75)
        with torch.no_grad():
            y, y2 = features(arch, m, x), features(arch, m, x2)
            tensors = {"input": x, "features": y, "input2": x2, "features2": y2}
            if arch in BF16_ARCHS:
                tensors["features_bf16"] = features(arch, copy.deepcopy(m).bfloat16(), x.bfloat16())
        state = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
        # The io file is written last: its presence marks the arch as done.
        save(state, weights)
        save(tensors, io, metadata={"format": FORMAT})
        print(
            f"fixtures_backbones: {arch}: {len(state)} tensors, features {tuple(y.shape)} "
            f"(max |f| {y.abs().max().item():.3g}), features2 {tuple(y2.shape)}"
        )


if __name__ == "__main__":
    main()
