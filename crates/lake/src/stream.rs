//! Tables read while they are being written: the streamed edges between stages.
//!
//! A producer's [`crate::TableSink`] can carry a [`Tee`]: every batch it sends to its writer also
//! goes, over a bounded channel, to each stage that streams the table. What a reader receives is
//! the table as it will be after the commit, so a stage reads the same rows streamed as it would
//! from the committed table (in another order):
//!
//! - an overwrite: the batches sent;
//! - a merge: the batches sent (for `update_existing = false`, less the rows whose key the table
//!   already has), then the rows of the table as it was that no sent row replaces.
//!
//! A reader gets [`Tap::Start`] with the first batch, then [`Tap::Batch`]es, then [`Tap::End`]
//! once the whole table went by. A channel that closes without `Start` means the producer wrote
//! nothing this run (up to date, or a merge with no news): the reader then reads the committed
//! table. One that closes after `Start` without `End` means the producer failed.
//!
//! The other half is the [`Gate`]: a sink fed from a stream commits only once every producer it
//! streamed from has committed, so a failure anywhere upstream commits nothing downstream.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;

use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use futures::TryStreamExt;
use tokio::sync::mpsc;

use crate::tables::Columns;
use crate::{Error, Lake, Result};

/// Batches in flight per streamed edge: enough to keep both sides busy, small enough that a
/// slow reader holds its producer back instead of letting batches pile up in memory.
pub const EDGE_CAPACITY: usize = 4;

/// One message of a streamed edge.
#[derive(Debug)]
pub enum Tap {
    /// The producer writes the table this run: batches follow.
    Start,
    Batch(RecordBatch),
    /// Every row of the table after the commit has been sent.
    End,
}

/// The sending ends of a table's streamed edges.
pub type TapSenders = Vec<mpsc::Sender<Tap>>;

/// What the merge rules need to know to send the table as it will be.
enum Rows {
    /// Overwrite and append-less writes: exactly what is sent.
    Sent,
    /// Append: the table as it was (pinned at the sink's start) goes out after what is sent.
    Append { before: Box<lance::Dataset> },
    /// Merge: the table as it was (pinned at the sink's start), its key columns, and whether a
    /// sent row with an existing key replaces it.
    Merge { before: Box<lance::Dataset>, keys: Vec<String>, update_existing: bool, existing: HashSet<String>, sent: HashSet<String> },
}

/// The producer's side of a table's streamed edges.
pub struct Tee {
    table: String,
    readers: TapSenders,
    started: bool,
    rows: Rows,
}

/// The key of row `i` (the key columns' values joined; keys are strings in every table here).
fn row_keys(table: &str, batch: &RecordBatch, keys: &[String]) -> Result<Vec<String>> {
    let c = Columns::new(table, batch);
    let cols = keys.iter().map(|k| c.strings(k)).collect::<Result<Vec<_>>>()?;
    Ok((0..batch.num_rows()).map(|i| cols.iter().map(|a| a.value(i)).collect::<Vec<_>>().join("\u{1f}")).collect())
}

impl Tee {
    /// A tee for an overwrite of `table`.
    pub fn overwrite(table: &str, readers: TapSenders) -> Tee {
        Tee { table: table.to_string(), readers, started: false, rows: Rows::Sent }
    }

    /// A tee for an append to `table`: its rows as they are go out after the sent ones.
    pub async fn append(lake: &Lake, table: &str, readers: TapSenders) -> Result<Tee> {
        let rows = match lake.open(table).await? {
            None => Rows::Sent,
            Some(ds) => Rows::Append { before: Box::new(ds) },
        };
        Ok(Tee { table: table.to_string(), readers, started: false, rows })
    }

    /// A tee for a merge into `table` by `keys`: reads the keys the table has now.
    pub async fn merge(lake: &Lake, table: &str, keys: &[String], update_existing: bool, readers: TapSenders) -> Result<Tee> {
        let rows = match lake.open(table).await? {
            None => Rows::Sent,
            Some(ds) => {
                let mut existing = HashSet::new();
                let cols: Vec<&str> = keys.iter().map(String::as_str).collect();
                let mut scan = ds.scan();
                scan.project(&cols).map_err(|e| Error::lance(table, e))?;
                let mut s = scan.try_into_stream().await.map_err(|e| Error::lance(table, e))?;
                while let Some(b) = s.try_next().await.map_err(|e| Error::lance(table, e))? {
                    existing.extend(row_keys(table, &b, keys)?);
                }
                Rows::Merge { before: Box::new(ds), keys: keys.to_vec(), update_existing, existing, sent: HashSet::new() }
            }
        };
        Ok(Tee { table: table.to_string(), readers, started: false, rows })
    }

    /// Sends to every reader that is still there (a reader that went away has failed, and its
    /// failure ends the run; the producer is not the one to report it).
    async fn broadcast(&mut self, make: impl Fn() -> Tap) {
        let mut alive = Vec::with_capacity(self.readers.len());
        for r in self.readers.drain(..) {
            if r.send(make()).await.is_ok() {
                alive.push(r);
            }
        }
        self.readers = alive;
    }

    async fn emit(&mut self, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        if !self.started {
            self.started = true;
            self.broadcast(|| Tap::Start).await;
        }
        self.broadcast(|| Tap::Batch(batch.clone())).await;
    }

    /// Passes on a batch the producer sends (already conformed to the declared schema).
    pub async fn send(&mut self, batch: &RecordBatch) -> Result<()> {
        let batch = match &mut self.rows {
            Rows::Sent | Rows::Append { .. } => batch.clone(),
            Rows::Merge { keys, update_existing, existing, sent, .. } => {
                let ks = row_keys(&self.table, batch, keys)?;
                if *update_existing {
                    sent.extend(ks);
                    batch.clone()
                } else {
                    // An existing key keeps its row: the table's own copy goes out at the end.
                    let keep: BooleanArray = ks.iter().map(|k| Some(!existing.contains(k))).collect();
                    for (k, keep) in ks.into_iter().zip(keep.iter()) {
                        if keep == Some(true) {
                            sent.insert(k);
                        }
                    }
                    filter_record_batch(batch, &keep)?
                }
            }
        };
        self.emit(batch).await;
        Ok(())
    }

    /// The rest of the table (a merge's rows that no sent row replaced), then [`Tap::End`]. A
    /// tee that never started sends nothing: its readers read the committed table.
    pub async fn finish(mut self) -> Result<()> {
        let (before, replaced) = match std::mem::replace(&mut self.rows, Rows::Sent) {
            Rows::Sent => (None, None),
            Rows::Append { before } => (Some(before), None),
            Rows::Merge { before, keys, sent, .. } => (Some(before), Some((keys, sent))),
        };
        // A tee that never started leaves its readers to the committed table.
        if let (Some(before), true) = (before, self.started) {
            let mut s = before.scan().try_into_stream().await.map_err(|e| Error::lance(&self.table, e))?;
            while let Some(b) = s.try_next().await.map_err(|e| Error::lance(&self.table, e))? {
                let b = match &replaced {
                    Some((keys, sent)) => {
                        let keep: BooleanArray = row_keys(&self.table, &b, keys)?.iter().map(|k| Some(!sent.contains(k))).collect();
                        filter_record_batch(&b, &keep)?
                    }
                    None => b,
                };
                self.emit(b).await;
            }
        }
        if self.started {
            self.broadcast(|| Tap::End).await;
        }
        Ok(())
    }
}

/// Waits until every producer a sink streamed from has committed; an error when one did not.
pub type Gate = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
