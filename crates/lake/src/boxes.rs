//! Boxes people drew or corrected on the review page (table `boxes`, schemas/boxes.toml): the
//! subject of a photo as a person sees it, for `detect` to train on beside the boxes file.
//!
//! Append-only, like `decisions`: the latest box of a photo wins, and who drew what stays
//! queryable. Boxes are fractions of the displayed frame (after EXIF orientation), as the
//! detector and the crops use them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanArray, Float32Array, RecordBatch, StringArray, TimestampMicrosecondArray};

use crate::{Catalog, Error, Lake, Result, WriteKind, tables};

pub const TABLE: &str = "boxes";

/// One row of [`TABLE`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DrawnBox {
    pub box_id: String,
    pub photo_id: String,
    /// `[x0, y0, x1, y1]`, fractions of the displayed frame; None: the person said the photo
    /// shows no subject.
    #[serde(rename = "box")]
    pub bbox: Option<[f32; 4]>,
    pub who: String,
    /// Microseconds since the epoch, UTC.
    pub drawn_at: i64,
}

/// Smallest side of a box, as a fraction of the frame (a click, not a drag, is no box).
const MIN_SIDE: f32 = 0.01;

impl DrawnBox {
    /// A box drawn now, checked: inside the frame, not inverted, not a point. The error names
    /// the photo and what is wrong.
    pub fn new(photo_id: &str, bbox: [f32; 4], who: &str) -> Result<DrawnBox> {
        let bad = |what: String| Error::Other(format!("box of photo `{photo_id}`: {what}"));
        if photo_id.trim().is_empty() || photo_id.len() > 200 {
            return Err(Error::Other("a box needs a photo id of 1..200 characters".into()));
        }
        if who.trim().is_empty() || who.len() > 200 {
            return Err(bad("who drew it must be named (1..200 characters)".into()));
        }
        let [x0, y0, x1, y1] = bbox;
        if !bbox.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)) {
            return Err(bad(format!("[{x0}, {y0}, {x1}, {y1}] must be fractions of the frame, 0..1")));
        }
        if x1 - x0 < MIN_SIDE || y1 - y0 < MIN_SIDE {
            return Err(bad(format!("[{x0}, {y0}, {x1}, {y1}] is empty, inverted or under {MIN_SIDE} of the frame a side")));
        }
        Ok(DrawnBox {
            box_id: uuid::Uuid::new_v4().simple().to_string(),
            photo_id: photo_id.to_string(),
            bbox: Some(bbox),
            who: who.trim().to_string(),
            drawn_at: chrono::Utc::now().timestamp_micros(),
        })
    }

    /// A person's word, now, that photo `photo_id` shows no subject at all.
    pub fn no_subject(photo_id: &str, who: &str) -> Result<DrawnBox> {
        let mut d = DrawnBox::new(photo_id, [0.0, 0.0, 1.0, 1.0], who)?;
        d.bbox = None;
        Ok(d)
    }
}

/// Appends `rows` in one commit.
pub async fn append(lake: &Lake, rows: &[DrawnBox]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let batch = batch_of_rows(rows)?;
    let schema = lake.catalog().get(TABLE).unwrap_or_else(|| Catalog::builtin(TABLE));
    let mut sink = lake.sink(TABLE, schema, WriteKind::Append);
    sink.send(batch).await?;
    sink.finish().await?;
    Ok(())
}

/// `rows` as a batch of the declared schema.
fn batch_of_rows(rows: &[DrawnBox]) -> Result<RecordBatch> {
    let coord = |i: usize| -> Arc<dyn Array> { Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.bbox.map_or(0.0, |b| b[i])))) };
    Ok(RecordBatch::try_new(
        Catalog::builtin(TABLE),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.box_id.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.photo_id.as_str()))),
            coord(0),
            coord(1),
            coord(2),
            coord(3),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.who.as_str()))),
            Arc::new(TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.drawn_at)).with_timezone("UTC")),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.bbox.is_some())))),
        ],
    )?)
}

/// The latest box of every photo that has one, by photo id.
pub async fn latest(lake: &Lake) -> Result<BTreeMap<String, DrawnBox>> {
    let Some(ds) = lake.open(TABLE).await? else { return Ok(BTreeMap::new()) };
    let mut all = Vec::new();
    for b in tables::rows_where(&ds, TABLE, "photo_id IS NOT NULL", None).await? {
        let c = tables::Columns::new(TABLE, &b);
        let (ids, photos, who) = (c.strings("box_id")?, c.strings("photo_id")?, c.strings("who")?);
        let v = [c.f32s("x0")?, c.f32s("y0")?, c.f32s("x1")?, c.f32s("y1")?];
        // A table written before `subject`: every row is a box.
        let subject = b.column_by_name("subject").and_then(|c| c.as_boolean_opt().cloned());
        let at = b
            .column_by_name("drawn_at")
            .and_then(|a| a.as_primitive_opt::<arrow::datatypes::TimestampMicrosecondType>().cloned())
            .ok_or_else(|| Error::Schema { table: TABLE.into(), column: "drawn_at".into(), detail: "missing or not a timestamp(us)".into() })?;
        for i in 0..b.num_rows() {
            all.push(DrawnBox {
                box_id: ids.value(i).to_string(),
                photo_id: photos.value(i).to_string(),
                bbox: match &subject {
                    Some(s) if s.is_valid(i) && !s.value(i) => None,
                    _ => Some([v[0].value(i), v[1].value(i), v[2].value(i), v[3].value(i)]),
                },
                who: who.value(i).to_string(),
                drawn_at: at.value(i),
            });
        }
    }
    // Stable: rows of one instant keep the order they were written in.
    all.sort_by_key(|d| d.drawn_at);
    Ok(all.into_iter().map(|d| (d.photo_id.clone(), d)).collect())
}

/// A digest of the latest boxes (photo and box), so `detect` runs again exactly when they change.
pub fn digest(latest: &BTreeMap<String, DrawnBox>) -> String {
    let mut h = blake3::Hasher::new();
    for (photo, d) in latest {
        h.update(photo.as_bytes());
        h.update(&[0]);
        match d.bbox {
            Some(b) => b.iter().for_each(|v| {
                h.update(&v.to_le_bytes());
            }),
            None => {
                h.update(b"no subject");
            }
        }
    }
    h.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_is_checked_and_names_what_is_wrong() {
        assert!(DrawnBox::new("a.jpg", [0.1, 0.2, 0.5, 0.6], "ana").is_ok());
        let e = DrawnBox::new("a.jpg", [0.5, 0.2, 0.1, 0.6], "ana").unwrap_err().to_string();
        assert!(e.contains("box of photo `a.jpg`") && e.contains("inverted"), "{e}");
        let e = DrawnBox::new("a.jpg", [0.1, 0.2, 1.5, 0.6], "ana").unwrap_err().to_string();
        assert!(e.contains("0..1"), "{e}");
        let e = DrawnBox::new("a.jpg", [0.1, 0.2, 0.105, 0.6], "ana").unwrap_err().to_string();
        assert!(e.contains("under"), "{e}");
        assert!(DrawnBox::new("a.jpg", [f32::NAN, 0.2, 0.5, 0.6], "ana").is_err());
        assert!(DrawnBox::new("a.jpg", [0.1, 0.2, 0.5, 0.6], " ").unwrap_err().to_string().contains("who drew"));
    }

    #[tokio::test]
    async fn the_latest_box_of_a_photo_wins() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::default());
        assert!(latest(&lake).await.unwrap().is_empty());
        let mut a = DrawnBox::new("a.jpg", [0.1, 0.1, 0.5, 0.5], "ana").unwrap();
        let mut b = DrawnBox::new("b.jpg", [0.2, 0.2, 0.6, 0.6], "ana").unwrap();
        let mut a2 = DrawnBox::new("a.jpg", [0.15, 0.1, 0.55, 0.5], "ben").unwrap();
        (a.drawn_at, b.drawn_at, a2.drawn_at) = (1, 2, 3);
        append(&lake, &[a, b.clone()]).await.unwrap();
        let before = digest(&latest(&lake).await.unwrap());
        append(&lake, std::slice::from_ref(&a2)).await.unwrap();
        let l = latest(&lake).await.unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l["a.jpg"], a2);
        assert_eq!(l["b.jpg"], b);
        assert_ne!(digest(&l), before);
        // b shows no subject after all: that is its latest word, and the digest follows.
        let mut none = DrawnBox::no_subject("b.jpg", "ben").unwrap();
        none.drawn_at = 4;
        append(&lake, std::slice::from_ref(&none)).await.unwrap();
        let l2 = latest(&lake).await.unwrap();
        assert_eq!(l2["b.jpg"].bbox, None);
        assert_eq!(l2["b.jpg"], none);
        assert_ne!(digest(&l2), digest(&l));
        assert!(DrawnBox::no_subject(" ", "ben").is_err());
    }

    #[tokio::test]
    async fn a_table_from_before_subject_gets_the_column_and_its_rows_stay_boxes() {
        let dir = tempfile::tempdir().unwrap();
        // The declared schemas, as a pipeline's lake has them.
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::load(None).unwrap());
        // `boxes` as it was written before the `subject` column was declared.
        let declared = Catalog::builtin(TABLE);
        let old = Arc::new(arrow::datatypes::Schema::new(declared.fields().iter().filter(|f| f.name() != "subject").cloned().collect::<Vec<_>>()));
        let d = DrawnBox::new("a.jpg", [0.1, 0.1, 0.5, 0.5], "ana").unwrap();
        let full = batch_of_rows(std::slice::from_ref(&d)).unwrap();
        let batch = RecordBatch::try_new(old.clone(), old.fields().iter().map(|f| full.column_by_name(f.name()).unwrap().clone()).collect()).unwrap();
        let mut sink = lake.sink(TABLE, old, WriteKind::Append);
        sink.send(batch).await.unwrap();
        sink.finish().await.unwrap();
        assert!(lake.open(TABLE).await.unwrap().unwrap().schema().field("subject").is_none());
        assert_eq!(latest(&lake).await.unwrap()["a.jpg"].bbox, d.bbox, "an old row is a box");
        assert!(lake.add_declared_columns(TABLE).await.unwrap(), "the declared column is added");
        assert!(!lake.add_declared_columns(TABLE).await.unwrap(), "once");
        let ds = lake.open(TABLE).await.unwrap().unwrap();
        assert!(ds.schema().field("subject").is_some());
        assert_eq!(ds.count_rows(None).await.unwrap(), 1);
        assert_eq!(latest(&lake).await.unwrap()["a.jpg"], d, "its row reads as before (subject null: a box)");
        // And new rows append beside it.
        let mut none = DrawnBox::no_subject("b.jpg", "ana").unwrap();
        none.drawn_at = d.drawn_at + 1;
        append(&lake, std::slice::from_ref(&none)).await.unwrap();
        assert_eq!(latest(&lake).await.unwrap()["b.jpg"].bbox, None);
    }
}
