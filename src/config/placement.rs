//! `tenants.NAME.placement`: where a tenant's mailboxes live, looked up per login in a directory the ISP
//! already runs (a map file, LDAP, or SQL) before the balance policy is asked (see `popgate::placement`).

use std::path::PathBuf;

use serde::Deserialize;

use super::duration::Seconds;

/// One tenant's placement source and how its answers are used.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// A file of `mailbox store [login]` lines, reloaded when it changes.
    #[serde(default)]
    pub map: Option<PathBuf>,
    /// An LDAP directory.
    #[serde(default)]
    pub ldap: Option<LdapPlacement>,
    /// A PostgreSQL or MySQL/MariaDB table.
    #[serde(default)]
    pub sql: Option<SqlPlacement>,
    /// One lookup's limit (a login never waits longer, nor past `timeouts.backend_reply`). Default 2s.
    #[serde(default = "default_timeout")]
    pub timeout: Seconds,
    /// What a mailbox the source does not know gets. Default `balance`.
    #[serde(default)]
    pub not_found: NotFound,
    /// Answers naming a host that is not one of the tenant's stores are used only when its address is in
    /// one of these networks (default none: only the tenant's own stores).
    #[serde(default)]
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Port for an answer that names a host without one. Default 110.
    #[serde(default = "default_port")]
    pub default_port: u16,
    /// How answers are kept (LDAP and SQL; the map is memory already).
    #[serde(default)]
    pub cache: PlacementCache,
}

/// What happens to a mailbox the source does not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotFound {
    /// The tenant's balance policy picks a store, as without placement.
    #[default]
    Balance,
    /// The login is refused with the same `-ERR [AUTH]` as a wrong password (and as slowly), so names
    /// cannot be probed.
    Refuse,
}

/// The answer cache of one tenant's source.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PlacementCache {
    /// How long a found store is used without asking again. Default 5m.
    #[serde(default = "default_ttl")]
    pub ttl: Seconds,
    /// How long "not found" is kept. Default 1m.
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl: Seconds,
    /// How long past its TTL an answer still serves while the directory cannot be asked. Default 1h.
    #[serde(default = "default_stale_for")]
    pub stale_for: Seconds,
    /// Mailboxes kept at most (0: no cache). Default 100000.
    #[serde(default = "default_size")]
    pub size: usize,
}

impl Default for PlacementCache {
    fn default() -> Self {
        Self {
            ttl: default_ttl(),
            negative_ttl: default_negative_ttl(),
            stale_for: default_stale_for(),
            size: default_size(),
        }
    }
}

/// An LDAP directory: one search per lookup, the store read from an attribute.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LdapPlacement {
    /// `ldap://host[:port]` or `ldaps://host[:port]`, tried in order when one cannot be reached.
    pub urls: Vec<String>,
    /// Upgrade `ldap://` connections with StartTLS. Default false.
    #[serde(default)]
    pub starttls: bool,
    /// PEM trust anchors for LDAPS and StartTLS; default the system's.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// DN to bind as; none: anonymous.
    #[serde(default)]
    pub bind_dn: Option<String>,
    /// A file whose first line is the bind password (re-read at every reload).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Where to search (subtree).
    pub base: String,
    /// The filter, with `{mailbox}`, `{local}` and `{domain}` replaced by the login's parts escaped as RFC
    /// 4515 says (so `*`, `(`, `)`, `\` and NUL in a name match only themselves). Default `(mail={mailbox})`.
    #[serde(default = "default_filter")]
    pub filter: String,
    /// The attribute naming the store (`host`, `host:port`, or a store of the tenant). Default `mailHost`.
    #[serde(default = "default_attribute")]
    pub attribute: String,
    /// An attribute with the name to log in with at the store, if any.
    #[serde(default)]
    pub login_attribute: Option<String>,
    /// Connections kept open at most. Default 4.
    #[serde(default = "default_pool")]
    pub pool: usize,
}

/// A SQL table: one parameterised query per lookup.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SqlPlacement {
    /// `postgres://user@host[:port]/db` or `mysql://user@host[:port]/db` (TLS and other options as the
    /// URL's query: `sslmode=verify-full&sslrootcert=…`, `ssl-mode=VERIFY_IDENTITY&ssl-ca=…`). No
    /// password here: see `password_file`.
    pub url: String,
    /// A file whose first line is the password (re-read at every reload).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The query, with the mailbox as its one parameter (`$1` for PostgreSQL, `?` for MySQL/MariaDB),
    /// never pasted into the text. Its first column is the store, the optional second the login name.
    pub query: String,
    /// Connections kept open at most. Default 4.
    #[serde(default = "default_pool")]
    pub pool: usize,
}

fn default_timeout() -> Seconds {
    Seconds::from_secs(2)
}
fn default_port() -> u16 {
    110
}
fn default_ttl() -> Seconds {
    Seconds::from_secs(300)
}
fn default_negative_ttl() -> Seconds {
    Seconds::from_secs(60)
}
fn default_stale_for() -> Seconds {
    Seconds::from_secs(3600)
}
fn default_size() -> usize {
    100_000
}
fn default_filter() -> String {
    "(mail={mailbox})".into()
}
fn default_attribute() -> String {
    "mailHost".into()
}
fn default_pool() -> usize {
    4
}

impl PlacementConfig {
    /// The problems of this source's settings, as `(field under placement, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let sources = usize::from(self.map.is_some())
            + usize::from(self.ldap.is_some())
            + usize::from(self.sql.is_some());
        if sources != 1 {
            out.push((
                String::new(),
                "give exactly one source: map, ldap or sql".into(),
            ));
        }
        if self.timeout.get().is_zero() {
            out.push(("timeout".into(), "must be above zero".into()));
        }
        if let Some(l) = &self.ldap {
            if l.urls.is_empty() {
                out.push(("ldap.urls".into(), "at least one URL is required".into()));
            }
            for u in &l.urls {
                let lower = u.to_ascii_lowercase();
                if !(lower.starts_with("ldap://") || lower.starts_with("ldaps://")) {
                    out.push(("ldap.urls".into(), format!("{u}: use ldap:// or ldaps://")));
                }
            }
            if l.bind_dn.is_some() != l.password_file.is_some() {
                out.push((
                    "ldap.bind_dn".into(),
                    "bind_dn and password_file go together (neither: an anonymous bind)".into(),
                ));
            }
            if !l.filter.contains("{mailbox}") && !l.filter.contains("{local}") {
                out.push((
                    "ldap.filter".into(),
                    "must use {mailbox} or {local}, or every login would find the same entry"
                        .into(),
                ));
            }
            if l.pool == 0 {
                out.push(("ldap.pool".into(), "must be at least 1".into()));
            }
        }
        if let Some(s) = &self.sql {
            let lower = s.url.to_ascii_lowercase();
            if !(lower.starts_with("postgres://")
                || lower.starts_with("postgresql://")
                || lower.starts_with("mysql://")
                || lower.starts_with("mariadb://"))
            {
                out.push((
                    "sql.url".into(),
                    "use postgres://, postgresql://, mysql:// or mariadb://".into(),
                ));
            }
            if s.pool == 0 {
                out.push(("sql.pool".into(), "must be at least 1".into()));
            }
        }
        out
    }
}
