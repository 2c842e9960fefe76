//! Placement from LDAP: one subtree search per lookup, the filter built from the login's parts escaped as
//! RFC 4515 says, the store read from an attribute. Connections are bound once and kept (up to `pool`);
//! the URLs are tried in order when one cannot be reached, and a connection that failed is dropped.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use tokio::sync::Semaphore;

use super::{Lookup, Placed};
use crate::config::LdapPlacement;

/// One tenant's LDAP directory.
pub struct LdapSource {
    settings: LdapPlacement,
    password: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    idle: Mutex<Vec<Ldap>>,
    /// At most `pool` connections in use at once.
    permits: Semaphore,
}

impl std::fmt::Debug for LdapSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapSource")
            .field("urls", &self.settings.urls)
            .field("base", &self.settings.base)
            .finish_non_exhaustive()
    }
}

impl LdapSource {
    /// The source; connects lazily (a directory down at start fails lookups, not the start).
    pub fn new(
        settings: LdapPlacement,
        password: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Self {
        let pool = settings.pool.max(1);
        Self {
            settings,
            password,
            tls,
            timeout,
            idle: Mutex::default(),
            permits: Semaphore::new(pool),
        }
    }

    /// The search filter for `mailbox` (`local@domain`): every placeholder escaped.
    pub fn filter(template: &str, mailbox: &str) -> String {
        let (local, domain) = mailbox.rsplit_once('@').unwrap_or((mailbox, ""));
        template
            .replace("{mailbox}", &ldap3::ldap_escape(mailbox))
            .replace("{local}", &ldap3::ldap_escape(local))
            .replace("{domain}", &ldap3::ldap_escape(domain))
    }

    /// Looks `mailbox` up.
    pub async fn lookup(&self, mailbox: &str) -> Result<Lookup, String> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "the LDAP source is closed".to_string())?;
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        // A kept connection may have died with its server (restarted, failed over): then a fresh one.
        if let Some(mut ldap) = pooled
            && let Ok(answer) = self.search(&mut ldap, mailbox).await
        {
            self.keep(ldap);
            return Ok(answer);
        }
        let mut ldap = self.connect().await?;
        let answer = self.search(&mut ldap, mailbox).await;
        if answer.is_ok() {
            self.keep(ldap);
        }
        answer
    }

    fn keep(&self, ldap: Ldap) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ldap);
    }

    async fn search(&self, ldap: &mut Ldap, mailbox: &str) -> Result<Lookup, String> {
        let s = &self.settings;
        let filter = Self::filter(&s.filter, mailbox);
        let mut attrs = vec![s.attribute.as_str()];
        if let Some(a) = &s.login_attribute {
            attrs.push(a);
        }
        let (entries, _) = ldap
            .with_timeout(self.timeout)
            .search(&s.base, Scope::Subtree, &filter, attrs)
            .await
            .and_then(ldap3::SearchResult::success)
            .map_err(|e| format!("LDAP search: {e}"))?;
        // The first entry carrying the attribute decides.
        for entry in entries {
            let entry = SearchEntry::construct(entry);
            let value = |name: &str| {
                entry
                    .attrs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .and_then(|(_, v)| v.first())
                    .cloned()
            };
            if let Some(store) = value(&s.attribute) {
                let login = s.login_attribute.as_deref().and_then(value);
                return Ok(Lookup::Found(Placed { store, login }));
            }
        }
        Ok(Lookup::NotFound)
    }

    /// A bound connection to the first URL that answers.
    async fn connect(&self) -> Result<Ldap, String> {
        let s = &self.settings;
        let mut last = String::from("no LDAP URL");
        for url in &s.urls {
            let mut conn = LdapConnSettings::new()
                .set_conn_timeout(self.timeout)
                .set_starttls(s.starttls);
            if let Some(tls) = &self.tls {
                conn = conn.set_config(tls.clone());
            }
            let (driver, mut ldap) = match LdapConnAsync::with_settings(conn, url).await {
                Ok(c) => c,
                Err(e) => {
                    last = format!("{url}: {e}");
                    continue;
                }
            };
            tokio::spawn(async move {
                // Ends when the connection closes; its error shows at the next operation.
                let _ = driver.drive().await;
            });
            if let (Some(dn), Some(pw)) = (&s.bind_dn, &self.password) {
                let bound = ldap
                    .with_timeout(self.timeout)
                    .simple_bind(dn, pw)
                    .await
                    .and_then(ldap3::LdapResult::success);
                if let Err(e) = bound {
                    // Never the password; the DN is configuration.
                    last = format!("{url}: bind as {dn}: {e}");
                    continue;
                }
            }
            return Ok(ldap);
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_escape_every_placeholder() {
        assert_eq!(
            LdapSource::filter("(mail={mailbox})", "john@example.com"),
            "(mail=john@example.com)"
        );
        assert_eq!(
            LdapSource::filter("(&(uid={local})(dc={domain}))", "*)(uid=\\@x\0"),
            "(&(uid=\\2a\\29\\28uid=\\5c)(dc=x\\00))"
        );
    }
}
