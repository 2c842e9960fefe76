//! Real POP3 clients for end-to-end tests: the `curl` binary and Python's `poplib`.
//!
//! Owns: running those clients as child processes against a loopback address and handing back
//! what they saw, as plain values. Used against Dovecot directly (to prove a store) and through
//! the proxy (to prove the proxy is transparent to clients other people wrote).
//!
//! Must not: decide pass/fail beyond "the client ran" — each test asserts on the values — or
//! skip when a client is missing (it panics: `scripts/test` runs on machines that have both).
//!
//! What the clients return for a message: both undo dot-stuffing and give the message with CRLF
//! line ends, so `curl_retr(..)` == `PopReply::body()` == `dovecot::pop3_retr_bytes(stored)`.

use std::fmt;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Every client run is bounded: a hung proxy fails the test instead of hanging it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

// === curl ===

/// What one `curl` run produced. `code` is curl's exit code (0 ok, 67 login denied, 28 timeout,
/// 56 receive failure, 8 weird server reply, ...); `None` if curl was killed by a signal.
#[derive(Debug, Clone)]
pub struct CurlOutput {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// `pop3://127.0.0.1:PORT/<path>`; `path` is a message number ("1"), or "" for LIST.
pub fn pop3_url(addr: SocketAddr, path: &str) -> String {
    format!("pop3://{addr}/{path}")
}

/// `pop3s://127.0.0.1:PORT/<path>` (implicit TLS).
pub fn pop3s_url(addr: SocketAddr, path: &str) -> String {
    format!("pop3s://{addr}/{path}")
}

/// Runs `curl -sS --max-time 30 <args>` and returns what it did, whatever its exit code.
pub fn curl(args: &[&str]) -> CurlOutput {
    let max_time = CLIENT_TIMEOUT.as_secs().to_string();
    let output = Command::new("curl")
        .args(["-sS", "--max-time", &max_time])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}); the end-to-end tests need it"));
    CurlOutput {
        code: output.status.code(),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `curl <url> -u user:pass <extra_args>`. Without extra args curl logs in with the strongest
/// SASL mechanism the server offers (CRAM-MD5 on our Dovecot stores); pick another with e.g.
/// `--login-options AUTH=PLAIN`, `AUTH=LOGIN` or `AUTH=+APOP`. Add `--ssl-reqd -k` for STLS.
pub fn curl_pop3(url: &str, user: &str, pass: &str, extra_args: &[&str]) -> CurlOutput {
    let credentials = format!("{user}:{pass}");
    let mut args = vec![url, "-u", &credentials];
    args.extend_from_slice(extra_args);
    curl(&args)
}

/// Like `curl_pop3`, but panics unless curl exited 0; returns what curl printed (for
/// `.../N`: message N with CRLF line ends, dot-stuffing undone).
pub fn curl_retr(url: &str, user: &str, pass: &str, extra_args: &[&str]) -> Vec<u8> {
    let out = curl_pop3(url, user, pass, extra_args);
    assert_eq!(
        out.code,
        Some(0),
        "curl {url} as {user} {extra_args:?} failed: {}",
        out.stderr
    );
    out.stdout
}

// === poplib ===

/// How the poplib client secures its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopMode {
    /// Plain TCP, no TLS.
    Plain,
    /// Plain TCP, then `STLS` before anything else.
    Stls,
    /// TLS from the first byte (pop3s).
    Implicit,
}

/// One command of a scripted poplib session. Each produces exactly one `PopReply`.
/// `Retr`, `Top`, `List`, `Uidl` and `Capa` replies carry the multi-line body in `lines`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PopStep {
    /// `USER` then `PASS`; the reply is PASS's (or USER's, if USER was refused).
    Login {
        user: String,
        pass: String,
    },
    /// `APOP` with the greeting's timestamp (poplib computes the digest).
    Apop {
        user: String,
        pass: String,
    },
    Stat,
    List,
    Uidl,
    Retr(u32),
    Top(u32, u32),
    Dele(u32),
    Noop,
    Rset,
    Capa,
    /// `UTF8` (RFC 6856), via poplib's `utf8()`.
    Utf8,
    /// Any single-line command, sent as given (e.g. `"LIST 1"`, `"UIDL 2"`).
    Raw(String),
}

/// A server reply as poplib saw it: `status` is the first line (`+OK ...` / `-ERR ...`, or
/// poplib's own complaint such as `-ERR EOF`); `lines` are the body lines of a multi-line
/// reply without CRLF and with dot-stuffing undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopReply {
    pub ok: bool,
    pub status: String,
    pub lines: Vec<Vec<u8>>,
}

/// Everything one poplib session saw, in order. After a fatal `error` (connect, TLS, timeout,
/// dropped connection) the remaining steps have no reply and there is no `quit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PopTranscript {
    pub greeting: Option<String>,
    /// Reply to `STLS` in `PopMode::Stls`.
    pub stls: Option<PopReply>,
    /// One reply per step that ran, in step order.
    pub replies: Vec<PopReply>,
    /// Reply to the closing `QUIT` (always sent when the session is still up).
    pub quit: Option<PopReply>,
    pub error: Option<String>,
}

/// Where and how a poplib session connects.
#[derive(Debug, Clone)]
pub struct PopClient {
    pub addr: SocketAddr,
    pub mode: PopMode,
    /// TLS server name to send (SNI); `None` sends none (the address is an IP).
    pub sni: Option<String>,
    pub timeout: Duration,
}

// === impl PopStep ===

impl PopStep {
    pub fn login(user: &str, pass: &str) -> Self {
        PopStep::Login {
            user: user.to_owned(),
            pass: pass.to_owned(),
        }
    }

    pub fn apop(user: &str, pass: &str) -> Self {
        PopStep::Apop {
            user: user.to_owned(),
            pass: pass.to_owned(),
        }
    }

    /// argv form for the Python script: fields separated by TAB.
    fn to_arg(&self) -> String {
        match self {
            PopStep::Login { user, pass } => format!("login\t{user}\t{pass}"),
            PopStep::Apop { user, pass } => format!("apop\t{user}\t{pass}"),
            PopStep::Stat => "stat".into(),
            PopStep::List => "list".into(),
            PopStep::Uidl => "uidl".into(),
            PopStep::Retr(n) => format!("retr\t{n}"),
            PopStep::Top(n, lines) => format!("top\t{n}\t{lines}"),
            PopStep::Dele(n) => format!("dele\t{n}"),
            PopStep::Noop => "noop".into(),
            PopStep::Rset => "rset".into(),
            PopStep::Capa => "capa".into(),
            PopStep::Utf8 => "utf8".into(),
            PopStep::Raw(command) => format!("raw\t{command}"),
        }
    }
}

// === impl PopReply ===

impl PopReply {
    /// The multi-line body as the client got it: lines joined and ended with CRLF. For `Retr`
    /// this equals what `curl` prints for the same message.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for line in &self.lines {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// `(count, octets)` from a `+OK count octets` STAT reply.
    pub fn stat_counts(&self) -> (usize, u64) {
        let mut words = self.status.split_whitespace().skip(1);
        let parsed = (|| {
            let count = words.next()?.parse().ok()?;
            let octets = words.next()?.parse().ok()?;
            Some((count, octets))
        })();
        parsed.unwrap_or_else(|| panic!("not a STAT reply: {:?}", self.status))
    }

    /// Body lines as text (for LIST / UIDL / CAPA).
    pub fn text_lines(&self) -> Vec<String> {
        self.lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }
}

// === impl PopTranscript ===

impl PopTranscript {
    /// Panics (printing the transcript) unless the session ran with no fatal error and every
    /// reply, STLS and QUIT included, was `+OK`. Returns `self` for chaining.
    pub fn assert_all_ok(&self) -> &Self {
        let all_ok = self.error.is_none()
            && self.greeting.is_some()
            && self
                .stls
                .iter()
                .chain(&self.replies)
                .chain(&self.quit)
                .all(|r| r.ok)
            && self.quit.is_some();
        assert!(all_ok, "poplib session was not all +OK:\n{self}");
        self
    }

    /// The reply to step `i` (0-based); panics with the transcript if that step did not run.
    pub fn reply(&self, i: usize) -> &PopReply {
        self.replies
            .get(i)
            .unwrap_or_else(|| panic!("step {i} has no reply:\n{self}"))
    }
}

impl fmt::Display for PopTranscript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "greeting: {:?}", self.greeting)?;
        if let Some(stls) = &self.stls {
            writeln!(f, "stls: {:?}", stls.status)?;
        }
        for (i, r) in self.replies.iter().enumerate() {
            writeln!(f, "step {i}: {:?} (+{} lines)", r.status, r.lines.len())?;
        }
        writeln!(f, "quit: {:?}", self.quit.as_ref().map(|q| &q.status))?;
        write!(f, "error: {:?}", self.error)
    }
}

// === impl PopClient ===

impl PopClient {
    pub fn new(addr: SocketAddr, mode: PopMode) -> Self {
        PopClient {
            addr,
            mode,
            sni: None,
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// Sends `name` as the TLS server name (while still connecting to `addr`).
    pub fn sni(mut self, name: &str) -> Self {
        self.sni = Some(name.to_owned());
        self
    }

    /// Connects (and does STLS / TLS per `mode`, without verifying the certificate), runs
    /// `steps`, then QUITs. Panics only if python3 itself cannot run or the script breaks;
    /// server and network failures are in the transcript.
    pub fn run(&self, steps: &[PopStep]) -> PopTranscript {
        let mode = match self.mode {
            PopMode::Plain => "plain",
            PopMode::Stls => "stls",
            PopMode::Implicit => "implicit",
        };
        let output = Command::new("python3")
            .arg("-c")
            .arg(POPLIB_SCRIPT)
            .arg(self.addr.ip().to_string())
            .arg(self.addr.port().to_string())
            .arg(mode)
            .arg(self.sni.as_deref().unwrap_or(""))
            .arg(self.timeout.as_secs_f64().to_string())
            .args(steps.iter().map(PopStep::to_arg))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}); the end-to-end tests need it"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "poplib script failed ({}):\n{}\n{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        parse_records(&stdout)
    }
}

/// `PopClient::new(addr, mode).run(..)` with `USER`/`PASS` first: `replies[0]` is the login,
/// `replies[1..]` answer `steps`.
pub fn poplib_session(
    addr: SocketAddr,
    mode: PopMode,
    user: &str,
    pass: &str,
    steps: &[PopStep],
) -> PopTranscript {
    let mut all = vec![PopStep::login(user, pass)];
    all.extend_from_slice(steps);
    PopClient::new(addr, mode).run(&all)
}

/// The Python side prints one record per line: `KIND<TAB>OK<TAB>hex(status)<TAB>hex,hex,...`
/// (`-` for empty), KIND being G greeting, S stls, R step reply, Q quit, E fatal error. Hex keeps
/// arbitrary message bytes intact without needing a JSON parser on the Rust side.
const POPLIB_SCRIPT: &str = r#"
import poplib, socket, ssl, sys
poplib._MAXLINE = 1 << 24
host, port, mode, sni, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
steps = [a.split('\t') for a in sys.argv[6:]]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

def h(b):
    if isinstance(b, str):
        b = b.encode('utf-8', 'surrogateescape')
    return b.hex() or '-'

def out(kind, ok, status, lines=()):
    body = ','.join(l.hex() for l in lines) if lines else '-'
    print(kind, int(ok), h(status), body, sep='\t', flush=True)

# Connect to host:port, but give poplib the SNI name as its host: it uses self.host for
# server_hostname in both POP3_SSL and stls().
class Plain(poplib.POP3):
    def _create_socket(self, timeout):
        return socket.create_connection((host, port), timeout)

class Implicit(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        sock = socket.create_connection((host, port), timeout)
        return self.context.wrap_socket(sock, server_hostname=self.host)

def run(p, cmd, args):
    if cmd == 'login':
        p.user(args[0])
        return p.pass_(args[1])
    if cmd == 'apop': return p.apop(args[0], args[1])
    if cmd == 'stat': return p._shortcmd('STAT')
    if cmd == 'list': return p.list()
    if cmd == 'uidl': return p.uidl()
    if cmd == 'retr': return p.retr(int(args[0]))
    if cmd == 'top': return p.top(int(args[0]), int(args[1]))
    if cmd == 'dele': return p.dele(int(args[0]))
    if cmd == 'noop': return p.noop()
    if cmd == 'rset': return p.rset()
    if cmd == 'capa': return p._longcmd('CAPA')
    if cmd == 'utf8': return p.utf8()
    if cmd == 'raw': return p._shortcmd(args[0])
    raise ValueError('unknown step ' + cmd)

name = sni or host
try:
    if mode == 'implicit':
        p = Implicit(name, port, timeout=timeout, context=ctx)
    else:
        p = Plain(name, port, timeout=timeout)
    out('G', True, p.getwelcome())
    if mode == 'stls':
        out('S', True, p.stls(context=ctx))
except Exception as e:
    out('E', False, '%s: %s' % (type(e).__name__, e))
    sys.exit(0)

for step in steps:
    try:
        r = run(p, step[0], step[1:])
        if isinstance(r, tuple):
            out('R', True, r[0], r[1])
        else:
            out('R', True, r)
    except poplib.error_proto as e:
        out('R', False, e.args[0] if e.args else '')
    except Exception as e:
        out('E', False, '%s: %s' % (type(e).__name__, e))
        sys.exit(0)

try:
    out('Q', True, p.quit())
except poplib.error_proto as e:
    out('Q', False, e.args[0] if e.args else '')
except Exception as e:
    out('E', False, '%s: %s' % (type(e).__name__, e))
"#;

fn parse_records(stdout: &str) -> PopTranscript {
    let mut transcript = PopTranscript::default();
    for record in stdout.lines() {
        let fields: Vec<&str> = record.split('\t').collect();
        assert_eq!(fields.len(), 4, "bad poplib record {record:?}");
        let status = String::from_utf8_lossy(&unhex(fields[2])).into_owned();
        let lines = match fields[3] {
            "-" => Vec::new(),
            list => list.split(',').map(unhex).collect(),
        };
        let reply = PopReply {
            ok: fields[1] == "1",
            status,
            lines,
        };
        match fields[0] {
            "G" => transcript.greeting = Some(reply.status),
            "S" => transcript.stls = Some(reply),
            "R" => transcript.replies.push(reply),
            "Q" => transcript.quit = Some(reply),
            "E" => transcript.error = Some(reply.status),
            kind => panic!("unknown poplib record kind {kind:?}"),
        }
    }
    transcript
}

fn unhex(text: &str) -> Vec<u8> {
    if text == "-" || text.is_empty() {
        return Vec::new();
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex from poplib script"))
        .collect()
}
