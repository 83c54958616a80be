//! Nearest-neighbour search over an embeddings table (Lance): through its vector index when it
//! has one (IVF_PQ with exact re-ranking, or IVF_HNSW_SQ), exactly otherwise — by Lance's scan
//! for one-off questions, or over the embeddings held in memory ([`InMemory`]) where many
//! questions are asked of a table without an index (`submit`, `serve`). Cosine distance
//! everywhere: embeddings are unit length, so `distance = 1 − similarity`.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Float32Array, RecordBatch};
use arrow::datatypes::Float32Type;
use futures::TryStreamExt;
use lance::Dataset;
use lance::index::DatasetIndexExt;
use lance_linalg::distance::DistanceType;

use crate::metrics::{self, UnitRows};
use crate::tables::EmbeddingSet;
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

impl SearchParams {
    /// The settings measured for each kind of index (`IVF_HNSW_SQ`, `IVF_PQ`, as
    /// `index_statistics` names them; None: no index). `benches/vector.rs`, 1M 512-d rows:
    /// IVF_HNSW_SQ reaches recall@20 0.963 at nprobes 15 and ef 60 with no re-ranking (p50
    /// 4.1 ms; re-ranking doubles the latency for little recall); IVF_PQ needs re-ranking
    /// (nprobes 20, refine 10: 0.864 at 1M, ≥ 0.99 at 100k).
    pub fn for_index(kind: Option<&str>) -> SearchParams {
        match kind.map(str::to_ascii_lowercase).as_deref() {
            Some("ivf_hnsw_sq") => SearchParams { nprobes: Some(15), refine: None, ef: Some(60), exact: false },
            _ => SearchParams::default(),
        }
    }

    /// The settings for `ds`'s index, with `over` on top.
    pub async fn for_table(ds: &Dataset, over: &SearchOverrides) -> Result<SearchParams> {
        Ok(over.apply(SearchParams::for_index(index_kind(ds).await?.as_deref())))
    }
}

/// Search settings a user gave (a pipeline file, command-line flags); unset ones come from
/// [`SearchParams::for_index`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchOverrides {
    pub nprobes: Option<usize>,
    /// `Some(0)`: no re-ranking.
    pub refine: Option<u32>,
    pub ef: Option<usize>,
}

impl SearchOverrides {
    pub fn apply(&self, base: SearchParams) -> SearchParams {
        SearchParams {
            nprobes: self.nprobes.or(base.nprobes),
            refine: match self.refine {
                Some(0) => None,
                Some(r) => Some(r),
                None => base.refine,
            },
            ef: self.ef.or(base.ef),
            exact: base.exact,
        }
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

/// The distinct individuals of ranked neighbours `(individual, similarity)`, in the order of
/// their first neighbour, each with its best similarity and the positions of its neighbours.
/// Neighbours without an individual are left out. (With query expansion the ranking is the
/// expanded query's while similarities are the photo's own, so a later neighbour of an
/// individual can be its best.)
pub fn by_individual<'a>(ranked: impl IntoIterator<Item = (Option<&'a str>, f32)>) -> Vec<(String, f32, Vec<usize>)> {
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut out: Vec<(String, f32, Vec<usize>)> = Vec::new();
    for (pos, (ind, sim)) in ranked.into_iter().enumerate() {
        let Some(i) = ind else { continue };
        match at.get(i) {
            Some(&j) => {
                out[j].1 = out[j].1.max(sim);
                out[j].2.push(pos);
            }
            None => {
                at.insert(i, out.len());
                out.push((i.to_string(), sim, vec![pos]));
            }
        }
    }
    out
}

/// Whether the table has the index the `index` stage builds.
pub async fn has_index(ds: &Dataset) -> Result<bool> {
    let indices = ds.load_indices().await.map_err(|e| Error::Other(format!("loading indices: {e}")))?;
    Ok(indices.iter().any(|i| i.name == INDEX_NAME))
}

/// Lance's `index_statistics` of the table's vector index, None without one.
pub async fn index_statistics(ds: &Dataset) -> Result<Option<serde_json::Value>> {
    if !has_index(ds).await? {
        return Ok(None);
    }
    let stats = ds.index_statistics(INDEX_NAME).await.map_err(|e| Error::Other(format!("index statistics: {e}")))?;
    Ok(Some(serde_json::from_str(&stats).map_err(|e| Error::Other(format!("index statistics: {e}")))?))
}

/// The index type in `index_statistics` (`ivf_hnsw_sq`, `ivf_pq`; empty when unnamed).
pub fn index_type(stats: &serde_json::Value) -> String {
    stats.get("index_type").and_then(|x| x.as_str()).unwrap_or("").to_ascii_lowercase()
}

/// The type of the table's vector index (`ivf_hnsw_sq`, `ivf_pq`), None without one.
pub async fn index_kind(ds: &Dataset) -> Result<Option<String>> {
    Ok(index_statistics(ds).await?.as_ref().map(index_type))
}

/// The `k` nearest rows to `query` in `ds` (its `embedding` column), nearest first.
pub async fn nearest(ds: &Dataset, query: &[f32], k: usize, p: &SearchParams) -> Result<Vec<Hit>> {
    Ok(search_table(ds, query, k, p, false).await?.0)
}

/// A table's embeddings in memory, for exact search: one pass of the dot-product kernels over
/// all rows, far cheaper than Lance's exact scan (`benches/vector.rs`). What `submit` and
/// `serve` search when the table has no index.
pub struct InMemory {
    set: Arc<EmbeddingSet>,
    rows: UnitRows,
}

impl InMemory {
    pub fn new(set: Arc<EmbeddingSet>) -> InMemory {
        let rows = UnitRows::new(&set.values, set.dim);
        InMemory { set, rows }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Cosine similarity of `query` (of the rows' length) to every row, in row order.
    pub fn similarities(&self, query: &[f32]) -> Vec<f32> {
        self.rows.similarities(query)
    }

    /// The `k` most similar rows to `query`, nearest first (ties: row order), each with its
    /// embedding when `vectors` is asked for.
    pub fn search(&self, query: &[f32], k: usize, vectors: bool) -> Result<(Vec<Hit>, Vec<Vec<f32>>)> {
        if query.len() != self.rows.dim() {
            return Err(Error::Other(format!("the query has {} values; the table's embeddings have {}", query.len(), self.rows.dim())));
        }
        let sims = self.similarities(query);
        let mut order: Vec<u32> = (0..sims.len() as u32).filter(|&i| sims[i as usize].is_finite()).collect();
        let by = |a: &u32, b: &u32| sims[*b as usize].total_cmp(&sims[*a as usize]).then(a.cmp(b));
        let k = k.min(order.len());
        if k == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by);
            order.truncate(k);
        }
        order.sort_unstable_by(by);
        let set = &self.set;
        let hits = order
            .iter()
            .map(|&i| {
                let i = i as usize;
                Hit { photo_id: set.photo_ids[i].clone(), uri: set.uris[i].clone(), individual_id: set.labels[i].clone(), distance: 1.0 - sims[i] }
            })
            .collect();
        let vectors = if vectors { order.iter().map(|&i| set.row(i as usize).to_vec()).collect() } else { Vec::new() };
        Ok((hits, vectors))
    }
}

/// Where neighbours are found.
#[derive(Clone)]
pub enum Source {
    /// The Lance table: through its index with these settings, or by Lance's exact scan.
    Table(Arc<Dataset>, SearchParams),
    /// Exact search over the embeddings in memory.
    Memory(Arc<InMemory>),
}

impl Source {
    /// For many questions to `ds` (named `table`): its index with its measured settings and
    /// `over` on top; without an index, its embeddings in memory (`memory`, or read now).
    pub async fn for_serving(ds: Arc<Dataset>, table: &str, over: &SearchOverrides, memory: Option<Arc<InMemory>>) -> Result<Source> {
        if let Some(kind) = index_kind(&ds).await? {
            let p = over.apply(SearchParams::for_index(Some(&kind)));
            return Ok(Source::Table(ds, p));
        }
        match memory {
            Some(m) => Ok(Source::Memory(m)),
            None => Ok(Source::Memory(Arc::new(InMemory::new(Arc::new(crate::tables::read_set(&ds, table).await?))))),
        }
    }

    /// What the source is, for logs and summaries.
    pub fn describe(&self) -> String {
        match self {
            Source::Table(_, p) if p.exact => "exact search (Lance scan)".into(),
            Source::Table(_, p) => format!(
                "vector index (nprobes {}, refine {}, ef {})",
                p.nprobes.map(|n| n.to_string()).unwrap_or("auto".into()),
                p.refine.map(|n| n.to_string()).unwrap_or("none".into()),
                p.ef.map(|n| n.to_string()).unwrap_or("auto".into())
            ),
            Source::Memory(m) => format!("exact search in memory over {} rows", m.len()),
        }
    }

    async fn search(&self, query: &[f32], k: usize, vectors: bool) -> Result<(Vec<Hit>, Vec<Vec<f32>>)> {
        match self {
            Source::Table(ds, p) => search_table(ds, query, k, p, vectors).await,
            Source::Memory(m) => {
                // A full pass over the rows: off the async workers.
                let (m, q) = (m.clone(), query.to_vec());
                tokio::task::spawn_blocking(move || m.search(&q, k, vectors)).await.map_err(|e| Error::Other(format!("exact search panicked: {e}")))?
            }
        }
    }
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
pub async fn similar(src: &Source, query: &[f32], k: usize, x: Expansion, skip: Option<&str>) -> Result<Vec<Hit>> {
    let keep = |h: &Hit| skip.is_none_or(|s| h.uri != s);
    let extra = usize::from(skip.is_some());
    if x.k == 0 {
        return Ok(src.search(query, k + extra, false).await?.0.into_iter().filter(keep).take(k).collect());
    }
    let (first, vectors) = src.search(query, x.k + extra, true).await?;
    let neighbours = first.iter().zip(&vectors).filter(|(h, _)| keep(h)).take(x.k).map(|(h, v)| (h.similarity(), v.as_slice()));
    let expanded = metrics::expand_query(query, neighbours, x.alpha);
    let (hits, vectors) = src.search(&expanded, k + extra, true).await?;
    Ok(hits.into_iter().zip(vectors).filter(|(h, _)| keep(h)).take(k).map(|(h, v)| Hit { distance: 1.0 - metrics::cosine(query, &v), ..h }).collect())
}

/// One search of the Lance table; with `vectors`, the embedding of every hit too.
async fn search_table(ds: &Dataset, query: &[f32], k: usize, p: &SearchParams, vectors: bool) -> Result<(Vec<Hit>, Vec<Vec<f32>>)> {
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
    let dist = column(&batch, "_distance")?.as_primitive::<Float32Type>().clone();
    let hits = (0..batch.num_rows()).map(|i| Ok(Hit { distance: dist.value(i), ..hit_at(&batch, i)? })).collect::<Result<Vec<_>>>()?;
    let vectors = if vectors { (0..batch.num_rows()).map(|i| vector_at(&batch, i)).collect::<Result<_>>()? } else { Vec::new() };
    Ok((hits, vectors))
}

fn column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a Arc<dyn Array>> {
    b.column_by_name(name).ok_or_else(|| Error::Other(format!("search result lacks `{name}`")))
}

/// Row `i` of a result with `photo_id`, `uri` and `individual_id`, at distance 0.
fn hit_at(b: &RecordBatch, i: usize) -> Result<Hit> {
    let s = |name: &str| -> Result<_> { column(b, name)?.as_string_opt::<i32>().ok_or_else(|| Error::Other(format!("`{name}` is not a string column"))) };
    let ind = s("individual_id")?;
    Ok(Hit {
        photo_id: s("photo_id")?.value(i).to_string(),
        uri: s("uri")?.value(i).to_string(),
        individual_id: (ind.is_valid(i) && !ind.value(i).is_empty()).then(|| ind.value(i).to_string()),
        distance: 0.0,
    })
}

/// The `embedding` of row `i` of a result.
fn vector_at(b: &RecordBatch, i: usize) -> Result<Vec<f32>> {
    let list = column(b, "embedding")?.as_fixed_size_list_opt().ok_or_else(|| Error::Other("`embedding` is not a vector column".into()))?;
    Ok(list.value(i).as_primitive::<Float32Type>().values().to_vec())
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
    Ok(Some((vector_at(&b, 0)?, hit_at(&b, 0)?)))
}

/// Photo id and URI → row of one version of an embeddings table, read once (two string
/// columns), so that finding a photo is one take of its row instead of a filtered scan of the
/// table (a server keeps one per version it serves). A photo id two rows share (two sources)
/// finds the first of them, as [`embedding_of`] does; an id is looked up as a photo id first,
/// then as a URI.
#[derive(Debug, Default)]
pub struct RowIndex {
    by_id: HashMap<String, u64>,
    by_uri: HashMap<String, u64>,
}

impl RowIndex {
    pub async fn build(ds: &Dataset) -> Result<RowIndex> {
        let lerr = |e: lance::Error| Error::Other(format!("indexing the photos of {}: {e}", ds.uri()));
        let mut scan = ds.scan();
        scan.project(&["photo_id", "uri"]).map_err(lerr)?;
        scan.with_row_id();
        let mut stream = scan.try_into_stream().await.map_err(lerr)?;
        let mut ix = RowIndex::default();
        while let Some(b) = stream.try_next().await.map_err(lerr)? {
            let (ids, uris) = (column(&b, "photo_id")?.as_string::<i32>(), column(&b, "uri")?.as_string::<i32>());
            let rows = column(&b, "_rowid")?
                .as_primitive_opt::<arrow::datatypes::UInt64Type>()
                .ok_or_else(|| Error::Other("`_rowid` is not a u64 column".into()))?;
            for i in 0..b.num_rows() {
                ix.by_id.entry(ids.value(i).to_string()).or_insert(rows.value(i));
                ix.by_uri.entry(uris.value(i).to_string()).or_insert(rows.value(i));
            }
        }
        Ok(ix)
    }

    /// The row of the photo with this id (else this URI).
    pub fn row(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).or_else(|| self.by_uri.get(id)).copied()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// `columns` of the photo with this id (else this URI) in `ds`, the version it was built
    /// from: one row, or None.
    pub async fn take(&self, ds: &Dataset, id: &str, columns: &[&str]) -> Result<Option<RecordBatch>> {
        let Some(row) = self.row(id) else { return Ok(None) };
        let lerr = |e: lance::Error| Error::Other(format!("lookup of `{id}`: {e}"));
        let schema = ds.schema().project(columns).map_err(lerr)?;
        Ok(Some(ds.take_rows(&[row], schema).await.map_err(lerr)?))
    }

    /// What [`embedding_of`] answers, by one take.
    pub async fn embedding_of(&self, ds: &Dataset, id: &str) -> Result<Option<(Vec<f32>, Hit)>> {
        match self.take(ds, id, &["photo_id", "uri", "individual_id", "embedding"]).await? {
            Some(b) if b.num_rows() == 1 => Ok(Some((vector_at(&b, 0)?, hit_at(&b, 0)?))),
            _ => Ok(None),
        }
    }
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
    pub lake: crate::Lake,
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
        let p = SearchParams::for_table(&ds, &SearchOverrides::default()).await?;
        let hits = similar(&Source::Table(Arc::new(ds), p), &vector, k, Expansion::OFF, exclude.as_deref()).await?;
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
