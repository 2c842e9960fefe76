//! The shared vocabulary every room may use: tenant ids, login mechanisms, balance policies, the case rule
//! for login names, how domains and mailboxes are normalised, which sessions an operator means, and a
//! served certificate's facts. A leaf: it imports nothing of popgate, so
//! `config` can describe settings in these words without depending on the stages that act on them.

/// A tenant of one config snapshot. Only the router's tenant table hands them out
/// (`router::TenantTable::ids`), and everything per tenant (routes, runtime state, SNI bindings) is
/// looked up with them in that table's order, so no two lists can disagree about which tenant an id is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(usize);

impl TenantId {
    /// The id of the tenant at `index` in the table's order (for the table itself).
    pub(crate) fn from_index(index: usize) -> Self {
        Self(index)
    }

    /// Its position in the table's order.
    pub fn index(self) -> usize {
        self.0
    }
}

/// How the client logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// USER/PASS.
    #[serde(rename = "user")]
    UserPass,
    /// APOP (RFC 1939).
    Apop,
    /// AUTH PLAIN.
    Plain,
    /// AUTH LOGIN.
    Login,
    /// AUTH CRAM-MD5 (RFC 2195).
    CramMd5,
    /// AUTH XOAUTH2 (Google/Microsoft).
    Xoauth2,
    /// AUTH OAUTHBEARER (RFC 7628).
    Oauthbearer,
    /// AUTH SCRAM-SHA-1 (RFC 5802).
    #[serde(rename = "scram-sha-1")]
    ScramSha1,
    /// AUTH SCRAM-SHA-256 (RFC 7677).
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
}

impl Mechanism {
    /// Lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::UserPass => "user",
            Mechanism::Apop => "apop",
            Mechanism::Plain => "plain",
            Mechanism::Login => "login",
            Mechanism::CramMd5 => "cram-md5",
            Mechanism::Xoauth2 => "xoauth2",
            Mechanism::Oauthbearer => "oauthbearer",
            Mechanism::ScramSha1 => "scram-sha-1",
            Mechanism::ScramSha256 => "scram-sha-256",
        }
    }

    /// The SASL name, for CAPA and AUTH (None for USER and APOP).
    pub fn sasl_name(self) -> Option<&'static str> {
        Some(match self {
            Mechanism::UserPass | Mechanism::Apop => return None,
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::CramMd5 => "CRAM-MD5",
            Mechanism::Xoauth2 => "XOAUTH2",
            Mechanism::Oauthbearer => "OAUTHBEARER",
            Mechanism::ScramSha1 => "SCRAM-SHA-1",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
        })
    }

    /// Mechanisms that put a reusable secret (password or bearer token) on the wire: plaintext policy applies.
    pub fn reveals_secret(self) -> bool {
        matches!(
            self,
            Mechanism::UserPass
                | Mechanism::Plain
                | Mechanism::Login
                | Mechanism::Xoauth2
                | Mechanism::Oauthbearer
        )
    }

    /// The mechanism a SASL name stands for.
    pub fn from_sasl(name: &str) -> Option<Self> {
        [
            Mechanism::Plain,
            Mechanism::Login,
            Mechanism::CramMd5,
            Mechanism::Xoauth2,
            Mechanism::Oauthbearer,
            Mechanism::ScramSha1,
            Mechanism::ScramSha256,
        ]
        .into_iter()
        .find(|m| m.sasl_name() == Some(name))
    }
}

/// How a tenant's sessions are spread over its stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Each store in turn, as often as its weight says. The default.
    #[default]
    RoundRobin,
    /// The store with the fewest sessions in flight per unit of weight.
    LeastConnections,
    /// The same mailbox always goes to the same store (weighted rendezvous hashing), so that stores which do
    /// not share mail keep seeing their own mailboxes; few mailboxes move when a store joins or leaves.
    ConsistentHash,
}

/// How a tenant treats the case of login names' local parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginCase {
    /// One mailbox whatever the case; the store sees the name as the client wrote it.
    #[default]
    Insensitive,
    /// One mailbox whatever the case; the store sees it lowercased.
    Lower,
    /// Case matters: `John` and `john` are different mailboxes.
    Sensitive,
}

/// The mailbox as popgate keys it (consistent hash, throttles, session caps, secrets): `local@domain` with
/// the tenant's case rule on the local part, or the local part alone when there is no domain. `domain` must
/// already be normalised ([`normalize_domain`]). The local part is put in Unicode NFC after case mapping
/// (as RFC 7613 prepares user names), so `jörg` typed as `o` + U+0308 is the same mailbox, on the same
/// store, as `jörg` with a precomposed `ö`; the store still gets the name as the client wrote it.
pub fn mailbox_key(local: &str, domain: &str, case: LoginCase) -> String {
    let local = canonical_local(local, case);
    if domain.is_empty() {
        local.into_owned()
    } else {
        format!("{local}@{domain}")
    }
}

/// A local part as popgate keys it: case-mapped per `case`, then Unicode NFC.
pub fn canonical_local(local: &str, case: LoginCase) -> std::borrow::Cow<'_, str> {
    const NFC: icu_normalizer::ComposingNormalizerBorrowed<'static> =
        icu_normalizer::ComposingNormalizerBorrowed::new_nfc();
    match case {
        LoginCase::Sensitive => NFC.normalize(local),
        LoginCase::Insensitive | LoginCase::Lower => {
            let lower = local.to_lowercase();
            // Already in NFC (every ASCII name): keep the lowercased string, no second allocation.
            match NFC.normalize(&lower) {
                std::borrow::Cow::Borrowed(_) => std::borrow::Cow::Owned(lower),
                std::borrow::Cow::Owned(nfc) => std::borrow::Cow::Owned(nfc),
            }
        }
    }
}

/// Lowercases and IDNA-normalises (UTS #46, to ASCII) a domain; `None` when it is not a usable domain.
pub fn normalize_domain(domain: &str) -> Option<String> {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() || domain.len() > 253 {
        return None;
    }
    let ascii = idna::domain_to_ascii_strict(domain).ok()?;
    let labels_ok = ascii.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    labels_ok.then_some(ascii)
}

/// A domain or `*.domain` pattern that IDNA rejects (the name, as written, is in the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid domain name")]
pub struct BadDomain(pub String);

/// Lowercases and IDNA-normalises a domain or `*.domain` pattern.
pub fn normalize_domain_pattern(pattern: &str) -> Result<String, BadDomain> {
    let (wild, rest) = match pattern.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let norm = normalize_domain(rest).ok_or_else(|| BadDomain(pattern.to_owned()))?;
    Ok(if wild { format!("*.{norm}") } else { norm })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` as `(host without brackets, port)`; `default_port` when none
/// is given (a bare IPv6 address counts as a host without a port).
pub fn split_host_port(text: &str, default_port: u16) -> (&str, u16) {
    if let Some((host, port)) = text.rsplit_once(':')
        && (!host.contains(':') || host.ends_with(']'))
        && let Ok(port) = port.parse::<u16>()
    {
        return (host.trim_matches(['[', ']']), port);
    }
    (text.trim_matches(['[', ']']), default_port)
}

/// What an operator's filter looks at in a logged-in session.
#[derive(Debug, Clone, Copy)]
pub struct SessionFacts<'a> {
    /// The tenant's name.
    pub tenant: &'a str,
    /// The store's label.
    pub store: &'a str,
    /// The normalised mailbox.
    pub mailbox: &'a str,
    /// The client's address.
    pub client: std::net::IpAddr,
}

/// Which sessions an admin request means: every condition given must hold (none given: all sessions).
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// The tenant's name, exactly.
    pub tenant: Option<String>,
    /// The store's label, exactly.
    pub store: Option<String>,
    /// The mailbox.
    pub mailbox: Option<MailboxMatch>,
    /// The client's network.
    pub network: Option<ipnet::IpNet>,
}

/// How a filter matches mailboxes.
#[derive(Debug, Clone)]
pub enum MailboxMatch {
    /// A mailbox key (normalised as a login is), compared exactly, or ignoring ASCII case when `fold`.
    Exact {
        /// The key.
        key: String,
        /// Compare ignoring ASCII case (a name that does not normalise).
        fold: bool,
    },
    /// A pattern with `*` (any run) and `?` (one character), ignoring ASCII case, as `doveadm kick` takes.
    Pattern(String),
}

impl MailboxMatch {
    /// Whether `mailbox` (a session's key) matches.
    pub fn matches(&self, mailbox: &str) -> bool {
        match self {
            Self::Exact { key, fold: false } => mailbox == key,
            Self::Exact { key, fold: true } => mailbox.eq_ignore_ascii_case(key),
            Self::Pattern(p) => wildmatch::WildMatch::new_case_insensitive(p).matches(mailbox),
        }
    }

    /// A pattern when `text` has a wildcard, else the exact key `key_of(text)` gives (`None`: the name
    /// does not normalise, so it is compared as given, ignoring case).
    pub fn parse(text: &str, key_of: impl FnOnce(&str) -> Option<String>) -> Self {
        if text.contains(['*', '?']) {
            return Self::Pattern(text.to_string());
        }
        match key_of(text) {
            Some(key) => Self::Exact { key, fold: false },
            None => Self::Exact {
                key: text.to_string(),
                fold: true,
            },
        }
    }
}

impl SessionFilter {
    /// Whether the session matches every condition given.
    pub fn matches(&self, e: &SessionFacts<'_>) -> bool {
        self.tenant.as_ref().is_none_or(|t| t == e.tenant)
            && self.store.as_ref().is_none_or(|s| s == e.store)
            && self.mailbox.as_ref().is_none_or(|m| m.matches(e.mailbox))
            && self.network.is_none_or(|n| n.contains(&e.client))
    }

    /// True when no condition is given (the filter matches every session).
    pub fn is_empty(&self) -> bool {
        self.tenant.is_none()
            && self.store.is_none()
            && self.mailbox.is_none()
            && self.network.is_none()
    }
}

/// One served certificate, for the expiry gauge and `/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertificateInfo {
    /// The tenant it is served for, `_default` for the default certificate.
    pub tenant: String,
    /// The certificate file as configured (`self-signed` for the generated fallback).
    pub certificate: String,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

#[cfg(test)]
mod host_port_tests {
    use super::split_host_port;

    #[test]
    fn hosts_ports_and_ipv6_split() {
        assert_eq!(
            split_host_port("mail1.internal", 110),
            ("mail1.internal", 110)
        );
        assert_eq!(
            split_host_port("mail1.internal:995", 110),
            ("mail1.internal", 995)
        );
        assert_eq!(split_host_port("10.0.0.1:2110", 110), ("10.0.0.1", 2110));
        assert_eq!(
            split_host_port("[2001:db8::1]:995", 110),
            ("2001:db8::1", 995)
        );
        assert_eq!(split_host_port("2001:db8::1", 110), ("2001:db8::1", 110));
        assert_eq!(split_host_port("[2001:db8::1]", 110), ("2001:db8::1", 110));
        assert_eq!(
            split_host_port("host:notaport", 110),
            ("host:notaport", 110)
        );
    }
}
