//! The blob store behind the XStore host: where `fakehost serve --blob-root/--blob-store`
//! keeps the blobs, and the five things the protocol does with them.
//!
//! One API over three back ends, through the `object_store` crate: a local directory
//! (`LocalFileSystem`), Azure Blob Storage (Azurite in the tests) and S3. What the guest and
//! `fakehost blobs` see is exactly this module's view: names are the protocol's
//! (`vmbus::xs_fastpath::xstore::check_name`), LIST is a plain string prefix in name order
//! (object_store lists by whole path segments, in no given order), and a GET past the end is
//! told apart from a store failure the same way on every back end.
//!
//! Atomic puts, per back end (a crash mid-put leaves the old blob or the new one, never a
//! torn one):
//! * local: object_store 0.14 `LocalFileSystem::put_opts` writes `NAME#N` and renames it over
//!   `NAME` (`new_staged_upload` + `finish_staged_rename`, src/local.rs); a multipart upload
//!   stages the same way and renames in `complete()`. A crash leaves at most a `NAME#N`, which
//!   listing skips and the name rules make unaddressable. We also turn on `with_fsync`, so the
//!   rename is durable before the guest hears OK.
//! * Azure: a put is one Put Blob request, and a multipart upload is Put Block × n then Put
//!   Block List; the blob changes only when that one request commits ("Put Blob", "Put Block
//!   List" in Microsoft's Blob service REST reference: uncommitted blocks are not part of the
//!   blob and are discarded after a week).
//! * S3: PutObject, or a multipart upload that appears only at CompleteMultipartUpload.
//!
//! No credentials are ever looked up by probing the network: an Azure account other than
//! Azurite's `devstoreaccount1` needs `AZURE_STORAGE_KEY` (or `AZURE_STORAGE_SAS_TOKEN`), and
//! S3 needs `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`; without them `fakehost serve` refuses
//! to start instead of asking a cloud metadata service.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use url::Url;

/// Ranged reads retried when the blob changes between a failed read and its size.
const VERSION_RACE_RETRIES: usize = 5;

/// Where blobs live when `fakehost serve` is given neither `--blob-root` nor `--blob-store`.
pub const DEFAULT_BLOB_ROOT: &str = "/var/lib/cusedev/blobs";

/// Azurite's well-known account (Microsoft's storage emulator documentation).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known key for [`AZURITE_ACCOUNT`] (public, the same in every emulator).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A streamed upload is sent in parts of this size (also the most one part buffers).
pub const UPLOAD_PART: usize = 5 << 20;

/// Where the blobs are, as `fakehost serve` was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// A local directory, created if missing (`--blob-root DIR`, `file:///DIR`).
    Local(PathBuf),
    /// An Azure Blob Storage container (`azure://ACCOUNT/CONTAINER?endpoint=URL`).
    Azure {
        /// The storage account.
        account: String,
        /// The container (it must exist).
        container: String,
        /// The account's blob endpoint; `None`: `https://ACCOUNT.blob.core.windows.net`.
        endpoint: Option<String>,
    },
    /// An S3 bucket (`s3://BUCKET?endpoint=URL&region=R`).
    S3 {
        /// The bucket (it must exist).
        bucket: String,
        /// An S3-compatible endpoint; `None`: AWS.
        endpoint: Option<String>,
        /// The region; `None`: `AWS_REGION`, `AWS_DEFAULT_REGION` or us-east-1.
        region: Option<String>,
    },
}

/// Why a store URL or its credentials are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blob store {url:?}: {reason}")]
pub struct SpecError {
    /// What was given.
    pub url: String,
    /// What is wrong with it, and what would be right.
    pub reason: String,
}

const URL_FORMS: &str = "use file:///DIR, azure://ACCOUNT/CONTAINER?endpoint=URL or \
                         s3://BUCKET?endpoint=URL&region=REGION";

impl StoreSpec {
    /// The store as a URL, for logs and `fakehost status` (never with a secret in it).
    pub fn url(&self) -> String {
        match self {
            StoreSpec::Local(dir) => format!("file://{}", dir.display()),
            StoreSpec::Azure {
                account,
                container,
                endpoint,
            } => match endpoint {
                Some(e) => format!("azure://{account}/{container}?endpoint={e}"),
                None => format!("azure://{account}/{container}"),
            },
            StoreSpec::S3 {
                bucket,
                endpoint,
                region,
            } => {
                let query: Vec<String> = [("endpoint", endpoint), ("region", region)]
                    .iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
                    .collect();
                if query.is_empty() {
                    format!("s3://{bucket}")
                } else {
                    format!("s3://{bucket}?{}", query.join("&"))
                }
            }
        }
    }
}

impl FromStr for StoreSpec {
    type Err = SpecError;

    /// Parses `--blob-store URL`. Checks everything that can be checked without I/O.
    fn from_str(text: &str) -> Result<StoreSpec, SpecError> {
        let err = |reason: String| SpecError {
            url: text.to_owned(),
            reason,
        };
        let url = Url::parse(text).map_err(|e| err(format!("not a URL ({e}); {URL_FORMS}")))?;
        let mut options = Options::of(&url).map_err(err)?;
        let spec = match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(err(
                        "a file: URL names a local directory: file:///DIR".into()
                    ));
                }
                let dir = url
                    .to_file_path()
                    .map_err(|()| err("not an absolute directory: use file:///DIR".into()))?;
                StoreSpec::Local(dir)
            }
            "azure" => {
                let account = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| err("no account: azure://ACCOUNT/CONTAINER".into()))?;
                let container = url.path().trim_start_matches('/');
                if container.is_empty() || container.contains('/') {
                    return Err(err(
                        "the path must be exactly one container: azure://ACCOUNT/CONTAINER".into(),
                    ));
                }
                StoreSpec::Azure {
                    account: account.to_owned(),
                    container: container.to_owned(),
                    endpoint: options.endpoint().map_err(err)?,
                }
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| err("no bucket: s3://BUCKET".into()))?;
                if !matches!(url.path(), "" | "/") {
                    return Err(err("an s3: URL names a bucket only: s3://BUCKET".into()));
                }
                StoreSpec::S3 {
                    bucket: bucket.to_owned(),
                    endpoint: options.endpoint().map_err(err)?,
                    region: options.take("region"),
                }
            }
            other => return Err(err(format!("unknown scheme {other:?}; {URL_FORMS}"))),
        };
        options.finish().map_err(err)?;
        Ok(spec)
    }
}

/// A URL's query options, taken one by one so that a leftover one is an error.
struct Options(Vec<(String, String)>);

impl Options {
    fn of(url: &Url) -> Result<Options, String> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in url.query_pairs() {
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(format!("option {k:?} given twice"));
            }
            pairs.push((k.into_owned(), v.into_owned()));
        }
        Ok(Options(pairs))
    }

    fn take(&mut self, key: &str) -> Option<String> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(i).1)
    }

    /// `endpoint=`, checked: an http(s) URL with a host.
    fn endpoint(&mut self) -> Result<Option<String>, String> {
        let Some(endpoint) = self.take("endpoint") else {
            return Ok(None);
        };
        match Url::parse(&endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                Ok(Some(endpoint.trim_end_matches('/').to_owned()))
            }
            _ => Err(format!(
                "endpoint {endpoint:?} is not an http:// or https:// URL with a host"
            )),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.0.first() {
            None => Ok(()),
            Some((k, _)) => Err(format!(
                "unknown option {k:?} (azure: takes endpoint; s3: endpoint, region)"
            )),
        }
    }
}

/// Why a store operation did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreFailure {
    /// No blob with that name.
    #[error("no blob {0:?}")]
    NotFound(String),
    /// A read that starts past the blob's end.
    #[error("offset {offset} is beyond the end of {name:?} ({size} bytes)")]
    Range {
        /// The blob.
        name: String,
        /// Where the read was to start.
        offset: u64,
        /// The blob's size.
        size: u64,
    },
    /// The store itself failed (unreachable, refused, I/O error): its own words.
    #[error("{0}")]
    Store(String),
}

/// Why the store could not be opened at all.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A usable URL whose credentials are missing.
    #[error("{0}")]
    Spec(#[from] SpecError),
    /// The local directory cannot be created or used.
    #[error("blob root {dir}: {reason}")]
    Local {
        /// The directory.
        dir: PathBuf,
        /// Why, in words.
        reason: String,
    },
    /// object_store refused the configuration.
    #[error("blob store {url}: {source}")]
    Store {
        /// The store's URL.
        url: String,
        /// object_store's error.
        source: object_store::Error,
    },
}

/// What a GET brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    /// The bytes read (at most what was asked), one buffer for the whole read.
    pub bytes: Bytes,
    /// The blob's size.
    pub size: u64,
}

/// One blob in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An open blob store.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    url: String,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore").field("url", &self.url).finish()
    }
}

/// HTTP back ends: a connect that does not succeed in this time is an unreachable store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP back ends: one request (a 32 MiB GET or PUT included) gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn client_options(endpoint: Option<&str>) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
}

/// A few quick retries, not object_store's default of ten over three minutes: a store that
/// is down should be reported while the guest still waits for its answer.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl BlobStore {
    /// Opens the store `spec` names. The local directory is created (with its parents) if
    /// missing; remote stores are only configured here (no request is sent: see
    /// [`BlobStore::probe`]).
    pub fn open(spec: &StoreSpec) -> Result<BlobStore, OpenError> {
        let url = spec.url();
        let store_err = |source| OpenError::Store {
            url: url.clone(),
            source,
        };
        let spec_err = |reason: &str| {
            OpenError::Spec(SpecError {
                url: url.clone(),
                reason: reason.to_owned(),
            })
        };
        let store: Arc<dyn ObjectStore> = match spec {
            StoreSpec::Local(dir) => {
                let local = |reason: String| OpenError::Local {
                    dir: dir.clone(),
                    reason,
                };
                std::fs::create_dir_all(dir).map_err(|e| {
                    local(format!("cannot create it: {}", crate::cli::os_reason(&e)))
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| local(e.to_string()))?
                    .with_fsync(true);
                Arc::new(fs)
            }
            StoreSpec::Azure {
                account,
                container,
                endpoint,
            } => {
                let mut builder = MicrosoftAzureBuilder::new()
                    .with_account(account)
                    .with_container_name(container)
                    .with_client_options(client_options(endpoint.as_deref()))
                    .with_retry(retry());
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                builder = if let Some(key) =
                    env("AZURE_STORAGE_KEY").or_else(|| env("AZURE_STORAGE_ACCOUNT_KEY"))
                {
                    builder.with_access_key(key)
                } else if let Some(sas) = env("AZURE_STORAGE_SAS_TOKEN") {
                    builder.with_config(object_store::azure::AzureConfigKey::SasKey, sas)
                } else if account == AZURITE_ACCOUNT {
                    builder.with_access_key(AZURITE_KEY)
                } else {
                    return Err(spec_err(&format!(
                        "no credentials for account {account}: set AZURE_STORAGE_KEY (the \
                         account key) or AZURE_STORAGE_SAS_TOKEN"
                    )));
                };
                Arc::new(builder.build().map_err(store_err)?)
            }
            StoreSpec::S3 {
                bucket,
                endpoint,
                region,
            } => {
                let (Some(key_id), Some(secret)) =
                    (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
                else {
                    return Err(spec_err(
                        "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    ));
                };
                let region = region
                    .clone()
                    .or_else(|| env("AWS_REGION"))
                    .or_else(|| env("AWS_DEFAULT_REGION"))
                    .unwrap_or_else(|| "us-east-1".to_owned());
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_access_key_id(key_id)
                    .with_secret_access_key(secret)
                    .with_client_options(client_options(endpoint.as_deref()))
                    .with_retry(retry());
                if let Some(token) = env("AWS_SESSION_TOKEN") {
                    builder = builder.with_token(token);
                }
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                Arc::new(builder.build().map_err(store_err)?)
            }
        };
        Ok(BlobStore { store, url })
    }

    /// The store's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One cheap request that proves the store answers (a listing of the top level).
    pub async fn probe(&self) -> Result<(), StoreFailure> {
        self.store
            .list_with_delimiter(None)
            .await
            .map(drop)
            .map_err(|e| StoreFailure::Store(e.to_string()))
    }

    /// Up to `max` bytes of `name` from `offset`, all from one version of the blob. An offset
    /// equal to the size reads nothing; past it is [`StoreFailure::Range`].
    pub async fn get(&self, name: &str, offset: u64, max: u64) -> Result<Got, StoreFailure> {
        let path = path(name)?;
        if max == 0 {
            return match self.empty_read(name, &path, offset, None).await? {
                Some(got) => Ok(got),
                None => Err(StoreFailure::Store(format!("{name}: no size"))),
            };
        }
        let range: Range<u64> = offset..offset.saturating_add(max);
        let mut last = None;
        // A ranged read that fails, then a size that says the range was fine: the blob was
        // replaced in between (another writer's put). Each attempt answers from one version.
        for _ in 0..VERSION_RACE_RETRIES {
            let options = GetOptions::new().with_range(Some(range.clone()));
            match self.store.get_opts(&path, options).await {
                Ok(result) => {
                    let size = result.meta.size;
                    let bytes = result.bytes().await.map_err(|e| failure(name, e))?;
                    return Ok(Got { bytes, size });
                }
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(StoreFailure::NotFound(name.to_owned()))
                }
                // A range that starts at or past the end is an error on every back end; the
                // size tells which of ours it is.
                Err(e) => {
                    if let Some(got) = self.empty_read(name, &path, offset, Some(&e)).await? {
                        return Ok(got);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.map_or_else(
            || StoreFailure::Store(format!("{name}: no answer")),
            |e| failure(name, e),
        ))
    }

    /// A read of nothing at `offset`: OK at or before the end, RANGE past it. With `first`,
    /// the error of a ranged read that brought us here: `Ok(None)` when the size now says
    /// that read should have worked (the blob changed in between: read again).
    async fn empty_read(
        &self,
        name: &str,
        path: &Path,
        offset: u64,
        first: Option<&object_store::Error>,
    ) -> Result<Option<Got>, StoreFailure> {
        let size = match self.store.head(path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreFailure::NotFound(name.to_owned()))
            }
            Err(e) => return Err(failure(name, e)),
        };
        match (offset.cmp(&size), first) {
            (std::cmp::Ordering::Greater, _) => Err(StoreFailure::Range {
                name: name.to_owned(),
                offset,
                size,
            }),
            (std::cmp::Ordering::Less, Some(_)) => Ok(None),
            _ => Ok(Some(Got {
                bytes: Bytes::new(),
                size,
            })),
        }
    }

    /// Replaces `name` with `bytes` in one atomic put (see the module docs).
    pub async fn put(&self, name: &str, bytes: Bytes) -> Result<(), StoreFailure> {
        let path = path(name)?;
        self.store
            .put(&path, PutPayload::from_bytes(bytes))
            .await
            .map(drop)
            .map_err(|e| failure(name, e))
    }

    /// Every blob whose name starts with `prefix` (a plain string prefix), in name order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreFailure> {
        // object_store lists by whole segments: ask for the deepest directory the prefix
        // names, then keep what starts with the prefix.
        let dir = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        let dir = match dir {
            "" => None,
            dir => match Path::parse(dir) {
                Ok(dir) => Some(dir),
                // "a//b", "./x": no stored name can start with that.
                Err(_) => return Ok(Vec::new()),
            },
        };
        let mut found: Vec<Listed> = self
            .store
            .list(dir.as_ref())
            .map_err(|e| StoreFailure::Store(e.to_string()))
            .try_filter_map(|meta| async move {
                let name = meta.location.as_ref();
                Ok(name.starts_with(prefix).then(|| Listed {
                    name: name.to_owned(),
                    size: meta.size,
                }))
            })
            .try_collect()
            .await?;
        found.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Deletes `name`; [`StoreFailure::NotFound`] if there is none (on every back end: S3
    /// would say nothing).
    pub async fn delete(&self, name: &str) -> Result<(), StoreFailure> {
        self.stat(name).await?;
        let path = path(name)?;
        self.store.delete(&path).await.map_err(|e| failure(name, e))
    }

    /// The size of `name`.
    pub async fn stat(&self, name: &str) -> Result<u64, StoreFailure> {
        let path = path(name)?;
        self.store
            .head(&path)
            .await
            .map(|meta| meta.size)
            .map_err(|e| failure(name, e))
    }

    /// The whole of `name` as a stream of chunks, and its size (`fakehost blobs get`).
    pub async fn get_stream(
        &self,
        name: &str,
    ) -> Result<(BoxStream<'static, Result<Bytes, StoreFailure>>, u64), StoreFailure> {
        let path = path(name)?;
        let result = self.store.get(&path).await.map_err(|e| failure(name, e))?;
        let size = result.meta.size;
        let owned = name.to_owned();
        let stream = result
            .into_stream()
            .map_err(move |e| failure(&owned, e))
            .boxed();
        Ok((stream, size))
    }

    /// Starts a streamed put of `name` (`fakehost blobs put`): bytes go out in parts of
    /// [`UPLOAD_PART`] as they come, and the blob changes only at [`Upload::finish`].
    pub fn upload(&self, name: &str) -> Result<Upload, StoreFailure> {
        Ok(Upload {
            store: Arc::clone(&self.store),
            name: name.to_owned(),
            path: path(name)?,
            state: UploadState::Buffer(Vec::new()),
        })
    }
}

/// A put fed in pieces. Small blobs (under one part) are one plain put at the end; larger
/// ones a multipart upload, staged until [`Upload::finish`] commits it.
pub struct Upload {
    store: Arc<dyn ObjectStore>,
    name: String,
    path: Path,
    state: UploadState,
}

enum UploadState {
    Buffer(Vec<u8>),
    Parts(WriteMultipart),
}

impl Upload {
    /// Adds bytes. Waits while too many parts are in flight.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreFailure> {
        match &mut self.state {
            UploadState::Buffer(buffer) if buffer.len() + bytes.len() < UPLOAD_PART => {
                buffer.extend_from_slice(bytes);
            }
            UploadState::Buffer(buffer) => {
                let upload = self
                    .store
                    .put_multipart(&self.path)
                    .await
                    .map_err(|e| failure(&self.name, e))?;
                let mut parts = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART);
                parts.put(Bytes::from(std::mem::take(buffer)));
                parts.write(bytes);
                self.state = UploadState::Parts(parts);
            }
            UploadState::Parts(parts) => {
                parts
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| failure(&self.name, e))?;
                parts.write(bytes);
            }
        }
        Ok(())
    }

    /// Commits the blob: from here on readers see the new contents, whole.
    pub async fn finish(self) -> Result<(), StoreFailure> {
        let name = self.name;
        match self.state {
            UploadState::Buffer(buffer) => self
                .store
                .put(&self.path, PutPayload::from(buffer))
                .await
                .map(drop),
            UploadState::Parts(parts) => parts.finish().await.map(drop),
        }
        .map_err(|e| failure(&name, e))
    }

    /// Gives up: parts already sent are discarded, the old blob stays.
    pub async fn abort(self) {
        if let UploadState::Parts(parts) = self.state {
            if let Err(e) = parts.abort().await {
                log::warn!("xs: aborting the upload of {:?} failed: {e}", self.name);
            }
        }
    }
}

/// The store path of a name the protocol accepts.
fn path(name: &str) -> Result<Path, StoreFailure> {
    Path::parse(name).map_err(|e| StoreFailure::Store(format!("name {name:?}: {e}")))
}

fn failure(name: &str, e: object_store::Error) -> StoreFailure {
    match e {
        object_store::Error::NotFound { .. } => StoreFailure::NotFound(name.to_owned()),
        e => StoreFailure::Store(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    fn spec(text: &str) -> Result<StoreSpec, String> {
        text.parse::<StoreSpec>().map_err(|e| e.to_string())
    }

    #[test]
    fn store_urls_parse_into_their_back_ends() {
        assert_eq!(
            spec("file:///var/lib/x"),
            Ok(StoreSpec::Local("/var/lib/x".into()))
        );
        assert_eq!(
            spec("azure://devstoreaccount1/c1?endpoint=http://127.0.0.1:10000/devstoreaccount1/"),
            Ok(StoreSpec::Azure {
                account: "devstoreaccount1".into(),
                container: "c1".into(),
                endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
            })
        );
        assert_eq!(
            spec("s3://bkt?endpoint=http://127.0.0.1:9000&region=eu-west-1"),
            Ok(StoreSpec::S3 {
                bucket: "bkt".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: Some("eu-west-1".into()),
            })
        );
        assert_eq!(
            spec("s3://bkt").unwrap().url(),
            "s3://bkt",
            "no empty query in the display form"
        );
    }

    #[test]
    fn bad_store_urls_say_what_is_wrong() {
        for (url, says) in [
            ("/var/lib/x", "not a URL"),
            ("ftp://host/x", "unknown scheme \"ftp\""),
            ("file://host/x", "local directory"),
            ("azure://acct", "exactly one container"),
            ("azure://acct/a/b", "exactly one container"),
            (
                "azure://acct/c?endpoint=127.0.0.1:1",
                "not an http:// or https://",
            ),
            ("azure://acct/c?key=secret", "unknown option \"key\""),
            (
                "azure://acct/c?endpoint=http://a&endpoint=http://b",
                "given twice",
            ),
            ("s3://bkt/dir", "bucket only"),
        ] {
            let err = spec(url).unwrap_err();
            assert!(err.contains(says), "{url}: {err}");
            assert!(err.starts_with(&format!("blob store {url:?}")), "{err}");
        }
    }

    #[test]
    fn azure_account_without_key_refuses_to_open() {
        // Only when the environment has no key (the test runner's usually has none).
        if env("AZURE_STORAGE_KEY").is_some()
            || env("AZURE_STORAGE_ACCOUNT_KEY").is_some()
            || env("AZURE_STORAGE_SAS_TOKEN").is_some()
        {
            return;
        }
        let err = BlobStore::open(&spec("azure://someaccount/c").unwrap()).unwrap_err();
        assert!(err.to_string().contains("set AZURE_STORAGE_KEY"), "{err}");
        assert!(BlobStore::open(&spec("azure://devstoreaccount1/c").unwrap()).is_ok());
    }

    #[test]
    fn blob_root_that_is_a_file_refuses_to_open() {
        let dir = TempDir::new("xs-store-file");
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = BlobStore::open(&StoreSpec::Local(file.join("blobs"))).unwrap_err();
        assert!(err.to_string().contains("cannot create it"), "{err}");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn local_store_get_put_list_stat_delete() {
        let dir = TempDir::new("xs-store");
        let root = dir.path().join("blobs/nested");
        let store = BlobStore::open(&StoreSpec::Local(root.clone())).unwrap();
        assert!(root.is_dir(), "created if missing");
        runtime().block_on(async {
            for name in ["b/2", "a", "b/1", "b10", "odd name%20#x"] {
                store
                    .put(name, Bytes::from(name.as_bytes().to_vec()))
                    .await
                    .unwrap();
            }
            store.put("empty", Bytes::new()).await.unwrap();
            let names = |v: Vec<Listed>| v.into_iter().map(|l| l.name).collect::<Vec<_>>();
            assert_eq!(
                names(store.list("").await.unwrap()),
                ["a", "b/1", "b/2", "b10", "empty", "odd name%20#x"]
            );
            assert_eq!(names(store.list("b").await.unwrap()), ["b/1", "b/2", "b10"]);
            assert_eq!(names(store.list("b/").await.unwrap()), ["b/1", "b/2"]);
            assert!(store.list("zz/").await.unwrap().is_empty());
            assert!(store.list("a//").await.unwrap().is_empty());

            let got = store.get("b10", 1, 100).await.unwrap();
            assert_eq!((&got.bytes[..], got.size), (&b"10"[..], 3));
            let at_end = store.get("b10", 3, 100).await.unwrap();
            assert_eq!((at_end.bytes.len(), at_end.size), (0, 3));
            assert!(matches!(
                store.get("b10", 4, 100).await,
                Err(StoreFailure::Range { size: 3, .. })
            ));
            let empty = store.get("empty", 0, 10).await.unwrap();
            assert_eq!((empty.bytes.len(), empty.size), (0, 0));
            assert_eq!(store.get("odd name%20#x", 0, 99).await.unwrap().size, 13);
            assert_eq!(
                store.get("nope", 0, 1).await,
                Err(StoreFailure::NotFound("nope".into()))
            );

            assert_eq!(store.stat("b/1").await, Ok(3));
            store.delete("b/1").await.unwrap();
            assert_eq!(
                store.delete("b/1").await,
                Err(StoreFailure::NotFound("b/1".into()))
            );
            assert_eq!(
                store.stat("b/1").await,
                Err(StoreFailure::NotFound("b/1".into()))
            );
        });
    }

    #[test]
    fn streamed_upload_commits_only_at_finish() {
        let dir = TempDir::new("xs-upload");
        let store = BlobStore::open(&StoreSpec::Local(dir.path().into())).unwrap();
        runtime().block_on(async {
            store.put("big", Bytes::from_static(b"old")).await.unwrap();
            let mut upload = store.upload("big").unwrap();
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..((2 * UPLOAD_PART) >> 20) + 1 {
                upload.write(&chunk).await.unwrap();
            }
            assert_eq!(&store.get("big", 0, 10).await.unwrap().bytes[..], b"old");
            upload.finish().await.unwrap();
            assert_eq!(
                store.stat("big").await.unwrap(),
                (2 * UPLOAD_PART + (1 << 20)) as u64
            );

            let mut aborted = store.upload("big").unwrap();
            for _ in 0..(UPLOAD_PART >> 20) + 1 {
                aborted.write(&chunk).await.unwrap();
            }
            aborted.abort().await;
            assert_eq!(
                store.stat("big").await.unwrap(),
                (2 * UPLOAD_PART + (1 << 20)) as u64
            );
            let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(leftovers, ["big"], "no staged file left behind");
        });
    }
}
