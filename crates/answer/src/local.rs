//! Geometric re-ranking: the first candidates of a query re-scored by matching local features
//! (SIFT-like keypoints and descriptors, the `geometric` crate) and verifying that the matches
//! agree on one affine transform (RANSAC). Patterned animals — callosities, fluke trailing
//! edges, stripes, spots — are what it was invented for, and it needs no training: a pair of
//! photos of one individual shares dozens of consistent keypoints, two individuals share few.
//!
//! Each photo is read as the embedding model reads it (its detector's box grown by the model's
//! margin when the model crops), at `side`² pixels, once per run; a photo that cannot be read
//! has no features and its pairs keep their similarity, so nothing is lost to a bad file.
//!
//! The fused score is `similarity + weight · min(inliers, SATURATE) / SATURATE` when at least
//! `min_inliers` matches survive the verification (RANSAC's inliers), else the similarity alone;
//! among verified pairs more inliers rank higher. On the right whales (benches/rerank.rs, see
//! the README) no pair of two individuals among 25,420 reached 8 inliers while 47 % of the
//! pairs of one individual did, so a verified pair is nearly always a true one; the weight (0.3)
//! only decides how far it moves. On the demo lake's smooth rendered patterns 2 % of the pairs
//! of two individuals reach 8, and a weight of 1 there let them jump ahead of true matches.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use geometric::{Features, Params};
use lake::{Error, Lake, Result};
use model::data::Loader;

/// Inliers at which the geometric bonus stops growing.
pub const SATURATE: usize = 40;
/// Inliers a pair needs before it gets a bonus (see the README's figures).
pub const MIN_INLIERS: usize = 8;

/// How the re-ranking is asked for (`geometric`, `geometric_weight`, `geometric_side` in a
/// pipeline file; the same on the command line and in the API).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoOptions {
    /// Candidates re-scored per query (0: off).
    pub k: usize,
    /// Weight of the verified inliers against the embedding similarity.
    pub weight: f32,
    /// Side of the square the photo (or its crop) is read at.
    pub side: u32,
    /// Inliers a pair needs for its bonus.
    pub min_inliers: usize,
}

impl Default for GeoOptions {
    fn default() -> GeoOptions {
        GeoOptions { k: 0, weight: 0.3, side: 384, min_inliers: MIN_INLIERS }
    }
}

impl GeoOptions {
    /// The first `k` candidates re-ranked with the default weight, side and inliers.
    pub fn first(k: usize) -> GeoOptions {
        GeoOptions { k, ..GeoOptions::default() }
    }

    /// The `rerank` label of an evaluation re-ranked this way.
    pub fn label(&self) -> String {
        format!("geometric k={} w={} min={} side={}", self.k, self.weight, self.min_inliers, self.side)
    }
}

/// Local features of a set of photos, by row.
pub struct LocalFeatures {
    pub rows: Vec<Option<Features>>,
    pub params: Params,
    pub options: GeoOptions,
    /// Photos that could not be read (their rows are `None`), with the first reason.
    pub unreadable: usize,
    pub first_error: Option<String>,
    /// Photos read by their model's crop (the others whole).
    pub cropped: usize,
    pub seconds: f64,
    cache: std::sync::Mutex<HashMap<(u32, u32), u32>>,
}

impl LocalFeatures {
    /// Verified inliers of rows `q` and `g` (0 when either has no features); each pair is
    /// verified once and remembered.
    pub fn inliers(&self, q: usize, g: usize) -> usize {
        let key = (q as u32, g as u32);
        if let Some(&n) = self.cache.lock().expect("cache poisoned").get(&key) {
            return n as usize;
        }
        let n = match (&self.rows[q], &self.rows[g]) {
            (Some(a), Some(b)) => geometric::verify(a, b, &self.params).inliers,
            _ => 0,
        };
        self.cache.lock().expect("cache poisoned").insert(key, n as u32);
        n
    }

    /// Fused scores of `q` against each `(row, similarity)` candidate, with this set's options.
    pub fn rescore(&self, q: usize, candidates: &[(usize, f32)]) -> Vec<f32> {
        self.rescore_with(q, candidates, &self.options)
    }

    /// The same with other fusion options (the re-ranking benchmark's sweep).
    pub fn rescore_with(&self, q: usize, candidates: &[(usize, f32)], o: &GeoOptions) -> Vec<f32> {
        candidates.iter().map(|&(g, sim)| fuse(sim, self.inliers(q, g), o)).collect()
    }
}

/// See the module docs.
pub fn fuse(sim: f32, inliers: usize, o: &GeoOptions) -> f32 {
    if inliers < o.min_inliers.max(1) {
        sim
    } else {
        sim + o.weight * inliers.min(SATURATE) as f32 / SATURATE as f32
    }
}

/// `hits` (nearest first) with the first `o.k` reordered by their fused score ([`fuse`]) of
/// similarity (`sim(hit)`) and verified inliers (`inliers(hit)`, asked only of those k); a tie
/// keeps the embedding's order and the hits after k follow unchanged. Each hit itself is left
/// as it was (its embedding distance); the inliers of the re-scored ones come back beside them
/// (None past k).
pub fn rerank<T>(hits: Vec<T>, o: &GeoOptions, sim: impl Fn(&T) -> f32, inliers: impl Fn(&T) -> usize) -> Vec<(T, Option<usize>)> {
    let k = o.k.min(hits.len());
    let mut it = hits.into_iter();
    let mut head: Vec<(f32, T, usize)> = it
        .by_ref()
        .take(k)
        .map(|h| {
            let n = inliers(&h);
            (fuse(sim(&h), n, o), h, n)
        })
        .collect();
    head.sort_by(|a, b| b.0.total_cmp(&a.0));
    head.into_iter().map(|(_, h, n)| (h, Some(n))).chain(it.map(|h| (h, None))).collect()
}

/// The local features of one image already read as the model reads it (`side`² RGB8).
pub fn describe(rgb: &[u8], side: u32) -> Features {
    let g = grey(rgb, side as usize);
    geometric::extract(&geometric::Gray { width: side as usize, height: side as usize, pixels: &g }, &Params::default())
}

/// The crop of each photo (by photo id) as the model `model_id` reads it: its detector's box grown
/// by its margin; empty when the model reads whole photos or is not a trained model (an
/// ensemble's id).
pub async fn model_crops(lake: &Lake, model_id: &str) -> Result<HashMap<String, [f32; 4]>> {
    let Ok((id, dir)) = lake::models::resolve_model(lake, model_id).await else { return Ok(HashMap::new()) };
    let Ok((spec, _)) = model::train::model_files(&dir, &id) else { return Ok(HashMap::new()) };
    let Some(c) = &spec.crop else { return Ok(HashMap::new()) };
    let (_, boxes) = lake::tables::read_boxes(lake, &c.table, Some(&c.detector)).await?;
    Ok(boxes.into_iter().map(|(k, b)| (k, vision::expand_box(b, c.margin))).collect())
}

/// Grey pixels (0..1) of a `side`×`side` RGB8 image.
pub fn grey(rgb: &[u8], side: usize) -> Vec<f32> {
    geometric::luma_from_rgb8(side, side, rgb, side).2
}

/// Reads and describes every photo of `uris` (two at a time), each cropped by `crops` (by photo
/// id, [`model_crops`]) when its id in `photo_ids` has a box there.
pub async fn local_features(
    lake: &Lake,
    photo_ids: &[String],
    uris: &[String],
    crops: &HashMap<String, [f32; 4]>,
    options: GeoOptions,
) -> Result<LocalFeatures> {
    let started = std::time::Instant::now();
    let side = options.side.max(32);
    let loader = Arc::new(Loader::new(side, 2, 0, lake.options().clone()).in_lake(lake.root()));
    let params = Params::default();
    // Owned items: a stream borrowing `uris` would make the caller's future lifetime-generic.
    let items: Vec<(usize, String, Option<[f32; 4]>)> =
        uris.iter().zip(photo_ids).enumerate().map(|(i, (u, id))| (i, u.clone(), crops.get(id).copied())).collect();
    let cropped = items.iter().filter(|(_, _, c)| c.is_some()).count();
    let jobs = items.into_iter().map(move |(i, uri, crop)| {
        let loader = loader.clone();
        async move {
            let r = match loader.pixels(&uri, crop, None).await {
                Ok(px) => tokio::task::spawn_blocking(move || describe(&px, side))
                .await
                .map_err(|e| Error::Other(format!("local features of {uri}: {e}"))),
                Err(e) => Err(e),
            };
            (i, r)
        }
    });
    let mut rows: Vec<Option<Features>> = (0..uris.len()).map(|_| None).collect();
    let (mut unreadable, mut first_error) = (0, None);
    let mut stream = futures::stream::iter(jobs).buffer_unordered(2);
    while let Some((i, r)) = stream.next().await {
        match r {
            Ok(f) => rows[i] = Some(f),
            Err(e) => {
                unreadable += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Ok(LocalFeatures { rows, params, options, unreadable, first_error, cropped, seconds: started.elapsed().as_secs_f64(), cache: Default::default() })
}

#[cfg(test)]
mod rerank_tests {
    use super::*;
    use lake::vector::Hit;

    fn hit(id: &str, sim: f32) -> Hit {
        Hit { photo_id: id.into(), uri: format!("file:///p/{id}"), individual_id: None, distance: 1.0 - sim }
    }

    #[test]
    fn a_verified_candidate_moves_up_within_k_and_the_rest_keep_their_order() {
        let hits = vec![hit("a", 0.9), hit("b", 0.85), hit("c", 0.8), hit("d", 0.95)];
        let o = GeoOptions { k: 3, weight: 0.3, side: 384, min_inliers: 8 };
        let inl = |h: &Hit| match h.photo_id.as_str() {
            "c" => 40,
            "b" => 7, // under min_inliers: no bonus
            "d" => panic!("past k: never verified"),
            _ => 0,
        };
        let out = rerank(hits, &o, Hit::similarity, inl);
        let order: Vec<(&str, Option<usize>)> = out.iter().map(|(h, n)| (h.photo_id.as_str(), *n)).collect();
        assert_eq!(order, vec![("c", Some(40)), ("a", Some(0)), ("b", Some(7)), ("d", None)]);
        assert!((out[0].0.similarity() - 0.8).abs() < 1e-6, "the distance stays the embedding's");
        // k = 0: nothing verified, nothing moves.
        let off = rerank(vec![hit("a", 0.9), hit("b", 0.8)], &GeoOptions { k: 0, ..o }, Hit::similarity, |_| panic!("off"));
        assert_eq!(off.iter().map(|(h, _)| h.photo_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    }
}
