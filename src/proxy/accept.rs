//! Accept: from a TCP connection to a client stream — the PROXY header from a trusted balancer (the
//! client's real address), implicit TLS (the handshake inside the session's task, under its own timeout),
//! and the tenant an SNI name selects. Nothing POP3 is said here.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::ListenerTls;
use crate::context::Context;
use crate::router::TenantId;
use crate::session::SessionEnd;
use crate::store::connection::ClientInfo;
use crate::stream::Stream;

use super::snapshot::{ListenerInfo, Shared};

/// A connection ready for POP3.
pub(super) struct Accepted {
    pub(super) stream: Stream,
    /// The client as the stores are told of it (from the PROXY header when there was one).
    pub(super) client: ClientInfo,
    /// The tenant the SNI name of an implicit-TLS handshake selected.
    pub(super) sni_tenant: Option<TenantId>,
}

/// Reads the PROXY header where the listener expects one, and does the implicit-TLS handshake.
pub(super) async fn accept(
    ctx: &Context,
    shared: &Shared,
    listener: &ListenerInfo,
    mut tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Result<Accepted, SessionEnd> {
    let _ = tcp.set_nodelay(true);
    let local = if shared.proxy_headers_out {
        Some(tcp.local_addr().unwrap_or(peer))
    } else {
        None
    };
    let client_addr = match &listener.proxy_from {
        Some(trusted) => proxy_header(shared, trusted, &mut tcp, peer).await?,
        None => peer,
    };
    let client = ClientInfo {
        peer: client_addr,
        local,
        session: id,
        utf8: false,
    };
    if listener.tls != ListenerTls::Implicit {
        return Ok(Accepted {
            stream: Stream::Plain(tcp),
            client,
            sni_tenant: None,
        });
    }
    let (stream, sni_tenant) = implicit_tls(ctx, shared, listener, tcp).await?;
    if let Some(v) = stream.tls_version() {
        debug!(version = v, "client TLS established");
    }
    Ok(Accepted {
        stream,
        client,
        sni_tenant,
    })
}

/// PROXY protocol from a trusted balancer: the client address is the one it names.
async fn proxy_header(
    shared: &Shared,
    trusted: &[ipnet::IpNet],
    tcp: &mut TcpStream,
    peer: SocketAddr,
) -> Result<SocketAddr, SessionEnd> {
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        warn!("PROXY header expected, but the connection is not from a trusted network; closing");
        return Err(SessionEnd::Policy);
    }
    match crate::proxy_protocol::read_header(tcp, shared.config.timeouts.tls_handshake.get()).await
    {
        Ok(Some(addr)) => {
            tracing::Span::current().record("client", tracing::field::display(addr));
            Ok(addr)
        }
        Ok(None) => Ok(peer),
        Err(e) => {
            info!(error = %e, "refused: bad PROXY header");
            Err(SessionEnd::Policy)
        }
    }
}

/// The implicit-TLS handshake, counted; the tenant its SNI name selects.
async fn implicit_tls(
    ctx: &Context,
    shared: &Shared,
    listener: &ListenerInfo,
    tcp: TcpStream,
) -> Result<(Stream, Option<TenantId>), SessionEnd> {
    let metrics = &ctx.metrics;
    let Some((server_config, resolver)) = &shared.tls else {
        return Err(SessionEnd::Tls("no TLS configuration".into()));
    };
    let acceptor = TlsAcceptor::from(server_config.clone());
    let timeouts = &shared.config.timeouts;
    let limit = timeouts.tls_handshake.get().min(timeouts.pre_login.get());
    match timeout(limit, acceptor.accept(tcp)).await {
        Err(_) => {
            metrics.tls_handshake(&listener.name, false, "none", "none");
            Err(SessionEnd::Tls("handshake timed out".into()))
        }
        Ok(Err(e)) => {
            metrics.tls_handshake(&listener.name, false, "none", "none");
            Err(SessionEnd::Tls(e.to_string()))
        }
        Ok(Ok(tls)) => {
            let connection = tls.get_ref().1;
            let version = connection
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("unknown");
            let kind = match connection.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => "resumed",
                _ => "full",
            };
            metrics.tls_handshake(&listener.name, true, version, kind);
            let sni_tenant = connection
                .server_name()
                .and_then(|n| resolver.tenant_for(n));
            Ok((Stream::ServerTls(Box::new(tls)), sni_tenant))
        }
    }
}
