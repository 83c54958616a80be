//! Stage kinds, one file each: its options (parsed from the pipeline file), its static checks
//! and its run. This file is the dispatch between them and the engine.

pub mod ingest;
pub mod sql;

use std::collections::{BTreeMap, HashMap};

use arrow::datatypes::SchemaRef;

use crate::config::{Context, Keys, Loc, Reporter};
use crate::dag::StageCtx;
use crate::Result;

/// The kinds a `[stages.NAME]` table may have.
pub const KINDS: &[&str] = &["ingest", "sql"];

/// Keys every stage has, whatever its kind.
pub const COMMON_KEYS: &[&str] = &["kind", "inputs"];

#[derive(Debug, Clone)]
pub enum StageKind {
    Ingest(ingest::IngestConfig),
    Sql(sql::SqlConfig),
}

impl StageKind {
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::Ingest(_) => "ingest",
            StageKind::Sql(_) => "sql",
        }
    }

    /// Tables the stage writes.
    pub fn writes(&self, stage: &str) -> Vec<String> {
        match self {
            StageKind::Ingest(_) => vec!["images".into(), "rejects".into()],
            StageKind::Sql(c) => vec![c.output.clone().unwrap_or_else(|| stage.to_string())],
        }
    }

    /// A one-line description for `pipeline graph`.
    pub fn describe(&self) -> String {
        match self {
            StageKind::Ingest(c) => format!("ingest {}", c.source),
            StageKind::Sql(c) => format!("sql {}", c.query_file),
        }
    }

    /// Work done before the up-to-date check, whose result the run reuses: ingest lists its
    /// source here and fingerprints the listing.
    pub async fn prepare(&self, ctx: &StageCtx) -> Result<Prepared> {
        match self {
            StageKind::Ingest(c) => c.prepare(ctx).await,
            StageKind::Sql(_) => Ok(Prepared::default()),
        }
    }

    pub async fn run(&self, ctx: &StageCtx, prepared: Prepared) -> Result<Outcome> {
        match self {
            StageKind::Ingest(c) => c.run(ctx, prepared).await,
            StageKind::Sql(c) => c.run(ctx).await,
        }
    }
}

/// What `prepare` found.
#[derive(Default)]
pub struct Prepared {
    /// Identity of what the stage reads from outside the lake (None: it reads only tables).
    pub fingerprint: Option<String>,
    pub ingest: Option<ingest::Listing>,
}

/// What a stage run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub rows_in: u64,
    pub rows_out: u64,
    /// Table → version after this run.
    pub written: BTreeMap<String, u64>,
    /// A short human summary ("212 new photos, 6 rejected").
    pub summary: String,
}

/// Parses the options of a stage of kind `kind`.
pub fn parse_kind(kind: &str, at: &Loc, k: &mut Keys, ctx: &Context) -> Option<StageKind> {
    match kind {
        "ingest" => ingest::IngestConfig::parse(k, ctx).map(StageKind::Ingest),
        "sql" => sql::SqlConfig::parse(k, ctx).map(StageKind::Sql),
        other => {
            let stage = k.stage().map(str::to_string);
            k.reporter().error(at, stage.as_deref(), format!("unknown kind `{other}` (known kinds: {})", KINDS.join(", ")));
            k.ignore_rest();
            None
        }
    }
}

/// What the static check of a stage learned.
#[derive(Debug, Default)]
pub struct Checked {
    pub reads: Vec<String>,
    pub writes: Vec<(String, SchemaRef)>,
    /// Contents of files the options name (SQL text), so editing them re-runs the stage.
    pub hash_extra: String,
}

/// Checks a compiled stage against what its ancestors write (`visible` tables), without running
/// anything. `broken_inputs` says an input did not compile, so errors that would only echo that
/// are not reported.
pub async fn check(
    kind: &StageKind,
    stage: &str,
    at: &Loc,
    visible: &HashMap<String, SchemaRef>,
    broken_inputs: bool,
    ctx: &Context,
    rep: &mut Reporter,
) -> Checked {
    match kind {
        StageKind::Ingest(_) => Checked {
            reads: Vec::new(),
            writes: ["images", "rejects"].iter().map(|t| (t.to_string(), crate::lake::Catalog::builtin(t))).collect(),
            hash_extra: String::new(),
        },
        StageKind::Sql(c) => c.check(stage, at, visible, broken_inputs, ctx, rep).await,
    }
}
