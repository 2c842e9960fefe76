//! `maildrop`: a small, complete, in-memory POP3 server (RFC 1939, with CAPA from RFC 2449, STLS
//! from RFC 2595 and SASL PLAIN/LOGIN from RFC 5034) for popgate's demo and its integration and
//! fault-injection tests. It stands in for a real backend; it is not one.
//!
//! It owns its mailboxes, the POP3 protocol spoken to whoever connects, and the fault hooks
//! ([`Faults`]) that make it misbehave on purpose. It depends on nothing of popgate (a crate of its own):
//! the proxy is tested *against* it, so sharing code would let one bug hide on both sides.
//!
//! # Layout
//! - `lib.rs` (this file): the public handle [`Maildrop`], its [`Settings`] and [`Faults`], and the
//!   accept loop behind [`Maildrop::serve`] and [`Server`].
//! - `connection`: socket I/O for one client: greeting, line framing, writes, TLS handshakes.
//! - `session`: the POP3 state machine, lines in and replies out, no I/O.
//! - `command`: parsing a command line.
//! - `store`: mailboxes, message UIDs, the per-mailbox lock and committing deletions.
//! - `md5`: RFC 1321 MD5, needed only for APOP.

mod command;
mod connection;
mod md5;
mod session;
mod store;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use self::store::Store;

/// A running maildrop's contents and configuration. Cloning is cheap and every clone sees the
/// same mailboxes and faults.
#[derive(Clone)]
pub struct Maildrop {
    shared: Arc<Shared>,
}

/// How a [`Maildrop`] presents itself. Everything defaults to off or empty.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Name used in the greeting and in generated APOP timestamps. Empty means `localhost`.
    pub hostname: String,
    /// The APOP timestamp every greeting carries, e.g. `<1896.697170952@dbc.mtview.ca.us>` to
    /// replay RFC 1939's example. `None` generates a fresh `<pid.counter.nanos@hostname>` for each
    /// connection, as RFC 1939 §7 asks.
    pub apop_timestamp: Option<String>,
    /// Server TLS configuration. When set, STLS is offered (before login, until TLS is up).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Handshake TLS before the greeting (POP3S, RFC 8314). Ignored unless `tls` is set.
    pub implicit_tls: bool,
    /// Fault hooks in force from the start; [`Maildrop::set_faults`] replaces them later.
    pub faults: Faults,
}

/// Ways to make the maildrop misbehave for tests. The default is a well-behaved server.
///
/// Each hook is read when it applies (greeting hooks when a connection is accepted, the others
/// at the command), so [`Maildrop::set_faults`] also affects connections already open.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Wait this long after accepting before sending the greeting.
    pub greeting_delay: Option<Duration>,
    /// Accept, then never send a byte; the connection stays open until the client closes it.
    pub no_greeting: bool,
    /// Answer every PASS, APOP and AUTH with `-ERR [SYS/TEMP] logins refused`.
    pub refuse_logins: bool,
    /// During RETR, send only this many bytes of the response, then close the connection. Nothing
    /// is committed, as with any connection that ends without QUIT.
    pub drop_mid_retr_after: Option<usize>,
    /// Send these bytes instead of the greeting (for garbage or `-ERR` greeting tests); the
    /// session then carries on as usual.
    pub greeting_override: Option<Vec<u8>>,
}

/// A maildrop listening on a socket, started by [`Maildrop::bind`]. Dropping it stops it.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// What every connection of one [`Maildrop`] shares.
#[derive(Debug)]
pub(crate) struct Shared {
    hostname: String,
    apop_timestamp: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
    implicit_tls: bool,
    faults: RwLock<Faults>,
    store: Arc<Store>,
    /// Makes generated APOP timestamps unique within the process even when the clock is coarse.
    greetings: AtomicU64,
}

/// First and longest pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

// === impl Maildrop ===

impl Maildrop {
    pub fn new(settings: Settings) -> Self {
        let Settings {
            hostname,
            apop_timestamp,
            tls,
            implicit_tls,
            faults,
        } = settings;
        let hostname = if hostname.is_empty() {
            "localhost".to_owned()
        } else {
            hostname
        };
        if implicit_tls && tls.is_none() {
            tracing::warn!("maildrop: implicit_tls is set without a TLS config; serving plaintext");
        }
        Self {
            shared: Arc::new(Shared {
                hostname,
                apop_timestamp,
                tls,
                implicit_tls,
                faults: RwLock::new(faults),
                store: Arc::new(Store::default()),
                greetings: AtomicU64::new(0),
            }),
        }
    }

    /// Creates or replaces `user`'s mailbox. `messages` are raw RFC 5322 messages with CRLF line
    /// endings; each gets a UIDL unique-id that stays with it for the maildrop's lifetime.
    pub fn add_mailbox(&self, user: &str, password: &str, messages: Vec<Vec<u8>>) {
        self.shared.store.add_mailbox(user, password, messages);
    }

    /// The messages in `user`'s mailbox as committed: deletions count only once a session has
    /// QUIT. `None` if there is no such mailbox.
    pub fn messages(&self, user: &str) -> Option<Vec<Vec<u8>>> {
        self.shared.store.messages(user)
    }

    /// Replaces the fault hooks.
    pub fn set_faults(&self, faults: Faults) {
        *self
            .shared
            .faults
            .write()
            .unwrap_or_else(PoisonError::into_inner) = faults;
    }

    /// The fault hooks now in force.
    pub fn faults(&self) -> Faults {
        self.shared.with_faults(Faults::clone)
    }

    /// Accepts connections on `listener`, each served by its own task, until `shutdown` is
    /// cancelled. Open connections are then closed (nothing they did is committed) and this
    /// returns once all of them have finished.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        let mut connections = JoinSet::new();
        let mut backoff = ACCEPT_BACKOFF_START;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(finished) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(error) = finished {
                        tracing::error!(%error, "maildrop connection task failed");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        backoff = ACCEPT_BACKOFF_START;
                        let shared = Arc::clone(&self.shared);
                        let shutdown = shutdown.clone();
                        connections.spawn(async move {
                            tokio::select! {
                                () = shutdown.cancelled() => {}
                                result = connection::serve_connection(shared, tcp) => {
                                    if let Err(error) = result {
                                        tracing::debug!(%peer, %error, "maildrop connection ended");
                                    }
                                }
                            }
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, ?backoff, "maildrop accept failed");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
            }
        }
        // Every connection task watches the same token, so they are all on their way out.
        while connections.join_next().await.is_some() {}
    }

    /// Binds `addr` (port 0 picks a free one) and serves it in a background task.
    pub async fn bind(&self, addr: SocketAddr) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let maildrop = self.clone();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { maildrop.serve(listener, token).await });
        Ok(Server {
            local_addr,
            shutdown,
            task: Some(task),
        })
    }
}

impl fmt::Debug for Maildrop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maildrop")
            .field("hostname", &self.shared.hostname)
            .field("tls", &self.shared.tls.is_some())
            .field("implicit_tls", &self.shared.implicit_tls)
            .finish_non_exhaustive()
    }
}

// === impl Server ===

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every open connection, without waiting.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits until the accept loop and every connection task have finished.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(error) = task.await
        {
            tracing::error!(%error, "maildrop accept loop failed");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// === impl Shared ===

impl Shared {
    fn with_faults<T>(&self, read: impl FnOnce(&Faults) -> T) -> T {
        // Faults are replaced whole, so a panic elsewhere cannot leave them half-written.
        read(&self.faults.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn logins_refused(&self) -> bool {
        self.with_faults(|faults| faults.refuse_logins)
    }

    fn implicit_tls(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls.as_ref().filter(|_| self.implicit_tls)
    }

    /// The APOP timestamp for a new connection's greeting (RFC 1939 §7: `<process-ID.clock@
    /// hostname>`, unique per greeting).
    fn next_timestamp(&self) -> String {
        if let Some(fixed) = &self.apop_timestamp {
            return fixed.clone();
        }
        let counter = self.greetings.fetch_add(1, Ordering::Relaxed);
        // A clock before 1970 only makes the timestamp less varied; the counter keeps it unique.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        format!(
            "<{}.{counter}.{nanos}@{}>",
            std::process::id(),
            self.hostname
        )
    }
}

#[cfg(test)]
mod tests;
