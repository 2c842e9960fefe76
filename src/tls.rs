//! TLS for the client leg: certificates from PEM files, a self-signed fallback, and SNI selection
//! (exact name, then the longest wildcard, then the default).
//!
//! rustls' own `ResolvesServerCertUsingSni` matches exact names only, hence the small resolver here.
//! Only TLS 1.2 and 1.3 are enabled, with the provider `certs::provider` names (aws-lc-rs by default).

use std::collections::HashMap;

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::Config;
use crate::vocab::CertificateInfo;
use crate::vocab::TenantId;

pub use crate::certs::{
    TlsError, load_certified_key, load_roots, provider, self_signed, unverified_chain,
};

/// The `tenant` label of the default certificate.
pub const DEFAULT_CERTIFICATE: &str = "_default";

/// A served certificate's facts: `None` when its leaf does not parse as X.509 (rustls accepted it, so
/// that would be a parser gap; the certificate is still served, only not in the expiry metric).
fn info(tenant: &str, path: &Path, ck: &CertifiedKey) -> Option<CertificateInfo> {
    let leaf = ck.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(CertificateInfo {
        tenant: tenant.to_string(),
        certificate: path.display().to_string(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Picks a certificate by SNI and remembers which tenant each name belongs to.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, (Arc<CertifiedKey>, TenantId)>,
    /// `(".example.com", ...)`, longest suffix first.
    wildcard: Vec<(String, Arc<CertifiedKey>, TenantId)>,
    default: Arc<CertifiedKey>,
    /// Every certificate served, with its expiry (for the metric and `/status`).
    certificates: Vec<CertificateInfo>,
}

impl SniResolver {
    /// Builds the resolver from a validated config. Uses the default certificate, or a self-signed one
    /// (with a warning) when none is configured. `tenant_id` gives each tenant's id by its name (the tenant
    /// table's), so the ids an SNI name selects are the table's own.
    pub fn from_config(
        config: &Config,
        tenant_id: impl Fn(&str) -> Option<TenantId>,
    ) -> Result<Self, TlsError> {
        let mut certificates = Vec::new();
        let default = match &config.tls {
            Some(files) => {
                let ck = load_certified_key(
                    &config.resolve_path(&files.certificate),
                    &config.resolve_path(&files.key),
                )?;
                certificates.extend(info(DEFAULT_CERTIFICATE, &files.certificate, &ck));
                ck
            }
            None => {
                tracing::warn!(
                    "no tls.certificate configured: serving a self-signed certificate for `localhost`; clients will not trust it"
                );
                let ck = self_signed(vec!["localhost".into()])?;
                certificates.extend(info(DEFAULT_CERTIFICATE, Path::new("self-signed"), &ck));
                ck
            }
        };
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        for (name, tenant) in &config.tenants {
            let (Some(tls), Some(id)) = (&tenant.value.tls, tenant_id(name)) else {
                continue;
            };
            let ck = load_certified_key(
                &config.resolve_path(&tls.certificate),
                &config.resolve_path(&tls.key),
            )?;
            certificates.extend(info(name, &tls.certificate, &ck));
            let names: Vec<String> = if tls.server_names.is_empty() {
                tenant
                    .value
                    .domains
                    .iter()
                    .flat_map(|d| {
                        let d = d.value.trim_start_matches("*.");
                        [d.to_string(), format!("*.{d}")]
                    })
                    .collect()
            } else {
                tls.server_names.clone()
            };
            for name in names {
                let Ok(norm) = crate::config::normalize_domain_pattern(&name) else {
                    continue;
                };
                match norm.strip_prefix('*') {
                    Some(suffix) => wildcard.push((suffix.to_string(), ck.clone(), id)),
                    None => {
                        exact.insert(norm, (ck.clone(), id));
                    }
                }
            }
        }
        wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        Ok(Self {
            exact,
            wildcard,
            default,
            certificates,
        })
    }

    /// Every certificate served, with its expiry.
    pub fn certificates(&self) -> &[CertificateInfo] {
        &self.certificates
    }

    fn lookup(&self, sni: &str) -> Option<(&Arc<CertifiedKey>, TenantId)> {
        let name = sni.to_ascii_lowercase();
        if let Some((ck, id)) = self.exact.get(&name) {
            return Some((ck, *id));
        }
        self.wildcard
            .iter()
            .find(|(suffix, _, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|(_, ck, id)| (ck, *id))
    }

    /// The tenant whose certificate the SNI name selected, if any.
    pub fn tenant_for(&self, sni: &str) -> Option<TenantId> {
        self.lookup(sni).map(|(_, id)| id)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello
            .server_name()
            .and_then(|n| self.lookup(n))
            .map(|(ck, _)| ck);
        Some(chosen.unwrap_or(&self.default).clone())
    }
}

/// A server config for client connections: TLS 1.2 and 1.3, certificate chosen by `resolver`; sessions
/// resumed from a bounded cache and, unless turned off, from tickets (keyed by `ticket_secret` when given,
/// so every replica with the same secret resumes the others' sessions).
pub fn server_config(
    resolver: Arc<SniResolver>,
    sessions: &crate::config::TlsSessions,
    ticket_secret: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.session_storage = if sessions.cache_size == 0 {
        Arc::new(rustls::server::NoServerSessionStorage {})
    } else {
        rustls::server::ServerSessionMemoryCache::new(sessions.cache_size)
    };
    if sessions.tickets {
        config.ticketer = match ticket_secret {
            Some(secret) => Arc::new(SharedTicketer::new(secret, sessions.rotate_every.get())),
            None => crate::certs::process_ticketer()?,
        };
    }
    Ok(Arc::new(config))
}

/// Session tickets sealed (ChaCha20-Poly1305) with a key derived from a shared secret and the current
/// period: replicas given the same secret make and accept each other's tickets without talking, and the
/// key changes every period by itself. A ticket names its period and is accepted in that one and the next.
pub struct SharedTicketer {
    secret: ring::hmac::Key,
    period: u64,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("period_s", &self.period)
            .finish_non_exhaustive()
    }
}

/// Period number, nonce and tag around a ticket's sealed state.
const TICKET_OVERHEAD: usize = 8 + 12 + 16;

impl SharedTicketer {
    /// Tickets keyed by `secret`, the key changing every `period` (at least a second).
    pub fn new(secret: &[u8], period: std::time::Duration) -> Self {
        Self {
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            period: period.as_secs().max(1),
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// The sealing key of period `index`.
    fn key(&self, index: u64) -> Option<ring::aead::LessSafeKey> {
        let mut context = Vec::with_capacity(32);
        context.extend_from_slice(b"popgate session ticket key v1");
        context.extend_from_slice(&index.to_be_bytes());
        let tag = ring::hmac::sign(&self.secret, &context);
        let key =
            ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, tag.as_ref().get(..32)?)
                .ok()?;
        Some(ring::aead::LessSafeKey::new(key))
    }

    /// A ticket for `plain` made at `now` (Unix seconds).
    pub fn encrypt_at(&self, now: u64, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::rand::SecureRandom as _;
        let index = now / self.period;
        let key = self.key(index)?;
        let mut nonce = [0u8; 12];
        self.rng.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(index.to_be_bytes()),
            &mut sealed,
        )
        .ok()?;
        let mut out = Vec::with_capacity(TICKET_OVERHEAD + plain.len());
        out.extend_from_slice(&index.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// The state in `ticket`, if it was made with this secret in the period of `now` or the one before.
    pub fn decrypt_at(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < TICKET_OVERHEAD {
            return None;
        }
        let (index, rest) = ticket.split_at(8);
        let index = u64::from_be_bytes(index.try_into().ok()?);
        let current = now / self.period;
        if index != current && index.checked_add(1) != Some(current) {
            return None;
        }
        let (nonce, sealed) = rest.split_at(12);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key(index)?
            .open_in_place(
                nonce,
                ring::aead::Aad::from(index.to_be_bytes()),
                &mut sealed,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // What clients are told: one period (a ticket may still work in the next).
        u32::try_from(self.period).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(unix_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(unix_now(), cipher)
    }
}

// === store leg ===

/// A client config for one tenant's stores: verified against its CA bundle (or, only when the operator
/// asked for it, not verified at all), with an optional client certificate. TLS 1.2 and 1.3.
pub fn store_client_config(
    tls: &crate::config::StoreTls,
    config: &Config,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match (&tls.ca, tls.insecure_skip_verify) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(unverified_chain()),
        (Some(ca), false) => builder.with_root_certificates(load_roots(&config.resolve_path(ca))?),
        (None, false) => builder.with_root_certificates(rustls::RootCertStore::empty()),
    };
    let client = match (&tls.certificate, &tls.key) {
        (Some(c), Some(k)) => {
            let (chain, key) =
                crate::certs::load_chain_and_key(&config.resolve_path(c), &config.resolve_path(k))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(client))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HOUR: u64 = 3600;

    #[test]
    fn tickets_open_in_their_period_and_the_next_with_the_same_secret_only() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let a = SharedTicketer::new(secret, std::time::Duration::from_secs(HOUR));
        let b = SharedTicketer::new(secret, std::time::Duration::from_secs(HOUR));
        let other = SharedTicketer::new(
            b"another secret of at least 32 bytes",
            std::time::Duration::from_secs(HOUR),
        );
        let t0 = 1_800_000_000 - 1_800_000_000 % HOUR + 10;
        let ticket = a.encrypt_at(t0, b"session state").unwrap();
        assert_ne!(&ticket[20..], b"session state", "sealed");
        // Another replica with the same secret, later in the period and in the next one.
        assert_eq!(b.decrypt_at(t0 + 100, &ticket).unwrap(), b"session state");
        assert_eq!(b.decrypt_at(t0 + HOUR, &ticket).unwrap(), b"session state");
        // Two periods on, the key has moved on; another secret never opens it; a flipped byte is refused.
        assert_eq!(b.decrypt_at(t0 + 2 * HOUR, &ticket), None);
        assert_eq!(other.decrypt_at(t0, &ticket), None);
        let mut bent = ticket.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert_eq!(b.decrypt_at(t0, &bent), None);
        // A ticket claiming a future period is refused too.
        let later = a.encrypt_at(t0 + HOUR, b"x").unwrap();
        assert_eq!(b.decrypt_at(t0, &later), None);
        // Each ticket gets its own nonce.
        assert_ne!(a.encrypt_at(t0, b"x"), a.encrypt_at(t0, b"x"));
    }
}
