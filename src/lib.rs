//! `pipeline`: a streaming dataflow pipeline over an image lake, for visual similarity and
//! re-identification of individual animals (whale flukes first).
//!
//! Module map, in the order data flows:
//!
//! - [`config`]: a pipeline file (TOML) is parsed with spans, every error is collected with its
//!   `file:line` and stage, and the result compiles into a [`config::Plan`]: stages in
//!   topological order, each with its typed options and a hash of everything it depends on.
//! - [`dag`]: the executor. One tokio task per stage, a stage starts when the tables it reads
//!   are committed, its batches flow over a bounded channel into one atomic Lance commit, the
//!   `runs` ledger records what each stage read and wrote, and a stage whose config and inputs
//!   are unchanged since its last success is skipped as up to date.
//! - [`lake`]: the lake root (file://, s3://, gs://, az://), its Lance tables, their declared
//!   schemas (`schemas/`), object-store access and the DataFusion session over every table.
//! - [`stages`]: one file per stage kind: `ingest`, `sql`, `train`, `embed`, `ensemble`,
//!   `evaluate`, `pseudo_label`, `index`, `submit`.
//! - [`model`]: libtorch models — backbones with torchvision names, GeM neck, ArcFace-family
//!   losses, samplers, tensor augmentation, a saveable Adam/AdamW, schedules, the photo loader,
//!   the training loop, TensorBoard events, retrieval metrics.
//! - [`vector`]: nearest-neighbour search over an embeddings table (Lance vector index).
//! - [`report`]: the static HTML report (`pipeline report`).
//! - [`answer`]: neighbours of one photo (`pipeline similar`), the report's data, the model
//!   worker shared by the HTTP API (`pipeline serve`, [`serve`]).
//! - [`serve`]: the HTTP JSON API.
//! - [`vision`]: image decoding (DCT-scaled JPEG, PNG, TIFF, EXIF orientation), quality metrics,
//!   perceptual hash.
//! - [`demo`]: the synthetic survey generator behind `pipeline demo-lake`.
//! - [`query`]: read-only SQL over the lake (`pipeline query`).
//! - [`error`]: the library's one error type.

pub mod answer;
pub mod config;
pub mod dag;
pub mod demo;
pub mod error;
pub mod lake;
pub mod model;
pub mod progress;
pub mod query;
pub mod report;
pub mod serve;
pub mod stages;
pub mod vector;
pub mod vision;

pub use error::{Error, Result};
