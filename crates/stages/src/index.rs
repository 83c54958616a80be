//! Stage kind `index`: a cosine vector index on an embeddings table's `embedding` column.
//!
//! - `index = "auto"` builds nothing below `flat_below` rows (30,000), IVF_HNSW_SQ above.
//!   Without an index, `submit` and `serve` search exactly over the embeddings in memory
//!   ([`lake::vector::InMemory`]); `benches/vector.rs`, 512-d, release, 2 cores, p50 / p99 ms
//!   of one query, in memory against IVF_HNSW_SQ (nprobes 15, ef 60): 5k rows 0.6 / 1.5 against
//!   7.2 / 8.9; 20k 2.4 / 5.6 against 12.7 / 14.7; 30k 7.5 / 9.8 against 10.6 / 15.7; 40k
//!   10.0 / 12.4 against 6.9 / 16.4; 50k 12.8 / 15.3 against 6.0 / 22.0. Below 30k the exact
//!   answer is also the faster one, and there is no index to build or retrain; above, the
//!   index wins at p50 (the in-memory pass is bound by memory bandwidth: 100 MB at 50k).
//!   `ivf_pq` (with exact re-ranking at query time) and `ivf_hnsw_sq` can be asked for.
//! - When rows were appended since the index was built (the nightly re-ingest), the new rows
//!   get a delta index (`optimize_indices`); once they exceed `retrain_fraction` of the indexed
//!   rows, the index is rebuilt from scratch so its partitions follow the data.
//! - Nothing to do (index current) commits nothing.
//!
//! ```toml
//! [stages.index]
//! kind = "index"
//! inputs = ["embed"]
//! table = "embeddings"
//! index = "auto"          # auto | flat | ivf_pq | ivf_hnsw_sq
//! ```

use std::collections::{BTreeMap, HashMap};

use arrow::datatypes::SchemaRef;
use lance::index::DatasetIndexExt;
use lance::index::vector::VectorIndexParams;
use lance_index::IndexType;
use lance_index::optimize::OptimizeOptions;
use lance_index::vector::hnsw::builder::HnswBuildParams;
use lance_index::vector::ivf::IvfBuildParams;
use lance_index::vector::sq::builder::SQBuildParams;
use lance_linalg::distance::DistanceType;

use futures::future::BoxFuture;
use engine::stage::{Checked, Inputs, Outcome, Prepared, Stage};
use engine::config::{Context, Keys, Loc, Reporter};
use engine::StageCtx;
use lake::vector::INDEX_NAME;
use crate::{Error, Result};

const KEYS: &[&str] = &[
    "table", "index", "flat_below", "partitions", "sub_vectors", "num_bits", "hnsw_m", "ef_construction", "retrain_fraction",
];

lake::choice! { "index",
    /// `index = ...`: what vector index the embeddings table gets.
    pub enum IndexKind {
        /// None below `flat_below` rows (exact search is faster there), IVF_HNSW_SQ above.
        Auto = "auto",
        /// None: exact search.
        Flat = "flat",
        IvfPq = "ivf_pq",
        IvfHnswSq = "ivf_hnsw_sq",
    }
}

#[derive(Debug, Clone)]
pub struct IndexStage {
    pub table: String,
    pub index: IndexKind,
    pub flat_below: usize,
    /// IVF partitions (0: √rows).
    pub partitions: usize,
    /// PQ sub-vectors (0: dim / 8).
    pub sub_vectors: usize,
    pub num_bits: u8,
    pub hnsw_m: usize,
    pub ef_construction: usize,
    pub retrain_fraction: f64,
}

/// Indexed and unindexed row counts and the index type (`IVF_PQ`, ...) from `index_statistics`.
async fn index_rows(ds: &lance::Dataset) -> Result<Option<(u64, u64, String)>> {
    let Some(v) = lake::vector::index_statistics(ds).await? else { return Ok(None) };
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Ok(Some((n("num_indexed_rows"), n("num_unindexed_rows"), lake::vector::index_type(&v))))
}

impl IndexStage {
    /// The defaults of the pipeline file, with `index` set (for tests and benchmarks).
    pub fn with_kind(table: &str, index: IndexKind) -> IndexStage {
        IndexStage {
            table: table.into(),
            index,
            flat_below: 30_000,
            partitions: 0,
            sub_vectors: 0,
            num_bits: 8,
            hnsw_m: 20,
            ef_construction: 150,
            retrain_fraction: 0.5,
        }
    }

    pub fn parse(k: &mut Keys) -> Option<IndexStage> {
        let index = k.choice("index", IndexKind::Auto);
        let ok = index.is_some();
        let s = IndexStage {
            table: k.str("table").unwrap_or_else(|| "embeddings".into()),
            index: index.unwrap_or(IndexKind::Auto),
            flat_below: k.int("flat_below", 0, i64::MAX).unwrap_or(30_000) as usize,
            partitions: k.int("partitions", 0, 1 << 20).unwrap_or(0) as usize,
            sub_vectors: k.int("sub_vectors", 0, 4096).unwrap_or(0) as usize,
            num_bits: k.int("num_bits", 4, 8).unwrap_or(8) as u8,
            hnsw_m: k.int("hnsw_m", 4, 128).unwrap_or(20) as usize,
            ef_construction: k.int("ef_construction", 10, 2000).unwrap_or(150) as usize,
            retrain_fraction: k.float("retrain_fraction", 0.0, 100.0).unwrap_or(0.5),
        };
        engine::stage::finish_keys(k, KEYS);
        ok.then_some(s)
    }

    pub fn check(&self, stage: &str, at: &Loc, visible: &HashMap<String, SchemaRef>, broken: bool, rep: &mut Reporter) -> Checked {
        let mut reads = Vec::new();
        Inputs { stage, at, visible, broken }.need(rep, &mut reads, &self.table, &["embedding"]);
        // The index is part of the embeddings table: the stage owns no table of its own.
        Checked { reads, writes: Vec::new(), ..Default::default() }
    }

    /// The index kind for `rows` rows (None: exact search, no index).
    pub fn kind_for(&self, rows: usize) -> Option<&'static str> {
        match self.index {
            IndexKind::Flat => None,
            IndexKind::Auto if rows < self.flat_below => None,
            IndexKind::Auto => Some(IndexKind::IvfHnswSq.as_str()),
            kind => Some(kind.as_str()),
        }
    }

    fn params(&self, kind: &str, rows: usize, dim: usize) -> (IndexType, VectorIndexParams) {
        let partitions = if self.partitions > 0 { self.partitions } else { ((rows as f64).sqrt().round() as usize).clamp(1, 4096) };
        match kind {
            "ivf_pq" => {
                let mut m = if self.sub_vectors > 0 { self.sub_vectors } else { (dim / 8).max(1) };
                while m > 1 && dim % m != 0 {
                    m -= 1;
                }
                (IndexType::IvfPq, VectorIndexParams::ivf_pq(partitions, self.num_bits, m, DistanceType::Cosine, 50))
            }
            _ => (
                IndexType::IvfHnswSq,
                VectorIndexParams::with_ivf_hnsw_sq_params(
                    DistanceType::Cosine,
                    IvfBuildParams::new(partitions),
                    HnswBuildParams::default().num_edges(self.hnsw_m).ef_construction(self.ef_construction),
                    SQBuildParams::default(),
                ),
            ),
        }
    }

    pub async fn run(&self, ctx: &StageCtx) -> Result<Outcome> {
        let mut ds = ctx.lake.open(&self.table).await?.ok_or_else(|| Error::Other(format!("table `{}` does not exist", self.table)))?;
        let rows = ds.count_rows(None).await.map_err(|e| Error::lance(&self.table, e))?;
        let dim = match ds.schema().field("embedding").map(|f| f.data_type()) {
            Some(arrow::datatypes::DataType::FixedSizeList(_, d)) => d as usize,
            other => return Err(Error::Schema { table: self.table.clone(), column: "embedding".into(), detail: format!("is {other:?}, not a vector") }),
        };
        let summary = self.apply(&mut ds, rows, dim, ctx).await?;
        // The index is part of the embeddings table, which the embed stage owns: nothing is
        // recorded as written here. A new index version makes the readers of the table (and,
        // once, this stage) run again, which finds nothing to do.
        Ok(Outcome { rows_in: rows as u64, rows_out: 0, written: BTreeMap::new(), summary, ..Default::default() })
    }

    /// Brings the index of `ds` (with `rows` vectors of `dim`) to what this stage asks for.
    pub async fn apply(&self, ds: &mut lance::Dataset, rows: usize, dim: usize, ctx: &StageCtx) -> Result<String> {
        self.apply_with(ds, rows, dim, |m| ctx.progress.set_message(m)).await
    }

    pub async fn apply_with(&self, ds: &mut lance::Dataset, rows: usize, dim: usize, say: impl Fn(String)) -> Result<String> {
        let current = index_rows(ds).await?;
        let want = self.kind_for(rows);
        let lerr = |e| Error::lance(&self.table, e);
        let summary = match (want, current) {
            (None, None) => format!("{rows} rows: exact search (below flat_below = {}), no index", self.flat_below),
            (None, Some(_)) => {
                ds.drop_index(INDEX_NAME).await.map_err(lerr)?;
                format!("{rows} rows: index dropped, exact search")
            }
            // Another kind of index than asked for (or unknown): rebuilt below.
            (Some(kind), Some((_, _, have))) if !have.is_empty() && have != kind => self.build(ds, kind, rows, dim, &say).await?,
            (Some(kind), Some((indexed, unindexed, _))) if unindexed == 0 && indexed as usize == rows => {
                format!("{kind} index current ({rows} rows)")
            }
            (Some(kind), Some((indexed, unindexed, _))) if (unindexed as f64) < self.retrain_fraction * indexed as f64 => {
                ds.optimize_indices(&OptimizeOptions::default()).await.map_err(lerr)?;
                format!("{kind}: {unindexed} new rows added as a delta to the index of {indexed}")
            }
            (Some(kind), _) => self.build(ds, kind, rows, dim, &say).await?,
        };
        Ok(summary)
    }

    async fn build(&self, ds: &mut lance::Dataset, kind: &str, rows: usize, dim: usize, say: &impl Fn(String)) -> Result<String> {
        say(format!("building {kind} over {rows} rows"));
        let (t, p) = self.params(kind, rows, dim);
        let started = std::time::Instant::now();
        ds.create_index(&["embedding"], t, Some(INDEX_NAME.into()), &p, true).await.map_err(|e| Error::lance(&self.table, e))?;
        Ok(format!("{kind} index built over {rows} {dim}-d rows in {:.1}s", started.elapsed().as_secs_f64()))
    }
}

impl Stage for IndexStage {
    fn describe(&self) -> String {
        format!("index {} ({})", self.table, self.index)
    }

    fn check<'a>(&'a self, i: Inputs<'a>, _ctx: &'a Context, rep: &'a mut Reporter) -> BoxFuture<'a, Checked> {
        Box::pin(std::future::ready(IndexStage::check(self, i.stage, i.at, i.visible, i.broken, rep)))
    }

    fn run<'a>(&'a self, ctx: &'a StageCtx, _: Prepared) -> BoxFuture<'a, Result<Outcome>> {
        Box::pin(IndexStage::run(self, ctx))
    }
}
