//! Stage kinds, one file each: its options (parsed from the pipeline file), its static checks
//! and its run. This file is the dispatch between them and the engine.

pub mod detect;
pub mod embed;
pub mod ensemble;
pub mod evaluate;
pub mod index;
pub mod ingest;
pub mod pseudo_label;
pub mod report;
pub mod sql;
pub mod submit;
pub mod train;

use std::collections::{BTreeMap, HashMap};

use arrow::datatypes::SchemaRef;

use crate::config::{Context, Keys, Loc, Reporter};
use crate::dag::StageCtx;
use crate::Result;

/// The kinds a `[stages.NAME]` table may have.
pub const KINDS: &[&str] = &["ingest", "sql", "detect", "train", "embed", "ensemble", "evaluate", "pseudo_label", "index", "submit", "report"];

/// Keys every stage has, whatever its kind.
pub const COMMON_KEYS: &[&str] = &["kind", "inputs"];

/// Reports every key of a stage table that is neither common nor one of the kind's `own`.
pub(crate) fn finish_keys(k: &mut Keys, own: &[&str]) {
    let all: Vec<&str> = COMMON_KEYS.iter().chain(own).copied().collect();
    k.finish(&all);
}

#[derive(Debug, Clone)]
pub enum StageKind {
    Ingest(ingest::IngestConfig),
    Sql(sql::SqlConfig),
    Detect(detect::DetectStage),
    Train(Box<train::TrainStage>),
    Embed(embed::EmbedStage),
    Evaluate(evaluate::EvaluateStage),
    Ensemble(ensemble::EnsembleStage),
    PseudoLabel(pseudo_label::PseudoLabelStage),
    Index(index::IndexStage),
    Submit(submit::SubmitStage),
    Report(report::ReportStage),
}

impl StageKind {
    pub fn name(&self) -> &'static str {
        match self {
            StageKind::Ingest(_) => "ingest",
            StageKind::Sql(_) => "sql",
            StageKind::Detect(_) => "detect",
            StageKind::Train(_) => "train",
            StageKind::Embed(_) => "embed",
            StageKind::Evaluate(_) => "evaluate",
            StageKind::Ensemble(_) => "ensemble",
            StageKind::PseudoLabel(_) => "pseudo_label",
            StageKind::Index(_) => "index",
            StageKind::Submit(_) => "submit",
            StageKind::Report(_) => "report",
        }
    }

    /// Tables the stage writes.
    pub fn writes(&self, stage: &str) -> Vec<String> {
        match self {
            StageKind::Ingest(_) => vec!["images".into(), "rejects".into()],
            StageKind::Sql(c) => vec![c.output.clone().unwrap_or_else(|| stage.to_string())],
            StageKind::Detect(c) => vec![c.output.clone()],
            StageKind::Train(c) => vec![c.output(stage)],
            StageKind::Embed(c) => vec![c.output.clone()],
            StageKind::Evaluate(c) => vec![c.output(stage)],
            StageKind::Ensemble(c) => vec![c.output.clone()],
            StageKind::PseudoLabel(c) => vec![c.output.clone()],
            // The index lives inside the embeddings table, which the embed stage owns.
            StageKind::Index(_) => Vec::new(),
            StageKind::Submit(c) => vec![c.output.clone()],
            StageKind::Report(_) => Vec::new(),
        }
    }

    /// A one-line description for `pipeline graph`.
    pub fn describe(&self) -> String {
        match self {
            StageKind::Ingest(c) => format!("ingest {}", c.source),
            StageKind::Sql(c) => format!("sql {}", c.query_file),
            StageKind::Detect(c) => format!("detect {} on {}, boxes {}", c.spec.backbone, c.table, c.boxes),
            StageKind::Train(c) => format!(
                "train {} {}² on {}, {} epochs",
                c.config.net.backbone, c.config.net.input_size, c.table, c.config.epochs
            ),
            StageKind::Embed(c) => format!("embed {} with {}", c.table, c.model),
            StageKind::Evaluate(c) => format!("evaluate {}", c.embeddings),
            StageKind::Ensemble(c) => format!("ensemble {}", c.members.join(" + ")),
            StageKind::PseudoLabel(c) => format!("pseudo_label {} at {}", c.embeddings, c.threshold),
            StageKind::Index(c) => format!("index {} ({})", c.table, c.index),
            StageKind::Submit(c) => format!("submit top-{} for {} photos", c.k, c.queries),
            StageKind::Report(c) => format!("report {}", c.out),
        }
    }

    /// Work done before the up-to-date check, whose result the run reuses: ingest lists its
    /// source here and fingerprints the listing.
    pub async fn prepare(&self, ctx: &StageCtx) -> Result<Prepared> {
        match self {
            StageKind::Ingest(c) => c.prepare(ctx).await,
            StageKind::Detect(c) => c.prepare(ctx).await,
            _ => Ok(Prepared::default()),
        }
    }

    pub async fn run(&self, ctx: &StageCtx, prepared: Prepared) -> Result<Outcome> {
        match self {
            StageKind::Ingest(c) => c.run(ctx, prepared).await,
            StageKind::Sql(c) => c.run(ctx).await,
            StageKind::Detect(c) => c.run(ctx, prepared).await,
            StageKind::Train(c) => c.run(ctx).await,
            StageKind::Embed(c) => c.run(ctx).await,
            StageKind::Evaluate(c) => c.run(ctx).await,
            StageKind::Ensemble(c) => c.run(ctx).await,
            StageKind::PseudoLabel(c) => c.run(ctx).await,
            StageKind::Index(c) => c.run(ctx).await,
            StageKind::Submit(c) => c.run(ctx).await,
            StageKind::Report(c) => c.run(ctx).await,
        }
    }
}

/// What `prepare` found.
#[derive(Default)]
pub struct Prepared {
    /// Identity of what the stage reads from outside the lake (None: it reads only tables).
    pub fingerprint: Option<String>,
    pub ingest: Option<ingest::Listing>,
    /// The detect stage's boxes file, read once.
    pub boxes: Option<bytes::Bytes>,
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
        "detect" => detect::DetectStage::parse(k, ctx).map(StageKind::Detect),
        "train" => train::TrainStage::parse(k, ctx).map(|t| StageKind::Train(Box::new(t))),
        "embed" => embed::EmbedStage::parse(k).map(StageKind::Embed),
        "evaluate" => evaluate::EvaluateStage::parse(k).map(StageKind::Evaluate),
        "ensemble" => ensemble::EnsembleStage::parse(k).map(StageKind::Ensemble),
        "pseudo_label" => pseudo_label::PseudoLabelStage::parse(k).map(StageKind::PseudoLabel),
        "index" => index::IndexStage::parse(k).map(StageKind::Index),
        "submit" => submit::SubmitStage::parse(k, ctx).map(StageKind::Submit),
        "report" => report::ReportStage::parse(k, ctx).map(StageKind::Report),
        other => {
            let stage = k.stage().map(str::to_string);
            k.reporter().error(at, stage.as_deref(), format!("unknown kind `{other}` (known kinds: {})", KINDS.join(", ")));
            k.ignore_rest();
            None
        }
    }
}

/// What a stage's static check can see: the tables its ancestors write.
pub struct Inputs<'a> {
    pub stage: &'a str,
    pub at: &'a Loc,
    pub visible: &'a HashMap<String, SchemaRef>,
    /// An input did not compile: a table it would have written is not reported missing.
    pub broken: bool,
}

impl Inputs<'_> {
    /// `table` must be written by an ancestor, with `columns`; it is added to `reads` when it
    /// is. Each problem is reported, naming the table and the column.
    pub fn need(&self, rep: &mut Reporter, reads: &mut Vec<String>, table: &str, columns: &[&str]) -> bool {
        match self.visible.get(table) {
            Some(schema) => {
                let missing: Vec<&&str> = columns.iter().filter(|c| schema.field_with_name(c).is_err()).collect();
                for c in &missing {
                    rep.error(self.at, Some(self.stage), format!("table `{table}` has no column `{c}` (needed: {})", columns.join(", ")));
                }
                if !reads.iter().any(|r| r == table) {
                    reads.push(table.to_string());
                }
                missing.is_empty()
            }
            None => {
                if !self.broken {
                    let mut known: Vec<&str> = self.visible.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    rep.error(
                        self.at,
                        Some(self.stage),
                        format!("reads table `{table}`, which none of its inputs writes (they write: {})", known.join(", ")),
                    );
                }
                false
            }
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
        StageKind::Detect(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Train(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Embed(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Evaluate(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Ensemble(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::PseudoLabel(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Index(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Submit(c) => c.check(stage, at, visible, broken_inputs, rep),
        StageKind::Report(c) => c.check(stage, at, visible, broken_inputs, rep),
    }
}
