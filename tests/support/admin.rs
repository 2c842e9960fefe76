//! The admin HTTP server spoken to byte for byte (raw requests, so tests can send what curl would not).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::popgate::{plain_config, start_from_file, tenant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bearer token [`with_admin`] configures.
pub const TOKEN: &str = "s3cret-token";
/// Its header line, for [`request`].
pub const TOKEN_HEADER: &str = "Authorization: Bearer s3cret-token\r\n";

/// Sends `raw` and reads until the server closes: the whole answer as text. Panics when the server
/// neither answers nor closes within 20 s.
pub async fn exchange(admin: SocketAddr, raw: Vec<u8>) -> String {
    let (mut rd, mut wr) = TcpStream::connect(admin).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        // Fails once the server closes with bytes unread: that is an answer too.
        let _ = wr.write_all(&raw).await;
        wr
    });
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline.into(), rd.read(&mut chunk)).await {
            Err(_) => panic!(
                "the admin server neither answered nor closed: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
    writer.abort();
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of an HTTP/1.1 answer, or 0 when it is not one.
pub fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A request with these extra header lines (each ending in CRLF), no body, closing afterwards.
pub fn request(method: &str, target: &str, headers: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// popgate from a file in `dir` (so POST /reload re-reads it) with an admin server and [`TOKEN`], one
/// tenant `acme` (example.com) on `store`; and the YAML.
pub async fn with_admin(store: SocketAddr, dir: &Path) -> (popgate::Running, String) {
    let yaml = plain_config(
        &format!("admin:\n  bind: 127.0.0.1:0\n  token: {TOKEN}\n"),
        &tenant("acme", "example.com", store, ""),
    );
    (start_from_file(&yaml, dir).await, yaml)
}

/// One plain listener `pop3`, the admin server with [`TOKEN`], a 3 s shutdown grace, tenant `acme`
/// (example.com) on `store` with fast health probes, then `extra` YAML (more tenants under `tenants:`).
pub fn config(store: SocketAddr, extra: &str) -> String {
    format!(
        r#"listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
admin:
  bind: 127.0.0.1:0
  token: {TOKEN}
timeouts:
  shutdown_grace: 3s
tenants:
  acme:
    domains: [example.com]
    backends: ["{store}"]
    plaintext_login: allow
    health: {{interval: 200ms}}
{extra}"#
    )
}
