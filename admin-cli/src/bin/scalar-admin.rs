//! `scalar-admin`: the upstream client's flags, for runbooks that already call it.
//! See stillpoint_cli::scalar_admin.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    stillpoint_cli::init_tracing();
    stillpoint_cli::finish(stillpoint_cli::scalar_admin::run().await)
}
