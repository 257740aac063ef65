//! `stillpoint`: see `stillpoint --help` and stillpoint_cli::cli.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    stillpoint_cli::init_tracing();
    stillpoint_cli::finish(stillpoint_cli::cli::run().await)
}
