//! Binding and accepting: one accept loop per configured listener, a global cap on open connections
//! (an owned semaphore permit moves into each connection task), and a task per connection. TLS
//! handshakes happen inside that task, never in the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::context::Context;
use crate::proxy::Shared;

/// The config snapshot in force, as the accept loop sees it. The running process implements it, so this
/// module depends on no process type.
pub trait Snapshots: Send + Sync + 'static {
    /// The snapshot new connections are served with.
    fn current(&self) -> Arc<Shared>;
}

/// A listener that could not bind.
#[derive(Debug, thiserror::Error)]
#[error("listener `{name}` cannot bind {addr}: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Cause.
    pub source: std::io::Error,
}

const TOO_MANY: &[u8] = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n";
const TOO_MANY_FROM_YOU: &[u8] =
    b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n";

/// Accepts on `listener` until `stop`, spawning each connection on `tracker`. Each connection is served
/// with the config snapshot current at its accept, so a reload changes new sessions only.
pub async fn accept_loop<S: Snapshots>(
    listener: TcpListener,
    name: String,
    ctx: Arc<Context>,
    snapshots: Arc<S>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    // Per-IP rate and concurrency (the PROXY-protocol client address is checked later, at login).
                    let ip_guard = match ctx.throttle.admit(peer.ip()) {
                        Ok(g) => g,
                        Err(reason) => {
                            ctx.metrics
                                .throttled(crate::metrics::UNKNOWN_TENANT, reason);
                            tracker.spawn(refuse(tcp, TOO_MANY_FROM_YOU));
                            continue;
                        }
                    };
                    let shared = snapshots.current();
                    let Some(info) = shared.listeners.get(&name).cloned() else {
                        // The listener was just removed by a reload; this connection raced it.
                        continue;
                    };
                    tracker.spawn(crate::proxy::serve(
                        ctx.clone(),
                        shared,
                        info,
                        tcp,
                        peer,
                        (ip_guard, permit, ctx.metrics.connection_opened()),
                    ));
                }
                Err(_) => {
                    warn!(listener = %name, client = %peer, "connection cap reached; refusing");
                    ctx.metrics
                        .throttled(crate::metrics::UNKNOWN_TENANT, "connection_cap");
                    tracker.spawn(refuse(tcp, TOO_MANY));
                }
            },
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                error!(listener = %name, error = %e, "accept failed");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    info!(listener = %name, "stopped accepting");
}

async fn refuse(mut tcp: TcpStream, line: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(line)).await;
}

/// How many finished handshakes the kernel may queue before popgate accepts them (capped by
/// `net.core.somaxconn`). The default backlog is too small for a burst of reconnects after a network blip
/// at an ISP: a full queue leaves clients connected (SYN cookies) but never greeted.
const LISTEN_BACKLOG: u32 = 4096;

/// One listening socket with SO_REUSEADDR (a restart does not wait out TIME_WAIT) and a deep backlog.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Whether two listen addresses cannot both be bound: the same port, and the same IP or a wildcard on
/// either side (`0.0.0.0:110` takes port 110 on every IPv4 address, so `127.0.0.1:110` cannot bind next to it;
/// `[::]:110` is dual-stack on Linux by default, so it takes the IPv4 port as well).
pub fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Binds every configured listener before any is served, so a bad port fails the start as a whole.
pub async fn bind_all(addrs: &[(String, SocketAddr)]) -> Result<Vec<TcpListener>, BindError> {
    let mut bound = Vec::with_capacity(addrs.len());
    for (name, addr) in addrs {
        let l = bind(*addr).map_err(|source| BindError {
            name: name.clone(),
            addr: *addr,
            source,
        })?;
        bound.push(l);
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::overlap;
    use std::net::SocketAddr;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn overlap_is_same_port_and_same_or_wildcard_address() {
        assert!(overlap(a("127.0.0.1:110"), a("127.0.0.1:110")));
        assert!(overlap(a("0.0.0.0:110"), a("127.0.0.1:110")));
        assert!(overlap(a("127.0.0.1:110"), a("0.0.0.0:110")));
        assert!(overlap(a("[::]:110"), a("[::1]:110")));
        assert!(overlap(a("[::]:110"), a("0.0.0.0:110")));
        assert!(!overlap(a("127.0.0.1:110"), a("127.0.0.2:110")));
        assert!(!overlap(a("0.0.0.0:110"), a("0.0.0.0:995")));
        assert!(!overlap(a("127.0.0.1:110"), a("[::1]:110")));
    }
}
