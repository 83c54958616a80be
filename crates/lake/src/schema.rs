//! Declared table schemas. Every table the pipeline writes has a file in `schemas/`
//! (`schemas/<table>.toml`); the built-in ones are compiled into the binary so it runs from
//! anywhere, and a pipeline may add its own next to it. A batch that does not match its
//! table's declared schema is refused with the column at fault named.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

use crate::{Error, Result};

/// Schemas of the tables the built-in stages write, from the repository's `schemas/` folder.
const BUILTIN: &[(&str, &str)] = &[
    ("images", include_str!("../../../schemas/images.toml")),
    ("rejects", include_str!("../../../schemas/rejects.toml")),
    ("runs", include_str!("../../../schemas/runs.toml")),
    ("splits", include_str!("../../../schemas/splits.toml")),
    ("models", include_str!("../../../schemas/models.toml")),
    ("promotions", include_str!("../../../schemas/promotions.toml")),
    ("embeddings", include_str!("../../../schemas/embeddings.toml")),
    ("evaluations", include_str!("../../../schemas/evaluations.toml")),
    ("pseudo_labels", include_str!("../../../schemas/pseudo_labels.toml")),
    ("submissions", include_str!("../../../schemas/submissions.toml")),
    ("detections", include_str!("../../../schemas/detections.toml")),
    ("crops", include_str!("../../../schemas/crops.toml")),
    ("decisions", include_str!("../../../schemas/decisions.toml")),
    ("boxes", include_str!("../../../schemas/boxes.toml")),
    ("proposals", include_str!("../../../schemas/proposals.toml")),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    table: String,
    #[serde(default)]
    doc: Option<String>,
    /// Same columns as another declared table (a filtered copy of it, say).
    #[serde(default)]
    like: Option<String>,
    #[serde(default)]
    columns: Vec<ColumnDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnDecl {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default = "yes")]
    nullable: bool,
    #[serde(default)]
    #[allow(dead_code)] // documentation for people reading schemas/, kept in the file only
    doc: Option<String>,
}

fn yes() -> bool {
    true
}

/// The declared schemas known to one pipeline: built-ins plus the files of its `schemas/` folder.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    schemas: HashMap<String, SchemaRef>,
}

impl Catalog {
    /// Built-in schemas, then every `*.toml` in `dir` (when given and present) on top.
    pub fn load(dir: Option<&Path>) -> Result<Catalog> {
        let mut raw: Vec<(String, String)> =
            BUILTIN.iter().map(|(n, t)| (format!("schemas/{n}.toml (built in)"), t.to_string())).collect();
        if let Some(dir) = dir.filter(|d| d.is_dir()) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            entries.sort();
            for p in entries {
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                raw.push((p.display().to_string(), text));
            }
        }
        let mut files = Vec::new();
        for (origin, text) in raw {
            let f: SchemaFile = toml::from_str(&text)
                .map_err(|e| Error::SchemaFile { file: origin.clone(), detail: e.to_string() })?;
            files.push((origin, f));
        }
        let mut cat = Catalog::default();
        // `like` may point at a table declared later in the list; resolve in rounds.
        let mut pending = files;
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for (origin, f) in pending {
                match &f.like {
                    Some(base) if !cat.schemas.contains_key(base) => rest.push((origin, f)),
                    _ => {
                        let schema = cat.build(&origin, &f)?;
                        cat.schemas.insert(f.table.clone(), schema);
                    }
                }
            }
            if rest.len() == before {
                let (origin, f) = &rest[0];
                return Err(Error::SchemaFile {
                    file: origin.clone(),
                    detail: format!("`like = \"{}\"` names no declared table", f.like.clone().unwrap_or_default()),
                });
            }
            pending = rest;
        }
        Ok(cat)
    }

    fn build(&self, origin: &str, f: &SchemaFile) -> Result<SchemaRef> {
        let mut fields: Vec<Field> = match &f.like {
            Some(base) => self.schemas[base].fields().iter().map(|f| f.as_ref().clone()).collect(),
            None => Vec::new(),
        };
        for c in &f.columns {
            let ty = parse_type(&c.ty).map_err(|detail| Error::SchemaFile {
                file: origin.to_string(),
                detail: format!("column `{}`: {detail}", c.name),
            })?;
            fields.retain(|x| x.name() != &c.name);
            fields.push(Field::new(&c.name, ty, c.nullable));
        }
        if fields.is_empty() {
            return Err(Error::SchemaFile { file: origin.into(), detail: "declares no columns".into() });
        }
        let mut meta = HashMap::new();
        if let Some(doc) = &f.doc {
            meta.insert("doc".to_string(), doc.clone());
        }
        Ok(Arc::new(Schema::new_with_metadata(fields, meta)))
    }

    pub fn get(&self, table: &str) -> Option<SchemaRef> {
        self.schemas.get(table).cloned()
    }

    /// The declared schema of a table the built-in stages write; these always exist.
    pub fn builtin(table: &str) -> SchemaRef {
        static CAT: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
        CAT.get_or_init(|| {
            // The built-in files are part of the binary and covered by tests; failing here is
            // a build defect, not bad input.
            Catalog::load(None).expect("built-in schemas parse")
        })
        .get(table)
        .unwrap_or_else(|| panic!("no built-in schema for `{table}`"))
    }
}

/// The type names used in `schemas/*.toml`.
pub fn parse_type(s: &str) -> std::result::Result<DataType, String> {
    let s = s.trim();
    Ok(match s {
        "utf8" | "string" => DataType::Utf8,
        "bool" | "boolean" => DataType::Boolean,
        "int32" => DataType::Int32,
        "int64" => DataType::Int64,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "float32" => DataType::Float32,
        "float64" => DataType::Float64,
        "binary" => DataType::Binary,
        "large_binary" => DataType::LargeBinary,
        "timestamp" => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => {
            if let Some(inner) = s.strip_prefix("vector<").and_then(|r| r.strip_suffix('>')) {
                let (item, dim) = inner.split_once(',').ok_or("expected vector<float32, DIM>")?;
                let item = parse_type(item)?;
                // `*`: any dimension (declared as 0), fixed by the first write; a table holds
                // one model's embeddings, whose size the model decides.
                let dim: i32 = if dim.trim() == "*" {
                    0
                } else {
                    dim.trim().parse().ok().filter(|d| *d > 0).ok_or_else(|| format!("bad vector dimension `{}`", dim.trim()))?
                };
                DataType::FixedSizeList(Arc::new(Field::new("item", item, true)), dim)
            } else {
                return Err(format!(
                    "unknown type `{s}` (known: utf8, bool, int32, int64, uint32, uint64, float32, float64, \
                     binary, large_binary, timestamp, vector<float32, N>, vector<float32, *>)"
                ));
            }
        }
    })
}

/// Checks `batch` against the declared `schema` of `table` and returns it re-labelled with the
/// declared schema (so nullability flags agree with the table), or an error naming the column.
pub fn conform(table: &str, schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    let err = |column: &str, detail: String| Error::Schema { table: table.into(), column: column.into(), detail };
    let bs = batch.schema();
    for f in bs.fields() {
        if schema.field_with_name(f.name()).is_err() {
            return Err(err(f.name(), format!("is not declared in schemas/{table}.toml")));
        }
    }
    let mut cols = Vec::with_capacity(schema.fields().len());
    let mut fields = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let Ok(idx) = bs.index_of(f.name()) else {
            return Err(err(f.name(), "is missing from the batch".into()));
        };
        let col = batch.column(idx);
        if !same_type(col.data_type(), f.data_type()) {
            return Err(err(f.name(), format!("has type {} but {} is declared", col.data_type(), f.data_type())));
        }
        if !f.is_nullable() && col.null_count() > 0 {
            return Err(err(f.name(), format!("is declared NOT NULL but has {} null value(s)", col.null_count())));
        }
        cols.push(col.clone());
        // A `vector<float32, *>` column takes the batch's dimension.
        fields.push(match f.data_type() {
            DataType::FixedSizeList(_, 0) => Arc::new(Field::new(f.name(), col.data_type().clone(), f.is_nullable())),
            _ => f.clone(),
        });
    }
    let out = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    RecordBatch::try_new(out, cols).map_err(Error::from)
}

/// Type equality that ignores the names and nullability of nested list items, which differ
/// between writers (`item` vs `element`) without changing the data.
fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::FixedSizeList(x, n), DataType::FixedSizeList(y, m)) => {
            (n == m || *m == 0) && same_type(x.data_type(), y.data_type())
        }
        (DataType::List(x), DataType::List(y)) | (DataType::LargeList(x), DataType::LargeList(y)) => {
            same_type(x.data_type(), y.data_type())
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    #[test]
    fn builtin_schemas_parse() {
        let cat = Catalog::load(None).unwrap();
        for t in ["images", "rejects", "runs"] {
            assert!(cat.get(t).is_some(), "{t}");
        }
        assert!(Catalog::builtin("images").field_with_name("content_hash").is_ok());
    }

    #[test]
    fn like_copies_and_extends() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("clean.toml"),
            "table = \"clean\"\nlike = \"images\"\n[[columns]]\nname = \"split\"\ntype = \"utf8\"\n",
        )
        .unwrap();
        let cat = Catalog::load(Some(dir.path())).unwrap();
        let clean = cat.get("clean").unwrap();
        assert_eq!(clean.fields().len(), Catalog::builtin("images").fields().len() + 1);
        assert_eq!(clean.field_with_name("split").unwrap().data_type(), &DataType::Utf8);
    }

    #[test]
    fn bad_type_names_the_column() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.toml"), "table = \"t\"\n[[columns]]\nname = \"x\"\ntype = \"int7\"\n").unwrap();
        let e = Catalog::load(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("column `x`") && e.contains("int7"), "{e}");
    }

    #[test]
    fn conform_names_the_column_at_fault() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Utf8, true),
        ]));
        let ok = RecordBatch::try_from_iter(vec![
            ("b", Arc::new(StringArray::from(vec![Some("x")])) as _),
            ("a", Arc::new(Int64Array::from(vec![1])) as _),
        ])
        .unwrap();
        let out = conform("t", &schema, &ok).unwrap();
        assert_eq!(out.schema(), schema, "columns reordered to the declared order");

        let wrong_type = RecordBatch::try_from_iter(vec![
            ("a", Arc::new(StringArray::from(vec!["1"])) as _),
            ("b", Arc::new(StringArray::from(vec!["x"])) as _),
        ])
        .unwrap();
        let e = conform("t", &schema, &wrong_type).unwrap_err().to_string();
        assert!(e.contains("column `a`") && e.contains("Int64"), "{e}");

        let missing = RecordBatch::try_from_iter(vec![("a", Arc::new(Int64Array::from(vec![1])) as _)]).unwrap();
        assert!(conform("t", &schema, &missing).unwrap_err().to_string().contains("column `b`"));

        let extra = RecordBatch::try_from_iter(vec![
            ("a", Arc::new(Int64Array::from(vec![1])) as _),
            ("b", Arc::new(StringArray::from(vec!["x"])) as _),
            ("c", Arc::new(StringArray::from(vec!["x"])) as _),
        ])
        .unwrap();
        assert!(conform("t", &schema, &extra).unwrap_err().to_string().contains("column `c`"));

        let null_in_not_null = RecordBatch::try_from_iter(vec![
            ("a", Arc::new(Int64Array::from(vec![None])) as _),
            ("b", Arc::new(StringArray::from(vec!["x"])) as _),
        ])
        .unwrap();
        assert!(conform("t", &schema, &null_in_not_null).unwrap_err().to_string().contains("NOT NULL"));
    }
}
