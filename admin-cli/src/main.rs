//! `stillpoint`: see `stillpoint --help` and stillpoint_cli::cli.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    stillpoint_cli::init_tracing();
    let command = stillpoint_cli::cli::run();
    stillpoint_cli::finish(stillpoint_cli::output::quiet_on_closed_stdout(command).await)
}
