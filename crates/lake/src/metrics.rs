//! Retrieval metrics for re-identification: rank a gallery for each query by cosine similarity
//! and score where the photos of the same individual land.
//!
//! Definitions (one query `q`, its label `ℓ`):
//!
//! - The gallery is ranked by cosine similarity to `q`, highest first; equal similarities are
//!   ordered by gallery index, lower first. Gallery photos whose id equals the query's id are
//!   left out of the ranking: they are the query itself (when the query set is part of the
//!   gallery), and finding yourself says nothing about re-identification.
//! - `rel(k)` is 1 if the photo at rank `k` has label `ℓ`, else 0; `P(k)` is the share of
//!   relevant photos among the first `k`.
//! - `R_q` is the number of gallery photos, other than the query itself, with label `ℓ`. Only
//!   queries with `R_q > 0` are scored (an individual seen once cannot be re-identified);
//!   [`RetrievalMetrics::queries`] is their number.
//! - precision@1 = mean of `rel(1)`.
//! - mAP@20: `AP@20(q) = 1/min(R_q, 20) · Σ_{k=1..20} P(k)·rel(k)`, averaged over queries (the
//!   normalisation by `min(R_q, 20)` gives a perfect ranking 1 even when `R_q > 20`).
//! - recall@k = share of queries with at least one relevant photo in the first `k`.
//! - MAP@R (Musgrave et al., "A Metric Learning Reality Check"):
//!   `1/R_q · Σ_{k=1..R_q} P(k)·rel(k)`, averaged over queries.
//!
//! With no scored query every mean is 0.0 (and `queries` is 0), so the struct always serialises
//! to plain numbers.
//!
//! Cost: the similarity matrix is computed in blocks (never materialised whole), and each query
//! only orders the top `max(20, R_q, max recall k)` candidates after a linear-time selection.
//! On x86-64 with AVX2/FMA the dot products use 8-wide FMA; either way each (query, gallery)
//! pair is computed by the same sequence of operations wherever it falls in a block, so two
//! identical gallery embeddings always tie exactly and the tie rule above decides.

use std::collections::HashMap;

/// Rank cut-off of mAP@20.
const MAP_CUTOFF: usize = 20;
/// Metrics run next to training and data loading, so they take two threads, no more: that
/// keeps 5k × 5k × 256 at about 1.3 s of CPU in a debug build (measured), most of it SIMD.
const THREADS: usize = 2;
/// Queries whose similarity rows are computed together: the gallery tile is reused across them.
const QUERY_BLOCK: usize = 16;
/// Gallery rows per tile: 64 rows × 256 dims × 4 bytes = 64 KiB stays in L2 while a query
/// block sweeps over it.
const GALLERY_TILE: usize = 64;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrievalMetrics {
    /// Queries scored: those with at least one other gallery photo of their label.
    pub queries: usize,
    pub precision_at_1: f64,
    pub map_at_20: f64,
    /// `(k, recall@k)` in the order the cut-offs were asked for.
    pub recall_at: Vec<(usize, f64)>,
    pub map_at_r: f64,
}

/// Scores of one query; summed over queries in query order so the result does not depend on
/// how the work was split between threads.
#[derive(Debug, Clone, Copy)]
struct QueryScore {
    p1: f64,
    ap20: f64,
    map_r: f64,
    /// Rank (1-based) of the first relevant photo, if it is within the ranks looked at.
    first_hit: Option<usize>,
}

/// Queries and gallery are row-major f32 embeddings of dimension `dim`, compared by cosine
/// similarity (each row is L2-normalised here; an all-zero row has similarity 0 to everything).
/// `query_ids`/`gallery_ids` identify photos: gallery photos with the same id as the query are
/// excluded from its ranking. Labels are individual ids. See the module docs for the metrics.
///
/// A NaN similarity (from a NaN embedding) ranks below every number.
///
/// # Panics
/// If a slice length disagrees with the number of labels (times `dim` for embeddings), or the
/// gallery has more than 2³² rows.
#[allow(clippy::too_many_arguments)]
pub fn retrieval_metrics(
    queries: &[f32],
    query_labels: &[String],
    query_ids: &[String],
    gallery: &[f32],
    gallery_labels: &[String],
    gallery_ids: &[String],
    dim: usize,
    recall_ks: &[usize],
) -> RetrievalMetrics {
    retrieval_metrics_reranked(queries, query_labels, query_ids, gallery, gallery_labels, gallery_ids, dim, recall_ks, None)
}

/// Re-scores the first `k` candidates of a query: given the query's row and its candidates as
/// `(gallery row, cosine similarity)` in rank order, one new score per candidate (higher ranks
/// first). Called from the metrics' worker threads.
pub type Rescore<'a> = dyn Fn(usize, &[(usize, f32)]) -> Vec<f32> + Sync + 'a;

/// A [`Rescore`] bound to one query.
type RescoreOne<'a> = dyn Fn(&[(usize, f32)]) -> Vec<f32> + 'a;

/// [`retrieval_metrics`] with each query's first `k` candidates re-ordered by a re-ranker
/// (geometric verification, say): the top `k` are sorted by the new scores (ties keep the
/// similarity order), and the ranks below `k` stay as the similarities put them.
#[allow(clippy::too_many_arguments)]
pub fn retrieval_metrics_reranked(
    queries: &[f32],
    query_labels: &[String],
    query_ids: &[String],
    gallery: &[f32],
    gallery_labels: &[String],
    gallery_ids: &[String],
    dim: usize,
    recall_ks: &[usize],
    rerank: Option<(usize, &Rescore)>,
) -> RetrievalMetrics {
    let nq = query_labels.len();
    let ng = gallery_labels.len();
    assert_eq!(
        query_ids.len(),
        nq,
        "query_ids and query_labels differ in length"
    );
    assert_eq!(
        queries.len(),
        nq * dim,
        "queries is not query_labels.len() × dim"
    );
    assert_eq!(
        gallery_ids.len(),
        ng,
        "gallery_ids and gallery_labels differ in length"
    );
    assert_eq!(
        gallery.len(),
        ng * dim,
        "gallery is not gallery_labels.len() × dim"
    );

    // Rank keys pack the gallery index into 32 bits.
    assert!(ng <= u32::MAX as usize, "gallery larger than 2^32 rows");

    // Labels become small integers so that relevance is an integer compare in the hot loop.
    let mut codes: HashMap<&str, u32> = HashMap::new();
    let mut label_count: Vec<usize> = Vec::new();
    let gallery_code: Vec<u32> = gallery_labels
        .iter()
        .map(|l| {
            let next = codes.len() as u32;
            let c = *codes.entry(l.as_str()).or_insert(next);
            if c as usize == label_count.len() {
                label_count.push(0);
            }
            label_count[c as usize] += 1;
            c
        })
        .collect();
    let mut by_id: HashMap<&str, Vec<u32>> = HashMap::new();
    for (g, id) in gallery_ids.iter().enumerate() {
        by_id.entry(id.as_str()).or_default().push(g as u32);
    }

    // The queries that count, with their label code, R_q and the gallery rows that are themselves.
    let mut active: Vec<Active> = Vec::new();
    for q in 0..nq {
        let Some(&code) = codes.get(query_labels[q].as_str()) else {
            continue;
        };
        let own: &[u32] = by_id
            .get(query_ids[q].as_str())
            .map_or(&[], |v| v.as_slice());
        let own_same_label = own
            .iter()
            .filter(|&&g| gallery_code[g as usize] == code)
            .count();
        let r = label_count[code as usize] - own_same_label;
        if r > 0 {
            active.push(Active { q, code, r, own });
        }
    }

    let qn = Packed::new(queries, dim);
    let gn = Packed::new(gallery, dim);
    let max_k = recall_ks.iter().copied().max().unwrap_or(0);
    let ctx = Ctx {
        qn: &qn,
        gn: &gn,
        ng,
        gallery_code: &gallery_code,
        max_k,
        rerank,
    };

    let per_thread = active.len().div_ceil(THREADS).max(1);
    let scores: Vec<QueryScore> = std::thread::scope(|s| {
        let handles: Vec<_> = active
            .chunks(per_thread)
            .map(|part| s.spawn(|| score_queries(&ctx, part)))
            .collect();
        handles
            .into_iter()
            // A panic in a worker is a bug in this module; re-raise it on the caller's thread.
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });

    let n = scores.len();
    let mean = |f: &dyn Fn(&QueryScore) -> f64| {
        if n == 0 {
            0.0
        } else {
            scores.iter().map(f).sum::<f64>() / n as f64
        }
    };
    RetrievalMetrics {
        queries: n,
        precision_at_1: mean(&|s| s.p1),
        map_at_20: mean(&|s| s.ap20),
        recall_at: recall_ks
            .iter()
            .map(|&k| {
                (
                    k,
                    mean(&|s| s.first_hit.map_or(0.0, |h| if h <= k { 1.0 } else { 0.0 })),
                )
            })
            .collect(),
        map_at_r: mean(&|s| s.map_r),
    }
}

struct Active<'a> {
    q: usize,
    code: u32,
    r: usize,
    own: &'a [u32],
}

struct Ctx<'a> {
    qn: &'a Packed,
    gn: &'a Packed,
    ng: usize,
    gallery_code: &'a [u32],
    max_k: usize,
    rerank: Option<(usize, &'a Rescore<'a>)>,
}

fn score_queries(ctx: &Ctx, part: &[Active]) -> Vec<QueryScore> {
    let lanes = ctx.qn.lanes;
    let mut out = Vec::with_capacity(part.len());
    let mut block = vec![Lane::default(); QUERY_BLOCK * lanes];
    let mut sims = vec![0f32; QUERY_BLOCK * ctx.ng];
    let mut is_own = vec![false; ctx.ng];
    let mut keys = vec![0u64; ctx.ng];
    for chunk in part.chunks(QUERY_BLOCK) {
        for (i, a) in chunk.iter().enumerate() {
            block[i * lanes..(i + 1) * lanes].copy_from_slice(ctx.qn.row(a.q));
        }
        let rows = chunk.len();
        dots(
            &block[..rows * lanes],
            &ctx.gn.data,
            lanes,
            &mut sims[..rows * ctx.ng],
        );
        for (i, a) in chunk.iter().enumerate() {
            for &g in a.own {
                is_own[g as usize] = true;
            }
            // Plain indexed loops here and in `select_smallest`: they run queries × gallery
            // times, and in a debug build iterator adaptors, `push` and the std sort/select
            // are out-of-line calls with precondition checks, several times the work itself.
            let (base, mut n, mut g) = (i * ctx.ng, 0, 0);
            while g < ctx.ng {
                if !is_own[g] {
                    keys[n] = rank_key(sims[base + g], g);
                    n += 1;
                }
                g += 1;
            }
            for &g in a.own {
                is_own[g as usize] = false;
            }
            let rerank = ctx.rerank.map(|(k, f)| (k, move |c: &[(usize, f32)]| f(a.q, c)));
            out.push(score_one(
                &mut keys[..n],
                ctx.gallery_code,
                a.code,
                a.r,
                ctx.max_k,
                rerank.as_ref().map(|(k, f)| (*k, f as &RescoreOne)),
            ));
        }
    }
    out
}

/// One u64 per candidate whose ascending order is the ranking: similarity descending, then
/// gallery index ascending. -0.0 counts as 0.0 (so the index decides, as for any tie) and NaN
/// ranks last.
#[inline(always)]
fn rank_key(sim: f32, g: usize) -> u64 {
    let s = if sim.is_nan() {
        f32::NEG_INFINITY
    } else {
        sim + 0.0
    };
    let bits = s.to_bits();
    // Maps floats to u32 in numeric order (negatives reversed, positives above them).
    let ordered = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    (u64::from(!ordered) << 32) | g as u64
}

/// The similarity a [`rank_key`] was made from (NaN comes back as -inf).
fn key_sim(key: u64) -> f32 {
    let ordered = !((key >> 32) as u32);
    let bits = if ordered >> 31 == 1 { ordered & 0x7fff_ffff } else { !ordered };
    f32::from_bits(bits)
}

/// Moves the `m` smallest keys to the front of `v` (in any order). Quickselect with a
/// median-of-three pivot; the keys are distinct (they contain the gallery index). Falls back to
/// the std selection (worst-case linear) if partitioning degenerates.
// Swaps by hand rather than `v.swap`, which is a checked out-of-line call in a debug build.
#[allow(clippy::manual_swap)]
fn select_smallest(v: &mut [u64], m: usize) {
    let (mut lo, mut hi) = (0usize, v.len());
    let mut rounds = 0;
    while hi - lo > 1 && lo < m && m < hi {
        rounds += 1;
        if rounds > 64 {
            v[lo..hi].select_nth_unstable(m - lo);
            return;
        }
        let mid = lo + (hi - lo) / 2;
        let (x, y, z) = (v[lo], v[mid], v[hi - 1]);
        let pivot = x.max(y).min(x.min(y).max(z));
        // Lomuto partition: [lo, store) < pivot.
        let mut store = lo;
        let mut i = lo;
        while i < hi {
            if v[i] < pivot {
                let t = v[i];
                v[i] = v[store];
                v[store] = t;
                store += 1;
            }
            i += 1;
        }
        if store == m {
            return;
        } else if store > m {
            hi = store;
        } else {
            // Put the pivot itself right after the smaller part, then go on above it.
            let mut p = store;
            while v[p] != pivot {
                p += 1;
            }
            v[p] = v[store];
            v[store] = pivot;
            lo = store + 1;
        }
    }
}

fn score_one(
    keys: &mut [u64],
    gallery_code: &[u32],
    code: u32,
    r: usize,
    max_k: usize,
    rerank: Option<(usize, &RescoreOne)>,
) -> QueryScore {
    // Every metric only looks at the first max(20, R_q, max k) ranks (and the re-ranked ones).
    let depth = MAP_CUTOFF.max(r).max(max_k).max(rerank.map_or(0, |(k, _)| k)).min(keys.len());
    select_smallest(keys, depth);
    let top = &mut keys[..depth];
    top.sort_unstable();
    if let Some((k, f)) = rerank {
        let k = k.min(depth);
        let cands: Vec<(usize, f32)> = top[..k].iter().map(|&key| ((key & 0xffff_ffff) as usize, key_sim(key))).collect();
        let scores = f(&cands);
        assert_eq!(scores.len(), k, "a re-ranker returns one score per candidate");
        let mut order: Vec<usize> = (0..k).collect();
        // Stable: equal scores keep the similarity order.
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let reordered: Vec<u64> = order.iter().map(|&i| top[i]).collect();
        top[..k].copy_from_slice(&reordered);
    }
    let (mut hits, mut sum20, mut sum_r, mut first_hit) = (0usize, 0f64, 0f64, None);
    for (i, &key) in top.iter().enumerate() {
        if gallery_code[(key & 0xffff_ffff) as usize] != code {
            continue;
        }
        let k = i + 1;
        hits += 1;
        first_hit.get_or_insert(k);
        let p = hits as f64 / k as f64;
        if k <= MAP_CUTOFF {
            sum20 += p;
        }
        if k <= r {
            sum_r += p;
        }
    }
    QueryScore {
        p1: if first_hit == Some(1) { 1.0 } else { 0.0 },
        ap20: sum20 / r.min(MAP_CUTOFF) as f64,
        map_r: sum_r / r as f64,
        first_hit,
    }
}

/// Eight floats aligned as one AVX register, so that the kernels read embeddings with plain
/// aligned loads (no per-load helper calls, which dominate in a debug build).
#[derive(Clone, Copy, Default)]
#[repr(C, align(32))]
struct Lane([f32; 8]);

/// Rows scaled to unit L2 norm and zero-padded to whole lanes. The norm is floored at 1e-12 (as
/// `F.normalize`), so a zero row stays zero; the padding adds exact zeros to every dot product.
struct Packed {
    lanes: usize,
    data: Vec<Lane>,
}

impl Packed {
    fn new(x: &[f32], dim: usize) -> Packed {
        let lanes = dim.div_ceil(8);
        let rows = x.len().checked_div(dim).unwrap_or(0);
        let mut data = vec![Lane::default(); rows * lanes];
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let norm = row
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum::<f64>()
                .sqrt()
                .max(1e-12);
            let inv = (1.0 / norm) as f32;
            for (d, &v) in row.iter().enumerate() {
                data[r * lanes + d / 8].0[d % 8] = v * inv;
            }
        }
        Packed { lanes, data }
    }

    fn row(&self, r: usize) -> &[Lane] {
        &self.data[r * self.lanes..(r + 1) * self.lanes]
    }
}

/// Rows of a matrix scaled to unit length, packed for the dot-product kernels: the gallery of
/// an exact in-memory search ([`crate::vector::InMemory`]).
pub struct UnitRows {
    packed: Packed,
    dim: usize,
    rows: usize,
}

impl UnitRows {
    /// `x`: row-major, `dim` floats a row.
    pub fn new(x: &[f32], dim: usize) -> UnitRows {
        UnitRows { packed: Packed::new(x, dim), dim, rows: x.len().checked_div(dim).unwrap_or(0) }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cosine similarity of `query` (scaled to unit length here) to every row, in row order.
    /// Panics unless `query` has `dim` values.
    pub fn similarities(&self, query: &[f32]) -> Vec<f32> {
        assert_eq!(query.len(), self.dim, "query length is not the rows' dimension");
        let q = Packed::new(query, self.dim);
        let mut out = vec![0f32; self.rows];
        dots(&q.data, &self.packed.data, self.packed.lanes, &mut out);
        out
    }
}

/// `out[i·ng + j] = qs[i] · gallery[j]` for the `qs.len() / lanes` query rows and all gallery rows.
fn dots(qs: &[Lane], gallery: &[Lane], lanes: usize, out: &mut [f32]) {
    if lanes == 0 {
        out.fill(0.0);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for (checked above).
        unsafe { avx2::dots(qs, gallery, lanes, out) };
        return;
    }
    portable_dots(qs, gallery, lanes, out);
}

fn portable_dots(qs: &[Lane], gallery: &[Lane], lanes: usize, out: &mut [f32]) {
    let ng = gallery.len() / lanes;
    for (i, q) in qs.chunks_exact(lanes).enumerate() {
        for (j, g) in gallery.chunks_exact(lanes).enumerate() {
            out[i * ng + j] = portable_dot(q, g);
        }
    }
}

/// Eight partial sums, then a fixed reduction: the same order for every pair.
fn portable_dot(a: &[Lane], b: &[Lane]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.iter().zip(b) {
        for (acc, (x, y)) in acc.iter_mut().zip(x.0.iter().zip(&y.0)) {
            *acc += x * y;
        }
    }
    reduce8(&acc)
}

/// The one reduction order of eight partial sums, shared by both kernels.
#[inline(always)]
fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GALLERY_TILE, Lane, reduce8};

    /// Register-blocked 2 queries × 4 gallery rows; leftovers go through [`dot1`], which runs
    /// exactly the per-pair operations of the block kernel so that a result does not depend on
    /// where its row falls. Loops are plain `while` loops: in a debug build every iterator or
    /// pointer helper is a call with precondition checks, several times the cost of an FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dots(qs: &[Lane], gallery: &[Lane], lanes: usize, out: &mut [f32]) {
        let ng = gallery.len() / lanes;
        let nq = qs.len() / lanes;
        let mut t0 = 0;
        while t0 < ng {
            let t1 = (t0 + GALLERY_TILE).min(ng);
            let mut i = 0;
            while i + 2 <= nq {
                let mut j = t0;
                while j + 4 <= t1 {
                    let r = dot2x4(qs, i * lanes, gallery, j * lanes, lanes);
                    let (o0, o1) = (i * ng + j, (i + 1) * ng + j);
                    out[o0] = r[0];
                    out[o0 + 1] = r[1];
                    out[o0 + 2] = r[2];
                    out[o0 + 3] = r[3];
                    out[o1] = r[4];
                    out[o1 + 1] = r[5];
                    out[o1 + 2] = r[6];
                    out[o1 + 3] = r[7];
                    j += 4;
                }
                while j < t1 {
                    out[i * ng + j] = dot1(qs, i * lanes, gallery, j * lanes, lanes);
                    out[(i + 1) * ng + j] = dot1(qs, (i + 1) * lanes, gallery, j * lanes, lanes);
                    j += 1;
                }
                i += 2;
            }
            if i < nq {
                // One query left (a single search, or an odd count): eight gallery rows at a
                // time keep eight independent FMA chains going instead of one.
                let mut j = t0;
                while j + 8 <= t1 {
                    let r = dot1x8(qs, i * lanes, gallery, j * lanes, lanes);
                    out[i * ng + j..i * ng + j + 8].copy_from_slice(&r);
                    j += 8;
                }
                while j < t1 {
                    out[i * ng + j] = dot1(qs, i * lanes, gallery, j * lanes, lanes);
                    j += 1;
                }
            }
            t0 = t1;
        }
    }

    /// By value rather than through a cast pointer: a debug build checks the alignment of every
    /// raw-pointer read with an out-of-line call.
    #[inline(always)]
    fn vec(l: &Lane) -> __m256 {
        // SAFETY: [f32; 8] and __m256 have the same size, and any bit pattern is a valid __m256.
        unsafe { std::mem::transmute::<[f32; 8], __m256>(l.0) }
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: same size, and every bit pattern is a valid [f32; 8].
        let a: [f32; 8] = unsafe { std::mem::transmute(v) };
        reduce8(&a)
    }

    /// Rows are passed as (slice, offset of the row's first lane) rather than as sub-slices:
    /// each sub-slice is an out-of-line checked call in a debug build.
    #[target_feature(enable = "avx2,fma")]
    fn dot1(a: &[Lane], a0: usize, b: &[Lane], b0: usize, lanes: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut d = 0;
        while d < lanes {
            acc = _mm256_fmadd_ps(vec(&a[a0 + d]), vec(&b[b0 + d]), acc);
            d += 1;
        }
        hsum(acc)
    }

    /// The query row at `q0` against the eight gallery rows from `g0`: per pair the same
    /// operations as [`dot1`].
    #[target_feature(enable = "avx2,fma")]
    fn dot1x8(q: &[Lane], q0: usize, g: &[Lane], g0: usize, lanes: usize) -> [f32; 8] {
        let z = _mm256_setzero_ps();
        let mut acc = [z; 8];
        let mut d = 0;
        while d < lanes {
            let x = vec(&q[q0 + d]);
            let mut r = 0;
            while r < 8 {
                acc[r] = _mm256_fmadd_ps(x, vec(&g[g0 + r * lanes + d]), acc[r]);
                r += 1;
            }
            d += 1;
        }
        let mut out = [0f32; 8];
        let mut r = 0;
        while r < 8 {
            out[r] = hsum(acc[r]);
            r += 1;
        }
        out
    }

    /// Query rows at `q0` and `q0 + lanes`, gallery rows at `g0` .. `g0 + 3·lanes`; returns the
    /// four dot products of the first query, then the four of the second.
    #[target_feature(enable = "avx2,fma")]
    fn dot2x4(q: &[Lane], q0: usize, g: &[Lane], g0: usize, lanes: usize) -> [f32; 8] {
        let z = _mm256_setzero_ps();
        let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
        let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
        let (q1, g1, g2, g3) = (q0 + lanes, g0 + lanes, g0 + 2 * lanes, g0 + 3 * lanes);
        let mut d = 0;
        while d < lanes {
            let (x0, x1) = (vec(&q[q0 + d]), vec(&q[q1 + d]));
            let y = vec(&g[g0 + d]);
            a00 = _mm256_fmadd_ps(x0, y, a00);
            a10 = _mm256_fmadd_ps(x1, y, a10);
            let y = vec(&g[g1 + d]);
            a01 = _mm256_fmadd_ps(x0, y, a01);
            a11 = _mm256_fmadd_ps(x1, y, a11);
            let y = vec(&g[g2 + d]);
            a02 = _mm256_fmadd_ps(x0, y, a02);
            a12 = _mm256_fmadd_ps(x1, y, a12);
            let y = vec(&g[g3 + d]);
            a03 = _mm256_fmadd_ps(x0, y, a03);
            a13 = _mm256_fmadd_ps(x1, y, a13);
            d += 1;
        }
        [
            hsum(a00),
            hsum(a01),
            hsum(a02),
            hsum(a03),
            hsum(a10),
            hsum(a11),
            hsum(a12),
            hsum(a13),
        ]
    }
}

/// α-query expansion (Radenović et al.): each query is replaced by the normalised sum of itself
/// and its `k` nearest gallery photos (other than itself, by id), each weighted by its cosine
/// similarity to the query raised to `alpha` (negative similarities weigh 0). Re-ranking with
/// the expanded queries pulls in photos that look like the query's close matches — the other
/// views of the same individual — which a single query vector misses. Returns the expanded
/// queries, row-major, unit length; `k == 0` returns the queries normalised.
#[allow(clippy::too_many_arguments)]
pub fn alpha_query_expansion(
    queries: &[f32],
    query_ids: &[String],
    gallery: &[f32],
    gallery_ids: &[String],
    dim: usize,
    k: usize,
    alpha: f32,
) -> Vec<f32> {
    let nq = query_ids.len();
    let ng = gallery_ids.len();
    assert_eq!(queries.len(), nq * dim, "queries is not query_ids.len() × dim");
    assert_eq!(gallery.len(), ng * dim, "gallery is not gallery_ids.len() × dim");
    let unit = |v: &[f32]| -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 { v.iter().map(|x| x / n).collect() } else { v.to_vec() }
    };
    let g: Vec<Vec<f32>> = (0..ng).map(|j| unit(&gallery[j * dim..(j + 1) * dim])).collect();
    let mut out = Vec::with_capacity(nq * dim);
    for q in 0..nq {
        let qv = unit(&queries[q * dim..(q + 1) * dim]);
        let mut sims: Vec<(f32, usize)> = (0..ng)
            .filter(|&j| gallery_ids[j] != query_ids[q])
            .map(|j| (dot(&qv, &g[j]), j))
            .filter(|(s, _)| s.is_finite())
            .collect();
        let take = k.min(sims.len());
        if take > 0 {
            sims.select_nth_unstable_by(take - 1, |a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        out.extend(expand_query(&qv, sims[..take].iter().map(|&(s, j)| (s, g[j].as_slice())), alpha));
    }
    out
}

/// One α-query-expansion query: the unit query `q` plus each neighbour (similarity, unit
/// vector) weighted by `max(similarity, 0)^alpha`, re-normalised. What
/// [`alpha_query_expansion`] does per query, for callers that found the neighbours themselves
/// (through a vector index).
/// Dot product of two equal-length vectors (cosine similarity of unit vectors).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = (dot(a, a) * dot(b, b)).sqrt();
    if n > 0.0 { dot(a, b) / n } else { 0.0 }
}

pub fn expand_query<'a>(q: &[f32], neighbours: impl IntoIterator<Item = (f32, &'a [f32])>, alpha: f32) -> Vec<f32> {
    let mut acc = q.to_vec();
    for (s, v) in neighbours {
        let w = s.max(0.0).powf(alpha);
        for (a, x) in acc.iter_mut().zip(v) {
            *a += w * x;
        }
    }
    let n = acc.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        acc.iter_mut().for_each(|x| *x /= n);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// 2-D gallery on the unit circle; one query at angle 0, its own copy in the gallery.
    ///
    /// gallery (index: angle°, label, id): 0: 0° A "q" (the query itself, excluded),
    /// 1: 10° B, 2: 20° A, 3: 20° B (ties with 2: index 2 ranks first), 4: 90° A, 5: 180° C.
    /// Ranking without the query: [1 B, 2 A, 3 B, 4 A, 5 C]; rel = [0, 1, 0, 1, 0]; R = 2.
    /// P@1 = 0. AP@20 = (1/2 + 2/4) / 2 = 0.5. MAP@R: only ranks 1..2: (1/2) / 2 = 0.25.
    /// recall@1 = 0, recall@2 = 1.
    #[test]
    fn hand_checked_single_query() {
        let deg = |d: f64| [d.to_radians().cos() as f32, d.to_radians().sin() as f32];
        let gallery: Vec<f32> = [0.0, 10.0, 20.0, 20.0, 90.0, 180.0]
            .iter()
            .flat_map(|&d| deg(d))
            .collect();
        let m = retrieval_metrics(
            &deg(0.0),
            &s(&["A"]),
            &s(&["q"]),
            &gallery,
            &s(&["A", "B", "A", "B", "A", "C"]),
            &s(&["q", "g1", "g2", "g3", "g4", "g5"]),
            2,
            &[1, 2, 5],
        );
        assert_eq!(m.queries, 1);
        assert!(close(m.precision_at_1, 0.0));
        assert!(close(m.map_at_20, 0.5));
        assert!(close(m.map_at_r, 0.25));
        assert_eq!(m.recall_at, vec![(1, 0.0), (2, 1.0), (5, 1.0)]);
    }

    /// The same single query, re-ranked: a re-ranker that puts gallery row 4 (90°, A) first
    /// sees the candidates in similarity order with their similarities, and moves it to rank 1;
    /// ranks below k stay. Ranking [4 A, 1 B, 2 A, 3 B, 5 C]: P@1 = 1, AP@20 = (1 + 2/3) / 2.
    #[test]
    fn a_re_ranker_reorders_the_first_k() {
        let deg = |d: f64| [d.to_radians().cos() as f32, d.to_radians().sin() as f32];
        let gallery: Vec<f32> = [0.0, 10.0, 20.0, 20.0, 90.0, 180.0].iter().flat_map(|&d| deg(d)).collect();
        let seen = std::sync::Mutex::new(Vec::new());
        let boost = |q: usize, c: &[(usize, f32)]| {
            seen.lock().unwrap().push((q, c.to_vec()));
            c.iter().map(|&(g, sim)| if g == 4 { 10.0 } else { sim }).collect()
        };
        let run = |k: usize| {
            retrieval_metrics_reranked(
                &deg(0.0),
                &s(&["A"]),
                &s(&["q"]),
                &gallery,
                &s(&["A", "B", "A", "B", "A", "C"]),
                &s(&["q", "g1", "g2", "g3", "g4", "g5"]),
                2,
                &[1, 2, 5],
                Some((k, &boost)),
            )
        };
        let m = run(4);
        assert!(close(m.precision_at_1, 1.0));
        assert!(close(m.map_at_20, (1.0 + 2.0 / 3.0) / 2.0), "{}", m.map_at_20);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let (q, c) = &seen[0];
        assert_eq!(*q, 0);
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert!((c[0].1 - 10f32.to_radians().cos()).abs() < 1e-6 && (c[3].1 - 90f32.to_radians().cos()).abs() < 1e-6, "{c:?}");
        // Row 4 is rank 4 by similarity: a re-ranker of the first 3 cannot reach it.
        let m = run(3);
        assert!(close(m.precision_at_1, 0.0) && close(m.map_at_20, 0.5));
    }

    #[test]
    fn rank_keys_give_their_similarity_back() {
        for v in [0.0f32, -0.0, 1.0, -1.0, 0.25, -0.7, f32::MIN_POSITIVE, 1e-30, -3.5] {
            assert_eq!(key_sim(rank_key(v, 7)), v + 0.0, "{v}");
        }
        assert_eq!(key_sim(rank_key(f32::NAN, 0)), f32::NEG_INFINITY);
    }

    /// Tie order decides: the same vectors with the labels of the tied pair swapped.
    /// Ranking [1 B, 2 B, 3 A, 4 A, 5 C]: rel = [0, 0, 1, 1, 0]; AP@20 = (1/3 + 2/4) / 2 = 5/12;
    /// MAP@R = 0 (nothing relevant in the first 2).
    #[test]
    fn ties_go_to_the_lower_gallery_index() {
        let deg = |d: f64| [d.to_radians().cos() as f32, d.to_radians().sin() as f32];
        let gallery: Vec<f32> = [0.0, 10.0, 20.0, 20.0, 90.0, 180.0]
            .iter()
            .flat_map(|&d| deg(d))
            .collect();
        let m = retrieval_metrics(
            &deg(0.0),
            &s(&["A"]),
            &s(&["q"]),
            &gallery,
            &s(&["A", "B", "B", "A", "A", "C"]),
            &s(&["q", "g1", "g2", "g3", "g4", "g5"]),
            2,
            &[3],
        );
        assert!(close(m.map_at_20, 5.0 / 12.0));
        assert!(close(m.map_at_r, 0.0));
        assert_eq!(m.recall_at, vec![(3, 1.0)]);
    }

    /// Three queries, scale-invariance, a lone query and one whose label is not in the gallery.
    ///
    /// gallery: 0: (1,0) A, 1: (0,1) B, 2: (1,1) A, 3: (-1,0) B.
    /// q0 = (5,0) label A: sims [1, 0, .707, -1] → [0 A, 2 A, 1 B, 3 B]: P@1 1, AP 1, MAP@R 1.
    /// q1 = (0,2) label B: sims [0, 1, .707, 0] → [1 B, 2 A, 0 A, 3 B] (0 and 3 tie):
    ///   rel [1,0,0,1]: P@1 1, AP@20 = (1 + 2/4)/2 = 0.75, MAP@R = (1)/2 = 0.5.
    /// q2 label Z: not in the gallery, not scored.
    /// q3 = gallery row 1 itself (id "g1", label B): row 1 is left out, R = 1 (row 3);
    ///   sims [0, -, .707, 0] → [2 A, 0 A, 3 B]: rel [0,0,1]: P@1 0, AP@20 = 1/3, MAP@R = 0.
    #[test]
    fn several_queries_self_exclusion_and_unscored() {
        let gallery = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0];
        let m = retrieval_metrics(
            &[5.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0],
            &s(&["A", "B", "Z", "B"]),
            &s(&["q0", "q1", "q2", "g1"]),
            &gallery,
            &s(&["A", "B", "A", "B"]),
            &s(&["g0", "g1", "g2", "g3"]),
            2,
            &[1, 2, 3],
        );
        assert_eq!(m.queries, 3);
        assert!(close(m.precision_at_1, 2.0 / 3.0));
        assert!(close(m.map_at_20, (1.0 + 0.75 + 1.0 / 3.0) / 3.0));
        assert!(close(m.map_at_r, (1.0 + 0.5 + 0.0) / 3.0));
        assert_eq!(m.recall_at, vec![(1, 2.0 / 3.0), (2, 2.0 / 3.0), (3, 1.0)]);
    }

    #[test]
    fn lone_queries_only_give_zeros() {
        let m = retrieval_metrics(
            &[1.0],
            &s(&["A"]),
            &s(&["a"]),
            &[1.0],
            &s(&["A"]),
            &s(&["a"]),
            1,
            &[1],
        );
        assert_eq!(
            m,
            RetrievalMetrics {
                queries: 0,
                precision_at_1: 0.0,
                map_at_20: 0.0,
                recall_at: vec![(1, 0.0)],
                map_at_r: 0.0
            }
        );
    }

    /// The blocked SIMD kernel and the plain one agree, and identical gallery rows tie exactly
    /// wherever they fall in the blocks.
    #[test]
    fn dot_kernels_agree_and_duplicates_tie() {
        let dim = 37; // 4 full lanes and a zero-padded fifth
        let (nq, ng) = (5, 2 * GALLERY_TILE + 7);
        let mut x = 0x2545_f491_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        };
        let qs: Vec<f32> = (0..nq * dim).map(|_| next()).collect();
        let mut gallery: Vec<f32> = (0..ng * dim).map(|_| next()).collect();
        let last = ng - 1;
        let row5 = gallery[5 * dim..6 * dim].to_vec();
        gallery[last * dim..].copy_from_slice(&row5);
        let (qp, gp) = (Packed::new(&qs, dim), Packed::new(&gallery, dim));
        assert_eq!(qp.lanes, 5);
        let mut fast = vec![0f32; nq * ng];
        let mut plain = vec![0f32; nq * ng];
        dots(&qp.data, &gp.data, qp.lanes, &mut fast);
        portable_dots(&qp.data, &gp.data, qp.lanes, &mut plain);
        let flat = |p: &Packed, r: usize| -> Vec<f64> {
            p.row(r).iter().flat_map(|l| l.0).map(f64::from).collect()
        };
        for i in 0..nq {
            assert_eq!(fast[i * ng + 5].to_bits(), fast[i * ng + last].to_bits());
            let norm: f64 = flat(&qp, i).iter().map(|v| v * v).sum();
            assert!((norm - 1.0).abs() < 1e-6);
            for j in 0..ng {
                let exact: f64 = flat(&qp, i)
                    .iter()
                    .zip(flat(&gp, j))
                    .map(|(a, b)| a * b)
                    .sum();
                assert!((fast[i * ng + j] as f64 - exact).abs() < 1e-6);
                assert!((plain[i * ng + j] as f64 - exact).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn select_smallest_finds_the_prefix() {
        let mut x = 0x1234_5678_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for n in [1usize, 2, 3, 10, 257, 3000] {
            let base: Vec<u64> = (0..n)
                .map(|g| (u64::from(next() % 50) << 32) | g as u64)
                .collect();
            let mut sorted = base.clone();
            sorted.sort_unstable();
            for m in [0, 1, n / 3, n.saturating_sub(1), n] {
                let mut v = base.clone();
                select_smallest(&mut v, m);
                let mut head = v[..m].to_vec();
                head.sort_unstable();
                assert_eq!(head, sorted[..m], "n={n} m={m}");
            }
        }
        // Already sorted and reversed inputs (a query whose similarities follow gallery order).
        for mut v in [
            (0..2000u64).collect::<Vec<_>>(),
            (0..2000u64).rev().collect(),
        ] {
            select_smallest(&mut v, 20);
            let mut head = v[..20].to_vec();
            head.sort_unstable();
            assert_eq!(head, (0..20).collect::<Vec<u64>>());
        }
    }

    #[derive(serde::Deserialize)]
    struct Side {
        emb: Vec<f32>,
        labels: Vec<String>,
        ids: Vec<String>,
    }

    #[derive(serde::Deserialize)]
    struct Expected {
        queries: usize,
        precision_at_1: f64,
        map_at_20: f64,
        recall_at: Vec<(usize, f64)>,
        map_at_r: f64,
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        dim: usize,
        recall_ks: Vec<usize>,
        query: Side,
        gallery: Side,
        expected: Expected,
    }

    /// Against the independent numpy implementation of scripts/fixtures_metrics.py (itself
    /// cross-checked there against pytorch-metric-learning and scikit-learn).
    #[test]
    fn matches_python_fixture() {
        let cache = std::env::var_os("PIPELINE_CACHE")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/pipeline"))
            })
            .expect("neither PIPELINE_CACHE nor HOME is set");
        let path = cache.join("fixtures/metrics/metrics.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read {} ({e}): run scripts/setup.sh, which writes it with scripts/fixtures_metrics.py", path.display())
        });
        let f: Fixture =
            serde_json::from_str(&text).expect("fixture is not valid JSON of the expected shape");
        let m = retrieval_metrics(
            &f.query.emb,
            &f.query.labels,
            &f.query.ids,
            &f.gallery.emb,
            &f.gallery.labels,
            &f.gallery.ids,
            f.dim,
            &f.recall_ks,
        );
        let e = &f.expected;
        assert_eq!(m.queries, e.queries);
        let near = |a: f64, b: f64, what: &str| {
            assert!((a - b).abs() < 1e-6, "{what}: rust {a} vs python {b}")
        };
        near(m.precision_at_1, e.precision_at_1, "precision@1");
        near(m.map_at_20, e.map_at_20, "mAP@20");
        near(m.map_at_r, e.map_at_r, "MAP@R");
        assert_eq!(m.recall_at.len(), e.recall_at.len());
        for (&(k, r), &(ek, er)) in m.recall_at.iter().zip(&e.recall_at) {
            assert_eq!(k, ek);
            near(r, er, &format!("recall@{k}"));
        }
    }

    /// 5,000 × 5,000 × 256 must be well under a few seconds even in a debug build.
    #[test]
    fn scales_to_5k_by_5k() {
        let (n, dim) = (5000, 256);
        let mut x = 0x9e37_79b9_u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        };
        let emb: Vec<f32> = (0..n * dim).map(|_| next()).collect();
        let labels: Vec<String> = (0..n).map(|i| format!("L{}", i % 1000)).collect();
        let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let t = std::time::Instant::now();
        let m = retrieval_metrics(
            &emb,
            &labels,
            &ids,
            &emb,
            &labels,
            &ids,
            dim,
            &[1, 5, 10, 20],
        );
        let took = t.elapsed();
        eprintln!("5k x 5k x 256: {took:?}");
        assert_eq!(m.queries, n);
        assert!(took.as_secs_f64() < 10.0, "took {took:?}");
    }

    #[test]
    fn query_expansion_pulls_in_the_neighbours_views() {
        // Query q is closest to a1 (its own individual's first view) and far from a2 (the
        // second view), which looks like a1. Alone, q ranks the distractor d above a2; expanded
        // with its nearest neighbour (a1, weight sim^alpha), it ranks a2 above d.
        let dim = 3;
        let q = [1.0f32, 0.0, 0.0];
        let a1 = [0.8f32, 0.6, 0.0];
        let a2 = [0.45f32, 0.893, 0.0];
        let d = [0.6f32, 0.0, 0.8];
        let gallery: Vec<f32> = [a1, a2, d].concat();
        let gids: Vec<String> = ["a1", "a2", "d"].iter().map(|s| s.to_string()).collect();
        let glabels: Vec<String> = ["A", "A", "D"].iter().map(|s| s.to_string()).collect();
        let qids = vec!["q".to_string()];
        let qlabels = vec!["A".to_string()];
        let plain = retrieval_metrics(&q, &qlabels, &qids, &gallery, &glabels, &gids, dim, &[1]);
        let e = alpha_query_expansion(&q, &qids, &gallery, &gids, dim, 1, 1.0);
        // By hand: q + 0.8·a1 = (1.64, 0.48, 0), normalised.
        let n = (1.64f32 * 1.64 + 0.48 * 0.48).sqrt();
        for (got, want) in e.iter().zip([1.64 / n, 0.48 / n, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{e:?}");
        }
        let expanded = retrieval_metrics(&e, &qlabels, &qids, &gallery, &glabels, &gids, dim, &[1]);
        assert!(expanded.map_at_20 > plain.map_at_20, "{} -> {}", plain.map_at_20, expanded.map_at_20);
        assert!((expanded.map_at_20 - 1.0).abs() < 1e-9);
        // The query itself (same id in the gallery) is never its own neighbour; k = 0 only
        // normalises.
        let with_self: Vec<f32> = [q, a1].concat();
        let ids2: Vec<String> = ["q", "a1"].iter().map(|s| s.to_string()).collect();
        let e2 = alpha_query_expansion(&q, &qids, &with_self, &ids2, dim, 1, 1.0);
        assert_eq!(e2, e);
        let two = [2.0f32, 0.0, 0.0];
        assert_eq!(alpha_query_expansion(&two, &qids, &gallery, &gids, dim, 0, 3.0), vec![1.0, 0.0, 0.0]);
    }
}
