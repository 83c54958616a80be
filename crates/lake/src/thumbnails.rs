//! Thumbnails kept in the lake (`<lake>/_thumbnails/`), so the review page and the API decode a
//! high-resolution photo once per size, not on every request. A thumbnail is a small JPEG
//! object named by the photo's content hash and its side: photo bytes that change get new
//! thumbnails (their hash changes), a photo renamed or moved keeps its own, and nothing stale
//! is ever served. `pipeline vacuum` deletes those of photos the lake no longer has.
//!
//! Writing one is best-effort for its caller: a lake it cannot write to (read-only
//! credentials) still answers, it only decodes again.

use std::collections::HashSet;

use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};

use crate::{Error, Lake, Result, store};

/// The folder under the lake's root.
pub const DIR: &str = "_thumbnails";

/// The object of photo bytes `content_hash` at `side`: `_thumbnails/ab/abcdef…-256.jpg`.
fn uri(lake: &Lake, content_hash: &str, side: u32) -> Result<String> {
    if content_hash.len() < 8 || !content_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Other(format!("`{content_hash}` is not a content hash (hex digits)")));
    }
    Ok(format!("{}/{DIR}/{}/{content_hash}-{side}.jpg", lake.root().trim_end_matches('/'), &content_hash[..2]))
}

/// The thumbnail of `content_hash` at `side`, None when there is none yet.
pub async fn get(lake: &Lake, content_hash: &str, side: u32) -> Result<Option<Vec<u8>>> {
    let target = uri(lake, content_hash, side)?;
    let (s, path) = store::open(&target, lake.options())?;
    match s.get(&path).await {
        Ok(r) => Ok(Some(r.bytes().await.map_err(|e| Error::ObjectStore { uri: target, source: e })?.to_vec())),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(Error::ObjectStore { uri: target, source: e }),
    }
}

/// Keeps `jpeg` as the thumbnail of `content_hash` at `side` (one put: a reader sees all of it
/// or none; two servers writing the same one write the same bytes).
pub async fn put(lake: &Lake, content_hash: &str, side: u32, jpeg: Vec<u8>) -> Result<()> {
    let target = uri(lake, content_hash, side)?;
    let (s, path) = store::open(&target, lake.options())?;
    s.put(&path, PutPayload::from(jpeg)).await.map_err(|e| Error::ObjectStore { uri: target, source: e })?;
    Ok(())
}

/// Deletes the thumbnails whose photo bytes are not in `keep` (content hashes of the photos
/// the lake still has). Returns how many it deleted.
pub async fn prune(lake: &Lake, keep: &HashSet<String>) -> Result<u64> {
    let root = format!("{}/{DIR}", lake.root().trim_end_matches('/'));
    let (s, prefix) = store::open(&root, lake.options())?;
    let listed: Vec<object_store::ObjectMeta> = match s.list(Some(&prefix)).try_collect().await {
        Ok(l) => l,
        Err(object_store::Error::NotFound { .. }) => return Ok(0),
        Err(e) => return Err(Error::ObjectStore { uri: root, source: e }),
    };
    let mut removed = 0;
    for m in listed {
        let hash = m.location.filename().and_then(|f| f.rsplit_once('-')).map(|(h, _)| h.to_string()).unwrap_or_default();
        if !keep.contains(&hash) {
            match s.delete(&m.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(e) => return Err(Error::ObjectStore { uri: format!("{root}/{}", m.location), source: e }),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;

    #[tokio::test]
    async fn a_thumbnail_is_kept_by_content_and_side_and_pruned_with_its_photo() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(format!("file://{}", dir.path().display()), Default::default(), Catalog::default());
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        assert_eq!(get(&lake, &a, 256).await.unwrap(), None);
        put(&lake, &a, 256, vec![1, 2, 3]).await.unwrap();
        put(&lake, &a, 96, vec![4]).await.unwrap();
        put(&lake, &b, 256, vec![5]).await.unwrap();
        assert_eq!(get(&lake, &a, 256).await.unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(get(&lake, &a, 96).await.unwrap(), Some(vec![4]), "each side its own");
        assert!(dir.path().join(DIR).join("ab").join(format!("{a}-256.jpg")).is_file());
        assert!(lake.tables().await.unwrap().is_empty(), "not a table");
        // A key that is not a hash names itself, and never reaches a path.
        let e = get(&lake, "../../etc/passwd", 256).await.unwrap_err().to_string();
        assert!(e.contains("not a content hash"), "{e}");
        // b's photo is gone from the lake: its thumbnail goes, a's stay.
        assert_eq!(prune(&lake, &HashSet::from([a.clone()])).await.unwrap(), 1);
        assert_eq!(get(&lake, &b, 256).await.unwrap(), None);
        assert_eq!(get(&lake, &a, 256).await.unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(prune(&lake, &HashSet::from([a])).await.unwrap(), 0);
    }
}
