//! `pipeline`: a streaming dataflow pipeline over an image lake, for visual similarity and
//! re-identification of individual animals (whale flukes first).
//!
//! This crate is the binary (`src/main.rs`: the commands, exit codes) and the HTTP API
//! ([`serve`]); everything else lives in the workspace's crates, whose graph is the
//! architecture (see the README's Layout):
//!
//! - [`vision`]: decoding, quality metrics, hashes (no lance, no tch).
//! - [`demo`]: the demo-lake generator.
//! - [`lake`]: Lance tables, schemas, object stores, DataFusion, typed readers, the model
//!   registry, vector search and its kernels, retrieval metrics, read-only SQL.
//! - [`model`]: libtorch models, losses, the training loop, the detector.
//! - [`engine`]: config → plan, the `Stage` trait and registry, the executor, the ledger.
//! - [`answer`]: similar photos of one photo, the serving model worker, the HTML report.
//! - [`stages`]: one file per stage kind, and the registry of them.
//!
//! The modules below re-export those crates under the paths the binary, the tests and the
//! benchmarks use.

pub use ::answer;
pub use ::demo;
pub use ::engine;
pub use ::lake;
pub use ::model;
pub use ::stages;
pub use ::vision;
pub use answer::report;
pub use engine::{config, dag, progress, stage};
pub use lake::{metrics, query, tables, vector};
pub use lake::{Error, Result};

pub mod digest;
pub mod schedule;
pub mod serve;

use std::path::Path;

/// Reads and compiles a pipeline file with every built-in stage kind ([`stages::registry`]).
pub async fn load(path: &Path, sets: &[String]) -> Result<config::Plan> {
    config::load(path, sets, &stages::registry()).await
}
