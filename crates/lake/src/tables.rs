//! Typed readers of lake tables. Columns are found by name and their Arrow type is checked, so
//! a table of the wrong shape (a `sql` stage that yields `Int64` ids, a boxes column of strings)
//! is an [`Error::Schema`] naming the table, the column, the type expected and the type found —
//! never a panic. Types that hold the same values are taken as they are (`LargeUtf8` and
//! `Utf8View` for strings; `Float16`/`Float64` for `float32` columns, narrowed).

use std::collections::HashMap;


use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Int32Array, RecordBatch, StringArray};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Float32Type, Int32Type};
use futures::TryStreamExt;

use crate::{Error, Lake, Result};

/// The columns of one batch of `table`, looked up by name with their types checked.
pub struct Columns<'a> {
    table: &'a str,
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    pub fn new(table: &'a str, batch: &'a RecordBatch) -> Columns<'a> {
        Columns { table, batch }
    }

    fn error(&self, column: &str, detail: String) -> Error {
        Error::Schema { table: self.table.to_string(), column: column.to_string(), detail }
    }

    fn get(&self, column: &str) -> Result<&'a ArrayRef> {
        self.batch.column_by_name(column).ok_or_else(|| {
            let have: Vec<&str> = self.batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
            self.error(column, format!("is missing (the table has: {})", have.join(", ")))
        })
    }

    fn cast_to(&self, column: &str, a: &ArrayRef, to: &DataType, expected: &str) -> Result<ArrayRef> {
        let opts = CastOptions { safe: false, ..Default::default() };
        cast_with_options(a, to, &opts).map_err(|e| self.error(column, format!("expected {expected}, found {}: {e}", a.data_type())))
    }

    /// A string column (`Utf8`, `LargeUtf8` or `Utf8View`).
    pub fn strings(&self, column: &str) -> Result<StringArray> {
        let a = self.get(column)?;
        match a.data_type() {
            DataType::Utf8 => Ok(a.as_string::<i32>().clone()),
            DataType::LargeUtf8 | DataType::Utf8View => Ok(self.cast_to(column, a, &DataType::Utf8, "Utf8")?.as_string::<i32>().clone()),
            other => Err(self.error(column, format!("expected Utf8, found {other}"))),
        }
    }

    /// A `float32` column (`Float16` and `Float64` are converted).
    pub fn f32s(&self, column: &str) -> Result<Float32Array> {
        let a = self.get(column)?;
        match a.data_type() {
            DataType::Float32 => Ok(a.as_primitive::<Float32Type>().clone()),
            DataType::Float16 | DataType::Float64 => {
                Ok(self.cast_to(column, a, &DataType::Float32, "Float32")?.as_primitive::<Float32Type>().clone())
            }
            other => Err(self.error(column, format!("expected Float32, found {other}"))),
        }
    }

    /// An `int32` column (narrower integers are widened; wider ones must fit).
    pub fn i32s(&self, column: &str) -> Result<Int32Array> {
        let a = self.get(column)?;
        match a.data_type() {
            DataType::Int32 => Ok(a.as_primitive::<Int32Type>().clone()),
            DataType::Int8 | DataType::Int16 | DataType::UInt8 | DataType::UInt16 | DataType::Int64 | DataType::UInt32 | DataType::UInt64 => {
                Ok(self.cast_to(column, a, &DataType::Int32, "Int32")?.as_primitive::<Int32Type>().clone())
            }
            other => Err(self.error(column, format!("expected Int32, found {other}"))),
        }
    }

    /// A vector column: a fixed-size list of `float32`, and its length.
    pub fn vectors(&self, column: &str) -> Result<(FixedSizeListArray, usize)> {
        let a = self.get(column)?;
        let bad = || self.error(column, format!("expected FixedSizeList<Float32>, found {}", a.data_type()));
        let list = a.as_fixed_size_list_opt().ok_or_else(bad)?;
        if !matches!(list.value_type(), DataType::Float32) {
            return Err(bad());
        }
        Ok((list.clone(), list.value_length() as usize))
    }
}

/// Scans `columns` of `table` (an open dataset) and calls `each` with every batch.
pub(crate) async fn scan_each(ds: &lance::Dataset, table: &str, columns: &[&str], mut each: impl FnMut(&Columns) -> Result<()>) -> Result<()> {
    let mut scan = ds.scan();
    scan.project(columns).map_err(|e| Error::lance(table, e))?;
    let mut stream = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
    while let Some(b) = stream.try_next().await.map_err(|e| Error::lance(table, e))? {
        each(&Columns::new(table, &b))?;
    }
    Ok(())
}

/// The rows of `ds` (table `table`) that match the SQL `filter`, with `columns` (all when None).
pub async fn rows_where(ds: &lance::Dataset, table: &str, filter: &str, columns: Option<&[&str]>) -> Result<Vec<RecordBatch>> {
    let lerr = |e| Error::lance(table, e);
    let mut scan = ds.scan();
    scan.filter(filter).map_err(lerr)?;
    if let Some(c) = columns {
        scan.project(c).map_err(lerr)?;
    }
    scan.try_into_stream().await.map_err(lerr)?.try_collect().await.map_err(lerr)
}

/// `value` as a quoted SQL string literal.
pub fn sql_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Opens `table`, an error naming it when it does not exist.
pub async fn open_existing(lake: &Lake, table: &str, hint: &str) -> Result<lance::Dataset> {
    lake.open(table).await?.ok_or_else(|| Error::Other(format!("table `{table}` does not exist in the lake{hint}")))
}

/// Every embedding of a table, in memory.
pub struct EmbeddingSet {
    pub model_id: String,
    pub photo_ids: Vec<String>,
    pub uris: Vec<String>,
    pub labels: Vec<Option<String>>,
    pub values: Vec<f32>,
    pub dim: usize,
}

impl EmbeddingSet {
    pub fn len(&self) -> usize {
        self.photo_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.photo_ids.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// Reads a whole embeddings table.
pub async fn read_embeddings(lake: &Lake, table: &str) -> Result<EmbeddingSet> {
    read_set(&open_existing(lake, table, "").await?, table).await
}

/// Reads a whole embeddings table (named `table` in errors) from an open dataset.
pub async fn read_set(ds: &lance::Dataset, table: &str) -> Result<EmbeddingSet> {
    let mut set = EmbeddingSet { model_id: String::new(), photo_ids: vec![], uris: vec![], labels: vec![], values: vec![], dim: 0 };
    scan_each(ds, table, &["photo_id", "uri", "individual_id", "model_id", "embedding"], |c| {
        let (pid, uri, lab, mid) = (c.strings("photo_id")?, c.strings("uri")?, c.strings("individual_id")?, c.strings("model_id")?);
        let (emb, dim) = c.vectors("embedding")?;
        if set.dim != 0 && dim != set.dim {
            return Err(Error::Schema { table: table.into(), column: "embedding".into(), detail: format!("vectors of {} and {dim} dimensions", set.dim) });
        }
        set.dim = dim;
        let values = emb.values().as_primitive::<Float32Type>();
        for i in 0..pid.len() {
            if set.model_id.is_empty() {
                set.model_id = mid.value(i).to_string();
            }
            set.photo_ids.push(pid.value(i).to_string());
            set.uris.push(uri.value(i).to_string());
            set.labels.push((lab.is_valid(i) && !lab.value(i).is_empty()).then(|| lab.value(i).to_string()));
            let start = emb.value_offset(i) as usize;
            set.values.extend_from_slice(&values.values()[start..start + dim]);
        }
        Ok(())
    })
    .await?;
    Ok(in_uri_order(set))
}

/// The rows of `set` ordered by URI (then photo id): the order a table's rows come in depends on
/// how its writes interleaved, and every mean, tie and float sum over the set must not.
fn in_uri_order(set: EmbeddingSet) -> EmbeddingSet {
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.sort_by(|&a, &b| set.uris[a].cmp(&set.uris[b]).then_with(|| set.photo_ids[a].cmp(&set.photo_ids[b])));
    if order.iter().enumerate().all(|(i, &j)| i == j) {
        return set;
    }
    let mut values = Vec::with_capacity(set.values.len());
    for &i in &order {
        values.extend_from_slice(set.row(i));
    }
    EmbeddingSet {
        model_id: set.model_id.clone(),
        photo_ids: order.iter().map(|&i| set.photo_ids[i].clone()).collect(),
        uris: order.iter().map(|&i| set.uris[i].clone()).collect(),
        labels: order.iter().map(|&i| set.labels[i].clone()).collect(),
        values,
        dim: set.dim,
    }
}

/// Split of each photo (by URI) from a train stage's table.
pub async fn read_splits(lake: &Lake, table: &str) -> Result<HashMap<String, String>> {
    let ds = open_existing(lake, table, "").await?;
    let mut out = HashMap::new();
    scan_each(&ds, table, &["uri", "split"], |c| {
        let (u, s) = (c.strings("uri")?, c.strings("split")?);
        for i in 0..u.len() {
            out.insert(u.value(i).to_string(), s.value(i).to_string());
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// The boxes of `detector_id` in `table`, by photo id. An error when the table holds none of
/// that detector's rows (the model would otherwise silently see whole photos).
pub async fn read_boxes(lake: &Lake, table: &str, detector_id: Option<&str>) -> Result<(String, HashMap<String, [f32; 4]>)> {
    let ds = open_existing(lake, table, " (run the detect stage that writes it)").await?;
    let mut out = HashMap::new();
    let mut found: Option<String> = None;
    scan_each(&ds, table, &["photo_id", "detector_id", "x0", "y0", "x1", "y1"], |c| {
        let (pid, did) = (c.strings("photo_id")?, c.strings("detector_id")?);
        let b = [c.f32s("x0")?, c.f32s("y0")?, c.f32s("x1")?, c.f32s("y1")?];
        for i in 0..pid.len() {
            let d = did.value(i);
            if detector_id.is_some_and(|want| want != d) {
                continue;
            }
            match &found {
                None => found = Some(d.to_string()),
                Some(f) if f != d => {
                    return Err(Error::Other(format!("crops table `{table}` mixes detectors `{f}` and `{d}`")));
                }
                _ => {}
            }
            out.insert(pid.value(i).to_string(), [b[0].value(i), b[1].value(i), b[2].value(i), b[3].value(i)]);
        }
        Ok(())
    })
    .await?;
    match found {
        Some(d) => Ok((d, out)),
        None => Err(Error::Other(match detector_id {
            Some(want) => format!(
                "crops table `{table}` holds no box of detector `{want}`, which the model was trained with: run that detect stage first"
            ),
            None => format!("crops table `{table}` is empty"),
        })),
    }
}

/// The first value of a string column of `table`, or None when the table is empty.
pub async fn first_string(ds: &lance::Dataset, table: &str, column: &str) -> Result<Option<String>> {
    let mut first = None;
    scan_each(ds, table, &[column], |c| {
        let s = c.strings(column)?;
        if first.is_none() && !s.is_empty() {
            first = Some(s.value(0).to_string());
        }
        Ok(())
    })
    .await?;
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use arrow::array::{Float64Array, Int64Array, LargeStringArray};
    use arrow::datatypes::{Field, Schema};

    fn batch(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
        let fields: Vec<Field> = cols.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols.into_iter().map(|(_, a)| a).collect()).unwrap()
    }

    #[test]
    fn a_column_of_the_wrong_type_names_table_column_and_both_types() {
        let b = batch(vec![("photo_id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef)]);
        let e = Columns::new("clean", &b).strings("photo_id").unwrap_err().to_string();
        assert!(e.contains("`clean`") && e.contains("`photo_id`") && e.contains("expected Utf8") && e.contains("found Int64"), "{e}");
    }

    #[test]
    fn a_missing_column_names_what_the_table_has() {
        let b = batch(vec![("uri", Arc::new(StringArray::from(vec!["a"])) as ArrayRef)]);
        let e = Columns::new("detections", &b).f32s("x0").unwrap_err().to_string();
        assert!(e.contains("`detections`") && e.contains("`x0`") && e.contains("missing") && e.contains("uri"), "{e}");
    }

    #[test]
    fn strings_and_floats_of_other_widths_are_read() {
        let b = batch(vec![
            ("id", Arc::new(LargeStringArray::from(vec!["a", "b"])) as ArrayRef),
            ("x0", Arc::new(Float64Array::from(vec![0.25, 0.5])) as ArrayRef),
        ]);
        let c = Columns::new("t", &b);
        assert_eq!(c.strings("id").unwrap().value(1), "b");
        assert_eq!(c.f32s("x0").unwrap().value(0), 0.25);
        let e = c.f32s("id").unwrap_err().to_string();
        assert!(e.contains("expected Float32, found LargeUtf8"), "{e}");
    }

    #[test]
    fn a_vector_column_must_be_a_fixed_size_list_of_float32() {
        let b = batch(vec![("embedding", Arc::new(Float32Array::from(vec![1.0])) as ArrayRef)]);
        let e = Columns::new("embeddings", &b).vectors("embedding").unwrap_err().to_string();
        assert!(e.contains("expected FixedSizeList<Float32>, found Float32"), "{e}");
    }
}
