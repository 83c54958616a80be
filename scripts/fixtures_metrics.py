#!/usr/bin/env python3
"""Fixture for src/model/metrics.rs: seeded embeddings and the retrieval metrics expected on them.

    fixtures_metrics.py OUT_DIR      writes OUT_DIR/metrics.json

The expected numbers come from a plain numpy implementation written from the definitions (full
sort, no selection tricks), so the Rust code is checked against something that shares none of
its code. That numpy implementation is itself checked here, on tie-free variants of the data,
against pytorch-metric-learning's AccuracyCalculator (precision@1, MAP@R) and scikit-learn's
average_precision_score (the AP sum), when those are installed; the JSON lists which checks ran.

The data has the awkward cases: singleton individuals (queries with R_q = 0, not scored), query
labels absent from the gallery, queries that are gallery photos (left out of their own ranking by
id), classes larger than 20 (so min(R_q, 20) matters), exact ties (gallery rows duplicated under
another label, an all-zero query and gallery row) broken by gallery index. Near ties between
different vectors are removed: f32 (Rust) and f64 (here) similarities differ by ~1e-7, so two
candidates closer than 1e-5 could swap; they are re-drawn until none is left in the ranks that
the metrics read.
"""
import json
import sys
from pathlib import Path

import numpy as np

SEED = 20240611
DIM = 16
N_GALLERY = 300
N_QUERY_FROM_GALLERY = 200
N_QUERY_NEW = 100
RECALL_KS = [1, 5, 10, 20]
NEAR_TIE = 1e-5


def normalize(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def similarities(q, g):
    """Cosine similarities, with rows that are exact duplicates getting bit-identical values
    (BLAS may compute two equal columns of a product differently in the last bit)."""
    uq, qinv = np.unique(q, axis=0, return_inverse=True)
    ug, ginv = np.unique(g, axis=0, return_inverse=True)
    s = normalize(uq) @ normalize(ug).T
    return s[qinv.reshape(-1)][:, ginv.reshape(-1)]


def rankings(q, q_labels, q_ids, g, g_labels, g_ids):
    """Per query with R_q > 0: (relevance in rank order, R_q, sims in rank order, gallery order)."""
    sims = similarities(q, g)
    g_labels, g_ids = np.asarray(g_labels), np.asarray(g_ids)
    out = []
    for i in range(len(q)):
        keep = np.nonzero(g_ids != q_ids[i])[0]
        order = keep[np.lexsort((keep, -sims[i, keep]))]  # similarity desc, then index asc
        rel = (g_labels[order] == q_labels[i]).astype(np.float64)
        r = int(rel.sum())
        if r > 0:
            out.append((rel, r, sims[i, order], order, i))
    return out


def average_precision(rel, r, cutoff):
    """1/min(R, cutoff) · Σ_{k ≤ cutoff} P(k)·rel(k)."""
    rel = rel[:cutoff]
    hits = np.cumsum(rel)
    ks = np.arange(1, len(rel) + 1)
    return float(np.sum(hits / ks * rel) / min(r, cutoff))


def metrics(q, q_labels, q_ids, g, g_labels, g_ids, recall_ks):
    ranked = rankings(q, q_labels, q_ids, g, g_labels, g_ids)
    n = len(ranked)
    mean = lambda xs: float(np.mean(xs)) if n else 0.0
    return {
        "queries": n,
        "precision_at_1": mean([rel[0] for rel, *_ in ranked]),
        "map_at_20": mean([average_precision(rel, r, 20) for rel, r, *_ in ranked]),
        "recall_at": [[k, mean([float(rel[:k].any()) for rel, *_ in ranked])] for k in recall_ks],
        # MAP@R: the AP sum over the first R_q ranks, divided by R_q.
        "map_at_r": mean([average_precision(rel, r, r) for rel, r, *_ in ranked]),
    }


def make_data(rng):
    centers = rng.normal(size=(40, DIM))
    # 10 singleton individuals, 30 others sharing the rest with skewed sizes (some above 20).
    weights = 1.0 / np.arange(1, 31) ** 0.8
    shared = rng.choice(30, size=N_GALLERY - 10, p=weights / weights.sum())
    g_lab = np.concatenate([np.arange(30, 40), shared])
    rng.shuffle(g_lab)
    g = (centers[g_lab] + rng.normal(scale=0.9, size=(N_GALLERY, DIM))).astype(np.float32)
    g_ids = [f"g{i:03d}" for i in range(N_GALLERY)]

    # Exact ties: copy rows onto rows of another individual, before and after the source.
    dup_pairs, used = [], set()
    for i in rng.choice(N_GALLERY, size=12, replace=False):
        if int(i) in used:
            continue
        j = int(rng.integers(N_GALLERY))
        while g_lab[j] == g_lab[i] or j in used or j == i:
            j = int(rng.integers(N_GALLERY))
        g[j] = g[i]
        dup_pairs.append((int(i), j))
        used.update((int(i), j))
    zero_g = int(rng.integers(N_GALLERY))
    while any(zero_g in p for p in dup_pairs):
        zero_g = int(rng.integers(N_GALLERY))
    g[zero_g] = 0.0

    from_g = rng.choice(N_GALLERY, size=N_QUERY_FROM_GALLERY, replace=False)
    new_lab = rng.integers(0, 45, size=N_QUERY_NEW)  # 40..44: individuals absent from the gallery
    new_centers = np.concatenate([centers, rng.normal(size=(5, DIM))])
    new_q = (new_centers[new_lab] + rng.normal(scale=0.9, size=(N_QUERY_NEW, DIM))).astype(np.float32)
    new_q[:4] = g[rng.choice(N_GALLERY, size=4, replace=False)]  # same vector, other photo id
    new_q[4] = 0.0
    q = np.concatenate([g[from_g], new_q])
    q_lab = np.concatenate([g_lab[from_g], new_lab])
    q_ids = [g_ids[i] for i in from_g] + [f"q{i:03d}" for i in range(N_QUERY_NEW)]
    protected = {i for p in dup_pairs for i in p} | {zero_g}
    return q, q_lab, q_ids, from_g, g, g_lab, g_ids, protected, centers


def fix_near_ties(rng, q, q_lab, q_ids, from_g, g, g_lab, g_ids, protected, centers):
    """Re-draws gallery rows involved in near ties (and the queries that are those rows)."""
    labels = lambda xs: [f"L{x:02d}" for x in xs]
    for _ in range(100):
        bad = set()
        for rel, r, s, order, qi in rankings(q, labels(q_lab), q_ids, g, labels(g_lab), g_ids):
            if not q[qi].any():
                continue  # an all-zero query ties everything exactly, in f32 as in f64
            depth = min(len(rel), max(20, r, max(RECALL_KS)) + 1)
            for k in range(depth - 1):
                a, b = order[k], order[k + 1]
                if s[k] - s[k + 1] < NEAR_TIE and not np.array_equal(g[a], g[b]) and rel[k] != rel[k + 1]:
                    bad.update(x for x in (a, b) if x not in protected)
        if not bad:
            return
        for j in sorted(bad):
            g[j] = (centers[g_lab[j]] + rng.normal(scale=0.9, size=DIM)).astype(np.float32)
        for qi, gi in enumerate(from_g):
            q[qi] = g[gi]
    raise SystemExit("could not remove near ties")


def crosscheck(q, q_lab, q_ids, from_g, g, g_lab, g_ids, protected):
    """The numpy implementation against other libraries, on tie-free data."""
    done = []
    clean = np.array([i for i in range(len(g)) if i not in protected])
    ref, ref_lab = g[clean], g_lab[clean]
    # Queries that are gallery rows, placed first in the reference (PML's convention for
    # ref_includes_query), and new queries that are not copies of gallery rows.
    pos = {int(gi): k for k, gi in enumerate(clean)}
    inside = [pos[int(gi)] for gi in from_g if int(gi) in pos]
    order = inside + [k for k in range(len(clean)) if k not in set(inside)]
    ref, ref_lab = ref[order], ref_lab[order]
    ref_ids = [f"r{k}" for k in range(len(ref))]
    m_in = len(inside)
    outside = list(range(N_QUERY_FROM_GALLERY + 5, len(q)))  # skip the copies and the zero query
    cases = [
        ("inside", ref[:m_in], ref_lab[:m_in], ref_ids[:m_in], True),
        ("disjoint", q[outside], q_lab[outside], [q_ids[i] for i in outside], False),
    ]
    try:
        import torch
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN
    except ImportError as e:
        print(f"[fixtures_metrics] skipping the pytorch-metric-learning check: {e}", file=sys.stderr)
    else:
        calc = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r"),
            k="max_bin_count",
            device=torch.device("cpu"),
            knn_func=CustomKNN(CosineSimilarity()),
        )
        for name, cq, cl, cid, includes in cases:
            ours = metrics(cq, [str(x) for x in cl], cid, ref, [str(x) for x in ref_lab], ref_ids, RECALL_KS)
            theirs = calc.get_accuracy(
                torch.from_numpy(cq), torch.from_numpy(cl), torch.from_numpy(ref), torch.from_numpy(ref_lab), includes
            )
            for ok, tk in [("precision_at_1", "precision_at_1"), ("map_at_r", "mean_average_precision_at_r")]:
                if abs(ours[ok] - theirs[tk]) > 1e-9:
                    raise SystemExit(f"{name}: numpy {ok}={ours[ok]} but pytorch-metric-learning says {theirs[tk]}")
            done.append(f"pytorch-metric-learning precision_at_1 and mean_average_precision_at_r ({name})")
    try:
        from sklearn.metrics import average_precision_score
    except ImportError as e:
        print(f"[fixtures_metrics] skipping the scikit-learn check: {e}", file=sys.stderr)
    else:
        for name, cq, cl, cid, _ in cases:
            ranked = rankings(cq, [str(x) for x in cl], cid, ref, [str(x) for x in ref_lab], ref_ids)
            for rel, r, s, *_ in ranked:
                # Without a cut-off, the AP sum is sklearn's AP (no tied scores here).
                ours, theirs = average_precision(rel, r, len(rel)), average_precision_score(rel, s)
                if abs(ours - theirs) > 1e-9:
                    raise SystemExit(f"{name}: numpy AP {ours} but scikit-learn says {theirs}")
            done.append(f"scikit-learn average_precision_score, {len(ranked)} queries ({name})")
    return done


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    rng = np.random.default_rng(SEED)
    q, q_lab, q_ids, from_g, g, g_lab, g_ids, protected, centers = make_data(rng)
    fix_near_ties(rng, q, q_lab, q_ids, from_g, g, g_lab, g_ids, protected, centers)
    checks = crosscheck(q, q_lab, q_ids, from_g, g, g_lab, g_ids, protected)
    ql, gl = [f"L{x:02d}" for x in q_lab], [f"L{x:02d}" for x in g_lab]
    expected = metrics(q, ql, q_ids, g, gl, g_ids, RECALL_KS)
    fixture = {
        "seed": SEED,
        "dim": DIM,
        "recall_ks": RECALL_KS,
        "query": {"emb": [float(v) for v in q.reshape(-1)], "labels": ql, "ids": q_ids},
        "gallery": {"emb": [float(v) for v in g.reshape(-1)], "labels": gl, "ids": g_ids},
        "expected": expected,
        "crosschecks": checks,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(fixture))
    print(f"[fixtures_metrics] {out / 'metrics.json'}: {expected}; cross-checks: {len(checks)}", file=sys.stderr)


if __name__ == "__main__":
    main()
