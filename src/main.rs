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

/// Logs go to stderr through a writer thread (`popgate::logs`), so a session's worker formats a line but
/// never waits in `write(2)` nor wakes a thread for it; lines reach stderr within 50 ms. Not lossy: when
/// the writer falls behind by its whole buffer, logging waits rather than dropping lines. The guard
/// writes what is left when `main` returns.
fn init_logs(format: LogFormat) -> anyhow::Result<popgate::logs::LogGuard> {
    let spec = std::env::var("POPGATE_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".into());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The config watcher's library logs every inotify event of the config's directory at trace level,
    // other files' included: with a trace log written beside the config, each flush of the log was an
    // event, logged, flushed, and so on (8 KB/s forever). Its events are popgate's to log (the watcher
    // logs the changes it acts on), so the library stays at info unless named in POPGATE_LOG.
    if !spec.contains("notify")
        && let Ok(quiet) = "notify=info".parse()
    {
        filter = filter.add_directive(quiet);
    }
    let (writer, guard) =
        popgate::logs::batch_writer(std::io::stderr()).context("cannot start the log writer")?;
    // Colours only for a person at a terminal: a file, a pipe or journald would get escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(guard)
}

/// Serves until SIGTERM or Ctrl-C, then drains for `grace`. SIGHUP reloads the config.
async fn serve_until_signalled(
    running: popgate::Running,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config");
                let _ = running.reload().await;
            }
        }
    }
    running.drain(grace).await;
    tracing::info!("stopped");
    Ok(())
}

/// glibc's malloc gives each thread that meets contention an arena of its own (up to 8 per core) and keeps
/// what is freed there for reuse in that arena. A reload parses the whole config (with 10,000 tenants,
/// tens of MiB of short-lived parser and snapshot memory) on whichever worker runs it, so each reload
/// that lands on another arena leaves that arena holding one more reload's worth. Measured with
/// scripts/tenants at 10,000 tenants, RSS over 20 reloads: 84 → 176 MiB with glibc's default, 78 →
/// 87–116 MiB with two arenas (depending on which arena each reload lands on), 84 → 88 MiB with one, at
/// the same login rate on this 2-core machine (small allocations come from per-thread caches either way).
/// So popgate runs with `MALLOC_ARENA_MAX=1` unless the operator set it: glibc reads it only when the
/// process starts, so the binary re-executes itself once with it (same PID, same arguments). A failed
/// exec leaves the defaults. Operators on many cores who prefer throughput can set it higher.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const VAR: &str = "MALLOC_ARENA_MAX";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(VAR, "1")
        .exec();
    eprintln!(
        "popgate: cannot re-execute with {VAR}=1 ({err}); going on with glibc's default arenas"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() {}

fn main() -> anyhow::Result<()> {
    cap_malloc_arenas();
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
    let _log_writer = init_logs(cli.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        match cli.command {
            Command::Run { config: path } => {
                let config =
                    popgate::Config::load(&path).with_context(|| format!("config {}", path.display()))?;
                let grace = config.timeouts.shutdown_grace.get();
                let running = popgate::start_from_file(config, path, shutdown)
                    .await
                    .context("popgate failed to start")?;
                if let Err(e) = popgate::runtime::watch_config_dir(running.runtime()) {
                    tracing::warn!("not watching the config directory ({e}); reload with SIGHUP or POST /reload");
                }
                serve_until_signalled(running, grace).await?;
            }
            Command::Demo => {
                let running = popgate::demo::start(shutdown).await.context("demo failed")?;
                serve_until_signalled(running, std::time::Duration::from_secs(2)).await?;
            }
            Command::Check { .. } => {}
        }
        Ok(())
    })
}
