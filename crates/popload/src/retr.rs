//! `retr`: RETR of one (large) message `--count` times on one logged-in session. Each body's size after
//! undoing dot-stuffing must equal what `LIST n` said; the rate is wire octets (the body as sent, terminator
//! included) per second from writing RETR to reading the terminating `.CRLF`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::client::TlsMode;
use super::report::JsonObject;
use super::stats::median;
use super::{AccountArgs, LoadError, TargetArgs};

/// `popgate-bench retr`.
#[derive(Debug, Clone, clap::Args)]
pub struct RetrArgs {
    /// Server and TLS.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The account (the first one is used).
    #[command(flatten)]
    pub accounts: AccountArgs,
    /// Message number to retrieve.
    #[arg(long, default_value_t = 1)]
    pub message: u64,
    /// How many times to retrieve it.
    #[arg(long, default_value_t = 5)]
    pub count: usize,
}

/// What a `retr` run measured.
#[derive(Debug, Clone)]
pub struct RetrReport {
    /// Where.
    pub target: SocketAddr,
    /// Client TLS.
    pub tls: TlsMode,
    /// Message number.
    pub message: u64,
    /// Its size per LIST (checked against every body).
    pub octets: u64,
    /// Wire octets of one body.
    pub wire_octets: u64,
    /// Duration of each RETR.
    pub times: Vec<Duration>,
}

/// Runs the workload.
pub async fn run(args: &RetrArgs) -> Result<RetrReport, LoadError> {
    if args.count == 0 {
        return Err(LoadError::Usage("--count must be at least 1".into()));
    }
    let (connector, mut pop) = super::first_account_session(&args.target, &args.accounts).await?;
    let octets = pop
        .list_one(
            format!("LIST {}\r\n", args.message).as_bytes(),
            args.message,
        )
        .await?;
    let retr = format!("RETR {}\r\n", args.message).into_bytes();
    let mut times = Vec::with_capacity(args.count);
    let mut wire_octets = 0;
    for _ in 0..args.count {
        let began = Instant::now();
        let body = pop.retr(&retr, Some(octets)).await?;
        times.push(began.elapsed());
        wire_octets = body.wire;
    }
    pop.quit().await?;
    Ok(RetrReport {
        target: connector.addr,
        tls: connector.tls,
        message: args.message,
        octets,
        wire_octets,
        times,
    })
}

// === impl RetrReport ===

impl RetrReport {
    /// MiB/s of each RETR.
    pub fn mib_per_sec(&self) -> Vec<f64> {
        self.times
            .iter()
            .map(|t| self.wire_octets as f64 / t.as_secs_f64().max(1e-9) / f64::from(1u32 << 20))
            .collect()
    }

    /// Median MiB/s.
    pub fn median_mib_per_sec(&self) -> f64 {
        median(&self.mib_per_sec())
    }

    pub(crate) fn text(&self) -> String {
        let rates: Vec<String> = self
            .mib_per_sec()
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        format!(
            "retr {} (tls {}), message {} of {} octets, {} times\n  median {:.0} MiB/s  (each: {})\n",
            self.target,
            self.tls.as_str(),
            self.message,
            self.octets,
            self.times.len(),
            self.median_mib_per_sec(),
            rates.join(", ")
        )
    }

    pub(crate) fn json(&self) -> JsonObject {
        JsonObject::new()
            .str("mode", "retr")
            .str("target", &self.target.to_string())
            .str("tls", self.tls.as_str())
            .int("message", self.message)
            .int("octets", self.octets)
            .int("wire_octets", self.wire_octets)
            .num("median_mib_per_s", self.median_mib_per_sec())
            .nums("mib_per_s", &self.mib_per_sec())
    }
}
