//! `popgate-bench`: the load tool's command line (see the library's docs for the workloads).

use clap::Parser;

/// A POP3 load tool for loopback benchmarks of popgate and of mail stores directly.
#[derive(Debug, Parser)]
#[command(name = "popgate-bench", version)]
struct Cli {
    #[command(flatten)]
    args: popload::BenchArgs,
}

fn main() {
    let cli = Cli::parse();
    std::process::exit(popload::main(&cli.args));
}
