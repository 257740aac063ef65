//! `stillpoint serve`: the long-running service for one runbook (the
//! `stillpoint-service` crate): its archivers, its `[schedule]`, an HTTP API, metrics
//! and a status page, until SIGINT or SIGTERM. Flags are checked here (tokens, TLS
//! files, the address) before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use stillpoint_node::grpc::auth::{AdminToken, ServerTls};
use stillpoint_service::{ServeConfig, ServeError};
use tokio_util::sync::CancellationToken;

use crate::backup::load_runbook;
use crate::exit::{self, Failure};
use crate::signal::Interrupts;

pub const EXAMPLE: &str = "\
Example (docs/runbooks/serve.md):
  openssl rand -hex 32 > api.token && chmod 600 api.token
  stillpoint serve -c runbook.toml --listen 0.0.0.0:9187 --token-file api.token
  T=$(cat api.token)
  curl -H \"Authorization: Bearer $T\" localhost:9187/api/v1/points
  curl -H \"Authorization: Bearer $T\" localhost:9187/api/v1/jobs -d '{\"kind\":\"drill\"}'

The runbook's [schedule] says what runs by itself, e.g. point = \"*/30 * * * * *\",
drill = \"0 4 * * *\" (cron; 6 fields = seconds first; time_zone = \"Europe/Berlin\").";

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The runbook: its cluster, databases (those with `archive = true` are archived
    /// continuously), storage, `[schedule]` and `[retention]`.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Where the HTTP API, /metrics and the status page listen. Port 0 picks a free
    /// port (the log says which).
    #[arg(
        long,
        env = "STILLPOINT_LISTEN",
        default_value = "127.0.0.1:9187",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// A file holding the operator bearer token: it may trigger jobs and read
    /// everything (at least 16 characters, e.g. `openssl rand -hex 32`).
    #[arg(long, env = "STILLPOINT_API_TOKEN_FILE", value_name = "PATH")]
    pub token_file: PathBuf,
    /// A file holding a second token that may only read (monitoring, dashboards).
    #[arg(long, value_name = "PATH")]
    pub observer_token_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate (with --tls-key).
    #[arg(long, requires = "tls_key", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's PEM private key.
    #[arg(long, requires = "tls_cert", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Answer `/` (the status page) and `/metrics` without a token, e.g. for a
    /// Prometheus that scrapes without one. The API still needs a token.
    #[arg(long)]
    pub public_status: bool,
}

fn usage(error: impl std::fmt::Display) -> Failure {
    Failure::new(exit::USAGE, anyhow!("{error}"))
}

/// `stillpoint serve`.
pub async fn serve(args: ServeArgs) -> Result<u8, Failure> {
    let runbook = load_runbook(&args.config)?;
    let operator_token = AdminToken::from_file(&args.token_file).map_err(usage)?;
    let observer_token = args
        .observer_token_file
        .as_deref()
        .map(AdminToken::from_file)
        .transpose()
        .map_err(usage)?;
    // Checked before anything listens: a service that printed where it listens and
    // then refused a short or shared token looked started to whoever read that line.
    stillpoint_service::api::Auth::new(&operator_token, observer_token.as_ref()).map_err(usage)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = ServerTls::from_files(cert, key).map_err(usage)?;
            tls.check().map_err(|error| {
                usage(format!(
                    "{error}; --tls-cert {} and --tls-key {} must be a certificate and \
                     its own private key",
                    cert.display(),
                    key.display()
                ))
            })?;
            Some(tls)
        }
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|error| {
            usage(format!(
                "cannot listen on {}: {error}; pick another address with --listen",
                args.listen
            ))
        })?;
    let address = listener
        .local_addr()
        .map_err(|error| anyhow!("the listening socket has no address: {error}"))?;
    // SIGINT/SIGTERM are caught from before the address is announced: whoever starts
    // the service on that line may stop it at once, and must not kill it instead.
    let mut interrupts =
        Interrupts::new().map_err(|error| anyhow!("cannot listen for SIGINT/SIGTERM: {error}"))?;
    crate::errln!(
        "stillpoint serve: {} on {}://{address} (runbook {})",
        runbook.cluster,
        if tls.is_some() { "https" } else { "http" },
        args.config.display()
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        interrupts.recv().await;
        tracing::warn!("stopping: no new jobs; releasing any pause; flushing the archives");
        crate::errln!("stillpoint serve: stopping");
        on_signal.cancel();
    });
    let config = ServeConfig {
        runbook,
        operator_token,
        observer_token,
        tls,
        public_status: args.public_status,
    };
    match stillpoint_service::run(config, listener, shutdown).await {
        Ok(()) => {
            crate::errln!("stillpoint serve: stopped");
            Ok(exit::OK)
        }
        Err(error @ ServeError::Setup(_)) => Err(Failure::new(exit::USAGE, error)),
        Err(error) => Err(Failure::new(exit::ERROR, error)),
    }
}
