//! One writer at a time: the lease a run holds on its lake.
//!
//! - A local lake (`file://`) is held with an exclusive OS lock on `<lake>/_lease.lock`
//!   (`flock`): a second run cannot take it, and the kernel drops it the moment the holder's
//!   process ends, however it ends (`kill -9` included). Who holds it is written beside it, in
//!   `<lake>/_lease.json`, for the message a second run prints.
//! - A lake on an object store is held with `<lake>/_lease.json` itself: created with a
//!   conditional put (fails if it exists), renewed by the holder every third of its time to live
//!   with a conditional update, and taken over by another run only once expired (a dead holder
//!   stops renewing). A holder that cannot renew has lost the lease and says so
//!   ([`Lease::check`]).
//!
//! Lance's own commits stay safe under concurrency either way; the lease keeps two runs from
//! doing the same work twice and interleaving their tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion, path::Path as ObjectPath};

use crate::{Error, Result, store};

/// Name of the holder's record in the lake's root.
pub const RECORD: &str = "_lease.json";
const LOCK: &str = "_lease.lock";

/// Who holds a lake, as its record says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    /// What holds it: `run <run id> of pipeline <name>`.
    pub what: String,
    pub host: String,
    pub pid: u32,
    /// RFC 3339, UTC.
    pub since: String,
    /// When an object-store lease lapses unless renewed, in milliseconds since the Unix epoch
    /// (unused for a local lake).
    pub expires_ms: i64,
}

impl Holder {
    pub fn new(what: impl Into<String>, ttl: Duration) -> Holder {
        let now = Utc::now();
        Holder {
            what: what.into(),
            host: hostname(),
            pid: std::process::id(),
            since: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            expires_ms: expiry(ttl),
        }
    }

    fn describe(&self) -> String {
        format!("{} (process {} on {}) since {}", self.what, self.pid, self.host, self.since)
    }
}

fn expiry(ttl: Duration) -> i64 {
    Utc::now().timestamp_millis() + ttl.as_millis() as i64
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown host".into())
}

/// How long to wait for a held lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wait {
    /// Fail at once, naming the holder.
    #[default]
    No,
    /// Try again every second until this long has passed.
    For(Duration),
}

/// A held lease; released when dropped (or when the process ends).
pub struct Lease {
    inner: Inner,
    lost: Arc<AtomicBool>,
    lake: String,
}

enum Inner {
    Local { _lock: std::fs::File, record: std::path::PathBuf },
    Object { renewer: tokio::task::JoinHandle<()>, store: Arc<dyn ObjectStore>, path: ObjectPath },
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.lake)
    }
}

impl Lease {
    /// Takes the lease of the lake at `root` for `holder`, waiting as `wait` says. A lake held by
    /// another run is [`Error::Busy`], naming that run, its process and since when.
    pub async fn acquire(root: &str, options: &std::collections::HashMap<String, String>, holder: Holder, ttl: Duration, wait: Wait) -> Result<Lease> {
        let deadline = match wait {
            Wait::No => None,
            Wait::For(d) => Some(tokio::time::Instant::now() + d),
        };
        loop {
            match Lease::try_acquire(root, options, &holder, ttl).await? {
                Ok(lease) => return Ok(lease),
                Err(other) => {
                    if deadline.is_none_or(|d| tokio::time::Instant::now() >= d) {
                        return Err(Error::Busy {
                            lake: root.to_string(),
                            holder: other.map(|h| h.describe()).unwrap_or_else(|| "another run (its record is not readable yet)".into()),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One try: the lease, or who holds it.
    async fn try_acquire(
        root: &str,
        options: &std::collections::HashMap<String, String>,
        holder: &Holder,
        ttl: Duration,
    ) -> Result<std::result::Result<Lease, Option<Holder>>> {
        let lost = Arc::new(AtomicBool::new(false));
        if let Some(dir) = root.strip_prefix("file://") {
            let dir = std::path::PathBuf::from(url::Url::parse(root).ok().and_then(|u| u.to_file_path().ok()).unwrap_or_else(|| dir.into()));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let lock_path = dir.join(LOCK);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io(&lock_path, e))?;
            let record = dir.join(RECORD);
            return match file.try_lock() {
                Ok(()) => {
                    let json = serde_json::to_vec_pretty(holder).map_err(|e| Error::Other(e.to_string()))?;
                    let tmp = dir.join(format!("{RECORD}.{}", std::process::id()));
                    std::fs::write(&tmp, json).map_err(|e| Error::io(&tmp, e))?;
                    std::fs::rename(&tmp, &record).map_err(|e| Error::io(&record, e))?;
                    Ok(Ok(Lease { inner: Inner::Local { _lock: file, record }, lost, lake: root.to_string() }))
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let other = std::fs::read(&record).ok().and_then(|b| serde_json::from_slice::<Holder>(&b).ok());
                    Ok(Err(other))
                }
                Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&lock_path, e)),
            };
        }
        let uri = format!("{}/{RECORD}", root.trim_end_matches('/'));
        let (store, path) = store::open(&uri, options)?;
        let oerr = |e: object_store::Error| Error::ObjectStore { uri: uri.clone(), source: e };
        let body = |h: &Holder| serde_json::to_vec(h).map(bytes::Bytes::from).map_err(|e| Error::Other(e.to_string()));
        let held = match store.put_opts(&path, body(holder)?.into(), PutOptions::from(PutMode::Create)).await {
            Ok(r) => UpdateVersion::from(r),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let got = match store.get(&path).await {
                    Ok(g) => g,
                    // Released between the put and the get: try again.
                    Err(object_store::Error::NotFound { .. }) => return Ok(Err(None)),
                    Err(e) => return Err(oerr(e)),
                };
                let version = UpdateVersion { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
                let bytes = got.bytes().await.map_err(oerr)?;
                let other = serde_json::from_slice::<Holder>(&bytes).ok();
                if other.as_ref().is_some_and(|o| o.expires_ms > Utc::now().timestamp_millis()) {
                    return Ok(Err(other));
                }
                // Expired (or unreadable): take it over, unless someone else did first.
                match store.put_opts(&path, body(holder)?.into(), PutOptions::from(PutMode::Update(version))).await {
                    Ok(r) => UpdateVersion::from(r),
                    Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => return Ok(Err(other)),
                    Err(e) => return Err(oerr(e)),
                }
            }
            Err(e) => return Err(oerr(e)),
        };
        let renewer = {
            let (store, path, lost, mut holder) = (store.clone(), path.clone(), lost.clone(), holder.clone());
            tokio::spawn(async move {
                let mut held = held;
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    holder.expires_ms = expiry(ttl);
                    let Ok(b) = serde_json::to_vec(&holder) else { break };
                    match store.put_opts(&path, bytes::Bytes::from(b).into(), PutOptions::from(PutMode::Update(held.clone()))).await {
                        Ok(r) => held = UpdateVersion::from(r),
                        Err(e) => {
                            tracing::error!("lost the lease of the lake: {e}");
                            lost.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                }
            })
        };
        Ok(Ok(Lease { inner: Inner::Object { renewer, store, path }, lost, lake: root.to_string() }))
    }

    /// An error once the lease was lost (an object-store lease that could not be renewed in
    /// time): the holder must not commit any more.
    pub fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::Busy { lake: self.lake.clone(), holder: "another run, after this one's lease lapsed".into() });
        }
        Ok(())
    }

    /// Gives the lease up now (dropping it does too, but an object-store lease is then deleted
    /// in the background).
    pub async fn release(self) {
        match &self.inner {
            Inner::Local { record, .. } => {
                let _ = std::fs::remove_file(record);
            }
            Inner::Object { renewer, store, path } => {
                renewer.abort();
                if !self.lost.load(Ordering::SeqCst) {
                    let _ = store.delete(path).await;
                }
            }
        }
    }
}

/// Who holds the lake at `root` now, if anyone (a local lake's record counts only while its
/// lock is held; an object-store lease only until it expires).
pub async fn holder(root: &str, options: &std::collections::HashMap<String, String>) -> Result<Option<Holder>> {
    if let Some(dir) = root.strip_prefix("file://") {
        let dir = std::path::PathBuf::from(url::Url::parse(root).ok().and_then(|u| u.to_file_path().ok()).unwrap_or_else(|| dir.into()));
        let lock_path = dir.join(LOCK);
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(&lock_path) else { return Ok(None) };
        return match file.try_lock() {
            Ok(()) => Ok(None),
            Err(std::fs::TryLockError::WouldBlock) => Ok(std::fs::read(dir.join(RECORD)).ok().and_then(|b| serde_json::from_slice::<Holder>(&b).ok())),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&lock_path, e)),
        };
    }
    let uri = format!("{}/{RECORD}", root.trim_end_matches('/'));
    let (store, path) = store::open(&uri, options)?;
    let got = match store.get(&path).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(Error::ObjectStore { uri, source: e }),
    };
    let bytes = got.bytes().await.map_err(|e| Error::ObjectStore { uri: uri.clone(), source: e })?;
    Ok(serde_json::from_slice::<Holder>(&bytes).ok().filter(|h| h.expires_ms > Utc::now().timestamp_millis()))
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Inner::Object { renewer, .. } = &self.inner {
            renewer.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_local_lake_has_one_holder_and_a_second_run_is_told_who() {
        let dir = tempfile::tempdir().unwrap();
        let root = format!("file://{}/lake", dir.path().display());
        let first = Lease::acquire(&root, &HashMap::new(), Holder::new("run A of pipeline p", TTL), TTL, Wait::No).await.unwrap();
        let e = Lease::acquire(&root, &HashMap::new(), Holder::new("run B of pipeline p", TTL), TTL, Wait::No).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&root) && msg.contains("run A of pipeline p") && msg.contains(&std::process::id().to_string()), "{msg}");
        assert!(msg.contains("since 20"), "{msg}");
        // Waiting: the second run gets it once the first lets go.
        let waiter = tokio::spawn({
            let root = root.clone();
            async move { Lease::acquire(&root, &HashMap::new(), Holder::new("run B", TTL), TTL, Wait::For(Duration::from_secs(20))).await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        first.release().await;
        let second = waiter.await.unwrap().unwrap();
        second.check().unwrap();
    }
}
