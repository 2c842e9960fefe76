//! `logins`: C concurrent workers, each looping connect → greeting → USER/PASS → STAT → QUIT until the
//! deadline (or a session count). Reports sessions per second, failed sessions, and percentiles of the
//! whole session and of the PASS round trip (PASS written → `+OK` read: the store login a proxy adds to).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::client::{ClientError, Connector, TlsMode};
use super::report::{JsonObject, error_lines, summary_line};
use super::stats::{Samples, Summary};
use super::{AccountArgs, Accounts, LoadError, TargetArgs, seconds};

/// How many failure messages a report keeps.
const ERROR_SAMPLES: usize = 5;

/// `popgate-bench logins`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginsArgs {
    /// Server and TLS.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Accounts, used in turn.
    #[command(flatten)]
    pub accounts: AccountArgs,
    /// Concurrent workers (each runs one session at a time).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Seconds during which new sessions are started.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Start no more than this many sessions in total.
    #[arg(long)]
    pub max_sessions: Option<u64>,
    /// Stop starting sessions after this many have failed.
    #[arg(long, default_value_t = 100)]
    pub max_errors: u64,
}

/// What a `logins` run measured.
#[derive(Debug, Clone)]
pub struct LoginsReport {
    /// Where.
    pub target: SocketAddr,
    /// Client TLS.
    pub tls: TlsMode,
    /// Workers.
    pub concurrency: usize,
    /// From the first connect to the last session's end.
    pub elapsed: Duration,
    /// Sessions that completed without error.
    pub sessions: u64,
    /// Sessions that failed.
    pub errors: u64,
    /// The first few failures.
    pub error_samples: Vec<String>,
    /// Whole session, connect to QUIT's `+OK`.
    pub session: Summary,
    /// PASS round trip.
    pub pass: Summary,
    /// TLS handshakes that resumed a session (`--resume`).
    pub tls_resumed: u64,
}

struct Worker {
    connector: Arc<Connector>,
    accounts: Arc<Accounts>,
    next: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    deadline: Instant,
    max_sessions: u64,
    max_errors: u64,
}

#[derive(Default)]
struct WorkerResult {
    sessions: u64,
    errors: u64,
    error_samples: Vec<String>,
    session: Samples,
    pass: Samples,
}

/// Runs the workload.
pub async fn run(args: &LoginsArgs) -> Result<LoginsReport, LoadError> {
    if args.concurrency == 0 {
        return Err(LoadError::Usage("--concurrency must be at least 1".into()));
    }
    let connector = Arc::new(args.target.connector()?);
    let accounts = Arc::new(args.accounts.load()?);
    let duration = seconds(args.duration, "--duration")?;
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..args.concurrency {
        let worker = Worker {
            connector: connector.clone(),
            accounts: accounts.clone(),
            next: next.clone(),
            failed: failed.clone(),
            deadline: start + duration,
            max_sessions: args.max_sessions.unwrap_or(u64::MAX),
            max_errors: args.max_errors,
        };
        workers.spawn(worker.run());
    }
    let mut total = WorkerResult::default();
    while let Some(done) = workers.join_next().await {
        let mut r = done.map_err(|e| LoadError::Worker(e.to_string()))?;
        total.sessions += r.sessions;
        total.errors += r.errors;
        for e in r.error_samples {
            if total.error_samples.len() < ERROR_SAMPLES {
                total.error_samples.push(e);
            }
        }
        total.session.append(&mut r.session);
        total.pass.append(&mut r.pass);
    }
    Ok(LoginsReport {
        target: connector.addr,
        tls: connector.tls,
        concurrency: args.concurrency,
        elapsed: start.elapsed(),
        sessions: total.sessions,
        errors: total.errors,
        error_samples: total.error_samples,
        session: total.session.summary(),
        pass: total.pass.summary(),
        tls_resumed: connector.resumed.load(std::sync::atomic::Ordering::Relaxed),
    })
}

// === impl Worker ===

impl Worker {
    async fn run(self) -> WorkerResult {
        let mut out = WorkerResult {
            session: Samples::with_capacity(4096),
            pass: Samples::with_capacity(4096),
            ..WorkerResult::default()
        };
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if n >= self.max_sessions
                || Instant::now() >= self.deadline
                || self.failed.load(Ordering::Relaxed) >= self.max_errors
            {
                return out;
            }
            let began = Instant::now();
            match self.session(n).await {
                Ok(pass) => {
                    out.session.push(began.elapsed());
                    out.pass.push(pass);
                    out.sessions += 1;
                }
                Err(e) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    out.errors += 1;
                    if out.error_samples.len() < ERROR_SAMPLES {
                        out.error_samples.push(e.to_string());
                    }
                }
            }
        }
    }

    /// One session; returns the PASS round trip.
    async fn session(&self, n: u64) -> Result<Duration, ClientError> {
        let account = self.accounts.get(n);
        let mut pop = self.connector.connect().await?;
        let pass = pop.login(&account.user_line, &account.pass_line).await?;
        pop.stat().await?;
        pop.quit().await?;
        Ok(pass)
    }
}

// === impl LoginsReport ===

impl LoginsReport {
    /// Completed sessions per second of the run.
    pub fn sessions_per_sec(&self) -> f64 {
        self.sessions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn text(&self) -> String {
        format!(
            "logins {} (tls {}), {} concurrent, {:.1} s\n  sessions {}  errors {}  {:.0} sessions/s  TLS resumed {}\n  session: {}\n  PASS:    {}\n{}",
            self.target,
            self.tls.as_str(),
            self.concurrency,
            self.elapsed.as_secs_f64(),
            self.sessions,
            self.errors,
            self.sessions_per_sec(),
            self.tls_resumed,
            summary_line(&self.session),
            summary_line(&self.pass),
            error_lines(&self.error_samples)
        )
    }

    pub(crate) fn json(&self) -> JsonObject {
        JsonObject::new()
            .str("mode", "logins")
            .str("target", &self.target.to_string())
            .str("tls", self.tls.as_str())
            .int("concurrency", self.concurrency as u64)
            .num("elapsed_s", self.elapsed.as_secs_f64())
            .int("sessions", self.sessions)
            .int("errors", self.errors)
            .num("sessions_per_s", self.sessions_per_sec())
            .int("tls_resumed", self.tls_resumed)
            .summary_us("session", &self.session)
            .summary_us("pass", &self.pass)
            .strs("error_samples", &self.error_samples)
    }
}
