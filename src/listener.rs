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

use crate::proxy::{ListenerInfo, Shared};

const TOO_MANY: &[u8] = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n";

/// Accepts on `listener` until `shutdown`, spawning each connection on `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    info: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (shared, info, shutdown) = (shared.clone(), info.clone(), shutdown.clone());
                    tracker.spawn(async move {
                        crate::proxy::serve(shared, info, tcp, peer, shutdown).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    warn!(listener = %info.name, client = %peer, "connection cap reached; refusing");
                    tracker.spawn(refuse(tcp));
                }
            },
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                error!(listener = %info.name, error = %e, "accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    info!(listener = %info.name, "stopped accepting");
}

async fn refuse(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(TOO_MANY)).await;
}

/// Binds every configured listener before any is served, so a bad port fails the start as a whole.
pub async fn bind_all(
    addrs: &[(String, SocketAddr)],
) -> Result<Vec<TcpListener>, crate::StartError> {
    let mut bound = Vec::with_capacity(addrs.len());
    for (name, addr) in addrs {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| crate::StartError::Bind {
                name: name.clone(),
                addr: *addr,
                source,
            })?;
        bound.push(l);
    }
    Ok(bound)
}
