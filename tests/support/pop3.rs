//! A scripted POP3 client for tests: plain, STLS and implicit TLS, raw bytes where exactness matters.
//! Every read has a deadline so a broken proxy fails the test instead of hanging it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use popgate::stream::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ_LIMIT: Duration = Duration::from_secs(20);

/// Accepts any server certificate: tests check which certificate was served instead.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector() -> tokio_rustls::TlsConnector {
    let provider = popgate::tls::provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn handshake(tcp: TcpStream, sni: &str) -> (Stream, Vec<u8>) {
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let tls = tokio::time::timeout(READ_LIMIT, connector().connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed");
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificate")[0]
        .to_vec();
    (Stream::ClientTls(Box::new(tls)), cert)
}

/// A POP3 client connection.
pub struct Pop3 {
    stream: Stream,
    buf: Vec<u8>,
    /// The certificate the server presented, when TLS is on.
    pub peer_cert: Option<Vec<u8>>,
}

impl Pop3 {
    /// Plain TCP; does not read the greeting.
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        Self {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            peer_cert: None,
        }
    }

    /// Plain TCP from a chosen local address (e.g. 127.0.0.2, to be "another client"); reads the greeting.
    pub async fn greeted_from(addr: SocketAddr, local: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(local, 0))
            .expect("bind local address");
        let tcp = socket.connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let mut c = Self {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            peer_cert: None,
        };
        let g = c.line().await;
        assert!(g.starts_with("+OK"), "greeting: {g}");
        c
    }

    /// Implicit TLS with this SNI name; does not read the greeting.
    pub async fn connect_tls(addr: SocketAddr, sni: &str) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (stream, cert) = handshake(tcp, sni).await;
        Self {
            stream,
            buf: Vec::new(),
            peer_cert: Some(cert),
        }
    }

    /// USER/PASS on a fresh plain connection: the connection and the PASS reply.
    pub async fn login_reply(addr: SocketAddr, user: &str, pass: &str) -> (Self, String) {
        let mut c = Self::greeted(addr).await;
        assert!(c.cmd(&format!("USER {user}")).await.starts_with("+OK"));
        let reply = c.cmd(&format!("PASS {pass}")).await;
        (c, reply)
    }

    /// Connects plain and reads the `+OK` greeting.
    pub async fn greeted(addr: SocketAddr) -> Self {
        let mut c = Self::connect(addr).await;
        let g = c.line().await;
        assert!(g.starts_with("+OK"), "greeting: {g}");
        c
    }

    /// Sends STLS, expects `+OK`, handshakes. Panics if anything was buffered past the `+OK`.
    pub async fn starttls(&mut self, sni: &str) {
        let r = self.cmd("STLS").await;
        assert!(r.starts_with("+OK"), "STLS: {r}");
        self.starttls_after_ok(sni).await;
    }

    /// Handshakes after the server's `+OK` to STLS was already read.
    pub async fn starttls_after_ok(&mut self, sni: &str) {
        assert!(self.buf.is_empty(), "server sent bytes after STLS +OK");
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, placeholder().await) else {
            panic!("STLS on a TLS stream");
        };
        let (stream, cert) = handshake(tcp, sni).await;
        self.stream = stream;
        self.peer_cert = Some(cert);
    }

    /// Writes raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// Sends a command line (CRLF added).
    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    /// Sends a command and returns its status line.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.line().await
    }

    /// Sends a command and asserts `+OK`.
    pub async fn ok(&mut self, line: &str) -> String {
        let r = self.cmd(line).await;
        assert!(r.starts_with("+OK"), "{line:?} -> {r}");
        r
    }

    /// Logs in with USER/PASS and asserts success.
    pub async fn login(&mut self, user: &str, pass: &str) {
        self.ok(&format!("USER {user}")).await;
        self.ok(&format!("PASS {pass}")).await;
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(READ_LIMIT, self.stream.read(&mut chunk))
            .await
            .expect("read timed out")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one line, without CRLF. Panics at EOF.
    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
            }
            assert!(
                self.fill().await > 0,
                "EOF while reading a line; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads a multi-line body after its status line: the raw bytes up to and including `.\r\n`.
    pub async fn body_raw(&mut self) -> Vec<u8> {
        loop {
            let end = if self.buf.starts_with(b".\r\n") {
                Some(3)
            } else {
                self.buf
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|i| i + 5)
            };
            if let Some(end) = end {
                return self.buf.drain(..end).collect();
            }
            assert!(self.fill().await > 0, "EOF inside a multi-line body");
        }
    }

    /// Sends a command expecting `+OK` and a multi-line body; returns the raw body bytes.
    pub async fn multiline(&mut self, line: &str) -> Vec<u8> {
        self.ok(line).await;
        self.body_raw().await
    }

    /// Reads until EOF; returns what came.
    pub async fn until_eof(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }
}

/// Undoes dot-stuffing of a raw multi-line body and drops the terminator: the message as stored.
pub fn unstuff(raw: &[u8]) -> Vec<u8> {
    let body = raw.strip_suffix(b".\r\n").expect("terminator");
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

async fn placeholder() -> Stream {
    // A connected socket pair is the cheapest valid Stream to swap in while the real one upgrades.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let c = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    Stream::Plain(c)
}

// === additions for the fault-injection tests (tests/faults.rs) ===

impl Pop3 {
    /// Wraps a TCP stream the test connected itself (say, with a small receive buffer, so a large
    /// RETR stays in flight); does not read the greeting.
    pub fn from_tcp(tcp: TcpStream) -> Self {
        tcp.set_nodelay(true).expect("nodelay");
        Self {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            peer_cert: None,
        }
    }

    /// Reads exactly `n` bytes (what was already buffered first). Panics at EOF.
    pub async fn take_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await > 0,
                "EOF after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one line, or `None` when the peer closed (or reset) the connection first.
    pub async fn try_line(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(
                    String::from_utf8_lossy(&line)
                        .trim_end_matches(['\r', '\n'])
                        .to_string(),
                );
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Vanishes abortively: SO_LINGER 0, so closing sends a reset instead of a FIN and drops whatever
    /// the peer sent that was not read yet. Plain TCP only.
    pub fn abort(self) {
        match &self.stream {
            Stream::Plain(tcp) => tcp.set_zero_linger().expect("SO_LINGER 0"),
            _ => panic!("abort: only plain TCP connections can be reset"),
        }
        drop(self);
    }
}

impl Pop3 {
    /// Like [`Pop3::multiline`] for bodies of many MiB: looks for the terminator only in what each read
    /// added, so reading stays linear in the body's size.
    pub async fn multiline_big(&mut self, line: &str) -> Vec<u8> {
        self.ok(line).await;
        let mut scanned: usize = 0;
        loop {
            if self.buf.starts_with(b".\r\n") {
                return self.buf.drain(..3).collect();
            }
            let from = scanned.saturating_sub(4);
            if let Some(i) = self.buf[from..].windows(5).position(|w| w == b"\r\n.\r\n") {
                return self.buf.drain(..from + i + 5).collect();
            }
            scanned = self.buf.len();
            assert!(self.fill().await > 0, "EOF inside a multi-line body");
        }
    }
}
