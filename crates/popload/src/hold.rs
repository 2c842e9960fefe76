//! `hold`: open C logged-in sessions (at most `--open-concurrency` logins in flight), keep them idle for S
//! seconds with a NOOP every 30 s each (spread evenly, so the server sees a steady trickle, not a burst),
//! then QUIT each. A session counts as held when every NOOP and its QUIT were answered `+OK`.
//!
//! [`open`] and [`Held::keep`] are separate so an in-process caller (`benches/load.rs`) can read the
//! server's memory while all sessions are open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

use super::client::{ClientError, Connector, Pop3, TlsMode};
use super::report::{JsonObject, error_lines};
use super::{AccountArgs, Accounts, LoadError, TargetArgs, seconds};

/// How many failure messages a report keeps.
const ERROR_SAMPLES: usize = 5;

/// `popgate-bench hold`.
#[derive(Debug, Clone, clap::Args)]
pub struct HoldArgs {
    /// Server and TLS.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Accounts, used in turn.
    #[command(flatten)]
    pub accounts: AccountArgs,
    /// Sessions to hold at once.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Seconds to hold them once all are open.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds between one session's NOOPs.
    #[arg(long, default_value_t = 30.0)]
    pub noop_every: f64,
    /// Logins in flight while opening.
    #[arg(long, default_value_t = 50)]
    pub open_concurrency: usize,
}

/// Open sessions, ready to be held.
#[derive(Debug)]
pub struct Held {
    target: SocketAddr,
    tls: TlsMode,
    requested: usize,
    sessions: Vec<Pop3>,
    failed_open: u64,
    error_samples: Vec<String>,
    open_time: Duration,
}

/// What a `hold` run measured.
#[derive(Debug, Clone)]
pub struct HoldReport {
    /// Where.
    pub target: SocketAddr,
    /// Client TLS.
    pub tls: TlsMode,
    /// Sessions asked for.
    pub requested: usize,
    /// Sessions that logged in.
    pub opened: usize,
    /// Sessions that answered every NOOP and QUIT.
    pub held: usize,
    /// Sessions that could not connect or log in.
    pub failed_open: u64,
    /// Time to open them all.
    pub open_time: Duration,
    /// Time they were held.
    pub hold_time: Duration,
    /// NOOPs answered.
    pub noops: u64,
    /// The first few failures.
    pub error_samples: Vec<String>,
}

/// Opens and logs in `args.sessions` sessions.
pub async fn open(args: &HoldArgs) -> Result<Held, LoadError> {
    let connector = Arc::new(args.target.connector()?);
    let accounts = Arc::new(args.accounts.load()?);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(Mutex::new(Vec::with_capacity(args.sessions)));
    let mut openers = JoinSet::new();
    for _ in 0..args.open_concurrency.clamp(1, args.sessions.max(1)) {
        let (connector, accounts, next, opened) = (
            connector.clone(),
            accounts.clone(),
            next.clone(),
            opened.clone(),
        );
        let total = args.sessions as u64;
        openers.spawn(async move {
            let mut failures = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return failures;
                }
                match login(&connector, &accounts, n).await {
                    Ok(pop) => opened.lock().await.push(pop),
                    Err(e) => failures.push(e.to_string()),
                }
            }
        });
    }
    let mut failed_open = 0;
    let mut error_samples = Vec::new();
    while let Some(done) = openers.join_next().await {
        let failures = done.map_err(|e| LoadError::Worker(e.to_string()))?;
        failed_open += failures.len() as u64;
        error_samples.extend(failures.into_iter().take(ERROR_SAMPLES));
        error_samples.truncate(ERROR_SAMPLES);
    }
    let sessions = std::mem::take(&mut *opened.lock().await);
    Ok(Held {
        target: connector.addr,
        tls: connector.tls,
        requested: args.sessions,
        sessions,
        failed_open,
        error_samples,
        open_time: started.elapsed(),
    })
}

async fn login(connector: &Connector, accounts: &Accounts, n: u64) -> Result<Pop3, ClientError> {
    let account = accounts.get(n);
    let mut pop = connector.connect().await?;
    pop.login(&account.user_line, &account.pass_line).await?;
    Ok(pop)
}

/// Opens, holds for `args.seconds`, and closes.
pub async fn run(args: &HoldArgs) -> Result<HoldReport, LoadError> {
    let hold = seconds(args.seconds, "--seconds")?;
    let every = seconds(args.noop_every, "--noop-every")?;
    if every.is_zero() {
        return Err(LoadError::Usage("--noop-every must be positive".into()));
    }
    Ok(open(args).await?.keep(hold, every).await)
}

// === impl Held ===

impl Held {
    /// Sessions that logged in.
    pub fn opened(&self) -> usize {
        self.sessions.len()
    }

    /// Keeps every session open for `hold`, each sending NOOP every `every` (first ones spread over the
    /// first interval), then QUITs them all.
    pub async fn keep(self, hold: Duration, every: Duration) -> HoldReport {
        let began = Instant::now();
        let end = began + hold;
        let opened = self.sessions.len();
        let mut tasks = JoinSet::new();
        for (i, mut pop) in self.sessions.into_iter().enumerate() {
            let offset = every.mul_f64(i as f64 / opened.max(1) as f64);
            tasks.spawn(async move {
                let mut noops = 0u64;
                let mut next = began + offset;
                loop {
                    if next >= end {
                        sleep_until(end).await;
                        break;
                    }
                    sleep_until(next).await;
                    pop.simple(b"NOOP\r\n", "NOOP").await?;
                    noops += 1;
                    next += every;
                }
                pop.quit().await?;
                Ok::<u64, ClientError>(noops)
            });
        }
        let mut held = 0;
        let mut noops = 0;
        let mut error_samples = self.error_samples;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Ok(n)) => {
                    held += 1;
                    noops += n;
                }
                Ok(Err(e)) if error_samples.len() < ERROR_SAMPLES => {
                    error_samples.push(e.to_string())
                }
                Err(e) if error_samples.len() < ERROR_SAMPLES => error_samples.push(e.to_string()),
                _ => {}
            }
        }
        HoldReport {
            target: self.target,
            tls: self.tls,
            requested: self.requested,
            opened,
            held,
            failed_open: self.failed_open,
            open_time: self.open_time,
            hold_time: began.elapsed(),
            noops,
            error_samples,
        }
    }
}

// === impl HoldReport ===

impl HoldReport {
    pub(crate) fn text(&self) -> String {
        format!(
            "hold {} (tls {}): {} of {} sessions held for {:.1} s ({} opened in {:.1} s, {} failed to open, {} NOOPs answered)\n{}",
            self.target,
            self.tls.as_str(),
            self.held,
            self.requested,
            self.hold_time.as_secs_f64(),
            self.opened,
            self.open_time.as_secs_f64(),
            self.failed_open,
            self.noops,
            error_lines(&self.error_samples)
        )
    }

    pub(crate) fn json(&self) -> JsonObject {
        JsonObject::new()
            .str("mode", "hold")
            .str("target", &self.target.to_string())
            .str("tls", self.tls.as_str())
            .int("requested", self.requested as u64)
            .int("opened", self.opened as u64)
            .int("held", self.held as u64)
            .int("failed_open", self.failed_open)
            .num("open_s", self.open_time.as_secs_f64())
            .num("hold_s", self.hold_time.as_secs_f64())
            .int("noops", self.noops)
            .strs("error_samples", &self.error_samples)
    }
}
