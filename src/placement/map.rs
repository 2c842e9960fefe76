//! A placement map file: `mailbox store [login]` per line (`#` comments, blank lines skipped), held as
//! one sorted index over one byte arena, so a million mailboxes cost their names plus 24 bytes each.
//! Read line by line, never whole; a bad file is refused as a whole (the running map stays).

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::vocab::LoginCase;

/// One mailbox: where its key and login sit in the arena, and its store.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// xxh3 of the key, the sort order (ties broken by the key itself).
    hash: u64,
    key_at: u32,
    login_at: u32,
    key_len: u16,
    login_len: u16,
    store: u32,
}

/// A loaded map.
#[derive(Debug, Default)]
pub struct MapIndex {
    arena: Vec<u8>,
    entries: Vec<Entry>,
    stores: Vec<Box<str>>,
}

/// Why a map file was refused.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// It cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A line is not `mailbox store [login]`.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// What is wrong (never the line itself: it may name a person).
        message: String,
    },
    /// A mailbox has two lines (which one is not said: the name would reach a log).
    #[error("{path}: a mailbox appears on two lines (each may have one store)")]
    Duplicate {
        /// The file.
        path: PathBuf,
    },
}

impl MapIndex {
    /// Reads `path`, keying mailboxes as logins are keyed (`case`, the domain in its ASCII form).
    ///
    /// # Errors
    /// The file cannot be read, a line is malformed, a mailbox appears twice, or it is too big for the
    /// index's 32-bit offsets.
    pub fn load(path: &Path, case: LoginCase) -> Result<Self, MapError> {
        let file = std::fs::File::open(path).map_err(|source| MapError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::read(std::io::BufReader::new(file), path, case)
    }

    fn read(reader: impl BufRead, path: &Path, case: LoginCase) -> Result<Self, MapError> {
        let bad = |line: usize, message: &str| MapError::Line {
            path: path.to_path_buf(),
            line,
            message: message.to_string(),
        };
        let mut index = Self::default();
        let mut stores: HashMap<String, u32> = HashMap::new();
        // Domains repeat on every line: normalise each once.
        let mut domains: HashMap<String, String> = HashMap::new();
        for (n, line) in reader.lines().enumerate() {
            let number = n + 1;
            let line = line.map_err(|source| MapError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let text = line.split('#').next().unwrap_or("").trim();
            if text.is_empty() {
                continue;
            }
            let mut fields = text.split_whitespace();
            let (Some(mailbox), Some(store)) = (fields.next(), fields.next()) else {
                return Err(bad(number, "expected `mailbox store [login]`"));
            };
            let login = fields.next();
            if fields.next().is_some() {
                return Err(bad(number, "more than three fields"));
            }
            let key = match mailbox.rsplit_once('@') {
                Some((local, domain)) => {
                    let domain = match domains.get(domain) {
                        Some(d) => d.clone(),
                        None => {
                            let d = crate::vocab::normalize_domain(domain).ok_or_else(|| {
                                bad(number, "the mailbox's domain is not a domain")
                            })?;
                            domains.insert(domain.to_string(), d.clone());
                            d
                        }
                    };
                    crate::vocab::mailbox_key(local, &domain, case)
                }
                None => crate::vocab::mailbox_key(mailbox, "", case),
            };
            let next = u32::try_from(stores.len()).map_err(|_| bad(number, "too many stores"))?;
            let store = *stores.entry(store.to_string()).or_insert(next);
            let (key_at, key_len) = index
                .put(key.as_bytes())
                .ok_or_else(|| bad(number, "too big"))?;
            let (login_at, login_len) = match login {
                Some(l) => index
                    .put(l.as_bytes())
                    .ok_or_else(|| bad(number, "too big"))?,
                None => (0, 0),
            };
            index.entries.push(Entry {
                hash: xxhash_rust::xxh3::xxh3_64(key.as_bytes()),
                key_at,
                login_at,
                key_len,
                login_len,
                store,
            });
        }
        let mut names: Vec<(String, u32)> = stores.into_iter().collect();
        names.sort_by_key(|(_, i)| *i);
        index.stores = names.into_iter().map(|(s, _)| s.into_boxed_str()).collect();
        let arena = std::mem::take(&mut index.arena);
        let key_of =
            |e: &Entry| &arena[e.key_at as usize..e.key_at as usize + usize::from(e.key_len)];
        index
            .entries
            .sort_unstable_by(|a, b| a.hash.cmp(&b.hash).then_with(|| key_of(a).cmp(key_of(b))));
        if index
            .entries
            .windows(2)
            .any(|w| w[0].hash == w[1].hash && key_of(&w[0]) == key_of(&w[1]))
        {
            return Err(MapError::Duplicate {
                path: path.to_path_buf(),
            });
        }
        index.arena = arena;
        index.arena.shrink_to_fit();
        index.entries.shrink_to_fit();
        Ok(index)
    }

    /// Appends bytes to the arena: their offset and length.
    fn put(&mut self, bytes: &[u8]) -> Option<(u32, u16)> {
        let at = u32::try_from(self.arena.len()).ok()?;
        let len = u16::try_from(bytes.len()).ok()?;
        u32::try_from(self.arena.len() + bytes.len()).ok()?;
        self.arena.extend_from_slice(bytes);
        Some((at, len))
    }

    fn text(&self, at: u32, len: u16) -> &str {
        let start = at as usize;
        std::str::from_utf8(&self.arena[start..start + usize::from(len)]).unwrap_or("")
    }

    /// The store (as written in the file) and login for a mailbox key.
    pub fn get(&self, key: &str) -> Option<(&str, Option<&str>)> {
        let hash = xxhash_rust::xxh3::xxh3_64(key.as_bytes());
        let first = self.entries.partition_point(|e| e.hash < hash);
        self.entries[first..]
            .iter()
            .take_while(|e| e.hash == hash)
            .find(|e| self.text(e.key_at, e.key_len) == key)
            .map(|e| {
                let store = self.stores.get(e.store as usize).map_or("", |s| &**s);
                let login = (e.login_len > 0).then(|| self.text(e.login_at, e.login_len));
                (store, login)
            })
    }

    /// Mailboxes in the map.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the map is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the index holds on the heap (arena, entries, store names).
    pub fn heap_bytes(&self) -> usize {
        self.arena.capacity()
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.stores.iter().map(|s| s.len() + 16).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read(text: &str) -> Result<MapIndex, MapError> {
        MapIndex::read(
            text.as_bytes(),
            Path::new("test.map"),
            LoginCase::Insensitive,
        )
    }

    #[test]
    fn lines_are_keyed_as_logins_and_found_by_key() {
        let map = read(
            "# comment\n\nJohn@Example.COM  store-a:110\njane@example.com store-b jane.doe  # trailing\n\
             bücher@bücher.example 10.0.0.3:995\n",
        )
        .unwrap();
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("john@example.com"), Some(("store-a:110", None)));
        assert_eq!(
            map.get("jane@example.com"),
            Some(("store-b", Some("jane.doe")))
        );
        assert_eq!(
            map.get("bücher@xn--bcher-kva.example"),
            Some(("10.0.0.3:995", None))
        );
        assert_eq!(map.get("nobody@example.com"), None);
        assert!(map.heap_bytes() < 3 * 64 + 200, "{}", map.heap_bytes());
    }

    #[test]
    fn malformed_lines_and_duplicates_refuse_the_file() {
        for bad in [
            "lonely@example.com\n",
            "a@example.com s1 login extra\n",
            "a@bad..domain s1\n",
            "a@example.com s1\nA@EXAMPLE.com s2\n",
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(!e.contains("a@"), "the error names a mailbox: {e}");
        }
    }
}
