//! TLS for the client leg: certificates from PEM files, a self-signed fallback, and SNI selection
//! (exact name, then the longest wildcard, then the default).
//!
//! rustls' own `ResolvesServerCertUsingSni` matches exact names only, hence the small resolver here.
//! Only TLS 1.2 and 1.3 are enabled, with the ring provider.

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

/// A server config for client connections: TLS 1.2 and 1.3, certificate chosen by `resolver`.
pub fn server_config(resolver: Arc<SniResolver>) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
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
