use std::path::PathBuf;

use clap::Parser;

/// A view node: stores sealed movie blobs and serves decrypted byte ranges to
/// viewers holding a playback token signed by the manager.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see viewnode/viewnode.example.toml). Every
    /// field can also be set with a `VIEWNODE_<FIELD>` environment variable.
    #[arg(short, long, env = "VIEWNODE_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    // First, before any code built for this CPU's extensions can run.
    if let Err(msg) = shared::runtime::check_build_cpu("viewnode") {
        eprintln!("{msg}");
        return std::process::ExitCode::from(2);
    }
    let cli = Cli::parse();
    viewnode::init_tracing();
    let cfg = match viewnode::Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("viewnode: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(viewnode::serve(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("viewnode stopped: {e:#}");
            eprintln!("viewnode: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
