//! `pipeline serve`: the HTTP JSON API over an embeddings table.
//!
//! | route | answer |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok","table":..,"rows":..,"model_id":..}` |
//! | `GET /models` | the `models` registry (without configs) |
//! | `GET /similar/{photo_id}?k=20` | neighbours of a photo of the collection; 404 when unknown |
//! | `POST /similar?k=20` (image body) | neighbours of a new photo; 400 when it is not an image, 413 over the size limit |
//! | `GET /photos/{photo_id}/thumbnail` | a JPEG, longest side 256 |
//!
//! Loopback only unless told otherwise. The model is loaded once and lives on one worker
//! thread; concurrent uploads queue there and are embedded together in one forward pass.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use answer::{self, Service};
use lake::vector::Expansion;
use lake::{Error, Result};

/// `?k=20&expand=5&alpha=3`: neighbours wanted, and α-query expansion (off unless `expand`).
#[derive(Deserialize)]
struct KParam {
    k: Option<usize>,
    expand: Option<usize>,
    alpha: Option<f32>,
}

type Shared = Arc<Service>;

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
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

async fn healthz(State(s): State<Shared>) -> Response {
    let rows = s.ds.count_rows(None).await.unwrap_or(0);
    let model = s.embedder.as_ref().map(|e| e.model_id.clone());
    Json(serde_json::json!({ "status": "ok", "table": s.table, "rows": rows, "model_id": model })).into_response()
}

async fn models(State(s): State<Shared>) -> Response {
    let sql = "SELECT model_id, kind, backbone, embedding_dim, input_size, best_epoch, best_map_at_20, checkpoint_uri, \
               CAST(created_at AS VARCHAR) AS created_at FROM models ORDER BY created_at DESC";
    match lake::query::query(&s.lake, sql).await {
        Ok((schema, batches)) => {
            let mut out = Vec::new();
            if lake::query::write(lake::query::Format::Json, &schema, &batches, &mut out).is_err() {
                return err(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the models");
            }
            ([(header::CONTENT_TYPE, "application/json")], out).into_response()
        }
        Err(e) => err(StatusCode::NOT_FOUND, format!("no models table: {e}")),
    }
}

async fn similar_id(State(s): State<Shared>, Path(id): Path<String>, Query(p): Query<KParam>) -> Response {
    let (k, x) = match k_of(&p) {
        Ok(kx) => kx,
        Err(r) => return r,
    };
    match answer::similar_to_id(&s.ds, &s.source, &id, k, x).await {
        Ok(Some(a)) => Json(a).into_response(),
        Ok(None) => err(StatusCode::NOT_FOUND, format!("no photo `{id}` in `{}`", s.table)),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn similar_upload(State(s): State<Shared>, Query(p): Query<KParam>, body: Bytes) -> Response {
    let (k, x) = match k_of(&p) {
        Ok(kx) => kx,
        Err(r) => return r,
    };
    if body.is_empty() {
        return err(StatusCode::BAD_REQUEST, "empty body: POST the image bytes (JPEG, PNG or TIFF)");
    }
    let Some(embedder) = &s.embedder else {
        return err(StatusCode::SERVICE_UNAVAILABLE, "no model can embed new photos for this table");
    };
    let v = match embedder.embed_bytes(body.to_vec()).await {
        Ok(v) => v,
        Err(Error::BadImage(m)) => return err(StatusCode::BAD_REQUEST, format!("not a readable image: {m}")),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match answer::similar_to_vector(&s.ds, &s.source, "upload", &v, k, x).await {
        Ok(a) => Json(a).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn thumbnail(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let hit = match lake::vector::embedding_of(&s.ds, &id).await {
        Ok(Some((_, h))) => h,
        Ok(None) => return err(StatusCode::NOT_FOUND, format!("no photo `{id}` in `{}`", s.table)),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let bytes = match answer::read_photo(&s.lake.locate(&hit.uri), s.lake.options()).await {
        Ok(b) => b,
        Err(e) => return err(StatusCode::NOT_FOUND, format!("photo `{id}` cannot be read: {e}")),
    };
    match tokio::task::spawn_blocking(move || answer::thumbnail(&bytes, 256)).await {
        Ok(Ok(jpg)) => ([(header::CONTENT_TYPE, "image/jpeg")], jpg).into_response(),
        Ok(Err(e)) => err(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The API's routes over `service`; uploads above `max_body` bytes get 413.
pub fn router(service: Service, max_body: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/models", get(models))
        .route("/similar/{photo_id}", get(similar_id))
        .route("/similar", axum::routing::post(similar_upload))
        .route("/photos/{photo_id}/thumbnail", get(thumbnail))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(Arc::new(service))
}

/// Serves until Ctrl-C.
pub async fn serve(service: Service, addr: SocketAddr, max_body: usize) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::Other(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::Other(e.to_string()))?;
    println!("searching `{}` by {}", service.table, service.source.describe());
    println!("serving {} on http://{local} (GET /healthz, /models, /similar/{{photo_id}}?k=20, /photos/{{photo_id}}/thumbnail; POST /similar)", service.table);
    axum::serve(listener, router(service, max_body))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Error::Other(format!("server: {e}")))
}
