//! Pipeline files: parse → compile → [`Plan`].
//!
//! The TOML is read with spans into a small tree of [`Node`]s, `--set stage.key=value`
//! overrides are grafted onto it (remembering they came from the command line), and then every
//! stage is compiled by its kind (see [`crate::stages`]). Nothing stops at the first problem:
//! unknown keys and kinds, wrong types, missing inputs, cycles, missing SQL files, SQL that does
//! not plan against its input schemas — each becomes a [`Diagnostic`] with file, line and stage,
//! and `pipeline validate` prints them all.

mod graph;
mod keys;
mod tree;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use graph::topo_order;
pub use keys::Keys;
pub use tree::{Loc, Node, Val};

use lake::{Catalog, store};
use crate::stage::{Inputs, Registry, Stage};
use std::sync::Arc;
use crate::{Error, Result};

pub use lake::error::{Diagnostic, Diagnostics};

/// Collects diagnostics for one file; stage code reports through it.
#[derive(Debug)]
pub struct Reporter {
    file: String,
    diags: Vec<Diagnostic>,
}

impl Reporter {
    pub fn new(file: impl Into<String>) -> Reporter {
        Reporter { file: file.into(), diags: Vec::new() }
    }

    pub fn error(&mut self, at: &Loc, stage: Option<&str>, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            at: at.clone(),
            stage: stage.map(str::to_string),
            message: message.into(),
        });
    }

    pub fn count(&self) -> usize {
        self.diags.len()
    }

    fn finish(mut self) -> Diagnostics {
        self.diags.sort_by_key(|d| match d.at {
            Loc::File { line, col } => (0, line, col),
            Loc::Set(_) => (1, 0, 0),
            Loc::Unknown => (2, 0, 0),
        });
        Diagnostics(self.diags)
    }
}

lake::choice! { "device",
    /// Where model stages run (`device = ...` in a stage, `pipeline run --device`).
    #[derive(Default)]
    pub enum Device {
        /// CUDA when libtorch sees a GPU, else the CPU.
        #[default]
        Auto = "auto",
        Cpu = "cpu",
        /// CUDA, an error when libtorch sees no GPU.
        Cuda = "cuda",
    }
}

/// Paths and values a stage's options are resolved against.
#[derive(Debug, Clone)]
pub struct Context {
    /// Folder of the pipeline file: relative paths in it are relative to this.
    pub base_dir: PathBuf,
    pub catalog: Catalog,
    /// The lake was written relative to the pipeline file (`lake = "file://../data/lake"`):
    /// locations also written relative are recorded relative to the lake
    /// ([`lake::store::lake_relative`]), so the project folder can move.
    pub lake_relative: bool,
}

impl Context {
    /// A path written in the pipeline file, made absolute.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() { p.to_path_buf() } else { self.base_dir.join(p) }
    }

    pub fn location(&self, l: &str) -> Result<String> {
        store::resolve(l, &self.base_dir)
    }

    /// Whether objects under location `l` (as written) are recorded relative to the lake.
    pub fn recorded_relative(&self, l: &str) -> bool {
        self.lake_relative && store::is_relative(l)
    }
}

/// One compiled stage.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub name: String,
    /// The kind's name, as written in the file.
    pub kind_name: String,
    pub kind: Arc<dyn Stage>,
    /// Stages that must have committed before this one starts.
    pub inputs: Vec<String>,
    /// Tables this stage reads from the lake (known after compiling; ingest reads none).
    pub reads: Vec<String>,
    /// Tables this stage writes.
    pub writes: Vec<String>,
    /// Names of the models it makes ([`crate::stage::Checked::models`]).
    pub models: Vec<String>,
    /// Inputs it reads while they are written: `(input stage, its table)`.
    pub streamed: Vec<(String, String)>,
    /// Hash of the resolved options and the files they name: a change re-runs the stage.
    pub config_hash: String,
    pub at: Loc,
}

/// A compiled pipeline, stages in topological order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub file: PathBuf,
    pub hash: String,
    pub name: String,
    pub lake: String,
    pub storage_options: HashMap<String, String>,
    pub catalog: Catalog,
    pub stages: Vec<StagePlan>,
    /// `[pipeline] executor`: where map stages run (`local`, `ray`, `ray=HOST:PORT`);
    /// `pipeline run --executor` overrides it.
    pub executor: Option<String>,
    /// `[pipeline] shards`: shards per map stage on Ray.
    pub shards: Option<u32>,
}

impl Plan {
    pub fn stage(&self, name: &str) -> Option<&StagePlan> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// `name` and every stage it depends on, in run order.
    pub fn until(&self, name: &str) -> Option<Vec<&StagePlan>> {
        self.stage(name)?;
        let mut keep = std::collections::HashSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            if keep.insert(n.clone()) {
                todo.extend(self.stage(&n).into_iter().flat_map(|s| s.inputs.clone()));
            }
        }
        Some(self.stages.iter().filter(|s| keep.contains(&s.name)).collect())
    }
}

const PIPELINE_KEYS: &[&str] = &["name", "description", "lake", "schemas", "storage_options", "storage", "executor", "shards"];

/// `[pipeline.storage]`: how object stores (the photos' and the lake's) are talked to, as the
/// storage options object_store and Lance read: `retries` of a failed request (5xx, throttling,
/// a reset connection, a timeout) with exponential backoff, for at most `retry_timeout`
/// seconds in all; `timeout` seconds per request; `connect_timeout` seconds per connection.
fn storage_settings(node: &Node, rep: &mut Reporter) -> Vec<(String, String)> {
    let mut k = Keys::new(node, None, "[pipeline.storage]", rep);
    let mut out = Vec::new();
    if let Some(n) = k.int("retries", 0, 100) {
        out.push(("client_max_retries".to_string(), n.to_string()));
    }
    if let Some(t) = k.float("retry_timeout", 1.0, 86_400.0) {
        // Lance reads whole seconds.
        out.push(("client_retry_timeout".to_string(), (t.ceil() as u64).to_string()));
    }
    for key in ["timeout", "connect_timeout"] {
        if let Some(t) = k.float(key, 0.1, 86_400.0) {
            out.push((key.to_string(), format!("{}ms", (t * 1000.0).round() as u64)));
        }
    }
    k.finish(&["retries", "retry_timeout", "timeout", "connect_timeout"]);
    out
}

/// Reads, overrides and compiles a pipeline file; all problems come back at once as
/// [`Error::Config`].
pub async fn load(path: &Path, sets: &[String], registry: &Registry) -> Result<Plan> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    compile(path, &text, sets, registry).await
}

pub async fn compile(path: &Path, text: &str, sets: &[String], registry: &Registry) -> Result<Plan> {
    let shown = path.display().to_string();
    let mut rep = Reporter::new(&shown);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    let base_dir = std::fs::canonicalize(&base_dir).unwrap_or(base_dir);

    let mut root = match tree::parse(text) {
        Ok(n) => n,
        Err((at, msg)) => {
            rep.error(&at, None, format!("not valid TOML: {msg}"));
            return Err(Error::Config(rep.finish()));
        }
    };
    for s in sets {
        if let Err(msg) = tree::apply_set(&mut root, s) {
            rep.error(&Loc::Set(s.clone()), None, msg);
        }
    }

    // [pipeline]
    let mut name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut lake_loc = "file://lake".to_string();
    let mut lake_at = Loc::Unknown;
    let mut schemas_dir: Option<PathBuf> = None;
    let mut storage_options = HashMap::new();
    let (mut executor, mut shards) = (None, None);
    let root_table = root.as_table().map(|t| t.to_vec()).unwrap_or_default();
    for (key, _, _) in &root_table {
        if key != "pipeline" && key != "stages" {
            let at = root.key_loc(key);
            rep.error(&at, None, format!("unknown top-level table `{key}` (expected [pipeline] and [stages.NAME])"));
        }
    }
    if let Some(p) = root.get("pipeline") {
        let mut k = Keys::new(p, None, "[pipeline]", &mut rep);
        if let Some(n) = k.str("name") {
            name = n;
        }
        if let Some((l, at)) = k.str_at("lake") {
            lake_loc = l;
            lake_at = at;
        }
        schemas_dir = k.str("schemas").map(|s| base_dir.join(s));
        if let Some(o) = k.str_map("storage_options") {
            storage_options = o.into_iter().collect();
        }
        if let Some(node) = k.node("storage") {
            storage_options.extend(storage_settings(node, k.reporter()));
        }
        k.str("description");
        if let Some((e, at)) = k.str_at("executor") {
            if e == "local" || e == "ray" || e.strip_prefix("ray=").is_some_and(|a| !a.is_empty()) {
                executor = Some(e);
            } else {
                k.reporter().error(&at, None, format!("executor `{e}`: write `local`, `ray` or `ray=HOST:PORT`"));
            }
        }
        shards = k.int("shards", 1, 100_000).map(|n| n as u32);
        k.finish(PIPELINE_KEYS);
    }
    // Default: the repository's schemas/ folder next to pipelines/.
    let schemas_dir = schemas_dir.or_else(|| {
        [base_dir.join("schemas"), base_dir.join("../schemas")].into_iter().find(|d| d.is_dir())
    });
    let catalog = match Catalog::load(schemas_dir.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            rep.error(&Loc::Unknown, None, e.to_string());
            Catalog::load(None).unwrap_or_default()
        }
    };
    let ctx = Context { base_dir: base_dir.clone(), catalog: catalog.clone(), lake_relative: store::is_relative(&lake_loc) };
    let lake = match ctx.location(&lake_loc) {
        Ok(l) => l,
        Err(e) => {
            rep.error(&lake_at, None, e.to_string());
            String::new()
        }
    };
    // Lance is built with its S3 store only: a lake elsewhere would fail at the first write.
    if let Some(scheme) = lake.split_once("://").map(|(s, _)| s).filter(|s| !matches!(*s, "file" | "s3" | "s3a" | "memory")) {
        rep.error(
            &lake_at,
            None,
            format!("a lake on `{scheme}://` is not supported (this build's Lance has file://, s3:// and memory:// stores); photos can stay there (an ingest `source`), the lake goes on file:// or s3://"),
        );
    }

    // [stages.*]
    let mut compiled: Vec<(String, Loc, Vec<(String, Loc)>, Option<(Arc<dyn Stage>, String)>)> = Vec::new();
    // Each stage's options as written (overrides applied), canonical: what its hash is of.
    let mut canonical_of: HashMap<String, String> = HashMap::new();
    // Stages with `stream = false`: they read every input once committed.
    let mut no_stream: Vec<String> = Vec::new();
    match root.get("stages") {
        None => rep.error(&Loc::Unknown, None, "no [stages.NAME] tables: a pipeline needs at least one stage"),
        Some(stages_node) => match stages_node.as_table() {
            None => rep.error(&stages_node.at, None, "`stages` must be a table of [stages.NAME] tables"),
            Some(entries) => {
                for (sname, key_at, node) in entries {
                    let at = if matches!(key_at, Loc::Unknown) { node.at.clone() } else { key_at.clone() };
                    if node.as_table().is_none() {
                        rep.error(&at, Some(sname), "must be a table with at least `kind`");
                        continue;
                    }
                    canonical_of.insert(sname.clone(), canonical(node, true));
                    let mut k = Keys::new(node, Some(sname), "stage", &mut rep);
                    let inputs = k.str_list_at("inputs").unwrap_or_default();
                    let stream = k.bool("stream").unwrap_or(true);
                    let kind_name = k.str_at("kind");
                    let compiled_kind = match kind_name {
                        None => {
                            if !k.has("kind") {
                                let r = k.reporter();
                                r.error(&at, Some(sname), format!("missing `kind` (one of: {})", registry.names().join(", ")));
                            }
                            k.ignore_rest();
                            None
                        }
                        Some((kind, kat)) => match registry.parse(&kind, &kat, &mut k, &ctx) {
                            Some(sk) => Some((sk, kind)),
                            None => None,
                        },
                    };
                    compiled.push((sname.clone(), at, inputs, compiled_kind));
                    if !stream {
                        no_stream.push(sname.clone());
                    }
                }
            }
        },
    }

    // Graph: inputs exist, no cycles, one writer per table.
    let names: Vec<String> = compiled.iter().map(|c| c.0.clone()).collect();
    let mut edges: Vec<(String, Vec<String>)> = Vec::new();
    for (sname, _, inputs, _) in &compiled {
        let mut ok = Vec::new();
        for (i, iat) in inputs {
            if i == sname {
                rep.error(iat, Some(sname), "lists itself as an input");
            } else if !names.contains(i) {
                rep.error(iat, Some(sname), format!("input `{i}` is not a stage of this pipeline (stages: {})", names.join(", ")));
            } else {
                ok.push(i.clone());
            }
        }
        edges.push((sname.clone(), ok));
    }
    let order = match topo_order(&edges) {
        Ok(o) => o,
        Err(cycle) => {
            let first = compiled.iter().find(|c| c.0 == cycle[0]).map(|c| c.1.clone()).unwrap_or(Loc::Unknown);
            rep.error(&first, Some(&cycle[0]), format!("the stages form a cycle: {}", cycle.join(" -> ")));
            Vec::new()
        }
    };
    // Compile in run order: each stage sees the schemas of what its ancestors write.
    let mut table_schemas: HashMap<String, arrow::datatypes::SchemaRef> = HashMap::new();
    let mut ancestors: HashMap<String, Vec<String>> = HashMap::new();
    let mut stages_out: Vec<StagePlan> = Vec::new();
    let mut writes_of: HashMap<String, Vec<String>> = HashMap::new();
    let text_hash = blake3::hash(text.as_bytes()).to_hex().to_string();
    for sname in &order {
        let Some((_, at, inputs, Some((kind, kind_name)))) = compiled.iter().find(|c| &c.0 == sname) else {
            // A stage whose kind did not compile: its dependants cannot be checked further.
            continue;
        };
        let input_names: Vec<String> = inputs.iter().map(|i| i.0.clone()).collect();
        let mut anc: Vec<String> = Vec::new();
        for i in &input_names {
            anc.push(i.clone());
            anc.extend(ancestors.get(i).cloned().unwrap_or_default());
        }
        anc.sort();
        anc.dedup();
        let visible: HashMap<String, arrow::datatypes::SchemaRef> = anc
            .iter()
            .filter_map(|a| writes_of.get(a))
            .flatten()
            .filter_map(|t| table_schemas.get(t).map(|s| (t.clone(), s.clone())))
            .collect();
        let broken_inputs = input_names.iter().any(|i| !compiled.iter().any(|c| &c.0 == i && c.3.is_some()));
        let inputs = Inputs { stage: sname, at, visible: &visible, broken: broken_inputs };
        let checked = kind.check(inputs, &ctx, &mut rep).await;
        let mut writes = Vec::new();
        for (t, s) in checked.writes {
            // One writer per table: what a stage writes is its own, up-to-date checks rely on it.
            if let Some(other) = stages_out.iter().find(|p| p.writes.contains(&t)).map(|p| p.name.clone()) {
                rep.error(at, Some(sname), format!("writes table `{t}`, which stage `{other}` writes too"));
            }
            table_schemas.insert(t.clone(), s);
            writes.push(t);
        }
        for m in &checked.models {
            if let Some(other) = stages_out.iter().find(|p| p.models.contains(m)).map(|p| p.name.clone()) {
                rep.error(at, Some(sname), format!("makes models named `{m}`, which stage `{other}` makes too (set `model` to tell them apart)"));
            }
        }
        writes_of.insert(sname.clone(), writes.clone());
        ancestors.insert(sname.clone(), anc);
        // Stable: the options as written, not their parsed form, so a key added to a kind with a
        // default that keeps its behaviour changes no hash; relative locations stay relative,
        // so a moved project hashes the same. A kind whose meaning changes bumps its version.
        let config_hash = blake3::hash(
            format!(
                "{kind_name}|v{}|{}|{}",
                kind.version(),
                canonical_of.get(sname.as_str()).map(String::as_str).unwrap_or(""),
                checked.hash_extra
            )
            .as_bytes(),
        )
        .to_hex()
        .to_string();
        // Streamed edges: an input stage of which this one reads exactly one table, which its
        // kind can take as a stream. (Reading two tables of one producer, one streamed and one
        // committed, would wait on itself.)
        let mut streamed = Vec::new();
        if !no_stream.contains(sname) {
            for i in &input_names {
                let theirs: Vec<&String> = writes_of.get(i).map(|w| w.iter().filter(|t| checked.reads.contains(t)).collect()).unwrap_or_default();
                if let [t] = theirs[..] {
                    if kind.streams(t) {
                        streamed.push((i.clone(), t.clone()));
                    }
                }
            }
        }
        stages_out.push(StagePlan {
            name: sname.clone(),
            kind_name: kind_name.clone(),
            kind: kind.clone(),
            inputs: input_names,
            reads: checked.reads,
            writes,
            models: checked.models,
            streamed,
            config_hash,
            at: at.clone(),
        });
    }

    if rep.count() > 0 {
        return Err(Error::Config(rep.finish()));
    }
    Ok(Plan {
        file: path.to_path_buf(),
        hash: text_hash,
        name,
        lake,
        storage_options,
        catalog,
        stages: stages_out,
        executor,
        shards,
    })
}


/// `node` as canonical text: table keys sorted, values typed (`"1"`, `1` and `1.0` differ). At
/// the top of a stage table, `inputs` and `stream` are left out: they say when the stage runs
/// and how it reads, not what it computes.
fn canonical(node: &Node, top: bool) -> String {
    match &node.val {
        Val::Str(s) => format!("{s:?}"),
        Val::Int(i) => i.to_string(),
        Val::Float(f) => format!("{f:?}"),
        Val::Bool(b) => b.to_string(),
        Val::Datetime(d) => format!("d{d:?}"),
        Val::Array(a) => format!("[{}]", a.iter().map(|n| canonical(n, false)).collect::<Vec<_>>().join(",")),
        Val::Table(t) => {
            let mut entries: Vec<String> = t
                .iter()
                .filter(|(k, _, _)| !(top && (k == "inputs" || k == "stream")))
                .map(|(k, _, n)| format!("{k:?}={}", canonical(n, false)))
                .collect();
            entries.sort();
            format!("{{{}}}", entries.join(","))
        }
    }
}
