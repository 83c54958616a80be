//! `pipeline query`: read-only SQL over the lake's tables, printed as a table, CSV, JSON or
//! Parquet. Anything that would change the lake is refused before it is planned.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::execution::context::SQLOptions;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement;

use crate::Lake;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    Parquet,
}

/// Refuses statements that write (INSERT, CREATE, COPY, ...), naming the statement.
pub fn ensure_read_only(sql: &str) -> Result<()> {
    let statements = DFParser::parse_sql(sql).map_err(|e| Error::Sql(e.into()))?;
    if statements.is_empty() {
        return Err(Error::Other("empty query".into()));
    }
    for st in &statements {
        let ok = match st {
            DfStatement::Statement(s) => matches!(
                s.as_ref(),
                Statement::Query(_)
                    | Statement::Explain { .. }
                    | Statement::ExplainTable { .. }
                    | Statement::ShowTables { .. }
                    | Statement::ShowColumns { .. }
                    | Statement::ShowFunctions { .. }
            ),
            DfStatement::Explain(_) => true,
            _ => false,
        };
        if !ok {
            let keyword = st.to_string().split_whitespace().take(2).collect::<Vec<_>>().join(" ").to_uppercase();
            return Err(Error::ReadOnly(format!(
                "`{keyword} …` statements are refused; tables change only through pipeline stages (`pipeline run`)"
            )));
        }
    }
    Ok(())
}

/// Runs `sql` against every table of the lake.
pub async fn query(lake: &Lake, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    query_as_of(lake, sql, None).await
}

/// [`query`] over the lake as it was after run `as_of` ([`Lake::session_as_of`]), or now.
pub async fn query_as_of(lake: &Lake, sql: &str, as_of: Option<&str>) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    ensure_read_only(sql)?;
    let ctx = match as_of {
        Some(run) => lake.session_as_of(run).await?,
        None => lake.session().await?,
    };
    let opts = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
    let df = ctx.sql_with_options(sql, opts).await?;
    let schema: SchemaRef = std::sync::Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    Ok((schema, batches))
}

pub fn write(format: Format, schema: &SchemaRef, batches: &[RecordBatch], out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::io("<output>", e);
    match format {
        Format::Table => {
            let shown = arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(out, "{shown}").map_err(io)?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(out);
            if batches.is_empty() {
                w.write(&RecordBatch::new_empty(schema.clone()))?;
            }
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            w.write_batches(&refs)?;
            w.finish()?;
        }
        Format::Parquet => {
            let mut buf = Vec::new();
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema.clone(), None)
                .map_err(|e| Error::Other(format!("parquet: {e}")))?;
            for b in batches {
                w.write(b).map_err(|e| Error::Other(format!("parquet: {e}")))?;
            }
            w.close().map_err(|e| Error::Other(format!("parquet: {e}")))?;
            out.write_all(&buf).map_err(io)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_by_name() {
        for sql in [
            "INSERT INTO images VALUES (1)",
            "CREATE TABLE x AS SELECT 1",
            "DROP TABLE images",
            "COPY images TO 'x.csv'",
            "DELETE FROM images",
            "UPDATE images SET width = 1",
        ] {
            let e = ensure_read_only(sql).unwrap_err();
            assert!(matches!(e, Error::ReadOnly(_)), "{sql}: {e}");
        }
        let e = ensure_read_only("insert into images values (1)").unwrap_err().to_string();
        assert!(e.contains("INSERT INTO"), "{e}");
    }

    #[test]
    fn reads_are_allowed() {
        for sql in ["SELECT 1", "WITH a AS (SELECT 1) SELECT * FROM a", "EXPLAIN SELECT 1", "SHOW TABLES"] {
            ensure_read_only(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    }
}
