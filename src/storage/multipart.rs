//! S3 multipart uploads that were started and never completed: listed with
//! ListMultipartUploads and aborted with AbortMultipartUpload.
//!
//! object_store aborts an upload whose input fails, but a process killed mid-copy
//! cannot, and object_store has no call that lists unfinished uploads. The listing is
//! therefore a request of our own: a URL presigned by object_store's own S3 signer
//! (so region, endpoint, addressing style and session tokens are exactly as for every
//! other request), sent with object_store's own HTTP client and settings, its XML
//! answer read with quick-xml. Aborting uses object_store's `MultipartStore`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use http::Method;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};
use object_store::{ClientConfigKey, ClientOptions};

use super::{IncompleteUpload, UploadHandle};

const STORE: &str = "S3";
/// How long a presigned listing URL stays valid: it is used at once.
const SIGNED_FOR: Duration = Duration::from_secs(300);

/// The HTTP settings the S3 store was built with (endpoint over plain HTTP, proxy,
/// timeouts, certificates), for the listing requests it cannot make itself.
pub(super) fn client_options(builder: &AmazonS3Builder) -> ClientOptions {
    [
        ClientConfigKey::AllowHttp,
        ClientConfigKey::AllowInvalidCertificates,
        ClientConfigKey::NoSystemCertificates,
        ClientConfigKey::ConnectTimeout,
        ClientConfigKey::Timeout,
        ClientConfigKey::ReadTimeout,
        ClientConfigKey::ProxyUrl,
        ClientConfigKey::ProxyCaCertificate,
        ClientConfigKey::ProxyExcludes,
        ClientConfigKey::UserAgent,
    ]
    .into_iter()
    .fold(ClientOptions::new(), |options, key| {
        match builder.get_config_value(&AmazonS3ConfigKey::Client(key)) {
            Some(value) => options.with_config(key, value),
            None => options,
        }
    })
}

/// Lists and aborts the unfinished multipart uploads under one bucket and prefix.
#[derive(Clone)]
pub(super) struct MultipartUploads {
    s3: AmazonS3,
    /// The storage URL's prefix inside the bucket.
    prefix: Option<Path>,
    http: HttpClient,
}

/// ListMultipartUploads' answer, as much of it as we read.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListMultipartUploadsResult {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<ListedUpload>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedUpload {
    key: String,
    upload_id: String,
    initiated: String,
}

impl MultipartUploads {
    pub(super) fn new(
        s3: AmazonS3,
        prefix: Option<Path>,
        options: &ClientOptions,
    ) -> object_store::Result<Self> {
        let http = ReqwestConnector::default().connect(options)?;
        Ok(MultipartUploads { s3, prefix, http })
    }

    /// The unfinished uploads whose keys lie under `location` (relative to the
    /// storage's prefix; None: all of it).
    pub(super) async fn list(
        &self,
        location: Option<&Path>,
    ) -> object_store::Result<Vec<IncompleteUpload>> {
        let strip = match &self.prefix {
            Some(prefix) => format!("{prefix}/"),
            None => String::new(),
        };
        let under = match location {
            Some(location) => format!("{strip}{location}/"),
            None => strip.clone(),
        };
        let mut found = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut query = vec![
                ("uploads".to_owned(), String::new()),
                ("prefix".to_owned(), under.clone()),
            ];
            if let Some((key, upload_id)) = &marker {
                query.push(("key-marker".to_owned(), key.clone()));
                query.push(("upload-id-marker".to_owned(), upload_id.clone()));
            }
            let page = self.page(query).await?;
            for upload in page.uploads {
                // Listed by prefix, so every key starts with it; anything else is not
                // ours to report.
                let Some(path) = upload.key.strip_prefix(&strip) else {
                    continue;
                };
                let last_modified = DateTime::parse_from_rfc3339(&upload.initiated)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| {
                        generic(format!(
                            "ListMultipartUploads gave upload {} of {} the time {:?}: {e}",
                            upload.upload_id, upload.key, upload.initiated
                        ))
                    })?;
                found.push(IncompleteUpload {
                    path: path.to_owned(),
                    bytes: None,
                    last_modified,
                    handle: UploadHandle::Multipart {
                        key: upload.key.clone(),
                        upload_id: upload.upload_id,
                    },
                });
            }
            match (
                page.is_truncated,
                page.next_key_marker,
                page.next_upload_id_marker,
            ) {
                (true, Some(key), Some(upload_id)) if !key.is_empty() => {
                    marker = Some((key, upload_id));
                }
                _ => return Ok(found),
            }
        }
    }

    /// One page of ListMultipartUploads.
    async fn page(
        &self,
        query: Vec<(String, String)>,
    ) -> object_store::Result<ListMultipartUploadsResult> {
        // The bucket itself: an empty object path.
        let url = self
            .s3
            .signed_url_opts(
                Method::GET,
                &Path::default(),
                SIGNED_FOR,
                &SignedUrlOptions::default().with_query(query),
            )
            .await?;
        let request = http::Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .body(HttpRequestBody::empty())
            .map_err(|e| generic(format!("building the ListMultipartUploads request: {e}")))?;
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|e| generic(format!("ListMultipartUploads: {e}")))?;
        let status = response.status();
        let body = response
            .into_body()
            .bytes()
            .await
            .map_err(|e| generic(format!("reading the ListMultipartUploads answer: {e}")))?;
        let text = String::from_utf8_lossy(&body);
        if status == http::StatusCode::NOT_IMPLEMENTED {
            // Some S3-compatible servers (s3s-fs among them) do not list uploads:
            // nothing can be found there, which is no reason to fail a listing.
            tracing::warn!(
                "this S3 server does not implement ListMultipartUploads, so unfinished \
                 uploads cannot be found; a bucket lifecycle rule that aborts them is the \
                 only cleanup (docs/runbook.md)"
            );
            return Ok(ListMultipartUploadsResult {
                is_truncated: false,
                next_key_marker: None,
                next_upload_id_marker: None,
                uploads: Vec::new(),
            });
        }
        if !status.is_success() {
            return Err(generic(format!("ListMultipartUploads: {status}: {text}")));
        }
        quick_xml::de::from_str(&text)
            .map_err(|e| generic(format!("ListMultipartUploads answered {text:?}: {e}")))
    }

    /// Aborts one upload; its parts are freed.
    pub(super) async fn abort(&self, key: &str, upload_id: &str) -> object_store::Result<()> {
        let path = Path::parse(key).map_err(|e| generic(format!("upload key {key:?}: {e}")))?;
        self.s3.abort_multipart(&path, &upload_id.to_owned()).await
    }
}

fn generic(message: String) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: message.into(),
    }
}
