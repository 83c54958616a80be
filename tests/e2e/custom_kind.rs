//! Stage kinds defined here, in one file, run in a pipeline beside the built-in ones: `numbers`
//! writes the integers below `n`, a batch of ten at a time, and `double` streams them into a
//! table of their doubles. The engine knows neither; a registry line each is all it takes.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use futures::TryStreamExt;
use futures::future::BoxFuture;
use pipeline::config::{Context, Keys, Reporter};
use pipeline::dag::{self, RunOptions, StageCtx, ledger::Status};
use pipeline::lake::{Lake, WriteKind};
use pipeline::stage::{Checked, Inputs, Outcome, Prepared, Registry, Stage, finish_keys, stage};
use pipeline::{Error, Result};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]))
}

fn batch(values: impl IntoIterator<Item = i64>) -> RecordBatch {
    RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(values))]).unwrap()
}

#[derive(Debug)]
struct Numbers {
    n: i64,
    table: String,
}

impl Stage for Numbers {
    fn describe(&self) -> String {
        format!("numbers below {}", self.n)
    }

    fn check<'a>(&'a self, _: Inputs<'a>, _: &'a Context, _: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(async move { Checked { writes: vec![(self.table.clone(), schema())], ..Default::default() } })
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            let mut sink = ctx.sink(&self.table, schema(), WriteKind::Overwrite).await?;
            for start in (0..self.n).step_by(10) {
                sink.send(batch(start..(start + 10).min(self.n))).await?;
                // A producer slower than its reader, as a decoder is.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let c = sink.finish().await?;
            Ok(Outcome { rows_out: c.rows_sent, written: BTreeMap::from([(self.table.clone(), c.version)]), ..Default::default() })
        })
    }
}

#[derive(Debug)]
struct Double {
    from: String,
    to: String,
}

impl Stage for Double {
    fn describe(&self) -> String {
        format!("double {}", self.from)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        let mut reads = Vec::new();
        i.need(rep, &mut reads, &self.from, &["x"]);
        Box::pin(async move { Checked { reads, writes: vec![(self.to.clone(), schema())], ..Default::default() } })
    }

    fn streams(&self, table: &str) -> bool {
        table == self.from
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(async move {
            let mut rows = ctx.read(&self.from, &["x"]);
            let mut sink = ctx.sink(&self.to, schema(), WriteKind::Overwrite).await?;
            while let Some(b) = rows.try_next().await? {
                let x = b.column(0).as_primitive::<Int64Type>();
                sink.send(batch(x.values().iter().map(|v| v * 2))).await?;
            }
            let c = sink.finish().await?;
            Ok(Outcome { rows_out: c.rows_sent, written: BTreeMap::from([(self.to.clone(), c.version)]), ..Default::default() })
        })
    }
}

fn parse_numbers(k: &mut Keys, _: &Context) -> Option<Arc<dyn Stage>> {
    let (n, table) = (k.int("n", 0, 1_000_000)?, k.str("table").unwrap_or_else(|| "numbers".into()));
    finish_keys(k, &["n", "table"]);
    Some(stage(Numbers { n, table }))
}

/// A later `numbers` with a new key, `first` (where the numbers start), whose default, 0, keeps
/// what it did; this test kind implements only the default (other values are a range error).
fn parse_numbers_with_first(k: &mut Keys, _: &Context) -> Option<Arc<dyn Stage>> {
    let (n, table, _first) = (k.int("n", 0, 1_000_000)?, k.str("table").unwrap_or_else(|| "numbers".into()), k.int("first", 0, 0));
    finish_keys(k, &["n", "table", "first"]);
    Some(stage(Numbers { n, table }))
}

fn parse_double(k: &mut Keys, _: &Context) -> Option<Arc<dyn Stage>> {
    let (from, to) = (k.str("from")?, k.str("to")?);
    finish_keys(k, &["from", "to"]);
    Some(stage(Double { from, to }))
}

/// The built-in kinds and these two.
fn registry() -> Registry {
    pipeline::stages::registry().kind("numbers", parse_numbers).kind("double", parse_double)
}

const PIPELINE: &str = r#"
[pipeline]
name = "custom"
lake = "lake"

[stages.numbers]
kind = "numbers"
n = 95

[stages.double]
kind = "double"
inputs = ["numbers"]
from = "numbers"
to = "doubled"
"#;

async fn sum(lake: &Lake, table: &str) -> (i64, i64) {
    let (_, b) = pipeline::query::query(lake, &format!("SELECT count(*), sum(x) FROM {table}")).await.unwrap();
    (b[0].column(0).as_primitive::<Int64Type>().value(0), b[0].column(1).as_primitive::<Int64Type>().value(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_defined_in_a_test_runs_streams_and_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custom.toml");
    std::fs::write(&file, PIPELINE).unwrap();
    let registry = registry();
    let plan = pipeline::config::load(&file, &[], &registry).await.unwrap();
    assert_eq!(plan.stage("double").unwrap().streamed, vec![("numbers".to_string(), "numbers".to_string())]);
    let lake = Lake::new(plan.lake.clone(), Default::default(), pipeline::lake::Catalog::load(None).unwrap());
    let quiet = RunOptions { quiet: true, ..Default::default() };

    let report = dag::run(&plan, &quiet).await.unwrap();
    assert!(report.stages.iter().all(|s| s.status == Status::Succeeded), "{report:#?}");
    assert_eq!(sum(&lake, "numbers").await, (95, (0..95).sum()));
    assert_eq!(sum(&lake, "doubled").await, (95, 2 * (0..95).sum::<i64>()));
    // double began while numbers was still writing.
    let (_, b) = pipeline::query::query(
        &lake,
        &format!(
            "SELECT count(*) FROM runs c JOIN runs p ON c.run_id = p.run_id WHERE c.run_id = '{}' \
             AND c.stage = 'double' AND p.stage = 'numbers' AND c.started_at < p.ended_at",
            report.run_id
        ),
    )
    .await
    .unwrap();
    assert_eq!(b[0].column(0).as_primitive::<Int64Type>().value(0), 1);

    // Again: both up to date; the edge is not streamed when its producer does not run.
    let again = dag::run(&plan, &quiet).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    // A later version of a kind, with a new key whose default keeps the behaviour: the finished
    // lake stays up to date (the config hash is of the options as written).
    let later = pipeline::stages::registry().kind("numbers", parse_numbers_with_first).kind("double", parse_double);
    let plan2 = pipeline::config::load(&file, &[], &later).await.unwrap();
    assert_eq!(plan2.stage("numbers").unwrap().config_hash, plan.stage("numbers").unwrap().config_hash);
    let again = dag::run(&plan2, &quiet).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");
    // The project moved to another folder (lake and all): the same pipeline, still up to date.
    let moved = tempfile::tempdir().unwrap();
    for entry in ["custom.toml", "lake"] {
        let (from, to) = (dir.path().join(entry), moved.path().join(entry));
        if from.is_dir() { crate::streaming::copy_dir(&from, &to) } else { std::fs::copy(&from, &to).map(|_| ()).unwrap() }
    }
    let mplan = pipeline::config::load(&moved.path().join("custom.toml"), &[], &registry).await.unwrap();
    let again = dag::run(&mplan, &quiet).await.unwrap();
    assert!(again.stages.iter().all(|s| s.status == Status::UpToDate), "{again:#?}");

    // A different n, with the writer of `numbers` failing after 42 rows: neither table commits.
    let tables = ["numbers".to_string(), "doubled".to_string()];
    let before = lake.versions(&tables).await.unwrap();
    let plan = pipeline::config::load(&file, &["numbers.n=60".into()], &registry).await.unwrap();
    let failing = RunOptions { fail_after: Some(("numbers".into(), 42)), ..quiet.clone() };
    let err = dag::run(&plan, &failing).await.unwrap_err();
    assert!(matches!(&err, Error::Stage { stage, .. } if stage == "numbers"), "{err}");
    assert!(err.to_string().contains("injected fault after 42 rows"), "{err}");
    assert_eq!(lake.versions(&tables).await.unwrap(), before);

    // stream = false: the same tables, read once committed.
    let plan = pipeline::config::load(&file, &["numbers.n=60".into(), "double.stream=false".into()], &registry).await.unwrap();
    assert!(plan.stage("double").unwrap().streamed.is_empty());
    dag::run(&plan, &quiet).await.unwrap();
    assert_eq!(sum(&lake, "doubled").await, (60, 2 * (0..60).sum::<i64>()));

    // A kind the registry does not know is an error naming the known ones, theirs included.
    std::fs::write(&file, PIPELINE.replace("kind = \"double\"", "kind = \"triple\"")).unwrap();
    let err = pipeline::config::load(&file, &[], &registry).await.unwrap_err().to_string();
    assert!(err.contains("unknown kind `triple`") && err.contains("numbers, double"), "{err}");
}
