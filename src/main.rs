//! The `optgate` binary: parse the command line, load the config, run the command,
//! and turn any error into one line on stderr and a non-zero exit.

use std::io::IsTerminal;

use clap::Parser;
use optgate::cli::{Cli, Command};
use optgate::config::Config;

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "optgate=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if optgate::cli::is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<optgate::cli::RowsRejected>() => {
            eprintln!("optgate: {e:#}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("optgate: {:#}", e);
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::HashPassword = cli.command {
        // Needs no config: it is how one writes the config.
        return optgate::cli::hash_password();
    }
    if let Command::Dkim(optgate::cli::DkimCommand::Keygen {
        domain,
        selector,
        algorithm,
        out,
    }) = &cli.command
    {
        return optgate::cli::dkim_keygen(domain, selector, *algorithm, out);
    }
    let config = Config::load(&cli.config)?;
    match cli.command {
        Command::Serve => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(optgate::serve::run(config)),
        command => optgate::cli::run(&config, command),
    }
}
