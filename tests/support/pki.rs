//! A test certificate authority: a CA and leaf certificates it signs, as PEM, made with rcgen.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA that signs leaf certificates for tests.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for these names (IP addresses become IP SANs).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A self-signed certificate for `names`, written as `dir/stem.crt` and `dir/stem.key` (PEM); its DER.
pub fn write_self_signed(dir: &std::path::Path, stem: &str, names: &[&str]) -> Vec<u8> {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{stem}.key")),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    ck.cert.der().to_vec()
}
