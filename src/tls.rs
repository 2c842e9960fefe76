//! TLS for the client leg: certificates from PEM files, a self-signed fallback, and SNI selection
//! (exact name, then the longest wildcard, then the default).
//!
//! rustls' own `ResolvesServerCertUsingSni` matches exact names only, hence the small resolver here.
//! Only TLS 1.2 and 1.3 are enabled, with the ring provider.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;
use crate::router::TenantId;

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is missing, unreadable or holds no certificate.
    #[error("cannot load certificate {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file is missing, unreadable, holds no key, or the key does not fit the provider.
    #[error("cannot load private key {path}: {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// rcgen failed to make the fallback certificate.
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

/// The crypto provider used everywhere (one provider only, so aws-lc-rs is not built).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a certificate chain and its private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let (chain, key_der) = load_chain_and_key(cert, key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    // A certificate that does not parse, or whose public key is not the key's, is the certificate's fault
    // as far as the operator can tell: name the certificate file (and the key it was checked against).
    ck.keys_match().map_err(|e| TlsError::Certificate {
        path: cert.to_path_buf(),
        reason: format!("{e} (checked against the key in {})", key.display()),
    })?;
    Ok(Arc::new(ck))
}

fn load_chain_and_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_err = |reason: String| TlsError::Certificate {
        path: cert.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((chain, key_der))
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let signing = provider().key_provider.load_private_key(key)?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()?;
    Ok(Arc::new(ck))
}

/// A self-signed certificate for the given names, for when no certificate is configured.
pub fn self_signed(names: Vec<String>) -> Result<Arc<CertifiedKey>, TlsError> {
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(signing_key.serialize_der().into());
    Ok(certified_key(vec![cert.der().clone()], key)?)
}

/// Picks a certificate by SNI and remembers which tenant each name belongs to.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, (Arc<CertifiedKey>, TenantId)>,
    /// `(".example.com", ...)`, longest suffix first.
    wildcard: Vec<(String, Arc<CertifiedKey>, TenantId)>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Builds the resolver from a validated config. Uses the default certificate, or a self-signed one
    /// (with a warning) when none is configured.
    pub fn from_config(config: &Config) -> Result<Self, TlsError> {
        let default = match &config.tls {
            Some(files) => load_certified_key(
                &config.resolve_path(&files.certificate),
                &config.resolve_path(&files.key),
            )?,
            None => {
                tracing::warn!(
                    "no tls.certificate configured: serving a self-signed certificate for `localhost`; clients will not trust it"
                );
                self_signed(vec!["localhost".into()])?
            }
        };
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        for (id, (_, tenant)) in config.tenants.iter().enumerate() {
            let Some(tls) = &tenant.value.tls else {
                continue;
            };
            let ck = load_certified_key(
                &config.resolve_path(&tls.certificate),
                &config.resolve_path(&tls.key),
            )?;
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
        })
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

/// Loads a PEM bundle of trust anchors.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let err = |reason: String| TlsError::Certificate {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
        roots
            .add(cert.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(roots)
}

/// A client config for one tenant's stores: verified against its CA bundle (or, only when the operator
/// asked for it, not verified at all), with an optional client certificate. TLS 1.2 and 1.3.
pub fn store_client_config(
    tls: &crate::config::BackendTls,
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
                load_chain_and_key(&config.resolve_path(c), &config.resolve_path(k))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(client))
}

/// A verifier that does not check the server's chain (stores' `insecure_skip_verify`, the load tool's
/// `--insecure`); handshake signatures are still checked, so the session itself stays sound.
pub fn unverified_chain() -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    Arc::new(UnverifiedChain(provider()))
}

#[derive(Debug)]
struct UnverifiedChain(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for UnverifiedChain {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
