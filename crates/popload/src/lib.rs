//! `popgate-bench`: a POP3 load tool for loopback benchmarks of popgate and of mail stores directly.
//!
//! Owns the `bench` command line, the client side of four workloads and their reports (text, or one JSON
//! object with `--json`):
//! - [`logins`]: C concurrent workers, each looping connect → greeting → USER/PASS → STAT → QUIT;
//! - [`retr`]: MiB/s of RETR of a large message, its size checked against LIST;
//! - [`latency`]: sequential NOOP, `LIST n` and small-message RETR round trips on one session;
//! - [`hold`]: C logged-in idle sessions held for S seconds, a NOOP every 30 s each.
//!
//! Must not: send a byte anywhere but loopback (a non-loopback target is refused before any connect), run
//! unbounded (every workload stops on a count or a deadline, and every read and write has a timeout), or count
//! a reply that is not what RFC 1939 says as a success (the run reports it and exits non-zero).
//! The workloads are library functions too, so `benches/load.rs` drives them in-process while popgate runs
//! as a separate process whose memory and CPU it reads.

pub mod client;
pub mod hold;
pub mod latency;
pub mod logins;
pub mod report;
pub mod retr;
pub mod stats;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;

pub use client::{ClientError, Connector, Pop3, TlsMode};
pub use report::Report;

/// `popgate-bench <mode> ...`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub mode: Mode,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Worker threads of the load tool's own runtime (1: single-threaded, leaving the other cores to the
    /// servers under test).
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
}

/// The workloads.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Mode {
    /// C concurrent workers looping connect → greeting → USER/PASS → STAT → QUIT for a while.
    Logins(logins::LoginsArgs),
    /// RETR of one (large) message several times on one session; MiB/s, size checked against LIST.
    Retr(retr::RetrArgs),
    /// N sequential NOOP, LIST n and RETR n round trips on one session; p50/p99 in microseconds.
    Latency(latency::LatencyArgs),
    /// C logged-in idle sessions held for S seconds, a NOOP every 30 s each.
    Hold(hold::HoldArgs),
}

/// Where to connect and how.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Server to load: `127.0.0.1:1110`, `[::1]:110` or `localhost:110`. Loopback addresses only.
    #[arg(long)]
    pub target: String,
    /// TLS on the connection: `none`, `stls` (after the greeting) or `implicit` (POP3S).
    #[arg(long, value_enum, default_value_t = TlsMode::None)]
    pub tls: TlsMode,
    /// Accept any server certificate (self-signed test stores, popgate's fallback certificate).
    #[arg(long)]
    pub insecure: bool,
    /// PEM bundle of CAs to verify the server certificate against (instead of `--insecure`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// TLS server name sent as SNI (and verified unless `--insecure`).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Limit in seconds on each connect, TLS handshake, read and write.
    #[arg(long, default_value_t = 10.0)]
    pub io_timeout: f64,
    /// Keep TLS sessions and resume them on the next connections, as clients that poll a mailbox every
    /// few minutes do (the clients share one session cache: rustls keeps the newest tickets per server
    /// name, and each handshake brings new ones). Default: every connection a full handshake.
    #[arg(long)]
    pub resume: bool,
}

/// Which mailboxes to log in to. Session `i` uses account `i mod N`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AccountArgs {
    /// Login name (one account).
    #[arg(long, conflicts_with_all = ["users_file", "user_pattern"])]
    pub user: Option<String>,
    /// Password; with `--user-pattern`, `{n}` is replaced as there.
    #[arg(long)]
    pub pass: Option<String>,
    /// A file of `login:password` lines (blank lines and `#` comments skipped).
    #[arg(long, conflicts_with = "user_pattern")]
    pub users_file: Option<PathBuf>,
    /// Login-name pattern such as `u{n}@example.com`; `{n}` runs from 1 to `--users`.
    #[arg(long)]
    pub user_pattern: Option<String>,
    /// How many accounts `--user-pattern` makes.
    #[arg(long, default_value_t = 1)]
    pub users: usize,
}

/// Pre-formatted `USER` and `PASS` lines, so the measured loop formats nothing.
#[derive(Debug, Clone)]
pub struct Account {
    /// `USER name\r\n`.
    pub user_line: Vec<u8>,
    /// `PASS secret\r\n`.
    pub pass_line: Vec<u8>,
}

/// The accounts a run cycles through.
#[derive(Debug, Clone)]
pub struct Accounts(Vec<Account>);

/// Why a run could not start or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Arguments that do not make a run.
    #[error("{0}")]
    Usage(String),
    /// The target is not a loopback address.
    #[error("refusing {0}: the load tool only sends to loopback addresses (127.0.0.0/8, ::1)")]
    NotLoopback(String),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS client setup failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A step outside the measured loop failed (login of a latency or RETR session...).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A worker task panicked.
    #[error("a load worker failed: {0}")]
    Worker(String),
}

// === entry points ===

/// Runs `popgate-bench` and prints its report; returns the process exit code (0 only when every reply was
/// what the protocol says).
pub fn main(args: &BenchArgs) -> i32 {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("popgate-bench: cannot start the async runtime: {e}");
            return 2;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) => {
            if args.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if report.failed() {
                eprintln!(
                    "popgate-bench: FAILED: some replies were not what POP3 says (see errors above)"
                );
                1
            } else {
                0
            }
        }
        Err(e) => {
            eprintln!("popgate-bench: {e}");
            2
        }
    }
}

/// Runs one workload.
pub async fn run(args: &BenchArgs) -> Result<Report, LoadError> {
    Ok(match &args.mode {
        Mode::Logins(a) => Report::Logins(logins::run(a).await?),
        Mode::Retr(a) => Report::Retr(retr::run(a).await?),
        Mode::Latency(a) => Report::Latency(latency::run(a).await?),
        Mode::Hold(a) => Report::Hold(hold::run(a).await?),
    })
}

// === impl TargetArgs ===

impl TargetArgs {
    /// A plain-TCP target at `addr` with default settings (for in-process callers such as benches).
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            target: addr.to_string(),
            tls: TlsMode::None,
            insecure: false,
            ca: None,
            server_name: "localhost".into(),
            io_timeout: 10.0,
            resume: false,
        }
    }

    /// The same target with TLS and no certificate verification.
    pub fn insecure_tls(addr: SocketAddr, mode: TlsMode) -> Self {
        Self {
            tls: mode,
            insecure: true,
            ..Self::plain(addr)
        }
    }

    /// Resolves and checks the target (loopback only) and builds the TLS client config.
    pub fn connector(&self) -> Result<Connector, LoadError> {
        let addr = loopback_target(&self.target)?;
        let tls_config = match self.tls {
            TlsMode::None => None,
            TlsMode::Stls | TlsMode::Implicit => Some(self.tls_config()?),
        };
        let server_name = ServerName::try_from(self.server_name.clone()).map_err(|_| {
            LoadError::Usage(format!("`{}` is not a TLS server name", self.server_name))
        })?;
        if !(self.io_timeout > 0.0 && self.io_timeout.is_finite()) {
            return Err(LoadError::Usage(
                "--io-timeout must be a positive number of seconds".into(),
            ));
        }
        Ok(Connector {
            addr,
            tls: self.tls,
            tls_config,
            server_name,
            io_timeout: Duration::from_secs_f64(self.io_timeout),
            resumed: Arc::default(),
        })
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, LoadError> {
        let builder = rustls::ClientConfig::builder_with_provider(popgate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| LoadError::Tls(e.to_string()))?;
        let mut config = match (&self.ca, self.insecure) {
            (_, true) => builder
                .dangerous()
                .with_custom_certificate_verifier(popgate::tls::unverified_chain())
                .with_no_client_auth(),
            (Some(ca), false) => builder
                .with_root_certificates(
                    popgate::tls::load_roots(ca).map_err(|e| LoadError::Tls(e.to_string()))?,
                )
                .with_no_client_auth(),
            (None, false) => {
                return Err(LoadError::Usage(
                    "TLS needs --ca FILE to verify the server, or --insecure".into(),
                ));
            }
        };
        config.resumption = if self.resume {
            // One server name here; rustls keeps up to 8 tickets for it, and each handshake brings new ones.
            rustls::client::Resumption::in_memory_sessions(64)
        } else {
            // Each session stands for a different client: every login pays a full handshake.
            rustls::client::Resumption::disabled()
        };
        Ok(Arc::new(config))
    }
}

/// Parses or resolves `target` and refuses anything that is not loopback.
fn loopback_target(target: &str) -> Result<SocketAddr, LoadError> {
    let addrs: Vec<SocketAddr> = match target.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => target
            .to_socket_addrs()
            .map_err(|e| LoadError::Usage(format!("--target {target}: {e}")))?
            .collect(),
    };
    match addrs.first() {
        None => Err(LoadError::Usage(format!("--target {target}: no address"))),
        Some(_) if addrs.iter().any(|a| !a.ip().is_loopback()) => {
            Err(LoadError::NotLoopback(target.to_owned()))
        }
        Some(a) => Ok(*a),
    }
}

// === impl AccountArgs ===

impl AccountArgs {
    /// One account.
    pub fn single(user: &str, pass: &str) -> Self {
        Self {
            user: Some(user.into()),
            pass: Some(pass.into()),
            ..Self::default()
        }
    }

    /// `users` accounts from patterns with `{n}` (1-based).
    pub fn pattern(user_pattern: &str, pass_pattern: &str, users: usize) -> Self {
        Self {
            user_pattern: Some(user_pattern.into()),
            pass: Some(pass_pattern.into()),
            users,
            ..Self::default()
        }
    }

    /// The accounts these arguments name.
    pub fn load(&self) -> Result<Accounts, LoadError> {
        let pass = || {
            self.pass.clone().ok_or_else(|| {
                LoadError::Usage("--pass is required with --user and --user-pattern".into())
            })
        };
        let pairs: Vec<(String, String)> = if let Some(path) = &self.users_file {
            let text = std::fs::read_to_string(path).map_err(|source| LoadError::File {
                path: path.clone(),
                source,
            })?;
            let mut pairs = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (u, p) = line.split_once(':').ok_or_else(|| {
                    LoadError::Usage(format!(
                        "{}:{}: not `login:password`",
                        path.display(),
                        i + 1
                    ))
                })?;
                pairs.push((u.to_owned(), p.to_owned()));
            }
            pairs
        } else if let Some(pattern) = &self.user_pattern {
            if self.users == 0 {
                return Err(LoadError::Usage("--users must be at least 1".into()));
            }
            let pass = pass()?;
            (1..=self.users)
                .map(|n| {
                    let n = n.to_string();
                    (pattern.replace("{n}", &n), pass.replace("{n}", &n))
                })
                .collect()
        } else if let Some(user) = &self.user {
            vec![(user.clone(), pass()?)]
        } else {
            return Err(LoadError::Usage(
                "give --user and --pass, --user-pattern and --pass, or --users-file".into(),
            ));
        };
        if pairs.is_empty() {
            return Err(LoadError::Usage("no accounts".into()));
        }
        let mut accounts = Vec::with_capacity(pairs.len());
        for (user, pass) in pairs {
            if user
                .bytes()
                .chain(pass.bytes())
                .any(|b| b == b'\r' || b == b'\n' || b == 0)
            {
                return Err(LoadError::Usage(
                    "a login name or password contains CR, LF or NUL".into(),
                ));
            }
            accounts.push(Account {
                user_line: format!("USER {user}\r\n").into_bytes(),
                pass_line: format!("PASS {pass}\r\n").into_bytes(),
            });
        }
        Ok(Accounts(accounts))
    }
}

// === impl Accounts ===

impl Accounts {
    /// The account for session number `i`.
    pub fn get(&self, i: u64) -> &Account {
        let n = self.0.len() as u64;
        &self.0[(i % n) as usize]
    }
}

/// One logged-in session on the first account: what the single-session workloads (`retr`, `latency`) start
/// from.
pub(crate) async fn first_account_session(
    target: &TargetArgs,
    accounts: &AccountArgs,
) -> Result<(Connector, Pop3), LoadError> {
    let connector = target.connector()?;
    let accounts = accounts.load()?;
    let account = accounts.get(0);
    let mut pop = connector.connect().await?;
    pop.login(&account.user_line, &account.pass_line).await?;
    Ok((connector, pop))
}

/// Seconds from the command line as a `Duration`, refusing negative, infinite and NaN values.
pub(crate) fn seconds(value: f64, what: &str) -> Result<Duration, LoadError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| LoadError::Usage(format!("{what} must be a non-negative number of seconds")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(loopback_target("127.0.0.1:110").is_ok());
        assert!(loopback_target("127.0.0.9:110").is_ok());
        assert!(loopback_target("[::1]:110").is_ok());
        assert!(loopback_target("localhost:110").is_ok());
        for far in [
            "10.0.0.1:110",
            "192.168.1.1:110",
            "[2001:db8::1]:110",
            "0.0.0.0:110",
        ] {
            assert!(
                matches!(loopback_target(far), Err(LoadError::NotLoopback(_))),
                "{far}"
            );
        }
    }

    #[test]
    fn accounts_from_a_pattern_cycle() {
        let accounts = AccountArgs::pattern("u{n}@example.com", "pw{n}", 3)
            .load()
            .unwrap();
        assert_eq!(accounts.get(0).user_line, b"USER u1@example.com\r\n");
        assert_eq!(accounts.get(4).pass_line, b"PASS pw2\r\n");
        assert!(AccountArgs::single("a\r\nDELE 1", "x").load().is_err());
        assert!(AccountArgs::default().load().is_err());
    }
}
