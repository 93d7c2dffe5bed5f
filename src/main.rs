//! The graphcache binary: parse flags, load config, set up logging, serve
//! until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use graphcache::config::LogFormat;
use graphcache::{Cli, Config, Graphcache};

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
        println!("configuration is valid:\n{config:#?}");
        for name in &config.ignored_env {
            println!("ignored environment variable {name}: it names no configuration key");
        }
        return ExitCode::SUCCESS;
    }
    init_tracing(&config);
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
        let server = match Graphcache::bind(config).await {
            Ok(server) => server,
            Err(error) => {
                tracing::error!(%error, "cannot bind listeners");
                return ExitCode::from(1);
            }
        };
        server.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    // Colour only for a terminal: log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what a container runtime sends).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}
