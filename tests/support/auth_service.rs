//! An nginx-style `auth_http` service on 127.0.0.1 for tests: answers each request head with what a
//! handler says (or never), and keeps every request head it received.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the service answers to a request head: a whole response, or `None` to never answer.
type Handler = dyn Fn(&[u8]) -> Option<String> + Send + Sync;

/// An auth service on 127.0.0.1 that keeps every request head it receives.
pub struct Service {
    pub addr: SocketAddr,
    heads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Service {
    pub async fn start(handler: impl Fn(&[u8]) -> Option<String> + Send + Sync + 'static) -> Self {
        Self::serve(handler, None).await
    }

    /// The same service over TLS with this certificate and key (PEM): an `https://` auth service.
    pub async fn start_tls(
        handler: impl Fn(&[u8]) -> Option<String> + Send + Sync + 'static,
        cert_pem: &str,
        key_pem: &str,
    ) -> Self {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::serve(
            handler,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn serve(
        handler: impl Fn(&[u8]) -> Option<String> + Send + Sync + 'static,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                let handler = Arc::clone(&handler);
                let seen = Arc::clone(&seen);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => answer(conn, &*handler, &seen).await,
                        Some(acceptor) => {
                            if let Ok(conn) = acceptor.accept(conn).await {
                                answer(conn, &*handler, &seen).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, heads }
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.heads.lock().unwrap().len()
    }

    pub fn head(&self, n: usize) -> Vec<u8> {
        self.heads.lock().unwrap()[n].clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}/auth?tenant=a", self.addr)
    }
}

/// Reads one request head, keeps it, and answers what `handler` says (or holds the connection).
async fn answer<S>(mut conn: S, handler: &Handler, seen: &Mutex<Vec<Vec<u8>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    seen.lock().unwrap().push(head.clone());
    match handler(&head) {
        Some(response) => {
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
        // Hold the connection until the client gives up.
        None => while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {},
    }
}
