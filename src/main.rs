//! The `popgate` command: `run`, `check`, `demo`. The only place `anyhow` is used.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "popgate",
    version,
    about = "Multi-tenant POP3 proxy and load balancer"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "POPGATE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        /// Path to the YAML config.
        #[arg(short, long, env = "POPGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 when valid).
    Check {
        /// Path to the YAML config.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start built-in demo mail stores and popgate in front of them, on 127.0.0.1.
    Demo,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POPGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn until_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    token.cancel();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Check { config } = &cli.command {
        return match popgate::Config::load(config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} listeners, {} tenants)",
                    config.display(),
                    c.listeners.len(),
                    c.tenants.len()
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                std::process::exit(1);
            }
        };
    }
    init_logs(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(until_signal(shutdown.clone()));
        match cli.command {
            Command::Run { config } => {
                let config = popgate::Config::load(&config)
                    .with_context(|| format!("config {}", config.display()))?;
                popgate::run(config, shutdown)
                    .await
                    .context("popgate failed to start")?;
            }
            Command::Demo => popgate::demo::run(shutdown).await.context("demo failed")?,
            Command::Check { .. } => {}
        }
        Ok(())
    })
}
