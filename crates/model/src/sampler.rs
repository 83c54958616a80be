//! Batch samplers for training, deterministic in `(seed, epoch)`.
//!
//! - [`Sampler::Shuffled`]: a seeded permutation of all indices cut into batches, for
//!   classification-style losses (ArcFace, cross-entropy) that need no pairs in the batch.
//! - [`Sampler::Pk`]: P individuals × K photos per batch, for losses that mine pairs inside the
//!   batch (batch-hard triplet).
//!
//! Every epoch draws from its own ChaCha stream (`seed`, stream `epoch`), so batches do not
//! depend on how many epochs ran before, and a resumed run reproduces the batches of an
//! uninterrupted one.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Sampler {
    Shuffled,
    Pk { p: usize, k: usize },
}

/// Batches of indices into `labels` for one epoch. Same `(seed, epoch)` → same batches.
///
/// **Shuffled**: a seeded permutation of `0..labels.len()` cut into batches of `batch_size`;
/// the last, partial batch is dropped if `drop_last`. `batch_size == 0` gives no batches.
///
/// **PK** (`batch_size` and `drop_last` are ignored: every batch is full, `p·k` indices):
/// - each batch holds `p` distinct labels with `k` indices each, grouped by label;
/// - each label's photos are shuffled and cut into groups of `k`; a short last group is
///   completed with other photos of the same label, drawn without repeats; a label with fewer
///   than `k` photos gives one group with all of them plus draws with replacement. So **every
///   index appears at least once per epoch** and labels with many photos are seen more often
///   (once per `k` photos);
/// - labels with a single photo are kept, repeated `k` times: with per-sample augmentation the
///   copies are different views of one photo, a valid positive pair, and leaving them out would
///   drop every individual seen once (a large share of a photo-ID catalogue) from training;
/// - groups are packed into batches taking first the labels with the most groups left (ties
///   drawn at random), which leaves the fewest groups that cannot be paired with `p − 1` other
///   labels; a batch that runs out of labels is completed with fresh groups of labels drawn at
///   random, so the epoch ends with full batches and nothing left out. Batch order is then
///   shuffled;
/// - with fewer than `p` distinct labels (or `p == 0`, `k == 0`) no batch is possible and the
///   result is empty.
pub fn epoch_batches(
    sampler: &Sampler,
    labels: &[u32],
    batch_size: usize,
    drop_last: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    match *sampler {
        Sampler::Shuffled => shuffled(labels.len(), batch_size, drop_last, &mut rng),
        Sampler::Pk { p, k } => pk(labels, p, k, &mut rng),
    }
}

fn shuffled(n: usize, batch_size: usize, drop_last: bool, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    if batch_size == 0 {
        return Vec::new();
    }
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(rng);
    perm.chunks(batch_size)
        .filter(|b| !drop_last || b.len() == batch_size)
        .map(<[usize]>::to_vec)
        .collect()
}

fn pk(labels: &[u32], p: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    // BTreeMap: label order must not depend on hashing for the batches to be reproducible.
    let mut by_label: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_label.entry(l).or_default().push(i);
    }
    let photos: Vec<Vec<usize>> = by_label.into_values().collect();
    if p == 0 || k == 0 || photos.len() < p {
        return Vec::new();
    }

    let mut groups: Vec<Vec<Vec<usize>>> =
        photos.iter().map(|ph| label_groups(ph, k, rng)).collect();
    // buckets[c]: labels with c groups left. Taking from the fullest bucket first keeps the
    // big labels from piling up at the end, where they could only pair with repeats.
    let most = groups.iter().map(Vec::len).max().unwrap_or(0);
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); most + 1];
    for (l, g) in groups.iter().enumerate() {
        buckets[g.len()].push(l);
    }
    let mut top = most;
    let mut batches = Vec::new();
    loop {
        let mut chosen: Vec<usize> = Vec::with_capacity(p);
        while chosen.len() < p {
            while top > 0 && buckets[top].is_empty() {
                top -= 1;
            }
            if top == 0 {
                break;
            }
            let at = rng.random_range(0..buckets[top].len());
            chosen.push(buckets[top].swap_remove(at));
        }
        if chosen.is_empty() {
            break;
        }
        let mut batch = Vec::with_capacity(p * k);
        for &l in &chosen {
            // Each chosen label came from a non-empty bucket, so it has a group left.
            if let Some(g) = groups[l].pop() {
                batch.extend(g);
            }
            let left = groups[l].len();
            if left > 0 {
                buckets[left].push(l);
                top = top.max(left);
            }
        }
        while chosen.len() < p {
            // At least p labels exist, so a label not yet in the batch is always found.
            let l = rng.random_range(0..photos.len());
            if !chosen.contains(&l) {
                chosen.push(l);
                batch.extend(fresh_group(&photos[l], k, rng));
            }
        }
        batches.push(batch);
    }
    batches.shuffle(rng);
    batches
}

/// All photos of one label in groups of exactly `k`, each photo in at least one group.
fn label_groups(photos: &[usize], k: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    if photos.len() < k {
        return vec![fresh_group(photos, k, rng)];
    }
    let mut order = photos.to_vec();
    order.shuffle(rng);
    let full = order.len() / k * k;
    let mut groups: Vec<Vec<usize>> = order[..full].chunks(k).map(<[usize]>::to_vec).collect();
    if full < order.len() {
        // Complete the remainder with distinct photos from the full groups (there are at
        // least k of them, since photos.len() ≥ k).
        let mut last = order[full..].to_vec();
        let need = k - last.len();
        last.extend(
            rand::seq::index::sample(rng, full, need)
                .into_iter()
                .map(|i| order[i]),
        );
        groups.push(last);
    }
    // Order of the groups within the label: which one meets which other labels.
    groups.shuffle(rng);
    groups
}

/// `k` photos of one label: distinct if it has at least `k`, else all of them plus draws with
/// replacement.
fn fresh_group(photos: &[usize], k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    if photos.len() >= k {
        return rand::seq::index::sample(rng, photos.len(), k)
            .into_iter()
            .map(|i| photos[i])
            .collect();
    }
    let mut g = photos.to_vec();
    while g.len() < k {
        g.push(photos[rng.random_range(0..photos.len())]);
    }
    g
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// 23 labels: sizes 1, 1, 2, 3, …, a big one of 40 photos; shuffled positions.
    fn labels() -> Vec<u32> {
        let mut v: Vec<u32> = Vec::new();
        let sizes = [
            1usize, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 40, 1, 2, 7, 3, 1, 2,
        ];
        for (l, &n) in sizes.iter().enumerate() {
            v.extend(std::iter::repeat_n(100 + l as u32, n));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        v.shuffle(&mut rng);
        v
    }

    fn check_pk(batches: &[Vec<usize>], labels: &[u32], p: usize, k: usize) {
        assert!(!batches.is_empty());
        for b in batches {
            assert_eq!(b.len(), p * k);
            let mut per: BTreeMap<u32, usize> = BTreeMap::new();
            for &i in b {
                *per.entry(labels[i]).or_default() += 1;
            }
            assert_eq!(per.len(), p, "batch {b:?}");
            assert!(per.values().all(|&c| c == k), "batch {b:?}: {per:?}");
        }
    }

    #[test]
    fn pk_batches_have_p_labels_times_k() {
        let l = labels();
        for (p, k) in [(4, 2), (3, 4), (8, 1), (23, 3)] {
            check_pk(
                &epoch_batches(&Sampler::Pk { p, k }, &l, 0, false, 1, 0),
                &l,
                p,
                k,
            );
        }
    }

    #[test]
    fn pk_groups_are_distinct_photos_when_the_label_has_enough() {
        let l = labels();
        let batches = epoch_batches(&Sampler::Pk { p: 4, k: 3 }, &l, 0, false, 3, 2);
        let count = |lab: u32| l.iter().filter(|&&x| x == lab).count();
        for b in &batches {
            for group in b.chunks(3) {
                let distinct: BTreeSet<usize> = group.iter().copied().collect();
                assert_eq!(
                    distinct.len(),
                    group.len().min(count(l[group[0]])),
                    "group {group:?}"
                );
            }
        }
    }

    #[test]
    fn every_index_appears_each_epoch() {
        let l = labels();
        for sampler in [
            Sampler::Pk { p: 4, k: 2 },
            Sampler::Pk { p: 5, k: 4 },
            Sampler::Shuffled,
        ] {
            for epoch in 0..3 {
                let seen: BTreeSet<usize> = epoch_batches(&sampler, &l, 8, false, 11, epoch)
                    .into_iter()
                    .flatten()
                    .collect();
                assert_eq!(seen.len(), l.len(), "{sampler:?} epoch {epoch}");
            }
        }
    }

    #[test]
    fn same_seed_and_epoch_same_batches_others_differ() {
        let l = labels();
        for sampler in [Sampler::Pk { p: 4, k: 2 }, Sampler::Shuffled] {
            let a = epoch_batches(&sampler, &l, 8, true, 42, 3);
            assert_eq!(a, epoch_batches(&sampler, &l, 8, true, 42, 3));
            assert_ne!(a, epoch_batches(&sampler, &l, 8, true, 42, 4));
            assert_ne!(a, epoch_batches(&sampler, &l, 8, true, 43, 3));
        }
    }

    #[test]
    fn shuffled_is_a_permutation_in_batches() {
        let l: Vec<u32> = (0..21).collect();
        let keep = epoch_batches(&Sampler::Shuffled, &l, 5, false, 0, 0);
        assert_eq!(
            keep.iter().map(Vec::len).collect::<Vec<_>>(),
            [5, 5, 5, 5, 1]
        );
        let mut all: Vec<usize> = keep.concat();
        all.sort_unstable();
        assert_eq!(all, (0..21).collect::<Vec<_>>());
        let dropped = epoch_batches(&Sampler::Shuffled, &l, 5, true, 0, 0);
        assert_eq!(dropped, keep[..4]);
        assert!(epoch_batches(&Sampler::Shuffled, &l, 0, false, 0, 0).is_empty());
    }

    #[test]
    fn pk_without_enough_labels_is_empty() {
        let l = [1u32, 1, 2, 2, 3];
        assert!(epoch_batches(&Sampler::Pk { p: 4, k: 2 }, &l, 0, false, 0, 0).is_empty());
        assert!(epoch_batches(&Sampler::Pk { p: 0, k: 2 }, &l, 0, false, 0, 0).is_empty());
        assert!(epoch_batches(&Sampler::Pk { p: 2, k: 0 }, &l, 0, false, 0, 0).is_empty());
        // Exactly p labels: every batch holds all of them.
        check_pk(
            &epoch_batches(&Sampler::Pk { p: 3, k: 2 }, &l, 0, false, 0, 0),
            &l,
            3,
            2,
        );
    }

    /// One dominant label: the packing spreads it over batches instead of leaving its groups
    /// for the end, and the epoch needs no more batches than the big label has groups.
    #[test]
    fn dominant_label_is_spread() {
        let mut l: Vec<u32> = vec![0; 40];
        l.extend(1..=30);
        let batches = epoch_batches(&Sampler::Pk { p: 4, k: 2 }, &l, 0, false, 5, 0);
        check_pk(&batches, &l, 4, 2);
        // 20 groups of label 0, 30 singleton groups: 50 groups fill 12.5 batches, but label 0
        // needs a batch per group.
        assert_eq!(batches.len(), 20);
        assert!(batches.iter().all(|b| b.iter().any(|&i| l[i] == 0)));
        let seen: BTreeSet<usize> = batches.iter().flatten().copied().collect();
        assert_eq!(seen.len(), l.len());
    }
}
