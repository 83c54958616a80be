//! A lake's history: every run tags the table versions it wrote (`run-<run id>`), a query can
//! read the lake as it was after any run, and housekeeping compacts tables and removes old
//! versions while keeping what the history needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::prelude::SessionContext;
use lance::dataset::optimize::{CompactionOptions, compact_files};

use crate::{Error, Lake, Result};

/// The tag of the versions a run wrote.
pub fn run_tag(run_id: &str) -> String {
    format!("run-{run_id}")
}

const PREFIX: &str = "run-";

impl Lake {
    /// Tags each table's `version` with [`run_tag`] of `run_id`.
    pub async fn tag_run(&self, run_id: &str, written: &BTreeMap<String, u64>) -> Result<()> {
        let tag = run_tag(run_id);
        for (table, version) in written {
            let Some(ds) = self.open(table).await? else { continue };
            match ds.tags().create(&tag, *version).await {
                Ok(()) | Err(lance::Error::RefConflict { .. }) => {}
                Err(e) => return Err(Error::lance(table, e)),
            }
        }
        Ok(())
    }

    /// A SQL session over the lake as it was after run `run` (its id, or `run-<id>`): each table
    /// at the version that run left it, which is the newest version tagged by that run or an
    /// earlier one (run ids begin with their start time); tables no run had written by then are
    /// absent.
    pub async fn session_as_of(&self, run: &str) -> Result<SessionContext> {
        let tag = if run.starts_with(PREFIX) { run.to_string() } else { run_tag(run) };
        let ctx = crate::new_session();
        ctx.register_udtf("knn", Arc::new(crate::vector::KnnFunction { lake: self.clone() }));
        let mut found = false;
        for t in self.tables().await? {
            let Some(ds) = self.open(&t).await? else { continue };
            let tags = ds.tags().list().await.map_err(|e| Error::lance(&t, e))?;
            found |= tags.contains_key(&tag);
            let Some(at) = tags.keys().filter(|k| k.starts_with(PREFIX) && k.as_str() <= tag.as_str()).max() else { continue };
            let old = ds.checkout_version(at.as_str()).await.map_err(|e| Error::lance(&t, e))?;
            let provider = lance::datafusion::LanceTableProvider::new(Arc::new(old), false, false);
            ctx.register_table(t.as_str(), Arc::new(provider))?;
        }
        if !found {
            return Err(Error::Other(format!("no table of lake {} is tagged `{tag}` (see `pipeline runs`; vacuum drops tags past its retention)", self.root())));
        }
        Ok(ctx)
    }

    /// Housekeeping of every table: drops the crop cache's rows and the thumbnails of photos no
    /// table has any more ([`crate::crops::live_hashes`]), drops `run-*` tags older than `keep` (but each table's
    /// newest), compacts small fragments, and removes versions older than `keep` that no tag
    /// holds.
    pub async fn vacuum(&self, keep: chrono::Duration) -> Result<Vec<Vacuumed>> {
        let cutoff = chrono::Utc::now() - keep;
        let mut out = Vec::new();
        // Cached crops and thumbnails of photos no table has any more.
        let live = crate::crops::live_hashes(self).await?;
        let (orphans, thumbnails) = match &live {
            Some(keep) => (crate::crops::CropCache::prune(self, keep).await?, crate::thumbnails::prune(self, keep).await?),
            None => (0, 0),
        };
        if thumbnails > 0 {
            out.push(Vacuumed { table: crate::thumbnails::DIR.into(), rows_removed: thumbnails, ..Default::default() });
        }
        for t in self.tables().await? {
            let rows_removed = if t == crate::crops::TABLE { orphans } else { 0 };
            let Some(mut ds) = self.open(&t).await? else { continue };
            let lerr = |e| Error::lance(&t, e);
            let tags = ds.tags().list().await.map_err(lerr)?;
            let newest = tags.keys().filter(|k| k.starts_with(PREFIX)).max().cloned();
            let mut tags_dropped = 0;
            for (name, c) in &tags {
                let old = c.created_at.is_some_and(|at| at < cutoff);
                if name.starts_with(PREFIX) && old && Some(name) != newest.as_ref() {
                    ds.tags().delete(name).await.map_err(lerr)?;
                    tags_dropped += 1;
                }
            }
            let fragments_before = ds.get_fragments().len();
            let m = compact_files(&mut ds, CompactionOptions::default(), None).await.map_err(lerr)?;
            let removed = ds.cleanup_old_versions(keep, Some(false), Some(false)).await.map_err(lerr)?;
            out.push(Vacuumed {
                table: t.clone(),
                fragments_before,
                fragments_after: ds.get_fragments().len(),
                compacted: m.fragments_removed,
                versions_removed: removed.old_versions,
                bytes_removed: removed.bytes_removed,
                tags_dropped,
                rows_removed,
            });
        }
        Ok(out)
    }
}

/// What [`Lake::vacuum`] did to one table (or to the thumbnails, [`crate::thumbnails::DIR`]:
/// `rows_removed` thumbnails deleted).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Vacuumed {
    pub table: String,
    pub fragments_before: usize,
    pub fragments_after: usize,
    /// Fragments rewritten into fewer.
    pub compacted: usize,
    pub versions_removed: u64,
    pub bytes_removed: u64,
    pub tags_dropped: usize,
    /// Rows deleted (the crop cache's rows of photos gone from the lake).
    pub rows_removed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Catalog, WriteKind};
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};

    async fn append(lake: &Lake, values: &[i64]) -> u64 {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap();
        let mut sink = lake.sink("t", schema, WriteKind::Append);
        sink.send(batch).await.unwrap();
        sink.finish().await.unwrap().version
    }

    async fn sum(ctx: &SessionContext) -> i64 {
        let b = ctx.sql("SELECT sum(n) FROM t").await.unwrap().collect().await.unwrap();
        b[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    }

    #[tokio::test]
    async fn a_query_as_of_a_run_sees_the_lake_then_and_vacuum_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::load(None).unwrap());
        let v1 = append(&lake, &[1, 2]).await;
        lake.tag_run("20260101T000000Z-a", &BTreeMap::from([("t".to_string(), v1)])).await.unwrap();
        let v2 = append(&lake, &[10]).await;
        lake.tag_run("20260102T000000Z-b", &BTreeMap::from([("t".to_string(), v2)])).await.unwrap();
        // A run that wrote nothing to `t`: it reads what the run before left.
        let v3 = append(&lake, &[100]).await;
        assert_eq!(sum(&lake.session_as_of("20260101T000000Z-a").await.unwrap()).await, 3);
        assert_eq!(sum(&lake.session_as_of("run-20260102T000000Z-b").await.unwrap()).await, 13);
        assert_eq!(sum(&lake.session().await.unwrap()).await, 113);
        let e = lake.session_as_of("nope").await.err().unwrap().to_string();
        assert!(e.contains("run-nope"), "{e}");

        // Vacuum with no retention: fragments compacted, untagged old versions removed, the
        // tagged ones (and the history they give) kept.
        let done = lake.vacuum(chrono::Duration::zero()).await.unwrap();
        let t = done.iter().find(|v| v.table == "t").unwrap();
        assert_eq!((t.fragments_before, t.fragments_after), (3, 1), "{t:?}");
        assert!(t.versions_removed >= 1, "{t:?}");
        assert_eq!(t.tags_dropped, 1, "the older run's tag goes, the newest stays: {t:?}");
        assert_eq!(sum(&lake.session().await.unwrap()).await, 113);
        assert_eq!(sum(&lake.session_as_of("20260102T000000Z-b").await.unwrap()).await, 13);
        // The compaction is a new version of the same rows: the content version stays.
        assert!(lake.version("t").await.unwrap().unwrap() > v3);
        assert_eq!(lake.content_version("t").await.unwrap(), Some(v3));
        let v5 = append(&lake, &[1000]).await;
        assert_eq!(lake.content_version("t").await.unwrap(), Some(v5));
    }
}
