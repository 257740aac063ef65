//! `--server URL`: `list`, `show`, `point`, `backup`, `drill` and `verify` asking a
//! running `stillpoint serve` (its HTTP API, docs/api/openapi.json) instead of reading
//! the runbook's storage themselves. Triggers queue a job and, unless `--no-wait`,
//! poll it until it ends, exiting with the codes the one-shot commands use. Owns the
//! flags, the bearer token, the HTTP client and the mapping of API answers to exit codes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::args::OutputFormat;
use crate::exit::{self, Failure};
use crate::output::print_json;

/// Where the token comes from when no `--token-file` is given.
const TOKEN_ENV: &str = "STILLPOINT_API_TOKEN";
/// How often a trigger asks whether its job has ended.
const POLL_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Ask a running `stillpoint serve` (e.g. https://backup-host:9187) instead of
    /// reading the runbook's storage: then no --config is needed.
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    pub server: Option<String>,
    /// A file holding the service's bearer token: the operator token to trigger jobs,
    /// the observer token is enough to read (else the env STILLPOINT_API_TOKEN).
    #[arg(long, requires = "server", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// A PEM CA certificate to trust for an https --server (else the system's roots).
    #[arg(long, requires = "server", value_name = "PATH")]
    pub server_ca: Option<PathBuf>,
}

/// A connection to a service, as the flags name it.
pub struct Remote {
    base: String,
    token: String,
    client: reqwest::Client,
}

fn usage(error: impl std::fmt::Display) -> Failure {
    Failure::new(exit::USAGE, anyhow!("{error}"))
}

impl ServerArgs {
    /// The service to ask, if `--server` was given.
    pub fn remote(&self) -> Result<Option<Remote>, Failure> {
        let Some(server) = &self.server else {
            return Ok(None);
        };
        let token = match &self.token_file {
            Some(path) => std::fs::read_to_string(path).map_err(|error| {
                usage(format!(
                    "cannot read the token file {}: {error}; give the file `stillpoint serve` \
                     was started with (--token-file)",
                    path.display()
                ))
            })?,
            None => std::env::var(TOKEN_ENV).map_err(|_| {
                usage(format!(
                    "--server needs a bearer token: give --token-file PATH or set {TOKEN_ENV}"
                ))
            })?,
        };
        let token = token.trim().to_owned();
        if token.is_empty() {
            return Err(usage("the bearer token is empty; give the service's token"));
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(path) = &self.server_ca {
            let pem = std::fs::read(path).map_err(|error| {
                usage(format!("cannot read the CA {}: {error}", path.display()))
            })?;
            let ca = reqwest::Certificate::from_pem(&pem).map_err(|error| {
                usage(format!(
                    "{} is not a PEM certificate: {error}",
                    path.display()
                ))
            })?;
            builder = builder.tls_certs_only([ca]);
        }
        let client = builder
            .build()
            .map_err(|error| anyhow!("cannot set up the HTTP client: {error}"))?;
        Ok(Some(Remote {
            base: server.trim_end_matches('/').to_owned(),
            token,
            client,
        }))
    }
}

impl Remote {
    /// Sends a request; a 2xx answer's JSON, else a failure with the service's error.
    async fn call(&self, request: reqwest::RequestBuilder, what: &str) -> Result<Value, Failure> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|error| {
                anyhow!(
                    "cannot reach the service at {} ({what}): {}; is `stillpoint serve` running \
                 there (and for https, does --server-ca name the CA of its certificate)?",
                    self.base,
                    stillpoint::error_chain(&error)
                )
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| anyhow!("the service's answer to {what} broke off: {error}"))?;
        let body: Value = serde_json::from_str(&text).map_err(|error| {
            anyhow!("the service answered {what} with {status} and no JSON ({error}): {text}")
        })?;
        if status.is_success() {
            return Ok(body);
        }
        let message = body["error"].as_str().unwrap_or(&text).to_owned();
        let code = match status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                exit::USAGE
            }
            _ => exit::ERROR,
        };
        Err(Failure::new(
            code,
            anyhow!("the service refused {what} ({status}): {message}"),
        ))
    }

    /// The API path `/api/v1/SEGMENTS…` under --server, each segment percent-encoded:
    /// an id the user typed stays one segment.
    fn url(&self, segments: &[&str]) -> Result<reqwest::Url, Failure> {
        let mut url = reqwest::Url::parse(&self.base)
            .map_err(|error| usage(format!("--server {}: {error}", self.base)))?;
        url.path_segments_mut()
            .map_err(|()| usage(format!("--server {} cannot take a path", self.base)))?
            .pop_if_empty()
            .extend(["api", "v1"])
            .extend(segments);
        Ok(url)
    }

    async fn get(&self, segments: &[&str]) -> Result<Value, Failure> {
        let url = self.url(segments)?;
        let what = format!("GET {}", url.path());
        self.call(self.client.get(url), &what).await
    }

    /// `list`: the service's backups and points.
    pub async fn list(&self, output: OutputFormat) -> Result<u8, Failure> {
        let backups = self.get(&["backups"]).await?;
        let points = self.get(&["points"]).await?;
        let listing = json!({
            "server": self.base,
            "backups": backups["backups"],
            "points": points["points"],
        });
        match output {
            OutputFormat::Json => print_json(&listing),
            OutputFormat::Text => crate::output::write_stdout(&list_text(&listing)),
        }
        Ok(exit::OK)
    }

    /// `show ID|latest`: one backup's summary and manifest.
    pub async fn show(&self, backup: &str, output: OutputFormat) -> Result<u8, Failure> {
        let id = if backup == "latest" {
            let listing = self.get(&["backups"]).await?;
            let newest = listing["backups"]
                .as_array()
                .into_iter()
                .flatten()
                .rev()
                .find(|backup| backup["restorable"] == true && backup["window_valid"] == true);
            match newest.and_then(|backup| backup["backup_id"].as_str()) {
                Some(id) => id.to_owned(),
                None => {
                    return Err(Failure::new(
                        exit::ERROR,
                        anyhow!("the service at {} lists no restorable backup", self.base),
                    ));
                }
            }
        } else {
            backup.to_owned()
        };
        let shown = self.get(&["backups", &id]).await?;
        match output {
            OutputFormat::Json => print_json(&shown),
            OutputFormat::Text => {
                let summary = &shown["summary"];
                crate::outln!("backup {id}");
                crate::outln!("restore point: {}", or_dash(&summary["restore_time"]));
                crate::outln!("window valid:  {}", summary["window_valid"]);
                crate::outln!("restorable:    {}", summary["restorable"]);
                crate::outln!("stored bytes:  {}", summary["stored_bytes"]);
                crate::outln!("databases:     {}", names(&summary["databases"]));
                crate::outln!("manifest:");
                crate::output::write_stdout(&pretty(&shown["manifest"]));
            }
        }
        Ok(exit::OK)
    }

    /// `point`, `backup`, `drill`, `verify`: queues the job, and unless `no_wait`
    /// waits for it and exits as the one-shot command would.
    pub async fn trigger(
        &self,
        kind: &str,
        no_wait: bool,
        output: OutputFormat,
    ) -> Result<u8, Failure> {
        let url = self.url(&["jobs"])?;
        let queued = self
            .call(
                self.client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(json!({ "kind": kind }).to_string()),
                &format!("a {kind} job"),
            )
            .await?;
        let Some(job_id) = queued["job_id"].as_str().map(str::to_owned) else {
            return Err(Failure::new(
                exit::ERROR,
                anyhow!("the service queued a {kind} job but named no job_id: {queued}"),
            ));
        };
        crate::errln!("{kind}: job {job_id} queued on {}", self.base);
        if no_wait {
            match output {
                OutputFormat::Json => print_json(&queued),
                OutputFormat::Text => crate::outln!("{job_id}"),
            }
            return Ok(exit::OK);
        }
        let job = loop {
            let job = self.get(&["jobs", &job_id]).await?;
            let state = job["state"].as_str().unwrap_or_default();
            if !matches!(state, "queued" | "running") {
                break job;
            }
            tokio::time::sleep(POLL_EVERY).await;
        };
        match output {
            OutputFormat::Json => print_json(&job),
            OutputFormat::Text => {
                crate::outln!(
                    "{kind} {} (job {job_id}, {} ms)",
                    job["state"].as_str().unwrap_or("?"),
                    job["duration_ms"]
                );
                if !job["result"].is_null() {
                    crate::output::write_stdout(&pretty(&job["result"]));
                }
            }
        }
        let error = job["error"].as_str().unwrap_or("no error given");
        match job["state"].as_str() {
            Some("succeeded") => Ok(exit::OK),
            // A drill that restored but failed a check carries its report.
            Some("failed") if kind == "drill" && job["result"]["ok"] == false => Err(Failure::new(
                exit::DRILL_FAILED,
                anyhow!("job {job_id}: {error}"),
            )),
            Some("failed") => Err(Failure::new(
                exit::BACKUP_FAILED,
                anyhow!("job {job_id}: {error}"),
            )),
            other => Err(Failure::new(
                exit::ERROR,
                anyhow!(
                    "job {job_id} ended {}: {error}{}",
                    other.unwrap_or("in an unknown state"),
                    job["note"]
                        .as_str()
                        .map(|note| format!(" ({note})"))
                        .unwrap_or_default()
                ),
            )),
        }
    }
}

fn or_dash(value: &Value) -> &str {
    value.as_str().unwrap_or("-")
}

fn names(value: &Value) -> String {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// `list --server` for people: a table of backups and one of points.
fn list_text(listing: &Value) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let none = Vec::new();
    let backups = listing["backups"].as_array().unwrap_or(&none);
    let points = listing["points"].as_array().unwrap_or(&none);
    let server = or_dash(&listing["server"]);
    if backups.is_empty() {
        let _ = writeln!(text, "no backups on {server}");
    } else {
        let _ = writeln!(
            text,
            "{:<26} {:<32} {:<6} {:>14}  DATABASES",
            "BACKUP", "RESTORE POINT (UTC)", "VALID", "STORED BYTES"
        );
        for backup in backups {
            let valid = if backup["restorable"] != true {
                "BROKEN"
            } else if backup["window_valid"] == true {
                "yes"
            } else {
                "NO"
            };
            let _ = writeln!(
                text,
                "{:<26} {:<32} {valid:<6} {:>14}  {}",
                or_dash(&backup["backup_id"]),
                or_dash(&backup["restore_time"]),
                backup["stored_bytes"].to_string(),
                names(&backup["databases"])
            );
        }
    }
    if points.is_empty() {
        let _ = writeln!(text, "no points on {server}");
    } else {
        let _ = writeln!(
            text,
            "\n{:<32} {:<32} {:<6}  DATABASES",
            "POINT", "RESTORE TIME (UTC)", "EXACT"
        );
        for point in points {
            let _ = writeln!(
                text,
                "{:<32} {:<32} {:<6}  {}",
                or_dash(&point["point_id"]),
                or_dash(&point["restore_time"]),
                if point["exact"] == true { "yes" } else { "no" },
                names(&point["databases"])
            );
        }
    }
    text
}
