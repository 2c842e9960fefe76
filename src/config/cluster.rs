//! `cluster:`, the shared state replicas keep in Redis or Valkey (see `popgate::cluster`). Absent: every
//! replica keeps its limits to itself, as one process always did.

use std::path::PathBuf;

use serde::Deserialize;

use super::duration::Seconds;

/// Where the shared state lives and how replicas use it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// How the servers are run. Default `standalone`.
    #[serde(default)]
    pub mode: ClusterMode,
    /// `host:port` of the servers: the one server (`standalone`), some cluster nodes to discover the rest
    /// from (`cluster`), or the sentinels (`sentinel`). At least one.
    pub servers: Vec<String>,
    /// The master's name the sentinels watch (`sentinel` mode only).
    #[serde(default)]
    pub sentinel_service: Option<String>,
    /// ACL user name. Default: none (the `default` user).
    #[serde(default)]
    pub username: Option<String>,
    /// A file whose first line is the password (a mounted Secret). Read at start and at every reload. Also
    /// sent to the sentinels in `sentinel` mode.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A file whose first line keys the hashes that name every key (so no mailbox or address is stored in
    /// clear). Every replica must read the same one; at least 16 bytes. Required.
    pub key_secret_file: PathBuf,
    /// TLS to the servers. Absent: plain TCP.
    #[serde(default)]
    pub tls: Option<ClusterTls>,
    /// Prefix of every key and of the command channel, so several fleets can share one server. Default
    /// `popgate:`.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Longest wait for any answer before the shared state counts as unavailable (a login never waits
    /// longer on it). Default 100ms.
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
    /// How long a session's lease outlives the last renewal by its replica: a replica that dies frees its
    /// sessions within this time. Renewed every third of it. Default 30s.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: Seconds,
    /// What each kind of limit does while the shared state is unavailable.
    #[serde(default)]
    pub when_unavailable: WhenUnavailable,
}

/// How the Redis/Valkey servers are run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterMode {
    /// One server (or a managed endpoint that fails over behind one address).
    #[default]
    Standalone,
    /// Redis Cluster: keys spread over masters by hash slot.
    Cluster,
    /// A master found through Redis Sentinel.
    Sentinel,
}

/// TLS to the Redis/Valkey servers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// PEM file of the CAs that sign the servers' certificates. Absent: the system's roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name to check the servers' certificates against, when it differs from the host in `servers`.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Per kind of limit, what happens while the shared state cannot be asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WhenUnavailable {
    /// Failed-login counts and lockouts.
    pub lockouts: FailPolicy,
    /// Session caps per mailbox, per IP and per tenant.
    pub sessions: FailPolicy,
    /// `min_login_interval` (LOGIN-DELAY).
    pub login_delay: FailPolicy,
    /// The per-IP connection rate.
    pub connection_rate: FailPolicy,
}

/// What a limit does while the shared state is unavailable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// The replica enforces the limit alone, at the configured value (as without `cluster:`). The default:
    /// mail keeps flowing, and the limit is as strong as one replica's.
    #[default]
    Open,
    /// Refuse: logins get `-ERR [SYS/TEMP]` (connections are closed, for `connection_rate`) until the
    /// shared state answers again.
    Closed,
}

fn default_prefix() -> String {
    "popgate:".into()
}

fn default_timeout() -> Seconds {
    Seconds::from(std::time::Duration::from_millis(100))
}

fn default_lease_ttl() -> Seconds {
    Seconds::from_secs(30)
}

impl ClusterConfig {
    /// Problems of this block's values, as `(field, message)` (the files it names are checked by
    /// `Config::validate`).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut push = |f: &str, m: String| out.push((format!("cluster.{f}"), m));
        if self.servers.is_empty() {
            push("servers", "at least one `host:port` is required".into());
        }
        for s in &self.servers {
            let port = s.rsplit_once(':').and_then(|(h, p)| {
                (!h.is_empty()).then_some(())?;
                p.parse::<u16>().ok().filter(|p| *p > 0)
            });
            if port.is_none() {
                push("servers", format!("`{s}` is not host:port"));
            }
        }
        match (self.mode, &self.sentinel_service) {
            (ClusterMode::Sentinel, None) => {
                push("sentinel_service", "required in sentinel mode".into());
            }
            (ClusterMode::Standalone | ClusterMode::Cluster, Some(_)) => {
                push("sentinel_service", "only in sentinel mode".into());
            }
            _ => {}
        }
        if self.mode == ClusterMode::Standalone && self.servers.len() > 1 {
            push(
                "servers",
                "standalone mode takes one server (list cluster nodes with mode: cluster)".into(),
            );
        }
        if self.timeout.get().is_zero() || self.timeout.get() > std::time::Duration::from_secs(5) {
            push("timeout", "must be longer than zero and at most 5s".into());
        }
        if self.lease_ttl.get() < std::time::Duration::from_secs(1) {
            push("lease_ttl", "must be at least 1s".into());
        }
        if self.key_prefix.contains(['{', '}']) {
            push(
                "key_prefix",
                "must not contain `{` or `}` (they pick the hash slot)".into(),
            );
        }
        out
    }
}
