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

/// Whether a location written in a pipeline file is relative to that file's folder (a plain
/// relative path, or `file://` followed by one).
pub fn is_relative(location: &str) -> bool {
    let l = location.trim();
    match l.strip_prefix("file://") {
        Some(rest) => !rest.starts_with('/'),
        None => !l.contains("://") && !Path::new(l).is_absolute(),
    }
}

/// How a lake's tables record the local object `uri` when the lake and the object's source were
/// both written relative to the pipeline file: as a path relative to the lake's root
/// (`../demo-lake/photos/IMG_1.jpg`), so that moving the project folder, lake and photos
/// together, leaves every recorded location valid. None when either is not a `file://` URI.
pub fn lake_relative(lake_root: &str, uri: &str) -> Option<String> {
    let root = Url::parse(lake_root).ok()?.to_file_path().ok()?;
    let path = Url::parse(uri).ok()?.to_file_path().ok()?;
    let (root, path) = (normalize(&root), normalize(&path));
    let (r, p): (Vec<_>, Vec<_>) = (root.components().collect(), path.components().collect());
    let common = r.iter().zip(&p).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut parts: Vec<String> = vec!["..".to_string(); r.len() - common];
    parts.extend(p[common..].iter().map(|c| c.as_os_str().to_string_lossy().to_string()));
    Some(parts.join("/"))
}

/// The URI of a location recorded in a lake's table: a URI as it is, a lake-relative path (see
/// [`lake_relative`]) resolved against the lake's root.
pub fn locate(lake_root: &str, recorded: &str) -> String {
    if recorded.contains("://") {
        return recorded.to_string();
    }
    let root = if lake_root.contains("://") {
        Url::parse(lake_root).ok().and_then(|u| u.to_file_path().ok())
    } else {
        Some(std::path::PathBuf::from(lake_root))
    };
    match root {
        Some(root) => Url::from_file_path(normalize(&root.join(recorded)))
            .map(|u| u.to_string())
            .unwrap_or_else(|_| recorded.to_string()),
        None => format!("{}/{}", lake_root.trim_end_matches('/'), recorded),
    }
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
    if matches!(url.scheme(), "s3" | "s3a") {
        return open_s3(uri, &url, &opts);
    }
    let (store, path) = object_store::parse_url_opts(&url, opts)
        .map_err(|e| Error::ObjectStore { uri: uri.into(), source: e })?;
    Ok((Arc::from(store), path))
}

/// An S3 store with the settings given (the `AWS_*` environment, then the pipeline's options)
/// and, unless those hold a key, the AWS SDK's credential chain — the one Lance uses for the
/// lake: environment, `AWS_PROFILE` profiles and SSO, web identity, ECS and EC2 roles. So the
/// photos and the lake are read with the same credentials.
fn open_s3(uri: &str, url: &url::Url, opts: &[(String, String)]) -> Result<(Arc<dyn ObjectStore>, ObjectPath)> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let err = |e| Error::ObjectStore { uri: uri.into(), source: e };
    let mut b = AmazonS3Builder::new().with_url(url.as_str());
    let mut keyed = false;
    for (k, v) in opts {
        if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
            keyed |= matches!(key, AmazonS3ConfigKey::AccessKeyId | AmazonS3ConfigKey::SkipSignature);
            b = b.with_config(key, v.clone());
        }
    }
    // `[pipeline.storage]`'s retries, as Lance reads them for the lake.
    let setting = |name: &str| opts.iter().rev().find(|(k, _)| k.eq_ignore_ascii_case(name)).and_then(|(_, v)| v.parse::<u64>().ok());
    let defaults = object_store::RetryConfig::default();
    b = b.with_retry(object_store::RetryConfig {
        max_retries: setting("client_max_retries").map_or(defaults.max_retries, |n| n as usize),
        retry_timeout: setting("client_retry_timeout").map_or(defaults.retry_timeout, std::time::Duration::from_secs),
        ..defaults
    });
    if !keyed {
        let chain = lance_io::object_store::providers::aws::AwsCredentialAdapter::new(Arc::new(DefaultChain::default()), std::time::Duration::from_secs(60));
        b = b.with_credentials(Arc::new(chain));
    }
    let store = b.build().map_err(err)?;
    let path = ObjectPath::from_url_path(url.path()).map_err(|e| err(e.into()))?;
    Ok((Arc::new(store), path))
}

/// The AWS SDK's default credential chain, built on first use (building it reads the profile
/// files, which is asynchronous) and kept.
#[derive(Debug, Default)]
struct DefaultChain(tokio::sync::OnceCell<aws_config::default_provider::credentials::DefaultCredentialsChain>);

impl aws_credential_types::provider::ProvideCredentials for DefaultChain {
    fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let chain = self
                .0
                .get_or_init(|| async { aws_config::default_provider::credentials::DefaultCredentialsChain::builder().build().await })
                .await;
            chain.provide_credentials().await
        })
    }
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

    #[test]
    fn local_objects_are_recorded_relative_to_the_lake_and_located_back() {
        assert!(is_relative("file://lake") && is_relative("../data/x") && is_relative("photos"));
        assert!(!is_relative("file:///abs") && !is_relative("/abs") && !is_relative("s3://b/p"));
        let root = "file:///proj/data/lake";
        let uri = "file:///proj/data/demo-lake/photos/a%20b/IMG_1.jpg";
        let rel = lake_relative(root, uri).unwrap();
        assert_eq!(rel, "../demo-lake/photos/a b/IMG_1.jpg");
        assert_eq!(locate(root, &rel), uri);
        // The project moved: the same record names the photo in its new place.
        assert_eq!(locate("file:///elsewhere/p/data/lake", &rel), "file:///elsewhere/p/data/demo-lake/photos/a%20b/IMG_1.jpg");
        assert_eq!(locate(root, "s3://bucket/x.jpg"), "s3://bucket/x.jpg");
        assert_eq!(lake_relative("s3://bucket/lake", uri), None);
        assert_eq!(lake_relative(root, "s3://bucket/x.jpg"), None);
        assert_eq!(locate("/proj/data/lake", "../p/x.jpg"), "file:///proj/data/p/x.jpg");
    }
}
