#!/usr/bin/env python3
"""Pillow peer for benches/ingest.rs: decode every *.jpg in DIR and resize it to side x side.

    python3 benches/peer_pillow.py DIR [--side 480] [--repeat N] [--draft] [--start-at T]

One process, one thread, files read into memory before the clock starts so that only decoding
and resizing are timed (as on the Rust side). Each image goes through
`Image.open(p).convert('RGB').resize((side, side), Image.BILINEAR)`; with --draft, `im.draft('RGB',
(side, side))` first lets libjpeg decode at 1/2, 1/4 or 1/8 scale, Pillow's counterpart of the DCT
scaling the Rust path uses. --start-at T (seconds since the epoch) holds the timed loop until
then, so that several processes started together time the same stretch. Prints one JSON line:

    {"peer": "pillow"|"pillow-draft", "images": n, "seconds": s, "images_per_s": ..,
     "source_mp_per_s": ..}

`images` counts decodes (files x repeat); source MP is width*height of the original files.
"""

import argparse
import io
import json
import sys
import time
from pathlib import Path

from PIL import Image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--side", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--draft", action="store_true")
    ap.add_argument("--start-at", type=float, default=None)
    args = ap.parse_args()
    if args.side < 1 or args.repeat < 1:
        ap.error("--side and --repeat must be positive")

    paths = sorted(p for p in args.dir.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())
    if not paths:
        print(f"peer_pillow: no *.jpg files in {args.dir}", file=sys.stderr)
        return 1
    blobs = [p.read_bytes() for p in paths]
    # Header-only reads: the size before any draft scaling is the source size.
    source_pixels = 0
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as im:
            source_pixels += im.size[0] * im.size[1]

    size = (args.side, args.side)
    # Warm-up outside the clock: imports, codec initialisation, allocator.
    with Image.open(io.BytesIO(blobs[0])) as im:
        im.convert("RGB").resize(size, Image.BILINEAR)

    if args.start_at is not None:
        time.sleep(max(0.0, args.start_at - time.time()))
    start = time.perf_counter()
    for _ in range(args.repeat):
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as im:
                if args.draft:
                    im.draft("RGB", size)
                im.convert("RGB").resize(size, Image.BILINEAR)
    seconds = time.perf_counter() - start

    images = len(blobs) * args.repeat
    print(
        json.dumps(
            {
                "peer": "pillow-draft" if args.draft else "pillow",
                "images": images,
                "seconds": round(seconds, 6),
                "images_per_s": round(images / seconds, 3),
                "source_mp_per_s": round(source_pixels * args.repeat / 1e6 / seconds, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
