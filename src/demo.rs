//! `popgate demo`: two in-memory mail stores (tenants example.com and example.net) and popgate in front
//! of them on 127.0.0.1:1110 (STLS) and 127.0.0.1:1995 (implicit TLS, self-signed), then instructions.
//!
//! The demo builds its config as YAML text and loads it like any other config, so it exercises the
//! same parsing and validation path as production.

use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;

use maildrop::{Maildrop, Settings};

/// Demo users: (login, password, tenant domain).
pub const USERS: &[(&str, &str)] = &[
    ("alice@example.com", "alice-pw"),
    ("bob@example.com", "bob-pw"),
    ("carol@example.net", "carol-pw"),
];

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A demo store could not bind.
    #[error("demo store: {0}")]
    Store(#[from] std::io::Error),
    /// The demo config did not load (a bug).
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// popgate did not start (usually: port 1110 or 1995 already in use).
    #[error(transparent)]
    Start(#[from] crate::StartError),
}

/// Sample messages for a user: a short note, a longer one with dot-leading lines, and a MIME message
/// with an attachment.
pub fn sample_messages(user: &str) -> Vec<Vec<u8>> {
    let note = format!(
        "From: Postmaster <postmaster@popgate.test>\r\nTo: {user}\r\nSubject: Welcome to popgate\r\n\
         Date: Thu, 26 Nov 2026 09:00:00 +0000\r\nMessage-ID: <welcome.{user}>\r\n\r\n\
         Hello {user},\r\n\r\nthis message came from a demo store through popgate.\r\n"
    );
    let dotted = format!(
        "From: Ops <ops@popgate.test>\r\nTo: {user}\r\nSubject: Lines that start with a dot\r\n\
         Date: Thu, 26 Nov 2026 09:05:00 +0000\r\nMessage-ID: <dots.{user}>\r\n\r\n\
         .this line starts with a dot\r\n..and this with two\r\n.\r\nthe line above is a lone dot.\r\n"
    );
    let attachment = "popgate demo attachment\nline two\n";
    let mime = format!(
        "From: Reports <reports@popgate.test>\r\nTo: {user}\r\nSubject: Monthly report (with attachment)\r\n\
         Date: Thu, 26 Nov 2026 09:10:00 +0000\r\nMessage-ID: <report.{user}>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"=_popgate_demo\"\r\n\r\n\
         This is a multi-part message in MIME format.\r\n\r\n\
         --=_popgate_demo\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe report is attached.\r\n\r\n\
         --=_popgate_demo\r\nContent-Type: text/plain; name=\"report.txt\"\r\n\
         Content-Disposition: attachment; filename=\"report.txt\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {}\r\n\r\n--=_popgate_demo--\r\n",
        crate::protocol::sasl::encode_b64(attachment.as_bytes())
    );
    vec![note.into_bytes(), dotted.into_bytes(), mime.into_bytes()]
}

/// The demo config for stores at these addresses, as YAML.
pub fn config_yaml(
    pop3: SocketAddr,
    pop3s: SocketAddr,
    com_store: SocketAddr,
    net_store: SocketAddr,
) -> String {
    format!(
        r#"# popgate demo: plaintext login is allowed only because everything listens on loopback.
listeners:
  - name: pop3
    bind: "{pop3}"
    tls: starttls
  - name: pop3s
    bind: "{pop3s}"
    tls: implicit
tenants:
  example-com:
    domains: [example.com]
    backends: ["{com_store}"]
    plaintext_login: allow
    client_ip: none   # the demo's in-process stores do not speak XCLIENT
  example-net:
    domains: [example.net]
    backends: ["{net_store}"]
    plaintext_login: allow
    client_ip: none
admin:
  bind: "127.0.0.1:9110"
"#
    )
}

/// Starts the demo stores and popgate, prints the instructions, and returns the running popgate. The
/// stores live as long as the process (they are leaked into their serving tasks on purpose).
pub async fn start(shutdown: CancellationToken) -> Result<crate::Running, DemoError> {
    let loopback: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut stores = Vec::new();
    for domain in ["example.com", "example.net"] {
        let store = Maildrop::new(Settings {
            hostname: format!("store.{domain}"),
            ..Settings::default()
        });
        for (user, pw) in USERS.iter().filter(|(u, _)| u.ends_with(domain)) {
            store.add_mailbox(user, pw, sample_messages(user));
        }
        let server = store.bind(loopback).await?;
        stores.push((store, server));
    }
    let yaml = config_yaml(
        SocketAddr::from(([127, 0, 0, 1], 1110)),
        SocketAddr::from(([127, 0, 0, 1], 1995)),
        stores[0].1.local_addr(),
        stores[1].1.local_addr(),
    );
    let config = crate::Config::from_yaml_str(&yaml, Path::new("."))?;
    let running = crate::start(config, shutdown).await?;
    println!("{}", instructions());
    // The stores serve until the process exits.
    std::mem::forget(stores);
    Ok(running)
}

/// What to paste to try the demo.
pub fn instructions() -> String {
    r#"
popgate demo is running.
  POP3 with STLS : 127.0.0.1:1110
  POP3S          : 127.0.0.1:1995 (self-signed certificate)
  tenants        : example.com (alice, bob), example.net (carol)
  users          : alice@example.com / alice-pw, bob@example.com / bob-pw, carol@example.net / carol-pw
                   also as SDPS names: alice+example.com, alice%example.com

Try it:
  curl -s pop3://127.0.0.1:1110/1 -u 'alice@example.com:alice-pw'
  curl -s pop3://127.0.0.1:1110/ -u 'carol+example.net:carol-pw'
  curl -s --ssl-reqd -k pop3://127.0.0.1:1110/3 -u 'bob@example.com:bob-pw'
  curl -s -k pop3s://127.0.0.1:1995/2 -u 'alice%example.com:alice-pw'
  python3 -c "import poplib; p = poplib.POP3('127.0.0.1', 1110); p.user('alice@example.com'); p.pass_('alice-pw'); print(p.list()); p.quit()"
  python3 -c "import poplib, ssl; c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; p = poplib.POP3_SSL('127.0.0.1', 1995, context=c); p.user('carol@example.net'); p.pass_('carol-pw'); print(b'\n'.join(p.retr(1)[1]).decode()); p.quit()"

Status page and metrics: http://127.0.0.1:9110/ and http://127.0.0.1:9110/metrics

Press Ctrl-C to stop.
"#
    .to_string()
}
