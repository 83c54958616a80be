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
//!
//! It follows the lake: every `--refresh` seconds it looks for a new version of the table (a
//! nightly run's new photos, or the collection re-embedded with a newly promoted model) and
//! swaps to it, and to its model, without a restart; requests in flight finish on what they
//! started with ([`Service::refresh`]).

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
    let now = s.now();
    match answer::similar_to_id(&now.ds, &now.source, &id, k, x).await {
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
    let now = s.now();
    let Some(embedder) = &now.embedder else {
        let why = now.no_embedder.clone().unwrap_or_default();
        return err(StatusCode::SERVICE_UNAVAILABLE, format!("no model can embed new photos for this table: {why}"));
    };
    let v = match embedder.embed_bytes(body.to_vec()).await {
        Ok(v) => v,
        Err(Error::BadImage(m)) => return err(StatusCode::BAD_REQUEST, format!("not a readable image: {m}")),
        Err(e) => return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    match answer::similar_to_vector(&now.ds, &now.source, "upload", &v, k, x).await {
        Ok(a) => Json(a).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn thumbnail(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let hit = match lake::vector::embedding_of(&s.now().ds, &id).await {
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
pub fn router(service: Arc<Service>, max_body: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/models", get(models))
        .route("/similar/{photo_id}", get(similar_id))
        .route("/similar", axum::routing::post(similar_upload))
        .route("/photos/{photo_id}/thumbnail", get(thumbnail))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(service)
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
pub async fn serve(service: Service, addr: SocketAddr, max_body: usize, refresh: Option<std::time::Duration>) -> Result<()> {
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
    println!("serving {} on http://{local} (GET /healthz, /models, /similar/{{photo_id}}?k=20, /photos/{{photo_id}}/thumbnail; POST /similar)", service.table);
    axum::serve(listener, router(service, max_body))
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
