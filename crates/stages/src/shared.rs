//! Key groups that more than one stage kind takes, parsed one way (no stage imports another).

use answer::local::GeoOptions;
use engine::config::Keys;

/// The keys `geometric`, `geometric_weight`, `geometric_side` and `geometric_min_inliers`
/// (evaluate and submit).
pub(crate) fn geo_options(k: &mut Keys) -> GeoOptions {
    GeoOptions {
        k: k.int("geometric", 0, 1000).unwrap_or(0) as usize,
        weight: k.float("geometric_weight", 0.0, 100.0).unwrap_or(0.3) as f32,
        side: k.int("geometric_side", 32, 2048).unwrap_or(384) as u32,
        min_inliers: k.int("geometric_min_inliers", 3, 10_000).unwrap_or(answer::local::MIN_INLIERS as i64) as usize,
    }
}
