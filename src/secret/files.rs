//! The secrets and token files: read at config load (to report a broken file before it is used) and when a
//! snapshot is built. A leaf: `config` may use it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::vocab::LoginCase;

use super::{Secret, SecretString};

/// Why a secrets or token file cannot be used. The message names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a YAML map of strings: where, by line and column (the file's text is never quoted).
    #[error("{}: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{} holds no token on its first line", path.display())]
    NoToken { path: PathBuf },
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The admin token in a token file: its first line without surrounding whitespace; an empty one is refused
/// (it would let anybody through who sends an empty bearer token).
pub fn read_token_file(path: &Path) -> Result<SecretString, FileError> {
    let text = read(path)?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(FileError::NoToken {
            path: path.to_path_buf(),
        });
    }
    Ok(SecretString::new(token.to_owned()))
}

/// Reads a secrets file: a YAML map of `mailbox: secret`; keys are normalised as mailboxes are keyed at
/// login (`local@domain`, the domain in its ASCII form, case as `case` says), so `jörg@Bücher.example`
/// matches a login of either form.
pub fn load_secrets(path: &Path, case: LoginCase) -> Result<HashMap<String, Secret>, FileError> {
    let text = read(path)?;
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        // A snippet of the file would be a secret in a log line.
        with_snippet: false,
    };
    let map: BTreeMap<String, String> = serde_saphyr::from_str_with_options(&text, options)
        .map_err(|e| FileError::Yaml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let key = |mailbox: &str| -> String {
        match mailbox.rsplit_once('@') {
            Some((local, domain)) => {
                let domain =
                    crate::vocab::normalize_domain(domain).unwrap_or_else(|| domain.to_lowercase());
                crate::vocab::mailbox_key(local, &domain, case)
            }
            None => crate::vocab::mailbox_key(mailbox, "", case),
        }
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| (key(&k), Secret::new(v.into_bytes())))
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_broken_secrets_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "a@example.com: hunter2\nb@example.com: [hunter3\n",
            "a@example.com: hunter2\na@example.com: hunter3\n",
            "- hunter2\n- hunter3\n",
            "a@example.com: {hunter3: x}\n",
        ] {
            let path = dir.path().join("secrets.yaml");
            std::fs::write(&path, text).unwrap();
            let err = load_secrets(&path, LoginCase::Insensitive)
                .unwrap_err()
                .to_string();
            assert!(err.contains("secrets.yaml"), "{err}");
            assert!(!err.contains("hunter"), "a secret in the error: {err}");
        }
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, "Jörg@Bücher.Example: pw\n").unwrap();
        let map = load_secrets(&good, LoginCase::Insensitive).unwrap();
        assert!(
            map.contains_key("jörg@xn--bcher-kva.example"),
            "{:?}",
            map.keys()
        );
    }

    #[test]
    fn a_token_file_needs_a_token_on_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  \nsecond\n").unwrap();
        assert!(matches!(
            read_token_file(&path),
            Err(FileError::NoToken { .. })
        ));
        std::fs::write(&path, " s3cret \n").unwrap();
        assert_eq!(read_token_file(&path).unwrap().expose(), "s3cret");
        assert!(matches!(
            read_token_file(&dir.path().join("missing")),
            Err(FileError::Read { .. })
        ));
    }
}
