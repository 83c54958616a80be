//! Nearest-neighbour search over an embeddings table (Lance): through its vector index when it
//! has one (IVF_PQ with exact re-ranking, or IVF_HNSW_SQ), exactly otherwise. Cosine distance
//! everywhere: embeddings are unit length, so `distance = 1 − similarity`.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Float32Array, RecordBatch};
use arrow::datatypes::Float32Type;
use lance::Dataset;
use lance::index::DatasetIndexExt;
use lance_linalg::distance::DistanceType;

use crate::{Error, Result};

/// Name of the vector index the `index` stage builds.
pub const INDEX_NAME: &str = "embedding_idx";

/// How to search.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SearchParams {
    /// IVF partitions probed (None: Lance's adaptive default).
    pub nprobes: Option<usize>,
    /// Re-rank `refine × k` index candidates with the exact vectors (IVF_PQ).
    pub refine: Option<u32>,
    /// HNSW search list size.
    pub ef: Option<usize>,
    /// Ignore any index: exact search.
    pub exact: bool,
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams { nprobes: Some(20), refine: Some(10), ef: Some(80), exact: false }
    }
}

/// One neighbour: row values of `columns`, and the cosine distance.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub photo_id: String,
    pub uri: String,
    pub individual_id: Option<String>,
    pub distance: f32,
}

impl Hit {
    pub fn similarity(&self) -> f32 {
        1.0 - self.distance
    }
}

/// Whether the table has the index the `index` stage builds.
pub async fn has_index(ds: &Dataset) -> Result<bool> {
    let indices = ds.load_indices().await.map_err(|e| Error::Other(format!("loading indices: {e}")))?;
    Ok(indices.iter().any(|i| i.name == INDEX_NAME))
}

/// The `k` nearest rows to `query` in `ds` (its `embedding` column), nearest first.
pub async fn nearest(ds: &Dataset, query: &[f32], k: usize, p: &SearchParams) -> Result<Vec<Hit>> {
    Ok(search(ds, query, k, p, false).await?.0)
}

/// α-query expansion (as in Radenović et al.): the query is replaced by the normalised sum of
/// itself and its first `k` neighbours, each weighted by similarity^`alpha`, and searched
/// again. `k = 0` is off.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Expansion {
    pub k: usize,
    pub alpha: f32,
}

impl Expansion {
    pub const OFF: Expansion = Expansion { k: 0, alpha: 3.0 };
}

impl Default for Expansion {
    fn default() -> Self {
        Expansion::OFF
    }
}

/// The `k` nearest rows to `query` other than the row whose URI is `skip` (the query photo
/// itself). With expansion on, rows are ranked by the expanded query, while each hit's
/// distance stays the query's own to that row: thresholds fitted on plain similarities (the
/// new-individual one) keep their meaning.
pub async fn similar(ds: &Dataset, query: &[f32], k: usize, p: &SearchParams, x: Expansion, skip: Option<&str>) -> Result<Vec<Hit>> {
    let keep = |h: &Hit| skip.is_none_or(|s| h.uri != s);
    let extra = usize::from(skip.is_some());
    if x.k == 0 {
        return Ok(nearest(ds, query, k + extra, p).await?.into_iter().filter(keep).take(k).collect());
    }
    let (first, vectors) = search(ds, query, x.k + extra, p, true).await?;
    let neighbours = first.iter().zip(&vectors).filter(|(h, _)| keep(h)).take(x.k).map(|(h, v)| (h.similarity(), v.as_slice()));
    let expanded = crate::model::metrics::expand_query(query, neighbours, x.alpha);
    let (hits, vectors) = search(ds, &expanded, k + extra, p, true).await?;
    Ok(hits
        .into_iter()
        .zip(vectors)
        .filter(|(h, _)| keep(h))
        .take(k)
        .map(|(h, v)| Hit { distance: 1.0 - crate::model::metrics::cosine(query, &v), ..h })
        .collect())
}

/// One search; with `vectors`, the embedding of every hit too.
async fn search(ds: &Dataset, query: &[f32], k: usize, p: &SearchParams, vectors: bool) -> Result<(Vec<Hit>, Vec<Vec<f32>>)> {
    let q = Float32Array::from(query.to_vec());
    let mut s = ds.scan();
    let columns: &[&str] = if vectors { &["photo_id", "uri", "individual_id", "embedding"] } else { &["photo_id", "uri", "individual_id"] };
    s.project(columns).map_err(|e| Error::Other(e.to_string()))?;
    s.nearest("embedding", &q as &dyn Array, k).map_err(|e| Error::Other(format!("nearest: {e}")))?;
    s.distance_metric(DistanceType::Cosine);
    if p.exact {
        s.use_index(false);
    } else {
        if let Some(n) = p.nprobes {
            s.minimum_nprobes(n);
        }
        if let Some(r) = p.refine {
            s.refine(r);
        }
        if let Some(ef) = p.ef {
            // HNSW must keep at least the candidates asked of it: k, times the refine factor.
            s.ef(ef.max(k * p.refine.unwrap_or(1) as usize));
        }
    }
    let batch: RecordBatch = s.try_into_batch().await.map_err(|e| Error::Other(format!("vector search: {e}")))?;
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| Error::Other(format!("search result lacks `{name}`")));
    let (pid, uri, ind) = (col("photo_id")?.as_string::<i32>().clone(), col("uri")?.as_string::<i32>().clone(), col("individual_id")?.as_string::<i32>().clone());
    let dist = col("_distance")?.as_primitive::<Float32Type>().clone();
    let hits = (0..batch.num_rows())
        .map(|i| Hit {
            photo_id: pid.value(i).to_string(),
            uri: uri.value(i).to_string(),
            individual_id: (ind.is_valid(i) && !ind.value(i).is_empty()).then(|| ind.value(i).to_string()),
            distance: dist.value(i),
        })
        .collect();
    let vectors = if vectors {
        let list = col("embedding")?.as_fixed_size_list().clone();
        (0..batch.num_rows()).map(|i| list.value(i).as_primitive::<Float32Type>().values().to_vec()).collect()
    } else {
        Vec::new()
    };
    Ok((hits, vectors))
}

/// The embedding of the row whose `photo_id` (or `uri`) is `id`.
pub async fn embedding_of(ds: &Dataset, id: &str) -> Result<Option<(Vec<f32>, Hit)>> {
    let esc = id.replace('\'', "''");
    let mut s = ds.scan();
    s.project(&["photo_id", "uri", "individual_id", "embedding"]).map_err(|e| Error::Other(e.to_string()))?;
    s.filter(&format!("photo_id = '{esc}' OR uri = '{esc}'")).map_err(|e| Error::Other(e.to_string()))?;
    s.limit(Some(1), None).map_err(|e| Error::Other(e.to_string()))?;
    let b = s.try_into_batch().await.map_err(|e| Error::Other(format!("lookup of `{id}`: {e}")))?;
    if b.num_rows() == 0 {
        return Ok(None);
    }
    let list = b.column(3).as_fixed_size_list();
    let v = list.value(0);
    let v = v.as_primitive::<Float32Type>().values().to_vec();
    let ind = b.column(2).as_string::<i32>();
    let hit = Hit {
        photo_id: b.column(0).as_string::<i32>().value(0).to_string(),
        uri: b.column(1).as_string::<i32>().value(0).to_string(),
        individual_id: (ind.is_valid(0) && !ind.value(0).is_empty()).then(|| ind.value(0).to_string()),
        distance: 0.0,
    };
    Ok(Some((v, hit)))
}

/// Fraction of `exact` found in `approx` (recall@k of one query).
pub fn recall(approx: &[Hit], exact: &[Hit]) -> f64 {
    if exact.is_empty() {
        return 1.0;
    }
    let found = exact.iter().filter(|e| approx.iter().any(|a| a.uri == e.uri)).count();
    found as f64 / exact.len() as f64
}

/// Shared handle for concurrent searches.
pub type SharedDataset = Arc<Dataset>;

/// `knn(table, query, k)`: a SQL table function over an embeddings table of the lake.
/// `query` is a photo id or URI of that table (the photo itself is left out of its answer) or
/// a literal vector (`[0.1, 0.2, ...]`). Columns: `query`, `rank`, `photo_id`, `uri`,
/// `individual_id`, `distance`, `similarity` — joinable with `images` and friends:
///
/// ```sql
/// SELECT k.rank, k.photo_id, k.similarity, i.width, i.sharpness
/// FROM knn('embeddings', 'IMG_00042.jpg', 20) k JOIN images i ON i.uri = k.uri ORDER BY k.rank
/// ```
#[derive(Debug)]
pub struct KnnFunction {
    pub lake: crate::lake::Lake,
}

impl KnnFunction {
    async fn answer(&self, table: &str, query: KnnQuery, k: usize) -> Result<RecordBatch> {
        let ds = self.lake.open(table).await?.ok_or_else(|| Error::Other(format!("knn: table `{table}` does not exist")))?;
        let (vector, label, exclude) = match query {
            KnnQuery::Id(id) => {
                let (v, hit) = embedding_of(&ds, &id).await?.ok_or_else(|| Error::Other(format!("knn: no photo `{id}` in `{table}`")))?;
                (v, id, Some(hit.uri))
            }
            KnnQuery::Vector(v) => (v, "vector".to_string(), None),
        };
        let hits = similar(&ds, &vector, k, &SearchParams::default(), Expansion::OFF, exclude.as_deref()).await?;
        let n = hits.len();
        Ok(RecordBatch::try_new(
            knn_schema(),
            vec![
                Arc::new(arrow::array::StringArray::from(vec![label.as_str(); n])),
                Arc::new(arrow::array::Int32Array::from_iter_values(1..=n as i32)),
                Arc::new(arrow::array::StringArray::from_iter_values(hits.iter().map(|h| h.photo_id.as_str()))),
                Arc::new(arrow::array::StringArray::from_iter_values(hits.iter().map(|h| h.uri.as_str()))),
                Arc::new(arrow::array::StringArray::from(hits.iter().map(|h| h.individual_id.as_deref()).collect::<Vec<_>>())),
                Arc::new(Float32Array::from_iter_values(hits.iter().map(|h| h.distance))),
                Arc::new(Float32Array::from_iter_values(hits.iter().map(|h| h.similarity()))),
            ],
        )?)
    }
}

enum KnnQuery {
    Id(String),
    Vector(Vec<f32>),
}

fn knn_schema() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    Arc::new(Schema::new(vec![
        Field::new("query", DataType::Utf8, false),
        Field::new("rank", DataType::Int32, false),
        Field::new("photo_id", DataType::Utf8, false),
        Field::new("uri", DataType::Utf8, false),
        Field::new("individual_id", DataType::Utf8, true),
        Field::new("distance", DataType::Float32, false),
        Field::new("similarity", DataType::Float32, false),
    ]))
}

impl datafusion::catalog::TableFunctionImpl for KnnFunction {
    fn call_with_args(&self, args: datafusion::catalog::TableFunctionArgs) -> datafusion::error::Result<Arc<dyn datafusion::catalog::TableProvider>> {
        use datafusion::error::DataFusionError;
        use datafusion::logical_expr::Expr;
        use datafusion::scalar::ScalarValue;
        let usage = "knn(table, photo_id_or_vector, k), e.g. knn('embeddings', 'IMG_00042.jpg', 20)";
        let bad = |what: &str| DataFusionError::Plan(format!("knn: {what}; usage: {usage}"));
        let exprs = args.exprs();
        if exprs.len() != 3 {
            return Err(bad(&format!("takes 3 arguments, got {}", exprs.len())));
        }
        let lit = |e: &Expr| match e {
            Expr::Literal(v, _) => Some(v.clone()),
            _ => None,
        };
        let table = match lit(&exprs[0]) {
            Some(ScalarValue::Utf8(Some(s))) | Some(ScalarValue::LargeUtf8(Some(s))) | Some(ScalarValue::Utf8View(Some(s))) => s,
            _ => return Err(bad("the first argument must be a table name in quotes")),
        };
        let query = match lit(&exprs[1]) {
            Some(ScalarValue::Utf8(Some(s))) | Some(ScalarValue::LargeUtf8(Some(s))) | Some(ScalarValue::Utf8View(Some(s))) => KnnQuery::Id(s),
            Some(ScalarValue::List(list)) => {
                let values = list.values();
                let floats = arrow::compute::cast(values, &arrow::datatypes::DataType::Float32).map_err(|e| bad(&e.to_string()))?;
                KnnQuery::Vector(floats.as_primitive::<Float32Type>().values().to_vec())
            }
            _ => return Err(bad("the second argument must be a photo id in quotes or a vector literal [..]")),
        };
        let k = match lit(&exprs[2]) {
            Some(ScalarValue::Int64(Some(k))) if (1..=10_000).contains(&k) => k as usize,
            Some(ScalarValue::Int32(Some(k))) if (1..=10_000).contains(&k) => k as usize,
            _ => return Err(bad("the third argument must be a whole number k in 1..10000")),
        };
        // Planning is synchronous; the search is not. The query runs on a multi-threaded
        // runtime (the CLI's), so block this worker while another drives the search.
        let handle = tokio::runtime::Handle::try_current().map_err(|e| bad(&format!("needs a tokio runtime: {e}")))?;
        let batch = tokio::task::block_in_place(|| handle.block_on(self.answer(&table, query, k)))
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        let mem = datafusion::datasource::MemTable::try_new(batch.schema(), vec![vec![batch]])?;
        Ok(Arc::new(mem))
    }
}
