//! Certificate files and the crypto provider: PEM chains and keys, trust anchors, the self-signed
//! fallback, and the verifier that skips chain checks where an operator asked for it. A leaf: no config,
//! no stage, so the config's validation can load certificates without depending on the TLS stage.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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

/// The crypto provider of every TLS configuration popgate builds: aws-lc-rs (the default feature), or ring
/// in a build without default features. Made once, and installed as the process default too, so that a
/// library that builds its own configuration (ldap3 for an `ldaps://` URL without `ca`) uses the same one.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let chosen = chosen::default_provider();
            // Refused only when something installed a default first; popgate's own configurations still
            // name this provider.
            let _ = chosen.clone().install_default();
            Arc::new(chosen)
        })
        .clone()
}

/// Which provider [`provider`] is, for `popgate_build_info`.
pub const PROVIDER_NAME: &str = chosen::NAME;

/// The provider's own rotating ticketer (a fresh random key per process, rotated by rustls).
pub fn process_ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    chosen::Ticketer::new()
}

/// The one place the Cargo feature chooses the provider.
#[cfg(feature = "aws-lc-rs")]
mod chosen {
    pub use rustls::crypto::aws_lc_rs::{Ticketer, default_provider};
    pub const NAME: &str = "aws-lc-rs";
}

#[cfg(not(feature = "aws-lc-rs"))]
mod chosen {
    pub use rustls::crypto::ring::{Ticketer, default_provider};
    pub const NAME: &str = "ring";
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

pub(crate) fn load_chain_and_key(
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

/// Why a ticket secret file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TicketSecretError {
    path: PathBuf,
    reason: String,
}

/// The first line of a ticket secret file: at least 32 characters (its bytes key the tickets; never logged).
pub fn read_ticket_secret(path: &Path) -> Result<Vec<u8>, TicketSecretError> {
    let fail = |reason: String| TicketSecretError {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let line = text.lines().next().unwrap_or_default().trim();
    if line.len() < 32 {
        return Err(fail(
            "the first line must hold at least 32 characters (e.g. `openssl rand -base64 48`)"
                .into(),
        ));
    }
    Ok(line.as_bytes().to_vec())
}

/// The system's trust anchors (a bundle may hold certificates rustls cannot use: the others count).
pub fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

/// A client config (TLS 1.2 and 1.3, ring) that trusts `roots`, without a client certificate.
pub fn client_config_with_roots(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

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
