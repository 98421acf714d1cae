//! The `rudder` command: parses flags, sets up logging, runs the chosen subcommand.

use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

use rudder::cli::{Cli, Command, NetworkCommand};
use rudder::{admin, daemon, docker_opts, flanneld_compat, http};

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // flanneld's command line and FLANNELD_* environment, before any thread starts.
    // (clap reads each variable when the command is built: build it again afterwards.)
    let argv = match flanneld_compat::prepare(&Cli::command()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("rudder: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = match Cli::command()
        .try_get_matches_from(argv)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => daemon::run(*args).await,
            Command::Status(args) => {
                let body = http::get_unix(&args.status_socket, "/status").await?;
                if args.json {
                    println!("{body}");
                } else {
                    print!("{}", http::status_table(&serde_json::from_str(&body)?));
                }
                Ok(())
            }
            Command::Network(NetworkCommand::Init(args)) => {
                admin::explained(&args.etcd, admin::network_init(&args)).await
            }
            Command::Network(NetworkCommand::Show(args)) => {
                admin::explained(&args.etcd, admin::network_show(&args.etcd)).await
            }
            Command::Leases(args) => admin::explained(&args.etcd, admin::leases(&args)).await,
            Command::DockerOpts(args) => {
                docker_opts::write(&args.subnet_file, &args.output, &args.combined_key)
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why, outermost context first.
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and each keeps what
/// a burst freed: a 65,536-peer resync peaked at 150 MB RSS for 63 MB of heap; with two arenas,
/// 100 MB. The daemon's threads mostly wait, so sharing arenas costs nothing measurable.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
