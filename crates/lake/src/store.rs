//! Locations: turning the URIs of a pipeline file into object stores.
//!
//! A location in a pipeline file is a URL (`file:///abs`, `s3://bucket/prefix`, `gs://..`,
//! `az://..`, `memory://`) or a plain path. Plain paths and `file://` followed by a relative
//! path (`file://lake`, as in the design sketch) are resolved against the pipeline file's folder,
//! so a pipeline file means the same thing from whatever directory it is run.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use url::Url;

use crate::{Error, Result};

/// Resolves a location written in a pipeline file to an absolute URL string (no trailing slash).
pub fn resolve(location: &str, base_dir: &Path) -> Result<String> {
    let bad = |reason: &str| Error::Location { uri: location.to_string(), reason: reason.to_string() };
    let location = location.trim();
    if location.is_empty() {
        return Err(bad("empty location"));
    }
    let rel_path = if let Some(rest) = location.strip_prefix("file://") {
        if rest.starts_with('/') {
            None
        } else {
            Some(rest)
        }
    } else if location.contains("://") {
        let url = Url::parse(location).map_err(|e| bad(&e.to_string()))?;
        match url.scheme() {
            "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" | "memory" | "http" | "https" => {}
            other => return Err(bad(&format!("unsupported scheme `{other}` (use file, s3, gs, az or memory)"))),
        }
        return Ok(location.trim_end_matches('/').to_string());
    } else {
        Some(location)
    };
    let url = match rel_path {
        Some(p) => {
            let p = Path::new(p);
            let abs = if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) };
            let abs = normalize(&abs);
            Url::from_file_path(&abs).map_err(|_| bad("cannot make a file URL of this path"))?
        }
        None => Url::parse(location).map_err(|e| bad(&e.to_string()))?,
    };
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Lexically removes `.` and `..` so URIs recorded in tables are stable however a path was typed.
fn normalize(p: &Path) -> std::path::PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    };
    let mut out = std::path::PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Opens the object store holding `uri` and returns it with the path of `uri` inside it.
///
/// Credentials come from the environment as each cloud's SDK would read them (`AWS_*`,
/// `GOOGLE_*`, `AZURE_*`), overridden by the pipeline's `storage_options`.
pub fn open(uri: &str, options: &HashMap<String, String>) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
    let url = Url::parse(uri).map_err(|e| Error::Location { uri: uri.into(), reason: e.to_string() })?;
    let mut opts: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    opts.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
    let (store, path) = object_store::parse_url_opts(&url, opts)
        .map_err(|e| Error::ObjectStore { uri: uri.into(), source: e })?;
    Ok((Arc::from(store), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locations_resolve_against_the_pipeline_folder() {
        let base = Path::new("/work/repo/pipelines");
        assert_eq!(resolve("file://lake", base).unwrap(), "file:///work/repo/pipelines/lake");
        assert_eq!(resolve("../data/x", base).unwrap(), "file:///work/repo/data/x");
        assert_eq!(resolve("file:///abs/lake/", base).unwrap(), "file:///abs/lake");
        assert_eq!(resolve("s3://bucket/lake/", base).unwrap(), "s3://bucket/lake");
        assert!(resolve("ftp://x/y", base).unwrap_err().to_string().contains("unsupported scheme"));
        assert!(resolve("  ", base).is_err());
    }
}
