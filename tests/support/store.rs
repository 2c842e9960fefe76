//! A scripted store: answers POP3 by a script and records every line each connection sent, as sent (CRLF
//! included), so tests can check exactly what reached a store. Counts connections accepted and open.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the store answers to a credential line (`PASS …`, `AUTH …`, `APOP …`), given that line.
pub type Answer = dyn Fn(&str) -> String + Send + Sync;

/// How the store behaves.
pub struct Script {
    /// The greeting line, without CRLF.
    pub greeting: String,
    /// CAPA's lines, without the `+OK` and the terminator.
    pub capa: Vec<String>,
    /// The answer to a credential line, CRLF included.
    pub credentials: Arc<Answer>,
    /// Waited before answering a credential line.
    pub credentials_delay: Duration,
    /// After answering QUIT, keep the connection open until the peer closes it (most stores close at once).
    pub hold_after_quit: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            greeting: "+OK [XCLIENT] scripted store ready <4242.1@store.test>".into(),
            capa: vec![
                "USER".into(),
                "PIPELINING".into(),
                "SASL PLAIN XOAUTH2".into(),
            ],
            credentials: Arc::new(|_| "+OK logged in\r\n".into()),
            credentials_delay: Duration::ZERO,
            hold_after_quit: false,
        }
    }
}

/// A running scripted store on 127.0.0.1.
pub struct ScriptedStore {
    pub addr: SocketAddr,
    /// Per connection, every line it sent, in order.
    pub seen: Arc<Mutex<Vec<Vec<String>>>>,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    /// The accept loop: dropping the store closes its listener (connections already open stay).
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedStore {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl ScriptedStore {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let (record, acc, live) = (seen.clone(), accepted.clone(), open.clone());
        let acceptor = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                live.fetch_add(1, Ordering::SeqCst);
                let (record, live, script) = (record.clone(), live.clone(), script.clone());
                tokio::spawn(async move {
                    serve(tcp, &script, &record).await;
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            seen,
            accepted,
            open,
            acceptor,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Every line any connection sent, in order per connection.
    pub fn lines(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// The login name of every login any connection made, as the store saw it: the argument of USER, or
    /// the authentication identity of AUTH PLAIN (its initial response, or the response line after it).
    pub fn logins(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        let mut names = Vec::new();
        for conn in seen.iter() {
            let mut lines = conn.iter().map(|l| l.trim_end_matches(['\r', '\n']));
            while let Some(line) = lines.next() {
                if let Some(user) = line.strip_prefix("USER ") {
                    names.push(user.to_string());
                } else if let Some(rest) = line.strip_prefix("AUTH PLAIN") {
                    let b64 = match rest.strip_prefix(' ') {
                        Some(initial) => initial,
                        None => lines.next().unwrap_or_default(),
                    };
                    let plain = popgate::protocol::sasl::decode_plain(b64.as_bytes())
                        .unwrap_or_else(|e| panic!("not a PLAIN message ({e}): {b64}"));
                    names.push(plain.authcid);
                }
            }
        }
        names
    }
}

async fn serve(mut tcp: tokio::net::TcpStream, script: &Script, record: &Mutex<Vec<Vec<String>>>) {
    let index = {
        let mut all = record.lock().unwrap();
        all.push(Vec::new());
        all.len() - 1
    };
    if tcp
        .write_all(format!("{}\r\n", script.greeting).as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 65536];
    let mut pending: Vec<u8> = Vec::new();
    let mut quit = false;
    loop {
        let n = match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if quit {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw).into_owned();
            record.lock().unwrap()[index].push(line.clone());
            let verb = line
                .split([' ', '\r', '\n'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let reply = match verb.as_str() {
                "CAPA" => {
                    let mut r = String::from("+OK\r\n");
                    for c in &script.capa {
                        r.push_str(c);
                        r.push_str("\r\n");
                    }
                    r + ".\r\n"
                }
                "PASS" | "AUTH" | "APOP" => {
                    if !script.credentials_delay.is_zero() {
                        tokio::time::sleep(script.credentials_delay).await;
                    }
                    (script.credentials)(&line)
                }
                "STAT" => "+OK 0 0\r\n".into(),
                "QUIT" => {
                    quit = true;
                    "+OK bye\r\n".into()
                }
                _ => "+OK\r\n".into(),
            };
            if tcp.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            if quit && !script.hold_after_quit {
                return;
            }
        }
    }
}

/// A store that accepts and never says a word (a hung or SIGSTOPped store), holding each connection
/// until the peer closes it; counts connections.
pub struct SilentStore {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl SilentStore {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (acc, live) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                live.fetch_add(1, Ordering::SeqCst);
                let live = live.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            open,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}
