//! Stage kind `sql`: runs a query from `sql/*.sql` over the lake's tables with DataFusion and
//! writes the result as one table (one Lance commit, replacing the previous contents).
//!
//! ```toml
//! [stages.clean]
//! kind = "sql"
//! inputs = ["usable"]
//! query = "../sql/clean.sql"            # relative to the pipeline file
//! params = { min_photos_per_individual = 2 }   # $min_photos_per_individual in the query
//! output = "clean"                      # default: the stage name
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::scalar::ScalarValue;
use std::sync::Mutex;

use arrow::array::RecordBatch;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use futures::StreamExt;

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Loc, Reporter, Val};
use engine::StageCtx;
use lake::{WriteKind, new_session};
use crate::{Error, Result};

const KEYS: &[&str] = &["query", "params", "output"];

#[derive(Debug, Clone)]
pub struct SqlConfig {
    /// The path as written in the pipeline file (for messages and `pipeline graph`).
    pub query_file: String,
    pub query: String,
    pub params: BTreeMap<String, Param>,
    pub output: Option<String>,
    query_at: Loc,
    /// Set by the check: the one table the query maps row by row (projections and filters of
    /// one table, no aggregate, window, join, sort, limit or union), which it can then read as
    /// its producer writes it.
    maps: Arc<std::sync::OnceLock<Option<String>>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

impl Param {
    fn scalar(&self) -> ScalarValue {
        match self {
            Param::Int(i) => ScalarValue::Int64(Some(*i)),
            Param::Float(f) => ScalarValue::Float64(Some(*f)),
            Param::Str(s) => ScalarValue::Utf8(Some(s.clone())),
            Param::Bool(b) => ScalarValue::Boolean(Some(*b)),
        }
    }
}

impl SqlConfig {
    pub fn parse(k: &mut Keys, ctx: &Context) -> Option<SqlConfig> {
        let mut ok = true;
        let query = match k.str_at("query") {
            None => {
                if !k.has("query") {
                    k.missing("query", "path of a .sql file, relative to the pipeline file");
                }
                ok = false;
                None
            }
            Some((q, at)) => {
                let path = ctx.path(&q);
                match std::fs::read_to_string(&path) {
                    Ok(text) if text.trim().is_empty() => {
                        k.error("query", format!("SQL file `{q}` is empty"));
                        ok = false;
                        None
                    }
                    Ok(text) => Some((q, text, at)),
                    Err(e) => {
                        k.error("query", format!("SQL file `{q}` cannot be read ({}): {e}", path.display()));
                        ok = false;
                        None
                    }
                }
            }
        };
        let mut params = BTreeMap::new();
        if let Some(n) = k.node("params") {
            match n.as_table() {
                None => {
                    k.error("params", format!("`params` must be a table, found {} {}", n.type_name(), n.show()));
                    ok = false;
                }
                Some(entries) => {
                    for (name, _, v) in entries {
                        let p = match &v.val {
                            Val::Int(i) => Param::Int(*i),
                            Val::Float(f) => Param::Float(*f),
                            Val::Str(s) => Param::Str(s.clone()),
                            Val::Bool(b) => Param::Bool(*b),
                            _ => {
                                let stage = k.stage().map(str::to_string);
                                let msg = format!("param `{name}` must be a number, string or boolean, found {}", v.type_name());
                                k.reporter().error(&v.at, stage.as_deref(), msg);
                                ok = false;
                                continue;
                            }
                        };
                        params.insert(name.clone(), p);
                    }
                }
            }
        }
        let output = k.str("output");
        if let Some(o) = &output {
            let valid = o.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && o.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                k.error("output", format!("table name `{o}` must be lower-case letters, digits and _"));
                ok = false;
            }
        }
        engine::stage::finish_keys(k, KEYS);
        let (query_file, query, query_at) = query?;
        ok.then_some(SqlConfig { query_file, query, params, output, query_at, maps: Default::default() })
    }

    fn param_values(&self) -> ParamValues {
        let map: HashMap<String, ScalarValue> = self.params.iter().map(|(k, v)| (k.clone(), v.scalar())).collect();
        ParamValues::from(map)
    }

    /// Reads only: a stage's query may not change the lake behind the engine's back.
    fn options() -> SQLOptions {
        SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
    }

    async fn plan(&self, ctx: &SessionContext) -> datafusion::error::Result<DataFrame> {
        ctx.sql_with_options(&self.query, Self::options()).await?.with_param_values(self.param_values())
    }

    pub async fn check(
        &self,
        stage: &str,
        _at: &Loc,
        visible: &HashMap<String, SchemaRef>,
        broken_inputs: bool,
        ctx: &Context,
        rep: &mut Reporter,
    ) -> Checked {
        let output = self.output.clone().unwrap_or_else(|| stage.to_string());
        let declared = ctx.catalog.get(&output);
        let mut checked = Checked { hash_extra: self.query.clone(), ..Default::default() };
        if broken_inputs {
            if let Some(d) = declared {
                checked.writes.push((output, d));
            }
            return checked;
        }
        let session = new_session();
        for (t, schema) in visible {
            // Empty tables with the declared schemas: enough to plan, nothing to read.
            if let Ok(mem) = MemTable::try_new(schema.clone(), vec![vec![]]) {
                let _ = session.register_table(t.as_str(), Arc::new(mem));
            }
        }
        let planned = async {
            let df = self.plan(&session).await?;
            let reads = table_scans(df.logical_plan());
            let _ = self.maps.set(maps_rows(df.logical_plan(), &reads));
            df.clone().create_physical_plan().await?;
            Ok::<_, datafusion::error::DataFusionError>((df.schema().as_arrow().clone(), reads))
        }
        .await;
        match planned {
            Err(e) => {
                let mut tables: Vec<&String> = visible.keys().collect();
                tables.sort();
                let names: Vec<&str> = tables.iter().map(|s| s.as_str()).collect();
                rep.error(
                    &self.query_at,
                    Some(stage),
                    format!(
                        "query `{}` does not plan against its inputs (tables: {}): {}",
                        self.query_file,
                        if names.is_empty() { "none".to_string() } else { names.join(", ") },
                        first_line(&e.to_string())
                    ),
                );
                if let Some(d) = declared {
                    checked.writes.push((output, d));
                }
            }
            Ok((schema, reads)) => {
                checked.reads = reads;
                let schema = Arc::new(schema);
                match declared {
                    Some(d) => {
                        if let Err(e) = schema_matches(&output, &d, &schema) {
                            rep.error(&self.query_at, Some(stage), format!("query `{}` result does not match schemas/{output}.toml: {e}", self.query_file));
                        }
                        checked.writes.push((output, d));
                    }
                    None => checked.writes.push((output, schema)),
                }
            }
        }
        checked
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let output = self.output.clone().unwrap_or_else(|| ctx.name.clone());
        let session = ctx.lake.session().await?;
        // The table it maps row by row, read as its producer writes it, or, for a shard, the
        // rows of the committed table that the shard owns.
        let streamed = self.maps.get().cloned().flatten().filter(|t| ctx.is_streamed(t) || ctx.shard().is_some());
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let Some(t) = &streamed {
            // The table as its producer writes it, in place of the committed one.
            let schema = ctx.lake.catalog().get(t).ok_or_else(|| Error::Other(format!("table `{t}` has no declared schema to stream with")))?;
            let rows = match ctx.shard() {
                None => ctx.read(t, &[]),
                Some(shard) => owned_rows(ctx, t, &schema, shard)?,
            };
            let part = Streamed { schema: schema.clone(), table: t.clone(), rows: Mutex::new(Some(rows)), counted: counted.clone() };
            let table = StreamingTable::try_new(schema, vec![Arc::new(part)])?;
            session.deregister_table(t.as_str())?;
            session.register_table(t.as_str(), Arc::new(table))?;
        }
        let df = self.plan(&session).await?;
        let reads = table_scans(df.logical_plan());
        let mut rows_in = 0;
        for t in reads.iter().filter(|t| Some(*t) != streamed.as_ref()) {
            if let Some(ds) = ctx.lake.open(t).await? {
                rows_in += ds.count_rows(None).await.map_err(|e| Error::lance(t, e))? as u64;
            }
        }
        let schema = ctx.lake.catalog().get(&output).unwrap_or_else(|| Arc::new(df.schema().as_arrow().clone()));
        let mut stream = df.execute_stream().await?;
        let mut sink = ctx.sink(&output, schema, WriteKind::Overwrite).await?;
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            ctx.progress.inc(batch.num_rows() as u64);
            sink.send(batch).await?;
        }
        let c = sink.finish().await?;
        let rows_in = rows_in + counted.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Outcome {
            rows_in,
            rows_out: c.rows_sent,
            written: BTreeMap::from([(output.clone(), c.version)]),
            summary: format!("{} of {} rows kept in `{output}`", c.rows_sent, rows_in),
            ..Default::default()
        })
    }
}

/// The rows of `table` that `shard` owns, by their photo's URI (or id): a row-wise query over
/// them gives the shard's part of the result.
fn owned_rows(ctx: &StageCtx, table: &str, schema: &SchemaRef, shard: lake::staging::Shard) -> Result<engine::dag::BatchStream> {
    let key = ["uri", "photo_id"].into_iter().find(|k| schema.field_with_name(k).is_ok()).ok_or_else(|| {
        Error::Other(format!("stage `{}` cannot split the rows of table `{table}` into shards: it has no `uri` or `photo_id` column", ctx.name))
    })?;
    use arrow::array::Array;
    let t = table.to_string();
    Ok(ctx
        .read(table, &[])
        .map(move |b| {
            let b = b?;
            let keys = lake::tables::Columns::new(&t, &b).strings(key)?;
            let mine: arrow::array::BooleanArray = (0..b.num_rows()).map(|i| Some(keys.is_valid(i) && shard.owns(keys.value(i)))).collect();
            Ok(arrow::compute::filter_record_batch(&b, &mine)?)
        })
        .boxed())
}

/// The table a plan maps row by row, if it does: it scans one table, and has only
/// projections, filters and aliases above the scan (so each output row depends on one input
/// row, and the result can be produced as the input arrives).
fn maps_rows(plan: &LogicalPlan, reads: &[String]) -> Option<String> {
    let [table] = reads else { return None };
    let mut rowwise = true;
    // Infallible visitor: the closure never returns an error.
    let _ = plan.apply_with_subqueries(|node| {
        rowwise &= matches!(node, LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) | LogicalPlan::TableScan(_));
        Ok(if rowwise { TreeNodeRecursion::Continue } else { TreeNodeRecursion::Stop })
    });
    rowwise.then(|| table.clone())
}

/// A table read as its producer writes it, as one DataFusion partition (read once).
struct Streamed {
    schema: SchemaRef,
    table: String,
    rows: Mutex<Option<engine::dag::BatchStream>>,
    counted: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Streamed({})", self.table)
    }
}

impl PartitionStream for Streamed {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let rows = self.rows.lock().ok().and_then(|mut r| r.take());
        let (schema, table, counted) = (self.schema.clone(), self.table.clone(), self.counted.clone());
        let s = match rows {
            Some(rows) => rows
                .map(move |r| {
                    let b = r.map_err(|e| DataFusionError::External(Box::new(e)))?;
                    counted.fetch_add(b.num_rows() as u64, std::sync::atomic::Ordering::Relaxed);
                    // The declared schema, column by column (a batch of another shape is an error).
                    let cols = schema
                        .fields()
                        .iter()
                        .map(|f| b.column_by_name(f.name()).cloned().ok_or_else(|| DataFusionError::Execution(format!("streamed `{table}` has no column `{}`", f.name()))))
                        .collect::<datafusion::error::Result<Vec<_>>>()?;
                    Ok(RecordBatch::try_new(schema.clone(), cols)?)
                })
                .boxed(),
            None => futures::stream::once(async move { Err(DataFusionError::Execution(format!("streamed table `{table}` was read twice"))) }).boxed(),
        };
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), s))
    }
}

/// Names of the tables a plan scans.
fn table_scans(plan: &LogicalPlan) -> Vec<String> {
    let mut out = Vec::new();
    // Infallible visitor: the closure never returns an error.
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(s) = node {
            out.push(s.table_name.table().to_string());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out.sort();
    out.dedup();
    out
}

/// The planned result against the declared schema: same columns, same types (nullability is
/// checked on the data when it is written).
fn schema_matches(table: &str, declared: &SchemaRef, got: &SchemaRef) -> std::result::Result<(), String> {
    for f in got.fields() {
        match declared.field_with_name(f.name()) {
            Err(_) => return Err(format!("column `{}` is not declared", f.name())),
            Ok(d) if d.data_type() != f.data_type() => {
                return Err(format!("column `{}` has type {} but {} is declared", f.name(), f.data_type(), d.data_type()));
            }
            Ok(_) => {}
        }
    }
    for d in declared.fields() {
        if got.field_with_name(d.name()).is_err() {
            return Err(format!("column `{}` declared for `{table}` is missing from the result", d.name()));
        }
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

impl Stage for SqlConfig {
    fn describe(&self) -> String {
        format!("sql {}", self.query_file)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(SqlConfig::check(self, i.stage, i.at, i.visible, i.broken, ctx, rep))
    }

    fn streams(&self, table: &str) -> bool {
        self.maps.get().is_some_and(|t| t.as_deref() == Some(table))
    }

    /// A query that maps one table row by row runs as shards, each over its rows.
    fn shards(&self) -> bool {
        self.maps.get().is_some_and(|t| t.is_some())
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(SqlConfig::run(self, ctx))
    }
}
