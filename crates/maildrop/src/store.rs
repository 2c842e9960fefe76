//! The mailboxes: who may log in, which messages each holds, and the exclusive lock a POP3 session
//! takes on its maildrop (RFC 1939 §8).
//!
//! The store knows nothing of sockets or commands. A session gets a [`MailboxLock`] holding a
//! snapshot of the messages; deletions only reach the store through [`MailboxLock::commit`], which
//! is what the UPDATE state does. Dropping the lock any other way (EOF, fault, shutdown) releases
//! the mailbox with nothing deleted.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::md5;

/// One message as the maildrop serves it.
pub(crate) struct Message {
    /// The UIDL unique-id: assigned once when the message is added, so it stays the same across
    /// sessions and across other messages being deleted (RFC 1939 §7).
    uid: String,
    raw: Vec<u8>,
    /// The complete RETR response (status line, dot-stuffed body, terminator), built once when the
    /// message is added so that serving a 20 MiB message is a single write of shared bytes.
    retr_response: Arc<[u8]>,
}

/// A mailbox password; `Debug` never shows it.
struct Password(String);

#[derive(Debug)]
struct Mailbox {
    password: Password,
    messages: Vec<Arc<Message>>,
    /// The session that holds the maildrop lock, if any.
    holder: Option<SessionId>,
}

type SessionId = u64;

/// All mailboxes of one [`super::Maildrop`].
#[derive(Debug, Default)]
pub(crate) struct Store {
    mailboxes: Mutex<HashMap<String, Mailbox>>,
    next_uid: AtomicU64,
    next_session: AtomicU64,
}

/// What a client proved it knows.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Credential<'a> {
    /// USER/PASS, AUTH PLAIN, AUTH LOGIN.
    Password(&'a str),
    /// APOP: the lowercase hex MD5 of `timestamp` followed by the password.
    ApopDigest { timestamp: &'a str, digest: &'a str },
}

/// Why a mailbox could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OpenError {
    /// Unknown user or wrong secret; deliberately one case so the reply does not reveal which.
    #[error("authentication failed")]
    BadCredentials,
    #[error("mailbox is locked by another session")]
    Locked,
}

/// Exclusive access to one mailbox for the life of a POP3 session.
#[derive(Debug)]
pub(crate) struct MailboxLock {
    store: Arc<Store>,
    user: String,
    session: SessionId,
    messages: Vec<Arc<Message>>,
}

// === impl Message ===

impl Message {
    fn new(uid: String, raw: Vec<u8>) -> Self {
        let mut retr_response = Vec::with_capacity(raw.len() + raw.len() / 32 + 32);
        retr_response.extend_from_slice(format!("+OK {} octets\r\n", raw.len()).as_bytes());
        push_dot_stuffed(&mut retr_response, raw.split_inclusive(|&b| b == b'\n'));
        push_terminator(&mut retr_response);
        Self {
            uid,
            raw,
            retr_response: retr_response.into(),
        }
    }

    pub(crate) fn uid(&self) -> &str {
        &self.uid
    }

    pub(crate) fn size(&self) -> usize {
        self.raw.len()
    }

    pub(crate) fn retr_response(&self) -> Arc<[u8]> {
        Arc::clone(&self.retr_response)
    }

    /// The TOP response: the header, the blank line that ends it, and at most `body_lines` lines
    /// of the body (RFC 1939 §7). A message with no blank line is all header.
    pub(crate) fn top_response(&self, body_lines: usize) -> Vec<u8> {
        let mut lines = self.raw.split_inclusive(|&b| b == b'\n');
        let mut header_done = false;
        let header = lines.by_ref().take_while(|line| {
            // take_while consumes the first line that fails, so the blank line is tracked here and
            // re-emitted below.
            let blank = *line == b"\r\n" || *line == b"\n";
            header_done |= blank;
            !blank
        });
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"+OK top of message follows\r\n");
        push_dot_stuffed(&mut out, header);
        if header_done {
            out.extend_from_slice(b"\r\n");
            push_dot_stuffed(&mut out, lines.take(body_lines));
        }
        push_terminator(&mut out);
        out
    }
}

/// Appends lines, doubling a leading "." on each so the client cannot mistake a line of the
/// message for the end of the response (RFC 1939 §3, byte-stuffing).
fn push_dot_stuffed<'a>(out: &mut Vec<u8>, lines: impl Iterator<Item = &'a [u8]>) {
    for line in lines {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
}

/// Ends a multi-line response; a message whose last line has no line ending gets one first, or
/// the terminator would be glued to that line.
fn push_terminator(out: &mut Vec<u8>) {
    if out.last() != Some(&b'\n') {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

// Messages can be tens of MiB: Debug shows what identifies one, not its bytes.
impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("uid", &self.uid)
            .field("size", &self.raw.len())
            .finish_non_exhaustive()
    }
}

// === impl Password ===

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

// === impl Store ===

impl Store {
    /// Creates or replaces a mailbox. A session that has it locked keeps its snapshot and its
    /// lock; its commit then deletes only messages that still exist.
    pub(crate) fn add_mailbox(&self, user: &str, password: &str, messages: Vec<Vec<u8>>) {
        let messages = messages
            .into_iter()
            .map(|raw| Arc::new(Message::new(self.new_uid(), raw)))
            .collect();
        let mut mailboxes = self.mailboxes();
        let holder = mailboxes.get(user).and_then(|mailbox| mailbox.holder);
        mailboxes.insert(
            user.to_owned(),
            Mailbox {
                password: Password(password.to_owned()),
                messages,
                holder,
            },
        );
    }

    /// The committed contents of a mailbox.
    pub(crate) fn messages(&self, user: &str) -> Option<Vec<Vec<u8>>> {
        self.mailboxes().get(user).map(|mailbox| {
            mailbox
                .messages
                .iter()
                .map(|message| message.raw.clone())
                .collect()
        })
    }

    /// Checks the credential and, if it is right, takes the mailbox lock.
    ///
    /// Credentials are checked before the lock so that a wrong password never learns whether
    /// someone else is logged in.
    pub(crate) fn open(
        self: &Arc<Self>,
        user: &str,
        credential: Credential<'_>,
    ) -> Result<MailboxLock, OpenError> {
        let mut mailboxes = self.mailboxes();
        let mailbox = mailboxes.get_mut(user).ok_or(OpenError::BadCredentials)?;
        if !credential.proves(&mailbox.password.0) {
            return Err(OpenError::BadCredentials);
        }
        if mailbox.holder.is_some() {
            return Err(OpenError::Locked);
        }
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        mailbox.holder = Some(session);
        Ok(MailboxLock {
            store: Arc::clone(self),
            user: user.to_owned(),
            session,
            messages: mailbox.messages.clone(),
        })
    }

    fn new_uid(&self) -> String {
        format!("md{:08}", self.next_uid.fetch_add(1, Ordering::Relaxed))
    }

    /// A panic while holding the lock cannot leave the map half-edited (every edit is a single
    /// insert, retain or field store), so a poisoned lock is still safe to use.
    fn mailboxes(&self) -> MutexGuard<'_, HashMap<String, Mailbox>> {
        self.mailboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Credential ===

impl Credential<'_> {
    fn proves(&self, password: &str) -> bool {
        match *self {
            Credential::Password(given) => given == password,
            Credential::ApopDigest { timestamp, digest } => {
                let mut input = Vec::with_capacity(timestamp.len() + password.len());
                input.extend_from_slice(timestamp.as_bytes());
                input.extend_from_slice(password.as_bytes());
                md5::hex_digest(&input).eq_ignore_ascii_case(digest)
            }
        }
    }
}

// === impl MailboxLock ===

impl MailboxLock {
    /// The messages as they were when the session logged in; message number n is index n - 1.
    pub(crate) fn messages(&self) -> &[Arc<Message>] {
        &self.messages
    }

    /// The UPDATE state: removes the given messages from the mailbox, then releases the lock.
    pub(crate) fn commit(self, deleted: &[Arc<Message>]) {
        let deleted: HashSet<&str> = deleted.iter().map(|message| message.uid()).collect();
        let mut mailboxes = self.store.mailboxes();
        if let Some(mailbox) = mailboxes.get_mut(&self.user) {
            mailbox
                .messages
                .retain(|message| !deleted.contains(message.uid()));
        }
        // The lock itself is released by Drop, after this guard is gone.
    }
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        let mut mailboxes = self.store.mailboxes();
        if let Some(mailbox) = mailboxes.get_mut(&self.user) {
            // Only our own lock: the mailbox may have been replaced and locked afresh since.
            if mailbox.holder == Some(self.session) {
                mailbox.holder = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn store_with(messages: &[&[u8]]) -> Arc<Store> {
        let store = Arc::new(Store::default());
        store.add_mailbox(
            "alice",
            "secret",
            messages.iter().map(|m| m.to_vec()).collect(),
        );
        store
    }

    #[test]
    fn retr_response_is_dot_stuffed_and_terminated() {
        let message = Message::new(
            "u".into(),
            b"Subject: x\r\n\r\n.hidden\r\n..two\r\nend".to_vec(),
        );
        assert_eq!(
            &*message.retr_response(),
            b"+OK 33 octets\r\nSubject: x\r\n\r\n..hidden\r\n...two\r\nend\r\n.\r\n"
        );
        let empty = Message::new("e".into(), Vec::new());
        assert_eq!(&*empty.retr_response(), b"+OK 0 octets\r\n.\r\n");
    }

    #[test]
    fn top_returns_header_and_requested_body_lines() {
        let message = Message::new(
            "u".into(),
            b"From: a\r\nTo: b\r\n\r\nline1\r\n.line2\r\nline3\r\n".to_vec(),
        );
        assert_eq!(
            message.top_response(0),
            b"+OK top of message follows\r\nFrom: a\r\nTo: b\r\n\r\n.\r\n"
        );
        assert_eq!(
            message.top_response(2),
            b"+OK top of message follows\r\nFrom: a\r\nTo: b\r\n\r\nline1\r\n..line2\r\n.\r\n"
        );
        assert_eq!(
            message.top_response(99),
            b"+OK top of message follows\r\nFrom: a\r\nTo: b\r\n\r\nline1\r\n..line2\r\nline3\r\n.\r\n"
        );
        let headers_only = Message::new("h".into(), b"From: a\r\n.X: y".to_vec());
        assert_eq!(
            headers_only.top_response(5),
            b"+OK top of message follows\r\nFrom: a\r\n..X: y\r\n.\r\n"
        );
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let store = store_with(&[b"a\r\n"]);
        let lock = store.open("alice", Credential::Password("secret")).unwrap();
        assert_eq!(
            store
                .open("alice", Credential::Password("secret"))
                .unwrap_err(),
            OpenError::Locked
        );
        // A wrong password must not learn about the lock.
        assert_eq!(
            store
                .open("alice", Credential::Password("nope"))
                .unwrap_err(),
            OpenError::BadCredentials
        );
        drop(lock);
        assert!(store.open("alice", Credential::Password("secret")).is_ok());
    }

    #[test]
    fn commit_deletes_only_the_given_messages() {
        let store = store_with(&[b"one\r\n", b"two\r\n", b"three\r\n"]);
        let lock = store.open("alice", Credential::Password("secret")).unwrap();
        let doomed = vec![Arc::clone(&lock.messages()[1])];
        lock.commit(&doomed);
        assert_eq!(
            store.messages("alice").unwrap(),
            vec![b"one\r\n".to_vec(), b"three\r\n".to_vec()]
        );
        assert!(store.open("alice", Credential::Password("secret")).is_ok());
    }

    #[test]
    fn uids_are_unique_and_stable() {
        let store = store_with(&[b"one\r\n", b"two\r\n"]);
        let first: Vec<String> = {
            let lock = store.open("alice", Credential::Password("secret")).unwrap();
            lock.messages().iter().map(|m| m.uid().to_owned()).collect()
        };
        let second: Vec<String> = {
            let lock = store.open("alice", Credential::Password("secret")).unwrap();
            lock.messages().iter().map(|m| m.uid().to_owned()).collect()
        };
        assert_eq!(first, second);
        assert_ne!(first[0], first[1]);
    }

    #[test]
    fn apop_digest_is_checked() {
        let store = Arc::new(Store::default());
        store.add_mailbox("mrose", "tanstaaf", vec![]);
        let timestamp = "<1896.697170952@dbc.mtview.ca.us>";
        assert!(
            store
                .open(
                    "mrose",
                    Credential::ApopDigest {
                        timestamp,
                        digest: "c4c9334bac560ecc979e58001b3e22fb",
                    },
                )
                .is_ok()
        );
        assert_eq!(
            store
                .open(
                    "mrose",
                    Credential::ApopDigest {
                        timestamp,
                        digest: "00000000000000000000000000000000",
                    },
                )
                .unwrap_err(),
            OpenError::BadCredentials
        );
    }

    #[test]
    fn password_is_masked_in_debug() {
        let store = store_with(&[]);
        assert!(!format!("{store:?}").contains("secret"));
    }
}
