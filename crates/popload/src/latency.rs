//! `latency`: on one logged-in session, `--count` sequential NOOP round trips, then as many `LIST n`, then
//! as many RETR of message `n` (meant to be small: a proxy that waits for Nagle or a delayed ACK shows up
//! here as tens of milliseconds). A few unrecorded round trips of each warm the path first.

use std::net::SocketAddr;

use tokio::time::Instant;

use super::client::TlsMode;
use super::report::{JsonObject, summary_line};
use super::stats::{Samples, Summary};
use super::{AccountArgs, LoadError, TargetArgs};

/// `popgate-bench latency`.
#[derive(Debug, Clone, clap::Args)]
pub struct LatencyArgs {
    /// Server and TLS.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The account (the first one is used).
    #[command(flatten)]
    pub accounts: AccountArgs,
    /// Round trips of each kind.
    #[arg(long, default_value_t = 2000)]
    pub count: usize,
    /// Message for `LIST n` and RETR.
    #[arg(long, default_value_t = 1)]
    pub message: u64,
    /// Unrecorded round trips of each kind first.
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
}

/// What a `latency` run measured.
#[derive(Debug, Clone)]
pub struct LatencyReport {
    /// Where.
    pub target: SocketAddr,
    /// Client TLS.
    pub tls: TlsMode,
    /// Message number.
    pub message: u64,
    /// Its size.
    pub octets: u64,
    /// NOOP round trips.
    pub noop: Summary,
    /// `LIST n` round trips.
    pub list: Summary,
    /// RETR round trips (to the terminating `.CRLF`).
    pub retr: Summary,
}

#[derive(Clone, Copy)]
enum Probe {
    Noop,
    List,
    Retr,
}

/// Runs the workload.
pub async fn run(args: &LatencyArgs) -> Result<LatencyReport, LoadError> {
    if args.count == 0 {
        return Err(LoadError::Usage("--count must be at least 1".into()));
    }
    let (connector, mut pop) = super::first_account_session(&args.target, &args.accounts).await?;
    let list = format!("LIST {}\r\n", args.message).into_bytes();
    let retr = format!("RETR {}\r\n", args.message).into_bytes();
    let octets = pop.list_one(&list, args.message).await?;
    let mut summaries = [Summary::default(); 3];
    for (slot, probe) in [Probe::Noop, Probe::List, Probe::Retr]
        .into_iter()
        .enumerate()
    {
        let mut samples = Samples::with_capacity(args.count);
        for i in 0..args.warmup + args.count {
            let began = Instant::now();
            match probe {
                Probe::Noop => pop.simple(b"NOOP\r\n", "NOOP").await?,
                Probe::List => {
                    pop.list_one(&list, args.message).await?;
                }
                Probe::Retr => {
                    pop.retr(&retr, Some(octets)).await?;
                }
            }
            if i >= args.warmup {
                samples.push(began.elapsed());
            }
        }
        summaries[slot] = samples.summary();
    }
    pop.quit().await?;
    let [noop, list, retr] = summaries;
    Ok(LatencyReport {
        target: connector.addr,
        tls: connector.tls,
        message: args.message,
        octets,
        noop,
        list,
        retr,
    })
}

// === impl LatencyReport ===

impl LatencyReport {
    pub(crate) fn text(&self) -> String {
        format!(
            "latency {} (tls {}), one session\n  NOOP:       {}\n  LIST {}:     {}\n  RETR {} ({} octets): {}\n",
            self.target,
            self.tls.as_str(),
            summary_line(&self.noop),
            self.message,
            summary_line(&self.list),
            self.message,
            self.octets,
            summary_line(&self.retr),
        )
    }

    pub(crate) fn json(&self) -> JsonObject {
        JsonObject::new()
            .str("mode", "latency")
            .str("target", &self.target.to_string())
            .str("tls", self.tls.as_str())
            .int("message", self.message)
            .int("octets", self.octets)
            .summary_us("noop", &self.noop)
            .summary_us("list", &self.list)
            .summary_us("retr", &self.retr)
    }
}
