"""Exact top-k peer for benches/vector.rs: numpy matrix product over the same vectors.

Reads a raw little-endian float32 file of N x D unit vectors and a query file of Q x D, prints
one JSON line: p50/p99 single-query latency (ms) and batched queries/s.

    python benches/peer_numpy_knn.py BASE.f32 QUERIES.f32 DIM K
"""
import json
import sys
import time

import numpy as np


def main():
    base_file, query_file, dim, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    base = np.fromfile(base_file, dtype=np.float32).reshape(-1, dim)
    queries = np.fromfile(query_file, dtype=np.float32).reshape(-1, dim)
    lat = []
    for q in queries:
        t = time.perf_counter()
        s = base @ q
        idx = np.argpartition(-s, k)[:k]
        idx[np.argsort(-s[idx])]
        lat.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    for i in range(0, len(queries), 64):
        s = queries[i:i + 64] @ base.T
        np.argpartition(-s, k, axis=1)[:, :k]
    batched = len(queries) / (time.perf_counter() - t)
    lat.sort()
    print(json.dumps({"peer": "numpy", "rows": len(base), "p50_ms": lat[len(lat) // 2],
                      "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "batched_qps": batched}))


if __name__ == "__main__":
    main()
