//! TLS session resumption for clients that come back: a ticket from one replica resumes on another that
//! shares the ticket secret, not on one that does not (each process then has keys of its own), a reload
//! with another secret retires the old tickets, and every handshake is counted as full or resumed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::HandshakeKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use support::pki::TestCa;

const NAME: &str = "pop.example.com";

/// A replica with an implicit-TLS listener, its certificate signed by `ca`, tickets keyed by `secret_file`
/// (relative to `dir`) when given; its config is `dir/NAME.yaml` so it can be reloaded.
async fn replica(
    dir: &Path,
    name: &str,
    store: SocketAddr,
    secret_file: Option<&str>,
) -> popgate::Running {
    let sessions = secret_file.map_or(String::new(), |f| {
        format!("tls_sessions:\n  ticket_secret_file: {f}\n")
    });
    let yaml = format!(
        "listeners:\n  - name: pop3s\n    bind: 127.0.0.1:0\n    tls: implicit\n\
         tls: {{certificate: leaf.crt, key: leaf.key}}\n{sessions}admin:\n  bind: 127.0.0.1:0\n\
         tenants:\n  acme:\n    domains: [example.com]\n    backends: [\"{store}\"]\n"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let config = popgate::Config::load(&path).unwrap();
    popgate::start_from_file(config, path, CancellationToken::new())
        .await
        .unwrap()
}

/// Connects, reads the greeting (which also takes in the session tickets the server sent after the
/// handshake), QUITs, and says how the handshake went.
async fn visit(addr: SocketAddr, client: &Arc<rustls::ClientConfig>) -> HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(rustls_pki_types::ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let mut tls = BufReader::new(tls);
    let mut line = String::new();
    tls.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("+OK"), "{line}");
    tls.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    line.clear();
    tls.read_line(&mut line).await.unwrap();
    kind
}

fn resumed_handshakes(pg: &popgate::Running) -> f64 {
    let admin = pg.admin_addr().unwrap();
    let text = support::popgate::http("GET", &format!("http://{admin}/metrics"), None).1;
    support::popgate::metric(
        &text,
        "popgate_tls_handshakes_total{kind=\"resumed\",listener=\"pop3s\",result=\"ok\",version=\"TLSv1_3\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_resume_across_replicas_that_share_the_secret() {
    let (_md, store) = support::mailboxes::numbered(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("resumption CA");
    let leaf = ca.leaf(&[NAME]);
    std::fs::write(dir.path().join("leaf.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("leaf.key"), &leaf.key_pem).unwrap();
    std::fs::write(
        dir.path().join("shared.secret"),
        "a-secret-every-replica-reads-from-its-Secret\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("other.secret"),
        "another-secret-of-well-over-thirty-two-chars\n",
    )
    .unwrap();
    let a = replica(dir.path(), "a", store.local_addr(), Some("shared.secret")).await;
    let b = replica(dir.path(), "b", store.local_addr(), Some("shared.secret")).await;
    let lone = replica(dir.path(), "lone", store.local_addr(), None).await;
    let (at_a, at_b, at_lone) = (
        a.local_addr("pop3s").unwrap(),
        b.local_addr("pop3s").unwrap(),
        lone.local_addr("pop3s").unwrap(),
    );

    // One client that keeps its sessions, as a mail client polling every few minutes does.
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let roots = popgate::tls::load_roots(&dir.path().join("ca.pem")).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(popgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    assert_eq!(visit(at_a, &client).await, HandshakeKind::Full);
    // A ticket from a resumes on b: the same secret, another process.
    assert_eq!(visit(at_b, &client).await, HandshakeKind::Resumed);
    assert_eq!(resumed_handshakes(&b), 1.0);
    assert_eq!(resumed_handshakes(&a), 0.0);
    // A replica with keys of its own cannot open them, but resumes its own tickets.
    assert_eq!(visit(at_lone, &client).await, HandshakeKind::Full);
    assert_eq!(visit(at_lone, &client).await, HandshakeKind::Resumed);
    // b now reads another secret: tickets made with the old one no longer resume there.
    let b_yaml = dir.path().join("b.yaml");
    let text = std::fs::read_to_string(&b_yaml)
        .unwrap()
        .replace("shared.secret", "other.secret");
    std::fs::write(&b_yaml, text).unwrap();
    b.reload().await.unwrap();
    let mut fresh = (*client).clone();
    fresh.resumption = rustls::client::Resumption::in_memory_sessions(32);
    let fresh = Arc::new(fresh);
    assert_eq!(visit(at_a, &fresh).await, HandshakeKind::Full);
    assert_eq!(
        visit(at_b, &fresh).await,
        HandshakeKind::Full,
        "an old secret's ticket resumed"
    );
    for pg in [a, b, lone] {
        pg.shutdown();
    }
}
