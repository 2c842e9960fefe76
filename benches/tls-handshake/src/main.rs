//! How much server CPU one TLS handshake costs popgate, per rustls crypto provider and certificate kind.
//!
//! A client and a server connection talk through memory (no sockets, no scheduler), and only the time
//! spent inside the server's calls is counted: what a proxy pays per handshake on its own CPU. Each
//! figure is the median of several batches. The client offers X25519 only, as the clients popgate
//! serves do (curl, Thunderbird, Outlook); the server has each provider's default groups.
//!
//! Usage: tls-handshake-bench [HANDSHAKES_PER_BATCH] [BATCHES]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection, SupportedProtocolVersion,
};

struct Provider {
    name: &'static str,
    make: fn() -> CryptoProvider,
    client_kx: fn() -> CryptoProvider,
    ticketer: fn() -> Result<Arc<dyn rustls::server::ProducesTickets>>,
}

#[allow(deprecated)] // ring is what popgate ships today; rustls marks it for lacking post-quantum groups
fn providers() -> [Provider; 2] {
    [
        Provider {
            name: "ring",
            make: rustls::crypto::ring::default_provider,
            client_kx: || CryptoProvider {
                kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
                ..rustls::crypto::ring::default_provider()
            },
            ticketer: || Ok(rustls::crypto::ring::Ticketer::new()?),
        },
        Provider {
            name: "aws-lc-rs",
            make: rustls::crypto::aws_lc_rs::default_provider,
            client_kx: || CryptoProvider {
                kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
                ..rustls::crypto::aws_lc_rs::default_provider()
            },
            ticketer: || Ok(rustls::crypto::aws_lc_rs::Ticketer::new()?),
        },
    ]
}

struct Identity {
    name: &'static str,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

fn identity(name: &'static str, alg: &'static rcgen::SignatureAlgorithm) -> Result<Identity> {
    let key = rcgen::KeyPair::generate_for(alg).context("generating the key")?;
    let params = rcgen::CertificateParams::new(vec!["bench.example".to_owned()])?;
    let cert = params.self_signed(&key)?;
    Ok(Identity {
        name,
        chain: vec![cert.der().clone()],
        key_der: key.serialize_der(),
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Full,
    Resumed,
}

struct Case<'a> {
    provider: &'a Provider,
    identity: &'a Identity,
    version: &'static SupportedProtocolVersion,
    kind: Kind,
}

fn configs(case: &Case<'_>) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(case.identity.key_der.clone()));
    let mut server = ServerConfig::builder_with_provider(Arc::new((case.provider.make)()))
        .with_protocol_versions(&[case.version])?
        .with_no_client_auth()
        .with_single_cert(case.identity.chain.clone(), key)?;
    server.ticketer = (case.provider.ticketer)()?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(case.identity.chain[0].clone())?;
    let mut client = ClientConfig::builder_with_provider(Arc::new((case.provider.client_kx)()))
        .with_protocol_versions(&[case.version])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if matches!(case.kind, Kind::Full) {
        client.resumption = rustls::client::Resumption::disabled();
    }
    Ok((Arc::new(server), Arc::new(client)))
}

/// One handshake through memory; returns the time spent in the server's calls and whether it resumed.
fn handshake(
    server_config: &Arc<ServerConfig>,
    client_config: &Arc<ClientConfig>,
) -> Result<(Duration, bool)> {
    let name = ServerName::try_from("bench.example")?;
    let mut client = ClientConnection::new(client_config.clone(), name)?;
    let mut server_time = Duration::ZERO;
    let started = Instant::now();
    let mut server = ServerConnection::new(server_config.clone())?;
    server_time += started.elapsed();
    let mut to_server = Vec::new();
    let mut to_client = Vec::new();
    for _ in 0..16 {
        to_server.clear();
        while client.wants_write() {
            client.write_tls(&mut to_server)?;
        }
        let started = Instant::now();
        let mut input = &to_server[..];
        while !input.is_empty() {
            server.read_tls(&mut input)?;
            server.process_new_packets()?;
        }
        to_client.clear();
        while server.wants_write() {
            server.write_tls(&mut to_client)?;
        }
        server_time += started.elapsed();
        let mut input = &to_client[..];
        while !input.is_empty() {
            client.read_tls(&mut input)?;
            client.process_new_packets()?;
        }
        if !client.is_handshaking()
            && !server.is_handshaking()
            && !client.wants_write()
            && !server.wants_write()
        {
            let resumed = matches!(
                server.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed)
            );
            return Ok((server_time, resumed));
        }
    }
    anyhow::bail!("the handshake did not finish in 16 flights")
}

fn measure(case: &Case<'_>, per_batch: usize, batches: usize) -> Result<(f64, f64)> {
    let (server, client) = configs(case)?;
    // Warm up: and, for resumed runs, give the client a ticket to start from.
    for _ in 0..20 {
        handshake(&server, &client)?;
    }
    let mut medians = Vec::with_capacity(batches);
    let mut resumed = 0usize;
    for _ in 0..batches {
        let mut total = Duration::ZERO;
        for _ in 0..per_batch {
            let (took, was_resumed) = handshake(&server, &client)?;
            total += took;
            resumed += usize::from(was_resumed);
        }
        medians.push(total.as_secs_f64() * 1e6 / per_batch as f64);
    }
    medians.sort_by(f64::total_cmp);
    let share = resumed as f64 * 100.0 / (per_batch * batches) as f64;
    Ok((medians[batches / 2], share))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let per_batch: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let batches: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let identities = [
        identity("ECDSA P-256", &rcgen::PKCS_ECDSA_P256_SHA256)?,
        identity("RSA-2048", &rcgen::PKCS_RSA_SHA256)?,
    ];
    let providers = providers();
    println!(
        "Server CPU per TLS handshake, through memory; median of {batches} batches of {per_batch}."
    );
    println!();
    println!(
        "| provider | certificate | handshake | server µs per handshake | handshakes/s per core | resumed % |"
    );
    println!("|---|---|---|---:|---:|---:|");
    let shapes: [(&str, &'static SupportedProtocolVersion, Kind); 3] = [
        ("TLS 1.3 full", &rustls::version::TLS13, Kind::Full),
        ("TLS 1.3 resumed", &rustls::version::TLS13, Kind::Resumed),
        ("TLS 1.2 full", &rustls::version::TLS12, Kind::Full),
    ];
    for identity in &identities {
        for (label, version, kind) in shapes {
            for provider in &providers {
                let case = Case {
                    provider,
                    identity,
                    version,
                    kind,
                };
                let (micros, resumed) = measure(&case, per_batch, batches)
                    .with_context(|| format!("{} {} {label}", provider.name, identity.name))?;
                println!(
                    "| {} | {} | {label} | {micros:.0} | {:.0} | {resumed:.0} |",
                    provider.name,
                    identity.name,
                    1e6 / micros
                );
            }
        }
    }
    Ok(())
}
