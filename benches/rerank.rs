//! What α-query expansion buys on an existing lake's embeddings, through the same code as the
//! `evaluate` stage (no retraining, no pipeline run):
//!
//!     cargo bench --profile dev --bench rerank -- --lake file://$PWD/data/right-whales-lake [--embeddings embeddings] [--splits train] [--geometric 20] [--side 384]
//!
//! Prints P@1 and mAP@20 of each query set without re-ranking and with αQE for k in 1, 3, 5,
//! 10 and α in 1, 3. With `--geometric K`: the local features of every photo (as `evaluate`
//! reads them), the verified inliers of each held-out query's first K candidates split by
//! whether the candidate is the same individual, and the metrics re-ranked geometrically for a
//! sweep of weights and inlier thresholds (each pair verified once).

use pipeline::answer::local::{GeoOptions, local_features, model_crops};
use pipeline::lake::metrics::retrieval_metrics_reranked;
use pipeline::lake::{Catalog, Lake};
use pipeline::stages::evaluate::evaluate;
use pipeline::tables::{read_embeddings, read_splits};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let lake_uri = arg(&args, "--lake", "");
    if lake_uri.is_empty() {
        eprintln!("usage: cargo bench --bench rerank -- --lake URI [--embeddings TABLE] [--splits TABLE]");
        std::process::exit(2);
    }
    let lake = Lake::new(lake_uri.clone(), Default::default(), Catalog::load(None).expect("schemas"));
    let set = read_embeddings(&lake, &arg(&args, "--embeddings", "embeddings")).await.expect("embeddings");
    let splits = read_splits(&lake, &arg(&args, "--splits", "train")).await.expect("splits");
    println!("{lake_uri}: {} embeddings of {}, {}-d", set.len(), set.model_id, set.dim);
    println!("{:<22} {:<28} {:>7} {:>8} {:>8}", "queries/gallery", "re-ranking", "queries", "P@1", "mAP@20");
    let mut settings: Vec<Option<(usize, f32)>> = vec![None];
    for k in [1, 3, 5, 10] {
        for a in [1.0, 3.0] {
            settings.push(Some((k, a)));
        }
    }
    let geo_k: usize = arg(&args, "--geometric", "0").parse().expect("--geometric K");
    if geo_k > 0 {
        geometric(&lake, &set, &splits, geo_k, arg(&args, "--side", "384").parse().expect("--side N")).await;
        return;
    }
    for qe in settings {
        let t = std::time::Instant::now();
        for (q, g, m, _, r) in evaluate(&set, &splits, qe, None) {
            if qe.is_some() && r == "none" {
                continue;
            }
            println!("{:<22} {:<28} {:>7} {:>8.4} {:>8.4}", format!("{q}/{g}"), r, m.queries, m.precision_at_1, m.map_at_20);
        }
        eprintln!("  ({:.1} s)", t.elapsed().as_secs_f64());
    }
}

async fn geometric(lake: &Lake, set: &pipeline::tables::EmbeddingSet, splits: &std::collections::HashMap<String, String>, k: usize, side: u32) {
    let crops = model_crops(lake, &set.model_id).await.expect("crops");
    let base = GeoOptions { k, side, ..Default::default() };
    let f = local_features(lake, &set.photo_ids, &set.uris, &crops, base).await.expect("local features");
    let kp: Vec<usize> = f.rows.iter().flatten().map(|r| r.keypoints.len()).collect();
    println!(
        "local features of {} photos ({} cropped) at {side}²: {:.1} s, keypoints median {}, {} unreadable",
        kp.len(),
        crops.len(),
        f.seconds,
        { let mut v = kp.clone(); v.sort(); v.get(v.len() / 2).copied().unwrap_or(0) },
        f.unreadable
    );
    let rows: Vec<usize> = (0..set.len()).filter(|&i| set.labels[i].is_some() && splits.get(&set.uris[i]).is_some_and(|s| s == "val_unseen")).collect();
    let dim = set.dim;
    let emb: Vec<f32> = rows.iter().flat_map(|&i| set.row(i).to_vec()).collect();
    let labels: Vec<String> = rows.iter().map(|&i| set.labels[i].clone().unwrap_or_default()).collect();
    let ids: Vec<String> = rows.iter().map(|&i| set.uris[i].clone()).collect();
    // Inliers of each query's first k candidates, same individual or not.
    let t = std::time::Instant::now();
    let (mut same, mut other) = (Vec::new(), Vec::new());
    let gallery = pipeline::lake::metrics::UnitRows::new(&emb, dim);
    for (qi, &q) in rows.iter().enumerate() {
        let sims = gallery.similarities(set.row(q));
        let mut order: Vec<usize> = (0..rows.len()).filter(|&g| g != qi).collect();
        order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]));
        for &g in order.iter().take(k) {
            let n = f.inliers(q, rows[g]);
            if labels[g] == labels[qi] { same.push(n) } else { other.push(n) }
        }
    }
    let pct = |v: &mut Vec<usize>, p: f64| { v.sort(); v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0) };
    let share = |v: &[usize], t: usize| v.iter().filter(|&&x| x >= t).count() as f64 / v.len().max(1) as f64;
    println!("val_unseen/queries, first {k} candidates verified in {:.1} s:", t.elapsed().as_secs_f64());
    for (name, v) in [("same individual", &mut same), ("other individuals", &mut other)] {
        println!(
            "  {name:<18} {:>6} pairs, inliers p10/p50/p90/p99 {}/{}/{}/{}, >=8: {:.3}, >=12: {:.3}, >=16: {:.3}, >=24: {:.3}",
            v.len(), pct(v, 0.1), pct(v, 0.5), pct(v, 0.9), pct(v, 0.99), share(v, 8), share(v, 12), share(v, 16), share(v, 24)
        );
    }
    let plain = pipeline::lake::metrics::retrieval_metrics(&emb, &labels, &ids, &emb, &labels, &ids, dim, &[5, 10, 20]);
    println!("{:<36} P@1 {:.4} mAP@20 {:.4}", "none", plain.precision_at_1, plain.map_at_20);
    for min_inliers in [8, 12, 16, 24, 32] {
        for weight in [0.05, 0.1, 0.3, 1.0] {
            let o = GeoOptions { min_inliers, weight, ..base };
            let rescore = |qi: usize, c: &[(usize, f32)]| {
                let mapped: Vec<(usize, f32)> = c.iter().map(|&(g, s)| (rows[g], s)).collect();
                f.rescore_with(rows[qi], &mapped, &o)
            };
            let m = retrieval_metrics_reranked(&emb, &labels, &ids, &emb, &labels, &ids, dim, &[5, 10, 20], Some((k, &rescore)));
            println!("{:<36} P@1 {:.4} mAP@20 {:.4}", o.label(), m.precision_at_1, m.map_at_20);
        }
    }
}
