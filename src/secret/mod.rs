//! A password or token that never reaches a log line: `Debug` prints `MASKED`, and there is no `Display`.
//! [`files`] reads them from the secrets and token files operators write.

pub mod files;

use std::fmt;

use subtle::ConstantTimeEq;

/// Secret bytes (password, token). Read them with [`Secret::expose`] only where they go on the wire.
/// `==` compares as [`Secret::matches`] does.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes, for writing to a store.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Whether a client presented this secret; the time taken reveals the length at most, never how
    /// many leading bytes were right.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// A secret read from the config (an API token): `Debug` prints `MASKED`.
/// `==` compares as [`Secret::matches`] does.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps text read from somewhere other than the config file itself (a token file).
    pub fn new(text: String) -> Self {
        Self(text)
    }

    /// The text, for comparing with what a client presented.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether a client presented this token, as [`Secret::matches`] compares.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for SecretString {}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_bytes() {
        let secret = Secret::new(b"secret".to_vec());
        assert!(secret.matches(b"secret"));
        assert!(!secret.matches(b"secreT"));
        assert!(!secret.matches(b"secret-longer"));
        assert!(!secret.matches(b"secre"));
        assert!(!secret.matches(b""));
        let token: SecretString = serde_json::from_str("\"tok\"").unwrap();
        assert!(token.matches(b"tok"));
        assert!(!token.matches(b"tok "));
        assert!(!token.matches(b""));
        assert_eq!(secret, Secret::new(b"secret".to_vec()));
        assert_ne!(secret, Secret::new(b"secreT".to_vec()));
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        assert_eq!(format!("{:?}", Secret::new(b"hunter2".to_vec())), "MASKED");
    }
}
