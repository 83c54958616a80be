//! What α-query expansion buys on an existing lake's embeddings, through the same code as the
//! `evaluate` stage (no retraining, no pipeline run):
//!
//!     cargo bench --profile dev --bench rerank -- --lake file://$PWD/data/right-whales-lake [--embeddings embeddings] [--splits train]
//!
//! Prints P@1 and mAP@20 of each query set without re-ranking and with αQE for k in 1, 3, 5,
//! 10 and α in 1, 3.

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
    for qe in settings {
        let t = std::time::Instant::now();
        for (q, g, m, _, r) in evaluate(&set, &splits, qe) {
            if qe.is_some() && r == "none" {
                continue;
            }
            println!("{:<22} {:<28} {:>7} {:>8.4} {:>8.4}", format!("{q}/{g}"), r, m.queries, m.precision_at_1, m.map_at_20);
        }
        eprintln!("  ({:.1} s)", t.elapsed().as_secs_f64());
    }
}
