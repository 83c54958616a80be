//! The library's one error type, grouped by cause. Runtime errors carry the stage they came
//! from, so the first failure of a run names the stage at fault.

use std::path::PathBuf;

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pipeline file (or a `--set` override) is invalid; every problem found is listed.
    #[error("{0}")]
    Config(Diagnostics),

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A lake or source URI that cannot be used.
    #[error("bad location `{uri}`: {reason}")]
    Location { uri: String, reason: String },

    #[error("object store error at `{uri}`: {source}")]
    ObjectStore {
        uri: String,
        #[source]
        source: object_store::Error,
    },

    #[error("lance table `{table}`: {source}")]
    Lance {
        table: String,
        #[source]
        source: Box<lance::Error>,
    },

    #[error("SQL: {0}")]
    Sql(#[from] datafusion::error::DataFusionError),

    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    /// A batch does not match the schema declared for its table in `schemas/`.
    #[error("table `{table}`, column `{column}`: {detail}")]
    Schema {
        table: String,
        column: String,
        detail: String,
    },

    /// A declared schema file that cannot be parsed.
    #[error("schema file {file}: {detail}")]
    SchemaFile { file: String, detail: String },

    /// A query that needs more memory than `pipeline query --memory-limit` gives it.
    #[error("the query needs more memory than its limit of {} (--memory-limit; a join or aggregation over too many rows?): {detail}", human_bytes(*limit))]
    MemoryLimit { limit: u64, detail: String },

    /// A model folder on an object store whose files are not the ones its manifest lists.
    #[error("model folder {uri} is incomplete: {detail}")]
    IncompleteModel { uri: String, detail: String },

    /// `pipeline query` refuses anything that would change the lake.
    #[error("pipeline query is read-only: {0}")]
    ReadOnly(String),

    /// A model's files (its spec, its weights) that cannot be used.
    #[error("model `{model}`: {}: {source}", file.display())]
    ModelFile {
        model: String,
        file: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("labels file `{uri}`: {detail}")]
    Labels { uri: String, detail: String },

    /// A failure inside one stage of a run; the stage is named first.
    #[error("stage `{stage}` failed: {source}")]
    Stage {
        stage: String,
        #[source]
        source: Box<Error>,
    },

    /// Another run holds the lake's lease (one writer at a time).
    #[error("lake `{lake}` is in use by {holder}; wait for it (`pipeline run --wait SECONDS`) or try later")]
    Busy { lake: String, holder: String },

    #[error("run cancelled ({0})")]
    Cancelled(String),

    /// More work than a server takes at once (the HTTP API's model queue is full): try again
    /// shortly.
    #[error("busy: {0}; try again shortly")]
    Overloaded(String),

    /// An image given by a user (CLI, HTTP) that cannot be decoded.
    #[error("not a readable image: {0}")]
    BadImage(String),

    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn lance(table: impl Into<String>, source: lance::Error) -> Self {
        Error::Lance { table: table.into(), source: Box::new(source) }
    }

    pub fn in_stage(self, stage: &str) -> Self {
        match self {
            // Already attributed (or a cancellation, which belongs to the whole run).
            e @ (Error::Stage { .. } | Error::Cancelled(_)) => e,
            e => Error::Stage { stage: stage.to_string(), source: Box::new(e) },
        }
    }
}

/// Where a key or value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Loc {
    /// 1-based line and column in the pipeline file.
    File { line: usize, col: usize },
    /// A `--set` override (its text).
    Set(String),
    Unknown,
}

/// One problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub at: Loc,
    pub stage: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Loc::File { line, col } => write!(f, "{}:{line}:{col}: ", self.file)?,
            Loc::Set(s) => write!(f, "{} (--set {s}): ", self.file)?,
            Loc::Unknown => write!(f, "{}: ", self.file)?,
        }
        if let Some(s) = &self.stage {
            write!(f, "stage `{s}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a pipeline file, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} error(s) in the pipeline file:", self.0.len())?;
        for d in &self.0 {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}


/// `bytes` as people read it: 1.5 GiB, 512 MiB.
pub fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", units[u]) }
}
