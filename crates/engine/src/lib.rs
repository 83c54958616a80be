//! The engine: pipeline files become plans, plans run.
//!
//! - [`config`]: a pipeline file (TOML) is parsed with spans, every error is collected with its
//!   `file:line` and stage, and the stages compile, through the kinds of a
//!   [`stage::Registry`], into a [`config::Plan`]: stages in topological order, each with its
//!   options, the tables it reads and writes and a hash of everything it depends on.
//! - [`stage`]: the [`stage::Stage`] trait every kind implements, and the registry.
//! - [`dag`]: the executor. One tokio task per stage, a stage starts when the tables it reads
//!   are committed, its batches flow over a bounded channel into one atomic Lance commit, the
//!   `runs` ledger records what each stage read and wrote, and a stage whose config and inputs
//!   are unchanged since its last success is skipped as up to date.
//! - [`shard`]: map stages as shards that stage their writes and one commit that lands them
//!   (`pipeline worker`, `pipeline commit`), and Ray as the executor that runs the shards.
//! - [`progress`]: progress bars on a terminal, quiet elsewhere.
//!
//! The engine knows no stage kind by name; it depends on `lake` alone.

pub mod config;
pub mod dag;
pub mod progress;
pub mod shard;
pub mod stage;

pub use dag::StageCtx;
pub use lake::{Error, Result};
