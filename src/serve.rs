//! `pipeline serve`: the HTTP JSON API over an embeddings table.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok","table":..,"rows":..,"model_id":..}` |
//! | `GET /models` | the `models` registry (without configs) |
//! | `GET /similar/{photo_id}?k=20` | neighbours of a photo of the collection; 404 when unknown |
//! | `POST /similar?k=20` (image body) | neighbours of a new photo; 400 when it is not an image, 413 over the size limit |
//! | `GET /photos/{photo_id}/thumbnail?side=256` | a JPEG, longest side `side` (32..2048) |
//! | `GET /photos/{photo_id}/image` | the photo's own bytes (the review page's full-resolution zoom) |
//! | `GET /review` | the review page (HTML; it asks for a token when the API needs one) |
//! | `GET /review/queue?limit=200` | photos awaiting a decision, newest first, and how many in all |
//! | `GET /review/photos/{photo_id}?individuals=5` | what is proposed for a photo: candidate individuals with their closest photos, its crop, its decisions |
//! | `GET /review/boxes?limit=200` | photos whose boxes to draw or correct: the detector's least sure first, without a drawn box |
//! | `POST /boxes` (JSON) | records a drawn box: `{"photo_id", "box": [x0, y0, x1, y1]}` (fractions of the frame), or `{"photo_id", "no_subject": true}`; 201 |
//! | `POST /decisions` (JSON) | records a decision: `{"photo_id", "decision": same\|new\|unsure\|bad\|undo, "individual_id", "model_id", "proposal"}`; 201 |
//!
//! Both `/similar` routes take `expand` and `alpha` (α-query expansion) and `geometric=N`: the
//! first N neighbours re-scored by local features verified with RANSAC ([`answer::local`]);
//! each then carries its `inliers`, and the answer says how it was re-ranked (`geometric`).
//!
//! Loopback only unless told otherwise. The model is loaded once and lives on one worker
//! thread; concurrent uploads queue there and are embedded together in one forward pass.
//!
//! Under load or abuse ([`Limits`], kept middleware from tower and tower-http): every request
//! has a time limit (503 past it), a request body that arrives too slowly is cut (408), at
//! most `uploads` uploads are decoded at once and one more is turned away at once (503 with
//! `Retry-After`), as is a photo when the model thread's queue is full; an upload's pixels are
//! limited (`max_upload_pixels`, 413) and decoded once. Lookups by id never wait behind
//! uploads. Error bodies say what was wrong with the request, never where the lake is; a
//! failure inside is logged and answered with its id. With `--token-file` every route but
//! `/healthz` and the review page itself needs `Authorization: Bearer <token>` (401 otherwise);
//! a decision records the token's name, and a `read-only` token may browse but not decide (403).
//! Without tokens (loopback) a decision records the `who` it gives, else `local`.
//!
//! It follows the lake: every `--refresh` seconds it looks for a new version of the table (a
//! nightly run's new photos, or the collection re-embedded with a newly promoted model) and
//! swaps to it, and to its model, without a restart; requests in flight finish on what they
//! started with ([`Service::refresh`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tower::ServiceBuilder;
use vision::DecodeLimits;

use answer::{self, Service};
use lake::vector::Expansion;
use lake::{Error, Result};

/// `?k=20&expand=5&alpha=3&geometric=10`: neighbours wanted, α-query expansion (off unless
/// `expand`), geometric re-ranking of the first `geometric` (off unless given).
#[derive(Deserialize)]
struct KParam {
    k: Option<usize>,
    expand: Option<usize>,
    alpha: Option<f32>,
    /// Geometric re-ranking of the first N neighbours (answer::local).
    geometric: Option<usize>,
}

/// What the API takes on at once, and who may use it.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest upload, in bytes (413 above).
    pub max_body: usize,
    /// Largest upload in pixels, from its header, before anything is decoded (413 above).
    pub max_upload_pixels: u64,
    /// Longest a request may take, from its first byte to its answer (503 past it).
    pub timeout: Duration,
    /// Longest an upload's body may take to arrive (408 past it: a client too slow to send).
    pub body_timeout: Duration,
    /// Uploads decoded and embedded at once; one more is answered 503 at once.
    pub uploads: usize,
    /// Bearer tokens, when the API needs one.
    pub tokens: Option<Arc<Tokens>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 20 << 20,
            // Every phone and most cameras (a 50 MP photo); a PNG that large decodes to 150 MB.
            max_upload_pixels: 50_000_000,
            timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
            uploads: 4,
            tokens: None,
        }
    }
}

/// The bearer tokens of `--token-file`: one `NAME TOKEN` per line, or `NAME TOKEN read-only`
/// for one that may browse but not decide (`#` begins a comment); only their BLAKE3 hashes are
/// kept, compared in constant time.
#[derive(Debug)]
pub struct Tokens(Vec<(String, blake3::Hash, bool)>);

/// Who made a request: a token's holder, and whether that token may record decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub name: String,
    pub may_decide: bool,
}

/// Shortest token accepted: guessing one must not be practical.
const MIN_TOKEN: usize = 16;

impl Tokens {
    /// Reads a token file; a line that is not `NAME TOKEN`, a token shorter than 16
    /// characters or a name given twice is an error naming the line.
    pub fn load(path: &FsPath) -> Result<Tokens> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Tokens::parse(&text).map_err(|e| Error::Other(format!("token file {}: {e}", path.display())))
    }

    fn parse(text: &str) -> std::result::Result<Tokens, String> {
        let mut out: Vec<(String, blake3::Hash, bool)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (name, token, may_decide) = match parts[..] {
                [name, token] => (name, token, true),
                [name, token, "read-only"] => (name, token, false),
                [_, _, other] => return Err(format!("line {}: expected `NAME TOKEN` or `NAME TOKEN read-only`, found `{other}`", n + 1)),
                _ => return Err(format!("line {}: expected `NAME TOKEN` (or `NAME TOKEN read-only`), found {} words", n + 1, parts.len())),
            };
            if token.len() < MIN_TOKEN {
                return Err(format!("line {} (`{name}`): the token has {} characters; at least {MIN_TOKEN}", n + 1, token.len()));
            }
            if out.iter().any(|(k, _, _)| k == name) {
                return Err(format!("line {}: `{name}` is given twice", n + 1));
            }
            out.push((name.to_string(), blake3::hash(token.as_bytes()), may_decide));
        }
        if out.is_empty() {
            return Err("no tokens (one `NAME TOKEN` per line)".into());
        }
        Ok(Tokens(out))
    }

    /// The holder of `token`, if it is one of these.
    pub fn holder(&self, token: &str) -> Option<Holder> {
        let h = blake3::hash(token.as_bytes());
        // blake3::Hash compares in constant time; every entry is compared.
        self.0
            .iter()
            .fold(None, |found, (name, t, may_decide)| if *t == h { Some(Holder { name: name.clone(), may_decide: *may_decide }) } else { found })
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

struct Api {
    service: Arc<Service>,
    limits: Limits,
    /// The served table's photos without a label, newest first: read once per version of it.
    unlabelled: tokio::sync::Mutex<Option<(u64, Arc<Vec<answer::review::Waiting>>)>>,
    /// Those awaiting a decision, made again (in memory) once per version of either table.
    queue: tokio::sync::Mutex<Option<((u64, Option<u64>), Arc<Vec<answer::review::Waiting>>)>>,
    /// Every decision by photo, brought up to date by reading only what was appended since.
    decisions: tokio::sync::Mutex<Arc<lake::decisions::History>>,
    /// The crops of the served model (answer::local::model_crops), by model id.
    crops: tokio::sync::Mutex<Option<(String, Arc<HashMap<String, [f32; 4]>>)>>,
    /// The served model's detections least sure first (the box queue before drawn boxes), by
    /// model id, read again when its detections table changes.
    boxes: tokio::sync::Mutex<Option<(String, Arc<answer::review::BoxCandidates>)>>,
    /// Table `proposals` by photo, made once per version of it.
    proposals: tokio::sync::Mutex<Arc<answer::review::ProposalIndex>>,
}

type Shared = Arc<Api>;

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// A failure inside the server: logged with an id; the client gets the id, not the details
/// (which can name the lake's paths).
fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
    tracing::error!(error_id = %id, "{what}: {e}");
    err(StatusCode::INTERNAL_SERVER_ERROR, format!("{what} failed (error id {id} in the server's log)"))
}

/// 503 with `Retry-After`: busy now, not broken.
fn busy(msg: impl Into<String>) -> Response {
    let mut r = err(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn k_of(p: &KParam) -> std::result::Result<(usize, Expansion), Response> {
    let k = match p.k {
        None => 20,
        Some(k) if (1..=1000).contains(&k) => k,
        Some(k) => return Err(err(StatusCode::BAD_REQUEST, format!("k = {k}: must be 1..1000"))),
    };
    let expand = match p.expand {
        None => 0,
        Some(e) if e <= 100 => e,
        Some(e) => return Err(err(StatusCode::BAD_REQUEST, format!("expand = {e}: must be 0..100"))),
    };
    let alpha = match p.alpha {
        None => Expansion::OFF.alpha,
        Some(a) if (0.0..=100.0).contains(&a) => a,
        Some(a) => return Err(err(StatusCode::BAD_REQUEST, format!("alpha = {a}: must be 0..100"))),
    };
    Ok((k, Expansion { k: expand, alpha }))
}

fn geo_of(p: &KParam) -> std::result::Result<answer::local::GeoOptions, Response> {
    match p.geometric {
        None => Ok(answer::local::GeoOptions::first(0)),
        Some(g) if g <= 100 => Ok(answer::local::GeoOptions::first(g)),
        Some(g) => Err(err(StatusCode::BAD_REQUEST, format!("geometric = {g}: must be 0..100"))),
    }
}

async fn healthz(State(api): State<Shared>) -> Response {
    let s = &api.service;
    let now = s.now();
    let rows = now.ds.count_rows(None).await.unwrap_or(0);
    Json(serde_json::json!({
        "status": "ok",
        "table": s.table,
        "version": now.version,
        "rows": rows,
        "model_id": now.model_id,
        "uploads": now.embedder.is_some(),
    }))
    .into_response()
}

async fn models(State(api): State<Shared>) -> Response {
    let s = &api.service;
    let sql = "SELECT model_id, kind, backbone, embedding_dim, input_size, best_epoch, best_map_at_20, checkpoint_uri, \
               CAST(created_at AS VARCHAR) AS created_at FROM models ORDER BY created_at DESC";
    match lake::query::query(&s.lake, sql).await {
        Ok((schema, batches)) => {
            let mut out = Vec::new();
            if let Err(e) = lake::query::write(lake::query::Format::Json, &schema, &batches, &mut out) {
                return internal("encoding the models", e);
            }
            ([(header::CONTENT_TYPE, "application/json")], out).into_response()
        }
        Err(_) if matches!(s.lake.open("models").await, Ok(None)) => err(StatusCode::NOT_FOUND, "this lake has no models yet"),
        Err(e) => internal("reading the models", e),
    }
}

async fn similar_id(State(api): State<Shared>, Path(id): Path<String>, Query(p): Query<KParam>) -> Response {
    let s = &api.service;
    let (k, x) = match k_of(&p) {
        Ok(kx) => kx,
        Err(r) => return r,
    };
    let geo = match geo_of(&p) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let now = s.now();
    let found = match now.embedding_of(&id).await {
        Ok(f) => f,
        Err(e) => return internal("the lookup", e),
    };
    let Some(found) = found else { return err(StatusCode::NOT_FOUND, format!("no photo `{id}` in `{}`", s.table)) };
    match answer::similar_to_found(&now.ds, &now.source, found, k, x).await {
        Ok(mut a) => match answer::rerank_geometric(&s.lake, &mut a, None, geo).await {
            Ok(()) => Json(a).into_response(),
            Err(e) => internal("the geometric re-ranking", e),
        },
        Err(e) => internal("the search", e),
    }
}

async fn similar_upload(State(api): State<Shared>, Query(p): Query<KParam>, body: Bytes) -> Response {
    let s = &api.service;
    let (k, x) = match k_of(&p) {
        Ok(kx) => kx,
        Err(r) => return r,
    };
    let geo = match geo_of(&p) {
        Ok(g) => g,
        Err(r) => return r,
    };
    if body.is_empty() {
        return err(StatusCode::BAD_REQUEST, "empty body: POST the image bytes (JPEG, PNG, TIFF, WebP, GIF or BMP)");
    }
    let now = s.now();
    let Some(embedder) = &now.embedder else {
        let why = now.no_embedder.clone().unwrap_or_default();
        return err(StatusCode::SERVICE_UNAVAILABLE, format!("no model can embed new photos for this table: {why}"));
    };
    let limits = DecodeLimits { max_pixels: api.limits.max_upload_pixels };
    let view = (geo.k > 0).then_some(geo.side);
    let (v, seen) = match embedder.embed_bytes_viewing(body.to_vec(), limits, view).await {
        Ok(v) => v,
        Err(Error::BadImage(m)) if m.contains("over the decode limit") => {
            let m = m.replace("the decode limit", "this server's upload limit");
            return err(StatusCode::PAYLOAD_TOO_LARGE, format!("image too large: {m}"));
        }
        Err(Error::BadImage(m)) => return err(StatusCode::BAD_REQUEST, format!("not a readable image: {m}")),
        Err(Error::Overloaded(m)) => return busy(format!("busy: {m}; try again shortly")),
        Err(e) => return internal("embedding the upload", e),
    };
    match answer::similar_to_vector(&now.ds, &now.source, "upload", &v, k, x).await {
        Ok(mut a) => match seen {
            Some(px) => match answer::rerank_geometric(&s.lake, &mut a, Some(px), geo).await {
                Ok(()) => Json(a).into_response(),
                Err(e) => internal("the geometric re-ranking", e),
            },
            None => Json(a).into_response(),
        },
        Err(e) => internal("the search", e),
    }
}

/// Where photo `id` of the served table is (its URI) and its bytes' content hash (None for a
/// table that does not record it); the error answer when the table has no such photo.
async fn photo_of(api: &Api, id: &str) -> std::result::Result<(String, Option<String>), Response> {
    let s = &api.service;
    let now = s.now();
    let hashed = now.ds.schema().field("content_hash").is_some();
    let columns: &[&str] = if hashed { &["uri", "content_hash"] } else { &["uri"] };
    let row = match now.rows.take(&now.ds, id, columns).await {
        Ok(Some(b)) if b.num_rows() == 1 => b,
        Ok(_) => return Err(err(StatusCode::NOT_FOUND, format!("no photo `{id}` in `{}`", s.table))),
        Err(e) => return Err(internal("the lookup", e)),
    };
    let c = lake::tables::Columns::new(&s.table, &row);
    let uri = c.strings("uri").map_err(|e| internal("the lookup", e))?.value(0).to_string();
    let hash = if hashed { c.strings("content_hash").map_err(|e| internal("the lookup", e))?.iter().next().flatten().map(str::to_string) } else { None };
    Ok((uri, hash))
}

/// The bytes of the photo at `uri` (photo `id`); the error answer when they cannot be read.
async fn photo_bytes(api: &Api, id: &str, uri: &str, what: &str) -> std::result::Result<Vec<u8>, Response> {
    let s = &api.service;
    answer::read_photo(&s.lake.locate(uri), s.lake.options()).await.map_err(|e| {
        tracing::warn!("{what} of `{id}`: {e}");
        err(StatusCode::NOT_FOUND, format!("photo `{id}` cannot be read from the collection (moved or deleted?)"))
    })
}

#[derive(Deserialize)]
struct SideParam {
    side: Option<u32>,
}

async fn thumbnail(State(api): State<Shared>, Path(id): Path<String>, Query(p): Query<SideParam>) -> Response {
    let side = match p.side {
        None => 256,
        Some(s) if (32..=2048).contains(&s) => s,
        Some(s) => return err(StatusCode::BAD_REQUEST, format!("side = {s}: must be 32..2048")),
    };
    let (uri, hash) = match photo_of(&api, &id).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let lake = &api.service.lake;
    let jpeg = |jpg: Vec<u8>| ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "private, max-age=3600")], jpg).into_response();
    // Made before (by this server or another): read back, not decoded again.
    if let Some(h) = &hash {
        match lake::thumbnails::get(lake, h, side).await {
            Ok(Some(jpg)) => return jpeg(jpg),
            Ok(None) => {}
            Err(e) => tracing::warn!("thumbnail of `{id}` from the lake: {e}"),
        }
    }
    let bytes = match photo_bytes(&api, &id, &uri, "thumbnail").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match tokio::task::spawn_blocking(move || answer::thumbnail(&bytes, side)).await {
        Ok(Ok(jpg)) => {
            if let Some(h) = &hash {
                // Kept for the next request; a lake this server cannot write to only costs a decode.
                if let Err(e) = lake::thumbnails::put(lake, h, side, jpg.clone()).await {
                    tracing::warn!("keeping the thumbnail of `{id}`: {e}");
                }
            }
            jpeg(jpg)
        }
        Ok(Err(e)) => err(StatusCode::UNPROCESSABLE_ENTITY, format!("photo `{id}`: {e}")),
        Err(e) => internal("the thumbnail", e),
    }
}

/// The photo's own bytes, with the type its first bytes say (the review page's zoom).
async fn photo_image(State(api): State<Shared>, Path(id): Path<String>) -> Response {
    let uri = match photo_of(&api, &id).await {
        Ok((u, _)) => u,
        Err(r) => return r,
    };
    let bytes = match photo_bytes(&api, &id, &uri, "image").await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let kind = match &bytes[..bytes.len().min(12)] {
        [0xFF, 0xD8, ..] => "image/jpeg",
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [b'G', b'I', b'F', ..] => "image/gif",
        [b'B', b'M', ..] => "image/bmp",
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P'] => "image/webp",
        [b'I', b'I', 42, 0, ..] | [b'M', b'M', 0, 42, ..] => "image/tiff",
        _ => "application/octet-stream",
    };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "private, max-age=3600")], bytes).into_response()
}

/// The review page: one HTML file with its CSS and script, compiled into the binary.
async fn review_page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("review.html")).into_response()
}

#[derive(Deserialize)]
struct QueueParam {
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `?limit=` of a queue: 200 unless given, 1..10000.
fn limit_of(p: &QueueParam) -> std::result::Result<usize, Response> {
    match p.limit {
        None => Ok(200),
        Some(l) if (1..=10_000).contains(&l) => Ok(l),
        Some(l) => Err(err(StatusCode::BAD_REQUEST, format!("limit = {l}: must be 1..10000"))),
    }
}

/// Every decision by photo, up to date: what was appended since the last request is read, no
/// more (lake::decisions::History).
async fn decisions(api: &Api) -> std::result::Result<Arc<lake::decisions::History>, Response> {
    let mut held = api.decisions.lock().await;
    // Copied only when a request still holds the previous one.
    let h = Arc::make_mut(&mut held);
    match h.refresh(&api.service.lake).await {
        Ok(_) => Ok(held.clone()),
        Err(e) => {
            *held = Default::default();
            Err(internal("reading the decisions", e))
        }
    }
}

/// Photos awaiting a decision, newest first: `{"total", "offset", "photos": [{photo_id,
/// ingested_at}], "model_id"}`. Made once per version of the table and of `decisions`.
async fn review_queue(State(api): State<Shared>, Query(p): Query<QueueParam>) -> Response {
    let s = &api.service;
    let limit = match limit_of(&p) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let offset = p.offset.unwrap_or(0);
    let now = s.now();
    let decided = match decisions(&api).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let key = (now.version, decided.version);
    let queue = {
        let mut cached = api.queue.lock().await;
        match &*cached {
            Some((k, q)) if *k == key => q.clone(),
            _ => {
                let unlabelled = {
                    let mut u = api.unlabelled.lock().await;
                    match &*u {
                        Some((v, list)) if *v == now.version => list.clone(),
                        _ => match answer::review::unlabelled(&s.lake, &now.ds, &s.table).await {
                            Ok(list) => {
                                let list = Arc::new(list);
                                *u = Some((now.version, list.clone()));
                                list
                            }
                            Err(e) => return internal("the review queue", e),
                        },
                    }
                };
                let q = Arc::new(answer::review::awaiting(&unlabelled, &decided));
                *cached = Some((key, q.clone()));
                q
            }
        }
    };
    let page: Vec<_> = queue.iter().skip(offset).take(limit).collect();
    Json(serde_json::json!({ "total": queue.len(), "offset": offset, "photos": page, "model_id": now.model_id })).into_response()
}

#[derive(Deserialize)]
struct ReviewParam {
    individuals: Option<usize>,
}

/// What is proposed for a photo ([`answer::review::Proposal`]).
async fn review_photo(State(api): State<Shared>, Path(id): Path<String>, Query(p): Query<ReviewParam>) -> Response {
    let s = &api.service;
    let n = match p.individuals {
        None => 5,
        Some(n) if (1..=20).contains(&n) => n,
        Some(n) => return err(StatusCode::BAD_REQUEST, format!("individuals = {n}: must be 1..20")),
    };
    let now = s.now();
    let crops = {
        let mut cached = api.crops.lock().await;
        match &*cached {
            Some((m, c)) if *m == now.model_id => c.clone(),
            _ => match answer::local::model_crops(&s.lake, &now.model_id).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    *cached = Some((now.model_id.clone(), c.clone()));
                    c
                }
                Err(e) => return internal("reading the model's crops", e),
            },
        }
    };
    let proposals = {
        let mut cached = api.proposals.lock().await;
        let version = match answer::review::ProposalIndex::version_now(&s.lake).await {
            Ok(v) => v,
            Err(e) => return internal("reading the proposals", e),
        };
        if cached.version != version {
            match answer::review::ProposalIndex::load(&s.lake).await {
                Ok(p) => *cached = Arc::new(p),
                Err(e) => return internal("reading the proposals", e),
            }
        }
        cached.clone()
    };
    let decided = match decisions(&api).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    match answer::review::proposal(&now, &id, n, &crops, &proposals, &decided).await {
        Ok(Some(p)) => Json(p).into_response(),
        Ok(None) => err(StatusCode::NOT_FOUND, format!("no photo `{id}` in `{}`", s.table)),
        Err(e) => internal("the proposal", e),
    }
}

/// Photos whose boxes to draw or correct, least sure first: `{"total", "detector_id",
/// "photos": [{photo_id, score, box}]}` (empty when the model reads whole photos).
async fn review_boxes(State(api): State<Shared>, Query(p): Query<QueueParam>) -> Response {
    let s = &api.service;
    let limit = match limit_of(&p) {
        Ok(l) => l,
        Err(r) => return r,
    };
    let now = s.now();
    // The detector's detections, least sure first: read again when the model or its
    // detections change, not on every request.
    let all = {
        let mut cached = api.boxes.lock().await;
        let current = match cached.as_ref() {
            Some((m, c)) if *m == now.model_id => match &c.table {
                Some((t, v)) => match s.lake.version(t).await {
                    Ok(now_v) => now_v == Some(*v),
                    Err(e) => return internal("the box queue", e),
                },
                None => true,
            },
            _ => false,
        };
        if !current {
            match answer::review::box_candidates(&s.lake, &now.model_id).await {
                Ok(c) => *cached = Some((now.model_id.clone(), Arc::new(c))),
                Err(e) => return internal("the box queue", e),
            }
        }
        cached.as_ref().map(|(_, c)| c.clone()).unwrap_or_default()
    };
    let drawn = match lake::boxes::latest(&s.lake).await {
        Ok(d) => d,
        Err(e) => return internal("reading the drawn boxes", e),
    };
    let q = answer::review::without_drawn(&all, &drawn);
    let page: Vec<_> = q.iter().skip(p.offset.unwrap_or(0)).take(limit).collect();
    Json(serde_json::json!({ "total": q.len(), "detector_id": all.detector, "photos": page, "model_id": now.model_id })).into_response()
}

/// Who a writing request acts for: the token's holder (403 for a read-only token), or, without
/// tokens, `asked` else `local`.
fn writer(api: &Api, holder: Option<Holder>, asked: Option<&str>) -> std::result::Result<String, Response> {
    match (&api.limits.tokens, holder) {
        (Some(_), Some(h)) if !h.may_decide => Err(err(StatusCode::FORBIDDEN, format!("the token of `{}` is read-only: it may browse, not decide", h.name))),
        (Some(_), Some(h)) => Ok(h.name),
        (Some(_), None) => Err(err(StatusCode::UNAUTHORIZED, "this API needs `Authorization: Bearer <token>`")),
        (None, _) => Ok(asked.filter(|w| !w.trim().is_empty()).unwrap_or("local").to_string()),
    }
}

/// A writing request's JSON body and who it acts for ([`writer`]; `asked` reads the body's own
/// `who`), or the answer that says what is wrong (400, 401, 403).
async fn writing<T: serde::de::DeserializeOwned>(
    api: &Api,
    req: Request,
    what: &str,
    example: &str,
    asked: impl Fn(&T) -> Option<&str>,
) -> std::result::Result<(String, T), Response> {
    let holder = req.extensions().get::<Holder>().cloned();
    let body = axum::body::to_bytes(req.into_body(), 64 << 10).await.map_err(|e| err(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}")))?;
    let t: T = serde_json::from_slice(&body).map_err(|e| err(StatusCode::BAD_REQUEST, format!("not {what} ({e}): send JSON {example}")))?;
    Ok((writer(api, holder, asked(&t))?, t))
}

/// The answer to a row appended for a writing request: 201 with the row, or the failure logged.
fn created<T: serde::Serialize>(appended: Result<()>, row: T, what: &str) -> Response {
    match appended {
        Ok(()) => (StatusCode::CREATED, Json(row)).into_response(),
        Err(e) => internal(&format!("recording the {what}"), e),
    }
}

/// Whether the served table has photo `id`: None when it does, else the answer to give.
fn unknown_photo(api: &Api, id: &str) -> Option<Response> {
    let s = &api.service;
    match s.now().rows.row(id) {
        Some(_) => None,
        None => Some(err(StatusCode::NOT_FOUND, format!("no photo `{id}` in `{}`", s.table))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BoxBody {
    photo_id: String,
    #[serde(rename = "box")]
    bbox: Option<[f32; 4]>,
    /// True: the photo shows no subject at all (then no `box`).
    no_subject: Option<bool>,
    who: Option<String>,
}

/// Records a box drawn on the review page (lake::boxes): 201 with the row; 400 when it is not a
/// box inside the frame, 403 for a read-only token, 404 for a photo the table does not have.
async fn draw_box(State(api): State<Shared>, req: Request) -> Response {
    let (who, b) = match writing::<BoxBody>(&api, req, "a box", "{\"photo_id\", \"box\": [x0, y0, x1, y1]}", |b| b.who.as_deref()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let d = match (b.bbox, b.no_subject.unwrap_or(false)) {
        (Some(bbox), false) => lake::boxes::DrawnBox::new(&b.photo_id, bbox, &who),
        (None, true) => lake::boxes::DrawnBox::no_subject(&b.photo_id, &who),
        (Some(_), true) => return err(StatusCode::BAD_REQUEST, format!("photo `{}`: a box and `no_subject` contradict each other; send one", b.photo_id)),
        (None, false) => return err(StatusCode::BAD_REQUEST, format!("photo `{}`: send a `box` [x0, y0, x1, y1], or `\"no_subject\": true`", b.photo_id)),
    };
    let d = match d {
        Ok(d) => d,
        Err(e) => return err(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(r) = unknown_photo(&api, &d.photo_id) {
        return r;
    }
    let appended = lake::boxes::append(&api.service.lake, std::slice::from_ref(&d)).await;
    if appended.is_ok() {
        tracing::info!(photo = %d.photo_id, who = %d.who, "box recorded");
    }
    created(appended, d, "box")
}

/// The body of `POST /decisions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    photo_id: String,
    decision: String,
    individual_id: Option<String>,
    model_id: Option<String>,
    proposal: Option<String>,
    /// Who decided, when the API has no tokens (a token's name wins otherwise).
    who: Option<String>,
}

/// Records a decision (lake::decisions): 201 with the row; 400 when it is malformed, 403 for a
/// read-only token, 404 for a photo the served table does not have.
async fn decide(State(api): State<Shared>, req: Request) -> Response {
    let (who, b) = match writing::<DecisionBody>(&api, req, "a decision", "{\"photo_id\", \"decision\", \"individual_id\"}", |b| b.who.as_deref()).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let d = match lake::decisions::Kind::parse(&b.decision)
        .and_then(|k| lake::decisions::Decision::new(&b.photo_id, k, b.individual_id.as_deref(), &who))
        .and_then(|d| d.answering(b.model_id.as_deref(), b.proposal.as_deref()))
    {
        Ok(d) => d,
        Err(e) => return err(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Some(r) = unknown_photo(&api, &d.photo_id) {
        return r;
    }
    let appended = lake::decisions::append(&api.service.lake, std::slice::from_ref(&d)).await;
    if appended.is_ok() {
        tracing::info!(photo = %d.photo_id, decision = d.kind.as_str(), who = %d.who, "decision recorded");
    }
    created(appended, d, "decision")
}

/// `Authorization: Bearer <token>` on every route but `/healthz`, when the API has tokens.
async fn authorize(State(api): State<Shared>, req: Request, next: Next) -> Response {
    let Some(tokens) = &api.limits.tokens else { return next.run(req).await };
    // The health check, and the review page itself (it holds no data; it asks for a token and
    // sends it with every request it makes).
    if req.uri().path() == "/healthz" || req.uri().path() == "/review" {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given.map(|t| tokens.holder(t.trim())) {
        Some(Some(holder)) => {
            let mut req = req;
            req.extensions_mut().insert(holder);
            next.run(req).await
        }
        found => {
            let why = if found.is_none() { "this API needs `Authorization: Bearer <token>`" } else { "unknown token" };
            let mut r = err(StatusCode::UNAUTHORIZED, why);
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// What the middleware's own refusals say: a request over its time, an upload over the
/// concurrency limit (shed at once).
async fn refused(timeout: Duration, e: tower::BoxError) -> Response {
    if e.is::<tower::timeout::error::Elapsed>() {
        busy(format!("the request took longer than {}s", timeout.as_secs_f64()))
    } else if e.is::<tower::load_shed::error::Overloaded>() {
        busy("busy: the server is working on as many uploads as it takes at once; try again shortly")
    } else {
        internal("the request", e)
    }
}

/// The API's routes over `service`, with `limits`.
pub fn router(service: Arc<Service>, limits: Limits) -> Router {
    let (timeout, uploads) = (limits.timeout, limits.uploads.max(1));
    let api = Arc::new(Api {
        service,
        limits: limits.clone(),
        unlabelled: Default::default(),
        queue: Default::default(),
        decisions: Default::default(),
        boxes: Default::default(),
        crops: Default::default(),
        proposals: Default::default(),
    });
    let upload = axum::routing::post(similar_upload).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(move |e| refused(timeout, e)))
            .load_shed()
            .concurrency_limit(uploads)
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_timeout)),
    );
    Router::new()
        .route("/healthz", get(healthz))
        .route("/models", get(models))
        .route("/similar/{photo_id}", get(similar_id))
        .route("/similar", upload)
        .route("/photos/{photo_id}/thumbnail", get(thumbnail))
        .route("/photos/{photo_id}/image", get(photo_image))
        .route("/review", get(review_page))
        .route("/review/queue", get(review_queue))
        .route("/review/photos/{photo_id}", get(review_photo))
        .route("/decisions", axum::routing::post(decide))
        .route("/review/boxes", get(review_boxes))
        .route("/boxes", axum::routing::post(draw_box))
        .layer(DefaultBodyLimit::max(limits.max_body))
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .layer(
            ServiceBuilder::new()
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| internal("the request", "a handler panicked")))
                .layer(HandleErrorLayer::new(move |e| refused(timeout, e)))
                .timeout(timeout),
        )
        .with_state(api)
}

/// Swaps `service` to each new version of its table, checking every `every`; logs each swap
/// and each failure (the service then keeps answering from what it had).
pub async fn follow(service: Arc<Service>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match service.refresh().await {
            Ok(Some(what)) => println!("{} now serving {what}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot follow the lake ({e}); still serving version {}", service.now().version),
        }
    }
}

/// Serves until Ctrl-C or SIGTERM, following the lake every `refresh` (None: never).
pub async fn serve(service: Service, addr: SocketAddr, limits: Limits, refresh: Option<std::time::Duration>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::Other(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::Other(e.to_string()))?;
    let service = Arc::new(service);
    let now = service.now();
    println!("searching `{}` version {} (model {}) by {}", service.table, now.version, now.model_id, now.source.describe());
    if let Some(w) = &now.no_embedder {
        println!("uploads disabled: {w}");
    }
    let following = refresh.map(|every| {
        println!("following the lake: a new version of `{}` is served within {}s", service.table, every.as_secs_f64());
        tokio::spawn(follow(service.clone(), every))
    });
    println!(
        "serving {} on http://{local} (GET /healthz, /models, /similar/{{photo_id}}?k=20, /photos/{{photo_id}}/thumbnail, /photos/{{photo_id}}/image; POST /similar; review page: http://{local}/review)",
        service.table
    );
    println!(
        "limits: {}s a request, {} uploads at once (queue {} photos), uploads up to {} and {} MP{}",
        limits.timeout.as_secs_f64(),
        limits.uploads,
        answer::similar::QUEUE,
        lake::error::human_bytes(limits.max_body as u64),
        limits.max_upload_pixels as f64 / 1e6,
        match &limits.tokens {
            Some(t) => format!("; bearer tokens of {}", t.names().join(", ")),
            None => String::new(),
        }
    );
    axum::serve(listener, router(service, limits))
        .with_graceful_shutdown(async {
            #[cfg(unix)]
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Other(format!("server: {e}")))?;
    if let Some(f) = following {
        f.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_name_their_holders_and_refuse_weak_or_malformed_lines() {
        let t = Tokens::parse("# who may ask\nalice s3cret-token-of-alice\n\nci   0123456789abcdef  # the CI job\n").unwrap();
        assert_eq!(t.names(), vec!["alice", "ci"]);
        assert_eq!(t.holder("s3cret-token-of-alice").map(|h| h.name), Some("alice".to_string()));
        assert_eq!(t.holder("0123456789abcdef").map(|h| h.name), Some("ci".to_string()));
        assert_eq!(t.holder("0123456789abcdeX"), None);
        assert_eq!(t.holder(""), None);
        let e = Tokens::parse("alice short\n").unwrap_err();
        assert!(e.contains("line 1 (`alice`)") && e.contains("at least 16"), "{e}");
        let e = Tokens::parse("ok 0123456789abcdef\nalice\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("NAME TOKEN"), "{e}");
        let e = Tokens::parse("a 0123456789abcdef\na fedcba9876543210\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        assert!(Tokens::parse("# nothing\n").unwrap_err().contains("no tokens"));
        // Read-only tokens browse but may not decide; anything else in the third place is an error.
        let t = Tokens::parse("ana 0123456789abcdef\nvisitor fedcba9876543210 read-only\n").unwrap();
        assert_eq!(t.holder("0123456789abcdef"), Some(Holder { name: "ana".into(), may_decide: true }));
        assert_eq!(t.holder("fedcba9876543210"), Some(Holder { name: "visitor".into(), may_decide: false }));
        let e = Tokens::parse("ana 0123456789abcdef admin\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("`admin`"), "{e}");
    }
}
