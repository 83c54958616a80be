"""PyTorch peer of benches/train.rs: the same model, batch, input size and thread count.

MobileNetV2 features (torchvision) -> GeM (learnable p) -> Linear 256 -> BatchNorm1d -> ArcFace
(s=30, m=0.5) with AdamW, eager mode; inputs in 0..1 normalised with ImageNet statistics inside
the timed step, as the Rust model does. Prints one JSON line: training and embedding images/s.

    python benches/peer_train.py --batch 32 --size 224 --threads 2 --steps 5 [--device cuda --bf16] [--channels-last]
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class GeM(nn.Module):
    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        x = x.float()
        return x.clamp(min=self.eps).pow(self.p).mean((2, 3)).pow(1.0 / self.p)


class Net(nn.Module):
    def __init__(self, dim=256):
        super().__init__()
        self.backbone = torchvision.models.mobilenet_v2(weights=None).features
        self.pool = GeM()
        self.fc = nn.Linear(1280, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.bn(self.fc(self.pool(self.backbone(x)))).float()


class ArcFace(nn.Module):
    def __init__(self, dim, classes, s=30.0, m=0.5):
        super().__init__()
        self.w = nn.Parameter(torch.empty(classes, dim))
        nn.init.xavier_uniform_(self.w)
        self.s, self.m = s, m
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def forward(self, emb, y):
        cos = F.linear(F.normalize(emb), F.normalize(self.w)).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = (1.0 - cos * cos).sqrt()
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.th, phi, cos - self.mm)
        onehot = F.one_hot(y, cos.shape[1]).to(cos.dtype)
        return F.cross_entropy(self.s * (onehot * phi + (1 - onehot) * cos), y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--classes", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    net, head = Net().to(dev), ArcFace(256, a.classes).to(dev)
    opt = torch.optim.AdamW(
        [{"params": net.backbone.parameters(), "lr": 2e-4},
         {"params": list(net.pool.parameters()) + list(net.fc.parameters()) + list(net.bn.parameters()) + list(head.parameters()), "lr": 2e-3}],
        weight_decay=1e-3)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.rand(a.batch, 3, a.size, a.size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch,), device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (a.bf16 and dev.type == "cuda") else torch.autocast("cpu", enabled=False)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with amp:
            emb = net(x)
        loss = head(emb.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    net.train()
    step()
    sync()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    train_ips = a.batch / statistics.median(times)

    net.eval()
    xe = torch.rand(64, 3, a.size, a.size, device=dev).contiguous(memory_format=fmt)
    with torch.no_grad(), amp:
        net(xe)
        sync()
        etimes = []
        for _ in range(max(2, a.steps // 2)):
            t = time.perf_counter()
            F.normalize(net(xe).float())
            sync()
            etimes.append(time.perf_counter() - t)
    embed_ips = 64 / statistics.median(etimes)
    print(json.dumps({"peer": "pytorch", "torch": torch.__version__, "train_images_per_s": train_ips,
                      "embed_images_per_s": embed_ips, "step_seconds": times}))


if __name__ == "__main__":
    main()
