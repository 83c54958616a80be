//! The one interface between the engine and the stage kinds.
//!
//! A kind is a type implementing [`Stage`] plus one line in a [`Registry`] (see the `stages`
//! crate): its name and the function that parses its keys. The engine, the config compiler
//! and `pipeline graph` only ever see `dyn Stage`; none of them names a kind.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use futures::future::BoxFuture;

use crate::config::{Context, Keys, Loc, Reporter};
use crate::dag::StageCtx;
use crate::Result;

/// Keys every stage has, whatever its kind.
pub const COMMON_KEYS: &[&str] = &["kind", "inputs", "stream"];

/// Reports every key of a stage table that is neither common nor one of the kind's `own`.
pub fn finish_keys(k: &mut Keys, own: &[&str]) {
    let all: Vec<&str> = COMMON_KEYS.iter().chain(own).copied().collect();
    k.finish(&all);
}

/// A stage kind's compiled options and behaviour.
pub trait Stage: Any + fmt::Debug + Send + Sync {
    /// A one-line description for `pipeline graph`.
    fn describe(&self) -> String;

    /// Checks the options against what the stage's ancestors write, without running anything,
    /// and declares the tables the stage reads and writes (with their schemas): the one place
    /// where what a stage writes is said.
    fn check<'a>(&'a self, inputs: Inputs<'a>, ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked>;

    /// The version of the kind's meaning, part of every stage's config hash. Bump it when a
    /// default or what an option means changes: existing lakes then re-run stages of the kind.
    /// (Adding a key whose default keeps the behaviour needs no bump: the hash is of the
    /// options as written.)
    fn version(&self) -> u32 {
        1
    }

    /// Whether the stage can read `table` as its producer writes it ([`crate::StageCtx::read`])
    /// rather than once committed: true for a kind that maps rows, one batch at a time. A kind
    /// that streams two tables must read them concurrently (each one's producer waits for it).
    fn streams(&self, _table: &str) -> bool {
        false
    }

    /// Whether the stage can run as shards (`pipeline worker --shard K/N`, `pipeline run
    /// --executor ray`): a kind that maps photos one at a time, does a photo's work and touches
    /// its rows only when [`StageCtx::owns`] says so, writes through [`StageCtx::sink`] and
    /// changes rows already there through [`StageCtx::delete_where`] and
    /// [`StageCtx::update_where`]. Kinds that need the whole table (train, index, submit) run on
    /// the driver.
    fn shards(&self) -> bool {
        false
    }

    /// Whether a shard of this stage needs a GPU (the Ray task then asks for one): true for a
    /// model stage whose device, with the run's `--device` over its own, resolves to CUDA.
    fn wants_gpu(&self, _run_device: Option<crate::config::Device>) -> bool {
        false
    }

    /// Work a sharded run does once, on the driver, before its shards start: what every shard
    /// needs and none may make alone (detect trains its detector here, so that each shard
    /// loads the same one).
    fn before_shards<'a>(&'a self, _ctx: &'a StageCtx) -> BoxFuture<'a, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    /// Work done before the up-to-date check, whose result the run reuses (ingest lists its
    /// source here and fingerprints the listing).
    fn prepare<'a>(&'a self, _ctx: &'a StageCtx) -> BoxFuture<'a, Result<Prepared>> {
        Box::pin(async { Ok(Prepared::default()) })
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, prepared: Prepared) -> BoxFuture<'a, Result<Outcome>>;
}

/// Parses the keys of one `[stages.NAME]` table of a kind; every problem goes to the keys'
/// reporter and makes it return `None`.
pub type ParseFn = fn(&mut Keys, &Context) -> Option<Arc<dyn Stage>>;

/// The stage kinds a pipeline file may use.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: Vec<(&'static str, ParseFn)>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a kind. A name registered twice is a programming error.
    pub fn kind(mut self, name: &'static str, parse: ParseFn) -> Registry {
        assert!(self.parser(name).is_none(), "stage kind `{name}` registered twice");
        self.kinds.push((name, parse));
        self
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.0).collect()
    }

    pub fn parser(&self, name: &str) -> Option<ParseFn> {
        self.kinds.iter().find(|k| k.0 == name).map(|k| k.1)
    }

    /// Parses the options of a stage of kind `kind`.
    pub fn parse(&self, kind: &str, at: &Loc, k: &mut Keys, ctx: &Context) -> Option<Arc<dyn Stage>> {
        match self.parser(kind) {
            Some(parse) => parse(k, ctx),
            None => {
                let stage = k.stage().map(str::to_string);
                k.reporter().error(at, stage.as_deref(), format!("unknown kind `{kind}` (known kinds: {})", self.names().join(", ")));
                k.ignore_rest();
                None
            }
        }
    }
}

/// Wraps a parsed kind for the registry: `|k, cx| MyStage::parse(k, cx).map(stage)`.
pub fn stage<S: Stage>(s: S) -> Arc<dyn Stage> {
    Arc::new(s)
}

/// What `prepare` found.
#[derive(Default)]
pub struct Prepared {
    /// Identity of what the stage reads from outside the lake (None: it reads only tables).
    pub fingerprint: Option<String>,
    /// What the kind keeps from `prepare` for `run` (its own type).
    pub state: Option<Box<dyn Any + Send + Sync>>,
}

impl Prepared {
    /// The state `prepare` left, if it is a `T`.
    pub fn take<T: Any>(&mut self) -> Option<T> {
        let state = self.state.take()?;
        match state.downcast::<T>() {
            Ok(t) => Some(*t),
            Err(other) => {
                self.state = Some(other);
                None
            }
        }
    }
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
    /// Photos new, changed, deleted and rejected this run, for stages that count them (the
    /// ledger's `photos_*` columns, `pipeline runs`).
    pub changes: Changes,
}

/// What a run did to a stage's photos; None where the stage does not count that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Changes {
    pub new: Option<u64>,
    pub changed: Option<u64>,
    pub deleted: Option<u64>,
    pub rejected: Option<u64>,
}

/// What a stage's static check can see: the tables its ancestors write.
#[derive(Clone, Copy)]
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
    /// Names of the models it makes (`<name>-<hash>` ids in `<lake>/models/` and the `models`
    /// registry): like a table, a name has one stage that makes it.
    pub models: Vec<String>,
}
