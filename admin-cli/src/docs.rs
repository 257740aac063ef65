//! `stillpoint completions` and `stillpoint man`: the shell completion scripts
//! (clap_complete) and man pages (clap_mangen), both generated from the same clap
//! command tree that parses the arguments, so they cannot drift from it.

use std::path::PathBuf;

use clap::{Args, CommandFactory as _, ValueEnum};

use crate::exit::{self, Failure};

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Write one page per command into this directory instead (stillpoint.1,
    /// stillpoint-pause.1, stillpoint-backup.1, …), e.g. /usr/local/share/man/man1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs) -> Result<u8, Failure> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(
        shell,
        &mut crate::cli::Cli::command(),
        "stillpoint",
        &mut script,
    );
    crate::output::write_stdout(&String::from_utf8_lossy(&script));
    Ok(exit::OK)
}

/// Prints the main man page (roff) on stdout, or writes every command's page into
/// `--dir`.
pub fn man(args: ManArgs) -> Result<u8, Failure> {
    let command = crate::cli::Cli::command();
    match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|error| {
                Failure::new(
                    exit::USAGE,
                    anyhow::anyhow!("cannot create {}: {error}", dir.display()),
                )
            })?;
            clap_mangen::generate_to(command, dir).map_err(|error| {
                Failure::new(
                    exit::ERROR,
                    anyhow::anyhow!("writing man pages into {}: {error}", dir.display()),
                )
            })?;
            crate::errln!("wrote the man pages into {}", dir.display());
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut page)
                .map_err(|error| anyhow::anyhow!("rendering the man page: {error}"))?;
            crate::output::write_stdout(&String::from_utf8_lossy(&page));
        }
    }
    Ok(exit::OK)
}
