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
    query_limited(lake, sql, as_of, None).await
}

/// [`query_as_of`] with joins, sorts and aggregations held to `memory_limit` bytes (DataFusion's
/// memory pool; sorts spill to disk first): a query that needs more fails with
/// [`Error::MemoryLimit`] instead of taking the machine down. Scans are not counted.
pub async fn query_limited(lake: &Lake, sql: &str, as_of: Option<&str>, memory_limit: Option<u64>) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    ensure_read_only(sql)?;
    let ctx = match as_of {
        Some(run) => lake.session_as_of(run).await?,
        None => lake.session().await?,
    };
    let ctx = match memory_limit {
        Some(limit) => {
            use datafusion::execution::runtime_env::RuntimeEnvBuilder;
            use datafusion::execution::session_state::SessionStateBuilder;
            let runtime = RuntimeEnvBuilder::new().with_memory_limit(limit as usize, 1.0).build_arc()?;
            let state = SessionStateBuilder::new_from_existing(ctx.state()).with_runtime_env(runtime).build();
            datafusion::prelude::SessionContext::new_with_state(state)
        }
        None => ctx,
    };
    let over = |e: datafusion::error::DataFusionError| match (memory_limit, e.find_root()) {
        (Some(limit), datafusion::error::DataFusionError::ResourcesExhausted(detail)) => Error::MemoryLimit { limit, detail: detail.clone() },
        _ => Error::from(e),
    };
    let opts = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
    let df = ctx.sql_with_options(sql, opts).await.map_err(over)?;
    let schema: SchemaRef = std::sync::Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(over)?;
    Ok((schema, batches))
}

/// A memory size: bytes, with a unit (`512M`, `4G`, `4GiB`, `1.5GB`: powers of 1024), or a
/// share of this machine's memory (`50%`).
pub fn parse_memory(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        let share: f64 = p.trim().parse().map_err(|_| format!("`{text}`: not a percentage"))?;
        if !(share > 0.0 && share <= 100.0) {
            return Err(format!("`{text}`: a share of memory is over 0 % and at most 100 %"));
        }
        let total = total_memory().ok_or_else(|| format!("`{text}`: this machine's memory is unknown; give a size such as 4G"))?;
        return Ok((total as f64 * share / 100.0) as u64);
    }
    let upper = t.to_ascii_uppercase();
    let digits = upper.trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim();
    let unit = upper[digits.len()..].trim();
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (K, M, G, T, or a percentage)")),
    };
    let n: f64 = digits.parse().map_err(|_| format!("`{text}`: not a size such as 4G, 512M or 50%"))?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(format!("`{text}`: a memory limit is more than zero"));
    }
    Ok((n * scale as f64) as u64)
}

/// This machine's memory in bytes (Linux: /proc/meminfo).
pub fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
mod memory_tests {
    use super::parse_memory;

    #[test]
    fn memory_sizes_parse_with_units_and_shares() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("4GiB"), Ok(4 << 30));
        assert_eq!(parse_memory("1.5g"), Ok(3 << 29));
        assert_eq!(parse_memory("1000"), Ok(1000));
        let half = parse_memory("50%").unwrap();
        assert!(half > 0 && half < super::total_memory().unwrap(), "{half}");
        for bad in ["", "G", "-1G", "4X", "0", "150%", "abc"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }
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
