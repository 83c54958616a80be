//! The report's data: what `pipeline report` and the `report` stage read from the lake (the
//! evaluation, the training history, the submission with thumbnails) before rendering.

use std::collections::HashMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};

use lake::Lake;
use crate::report::{self, ImageRef, ReportData};
use crate::{Error, Result};
use crate::similar::{model_of, read_photo, thumbnail};

/// What `pipeline report` shows.
pub struct ReportOptions {
    pub embeddings: String,
    pub submissions: String,
    pub evaluations: String,
    /// Query photos shown (the first by photo id).
    pub queries: usize,
    pub thumb_side: u32,
}

/// Reads the lake's evaluation, training history and submission and renders the report.
pub async fn report(lake: &Lake, title: &str, o: &ReportOptions) -> Result<String> {
    let tables = lake.tables().await?;
    let session = lake.session().await?;
    let q = |sql: String| {
        let session = session.clone();
        async move { Ok::<_, Error>(session.sql(&sql).await?.collect().await?) }
    };
    let mut data = ReportData {
        title: title.to_string(),
        generated_at: chrono::Utc::now().to_rfc3339(),
        model_id: String::new(),
        metrics: Vec::new(),
        curves: Vec::new(),
        queries: Vec::new(),
        notes: vec![
            format!("lake: {}", lake.root()),
            "regenerate: pipeline report --out report.html".into(),
            "neighbours: pipeline similar <photo id or path>".into(),
        ],
    };
    if tables.contains(&o.evaluations) {
        // Re-ranked rows (α-query expansion) are told apart in the gallery column; tables
        // written before re-ranking existed have no `rerank` column.
        let reranked = lake.open(&o.evaluations).await?.is_some_and(|ds| ds.schema().field("rerank").is_some());
        let gallery = if reranked { "CASE WHEN rerank = 'none' THEN gallery ELSE gallery || ', ' || rerank END" } else { "gallery" };
        for b in q(format!(
            "SELECT queries, {gallery} AS gallery, n_queries, precision_at_1, map_at_20, recall_at_20, model_id FROM \"{}\" ORDER BY 1, 2",
            o.evaluations
        ))
        .await?
        {
            for i in 0..b.num_rows() {
                data.model_id = b.column(6).as_string::<i32>().value(i).to_string();
                data.metrics.push(report::MetricRow {
                    queries: b.column(0).as_string::<i32>().value(i).to_string(),
                    gallery: b.column(1).as_string::<i32>().value(i).to_string(),
                    n_queries: b.column(2).as_primitive::<Int64Type>().value(i),
                    precision_at_1: b.column(3).as_primitive::<Float64Type>().value(i),
                    map_at_20: b.column(4).as_primitive::<Float64Type>().value(i),
                    recall_at_20: b.column(5).as_primitive::<Float64Type>().value(i),
                });
            }
        }
    }
    if tables.contains(&"models".to_string()) {
        // Training curves of the model that made the embeddings (or the latest trained one).
        let emb_model = if tables.contains(&o.embeddings) {
            let ds = lake.open(&o.embeddings).await?.ok_or_else(|| Error::Other("embeddings vanished".into()))?;
            model_of(&ds).await?
        } else {
            String::new()
        };
        let batches = q("SELECT model_id, history FROM models WHERE kind = 'trained' ORDER BY created_at DESC".into()).await?;
        let mut chosen = None;
        for b in &batches {
            for i in 0..b.num_rows() {
                let id = b.column(0).as_string::<i32>().value(i);
                if chosen.is_none() || id == emb_model {
                    chosen = Some((id.to_string(), b.column(1).as_string::<i32>().value(i).to_string()));
                }
            }
        }
        if let Some((id, history)) = chosen {
            if data.model_id.is_empty() {
                data.model_id = id;
            }
            let h: Vec<model::train::EpochRecord> = serde_json::from_str(&history).unwrap_or_default();
            let curve = |name: &str, f: &dyn Fn(&model::train::EpochRecord) -> Option<f64>| report::Curve {
                name: name.into(),
                points: h.iter().filter_map(|r| f(r).map(|v| (r.epoch as f64 + 1.0, v))).collect(),
            };
            data.curves = vec![
                curve("loss", &|r| Some(r.loss)),
                curve("lr", &|r| Some(r.lr)),
                curve("val mAP@20", &|r| r.val.as_ref().map(|m| m.map_at_20)),
                curve("val P@1", &|r| r.val.as_ref().map(|m| m.precision_at_1)),
            ];
        }
    }
    if tables.contains(&o.submissions) && tables.contains(&o.embeddings) {
        let sql = format!(
            "WITH picked AS (SELECT DISTINCT query FROM \"{s}\" ORDER BY query LIMIT {n}) \
             SELECT s.query AS query, qe.uri AS query_uri, qe.individual_id AS query_individual, s.rank AS rank, \
             s.neighbour AS neighbour, ne.uri AS neighbour_uri, s.neighbour_individual AS neighbour_individual, \
             s.distance AS distance \
             FROM \"{s}\" s JOIN picked p ON p.query = s.query \
             JOIN \"{e}\" qe ON qe.photo_id = s.query JOIN \"{e}\" ne ON ne.photo_id = s.neighbour \
             ORDER BY s.query, s.rank",
            s = o.submissions,
            e = o.embeddings,
            n = o.queries
        );
        let mut thumbs: HashMap<String, ImageRef> = HashMap::new();
        for b in q(sql).await? {
            let s = |c: usize, i: usize| {
                let a = b.column(c).as_string::<i32>();
                (a.is_valid(i) && !a.value(i).is_empty()).then(|| a.value(i).to_string())
            };
            for i in 0..b.num_rows() {
                let query = s(0, i).unwrap_or_default();
                if data.queries.last().is_none_or(|r| r.photo.photo_id != query) {
                    let image = thumb_of(&mut thumbs, &s(1, i).unwrap_or_default(), lake, o.thumb_side).await;
                    data.queries.push(report::QueryRow {
                        photo: report::Photo { photo_id: query.clone(), individual_id: s(2, i), image },
                        neighbours: Vec::new(),
                        new_individual: None,
                    });
                }
                let row = data.queries.last_mut().expect("pushed above");
                let nind = s(6, i);
                let correct = match (&row.photo.individual_id, &nind) {
                    (Some(a), Some(b)) => Some(a == b),
                    _ => None,
                };
                let image = thumb_of(&mut thumbs, &s(5, i).unwrap_or_default(), lake, o.thumb_side).await;
                let dist = b.column(7).as_primitive::<arrow::datatypes::Float32Type>().value(i) as f64;
                let row = data.queries.last_mut().expect("pushed above");
                row.neighbours.push(report::Neighbour {
                    photo: report::Photo { photo_id: s(4, i).unwrap_or_default(), individual_id: nind, image },
                    similarity: 1.0 - dist,
                    correct,
                });
            }
        }
    }
    Ok(report::render(&data))
}

async fn thumb_of(cache: &mut HashMap<String, ImageRef>, uri: &str, lake: &Lake, side: u32) -> ImageRef {
    if let Some(t) = cache.get(uri) {
        return t.clone();
    }
    let img = match read_photo(&lake.locate(uri), lake.options()).await.and_then(|b| thumbnail(&b, side)) {
        Ok(bytes) => ImageRef::Embedded { mime: "image/jpeg".into(), bytes },
        Err(_) => ImageRef::Missing,
    };
    cache.insert(uri.to_string(), img.clone());
    img
}

