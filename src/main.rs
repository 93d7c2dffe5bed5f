//! The graphcache binary: parse flags, load config, set up logging, serve
//! until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use graphcache::config::LogFormat;
use graphcache::{Cli, Config, Graphcache};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli, std::env::vars()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("graphcache: {error}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!(
            "# graphcache: the configuration is valid. Effective values, each with its source:"
        );
        print!("{}", config.effective_toml());
        for name in &config.ignored_env {
            println!("# ignored environment variable {name}: it names no configuration key");
        }
        return ExitCode::SUCCESS;
    }
    let log_filter = init_tracing(&config);
    if !config.ignored_env.is_empty() {
        tracing::warn!(
            variables = %config.ignored_env.join(", "),
            "ignored GRAPHCACHE_ environment variables that name no configuration key"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    runtime.block_on(async move {
        // Handlers go in before the listeners bind and "serving" is logged,
        // so a signal sent as soon as graphcache is up is never the default
        // action (SIGHUP would kill the process).
        let shutdown = shutdown_signal();
        #[cfg(unix)]
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let server = match Graphcache::bind(config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "cannot bind listeners");
                return ExitCode::from(1);
            }
        };
        #[cfg(unix)]
        match hangups {
            Ok(hangups) => {
                tokio::spawn(reload_on_sighup(
                    hangups,
                    cli,
                    server.reloader(),
                    log_filter,
                ));
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; configuration reloads are off")
            }
        }
        server.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

/// Handle to change the log filter of the running subscriber (SIGHUP).
type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn init_tracing(config: &Config) -> LogFilter {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour only for a terminal: log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    let registry = tracing_subscriber::registry().with(filter);
    match config.log_format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    handle
}

/// On SIGHUP, reads the config file and environment again and applies what
/// can change to new requests; a bad configuration keeps the running one.
#[cfg(unix)]
async fn reload_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    cli: Cli,
    reloader: graphcache::Reloader,
    log_filter: LogFilter,
) {
    while hangups.recv().await.is_some() {
        match Config::load(&cli, std::env::vars()) {
            Ok(config) => {
                let level = config.log_level.clone();
                let ignored = reloader.reload(config);
                if let Err(error) = log_filter.reload(tracing_subscriber::EnvFilter::new(&level)) {
                    tracing::warn!(%error, "log level not reloaded");
                }
                if ignored.is_empty() {
                    tracing::info!("configuration reloaded");
                } else {
                    tracing::warn!(
                        ignored = %ignored.join(", "),
                        "configuration reloaded; these keys need a restart and keep their running values"
                    );
                }
            }
            Err(error) => {
                reloader.failed();
                tracing::error!(%error, "configuration reload failed; the running configuration stays");
            }
        }
    }
}

/// Installs the SIGINT (Ctrl-C) and SIGTERM (what a container runtime sends)
/// handlers now, and resolves when either arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).expect("SIGTERM handler installs"),
            signal(SignalKind::interrupt()).expect("SIGINT handler installs"),
        )
    };
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    }
}
