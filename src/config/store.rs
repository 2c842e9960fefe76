//! Config types for the store side: how a tenant's stores are found, chosen, reached, checked and
//! pre-warmed, and the DNS settings they share.

use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use super::{AddressError, Seconds, StoreAddr};

/// One configured store entry: `host:port` text, or an object with a weight and TLS mode, or an SRV name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// An IP literal or a name resolved with A/AAAA.
    Host {
        /// Address.
        addr: StoreAddr,
        /// Relative share (consistent hashing and weighted balancing). Default 1.
        weight: u32,
        /// TLS mode for this store, overriding the tenant's `backend_tls.mode`.
        tls: Option<StoreTlsMode>,
    },
    /// An SRV name (`_pop3._tcp.store.mail.svc.cluster.local`); ports, priorities and weights come from DNS.
    Srv {
        /// The SRV owner name.
        name: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreObject {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    srv: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    tls: Option<StoreTlsMode>,
}

impl<'de> Deserialize<'de> for StoreSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Object(StoreObject),
        }
        use serde::de::Error;
        let raw = Raw::deserialize(d).map_err(|_| {
            D::Error::custom("a store is `host:port`, {address: \"host:port\", weight: N} or {srv: \"_pop3._tcp.name\"}")
        })?;
        match raw {
            Raw::Text(text) => StoreSpec::from_str(&text).map_err(D::Error::custom),
            Raw::Object(StoreObject {
                address: Some(a),
                srv: None,
                weight,
                tls,
            }) => {
                let weight = weight.unwrap_or(1);
                if weight == 0 || weight > 1000 {
                    return Err(D::Error::custom("weight must be between 1 and 1000"));
                }
                Ok(StoreSpec::Host {
                    addr: a.parse().map_err(D::Error::custom)?,
                    weight,
                    tls,
                })
            }
            Raw::Object(StoreObject {
                address: None,
                srv: Some(name),
                weight: None,
                tls: None,
            }) => srv_spec(&name).map_err(D::Error::custom),
            Raw::Object(_) => Err(D::Error::custom(
                "give either `address` (with optional `weight` and `tls`) or `srv` (weights come from DNS)",
            )),
        }
    }
}

impl FromStr for StoreSpec {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with('_') && !s.contains(':') {
            return srv_spec(s);
        }
        Ok(StoreSpec::Host {
            addr: s.parse()?,
            weight: 1,
            tls: None,
        })
    }
}

fn srv_spec(name: &str) -> Result<StoreSpec, AddressError> {
    let name = name.trim_end_matches('.');
    // SRV owner names carry `_service._proto` labels, which IDNA's host-name rules reject.
    let labels_ok = name.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !name.starts_with('_') || !labels_ok || name.len() > 253 {
        return Err(AddressError::BadSrvName(name.to_owned()));
    }
    Ok(StoreSpec::Srv {
        name: name.to_ascii_lowercase(),
    })
}

/// TLS on the store leg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreTlsMode {
    /// Plain POP3 (the default; typical inside a trusted network).
    #[default]
    None,
    /// Plain POP3, then STLS before anything else; refused if the store does not offer STLS.
    Starttls,
    /// TLS from the first byte (POP3S).
    Implicit,
}

/// How popgate verifies and authenticates to stores over TLS.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    /// `none`, `starttls` or `implicit`. Default `none`.
    #[serde(default)]
    pub mode: StoreTlsMode,
    /// PEM bundle of CAs that sign the stores' certificates. Required unless `insecure_skip_verify`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for stores that require one.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// Key for `certificate`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Name to verify the store certificate against. Default: the store's host name (or IP address).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Accept any store certificate. Only for labs; popgate warns at startup.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// How the client's address reaches the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientIpForwarding {
    /// Dovecot-style `XCLIENT ADDR= PORT= SESSION=` after the greeting, only when the store advertises
    /// XCLIENT (the default; works with pre-warmed connections).
    #[default]
    Xclient,
    /// A PROXY protocol v1 header at connect (no pre-warming for such stores).
    ProxyV1,
    /// A PROXY protocol v2 header at connect (no pre-warming for such stores).
    ProxyV2,
    /// Nothing: the store sees popgate's address.
    None,
}

/// Active and passive health checking. A probe does what a login needs before credentials: connect, TLS or
/// STLS as configured, a `+OK` greeting and CAPA.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Probe stores at all. Default true.
    pub enabled: bool,
    /// Time between probes. Default 5s.
    pub interval: Seconds,
    /// One probe's limit (connect, TLS, greeting, CAPA). Default 3s.
    pub timeout: Seconds,
    /// Consecutive good probes before a down store is up. Default 2.
    pub rise: u32,
    /// Consecutive failed probes, or failed connects from logins, before an up store is down. Default 3.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Seconds::from_secs(5),
            timeout: Seconds::from_secs(3),
            rise: 2,
            fall: 3,
        }
    }
}

/// Pre-warmed store connections (connected, TLS done, greeted, CAPA read), per store.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Idle connections to keep ready. 0 turns pre-warming off. Default 2.
    pub min_idle: usize,
    /// Idle connections kept at most; with `xclient_at_user`, also the connections held at most for clients
    /// between their USER and PASS. Default 16.
    pub max_idle: usize,
    /// Retire an idle connection after this long, well before the store's own pre-login timeout. Default 20s.
    pub max_age: Seconds,
    /// Logins that may wait on one store at once (connect, greeting, login answer), across every tenant
    /// using it; a login beyond it goes to another store where the stores share mail, or gets
    /// `-ERR [SYS/TEMP]`. Bounds what a store that accepts but never answers can hold up. 0 (the default)
    /// for no cap.
    pub max_logins_in_flight: usize,
    /// With `client_ip: xclient`: at a client's USER, hold an idle pooled connection to the store its login
    /// will use and send XCLIENT on it, so that its PASS waits for one store round trip instead of two
    /// (one store round trip off the PASS; no measurable CPU, BENCHMARKS.md). Default false: the store
    /// then hears of a client, its address included, before the client has given a password.
    pub xclient_at_user: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_idle: 2,
            max_idle: 16,
            max_age: Seconds::from_secs(20),
            max_logins_in_flight: 0,
            xclient_at_user: false,
        }
    }
}

/// DNS for store discovery.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers (`ip:port`); empty means the system's resolv.conf. Default empty.
    pub nameservers: Vec<std::net::SocketAddr>,
    /// Re-resolve no sooner than this (also the retry delay after a failure). Default 5s.
    pub min_ttl: Seconds,
    /// Re-resolve at least this often. Default 300s.
    pub max_ttl: Seconds,
    /// One query's timeout. Default 2s.
    pub timeout: Seconds,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl: Seconds::from_secs(5),
            max_ttl: Seconds::from_secs(300),
            timeout: Seconds::from_secs(2),
        }
    }
}

/// PROXY protocol from a load balancer in front of popgate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolIn {
    /// Networks allowed to send the header (CIDR). Connections from elsewhere are refused; a connection from
    /// these networks without a valid v1 or v2 header is refused too (never guessed).
    pub trusted_networks: Vec<ipnet::IpNet>,
}
