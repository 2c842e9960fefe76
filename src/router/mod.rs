//! The tenant table: login name → mailbox → tenant, and the name a store expects.
//!
//! Pure lookups built once per config snapshot; no I/O. The table knows tenants by index so the proxy can
//! keep per-tenant runtime state (backend groups, counters) in a parallel vector.

use std::collections::HashMap;

use crate::config::{Config, LoginCase, TemplatePart, UsernameForm};
pub use crate::vocab::{TenantId, canonical_local, mailbox_key, normalize_domain};

/// A login name split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    /// The part before the separator, as the client wrote it.
    pub local: String,
    /// The domain, lowercased and IDNA-normalised; empty when the name had none.
    pub domain: String,
    /// The login name exactly as sent.
    pub login: String,
}

/// The routing facts of one tenant.
#[derive(Debug, Clone)]
pub struct TenantRoute {
    /// The configured name (metrics label).
    pub name: String,
    /// How to build the store login name.
    pub username: UsernameForm,
    /// How the local part's case is treated.
    pub case: LoginCase,
}

/// Where a login goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The tenant.
    pub tenant: TenantId,
    /// The parsed login name.
    pub mailbox: Mailbox,
    /// The name to log in to the store with.
    pub store_user: String,
    /// The mailbox as popgate keys it (consistent hash, throttles, session caps, secrets): `local@domain`
    /// with the tenant's case rule applied, or the local part alone for a name without a domain.
    pub key: String,
}

/// Why a login name has no route. Both answer the client with the same `-ERR [AUTH]`, so that names
/// and domains cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No tenant owns the domain and there is no default tenant.
    #[error("unknown domain")]
    UnknownDomain,
    /// The domain belongs to another tenant than the one this listener or SNI name is bound to.
    #[error("domain belongs to another tenant than this connection's")]
    WrongTenant,
    /// The name is empty or unusable.
    #[error("malformed login name")]
    Malformed,
    /// The local part carries the separator it was split at, or another separator followed by a hosted
    /// domain (`user@example.net@example.info`): a store that splits names itself could be led to another
    /// domain's mailbox under this tenant's policy.
    #[error("local part names another domain")]
    LocalPartNamesDomain,
}

/// Domain → tenant lookups for one config snapshot.
#[derive(Debug, Clone)]
pub struct TenantTable {
    separators: Vec<char>,
    exact: HashMap<String, TenantId>,
    /// `*.example.com` as `example.com`: any domain ending in `.example.com`.
    wildcard: HashMap<String, TenantId>,
    default: Option<TenantId>,
    tenants: Vec<TenantRoute>,
    by_name: HashMap<String, TenantId>,
}

impl TenantTable {
    /// Builds the table from a validated config. Tenant ids follow the config's (sorted) tenant order.
    pub fn new(config: &Config) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut tenants = Vec::new();
        let mut default = None;
        for (index, (name, tenant)) in config.tenants.iter().enumerate() {
            let id = TenantId::from_index(index);
            for d in &tenant.value.domains {
                let Ok(norm) = crate::vocab::normalize_domain_pattern(&d.value) else {
                    continue;
                };
                match norm.strip_prefix("*.") {
                    Some(parent) => {
                        wildcard.insert(parent.to_string(), id);
                    }
                    None => {
                        exact.insert(norm, id);
                    }
                }
            }
            if config.routing.default_tenant.as_deref() == Some(name) {
                default = Some(id);
            }
            tenants.push(TenantRoute {
                name: name.clone(),
                username: tenant.value.backend_username.clone(),
                case: tenant.value.login_case,
            });
        }
        Self {
            separators: config.routing.separators.clone(),
            exact,
            wildcard,
            default,
            by_name: tenants
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), TenantId::from_index(i)))
                .collect(),
            tenants,
        }
    }

    /// Every tenant's id, in the table's order.
    pub fn ids(&self) -> impl Iterator<Item = TenantId> + '_ {
        (0..self.tenants.len()).map(TenantId::from_index)
    }

    /// A tenant's routing facts.
    pub fn tenant(&self, id: TenantId) -> &TenantRoute {
        &self.tenants[id.index()]
    }

    /// The tenants, in the order of their ids.
    pub fn tenants(&self) -> &[TenantRoute] {
        &self.tenants
    }

    /// The tenant with this configured name.
    pub fn tenant_by_name(&self, name: &str) -> Option<TenantId> {
        self.by_name.get(name).copied()
    }

    /// Splits a login name on the configured separators: the first separator (in configured order) that
    /// occurs splits at its last occurrence, so `john+tag@example.com` and `john+tag+example.com` both
    /// give `john+tag` at `example.com`.
    ///
    /// The local part never contains the separator it was split at, nor another separator followed by a
    /// domain some tenant hosts ([`RouteError::LocalPartNamesDomain`]).
    pub fn split(&self, login: &str) -> Result<Mailbox, RouteError> {
        if login.is_empty() || login.chars().any(char::is_control) {
            return Err(RouteError::Malformed);
        }
        for sep in &self.separators {
            if let Some((local, domain)) = login.rsplit_once(*sep) {
                if local.is_empty() {
                    return Err(RouteError::Malformed);
                }
                let domain = normalize_domain(domain).ok_or(RouteError::Malformed)?;
                if local.contains(*sep) || self.names_hosted_domain(local, *sep) {
                    return Err(RouteError::LocalPartNamesDomain);
                }
                return Ok(Mailbox {
                    local: local.to_string(),
                    domain,
                    login: login.to_string(),
                });
            }
        }
        Ok(Mailbox {
            local: login.to_string(),
            domain: String::new(),
            login: login.to_string(),
        })
    }

    /// Whether some other separator in `local` is followed by a domain a tenant hosts (exact or wildcard;
    /// the default tenant does not count, or every `+tag` would).
    fn names_hosted_domain(&self, local: &str, split_at: char) -> bool {
        self.separators
            .iter()
            .filter(|s| **s != split_at)
            .flat_map(|s| local.match_indices(*s))
            .filter_map(|(i, s)| normalize_domain(&local[i + s.len()..]))
            .any(|d| self.hosted(&d).is_some())
    }

    /// The tenant owning a normalised domain: exact, then the longest wildcard, then the default.
    pub fn tenant_for_domain(&self, domain: &str) -> Option<TenantId> {
        self.hosted(domain).or(self.default)
    }

    /// The tenant owning a normalised domain by an exact or wildcard entry (no default).
    fn hosted(&self, domain: &str) -> Option<TenantId> {
        if let Some(id) = self.exact.get(domain) {
            return Some(*id);
        }
        // The longest wildcard first: for `a.b.example.com` try `b.example.com`, then `example.com`, then
        // `com` — one hash lookup per label, whatever the number of tenants.
        let mut rest = domain;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(id) = self.wildcard.get(parent) {
                return Some(*id);
            }
            rest = parent;
        }
        None
    }

    /// Routes a login name. `bound` is the tenant fixed by the listener or by SNI, if any.
    pub fn route(&self, login: &str, bound: Option<TenantId>) -> Result<Route, RouteError> {
        let mailbox = self.split(login)?;
        let found = if mailbox.domain.is_empty() {
            bound.or(self.default)
        } else {
            self.tenant_for_domain(&mailbox.domain)
        };
        let tenant = match (found, bound) {
            (None, _) => return Err(RouteError::UnknownDomain),
            (Some(t), Some(b)) if t != b => return Err(RouteError::WrongTenant),
            (Some(t), _) => t,
        };
        let rules = self.tenant(tenant);
        let mut mailbox = mailbox;
        if rules.case == LoginCase::Lower {
            mailbox.local = mailbox.local.to_lowercase();
        }
        let key = mailbox_key(&mailbox.local, &mailbox.domain, rules.case);
        let store_user = store_username(&rules.username, &mailbox);
        Ok(Route {
            tenant,
            mailbox,
            store_user,
            key,
        })
    }

    /// The store login name built from the normalised mailbox (the tenant's case rule and NFC applied, as
    /// in [`Route::key`]) rather than from the name as typed: what popgate logs in as when it checked the
    /// client's secret itself (a master user, APOP/CRAM-MD5 against `secrets`), so the store opens exactly
    /// the mailbox whose secret was checked, even on a store that tells case or Unicode forms apart.
    pub fn checked_user(&self, route: &Route) -> String {
        let rules = self.tenant(route.tenant);
        let local = canonical_local(&route.mailbox.local, rules.case);
        let mailbox = Mailbox {
            local: local.into_owned(),
            domain: route.mailbox.domain.clone(),
            login: route.key.clone(),
        };
        store_username(&rules.username, &mailbox)
    }
}

/// The store login name for a mailbox. A template is filled part by part: what the client typed is
/// copied in, never searched for placeholders.
pub fn store_username(form: &UsernameForm, m: &Mailbox) -> String {
    match form {
        UsernameForm::Full if m.domain.is_empty() => m.local.clone(),
        UsernameForm::Full => format!("{}@{}", m.local, m.domain),
        UsernameForm::Local => m.local.clone(),
        UsernameForm::Template(t) => {
            let mut out = String::new();
            for part in t.parts() {
                out.push_str(match part {
                    TemplatePart::Text(text) => text,
                    TemplatePart::Local => &m.local,
                    TemplatePart::Domain => &m.domain,
                    TemplatePart::Login => &m.login,
                });
            }
            out
        }
    }
}

#[cfg(test)]
mod tests;
